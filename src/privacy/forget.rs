//! `walden forget`: one data subject erased from the warehouse, physically, with a receipt.
//!
//! Owns the erasure of a subject found by [`super::scan`]: in every table mapped to the subject
//! (changelog and mirror), the current files holding the subject's rows are rewritten without
//! them (one Delta commit per table, `dataChange = true`: rows leave), then every file that held
//! them, current before the commit or only in older versions, is deleted at once, not after the
//! retention; Delta log entries whose column statistics held the identifier go too, once a
//! checkpoint at the new version makes them unnecessary (time travel to before the erasure ends
//! there). A receipt under `_walden/erasures/` says what was done; the subject appears in it
//! only as its keyed hash. The source is asked first: while it still holds the subject's rows,
//! the next change would bring them back, so `forget` refuses without `--force`.

use std::collections::{BTreeMap, HashSet};

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::Action;
use deltalake::protocol::DeltaOperation;
use deltalake::{DeltaTable, DeltaTableError};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Serialize;

use super::scan::{self, holding, stored_value, Place, Subject};
use super::PrivacyError;
use crate::apply::{evolve, files};
use crate::config::Config;
use crate::decode::mask::Hasher;
use crate::sink::{writer_properties, SinkError, TableKind, Warehouse};
use crate::source::replication::quote_ident;

/// What one table gave up.
#[derive(Debug, Clone, Serialize)]
pub struct TableErasure {
    pub table: String,
    pub kind: &'static str,
    /// Rows taken out of the current version.
    pub rows_removed: u64,
    /// Current files rewritten without the subject's rows (then deleted).
    pub files_rewritten: Vec<String>,
    /// Every file deleted: those rewritten, and files of older versions that held the subject.
    pub files_deleted: Vec<String>,
    /// Delta log entries deleted: every one before the checkpoint written after the erasure
    /// (entries describing files that held the subject copy values of its rows into their
    /// statistics). A dry run lists those that hold the subject.
    pub log_entries_deleted: Vec<String>,
    /// The Delta version the rewrite committed (none when only older versions held the subject).
    pub version: Option<i64>,
}

/// The record of one erasure (or, with `dry_run`, of what one would do).
#[derive(Debug, Serialize)]
pub struct Receipt {
    pub id: String,
    pub at: String,
    /// The subject's name in `[privacy.subjects]`.
    pub subject: String,
    /// HMAC-SHA256 of `name=identifier` under `privacy.key`: the identifier never in clear.
    pub subject_hmac: String,
    pub dry_run: bool,
    /// Rows the source still held (erased anyway: `--force`).
    pub source_rows: u64,
    pub tables: Vec<TableErasure>,
    /// Places that still held the subject after the erasure (0 unless a writer raced it).
    pub remaining: usize,
}

impl Receipt {
    pub fn render(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .tables
            .iter()
            .map(|t| {
                vec![
                    t.table.clone(),
                    t.kind.to_string(),
                    t.rows_removed.to_string(),
                    t.files_rewritten.len().to_string(),
                    t.files_deleted.len().to_string(),
                    t.log_entries_deleted.len().to_string(),
                    t.version.map_or("-".into(), |v| v.to_string()),
                ]
            })
            .collect();
        let mut out = crate::ops::text_table(
            &[
                "table",
                "kind",
                "rows",
                "files_rewritten",
                "files_deleted",
                "log_entries",
                "version",
            ],
            &rows,
        );
        if self.dry_run {
            out.push_str("dry run: nothing was changed; the rows and files above would go\n");
        } else {
            out.push_str(&format!(
                "erased subject {} (receipt _walden/erasures/{}.json); {} place(s) still hold it\n",
                self.subject, self.id, self.remaining
            ));
        }
        out
    }
}

