//! The mirror executor: carries out a [`MirrorPlan`] on a mirror Delta table in one commit.
//!
//! Owns how removes find their rows in the mirror's files and how upserts become rows:
//!
//! 1. the table's schema follows the relation's (`super::evolve`);
//! 2. removes are grouped by identity; each group's values are encoded with Arrow's row format,
//!    in which equal values (NULL included) have equal bytes: NULL-safe equality for every type;
//! 3. files are scanned (skipped when the statistics of an integer identity column rule them
//!    out); a row whose identity is wanted is taken out, one row per remove, and kept aside when an
//!    upsert carries unchanged values from it; a file that lost rows is rewritten without them;
//! 4. upserts take their unchanged values from the rows kept aside;
//! 5. one Delta commit removes the rewritten files (all files after a truncate) and adds the new
//!    ones, with the application transaction that records the source LSN.
//!
//! A remove that finds no row, or an unchanged value whose origin is missing, means the mirror
//! had already diverged from the source: it is counted (`missing`) for the caller to report,
//! never guessed.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, TimestampMicrosecondArray,
};
use arrow::compute::{cast, concat_batches, filter_record_batch, interleave};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::row::{Row, RowConverter, Rows, SortField};
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::Action;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::DeltaTable;

use super::evolve::{align, evolve, table_schema};
use super::{files, ApplyError, TableErr};
use crate::batch::{builders, mirror_schema};
use crate::decode::pgoutput::{Relation, Value};
use crate::plan::{MirrorPlan, Remove};
use crate::sink::writer_properties;

/// What executing a plan did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Executed {
    pub rows_added: usize,
    pub rows_removed: usize,
    pub files_rewritten: usize,
    /// Removes that found no row, and unchanged values whose origin row was missing.
    pub missing: usize,
    pub unrepresentable: u64,
}

impl Executed {
    /// A commit of `plan` that happened although its answer was lost: what it did, as far as the
    /// plan says (the rows it found are not known any more).
    pub fn landed(plan: &MirrorPlan) -> Self {
        Executed {
            rows_added: plan.upserts.len(),
            rows_removed: plan.removes.len(),
            ..Default::default()
        }
    }
}

/// Applies `plan` (the changes of `rel`, the batch's relation) to the mirror `table`.
pub async fn execute(
    table: &mut DeltaTable,
    name: &str,
    rel: &Relation,
    plan: &MirrorPlan,
    props: CommitProperties,
    storage: &HashMap<String, String>,
) -> Result<Executed, ApplyError> {
    let cx = TableErr(name);
    evolve(table, name, &mirror_schema(rel), storage).await?;
    let target = table_schema(table).map_err(|e| cx.delta(e))?;
    let mut out = Executed::default();
    let (upserts, bad) = upsert_batch(rel, plan, &target).map_err(|e| cx.arrow(e))?;
    out.unrepresentable = bad;

    let mut actions: Vec<Action> = Vec::new();
    let mut carried = Carried::default();
    if plan.truncate {
        let state = table.snapshot().map_err(|e| cx.delta(e))?;
        actions.extend(
            state
                .log_data()
                .iter()
                .map(|f| Action::Remove(f.remove_action(true))),
        );
    } else if !plan.removes.is_empty() {
        let needs: HashSet<usize> = plan
            .upserts
            .iter()
            .filter(|u| u.carries())
            .filter_map(|u| u.origin)
            .collect();
        let mut matcher =
            Matcher::new(rel, &plan.removes, &target, needs).map_err(|e| cx.arrow(e))?;
        let found = locate(table, name, &mut matcher, &target).await?;
        out.rows_removed = found.rows_removed;
        out.files_rewritten = found.files_rewritten;
        out.missing += matcher.pending;
        actions.extend(found.actions);
        carried = matcher.carried;
    }
    let (upserts, missing) =
        carry(rel, plan, upserts, &carried, &target).map_err(|e| cx.arrow(e))?;
    out.missing += missing;
    out.rows_added = upserts.num_rows();
    if upserts.num_rows() > 0 {
        let adds = files::write_files(table, upserts, writer_properties())
            .await
            .map_err(|e| cx.delta(e))?;
        actions.extend(adds.into_iter().map(Action::Add));
    }
    if actions.is_empty() {
        return Ok(out);
    }
    let operation = if plan.truncate {
        DeltaOperation::Write {
            mode: SaveMode::Overwrite,
            partition_by: None,
            predicate: None,
        }
    } else if plan.is_append() {
        DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: None,
            predicate: None,
        }
    } else {
        DeltaOperation::Update { predicate: None }
    };
    let state = table.snapshot().map_err(|e| cx.delta(e))?;
    let commit = CommitBuilder::from(props)
        .with_actions(actions)
        .build(Some(state), table.log_store(), operation)
        .await
        .map_err(|e| cx.delta(e))?;
    table.state = Some(commit.snapshot());
    Ok(out)
}

