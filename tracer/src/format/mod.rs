//! Event encodings: the JSON-lines interchange and the binary trace file.
pub mod jsonl;
pub mod tracefile;
