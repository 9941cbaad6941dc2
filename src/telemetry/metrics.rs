//! The process-wide metric registry: every metric is listed in METRICS.md (a test holds the two
//! together), `walden_` prefix, base units, `_total` on counters, bounded labels (a source
//! table's name only for the first `metrics.table_labels` tables).

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub transactions_total: IntCounter,
    pub changes_total: IntCounter,
    pub rows_written_total: IntCounterVec,
    pub skipped_changes_total: IntCounter,
    pub unrepresentable_values_total: IntCounter,
    pub mirror_unapplied_changes_total: IntCounterVec,
    pub flushes_total: IntCounter,
    pub flush_duration_seconds: Histogram,
    pub received_lsn: IntGauge,
    pub confirmed_lsn: IntGauge,
    pub buffered_changes: IntGauge,
    pub errors_total: IntCounterVec,
    pub snapshot_rows_total: IntCounter,
    pub snapshot_rows_estimated: IntGauge,
    pub snapshot_tables_remaining: IntGauge,
    pub spilled_bytes_total: IntCounter,
    pub large_transaction_parts_total: IntCounter,
    pub build_info: IntGaugeVec,
    pub received_bytes_total: IntCounter,
    pub received_messages_total: IntCounter,
    pub server_wal_end_lsn: IntGauge,
    pub lag_bytes: IntGauge,
    pub lag_seconds: Gauge,
    pub last_applied_commit_timestamp_seconds: Gauge,
    pub commit_to_visible_seconds: Histogram,
    pub merge_duration_seconds: Histogram,
    pub rows_applied_total: IntCounterVec,
    pub reconnects_total: IntCounter,
    pub slot_retained_wal_bytes: IntGauge,
    pub slot_safe_wal_size_bytes: IntGauge,
    pub slot_wal_status: IntGaugeVec,
    pub slot_retained_wal_over_threshold: IntGauge,
    pub heartbeats_total: IntCounter,
    pub ready: IntGauge,
    pub object_store_requests_total: IntCounterVec,
    pub object_store_errors_total: IntCounterVec,
    pub maintenance_rounds_total: IntCounter,
    pub subjects_erased_total: IntCounter,
    pub deleted_rows_erased_total: IntCounter,
    pub delete_to_erasure_seconds: Histogram,
    pub erasure_errors_total: IntCounter,
    pub maintenance_errors_total: IntCounter,
    pub maintenance_deferred_total: IntCounter,
    pub maintenance_rows_rebased_total: IntCounter,
    pub maintenance_files_total: IntCounterVec,
    pub maintenance_duration_seconds: HistogramVec,
    /// Commit time (µs since the epoch) of the oldest transaction received and not yet durable
    /// in the warehouse; 0 when there is none. `walden_lag_seconds` is computed from it.
    pub oldest_unapplied_commit_us: AtomicI64,
    /// Source tables that have a `table` label of their own.
    table_labels: Mutex<HashSet<String>>,
    table_label_limit: AtomicUsize,
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn float_gauge(r: &Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

/// Propagated deletes: rounds run every half of `privacy.erase_within` (default 1 h).
const ERASURE_SECONDS: &[f64] = &[
    1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 86400.0,
];

/// Seconds, for durations from milliseconds (a quiet flush) to minutes (a slow store).
const SECONDS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The `wal_status` values of `pg_replication_slots`.
pub const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

impl Metrics {
    /// How many source tables get a `table` label of their own (`metrics.table_labels`).
    pub fn limit_table_labels(&self, n: usize) {
        self.table_label_limit.store(n, Ordering::Relaxed);
    }

    /// The `table` label for `table`: its name while fewer than the limit have one, else
    /// `_other` (`_all` when per-table labels are off).
    pub fn table_label(&self, table: &str) -> String {
        let limit = self.table_label_limit.load(Ordering::Relaxed);
        if limit == 0 {
            return "_all".into();
        }
        let mut known = self.table_labels.lock().unwrap_or_else(|p| p.into_inner());
        if known.contains(table) || known.len() < limit {
            known.insert(table.to_string());
            table.to_string()
        } else {
            "_other".into()
        }
    }

    /// Counts an error of `stage` (a bounded set: source, decode, apply, sink, snapshot,
    /// spill, internal) by its class.
    pub fn error(&self, stage: &str, transient: bool) {
        let class = if transient { "transient" } else { "definite" };
        self.errors_total.with_label_values(&[stage, class]).inc();
    }

    /// Sets the slot's `wal_status` (one of [`WAL_STATUSES`] is 1, the others 0).
    pub fn set_wal_status(&self, status: &str) {
        for s in WAL_STATUSES {
            self.slot_wal_status
                .with_label_values(&[s])
                .set(i64::from(s == status));
        }
    }

    /// The gauges computed from others: lag in bytes and seconds.
    fn refresh_lag(&self) {
        let (end, confirmed) = (self.server_wal_end_lsn.get(), self.confirmed_lsn.get());
        if end > 0 && confirmed > 0 {
            self.lag_bytes.set((end - confirmed).max(0));
        }
        let oldest = self.oldest_unapplied_commit_us.load(Ordering::Relaxed);
        let lag = if oldest == 0 {
            0.0
        } else {
            (chrono::Utc::now().timestamp_micros() - oldest).max(0) as f64 / 1e6
        };
        self.lag_seconds.set(lag);
    }
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let flush_duration_seconds = histogram(
            &r,
            "walden_flush_duration_seconds",
            "Time to make one batch durable in all its Delta tables",
            SECONDS,
        );
        let m = Metrics {
        transactions_total: counter(
            &r,
            "walden_transactions_total",
            "Committed source transactions received",
        ),
        changes_total: counter(&r, "walden_changes_total", "Row changes received"),
        rows_written_total: counter_vec(
            &r,
            "walden_rows_written_total",
            "Rows committed to Delta tables",
            &["table_kind"],
        ),
        skipped_changes_total: counter(
            &r,
            "walden_skipped_changes_total",
            "Changes skipped because the table had already applied them (replay after restart)",
        ),
        unrepresentable_values_total: counter(
            &r,
            "walden_unrepresentable_values_total",
            "Source values the Arrow type cannot hold: NULL in the column, exact text in _walden_unrepresentable",
        ),
        mirror_unapplied_changes_total: counter_vec(
            &r,
            "walden_mirror_unapplied_changes_total",
            "Changes in the changelog that the mirror could not apply: no replica identity, or the row they name was missing",
            &["reason"],
        ),
        flushes_total: counter(&r, "walden_flushes_total", "Batches made durable"),
        flush_duration_seconds,
        received_lsn: gauge(
            &r,
            "walden_received_lsn",
            "End LSN of the last whole transaction received (as a number)",
        ),
        confirmed_lsn: gauge(
            &r,
            "walden_confirmed_lsn",
            "LSN confirmed to Postgres as durable (as a number)",
        ),
        snapshot_rows_total: counter(
            &r,
            "walden_snapshot_rows_total",
            "Rows copied by snapshots and backfills",
        ),
        snapshot_rows_estimated: gauge(
            &r,
            "walden_snapshot_rows_estimated",
            "Estimated rows of the snapshot or backfill under way (from table statistics)",
        ),
        snapshot_tables_remaining: gauge(
            &r,
            "walden_snapshot_tables_remaining",
            "Tables of the snapshot or backfill under way not yet committed",
        ),
        spilled_bytes_total: counter(
            &r,
            "walden_spilled_bytes_total",
            "Bytes of uncommitted changes written to spill files (over spill.memory_bytes)",
        ),
        large_transaction_parts_total: counter(
            &r,
            "walden_large_transaction_parts_total",
            "Flushes that each hold part of a transaction larger than one batch",
        ),
        buffered_changes: gauge(
            &r,
            "walden_buffered_changes",
            "Changes buffered and not yet durable",
        ),
        errors_total: counter_vec(
            &r,
            "walden_errors_total",
            "Errors that ended a session, by stage and class (transient errors are retried)",
            &["stage", "class"],
        ),
        build_info: gauge_vec(
            &r,
            "walden_build_info",
            "Always 1; the version of the running walden",
            &["version"],
        ),
        received_bytes_total: counter(
            &r,
            "walden_received_bytes_total",
            "Bytes read from the replication connection",
        ),
        received_messages_total: counter(
            &r,
            "walden_received_messages_total",
            "Replication messages received (WAL data and keepalives)",
        ),
        server_wal_end_lsn: gauge(
            &r,
            "walden_server_wal_end_lsn",
            "The server's WAL end as last reported (as a number)",
        ),
        lag_bytes: gauge(
            &r,
            "walden_lag_bytes",
            "WAL between the server's end and what walden confirmed as durable",
        ),
        lag_seconds: float_gauge(
            &r,
            "walden_lag_seconds",
            "Age of the oldest source commit received and not yet in the warehouse; 0 when none waits",
        ),
        last_applied_commit_timestamp_seconds: float_gauge(
            &r,
            "walden_last_applied_commit_timestamp_seconds",
            "Commit time of the newest source transaction durable in the warehouse (Unix seconds)",
        ),
        commit_to_visible_seconds: histogram(
            &r,
            "walden_commit_to_visible_seconds",
            "Per source transaction: from its commit at the source to its Delta commit",
            SECONDS,
        ),
        merge_duration_seconds: histogram(
            &r,
            "walden_merge_duration_seconds",
            "Time to apply one table's batch to its mirror (plan, write, commit)",
            SECONDS,
        ),
        rows_applied_total: counter_vec(
            &r,
            "walden_rows_applied_total",
            "Source changes made durable, by table and operation",
            &["table", "op"],
        ),
        reconnects_total: counter(
            &r,
            "walden_reconnects_total",
            "Sessions started again after a transient error",
        ),
        slot_retained_wal_bytes: gauge(
            &r,
            "walden_slot_retained_wal_bytes",
            "WAL the server keeps for the slot (current WAL position - restart_lsn)",
        ),
        slot_safe_wal_size_bytes: gauge(
            &r,
            "walden_slot_safe_wal_size_bytes",
            "WAL that can still be written before the slot is in danger of invalidation; -1 when unlimited",
        ),
        slot_wal_status: gauge_vec(
            &r,
            "walden_slot_wal_status",
            "The slot's wal_status: 1 for the current one",
            &["status"],
        ),
        slot_retained_wal_over_threshold: gauge(
            &r,
            "walden_slot_retained_wal_over_threshold",
            "1 while retained WAL is past slot.retained_wal_warn_bytes",
        ),
        heartbeats_total: counter(
            &r,
            "walden_heartbeats_total",
            "Heartbeat messages written into the source's WAL",
        ),
        ready: gauge(
            &r,
            "walden_ready",
            "1 while walden is snapshotting or streaming (what /readyz answers)",
        ),
        object_store_requests_total: counter_vec(
            &r,
            "walden_object_store_requests_total",
            "Requests to the warehouse's object store, by operation",
            &["op"],
        ),
        object_store_errors_total: counter_vec(
            &r,
            "walden_object_store_errors_total",
            "Failed object-store requests (after the store client's retries), by operation",
            &["op"],
        ),
        maintenance_rounds_total: counter(
            &r,
            "walden_maintenance_rounds_total",
            "Background maintenance rounds finished",
        ),
        subjects_erased_total: counter(
            &r,
            "walden_subjects_erased_total",
            "Data subjects erased from the warehouse (deletes propagated, and walden forget)",
        ),
        deleted_rows_erased_total: counter(
            &r,
            "walden_deleted_rows_erased_total",
            "Rows deleted at the source whose history was erased from every file of the warehouse",
        ),
        delete_to_erasure_seconds: histogram(
            &r,
            "walden_delete_to_erasure_seconds",
            "Per row deleted at the source from a personal-data table: from the delete's commit \
             to the erasure of its history (bounded by privacy.erase_within)",
            ERASURE_SECONDS,
        ),
        erasure_errors_total: counter(
            &r,
            "walden_erasure_errors_total",
            "Rounds of propagated deletes that failed (tried again next round)",
        ),
        maintenance_errors_total: counter(
            &r,
            "walden_maintenance_errors_total",
            "Tables whose maintenance failed (tried again next round)",
        ),
        maintenance_deferred_total: counter(
            &r,
            "walden_maintenance_deferred_total",
            "Tables whose maintenance was left for the next round (budget spent, or a rewrite's \
             file left the table meanwhile)",
        ),
        maintenance_rows_rebased_total: counter(
            &r,
            "walden_maintenance_rows_rebased_total",
            "Rows the stream marked deleted in files while maintenance rewrote them, marked again \
             in the rewritten files",
        ),
        maintenance_files_total: counter_vec(
            &r,
            "walden_maintenance_files_total",
            "Files compacted away, purged of deleted rows, or vacuumed",
            &["action"],
        ),
        maintenance_duration_seconds: {
            let opts = HistogramOpts::new(
                "walden_maintenance_duration_seconds",
                "Time one table's compaction, purge or vacuum took",
            )
            .buckets(SECONDS.to_vec());
            let h = HistogramVec::new(opts, &["task"]).expect("valid metric");
            r.register(Box::new(h.clone())).expect("unique metric");
            h
        },
        oldest_unapplied_commit_us: AtomicI64::new(0),
        table_labels: Mutex::new(HashSet::new()),
        table_label_limit: AtomicUsize::new(100),
        registry: r,
    };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }
}

