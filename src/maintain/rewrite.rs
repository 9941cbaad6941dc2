//! Rewriting files of a table into new ones holding only their live rows (compaction and purge),
//! committed over whatever the stream committed while they were written.
//!
//! Owns the two halves of a rewrite:
//!
//! - [`prepare`]: each bin of files is read in order, file by file and batch by batch, the rows
//!   its deletion vector marks (as of the version read) left out, and written as one new file
//!   (not committed). Each input records where its first live row went in the output.
//! - [`commit`]: on the table's newest version, the stream may have marked more rows of the
//!   inputs in their deletion vectors (every flush of an update load does, and a compaction takes
//!   longer than a flush). Those rows are in the output too: they are marked in a deletion
//!   vector of the output at their new positions (the input's offset plus the row's rank among
//!   the input's live rows as read), and the commit removes the inputs as they are now. When
//!   another commit lands between reading the newest version and committing, the rebase is done
//!   again on the version after it (cheap: only vectors are read).
//!
//! An input that is no longer in the table at all (rewritten: a truncate, an erasure, a
//! copy-on-write flush) defers the whole rewrite to the next round and deletes its outputs: an
//! erasure's rewrite must not be undone by a copy of rows it took out.
//!
//! Invariant: the rows a rewrite commits are exactly the rows of its inputs in the version it
//! commits over (same rows, other files; `dataChange = false`, no `txn`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arrow::array::BooleanArray;
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, DeletionVectorDescriptor, LogicalFileView};
use deltalake::protocol::DeltaOperation;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError, Path};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use roaring::RoaringTreemap;

use crate::apply::{evolve, files};
use crate::sink::{delta_is_transient, dv, writer_properties};

/// Commits tried per rewrite before it is left for the next round (each after the stream's
/// newest commit; the stream commits about once per `max_delay`, a rebase takes milliseconds).
pub const ATTEMPTS: usize = 20;

/// One file read into an output, as it was when read.
#[derive(Debug, Clone)]
pub struct Input {
    path: String,
    vector: Option<DeletionVectorDescriptor>,
    deleted: RoaringTreemap,
    /// The output position of the file's first live row.
    offset: u64,
    /// Whether the file was chosen for its deletion vector (a purge) rather than its size.
    purged: bool,
}

/// One new file and the inputs whose live rows it holds, in order (no file when none of them
/// had a live row: the inputs go, nothing takes their place).
#[derive(Debug, Clone)]
pub struct Output {
    add: Option<Add>,
    rows: u64,
    inputs: Vec<Input>,
}

/// Outputs written, not yet committed.
#[derive(Debug, Default)]
pub struct Prepared {
    outputs: Vec<Output>,
}

impl Prepared {
    pub fn is_empty(&self) -> bool {
        self.outputs.is_empty()
    }

    /// The paths of the files written, relative to the table.
    pub fn files(&self) -> Vec<String> {
        let written = self.outputs.iter().filter_map(|o| o.add.as_ref());
        written.map(|a| a.path.clone()).collect()
    }
}

/// A file to rewrite, and whether it was chosen for its deletion vector.
pub struct Chosen {
    pub file: LogicalFileView,
    pub purge: bool,
}

/// What a committed rewrite did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    pub files_removed: u64,
    pub files_added: u64,
    /// Inputs chosen for their deletion vectors.
    pub files_purged: u64,
    /// Rows the stream marked in the inputs while they were rewritten, marked again in the
    /// outputs.
    pub rows_rebased: u64,
    /// Commits lost to the stream before this one got through.
    pub lost: u64,
}

/// Why a rewrite did not commit.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error(transparent)]
    Delta(#[from] DeltaTableError),
    /// An input was taken out of the table (not only marked) while it was rewritten.
    #[error("{0} left the table while it was rewritten; the next round tries again")]
    Gone(String),
    #[error(
        "the stream committed {0} times while the rewrite tried to; the next round tries again"
    )]
    Raced(usize),
}

impl RewriteError {
    /// Whether the next round may get through (the table itself is fine).
    pub fn is_transient(&self) -> bool {
        match self {
            RewriteError::Delta(e) => delta_is_transient(e),
            RewriteError::Gone(_) | RewriteError::Raced(_) => true,
        }
    }
}

