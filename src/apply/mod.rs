//! Applying batches to the Delta tables, exactly once.
//!
//! Owns, per source table, its changelog and mirror Delta tables and the source commit LSN each one
//! has durably applied. That LSN is stored in the same atomic Delta commit as the data, as the
//! application transaction `walden:<slot>`; on start it is read back and every change at or below
//! it is skipped. The changelog is appended; the mirror gets the batch's [`MirrorPlan`]
//! (`crate::plan`), carried out by [`mirror::execute`], or, for insert-only batches whose changelog
//! files were just written, files projected from those. Where the changelog's rows are exactly
//! the plan's new row versions, the executor adds those files projected too (its removes located
//! meanwhile).
//!
//! [`MirrorPlan`]: crate::plan::MirrorPlan

pub mod evolve;
pub mod files;
pub mod inspect;
pub mod keys;
pub mod locate;
mod logs;
mod matcher;
pub mod mirror;
mod settle;
pub mod snapshot;

use std::collections::HashMap;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{Add, Transaction};
use deltalake::{DeltaTable, DeltaTableError};
use tokio::task::JoinHandle;

use crate::batch::{changelog_batch, changelog_schema, mirror_schema, TableBuffer};
use crate::checkpoint::{Applied, Lsn};
use crate::decode::pgoutput::Relation;
use crate::decode::txn::ChangeKind;
use crate::plan::mirror_plan;
use crate::sink::schemas::{ColumnVersion, SchemaHistory, SchemaVersion};
use crate::sink::{delta_is_transient, writer_properties, SinkError, TableKind, Warehouse};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Sink(Box<SinkError>),
    #[error("building the Arrow batch for {table}: {source}")]
    Arrow {
        table: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    #[error("applying to {table}: {source}")]
    Delta {
        table: String,
        #[source]
        source: DeltaTableError,
    },
    #[error("column {column} of {table} changed type at the source from {from} to {to}, which the \
        warehouse cannot follow exactly (it widens integers, real to double, numeric precision, and \
        integers/numerics to text; other changes rewrite values with the ALTER's USING expression, \
        which only Postgres knows). To go on: stop walden, move the table's directories \
        changes/<schema>/<table> and mirror/<schema>/<table> aside, and run `walden backfill --table {table}`")]
    IncompatibleType {
        table: String,
        column: String,
        from: String,
        to: String,
    },
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("writing the changelog of {table}: the task ended abnormally: {reason}")]
    Task { table: String, reason: String },
}

/// Errors of one table, with its name.
pub(crate) struct TableErr<'a>(pub &'a str);

impl TableErr<'_> {
    pub fn delta(&self, source: DeltaTableError) -> ApplyError {
        ApplyError::Delta {
            table: self.0.to_string(),
            source,
        }
    }

    pub fn arrow(&self, source: arrow::error::ArrowError) -> ApplyError {
        ApplyError::Arrow {
            table: self.0.to_string(),
            source,
        }
    }
}

impl From<SinkError> for ApplyError {
    fn from(e: SinkError) -> Self {
        ApplyError::Sink(Box::new(e))
    }
}

impl ApplyError {
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Sink(e) => e.is_transient(),
            ApplyError::Delta { source, .. } => delta_is_transient(source),
            _ => false,
        }
    }
}

/// What one flush of one table did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyStats {
    pub changelog_rows: usize,
    pub mirror_rows: usize,
    pub skipped_rows: usize,
    pub unrepresentable: u64,
    /// Updates and deletes of a table without a replica identity (changelog only).
    pub unidentified: usize,
    /// Changes that named a mirror row that was not there (the mirror had diverged).
    pub missing: usize,
}

struct Pair {
    changes: DeltaTable,
    changes_at: Applied,
    mirror: DeltaTable,
    mirror_at: Applied,
    /// The newest schema version recorded for the table.
    schema: Option<SchemaVersion>,
    /// Where the mirror's integer identity values sit in its files.
    keys: keys::KeyIndex,
    /// Checkpoints and log cleanup of the two tables.
    logs: [logs::LogKeeper; 2],
}

