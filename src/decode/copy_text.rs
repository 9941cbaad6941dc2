//! `COPY … TO STDOUT` text format → tuples of text values.
//!
//! The snapshot reads tables with COPY in text format so that every value goes through the same
//! type output functions as pgoutput's text tuples, and so through the same PG → Arrow mapping
//! ([`crate::decode::types`]): one mapping for the stream and the snapshot. Rows end with `\n`,
//! columns are separated by `\t`, `\N` is NULL, and backslash escapes (`\\`, `\t`, `\n`, `\r`,
//! `\b`, `\f`, `\v`, octal `\ooo`, hex `\xhh`) are undone. Values without a backslash are zero-copy
//! slices of the buffer. Malformed input is an error, never a panic.

use bytes::{Bytes, BytesMut};

use super::mask::{Rule, TableMask};
use super::pgoutput::{Tuple, Value};
use super::types::ColumnBuilder;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CopyTextError {
    #[error("COPY row {row} has {got} columns, expected {want}")]
    Width { row: u64, got: usize, want: usize },
    #[error("COPY data ended in the middle of a row")]
    Truncated,
}

/// Splits COPY text data, arriving in arbitrary chunks, into tuples of `width` columns.
pub struct CopyTextParser {
    width: usize,
    pending: BytesMut,
    rows: u64,
    /// The masks of the columns read (one rule each) and the table's mask that hashes.
    mask: Option<(Vec<Rule>, TableMask)>,
}

impl CopyTextParser {
    pub fn new(width: usize) -> Self {
        CopyTextParser {
            width,
            pending: BytesMut::new(),
            rows: 0,
            mask: None,
        }
    }

    /// Masks the fields of columns `mask` masks, as the columns of its masked relation
    /// (dropped columns are not read at all) before they reach a column builder.
    pub fn masked(mut self, mask: Option<&TableMask>) -> Self {
        self.mask = mask.map(|m| (m.kept(), m.clone()));
        self
    }

    /// Rows parsed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Hands each complete line of the data seen so far to `line` (without its newline).
    fn lines(
        &mut self,
        chunk: Bytes,
        mut line: impl FnMut(&mut Self, Bytes) -> Result<(), CopyTextError>,
    ) -> Result<(), CopyTextError> {
        let data = if self.pending.is_empty() {
            chunk
        } else {
            self.pending.extend_from_slice(&chunk);
            self.pending.split().freeze()
        };
        let Some(last_nl) = memchr::memrchr(b'\n', &data) else {
            self.pending.extend_from_slice(&data);
            return Ok(());
        };
        if last_nl + 1 < data.len() {
            self.pending.extend_from_slice(&data[last_nl + 1..]);
        }
        let complete = data.slice(..last_nl);
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', &complete).chain(std::iter::once(complete.len())) {
            self.rows += 1;
            line(self, complete.slice(start..end))?;
            start = end + 1;
        }
        Ok(())
    }

    /// Adds a chunk and appends every complete row in it to `out`.
    pub fn feed(&mut self, chunk: Bytes, out: &mut Vec<Tuple>) -> Result<(), CopyTextError> {
        self.lines(chunk, |p, line| {
            let mut values = Vec::with_capacity(p.width);
            p.fields(&line, |f| values.push(field_value(line.slice_ref(f))))?;
            out.push(Tuple(values));
            Ok(())
        })
    }

    /// Adds a chunk and appends every complete row in it straight to the column builders (one
    /// per column): no per-row allocation. Returns the rows appended.
    pub fn feed_into(
        &mut self,
        chunk: Bytes,
        cols: &mut [ColumnBuilder],
    ) -> Result<usize, CopyTextError> {
        let before = self.rows;
        let mut unescaped = Vec::new();
        let mask = self.mask.take();
        let done = self.lines(chunk, |p, line| {
            let mut i = 0;
            p.fields(&line, |f| {
                let b = &mut cols[i];
                let rule = mask.as_ref().map_or(Rule::Keep, |(rules, _)| rules[i]);
                i += 1;
                if f == b"\\N" || rule == Rule::Null {
                    b.append_null();
                } else if memchr::memchr(b'\\', f).is_none() && rule == Rule::Keep {
                    b.append_bytes(f);
                } else {
                    unescaped.clear();
                    unescape_into(f, &mut unescaped);
                    match &mask {
                        Some((_, m)) if rule == Rule::Hash => {
                            b.append_bytes(m.hash(&unescaped).as_bytes())
                        }
                        _ => b.append_bytes(&unescaped),
                    }
                }
            })
        });
        self.mask = mask;
        done?;
        Ok((self.rows - before) as usize)
    }

    /// Calls `field` for each tab-separated field of `line`, after checking there are `width`.
    fn fields<'l>(
        &self,
        line: &'l [u8],
        mut field: impl FnMut(&'l [u8]),
    ) -> Result<(), CopyTextError> {
        let got = if self.width == 0 && line.is_empty() {
            0
        } else {
            memchr::memchr_iter(b'\t', line).count() + 1
        };
        if got != self.width {
            return Err(CopyTextError::Width {
                row: self.rows,
                got,
                want: self.width,
            });
        }
        if self.width == 0 {
            return Ok(());
        }
        let mut start = 0;
        for end in memchr::memchr_iter(b'\t', line).chain(std::iter::once(line.len())) {
            field(&line[start..end]);
            start = end + 1;
        }
        Ok(())
    }

    /// Call at the end of the data: leftover bytes mean a cut-off row.
    pub fn finish(&self) -> Result<(), CopyTextError> {
        if self.pending.is_empty() {
            Ok(())
        } else {
            Err(CopyTextError::Truncated)
        }
    }
}

