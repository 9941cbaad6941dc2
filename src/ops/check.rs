//! `walden check`: a preflight that says exactly what to fix before `walden run`.

use serde::Serialize;

use crate::config::Config;
use crate::decode::pgoutput::{Column, Relation};
use crate::decode::types::PgKind;
use crate::source::replication::quote_ident;
use crate::source::types::TypeResolver;
use crate::source::{connect_sql, SourceError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warning,
    Error,
}

#[derive(Debug, Serialize)]
pub struct Finding {
    pub check: String,
    pub level: Level,
    pub message: String,
    /// What to run or change, when something is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub findings: Vec<Finding>,
}

impl Report {
    fn push(&mut self, check: &str, level: Level, message: String, fix: Option<String>) {
        if level == Level::Error {
            self.ok = false;
        }
        self.findings.push(Finding {
            check: check.into(),
            level,
            message,
            fix,
        });
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let tag = match f.level {
                Level::Ok => "ok  ",
                Level::Warning => "WARN",
                Level::Error => "FAIL",
            };
            out.push_str(&format!("[{tag}] {}: {}\n", f.check, f.message));
            if let Some(fix) = &f.fix {
                for l in fix.lines() {
                    out.push_str(&format!("       fix: {l}\n"));
                }
            }
        }
        out.push_str(if self.ok {
            "walden can run against this server.\n"
        } else {
            "walden cannot run yet: fix the FAIL lines above.\n"
        });
        out
    }
}

pub async fn run(cfg: &Config) -> Report {
    let mut r = Report {
        ok: true,
        findings: Vec::new(),
    };
    check_warehouse(cfg, &mut r).await;
    let sql = match connect_sql(&cfg.source).await {
        Ok(c) => c,
        Err(e) => {
            r.push("connection", Level::Error, e.to_string(), None);
            return r;
        }
    };
    if let Err(e) = checks(cfg, &sql, &mut r).await {
        r.push(
            "catalog",
            Level::Error,
            format!("querying the server failed: {e}"),
            None,
        );
    }
    r
}

/// The warehouse is reachable with its credentials and keeps commits safe.
async fn check_warehouse(cfg: &Config, r: &mut Report) {
    let checked = match crate::sink::Warehouse::new(&cfg.warehouse) {
        Ok(w) => w.check_store().await.map(|()| w),
        Err(e) => Err(e),
    };
    match checked {
        Ok(w) => r.push(
            "warehouse",
            Level::Ok,
            format!(
                "{} is writable and refuses a second create of one object",
                w.root()
            ),
            None,
        ),
        Err(e) => r.push("warehouse", Level::Error, e.to_string(), None),
    }
}

async fn setting(sql: &tokio_postgres::Client, name: &str) -> Result<String, SourceError> {
    Ok(sql
        .query_one("SELECT current_setting($1)", &[&name])
        .await?
        .get(0))
}

