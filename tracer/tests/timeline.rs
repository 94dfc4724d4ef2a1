//! `tracer timeline` pages checked in a real headless Chromium (Debian's `chromium`, which
//! `cargo xtask setup` installs): the page loads with no script error, draws the marks the
//! trace has, and a screenshot is left under target/ for a person to look at.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn out(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("timeline");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

const CHROMIUM: &str = "/usr/bin/chromium";

/// Headless Chromium as this machine allows it (root: no sandbox; no network: none of the
/// background connections), with a profile of its own.
fn chromium(profile: &Path) -> Command {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run `cargo xtask setup` (it installs Debian's chromium)"
    );
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
    ]);
    cmd.arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

fn timeline(input: &Path, page: &Path, extra: &[&str]) {
    let status = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .arg("timeline")
        .arg(input)
        .arg("-o")
        .arg(page)
        .args(extra)
        .status()
        .unwrap();
    assert!(status.success());
}

/// The page's DOM after its scripts ran, and Chromium's log.
fn render(page: &Path, name: &str) -> (String, String) {
    let url = format!("file://{}", page.display());
    let dom = chromium(&out(&format!("{name}-profile-dom"))).args(["--dump-dom", &url]).output().unwrap();
    assert!(dom.status.success(), "{}", String::from_utf8_lossy(&dom.stderr));
    let screenshot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target").join(format!("timeline-{name}.png"));
    let shot = chromium(&out(&format!("{name}-profile-shot")))
        .arg("--window-size=1400,900")
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(&url)
        .output()
        .unwrap();
    assert!(shot.status.success() && screenshot.exists(), "{}", String::from_utf8_lossy(&shot.stderr));
    let log = format!("{}{}", String::from_utf8_lossy(&dom.stderr), String::from_utf8_lossy(&shot.stderr));
    (String::from_utf8(dom.stdout).unwrap(), log)
}

fn count(dom: &str, needle: &str) -> usize {
    dom.matches(needle).count()
}

fn assert_clean(dom: &str, log: &str) {
    assert!(dom.contains(r#"data-rendered="yes""#), "the page's script did not finish");
    assert!(dom.contains(r#"<span id="errors">0</span>"#), "script errors in the page");
    assert!(!log.contains("Uncaught") && !log.contains(":CONSOLE"), "console output: {log}");
}

#[test]
fn one_finding_of_a_real_7_2_trace_renders_its_story() {
    // The stale pointer of a real 7.2.13 stock memdev probe: finding 3 of the report.
    let page = out("stale.html");
    timeline(&data("stock-7.2.13-memdev-acpi.jsonl"), &page, &["--finding", "3"]);
    let (dom, log) = render(&page, "7.2-stale-use");
    assert_clean(&dom, &log);
    assert!(dom.contains("stale-use in devm_cxl_add_endpoint"));
    // The lockless load, the lock held, the use that is the finding, the reads below it.
    assert!(count(&dom, r#"class="mark load""#) >= 1, "{dom}");
    assert!(count(&dom, r#"class="span"#) >= 1);
    assert!(count(&dom, r#"class="mark use finding""#) >= 1);
    assert!(count(&dom, r#"class="mark deref"#) >= 1);
}

#[test]
fn a_whole_trace_renders_every_thread_and_finding() {
    let page = out("all.html");
    timeline(&data("concurrent-free-before-use.jsonl"), &page, &[]);
    let (dom, log) = render(&page, "use-after-free");
    assert_clean(&dom, &log);
    // modprobe registering the dports, a reader, and the thread that erased and freed the
    // dport under it: three lanes.
    assert_eq!(count(&dom, r#"class="lane-label""#), 3, "{dom}");
    assert!(count(&dom, r#"class="mark free""#) == 1 && count(&dom, r#"class="mark erase""#) == 1);
    assert!(dom.contains("use-after-free in cxl_dport_init_ras_reporting"));
    assert_eq!(count(&dom, r#"data-finding="0""#), 1);
}

#[test]
fn the_chrome_trace_is_trace_event_format() {
    let file = out("trace.json");
    let status = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .arg("timeline")
        .arg(data("concurrent-free-before-use.jsonl"))
        .args(["--format", "chrome-trace", "-o"])
        .arg(&file)
        .status()
        .unwrap();
    assert!(status.success());
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    // Every event has the fields the format requires for its phase.
    for e in events {
        let ph = e["ph"].as_str().unwrap();
        assert!(["M", "X", "i"].contains(&ph));
        assert!(e["pid"].is_u64() && e["tid"].is_u64());
        if ph != "M" {
            assert!(e["ts"].is_f64() || e["ts"].is_u64());
        }
        if ph == "X" {
            assert!(e["dur"].is_f64() || e["dur"].is_u64());
        }
    }
    assert!(events.iter().any(|e| e["cat"] == "finding"));
}
