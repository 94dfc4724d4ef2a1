//! Known findings (`--known`): the shipped list of a stock kernel turns a real run of it into
//! a gate that fails only on what a module can fix; known findings are still reported,
//! apart, in every format; `tracer known` writes a starting file that reads back.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use serde_json::Value;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// A shipped known-findings list (`known/` at the repository's root).
fn shipped(kernel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../known").join(format!("{kernel}.known"))
}

fn scratch(name: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{n}-{name}", std::process::id()))
}

fn tracer(args: &[&str], file: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tracer")).args(args).arg(file).output().unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

/// A real 7.2.13 guest trace of the stock kernel: memdev-bind and acpi-unbind.
const STOCK_7_2: &str = "stock-7.2.13-memdev-acpi.jsonl";

#[test]
fn the_shipped_7_2_list_leaves_only_cxl_mem_probes_findings_new() {
    let known = shipped("7.2");
    let known = known.to_str().unwrap();
    let (code, json, stderr) = tracer(&["analyze", "--format", "json", "--known", known], &data(STOCK_7_2));
    assert_eq!(code, Some(1), "{stderr}");
    let lines: Vec<Value> = json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (summary, findings) = lines.split_last().unwrap();
    let new: Vec<&str> =
        findings.iter().filter(|f| f.get("known").is_none()).map(|f| f["title"].as_str().unwrap()).collect();
    assert!(!new.is_empty());
    for (f, title) in findings.iter().filter(|f| f.get("known").is_none()).zip(&new) {
        // Each new finding is cxl_mem_probe's own: in it, or at a use it passed a dport to.
        let stack: Vec<&str> = f["stack"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
        assert!(stack.iter().take(2).any(|s| s.starts_with("cxl_mem_probe+")), "{title}: {stack:?}");
    }
    let known_titles: Vec<&str> =
        findings.iter().filter(|f| f.get("known").is_some()).map(|f| f["title"].as_str().unwrap()).collect();
    assert!(known_titles.contains(&"unlocked-use in cxl_add_ep"), "{known_titles:?}");
    assert!(known_titles.contains(&"unlocked-erase in cxl_dport_remove"), "{known_titles:?}");
    // New findings come first, then the known ones.
    let first_known = findings.iter().position(|f| f.get("known").is_some()).unwrap();
    assert!(findings[first_known..].iter().all(|f| f.get("known").is_some()));
    let s = &summary["summary"];
    assert_eq!(s["new_findings"].as_u64().unwrap(), new.len() as u64);
    assert_eq!(s["known"]["findings"]["unlocked-erase"].as_u64(), Some(1));
    // This trace attached no region: the list's region entry shows as not seen.
    let unseen: Vec<&str> =
        s["known"]["unseen"].as_array().unwrap().iter().map(|e| e["title"].as_str().unwrap()).collect();
    assert_eq!(unseen, ["unlocked-use in cxl_region_attach_position"]);
}

#[test]
fn all_findings_known_is_a_clean_exit_and_stale_entries_are_listed() {
    let list = scratch("all.known");
    let (_, text, _) = tracer(&["known"], &data(STOCK_7_2));
    std::fs::write(&list, format!("{text}stale-use in no_such_function  # gone since 7.3\n")).unwrap();
    let (code, out, stderr) = tracer(&["analyze", "--known", list.to_str().unwrap()], &data(STOCK_7_2));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(out.contains("known findings (") && out.contains("\nknown: seen "), "{out}");
    assert!(out.contains("  new findings: 0\n"), "{out}");
    assert!(out.contains("known but not seen (line 8): stale-use in no_such_function  # gone since 7.3"), "{out}");
    // The starting file's reasons are accepted, never silently: each is named on stderr.
    let warned = |title: &str| stderr.lines().any(|l| l.contains("warning") && l.contains(&format!("{title:?}")));
    assert!(warned("unlocked-use in cxl_add_ep"), "{stderr}");
    assert!(!warned("stale-use in no_such_function"), "{stderr}");
    // Without the list the same trace fails.
    assert_eq!(tracer(&["analyze"], &data(STOCK_7_2)).0, Some(1));
}

#[test]
fn ktap_shows_known_findings_as_skipped_and_fails_a_class_only_for_new_ones() {
    let known = shipped("7.2");
    let (_, ktap, _) = tracer(&["analyze", "--format", "ktap", "--known", known.to_str().unwrap()], &data(STOCK_7_2));
    assert!(ktap.contains("    ok 1 unlocked-use in cxl_add_ep # SKIP known: core/port.c 1852-1871:"), "{ktap}");
    assert!(ktap.contains("    not ok 2 unlocked-use in cxl_mem_probe (read of dport->rch)\n"), "{ktap}");
    assert!(ktap.contains("\nnot ok 1 unlocked-use\n"), "{ktap}");
    // Every unlocked-erase is known: its class passes.
    assert!(ktap.contains("\nok 3 unlocked-erase\n"), "{ktap}");
}

#[test]
fn a_bad_known_file_is_an_error_naming_its_line() {
    let list = scratch("bad.known");
    std::fs::write(&list, "# fine\nunlocked-use in cxl_add_ep\n").unwrap();
    let (code, _, stderr) = tracer(&["analyze", "--known", list.to_str().unwrap()], &data(STOCK_7_2));
    assert_eq!(code, Some(2));
    assert!(stderr.contains(&format!("{}:2: ", list.display())) && stderr.contains("has no reason"), "{stderr}");
}

#[test]
fn a_starting_file_comes_from_a_json_report_as_from_the_trace() {
    let (_, report, _) = tracer(&["analyze", "--format", "json"], &data(STOCK_7_2));
    let report_file = scratch("findings.jsonl");
    std::fs::write(&report_file, report).unwrap();
    let titles = |text: &str| -> Vec<String> {
        text.lines().filter(|l| !l.starts_with('#')).map(|l| l.split("  #").next().unwrap().to_owned()).collect()
    };
    let (code, from_report, stderr) = tracer(&["known"], &report_file);
    assert_eq!(code, Some(0), "{stderr}");
    let (_, from_trace, _) = tracer(&["known"], &data(STOCK_7_2));
    assert_eq!(titles(&from_report), titles(&from_trace));
    assert_eq!(
        titles(&from_trace),
        [
            "stale-use in devm_cxl_add_endpoint",
            "unlocked-erase in cxl_dport_remove",
            "unlocked-use in cxl_add_ep",
            "unlocked-use in cxl_mem_probe (read of dport->rch)"
        ]
    );
}

#[test]
fn every_shipped_list_reads() {
    let mut kernels: Vec<String> = std::fs::read_dir(shipped("").parent().unwrap())
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(".known").map(str::to_owned))
        .collect();
    kernels.sort();
    assert_eq!(kernels, ["6.1", "6.12", "7.2", "7.2-src"], "a list for each kernel of the matrix");
    for kernel in &kernels {
        let (code, _, stderr) = tracer(&["analyze", "--known", shipped(kernel).to_str().unwrap()], &data(STOCK_7_2));
        assert!(matches!(code, Some(0 | 1)), "{kernel}: {stderr}");
    }
}
