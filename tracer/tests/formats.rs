//! The binary trace and the JSON-lines interchange against each other, and every reader
//! against bad input.
use std::{path::PathBuf, process::Command};

use proptest::prelude::*;
use tracer::{
    decode,
    event::Event,
    format::{
        jsonl::{self, JsonlReader},
        tracefile::{FORMAT_VERSION, TraceError, TraceHeader, TraceReader, TraceWriter},
    },
};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn golden_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data(""))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
}

fn header() -> TraceHeader {
    TraceHeader {
        tool_version: "0.1.0".into(),
        kernel_release: "6.12.117+deb12-amd64".into(),
        clock_base_ns: 1_763_900_000_000_000_000,
        offsets: vec![("cxl_dport.port".into(), 152), ("cxl_port.dports".into(), 792)],
    }
}

fn read_jsonl(path: &PathBuf) -> Vec<Event> {
    let text = std::fs::read(path).unwrap();
    JsonlReader::new(text.as_slice()).map(Result::unwrap).collect()
}

fn to_trace(events: &[Event]) -> Vec<u8> {
    let mut writer = TraceWriter::new(Vec::new(), &header()).unwrap();
    for event in events {
        writer.write_event(event).unwrap();
    }
    writer.write_counters(&[("ring_buffer_full", 0), ("stack_lost", 2)]).unwrap();
    writer.into_inner().unwrap()
}

#[test]
fn json_to_binary_to_json_is_identity() {
    for path in golden_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        let events = read_jsonl(&path);
        let bytes = to_trace(&events);
        let mut reader = TraceReader::new(bytes.as_slice()).unwrap();
        assert_eq!(reader.header(), &header());
        let back: Vec<Event> = reader.by_ref().map(Result::unwrap).collect();
        assert_eq!(back, events, "{}", path.display());
        assert_eq!(reader.counters(), &[("ring_buffer_full".to_string(), 0), ("stack_lost".to_string(), 2)]);
        assert_eq!(reader.truncation(), None);
        let mut json = Vec::new();
        for event in &back {
            jsonl::write_event(&mut json, event).unwrap();
        }
        assert_eq!(String::from_utf8(json).unwrap(), text, "{}", path.display());
    }
}

