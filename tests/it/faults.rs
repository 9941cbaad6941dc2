//! Faults walden must ride out by itself: the server restarting under a streaming walden (fast
//! and immediate shutdowns). It reconnects with backoff, resumes from the slot, and the mirror
//! ends equal to the source with every change in the changelog once.

use std::path::Path;
use std::time::{Duration, Instant};

use walden::sink::TableKind;

use crate::pg::{config, connect, warehouse_dir, Cluster, TestDb};
use crate::warehouse::{assert_changelog_unique, assert_id_v_mirror, delta_rows, Streaming};

/// Waits until the mirror of `t` holds `n` rows (a run that failed shows its error).
async fn mirror_reaches(wh: &Path, n: usize, run: Streaming, what: &str) -> Streaming {
    let started = Instant::now();
    loop {
        if wh.join("mirror/public/t/_delta_log").exists() {
            let got = delta_rows(
                wh,
                TableKind::Mirror,
                "t",
                "SELECT CAST(count(*) AS VARCHAR) FROM t",
            )
            .await;
            if got == [n.to_string()] {
                return run;
            }
        }
        if started.elapsed() > Duration::from_secs(90) {
            run.stop().await;
            panic!("{what}: the mirror did not reach {n} rows within 90 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Inserts ids `from..to`, ten rows per transaction, connecting afresh (the server may just
/// have restarted: a refused connection is tried again).
async fn insert(url: &str, from: i32, to: i32) -> tokio_postgres::Client {
    let started = Instant::now();
    let client = loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                break c;
            }
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("connect {url}: {e}"),
        }
    };
    for start in (from..to).step_by(10) {
        client
            .batch_execute(&format!(
                "INSERT INTO t SELECT g, 'v' || g FROM generate_series({start}, {}) g",
                (start + 9).min(to - 1)
            ))
            .await
            .unwrap();
    }
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_goes_on_across_server_restarts() {
    let c = Cluster::start_with("logical");
    let admin = connect(&c.url("postgres")).await;
    admin
        .batch_execute("CREATE DATABASE restarts")
        .await
        .unwrap();
    let url = c.url("restarts");
    let client = connect(&url).await;
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let db = TestDb {
        name: "restarts".into(),
        url: url.clone(),
        client,
    };
    let wh = warehouse_dir("restarts");
    let mut cfg = config(&db, &wh);
    cfg.retry.initial_ms = 100;
    cfg.retry.max_ms = 1000;
    let run = Streaming::start(&cfg);
    insert(&url, 0, 100).await;
    let mut run = mirror_reaches(&wh, 100, run, "before any restart").await;

    for (i, mode) in ["fast", "immediate", "fast"].into_iter().enumerate() {
        // With its log file named again: without one the new postmaster would hold pg_ctl's
        // output pipe open.
        let log = c.dir.join("log");
        let out = c.ctl(&[
            "-m",
            mode,
            "-w",
            "-t",
            "60",
            "-l",
            log.to_str().unwrap(),
            "restart",
        ]);
        assert!(
            out.status.success(),
            "pg_ctl restart -m {mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let from = 100 * (i as i32 + 1);
        let client = insert(&url, from, from + 100).await;
        client
            .batch_execute(&format!(
                "UPDATE t SET v = v || '+' WHERE id % 7 = {i}; DELETE FROM t WHERE id % 11 = {i}"
            ))
            .await
            .unwrap();
        let n: i64 = client
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        run = mirror_reaches(&wh, n as usize, run, &format!("after restart -m {mode}")).await;
    }
    run.stop().await;
    let client = connect(&url).await;
    assert_id_v_mirror(&client, &wh, "t", "t").await;
    assert_changelog_unique(&wh, "t", "after restarts: ").await;
    c.stop();
}
