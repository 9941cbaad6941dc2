//! The Postgres side: connections, preflight checks, the slot, and the replication stream.
//!
//! Ordinary SQL (catalog queries, slot inspection) goes through tokio-postgres; the replication
//! connection is our own small client in [`replication`] (see ARCHITECTURE.md for why).

pub mod coalesce;
pub mod error;
mod liveness;
pub mod replication;
pub mod snapshot;
mod socket;
pub mod tls;
pub mod types;
pub mod watch;

use std::str::FromStr;
use std::time::Duration;

pub use error::{ServerError, SourceError};
pub use liveness::StreamTiming;
pub use replication::{ReplicationConn, ReplicationStream, WalMessage};

use crate::checkpoint::Lsn;
use crate::config::{SlotConfig, SourceConfig};
use replication::quote_ident;

/// The session settings of every connection walden opens (replication and SQL alike), so every
/// value reaches the one text parser (`decode::text_format`) in the same form: the one place they
/// are set.
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, YMD"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
];

/// [`SESSION_SETTINGS`] as SQL.
fn session_settings_sql() -> String {
    SESSION_SETTINGS
        .iter()
        .map(|(k, v)| format!("SET {k} = {};", replication::quote_literal(v)))
        .collect()
}

pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, SourceError> {
    tokio_postgres::Config::from_str(url).map_err(|e| SourceError::BadUrl(e.to_string()))
}

/// How walden reaches the source: tokio-postgres' settings and the TLS ones (see [`tls`]).
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    pub pg: tokio_postgres::Config,
    pub tls: tls::Tls,
    /// A request not answered within this ends the connection (`source.receive_timeout_s`;
    /// see [`socket::Answering`]).
    pub answer_within: Option<Duration>,
}

/// The connection settings of every connection walden opens to the source, replication and SQL:
/// the URL's, with walden's application name unless the URL names one, the connect timeout,
/// TCP keepalives plus a user timeout, so a peer that vanished or a network that stopped
/// delivering is noticed within idle + interval × count seconds, and TLS as libpq would use it.
pub fn connection_config(cfg: &SourceConfig) -> Result<ConnectionConfig, SourceError> {
    let (url, tls) = tls::split(&cfg.url)?;
    let home = std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".postgresql"));
    let tls = tls
        .with_env(|k| std::env::var(k).ok())
        .build(home.as_deref())?;
    let mut pg = parse_url(&url)?;
    if pg.get_application_name().is_none() {
        pg.application_name("walden");
    }
    pg.connect_timeout(Duration::from_secs(cfg.connect_timeout_s));
    let idle = Duration::from_secs(cfg.keepalive_idle_s.max(1));
    let interval = Duration::from_secs(cfg.keepalive_interval_s.max(1));
    pg.keepalives(true)
        .keepalives_idle(idle)
        .keepalives_interval(interval)
        .keepalives_retries(cfg.keepalive_count.max(1))
        .tcp_user_timeout(idle + interval * cfg.keepalive_count.max(1));
    pg.ssl_mode(match tls.mode {
        tls::SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        tls::SslMode::Allow | tls::SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    let answer_within =
        (cfg.receive_timeout_s > 0).then(|| Duration::from_secs(cfg.receive_timeout_s));
    Ok(ConnectionConfig {
        pg,
        tls,
        answer_within,
    })
}

/// An ordinary SQL connection (its driver task runs in the background), on a socket that fails
/// when a request is not answered within `source.receive_timeout_s` (see [`socket::Answering`]),
/// so a query over a stuck path ends instead of waiting forever.
pub async fn connect_sql(cfg: &SourceConfig) -> Result<tokio_postgres::Client, SourceError> {
    use tokio_postgres::tls::MakeTlsConnect;
    let ConnectionConfig {
        pg,
        tls,
        answer_within,
    } = connection_config(cfg)?;
    let opened = socket::open(&pg, None).await?;
    let stream: Box<dyn tls::Stream> = match opened.stream {
        socket::Raw::Tcp(s, _) => Box::new(s),
        socket::Raw::Unix(s) => Box::new(s),
    };
    let stream = socket::Answering::new(stream, answer_within);
    let mut make_tls =
        tokio_postgres_rustls::MakeRustlsConnect::new((*tls.client_config()).clone());
    let host = opened.host.as_deref().unwrap_or("localhost");
    let tls_connect = MakeTlsConnect::<socket::Answering<Box<dyn tls::Stream>>>::make_tls_connect(
        &mut make_tls,
        host,
    )
    .map_err(|e| SourceError::TlsSetup(e.to_string()))?;
    // Boxed, so the caller's future stays `Send` (see `socket::open`).
    let connecting: futures::future::BoxFuture<'_, _> =
        Box::pin(pg.connect_raw(stream, tls_connect));
    let timeout = pg
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10));
    let (client, conn) = match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(classify_connect_error(e, &pg, &cfg.url)),
        Err(_) => return Err(SourceError::ConnectTimeout(opened.addr)),
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "SQL connection ended");
        }
    });
    client.batch_execute(&session_settings_sql()).await?;
    Ok(client)
}

