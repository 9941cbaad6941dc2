//! The operator CLI against a real server: check, slot, status, verify, query, backfill.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use walden::sink::{TableKind, Warehouse};

use crate::crash::walden;
use crate::pg::{test_db, warehouse_dir, TestDb};

fn cli(db: &TestDb, wh: &std::path::Path, args: &[&str]) -> Output {
    walden(db, wh, args, None)
        .stdout(Stdio::piped())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn seed(db: &TestDb) {
    db.client
        .batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY, customer text, total numeric(10,2), at timestamptz);
             INSERT INTO orders SELECT g, 'c' || (g % 97), g * 0.5, '2025-03-01'::timestamptz + g * interval '1 min'
               FROM generate_series(1, 5000) g;
             CREATE TABLE tags (k text PRIMARY KEY, v jsonb);
             INSERT INTO tags VALUES ('a', '{\"x\": 1}'), ('b', NULL);",
        )
        .await
        .unwrap();
}

async fn delete_from_mirror(wh: &std::path::Path, table: &str, predicate: &str) {
    let w = Warehouse::new(&walden::config::WarehouseConfig {
        url: wh.display().to_string(),
        storage_options: Default::default(),
        deletion_vectors: true,
        key_index_rows: 1_000_000,
    })
    .unwrap();
    let t = walden::apply::inspect::open(&w, &w.table_url(TableKind::Mirror, "public", table))
        .await
        .unwrap()
        .expect("the mirror exists");
    let _ = t.delete().with_predicate(predicate).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_then_catches_drift_and_backfill_repairs_it() {
    let db = test_db("ops_verify").await;
    let wh = warehouse_dir("ops_verify");
    seed(&db).await;
    let out = cli(&db, &wh, &["run", "--once"]);
    assert!(out.status.success(), "{}", text(&out));
    db.client
        .batch_execute(
            "UPDATE orders SET total = 0 WHERE id < 10; DELETE FROM orders WHERE id > 4990",
        )
        .await
        .unwrap();
    assert!(cli(&db, &wh, &["run", "--once"]).status.success());

    let out = cli(&db, &wh, &["verify"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("verify passed"), "{}", text(&out));

    // A corrupted mirror: one row gone. verify names the table and exits non-zero.
    delete_from_mirror(&wh, "orders", "id = 42").await;
    let out = cli(&db, &wh, &["verify", "--json"]);
    assert!(!out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bad: Vec<&str> = v["tables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| !t["matches"].as_bool().unwrap())
        .map(|t| t["table"].as_str().unwrap())
        .collect();
    assert_eq!(bad, vec!["public.orders"]);

    // Emptied mirror, repaired by backfill; the stream then carries on.
    delete_from_mirror(&wh, "orders", "true").await;
    assert!(!cli(&db, &wh, &["verify", "--table", "public.orders"])
        .status
        .success());
    let out = cli(&db, &wh, &["backfill", "--table", "public.orders"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = cli(&db, &wh, &["verify"]);
    assert!(out.status.success(), "{}", text(&out));
    db.client
        .batch_execute(
            "INSERT INTO orders VALUES (9999, 'late', 1, now()); DELETE FROM orders WHERE id = 1",
        )
        .await
        .unwrap();
    assert!(cli(&db, &wh, &["run", "--once"]).status.success());
    let out = cli(&db, &wh, &["verify"]);
    assert!(out.status.success(), "{}", text(&out));

    // query and status see the same tables.
    let out = cli(
        &db,
        &wh,
        &[
            "query",
            "--format",
            "csv",
            "SELECT count(*) AS n FROM public.orders",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let n: i64 = db
        .client
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("n\n{n}")
    );
    let out = cli(
        &db,
        &wh,
        &[
            "query",
            "--format",
            "json",
            "SELECT count(*) AS n FROM changes.public.orders WHERE _walden_op = 'snapshot'",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"n\":"),
        "{}",
        text(&out)
    );
    let out = cli(&db, &wh, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let orders = s["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "public.orders")
        .unwrap();
    assert_eq!(orders["mirror_rows"].as_i64().unwrap(), n);
    assert_eq!(s["lag_bytes"].as_i64().map(|b| b >= 0), Some(true));
    // Freshness: from the newest source commit to the mirror's Delta commit holding it.
    let visible = orders["visible_after_s"]
        .as_f64()
        .expect("freshness reported");
    assert!((0.0..600.0).contains(&visible), "{visible}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_the_fix_for_a_table_without_replica_identity() {
    let db = test_db("ops_check").await;
    let wh = warehouse_dir("ops_check");
    seed(&db).await;
    let out = cli(&db, &wh, &["check"]);
    assert!(out.status.success(), "{}", text(&out));
    db.client
        .batch_execute("CREATE TABLE loose (a int, b text)")
        .await
        .unwrap();
    let out = cli(&db, &wh, &["check"]);
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("table public.loose")
            && t.contains("ALTER TABLE public.loose REPLICA IDENTITY FULL;"),
        "{t}"
    );
    db.client
        .batch_execute("ALTER TABLE loose REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let out = cli(&db, &wh, &["check", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_on_wal_level_replica() {
    let other = crate::pg::Cluster::start_with("replica");
    let out = Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["check"])
        .env("WALDEN_SOURCE__URL", other.url("postgres"))
        .env("WALDEN_WAREHOUSE__URL", warehouse_dir("check_replica"))
        .output()
        .unwrap();
    other.stop();
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("ALTER SYSTEM SET wal_level = logical;"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_drop_refuses_an_active_slot_unless_forced() {
    let db = test_db("ops_slot").await;
    let wh = warehouse_dir("ops_slot");
    seed(&db).await;
    let mut run = walden(&db, &wh, &["run"], None).spawn().unwrap();
    let slot = format!("s_{}", db.name);
    let mut active = false;
    for _ in 0..150 {
        active = db.client
            .query_one("SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .unwrap()
            .get(0);
        if active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(active, "walden run never took the slot");
    // On a loaded machine the slot can read inactive for a moment (walden between connections):
    // ask until the list shows it held.
    let mut listed = false;
    for _ in 0..50 {
        let out = cli(&db, &wh, &["slot", "list", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        listed = v
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == slot.as_str() && s["active"] == true);
        if listed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(listed, "slot list never showed the slot active");

    let out = cli(&db, &wh, &["slot", "drop"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("is active"), "{}", text(&out));
    let out = cli(&db, &wh, &["slot", "drop", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    let gone: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(gone, 0);
    let _ = run.kill();
    let _ = run.wait();

    let out = cli(&db, &wh, &["slot", "create", "extra_slot"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = cli(&db, &wh, &["slot", "list"]);
    assert!(text(&out).contains("extra_slot"), "{}", text(&out));
    assert!(cli(&db, &wh, &["slot", "drop", "extra_slot"])
        .status
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_while_walden_run_keeps_streaming() {
    let db = test_db("ops_backfill_live").await;
    let wh = warehouse_dir("ops_backfill_live");
    seed(&db).await;
    let mut run = walden(&db, &wh, &["run"], None).spawn().unwrap();
    let wait_for = |n: i64| {
        let wh = wh.clone();
        async move {
            for _ in 0..300 {
                if std::fs::metadata(wh.join("mirror/public/orders/_delta_log")).is_ok() {
                    let got = crate::warehouse::delta_rows(
                        &wh,
                        TableKind::Mirror,
                        "orders",
                        "SELECT CAST(count(*) AS VARCHAR) FROM t",
                    )
                    .await;
                    if got == vec![n.to_string()] {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("the mirror never reached {n} rows");
        }
    };
    wait_for(5000).await;
    db.client
        .batch_execute(
            "INSERT INTO orders SELECT g, 'x', 1, now() FROM generate_series(5001, 5100) g",
        )
        .await
        .unwrap();
    wait_for(5100).await;

    // The mirror loses rows behind walden's back; backfill repairs it while `run` streams on.
    delete_from_mirror(&wh, "orders", "id > 100").await;
    let out = cli(&db, &wh, &["backfill", "--table", "public.orders"]);
    assert!(out.status.success(), "{}", text(&out));
    db.client
        .batch_execute("INSERT INTO orders SELECT g, 'y', 2, now() FROM generate_series(5101, 5200) g; \
                        DELETE FROM orders WHERE id <= 50; UPDATE orders SET total = 7 WHERE id BETWEEN 51 AND 60")
        .await
        .unwrap();
    wait_for(5150).await;
    Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .unwrap();
    let status = run.wait().unwrap();
    assert!(status.success(), "walden run exit: {status}");
    let out = cli(&db, &wh, &["verify"]);
    assert!(out.status.success(), "{}", text(&out));
}
