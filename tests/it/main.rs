//! Integration tests: one binary, one Postgres cluster per process, one database per test.

mod crash;
mod errors;
mod pg;
mod stream;
mod warehouse;
