//! `walden verify`: proves the mirror equals the source, table by table.
//!
//! Both sides are reduced to a row count and an order-independent checksum: the wrapping sum of a
//! 64-bit hash of each row. The source rows are read with SQL (`COPY (SELECT …)` in one
//! `REPEATABLE READ` transaction) and mapped to Arrow by the same code the stream and the snapshot
//! use; the mirror rows are read with DataFusion. Each row is encoded with Arrow's row format
//! (the same bytes for the same values of the same types) and hashed with SipHash under fixed keys.
//! Compare after `walden run --once` (or with walden stopped and caught up): the report says when
//! the slot still has WAL outstanding, because then the mirror is legitimately behind.

use std::hash::Hasher;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};
use serde::Serialize;

use crate::apply::inspect;
use crate::batch::source_fields;
use crate::config::Config;
use crate::decode::pgoutput::Relation;
use crate::sink::{TableKind, Warehouse};
use crate::source::replication::quote_ident;
use crate::source::snapshot::{describe, published_tables, Chunk, SnapshotReader, TableSpec};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Digest {
    pub rows: u64,
    pub checksum: u64,
}

#[derive(Debug, Serialize)]
pub struct TableVerdict {
    pub table: String,
    pub source: Digest,
    pub mirror: Option<Digest>,
    pub matches: bool,
}

#[derive(Debug, Serialize)]
pub struct Verification {
    pub ok: bool,
    /// WAL the slot has not confirmed yet; non-zero means the mirror may be behind.
    pub outstanding_wal_bytes: Option<i64>,
    pub tables: Vec<TableVerdict>,
}

/// Accumulates rows of one schema into a [`Digest`].
pub struct Digester {
    schema: SchemaRef,
    converter: RowConverter,
    digest: Digest,
}

impl Digester {
    pub fn new(schema: SchemaRef) -> Result<Self, arrow::error::ArrowError> {
        let fields = schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        Ok(Digester {
            converter: RowConverter::new(fields)?,
            schema,
            digest: Digest::default(),
        })
    }

    /// Adds a batch; its columns are cast to the digest's types first (readers may hand back
    /// e.g. Utf8View for Utf8).
    pub fn add(&mut self, batch: &RecordBatch) -> Result<(), arrow::error::ArrowError> {
        let cols: Vec<ArrayRef> = batch
            .columns()
            .iter()
            .zip(self.schema.fields())
            .map(|(c, f)| cast(c, f.data_type()))
            .collect::<Result<_, _>>()?;
        let rows = self.converter.convert_columns(&cols)?;
        for r in rows.iter() {
            let mut h = std::hash::DefaultHasher::new();
            h.write(r.as_ref());
            self.digest.checksum = self.digest.checksum.wrapping_add(h.finish());
            self.digest.rows += 1;
        }
        Ok(())
    }

    pub fn finish(self) -> Digest {
        self.digest
    }
}

fn source_schema(rel: &Relation) -> SchemaRef {
    std::sync::Arc::new(arrow::datatypes::Schema::new(source_fields(rel)))
}

async fn source_digest(reader: &SnapshotReader, spec: &TableSpec) -> anyhow::Result<Digest> {
    let rel = &spec.relation;
    let schema = source_schema(rel);
    let mut d = Digester::new(schema.clone())?;
    let whole = Chunk {
        table: 0,
        index: 0,
        first_page: 0,
        end_page: None,
        scope: spec.scope.clone(),
    };
    let mut copy = reader.copy(rel, &whole).await?;
    while let Some((cols, _)) = copy.next_columns(rel, 65_536).await? {
        let arrays: Vec<ArrayRef> = cols.into_iter().map(|b| b.finish()).collect();
        d.add(&RecordBatch::try_new(schema.clone(), arrays)?)?;
    }
    Ok(d.finish())
}

async fn mirror_digest(w: &Warehouse, rel: &Relation) -> anyhow::Result<Option<Digest>> {
    let url = w.table_url(TableKind::Mirror, &rel.schema, &rel.name);
    let Ok(table) = inspect::open(&url).await else {
        return Ok(None);
    };
    let cols: Vec<String> = rel.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let batches = inspect::query(&table, &format!("SELECT {} FROM t", cols.join(", "))).await?;
    let mut d = Digester::new(source_schema(rel))?;
    for b in &batches {
        d.add(b)?;
    }
    Ok(Some(d.finish()))
}

pub async fn run(cfg: &Config, only: Option<&str>) -> anyhow::Result<Verification> {
    let w = Warehouse::new(&cfg.warehouse)?;
    let sql = crate::source::connect_sql(&cfg.source).await?;
    let mut tables = published_tables(&sql, &cfg.source.publication).await?;
    if let Some(t) = only {
        let (s, n) = t.split_once('.').unwrap_or(("public", t));
        tables.retain(|p| p.is(s, n));
        if tables.is_empty() {
            anyhow::bail!("{t} is not in publication {:?}", cfg.source.publication);
        }
    }
    let outstanding: Option<i64> = sql
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.source.slot],
        )
        .await?
        .and_then(|r| r.get(0));
    let reader = SnapshotReader::current(&cfg.source).await?;
    let mut out = Vec::new();
    for table in tables {
        let spec = describe(&sql, &table).await?;
        let source = source_digest(&reader, &spec).await?;
        let mirror = mirror_digest(&w, &spec.relation).await?;
        out.push(TableVerdict {
            table: table.qualified(),
            matches: mirror == Some(source),
            source,
            mirror,
        });
    }
    Ok(Verification {
        ok: out.iter().all(|t| t.matches),
        outstanding_wal_bytes: outstanding,
        tables: out,
    })
}

impl Verification {
    pub fn render(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .tables
            .iter()
            .map(|t| {
                vec![
                    t.table.clone(),
                    t.source.rows.to_string(),
                    t.mirror
                        .map(|m| m.rows.to_string())
                        .unwrap_or_else(|| "missing".into()),
                    format!("{:016x}", t.source.checksum),
                    t.mirror
                        .map(|m| format!("{:016x}", m.checksum))
                        .unwrap_or_else(|| "-".into()),
                    if t.matches {
                        "ok".into()
                    } else {
                        "DRIFT".into()
                    },
                ]
            })
            .collect();
        let mut out = super::text_table(
            &[
                "table",
                "source_rows",
                "mirror_rows",
                "source_checksum",
                "mirror_checksum",
                "result",
            ],
            &rows,
        );
        if !self.ok {
            if let Some(b) = self.outstanding_wal_bytes.filter(|b| *b > 0) {
                out.push_str(&format!(
                    "note: the slot has {b} bytes of WAL not yet confirmed; run `walden run --once` and verify again \
                     before treating this as drift\n"
                ));
            }
            out.push_str("verify FAILED: the tables marked DRIFT differ; `walden backfill --table T` re-copies one\n");
        } else {
            out.push_str("verify passed: every mirror equals its source\n");
        }
        out
    }
}
