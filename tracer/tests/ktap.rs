//! `--format ktap` read by the kernel's own KTAP parser (`tools/testing/kunit/kunit_parser.py`
//! of the linux-source-6.12 package that `cargo xtask setup` installs), not only by ours;
//! and a run with nothing to judge says so.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

const SOURCE: &str = "/usr/src/linux-source-6.12.tar.xz";

/// A file name of its own for each caller (the tests run in parallel in one process).
fn scratch(name: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{n}-{name}", std::process::id()))
}

/// The kernel's kunit tool directory, extracted once per test binary into target/.
fn kunit_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(extract_kunit)
}

fn extract_kunit() -> PathBuf {
    let dir = scratch("kunit");
    let parser = dir.join("kunit_parser.py");
    {
        assert!(
            Path::new(SOURCE).exists(),
            "{SOURCE} is missing: the KTAP test parses with the kernel's own parser; run `cargo xtask setup` (it installs linux-source-6.12)"
        );
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("tar")
            .args(["-xJf", SOURCE, "-C"])
            .arg(&dir)
            .args([
                "--strip-components=4",
                "--wildcards",
                "*/tools/testing/kunit/kunit_parser.py",
                "*/tools/testing/kunit/kunit_printer.py",
            ])
            .status()
            .unwrap();
        assert!(status.success() && parser.exists(), "extracting kunit_parser.py from {SOURCE} failed");
    }
    dir
}

/// Parses `ktap` with the kernel's parser: (overall status, [(test, status, subtests)]).
fn kernel_parse(ktap: &str) -> (String, Vec<(String, String, usize)>) {
    let file = scratch("out.ktap");
    std::fs::write(&file, ktap).unwrap();
    let driver = "import sys, kunit_parser\n\
                  t = kunit_parser.parse_run_tests(open(sys.argv[1]).readlines())\n\
                  print('RESULT', t.status.name)\n\
                  for s in t.subtests: print('TEST', s.name, s.status.name, len(s.subtests))\n";
    let out = Command::new("python3").arg("-c").arg(driver).arg(&file).current_dir(kunit_dir()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let status = text.lines().find_map(|l| l.strip_prefix("RESULT ")).expect("a result line").to_owned();
    let tests = text
        .lines()
        .filter_map(|l| l.strip_prefix("TEST "))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[0].to_owned(), f[1].to_owned(), f[2].parse().unwrap())
        })
        .collect();
    (status, tests)
}

