//! End to end against a real Postgres: every kind of change lands in changelog and mirror.

use walden::sink::TableKind;

use crate::pg::{config, test_db, warehouse_dir};
use crate::warehouse::{assert_changelog_unique, assert_same, delta_rows, pg_rows, run_once};

const ACCOUNTS_PG: &str = "SELECT concat_ws('|', id::text, coalesce(name,'~'), coalesce(balance::text,'~'), \
    coalesce(active::text,'~'), coalesce(((extract(epoch from updated)*1000000)::bigint)::text,'~'), \
    coalesce(doc::text,'~'), coalesce(encode(blob,'hex'),'~'), coalesce(length(big)::text,'~'), coalesce(md5(big),'~'), \
    coalesce(born::text,'~'), coalesce(((ratio*1000000)::bigint)::text,'~')) FROM accounts ORDER BY id";
const ACCOUNTS_DF: &str = "SELECT concat_ws('|', CAST(id AS VARCHAR), coalesce(name,'~'), coalesce(CAST(balance AS VARCHAR),'~'), \
    coalesce(CAST(active AS VARCHAR),'~'), coalesce(CAST(CAST(updated AS BIGINT) AS VARCHAR),'~'), \
    coalesce(doc,'~'), coalesce(encode(blob,'hex'),'~'), coalesce(CAST(length(big) AS VARCHAR),'~'), coalesce(md5(big),'~'), \
    coalesce(CAST(born AS VARCHAR),'~'), coalesce(CAST(CAST(round(ratio*1000000) AS BIGINT) AS VARCHAR),'~')) FROM t ORDER BY id";

