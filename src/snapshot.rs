//! Snapshots and backfills: copying whole tables consistently with the stream.
//!
//! Owns the copy of a set of tables under one exported snapshot: the chunk queue shared by
//! `[snapshot] parallelism` worker connections, progress (rows, rate, ETA on a terminal, in the
//! log and as metrics), and the per-table commits once every chunk of a table is written (see
//! [`crate::apply::snapshot`] for why a table becomes visible all at once). Used by `walden run`
//! when it creates its slot, and by `walden backfill`.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deltalake::kernel::Add;
use tokio::sync::mpsc;

use crate::apply::snapshot::{commit_table, ChunkWriter, SnapshotTarget};
use crate::apply::{app_id, ApplyError};
use crate::checkpoint::Lsn;
use crate::config::Config;
use crate::decode::mask::Masks;
use crate::sink::{SinkError, Warehouse};
use crate::source::snapshot::{describe, plan_chunks, Chunk, Published, SnapshotReader, TableSpec};
use crate::source::{connect_sql, SourceError};
use crate::telemetry::METRICS;

/// Rows handed from a COPY to the Parquet writers at a time.
const ROWS_PER_BATCH: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Apply(Box<ApplyError>),
    #[error(transparent)]
    Sink(Box<SinkError>),
    #[error("building Arrow batches for {table}: {source}")]
    Arrow {
        table: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    #[error("a snapshot worker stopped: {0}")]
    Worker(String),
}

impl From<ApplyError> for SnapshotError {
    fn from(e: ApplyError) -> Self {
        SnapshotError::Apply(Box::new(e))
    }
}

impl From<SinkError> for SnapshotError {
    fn from(e: SinkError) -> Self {
        SnapshotError::Sink(Box::new(e))
    }
}

impl SnapshotError {
    /// A snapshot cannot be resumed once its exporting session is gone, so even a transient
    /// failure means starting over; the caller decides whether to.
    pub fn is_transient(&self) -> bool {
        match self {
            SnapshotError::Source(e) => e.is_transient(),
            SnapshotError::Apply(e) => e.is_transient(),
            SnapshotError::Sink(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// What a snapshot copied.
#[derive(Debug, Default, Clone)]
pub struct SnapshotStats {
    pub tables: usize,
    pub rows: u64,
    pub chunks: usize,
    pub unrepresentable: u64,
    pub seconds: f64,
}

struct ChunkDone {
    table: usize,
    rows: u64,
    changes: Vec<Add>,
    mirror: Vec<Add>,
}

/// Copies `tables` consistently with the stream, beside it: a temporary slot created with
/// `EXPORT_SNAPSHOT` gives a snapshot at its consistent point P without touching walden's slot;
/// the tables are copied under it and their mirrors committed as "applied through P − 1", so the
/// stream skips their changes below P (which the copy holds) and applies the rest. Changelogs keep
/// their LSN: the stream still owes them the changes below P. The temporary slot goes with its
/// connection. Used by `walden backfill` and for tables that join the publication.
pub async fn copy_beside_stream(
    cfg: &Config,
    warehouse: &Warehouse,
    tables: &[Published],
) -> Result<SnapshotStats, SnapshotError> {
    let pg = crate::source::connection_config(&cfg.source)?;
    let mut repl =
        crate::source::ReplicationConn::connect(&pg, cfg.source.receive_buffer_bytes).await?;
    let temp = format!("{}_copy_{}", cfg.source.slot, std::process::id());
    let created = repl.create_slot(&temp, true, true).await?;
    let snapshot = created.snapshot_name.ok_or_else(|| {
        SnapshotError::Worker(format!("the server exported no snapshot for slot {temp}"))
    })?;
    let names: Vec<String> = tables.iter().map(Published::qualified).collect();
    tracing::info!(tables = ?names, at = %created.consistent_point, "copying tables beside the stream");
    let stats = copy_tables(
        cfg,
        warehouse,
        &snapshot,
        created.consistent_point,
        tables,
        false,
    )
    .await?;
    drop(repl);
    Ok(stats)
}

/// Copies `tables` as of the exported snapshot `snapshot_name` (taken at `consistent_point`)
/// into the warehouse and commits each table with its LSN set to `consistent_point − 1`.
pub async fn copy_tables(
    cfg: &Config,
    warehouse: &Warehouse,
    snapshot_name: &str,
    consistent_point: Lsn,
    tables: &[Published],
    initial: bool,
) -> Result<SnapshotStats, SnapshotError> {
    let started = Instant::now();
    // Workers import the snapshot first: it lives only while the exporting session is idle.
    let parallelism = cfg.snapshot.parallelism.max(1);
    let mut readers = Vec::with_capacity(parallelism);
    for _ in 0..parallelism {
        readers.push(SnapshotReader::open(&cfg.source, snapshot_name).await?);
    }
    let sql = connect_sql(&cfg.source).await?;
    let mut specs: Vec<TableSpec> = Vec::with_capacity(tables.len());
    let masks = Masks::new(&cfg.privacy);
    for table in tables {
        specs.push(describe(&sql, table, &masks).await?);
    }
    let ts_us = chrono::Utc::now().timestamp_micros();
    let mut targets = Vec::with_capacity(specs.len());
    let mut queue = VecDeque::new();
    let mut remaining = Vec::with_capacity(specs.len());
    let mut estimated = 0u64;
    for (i, spec) in specs.iter().enumerate() {
        targets.push(
            SnapshotTarget::open(warehouse, spec.relation.clone(), consistent_point, ts_us).await?,
        );
        let chunks = plan_chunks(i, spec, cfg.snapshot.chunk_rows);
        remaining.push(chunks.len());
        queue.extend(chunks);
        estimated += spec.estimated_rows;
    }
    let chunk_count = queue.len();
    tracing::info!(
        tables = specs.len(),
        chunks = chunk_count,
        estimated_rows = estimated,
        parallelism,
        at = %consistent_point,
        "snapshot starting"
    );
    METRICS.snapshot_rows_estimated.set(estimated as i64);
    METRICS.snapshot_tables_remaining.set(specs.len() as i64);

    let targets = Arc::new(targets);
    let queue = Arc::new(Mutex::new(queue));
    let copied = Arc::new(AtomicU64::new(0));
    let unrepresentable = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = mpsc::channel::<Result<ChunkDone, SnapshotError>>(parallelism * 2);
    let mut workers = Vec::new();
    for reader in readers {
        let (targets, queue, copied, bad, tx) = (
            targets.clone(),
            queue.clone(),
            copied.clone(),
            unrepresentable.clone(),
            tx.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let next = queue.lock().expect("queue lock").pop_front();
                let Some(chunk) = next else { break };
                let r = copy_chunk(&reader, &targets[chunk.table], &chunk, &copied, &bad).await;
                let failed = r.is_err();
                if tx.send(r).await.is_err() || failed {
                    break;
                }
            }
        }));
    }
    drop(tx);

    let mut adds: Vec<(Vec<Add>, Vec<Add>)> = vec![(Vec::new(), Vec::new()); targets.len()];
    let mut rows_per_table = vec![0u64; targets.len()];
    let mut progress = Progress::new(estimated);
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    let mut committed = 0usize;
    let result: Result<(), SnapshotError> = async {
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    let done = msg?;
                    let t = done.table;
                    adds[t].0.extend(done.changes);
                    adds[t].1.extend(done.mirror);
                    rows_per_table[t] += done.rows;
                    remaining[t] -= 1;
                    if remaining[t] == 0 {
                        let (c, m) = std::mem::take(&mut adds[t]);
                        commit_table(&targets[t], &app_id(&cfg.source.slot), c, m, initial).await?;
                        committed += 1;
                        METRICS.snapshot_tables_remaining.set((targets.len() - committed) as i64);
                        tracing::info!(table = %targets[t].name, rows = rows_per_table[t], "table snapshot committed");
                    }
                }
                _ = tick.tick() => progress.report(copied.load(Ordering::Relaxed)),
            }
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        for w in &workers {
            w.abort();
        }
    }
    for w in workers {
        let _ = w.await;
    }
    result?;
    progress.finish(copied.load(Ordering::Relaxed));
    if committed != targets.len() {
        return Err(SnapshotError::Worker(format!(
            "only {committed} of {} tables were copied",
            targets.len()
        )));
    }
    let stats = SnapshotStats {
        tables: targets.len(),
        rows: copied.load(Ordering::Relaxed),
        chunks: chunk_count,
        unrepresentable: unrepresentable.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        tables = stats.tables,
        rows = stats.rows,
        seconds = format!("{:.1}", stats.seconds),
        "snapshot complete"
    );
    Ok(stats)
}