/// Writes each bin of `bins` as one new file of `table` (its loaded version's live rows of the
/// bin's files, in order), starting no bin after `budget`.
pub async fn prepare(
    table: &DeltaTable,
    bins: Vec<Vec<Chosen>>,
    budget: Duration,
) -> Result<Prepared, DeltaTableError> {
    let started = Instant::now();
    let schema = evolve::table_schema(table)?;
    let mut prepared = Prepared::default();
    for bin in bins {
        if started.elapsed() > budget {
            break;
        }
        let mut w =
            RecordBatchWriter::for_table(table)?.with_writer_properties(writer_properties());
        let mut inputs = Vec::with_capacity(bin.len());
        let mut rows = 0u64;
        for Chosen { file, purge } in bin {
            let deleted = files::deleted_rows(table, &file)
                .await
                .map_err(|e| DeltaTableError::Generic(e.to_string()))?;
            let offset = rows;
            rows += write_live(table, &file, &deleted, &schema, &mut w).await?;
            inputs.push(Input {
                path: file.path().to_string(),
                vector: file.deletion_vector_descriptor(),
                deleted,
                offset,
                purged: purge,
            });
        }
        let mut adds = w.flush().await?;
        if adds.len() > 1 {
            return Err(DeltaTableError::Generic(format!(
                "a rewrite wrote {} files for one bin (one expected)",
                adds.len()
            )));
        }
        let add = adds.pop().map(|add| Add {
            data_change: false,
            ..add
        });
        prepared.outputs.push(Output { add, rows, inputs });
    }
    Ok(prepared)
}

/// Writes the rows of `file` that `deleted` does not mark to `w`, aligned to `schema`, a batch
/// at a time; returns how many.
async fn write_live(
    table: &DeltaTable,
    file: &LogicalFileView,
    deleted: &RoaringTreemap,
    schema: &SchemaRef,
    w: &mut RecordBatchWriter,
) -> Result<u64, DeltaTableError> {
    let marked: Vec<u64> = deleted.iter().collect();
    let mut stream = files::stream_rows(table, file, None)
        .await
        .map_err(|e| DeltaTableError::Generic(e.to_string()))?;
    let (mut at, mut written) = (0u64, 0u64);
    while let Some(batch) = stream
        .try_next()
        .await
        .map_err(|e| DeltaTableError::Generic(format!("{}: {e}", file.path())))?
    {
        let n = batch.num_rows();
        let keep = BooleanArray::from(files::live_rows(&marked, at, n));
        at += n as u64;
        let live = filter_record_batch(&batch, &keep)?;
        if live.num_rows() > 0 {
            written += live.num_rows() as u64;
            w.write(evolve::align(&live, schema)?).await?;
        }
    }
    Ok(written)
}

/// The output position of `row`, a live row (as read) of the input whose first live row went to
/// `offset`: that plus the number of rows before it its vector marked then.
pub fn output_position(offset: u64, deleted: &RoaringTreemap, row: u64) -> u64 {
    let before = if row == 0 { 0 } else { deleted.rank(row - 1) };
    offset + row - before
}

/// Vectors read at once while rebasing (a store's latency is per request; a bin has hundreds
/// of inputs).
const READS_AT_ONCE: usize = 32;

/// The rows of `out` the inputs' vectors in `now` mark beyond what they marked when read.
async fn rebased(
    table: &DeltaTable,
    out: &Output,
    now: &HashMap<String, LogicalFileView>,
) -> Result<RoaringTreemap, RewriteError> {
    let mut changed = Vec::new();
    for input in &out.inputs {
        let Some(file) = now.get(&input.path) else {
            return Err(RewriteError::Gone(input.path.clone()));
        };
        if file.deletion_vector_descriptor() != input.vector {
            changed.push((input, file));
        }
    }
    let marked: Vec<RoaringTreemap> = futures::stream::iter(changed.iter())
        .map(|(_, file)| files::deleted_rows(table, file))
        .buffered(READS_AT_ONCE)
        .try_collect()
        .await
        .map_err(|e| DeltaTableError::Generic(e.to_string()))?;
    let mut extra = RoaringTreemap::new();
    for ((input, _), marked) in changed.iter().zip(marked) {
        if !input.deleted.is_subset(&marked) {
            // Vectors only grow while a file stays; this one was replaced some other way.
            return Err(RewriteError::Gone(input.path.clone()));
        }
        for row in marked - &input.deleted {
            extra.insert(output_position(input.offset, &input.deleted, row));
        }
    }
    Ok(extra)
}