pub struct Applier {
    warehouse: Warehouse,
    app_id: String,
    tables: HashMap<String, Pair>,
    history: Option<SchemaHistory>,
}

/// Reads the LSN recorded by application transaction `app_id` (0 when none).
pub async fn applied_lsn(table: &DeltaTable, app_id: &str) -> Result<Lsn, DeltaTableError> {
    let v = table
        .snapshot()?
        .transaction_version(table.log_store().as_ref(), app_id)
        .await?;
    Ok(Lsn(v.unwrap_or(0).max(0) as u64))
}

/// Reads how far the table has applied: the LSN of `app_id`, and the part of a larger
/// transaction recorded beside it (see [`Applied`]).
pub async fn applied(table: &DeltaTable, app_id: &str) -> Result<Applied, DeltaTableError> {
    let lsn = applied_lsn(table, app_id).await?;
    let partial_lsn = applied_lsn(table, &partial_lsn_id(app_id)).await?;
    let seq = table
        .snapshot()?
        .transaction_version(table.log_store().as_ref(), &partial_seq_id(app_id))
        .await?;
    Ok(Applied {
        lsn,
        partial: seq.filter(|_| partial_lsn > lsn).map(|s| (partial_lsn, s)),
    })
}

pub(crate) fn schema_differs(table: &DeltaTable, want: &SchemaRef) -> bool {
    let Ok(state) = table.snapshot() else {
        return true;
    };
    let have = state.snapshot().arrow_schema();
    have.fields().len() != want.fields().len()
        || have
            .fields()
            .iter()
            .zip(want.fields())
            .any(|(a, b)| a.name() != b.name() || a.data_type() != b.data_type())
}

impl Applier {
    pub fn new(warehouse: Warehouse, slot: &str) -> Self {
        Applier {
            warehouse,
            app_id: app_id(slot),
            tables: HashMap::new(),
            history: None,
        }
    }

    /// Opens (or creates) both Delta tables of the buffer's table and reads their LSNs.
    async fn pair(&mut self, name: &str, rel: &Relation) -> Result<&mut Pair, ApplyError> {
        if self.history.is_none() {
            self.history = Some(SchemaHistory::new(&self.warehouse)?);
        }
        if !self.tables.contains_key(name) {
            let cu = self
                .warehouse
                .table_url(TableKind::Changes, &rel.schema, &rel.name);
            let mu = self
                .warehouse
                .table_url(TableKind::Mirror, &rel.schema, &rel.name);
            let changes = self
                .warehouse
                .open_or_create(&cu, &changelog_schema(rel), name)
                .await?;
            let mirror = self
                .warehouse
                .open_mirror(&mu, &mirror_schema(rel), name)
                .await?;
            let delta = |source| ApplyError::Delta {
                table: name.to_string(),
                source,
            };
            let changes_at = applied(&changes, &self.app_id).await.map_err(delta)?;
            let mirror_at = applied(&mirror, &self.app_id).await.map_err(delta)?;
            tracing::info!(table = name, changelog = %changes_at, mirror = %mirror_at, "opened Delta tables");
            if !rel.columns.iter().any(|c| c.key) {
                tracing::warn!(table = name, "the table has no replica identity (REPLICA IDENTITY NOTHING, \
                    or DEFAULT without a primary key): Postgres refuses its updates and deletes while the \
                    publication publishes them, and the mirror gets inserts and truncates only. To replicate \
                    updates and deletes: `ALTER TABLE {name} REPLICA IDENTITY FULL` (or add a primary key)");
            }
            self.tables.insert(
                name.to_string(),
                Pair {
                    changes,
                    changes_at,
                    mirror,
                    mirror_at,
                    schema: self
                        .history
                        .as_ref()
                        .expect("set above")
                        .latest(&rel.schema, &rel.name)
                        .await?,
                    keys: keys::KeyIndex::new(self.warehouse.key_index_rows()),
                    logs: Default::default(),
                },
            );
        }
        Ok(self.tables.get_mut(name).expect("inserted above"))
    }

    /// How far the changelog and mirror of `name` have applied (after they were opened).
    pub fn applied(&self, name: &str) -> Option<(Applied, Applied)> {
        self.tables.get(name).map(|p| (p.changes_at, p.mirror_at))
    }

