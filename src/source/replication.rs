//! Our replication-protocol client: a `replication=database` connection over a plain socket.
//!
//! crates.io's tokio-postgres cannot speak CopyBoth, so this module frames backend messages itself and
//! uses `postgres-protocol` for frontend messages and SCRAM/MD5. It owns: start-up and
//! authentication, simple queries on the walsender (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`),
//! and the CopyBoth stream after `START_REPLICATION`, which is served by a background I/O task that
//! answers keepalives at once and sends standby status updates on a timer, also while the consumer
//! applies backpressure (see [`ReplicationStream`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

use super::coalesce::{Coalescer, TcpTuning};
use super::error::{ServerError, SourceError};
use super::liveness::{Silence, StreamTiming};
use super::socket;
use crate::checkpoint::Lsn;
use crate::telemetry::METRICS;

use super::tls::Stream as Io;

/// One backend message: its tag and body (without the length word).
#[derive(Debug)]
struct Frame {
    tag: u8,
    body: Bytes,
}

/// Reads whole backend frames out of a growing buffer.
fn take_frame(buf: &mut BytesMut) -> Result<Option<Frame>, SourceError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if !(4..=1 << 30).contains(&len) {
        return Err(SourceError::Protocol(format!("bad frame length {len}")));
    }
    if buf.len() < 1 + len {
        buf.reserve(1 + len - buf.len());
        return Ok(None);
    }
    let tag = buf[0];
    buf.advance(5);
    let body = buf.split_to(len - 4).freeze();
    Ok(Some(Frame { tag, body }))
}

fn parse_error(mut body: Bytes) -> ServerError {
    let mut e = ServerError::default();
    while body.has_remaining() {
        let field = body.get_u8();
        if field == 0 {
            break;
        }
        let end = body.iter().position(|b| *b == 0).unwrap_or(body.len());
        let value = String::from_utf8_lossy(&body[..end]).into_owned();
        body.advance((end + 1).min(body.len()));
        match field {
            b'V' => e.severity = value,
            b'S' if e.severity.is_empty() => e.severity = value,
            b'C' => e.code = value,
            b'M' => e.message = value,
            b'D' => e.detail = Some(value),
            b'H' => e.hint = Some(value),
            _ => {}
        }
    }
    e
}

/// The result of `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone)]
pub struct SystemId {
    pub system_id: String,
    pub timeline: u32,
    pub xlog_pos: Lsn,
}

/// The result of `CREATE_REPLICATION_SLOT`.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    pub consistent_point: Lsn,
    pub snapshot_name: Option<String>,
}

/// Text rows of a simple query (NULL as None).
pub type Rows = Vec<Vec<Option<String>>>;

/// An authenticated replication connection, before streaming.
pub struct ReplicationConn {
    /// Watched until the stream starts (a command the server does not answer ends the
    /// connection); the stream's I/O task watches it itself (see [`super::liveness`]).
    io: socket::Answering<Box<dyn Io>>,
    /// The TCP socket under `io` (None for a Unix socket), for [`Coalescer`].
    tcp: Option<TcpTuning>,
    buf: BytesMut,
}

