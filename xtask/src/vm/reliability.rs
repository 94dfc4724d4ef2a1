//! Guest suite cases for the tracer's own reliability: `doctor` on the guest
//! kernel, a clean detach after SIGINT, SIGTERM, SIGKILL and a crashing traced command,
//! and bad environments (no CXL modules, `--wait-for-cxl`, no BTF, a full disk under
//! `--record`).
//!
//! These boots use `--manual-tracer`: the tracer is in the guest but the script runs it,
//! because `doctor` refuses to run while another instance is attached and the signal tests
//! need the tracer in the background. The scripts (`xtask/guest/suite/lifecycle.sh`,
//! `environment.sh`) write `NAME exit=N` lines to `lifecycle.txt` / `environment.txt`, and
//! keep every output, for the host to judge.
use std::{collections::HashMap, fs, path::Path};

use anyhow::{Context as _, bail, ensure};

use super::{
    KernelArg, RunOptions, Topology,
    checks::{passing, script},
    findings::{self, Report},
};
use crate::debian::StockKernel;

/// Runs `tracer` in the ways users stop it, checking what it leaves behind each time.
const LIFECYCLE: &str = include_str!("../../guest/suite/lifecycle.sh");

/// Bad environments: booted without the CXL modules.
const ENVIRONMENT: &str = include_str!("../../guest/suite/environment.sh");

/// `NAME key=value` lines the guest scripts write.
fn results(out: &Path, file: &str) -> anyhow::Result<HashMap<String, String>> {
    let path = out.join(file);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(' ')?;
            let (key, value) = rest.split_once('=')?;
            let value = value.split_whitespace().next().unwrap_or_default();
            Some((format!("{name} {key}"), value.to_owned()))
        })
        .collect())
}

fn expect(r: &HashMap<String, String>, key: &str, want: &str, hint: &str) -> anyhow::Result<()> {
    let got = r.get(key).map(String::as_str);
    ensure!(
        got == Some(want),
        "{key}: got {}, expected {want} ({hint})",
        got.unwrap_or("nothing (the guest script did not get there)")
    );
    Ok(())
}

