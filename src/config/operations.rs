//! Settings of walden as a service: the metrics and health endpoint, and how it keeps its
//! replication slot from endangering the primary.

use serde::Deserialize;

/// The HTTP endpoint for Prometheus and the orchestrator's probes.
#[derive(Clone, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of `GET /metrics`, `/healthz` and `/readyz`, e.g. `0.0.0.0:9187`. Unset: no
    /// endpoint.
    #[serde(default)]
    pub listen: Option<String>,
    /// Source tables that get a `table` label of their own on per-table metrics; changes of
    /// tables past this many are counted under `table="_other"`. 0: no per-table labels (for
    /// publications of thousands of tables).
    #[serde(default = "default_table_labels")]
    pub table_labels: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            table_labels: default_table_labels(),
        }
    }
}

/// What walden does about its replication slot beyond consuming it.
#[derive(Clone, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct SlotConfig {
    /// Seconds between looks at the slot (retained WAL, `wal_status`, `safe_wal_size`) and the
    /// server's WAL position, for metrics and the retained-WAL warning.
    #[serde(default = "default_check_interval_s")]
    pub check_interval_s: u64,
    /// Seconds between heartbeats: a logical message written into the source database's WAL
    /// (`pg_logical_emit_message`), so the slot advances on a quiet database while other
    /// databases of the server write WAL. 0: no heartbeat.
    #[serde(default)]
    pub heartbeat_interval_s: u64,
    /// Retained WAL (bytes the slot keeps on the server's disk) past which walden warns (and
    /// `walden_slot_retained_wal_over_threshold` is 1). 0: never.
    #[serde(default = "default_retained_wal_warn_bytes")]
    pub retained_wal_warn_bytes: u64,
    /// When the server has invalidated the slot (`wal_status = lost`: it removed WAL the slot
    /// still needed, past `max_slot_wal_keep_size`).
    #[serde(default)]
    pub on_invalidated: OnInvalidated,
    /// A slot still held by another session (a consumer that died without closing its
    /// connection, e.g. a pod on a lost node) is waited for `source.slot_wait_s`; then, when
    /// this is true, walden terminates the holding backend (`pg_terminate_backend`) and takes
    /// the slot. Off: walden stops and says which process holds it. Only safe when nothing
    /// else is meant to consume the slot.
    #[serde(default)]
    pub terminate_holder: bool,
}

impl Default for SlotConfig {
    fn default() -> Self {
        SlotConfig {
            check_interval_s: default_check_interval_s(),
            heartbeat_interval_s: 0,
            retained_wal_warn_bytes: default_retained_wal_warn_bytes(),
            on_invalidated: OnInvalidated::default(),
            terminate_holder: false,
        }
    }
}

#[derive(Clone, Copy, Deserialize, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnInvalidated {
    /// Stop with what to do (the changes the server discarded are gone; the warehouse must be
    /// copied anew).
    #[default]
    Fail,
    /// Drop the slot, create it again and copy every published table anew (an initial
    /// snapshot replaces each mirror); the changelog misses the changes the server discarded.
    Recreate,
}

/// Table maintenance: compaction of small files, VACUUM, and how long old versions and log
/// entries are kept. Runs in the background of `walden run` and on demand (`walden maintain`).
#[derive(Clone, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// Maintain the tables while `walden run` streams.
    #[serde(default = "super::default_true")]
    pub enabled: bool,
    /// Seconds between maintenance rounds (each looks at every table once).
    #[serde(default = "default_maintenance_interval_s")]
    pub interval_s: u64,
    /// Seconds a round may take: no table is started after this.
    #[serde(default = "default_maintenance_budget_s")]
    pub budget_s: u64,
    /// Size compaction aims at for each file, bytes. A compaction holds about one such file in
    /// memory while it writes it: this bounds maintenance's share of walden's memory.
    #[serde(default = "default_target_file_bytes")]
    pub target_file_bytes: u64,
    /// A table is compacted once it has this many files smaller than half the target.
    #[serde(default = "default_compact_min_files")]
    pub compact_min_files: usize,
    /// Hours a file no longer in the table's current version is kept (for readers of older
    /// versions) before VACUUM deletes it; also how long the log keeps old versions.
    #[serde(default = "default_retention_hours")]
    pub retention_hours: u64,
    /// A mirror file is rewritten without its deleted rows once its deletion vector marks this
    /// share of them (0 < share ≤ 1).
    #[serde(default = "default_purge_share")]
    pub purge_share: f64,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            enabled: true,
            interval_s: default_maintenance_interval_s(),
            budget_s: default_maintenance_budget_s(),
            target_file_bytes: default_target_file_bytes(),
            compact_min_files: default_compact_min_files(),
            retention_hours: default_retention_hours(),
            purge_share: default_purge_share(),
        }
    }
}

fn default_maintenance_interval_s() -> u64 {
    300
}
fn default_maintenance_budget_s() -> u64 {
    120
}
fn default_target_file_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_compact_min_files() -> usize {
    32
}
fn default_purge_share() -> f64 {
    0.3
}
fn default_retention_hours() -> u64 {
    6
}
fn default_table_labels() -> usize {
    100
}
fn default_check_interval_s() -> u64 {
    10
}
fn default_retained_wal_warn_bytes() -> u64 {
    8 * 1024 * 1024 * 1024
}
