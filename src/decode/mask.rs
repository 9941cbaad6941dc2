//! Masking at ingest: columns whose values must never reach the warehouse in clear.
//!
//! Owns the per-column transform and where it sits: a stream tuple is masked as it is assembled
//! (before it is buffered or spilled to disk), a snapshot field as the COPY text is split (before
//! it reaches a column builder). Everything after sees only the masked relation: a dropped
//! column does not exist, a hashed column is `text`, a nulled column is always NULL. So the
//! changelog, the mirror, the schema history and spill files agree with each other and never
//! hold the clear value. Which columns are masked is configuration (`[privacy.mask]`, read in
//! `crate::privacy`); the hash is keyed (HMAC-SHA256 of the value's text form, lower-case hex),
//! so equal values still join and a key change hashes to the same value in both images.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use ring::hmac;

use super::pgoutput::{Relation, Tuple, Value};
use crate::config::PrivacyConfig;

pub use crate::config::MaskRule as Rule;

/// The keyed hash masked columns and receipts use.
#[derive(Clone)]
pub struct Hasher(Arc<hmac::Key>);

impl Hasher {
    pub fn new(secret: &[u8]) -> Self {
        Hasher(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }

    /// HMAC-SHA256 of `value`, 64 lower-case hex digits.
    pub fn hex(&self, value: &[u8]) -> String {
        let tag = hmac::sign(&self.0, value);
        let mut out = String::with_capacity(64);
        for b in tag.as_ref() {
            out.push(char::from_digit((b >> 4) as u32, 16).expect("a nibble"));
            out.push(char::from_digit((b & 15) as u32, 16).expect("a nibble"));
        }
        out
    }
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hasher(<secret>)")
    }
}

/// The configured masks of every table, by `schema.table`.
#[derive(Debug, Clone, Default)]
pub struct Masks {
    tables: HashMap<String, HashMap<String, Rule>>,
    hasher: Option<Hasher>,
}

impl Masks {
    pub fn new(cfg: &PrivacyConfig) -> Self {
        Masks {
            tables: cfg
                .mask
                .iter()
                .map(|(t, cols)| {
                    (
                        t.clone(),
                        cols.iter().map(|(c, r)| (c.clone(), *r)).collect(),
                    )
                })
                .collect(),
            hasher: cfg.key.as_deref().map(|k| Hasher::new(k.as_bytes())),
        }
    }

    /// The mask of `rel` as the source describes it; `None` when none of its columns is
    /// masked. Refuses to drop or null a replica-identity column (the mirror could not find
    /// the row again); hashing one is fine (equal values hash equal).
    pub fn of(&self, rel: &Relation) -> Result<Option<TableMask>, String> {
        let table = format!("{}.{}", rel.schema, rel.name);
        let Some(cols) = self.tables.get(&table) else {
            return Ok(None);
        };
        let rules: Vec<Rule> = rel
            .columns
            .iter()
            .map(|c| cols.get(&c.name).copied().unwrap_or(Rule::Keep))
            .collect();
        if rules.iter().all(|r| *r == Rule::Keep) {
            return Ok(None);
        }
        if let Some(c) = rel
            .columns
            .iter()
            .zip(&rules)
            .find(|(c, r)| c.key && matches!(r, Rule::Drop | Rule::Null))
        {
            return Err(format!(
                "privacy.mask: column {} of {table} is part of its replica identity, so it cannot be \
                 masked with `drop` or `null` (the mirror could not find its rows); mask it with \
                 `hash`",
                c.0.name
            ));
        }
        let hasher = match (&self.hasher, rules.contains(&Rule::Hash)) {
            (Some(h), _) => h.clone(),
            // Never used: no column of the table is hashed.
            (None, false) => Hasher::new(&[]),
            (None, true) => {
                return Err(format!(
                    "privacy.mask of {table} hashes a column: set privacy.key (WALDEN_PRIVACY__KEY)"
                ))
            }
        };
        Ok(Some(TableMask::new(rules, hasher)))
    }
}

/// The masks of one table, one rule per column of the relation as the source describes it.
#[derive(Debug, Clone)]
pub struct TableMask {
    rules: Vec<Rule>,
    hasher: Hasher,
}

impl PartialEq for TableMask {
    fn eq(&self, other: &Self) -> bool {
        self.rules == other.rules && Arc::ptr_eq(&self.hasher.0, &other.hasher.0)
    }
}

impl Eq for TableMask {}

/// pg_type OID of `text`: what a hashed column becomes.
const TEXT: u32 = 25;

impl TableMask {
    /// `rules[i]` applies to the relation's column `i`.
    pub fn new(rules: Vec<Rule>, hasher: Hasher) -> Self {
        TableMask { rules, hasher }
    }

    /// The relation as the warehouse sees it: dropped columns gone, hashed ones `text`.
    pub fn relation(&self, rel: &Relation) -> Relation {
        let mut out = rel.clone();
        out.columns = rel
            .columns
            .iter()
            .zip(self.rules_for(rel.columns.len()))
            .filter(|(_, r)| *r != Rule::Drop)
            .map(|(c, r)| {
                let mut c = c.clone();
                if r == Rule::Hash {
                    c.type_oid = TEXT;
                    c.type_modifier = -1;
                    c.dims = 0;
                }
                c
            })
            .collect();
        out
    }

