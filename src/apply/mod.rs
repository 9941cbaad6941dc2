//! Applying batches to the Delta tables, exactly once.
//!
//! Owns, per source table, its changelog and mirror Delta tables and the source commit LSN each one
//! has durably applied. That LSN is stored in the same atomic Delta commit as the data, as the
//! application transaction `walden:<slot>`; on start it is read back and every change at or below
//! it is skipped. The changelog is appended; the mirror is merged (DataFusion-backed MERGE keyed on
//! the replica identity), appended for insert-only batches, or replaced after a truncate.

pub mod files;
pub mod inspect;
pub mod snapshot;

use std::collections::HashMap;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::common::Column;
use datafusion::logical_expr::{not, when, Expr};
use datafusion::prelude::SessionContext;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::operations::write::SchemaMode;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableError};

use crate::batch::mirror::{
    from_changelog, mirror_batch, unchanged_flag, MirrorBatch, DELETE_FLAG,
};
use crate::batch::{changelog_batch, changelog_schema, mirror_schema, TableBuffer};
use crate::checkpoint::Lsn;
use crate::decode::txn::ChangeKind;
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
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("DataFusion on {table}: {source}")]
    DataFusion {
        table: String,
        #[source]
        source: datafusion::error::DataFusionError,
    },
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
}

struct Pair {
    changes: DeltaTable,
    changes_lsn: Lsn,
    mirror: DeltaTable,
    mirror_lsn: Lsn,
}

pub struct Applier {
    warehouse: Warehouse,
    app_id: String,
    tables: HashMap<String, Pair>,
    ctx: SessionContext,
}

/// Reads the LSN recorded by application transaction `app_id` (0 when none).
pub async fn applied_lsn(table: &DeltaTable, app_id: &str) -> Result<Lsn, DeltaTableError> {
    let v = table
        .snapshot()?
        .transaction_version(table.log_store().as_ref(), app_id)
        .await?;
    Ok(Lsn(v.unwrap_or(0).max(0) as u64))
}

fn qcol(relation: &str, name: &str) -> Expr {
    Expr::Column(Column::new(Some(relation), name))
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
            ctx: SessionContext::new(),
        }
    }

    /// Opens (or creates) both Delta tables of the buffer's table and reads their LSNs.
    async fn pair(&mut self, name: &str, buf: &TableBuffer) -> Result<&mut Pair, ApplyError> {
        if !self.tables.contains_key(name) {
            let rel = &buf.relation;
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
                .open_or_create(&mu, &mirror_schema(rel), name)
                .await?;
            let delta = |source| ApplyError::Delta {
                table: name.to_string(),
                source,
            };
            let changes_lsn = applied_lsn(&changes, &self.app_id).await.map_err(delta)?;
            let mirror_lsn = applied_lsn(&mirror, &self.app_id).await.map_err(delta)?;
            tracing::info!(table = name, changelog_lsn = %changes_lsn, mirror_lsn = %mirror_lsn, "opened Delta tables");
            self.tables.insert(
                name.to_string(),
                Pair {
                    changes,
                    changes_lsn,
                    mirror,
                    mirror_lsn,
                },
            );
        }
        Ok(self.tables.get_mut(name).expect("inserted above"))
    }

    /// The LSNs the changelog and mirror of `name` have applied (after they were opened).
    pub fn applied(&self, name: &str) -> Option<(Lsn, Lsn)> {
        self.tables.get(name).map(|p| (p.changes_lsn, p.mirror_lsn))
    }

    /// Makes everything in `buf` durable in both tables; changes at or below a table's recorded LSN
    /// are skipped there.
    pub async fn apply(&mut self, name: &str, buf: &TableBuffer) -> Result<ApplyStats, ApplyError> {
        let app_id = self.app_id.clone();
        let ctx = self.ctx.clone();
        let last = buf.rows.last().map(|r| r.commit_lsn).unwrap_or_default();
        let pair = self.pair(name, buf).await?;
        let mut stats = ApplyStats::default();
        let delta = |source| ApplyError::Delta {
            table: name.to_string(),
            source,
        };
        let arrow = |source| ApplyError::Arrow {
            table: name.to_string(),
            source,
        };
        let props = || {
            CommitProperties::default()
                .with_application_transaction(Transaction::new(&app_id, last.0 as i64))
        };

        // 1. changelog
        let mut changelog: Option<Changelog> = None;
        if last > pair.changes_lsn {
            let (batch, bad) = changelog_batch(buf, pair.changes_lsn).map_err(arrow)?;
            stats.changelog_rows = batch.num_rows();
            stats.unrepresentable += bad;
            let files = if schema_differs(&pair.changes, &batch.schema()) {
                // A new column: the write operation evolves the table's schema.
                pair.changes = pair
                    .changes
                    .clone()
                    .write(vec![batch.clone()])
                    .with_save_mode(SaveMode::Append)
                    .with_writer_properties(writer_properties())
                    .with_commit_properties(props())
                    .with_schema_mode(SchemaMode::Merge)
                    .await
                    .map_err(delta)?;
                None
            } else {
                let adds = files::write_files(&pair.changes, batch.clone(), writer_properties())
                    .await
                    .map_err(delta)?;
                files::commit_append(&mut pair.changes, adds.clone(), props())
                    .await
                    .map_err(delta)?;
                Some(adds)
            };
            changelog = Some(Changelog {
                from: pair.changes_lsn,
                batch,
                files,
            });
            pair.changes_lsn = last;
            crate::checkpoint::failpoint("after-changelog-commit");
        } else {
            stats.skipped_rows += buf.rows.len();
        }

        // 2. mirror
        if last > pair.mirror_lsn {
            let insert_only = buf
                .rows
                .iter()
                .filter(|r| r.commit_lsn > pair.mirror_lsn)
                .all(|r| r.change.kind == ChangeKind::Insert);
            // The changelog just appended exactly these rows, all inserts: the mirror takes them
            // from there.
            let same_rows = changelog.filter(|c| insert_only && c.from == pair.mirror_lsn);
            let want = mirror_schema(&buf.relation);
            let mb = match same_rows {
                // Its files, projected (no second encode).
                Some(Changelog {
                    batch,
                    files: Some(adds),
                    ..
                }) if !schema_differs(&pair.mirror, &want) => {
                    let adds =
                        files::project_files(&pair.changes, &pair.mirror, &adds, &want).await?;
                    files::commit_append(&mut pair.mirror, adds, props())
                        .await
                        .map_err(delta)?;
                    stats.mirror_rows = batch.num_rows();
                    None
                }
                Some(c) => Some(from_changelog(&c.batch, &buf.relation).map_err(arrow)?),
                None => mirror_batch(buf, pair.mirror_lsn).map_err(arrow)?,
            };
            if let Some(mb) = mb {
                stats.mirror_rows = mb.batch.num_rows();
                pair.mirror = apply_mirror(&ctx, pair.mirror.clone(), mb, props())
                    .await
                    .map_err(|e| match e {
                        MirrorErr::Delta(source) => delta(source),
                        MirrorErr::Arrow(source) => arrow(source),
                        MirrorErr::DataFusion(source) => ApplyError::DataFusion {
                            table: name.to_string(),
                            source,
                        },
                    })?;
            }
            pair.mirror_lsn = last;
        }
        Ok(stats)
    }
}