/// The upserts' rows (unchanged values NULL for now), with the mirror's metadata columns.
fn upsert_batch(
    rel: &Relation,
    plan: &MirrorPlan,
    target: &SchemaRef,
) -> Result<(RecordBatch, u64), arrow::error::ArrowError> {
    let mut cols = builders(rel, plan.upserts.len());
    for u in &plan.upserts {
        for (b, v) in cols.iter_mut().zip(&u.values) {
            b.append(v);
        }
    }
    let crate::batch::Finished {
        mut arrays,
        unrepresentable: bad,
        exact,
    } = crate::batch::finish_columns(rel, cols, plan.upserts.len());
    arrays.push(Arc::new(Int64Array::from_iter_values(
        plan.upserts.iter().map(|u| u.lsn.0 as i64),
    )));
    arrays.push(Arc::new(
        TimestampMicrosecondArray::from_iter_values(plan.upserts.iter().map(|u| u.commit_ts_us))
            .with_timezone("UTC"),
    ));
    arrays.push(exact);
    let batch = RecordBatch::try_new(mirror_schema(rel), arrays)?;
    Ok((align(&batch, target)?, bad))
}

/// Rows taken out of the mirror that upserts carry unchanged values from.
#[derive(Default)]
struct Carried {
    /// remove index → (batch, row)
    rows: HashMap<usize, (usize, usize)>,
    batches: Vec<RecordBatch>,
}

/// Fills unchanged values from the carried rows; returns the rows and how many values had no
/// origin row to come from (left NULL).
fn carry(
    rel: &Relation,
    plan: &MirrorPlan,
    upserts: RecordBatch,
    carried: &Carried,
    target: &SchemaRef,
) -> Result<(RecordBatch, usize), arrow::error::ArrowError> {
    let mut missing = 0;
    let carriers: Vec<usize> = (0..plan.upserts.len())
        .filter(|&j| plan.upserts[j].carries())
        .collect();
    if carriers.is_empty() {
        return Ok((upserts, 0));
    }
    let from = if carried.batches.is_empty() {
        RecordBatch::new_empty(target.clone())
    } else {
        concat_batches(target, &carried.batches)?
    };
    // Row of `from` for each carried (batch, row).
    let mut offsets = Vec::with_capacity(carried.batches.len());
    let mut n = 0;
    for b in &carried.batches {
        offsets.push(n);
        n += b.num_rows();
    }
    let mut columns = upserts.columns().to_vec();
    for (c, col) in rel.columns.iter().enumerate() {
        if !carriers
            .iter()
            .any(|&j| plan.upserts[j].values[c] == Value::Unchanged)
        {
            continue;
        }
        let mut idx: Vec<(usize, usize)> = (0..plan.upserts.len()).map(|j| (0, j)).collect();
        for &j in &carriers {
            let u = &plan.upserts[j];
            if u.values[c] != Value::Unchanged {
                continue;
            }
            match u.origin.and_then(|r| carried.rows.get(&r)) {
                Some(&(b, row)) => idx[j] = (1, offsets[b] + row),
                None => missing += 1,
            }
        }
        let t = target.index_of(&col.name)?;
        columns[t] = interleave(&[upserts.column(t).as_ref(), from.column(t).as_ref()], &idx)?;
    }
    Ok((RecordBatch::try_new(target.clone(), columns)?, missing))
}

