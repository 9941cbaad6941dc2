//! The streaming pipeline: slot → decoder → batches → Delta tables → confirmed LSN.
//!
//! Owns the run loop and its error policy: transient errors (lost connection, object-store
//! hiccups) reconnect with backoff and resume from the slot, which re-sends everything not yet
//! confirmed; definite errors stop with a message for the operator. Shutdown (SIGTERM/SIGINT)
//! flushes whole transactions, confirms, and ends the replication session cleanly.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio::sync::watch;

mod catalog;
mod progress;
mod retry;

use progress::{book, operations, Freshness};
use retry::Backoff;

use crate::apply::inspect;
use crate::apply::{Applier, ApplyError, ApplyStats};
use crate::batch::Batcher;
use crate::checkpoint::marker::{MarkerStore, SnapshotMarker, SnapshotState};
use crate::checkpoint::{Frontier, Lsn};
use crate::config::{Config, OnInvalidated};
use crate::decode::mask::Masks;
use crate::decode::pgoutput::DecodeError;
use crate::decode::spill::{SpillError, SpillPolicy};
use crate::decode::txn::{AssembleError, Assembler, Event, Transaction};
use crate::sink::{SinkError, Warehouse};
use crate::source::snapshot::published_tables;
use crate::source::types::TypeResolver;
use crate::source::{self, ReplicationConn, ReplicationStream, SourceError};
use crate::telemetry::{Phase, HEALTH, METRICS};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot decode the replication stream: {0}")]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Apply(Box<ApplyError>),
    #[error(transparent)]
    Sink(Box<SinkError>),
    #[error(transparent)]
    Spill(#[from] SpillError),
    #[error("initial snapshot: {0}")]
    Snapshot(Box<crate::snapshot::SnapshotError>),
    #[error(transparent)]
    Inspect(Box<inspect::InspectError>),
    #[error(
        "cannot serve metrics on {address} ({source}); set metrics.listen to a free address, \
         or leave it unset for no endpoint"
    )]
    Endpoint {
        address: String,
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<AssembleError> for PipelineError {
    fn from(e: AssembleError) -> Self {
        match e {
            AssembleError::Decode(e) => PipelineError::Decode(e),
            AssembleError::Spill(e) => PipelineError::Spill(e),
        }
    }
}

impl From<inspect::InspectError> for PipelineError {
    fn from(e: inspect::InspectError) -> Self {
        PipelineError::Inspect(Box::new(e))
    }
}

impl From<ApplyError> for PipelineError {
    fn from(e: ApplyError) -> Self {
        PipelineError::Apply(Box::new(e))
    }
}

impl From<crate::snapshot::SnapshotError> for PipelineError {
    fn from(e: crate::snapshot::SnapshotError) -> Self {
        PipelineError::Snapshot(Box::new(e))
    }
}

impl From<SinkError> for PipelineError {
    fn from(e: SinkError) -> Self {
        PipelineError::Sink(Box::new(e))
    }
}

impl PipelineError {
    /// The slot is held by another connection: at start another consumer (definite), but on a
    /// reconnect most likely walden's own previous walsender, which the server ends once it
    /// notices the old connection is gone (`wal_sender_timeout` at the latest).
    fn is_slot_in_use(&self) -> bool {
        matches!(self, PipelineError::Source(SourceError::SlotInUse { .. }))
    }

    pub fn is_transient(&self) -> bool {
        match self {
            PipelineError::Source(e) => e.is_transient(),
            PipelineError::Apply(e) => e.is_transient(),
            PipelineError::Sink(e) => e.is_transient(),
            PipelineError::Snapshot(e) => e.is_transient(),
            // A full disk can clear; a directory walden may not write to will not.
            PipelineError::Spill(e) => !matches!(
                e.source.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            ),
            PipelineError::Inspect(e) => matches!(**e, inspect::InspectError::Store(_)),
            PipelineError::Decode(_)
            | PipelineError::Internal(_)
            | PipelineError::Endpoint { .. } => false,
        }
    }

    /// Where the error arose, for `walden_errors_total{stage}` (a bounded set).
    fn stage(&self) -> &'static str {
        match self {
            PipelineError::Source(_) => "source",
            PipelineError::Decode(_) => "decode",
            PipelineError::Apply(_) => "apply",
            PipelineError::Sink(_) | PipelineError::Inspect(_) => "sink",
            PipelineError::Spill(_) => "spill",
            PipelineError::Snapshot(_) => "snapshot",
            PipelineError::Endpoint { .. } => "metrics",
            PipelineError::Internal(_) => "internal",
        }
    }
}

