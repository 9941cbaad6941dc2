//! The mirror write plan: the one place that decides what a batch of a table's changes does to
//! its mirror.
//!
//! A flushed batch (the changes after the mirror's applied LSN, in source order) becomes a
//! [`MirrorPlan`], applied to the mirror as it was before the batch:
//!
//! - `truncate`: every row the mirror held is gone (a TRUNCATE is in the batch; only the changes
//!   after the last one count);
//! - `removes`: rows of the mirror to take out, each named by its replica identity (the identity
//!   columns and their values) and each removing **exactly one** row, matched with NULL-safe
//!   equality. Keyless FULL-identity tables can hold identical rows: two removes of the same
//!   identity take out two of them, one takes out one;
//! - `upserts`: rows to add. A value the server did not send (unchanged TOAST, `'u'`) is taken
//!   from the mirror row the upsert descends from (`origin`, one of the removes): an update of a
//!   row, a key-changing update (the row moves, its unchanged columns with it), or a chain of
//!   updates in the batch all carry the old value forward.
//!
//! Updates and deletes are matched first against rows added earlier in the same batch (their
//! values are known here); only when none matches do they reach back into the mirror. Under
//! REPLICA IDENTITY FULL the old image holds every column, so unchanged values are taken from it
//! directly. The executor (`apply::mirror`) finds the removes' rows in the mirror's files, carries
//! the unchanged values and commits removes and upserts atomically.

use std::collections::HashMap;
use std::sync::Arc;

use crate::batch::{column_map, Row, TableBuffer};
use crate::checkpoint::{Applied, Lsn};
use crate::decode::pgoutput::{OldKind, Relation, Tuple, Value};
use crate::decode::txn::ChangeKind;

/// Indices (into the batch relation's columns) of a replica identity.
pub type Identity = Arc<[usize]>;

/// A row of the mirror before the batch, to take out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remove {
    pub identity: Identity,
    /// The identity columns' values, in `identity` order.
    pub values: Vec<Value>,
}

/// A row to add. `values` follow the batch relation's columns; [`Value::Unchanged`] marks a value
/// to carry from the mirror row removed by `removes[origin]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upsert {
    pub values: Vec<Value>,
    pub origin: Option<usize>,
    pub lsn: Lsn,
    pub commit_ts_us: i64,
}

impl Upsert {
    /// Needs values from its origin row.
    pub fn carries(&self) -> bool {
        self.values.contains(&Value::Unchanged)
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MirrorPlan {
    pub truncate: bool,
    pub removes: Vec<Remove>,
    pub upserts: Vec<Upsert>,
    /// Updates and deletes that named no row (no replica identity): the changelog has them, the
    /// mirror cannot apply them.
    pub unidentified: usize,
}

impl MirrorPlan {
    /// Nothing reaches back into the mirror: its rows can simply be appended.
    pub fn is_append(&self) -> bool {
        !self.truncate && self.removes.is_empty()
    }
}

/// A row added earlier in the batch, still present.
struct Live {
    upsert: Upsert,
    identity: Identity,
}

/// Plans the changes of `buf` that `applied` does not cover; `None` when nothing is left.
pub fn mirror_plan(buf: &TableBuffer, applied: Applied) -> Option<MirrorPlan> {
    let rows: Vec<&Row> = buf
        .rows
        .iter()
        .filter(|r| !applied.covers(r.commit_lsn, r.seq) && buf.holds(r))
        .collect();
    if rows.is_empty() {
        return None;
    }
    let start = rows
        .iter()
        .rposition(|r| r.change.kind == ChangeKind::Truncate)
        .map(|i| i + 1);
    let mut planner = Planner::new(&buf.relation);
    planner.plan.truncate = start.is_some();
    for row in &rows[start.unwrap_or(0)..] {
        planner.push(row);
    }
    Some(planner.finish())
}

struct Planner<'a> {
    rel: &'a Relation,
    plan: MirrorPlan,
    live: Vec<Option<Live>>,
    /// Live rows by (identity, identity values); several for identical keyless rows.
    index: HashMap<(Identity, Vec<Value>), Vec<usize>>,
    /// How many live rows each identity has (a row is looked for under another identity only
    /// when some live row has one: the replica identity changed inside the batch).
    identities: HashMap<Identity, usize>,
    /// The identity of the last relation description seen, and its column map.
    cache: Option<(*const Relation, Identity, Vec<Option<usize>>)>,
}

impl<'a> Planner<'a> {
    fn new(rel: &'a Relation) -> Self {
        Planner {
            rel,
            plan: MirrorPlan::default(),
            live: Vec::new(),
            index: HashMap::new(),
            identities: HashMap::new(),
            cache: None,
        }
    }

    /// The identity of `row`'s relation description, in batch-relation column indices, and the
    /// row's tuples mapped onto the batch relation's columns.
    fn describe(&mut self, row: &Row) -> (Identity, Vec<Option<usize>>) {
        let src = &row.change.relation;
        let ptr = Arc::as_ptr(src);
        if self.cache.as_ref().map(|c| c.0) != Some(ptr) {
            let map = column_map(src, self.rel);
            let identity: Identity = (0..self.rel.columns.len())
                .filter(|&i| map[i].is_some_and(|j| src.columns[j].key))
                .collect();
            self.cache = Some((ptr, identity, map));
        }
        let (_, identity, map) = self.cache.as_ref().expect("set above");
        (identity.clone(), map.clone())
    }

