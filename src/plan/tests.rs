use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::decode::pgoutput::Column;
use crate::decode::txn::Change;

/// `id int, big text, note text`; identity: `id` (DEFAULT), every column (FULL), none.
fn rel(identity: u8) -> Arc<Relation> {
    let col = |name: &str, key: bool| Column {
        key,
        name: name.into(),
        type_oid: if name == "id" { 23 } else { 25 },
        type_modifier: -1,
        ..Column::default()
    };
    let full = identity == b'f';
    Arc::new(Relation {
        oid: 1,
        schema: "public".into(),
        name: "t".into(),
        replica_identity: identity,
        columns: vec![
            col("id", identity == b'd' || full),
            col("big", full),
            col("note", full),
        ],
    })
}

fn v(s: &str) -> Value {
    match s {
        "NULL" => Value::Null,
        "u" => Value::Unchanged,
        _ => Value::Text(Bytes::copy_from_slice(s.as_bytes())),
    }
}

fn t(vals: &[&str]) -> Tuple {
    Tuple(vals.iter().map(|s| v(s)).collect())
}

struct B {
    rel: Arc<Relation>,
    rows: Vec<Row>,
}

impl B {
    fn new(identity: u8) -> Self {
        B {
            rel: rel(identity),
            rows: Vec::new(),
        }
    }
    fn push(mut self, kind: ChangeKind, new: Option<Tuple>, old: Option<(OldKind, Tuple)>) -> Self {
        let n = self.rows.len() as u64 + 1;
        self.rows.push(Row {
            change: Change::new(self.rel.clone(), kind, new, old),
            commit_lsn: Lsn(100 + n),
            commit_ts_us: n as i64,
            xid: 1,
            seq: 0,
        });
        self
    }
    fn insert(self, new: &[&str]) -> Self {
        self.push(ChangeKind::Insert, Some(t(new)), None)
    }
    fn update(self, new: &[&str]) -> Self {
        self.push(ChangeKind::Update, Some(t(new)), None)
    }
    fn update_from(self, kind: OldKind, old: &[&str], new: &[&str]) -> Self {
        self.push(ChangeKind::Update, Some(t(new)), Some((kind, t(old))))
    }
    fn delete(self, kind: OldKind, old: &[&str]) -> Self {
        self.push(ChangeKind::Delete, None, Some((kind, t(old))))
    }
    fn truncate(self) -> Self {
        self.push(ChangeKind::Truncate, None, None)
    }
    fn plan(self) -> MirrorPlan {
        let mut buf = TableBuffer {
            relation: self.rel,
            rows: self.rows,
            bytes: 0,
            partial: false,
            generation: None,
        };
        mirror_plan(&mut buf, Applied::default()).expect("rows to plan")
    }
}

fn values(p: &MirrorPlan) -> Vec<Vec<Value>> {
    p.upserts.iter().map(|u| u.values.clone()).collect()
}

fn remove(identity: &[usize], vals: &[&str]) -> Remove {
    Remove {
        identity: identity.into(),
        values: vals.iter().map(|s| v(s)).collect(),
    }
}

#[test]
fn key_change_moves_the_row_with_its_unchanged_toast() {
    let p = B::new(b'd')
        .update_from(OldKind::Key, &["1", "NULL", "NULL"], &["2", "u", "x"])
        .plan();
    assert_eq!(p.removes, vec![remove(&[0], &["1"])]);
    assert_eq!(values(&p), vec![vec![v("2"), v("u"), v("x")]]);
    assert_eq!(p.upserts[0].origin, Some(0));
    assert!(!p.is_append());
}

#[test]
fn chained_updates_carry_from_the_first_origin() {
    let p = B::new(b'd')
        .update(&["1", "u", "a"])
        .update_from(OldKind::Key, &["1", "NULL", "NULL"], &["2", "u", "b"])
        .update(&["2", "u", "c"])
        .plan();
    assert_eq!(p.removes, vec![remove(&[0], &["1"])]);
    assert_eq!(values(&p), vec![vec![v("2"), v("u"), v("c")]]);
    assert_eq!(p.upserts[0].origin, Some(0));
    assert_eq!(p.upserts[0].lsn, Lsn(103));
}

#[test]
fn insert_then_update_in_one_batch_keeps_the_inserted_value() {
    let p = B::new(b'd')
        .insert(&["1", "long", "a"])
        .update(&["1", "u", "b"])
        .plan();
    assert!(p.is_append());
    assert_eq!(values(&p), vec![vec![v("1"), v("long"), v("b")]]);
}

