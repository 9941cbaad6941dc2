//! Purging deletion vectors: rewriting the files most of whose rows are marked deleted.
//!
//! Owns the choice of files (a deletion vector covering at least `maintenance.purge_share` of a
//! file's rows) and their rewrite: the live rows written to new files, the old entries removed,
//! in one commit that changes no data (`dataChange = false`, like a compaction), so readers and
//! the stream's exactly-once records see the same rows before and after. The rewrite is the
//! Delta "REORG TABLE … APPLY (PURGE)" idea; the files replaced go at the next VACUUM past the
//! retention. A purge that loses a race to a stream commit (which took rows out of one of the
//! same files) fails and is tried again next round.

use std::time::{Duration, Instant};

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, LogicalFileView};
use deltalake::protocol::DeltaOperation;
use deltalake::{DeltaTable, DeltaTableError};

use crate::apply::files;
use crate::sink::writer_properties;

/// What a purge did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Purged {
    pub files: u64,
    pub rows_dropped: u64,
}

/// The share of `file`'s rows its deletion vector marks (0 without one, or without a row count).
fn deleted_share(file: &LogicalFileView) -> f64 {
    let (Some(dv), Some(rows)) = (file.deletion_vector_descriptor(), file.num_records()) else {
        return 0.0;
    };
    if rows == 0 {
        return 0.0;
    }
    dv.cardinality.max(0) as f64 / rows as f64
}

/// Rewrites the files of `table` whose deletion vectors cover at least `share` of their rows,
/// starting no file after `budget`.
pub async fn purge(
    table: &mut DeltaTable,
    share: f64,
    budget: Duration,
) -> Result<Purged, DeltaTableError> {
    let started = Instant::now();
    let state = table.snapshot()?.clone();
    let chosen: Vec<LogicalFileView> = state
        .log_data()
        .iter()
        .filter(|f| deleted_share(f) >= share)
        .collect();
    let mut out = Purged::default();
    if chosen.is_empty() {
        return Ok(out);
    }
    let schema = crate::apply::evolve::table_schema(table)?;
    let mut actions = Vec::new();
    for file in &chosen {
        if started.elapsed() > budget {
            break;
        }
        let batches = files::read_live(table, file)
            .await
            .map_err(|e| DeltaTableError::Generic(e.to_string()))?;
        let mut rest = Vec::new();
        for b in batches.iter().filter(|b| b.num_rows() > 0) {
            rest.push(crate::apply::evolve::align(b, &schema)?);
        }
        out.files += 1;
        out.rows_dropped += file
            .deletion_vector_descriptor()
            .map_or(0, |d| d.cardinality.max(0) as u64);
        actions.push(Action::Remove(file.remove_action(false)));
        if !rest.is_empty() {
            let batch = arrow::compute::concat_batches(&schema, &rest)?;
            for mut add in files::write_files(table, batch, writer_properties()).await? {
                add.data_change = false;
                actions.push(Action::Add(add));
            }
        }
    }
    let commit = CommitBuilder::from(CommitProperties::default().with_max_retries(0))
        .with_actions(actions)
        .build(
            Some(&state),
            table.log_store(),
            DeltaOperation::Optimize {
                target_size: 0,
                predicate: Some("purge deletion vectors".into()),
            },
        )
        .await?;
    table.state = Some(commit.snapshot());
    Ok(out)
}