impl ReplicationConn {
    /// Connects with the connection parameters of `config` and `replication=database`.
    ///
    /// The walsender session gets fixed output settings (UTC, ISO dates, hex bytea, exact floats) so
    /// that pgoutput's text values parse the same whatever the server's defaults are.
    /// `receive_buffer`: `source.receive_buffer_bytes` (see [`TcpTuning::receive_buffer_for`]).
    /// Connects with `config` (see [`super::connection_config`]: its connect timeout and TCP
    /// keepalives apply).
    pub async fn connect(
        connection: &super::ConnectionConfig,
        receive_buffer: Option<u32>,
    ) -> Result<Self, SourceError> {
        let config = &connection.pg;
        let (io, tcp) = open_negotiated(connection, receive_buffer).await?;
        let user = config
            .get_user()
            .map(str::to_string)
            .or_else(|| std::env::var("USER").ok())
            .ok_or_else(|| SourceError::BadUrl("no user in source.url".into()))?;
        let db = config.get_dbname().unwrap_or(&user).to_string();
        let mut conn = ReplicationConn {
            io: socket::Answering::new(io, connection.answer_within),
            tcp,
            buf: BytesMut::with_capacity(256 * 1024),
        };
        let params = [
            ("user", user.as_str()),
            ("database", db.as_str()),
            ("replication", "database"),
            (
                "application_name",
                config.get_application_name().unwrap_or("walden"),
            ),
        ];
        let mut out = BytesMut::new();
        frontend::startup_message(
            params.iter().chain(super::SESSION_SETTINGS).copied(),
            &mut out,
        )?;
        conn.send(&out).await?;
        conn.authenticate(&user, config.get_password()).await?;
        Ok(conn)
    }

