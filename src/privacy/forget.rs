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

use std::collections::BTreeMap;

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::Action;
use deltalake::protocol::DeltaOperation;
use deltalake::{DeltaTable, DeltaTableError};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::Serialize;

use super::pending::{delete, drop_log_before_checkpoint, pending_dir, Pending};
use super::scan::{self, Place, Subject};
use super::select::Selector;
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
    /// Per subject erased, HMAC-SHA256 of `name=identifier` under `privacy.key`: the
    /// identifier never in clear.
    pub subject_hmacs: Vec<String>,
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
    let values = std::slice::from_ref(&subject.value);
    let present = at_source(cfg, &subject.name, values).await?;
    let source_rows: u64 = present.values().sum();
    if source_rows > 0 && !force {
        return Err(PrivacyError::StillAtSource {
            subject: subject.name.clone(),
            rows: source_rows,
        });
    }
    let mut receipt = erase_all(cfg, &subject.name, values, dry_run).await?;
    receipt.source_rows = source_rows;
    Ok(receipt)
}

/// Erases the subjects `values` of subject `name` from every table mapped to it, in one pass:
/// each table's files are rewritten once for all of them. No look at the source (the caller's).
pub async fn erase_all(
    cfg: &Config,
    name: &str,
    values: &[String],
    dry_run: bool,
) -> Result<Receipt, PrivacyError> {
    let selection = scan::subject_selection(&cfg.privacy, name, values)
        .ok_or_else(|| scan::unknown_subject(&cfg.privacy, name))?;
    let erased: Vec<String> = values.iter().map(|v| format!("{name}={v}")).collect();
    erase_selected(cfg, name, &erased, &selection, dry_run).await
}

/// Erases the rows `selection` picks from each of its tables (changelog and mirror), in one
/// pass: each table's files are rewritten once. `erased` names what goes (subjects as
/// `name=identifier`, rows as `table:key`), in the receipt only as keyed hashes; `label` is the
/// receipt's subject. No look at the source (the caller's).
pub async fn erase_selected(
    cfg: &Config,
    label: &str,
    erased: &[String],
    selection: &[(String, Selector)],
    dry_run: bool,
) -> Result<Receipt, PrivacyError> {
    let key = cfg.privacy.key.as_deref().unwrap_or_default();
    let hasher = Hasher::new(key.as_bytes());
    let at = chrono::Utc::now();
    let subject_hmacs: Vec<String> = erased.iter().map(|v| hasher.hex(v.as_bytes())).collect();
    let mut receipt = Receipt {
        id: format!(
            "{}-{}",
            at.format("%Y%m%dT%H%M%S%.3fZ"),
            &hasher.hex(subject_hmacs.concat().as_bytes())[..16]
        ),
        at: at.to_rfc3339(),
        subject: label.to_string(),
        subject_hmacs,
        dry_run,
        source_rows: 0,
        tables: Vec::new(),
        remaining: 0,
    };
    let w = Warehouse::new(&cfg.warehouse)?;
    // Two phases: everything but the changelogs' delete rows, then those. The deletes are what
    // makes rows or a subject due (`propagate`), so until the last phase a crash leaves them
    // due, and the next round finds whatever is left.
    let phases: &[bool] = if dry_run { &[false] } else { &[true, false] };
    for &keep_deletes in phases {
        let found = scan::find_selected(cfg, label, selection).await?;
        let mut by_table: BTreeMap<(String, &'static str), Vec<Place>> = BTreeMap::new();
        for p in found.places {
            by_table
                .entry((p.table.clone(), p.kind))
                .or_default()
                .push(p);
        }
        for ((table, kind), places) in by_table {
            let erasure = if dry_run {
                plan_only(&table, kind, &places)
            } else {
                let selector = &selection
                    .iter()
                    .find(|(t, _)| *t == table)
                    .expect("places are of selected tables")
                    .1;
                let target = Erasing {
                    w: &w,
                    table: &table,
                    kind,
                    selector,
                    keep_deletes,
                };
                target.run(&places, &receipt.id).await?
            };
            merge(&mut receipt.tables, erasure);
        }
    }
    if !dry_run {
        receipt.remaining = scan::find_selected(cfg, label, selection)
            .await?
            .places
            .len();
        let store = w.object_store("_walden/erasures/")?;
        let body = serde_json::to_vec_pretty(&receipt).expect("a receipt serializes");
        store
            .put(
                &Path::from(format!("{}.json", receipt.id)),
                PutPayload::from(body),
            )
            .await
            .map_err(|e| SinkError::Store(Box::new(e)))?;
        tracing::info!(subject = %receipt.subject, erased = erased.len(), receipt = %receipt.id,
            remaining = receipt.remaining, "erased from the warehouse");
    }
    Ok(receipt)
}

/// Rows of each of the subjects `values` the source still holds over the tables mapped to
/// subject `name` (compared as Postgres prints the column, as the scan compares the
/// warehouse's); values it holds no row of are left out.
pub async fn at_source(
    cfg: &Config,
    name: &str,
    values: &[String],
) -> Result<BTreeMap<String, u64>, PrivacyError> {
    let sql = crate::source::connect_sql(&cfg.source).await?;
    let mut out = BTreeMap::new();
    for (table, column) in &cfg.privacy.subjects[name] {
        let (schema, tname) = super::split(table);
        let relation = format!("{}.{}", quote_ident(schema), quote_ident(tname));
        for (value, n) in held(&sql, &relation, column, values).await? {
            *out.entry(value).or_default() += n;
        }
    }
    Ok(out)
}

/// Rows of `relation` whose `column`, as Postgres prints it, is one of `values`, per value.
/// The values are first cast to the column's own type, so an index on the column finds the
/// rows instead of a scan of the table; the text comparison then keeps exactly what the
/// warehouse's comparison would (a numeric 42.0 is not "42"). When a value is not of the
/// column's type (no row can hold it), the text comparison alone decides.
async fn held(
    sql: &tokio_postgres::Client,
    relation: &str,
    column: &str,
    values: &[String],
) -> Result<Vec<(String, u64)>, crate::source::SourceError> {
    let c = quote_ident(column);
    let as_text = format!("format('%s', {c}) = ANY($1)");
    let query = |filter: &str| {
        format!("SELECT format('%s', {c}), count(*) FROM {relation} WHERE {filter} GROUP BY 1")
    };
    let typed = sql
        .query_opt(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = $1::text::regclass AND attname = $2::text AND NOT attisdropped",
            &[&relation, &column],
        )
        .await?
        .map(|r| r.get::<_, String>(0));
    let rows = match typed {
        Some(t) => {
            let by_type = format!("{c} = ANY($1::text[]::{t}[]) AND {as_text}");
            match sql.query(&query(&by_type), &[&values]).await {
                Ok(rows) => rows,
                // Class 22, data exception: a value the type cannot hold.
                Err(e) if e.code().is_some_and(|s| s.code().starts_with("22")) => {
                    sql.query(&query(&as_text), &[&values]).await?
                }
                Err(e) => return Err(e.into()),
            }
        }
        None => sql.query(&query(&as_text), &[&values]).await?,
    };
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get::<_, i64>(1).max(0) as u64))
        .collect())
}