/// One identity's wanted rows.
struct Group {
    /// Column indices in the target schema.
    columns: Vec<usize>,
    converter: RowConverter,
    wanted: Wanted,
    /// Sorted values of the first identity column when it is an integer (file pruning).
    ints: Option<(String, Vec<i64>)>,
}

/// The encoded identities of one group's removes, each distinct one a stack of the removes
/// still looking for a row with it (several for identical keyless rows). Keys are hashed once
/// and stored once (in `rows`).
struct Wanted {
    rows: Rows,
    /// Remove index of each encoded identity in `rows`.
    members: Vec<usize>,
    hasher: foldhash::fast::RandomState,
    /// (an encoded identity's position in `rows`, the top of its stack), per distinct identity.
    heads: hashbrown::HashTable<(usize, usize)>,
    /// The next entry down the stack, per position in `rows`.
    below: Vec<Option<usize>>,
}

impl Wanted {
    fn new(rows: Rows, members: Vec<usize>) -> Self {
        let hasher = foldhash::fast::RandomState::default();
        let mut heads: hashbrown::HashTable<(usize, usize)> =
            hashbrown::HashTable::with_capacity(members.len());
        let mut below = vec![None; members.len()];
        for (i, below_i) in below.iter_mut().enumerate() {
            let row = rows.row(i);
            let hash = hasher.hash_one(row.as_ref());
            match heads.find_mut(hash, |&(at, _)| rows.row(at) == row) {
                Some(head) => {
                    *below_i = Some(head.1);
                    head.1 = i;
                }
                None => {
                    heads.insert_unique(hash, (i, i), |&(at, _)| {
                        hasher.hash_one(rows.row(at).as_ref())
                    });
                }
            }
        }
        Wanted {
            rows,
            members,
            hasher,
            heads,
            below,
        }
    }

    fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    /// Takes the remove that wants `row` (the last one queued), if any.
    fn take(&mut self, row: Row<'_>) -> Option<usize> {
        let hash = self.hasher.hash_one(row.as_ref());
        let rows = &self.rows;
        let mut entry = self
            .heads
            .find_entry(hash, |&(at, _)| rows.row(at) == row)
            .ok()?;
        let top = entry.get().1;
        match self.below[top] {
            Some(next) => entry.get_mut().1 = next,
            None => {
                entry.remove();
            }
        }
        Some(self.members[top])
    }
}

struct Matcher {
    groups: Vec<Group>,
    /// Removes whose row an upsert carries values from.
    needs: HashSet<usize>,
    carried: Carried,
    /// Removes that have not found their row yet.
    pending: usize,
}

impl Matcher {
    fn new(
        rel: &Relation,
        removes: &[Remove],
        target: &SchemaRef,
        needs: HashSet<usize>,
    ) -> Result<Self, arrow::error::ArrowError> {
        let mut by_identity: HashMap<&[usize], Vec<usize>> = HashMap::new();
        for (i, r) in removes.iter().enumerate() {
            by_identity.entry(&r.identity).or_default().push(i);
        }
        let mut groups = Vec::new();
        for (identity, members) in by_identity {
            let columns = identity
                .iter()
                .map(|&c| target.index_of(&rel.columns[c].name))
                .collect::<Result<Vec<_>, _>>()?;
            let types: Vec<DataType> = columns
                .iter()
                .map(|&c| target.field(c).data_type().clone())
                .collect();
            let converter =
                RowConverter::new(types.iter().map(|t| SortField::new(t.clone())).collect())?;
            let mut builders: Vec<_> = identity
                .iter()
                .map(|&c| crate::decode::types::column_builder(&rel.columns[c], members.len()))
                .collect();
            for &m in &members {
                for (b, v) in builders.iter_mut().zip(&removes[m].values) {
                    b.append(v);
                }
            }
            let arrays = builders
                .into_iter()
                .zip(&types)
                .map(|(b, t)| {
                    let a = b.finish();
                    if a.data_type() == t {
                        Ok(a)
                    } else {
                        cast(&a, t)
                    }
                })
                .collect::<Result<Vec<ArrayRef>, _>>()?;
            let rows = converter.convert_columns(&arrays)?;
            let ints = int_values(&arrays[0]).map(|mut v| {
                v.sort_unstable();
                (target.field(columns[0]).name().clone(), v)
            });
            groups.push(Group {
                columns,
                converter,
                wanted: Wanted::new(rows, members),
                ints,
            });
        }
        Ok(Matcher {
            groups,
            needs,
            carried: Carried::default(),
            pending: removes.len(),
        })
    }

