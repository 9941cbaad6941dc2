//! Commits whose outcome walden does not know are settled here, without restarting the stream.
//!
//! A commit can fail although it happened (the store's answer was lost, and the retried put of
//! `_delta_log/N.json` then finds the file walden itself wrote), or fail because another writer
//! won the version and its changes conflict with walden's (an `OPTIMIZE` of the mirror, say).
//! Either way the table is read again: when it records the position the commit was to record
//! ([`landed`]), the commit happened and nothing is done twice; otherwise the work is made again
//! on the new version, at most [`ATTEMPTS`] times, before the error goes to the session (which
//! reconnects). Only transient errors are settled: a definite one stops at once.

use std::collections::HashMap;

use deltalake::kernel::Add;
use deltalake::{DeltaTable, DeltaTableError};

use super::{applied, commit_props, files, mirror, ApplyError, TableErr};
use crate::checkpoint::Applied;
use crate::decode::pgoutput::Relation;
use crate::plan::MirrorPlan;
use crate::sink::delta_is_transient;

/// Commits tried per piece of work before the error goes to the session.
pub const ATTEMPTS: usize = 4;

/// Reads `table` again after a failed commit; true when it already records `to` for `app_id`.
pub async fn landed(
    table: &mut DeltaTable,
    app_id: &str,
    to: Applied,
) -> Result<bool, DeltaTableError> {
    table.update_state().await?;
    Ok(applied(table, app_id).await?.includes(to))
}

/// Appends `adds` (files already written) to `table`, recording `to`: a failed commit is
/// settled by [`landed`] and made again on the table's new version when it did not happen.
pub async fn append(
    table: &mut DeltaTable,
    name: &str,
    adds: &[Add],
    app_id: &str,
    to: Applied,
) -> Result<(), DeltaTableError> {
    let mut attempt = 1;
    loop {
        match files::commit_append(table, adds.to_vec(), commit_props(app_id, to)).await {
            Err(e) if delta_is_transient(&e) && attempt < ATTEMPTS => {
                if landed(table, app_id, to).await? {
                    tracing::info!(table = name, error = %e, "a commit whose answer was lost had happened");
                    return Ok(());
                }
                tracing::warn!(table = name, error = %e, attempt, "commit failed; trying again on the table's newest version");
                attempt += 1;
            }
            done => return done,
        }
    }
}

/// Executes the mirror `plan`, recording `to` for `app_id`; a failed commit is settled by
/// [`landed`] and the plan executed again on the table's new version when it did not happen.
pub async fn execute(
    table: &mut DeltaTable,
    name: &str,
    rel: &Relation,
    plan: &MirrorPlan,
    (app_id, to): (&str, Applied),
    storage: &HashMap<String, String>,
) -> Result<mirror::Executed, ApplyError> {
    let mut attempt = 1;
    loop {
        let props = commit_props(app_id, to);
        match mirror::execute(table, name, rel, plan, props, storage).await {
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                if landed(table, app_id, to)
                    .await
                    .map_err(|s| TableErr(name).delta(s))?
                {
                    tracing::info!(table = name, error = %e, "a mirror commit whose answer was lost had happened");
                    return Ok(mirror::Executed::landed(plan));
                }
                tracing::warn!(table = name, error = %e, attempt, "mirror commit failed; executing the plan again on the table's newest version");
                attempt += 1;
            }
            done => return done,
        }
    }
}