fn classify_connect_error(
    e: tokio_postgres::Error,
    pg: &tokio_postgres::Config,
    url: &str,
) -> SourceError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        if code == "28P01" || code == "28000" {
            return SourceError::Auth {
                user: pg.get_user().unwrap_or("").to_string(),
                message: db.message().to_string(),
            };
        }
        return SourceError::Server(ServerError {
            severity: db.severity().to_string(),
            code: code.to_string(),
            message: db.message().to_string(),
            detail: db.detail().map(str::to_string),
            hint: db.hint().map(str::to_string),
        });
    }
    let addr = crate::config::redact_url(url);
    if let Some(reason) = tls::tls_failure(&e) {
        return SourceError::Tls { addr, reason };
    }
    // tokio-postgres' Display leaves out the cause: look for it in the chain.
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        if c.to_string().contains("server does not support TLS") {
            return SourceError::TlsRefused(addr);
        }
        cause = c.source();
    }
    let io = std::io::Error::other(e.to_string());
    SourceError::Connect { addr, source: io }
}

/// Where streaming starts, found by [`prepare`].
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The slot's confirmed position: everything before it is already durable in the warehouse.
    pub start: Lsn,
    pub slot_created: bool,
    /// The snapshot exported by the slot's creation (valid while the replication connection that
    /// created it stays idle).
    pub snapshot_name: Option<String>,
}

