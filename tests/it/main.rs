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
mod readers;
mod schema;
mod snapshot;
mod stream;
mod types;
mod warehouse;