    async fn read_frame(&mut self) -> Result<Frame, SourceError> {
        loop {
            if let Some(f) = take_frame(&mut self.buf)? {
                return Ok(f);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(SourceError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                )));
            }
        }
    }

    async fn send(&mut self, out: &BytesMut) -> Result<(), SourceError> {
        self.io.write_all(out).await?;
        self.io.flush().await?;
        Ok(())
    }

    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&[u8]>,
    ) -> Result<(), SourceError> {
        let need_password = || SourceError::Auth {
            user: user.to_string(),
            message: "the server asks for a password and source.url has none".into(),
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let mut f = self.read_frame().await?;
            match f.tag {
                b'R' => {
                    let code = f.body.get_i32();
                    let mut out = BytesMut::new();
                    match code {
                        0 => {}
                        3 => {
                            frontend::password_message(
                                password.ok_or_else(need_password)?,
                                &mut out,
                            )?;
                            self.send(&out).await?;
                        }
                        5 => {
                            let mut salt = [0u8; 4];
                            f.body.copy_to_slice(&mut salt);
                            let pw = password.ok_or_else(need_password)?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                user.as_bytes(),
                                pw,
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut out)?;
                            self.send(&out).await?;
                        }
                        10 => {
                            let mechs = String::from_utf8_lossy(&f.body).to_string();
                            if !mechs.split('\0').any(|m| m == "SCRAM-SHA-256") {
                                return Err(SourceError::Auth {
                                    user: user.into(),
                                    message: format!("unsupported SASL mechanisms {mechs:?}"),
                                });
                            }
                            let s = ScramSha256::new(
                                password.ok_or_else(need_password)?,
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(
                                "SCRAM-SHA-256",
                                s.message(),
                                &mut out,
                            )?;
                            self.send(&out).await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                SourceError::Protocol("SASL continue without SASL start".into())
                            })?;
                            s.update(&f.body).map_err(|e| SourceError::Auth {
                                user: user.into(),
                                message: e.to_string(),
                            })?;
                            frontend::sasl_response(s.message(), &mut out)?;
                            self.send(&out).await?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                SourceError::Protocol("SASL final without SASL start".into())
                            })?;
                            s.finish(&f.body).map_err(|e| SourceError::Auth {
                                user: user.into(),
                                message: e.to_string(),
                            })?;
                        }
                        other => {
                            return Err(SourceError::Auth {
                                user: user.into(),
                                message: format!("unsupported authentication method {other}"),
                            })
                        }
                    }
                }
                b'E' => {
                    let e = parse_error(f.body);
                    return Err(match e.code.as_str() {
                        "28P01" | "28000" => SourceError::Auth {
                            user: user.into(),
                            message: e.message,
                        },
                        "42501" => SourceError::Setup(format!(
                            "role {user:?} may not replicate ({}). Grant it: `ALTER ROLE {} REPLICATION` \
                             (on managed services: the provider's replication role or flag, e.g. \
                             rds_replication on RDS), or use a role that has it in source.url",
                            e.message,
                            quote_ident(user)
                        )),
                        _ => SourceError::Server(e),
                    });
                }
                b'Z' => return Ok(()),
                _ => {} // ParameterStatus, BackendKeyData, NoticeResponse
            }
        }
    }

    /// Runs one command on the walsender and returns its text rows.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Rows, SourceError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let mut f = self.read_frame().await?;
            match f.tag {
                b'D' => {
                    let n = f.body.get_i16();
                    let mut row = Vec::with_capacity(n.max(0) as usize);
                    for _ in 0..n {
                        let len = f.body.get_i32();
                        if len < 0 {
                            row.push(None);
                        } else {
                            let v = f.body.split_to(len as usize);
                            row.push(Some(String::from_utf8_lossy(&v).into_owned()));
                        }
                    }
                    rows.push(row);
                }
                b'E' => error = Some(parse_error(f.body)),
                b'Z' => break,
                _ => {} // RowDescription, CommandComplete, Notice
            }
        }
        match error {
            Some(e) => Err(SourceError::Server(e)),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemId, SourceError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| SourceError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(SystemId {
            system_id: get(0),
            timeline: get(1).parse().unwrap_or(0),
            xlog_pos: get(2).parse().map_err(SourceError::Protocol)?,
        })
    }

    /// `CREATE_REPLICATION_SLOT name LOGICAL pgoutput`, with or without an exported snapshot.
    pub async fn create_slot(
        &mut self,
        slot: &str,
        export_snapshot: bool,
        temporary: bool,
    ) -> Result<CreatedSlot, SourceError> {
        let snap = if export_snapshot {
            "EXPORT_SNAPSHOT"
        } else {
            "NOEXPORT_SNAPSHOT"
        };
        let sql = format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput {snap}",
            quote_ident(slot),
            if temporary { " TEMPORARY" } else { "" }
        );
        let rows = self.simple_query(&sql).await?;
        let row = rows.first().ok_or_else(|| {
            SourceError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        Ok(CreatedSlot {
            consistent_point: row
                .get(1)
                .cloned()
                .flatten()
                .unwrap_or_default()
                .parse()
                .map_err(SourceError::Protocol)?,
            snapshot_name: row.get(2).cloned().flatten(),
        })
    }

    /// `START_REPLICATION … LOGICAL` with protocol v2 and streaming of large transactions; hands
    /// the socket to a background I/O task.
    pub async fn start_replication(
        mut self,
        slot: &str,
        publication: &str,
        start: Lsn,
        timing: StreamTiming,
    ) -> Result<ReplicationStream, SourceError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '2', streaming 'on', publication_names {}, messages 'true')",
            quote_ident(slot),
            quote_literal(&quote_ident(publication)),
        );
        let mut out = BytesMut::new();
        frontend::query(&sql, &mut out)?;
        self.send(&out).await?;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'W' => break,
                b'E' => {
                    let e = parse_error(f.body);
                    if e.code == "55006" {
                        let pid = e
                            .message
                            .rsplit(' ')
                            .next()
                            .map(|p| format!(" (PID {p})"))
                            .unwrap_or_default();
                        return Err(SourceError::SlotInUse {
                            slot: slot.to_string(),
                            pid,
                        });
                    }
                    return Err(SourceError::Server(e));
                }
                _ => {}
            }
        }
        let feedback = Arc::new(Feedback {
            flushed: AtomicU64::new(start.0),
            wake: Notify::new(),
            closing: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel(16);
        let buf = std::mem::take(&mut self.buf);
        let task = tokio::spawn(io_task(
            self.io.into_inner(),
            Coalescer::new(self.tcp),
            buf,
            tx,
            feedback.clone(),
            timing,
        ));
        Ok(ReplicationStream { rx, feedback, task })
    }
}

