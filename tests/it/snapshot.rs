//! Initial snapshot: tables that hold data before walden starts end up exactly mirrored, while
//! writes go on during the copy; a snapshot cut short by a crash starts over cleanly.

use std::time::Duration;

use walden::sink::TableKind;

use crate::crash::walden;
use crate::pg::{config, test_db, warehouse_dir, TestDb};
use crate::warehouse::{assert_same, delta_rows, pg_rows, run_once};

const BIG_PG: &str = "SELECT concat_ws('|', id::text, coalesce(v,'~'), coalesce(n::text,'~'), \
    coalesce(((extract(epoch from at)*1000000)::bigint)::text,'~')) FROM big ORDER BY id";
const BIG_DF: &str = "SELECT concat_ws('|', CAST(id AS VARCHAR), coalesce(v,'~'), coalesce(CAST(n AS VARCHAR),'~'), \
    coalesce(CAST(CAST(at AS BIGINT) AS VARCHAR),'~')) FROM t ORDER BY id";
const ODD_PG: &str = "SELECT concat_ws('|', k, coalesce(s,'~'), coalesce(encode(b,'hex'),'~'), coalesce(j::text,'~')) FROM odd ORDER BY k";
const ODD_DF: &str = "SELECT concat_ws('|', k, coalesce(s,'~'), coalesce(encode(b,'hex'),'~'), coalesce(j,'~')) FROM t ORDER BY k";

async fn setup(db: &TestDb, rows: i64) {
    db.client
        .batch_execute(&format!(
            "CREATE TABLE big (id bigint PRIMARY KEY, v text, n numeric(12,2), at timestamptz);
             INSERT INTO big SELECT g, 'row ' || g, g * 1.25, '2024-01-01'::timestamptz + g * interval '1 second'
               FROM generate_series(1, {rows}) g;
             CREATE TABLE odd (k text PRIMARY KEY, s text, b bytea, j jsonb);
             INSERT INTO odd VALUES ('tab', E'a\\tb', '\\x00ff', '{{\"a\": [1, \"x\\\\ny\"]}}'),
               ('newline', E'line1\\nline2\\r\\n', NULL, NULL), ('backslash', E'c:\\\\dir\\\\N', '\\x5c4e', 'null'),
               ('null-text', '\\N', '', '[]'), ('empty', '', NULL, '{{}}');
             CREATE TABLE empty_one (id int PRIMARY KEY);
             ANALYZE;"
        ))
        .await
        .unwrap();
}

async fn assert_mirrors(db: &TestDb, wh: &std::path::Path) {
    let src = pg_rows(&db.client, BIG_PG).await;
    let mir = delta_rows(wh, TableKind::Mirror, "big", BIG_DF).await;
    assert_same("big", &src, &mir);
    let src = pg_rows(&db.client, ODD_PG).await;
    let mir = delta_rows(wh, TableKind::Mirror, "odd", ODD_DF).await;
    assert_same("odd", &src, &mir);
    let n = delta_rows(
        wh,
        TableKind::Mirror,
        "empty_one",
        "SELECT CAST(count(*) AS VARCHAR) FROM t",
    )
    .await;
    assert_eq!(n, vec!["0"]);
}

