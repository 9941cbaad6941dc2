//! Postgres types → Arrow types, and pgoutput text values → Arrow arrays.
//!
//! One mapping, documented in `schemas/type-mapping.md`. The walsender session is pinned to
//! `DateStyle=ISO`, `TimeZone=UTC`, `bytea_output=hex`, `extra_float_digits=3`, so the text forms
//! parsed here are fixed. Types without a native mapping keep Postgres' exact text form (Utf8), so no
//! value is ever lost. A value that the Arrow type cannot hold (numeric NaN, ±infinity dates) becomes
//! NULL and is counted as unrepresentable, never silently rounded.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, TimeUnit};

use super::pgoutput::Value;

/// How one Postgres column is represented in Arrow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgKind {
    Bool,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    /// numeric(p, s) with p ≤ 38.
    Decimal {
        precision: u8,
        scale: i8,
    },
    Date,
    Timestamp,
    TimestampTz,
    Bytea,
    /// Everything kept as text: text/varchar/char/name, uuid, json/jsonb, time, numeric without
    /// declared precision or with precision > 38, enums, arrays, intervals and other types.
    Text,
}

pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

impl PgKind {
    pub fn of(type_oid: u32, type_modifier: i32) -> PgKind {
        match type_oid {
            oid::BOOL => PgKind::Bool,
            oid::INT2 => PgKind::Int16,
            oid::INT4 => PgKind::Int32,
            oid::INT8 | oid::OID => PgKind::Int64,
            oid::FLOAT4 => PgKind::Float32,
            oid::FLOAT8 => PgKind::Float64,
            oid::NUMERIC if type_modifier >= 4 => {
                let m = type_modifier - 4;
                let precision = (m >> 16) & 0xffff;
                // scale is an 11-bit signed field in PG ≥ 15
                let raw_scale = m & 0x7ff;
                let scale = if raw_scale & 0x400 != 0 {
                    raw_scale - 0x800
                } else {
                    raw_scale
                };
                if (1..=38).contains(&precision) && (0..=precision).contains(&scale) {
                    PgKind::Decimal {
                        precision: precision as u8,
                        scale: scale as i8,
                    }
                } else {
                    PgKind::Text
                }
            }
            oid::DATE => PgKind::Date,
            oid::TIMESTAMP => PgKind::Timestamp,
            oid::TIMESTAMPTZ => PgKind::TimestampTz,
            oid::BYTEA => PgKind::Bytea,
            _ => PgKind::Text,
        }
    }

    pub fn arrow_type(self) -> DataType {
        match self {
            PgKind::Bool => DataType::Boolean,
            PgKind::Int16 => DataType::Int16,
            PgKind::Int32 => DataType::Int32,
            PgKind::Int64 => DataType::Int64,
            PgKind::Float32 => DataType::Float32,
            PgKind::Float64 => DataType::Float64,
            PgKind::Decimal { precision, scale } => DataType::Decimal128(precision, scale),
            PgKind::Date => DataType::Date32,
            PgKind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            PgKind::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            PgKind::Bytea => DataType::Binary,
            PgKind::Text => DataType::Utf8,
        }
    }
}

/// Builds one Arrow column from pgoutput values.
pub struct ColumnBuilder {
    kind: PgKind,
    inner: Inner,
    /// Values that were present but could not be represented (stored as NULL).
    pub unrepresentable: u64,
}

