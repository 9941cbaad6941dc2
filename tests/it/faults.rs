//! Faults walden must ride out by itself: the server restarting under a streaming walden (fast
//! and immediate shutdowns). It reconnects with backoff, resumes from the slot, and the mirror
//! ends equal to the source with every change in the changelog once.

use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
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

/// A cluster of the test's own (it is restarted or cut off) with database `db` holding `tables`;
/// the server ends a walsender that hears nothing for 3 s, so one left behind by a stalled path
/// frees the slot soon. Returns the database's URL and a client to it.
async fn own_cluster(db: &str, tables: &str) -> (Cluster, String, tokio_postgres::Client) {
    let c = Cluster::start_with("logical");
    let admin = connect(&c.url("postgres")).await;
    for sql in [
        &format!("CREATE DATABASE {db}"),
        "ALTER SYSTEM SET wal_sender_timeout = '3s'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let url = c.url(db);
    let client = connect(&url).await;
    client.batch_execute(tables).await.unwrap();
    (c, url, client)
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
    let (c, url, client) =
        own_cluster("restarts", "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
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
        c.restart(mode);
        let from = 100 * (i as i32 + 1);
        let client = insert(&url, from, from + 100).await;
        client
            .batch_execute(&format!(
                "UPDATE t SET v = v || '+' WHERE id % 7 = {i}; DELETE FROM t WHERE id % 11 = {i}"
            ))
            .await
            .unwrap();
        let n = crate::pg::source_rows(&client, "t").await;
        run = mirror_reaches(&wh, n as usize, run, &format!("after restart -m {mode}")).await;
    }
    run.stop().await;
    let client = connect(&url).await;
    assert_id_v_mirror(&client, &wh, "t", "t").await;
    assert_changelog_unique(&wh, "t", "after restarts: ").await;
    c.stop();
}

/// A TCP proxy on loopback that can stall every connection it carries (they stay open but
/// nothing passes any more, as when a network stops delivering without closing anything) or cut
/// them (both sides closed, as by a reset). Connections made afterwards pass again.
struct Proxy {
    port: u16,
    links: Arc<Mutex<Vec<Arc<AtomicU8>>>>,
}

const PASS: u8 = 0;
const STALL: u8 = 1;
const CUT: u8 = 2;

impl Proxy {
    async fn start(to: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let links: Arc<Mutex<Vec<Arc<AtomicU8>>>> = Default::default();
        let all = links.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let state = Arc::new(AtomicU8::new(PASS));
                all.lock().unwrap().push(state.clone());
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pass(cr, sw, state.clone()));
                tokio::spawn(pass(sr, cw, state));
            }
        });
        Proxy { port, links }
    }

    fn set_all(&self, to: u8) {
        for s in self.links.lock().unwrap().drain(..) {
            s.store(to, Ordering::SeqCst);
        }
    }

    fn stall(&self) {
        self.set_all(STALL);
    }

    fn cut(&self) {
        self.set_all(CUT);
    }
}

