//! The warehouse side of a snapshot: snapshot rows become Parquet files in both Delta tables of
//! a source table, and one commit per Delta table makes the whole copy visible at once.
//!
//! Chunks are written as files that no commit references yet. When every chunk of a table is
//! written, the changelog gets one commit adding them (rows with `_walden_op = 'snapshot'`), and
//! the mirror one commit that removes whatever it held and adds the new files: a reader sees the
//! old mirror or the complete copy, never a half-copied table. Both commits carry the application
//! transaction `walden:<slot>` at `consistent point − 1`: a transaction that commits exactly at
//! the consistent point is streamed, not in the snapshot, so it must not be skipped.

use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{Action, Add, Transaction};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::DeltaTable;

use super::evolve::{align, evolve, table_schema};
use super::files::project_files;
use super::settle::{self, Proof};
use super::{ApplyError, TableErr};
use crate::batch::{changelog_schema, finish_columns, mirror_schema, Finished};
use crate::checkpoint::{Applied, Lsn};
use crate::decode::pgoutput::Relation;
use crate::decode::types::ColumnBuilder;
use crate::sink::schemas::{SchemaHistory, SchemaVersion};
use crate::sink::{snapshot_writer_properties, TableKind, Warehouse};

/// Both Delta tables of one source table being snapshotted.
#[derive(Clone)]
pub struct SnapshotTarget {
    pub name: String,
    pub relation: Arc<Relation>,
    pub changes: DeltaTable,
    pub mirror: DeltaTable,
    /// Recorded as `_walden_lsn` and as the tables' applied LSN: consistent point − 1.
    pub lsn: Lsn,
    /// Recorded as `_walden_commit_ts` (when the snapshot was taken).
    pub ts_us: i64,
    /// Where the copied schema version is recorded once the copy is durable.
    history: SchemaHistory,
}

impl SnapshotTarget {
    pub async fn open(
        warehouse: &Warehouse,
        relation: Relation,
        consistent_point: Lsn,
        ts_us: i64,
    ) -> Result<Self, ApplyError> {
        let name = format!("{}.{}", relation.schema, relation.name);
        let cu = warehouse.table_url(TableKind::Changes, &relation.schema, &relation.name);
        let mu = warehouse.table_url(TableKind::Mirror, &relation.schema, &relation.name);
        let mut changes = warehouse
            .open_or_create(&cu, &changelog_schema(&relation), &name)
            .await?;
        let mut mirror = warehouse
            .open_mirror(&mu, &mirror_schema(&relation), &name)
            .await?;
        // Tables written before a column was added (by the source or by walden) gain it.
        let storage = warehouse.storage_options();
        evolve(&mut changes, &name, &changelog_schema(&relation), storage).await?;
        evolve(&mut mirror, &name, &mirror_schema(&relation), storage).await?;
        // After evolving, each table holds every column of the copy in its type; columns it
        // has besides (dropped at the source) stay NULL, and the order may differ (batches are
        // aligned by name).
        for (t, want) in [
            (&changes, changelog_schema(&relation)),
            (&mirror, mirror_schema(&relation)),
        ] {
            let have = table_schema(t).map_err(|e| TableErr(&name).delta(e))?;
            let holds = want.fields().iter().all(|w| {
                have.field_with_name(w.name())
                    .is_ok_and(|h| h.data_type() == w.data_type())
            });
            if !holds {
                return Err(ApplyError::Snapshot(format!(
                    "{name}: the warehouse table {} has other columns than the source table; \
                     move it away (or delete it) and snapshot again",
                    t.table_url()
                )));
            }
        }
        Ok(SnapshotTarget {
            name,
            relation: Arc::new(relation),
            changes,
            mirror,
            lsn: Lsn(consistent_point.0.saturating_sub(1)),
            ts_us,
            history: SchemaHistory::new(warehouse)?,
        })
    }

    /// Changelog rows of `n` snapshot rows held by `cols`; `_walden_seq` is `chunk << 32 | row within chunk`, so
    /// (`_walden_lsn`, `_walden_seq`) stays unique. Returns the batch and the count of values that
    /// could not be represented (stored as NULL).
    pub fn changelog_batch(
        &self,
        cols: Vec<ColumnBuilder>,
        n: usize,
        chunk: u32,
        first_row: u64,
    ) -> Result<(RecordBatch, u64), arrow::error::ArrowError> {
        let rel = &self.relation;
        let Finished {
            mut arrays,
            unrepresentable: bad,
            exact,
        } = finish_columns(rel, cols, n);
        let base = ((chunk as i64) << 32) + first_row as i64;
        arrays.push(Arc::new(StringArray::from(vec!["snapshot"; n])));
        arrays.push(Arc::new(Int64Array::from(vec![self.lsn.0 as i64; n])));
        arrays.push(Arc::new(Int64Array::from_iter_values(
            (0..n as i64).map(|i| base + i),
        )));
        arrays.push(Arc::new(Int64Array::from(vec![0i64; n])));
        arrays.push(Arc::new(
            TimestampMicrosecondArray::from(vec![self.ts_us; n]).with_timezone("UTC"),
        ));
        arrays.push(Arc::new(StringArray::from(vec![None::<&str>; n])));
        arrays.push(exact);
        arrays.push(Arc::new(StringArray::from(vec![None::<&str>; n])));
        Ok((RecordBatch::try_new(changelog_schema(rel), arrays)?, bad))
    }
}

