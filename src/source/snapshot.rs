//! The Postgres side of a snapshot: which tables, how they are described and split, and the
//! worker connections that copy ctid ranges under the slot's exported snapshot.
//!
//! Every worker opens `REPEATABLE READ` and imports the snapshot exported by
//! `CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT` (or a temporary slot's, for backfill), so all of
//! them see the database exactly as of the slot's consistent point. Tables are split into ranges
//! of heap pages (`ctid >= '(lo,0)' AND ctid < '(hi,0)'`, a TID range scan) and copied with
//! `COPY (SELECT …) TO STDOUT` in text format, which goes through the same type output functions
//! as pgoutput, so the snapshot and the stream share one type mapping.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use super::{connect_sql, replication::quote_ident, types::TypeResolver, SourceError};
use crate::config::SourceConfig;
use crate::decode::copy_text::CopyTextParser;
use crate::decode::mask::{Masks, TableMask};
use crate::decode::pgoutput::{Column, Relation};
use crate::decode::types::ColumnBuilder;

/// One ctid range of one table, with the publication's row filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Index into the list of tables being copied.
    pub table: usize,
    /// Position of the chunk within its table.
    pub index: u32,
    pub first_page: u64,
    /// Exclusive; `None` for the last chunk (reads to the end of the table).
    pub end_page: Option<u64>,
    /// What the publication sends of the table (see [`TableSpec`]).
    pub scope: Arc<Scope>,
}

/// The rows of a table the publication sends, as SQL.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The publication's row filter (PostgreSQL 15+), a boolean expression over the columns.
    pub row_filter: Option<String>,
    /// Read the table without its inheritance children (`FROM ONLY`), which are published, and
    /// copied, on their own. Off for a partitioned table published through its root, whose rows
    /// all live in its partitions.
    pub only: bool,
    /// The table's masked columns (`decode::mask`): each field read is masked before it reaches
    /// a column builder. The relation it goes with is already the masked one.
    pub mask: Option<TableMask>,
}

/// A table to copy, with its size estimates.
#[derive(Debug, Clone)]
pub struct TableSpec {
    /// The columns the publication sends (its column list, PostgreSQL 15+), as pgoutput
    /// describes them.
    pub relation: Relation,
    pub pages: u64,
    pub estimated_rows: u64,
    pub scope: Arc<Scope>,
}

/// A table of the publication: its name, and which of its columns and rows are published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub schema: String,
    pub name: String,
    /// The table's OID now: a new one under a known name is a new generation (DROP + CREATE).
    pub oid: u32,
    /// Published columns; `None`: all of them.
    pub columns: Option<Vec<String>>,
    pub row_filter: Option<String>,
}

