//! Taking rows out of a mirror's files: the two layouts of the mirror.
//!
//! Owns how the rows a [`Matcher`] finds leave their files:
//!
//! - **deletion vectors** (merge-on-read, the table property `delta.enableDeletionVectors`):
//!   only the identity columns of a candidate file are read; the positions of the rows taken
//!   join the file's deletion vector, and the commit replaces the file's entry (same data file,
//!   new vector). No data file is rewritten.
//! - **rewrite** (copy-on-write): a file that lost rows is read whole and written again without
//!   them.
//!
//! Either way rows a file's deletion vector already marks are not there: they are older versions
//! of rows, and never match. Rows whose unchanged values an upsert carries are read whole
//! (under deletion vectors only those rows, by position).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{new_null_array, Array, AsArray, BooleanArray, RecordBatch};
use arrow::compute::{cast, concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, Int64Type, Schema, SchemaRef};
use deltalake::kernel::{Action, Add, LogicalFileView};
use deltalake::DeltaTable;
use futures::TryStreamExt;
use roaring::RoaringTreemap;

use super::evolve::align;
use super::keys::{FileKeys, KeyIndex};
use super::matcher::Matcher;
use super::{files, ApplyError, TableErr};
use crate::sink::{dv, writer_properties};

/// How a mirror table takes rows out of its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    DeletionVectors,
    Rewrite,
}

impl Layout {
    /// The table's own choice (its `delta.enableDeletionVectors` property).
    pub fn of(table: &DeltaTable) -> Layout {
        if crate::sink::deletion_vectors_on(table) {
            Layout::DeletionVectors
        } else {
            Layout::Rewrite
        }
    }
}

/// Rows taken out of the mirror that upserts carry unchanged values from.
#[derive(Default)]
pub struct Carried {
    /// remove index → (batch, row)
    pub rows: HashMap<usize, (usize, usize)>,
    pub batches: Vec<RecordBatch>,
}

impl Carried {
    fn keep(&mut self, remove: usize, batch: RecordBatch, row: usize) {
        self.batches.push(batch.slice(row, 1));
        self.rows.insert(remove, (self.batches.len() - 1, 0));
    }
}

#[derive(Default)]
pub struct Located {
    /// Removes of the files that lost rows, and adds of what stays of them (rewritten files are
    /// written already, so only one file's rows are in memory at a time).
    pub actions: Vec<Action>,
    pub files_rewritten: usize,
    pub rows_removed: usize,
    pub carried: Carried,
}

/// Scans the table's files for the matcher's rows and takes them out; `needs` are the removes
/// whose rows upserts carry values from. With `index` (tables whose identity is one integer
/// column), a file's rows are found from the index, not by reading the file.
pub async fn locate(
    table: &DeltaTable,
    name: &str,
    matcher: &mut Matcher,
    needs: &HashSet<usize>,
    target: &SchemaRef,
    mut index: Option<&mut KeyIndex>,
) -> Result<Located, ApplyError> {
    let cx = TableErr(name);
    let layout = Layout::of(table);
    let state = table.snapshot().map_err(|e| cx.delta(e))?;
    let files: Vec<_> = state.log_data().iter().collect();
    let int_column = matcher.int_identity();
    if let (Some(c), Some(index)) = (int_column, index.as_deref_mut()) {
        let live: HashSet<String> = files.iter().map(|f| f.path().to_string()).collect();
        index.retain(target.field(c).name(), &live);
    }
    let mut out = Located::default();
    let mut marked: Vec<(LogicalFileView, RoaringTreemap)> = Vec::new();
    for file in files {
        if matcher.pending == 0 {
            break;
        }
        if !matcher.may_hold(file.stats().as_deref()) {
            continue;
        }
        let indexed = match (int_column, index.as_deref_mut()) {
            (Some(c), Some(index)) => {
                Some(candidates(table, &file, matcher, c, target, index).await?)
            }
            _ => None,
        };
        if indexed.as_ref().is_some_and(Vec::is_empty) {
            continue;
        }
        let deleted = files::deleted_rows(table, &file).await?;
        match layout {
            Layout::Rewrite => {
                rewrite(
                    table, name, &file, &deleted, matcher, needs, target, &mut out,
                )
                .await?
            }
            Layout::DeletionVectors => {
                let hits = match indexed {
                    Some(candidates) => take_indexed(candidates, &deleted, matcher),
                    None => scan(table, name, &file, &deleted, matcher, target).await?,
                };
                if hits.is_empty() {
                    continue;
                }
                carry(table, name, &file, &hits, needs, target, &mut out).await?;
                out.rows_removed += hits.len();
                let mut set = deleted;
                set.extend(hits.iter().map(|&(p, _)| p));
                marked.push((file, set));
            }
        }
    }
    let sets: Vec<&RoaringTreemap> = marked.iter().map(|(_, s)| s).collect();
    let vectors = dv::write(table, &sets).await?;
    for ((file, _), vector) in marked.into_iter().zip(vectors) {
        out.actions.push(Action::Remove(file.remove_action(true)));
        out.actions.push(Action::Add(Add {
            path: file.path().to_string(),
            partition_values: file.partition_values_map(),
            size: file.size(),
            modification_time: chrono::Utc::now().timestamp_millis(),
            data_change: true,
            stats: file.stats(),
            tags: None,
            deletion_vector: Some(vector),
            base_row_id: None,
            default_row_commit_version: None,
            clustering_provider: None,
        }));
    }
    Ok(out)
}

