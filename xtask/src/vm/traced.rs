//! Guest suite cases with the tracer attached: the stock kernel's findings, counted against
//! an independent count of the memdev probes; the fixed driver's silence, with proof the
//! tracer was live; the switch topology; replay of each recorded trace.
//!
//! The ground truth comes from kretprobes the guest sets on `cxl_mem_probe` and
//! `devm_cxl_add_port` (`--count-calls`, see `calls.rs`) once the tracer has attached:
//! every return, its value and its caller. The tracer's counts must equal them exactly.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use super::{
    Failure, Run, RunOptions, Topology, Workload,
    calls::Calls,
    execute,
    findings::{self, Report, frame_function},
    suite::check_cycled,
};

/// What the counts are checked against: successful memdev probes and the ports they add.
pub const COUNTED: [&str; 2] = ["cxl_mem:cxl_mem_probe", "devm_cxl_add_port"];

/// The use sites of `cxl_mem_probe` in 6.12 (DESIGN §1).
pub const RAS: &str = "cxl_dport_init_ras_reporting";
pub const ADD_PORT: &str = "devm_cxl_add_port";
/// The core's own unlocked use (`devm_cxl_enumerate_ports`, `add_port_attach_ep`).
pub const ADD_EP: &str = "cxl_add_ep";
pub const DPORT_REMOVE: &str = "cxl_dport_remove";

const UNLOCKED: &str = "unlocked-use";
const STALE: &str = "stale-use";
const ERASE: &str = "unlocked-erase";

/// Runs after the workloads, inside the traced run: how many dports the CXL root has (one
/// per host bridge); each is erased without the port lock on every cxl_acpi unbind.
const ROOT_DPORTS: &str = r#"#!/bin/sh
set -e
n=0
for d in /sys/bus/cxl/devices/root0/dport*; do [ -e "$d" ] && n=$((n + 1)); done
echo "$n" > /share/out/root-dports.txt
echo "tracer-vm: suite: the CXL root has $n dport(s)"
"#;

/// Options for a traced suite run with call counting.
pub fn options(topology: Topology, out: &Path, tracer: &Path) -> RunOptions {
    let mut o = RunOptions::new(topology);
    o.tracer_binary = Some(tracer.to_owned());
    o.quiet = true;
    o.out = Some(out.to_owned());
    o.count_calls = COUNTED.iter().map(|s| (*s).to_owned()).collect();
    o
}

/// A traced run that completed: the guest passed and the tracer reported (exit 0 or 1).
pub fn completed(options: &RunOptions) -> anyhow::Result<Run> {
    let run = execute(options)?;
    run.print_summary();
    match &run.failure {
        None | Some(Failure::Findings { .. }) => {}
        Some(failure) => bail!("{failure}"),
    }
    ensure!(
        run.tracer_exit.is_some(),
        "the guest did not report the tracer's exit status"
    );
    Ok(run)
}

