//! The key index of a mirror: where each integer identity value sits in the table's data files.
//!
//! Owns, per mirror table whose replica identity is one integer column, a map from data file to
//! its identity values, sorted, with their positions in the file. Data files never change, so an
//! entry, built the first time a change may concern the file (by reading that one column), stays
//! right for as long as the file is in the table; entries of files that left the table are
//! dropped at each use. With it, finding the rows of a batch's removes costs a binary search per
//! wanted value and candidate file, not a read of the files: in proportion to the batch.
//!
//! Memory is bounded by `warehouse.key_index_rows` values over all tables (4 bytes each when
//! they fit in 32 bits, else 8, plus 4 for the position when a file is not in key order); past
//! it, files are matched by reading their identity column as without an index.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};

#[cfg(test)]
use arrow::array::{Array, Int64Array};

/// Values indexed over all tables of the process (the budget is global).
static INDEXED: AtomicUsize = AtomicUsize::new(0);

/// One data file's identity values.
pub struct FileKeys {
    /// Sorted (NULLs left out).
    keys: Keys,
    /// Position in the file of each value of `keys`; `None` when the file is in key order
    /// (position = index).
    positions: Option<Vec<u32>>,
}

/// Sorted values, 4 bytes each when they all fit (an `int` identity), else 8.
enum Keys {
    Narrow(Vec<i32>),
    Wide(Vec<i64>),
}

impl Keys {
    fn new(sorted: Vec<i64>) -> Keys {
        if sorted.first().is_some_and(|&v| v >= i32::MIN as i64)
            && sorted.last().is_some_and(|&v| v <= i32::MAX as i64)
        {
            Keys::Narrow(sorted.into_iter().map(|v| v as i32).collect())
        } else {
            Keys::Wide(sorted)
        }
    }

    fn len(&self) -> usize {
        match self {
            Keys::Narrow(k) => k.len(),
            Keys::Wide(k) => k.len(),
        }
    }

    fn get(&self, i: usize) -> Option<i64> {
        match self {
            Keys::Narrow(k) => k.get(i).map(|&v| v as i64),
            Keys::Wide(k) => k.get(i).copied(),
        }
    }

    /// The index range holding `key`.
    fn find(&self, key: i64) -> std::ops::Range<usize> {
        fn range<T: Ord + Copy>(k: &[T], key: T) -> std::ops::Range<usize> {
            let from = k.partition_point(|&v| v < key);
            from..from + k[from..].partition_point(|&v| v <= key)
        }
        match self {
            Keys::Narrow(k) => match i32::try_from(key) {
                Ok(key) => range(k, key),
                Err(_) => 0..0,
            },
            Keys::Wide(k) => range(k, key),
        }
    }
}

impl FileKeys {
    /// From the file's identity column, in file order.
    #[cfg(test)]
    pub fn build(column: &Int64Array) -> FileKeys {
        let values = column.values().to_vec();
        let nulls = (0..column.len() as u32)
            .filter(|&i| column.is_null(i as usize))
            .collect();
        FileKeys::from_values(values, nulls)
    }

    /// From the file's identity values in file order, `nulls` the positions of NULLs among them
    /// (ascending; their values are ignored). Built in about 16 bytes per value at the peak (a
    /// mirror's compacted files hold millions of rows in no key order).
    pub fn from_values(values: Vec<i64>, nulls: Vec<u32>) -> FileKeys {
        if nulls.is_empty() && values.windows(2).all(|w| w[0] <= w[1]) {
            return FileKeys {
                keys: Keys::new(values),
                positions: None,
            };
        }
        let valid = |i: &u32| nulls.binary_search(i).is_err();
        let narrow = (0..values.len() as u32)
            .filter(valid)
            .all(|i| i32::try_from(values[i as usize]).is_ok());
        if narrow {
            // (key, position) packed into one word, so the sort moves 8 bytes a value.
            let mut packed: Vec<u64> = (0..values.len() as u32)
                .filter(valid)
                .map(|i| ((values[i as usize] as i32 as u32 ^ 1 << 31) as u64) << 32 | i as u64)
                .collect();
            drop(values);
            packed.sort_unstable();
            let keys = packed
                .iter()
                .map(|&p| ((p >> 32) as u32 ^ 1 << 31) as i32)
                .collect();
            let positions = packed.iter().map(|&p| p as u32).collect();
            return FileKeys {
                keys: Keys::Narrow(keys),
                positions: Some(positions),
            };
        }
        let mut order: Vec<u32> = (0..values.len() as u32).filter(valid).collect();
        order.sort_unstable_by_key(|&i| (values[i as usize], i));
        let keys = order.iter().map(|&i| values[i as usize]).collect();
        FileKeys {
            keys: Keys::Wide(keys),
            positions: Some(order),
        }
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    /// Smallest and largest value (none for a file without values).
    pub fn range(&self) -> Option<(i64, i64)> {
        Some((
            self.keys.get(0)?,
            self.keys.get(self.keys.len().checked_sub(1)?)?,
        ))
    }

    /// Positions of `key` in the file, ascending.
    #[cfg(test)]
    fn positions(&self, key: i64) -> Vec<u64> {
        let mut out = Vec::new();
        self.push_positions(key, &mut out);
        out.into_iter().map(|(_, p)| p).collect()
    }

    /// Appends `(key, position)` for each position of `key` in the file, ascending.
    pub fn push_positions(&self, key: i64, out: &mut Vec<(i64, u64)>) {
        let found = self.keys.find(key);
        let from = out.len();
        match &self.positions {
            None => out.extend(found.map(|p| (key, p as u64))),
            Some(p) => {
                out.extend(p[found].iter().map(|&p| (key, p as u64)));
                out[from..].sort_unstable();
            }
        }
    }
}

/// A mirror table's key index.
pub struct KeyIndex {
    /// The identity column the entries hold (a different one empties the index).
    column: Option<String>,
    files: HashMap<String, FileKeys>,
    max_rows: usize,
}

impl KeyIndex {
    pub fn new(max_rows: usize) -> Self {
        KeyIndex {
            column: None,
            files: HashMap::new(),
            max_rows,
        }
    }