/// Copy-on-write: reads `file` whole and, when it held wanted rows, writes it again without them.
#[allow(clippy::too_many_arguments)]
async fn rewrite(
    table: &DeltaTable,
    name: &str,
    file: &LogicalFileView,
    deleted: &RoaringTreemap,
    matcher: &mut Matcher,
    needs: &HashSet<usize>,
    target: &SchemaRef,
    out: &mut Located,
) -> Result<(), ApplyError> {
    let cx = TableErr(name);
    let batches = files::read_rows(table, file, None, None).await?;
    let marked: Vec<u64> = deleted.iter().collect();
    let mut kept = Vec::with_capacity(batches.len());
    let (mut lost, mut at) = (0, 0u64);
    for b in &batches {
        let b = align(b, target).map_err(|e| cx.arrow(e))?;
        let mut keep = files::live_rows(&marked, at, b.num_rows());
        let taken = matcher.take(&b, |i| keep[i]).map_err(|e| cx.arrow(e))?;
        for &(row, remove) in &taken {
            keep[row] = false;
            if needs.contains(&remove) {
                out.carried.keep(remove, b.clone(), row);
            }
        }
        lost += taken.len();
        at += b.num_rows() as u64;
        kept.push(filter_record_batch(&b, &BooleanArray::from(keep)).map_err(|e| cx.arrow(e))?);
    }
    if lost > 0 {
        out.rows_removed += lost;
        out.files_rewritten += 1;
        out.actions.push(Action::Remove(file.remove_action(true)));
        let rest = concat_batches(target, &kept).map_err(|e| cx.arrow(e))?;
        if rest.num_rows() > 0 {
            let adds = files::write_files(table, rest, writer_properties())
                .await
                .map_err(|e| cx.delta(e))?;
            out.actions.extend(adds.into_iter().map(Action::Add));
        }
    }
    Ok(())
}

/// The positions in `file` of the integer identity values the matcher still wants, as
/// `(value, position)` ascending by value, then position, from the key index (the file's entry
/// built now if it has none).
async fn candidates(
    table: &DeltaTable,
    file: &LogicalFileView,
    matcher: &Matcher,
    column: usize,
    target: &SchemaRef,
    index: &mut KeyIndex,
) -> Result<Vec<(i64, u64)>, ApplyError> {
    let path = file.path().to_string();
    let mut unkept = None;
    if index.get(&path).is_none() {
        let name = target.field(column).name().as_str();
        let (values, nulls) = identity_values(table, file, name).await?;
        if let Err(keys) = index.insert(&path, FileKeys::from_values(values, nulls)) {
            unkept = Some(keys);
        }
    }
    let keys = unkept
        .as_ref()
        .or_else(|| index.get(&path))
        .expect("inserted or kept aside");
    let Some((min, max)) = keys.range() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for k in matcher.pending_ints(min, max) {
        keys.push_positions(k, &mut out);
    }
    Ok(out)
}