/// How long `run` goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Until shutdown is requested.
    Continuous,
    /// Until everything committed before the start is durable.
    Once,
}

#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub transactions: u64,
    pub changes: u64,
    pub confirmed: Lsn,
}

/// Runs the pipeline, reconnecting after transient errors, until done or shut down.
pub async fn run(
    cfg: &Config,
    mode: Mode,
    shutdown: watch::Receiver<bool>,
) -> Result<Summary, PipelineError> {
    METRICS.limit_table_labels(cfg.metrics.table_labels);
    if let Some(address) = &cfg.metrics.listen {
        crate::telemetry::serve(address)
            .await
            .map_err(|source| PipelineError::Endpoint {
                address: address.clone(),
                source,
            })?;
    }
    HEALTH.set(Phase::Starting);
    let warehouse = Warehouse::new(&cfg.warehouse)?;
    warehouse.check_store().await?;
    let _maintenance = (cfg.maintenance.enabled && mode == Mode::Continuous)
        .then(|| crate::maintain::start(warehouse.clone(), cfg.maintenance.clone()));
    let _erasure = (mode == Mode::Continuous)
        .then(|| crate::privacy::propagate::start(cfg))
        .flatten();
    let mut backoff = Backoff::new(&cfg.retry);
    let mut total = Summary::default();
    // Until a session got as far as an open connection, errors stop the run: a wrong URL or a
    // server that is not there should say so at once, not retry forever. A server that was
    // reached once and then went away (restarting, say) is waited for.
    let mut ever_streamed = false;
    let mut ever_connected = false;
    loop {
        let mut session = Session::new(cfg, warehouse.clone(), mode);
        let result = session.run(shutdown.clone()).await;
        total.transactions += session.summary.transactions;
        total.changes += session.summary.changes;
        total.confirmed = total.confirmed.max(session.summary.confirmed);
        ever_streamed |= session.streamed;
        ever_connected |= session.sql.is_some();
        if session.streamed {
            backoff.progressed();
        }
        match result {
            Ok(()) => {
                if mode == Mode::Once && cfg.privacy.propagates() {
                    // Cron-style runs propagate the deletes they brought before they end.
                    crate::privacy::propagate::logged(cfg).await;
                }
                HEALTH.set(Phase::Stopping);
                return Ok(total);
            }
            Err(e)
                if ((e.is_transient() && ever_connected)
                    || (e.is_slot_in_use() && ever_streamed))
                    && !*shutdown.borrow() =>
            {
                let Some(wait) = backoff.next() else {
                    METRICS.error(e.stage(), false);
                    HEALTH.set(Phase::Stopping);
                    tracing::error!(error = %e, give_up_after_s = cfg.retry.give_up_after_s,
                        "transient errors went on for longer than retry.give_up_after_s; stopping");
                    return Err(e);
                };
                METRICS.error(e.stage(), true);
                METRICS.reconnects_total.inc();
                HEALTH.set(Phase::Reconnecting);
                tracing::warn!(error = %e, retry_in = ?wait, "transient error; reconnecting");
                let mut sd = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = sd.changed() => return Ok(total),
                }
            }
            Err(e) => {
                METRICS.error(e.stage(), false);
                HEALTH.set(Phase::Stopping);
                return Err(e);
            }
        }
    }
}

