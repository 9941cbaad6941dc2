//! The mirror read by independent readers: Python's `deltalake` and `pyarrow` (in a virtualenv this
//! test makes, from PyPI) compared cell by cell with the source read by psycopg, for tables of edge
//! values per type group, copied by the snapshot and changed by the stream.

use crate::pg::{config, test_db, warehouse_dir};
use crate::python::python;
use crate::warehouse::run_once;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_readers_see_every_value_postgres_has() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    let db = test_db("readers").await;
    let wh = warehouse_dir("readers");
    let table = "CREATE TABLE r (id int PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, f4 float4,
        f8 float8, n numeric(20,6), nu numeric, t text, c char(5), by bytea, d date, ts timestamp,
        tz timestamptz, tm time, iv interval, j jsonb, u uuid, arr int[], txt text[], rg int4range,
        ip inet, m money, bits varbit, pt point, e_mood mood, m2 int[][], dm posint, dn amount,
        da posint[], ea mood[], na numeric(10,2)[], tza timestamptz[], ba bytea[], fa float8[],
        bo bool[], iva interval[], dmd amount[][])";
    let rows = "INSERT INTO r SELECT g, g % 2 = 0, (g % 32767)::int2, g * 1000, g::int8 * 1000000000000,
        (g * 1.1)::float4 * 10 ^ ((g % 70) - 35)::float4, (g * 1.123456789) * 10 ^ ((g % 600) - 300),
        g * 1.000001 - 500, (g * 3.14159265358979)::numeric ^ 3, 'line ' || g || E'\\n\\ttab\\\\ é ✓',
        'c', decode(md5(g::text), 'hex'), DATE '0001-01-01' + (g % 300) * 9000, TIMESTAMP '1999-12-31 23:59:59.999999'
        + g * interval '1 day 1.000123 second', TIMESTAMPTZ '2024-02-29 12:34:56.789+02' + g * interval '17 minutes',
        TIME '00:00' + g * interval '1 minute', g * interval '1 day 2 hours 3.5 seconds',
        jsonb_build_object('g', g, 'a', jsonb_build_array(1, 'x')), md5(g::text)::uuid,
        ARRAY[g, NULL, -g], ARRAY['a b', NULL, '\"q\"'], int4range(g, g + 10), ('10.0.' || (g % 255) || '.1')::inet,
        g * 1.25, (g % 256)::bit(8)::varbit, point(g, -g), CASE WHEN g % 2 = 0 THEN 'sad' ELSE 'happy' END::mood,
        ARRAY[[g, NULL], [-g, 0]], g, g * 1.5, ARRAY[g, g + 1]::posint[], ARRAY['sad', NULL, 'happy']::mood[],
        ARRAY[g * 0.25, NULL], ARRAY[TIMESTAMPTZ '2024-01-01 00:00+00' + g * interval '1 hour 1.5 seconds'],
        ARRAY[decode(md5(g::text), 'hex'), ''::bytea, NULL], ARRAY['NaN', g * 1.1, '-Infinity', -0.0]::float8[],
        ARRAY[true, false, NULL], ARRAY[g * interval '1 day 2 seconds'], ARRAY[[g * 0.5], [NULL]]::amount[][]
        FROM generate_series(1, 300) g";
    // Arrays: empty, of other dimensions than declared, with lower bounds other than 1, with an
    // element the element type cannot hold (numeric NaN): exact text beside a NULL.
    let edges = "INSERT INTO r (id, f4, f8, n, t, arr, txt, m2, na, fa, dmd) VALUES
        (1001, 'NaN', 'Infinity', 'NaN', '', '{}', '{}', '{}', '{NaN,1}', '{}', '{}'),
        (1002, '-Infinity', '-0', 0, NULL, '{{1,2},{3,NULL}}', '{\"\"}', '{1,2}', '{}', '{{1.5}}', '{{1},{2}}'),
        (1003, 1e-38, 1e-300, -0.000001, ' ', '[0:1]={7,8}', '{NULL,\"NULL\",\"a,b\",\"{}\",\"\\\\\"}', NULL, '{NULL}', '{NULL}', '{{NULL}}'),
        (1004, 3.4028235e38, 1.7976931348623157e308, 99999999999999.999999, repeat('long ', 2000), '{}', '{x}',
         '{{1,2,3},{4,5,6}}', '{0.01}', '{1e-300,1.7976931348623157e308}', '{{1},{-1}}')";
    db.client
        .batch_execute(&format!(
            "CREATE TYPE mood AS ENUM ('sad', 'happy'); CREATE DOMAIN posint AS int CHECK (VALUE > 0);
             CREATE DOMAIN amount AS numeric(12,2); {table}; {rows}; {edges};"
        ))
        .await
        .unwrap();
    let cfg = config(&db, &wh);
    run_once(&cfg).await; // the snapshot
    db.client
        .batch_execute(&format!(
            "{}; {}; UPDATE r SET t = 'changed ' || id, n = n + 1 WHERE id % 7 = 0;",
            rows.replace("generate_series(1, 300)", "generate_series(2001, 2300)"),
            edges.replace("(100", "(300")
        ))
        .await
        .unwrap();
    run_once(&cfg).await; // the stream
    let wh = wh.display().to_string();
    crate::python::assert_roundtrip(&py, &[db.url.as_str(), &wh, "public", "r", "id"], 608);
}

