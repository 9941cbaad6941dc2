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

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::{DeltaTable, DeltaTableError};

use super::keys::KeyIndex;
use super::{applied, commit_props, mirror, ApplyError, TableErr};
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
    let actions = adds.iter().cloned().map(Action::Add).collect();
    let append = DeltaOperation::Write {
        mode: SaveMode::Append,
        partition_by: None,
        predicate: None,
    };
    let props = || commit_props(app_id, to);
    commit(
        table,
        name,
        actions,
        (append, props),
        Proof::Records(app_id, to),
    )
    .await
}

/// Executes the mirror `plan` (its new rows `written` when given, see [`mirror::Written`]),
/// recording `to` for `app_id`; a failed commit is settled by [`landed`] and the plan executed
/// again on the table's new version when it did not happen.
pub async fn execute(
    table: &mut DeltaTable,
    name: &str,
    rel: &Relation,
    (plan, mut written): (&MirrorPlan, Option<&mut mirror::Written>),
    (app_id, to): (&str, Applied),
    storage: &HashMap<String, String>,
    index: &mut KeyIndex,
) -> Result<mirror::Executed, ApplyError> {
    let mut attempt = 1;
    loop {
        let props = commit_props(app_id, to);
        let work = (plan, written.as_deref_mut());
        match mirror::execute(table, name, rel, work, props, storage, Some(&mut *index)).await {
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

/// What shows, after a failed commit, that it happened all the same.
pub enum Proof<'a> {
    /// The commit records this position for this application id.
    Records(&'a str, Applied),
    /// The commit adds this file (a file name is unique to the commit that adds it).
    Adds(&'a str),
    /// Nothing: the commit changes no data (adds no file), so making it twice is harmless.
    Harmless,
}

impl Proof<'_> {
    /// The commit whose proof this is is in `table` (read again).
    async fn shown(&self, table: &mut DeltaTable) -> Result<bool, DeltaTableError> {
        match self {
            Proof::Records(app_id, to) => landed(table, app_id, *to).await,
            Proof::Adds(path) => {
                table.update_state().await?;
                let files = table.snapshot()?.log_data();
                let found = files.iter().any(|f| f.path().as_ref() == *path);
                Ok(found)
            }
            Proof::Harmless => {
                table.update_state().await?;
                Ok(false)
            }
        }
    }
}

/// Commits `actions` on `table`'s newest version as `operation` with `props`; a failed commit is
/// settled by `proof`. One that did not happen is made again on the table's new version when it
/// is an append (appends commute); any other (an overwrite replaces what the version it was
/// built on held) goes back to the caller. deltalake's own conflict retries are off: they would
/// make a commit whose answer was lost a second time when nothing in it conflicts with itself.
pub async fn commit(
    table: &mut DeltaTable,
    name: &str,
    actions: Vec<Action>,
    (operation, props): (DeltaOperation, impl Fn() -> CommitProperties),
    proof: Proof<'_>,
) -> Result<(), DeltaTableError> {
    let appends = matches!(
        operation,
        DeltaOperation::Write {
            mode: SaveMode::Append,
            ..
        }
    );
    let mut attempt = 1;
    loop {
        let done = CommitBuilder::from(props().with_max_retries(0))
            .with_actions(actions.clone())
            .build(
                Some(table.snapshot()?),
                table.log_store(),
                operation.clone(),
            )
            .await;
        match done {
            Ok(commit) => {
                table.state = Some(commit.snapshot());
                return Ok(());
            }
            Err(e) if delta_is_transient(&e) && attempt < ATTEMPTS => {
                if proof.shown(table).await? {
                    tracing::info!(table = name, error = %e, "a commit whose answer was lost had happened");
                    return Ok(());
                }
                if !appends {
                    return Err(e);
                }
                tracing::warn!(table = name, error = %e, attempt, "commit failed; trying again on the table's newest version");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
