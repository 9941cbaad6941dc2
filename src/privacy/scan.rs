//! Where a data subject still is: `walden verify-erasure`.
//!
//! Owns the search for a subject's identifier in every file under the directories of the tables
//! mapped to the subject (changelog and mirror), whether or not any version still references the
//! file: data files are read (the subject's column, as the file stores it), Delta log entries and
//! checkpoints are searched for the value in their column statistics (min/max), which a Delta
//! writer copies out of the data. A hashed subject column is searched for the value's hash.
//! Deletion-vector files hold row positions only and are not searched.

use std::collections::HashSet;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::DataType;
#[allow(deprecated)]
use deltalake::parquet::arrow::async_reader::{
    ParquetObjectReader, ParquetRecordBatchStreamBuilder,
};
use deltalake::parquet::arrow::ProjectionMask;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Serialize;

use super::select::Selector;
use super::PrivacyError;
use crate::config::{Config, MaskRule, PrivacyConfig};
use crate::decode::mask::Hasher;
use crate::sink::{SinkError, TableKind, Warehouse};

/// `customer=42`: a subject named in `[privacy.subjects]` and its identifier, as Postgres prints
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub name: String,
    pub value: String,
}

impl std::str::FromStr for Subject {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((n, v)) if !n.is_empty() && !v.is_empty() => Ok(Subject {
                name: n.to_string(),
                value: v.to_string(),
            }),
            _ => Err(format!(
                "{s:?}: write the subject as name=identifier, e.g. customer=42"
            )),
        }
    }
}

/// One file that still holds the subject.
#[derive(Debug, Clone, Serialize)]
pub struct Place {
    /// `schema.table` at the source.
    pub table: String,
    /// `changelog` or `mirror`.
    pub kind: &'static str,
    /// The file, from the warehouse's root.
    pub file: String,
    /// The file, from the table's root (as the Delta log names it).
    #[serde(skip)]
    pub path: String,
    /// Rows whose subject column holds the identifier (data files).
    pub rows: u64,
    /// A Delta log entry (commit or checkpoint) describes a file holding the subject (its column
    /// statistics copy min and max values out of the file), or its statistics hold the
    /// identifier.
    pub in_log: bool,
    /// The table's current version references the file (otherwise only older versions do, or
    /// none).
    pub current: bool,
}

#[derive(Debug, Serialize)]
pub struct Scan {
    pub subject: String,
    pub tables: Vec<String>,
    pub files_searched: usize,
    pub places: Vec<Place>,
}

impl Scan {
    pub fn render(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .places
            .iter()
            .map(|p| {
                vec![
                    p.table.clone(),
                    p.kind.to_string(),
                    p.file.clone(),
                    p.rows.to_string(),
                    if p.in_log { "yes" } else { "no" }.into(),
                    if p.current { "current" } else { "old" }.into(),
                ]
            })
            .collect();
        let mut out = String::new();
        if !rows.is_empty() {
            out = crate::ops::text_table(
                &["table", "kind", "file", "rows", "log_entry", "version"],
                &rows,
            );
        }
        out.push_str(&format!(
            "searched {} files of {} table(s) for subject {}: ",
            self.files_searched,
            self.tables.len(),
            self.subject
        ));
        if self.places.is_empty() {
            out.push_str("the subject is nowhere in the warehouse\n");
        } else {
            out.push_str(&format!(
                "{} file(s) still hold it (rows in data files; Delta log entries describing such \
                 files, whose statistics copy their values, or holding the identifier)\n",
                self.places.len()
            ));
        }
        out
    }
}

/// Searches every file of every table mapped to `subject.name`.
pub async fn find(cfg: &Config, subject: &Subject) -> Result<Scan, PrivacyError> {
    find_all(cfg, &subject.name, std::slice::from_ref(&subject.value)).await
}

/// Searches every file of every table mapped to subject `name` for any of `values` (one pass
/// for many subjects).
pub async fn find_all(cfg: &Config, name: &str, values: &[String]) -> Result<Scan, PrivacyError> {
    let selection = subject_selection(&cfg.privacy, name, values)
        .ok_or_else(|| unknown_subject(&cfg.privacy, name))?;
    find_selected(cfg, name, &selection).await
}

/// The rows of the subjects `values` of subject `name`, per table mapped to it (`None` for a
/// subject not in `[privacy.subjects]`).
pub fn subject_selection(
    privacy: &PrivacyConfig,
    name: &str,
    values: &[String],
) -> Option<Vec<(String, Selector)>> {
    let tables = privacy.subjects.get(name)?;
    Some(
        tables
            .iter()
            .map(|(table, column)| {
                let values = values
                    .iter()
                    .map(|v| stored_value(privacy, table, column, v))
                    .collect();
                let column = column.clone();
                (table.clone(), Selector::Subject { column, values })
            })
            .collect(),
    )
}

