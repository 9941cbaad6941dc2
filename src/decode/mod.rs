//! From pgoutput bytes to committed transactions and Arrow values.
//!
//! [`pgoutput`] decodes single messages, [`txn`] assembles them into committed transactions
//! (including protocol-v2 streamed ones), [`types`] maps Postgres types and text values to Arrow
//! (each value parsed by [`text_format`]), [`copy_text`] splits the snapshot's COPY text output
//! into the same text values, [`array_text`] splits array values into their elements, [`mask`]
//! masks configured columns where their values are decoded.

pub mod array_text;
pub mod copy_text;
pub mod mask;
pub mod pgoutput;
pub mod spill;
pub mod text_format;

/// Splits a captured stream in the fixture format (`u32` big-endian length, then one XLogData
/// payload, repeated) into its messages; a truncated tail is ignored.
pub fn fixture_messages(mut rest: &[u8]) -> Vec<bytes::Bytes> {
    let mut out = Vec::new();
    while rest.len() >= 4 {
        let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let Some(msg) = rest.get(4..4 + n) else { break };
        out.push(bytes::Bytes::copy_from_slice(msg));
        rest = &rest[4 + n..];
    }
    out
}
pub mod txn;
pub mod types;

#[cfg(test)]
mod golden;
