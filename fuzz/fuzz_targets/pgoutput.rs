//! pgoutput messages, as the replication stream hands them over, through the decoder and the
//! transaction assembler. The input is a sequence of messages, each behind a two-byte big-endian
//! length (0, or more than is left: the rest of the input).
#![no_main]

use libfuzzer_sys::fuzz_target;
use walden::decode::txn::Assembler;

fuzz_target!(|data: &[u8]| {
    let mut assembler = Assembler::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        rest = &rest[2..];
        let n = if n == 0 || n > rest.len() { rest.len() } else { n };
        let (message, tail) = rest.split_at(n);
        if assembler.push_data(bytes::Bytes::copy_from_slice(message)).is_err() {
            return;
        }
        rest = tail;
    }
});
