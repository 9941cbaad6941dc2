//! The warehouse: where tables live on object storage, and how Parquet files are written.
//!
//! Owns the layout `{warehouse}/changes/{schema}/{table}` (append-only changelog) and
//! `{warehouse}/mirror/{schema}/{table}` (current state), opening or creating the Delta tables
//! there, and the Parquet writer settings. A local directory or `file://` URL is the default;
//! S3, GCS and Azure go through `object_store` with `storage_options` ([`store`] says which
//! guarantees walden needs from them and checks them).

use std::collections::HashMap;
use std::path::PathBuf;

use arrow::datatypes::SchemaRef;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake::kernel::StructType;
use deltalake::parquet::basic::Compression;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::parquet::schema::types::ColumnPath;
use deltalake::{DeltaTable, DeltaTableError};

use url::Url;

use crate::config::WarehouseConfig;

mod counted;
pub mod dv;
pub mod project;
pub mod schemas;
pub mod store;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("warehouse.url {url:?} is not a usable location: {reason}")]
    BadLocation { url: String, reason: String },
    #[error("warehouse directory {path} is not writable: {source}. Fix its permissions or choose another warehouse.url")]
    NotWritable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Delta table {table}: {source}")]
    Delta {
        table: String,
        #[source]
        source: DeltaTableError,
    },
    #[error(
        "the Delta table at {table} cannot be read ({source}): it is damaged, or something \
        other than walden wrote there. Stop walden, move that directory aside (keep it if its \
        history matters), then start walden again with snapshots enabled, or run \
        `walden backfill --table {name}`, to copy {name} anew"
    )]
    Unreadable {
        table: String,
        name: String,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error("warehouse object store: {0}")]
    Store(Box<object_store::Error>),
    #[error(
        "warehouse {url} cannot keep commits safe: {reason}. walden commits a Delta version by \
        creating its log file only if it does not exist yet; without that guarantee a racing \
        writer can silently replace a commit"
    )]
    UnsafeStore { url: String, reason: String },
    #[error("warehouse {url}: {hint} ({source})")]
    StoreCheck {
        url: String,
        hint: &'static str,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("Parquet file {file}: {source}")]
    Parquet {
        file: String,
        #[source]
        source: deltalake::parquet::errors::ParquetError,
    },
    #[error("statistics of Parquet file {file}: {reason}")]
    Stats { file: String, reason: String },
    #[error("walden's marker file {0} is unreadable; delete it to start over")]
    Marker(String),
}

impl From<object_store::Error> for SinkError {
    fn from(e: object_store::Error) -> Self {
        SinkError::Store(Box::new(e))
    }
}

impl SinkError {
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Delta { source, .. } => delta_is_transient(source),
            SinkError::Store(e) => store_is_transient(e),
            SinkError::StoreCheck { source, .. } => {
                store_is_transient(source)
                    && !matches!(**source, object_store::Error::NotFound { .. })
            }
            _ => false,
        }
    }
}

/// Object-store failures worth a retry: network trouble, throttling, server errors, lost races
/// (`Generic` carries the HTTP client's errors, retried by object_store itself first). Missing
/// or refused credentials, a bad path or configuration, an operation the store does not support
/// stay the same on every attempt.
pub fn store_is_transient(e: &object_store::Error) -> bool {
    !matches!(
        e,
        object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::UnknownConfigurationKey { .. }
            | object_store::Error::InvalidPath { .. }
            | object_store::Error::NotSupported { .. }
            | object_store::Error::NotImplemented { .. }
    )
}

/// Object-store hiccups and lost commit races are worth a retry; a table the writer cannot
/// handle (unsupported features, append-only, corrupt log, schema mismatch) is not.
pub fn delta_is_transient(e: &DeltaTableError) -> bool {
    use deltalake::kernel::transaction::TransactionError as T;
    match e {
        DeltaTableError::ObjectStore { source } => store_is_transient(source),
        DeltaTableError::Io { .. } | DeltaTableError::VersionAlreadyExists(_) => true,
        DeltaTableError::Transaction { source } => match source {
            T::VersionAlreadyExists(_) | T::CommitConflict(_) | T::MaxCommitAttempts(_) => true,
            T::ObjectStore { source } => store_is_transient(source),
            _ => false,
        },
        DeltaTableError::KernelError(k) => kernel_is_transient(k),
        DeltaTableError::Kernel {
            source: deltalake::kernel::Error::ObjectStore(s),
        } => store_is_transient(s),
        DeltaTableError::GenericError { source } => source
            .downcast_ref::<object_store::Error>()
            .is_some_and(store_is_transient),
        _ => false,
    }
}

