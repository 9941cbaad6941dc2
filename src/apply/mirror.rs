//! The mirror executor: carries out a [`MirrorPlan`] on a mirror Delta table in one commit.
//!
//! Owns how removes find their rows in the mirror's files and how upserts become rows:
//!
//! 1. the table's schema follows the relation's (`super::evolve`);
//! 2. removes find their rows (`super::matcher`: by identity, NULL-safe, one row per remove), and
//!    the rows leave their files (`super::locate`: marked in the files' deletion vectors, or the
//!    files rewritten without them, as the table's layout says); rows an upsert carries unchanged
//!    values from are kept aside;
//! 3. upserts take their unchanged values from the rows kept aside;
//! 4. one Delta commit replaces the entries of the files that lost rows (all files after a
//!    truncate) and adds the new rows' files, with the application transaction that records the
//!    source LSN.
//!
//! A remove that finds no row, or an unchanged value whose origin is missing, means the mirror
//! had already diverged from the source: it is counted (`missing`) for the caller to report,
//! never guessed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, TimestampMicrosecondArray};
use arrow::compute::{concat_batches, interleave};
use arrow::datatypes::SchemaRef;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::DeltaTable;
use tokio::sync::oneshot;

use super::evolve::{align, evolve, table_schema};
use super::keys::KeyIndex;
use super::locate::{locate, Carried};
use super::matcher::Matcher;
use super::{files, ApplyError, TableErr};
use crate::batch::{builders, mirror_schema};
use crate::decode::pgoutput::{Relation, Value};
use crate::plan::MirrorPlan;
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

/// A plan's new row versions already written as files of the mirror, elsewhere: the
/// changelog's files of exactly the upserts' rows, projected onto the mirror's columns
/// (`super::files::project_files`), so the upserts are not encoded a second time. The files
/// arrive while the executor locates the removes; a plan executed again (a lost commit race)
/// adds the same files.
pub struct Written {
    pending: Option<oneshot::Receiver<Vec<Add>>>,
    adds: Vec<Add>,
}

impl Written {
    /// The files' add actions will come through `files`.
    pub fn new(files: oneshot::Receiver<Vec<Add>>) -> Self {
        Written {
            pending: Some(files),
            adds: Vec::new(),
        }
    }

    /// The files' add actions, waited for the first time.
    async fn adds(&mut self, name: &str) -> Result<Vec<Add>, ApplyError> {
        if let Some(files) = self.pending.take() {
            self.adds = files.await.map_err(|_| ApplyError::Task {
                table: name.to_string(),
                reason: "the changelog's files for the mirror did not come".into(),
            })?;
        }
        Ok(self.adds.clone())
    }
}

/// Applies `plan` (the changes of `rel`, the batch's relation) to the mirror `table`; its new
/// rows are `written` when given, else encoded from the plan's upserts.
pub async fn execute(
    table: &mut DeltaTable,
    name: &str,
    rel: &Relation,
    (plan, written): (&MirrorPlan, Option<&mut Written>),
    props: CommitProperties,
    storage: &HashMap<String, String>,
    index: Option<&mut KeyIndex>,
) -> Result<Executed, ApplyError> {
    let cx = TableErr(name);
    evolve(table, name, &mirror_schema(rel), storage).await?;
    let target = table_schema(table).map_err(|e| cx.delta(e))?;
    let mut out = Executed::default();
    let upserts = match written {
        Some(_) => RecordBatch::new_empty(target.clone()),
        None => {
            let (upserts, bad) = upsert_batch(rel, plan, &target).map_err(|e| cx.arrow(e))?;
            out.unrepresentable = bad;
            upserts
        }
    };
    // Row versions that carry no value from the rows they replace are written while those rows
    // are located (the two take about as long, on two cores).
    let early = (!plan.removes.is_empty()
        && upserts.num_rows() > 0
        && !plan.upserts.iter().any(|u| u.carries()))
    .then(|| {
        let (table, rows) = (table.clone(), upserts.clone());
        tokio::spawn(async move { files::write_files(&table, rows, writer_properties()).await })
    });

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
        let mut matcher = Matcher::new(rel, &plan.removes, &target).map_err(|e| cx.arrow(e))?;
        let found = locate(table, name, &mut matcher, &needs, &target, index).await?;
        out.rows_removed = found.rows_removed;
        out.files_rewritten = found.files_rewritten;
        out.missing += matcher.pending;
        actions.extend(found.actions);
        carried = found.carried;
    }
    out.rows_added = plan.upserts.len();
    let adds = match (early, written) {
        (_, Some(written)) => Ok(written.adds(name).await?),
        (Some(task), None) => task.await.map_err(|e| ApplyError::Task {
            table: name.to_string(),
            reason: e.to_string(),
        })?,
        (None, None) => {
            let (upserts, missing) =
                carry(rel, plan, upserts, &carried, &target).map_err(|e| cx.arrow(e))?;
            out.missing += missing;
            if upserts.num_rows() > 0 {
                files::write_files(table, upserts, writer_properties()).await
            } else {
                Ok(Vec::new())
            }
        }
    };
    actions.extend(adds.map_err(|e| cx.delta(e))?.into_iter().map(Action::Add));
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
    // No rebasing onto a newer version by deltalake: a compaction's removes (dataChange = false)
    // do not conflict there, so a plan located on the older version would land beside the
    // compacted copies of the rows it took out. A lost race is settled by the caller, which
    // locates the plan anew.
    let commit = CommitBuilder::from(props.with_max_retries(0))
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
