//! After a boot: the run's verdict and figures, from the console, the saved dmesg and the
//! tracer's exit status. A run passes only when the guest printed its result line (with the
//! run's nonce) with exit 0 and no kernel failure was seen.
use std::{fs, path::Path, time::Duration};

use super::{Crash, Failure, Run, WorkloadTiming, boot::Booted, prepare::Prepared, qemu};

pub fn judge(prepared: Prepared, booted: Booted) -> Run {
    let Booted { session, out, accel, accel_reason, timeout } = booted;
    let failure = verdict(&session, timeout, &out);
    let tracer_exit = last_value(&session.lines, "tracer-vm: tracer exit=");
    let failure = failure.or_else(|| {
        (tracer_exit == Some(1)).then(|| Failure::Findings { count: count_findings(&out.join("findings.jsonl")) })
    });
    Run {
        out,
        release: prepared.kernel.release,
        accel,
        accel_reason,
        to_init: session.mark("tracer-vm: init started"),
        to_ready: session.mark("tracer-vm: topology ready"),
        elapsed: session.elapsed,
        workloads: workload_timings(&session.lines),
        tracer_exit,
        failure,
        console: session.lines,
    }
}

/// The verdict on a finished boot, in order of what explains it best.
fn verdict(session: &qemu::Session, timeout: u64, out: &Path) -> Option<Failure> {
    if let Some((crash, at)) = session.crash {
        return Some(Failure::Crash { crash, line: session.lines[at].clone(), excerpt: session.excerpt(at) });
    }
    // Failures that stay off the console under `quiet` (warnings) are in the saved dmesg.
    if let Ok(dmesg) = fs::read_to_string(out.join("dmesg.txt")) {
        let lines: Vec<&str> = dmesg.lines().collect();
        if let Some((at, crash)) = lines.iter().enumerate().find_map(|(i, l)| Crash::detect(l).map(|c| (i, c))) {
            let excerpt = lines[at.saturating_sub(8)..(at + 45).min(lines.len())].join("\n");
            return Some(Failure::Crash { crash, line: lines[at].to_owned(), excerpt });
        }
    }
    if session.timed_out {
        return Some(Failure::Timeout { secs: timeout, tail: session.tail(30) });
    }
    match session.result {
        None => Some(Failure::NoResult {
            status: session.status.map_or("status unknown".to_owned(), |s| s.to_string()),
            tail: session.tail(30),
        }),
        Some(0) => None,
        Some(exit) => Some(Failure::Guest {
            exit,
            reason: session.lines.iter().find_map(|l| {
                l.strip_prefix("tracer-vm: error: ").or_else(|| l.strip_prefix("tracer-vm: FAIL: ")).map(str::to_owned)
            }),
            tail: session.tail(30),
        }),
    }
}

/// The finding groups that failed the run: those `--known` did not list (a known one carries
/// `"known": REASON`).
fn count_findings(path: &Path) -> usize {
    fs::read_to_string(path)
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with('{') && !l.starts_with("{\"summary\""))
                .filter(|l| serde_json::from_str::<serde_json::Value>(l).map_or(true, |v| v.get("known").is_none()))
                .count()
        })
        .unwrap_or(0)
}

/// The value after the last line starting with `prefix`.
fn last_value(lines: &[String], prefix: &str) -> Option<i32> {
    lines.iter().rev().find_map(|l| l.strip_prefix(prefix)).and_then(|v| v.trim().parse().ok())
}

/// Parses `tracer-vm: workload NAME passed cycles=N total_ms=T per_cycle_ms=P` lines.
fn workload_timings(lines: &[String]) -> Vec<WorkloadTiming> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("tracer-vm: workload "))
        .filter_map(|rest| {
            let (name, rest) = rest.split_once(" passed ")?;
            let field = |key: &str| {
                rest.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
            };
            Some(WorkloadTiming {
                name: name.to_owned(),
                cycles: u32::try_from(field("cycles")?).ok()?,
                per_cycle: Duration::from_millis(field("per_cycle_ms")?),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_findings_do_not_count_as_the_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("findings.jsonl");
        fs::write(
            &path,
            "{\"class\":\"unlocked-use\",\"title\":\"unlocked-use in cxl_add_ep\",\"known\":\"core\"}\n\
             {\"class\":\"stale-use\",\"title\":\"stale-use in devm_cxl_add_endpoint\"}\n\
             {\"summary\":{\"findings\":2}}\n",
        )
        .unwrap();
        assert_eq!(count_findings(&path), 1);
    }

    #[test]
    fn parses_workload_timings() {
        let lines = vec![
            "tracer-vm: cycle memdev-bind 1/2 ms=400".to_owned(),
            "tracer-vm: workload memdev-bind passed cycles=2 total_ms=900 per_cycle_ms=450".to_owned(),
        ];
        let t = workload_timings(&lines);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].name, "memdev-bind");
        assert_eq!(t[0].cycles, 2);
        assert_eq!(t[0].per_cycle, Duration::from_millis(450));
    }
}
