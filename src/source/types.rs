//! Resolves the column types of a relation against the catalog, the one place that does: a
//! domain becomes its base type (with the domain's type modifier), an array becomes its element
//! type with the number of dimensions the column declares, and each column gets its attribute
//! number.
//!
//! pgoutput's Relation message names each column's type by OID only; the snapshot reads
//! `pg_attribute`. Both go through [`TypeResolver::resolve`], so stream and snapshot map a
//! column the same way. Type facts are stable (a domain's base type and an array's element type
//! never change, and OIDs are not reused while the type exists), so they are cached by OID. The
//! declared dimensions and attribute numbers are read from the catalog as it is now, which may be
//! later than the Relation message: a column renamed since is not found and keeps attnum 0 (and
//! one declared dimension); an array value whose dimensions differ from the declared ones keeps
//! its exact text (see `decode::types`).

use std::collections::HashMap;

use super::SourceError;
use crate::decode::pgoutput::Relation;
use crate::decode::types::oid;

/// What a type OID resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resolved {
    /// The base type of the values (an array's element type).
    base: u32,
    /// The domain's type modifier (-1: none).
    typmod: i32,
    array: bool,
}

/// Caches type facts across Relation messages of a session.
#[derive(Debug, Default)]
pub struct TypeResolver {
    types: HashMap<u32, Option<Resolved>>,
}

/// Types whose values are read as they are: no lookup needed.
fn is_plain(type_oid: u32) -> bool {
    use oid::*;
    matches!(
        type_oid,
        BOOL | BYTEA
            | NAME
            | INT8
            | INT2
            | INT4
            | TEXT
            | OID
            | JSON
            | FLOAT4
            | FLOAT8
            | BPCHAR
            | VARCHAR
            | DATE
            | TIME
            | TIMESTAMP
            | TIMESTAMPTZ
            | NUMERIC
            | UUID
            | JSONB
    )
}

/// One row of `pg_attribute`, as the catalog is now.
#[derive(Debug, Clone)]
pub struct Attribute {
    pub name: String,
    pub attnum: i16,
    pub dims: i32,
    pub dropped: bool,
    /// Rows that existed before the column was added hold a value for it (a default, kept as
    /// `attmissingval`, or written by a table rewrite).
    pub has_default: bool,
}

/// The attribute numbers of a relation description's columns (`names`, in pgoutput's order,
/// which is attribute-number order), given the description before it (`previous`, with its
/// numbers) and the catalog as it is now, which may be later than the description: columns may
/// have been renamed or dropped since. 0 where it cannot be told.
///
/// Facts that hold whatever happened since: a column keeps its number through renames; a
/// dropped number is never reused (nor undropped); a column that exists now existed at every
/// point since it was added; an added column comes after every older one. So: columns whose
/// name the previous description has, in order, are those columns; between two of them, the
/// previous columns still alive now are exactly the ones left there, renamed (and if their
/// count does not fit, all previous columns there when that count fits); after the last,
/// previous columns alive now are renamed in order and the rest are additions, numbered by
/// their name in the catalog when that is the next number the catalog added. Anything else is
/// ambiguous (e.g. a column added, then dropped and added again under its name before walden
/// read the first add): those columns get 0 and the second value is true, so the caller can
/// make the mirror right another way (a fresh copy of the table). It is true as well for an
/// added column with a default: the rows that existed before hold it, and the stream never sends
/// them. Without a previous
/// description (or one without numbers), names are looked up in the catalog.
pub fn attribute_numbers(
    previous: &[(String, i16)],
    names: &[&str],
    catalog: &[Attribute],
) -> (Vec<i16>, bool) {
    let by_name = |n: &str| {
        catalog
            .iter()
            .find(|a| !a.dropped && a.name == n)
            .map_or(0, |a| a.attnum)
    };
    if previous.is_empty() || previous.iter().any(|p| p.1 == 0) {
        return (names.iter().map(|n| by_name(n)).collect(), false);
    }
    let alive = |attnum: i16| catalog.iter().any(|a| a.attnum == attnum && !a.dropped);
    // Same names, in order.
    let mut out = vec![0i16; names.len()];
    let mut ambiguous = false;
    let mut matched: Vec<(usize, usize)> = Vec::new();
    let mut from = 0;
    for (i, n) in names.iter().enumerate() {
        if let Some(j) = previous[from..].iter().position(|p| p.0 == *n) {
            out[i] = previous[from + j].1;
            matched.push((i, from + j));
            from += j + 1;
        }
    }
    // The gaps between matches: unmatched previous columns against unmatched new ones.
    let mut bounds = vec![(0usize, 0usize)];
    bounds.extend(matched.iter().map(|&(i, j)| (i + 1, j + 1)));
    let ends: Vec<(usize, usize)> = matched
        .iter()
        .copied()
        .chain(std::iter::once((names.len(), previous.len())))
        .collect();
    let newest = previous.iter().map(|p| p.1).max().unwrap_or(0);
    for (gap, (&(n0, p0), &(n1, p1))) in bounds.iter().zip(&ends).enumerate() {
        let last = gap == matched.len();
        let fresh: Vec<usize> = (n0..n1).collect();
        let gone = &previous[p0..p1];
        let survivors: Vec<i16> = gone.iter().map(|p| p.1).filter(|&a| alive(a)).collect();
        let all: Vec<i16> = gone.iter().map(|p| p.1).collect();
        let candidates: Vec<i16> = catalog
            .iter()
            .map(|a| a.attnum)
            .filter(|&a| a > newest)
            .collect();
        if last && survivors.len() <= fresh.len() {
            // Survivors renamed in order; the rest added, and only certain when each is the
            // next column the catalog added (under the same name still).
            for (k, &i) in fresh.iter().enumerate() {
                out[i] = match survivors.get(k) {
                    Some(&a) => a,
                    None => {
                        let a = by_name(names[i]);
                        if a == 0 || candidates.get(k - survivors.len()) != Some(&a) {
                            ambiguous = true;
                            0
                        } else {
                            // The rows from before the add hold its default, which the stream
                            // never sends for them: only a copy brings it.
                            ambiguous |= catalog.iter().any(|c| c.attnum == a && c.has_default);
                            a
                        }
                    }
                };
            }
            continue;
        }
        let renamed: &[i16] = if survivors.len() == fresh.len() {
            &survivors
        } else if all.len() == fresh.len() {
            &all
        } else {
            ambiguous = true;
            &[]
        };
        for (k, &i) in fresh.iter().enumerate() {
            out[i] = renamed.get(k).copied().unwrap_or(0);
        }
    }
    (out, ambiguous)
}

