//! Which rows of a table an erasure (or a search for what is left) is after.
//!
//! Owns the two kinds of personal rows the privacy layer takes out of the warehouse:
//!
//! - a **subject's rows**: the subject column (as text, as the table stores it: hashed when the
//!   column is) holds one of the identifiers;
//! - **versions of deleted rows**: the row's replica identity (as text) is a key that a delete
//!   at the source removed, and the version was written before that delete. A changelog row
//!   is compared by `(commit LSN, sequence)` with the delete's own (the delete row itself
//!   included); a mirror row by commit LSN alone, strictly before the delete's. A row inserted
//!   again under the same key after its delete is newer, and stays.

use std::collections::{HashMap, HashSet};

use arrow::array::{Array, AsArray, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::DataType;

use crate::batch::{LSN, SEQ};

/// Rows of one table.
#[derive(Debug, Clone)]
pub enum Selector {
    /// Rows whose `column`, as text, is one of `values` (as the table stores them).
    Subject {
        column: String,
        values: HashSet<String>,
    },
    /// Versions of deleted rows: by the identity `columns`' values as text, the `(commit LSN,
    /// sequence)` of the row's last delete.
    Deleted {
        columns: Vec<String>,
        deletes: HashMap<Vec<String>, (i64, i64)>,
    },
}

impl Selector {
    /// The root columns a file must be read for to tell its selected rows.
    pub fn columns(&self) -> Vec<&str> {
        match self {
            Selector::Subject { column, .. } => vec![column.as_str()],
            Selector::Deleted { columns, .. } => columns
                .iter()
                .map(String::as_str)
                .chain([LSN, SEQ])
                .collect(),
        }
    }

    /// The selected rows of `batch`; `None` when the batch lacks the columns to tell (it holds
    /// none of them).
    pub fn hits(&self, batch: &RecordBatch) -> Option<BooleanArray> {
        match self {
            Selector::Subject { column, values } => {
                let text = text_of(batch, column)?;
                Some(
                    text.iter()
                        .map(|v| Some(v.is_some_and(|v| values.contains(v))))
                        .collect(),
                )
            }
            Selector::Deleted { columns, deletes } => {
                let keys = columns
                    .iter()
                    .map(|c| text_of(batch, c))
                    .collect::<Option<Vec<_>>>()?;
                let lsn = int_of(batch, LSN)?;
                // Mirror rows carry no sequence: only versions of earlier transactions.
                let seq = int_of(batch, SEQ);
                let mut key = Vec::with_capacity(keys.len());
                let hits = (0..batch.num_rows()).map(|i| {
                    key.clear();
                    for k in &keys {
                        if k.is_null(i) {
                            return Some(false);
                        }
                        key.push(k.value(i).to_string());
                    }
                    let Some(&(at, at_seq)) = deletes.get(&key) else {
                        return Some(false);
                    };
                    let row = lsn.value(i);
                    Some(match &seq {
                        Some(seq) => (row, seq.value(i)) <= (at, at_seq),
                        None => row < at,
                    })
                });
                Some(hits.collect())
            }
        }
    }

    /// Whether Delta column statistics (`minValues`/`maxValues` of one file) hold a selected
    /// value: a subject's identifier as the min or max of its column. (Statistics of files
    /// holding a deleted row's versions are found through the files themselves.)
    pub fn stats_hold(&self, stats: &serde_json::Value) -> bool {
        let Selector::Subject { column, values } = self else {
            return false;
        };
        ["minValues", "maxValues"].iter().any(|m| {
            stats
                .get(m)
                .and_then(|x| x.get(column))
                .is_some_and(|x| match x {
                    serde_json::Value::String(s) => values.contains(s),
                    other => values.contains(&other.to_string()),
                })
        })
    }
}

/// A column of `batch` as text.
fn text_of(batch: &RecordBatch, column: &str) -> Option<StringArray> {
    let col = batch.column_by_name(column)?;
    let text = arrow::compute::cast(col, &DataType::Utf8).ok()?;
    Some(text.as_string::<i32>().clone())
}

fn int_of(batch: &RecordBatch, column: &str) -> Option<Int64Array> {
    let col = batch.column_by_name(column)?;
    let ints = arrow::compute::cast(col, &DataType::Int64).ok()?;
    Some(ints.as_primitive::<arrow::datatypes::Int64Type>().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow::array::ArrayRef;

    fn batch(cols: Vec<(&str, ArrayRef)>) -> RecordBatch {
        RecordBatch::try_from_iter(cols).unwrap()
    }

    #[test]
    fn a_subject_is_its_column_as_text() {
        let s = Selector::Subject {
            column: "customer_id".into(),
            values: HashSet::from(["42".to_string()]),
        };
        let b = batch(vec![(
            "customer_id",
            Arc::new(Int64Array::from(vec![Some(42), None, Some(7)])),
        )]);
        assert_eq!(
            s.hits(&b).unwrap(),
            BooleanArray::from(vec![true, false, false])
        );
        assert!(s
            .hits(&batch(vec![(
                "other",
                Arc::new(Int64Array::from(vec![42]))
            )]))
            .is_none());
        let stats = serde_json::json!({"minValues": {"customer_id": 42}});
        assert!(s.stats_hold(&stats));
        assert!(!s.stats_hold(&serde_json::json!({"maxValues": {"customer_id": 43}})));
    }

    #[test]
    fn versions_before_the_delete_are_selected_and_a_later_insert_is_not() {
        let s = Selector::Deleted {
            columns: vec!["id".into()],
            deletes: HashMap::from([(vec!["5".to_string()], (100, 3))]),
        };
        // Changelog: key 5 at LSN 90 (before), at 100 seq 2 (same transaction, before the
        // delete), the delete itself (100, 3), re-inserted at (100, 4) and at 120; key 6.
        let changelog = batch(vec![
            ("id", Arc::new(Int64Array::from(vec![5, 5, 5, 5, 5, 6]))),
            (
                LSN,
                Arc::new(Int64Array::from(vec![90, 100, 100, 100, 120, 90])),
            ),
            (SEQ, Arc::new(Int64Array::from(vec![0, 2, 3, 4, 0, 0]))),
        ]);
        assert_eq!(
            s.hits(&changelog).unwrap(),
            BooleanArray::from(vec![true, true, true, false, false, false])
        );
        // Mirror: by LSN alone, strictly before the delete's transaction.
        let mirror = batch(vec![
            ("id", Arc::new(Int64Array::from(vec![5, 5, 5]))),
            (LSN, Arc::new(Int64Array::from(vec![90, 100, 120]))),
        ]);
        assert_eq!(
            s.hits(&mirror).unwrap(),
            BooleanArray::from(vec![true, false, false])
        );
        assert!(!s.stats_hold(&serde_json::json!({"minValues": {"id": 5}})));
        assert_eq!(s.columns(), vec!["id", LSN, SEQ]);
    }
}
