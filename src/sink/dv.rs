//! Deletion vectors: which rows of a data file a Delta table no longer holds.
//!
//! Owns the stored form (the Delta protocol's "Deletion Vector Format"): reading a file's
//! vector, stored beside the table (`u`), at an absolute path (`p`) or inline in the log (`i`),
//! and writing new ones, all of one commit in one file `deletion_vector_<uuid>.bin` at the
//! table's root (a size, the `RoaringBitmapArray` magic, the portable 64-bit roaring bitmap and
//! a CRC-32 per vector; the serialization is the Delta kernel's). A vector is a set of row
//! positions in its data file, counted from 0 over the file's rows in order.

use delta_kernel::actions::deletion_vector_writer::{
    KernelDeletionVector, StreamingDeletionVectorWriter,
};
use deltalake::kernel::{DeletionVectorDescriptor, StorageType};
use deltalake::{DeltaTable, Path};
use object_store::ObjectStoreExt;
use roaring::RoaringTreemap;

use super::SinkError;

/// The magic number before every stored vector (little-endian).
const MAGIC: u32 = 1_681_511_377;

fn bad(table: &DeltaTable, reason: impl std::fmt::Display) -> SinkError {
    SinkError::Stats {
        file: format!("{}: deletion vector", table.table_url()),
        reason: reason.to_string(),
    }
}

/// The path of a `u` vector's file, relative to the table: an optional random prefix, then the
/// z85 form of a UUID (20 characters).
fn relative_path(encoded: &str) -> Option<String> {
    let split = encoded.len().checked_sub(20)?;
    let (prefix, id) = encoded.split_at(split);
    let id = uuid::Uuid::from_slice(&z85::decode(id).ok()?).ok()?;
    Some(if prefix.is_empty() {
        format!("deletion_vector_{id}.bin")
    } else {
        format!("{prefix}/deletion_vector_{id}.bin")
    })
}

/// The path, relative to the table, of the file holding `dv` (`None` for a vector inline in the
/// log or at an absolute path).
pub fn stored_path(dv: &DeletionVectorDescriptor) -> Option<String> {
    match dv.storage_type {
        StorageType::UuidRelativePath => relative_path(&dv.path_or_inline_dv),
        _ => None,
    }
}

/// The bitmap after the magic number.
fn bitmap(table: &DeltaTable, bytes: &[u8]) -> Result<RoaringTreemap, SinkError> {
    if bytes.len() < 4 || u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) != MAGIC {
        return Err(bad(table, "not a RoaringBitmapArray (wrong magic number)"));
    }
    RoaringTreemap::deserialize_from(&bytes[4..]).map_err(|e| bad(table, e))
}

/// The positions `dv` marks deleted in its data file of `table`.
pub async fn read(
    table: &DeltaTable,
    dv: &DeletionVectorDescriptor,
) -> Result<RoaringTreemap, SinkError> {
    let path = match dv.storage_type {
        StorageType::Inline => {
            let bytes = z85::decode(&dv.path_or_inline_dv).map_err(|e| bad(table, e))?;
            return bitmap(table, &bytes);
        }
        StorageType::UuidRelativePath => relative_path(&dv.path_or_inline_dv)
            .ok_or_else(|| bad(table, format!("bad path {:?}", dv.path_or_inline_dv)))?,
        StorageType::AbsolutePath => {
            let root = table.table_url().as_str().trim_end_matches('/').to_string() + "/";
            dv.path_or_inline_dv
                .strip_prefix(&root)
                .ok_or_else(|| {
                    bad(
                        table,
                        format!("{} is outside the table", dv.path_or_inline_dv),
                    )
                })?
                .to_string()
        }
    };
    // Past the offset: the size (4 bytes, big-endian), then `size_in_bytes` of magic and bitmap.
    let start = dv.offset.unwrap_or(0).max(0) as u64 + 4;
    let end = start + dv.size_in_bytes.max(0) as u64;
    let bytes = table
        .object_store()
        .get_range(&Path::from(path.as_str()), start..end)
        .await?;
    let set = bitmap(table, &bytes)?;
    if set.len() != dv.cardinality.max(0) as u64 {
        return Err(bad(
            table,
            format!(
                "{path} holds {} positions where the log says {}",
                set.len(),
                dv.cardinality
            ),
        ));
    }
    Ok(set)
}

/// Writes `sets` (each one data file's deleted positions, whole: earlier ones included) into one
/// new file of `table`; returns their descriptors, in order.
pub async fn write(
    table: &DeltaTable,
    sets: &[&RoaringTreemap],
) -> Result<Vec<DeletionVectorDescriptor>, SinkError> {
    if sets.is_empty() {
        return Ok(Vec::new());
    }
    let id = uuid::Uuid::new_v4();
    let encoded = z85::encode(id.as_bytes());
    let mut buf = Vec::new();
    let mut results = Vec::with_capacity(sets.len());
    {
        let mut writer = StreamingDeletionVectorWriter::new(&mut buf);
        for &set in sets {
            let mut dv = KernelDeletionVector::new();
            dv.add_deleted_row_indexes(set.iter());
            results.push(
                writer
                    .write_deletion_vector(dv)
                    .map_err(|e| bad(table, e))?,
            );
        }
        writer.finalize().map_err(|e| bad(table, e))?;
    }
    let path = relative_path(&encoded).expect("a UUID's z85 form is 20 characters");
    table
        .object_store()
        .put(&Path::from(path.as_str()), buf.into())
        .await?;
    Ok(results
        .into_iter()
        .map(|r| DeletionVectorDescriptor {
            storage_type: StorageType::UuidRelativePath,
            path_or_inline_dv: encoded.clone(),
            offset: Some(r.offset),
            size_in_bytes: r.size_in_bytes,
            cardinality: r.cardinality,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_from_descriptors() {
        let id = uuid::Uuid::new_v4();
        let enc = z85::encode(id.as_bytes());
        assert_eq!(
            relative_path(&enc).unwrap(),
            format!("deletion_vector_{id}.bin")
        );
        assert_eq!(
            relative_path(&format!("ab{enc}")).unwrap(),
            format!("ab/deletion_vector_{id}.bin")
        );
        assert!(relative_path("short").is_none());
    }

    // The example from the Delta protocol: `ab^-aqEH.-t@S}K{vb[*k^` is UUID
    // d2c639aa-8816-431a-aaf6-d3fe2512ff61 with the prefix `ab`.
    #[test]
    fn the_protocols_example_path() {
        assert_eq!(
            relative_path("ab^-aqEH.-t@S}K{vb[*k^").unwrap(),
            "ab/deletion_vector_d2c639aa-8816-431a-aaf6-d3fe2512ff61.bin"
        );
    }
}
