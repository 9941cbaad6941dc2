//! Bad input gets a clear message and a non-zero exit.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::pg::{cluster, free_port, test_db, warehouse_dir};

fn walden_once(envs: &[(&str, String)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_walden"));
    c.args(["run", "--once"])
        .env("RUST_LOG", "warn")
        .env("WALDEN_SOURCE__CONNECT_TIMEOUT_S", "5")
        .env("WALDEN_SOURCE__SLOT_WAIT_S", "1")
        .stdin(Stdio::null());
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn assert_fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr:\n{err}"
    );
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "stderr should mention {needle:?}:\n{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_fail_with_a_clear_message() {
    let db = test_db("errors").await;
    let wh = warehouse_dir("errors");
    let c = cluster();
    let base = |url: String, wh: String| {
        vec![
            ("WALDEN_SOURCE__URL", url),
            ("WALDEN_SOURCE__SLOT", "s_errors".to_string()),
            ("WALDEN_WAREHOUSE__URL", wh),
        ]
    };
    let whs = wh.display().to_string();

    // unreachable server
    let out = walden_once(&base(
        format!("postgres://postgres@127.0.0.1:{}/errors", free_port()),
        whs.clone(),
    ));
    assert_fails_with(&out, "cannot reach Postgres");

    // wrong password (SCRAM), then the right one works through the replication client too
    db.client
        .batch_execute("CREATE ROLE walden_pw LOGIN SUPERUSER REPLICATION PASSWORD 'right'")
        .await
        .unwrap();
    let out = walden_once(&base(
        format!("postgres://walden_pw:wrong@127.0.0.1:{}/errors", c.port),
        whs.clone(),
    ));
    assert_fails_with(&out, "authentication failed");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("wrong"),
        "password leaked"
    );

    // missing publication
    let out = walden_once(&base(c.url("errors"), whs.clone()));
    assert_fails_with(&out, "publication \"walden\" does not exist");

    let mut ok = base(
        format!("postgres://walden_pw:right@127.0.0.1:{}/errors", c.port),
        whs.clone(),
    );
    ok.push(("WALDEN_SOURCE__CREATE_PUBLICATION", "true".into()));
    let out = walden_once(&ok);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // unwritable warehouse
    let out = walden_once(&base(c.url("errors"), "/proc/walden-no".into()));
    assert_fails_with(&out, "not writable");

    // unknown config key
    let mut bad = base(c.url("errors"), whs.clone());
    bad.push(("WALDEN_BATCH__MAX_ROWZ", "1".into()));
    let out = walden_once(&bad);
    assert_fails_with(&out, "max_rowz");

    // slot held by another process
    let mut holder = Command::new(env!("CARGO_BIN_EXE_walden"));
    holder
        .arg("run")
        .envs(ok.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    let mut holder = holder.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let active: bool = db
            .client
            .query_one(
                "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = 's_errors'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if active {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "holder never took the slot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = walden_once(&ok);
    assert_fails_with(&out, "in use by another process");

    // SIGTERM: the holder flushes, confirms and exits 0 promptly.
    let pid = holder.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = holder.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_refused_with_the_fix() {
    let other = crate::pg::Cluster::start_with("replica");
    let out = walden_once(&[
        ("WALDEN_SOURCE__URL", other.url("postgres")),
        ("WALDEN_SOURCE__CREATE_PUBLICATION", "true".into()),
        (
            "WALDEN_WAREHOUSE__URL",
            warehouse_dir("replica").display().to_string(),
        ),
    ]);
    assert_fails_with(&out, "wal_level = logical");
    other.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_bad_inputs_say_what_to_do() {
    let db = test_db("errors_more").await;
    let c = cluster();
    db.client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');
             CREATE PUBLICATION walden FOR ALL TABLES;
             DROP ROLE IF EXISTS walden_norepl; CREATE ROLE walden_norepl LOGIN;",
        )
        .await
        .unwrap();
    db.client
        .batch_execute("SELECT pg_create_logical_replication_slot('s_errors_td', 'test_decoding')")
        .await
        .unwrap();
    let wh = warehouse_dir("errors_more");
    let run = |url: String, slot: &str, wh: &std::path::Path| {
        walden_once(&[
            ("WALDEN_SOURCE__URL", url),
            ("WALDEN_SOURCE__SLOT", slot.to_string()),
            ("WALDEN_WAREHOUSE__URL", wh.display().to_string()),
        ])
    };

    // malformed URL
    let out = run(
        "postgres://postgres@127.0.0.1:notaport/x".into(),
        "s_errors_m",
        &wh,
    );
    assert_fails_with(&out, "invalid source.url");

    // a role without REPLICATION: the fix names the ALTER ROLE
    let out = run(
        format!("postgres://walden_norepl@127.0.0.1:{}/errors_more", c.port),
        "s_errors_m",
        &wh,
    );
    assert_fails_with(&out, "ALTER ROLE \"walden_norepl\" REPLICATION");

    // a slot of another output plugin
    let out = run(c.url("errors_more"), "s_errors_td", &wh);
    assert_fails_with(
        &out,
        "plugin test_decoding; walden needs a logical pgoutput slot",
    );

    // a damaged Delta table where the mirror goes
    let log = wh.join("mirror/public/t/_delta_log");
    std::fs::create_dir_all(&log).unwrap();
    std::fs::write(log.join("00000000000000000000.json"), "garbage{").unwrap();
    let out = run(c.url("errors_more"), "s_errors_m", &wh);
    assert_fails_with(&out, "move that directory aside");
    assert_fails_with(&out, "walden backfill --table public.t");
    db.client
        .batch_execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name IN ('s_errors_td', 's_errors_m')",
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_refused_with_the_way_back() {
    let other = crate::pg::Cluster::start_with("logical");
    let admin = crate::pg::connect(&other.url("postgres")).await;
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "SELECT pg_reload_conf()",
        "CREATE TABLE junk (x text)",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let envs = [
        ("WALDEN_SOURCE__URL", other.url("postgres")),
        ("WALDEN_SOURCE__SLOT", "s_lost".to_string()),
        ("WALDEN_SOURCE__CREATE_PUBLICATION", "true".into()),
        (
            "WALDEN_WAREHOUSE__URL",
            warehouse_dir("lost").display().to_string(),
        ),
    ];
    let out = walden_once(&envs);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // More WAL than the slot may hold back, then a checkpoint invalidates it.
    for _ in 0..4 {
        admin
            .batch_execute(
                "INSERT INTO junk SELECT repeat('x', 1000) FROM generate_series(1, 3000); \
                 SELECT pg_switch_wal();",
            )
            .await
            .unwrap();
    }
    admin.batch_execute("CHECKPOINT").await.unwrap();
    let status = wal_status(&admin).await;
    assert_eq!(status, "lost");
    let out = walden_once(&envs);
    assert_fails_with(&out, "was invalidated by the server");
    assert_fails_with(&out, "pg_drop_replication_slot('s_lost')");
    assert_fails_with(&out, "slot.on_invalidated");

    // slot.on_invalidated = recreate: the slot is made again and every table copied anew.
    let mut envs = envs.to_vec();
    envs.push(("WALDEN_SLOT__ON_INVALIDATED", "recreate".into()));
    let out = walden_once(&envs);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("slot.on_invalidated = recreate"), "{err}");
    let status = wal_status(&admin).await;
    assert_ne!(status, "lost");
    let mut verify = Command::new(env!("CARGO_BIN_EXE_walden"));
    verify.arg("verify").env("RUST_LOG", "warn");
    for (k, v) in &envs {
        verify.env(k, v);
    }
    let out = verify.output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    other.stop();
}

/// The `wal_status` of slot `s_lost`.
async fn wal_status(admin: &tokio_postgres::Client) -> String {
    let sql = "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 's_lost'";
    admin.query_one(sql, &[]).await.unwrap().get(0)
}
