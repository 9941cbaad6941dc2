//! Deletes at the source reach the warehouse's history: rows and subjects deleted in Postgres
//! are erased from every file of every version, in batches, while `walden run` streams.
//!
//! Owns which rows and subjects are due and when.
//!
//! **Rows**: every delete at the source of a row of a table holding personal data (one that
//! `[privacy.subjects]` maps) makes that row's history due: its versions written before the
//! delete, found by the row's replica identity (`select::Selector::Deleted`), in changelog and
//! mirror, once the mirror has applied the delete. A row inserted again under the same key
//! afterwards is newer and stays. A row's versions under an earlier key are followed through
//! the key changes the changelog records (`_walden_old_key`, see `lineage`). Tables under
//! REPLICA IDENTITY FULL or NOTHING name no key for a deleted row and are left to subjects.
//!
//! **Subjects**: a subject is due when a delete at the source carried its identifier (the
//! delete rows of a mapped table whose subject column is in the deleted row's old image: its
//! key, or every column under REPLICA IDENTITY FULL), every table holds that delete's
//! transaction (it is below the slot's confirmed LSN) and the source no longer holds any row of
//! it in any mapped table. A subject whose column is hashed is searched for by its hash and
//! cannot be read back from a delete: only tables that store the identifier in clear make
//! subjects due.
//!
//! The changelogs' delete rows are the durable queue: an erasure takes them out last, with the
//! rows they made due, so what is due stays due across crashes and restarts, and a crash inside
//! an erasure is finished from its pending record (`forget::resume`). (A delete row of a keyed
//! table leaves with its row's history in the round that reads it, whether its subject is due
//! yet or not: the subject's other rows leave the same way when they are deleted.) Everything
//! due at a round is erased together: each table's files are rewritten once per round, not
//! once per delete. Rounds run every half of `privacy.erase_within`, so a delete is erased
//! within that bound (plus the stream's own delay). Since erased deletes leave, a round reads
//! only the deletes that arrived since the last one: the changelog's `_walden_op` statistics
//! skip every file without a delete row (bench/RESULTS.md).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use arrow::array::AsArray;
use arrow::datatypes::DataType;

use super::forget::{at_source, erase_all, erase_selected, Receipt};
use super::lineage::{Key, Lineage, Pos};
use super::pending::resume;
use super::select::Selector;
use super::PrivacyError;
use crate::apply::inspect;
use crate::batch::{LSN, OP};
use crate::config::{Config, MaskRule};
use crate::sink::schemas::SchemaHistory;
use crate::sink::{TableKind, Warehouse};
use crate::source::replication::quote_ident;

/// The receipt's subject for an erasure of deleted rows' histories.
pub const DELETED_ROWS: &str = "deleted rows";

/// The LSN below which every source transaction is applied in every table: the slot's
/// confirmed flush LSN (walden confirms a transaction once every table holds it). Without the
/// slot nothing streams, so nothing is about to be applied.
async fn settled(cfg: &Config) -> Result<u64, PrivacyError> {
    let sql = crate::source::connect_sql(&cfg.source).await?;
    let row = sql
        .query_opt(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&cfg.source.slot],
        )
        .await
        .map_err(crate::source::SourceError::from)?;
    Ok(match row {
        Some(r) => r.get::<_, Option<i64>>(0).unwrap_or(0).max(0) as u64,
        None => u64::MAX,
    })
}

/// The identifiers of each subject that deletes at the source carried, per subject name:
/// deletes of transactions committed below `below`.
async fn deleted(cfg: &Config, below: u64) -> Result<BTreeMap<String, Vec<String>>, PrivacyError> {
    let w = Warehouse::new(&cfg.warehouse)?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (subject, tables) in &cfg.privacy.subjects {
        for (table, column) in tables {
            if cfg.privacy.rule(table, column) == MaskRule::Hash {
                continue;
            }
            let Some(t) = super::open(&w, TableKind::Changes, table).await?.1 else {
                continue;
            };
            let has_column = t
                .snapshot()
                .map(|s| s.snapshot().arrow_schema().field_with_name(column).is_ok())
                .unwrap_or(false);
            if !has_column {
                continue;
            }
            let col = quote_ident(column);
            let sql = format!(
                "SELECT DISTINCT CAST({col} AS VARCHAR) FROM t \
                 WHERE {LSN} < {below} AND {OP} = 'delete' AND {col} IS NOT NULL"
            );
            let batches = inspect::query(&t, &sql)
                .await
                .map_err(|e| PrivacyError::Query(e.to_string()))?;
            let found = out.entry(subject.clone()).or_default();
            for b in batches {
                let v = arrow::compute::cast(b.column(0), &DataType::Utf8)
                    .map_err(|e| PrivacyError::Query(e.to_string()))?;
                found.extend(v.as_string::<i32>().iter().flatten().map(str::to_string));
            }
        }
    }
    for values in out.values_mut() {
        values.sort();
        values.dedup();
    }
    Ok(out)
}

