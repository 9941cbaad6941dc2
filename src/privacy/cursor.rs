//! How far propagated deletes are done, per table: where the next round starts.
//!
//! Owns `_walden/privacy/erased.json`: for each table holding personal data whose replica
//! identity is a key, the LSN up to which every delete in its changelog has been erased with
//! the deleted row's history (the erasure takes the delete rows themselves too, so none at or
//! below it is left). Rounds read deletes above it only, and the changelog's files carry
//! `_walden_lsn` statistics in stream order, so a round reads what arrived since the last one,
//! not the whole changelog. Only LSNs, no personal data. Written after a round's erasures
//! succeeded; a crash before that only makes the next round read a little more again.

use std::collections::BTreeMap;

use object_store::path::Path;
use object_store::{Error as ObjectStoreError, ObjectStoreExt, PutPayload};

use super::PrivacyError;
use crate::sink::{SinkError, Warehouse};

const DIR: &str = "_walden/privacy/";
const FILE: &str = "erased.json";

/// The LSN below which (inclusive) each table's deletes are erased.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Erased {
    tables: BTreeMap<String, i64>,
}

impl Erased {
    pub async fn load(w: &Warehouse) -> Result<Erased, PrivacyError> {
        let store = w.object_store(DIR)?;
        match store.get(&Path::from(FILE)).await {
            Ok(got) => {
                let bytes = got.bytes().await.map_err(store_err)?;
                serde_json::from_slice(&bytes).map_err(|e| {
                    PrivacyError::Query(format!(
                        "{DIR}{FILE} is not walden's record of erased deletes ({e}); delete it \
                         (the next round then reads every changelog once)"
                    ))
                })
            }
            Err(ObjectStoreError::NotFound { .. }) => Ok(Erased::default()),
            Err(e) => Err(store_err(e)),
        }
    }

    pub async fn save(&self, w: &Warehouse) -> Result<(), PrivacyError> {
        let store = w.object_store(DIR)?;
        let body = serde_json::to_vec_pretty(self).expect("LSNs serialize");
        store
            .put(&Path::from(FILE), PutPayload::from(body))
            .await
            .map_err(store_err)?;
        Ok(())
    }

    /// Every delete of `table` at or below this LSN is erased (0: none is known to be).
    pub fn of(&self, table: &str) -> i64 {
        self.tables.get(table).copied().unwrap_or(0)
    }

    pub fn set(&mut self, table: &str, lsn: i64) {
        let at = self.tables.entry(table.to_string()).or_insert(lsn);
        *at = (*at).max(lsn);
    }
}

fn store_err(e: ObjectStoreError) -> PrivacyError {
    SinkError::Store(Box::new(e)).into()
}
