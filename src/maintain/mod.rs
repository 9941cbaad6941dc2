//! Table maintenance: what keeps a warehouse under a steady stream from growing without bound.
//!
//! Owns, per Delta table: the rewrite of small files and of files mostly marked deleted into
//! bigger ones holding their live rows (`choose` picks them, `rewrite` writes them and commits
//! over the stream's commits meanwhile), the retention of old versions
//! (`delta.logRetentionDuration` and `delta.deletedFileRetentionDuration` set to
//! `maintenance.retention_hours`, so log cleanup at each checkpoint keeps hours, not the default
//! 30 days), and VACUUM of files the current version no longer references once they are older
//! than the retention (`vectors`: of deletion-vector files too). Checkpoints and log cleanup
//! follow the stream's commits every 100 versions (`apply::logs`).
//!
//! Maintenance commits change no data (`dataChange = false`) and record no position, so the
//! exactly-once records stay as they are: the log's newest application transaction per id is
//! carried by every checkpoint. A stream commit that races a rewrite is settled like any lost
//! race (`apply::settle`); a rewrite's commit is rebased onto the rows the stream marked
//! meanwhile, and deferred to the next round only when one of its files left the table.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use deltalake::operations::vacuum::VacuumMode;
use deltalake::{DeltaTable, DeltaTableError};
use url::Url;

pub mod choose;
pub mod rewrite;
mod vectors;

use rewrite::RewriteError;

use crate::apply::inspect;
use crate::config::MaintenanceConfig;
use crate::sink::{delta_is_transient, TableKind, Warehouse};
use crate::telemetry::METRICS;

/// Why a round could not start (each table's own failures are counted in its [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum MaintainError {
    #[error(transparent)]
    Inspect(#[from] inspect::InspectError),
}

/// What one round did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    pub tables: usize,
    pub compacted_tables: usize,
    pub files_removed: u64,
    pub files_added: u64,
    pub files_vacuumed: u64,
    /// Files rewritten without the rows their deletion vectors marked.
    pub files_purged: u64,
    /// Rows the stream marked deleted in files while they were rewritten, marked again in the
    /// files that took their place.
    pub rows_rebased: u64,
    /// Tables left for the next round (the time budget ran out, or a compaction lost a race to
    /// the stream's commit).
    pub deferred: usize,
    pub errors: usize,
}

/// One maintenance round over every table of the warehouse (or `only`, `schema.table`),
/// starting no table after `cfg.budget_s`.
pub async fn round(
    warehouse: &Warehouse,
    cfg: &MaintenanceConfig,
    only: Option<&str>,
) -> Result<Report, MaintainError> {
    let started = Instant::now();
    let budget = Duration::from_secs(cfg.budget_s);
    let mut report = Report::default();
    let tables = inspect::list_tables(warehouse).await?;
    for (schema, table) in tables {
        if only.is_some_and(|t| t != format!("{schema}.{table}")) {
            continue;
        }
        for kind in [TableKind::Changes, TableKind::Mirror] {
            if started.elapsed() > budget {
                report.deferred += 1;
                METRICS.maintenance_deferred_total.inc();
                continue;
            }
            let url = warehouse.table_url(kind, &schema, &table);
            let name = format!("{}/{schema}.{table}", kind.dir());
            match maintain_table(warehouse, &url, cfg, &mut report).await {
                Ok(()) => report.tables += 1,
                // A rewrite whose input left the table meanwhile, or a store hiccup.
                Err(e) if e.is_transient() => {
                    report.deferred += 1;
                    METRICS.maintenance_deferred_total.inc();
                    tracing::info!(table = %name, error = %e,
                        "maintenance did not get through; the next round tries again");
                }
                Err(e) => {
                    report.errors += 1;
                    METRICS.maintenance_errors_total.inc();
                    tracing::warn!(table = %name, error = %e,
                        "maintenance failed; the next round tries again");
                }
            }
        }
    }
    Ok(report)
}

