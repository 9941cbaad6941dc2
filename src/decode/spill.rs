//! Changes of open transactions beyond the memory budget, kept in local files.
//!
//! Owns the spill file format and the budget rule. Every open transaction (the ordinary one and
//! each protocol-v2 streamed one) holds its changes in a [`TxnBuffer`]; when the changes held in
//! memory by all of them pass `spill.memory_bytes`, the buffer that grows moves its changes to
//! an anonymous file in `spill.dir` (created unlinked: nothing is left behind by a crash, and
//! the slot resends the transaction anyway). A committed transaction is read back in order,
//! file first, then memory, in chunks ([`Transaction::next_chunk`]); a sub-transaction abort
//! drops the in-memory changes at once and the spilled ones as they are read back.
//!
//! [`Transaction::next_chunk`]: super::txn::Transaction::next_chunk

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::pgoutput::{OldKind, Relation, Tuple, Value};
use super::txn::{Change, ChangeKind};

#[derive(Debug, thiserror::Error)]
#[error("spill directory {dir}: {source}. Free space there or point spill.dir elsewhere")]
pub struct SpillError {
    pub dir: String,
    #[source]
    pub source: io::Error,
}

/// Where and past what size open transactions spill.
#[derive(Debug, Clone)]
pub struct SpillPolicy {
    pub dir: PathBuf,
    pub memory_bytes: usize,
}

impl SpillPolicy {
    fn error(&self, source: io::Error) -> SpillError {
        SpillError {
            dir: self.dir.display().to_string(),
            source,
        }
    }
}

/// Estimated memory of one change held in a buffer (the same measure the batcher uses): the
/// structs themselves, one [`Value`] slot per column, and the values' bytes.
pub fn change_bytes(c: &Change) -> usize {
    BUFFERED_CHANGE
        + c.new.as_ref().map_or(0, tuple_bytes)
        + c.old.as_ref().map_or(0, |(_, t)| tuple_bytes(t))
}

/// A buffered change without its tuples' contents: the change and the row the batcher wraps it
/// in (commit LSN, timestamp, xid, sequence).
const BUFFERED_CHANGE: usize = std::mem::size_of::<Change>() + 32;

pub fn tuple_bytes(t: &Tuple) -> usize {
    t.0.iter()
        .map(|v| {
            std::mem::size_of::<Value>()
                + match v {
                    Value::Text(b) | Value::Binary(b) => b.len(),
                    _ => 0,
                }
        })
        .sum()
}

/// The changes of one open transaction.
#[derive(Default)]
pub struct TxnBuffer {
    pub memory: Vec<Change>,
    pub memory_bytes: usize,
    spilled: Option<SpillFile>,
}

struct SpillFile {
    out: BufWriter<File>,
    relations: Vec<Arc<Relation>>,
    changes: usize,
    aborted: HashSet<u32>,
}

impl TxnBuffer {
    pub fn push(&mut self, c: Change) {
        self.memory_bytes += change_bytes(&c);
        self.memory.push(c);
    }

    pub fn is_spilled(&self) -> bool {
        self.spilled.is_some()
    }

    /// Drops the changes of sub-transaction `subxid`.
    pub fn abort_sub(&mut self, subxid: u32) {
        self.memory.retain(|c| c.sub_xid != subxid);
        self.memory_bytes = self.memory.iter().map(change_bytes).sum();
        if let Some(f) = &mut self.spilled {
            f.aborted.insert(subxid);
        }
    }

    /// Moves the in-memory changes to the spill file.
    pub fn spill(&mut self, policy: &SpillPolicy) -> Result<(), SpillError> {
        if self.spilled.is_none() {
            std::fs::create_dir_all(&policy.dir).map_err(|e| policy.error(e))?;
            let file = tempfile::tempfile_in(&policy.dir).map_err(|e| policy.error(e))?;
            self.spilled = Some(SpillFile {
                out: BufWriter::with_capacity(1 << 20, file),
                relations: Vec::new(),
                changes: 0,
                aborted: HashSet::new(),
            });
        }
        let f = self.spilled.as_mut().expect("created above");
        for c in self.memory.drain(..) {
            f.write(&c).map_err(|e| policy.error(e))?;
        }
        crate::telemetry::METRICS
            .spilled_bytes_total
            .inc_by(self.memory_bytes as u64);
        self.memory_bytes = 0;
        f.out.flush().map_err(|e| policy.error(e))
    }

