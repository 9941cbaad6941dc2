//! `COPY … TO STDOUT` text format → tuples of text values.
//!
//! The snapshot reads tables with COPY in text format so that every value goes through the same
//! type output functions as pgoutput's text tuples, and so through the same PG → Arrow mapping
//! ([`crate::decode::types`]): one mapping for the stream and the snapshot. Rows end with `\n`,
//! columns are separated by `\t`, `\N` is NULL, and backslash escapes (`\\`, `\t`, `\n`, `\r`,
//! `\b`, `\f`, `\v`, octal `\ooo`, hex `\xhh`) are undone. Values without a backslash are zero-copy
//! slices of the buffer. Malformed input is an error, never a panic.

use bytes::{Bytes, BytesMut};

use super::pgoutput::{Tuple, Value};

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
}

impl CopyTextParser {
    pub fn new(width: usize) -> Self {
        CopyTextParser {
            width,
            pending: BytesMut::new(),
            rows: 0,
        }
    }

    /// Rows parsed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Adds a chunk and appends every complete row in it to `out`.
    pub fn feed(&mut self, chunk: Bytes, out: &mut Vec<Tuple>) -> Result<(), CopyTextError> {
        let data = if self.pending.is_empty() {
            chunk
        } else {
            self.pending.extend_from_slice(&chunk);
            self.pending.split().freeze()
        };
        let Some(last_nl) = memchr_last(&data) else {
            self.pending.extend_from_slice(&data);
            return Ok(());
        };
        let complete = data.slice(..=last_nl);
        if last_nl + 1 < data.len() {
            self.pending.extend_from_slice(&data[last_nl + 1..]);
        }
        let mut start = 0;
        while start < complete.len() {
            let end = start
                + complete[start..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .expect("complete ends with a newline");
            out.push(self.row(complete.slice(start..end))?);
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

    fn row(&mut self, line: Bytes) -> Result<Tuple, CopyTextError> {
        self.rows += 1;
        let mut values = Vec::with_capacity(self.width);
        if self.width == 0 {
            return if line.is_empty() {
                Ok(Tuple(values))
            } else {
                Err(self.width_error(1))
            };
        }
        let mut start = 0;
        loop {
            let end = line[start..]
                .iter()
                .position(|&b| b == b'\t')
                .map(|p| start + p);
            let field = line.slice(start..end.unwrap_or(line.len()));
            values.push(field_value(field));
            match end {
                Some(e) => start = e + 1,
                None => break,
            }
        }
        if values.len() != self.width {
            return Err(self.width_error(values.len()));
        }
        Ok(Tuple(values))
    }

    fn width_error(&self, got: usize) -> CopyTextError {
        CopyTextError::Width {
            row: self.rows,
            got,
            want: self.width,
        }
    }
}

fn memchr_last(data: &[u8]) -> Option<usize> {
    data.iter().rposition(|&b| b == b'\n')
}

fn field_value(field: Bytes) -> Value {
    if &field[..] == b"\\N" {
        return Value::Null;
    }
    if !field.contains(&b'\\') {
        return Value::Text(field);
    }
    Value::Text(Bytes::from(unescape(&field)))
}

fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
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
    out
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
