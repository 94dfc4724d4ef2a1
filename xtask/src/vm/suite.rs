//! The guest suite `cargo xtask test` runs after the host tests.
//!
//! It proves the harness itself (the guest boots with the CXL topology present in sysfs,
//! every built-in workload really cycles, results come back to the host, and a crashing,
//! failing or hanging guest is reported as such), then the tracer in the guest: the stock
//! kernel's findings counted against the memdev probes, the fixed driver's silence, the
//! switch topology, replay, doctor, clean detach, bad environments and a short soak
//! (`traced.rs`, `reliability.rs`, `soak.rs`). Each check fails loudly; none is skipped.
use std::{fs, path::Path, time::Instant};

use anyhow::{Context as _, bail, ensure};

use super::{Crash, Failure, Run, RunOptions, Topology, Workload, execute, reliability, soak, traced};
use crate::{
    debian::STOCK_KERNELS,
    fixture::{self, Fixture},
    util,
};

/// Cycles of each workload in the traced rp cases (every sequential workload: each cycle is
/// at least one memdev probe, so 18 probes a case).
const TRACED_CYCLES: u32 = 3;
/// Cycles of each workload in the traced switch case.
const SWITCH_CYCLES: u32 = 5;
/// Minutes of the suite's short soak (`cargo xtask vm soak` runs longer ones).
const SOAK_MINUTES: u32 = 1;

/// Checked by the host after the run: written by the guest into the results share.
const MARKER: &str = "suite-topology.txt";

/// Runs in the guest after the workloads of the first boot: the topology must still be there
/// (every workload restored it) and be the one the rp command line asks for.
const TOPOLOGY_CHECK: &str = include_str!("../../guest/suite/topology-check.sh");

struct Case {
    name: &'static str,
    seconds: f64,
}

/// Every case, in the order the suite runs them: the harness's own on the default kernel,
/// then the tracer on each kernel of the matrix (DESIGN §7). The tracer's lifecycle and bad
/// environments run on the seed's kernel, 7.2, the heaviest profile (442 kprobes): each
/// takes 3 to 5 minutes under TCG, and on every kernel they would take the suite past its
/// half-hour budget.
pub const CASES: &[&str] = &[
    "rp-workloads",
    "switch-workloads",
    "user-module",
    "crash-is-detected",
    "failing-script-fails",
    "missing-result-fails",
    "hang-is-bounded",
    "text-patching",
    "6.1/rp-stock-traced",
    "6.1/rp-fixed-traced",
    "6.12/rp-stock-traced",
    "6.12/rp-fixed-traced",
    "6.12/switch-traced",
    "7.2/rp-stock-traced",
    "7.2/rp-fixed-traced",
    "7.2/switch-traced",
    "7.2/tracer-lifecycle",
    "7.2/bad-environments",
    "soak",
];

pub fn suite() -> anyhow::Result<()> {
    run(&[])
}