/// Sets the retention, rewrites small and mostly deleted files, and vacuums one table.
async fn maintain_table(
    warehouse: &Warehouse,
    url: &Url,
    cfg: &MaintenanceConfig,
    report: &mut Report,
) -> Result<(), RewriteError> {
    let Some(mut table) = warehouse.open(url).await? else {
        return Ok(());
    };
    set_retention(&mut table, cfg.retention_hours).await?;
    let bins = choose::bins(&table, cfg)?;
    let started = Instant::now();
    let prepared = rewrite::prepare(&table, bins, Duration::from_secs(cfg.budget_s)).await?;
    if !prepared.is_empty() {
        let done = rewrite::commit(&mut table, prepared).await?;
        report.compacted_tables += 1;
        report.files_removed += done.files_removed;
        report.files_added += done.files_added;
        report.files_purged += done.files_purged;
        report.rows_rebased += done.rows_rebased;
        METRICS
            .maintenance_rows_rebased_total
            .inc_by(done.rows_rebased);
        let compacted = done.files_removed - done.files_purged;
        measured(("compacted", compacted), "compact", started);
        METRICS
            .maintenance_files_total
            .with_label_values(&["purged"])
            .inc_by(done.files_purged);
        tracing::info!(table = %url, removed = done.files_removed, added = done.files_added,
            purged = done.files_purged, rows_rebased = done.rows_rebased, lost = done.lost,
            "compacted");
    }
    let started = Instant::now();
    let deleted = vacuum(&mut table, cfg.retention_hours).await?;
    report.files_vacuumed += deleted;
    measured(("vacuumed", deleted), "vacuum", started);
    if deleted > 0 {
        tracing::info!(table = %url, files = deleted, "vacuumed");
    }
    Ok(())
}

/// Counts `files` under `action` and the time since `started` under `task`.
fn measured((action, files): (&str, u64), task: &str, started: Instant) {
    METRICS
        .maintenance_files_total
        .with_label_values(&[action])
        .inc_by(files);
    METRICS
        .maintenance_duration_seconds
        .with_label_values(&[task])
        .observe(started.elapsed().as_secs_f64());
}

/// Sets `table`'s retention of old versions and removed files to `hours` (a metadata commit, on
/// its newest version, when they differ).
pub async fn set_retention(table: &mut DeltaTable, hours: u64) -> Result<(), DeltaTableError> {
    let want = retention_properties(hours);
    let have = table.snapshot()?.metadata().configuration().clone();
    if want.iter().all(|(k, v)| have.get(k) == Some(v)) {
        return Ok(());
    }
    on_newest(table, |t| async {
        let t = t.set_tbl_properties().with_properties(want.clone()).await?;
        Ok((t, ()))
    })
    .await
}

/// VACUUM (lite) of `table`'s removed data files and unneeded deletion vectors older than
/// `hours`, on its newest version; returns how many files it deleted.
pub async fn vacuum(table: &mut DeltaTable, hours: u64) -> Result<u64, DeltaTableError> {
    let m = on_newest(table, |t| {
        t.vacuum()
            .with_retention_period(chrono::Duration::hours(hours as i64))
            .with_enforce_retention_duration(false)
            .with_mode(VacuumMode::Lite)
            .into_future()
    })
    .await?;
    Ok(m.files_deleted.len() as u64 + vectors::vacuum(table, hours).await?)
}

/// The table properties that keep old versions and removed files `hours`: the log retention
/// and the deleted-file retention.
fn retention_properties(hours: u64) -> HashMap<String, String> {
    let want = format!("interval {hours} hours");
    [
        "delta.logRetentionDuration",
        "delta.deletedFileRetentionDuration",
    ]
    .iter()
    .map(|k| (k.to_string(), want.clone()))
    .collect()
}