fn read(out: &Path, file: &str) -> anyhow::Result<String> {
    let path = out.join(file);
    fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// `doctor` is ready; each way of stopping `run` leaves no BPF object behind, and no kprobe
/// event except, after SIGKILL, the dead instance's (reported as gone and removed by the
/// next start); `leftovers` sees a running instance's objects (so its "nothing" means
/// something).
pub fn lifecycle(out: &Path, tracer: &Path, kernel: &'static StockKernel) -> anyhow::Result<()> {
    let mut o = RunOptions::new(Topology::Rp);
    o.kernel = Some(KernelArg::Stock(kernel));
    o.tracer_binary = Some(tracer.to_owned());
    o.manual_tracer = true;
    o.quiet = true;
    o.out = Some(out.to_owned());
    o.script = script(out, LIFECYCLE)?;
    o.timeout = Some(900);
    passing(&o)?;
    let r = results(out, "lifecycle.txt")?;

    expect(&r, "doctor exit", "0", "tracer doctor must find the guest ready: see doctor.txt")?;
    let doctor = read(out, "doctor.txt")?;
    ensure!(doctor.contains("verdict: ready"), "doctor.txt has no `verdict: ready`:\n{doctor}");
    ensure!(
        doctor.contains("attach check:") && !doctor.contains("attach check: FAILED"),
        "doctor did not attach everything as a check:\n{doctor}"
    );
    println!("test: guest:   doctor: {}", doctor.lines().find(|l| l.starts_with("attach check:")).unwrap_or_default());
    expect(&r, "leftovers-before exit", "0", "nothing is left before any tracer ran")?;

    for sig in ["INT", "TERM", "KILL"] {
        expect(&r, &format!("run-{sig} attached"), "yes", "see run-SIG.log")?;
        // While it runs, leftovers lists its programs, maps and kprobe events: the checks
        // after it stopped can fail.
        expect(&r, &format!("leftovers-during-{sig} exit"), "2", "a running tracer's objects must be listed")?;
        let during = read(out, &format!("leftovers-during-{sig}.txt"))?;
        for what in ["bpf program", "bpf map", "kprobe event", "running"] {
            ensure!(during.contains(what), "tracer leftovers did not list the running tracer's {what}s:\n{during}");
        }
        let after = read(out, &format!("leftovers-after-{sig}.txt"))?;
        ensure!(
            !after.contains("bpf program") && !after.contains("bpf map"),
            "BPF objects left in the kernel after SIG{sig}:\n{after}"
        );
        if sig == "KILL" {
            expect(&r, "run-KILL exit", "137", "killed by SIGKILL")?;
            let kprobes: Vec<&str> = after.lines().filter(|l| l.starts_with("kprobe event")).collect();
            ensure!(
                !kprobes.is_empty() && kprobes.iter().all(|l| l.contains("gone")),
                "after SIGKILL, the dead instance's kprobe events should be listed as gone:\n{after}"
            );
            println!(
                "test: guest:   SIGKILL: no BPF object left; {} kprobe events of the dead instance listed as gone",
                kprobes.len()
            );
        } else {
            expect(&r, &format!("run-{sig} exit"), "0", "a clean stop with no findings")?;
            expect(&r, &format!("child-{sig} alive"), "no", "the tracer stops its traced command")?;
            expect(&r, &format!("leftovers-after-{sig} exit"), "0", "nothing left after a clean stop")?;
            let log = read(out, &format!("run-{sig}.log"))?;
            ensure!(log.contains("traced for"), "run-{sig}.log does not show the tracer finishing its report:\n{log}");
            println!("test: guest:   SIG{sig}: exit 0, traced command stopped, nothing left");
        }
    }
    expect(&r, "run-crash exit", "0", "a traced command that crashes is no tracer error")?;
    let crash = read(out, "run-crash.log")?;
    ensure!(crash.contains("SIGSEGV"), "run-crash.log does not report the command's SIGSEGV:\n{crash}");
    expect(
        &r,
        "leftovers-after-crash exit",
        "0",
        "the crashed command's tracer detached, and its start removed the killed instance's kprobe events",
    )?;
    println!(
        "test: guest:   crashing command: exit 0, SIGSEGV reported; the dead instance's kprobe events removed; nothing left"
    );
    diagnostics(out, &r)
}

/// The ring buffer filled while the tracer was stopped: `-v` tells each lost event as a
/// kernel diagnostic, and the summary counts as many.
fn diagnostics(out: &Path, r: &HashMap<String, String>) -> anyhow::Result<()> {
    let exit = r.get("run-diag exit").map(String::as_str);
    ensure!(matches!(exit, Some("0" | "1")), "run-diag exit: got {exit:?}, expected 0 or 1 (see run-diag.log)");
    let log = read(out, "run-diag.log")?;
    let told = log.lines().filter(|l| l.starts_with("tracer: kernel: warn: ring buffer full")).count();
    let counted = Report::read(&out.join("run-diag.jsonl"))?.summary_u64(&["kernel_counters", "ring_buffer_full"])?;
    ensure!(
        counted > 0 && told > 0,
        "a 4 KiB ring buffer filled while the tracer was stopped should lose events, counted and told: \
         {counted} counted (ring_buffer_full), {told} told by -v:\n{log}"
    );
    // The log's own ring buffer (128 KiB) can lose lines too, never more than were counted.
    ensure!(told as u64 <= counted, "{told} ring-full diagnostics told for {counted} events counted:\n{log}");
    println!("test: guest:   -v: {counted} events lost to a full 4 KiB ring buffer, {told} told as kernel diagnostics");
    Ok(())
}

/// No CXL modules: `run` and `doctor` fail naming them; `--wait-for-cxl` waits, then
/// traces; no BTF fails naming it; a `--use-site` the kernel lacks or refuses to probe fails
/// naming it and what it costs; a full disk under `--record` fails clearly and leaves a
/// trace that reads up to its last complete record.
pub fn environment(out: &Path, tracer: &Path, kernel: &'static StockKernel) -> anyhow::Result<()> {
    let mut o = RunOptions::new(Topology::Rp);
    o.kernel = Some(KernelArg::Stock(kernel));
    o.tracer_binary = Some(tracer.to_owned());
    o.manual_tracer = true;
    o.no_cxl_at_boot = true;
    o.quiet = true;
    o.out = Some(out.to_owned());
    o.script = script(out, ENVIRONMENT)?;
    o.timeout = Some(600);
    passing(&o)?;
    let r = results(out, "environment.txt")?;
    // What the tracer waits for: the root and the memdev driver (cxl_pci is optional: cxl_test's
    // memdevs come without it).
    let modules = ["cxl_acpi", "cxl_mem"];

    expect(&r, "no-cxl exit", "2", "tracer run without the CXL modules")?;
    let log = read(out, "no-cxl.log")?;
    ensure!(
        modules.iter().all(|m| log.contains(m)) && log.contains("--wait-for-cxl"),
        "the error without CXL modules must name them and --wait-for-cxl:\n{log}"
    );
    println!("test: guest:   no CXL modules: exit 2: {}", log.trim());
    expect(&r, "no-cxl-doctor exit", "2", "doctor without the CXL modules")?;
    let doctor = read(out, "no-cxl-doctor.txt")?;
    ensure!(
        modules.iter().all(|m| doctor.contains(&format!("modprobe {m}")) || doctor.contains(m)),
        "doctor must say which modules to load:\n{doctor}"
    );
    expect(&r, "no-btf exit", "2", "tracer run --btf-dir on an empty directory")?;
    let log = read(out, "no-btf.log")?;
    ensure!(log.contains("BTF"), "the error without BTF must say so:\n{log}");

    expect(&r, "wait announced", "yes", "--wait-for-cxl says it is waiting")?;
    expect(&r, "wait still-waiting", "yes", "tracer run --wait-for-cxl must not exit before the modules are loaded")?;
    expect(&r, "wait exit", "1", "it traced the memdev-bind cycles after the modules came: findings")?;
    let wait = Report::read(&out.join("wait.jsonl"))?;
    // Every finding of cxl_mem_probe's own, once per memdev-bind cycle.
    let per_probe = kernel.expected;
    for e in per_probe.iter().filter(|e| e.fixed_by_cxl_mem) {
        let n = wait.occurrences(e.class, e.site);
        ensure!(
            n == 3,
            "after waiting, the tracer saw {n} {} at {}, not 3 (one per memdev-bind cycle)",
            e.class,
            e.site
        );
    }
    // The traced command's output goes to the tracer's stderr.
    ensure!(
        read(out, "wait.log")?.contains("workload memdev-bind passed cycles=3"),
        "the workload traced after the wait did not pass (see wait.log)"
    );
    println!("test: guest:   --wait-for-cxl: waited, attached when the modules came, 3 of 3 probes judged");

    expect(&r, "no-use-site exit", "2", "tracer run --use-site with a function the kernel does not have")?;
    let log = read(out, "no-use-site.log")?;
    ensure!(
        log.contains("no_such_cxl_function") && log.contains("unlocked-use, stale-use and use-after-free"),
        "the error for a missing --use-site must name it and the classes it costs:\n{log}"
    );
    println!("test: guest:   missing --use-site: exit 2, names the function and the finding classes");
    expect(&r, "unprobed-use-site exit", "2", "tracer run --use-site with a function the kernel refuses to probe")?;
    let log = read(out, "unprobed-use-site.log")?;
    ensure!(
        log.contains("--use-site notify_die")
            && log.contains("the kernel refused kprobe")
            && log.contains("unlocked-use, stale-use and use-after-free"),
        "the error for an unprobeable --use-site must name it, say the kernel refused it and name the classes it costs:\n{log}"
    );
    expect(&r, "unprobed-use-site-doctor exit", "2", "doctor --use-site with a function the kernel refuses to probe")?;
    let doctor = read(out, "unprobed-use-site-doctor.txt")?;
    ensure!(
        doctor.contains("attach check: FAILED") && doctor.contains("notify_die"),
        "doctor must report the refused --use-site as a failed attach check:\n{doctor}"
    );
    expect(&r, "unprobed-use-site-leftovers exit", "0", "nothing left after the refused --use-site")?;
    println!(
        "test: guest:   unprobeable --use-site: exit 2 naming it, the kernel's refusal and the classes; doctor fails its attach check; nothing left"
    );

    expect(&r, "full exit", "2", "--record on a full disk")?;
    let log = read(out, "full.log")?;
    ensure!(
        log.contains("No space left on device") && log.contains("trace file"),
        "the full-disk error must name the trace file and the cause:\n{log}"
    );
    let error = log.lines().rev().find(|l| l.contains("No space")).unwrap_or_default();
    println!("test: guest:   full disk: exit 2: {}", error.trim());
    let partial = out.join("full-partial.bin");
    let bytes = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    ensure!(bytes > 0, "the partial trace was not copied back");
    let (report, stderr) =
        findings::analyze(tracer, &partial).context("the partial trace of the full disk does not analyze")?;
    let events = report.summary_u64(&["events"])?;
    ensure!(events > 0, "the partial trace holds no event");
    println!(
        "test: guest:   partial trace ({bytes} bytes): {events} events analyzed{}",
        stderr
            .lines()
            .find(|l| l.contains("cut off"))
            .map(|l| format!("; {}", l.trim_start_matches("tracer: warning: ")))
            .unwrap_or_default()
    );
    if !report.findings.iter().any(|f| f.is_read_side()) {
        bail!("the partial trace holds no read-side finding, though memdev-bind ran until the disk was full");
    }
    Ok(())
}
