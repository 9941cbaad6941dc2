//! Test harness: one real Postgres cluster per test process (initdb + pg_ctl on a free port,
//! `wal_level=logical`), one database per test. A watchdog shell stops the cluster and removes its
//! files when the test process exits, even when it is killed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub struct Cluster {
    pub port: u16,
    pub dir: PathBuf,
    pub bin: PathBuf,
    run_as: Option<(u32, u32)>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The Postgres binaries: PATH first, then Debian's /usr/lib/postgresql/<newest>/bin.
pub fn pg_bin() -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .arg("-c")
        .arg("command -v initdb")
        .output()
    {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !p.is_empty() {
            let real = std::fs::canonicalize(&p).unwrap_or_else(|_| PathBuf::from(&p));
            return real.parent().unwrap().to_path_buf();
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run `apt-get install -y postgresql` (the test script does)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions
        .pop()
        .expect("no initdb found under /usr/lib/postgresql")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ids_of(user: &str) -> Option<(u32, u32)> {
    let out = |flag: &str| -> Option<u32> {
        let o = Command::new("id").arg(flag).arg(user).output().ok()?;
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    Some((out("-u")?, out("-g")?))
}

impl Cluster {
    fn command(&self, prog: &str) -> Command {
        let mut c = Command::new(self.bin.join(prog));
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            c.uid(uid).gid(gid);
        }
        c.env_remove("PGDATA");
        c
    }

    fn start() -> Cluster {
        Self::start_with("logical")
    }

    /// Stops this cluster now (the watchdog removes its files later).
    pub fn stop(&self) {
        let _ = self.ctl(&["-m", "immediate", "stop"]);
    }

    /// A cluster of its own (not the shared one) with the given `wal_level`.
    pub fn start_with(wal_level: &str) -> Cluster {
        let hba = "local all all trust\n\
                   host all walden_pw 127.0.0.1/32 scram-sha-256\n\
                   host replication walden_pw 127.0.0.1/32 scram-sha-256\n\
                   host all all 127.0.0.1/32 trust\n\
                   host replication all 127.0.0.1/32 trust\n";
        Self::start_custom(wal_level, hba, "", &[])
    }

    /// A cluster with its own `pg_hba.conf`, extra server options (`-c name=value …`) and files
    /// written into its data directory before it starts (owned by the server's user, mode 0600).
    pub fn start_custom(
        wal_level: &str,
        hba: &str,
        extra_opts: &str,
        files: &[(&str, &[u8])],
    ) -> Cluster {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let bin = pg_bin();
        let root = unsafe_euid_is_root();
        let run_as = if root {
            Some(ids_of("postgres").expect(
                "running as root needs the `postgres` user (created by Debian's postgresql package)",
            ))
        } else {
            None
        };
        let dir = std::env::temp_dir().join(format!("walden-it-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let port = free_port();
        let c = Cluster {
            port,
            dir: dir.clone(),
            bin,
            run_as,
        };
        let data = dir.join("data");
        let st = c
            .command("initdb")
            .args([
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        for (name, bytes) in files {
            use std::os::unix::fs::PermissionsExt;
            let path = data.join(name);
            std::fs::write(&path, bytes).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            if let Some((uid, gid)) = run_as {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
            }
        }
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c wal_level={wal_level} \
             -c max_replication_slots=64 -c max_wal_senders=64 -c max_connections=300 \
             -c fsync=off -c synchronous_commit=on -c logical_decoding_work_mem=64kB \
             -c shared_buffers=64MB {extra_opts}",
            dir.display()
        );
        let st = c
            .command("pg_ctl")
            .args(["-D", data.to_str().unwrap(), "-w", "-t", "60", "-l"])
            .arg(dir.join("log"))
            .args(["-o", &opts, "start"])
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&st.stderr),
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        // Watchdog: when this process is gone, stop the cluster and remove its files.
        let mut watchdog = Command::new("sh");
        watchdog.arg("-c").arg(format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; \
             {ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            ctl = c.bin.join("pg_ctl").display(),
            data = data.display(),
            dir = dir.display()
        ));
        if let Some((uid, gid)) = run_as {
            use std::os::unix::process::CommandExt;
            watchdog.uid(uid).gid(gid);
        }
        #[allow(clippy::zombie_processes)] // it must outlive this process, by design
        watchdog
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        c
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Restarts the server (`mode`: fast, immediate) and waits until it takes connections. The log
    /// file is named again: without one the new postmaster would hold pg_ctl's output pipe open.
    pub fn restart(&self, mode: &str) {
        let log = self.dir.join("log");
        let out = self.ctl(&[
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
    }

    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(args)
            .output()
            .unwrap()
    }
}

fn unsafe_euid_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(Cluster::start)
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// A fresh database for one test, with a publication for all tables.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub client: tokio_postgres::Client,
}

/// Rows of `table` at the source.
pub async fn source_rows(client: &tokio_postgres::Client, table: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {table}");
    client.query_one(&sql, &[]).await.unwrap().get(0)
}

pub async fn test_db(name: &str) -> TestDb {
    let c = cluster();
    let admin = connect(&c.url("postgres")).await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = c.url(name);
    let client = connect(&url).await;
    TestDb {
        name: name.to_string(),
        url,
        client,
    }
}

pub fn warehouse_dir(name: &str) -> PathBuf {
    let d = cluster().dir.join(format!("wh-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub fn config(db: &TestDb, warehouse: &Path) -> walden::config::Config {
    let text = format!(
        "[source]\nurl = \"{}\"\nslot = \"s_{}\"\npublication = \"walden\"\ncreate_publication = true\n\
         [warehouse]\nurl = \"{}\"\n[batch]\nmax_rows = 500\nmax_delay_ms = 200\n",
        db.url,
        db.name,
        warehouse.display()
    );
    walden::config::Config::from_toml_and_env(&text, "test", Vec::new()).unwrap()
}
