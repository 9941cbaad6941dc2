//! Values the Arrow type cannot hold are never silently lost: numeric NaN and ±infinity
//! dates and timestamps are NULL in their column and kept, exactly, in `_walden_unrepresentable`;
//! the snapshot and the stream write every value in the same text form (intervals included).

use walden::sink::TableKind;

use crate::pg::{config, test_db, warehouse_dir};
use crate::warehouse::{delta_rows, run_once};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrepresentable_values_keep_their_exact_text_in_snapshot_and_stream() {
    let db = test_db("types_exact").await;
    let wh = warehouse_dir("types_exact");
    db.client
        .batch_execute(
            "CREATE TABLE v (id int PRIMARY KEY, n numeric(10,2), d date, ts timestamp, i interval);
             INSERT INTO v VALUES (1, 'NaN', 'infinity', '-infinity', '1 year 2 mons 3 days 04:05:06'),
                                  (2, 12.5, '2024-02-29', '2024-02-29 12:00', '-1 day');",
        )
        .await
        .unwrap();
    let cfg = config(&db, &wh);
    run_once(&cfg).await; // the snapshot
    db.client
        .batch_execute(
            "INSERT INTO v VALUES (3, 'NaN', '-infinity', 'infinity', '1 year 2 mons 3 days 04:05:06'),
                                  (4, 7.25, '2000-01-01', NULL, NULL);",
        )
        .await
        .unwrap();
    run_once(&cfg).await;
    let rows = delta_rows(
        &wh,
        TableKind::Mirror,
        "v",
        "SELECT concat_ws('|', CAST(id AS VARCHAR), coalesce(CAST(n AS VARCHAR), '~'), \
         coalesce(CAST(d AS VARCHAR), '~'), coalesce(i, '~'), coalesce(_walden_unrepresentable, '~')) \
         FROM t ORDER BY id",
    )
    .await;
    assert_eq!(
        rows,
        vec![
            r#"1|~|~|P1Y2M3DT4H5M6S|{"d":"infinity","n":"NaN","ts":"-infinity"}"#,
            "2|12.50|2024-02-29|P-1D|~",
            r#"3|~|~|P1Y2M3DT4H5M6S|{"d":"-infinity","n":"NaN","ts":"infinity"}"#,
            "4|7.25|2000-01-01|~|~",
        ]
    );
    let changes = delta_rows(
        &wh,
        TableKind::Changes,
        "v",
        "SELECT concat_ws('|', _walden_op, _walden_unrepresentable) FROM t WHERE id = 3",
    )
    .await;
    assert_eq!(
        changes,
        vec![r#"insert|{"d":"-infinity","n":"NaN","ts":"infinity"}"#]
    );
}
