//! Postgres's text form of values read back from the warehouse, written independently of the
//! decoder, so `walden verify` compares against what Postgres itself prints (`col::text`) and a
//! mapping error in the decoder shows up as drift instead of being repeated on both sides.
//!
//! Each value is reduced to a canonical string: `-` for NULL or `<length in characters>:<text>`.
//! The source computes it in SQL ([`source_columns`]); the mirror side renders it from Arrow
//! ([`render_value`]) under the session settings every connection uses (ISO dates, UTC,
//! `extra_float_digits = 3`, hex bytea).

use arrow::array::{Array, AsArray};
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type,
    Int64Type, TimestampMicrosecondType,
};

use crate::decode::mask::{Rule, TableMask};
use crate::decode::pgoutput::Relation;
use crate::source::replication::quote_ident;

/// The SQL expressions of the canonical form of each of `rel`'s columns (`mask`: the table's
/// masks; a hashed column's text is hashed by the caller).
pub fn source_columns(rel: &Relation, mask: Option<&TableMask>) -> Vec<String> {
    let rules = mask.map(TableMask::kept).unwrap_or_default();
    rel.columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if rules.get(i) == Some(&Rule::Null) {
                // Masked with `null`: the warehouse holds NULL.
                return "'-'".to_string();
            }
            // format('%s', …) prints with the type's output function, as pgoutput and COPY do
            // (a cast to text would print booleans as true/false and trim char(n)).
            let v = format!("format('%s', {})", quote_ident(&c.name));
            format!(
                "CASE WHEN {} IS NULL THEN '-' ELSE length({v})::text || ':' || {v} END",
                quote_ident(&c.name)
            )
        })
        .collect()
}

