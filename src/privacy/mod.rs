//! Personal data in the warehouse: what `[privacy]` names, checked against the source.
//!
//! Owns the checks that the tables and columns `[privacy]` names exist at the source (a mask or a
//! subject on a misspelt name would protect nothing, silently), run before `walden run` streams
//! and by `walden check`. The masking itself happens where values are decoded
//! (`crate::decode::mask`); where a data subject still is, in [`scan`]; erasing one, in
//! [`forget`].

pub mod forget;
mod lineage;
mod pending;
pub mod propagate;
pub mod scan;
pub mod select;

use std::collections::HashSet;

use deltalake::DeltaTable;

use crate::config::{MaskRule, PrivacyConfig};
use crate::sink::{SinkError, TableKind, Warehouse};
use crate::source::SourceError;

#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    #[error("subject {name:?} is not in [privacy.subjects] (configured: {known})")]
    UnknownSubject { name: String, known: String },
    #[error(
        "the source still holds {rows} row(s) of subject {subject}: the next change to them \
        would bring them back into the warehouse. Delete them in Postgres first (the delete \
        reaches the mirror by itself), then run forget again; --force erases the warehouse's \
        copies anyway"
    )]
    StillAtSource { subject: String, rows: u64 },
    #[error("reading a changelog for deleted rows and subjects: {0}")]
    Query(String),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// `schema.table` (as `[privacy]` names tables, checked by its validation) split in two.
fn split(table: &str) -> (&str, &str) {
    table.split_once('.').unwrap_or(("public", table))
}

/// The Delta table of `kind` of the source table `table` (`schema.table`), with its location;
/// `None` when there is none.
async fn open(
    w: &Warehouse,
    kind: TableKind,
    table: &str,
) -> Result<(url::Url, Option<DeltaTable>), SinkError> {
    let (schema, name) = split(table);
    let url = w.table_url(kind, schema, name);
    let t = w.open(&url).await.map_err(|source| SinkError::Delta {
        table: url.to_string(),
        source,
    })?;
    Ok((url, t))
}

/// The files the loaded version of `t` references, as its log names them.
fn current_files(t: &DeltaTable) -> HashSet<String> {
    t.snapshot()
        .map(|s| s.log_data().iter().map(|f| f.path().to_string()).collect())
        .unwrap_or_default()
}

/// Every table and column `[privacy]` names, with what names it.
fn named(cfg: &PrivacyConfig) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (subject, tables) in &cfg.subjects {
        for (table, column) in tables {
            out.push((
                table.clone(),
                column.clone(),
                format!("privacy.subjects.{subject}"),
            ));
        }
    }
    for (table, cols) in &cfg.mask {
        for (column, rule) in cols {
            if *rule != MaskRule::Keep {
                out.push((
                    table.clone(),
                    column.clone(),
                    format!("privacy.mask.\"{table}\""),
                ));
            }
        }
    }
    out
}

/// Refuses a configuration that names a table or column the source does not have, saying which
/// and where. Returns the named tables the publication does not publish (nothing of theirs
/// reaches the warehouse: worth a warning, not a refusal).
pub async fn check_names(
    sql: &tokio_postgres::Client,
    cfg: &PrivacyConfig,
    publication: &str,
) -> Result<Vec<String>, SourceError> {
    let mut unpublished = Vec::new();
    for (table, column, origin) in named(cfg) {
        let (schema, name) = split(&table);
        let row = sql
            .query_opt(
                "SELECT c.oid, EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid \
                   AND a.attnum > 0 AND NOT a.attisdropped AND a.attname = $3), \
                 EXISTS (SELECT 1 FROM pg_publication_tables p WHERE p.pubname = $4 \
                   AND p.schemaname = n.nspname AND p.tablename = c.relname) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &name, &column, &publication],
            )
            .await?;
        let Some(row) = row else {
            return Err(SourceError::Setup(format!(
                "{origin} names table {table}, which does not exist at the source. Fix the name \
                 (schema.table, as in the catalog) or remove it from the configuration"
            )));
        };
        if !row.get::<_, bool>(1) {
            return Err(SourceError::Setup(format!(
                "{origin} names column {column} of {table}, which has no such column. Fix the \
                 name or remove it from the configuration"
            )));
        }
        if !row.get::<_, bool>(2) && !unpublished.contains(&table) {
            unpublished.push(table.clone());
        }
    }
    Ok(unpublished)
}

/// The tables a subject maps whose replica identity names no key (FULL, NOTHING, or DEFAULT
/// without a primary key): a row deleted from them leaves the history only with its subject
/// (`propagate`), so `walden check` and `walden run` say so.
pub async fn keyless_subject_tables(
    sql: &tokio_postgres::Client,
    cfg: &PrivacyConfig,
) -> Result<Vec<String>, SourceError> {
    let tables: std::collections::BTreeSet<&String> =
        cfg.subjects.values().flat_map(|t| t.keys()).collect();
    let mut out = Vec::new();
    for table in tables {
        let (schema, name) = split(table);
        let row = sql
            .query_opt(
                "SELECT c.relreplident::text, EXISTS (SELECT 1 FROM pg_index i \
                   WHERE i.indrelid = c.oid AND i.indisprimary) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &name],
            )
            .await?;
        let Some(row) = row else { continue };
        let (identity, primary_key): (String, bool) = (row.get(0), row.get(1));
        if identity == "f" || identity == "n" || (identity == "d" && !primary_key) {
            out.push(table.clone());
        }
    }
    Ok(out)
}

/// What [`keyless_subject_tables`] means for `tables`.
pub fn keyless_warning(tables: &[String]) -> String {
    format!(
        "rows deleted from {} leave the warehouse's history only with their whole subject: the \
         replica identity names no key for a deleted row",
        tables.join(", ")
    )
}

/// What to tell the operator about [`keyless_subject_tables`].
pub const KEYLESS_HINT: &str = "give each a key: ALTER TABLE … REPLICA IDENTITY DEFAULT (with a \
    primary key) or REPLICA IDENTITY USING INDEX (a unique index on NOT NULL columns)";