/// Erases `subject` from every table mapped to it (see the module docs).
pub async fn forget(
    cfg: &Config,
    subject: &Subject,
    dry_run: bool,
    force: bool,
) -> Result<Receipt, PrivacyError> {
    let found = scan::find(cfg, subject).await?;
    let source_rows = at_source(cfg, subject).await?;
    if source_rows > 0 && !force {
        return Err(PrivacyError::StillAtSource {
            subject: subject.name.clone(),
            rows: source_rows,
        });
    }
    let key = cfg.privacy.key.as_deref().unwrap_or_default();
    let hasher = Hasher::new(key.as_bytes());
    let at = chrono::Utc::now();
    let subject_hmac = hasher.hex(format!("{}={}", subject.name, subject.value).as_bytes());
    let mut receipt = Receipt {
        id: format!(
            "{}-{}",
            at.format("%Y%m%dT%H%M%S%.3fZ"),
            &subject_hmac[..16]
        ),
        at: at.to_rfc3339(),
        subject: subject.name.clone(),
        subject_hmac,
        dry_run,
        source_rows,
        tables: Vec::new(),
        remaining: 0,
    };
    let mut by_table: BTreeMap<(String, &'static str), Vec<Place>> = BTreeMap::new();
    for p in found.places {
        by_table
            .entry((p.table.clone(), p.kind))
            .or_default()
            .push(p);
    }
    let w = Warehouse::new(&cfg.warehouse)?;
    let columns = &cfg.privacy.subjects[&subject.name];
    for ((table, kind), places) in by_table {
        let column = &columns[&table];
        let wanted = stored_value(&cfg.privacy, &table, column, &subject.value);
        let erasure = if dry_run {
            plan_only(&table, kind, &places)
        } else {
            let (schema, name) = table.split_once('.').unwrap_or(("public", &table));
            let kind_of = if kind == "mirror" {
                TableKind::Mirror
            } else {
                TableKind::Changes
            };
            let url = w.table_url(kind_of, schema, name);
            let delta = |source| SinkError::Delta {
                table: url.to_string(),
                source,
            };
            let mut t = w
                .open(&url)
                .await
                .map_err(delta)?
                .ok_or_else(|| delta(DeltaTableError::NotATable(url.to_string())))?;
            erase(
                &mut t,
                (&table, kind),
                column,
                &wanted,
                &places,
                &receipt.id,
            )
            .await
            .map_err(delta)?
        };
        receipt.tables.push(erasure);
    }
    if !dry_run {
        receipt.remaining = scan::find(cfg, subject).await?.places.len();
        let store = w.object_store("_walden/erasures/")?;
        let body = serde_json::to_vec_pretty(&receipt).expect("a receipt serializes");
        store
            .put(
                &Path::from(format!("{}.json", receipt.id)),
                PutPayload::from(body),
            )
            .await
            .map_err(|e| SinkError::Store(Box::new(e)))?;
        tracing::info!(subject = %receipt.subject, receipt = %receipt.id, remaining = receipt.remaining,
            "subject erased");
    }
    Ok(receipt)
}

/// Rows of the subject the source still holds, over its mapped tables (compared as Postgres
/// prints the column, as the scan compares the warehouse's).
async fn at_source(cfg: &Config, subject: &Subject) -> Result<u64, PrivacyError> {
    let sql = crate::source::connect_sql(&cfg.source).await?;
    let mut rows = 0u64;
    for (table, column) in &cfg.privacy.subjects[&subject.name] {
        let (schema, name) = table.split_once('.').unwrap_or(("public", table));
        let q = format!(
            "SELECT count(*) FROM {}.{} WHERE format('%s', {}) = $1",
            quote_ident(schema),
            quote_ident(name),
            quote_ident(column)
        );
        let n: i64 = sql
            .query_one(&q, &[&subject.value])
            .await
            .map_err(crate::source::SourceError::from)?
            .get(0);
        rows += n.max(0) as u64;
    }
    Ok(rows)
}

/// What erasing `places` would do, without doing it.
fn plan_only(table: &str, kind: &'static str, places: &[Place]) -> TableErasure {
    TableErasure {
        table: table.to_string(),
        kind,
        rows_removed: places.iter().filter(|p| p.current).map(|p| p.rows).sum(),
        files_rewritten: files_of(places, |p| p.current && p.rows > 0),
        files_deleted: files_of(places, |p| p.rows > 0),
        log_entries_deleted: files_of(places, |p| p.in_log),
        version: None,
    }
}

fn files_of(places: &[Place], pick: impl Fn(&Place) -> bool) -> Vec<String> {
    places
        .iter()
        .filter(|p| pick(p))
        .map(|p| p.file.clone())
        .collect()
}

/// Rewrites the current files of `t` that hold the subject without its rows (in one commit,
/// made again on a newer version when a writer raced it), then deletes every file that held
/// the subject, and the log entries whose statistics did once a checkpoint covers them.
async fn erase(
    t: &mut DeltaTable,
    (table, kind): (&str, &'static str),
    column: &str,
    wanted: &str,
    places: &[Place],
    receipt: &str,
) -> Result<TableErasure, DeltaTableError> {
    let mut out = plan_only(table, kind, places);
    out.files_rewritten.clear();
    out.rows_removed = 0;
    let holders: HashSet<&str> = places
        .iter()
        .filter(|p| p.rows > 0)
        .map(|p| p.path.as_str())
        .collect();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let state = t.snapshot()?.clone();
        let schema = evolve::table_schema(t)?;
        let mut actions = Vec::new();
        let mut removed = 0u64;
        let mut rewritten = Vec::new();
        for file in state.log_data().iter() {
            if !holders.contains(file.path().as_ref()) {
                continue;
            }
            let batches = files::read_live(t, &file)
                .await
                .map_err(|e| DeltaTableError::Generic(e.to_string()))?;
            let mut rest = Vec::new();
            for b in batches.iter().filter(|b| b.num_rows() > 0) {
                let b = evolve::align(b, &schema)?;
                let keep = match holding(&b, column, wanted) {
                    Some(hit) => {
                        removed += hit.true_count() as u64;
                        arrow::compute::not(&hit)?
                    }
                    None => continue,
                };
                rest.push(arrow::compute::filter_record_batch(&b, &keep)?);
            }
            rewritten.push(file.path().to_string());
            actions.push(Action::Remove(file.remove_action(true)));
            let rest: Vec<_> = rest.into_iter().filter(|b| b.num_rows() > 0).collect();
            if !rest.is_empty() {
                let batch = arrow::compute::concat_batches(&schema, &rest)?;
                for add in files::write_files(t, batch, writer_properties()).await? {
                    actions.push(Action::Add(add));
                }
            }
        }
        if actions.is_empty() {
            break;
        }
        let done = CommitBuilder::from(CommitProperties::default().with_max_retries(0))
            .with_actions(actions)
            .build(
                Some(&state),
                t.log_store(),
                DeltaOperation::Delete {
                    predicate: Some(format!("walden forget, receipt {receipt}")),
                },
            )
            .await;
        match done {
            Ok(c) => {
                out.version = Some(c.version() as i64);
                t.state = Some(c.snapshot());
                out.rows_removed = removed;
                out.files_rewritten = rewritten;
                break;
            }
            // A stream commit landed first: read the table again and redo the rewrite there.
            Err(e) if attempts < 5 => {
                tracing::info!(table, error = %e, "erasure commit lost a race; trying again");
                t.update_state().await?;
            }
            Err(e) => return Err(e),
        }
    }
    let store = t.object_store();
    for p in places.iter().filter(|p| p.rows > 0) {
        delete(&store, &p.path).await?;
    }
    out.log_entries_deleted.clear();
    if places.iter().any(|p| p.in_log) {
        // Entries describing files that held the subject copied values of its rows into their
        // statistics: the log before a checkpoint at this version goes, so time travel to
        // before the erasure ends here (the data of those versions is gone anyway).
        deltalake::checkpoints::create_checkpoint(t, None).await?;
        let newest = t.version().unwrap_or(0) as i64;
        let flagged: HashSet<&str> = places
            .iter()
            .filter(|p| p.in_log)
            .map(|p| p.path.as_str())
            .collect();
        let log: Vec<_> = store
            .list(Some(&Path::from("_delta_log")))
            .try_collect()
            .await
            .map_err(|source| DeltaTableError::ObjectStore { source })?;
        for meta in log {
            let path = meta.location.to_string();
            let Some(v) = log_version(&path) else {
                continue;
            };
            let json_at_newest = v == newest && path.ends_with(".json");
            if v < newest || (json_at_newest && flagged.contains(path.as_str())) {
                delete(&store, &path).await?;
                out.log_entries_deleted.push(path);
            }
        }
    }
    Ok(out)
}

/// The version a `_delta_log/` entry belongs to (commit or checkpoint).
fn log_version(path: &str) -> Option<i64> {
    path.strip_prefix("_delta_log/")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

async fn delete(
    store: &deltalake::logstore::ObjectStoreRef,
    path: &str,
) -> Result<(), DeltaTableError> {
    match store.delete(&Path::from(path)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(DeltaTableError::ObjectStore { source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_entries_name_their_version() {
        assert_eq!(
            log_version("_delta_log/00000000000000000012.json"),
            Some(12)
        );
        assert_eq!(
            log_version("_delta_log/00000000000000000010.checkpoint.parquet"),
            Some(10)
        );
        assert_eq!(log_version("part-0001.parquet"), None);
    }
}
