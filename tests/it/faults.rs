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
        if run.ended() {
            run.stop().await; // shows the run's error
            panic!("{what}: walden stopped before the mirror reached {n} rows");
        }
        if started.elapsed() > Duration::from_secs(90) {
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

/// A TCP proxy on loopback that can stall every connection it carries: they stay open but
/// nothing passes any more, as when a network stops delivering without closing anything.
/// Connections made after a stall pass again.
struct Proxy {
    port: u16,
    stalls: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<std::sync::atomic::AtomicBool>>>>,
}

impl Proxy {
    async fn start(to: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalls: std::sync::Arc<std::sync::Mutex<Vec<_>>> = Default::default();
        let all = stalls.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                all.lock().unwrap().push(stalled.clone());
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pass(cr, sw, stalled.clone()));
                tokio::spawn(pass(sr, cw, stalled));
            }
        });
        Proxy { port, stalls }
    }

    fn stall(&self) {
        for s in self.stalls.lock().unwrap().drain(..) {
            s.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Copies `from` to `to` until either side closes; once `stalled`, holds both open forever.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    let stall = async {
        while !stalled.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::pin!(stall);
    loop {
        let read = tokio::select! {
            n = from.read(&mut buf) => Some(n),
            _ = &mut stall => None,
        };
        match read {
            None => {
                // Hold both halves open, pass nothing.
                std::future::pending::<()>().await;
            }
            Some(Ok(0)) | Some(Err(_)) => return,
            Some(Ok(n)) => {
                if stalled.load(std::sync::atomic::Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stops_delivering_is_given_up_and_replaced() {
    let c = Cluster::start_with("logical");
    let admin = connect(&c.url("postgres")).await;
    // The server ends a walsender that hears nothing for 3 s: the stalled one frees the slot.
    for sql in [
        "CREATE DATABASE stalls",
        "ALTER SYSTEM SET wal_sender_timeout = '3s'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let url = c.url("stalls");
    let client = connect(&url).await;
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let proxy = Proxy::start(c.port).await;
    let db = TestDb {
        name: "stalls".into(),
        url: format!("postgres://postgres@127.0.0.1:{}/stalls", proxy.port),
        client,
    };
    let wh = warehouse_dir("stalls");
    let mut cfg = config(&db, &wh);
    cfg.source.receive_timeout_s = 2;
    cfg.source.status_interval_ms = 200;
    cfg.retry.initial_ms = 100;
    cfg.retry.max_ms = 1000;
    let run = Streaming::start(&cfg);
    insert(&url, 0, 100).await;
    let run = mirror_reaches(&wh, 100, run, "before the stall").await;
    proxy.stall();
    insert(&url, 100, 300).await;
    let run = mirror_reaches(&wh, 300, run, "after the stall").await;
    run.stop().await;
    assert_id_v_mirror(&db.client, &wh, "t", "t").await;
    assert_changelog_unique(&wh, "t", "after a stall: ").await;
    c.stop();
}