    /// Follows columns the source added that no change has brought yet (`rel` as the catalog
    /// describes the table now, the added columns without defaults: NULL in every existing row,
    /// as at the source). Both Delta tables get the columns, then the version is recorded at
    /// `at`, a WAL position after the catalog was read: rows of older versions still on their
    /// way are neither compared with it nor recorded (see [`versions`]). A crash in between
    /// leaves the version unrecorded, so the next look at the catalog does it again.
    pub async fn add_columns(
        &mut self,
        name: &str,
        rel: &Relation,
        at: Lsn,
    ) -> Result<(), ApplyError> {
        let storage = self.warehouse.storage_options().clone();
        self.pair(name, rel).await?;
        let history = self.history.clone().expect("opened by pair");
        let pair = self.tables.get_mut(name).expect("opened above");
        evolve::evolve(&mut pair.changes, name, &changelog_schema(rel), &storage).await?;
        evolve::evolve(&mut pair.mirror, name, &mirror_schema(rel), &storage).await?;
        record_versions(&history, pair, vec![SchemaVersion::of(rel, at)]).await
    }

    /// Moves columns whose type the source changed in a way the warehouse cannot follow aside in
    /// both Delta tables (`(column, new name)`, see [`retyped_name`]): the changelog keeps the
    /// old values under the new name, and the column comes back in its new type with the copy of
    /// the table that follows. Idempotent: a table that moved a column already skips it.
    pub async fn set_aside(
        &mut self,
        name: &str,
        rel: &Relation,
        columns: &[(String, String)],
    ) -> Result<(), ApplyError> {
        let storage = self.warehouse.storage_options().clone();
        let pair = self.pair(name, rel).await?;
        tracing::warn!(
            table = name,
            ?columns,
            "column types changed in a way the warehouse cannot \
            follow: the old columns move aside and the table is copied again"
        );
        evolve::rename(&mut pair.changes, name, columns, &storage).await?;
        evolve::rename(&mut pair.mirror, name, columns, &storage).await
    }

    /// Forgets what it knows of `name`'s Delta tables (a copy replaced them): the next flush
    /// opens them again and reads their LSNs.
    pub fn forget(&mut self, name: &str) {
        self.tables.remove(name);
    }

    /// Makes everything in `buf` durable in both tables; changes a table has already applied are
    /// skipped there. The buffer's rows move into the mirror's plan (their values are not
    /// copied); the changelog is written and committed in a task of its own meanwhile (each
    /// table records its own position, so the two commits may land in either order).
    pub async fn apply(
        &mut self,
        name: &str,
        mut buf: TableBuffer,
    ) -> Result<ApplyStats, ApplyError> {
        let buf = &mut buf;
        let app_id = self.app_id.clone();
        let storage = self.warehouse.storage_options().clone();
        self.pair(name, &buf.relation).await?;
        let history = self.history.clone().expect("opened by pair");
        let pair = self.tables.get_mut(name).expect("opened above");
        apply_pair(pair, name, buf, (&app_id, &storage, &history)).await
    }
}

