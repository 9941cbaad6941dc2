//! Parser for Postgres's array text form (`array_out`), on bytes.
//!
//! `{1,2,NULL}`, `{{1,2},{3,4}}`, `{}`, `{"a b","say \"hi\"",NULL,"NULL"}`. Elements are
//! quoted when they are empty, spell NULL, or hold whitespace, `{`, `}`, `,`, `"` or `\`; inside
//! quotes `\` escapes the next byte. An unquoted `NULL` is a NULL element. Arrays whose lower
//! bounds are not 1 print a dimension prefix (`[0:1]={1,2}`): those are not parsed (their exact
//! text is kept by the caller), nor is anything malformed.

/// Maximum number of dimensions of a Postgres array (`MAXDIM`).
pub const MAX_DIMS: usize = 6;

/// One parsed array: its shape and its elements in row-major order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ParsedArray {
    /// Length of each dimension, outermost first; empty for `{}`.
    pub dims: Vec<usize>,
    /// Each element's byte range in `buf`, `None` for NULL.
    pub elems: Vec<Option<(usize, usize)>>,
    /// The unescaped element bytes.
    pub buf: Vec<u8>,
}

impl ParsedArray {
    pub fn element(&self, i: usize) -> Option<&[u8]> {
        self.elems[i].map(|(a, b)| &self.buf[a..b])
    }

    /// Parses `text` into `self` (reusing its buffers); false when it is not a plain array
    /// text (dimension prefix, malformed, ragged).
    pub fn parse(&mut self, text: &[u8]) -> bool {
        self.dims.clear();
        self.elems.clear();
        self.buf.clear();
        let mut p = Parser {
            b: text,
            at: 0,
            out: self,
        };
        if p.b == b"{}" {
            return true;
        }
        p.level(0) && p.at == p.b.len()
    }
}

struct Parser<'a> {
    b: &'a [u8],
    at: usize,
    out: &'a mut ParsedArray,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.at).copied()
    }

    /// One `{…}` at depth `depth`: sub-arrays or elements, as many as the first of its kind.
    fn level(&mut self, depth: usize) -> bool {
        if depth >= MAX_DIMS || self.peek() != Some(b'{') {
            return false;
        }
        self.at += 1;
        let nested = self.peek() == Some(b'{');
        // Elements sit at the innermost level only, and every level has one length.
        match self.out.dims.len() {
            n if n == depth => self.out.dims.push(0),
            n if n > depth => {
                if nested != (n > depth + 1) {
                    return false;
                }
            }
            _ => return false,
        }
        if !nested && self.out.dims.len() != depth + 1 {
            return false;
        }
        let mut count = 0;
        loop {
            let ok = if nested {
                self.level(depth + 1)
            } else {
                self.element()
            };
            if !ok {
                return false;
            }
            count += 1;
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    break;
                }
                _ => return false,
            }
        }
        let want = &mut self.out.dims[depth];
        if *want == 0 {
            *want = count;
        }
        *want == count
    }

    /// One element, quoted or not.
    fn element(&mut self) -> bool {
        let start = self.out.buf.len();
        if self.peek() == Some(b'"') {
            self.at += 1;
            loop {
                match self.peek() {
                    None => return false,
                    Some(b'"') => {
                        self.at += 1;
                        break;
                    }
                    Some(b'\\') => {
                        let Some(&c) = self.b.get(self.at + 1) else {
                            return false;
                        };
                        self.out.buf.push(c);
                        self.at += 2;
                    }
                    Some(c) => {
                        self.out.buf.push(c);
                        self.at += 1;
                    }
                }
            }
            self.out.elems.push(Some((start, self.out.buf.len())));
            return true;
        }
        while let Some(c) = self.peek() {
            match c {
                b',' | b'}' => break,
                b'{' | b'"' => return false,
                b'\\' => {
                    let Some(&c) = self.b.get(self.at + 1) else {
                        return false;
                    };
                    self.out.buf.push(c);
                    self.at += 2;
                }
                c => {
                    self.out.buf.push(c);
                    self.at += 1;
                }
            }
        }
        let end = self.out.buf.len();
        if end == start {
            return false;
        }
        let value = &self.out.buf[start..end];
        let element = (!value.eq_ignore_ascii_case(b"NULL")).then_some((start, end));
        self.out.elems.push(element);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Option<(Vec<usize>, Vec<Option<String>>)> {
        let mut a = ParsedArray::default();
        a.parse(s.as_bytes()).then(|| {
            let elems = (0..a.elems.len())
                .map(|i| a.element(i).map(|e| String::from_utf8(e.to_vec()).unwrap()))
                .collect();
            (a.dims.clone(), elems)
        })
    }

    fn strs(v: &[Option<&str>]) -> Vec<Option<String>> {
        v.iter().map(|s| s.map(str::to_string)).collect()
    }

    #[test]
    fn arrays_parse_with_shape_nulls_and_quoting() {
        assert_eq!(parse("{}"), Some((vec![], vec![])));
        assert_eq!(
            parse("{1,NULL,-3}"),
            Some((vec![3], strs(&[Some("1"), None, Some("-3")])))
        );
        assert_eq!(
            parse("{{1,2},{3,NULL}}"),
            Some((vec![2, 2], strs(&[Some("1"), Some("2"), Some("3"), None])))
        );
        assert_eq!(
            parse(r#"{"a b","say \"hi\"","NULL","",x,"back\\slash","{}"}"#),
            Some((
                vec![7],
                strs(&[
                    Some("a b"),
                    Some("say \"hi\""),
                    Some("NULL"),
                    Some(""),
                    Some("x"),
                    Some("back\\slash"),
                    Some("{}")
                ])
            ))
        );
        assert_eq!(
            parse("{{{1},{2}},{{3},{4}}}").map(|p| p.0),
            Some(vec![2, 2, 1])
        );
    }

    #[test]
    fn non_plain_arrays_are_refused() {
        for s in [
            "[0:1]={1,2}",
            "{{1,2},{3}}",
            "{{1,2},3}",
            "{1,{2}}",
            "{1,2",
            "{1,,2}",
            "{\"open}",
            "{1}x",
            "",
            "{{{{{{{1}}}}}}}",
        ] {
            assert_eq!(parse(s), None, "{s}");
        }
    }
}