    /// The rules of the masked relation's columns (no `Drop` among them), for fields read
    /// after the dropped columns were left out of the query.
    pub fn kept(&self) -> Vec<Rule> {
        self.rules
            .iter()
            .copied()
            .filter(|r| *r != Rule::Drop)
            .collect()
    }

    /// A tuple of the source's relation, masked to the warehouse's. An unchanged TOASTed value
    /// stays unchanged (the mirror keeps its masked value).
    pub fn tuple(&self, t: Tuple) -> Tuple {
        let n = t.0.len();
        Tuple(
            t.0.into_iter()
                .zip(self.rules_for(n))
                .filter(|(_, r)| *r != Rule::Drop)
                .map(|(v, r)| self.value(r, v))
                .collect(),
        )
    }

    fn value(&self, rule: Rule, v: Value) -> Value {
        match (rule, v) {
            (_, Value::Unchanged) => Value::Unchanged,
            (Rule::Null, _) => Value::Null,
            (Rule::Hash, Value::Text(b) | Value::Binary(b)) => {
                Value::Text(Bytes::from(self.hasher.hex(&b)))
            }
            (_, v) => v,
        }
    }

    /// The hash of one text value (a snapshot field, unescaped).
    pub fn hash(&self, value: &[u8]) -> String {
        self.hasher.hex(value)
    }

    /// The rules for `n` columns: columns past the configured ones (none, after validation)
    /// are kept.
    fn rules_for(&self, n: usize) -> impl Iterator<Item = Rule> + '_ {
        self.rules
            .iter()
            .copied()
            .chain(std::iter::repeat(Rule::Keep))
            .take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::pgoutput::Column;

    fn rel() -> Relation {
        let col = |name: &str, key: bool, type_oid: u32| Column {
            key,
            name: name.into(),
            type_oid,
            type_modifier: -1,
            ..Column::default()
        };
        Relation {
            oid: 1,
            schema: "public".into(),
            name: "people".into(),
            replica_identity: b'd',
            columns: vec![
                col("id", true, 23),
                col("email", false, 25),
                col("ssn", false, 25),
                col("phone", false, 1043),
            ],
        }
    }

    fn mask() -> TableMask {
        TableMask::new(
            vec![Rule::Hash, Rule::Keep, Rule::Drop, Rule::Null],
            Hasher::new(b"k"),
        )
    }

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn relation_loses_dropped_columns_and_hashed_ones_become_text() {
        let r = mask().relation(&rel());
        let cols: Vec<(&str, u32, bool)> = r
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.type_oid, c.key))
            .collect();
        assert_eq!(
            cols,
            vec![
                ("id", 25, true),
                ("email", 25, false),
                ("phone", 1043, false)
            ]
        );
        assert_eq!(mask().kept(), vec![Rule::Hash, Rule::Keep, Rule::Null]);
    }

    #[test]
    fn tuples_are_masked_and_unchanged_values_stay_unchanged() {
        let m = mask();
        let t = m.tuple(Tuple(vec![
            text("42"),
            text("a@b"),
            text("123-45"),
            text("555"),
        ]));
        assert_eq!(
            t.0,
            vec![
                Value::Text(Bytes::from(m.hash(b"42"))),
                text("a@b"),
                Value::Null
            ]
        );
        let t = m.tuple(Tuple(vec![
            Value::Null,
            Value::Unchanged,
            Value::Unchanged,
            Value::Unchanged,
        ]));
        assert_eq!(t.0, vec![Value::Null, Value::Unchanged, Value::Unchanged]);
    }

    #[test]
    fn identity_columns_may_be_hashed_but_not_dropped_or_nulled() {
        let cfg = |rule: &str| -> PrivacyConfig {
            toml::from_str(&format!(
                "key = \"k\"\n[mask.\"public.people\"]\nid = \"{rule}\""
            ))
            .unwrap()
        };
        let m = Masks::new(&cfg("hash")).of(&rel()).unwrap().unwrap();
        assert_eq!(m.relation(&rel()).columns[0].type_oid, 25);
        for rule in ["drop", "null"] {
            let e = Masks::new(&cfg(rule)).of(&rel()).unwrap_err();
            assert!(
                e.contains("column id of public.people is part of its replica identity"),
                "{e}"
            );
        }
        assert!(Masks::new(&cfg("keep")).of(&rel()).unwrap().is_none());
        let other = Relation {
            name: "other".into(),
            ..rel()
        };
        assert!(Masks::new(&cfg("hash")).of(&other).unwrap().is_none());
    }

    #[test]
    fn the_hash_is_keyed_hex_hmac_sha256() {
        // RFC 4231 test case 2.
        let h = Hasher::new(b"Jefe");
        assert_eq!(
            h.hex(b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_ne!(
            Hasher::new(b"other").hex(b"42"),
            Hasher::new(b"k").hex(b"42")
        );
    }
}
