//! Guest suite cases with the tracer attached: the stock kernel's findings, counted against
//! an independent count of the memdev probes; the fixed driver's silence, with proof the
//! tracer was live; the switch topology; replay of each recorded trace.
//!
//! The ground truth comes from kretprobes the guest sets on `cxl_mem_probe` and
//! `devm_cxl_add_port` (`--count-calls`, see `calls.rs`) once the tracer has attached:
//! every return, its value and its caller. The tracer's counts must equal them exactly.
use std::{
    collections::{BTreeSet, HashMap},
    ffi::OsStr,
    fs,
    path::Path,
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

// The demo runs its guests as these cases do.
pub use super::checks::completed;
use super::{
    KernelArg, RunOptions, Topology, Workload,
    calls::Calls,
    checks::{check_cycled, script},
    expect::{self, Expected, Per},
    findings::{self, Finding, Report, frame_function},
};
use crate::{debian::StockKernel, util};

/// What the counts are checked against: successful memdev probes and the ports they add.
pub const COUNTED: [&str; 2] = ["cxl_mem:cxl_mem_probe", "devm_cxl_add_port"];

pub const ADD_PORT: &str = "devm_cxl_add_port";
/// The core's own unlocked use (`devm_cxl_enumerate_ports`, `add_port_attach_ep`).
pub const ADD_EP: &str = "cxl_add_ep";

const UNLOCKED: &str = "unlocked-use";
const STALE: &str = "stale-use";

/// Runs after the workloads, inside the traced run: how many dports the CXL root has (one
/// per host bridge); each is erased without the port lock on every cxl_acpi unbind.
const ROOT_DPORTS: &str = include_str!("../../guest/suite/root-dports.sh");

/// Options for a traced suite run with call counting.
pub fn options(topology: Topology, out: &Path, tracer: &Path) -> RunOptions {
    let mut o = RunOptions::new(topology);
    o.tracer_binary = Some(tracer.to_owned());
    o.quiet = true;
    o.out = Some(out.to_owned());
    o.count_calls = COUNTED.iter().map(|s| (*s).to_owned()).collect();
    o
}

/// The independent counts from the guest's kretprobes.
#[derive(Debug)]
pub struct Ground {
    /// `cxl_mem_probe` calls (all of them succeeded).
    pub probes: u64,
    /// Endpoint ports added: the last `devm_cxl_add_port` of each probe, if it succeeded.
    pub endpoint_adds: u64,
    /// `devm_cxl_add_port` calls from `add_port_attach_ep`: switch ports added.
    pub switch_port_adds: u64,
}

pub fn ground(out: &Path) -> anyhow::Result<Ground> {
    let calls = Calls::read(out, &["cxl_mem_probe", ADD_PORT])?;
    let failed: Vec<String> = calls
        .of("cxl_mem_probe", None)
        .filter(|r| !r.succeeded())
        .map(|r| format!("{} (pid {}) got {:#x}", r.comm, r.pid, r.value))
        .collect();
    ensure!(failed.is_empty(), "memdev probes failed during the workloads: {}", failed.join(", "));
    // A probe's endpoint is the last port it adds (create_endpoint() comes after the
    // ports enumeration adds above it).
    let endpoint_adds =
        calls.last_inner("cxl_mem_probe", ADD_PORT).into_iter().flatten().filter(|r| !is_err_ptr(r.value)).count()
            as u64;
    let adds = |caller| calls.of(ADD_PORT, Some(caller)).filter(|r| !is_err_ptr(r.value)).count() as u64;
    Ok(Ground {
        probes: calls.of("cxl_mem_probe", None).count() as u64,
        endpoint_adds,
        switch_port_adds: adds("add_port_attach_ep"),
    })
}

/// The kernel's `IS_ERR()` on a returned pointer.
fn is_err_ptr(value: u64) -> bool {
    value >= (-4095i64) as u64
}

/// What every traced run must show: nothing lost, no use-after-free, no rule-mismatch (the
/// model's free lock is the one the kernel frees under: also cross-checked in the kernel at
/// each registration), and each finding with the stacks its class implies.
pub fn check_common(report: &Report) -> anyhow::Result<()> {
    report.check_clean()?;
    let mismatch = report.summary_u64(&["kernel_counters", "host_mismatch"])?;
    ensure!(mismatch == 0, "{mismatch} dport registration(s) used a devres host other than the model's free lock");
    // Every traced case tears ports down and brings them back (acpi-unbind, port-unbind,
    // upstream-rescan): their dports are registered again, each cross-checked.
    let checked = report.summary_u64(&["kernel_counters", "host_checked"])?;
    ensure!(checked > 0, "no dport registration had its devres host cross-checked (host_checked 0)");
    println!("test: guest:   devres host cross-checked at {checked} registration(s), none mismatched");
    Ok(())
}

/// Fails unless the (class, site) pairs reported are exactly `expected`.
fn check_sites(report: &Report, expected: &[(&str, &str)]) -> anyhow::Result<()> {
    let got: BTreeSet<(String, String)> = report.by_site().into_keys().collect();
    let want: BTreeSet<(String, String)> = expected.iter().map(|(c, s)| ((*c).to_owned(), (*s).to_owned())).collect();
    ensure!(got == want, "findings at unexpected sites: got {}, expected {}", pairs(&got), pairs(&want));
    Ok(())
}

fn pairs(set: &BTreeSet<(String, String)>) -> String {
    let v: Vec<String> = set.iter().map(|(c, s)| format!("{c}@{s}")).collect();
    if v.is_empty() { "none".to_owned() } else { v.join(", ") }
}

/// Occurrences of `class` at `site` whose use stack has `caller` right below the site.
fn from_caller(report: &Report, class: &str, site: &str, caller: &str) -> u64 {
    report
        .matching(class, site)
        .filter(|f| f.stack.get(1).map(|s| frame_function(s)) == Some(caller))
        .map(|f| f.count)
        .sum()
}

/// `expected == got`, or a message naming both.
fn check_count(what: &str, got: u64, expected: u64, truth: &str) -> anyhow::Result<()> {
    ensure!(got == expected, "{what}: {got} occurrence(s), but {truth} says {expected}");
    println!("test: guest:   {what}: {got} = {truth}");
    Ok(())
}

/// The recorded trace, analyzed on the host by the same tracer build, gives exactly the
/// live run's finding lines (groups, counts, stacks, order) and summary counts.
pub fn check_replay(tracer: &Path, out: &Path, live: &Report) -> anyhow::Result<()> {
    let (replay, _) = findings::analyze(tracer, &out.join("trace.bin"))?;
    let a: Vec<&str> = live.findings.iter().map(|f| f.line.as_str()).collect();
    let b: Vec<&str> = replay.findings.iter().map(|f| f.line.as_str()).collect();
    if a != b {
        let at = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
        bail!(
            "replaying trace.bin gives other findings than the live run ({} live, {} replayed \
             lines); first difference at finding {}:\nlive:   {}\nreplay: {}",
            a.len(),
            b.len(),
            at + 1,
            a.get(at).unwrap_or(&"(none)"),
            b.get(at).unwrap_or(&"(none)")
        );
    }
    for key in ["events", "dropped", "undecodable"] {
        let (l, r) = (live.summary_u64(&[key])?, replay.summary_u64(&[key])?);
        ensure!(l == r, "summary {key}: live {l}, replay {r}");
    }
    for key in ["findings", "occurrences"] {
        ensure!(
            live.summary.get(key) == replay.summary.get(key),
            "summary {key}: live {:?}, replay {:?}",
            live.summary.get(key),
            replay.summary.get(key)
        );
    }
    println!(
        "test: guest:   replay: {} finding lines and {} events identical to the live run",
        a.len(),
        live.summary_u64(&["events"])?
    );
    Ok(())
}

fn root_dports(out: &Path) -> anyhow::Result<u64> {
    let path = out.join("root-dports.txt");
    let n: u64 = fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{} holds no number", path.display()))?;
    ensure!(n > 0, "the CXL root has no dport");
    Ok(n)
}

/// The rp workloads of the stock and fixed cases: every sequential one (one thing at a
/// time), so none can free a dport under a reader.
pub const RP_WORKLOADS: [Workload; 6] = [
    Workload::MemdevBind,
    Workload::CxlMemReload,
    Workload::CxlPciReload,
    Workload::Type3Rescan,
    Workload::AcpiUnbind,
    Workload::PortUnbind,
];

/// The stock kernel `kernel`, rp topology: exactly the root-cause findings `expect` lists
/// for it, each counted against the kretprobe counts (per memdev probe) or the root's
/// teardowns (per cxl_acpi unbind and root dport); nothing lost, no use-after-free, no
/// rule-mismatch; the recorded trace replays to the same report; results.ktap parses.
pub fn rp_stock(out: &Path, tracer: &Path, kernel: &'static StockKernel, cycles: u32) -> anyhow::Result<()> {
    let expected = kernel.expected;
    let mut o = options(Topology::Rp, out, tracer);
    o.kernel = Some(KernelArg::Stock(kernel));
    o.workloads = RP_WORKLOADS.to_vec();
    o.cycles = cycles;
    o.script = script(out, ROOT_DPORTS)?;
    let run = completed(&o)?;
    ensure!(
        run.tracer_exit == Some(1),
        "the tracer exited {:?} on stock {}, not 1 (findings)",
        run.tracer_exit,
        kernel.name
    );
    check_cycled(&run, &RP_WORKLOADS, cycles)?;
    let g = ground(out)?;
    ensure!(
        g.probes >= u64::from(cycles) * RP_WORKLOADS.len() as u64,
        "{} memdev probes counted, fewer than one per cycle of each workload",
        g.probes
    );
    ensure!(
        g.endpoint_adds == g.probes,
        "{} endpoint ports added by {} probes (every return in {})",
        g.endpoint_adds,
        g.probes,
        out.join("calls.txt").display()
    );
    let report = Report::read(&out.join("findings.jsonl"))?;
    check_common(&report)?;
    check_expected(&report, expected, &Causes { ground: &g, unbinds: u64::from(cycles), region_targets: 0 }, out)?;
    check_replay(tracer, out, &report)?;
    check_ktap(out, &report)?;
    check_known_gate(tracer, out, kernel, Gate::Fails)
}

/// The seed-fixed `cxl_mem` on `kernel`: no read-side finding in `cxl_mem_probe` (only the
/// core's, counted), while the tracer was live: every probe re-fetched its dport in
/// `cxl_mem_probe` with the free lock held, and every use there is of that pointer.
pub fn rp_fixed(
    out: &Path,
    tracer: &Path,
    kernel: &'static StockKernel,
    module: &Path,
    cycles: u32,
) -> anyhow::Result<()> {
    let expected = expect::fixed(kernel.expected);
    let mut o = options(Topology::Rp, out, tracer);
    o.kernel = Some(KernelArg::Stock(kernel));
    o.workloads = RP_WORKLOADS.to_vec();
    o.cycles = cycles;
    o.modules = vec![module.to_owned()];
    o.script = script(out, ROOT_DPORTS)?;
    let run = completed(&o)?;
    ensure!(
        run.console.iter().any(|l| l.contains("module cxl_mem taints the kernel")),
        "the guest did not load the fixed cxl_mem (no out-of-tree taint reported)"
    );
    check_cycled(&run, &RP_WORKLOADS, cycles)?;
    let g = ground(out)?;
    let report = Report::read(&out.join("findings.jsonl"))?;
    check_common(&report)?;
    check_expected(&report, &expected, &Causes { ground: &g, unbinds: u64::from(cycles), region_targets: 0 }, out)?;
    ensure!(
        !report
            .findings
            .iter()
            .any(|f| f.is_read_side() && f.stack.iter().take(2).any(|fr| frame_function(fr) == "cxl_mem_probe")),
        "a read-side finding in cxl_mem_probe (or a function it passes the dport to) with the fixed cxl_mem"
    );
    println!("test: guest:   no read-side finding in cxl_mem_probe or at a function it passes a dport to");
    let events = findings::events(tracer, &out.join("trace.bin"))?;
    let (refetches, uses) = refetched_uses(&events)?;
    check_count(
        "re-fetch loads in cxl_mem_probe under the free lock",
        refetches,
        g.probes,
        "the kretprobe count of cxl_mem_probe",
    )?;
    ensure!(uses >= g.probes, "{uses} uses of re-fetched dports in cxl_mem_probe, fewer than its {} probes", g.probes);
    println!("test: guest:   {uses} uses and accesses in cxl_mem_probe, each of the dport its task re-fetched");
    check_replay(tracer, out, &report)?;
    check_ktap(out, &report)?;
    check_known_gate(tracer, out, kernel, Gate::Passes)
}

/// What the shipped known list of a kernel must make of a run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// The seed-fixed `cxl_mem`: nothing new, exit 0.
    Passes,
    /// The stock one: exit 1, and every new finding `cxl_mem_probe`'s own.
    Fails,
}