/// A socket to the source for replication, TLS negotiated as the URL says, with its TCP handle
/// for the coalescer when it is plain TCP (the coalescer reads the socket itself).
async fn open_negotiated(
    connection: &super::ConnectionConfig,
    receive_buffer: Option<u32>,
) -> Result<(Box<dyn Io>, Option<TcpTuning>), SourceError> {
    let opened = socket::open(&connection.pg, receive_buffer).await?;
    match opened.stream {
        socket::Raw::Tcp(tcp, tuning) => {
            let host = opened.host.as_deref().unwrap_or_default();
            let (io, encrypted) =
                super::tls::negotiate(tcp, &connection.tls, host, &opened.addr).await?;
            Ok((io, (!encrypted).then_some(tuning)))
        }
        socket::Raw::Unix(s) => Ok((Box::new(s), None)),
    }
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// What the consumer tells the I/O task: the LSN that is durable (confirmed as flushed).
struct Feedback {
    flushed: AtomicU64,
    wake: Notify,
    /// 1 once the consumer asked to close the stream.
    closing: AtomicU64,
}

/// One message of the CopyBoth stream.
#[derive(Debug, Clone)]
pub enum WalMessage {
    /// A pgoutput message starting at `wal_start`.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        data: Bytes,
    },
    /// The server's position; sent when it waits for WAL or wants an answer.
    Keepalive { wal_end: Lsn },
}

impl WalMessage {
    /// The server's WAL end when it sent the message.
    pub fn wal_end(&self) -> Lsn {
        match self {
            WalMessage::XLogData { wal_end, .. } | WalMessage::Keepalive { wal_end } => *wal_end,
        }
    }
}

/// The CopyBoth stream after `START_REPLICATION`: batches of messages from the I/O task.
pub struct ReplicationStream {
    rx: mpsc::Receiver<Result<Vec<WalMessage>, SourceError>>,
    feedback: Arc<Feedback>,
    task: tokio::task::JoinHandle<Result<(), SourceError>>,
}

impl ReplicationStream {
    /// Next batch of messages; `None` once the server ended the stream.
    pub async fn recv(&mut self) -> Option<Result<Vec<WalMessage>, SourceError>> {
        self.rx.recv().await
    }

    /// Confirms everything before `lsn` as durable; the server may recycle that WAL. Sent at once.
    pub fn confirm(&self, lsn: Lsn) {
        let prev = self.feedback.flushed.fetch_max(lsn.0, Ordering::SeqCst);
        if lsn.0 > prev {
            self.feedback.wake.notify_one();
        }
    }

    pub fn confirmed(&self) -> Lsn {
        Lsn(self.feedback.flushed.load(Ordering::SeqCst))
    }

    /// Sends a last status update and ends the replication session cleanly.
    pub async fn close(mut self) -> Result<(), SourceError> {
        self.feedback.closing.store(1, Ordering::SeqCst);
        self.feedback.wake.notify_one();
        self.rx.close();
        match tokio::time::timeout(Duration::from_secs(5), &mut self.task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(SourceError::Protocol(format!("I/O task failed: {join}"))),
            Err(_) => Ok(()),
        }
    }
}

/// A stream given up without [`ReplicationStream::close`] (the session failed) stops its I/O
/// task, which closes the connection: the walsender exits and the slot is free for the next
/// session at once, even on a quiet server where the task would not notice anything for long.
impl Drop for ReplicationStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Microseconds since 2000-01-01, Postgres' epoch.
fn pg_now() -> i64 {
    const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;
    chrono::Utc::now().timestamp_micros() - PG_EPOCH_UNIX_US
}

fn status_update(flushed: u64, reply: bool) -> BytesMut {
    let mut payload = BytesMut::with_capacity(34);
    payload.put_u8(b'r');
    payload.put_u64(flushed); // written
    payload.put_u64(flushed); // flushed
    payload.put_u64(flushed); // applied
    payload.put_i64(pg_now());
    payload.put_u8(reply as u8);
    let mut out = BytesMut::with_capacity(40);
    frontend::CopyData::new(&payload[..])
        .expect("status update fits a message")
        .write(&mut out);
    out
}

