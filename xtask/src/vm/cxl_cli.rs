//! The `cxl-cli` workload's results on the host: the flow lines its guest script
//! (xtask/guest/cxl-cli.sh) prints, gathered per flow, shown in the run summary beside the
//! tracer's findings and added to results.ktap; and the guest-suite case that runs the flows
//! with and without the tracer and compares them flow by flow (docs/vm.md, "The cxl-cli
//! workload").
use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path, time::Duration};

use anyhow::{Context as _, ensure};

use super::{
    KernelArg, Topology, Workload,
    checks::{check_cycled, completed, passing, untraced},
    findings::{self, Finding, Report, frame_function},
    traced,
};
use crate::{debian::StockKernel, util};

/// What the guest prints before each flow's result.
const PREFIX: &str = "tracer-vm: flow ";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Skip,
    Fail,
}

impl Verdict {
    fn parse(word: &str) -> Option<Verdict> {
        match word {
            "pass" => Some(Verdict::Pass),
            "skip" => Some(Verdict::Skip),
            "fail" => Some(Verdict::Fail),
            _ => None,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Skip => "skip",
            Verdict::Fail => "fail",
        }
    }
}

/// One flow's result in one cycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowResult {
    pub name: String,
    pub verdict: Verdict,
    pub why: String,
    pub time: Option<Duration>,
}

/// The flow lines of a run's console, in order (`tracer-vm: flow NAME VERDICT: WHY (ms=N)`).
pub fn results(console: &[String]) -> Vec<FlowResult> {
    console.iter().filter_map(|line| parse(line)).collect()
}

fn parse(line: &str) -> Option<FlowResult> {
    let rest = line.strip_prefix(PREFIX)?;
    let (head, why) = rest.split_once(": ")?;
    let (name, verdict) = head.split_once(' ')?;
    let verdict = Verdict::parse(verdict)?;
    let (why, time) = match why.rsplit_once(" (ms=") {
        Some((why, ms)) => (why, ms.strip_suffix(')').and_then(|ms| ms.parse().ok()).map(Duration::from_millis)),
        None => (why, None),
    };
    Some(FlowResult { name: name.to_owned(), verdict, why: why.to_owned(), time })
}

/// A flow over every cycle of a run.
#[derive(Debug)]
pub struct Flow<'a> {
    pub name: &'a str,
    pub results: Vec<&'a FlowResult>,
}

impl Flow<'_> {
    /// Fail if any cycle failed; skip only if every cycle skipped; else pass.
    pub fn verdict(&self) -> Verdict {
        if self.results.iter().any(|r| r.verdict == Verdict::Fail) {
            Verdict::Fail
        } else if self.results.iter().all(|r| r.verdict == Verdict::Skip) {
            Verdict::Skip
        } else {
            Verdict::Pass
        }
    }

    fn count(&self, verdict: Verdict) -> usize {
        self.results.iter().filter(|r| r.verdict == verdict).count()
    }

    /// The median time of a cycle of the flow.
    pub fn median(&self) -> Option<Duration> {
        let mut times: Vec<Duration> = self.results.iter().filter_map(|r| r.time).collect();
        times.sort();
        times.get(times.len() / 2).copied()
    }

    /// What to say about it: the first failure's reason, else the last cycle's.
    fn why(&self) -> &str {
        let first_fail = self.results.iter().find(|r| r.verdict == Verdict::Fail);
        first_fail.or(self.results.last()).map_or("", |r| r.why.as_str())
    }
}

/// The flows of `results` by name, in the order they first ran.
pub fn flows(results: &[FlowResult]) -> Vec<Flow<'_>> {
    let mut out: Vec<Flow<'_>> = Vec::new();
    for r in results {
        match out.iter_mut().find(|f| f.name == r.name) {
            Some(flow) => flow.results.push(r),
            None => out.push(Flow { name: &r.name, results: vec![r] }),
        }
    }
    out
}

