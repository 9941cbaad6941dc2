//! Golden pgoutput fixtures, captured from the real server with our replication client.
//!
//! `WALDEN_UPDATE_FIXTURES=1 cargo test --test it golden` rewrites `tests/fixtures/pgoutput-v2.bin`
//! (a sequence of `u32 length | XLogData payload`). Without it, the test captures the same workload
//! again and checks that today's server still produces the same sequence of message kinds as the
//! stored fixture, which the decoder's unit tests (`src/decode/golden.rs`) assert value by value.

use std::time::Duration;

use walden::decode::pgoutput::{Decoder, Message};
use walden::source::{ReplicationConn, WalMessage};

use crate::pg::test_db;

pub const FIXTURE: &str = "tests/fixtures/pgoutput-v2.bin";

/// The workload whose WAL the fixture holds; `src/decode/golden.rs` relies on its exact values.
const WORKLOAD: &[&str] = &[
    "INSERT INTO kinds VALUES (1, true, 32767, 2147483647, 9223372036854775807, 1.5, 2.25, 12.50,
        123456789012345678901234567890.123456789, 'text é', 'varchar', 'char', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
        '2024-02-29', '12:34:56.789', '2024-02-29 12:34:56.789', '2024-02-29 12:34:56.789+02', '{\"k\": [1, 2]}',
        '\\x0102ff', 'happy', NULL, '{1,2,3}')",
    "UPDATE kinds SET big = repeat('0123456789', 300) WHERE id = 1",
    "UPDATE kinds SET i2 = 1 WHERE id = 1",
    "UPDATE kinds SET id = 2 WHERE id = 1",
    "DELETE FROM kinds WHERE id = 2",
    "TRUNCATE kinds",
    "BEGIN; INSERT INTO kinds (id, t) SELECT g, repeat('x', 300) FROM generate_series(10, 400) g; \
     SAVEPOINT a; INSERT INTO kinds (id) VALUES (9999); ROLLBACK TO SAVEPOINT a; COMMIT",
    "SELECT pg_logical_emit_message(true, 'app', 'in a transaction')",
    "SELECT pg_logical_emit_message(false, 'walden', 'end')",
];

async fn capture() -> Vec<bytes::Bytes> {
    let db = test_db("fixtures").await;
    db.client
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('sad', 'happy');
             CREATE TABLE kinds (id int PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
                n numeric(10,2), nbig numeric, t text, vc varchar(20), c char(4), u uuid, d date, tm time,
                ts timestamp, tstz timestamptz, j jsonb, by bytea, e mood, big text, arr int[]);
             ALTER TABLE kinds ALTER COLUMN big SET STORAGE EXTERNAL;
             CREATE PUBLICATION walden FOR ALL TABLES;",
        )
        .await
        .unwrap();
    let mut pg = walden::source::parse_url(&db.url).unwrap();
    pg.connect_timeout(Duration::from_secs(5));
    let tls = walden::source::tls::TlsParams::default()
        .build(None)
        .unwrap();
    let conn = walden::source::ConnectionConfig {
        pg,
        tls,
        answer_within: None,
    };
    let mut repl = ReplicationConn::connect(&conn, None).await.unwrap();
    let slot = repl.create_slot("fixtures", false, false).await.unwrap();
    for sql in WORKLOAD {
        db.client.batch_execute(sql).await.unwrap();
    }
    let mut stream = repl
        .start_replication(
            "fixtures",
            "walden",
            slot.consistent_point,
            walden::source::StreamTiming {
                status_interval: Duration::from_secs(1),
                receive_timeout: None,
            },
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut decoder = Decoder::new();
    'outer: loop {
        let batch = tokio::time::timeout(Duration::from_secs(30), stream.recv())
            .await
            .expect("no marker within 30 s")
            .expect("stream ended")
            .unwrap();
        for m in batch {
            if let WalMessage::XLogData { data, .. } = m {
                out.push(data.clone());
                if let Ok(Message::LogicalMessage { prefix, .. }) = decoder.decode(data) {
                    if prefix == "walden" {
                        break 'outer;
                    }
                }
            }
        }
    }
    stream.close().await.unwrap();
    out
}

fn kinds(msgs: &[bytes::Bytes]) -> Vec<String> {
    let mut d = Decoder::new();
    let mut v: Vec<String> = msgs
        .iter()
        .map(|m| {
            let msg = d.decode(m.clone()).expect("captured messages decode");
            format!("{msg:?}")
                .split([' ', '{', '('])
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_fixture_matches_the_server() {
    let captured = capture().await;
    let path = crate::project_file(FIXTURE);
    if std::env::var("WALDEN_UPDATE_FIXTURES").is_ok() {
        let mut buf = Vec::new();
        for m in &captured {
            buf.extend_from_slice(&(m.len() as u32).to_be_bytes());
            buf.extend_from_slice(m);
        }
        std::fs::write(&path, buf).unwrap();
    }
    let stored = walden::decode::fixture_messages(
        &std::fs::read(&path).expect("fixture missing: run with WALDEN_UPDATE_FIXTURES=1"),
    );
    assert_eq!(
        kinds(&captured),
        kinds(&stored),
        "the server's message sequence changed"
    );
    assert!(
        kinds(&stored).iter().any(|k| k == "StreamStart"),
        "fixture must hold a streamed transaction"
    );
}
