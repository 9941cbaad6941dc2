//! Parsers for Postgres' text output forms, on bytes.
//!
//! Both the stream (pgoutput text tuples) and the snapshot (COPY text) deliver values in the
//! output form fixed by the session settings (`DateStyle=ISO`, `TimeZone=UTC`,
//! `bytea_output=hex`, `extra_float_digits=3`). These parsers read exactly those forms straight
//! from the bytes: no UTF-8 validation, no allocation, no calendar library on the hot path.
//! Anything else returns `None` (the caller stores NULL and counts the value as unrepresentable).

/// "-123" → -123; ASCII digits with an optional sign, overflow is `None`.
pub fn parse_i64(b: &[u8]) -> Option<i64> {
    let (neg, digits) = match b.first()? {
        b'-' => (true, &b[1..]),
        b'+' => (false, &b[1..]),
        _ => (false, b),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(d as u64)?;
    }
    if neg {
        0i64.checked_sub_unsigned(v)
    } else {
        i64::try_from(v).ok()
    }
}

/// "-123.4500" at scale 2 → -12345; values with more (non-zero) fractional digits than the
/// scale, or NaN / Infinity, are not representable.
pub fn parse_decimal(b: &[u8], scale: i8) -> Option<i128> {
    let (neg, digits) = match b.first()? {
        b'-' => (true, &b[1..]),
        b'+' => (false, &b[1..]),
        _ => (false, b),
    };
    let scale = scale.max(0) as usize;
    let mut v: i128 = 0;
    let mut seen_digit = false;
    let mut frac_digits: Option<usize> = None;
    for &c in digits {
        if c == b'.' {
            if frac_digits.is_some() {
                return None;
            }
            frac_digits = Some(0);
            continue;
        }
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        seen_digit = true;
        match &mut frac_digits {
            Some(n) if *n >= scale => {
                if d != 0 {
                    return None;
                }
            }
            Some(n) => {
                *n += 1;
                v = v.checked_mul(10)?.checked_add(d as i128)?;
            }
            None => v = v.checked_mul(10)?.checked_add(d as i128)?,
        }
    }
    if !seen_digit {
        return None;
    }
    for _ in frac_digits.unwrap_or(0)..scale {
        v = v.checked_mul(10)?;
    }
    Some(if neg { -v } else { v })
}

/// A run of 1–18 ASCII digits at the start of `b`, and what follows it.
fn digits(b: &[u8]) -> Option<(i64, &[u8])> {
    let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 || n > 18 {
        return None;
    }
    let v = b[..n].iter().fold(0i64, |v, &c| v * 10 + (c - b'0') as i64);
    Some((v, &b[n..]))
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (year 0 = 1 BC), or `None` if the date
/// does not exist.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> Option<i64> {
    const DAYS: [i64; 12] = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&m) || d < 1 {
        return None;
    }
    let max = DAYS[(m - 1) as usize] + i64::from(m == 2 && is_leap(y));
    if d > max {
        return None;
    }
    // Counting from March keeps the leap day at the end of the year.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// "YYYY-MM-DD" (year of any length) → days since 1970-01-01; `bc` for a " BC" suffix.
fn date_days(b: &[u8], bc: bool) -> Option<i64> {
    let (y, r) = digits(b)?;
    let (m, r) = digits(r.strip_prefix(b"-")?)?;
    let (d, r) = digits(r.strip_prefix(b"-")?)?;
    // Postgres' dates end in 5874897 AD; longer years are not dates.
    if !r.is_empty() || y > 9_999_999 {
        return None;
    }
    days_from_civil(if bc { 1 - y } else { y }, m, d)
}

fn strip_bc(b: &[u8]) -> (&[u8], bool) {
    match b.strip_suffix(b" BC") {
        Some(rest) => (rest, true),
        None => (b, false),
    }
}

/// "2024-02-29" or "0044-03-15 BC" → days since 1970-01-01.
pub fn parse_date(b: &[u8]) -> Option<i32> {
    let (b, bc) = strip_bc(b);
    i32::try_from(date_days(b, bc)?).ok()
}