/// The run summary's part for a run with flows: each flow's verdict over the cycles, and
/// beside them the tracer's findings (`findings.jsonl` in `out`), if it ran.
pub fn print_summary(console: &[String], out: &Path) {
    let results = results(console);
    if results.is_empty() {
        return;
    }
    for flow in flows(&results) {
        let time = flow.median().map_or(String::new(), |t| format!(", {:.2} s per cycle", t.as_secs_f64()));
        println!(
            "vm: flow {:<15} {} ({} pass, {} skip, {} fail{time}): {}",
            flow.name,
            flow.verdict().word(),
            flow.count(Verdict::Pass),
            flow.count(Verdict::Skip),
            flow.count(Verdict::Fail),
            flow.why()
        );
    }
    let path = out.join("findings.jsonl");
    if !path.exists() {
        return;
    }
    match Report::read(&path) {
        Ok(report) if report.findings.is_empty() => println!("vm: the tracer reported no finding during the flows"),
        Ok(report) => {
            for (title, count) in finding_titles(&report) {
                println!("vm: finding {title}: {count} occurrence(s)");
            }
        }
        Err(err) => println!("vm: warning: no findings to show beside the flows: {err:#}"),
    }
}

/// The report's findings by stable title (`class in function`), with their occurrences.
fn finding_titles(report: &Report) -> BTreeMap<String, u64> {
    report.by_title().into_iter().map(|(title, groups)| (title, groups.iter().map(|f| f.count).sum())).collect()
}