/// The mirror and changelog read by the engines analysts use, installed from PyPI: the
/// `deltalake` package, Polars, Daft, and DuckDB over the files the Delta table lists; each sees
/// the source's rows (after a snapshot and a stream of inserts, updates and deletes) and the same
/// changes per operation. Twice: a mirror with deletion vectors (the default: `deltalake` and
/// Polars read it, Daft must refuse it rather than read it wrong, DuckDB over bare files cannot
/// see the vectors), and a copy-on-write mirror (`warehouse.deletion_vectors = false`) that all
/// four read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_engines_read_mirror_and_changelog_as_postgres_has_them() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    for vectors in [true, false] {
        let name = if vectors { "engines" } else { "engines_cow" };
        let db = test_db(name).await;
        let wh = warehouse_dir(name);
        db.client
            .batch_execute(
                "CREATE TABLE e (id int PRIMARY KEY, name text, amount numeric(12,2),
                     at timestamptz, flag bool, tags text[]);
                 INSERT INTO e SELECT g, 'name ' || g, g * 1.25, TIMESTAMPTZ '2024-01-01 00:00+00'
                     + g * interval '1 hour 1.5 seconds', g % 3 = 0,
                     CASE WHEN g % 5 = 0 THEN NULL ELSE ARRAY['t' || g, NULL] END
                 FROM generate_series(1, 500) g",
            )
            .await
            .unwrap();
        let mut cfg = config(&db, &wh);
        cfg.warehouse.deletion_vectors = vectors;
        run_once(&cfg).await; // the snapshot
        db.client
            .batch_execute(
                "INSERT INTO e SELECT g, NULL, -g, NULL, NULL, '{}' FROM generate_series(501, 600) g;
                 UPDATE e SET name = 'changed ' || id, amount = amount + 0.01 WHERE id % 7 = 0;
                 DELETE FROM e WHERE id % 11 = 0;",
            )
            .await
            .unwrap();
        run_once(&cfg).await; // the stream
        let wh = wh.display().to_string();
        let said =
            crate::python::run_script(&py, "engines.py", &[db.url.as_str(), &wh, "public.e"]);
        let (layout, engines, refused): (_, &[&str], &[&str]) = if vectors {
            ("deletion vectors", &["deltalake", "polars"], &["daft"])
        } else {
            (
                "copy-on-write",
                &["deltalake", "polars", "daft", "duckdb"],
                &[],
            )
        };
        assert!(said.contains(&format!("mirror layout: {layout}")), "{said}");
        for engine in engines {
            assert!(said.contains(&format!("{engine}: mirror ")), "{said}");
        }
        for engine in refused {
            assert!(said.contains(&format!("{engine}: refuses")), "{said}");
        }
    }
}
