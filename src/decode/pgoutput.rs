//! pgoutput wire messages (protocol versions 1 and 2) decoded into [`Message`]s.
//!
//! Every read is bounds-checked: malformed input yields a [`DecodeError`], never a panic (see the
//! fuzz target in `fuzz/`). Values stay as `Bytes` slices of the received buffer (no copies).

use bytes::{Buf, Bytes};

use crate::checkpoint::Lsn;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput message ends early while reading {0}")]
    Truncated(&'static str),
    #[error("unknown pgoutput message type {0:#04x}")]
    UnknownMessage(u8),
    #[error("unknown tuple column kind {0:#04x}")]
    UnknownColumnKind(u8),
    #[error("unexpected tuple marker {0:#04x} in {1}")]
    UnexpectedMarker(u8, &'static str),
    #[error("{0} is not valid UTF-8")]
    BadUtf8(&'static str),
    #[error("negative count in {0}")]
    NegativeCount(&'static str),
    #[error("empty message")]
    Empty,
    #[error("change for relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
    #[error("protocol order violated: {0}")]
    OutOfOrder(&'static str),
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value that the server did not send ('u').
    Unchanged,
    /// The value in the type's text output format ('t').
    Text(Bytes),
    /// The value in the type's binary send format ('b').
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<Value>);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity.
    pub key: bool,
    pub name: String,
    /// The type as pgoutput sends it, until `source::types` resolves it against the catalog: a
    /// domain becomes its base type, an array its element type (with `dims` > 0).
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Array dimensions of a resolved array column; 0 otherwise (an unresolved array type keeps
    /// its text form).
    pub dims: u8,
    /// The column's attribute number in the catalog; 0 when unknown.
    pub attnum: i16,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// 'd' default, 'n' nothing, 'f' full, 'i' index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

/// Which old image an update or delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// 'K': only the replica-identity columns (others are null).
    Key,
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: Lsn,
        commit_ts: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
    },
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation {
        xid: Option<u32>,
        relation: Relation,
    },
    Type {
        xid: Option<u32>,
        oid: u32,
        schema: String,
        name: String,
    },
    Insert {
        xid: Option<u32>,
        oid: u32,
        new: Tuple,
    },
    Update {
        xid: Option<u32>,
        oid: u32,
        old: Option<(OldKind, Tuple)>,
        new: Tuple,
    },
    Delete {
        xid: Option<u32>,
        oid: u32,
        old: (OldKind, Tuple),
    },
    Truncate {
        xid: Option<u32>,
        /// bit 1: CASCADE, bit 2: RESTART IDENTITY
        options: u8,
        oids: Vec<u32>,
    },
    LogicalMessage {
        xid: Option<u32>,
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
    StreamStart {
        xid: u32,
        first_segment: bool,
    },
    StreamStop,
    StreamCommit {
        xid: u32,
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
    },
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
}

/// Decodes a stream of pgoutput messages; remembers whether it is inside a streamed block (where
/// data messages carry a transaction id).
#[derive(Debug, Default)]
pub struct Decoder {
    in_stream: bool,
}

struct Cursor {
    buf: Bytes,
}

impl Cursor {
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(DecodeError::Truncated(what))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        self.need(2, what)?;
        Ok(self.buf.get_i16())
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_i32())
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_i64())
    }
    fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        self.need(8, what)?;
        Ok(Lsn(self.buf.get_u64()))
    }
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }
    fn cstring(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::Truncated(what))?;
        let s = std::str::from_utf8(&self.buf[..end])
            .map_err(|_| DecodeError::BadUtf8(what))?
            .to_string();
        self.buf.advance(end + 1);
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.i16("tuple column count")?;
        if n < 0 {
            return Err(DecodeError::NegativeCount("tuple column count"));
        }
        let mut values = Vec::with_capacity(n as usize);
        for _ in 0..n {
            values.push(match self.u8("tuple column kind")? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                kind @ (b't' | b'b') => {
                    let len = self.i32("column length")?;
                    if len < 0 {
                        return Err(DecodeError::NegativeCount("column length"));
                    }
                    let v = self.bytes(len as usize, "column value")?;
                    if kind == b't' {
                        Value::Text(v)
                    } else {
                        Value::Binary(v)
                    }
                }
                other => return Err(DecodeError::UnknownColumnKind(other)),
            });
        }
        Ok(Tuple(values))
    }
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// Decodes one XLogData payload.
    pub fn decode(&mut self, data: Bytes) -> Result<Message, DecodeError> {
        let mut c = Cursor { buf: data };
        let tag = c.u8("message type").map_err(|_| DecodeError::Empty)?;
        let xid = |c: &mut Cursor, in_stream: bool| -> Result<Option<u32>, DecodeError> {
            if in_stream {
                Ok(Some(c.u32("transaction id")?))
            } else {
                Ok(None)
            }
        };
        let msg = match tag {
            b'B' => Message::Begin {
                final_lsn: c.lsn("begin final LSN")?,
                commit_ts: c.i64("begin timestamp")?,
                xid: c.u32("begin xid")?,
            },
            b'C' => Message::Commit {
                flags: c.u8("commit flags")?,
                commit_lsn: c.lsn("commit LSN")?,
                end_lsn: c.lsn("commit end LSN")?,
                commit_ts: c.i64("commit timestamp")?,
            },
            b'O' => Message::Origin {
                commit_lsn: c.lsn("origin LSN")?,
                name: c.cstring("origin name")?,
            },
            b'R' => {
                let xid = xid(&mut c, self.in_stream)?;
                let oid = c.u32("relation oid")?;
                let schema = c.cstring("relation namespace")?;
                let name = c.cstring("relation name")?;
                let replica_identity = c.u8("replica identity")?;
                let n = c.i16("relation column count")?;
                if n < 0 {
                    return Err(DecodeError::NegativeCount("relation column count"));
                }
                let mut columns = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    columns.push(Column {
                        key: c.u8("column flags")? & 1 == 1,
                        name: c.cstring("column name")?,
                        type_oid: c.u32("column type")?,
                        type_modifier: c.i32("column type modifier")?,
                        ..Column::default()
                    });
                }
                Message::Relation {
                    xid,
                    relation: Relation {
                        oid,
                        schema,
                        name,
                        replica_identity,
                        columns,
                    },
                }
            }
            b'Y' => Message::Type {
                xid: xid(&mut c, self.in_stream)?,
                oid: c.u32("type oid")?,
                schema: c.cstring("type namespace")?,
                name: c.cstring("type name")?,
            },
            b'I' => {
                let xid = xid(&mut c, self.in_stream)?;
                let oid = c.u32("insert relation")?;
                match c.u8("insert marker")? {
                    b'N' => {}
                    m => return Err(DecodeError::UnexpectedMarker(m, "insert")),
                }
                Message::Insert {
                    xid,
                    oid,
                    new: c.tuple()?,
                }
            }
            b'U' => {
                let xid = xid(&mut c, self.in_stream)?;
                let oid = c.u32("update relation")?;
                let mut old = None;
                let mut marker = c.u8("update marker")?;
                if marker == b'K' || marker == b'O' {
                    let kind = if marker == b'K' {
                        OldKind::Key
                    } else {
                        OldKind::Full
                    };
                    old = Some((kind, c.tuple()?));
                    marker = c.u8("update new-tuple marker")?;
                }
                if marker != b'N' {
                    return Err(DecodeError::UnexpectedMarker(marker, "update"));
                }
                Message::Update {
                    xid,
                    oid,
                    old,
                    new: c.tuple()?,
                }
            }
            b'D' => {
                let xid = xid(&mut c, self.in_stream)?;
                let oid = c.u32("delete relation")?;
                let kind = match c.u8("delete marker")? {
                    b'K' => OldKind::Key,
                    b'O' => OldKind::Full,
                    m => return Err(DecodeError::UnexpectedMarker(m, "delete")),
                };
                Message::Delete {
                    xid,
                    oid,
                    old: (kind, c.tuple()?),
                }
            }
            b'T' => {
                let xid = xid(&mut c, self.in_stream)?;
                let n = c.u32("truncate relation count")?;
                let options = c.u8("truncate options")?;
                c.need(n as usize * 4, "truncate relations")?;
                let oids = (0..n)
                    .map(|_| c.u32("truncate relation"))
                    .collect::<Result<_, _>>()?;
                Message::Truncate { xid, options, oids }
            }
            b'M' => {
                let xid = xid(&mut c, self.in_stream)?;
                let flags = c.u8("message flags")?;
                let lsn = c.lsn("message LSN")?;
                let prefix = c.cstring("message prefix")?;
                let len = c.u32("message length")?;
                Message::LogicalMessage {
                    xid,
                    transactional: flags & 1 == 1,
                    lsn,
                    prefix,
                    content: c.bytes(len as usize, "message content")?,
                }
            }
            b'S' => {
                let m = Message::StreamStart {
                    xid: c.u32("stream xid")?,
                    first_segment: c.u8("stream first-segment flag")? == 1,
                };
                self.in_stream = true;
                m
            }
            b'E' => {
                self.in_stream = false;
                Message::StreamStop
            }
            b'c' => Message::StreamCommit {
                xid: c.u32("stream commit xid")?,
                flags: c.u8("stream commit flags")?,
                commit_lsn: c.lsn("stream commit LSN")?,
                end_lsn: c.lsn("stream commit end LSN")?,
                commit_ts: c.i64("stream commit timestamp")?,
            },
            b'A' => Message::StreamAbort {
                xid: c.u32("stream abort xid")?,
                subxid: c.u32("stream abort subxid")?,
            },
            other => return Err(DecodeError::UnknownMessage(other)),
        };
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn relation_bytes() -> Bytes {
        let mut b = bytes::BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(16384);
        b.put_slice(b"public\0t\0");
        b.put_u8(b'd');
        b.put_i16(2);
        b.put_u8(1);
        b.put_slice(b"id\0");
        b.put_u32(23);
        b.put_i32(-1);
        b.put_u8(0);
        b.put_slice(b"v\0");
        b.put_u32(25);
        b.put_i32(-1);
        b.freeze()
    }

    #[test]
    fn relation_and_insert() {
        let mut d = Decoder::new();
        let m = d.decode(relation_bytes()).unwrap();
        let Message::Relation { relation, xid } = m else {
            panic!("{m:?}")
        };
        assert_eq!(xid, None);
        assert_eq!(relation.columns.len(), 2);
        assert!(relation.columns[0].key && !relation.columns[1].key);

        let mut b = bytes::BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(16384);
        b.put_u8(b'N');
        b.put_i16(3);
        b.put_u8(b't');
        b.put_i32(2);
        b.put_slice(b"42");
        b.put_u8(b'n');
        b.put_u8(b'u');
        let m = d.decode(b.freeze()).unwrap();
        assert_eq!(
            m,
            Message::Insert {
                xid: None,
                oid: 16384,
                new: Tuple(vec![
                    Value::Text(Bytes::from_static(b"42")),
                    Value::Null,
                    Value::Unchanged
                ])
            }
        );
    }

    #[test]
    fn every_truncation_of_a_valid_message_is_an_error() {
        let full = relation_bytes();
        for cut in 0..full.len() {
            let mut d = Decoder::new();
            assert!(d.decode(full.slice(..cut)).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn stream_block_messages_carry_xid() {
        let mut d = Decoder::new();
        let m = d
            .decode(Bytes::from_static(&[b'S', 0, 0, 0, 9, 1]))
            .unwrap();
        assert_eq!(
            m,
            Message::StreamStart {
                xid: 9,
                first_segment: true
            }
        );
        let m = d
            .decode(Bytes::from_static(&[
                b'D', 0, 0, 0, 10, 0, 0, 0x40, 0, b'K', 0, 1, b't', 0, 0, 0, 1, b'7',
            ]))
            .unwrap();
        let Message::Delete { xid, oid, old } = m else {
            panic!()
        };
        assert_eq!((xid, oid, old.0), (Some(10), 0x4000, OldKind::Key));
        d.decode(Bytes::from_static(b"E")).unwrap();
        assert!(!d.in_stream());
    }

    #[test]
    fn garbage_is_rejected() {
        let mut d = Decoder::new();
        assert_eq!(d.decode(Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(
            d.decode(Bytes::from_static(b"Z")),
            Err(DecodeError::UnknownMessage(b'Z'))
        );
        // huge truncate count must not allocate or panic
        assert!(d
            .decode(Bytes::from_static(&[b'T', 0xff, 0xff, 0xff, 0xff, 0]))
            .is_err());
        // negative column length
        assert!(d
            .decode(Bytes::from_static(&[
                b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0xff, 0xff, 0xff, 0xff
            ]))
            .is_err());
    }
}
