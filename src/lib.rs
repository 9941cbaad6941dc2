//! walden: stream a Postgres logical replication slot into Delta Lake changelog and mirror tables,
//! exactly once. See ARCHITECTURE.md for the data flow and its invariants.

pub mod apply;
pub mod batch;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod decode;
pub mod maintain;
pub mod ops;
pub mod pipeline;
pub mod plan;
pub mod privacy;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod telemetry;
pub mod tls;