    /// The committed transaction's changes, ready to be read back. A spilled one moves its
    /// in-memory tail to the file too: it is applied in parts, and the tail would otherwise be
    /// held (up to the whole memory budget) while every part before it is applied.
    pub fn finish(mut self, policy: &SpillPolicy) -> Result<Changes, SpillError> {
        if self.spilled.is_some() && !self.memory.is_empty() {
            self.spill(policy)?;
        }
        match self.spilled {
            Some(f) => {
                let reader = f.into_reader().map_err(|e| policy.error(e))?;
                Changes::spilled(reader, Vec::new(), policy.dir.display().to_string())
            }
            None => Ok(Changes::in_memory(self.memory)),
        }
    }
}

const NULL: u8 = 0;
const UNCHANGED: u8 = 1;
const TEXT: u8 = 2;
const BINARY: u8 = 3;

impl SpillFile {
    fn relation_slot(&mut self, r: &Arc<Relation>) -> u32 {
        match self.relations.iter().rposition(|x| Arc::ptr_eq(x, r)) {
            Some(i) => i as u32,
            None => {
                self.relations.push(r.clone());
                (self.relations.len() - 1) as u32
            }
        }
    }

    fn write(&mut self, c: &Change) -> io::Result<()> {
        let slot = self.relation_slot(&c.relation);
        let o = &mut self.out;
        o.write_all(&slot.to_le_bytes())?;
        o.write_all(&c.sub_xid.to_le_bytes())?;
        let kind = match c.kind {
            ChangeKind::Insert => 0u8,
            ChangeKind::Update => 1,
            ChangeKind::Delete => 2,
            ChangeKind::Truncate => 3,
        };
        let old = match &c.old {
            None => 0u8,
            Some((OldKind::Key, _)) => 1,
            Some((OldKind::Full, _)) => 2,
        };
        o.write_all(&[kind, u8::from(c.new.is_some()), old])?;
        if let Some(t) = &c.new {
            write_tuple(o, t)?;
        }
        if let Some((_, t)) = &c.old {
            write_tuple(o, t)?;
        }
        self.changes += 1;
        Ok(())
    }

    fn into_reader(self) -> io::Result<SpillReader> {
        let mut file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.rewind()?;
        Ok(SpillReader {
            input: BufReader::with_capacity(1 << 20, file),
            arena: BytesMut::new(),
            relations: self.relations,
            left: self.changes,
            aborted: self.aborted,
        })
    }
}

fn write_tuple(o: &mut impl Write, t: &Tuple) -> io::Result<()> {
    o.write_all(&(t.0.len() as u32).to_le_bytes())?;
    for v in &t.0 {
        match v {
            Value::Null => o.write_all(&[NULL])?,
            Value::Unchanged => o.write_all(&[UNCHANGED])?,
            Value::Text(b) | Value::Binary(b) => {
                let tag = if matches!(v, Value::Text(_)) {
                    TEXT
                } else {
                    BINARY
                };
                o.write_all(&[tag])?;
                o.write_all(&(b.len() as u32).to_le_bytes())?;
                o.write_all(b)?;
            }
        }
    }
    Ok(())
}

/// The size of the blocks spilled values are read into (below the allocator's mmap threshold,
/// `cli::tune_allocator`, so freed blocks are reused rather than faulted in anew).
const ARENA_BYTES: usize = 64 * 1024;

struct SpillReader {
    input: BufReader<File>,
    /// Values are read into this block and handed out as slices of it: one allocation per
    /// block instead of one per value (freed once every value in it is dropped).
    arena: BytesMut,
    relations: Vec<Arc<Relation>>,
    left: usize,
    aborted: HashSet<u32>,
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("spill file: {what}"))
}

impl SpillReader {
    fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.input.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// The next `len` bytes, as a slice of the arena.
    fn value(&mut self, len: usize) -> io::Result<Bytes> {
        if self.arena.capacity() < len {
            self.arena = BytesMut::with_capacity(len.max(ARENA_BYTES));
        }
        self.arena.resize(len, 0);
        self.input.read_exact(&mut self.arena)?;
        Ok(self.arena.split().freeze())
    }

