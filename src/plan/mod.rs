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

/// Plans the changes of `buf` that `applied` does not cover; `None` when nothing is left. The
/// rows are moved into the plan (their values are not copied): `buf` is left without rows.
pub fn mirror_plan(buf: &mut TableBuffer, applied: Applied) -> Option<MirrorPlan> {
    let generation = buf.generation;
    let mut rows: Vec<Row> = std::mem::take(&mut buf.rows);
    rows.retain(|r| {
        !applied.covers(r.commit_lsn, r.seq)
            && generation.is_none_or(|g| r.change.relation.oid == g)
    });
    let start = rows
        .iter()
        .rposition(|r| r.change.kind == ChangeKind::Truncate)
        .map(|i| i + 1);
    if rows.is_empty() {
        return None;
    }
    let mut planner = Planner::new(&buf.relation, rows.len());
    planner.plan.truncate = start.is_some();
    for row in rows.into_iter().skip(start.unwrap_or(0)) {
        planner.push(row);
    }
    Some(planner.finish())
}

/// Where each of the batch relation's columns is in a row's tuples (see [`column_map`]).
type ColumnMap = Arc<[Option<usize>]>;

/// Each batch column is the tuple's column at the same place.
fn is_identity(map: &[Option<usize>]) -> bool {
    map.iter().enumerate().all(|(i, j)| *j == Some(i))
}

/// Hash of an identity and its values (the live-row index's key; never stored).
fn key_hash(hasher: &foldhash::fast::RandomState, identity: &[usize], values: &[Value]) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = hasher.build_hasher();
    identity.hash(&mut h);
    for &i in identity {
        values[i].hash(&mut h);
    }
    h.finish()
}

struct Planner<'a> {
    rel: &'a Relation,
    plan: MirrorPlan,
    live: Vec<Option<Live>>,
    /// Positions in `live` of the live rows with an identity, found by [`key_hash`] of their
    /// identity values; several for identical keyless rows.
    index: hashbrown::HashTable<usize>,
    hasher: foldhash::fast::RandomState,
    /// How many live rows each identity has (a row is looked for under another identity only
    /// when some live row has one: the replica identity changed inside the batch). Few entries.
    identities: Vec<(Identity, usize)>,
    /// The identity of the last relation description seen, and its column map.
    cache: Option<(*const Relation, Identity, ColumnMap)>,
}

impl<'a> Planner<'a> {
    fn new(rel: &'a Relation, rows: usize) -> Self {
        Planner {
            rel,
            plan: MirrorPlan::default(),
            live: Vec::with_capacity(rows),
            index: hashbrown::HashTable::with_capacity(rows),
            hasher: foldhash::fast::RandomState::default(),
            identities: Vec::new(),
            cache: None,
        }
    }

    /// The identity of `row`'s relation description, in batch-relation column indices, and the
    /// row's tuples mapped onto the batch relation's columns.
    fn describe(&mut self, row: &Row) -> (Identity, ColumnMap) {
        let src = &row.change.relation;
        let ptr = Arc::as_ptr(src);
        if self.cache.as_ref().map(|c| c.0) != Some(ptr) {
            let map = column_map(src, self.rel);
            let identity: Identity = (0..self.rel.columns.len())
                .filter(|&i| map[i].is_some_and(|j| src.columns[j].key))
                .collect();
            self.cache = Some((ptr, identity, map.into()));
        }
        let (_, identity, map) = self.cache.as_ref().expect("set above");
        (identity.clone(), map.clone())
    }