/// One table's erasure in one phase.
struct Erasing<'a> {
    w: &'a Warehouse,
    table: &'a str,
    kind: &'static str,
    selector: &'a Selector,
    keep_deletes: bool,
}

impl Erasing<'_> {
    async fn run(&self, places: &[Place], receipt: &str) -> Result<TableErasure, PrivacyError> {
        let kind = if self.kind == "mirror" {
            TableKind::Mirror
        } else {
            TableKind::Changes
        };
        let (url, t) = super::open(self.w, kind, self.table).await?;
        let delta = |source| SinkError::Delta {
            table: url.to_string(),
            source,
        };
        let mut t = t.ok_or_else(|| delta(DeltaTableError::NotATable(url.to_string())))?;
        let target = Target {
            table: self.table,
            kind: self.kind,
            keep_deletes: self.keep_deletes && self.kind == "changelog",
            selector: self.selector,
        };
        let pending = self.w.object_store(&pending_dir(&url, self.w))?;
        Ok(erase(&mut t, &target, places, (receipt, &pending))
            .await
            .map_err(delta)?)
    }
}

/// Adds one phase's erasure of a table to the receipt's entry for it.
fn merge(tables: &mut Vec<TableErasure>, e: TableErasure) {
    match tables
        .iter_mut()
        .find(|t| t.table == e.table && t.kind == e.kind)
    {
        Some(t) => {
            t.rows_removed += e.rows_removed;
            t.files_rewritten.extend(e.files_rewritten);
            t.files_deleted.extend(e.files_deleted);
            t.log_entries_deleted.extend(e.log_entries_deleted);
            t.version = e.version.or(t.version);
        }
        None => tables.push(e),
    }
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

/// What one table's erasure needs to know of its target.
struct Target<'a> {
    table: &'a str,
    kind: &'static str,
    /// The changelog's delete rows stay (first phase).
    keep_deletes: bool,
    selector: &'a Selector,
}

/// What a rewrite committed.
#[derive(Default)]
struct Rewrite {
    version: Option<i64>,
    removed: u64,
    files: Vec<String>,
}

