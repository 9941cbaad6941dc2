//! What a session reports as it goes: changes made durable by table and operation, freshness
//! (how old the oldest commit not yet in the warehouse is, and each transaction's
//! commit-to-visible latency), and what the mirror could not apply, with what to do about it.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use crate::apply::ApplyStats;
use crate::batch::TableBuffer;
use crate::checkpoint::Lsn;
use crate::decode::txn::ChangeKind;
use crate::telemetry::METRICS;

/// Received transactions not yet confirmed as durable, oldest first: their end LSN and commit
/// time (µs since the epoch).
#[derive(Default)]
pub struct Freshness {
    waiting: VecDeque<(Lsn, i64)>,
}

impl Freshness {
    /// A whole transaction was received.
    pub fn received(&mut self, end: Lsn, commit_ts_us: i64) {
        if self.waiting.is_empty() {
            METRICS
                .oldest_unapplied_commit_us
                .store(commit_ts_us, Ordering::Relaxed);
        }
        self.waiting.push_back((end, commit_ts_us));
    }

    /// Everything up to `lsn` is durable and confirmed.
    pub fn confirmed(&mut self, lsn: Lsn) {
        METRICS.confirmed_lsn.set(lsn.0 as i64);
        let now = chrono::Utc::now().timestamp_micros();
        let mut newest = None;
        while let Some(&(end, ts)) = self.waiting.front() {
            if end > lsn {
                break;
            }
            self.waiting.pop_front();
            METRICS
                .commit_to_visible_seconds
                .observe((now - ts).max(0) as f64 / 1e6);
            newest = Some(ts);
        }
        if let Some(ts) = newest {
            METRICS
                .last_applied_commit_timestamp_seconds
                .set(ts as f64 / 1e6);
        }
        let oldest = self.waiting.front().map_or(0, |&(_, ts)| ts);
        METRICS
            .oldest_unapplied_commit_us
            .store(oldest, Ordering::Relaxed);
    }
}

/// Changes of a table's batch by operation (insert, update, delete, truncate).
pub fn operations(buf: &TableBuffer) -> [u64; 4] {
    let mut n = [0u64; 4];
    for row in &buf.rows {
        n[op_index(row.change.kind)] += 1;
    }
    n
}

fn op_index(kind: ChangeKind) -> usize {
    match kind {
        ChangeKind::Insert => 0,
        ChangeKind::Update => 1,
        ChangeKind::Delete => 2,
        ChangeKind::Truncate => 3,
    }
}

const OPS: [&str; 4] = ["insert", "update", "delete", "truncate"];

/// Counts what one table's flush made durable, and warns about what the mirror could not take.
pub fn book(name: &str, stats: &ApplyStats, ops: &[u64; 4]) {
    let table = METRICS.table_label(name);
    for (op, n) in OPS.iter().zip(ops) {
        if *n > 0 {
            METRICS
                .rows_applied_total
                .with_label_values(&[table.as_str(), op])
                .inc_by(*n);
        }
    }
    METRICS
        .rows_written_total
        .with_label_values(&["changes"])
        .inc_by(stats.changelog_rows as u64);
    METRICS
        .rows_written_total
        .with_label_values(&["mirror"])
        .inc_by(stats.mirror_rows as u64);
    METRICS
        .skipped_changes_total
        .inc_by(stats.skipped_rows as u64);
    if stats.unrepresentable > 0 {
        METRICS
            .unrepresentable_values_total
            .inc_by(stats.unrepresentable);
        tracing::warn!(table = %name, values = stats.unrepresentable,
            "values with no Arrow representation (numeric NaN, infinite dates) are NULL in their column, \
            their exact text in _walden_unrepresentable");
    }
    unapplied(
        name,
        "no_identity",
        stats.unidentified,
        &format!(
            "updates/deletes without a replica identity reach the changelog only; the mirror \
             cannot apply them. Give the table one: `ALTER TABLE {name} REPLICA IDENTITY FULL` \
             (or add a primary key), then `walden backfill --table {name}`"
        ),
    );
    unapplied(
        name,
        "row_missing",
        stats.missing,
        &format!(
            "changes named mirror rows that were not there: the mirror had diverged from the \
             source. Repair it with `walden backfill --table {name}`"
        ),
    );
}

/// Counts changes the mirror could not apply (`reason`, a bounded label) and tells the operator
/// what to do about them.
fn unapplied(table: &str, reason: &str, changes: usize, what: &str) {
    if changes == 0 {
        return;
    }
    METRICS
        .mirror_unapplied_changes_total
        .with_label_values(&[reason])
        .inc_by(changes as u64);
    tracing::warn!(table, changes, "{what}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freshness_follows_what_is_confirmed() {
        let mut f = Freshness::default();
        f.received(Lsn(10), 1_000_000);
        f.received(Lsn(20), 2_000_000);
        assert_eq!(f.waiting.len(), 2);
        f.confirmed(Lsn(15));
        assert_eq!(f.waiting.len(), 1);
        assert_eq!(
            METRICS.oldest_unapplied_commit_us.load(Ordering::Relaxed),
            2_000_000
        );
        f.confirmed(Lsn(20));
        assert!(f.waiting.is_empty());
        assert_eq!(
            METRICS.oldest_unapplied_commit_us.load(Ordering::Relaxed),
            0
        );
    }
}
