//! `walden status`: per table what the mirror holds and how far it is applied; the slot's lag.

use serde::Serialize;

use crate::apply::inspect::{self, InspectError};
use crate::apply::{app_id, applied_lsn};
use crate::checkpoint::Lsn;
use crate::config::Config;
use crate::sink::{TableKind, Warehouse};

#[derive(Debug, Serialize)]
pub struct TableStatus {
    pub table: String,
    pub mirror_rows: i64,
    pub applied_lsn: String,
    /// Commit time of the newest source transaction in the mirror (RFC 3339, UTC).
    pub last_commit: Option<String>,
    /// Seconds from that source commit to the mirror's newest data commit (its commit-to-visible
    /// latency, as measured by the Delta log's commit time).
    pub visible_after_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub slot: String,
    pub slot_exists: bool,
    pub slot_active: bool,
    pub confirmed_flush_lsn: Option<String>,
    /// WAL written since the slot's confirmed position.
    pub lag_bytes: Option<i64>,
    /// Time since the newest commit in the warehouse, when WAL is outstanding (0 when caught up).
    pub lag_seconds: Option<f64>,
    pub tables: Vec<TableStatus>,
}

pub async fn run(cfg: &Config, sql: &tokio_postgres::Client) -> Result<Status, anyhow::Error> {
    let w = Warehouse::new(&cfg.warehouse)?;
    let app = app_id(&cfg.source.slot);
    let mut tables = Vec::new();
    let mut newest: Option<i64> = None;
    for (schema, table) in inspect::list_tables(&w).await? {
        let Some(m) = inspect::open(&w, &w.table_url(TableKind::Mirror, &schema, &table)).await?
        else {
            continue;
        };
        let lsn = applied_lsn(&m, &app)
            .await
            .map_err(|source| InspectError::Delta {
                table: format!("{schema}.{table}"),
                source,
            })?;
        let b = inspect::query(
            &m,
            "SELECT count(*), CAST(max(_walden_commit_ts) AS BIGINT) FROM t",
        )
        .await?;
        let (rows, ts) = b
            .first()
            .map(|b| {
                use arrow::array::{Array, Int64Array};
                let c = b.column(0).as_any().downcast_ref::<Int64Array>();
                let t = b.column(1).as_any().downcast_ref::<Int64Array>();
                (
                    c.map(|c| c.value(0)).unwrap_or(0),
                    t.and_then(|t| (!t.is_null(0)).then(|| t.value(0))),
                )
            })
            .unwrap_or((0, None));
        newest = newest.max(ts);
        let visible_after_s = match (ts, last_data_commit_ms(&m).await) {
            (Some(us), Some(ms)) => Some(((ms * 1000 - us) as f64 / 1e6).max(0.0)),
            _ => None,
        };
        tables.push(TableStatus {
            table: format!("{schema}.{table}"),
            mirror_rows: rows,
            applied_lsn: Lsn(lsn.0).to_string(),
            last_commit: ts
                .and_then(|us| chrono::DateTime::from_timestamp_micros(us).map(|d| d.to_rfc3339())),
            visible_after_s,
        });
    }
    let slot = sql
        .query_opt(
            "SELECT active, confirmed_flush_lsn::text, \
                pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.source.slot],
        )
        .await?;
    let (exists, active, confirmed, lag) = match &slot {
        Some(r) => (true, r.get(0), r.get(1), r.get::<_, Option<i64>>(2)),
        None => (false, false, None, None),
    };
    let lag_seconds = lag.map(|l| {
        if l <= 0 {
            0.0
        } else {
            newest
                .map(|us| (chrono::Utc::now().timestamp_micros() - us) as f64 / 1e6)
                .unwrap_or(0.0)
                .max(0.0)
        }
    });
    Ok(Status {
        slot: cfg.source.slot.clone(),
        slot_exists: exists,
        slot_active: active,
        confirmed_flush_lsn: confirmed,
        lag_bytes: lag,
        lag_seconds,
        tables,
    })
}

/// Commit time (ms) of the table's newest commit that changed data (maintenance commits —
/// compaction, retention settings, VACUUM — do not count).
async fn last_data_commit_ms(table: &deltalake::DeltaTable) -> Option<i64> {
    use futures::StreamExt as _;
    let mut history = table.history(Some(50));
    while let Some(Ok(c)) = history.next().await {
        let op = c.operation.as_deref().unwrap_or("");
        if !matches!(
            op,
            "OPTIMIZE" | "SET TBLPROPERTIES" | "VACUUM START" | "VACUUM END"
        ) {
            return c.timestamp;
        }
    }
    None
}

impl Status {
    pub fn render(&self) -> String {
        let mut out = if self.slot_exists {
            format!(
                "slot {}: {}, confirmed {}, lag {} bytes, {:.1} s\n",
                self.slot,
                if self.slot_active {
                    "active"
                } else {
                    "inactive"
                },
                self.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                self.lag_bytes.unwrap_or(0),
                self.lag_seconds.unwrap_or(0.0)
            )
        } else {
            format!(
                "slot {} does not exist (walden run creates it)\n",
                self.slot
            )
        };
        let rows: Vec<Vec<String>> = self
            .tables
            .iter()
            .map(|t| {
                vec![
                    t.table.clone(),
                    t.mirror_rows.to_string(),
                    t.applied_lsn.clone(),
                    t.last_commit.clone().unwrap_or_else(|| "-".into()),
                    t.visible_after_s
                        .map(|s| format!("{s:.1} s"))
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        out.push_str(&super::text_table(
            &[
                "table",
                "mirror_rows",
                "applied_lsn",
                "last_commit",
                "visible_after",
            ],
            &rows,
        ));
        out
    }
}
