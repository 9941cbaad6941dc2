//! Configuration: a TOML file plus `WALDEN_`-prefixed environment overrides.
//!
//! `WALDEN_SOURCE__URL=postgres://…` overrides `[source] url`: the prefix is dropped, `__` separates
//! levels, names are lower-cased. Variables without `__` (`WALDEN_LOG_FORMAT`) are not config. Values are read as TOML scalars when they parse as one (numbers,
//! booleans), otherwise as strings. Unknown keys are rejected. Secrets (the password in the source URL,
//! storage options) never appear in `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

mod operations;
mod privacy;
pub use operations::{MaintenanceConfig, MetricsConfig, OnInvalidated, SlotConfig};
pub use privacy::{MaskRule, PrivacyConfig};

/// Everything walden needs to run one pipeline (one slot, one publication, one warehouse).
#[derive(Clone, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    pub warehouse: WarehouseConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    #[serde(default)]
    pub spill: SpillConfig,
    #[serde(default)]
    pub schema: SchemaConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub slot: SlotConfig,
    #[serde(default)]
    pub maintenance: MaintenanceConfig,
    #[serde(default)]
    pub privacy: PrivacyConfig,
}

/// How schema changes at the source reach the warehouse.
#[derive(Clone, Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    /// A column type change the warehouse cannot follow by widening (the source rewrote the
    /// values with the ALTER's `USING` expression).
    #[serde(default)]
    pub on_incompatible_type: IncompatibleType,
}

#[derive(Clone, Copy, Deserialize, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IncompatibleType {
    /// The old column moves aside in both Delta tables (`{column}__before_{LSN}`: the
    /// changelog keeps the old values there) and the table is copied again beside the stream,
    /// so the mirror holds the new values.
    #[default]
    Copy,
    /// walden stops with the steps to take by hand.
    Stop,
}

/// Where transactions larger than the memory budget wait for their commit.
#[derive(Clone, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct SpillConfig {
    /// Local directory for spill files (in Kubernetes: an emptyDir). Files are created unlinked,
    /// so a crash leaves nothing behind.
    #[serde(default = "default_spill_dir")]
    pub dir: String,
    /// Changes of open (uncommitted) transactions held in memory before the largest one moves to
    /// disk, bytes.
    #[serde(default = "default_spill_memory_bytes")]
    pub memory_bytes: usize,
}

impl Default for SpillConfig {
    fn default() -> Self {
        Self {
            dir: default_spill_dir(),
            memory_bytes: default_spill_memory_bytes(),
        }
    }
}

fn default_spill_dir() -> String {
    std::env::temp_dir()
        .join("walden-spill")
        .display()
        .to_string()
}
fn default_spill_memory_bytes() -> usize {
    64 * 1024 * 1024
}