/// The gate a user runs on a stock kernel (`--known known/K.known`), on this run's trace:
/// the core's findings known, only `cxl_mem`'s new (docs/kernels.md).
fn check_known_gate(tracer: &Path, out: &Path, kernel: &StockKernel, gate: Gate) -> anyhow::Result<()> {
    let list = util::workspace_root().join("known").join(format!("{}.known", kernel.name));
    let args = [OsStr::new("--known"), list.as_os_str()];
    let (report, stderr, exit) = findings::analyze_with(tracer, &out.join("trace.bin"), &args)?;
    let new: Vec<&Finding> = report.findings.iter().filter(|f| f.known.is_none()).collect();
    let known = report.findings.len() - new.len();
    ensure!(known > 0, "--known {}: no finding of the run was known: {stderr}", list.display());
    match gate {
        Gate::Passes => {
            ensure!(
                exit == 0,
                "--known {}: exit {exit} for the fixed cxl_mem (new: {:?})",
                list.display(),
                titles(&new)
            );
        }
        Gate::Fails => {
            ensure!(exit == 1, "--known {}: exit {exit} for the stock cxl_mem, not 1", list.display());
            let foreign: Vec<&&Finding> = new
                .iter()
                .filter(|f| !f.stack.iter().take(2).any(|fr| frame_function(fr) == "cxl_mem_probe"))
                .collect();
            ensure!(
                foreign.is_empty(),
                "--known {}: new findings not cxl_mem_probe's: {:?}",
                list.display(),
                titles(&new)
            );
        }
    }
    println!(
        "test: guest:   --known {}: exit {exit}, {known} finding group(s) known, new: {}",
        list.file_name().unwrap_or_default().to_string_lossy(),
        if new.is_empty() { "none".to_owned() } else { titles(&new).join(", ") }
    );
    Ok(())
}

