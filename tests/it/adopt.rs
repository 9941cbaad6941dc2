//! Tables that join the publication while walden runs arrive with their existing rows: one added
//! with ALTER PUBLICATION … ADD TABLE (rows before the add, a change after it) and one filled by
//! CREATE TABLE … AS and added with no change afterwards.

use walden::sink::TableKind;

use crate::pg::{config, test_db, warehouse_dir};
use crate::warehouse::{assert_id_v_mirror, delta_rows, run_once, Streaming};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_added_to_the_publication_are_copied_with_their_rows() {
    let db = test_db("adopt").await;
    let wh = warehouse_dir("adopt");
    db.client
        .batch_execute(
            "CREATE TABLE first (id int PRIMARY KEY, v text);
             CREATE PUBLICATION walden FOR TABLE first;
             INSERT INTO first VALUES (1, 'a');",
        )
        .await
        .unwrap();
    let cfg = config(&db, &wh);
    run_once(&cfg).await;

    // While walden is stopped.
    db.client
        .batch_execute(
            "CREATE TABLE later (id int PRIMARY KEY, v text);
             INSERT INTO later SELECT g, 'before the add ' || g FROM generate_series(1, 20) g;
             ALTER PUBLICATION walden ADD TABLE later;
             INSERT INTO later VALUES (21, 'after the add');
             UPDATE later SET v = 'updated after the add' WHERE id = 3;
             CREATE TABLE ctas AS SELECT g AS id, 'ctas ' || g AS v FROM generate_series(1, 15) g;
             ALTER TABLE ctas ADD PRIMARY KEY (id);
             ALTER PUBLICATION walden ADD TABLE ctas;",
        )
        .await
        .unwrap();
    // As left by a walden killed while creating the table's mirror: a directory, no commit.
    std::fs::create_dir_all(wh.join("mirror/public/later/_delta_log")).unwrap();
    run_once(&cfg).await;

    // While walden streams: one more table, found by the stream's changes.
    let streaming = Streaming::start(&cfg);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    db.client
        .batch_execute(
            "CREATE TABLE live (id int PRIMARY KEY, v text);
             INSERT INTO live SELECT g, 'live ' || g FROM generate_series(1, 10) g;
             ALTER PUBLICATION walden ADD TABLE live;
             DELETE FROM live WHERE id = 2;",
        )
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    streaming.stop().await;
    run_once(&cfg).await;

    // A new generation: dropped and created again under the same name, filled before it is
    // published again; the old rows leave the mirror, the changelog keeps both.
    db.client
        .batch_execute(
            "DROP TABLE later;
             CREATE TABLE later AS SELECT g AS id, 'generation 2 #' || g AS v FROM generate_series(100, 104) g;
             ALTER TABLE later ADD PRIMARY KEY (id);
             ALTER PUBLICATION walden ADD TABLE later;
             INSERT INTO later VALUES (105, 'generation 2 streamed');",
        )
        .await
        .unwrap();
    run_once(&cfg).await;
    let versions: Vec<_> = std::fs::read_dir(wh.join("_walden/schemas/public/later"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    let oids: std::collections::HashSet<u64> = versions
        .iter()
        .map(|v| {
            serde_json::from_str::<serde_json::Value>(v).unwrap()["oid"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(oids.len(), 2, "two generations recorded: {versions:?}");
    let old = delta_rows(
        &wh,
        TableKind::Changes,
        "later",
        "SELECT CAST(count(*) AS VARCHAR) FROM t WHERE v LIKE 'before the add%'",
    )
    .await;
    assert_ne!(old, vec!["0"], "the changelog keeps the first generation");

    for table in ["first", "later", "ctas", "live"] {
        assert_id_v_mirror(&db.client, &wh, table, table).await;
    }
}