/// Runs `op`, a commit of maintenance's own that changes no rows (a table property, VACUUM's
/// start and end), on `table`'s newest version, and again on the next one when a commit of the
/// stream got there first: deltalake counts every file of the version read as read, so a flush
/// that marked rows in any of them conflicts, and under an update stream one flush a second
/// would otherwise keep these from ever committing.
async fn on_newest<T, F, Fut>(table: &mut DeltaTable, op: F) -> Result<T, DeltaTableError>
where
    F: Fn(DeltaTable) -> Fut,
    Fut: std::future::Future<Output = Result<(DeltaTable, T), DeltaTableError>>,
{
    let mut attempt = 1;
    loop {
        table.update_state().await?;
        match op(table.clone()).await {
            Ok((t, out)) => {
                *table = t;
                return Ok(out);
            }
            Err(e) if delta_is_transient(&e) && attempt < rewrite::ATTEMPTS => {
                tracing::debug!(attempt, error = %e, "a maintenance commit lost a race; again");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Retention while the stream runs, at the least: the stream's view of a table is never this
/// old, so no file or log entry it may still read is deleted under it.
pub const STREAMING_RETENTION_HOURS: u64 = 1;

/// Maintenance in the background of `walden run`: a round every `cfg.interval_s`, until the
/// returned handle is dropped. Retention is at least [`STREAMING_RETENTION_HOURS`].
///
/// Rounds run on a thread of their own with a runtime of their own, at a lower CPU priority
/// (nice [`NICENESS`]): a compaction reads and writes far more than a flush, and on a small
/// machine it would otherwise take the cores the stream's flushes need (measured: the tail of
/// the commit-to-visible latency under `pgbench`).
pub fn start(warehouse: Warehouse, mut cfg: MaintenanceConfig) -> Background {
    if cfg.retention_hours < STREAMING_RETENTION_HOURS {
        tracing::warn!(
            configured = cfg.retention_hours,
            used = STREAMING_RETENTION_HOURS,
            "maintenance.retention_hours is below what a running stream needs; using the minimum \
             (a lower retention is for `walden maintain` while walden is stopped)"
        );
        cfg.retention_hours = STREAMING_RETENTION_HOURS;
    }
    let every = Duration::from_secs(cfg.interval_s.max(1));
    background("walden-maintain", every, move || {
        let (warehouse, cfg) = (warehouse.clone(), cfg.clone());
        async move {
            let started = Instant::now();
            match round(&warehouse, &cfg, None).await {
                Ok(r) => {
                    METRICS.maintenance_rounds_total.inc();
                    tracing::debug!(report = ?r, elapsed = ?started.elapsed(), "maintenance round");
                }
                Err(e) => tracing::warn!(error = %e, "maintenance round failed"),
            }
        }
    })
}

/// Runs `task` every `every` on a thread of its own (`name`) with a current-thread runtime of
/// its own, at a lower CPU priority (nice [`NICENESS`]), until the returned handle is dropped.
/// Used by maintenance and by the erasure of deleted subjects (`privacy::propagate`).
pub fn background<F, Fut>(name: &str, every: Duration, mut task: F) -> Background
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // SAFETY: setpriority on the calling thread (a Linux thread id is a process id for
            // it); failing leaves the thread at the process's priority.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::setpriority(libc::PRIO_PROCESS, tid, NICENESS);
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "background work could not start");
                    return;
                }
            };
            runtime.block_on(async move {
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                    tokio::select! {
                        _ = &mut stopped => return,
                        () = task() => {}
                    }
                }
            });
        });
    match thread {
        Ok(t) => Background(Some((stop, t))),
        Err(e) => {
            tracing::warn!(error = %e, "background work could not start");
            Background(None)
        }
    }
}

/// The nice value of the maintenance thread (0 is the process's; 19 the lowest priority).
pub const NICENESS: libc::c_int = 10;

/// The background maintenance of a run; it stops when dropped (a round in progress is cut
/// short: its commit either happened or did not).
pub struct Background(
    Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
);

impl Drop for Background {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.0.take() {
            let _ = stop.send(());
            // Not joined: the thread ends at its next await point, and the process may be
            // ending anyway.
            drop(thread);
        }
    }
}
