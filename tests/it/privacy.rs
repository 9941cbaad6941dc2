//! Personal data: columns masked at ingest never reach the warehouse in clear (snapshot, stream,
//! spilled transactions, key changes of a hashed identity), the masked mirror still equals the
//! source (walden verify), hashes equal Postgres's own HMAC (pgcrypto), and a `[privacy]` that
//! names what the source does not have is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;

use crate::pg::{config, test_db, warehouse_dir, TestDb};
use crate::warehouse::{assert_verified, run_once};
use walden::config::{Config, PrivacyConfig};
use walden::sink::{TableKind, Warehouse};

const KEY: &str = "a test secret";

/// Every string in clear that marks a masked value of the test's rows.
const MARKERS: [&str; 5] = ["EMAILMARK", "SSNMARK", "PHONEMARK", "CARDMARK", "CODEMARK"];

async fn exec(db: &TestDb, sql: &str) {
    db.client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn privacy(text: &str) -> PrivacyConfig {
    let p: PrivacyConfig = toml::from_str(text).unwrap();
    p.validate().unwrap();
    p
}

/// Every file under `dir`, recursively.
/// A running walden removes files and directories (erasures, vacuum, renamed staging files)
/// while this walks: what is gone by the time it is looked at is left out.
fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    for e in entries {
        let Ok(e) = e else { continue };
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// No file under the warehouse holds a marker: neither its bytes (Delta logs, checkpoints,
/// walden's own records, the first occurrence in any Parquet page) nor, read as Parquet, any
/// string value of any column. Returns how many Parquet files were read.
fn assert_no_marker(wh: &Path) -> usize {
    let mut files = Vec::new();
    files_under(wh, &mut files);
    let mut parquet = 0;
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for m in MARKERS {
            assert!(
                memchr::memmem::find(&bytes, m.as_bytes()).is_none(),
                "{} holds {m} in clear",
                f.display()
            );
        }
        if !f.to_string_lossy().ends_with(".parquet") {
            continue;
        }
        parquet += 1;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(f).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            for col in batch.columns() {
                let col = arrow::compute::cast(col, &DataType::Utf8).unwrap_or(col.clone());
                let Some(s) = col.as_string_opt::<i32>() else {
                    continue;
                };
                for v in s.iter().flatten() {
                    assert!(
                        !MARKERS.iter().any(|m| v.contains(m)),
                        "{} holds {v:?}",
                        f.display()
                    );
                }
            }
        }
    }
    parquet
}

async fn mirror_rows(cfg: &Config, table: &str, sql: &str) -> BTreeSet<(String, String)> {
    let w = Warehouse::new(&cfg.warehouse).unwrap();
    let url = w.table_url(TableKind::Mirror, "public", table);
    let t = w.open(&url).await.unwrap().expect("mirror exists");
    let mut out = BTreeSet::new();
    for b in walden::apply::inspect::query(&t, sql).await.unwrap() {
        let a = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
        let c = arrow::compute::cast(b.column(1), &DataType::Utf8).unwrap();
        for i in 0..b.num_rows() {
            let get = |x: &dyn Array| {
                if x.is_null(i) {
                    String::new()
                } else {
                    x.as_string::<i32>().value(i).to_string()
                }
            };
            out.insert((get(&a), get(&c)));
        }
    }
    out
}

