//! Golden scenarios: each file under tests/data is replayed through the engine and must give
//! exactly the findings listed here (class, site, occurrences, in order of first occurrence),
//! and `tracer analyze` must print exactly the committed reports in both formats.
//! `TRACER_BLESS=1 cargo test --test golden` rewrites the reports after a deliberate change.
use std::{path::PathBuf, process::Command};

use tracer::{analysis::Analysis, engine::Limits, source::FileSource};

/// (class, site, occurrences) of one grouped finding.
type Expected = (&'static str, &'static str, u64);

const SCENARIOS: &[(&str, &[Expected])] = &[
    (
        "stock-cxl-mem-probe",
        &[("unlocked-use", "cxl_dport_init_ras_reporting", 1), ("stale-use", "devm_cxl_add_port", 1)],
    ),
    (
        "stock-cxl-mem-probe-cycles",
        &[("unlocked-use", "cxl_dport_init_ras_reporting", 3), ("stale-use", "devm_cxl_add_port", 3)],
    ),
    ("fixed-cxl-mem-probe", &[]),
    ("unlock-relock", &[("stale-use", "devm_cxl_add_port", 1)]),
    ("root-port-wrong-lock", &[("unlocked-use", "cxl_rcd_component_reg_phys", 1)]),
    ("root-port-uport-lock", &[]),
    ("stock-root-erase", &[("unlocked-erase", "cxl_dport_remove", 1)]),
    ("patched-root-erase", &[]),
    ("concurrent-free-before-use", &[("use-after-free", "cxl_dport_init_ras_reporting", 1)]),
    ("free-without-predicted-lock", &[("rule-mismatch", "kfree", 1)]),
    ("address-reuse", &[]),
    ("address-reuse-stale-pointer", &[("use-after-free", "cxl_dport_init_ras_reporting", 1)]),
    ("acpi-rebind-address-reuse", &[("unlocked-erase", "cxl_dport_remove", 2)]),
    ("deref-before-lock", &[("unlocked-use", "cxl_mem_probe", 1), ("stale-use", "devm_cxl_add_endpoint", 1)]),
    ("deref-under-lock", &[]),
    ("deref-after-unlock", &[("unlocked-use", "cxl_mem_probe", 1)]),
    ("deref-not-a-loaded-dport", &[]),
    (
        "stock-7.2.13-memdev-acpi",
        &[
            ("unlocked-use", "cxl_add_ep", 2),
            ("unlocked-use", "cxl_mem_probe", 2),
            ("stale-use", "devm_cxl_add_endpoint", 2),
            ("unlocked-erase", "cxl_dport_remove", 2),
            ("unlocked-use", "cxl_add_ep", 2),
            ("unlocked-use", "cxl_mem_probe", 2),
            ("stale-use", "devm_cxl_add_endpoint", 2),
        ],
    ),
    ("lock-held-by-other-thread", &[("unlocked-use", "cxl_dport_init_ras_reporting", 1)]),
    ("lock-taken-before-tracing", &[]),
    ("stamp-stale-without-lock-events", &[("stale-use", "devm_cxl_add_port", 1)]),
    ("missed-unlock", &[("unlocked-use", "devm_cxl_add_port", 1)]),
    ("unjudged-pointer", &[]),
    ("load-after-free", &[("use-after-free", "match_port_by_dport", 1)]),
    ("unlocked-insert", &[("unlocked-erase", "__devm_cxl_add_dport", 1)]),
    ("region-attach-7.2.13", &[("unlocked-use", "cxl_region_attach_position", 1)]),
    ("walk-under-lock", &[]),
    ("walk-unlocked", &[("unlocked-use", "del_dports", 2)]),
    (
        "two-readers-grouped",
        &[("unlocked-use", "cxl_dport_init_ras_reporting", 2), ("stale-use", "devm_cxl_add_port", 2)],
    ),
];

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

#[test]
fn every_data_file_has_a_scenario() {
    let mut files: Vec<String> = std::fs::read_dir(data(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter_map(|name| name.strip_suffix(".jsonl").map(str::to_owned))
        .collect();
    files.sort();
    let mut listed: Vec<String> = SCENARIOS.iter().map(|(name, _)| name.to_string()).collect();
    listed.sort();
    assert_eq!(files, listed);
}

#[test]
fn scenarios_give_exactly_the_expected_findings() {
    for (name, expected) in SCENARIOS {
        let mut analysis = Analysis::new(Limits::default());
        for event in FileSource::open(&data(&format!("{name}.jsonl"))).unwrap() {
            analysis.feed(&event.unwrap(), |_| {});
        }
        let got: Vec<(&str, &str, u64)> =
            analysis.groups().iter().map(|g| (g.finding.class.name(), &*g.finding.site, g.count)).collect();
        assert_eq!(&got, expected, "scenario {name}");
        // Every judged finding names the dport the thread loaded, with its load stack.
        for group in analysis.groups().iter() {
            let f = &group.finding;
            assert_ne!(f.dport, 0, "scenario {name}");
            if f.class.is_read_side() && f.site.as_ref() != "match_port_by_dport" {
                assert!(f.load.as_ref().is_some_and(|l| l.stack.is_some()), "scenario {name}: no load stack");
            }
        }
    }
}

/// With `--no-fold`, every use of a loaded pointer is a finding of its own: what the
/// folded view gathers under one root cause.
#[test]
fn without_folding_every_use_is_its_own_finding() {
    let groups = |fold: bool| {
        let mut analysis = Analysis::with_folding(Limits::default(), fold);
        for event in FileSource::open(&data("stock-7.2.13-memdev-acpi.jsonl")).unwrap() {
            analysis.feed(&event.unwrap(), |_| {});
        }
        analysis.groups().iter().map(|g| (g.finding.class, g.finding.site.clone(), g.also_at.len())).collect::<Vec<_>>()
    };
    let (folded, unfolded) = (groups(true), groups(false));
    assert_eq!(unfolded.len(), 27);
    assert!(unfolded.iter().all(|(_, _, also)| *also == 0));
    // Each folded root plus what it gathered is the unfolded view, one for one.
    assert_eq!(folded.iter().map(|(_, _, also)| 1 + also).sum::<usize>(), unfolded.len());
    // The stale pointer in cxl_mem_probe: one root at devm_cxl_add_endpoint, with the five
    // places it reached below it.
    assert!(
        folded
            .iter()
            .any(|(class, site, also)| class.name() == "stale-use" && &**site == "devm_cxl_add_endpoint" && *also == 5)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["analyze", "--no-fold"])
        .arg(data("stock-7.2.13-memdev-acpi.jsonl"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).matches("BUG: tracer:").count(), 27);
}

#[test]
fn analyze_prints_the_committed_reports() {
    let bless = std::env::var_os("TRACER_BLESS").is_some();
    for (name, expected) in SCENARIOS {
        for (format, ext) in [("text", "txt"), ("json", "json")] {
            let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
                .args(["analyze", "--format", format])
                .arg(data(&format!("{name}.jsonl")))
                .output()
                .unwrap();
            let status = out.status.code().unwrap();
            assert_eq!(status, if expected.is_empty() { 0 } else { 1 }, "{name} {format}: exit status");
            assert!(out.stderr.is_empty(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
            let report = data(&format!("{name}.expected.{ext}"));
            if bless {
                std::fs::write(&report, &out.stdout).unwrap();
            }
            let committed = std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("{}: {e}", report.display()));
            assert_eq!(
                String::from_utf8(out.stdout).unwrap(),
                committed,
                "{name} {format} differs from {}",
                report.display()
            );
        }
    }
}