fn field_value(field: Bytes) -> Value {
    if &field[..] == b"\\N" {
        return Value::Null;
    }
    if !field.contains(&b'\\') {
        return Value::Text(field);
    }
    let mut out = Vec::with_capacity(field.len());
    unescape_into(&field, &mut out);
    Value::Text(Bytes::from(out))
}

pub fn unescape_into(s: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < s.len() {
        let b = s[i];
        if b != b'\\' || i + 1 == s.len() {
            out.push(b);
            i += 1;
            continue;
        }
        let c = s[i + 1];
        i += 2;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = (c - b'0') as u32;
                let mut n = 1;
                while n < 3 && i < s.len() && (b'0'..=b'7').contains(&s[i]) {
                    v = v * 8 + (s[i] - b'0') as u32;
                    i += 1;
                    n += 1;
                }
                out.push(v as u8);
            }
            b'x' if i < s.len() && s[i].is_ascii_hexdigit() => {
                let mut v = hex(s[i]);
                i += 1;
                if i < s.len() && s[i].is_ascii_hexdigit() {
                    v = v * 16 + hex(s[i]);
                    i += 1;
                }
                out.push(v);
            }
            other => out.push(other),
        }
    }
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn rows_split_across_chunks() {
        let mut p = CopyTextParser::new(3);
        let mut out = Vec::new();
        p.feed(Bytes::from_static(b"1\ta\\tb\t\\N\n2\t"), &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
        p.feed(Bytes::from_static(b"x\\\\y\tz\\101\n"), &mut out)
            .unwrap();
        p.finish().unwrap();
        assert_eq!(out[0].0, vec![text("1"), text("a\tb"), Value::Null]);
        assert_eq!(out[1].0, vec![text("2"), text("x\\y"), text("zA")]);
    }

    #[test]
    fn rows_go_straight_into_builders() {
        use crate::decode::types::PgKind;
        use arrow::array::{Array, AsArray};
        let mut cols = vec![
            ColumnBuilder::new(PgKind::Int32, 4),
            ColumnBuilder::new(PgKind::Text, 4),
        ];
        let mut p = CopyTextParser::new(2);
        let n = p
            .feed_into(Bytes::from_static(b"1\ta\\tb\n2\t\\N\n3"), &mut cols)
            .unwrap();
        assert_eq!(n, 2);
        let n = p
            .feed_into(Bytes::from_static(b"\tx\\\\y\n"), &mut cols)
            .unwrap();
        assert_eq!(n, 1);
        p.finish().unwrap();
        let mut it = cols.into_iter();
        let ids = it.next().unwrap().finish();
        let texts = it.next().unwrap().finish();
        let ids = ids.as_primitive::<arrow::datatypes::Int32Type>();
        assert_eq!(ids.values().to_vec(), vec![1, 2, 3]);
        let texts = texts.as_string::<i32>();
        assert_eq!(texts.value(0), "a\tb");
        assert!(texts.is_null(1));
        assert_eq!(texts.value(2), "x\\y");
    }

    #[test]
    fn wrong_width_and_truncation_are_errors() {
        let mut out = Vec::new();
        let mut p = CopyTextParser::new(2);
        assert!(matches!(
            p.feed(Bytes::from_static(b"1\n"), &mut out),
            Err(CopyTextError::Width { got: 1, .. })
        ));
        let mut p = CopyTextParser::new(1);
        p.feed(Bytes::from_static(b"1\n2"), &mut out).unwrap();
        assert_eq!(p.finish(), Err(CopyTextError::Truncated));
    }

    /// What Postgres' COPY text output does to a value.
    fn escape(v: &[u8]) -> Vec<u8> {
        let mut o = Vec::new();
        for &b in v {
            match b {
                b'\\' => o.extend_from_slice(b"\\\\"),
                b'\n' => o.extend_from_slice(b"\\n"),
                b'\r' => o.extend_from_slice(b"\\r"),
                b'\t' => o.extend_from_slice(b"\\t"),
                8 => o.extend_from_slice(b"\\b"),
                12 => o.extend_from_slice(b"\\f"),
                11 => o.extend_from_slice(b"\\v"),
                _ => o.push(b),
            }
        }
        o
    }

    proptest! {
        #[test]
        fn escaped_values_round_trip(
            rows in proptest::collection::vec(proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)), 2), 0..20),
            cut in 0usize..400,
        ) {
            let mut data = Vec::new();
            for r in &rows {
                let fields: Vec<Vec<u8>> = r.iter().map(|v| match v {
                    None => b"\\N".to_vec(),
                    Some(v) => escape(v),
                }).collect();
                data.extend_from_slice(&fields.join(&b'\t'));
                data.push(b'\n');
            }
            let cut = cut.min(data.len());
            let mut p = CopyTextParser::new(2);
            let mut out = Vec::new();
            p.feed(Bytes::copy_from_slice(&data[..cut]), &mut out).unwrap();
            p.feed(Bytes::copy_from_slice(&data[cut..]), &mut out).unwrap();
            p.finish().unwrap();
            prop_assert_eq!(out.len(), rows.len());
            for (t, r) in out.iter().zip(&rows) {
                for (v, want) in t.0.iter().zip(r) {
                    match (v, want) {
                        (Value::Null, None) => {}
                        (Value::Text(b), Some(w)) => prop_assert_eq!(&b[..], &w[..]),
                        other => prop_assert!(false, "mismatch {:?}", other),
                    }
                }
            }
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..300), width in 0usize..5) {
            let mut p = CopyTextParser::new(width);
            let mut out = Vec::new();
            let _ = p.feed(Bytes::from(data), &mut out);
            let _ = p.finish();
        }
    }
}