    fn push(&mut self, row: Row) {
        let (identity, map) = self.describe(&row);
        // Each source column maps to at most one batch column: its value is moved, not copied.
        // A tuple of the batch relation's own description is taken as it is.
        let same = is_identity(&map);
        let project = |t: Tuple| -> Vec<Value> {
            let mut t = t.0;
            if same && t.len() == map.len() {
                return t;
            }
            map.iter()
                .map(|j| {
                    j.and_then(|j| t.get_mut(j).map(|v| std::mem::replace(v, Value::Null)))
                        .unwrap_or(Value::Null)
                })
                .collect()
        };
        let (lsn, ts) = (row.commit_lsn, row.commit_ts_us);
        let change = row.change;
        let old = change.old.map(|(k, t)| (k, project(t)));
        match change.kind {
            ChangeKind::Insert => {
                let Some(new) = change.new else {
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
                let Some(new) = change.new else {
                    return;
                };
                let mut values = project(new);
                // Without an old image the identity did not change: the new row names it.
                let target = old.as_ref().map_or(&values, |(_, v)| v);
                let Some(from) = self.take(&identity, target) else {
                    self.plan.unidentified += 1;
                    return;
                };
                if let Some((OldKind::Full, old)) = old {
                    fill_unchanged(&mut values, old);
                }
                let origin = match from {
                    Found::Live(prev) => {
                        fill_unchanged(&mut values, prev.values);
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

    /// Takes the row `values` names out: a live row of the batch when one matches (the one
    /// added last), else a row of the mirror (a new remove). `None` when the table has no
    /// identity.
    fn take(&mut self, identity: &Identity, values: &[Value]) -> Option<Found> {
        if identity.is_empty() {
            return None;
        }
        let hash = key_hash(&self.hasher, identity, values);
        let live = &self.live;
        let same = |at: &usize| {
            live[*at].as_ref().is_some_and(|l| {
                l.identity == *identity && identity.iter().all(|&i| l.upsert.values[i] == values[i])
            })
        };
        let newest = self.index.iter_hash(hash).copied().filter(same).max();
        if let Some(at) = newest {
            self.unindex(hash, at);
            return Some(Found::Live(self.kill(at).upsert));
        }
        if let Some(at) = self.scan_other_identity(identity, values) {
            let live = self.kill(at);
            let hash = key_hash(&self.hasher, &live.identity, &live.upsert.values);
            self.unindex(hash, at);
            return Some(Found::Live(live.upsert));
        }
        self.plan.removes.push(Remove {
            identity: identity.clone(),
            values: identity.iter().map(|&i| values[i].clone()).collect(),
        });
        Some(Found::Mirror(self.plan.removes.len() - 1))
    }

    /// A live row added under another identity (the replica identity changed inside the batch)
    /// whose values match `values` on `identity`'s columns.
    fn scan_other_identity(&self, identity: &Identity, values: &[Value]) -> Option<usize> {
        if self.identities.iter().all(|(i, _)| i == identity) {
            return None;
        }
        self.live.iter().rposition(|l| {
            l.as_ref().is_some_and(|l| {
                l.identity != *identity && identity.iter().all(|&i| l.upsert.values[i] == values[i])
            })
        })
    }

    /// Takes the live row at `at` out of the batch.
    fn kill(&mut self, at: usize) -> Live {
        let live = self.live[at].take().expect("taken rows are live");
        if let Some(p) = self
            .identities
            .iter()
            .position(|(i, _)| *i == live.identity)
        {
            self.identities[p].1 -= 1;
            if self.identities[p].1 == 0 {
                self.identities.swap_remove(p);
            }
        }
        live
    }

    /// Drops position `at` (hashed `hash`) from the index.
    fn unindex(&mut self, hash: u64, at: usize) {
        if let Ok(entry) = self.index.find_entry(hash, |&x| x == at) {
            entry.remove();
        }
    }

    fn add(&mut self, identity: Identity, upsert: Upsert) {
        let at = self.live.len();
        if !identity.is_empty() {
            let hash = key_hash(&self.hasher, &identity, &upsert.values);
            let (live, hasher) = (&self.live, &self.hasher);
            self.index.insert_unique(hash, at, |&x| {
                let l = live[x].as_ref().expect("indexed rows are live");
                key_hash(hasher, &l.identity, &l.upsert.values)
            });
        }
        match self.identities.iter_mut().find(|(i, _)| *i == identity) {
            Some((_, n)) => *n += 1,
            None => self.identities.push((identity.clone(), 1)),
        }
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
fn fill_unchanged(values: &mut [Value], from: Vec<Value>) {
    for (v, f) in values.iter_mut().zip(from) {
        if *v == Value::Unchanged {
            *v = f;
        }
    }
}

#[cfg(test)]
mod tests;
