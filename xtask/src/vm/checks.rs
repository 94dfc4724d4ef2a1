//! What the guest-suite cases share (selftest.rs, traced.rs, reliability.rs): their run
//! options, runs that must pass or complete, their guest scripts, and checks of what a run
//! printed and copied back. The case modules import this, never each other.
use std::{fs, path::Path};

use anyhow::{Context as _, bail, ensure};

use super::{Failure, Run, RunOptions, Topology, Workload, run::execute};

/// A quiet run without the tracer, its results in `out`.
pub fn untraced(topology: Topology, out: &Path) -> RunOptions {
    let mut o = RunOptions::new(topology);
    o.no_tracer = true;
    o.quiet = true;
    o.out = Some(out.to_owned());
    o
}

/// A run that must pass: prints its summary and fails with the run's own failure otherwise.
pub fn passing(options: &RunOptions) -> anyhow::Result<Run> {
    let run = execute(options)?;
    run.print_summary();
    if let Some(failure) = &run.failure {
        bail!("{failure}");
    }
    Ok(run)
}

/// A traced run that completed: the guest passed and the tracer reported (exit 0 or 1).
pub fn completed(options: &RunOptions) -> anyhow::Result<Run> {
    let run = execute(options)?;
    run.print_summary();
    match &run.failure {
        None | Some(Failure::Findings { .. }) => {}
        Some(failure) => bail!("{failure}"),
    }
    ensure!(run.tracer_exit.is_some(), "the guest did not report the tracer's exit status");
    Ok(run)
}

/// Writes a case's guest script (from `xtask/guest/suite/`) next to `out` as `OUT.sh` and
/// returns it as a run's script argument: the guest runs it as `/vm/script`.
pub fn script(out: &Path, text: &str) -> anyhow::Result<Vec<String>> {
    fs::create_dir_all(out)?;
    let path = out.with_extension("sh");
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(vec![path.to_string_lossy().into_owned()])
}

/// Every workload ran `cycles` cycles, each reported by the guest.
pub fn check_cycled(run: &Run, workloads: &[Workload], cycles: u32) -> anyhow::Result<()> {
    for w in workloads {
        let timing = run
            .workloads
            .iter()
            .find(|t| t.name == w.name())
            .with_context(|| format!("workload {} reported no result line", w.name()))?;
        ensure!(timing.cycles == cycles, "workload {} ran {} cycles, not {cycles}", w.name(), timing.cycles);
        if !w.is_race() {
            let prefix = format!("tracer-vm: cycle {} ", w.name());
            let seen = run.console.iter().filter(|l| l.starts_with(&prefix)).count();
            ensure!(seen == cycles as usize, "workload {} printed {seen} cycle lines, not {cycles}", w.name());
        }
    }
    Ok(())
}

/// Each of `files` came back from the guest into `out`, not empty.
pub fn check_copied(out: &Path, files: &[&str]) -> anyhow::Result<()> {
    for f in files {
        let path = out.join(f);
        let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        ensure!(len > 0, "{} was not copied back from the guest (missing or empty)", path.display());
    }
    Ok(())
}

/// The guest's `tracer-vm: topology ready ...` line.
pub fn ready_line(run: &Run) -> anyhow::Result<&str> {
    run.console
        .iter()
        .find(|l| l.starts_with("tracer-vm: topology ready "))
        .map(String::as_str)
        .context("the guest never reported its CXL topology ready")
}