/// Writes the files of one chunk (not yet committed): the changelog's through the Delta writer
/// (which also computes the file statistics), the mirror's by copying the encoded columns it
/// shares with the changelog file ([`project_files`]): every value is encoded once.
pub struct ChunkWriter<'a> {
    changes: RecordBatchWriter,
    target: &'a SnapshotTarget,
}

impl<'a> ChunkWriter<'a> {
    pub fn new(target: &'a SnapshotTarget) -> Result<Self, ApplyError> {
        Ok(ChunkWriter {
            changes: RecordBatchWriter::for_table(&target.changes)
                .map_err(|source| ApplyError::Delta {
                    table: target.name.clone(),
                    source,
                })?
                .with_writer_properties(snapshot_writer_properties()),
            target,
        })
    }

    /// Writes changelog rows (see [`SnapshotTarget::changelog_batch`]).
    pub async fn write(&mut self, changelog: RecordBatch) -> Result<(), ApplyError> {
        // The changelog table's column order may differ from the copy's (columns added by
        // the stream come after walden's own): batches are aligned to it by name.
        let layout = self.changes.arrow_schema();
        let changelog = if changelog.schema() == layout {
            changelog
        } else {
            align(&changelog, &layout).map_err(|e| TableErr(&self.target.name).arrow(e))?
        };
        self.changes
            .write(changelog)
            .await
            .map_err(|source| ApplyError::Delta {
                table: self.target.name.clone(),
                source,
            })
    }

    /// Finishes the files; returns their add actions (changelog, mirror).
    pub async fn finish(mut self) -> Result<(Vec<Add>, Vec<Add>), ApplyError> {
        let changes = self
            .changes
            .flush()
            .await
            .map_err(|source| ApplyError::Delta {
                table: self.target.name.clone(),
                source,
            })?;
        let mirror = project_files(
            &self.target.changes,
            &self.target.mirror,
            &changes,
            &mirror_schema(&self.target.relation),
        )
        .await?;
        Ok((changes, mirror))
    }
}

/// Makes a table's copy visible: appends to the changelog and replaces the mirror, whose
/// application transaction moves to the snapshot's LSN. An initial snapshot (`initial`) sets the
/// changelog's too; a backfill leaves it, so changes the stream has not yet appended there still
/// are. Refuses when the stream already applied changes past the snapshot to the mirror (the copy
/// would be older than what it replaces).
pub async fn commit_table(
    target: &SnapshotTarget,
    app_id: &str,
    changes: Vec<Add>,
    mirror: Vec<Add>,
    initial: bool,
) -> Result<(), ApplyError> {
    let delta = |source| ApplyError::Delta {
        table: target.name.clone(),
        source,
    };
    let props = || {
        CommitProperties::default()
            .with_application_transaction(Transaction::new(app_id, target.lsn.0 as i64))
    };
    // Commit on the newest versions: whatever the stream committed meanwhile is superseded by
    // the copy, unless it is past the snapshot.
    let mut changes_table = target.changes.clone();
    changes_table.update_state().await.map_err(delta)?;
    let mut mirror_table = target.mirror.clone();
    mirror_table.update_state().await.map_err(delta)?;
    let now = super::applied_lsn(&mirror_table, app_id)
        .await
        .map_err(delta)?;
    if now > target.lsn {
        return Err(ApplyError::Snapshot(format!(
            "{}: while the copy ran, the stream applied changes up to {now}, past the copy's snapshot \
             ({}); the copy is stale. Run the backfill again when the table is quieter, or stop \
             `walden run` during it",
            target.name,
            Lsn(target.lsn.0 + 1)
        )));
    }
    let to = Applied::at(target.lsn);
    // A file a commit adds shows it happened (a backfill's changelog commit records no
    // position; the stream may have recorded one past the copy's in the mirror meanwhile).
    let (changes_file, mirror_file) = (first_path(&changes), first_path(&mirror));
    let proof = match (initial, &changes_file) {
        (true, _) => Proof::Records(app_id, to),
        (false, Some(path)) => Proof::Adds(path),
        (false, None) => Proof::Harmless,
    };
    let write = |mode| DeltaOperation::Write {
        mode,
        partition_by: None,
        predicate: None,
    };
    let changelog_props = || {
        if initial {
            props()
        } else {
            CommitProperties::default()
        }
    };
    let adds = changes.into_iter().map(Action::Add).collect();
    let name = &target.name;
    let append = (write(SaveMode::Append), changelog_props);
    settle::commit(&mut changes_table, name, adds, append, proof)
        .await
        .map_err(delta)?;
    crate::checkpoint::failpoint("after-snapshot-changelog-commit");

    // The copy replaces what the mirror held; a commit that raced the stream is not made again
    // (the stream may have gone past the copy meanwhile: the session checks again).
    let files = mirror_table.snapshot().map_err(delta)?.log_data();
    let removes = files.iter().map(|f| Action::Remove(f.remove_action(true)));
    let actions = removes.chain(mirror.into_iter().map(Action::Add)).collect();
    let proof = match &mirror_file {
        Some(path) => Proof::Adds(path),
        None => Proof::Records(app_id, to),
    };
    let overwrite = (write(SaveMode::Overwrite), props);
    settle::commit(&mut mirror_table, name, actions, overwrite, proof)
        .await
        .map_err(delta)?;
    // Only now: a recorded version of this table's OID means its copy is in the mirror (a
    // generation whose copy was cut short is copied again, see `pipeline`).
    target
        .history
        .record(&SchemaVersion::of(&target.relation, Lsn(target.lsn.0 + 1)))
        .await?;
    Ok(())
}

/// The path of the first of `adds`.
fn first_path(adds: &[Add]) -> Option<String> {
    adds.first().map(|a| a.path.clone())
}
