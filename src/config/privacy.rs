//! `[privacy]`: the secret of keyed hashes, data subjects, and columns masked at ingest.
//!
//! Checked here for shape only (names, rules, a key where one is needed); whether the tables and
//! columns exist is checked against the source's catalog (`crate::privacy::check`), since a
//! config naming a table that is not there would protect nothing.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

/// What happens to one column's values before they reach the warehouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskRule {
    /// Stored as it is.
    Keep,
    /// Never stored: the column is not in the warehouse (nor read by the snapshot).
    Drop,
    /// Stored as NULL.
    Null,
    /// Stored as the keyed hash of its text form (a `text` column): equal values still join.
    Hash,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// Secret of the keyed hashes (HMAC-SHA256) of hashed columns and erasure receipts; set it
    /// from the environment (`WALDEN_PRIVACY__KEY`). Never logged. Changing it changes every
    /// hash written from then on.
    #[serde(default, deserialize_with = "text")]
    pub key: Option<String>,
    /// How soon a subject deleted at the source is erased from every file of the warehouse
    /// (`30s`, `15m`, `1h`, `1d`): `walden run` looks for deleted subjects every half of it.
    #[serde(default = "default_erase_within")]
    pub erase_within: String,
    /// Erase subjects deleted at the source from the warehouse's history by themselves. `false`:
    /// the history keeps them until `walden forget`.
    #[serde(default = "default_true")]
    pub propagate_deletes: bool,
    /// Data subjects: per subject name, per table (`schema.table`), the column holding the
    /// subject's identifier. Those tables hold personal data.
    #[serde(default)]
    pub subjects: BTreeMap<String, BTreeMap<String, String>>,
    /// Columns masked at ingest: per table (`schema.table`), per column, `hash`, `null` or
    /// `drop`.
    #[serde(default)]
    pub mask: BTreeMap<String, BTreeMap<String, MaskRule>>,
}

fn default_true() -> bool {
    true
}

fn default_erase_within() -> String {
    "1h".into()
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            key: None,
            erase_within: default_erase_within(),
            propagate_deletes: true,
            subjects: BTreeMap::new(),
            mask: BTreeMap::new(),
        }
    }
}

/// `30s`, `15m`, `1h`, `2d` as a duration.
fn duration(text: &str) -> Option<std::time::Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().ok()?;
    let secs = match unit.trim() {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return None,
    };
    (secs > 0).then(|| std::time::Duration::from_secs(secs))
}

impl fmt::Debug for PrivacyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivacyConfig")
            .field("key", &self.key.as_ref().map(|_| "<secret>"))
            .field("erase_within", &self.erase_within)
            .field("propagate_deletes", &self.propagate_deletes)
            .field("subjects", &self.subjects)
            .field("mask", &self.mask)
            .finish()
    }
}

/// A key given as a number in the environment is still its text.
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let raw: Option<toml::Value> = Deserialize::deserialize(d)?;
    Ok(raw.map(|v| match v {
        toml::Value::String(s) => s,
        other => other.to_string(),
    }))
}

impl PrivacyConfig {
    /// Deletes at the source are erased from the history by `walden run`.
    pub fn propagates(&self) -> bool {
        self.propagate_deletes && !self.subjects.is_empty()
    }

    /// `erase_within` as a duration (validated: one hour if it does not parse).
    pub fn erase_within(&self) -> std::time::Duration {
        duration(&self.erase_within).unwrap_or(std::time::Duration::from_secs(3600))
    }