/// Erases the subjects from `t`: rewrites the current files holding them ([`rewrite`]), then
/// deletes every file that held them (and the log before a checkpoint when log entries
/// described such files), with a pending record covering the time in between.
async fn erase(
    t: &mut DeltaTable,
    target: &Target<'_>,
    places: &[Place],
    (receipt, pending_store): (&str, &deltalake::logstore::ObjectStoreRef),
) -> Result<TableErasure, DeltaTableError> {
    let holders: Vec<&Place> = places.iter().filter(|p| p.rows > 0).collect();
    let pending = Pending {
        store: pending_store.clone(),
        name: format!("{receipt}-{}-{}.json", target.kind, target.table),
        files: holders.iter().map(|p| p.path.clone()).collect(),
    };
    pending.write(places.iter().any(|p| p.in_log)).await?;
    let done = rewrite(t, target, &pending.files, receipt).await?;
    let store = t.object_store();
    let mut deleted = Vec::new();
    for p in holders
        .iter()
        .filter(|p| !p.current || done.files.contains(&p.path))
    {
        delete(&store, &p.path).await?;
        deleted.push(p.file.clone());
    }
    // Entries describing files that held the subject copied values of its rows into their
    // statistics: the log before a checkpoint at this version goes, so time travel to before
    // the erasure ends here (the data of those versions is gone anyway). The entry of this
    // version stays (readers and writers need it): it is the erasure's own commit, whose adds
    // are rewritten files and whose removes carry no statistics.
    let log_entries_deleted = if places.iter().any(|p| p.in_log) {
        drop_log_before_checkpoint(t).await?
    } else {
        Vec::new()
    };
    delete(&pending.store, &pending.name).await?;
    Ok(TableErasure {
        table: target.table.to_string(),
        kind: target.kind,
        rows_removed: done.removed,
        files_rewritten: done.files,
        files_deleted: deleted,
        log_entries_deleted,
        version: done.version,
    })
}

/// Rewrites the current files of `t` among `holders` without the subjects' rows, in one commit
/// (made again on a newer version when a writer raced it: the stream's commits are blind
/// appends or take rows out by deletion vectors, and a mirror commit that loses to this one is
/// located anew by `apply::settle`).
async fn rewrite(
    t: &mut DeltaTable,
    target: &Target<'_>,
    holders: &[String],
    receipt: &str,
) -> Result<Rewrite, DeltaTableError> {
    for attempt in 1.. {
        let state = t.snapshot()?.clone();
        let schema = evolve::table_schema(t)?;
        let mut actions = Vec::new();
        let mut out = Rewrite::default();
        for file in state.log_data().iter() {
            if !holders.iter().any(|h| h.as_str() == file.path().as_ref()) {
                continue;
            }
            let batches = files::read_live(t, &file)
                .await
                .map_err(|e| DeltaTableError::Generic(e.to_string()))?;
            let (rest, taken) = without(&batches, &schema, target)?;
            if taken == 0 && target.keep_deletes {
                // Only the subjects' deletes: they stay until the last phase.
                continue;
            }
            out.removed += taken;
            out.files.push(file.path().to_string());
            actions.push(Action::Remove(file.remove_action(true)));
            if let Some(batch) = rest {
                for add in files::write_files(t, batch, writer_properties()).await? {
                    actions.push(Action::Add(add));
                }
            }
        }
        if actions.is_empty() {
            return Ok(Rewrite::default());
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
                crate::checkpoint::failpoint("after-erasure-commit");
                out.version = Some(c.version() as i64);
                t.state = Some(c.snapshot());
                return Ok(out);
            }
            Err(e) if attempt < 5 => {
                tracing::info!(table = target.table, error = %e, "erasure commit lost a race; trying again");
                t.update_state().await?;
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the loop returns by its fifth attempt")
}

/// A file's live rows without the subjects' (and, in the first phase, with their deletes): the
/// rows that stay, as one batch of the table's schema (none when nothing stays), and how many
/// were taken.
fn without(
    batches: &[arrow::array::RecordBatch],
    schema: &arrow::datatypes::SchemaRef,
    target: &Target<'_>,
) -> Result<(Option<arrow::array::RecordBatch>, u64), DeltaTableError> {
    let mut rest = Vec::new();
    let mut taken = 0;
    for b in batches.iter().filter(|b| b.num_rows() > 0) {
        let b = evolve::align(b, schema)?;
        let Some(mut hit) = target.selector.hits(&b) else {
            rest.push(b);
            continue;
        };
        if target.keep_deletes {
            hit = arrow::compute::and_not(&hit, &is_delete(&b))?;
        }
        taken += hit.true_count() as u64;
        let kept = arrow::compute::filter_record_batch(&b, &arrow::compute::not(&hit)?)?;
        if kept.num_rows() > 0 {
            rest.push(kept);
        }
    }
    if rest.is_empty() {
        return Ok((None, taken));
    }
    Ok((Some(arrow::compute::concat_batches(schema, &rest)?), taken))
}

/// Rows of a changelog batch that record a delete.
fn is_delete(b: &arrow::array::RecordBatch) -> arrow::array::BooleanArray {
    use arrow::array::AsArray;
    match b.column_by_name(crate::batch::OP) {
        Some(op) => op
            .as_string_opt::<i32>()
            .map(|op| op.iter().map(|v| Some(v == Some("delete"))).collect())
            .unwrap_or_else(|| vec![false; b.num_rows()].into()),
        None => vec![false; b.num_rows()].into(),
    }
}
