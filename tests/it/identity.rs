//! Replica identities and unchanged TOAST values against a real Postgres: DEFAULT (primary key),
//! USING INDEX, FULL with and without a key (NULLs, identical rows), NOTHING. After every run the
//! mirror must equal the source, row for row, duplicates included.

use walden::sink::TableKind;

use crate::pg::{config, test_db, warehouse_dir, TestDb};
use crate::warehouse::{assert_plain_arrow_types, assert_same, delta_rows, pg_rows, run_once};

/// `id`, `k`, `big` (md5 and length, so TOASTed values compare cheaply), `note`; sorted on all.
fn pg_sql(table: &str) -> String {
    format!(
        "SELECT concat_ws('|', coalesce(id::text,'~'), coalesce(k,'~'), coalesce(md5(big),'~'), \
         coalesce(length(big)::text,'~'), coalesce(note,'~')) AS r FROM {table} ORDER BY r"
    )
}

const DF_SQL: &str = "SELECT concat_ws('|', coalesce(CAST(id AS VARCHAR),'~'), coalesce(k,'~'), \
    coalesce(md5(big),'~'), coalesce(CAST(length(big) AS VARCHAR),'~'), coalesce(note,'~')) AS r \
    FROM t ORDER BY r";

async fn assert_tables_equal(db: &TestDb, wh: &std::path::Path, tables: &[&str]) {
    for table in tables {
        let src = pg_rows(&db.client, &pg_sql(table)).await;
        let mir = delta_rows(wh, TableKind::Mirror, table, DF_SQL).await;
        assert_same(table, &src, &mir);
    }
}

async fn exec(db: &TestDb, sql: &[&str]) {
    for s in sql {
        db.client
            .batch_execute(s)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
}

const TABLES: &[&str] = &["pk", "uidx", "fullpk", "fullnokey", "nothing"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_identity_keeps_the_mirror_equal_to_the_source() {
    let db = test_db("identity").await;
    let wh = warehouse_dir("identity");
    let mut ddl = String::new();
    for t in TABLES {
        let key = match *t {
            "pk" | "fullpk" => "id int PRIMARY KEY",
            "uidx" => "id int NOT NULL",
            _ => "id int",
        };
        ddl.push_str(&format!(
            "CREATE TABLE {t} ({key}, k text, big text, note text);
             ALTER TABLE {t} ALTER COLUMN big SET STORAGE EXTERNAL;"
        ));
    }
    ddl.push_str(
        "CREATE UNIQUE INDEX uidx_k ON uidx (k);
         ALTER TABLE uidx ALTER COLUMN k SET NOT NULL;
         ALTER TABLE uidx REPLICA IDENTITY USING INDEX uidx_k;
         ALTER TABLE fullpk REPLICA IDENTITY FULL;
         ALTER TABLE fullnokey REPLICA IDENTITY FULL;
         ALTER TABLE nothing REPLICA IDENTITY NOTHING;",
    );
    exec(&db, &[&ddl]).await;
    let cfg = config(&db, &wh);
    run_once(&cfg).await;

    // Rows with TOASTed values (stored out of line: EXTERNAL, > 2 kB), NULLs and duplicates.
    let mut load = Vec::new();
    for t in TABLES {
        load.push(format!(
            "INSERT INTO {t} SELECT g, 'k' || g, repeat(md5(g::text), 100), 'n' || g
               FROM generate_series(1, 20) g"
        ));
    }
    load.push("INSERT INTO fullnokey VALUES (100, NULL, NULL, 'dup'), (100, NULL, NULL, 'dup'), (100, NULL, NULL, 'dup')".into());
    load.push(
        "INSERT INTO nothing VALUES (100, NULL, NULL, 'dup'), (100, NULL, NULL, 'dup')".into(),
    );
    let load: Vec<&str> = load.iter().map(String::as_str).collect();
    exec(&db, &load).await;
    run_once(&cfg).await;
    assert_tables_equal(&db, &wh, TABLES).await;

    // Each kind of change against rows already in the mirror, one batch.
    let mut changes = Vec::new();
    for t in ["pk", "uidx", "fullpk", "fullnokey"] {
        changes.extend([
            // plain update: big not sent ('u')
            format!("UPDATE {t} SET note = 'plain' WHERE id = 1"),
            // identity change: the row moves with its unchanged TOAST value
            format!("UPDATE {t} SET id = id + 1000, k = k || 'x' WHERE id = 2"),
            // several updates of one row in one batch
            format!("UPDATE {t} SET note = 'one' WHERE id = 3"),
            format!("UPDATE {t} SET note = 'two' WHERE id = 3"),
            format!("UPDATE {t} SET id = 3003, k = 'moved twice' WHERE id = 3"),
            // insert then update in one batch
            format!("INSERT INTO {t} VALUES (50, 'k50', repeat('z', 5000), 'new')"),
            format!("UPDATE {t} SET note = 'new, updated' WHERE id = 50"),
            // delete, and a toast value that does change
            format!("DELETE FROM {t} WHERE id = 4"),
            format!("UPDATE {t} SET big = repeat('changed', 1000) WHERE id = 5"),
            // NULLs in the identity
            format!("UPDATE {t} SET note = NULL WHERE id = 6"),
            format!("UPDATE {t} SET note = 'was null' WHERE id = 6"),
        ]);
    }
    changes.extend([
        // one of three identical rows is deleted, another updated: exactly one row each
        "DELETE FROM fullnokey WHERE ctid = (SELECT min(ctid) FROM fullnokey WHERE id = 100)".to_string(),
        "UPDATE fullnokey SET note = 'one of dups' WHERE ctid = (SELECT min(ctid) FROM fullnokey WHERE id = 100)".to_string(),
        "INSERT INTO nothing VALUES (7, 'k7', repeat('q', 4000), 'more')".to_string(),
    ]);
    let changes: Vec<&str> = changes.iter().map(String::as_str).collect();
    exec(&db, &changes).await;
    run_once(&cfg).await;
    assert_tables_equal(&db, &wh, TABLES).await;

    // Across batches: updates of rows the previous batches moved; a truncate followed, in the
    // same batch, by an insert and an update that leaves its TOAST value unchanged.
    exec(
        &db,
        &[
            "UPDATE pk SET note = 'again' WHERE id = 1002",
            "UPDATE fullpk SET note = 'again' WHERE id = 1002",
            "UPDATE fullnokey SET note = 'again' WHERE id = 1002",
            "UPDATE uidx SET note = 'again' WHERE id = 1002",
            "TRUNCATE pk",
            "INSERT INTO pk VALUES (1, 'k1', repeat('after truncate', 300), 'a')",
            "UPDATE pk SET note = 'b' WHERE id = 1",
            "TRUNCATE nothing",
            "INSERT INTO nothing VALUES (1, 'k1', repeat('after truncate', 300), 'a')",
        ],
    )
    .await;
    run_once(&cfg).await;
    assert_tables_equal(&db, &wh, TABLES).await;

    // The changelog says which columns were not sent.
    let unchanged = delta_rows(
        &wh,
        TableKind::Changes,
        "pk",
        "SELECT CAST(count(*) AS VARCHAR) FROM t WHERE _walden_unchanged = 'big'",
    )
    .await;
    assert_ne!(unchanged, vec!["0"], "unchanged TOAST must be recorded");
    assert_plain_arrow_types(&wh);
}
