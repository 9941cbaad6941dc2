//! The mirror's view of a batch: the last state of each replica-identity key.
//!
//! Within a batch only the last change per key matters; a key-changing update deletes the old key;
//! a truncate makes everything before it irrelevant (the batch then replaces the table's contents).
//! Columns the server did not send (unchanged TOAST, 'u') are filled from an earlier image of the
//! same key in the batch when there is one, and otherwise flagged per row and column so the merge
//! keeps the mirror's current value.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Int64Array, RecordBatch, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema};

use super::{builders, column_map, mirror_schema, Row, TableBuffer};
use crate::checkpoint::Lsn;
use crate::decode::pgoutput::Value;
use crate::decode::txn::ChangeKind;

/// Merge-source column: true when the row is to be deleted.
pub const DELETE_FLAG: &str = "__walden_delete";

/// Merge-source column for column `i`: true when its value was not sent and must be kept.
pub fn unchanged_flag(i: usize) -> String {
    format!("__walden_unchanged_{i}")
}

pub struct MirrorBatch {
    /// Mirror columns, then [`DELETE_FLAG`], then one [`unchanged_flag`] per column in `unchanged`.
    pub batch: RecordBatch,
    /// A truncate is in the batch: the table's contents are replaced by the batch's upserts.
    pub replace: bool,
    /// Names of the replica-identity columns (empty: the table has no key, rows are appended).
    pub keys: Vec<String>,
    /// Indices of source columns that have at least one unchanged value in the batch.
    pub unchanged: Vec<usize>,
    /// Number of deletes in the batch.
    pub deletes: usize,
    /// Every change was an insert: no key can already be in the mirror (earlier batches were
    /// applied, later ones skipped by LSN), so the rows can be appended without a merge.
    pub insert_only: bool,
    pub unrepresentable: u64,
}

/// The mirror's fields followed by [`DELETE_FLAG`].
fn merge_source_fields(rel: &crate::decode::pgoutput::Relation) -> Vec<Field> {
    let mut fields: Vec<Field> = mirror_schema(rel)
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(DELETE_FLAG, DataType::Boolean, false));
    fields
}

struct Entry {
    delete: bool,
    values: Vec<Value>,
    lsn: Lsn,
    ts: i64,
}