/// The site coverage a live run records at the end of its trace is what analyze reports,
/// with the engine's judged counts added, and the sites that never ran listed.
#[test]
fn coverage_recorded_in_a_trace_is_reported_by_analyze() {
    use std::sync::Arc;

    use tracer::coverage::{Coverage, SiteKind, SiteRun, XaTarget};
    let site = |kind, place: &str, function: &str, ran, reported, xarray, file: &str| SiteRun {
        kind,
        place: Arc::from(place),
        function: Arc::from(function),
        ran,
        reported,
        judged: 0,
        xarray,
        file: Some(Arc::from(file)),
    };
    let (load, core, pci) = (SiteKind::Load, "drivers/cxl/core/", "drivers/cxl/pci.c");
    let coverage = Coverage {
        sites: vec![
            // A dports xarray by its code, and one proven by what it returned.
            site(load, "cxl_pci_find_port+0x3a", "cxl_pci_find_port", 0, 0, XaTarget::Dports, core),
            site(load, "match_port_by_dport+0x4f", "match_port_by_dport", 9, 1, XaTarget::Unknown, core),
            // An xarray not known statically that never returned a dport: counted apart.
            site(load, "cxl_region_find+0x20", "cxl_region_find", 3, 0, XaTarget::Unknown, core),
            site(
                SiteKind::Use,
                "cxl_dport_init_ras_reporting",
                "cxl_dport_init_ras_reporting",
                1,
                1,
                XaTarget::Dports,
                core,
            ),
            site(SiteKind::Use, "devm_cxl_add_port", "devm_cxl_add_port", 4, 1, XaTarget::Dports, core),
            site(SiteKind::Deref, "cxl_mem_probe+0x147", "cxl_mem_probe", 1, 1, XaTarget::Dports, "drivers/cxl/mem.c"),
            site(SiteKind::Deref, "rcd_pcie_cap_emit+0x26", "rcd_pcie_cap_emit", 0, 0, XaTarget::Dports, pci),
            // Read as another xarray's: not counted, unless it reports a dport (a misreading).
            site(SiteKind::Deref, "cxl_region_find+0x24", "cxl_region_find", 3, 0, XaTarget::Other, core),
            site(SiteKind::Load, "cxl_decoder_find+0x10", "cxl_decoder_find", 2, 1, XaTarget::Other, core),
        ],
    };
    let mut writer = TraceWriter::new(Vec::new(), &header()).unwrap();
    for event in read_jsonl(&data("stock-cxl-mem-probe.jsonl")) {
        writer.write_event(&event).unwrap();
    }
    writer.write_coverage(&coverage).unwrap();
    let bytes = writer.into_inner().unwrap();
    let mut reader = TraceReader::new(bytes.as_slice()).unwrap();
    reader.by_ref().for_each(drop);
    assert_eq!(reader.coverage(), Some(&coverage));
    let file = std::env::temp_dir().join(format!("tracer-coverage-{}.trace", std::process::id()));
    std::fs::write(&file, &bytes).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tracer")).args(["analyze", "--coverage"]).arg(&file).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("sites about other xarrays, not counted: 0 load, 1 deref"), "{text}");
    assert!(text.contains("WARNING: sites read as being about another xarray reported a dport (counted as dport sites; the kernel profile's reading is wrong there): cxl_decoder_find+0x10"), "{text}");
    assert!(text.contains("coverage: dport load sites: 2 of 3 ran (2 reports, 2 judged); dport use sites: 2 of 2 ran (2 reports, 2 judged); dport deref sites: 1 of 2 ran (1 reports, 0 judged)"), "{text}");
    assert!(
        text.contains("load sites on an xarray not known statically that never returned a dport: 1 (1 ran)"),
        "{text}"
    );
    assert!(
        text.contains("dport load sites that never ran, by function: cxl_pci_find_port (drivers/cxl/core/)"),
        "{text}"
    );
    assert!(
        text.contains("dport deref sites that never ran, by function: rcd_pcie_cap_emit (drivers/cxl/pci.c; unreachable here: its rcd_link_* attributes exist only on an RCD"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
            == ["use", "4", "1", "1", "-", "devm_cxl_add_port", "(drivers/cxl/core/)"]),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.split_whitespace().take(6).collect::<Vec<_>>()
            == ["load", "9", "1", "1", "dports*", "match_port_by_dport+0x4f"]),
        "{text}"
    );
    let json =
        Command::new(env!("CARGO_BIN_EXE_tracer")).args(["analyze", "--format", "json"]).arg(&file).output().unwrap();
    let summary = String::from_utf8(json.stdout).unwrap().lines().last().unwrap().to_owned();
    assert!(summary.contains(r#""never_ran":["cxl_pci_find_port+0x3a"]"#), "{summary}");
    // Events alone (JSON lines) carry no coverage: --coverage says so.
    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["analyze", "--coverage"])
        .arg(data("stock-cxl-mem-probe.jsonl"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no site coverage"));
    let _ = std::fs::remove_file(&file);
}

#[test]
fn print_converts_a_binary_trace_to_the_interchange() {
    let path = data("stock-cxl-mem-probe.jsonl");
    let bytes = to_trace(&read_jsonl(&path));
    let dir = std::env::temp_dir().join(format!("tracer-print-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("t.trace");
    std::fs::write(&trace, bytes).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_tracer")).args(["print", "--format", "json"]).arg(&trace).output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), std::fs::read_to_string(&path).unwrap());
    // And analyzing the binary gives the same report as the JSON lines.
    let analyze = |file: &PathBuf| {
        Command::new(env!("CARGO_BIN_EXE_tracer")).args(["analyze", "--format", "json"]).arg(file).output().unwrap()
    };
    let (from_binary, from_json) = (analyze(&trace), analyze(&path));
    assert_eq!(from_binary.status.code(), Some(1));
    let strip_summary = |out: &[u8]| {
        String::from_utf8(out.to_vec())
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("{\"summary\""))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip_summary(&from_binary.stdout), strip_summary(&from_json.stdout));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_cut_off_trace_reads_up_to_the_last_complete_record() {
    let events = read_jsonl(&data("stock-cxl-mem-probe-cycles.jsonl"));
    let bytes = to_trace(&events);
    let whole = TraceReader::new(bytes.as_slice()).unwrap().count();
    // Cut at every byte: before the header is complete that is an error; after it, never an
    // error, the events of the complete records, and the lost tail accounted for.
    let mut readable = 0;
    for cut in 0..bytes.len() {
        let Ok(mut reader) = TraceReader::new(&bytes[..cut]) else {
            assert_eq!(readable, 0, "cut at {cut}: header readable at a shorter cut");
            continue;
        };
        readable += 1;
        let got: Vec<Event> = reader.by_ref().map(|e| e.expect("a cut is not corruption")).collect();
        assert!(got.len() <= whole);
        assert_eq!(got[..], events[..got.len()]);
        match reader.truncation() {
            Some(t) => assert_eq!(t.offset + t.lost_bytes, cut as u64, "cut at {cut}"),
            None => assert_eq!(reader.offset(), cut as u64, "cut at {cut}"),
        }
        if cut == bytes.len() - 1 {
            assert_eq!(got.len(), whole, "the counters record was cut, not an event");
        }
    }
    assert!(readable > bytes.len() / 2);
}

#[test]
fn corrupt_and_foreign_files_name_the_problem() {
    let bytes = to_trace(&read_jsonl(&data("stock-cxl-mem-probe.jsonl")));
    // Wrong magic.
    let err = TraceReader::new(&b"{\"ts\":1}"[..]).err().unwrap();
    assert!(err.to_string().starts_with("not a tracer trace file"), "{err}");
    // Another format version: the header's version field follows the magic, the chunk
    // header, the record length and the record type.
    let with_version = |bytes: &[u8], version: u16| {
        let mut other = bytes.to_vec();
        other[8 + 8 + 4 + 1] = version as u8;
        let crc = crc32fast::hash(&other[16..16 + u32::from_le_bytes(other[8..12].try_into().unwrap()) as usize]);
        other[12..16].copy_from_slice(&crc.to_le_bytes());
        other
    };
    let err = TraceReader::new(with_version(&bytes, FORMAT_VERSION + 1).as_slice()).err().unwrap();
    assert!(matches!(err, TraceError::Version { found } if found == FORMAT_VERSION + 1));
    assert!(err.to_string().contains("version 4 is not supported: this tracer reads versions 1 to 3"), "{err}");
    // A version 2 file written by an older tracer (before lock modes and the uport lock)
    // still reads to the same events, with a mutex for each lock and no uport lock; so does
    // version 1 (before deref events, which this file has none of).
    let v2 = std::fs::read(data("stock-cxl-mem-probe.v2.trace")).unwrap();
    for old in [v2.clone(), with_version(&v2, 1)] {
        let events: Vec<_> = TraceReader::new(old.as_slice()).unwrap().map(Result::unwrap).collect();
        assert_eq!(events, read_jsonl(&data("stock-cxl-mem-probe.jsonl")));
    }
    // A flipped byte in the middle: a checksum error at that record's offset.
    let mut flipped = bytes.clone();
    let at = bytes.len() / 2;
    flipped[at] ^= 0x40;
    let err = TraceReader::new(flipped.as_slice()).and_then(|r| r.collect::<Result<Vec<_>, _>>()).err().unwrap();
    assert!(err.to_string().starts_with("byte offset "), "{err}");
}

#[test]
fn cli_errors_name_the_file_and_the_place() {
    let dir = std::env::temp_dir().join(format!("tracer-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "bad.jsonl",
            b"{\"ts\":1,\"cpu\":0,\"tid\":1,\"comm\":\"a\",\"kind\":\"lock\",\"lock\":\"0x1\"}\nnot json\n".to_vec(),
            "bad.jsonl: line 2: not a JSON event",
        ),
        ("elf.bin", b"\x7fELF\x02\x01\x01".to_vec(), "elf.bin: neither a tracer trace file"),
        ("missing.trace", Vec::new(), "missing.trace: cannot open"),
    ];
    for (name, content, expected) in cases {
        let path = dir.join(name);
        if !content.is_empty() {
            std::fs::write(&path, content).unwrap();
        }
        let out = Command::new(env!("CARGO_BIN_EXE_tracer")).arg("analyze").arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn ring_buffer_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode::decode(&bytes);
    }

    #[test]
    fn trace_reader_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(reader) = TraceReader::new(bytes.as_slice()) {
            for event in reader {
                if event.is_err() { break; }
            }
        }
    }

    #[test]
    fn trace_reader_never_panics_on_mutated_traces(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = to_trace(&read_jsonl(&data("address-reuse.jsonl")));
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let len = cut.index(bytes.len() + 1);
        if let Ok(reader) = TraceReader::new(&bytes[..len]) {
            for event in reader {
                if event.is_err() { break; }
            }
        }
    }

    #[test]
    fn jsonl_reader_never_panics(text in "\\PC{0,300}") {
        for event in JsonlReader::new(text.as_bytes()) {
            let _ = event;
        }
    }
}
