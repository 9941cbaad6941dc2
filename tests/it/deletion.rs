//! The merge-on-read mirror: updates, deletes, key changes, unchanged TOAST values and truncates
//! mark rows in deletion vectors instead of rewriting files; the mirror equals the source for
//! walden's own verify and for two independent readers (Python `deltalake`, Polars); the switch
//! back to copy-on-write honours the vectors already written; maintenance purges files mostly
//! deleted, and VACUUM keeps every file (data or deletion vector) the current version needs.

use std::collections::HashSet;

use deltalake::DeltaTable;

use crate::pg::{config, test_db, warehouse_dir, TestDb};
use crate::warehouse::{assert_verified, on_disk, run_once};
use walden::config::{Config, MaintenanceConfig};
use walden::sink::{TableKind, Warehouse};

async fn mirror(cfg: &Config, table: &str) -> DeltaTable {
    let w = Warehouse::new(&cfg.warehouse).unwrap();
    let url = w.table_url(TableKind::Mirror, "public", table);
    w.open(&url).await.unwrap().expect("mirror exists")
}

/// The mirror's data files, and how many of them have a deletion vector.
async fn files(cfg: &Config, table: &str) -> (HashSet<String>, usize) {
    let t = mirror(cfg, table).await;
    let state = t.snapshot().unwrap();
    let mut paths = HashSet::new();
    let mut with_dv = 0;
    for f in state.log_data().iter() {
        paths.insert(f.path().to_string());
        with_dv += f.deletion_vector_descriptor().is_some() as usize;
    }
    (paths, with_dv)
}

