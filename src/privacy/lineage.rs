//! The keys a deleted row went by: its deletes, and the key changes that lead back from each to
//! the row's earlier keys.
//!
//! Owns reading, from a table's changelog, where rows were deleted (by replica identity) and
//! where updates moved rows from one key to another (`_walden_old_key`), and walking a deleted
//! row back through its moves: the row deleted under key K at position D entered K at the latest
//! move into K before D, provided K was neither deleted nor left between that move and D (a key
//! holds one row at a time, so an insert of K in between would need one of them first). Each
//! earlier key comes with the position where the row left it: its versions under that key are
//! the ones up to there; a row that later took the same key is newer and not followed.

use std::collections::HashMap;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type};
use deltalake::DeltaTable;

use super::PrivacyError;
use crate::apply::inspect;
use crate::batch::{COMMIT_TS, LSN, OLD_KEY, OP, SEQ};
use crate::source::replication::quote_ident;

/// A row's replica identity, each column's value as text.
pub type Key = Vec<String>;
/// A change's place in the stream: (commit LSN, sequence in its transaction).
pub type Pos = (i64, i64);

/// A table's deletes and key changes up to an LSN.
#[derive(Debug, Default)]
pub struct Lineage {
    /// Positions of each key's deletes.
    pub deletes: HashMap<Key, Vec<Pos>>,
    /// Commit time of each delete read (µs since the epoch).
    pub delete_times: Vec<i64>,
    /// By new key: where rows moved to it, and from which key.
    into: HashMap<Key, Vec<(Pos, Key)>>,
    /// By old key: where rows left it.
    out_of: HashMap<Key, Vec<Pos>>,
}

impl Lineage {
    /// Reads the deletes and key changes of `changes` (a changelog whose replica identity is
    /// `columns`) committed at or below `upto`. (Deletes erased earlier left with every version
    /// of their keys before them, moves into those keys included: they cannot matter to the
    /// walk back from a later delete.)
    pub async fn read(
        changes: &DeltaTable,
        columns: &[String],
        upto: i64,
    ) -> Result<Lineage, PrivacyError> {
        let keys: Vec<String> = columns
            .iter()
            .map(|c| format!("CAST({} AS VARCHAR)", quote_ident(c)))
            .collect();
        let keys = keys.join(", ");
        let mut lineage = Lineage::default();
        let sql = format!(
            "SELECT {keys}, {LSN}, {SEQ}, CAST(CAST({COMMIT_TS} AS BIGINT) AS VARCHAR) FROM t \
             WHERE {LSN} <= {upto} AND {OP} = 'delete'"
        );
        for (key, at, ts) in keyed(&query(changes, &sql).await?, columns.len()).map_err(arrow)? {
            lineage.deletes.entry(key).or_default().push(at);
            lineage
                .delete_times
                .extend(ts.and_then(|t| t.parse::<i64>().ok()));
        }
        let has_moves = changes
            .snapshot()
            .is_ok_and(|s| s.snapshot().arrow_schema().field_with_name(OLD_KEY).is_ok());
        if has_moves {
            let sql = format!(
                "SELECT {keys}, {LSN}, {SEQ}, {OLD_KEY} FROM t \
                 WHERE {OP} = 'update' AND {OLD_KEY} IS NOT NULL AND {LSN} <= {upto}"
            );
            for (new, at, old) in
                keyed(&query(changes, &sql).await?, columns.len()).map_err(arrow)?
            {
                let Some(old) = old.and_then(|o| old_key(&o, columns)) else {
                    continue;
                };
                lineage.moved(new, at, old);
            }
        }
        Ok(lineage)
    }

    /// Records that the row under `old` moved to `new` at `at`.
    pub fn moved(&mut self, new: Key, at: Pos, old: Key) {
        self.out_of.entry(old.clone()).or_default().push(at);
        self.into.entry(new).or_default().push((at, old));
    }

    /// The keys the row deleted under `key` at `at` had before, each with the position where
    /// the row left it.
    pub fn earlier(&self, key: &Key, at: Pos) -> Vec<(Key, Pos)> {
        let mut out = Vec::new();
        let (mut key, mut at) = (key.clone(), at);
        let between = |ps: Option<&Vec<Pos>>, from: Pos, to: Pos| {
            ps.is_some_and(|ps| ps.iter().any(|&p| from < p && p < to))
        };
        // Each step goes strictly back in the stream: at most one step per move.
        for _ in 0..self.out_of.values().map(Vec::len).sum::<usize>() {
            let Some((entered, from)) = self
                .into
                .get(&key)
                .and_then(|m| m.iter().filter(|(p, _)| *p < at).max_by_key(|(p, _)| *p))
            else {
                break;
            };
            if between(self.deletes.get(&key), *entered, at)
                || between(self.out_of.get(&key), *entered, at)
            {
                break;
            }
            out.push((from.clone(), *entered));
            (key, at) = (from.clone(), *entered);
        }
        out
    }
}

