//! Golden test: bytes captured from a real PostgreSQL server (`tests/fixtures/pgoutput-v2.bin`,
//! refreshed by `tests/it/fixtures.rs`) decode, value by value, to what the workload wrote.

use arrow::array::{
    Array, BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float32Array, Int16Array,
    Int64Array, TimestampMicrosecondArray,
};

use super::pgoutput::{OldKind, Value};
use super::txn::{Assembler, Change, ChangeKind, Event, Transaction};
use crate::batch::{changelog_batch, Batcher};
use crate::config::BatchConfig;

const FIXTURE: &[u8] = include_bytes!("../../tests/fixtures/pgoutput-v2.bin");

fn messages() -> Vec<bytes::Bytes> {
    super::fixture_messages(FIXTURE)
}

fn events() -> (Vec<(Transaction, Vec<Change>)>, usize) {
    let mut a = Assembler::new();
    let mut txns = Vec::new();
    let mut markers = 0;
    for m in messages() {
        match a.push_data(m).expect("fixture decodes") {
            Some(Event::Commit(mut t)) => {
                let changes = t.take_changes().expect("in memory");
                txns.push((*t, changes))
            }
            Some(Event::Marker { .. }) => markers += 1,
            _ => {}
        }
    }
    assert_eq!(a.open_bytes(), 0);
    (txns, markers)
}

#[test]
fn transactions_and_changes() {
    let (txns, markers) = events();
    assert_eq!(markers, 1, "the non-transactional walden marker");
    let kinds: Vec<Vec<ChangeKind>> = txns
        .iter()
        .filter(|t| !t.1.is_empty())
        .map(|t| t.1.iter().map(|c| c.kind).collect())
        .collect();
    use ChangeKind::*;
    assert_eq!(kinds[0], vec![Insert]);
    assert_eq!(kinds[1..4], [vec![Update], vec![Update], vec![Update]]);
    assert_eq!(kinds[4], vec![Delete]);
    assert_eq!(kinds[5], vec![Truncate]);
    assert_eq!(
        kinds[6].len(),
        391,
        "streamed transaction, aborted savepoint dropped"
    );
    assert!(kinds[6].iter().all(|k| *k == Insert));
    for w in txns.windows(2) {
        assert!(w[0].0.commit_lsn < w[1].0.commit_lsn && w[0].0.end_lsn <= w[1].0.commit_lsn);
    }

    let rel = &txns[0].1[0].relation;
    assert_eq!(
        (rel.schema.as_str(), rel.name.as_str()),
        ("public", "kinds")
    );
    assert_eq!(rel.columns.len(), 22);
    assert!(rel.columns[0].key && rel.columns[1..].iter().all(|c| !c.key));

    // UPDATE i2 only: the external TOAST column `big` is not sent.
    let upd = &txns[2].1[0];
    let big = rel.columns.iter().position(|c| c.name == "big").unwrap();
    assert_eq!(upd.new.as_ref().unwrap().0[big], Value::Unchanged);
    // Key change: old key sent.
    let (kind, old) = txns[3].1[0].old.as_ref().unwrap();
    assert_eq!(*kind, OldKind::Key);
    assert_eq!(old.0[0], Value::Text("1".into()));
    assert_eq!(old.0[1], Value::Null);
    let (kind, old) = txns[4].1[0].old.as_ref().unwrap();
    assert_eq!((*kind, &old.0[0]), (OldKind::Key, &Value::Text("2".into())));
}

#[test]
fn values_map_to_arrow() {
    let (txns, _) = events();
    let mut b = Batcher::new(BatchConfig::default());
    b.push(&txns[0].0, txns[0].1.clone(), 0);
    let tables = b.take();
    let buf = &tables["public.kinds"];
    let (batch, bad) = changelog_batch(buf, Default::default()).unwrap();
    assert_eq!(bad, 0);
    let col = |name: &str| batch.column_by_name(name).unwrap().clone();
    let get = |name: &str| arrow::util::display::array_value_to_string(&col(name), 0).unwrap();
    assert!(col("b")
        .as_any()
        .downcast_ref::<BooleanArray>()
        .unwrap()
        .value(0));
    assert_eq!(
        col("i2")
            .as_any()
            .downcast_ref::<Int16Array>()
            .unwrap()
            .value(0),
        32767
    );
    assert_eq!(
        col("i8")
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0),
        i64::MAX
    );
    assert_eq!(
        col("f4")
            .as_any()
            .downcast_ref::<Float32Array>()
            .unwrap()
            .value(0),
        1.5
    );
    assert_eq!(get("f8"), "2.25");
    assert_eq!(
        col("n")
            .as_any()
            .downcast_ref::<Decimal128Array>()
            .unwrap()
            .value(0),
        1250
    );
    assert_eq!(get("n"), "12.50");
    assert_eq!(get("nbig"), "123456789012345678901234567890.123456789");
    assert_eq!(get("t"), "text é");
    assert_eq!(get("c"), "char");
    assert_eq!(get("u"), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    assert_eq!(
        col("d")
            .as_any()
            .downcast_ref::<Date32Array>()
            .unwrap()
            .value(0),
        19_782
    );
    assert_eq!(get("tm"), "12:34:56.789");
    let ts = col("ts");
    let ts = ts
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .unwrap();
    assert_eq!(ts.value(0), 1_709_210_096_789_000);
    assert_eq!(ts.timezone(), None);
    let tstz = col("tstz");
    let tstz = tstz
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .unwrap();
    assert_eq!(
        tstz.value(0),
        1_709_202_896_789_000,
        "+02 offset converted to UTC"
    );
    assert_eq!(tstz.timezone(), Some("UTC"));
    assert_eq!(get("j"), r#"{"k": [1, 2]}"#);
    assert_eq!(
        col("by")
            .as_any()
            .downcast_ref::<BinaryArray>()
            .unwrap()
            .value(0),
        &[1u8, 2, 255]
    );
    assert_eq!(get("e"), "happy");
    assert!(col("big").is_null(0));
    assert_eq!(get("arr"), "{1,2,3}");
    assert_eq!(get("_walden_op"), "insert");
    assert_eq!(
        col("_walden_lsn")
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0),
        txns[0].0.commit_lsn.0 as i64
    );
}

#[test]
fn a_key_change_records_the_old_key() {
    let (txns, _) = events();
    let mut b = Batcher::new(BatchConfig::default());
    for (txn, changes) in &txns[1..5] {
        b.push(txn, changes.clone(), 0);
    }
    let tables = b.take();
    let (batch, _) = changelog_batch(&tables["public.kinds"], Default::default()).unwrap();
    let old = batch.column_by_name(crate::batch::OLD_KEY).unwrap();
    let old: Vec<Option<&str>> = old
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .unwrap()
        .iter()
        .collect();
    // Two updates in place (the old key is not sent), the key change 1 → 2, the delete of 2.
    assert_eq!(old, vec![None, None, Some(r#"{"id":"1"}"#), None]);
}
