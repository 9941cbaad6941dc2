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

/// The spill disk fills up under a large transaction (here: a file-size limit on the walden
/// process, so writes past 2 MiB fail as on a full disk): walden says where and what to do,
/// keeps running and retrying, and once space is back it lands the transaction exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spill_disk_is_waited_out_and_loses_nothing() {
    use std::os::unix::process::CommandExt;
    let db = test_db("spill_full").await;
    let wh = warehouse_dir("spill_full");
    let spill = wh.with_file_name("spill-full");
    let log = wh.with_file_name("spill-full.log");
    db.client
        .batch_execute("CREATE TABLE big_t (id int PRIMARY KEY, payload text, big text)")
        .await
        .unwrap();
    let mut cmd = walden(&db, &wh, &["run"], None);
    cmd.env("WALDEN_SPILL__DIR", &spill)
        .env("WALDEN_SPILL__MEMORY_BYTES", "1048576")
        .env("WALDEN_BATCH__MAX_ROWS", "5000")
        .env("WALDEN_RETRY__INITIAL_MS", "100")
        .env("WALDEN_RETRY__MAX_MS", "500")
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: async-signal-safe calls only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 2 << 20,
                rlim_max: libc::RLIM_INFINITY,
            };
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    // Wait for the snapshot (an empty table) and the stream.
    let started = std::time::Instant::now();
    while !wh.join("mirror/public/big_t/_delta_log").exists() {
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    db.client
        .batch_execute(
            "INSERT INTO big_t SELECT g, repeat(md5(g::text), 3), NULL FROM generate_series(1, 60000) g",
        )
        .await
        .unwrap();
    // The spill file cannot grow past 2 MiB: walden reports it and keeps trying.
    let started = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("Free space there or point spill.dir elsewhere") {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "walden gave up:\n{text}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "no spill error reported:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(child.try_wait().unwrap().is_none(), "walden gave up");
    // Space comes back.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall on the child's pid.
    let ok = unsafe {
        libc::prlimit(
            child.id() as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &unlimited,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(ok, 0, "prlimit: {}", std::io::Error::last_os_error());
    let started = std::time::Instant::now();
    loop {
        let n = delta_rows(
            &wh,
            TableKind::Mirror,
            "big_t",
            "SELECT CAST(count(*) AS VARCHAR) FROM t",
        )
        .await;
        if n == ["60000"] {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "walden gave up");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "the transaction did not land after space came back ({n:?})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let src = pg_rows(&db.client, PG).await;
    let mir = delta_rows(&wh, TableKind::Mirror, "big_t", DF).await;
    assert_same("after a full spill disk", &src, &mir);
    assert_changelog_unique(&wh, "big_t", "after a full spill disk: ").await;
}