fn arrow(e: arrow::error::ArrowError) -> PrivacyError {
    PrivacyError::Query(e.to_string())
}

async fn query(t: &DeltaTable, sql: &str) -> Result<Vec<RecordBatch>, PrivacyError> {
    inspect::query(t, sql)
        .await
        .map_err(|e| PrivacyError::Query(e.to_string()))
}

/// Rows of `batches` (`n` key columns, LSN, sequence, one more column read as text): key,
/// position and that text; rows with a NULL key column are left out.
fn keyed(
    batches: &[RecordBatch],
    n: usize,
) -> Result<Vec<(Key, Pos, Option<String>)>, arrow::error::ArrowError> {
    let cast = arrow::compute::cast;
    let mut out = Vec::new();
    for b in batches {
        let text = (0..n)
            .chain([n + 2])
            .map(|c| cast(b.column(c), &DataType::Utf8))
            .collect::<Result<Vec<_>, _>>()?;
        let text: Vec<_> = text.iter().map(|t| t.as_string::<i32>()).collect();
        let (keys, extra) = (&text[..n], text[n]);
        let lsn = cast(b.column(n), &DataType::Int64)?;
        let seq = cast(b.column(n + 1), &DataType::Int64)?;
        let (lsn, seq) = (
            lsn.as_primitive::<Int64Type>(),
            seq.as_primitive::<Int64Type>(),
        );
        for i in (0..b.num_rows()).filter(|&i| keys.iter().all(|t| t.is_valid(i))) {
            let key = keys.iter().map(|t| t.value(i).to_string()).collect();
            let extra = extra.is_valid(i).then(|| extra.value(i).to_string());
            out.push((key, (lsn.value(i), seq.value(i)), extra));
        }
    }
    Ok(out)
}

/// The key `columns` of an `_walden_old_key` object; `None` when one is missing or NULL (the
/// identity had other columns then).
fn old_key(json: &str, columns: &[String]) -> Option<Key> {
    let serde_json::Value::Object(m) = serde_json::from_str(json).ok()? else {
        return None;
    };
    columns
        .iter()
        .map(|c| m.get(c).and_then(|v| v.as_str()).map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> Key {
        vec![s.to_string()]
    }

    #[test]
    fn a_deleted_row_is_followed_back_through_its_key_changes() {
        let mut l = Lineage::default();
        // Row A: 1 → 2 at (10,0), 2 → 3 at (20,0), deleted as 3 at (30,0).
        l.moved(k("2"), (10, 0), k("1"));
        l.moved(k("3"), (20, 0), k("2"));
        l.deletes.insert(k("3"), vec![(30, 0)]);
        assert_eq!(
            l.earlier(&k("3"), (30, 0)),
            vec![(k("2"), (20, 0)), (k("1"), (10, 0))]
        );
        // Row B moved 5 → 6 at (40,0) and lives on; row C inserted as 5 afterwards, deleted at
        // (50,0): C never had another key.
        l.moved(k("6"), (40, 0), k("5"));
        l.deletes.insert(k("5"), vec![(50, 0)]);
        assert!(l.earlier(&k("5"), (50, 0)).is_empty());
        // Row D moved 7 → 8 at (60,0), then moved on 8 → 9 at (70,0); row E inserted as 8 and
        // deleted at (80,0) is not D.
        l.moved(k("8"), (60, 0), k("7"));
        l.moved(k("9"), (70, 0), k("8"));
        assert!(l.earlier(&k("8"), (80, 0)).is_empty());
        // …and D, deleted as 9, is followed to 8 and 7.
        assert_eq!(
            l.earlier(&k("9"), (90, 0)),
            vec![(k("8"), (70, 0)), (k("7"), (60, 0))]
        );
        // A key deleted and inserted again before its row's delete: the earlier delete ends
        // the walk.
        l.moved(k("11"), (100, 0), k("10"));
        l.deletes.insert(k("11"), vec![(110, 0), (120, 0)]);
        assert_eq!(l.earlier(&k("11"), (110, 0)), vec![(k("10"), (100, 0))]);
        assert!(l.earlier(&k("11"), (120, 0)).is_empty());
        // Swaps (1 → 2 and 2 → 1 back) end: each step goes back in the stream.
        let mut s = Lineage::default();
        s.moved(k("b"), (1, 0), k("a"));
        s.moved(k("a"), (2, 0), k("b"));
        assert_eq!(
            s.earlier(&k("a"), (3, 0)),
            vec![(k("b"), (2, 0)), (k("a"), (1, 0))]
        );
    }

    #[test]
    fn an_old_key_reads_its_columns() {
        let cols = vec!["a".to_string(), "b".to_string()];
        assert_eq!(
            old_key(r#"{"a":"1","b":"x"}"#, &cols),
            Some(vec!["1".into(), "x".into()])
        );
        assert_eq!(old_key(r#"{"a":"1"}"#, &cols), None);
        assert_eq!(old_key(r#"{"a":"1","b":null}"#, &cols), None);
        assert_eq!(old_key("not json", &cols), None);
    }
}