/// [`Applier::apply`] on the opened `pair`.
async fn apply_pair(
    pair: &mut Pair,
    name: &str,
    buf: &mut TableBuffer,
    (app_id, storage, history): (&str, &HashMap<String, String>, &SchemaHistory),
) -> Result<ApplyStats, ApplyError> {
    let app_id = app_id.to_string();
    let versions = versions(pair.schema.as_ref(), buf);
    let renames = renamed_columns(pair.schema.as_ref(), &versions);
    if !renames.is_empty() {
        // Before the new version is recorded: after a crash in between, the rename is
        // seen again (and skipped by a table that has it).
        evolve::rename(&mut pair.changes, name, &renames, storage).await?;
        evolve::rename(&mut pair.mirror, name, &renames, storage).await?;
    }
    record_versions(history, pair, versions).await?;
    let mut stats = ApplyStats::default();
    let err = TableErr(name);
    let delta = |e| err.delta(e);
    let arrow = |e| err.arrow(e);
    let new = |at: &Applied| buf.rows.iter().any(|r| !at.covers(r.commit_lsn, r.seq));

    // 1. changelog: its batch is built here (the mirror's plan takes the rows next); its
    // files are written and committed in a task of their own, beside the mirror's work,
    // unless the mirror takes those files.
    let mirror_from = pair.mirror_at;
    let mirror_to = progress(buf, mirror_from);
    let mirror_new = new(&mirror_from);
    let mut changelog: Option<PendingChangelog> = None;
    if new(&pair.changes_at) {
        let (batch, bad) = changelog_batch(buf, pair.changes_at).map_err(arrow)?;
        stats.changelog_rows = batch.num_rows();
        stats.unrepresentable += bad;
        evolve::evolve(&mut pair.changes, name, &batch.schema(), storage).await?;
        let target = evolve::table_schema(&pair.changes).map_err(delta)?;
        let batch = evolve::align(&batch, &target).map_err(arrow)?;
        let to = progress(buf, pair.changes_at);
        let complete = batch
            .column_by_name(crate::batch::UNCHANGED)
            .is_none_or(|c| c.null_count() == c.len());
        let task = tokio::spawn(append_changelog(
            name.to_string(),
            pair.changes.clone(),
            batch,
            app_id.clone(),
            to,
        ));
        changelog = Some(PendingChangelog {
            from: pair.changes_at,
            to,
            rows: stats.changelog_rows,
            complete,
            task,
        });
    } else {
        stats.skipped_rows += buf.rows.len();
    }

    // 2. mirror
    let insert_only = buf
        .rows
        .iter()
        .filter(|r| !mirror_from.covers(r.commit_lsn, r.seq))
        .all(|r| r.change.kind == ChangeKind::Insert && buf.holds(r));
    let want = mirror_schema(&buf.relation);
    let mirrored = match changelog {
        // The changelog appends exactly these rows, all inserts: the mirror takes its files'
        // columns (no second encode).
        Some(c)
            if mirror_new
                && insert_only
                && c.from == mirror_from
                && !schema_differs(&pair.mirror, &want) =>
        {
            let files = c.finish(pair, name).await?;
            let adds = files::project_files(&pair.changes, &pair.mirror, &files, &want).await?;
            settle::append(&mut pair.mirror, name, &adds, &app_id, mirror_to)
                .await
                .map_err(delta)?;
            stats.mirror_rows = stats.changelog_rows;
            Ok(())
        }
        mut changelog => {
            let mirrored = match mirror_plan(buf, mirror_from) {
                Some(plan) => {
                    let started = std::time::Instant::now();
                    // The changelog's files hold exactly the plan's new rows: the mirror takes
                    // their columns instead of encoding the rows again.
                    let mut written = None;
                    changelog = changelog.map(|c| {
                        if mirror_new
                            && c.holds(&plan, mirror_from)
                            && !schema_differs(&pair.mirror, &want)
                        {
                            let (c, w) = c.project(name, &pair.mirror, want.clone());
                            written = Some(w);
                            c
                        } else {
                            c
                        }
                    });
                    let done = settle::execute(
                        &mut pair.mirror,
                        name,
                        &buf.relation,
                        (&plan, written.as_mut()),
                        (&app_id, mirror_to),
                        storage,
                        &mut pair.keys,
                    )
                    .await;
                    crate::telemetry::METRICS
                        .merge_duration_seconds
                        .observe(started.elapsed().as_secs_f64());
                    done.map(|done| {
                        stats.mirror_rows = done.rows_added + done.rows_removed;
                        stats.unidentified = plan.unidentified;
                        stats.missing = done.missing;
                        if stats.changelog_rows == 0 {
                            stats.unrepresentable += done.unrepresentable;
                        }
                    })
                }
                None => Ok(()),
            };
            if let Some(c) = changelog {
                c.finish(pair, name).await?;
            }
            mirrored
        }
    };
    mirrored?;
    if mirror_new {
        pair.mirror_at = mirror_to;
    }
    pair.logs[0].after_commit(&pair.changes, name);
    pair.logs[1].after_commit(&pair.mirror, name);
    Ok(stats)
}

