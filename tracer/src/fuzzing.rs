//! The checks the fuzz targets run (fuzz/), shared with the regression test that replays
//! their corpus and crash reproducers in `cargo test`.
use crate::{
    analysis::Analysis,
    decode::{decode, encode},
    engine::Limits,
    format::{jsonl::JsonlReader, tracefile::TraceReader},
};

/// The binary trace reader on arbitrary bytes, and the engine on what it yields: errors
/// only, never a panic.
pub fn trace_reader(data: &[u8]) {
    let Ok(reader) = TraceReader::new(data) else { return };
    let mut analysis = Analysis::new(Limits::default());
    for event in reader {
        match event {
            Ok(event) => analysis.feed(&event, |_| {}),
            Err(_) => break,
        }
    }
    let _ = analysis.summary();
}

/// The JSON-lines reader on arbitrary bytes, and the engine on what it yields.
pub fn jsonl_reader(data: &[u8]) {
    let mut analysis = Analysis::new(Limits::default());
    for event in JsonlReader::new(data).flatten() {
        analysis.feed(&event, |_| {});
    }
}

/// The ring-buffer decoder on arbitrary bytes; a decoded record re-encodes to itself.
pub fn ringbuf_decoder(data: &[u8]) {
    if let Ok(raw) = decode(data) {
        let again = decode(&encode(&raw)).expect("an encoded record decodes");
        assert_eq!(again, raw);
    }
}
