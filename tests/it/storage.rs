//! The warehouse on object storage: S3 (moto's server, PyPI) and Azure Blob (Azurite, npm), both
//! started here on loopback. Snapshot, stream, backfill and every ops command run against them,
//! and Python's `deltalake` reads the mirror back from the store cell by cell; stores walden
//! must refuse (one that ignores conditional put, a missing bucket, wrong credentials) are.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use walden::config::Config;

use crate::pg::{free_port, test_db, TestDb};
use crate::python::{npm_bin, python};
use crate::warehouse::{assert_verified, run_once};

/// An emulator process on a loopback port, stopped when dropped.
pub struct Emulator {
    child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Emulator {
    fn start(mut cmd: Command, port: u16, dir: tempfile::TempDir) -> Self {
        let log = dir.path().join("emulator.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let mut em = Emulator {
            child,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = em.child.try_wait() {
                panic!("{cmd:?} exited ({status}): {}", em.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{cmd:?} did not listen: {}",
                em.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        em
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("the emulator on port {} said (last lines):", self.port);
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto's S3 server.
pub fn moto(py: &Path) -> Emulator {
    let port = free_port();
    let mut cmd = Command::new(py.with_file_name("moto_server"));
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    Emulator::start(cmd, port, tempfile::tempdir().unwrap())
}

/// Azurite's Blob service, one for the whole test process (tests use containers of their own).
///
/// Azurite ignores the listing offset (`startFrom`) that Azure Blob honours, so object_store must
/// know it talks to the emulator (`azure_storage_use_emulator`), and then takes the emulator's
/// address from `AZURITE_BLOB_STORAGE_URL`, a process-wide variable: set once, here, before any
/// Azure store is built. A watchdog stops Azurite when this process is gone.
fn azurite() -> &'static Emulator {
    static AZURITE: std::sync::OnceLock<Emulator> = std::sync::OnceLock::new();
    AZURITE.get_or_init(|| {
        let bin = npm_bin("azurite@3");
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(bin.join("azurite-blob"));
        cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(dir.path())
            .args(["--silent", "--skipApiVersionCheck"]);
        let em = Emulator::start(cmd, port, dir);
        #[allow(clippy::zombie_processes)] // it must outlive this process, by design
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while [ -d /proc/{} ]; do sleep 1; done; kill {}",
                std::process::id(),
                em.child.id()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::env::set_var("AZURITE_BLOB_STORAGE_URL", em.endpoint());
        em
    })
}

/// Azurite's well-known development account.
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub fn s3_options(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("aws_endpoint", endpoint.to_string()),
        ("aws_access_key_id", "walden-test".into()),
        ("aws_secret_access_key", "walden-test-secret".into()),
        ("aws_region", "us-east-1".into()),
        ("aws_allow_http", "true".into()),
    ]
}

fn azure_options(key: &str) -> Vec<(&'static str, String)> {
    vec![
        ("azure_storage_use_emulator", "true".into()),
        ("azure_storage_account_name", AZURITE_ACCOUNT.into()),
        ("azure_storage_account_key", key.into()),
    ]
}

/// Makes a bucket (moto checks no signatures) or a container (with the Azure SDK).
pub fn make_bucket(py: &Path, s3: Option<&Emulator>, azure: Option<&Emulator>, name: &str) {
    let script = if let Some(em) = s3 {
        format!(
            "import boto3\nboto3.client('s3', endpoint_url='{}', aws_access_key_id='a', \
             aws_secret_access_key='b', region_name='us-east-1').create_bucket(Bucket='{name}')",
            em.endpoint()
        )
    } else {
        let em = azure.unwrap();
        format!(
            "from azure.storage.blob import BlobServiceClient\n\
             BlobServiceClient.from_connection_string('DefaultEndpointsProtocol=http;\
             AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};\
             BlobEndpoint={}/{AZURITE_ACCOUNT};').create_container('{name}')",
            em.endpoint()
        )
    };
    let out = Command::new(py).args(["-c", &script]).output().unwrap();
    assert!(
        out.status.success(),
        "making {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn store_config(db: &TestDb, url: &str, options: &[(&str, String)]) -> Config {
    let mut text = format!(
        "[source]\nurl = \"{}\"\nslot = \"s_{}\"\npublication = \"walden\"\ncreate_publication = true\n\
         [batch]\nmax_rows = 500\nmax_delay_ms = 200\n[warehouse]\nurl = \"{url}\"\n\
         [warehouse.storage_options]\n",
        db.url, db.name
    );
    for (k, v) in options {
        text.push_str(&format!("{k} = \"{v}\"\n"));
    }
    walden::config::Config::from_toml_and_env(&text, "test", Vec::new()).unwrap()
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Snapshot, stream (with a TOASTed value left unchanged by a later update), every ops command,
/// a backfill, and Python's reader, all against the warehouse at `url`.
async fn replicate_into(db: TestDb, url: &str, options: Vec<(&'static str, String)>, py: PathBuf) {
    db.client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text, n numeric, big text);
             INSERT INTO items SELECT g, 'v' || g, g * 1.5, NULL FROM generate_series(1, 300) g",
        )
        .await
        .unwrap();
    let cfg = store_config(&db, url, &options);
    let report = walden::ops::check::run(&cfg).await;
    let store = report.findings.iter().find(|f| f.check == "warehouse");
    assert!(
        store.is_some_and(|f| f.level == walden::ops::check::Level::Ok),
        "{}",
        report.render()
    );
    run_once(&cfg).await; // the snapshot
    db.client
        .batch_execute(
            "INSERT INTO items SELECT g, 'v' || g, g * 1.5, NULL FROM generate_series(301, 400) g;
             UPDATE items SET v = v || '!' WHERE id % 3 = 0;
             DELETE FROM items WHERE id % 10 = 0;
             UPDATE items SET big = repeat('toast ', 20000) WHERE id = 7;
             UPDATE items SET n = 0 WHERE id = 7;",
        )
        .await
        .unwrap();
    run_once(&cfg).await; // the stream
    assert_verified(&cfg).await;

    let rows = count(&db, "SELECT count(*) FROM items").await;
    let b = walden::ops::query::run(
        &cfg,
        "SELECT (SELECT count(*) FROM public.items) AS m, \
         (SELECT count(*) FROM changes.public.items) AS c",
    )
    .await
    .unwrap();
    let col = |i: usize| {
        b[0].column(i)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap()
            .value(0)
    };
    assert_eq!(col(0), rows);
    assert!(col(1) > rows, "changelog holds every change");
    let status = walden::ops::status::run(&cfg, &db.client).await.unwrap();
    assert_eq!(status.tables.len(), 1);
    assert_eq!(status.tables[0].mirror_rows, rows);
    let described = walden::apply::inspect::describe(&cfg, 0).await.unwrap();
    assert!(
        described.contains(&format!("public.items: mirror {rows} rows")),
        "{described}"
    );
    walden::ops::backfill::run(&cfg, "public.items")
        .await
        .unwrap();
    assert_verified(&cfg).await;

    let options: serde_json::Map<String, serde_json::Value> = options
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    let options = serde_json::Value::Object(options).to_string();
    crate::python::assert_roundtrip(
        &py,
        &[db.url.as_str(), url, "public", "items", "id", &options],
        rows,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_warehouse_takes_snapshot_stream_backfill_and_ops() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    let s3 = moto(&py);
    make_bucket(&py, Some(&s3), None, "lake");
    let db = test_db("store_s3").await;
    replicate_into(db, "s3://lake/warehouse", s3_options(&s3.endpoint()), py).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_warehouse_takes_snapshot_stream_backfill_and_ops() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    let az = tokio::task::spawn_blocking(azurite).await.unwrap();
    make_bucket(&py, None, Some(az), "lake");
    let db = test_db("store_azure").await;
    replicate_into(db, "az://lake/warehouse", azure_options(AZURITE_KEY), py).await;
}

/// `tests/py/s3_relay.py` in front of `s3`: faults on request; with `forget`, it drops
/// `If-None-Match`, as an S3-compatible store that ignores conditional requests would.
pub fn relay(py: &Path, s3: &Emulator, forget: bool) -> Emulator {
    let port = free_port();
    let mut cmd = Command::new(py);
    cmd.arg(crate::project_file("tests/py/s3_relay.py"))
        .args([port.to_string(), s3.port.to_string()]);
    if forget {
        cmd.arg("--forget-conditions");
    }
    Emulator::start(cmd, port, tempfile::tempdir().unwrap())
}

/// Asks the relay for faults (`query`, e.g. `lose_commits=3`; empty: only asks how many are
/// pending) and returns its answer.
pub fn faults(relay: &Emulator, query: &str) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
    write!(
        s,
        "POST /__faults__?{query} HTTP/1.1\r\nHost: relay\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// The answer to a Delta commit is lost on its way back (the log entry is in the store): walden
/// reads the table again, sees its own commit, and goes on in the same session (the walsender
/// serving its slot stays the same), applying nothing twice. Requests answered `503 SlowDown`
/// meanwhile are retried by the store client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_settled_without_restarting_the_stream() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    let s3 = moto(&py);
    make_bucket(&py, Some(&s3), None, "lake");
    let relay = relay(&py, &s3, false);
    let db = test_db("store_lost").await;
    db.client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let cfg = store_config(&db, "s3://lake/lost", &s3_options(&relay.endpoint()));
    let run = crate::warehouse::Streaming::start(&cfg);
    db.client
        .batch_execute("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 50) g")
        .await
        .unwrap();
    wait_for_rows(&cfg, &run, 50).await;
    let before = streaming_walsender(&db).await;
    faults(&relay, "lose_commits=4&fail=6");
    for i in 0..8 {
        db.client
            .batch_execute(&format!(
                "INSERT INTO t SELECT g, 'b' FROM generate_series({0} * 10 + 51, {0} * 10 + 60) g;
                 UPDATE t SET v = v || '{0}' WHERE id % 8 = {0}; DELETE FROM t WHERE id = {0} * 5 + 1",
                i
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The last flush may have taken everything before every fault was used: more changes, then.
    let started = Instant::now();
    while !faults(&relay, "").contains("pending={'lose_commits': 0, 'fail': 0}") {
        assert!(started.elapsed() < Duration::from_secs(60), "faults unused");
        let sql = "UPDATE t SET v = v || '+' WHERE id = (SELECT min(id) FROM t)";
        db.client.batch_execute(sql).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let rows = crate::pg::source_rows(&db.client, "t").await;
    wait_for_rows(&cfg, &run, rows).await;
    let state = faults(&relay, "");
    assert!(state.contains("pending={'lose_commits': 0,"), "{state}");
    assert!(
        state.contains("injected={'lose_commits': 4, 'fail': 6}"),
        "{state}"
    );
    assert_eq!(
        streaming_walsender(&db).await,
        before,
        "the stream was restarted"
    );
    run.stop().await;
    assert_verified(&cfg).await;
    assert_eq!(duplicated_changes(&cfg).await, 0, "changes applied twice");
}

/// Lost answers to the commits of an initial snapshot, of schema changes (an added column, a
/// widened type: the table rewritten) and of a backfill are settled like the stream's: the
/// snapshot is taken once, the stream goes through the ALTERs in the same session, and the
/// backfill's copy lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_to_snapshot_schema_and_backfill_commits_are_settled() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    let s3 = moto(&py);
    make_bucket(&py, Some(&s3), None, "lake");
    let relay = relay(&py, &s3, false);
    let db = test_db("store_settle").await;
    db.client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, 'a' FROM generate_series(1, 100) g",
        )
        .await
        .unwrap();
    let cfg = store_config(&db, "s3://lake/settle", &s3_options(&relay.endpoint()));
    let used = |n: u32| {
        let state = faults(&relay, "");
        assert!(state.contains("pending={'lose_commits': 0,"), "{state}");
        let injected = format!("injected={{'lose_commits': {n},");
        assert!(state.contains(&injected), "{state}");
    };
    // The snapshot's changelog and mirror commits.
    faults(&relay, "lose_commits=2");
    let run = crate::warehouse::Streaming::start(&cfg);
    wait_for_rows(&cfg, &run, 100).await;
    used(2);
    let before = streaming_walsender(&db).await;

    faults(&relay, "lose_commits=4");
    db.client
        .batch_execute(
            "ALTER TABLE t ADD COLUMN w int;
             ALTER TABLE t ALTER COLUMN id TYPE bigint;
             INSERT INTO t SELECT g, 'b', g FROM generate_series(101, 120) g",
        )
        .await
        .unwrap();
    wait_for_rows(&cfg, &run, 120).await;
    used(6);
    let now = streaming_walsender(&db).await;
    assert_eq!(now, before, "a schema change restarted the stream");
    run.stop().await;

    faults(&relay, "lose_commits=2");
    walden::ops::backfill::run(&cfg, "public.t").await.unwrap();
    used(8);
    assert_verified(&cfg).await;
    let copied = "SELECT count(*) FROM changes.public.t WHERE _walden_op = 'snapshot'";
    assert_eq!(
        warehouse_count(&cfg, copied).await,
        100 + 120,
        "copies landed twice"
    );
    assert_eq!(duplicated_changes(&cfg).await, 0, "changes applied twice");
}

/// The walsender serving the test's slot, once walden streams (after its snapshot).
async fn streaming_walsender(db: &TestDb) -> i32 {
    let sql = "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1";
    let slot = format!("s_{}", db.name);
    let started = Instant::now();
    loop {
        let row = db.client.query_one(sql, &[&slot]).await.unwrap();
        if let Some(pid) = row.get::<_, Option<i32>>(0) {
            return pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "walden never streamed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Streamed changes (`_walden_lsn`, `_walden_seq`) in the changelog of `public.t` more than once.
async fn duplicated_changes(cfg: &Config) -> i64 {
    warehouse_count(
        cfg,
        "SELECT count(*) FROM (SELECT _walden_lsn, _walden_seq FROM changes.public.t \
         WHERE _walden_op <> 'snapshot' GROUP BY 1, 2 HAVING count(*) > 1)",
    )
    .await
}

/// The one number `sql` (a `count(*)`) answers over the warehouse of `cfg`.
async fn warehouse_count(cfg: &Config, sql: &str) -> i64 {
    let b = walden::ops::query::run(cfg, sql).await.unwrap();
    b[0].column(0)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .unwrap()
        .value(0)
}

/// Rows in the mirror of `public.t`, read through the ops query (as an operator would).
async fn mirror_rows(cfg: &Config) -> Option<i64> {
    let b = walden::ops::query::run(cfg, "SELECT count(*) FROM public.t").await;
    b.ok().and_then(|b| {
        b.first().map(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .unwrap()
                .value(0)
        })
    })
}

async fn wait_for_rows(cfg: &Config, run: &crate::warehouse::Streaming, n: i64) {
    let started = Instant::now();
    while mirror_rows(cfg).await != Some(n) {
        assert!(
            !run.ended(),
            "walden stopped before the mirror reached {n} rows"
        );
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the mirror did not reach {n} rows"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_that_would_lose_commits_or_cannot_be_used_are_refused_with_the_fix() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    let s3 = moto(&py);
    make_bucket(&py, Some(&s3), None, "lake");
    let db = test_db("store_refused").await;
    let check = |options: Vec<(&'static str, String)>, url: &'static str| {
        let cfg = store_config(&db, url, &options);
        async move {
            let w = walden::sink::Warehouse::new(&cfg.warehouse)?;
            w.check_store().await
        }
    };

    // The same bucket, reached through a store that ignores If-None-Match.
    let relay = relay(&py, &s3, true);
    let e = check(s3_options(&relay.endpoint()), "s3://lake/wh")
        .await
        .unwrap_err();
    assert!(
        matches!(e, walden::sink::SinkError::UnsafeStore { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("ignores If-None-Match"), "{e}");
    // `run` stops on it before it touches the slot.
    let cfg = store_config(&db, "s3://lake/wh", &s3_options(&relay.endpoint()));
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let e = walden::pipeline::run(&cfg, walden::pipeline::Mode::Once, rx)
        .await
        .unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("cannot keep commits safe"), "{e}");
    // Directly, moto honours it.
    check(s3_options(&s3.endpoint()), "s3://lake/wh")
        .await
        .unwrap();

    // Options that turn the guarantee off.
    let mut off = s3_options(&s3.endpoint());
    off.push(("aws_conditional_put", "disabled".into()));
    let e = check(off, "s3://lake/wh").await.unwrap_err();
    assert!(e.to_string().contains("remove it"), "{e}");

    // A bucket that is not there.
    let e = check(s3_options(&s3.endpoint()), "s3://no-such-lake/wh")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not exist: create it"), "{e}");
    assert!(!e.is_transient(), "{e}");

    // Credentials the store refuses (Azurite checks its shared key).
    let az = tokio::task::spawn_blocking(azurite).await.unwrap();
    make_bucket(&py, None, Some(az), "refused");
    let wrong = AZURITE_KEY.replace("Eby8", "AAAA");
    let e = check(azure_options(&wrong), "az://refused/wh")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("refused the credentials"), "{e}");
    assert!(!e.is_transient(), "{e}");
    check(azure_options(AZURITE_KEY), "az://refused/wh")
        .await
        .unwrap();
}
