//! `cargo xtask vm soak --minutes N`: the racing hotplug mix under the tracer for N minutes,
//! sampling the tracer's memory and the kernel's drop counters, failing on memory growth,
//! a drop, a guest failure or a tracer crash.
//!
//! The guest runs `tracer run --record` in the background around a loop of `mix` rounds
//! (a memdev unbind/bind loop racing a cxl_acpi unbind/bind loop, then a restore and a
//! topology check) and samples, every `--interval` seconds, the tracer's VmRSS and VmHWM
//! from /proc and the size of its trace file. The trace file carries the kernel's counters
//! (a COUNTERS record every half second), so on the host the prefix of the trace written by
//! each sample time, analyzed by the same tracer build, gives the drop counters at that
//! time.
use std::{
    fs,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use super::{
    RunOptions, Topology, Workload, findings::Report, results::utc_stamp, run::execute, tracer::tracer_binary,
};
use crate::util;

#[derive(clap::Args, Clone)]
pub struct SoakOptions {
    /// How long the workload runs under the tracer, in minutes.
    #[arg(long, default_value_t = 2)]
    pub minutes: u32,
    /// The racing workload, in rounds of 10 iterations: `mix` (memdev-bind against
    /// acpi-unbind; on 6.12 it eventually oopses the kernel, see docs/vm.md) or `reload-mix`
    /// (memdev-bind against cxl-mem-reload).
    #[arg(long, value_enum, default_value = "mix")]
    pub workload: Workload,
    /// Seconds between two samples of the tracer's memory and trace size.
    #[arg(long, default_value_t = 5, value_name = "SECS")]
    pub interval: u32,
    /// The emulated CXL topology.
    #[arg(long, value_enum, default_value = "rp")]
    pub topology: Topology,
    /// Put this static tracer binary in the guest instead of building one.
    #[arg(long, value_name = "FILE")]
    pub tracer_binary: Option<PathBuf>,
    /// A module loaded in place of the stock one of the same name (e.g. the fixed
    /// cxl_mem.ko of `cargo xtask fixture cxl-mem-fixed`); repeatable.
    #[arg(long = "module", value_name = "FILE")]
    pub modules: Vec<PathBuf>,
    /// An extra argument for `tracer run` in the guest, e.g. `--tracer-arg=--ring-kib=32768`
    /// or `--tracer-arg=--max-freed-dports=1024` (repeatable).
    #[arg(long = "tracer-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub tracer_args: Vec<String>,
    /// Where the results go (default: target/vm/soak-<UTC time>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Memory growth allowed between the first and the last quarter of the run: the larger of
/// an absolute slack (allocator noise, a grown buffer) and a fraction of the first
/// quarter's median. Medians, not peaks: a sample can land on a passing allocation (the
/// module symbols re-read after a reload, a burst of events), and whether it does is chance. The engine's state
/// is capped (--max-dports and friends), so after its first quarter a run without a leak
/// stays flat within this.
const GROWTH_SLACK_KB: u64 = 2048;
const GROWTH_FRACTION: f64 = 0.10;
/// How many samples' trace prefixes are analyzed for the drop counters (spread evenly).
const COUNTER_CHECKPOINTS: usize = 24;

/// The guest side: `/vm/script SECS INTERVAL WORKLOAD [TRACER ARGS]` runs the tracer around
/// `/vm/script loop SECS WORKLOAD`.
const SOAK: &str = include_str!("../../guest/soak.sh");

/// Addresses with more than one kprobe in `/sys/kernel/debug/kprobes/list`
/// (`ADDR  k  SYMBOL+OFF  [MODULE] [FLAGS]`, one line per probe). The tracer puts the sites
/// at one instruction on one kprobe: the kernel stacks two under an aggregate kprobe, and
/// 6.12 warns in `reuse_unused_kprobe()` when a module reload re-arms such a pair.
fn stacked_kprobes(list: &str) -> Option<String> {
    let mut seen = std::collections::BTreeMap::<&str, Vec<&str>>::new();
    for line in list.lines() {
        let mut fields = line.split_whitespace();
        let (Some(addr), Some(_kind), Some(place)) = (fields.next(), fields.next(), fields.next()) else { continue };
        seen.entry(addr).or_default().push(place);
    }
    let stacked: Vec<String> = seen
        .iter()
        .filter(|(_, places)| places.len() > 1)
        .map(|(addr, places)| format!("{addr} ({} x {})", places.len(), places[0]))
        .collect();
    (!stacked.is_empty()).then(|| format!("kprobes stacked at one address: {}", stacked.join(", ")))
}

/// One sample of the tracer process in the guest.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Milliseconds since the tracer attached.
    pub ms: u64,
    pub rss_kb: u64,
    pub hwm_kb: u64,
    pub trace_bytes: u64,
}

pub struct Soak {
    pub out: PathBuf,
    pub samples: Vec<Sample>,
    /// (ms since attach, events, dropped) at each checkpoint.
    pub counters: Vec<(u64, u64, u64)>,
    pub rounds: u64,
    pub tracer_exit: i32,
    pub report: Option<Report>,
    pub elapsed: Duration,
    /// Why it failed, if it did.
    pub failures: Vec<String>,
}

pub fn command(options: &SoakOptions) -> anyhow::Result<()> {
    let soak = run(options)?;
    soak.print();
    if !soak.failures.is_empty() {
        bail!("soak failed: {}", soak.failures.join("; "));
    }
    Ok(())
}

pub fn run(options: &SoakOptions) -> anyhow::Result<Soak> {
    ensure!(options.minutes >= 1, "--minutes must be at least 1");
    ensure!(options.interval >= 1, "--interval must be at least 1 second");
    ensure!(
        options.workload.is_race(),
        "--workload {}: the soak runs a racing workload (mix or reload-mix)",
        options.workload.name()
    );
    let tracer = match &options.tracer_binary {
        Some(t) => t.clone(),
        None => tracer_binary()?,
    };
    let out = match &options.out {
        Some(out) => out.clone(),
        None => util::workspace_root().join("target/vm").join(format!("soak-{}", utc_stamp())),
    };
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for stale in ["soak-samples.txt", "soak-result.txt", "soak-workload.log", "soak.txt", "kprobes-list.txt"] {
        let _ = fs::remove_file(out.join(stale));
    }
    let script = out.join("soak.sh");
    fs::write(&script, SOAK).with_context(|| format!("writing {}", script.display()))?;
    let secs = u64::from(options.minutes) * 60;
    let mut o = RunOptions::new(options.topology);
    o.tracer_binary = Some(tracer.clone());
    o.manual_tracer = true;
    o.modules = options.modules.clone();
    o.quiet = true;
    o.out = Some(out.clone());
    o.timeout = Some(secs + 420);
    o.script = [
        script.to_string_lossy().into_owned(),
        secs.to_string(),
        options.interval.to_string(),
        options.workload.name().to_owned(),
    ]
    .into_iter()
    .chain(options.tracer_args.iter().cloned())
    .collect();
    let started = Instant::now();
    let run = execute(&o)?;
    run.print_summary();
    let mut failures = Vec::new();
    if let Some(failure) = &run.failure {
        failures.push(failure.to_string());
    }
    let result = fs::read_to_string(out.join("soak-result.txt")).unwrap_or_default();
    let field = |key: &str| {
        result.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse::<i64>().ok())
    };
    let tracer_exit = field("tracer").unwrap_or(-1) as i32;
    let rounds = field("rounds").unwrap_or(0).max(0) as u64;
    if !matches!(tracer_exit, 0 | 1) {
        failures.push(format!(
            "the tracer did not finish cleanly (exit status {tracer_exit}; 128+N is signal N): see tracer.log"
        ));
    }
    let samples = read_samples(&out.join("soak-samples.txt")).unwrap_or_else(|err| {
        failures.push(format!("{err:#}"));
        Vec::new()
    });
    if let Some(problem) = growth(&samples) {
        failures.push(problem);
    }
    match fs::read_to_string(out.join("kprobes-attached.txt")) {
        Ok(list) => failures.extend(stacked_kprobes(&list)),
        Err(err) => failures.push(format!("the guest saved no kprobes-attached.txt: {err}")),
    }
    // A guest that died (an oops) leaves no final report: the failure above says why.
    let report = match Report::read(&out.join("findings.jsonl")) {
        Ok(report) => Some(report),
        Err(err) => {
            failures.push(format!("no final report from the tracer: {err:#}"));
            None
        }
    };
    if let Some(report) = &report {
        for key in [&["dropped"][..], &["undecodable"], &["kernel_counters", "stack_lost"]] {
            let n = report.summary_u64(key)?;
            if n > 0 {
                failures.push(format!("summary.{} = {n}: events were lost", key.join(".")));
            }
        }
        // A rule-mismatch says the tracer's model is wrong for this kernel. (Use-after-free
        // findings are no failure here: with the stock driver `mix` makes the race of the
        // bug class really happen now and then; the figures report them.)
        let mismatch = report.summary_u64(&["occurrences", "rule-mismatch"])?;
        if mismatch > 0 {
            failures.push(format!("{mismatch} rule-mismatch occurrence(s): see findings.jsonl"));
        }
        // A real race carries the free that it raced with.
        for f in report.findings.iter().filter(|f| f.class == "use-after-free") {
            if f.free_stack.as_ref().is_none_or(Vec::is_empty) {
                failures.push(format!("{}: no stack of the free it raced with", f.title()));
            }
        }
    }
    let counters = checkpoints(&tracer, &out.join("trace.bin"), &samples).unwrap_or_else(|err| {
        failures.push(format!("reading the drop counters from trace.bin: {err:#}"));
        Vec::new()
    });
    if let Some((ms, _, dropped)) = counters.iter().find(|(_, _, d)| *d > 0) {
        failures.push(format!("{dropped} events dropped in the kernel by {:.0} s into the soak", *ms as f64 / 1000.0));
    }
    let soak = Soak { out, samples, counters, rounds, tracer_exit, report, elapsed: started.elapsed(), failures };
    fs::write(soak.out.join("soak.txt"), soak.figures())
        .with_context(|| format!("writing {}", soak.out.join("soak.txt").display()))?;
    Ok(soak)
}