pub fn unknown_subject(privacy: &PrivacyConfig, name: &str) -> PrivacyError {
    PrivacyError::UnknownSubject {
        name: name.to_string(),
        known: privacy
            .subjects
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Searches every file of each table (changelog and mirror) for the rows its selector picks;
/// `label` names what is searched for in the result.
pub async fn find_selected(
    cfg: &Config,
    label: &str,
    selection: &[(String, Selector)],
) -> Result<Scan, PrivacyError> {
    let w = Warehouse::new(&cfg.warehouse)?;
    let mut scan = Scan {
        subject: label.to_string(),
        tables: selection.iter().map(|(t, _)| t.clone()).collect(),
        files_searched: 0,
        places: Vec::new(),
    };
    for (table, selector) in selection {
        for kind in [TableKind::Changes, TableKind::Mirror] {
            let target = Target {
                w: &w,
                table,
                kind,
                selector,
            };
            target.search(&mut scan).await?;
        }
    }
    Ok(scan)
}

/// The identifier as `column` of `table` stores it: its keyed hash when the column is hashed.
pub fn stored_value(privacy: &PrivacyConfig, table: &str, column: &str, value: &str) -> String {
    match privacy.rule(table, column) {
        MaskRule::Hash => {
            let key = privacy.key.as_deref().unwrap_or_default();
            Hasher::new(key.as_bytes()).hex(value.as_bytes())
        }
        _ => value.to_string(),
    }
}

/// One Delta table searched for the rows of a selector.
struct Target<'a> {
    w: &'a Warehouse,
    table: &'a str,
    kind: TableKind,
    selector: &'a Selector,
}

impl Target<'_> {
    async fn search(&self, scan: &mut Scan) -> Result<(), PrivacyError> {
        let (url, table) = super::open(self.w, self.kind, self.table).await?;
        let dir = url
            .as_str()
            .strip_prefix(self.w.root().as_str())
            .unwrap_or_default()
            .to_string();
        let current = table.as_ref().map(super::current_files).unwrap_or_default();
        let store = self.w.object_store(&dir)?;
        let mut objects: Vec<_> = store.list(None).try_collect().await.map_err(store_err)?;
        // Data files first: a log entry that describes one of those holding the subject copies
        // values of its rows into its column statistics.
        objects.sort_by_key(|m| m.location.as_ref().starts_with("_delta_log/"));
        let mut holders = HashSet::new();
        for meta in objects {
            let path = meta.location.to_string();
            let (rows, in_log) = match self.look(&store, &meta.location, &holders).await {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                // Removed since it was listed (a vacuum or an erasure of a running walden):
                // it holds nothing any more.
                Err(_) if gone(&store, &meta.location).await => continue,
                Err(e) => return Err(e),
            };
            scan.files_searched += 1;
            if rows > 0 {
                holders.insert(path.clone());
            }
            if rows > 0 || in_log {
                scan.places.push(Place {
                    table: self.table.to_string(),
                    kind: match self.kind {
                        TableKind::Changes => "changelog",
                        TableKind::Mirror => "mirror",
                    },
                    file: format!("{dir}{path}"),
                    path: path.clone(),
                    rows,
                    in_log,
                    current: current.contains(&path),
                });
            }
        }
        Ok(())
    }

    /// What one object holds: selected rows (a data file), or whether it is a log entry that
    /// holds them; `None` for objects of other kinds.
    async fn look(
        &self,
        store: &deltalake::logstore::ObjectStoreRef,
        location: &Path,
        holders: &HashSet<String>,
    ) -> Result<Option<(u64, bool)>, PrivacyError> {
        let path = location.as_ref();
        let in_log = path.starts_with("_delta_log/");
        Ok(Some(if in_log && path.ends_with(".json") {
            let bytes = store.get(location).await.map_err(store_err)?;
            let bytes = bytes.bytes().await.map_err(store_err)?;
            (0, self.json_log_holds(&bytes, holders))
        } else if in_log && path.ends_with(".parquet") {
            let adds = read_columns(store, location, &["add"]).await?;
            (0, self.checkpoint_holds(&adds, holders))
        } else if path.ends_with(".parquet") {
            let batches = read_columns(store, location, &self.selector.columns()).await?;
            (self.rows_holding(&batches), false)
        } else {
            return Ok(None);
        }))
    }

    /// Rows the selector picks.
    fn rows_holding(&self, batches: &[RecordBatch]) -> u64 {
        batches
            .iter()
            .filter_map(|b| self.selector.hits(b))
            .map(|m| m.true_count() as u64)
            .sum()
    }

    /// A JSON commit with an add or remove action that describes a file holding the subject,
    /// or whose statistics hold the value.
    fn json_log_holds(&self, bytes: &[u8], holders: &HashSet<String>) -> bool {
        bytes.split(|b| *b == b'\n').any(|line| {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
                return false;
            };
            ["add", "remove"].iter().any(|a| {
                let Some(action) = v.get(a) else {
                    return false;
                };
                let describes = action
                    .get("path")
                    .and_then(|p| p.as_str())
                    .is_some_and(|p| holders.contains(&decoded(p)));
                describes
                    || action
                        .get("stats")
                        .and_then(|s| s.as_str())
                        .is_some_and(|s| self.stats_hold(s))
            })
        })
    }

    /// A checkpoint with an add action that describes a file holding the subject, or whose
    /// statistics hold the value.
    fn checkpoint_holds(&self, batches: &[RecordBatch], holders: &HashSet<String>) -> bool {
        batches.iter().any(|b| {
            let Some(add) = b.column_by_name("add").and_then(|a| a.as_struct_opt()) else {
                return false;
            };
            let text = |name: &str| {
                add.column_by_name(name)
                    .and_then(|c| arrow::compute::cast(c, &DataType::Utf8).ok())
            };
            let paths = text("path");
            let stats = text("stats");
            let paths = paths.as_ref().map(|p| p.as_string::<i32>());
            let stats = stats.as_ref().map(|s| s.as_string::<i32>());
            paths.is_some_and(|p| p.iter().flatten().any(|p| holders.contains(&decoded(p))))
                || stats.is_some_and(|s| s.iter().flatten().any(|s| self.stats_hold(s)))
        })
    }

    /// A statistics object (`{"minValues": {...}, "maxValues": {...}}`) holding a selected
    /// value.
    fn stats_hold(&self, stats: &str) -> bool {
        serde_json::from_str::<serde_json::Value>(stats).is_ok_and(|v| self.selector.stats_hold(&v))
    }
}

