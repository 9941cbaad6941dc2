//! Postgres types → Arrow types, and pgoutput text values → Arrow arrays.
//!
//! One mapping, documented in `schemas/type-mapping.md`. The walsender session is pinned to
//! `DateStyle=ISO`, `TimeZone=UTC`, `bytea_output=hex`, `extra_float_digits=3`, so the text forms
//! parsed here are fixed. Types without a native mapping keep Postgres' exact text form (Utf8), so no
//! value is ever lost. A value that the Arrow type cannot hold (numeric NaN, ±infinity dates) becomes
//! NULL and is counted as unrepresentable, never silently rounded.

use std::sync::Arc;

use arrow::array::NullBufferBuilder;
use arrow::array::{
    ArrayBuilder, ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder,
    Float32Builder, Float64Builder, Int16Builder, Int32Builder, Int64Builder, ListArray,
    PrimitiveBuilder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{ArrowPrimitiveType, DataType, Field, TimeUnit};

use super::array_text::ParsedArray;
use super::pgoutput::{Column, Value};
use super::text_format::{
    parse_bytea_hex, parse_date, parse_decimal, parse_float, parse_i64, parse_timestamp,
};

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
    /// declared precision or with precision > 38, enums, intervals and other types.
    Text,
}

/// The name of a list's element field, as Delta (and the kernel's Arrow conversion) spell it.
pub const LIST_ELEMENT: &str = "element";

/// The Arrow type of a column: its (base) type, in as many levels of lists as the array
/// dimensions it declares.
pub fn column_type(c: &Column) -> DataType {
    list_type(PgKind::of(c.type_oid, c.type_modifier).arrow_type(), c.dims)
}

fn list_type(mut t: DataType, dims: u8) -> DataType {
    for _ in 0..dims {
        t = DataType::List(Arc::new(Field::new(LIST_ELEMENT, t, true)));
    }
    t
}

/// A builder for a column's values.
pub fn column_builder(c: &Column, capacity: usize) -> ColumnBuilder {
    let kind = PgKind::of(c.type_oid, c.type_modifier);
    if c.dims == 0 {
        ColumnBuilder::new(kind, capacity)
    } else {
        ColumnBuilder::array(kind, c.dims, capacity)
    }
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
    inner: Inner,
    /// Values that were present but could not be represented (stored as NULL).
    pub unrepresentable: u64,
    /// Those values' exact text, by row: they go to the companion column
    /// `_walden_unrepresentable` (see `batch::finish_columns`).
    pub rejected: Vec<(usize, String)>,
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
    Bin(BinaryBuilder, Vec<u8>),
    Text(StringBuilder),
    List(Box<Lists>),
}