/// Concurrent writes on `big` until `stop` is set; returns how many transactions ran.
async fn writer(
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    rows: i64,
) -> u64 {
    let c = crate::pg::connect(&url).await;
    let mut i = 0i64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        c.batch_execute(&format!(
            "BEGIN;
             INSERT INTO big VALUES ({new}, 'new {i}', {i}, now());
             UPDATE big SET v = 'upd {i}', n = n + 1 WHERE id = {upd};
             DELETE FROM big WHERE id = {del};
             COMMIT;",
            new = rows + i,
            upd = (i * 7919) % rows + 1,
            del = (i * 104_729) % rows + 1,
        ))
        .await
        .unwrap();
    }
    i as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_tables_are_copied_in_chunks_while_writes_go_on() {
    let db = test_db("snap_concurrent").await;
    let wh = warehouse_dir("snap_concurrent");
    let rows = 300_000;
    setup(&db, rows).await;
    let mut cfg = config(&db, &wh);
    cfg.snapshot.chunk_rows = 40_000;
    cfg.snapshot.parallelism = 2;
    cfg.batch.max_rows = 20_000;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = tokio::spawn(writer(db.url.clone(), stop.clone(), rows));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = run_once(&cfg).await; // snapshot, then drains what committed meanwhile
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let txns = w.await.unwrap();
    run_once(&cfg).await;
    assert!(txns > 0, "the writer ran no transactions");
    assert!(
        first.transactions > 0,
        "no writes streamed after the snapshot ({txns} ran)"
    );
    assert_mirrors(&db, &wh).await;

    // The snapshot rows are in the changelog, once, and every (lsn, seq) is unique.
    let snap = delta_rows(
        &wh,
        TableKind::Changes,
        "big",
        "SELECT CAST(count(*) AS VARCHAR) FROM t WHERE _walden_op = 'snapshot'",
    )
    .await;
    let n: i64 = snap[0].parse().unwrap();
    assert!(
        n >= rows - txns as i64 && n <= rows + txns as i64,
        "{n} snapshot rows"
    );
    let dup = delta_rows(&wh, TableKind::Changes, "big",
        "SELECT CAST(count(*) AS VARCHAR) FROM (SELECT _walden_lsn, _walden_seq FROM t GROUP BY 1, 2 HAVING count(*) > 1) d").await;
    assert_eq!(dup, vec!["0"]);
    let chunks = delta_rows(&wh, TableKind::Changes, "big",
        "SELECT CAST(count(DISTINCT _walden_seq / 4294967296) AS VARCHAR) FROM t WHERE _walden_op = 'snapshot'").await;
    assert!(
        chunks[0].parse::<i64>().unwrap() >= 5,
        "expected several chunks, got {chunks:?}"
    );
    let marker =
        std::fs::read_to_string(wh.join("_walden/s_snap_concurrent/snapshot.json")).unwrap();
    assert!(marker.contains("\"done\""), "{marker}");

    // The mirror's snapshot files are projections of the changelog's (same names), and their
    // add actions carry statistics of the mirror's columns only.
    let log =
        std::fs::read_to_string(wh.join("mirror/public/big/_delta_log/00000000000000000001.json"))
            .unwrap();
    let adds: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("add").cloned())
        .collect();
    assert!(adds.len() >= 5, "{} mirror files", adds.len());
    let mut mirror_rows = 0;
    for add in &adds {
        let path = add["path"].as_str().unwrap();
        assert!(
            wh.join("changes/public/big").join(path).exists(),
            "{path} has no changelog counterpart"
        );
        let stats: serde_json::Value =
            serde_json::from_str(add["stats"].as_str().unwrap()).unwrap();
        mirror_rows += stats["numRecords"].as_i64().unwrap();
        assert!(stats["minValues"].get("id").is_some(), "{stats}");
        assert!(stats["minValues"].get("_walden_op").is_none(), "{stats}");
    }
    assert!(
        mirror_rows >= rows - txns as i64,
        "{mirror_rows} rows in the snapshot files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_snapshot_starts_the_snapshot_over() {
    let db = test_db("snap_crash").await;
    let wh = warehouse_dir("snap_crash");
    setup(&db, 20_000).await;
    // Abort right after the first table's changelog commit: one table half-committed, others not.
    let out = walden(
        &db,
        &wh,
        &["run", "--once"],
        Some("after-snapshot-changelog-commit"),
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let marker = std::fs::read_to_string(wh.join("_walden/s_snap_crash/snapshot.json")).unwrap();
    assert!(marker.contains("\"copying\""), "{marker}");
    db.client
        .batch_execute(
            "UPDATE big SET v = 'after crash' WHERE id <= 10; DELETE FROM odd WHERE k = 'empty'",
        )
        .await
        .unwrap();
    let out = walden(&db, &wh, &["run", "--once"], None).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_mirrors(&db, &wh).await;
    // Streaming continues after the redone snapshot.
    db.client
        .batch_execute("INSERT INTO big VALUES (-1, 'later', 1, now())")
        .await
        .unwrap();
    let out = walden(&db, &wh, &["run", "--once"], None).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_mirrors(&db, &wh).await;
}