fn titles(findings: &[&Finding]) -> Vec<String> {
    let mut titles: Vec<String> = findings.iter().map(|f| f.title_key()).collect();
    titles.sort();
    titles.dedup();
    titles
}

/// What a run's causes were counted as, for `check_expected`.
struct Causes<'a> {
    ground: &'a Ground,
    /// `cxl_acpi` unbinds.
    unbinds: u64,
    /// Targets attached to manual regions.
    region_targets: u64,
}

/// The findings are exactly `expected`'s classes and sites, each as often as its cause.
fn check_expected(report: &Report, expected: &[Expected], causes: &Causes, out: &Path) -> anyhow::Result<()> {
    let (g, unbinds) = (causes.ground, causes.unbinds);
    let want: Vec<(&str, &str)> = expected.iter().map(|e| (e.class, e.site)).collect();
    check_sites(report, &want)?;
    let root = if expected.iter().any(|e| e.per == Per::RootDportTeardown) { root_dports(out)? } else { 0 };
    for e in expected {
        let (count, truth) = match e.per {
            Per::MemdevProbe => (g.probes, "the kretprobe count of cxl_mem_probe".to_owned()),
            Per::RootDportTeardown => (unbinds * root, format!("{unbinds} cxl_acpi unbinds x {root} root dport(s)")),
            Per::RegionTarget => (causes.region_targets, "the targets the region-attach cycles attached".to_owned()),
        };
        check_count(&format!("{} at {}", e.class, e.site), report.occurrences(e.class, e.site), count, &truth)?;
        for f in report.matching(e.class, e.site) {
            if let Some(member) = e.member {
                ensure!(
                    f.member.as_deref() == Some(member),
                    "{}: the access is of {:?}, not dport->{member}",
                    f.title(),
                    f.member
                );
            }
            for held in e.held {
                ensure!(
                    f.held_names.iter().any(|h| h == held),
                    "{}: {held} is not among its held locks ({:?})",
                    f.title(),
                    f.held_names
                );
            }
            for also in e.also {
                ensure!(
                    f.also.iter().any(|a| a == also),
                    "{}: {also} is not folded into it (also_at: {:?})",
                    f.title(),
                    f.also
                );
            }
        }
    }
    for f in report.matching("unlocked-erase", "cxl_dport_remove") {
        ensure!(f.root, "{}: the erased dport is not a root port's", f.title());
        ensure!(
            f.expected_lock_role.as_deref() == Some("port lock")
                && !f.held_locks.iter().any(|l| Some(l) == f.expected_lock.as_ref()),
            "{}: expected the port lock, not held",
            f.title()
        );
    }
    Ok(())
}

