//! The streaming pipeline: slot → decoder → batches → Delta tables → confirmed LSN.
//!
//! Owns the run loop and its error policy: transient errors (lost connection, object-store
//! hiccups) reconnect with backoff and resume from the slot, which re-sends everything not yet
//! confirmed; definite errors stop with a message for the operator. Shutdown (SIGTERM/SIGINT)
//! flushes whole transactions, confirms, and ends the replication session cleanly.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::apply::{Applier, ApplyError};
use crate::batch::Batcher;
use crate::checkpoint::{Frontier, Lsn};
use crate::config::Config;
use crate::decode::pgoutput::DecodeError;
use crate::decode::txn::{Assembler, Event};
use crate::sink::{SinkError, Warehouse};
use crate::source::{self, ReplicationConn, ReplicationStream, SourceError};
use crate::telemetry::METRICS;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot decode the replication stream: {0}")]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

impl PipelineError {
    pub fn is_transient(&self) -> bool {
        match self {
            PipelineError::Source(e) => e.is_transient(),
            PipelineError::Apply(e) => e.is_transient(),
            PipelineError::Sink(e) => e.is_transient(),
            PipelineError::Decode(_) => false,
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
    let warehouse = Warehouse::new(&cfg.warehouse)?;
    let mut backoff = Duration::from_millis(500);
    let mut total = Summary::default();
    // Until the first session got as far as streaming, errors stop the run: a wrong URL or a
    // server that is not there should say so at once, not retry forever.
    let mut ever_streamed = false;
    loop {
        let mut session = Session::new(cfg, warehouse.clone(), mode);
        let result = session.run(shutdown.clone()).await;
        total.transactions += session.summary.transactions;
        total.changes += session.summary.changes;
        total.confirmed = total.confirmed.max(session.summary.confirmed);
        ever_streamed |= session.streamed;
        match result {
            Ok(()) => return Ok(total),
            Err(e) if e.is_transient() && ever_streamed && !*shutdown.borrow() => {
                METRICS.errors_total.with_label_values(&["transient"]).inc();
                tracing::warn!(error = %e, retry_in = ?backoff, "transient error; reconnecting");
                let mut sd = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = sd.changed() => return Ok(total),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                if session.streamed {
                    backoff = Duration::from_millis(500);
                }
            }
            Err(e) => {
                METRICS.errors_total.with_label_values(&["definite"]).inc();
                return Err(e);
            }
        }
    }
}

/// One connection's worth of streaming.
struct Session<'a> {
    cfg: &'a Config,
    mode: Mode,
    applier: Applier,
    batcher: Batcher,
    assembler: Assembler,
    frontier: Frontier,
    summary: Summary,
    /// The session got as far as START_REPLICATION.
    streamed: bool,
}

impl<'a> Session<'a> {
    fn new(cfg: &'a Config, warehouse: Warehouse, mode: Mode) -> Self {
        Session {
            cfg,
            mode,
            applier: Applier::new(warehouse, &cfg.source.slot),
            batcher: Batcher::new(cfg.batch.clone()),
            assembler: Assembler::new(),
            frontier: Frontier::default(),
            summary: Summary::default(),
            streamed: false,
        }
    }

    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), PipelineError> {
        let src = &self.cfg.source;
        let sql = source::connect_sql(src).await?;
        let pg = source::parse_url(&src.url)?;
        let mut repl =
            ReplicationConn::connect(&pg, Duration::from_secs(src.connect_timeout_s)).await?;
        let prepared = source::prepare(&sql, &mut repl, src).await?;
        self.frontier = Frontier::new(prepared.start);
        let target = match self.mode {
            Mode::Once => Some(source::current_wal_lsn(&sql).await?),
            Mode::Continuous => None,
        };
        let mut stream = repl
            .start_replication(
                &src.slot,
                &src.publication,
                Lsn(0),
                Duration::from_millis(src.status_interval_ms.max(100)),
            )
            .await?;
        self.streamed = true;
        tracing::info!(slot = %src.slot, from = %prepared.start, target = ?target.map(|t| t.to_string()), "streaming");
        let marker = match target {
            Some(t) if t > prepared.start => source::emit_marker(&sql, "drain").await,
            _ => None,
        };
        let mut done = target.is_some_and(|t| t <= prepared.start);
        let result = self
            .stream_loop(&mut stream, &mut shutdown, target, marker, &mut done)
            .await;
        if result.is_ok() {
            self.flush(&stream).await?;
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
                    tracing::info!("shutdown requested: flushing and confirming");
                    return Ok(());
                }
                _ = async { tokio::time::sleep(due.unwrap_or_default()).await }, if due.is_some() => {
                    self.flush(stream).await?;
                }
                msgs = stream.recv() => {
                    let Some(msgs) = msgs else {
                        return Err(SourceError::Io(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof, "replication stream ended")).into());
                    };
                    for msg in msgs? {
                        match self.assembler.push(msg)? {
                            Some(Event::Commit(txn)) => {
                                let (commit, end) = (txn.commit_lsn, txn.end_lsn);
                                self.summary.transactions += 1;
                                self.summary.changes += txn.changes.len() as u64;
                                METRICS.transactions_total.inc();
                                METRICS.changes_total.inc_by(txn.changes.len() as u64);
                                let touched = self.batcher.push(txn);
                                self.frontier.received(commit, end, touched.iter().map(String::as_str));
                                METRICS.received_lsn.set(end.0 as i64);
                                if target.is_some_and(|t| end >= t) {
                                    *done = true;
                                }
                                if self.batcher.should_flush() {
                                    self.flush(stream).await?;
                                } else if !self.frontier.has_pending() {
                                    stream.confirm(self.frontier.confirmable());
                                }
                            }
                            Some(Event::Idle(lsn)) => {
                                self.frontier.idle_at(lsn);
                                if !self.frontier.has_pending() {
                                    stream.confirm(self.frontier.confirmable());
                                }
                                if target.is_some_and(|t| lsn >= t) {
                                    *done = true;
                                }
                            }
                            Some(Event::Marker { lsn, .. }) => {
                                self.frontier.idle_at(lsn);
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

    /// Makes every buffered transaction durable, then confirms what the frontier allows.
    async fn flush(&mut self, stream: &ReplicationStream) -> Result<(), PipelineError> {
        if self.batcher.is_empty() {
            stream.confirm(self.frontier.confirmable());
            return Ok(());
        }
        let started = Instant::now();
        let rows = self.batcher.rows();
        let tables = self.batcher.take();
        for (name, buf) in &tables {
            let stats = self.applier.apply(name, buf).await?;
            self.frontier.durable(name);
            METRICS
                .rows_written_total
                .with_label_values(&["changes"])
                .inc_by(stats.changelog_rows as u64);
            METRICS
                .rows_written_total
                .with_label_values(&["mirror"])
                .inc_by(stats.mirror_rows as u64);
            METRICS
                .skipped_changes_total
                .inc_by(stats.skipped_rows as u64);
            if stats.unrepresentable > 0 {
                METRICS
                    .unrepresentable_values_total
                    .inc_by(stats.unrepresentable);
                tracing::warn!(table = %name, values = stats.unrepresentable,
                    "values with no Arrow representation (numeric NaN, infinite dates) were stored as NULL");
            }
        }
        crate::checkpoint::failpoint("before-confirm");
        let confirm = self.frontier.confirmable();
        stream.confirm(confirm);
        METRICS.confirmed_lsn.set(confirm.0 as i64);
        METRICS.flushes_total.inc();
        METRICS
            .flush_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        METRICS.buffered_changes.set(0);
        tracing::debug!(rows, tables = tables.len(), confirmed = %confirm, elapsed = ?started.elapsed(), "flushed");
        Ok(())
    }
}