/// Per table holding personal data whose replica identity is a key, the rows deletes at the
/// source removed that the mirror has applied: by key (as text), the `(commit LSN, sequence)`
/// of the row's last delete, and the keys those rows had before a key change, by the position
/// where they left them (`lineage`). Also returns the commit time of each delete read (µs
/// since the epoch).
async fn deleted_rows(cfg: &Config) -> Result<(Vec<(String, Selector)>, Vec<i64>), PrivacyError> {
    let w = Warehouse::new(&cfg.warehouse)?;
    let history = SchemaHistory::new(&w)?;
    let app_id = crate::apply::app_id(&cfg.source.slot);
    let tables: BTreeSet<&String> = cfg
        .privacy
        .subjects
        .values()
        .flat_map(|t| t.keys())
        .collect();
    let (mut out, mut times) = (Vec::new(), Vec::new());
    for table in tables {
        let (schema, name) = super::split(table);
        let Some(version) = history.latest(schema, name).await? else {
            continue;
        };
        let columns: Vec<String> = version
            .columns
            .iter()
            .filter(|c| c.identity)
            .map(|c| c.name.clone())
            .collect();
        if !matches!(version.replica_identity.as_str(), "d" | "i") || columns.is_empty() {
            continue;
        }
        let (Some(changes), Some(mirror)) = (
            super::open(&w, TableKind::Changes, table).await?.1,
            super::open(&w, TableKind::Mirror, table).await?.1,
        ) else {
            continue;
        };
        // Deletes the mirror has applied: the erasure never takes a row the stream is about
        // to delete.
        let applied = crate::apply::applied_lsn(&mirror, &app_id)
            .await
            .map_err(|e| PrivacyError::Query(e.to_string()))?;
        let lineage = Lineage::read(&changes, &columns, applied.0 as i64).await?;
        times.extend(&lineage.delete_times);
        // Each key's last delete covers its versions before; keys the deleted rows had before
        // a key change, their versions up to the change.
        let mut deletes: HashMap<Key, Pos> = HashMap::new();
        let mut take = |key: Key, at: Pos| {
            let last = deletes.entry(key).or_insert(at);
            *last = (*last).max(at);
        };
        for (key, ats) in &lineage.deletes {
            for &at in ats {
                take(key.clone(), at);
                for (earlier, left) in lineage.earlier(key, at) {
                    take(earlier, left);
                }
            }
        }
        if !deletes.is_empty() {
            out.push((table.clone(), Selector::Deleted { columns, deletes }));
        }
    }
    Ok((out, times))
}

/// One round: finishes erasures a crash cut short, then erases every subject that is due and
/// the histories of rows deleted at the source (see the module docs). Returns the receipts
/// written.
pub async fn round(cfg: &Config) -> Result<Vec<Receipt>, PrivacyError> {
    resume(cfg).await?;
    let mut receipts = Vec::new();
    // A subject is due once every table has applied its deletes: the erasure never takes a row
    // the stream is about to delete (or to write) in a table it has not reached yet.
    let below = settled(cfg).await?;
    for (subject, values) in deleted(cfg, below).await? {
        if values.is_empty() {
            continue;
        }
        let present = at_source(cfg, &subject, &values).await?;
        let due: Vec<String> = values
            .into_iter()
            .filter(|v| !present.contains_key(v))
            .collect();
        if due.is_empty() {
            continue;
        }
        receipts.push(erase_all(cfg, &subject, &due, false).await?);
    }
    let (rows, delete_times) = deleted_rows(cfg).await?;
    if !rows.is_empty() {
        let keys: Vec<String> = rows
            .iter()
            .flat_map(|(table, s)| match s {
                Selector::Deleted { deletes, .. } => deletes
                    .keys()
                    .map(|k| format!("{table}:{}", k.join(",")))
                    .collect(),
                Selector::Subject { .. } => Vec::new(),
            })
            .collect();
        receipts.push(erase_selected(cfg, DELETED_ROWS, &keys, &rows, false).await?);
    }
    // Every delete read is erased now, with its row's history.
    let now = chrono::Utc::now().timestamp_micros();
    for ts in delete_times {
        crate::telemetry::METRICS
            .delete_to_erasure_seconds
            .observe((now - ts).max(0) as f64 / 1e6);
    }
    Ok(receipts)
}

/// Propagated deletes in the background of `walden run`: a [`round`] every half of
/// `privacy.erase_within`, on a thread of its own (`maintain::background`). `None` when no
/// subject is configured, or `privacy.propagate_deletes` is off.
pub fn start(cfg: &Config) -> Option<crate::maintain::Background> {
    if !cfg.privacy.propagates() {
        return None;
    }
    let every = cfg.privacy.erase_within() / 2;
    let cfg = cfg.clone();
    Some(crate::maintain::background(
        "walden-erase",
        every.max(std::time::Duration::from_secs(1)),
        move || {
            let cfg = cfg.clone();
            async move { logged(&cfg).await }
        },
    ))
}

/// A [`round`], its outcome counted and logged (a failed round is tried again at the next).
pub async fn logged(cfg: &Config) {
    match round(cfg).await {
        Ok(receipts) => {
            for r in receipts {
                let erased = r.subject_hmacs.len() as u64;
                match r.subject.as_str() {
                    DELETED_ROWS => crate::telemetry::METRICS
                        .deleted_rows_erased_total
                        .inc_by(erased),
                    _ => crate::telemetry::METRICS
                        .subjects_erased_total
                        .inc_by(erased),
                }
            }
        }
        Err(e) => {
            crate::telemetry::METRICS.erasure_errors_total.inc();
            tracing::warn!(error = %e, "propagating deletes to the warehouse's history failed; \
                trying again next round");
        }
    }
}
