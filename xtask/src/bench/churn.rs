//! Memory of the engine over a long churn of dports: a synthetic hotplug-shaped event
//! stream (JSON lines, the documented interchange) piped into `tracer analyze`, with the
//! analyzer's resident memory sampled as the stream goes.
//!
//! Every dport gets its own address (the worst case for the engine's state: nothing is
//! reused, so the tables of live and freed dports are filled to their caps), a port and
//! xarray shared by a few at a time, is registered, inserted, looked up and used by several
//! reader threads (under the free lock, one read in sixteen without it: the stock
//! `cxl_mem_probe` pattern), erased and freed.
use std::{
    fs,
    io::{BufWriter, Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

/// Dports alive at once (each port holds one).
const LIVE: u64 = 64;
const READS_PER_DPORT: u64 = 4;
const UNLOCKED_EVERY: u64 = 16;
const READERS: u64 = 8;
/// RSS samples over the stream.
const SAMPLES: u64 = 20;

const LOAD_STACK: &str = r#"["match_port_by_dport+0x47/0x80","bus_find_device+0x8b/0xd0","find_cxl_port+0x3c/0x60","cxl_mem_find_port+0x2f/0x50","cxl_mem_probe+0xe6/0x3f0 [cxl_mem]","cxl_bus_probe+0x1b/0x60","really_probe+0xd9/0x380"]"#;
const USE_STACK: &str = r#"["devm_cxl_add_port+0x0/0x5a0","cxl_mem_probe+0x1f4/0x3f0 [cxl_mem]","cxl_bus_probe+0x1b/0x60","really_probe+0xd9/0x380"]"#;
const ERASE_STACK: &str = r#"["cxl_dport_remove+0x2d/0x60","devm_action_release+0x15/0x30","release_nodes+0x3e/0xb0","devres_release_all+0x93/0xd0"]"#;
const FREE_STACK: &str = r#"["kfree+0x2a9/0x380","release_nodes+0x5c/0xb0","devres_release_all+0x93/0xd0","device_unbind_cleanup+0xe/0x80"]"#;

/// Writes the events of dport `i` (one registration, reads, erase and free).
fn dport_events(i: u64, ts: &mut u64, out: &mut impl std::io::Write) -> std::io::Result<u64> {
    let slot = i % LIVE;
    let port = 0xffff_8881_0300_0000u64 + slot * 0x1000;
    let lock = port + 0x90;
    let xa = port + 0x318;
    let dport = 0xffff_8882_0000_0000u64 + i * 0x100;
    let index = 0xffff_8881_0100_0000u64 + slot * 0x1000;
    let mut n = 0;
    let mut ev = |tid: u64, comm: &str, body: String| -> std::io::Result<()> {
        *ts += 1000;
        n += 1;
        writeln!(out, r#"{{"ts":{},"cpu":{},"tid":{tid},"comm":"{comm}","kind":{body}}}"#, *ts, tid % 2)
    };
    ev(
        1,
        "sh",
        format!(
            r#""dport_add","dport":"{dport:#x}","port":"{port:#x}","xa":"{xa:#x}","port_lock":"{lock:#x}","free_lock":"{lock:#x}","root":false"#
        ),
    )?;
    ev(1, "sh", format!(r#""lock","lock":"{lock:#x}""#))?;
    ev(
        1,
        "sh",
        format!(r#""xa_insert","xa":"{xa:#x}","index":"{index:#x}","entry":"{dport:#x}","port_lock_held":true"#),
    )?;
    ev(1, "sh", format!(r#""unlock","lock":"{lock:#x}""#))?;
    for r in 0..READS_PER_DPORT {
        let tid = 100 + (i + r) % READERS;
        let comm = format!("kworker/u8:{}", tid - 100);
        let held = !(i * READS_PER_DPORT + r).is_multiple_of(UNLOCKED_EVERY);
        if held {
            ev(tid, &comm, format!(r#""lock","lock":"{lock:#x}""#))?;
        }
        ev(
            tid,
            &comm,
            format!(
                r#""xa_load","xa":"{xa:#x}","index":"{index:#x}","ret":"{dport:#x}","stack":{LOAD_STACK},"free_lock_held":{held}"#
            ),
        )?;
        ev(
            tid,
            &comm,
            format!(
                r#""use","dport":"{dport:#x}","site":"devm_cxl_add_port","stack":{USE_STACK},"free_lock_held":{held}"#
            ),
        )?;
        if held {
            ev(tid, &comm, format!(r#""unlock","lock":"{lock:#x}""#))?;
        }
    }
    ev(1, "sh", format!(r#""lock","lock":"{lock:#x}""#))?;
    ev(
        1,
        "sh",
        format!(
            r#""xa_erase","xa":"{xa:#x}","index":"{index:#x}","ret":"{dport:#x}","stack":{ERASE_STACK},"port_lock_held":true"#
        ),
    )?;
    ev(1, "sh", format!(r#""free","dport":"{dport:#x}","stack":{FREE_STACK},"free_lock_held":true"#))?;
    ev(1, "sh", format!(r#""unlock","lock":"{lock:#x}""#))?;
    Ok(n)
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Feeds the churn to `tracer analyze` and returns its figures as result lines:
/// `churn dports= events= hwm_kb= secs= ...` and `sample dports= rss_kb=` per sample.
pub fn measure(tracer: &Path, dports: u64, out: &Path) -> anyhow::Result<String> {
    ensure!(dports >= SAMPLES, "--churn-dports must be at least {SAMPLES}");
    let started = Instant::now();
    let mut child = Command::new(tracer)
        .args(["analyze", "--format", "json", "/dev/stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", tracer.display()))?;
    let pid = child.id();
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let mut input = BufWriter::with_capacity(1 << 16, child.stdin.take().expect("piped"));
    let mut ts = 1_000_000_000u64;
    let mut events = 0;
    let mut samples = Vec::new();
    let step = dports / SAMPLES;
    for i in 0..dports {
        events += dport_events(i, &mut ts, &mut input).context("feeding tracer analyze")?;
        if (i + 1) % step == 0 {
            // The analyzer is at most a pipe buffer behind what was written.
            input.flush()?;
            if let Some(rss) = status_kb(pid, "VmRSS:") {
                samples.push((i + 1, rss));
            }
        }
    }
    input.flush()?;
    // Its memory after the whole stream, before it reports and exits.
    std::thread::sleep(Duration::from_millis(300));
    let hwm_kb = status_kb(pid, "VmHWM:").unwrap_or(0);
    drop(input);
    let mut stderr = String::new();
    child.stderr.take().expect("piped").read_to_string(&mut stderr)?;
    let status = child.wait()?;
    let report = reader.join().expect("reader thread");
    ensure!(matches!(status.code(), Some(0 | 1)), "tracer analyze failed on the churn ({status}): {stderr}");
    let path: PathBuf = out.join("churn-findings.jsonl");
    fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    let summary = crate::vm::findings::Report::parse(&report)?.summary;
    let evicted: u64 = summary
        .get("evicted")
        .and_then(|e| e.as_object())
        .map_or(0, |e| e.values().filter_map(serde_json::Value::as_u64).sum());
    let mut text = format!(
        "churn dports={dports} events={events} hwm_kb={hwm_kb} secs={:.1} received={} evicted={evicted}\n",
        started.elapsed().as_secs_f64(),
        summary.get("events").and_then(serde_json::Value::as_u64).unwrap_or(0),
    );
    for (d, rss) in samples {
        text.push_str(&format!("sample dports={d} rss_kb={rss}\n"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_dport_is_a_whole_lifetime_of_valid_json_events() {
        let mut buf = Vec::new();
        let mut ts = 0;
        let n = dport_events(3, &mut ts, &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text.lines().count() as u64, n);
        let kinds: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(kinds.first().map(String::as_str), Some("dport_add"));
        assert_eq!(kinds.iter().rev().nth(1).map(String::as_str), Some("free"));
        assert_eq!(kinds.iter().filter(|k| *k == "use").count() as u64, READS_PER_DPORT);
    }
}