impl Published {
    pub fn is(&self, schema: &str, name: &str) -> bool {
        self.schema == schema && self.name == name
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// Every table in the publication, with its column list and row filter (PostgreSQL 15+; before
/// that a publication sends whole tables). A partitioned table published through its root
/// (`publish_via_partition_root`) is listed as the root, otherwise as its partitions.
pub async fn published_tables(
    sql: &tokio_postgres::Client,
    publication: &str,
) -> Result<Vec<Published>, SourceError> {
    let version: i32 = sql
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    let query = if version >= 150000 {
        "SELECT schemaname::text, tablename::text, attnames::text[], rowfilter, c.oid \
         FROM pg_publication_tables p \
         JOIN pg_namespace n ON n.nspname = p.schemaname \
         JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
         WHERE pubname = $1 ORDER BY 1, 2"
    } else {
        "SELECT schemaname::text, tablename::text, NULL::text[], NULL::text, c.oid \
         FROM pg_publication_tables p \
         JOIN pg_namespace n ON n.nspname = p.schemaname \
         JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
         WHERE pubname = $1 ORDER BY 1, 2"
    };
    // The OID from the catalog rows of the same snapshot as the column list (a `regclass` cast
    // would read the newest catalog: a table dropped and created again meanwhile would get the
    // new OID with the old generation's columns).
    let rows = sql.query(query, &[&publication]).await?;
    Ok(rows
        .iter()
        .map(|r| Published {
            schema: r.get(0),
            name: r.get(1),
            columns: r.get(2),
            row_filter: r.get(3),
            oid: r.get(4),
        })
        .collect())
}

/// Describes a table the way pgoutput's Relation message would: the columns it publishes
/// (not dropped, not generated), their types, and which belong to the replica identity; then
/// as the warehouse sees it, masked by `masks`.
pub async fn describe(
    sql: &tokio_postgres::Client,
    table: &Published,
    masks: &Masks,
) -> Result<TableSpec, SourceError> {
    let (schema, name) = (table.schema.as_str(), table.name.as_str());
    let rows = sql
        .query(
            "SELECT c.oid, c.relreplident::text, a.attname::text, a.atttypid, a.atttypmod, \
                CASE c.relreplident \
                  WHEN 'f' THEN true \
                  WHEN 'd' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid \
                                 AND i.indisprimary AND a.attnum = ANY(i.indkey)) \
                  WHEN 'i' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid \
                                 AND i.indisreplident AND a.attnum = ANY(i.indkey)) \
                  ELSE false END, \
                greatest(pg_relation_size(c.oid) / current_setting('block_size')::int, 0)::int8, \
                greatest(c.reltuples, 0)::int8, greatest(c.relpages, 0)::int8, c.relkind::text \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                  AND a.attgenerated = '' \
             WHERE n.nspname = $1 AND c.relname = $2 ORDER BY a.attnum",
            &[&schema, &name],
        )
        .await?;
    // Read by name, checked by OID: the publication was read earlier, and its column list
    // belongs to the generation it saw.
    let first = rows
        .first()
        .filter(|r| r.get::<_, u32>(0) == table.oid)
        .ok_or_else(|| SourceError::Changed(table.qualified()))?;
    let relkind: String = first.get(9);
    let oid: u32 = first.get(0);
    let ident: String = first.get(1);
    let pages: i64 = first.get(6);
    let reltuples: i64 = first.get(7);
    let relpages: i64 = first.get(8);
    let published = |r: &&tokio_postgres::Row| {
        table
            .columns
            .as_ref()
            .is_none_or(|cols| cols.iter().any(|c| *c == r.get::<_, String>(2)))
    };
    let columns = rows
        .iter()
        .filter(published)
        .map(|r| Column {
            key: r.get(5),
            name: r.get(2),
            type_oid: r.get(3),
            type_modifier: r.get(4),
            ..Column::default()
        })
        .collect();
    let pages = pages as u64;
    // reltuples describes relpages pages; scale it to the current size.
    let estimated_rows = if relpages > 0 {
        (reltuples as f64 / relpages as f64 * pages as f64) as u64
    } else {
        pages * 100
    };
    let mut relation = Relation {
        oid,
        schema: schema.to_string(),
        name: name.to_string(),
        replica_identity: ident.bytes().next().unwrap_or(b'd'),
        columns,
    };
    TypeResolver::default()
        .resolve(sql, &mut relation, None)
        .await?;
    let mask = masks.of(&relation).map_err(SourceError::Setup)?;
    if let Some(m) = &mask {
        relation = m.relation(&relation);
    }
    Ok(TableSpec {
        relation,
        pages,
        estimated_rows,
        scope: Arc::new(Scope {
            row_filter: table.row_filter.clone(),
            only: relkind != "p",
            mask,
        }),
    })
}

/// Splits a table into page ranges of about `chunk_rows` rows each. The last range is open so
/// nothing beyond the measured size can be missed.
pub fn plan_chunks(table: usize, spec: &TableSpec, chunk_rows: u64) -> Vec<Chunk> {
    let rows_per_page = spec
        .estimated_rows
        .checked_div(spec.pages)
        .unwrap_or(1)
        .max(1);
    let pages_per_chunk = (chunk_rows / rows_per_page).max(1);
    let n = spec.pages.div_ceil(pages_per_chunk).max(1);
    (0..n)
        .map(|i| Chunk {
            table,
            index: i as u32,
            first_page: i * pages_per_chunk,
            end_page: (i + 1 < n).then_some((i + 1) * pages_per_chunk),
            scope: spec.scope.clone(),
        })
        .collect()
}

/// A connection inside a transaction that sees the exported snapshot.
pub struct SnapshotReader {
    client: tokio_postgres::Client,
}

impl SnapshotReader {
    pub async fn open(cfg: &SourceConfig, snapshot_name: &str) -> Result<Self, SourceError> {
        let client = connect_sql(cfg).await?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
                super::replication::quote_literal(snapshot_name)
            ))
            .await?;
        Ok(SnapshotReader { client })
    }

    /// A reader that sees the database as of now (one `REPEATABLE READ` transaction).
    pub async fn current(cfg: &SourceConfig) -> Result<Self, SourceError> {
        let client = connect_sql(cfg).await?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await?;
        Ok(SnapshotReader { client })
    }

    /// The raw `COPY … TO STDOUT` output of `sql`, inside this reader's transaction.
    pub async fn copy_raw(&self, sql: &str) -> Result<tokio_postgres::CopyOutStream, SourceError> {
        Ok(self.client.copy_out(sql).await?)
    }

