//! Guest suite cases on the kernel built from source (`7.2-src`, docs/source-kernel.md) with
//! cxl_test's mock topology (`--topology cxl-test`): the CXL core is a module there, so the
//! seed thread's whole v2 patch (`core/port.c`, `mem.c`, `pci.c`) runs, and cxl_test brings
//! what no QEMU topology has: an RCH with its RCD, switches, regions that commit. The stock
//! build's findings and the seed-patched build's are each checked by title, exactly, with
//! the counts that have an independent truth (the kretprobe count of `cxl_mem_probe`).
use std::{ffi::OsStr, path::Path};

use anyhow::{Context as _, ensure};
use serde_json::Value;

use super::{
    KernelArg, Topology, Userland, Workload,
    checks::{check_cycled, completed, script},
    findings::{self, Finding, Report, frame_function},
    traced,
};
use crate::{source_kernel, util};

/// The kernel these cases run on.
pub const KERNEL: &str = "7.2-src";

/// Every hotplug workload cxl_test's topology supports, the region one committing.
pub const WORKLOADS: [Workload; 5] =
    [Workload::MemdevBind, Workload::AcpiUnbind, Workload::RegionAttach, Workload::PortUnbind, Workload::CxlMemReload];

/// A tester's own bash script, run after the stock case's workloads in the Debian userland:
/// it reloads cxl_test as ndctl's tests do and lists the topology with `cxl` and jq.
const RELOAD_EXAMPLE: &str = include_str!("../../guest/examples/cxl-test-reload.sh");

/// Whose lock, and which dports, a title is reported for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dports {
    /// Only root dports (an RCH's, or a host bridge's at the root).
    Root,
    /// Only dports of ports below the root.
    Port,
    /// Both.
    Both,
}

/// How often a title occurs, when something independent says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Count {
    /// Once per memdev probe (the kretprobe count of `cxl_mem_probe`).
    PerProbe,
    /// Some, with no independent count (the mock's setup, the kworker's auto-region).
    Some,
}

struct Expected {
    title: &'static str,
    dports: Dports,
    count: Count,
    /// Whether the seed's v2 patch removes it.
    fixed_by_seed: bool,
}

/// What the tracer reports on the stock 7.2.13 build under cxl_test (measured 2026-12-06;
/// docs/kernels.md, "7.2-src", has the source lines).
const STOCK: &[Expected] = &[
    // mem.c: `if (dport->rch)` before any lock, for the VH memdevs and the RCD alike.
    Expected {
        title: "unlocked-use in cxl_mem_probe (read of dport->rch)",
        dports: Dports::Both,
        count: Count::PerProbe,
        fixed_by_seed: false,
    },
    // mem.c: the pointer loaded before the lock, passed on under it.
    Expected {
        title: "stale-use in devm_cxl_add_endpoint",
        dports: Dports::Both,
        count: Count::PerProbe,
        fixed_by_seed: true,
    },
    // port.c: the root's teardown erases root dports without the root port's lock (the
    // patch's write side), on every cxl_acpi unbind and on rmmod cxl_test.
    Expected {
        title: "unlocked-erase in cxl_dport_remove",
        dports: Dports::Root,
        count: Count::Some,
        fixed_by_seed: true,
    },
    // port.c: devm_cxl_enumerate_ports() -> cxl_add_ep(), not in the patch.
    Expected { title: "unlocked-use in cxl_add_ep", dports: Dports::Port, count: Count::Some, fixed_by_seed: false },
    // region.c: a root dport under cxl_rwsem.region, safe by teardown order (known).
    Expected {
        title: "unlocked-use in cxl_region_attach_position",
        dports: Dports::Root,
        count: Count::Some,
        fixed_by_seed: false,
    },
    // cxl_test's own __mock_cxl_decoders_setup() (test infrastructure, known).
    Expected {
        title: "unlocked-use in cxl_port_update_decoder_targets",
        dports: Dports::Port,
        count: Count::Some,
        fixed_by_seed: false,
    },
];

/// The title the v2 patch leaves for the RCD: its re-fetch reads `dport->rch` under the root
/// port's own lock, but an RCH dport is freed under `uport_dev->mutex` (the thread's review).
const RCH_GAP: &str = "unlocked-use in cxl_mem_probe (read of dport->rch)";

/// The shipped known list of the from-source kernel.
fn known_list() -> std::path::PathBuf {
    util::workspace_root().join("known").join(format!("{KERNEL}.known"))
}

/// `7.2-src/cxl-test-stock` and `7.2-src/cxl-test-seed`: every workload under the tracer on
/// cxl_test's topology, the build stock or with the seed's v2 patch.
pub fn suite_case(out: &Path, tracer: &Path, seed: bool, cycles: u32) -> anyhow::Result<()> {
    let kernel = source_kernel::source_kernel(KERNEL).with_context(|| format!("no source kernel {KERNEL}"))?;
    let mut o = traced::options(Topology::CxlTest, out, tracer);
    o.kernel = Some(KernelArg::Built(kernel));
    if seed {
        o.kernel_patches.patches = vec!["seed".to_owned()];
    }
    o.workloads = WORKLOADS.to_vec();
    o.cycles = cycles;
    if !seed {
        o.userland = Userland::Debian;
        o.script = script(out, RELOAD_EXAMPLE)?;
    }
    let run = completed(&o)?;
    ensure!(run.tracer_exit == Some(1), "the tracer exited {:?}, not 1 (findings)", run.tracer_exit);
    check_cycled(&run, &WORKLOADS, cycles)?;
    if !seed {
        let said = |text: &str| run.console.iter().find(|l| l.contains(text));
        ensure!(said("cxl_test reloaded").is_some(), "the example script did not reload cxl_test (console.log)");
        let listing = said("cxl list: ").context("the example script printed no `cxl list:` line (console.log)")?;
        println!("test: guest:   examples/cxl-test-reload.sh under the tracer, Debian userland: {}", listing.trim());
    }
    let probes = traced::ground(out)?.probes;
    let report = Report::read(&out.join("findings.jsonl"))?;
    for line in judge(tracer, out, &report, probes, seed)? {
        println!("test: guest:   {line}");
    }
    Ok(())
}