/// The suite, or only the cases named in `only` (all when empty).
pub fn run(only: &[String]) -> anyhow::Result<()> {
    if let Some(unknown) = only.iter().find(|n| !CASES.contains(&n.as_str())) {
        bail!("no guest case {unknown:?}; the cases are: {}", CASES.join(" "));
    }
    let start = Instant::now();
    let root = util::workspace_root().join("target/vm/suite");
    if only.is_empty() {
        let _ = fs::remove_dir_all(&root);
    }
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let mut cases = Vec::new();
    let mut kernel_times: Vec<(&str, f64)> = Vec::new();
    let mut case = |name: &'static str, f: &dyn Fn(&Path) -> anyhow::Result<()>| -> anyhow::Result<()> {
        if !only.is_empty() && !only.iter().any(|n| n == name) {
            return Ok(());
        }
        let _ = fs::remove_dir_all(root.join(name));
        println!("test: guest: {name}");
        let t = Instant::now();
        f(&root.join(name)).with_context(|| format!("guest test {name} failed"))?;
        let seconds = t.elapsed().as_secs_f64();
        println!("test: guest: {name} ok ({seconds:.1} s)");
        cases.push(Case { name, seconds });
        Ok(())
    };
    case("rp-workloads", &rp_workloads)?;
    case("switch-workloads", &switch_workloads)?;
    case("user-module", &user_module)?;
    case("crash-is-detected", &crash_is_detected)?;
    case("failing-script-fails", &failing_script_fails)?;
    case("missing-result-fails", &missing_result_fails)?;
    case("hang-is-bounded", &hang_is_bounded)?;
    case("text-patching", &text_patching)?;

    // The tracer in the guest: one musl build for the guest and for replay on the host.
    let first_traced = CASES.iter().position(|c| c.contains('/')).unwrap_or(CASES.len());
    let traced = CASES[first_traced..].iter().any(|c| only.is_empty() || only.iter().any(|n| n == c));
    let tracer = if traced { traced::tracer()? } else { Default::default() };
    for kernel in STOCK_KERNELS {
        let wanted = |case: &str| only.is_empty() || only.iter().any(|n| *n == format!("{}/{case}", kernel.name));
        let started = Instant::now();
        let fixed = if wanted("rp-fixed-traced") {
            fixture::build_for_kernel(Fixture::CxlMemFixed, kernel)?
        } else {
            Default::default()
        };
        let name = |case: &str| -> &'static str {
            CASES.iter().find(|c| **c == format!("{}/{case}", kernel.name)).copied().unwrap_or("")
        };
        let cycles = TRACED_CYCLES;
        if !name("rp-stock-traced").is_empty() {
            case(name("rp-stock-traced"), &|out| traced::rp_stock(out, &tracer, kernel, cycles))?;
        }
        if !name("rp-fixed-traced").is_empty() {
            case(name("rp-fixed-traced"), &|out| traced::rp_fixed(out, &tracer, kernel, &fixed, cycles))?;
        }
        if !name("switch-traced").is_empty() {
            case(name("switch-traced"), &|out| traced::switch(out, &tracer, kernel, SWITCH_CYCLES))?;
        }
        if !name("tracer-lifecycle").is_empty() {
            case(name("tracer-lifecycle"), &|out| reliability::lifecycle(out, &tracer, kernel))?;
        }
        if !name("bad-environments").is_empty() {
            case(name("bad-environments"), &|out| reliability::environment(out, &tracer, kernel))?;
        }
        kernel_times.push((kernel.name, started.elapsed().as_secs_f64()));
    }
    case("soak", &|out| short_soak(out, &tracer))?;
    for c in &cases {
        println!("test: guest: {:<26} {:6.1} s", c.name, c.seconds);
    }
    for (kernel, seconds) in &kernel_times {
        println!("test: guest: kernel {kernel:<6} traced cases {seconds:6.1} s (with its fixture build)");
    }
    println!("test: guest suite took {:.1} s", start.elapsed().as_secs_f64());
    println!("guest: {} passed, 0 failed", cases.len());
    Ok(())
}

fn options(topology: Topology, out: &Path) -> RunOptions {
    let mut o = RunOptions::new(topology);
    o.no_tracer = true;
    o.quiet = true;
    o.out = Some(out.to_owned());
    o
}

/// A run that must pass: prints its summary and fails with the run's own failure otherwise.
pub(super) fn passing(options: &RunOptions) -> anyhow::Result<Run> {
    let run = execute(options)?;
    run.print_summary();
    if let Some(failure) = &run.failure {
        bail!("{failure}");
    }
    Ok(run)
}

