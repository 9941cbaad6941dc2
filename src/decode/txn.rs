//! Assembles decoded pgoutput messages into whole committed transactions.
//!
//! Owns the relation cache and the buffers of open transactions: the one being sent in the
//! ordinary way (Begin … Commit) and any number of protocol-v2 streamed ones (Stream Start/Stop
//! blocks, ended by Stream Commit or Stream Abort, where a sub-transaction abort drops only that
//! sub-transaction's changes). Only committed transactions leave this module.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::mask::TableMask;
use super::pgoutput::{DecodeError, Decoder, Message, OldKind, Relation, Tuple};
use super::spill::{Changes, SpillError, SpillPolicy, TxnBuffer};
use crate::checkpoint::Lsn;
use crate::source::WalMessage;

/// Microseconds between the Unix epoch and Postgres' epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Insert => "insert",
            ChangeKind::Update => "update",
            ChangeKind::Delete => "delete",
            ChangeKind::Truncate => "truncate",
        }
    }
}

/// One row change, with the relation as it was described when the change was sent.
#[derive(Debug, Clone)]
pub struct Change {
    pub relation: Arc<Relation>,
    pub kind: ChangeKind,
    /// New row image (insert, update).
    pub new: Option<Tuple>,
    /// Old key or row (update with changed key or FULL identity, delete).
    pub old: Option<(OldKind, Tuple)>,
    /// Transaction id that made the change (a sub-transaction inside streamed transactions).
    pub(crate) sub_xid: u32,
}

impl Change {
    /// A change of a committed top-level transaction (as the assembler hands them on).
    pub fn new(
        relation: Arc<Relation>,
        kind: ChangeKind,
        new: Option<Tuple>,
        old: Option<(OldKind, Tuple)>,
    ) -> Self {
        Change {
            relation,
            kind,
            new,
            old,
            sub_xid: 0,
        }
    }
}

/// A committed source transaction.
pub struct Transaction {
    pub xid: u32,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch (UTC).
    pub commit_ts_us: i64,
    /// Its changes, in order; those of a large transaction partly on disk.
    pub changes: Changes,
}

impl Transaction {
    /// All its changes, read into memory.
    pub fn take_changes(&mut self) -> Result<Vec<Change>, SpillError> {
        std::mem::replace(&mut self.changes, Changes::in_memory(Vec::new())).into_vec()
    }
}

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("xid", &self.xid)
            .field("commit_lsn", &self.commit_lsn)
            .field("changes", &self.changes.remaining())
            .field("spilled", &self.changes.is_spilled())
            .finish()
    }
}

/// What the assembler hands to the pipeline.
#[derive(Debug)]
pub enum Event {
    Commit(Box<Transaction>),
    /// The server is at this position and no transaction is open on our side.
    Idle(Lsn),
    /// A non-transactional logical message with walden's prefix (a drain marker).
    Marker {
        lsn: Lsn,
        content: Bytes,
    },
}

/// Prefix of walden's own logical messages.
pub const MARKER_PREFIX: &str = "walden";

struct Open {
    xid: u32,
    /// Where it commits (from Begin).
    final_lsn: Lsn,
    changes: TxnBuffer,
}

/// Why the assembler stopped.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Spill(#[from] SpillError),
}

#[derive(Default)]
pub struct Assembler {
    decoder: Decoder,
    relations: HashMap<u32, Arc<Relation>>,
    current: Option<Open>,
    streamed: HashMap<u32, TxnBuffer>,
    stream_xid: Option<u32>,
    /// Where open transactions go past their memory budget (`None`: they stay in memory).
    spill: Option<SpillPolicy>,
    /// Counts logical decoding messages seen (they are not replicated).
    pub logical_messages: u64,
    /// The relation of the last Relation message (and the description it replaced), until the
    /// caller takes it to resolve.
    fresh: Option<(u32, Option<Arc<Relation>>)>,
    /// Masks of relations with masked columns, applied to their tuples as they arrive (see
    /// `decode::mask`): a masked value is never buffered or spilled in clear.
    masks: HashMap<u32, TableMask>,
}

