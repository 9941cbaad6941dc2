//! Table maintenance: compaction and VACUUM keep every row and every recorded position, the
//! stream goes on after them, independent readers read the result, and VACUUM keeps what a
//! retained version still needs.

use deltalake::DeltaTable;

use crate::pg::{config, test_db, warehouse_dir};
use crate::warehouse::{assert_verified, on_disk, run_once};
use walden::config::{Config, MaintenanceConfig};
use walden::sink::{TableKind, Warehouse};

/// Maintenance that compacts from `min_files` small files and keeps old versions `hours`.
fn maintenance(min_files: usize, hours: u64) -> MaintenanceConfig {
    MaintenanceConfig {
        compact_min_files: min_files,
        retention_hours: hours,
        ..MaintenanceConfig::default()
    }
}

async fn table(cfg: &Config, kind: TableKind) -> DeltaTable {
    let w = Warehouse::new(&cfg.warehouse).unwrap();
    let url = w.table_url(kind, "public", "t");
    w.open(&url).await.unwrap().expect("table exists")
}

fn files(t: &DeltaTable) -> usize {
    t.snapshot().unwrap().log_data().iter().count()
}

async fn positions(cfg: &Config) -> Vec<String> {
    let app = walden::apply::app_id(&cfg.source.slot);
    let mut out = Vec::new();
    for kind in [TableKind::Changes, TableKind::Mirror] {
        let t = table(cfg, kind).await;
        out.push(format!(
            "{:?}",
            walden::apply::applied(&t, &app).await.unwrap()
        ));
    }
    out
}

/// Many small commits; one maintenance round compacts both tables to a file or two, keeps every
/// row and the recorded positions, VACUUM (retention 0) deletes the files compacted away, the
/// stream goes on, and Python's reader reads the mirror as Postgres has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_and_vacuum_keep_rows_and_positions() {
    let py = tokio::task::spawn_blocking(crate::python::python)
        .await
        .unwrap();
    let db = test_db("maintain").await;
    let wh = warehouse_dir("maintain");
    db.client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let cfg = config(&db, &wh);
    for i in 0..12 {
        db.client
            .batch_execute(&format!(
                "INSERT INTO t SELECT g, 'v' FROM generate_series({0} * 10, {0} * 10 + 9) g;
                 UPDATE t SET v = v || '{0}' WHERE id % 3 = {0} % 3; DELETE FROM t WHERE id = {0} * 7",
                i
            ))
            .await
            .unwrap();
        run_once(&cfg).await;
    }
    let before = (
        files(&table(&cfg, TableKind::Changes).await),
        positions(&cfg).await,
    );
    assert!(before.0 >= 12, "{before:?}");
    let w = Warehouse::new(&cfg.warehouse).unwrap();
    let r = walden::maintain::round(&w, &maintenance(2, 0), None)
        .await
        .unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!(r.compacted_tables, 2, "{r:?}");
    assert!(r.files_vacuumed > 0, "{r:?}");
    for kind in [TableKind::Changes, TableKind::Mirror] {
        let t = table(&cfg, kind).await;
        assert!(files(&t) <= 2, "{kind:?}: {} files", files(&t));
        // Nothing compacted away is left on disk.
        let dir = wh.join(kind.dir()).join("public/t");
        assert_eq!(on_disk(&dir, "part-").len(), files(&t), "{kind:?}");
    }
    assert_eq!(
        positions(&cfg).await,
        before.1,
        "recorded positions changed"
    );
    assert_verified(&cfg).await;

    // The stream goes on: nothing applied twice, nothing skipped.
    db.client
        .batch_execute("UPDATE t SET v = 'after' WHERE id < 50; DELETE FROM t WHERE id > 100")
        .await
        .unwrap();
    run_once(&cfg).await;
    assert_verified(&cfg).await;
    let rows = crate::pg::source_rows(&db.client, "t").await;
    let wh = wh.display().to_string();
    crate::python::assert_roundtrip(&py, &[db.url.as_str(), &wh, "public", "t", "id"], rows);

    // On demand: `walden maintain`, nothing left to compact now.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["maintain", "--json"])
        .env("WALDEN_SOURCE__URL", &db.url)
        .env("WALDEN_WAREHOUSE__URL", &wh)
        .env("WALDEN_MAINTENANCE__COMPACT_MIN_FILES", "2")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(&said).unwrap();
    assert_eq!(
        (r["tables"].as_u64(), r["errors"].as_u64()),
        (Some(2), Some(0)),
        "{said}"
    );
}

/// With a retention of hours, VACUUM deletes none of the files compacted away: the version
/// before the compaction still reads whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_keeps_what_a_retained_version_needs() {
    let db = test_db("maintain_keep").await;
    let wh = warehouse_dir("maintain_keep");
    db.client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let cfg = config(&db, &wh);
    for i in 0..6 {
        db.client
            .batch_execute(&format!(
                "INSERT INTO t SELECT g, 'v' FROM generate_series({0} * 10, {0} * 10 + 9) g",
                i
            ))
            .await
            .unwrap();
        run_once(&cfg).await;
    }
    let mirror = table(&cfg, TableKind::Mirror).await;
    let old = mirror.version().unwrap();
    let w = Warehouse::new(&cfg.warehouse).unwrap();
    let r = walden::maintain::round(&w, &maintenance(2, 1), None)
        .await
        .unwrap();
    assert_eq!((r.errors, r.compacted_tables), (0, 2), "{r:?}");
    assert_eq!(r.files_vacuumed, 0, "{r:?}");
    let mut then = table(&cfg, TableKind::Mirror).await;
    assert!(then.version().unwrap() > old);
    then.load_version(old).await.unwrap();
    let rows = walden::apply::inspect::query(&then, "SELECT count(*) FROM t")
        .await
        .unwrap();
    let n = rows[0]
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!(n, 60, "the version before compaction lost rows");
    assert_verified(&cfg).await;
}
