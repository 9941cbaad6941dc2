//! `walden verify`: proves the mirror equals the source, table by table.
//!
//! Both sides are reduced to a row count and an order-independent checksum: the wrapping sum of a
//! 64-bit hash (SipHash, fixed keys) of each row's canonical line. The line is what Postgres
//! prints: on the source side Postgres computes it (`col::text` of each published column, in one
//! `REPEATABLE READ` transaction) and walden only hashes the bytes; on the mirror side `canon`
//! renders the values read back with DataFusion in Postgres's text form. The decoder's parsers are
//! on neither side, so a value the mapping got wrong shows up as drift.
//! Compare after `walden run --once` (or with walden stopped and caught up): the report says when
//! the slot still has WAL outstanding, because then the mirror is legitimately behind.

use std::hash::Hasher;

use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use futures::StreamExt;
use serde::Serialize;

use super::canon;
use crate::apply::inspect;
use crate::batch::UNREPRESENTABLE;
use crate::config::Config;
use crate::decode::copy_text::unescape_into;
use crate::decode::mask::{Masks, Rule, TableMask};
use crate::decode::pgoutput::Relation;
use crate::sink::{TableKind, Warehouse};
use crate::source::replication::quote_ident;
use crate::source::snapshot::{describe, published_tables, SnapshotReader, TableSpec};

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Digest {
    pub rows: u64,
    pub checksum: u64,
    /// The same sum per column (so drift can be pinned to its columns).
    #[serde(skip)]
    pub columns: Vec<u64>,
}

#[derive(Debug, Serialize)]
pub struct TableVerdict {
    pub table: String,
    pub source: Digest,
    pub mirror: Option<Digest>,
    pub matches: bool,
    /// Columns whose values differ (when the mirror has the same rows otherwise).
    pub differs: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Verification {
    pub ok: bool,
    /// WAL the slot has not confirmed yet; non-zero means the mirror may be behind.
    pub outstanding_wal_bytes: Option<i64>,
    pub tables: Vec<TableVerdict>,
}

/// Accumulates rows, each given as its canonical line (one tab-separated field per column, as
/// COPY sends it), into a [`Digest`].
#[derive(Default)]
pub struct Digester {
    digest: Digest,
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

impl Digester {
    pub fn add_line(&mut self, line: &[u8]) {
        let d = &mut self.digest;
        d.checksum = d.checksum.wrapping_add(hash(line));
        d.rows += 1;
        for (i, field) in line.split(|b| *b == b'\t').enumerate() {
            if d.columns.len() <= i {
                d.columns.resize(i + 1, 0);
            }
            d.columns[i] = d.columns[i].wrapping_add(hash(field));
        }
    }

