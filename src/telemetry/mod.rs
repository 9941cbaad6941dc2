//! Logs, Prometheus metrics, and the HTTP endpoint that serves them with health.
//!
//! Owns the process-wide metric registry (every metric is listed in METRICS.md), the process's
//! health (what `/readyz` answers), the endpoint, and the log subscriber. Every other module
//! only records into these; nothing here depends on them.

mod health;
mod http;
mod logs;
mod metrics;

pub use health::{Phase, HEALTH};
pub use http::serve;
pub use logs::{init_logging, LogFormat};
pub use metrics::{render, Metrics, METRICS};