impl Assembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// An assembler whose open transactions spill to disk past `policy.memory_bytes`.
    pub fn with_spill(policy: SpillPolicy) -> Self {
        Assembler {
            spill: Some(policy),
            ..Self::default()
        }
    }

    /// The relation the last message described, once, so the caller can resolve its types
    /// against the catalog and hand it back with [`Assembler::set_relation`] before the next
    /// message (whose changes then carry it).
    /// With it comes the description it replaced, if this session had one.
    pub fn take_fresh_relation(&mut self) -> Option<(Relation, Option<Arc<Relation>>)> {
        let (oid, before) = self.fresh.take()?;
        let fresh = self.relations.get(&oid)?.as_ref().clone();
        Some((fresh, before))
    }

    /// The commit LSN of the open (not streamed) transaction.
    pub fn open_commit_lsn(&self) -> Option<Lsn> {
        self.current.as_ref().map(|o| o.final_lsn)
    }

    /// Hands back the relation [`Assembler::take_fresh_relation`] gave, as the warehouse sees it
    /// (resolved, and masked by `mask`, which then applies to the tuples of its changes as the
    /// source sends them).
    pub fn set_relation(&mut self, relation: Relation, mask: Option<TableMask>) {
        match mask {
            Some(m) => self.masks.insert(relation.oid, m),
            None => self.masks.remove(&relation.oid),
        };
        self.relations.insert(relation.oid, Arc::new(relation));
    }

    /// Bytes held in memory for transactions that are not committed yet.
    pub fn open_bytes(&self) -> usize {
        self.current.as_ref().map_or(0, |o| o.changes.memory_bytes)
            + self
                .streamed
                .values()
                .map(|b| b.memory_bytes)
                .sum::<usize>()
    }

    fn policy(&self) -> SpillPolicy {
        self.spill.clone().unwrap_or(SpillPolicy {
            dir: std::env::temp_dir(),
            memory_bytes: usize::MAX,
        })
    }

    pub fn push(&mut self, msg: WalMessage) -> Result<Option<Event>, AssembleError> {
        match msg {
            WalMessage::Keepalive { wal_end } => Ok(self.idle(wal_end)),
            WalMessage::XLogData { data, .. } => self.push_data(data),
        }
    }

    fn idle(&self, wal_end: Lsn) -> Option<Event> {
        if self.current.is_none() && self.stream_xid.is_none() {
            Some(Event::Idle(wal_end))
        } else {
            None
        }
    }

    fn relation(&self, oid: u32) -> Result<Arc<Relation>, DecodeError> {
        self.relations
            .get(&oid)
            .cloned()
            .ok_or(DecodeError::UnknownRelation(oid))
    }

    /// Where a data message's change goes: the open streamed transaction, or the ordinary one.
    fn sink(&mut self, xid: Option<u32>) -> Result<(&mut TxnBuffer, u32), DecodeError> {
        match (xid, self.stream_xid) {
            (Some(sub), Some(top)) => Ok((self.streamed.entry(top).or_default(), sub)),
            (None, None) => match &mut self.current {
                Some(o) => Ok((&mut o.changes, o.xid)),
                None => Err(DecodeError::OutOfOrder("change outside a transaction")),
            },
            _ => Err(DecodeError::OutOfOrder(
                "stream xid and stream block disagree",
            )),
        }
    }

    fn add(
        &mut self,
        xid: Option<u32>,
        oid: u32,
        kind: ChangeKind,
        new: Option<Tuple>,
        old: Option<(OldKind, Tuple)>,
    ) -> Result<(), AssembleError> {
        let relation = self.relation(oid)?;
        let (new, old) = match self.masks.get(&oid) {
            Some(m) => (new.map(|t| m.tuple(t)), old.map(|(k, t)| (k, m.tuple(t)))),
            None => (new, old),
        };
        let (changes, sub_xid) = self.sink(xid)?;
        changes.push(Change {
            relation,
            kind,
            new,
            old,
            sub_xid,
        });
        if let Some(policy) = &self.spill {
            if self.open_bytes() > policy.memory_bytes {
                self.spill_largest()?;
            }
        }
        Ok(())
    }

    /// Moves the open transaction that holds the most memory to disk.
    fn spill_largest(&mut self) -> Result<(), SpillError> {
        let policy = self.policy();
        let largest = self
            .current
            .as_mut()
            .map(|o| &mut o.changes)
            .into_iter()
            .chain(self.streamed.values_mut())
            .max_by_key(|b| b.memory_bytes);
        match largest {
            Some(b) => b.spill(&policy),
            None => Ok(()),
        }
    }

    fn finish(&self, buf: TxnBuffer) -> Result<Changes, SpillError> {
        if buf.is_spilled() {
            buf.finish(&self.policy())
        } else {
            Ok(Changes::in_memory(buf.memory))
        }
    }

    pub fn push_data(&mut self, data: Bytes) -> Result<Option<Event>, AssembleError> {
        match self.decoder.decode(data)? {
            Message::Begin { xid, final_lsn, .. } => {
                if self.current.is_some() {
                    return Err(DecodeError::OutOfOrder("Begin inside a transaction").into());
                }
                self.current = Some(Open {
                    xid,
                    final_lsn,
                    changes: TxnBuffer::default(),
                });
            }
            Message::Commit {
                commit_lsn,
                end_lsn,
                commit_ts,
                ..
            } => {
                let open = self
                    .current
                    .take()
                    .ok_or(DecodeError::OutOfOrder("Commit without Begin"))?;
                return Ok(Some(Event::Commit(Box::new(Transaction {
                    xid: open.xid,
                    commit_lsn,
                    end_lsn,
                    commit_ts_us: commit_ts.saturating_add(PG_EPOCH_OFFSET_US),
                    changes: self.finish(open.changes)?,
                }))));
            }
            Message::Relation { relation, .. } => {
                let oid = relation.oid;
                // Until the caller hands back the masked description.
                self.masks.remove(&oid);
                let before = self.relations.insert(oid, Arc::new(relation));
                self.fresh = Some((oid, before));
            }
            Message::Insert { xid, oid, new } => {
                self.add(xid, oid, ChangeKind::Insert, Some(new), None)?
            }
            Message::Update { xid, oid, old, new } => {
                self.add(xid, oid, ChangeKind::Update, Some(new), old)?
            }
            Message::Delete { xid, oid, old } => {
                self.add(xid, oid, ChangeKind::Delete, None, Some(old))?
            }
            Message::Truncate { xid, oids, .. } => {
                for oid in oids {
                    self.add(xid, oid, ChangeKind::Truncate, None, None)?;
                }
            }
            Message::StreamStart { xid, .. } => {
                if self.stream_xid.is_some() {
                    return Err(
                        DecodeError::OutOfOrder("Stream Start inside a stream block").into(),
                    );
                }
                self.stream_xid = Some(xid);
                self.streamed.entry(xid).or_default();
            }
            Message::StreamStop => {
                if self.stream_xid.take().is_none() {
                    return Err(
                        DecodeError::OutOfOrder("Stream Stop outside a stream block").into(),
                    );
                }
            }
            Message::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_ts,
                ..
            } => {
                let changes = self.streamed.remove(&xid).unwrap_or_default();
                return Ok(Some(Event::Commit(Box::new(Transaction {
                    xid,
                    commit_lsn,
                    end_lsn,
                    commit_ts_us: commit_ts.saturating_add(PG_EPOCH_OFFSET_US),
                    changes: self.finish(changes)?,
                }))));
            }
            Message::StreamAbort { xid, subxid } => {
                if xid == subxid {
                    self.streamed.remove(&xid);
                } else if let Some(changes) = self.streamed.get_mut(&xid) {
                    changes.abort_sub(subxid);
                }
            }
            Message::LogicalMessage {
                transactional: false,
                lsn,
                prefix,
                content,
                ..
            } if prefix == MARKER_PREFIX => return Ok(Some(Event::Marker { lsn, content })),
            Message::LogicalMessage { .. } => self.logical_messages += 1,
            Message::Origin { .. } | Message::Type { .. } => {}
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn rel() -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(1);
        b.put_slice(b"public\0t\0");
        b.put_u8(b'd');
        b.put_i16(1);
        b.put_u8(1);
        b.put_slice(b"id\0");
        b.put_u32(23);
        b.put_i32(-1);
        b.freeze()
    }

    fn insert(stream_xid: Option<u32>, v: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        if let Some(x) = stream_xid {
            b.put_u32(x);
        }
        b.put_u32(1);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b't');
        b.put_i32(v.len() as i32);
        b.put_slice(v);
        b.freeze()
    }

    fn stream_start(xid: u32) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'S');
        b.put_u32(xid);
        b.put_u8(1);
        b.freeze()
    }

    #[test]
    fn streamed_transaction_with_aborted_subtransaction() {
        let mut a = Assembler::new();
        a.push_data(rel()).unwrap();
        a.push_data(stream_start(100)).unwrap();
        a.push_data(insert(Some(100), b"1")).unwrap();
        a.push_data(insert(Some(101), b"2")).unwrap();
        a.push_data(Bytes::from_static(b"E")).unwrap();
        assert!(a.open_bytes() > 0);
        // abort of subtransaction 101 only
        let mut ab = BytesMut::new();
        ab.put_u8(b'A');
        ab.put_u32(100);
        ab.put_u32(101);
        a.push_data(ab.freeze()).unwrap();
        let mut c = BytesMut::new();
        c.put_u8(b'c');
        c.put_u32(100);
        c.put_u8(0);
        c.put_u64(500);
        c.put_u64(510);
        c.put_i64(0);
        let ev = a.push_data(c.freeze()).unwrap();
        let Some(Event::Commit(mut t)) = ev else {
            panic!()
        };
        assert_eq!(t.take_changes().unwrap().len(), 1);
        assert_eq!((t.commit_lsn, t.end_lsn), (Lsn(500), Lsn(510)));
        assert_eq!(t.commit_ts_us, PG_EPOCH_OFFSET_US);
        assert_eq!(a.open_bytes(), 0);
    }

    #[test]
    fn change_before_relation_or_outside_txn_is_an_error() {
        let mut a = Assembler::new();
        assert!(matches!(
            a.push_data(insert(None, b"1")).unwrap_err(),
            AssembleError::Decode(DecodeError::UnknownRelation(1))
        ));
        a.push_data(rel()).unwrap();
        assert!(matches!(
            a.push_data(insert(None, b"1")).unwrap_err(),
            AssembleError::Decode(DecodeError::OutOfOrder(_))
        ));
    }

    #[test]
    fn idle_only_between_transactions() {
        let mut a = Assembler::new();
        let ka = WalMessage::Keepalive { wal_end: Lsn(9) };
        assert!(matches!(
            a.push(ka.clone()).unwrap(),
            Some(Event::Idle(Lsn(9)))
        ));
        let mut b = BytesMut::new();
        b.put_u8(b'B');
        b.put_u64(10);
        b.put_i64(0);
        b.put_u32(7);
        a.push_data(b.freeze()).unwrap();
        assert!(a.push(ka).unwrap().is_none());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// The same property as the cargo-fuzz target, run in every test: arbitrary message
        /// sequences give errors, never panics.
        #[test]
        fn arbitrary_messages_never_panic(msgs in proptest::collection::vec(
            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 0..16)) {
            let mut a = Assembler::new();
            let _ = a.push_data(rel());
            for m in msgs {
                let _ = a.push_data(Bytes::from(m));
            }
        }

        #[test]
        fn mutated_valid_messages_never_panic(pos in 0usize..32, byte in proptest::prelude::any::<u8>()) {
            let mut a = Assembler::new();
            let mut r = rel().to_vec();
            if pos < r.len() { r[pos] = byte; }
            let _ = a.push_data(Bytes::from(r));
            let mut i = insert(None, b"12").to_vec();
            if pos < i.len() { i[pos] = byte; }
            let _ = a.push_data(Bytes::from(i));
        }
    }
}