/// What a background flush hands back.
struct FlushDone {
    applier: Applier,
    durable: Vec<(String, ApplyStats, [u64; 4])>,
    error: Option<ApplyError>,
    rows: usize,
    started: Instant,
}

/// One connection's worth of streaming.
///
/// Flushes run in the background while the next batch is received; at most one is under way, so
/// Delta commits of a table stay in LSN order.
struct Session<'a> {
    cfg: &'a Config,
    mode: Mode,
    warehouse: Warehouse,
    /// `None` while a flush has it.
    applier: Option<Applier>,
    in_flight: Option<tokio::task::JoinHandle<FlushDone>>,
    batcher: Batcher,
    assembler: Assembler,
    frontier: Frontier,
    freshness: Freshness,
    summary: Summary,
    /// The session got as far as START_REPLICATION.
    streamed: bool,
    /// The session's SQL connection (catalog queries), once connected.
    sql: Option<tokio_postgres::Client>,
    /// Resolves the column types of Relation messages (domains, arrays).
    types: TypeResolver,
    /// Columns masked at ingest (`[privacy.mask]`).
    masks: Masks,
    /// Published tables known to have their Delta tables, with the source OID those hold (see
    /// [`Session::adopt_new_tables`]).
    known: HashMap<String, u32>,
    /// Tables whose mirror must be copied afresh before their next flush (see
    /// [`Session::resolve_relation`]).
    recopy: HashSet<String>,
    /// The highest live attribute number last seen in the catalog, per table OID (see
    /// [`Session::follow_added_columns`]).
    columns_seen: HashMap<u32, i16>,
    /// Tables copied again because column types changed in a way the warehouse cannot follow:
    /// their relation and the columns to move aside first (see [`Session::resolve_relation`]).
    retyped: HashMap<String, (crate::decode::pgoutput::Relation, Vec<(String, String)>)>,
    /// When to look for tables that joined the publication next.
    next_publication_check: tokio::time::Instant,
}

/// How often a streaming session looks for tables that joined the publication.
const PUBLICATION_CHECK: Duration = Duration::from_secs(10);

impl<'a> Session<'a> {
    fn new(cfg: &'a Config, warehouse: Warehouse, mode: Mode) -> Self {
        Session {
            cfg,
            mode,
            applier: Some(Applier::new(warehouse.clone(), &cfg.source.slot)),
            warehouse,
            in_flight: None,
            batcher: Batcher::new(cfg.batch.clone()),
            assembler: Assembler::with_spill(SpillPolicy {
                dir: cfg.spill.dir.clone().into(),
                memory_bytes: cfg.spill.memory_bytes,
            }),
            frontier: Frontier::default(),
            freshness: Freshness::default(),
            summary: Summary::default(),
            streamed: false,
            sql: None,
            types: TypeResolver::default(),
            masks: Masks::new(&cfg.privacy),
            known: HashMap::new(),
            recopy: HashSet::new(),
            columns_seen: HashMap::new(),
            retyped: HashMap::new(),
            next_publication_check: tokio::time::Instant::now() + PUBLICATION_CHECK,
        }
    }

    fn sql(&self) -> Result<&tokio_postgres::Client, PipelineError> {
        self.sql.as_ref().ok_or_else(no_sql)
    }