async fn checks(
    cfg: &Config,
    sql: &tokio_postgres::Client,
    r: &mut Report,
) -> Result<(), SourceError> {
    let src = &cfg.source;
    let version: i32 = setting(sql, "server_version_num")
        .await?
        .parse()
        .unwrap_or(0);
    let pretty = setting(sql, "server_version").await?;
    if version >= 140000 {
        r.push(
            "server version",
            Level::Ok,
            format!("PostgreSQL {pretty}"),
            None,
        );
    } else {
        r.push(
            "server version",
            Level::Error,
            format!(
                "PostgreSQL {pretty} is too old: walden needs 14 or newer (pgoutput protocol v2)"
            ),
            Some("upgrade the server".into()),
        );
    }

    let wal_level = setting(sql, "wal_level").await?;
    if wal_level == "logical" {
        r.push("wal_level", Level::Ok, "logical".into(), None);
    } else {
        r.push(
            "wal_level",
            Level::Error,
            format!("wal_level is {wal_level}; logical replication needs logical"),
            Some("ALTER SYSTEM SET wal_level = logical;  -- then restart Postgres".into()),
        );
    }

    let row = sql
        .query_one(
            "SELECT current_setting('max_replication_slots')::int, \
                    (SELECT count(*) FROM pg_replication_slots)::int, \
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1), \
                    current_setting('max_wal_senders')::int, \
                    (SELECT count(*) FROM pg_stat_replication)::int",
            &[&src.slot],
        )
        .await?;
    let (max_slots, used, ours, max_senders, senders): (i32, i32, bool, i32, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if ours || used < max_slots {
        r.push(
            "replication slots",
            Level::Ok,
            format!(
                "{used} of {max_slots} in use{}",
                if ours {
                    format!(", slot {:?} exists", src.slot)
                } else {
                    String::new()
                }
            ),
            None,
        );
    } else {
        r.push(
            "replication slots",
            Level::Error,
            format!("all {max_slots} replication slots are in use and walden needs one"),
            Some("drop an unused slot (`walden slot list`, `walden slot drop NAME`) or raise max_replication_slots (restart needed)".into()),
        );
    }
    if senders < max_senders {
        r.push(
            "wal senders",
            Level::Ok,
            format!("{senders} of {max_senders} in use"),
            None,
        );
    } else {
        r.push(
            "wal senders",
            Level::Error,
            format!("all {max_senders} WAL senders are busy"),
            Some("ALTER SYSTEM SET max_wal_senders = <more>;  -- then restart Postgres".into()),
        );
    }

    let row = sql
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (user, repl): (String, bool) = (row.get(0), row.get(1));
    if repl {
        r.push("role", Level::Ok, format!("{user} may replicate"), None);
    } else {
        r.push(
            "role",
            Level::Error,
            format!("role {user} lacks the REPLICATION attribute"),
            Some(format!(
                "ALTER ROLE {} WITH REPLICATION;",
                quote_ident(&user)
            )),
        );
    }

    let keep = setting(sql, "max_slot_wal_keep_size").await?;
    if keep == "-1" {
        r.push(
            "max_slot_wal_keep_size",
            Level::Warning,
            "unset (-1): a stalled slot can retain WAL until the disk is full".into(),
            Some("ALTER SYSTEM SET max_slot_wal_keep_size = '50GB';  SELECT pg_reload_conf();  -- size to your disk".into()),
        );
    } else {
        r.push("max_slot_wal_keep_size", Level::Ok, keep, None);
    }

    let has_pub = sql
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&src.publication],
        )
        .await?
        .is_some();
    if !has_pub {
        if src.create_publication {
            r.push(
                "publication",
                Level::Ok,
                format!(
                    "{:?} does not exist yet; walden will create it FOR ALL TABLES",
                    src.publication
                ),
                None,
            );
        } else {
            r.push(
                "publication",
                Level::Error,
                format!("publication {:?} does not exist", src.publication),
                Some(format!(
                    "CREATE PUBLICATION {} FOR ALL TABLES;  -- or FOR TABLE …, or set source.create_publication = true",
                    quote_ident(&src.publication)
                )),
            );
        }
    }
    // The tables walden will replicate: the publication's, or every user table for one it creates.
    let tables = sql
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text, \
                EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                has_table_privilege(c.oid, 'SELECT') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND ( \
                ($2 AND c.oid IN (SELECT (quote_ident(schemaname) || '.' || quote_ident(tablename))::regclass::oid \
                                  FROM pg_publication_tables WHERE pubname = $1)) \
                OR (NOT $2 AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                    AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%')) \
             ORDER BY 1, 2",
            &[&src.publication, &has_pub],
        )
        .await?;
    if has_pub {
        r.push(
            "publication",
            Level::Ok,
            format!("{:?} publishes {} table(s)", src.publication, tables.len()),
            None,
        );
        if tables.is_empty() {
            r.push(
                "publication tables",
                Level::Warning,
                "the publication has no tables: nothing will be replicated".into(),
                Some(format!(
                    "ALTER PUBLICATION {} ADD TABLE …;",
                    quote_ident(&src.publication)
                )),
            );
        }
    }
    let mut types = TypeResolver::default();
    for t in &tables {
        let (schema, name, replident, pk, select): (String, String, String, bool, bool) =
            (t.get(0), t.get(1), t.get(2), t.get(3), t.get(4));
        let q = format!("{}.{}", ident(&schema), ident(&name));
        let label = format!("table {schema}.{name}");
        if !select {
            r.push(
                &label,
                Level::Error,
                "no SELECT privilege (needed for the snapshot and verify)".into(),
                Some(format!("GRANT SELECT ON {q} TO {};", ident(&user))),
            );
        }
        let usable = match replident.as_str() {
            "d" => pk,
            "n" => false,
            _ => true,
        };
        if !usable {
            let why = if replident == "n" {
                "REPLICA IDENTITY NOTHING"
            } else {
                "no primary key (REPLICA IDENTITY DEFAULT)"
            };
            r.push(
                &label,
                Level::Error,
                format!("{why}: Postgres will reject UPDATE and DELETE on it while it is published, and walden cannot key the mirror"),
                Some(format!(
                    "ALTER TABLE {q} ADD PRIMARY KEY (…);  -- or:\nALTER TABLE {q} REPLICA IDENTITY FULL;"
                )),
            );
        }
        let cols = sql
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid, a.atttypmod, a.attrelid \
                 FROM pg_attribute a WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&q],
            )
            .await?;
        let mut rel = Relation {
            oid: cols.first().map_or(0, |c| c.get(4)),
            columns: cols
                .iter()
                .map(|c| Column {
                    name: c.get(0),
                    type_oid: c.get(2),
                    type_modifier: c.get(3),
                    ..Column::default()
                })
                .collect(),
            ..Relation::default()
        };
        types.resolve(sql, &mut rel, None).await?;
        for (c, resolved) in cols.iter().zip(&rel.columns) {
            let (col, ty): (String, String) = (c.get(0), c.get(1));
            let (oid, typmod) = (resolved.type_oid, resolved.type_modifier);
            if PgKind::of(oid, typmod) == PgKind::Text && !TEXT_TYPES.contains(&oid) {
                r.push(
                    &label,
                    Level::Warning,
                    format!(
                        "column {col} has type {ty}, which walden stores as its text form (Utf8)"
                    ),
                    None,
                );
            }
        }
    }
    privacy(cfg, sql, r).await
}

