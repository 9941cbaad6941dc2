//! Transactions larger than the memory budget and than one batch: they spill to disk, land in
//! several Delta commits, and stay exactly once when walden dies between those commits.

use walden::sink::TableKind;

use crate::crash::walden;
use crate::pg::{test_db, warehouse_dir};
use crate::warehouse::{
    assert_changelog_unique, assert_id_v_mirror, assert_same, delta_rows, pg_rows,
};

const PG: &str = "SELECT concat_ws('|', id::text, coalesce(payload,'~'), coalesce(md5(big),'~')) AS r FROM big_t ORDER BY id";
const DF: &str = "SELECT concat_ws('|', CAST(id AS VARCHAR), coalesce(payload,'~'), coalesce(md5(big),'~')) AS r FROM t ORDER BY id";

fn run(cmd: &mut std::process::Command) -> std::process::Output {
    cmd.env("WALDEN_BATCH__MAX_ROWS", "500")
        .env("WALDEN_SPILL__MEMORY_BYTES", "1048576")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transaction_spills_and_lands_exactly_once_across_a_crash() {
    let db = test_db("large").await;
    let wh = warehouse_dir("large");
    let spill = wh.with_file_name("spill-large");
    db.client
        .batch_execute(&format!(
            "CREATE TABLE big_t (id int PRIMARY KEY, payload text, big text);
             ALTER TABLE big_t ALTER COLUMN big SET STORAGE EXTERNAL;
             CREATE TABLE side (id int PRIMARY KEY, v text);
             ALTER DATABASE {} SET logical_decoding_work_mem = '64kB';",
            db.name
        ))
        .await
        .unwrap();
    let mut first = walden(&db, &wh, &["run", "--once"], None);
    first.env("WALDEN_SPILL__DIR", &spill);
    let out = run(&mut first);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    db.client
        .batch_execute(
            "INSERT INTO big_t SELECT g, 'before', repeat(md5(g::text), 100) FROM generate_series(1, 200) g",
        )
        .await
        .unwrap();

    // One transaction: 3000 inserts, an aborted sub-transaction, updates that leave TOASTed
    // values unchanged (of rows from before it and of rows it inserted), key changes, deletes.
    db.client
        .batch_execute(
            "BEGIN;
             INSERT INTO big_t SELECT g, 'inserted', repeat(md5(g::text), 100) FROM generate_series(1000, 3999) g;
             SAVEPOINT a;
             INSERT INTO big_t SELECT g, 'ABORTED', NULL FROM generate_series(5000, 5499) g;
             ROLLBACK TO SAVEPOINT a;
             INSERT INTO side SELECT g, 'side' FROM generate_series(1, 700) g;
             UPDATE big_t SET payload = 'updated' WHERE id <= 200;
             UPDATE big_t SET id = id + 10000, payload = 'moved' WHERE id BETWEEN 1000 AND 1100;
             DELETE FROM big_t WHERE id BETWEEN 1200 AND 1300;
             UPDATE big_t SET payload = 'last' WHERE id BETWEEN 3900 AND 3999;
             COMMIT;",
        )
        .await
        .unwrap();

    // Dies right after the first part of it is durable.
    let mut crashing = walden(&db, &wh, &["run", "--once"], Some("after-large-part"));
    crashing.env("WALDEN_SPILL__DIR", &spill);
    let out = run(&mut crashing);
    assert!(
        !out.status.success(),
        "the failpoint must stop the first attempt"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("after-large-part"));
    let parts = delta_rows(
        &wh,
        TableKind::Changes,
        "big_t",
        "SELECT CAST(count(*) AS VARCHAR) FROM t WHERE payload = 'inserted'",
    )
    .await;
    assert_ne!(
        parts,
        vec!["0"],
        "the first part was committed before the crash"
    );

    let mut again = walden(&db, &wh, &["run", "--once"], None);
    again.env("WALDEN_SPILL__DIR", &spill);
    let out = run(&mut again);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let src = pg_rows(&db.client, PG).await;
    let mir = delta_rows(&wh, TableKind::Mirror, "big_t", DF).await;
    assert_same("big_t", &src, &mir);
    assert_id_v_mirror(&db.client, &wh, "side", "side").await;
    for table in ["big_t", "side"] {
        assert_changelog_unique(&wh, table, "").await;
    }
    // 3000 inserts + 200 + 101 + 100 updates + 101 deletes in the big transaction.
    let ops = delta_rows(
        &wh,
        TableKind::Changes,
        "big_t",
        "SELECT concat_ws('=', _walden_op, CAST(count(*) AS VARCHAR)) FROM t \
         WHERE _walden_lsn = (SELECT max(_walden_lsn) FROM t) GROUP BY _walden_op ORDER BY _walden_op",
    )
    .await;
    assert_eq!(ops, vec!["delete=101", "insert=3000", "update=401"]);
    let aborted = delta_rows(
        &wh,
        TableKind::Changes,
        "big_t",
        "SELECT CAST(count(*) AS VARCHAR) FROM t WHERE payload = 'ABORTED'",
    )
    .await;
    assert_eq!(aborted, vec!["0"]);
}
