//! Per-table buffers of committed changes, and their conversion to Arrow record batches.
//!
//! Owns the flush policy (`max_rows`, `max_bytes`, `max_delay`), which is only ever checked
//! between transactions, so a flush never holds half a source transaction. Builds the changelog
//! batch of a table (every change, in order); what the mirror does with the changes is planned
//! in `crate::plan`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::checkpoint::{Applied, Lsn};
use crate::config::BatchConfig;
use crate::decode::pgoutput::{OldKind, Relation, Tuple, Value};
use crate::decode::spill::change_bytes;
use crate::decode::txn::{Change, ChangeKind, Transaction};
use crate::decode::types::{column_builder, column_type, ColumnBuilder};

pub const OP: &str = "_walden_op";
pub const LSN: &str = "_walden_lsn";
pub const SEQ: &str = "_walden_seq";
pub const XID: &str = "_walden_xid";
pub const COMMIT_TS: &str = "_walden_commit_ts";
pub const UNCHANGED: &str = "_walden_unchanged";
/// Values the column's type cannot hold (numeric NaN, infinite dates, …): a JSON object of column
/// name → the value's exact text, NULL on rows without any.
pub const UNREPRESENTABLE: &str = "_walden_unrepresentable";
/// On an update that moved its row to another key: the old replica identity, a JSON object of
/// column name → value as text (as the column's type casts to text); NULL on other rows.
pub const OLD_KEY: &str = "_walden_old_key";

/// One buffered change with its transaction's coordinates.
#[derive(Debug, Clone)]
pub struct Row {
    pub change: Change,
    pub commit_lsn: Lsn,
    pub commit_ts_us: i64,
    pub xid: u32,
    pub seq: i64,
}

impl Row {
    /// The image stored for this change: the new row, or for deletes the old key/row.
    pub fn image(&self) -> Option<&Tuple> {
        match self.change.kind {
            ChangeKind::Insert | ChangeKind::Update => self.change.new.as_ref(),
            ChangeKind::Delete => self.change.old.as_ref().map(|(_, t)| t),
            ChangeKind::Truncate => None,
        }
    }
}

/// Buffered changes of one source table.
#[derive(Debug)]
pub struct TableBuffer {
    pub relation: Arc<Relation>,
    pub rows: Vec<Row>,
    pub bytes: usize,
    /// The last transaction in `rows` is incomplete: more of its changes come in later flushes.
    pub partial: bool,
    /// The source table (OID) whose rows the mirror holds, when known: rows of another one (a
    /// generation dropped since, whose copy replaced it) reach the changelog only.
    pub generation: Option<u32>,
}

impl TableBuffer {
    /// `row` belongs to the generation the mirror holds.
    pub fn holds(&self, row: &Row) -> bool {
        self.generation.is_none_or(|g| row.change.relation.oid == g)
    }
}

/// `schema.table`, the name a source table goes by everywhere in walden.
pub fn table_name(r: &Relation) -> String {
    format!("{}.{}", r.schema, r.name)
}

/// Collects committed transactions until the flush policy says to write them out.
pub struct Batcher {
    cfg: BatchConfig,
    tables: BTreeMap<String, TableBuffer>,
    rows: usize,
    bytes: usize,
    oldest: Option<Instant>,
}

impl Batcher {
    pub fn new(cfg: BatchConfig) -> Self {
        Batcher {
            cfg,
            tables: BTreeMap::new(),
            rows: 0,
            bytes: 0,
            oldest: None,
        }
    }