    /// Starts copying one chunk; read its rows with [`ChunkCopy::next_rows`].
    pub async fn copy(&self, rel: &Relation, chunk: &Chunk) -> Result<ChunkCopy, SourceError> {
        let sql = copy_sql(rel, chunk);
        let stream = self.client.copy_out(&sql).await?;
        Ok(ChunkCopy {
            stream: Box::pin(stream),
            parser: CopyTextParser::new(rel.columns.len()).masked(chunk.scope.mask.as_ref()),
            table: format!("{}.{}", rel.schema, rel.name),
            done: false,
        })
    }
}

/// The COPY of one chunk: the published columns of the published rows in its page range.
pub fn copy_sql(rel: &Relation, chunk: &Chunk) -> String {
    let cols: Vec<String> = rel.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let mut sql = format!(
        "COPY (SELECT {} FROM {}{}.{} WHERE ctid >= '({},0)'::tid",
        cols.join(", "),
        if chunk.scope.only { "ONLY " } else { "" },
        quote_ident(&rel.schema),
        quote_ident(&rel.name),
        chunk.first_page
    );
    if let Some(end) = chunk.end_page {
        sql.push_str(&format!(" AND ctid < '({end},0)'::tid"));
    }
    if let Some(filter) = &chunk.scope.row_filter {
        sql.push_str(&format!(" AND ({filter})"));
    }
    sql.push_str(") TO STDOUT");
    sql
}

/// One chunk's COPY under way.
pub struct ChunkCopy {
    stream: std::pin::Pin<Box<tokio_postgres::CopyOutStream>>,
    parser: CopyTextParser,
    table: String,
    done: bool,
}

impl ChunkCopy {
    /// The next rows (about `batch_rows` of them) as column builders for `rel` and their count,
    /// or `None` at the end of the chunk.
    pub async fn next_columns(
        &mut self,
        rel: &Relation,
        batch_rows: usize,
    ) -> Result<Option<(Vec<ColumnBuilder>, usize)>, SourceError> {
        if self.done {
            return Ok(None);
        }
        let mut cols = crate::batch::builders(rel, batch_rows);
        let mut n = 0;
        let bad = |e: crate::decode::copy_text::CopyTextError, t: &str| {
            SourceError::Protocol(format!("{t}: {e}"))
        };
        while n < batch_rows {
            match self.stream.next().await {
                Some(data) => {
                    let data: Bytes = data?;
                    n += self
                        .parser
                        .feed_into(data, &mut cols)
                        .map_err(|e| bad(e, &self.table))?;
                }
                None => {
                    self.parser.finish().map_err(|e| bad(e, &self.table))?;
                    self.done = true;
                    break;
                }
            }
        }
        Ok((n > 0).then_some((cols, n)))
    }

    /// Rows read so far.
    pub fn rows(&self) -> u64 {
        self.parser.rows()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pages: u64, rows: u64) -> TableSpec {
        TableSpec {
            relation: Relation {
                oid: 1,
                schema: "s".into(),
                name: "t".into(),
                replica_identity: b'd',
                columns: vec![],
            },
            pages,
            estimated_rows: rows,
            scope: Arc::new(Scope {
                row_filter: None,
                only: true,
                mask: None,
            }),
        }
    }

    #[test]
    fn chunks_cover_every_page_once() {
        let c = plan_chunks(0, &spec(1000, 100_000), 10_000);
        assert_eq!(c.len(), 10);
        assert_eq!(c[0].first_page, 0);
        for w in c.windows(2) {
            assert_eq!(w[0].end_page, Some(w[1].first_page));
        }
        assert_eq!(c.last().unwrap().end_page, None);
    }

    #[test]
    fn empty_table_is_one_open_chunk() {
        let c = plan_chunks(3, &spec(0, 0), 10_000);
        assert_eq!(
            c,
            vec![Chunk {
                table: 3,
                index: 0,
                first_page: 0,
                end_page: None,
                scope: spec(0, 0).scope,
            }]
        );
    }

    #[test]
    fn copy_reads_published_columns_and_rows_without_children() {
        let mut s = spec(10, 100);
        s.relation.columns = vec![Column {
            key: true,
            name: "Id".into(),
            type_oid: 23,
            type_modifier: -1,
            ..Column::default()
        }];
        s.scope = Arc::new(Scope {
            row_filter: Some("(region = 'eu'::text)".into()),
            only: true,
            mask: None,
        });
        let c = &plan_chunks(0, &s, 1_000_000)[0];
        assert_eq!(
            copy_sql(&s.relation, c),
            "COPY (SELECT \"Id\" FROM ONLY \"s\".\"t\" WHERE ctid >= '(0,0)'::tid AND ((region = 'eu'::text))) TO STDOUT"
        );
    }
}
