//! Finding the mirror rows a plan removes: by identity, with NULL-safe equality, one row per
//! remove.
//!
//! Removes are grouped by identity; each group's values are encoded with Arrow's row format, in
//! which equal values (NULL included) have equal bytes: NULL-safe equality for every type. A
//! file whose statistics on an integer identity column rule all wanted values out is skipped.
//! Identical rows of a keyless table are wanted once per remove: each remove takes one row.

use std::collections::HashMap;
use std::hash::BuildHasher;

use arrow::array::{Array, ArrayRef, Int64Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::row::{Row, RowConverter, Rows, SortField};

use crate::decode::pgoutput::Relation;
use crate::plan::Remove;

/// One identity's wanted rows.
struct Group {
    /// Column indices in the target schema.
    columns: Vec<usize>,
    converter: RowConverter,
    wanted: Wanted,
    /// Sorted values of the first identity column when it is an integer (file pruning).
    ints: Option<(String, Vec<i64>)>,
    /// When the identity is one integer column and no remove names a NULL: the removes still
    /// looking for a row, by value (a stack per value). Rows are then matched on the integer
    /// itself, without the row encoding.
    by_int: Option<IntWanted>,
}

impl Group {
    fn is_done(&self) -> bool {
        match &self.by_int {
            Some(m) => m.is_empty(),
            None => self.wanted.is_empty(),
        }
    }
}

/// The removes wanting each integer identity value: a stack per value (several for identical
/// keyless rows), kept as the top remove per value and a link down, so no value costs an
/// allocation of its own.
#[derive(Default)]
struct IntWanted {
    /// value → the remove on top of its stack
    heads: hashbrown::HashMap<i64, usize, foldhash::fast::RandomState>,
    /// the next remove down the stack, by remove index (only values wanted more than once)
    below: hashbrown::HashMap<usize, usize, foldhash::fast::RandomState>,
}

impl IntWanted {
    fn with_capacity(n: usize) -> Self {
        IntWanted {
            heads: hashbrown::HashMap::with_capacity_and_hasher(n, Default::default()),
            below: Default::default(),
        }
    }

    fn push(&mut self, key: i64, remove: usize) {
        if let Some(top) = self.heads.insert(key, remove) {
            self.below.insert(remove, top);
        }
    }

    /// Takes the remove waiting for `key`, if any (the last one queued).
    fn pop(&mut self, key: i64) -> Option<usize> {
        let top = self.heads.get_mut(&key)?;
        let remove = *top;
        match self.below.remove(&remove) {
            Some(next) => *top = next,
            None => {
                self.heads.remove(&key);
            }
        }
        Some(remove)
    }

    fn contains(&self, key: i64) -> bool {
        self.heads.contains_key(&key)
    }

    fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }
}

/// The encoded identities of one group's removes, each distinct one a stack of the removes
/// still looking for a row with it (several for identical keyless rows). Keys are hashed once
/// and stored once (in `rows`).
struct Wanted {
    rows: Rows,
    /// Remove index of each encoded identity in `rows`.
    members: Vec<usize>,
    hasher: foldhash::fast::RandomState,
    /// (an encoded identity's position in `rows`, the top of its stack), per distinct identity.
    heads: hashbrown::HashTable<(usize, usize)>,
    /// The next entry down the stack, per position in `rows`.
    below: Vec<Option<usize>>,
}

impl Wanted {
    fn new(rows: Rows, members: Vec<usize>) -> Self {
        let hasher = foldhash::fast::RandomState::default();
        let mut heads: hashbrown::HashTable<(usize, usize)> =
            hashbrown::HashTable::with_capacity(members.len());
        let mut below = vec![None; members.len()];
        for (i, below_i) in below.iter_mut().enumerate() {
            let row = rows.row(i);
            let hash = hasher.hash_one(row.as_ref());
            match heads.find_mut(hash, |&(at, _)| rows.row(at) == row) {
                Some(head) => {
                    *below_i = Some(head.1);
                    head.1 = i;
                }
                None => {
                    heads.insert_unique(hash, (i, i), |&(at, _)| {
                        hasher.hash_one(rows.row(at).as_ref())
                    });
                }
            }
        }
        Wanted {
            rows,
            members,
            hasher,
            heads,
            below,
        }
    }

    fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    /// Takes the remove that wants `row` (the last one queued), if any.
    fn take(&mut self, row: Row<'_>) -> Option<usize> {
        let hash = self.hasher.hash_one(row.as_ref());
        let rows = &self.rows;
        let mut entry = self
            .heads
            .find_entry(hash, |&(at, _)| rows.row(at) == row)
            .ok()?;
        let top = entry.get().1;
        match self.below[top] {
            Some(next) => entry.get_mut().1 = next,
            None => {
                entry.remove();
            }
        }
        Some(self.members[top])
    }
}

pub struct Matcher {
    groups: Vec<Group>,
    /// Removes that have not found their row yet.
    pub pending: usize,
}

impl Matcher {
    pub fn new(
        rel: &Relation,
        removes: &[Remove],
        target: &SchemaRef,
    ) -> Result<Self, arrow::error::ArrowError> {
        let mut by_identity: HashMap<&[usize], Vec<usize>> = HashMap::new();
        for (i, r) in removes.iter().enumerate() {
            by_identity.entry(&r.identity).or_default().push(i);
        }
        let mut groups = Vec::new();
        for (identity, members) in by_identity {
            let columns = identity
                .iter()
                .map(|&c| target.index_of(&rel.columns[c].name))
                .collect::<Result<Vec<_>, _>>()?;
            let types: Vec<DataType> = columns
                .iter()
                .map(|&c| target.field(c).data_type().clone())
                .collect();
            let converter =
                RowConverter::new(types.iter().map(|t| SortField::new(t.clone())).collect())?;
            let mut builders: Vec<_> = identity
                .iter()
                .map(|&c| crate::decode::types::column_builder(&rel.columns[c], members.len()))
                .collect();
            for &m in &members {
                for (b, v) in builders.iter_mut().zip(&removes[m].values) {
                    b.append(v);
                }
            }
            let arrays = builders
                .into_iter()
                .zip(&types)
                .map(|(b, t)| {
                    let a = b.finish();
                    if a.data_type() == t {
                        Ok(a)
                    } else {
                        cast(&a, t)
                    }
                })
                .collect::<Result<Vec<ArrayRef>, _>>()?;
            let ints = int_values(&arrays[0]).map(|mut v| {
                v.sort_unstable();
                (target.field(columns[0]).name().clone(), v)
            });
            let by_int = match (&ints, columns.len()) {
                (Some((_, values)), 1) if values.len() == members.len() => {
                    let a = cast(&arrays[0], &DataType::Int64)?;
                    let a = a
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .expect("cast to i64");
                    let mut m = IntWanted::with_capacity(members.len());
                    for (k, &member) in a.values().iter().zip(&members) {
                        m.push(*k, member);
                    }
                    Some(m)
                }
                _ => None,
            };
            // Matched on the integer itself: no encoded identities needed.
            let wanted = match by_int {
                Some(_) => Wanted::new(converter.empty_rows(0, 0), Vec::new()),
                None => Wanted::new(converter.convert_columns(&arrays)?, members),
            };
            groups.push(Group {
                columns,
                converter,
                wanted,
                ints,
                by_int,
            });
        }
        Ok(Matcher {
            groups,
            pending: removes.len(),
        })
    }