/// The initial copy of the published tables (and `walden backfill`).
#[derive(Clone, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Copy every published table when walden creates its slot. Off: stream changes only.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Worker connections copying chunks at the same time.
    #[serde(default = "default_parallelism")]
    pub parallelism: usize,
    /// Rows per chunk (a ctid range, sized from the table's statistics).
    #[serde(default = "default_chunk_rows")]
    pub chunk_rows: u64,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            parallelism: default_parallelism(),
            chunk_rows: default_chunk_rows(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_parallelism() -> usize {
    2
}
fn default_chunk_rows() -> u64 {
    250_000
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// libpq-style URL or key/value string, e.g. `postgres://user:pw@host:5432/db`.
    pub url: String,
    /// Logical replication slot; created (pgoutput) when missing.
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Publication whose tables are replicated.
    #[serde(default = "default_publication")]
    pub publication: String,
    /// Create the publication `FOR ALL TABLES` when it does not exist.
    #[serde(default)]
    pub create_publication: bool,
    /// How often a standby status update is sent even when nothing changed.
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
    /// Seconds to wait when connecting before giving up.
    #[serde(default = "default_connect_timeout_s")]
    pub connect_timeout_s: u64,
    /// Seconds to wait for a slot that is still held (e.g. by a consumer that just died) before
    /// giving up with an error.
    #[serde(default = "default_slot_wait_s")]
    pub slot_wait_s: u64,
    /// Receive buffer of the replication TCP connection, bytes. Unset: 16 KiB when the server is
    /// on a loopback address (walden beside Postgres; the walsender then coalesces its sends),
    /// the kernel's autotuned buffer otherwise. 0: always the kernel's.
    #[serde(default)]
    pub receive_buffer_bytes: Option<u32>,
    /// Seconds a connection may be silent before TCP keepalive probes start; with
    /// `keepalive_interval_s` and `keepalive_count` it bounds how long a dead peer or a network
    /// that stopped delivering goes unnoticed (also for data sent and never acknowledged).
    #[serde(default = "default_keepalive_idle_s")]
    pub keepalive_idle_s: u64,
    /// Seconds between keepalive probes.
    #[serde(default = "default_keepalive_interval_s")]
    pub keepalive_interval_s: u64,
    /// Unanswered probes before the connection counts as lost.
    #[serde(default = "default_keepalive_count")]
    pub keepalive_count: u32,
    /// Seconds without any message from the server on the replication connection before it
    /// counts as lost and walden reconnects (after half of it, walden asks the server for a
    /// reply). Catches a server or path that stopped without closing the connection. 0: never.
    #[serde(default = "default_receive_timeout_s")]
    pub receive_timeout_s: u64,
}

/// How walden waits between attempts after a transient error (connection lost, server
/// restarting, object store throttling).
#[derive(Clone, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// First wait, milliseconds; doubled after each failed attempt.
    #[serde(default = "default_retry_initial_ms")]
    pub initial_ms: u64,
    /// Longest wait, milliseconds.
    #[serde(default = "default_retry_max_ms")]
    pub max_ms: u64,
    /// Seconds of transient errors with no progress after which walden stops with the last
    /// error (0: never; it keeps trying).
    #[serde(default)]
    pub give_up_after_s: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_ms: default_retry_initial_ms(),
            max_ms: default_retry_max_ms(),
            give_up_after_s: 0,
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarehouseConfig {
    /// A local directory, a `file://` URL, or an object-store URL.
    pub url: String,
    /// Passed to object_store (credentials, endpoints); never logged. Values may be written as
    /// TOML strings, booleans or numbers (`aws_allow_http = true`, or the same from the
    /// environment); object_store takes them as text.
    #[serde(default, deserialize_with = "options_as_text")]
    pub storage_options: BTreeMap<String, String>,
    /// Mirror tables mark replaced and deleted rows in Delta deletion vectors (merge-on-read:
    /// a change costs in proportion to itself). `false` rewrites every file that held such a row
    /// (copy-on-write), for readers that cannot read deletion vectors.
    #[serde(default = "default_true")]
    pub deletion_vectors: bool,
    /// How many identity values walden keeps in memory to find a change's row in the mirror's
    /// files without reading them (tables whose replica identity is one integer column; 8–12
    /// bytes each). Past it, files are read.
    #[serde(default = "default_key_index_rows")]
    pub key_index_rows: usize,
}

fn default_key_index_rows() -> usize {
    16_000_000
}

#[derive(Clone, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Flush when this many changes are buffered (over all tables).
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    /// Flush when the buffered changes hold about this many bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Flush at the latest this long after the oldest buffered change arrived.
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_rows: default_max_rows(),
            max_bytes: default_max_bytes(),
            max_delay_ms: default_max_delay_ms(),
        }
    }
}

