//! Reading the Delta tables back and comparing them with the source.

use std::path::{Path, PathBuf};

use arrow::array::Array;
use walden::apply::inspect;
use walden::config::Config;
use walden::sink::{TableKind, Warehouse};

use crate::pg::{config, test_db, warehouse_dir, TestDb};

/// One string per result row (the query must return a single column).
/// A Delta table of the warehouse.
async fn open_table(wh: &Path, kind: TableKind, table: &str) -> deltalake::DeltaTable {
    let w = Warehouse::new(&walden::config::WarehouseConfig {
        url: wh.display().to_string(),
        storage_options: Default::default(),
        deletion_vectors: true,
        key_index_rows: 1_000_000,
    })
    .unwrap();
    inspect::open(&w, &w.table_url(kind, "public", table))
        .await
        .unwrap_or_else(|e| panic!("open {table}: {e}"))
        .unwrap_or_else(|| panic!("{table} has no Delta table"))
}

/// The column names of a Delta table of the warehouse.
pub async fn delta_columns(wh: &Path, kind: TableKind, table: &str) -> Vec<String> {
    let t = open_table(wh, kind, table).await;
    t.snapshot()
        .unwrap()
        .schema()
        .fields()
        .map(|f| f.name().clone())
        .collect()
}

pub async fn delta_rows(wh: &Path, kind: TableKind, table: &str, sql: &str) -> Vec<String> {
    let t = open_table(wh, kind, table).await;
    let batches = inspect::query(&t, sql).await.unwrap();
    let mut out = Vec::new();
    for b in batches {
        let col = b.column(0);
        for i in 0..b.num_rows() {
            out.push(if col.is_null(i) {
                "NULL".to_string()
            } else {
                arrow::util::display::array_value_to_string(col, i).unwrap()
            });
        }
    }
    out
}

pub async fn pg_rows(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| {
            r.get::<_, Option<String>>(0)
                .unwrap_or_else(|| "NULL".into())
        })
        .collect()
}

/// Asserts the mirror of an `(id int, v text)` table equals `source` (a FROM clause, e.g.
/// `ONLY t`), row by row.
pub async fn assert_id_v_mirror(
    client: &tokio_postgres::Client,
    wh: &Path,
    table: &str,
    source: &str,
) {
    let src = pg_rows(
        client,
        &format!("SELECT concat_ws('|', id::text, v) FROM {source} ORDER BY id"),
    )
    .await;
    let mir = delta_rows(
        wh,
        TableKind::Mirror,
        table,
        "SELECT concat_ws('|', CAST(id AS VARCHAR), v) FROM t ORDER BY id",
    )
    .await;
    assert_same(table, &src, &mir);
}

/// Asserts each change is in `table`'s changelog once: `(_walden_lsn, _walden_seq)` is unique.
pub async fn assert_changelog_unique(wh: &Path, table: &str, context: &str) {
    let dup = delta_rows(
        wh,
        TableKind::Changes,
        table,
        "SELECT CAST(count(*) AS VARCHAR) FROM (SELECT _walden_lsn, _walden_seq FROM t GROUP BY 1, 2 HAVING count(*) > 1)",
    )
    .await;
    assert_eq!(
        dup,
        vec!["0"],
        "{context}{table}: duplicated changes in the changelog"
    );
}

/// Asserts mirror == source, row by row, with a message that shows the first difference.
pub fn assert_same(what: &str, source: &[String], mirror: &[String]) {
    if source != mirror {
        let first = source
            .iter()
            .zip(mirror)
            .position(|(a, b)| a != b)
            .unwrap_or(source.len().min(mirror.len()));
        panic!(
            "{what}: source has {} rows, mirror {}; first difference at row {first}:\n  source: {:?}\n  mirror: {:?}",
            source.len(),
            mirror.len(),
            source.get(first),
            mirror.get(first)
        );
    }
}

/// `walden verify` finds the mirror equal to the source.
pub async fn assert_verified(cfg: &Config) {
    let v = walden::ops::verify::run(cfg, None).await.unwrap();
    assert!(v.ok, "{}", v.render());
}

/// A test database set up by `setup` and its warehouse after the initial snapshot.
pub async fn snapshotted(name: &str, setup: &str) -> (TestDb, PathBuf, Config) {
    let db = test_db(name).await;
    let wh = warehouse_dir(name);
    db.client.batch_execute(setup).await.unwrap();
    let cfg = config(&db, &wh);
    run_once(&cfg).await;
    (db, wh, cfg)
}

pub async fn run_once(cfg: &Config) -> walden::pipeline::Summary {
    let (_tx, rx) = tokio::sync::watch::channel(false);
    tokio::time::timeout(
        std::time::Duration::from_secs(180),
        walden::pipeline::run(cfg, walden::pipeline::Mode::Once, rx),
    )
    .await
    .expect("run --once did not finish in 180 s")
    .unwrap_or_else(|e| panic!("run --once failed: {e}"))
}

/// With `WALDEN_TEST_LOG=filter` (and `WALDEN_TEST_LOG_FILE`, default `walden-test.log` in the
/// temporary directory), the in-process walden runs log there (for chasing a failing test).
fn log_to_file() {
    let Ok(filter) = std::env::var("WALDEN_TEST_LOG") else {
        return;
    };
    let path = std::env::var("WALDEN_TEST_LOG_FILE").unwrap_or_else(|_| {
        std::env::temp_dir()
            .join("walden-test.log")
            .display()
            .to_string()
    });
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
}

/// A `walden run` streaming in the background until [`Streaming::stop`].
pub struct Streaming {
    stop: tokio::sync::watch::Sender<bool>,
    run:
        tokio::task::JoinHandle<Result<walden::pipeline::Summary, walden::pipeline::PipelineError>>,
}

impl Streaming {
    pub fn start(cfg: &Config) -> Self {
        log_to_file();
        let (stop, rx) = tokio::sync::watch::channel(false);
        let cfg = cfg.clone();
        let run = tokio::spawn(async move {
            walden::pipeline::run(&cfg, walden::pipeline::Mode::Continuous, rx).await
        });
        Streaming { stop, run }
    }

    /// The run ended by itself (an error, or a definite stop).
    pub fn ended(&self) -> bool {
        self.run.is_finished()
    }

    /// Asks it to flush, confirm and end; panics when the run failed.
    pub async fn stop(self) {
        // The run may have ended already (with the error this shows).
        let _ = self.stop.send(true);
        if let Err(e) = self.run.await.unwrap() {
            panic!("walden run failed: {e}");
        }
    }
}

/// Every Parquet file under `wh` embeds only plain Arrow types (no `Utf8View`/`BinaryView`, which
/// readers such as Daft reject).
pub fn assert_plain_arrow_types(wh: &Path) {
    let mut files = 0;
    let mut stack = vec![wh.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                let f = std::fs::File::open(&p).unwrap();
                let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
                    .unwrap();
                for field in b.schema().fields() {
                    assert!(
                        !matches!(
                            field.data_type(),
                            arrow::datatypes::DataType::Utf8View
                                | arrow::datatypes::DataType::BinaryView
                        ),
                        "{}: column {} is {}",
                        p.display(),
                        field.name(),
                        field.data_type()
                    );
                }
                files += 1;
            }
        }
    }
    assert!(files > 0, "no Parquet files under {}", wh.display());
}

/// Files of `dir` (a table's directory) whose names start with `prefix`.
pub fn on_disk(dir: &std::path::Path, prefix: &str) -> std::collections::HashSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect()
}
