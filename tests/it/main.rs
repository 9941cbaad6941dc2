//! Integration tests: one binary, one Postgres cluster per process, one database per test.

mod adopt;
mod crash;
mod differential;
mod errors;
mod faults;
mod fixtures;
mod identity;
mod large;
mod ops;
mod pg;
mod publication;
mod python;
mod readers;
mod schema;
mod snapshot;
mod storage;
mod stream;
mod tls;
mod types;
mod warehouse;
