//! Checkpoints and log cleanup of the tables the stream writes, off the commit path.
//!
//! deltalake runs both as hooks after every commit by default: a checkpoint every 100 versions
//! (the whole table state written out) and, on *every* commit, a listing of the whole
//! `_delta_log/` to find expired entries (thousands of objects with hours of retention at one
//! commit a second), reading the table's state anew when it deleted some. On the stream's
//! commits that time is freshness lost. The stream's commits turn both hooks off
//! ([`super::commit_props`]); a [`LogKeeper`] per table starts them in a task of their own each
//! time the table's version passes a multiple of [`INTERVAL`], one task at a time. A checkpoint
//! is of a version that exists, so it may be written beside later commits; a checkpoint or
//! cleanup that fails is logged and tried again at the next multiple. A task cut short (the
//! process ends) leaves nothing wrong: a checkpoint file is put whole or not at all, and
//! `_last_checkpoint` is only a hint.

use deltalake::DeltaTable;
use tokio::task::JoinHandle;

/// Versions between checkpoints (Delta's default `delta.checkpointInterval`).
pub const INTERVAL: u64 = 100;

/// The checkpoint and cleanup task of one table.
#[derive(Default)]
pub struct LogKeeper {
    /// The last version a task was started for (or the table's version when first seen,
    /// rounded down to a multiple of [`INTERVAL`]).
    last: Option<u64>,
    running: Option<JoinHandle<()>>,
}

impl LogKeeper {
    /// After a commit of `table` (`name` for the log): starts a checkpoint and log cleanup when
    /// its version passed a multiple of [`INTERVAL`] and no earlier one is still running.
    pub fn after_commit(&mut self, table: &DeltaTable, name: &str) {
        let Some(v) = table.version() else {
            return;
        };
        let last = *self.last.get_or_insert(v - v % INTERVAL);
        if v / INTERVAL <= last / INTERVAL
            || self.running.as_ref().is_some_and(|h| !h.is_finished())
        {
            return;
        }
        self.last = Some(v);
        let (table, name) = (table.clone(), name.to_string());
        self.running = Some(tokio::spawn(async move {
            let done = match deltalake::checkpoints::create_checkpoint(&table, None).await {
                Ok(()) => deltalake::checkpoints::cleanup_metadata(&table, None)
                    .await
                    .map(|n| tracing::debug!(table = %name, version = v, cleaned = n, "checkpoint written")),
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                tracing::warn!(table = %name, version = v, error = %e,
                    "checkpoint or log cleanup failed; tried again at the next interval");
            }
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::kernel::{DataType, StructField};

    /// Past a multiple of the interval, one checkpoint is written beside the commits (which
    /// write none themselves).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_follows_every_hundred_versions() {
        let dir = tempfile::tempdir().unwrap();
        let url = url::Url::from_directory_path(dir.path()).unwrap();
        let mut table = deltalake::DeltaTable::try_from_url(url)
            .await
            .unwrap()
            .create()
            .with_columns([StructField::new("v", DataType::INTEGER, true)])
            .await
            .unwrap();
        let mut keeper = LogKeeper::default();
        for i in 0..105 {
            let props = deltalake::kernel::transaction::CommitProperties::default()
                .with_application_transactions(vec![deltalake::kernel::Transaction::new("t", i)])
                .with_create_checkpoint(false)
                .with_cleanup_expired_logs(Some(false));
            let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
                arrow::datatypes::Field::new("v", arrow::datatypes::DataType::Int32, true),
            ]));
            let one = arrow::array::RecordBatch::try_new(
                schema,
                vec![std::sync::Arc::new(arrow::array::Int32Array::from(vec![
                    i as i32,
                ]))],
            )
            .unwrap();
            table = table
                .write(vec![one])
                .with_commit_properties(props)
                .await
                .unwrap();
            keeper.after_commit(&table, "t");
        }
        keeper.running.take().unwrap().await.unwrap();
        let log: Vec<String> = std::fs::read_dir(dir.path().join("_delta_log"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.contains("checkpoint.parquet"))
            .collect();
        assert_eq!(log, ["00000000000000000100.checkpoint.parquet"]);
    }
}