/// Arrays of `dims` dimensions: list offsets per level (outermost first), the elements in one
/// scalar builder.
struct Lists {
    elements: ColumnBuilder,
    offsets: Vec<Vec<i32>>,
    nulls: NullBufferBuilder,
    scratch: ParsedArray,
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
            PgKind::Bytea => Inner::Bin(
                BinaryBuilder::with_capacity(capacity, capacity * 16),
                Vec::new(),
            ),
            PgKind::Text => Inner::Text(StringBuilder::with_capacity(capacity, capacity * 16)),
        };
        ColumnBuilder {
            inner,
            unrepresentable: 0,
            rejected: Vec::new(),
        }
    }

    /// A builder of arrays of `dims` dimensions of `element` values. A value of other
    /// dimensions, with lower bounds other than 1, or with an element the element type cannot
    /// hold, is unrepresentable as a whole (NULL, exact text kept aside); an empty array is an
    /// empty list.
    pub fn array(element: PgKind, dims: u8, capacity: usize) -> Self {
        let lists = Lists {
            elements: ColumnBuilder::new(element, capacity),
            offsets: vec![vec![0]; dims.max(1) as usize],
            nulls: NullBufferBuilder::new(capacity),
            scratch: ParsedArray::default(),
        };
        ColumnBuilder {
            inner: Inner::List(Box::new(lists)),
            unrepresentable: 0,
            rejected: Vec::new(),
        }
    }

    /// Rows appended so far.
    pub fn len(&self) -> usize {
        match &self.inner {
            Inner::Bool(b) => b.len(),
            Inner::I16(b) => b.len(),
            Inner::I32(b) => b.len(),
            Inner::I64(b) => b.len(),
            Inner::F32(b) => b.len(),
            Inner::F64(b) => b.len(),
            Inner::Dec(b, _) => b.len(),
            Inner::Date(b) => b.len(),
            Inner::Ts(b) => b.len(),
            Inner::Bin(b, _) => b.len(),
            Inner::Text(b) => b.len(),
            Inner::List(l) => l.nulls.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A value the Arrow type cannot hold: NULL in the column, its text kept aside.
    fn reject(&mut self, text: &[u8]) {
        self.unrepresentable += 1;
        let row = self.len();
        self.rejected
            .push((row, String::from_utf8_lossy(text).into_owned()));
        self.append_null();
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
            Inner::Bin(b, _) => b.append_null(),
            Inner::Text(b) => b.append_null(),
            Inner::List(l) => {
                let top = &mut l.offsets[0];
                top.push(*top.last().expect("starts with 0"));
                l.nulls.append_null();
            }
        }
    }

    /// Appends one value; `Null`, `Unchanged` and unparseable values append NULL.
    pub fn append(&mut self, v: &Value) {
        let text = match v {
            Value::Text(t) => t,
            Value::Null | Value::Unchanged => return self.append_null(),
            // walden asks for text; a binary value is kept as its hex form.
            Value::Binary(b) => {
                let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                return self.reject(format!("\\x{hex}").as_bytes());
            }
        };
        if !self.append_text(text) {
            self.reject(text);
        }
    }

    /// Appends one text-format value (NULL, counted and kept aside, when it has no
    /// representation).
    pub fn append_bytes(&mut self, text: &[u8]) {
        if !self.append_text(text) {
            self.reject(text);
        }
    }

    /// Parses a text-format value; false when it has no representation in the Arrow type.
    fn append_text(&mut self, t: &[u8]) -> bool {
        self.take(t, true)
    }

    /// Parses a text-format value and, when `write`, appends it; false (nothing appended) when
    /// it has no representation in the Arrow type.
    fn take(&mut self, t: &[u8], write: bool) -> bool {
        match &mut self.inner {
            Inner::Bool(b) => match t {
                b"t" | b"f" if !write => {}
                b"t" => b.append_value(true),
                b"f" => b.append_value(false),
                _ => return false,
            },
            Inner::I16(b) => {
                return put(b, parse_i64(t).and_then(|v| i16::try_from(v).ok()), write)
            }
            Inner::I32(b) => {
                return put(b, parse_i64(t).and_then(|v| i32::try_from(v).ok()), write)
            }
            Inner::I64(b) => return put(b, parse_i64(t), write),
            Inner::F32(b) => return put(b, parse_float(t).map(|v| v as f32), write),
            Inner::F64(b) => return put(b, parse_float(t), write),
            Inner::Dec(b, scale) => return put(b, parse_decimal(t, *scale), write),
            Inner::Date(b) => return put(b, parse_date(t), write),
            Inner::Ts(b) => return put(b, parse_timestamp(t), write),
            Inner::Bin(b, scratch) => {
                scratch.clear();
                if !parse_bytea_hex(t, scratch) {
                    return false;
                }
                if write {
                    b.append_value(&scratch[..]);
                }
            }
            Inner::Text(b) => match simdutf8::basic::from_utf8(t) {
                Ok(s) if write => b.append_value(s),
                Ok(_) => {}
                Err(_) => return false,
            },
            Inner::List(l) => return write && l.append(t),
        }
        true
    }

    pub fn finish(self) -> ArrayRef {
        match self.inner {
            Inner::Bool(mut b) => Arc::new(b.finish()),
            Inner::I16(mut b) => Arc::new(b.finish()),
            Inner::I32(mut b) => Arc::new(b.finish()),
            Inner::I64(mut b) => Arc::new(b.finish()),
            Inner::F32(mut b) => Arc::new(b.finish()),
            Inner::F64(mut b) => Arc::new(b.finish()),
            Inner::Dec(mut b, _) => Arc::new(b.finish()),
            Inner::Date(mut b) => Arc::new(b.finish()),
            Inner::Ts(mut b) => Arc::new(b.finish()),
            Inner::Bin(mut b, _) => Arc::new(b.finish()),
            Inner::Text(mut b) => Arc::new(b.finish()),
            Inner::List(l) => l.finish(),
        }
    }
}

