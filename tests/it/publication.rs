//! Publications decide what reaches the warehouse: column lists and row filters (PostgreSQL 15)
//! hold for the snapshot and verify as for the stream; a partitioned table published through its
//! root lands as one table; an inheritance parent is copied without its children's rows.

use walden::sink::TableKind;

use crate::pg::{config, test_db, warehouse_dir};
use crate::warehouse::{
    assert_id_v_mirror, assert_same, assert_verified, delta_rows, pg_rows, run_once,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_lists_row_filters_partitions_and_inheritance() {
    let db = test_db("publication").await;
    let wh = warehouse_dir("publication");
    db.client
        .batch_execute(
            "CREATE TABLE pub_t (id int, region text, secret text, v int, PRIMARY KEY (id, region));
             CREATE TABLE parted (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
             CREATE TABLE parted_a PARTITION OF parted FOR VALUES FROM (0) TO (100);
             CREATE TABLE parted_b PARTITION OF parted FOR VALUES FROM (100) TO (200);
             CREATE TABLE inh_parent (id int PRIMARY KEY, v text);
             CREATE TABLE inh_child () INHERITS (inh_parent);
             ALTER TABLE inh_child ADD PRIMARY KEY (id);
             INSERT INTO pub_t SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 'SECRET' || g, g
               FROM generate_series(1, 40) g;
             INSERT INTO parted SELECT g, 'p' || g FROM generate_series(0, 199, 7) g;
             INSERT INTO inh_parent VALUES (1, 'parent');
             INSERT INTO inh_child VALUES (2, 'child');
             CREATE PUBLICATION walden FOR TABLE pub_t (id, region, v) WHERE (region = 'eu'),
               parted, inh_parent WITH (publish_via_partition_root = true);",
        )
        .await
        .unwrap();
    let cfg = config(&db, &wh);
    // The initial snapshot, then changes through the stream.
    run_once(&cfg).await;
    db.client
        .batch_execute(
            "INSERT INTO pub_t VALUES (100, 'eu', 'SECRET100', 1), (101, 'us', 'SECRET101', 1);
             UPDATE pub_t SET v = v + 1000 WHERE id <= 10;
             INSERT INTO parted VALUES (1, 'new a'), (150, 'new b');
             INSERT INTO inh_parent VALUES (3, 'parent 2');
             INSERT INTO inh_child VALUES (4, 'child 2');",
        )
        .await
        .unwrap();
    run_once(&cfg).await;

    let src = pg_rows(
        &db.client,
        "SELECT concat_ws('|', id::text, region, v::text) FROM pub_t WHERE region = 'eu' ORDER BY id",
    )
    .await;
    let mir = delta_rows(
        &wh,
        TableKind::Mirror,
        "pub_t",
        "SELECT concat_ws('|', CAST(id AS VARCHAR), region, CAST(v AS VARCHAR)) FROM t ORDER BY id",
    )
    .await;
    assert_same("pub_t", &src, &mir);
    // Neither the unpublished column nor its values are anywhere in the warehouse.
    for kind in ["mirror", "changes"] {
        for f in walk(&wh.join(kind).join("public/pub_t")) {
            let bytes = std::fs::read(&f).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains("secret") && !text.contains("SECRET"),
                "unpublished column in {}",
                f.display()
            );
        }
    }

    assert_id_v_mirror(&db.client, &wh, "parted", "parted").await;
    assert!(
        !wh.join("mirror/public/parted_a").exists(),
        "partitions published through the root land in the root's table"
    );

    for table in ["inh_parent", "inh_child"] {
        assert_id_v_mirror(&db.client, &wh, table, &format!("ONLY {table}")).await;
    }

    assert_verified(&cfg).await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `publish_via_partition_root = false` (the default): each partition is its own table in the
/// warehouse, with its own rows, through the snapshot and the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_published_on_their_own_land_as_their_own_tables() {
    let db = test_db("publication_leaves").await;
    let wh = warehouse_dir("publication_leaves");
    db.client
        .batch_execute(
            "CREATE TABLE parted (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
             CREATE TABLE parted_a PARTITION OF parted FOR VALUES FROM (0) TO (100);
             CREATE TABLE parted_b PARTITION OF parted FOR VALUES FROM (100) TO (200);
             INSERT INTO parted SELECT g, 'p' || g FROM generate_series(0, 199, 3) g;
             CREATE PUBLICATION walden FOR TABLE parted;",
        )
        .await
        .unwrap();
    let cfg = config(&db, &wh);
    run_once(&cfg).await;
    db.client
        .batch_execute("INSERT INTO parted VALUES (1, 'new a'), (101, 'new b'); DELETE FROM parted WHERE id = 3;")
        .await
        .unwrap();
    run_once(&cfg).await;
    for table in ["parted_a", "parted_b"] {
        assert_id_v_mirror(&db.client, &wh, table, table).await;
    }
    assert!(
        !wh.join("mirror/public/parted").exists(),
        "no table for the root"
    );
}
