//! A run's results directory on the host (docs/vm.md, "Results"): made, or cleared of an
//! earlier run's files, then filled from the guest's share, with `results.ktap` written
//! beside `findings.jsonl`.
use std::{
    fs,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;

use crate::util;

/// What a run leaves in its results directory (besides files a script writes).
const RESULT_FILES: &[&str] = &[
    "console.log",
    "dmesg.txt",
    "workload.log",
    "findings.jsonl",
    "results.ktap",
    "tracer.log",
    "trace.bin",
    "calls.txt",
    "calls-profile.txt",
];

/// `--out`, or `target/vm/<UTC time>`, made; a reused one loses the files of an earlier
/// run, which must not pass for this one's.
pub fn directory(out: Option<&Path>) -> anyhow::Result<PathBuf> {
    let out = match out {
        Some(out) => out.to_owned(),
        None => util::workspace_root().join("target/vm").join(utc_stamp()),
    };
    fs::create_dir_all(&out).with_context(|| format!("creating the results directory {}", out.display()))?;
    for stale in RESULT_FILES {
        let _ = fs::remove_file(out.join(stale));
    }
    Ok(out)
}

/// Copies what the guest wrote to the share (`/share/out`) into the results directory.
pub fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    let Ok(entries) = fs::read_dir(from) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            fs::create_dir_all(&target)?;
            copy(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {} to {}", entry.path().display(), target.display()))?;
        }
    }
    Ok(())
}

/// `results.ktap` next to `findings.jsonl`, for CI systems that read KTAP: the recorded trace
/// analyzed by the same (static) tracer build on the host. A run without a trace has none;
/// a failure to write it is said, not fatal (findings.jsonl is the run's verdict).
pub fn write_ktap(tracer: &Path, out: &Path, known: Option<&Path>) {
    let trace = out.join("trace.bin");
    if !trace.exists() {
        return;
    }
    let mut analyze = std::process::Command::new(tracer);
    analyze.args(["analyze", "--format", "ktap", "--strict"]);
    if let Some(known) = known {
        analyze.arg("--known").arg(known);
    }
    match analyze.arg(&trace).output() {
        Ok(result) if matches!(result.status.code(), Some(0..=2)) && !result.stdout.is_empty() => {
            if let Err(err) = fs::write(out.join("results.ktap"), &result.stdout) {
                println!("vm: warning: writing results.ktap: {err}");
            }
        }
        Ok(result) => println!(
            "vm: warning: no results.ktap: tracer analyze --format ktap exited {}: {}",
            result.status,
            String::from_utf8_lossy(&result.stderr).trim()
        ),
        Err(err) => println!("vm: warning: no results.ktap: cannot run {}: {err}", tracer.display()),
    }
}

/// `20261123-210501` in UTC, for result directory names.
pub fn utc_stamp() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian), by 400-year eras.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamp_has_the_shape_of_a_date() {
        let s = utc_stamp();
        assert_eq!(s.len(), 15);
        assert!(s.starts_with("20"));
        assert_eq!(&s[8..9], "-");
    }
}
