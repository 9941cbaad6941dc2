//! `walden backfill --table T`: re-copies one table consistently with the stream.
//!
//! Method: a temporary logical slot created with `EXPORT_SNAPSHOT` gives a snapshot and its
//! consistent point `P` without touching walden's own slot. The table is copied under that
//! snapshot (same chunked, parallel COPY as the initial snapshot), then the mirror is replaced in
//! one Delta commit whose application transaction `walden:<slot>` says "applied through P − 1".
//! The running stream (or the next `walden run`) then skips the table's changes below P, which the
//! copy already holds, and applies those from P on. A `walden run` that is streaming meanwhile
//! notices at its next commit to that mirror: Delta's conflict check fails its commit
//! (same application id), and it reconnects and reloads the table's LSN. If the stream applied
//! changes at or past P before the copy finished, the backfill refuses to commit (the copy would
//! be older than the mirror) and says so. We chose this over DBLog-style watermarks because it
//! needs no writes to the source database and reuses the snapshot path end to end; the cost is a
//! second slot for the duration of the copy (dropped automatically when the backfill ends).

use crate::config::Config;
use crate::sink::Warehouse;
use crate::snapshot::{copy_beside_stream, SnapshotStats};
use crate::source::connect_sql;
use crate::source::snapshot::published_tables;

pub async fn run(cfg: &Config, table: &str) -> anyhow::Result<SnapshotStats> {
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    let warehouse = Warehouse::new(&cfg.warehouse)?;
    warehouse.check_store().await?;
    let sql = connect_sql(&cfg.source).await?;
    let published = published_tables(&sql, &cfg.source.publication).await?;
    let Some(table) = published.into_iter().find(|p| p.is(schema, name)) else {
        anyhow::bail!(
            "{schema}.{name} is not in publication {:?}: add it first (ALTER PUBLICATION {} ADD TABLE {}.{};), \
             then backfill",
            cfg.source.publication,
            crate::source::replication::quote_ident(&cfg.source.publication),
            crate::source::replication::quote_ident(schema),
            crate::source::replication::quote_ident(name),
        );
    };
    let stats = copy_beside_stream(cfg, &warehouse, &[table]).await?;
    Ok(stats)
}
