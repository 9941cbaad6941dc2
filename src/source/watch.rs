//! Watching the slot while walden streams, on a connection of its own: the WAL the slot retains,
//! its `wal_status` and `safe_wal_size`, and the server's WAL end (metrics, and a warning past
//! `slot.retained_wal_warn_bytes`); and the heartbeat, a logical message written into the
//! source database's WAL so that the slot advances when only other databases write.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::{SlotConfig, SourceConfig};
use crate::telemetry::METRICS;

/// The watch of one session; it ends when this is dropped.
pub struct Watch(tokio::task::JoinHandle<()>);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts watching `src`'s slot as `slot` says.
pub fn start(src: &SourceConfig, slot: &SlotConfig) -> Watch {
    Watch(tokio::spawn(watch(src.clone(), slot.clone())))
}

/// How often a retained-WAL warning is repeated while the slot stays over the threshold.
const WARN_AGAIN: Duration = Duration::from_secs(600);

async fn watch(src: SourceConfig, cfg: SlotConfig) {
    let check_every = Duration::from_secs(cfg.check_interval_s.max(1));
    let beat_every =
        (cfg.heartbeat_interval_s > 0).then(|| Duration::from_secs(cfg.heartbeat_interval_s));
    let mut next_check = Instant::now();
    let mut next_beat = beat_every.map(|d| Instant::now() + d);
    let mut warned: Option<Instant> = None;
    let mut client = None;
    loop {
        let next = next_beat.map_or(next_check, |b| b.min(next_check));
        tokio::time::sleep_until(next).await;
        if client.is_none() {
            match super::connect_sql(&src).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::debug!(error = %e, "slot watch: cannot connect; trying again later");
                    next_check = Instant::now() + check_every;
                    continue;
                }
            }
        }
        let sql = client.as_ref().expect("connected above");
        let result = if next_beat.is_some_and(|b| b <= Instant::now()) {
            next_beat = beat_every.map(|d| Instant::now() + d);
            heartbeat(sql).await
        } else {
            next_check = Instant::now() + check_every;
            check(sql, &src.slot, cfg.retained_wal_warn_bytes, &mut warned).await
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "slot watch: query failed; reconnecting");
            client = None;
        }
    }
}

/// Writes one heartbeat into the source database's WAL.
async fn heartbeat(sql: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    sql.execute(
        "SELECT pg_logical_emit_message(false, 'walden', 'heartbeat'::text)",
        &[],
    )
    .await?;
    METRICS.heartbeats_total.inc();
    Ok(())
}

/// Reads the slot's state into the metrics; warns while it retains more WAL than `warn_bytes`.
async fn check(
    sql: &tokio_postgres::Client,
    slot: &str,
    warn_bytes: u64,
    warned: &mut Option<Instant>,
) -> Result<(), tokio_postgres::Error> {
    let row = sql
        .query_opt(
            "WITH w AS (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                 ELSE pg_current_wal_lsn() END AS lsn) \
             SELECT (w.lsn - '0/0')::int8, (w.lsn - s.restart_lsn)::int8, s.wal_status, \
                 s.safe_wal_size::int8 \
             FROM w LEFT JOIN pg_replication_slots s ON s.slot_name = $1",
            &[&slot],
        )
        .await?;
    let Some(row) = row else { return Ok(()) };
    let end: Option<i64> = row.get(0);
    let retained: Option<i64> = row.get(1);
    let status: Option<String> = row.get(2);
    let safe: Option<i64> = row.get(3);
    if let Some(end) = end {
        METRICS.server_wal_end_lsn.set(end);
    }
    if let Some(status) = &status {
        METRICS.set_wal_status(status);
        METRICS.slot_safe_wal_size_bytes.set(safe.unwrap_or(-1));
    }
    let retained = retained.unwrap_or(0).max(0);
    METRICS.slot_retained_wal_bytes.set(retained);
    let over = warn_bytes > 0 && retained as u64 > warn_bytes;
    METRICS
        .slot_retained_wal_over_threshold
        .set(i64::from(over));
    if over && warned.is_none_or(|t| t.elapsed() >= WARN_AGAIN) {
        *warned = Some(Instant::now());
        tracing::warn!(slot, retained_bytes = retained, threshold = warn_bytes, safe_wal_size = ?safe,
            "the slot holds back more WAL than slot.retained_wal_warn_bytes on the server's disk: \
             walden is behind or stalled (see walden_lag_bytes and the errors above). If it cannot \
             catch up, the server may invalidate the slot (max_slot_wal_keep_size) or run out of disk");
    } else if !over {
        *warned = None;
    }
    Ok(())
}
