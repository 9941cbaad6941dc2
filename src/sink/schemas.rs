//! The schema history: every version of a source table's schema, with the LSN where it took
//! effect, at `{warehouse}/_walden/schemas/{schema}/{table}/{LSN as 16 hex digits}.json`.
//!
//! A version is the relation as the source described it (its OID, replica identity, and each
//! column's name, type OID, type modifier, identity flag and Arrow type). A new OID under the same
//! name is a new generation of the table (DROP + CREATE). Records are written before the Delta
//! commit that first holds rows of that version; a replay writes the same file again.

use deltalake::logstore::ObjectStoreRef;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use super::{SinkError, Warehouse};
use crate::checkpoint::Lsn;
use crate::decode::pgoutput::Relation;
use crate::decode::types::column_type;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaVersion {
    pub schema: String,
    pub table: String,
    /// The source table's OID: a new one under the same name is a new generation.
    pub oid: u32,
    /// Where this version took effect (the commit LSN of its first change, or the snapshot's).
    pub lsn: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: String,
    pub columns: Vec<ColumnVersion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnVersion {
    pub name: String,
    /// The type the values are read as (a domain's base type, an array's element type).
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Array dimensions (0: not an array).
    #[serde(default)]
    pub dims: u8,
    /// Attribute number in the source catalog (0: unknown).
    #[serde(default)]
    pub attnum: i16,
    pub identity: bool,
    pub arrow_type: String,
}

impl SchemaVersion {
    pub fn of(rel: &Relation, lsn: Lsn) -> Self {
        SchemaVersion {
            schema: rel.schema.clone(),
            table: rel.name.clone(),
            oid: rel.oid,
            lsn: lsn.to_string(),
            replica_identity: (rel.replica_identity as char).to_string(),
            columns: rel
                .columns
                .iter()
                .map(|c| ColumnVersion {
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                    type_modifier: c.type_modifier,
                    dims: c.dims,
                    attnum: c.attnum,
                    identity: c.key,
                    arrow_type: column_type(c).to_string(),
                })
                .collect(),
        }
    }

    /// This version is `older` with columns added after its last one, and nothing else changed.
    pub fn only_adds_to(&self, older: &SchemaVersion) -> bool {
        self.oid == older.oid
            && self.replica_identity == older.replica_identity
            && self.columns.len() > older.columns.len()
            && self.columns.starts_with(&older.columns)
    }

    /// The same schema (whatever the LSN).
    pub fn same_as(&self, other: &SchemaVersion) -> bool {
        self.oid == other.oid
            && self.replica_identity == other.replica_identity
            && self.columns == other.columns
    }
}

#[derive(Clone)]
pub struct SchemaHistory {
    store: ObjectStoreRef,
}

impl SchemaHistory {
    pub fn new(warehouse: &Warehouse) -> Result<Self, SinkError> {
        Ok(SchemaHistory {
            store: warehouse.object_store("_walden/schemas/")?,
        })
    }

    fn dir(schema: &str, table: &str) -> Path {
        Path::from_iter([schema, table])
    }

    /// The newest version recorded for `schema.table`.
    pub async fn latest(
        &self,
        schema: &str,
        table: &str,
    ) -> Result<Option<SchemaVersion>, SinkError> {
        self.at(schema, table, Lsn(u64::MAX)).await
    }

    /// The version of `schema.table` in effect at `lsn`: the newest recorded at or before it.
    pub async fn at(
        &self,
        schema: &str,
        table: &str,
        lsn: Lsn,
    ) -> Result<Option<SchemaVersion>, SinkError> {
        let dir = Self::dir(schema, table);
        let upto = format!("{:016X}.json", lsn.0);
        let mut names: Vec<Path> = self
            .store
            .list(Some(&dir))
            .map_ok(|m| m.location)
            .try_filter(|p| std::future::ready(p.filename().is_some_and(|f| *f <= *upto)))
            .try_collect()
            .await?;
        names.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
        let Some(last) = names.pop() else {
            return Ok(None);
        };
        let bytes = self.store.get(&last).await?.bytes().await?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SinkError::Marker(format!("{last}: {e}")))
    }

    pub async fn record(&self, v: &SchemaVersion) -> Result<(), SinkError> {
        let lsn: Lsn = v.lsn.parse().map_err(SinkError::Marker)?;
        let path = Self::dir(&v.schema, &v.table).join(format!("{:016X}.json", lsn.0));
        let body = serde_json::to_vec_pretty(v).expect("schema version serializes");
        self.store.put(&path, PutPayload::from(body)).await?;
        Ok(())
    }
}