fn default_slot() -> String {
    "walden".into()
}
fn default_publication() -> String {
    "walden".into()
}
fn default_status_interval_ms() -> u64 {
    10_000
}
fn default_connect_timeout_s() -> u64 {
    10
}
fn default_slot_wait_s() -> u64 {
    15
}
fn default_keepalive_idle_s() -> u64 {
    30
}
fn default_keepalive_interval_s() -> u64 {
    10
}
fn default_keepalive_count() -> u32 {
    3
}
fn default_receive_timeout_s() -> u64 {
    60
}
fn default_retry_initial_ms() -> u64 {
    500
}
fn default_retry_max_ms() -> u64 {
    30_000
}
fn default_max_rows() -> usize {
    200_000
}
fn default_max_bytes() -> usize {
    128 * 1024 * 1024
}
fn default_max_delay_ms() -> u64 {
    1_000
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Toml {
        path: String,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads `path` (if given) and applies the `WALDEN_*` variables of this process.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?,
            None => String::new(),
        };
        Self::from_toml_and_env(
            &text,
            &path.map(|p| p.display().to_string()).unwrap_or_default(),
            std::env::vars(),
        )
    }

    pub fn from_toml_and_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut root: toml::Table = toml::from_str(text).map_err(|source| ConfigError::Toml {
            path: origin.to_string(),
            source,
        })?;
        for (key, value) in env {
            // Every key lives in a section, so overrides always contain `__`; other WALDEN_*
            // variables (WALDEN_LOG_FORMAT, WALDEN_FAILPOINTS) are not configuration.
            let Some(rest) = key.strip_prefix("WALDEN_").filter(|r| r.contains("__")) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if path.iter().any(|p| p.is_empty()) {
                continue;
            }
            set_path(&mut root, &path, scalar(&value));
        }
        let cfg: Config = toml::Value::Table(root)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let ident_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        if !ident_ok(&self.source.slot) {
            return Err(ConfigError::Invalid(format!(
                "source.slot {:?}: slot names are 1-63 characters of a-z, 0-9 and _",
                self.source.slot
            )));
        }
        if self.source.publication.is_empty() {
            return Err(ConfigError::Invalid("source.publication is empty".into()));
        }
        if self.snapshot.parallelism == 0 || self.snapshot.chunk_rows == 0 {
            return Err(ConfigError::Invalid(
                "snapshot.parallelism and snapshot.chunk_rows must be greater than 0".into(),
            ));
        }
        if self.batch.max_rows == 0 || self.batch.max_bytes == 0 {
            return Err(ConfigError::Invalid(
                "batch.max_rows and batch.max_bytes must be greater than 0".into(),
            ));
        }
        self.privacy.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }
}

/// An environment value as TOML would read it: integers, floats and booleans keep their type.
/// A map of scalars, each as its text (`true` → "true").
fn options_as_text<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    use serde::de::Error as _;
    let raw: BTreeMap<String, toml::Value> = serde::Deserialize::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| match v {
            toml::Value::String(s) => Ok((k, s)),
            toml::Value::Boolean(b) => Ok((k, b.to_string())),
            toml::Value::Integer(i) => Ok((k, i.to_string())),
            toml::Value::Float(f) => Ok((k, f.to_string())),
            other => Err(D::Error::custom(format!(
                "warehouse.storage_options.{k}: expected text, a boolean or a number, found {}",
                other.type_str()
            ))),
        })
        .collect()
}