/// The schema versions `buf`'s rows bring after `recorded`, each with the commit LSN of its first
/// row. Rows from before the recorded version (still in flight when a later copy of the table
/// recorded it) are covered by that copy: their older descriptions are left out.
fn versions(recorded: Option<&SchemaVersion>, buf: &TableBuffer) -> Vec<SchemaVersion> {
    let floor = recorded
        .and_then(|v| v.lsn.parse::<Lsn>().ok())
        .unwrap_or(Lsn(0));
    let mut out = Vec::new();
    let mut last: Option<*const crate::decode::pgoutput::Relation> = None;
    for row in buf.rows.iter().filter(|r| r.commit_lsn >= floor) {
        let ptr = std::sync::Arc::as_ptr(&row.change.relation);
        if last != Some(ptr) {
            last = Some(ptr);
            out.push(SchemaVersion::of(&row.change.relation, row.commit_lsn));
        }
    }
    out
}

/// The name a dropped column's values keep in both tables once a new column takes its name.
fn dropped_name(name: &str, attnum: i16) -> String {
    format!("{name}__dropped_{attnum}")
}

/// The name a column's values keep in both tables when the source changed its type in a way the
/// warehouse cannot follow, at `lsn` (the transaction that first described the new type).
pub fn retyped_name(name: &str, lsn: Lsn) -> String {
    format!("{name}__before_{:X}", lsn.0)
}

/// Columns to rename, `(old, new)` in order, between the last recorded schema version and each
/// of the versions a buffer brings: a column whose attribute number is a recorded column's but
/// whose name is not was renamed by the source (a dropped column's number is never reused, so
/// a column dropped and another added is never taken for a rename); a dropped column whose name
/// a new column took moves aside to [`dropped_name`], so its values are never read as the new
/// column's.
fn renamed_columns(
    recorded: Option<&SchemaVersion>,
    versions: &[SchemaVersion],
) -> Vec<(String, String)> {
    let mut renames = Vec::new();
    let mut prev = recorded;
    for v in versions {
        if let Some(p) = prev.filter(|p| p.oid == v.oid) {
            let known = |c: &ColumnVersion| c.attnum != 0;
            // A new column under a dropped column's name: the old one's values move aside.
            for c in v.columns.iter().filter(|c| known(c)) {
                if let Some(old) = p.columns.iter().find(|o| {
                    known(o)
                        && o.name == c.name
                        && o.attnum != c.attnum
                        && !v.columns.iter().any(|n| n.attnum == o.attnum)
                }) {
                    renames.push((old.name.clone(), dropped_name(&old.name, old.attnum)));
                }
            }
            for c in v.columns.iter().filter(|c| known(c)) {
                if let Some(old) = p
                    .columns
                    .iter()
                    .find(|o| o.attnum == c.attnum && o.name != c.name)
                {
                    renames.push((old.name.clone(), c.name.clone()));
                }
            }
        }
        prev = Some(v);
    }
    renames
}

/// Records each schema version a buffer brings (see [`versions`]) that differs from the last one
/// recorded, before any of its rows is committed.
async fn record_versions(
    history: &SchemaHistory,
    pair: &mut Pair,
    versions: Vec<SchemaVersion>,
) -> Result<(), ApplyError> {
    for v in versions {
        if pair.schema.as_ref().is_none_or(|s| !s.same_as(&v)) {
            history.record(&v).await?;
            pair.schema = Some(v);
        }
    }
    Ok(())
}

/// How far a table has applied once `buf` is durable in it: through the last transaction of the
/// buffer, or, when that one is incomplete, through the ones before it plus the changes of it
/// that the buffer holds.
fn progress(buf: &TableBuffer, before: Applied) -> Applied {
    let Some(last) = buf.rows.last() else {
        return before;
    };
    if !buf.partial {
        return Applied {
            lsn: last.commit_lsn.max(before.lsn),
            partial: before.partial,
        };
    }
    let complete = buf
        .rows
        .iter()
        .map(|r| r.commit_lsn)
        .filter(|&l| l < last.commit_lsn)
        .max()
        .unwrap_or_default();
    Applied {
        lsn: before.lsn.max(complete),
        partial: Some((last.commit_lsn, last.seq)),
    }
}