pub fn app_id(slot: &str) -> String {
    format!("walden:{slot}")
}

/// What step 1 of [`Applier::apply`] appended to the changelog.
struct Changelog {
    /// The changelog's LSN before: its rows are the changes above it.
    from: Lsn,
    batch: RecordBatch,
    /// The files added, when written ahead of the commit (not on a schema change).
    files: Option<Vec<deltalake::kernel::Add>>,
}

enum MirrorErr {
    Delta(DeltaTableError),
    Arrow(arrow::error::ArrowError),
    DataFusion(datafusion::error::DataFusionError),
}

/// The mirror's columns of a merge-source batch (without the flags).
fn mirror_columns(mb: &MirrorBatch, width: usize) -> Result<RecordBatch, MirrorErr> {
    mb.batch
        .project(&(0..width).collect::<Vec<_>>())
        .map_err(MirrorErr::Arrow)
}

async fn apply_mirror(
    ctx: &SessionContext,
    table: DeltaTable,
    mb: MirrorBatch,
    props: CommitProperties,
) -> Result<DeltaTable, MirrorErr> {
    let width = mb.batch.num_columns() - 1 - mb.unchanged.len();
    let names: Vec<String> = mb.batch.schema().fields()[..width]
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let want = mirror_columns(&mb, width)?.schema();
    let evolve = schema_differs(&table, &want);
    if mb.replace || mb.keys.is_empty() || (mb.insert_only && mb.deletes == 0) {
        let rows = mirror_columns(&mb, width)?;
        if rows.num_rows() == 0 && !mb.replace {
            return Ok(table);
        }
        let mode = if mb.replace {
            SaveMode::Overwrite
        } else {
            SaveMode::Append
        };
        let mut w = table
            .write(vec![rows])
            .with_save_mode(mode)
            .with_writer_properties(writer_properties())
            .with_commit_properties(props);
        if evolve {
            w = w.with_schema_mode(SchemaMode::Merge);
        }
        return w.await.map_err(MirrorErr::Delta);
    }
    if mb.batch.num_rows() == 0 {
        return Ok(table);
    }
    let predicate = mb
        .keys
        .iter()
        .map(|k| qcol("target", k).eq(qcol("source", k)))
        .reduce(Expr::and)
        .expect("keys is not empty");
    let unchanged: HashMap<String, usize> = mb
        .unchanged
        .iter()
        .map(|&i| (names[i].clone(), i))
        .collect();
    let source = ctx.read_batch(mb.batch).map_err(MirrorErr::DataFusion)?;
    let value = |name: &String| -> Expr {
        match unchanged.get(name) {
            Some(&i) => when(qcol("source", &unchanged_flag(i)), qcol("target", name))
                .otherwise(qcol("source", name))
                .expect("when/otherwise is complete"),
            None => qcol("source", name),
        }
    };
    let (table, _metrics) = table
        .merge(source, predicate)
        .with_source_alias("source")
        .with_target_alias("target")
        .with_merge_schema(evolve)
        .with_writer_properties(writer_properties())
        .with_commit_properties(props)
        .when_matched_delete(|d| d.predicate(qcol("source", DELETE_FLAG)))
        .map_err(MirrorErr::Delta)?
        .when_matched_update(|mut u| {
            for n in &names {
                u = u.update(Column::new_unqualified(n.clone()), value(n));
            }
            u
        })
        .map_err(MirrorErr::Delta)?
        .when_not_matched_insert(|mut i| {
            i = i.predicate(not(qcol("source", DELETE_FLAG)));
            for n in &names {
                i = i.set(Column::new_unqualified(n.clone()), qcol("source", n));
            }
            i
        })
        .map_err(MirrorErr::Delta)?
        .await
        .map_err(MirrorErr::Delta)?;
    Ok(table)
}