/// Runs each string as its own simple query (so each autocommit statement is its own transaction).
async fn exec_each(client: &tokio_postgres::Client, sql: &[&str]) {
    for s in sql {
        client
            .batch_execute(s)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
}

async fn assert_mirror_equals_source(db: &crate::pg::TestDb, wh: &std::path::Path) {
    let src = pg_rows(&db.client, ACCOUNTS_PG).await;
    let mir = delta_rows(wh, TableKind::Mirror, "accounts", ACCOUNTS_DF).await;
    assert_same("accounts", &src, &mir);
    let src = pg_rows(
        &db.client,
        "SELECT concat_ws('|', id::text, account::text, kind) FROM events ORDER BY id",
    )
    .await;
    let mir = delta_rows(
        wh,
        TableKind::Mirror,
        "events",
        "SELECT concat_ws('|', CAST(id AS VARCHAR), CAST(account AS VARCHAR), kind) FROM t ORDER BY id",
    )
    .await;
    assert_same("events", &src, &mir);
    let src = pg_rows(
        &db.client,
        "SELECT concat_ws('|', x::text, y) FROM nokey ORDER BY x",
    )
    .await;
    let mir = delta_rows(
        wh,
        TableKind::Mirror,
        "nokey",
        "SELECT concat_ws('|', CAST(x AS VARCHAR), y) FROM t ORDER BY x",
    )
    .await;
    assert_same("nokey", &src, &mir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_change_lands_in_changelog_and_mirror() {
    let db = test_db("stream_all").await;
    let wh = warehouse_dir("stream_all");
    db.client
        .batch_execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, name text, balance numeric(12,2), active bool,
                updated timestamptz, doc jsonb, blob bytea, big text, born date, ratio float8);
             ALTER TABLE accounts ALTER COLUMN big SET STORAGE EXTERNAL;
             CREATE TABLE events (id bigserial PRIMARY KEY, account int, kind text);
             CREATE TABLE nokey (x int, y text);",
        )
        .await
        .unwrap();
    let cfg = config(&db, &wh);
    // First run creates the slot and publication; nothing to copy yet.
    run_once(&cfg).await;

    exec_each(
        &db.client,
        &[
            "BEGIN;
             INSERT INTO accounts SELECT g, 'name ' || g, g * 1.25, g % 2 = 0, '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 hour',
                 jsonb_build_object('g', g), decode(lpad(to_hex(g), 4, '0'), 'hex'), NULL, DATE '2000-01-01' + g, g / 3.0
               FROM generate_series(1, 50) g;
             INSERT INTO events (account, kind) SELECT g, 'created' FROM generate_series(1, 50) g;
             COMMIT;",
            "UPDATE accounts SET balance = balance + 1, name = NULL WHERE id <= 10",
            "DELETE FROM accounts WHERE id BETWEEN 41 AND 45",
            "BEGIN; INSERT INTO accounts (id, name) VALUES (999, 'ROLLED BACK'); INSERT INTO events (account, kind) VALUES (999, 'ROLLED BACK'); ROLLBACK;",
            "UPDATE accounts SET id = id + 1000 WHERE id = 5",
            "INSERT INTO nokey SELECT g, 'row ' || g FROM generate_series(1, 20) g",
            "UPDATE accounts SET big = repeat(md5('x'), 400) WHERE id BETWEEN 20 AND 25",
        ],
    )
    .await;
    let s = run_once(&cfg).await;
    assert!(s.changes >= 100, "{s:?}");
    assert_mirror_equals_source(&db, &wh).await;

    // Unchanged TOAST values ('u'), a truncate, a big streamed transaction with an aborted
    // subtransaction, and changes that meet again in one batch.
    exec_each(
        &db.client,
        &[
            "UPDATE accounts SET name = 'toast kept' WHERE id BETWEEN 20 AND 22",
            "TRUNCATE events",
            "INSERT INTO events (account, kind) VALUES (1, 'after truncate'), (2, 'after truncate')",
            "BEGIN;
             INSERT INTO events (account, kind) SELECT g, repeat('s', 200) FROM generate_series(1, 3000) g;
             SAVEPOINT sp;
             INSERT INTO events (account, kind) SELECT g, 'ABORTED SUBXACT' FROM generate_series(1, 500) g;
             ROLLBACK TO SAVEPOINT sp;
             UPDATE accounts SET active = NOT active WHERE id BETWEEN 30 AND 40;
             COMMIT;",
            "INSERT INTO accounts (id, name) VALUES (2000, 'short-lived')",
            "UPDATE accounts SET name = 'changed twice' WHERE id = 2000",
            "DELETE FROM accounts WHERE id = 2000",
            "INSERT INTO accounts (id, name) VALUES (2001, 'kept')",
        ],
    )
    .await;
    run_once(&cfg).await;
    assert_mirror_equals_source(&db, &wh).await;
    // The big transaction really went through protocol-v2 streaming.
    let mut streamed = 0i64;
    for _ in 0..50 {
        streamed = db
            .client
            .query_one(
                "SELECT coalesce(sum(stream_txns), 0)::bigint FROM pg_stat_replication_slots WHERE slot_name = 's_stream_all'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if streamed > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(streamed > 0, "the large transaction was not streamed");

    // The changelog: each change exactly once, nothing rolled back, ops and order recorded.
    assert_changelog_unique(&wh, "events", "").await;
    let ops = delta_rows(
        &wh,
        TableKind::Changes,
        "events",
        "SELECT concat_ws('=', _walden_op, CAST(count(*) AS VARCHAR)) FROM t GROUP BY _walden_op ORDER BY _walden_op",
    )
    .await;
    assert_eq!(ops, vec!["insert=3052", "truncate=1"]);
    let bad = delta_rows(
        &wh,
        TableKind::Changes,
        "events",
        "SELECT CAST(count(*) AS VARCHAR) FROM t WHERE kind IN ('ROLLED BACK', 'ABORTED SUBXACT')",
    )
    .await;
    assert_eq!(bad, vec!["0"]);
    let acc_ops = delta_rows(
        &wh,
        TableKind::Changes,
        "accounts",
        "SELECT concat_ws('=', _walden_op, CAST(count(*) AS VARCHAR)) FROM t GROUP BY _walden_op ORDER BY _walden_op",
    )
    .await;
    // 50 + 2 inserts; 10 + 1 (key change) + 6 (big) + 3 (toast) + 11 + 1 updates; 5 + 1 deletes
    assert_eq!(acc_ops, vec!["delete=6", "insert=52", "update=32"]);
    let unchanged = delta_rows(
        &wh,
        TableKind::Changes,
        "accounts",
        "SELECT CAST(count(*) AS VARCHAR) FROM t WHERE _walden_unchanged = 'big'",
    )
    .await;
    assert_eq!(
        unchanged,
        vec!["3"],
        "toasted column not sent must be recorded"
    );
    let in_txn = delta_rows(
        &wh,
        TableKind::Changes,
        "events",
        "SELECT CAST(count(DISTINCT _walden_lsn) AS VARCHAR) FROM t WHERE kind = 'created'",
    )
    .await;
    assert_eq!(in_txn, vec!["1"], "one source transaction, one commit LSN");

    // A run with nothing new changes nothing.
    let s = run_once(&cfg).await;
    assert_eq!(s.changes, 0);
    assert_mirror_equals_source(&db, &wh).await;
}

/// An idle slot (nothing published changes) must not retain WAL: walden confirms the server's
/// keepalive position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slot_confirms_keepalive_position() {
    let db = test_db("idle").await;
    let wh = warehouse_dir("idle");
    db.client
        .batch_execute(
            "CREATE TABLE published (id int PRIMARY KEY);
             CREATE TABLE other (id int PRIMARY KEY, pad text);
             CREATE PUBLICATION walden FOR TABLE published;",
        )
        .await
        .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
        .arg("run")
        .env("WALDEN_SOURCE__URL", &db.url)
        .env("WALDEN_SOURCE__SLOT", "s_idle")
        .env("WALDEN_SOURCE__STATUS_INTERVAL_MS", "500")
        .env("WALDEN_WAREHOUSE__URL", &wh)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // WAL that walden never receives a change from.
    db.client
        .batch_execute(
            "INSERT INTO other SELECT g, repeat('p', 100) FROM generate_series(1, 20000) g",
        )
        .await
        .unwrap();
    let target: String = db
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ok: bool = db
            .client
            .query_one(
                "SELECT coalesce(bool_and(confirmed_flush_lsn >= $1::text::pg_lsn), false) FROM pg_replication_slots WHERE slot_name = 's_idle'",
                &[&target],
            )
            .await
            .unwrap()
            .get(0);
        if ok {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "idle slot never confirmed past {target}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
}

/// `--once` drains every transaction committed before it starts, also one committed
/// asynchronously (`synchronous_commit = off`) whose WAL the server has not written yet: the
/// target is the WAL insert position, and walden waits for the WAL writer to get there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_drains_transactions_committed_asynchronously() {
    let db = test_db("async_commit").await;
    let wh = warehouse_dir("async_commit");
    db.client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let cfg = config(&db, &wh);
    run_once(&cfg).await;
    for round in 0..5 {
        // A commit record follows a large body of WAL the WAL writer has not caught up with.
        db.client
            .batch_execute(&format!(
                "SET synchronous_commit = off;
                 INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series({0} * 20000 + 1, {0} * 20000 + 20000) g;",
                round
            ))
            .await
            .unwrap();
        run_once(&cfg).await;
        let rows = delta_rows(
            &wh,
            TableKind::Mirror,
            "t",
            "SELECT CAST(count(*) AS VARCHAR) FROM t",
        )
        .await;
        assert_eq!(
            rows,
            vec![((round + 1) * 20000).to_string()],
            "round {round}"
        );
    }
}