/// How deep domains over domains are followed.
const MAX_DEPTH: usize = 16;

impl TypeResolver {
    /// Rewrites `rel`'s columns to the types their values are read as (see the module docs), and
    /// fills in dimensions and attribute numbers. `previous`: the columns (name, attribute number)
    /// of the description this one follows, which tells renamed columns from added ones (see
    /// [`attribute_numbers`]). True when the columns could not be told apart for sure.
    pub async fn resolve(
        &mut self,
        sql: &tokio_postgres::Client,
        rel: &mut Relation,
        previous: Option<&[(String, i16)]>,
    ) -> Result<bool, SourceError> {
        let rows = sql
            .query(
                "SELECT attname::text, attnum, attndims, attisdropped, atthasmissing OR atthasdef \
                 FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 ORDER BY attnum",
                &[&rel.oid],
            )
            .await?;
        let catalog: Vec<Attribute> = rows
            .iter()
            .map(|r| Attribute {
                name: r.get(0),
                attnum: r.get(1),
                dims: r.get(2),
                dropped: r.get(3),
                has_default: r.get(4),
            })
            .collect();
        let names: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
        let (attnums, ambiguous) = attribute_numbers(previous.unwrap_or(&[]), &names, &catalog);
        for (col, attnum) in rel.columns.iter_mut().zip(attnums) {
            col.attnum = attnum;
            let declared = catalog.iter().find(|a| a.attnum == attnum && attnum != 0);
            if is_plain(col.type_oid) {
                continue;
            }
            let Some(r) = self.lookup(sql, col.type_oid).await? else {
                continue;
            };
            col.type_oid = r.base;
            if col.type_modifier < 0 {
                col.type_modifier = r.typmod;
            }
            if r.array {
                // attndims is 0 for columns made by CREATE TABLE AS; one dimension then.
                let dims = declared.map_or(1, |a| a.dims).clamp(1, 6);
                col.dims = dims as u8;
            }
        }
        Ok(ambiguous)
    }

    /// The resolution of one type, following domains to their base and arrays to their
    /// element; `None` for a type that is neither (or no longer exists): read as text.
    async fn lookup(
        &mut self,
        sql: &tokio_postgres::Client,
        type_oid: u32,
    ) -> Result<Option<Resolved>, SourceError> {
        if let Some(r) = self.types.get(&type_oid) {
            return Ok(*r);
        }
        let mut current = type_oid;
        let mut typmod = -1;
        let mut array = false;
        let mut result = None;
        for _ in 0..MAX_DEPTH {
            if is_plain(current) {
                result = Some(Resolved {
                    base: current,
                    typmod,
                    array,
                });
                break;
            }
            // Arrays: variable-length, subscripted by element, comma-delimited (box arrays use
            // ';' and int2vector/oidvector print space-separated: those stay text).
            let Some(row) = sql
                .query_opt(
                    "SELECT typtype::text, typbasetype, typtypmod, typelem, \
                       typlen = -1 AND typelem <> 0 AND typcategory = 'A' AND typdelim = ',' \
                       AND oid NOT IN (22, 30) \
                     FROM pg_type WHERE oid = $1",
                    &[&current],
                )
                .await?
            else {
                break;
            };
            let (typtype, basetype, domain_typmod, elem, is_array): (String, u32, i32, u32, bool) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            if typtype == "d" {
                if typmod < 0 {
                    typmod = domain_typmod;
                }
                current = basetype;
            } else if is_array && !array {
                array = true;
                current = elem;
            } else {
                // Enums, composites, ranges, extension types: their text form.
                result = (current != type_oid || array).then_some(Resolved {
                    base: current,
                    typmod,
                    array,
                });
                break;
            }
        }
        self.types.insert(type_oid, result);
        Ok(result)
    }
}