    fn tuple(&mut self) -> io::Result<Tuple> {
        let n = self.u32()? as usize;
        let mut values = Vec::with_capacity(n.min(1600));
        for _ in 0..n {
            let mut tag = [0u8; 1];
            self.input.read_exact(&mut tag)?;
            values.push(match tag[0] {
                NULL => Value::Null,
                UNCHANGED => Value::Unchanged,
                TEXT | BINARY => {
                    let len = self.u32()? as usize;
                    let b = self.value(len)?;
                    if tag[0] == TEXT {
                        Value::Text(b)
                    } else {
                        Value::Binary(b)
                    }
                }
                _ => return Err(corrupt("bad value tag")),
            });
        }
        Ok(Tuple(values))
    }

    /// The next change not dropped by a sub-transaction abort.
    fn next(&mut self) -> io::Result<Option<Change>> {
        while self.left > 0 {
            self.left -= 1;
            let slot = self.u32()? as usize;
            let sub_xid = self.u32()?;
            let mut head = [0u8; 3];
            self.input.read_exact(&mut head)?;
            let kind = match head[0] {
                0 => ChangeKind::Insert,
                1 => ChangeKind::Update,
                2 => ChangeKind::Delete,
                3 => ChangeKind::Truncate,
                _ => return Err(corrupt("bad change kind")),
            };
            let new = if head[1] == 1 {
                Some(self.tuple()?)
            } else {
                None
            };
            let old = match head[2] {
                0 => None,
                1 => Some((OldKind::Key, self.tuple()?)),
                2 => Some((OldKind::Full, self.tuple()?)),
                _ => return Err(corrupt("bad old-tuple kind")),
            };
            if self.aborted.contains(&sub_xid) {
                continue;
            }
            let relation = self
                .relations
                .get(slot)
                .cloned()
                .ok_or_else(|| corrupt("unknown relation slot"))?;
            let mut c = Change::new(relation, kind, new, old);
            c.sub_xid = sub_xid;
            return Ok(Some(c));
        }
        Ok(None)
    }
}

/// A committed transaction's changes: spilled ones (oldest) first, then those in memory.
pub struct Changes {
    spilled: Option<SpillReader>,
    memory: std::vec::IntoIter<Change>,
    /// The next change, read ahead so the end is known before it is reached.
    ahead: Option<Change>,
    dir: String,
}

impl Changes {
    pub fn in_memory(changes: Vec<Change>) -> Self {
        let mut memory = changes.into_iter();
        Changes {
            spilled: None,
            ahead: memory.next(),
            memory,
            dir: String::new(),
        }
    }

    fn spilled(reader: SpillReader, memory: Vec<Change>, dir: String) -> Result<Self, SpillError> {
        let mut c = Changes {
            spilled: Some(reader),
            memory: memory.into_iter(),
            ahead: None,
            dir,
        };
        c.ahead = c.pull()?;
        Ok(c)
    }

    /// Some changes are on disk.
    pub fn is_spilled(&self) -> bool {
        self.spilled.is_some()
    }

    /// Every change was read.
    pub fn is_done(&self) -> bool {
        self.ahead.is_none()
    }

    /// Changes still to read (an upper bound when spilled changes may be dropped by aborts).
    pub fn remaining(&self) -> usize {
        usize::from(self.ahead.is_some())
            + self.spilled.as_ref().map_or(0, |s| s.left)
            + self.memory.len()
    }

    fn pull(&mut self) -> Result<Option<Change>, SpillError> {
        if let Some(r) = &mut self.spilled {
            match r.next() {
                Ok(Some(c)) => return Ok(Some(c)),
                Ok(None) => self.spilled = None,
                Err(source) => {
                    return Err(SpillError {
                        dir: self.dir.clone(),
                        source,
                    })
                }
            }
        }
        Ok(self.memory.next())
    }

    /// The next changes, up to `n` of them and `bytes` of estimated memory ([`change_bytes`];
    /// at least one change); empty when all were read.
    pub fn next_chunk(&mut self, n: usize, bytes: usize) -> Result<Vec<Change>, SpillError> {
        let mut out = Vec::with_capacity(n.min(self.remaining()).min(1 << 16));
        let mut size = 0;
        while out.len() < n && (out.is_empty() || size < bytes) {
            match self.ahead.take() {
                Some(c) => {
                    size += change_bytes(&c);
                    out.push(c);
                    self.ahead = self.pull()?;
                }
                None => break,
            }
        }
        Ok(out)
    }

    /// Everything left, in memory (small transactions).
    pub fn into_vec(mut self) -> Result<Vec<Change>, SpillError> {
        self.next_chunk(usize::MAX, usize::MAX)
    }
}

#[cfg(test)]
mod tests;
