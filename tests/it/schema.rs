//! Schema changes while streaming: added, dropped and widened columns evolve both Delta tables
//! with no restart; a type change the warehouse cannot follow exactly moves the old column aside
//! and copies the table again (or, configured so, stops with what to do).

use walden::sink::TableKind;

use crate::pg::{config, test_db, warehouse_dir};
use crate::warehouse::{
    assert_same, assert_verified, delta_columns, delta_rows, pg_rows, run_once, snapshotted,
    Streaming,
};

const PG: &str =
    "SELECT concat_ws('|', id::text, n::text, v, amount::text, coalesce(added::text,'~')) \
    FROM s ORDER BY id";
const DF: &str =
    "SELECT concat_ws('|', CAST(id AS VARCHAR), CAST(n AS VARCHAR), v, CAST(amount AS VARCHAR), \
    coalesce(CAST(added AS VARCHAR),'~')) FROM t ORDER BY id";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_dropped_and_widened_columns_evolve_the_warehouse() {
    let db = test_db("schema_evolve").await;
    let wh = warehouse_dir("schema_evolve");
    db.client
        .batch_execute(
            "CREATE TABLE s (id int PRIMARY KEY, n int, v varchar(10), amount numeric(8,2), gone text);",
        )
        .await
        .unwrap();
    let cfg = config(&db, &wh);
    run_once(&cfg).await;
    db.client
        .batch_execute("INSERT INTO s SELECT g, g * 10, 'v' || g, g + 0.25, 'g' || g FROM generate_series(1, 3) g")
        .await
        .unwrap();
    run_once(&cfg).await;

    db.client
        .batch_execute(
            "ALTER TABLE s ALTER COLUMN n TYPE bigint, ALTER COLUMN v TYPE text,
                 ALTER COLUMN amount TYPE numeric(14,2);
             ALTER TABLE s ADD COLUMN added int;
             ALTER TABLE s DROP COLUMN gone;
             UPDATE s SET n = 5000000000, added = 1 WHERE id = 1;
             INSERT INTO s VALUES (4, 6000000000, repeat('x', 50), 123456789012.34, 2);",
        )
        .await
        .unwrap();
    run_once(&cfg).await;
    let src = pg_rows(&db.client, PG).await;
    let mir = delta_rows(&wh, TableKind::Mirror, "s", DF).await;
    assert_same("s", &src, &mir);
    // The dropped column stays, NULL in rows written after the drop.
    let gone = delta_rows(
        &wh,
        TableKind::Mirror,
        "s",
        "SELECT coalesce(gone, '~') FROM t ORDER BY id",
    )
    .await;
    assert_eq!(gone, vec!["~", "g2", "g3", "~"]);
    // The changelog's history was widened too: old and new values side by side.
    let hist = delta_rows(
        &wh,
        TableKind::Changes,
        "s",
        "SELECT concat_ws('|', arrow_typeof(n), CAST(sum(n) AS VARCHAR)) FROM t GROUP BY arrow_typeof(n)",
    )
    .await;
    assert_eq!(hist, vec!["Int64|11000000060"]);

    // Not a widening: Postgres rewrote the values with its USING expression. By default the
    // old column moves aside and the table is copied again.
    db.client
        .batch_execute(
            "INSERT INTO s (id, n, v, amount) VALUES (5, 5, 'before', 1);
             COMMIT;
             ALTER TABLE s ALTER COLUMN v TYPE int USING length(v);
             UPDATE s SET added = 3 WHERE id = 2;
             INSERT INTO s (id, n, v, amount) VALUES (6, 6, 66, 6);",
        )
        .await
        .unwrap();
    run_once(&cfg).await;
    let src = pg_rows(
        &db.client,
        "SELECT concat_ws('|', id, v, added) FROM s ORDER BY id",
    )
    .await;
    let mir = delta_rows(
        &wh,
        TableKind::Mirror,
        "s",
        "SELECT concat_ws('|', CAST(id AS VARCHAR), CAST(v AS VARCHAR), CAST(added AS VARCHAR)) \
         FROM t ORDER BY id",
    )
    .await;
    assert_same("s", &src, &mir);
    assert_eq!(src.len(), 6);
    let aside: Vec<String> = delta_columns(&wh, TableKind::Changes, "s")
        .await
        .into_iter()
        .filter(|c| c.starts_with("v__before_"))
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "the old column moved aside in the changelog"
    );
    let old = delta_rows(
        &wh,
        TableKind::Changes,
        "s",
        &format!(
            "SELECT \"{}\" FROM t WHERE id = 5 AND _walden_op = 'insert'",
            aside[0]
        ),
    )
    .await;
    assert_eq!(old, vec!["before"], "the changelog keeps the old values");
    assert_verified(&cfg).await;

    // With `stop`, walden stops with what to do.
    let mut stop = cfg.clone();
    stop.schema.on_incompatible_type = walden::config::IncompatibleType::Stop;
    db.client
        .batch_execute(
            "ALTER TABLE s ALTER COLUMN added TYPE boolean USING (added > 2);
             UPDATE s SET n = 7 WHERE id = 3;",
        )
        .await
        .unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let err = walden::pipeline::run(&stop, walden::pipeline::Mode::Once, rx)
        .await
        .expect_err("an incompatible type change must stop the run");
    let msg = err.to_string();
    assert!(
        msg.contains("column added of public.s changed type"),
        "{msg}"
    );
    assert!(msg.contains("walden backfill --table public.s"), "{msg}");
    assert!(!err.is_transient(), "{msg}");
}