/// results.ktap, written by the harness from the trace, has the report's verdict per class
/// (the KTAP parse itself is tested against the kernel's parser in `cargo test`).
fn check_ktap(out: &Path, report: &Report) -> anyhow::Result<()> {
    let path = out.join("results.ktap");
    let ktap = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(ktap.starts_with("KTAP version 1\n"), "{} is not KTAP", path.display());
    for class in ["unlocked-use", "stale-use", "unlocked-erase", "use-after-free", "rule-mismatch"] {
        let failing = report.findings.iter().any(|f| f.class == class);
        let line = ktap.lines().find(|l| l.starts_with("ok ") || l.starts_with("not ok ")).is_some();
        ensure!(line, "{} has no result line", path.display());
        let ok = ktap.lines().any(|l| l.starts_with("ok ") && l.ends_with(&format!(" {class}")));
        let not_ok = ktap.lines().any(|l| l.starts_with("not ok ") && l.ends_with(&format!(" {class}")));
        ensure!(
            if failing { not_ok && !ok } else { ok && !not_ok },
            "{}: the {class} test does not say {}",
            path.display(),
            if failing { "not ok" } else { "ok" }
        );
    }
    println!("test: guest:   results.ktap: one test per class, as the report says");
    Ok(())
}

/// In the fixed driver's trace: the `xa_load`s made by `cxl_mem_probe` itself (its inlined
/// `cxl_find_dport_by_dev`) with the free lock held, and the uses and inline accesses in
/// `cxl_mem_probe` or its direct callees of exactly the dport the same task re-fetched last. A use of any other
/// pointer fails.
fn refetched_uses(events: &[Value]) -> anyhow::Result<(u64, u64)> {
    let s = |e: &Value, k: &str| e.get(k).and_then(Value::as_str).map(str::to_owned);
    let mut last: HashMap<u64, String> = HashMap::new();
    let (mut refetches, mut uses) = (0, 0);
    for e in events {
        let tid = e.get("tid").and_then(Value::as_u64).unwrap_or(0);
        match s(e, "kind").as_deref() {
            Some("xa_load") if findings::event_at(e, "cxl_mem_probe") => {
                ensure!(
                    e.get("free_lock_held").and_then(Value::as_bool) == Some(true),
                    "the fixed cxl_mem_probe re-fetched without the free lock: {e}"
                );
                refetches += 1;
                last.insert(tid, s(e, "ret").unwrap_or_default());
            }
            // In cxl_mem_probe itself, or a function it passes the dport to (the core's own
            // lookups, devm_cxl_enumerate_ports() -> cxl_add_ep(), are not its re-fetch).
            Some("use" | "deref") if findings::event_near(e, "cxl_mem_probe", 2) => {
                let Some(fetched) = last.get(&tid) else { continue };
                let dport = s(e, "dport").unwrap_or_default();
                ensure!(
                    *fetched == dport,
                    "the fixed cxl_mem_probe used dport {dport} without re-fetching it (its task last re-fetched {fetched}): {e}"
                );
                uses += 1;
            }
            _ => {}
        }
    }
    Ok((refetches, uses))
}

