//! COPY text data (the snapshot's and backfill's wire format) through the parser, cut into
//! chunks at arbitrary points. First byte: the row width (1 to 16 columns); second: the chunk
//! size; the rest: the data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walden::decode::copy_text::CopyTextParser;

fuzz_target!(|data: &[u8]| {
    let [width, step, rest @ ..] = data else {
        return;
    };
    let mut parser = CopyTextParser::new(1 + *width as usize % 16);
    let mut rows = Vec::new();
    for chunk in rest.chunks(1 + *step as usize) {
        if parser.feed(bytes::Bytes::copy_from_slice(chunk), &mut rows).is_err() {
            return;
        }
        rows.clear();
    }
    let _ = parser.finish();
});