/// RENAME COLUMN is told apart from DROP + ADD by attribute number: the renamed column keeps its
/// values (older rows included, in both tables), also when a new column takes the old name in the
/// same batch; a dropped and re-added column is not taken for a rename.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_columns_keep_their_values() {
    let (db, wh, cfg) = snapshotted(
        "schema_rename",
        "CREATE TABLE s (id int PRIMARY KEY, a text, b int, c text);
             INSERT INTO s SELECT g, 'a' || g, g, 'c' || g FROM generate_series(1, 3) g;",
    )
    .await;
    db.client
        .batch_execute(
            "INSERT INTO s VALUES (4, 'a4', 4, 'c4');
             ALTER TABLE s RENAME COLUMN a TO a2;
             INSERT INTO s VALUES (5, 'a5', 5, 'c5');
             ALTER TABLE s ADD COLUMN a text;
             UPDATE s SET a = 'new' || id WHERE id = 2;
             ALTER TABLE s DROP COLUMN c;
             ALTER TABLE s ADD COLUMN c text;
             UPDATE s SET c = 'again', b = b + 100 WHERE id = 3;
             ALTER TABLE s RENAME COLUMN b TO b2;
             INSERT INTO s VALUES (6, 'a6', 6, 'x6', 'c6');",
        )
        .await
        .unwrap();
    run_once(&cfg).await;
    let pg =
        "SELECT concat_ws('|', id, a2, b2, coalesce(a, '~'), coalesce(c, '~')) FROM s ORDER BY id";
    let src = pg_rows(&db.client, pg).await;
    let mir = delta_rows(
        &wh,
        TableKind::Mirror,
        "s",
        "SELECT concat_ws('|', CAST(id AS VARCHAR), a2, CAST(b2 AS VARCHAR), coalesce(a, '~'), \
         coalesce(c, '~')) FROM t ORDER BY id",
    )
    .await;
    assert_same("s", &src, &mir);
    // The mirror has no column under an old name.
    let names: Vec<String> = delta_columns(&wh, TableKind::Mirror, "s")
        .await
        .into_iter()
        .filter(|n| !n.starts_with("_walden"))
        .collect();
    // The dropped c kept its values aside when a new c took its name.
    assert_eq!(names, ["id", "a2", "b2", "c__dropped_4", "a", "c"]);
    // The changelog's history carries the values under the new names.
    let hist = delta_rows(
        &wh,
        TableKind::Changes,
        "s",
        "SELECT DISTINCT concat_ws('|', CAST(id AS VARCHAR), a2) FROM t WHERE id <= 4 ORDER BY 1",
    )
    .await;
    assert_eq!(hist, vec!["1|a1", "2|a2", "3|a3", "4|a4"]);
    assert_verified(&cfg).await;
}