enum Inner {
    Bool(BooleanBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Dec(Decimal128Builder, i8),
    Date(Date32Builder),
    Ts(TimestampMicrosecondBuilder),
    Bin(BinaryBuilder),
    Text(StringBuilder),
}

impl ColumnBuilder {
    pub fn new(kind: PgKind, capacity: usize) -> Self {
        let inner = match kind {
            PgKind::Bool => Inner::Bool(BooleanBuilder::with_capacity(capacity)),
            PgKind::Int16 => Inner::I16(Int16Builder::with_capacity(capacity)),
            PgKind::Int32 => Inner::I32(Int32Builder::with_capacity(capacity)),
            PgKind::Int64 => Inner::I64(Int64Builder::with_capacity(capacity)),
            PgKind::Float32 => Inner::F32(Float32Builder::with_capacity(capacity)),
            PgKind::Float64 => Inner::F64(Float64Builder::with_capacity(capacity)),
            PgKind::Decimal { precision, scale } => Inner::Dec(
                Decimal128Builder::with_capacity(capacity)
                    .with_precision_and_scale(precision, scale)
                    .expect("precision ≤ 38 checked in PgKind::of"),
                scale,
            ),
            PgKind::Date => Inner::Date(Date32Builder::with_capacity(capacity)),
            PgKind::Timestamp => Inner::Ts(TimestampMicrosecondBuilder::with_capacity(capacity)),
            PgKind::TimestampTz => {
                Inner::Ts(TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC"))
            }
            PgKind::Bytea => Inner::Bin(BinaryBuilder::with_capacity(capacity, capacity * 16)),
            PgKind::Text => Inner::Text(StringBuilder::with_capacity(capacity, capacity * 16)),
        };
        ColumnBuilder {
            kind,
            inner,
            unrepresentable: 0,
        }
    }

    pub fn kind(&self) -> PgKind {
        self.kind
    }

    pub fn append_null(&mut self) {
        match &mut self.inner {
            Inner::Bool(b) => b.append_null(),
            Inner::I16(b) => b.append_null(),
            Inner::I32(b) => b.append_null(),
            Inner::I64(b) => b.append_null(),
            Inner::F32(b) => b.append_null(),
            Inner::F64(b) => b.append_null(),
            Inner::Dec(b, _) => b.append_null(),
            Inner::Date(b) => b.append_null(),
            Inner::Ts(b) => b.append_null(),
            Inner::Bin(b) => b.append_null(),
            Inner::Text(b) => b.append_null(),
        }
    }

    /// Appends one value; `Null`, `Unchanged` and unparseable values append NULL.
    pub fn append(&mut self, v: &Value) {
        let text = match v {
            Value::Text(t) => t,
            Value::Null | Value::Unchanged => return self.append_null(),
            Value::Binary(_) => {
                self.unrepresentable += 1;
                return self.append_null();
            }
        };
        if !self.append_text(text) {
            self.unrepresentable += 1;
            self.append_null();
        }
    }

    /// Appends one text-format value (NULL, counted, when it has no representation).
    pub fn append_bytes(&mut self, text: &[u8]) {
        if !self.append_text(text) {
            self.unrepresentable += 1;
            self.append_null();
        }
    }

    /// Parses a text-format value; false when it has no representation in the Arrow type.
    fn append_text(&mut self, t: &[u8]) -> bool {
        let s = match std::str::from_utf8(t) {
            Ok(s) => s,
            Err(_) => return false,
        };
        match &mut self.inner {
            Inner::Bool(b) => match s {
                "t" => b.append_value(true),
                "f" => b.append_value(false),
                _ => return false,
            },
            Inner::I16(b) => match s.parse() {
                Ok(v) => b.append_value(v),
                Err(_) => return false,
            },
            Inner::I32(b) => match s.parse() {
                Ok(v) => b.append_value(v),
                Err(_) => return false,
            },
            Inner::I64(b) => match s.parse() {
                Ok(v) => b.append_value(v),
                Err(_) => return false,
            },
            Inner::F32(b) => match parse_float(s) {
                Some(v) => b.append_value(v as f32),
                None => return false,
            },
            Inner::F64(b) => match parse_float(s) {
                Some(v) => b.append_value(v),
                None => return false,
            },
            Inner::Dec(b, scale) => match parse_decimal(s, *scale) {
                Some(v) => b.append_value(v),
                None => return false,
            },
            Inner::Date(b) => match parse_date(s) {
                Some(days) => b.append_value(days),
                None => return false,
            },
            Inner::Ts(b) => match parse_timestamp(s) {
                Some(us) => b.append_value(us),
                None => return false,
            },
            Inner::Bin(b) => match parse_bytea_hex(s) {
                Some(v) => b.append_value(v),
                None => return false,
            },
            Inner::Text(b) => b.append_value(s),
        }
        true
    }

    pub fn finish(mut self) -> ArrayRef {
        match &mut self.inner {
            Inner::Bool(b) => Arc::new(b.finish()),
            Inner::I16(b) => Arc::new(b.finish()),
            Inner::I32(b) => Arc::new(b.finish()),
            Inner::I64(b) => Arc::new(b.finish()),
            Inner::F32(b) => Arc::new(b.finish()),
            Inner::F64(b) => Arc::new(b.finish()),
            Inner::Dec(b, _) => Arc::new(b.finish()),
            Inner::Date(b) => Arc::new(b.finish()),
            Inner::Ts(b) => Arc::new(b.finish()),
            Inner::Bin(b) => Arc::new(b.finish()),
            Inner::Text(b) => Arc::new(b.finish()),
        }
    }
}

fn parse_float(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// "-123.4500" at scale 2 → -12345; values with more fractional digits than the scale, or NaN /
/// Infinity, are not representable.
pub fn parse_decimal(s: &str, scale: i8) -> Option<i128> {
    let (neg, digits) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let scale = scale.max(0) as usize;
    let frac_trimmed = frac.trim_end_matches('0');
    if frac_trimmed.len() > scale {
        return None;
    }
    let mut v: i128 = 0;
    for c in int.bytes().chain(frac.bytes().take(scale)) {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((c - b'0') as i128)?;
    }
    for _ in frac.len().min(scale)..scale {
        v = v.checked_mul(10)?;
    }
    if !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(if neg { -v } else { v })
}

fn num(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// "2024-02-29" or "0044-03-15 BC" → days since 1970-01-01.
pub fn parse_date(s: &str) -> Option<i32> {
    let (s, bc) = match s.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    let mut parts = s.splitn(3, '-');
    let y = num(parts.next()?)? as i32;
    let m = num(parts.next()?)?;
    let d = num(parts.next()?)?;
    let year = if bc { 1 - y } else { y };
    let date = chrono::NaiveDate::from_ymd_opt(year, m, d)?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from((date - epoch).num_days()).ok()
}

/// "2024-02-29 12:34:56.789+00" (offset optional, BC allowed) → µs since the Unix epoch, UTC.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let (s, bc) = match s.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    let (date, rest) = s.split_once(' ')?;
    let date = if bc {
        format!("{date} BC")
    } else {
        date.to_string()
    };
    let days = parse_date(&date)? as i64;
    // split off a +HH[:MM[:SS]] / -HH… offset
    let (time, offset_s) = match rest.rfind(['+', '-']) {
        Some(i) => {
            let (t, off) = rest.split_at(i);
            let sign = if off.starts_with('-') { -1 } else { 1 };
            let mut secs = 0i64;
            for (i, p) in off[1..].split(':').enumerate() {
                let v = num(p)? as i64;
                secs += v * [3600, 60, 1].get(i)?;
            }
            (t, sign * secs)
        }
        None => (rest, 0),
    };
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut hms = hms.splitn(3, ':');
    let h = num(hms.next()?)? as i64;
    let mi = num(hms.next()?)? as i64;
    let se = num(hms.next()?)? as i64;
    if h > 24 || mi > 59 || se > 60 || frac.len() > 6 {
        return None;
    }
    let mut us = 0i64;
    if !frac.is_empty() {
        us = num(frac)? as i64 * 10i64.pow(6 - frac.len() as u32);
    }
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset_s;
    secs.checked_mul(1_000_000)?.checked_add(us)
}

/// bytea hex output "\x0aff" → bytes.
pub fn parse_bytea_hex(s: &str) -> Option<Vec<u8>> {
    let hex = s.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let val = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    hex.as_bytes()
        .chunks(2)
        .map(|p| Some(val(p[0])? << 4 | val(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn numeric_typmod_decides_decimal_or_text() {
        // numeric(10,2): typmod = (10 << 16 | 2) + 4
        assert_eq!(
            PgKind::of(oid::NUMERIC, (10 << 16 | 2) + 4),
            PgKind::Decimal {
                precision: 10,
                scale: 2
            }
        );
        assert_eq!(PgKind::of(oid::NUMERIC, -1), PgKind::Text);
        assert_eq!(PgKind::of(oid::NUMERIC, (60 << 16) + 4), PgKind::Text);
        assert_eq!(
            PgKind::of(999_999, -1),
            PgKind::Text,
            "unknown types keep text"
        );
    }

    #[test]
    fn decimals() {
        assert_eq!(parse_decimal("123.45", 2), Some(12345));
        assert_eq!(parse_decimal("-0.5", 3), Some(-500));
        assert_eq!(parse_decimal("7", 2), Some(700));
        assert_eq!(parse_decimal("1.230", 2), Some(123));
        assert_eq!(parse_decimal("1.234", 2), None);
        assert_eq!(parse_decimal("NaN", 2), None);
        assert_eq!(parse_decimal("", 2), None);
        assert_eq!(parse_decimal("-", 2), None);
    }

    #[test]
    fn dates_and_timestamps() {
        assert_eq!(parse_date("1970-01-02"), Some(1));
        assert_eq!(parse_date("1969-12-31"), Some(-1));
        assert_eq!(parse_date("infinity"), None);
        assert_eq!(parse_date("0001-01-01 BC"), parse_date("0000-01-01"));
        assert_eq!(parse_timestamp("1970-01-01 00:00:01.5"), Some(1_500_000));
        assert_eq!(parse_timestamp("1970-01-01 01:00:00+01"), Some(0));
        assert_eq!(
            parse_timestamp("1970-01-01 00:00:00-00:30"),
            Some(1_800_000_000)
        );
        assert_eq!(
            parse_timestamp("2024-02-29 23:59:59.999999+00"),
            Some(1_709_251_199_999_999)
        );
        assert_eq!(parse_timestamp("-infinity"), None);
    }

    #[test]
    fn bytea() {
        assert_eq!(parse_bytea_hex("\\x00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(parse_bytea_hex("\\x0"), None);
        assert_eq!(parse_bytea_hex("abc"), None);
    }

    #[test]
    fn unrepresentable_values_become_null_and_are_counted() {
        let mut b = ColumnBuilder::new(
            PgKind::Decimal {
                precision: 5,
                scale: 1,
            },
            2,
        );
        b.append(&Value::Text("NaN".into()));
        b.append(&Value::Text("12.5".into()));
        assert_eq!(b.unrepresentable, 1);
        let a = b.finish();
        assert_eq!(a.null_count(), 1);
    }

    proptest! {
        #[test]
        fn decimal_text_round_trip(v in -99_999_999_999i64..99_999_999_999i64, scale in 0i8..6) {
            let d = 10i64.pow(scale as u32);
            let text = if scale == 0 { v.to_string() } else {
                format!("{}{}.{:0width$}", if v < 0 { "-" } else { "" }, (v / d).abs(), (v % d).abs(), width = scale as usize)
            };
            prop_assert_eq!(parse_decimal(&text, scale), Some(v as i128));
        }

        #[test]
        fn timestamp_round_trip(us in -62_135_596_800_000_000i64..253_402_300_799_999_999i64) {
            let dt = chrono::DateTime::from_timestamp_micros(us).unwrap();
            let text = dt.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
            prop_assert_eq!(parse_timestamp(&text), Some(us));
        }

        #[test]
        fn parsers_never_panic(s in "\\PC{0,40}") {
            let _ = parse_decimal(&s, 3);
            let _ = parse_date(&s);
            let _ = parse_timestamp(&s);
            let _ = parse_bytea_hex(&s);
        }
    }
}
