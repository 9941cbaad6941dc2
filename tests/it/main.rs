//! Integration tests: one binary, one Postgres cluster per process, one database per test.

mod crash;
mod errors;
mod fixtures;
mod pg;
mod stream;
mod warehouse;
