//! From pgoutput bytes to committed transactions and Arrow values.
//!
//! [`pgoutput`] decodes single messages, [`txn`] assembles them into committed transactions
//! (including protocol-v2 streamed ones), [`types`] maps Postgres types and text values to Arrow.

pub mod pgoutput;
pub mod txn;
pub mod types;

#[cfg(test)]
mod golden;
