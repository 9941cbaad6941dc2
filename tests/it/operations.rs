//! walden as a service: the metrics and health endpoint during a workload, the heartbeat that
//! moves a quiet database's slot, taking over a slot a dead consumer still holds, log formats,
//! and secrets that never reach logs or errors.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::pg::{cluster, free_port, pg_bin, test_db, warehouse_dir, TestDb};

/// `walden run` streaming `db` into a warehouse of its own, with more `WALDEN_…` variables.
fn spawn_walden(db: &TestDb, env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walden"));
    cmd.arg("run")
        .env("RUST_LOG", "walden=info")
        .env("WALDEN_SOURCE__URL", &db.url)
        .env("WALDEN_SOURCE__SLOT", format!("s_{}", db.name))
        .env("WALDEN_SOURCE__CREATE_PUBLICATION", "true")
        .env("WALDEN_SOURCE__STATUS_INTERVAL_MS", "200")
        .env("WALDEN_BATCH__MAX_DELAY_MS", "200")
        .env(
            "WALDEN_WAREHOUSE__URL",
            warehouse_dir(&db.name).display().to_string(),
        )
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

/// Stops walden with SIGTERM (it drains and exits 0); returns what it logged.
fn terminate(mut child: Child) -> String {
    // SAFETY: kill(2) on our own child's PID.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    let err = crate::stderr_of(&mut child);
    assert!(status.success(), "walden did not stop cleanly:\n{err}");
    err
}

/// `GET path` on the endpoint: status code and body; None while nothing listens.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: walden\r\n\r\n").ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let status = answer.get(9..12)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// The sum of the samples of `series` (a metric name with, optionally, `{labels` to match).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    let mut found = None;
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ')?;
        let matches = name == series
            || (name.starts_with(series)
                && (series.contains('{') || name[series.len()..].starts_with('{')));
        if matches {
            *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    found
}

/// Waits up to 60 s for `check` to hold; false when it never did.
async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while !check() {
        if started.elapsed() > Duration::from_secs(60) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    true
}

/// During a workload `/metrics` shows rows applied, commit-to-visible latency, lag, received
/// bytes, the slot's retained WAL and status, and heartbeats moving; `/healthz` answers from
/// the start and `/readyz` turns ready once walden streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_during_a_workload_and_readiness_follows_the_stream() {
    let db = test_db("ops_metrics").await;
    db.client
        .batch_execute("CREATE TABLE m (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let port = free_port();
    let walden = spawn_walden(
        &db,
        &[
            ("WALDEN_METRICS__LISTEN", format!("127.0.0.1:{port}")),
            ("WALDEN_SLOT__CHECK_INTERVAL_S", "1".into()),
            ("WALDEN_SLOT__HEARTBEAT_INTERVAL_S", "1".into()),
        ],
    );
    let healthy = eventually(|| get(port, "/healthz").is_some_and(|(s, _)| s == 200)).await;
    assert!(healthy, "/healthz never answered");
    let ready = || get(port, "/readyz").is_some_and(|(s, b)| s == 200 && b == "streaming\n");
    assert!(eventually(ready).await, "/readyz never turned ready");
    let scrape = || get(port, "/metrics").unwrap().1;
    let inserts = "walden_rows_applied_total{op=\"insert\",table=\"public.m\"}";
    let mut before = String::new();
    let mut retained_seen = false;
    for round in 0..2 {
        for i in 0..20 {
            let n = round * 1000 + i * 10;
            db.client
                .batch_execute(&format!(
                    "INSERT INTO m SELECT g, 'v' FROM generate_series({n}, {n} + 9) g;
                     UPDATE m SET v = 'w' WHERE id = {n}; DELETE FROM m WHERE id = {n} + 1"
                ))
                .await
                .unwrap();
        }
        let want = f64::from((round + 1) * 200);
        let mut last = String::new();
        let applied = eventually(|| {
            last = scrape();
            retained_seen |= sample(&last, "walden_slot_retained_wal_bytes").unwrap_or(0.0) > 0.0;
            sample(&last, inserts) == Some(want)
        })
        .await;
        assert!(applied, "{want} inserts were never applied:\n{last}");
        let now = scrape();
        if round == 1 {
            for series in [
                "walden_commit_to_visible_seconds_count",
                "walden_received_bytes_total",
                "walden_received_messages_total",
                "walden_confirmed_lsn",
                "walden_flushes_total",
                "walden_merge_duration_seconds_count",
                "walden_object_store_requests_total",
            ] {
                let (a, b) = (sample(&before, series), sample(&now, series));
                assert!(b > a, "{series} did not move: {a:?} → {b:?}");
            }
        }
        before = now;
    }
    let m = scrape();
    for (series, want) in [
        (
            "walden_rows_applied_total{op=\"update\",table=\"public.m\"}",
            40.0,
        ),
        (
            "walden_rows_applied_total{op=\"delete\",table=\"public.m\"}",
            40.0,
        ),
        ("walden_slot_wal_status{status=\"reserved\"}", 1.0),
        ("walden_ready", 1.0),
        ("walden_build_info", 1.0),
    ] {
        assert_eq!(sample(&m, series), Some(want), "{series}\n{m}");
    }
    assert!(retained_seen, "retained WAL was never above 0");
    let beat = || sample(&scrape(), "walden_heartbeats_total").unwrap_or(0.0) >= 1.0;
    if !eventually(beat).await {
        panic!("no heartbeats; walden said:\n{}", terminate(walden));
    }
    for series in [
        "walden_lag_bytes",
        "walden_lag_seconds",
        "walden_server_wal_end_lsn",
    ] {
        assert!(sample(&m, series).is_some(), "{series} missing:\n{m}");
    }
    // Once everything is applied nothing waits: no lag in seconds.
    assert_eq!(sample(&m, "walden_lag_seconds"), Some(0.0), "{m}");
    terminate(walden);
}

/// With a heartbeat, the slot of a database nobody writes to advances past WAL that other
/// databases of the server write: the WAL it holds back stays small. (On Postgres 15 walden's
/// answers to the walsender's keepalives move such a slot too; the heartbeat is for servers
/// that send few keepalives. `metrics_move_…` checks that heartbeats are written.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_databases_slot_advances_while_another_database_is_busy() {
    let quiet = test_db("ops_quiet").await;
    let busy = test_db("ops_busy").await;
    quiet
        .client
        .batch_execute("CREATE TABLE q (id int PRIMARY KEY)")
        .await
        .unwrap();
    busy.client
        .batch_execute("CREATE TABLE b (id int, pad text)")
        .await
        .unwrap();
    let walden = spawn_walden(&quiet, &[("WALDEN_SLOT__HEARTBEAT_INTERVAL_S", "1".into())]);
    let slot = format!("s_{}", quiet.name);
    let active = "SELECT active FROM pg_replication_slots WHERE slot_name = $1";
    let started = Instant::now();
    while !slot_says(&quiet, active, &slot).await {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never streamed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..5 {
        busy.client
            .batch_execute(
                "INSERT INTO b SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g",
            )
            .await
            .unwrap();
    }
    let written: String = busy
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let passed = format!(
        "SELECT confirmed_flush_lsn >= '{written}' AND restart_lsn >= '{written}' \
         FROM pg_replication_slots WHERE slot_name = $1"
    );
    let started = Instant::now();
    while !slot_says(&quiet, &passed, &slot).await {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the quiet slot did not advance past {written}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    terminate(walden);
}

/// The boolean `sql` answers about `slot` (false when the slot is not there).
async fn slot_says(db: &TestDb, sql: &str, slot: &str) -> bool {
    let row = db.client.query_opt(sql, &[&slot]).await.unwrap();
    row.is_some_and(|r| r.get::<_, bool>(0))
}

/// `walden run --once` with `envs`.
fn walden_once(envs: &[(&str, String)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_walden"));
    c.args(["run", "--once"])
        .args(args)
        .env("RUST_LOG", "walden=debug")
        .env("WALDEN_SOURCE__CONNECT_TIMEOUT_S", "5")
        .stdin(Stdio::null());
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// A slot held by a consumer that never lets go (here `pg_recvlogical`) stops walden with what
/// to do, after `source.slot_wait_s`; with `slot.terminate_holder` walden ends the holder and
/// streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_slot_is_taken_over_only_when_configured() {
    let db = test_db("ops_holder").await;
    db.client
        .batch_execute("CREATE TABLE h (id int PRIMARY KEY); INSERT INTO h VALUES (1)")
        .await
        .unwrap();
    let wh = warehouse_dir("ops_holder").display().to_string();
    let envs = vec![
        ("WALDEN_SOURCE__URL", db.url.clone()),
        ("WALDEN_SOURCE__SLOT", "s_ops_holder".to_string()),
        ("WALDEN_SOURCE__CREATE_PUBLICATION", "true".into()),
        ("WALDEN_SOURCE__SLOT_WAIT_S", "1".into()),
        ("WALDEN_WAREHOUSE__URL", wh),
    ];
    let out = walden_once(&envs, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = cluster();
    let mut holder = Command::new(pg_bin().join("pg_recvlogical"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &c.port.to_string(),
            "-U",
            "postgres",
        ])
        .args([
            "-d",
            &db.name,
            "-S",
            "s_ops_holder",
            "--start",
            "--no-loop",
            "-f",
            "/dev/null",
        ])
        .args(["-o", "proto_version=1", "-o", "publication_names=walden"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let row = db
            .client
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 's_ops_holder'",
                &[],
            )
            .await
            .unwrap();
        if row.get::<_, bool>(0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "holder never held the slot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = walden_once(&envs, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("is in use by another process"), "{err}");
    assert!(err.contains("slot.terminate_holder = true"), "{err}");
    assert!(
        holder.try_wait().unwrap().is_none(),
        "the holder was ended without leave"
    );

    let mut envs = envs;
    envs.push(("WALDEN_SLOT__TERMINATE_HOLDER", "true".into()));
    let out = walden_once(&envs, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("terminating its holder"), "{err}");
    let ended = holder.wait().unwrap();
    assert!(!ended.success(), "the holder should have been terminated");
}

/// Marker secrets in the source URL's password and in storage options appear nowhere in what
/// walden prints: debug logs of a run (text and JSON), `walden check`, or the error of a
/// connection that fails (its message names the URL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_or_errors() {
    const PASSWORD: &str = "pw-MARKER-7f3a";
    const KEY: &str = "key-MARKER-91c2";
    let db = test_db("ops_secrets").await;
    db.client
        .batch_execute("CREATE TABLE s (id int PRIMARY KEY); INSERT INTO s VALUES (1)")
        .await
        .unwrap();
    let c = cluster();
    // The test cluster trusts local connections: any password gets in.
    let url = format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:{}/{}",
        c.port, db.name
    );
    let wh = warehouse_dir("ops_secrets").display().to_string();
    let envs = vec![
        ("WALDEN_SOURCE__URL", url.clone()),
        ("WALDEN_SOURCE__SLOT", "s_ops_secrets".to_string()),
        ("WALDEN_SOURCE__CREATE_PUBLICATION", "true".into()),
        ("WALDEN_WAREHOUSE__URL", wh.clone()),
        (
            "WALDEN_WAREHOUSE__STORAGE_OPTIONS__AWS_SECRET_ACCESS_KEY",
            KEY.into(),
        ),
    ];
    let mut printed = Vec::new();
    for format in ["text", "json"] {
        let out = walden_once(&envs, &["--log-format", format]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        assert!(
            err.contains("configuration"),
            "the config was not logged: {err}"
        );
        printed.push(err);
    }
    let mut check = Command::new(env!("CARGO_BIN_EXE_walden"));
    check.arg("check").env("RUST_LOG", "walden=debug");
    for (k, v) in &envs {
        check.env(k, v);
    }
    let out = check.output().unwrap();
    printed.push(String::from_utf8_lossy(&out.stdout).to_string());
    printed.push(String::from_utf8_lossy(&out.stderr).to_string());
    // A server that is not there: the error names the URL.
    let mut down = envs.clone();
    down[0].1 = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{}/x", free_port());
    let out = walden_once(&down, &[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("cannot reach Postgres"),
        "{err}"
    );
    printed.push(err);
    for text in &printed {
        assert!(!text.contains(PASSWORD), "password printed:\n{text}");
        assert!(!text.contains(KEY), "storage key printed:\n{text}");
    }
}

/// `--log-format json` writes one JSON object per line; text written to a pipe has no colour
/// codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_are_json_on_request_and_plain_off_a_terminal() {
    let db = test_db("ops_logs").await;
    db.client
        .batch_execute("CREATE TABLE l (id int PRIMARY KEY); INSERT INTO l VALUES (1)")
        .await
        .unwrap();
    let envs = vec![
        ("WALDEN_SOURCE__URL", db.url.clone()),
        ("WALDEN_SOURCE__SLOT", "s_ops_logs".to_string()),
        ("WALDEN_SOURCE__CREATE_PUBLICATION", "true".into()),
        (
            "WALDEN_WAREHOUSE__URL",
            warehouse_dir("ops_logs").display().to_string(),
        ),
    ];
    let out = walden_once(&envs, &["--log-format", "json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines.len() > 3, "{err}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
    }
    let out = walden_once(&envs, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("INFO"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "colour codes off a terminal:\n{err}"
    );
}

/// An endpoint address that is taken stops walden at once with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_address_is_refused_with_the_fix() {
    let db = test_db("ops_listen").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let envs = vec![
        ("WALDEN_SOURCE__URL", db.url.clone()),
        ("WALDEN_SOURCE__SLOT", "s_ops_listen".to_string()),
        ("WALDEN_SOURCE__CREATE_PUBLICATION", "true".into()),
        (
            "WALDEN_WAREHOUSE__URL",
            warehouse_dir("ops_listen").display().to_string(),
        ),
        (
            "WALDEN_METRICS__LISTEN",
            taken.local_addr().unwrap().to_string(),
        ),
    ];
    let out = walden_once(&envs, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cannot serve metrics on"), "{err}");
    assert!(
        err.contains("set metrics.listen to a free address"),
        "{err}"
    );
}