async fn copy_chunk(
    reader: &SnapshotReader,
    target: &SnapshotTarget,
    chunk: &Chunk,
    copied: &AtomicU64,
    bad: &AtomicU64,
) -> Result<ChunkDone, SnapshotError> {
    let mut writer = ChunkWriter::new(target)?;
    let mut copy = reader.copy(&target.relation, chunk).await?;
    let mut offset = 0u64;
    while let Some((cols, n)) = copy.next_columns(&target.relation, ROWS_PER_BATCH).await? {
        let arrow = |source| SnapshotError::Arrow {
            table: target.name.clone(),
            source,
        };
        let (changelog, unrep) = target
            .changelog_batch(cols, n, chunk.index, offset)
            .map_err(arrow)?;
        offset += changelog.num_rows() as u64;
        bad.fetch_add(unrep, Ordering::Relaxed);
        copied.fetch_add(changelog.num_rows() as u64, Ordering::Relaxed);
        METRICS
            .snapshot_rows_total
            .inc_by(changelog.num_rows() as u64);
        METRICS.unrepresentable_values_total.inc_by(unrep);
        writer.write(changelog).await?;
    }
    let rows = copy.rows();
    let (changes, mirror) = writer.finish().await?;
    Ok(ChunkDone {
        table: chunk.table,
        rows,
        changes,
        mirror,
    })
}

/// Rows, rate and ETA: a line in the log every few seconds, redrawn in place on a terminal.
struct Progress {
    started: Instant,
    estimated: u64,
    tty: bool,
}

impl Progress {
    fn new(estimated: u64) -> Self {
        Progress {
            started: Instant::now(),
            estimated,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn report(&mut self, rows: u64) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = rows as f64 / secs;
        let eta = if rate > 0.0 && self.estimated > rows {
            format!("{:.0}s", (self.estimated - rows) as f64 / rate)
        } else {
            "-".into()
        };
        if self.tty {
            eprint!(
                "\rsnapshot: {rows} of ~{} rows, {:.0} rows/s, ETA {eta}   ",
                self.estimated, rate
            );
        }
        tracing::info!(rows, estimated = self.estimated, rows_per_second = rate as u64, eta = %eta, "snapshot progress");
    }

    fn finish(&mut self, rows: u64) {
        if self.tty {
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            eprintln!(
                "\rsnapshot: {rows} rows in {secs:.1}s ({:.0} rows/s)            ",
                rows as f64 / secs
            );
        }
    }
}