/// The registry in Prometheus' text format.
pub fn render() -> String {
    METRICS.refresh_lag();
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&METRICS.registry.gather(), &mut out)
        .expect("text encoding cannot fail");
    String::from_utf8(out).expect("prometheus text is UTF-8")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every family served is documented in METRICS.md and every documented one is served.
    #[test]
    fn served_and_documented_metrics_are_the_same() {
        let m = &*METRICS;
        // Labelled families are served once they have a series.
        m.rows_written_total
            .with_label_values(&["mirror"])
            .inc_by(0);
        m.mirror_unapplied_changes_total
            .with_label_values(&["row_missing"])
            .inc_by(0);
        m.error("source", true);
        m.rows_applied_total
            .with_label_values(&["public.t", "insert"])
            .inc_by(0);
        m.set_wal_status("reserved");
        m.object_store_requests_total
            .with_label_values(&["get"])
            .inc_by(0);
        m.object_store_errors_total
            .with_label_values(&["get"])
            .inc_by(0);
        m.maintenance_files_total
            .with_label_values(&["vacuumed"])
            .inc_by(0);
        m.maintenance_duration_seconds
            .with_label_values(&["vacuum"])
            .observe(0.0);
        let text = render();
        let mut served = BTreeSet::new();
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("walden_"), "{name}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
            served.insert(name.to_string());
        }
        let documented: BTreeSet<String> = include_str!("../../METRICS.md")
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .map(str::to_string)
            .collect();
        assert_eq!(served, documented, "served (left) vs METRICS.md (right)");
    }

    #[test]
    fn table_labels_are_bounded() {
        let m = Metrics::new();
        m.limit_table_labels(2);
        assert_eq!(m.table_label("a"), "a");
        assert_eq!(m.table_label("b"), "b");
        assert_eq!(m.table_label("c"), "_other");
        assert_eq!(m.table_label("a"), "a");
        m.limit_table_labels(0);
        assert_eq!(m.table_label("a"), "_all");
    }
}
