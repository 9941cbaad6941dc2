//! Feeds arbitrary bytes to the pgoutput decoder and the transaction assembler: they must return
//! errors, never panic. Run: `cargo +nightly fuzz run pgoutput`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Split the input into messages at 0xFF bytes so sequences (Relation then Insert…) are explored.
    let mut assembler = walden::decode::txn::Assembler::new();
    for chunk in data.split(|b| *b == 0xff) {
        let _ = assembler.push_data(bytes::Bytes::copy_from_slice(chunk));
    }
});
