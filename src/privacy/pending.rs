//! Erasures cut short: what an erasure still has to delete once its commit landed, recorded
//! before the commit under `_walden/erasures/pending/` and finished by [`resume`] after a crash.
//!
//! Owns the pending records (paths only, never a value), the deletion of files and of the Delta
//! log before a checkpoint, which the erasure itself (`forget`) and the resume share.

use deltalake::{DeltaTable, DeltaTableError};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Serialize;

use super::PrivacyError;
use crate::config::Config;
use crate::sink::{SinkError, Warehouse};

/// The directory of a table's pending erasure records: `_walden/erasures/pending/` plus the
/// table's directory under the warehouse.
pub(super) fn pending_dir(url: &url::Url, w: &Warehouse) -> String {
    let rel = url
        .as_str()
        .strip_prefix(w.root().as_str())
        .unwrap_or_default();
    format!("_walden/erasures/pending/{rel}")
}

/// What an erasure of one table still has to delete once its rewrite commits: written before
/// the commit and removed when the files are gone, so a crash in between (after the commit took
/// the subject's rows, and with them the deletes that made it pending, out of the changelog)
/// leaves a record [`resume`] finishes. It names files only, never a value.
pub(super) struct Pending {
    pub(super) store: deltalake::logstore::ObjectStoreRef,
    pub(super) name: String,
    pub(super) files: Vec<String>,
}

#[derive(Serialize, serde::Deserialize)]
struct PendingRecord {
    files: Vec<String>,
    logs: bool,
}

impl Pending {
    pub(super) async fn write(&self, logs: bool) -> Result<(), DeltaTableError> {
        let body = serde_json::to_vec(&PendingRecord {
            files: self.files.clone(),
            logs,
        })
        .expect("a record serializes");
        self.store
            .put(&Path::from(self.name.as_str()), PutPayload::from(body))
            .await
            .map_err(|source| DeltaTableError::ObjectStore { source })?;
        Ok(())
    }
}

/// Finishes erasures a crash cut short (see [`Pending`]): files a record names that the table's
/// current version no longer references are deleted, and the log before a checkpoint at the
/// current version, when the record says the log held the subject.
pub async fn resume(cfg: &Config) -> Result<usize, PrivacyError> {
    let w = Warehouse::new(&cfg.warehouse)?;
    let store = w.object_store("_walden/erasures/pending/")?;
    let records: Vec<_> = store
        .list(None)
        .try_collect()
        .await
        .map_err(|e| SinkError::Store(Box::new(e)))?;
    let mut finished = 0;
    for meta in records {
        let path = meta.location.to_string();
        let Some((dir, _)) = path.rsplit_once('/') else {
            continue;
        };
        let url = w
            .root()
            .join(&format!("{dir}/"))
            .map_err(|e| SinkError::BadLocation {
                url: path.clone(),
                reason: e.to_string(),
            })?;
        let delta = |source| SinkError::Delta {
            table: url.to_string(),
            source,
        };
        let bytes = store
            .get(&meta.location)
            .await
            .map_err(|e| SinkError::Store(Box::new(e)))?
            .bytes()
            .await
            .map_err(|e| SinkError::Store(Box::new(e)))?;
        let Ok(record) = serde_json::from_slice::<PendingRecord>(&bytes) else {
            continue;
        };
        if let Some(mut t) = w.open(&url).await.map_err(delta)? {
            let current = super::current_files(&t);
            let files = t.object_store();
            for f in record.files.iter().filter(|f| !current.contains(*f)) {
                delete(&files, f).await.map_err(delta)?;
            }
            if record.logs {
                drop_log_before_checkpoint(&mut t).await.map_err(delta)?;
            }
        }
        delete(&store, &path).await.map_err(|e| SinkError::Delta {
            table: path.clone(),
            source: e,
        })?;
        finished += 1;
    }
    Ok(finished)
}

/// Writes a checkpoint at the table's version and deletes every log entry before it.
pub(super) async fn drop_log_before_checkpoint(
    t: &mut DeltaTable,
) -> Result<Vec<String>, DeltaTableError> {
    deltalake::checkpoints::create_checkpoint(t, None).await?;
    let newest = t.version().unwrap_or(0) as i64;
    let store = t.object_store();
    let log: Vec<_> = store
        .list(Some(&Path::from("_delta_log")))
        .try_collect()
        .await
        .map_err(|source| DeltaTableError::ObjectStore { source })?;
    let mut out = Vec::new();
    for meta in log {
        let path = meta.location.to_string();
        if log_version(&path).is_some_and(|v| v < newest) {
            delete(&store, &path).await?;
            out.push(path);
        }
    }
    Ok(out)
}

/// The version a `_delta_log/` entry belongs to (commit or checkpoint).
fn log_version(path: &str) -> Option<i64> {
    path.strip_prefix("_delta_log/")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

pub(super) async fn delete(
    store: &deltalake::logstore::ObjectStoreRef,
    path: &str,
) -> Result<(), DeltaTableError> {
    match store.delete(&Path::from(path)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(DeltaTableError::ObjectStore { source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_entries_name_their_version() {
        assert_eq!(
            log_version("_delta_log/00000000000000000012.json"),
            Some(12)
        );
        assert_eq!(
            log_version("_delta_log/00000000000000000010.checkpoint.parquet"),
            Some(10)
        );
        assert_eq!(log_version("part-0001.parquet"), None);
    }
}