async fn source_rows(db: &TestDb, sql: &str) -> BTreeSet<(String, String)> {
    db.client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let get = |i| r.get::<_, Option<String>>(i).unwrap_or_default();
            (get(0), get(1))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_columns_never_reach_the_warehouse_in_clear() {
    let db = test_db("masking").await;
    let wh = warehouse_dir("masking");
    exec(
        &db,
        "CREATE EXTENSION IF NOT EXISTS pgcrypto;
         CREATE TABLE people (id int PRIMARY KEY, email text, ssn text, phone text, city text);
         INSERT INTO people SELECT g, 'EMAILMARK' || g || '@example.com', 'SSNMARK' || g,
             'PHONEMARK' || g, 'city' || (g % 7) FROM generate_series(1, 300) g;
         CREATE TABLE orders (code text PRIMARY KEY, person int, card text);
         INSERT INTO orders SELECT 'CODEMARK' || g, g % 300 + 1, 'CARDMARK' || g
             FROM generate_series(1, 500) g;",
    )
    .await;
    let mut cfg = config(&db, &wh);
    cfg.privacy = privacy(&format!(
        "key = {KEY:?}
         [mask.\"public.people\"]
         email = \"hash\"
         ssn = \"drop\"
         phone = \"null\"
         [mask.\"public.orders\"]
         code = \"hash\"
         card = \"drop\""
    ));
    // Transactions past 16 KiB spill to disk (masked before they do) and land in parts.
    cfg.spill.memory_bytes = 16 * 1024;
    cfg.spill.dir = wh.with_extension("spill").display().to_string();
    run_once(&cfg).await; // the snapshot

    exec(
        &db,
        "INSERT INTO people VALUES (1001, 'EMAILMARK1001@x', 'SSNMARK1001', 'PHONEMARK1001', 'c');
         UPDATE people SET email = 'EMAILMARKNEW' || id WHERE id <= 20;
         UPDATE people SET city = 'moved' WHERE id BETWEEN 21 AND 40;
         UPDATE people SET id = id + 5000 WHERE id BETWEEN 41 AND 45;
         DELETE FROM people WHERE id BETWEEN 46 AND 60;
         UPDATE orders SET code = code || 'X' WHERE person < 10;
         UPDATE orders SET card = 'CARDMARKNEW' || person WHERE person BETWEEN 10 AND 20;
         DELETE FROM orders WHERE person BETWEEN 21 AND 30;
         INSERT INTO orders SELECT 'CODEMARKS' || g, g, 'CARDMARKS' || g FROM generate_series(1, 2000) g;",
    )
    .await;
    run_once(&cfg).await;

    // The masked mirror equals the source, masked the same way (verify hashes the source's text).
    assert_verified(&cfg).await;
    // Hashes are Postgres's own HMAC-SHA256 under the key (pgcrypto), so joins with values
    // hashed elsewhere work: people by id, orders by person (their hashed key).
    let hmac = |col: &str| format!("encode(hmac({col}, '{KEY}', 'sha256'), 'hex')");
    let want = source_rows(
        &db,
        &format!("SELECT id::text, {} FROM people", hmac("email")),
    )
    .await;
    let got = mirror_rows(&cfg, "people", "SELECT id, email FROM t").await;
    assert_eq!(got.len(), 300 + 1 - 15);
    assert_eq!(got, want);
    let want = source_rows(
        &db,
        &format!("SELECT {}, person::text FROM orders", hmac("code")),
    )
    .await;
    let got = mirror_rows(&cfg, "orders", "SELECT code, person FROM t").await;
    assert_eq!(got, want);
    assert_eq!(got.len(), 500 - 20 + 2000); // persons 21–30 had two orders each
                                            // Nulled: NULL in every row; dropped: not a column at all.
    let phones = mirror_rows(&cfg, "people", "SELECT count(*), count(phone) FROM t").await;
    assert_eq!(phones, BTreeSet::from([("286".into(), "0".into())]));
    let w = Warehouse::new(&cfg.warehouse).unwrap();
    for (table, gone) in [("people", "ssn"), ("orders", "card")] {
        for kind in [TableKind::Mirror, TableKind::Changes] {
            let t = w
                .open(&w.table_url(kind, "public", table))
                .await
                .unwrap()
                .unwrap();
            let schema = t.snapshot().unwrap().snapshot().arrow_schema();
            assert!(schema.field_with_name(gone).is_err(), "{table} {kind:?}");
        }
    }

    let parquet = assert_no_marker(&wh);
    assert!(parquet >= 8, "read {parquet} Parquet files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privacy_naming_what_the_source_lacks_is_refused() {
    let db = test_db("privacy_names").await;
    exec(
        &db,
        "CREATE TABLE customers (id int PRIMARY KEY, email text);
         CREATE TABLE notes (id int PRIMARY KEY, body text);
         CREATE PUBLICATION walden FOR TABLE customers;",
    )
    .await;
    let check = |text: &str| {
        let p = privacy(text);
        let client = &db.client;
        async move { walden::privacy::check_names(client, &p, "walden").await }
    };
    let ok = check("key = \"k\"\n[subjects.customer]\n\"public.customers\" = \"id\"").await;
    assert_eq!(ok.unwrap(), Vec::<String>::new());
    let unpublished = check("[mask.\"public.notes\"]\nbody = \"null\"").await;
    assert_eq!(unpublished.unwrap(), vec!["public.notes".to_string()]);
    let e = check("key = \"k\"\n[subjects.customer]\n\"public.customer\" = \"id\"")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("privacy.subjects.customer names table public.customer, which does not exist"),
        "{e}"
    );
    let e = check("[mask.\"public.customers\"]\nmail = \"drop\"")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("column mail of public.customers"), "{e}");

    // `walden check` says the same, as an error.
    let wh = warehouse_dir("privacy_names");
    let mut cfg = config(&db, &wh);
    cfg.privacy = privacy("[mask.\"public.customers\"]\nmail = \"drop\"");
    let report = walden::ops::check::run(&cfg).await;
    assert!(!report.ok);
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.check == "privacy" && f.message.contains("column mail")),
        "{report:?}"
    );

    // A subject table whose replica identity names no key for a deleted row: a warning with
    // the fix; the keyed one is not named.
    exec(
        &db,
        "CREATE TABLE visits (customer_id int, at timestamptz);
         ALTER TABLE notes REPLICA IDENTITY FULL;",
    )
    .await;
    cfg.privacy = privacy(
        "key = \"k\"
         [subjects.customer]
         \"public.customers\" = \"id\"
         \"public.notes\" = \"id\"
         \"public.visits\" = \"customer_id\"",
    );
    let keyless = walden::privacy::keyless_subject_tables(&db.client, &cfg.privacy)
        .await
        .unwrap();
    assert_eq!(keyless, ["public.notes", "public.visits"]);
    let report = walden::ops::check::run(&cfg).await;
    assert!(
        report.findings.iter().any(|f| f.check == "privacy"
            && f.message.contains("public.notes, public.visits")
            && f.fix
                .as_deref()
                .is_some_and(|h| h.contains("REPLICA IDENTITY"))),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_erasure_finds_every_file_that_still_holds_a_subject() {
    let db = test_db("erasure_scan").await;
    let wh = warehouse_dir("erasure_scan");
    exec(
        &db,
        "CREATE TABLE customers (id int PRIMARY KEY, email text);
         INSERT INTO customers SELECT g, 'c' || g || '@example.com' FROM generate_series(1, 200) g;
         CREATE TABLE orders (id int PRIMARY KEY, customer_id int, total int);
         INSERT INTO orders SELECT g, g % 200 + 1, g FROM generate_series(1, 1000) g;",
    )
    .await;
    let mut cfg = config(&db, &wh);
    cfg.privacy = privacy(&format!(
        "key = {KEY:?}
         propagate_deletes = false
         [subjects.customer]
         \"public.customers\" = \"id\"
         \"public.orders\" = \"customer_id\"
         [mask.\"public.orders\"]
         customer_id = \"hash\""
    ));
    run_once(&cfg).await;
    let subject = |s: &str| s.parse::<walden::privacy::scan::Subject>().unwrap();
    // Present: the mirror's current files hold customer 42 and its 5 orders (the hashed
    // column is searched for the hash).
    let scan = walden::privacy::scan::find(&cfg, &subject("customer=42"))
        .await
        .unwrap();
    let rows = |kind: &str, table: &str, current: bool| -> u64 {
        scan.places
            .iter()
            .filter(|p| p.kind == kind && p.table == table && p.current == current)
            .map(|p| p.rows)
            .sum()
    };
    assert_eq!(
        rows("mirror", "public.customers", true),
        1,
        "{}",
        scan.render()
    );
    assert_eq!(
        rows("mirror", "public.orders", true),
        5,
        "{}",
        scan.render()
    );
    assert_eq!(
        rows("changelog", "public.orders", true),
        5,
        "{}",
        scan.render()
    );
    assert!(scan.files_searched >= 8, "{}", scan.render());

    // Deleted at the source: the mirror no longer shows the rows, but its files (marked by
    // deletion vectors) and the changelog's history still hold them; verify-erasure says so.
    exec(
        &db,
        "UPDATE customers SET email = 'new' WHERE id = 42;
         DELETE FROM orders WHERE customer_id = 42;
         DELETE FROM customers WHERE id = 42;",
    )
    .await;
    run_once(&cfg).await;
    assert_verified(&cfg).await;
    let scan = walden::privacy::scan::find(&cfg, &subject("customer=42"))
        .await
        .unwrap();
    let tables: BTreeSet<(&str, &str)> = scan
        .places
        .iter()
        .map(|p| (p.table.as_str(), p.kind))
        .collect();
    assert_eq!(
        tables,
        BTreeSet::from([
            ("public.customers", "changelog"),
            ("public.customers", "mirror"),
            ("public.orders", "changelog"),
            ("public.orders", "mirror"),
        ]),
        "{}",
        scan.render()
    );
    // Changelog: the snapshot row, the update's old+new… at least the snapshot and delete rows.
    let changelog: u64 = scan
        .places
        .iter()
        .filter(|p| p.kind == "changelog" && p.table == "public.customers")
        .map(|p| p.rows)
        .sum();
    assert!(changelog >= 3, "{}", scan.render());
    assert!(scan.render().contains("still hold it"));

    // Someone never there is nowhere; an unknown subject is an error naming the known ones.
    let none = walden::privacy::scan::find(&cfg, &subject("customer=4242"))
        .await
        .unwrap();
    assert!(none.places.is_empty(), "{}", none.render());
    assert!(none.render().contains("nowhere in the warehouse"));
    let e = walden::privacy::scan::find(&cfg, &subject("patient=1"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("configured: customer"), "{e}");
}

/// 200 customers and 1,000 orders; customer 42 has a unique marker (`ERASEME…`) in every row of
/// theirs, and orders in files shared with other customers'.
async fn customers_and_orders(db: &TestDb) {
    exec(
        db,
        "CREATE TABLE customers (id int PRIMARY KEY, email text, note text);
         INSERT INTO customers SELECT g, 'c' || g || '@example.com',
             CASE WHEN g = 42 THEN 'ERASEME-note' ELSE 'note' || g END FROM generate_series(1, 200) g;
         CREATE TABLE orders (id int PRIMARY KEY, customer_id int, item text);
         INSERT INTO orders SELECT g, g % 200 + 1,
             CASE WHEN g % 200 + 1 = 42 THEN 'ERASEME-item' || g ELSE 'item' || g END
             FROM generate_series(1, 1000) g;",
    )
    .await;
}

/// A database of customers and orders (see [`customers_and_orders`]) and a config whose subject
/// `customer` maps both, with `settings` added to `[privacy]`.
async fn customers_setup(name: &str, settings: &str) -> (TestDb, std::path::PathBuf, Config) {
    let db = test_db(name).await;
    let wh = warehouse_dir(name);
    customers_and_orders(&db).await;
    let mut cfg = config(&db, &wh);
    cfg.privacy = privacy(&format!(
        "key = {KEY:?}
         {settings}
         [subjects.customer]
         \"public.customers\" = \"id\"
         \"public.orders\" = \"customer_id\""
    ));
    (db, wh, cfg)
}

/// The files under `wh` whose bytes hold the `ERASEME` marker (walden may be running: a file
/// removed between listing and reading holds nothing).
fn marked(wh: &Path) -> Vec<String> {
    let mut files = Vec::new();
    files_under(wh, &mut files);
    files
        .into_iter()
        .filter(|f| match std::fs::read(f) {
            Ok(bytes) => memchr::memmem::find(&bytes, b"ERASEME").is_some(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => panic!("{}: {e}", f.display()),
        })
        .map(|f| f.display().to_string())
        .collect()
}

/// Every file under `dir` as bytes, by path (to compare a warehouse before and after).
fn snapshot_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = Vec::new();
    files_under(dir, &mut files);
    files
        .into_iter()
        .map(|f| (f.display().to_string(), std::fs::read(&f).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_erases_a_subject_everywhere_and_leaves_a_receipt() {
    // Customer 42 has a unique marker in every row of theirs (ERASEME…), orders that share
    // files with other customers', and a long history: updates, an order whose key changes.
    let (db, wh, cfg) = customers_setup("forget", "propagate_deletes = false").await;
    run_once(&cfg).await;
    for round in 0..4 {
        exec(
            &db,
            &format!(
                "UPDATE customers SET email = 'ERASEME-mail{round}' WHERE id = 42;
                 UPDATE customers SET note = 'other{round}' WHERE id % 10 = 0;
                 UPDATE orders SET item = item || '+' WHERE customer_id IN (41, 42, 43);"
            ),
        )
        .await;
        run_once(&cfg).await;
    }
    exec(
        &db,
        "UPDATE orders SET id = id + 5000 WHERE customer_id = 42 AND id < 300;",
    )
    .await;
    run_once(&cfg).await;
    let subject = "customer=42"
        .parse::<walden::privacy::scan::Subject>()
        .unwrap();

    // Still at the source: refused, and nothing changes.
    let e = walden::privacy::forget::forget(&cfg, &subject, false, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the source still holds 6 row(s) of subject customer"),
        "{e}"
    );
    // An identifier the column's type cannot hold is at the source nowhere (compared as text).
    let odd: walden::privacy::scan::Subject = "customer=4 2".parse().unwrap();
    let none = walden::privacy::forget::forget(&cfg, &odd, true, false)
        .await
        .unwrap();
    assert_eq!((none.source_rows, none.tables.len()), (0, 0));

    // Deleted at the source (the delete streams to the mirror), then forgotten.
    exec(
        &db,
        "DELETE FROM orders WHERE customer_id = 42; DELETE FROM customers WHERE id = 42;",
    )
    .await;
    run_once(&cfg).await;
    assert!(
        !marked(&wh).is_empty(),
        "the history holds the subject before forget"
    );

    // A dry run lists what would go and changes nothing, byte for byte.
    let before = snapshot_bytes(&wh);
    let plan = walden::privacy::forget::forget(&cfg, &subject, true, false)
        .await
        .unwrap();
    assert_eq!(
        snapshot_bytes(&wh),
        before,
        "a dry run changed the warehouse"
    );
    assert_eq!(plan.tables.len(), 4, "{}", plan.render());
    assert!(plan.render().contains("dry run"));

    let receipt = walden::privacy::forget::forget(&cfg, &subject, false, false)
        .await
        .unwrap();
    assert_eq!(receipt.remaining, 0, "{}", receipt.render());
    assert!(receipt.tables.iter().all(|t| !t.files_deleted.is_empty()));
    // Nothing under the warehouse holds the marker any more (bytes of every file, and every
    // string value of every Parquet file), nor the subject (verify-erasure).
    assert_eq!(marked(&wh), Vec::<String>::new());
    let scan = walden::privacy::scan::find(&cfg, &subject).await.unwrap();
    assert!(scan.places.is_empty(), "{}", scan.render());
    let mut files = Vec::new();
    files_under(&wh, &mut files);
    for f in files
        .iter()
        .filter(|f| f.to_string_lossy().ends_with(".parquet"))
    {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(f).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        for b in reader {
            for col in b.unwrap().columns() {
                if let Some(s) = col.as_string_opt::<i32>() {
                    assert!(
                        s.iter().flatten().all(|v| !v.contains("ERASEME")),
                        "{}",
                        f.display()
                    );
                }
            }
        }
    }
    // The receipt is on disk, names the subject only by its hash.
    let receipts = wh.join("_walden/erasures");
    let names: Vec<_> = std::fs::read_dir(&receipts)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(names.len(), 1);
    let text = std::fs::read_to_string(names[0].path()).unwrap();
    assert!(text.contains(&receipt.subject_hmacs[0]) && text.contains("\"customer\""));
    assert!(!text.contains("=42") && !text.contains("ERASEME"), "{text}");
    // Everyone else is untouched: the mirror still equals the source, and the other customers'
    // history is whole (4 updates of customers 10, 20, …).
    assert_verified(&cfg).await;
    assert_eq!(
        changelog_count(&cfg, "customers", "id = 10").await,
        5,
        "snapshot + 4 updates of customer 10"
    );
    // The stream goes on after the erasure.
    exec(&db, "INSERT INTO customers VALUES (1000, 'new', 'n');").await;
    run_once(&cfg).await;
    assert_verified(&cfg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_at_the_source_are_erased_from_the_history_within_the_bound() {
    let (db, wh, cfg) = customers_setup("propagate", "erase_within = \"4s\"").await;
    run_once(&cfg).await; // the snapshot
    let (stop, rx) = tokio::sync::watch::channel(false);
    let running = {
        let cfg = cfg.clone();
        tokio::spawn(async move {
            walden::pipeline::run(&cfg, walden::pipeline::Mode::Continuous, rx).await
        })
    };
    // A long history for customer 42 (and 43, who is deleted and comes back), files shared with
    // other customers, an order whose key changes; then both are deleted.
    for round in 0..4 {
        exec(
            &db,
            &format!(
                "UPDATE customers SET email = 'ERASEME-mail{round}' WHERE id = 42;
                 UPDATE customers SET note = 'other{round}' WHERE id % 10 = 0 OR id = 43;
                 UPDATE orders SET item = item || '+' WHERE customer_id IN (41, 42, 43);"
            ),
        )
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    exec(
        &db,
        "UPDATE orders SET id = id + 5000 WHERE customer_id = 42 AND id < 300;
         DELETE FROM orders WHERE customer_id = 42; DELETE FROM customers WHERE id = 42;
         DELETE FROM customers WHERE id = 43; INSERT INTO customers VALUES (43, 'back', 'again');",
    )
    .await;
    // Within the bound (4 s, looked at every 2 s, plus the stream's 200 ms delay): nothing
    // under the warehouse holds the customer's marker. Waited for up to a minute.
    let receipts = |wh: &Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(wh.join("_walden/erasures"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let deleted_at = std::time::Instant::now();
    while !marked(&wh).is_empty() || receipts(&wh).is_empty() {
        assert!(
            deleted_at.elapsed() < std::time::Duration::from_secs(60),
            "files still hold the deleted customer's values: {:?}",
            marked(&wh)
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let subject = |s: &str| s.parse::<walden::privacy::scan::Subject>().unwrap();
    let scan = walden::privacy::scan::find(&cfg, &subject("customer=42"))
        .await
        .unwrap();
    assert!(scan.places.is_empty(), "{}", scan.render());
    // Customer 43 is back at the source: nothing of theirs was erased.
    let kept = walden::privacy::scan::find(&cfg, &subject("customer=43"))
        .await
        .unwrap();
    assert!(
        kept.places
            .iter()
            .any(|p| p.kind == "changelog" && p.rows >= 5),
        "{}",
        kept.render()
    );
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();

    // One receipt for the subject (others for deleted rows: customer 43's earlier versions),
    // none with the subject in clear; the mirror equals the source; the others' history is
    // whole.
    let texts: Vec<String> = receipts(&wh)
        .iter()
        .map(|r| std::fs::read_to_string(r).unwrap())
        .collect();
    for text in &texts {
        assert!(!text.contains("ERASEME") && !text.contains("=42"), "{text}");
    }
    let of_subject = texts.iter().filter(|t| t.contains("\"customer\"")).count();
    assert_eq!(of_subject, 1, "{texts:?}");
    assert_verified(&cfg).await;
    assert_eq!(
        changelog_count(&cfg, "customers", "id = 10").await,
        5,
        "snapshot + 4 updates of customer 10"
    );
}

/// Every pending-erasure record under the warehouse.
fn pending_records(wh: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    files_under(&wh.join("_walden/erasures/pending"), &mut files);
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_killed_after_its_commit_is_finished_by_the_next_run() {
    let db = test_db("erase_crash").await;
    let wh = warehouse_dir("erase_crash");
    exec(
        &db,
        "CREATE TABLE customers (id int PRIMARY KEY, email text);
         INSERT INTO customers SELECT g, CASE WHEN g = 42 THEN 'ERASEME-mail' ELSE 'm' || g END
             FROM generate_series(1, 100) g;
         CREATE TABLE orders (id int PRIMARY KEY, customer_id int, item text);
         INSERT INTO orders SELECT g, g % 100 + 1,
             CASE WHEN g % 100 + 1 = 42 THEN 'ERASEME-item' ELSE 'item' END
             FROM generate_series(1, 500) g;",
    )
    .await;
    let mut cfg = config(&db, &wh);
    cfg.privacy = privacy(&format!(
        "key = {KEY:?}
         [subjects.customer]
         \"public.customers\" = \"id\"
         \"public.orders\" = \"customer_id\""
    ));
    run_once(&cfg).await;
    exec(
        &db,
        "UPDATE customers SET email = 'ERASEME-new' WHERE id = 42;
         DELETE FROM orders WHERE customer_id = 42; DELETE FROM customers WHERE id = 42;",
    )
    .await;
    let walden = |failpoint: Option<&str>| {
        let mut c = crate::crash::walden(&db, &wh, &["run", "--once"], failpoint);
        c.env("WALDEN_PRIVACY__KEY", KEY)
            .env("WALDEN_PRIVACY__SUBJECTS__CUSTOMER__PUBLIC.CUSTOMERS", "id")
            .env(
                "WALDEN_PRIVACY__SUBJECTS__CUSTOMER__PUBLIC.ORDERS",
                "customer_id",
            );
        c
    };
    // Killed right after the first table's erasure commit, before its files are deleted.
    let out = walden(Some("after-erasure-commit")).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("failpoint after-erasure-commit hit"),
        "{stderr}"
    );
    assert_eq!(
        pending_records(&wh).len(),
        1,
        "a pending record names what is left to delete"
    );

    // The next run finishes it, and erases the rest.
    let out = walden(None).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        pending_records(&wh),
        Vec::<std::path::PathBuf>::new(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(marked(&wh), Vec::<String>::new());
    let subject = "customer=42"
        .parse::<walden::privacy::scan::Subject>()
        .unwrap();
    let scan = walden::privacy::scan::find(&cfg, &subject).await.unwrap();
    assert!(scan.places.is_empty(), "{}", scan.render());
    assert_verified(&cfg).await;
}

/// Changelog rows of `table` matching `filter`.
async fn changelog_count(cfg: &Config, table: &str, filter: &str) -> i64 {
    let w = Warehouse::new(&cfg.warehouse).unwrap();
    let changes = w
        .open(&w.table_url(TableKind::Changes, "public", table))
        .await
        .unwrap()
        .unwrap();
    let sql = format!("SELECT count(*) FROM t WHERE {filter}");
    let n = walden::apply::inspect::query(&changes, &sql).await.unwrap();
    n[0].column(0)
        .as_primitive::<arrow::datatypes::Int64Type>()
        .value(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_row_leaves_the_history_while_its_subject_remains() {
    let (db, wh, cfg) = customers_setup("erase_rows", "").await;
    run_once(&cfg).await; // the snapshot

    // Order 7 (customer 8, who stays) gets a history of marked values, shares its files with
    // other orders, moves to key 1007 halfway (an order 7 inserted afterwards is another row
    // and stays), then is deleted alone. Order 9 is deleted and inserted again in one
    // transaction, order 11 in two: their new rows stay. Order 13 is only updated.
    for round in 0..3 {
        let moved = match round {
            1 => {
                "UPDATE orders SET id = 1007 WHERE id = 7;
                  INSERT INTO orders VALUES (7, 8, 'another seven');"
            }
            _ => "",
        };
        exec(
            &db,
            &format!(
                "UPDATE orders SET item = 'GONEMARK-{round}' WHERE id = {};
                 {moved}
                 UPDATE orders SET item = item || '+' WHERE id IN (9, 11, 13);",
                if round < 2 { 7 } else { 1007 }
            ),
        )
        .await;
        run_once(&cfg).await;
    }
    exec(
        &db,
        "DELETE FROM orders WHERE id = 1007;
         BEGIN; DELETE FROM orders WHERE id = 9; INSERT INTO orders VALUES (9, 10, 'back'); COMMIT;
         DELETE FROM orders WHERE id = 11;",
    )
    .await;
    let timed = || {
        walden::telemetry::METRICS
            .delete_to_erasure_seconds
            .get_sample_count()
    };
    let before = timed();
    run_once(&cfg).await; // streams the deletes, then a round of propagated deletes
                          // Each of the three deletes' time to erasure is measured.
    assert!(timed() >= before + 3);
    exec(&db, "INSERT INTO orders VALUES (11, 12, 'again');").await;
    run_once(&cfg).await;

    // Nothing under the warehouse holds the deleted order's values (under either key), nor
    // any version of it.
    let mut files = Vec::new();
    files_under(&wh, &mut files);
    let holding: Vec<_> = files
        .iter()
        .filter(|f| memchr::memmem::find(&std::fs::read(f).unwrap(), b"GONEMARK").is_some())
        .collect();
    assert!(holding.is_empty(), "{holding:?}");
    let order = |id: &str| {
        let values = [id.to_string()].into();
        let selector = walden::privacy::select::Selector::Subject {
            column: "id".into(),
            values,
        };
        vec![("public.orders".to_string(), selector)]
    };
    let scan = walden::privacy::scan::find_selected(&cfg, "order 1007", &order("1007"))
        .await
        .unwrap();
    assert!(scan.places.is_empty(), "{}", scan.render());
    // The order 7 inserted after the move keeps its row; of the old one nothing is left.
    assert_eq!(changelog_count(&cfg, "orders", "id = 7").await, 1);
    assert_eq!(
        changelog_count(&cfg, "orders", "id = 7 AND item = 'another seven'").await,
        1
    );
    // Orders 9 and 11: only what came after their deletes is left (the new row's insert).
    assert_eq!(changelog_count(&cfg, "orders", "id = 9").await, 1);
    assert_eq!(changelog_count(&cfg, "orders", "id = 11").await, 1);
    assert_eq!(
        changelog_count(&cfg, "orders", "id = 9 AND item = 'back'").await,
        1
    );
    // Order 13 and customer 8 keep their history: snapshot + 3 updates, snapshot.
    assert_eq!(changelog_count(&cfg, "orders", "id = 13").await, 4);
    assert_eq!(changelog_count(&cfg, "customers", "id = 8").await, 1);
    assert_verified(&cfg).await;

    // A receipt of deleted rows, without them in clear.
    let receipts: Vec<String> = std::fs::read_dir(wh.join("_walden/erasures"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(!receipts.is_empty());
    for text in &receipts {
        assert!(text.contains("\"deleted rows\""), "{text}");
        assert!(
            !text.contains("GONEMARK") && !text.contains("orders:"),
            "{text}"
        );
    }

    // A later round finds a later delete: order 13 goes with its history.
    exec(&db, "DELETE FROM orders WHERE id = 13;").await;
    run_once(&cfg).await;
    assert_eq!(changelog_count(&cfg, "orders", "id = 13").await, 0);
    assert_verified(&cfg).await;
}