    /// Adds changes of transaction `txn` (all of them, or the next part of a large one whose
    /// first change is number `first_seq`); returns the tables they touched.
    pub fn push(&mut self, txn: &Transaction, changes: Vec<Change>, first_seq: i64) -> Vec<String> {
        let mut touched: Vec<String> = Vec::new();
        let mut changes = changes.into_iter().zip(first_seq..).peekable();
        // One table lookup per run of changes to the same relation (a large transaction's part
        // is often one long run).
        while let Some((change, seq)) = changes.next() {
            let relation = change.relation.clone();
            let name = table_name(&relation);
            if !touched.contains(&name) {
                touched.push(name.clone());
            }
            let buf = self.tables.entry(name).or_insert_with(|| TableBuffer {
                relation: relation.clone(),
                rows: Vec::new(),
                bytes: 0,
                partial: false,
                generation: None,
            });
            buf.relation = relation.clone();
            let mut next = Some((change, seq));
            while let Some((change, seq)) = next {
                let size = change_bytes(&change);
                buf.bytes += size;
                buf.rows.push(Row {
                    change,
                    commit_lsn: txn.commit_lsn,
                    commit_ts_us: txn.commit_ts_us,
                    xid: txn.xid,
                    seq,
                });
                self.rows += 1;
                self.bytes += size;
                next = changes.next_if(|(c, _)| Arc::ptr_eq(&c.relation, &relation));
            }
        }
        if self.rows > 0 && self.oldest.is_none() {
            self.oldest = Some(Instant::now());
        }
        touched
    }

