//! `walden query "SQL"`: DataFusion SQL over the warehouse.
//!
//! Mirrors are registered as `schema.table` (e.g. `public.orders`), changelogs as
//! `changes.schema.table` (catalog `changes`).

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::catalog::{
    CatalogProvider, MemoryCatalogProvider, MemorySchemaProvider, SchemaProvider,
};
use datafusion::prelude::SessionContext;

use crate::apply::inspect;
use crate::config::Config;
use crate::sink::{TableKind, Warehouse};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

pub async fn run(cfg: &Config, sql: &str) -> anyhow::Result<Vec<RecordBatch>> {
    let w = Warehouse::new(&cfg.warehouse)?;
    let ctx = SessionContext::new();
    let default = ctx
        .catalog("datafusion")
        .ok_or_else(|| anyhow::anyhow!("DataFusion has no default catalog"))?;
    let changes = Arc::new(MemoryCatalogProvider::new());
    ctx.register_catalog("changes", changes.clone());
    for (schema, table) in inspect::list_tables(&w).await? {
        for (kind, catalog) in [
            (TableKind::Mirror, default.clone()),
            (
                TableKind::Changes,
                changes.clone() as Arc<dyn CatalogProvider>,
            ),
        ] {
            let Some(t) = inspect::open(&w, &w.table_url(kind, &schema, &table)).await? else {
                continue;
            };
            t.update_datafusion_session(&ctx.state())?;
            let provider = t.table_provider().await?;
            let sp = match catalog.schema(&schema) {
                Some(s) => s,
                None => {
                    let s: Arc<dyn SchemaProvider> = Arc::new(MemorySchemaProvider::new());
                    catalog.register_schema(&schema, s.clone())?;
                    s
                }
            };
            sp.register_table(table.clone(), provider)?;
        }
    }
    Ok(ctx.sql(sql).await?.collect().await?)
}

pub fn render(batches: &[RecordBatch], format: Format) -> anyhow::Result<String> {
    Ok(match format {
        Format::Table => format!("{}\n", arrow::util::pretty::pretty_format_batches(batches)?),
        Format::Csv => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::csv::Writer::new(&mut buf);
                for b in batches {
                    w.write(b)?;
                }
            }
            String::from_utf8(buf)?
        }
        Format::Json => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
                for b in batches {
                    w.write(b)?;
                }
                w.finish()?;
            }
            String::from_utf8(buf)?
        }
    })
}