/// The application transactions that record `at` in the same commit as the data.
fn commit_props(app_id: &str, at: Applied) -> CommitProperties {
    let mut txns = vec![Transaction::new(app_id, at.lsn.0 as i64)];
    if let Some((lsn, seq)) = at.partial {
        txns.push(Transaction::new(partial_lsn_id(app_id), lsn.0 as i64));
        txns.push(Transaction::new(partial_seq_id(app_id), seq));
    }
    // Checkpoints and log cleanup run beside the stream (`logs`), not in its commits.
    CommitProperties::default()
        .with_application_transactions(txns)
        .with_create_checkpoint(false)
        .with_cleanup_expired_logs(Some(false))
}

fn partial_lsn_id(app_id: &str) -> String {
    format!("{app_id}:partial-lsn")
}

fn partial_seq_id(app_id: &str) -> String {
    format!("{app_id}:partial-seq")
}

pub fn app_id(slot: &str) -> String {
    format!("walden:{slot}")
}

/// The changelog table after step 1 of [`Applier::apply`], and the files it added.
type ChangelogDone = Result<(DeltaTable, Vec<Add>), ApplyError>;

/// Step 1 of [`Applier::apply`] under way: the changelog's append from `from` to `to`.
struct PendingChangelog {
    from: Applied,
    to: Applied,
    /// Rows appended.
    rows: usize,
    /// No row lacks a value the server did not send (unchanged TOAST): each holds all its values.
    complete: bool,
    task: JoinHandle<ChangelogDone>,
}

impl PendingChangelog {
    /// The rows it appends are exactly `plan`'s new row versions, in order and with all their
    /// values, when it starts where the mirror does (`mirror_from`), every one of its rows is
    /// an upsert of the plan (the plan's upserts are its rows less deletes, truncates, rows
    /// before a truncate and rows changed again within the batch, so equal counts leave none
    /// out) and no row lacks an unchanged value (the changelog holds those as NULL; the mirror
    /// would carry them, and without one no upsert carries).
    fn holds(&self, plan: &crate::plan::MirrorPlan, mirror_from: Applied) -> bool {
        self.from == mirror_from && self.complete && plan.upserts.len() == self.rows
    }

    /// Its files, once committed, projected onto `schema` (the mirror's columns) as files of
    /// `mirror` without re-encoding, handed to the mirror's executor through the [`Written`].
    ///
    /// [`Written`]: mirror::Written
    fn project(
        self,
        name: &str,
        mirror: &DeltaTable,
        schema: SchemaRef,
    ) -> (Self, mirror::Written) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (appending, mirror, name) = (self.task, mirror.clone(), name.to_string());
        let task = tokio::spawn(async move {
            let (table, adds) = appending.await.map_err(|e| ApplyError::Task {
                table: name,
                reason: e.to_string(),
            })??;
            let projected = files::project_files(&table, &mirror, &adds, &schema).await?;
            let _ = tx.send(projected);
            Ok((table, adds))
        });
        (PendingChangelog { task, ..self }, mirror::Written::new(rx))
    }

    /// Waits for the append; once it is committed, `pair` holds the changelog's new state.
    /// Returns the files added.
    async fn finish(self, pair: &mut Pair, name: &str) -> Result<Vec<Add>, ApplyError> {
        let (table, files) = self.task.await.map_err(|e| ApplyError::Task {
            table: name.to_string(),
            reason: e.to_string(),
        })??;
        pair.changes = table;
        pair.changes_at = self.to;
        Ok(files)
    }
}

/// Writes `batch` as files of the changelog `table` and commits them, recording `to`.
async fn append_changelog(
    name: String,
    mut table: DeltaTable,
    batch: RecordBatch,
    app_id: String,
    to: Applied,
) -> ChangelogDone {
    let err = TableErr(&name);
    let adds = files::write_files(&table, batch, writer_properties())
        .await
        .map_err(|e| err.delta(e))?;
    settle::append(&mut table, &name, &adds, &app_id, to)
        .await
        .map_err(|e| err.delta(e))?;
    crate::checkpoint::failpoint("after-changelog-commit");
    Ok((table, adds))
}
