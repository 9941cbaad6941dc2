use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::decode::pgoutput::Column;

fn rel(name: &str) -> Arc<Relation> {
    Arc::new(Relation {
        oid: 1,
        schema: "public".into(),
        name: name.into(),
        replica_identity: b'd',
        columns: vec![Column {
            key: true,
            name: "id".into(),
            type_oid: 23,
            type_modifier: -1,
            ..Column::default()
        }],
    })
}

fn change(r: &Arc<Relation>, i: u32, sub: u32) -> Change {
    let text = Value::Text(Bytes::from(i.to_string()));
    let mut c = match i % 4 {
        0 => Change::new(r.clone(), ChangeKind::Insert, Some(Tuple(vec![text])), None),
        1 => Change::new(
            r.clone(),
            ChangeKind::Update,
            Some(Tuple(vec![
                text,
                Value::Unchanged,
                Value::Binary(Bytes::from_static(b"\0\xff")),
            ])),
            Some((OldKind::Full, Tuple(vec![Value::Null]))),
        ),
        2 => Change::new(
            r.clone(),
            ChangeKind::Delete,
            None,
            Some((OldKind::Key, Tuple(vec![text]))),
        ),
        _ => Change::new(r.clone(), ChangeKind::Truncate, None, None),
    };
    c.sub_xid = sub;
    c
}

fn same(a: &Change, b: &Change) -> bool {
    Arc::ptr_eq(&a.relation, &b.relation)
        && a.kind == b.kind
        && a.new == b.new
        && a.old == b.old
        && a.sub_xid == b.sub_xid
}

#[test]
fn spilled_changes_read_back_in_order_without_aborted_subtransactions() {
    let dir = tempfile::tempdir().unwrap();
    let policy = SpillPolicy {
        dir: dir.path().join("spill"),
        memory_bytes: 0,
    };
    let (a, b) = (rel("a"), rel("b"));
    let mut buf = TxnBuffer::default();
    let mut want = Vec::new();
    for i in 0..1000u32 {
        let sub = if i % 10 == 3 { 7 } else { 1 };
        let c = change(if i % 2 == 0 { &a } else { &b }, i, sub);
        if sub != 7 {
            want.push(c.clone());
        }
        buf.push(c);
        if i % 100 == 99 {
            buf.spill(&policy).unwrap();
        }
    }
    buf.abort_sub(7);
    assert!(buf.is_spilled());
    assert_eq!(buf.memory.len(), 0);
    let mut changes = buf.finish(&policy).unwrap();
    assert!(changes.is_spilled());
    let mut got = Vec::new();
    // Chunks end at 64 changes or once they hold 5 changes' worth of bytes.
    let budget = 5 * super::change_bytes(&want[0]);
    loop {
        let chunk = changes.next_chunk(64, budget).unwrap();
        if chunk.is_empty() {
            break;
        }
        let bytes: usize = chunk.iter().map(super::change_bytes).sum();
        let last = super::change_bytes(chunk.last().unwrap());
        assert!(
            chunk.len() <= 64 && bytes - last < budget,
            "a chunk stops at its budget"
        );
        assert!(chunk.len() < 64, "the byte budget ends chunks first here");
        got.extend(chunk);
    }
    assert_eq!(got.len(), want.len());
    assert!(got.iter().zip(&want).all(|(x, y)| same(x, y)));
    // The file is anonymous: nothing is left in the directory.
    assert_eq!(std::fs::read_dir(&policy.dir).unwrap().count(), 0);
}

#[test]
fn memory_changes_follow_spilled_ones() {
    let dir = tempfile::tempdir().unwrap();
    let policy = SpillPolicy {
        dir: dir.path().to_path_buf(),
        memory_bytes: 0,
    };
    let r = rel("t");
    let mut buf = TxnBuffer::default();
    buf.push(change(&r, 0, 1));
    buf.spill(&policy).unwrap();
    buf.push(change(&r, 4, 1));
    let changes = buf.finish(&policy).unwrap();
    // The in-memory tail went to the file too: nothing is held while the parts before it apply.
    assert_eq!(changes.memory.len(), 0);
    let all = changes.into_vec().unwrap();
    assert_eq!(all.len(), 2);
    assert!(same(&all[0], &change(&r, 0, 1)) && same(&all[1], &change(&r, 4, 1)));
}

#[test]
fn an_unwritable_spill_directory_says_where() {
    let policy = SpillPolicy {
        dir: "/proc/walden-no-spill-here".into(),
        memory_bytes: 0,
    };
    let mut buf = TxnBuffer::default();
    buf.push(change(&rel("t"), 0, 1));
    let err = buf.spill(&policy).unwrap_err();
    assert!(
        err.to_string().contains("/proc/walden-no-spill-here"),
        "{err}"
    );
}