/// The tables and columns `[privacy]` names exist (and are published).
async fn privacy(
    cfg: &Config,
    sql: &tokio_postgres::Client,
    r: &mut Report,
) -> Result<(), SourceError> {
    let p = &cfg.privacy;
    if p.subjects.is_empty() && p.mask.is_empty() {
        return Ok(());
    }
    match crate::privacy::check_names(sql, p, &cfg.source.publication).await {
        Ok(unpublished) if unpublished.is_empty() => r.push(
            "privacy",
            Level::Ok,
            "every table and column [privacy] names exists".into(),
            None,
        ),
        Ok(unpublished) => r.push(
            "privacy",
            Level::Warning,
            format!(
                "[privacy] names tables the publication does not publish: {}",
                unpublished.join(", ")
            ),
            Some("add them to the publication, or remove them from [privacy]".into()),
        ),
        Err(SourceError::Setup(m)) => r.push("privacy", Level::Error, m, None),
        Err(e) => return Err(e),
    }
    let keyless = crate::privacy::keyless_subject_tables(sql, p).await?;
    if !keyless.is_empty() {
        r.push(
            "privacy",
            Level::Warning,
            crate::privacy::keyless_warning(&keyless),
            Some(crate::privacy::KEYLESS_HINT.into()),
        );
    }
    Ok(())
}

/// An identifier as a person would type it: bare when that is unambiguous, quoted otherwise.
fn ident(s: &str) -> String {
    let plain = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        s.to_string()
    } else {
        quote_ident(s)
    }
}

/// Types whose natural Arrow form is text.
const TEXT_TYPES: &[u32] = &[
    25,   // text
    1043, // varchar
    1042, // bpchar
    19,   // name
    18,   // char
    114,  // json
    3802, // jsonb
    2950, // uuid
    1700, // numeric without a usable precision: exact text by design
];
