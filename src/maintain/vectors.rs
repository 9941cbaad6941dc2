//! VACUUM of deletion-vector files.
//!
//! deltalake's VACUUM (lite) deletes the data files that removed entries name once they are past
//! the retention; a deletion vector replaced by a newer one of the same data file is named by no
//! such entry, so it would stay forever. This deletes the files `deletion_vector_*.bin` at a
//! table's root that no version a reader may still read needs:
//!
//! - not referenced by the current version,
//! - not referenced by the version that was current at the retention's start (the oldest one a
//!   reader within the retention can be reading),
//! - and older than the retention themselves: vectors referenced only by versions in between,
//!   and vectors of a commit still in flight, were written after the retention's start.
//!
//! Whatever the retention, a vector younger than [`IN_FLIGHT`] stays: a flush writes its vectors
//! before its commit, and `walden maintain` with a retention of 0 may run beside a stream.
//! When the version at the retention's start cannot be read (log cleaned past it), nothing is
//! deleted.

use std::collections::HashSet;

use chrono::Utc;
use deltalake::{DeltaTable, DeltaTableError, Path};
use object_store::ObjectStoreExt;

/// How long a vector file is kept at least: longer than a flush takes from writing it to its
/// commit.
const IN_FLIGHT: chrono::Duration = chrono::Duration::minutes(15);

/// File names of the deletion vectors `table`'s loaded version references.
fn referenced(table: &DeltaTable) -> Result<HashSet<String>, DeltaTableError> {
    let state = table.snapshot()?;
    Ok(state
        .log_data()
        .iter()
        .filter_map(|f| f.deletion_vector_descriptor())
        .filter_map(|d| crate::sink::dv::stored_path(&d))
        .collect())
}

/// Deletes the deletion-vector files of `table` no version within `hours` needs; returns how many.
pub async fn vacuum(table: &DeltaTable, hours: u64) -> Result<u64, DeltaTableError> {
    let cutoff = Utc::now() - chrono::Duration::hours(hours as i64);
    let mut keep = referenced(table)?;
    if hours > 0 {
        let mut then = table.clone();
        match then.load_with_datetime(cutoff).await {
            Ok(()) => keep.extend(referenced(&then)?),
            // The table began after the cutoff: every vector is newer than it.
            Err(_) if table_began_after(table, cutoff).await? => {}
            Err(e) => {
                tracing::debug!(error = %e, "version at the retention's start unreadable; \
                    deletion vectors left as they are");
                return Ok(0);
            }
        }
    }
    let store = table.object_store();
    let listed = store.list_with_delimiter(None).await?;
    let mut deleted = 0;
    for meta in listed.objects {
        let Some(name) = meta.location.filename() else {
            continue;
        };
        if !name.starts_with("deletion_vector_") || !name.ends_with(".bin") {
            continue;
        }
        if keep.contains(name) || meta.last_modified >= cutoff.min(Utc::now() - IN_FLIGHT) {
            continue;
        }
        store.delete(&Path::from(name)).await?;
        deleted += 1;
    }
    Ok(deleted)
}

/// Whether the first commit of `table` is newer than `cutoff` (false once it is cleaned up).
async fn table_began_after(
    table: &DeltaTable,
    cutoff: chrono::DateTime<Utc>,
) -> Result<bool, DeltaTableError> {
    let first = Path::from("_delta_log/00000000000000000000.json");
    match table.object_store().head(&first).await {
        Ok(meta) => Ok(meta.last_modified > cutoff),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