fn parse_copy_data(mut body: Bytes, batch: &mut Vec<WalMessage>) -> Result<bool, SourceError> {
    let short = || SourceError::Protocol("short CopyData message".into());
    if body.is_empty() {
        return Err(short());
    }
    match body.get_u8() {
        b'w' => {
            if body.len() < 24 {
                return Err(short());
            }
            let wal_start = Lsn(body.get_u64());
            let wal_end = Lsn(body.get_u64());
            let _send_time = body.get_i64();
            batch.push(WalMessage::XLogData {
                wal_start,
                wal_end,
                data: body,
            });
            Ok(false)
        }
        b'k' => {
            if body.len() < 17 {
                return Err(short());
            }
            let wal_end = Lsn(body.get_u64());
            let _send_time = body.get_i64();
            let reply = body.get_u8() == 1;
            batch.push(WalMessage::Keepalive { wal_end });
            Ok(reply)
        }
        other => Err(SourceError::Protocol(format!(
            "unknown CopyData kind {:?}",
            other as char
        ))),
    }
}

/// Messages handed to the consumer at most at once; while this many wait, the socket is not read.
const HANDOFF_MAX: usize = 4096;
/// Fewer messages than this wait up to [`HANDOFF_WAIT`] for more before they are handed on: the
/// socket is still read as data lands (a walsender whose output is drained promptly works less),
/// but the consumer wakes once per burst instead of once per read.
const HANDOFF_MIN: usize = 1024;
const HANDOFF_WAIT: Duration = Duration::from_millis(2);