/// "2024-02-29 12:34:56.789+00" (offset `±HH[:MM[:SS]]` optional, " BC" allowed) → µs since
/// the Unix epoch, UTC.
pub fn parse_timestamp(b: &[u8]) -> Option<i64> {
    let (b, bc) = strip_bc(b);
    let sp = memchr::memchr(b' ', b)?;
    let days = date_days(&b[..sp], bc)?;
    let (h, r) = digits(&b[sp + 1..])?;
    let (mi, r) = digits(r.strip_prefix(b":")?)?;
    let (se, mut r) = digits(r.strip_prefix(b":")?)?;
    if h > 24 || mi > 59 || se > 60 {
        return None;
    }
    let mut us = 0;
    if let Some(f) = r.strip_prefix(b".") {
        let n = f.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 6 {
            return None;
        }
        us = digits(f)?.0 * 10i64.pow(6 - n as u32);
        r = &f[n..];
    }
    let mut offset = 0;
    if let Some((&sign, rest)) = r.split_first() {
        let sign = match sign {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let (oh, mut rest) = digits(rest)?;
        if oh > 99 {
            return None;
        }
        offset = oh * 3600;
        for unit in [60, 1] {
            match rest.strip_prefix(b":") {
                Some(x) => {
                    let (v, x) = digits(x)?;
                    if v > 59 {
                        return None;
                    }
                    offset += v * unit;
                    rest = x;
                }
                None => break,
            }
        }
        if !rest.is_empty() {
            return None;
        }
        offset *= sign;
    }
    let secs = days
        .checked_mul(86_400)?
        .checked_add(h * 3600 + mi * 60 + se - offset)?;
    secs.checked_mul(1_000_000)?.checked_add(us)
}

/// bytea hex output "\x0aff" → bytes, appended to `out`; false (and `out` unchanged in length
/// meaning) on malformed input.
pub fn parse_bytea_hex(b: &[u8], out: &mut Vec<u8>) -> bool {
    let Some(hex) = b.strip_prefix(b"\\x") else {
        return false;
    };
    if hex.len() % 2 != 0 {
        return false;
    }
    let val = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    let start = out.len();
    out.reserve(hex.len() / 2);
    for p in hex.chunks_exact(2) {
        match (val(p[0]), val(p[1])) {
            (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
            _ => {
                out.truncate(start);
                return false;
            }
        }
    }
    true
}

/// "NaN", "Infinity", "-Infinity" or a decimal float.
pub fn parse_float(b: &[u8]) -> Option<f64> {
    match b {
        b"NaN" => Some(f64::NAN),
        b"Infinity" => Some(f64::INFINITY),
        b"-Infinity" => Some(f64::NEG_INFINITY),
        _ => std::str::from_utf8(b).ok()?.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The calendar reference: chrono (whose range is narrower than Postgres').
    fn chrono_days(y: i32, m: u32, d: u32) -> Option<i64> {
        let date = chrono::NaiveDate::from_ymd_opt(y, m, d)?;
        Some((date - chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?).num_days())
    }

    fn bytea(s: &str) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        parse_bytea_hex(s.as_bytes(), &mut out).then_some(out)
    }

    #[test]
    fn integers() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-42"), Some(-42));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_i64(b"9223372036854775808"), None);
        assert_eq!(parse_i64(b"-"), None);
        assert_eq!(parse_i64(b""), None);
        assert_eq!(parse_i64(b"1e3"), None);
    }

    #[test]
    fn decimals() {
        assert_eq!(parse_decimal(b"123.45", 2), Some(12345));
        assert_eq!(parse_decimal(b"-0.5", 3), Some(-500));
        assert_eq!(parse_decimal(b"7", 2), Some(700));
        assert_eq!(parse_decimal(b"1.230", 2), Some(123));
        assert_eq!(parse_decimal(b".5", 1), Some(5));
        assert_eq!(parse_decimal(b"1.234", 2), None);
        assert_eq!(parse_decimal(b"1.2.3", 2), None);
        assert_eq!(parse_decimal(b"NaN", 2), None);
        assert_eq!(parse_decimal(b"", 2), None);
        assert_eq!(parse_decimal(b"-", 2), None);
        assert_eq!(parse_decimal(b".", 2), None);
    }

    #[test]
    fn dates_and_timestamps() {
        assert_eq!(parse_date(b"1970-01-02"), Some(1));
        assert_eq!(parse_date(b"1969-12-31"), Some(-1));
        assert_eq!(parse_date(b"2023-02-29"), None);
        assert_eq!(parse_date(b"2024-02-29"), Some(19_782));
        assert_eq!(parse_date(b"infinity"), None);
        assert_eq!(parse_date(b"0001-01-01 BC"), parse_date(b"0000-01-01"));
        assert_eq!(parse_date(b"0044-03-15 BC"), Some(-735_160)); // Postgres agrees
        assert_eq!(parse_date(b"5874897-12-31"), Some(2_145_042_905)); // Postgres agrees
        assert_eq!(parse_timestamp(b"1970-01-01 00:00:01.5"), Some(1_500_000));
        assert_eq!(parse_timestamp(b"1970-01-01 01:00:00+01"), Some(0));
        assert_eq!(
            parse_timestamp(b"1970-01-01 00:00:00-00:30"),
            Some(1_800_000_000)
        );
        assert_eq!(
            parse_timestamp(b"2024-02-29 23:59:59.999999+00"),
            Some(1_709_251_199_999_999)
        );
        assert_eq!(
            parse_timestamp(b"0044-03-15 12:00:00+00 BC"),
            chrono_days(-43, 3, 15).map(|d| (d * 86_400 + 43_200) * 1_000_000)
        );
        assert_eq!(parse_timestamp(b"-infinity"), None);
        assert_eq!(parse_timestamp(b"2024-01-01 12:00:00.1234567"), None);
        assert_eq!(parse_timestamp(b"2024-01-01 12:00:00+0x"), None);
    }

    #[test]
    fn bytea_hex() {
        assert_eq!(bytea("\\x00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(bytea("\\x"), Some(vec![]));
        assert_eq!(bytea("\\x0"), None);
        assert_eq!(bytea("\\x0g"), None);
        assert_eq!(bytea("abc"), None);
    }

    proptest! {
        #[test]
        fn integer_round_trip(v in any::<i64>()) {
            prop_assert_eq!(parse_i64(v.to_string().as_bytes()), Some(v));
        }

        #[test]
        fn decimal_text_round_trip(v in -99_999_999_999i64..99_999_999_999i64, scale in 0i8..6) {
            let d = 10i64.pow(scale as u32);
            let text = if scale == 0 { v.to_string() } else {
                format!("{}{}.{:0width$}", if v < 0 { "-" } else { "" }, (v / d).abs(), (v % d).abs(), width = scale as usize)
            };
            prop_assert_eq!(parse_decimal(text.as_bytes(), scale), Some(v as i128));
        }

        #[test]
        fn dates_agree_with_chrono(y in -9999i32..=9999, m in 0u32..=13, d in 0u32..=32) {
            let text = if y <= 0 {
                format!("{:04}-{:02}-{:02} BC", 1 - y, m, d)
            } else {
                format!("{y:04}-{m:02}-{d:02}")
            };
            prop_assert_eq!(parse_date(text.as_bytes()).map(i64::from), chrono_days(y, m, d), "{}", text);
        }

        #[test]
        fn timestamp_round_trip(us in -62_135_596_800_000_000i64..253_402_300_799_999_999i64, off_min in -900i64..900) {
            let dt = chrono::DateTime::from_timestamp_micros(us).unwrap();
            let text = dt.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
            prop_assert_eq!(parse_timestamp(text.as_bytes()), Some(us));
            // The same instant written in another offset.
            let local = dt.naive_utc() + chrono::Duration::minutes(off_min);
            let sign = if off_min < 0 { '-' } else { '+' };
            let text = format!("{}{sign}{:02}:{:02}", local.format("%Y-%m-%d %H:%M:%S%.f"), off_min.abs() / 60, off_min.abs() % 60);
            prop_assert_eq!(parse_timestamp(text.as_bytes()), Some(us), "{}", text);
        }

        #[test]
        fn bytea_round_trip(v in proptest::collection::vec(any::<u8>(), 0..64)) {
            let text: String = std::iter::once("\\x".to_string()).chain(v.iter().map(|b| format!("{b:02x}"))).collect();
            prop_assert_eq!(bytea(&text), Some(v));
        }

        #[test]
        fn parsers_never_panic(s in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = parse_i64(&s);
            let _ = parse_decimal(&s, 3);
            let _ = parse_date(&s);
            let _ = parse_timestamp(&s);
            let _ = parse_float(&s);
            let _ = parse_bytea_hex(&s, &mut Vec::new());
        }

        #[test]
        fn timestamp_like_input_never_panics(s in "[0-9]{1,12}-[0-9]{1,3}-[0-9]{1,3} [0-9]{1,20}:[0-9]{1,3}:[0-9]{1,3}(\\.[0-9]{0,8})?([+-][0-9]{1,20}(:[0-9]{1,3}){0,3})?( BC)?") {
            let _ = parse_timestamp(s.as_bytes());
        }
    }
}