/// Appends the canonical form of row `row` of column `col` (named `name`) to `out`: `-` for
/// NULL, else `<length>:<text>`. `exact` holds the row's `_walden_unrepresentable` object (the
/// text of values the column type could not hold).
pub fn render_value(
    col: &dyn Array,
    row: usize,
    exact: Option<&serde_json::Map<String, serde_json::Value>>,
    name: &str,
    out: &mut String,
) {
    let text = if col.is_null(row) {
        exact
            .and_then(|m| m.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    } else {
        Some(value_text(col, row))
    };
    match text {
        None => out.push('-'),
        Some(t) => {
            out.push_str(&t.chars().count().to_string());
            out.push(':');
            out.push_str(&t);
        }
    }
}

/// Postgres's text output of one non-NULL value.
fn value_text(col: &dyn Array, row: usize) -> String {
    match col.data_type() {
        DataType::Boolean => if col.as_boolean().value(row) {
            "t"
        } else {
            "f"
        }
        .into(),
        DataType::Int16 => col.as_primitive::<Int16Type>().value(row).to_string(),
        DataType::Int32 => col.as_primitive::<Int32Type>().value(row).to_string(),
        DataType::Int64 => col.as_primitive::<Int64Type>().value(row).to_string(),
        DataType::Float32 => {
            let v = col.as_primitive::<Float32Type>().value(row);
            float_text(
                v.is_nan(),
                v.is_infinite(),
                v.is_sign_negative(),
                &shortest(v, 9),
                6,
            )
        }
        DataType::Float64 => {
            let v = col.as_primitive::<Float64Type>().value(row);
            float_text(
                v.is_nan(),
                v.is_infinite(),
                v.is_sign_negative(),
                &shortest(v, 17),
                15,
            )
        }
        DataType::Decimal128(_, _) => col.as_primitive::<Decimal128Type>().value_as_string(row),
        DataType::Date32 => date_text(col.as_primitive::<Date32Type>().value(row) as i64),
        DataType::Timestamp(_, tz) => timestamp_text(
            col.as_primitive::<TimestampMicrosecondType>().value(row),
            tz.is_some(),
        ),
        DataType::Binary => hex_text(col.as_binary::<i32>().value(row)),
        DataType::BinaryView => hex_text(col.as_binary_view().value(row)),
        DataType::Utf8 => col.as_string::<i32>().value(row).to_string(),
        DataType::Utf8View => col.as_string_view().value(row).to_string(),
        DataType::List(_) => array_text(col.as_list::<i32>().value(row).as_ref()),
        other => format!("<{other}>"),
    }
}

/// `array_out`'s form of one array: `{…}` per dimension, NULL elements as `NULL`, elements
/// quoted when empty, spelling NULL, or holding whitespace, braces, commas, quotes or
/// backslashes (quotes and backslashes escaped).
fn array_text(values: &dyn Array) -> String {
    let mut s = String::from("{");
    for i in 0..values.len() {
        if i > 0 {
            s.push(',');
        }
        if values.is_null(i) {
            s.push_str("NULL");
        } else if let DataType::List(_) = values.data_type() {
            s.push_str(&value_text(values, i));
        } else {
            let e = value_text(values, i);
            let quote = e.is_empty()
                || e.eq_ignore_ascii_case("NULL")
                || e.chars().any(|c| {
                    matches!(
                        c,
                        '"' | '\\' | '{' | '}' | ',' | ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c'
                    )
                });
            if quote {
                s.push('"');
                for c in e.chars() {
                    if c == '"' || c == '\\' {
                        s.push('\\');
                    }
                    s.push(c);
                }
                s.push('"');
            } else {
                s.push_str(&e);
            }
        }
    }
    s.push('}');
    s
}

/// bytea's hex output: `\x` and two lower-case digits a byte.
fn hex_text(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + b.len() * 2);
    s.push_str("\\x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// The shortest decimal that reads back as `v` (`{:e}` form), never one exactly halfway to a
/// neighbour: Postgres's shortest output does not rely on round-half-even when read back, where
/// Rust's does (the float4 3542000128 prints as 3.5420001e+09 there, 3.542e9 here).
fn shortest<F>(v: F, max_digits: usize) -> String
where
    F: std::fmt::LowerExp + std::str::FromStr + PartialEq + Copy,
{
    if format!("{v:e}").parse::<F>().ok() != Some(v) {
        return format!("{v:e}"); // NaN (infinities are printed by name before this is used)
    }
    for digits in 1..=max_digits {
        let s = format!("{:.*e}", digits - 1, v);
        if s.parse::<F>().ok() == Some(v) && !on_bound::<F>(&s, v) {
            return s;
        }
    }
    format!("{v:e}")
}

/// `s` (a `{:e}` decimal that reads back as `v`) lies exactly halfway to a neighbour of `v`: a
/// decimal a hair above or below it reads back as another value.
fn on_bound<F: std::str::FromStr + PartialEq + Copy>(s: &str, v: F) -> bool {
    let Some((mantissa, exp)) = s.split_once('e') else {
        return false;
    };
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let frac = mantissa.split_once('.').map_or(0, |(_, f)| f.len()) as i64;
    let (Ok(digits), Ok(exp)) = (
        mantissa.replace('.', "").parse::<u128>(),
        exp.parse::<i64>(),
    ) else {
        return false;
    };
    if digits == 0 {
        return false;
    }
    let scaled = digits * 10u128.pow(20);
    let exp = exp - frac - 20;
    [scaled + 1, scaled - 1]
        .iter()
        .any(|d| format!("{sign}{d}e{exp}").parse::<F>().ok() != Some(v))
}

/// Postgres's shortest-exact float output (`extra_float_digits > 0`): fixed notation for decimal
/// exponents in [-4, `fixed_below`), otherwise `d.ddde±XX`. `sci` is Rust's shortest `{:e}` form.
fn float_text(nan: bool, inf: bool, negative: bool, sci: &str, fixed_below: i32) -> String {
    if nan {
        return "NaN".into();
    }
    if inf {
        return if negative { "-Infinity" } else { "Infinity" }.into();
    }
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if digits.chars().all(|c| c == '0') {
        return format!("{sign}0");
    }
    if (-4..fixed_below).contains(&exp) {
        let n = digits.len() as i32;
        let out = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if exp + 1 >= n {
            format!("{}{}", digits, "0".repeat((exp + 1 - n) as usize))
        } else {
            let (a, b) = digits.split_at((exp + 1) as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{out}")
    } else {
        let (first, rest) = digits.split_at(1);
        let dot = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{dot}e{esign}{:02}", exp.abs())
    }
}

/// `YYYY-MM-DD`, with ` BC` for years before 1 (ISO DateStyle).
fn date_text(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    let (year, bc) = if y <= 0 { (1 - y, " BC") } else { (y, "") };
    format!("{year:04}-{m:02}-{d:02}{bc}")
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]` (trailing zeros trimmed), `+00` when zoned (TimeZone UTC).
fn timestamp_text(us: i64, zoned: bool) -> String {
    let days = us.div_euclid(86_400_000_000);
    let rem = us.rem_euclid(86_400_000_000);
    let (y, m, d) = civil_from_days(days);
    let (year, bc) = if y <= 0 { (1 - y, " BC") } else { (y, "") };
    let secs = rem / 1_000_000;
    let frac = rem % 1_000_000;
    let mut s = format!(
        "{year:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    if frac != 0 {
        let f = format!("{frac:06}");
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
    if zoned {
        s.push_str("+00");
    }
    s.push_str(bc);
    s
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (year 0 = 1 BC).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The COPY text form of a line (backslash, control characters escaped), as the source's
/// `COPY … TO STDOUT` sends it.
pub fn copy_escape(s: &str, out: &mut Vec<u8>) {
    for b in s.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            8 => out.extend_from_slice(b"\\b"),
            12 => out.extend_from_slice(b"\\f"),
            11 => out.extend_from_slice(b"\\v"),
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f8(v: f64) -> String {
        float_text(
            v.is_nan(),
            v.is_infinite(),
            v.is_sign_negative(),
            &shortest(v, 17),
            15,
        )
    }

    #[test]
    fn floats_print_like_postgres() {
        assert_eq!(f8(0.1), "0.1");
        assert_eq!(f8(100.0), "100");
        assert_eq!(f8(-1.5), "-1.5");
        assert_eq!(f8(0.0001), "0.0001");
        assert_eq!(f8(0.00001), "1e-05");
        assert_eq!(f8(1e15), "1e+15");
        assert_eq!(f8(123456789012345.6), "123456789012345.6");
        assert_eq!(f8(1.2345678901234568e17), "1.2345678901234568e+17");
        assert_eq!(f8(-0.0), "-0");
        assert_eq!(f8(f64::NAN), "NaN");
        assert_eq!(f8(f64::NEG_INFINITY), "-Infinity");
        assert_eq!(f8(1e-300), "1e-300");
        let f4 = |v: f32| {
            float_text(
                v.is_nan(),
                v.is_infinite(),
                v.is_sign_negative(),
                &shortest(v, 9),
                6,
            )
        };
        assert_eq!(f4(3542000128.0), "3.5420001e+09");
        assert_eq!(f4(1.1), "1.1");
        assert_eq!(f4(123456.0), "123456");
        assert_eq!(f4(1234567.0), "1.234567e+06");
        assert_eq!(f4(1e-38), "1e-38");
    }

    #[test]
    fn dates_and_timestamps_print_like_postgres() {
        assert_eq!(date_text(0), "1970-01-01");
        assert_eq!(date_text(19_782), "2024-02-29");
        // 44 BC is astronomical year -43; 1 BC is year 0
        assert_eq!(date_text(days_from_civil(-43, 3, 15)), "0044-03-15 BC");
        assert_eq!(date_text(days_from_civil(0, 12, 31)), "0001-12-31 BC");
        assert_eq!(date_text(days_from_civil(1, 1, 1)), "0001-01-01");
        assert_eq!(date_text(days_from_civil(12345, 6, 7)), "12345-06-07");
        for d in [-800_000i64, -1, 0, 59, 60, 365 * 30, 2_000_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
        assert_eq!(
            timestamp_text(1_709_210_096_789_000, true),
            "2024-02-29 12:34:56.789+00"
        );
        assert_eq!(timestamp_text(-1_000_000, false), "1969-12-31 23:59:59");
    }

    fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let mp = (m as i64 + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d as i64 - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    #[test]
    fn copy_escaping() {
        let mut out = Vec::new();
        copy_escape("a\\b\tc\nd", &mut out);
        assert_eq!(out, b"a\\\\b\\tc\\nd");
    }

    #[test]
    fn arrays_print_like_array_out() {
        use crate::decode::pgoutput::Value;
        use crate::decode::types::{ColumnBuilder, PgKind};
        let texts = [
            r#"{"",NULL,"NULL","a b","a,b","{}","q\"q","back\\slash",x}"#,
            "{{a,b},{c,NULL}}",
            "{}",
        ];
        let mut b = ColumnBuilder::array(PgKind::Text, 1, 3);
        b.append(&Value::Text(texts[0].into()));
        let a = b.finish();
        assert_eq!(value_text(a.as_ref(), 0), texts[0]);
        let mut b = ColumnBuilder::array(PgKind::Text, 2, 3);
        b.append(&Value::Text(texts[1].into()));
        b.append(&Value::Text(texts[2].into()));
        let a = b.finish();
        assert_eq!(value_text(a.as_ref(), 0), texts[1]);
        assert_eq!(value_text(a.as_ref(), 1), texts[2]);
    }
}