/// Every workload ran `cycles` cycles, each reported by the guest.
pub(super) fn check_cycled(run: &Run, workloads: &[Workload], cycles: u32) -> anyhow::Result<()> {
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

fn check_copied(out: &Path, files: &[&str]) -> anyhow::Result<()> {
    for f in files {
        let path = out.join(f);
        let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        ensure!(len > 0, "{} was not copied back from the guest (missing or empty)", path.display());
    }
    Ok(())
}

fn rp_workloads(out: &Path) -> anyhow::Result<()> {
    let script = out.with_extension("sh");
    fs::create_dir_all(out)?;
    fs::write(&script, TOPOLOGY_CHECK).with_context(|| format!("writing {}", script.display()))?;
    let workloads: Vec<Workload> = Workload::ALL.into_iter().filter(|w| w.runs_on(Topology::Rp)).collect();
    let cycles = 5;
    let mut o = options(Topology::Rp, out);
    o.workloads = workloads.clone();
    o.cycles = cycles;
    o.script = vec![script.to_string_lossy().into_owned()];
    let run = passing(&o)?;
    let ready = run
        .console
        .iter()
        .find(|l| l.starts_with("tracer-vm: topology ready "))
        .context("the guest never reported its CXL topology ready")?;
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

fn switch_workloads(out: &Path) -> anyhow::Result<()> {
    let workloads = Workload::ALL.to_vec();
    let cycles = 3;
    let mut o = options(Topology::Switch, out);
    o.workloads = workloads.clone();
    o.cycles = cycles;
    let run = passing(&o)?;
    let ready = run
        .console
        .iter()
        .find(|l| l.starts_with("tracer-vm: topology ready "))
        .context("the guest never reported its CXL topology ready")?;
    ensure!(
        ready.contains("ports=2 ") && ready.contains("memdevs=2 bound=2 endpoints=2"),
        "unexpected switch topology: {ready}"
    );
    check_cycled(&run, &workloads, cycles)
}

/// Checks in the guest that cxl_mem comes from updates/ (the --module copy): with the stock
/// file gone, a reload must still work.
const MODULE_CHECK: &str = include_str!("../../guest/suite/module-check.sh");

/// `--module` puts a module in place of the stock one: here the kernel's own cxl_mem.ko.xz
/// (which also exercises decompressing a user's module), with cxl_pmem loaded (`--pmem`).
fn user_module(out: &Path) -> anyhow::Result<()> {
    let kernel = super::kernel::Kernel::resolve(&super::kernel::Source::Stock(crate::debian::stock_kernel(
        crate::debian::DEFAULT_KERNEL,
    )?))?;
    let index = kernel.module_index()?;
    let stock = &index.modules.get("cxl_mem").context("the default kernel has no cxl_mem module")?.path;
    let script = out.with_extension("sh");
    fs::create_dir_all(out)?;
    fs::write(&script, MODULE_CHECK).with_context(|| format!("writing {}", script.display()))?;
    let mut o = options(Topology::Rp, out);
    o.modules = vec![kernel.modules.join(stock)];
    o.pmem = true;
    o.workloads = vec![Workload::MemdevBind, Workload::CxlMemReload];
    o.cycles = 2;
    o.script = vec![script.to_string_lossy().into_owned()];
    let run = passing(&o)?;
    check_cycled(&run, &o.workloads, 2)?;
    check_copied(out, &["suite-module.txt"])
}

/// A guest that panics must fail the run, naming the panic, with the console excerpt.
fn crash_is_detected(out: &Path) -> anyhow::Result<()> {
    let mut o = options(Topology::Rp, out);
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
fn failing_script_fails(out: &Path) -> anyhow::Result<()> {
    let mut o = options(Topology::Rp, out);
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
fn missing_result_fails(out: &Path) -> anyhow::Result<()> {
    let mut o = options(Topology::Rp, out);
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
fn hang_is_bounded(out: &Path) -> anyhow::Result<()> {
    let mut o = options(Topology::Rp, out);
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

/// Flips of the kfree tracepoint in `text-patching`.
const FLIPS: u32 = 300;

/// Runs in the guest: flips the kmem/kfree tracepoint (a static key: `text_poke_bp` on its
/// site in `kfree`) while two loops fork, switch tasks and free memory.
const FLIP_KFREE: &str = include_str!("../../guest/suite/flip-kfree.sh");

/// Attaching and detaching the tracer patches kernel text (static keys, ftrace). The
/// guest's default vCPU count must survive that under load: with two vCPUs, QEMU 7.2's
/// multi-threaded TCG oopses the guest within these flips (`Accel::default_cpus`).
fn text_patching(out: &Path) -> anyhow::Result<()> {
    let mut o = options(Topology::Rp, out);
    o.script = traced::script(out, FLIP_KFREE)?;
    o.script.push(FLIPS.to_string());
    o.timeout = Some(300);
    let run = passing(&o)?;
    let flips = fs::read_to_string(out.join("flips.txt")).context("the guest wrote no flips.txt")?;
    ensure!(flips.trim() == FLIPS.to_string(), "the guest flipped the tracepoint {} times, not {FLIPS}", flips.trim());
    println!("test: guest:   {FLIPS} kfree tracepoint flips under load in {:.1} s, no oops", run.elapsed.as_secs_f64());
    Ok(())
}

/// `cargo xtask vm soak --workload reload-mix` for a minute: memory flat, no drop, no crash.
fn short_soak(out: &Path, tracer: &Path) -> anyhow::Result<()> {
    // reload-mix, not mix: mix can oops the 6.12 kernel (docs/vm.md), which would make this
    // case fail on a kernel bug now and then.
    let soak = soak::run(&soak::SoakOptions {
        minutes: SOAK_MINUTES,
        workload: Workload::ReloadMix,
        interval: 3,
        topology: Topology::Rp,
        tracer_binary: Some(tracer.to_owned()),
        modules: Vec::new(),
        tracer_args: Vec::new(),
        out: Some(out.to_owned()),
    })?;
    soak.print();
    ensure!(soak.failures.is_empty(), "{}", soak.failures.join("; "));
    ensure!(soak.rounds > 0, "no mix round completed during the soak");
    Ok(())
}
