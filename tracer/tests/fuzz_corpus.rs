//! Replays the fuzz corpus seeds and every crash reproducer (fuzz/corpus/TARGET/,
//! fuzz/regressions/TARGET/) through the fuzz targets' checks.
use std::path::PathBuf;

use tracer::fuzzing;

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz").join(kind).join(target);
    match std::fs::read_dir(&dir) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// A fuzz target's check.
type Check = fn(&[u8]);

#[test]
fn corpus_and_regressions_pass_the_fuzz_checks() {
    let targets: [(&str, Check); 3] = [
        ("trace_reader", fuzzing::trace_reader),
        ("jsonl_reader", fuzzing::jsonl_reader),
        ("ringbuf_decoder", fuzzing::ringbuf_decoder),
    ];
    for (target, check) in targets {
        let seeds = inputs("corpus", target);
        assert!(!seeds.is_empty(), "fuzz/corpus/{target} has no seeds");
        for path in seeds.iter().chain(&inputs("regressions", target)) {
            check(&std::fs::read(path).unwrap());
        }
    }
}