/// Checks the server and makes sure the publication and slot exist; tells the operator exactly
/// what to fix when something is off.
pub async fn prepare(
    sql: &tokio_postgres::Client,
    repl: &mut ReplicationConn,
    (cfg, policy): (&SourceConfig, &SlotConfig),
    export_snapshot: bool,
) -> Result<Prepared, SourceError> {
    let wal_level: String = sql.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(SourceError::Setup(format!(
            "the server runs with wal_level = {wal_level}, and logical replication needs wal_level = logical. \
             Run `ALTER SYSTEM SET wal_level = logical;` as a superuser and restart Postgres"
        )));
    }
    let version: i32 = sql
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    if version < 140000 {
        return Err(SourceError::Setup(format!(
            "Postgres {version} is too old: walden needs 14 or newer (pgoutput protocol v2)"
        )));
    }
    let has_pub = sql
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await?
        .is_some();
    if !has_pub {
        if cfg.create_publication {
            sql.batch_execute(&format!(
                "CREATE PUBLICATION {} FOR ALL TABLES",
                quote_ident(&cfg.publication)
            ))
            .await?;
            tracing::info!(publication = %cfg.publication, "created publication FOR ALL TABLES");
        } else {
            return Err(SourceError::Setup(format!(
                "publication {:?} does not exist. Create it (`CREATE PUBLICATION {} FOR ALL TABLES;` or FOR TABLE …), \
                 or set source.create_publication = true",
                cfg.publication,
                quote_ident(&cfg.publication)
            )));
        }
    }
    let mut waited = std::time::Instant::now();
    let mut terminated = false;
    let slot = loop {
        let slot = sql
            .query_opt(
                "SELECT plugin, slot_type, database, active, active_pid, confirmed_flush_lsn::text, \
                 wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&cfg.slot],
            )
            .await?;
        let busy = slot.as_ref().is_some_and(|r| r.get::<_, bool>(3));
        let patience_over = waited.elapsed() >= Duration::from_secs(cfg.slot_wait_s);
        let holder: Option<i32> = slot.as_ref().and_then(|r| r.get(4));
        match holder {
            Some(pid) if busy && patience_over && policy.terminate_holder && !terminated => {
                tracing::warn!(slot = %cfg.slot, pid, waited_s = cfg.slot_wait_s,
                    "the slot is still held; terminating its holder (slot.terminate_holder = true)");
                sql.execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await?;
                terminated = true;
                waited = std::time::Instant::now();
                continue;
            }
            _ if !busy || patience_over => break slot,
            _ => {}
        }
        tracing::info!(slot = %cfg.slot, "slot is still active; waiting for its holder to let go");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    match slot {
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            let kind: String = row.get(1);
            let db: Option<String> = row.get(2);
            let active: bool = row.get(3);
            let pid: Option<i32> = row.get(4);
            let confirmed: Option<String> = row.get(5);
            let here: String = sql
                .query_one("SELECT current_database()", &[])
                .await?
                .get(0);
            if kind != "logical" || plugin.as_deref() != Some("pgoutput") {
                return Err(SourceError::Setup(format!(
                    "slot {:?} exists but is a {kind} slot with plugin {}; walden needs a logical pgoutput slot. \
                     Choose another source.slot, or drop this one",
                    cfg.slot,
                    plugin.as_deref().unwrap_or("none")
                )));
            }
            if db.as_deref() != Some(here.as_str()) {
                return Err(SourceError::Setup(format!(
                    "slot {:?} belongs to database {db:?}, but source.url connects to {here:?}",
                    cfg.slot
                )));
            }
            if row.get::<_, Option<String>>(6).as_deref() == Some("lost") {
                return Err(SourceError::SlotInvalidated {
                    slot: cfg.slot.clone(),
                });
            }
            if active {
                return Err(SourceError::SlotInUse {
                    slot: cfg.slot.clone(),
                    pid: pid.map(|p| format!(" (PID {p})")).unwrap_or_default(),
                });
            }
            let start = confirmed
                .as_deref()
                .unwrap_or("0/0")
                .parse()
                .map_err(SourceError::Protocol)?;
            Ok(Prepared {
                start,
                slot_created: false,
                snapshot_name: None,
            })
        }
        None => {
            let created = repl.create_slot(&cfg.slot, export_snapshot, false).await?;
            tracing::info!(slot = %cfg.slot, at = %created.consistent_point, "created replication slot");
            Ok(Prepared {
                start: created.consistent_point,
                slot_created: true,
                snapshot_name: created.snapshot_name,
            })
        }
    }
}

/// The server's current WAL insert position (what `run --once` drains up to): every commit
/// before it, also one made with `synchronous_commit = off` whose WAL is not written yet (the
/// write position would leave it out; the stream gets there once the WAL writer does).
pub async fn current_wal_lsn(sql: &tokio_postgres::Client) -> Result<Lsn, SourceError> {
    let s: String = sql
        .query_one(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_insert_lsn() END)::text",
            &[],
        )
        .await?
        .get(0);
    s.parse().map_err(SourceError::Protocol)
}

/// Writes a non-transactional logical message; it reaches the stream after every transaction that
/// committed before it, so its arrival proves those were all received. `None` when not permitted.
pub async fn emit_marker(sql: &tokio_postgres::Client, content: &str) -> Option<Lsn> {
    let row = sql
        .query_one(
            "SELECT pg_logical_emit_message(false, 'walden', $1::text)::text",
            &[&content],
        )
        .await
        .ok()?;
    row.get::<_, String>(0).parse().ok()
}

/// Drops a replication slot that no process holds.
pub async fn drop_slot(sql: &tokio_postgres::Client, slot: &str) -> Result<(), SourceError> {
    sql.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await?;
    Ok(())
}