    /// Keeps the entries of `column` for the files in `live` only.
    pub fn retain(&mut self, column: &str, live: &HashSet<String>) {
        if self.column.as_deref() != Some(column) {
            self.clear();
            self.column = Some(column.to_string());
        }
        let mut dropped = 0;
        self.files.retain(|path, keys| {
            let keep = live.contains(path);
            if !keep {
                dropped += keys.len();
            }
            keep
        });
        INDEXED.fetch_sub(dropped, Ordering::Relaxed);
    }

    pub fn get(&self, path: &str) -> Option<&FileKeys> {
        self.files.get(path)
    }

    /// Keeps `keys` for `path` when the budget allows; gives them back when it does not.
    pub fn insert(&mut self, path: &str, keys: FileKeys) -> Result<(), FileKeys> {
        let n = keys.len();
        if INDEXED.load(Ordering::Relaxed) + n > self.max_rows {
            return Err(keys);
        }
        INDEXED.fetch_add(n, Ordering::Relaxed);
        if let Some(old) = self.files.insert(path.to_string(), keys) {
            INDEXED.fetch_sub(old.len(), Ordering::Relaxed);
        }
        Ok(())
    }

    fn clear(&mut self) {
        let n: usize = self.files.values().map(FileKeys::len).sum();
        INDEXED.fetch_sub(n, Ordering::Relaxed);
        self.files.clear();
    }
}

impl Drop for KeyIndex {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every value's positions are those a scan of the file finds, NULLs never match.
        #[test]
        fn positions_are_those_a_scan_finds(
            values in proptest::collection::vec(
                prop_oneof![Just(None), (-50i64..50).prop_map(Some),
                    any::<i64>().prop_map(Some)], 0..200),
        ) {
            let keys = FileKeys::build(&Int64Array::from(values.clone()));
            for v in values.iter().flatten() {
                let scan: Vec<u64> = values
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| **x == Some(*v))
                    .map(|(i, _)| i as u64)
                    .collect();
                prop_assert_eq!(keys.positions(*v), scan);
            }
            let valid: Vec<i64> = values.iter().flatten().copied().collect();
            let range = valid.iter().min().zip(valid.iter().max()).map(|(a, b)| (*a, *b));
            prop_assert_eq!(keys.range(), range);
        }
    }

    #[test]
    fn positions_in_sorted_and_unsorted_files() {
        let sorted = FileKeys::build(&Int64Array::from(vec![1, 3, 3, 7]));
        assert!(sorted.positions.is_none());
        assert_eq!(sorted.positions(3), [1, 2]);
        assert_eq!(sorted.positions(4), Vec::<u64>::new());
        assert_eq!(sorted.range(), Some((1, 7)));
        let wide = FileKeys::build(&Int64Array::from(vec![1 << 40, 1, 1 << 40]));
        assert!(matches!(wide.keys, Keys::Wide(_)));
        assert_eq!(wide.positions(1 << 40), [0, 2]);
        assert_eq!(wide.positions(1), [1]);
        let negative = FileKeys::build(&Int64Array::from(vec![5, -3, i32::MIN as i64, 5]));
        assert!(matches!(negative.keys, Keys::Narrow(_)));
        assert_eq!(negative.positions(-3), [1]);
        assert_eq!(negative.positions(i32::MIN as i64), [2]);
        assert_eq!(negative.positions(5), [0, 3]);
        assert_eq!(negative.range(), Some((i32::MIN as i64, 5)));
        assert_eq!(sorted.positions(1 << 40), Vec::<u64>::new());
        let mixed = FileKeys::build(&Int64Array::from(vec![Some(9), None, Some(2), Some(9)]));
        assert_eq!(mixed.positions(9), [0, 3]);
        assert_eq!(mixed.positions(2), [2]);
        assert_eq!(mixed.range(), Some((2, 9)));
    }
}