async fn exec(db: &TestDb, sql: &str) {
    db.client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The mirrors of `k` and `f` equal the source: walden verify, then Python's `deltalake` and
/// Polars, as multisets of rows.
async fn assert_equal(py: &std::path::Path, db: &TestDb, cfg: &Config, when: &str) {
    assert_same(py, db, cfg, &["k", "f"], when).await;
}

/// The mirrors of `tables` equal the source (walden verify, Python's `deltalake`, Polars).
async fn assert_same(py: &std::path::Path, db: &TestDb, cfg: &Config, tables: &[&str], when: &str) {
    assert_verified(cfg).await;
    let wh = cfg.warehouse.url.clone();
    let mut args = vec![db.url.as_str(), wh.as_str()];
    args.extend(tables);
    let said = crate::python::run_script(py, "same_rows.py", &args);
    for t in tables {
        for reader in ["deltalake", "polars"] {
            let line = format!("{t} {reader}");
            assert!(said.contains(&line), "{when}: {said}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_vectors_keep_the_mirror_equal_to_the_source() {
    let py = tokio::task::spawn_blocking(crate::python::python)
        .await
        .unwrap();
    let db = test_db("deletion").await;
    let wh = warehouse_dir("deletion");
    // `k`: a key and a TOASTed column (stored out of line, uncompressed: STORAGE EXTERNAL);
    // `f`: REPLICA IDENTITY FULL without a key, with identical rows and NULLs.
    exec(
        &db,
        "CREATE TABLE k (id int PRIMARY KEY, v int, big text);
         ALTER TABLE k ALTER COLUMN big SET STORAGE EXTERNAL;
         INSERT INTO k SELECT g, g, CASE WHEN g % 50 = 0 THEN repeat(md5(g::text), 200) END
             FROM generate_series(1, 2000) g;
         CREATE TABLE f (a int, b text);
         ALTER TABLE f REPLICA IDENTITY FULL;
         INSERT INTO f SELECT g % 10, CASE WHEN g % 3 = 0 THEN NULL ELSE 'x' END
             FROM generate_series(1, 300) g;",
    )
    .await;
    let mut cfg = config(&db, &wh);
    run_once(&cfg).await; // the snapshot
    let (snapshot_files, _) = files(&cfg, "k").await;

    // Updates (TOASTed values unchanged), deletes, key changes; duplicates and NULLs in `f`.
    exec(
        &db,
        "UPDATE k SET v = v + 1 WHERE id % 7 = 0;
         DELETE FROM k WHERE id % 11 = 0;
         UPDATE k SET id = id + 10000 WHERE id % 50 = 0;
         DELETE FROM f WHERE ctid IN (SELECT ctid FROM f WHERE a = 1 AND b IS NULL LIMIT 1);
         UPDATE f SET b = 'y' WHERE ctid IN (SELECT ctid FROM f WHERE a = 2 AND b = 'x' LIMIT 2);",
    )
    .await;
    run_once(&cfg).await;
    let (now, with_dv) = files(&cfg, "k").await;
    assert!(
        snapshot_files.is_subset(&now),
        "a data file of the snapshot was rewritten: {snapshot_files:?} vs {now:?}"
    );
    assert!(with_dv > 0, "no deletion vector written");
    let t = mirror(&cfg, "k").await;
    let protocol = t.snapshot().unwrap().protocol().clone();
    assert_eq!(
        (protocol.min_reader_version(), protocol.min_writer_version()),
        (3, 7)
    );
    assert_equal(&py, &db, &cfg, "after the first changes").await;

    // The same rows again: vectors grow (earlier positions kept), rows of the stream's own
    // files are marked too.
    exec(
        &db,
        "UPDATE k SET v = v + 1 WHERE id % 7 = 0 OR id > 10000;
         DELETE FROM k WHERE id % 13 = 0;
         UPDATE f SET a = a + 100 WHERE a = 3;",
    )
    .await;
    run_once(&cfg).await;
    assert_equal(&py, &db, &cfg, "after the second changes").await;

    // A truncate in the same batch as later changes.
    exec(
        &db,
        "TRUNCATE f; INSERT INTO f VALUES (1, 'a'), (1, 'a'), (NULL, NULL);
         DELETE FROM f WHERE ctid IN (SELECT ctid FROM f WHERE a = 1 LIMIT 1);",
    )
    .await;
    run_once(&cfg).await;
    assert_equal(&py, &db, &cfg, "after the truncate").await;

    // Back to copy-on-write: files are rewritten again, without the rows their vectors mark.
    cfg.warehouse.deletion_vectors = false;
    exec(&db, "UPDATE k SET v = v + 1 WHERE id % 5 = 0").await;
    run_once(&cfg).await;
    let t = mirror(&cfg, "k").await;
    let props = t.snapshot().unwrap().metadata().configuration().clone();
    assert_eq!(
        props.get("delta.enableDeletionVectors").map(String::as_str),
        Some("false")
    );
    assert_equal(&py, &db, &cfg, "after switching to copy-on-write").await;
    cfg.warehouse.deletion_vectors = true;

    // Maintenance: files mostly deleted are purged; VACUUM keeps what a version within the
    // retention needs, and at retention 0 deletes what no current file needs.
    exec(&db, "DELETE FROM k WHERE id < 1900").await;
    run_once(&cfg).await;
    let old = mirror(&cfg, "k").await;
    let (old_version, old_rows) = (old.version().unwrap(), count(&old).await);
    // Vectors younger than a flush may take are never deleted: age them.
    let dir = wh.join("mirror/public/k");
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for name in on_disk(&dir, "deletion_vector_") {
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join(name))
            .unwrap();
        f.set_modified(hour_ago).unwrap();
    }
    let w = Warehouse::new(&cfg.warehouse).unwrap();
    let keep_hours = MaintenanceConfig {
        compact_min_files: 1000,
        retention_hours: 6,
        ..MaintenanceConfig::default()
    };
    let r = walden::maintain::round(&w, &keep_hours, None)
        .await
        .unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(r.files_purged > 0, "{r:?}");
    assert_equal(&py, &db, &cfg, "after the purge").await;
    let mut then = mirror(&cfg, "k").await;
    assert!(then.version().unwrap() > old_version);
    then.load_version(old_version).await.unwrap();
    assert_eq!(count(&then).await, old_rows, "the version before the purge");
    let m = MaintenanceConfig {
        retention_hours: 0,
        ..keep_hours
    };
    let r = walden::maintain::round(&w, &m, None).await.unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(r.files_vacuumed > 0, "{r:?}");
    let (current, _) = files(&cfg, "k").await;
    let needed_dvs: HashSet<String> = {
        let t = mirror(&cfg, "k").await;
        let state = t.snapshot().unwrap();
        state
            .log_data()
            .iter()
            .filter_map(|f| f.deletion_vector_descriptor())
            .map(|d| walden::sink::dv::stored_path(&d).expect("a vector file"))
            .collect()
    };
    assert_eq!(on_disk(&dir, "part-"), current, "data files after VACUUM");
    assert_eq!(
        on_disk(&dir, "deletion_vector_"),
        needed_dvs,
        "deletion vectors after VACUUM"
    );
    // The stream goes on after maintenance.
    exec(&db, "UPDATE k SET v = -v; DELETE FROM k WHERE id % 2 = 0").await;
    run_once(&cfg).await;
    assert_equal(&py, &db, &cfg, "after the stream went on").await;
}

/// A compaction takes longer than a flush: the stream marks rows of the files being rewritten,
/// and the rewrite's commit marks the same rows in the files that take their place (rebased);
/// the mirror stays equal to the source, and the stream goes on over the new files. An input
/// taken out of the table meanwhile (a truncate) defers the rewrite and deletes what it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_commits_over_the_rows_the_stream_marked_meanwhile() {
    use walden::maintain::{choose, rewrite};
    let py = tokio::task::spawn_blocking(crate::python::python)
        .await
        .unwrap();
    let db = test_db("rebase").await;
    let wh = warehouse_dir("rebase");
    exec(
        &db,
        "CREATE TABLE k (id int PRIMARY KEY, v int, big text);
         INSERT INTO k SELECT g, g, 'row ' || g FROM generate_series(1, 3000) g;",
    )
    .await;
    let cfg = config(&db, &wh);
    run_once(&cfg).await;
    let m = MaintenanceConfig {
        compact_min_files: 2,
        ..MaintenanceConfig::default()
    };
    // Small files, one per flush: new versions of updated rows, and inserts.
    let small_files = |round: i32| {
        format!(
            "UPDATE k SET v = v + 1 WHERE id % 5 = {round};
             INSERT INTO k SELECT g, 0, NULL FROM generate_series({a}, {b}) g;",
            a = 10_000 + round * 100,
            b = 10_099 + round * 100
        )
    };
    for round in 0..4 {
        exec(&db, &small_files(round)).await;
        run_once(&cfg).await;
    }
    let mut t = mirror(&cfg, "k").await;
    let bins = choose::bins(&t, &m).unwrap();
    let inputs: usize = bins.iter().map(Vec::len).sum();
    assert!(inputs >= 5, "{inputs} files chosen");
    let budget = std::time::Duration::from_secs(60);
    let prepared = rewrite::prepare(&t, bins, budget).await.unwrap();

    // Meanwhile the stream marks rows of the same files: updates, deletes, key changes.
    exec(
        &db,
        "UPDATE k SET v = -v WHERE id % 3 = 0;
         DELETE FROM k WHERE id % 4 = 0;
         UPDATE k SET id = id + 100000 WHERE id % 10 = 1;",
    )
    .await;
    run_once(&cfg).await;
    let done = rewrite::commit(&mut t, prepared).await.unwrap();
    assert!(done.rows_rebased > 0, "{done:?}");
    assert_eq!(done.files_removed, inputs as u64, "{done:?}");
    assert_same(&py, &db, &cfg, &["k"], "after the rebased rewrite").await;
    let (now, _) = files(&cfg, "k").await;
    assert!(
        now.len() < inputs,
        "{} files after, {inputs} rewritten",
        now.len()
    );

    // The stream goes on over the rewritten files.
    exec(
        &db,
        "UPDATE k SET v = v * 2; DELETE FROM k WHERE id % 7 = 0",
    )
    .await;
    run_once(&cfg).await;
    assert_same(&py, &db, &cfg, &["k"], "after the stream went on").await;

    // A truncate takes every input out: the rewrite is deferred, its files deleted.
    for round in 0..3 {
        exec(&db, &small_files(10 + round)).await;
        run_once(&cfg).await;
    }
    let mut t = mirror(&cfg, "k").await;
    let bins = choose::bins(&t, &m).unwrap();
    assert!(!bins.is_empty());
    let prepared = rewrite::prepare(&t, bins, budget).await.unwrap();
    let written = prepared.files();
    let dir = wh.join("mirror/public/k");
    assert!(written.iter().all(|f| dir.join(f).exists()));
    exec(&db, "TRUNCATE k; INSERT INTO k VALUES (1, 1, 'one')").await;
    run_once(&cfg).await;
    let err = rewrite::commit(&mut t, prepared).await.unwrap_err();
    assert!(
        matches!(err, rewrite::RewriteError::Gone(_)) && err.is_transient(),
        "{err}"
    );
    assert!(written.iter().all(|f| !dir.join(f).exists()), "{written:?}");
    assert_same(&py, &db, &cfg, &["k"], "after the deferred rewrite").await;

    // Maintenance's own commits (a retention, a VACUUM) made from a view older than a flush
    // that took files out get through on the newest version.
    let mut stale = mirror(&cfg, "k").await;
    exec(&db, "TRUNCATE k; INSERT INTO k VALUES (2, 2, 'two')").await;
    run_once(&cfg).await;
    walden::maintain::set_retention(&mut stale, 0)
        .await
        .unwrap();
    let vacuumed = walden::maintain::vacuum(&mut stale, 0).await.unwrap();
    assert!(vacuumed >= inputs as u64, "{vacuumed} files vacuumed");
    assert_same(&py, &db, &cfg, &["k"], "after VACUUM").await;
}

/// Rows of the table's loaded version, through deltalake's scan (vectors applied).
async fn count(t: &DeltaTable) -> i64 {
    let rows = walden::apply::inspect::query(t, "SELECT count(*) FROM t")
        .await
        .unwrap();
    rows[0]
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .unwrap()
        .value(0)
}