/// A column added with a default: the rows from before hold it at the source (a fast default, or
/// a rewrite for a volatile one), which the stream never sends: the table is copied again, so the
/// mirror holds it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_column_defaults_reach_the_rows_from_before() {
    let (db, wh, cfg) = snapshotted(
        "schema_default",
        "CREATE TABLE s (id int PRIMARY KEY, v text);
             INSERT INTO s SELECT g, 'v' || g FROM generate_series(1, 50) g;",
    )
    .await;
    db.client
        .batch_execute(
            "ALTER TABLE s ADD COLUMN d int DEFAULT 7;
             ALTER TABLE s ADD COLUMN r float8 DEFAULT random();
             INSERT INTO s (id, v) VALUES (51, 'v51');
             UPDATE s SET d = 8 WHERE id = 2;",
        )
        .await
        .unwrap();
    run_once(&cfg).await;
    let pg = "SELECT concat_ws('|', id, v, d, r) FROM s ORDER BY id";
    let src = pg_rows(&db.client, pg).await;
    let mir = delta_rows(
        &wh,
        TableKind::Mirror,
        "s",
        "SELECT concat_ws('|', CAST(id AS VARCHAR), v, CAST(d AS VARCHAR), CAST(r AS VARCHAR)) FROM t ORDER BY id",
    )
    .await;
    assert_eq!(src.len(), 51);
    // The float text forms differ between the two engines; verify compares them exactly.
    let ints = |rows: &[String]| -> Vec<String> {
        rows.iter()
            .map(|r| r.rsplit_once('|').unwrap().0.to_string())
            .collect()
    };
    assert_same("s", &ints(&src), &ints(&mir));
    assert_verified(&cfg).await;
}

/// Columns added with no change afterwards: pgoutput describes a table only before its next
/// change, so walden asks the catalog. Without a default the column reaches both tables (NULL in
/// every row, as at the source); with one, the table is copied again so the rows hold it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_added_with_no_change_afterwards_reach_the_warehouse() {
    let (db, wh, cfg) = snapshotted(
        "schema_quiet",
        "CREATE TABLE q (id int PRIMARY KEY, v text);
             INSERT INTO q SELECT g, 'v' || g FROM generate_series(1, 20) g;",
    )
    .await;
    db.client
        .batch_execute("ALTER TABLE q ADD COLUMN n int, ADD COLUMN t text;")
        .await
        .unwrap();
    run_once(&cfg).await;
    for kind in [TableKind::Mirror, TableKind::Changes] {
        let cols = delta_columns(&wh, kind, "q").await;
        assert!(
            cols.iter().any(|c| c == "n") && cols.iter().any(|c| c == "t"),
            "{kind:?} has the added columns: {cols:?}"
        );
    }
    let versions = std::fs::read_dir(wh.join("_walden/schemas/public/q"))
        .unwrap()
        .count();
    assert_eq!(
        versions, 2,
        "the added columns are a recorded schema version"
    );
    assert_verified(&cfg).await;

    // While streaming: a default, which the existing rows hold.
    let streaming = Streaming::start(&cfg);
    // The session describes q before the column comes, so its description is the older one.
    db.client
        .batch_execute("UPDATE q SET v = 'seen' WHERE id = 1;")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    db.client
        .batch_execute("ALTER TABLE q ADD COLUMN d int DEFAULT 7;")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let sevens = loop {
        let cols = delta_columns(&wh, TableKind::Mirror, "q").await;
        if cols.iter().any(|c| c == "d") {
            let n = delta_rows(
                &wh,
                TableKind::Mirror,
                "q",
                "SELECT CAST(count(*) AS VARCHAR) FROM t WHERE d = 7",
            )
            .await;
            if n == vec!["20"] || std::time::Instant::now() > deadline {
                break n;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "column d never reached the mirror"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    // A change after the copy: the copy already holds the column, no second copy.
    db.client
        .batch_execute("INSERT INTO q (id, v) VALUES (21, 'after');")
        .await
        .unwrap();
    let count = "SELECT CAST(count(*) AS VARCHAR) FROM t";
    while delta_rows(&wh, TableKind::Mirror, "q", count).await != vec!["21"] {
        assert!(
            std::time::Instant::now() < deadline,
            "the insert never reached the mirror"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    streaming.stop().await;
    assert_eq!(
        sevens,
        vec!["20"],
        "every row from before holds the default"
    );
    let copied = delta_rows(
        &wh,
        TableKind::Changes,
        "q",
        "SELECT CAST(count(*) AS VARCHAR) FROM t WHERE _walden_op = 'snapshot'",
    )
    .await;
    assert_eq!(
        copied,
        vec!["40"],
        "the snapshot and one copy for the default"
    );
    assert_verified(&cfg).await;
}
