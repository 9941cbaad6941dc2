//! Crash safety: walden is killed with SIGKILL at random moments (and aborted at failpoints inside
//! a flush) while a workload runs; afterwards every change is in the changelog exactly once and
//! the mirror equals the source.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::Rng;
use walden::sink::TableKind;

use crate::pg::{test_db, warehouse_dir, TestDb};
use crate::warehouse::{assert_changelog_unique, assert_same, delta_rows, pg_rows};

pub fn walden(
    db: &TestDb,
    wh: &std::path::Path,
    args: &[&str],
    failpoint: Option<&str>,
) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_walden"));
    c.args(args)
        .env("WALDEN_SOURCE__URL", &db.url)
        .env("WALDEN_SOURCE__SLOT", format!("s_{}", db.name))
        .env("WALDEN_SOURCE__CREATE_PUBLICATION", "true")
        .env("WALDEN_SOURCE__STATUS_INTERVAL_MS", "1000")
        .env("WALDEN_WAREHOUSE__URL", wh)
        .env("WALDEN_BATCH__MAX_ROWS", "40")
        .env("WALDEN_BATCH__MAX_DELAY_MS", "100")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(fp) = failpoint {
        c.env("WALDEN_FAILPOINTS", fp);
    }
    c
}

/// The `items (id, qty, note)` table at the source, one string per row in id order.
pub async fn items_source(client: &tokio_postgres::Client) -> Vec<String> {
    pg_rows(
        client,
        "SELECT concat_ws('|', id, qty, note) FROM items ORDER BY id",
    )
    .await
}

/// The mirror of `items`, as [`items_source`] shows the source.
pub async fn items_mirror(wh: &std::path::Path) -> Vec<String> {
    delta_rows(
        wh,
        TableKind::Mirror,
        "items",
        "SELECT concat_ws('|', CAST(id AS VARCHAR), CAST(qty AS VARCHAR), note) FROM t ORDER BY id",
    )
    .await
}

#[derive(Default, Debug, Clone, Copy)]
struct Counts {
    items: u64,
    log: u64,
}

async fn workload(db_url: String, txns: u32) -> Counts {
    let client = crate::pg::connect(&db_url).await;
    let mut n = Counts::default();
    for i in 0..txns as i32 {
        let mut t = Counts::default();
        client.simple_query("BEGIN").await.unwrap();
        t.items += client
            .execute("INSERT INTO items VALUES ($1, 0, 'new')", &[&i])
            .await
            .unwrap();
        t.items += client
            .execute(
                "UPDATE items SET qty = qty + 1, note = 'upd' WHERE id = $1",
                &[&(i / 2)],
            )
            .await
            .unwrap();
        t.log += client
            .execute("INSERT INTO log (item, delta) VALUES ($1, 1)", &[&i])
            .await
            .unwrap();
        if i % 7 == 0 && i >= 10 {
            t.items += client
                .execute("DELETE FROM items WHERE id = $1", &[&(i - 10)])
                .await
                .unwrap();
        }
        if i % 50 == 25 {
            // a transaction that never happened
            client.simple_query("ROLLBACK").await.unwrap();
            continue;
        }
        client.simple_query("COMMIT").await.unwrap();
        n.items += t.items;
        n.log += t.log;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    n
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let db = test_db("crash").await;
    let wh = warehouse_dir("crash");
    db.client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, qty int NOT NULL, note text);
             CREATE TABLE log (id bigserial PRIMARY KEY, item int, delta int);",
        )
        .await
        .unwrap();
    // Create slot and publication before the workload starts.
    let st = walden(&db, &wh, &["run", "--once"], None).output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );

    let load = tokio::spawn(workload(db.url.clone(), 1500));
    let mut kills = 0;
    let mut failpoint_aborts = 0;
    let mut rng = rand::rng();
    for round in 0..20 {
        let fp = match round {
            1 => Some("after-changelog-commit"),
            3 => Some("before-confirm"),
            _ => None,
        };
        let child = walden(&db, &wh, &["run"], fp).spawn().unwrap();
        if fp.is_some() {
            let out = child.wait_with_output().unwrap();
            assert!(!out.status.success(), "failpoint run must abort");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("failpoint"), "{err}");
            failpoint_aborts += 1;
        } else {
            let ms = rng.random_range(150..1200);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            stop(child);
            kills += 1;
        }
        if load.is_finished() && round >= 6 {
            break;
        }
    }
    assert!(kills >= 5, "only {kills} kills");
    assert_eq!(failpoint_aborts, 2);
    let expected = load.await.unwrap();

    // Drain what is left; must exit 0.
    let out = walden(&db, &wh, &["run", "--once"], None).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for table in ["items", "log"] {
        assert_changelog_unique(&wh, table, "").await;
    }
    let log_changes = delta_rows(
        &wh,
        TableKind::Changes,
        "log",
        "SELECT CAST(count(*) AS VARCHAR) FROM t",
    )
    .await;
    assert_eq!(log_changes, vec![expected.log.to_string()], "log changes");
    let item_changes = delta_rows(
        &wh,
        TableKind::Changes,
        "items",
        "SELECT CAST(count(*) AS VARCHAR) FROM t",
    )
    .await;
    assert_eq!(
        item_changes,
        vec![expected.items.to_string()],
        "items changes"
    );

    let src = items_source(&db.client).await;
    let mir = items_mirror(&wh).await;
    assert_same("items", &src, &mir);
    let src = pg_rows(
        &db.client,
        "SELECT concat_ws('|', id, item, delta) FROM log ORDER BY id",
    )
    .await;
    let mir = delta_rows(
        &wh,
        TableKind::Mirror,
        "log",
        "SELECT concat_ws('|', CAST(id AS VARCHAR), CAST(item AS VARCHAR), CAST(delta AS VARCHAR)) FROM t ORDER BY id",
    )
    .await;
    assert_same("log", &src, &mir);
}