    fn push(&mut self, row: &Row) {
        let (identity, map) = self.describe(row);
        let project = |t: &Tuple| -> Vec<Value> {
            map.iter()
                .map(|j| j.and_then(|j| t.0.get(j).cloned()).unwrap_or(Value::Null))
                .collect()
        };
        let (lsn, ts) = (row.commit_lsn, row.commit_ts_us);
        let old = row.change.old.as_ref().map(|(k, t)| (*k, project(t)));
        match row.change.kind {
            ChangeKind::Insert => {
                let Some(new) = row.change.new.as_ref() else {
                    return;
                };
                let upsert = Upsert {
                    values: project(new),
                    origin: None,
                    lsn,
                    commit_ts_us: ts,
                };
                self.add(identity, upsert);
            }
            ChangeKind::Update => {
                let Some(new) = row.change.new.as_ref() else {
                    return;
                };
                let mut values = project(new);
                // Without an old image the identity did not change: the new row names it.
                let target = old.as_ref().map_or(&values, |(_, v)| v);
                let Some(from) = self.take(&identity, target) else {
                    self.plan.unidentified += 1;
                    return;
                };
                if let Some((OldKind::Full, old)) = &old {
                    fill_unchanged(&mut values, old);
                }
                let origin = match from {
                    Found::Live(prev) => {
                        fill_unchanged(&mut values, &prev.values);
                        prev.origin
                    }
                    Found::Mirror(r) => Some(r),
                };
                let upsert = Upsert {
                    values,
                    origin,
                    lsn,
                    commit_ts_us: ts,
                };
                self.add(identity, upsert);
            }
            ChangeKind::Delete => {
                let Some((_, old)) = &old else {
                    self.plan.unidentified += 1;
                    return;
                };
                if self.take(&identity, old).is_none() {
                    self.plan.unidentified += 1;
                }
            }
            ChangeKind::Truncate => {}
        }
    }

    /// Takes the row `values` names out: a live row of the batch when one matches, else a row of
    /// the mirror (a new remove). `None` when the table has no identity.
    fn take(&mut self, identity: &Identity, values: &[Value]) -> Option<Found> {
        if identity.is_empty() {
            return None;
        }
        let key: Vec<Value> = identity.iter().map(|&i| values[i].clone()).collect();
        let lookup = (identity.clone(), key);
        if let Some(at) = self.index.get_mut(&lookup).and_then(|v| v.pop()) {
            return Some(Found::Live(self.kill(at).upsert));
        }
        if let Some(at) = self.scan_other_identity(identity, &lookup.1) {
            let live = self.kill(at);
            self.unindex(at, &live);
            return Some(Found::Live(live.upsert));
        }
        self.plan.removes.push(Remove {
            identity: lookup.0,
            values: lookup.1,
        });
        Some(Found::Mirror(self.plan.removes.len() - 1))
    }

    /// A live row added under another identity (the replica identity changed inside the batch)
    /// whose values match.
    fn scan_other_identity(&self, identity: &Identity, key: &[Value]) -> Option<usize> {
        if self.identities.keys().all(|i| i == identity) {
            return None;
        }
        self.live.iter().rposition(|l| {
            l.as_ref().is_some_and(|l| {
                l.identity != *identity
                    && identity
                        .iter()
                        .zip(key)
                        .all(|(&i, v)| l.upsert.values[i] == *v)
            })
        })
    }

    /// Takes the live row at `at` out of the batch.
    fn kill(&mut self, at: usize) -> Live {
        let live = self.live[at].take().expect("taken rows are live");
        if let Some(n) = self.identities.get_mut(&live.identity) {
            *n -= 1;
            if *n == 0 {
                self.identities.remove(&live.identity);
            }
        }
        live
    }

    fn unindex(&mut self, at: usize, live: &Live) {
        let key: Vec<Value> = live
            .identity
            .iter()
            .map(|&i| live.upsert.values[i].clone())
            .collect();
        if let Some(v) = self.index.get_mut(&(live.identity.clone(), key)) {
            v.retain(|&x| x != at);
        }
    }

    fn add(&mut self, identity: Identity, upsert: Upsert) {
        let at = self.live.len();
        if !identity.is_empty() {
            let key: Vec<Value> = identity.iter().map(|&i| upsert.values[i].clone()).collect();
            self.index
                .entry((identity.clone(), key))
                .or_default()
                .push(at);
        }
        *self.identities.entry(identity.clone()).or_default() += 1;
        self.live.push(Some(Live { upsert, identity }));
    }

    fn finish(self) -> MirrorPlan {
        let mut plan = self.plan;
        plan.upserts = self.live.into_iter().flatten().map(|l| l.upsert).collect();
        if plan.truncate {
            // The mirror's rows are all gone: nothing there to remove or to carry from.
            plan.removes.clear();
            for u in &mut plan.upserts {
                u.origin = None;
            }
        }
        plan
    }
}

enum Found {
    Live(Upsert),
    Mirror(usize),
}

/// Replaces unchanged values in `values` by the ones `from` knows.
fn fill_unchanged(values: &mut [Value], from: &[Value]) {
    for (v, f) in values.iter_mut().zip(from) {
        if *v == Value::Unchanged {
            *v = f.clone();
        }
    }
}

#[cfg(test)]
mod tests;
