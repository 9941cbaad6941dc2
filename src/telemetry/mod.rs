//! Logs and Prometheus metrics.
//!
//! Owns the process-wide metric registry (every metric is listed in METRICS.md, `walden_` prefix,
//! base units, `_total` on counters, bounded labels) and the log subscriber (human or JSON lines;
//! secrets are redacted before they reach a log call).

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
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

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    let flush_duration_seconds = Histogram::with_opts(
        HistogramOpts::new(
            "walden_flush_duration_seconds",
            "Time to make one batch durable in all its Delta tables",
        )
        .buckets(vec![
            0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ]),
    )
    .expect("valid metric");
    r.register(Box::new(flush_duration_seconds.clone()))
        .expect("unique metric");
    Metrics {
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
            "Errors by class (transient errors are retried)",
            &["class"],
        ),
        registry: r,
    }
});

/// The registry in Prometheus' text format.
pub fn render() -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&METRICS.registry.gather(), &mut out)
        .expect("text encoding cannot fail");
    String::from_utf8(out).expect("prometheus text is UTF-8")
}

/// What is logged without `RUST_LOG`: walden's own progress, every library's warnings, and each
/// retry of an object-store request (otherwise a store in trouble would leave walden silent
/// for as long as the store client keeps retrying one request).
const DEFAULT_LOG_FILTER: &str =
    "warn,walden=info,object_store::client::retry=info,deltalake_core::operations::merge=error";

/// Installs the log subscriber; `RUST_LOG` filters, `WALDEN_LOG_FORMAT=json` for JSON lines.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let json = std::env::var("WALDEN_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_follow_conventions() {
        super::METRICS.changes_total.inc();
        super::METRICS
            .rows_written_total
            .with_label_values(&["mirror"])
            .inc();
        let text = super::render();
        let metrics_md = include_str!("../../METRICS.md");
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("walden_"), "{name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            }
            assert!(metrics_md.contains(name), "{name} missing from METRICS.md");
        }
    }
}