/// Reads the socket, hands batches to the consumer, and keeps the server informed. While the
/// consumer is busy (channel full and [`HANDOFF_MAX`] messages waiting) it stops reading, but
/// still sends status updates on the timer so the walsender never times out.
async fn io_task(
    io: Box<dyn Io>,
    mut coalescer: Coalescer,
    mut buf: BytesMut,
    tx: mpsc::Sender<Result<Vec<WalMessage>, SourceError>>,
    feedback: Arc<Feedback>,
    timing: StreamTiming,
) -> Result<(), SourceError> {
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut ticker = tokio::time::interval(timing.tick());
    let mut status_due = tokio::time::Instant::now();
    // When the server was last heard from (or walden last stopped reading: a consumer that
    // holds the stream back is not a silent server).
    let mut heard = tokio::time::Instant::now();
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Vec<WalMessage> = Vec::new();
    let mut pending_since = tokio::time::Instant::now();
    let mut sent_flushed = 0u64;
    let result: Result<(), SourceError> = async {
        loop {
            if feedback.closing.load(Ordering::SeqCst) == 1 {
                let f = feedback.flushed.load(Ordering::SeqCst);
                wr.write_all(&status_update(f, false)).await?;
                let mut out = BytesMut::new();
                frontend::copy_done(&mut out);
                frontend::terminate(&mut out);
                wr.write_all(&out).await?;
                wr.flush().await?;
                return Ok(());
            }
            // Parse what is buffered into the pending batch.
            let mut reply_now = false;
            let was_empty = pending.is_empty();
            let mut messages = 0;
            if pending.len() < HANDOFF_MAX {
                while let Some(f) = take_frame(&mut buf)? {
                    match f.tag {
                        b'd' => {
                            reply_now |= parse_copy_data(f.body, &mut pending)?;
                            messages += 1;
                        }
                        b'E' => return Err(SourceError::Server(parse_error(f.body))),
                        b'c' => {
                            if !pending.is_empty() {
                                let _ = tx.send(Ok(std::mem::take(&mut pending))).await;
                            }
                            return Ok(());
                        }
                        _ => {} // Notice, ParameterStatus
                    }
                    if pending.len() >= HANDOFF_MAX {
                        break;
                    }
                }
            }
            if messages > 0 {
                METRICS.received_messages_total.inc_by(messages);
                if let Some(m) = pending.last() {
                    METRICS.server_wal_end_lsn.set(m.wal_end().0 as i64);
                }
            }
            if was_empty && !pending.is_empty() {
                pending_since = tokio::time::Instant::now();
            }
            if reply_now {
                let f = feedback.flushed.load(Ordering::SeqCst);
                wr.write_all(&status_update(f, false)).await?;
                wr.flush().await?;
                sent_flushed = f;
            }
            // A small batch waits briefly for more before it is handed on.
            let hold = pending.len() < HANDOFF_MIN;
            tokio::select! {
                biased;
                _ = feedback.wake.notified() => {
                    let f = feedback.flushed.load(Ordering::SeqCst);
                    if f != sent_flushed && feedback.closing.load(Ordering::SeqCst) == 0 {
                        wr.write_all(&status_update(f, false)).await?;
                        wr.flush().await?;
                        sent_flushed = f;
                    }
                }
                _ = ticker.tick() => {
                    if pending.len() >= HANDOFF_MAX {
                        heard = tokio::time::Instant::now();
                    }
                    let ask = match timing.silence(heard) {
                        Silence::Lost(t) => {
                            return Err(SourceError::Io(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("nothing from the server for {} s (source.receive_timeout_s)", t.as_secs_f64()),
                            )));
                        }
                        Silence::Ask => true,
                        Silence::Fine => false,
                    };
                    if ask || status_due.elapsed() >= timing.status_interval {
                        let f = feedback.flushed.load(Ordering::SeqCst);
                        wr.write_all(&status_update(f, ask)).await?;
                        wr.flush().await?;
                        sent_flushed = f;
                        status_due = tokio::time::Instant::now();
                    }
                }
                permit = async {
                    if hold {
                        tokio::time::sleep_until(pending_since + HANDOFF_WAIT).await;
                    }
                    tx.reserve().await
                }, if !pending.is_empty() => {
                    match permit {
                        Ok(p) => p.send(Ok(std::mem::take(&mut pending))),
                        Err(_) => {
                            // Consumer gone: close cleanly with what it confirmed.
                            feedback.closing.store(1, Ordering::SeqCst);
                        }
                    }
                }
                n = rd.read_buf(&mut buf), if pending.len() < HANDOFF_MAX => {
                    if buf.capacity() - buf.len() < 64 * 1024 {
                        buf.reserve(256 * 1024);
                    }
                    let n = n?;
                    if n == 0 {
                        return Err(SourceError::Io(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "server closed the replication connection",
                        )));
                    }
                    METRICS.received_bytes_total.inc_by(n as u64);
                    heard = tokio::time::Instant::now();
                    coalescer.on_read();
                }
                _ = async {
                    match coalescer.deadline() {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                }, if coalescer.deadline().is_some() && pending.len() < HANDOFF_MAX => {
                    coalescer.quiet(&mut buf)?;
                }
            }
        }
    }
    .await;
    if let Err(e) = &result {
        let _ = tx.send(Err(e.relay())).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_across_reads() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[b'Z', 0, 0, 0, 5]);
        assert!(take_frame(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"I");
        let f = take_frame(&mut buf).unwrap().unwrap();
        assert_eq!(f.tag, b'Z');
        assert_eq!(&f.body[..], b"I");
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_frame_length_is_an_error() {
        let mut buf = BytesMut::from(&[b'd', 0, 0, 0, 1][..]);
        assert!(take_frame(&mut buf).is_err());
    }

    #[test]
    fn error_fields_are_parsed() {
        let body = Bytes::from_static(b"SERROR\0VERROR\0C55006\0Mslot is active for PID 42\0\0");
        let e = parse_error(body);
        assert_eq!(e.code, "55006");
        assert_eq!(e.severity, "ERROR");
        assert!(e.message.ends_with("42"));
    }

    #[test]
    fn short_copy_data_is_rejected() {
        let mut v = Vec::new();
        assert!(parse_copy_data(Bytes::from_static(b"w\0\0"), &mut v).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"k\0"), &mut v).is_err());
        assert!(parse_copy_data(Bytes::new(), &mut v).is_err());
    }
}