/// A log entry's path (percent-encoded, as the protocol writes it) as the store names the file.
fn decoded(path: &str) -> String {
    url::form_urlencoded::parse(format!("p={}", path.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| path.to_string())
}

/// The object is no longer in the store.
async fn gone(store: &deltalake::logstore::ObjectStoreRef, location: &Path) -> bool {
    matches!(
        store.head(location).await,
        Err(object_store::Error::NotFound { .. })
    )
}

fn store_err(e: object_store::Error) -> PrivacyError {
    PrivacyError::Sink(SinkError::Store(Box::new(e)))
}

/// The root columns `columns` of a Parquet file (nothing when the file has none of them).
async fn read_columns(
    store: &deltalake::logstore::ObjectStoreRef,
    path: &Path,
    columns: &[&str],
) -> Result<Vec<RecordBatch>, PrivacyError> {
    let parquet = |source| {
        PrivacyError::Sink(SinkError::Parquet {
            file: path.to_string(),
            source,
        })
    };
    #[allow(deprecated)]
    let reader = ParquetObjectReader::new(store.clone(), path.clone());
    let builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(parquet)?;
    let schema = builder.parquet_schema();
    let fields = schema.root_schema().get_fields();
    let roots: Vec<usize> = (0..fields.len())
        .filter(|&i| columns.contains(&fields[i].name()))
        .collect();
    if roots.is_empty() {
        return Ok(Vec::new());
    }
    let mask = ProjectionMask::roots(schema, roots);
    builder
        .with_projection(mask)
        .build()
        .map_err(parquet)?
        .try_collect()
        .await
        .map_err(parquet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target<'a>(w: &'a Warehouse, selector: &'a Selector) -> Target<'a> {
        Target {
            w,
            table: "public.orders",
            kind: TableKind::Mirror,
            selector,
        }
    }

    #[test]
    fn subjects_parse_as_name_equals_identifier() {
        let s: Subject = "customer=42".parse().unwrap();
        assert_eq!((s.name.as_str(), s.value.as_str()), ("customer", "42"));
        assert!("customer"
            .parse::<Subject>()
            .unwrap_err()
            .contains("name=identifier"));
        assert!("=42".parse::<Subject>().is_err());
    }

    #[test]
    fn statistics_hold_the_value_as_min_or_max_in_json_logs() {
        let dir = tempfile::tempdir().unwrap();
        let w = Warehouse::new(&crate::config::WarehouseConfig {
            url: dir.path().display().to_string(),
            storage_options: Default::default(),
            deletion_vectors: true,
            key_index_rows: 1,
        })
        .unwrap();
        let selector = Selector::Subject {
            column: "customer_id".into(),
            values: HashSet::from(["42".to_string()]),
        };
        let t = target(&w, &selector);
        assert!(t.stats_hold(
            r#"{"numRecords":3,"minValues":{"customer_id":42},"maxValues":{"customer_id":50}}"#
        ));
        assert!(
            t.stats_hold(r#"{"minValues":{"customer_id":"1"},"maxValues":{"customer_id":"42"}}"#)
        );
        assert!(!t.stats_hold(r#"{"minValues":{"customer_id":41},"maxValues":{"customer_id":43}}"#));
        assert!(!t.stats_hold(r#"{"minValues":{"other":42}}"#));
        let log = format!(
            "{}\n{}\n",
            r#"{"commitInfo":{"timestamp":1}}"#,
            r#"{"add":{"path":"a.parquet","stats":"{\"minValues\":{\"customer_id\":42}}"}}"#
        );
        let none = HashSet::new();
        assert!(t.json_log_holds(log.as_bytes(), &none));
        assert!(!t.json_log_holds(br#"{"add":{"path":"a.parquet"}}"#, &none));
        // A file holding the subject: every entry describing it counts.
        let holders = HashSet::from(["a b.parquet".to_string()]);
        assert!(t.json_log_holds(br#"{"remove":{"path":"a%20b.parquet"}}"#, &holders));
    }
}
