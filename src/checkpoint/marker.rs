//! The snapshot marker: `{warehouse}/_walden/{slot}/snapshot.json`.
//!
//! Written as `copying` before the first row of an initial snapshot is read and as `done` after
//! the last table is committed. A restart that finds `copying` knows the exported snapshot died
//! with the process that held it: the slot is dropped and the snapshot starts over (tables
//! committed before the crash are replaced whole; files of unfinished tables were never committed).

use deltalake::logstore::ObjectStoreRef;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::sink::{SinkError, Warehouse};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    Copying,
    Done,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotMarker {
    pub slot: String,
    pub state: SnapshotState,
    /// The slot's consistent point.
    pub lsn: String,
    pub tables: Vec<String>,
}

pub struct MarkerStore {
    store: ObjectStoreRef,
    path: Path,
}

impl MarkerStore {
    pub fn new(warehouse: &Warehouse, slot: &str) -> Result<Self, SinkError> {
        let store = warehouse.object_store(&format!("_walden/{slot}/"))?;
        Ok(MarkerStore {
            store,
            path: Path::from("snapshot.json"),
        })
    }

    pub async fn read(&self) -> Result<Option<SnapshotMarker>, SinkError> {
        match self.store.get(&self.path).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(SinkError::from)?;
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| SinkError::Marker(format!("{}: {e}", self.path)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(SinkError::from(e)),
        }
    }

    pub async fn write(&self, m: &SnapshotMarker) -> Result<(), SinkError> {
        let body = serde_json::to_vec_pretty(m).expect("marker serializes");
        self.store
            .put(&self.path, PutPayload::from(body))
            .await
            .map_err(SinkError::from)?;
        Ok(())
    }
}
