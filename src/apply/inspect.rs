//! Reading the warehouse back: which tables exist, their row counts and applied LSNs.

use std::fmt::Write as _;
use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use object_store::path::Path;
use url::Url;

use super::{app_id, applied_lsn};
use crate::config::Config;
use crate::sink::{TableKind, Warehouse};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
    #[error("listing the warehouse: {0}")]
    Store(#[from] object_store::Error),
    #[error("reading {table}: {source}")]
    Delta {
        table: String,
        #[source]
        source: deltalake::DeltaTableError,
    },
    #[error("querying {table}: {source}")]
    Query {
        table: String,
        #[source]
        source: datafusion::error::DataFusionError,
    },
}

/// `(schema, table)` of every source table that has a mirror in the warehouse.
pub async fn list_tables(w: &Warehouse) -> Result<Vec<(String, String)>, InspectError> {
    let store = w.object_store(&format!("{}/", TableKind::Mirror.dir()))?;
    let mut out = Vec::new();
    let schemas = store.list_with_delimiter(None).await?;
    for s in schemas.common_prefixes {
        let tables = store.list_with_delimiter(Some(&s)).await?;
        for t in tables.common_prefixes {
            let schema = last_segment(&s);
            let table = last_segment(&t);
            out.push((schema, table));
        }
    }
    out.sort();
    Ok(out)
}

fn last_segment(p: &Path) -> String {
    p.parts()
        .next_back()
        .map(|s| s.as_ref().to_string())
        .unwrap_or_default()
}

/// Opens a Delta table of `warehouse` (with its storage options); `None` when there is none.
pub async fn open(warehouse: &Warehouse, url: &Url) -> Result<Option<DeltaTable>, InspectError> {
    warehouse
        .open(url)
        .await
        .map_err(|source| InspectError::Delta {
            table: url.to_string(),
            source,
        })
}

/// Runs `sql` against `table` registered as `t`.
pub async fn query(table: &DeltaTable, sql: &str) -> Result<Vec<RecordBatch>, InspectError> {
    let err = |source| InspectError::Query {
        table: table.table_url().to_string(),
        source,
    };
    let ctx = SessionContext::new();
    table
        .update_datafusion_session(&ctx.state())
        .map_err(|source| InspectError::Delta {
            table: table.table_url().to_string(),
            source,
        })?;
    let provider = table
        .table_provider()
        .await
        .map_err(|e| err(datafusion::error::DataFusionError::External(Box::new(e))))?;
    ctx.register_table("t", Arc::clone(&provider))
        .map_err(err)?;
    ctx.sql(sql)
        .await
        .map_err(err)?
        .collect()
        .await
        .map_err(err)
}

pub async fn count(table: &DeltaTable) -> Result<i64, InspectError> {
    let b = query(table, "SELECT count(*) FROM t").await?;
    Ok(b.first()
        .and_then(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .map(|a| a.value(0))
        })
        .unwrap_or(0))
}

/// A human-readable report of the warehouse.
pub async fn describe(cfg: &Config, rows: usize) -> Result<String, InspectError> {
    let w = Warehouse::new(&cfg.warehouse)?;
    let app = app_id(&cfg.source.slot);
    let mut out = String::new();
    let tables = list_tables(&w).await?;
    if tables.is_empty() {
        let _ = writeln!(out, "no tables in {} yet", w.root());
    }
    for (schema, table) in tables {
        let (Some(m), Some(c)) = (
            open(&w, &w.table_url(TableKind::Mirror, &schema, &table)).await?,
            open(&w, &w.table_url(TableKind::Changes, &schema, &table)).await?,
        ) else {
            let _ = writeln!(out, "{schema}.{table}: not created completely yet");
            continue;
        };
        let lsn = |t: &DeltaTable| {
            let t = t.clone();
            let app = app.clone();
            async move { applied_lsn(&t, &app).await.unwrap_or_default() }
        };
        let _ = writeln!(
            out,
            "{schema}.{table}: mirror {} rows (applied through {}), changelog {} rows (applied through {})",
            count(&m).await?,
            lsn(&m).await,
            count(&c).await?,
            lsn(&c).await,
        );
        if rows > 0 {
            let sample = query(&m, &format!("SELECT * FROM t LIMIT {rows}")).await?;
            if let Ok(s) = arrow::util::pretty::pretty_format_batches(&sample) {
                let _ = writeln!(out, "{s}");
            }
        }
    }
    Ok(out)
}