/// The Delta kernel reads the log for deltalake: its store and I/O failures are the store's.
fn kernel_is_transient(e: &delta_kernel::Error) -> bool {
    use delta_kernel::Error as K;
    match e {
        K::Backtraced { source, .. } => kernel_is_transient(source),
        K::ObjectStore(s) => store_is_transient(s),
        K::IOError(_) | K::Reqwest(_) => true,
        // A log entry cleaned up (past its retention) behind a table read at an older version:
        // reading the table afresh starts from its newest checkpoint.
        K::FileNotFound(path) => path.contains("/_delta_log/"),
        // A checkpoint removed behind the read (the store's NotFound inside Parquet's error).
        K::Parquet(p) => std::error::Error::source(p)
            .and_then(|e| e.downcast_ref::<object_store::Error>())
            .is_some_and(|e| match e {
                object_store::Error::NotFound { path, .. } => path.contains("_delta_log/"),
                other => store_is_transient(other),
            }),
        _ => false,
    }
}

#[cfg(test)]
mod class_tests {
    use super::*;
    use deltalake::kernel::transaction::TransactionError as T;

    #[test]
    fn lost_races_and_store_trouble_are_retried_unusable_tables_are_not() {
        let race = DeltaTableError::Transaction {
            source: T::VersionAlreadyExists(7),
        };
        let throttled = DeltaTableError::ObjectStore {
            source: object_store::Error::Generic {
                store: "S3",
                source: "503 Slow Down".into(),
            },
        };
        let denied = DeltaTableError::ObjectStore {
            source: object_store::Error::PermissionDenied {
                path: "wh/_delta_log".into(),
                source: "403".into(),
            },
        };
        let append_only = DeltaTableError::Transaction {
            source: T::DeltaTableAppendOnly,
        };
        // The kernel reading the log meets the store's failures too.
        let unreachable =
            DeltaTableError::KernelError(delta_kernel::Error::from(object_store::Error::Generic {
                store: "S3",
                source: "error sending request".into(),
            }));
        let bad_log = DeltaTableError::KernelError(delta_kernel::Error::generic("bad log"));
        let cleaned = DeltaTableError::KernelError(delta_kernel::Error::file_not_found(
            "wh/mirror/public/t/_delta_log/00000000000000000097.json",
        ));
        let lost_data = DeltaTableError::KernelError(delta_kernel::Error::file_not_found(
            "wh/mirror/public/t/part-0001.parquet",
        ));
        // A checkpoint removed behind a read (an erasure or a vacuum of a running walden).
        let not_found = |path: &str| object_store::Error::NotFound {
            path: path.into(),
            source: "No such file or directory".into(),
        };
        let checkpoint = |path: &str| {
            DeltaTableError::KernelError(delta_kernel::Error::Parquet(
                deltalake::parquet::errors::ParquetError::External(Box::new(not_found(path))),
            ))
        };
        let gone_checkpoint = checkpoint("wh/changes/public/t/_delta_log/0008.checkpoint.parquet");
        let gone_data = checkpoint("wh/changes/public/t/part-0001.parquet");
        assert!(delta_is_transient(&gone_checkpoint));
        assert!(!delta_is_transient(&gone_data));
        assert!(delta_is_transient(&cleaned));
        assert!(!delta_is_transient(&lost_data));
        assert!(delta_is_transient(&unreachable));
        assert!(!delta_is_transient(&bad_log));
        assert!(delta_is_transient(&race));
        assert!(delta_is_transient(&throttled));
        assert!(!delta_is_transient(&denied));
        assert!(!delta_is_transient(&append_only));
        assert!(!delta_is_transient(&DeltaTableError::NotATable("x".into())));
    }
}

/// Which of a source table's two Delta tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    Changes,
    Mirror,
}

impl TableKind {
    pub fn dir(self) -> &'static str {
        match self {
            TableKind::Changes => "changes",
            TableKind::Mirror => "mirror",
        }
    }
}

#[derive(Clone)]
pub struct Warehouse {
    root: Url,
    storage_options: HashMap<String, String>,
    deletion_vectors: bool,
    key_index_rows: usize,
}

/// The table property that says a mirror takes rows out by deletion vectors (merge-on-read).
pub const DELETION_VECTORS_PROPERTY: &str = "delta.enableDeletionVectors";

/// Whether `table` says it takes rows out by deletion vectors ([`DELETION_VECTORS_PROPERTY`]).
pub fn deletion_vectors_on(table: &DeltaTable) -> bool {
    table.snapshot().is_ok_and(|s| {
        s.metadata()
            .configuration()
            .get(DELETION_VECTORS_PROPERTY)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    })
}