fn scalar(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(b) = raw.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    if let Ok(f) = raw.parse::<f64>() {
        if raw.contains('.') {
            return toml::Value::Float(f);
        }
    }
    toml::Value::String(raw.to_string())
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    if path.len() == 1 {
        table.insert(path[0].clone(), value);
        return;
    }
    let entry = table
        .entry(path[0].clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if !entry.is_table() {
        *entry = toml::Value::Table(toml::Table::new());
    }
    if let toml::Value::Table(t) = entry {
        set_path(t, &path[1..], value);
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`; key/value strings get
/// `password=***`.
pub fn redact_url(url: &str) -> String {
    if let Ok(mut u) = url::Url::parse(url) {
        if u.password().is_some() {
            let _ = u.set_password(Some("***"));
        }
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.eq_ignore_ascii_case("password") {
                    "***".to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        if !pairs.is_empty() {
            u.query_pairs_mut().clear().extend_pairs(pairs);
        }
        return u.to_string();
    }
    url.split_whitespace()
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceConfig")
            .field("url", &redact_url(&self.url))
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("create_publication", &self.create_publication)
            .field("status_interval_ms", &self.status_interval_ms)
            .field("connect_timeout_s", &self.connect_timeout_s)
            .field("slot_wait_s", &self.slot_wait_s)
            .field("receive_buffer_bytes", &self.receive_buffer_bytes)
            .field("keepalive_idle_s", &self.keepalive_idle_s)
            .field("keepalive_interval_s", &self.keepalive_interval_s)
            .field("keepalive_count", &self.keepalive_count)
            .field("receive_timeout_s", &self.receive_timeout_s)
            .finish()
    }
}

impl fmt::Debug for WarehouseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<&String> = self.storage_options.keys().collect();
        f.debug_struct("WarehouseConfig")
            .field("url", &self.url)
            .field("storage_options (values redacted)", &keys)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        [source]
        url = "postgres://walden:hunter2@localhost:5432/app"
        [warehouse]
        url = "/tmp/wh"
        storage_options = { aws_secret_access_key = "topsecret" }
    "#;

    #[test]
    fn storage_options_take_booleans_and_numbers_as_text() {
        let text = "[source]\nurl = \"postgres://h/db\"\n[warehouse]\nurl = \"s3://b/p\"\n\
                    [warehouse.storage_options]\naws_allow_http = true\n";
        let env = vec![(
            "WALDEN_WAREHOUSE__STORAGE_OPTIONS__AWS_MAX_RETRIES".to_string(),
            "3".to_string(),
        )];
        let cfg = Config::from_toml_and_env(text, "t", env).unwrap();
        assert_eq!(cfg.warehouse.storage_options["aws_allow_http"], "true");
        assert_eq!(cfg.warehouse.storage_options["aws_max_retries"], "3");
    }

    #[test]
    fn env_overrides_nested_keys_with_types() {
        let env = vec![
            ("WALDEN_SOURCE__SLOT".to_string(), "other_slot".to_string()),
            ("WALDEN_BATCH__MAX_ROWS".to_string(), "17".to_string()),
            (
                "WALDEN_SOURCE__CREATE_PUBLICATION".to_string(),
                "true".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
            ("WALDEN_LOG_FORMAT".to_string(), "json".to_string()),
        ];
        let cfg = Config::from_toml_and_env(BASE, "t", env).unwrap();
        assert_eq!(cfg.source.slot, "other_slot");
        assert_eq!(cfg.batch.max_rows, 17);
        assert!(cfg.source.create_publication);
        assert_eq!(cfg.batch.max_delay_ms, 1000);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = format!("{BASE}\n[batch]\nmax_rowz = 3\n");
        let err = Config::from_toml_and_env(&text, "t", vec![]).unwrap_err();
        assert!(err.to_string().contains("max_rowz"), "{err}");
        let env = vec![("WALDEN_SOURCE__URLL".to_string(), "x".to_string())];
        assert!(Config::from_toml_and_env(BASE, "t", env).is_err());
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let cfg = Config::from_toml_and_env(BASE, "t", vec![]).unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(shown.contains("***"));
        assert_eq!(
            redact_url("host=x password=abc user=u"),
            "host=x password=*** user=u"
        );
    }

    #[test]
    fn example_config_parses() {
        let cfg =
            Config::from_toml_and_env(include_str!("../../walden.example.toml"), "example", vec![])
                .unwrap();
        assert_eq!(cfg.source.slot, "walden");
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../schemas/config.schema.json")).unwrap();
        for key in [
            "url",
            "slot",
            "publication",
            "create_publication",
            "status_interval_ms",
            "connect_timeout_s",
            "slot_wait_s",
            "receive_buffer_bytes",
        ] {
            assert!(
                schema["properties"]["source"]["properties"]
                    .get(key)
                    .is_some(),
                "{key}"
            );
        }
    }

    #[test]
    fn receive_buffer_from_env() {
        let env = vec![(
            "WALDEN_SOURCE__RECEIVE_BUFFER_BYTES".to_string(),
            "0".to_string(),
        )];
        let cfg = Config::from_toml_and_env(BASE, "t", env).unwrap();
        assert_eq!(cfg.source.receive_buffer_bytes, Some(0));
        let cfg = Config::from_toml_and_env(BASE, "t", vec![]).unwrap();
        assert_eq!(cfg.source.receive_buffer_bytes, None);
    }

    #[test]
    fn privacy_key_from_env_is_text_even_when_numeric() {
        let text = format!("{BASE}\n[privacy.mask.\"public.t\"]\nemail = \"hash\"\n");
        let env = vec![("WALDEN_PRIVACY__KEY".to_string(), "12345".to_string())];
        let cfg = Config::from_toml_and_env(&text, "t", env).unwrap();
        assert_eq!(cfg.privacy.key.as_deref(), Some("12345"));
        assert!(!format!("{cfg:?}").contains("12345"));
        let err = Config::from_toml_and_env(&text, "t", vec![]).unwrap_err();
        assert!(err.to_string().contains("WALDEN_PRIVACY__KEY"), "{err}");
    }

    #[test]
    fn bad_slot_name_is_explained() {
        let env = vec![("WALDEN_SOURCE__SLOT".to_string(), "Bad-Slot".to_string())];
        let err = Config::from_toml_and_env(BASE, "t", env).unwrap_err();
        assert!(err.to_string().contains("a-z, 0-9 and _"), "{err}");
    }
}