/// Commits `prepared` on `table`'s newest version, rebased onto the rows the stream marked in
/// its inputs meanwhile; on a lost race, again on the version after it, at most [`ATTEMPTS`]
/// times. Outputs it does not commit (all of them when it fails; one whose rows were all
/// deleted meanwhile) are deleted.
pub async fn commit(table: &mut DeltaTable, prepared: Prepared) -> Result<Rewritten, RewriteError> {
    let result = commit_rebased(table, &prepared).await;
    let added = result.as_ref().map(|(_, a)| a.clone()).unwrap_or_default();
    let store = table.object_store();
    for path in prepared.files() {
        if added.contains(&path) {
            continue;
        }
        if let Err(e) = store.delete(&Path::from(path.as_str())).await {
            tracing::debug!(file = %path, error = %e, "an uncommitted rewrite stays");
        }
    }
    result.map(|(done, _)| done)
}

/// The commit, and the paths of the outputs it added.
async fn commit_rebased(
    table: &mut DeltaTable,
    prepared: &Prepared,
) -> Result<(Rewritten, Vec<String>), RewriteError> {
    for attempt in 0..ATTEMPTS {
        table.update_state().await?;
        let state = table.snapshot()?.clone();
        let now: HashMap<String, LogicalFileView> = state
            .log_data()
            .iter()
            .map(|f| (f.path().to_string(), f))
            .collect();
        let mut done = Rewritten {
            lost: attempt as u64,
            ..Rewritten::default()
        };
        let mut actions = Vec::new();
        let mut extras = Vec::new();
        for out in &prepared.outputs {
            let extra = rebased(table, out, &now).await?;
            for input in &out.inputs {
                actions.push(Action::Remove(now[&input.path].remove_action(false)));
                done.files_removed += 1;
                done.files_purged += input.purged as u64;
            }
            done.rows_rebased += extra.len();
            if let Some(add) = out.add.as_ref().filter(|_| out.rows > extra.len()) {
                extras.push((add, extra));
            }
        }
        let marked: Vec<&RoaringTreemap> = extras
            .iter()
            .map(|(_, e)| e)
            .filter(|e| !e.is_empty())
            .collect();
        let mut vectors = dv::write(table, &marked)
            .await
            .map_err(|e| DeltaTableError::Generic(e.to_string()))?
            .into_iter();
        for (add, extra) in &extras {
            let mut add = (*add).clone();
            if !extra.is_empty() {
                add.deletion_vector = vectors.next();
            }
            actions.push(Action::Add(add));
            done.files_added += 1;
        }
        let committed = CommitBuilder::from(CommitProperties::default().with_max_retries(0))
            .with_actions(actions)
            .build(
                Some(&state),
                table.log_store(),
                DeltaOperation::Optimize {
                    target_size: 0,
                    predicate: None,
                },
            )
            .await;
        match committed {
            Ok(c) => {
                table.state = Some(c.snapshot());
                let added = extras.iter().map(|(a, _)| a.path.clone()).collect();
                return Ok((done, added));
            }
            Err(e) if delta_is_transient(&e) => {
                tracing::debug!(attempt, error = %e, "a rewrite lost a race; rebasing again");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(RewriteError::Raced(ATTEMPTS))
}

#[cfg(test)]
mod tests {
    use super::output_position;
    use proptest::prelude::*;
    use roaring::RoaringTreemap;

    #[test]
    fn a_live_row_moves_down_by_the_rows_marked_before_it() {
        let deleted: RoaringTreemap = [0u64, 2, 3, 7].into_iter().collect();
        // Live rows 1, 4, 5, 6, 8 go to 10, 11, 12, 13, 14.
        let got: Vec<u64> = [1u64, 4, 5, 6, 8]
            .iter()
            .map(|&r| output_position(10, &deleted, r))
            .collect();
        assert_eq!(got, [10, 11, 12, 13, 14]);
        assert_eq!(output_position(0, &RoaringTreemap::new(), 0), 0);
    }

    proptest! {
        /// The positions are those of the live rows written in order.
        #[test]
        fn positions_are_those_the_rows_were_written_at(
            marks in proptest::collection::vec(any::<bool>(), 0..300),
            offset in 0u64..1000,
        ) {
            let deleted: RoaringTreemap = marks
                .iter()
                .enumerate()
                .filter(|(_, &m)| m)
                .map(|(i, _)| i as u64)
                .collect();
            let live = (0..marks.len() as u64).filter(|r| !deleted.contains(*r));
            for (written, row) in live.enumerate() {
                prop_assert_eq!(output_position(offset, &deleted, row), offset + written as u64);
            }
        }
    }
}