impl Warehouse {
    /// Resolves the warehouse location; a local one is created and checked for writability.
    pub fn new(cfg: &WarehouseConfig) -> Result<Self, SinkError> {
        let bad = |reason: String| SinkError::BadLocation {
            url: cfg.url.clone(),
            reason,
        };
        let root = if cfg.url.contains("://") {
            Url::parse(&cfg.url).map_err(|e| bad(e.to_string()))?
        } else {
            let p = PathBuf::from(&cfg.url);
            let abs = if p.is_absolute() {
                p
            } else {
                std::env::current_dir()
                    .map_err(|e| bad(e.to_string()))?
                    .join(p)
            };
            Url::from_directory_path(&abs).map_err(|_| bad("not an absolute path".into()))?
        };
        if root.scheme() == "file" {
            let path = root
                .to_file_path()
                .map_err(|_| bad("file URL without a path".into()))?;
            let not_writable = |source| SinkError::NotWritable {
                path: path.display().to_string(),
                source,
            };
            std::fs::create_dir_all(&path).map_err(not_writable)?;
            let probe = path.join(".walden-write-probe");
            std::fs::write(&probe, b"ok").map_err(not_writable)?;
            let _ = std::fs::remove_file(&probe);
        }
        let mut root = root;
        if !root.path().ends_with('/') {
            let p = format!("{}/", root.path());
            root.set_path(&p);
        }
        let storage_options = cfg
            .storage_options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        store::register_backends();
        store::check_location(&root, &storage_options)?;
        Ok(Warehouse {
            root,
            storage_options,
            deletion_vectors: cfg.deletion_vectors,
            key_index_rows: cfg.key_index_rows,
        })
    }

    /// Checks, before anything is written, that the store can be reached with the configured
    /// credentials and refuses to create an object twice (see [`store`]).
    pub async fn check_store(&self) -> Result<(), SinkError> {
        let store = self.object_store("_walden/")?;
        store::check_put_if_absent(&store, &self.root).await
    }

    pub fn root(&self) -> &Url {
        &self.root
    }

    /// How many identity values the mirrors' key indexes may hold together
    /// (`apply::keys`).
    pub fn key_index_rows(&self) -> usize {
        self.key_index_rows
    }

    /// Options for the object store (credentials, endpoints); never logged.
    pub fn storage_options(&self) -> &HashMap<String, String> {
        &self.storage_options
    }

    /// An object store rooted at `{warehouse}/{dir}` (dir ends with `/`).
    pub fn object_store(
        &self,
        dir: &str,
    ) -> Result<deltalake::logstore::ObjectStoreRef, SinkError> {
        let url = self.root.join(dir).map_err(|e| SinkError::BadLocation {
            url: self.root.to_string(),
            reason: e.to_string(),
        })?;
        ensure_local_dir(&url)?;
        deltalake::logstore::store_for(&url, self.storage_options.clone()).map_err(|source| {
            SinkError::Delta {
                table: url.to_string(),
                source,
            }
        })
    }

    /// `{warehouse}/{changes|mirror}/{schema}/{table}`
    pub fn table_url(&self, kind: TableKind, schema: &str, table: &str) -> Url {
        let seg = |s: &str| {
            url::form_urlencoded::byte_serialize(s.as_bytes())
                .collect::<String>()
                .replace('+', "%20")
        };
        self.root
            .join(&format!("{}/{}/{}/", kind.dir(), seg(schema), seg(table)))
            .expect("segments are percent-encoded")
    }