    pub fn finish(self) -> Digest {
        self.digest
    }
}

/// The source's rows as Postgres prints them: one canonical line per published row, hashed as
/// the server sends it (nothing is parsed).
async fn source_digest(reader: &SnapshotReader, spec: &TableSpec) -> anyhow::Result<Digest> {
    let rel = &spec.relation;
    let mut sql = format!(
        "COPY (SELECT {} FROM {}{}.{}",
        canon::source_columns(rel, spec.scope.mask.as_ref()).join(", "),
        if spec.scope.only { "ONLY " } else { "" },
        quote_ident(&rel.schema),
        quote_ident(&rel.name)
    );
    if let Some(filter) = &spec.scope.row_filter {
        sql.push_str(&format!(" WHERE ({filter})"));
    }
    sql.push_str(") TO STDOUT");
    let mut d = Digester::default();
    let hashed = spec.scope.mask.as_ref().map(|m| (m, m.kept()));
    let mut pending: Vec<u8> = Vec::new();
    let mut stream = std::pin::pin!(reader.copy_raw(&sql).await?);
    while let Some(chunk) = stream.next().await {
        pending.extend_from_slice(&chunk?);
        let mut start = 0;
        while let Some(at) = memchr::memchr(b'\n', &pending[start..]) {
            let line = &pending[start..start + at];
            match &hashed {
                Some((m, rules)) => d.add_line(&hash_fields(line, m, rules)),
                None => d.add_line(line),
            }
            start += at + 1;
        }
        pending.drain(..start);
    }
    Ok(d.finish())
}

/// A source line with the values of hashed columns replaced by their keyed hash, as the
/// warehouse holds them (walden hashes them: Postgres has no HMAC without pgcrypto).
/// `rules`: the mask's rules of the columns read ([`TableMask::kept`]).
fn hash_fields(line: &[u8], mask: &TableMask, rules: &[Rule]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    let mut text = Vec::new();
    for (i, (field, &rule)) in line.split(|b| *b == b'\t').zip(rules).enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        match (rule, field.iter().position(|b| *b == b':')) {
            (Rule::Hash, Some(colon)) if field != b"-" => {
                text.clear();
                unescape_into(&field[colon + 1..], &mut text);
                out.extend_from_slice(format!("64:{}", mask.hash(&text)).as_bytes());
            }
            _ => out.extend_from_slice(field),
        }
    }
    out
}

/// The mirror's rows rendered in Postgres's text form by `canon` (independent of the decoder).
async fn mirror_digest(w: &Warehouse, rel: &Relation) -> anyhow::Result<Option<Digest>> {
    let url = w.table_url(TableKind::Mirror, &rel.schema, &rel.name);
    let Some(table) = inspect::open(w, &url).await? else {
        return Ok(None);
    };
    let mut cols: Vec<String> = rel.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let has_exact = table
        .snapshot()
        .map(|s| {
            s.snapshot()
                .arrow_schema()
                .field_with_name(UNREPRESENTABLE)
                .is_ok()
        })
        .unwrap_or(false);
    cols.push(if has_exact {
        UNREPRESENTABLE.to_string()
    } else {
        format!("CAST(NULL AS VARCHAR) AS {UNREPRESENTABLE}")
    });
    let batches = inspect::query(&table, &format!("SELECT {} FROM t", cols.join(", "))).await?;
    let names: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
    let mut d = Digester::default();
    let (mut text, mut line) = (String::new(), Vec::new());
    for b in &batches {
        let n = rel.columns.len();
        let columns: Vec<&dyn Array> = (0..n).map(|i| b.column(i).as_ref()).collect();
        let exact = cast(b.column(n), &DataType::Utf8)?;
        let exact = exact.as_string::<i32>();
        for row in 0..b.num_rows() {
            let map = (!exact.is_null(row))
                .then(|| {
                    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(
                        exact.value(row),
                    )
                })
                .transpose()?;
            line.clear();
            for (i, col) in columns.iter().enumerate() {
                text.clear();
                canon::render_value(*col, row, map.as_ref(), names[i], &mut text);
                if i > 0 {
                    line.push(b'\t');
                }
                canon::copy_escape(&text, &mut line);
            }
            d.add_line(&line);
        }
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
    let masks = Masks::new(&cfg.privacy);
    let mut out = Vec::new();
    for table in tables {
        let spec = describe(&sql, &table, &masks).await?;
        let source = source_digest(&reader, &spec).await?;
        let mirror = mirror_digest(&w, &spec.relation).await?;
        let differs = match &mirror {
            Some(m) => spec
                .relation
                .columns
                .iter()
                .enumerate()
                .filter(|(i, _)| source.columns.get(*i) != m.columns.get(*i))
                .map(|(_, c)| c.name.clone())
                .collect(),
            None => Vec::new(),
        };
        out.push(TableVerdict {
            table: table.qualified(),
            matches: mirror.as_ref() == Some(&source),
            differs,
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
                        .as_ref()
                        .map(|m| m.rows.to_string())
                        .unwrap_or_else(|| "missing".into()),
                    format!("{:016x}", t.source.checksum),
                    t.mirror
                        .as_ref()
                        .map(|m| format!("{:016x}", m.checksum))
                        .unwrap_or_else(|| "-".into()),
                    if t.matches {
                        "ok".into()
                    } else if t.differs.is_empty() {
                        "DRIFT".into()
                    } else {
                        format!("DRIFT in {}", t.differs.join(", "))
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