/// The independent counts from the guest's kretprobes.
#[derive(Debug)]
pub struct Ground {
    /// `cxl_mem_probe` calls (all of them succeeded).
    pub probes: u64,
    /// `devm_cxl_add_port` calls from `cxl_mem_probe`: endpoint ports added.
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
    ensure!(
        failed.is_empty(),
        "memdev probes failed during the workloads: {}",
        failed.join(", ")
    );
    let adds = |caller| {
        calls
            .of(ADD_PORT, Some(caller))
            .filter(|r| !is_err_ptr(r.value))
            .count() as u64
    };
    Ok(Ground {
        probes: calls.of("cxl_mem_probe", None).count() as u64,
        endpoint_adds: adds("cxl_mem_probe"),
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
    report.check_nothing_lost()?;
    report.check_none("use-after-free")?;
    report.check_none("rule-mismatch")?;
    let mismatch = report.summary_u64(&["kernel_counters", "host_mismatch"])?;
    ensure!(
        mismatch == 0,
        "{mismatch} dport registration(s) used a devres host other than the model's free lock"
    );
    report.check_stacks()
}

/// Fails unless the (class, site) pairs reported are exactly `expected`.
fn check_sites(report: &Report, expected: &[(&str, &str)]) -> anyhow::Result<()> {
    let got: BTreeSet<(String, String)> = report.by_site().into_keys().collect();
    let want: BTreeSet<(String, String)> = expected
        .iter()
        .map(|(c, s)| ((*c).to_owned(), (*s).to_owned()))
        .collect();
    ensure!(
        got == want,
        "findings at unexpected sites: got {}, expected {}",
        pairs(&got),
        pairs(&want)
    );
    Ok(())
}

fn pairs(set: &BTreeSet<(String, String)>) -> String {
    let v: Vec<String> = set.iter().map(|(c, s)| format!("{c}@{s}")).collect();
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
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
    ensure!(
        got == expected,
        "{what}: {got} occurrence(s), but {truth} says {expected}"
    );
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

/// Writes `text` next to `out` as `OUT.sh` and returns it as a run's script argument.
pub(super) fn script(out: &Path, text: &str) -> anyhow::Result<Vec<String>> {
    fs::create_dir_all(out)?;
    let path = out.with_extension("sh");
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(vec![path.to_string_lossy().into_owned()])
}

/// The rp workloads of the read-side and erase checks.
pub const RP_WORKLOADS: [Workload; 3] = [
    Workload::MemdevBind,
    Workload::CxlMemReload,
    Workload::AcpiUnbind,
];

/// Stock kernel, rp topology: `unlocked-use` at `cxl_dport_init_ras_reporting` and
/// `stale-use` at `devm_cxl_add_port` on every memdev probe, `unlocked-use` at `cxl_add_ep`
/// (core) on every probe, `unlocked-erase` of each root dport on every cxl_acpi unbind;
/// nothing else.
pub fn rp_stock(out: &Path, tracer: &Path, cycles: u32) -> anyhow::Result<()> {
    let mut o = options(Topology::Rp, out, tracer);
    o.workloads = RP_WORKLOADS.to_vec();
    o.cycles = cycles;
    o.script = script(out, ROOT_DPORTS)?;
    let run = completed(&o)?;
    ensure!(
        run.tracer_exit == Some(1),
        "the tracer exited {:?} on the stock kernel, not 1 (findings)",
        run.tracer_exit
    );
    check_cycled(&run, &RP_WORKLOADS, cycles)?;
    let g = ground(out)?;
    let memdevs = Topology::Rp.memdevs() as u64;
    // Each cycle of each workload probes every memdev once: a bind, a module load, the
    // rescan after the root comes back.
    let by_cycles = u64::from(cycles) * RP_WORKLOADS.len() as u64 * memdevs;
    ensure!(
        g.probes == by_cycles,
        "{} memdev probes counted, {by_cycles} expected from {cycles} cycles of {} workloads",
        g.probes,
        RP_WORKLOADS.len()
    );
    ensure!(
        g.endpoint_adds == g.probes,
        "{} endpoint ports added by {} probes",
        g.endpoint_adds,
        g.probes
    );
    let report = Report::read(&out.join("findings.jsonl"))?;
    check_common(&report)?;
    check_sites(
        &report,
        &[
            (UNLOCKED, RAS),
            (STALE, ADD_PORT),
            (UNLOCKED, ADD_EP),
            (ERASE, DPORT_REMOVE),
        ],
    )?;
    let probes = "the kretprobe count of cxl_mem_probe";
    check_count("unlocked-use at cxl_dport_init_ras_reporting", from_caller(&report, UNLOCKED, RAS, "cxl_mem_probe"), g.probes, probes)?;
    check_count("stale-use at devm_cxl_add_port", from_caller(&report, STALE, ADD_PORT, "cxl_mem_probe"), g.endpoint_adds, "the kretprobe count of devm_cxl_add_port from cxl_mem_probe")?;
    // rp: one port between the endpoint and the root, so devm_cxl_enumerate_ports passes
    // one dport to cxl_add_ep per probe.
    check_count("unlocked-use at cxl_add_ep", report.occurrences(UNLOCKED, ADD_EP), g.probes, probes)?;
    let root = root_dports(out)?;
    let unbinds = u64::from(cycles);
    check_count(
        "unlocked-erase at cxl_dport_remove",
        report.occurrences(ERASE, DPORT_REMOVE),
        unbinds * root,
        &format!("{unbinds} cxl_acpi unbinds x {root} root dport(s)"),
    )?;
    for f in report.matching(ERASE, DPORT_REMOVE) {
        ensure!(f.root, "{}: the erased dport is not a root port's", f.title());
        ensure!(
            f.expected_lock_role.as_deref() == Some("port lock")
                && !f.held_locks.iter().any(|l| Some(l) == f.expected_lock.as_ref()),
            "{}: expected the port lock, not held",
            f.title()
        );
    }
    check_replay(tracer, out, &report)
}

/// The fixed `cxl_mem`: no read-side finding in `cxl_mem_probe`, while the tracer was live:
/// the core's `cxl_add_ep` finding on every probe, the re-fetch under the lock seen as an
/// `xa_load` from `cxl_mem_probe` with the free lock held, and both uses seen, each with
/// the re-fetched pointer.
pub fn rp_fixed(out: &Path, tracer: &Path, module: &Path, cycles: u32) -> anyhow::Result<()> {
    let mut o = options(Topology::Rp, out, tracer);
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
    let by_cycles = u64::from(cycles) * RP_WORKLOADS.len() as u64;
    ensure!(
        g.probes == by_cycles,
        "{} memdev probes counted, {by_cycles} expected",
        g.probes
    );
    let report = Report::read(&out.join("findings.jsonl"))?;
    check_common(&report)?;
    check_sites(&report, &[(UNLOCKED, ADD_EP), (ERASE, DPORT_REMOVE)])?;
    println!("test: guest:   no finding at {RAS} or {ADD_PORT}");
    check_count("unlocked-use at cxl_add_ep (core, unfixed)", report.occurrences(UNLOCKED, ADD_EP), g.probes, "the kretprobe count of cxl_mem_probe")?;
    check_count(
        "unlocked-erase at cxl_dport_remove (core, unfixed)",
        report.occurrences(ERASE, DPORT_REMOVE),
        u64::from(cycles) * root_dports(out)?,
        "cxl_acpi unbinds x root dports",
    )?;
    let events = findings::events(tracer, &out.join("trace.bin"))?;
    let (refetches, uses) = refetched_uses(&events)?;
    check_count("re-fetch loads in cxl_mem_probe under the free lock", refetches, g.probes, "the kretprobe count of cxl_mem_probe")?;
    for site in [RAS, ADD_PORT] {
        let n = uses.get(site).copied().unwrap_or(0);
        check_count(&format!("uses at {site} of the re-fetched dport"), n, g.probes, "the kretprobe count of cxl_mem_probe")?;
    }
    check_replay(tracer, out, &report)
}

/// In the fixed driver's trace: the `xa_load`s made by `cxl_mem_probe` itself (its inlined
/// `cxl_find_dport_by_dev`) with the free lock held, and per use site the uses from
/// `cxl_mem_probe` of exactly the dport the same task re-fetched last. A use of any other
/// pointer fails.
fn refetched_uses(events: &[Value]) -> anyhow::Result<(u64, BTreeMap<String, u64>)> {
    let s = |e: &Value, k: &str| e.get(k).and_then(Value::as_str).map(str::to_owned);
    let mut last: HashMap<u64, String> = HashMap::new();
    let mut refetches = 0;
    let mut uses = BTreeMap::new();
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
            Some("use") if findings::event_in(e, "cxl_mem_probe") => {
                let site = s(e, "site").unwrap_or_default();
                if site != RAS && site != ADD_PORT {
                    continue;
                }
                let dport = s(e, "dport").unwrap_or_default();
                ensure!(
                    last.get(&tid) == Some(&dport),
                    "the fixed cxl_mem_probe used dport {dport} at {site} without re-fetching it: {e}"
                );
                *uses.entry(site).or_insert(0) += 1;
            }
            _ => {}
        }
    }
    Ok((refetches, uses))
}

/// The switch workloads under the tracer: nothing lost, no rule-mismatch, no erase finding
/// (no root teardown), the two `cxl_mem_probe` findings on every probe, and the core's own
/// findings, each counted: `add_port_attach_ep` adds a switch port with a parent dport it
/// loaded before taking the parent port's lock (`stale-use` at `devm_cxl_add_port`) and
/// passes the new port's dport to `cxl_add_ep` after dropping that lock (`unlocked-use`);
/// `devm_cxl_enumerate_ports` passes an unlocked dport to `cxl_add_ep` for each of the two
/// ports above every endpoint.
pub fn switch(out: &Path, tracer: &Path, cycles: u32) -> anyhow::Result<()> {
    let workloads = [
        Workload::MemdevBind,
        Workload::UpstreamRescan,
        Workload::PortUnbind,
    ];
    let mut o = options(Topology::Switch, out, tracer);
    o.workloads = workloads.to_vec();
    o.cycles = cycles;
    let run = completed(&o)?;
    check_cycled(&run, &workloads, cycles)?;
    let g = ground(out)?;
    let by_cycles = u64::from(cycles) * workloads.len() as u64 * Topology::Switch.memdevs() as u64;
    ensure!(
        g.probes == by_cycles,
        "{} memdev probes counted, {by_cycles} expected",
        g.probes
    );
    ensure!(g.switch_port_adds > 0, "no switch port was added during the workloads");
    let report = Report::read(&out.join("findings.jsonl"))?;
    check_common(&report)?;
    check_sites(&report, &[(UNLOCKED, RAS), (STALE, ADD_PORT), (UNLOCKED, ADD_EP)])?;
    let probes = "the kretprobe count of cxl_mem_probe";
    let adds = "the kretprobe count of devm_cxl_add_port from add_port_attach_ep";
    check_count("unlocked-use at cxl_dport_init_ras_reporting", from_caller(&report, UNLOCKED, RAS, "cxl_mem_probe"), g.probes, probes)?;
    check_count("stale-use at devm_cxl_add_port from cxl_mem_probe", from_caller(&report, STALE, ADD_PORT, "cxl_mem_probe"), g.endpoint_adds, "the kretprobe count of devm_cxl_add_port from cxl_mem_probe")?;
    check_count("stale-use at devm_cxl_add_port from add_port_attach_ep", from_caller(&report, STALE, ADD_PORT, "add_port_attach_ep"), g.switch_port_adds, adds)?;
    check_count("unlocked-use at cxl_add_ep from add_port_attach_ep", from_caller(&report, UNLOCKED, ADD_EP, "add_port_attach_ep"), g.switch_port_adds, adds)?;
    check_count("unlocked-use at cxl_add_ep from devm_cxl_enumerate_ports", from_caller(&report, UNLOCKED, ADD_EP, "devm_cxl_enumerate_ports"), 2 * g.probes, "2 ports above each endpoint x the kretprobe count of cxl_mem_probe")?;
    let total = report.occurrences(UNLOCKED, ADD_EP) + report.occurrences(STALE, ADD_PORT) + report.occurrences(UNLOCKED, RAS);
    let accounted = g.probes + g.endpoint_adds + 2 * g.switch_port_adds + 2 * g.probes;
    ensure!(total == accounted, "{total} read-side occurrences, {accounted} accounted for by the counts above");
    check_replay(tracer, out, &report)
}

/// The musl tracer for the suite, built once and checked.
pub fn tracer() -> anyhow::Result<PathBuf> {
    super::tracer_binary()
}