    /// Opens the Delta table at `url`; `None` when there is none (a store that cannot be
    /// reached or refuses the credentials is an error, not a missing table).
    pub async fn open(&self, url: &Url) -> Result<Option<DeltaTable>, DeltaTableError> {
        // A running walden's erasure or vacuum may remove the checkpoint or log entries a load
        // started from: loading afresh starts from the newest ones.
        let mut attempt = 0;
        loop {
            match self.load(url).await {
                Err(e) if attempt < 3 && delta_is_transient(&e) => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
                }
                loaded => return loaded,
            }
        }
    }

    async fn load(&self, url: &Url) -> Result<Option<DeltaTable>, DeltaTableError> {
        let mut table = self.builder(url)?.build()?;
        if !table.verify_deltatable_existence().await? {
            return Ok(None);
        }
        table.load().await?;
        Ok(Some(table))
    }

    fn builder(&self, url: &Url) -> Result<deltalake::DeltaTableBuilder, DeltaTableError> {
        Ok(deltalake::DeltaTableBuilder::from_url(url.clone())?
            .with_storage_options(self.storage_options.clone()))
    }

    /// Opens the mirror table at `url`, or creates it with `schema`, with the layout
    /// `warehouse.deletion_vectors` asks for: its [`DELETION_VECTORS_PROPERTY`] set to match (one
    /// metadata commit when it differs; turning deletion vectors on raises the table's protocol
    /// to reader 3 / writer 7 with the `deletionVectors` feature, which cannot be undone: turned
    /// off, new changes rewrite files again, and vectors already written stay until compaction).
    pub async fn open_mirror(
        &self,
        url: &Url,
        schema: &SchemaRef,
        name: &str,
    ) -> Result<DeltaTable, SinkError> {
        let created = self.deletion_vectors.then(|| {
            HashMap::from([(
                DELETION_VECTORS_PROPERTY.to_string(),
                Some("true".to_string()),
            )])
        });
        let table = self
            .open_or_create_with(url, schema, name, created.unwrap_or_default())
            .await?;
        let delta = |source| SinkError::Delta {
            table: url.to_string(),
            source,
        };
        if deletion_vectors_on(&table) == self.deletion_vectors {
            return Ok(table);
        }
        let props = HashMap::from([(
            DELETION_VECTORS_PROPERTY.to_string(),
            self.deletion_vectors.to_string(),
        )]);
        table
            .set_tbl_properties()
            .with_properties(props)
            .await
            .map_err(delta)
    }

    /// Opens the Delta table at `url`, or creates it with `schema` when there is none.
    pub async fn open_or_create(
        &self,
        url: &Url,
        schema: &SchemaRef,
        name: &str,
    ) -> Result<DeltaTable, SinkError> {
        self.open_or_create_with(url, schema, name, HashMap::new())
            .await
    }

    /// [`Self::open_or_create`], a created table getting the `properties`.
    async fn open_or_create_with(
        &self,
        url: &Url,
        schema: &SchemaRef,
        name: &str,
        properties: HashMap<String, Option<String>>,
    ) -> Result<DeltaTable, SinkError> {
        let delta = |source| SinkError::Delta {
            table: url.to_string(),
            source,
        };
        ensure_local_dir(url)?;
        let mut table = self.builder(url).map_err(delta)?.build().map_err(delta)?;
        // Ask first, so a table that is not there yet is not reported as a load error.
        if table.verify_deltatable_existence().await.map_err(delta)? {
            table.load().await.map_err(|source| {
                if delta_is_transient(&source) {
                    delta(source)
                } else {
                    SinkError::Unreadable {
                        table: url.to_string(),
                        name: name.to_string(),
                        source: Box::new(source),
                    }
                }
            })?;
            return Ok(table);
        }
        let st: StructType = schema
            .as_ref()
            .try_into_kernel()
            .map_err(|e| delta(DeltaTableError::Generic(format!("schema conversion: {e}"))))?;
        table
            .create()
            .with_table_name(name)
            .with_columns(st.fields().cloned())
            .with_configuration(properties)
            .await
            .map_err(delta)
    }
}

/// Parquet settings for snapshot files: as [`writer_properties`], but `_walden_op` is one constant
/// value there, which plain encoding plus Snappy stores as cheaply as a dictionary and without
/// interning every row.
pub fn snapshot_writer_properties() -> WriterProperties {
    base_properties().build()
}

/// Creates the directory behind a `file://` URL (object stores need no directories).
fn ensure_local_dir(url: &Url) -> Result<(), SinkError> {
    if url.scheme() == "file" {
        if let Ok(p) = url.to_file_path() {
            std::fs::create_dir_all(&p).map_err(|source| SinkError::NotWritable {
                path: p.display().to_string(),
                source,
            })?;
        }
    }
    Ok(())
}

/// Parquet settings for every file walden writes.
///
/// Dictionary encoding is off except for the operation column: CDC data is mostly high-cardinality
/// and interning every value costs more CPU than Snappy saves in bytes.
pub fn writer_properties() -> WriterProperties {
    base_properties()
        .set_column_dictionary_enabled(ColumnPath::from(crate::batch::OP), true)
        .build()
}

/// Snappy, no dictionaries, row groups of 128k rows.
fn base_properties() -> deltalake::parquet::file::properties::WriterPropertiesBuilder {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_dictionary_enabled(false)
        .set_max_row_group_row_count(Some(128 * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_local_paths() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = WarehouseConfig {
            url: dir.path().join("wh").display().to_string(),
            storage_options: Default::default(),
            deletion_vectors: true,
            key_index_rows: 1_000_000,
        };
        let w = Warehouse::new(&cfg).unwrap();
        let u = w.table_url(TableKind::Mirror, "public", "My Table");
        assert!(u.as_str().ends_with("/wh/mirror/public/My%20Table/"), "{u}");
        assert!(dir.path().join("wh").is_dir());
    }

    #[test]
    fn unwritable_location_is_explained() {
        let cfg = WarehouseConfig {
            url: "/proc/walden-cannot-write-here".into(),
            storage_options: Default::default(),
            deletion_vectors: true,
            key_index_rows: 1_000_000,
        };
        let err = Warehouse::new(&cfg).err().expect("must fail");
        assert!(err.to_string().contains("not writable"), "{err}");
    }
}