/// Checks a run on cxl_test's topology (every workload of `WORKLOADS`) against what the
/// source says the stock build, or the seed-patched one, must report; returns what it
/// found, one line per check. `probes` is the kretprobe count of `cxl_mem_probe`.
pub fn judge(tracer: &Path, out: &Path, report: &Report, probes: u64, seed: bool) -> anyhow::Result<Vec<String>> {
    let mut said = Vec::new();
    report.check_clean()?;

    let groups = report.by_title();
    let want: Vec<&Expected> = STOCK.iter().filter(|e| !(seed && e.fixed_by_seed)).collect();
    let got: Vec<&str> = groups.keys().map(String::as_str).collect();
    let mut wanted: Vec<&str> = want.iter().map(|e| e.title).collect();
    wanted.sort_unstable();
    ensure!(got == wanted, "the tracer reported {got:?}, expected {wanted:?} (cxl_test.rs)");
    for e in &want {
        let found = &groups[e.title];
        let total: u64 = found.iter().map(|f| f.count).sum();
        // With the seed patch, only the RCD's read is left: root dports only.
        let dports = if seed && e.title == RCH_GAP { Dports::Root } else { e.dports };
        let roots = found.iter().any(|f| f.root);
        let ports = found.iter().any(|f| !f.root);
        let ok = match dports {
            Dports::Root => roots && !ports,
            Dports::Port => ports && !roots,
            Dports::Both => roots && ports,
        };
        ensure!(ok, "{}: root dports {roots}, port dports {ports}; expected {dports:?}", e.title);
        match (e.count, seed) {
            (Count::PerProbe, false) => ensure!(
                total == probes,
                "{}: {total} occurrence(s), but the kretprobe count of cxl_mem_probe says {probes}",
                e.title
            ),
            _ => ensure!(total > 0, "{}: no occurrence", e.title),
        }
        said.push(format!("{}: {total} ({dports:?} dports)", e.title));
    }
    if seed {
        said.push(check_rch_gap(&groups[RCH_GAP], probes)?);
    }
    let mock = &groups["unlocked-use in cxl_port_update_decoder_targets"];
    ensure!(
        mock.iter().all(|f| f.stack.iter().any(|fr| frame_function(fr) == "__mock_cxl_decoders_setup")),
        "cxl_port_update_decoder_targets reported from outside cxl_test's mock decoder setup"
    );
    traced::check_replay(tracer, out, report)?;
    said.push(check_known(tracer, out, seed)?);
    Ok(said)
}

/// With the v2 patch the RCD's probe still reads `dport->rch` without its free lock: every
/// occurrence is of a root dport, expects `&port->uport_dev->mutex`, holds the root port's
/// own lock instead (the patch's first `scoped_guard(device, &parent_port->dev)`), and they
/// are fewer than the probes (the VH memdevs' reads are gone).
fn check_rch_gap(found: &[&Finding], probes: u64) -> anyhow::Result<String> {
    let total: u64 = found.iter().map(|f| f.count).sum();
    ensure!(total < probes, "{RCH_GAP}: {total} occurrence(s) with the seed patch, not fewer than {probes} probes");
    for f in found {
        let v: Value = serde_json::from_str(&f.line).with_context(|| format!("{RCH_GAP}: not JSON: {}", f.line))?;
        let expected = v.get("expected_lock_is").and_then(Value::as_str);
        ensure!(expected == Some("&port->uport_dev->mutex"), "{RCH_GAP}: expects {expected:?}, not uport_dev's lock");
        ensure!(
            f.held_names.iter().any(|h| h == "this dport's port lock"),
            "{RCH_GAP}: the root port's own lock (the patch's guard) is not among the held locks: {:?}",
            f.held_names
        );
    }
    Ok(format!(
        "the v2 patch's RCH gap: {total} read(s) of an RCH dport's rch holding the root port's lock, not uport_dev's"
    ))
}

/// The shipped known list: the stock build's new findings are exactly what the seed patch
/// removes and the RCD read; the seed build's only new one is the RCD read.
fn check_known(tracer: &Path, out: &Path, seed: bool) -> anyhow::Result<String> {
    let list = known_list();
    let args = [OsStr::new("--known"), list.as_os_str()];
    let (report, stderr, exit) = findings::analyze_with(tracer, &out.join("trace.bin"), &args)?;
    let mut new: Vec<String> = report.findings.iter().filter(|f| f.known.is_none()).map(Finding::title_key).collect();
    new.sort();
    new.dedup();
    let mut want: Vec<&str> = STOCK.iter().filter(|e| e.fixed_by_seed || e.title == RCH_GAP).map(|e| e.title).collect();
    if seed {
        want = vec![RCH_GAP];
    }
    want.sort_unstable();
    ensure!(exit == 1, "--known {}: exit {exit}, not 1: {stderr}", list.display());
    ensure!(new == want, "--known {}: new findings {new:?}, expected {want:?}", list.display());
    Ok(format!("--known {}: exit 1, new: {}", list.display(), new.join(", ")))
}
