//! Guest suite cases that prove the harness itself: the guest boots with the CXL topology
//! present in sysfs, every built-in workload really cycles, results come back to the host,
//! `--module` replaces a stock module, and a crashing, failing, silent or hanging guest is
//! reported as such. Their guest scripts are `xtask/guest/suite/*.sh`.
use std::{fs, path::Path, time::Instant};

use anyhow::{Context as _, bail, ensure};

use super::{
    Crash, Failure, Topology, Workload,
    checks::{self, check_copied, check_cycled, passing, untraced},
    kernel::{Kernel, Source},
    run::execute,
};
use crate::debian::StockKernel;

/// After the first boot's workloads: the topology is still there and is the rp one.
const TOPOLOGY_CHECK: &str = include_str!("../../guest/suite/topology-check.sh");
/// What TOPOLOGY_CHECK writes into the results share for the host.
const MARKER: &str = "suite-topology.txt";

/// cxl_mem comes from updates/ (the --module copy), and reloads with the stock file gone.
const MODULE_CHECK: &str = include_str!("../../guest/suite/module-check.sh");

/// Flips the kmem/kfree tracepoint FLIPS times while two loops fork and free.
const FLIP_KFREE: &str = include_str!("../../guest/suite/flip-kfree.sh");
/// Flips of the kfree tracepoint in `text-patching`.
const FLIPS: u32 = 300;

pub fn rp_workloads(out: &Path) -> anyhow::Result<()> {
    let workloads: Vec<Workload> = Workload::ALL.into_iter().filter(|w| w.runs_on(Topology::Rp)).collect();
    let cycles = 5;
    let mut o = untraced(Topology::Rp, out);
    o.workloads = workloads.clone();
    o.cycles = cycles;
    o.script = checks::script(out, TOPOLOGY_CHECK)?;
    let run = passing(&o)?;
    let ready = checks::ready_line(&run)?;
    ensure!(
        ready.contains("roots=1 ") && ready.contains("memdevs=1 bound=1 endpoints=1"),
        "unexpected rp topology: {ready}"
    );
    check_cycled(&run, &workloads, cycles)?;
    check_copied(out, &["console.log", "dmesg.txt", "workload.log", MARKER])?;
    let marker = fs::read_to_string(out.join(MARKER))?;
    ensure!(marker.contains(" driver cxl_mem"), "{MARKER} is incomplete:\n{marker}");
    let log = fs::read_to_string(out.join("workload.log"))?;
    ensure!(log.contains("workload memdev-bind passed"), "workload.log lacks the workload's output");
    Ok(())
}

pub fn switch_workloads(out: &Path) -> anyhow::Result<()> {
    let workloads = Workload::ALL.to_vec();
    let cycles = 3;
    let mut o = untraced(Topology::Switch, out);
    o.workloads = workloads.clone();
    o.cycles = cycles;
    let run = passing(&o)?;
    let ready = checks::ready_line(&run)?;
    ensure!(
        ready.contains("ports=2 ") && ready.contains("memdevs=2 bound=2 endpoints=2"),
        "unexpected switch topology: {ready}"
    );
    check_cycled(&run, &workloads, cycles)
}

/// `--module` puts a module in place of the stock one: here `kernel`'s own cxl_mem.ko.xz
/// (which also exercises decompressing a user's module), with cxl_pmem loaded (`--pmem`).
pub fn user_module(out: &Path, kernel: &'static StockKernel) -> anyhow::Result<()> {
    let kernel = Kernel::resolve(&Source::Stock(kernel))?;
    let index = kernel.module_index()?;
    let stock =
        &index.modules.get("cxl_mem").with_context(|| format!("kernel {} has no cxl_mem module", kernel.release))?.path;
    let mut o = untraced(Topology::Rp, out);
    o.modules = vec![kernel.modules.join(stock)];
    o.pmem = true;
    o.workloads = vec![Workload::MemdevBind, Workload::CxlMemReload];
    o.cycles = 2;
    o.script = checks::script(out, MODULE_CHECK)?;
    let run = passing(&o)?;
    check_cycled(&run, &o.workloads, 2)?;
    check_copied(out, &["suite-module.txt"])
}

