//! Deletes at the source reach the warehouse's history: subjects deleted in Postgres are erased
//! from every file of every version, in batches, while `walden run` streams.
//!
//! Owns which subjects are due and when. A subject is due when a delete at the source carried
//! its identifier (the delete rows of a mapped table whose subject column is in the deleted
//! row's old image: its key, or every column under REPLICA IDENTITY FULL) and the source no
//! longer holds any row of it in any mapped table. The changelogs' delete rows are the durable
//! queue: the erasure takes them out with the rest of the subject's rows, so a subject is due
//! until it is erased, across crashes and restarts; a crash inside an erasure is finished from
//! its pending record (`forget::resume`). All subjects due at a round are erased together: each
//! table's files are rewritten once per round, not once per delete. Rounds run every half of
//! `privacy.erase_within`, so a delete is erased within that bound (plus the stream's own
//! delay). A subject whose column is hashed is searched for by its hash and cannot be read back
//! from a delete: only tables that store the identifier in clear make subjects due.

use std::collections::BTreeMap;

use arrow::array::AsArray;
use arrow::datatypes::DataType;

use super::forget::{at_source, erase_all, Receipt};
use super::pending::resume;
use super::PrivacyError;
use crate::apply::inspect;
use crate::batch::OP;
use crate::config::{Config, MaskRule};
use crate::sink::{TableKind, Warehouse};

/// The identifiers of each subject that deletes at the source carried, per subject name.
async fn deleted(cfg: &Config) -> Result<BTreeMap<String, Vec<String>>, PrivacyError> {
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
            let col = crate::source::replication::quote_ident(column);
            let sql = format!(
                "SELECT DISTINCT CAST({col} AS VARCHAR) FROM t WHERE {OP} = 'delete' AND {col} IS NOT NULL"
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

/// One round: finishes erasures a crash cut short, then erases every subject that is due (see
/// the module docs). Returns the receipts written.
pub async fn round(cfg: &Config) -> Result<Vec<Receipt>, PrivacyError> {
    resume(cfg).await?;
    let mut receipts = Vec::new();
    for (subject, values) in deleted(cfg).await? {
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
                crate::telemetry::METRICS
                    .subjects_erased_total
                    .inc_by(r.subject_hmacs.len() as u64);
            }
        }
        Err(e) => {
            crate::telemetry::METRICS.erasure_errors_total.inc();
            tracing::warn!(error = %e, "propagating deletes to the warehouse's history failed; \
                trying again next round");
        }
    }
}