    /// The target schema's columns the identities are made of (all groups').
    pub fn columns(&self) -> Vec<usize> {
        let mut out: Vec<usize> = self.groups.iter().flat_map(|g| g.columns.clone()).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether a file with these statistics can hold a wanted row.
    pub fn may_hold(&self, stats: Option<&str>) -> bool {
        let Some(stats) = stats.and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        else {
            return true;
        };
        self.groups.iter().any(|g| match &g.ints {
            Some((col, values)) => {
                let (Some(min), Some(max)) = (
                    stats["minValues"][col].as_i64(),
                    stats["maxValues"][col].as_i64(),
                ) else {
                    return true;
                };
                let at = values.partition_point(|&v| v < min);
                values.get(at).is_some_and(|&v| v <= max)
            }
            None => true,
        })
    }

    /// The target column of the identity when every remove names its row by one integer value
    /// (the key index's case).
    pub fn int_identity(&self) -> Option<usize> {
        match self.groups.as_slice() {
            [g] if g.by_int.is_some() => Some(g.columns[0]),
            _ => None,
        }
    }

    /// The integer values still wanted between `min` and `max` (inclusive), ascending.
    pub fn pending_ints(&self, min: i64, max: i64) -> Vec<i64> {
        let Some(g) = self.groups.first() else {
            return Vec::new();
        };
        let (Some((_, sorted)), Some(by_int)) = (&g.ints, &g.by_int) else {
            return Vec::new();
        };
        let from = sorted.partition_point(|&v| v < min);
        let mut out: Vec<i64> = sorted[from..]
            .iter()
            .take_while(|&&v| v <= max)
            .filter(|&&v| by_int.contains(v))
            .copied()
            .collect();
        out.dedup();
        out
    }

    /// Takes the remove waiting for the integer identity `key`, if any.
    pub fn take_int(&mut self, key: i64) -> Option<usize> {
        let by_int = self.groups.first_mut()?.by_int.as_mut()?;
        let remove = by_int.pop(key)?;
        self.pending -= 1;
        Some(remove)
    }

    /// Takes the wanted rows out of `batch` (aligned to the target schema; only the identity
    /// columns are looked at), among the rows `live` admits: one row per remove. Returns the
    /// rows taken, each with the remove it answers.
    pub fn take(
        &mut self,
        batch: &RecordBatch,
        live: impl Fn(usize) -> bool,
    ) -> Result<Vec<(usize, usize)>, arrow::error::ArrowError> {
        let mut taken: Vec<(usize, usize)> = Vec::new();
        let mut gone: Option<Vec<bool>> = None;
        for g in &mut self.groups {
            if g.is_done() {
                continue;
            }
            if let Some(by_int) = &mut g.by_int {
                let a = cast(batch.column(g.columns[0]), &DataType::Int64)?;
                let a = a
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("cast to i64");
                for i in 0..a.len() {
                    if a.is_null(i) || gone.as_ref().is_some_and(|k| k[i]) || !live(i) {
                        continue;
                    }
                    let Some(remove) = by_int.pop(a.value(i)) else {
                        continue;
                    };
                    self.pending -= 1;
                    gone.get_or_insert_with(|| vec![false; batch.num_rows()])[i] = true;
                    taken.push((i, remove));
                }
                continue;
            }
            let arrays: Vec<ArrayRef> =
                g.columns.iter().map(|&c| batch.column(c).clone()).collect();
            let rows = g.converter.convert_columns(&arrays)?;
            for (i, row) in rows.iter().enumerate() {
                if gone.as_ref().is_some_and(|k| k[i]) || !live(i) {
                    continue;
                }
                let Some(remove) = g.wanted.take(row) else {
                    continue;
                };
                self.pending -= 1;
                gone.get_or_insert_with(|| vec![false; batch.num_rows()])[i] = true;
                taken.push((i, remove));
            }
        }
        Ok(taken)
    }
}

/// The values of an integer column as i64.
fn int_values(a: &ArrayRef) -> Option<Vec<i64>> {
    let a = match a.data_type() {
        DataType::Int16 | DataType::Int32 | DataType::Int64 => cast(a, &DataType::Int64).ok()?,
        _ => return None,
    };
    let a = a.as_any().downcast_ref::<Int64Array>()?;
    Some(a.iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_of_one_integer_value_are_taken_one_each_last_first() {
        let mut w = IntWanted::with_capacity(4);
        for (key, remove) in [(5, 0), (7, 1), (5, 2), (5, 3)] {
            w.push(key, remove);
        }
        assert!(w.contains(5) && w.contains(7) && !w.contains(6));
        assert_eq!(
            [w.pop(5), w.pop(5), w.pop(5), w.pop(5)],
            [Some(3), Some(2), Some(0), None]
        );
        assert!(!w.contains(5));
        assert_eq!((w.pop(7), w.pop(7)), (Some(1), None));
        assert!(w.is_empty());
    }
}
