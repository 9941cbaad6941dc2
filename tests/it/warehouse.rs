//! Reading the Delta tables back and comparing them with the source.

use std::path::Path;

use arrow::array::Array;
use walden::apply::inspect;
use walden::config::Config;
use walden::sink::{TableKind, Warehouse};

/// One string per result row (the query must return a single column).
pub async fn delta_rows(wh: &Path, kind: TableKind, table: &str, sql: &str) -> Vec<String> {
    let w = Warehouse::new(&walden::config::WarehouseConfig {
        url: wh.display().to_string(),
        storage_options: Default::default(),
    })
    .unwrap();
    let t = inspect::open(&w.table_url(kind, "public", table))
        .await
        .unwrap_or_else(|e| panic!("open {table}: {e}"));
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