    /// Makes sure the slot exists; when walden creates it, copies the published tables as of the
    /// slot's consistent point first (the initial snapshot). A snapshot cut short by a crash is
    /// recognised by its marker and started over with a new slot.
    async fn prepare(
        &self,
        sql: &tokio_postgres::Client,
        repl: &mut ReplicationConn,
    ) -> Result<source::Prepared, PipelineError> {
        let src = &self.cfg.source;
        let snapshots = self.cfg.snapshot.enabled;
        for table in crate::privacy::check_names(sql, &self.cfg.privacy, &src.publication).await? {
            tracing::warn!(table = %table, publication = %src.publication,
                "[privacy] names a table the publication does not publish: nothing of it reaches the warehouse");
        }
        if self.cfg.privacy.propagates() {
            let keyless = crate::privacy::keyless_subject_tables(sql, &self.cfg.privacy).await?;
            if !keyless.is_empty() {
                tracing::warn!(
                    hint = crate::privacy::KEYLESS_HINT,
                    "{}",
                    crate::privacy::keyless_warning(&keyless)
                );
            }
        }
        let markers = MarkerStore::new(&self.warehouse, &src.slot)?;
        let marker = markers.read().await?;
        let wal_status: Option<Option<String>> = sql
            .query_opt(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&src.slot],
            )
            .await
            .map_err(SourceError::from)?
            .map(|r| r.get(0));
        let mut slot_exists = wal_status.is_some();
        let recreate = self.cfg.slot.on_invalidated == OnInvalidated::Recreate && snapshots;
        if wal_status.flatten().as_deref() == Some("lost") && recreate {
            tracing::warn!(slot = %src.slot, "the server invalidated the slot (wal_status = lost) and \
                slot.on_invalidated = recreate: dropping it, creating it again and copying every published \
                table anew; the changelog misses the changes the server discarded");
            source::drop_slot(sql, &src.slot).await?;
            slot_exists = false;
        }
        let interrupted = marker
            .as_ref()
            .is_some_and(|m| m.state == SnapshotState::Copying);
        if slot_exists && interrupted && snapshots {
            tracing::warn!(slot = %src.slot, "the initial snapshot was interrupted; its exported snapshot is gone, \
                so the slot is dropped and the snapshot starts over");
            // prepare() waits for a dying holder to let go and refuses a slot held by another process.
            let _ = source::prepare(sql, repl, (src, &self.cfg.slot), false).await?;
            source::drop_slot(sql, &src.slot).await?;
        } else if slot_exists && interrupted {
            tracing::warn!(slot = %src.slot, "an initial snapshot was interrupted and snapshot.enabled = false: \
                tables it had not committed are missing from the warehouse; enable snapshots to redo it, \
                or `walden backfill --table T` each missing table");
        } else if !slot_exists && snapshots {
            // Written before the slot exists, so a crash between creating it and copying is
            // recognised as an interrupted snapshot.
            markers
                .write(&SnapshotMarker {
                    slot: src.slot.clone(),
                    state: SnapshotState::Copying,
                    lsn: String::new(),
                    tables: Vec::new(),
                })
                .await?;
        }
        let mut prepared = source::prepare(sql, repl, (src, &self.cfg.slot), snapshots).await?;
        if let Some(name) = prepared.snapshot_name.take() {
            let tables = published_tables(sql, &src.publication).await?;
            let names: Vec<String> = tables.iter().map(|t| t.qualified()).collect();
            let mut m = SnapshotMarker {
                slot: src.slot.clone(),
                state: SnapshotState::Copying,
                lsn: prepared.start.to_string(),
                tables: names,
            };
            markers.write(&m).await?;
            HEALTH.set(Phase::Snapshotting);
            crate::snapshot::copy_tables(
                self.cfg,
                &self.warehouse,
                &name,
                prepared.start,
                &tables,
                true,
            )
            .await?;
            m.state = SnapshotState::Done;
            markers.write(&m).await?;
        }
        Ok(prepared)
    }

    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), PipelineError> {
        let src = &self.cfg.source;
        self.sql = Some(source::connect_sql(src).await?);
        let pg = source::connection_config(src)?;
        let mut repl = ReplicationConn::connect(&pg, src.receive_buffer_bytes).await?;
        let prepared = self.prepare(self.sql()?, &mut repl).await?;
        self.frontier = Frontier::new(prepared.start);
        self.check_catalog().await?;
        let target = match self.mode {
            Mode::Once => Some(source::current_wal_lsn(self.sql()?).await?),
            Mode::Continuous => None,
        };
        let mut stream = repl
            .start_replication(
                &src.slot,
                &src.publication,
                Lsn(0),
                source::StreamTiming {
                    status_interval: Duration::from_millis(src.status_interval_ms.max(100)),
                    receive_timeout: (src.receive_timeout_s > 0)
                        .then(|| Duration::from_secs(src.receive_timeout_s)),
                },
            )
            .await?;
        self.streamed = true;
        HEALTH.set(Phase::Streaming);
        let _watch = source::watch::start(src, &self.cfg.slot);
        self.freshness.confirmed(prepared.start);
        tracing::info!(slot = %src.slot, from = %prepared.start, target = ?target.map(|t| t.to_string()), "streaming");
        let marker = match target {
            Some(t) if t > prepared.start => source::emit_marker(self.sql()?, "drain").await,
            _ => None,
        };
        let mut done = target.is_some_and(|t| t <= prepared.start);
        let result = match self
            .stream_loop(&mut stream, &mut shutdown, target, marker, &mut done)
            .await
        {
            Ok(()) => match self.start_flush(&stream).await {
                Ok(()) => self.finish_flush(&stream).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Some(h) = self.in_flight.take() {
            // Never leave a flush running behind the next session's back.
            let _ = h.await;
        }
        if result.is_ok() {
            self.summary.confirmed = stream.confirmed();
            stream.close().await?;
        }
        result
    }

    async fn stream_loop(
        &mut self,
        stream: &mut ReplicationStream,
        shutdown: &mut watch::Receiver<bool>,
        target: Option<Lsn>,
        marker: Option<Lsn>,
        done: &mut bool,
    ) -> Result<(), PipelineError> {
        while !*done {
            let due = self.batcher.due_in();
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    HEALTH.set(Phase::Stopping);
                    tracing::info!("shutdown requested: flushing and confirming");
                    return Ok(());
                }
                done = async { self.in_flight.as_mut().expect("guarded by precondition").await },
                    if self.in_flight.is_some() => {
                    self.in_flight = None;
                    self.complete(join(done)?, stream)?;
                    if self.batcher.should_flush() {
                        self.start_flush(stream).await?;
                    }
                }
                _ = async { tokio::time::sleep(due.unwrap_or_default()).await },
                    if due.is_some() && self.in_flight.is_none() => {
                    self.start_flush(stream).await?;
                }
                _ = tokio::time::sleep_until(self.next_publication_check),
                    if self.in_flight.is_none() && self.batcher.is_empty() => {
                    self.check_catalog().await?;
                }
                msgs = stream.recv() => {
                    let Some(msgs) = msgs else {
                        return Err(SourceError::Io(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof, "replication stream ended")).into());
                    };
                    for msg in msgs? {
                        let event = self.assembler.push(msg)?;
                        if let Some((relation, before)) = self.assembler.take_fresh_relation() {
                            self.resolve_relation(stream, relation, before).await?;
                        }
                        match event {
                            Some(Event::Commit(mut txn)) => {
                                let (commit, end) = (txn.commit_lsn, txn.end_lsn);
                                self.summary.transactions += 1;
                                METRICS.transactions_total.inc();
                                let touched = if txn.changes.is_spilled()
                                    || txn.changes.remaining() > self.cfg.batch.max_rows
                                {
                                    self.push_large(stream, &mut txn).await?
                                } else {
                                    let changes = txn.take_changes()?;
                                    self.count(changes.len());
                                    self.batcher.push(&txn, changes, 0)
                                };
                                self.frontier.received(commit, end, touched.iter().map(String::as_str));
                                self.freshness.received(end, txn.commit_ts_us);
                                METRICS.received_lsn.set(end.0 as i64);
                                if target.is_some_and(|t| end >= t) {
                                    *done = true;
                                }
                                // While a flush is under way keep receiving (up to the hard
                                // limit); the next flush starts when that one is done.
                                if (self.batcher.should_flush() && self.in_flight.is_none())
                                    || self.batcher.over_hard_limit()
                                {
                                    self.start_flush(stream).await?;
                                } else if !self.frontier.has_pending() {
                                    self.confirm(stream);
                                }
                            }
                            Some(Event::Idle(lsn)) => {
                                self.frontier.idle_at(lsn);
                                if !self.frontier.has_pending() {
                                    self.confirm(stream);
                                }
                                if target.is_some_and(|t| lsn >= t) {
                                    *done = true;
                                }
                            }
                            Some(Event::Marker { lsn, .. }) => {
                                // A drain marker, or a heartbeat (slot.heartbeat_interval_s).
                                self.frontier.idle_at(lsn);
                                if !self.frontier.has_pending() {
                                    self.confirm(stream);
                                }
                                if marker.is_some_and(|m| lsn >= m) {
                                    *done = true;
                                }
                            }
                            None => {}
                        }
                    }
                    METRICS.buffered_changes.set(self.batcher.rows() as i64);
                }
            }
        }
        Ok(())
    }

    fn count(&mut self, changes: usize) {
        self.summary.changes += changes as u64;
        METRICS.changes_total.inc_by(changes as u64);
    }

    /// Buffers a transaction too large for one batch: everything received before it is made
    /// durable first, then its changes go out a part at a time (a batch's rows, at most half
    /// the spill budget's bytes), each flush recording how far
    /// into the transaction it got (`Applied::partial`); the last part stays buffered like a
    /// whole transaction. Returns the tables that part touched. Nothing of it is confirmed until
    /// the last part is durable: after a crash the slot sends it again and each table skips the
    /// changes it has. The next part is read while one applies, so two parts' changes may be
    /// in memory at once (hence half the budget each).
    async fn push_large(
        &mut self,
        stream: &ReplicationStream,
        txn: &mut Transaction,
    ) -> Result<Vec<String>, PipelineError> {
        tracing::info!(xid = txn.xid, lsn = %txn.commit_lsn, changes = txn.changes.remaining(),
            spilled = txn.changes.is_spilled(), "large transaction: applying it in parts");
        self.start_flush(stream).await?;
        self.finish_flush(stream).await?;
        // A part's decoded changes take at most half the transaction memory budget: the next
        // part is read while one is planned and written.
        let part = self.cfg.batch.max_rows.max(1);
        let part_bytes = (self.cfg.spill.memory_bytes / 2).min(self.cfg.batch.max_bytes);
        let mut seq = 0i64;
        let mut touched = self.push_part(txn, part, part_bytes, &mut seq)?;
        while !txn.changes.is_done() {
            self.batcher.mark_partial();
            self.start_flush(stream).await?;
            // The next part is read from the spill file and buffered while this one applies.
            let (applied, left) = (seq, txn.changes.remaining());
            touched = self.push_part(txn, part, part_bytes, &mut seq)?;
            self.finish_flush(stream).await?;
            METRICS.large_transaction_parts_total.inc();
            tracing::info!(xid = txn.xid, lsn = %txn.commit_lsn, changes_applied = applied,
                changes_left = left, "large transaction: part durable");
            crate::checkpoint::failpoint("after-large-part");
        }
        // The last part stays buffered like a whole transaction.
        Ok(touched)
    }

    /// Buffers the next part of `txn` (changes from number `seq` on, which it advances);
    /// returns the tables it touches.
    fn push_part(
        &mut self,
        txn: &mut Transaction,
        rows: usize,
        bytes: usize,
        seq: &mut i64,
    ) -> Result<Vec<String>, PipelineError> {
        let changes = txn.changes.next_chunk(rows, bytes)?;
        let n = changes.len();
        self.count(n);
        let touched = self.batcher.push(txn, changes, *seq);
        *seq += n as i64;
        Ok(touched)
    }

    /// Confirms to the server what the frontier allows; returns it.
    fn confirm(&mut self, stream: &ReplicationStream) -> Lsn {
        let lsn = self.frontier.confirmable();
        stream.confirm(lsn);
        self.freshness.confirmed(lsn);
        lsn
    }

    /// Hands everything buffered to a background flush, after waiting for the one under way.
    async fn start_flush(&mut self, stream: &ReplicationStream) -> Result<(), PipelineError> {
        if self.batcher.is_empty() {
            if !self.frontier.has_pending() {
                self.confirm(stream);
            }
            return Ok(());
        }
        self.finish_flush(stream).await?;
        if self
            .batcher
            .relations()
            .any(|(t, oid)| self.known.get(t) != Some(&oid) || self.recopy.contains(t))
        {
            self.adopt_new_tables().await?;
            // Tables outside the publication's list (dropped from it meanwhile) are not asked
            // about again.
            let seen: Vec<(String, u32)> = self
                .batcher
                .relations()
                .map(|(t, oid)| (t.clone(), oid))
                .collect();
            for (t, oid) in seen {
                self.known.entry(t).or_insert(oid);
            }
        }
        let mut applier = self.applier.take().ok_or_else(no_applier)?;
        let rows = self.batcher.rows();
        let mut tables = self.batcher.take();
        // Only while snapshots keep every generation copied (see adopt_new_tables).
        if self.cfg.snapshot.enabled {
            for (name, buf) in tables.iter_mut() {
                buf.generation = self.known.get(name).copied();
            }
        }
        self.frontier.begin_flush();
        METRICS.buffered_changes.set(0);
        self.in_flight = Some(tokio::spawn(async move {
            let started = Instant::now();
            let mut durable = Vec::with_capacity(tables.len());
            let mut error = None;
            // A table that failed does not hold the others back; the first error is reported.
            for (name, buf) in tables {
                let ops = operations(&buf);
                match applier.apply(&name, buf).await {
                    Ok(stats) => durable.push((name, stats, ops)),
                    Err(e) => error = error.or(Some(e)),
                }
            }
            FlushDone {
                applier,
                durable,
                error,
                rows,
                started,
            }
        }));
        Ok(())
    }

    /// Waits for the flush under way, if any, and confirms what it made durable.
    async fn finish_flush(&mut self, stream: &ReplicationStream) -> Result<(), PipelineError> {
        match self.in_flight.take() {
            Some(h) => self.complete(join(h.await)?, stream),
            None => Ok(()),
        }
    }

    /// Books a finished flush: marks its tables durable, then confirms what the frontier allows.
    fn complete(
        &mut self,
        done: FlushDone,
        stream: &ReplicationStream,
    ) -> Result<(), PipelineError> {
        self.applier = Some(done.applier);
        for (name, stats, ops) in &done.durable {
            self.frontier.durable(name);
            book(name, stats, ops);
        }
        if let Some(e) = done.error {
            return Err(e.into());
        }
        crate::checkpoint::failpoint("before-confirm");
        let confirm = self.confirm(stream);
        METRICS.flushes_total.inc();
        METRICS
            .flush_duration_seconds
            .observe(done.started.elapsed().as_secs_f64());
        tracing::debug!(rows = done.rows, tables = done.durable.len(), confirmed = %confirm,
            elapsed = ?done.started.elapsed(), "flushed");
        Ok(())
    }
}

fn no_sql() -> PipelineError {
    PipelineError::Internal("no SQL connection".into())
}

/// The Applier, which only a flush under way holds.
fn idle(applier: &mut Option<Applier>) -> Result<&mut Applier, PipelineError> {
    applier.as_mut().ok_or_else(no_applier)
}

fn no_applier() -> PipelineError {
    PipelineError::Internal("applier missing with no flush under way".into())
}

/// A flush task's result; a panic inside it is re-raised here.
fn join(r: Result<FlushDone, tokio::task::JoinError>) -> Result<FlushDone, PipelineError> {
    match r {
        Ok(done) => Ok(done),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(PipelineError::Internal(format!("flush task: {e}"))),
    }
}