impl Lists {
    /// The elements wrapped in one list level per dimension, innermost first; NULLs at the top.
    fn finish(mut self) -> ArrayRef {
        let mut values = self.elements.finish();
        let top_nulls = self.nulls.finish();
        for (level, offsets) in self.offsets.into_iter().enumerate().rev() {
            let field = Arc::new(Field::new(LIST_ELEMENT, values.data_type().clone(), true));
            let nulls = if level == 0 { top_nulls.clone() } else { None };
            values = Arc::new(ListArray::new(
                field,
                OffsetBuffer::new(offsets.into()),
                values,
                nulls,
            ));
        }
        values
    }

    /// Appends one array value; false (nothing appended) when it cannot be held exactly.
    fn append(&mut self, t: &[u8]) -> bool {
        let a = &mut self.scratch;
        if !a.parse(t) || !(a.dims.is_empty() || a.dims.len() == self.offsets.len()) {
            return false;
        }
        let elements = &mut self.elements;
        if !(0..a.elems.len()).all(|i| a.element(i).is_none_or(|e| elements.take(e, false))) {
            return false;
        }
        // Level l holds (d0·…·d(l-1)) lists of d(l) entries each; `{}` is one empty list.
        let mut lists = 1usize;
        for (level, offsets) in self.offsets.iter_mut().enumerate() {
            let len = a.dims.get(level).copied().unwrap_or(0) as i32;
            let mut end = *offsets.last().expect("starts with 0");
            for _ in 0..lists {
                end += len;
                offsets.push(end);
            }
            if a.dims.is_empty() {
                break;
            }
            lists *= a.dims[level];
        }
        for i in 0..a.elems.len() {
            match a.element(i) {
                Some(e) => {
                    elements.take(e, true);
                }
                None => elements.append_null(),
            }
        }
        self.nulls.append_non_null();
        true
    }
}

/// Appends a parsed value when `write`; false (nothing appended) when there is none.
fn put<T: ArrowPrimitiveType>(
    b: &mut PrimitiveBuilder<T>,
    v: Option<T::Native>,
    write: bool,
) -> bool {
    match v {
        Some(v) => {
            if write {
                b.append_value(v);
            }
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn unrepresentable_values_become_null_and_are_counted() {
        let mut b = ColumnBuilder::new(
            PgKind::Decimal {
                precision: 5,
                scale: 1,
            },
            2,
        );
        b.append(&Value::Text("12.5".into()));
        b.append(&Value::Text("NaN".into()));
        assert_eq!(b.unrepresentable, 1);
        assert_eq!(b.rejected, vec![(1, "NaN".to_string())]);
        let a = b.finish();
        assert_eq!(a.null_count(), 1);
    }

    #[test]
    fn arrays_become_nested_lists_or_keep_their_text() {
        use arrow::array::{Array, AsArray, Int32Array};
        use arrow::datatypes::Int32Type;
        let mut b = ColumnBuilder::array(PgKind::Int32, 2, 4);
        for v in [
            "{{1,NULL},{3,4}}",
            "{}",
            "{1,2}",
            "[0:0]={{1}}",
            "{{5}}",
            "{{x}}",
        ] {
            b.append(&Value::Text(v.into()));
        }
        b.append_null();
        assert_eq!(b.unrepresentable, 3);
        let rejected: Vec<usize> = b.rejected.iter().map(|r| r.0).collect();
        assert_eq!(rejected, vec![2, 3, 5]);
        let a = b.finish();
        assert_eq!(
            a.data_type(),
            &list_type(DataType::Int32, 2),
            "lists of lists, elements named as Delta names them"
        );
        let outer = a.as_list::<i32>();
        assert_eq!(outer.len(), 7);
        let nulls: Vec<bool> = (0..7).map(|i| outer.is_null(i)).collect();
        assert_eq!(nulls, [false, false, true, true, false, true, true]);
        let rows: Vec<Vec<Vec<Option<i32>>>> = [0, 1, 4]
            .iter()
            .map(|&r| {
                let inner = outer.value(r);
                let inner = inner.as_list::<i32>();
                (0..inner.len())
                    .map(|i| {
                        let v = inner.value(i);
                        let v: &Int32Array = v.as_primitive::<Int32Type>();
                        v.iter().collect()
                    })
                    .collect()
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                vec![vec![Some(1), None], vec![Some(3), Some(4)]],
                vec![],
                vec![vec![Some(5)]],
            ]
        );
    }
}
