#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tracer::fuzzing::jsonl_reader(data));
