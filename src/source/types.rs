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

/// How deep domains over domains are followed.
const MAX_DEPTH: usize = 16;

impl TypeResolver {
    /// Rewrites `rel`'s columns to the types their values are read as (see the module docs), and
    /// fills in dimensions and attribute numbers.
    pub async fn resolve(
        &mut self,
        sql: &tokio_postgres::Client,
        rel: &mut Relation,
    ) -> Result<(), SourceError> {
        let rows = sql
            .query(
                "SELECT attname::text, attnum, attndims FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
                &[&rel.oid],
            )
            .await?;
        let attrs: HashMap<String, (i16, i32)> = rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        for col in &mut rel.columns {
            let declared = attrs.get(&col.name);
            col.attnum = declared.map_or(0, |a| a.0);
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
                let dims = declared.map_or(1, |a| a.1).clamp(1, 6);
                col.dims = dims as u8;
            }
        }
        Ok(())
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