    /// The buffered changes end in part of a transaction whose other changes follow later.
    pub fn mark_partial(&mut self) {
        for buf in self.tables.values_mut() {
            buf.partial = true;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Time until `max_delay` forces a flush (None when nothing is buffered).
    pub fn due_in(&self) -> Option<Duration> {
        self.oldest
            .map(|t| Duration::from_millis(self.cfg.max_delay_ms).saturating_sub(t.elapsed()))
    }

    pub fn should_flush(&self) -> bool {
        self.rows >= self.cfg.max_rows
            || self.bytes >= self.cfg.max_bytes
            || self.due_in() == Some(Duration::ZERO)
    }

    /// Twice the flush thresholds: the most that is buffered while a flush is under way.
    pub fn over_hard_limit(&self) -> bool {
        self.rows >= self.cfg.max_rows.saturating_mul(2)
            || self.bytes >= self.cfg.max_bytes.saturating_mul(2)
    }

    /// The tables with buffered changes, with the source OID of their latest description.
    pub fn relations(&self) -> impl Iterator<Item = (&String, u32)> {
        self.tables.iter().map(|(n, b)| (n, b.relation.oid))
    }

    /// Hands over everything buffered.
    pub fn take(&mut self) -> BTreeMap<String, TableBuffer> {
        self.rows = 0;
        self.bytes = 0;
        self.oldest = None;
        std::mem::take(&mut self.tables)
    }
}

/// Arrow fields of the source columns (all nullable: deletes carry only the key).
pub fn source_fields(r: &Relation) -> Vec<Field> {
    r.columns
        .iter()
        .map(|c| Field::new(&c.name, column_type(c), true))
        .collect()
}

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

pub fn changelog_schema(r: &Relation) -> SchemaRef {
    let mut f = source_fields(r);
    f.push(Field::new(OP, DataType::Utf8, false));
    f.push(Field::new(LSN, DataType::Int64, false));
    f.push(Field::new(SEQ, DataType::Int64, false));
    f.push(Field::new(XID, DataType::Int64, false));
    f.push(Field::new(COMMIT_TS, ts_type(), false));
    f.push(Field::new(UNCHANGED, DataType::Utf8, true));
    f.push(Field::new(UNREPRESENTABLE, DataType::Utf8, true));
    f.push(Field::new(OLD_KEY, DataType::Utf8, true));
    Arc::new(Schema::new(f))
}

pub fn mirror_schema(r: &Relation) -> SchemaRef {
    let mut f = source_fields(r);
    f.push(Field::new(LSN, DataType::Int64, false));
    f.push(Field::new(COMMIT_TS, ts_type(), false));
    f.push(Field::new(UNREPRESENTABLE, DataType::Utf8, true));
    Arc::new(Schema::new(f))
}

/// For each column of `target`, its index in `source`, so rows decoded under an older relation
/// description land in the right columns: the same attribute number where both know it (a
/// renamed column is the same column), else the same name.
pub fn column_map(source: &Relation, target: &Relation) -> Vec<Option<usize>> {
    if std::ptr::eq(source, target) || source.columns == target.columns {
        return (0..target.columns.len()).map(Some).collect();
    }
    let same_table = source.oid == target.oid;
    target
        .columns
        .iter()
        .map(|t| {
            source.columns.iter().position(|s| {
                if same_table && s.attnum != 0 && t.attnum != 0 {
                    s.attnum == t.attnum
                } else {
                    s.name == t.name
                }
            })
        })
        .collect()
}

/// Source-column builders for `relation`.
pub fn builders(relation: &Relation, capacity: usize) -> Vec<ColumnBuilder> {
    relation
        .columns
        .iter()
        .map(|c| column_builder(c, capacity))
        .collect()
}

/// Finished source columns.
pub struct Finished {
    pub arrays: Vec<ArrayRef>,
    /// Values that could not be represented (stored as NULL)…
    pub unrepresentable: u64,
    /// …and their exact text, per row ([`UNREPRESENTABLE`]).
    pub exact: ArrayRef,
}

/// Finishes the source-column builders of `rel`'s columns (`rows` rows).
pub fn finish_columns(rel: &Relation, cols: Vec<ColumnBuilder>, rows: usize) -> Finished {
    let mut unrepresentable = 0;
    let mut by_row: BTreeMap<usize, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
    let arrays = cols
        .into_iter()
        .zip(&rel.columns)
        .map(|(mut b, c)| {
            unrepresentable += b.unrepresentable;
            for (row, text) in std::mem::take(&mut b.rejected) {
                by_row
                    .entry(row)
                    .or_default()
                    .insert(c.name.clone(), serde_json::Value::String(text));
            }
            b.finish()
        })
        .collect();
    let exact: StringArray = if by_row.is_empty() {
        StringArray::new_null(rows)
    } else {
        (0..rows)
            .map(|r| {
                by_row
                    .get(&r)
                    .map(|m| serde_json::Value::Object(m.clone()).to_string())
            })
            .collect()
    };
    Finished {
        arrays,
        unrepresentable,
        exact: Arc::new(exact),
    }
}

/// Rows of one table that `applied` does not cover, as changelog records.
pub fn changelog_batch(
    buf: &TableBuffer,
    applied: Applied,
) -> Result<(RecordBatch, u64), arrow::error::ArrowError> {
    let rel = &buf.relation;
    let rows: Vec<&Row> = buf
        .rows
        .iter()
        .filter(|r| !applied.covers(r.commit_lsn, r.seq))
        .collect();
    let mut cols = builders(rel, rows.len());
    let mut ops = Vec::with_capacity(rows.len());
    let mut lsns = Vec::with_capacity(rows.len());
    let mut seqs = Vec::with_capacity(rows.len());
    let mut xids = Vec::with_capacity(rows.len());
    let mut tss = Vec::with_capacity(rows.len());
    let mut unchanged: Vec<Option<String>> = Vec::with_capacity(rows.len());
    let mut map_cache: Option<(*const Relation, Vec<Option<usize>>)> = None;
    for row in &rows {
        let src = Arc::as_ptr(&row.change.relation);
        if map_cache.as_ref().map(|(p, _)| *p) != Some(src) {
            map_cache = Some((src, column_map(&row.change.relation, rel)));
        }
        let map = &map_cache.as_ref().expect("set above").1;
        let mut u = Vec::new();
        match row.image() {
            Some(t) => {
                for (i, b) in cols.iter_mut().enumerate() {
                    match map[i].and_then(|j| t.0.get(j)) {
                        Some(Value::Unchanged) => {
                            u.push(rel.columns[i].name.as_str());
                            b.append_null()
                        }
                        Some(v) => b.append(v),
                        None => b.append_null(),
                    }
                }
            }
            None => cols.iter_mut().for_each(|b| b.append_null()),
        }
        unchanged.push((!u.is_empty()).then(|| u.join(",")));
        ops.push(row.change.kind.as_str());
        lsns.push(row.commit_lsn.0 as i64);
        seqs.push(row.seq);
        xids.push(row.xid as i64);
        tss.push(row.commit_ts_us);
    }
    let Finished {
        mut arrays,
        unrepresentable: bad,
        exact,
    } = finish_columns(rel, cols, rows.len());
    arrays.push(Arc::new(StringArray::from(ops)));
    arrays.push(Arc::new(Int64Array::from(lsns)));
    arrays.push(Arc::new(Int64Array::from(seqs)));
    arrays.push(Arc::new(Int64Array::from(xids)));
    arrays.push(Arc::new(
        TimestampMicrosecondArray::from(tss).with_timezone("UTC"),
    ));
    arrays.push(Arc::new(StringArray::from(unchanged)));
    arrays.push(exact);
    arrays.push(old_keys(rel, &rows)?);
    Ok((RecordBatch::try_new(changelog_schema(rel), arrays)?, bad))
}

/// The [`OLD_KEY`] column of `rows`: the old key of each update whose key columns changed (the
/// server sends the old key then, 'K'), NULL elsewhere.
fn old_keys(rel: &Relation, rows: &[&Row]) -> Result<ArrayRef, arrow::error::ArrowError> {
    let key: Vec<usize> = (0..rel.columns.len())
        .filter(|&i| rel.columns[i].key)
        .collect();
    let moved: Vec<(usize, Vec<&Value>)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let (Some((OldKind::Key, old)), Some(new)) = (&r.change.old, &r.change.new) else {
                return None;
            };
            let map = column_map(&r.change.relation, rel);
            fn at<'t>(t: &'t Tuple, map: &[Option<usize>], k: usize) -> Option<&'t Value> {
                map[k].and_then(|j| t.0.get(j))
            }
            let olds: Vec<&Value> = key
                .iter()
                .map(|&k| at(old, &map, k).unwrap_or(&Value::Null))
                .collect();
            let same = key.iter().zip(&olds).all(|(&k, o)| match at(new, &map, k) {
                Some(Value::Unchanged) => true,
                Some(n) => n == *o,
                None => matches!(o, Value::Null),
            });
            (!same).then_some((i, olds))
        })
        .collect();
    if moved.is_empty() {
        return Ok(arrow::array::new_null_array(&DataType::Utf8, rows.len()));
    }
    // The old values through the columns' own builders, then as text, so they read as the
    // columns' values do (`CAST(col AS VARCHAR)`).
    let mut texts: Vec<StringArray> = Vec::with_capacity(key.len());
    for (n, &k) in key.iter().enumerate() {
        let mut b = column_builder(&rel.columns[k], moved.len());
        moved.iter().for_each(|(_, olds)| b.append(olds[n]));
        let text = arrow::compute::cast(&b.finish(), &DataType::Utf8)?;
        texts.push(text.as_string::<i32>().clone());
    }
    let mut out: Vec<Option<String>> = vec![None; rows.len()];
    for (m, (row, _)) in moved.iter().enumerate() {
        let object: serde_json::Map<String, serde_json::Value> = key
            .iter()
            .zip(&texts)
            .map(|(&k, t)| {
                let v = match t.is_valid(m) {
                    true => serde_json::Value::String(t.value(m).to_string()),
                    false => serde_json::Value::Null,
                };
                (rel.columns[k].name.clone(), v)
            })
            .collect();
        out[*row] = Some(serde_json::Value::Object(object).to_string());
    }
    Ok(Arc::new(StringArray::from(out)))
}
