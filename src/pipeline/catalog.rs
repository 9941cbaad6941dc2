//! The catalog side of a streaming session: tables that join the publication or come back as a
//! new generation (copied beside the stream), relation descriptions resolved against the catalog
//! before their changes decode, and columns added at the source with no change since.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::datatypes::DataType;

use super::{idle, no_sql, PipelineError, Session, PUBLICATION_CHECK};
use crate::apply::evolve::follows;
use crate::apply::{inspect, retyped_name};
use crate::checkpoint::Lsn;
use crate::config::IncompatibleType;
use crate::decode::pgoutput::Relation;
use crate::decode::types::column_type;
use crate::sink::schemas::{SchemaHistory, SchemaVersion};
use crate::source::snapshot::{describe, published_tables, Published};
use crate::source::types::newest_columns;
use crate::source::{ReplicationStream, SourceError};

impl Session<'_> {
    /// Copies tables whose rows are not in the stream: tables that joined the publication
    /// (ALTER PUBLICATION … ADD TABLE, or a new table under FOR ALL TABLES) and have no Delta tables
    /// yet, and tables dropped and created again under the same name (a new OID: a new
    /// generation, whose copy replaces the old rows in the mirror; the changelog keeps both, told
    /// apart by the schema history). The copy is taken beside the stream
    /// (`snapshot::copy_beside_stream`), so its mirror starts at its own snapshot point and the
    /// stream applies only what came after. Called with no flush under way, before any change of
    /// theirs reaches the Applier.
    pub(super) async fn adopt_new_tables(&mut self) -> Result<(), PipelineError> {
        let published = published_tables(self.sql()?, &self.cfg.source.publication).await?;
        self.adopt(&published).await
    }

    /// [`Session::adopt_new_tables`] with the publication as read.
    async fn adopt(&mut self, published: &[Published]) -> Result<(), PipelineError> {
        self.next_publication_check = tokio::time::Instant::now() + PUBLICATION_CHECK;
        if !self.cfg.snapshot.enabled {
            return Ok(());
        }
        let recopy = std::mem::take(&mut self.recopy);
        let unknown: Vec<Published> = published
            .iter()
            .filter(|p| {
                self.known.get(&p.qualified()) != Some(&p.oid) || recopy.contains(&p.qualified())
            })
            .cloned()
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let mirrors: HashSet<String> = inspect::list_tables(&self.warehouse)
            .await?
            .into_iter()
            .map(|(s, t)| format!("{s}.{t}"))
            .collect();
        let history = SchemaHistory::new(&self.warehouse)?;
        let mut copy = Vec::new();
        for p in unknown {
            let recorded = history.latest(&p.schema, &p.name).await?.map(|v| v.oid);
            let current = mirrors.contains(&p.qualified())
                && !recopy.contains(&p.qualified())
                // No record: a copy cut short (killed before, or right after, its commit: a
                // copy records its version once durable) or a warehouse written before the
                // schema history. Either way the table is copied: trusting a mirror with rows
                // but no record kept an old generation's rows beside the new one's.
                && recorded == Some(p.oid);
            if current {
                self.known.insert(p.qualified(), p.oid);
            } else {
                if recorded.is_some_and(|oid| oid != p.oid) {
                    tracing::warn!(table = %p.qualified(), "the table was dropped and created again: \
                        its mirror is replaced by a copy of the new table");
                }
                copy.push(p);
            }
        }
        if copy.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = copy.iter().map(Published::qualified).collect();
        tracing::info!(tables = ?names, "copying tables whose rows the stream does not carry");
        let applier = idle(&mut self.applier)?;
        for p in &copy {
            if let Some((rel, aside)) = self.retyped.get(&p.qualified()) {
                applier.set_aside(&p.qualified(), rel, aside).await?;
            }
        }
        crate::snapshot::copy_beside_stream(self.cfg, &self.warehouse, &copy).await?;
        for p in copy {
            applier.forget(&p.qualified());
            self.retyped.remove(&p.qualified());
            self.known.insert(p.qualified(), p.oid);
        }
        Ok(())
    }

    /// Resolves a relation description against the catalog (`source::types`) before any change
    /// of its is decoded. The description it follows (this session's, else the one recorded in
    /// the schema history for the transaction's LSN) tells renamed columns from added ones, and
    /// type changes the warehouse cannot follow (see [`Session::retype`]).
    /// A masked table's description is masked first (`decode::mask`): from here on only the
    /// warehouse's view of it exists (the description it follows is masked too).
    pub(super) async fn resolve_relation(
        &mut self,
        stream: &ReplicationStream,
        mut relation: Relation,
        before: Option<Arc<Relation>>,
    ) -> Result<(), PipelineError> {
        let mask = self.masks.of(&relation).map_err(SourceError::Setup)?;
        if let Some(m) = &mask {
            relation = m.relation(&relation);
        }
        let previous: Option<Vec<(String, i16, Option<DataType>)>> = match before {
            Some(b) if b.oid == relation.oid => Some(
                b.columns
                    .iter()
                    .map(|c| (c.name.clone(), c.attnum, Some(column_type(c))))
                    .collect(),
            ),
            _ => {
                let at = self.assembler.open_commit_lsn().unwrap_or(Lsn(u64::MAX));
                SchemaHistory::new(&self.warehouse)?
                    .at(&relation.schema, &relation.name, at)
                    .await?
                    .filter(|v| v.oid == relation.oid)
                    .map(|v| {
                        v.columns
                            .into_iter()
                            .map(|c| (c.name, c.attnum, c.arrow_type.parse().ok()))
                            .collect()
                    })
            }
        };
        let names: Option<Vec<(String, i16)>> = previous
            .as_ref()
            .map(|p| p.iter().map(|(n, a, _)| (n.clone(), *a)).collect());
        let sql = self.sql.as_ref().ok_or_else(no_sql)?;
        let ambiguous = self
            .types
            .resolve(sql, &mut relation, names.as_deref())
            .await?;
        let retyped = previous
            .as_deref()
            .map(|p| incompatible(p, &relation))
            .unwrap_or_default();
        if (ambiguous || !retyped.is_empty()) && !self.recorded_as(&relation).await? {
            let name = crate::batch::table_name(&relation);
            if !retyped.is_empty() {
                self.retype(stream, &relation, retyped).await?;
            } else {
                tracing::warn!(table = %name, "a column was added with a default (which the rows \
                    from before hold), or columns changed while walden lagged behind in a way the \
                    catalog cannot tell apart: the table is copied again");
                self.recopy.insert(name);
            }
        }
        self.assembler.set_relation(relation, mask);
        Ok(())
    }

    /// Columns of `rel` whose type the source changed in a way the warehouse cannot follow
    /// (`schema.on_incompatible_type = "copy"`, with snapshots on): what is buffered is made
    /// durable first (those rows are of the old type), then the columns move aside in both Delta
    /// tables and the table is copied again before any change of the new type is applied
    /// (`adopt_new_tables`). With `stop`, the Applier stops at the change with what to do.
    async fn retype(
        &mut self,
        stream: &ReplicationStream,
        rel: &Relation,
        columns: Vec<String>,
    ) -> Result<(), PipelineError> {
        if self.cfg.schema.on_incompatible_type != IncompatibleType::Copy
            || !self.cfg.snapshot.enabled
        {
            return Ok(());
        }
        self.start_flush(stream).await?;
        self.finish_flush(stream).await?;
        let at = self.assembler.open_commit_lsn().unwrap_or_default();
        let aside = columns
            .into_iter()
            .map(|c| {
                let to = retyped_name(&c, at);
                (c, to)
            })
            .collect();
        let name = crate::batch::table_name(rel);
        self.retyped.insert(name.clone(), (rel.clone(), aside));
        self.recopy.insert(name);
        Ok(())
    }

    /// The newest recorded schema version of `rel`'s table has exactly its columns: a copy (or
    /// a look at the catalog) already took the warehouse there, even if this session's previous
    /// description of the table is older.
    async fn recorded_as(&self, rel: &Relation) -> Result<bool, PipelineError> {
        let now = SchemaVersion::of(rel, Lsn(0));
        Ok(SchemaHistory::new(&self.warehouse)?
            .latest(&rel.schema, &rel.name)
            .await?
            .is_some_and(|v| v.same_as(&now)))
    }

    /// Looks at the catalog between batches: tables that joined the publication, and columns
    /// added with no change since (see [`Session::follow_added_columns`]).
    /// The publication is read once for both.
    pub(super) async fn check_catalog(&mut self) -> Result<(), PipelineError> {
        let published = published_tables(self.sql()?, &self.cfg.source.publication).await?;
        self.adopt(&published).await?;
        self.follow_added_columns(&published).await?;
        if !self.recopy.is_empty() {
            self.adopt(&published).await?;
        }
        Ok(())
    }

    /// Columns added at the source that no change has brought since. pgoutput describes a table
    /// only before its next change, so the catalog is asked: the highest live attribute number
    /// of each known table grows with every ADD COLUMN. A column added without a default is
    /// added to both Delta tables (every existing row holds NULL, as at the source); one with a
    /// default makes the table be copied again, as when the stream brings such a column.
    /// Anything else (renames, drops, type changes) waits for the table's next change, whose
    /// description says exactly what changed.
    async fn follow_added_columns(&mut self, published: &[Published]) -> Result<(), PipelineError> {
        let sql = self.sql.as_ref().ok_or_else(no_sql)?;
        let published: Vec<&Published> = published
            .iter()
            .filter(|p| self.known.get(&p.qualified()) == Some(&p.oid))
            .collect();
        let oids: Vec<u32> = published.iter().map(|p| p.oid).collect();
        let newest = newest_columns(sql, &oids).await?;
        let history = SchemaHistory::new(&self.warehouse)?;
        for p in published {
            let Some(&n) = newest.get(&p.oid) else {
                continue;
            };
            if self.columns_seen.insert(p.oid, n) == Some(n) {
                continue;
            }
            let Some(recorded) = history
                .latest(&p.schema, &p.name)
                .await?
                .filter(|v| v.oid == p.oid && v.columns.iter().all(|c| c.attnum < n))
            else {
                continue;
            };
            let mut rel = describe(sql, p, &self.masks).await?.relation;
            let previous: Vec<(String, i16)> = recorded
                .columns
                .iter()
                .map(|c| (c.name.clone(), c.attnum))
                .collect();
            let recopy = self.types.resolve(sql, &mut rel, Some(&previous)).await?;
            if !SchemaVersion::of(&rel, Lsn(0)).only_adds_to(&recorded) {
                continue;
            }
            let name = p.qualified();
            if recopy {
                tracing::warn!(table = %name, "a column was added with a default, which the rows \
                    from before hold: the table is copied again");
                self.recopy.insert(name);
                continue;
            }
            // Read after the catalog: the columns existed by then.
            let at = crate::source::current_wal_lsn(sql).await?;
            tracing::info!(table = %name, %at, "columns added at the source with no change since: \
                added to the warehouse");
            idle(&mut self.applier)?
                .add_columns(&name, &rel, at)
                .await?;
        }
        Ok(())
    }
}

/// Columns of `rel` whose Arrow type the Delta column of the previous description's type cannot
/// follow (`evolve`'s rule, [`follows`]); matched by attribute number, else by name.
fn incompatible(previous: &[(String, i16, Option<DataType>)], rel: &Relation) -> Vec<String> {
    rel.columns
        .iter()
        .filter_map(|c| {
            let (_, _, was) = previous.iter().find(|(n, a, _)| {
                if *a != 0 && c.attnum != 0 {
                    *a == c.attnum
                } else {
                    *n == c.name
                }
            })?;
            (!follows(was.as_ref()?, &column_type(c))).then(|| c.name.clone())
        })
        .collect()
}
