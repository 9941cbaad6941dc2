//! Which files a maintenance round rewrites, and how they are grouped.
//!
//! Owns the choice: small files (smaller than half of `maintenance.target_file_bytes`), once a
//! table has `maintenance.compact_min_files` of them (compaction), and files whose deletion
//! vector marks at least `maintenance.purge_share` of their rows (purge: the Delta "REORG TABLE
//! … APPLY (PURGE)" idea), packed in log order into bins of about the target's worth of live
//! bytes, each bin to become one file (`rewrite`). A bin of one small file without a purge is
//! left as it is: rewriting it would gain nothing.

use deltalake::kernel::LogicalFileView;
use deltalake::{DeltaTable, DeltaTableError};

use super::rewrite::Chosen;
use crate::config::MaintenanceConfig;

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

/// The files of `table`'s loaded version to rewrite, in bins.
pub fn bins(
    table: &DeltaTable,
    cfg: &MaintenanceConfig,
) -> Result<Vec<Vec<Chosen>>, DeltaTableError> {
    let state = table.snapshot()?;
    let small = |f: &LogicalFileView| (f.size().max(0) as u64) < cfg.target_file_bytes / 2;
    let files: Vec<LogicalFileView> = state.log_data().iter().collect();
    let compact = files.iter().filter(|f| small(f)).count() >= cfg.compact_min_files.max(2);
    let mut bins = Vec::new();
    let (mut bin, mut bytes): (Vec<Chosen>, u64) = (Vec::new(), 0);
    for file in files {
        let share = deleted_share(&file);
        let purge = share >= cfg.purge_share;
        let wanted = purge || (compact && small(&file));
        if !wanted {
            continue;
        }
        bytes += ((file.size().max(0) as f64) * (1.0 - share)) as u64;
        bin.push(Chosen { file, purge });
        if bytes >= cfg.target_file_bytes {
            bins.push(std::mem::take(&mut bin));
            bytes = 0;
        }
    }
    bins.push(bin);
    bins.retain(|b| b.len() > 1 || b.iter().any(|c| c.purge));
    Ok(bins)
}