/// Adds the flows to `results.ktap` in `out` as one more top-level test, `cxl-cli`, with a
/// subtest per flow (`# SKIP` with its reason for a flow that cannot apply here); writes the
/// file with only that test when the run made none (no tracer).
pub fn add_to_ktap(console: &[String], out: &Path) -> anyhow::Result<()> {
    let results = results(console);
    if results.is_empty() {
        return Ok(());
    }
    let path = out.join("results.ktap");
    let existing = fs::read_to_string(&path).ok();
    let text = with_flows(existing.as_deref(), &flows(&results))
        .with_context(|| format!("adding the cxl-cli flows to {}", path.display()))?;
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// The KTAP text `ktap` (or a new one) with the flows' test appended and the plan raised.
fn with_flows(ktap: Option<&str>, flows: &[Flow<'_>]) -> anyhow::Result<String> {
    let (mut text, tests) = match ktap {
        Some(ktap) => {
            let plan_at = ktap.lines().position(|l| l.starts_with("1..")).context("no top-level plan line (1..N)")?;
            let mut lines: Vec<String> = ktap.lines().map(str::to_owned).collect();
            let tests: usize = lines[plan_at][3..].trim().parse().context("the plan line is not 1..N")?;
            lines[plan_at] = format!("1..{}", tests + 1);
            (lines.join("\n") + "\n", tests)
        }
        None => ("KTAP version 1\n1..1\n".to_owned(), 0),
    };
    let s = &mut text;
    writeln!(s, "    KTAP version 1")?;
    writeln!(s, "    # Subtest: cxl-cli")?;
    writeln!(s, "    1..{}", flows.len())?;
    for (i, flow) in flows.iter().enumerate() {
        for r in &flow.results {
            writeln!(s, "    # {} {}: {}", r.name, r.verdict.word(), r.why)?;
        }
        match flow.verdict() {
            Verdict::Pass => writeln!(s, "    ok {} {}", i + 1, flow.name)?,
            Verdict::Skip => writeln!(s, "    ok {} {} # SKIP {}", i + 1, flow.name, flow.why())?,
            Verdict::Fail => writeln!(s, "    not ok {} {}", i + 1, flow.name)?,
        }
    }
    let failed = flows.iter().any(|f| f.verdict() == Verdict::Fail);
    writeln!(s, "{} {} cxl-cli", if failed { "not ok" } else { "ok" }, tests + 1)?;
    Ok(text)
}

/// The flows a stock kernel in a VM cannot run: it cannot commit a region.
const NEED_COMMIT: [&str; 3] = ["region-create", "region-disable", "region-destroy"];
/// Every flow of cxl-cli.sh, in its order.
const FLOWS: [&str; 7] =
    ["topology", "memdev-toggle", "port-toggle", "region-create", "region-disable", "region-destroy", "bus-teardown"];

/// What the cxl-cli flows make the tracer report on stock 7.2, rp topology, by stable
/// title, and how often: each memdev probe (`enable-memdev`, `enable-port -m`, and the
/// kworker's re-probe once the bus is back: three a cycle) reports `cxl_mem_probe`'s two
/// findings (expect.rs, KERNEL_7_2) and the core's `cxl_add_ep`; each `disable-bus` erases
/// the root's one dport (QEMU's one host bridge) without the root port's lock. The first two
/// are what the seed's fix removes; the others are in known/7.2.known.
pub const EXPECTED_7_2: [(&str, Per); 4] = [
    ("unlocked-use in cxl_mem_probe (read of dport->rch)", Per::Probe),
    ("stale-use in devm_cxl_add_endpoint", Per::Probe),
    ("unlocked-use in cxl_add_ep", Per::Probe),
    ("unlocked-erase in cxl_dport_remove", Per::BusTeardown),
];

/// What a finding of the flows is counted against.
#[derive(Clone, Copy, Debug)]
pub enum Per {
    /// A memdev probe (the kretprobe count of `cxl_mem_probe`).
    Probe,
    /// A `disable-bus` of the rp topology's root, which has one dport.
    BusTeardown,
}

/// The guest-suite case: the cxl-cli workload on stock `kernel` (rp), `cycles` cycles,
/// without the tracer and then under it. Every flow must have the same verdict in both (a
/// flow that fails only with the tracer attached is the tracer's failure), none may fail,
/// and the region flows must skip (a stock kernel cannot commit in a VM) while the others
/// pass. Under the tracer: nothing lost, no use-after-free or rule-mismatch, exactly the
/// findings of `EXPECTED_7_2`, each as often as its cause (memdev probes counted by a
/// kretprobe), and the shipped known list leaving only `cxl_mem_probe`'s new.
pub fn suite_case(out: &Path, tracer: &Path, kernel: &'static StockKernel, cycles: u32) -> anyhow::Result<()> {
    let workloads = [Workload::CxlCli];
    let mut bare = untraced(Topology::Rp, &out.join("untraced"));
    bare.kernel = Some(KernelArg::Stock(kernel));
    bare.workloads = workloads.to_vec();
    bare.cycles = cycles;
    let bare_run = passing(&bare)?;
    check_cycled(&bare_run, &workloads, cycles)?;

    let traced_out = out.join("traced");
    let mut traced = traced::options(Topology::Rp, &traced_out, tracer);
    traced.kernel = Some(KernelArg::Stock(kernel));
    traced.workloads = workloads.to_vec();
    traced.cycles = cycles;
    let traced_run = completed(&traced)?;
    check_cycled(&traced_run, &workloads, cycles)?;

    let (a, b) = (results(&bare_run.console), results(&traced_run.console));
    compare(&flows(&a), &flows(&b), cycles)?;

    let probes = traced::ground(&traced_out)?.probes;
    ensure!(probes >= 3 * u64::from(cycles), "{probes} memdev probes counted, fewer than 3 a cycle");
    let report = Report::read(&traced_out.join("findings.jsonl"))?;
    report.check_clean()?;
    let titles = finding_titles(&report);
    let got: Vec<&str> = titles.keys().map(String::as_str).collect();
    let mut want: Vec<&str> = EXPECTED_7_2.iter().map(|(t, _)| *t).collect();
    want.sort_unstable();
    ensure!(got == want, "the tracer reported {got:?} during the cxl-cli flows, expected {want:?} (EXPECTED_7_2)");
    for (title, per) in EXPECTED_7_2 {
        let (expected, truth) = match per {
            Per::Probe => (probes, "the kretprobe count of cxl_mem_probe"),
            Per::BusTeardown => (u64::from(cycles), "one root dport erased per disable-bus, one a cycle"),
        };
        let count = titles[title];
        ensure!(count == expected, "{title}: {count} occurrence(s), but {truth} says {expected}");
        println!("test: guest:   finding {title}: {count} = {truth}");
    }
    check_known(tracer, &traced_out, kernel)?;
    check_ktap(&traced_out, &report)
}

/// Each flow ran every cycle in both runs, with the same verdict, and none failed; the
/// region flows skipped (no commit on a stock kernel in a VM), the others passed.
fn compare(bare: &[Flow<'_>], traced: &[Flow<'_>], cycles: u32) -> anyhow::Result<()> {
    for name in FLOWS {
        let find = |flows: &[Flow<'_>], run: &str| -> anyhow::Result<Verdict> {
            let flow = flows.iter().find(|f| f.name == name).with_context(|| format!("flow {name} never ran {run}"))?;
            ensure!(
                flow.results.len() == cycles as usize,
                "flow {name} ran {} times {run}, not once per cycle ({cycles})",
                flow.results.len()
            );
            Ok(flow.verdict())
        };
        let (without, with) = (find(bare, "without the tracer")?, find(traced, "under the tracer")?);
        ensure!(
            !(with == Verdict::Fail && without == Verdict::Pass),
            "flow {name} fails under the tracer but passes without it: a failure of the tracer ({})",
            traced.iter().find(|f| f.name == name).map_or("", |f| f.why())
        );
        ensure!(without == with, "flow {name}: {} without the tracer, {} under it", without.word(), with.word());
        let want = if NEED_COMMIT.contains(&name) { Verdict::Skip } else { Verdict::Pass };
        ensure!(
            with == want,
            "flow {name}: {} with and without the tracer, expected {} on a stock kernel ({})",
            with.word(),
            want.word(),
            traced.iter().find(|f| f.name == name).map_or("", |f| f.why())
        );
        let median = |flows: &[Flow<'_>]| {
            flows.iter().find(|f| f.name == name).and_then(Flow::median).map_or(0.0, |t| t.as_secs_f64())
        };
        println!(
            "test: guest:   flow {name}: {} without and under the tracer ({:.2} s / {:.2} s per cycle)",
            with.word(),
            median(bare),
            median(traced)
        );
    }
    Ok(())
}

/// The shipped known list makes only `cxl_mem_probe`'s findings new (the core's are known).
fn check_known(tracer: &Path, out: &Path, kernel: &StockKernel) -> anyhow::Result<()> {
    let list = util::workspace_root().join("known").join(format!("{}.known", kernel.name));
    let args = [std::ffi::OsStr::new("--known"), list.as_os_str()];
    let (report, stderr, exit) = findings::analyze_with(tracer, &out.join("trace.bin"), &args)?;
    let new: Vec<&Finding> = report.findings.iter().filter(|f| f.known.is_none()).collect();
    ensure!(exit == 1, "--known {}: exit {exit}, not 1 (stock cxl_mem findings are new): {stderr}", list.display());
    let foreign: Vec<String> = new
        .iter()
        .filter(|f| !f.stack.iter().take(2).any(|fr| frame_function(fr) == "cxl_mem_probe"))
        .map(|f| f.title())
        .collect();
    ensure!(foreign.is_empty(), "--known {}: new findings not cxl_mem_probe's: {foreign:?}", list.display());
    println!(
        "test: guest:   --known {}: {} finding group(s) known, {} new, all cxl_mem_probe's",
        list.display(),
        report.findings.len() - new.len(),
        new.len()
    );
    Ok(())
}

/// results.ktap has the tracer's tests and the flows' test after them, passing.
fn check_ktap(out: &Path, report: &Report) -> anyhow::Result<()> {
    let path = out.join("results.ktap");
    let ktap = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let plan: usize = ktap
        .lines()
        .find_map(|l| l.strip_prefix("1.."))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("{} has no plan", path.display()))?;
    let last = ktap.lines().rev().find(|l| l.starts_with("ok ") || l.starts_with("not ok ")).unwrap_or("");
    ensure!(
        last == format!("ok {plan} cxl-cli"),
        "{}: the last test is {last:?}, not `ok {plan} cxl-cli`",
        path.display()
    );
    ensure!(!report.findings.is_empty(), "no finding to check results.ktap against");
    println!("test: guest:   results.ktap: the tracer's tests, then `ok {plan} cxl-cli` with a subtest per flow");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console() -> Vec<String> {
        [
            "tracer-vm: workload cxl-cli: 2 cycles from roots=1",
            "tracer-vm: flow topology pass: cxl list matches sysfs (ms=1801)",
            "[   12.0] some kernel line",
            "tracer-vm: flow region-create skip: this kernel cannot commit (ms=7)",
            "tracer-vm: flow topology fail: cxl list disagrees with sysfs: ports 1, 2 (ms=2000)",
            "tracer-vm: flow region-create skip: this kernel cannot commit (ms=9)",
            "tracer-vm: flow nonsense",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    #[test]
    fn flow_lines_are_parsed_and_gathered() {
        let results = results(&console());
        assert_eq!(results.len(), 4);
        assert_eq!(results[0].time, Some(Duration::from_millis(1801)));
        assert_eq!(results[2].why, "cxl list disagrees with sysfs: ports 1, 2");
        let flows = flows(&results);
        assert_eq!(flows.iter().map(|f| f.name).collect::<Vec<_>>(), ["topology", "region-create"]);
        assert_eq!(flows[0].verdict(), Verdict::Fail);
        assert_eq!(flows[0].why(), "cxl list disagrees with sysfs: ports 1, 2");
        assert_eq!(flows[1].verdict(), Verdict::Skip);
        assert_eq!(flows[1].median(), Some(Duration::from_millis(9)));
    }

    #[test]
    fn a_flow_that_passed_once_and_skipped_once_passes() {
        let pass = FlowResult { name: "x".into(), verdict: Verdict::Pass, why: String::new(), time: None };
        let skip = FlowResult { verdict: Verdict::Skip, ..pass.clone() };
        assert_eq!(Flow { name: "x", results: vec![&pass, &skip] }.verdict(), Verdict::Pass);
    }

    #[test]
    fn the_flows_extend_the_tracers_ktap() {
        let results = results(&console());
        let tracer = "KTAP version 1\n# tracer: 3 events\n1..2\nok 1 unlocked-use\nok 2 lost-events\n";
        let ktap = with_flows(Some(tracer), &flows(&results)).unwrap();
        assert!(ktap.starts_with("KTAP version 1\n# tracer: 3 events\n1..3\nok 1 unlocked-use\n"), "{ktap}");
        assert!(ktap.contains("    1..2\n"), "{ktap}");
        assert!(ktap.contains("    not ok 1 topology\n"), "{ktap}");
        assert!(ktap.contains("    ok 2 region-create # SKIP this kernel cannot commit\n"), "{ktap}");
        assert!(ktap.ends_with("not ok 3 cxl-cli\n"), "{ktap}");
        let alone = with_flows(None, &flows(&results)).unwrap();
        assert!(
            alone.starts_with("KTAP version 1\n1..1\n    KTAP version 1\n") && alone.ends_with("not ok 1 cxl-cli\n")
        );
    }

    #[test]
    fn the_guest_script_runs_every_flow_the_host_expects() {
        let script = include_str!("../../guest/cxl-cli.sh");
        let order = script
            .lines()
            .find_map(|l| l.strip_prefix("for f in ").and_then(|l| l.strip_suffix("; do")))
            .expect("cxl-cli.sh's loop over its flows");
        assert_eq!(order.split(' ').collect::<Vec<_>>(), FLOWS);
        for name in FLOWS {
            assert!(script.contains(&format!("\t{name}) flow_")), "cxl-cli.sh does not dispatch {name}");
        }
    }
}