/// The highest attribute number of a live column of each table in `oids`: every ADD COLUMN makes
/// it grow (attribute numbers are never reused).
pub async fn newest_columns(
    sql: &tokio_postgres::Client,
    oids: &[u32],
) -> Result<HashMap<u32, i16>, SourceError> {
    if oids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sql
        .query(
            "SELECT attrelid, max(attnum) FROM pg_attribute \
             WHERE attrelid = ANY($1) AND attnum > 0 AND NOT attisdropped GROUP BY attrelid",
            &[&oids],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The catalog: (name now, dropped) for attribute numbers 1, 2, ….
    fn catalog(attrs: &[(&str, bool)]) -> Vec<Attribute> {
        attrs
            .iter()
            .enumerate()
            .map(|(i, (n, d))| Attribute {
                name: n.to_string(),
                attnum: i as i16 + 1,
                dims: 0,
                dropped: *d,
                has_default: false,
            })
            .collect()
    }

    fn prev(cols: &[(&str, i16)]) -> Vec<(String, i16)> {
        cols.iter().map(|(n, a)| (n.to_string(), *a)).collect()
    }

    #[test]
    fn renames_are_told_from_drop_and_add_whatever_happened_since() {
        // id, a, b, c; then: a renamed a2, new column a, c dropped, c added, b renamed b2.
        let now = catalog(&[
            ("id", false),
            ("a2", false),
            ("b2", false),
            ("", true),
            ("a", false),
            ("c", false),
        ]);
        let sure = |v: Vec<i16>| (v, false);
        let v1 = prev(&[("id", 1), ("a", 2), ("b", 3), ("c", 4)]);
        // After the rename: the old name is gone, the new one sits in its place.
        let n = attribute_numbers(&v1, &["id", "a2", "b", "c"], &now);
        assert_eq!(n, sure(vec![1, 2, 3, 4]));
        let v2 = prev(&[("id", 1), ("a2", 2), ("b", 3), ("c", 4)]);
        // A new column under the old name is an addition, not the old column.
        let n = attribute_numbers(&v2, &["id", "a2", "b", "c", "a"], &now);
        assert_eq!(n, sure(vec![1, 2, 3, 4, 5]));
        let v3 = prev(&[("id", 1), ("a2", 2), ("b", 3), ("c", 4), ("a", 5)]);
        // c dropped and added again: a new column (it comes after a).
        let n = attribute_numbers(&v3, &["id", "a2", "b", "a", "c"], &now);
        assert_eq!(n, sure(vec![1, 2, 3, 5, 6]));
        let v4 = prev(&[("id", 1), ("a2", 2), ("b", 3), ("a", 5), ("c", 6)]);
        let n = attribute_numbers(&v4, &["id", "a2", "b2", "a", "c"], &now);
        assert_eq!(n, sure(vec![1, 2, 3, 5, 6]));
        // Without a previous description: names as the catalog has them now.
        let n = attribute_numbers(&[], &["id", "a", "b"], &now);
        assert_eq!(n, sure(vec![1, 5, 0]));
    }

    #[test]
    fn additions_are_certain_only_when_nothing_else_was_added_since() {
        let v1 = prev(&[("id", 1), ("x", 2)]);
        // x dropped, z added: z is the next column added.
        let now = catalog(&[("id", false), ("", true), ("z", false)]);
        assert_eq!(
            attribute_numbers(&v1, &["id", "z"], &now),
            (vec![1, 3], false)
        );
        // x renamed y, then dropped (or dropped, y added and dropped): cannot be told.
        assert_eq!(
            attribute_numbers(&v1, &["id", "y"], &now),
            (vec![1, 0], true)
        );
        // x renamed z, w added after it.
        let now = catalog(&[("id", false), ("z", false), ("w", false)]);
        let n = attribute_numbers(&v1, &["id", "z", "w"], &now);
        assert_eq!(n, (vec![1, 2, 3], false));
        // extra added, dropped, added again before the first add was read: the first add may
        // be either, so it is not guessed.
        let now = catalog(&[("id", false), ("x", false), ("", true), ("extra", false)]);
        let n = attribute_numbers(&v1, &["id", "x", "extra"], &now);
        assert_eq!(n, (vec![1, 2, 0], true));
        // An added column with a default: certain, but only a copy brings the default into
        // the rows from before.
        let mut now = catalog(&[("id", false), ("x", false), ("d", false)]);
        now[2].has_default = true;
        let n = attribute_numbers(&v1, &["id", "x", "d"], &now);
        assert_eq!(n, (vec![1, 2, 3], true));
    }
}
