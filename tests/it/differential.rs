//! Seeded randomized differential test: tables of every replica identity (DEFAULT, USING INDEX,
//! FULL with a key, FULL without one, holding NULLs and identical rows) get random inserts,
//! updates that leave TOASTed values unchanged or change them, key changes, deletes, truncates,
//! rollbacks, aborted sub-transactions, and schema changes (widen, add, rename, drop, add again
//! under a dropped name; a new table, dropped and created again), while `walden run`
//! streams them with a tiny spill budget and batches of 40 (so transactions spill and land in
//! parts) and is SIGKILLed at random moments. Afterwards each mirror equals its source
//! (as a multiset of rows) and every changelog holds each change once.
//!
//! `WALDEN_DIFF_SEEDS=N` runs N seeds (default 20; more for a long run, outside CI),
//! `WALDEN_DIFF_SEED=S` replays one. A failure names its seed.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use walden::sink::TableKind;

use crate::crash::walden;
use crate::pg::{test_db, warehouse_dir, TestDb};
use crate::warehouse::{assert_changelog_unique, delta_columns, delta_rows, pg_rows};

const TABLES: &[&str] = &["d_pk", "d_idx", "d_fullpk", "d_full"];

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("WALDEN_DIFF_SEED") {
        return vec![s.parse().expect("WALDEN_DIFF_SEED is a number")];
    }
    let n: u64 = std::env::var("WALDEN_DIFF_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let base: u64 = rand::rng().random_range(0..1_000_000);
    (0..n).map(|i| base + i).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_workloads_with_kills_keep_every_mirror_equal_to_its_source() {
    for seed in seeds() {
        eprintln!("differential: seed {seed} (replay: WALDEN_DIFF_SEED={seed})");
        one_seed(seed).await;
    }
}

async fn one_seed(seed: u64) {
    let name = format!("diff_{}", seed % 1000);
    let db = test_db(&name).await;
    let wh = warehouse_dir(&name);
    let mut ddl = String::new();
    for t in TABLES {
        let id = match *t {
            "d_pk" | "d_fullpk" => "id int PRIMARY KEY",
            "d_idx" => "id int NOT NULL",
            _ => "id int",
        };
        ddl.push_str(&format!(
            "CREATE TABLE {t} ({id}, a int, big text, note text);
             ALTER TABLE {t} ALTER COLUMN big SET STORAGE EXTERNAL;"
        ));
    }
    ddl.push_str(
        "CREATE UNIQUE INDEX d_idx_id ON d_idx (id);
         ALTER TABLE d_idx REPLICA IDENTITY USING INDEX d_idx_id;
         ALTER TABLE d_fullpk REPLICA IDENTITY FULL;
         ALTER TABLE d_full REPLICA IDENTITY FULL;",
    );
    // Rows before the slot exists: the initial snapshot copies them.
    for t in TABLES {
        ddl.push_str(&format!(
            "INSERT INTO {t} SELECT g, g, CASE WHEN g % 2 = 0 THEN repeat(md5(g::text), 90) END, 'n' || g \
               FROM generate_series(0, 39) g;"
        ));
    }
    db.client.batch_execute(&ddl).await.unwrap();
    let out = walden(&db, &wh, &["run", "--once"], None).output().unwrap();
    assert!(
        out.status.success(),
        "seed {seed}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut rng = StdRng::seed_from_u64(seed);
    let mut schema = Schema::default();
    let (mut committed, mut failed) = (0, 0);
    for _round in 0..4 {
        // A tiny spill budget: transactions spill to disk and are read back.
        let child = walden(&db, &wh, &["run"], None)
            .env("WALDEN_SPILL__MEMORY_BYTES", "4096")
            .env(
                "WALDEN_SPILL__DIR",
                wh.with_file_name(format!("spill-{name}")),
            )
            .spawn()
            .unwrap();
        for _ in 0..rng.random_range(5..15) {
            let txn = transaction(&mut rng, &mut schema);
            // Statements that hit a unique key are part of the randomness: the transaction
            // then rolls back, which is one more thing the stream must not show.
            if db.client.batch_execute(&txn).await.is_err() {
                db.client.batch_execute("ROLLBACK").await.unwrap();
                failed += 1;
            } else {
                committed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
    }
    let out = walden(&db, &wh, &["run", "--once"], None).output().unwrap();
    assert!(
        out.status.success(),
        "seed {seed}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut changes = 0;
    for t in TABLES {
        changes += compare(&db, &wh, t, seed).await;
    }
    // (Its creating transaction may have rolled back.)
    let created: bool = db
        .client
        .query_one("SELECT to_regclass('d_new') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    if created {
        changes += compare(&db, &wh, "d_new", seed).await;
    }
    eprintln!("differential: seed {seed}: {committed} transactions ran, {failed} failed on a key; {changes} changes");
    assert!(
        committed > 0 && changes > 0,
        "seed {seed}: the workload did nothing"
    );
    // The cluster's slots are shared by every test: a long run must not use them all up.
    db.client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE database = current_database()",
            &[],
        )
        .await
        .unwrap();
}

/// Schema changes made so far (so each happens once and in order): `d_pk`'s column `extra`
/// goes through stages 1 added, 2 renamed, 3 dropped, 4 added again under the old name; the
/// table `d_new` through 1 created, 2 dropped and created again.
#[derive(Default)]
struct Schema {
    widened: bool,
    extra: u8,
    new_table: u8,
}

fn transaction(rng: &mut StdRng, schema: &mut Schema) -> String {
    let mut sql = String::from("BEGIN;");
    let n = rng.random_range(1..10);
    for _ in 0..n {
        let t = TABLES[rng.random_range(0..TABLES.len())];
        let id: i32 = rng.random_range(0..40);
        let big = if rng.random_bool(0.5) {
            format!("repeat(md5('{}'), 90)", rng.random_range(0..1000))
        } else {
            "NULL".to_string()
        };
        let note = if rng.random_bool(0.2) {
            "NULL".to_string()
        } else {
            format!("'n{}'", rng.random_range(0..100))
        };
        let one = |t: &str, id: i32| {
            // One row even among identical ones (FULL without a key).
            format!("ctid = (SELECT ctid FROM {t} WHERE id = {id} LIMIT 1)")
        };
        let stmt = match rng.random_range(0..100) {
            0..=24 => format!(
                "INSERT INTO {t} VALUES ({}, {id}, {big}, {note}) ON CONFLICT DO NOTHING;",
                id + rng.random_range(0..2) * 40
            ),
            30..=34 if t == "d_full" => {
                format!(
                    "INSERT INTO {t} VALUES ({id}, NULL, NULL, 'dup'), ({id}, NULL, NULL, 'dup');"
                )
            }
            30..=49 => format!("UPDATE {t} SET note = {note} WHERE {};", one(t, id)),
            50..=57 => format!("UPDATE {t} SET big = {big} WHERE {};", one(t, id)),
            58..=67 => {
                let to = rng.random_range(0..80);
                format!(
                    "UPDATE {t} SET id = {to}, a = a + 1 WHERE {} \
                     AND NOT EXISTS (SELECT 1 FROM {t} WHERE id = {to});",
                    one(t, id)
                )
            }
            68..=82 => format!("DELETE FROM {t} WHERE {};", one(t, id)),
            83..=84 => format!("TRUNCATE {t};"),
            85..=89 => format!(
                "SAVEPOINT s; INSERT INTO {t} VALUES (-{id}, -1, NULL, 'ABORTED'); \
                 UPDATE {t} SET note = 'ABORTED' WHERE {}; ROLLBACK TO SAVEPOINT s;",
                one(t, id)
            ),
            90..=92 if !schema.widened => {
                schema.widened = true;
                "ALTER TABLE d_pk ALTER COLUMN a TYPE bigint;".into()
            }
            93..=95 => match schema.extra {
                0 => {
                    schema.extra = 1;
                    "ALTER TABLE d_pk ADD COLUMN extra text; UPDATE d_pk SET extra = 'x' || id WHERE id % 2 = 0;"
                        .into()
                }
                1 => {
                    schema.extra = 2;
                    "ALTER TABLE d_pk RENAME COLUMN extra TO extra2; UPDATE d_pk SET extra2 = extra2 || 'r' WHERE id % 3 = 0;"
                        .into()
                }
                2 => {
                    schema.extra = 3;
                    "ALTER TABLE d_pk DROP COLUMN extra2;".into()
                }
                3 => {
                    schema.extra = 4;
                    "ALTER TABLE d_pk ADD COLUMN extra text; UPDATE d_pk SET extra = 'y' || id WHERE id % 5 = 0;"
                        .into()
                }
                _ => format!("UPDATE {t} SET a = a + 1 WHERE {};", one(t, id)),
            },
            96..=97 => match schema.new_table {
                0 => {
                    schema.new_table = 1;
                    "CREATE TABLE d_new (id int PRIMARY KEY, v text); \
                     INSERT INTO d_new SELECT g, 'v' || g FROM generate_series(1, 20) g;"
                        .into()
                }
                1 if rng.random_bool(0.3) => {
                    schema.new_table = 2;
                    "DROP TABLE d_new; CREATE TABLE d_new (id int PRIMARY KEY, v text, w int); \
                     INSERT INTO d_new SELECT g, 'r' || g, g FROM generate_series(5, 15) g;"
                        .into()
                }
                _ => format!("UPDATE d_new SET v = v || 'u' WHERE id = {id};"),
            },
            // every row: larger than a batch (40 changes in these runs), so it lands in parts
            98..=99 => format!("UPDATE {t} SET a = a + 1;"),
            _ => format!("UPDATE {t} SET a = a + 1 WHERE {};", one(t, id)),
        };
        sql.push_str(&stmt);
    }
    sql.push_str(if rng.random_bool(0.1) {
        "ROLLBACK;"
    } else {
        "COMMIT;"
    });
    sql
}

/// Asserts mirror = source and a unique changelog; returns the changelog's size.
async fn compare(db: &TestDb, wh: &std::path::Path, table: &str, seed: u64) -> usize {
    let cols: Vec<String> = db
        .client
        .query(
            "SELECT column_name::text FROM information_schema.columns WHERE table_name = $1 ORDER BY ordinal_position",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let pg: Vec<String> = cols
        .iter()
        .map(|c| match c.as_str() {
            "big" => "coalesce(md5(big),'~')".to_string(),
            c => format!("coalesce({c}::text,'~')"),
        })
        .collect();
    // A column added with no change of the table since has not reached the mirror yet (it
    // comes with the table's next change): NULL there, as at the source.
    let mirror_cols = delta_columns(wh, TableKind::Mirror, table).await;
    let df: Vec<String> = cols
        .iter()
        .map(|c| match c.as_str() {
            "big" => "coalesce(md5(big),'~')".to_string(),
            c if !mirror_cols.iter().any(|m| m == c) => "'~'".to_string(),
            c => format!("coalesce(CAST({c} AS VARCHAR),'~')"),
        })
        .collect();
    let src = pg_rows(
        &db.client,
        &format!(
            "SELECT concat_ws('|', {}) AS r FROM {table} ORDER BY r",
            pg.join(", ")
        ),
    )
    .await;
    let mir = delta_rows(
        wh,
        TableKind::Mirror,
        table,
        &format!(
            "SELECT concat_ws('|', {}) AS r FROM t ORDER BY r",
            df.join(", ")
        ),
    )
    .await;
    if src != mir {
        let only_src: Vec<_> = src.iter().filter(|r| !mir.contains(r)).take(5).collect();
        let only_mir: Vec<_> = mir.iter().filter(|r| !src.contains(r)).take(5).collect();
        panic!(
            "seed {seed} (replay: WALDEN_DIFF_SEED={seed}): {table}: source {} rows, mirror {}; \
             only in source: {only_src:?}; only in mirror: {only_mir:?}",
            src.len(),
            mir.len()
        );
    }
    assert_changelog_unique(wh, table, &format!("seed {seed}: ")).await;
    if cols.iter().any(|c| c == "note") {
        let aborted = delta_rows(
            wh,
            TableKind::Changes,
            table,
            "SELECT CAST(count(*) AS VARCHAR) FROM t WHERE note = 'ABORTED'",
        )
        .await;
        assert_eq!(aborted, vec!["0"], "seed {seed}: {table}: aborted changes");
    }
    let n = delta_rows(
        wh,
        TableKind::Changes,
        table,
        "SELECT CAST(count(*) AS VARCHAR) FROM t",
    )
    .await;
    n[0].parse().unwrap()
}