/// A guest that panics must fail the run, naming the panic, with the console excerpt.
pub fn crash_is_detected(out: &Path) -> anyhow::Result<()> {
    let mut o = untraced(Topology::Rp, out);
    // A guest command, not a file: this also covers `-- CMD ARGS` run as busybox's.
    o.script = ["sh", "-c", "echo c > /proc/sysrq-trigger"].map(str::to_owned).to_vec();
    o.timeout = Some(120);
    let run = execute(&o)?;
    let failure = run.failure.context("a guest that crashed with sysrq-c was reported as passing")?;
    ensure!(failure.crash() == Some(Crash::Panic), "expected a kernel panic, got: {failure}");
    let text = failure.to_string();
    ensure!(
        text.contains("kernel panic") && text.contains("sysrq triggered crash"),
        "the failure does not name the crash and show its console lines:\n{text}"
    );
    ensure!(run.elapsed.as_secs() < 60, "the crash took {} s to be reported", run.elapsed.as_secs());
    println!("test: guest: reported as: {}", text.lines().next().unwrap_or_default());
    Ok(())
}

/// A script that exits non-zero must fail the run with its status.
pub fn failing_script_fails(out: &Path) -> anyhow::Result<()> {
    let mut o = untraced(Topology::Rp, out);
    o.script = ["sh", "-c", "echo about to fail; exit 3"].map(str::to_owned).to_vec();
    o.timeout = Some(120);
    let run = execute(&o)?;
    match run.failure {
        Some(Failure::Guest { exit: 3, .. }) => Ok(()),
        Some(other) => bail!("expected the guest to fail with exit status 3, got: {other}"),
        None => bail!("a script that exited 3 was reported as passing"),
    }
}

/// A guest that powers off without its result line must fail the run.
pub fn missing_result_fails(out: &Path) -> anyhow::Result<()> {
    let mut o = untraced(Topology::Rp, out);
    o.script = ["poweroff", "-f"].map(str::to_owned).to_vec();
    o.timeout = Some(120);
    let run = execute(&o)?;
    match run.failure {
        Some(Failure::NoResult { .. }) => Ok(()),
        Some(other) => bail!("expected a missing result line, got: {other}"),
        None => bail!("a guest that powered off before its result line was reported as passing"),
    }
}

/// A guest that never finishes must be killed at the wall-clock bound and reported.
pub fn hang_is_bounded(out: &Path) -> anyhow::Result<()> {
    let mut o = untraced(Topology::Rp, out);
    o.script = ["sleep", "1000"].map(str::to_owned).to_vec();
    o.timeout = Some(30);
    let t = Instant::now();
    let run = execute(&o)?;
    let took = t.elapsed().as_secs();
    match run.failure {
        Some(Failure::Timeout { secs: 30, .. }) => {}
        Some(other) => bail!("expected a timeout after 30 s, got: {other}"),
        None => bail!("a guest stuck in `sleep 1000` was reported as passing"),
    }
    ensure!(took < 50, "the 30 s bound took {took} s to enforce");
    Ok(())
}

/// Attaching and detaching the tracer patches kernel text (static keys, ftrace). The
/// guest's default vCPU count must survive that under load: with two vCPUs, QEMU 7.2's
/// multi-threaded TCG oopses the guest within these flips (`Accel::default_cpus`).
pub fn text_patching(out: &Path) -> anyhow::Result<()> {
    let mut o = untraced(Topology::Rp, out);
    o.script = checks::script(out, FLIP_KFREE)?;
    o.script.push(FLIPS.to_string());
    o.timeout = Some(300);
    let run = passing(&o)?;
    let flips = fs::read_to_string(out.join("flips.txt")).context("the guest wrote no flips.txt")?;
    ensure!(flips.trim() == FLIPS.to_string(), "the guest flipped the tracepoint {} times, not {FLIPS}", flips.trim());
    println!("test: guest:   {FLIPS} kfree tracepoint flips under load in {:.1} s, no oops", run.elapsed.as_secs_f64());
    Ok(())
}