/// Copies `from` to `to` until either side closes or the link is cut; once stalled, holds both
/// open and passes nothing.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<AtomicU8>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    let changed = async {
        while state.load(Ordering::SeqCst) == PASS {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::pin!(changed);
    loop {
        let read = tokio::select! {
            n = from.read(&mut buf) => Some(n),
            _ = &mut changed => None,
        };
        if state.load(Ordering::SeqCst) == STALL {
            std::future::pending::<()>().await;
        }
        match read {
            None | Some(Ok(0)) | Some(Err(_)) => return,
            Some(Ok(_)) if state.load(Ordering::SeqCst) == CUT => return,
            Some(Ok(n)) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stops_delivering_is_given_up_and_replaced() {
    let (c, url, client) =
        own_cluster("stalls", "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
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

/// A SQL query (the catalog queries of a session, `walden status`) over a path that stops
/// delivering ends with a transient error within `source.receive_timeout_s` instead of waiting
/// forever (the path's keepalives are answered, so TCP alone never gives up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_over_a_stalled_path_fails_instead_of_waiting_forever() {
    let (c, _url, client) = own_cluster("stalled_sql", "CREATE TABLE t (id int)").await;
    let proxy = Proxy::start(c.port).await;
    let db = TestDb {
        name: "stalled_sql".into(),
        url: format!("postgres://postgres@127.0.0.1:{}/stalled_sql", proxy.port),
        client,
    };
    let mut cfg = config(&db, &warehouse_dir("stalled_sql"));
    cfg.source.receive_timeout_s = 2;
    let sql = walden::source::connect_sql(&cfg.source).await.unwrap();
    sql.query_one("SELECT 1", &[]).await.unwrap();
    // Idle longer than the limit: an idle connection is not given up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sql.query_one("SELECT 1", &[]).await.unwrap();
    proxy.stall();
    let e = tokio::time::timeout(Duration::from_secs(30), sql.query_one("SELECT 1", &[]))
        .await
        .expect("the query waited on a stalled path")
        .unwrap_err();
    let e = walden::source::SourceError::from(e);
    assert!(e.is_transient(), "{e}");
    c.stop();
}

/// Keeps committing small transactions of inserts, updates and deletes on `items` (and inserts
/// on `log`) until `stop`, reconnecting whenever the server goes away.
async fn restless_workload(url: String, stop: Arc<std::sync::atomic::AtomicBool>) {
    let mut i: i32 = 0;
    while !stop.load(Ordering::SeqCst) {
        let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::SeqCst) {
            let sql = format!(
                "BEGIN; INSERT INTO items VALUES ({i}, 0, 'new') ON CONFLICT DO NOTHING; \
                 UPDATE items SET qty = qty + 1, note = 'upd' WHERE id = {}; \
                 DELETE FROM items WHERE id = {}; \
                 INSERT INTO log (item, delta) VALUES ({i}, 1); COMMIT;",
                i / 2,
                i - 20
            );
            if client.batch_execute(&sql).await.is_err() {
                break;
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// `walden run` as a process of its own, streaming from `url` into the warehouse `wh` (a path or
/// an object-store URL), with more `WALDEN_…` variables `env` (they win over the defaults here).
fn spawn_walden(url: &str, wh: &str, env: &[(String, String)]) -> Walden {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_walden"));
    cmd.arg("run")
        .env("WALDEN_SOURCE__URL", url)
        .env("WALDEN_SOURCE__SLOT", "s_mixed")
        .env("WALDEN_SOURCE__CREATE_PUBLICATION", "true")
        .env("WALDEN_SOURCE__STATUS_INTERVAL_MS", "200")
        .env("WALDEN_SOURCE__RECEIVE_TIMEOUT_S", "2")
        .env("WALDEN_SOURCE__CONNECT_TIMEOUT_S", "5")
        .env("WALDEN_RETRY__INITIAL_MS", "100")
        .env("WALDEN_RETRY__MAX_MS", "1000")
        .env("WALDEN_WAREHOUSE__URL", wh)
        .env("WALDEN_BATCH__MAX_ROWS", "50")
        .env("WALDEN_BATCH__MAX_DELAY_MS", "100")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(
            "RUST_LOG",
            std::env::var("WALDEN_FAULT_LOG").unwrap_or("walden=warn".into()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(match std::env::var("WALDEN_FAULT_LOG_FILE") {
            Ok(f) => std::process::Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(f)
                    .unwrap(),
            ),
            Err(_) => std::process::Stdio::piped(),
        })
        .spawn()
        .map(Walden)
        .unwrap()
}

/// A `walden run` process, killed when dropped: a failed test leaves none running.
struct Walden(std::process::Child);

impl std::ops::Deref for Walden {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Walden {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Walden {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The walsender serving walden's slot, when one is streaming.
async fn walsender(url: &str) -> Option<i32> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    client
        .query_opt(
            "SELECT s.active_pid FROM pg_replication_slots s JOIN pg_stat_replication r \
             ON r.pid = s.active_pid WHERE s.slot_name = 's_mixed' \
             AND r.state IN ('streaming', 'catchup')",
            &[],
        )
        .await
        .ok()
        .flatten()
        .and_then(|r| r.get(0))
}

/// Waits until a walsender other than `old` streams walden's slot: walden is past the fault and
/// past its start (where a server it cannot reach is a configuration error, not a fault to ride
/// out, and where catalog queries have no stream to notice a stuck path for them).
async fn streaming_again(url: &str, old: Option<i32>, child: &mut std::process::Child, what: &str) {
    let started = Instant::now();
    loop {
        if let Some(pid) = walsender(url).await {
            if Some(pid) != old {
                return;
            }
        }
        still_running(child, what);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: walden did not stream again within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// walden must still be running: one that stopped by itself is a failure, with its stderr.
fn still_running(child: &mut std::process::Child, what: &str) {
    if let Some(status) = child.try_wait().unwrap() {
        let err = crate::stderr_of(child);
        panic!("{what}: walden exited by itself ({status}):\n{err}");
    }
}

/// A continuous workload on two tables while, at random moments, walden is SIGKILLed, Postgres
/// restarts (fast or immediate), and the TCP path between them is cut or stalls, and maintenance
/// compacts and vacuums beside the stream: walden never gives up, and afterwards the mirror
/// equals the source and every changelog is unique.
/// `WALDEN_FAULTS=N` (default 50) faults; `WALDEN_FAULT_SEED=S` replays a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_faults_lose_and_duplicate_nothing() {
    use rand::Rng;
    let (seed, faults, mut rng) = seeded("WALDEN_FAULTS", 50);

    let (c, url, proxy, via_proxy) = workload_cluster("mixed").await;
    let wh = warehouse_dir("mixed");
    let wh_url = wh.display().to_string();
    // Maintenance at its most eager: compaction races the stream (retention 0 asked for; a
    // running walden keeps its minimum, so VACUUM and log cleanup cannot pull files from under it).
    let env: Vec<(String, String)> = [
        ("WALDEN_MAINTENANCE__INTERVAL_S", "2"),
        ("WALDEN_MAINTENANCE__COMPACT_MIN_FILES", "4"),
        ("WALDEN_MAINTENANCE__RETENTION_HOURS", "0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut walden = spawn_walden(&via_proxy, &wh_url, &env);
    streaming_again(&url, None, &mut walden, "first start").await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(restless_workload(url.clone(), stop.clone()));

    let mut kinds = [0u32; 5];
    for n in 0..faults {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..900))).await;
        let kind = rng.random_range(0..5);
        kinds[kind] += 1;
        let what = format!("seed {seed}, fault {n}");
        let names = ["kill", "fast restart", "immediate restart", "cut", "stall"];
        eprintln!("{what}: {}", names[kind]);
        let old = walsender(&url).await;
        match kind {
            0 => {
                still_running(&mut walden, &what);
                walden.kill().unwrap();
                walden.wait().unwrap();
                walden = spawn_walden(&via_proxy, &wh_url, &env);
            }
            1 | 2 => {
                c.restart(if kind == 1 { "fast" } else { "immediate" });
            }
            3 => proxy.cut(),
            _ => proxy.stall(),
        }
        streaming_again(&url, old, &mut walden, &what).await;
    }
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    eprintln!("faults by kind (kill, fast, immediate, cut, stall): {kinds:?}");
    still_running(&mut walden, &format!("seed {seed}, after the faults"));

    // The running walden catches up by itself: the mirror comes to equal the source.
    let client = connect(&url).await;
    let src = crate::crash::items_source(&client).await;
    let started = Instant::now();
    loop {
        let mir = crate::crash::items_mirror(&wh).await;
        if mir == src {
            break;
        }
        still_running(&mut walden, &format!("seed {seed}, catching up"));
        if started.elapsed() > Duration::from_secs(90) {
            crate::warehouse::assert_same(&format!("seed {seed}: items after 90 s"), &src, &mir);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    walden.kill().unwrap();
    walden.wait().unwrap();
    for t in ["items", "log"] {
        assert_changelog_unique(&wh, t, &format!("seed {seed}: ")).await;
    }
    // Maintenance ran beside the faults: its rounds set the retention it was given (table
    // metadata, which survives log cleanup, unlike the compaction commits themselves).
    let w = walden::sink::Warehouse::new(&walden::config::WarehouseConfig {
        url: wh_url.clone(),
        storage_options: Default::default(),
        deletion_vectors: true,
        key_index_rows: 0,
    })
    .unwrap();
    let url = w.table_url(walden::sink::TableKind::Changes, "public", "log");
    let table = w.open(&url).await.unwrap().expect("changelog");
    let props = table.snapshot().unwrap().metadata().configuration().clone();
    assert_eq!(
        props.get("delta.logRetentionDuration").map(String::as_str),
        Some("interval 1 hours"),
        "seed {seed}: maintenance never ran (a running stream keeps at least an hour)"
    );
    c.stop();
}

/// The warehouse on S3 (moto behind a relay that injects faults) while a continuous workload
/// runs and, at random moments, walden is SIGKILLed, its Postgres path is cut, or the store loses
/// the answers to commits or answers `503 SlowDown`: walden never gives up, the mirror ends equal
/// to the source and the changelog unique. `WALDEN_STORE_FAULTS=N` (default 15) faults;
/// `WALDEN_FAULT_SEED=S` replays a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_faults_beside_kills_and_cuts_lose_and_duplicate_nothing() {
    use rand::Rng;
    let (seed, faults, mut rng) = seeded("WALDEN_STORE_FAULTS", 15);
    let (c, url, proxy, via_proxy) = workload_cluster("storefaults").await;
    let py = tokio::task::spawn_blocking(crate::python::python)
        .await
        .unwrap();
    let s3 = crate::storage::moto(&py);
    crate::storage::make_bucket(&py, Some(&s3), None, "lake");
    let store = crate::storage::relay(&py, &s3, false);
    let wh = "s3://lake/storefaults";
    // Larger batches than the local test's: each commit costs many requests to the emulator.
    let mut env: Vec<(String, String)> = crate::storage::s3_options(&store.endpoint())
        .into_iter()
        .map(|(k, v)| {
            let key = format!("WALDEN_WAREHOUSE__STORAGE_OPTIONS__{}", k.to_uppercase());
            (key, v)
        })
        .collect();
    env.push(("WALDEN_BATCH__MAX_ROWS".into(), "1000".into()));
    env.push(("WALDEN_BATCH__MAX_DELAY_MS".into(), "300".into()));
    let mut walden = spawn_walden(&via_proxy, wh, &env);
    streaming_again(&url, None, &mut walden, "first start").await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(restless_workload(url.clone(), stop.clone()));
    let mut kinds = [0u32; 3];
    for n in 0..faults {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
        let kind = rng.random_range(0..3);
        kinds[kind] += 1;
        let what = format!("seed {seed}, store fault {n}");
        eprintln!("{what}: {}", ["kill", "cut", "store"][kind]);
        let old = walsender(&url).await;
        match kind {
            0 => {
                still_running(&mut walden, &what);
                walden.kill().unwrap();
                walden.wait().unwrap();
                walden = spawn_walden(&via_proxy, wh, &env);
            }
            1 => proxy.cut(),
            _ => {
                // Settled in place: the stream goes on; wait until the faults are used up.
                let ask = if rng.random_bool(0.5) {
                    format!("lose_commits={}", rng.random_range(1..=3))
                } else {
                    format!("fail={}", rng.random_range(2..=8))
                };
                crate::storage::faults(&store, &ask);
                store_faults_used(&store, &mut walden, &what).await;
                continue;
            }
        }
        streaming_again(&url, old, &mut walden, &what).await;
    }
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    eprintln!("faults by kind (kill, cut, store): {kinds:?}");
    let client = connect(&url).await;
    let src = crate::crash::items_source(&client).await;
    let reader = s3_reader(&s3, wh);
    let started = Instant::now();
    loop {
        let mir = query_rows(
            &reader,
            "SELECT concat_ws('|', CAST(id AS VARCHAR), CAST(qty AS VARCHAR), note) \
             FROM public.items ORDER BY id",
        )
        .await;
        if mir == src {
            break;
        }
        still_running(&mut walden, &format!("seed {seed}, catching up"));
        if started.elapsed() > Duration::from_secs(120) {
            crate::warehouse::assert_same(&format!("seed {seed}: items after 120 s"), &src, &mir);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    walden.kill().unwrap();
    walden.wait().unwrap();
    for t in ["items", "log"] {
        let dup = query_rows(
            &reader,
            &format!(
                "SELECT CAST(count(*) AS VARCHAR) FROM (SELECT _walden_lsn, _walden_seq \
                 FROM changes.public.{t} GROUP BY 1, 2 HAVING count(*) > 1)"
            ),
        )
        .await;
        assert_eq!(
            dup,
            ["0"],
            "seed {seed}: {t}: duplicated changes in the changelog"
        );
    }
    c.stop();
}

/// A cluster of its own with the tables of [`restless_workload`] in database `name`, and a proxy
/// in front of it: the cluster, its direct URL, the proxy and the URL through it.
async fn workload_cluster(name: &str) -> (crate::pg::Cluster, String, Proxy, String) {
    let (c, url, _) = own_cluster(
        name,
        "CREATE TABLE items (id int PRIMARY KEY, qty int NOT NULL, note text);
         CREATE TABLE log (id bigserial PRIMARY KEY, item int, delta int);",
    )
    .await;
    let proxy = Proxy::start(c.port).await;
    let via_proxy = format!("postgres://postgres@127.0.0.1:{}/{name}", proxy.port);
    (c, url, proxy, via_proxy)
}

/// The seed (`WALDEN_FAULT_SEED`, else a random one, printed) and the number of faults (`count`
/// variable, else `default`) of a randomized fault test, and its random source.
fn seeded(count: &str, default: u32) -> (u64, u32, rand::rngs::StdRng) {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("WALDEN_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random_range(0..1_000_000));
    let faults: u32 = std::env::var(count)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("faults: WALDEN_FAULT_SEED={seed} {count}={faults}");
    (seed, faults, rand::rngs::StdRng::seed_from_u64(seed))
}

/// Waits until the relay has injected every fault asked for (the workload keeps walden
/// committing).
async fn store_faults_used(
    store: &crate::storage::Emulator,
    child: &mut std::process::Child,
    what: &str,
) {
    let started = Instant::now();
    while !crate::storage::faults(store, "").contains("pending={'lose_commits': 0, 'fail': 0}") {
        still_running(child, what);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: the store faults were not used within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A config that reads the warehouse `wh` straight from moto (not through the relay).
fn s3_reader(s3: &crate::storage::Emulator, wh: &str) -> walden::config::Config {
    let mut text = format!(
        "[source]\nurl = \"postgres://unused@127.0.0.1/x\"\nslot = \"unused\"\n\
         publication = \"walden\"\n[warehouse]\nurl = \"{wh}\"\n[warehouse.storage_options]\n"
    );
    for (k, v) in crate::storage::s3_options(&s3.endpoint()) {
        text.push_str(&format!("{k} = \"{v}\"\n"));
    }
    walden::config::Config::from_toml_and_env(&text, "test", Vec::new()).unwrap()
}

/// One string per row of `sql` (one column) over the warehouse of `cfg`; a table that is not
/// there yet reads as no rows.
async fn query_rows(cfg: &walden::config::Config, sql: &str) -> Vec<String> {
    let Ok(batches) = walden::ops::query::run(cfg, sql).await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for b in &batches {
        let col = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let col = col
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        out.extend(col.iter().map(|v| v.unwrap_or_default().to_string()));
    }
    out
}