    /// Whether a file with these statistics can hold a wanted row.
    fn may_hold(&self, stats: Option<&str>) -> bool {
        let Some(stats) = stats.and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        else {
            return true;
        };
        self.groups.iter().any(|g| match &g.ints {
            Some((col, values)) => {
                let (Some(min), Some(max)) = (
                    stats["minValues"][col].as_i64(),
                    stats["maxValues"][col].as_i64(),
                ) else {
                    return true;
                };
                let at = values.partition_point(|&v| v < min);
                values.get(at).is_some_and(|&v| v <= max)
            }
            None => true,
        })
    }

    /// Takes the wanted rows out of `batch` (aligned to the target schema); returns which rows
    /// stay, or `None` when none was taken.
    fn take(
        &mut self,
        batch: &RecordBatch,
    ) -> Result<Option<BooleanArray>, arrow::error::ArrowError> {
        let mut keep: Option<Vec<bool>> = None;
        for g in &mut self.groups {
            if g.wanted.is_empty() {
                continue;
            }
            let arrays: Vec<ArrayRef> =
                g.columns.iter().map(|&c| batch.column(c).clone()).collect();
            let rows = g.converter.convert_columns(&arrays)?;
            for (i, row) in rows.iter().enumerate() {
                if keep.as_ref().is_some_and(|k| !k[i]) {
                    continue;
                }
                let Some(remove) = g.wanted.take(row) else {
                    continue;
                };
                self.pending -= 1;
                keep.get_or_insert_with(|| vec![true; batch.num_rows()])[i] = false;
                if self.needs.contains(&remove) {
                    self.carried.batches.push(batch.slice(i, 1));
                    self.carried
                        .rows
                        .insert(remove, (self.carried.batches.len() - 1, 0));
                }
            }
        }
        Ok(keep.map(BooleanArray::from))
    }
}

/// The values of an integer column as i64.
fn int_values(a: &ArrayRef) -> Option<Vec<i64>> {
    let a = match a.data_type() {
        DataType::Int16 | DataType::Int32 | DataType::Int64 => cast(a, &DataType::Int64).ok()?,
        _ => return None,
    };
    let a = a.as_any().downcast_ref::<Int64Array>()?;
    Some(a.iter().flatten().collect())
}

struct Located {
    /// Removes of the files that lost rows, and adds of what stays of them (written already, so
    /// only one file's rows are in memory at a time).
    actions: Vec<Action>,
    files_rewritten: usize,
    rows_removed: usize,
}

/// Scans the table's files for the matcher's rows.
async fn locate(
    table: &DeltaTable,
    name: &str,
    matcher: &mut Matcher,
    target: &SchemaRef,
) -> Result<Located, ApplyError> {
    let cx = TableErr(name);
    let state = table.snapshot().map_err(|e| cx.delta(e))?;
    let files: Vec<_> = state.log_data().iter().collect();
    let mut out = Located {
        actions: Vec::new(),
        files_rewritten: 0,
        rows_removed: 0,
    };
    for file in files {
        if matcher.pending == 0 {
            break;
        }
        if !matcher.may_hold(file.stats().as_deref()) {
            continue;
        }
        let batches = files::read_file(table, &file.object_store_path()).await?;
        let mut kept = Vec::with_capacity(batches.len());
        let mut lost = 0;
        for b in &batches {
            let b = align(b, target).map_err(|e| cx.arrow(e))?;
            match matcher.take(&b).map_err(|e| cx.arrow(e))? {
                Some(keep) => {
                    lost += keep.len() - keep.true_count();
                    kept.push(filter_record_batch(&b, &keep).map_err(|e| cx.arrow(e))?);
                }
                None => kept.push(b),
            }
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
    }
    Ok(out)
}
