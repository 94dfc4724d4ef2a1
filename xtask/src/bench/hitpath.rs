//! What the kernel side's diagnostics cost a probe hit that fails nothing: the eBPF object is
//! built with and without tracer-ebpf's `diagnostics` feature (aya-log), every kind of hit
//! (`hits.rs`) runs in both (`bpfvm.rs`), and the instructions each executes are compared.
//! The diagnostics are functions of their own called only on failure branches (tracer-ebpf's
//! `diag.rs`): a hit enters none of them, and what the logging adds is their size, listed
//! with every function's.
use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context as _, ensure};

use super::{bpfvm, hits};
use crate::util;

/// The eBPF object built with or without the `diagnostics` feature, as build.rs builds it.
fn build(diagnostics: bool, target_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--package", "tracer-ebpf", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .current_dir(util::workspace_root());
    if !diagnostics {
        cmd.arg("--no-default-features");
    }
    util::run(&mut cmd).context("building tracer-ebpf (cargo xtask setup installs what it needs)")?;
    let path = target_dir.join("bpfel-unknown-none/release/tracer");
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

/// The diagnostics' functions (`tracer::diag::*`, `tracer_diag_*`).
fn is_diagnostic(name: &str) -> bool {
    name.contains(DIAG)
}

pub const DIAG: &str = "diag";

/// Builds both objects, runs every probe hit of `hits::HITS` in each and lists every
/// function's size; the results, one line per hit and per function.
pub fn measure(out: &Path) -> anyhow::Result<String> {
    let target = util::workspace_root().join("target/bench-ebpf");
    let (with, without) = (build(true, &target.join("with"))?, build(false, &target.join("without"))?);
    let mut report = String::new();
    let (vm_with, vm_without) = (bpfvm::Program::parse(&with)?, bpfvm::Program::parse(&without)?);
    for case in hits::HITS {
        let a = case.run(&vm_with)?;
        let b = case.run(&vm_without)?;
        ensure!(
            a.submitted == case.submits && b.submitted == case.submits,
            "hit path case {:?} submitted {} and {} records, {} expected: the mock no longer matches the kernel side",
            case.name,
            a.submitted,
            b.submitted,
            case.submits
        );
        writeln!(
            report,
            "hitpath case={} program={} insns={} insns_without={} submitted={} diag_entered={}",
            case.name.replace(' ', "_"),
            case.entry,
            a.executed,
            b.executed,
            a.submitted,
            a.entered.len()
        )?;
    }
    let without = vm_without.functions();
    for (name, (len, calls)) in vm_with.functions() {
        let before = without.get(&name).map_or(0, |(len, _)| *len);
        let diag_calls = calls.iter().filter(|c| is_diagnostic(c)).count();
        writeln!(report, "size function={name} insns={len} insns_without={before} diag_calls={diag_calls}")?;
    }
    std::fs::write(out.join(RESULTS), &report)?;
    Ok(report)
}

pub const RESULTS: &str = "hitpath-results.txt";

/// The results as tables: what each probe hit executes with and without the diagnostics,
/// then the object's functions and the subprograms that hold the logging.
pub fn render(results: &str) -> String {
    let mut out = String::from(
        "## The kernel side's diagnostics on the hit path\n\nInstructions each probe hit executes (the eBPF programs run on the host against a mock kernel, `bench/bpfvm.rs`):\n\n| hit | program | insns | without diagnostics | extra | diagnostics entered |\n|---|---|---|---|---|---|\n",
    );
    let mut sizes = String::new();
    for line in results.lines().filter_map(super::Line::parse).filter(|l| matches!(l.kind.as_str(), "hitpath" | "size"))
    {
        let field = |key| line.get(key).unwrap_or("?");
        let extra = match (line.num("insns"), line.num("insns_without")) {
            (Some(with), Some(without)) => format!("{:+}", with - without),
            _ => "?".to_owned(),
        };
        if let Some(case) = line.get("case") {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {extra} | {} |",
                case.replace('_', " "),
                field("program"),
                field("insns"),
                field("insns_without"),
                field("diag_entered")
            );
        } else if let Some(name) = line.get("function") {
            let _ = writeln!(
                sizes,
                "| {name} | {} | {} | {extra} | {} |",
                field("insns"),
                field("insns_without"),
                field("diag_calls")
            );
        }
    }
    out.push_str(
        "\nSizes: every function of the object; the diagnostics' own (`diag`) are called only on failure branches:\n\n",
    );
    out.push_str("| function | insns | without diagnostics | difference | diagnostic calls |\n|---|---|---|---|---|\n");
    out.push_str(&sizes);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_what_a_hit_runs_more_and_what_it_entered() {
        let results = "hitpath case=use_of_a_tracked_dport program=site insns=174 insns_without=175 submitted=1 diag_entered=0\n\
                       size function=tracer_diag_map_full insns=3971 insns_without=19 diag_calls=0\n";
        let table = render(results);
        assert!(table.contains("| use of a tracked dport | site | 174 | 175 | -1 | 0 |"), "{table}");
        assert!(table.contains("| tracer_diag_map_full | 3971 | 19 | +3952 | 0 |"), "{table}");
    }
}
