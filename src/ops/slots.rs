//! `walden slot list | create | drop`.

use serde::Serialize;

use crate::source::SourceError;

#[derive(Debug, Serialize)]
pub struct SlotInfo {
    pub name: String,
    pub plugin: Option<String>,
    pub slot_type: String,
    pub database: Option<String>,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub restart_lsn: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    /// WAL the server keeps for this slot (current WAL position − restart_lsn).
    pub retained_wal_bytes: Option<i64>,
    pub wal_status: Option<String>,
    pub safe_wal_size: Option<i64>,
}

pub async fn list(sql: &tokio_postgres::Client) -> Result<Vec<SlotInfo>, SourceError> {
    let rows = sql
        .query(
            "SELECT slot_name::text, plugin::text, slot_type, database::text, active, active_pid, \
                restart_lsn::text, confirmed_flush_lsn::text, \
                pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                                ELSE pg_current_wal_lsn() END, restart_lsn)::int8, \
                wal_status, safe_wal_size \
             FROM pg_replication_slots ORDER BY slot_name",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| SlotInfo {
            name: r.get(0),
            plugin: r.get(1),
            slot_type: r.get(2),
            database: r.get(3),
            active: r.get(4),
            active_pid: r.get(5),
            restart_lsn: r.get(6),
            confirmed_flush_lsn: r.get(7),
            retained_wal_bytes: r.get(8),
            wal_status: r.get(9),
            safe_wal_size: r.get(10),
        })
        .collect())
}

pub fn render(slots: &[SlotInfo]) -> String {
    if slots.is_empty() {
        return "no replication slots\n".into();
    }
    let o = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let n = |v: Option<i64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = slots
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                o(&s.plugin),
                if s.active {
                    format!("yes (pid {})", s.active_pid.unwrap_or(0))
                } else {
                    "no".into()
                },
                o(&s.restart_lsn),
                o(&s.confirmed_flush_lsn),
                n(s.retained_wal_bytes),
                o(&s.wal_status),
                n(s.safe_wal_size),
            ]
        })
        .collect();
    super::text_table(
        &[
            "slot",
            "plugin",
            "active",
            "restart_lsn",
            "confirmed_flush_lsn",
            "retained_wal_bytes",
            "wal_status",
            "safe_wal_size",
        ],
        &rows,
    )
}

/// Creates a logical pgoutput slot (without a snapshot: `walden run` copies the tables only when
/// it creates the slot itself).
pub async fn create(sql: &tokio_postgres::Client, name: &str) -> Result<String, SourceError> {
    let row = sql
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&name],
        )
        .await?;
    Ok(row.get(0))
}

/// Drops a slot. An active slot is refused unless `force`, which terminates its holder first.
pub async fn drop(
    sql: &tokio_postgres::Client,
    name: &str,
    force: bool,
) -> Result<(), SourceError> {
    let row = sql
        .query_opt(
            "SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?
        .ok_or_else(|| SourceError::Setup(format!("there is no replication slot {name:?}")))?;
    let active: bool = row.get(0);
    let pid: Option<i32> = row.get(1);
    if active {
        if !force {
            return Err(SourceError::Setup(format!(
                "slot {name:?} is active (held by PID {}); stop its consumer first, or pass --force \
                 to terminate that backend and drop the slot",
                pid.unwrap_or(0)
            )));
        }
        if let Some(pid) = pid {
            sql.execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await?;
        }
        let started = std::time::Instant::now();
        loop {
            let still: bool = sql
                .query_one(
                    "SELECT coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = $1), false)",
                    &[&name],
                )
                .await?
                .get(0);
            if !still {
                break;
            }
            if started.elapsed() > std::time::Duration::from_secs(10) {
                return Err(SourceError::Setup(format!(
                    "slot {name:?} is still active 10 s after terminating its holder"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    crate::source::drop_slot(sql, name).await
}
