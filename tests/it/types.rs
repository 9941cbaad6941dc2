//! Values the Arrow type cannot hold are never silently lost: numeric NaN and ±infinity
//! dates and timestamps are NULL in their column and kept, exactly, in `_walden_unrepresentable`;
//! the snapshot and the stream write every value in the same text form (intervals included).

use walden::sink::TableKind;

use crate::pg::{config, test_db, warehouse_dir};
use crate::warehouse::{delta_rows, run_once, snapshotted};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrepresentable_values_keep_their_exact_text_in_snapshot_and_stream() {
    let (db, wh, cfg) = snapshotted(
        "types_exact",
        "CREATE TABLE v (id int PRIMARY KEY, n numeric(10,2), d date, ts timestamp, i interval);
             INSERT INTO v VALUES (1, 'NaN', 'infinity', '-infinity', '1 year 2 mons 3 days 04:05:06'),
                                  (2, 12.5, '2024-02-29', '2024-02-29 12:00', '-1 day');",
    )
    .await;
    db.client
        .batch_execute(
            "INSERT INTO v VALUES (3, 'NaN', '-infinity', 'infinity', '1 year 2 mons 3 days 04:05:06'),
                                  (4, 7.25, '2000-01-01', NULL, NULL);",
        )
        .await
        .unwrap();
    run_once(&cfg).await;
    let rows = delta_rows(
        &wh,
        TableKind::Mirror,
        "v",
        "SELECT concat_ws('|', CAST(id AS VARCHAR), coalesce(CAST(n AS VARCHAR), '~'), \
         coalesce(CAST(d AS VARCHAR), '~'), coalesce(i, '~'), coalesce(_walden_unrepresentable, '~')) \
         FROM t ORDER BY id",
    )
    .await;
    assert_eq!(
        rows,
        vec![
            r#"1|~|~|P1Y2M3DT4H5M6S|{"d":"infinity","n":"NaN","ts":"-infinity"}"#,
            "2|12.50|2024-02-29|P-1D|~",
            r#"3|~|~|P1Y2M3DT4H5M6S|{"d":"-infinity","n":"NaN","ts":"infinity"}"#,
            "4|7.25|2000-01-01|~|~",
        ]
    );
    let changes = delta_rows(
        &wh,
        TableKind::Changes,
        "v",
        "SELECT concat_ws('|', _walden_op, _walden_unrepresentable) FROM t WHERE id = 3",
    )
    .await;
    assert_eq!(
        changes,
        vec![r#"insert|{"d":"-infinity","n":"NaN","ts":"infinity"}"#]
    );
}

/// `walden verify` compares the mirror with what Postgres prints for each value (`col::text`):
/// edge values of every mapped type, loaded by the snapshot and by the stream, must verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_agrees_with_postgres_text_for_edge_values() {
    let db = test_db("types_verify").await;
    let wh = warehouse_dir("types_verify");
    let table = "CREATE TABLE e (id int PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, f4 float4,
        f8 float8, n numeric(20,6), nu numeric, t text, vc varchar(10), c char(5), by bytea, d date,
        ts timestamp, tz timestamptz, tm time, iv interval, j jsonb, u uuid, arr int[], e text[],
        m2 float8[][], ba bytea[], tsa timestamptz[], dm posint, da posint[], ia interval[])";
    // Edge values, and a spread of float magnitudes (both notations, both signs).
    let rows = "INSERT INTO e SELECT g, g % 2 = 0, (g % 32767)::int2, g * 1000, g::int8 * 1000000000000,
        (g * 1.1)::float4 * 10 ^ ((g % 70) - 35)::float4 * CASE WHEN g % 3 = 0 THEN -1 ELSE 1 END,
        (g * 1.123456789) * 10 ^ ((g % 600) - 300) * CASE WHEN g % 3 = 0 THEN -1 ELSE 1 END,
        g * 1.000001 - 500, (g * 3.14159265358979)::numeric ^ 3, 'line ' || g || E'\\n\\ttab\\\\ é ✓',
        'v' || g, 'c', decode(md5(g::text), 'hex'), DATE '2000-01-01' + g * 37,
        TIMESTAMP '1999-12-31 23:59:59.999999' + g * interval '1 day 1.000123 second',
        TIMESTAMPTZ '2024-02-29 12:34:56.789+02' + g * interval '17 minutes',
        TIME '00:00' + g * interval '1 minute', g * interval '1 day 2 hours 3.5 seconds',
        jsonb_build_object('g', g, 'a', jsonb_build_array(1, 'x')), md5(g::text)::uuid,
        ARRAY[g, NULL, -g], ARRAY['a b', NULL, '\"q\"'],
        ARRAY[[g * 1.1, NULL], ['NaN', -g * 1e-300]], ARRAY[decode(md5(g::text), 'hex'), NULL],
        ARRAY[TIMESTAMPTZ '2024-02-29 12:34:56.789+02' + g * interval '17 minutes'], g, ARRAY[g]::posint[],
        ARRAY[g * interval '1 day 2 hours 3.5 seconds', NULL]
        FROM generate_series(1, 400) g";
    let edges = "INSERT INTO e (id, f4, f8, n, d, ts, tz, t, arr, e, m2) VALUES
        (1001, 'NaN', 'Infinity', 'NaN', '-infinity', 'infinity', '-infinity', '', '{}', '{}', '{}'),
        (1002, '-Infinity', '-0', 0, '0044-03-15 BC', '0044-03-15 12:00:00 BC', '2000-01-01 00:00:00.5+00', NULL,
         '{{1,2},{3,NULL}}', '{\"\",\"NULL\",NULL,\" x\",\"a,b\",\"{}\",\"\\\\\"}', '{1.5}'),
        (1003, 1e-38, 1e-300, -0.000001, '9999-12-31', '1970-01-01', '1970-01-01 00:00:00+00', 'x',
         '[0:1]={7,8}', '{é,\"tab\ttab\"}', '{{{1}}}'),
        (1004, 3.4028235e38, 1.7976931348623157e308, 99999999999999.999999, '0001-01-01', '2000-02-29 00:00:00.000001', NULL, ' ',
         NULL, NULL, '{{Infinity},{-Infinity}}')";
    db.client
        .batch_execute(&format!(
            "CREATE DOMAIN posint AS int CHECK (VALUE > 0); {table}; {rows}; {edges};"
        ))
        .await
        .unwrap();
    let cfg = config(&db, &wh);
    run_once(&cfg).await; // snapshot
    db.client
        .batch_execute(&format!(
            "{}; {};",
            rows.replace("generate_series(1, 400)", "generate_series(2001, 2400)"),
            edges.replace("(100", "(300")
        ))
        .await
        .unwrap();
    run_once(&cfg).await; // stream
    let v = walden::ops::verify::run(&cfg, None).await.unwrap();
    assert!(v.ok, "{}", v.render());
    assert_eq!(v.tables[0].source.rows, 808);

    // A mapping error of one ulp in one value: verify must see it, and name the column.
    let w = walden::sink::Warehouse::new(&walden::config::WarehouseConfig {
        url: wh.display().to_string(),
        storage_options: Default::default(),
        deletion_vectors: true,
        key_index_rows: 1_000_000,
    })
    .unwrap();
    let t = walden::apply::inspect::open(&w, &w.table_url(TableKind::Mirror, "public", "e"))
        .await
        .unwrap()
        .expect("the mirror exists");
    let _ = t
        .update()
        .with_predicate("id = 7")
        .with_update("f8", "f8 * 1.0000000000000002")
        .await
        .unwrap();
    let v = walden::ops::verify::run(&cfg, None).await.unwrap();
    assert!(!v.ok);
    assert_eq!(v.tables[0].differs, vec!["f8"], "{}", v.render());
}