/// Minutes of the guest suite's short soak (`cargo xtask vm soak` runs longer ones).
const SUITE_MINUTES: u32 = 1;

/// The guest suite's `soak` case: `cargo xtask vm soak --workload reload-mix` for a minute:
/// memory flat, no drop, no crash.
pub fn suite_case(out: &Path, tracer: &Path) -> anyhow::Result<()> {
    // reload-mix, not mix: mix can oops the 6.12 kernel (docs/vm.md), which would make this
    // case fail on a kernel bug now and then.
    let soak = run(&SoakOptions {
        minutes: SUITE_MINUTES,
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

fn read_samples(path: &Path) -> anyhow::Result<Vec<Sample>> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading {} (the guest never sampled the tracer)", path.display()))?;
    let samples: Vec<Sample> = text
        .lines()
        .filter_map(|l| {
            let v: Vec<u64> = l.split_whitespace().filter_map(|w| w.parse().ok()).collect();
            (v.len() == 4).then(|| Sample { ms: v[0], rss_kb: v[1], hwm_kb: v[2], trace_bytes: v[3] })
        })
        .collect();
    ensure!(
        samples.len() >= 4,
        "only {} samples of the tracer's memory in {}: too few to judge growth",
        samples.len(),
        path.display()
    );
    Ok(samples)
}

/// The memory criterion: the median VmRSS of the last quarter of the samples may exceed
/// the first quarter's median by at most max(GROWTH_SLACK_KB, GROWTH_FRACTION of it).
pub fn growth(samples: &[Sample]) -> Option<String> {
    let (first, last) = quarter_medians(samples)?;
    let allowed = GROWTH_SLACK_KB.max((first as f64 * GROWTH_FRACTION) as u64);
    (last > first + allowed).then(|| {
        format!(
            "the tracer's memory grew: median VmRSS {last} kB in the last quarter of the run, \
             {first} kB in the first (allowed: +{allowed} kB)"
        )
    })
}

/// Median VmRSS of the first and of the last quarter of the samples.
fn quarter_medians(samples: &[Sample]) -> Option<(u64, u64)> {
    if samples.is_empty() {
        return None;
    }
    let q = (samples.len() / 4).max(1);
    let median = |v: &[Sample]| {
        let mut r: Vec<u64> = v.iter().map(|s| s.rss_kb).collect();
        r.sort_unstable();
        r[(r.len() - 1) / 2]
    };
    Some((median(&samples[..q]), median(&samples[samples.len() - q..])))
}

/// Kernel drop counters and events at evenly spread samples, from the prefix of the trace
/// file written by then (a cut-off trace reads up to its last complete record).
fn checkpoints(tracer: &Path, trace: &Path, samples: &[Sample]) -> anyhow::Result<Vec<(u64, u64, u64)>> {
    let step = samples.len().div_ceil(COUNTER_CHECKPOINTS).max(1);
    let mut picks: Vec<&Sample> = samples.iter().step_by(step).collect();
    if let Some(last) = samples.last() {
        picks.push(last);
    }
    let mut out = Vec::new();
    for s in picks {
        if s.trace_bytes == 0 {
            continue;
        }
        let report = analyze_prefix(tracer, trace, s.trace_bytes)?;
        out.push((s.ms, report.summary_u64(&["events"])?, report.summary_u64(&["dropped"])?));
    }
    Ok(out)
}

/// `tracer analyze` on the first `len` bytes of `trace`, fed through a pipe.
fn analyze_prefix(tracer: &Path, trace: &Path, len: u64) -> anyhow::Result<Report> {
    let mut child = Command::new(tracer)
        .args(["analyze", "--format", "json", "/dev/stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {}", tracer.display()))?;
    let mut input = child.stdin.take().expect("piped");
    let file = fs::File::open(trace).with_context(|| format!("opening {}", trace.display()))?;
    let feeder = std::thread::spawn(move || {
        // The reader may stop early (a bad record): a broken pipe then is no error here.
        let _ = std::io::copy(&mut file.take(len), &mut input);
        let _ = input.flush();
    });
    let mut text = String::new();
    child.stdout.take().expect("piped").read_to_string(&mut text)?;
    let status = child.wait()?;
    let _ = feeder.join();
    ensure!(
        matches!(status.code(), Some(0 | 1)),
        "tracer analyze on the first {len} bytes of {} failed: {status}",
        trace.display()
    );
    Report::parse(&text)
}

impl Soak {
    pub fn figures(&self) -> String {
        let mut s = String::new();
        let rss = |v: &[Sample]| v.iter().map(|s| s.rss_kb).max().unwrap_or(0);
        let q = (self.samples.len() / 4).max(1).min(self.samples.len());
        let (first, last) = (self.samples.first(), self.samples.last());
        let secs = last.map_or(0.0, |l| l.ms as f64 / 1000.0);
        let summary = |key: &str| self.report.as_ref().and_then(|r| r.summary_u64(&[key]).ok()).unwrap_or(0);
        let events = summary("events");
        s.push_str(&format!(
            "soak: {secs:.0} s traced, {} rounds (10 racing iterations each), {events} events \
             ({:.0}/s), tracer exit {}\n",
            self.rounds,
            events as f64 / secs.max(1.0),
            self.tracer_exit
        ));
        let (m1, m4) = quarter_medians(&self.samples).unwrap_or_default();
        s.push_str(&format!(
            "soak: tracer VmRSS {} kB at the first sample, {} kB at the last, peak {} kB; \
             median {m1} kB in the first quarter, {m4} kB in the last (peaks {} and {} kB); \
             VmHWM {} kB\n",
            first.map_or(0, |f| f.rss_kb),
            last.map_or(0, |l| l.rss_kb),
            rss(&self.samples),
            rss(&self.samples[..q]),
            rss(&self.samples[self.samples.len() - q..]),
            last.map_or(0, |l| l.hwm_kb)
        ));
        s.push_str(&format!(
            "soak: trace file {} bytes; {} samples every ~{:.0} s\n",
            last.map_or(0, |l| l.trace_bytes),
            self.samples.len(),
            secs / self.samples.len().max(1) as f64
        ));
        let drops: Vec<String> =
            self.counters.iter().map(|(ms, ev, d)| format!("{:.0}s:{ev}ev/{d}", *ms as f64 / 1000.0)).collect();
        s.push_str(&format!("soak: kernel drops at checkpoints (time:events/dropped): {}\n", drops.join(" ")));
        if let Some(report) = &self.report {
            let occ = report.summary.get("occurrences").map(|v| v.to_string()).unwrap_or_default();
            s.push_str(&format!("soak: occurrences by class: {occ}\n"));
            let uaf: Vec<String> = report
                .findings
                .iter()
                .filter(|f| f.class == "use-after-free")
                .map(|f| format!("{} x{} ({})", f.site, f.count, f.comm))
                .collect();
            if !uaf.is_empty() {
                s.push_str(&format!("soak: use-after-free (the race really happened): {}\n", uaf.join(", ")));
            }
            if let Some(evicted) = report.summary.get("evicted") {
                s.push_str(&format!("soak: engine evictions: {evicted}\n"));
            }
        }
        s.push_str(&format!(
            "soak: {} in {:.0} s; results in {}\n",
            if self.failures.is_empty() { "passed" } else { "FAILED" },
            self.elapsed.as_secs_f64(),
            self.out.display()
        ));
        s
    }

    pub fn print(&self) {
        print!("{}", self.figures());
        for f in &self.failures {
            println!("soak: failure: {f}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_kprobes_at_one_address_are_named() {
        let list = "ffffffffaa1a9b14  k  cxl_region_attach_position+0x164    [OPTIMIZED]\n\
            ffffffffc07ee3bd  k  cxl_mem_probe+0x1ad  cxl_mem [OPTIMIZED]\n\
            ffffffffaa195cb6  r  delete_endpoint+0x0    \n\
            ffffffffc07ee3bd  k  cxl_mem_probe+0x1ad  cxl_mem [OPTIMIZED]\n";
        assert_eq!(
            stacked_kprobes(list).as_deref(),
            Some("kprobes stacked at one address: ffffffffc07ee3bd (2 x cxl_mem_probe+0x1ad)")
        );
        assert_eq!(stacked_kprobes(&list.lines().take(3).collect::<Vec<_>>().join("\n")), None);
    }

    fn samples(rss: &[u64]) -> Vec<Sample> {
        rss.iter()
            .enumerate()
            .map(|(i, &rss_kb)| Sample { ms: i as u64 * 5000, rss_kb, hwm_kb: rss_kb, trace_bytes: 0 })
            .collect()
    }

    #[test]
    fn flat_memory_passes_and_growth_fails() {
        assert!(growth(&samples(&[9000, 9100, 9050, 9100, 9200, 9100, 9150, 9120])).is_none());
        // Within the slack: a buffer that grew once.
        assert!(growth(&samples(&[9000, 9000, 10000, 10000, 10000, 10000, 10000, 10500])).is_none());
        // Transient peaks (a kallsyms re-read) in the last quarter only: no growth.
        assert!(growth(&samples(&[9000, 9100, 9000, 9050, 9000, 9100, 18000, 9000])).is_none());
        // Steady growth: a leak.
        let leak: Vec<u64> = (0..40).map(|i| 9000 + i * 200).collect();
        let msg = growth(&samples(&leak)).unwrap();
        assert!(msg.contains("grew"), "{msg}");
    }
}