    /// The shape checks: table names qualified, a key wherever a hash is needed, no subject
    /// column masked away.
    pub fn validate(&self) -> Result<(), String> {
        if duration(&self.erase_within).is_none() {
            return Err(format!(
                "privacy.erase_within {:?}: write a whole number and a unit, e.g. \"30s\", \"15m\", \"1h\" or \"1d\"",
                self.erase_within
            ));
        }
        let qualified = |t: &str, what: &str| match t.split_once('.') {
            Some((s, n)) if !s.is_empty() && !n.is_empty() => Ok(()),
            _ => Err(format!(
                "{what}: table {t:?} must be written as schema.table (e.g. \"public.{t}\")"
            )),
        };
        for (subject, tables) in &self.subjects {
            if tables.is_empty() {
                return Err(format!("privacy.subjects.{subject} names no table"));
            }
            for (table, column) in tables {
                qualified(table, &format!("privacy.subjects.{subject}"))?;
                match self.rule(table, column) {
                    MaskRule::Drop | MaskRule::Null => {
                        return Err(format!(
                            "privacy.subjects.{subject}: column {column} of {table} identifies the \
                             subject, so it cannot be masked with `drop` or `null` (walden could not \
                             find the subject's rows again); use `hash` or leave it in clear"
                        ))
                    }
                    MaskRule::Keep | MaskRule::Hash => {}
                }
            }
        }
        for table in self.mask.keys() {
            qualified(table, "privacy.mask")?;
        }
        let hashes = self
            .mask
            .values()
            .any(|cols| cols.values().any(|r| *r == MaskRule::Hash));
        if self.key.as_deref().is_none_or(str::is_empty) && (hashes || !self.subjects.is_empty()) {
            return Err(
                "privacy: hashed columns and data subjects need a secret key: set \
                        WALDEN_PRIVACY__KEY (or privacy.key) to a long random string, and keep it: \
                        hashes written under one key do not match another's"
                    .into(),
            );
        }
        Ok(())
    }

    /// The rule configured for `column` of `table` (`keep` when none).
    pub fn rule(&self, table: &str, column: &str) -> MaskRule {
        self.mask
            .get(table)
            .and_then(|cols| cols.get(column))
            .copied()
            .unwrap_or(MaskRule::Keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PrivacyConfig, String> {
        let p: PrivacyConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        p.validate().map(|()| p)
    }

    #[test]
    fn the_issue_example_parses() {
        let p = parse(
            "key = \"s3cret\"\n[subjects.customer]\n\"public.customers\" = \"id\"\n\
             \"public.orders\" = \"customer_id\"\n[mask.\"public.customers\"]\nemail = \"hash\"",
        )
        .unwrap();
        assert_eq!(p.subjects["customer"]["public.orders"], "customer_id");
        assert_eq!(p.rule("public.customers", "email"), MaskRule::Hash);
        assert_eq!(p.rule("public.customers", "id"), MaskRule::Keep);
        assert!(!format!("{p:?}").contains("s3cret"));
    }

    #[test]
    fn shape_errors_say_what_to_fix() {
        let e = parse("[mask.customers]\nemail = \"null\"").unwrap_err();
        assert!(e.contains("schema.table"), "{e}");
        let e = parse("[mask.\"public.c\"]\nemail = \"hash\"").unwrap_err();
        assert!(e.contains("WALDEN_PRIVACY__KEY"), "{e}");
        let e = parse("[subjects.customer]\n\"public.c\" = \"id\"").unwrap_err();
        assert!(e.contains("WALDEN_PRIVACY__KEY"), "{e}");
        let e = parse(
            "key = \"k\"\n[subjects.customer]\n\"public.c\" = \"id\"\n[mask.\"public.c\"]\nid = \"drop\"",
        )
        .unwrap_err();
        assert!(e.contains("identifies the subject"), "{e}");
        let e = parse("[mask.\"public.c\"]\nemail = \"shred\"").unwrap_err();
        assert!(e.contains("shred"), "{e}");
        // Masks that need no key are fine without one.
        parse("[mask.\"public.c\"]\nemail = \"drop\"").unwrap();
        let e = parse("erase_within = \"soon\"").unwrap_err();
        assert!(e.contains("\"15m\""), "{e}");
        assert_eq!(
            parse("erase_within = \"15m\"")
                .unwrap()
                .erase_within()
                .as_secs(),
            900
        );
        assert_eq!(parse("").unwrap().erase_within().as_secs(), 3600);
    }
}