/// Builds the mirror batch of the rows after `applied`; `None` when nothing is left to apply.
pub fn mirror_batch(
    buf: &TableBuffer,
    applied: Lsn,
) -> Result<Option<MirrorBatch>, arrow::error::ArrowError> {
    let rel = &buf.relation;
    let rows: Vec<&Row> = buf.rows.iter().filter(|r| r.commit_lsn > applied).collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let start = rows
        .iter()
        .rposition(|r| r.change.kind == ChangeKind::Truncate)
        .map(|i| i + 1);
    let replace = start.is_some();
    let key_idx: Vec<usize> = rel
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.key)
        .map(|(i, _)| i)
        .collect();
    let ncols = rel.columns.len();
    let mut entries: Vec<Entry> = Vec::new();
    let mut by_key: HashMap<Vec<Value>, usize> = HashMap::new();
    let mut map_cache: Option<(*const crate::decode::pgoutput::Relation, Vec<Option<usize>>)> =
        None;
    for row in &rows[start.unwrap_or(0)..] {
        let src = Arc::as_ptr(&row.change.relation);
        if map_cache.as_ref().map(|(p, _)| *p) != Some(src) {
            map_cache = Some((src, column_map(&row.change.relation, rel)));
        }
        let map = &map_cache.as_ref().expect("set above").1;
        let project = |t: &crate::decode::pgoutput::Tuple| -> Vec<Value> {
            (0..ncols)
                .map(|i| {
                    map[i]
                        .and_then(|j| t.0.get(j).cloned())
                        .unwrap_or(Value::Null)
                })
                .collect()
        };
        let key_of =
            |v: &[Value]| -> Vec<Value> { key_idx.iter().map(|&i| v[i].clone()).collect() };
        let mut put = |key: Option<Vec<Value>>, mut e: Entry| match key {
            Some(k) if !key_idx.is_empty() => match by_key.get(&k) {
                Some(&at) => {
                    let prev = &entries[at];
                    if !e.delete && !prev.delete {
                        for (i, v) in e.values.iter_mut().enumerate() {
                            if *v == Value::Unchanged {
                                *v = prev.values[i].clone();
                            }
                        }
                    }
                    entries[at] = e;
                }
                None => {
                    by_key.insert(k, entries.len());
                    entries.push(e);
                }
            },
            _ => entries.push(e),
        };
        let (lsn, ts) = (row.commit_lsn, row.commit_ts_us);
        match row.change.kind {
            ChangeKind::Insert | ChangeKind::Update => {
                let Some(new) = row.change.new.as_ref() else {
                    continue;
                };
                let values = project(new);
                let new_key = key_of(&values);
                if let Some((_, old)) = &row.change.old {
                    let old_values = project(old);
                    let old_key = key_of(&old_values);
                    if old_key != new_key {
                        let e = Entry {
                            delete: true,
                            values: old_values,
                            lsn,
                            ts,
                        };
                        put(Some(old_key), e);
                    }
                }
                let e = Entry {
                    delete: false,
                    values,
                    lsn,
                    ts,
                };
                put(Some(new_key), e);
            }
            ChangeKind::Delete => {
                let Some((_, old)) = &row.change.old else {
                    continue;
                };
                let values = project(old);
                let e = Entry {
                    delete: true,
                    values: values.clone(),
                    lsn,
                    ts,
                };
                put(Some(key_of(&values)), e);
            }
            ChangeKind::Truncate => {}
        }
    }
    if replace {
        // After a truncate, deletes have nothing to delete.
        entries.retain(|e| !e.delete);
    }
    let unchanged: Vec<usize> = (0..ncols)
        .filter(|&i| entries.iter().any(|e| e.values[i] == Value::Unchanged))
        .collect();
    let mut cols = builders(rel, entries.len());
    for e in &entries {
        for (i, b) in cols.iter_mut().enumerate() {
            b.append(&e.values[i]);
        }
    }
    let mut unrepresentable = 0;
    let mut arrays: Vec<ArrayRef> = cols
        .into_iter()
        .map(|b| {
            unrepresentable += b.unrepresentable;
            b.finish()
        })
        .collect();
    arrays.push(Arc::new(Int64Array::from_iter_values(
        entries.iter().map(|e| e.lsn.0 as i64),
    )));
    arrays.push(Arc::new(
        TimestampMicrosecondArray::from_iter_values(entries.iter().map(|e| e.ts))
            .with_timezone("UTC"),
    ));
    arrays.push(Arc::new(BooleanArray::from_iter(
        entries.iter().map(|e| Some(e.delete)),
    )));
    let mut fields = merge_source_fields(rel);
    for &i in &unchanged {
        fields.push(Field::new(unchanged_flag(i), DataType::Boolean, false));
        arrays.push(Arc::new(BooleanArray::from_iter(
            entries
                .iter()
                .map(|e| Some(e.values[i] == Value::Unchanged)),
        )));
    }
    let deletes = entries.iter().filter(|e| e.delete).count();
    let insert_only = !replace && rows.iter().all(|r| r.change.kind == ChangeKind::Insert);
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?;
    Ok(Some(MirrorBatch {
        batch,
        replace,
        keys: key_idx
            .iter()
            .map(|&i| rel.columns[i].name.clone())
            .collect(),
        unchanged,
        deletes,
        insert_only,
        unrepresentable,
    }))
}

/// The mirror batch of an insert-only stretch, taken from its changelog batch (built from the same
/// rows) instead of parsing every value a second time.
pub fn from_changelog(
    changelog: &RecordBatch,
    rel: &crate::decode::pgoutput::Relation,
) -> Result<MirrorBatch, arrow::error::ArrowError> {
    let schema = changelog.schema();
    let mut idx: Vec<usize> = (0..rel.columns.len()).collect();
    idx.push(schema.index_of(super::LSN)?);
    idx.push(schema.index_of(super::COMMIT_TS)?);
    let projected = changelog.project(&idx)?;
    let fields = merge_source_fields(rel);
    let mut arrays = projected.columns().to_vec();
    arrays.push(Arc::new(BooleanArray::from(vec![
        false;
        projected.num_rows()
    ])));
    Ok(MirrorBatch {
        batch: RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?,
        replace: false,
        keys: rel
            .columns
            .iter()
            .filter(|c| c.key)
            .map(|c| c.name.clone())
            .collect(),
        unchanged: Vec::new(),
        deletes: 0,
        insert_only: true,
        unrepresentable: 0,
    })
}