/// The values of `file`'s integer identity column `name` in file order, and the positions of
/// its NULLs (every row NULL when the file was written before the column existed). Read a batch
/// at a time: a compacted file holds millions of rows.
async fn identity_values(
    table: &DeltaTable,
    file: &LogicalFileView,
    name: &str,
) -> Result<(Vec<i64>, Vec<u32>), ApplyError> {
    let path = file.path().to_string();
    let mut rows = files::stream_rows(table, file, Some(&[name])).await?;
    let (mut values, mut nulls) = (Vec::new(), Vec::new());
    while let Some(b) = rows.try_next().await.map_err(|e| {
        ApplyError::from(crate::sink::SinkError::Parquet {
            file: path.clone(),
            source: e,
        })
    })? {
        let column = match b.column_by_name(name) {
            Some(a) => cast(a, &DataType::Int64),
            None => Ok(new_null_array(&DataType::Int64, b.num_rows())),
        }
        .map_err(|e| TableErr(&path).arrow(e))?;
        let column = column.as_primitive::<Int64Type>();
        let at = values.len() as u32;
        nulls.extend(
            (0..column.len() as u32)
                .filter(|&i| column.is_null(i as usize))
                .map(|i| at + i),
        );
        values.extend_from_slice(column.values());
    }
    Ok((values, nulls))
}

/// Takes the matcher's removes for the candidates' live positions, one position per remove.
fn take_indexed(
    candidates: Vec<(i64, u64)>,
    deleted: &RoaringTreemap,
    matcher: &mut Matcher,
) -> Vec<(u64, usize)> {
    let mut hits = Vec::with_capacity(candidates.len());
    let mut exhausted = None;
    for (key, p) in candidates {
        if exhausted == Some(key) || deleted.contains(p) {
            continue;
        }
        match matcher.take_int(key) {
            Some(remove) => hits.push((p, remove)),
            None => exhausted = Some(key),
        }
    }
    hits.sort_unstable();
    hits
}

/// Reads the identity columns of `file` and takes the wanted rows among its live ones; returns
/// their positions with the removes they answer, ascending.
async fn scan(
    table: &DeltaTable,
    name: &str,
    file: &LogicalFileView,
    deleted: &RoaringTreemap,
    matcher: &mut Matcher,
    target: &SchemaRef,
) -> Result<Vec<(u64, usize)>, ApplyError> {
    let cx = TableErr(name);
    let columns: Vec<&str> = matcher
        .columns()
        .into_iter()
        .map(|c| target.field(c).name().as_str())
        .collect();
    let batches = files::read_rows(table, file, Some(&columns), None).await?;
    // The other columns are not read: NULL, so every column may be.
    let loose: SchemaRef = Arc::new(Schema::new(
        target
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ));
    let marked: Vec<u64> = deleted.iter().collect();
    let mut hits = Vec::new();
    let mut at = 0u64;
    for b in &batches {
        let b = align(b, &loose).map_err(|e| cx.arrow(e))?;
        let live = files::live_rows(&marked, at, b.num_rows());
        let taken = matcher.take(&b, |i| live[i]).map_err(|e| cx.arrow(e))?;
        hits.extend(
            taken
                .into_iter()
                .map(|(row, remove)| (at + row as u64, remove)),
        );
        at += b.num_rows() as u64;
    }
    hits.sort_unstable();
    Ok(hits)
}

/// Reads whole the rows of `file` at the `hits` whose removes upserts carry values from.
async fn carry(
    table: &DeltaTable,
    name: &str,
    file: &LogicalFileView,
    hits: &[(u64, usize)],
    needs: &HashSet<usize>,
    target: &SchemaRef,
    out: &mut Located,
) -> Result<(), ApplyError> {
    let cx = TableErr(name);
    let carriers: Vec<(u64, usize)> = hits
        .iter()
        .filter(|(_, r)| needs.contains(r))
        .copied()
        .collect();
    if carriers.is_empty() {
        return Ok(());
    }
    let positions: Vec<u64> = carriers.iter().map(|&(p, _)| p).collect();
    let rows = files::read_rows(table, file, None, Some(&positions)).await?;
    let rows = concat_batches(&rows.first().map_or(target.clone(), |b| b.schema()), &rows)
        .map_err(|e| cx.arrow(e))?;
    let rows = align(&rows, target).map_err(|e| cx.arrow(e))?;
    for (i, &(_, remove)) in carriers.iter().enumerate() {
        out.carried.keep(remove, rows.clone(), i);
    }
    Ok(())
}