/// The switch workloads under the tracer on `kernel`: nothing lost, no use-after-free or
/// rule-mismatch, no erase finding (no root teardown), `cxl_mem_probe`'s own findings on
/// every probe, and the core's, each counted: `devm_cxl_enumerate_ports` passes an unlocked
/// dport to `cxl_add_ep` for each of the two ports above every endpoint; where the switch
/// port is made by `add_port_attach_ep` (6.1, 6.12), it looks the parent dport up before
/// taking the parent port's lock and passes it to `devm_cxl_add_port` under that lock
/// (`stale-use`), and passes the new port's dport to `cxl_add_ep` after dropping it
/// (`unlocked-use`), once per switch port added.
pub fn switch(out: &Path, tracer: &Path, kernel: &'static StockKernel, cycles: u32) -> anyhow::Result<()> {
    let workloads = [Workload::MemdevBind, Workload::UpstreamRescan, Workload::PortUnbind];
    let own: Vec<Expected> = kernel.expected.iter().filter(|e| e.fixed_by_cxl_mem).copied().collect();
    let mut o = options(Topology::Switch, out, tracer);
    o.kernel = Some(KernelArg::Stock(kernel));
    o.workloads = workloads.to_vec();
    o.cycles = cycles;
    let run = completed(&o)?;
    check_cycled(&run, &workloads, cycles)?;
    let g = ground(out)?;
    let by_cycles = u64::from(cycles) * workloads.len() as u64 * Topology::Switch.memdevs() as u64;
    ensure!(g.probes == by_cycles, "{} memdev probes counted, {by_cycles} expected", g.probes);
    let report = Report::read(&out.join("findings.jsonl"))?;
    check_common(&report)?;
    let mut sites: Vec<(&str, &str)> = own.iter().map(|e| (e.class, e.site)).collect();
    sites.push((UNLOCKED, ADD_EP));
    if g.switch_port_adds > 0 {
        sites.push((STALE, ADD_PORT));
    }
    check_sites(&report, &sites)?;
    let probes = "the kretprobe count of cxl_mem_probe";
    for e in &own {
        check_count(&format!("{} at {}", e.class, e.site), report.occurrences(e.class, e.site), g.probes, probes)?;
    }
    check_count(
        "unlocked-use at cxl_add_ep from devm_cxl_enumerate_ports",
        from_caller(&report, UNLOCKED, ADD_EP, "devm_cxl_enumerate_ports"),
        2 * g.probes,
        "2 ports above each endpoint x the kretprobe count of cxl_mem_probe",
    )?;
    let adds = "the kretprobe count of devm_cxl_add_port from add_port_attach_ep";
    check_count(
        "stale-use at devm_cxl_add_port from add_port_attach_ep",
        from_caller(&report, STALE, ADD_PORT, "add_port_attach_ep"),
        g.switch_port_adds,
        adds,
    )?;
    check_count(
        "unlocked-use at cxl_add_ep from add_port_attach_ep",
        from_caller(&report, UNLOCKED, ADD_EP, "add_port_attach_ep"),
        g.switch_port_adds,
        adds,
    )?;
    let total: u64 = report.findings.iter().map(|f| f.count).sum();
    let accounted = own.len() as u64 * g.probes + 2 * g.probes + 2 * g.switch_port_adds;
    ensure!(total == accounted, "{total} occurrences, {accounted} accounted for by the counts above");
    check_replay(tracer, out, &report)
}