#[test]
fn delete_of_a_row_inserted_in_the_batch_never_reaches_the_mirror() {
    let p = B::new(b'd')
        .insert(&["1", "x", "a"])
        .delete(OldKind::Key, &["1", "NULL", "NULL"])
        .insert(&["1", "y", "b"])
        .plan();
    assert!(p.is_append());
    assert_eq!(values(&p), vec![vec![v("1"), v("y"), v("b")]]);
}

#[test]
fn delete_of_a_mirror_row_then_reinsert() {
    let p = B::new(b'd')
        .delete(OldKind::Key, &["1", "NULL", "NULL"])
        .insert(&["1", "y", "b"])
        .plan();
    assert_eq!(p.removes, vec![remove(&[0], &["1"])]);
    assert_eq!(p.upserts[0].origin, None);
}

#[test]
fn full_identity_takes_unchanged_values_from_the_old_row() {
    let old = ["1", "long", "a"];
    let p = B::new(b'f')
        .update_from(OldKind::Full, &old, &["1", "u", "b"])
        .plan();
    assert_eq!(p.removes, vec![remove(&[0, 1, 2], &old)]);
    assert_eq!(values(&p), vec![vec![v("1"), v("long"), v("b")]]);
    assert!(!p.upserts[0].carries());
}

#[test]
fn full_identity_matches_nulls_and_one_of_identical_rows() {
    let row = ["1", "NULL", "same"];
    let p = B::new(b'f')
        .delete(OldKind::Full, &row)
        .update_from(OldKind::Full, &row, &["1", "NULL", "changed"])
        .plan();
    // Two changes of identical rows: two removes, each takes out exactly one row.
    assert_eq!(p.removes, vec![remove(&[0, 1, 2], &row); 2]);
    assert_eq!(values(&p), vec![vec![v("1"), v("NULL"), v("changed")]]);
}

#[test]
fn identical_rows_inserted_in_the_batch_are_deleted_one_at_a_time() {
    let row = ["1", "NULL", "same"];
    let p = B::new(b'f')
        .insert(&row)
        .insert(&row)
        .delete(OldKind::Full, &row)
        .plan();
    assert!(p.is_append());
    assert_eq!(p.upserts.len(), 1);
}

#[test]
fn truncate_keeps_only_what_follows_it() {
    let p = B::new(b'd')
        .insert(&["1", "x", "a"])
        .update(&["9", "u", "gone"])
        .truncate()
        .insert(&["2", "long", "b"])
        .update(&["2", "u", "c"])
        .plan();
    assert!(p.truncate);
    assert!(p.removes.is_empty());
    assert_eq!(values(&p), vec![vec![v("2"), v("long"), v("c")]]);
}

#[test]
fn no_identity_inserts_only_and_counts_the_rest() {
    let p = B::new(b'n')
        .insert(&["1", "x", "a"])
        .insert(&["1", "x", "a"])
        .update(&["1", "x", "b"])
        .plan();
    assert!(p.is_append());
    assert_eq!(p.upserts.len(), 2);
    assert_eq!(p.unidentified, 1);
}

#[test]
fn changes_at_or_below_the_applied_lsn_are_skipped() {
    let b = B::new(b'd')
        .insert(&["1", "x", "a"])
        .insert(&["2", "y", "b"]);
    let buf = || TableBuffer {
        relation: b.rel.clone(),
        rows: b.rows.clone(),
        bytes: 0,
        partial: false,
        generation: None,
    };
    assert_eq!(
        mirror_plan(&mut buf(), Applied::at(Lsn(101)))
            .unwrap()
            .upserts
            .len(),
        1
    );
    assert!(mirror_plan(&mut buf(), Applied::at(Lsn(102))).is_none());
}

#[test]
fn a_row_added_under_one_identity_is_found_under_the_next() {
    // Inserted under the key; ALTER TABLE … REPLICA IDENTITY FULL; then deleted and updated by
    // full-row images: both find the rows of the batch, nothing reaches back into the mirror.
    let mut b = B::new(b'd')
        .insert(&["1", "a", "x"])
        .insert(&["2", "b", "y"]);
    b.rel = rel(b'f');
    let p = b
        .delete(OldKind::Full, &["1", "a", "x"])
        .update_from(OldKind::Full, &["2", "b", "y"], &["2", "b", "z"])
        .update_from(OldKind::Full, &["3", "c", "w"], &["3", "c", "v"])
        .plan();
    assert_eq!(p.removes, vec![remove(&[0, 1, 2], &["3", "c", "w"])]);
    assert_eq!(
        values(&p),
        vec![t(&["2", "b", "z"]).0, t(&["3", "c", "v"]).0]
    );
}