fn analyze(args: &[&str], file: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tracer")).arg("analyze").args(args).arg(file).output().unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

fn statuses(tests: &[(String, String, usize)]) -> Vec<(&str, &str, usize)> {
    tests.iter().map(|(n, s, k)| (n.as_str(), s.as_str(), *k)).collect()
}

#[test]
fn the_kernels_parser_reads_a_stock_run_as_failures_per_class() {
    // A real 7.2.13 guest trace of the stock kernel.
    let (code, ktap, _) = analyze(&["--format", "ktap"], &data("stock-7.2.13-memdev-acpi.jsonl"));
    assert_eq!(code, Some(1));
    let (status, tests) = kernel_parse(&ktap);
    assert_eq!(status, "FAILURE");
    assert_eq!(
        statuses(&tests),
        [
            ("unlocked-use", "FAILURE", 4),
            ("stale-use", "FAILURE", 2),
            ("unlocked-erase", "FAILURE", 1),
            ("use-after-free", "SUCCESS", 0),
            ("rule-mismatch", "SUCCESS", 0),
            ("lost-events", "SUCCESS", 0),
        ]
    );
    // Each finding's report rides along as diagnostic lines.
    assert!(ktap.contains("    # unlocked read of dport->rch (1 byte) at cxl_mem_probe+0x19a"));
}

#[test]
fn the_kernels_parser_reads_a_fixed_run_as_passing() {
    let (code, ktap, _) = analyze(&["--format", "ktap"], &data("deref-under-lock.jsonl"));
    assert_eq!(code, Some(0));
    let (status, tests) = kernel_parse(&ktap);
    assert_eq!(status, "SUCCESS");
    assert!(tests.iter().all(|(_, s, _)| s == "SUCCESS") && tests.len() == 6, "{tests:?}");
}

#[test]
fn lost_events_fail_their_test_only_under_strict() {
    // A trace cut off mid-record: bytes were lost.
    let text = std::fs::read_to_string(data("deref-under-lock.jsonl")).unwrap();
    let jsonl = scratch("cut.jsonl");
    std::fs::write(&jsonl, text).unwrap();
    let trace = jsonl.with_extension("trace");
    let out =
        Command::new(env!("CARGO_BIN_EXE_tracer")).arg("convert").arg(&jsonl).arg("-o").arg(&trace).output().unwrap();
    assert!(out.status.success());
    let bytes = std::fs::read(&trace).unwrap();
    std::fs::write(&trace, &bytes[..bytes.len() - 3]).unwrap();
    let (_, ktap, _) = analyze(&["--format", "ktap"], &trace);
    let (_, tests) = kernel_parse(&ktap);
    assert_eq!(tests.last().map(|t| (t.0.as_str(), t.1.as_str())), Some(("lost-events", "SUCCESS")));
    let (code, ktap, _) = analyze(&["--format", "ktap", "--strict"], &trace);
    assert_eq!(code, Some(2));
    let (status, tests) = kernel_parse(&ktap);
    assert_eq!(status, "FAILURE");
    assert_eq!(tests.last().map(|t| (t.0.as_str(), t.1.as_str())), Some(("lost-events", "FAILURE")));
}

#[test]
fn an_input_with_nothing_to_judge_warns_and_fails_under_strict() {
    let empty = scratch("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let (code, _, stderr) = analyze(&[], &empty);
    assert_eq!(code, Some(0));
    assert!(stderr.contains("no events at all") && stderr.contains(&*empty.to_string_lossy()), "{stderr}");
    let (code, _, stderr) = analyze(&["--strict"], &empty);
    assert_eq!(code, Some(2), "{stderr}");
    // Only lock events: nothing about a dport.
    let locks = scratch("locks.jsonl");
    std::fs::write(
        &locks,
        "{\"ts\":1,\"cpu\":0,\"tid\":7,\"comm\":\"sh\",\"kind\":\"lock\",\"lock\":\"0xffff888103a81090\"}\n\
         {\"ts\":2,\"cpu\":0,\"tid\":7,\"comm\":\"sh\",\"kind\":\"unlock\",\"lock\":\"0xffff888103a81090\"}\n",
    )
    .unwrap();
    let (code, _, stderr) = analyze(&[], &locks);
    assert_eq!(code, Some(0));
    assert!(stderr.contains("no event about a dport"), "{stderr}");
    assert_eq!(analyze(&["--strict"], &locks).0, Some(2));
    // A real trace is not silent.
    let (_, _, stderr) = analyze(&[], &data("deref-under-lock.jsonl"));
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn the_kernels_parser_reads_known_findings_as_skipped() {
    // The shipped 7.2 list knows the core's findings: their class passes, cxl_mem_probe's fail.
    let known = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../known/7.2.known");
    let (code, ktap, _) =
        analyze(&["--format", "ktap", "--known", known.to_str().unwrap()], &data("stock-7.2.13-memdev-acpi.jsonl"));
    assert_eq!(code, Some(1));
    let (status, tests) = kernel_parse(&ktap);
    assert_eq!(status, "FAILURE");
    assert_eq!(
        statuses(&tests),
        [
            ("unlocked-use", "FAILURE", 4),
            ("stale-use", "FAILURE", 2),
            ("unlocked-erase", "SUCCESS", 1),
            ("use-after-free", "SUCCESS", 0),
            ("rule-mismatch", "SUCCESS", 0),
            ("lost-events", "SUCCESS", 0),
        ]
    );
    let skipped = kernel_subtest_statuses(&ktap, "unlocked-use");
    assert_eq!(skipped, ["SKIPPED", "FAILURE", "SKIPPED", "FAILURE"]);
}

/// The statuses the kernel's parser gives the subtests of test `name`.
fn kernel_subtest_statuses(ktap: &str, name: &str) -> Vec<String> {
    let file = scratch("sub.ktap");
    std::fs::write(&file, ktap).unwrap();
    let driver = "import sys, kunit_parser\n\
                  t = kunit_parser.parse_run_tests(open(sys.argv[1]).readlines())\n\
                  for s in t.subtests:\n    if s.name == sys.argv[2]:\n        for x in s.subtests: print(x.status.name)\n";
    let out =
        Command::new("python3").arg("-c").arg(driver).arg(&file).arg(name).current_dir(kunit_dir()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The parser prints its own report on stdout too: the statuses are the bare words.
    let words = ["SUCCESS", "FAILURE", "SKIPPED", "TEST_CRASHED", "NO_TESTS", "FAILURE_TO_PARSE_TESTS"];
    String::from_utf8(out.stdout).unwrap().lines().filter(|l| words.contains(l)).map(str::to_owned).collect()
}