/// The region-attach workload on the stock `kernel`, each cycle followed by a `cxl_acpi`
/// unbind (the root's teardown, which is what could free the root dport the attach looks
/// up, and re-registers the dports so the devres host cross-check runs): the stock findings
/// of the teardown and re-probes, and (6.12, 7.2) one `unlocked-use` in
/// `cxl_region_attach_position` per attached target, listing the region and DPA
/// rw_semaphores as held; the recorded
/// trace replays the same; and at least the dport sites a run of this case reached when it
/// was written ran again (the floor of `expect::REGION_COVERAGE_FLOOR`).
pub fn region(out: &Path, tracer: &Path, kernel: &'static StockKernel, cycles: u32) -> anyhow::Result<()> {
    let workloads = [Workload::RegionAttach, Workload::AcpiUnbind];
    let mut expected: Vec<Expected> = kernel.expected.to_vec();
    // 6.1 only compares the looked-up dport with the root decoder's target: no dereference.
    expected.extend(expect::region(kernel.region_rwsems));
    let mut o = options(Topology::Rp, out, tracer);
    o.kernel = Some(KernelArg::Stock(kernel));
    o.workloads = workloads.to_vec();
    o.cycles = cycles;
    o.script = script(out, ROOT_DPORTS)?;
    let run = completed(&o)?;
    check_cycled(&run, &workloads, cycles)?;
    let g = ground(out)?;
    let report = Report::read(&out.join("findings.jsonl"))?;
    check_common(&report)?;
    let causes = Causes {
        ground: &g,
        unbinds: u64::from(cycles),
        region_targets: u64::from(cycles) * Topology::Rp.memdevs() as u64,
    };
    check_expected(&report, &expected, &causes, out)?;
    check_coverage_floor(&report, kernel)?;
    check_replay(tracer, out, &report)
}

/// The dport sites that ran are at least the floor measured for this kernel's case.
fn check_coverage_floor(report: &Report, kernel: &StockKernel) -> anyhow::Result<()> {
    let floor = kernel.region_floor;
    for (kind, min) in [("load", floor.load), ("use", floor.uses), ("deref", floor.deref)] {
        let ran = report.summary_u64(&["coverage", kind, "ran"])?;
        let sites = report.summary_u64(&["coverage", kind, "sites"])?;
        ensure!(
            ran >= min,
            "dport {kind} sites: {ran} of {sites} ran, below the floor of {min} measured for {}",
            kernel.name
        );
        println!("test: guest:   dport {kind} sites: {ran} of {sites} ran (floor {min})");
    }
    Ok(())
}
