//! The bench's figures, computed from the raw lines, and its tables: one per kernel.
//!
//! Guest figures are compared within the run: each mode's time per operation is divided by
//! the no-tracer reference *of the same repetition* (the geometric mean of its A/A pair,
//! which ran next to it), and the costs, bounds and verdicts come from `stats.rs`. A cost
//! per hooked call in host nanoseconds is the relative cost times the same loop's time per
//! operation natively on the host, over the calls per operation the guest kernel counted.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use super::{
    CHURN_RESULTS, CRITERION_RESULTS, FREE_COUNT, HOST_RESULTS, Line, META, guest_dir,
    stats::{self, Cost, LoopStats, Sample, Verdict},
};
use crate::vm::findings;

/// The host the bench ran on.
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub mem_gib: f64,
    pub kernel: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|v| v.split_once(':'))
            .map_or("unknown CPU".to_owned(), |(_, v)| v.trim().to_owned());
        let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
        let mem_kb = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .map(|v| v.trim().trim_end_matches("kB").trim().to_owned())
            })
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
        Machine { cpu, cpus, mem_gib: mem_kb / 1024.0 / 1024.0, kernel }
    }

    pub fn line(&self) -> String {
        format!("host: {} × {}, {:.1} GiB, Linux {}", self.cpus, self.cpu, self.mem_gib, self.kernel)
    }
}

/// How busy the shared machine was: load averages and other QEMU processes.
#[derive(Clone)]
pub struct Load {
    pub loadavg: String,
    pub other_qemus: usize,
}

impl Load {
    pub fn sample() -> Load {
        let loadavg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let loadavg = loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
        let other_qemus = fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
                    .filter(|e| {
                        fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim().starts_with("qemu-system"))
                    })
                    .count()
            })
            .unwrap_or(0);
        Load { loadavg, other_qemus }
    }

    pub fn describe(&self) -> String {
        format!("load average {}, {} other QEMU process(es)", self.loadavg, self.other_qemus)
    }
}

/// One kernel's guest boot, read back.
struct Guest {
    /// The matrix name (`6.12`) and `uname -r`.
    name: String,
    release: String,
    dir: PathBuf,
    lines: Vec<Line>,
    samples: Vec<Sample>,
    /// Why its boot failed, when it did.
    failed: Option<String>,
}

/// Everything a results directory holds, read back.
pub struct Report {
    out: PathBuf,
    /// `meta.txt`: `key text` lines (machine, load-start, load-end, modes, ...).
    meta: BTreeMap<String, String>,
    modes: Vec<String>,
    guests: Vec<Guest>,
    host: Vec<Line>,
    churn: Vec<Line>,
    soak: Option<String>,
    criterion: Vec<Line>,
}

fn read_lines(path: &Path) -> anyhow::Result<Vec<Line>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().filter_map(Line::parse).collect())
}

impl Report {
    pub fn load(out: &Path) -> anyhow::Result<Report> {
        let meta_text =
            fs::read_to_string(out.join(META)).with_context(|| format!("reading {}", out.join(META).display()))?;
        let meta: BTreeMap<String, String> =
            meta_text.lines().filter_map(|l| l.split_once(' ')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        let modes = meta.get("modes").map(|m| m.split_whitespace().map(str::to_owned).collect()).unwrap_or_default();
        // Results from before the kernel matrix have one `guest/` directory, on 6.12.
        let kernels: Vec<(String, PathBuf)> = match meta.get("kernels") {
            Some(k) => k.split_whitespace().map(|k| (k.to_owned(), out.join(guest_dir(k)))).collect(),
            None => vec![("6.12".to_owned(), out.join("guest"))],
        };
        let mut guests = Vec::new();
        for (name, dir) in kernels {
            let failed = meta.get(&format!("guest-failed-{name}")).cloned();
            let results = dir.join("bench-results.txt");
            // A failed boot may have left part of its results; a good one must have them all.
            let text = match fs::read_to_string(&results) {
                Ok(text) => text,
                Err(_) if failed.is_some() => String::new(),
                Err(e) => return Err(e).with_context(|| format!("reading {}", results.display())),
            };
            guests.push(Guest {
                release: meta.get(&format!("release-{name}")).cloned().unwrap_or_else(|| name.clone()),
                name,
                dir,
                lines: text.lines().filter_map(Line::parse).collect(),
                samples: stats::samples(&text),
                failed,
            });
        }
        let criterion_path = out.join(CRITERION_RESULTS);
        Ok(Report {
            out: out.to_owned(),
            meta,
            modes,
            guests,
            host: read_lines(&out.join(HOST_RESULTS))?,
            churn: read_lines(&out.join(CHURN_RESULTS))?,
            soak: fs::read_to_string(out.join("soak/soak.txt")).ok(),
            criterion: if criterion_path.is_file() { read_lines(&criterion_path)? } else { Vec::new() },
        })
    }

    fn churn_figures(&self) -> ChurnFigures {
        let head = self.churn.iter().find(|l| l.kind == "churn");
        let field = |k: &str| head.and_then(|h| h.num(k)).unwrap_or(0.0);
        let samples: Vec<(u64, u64)> = self
            .churn
            .iter()
            .filter(|l| l.kind == "sample")
            .filter_map(|l| Some((l.num("dports")? as u64, l.num("rss_kb")? as u64)))
            .collect();
        let q = (samples.len() / 4).max(1);
        let peak = |part: &[(u64, u64)]| part.iter().map(|x| x.1).max().unwrap_or(0);
        ChurnFigures {
            dports: field("dports") as u64,
            events: field("events") as u64,
            hwm_kb: field("hwm_kb") as u64,
            secs: head.and_then(|h| h.get("secs")).unwrap_or("?").to_owned(),
            evicted: field("evicted") as u64,
            first_quarter_kb: peak(&samples[..q.min(samples.len())]),
            last_quarter_kb: peak(&samples[samples.len().saturating_sub(q)..]),
            samples,
        }
    }

    fn meta(&self, key: &str) -> &str {
        self.meta.get(key).map_or("?", String::as_str)
    }

    /// The host's native time per operation of a loop (median of the calibration runs).
    fn host_ns(&self, lp: &str) -> Option<f64> {
        stats::median(self.host.iter().filter(|l| l.kind == lp).filter_map(|l| l.num("ns_per_op")).collect())
    }
}

struct ChurnFigures {
    dports: u64,
    events: u64,
    hwm_kb: u64,
    secs: String,
    evicted: u64,
    first_quarter_kb: u64,
    last_quarter_kb: u64,
    /// (dports fed, VmRSS kB).
    samples: Vec<(u64, u64)>,
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".to_owned(), |v| format!("{v:.digits$}"))
}

fn met(ok: bool) -> &'static str {
    if ok { Verdict::Met.describe() } else { Verdict::NotMet.describe() }
}

fn pct(x: f64) -> String {
    format!("{:+.2} %", x * 100.0)
}

/// A cost and its bounds in percent: `+0.21 % (−0.40…+0.81)`.
fn pct_bounds(c: &Cost) -> String {
    format!("{} ({:+.2}…{:+.2})", pct(c.cost), c.lo * 100.0, c.hi * 100.0)
}

/// The hot-path loops: what each hammers, and how it is named in the table.
const LOOPS: [(&str, &str, &str); 2] = [
    ("pipe", "mutex_lock + mutex_unlock", "1-byte pipe write + read (pipe->mutex)"),
    ("select", "kfree", "select on 1024 fds, empty sets (bitmap kvmalloc + kfree)"),
];

/// One hot-path loop on one kernel.
struct LoopRow {
    name: &'static str,
    calls: &'static str,
    what: &'static str,
    stats: LoopStats,
    calls_per_op: Option<f64>,
    host_ns: Option<f64>,
}

impl LoopRow {
    /// Host nanoseconds per hooked call of a relative cost.
    fn per_call(&self, cost: f64) -> Option<f64> {
        Some(cost * self.host_ns? / self.calls_per_op.filter(|c| *c > 0.0)?)
    }

    /// `+0.1 ns/call (−0.2…+0.4)`.
    fn per_call_bounds(&self, c: &Cost) -> String {
        match (self.per_call(c.cost), self.per_call(c.lo), self.per_call(c.hi)) {
            (Some(m), Some(lo), Some(hi)) => format!("{m:+.1} ns/call ({lo:+.1}…{hi:+.1})"),
            _ => "ns/call not known".to_owned(),
        }
    }
}

/// What the tracer runs of one kernel printed about attach points outside CXL and devres
/// code: per kind of run (default options, or `--lock-events global`), how many runs and
/// the distinct points they listed.
#[derive(Default)]
struct AttachPoints {
    runs: BTreeMap<&'static str, usize>,
    points: BTreeMap<&'static str, BTreeSet<String>>,
    /// The tracer's `kernel profile:` line (how frees are seen).
    profile: Option<String>,
}

/// A tracer run's discovery and attach lines: `..., 108 deref sites in 24 functions, ...`
/// and `tracer: 450 kprobes attached in 61.2s`.
#[derive(Debug, PartialEq)]
struct AttachSummary {
    deref_sites: u64,
    deref_functions: u64,
    kprobes: u64,
    attach_secs: f64,
}

impl AttachSummary {
    fn parse(log: &str) -> Option<AttachSummary> {
        let discovery = log.lines().find(|l| l.contains(" deref sites in "))?;
        let (before, after) = discovery.split_once(" deref sites in ")?;
        let deref_sites = before.rsplit(' ').next()?.parse().ok()?;
        let deref_functions = after.split(' ').next()?.parse().ok()?;
        let attached = log.lines().find_map(|l| l.strip_prefix("tracer: ")?.split_once(" kprobes attached in "))?;
        Some(AttachSummary {
            deref_sites,
            deref_functions,
            kprobes: attached.0.parse().ok()?,
            // `61.2s (452 sites)`: sites at one instruction share a kprobe.
            attach_secs: parse_duration_secs(attached.1.split_whitespace().next()?)?,
        })
    }
}

/// A Rust `Debug` duration as the tracer prints it: `61.2s`, `850.3ms`.
fn parse_duration_secs(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(us) = text.strip_suffix("µs") {
        (us, 1e-6)
    } else {
        (text.strip_suffix('s')?, 1.0)
    };
    Some(number.parse::<f64>().ok()? * scale)
}

const ATTACH_POINT: &str = "tracer: attach point outside CXL and devres code: ";
/// The guest mode that runs the tracer with `--no-derefs`, for the hotplug workloads only.
const NODEREFS: &str = "noderefs";
const PROFILE: &str = "tracer: kernel profile: ";

impl Guest {
    fn loop_rows(&self, report: &Report) -> Vec<LoopRow> {
        stats::all_loops(&self.samples)
            .into_iter()
            .filter_map(|(name, stats)| {
                let (_, calls, what) = LOOPS.iter().find(|l| l.0 == name)?;
                Some(LoopRow {
                    name,
                    calls,
                    what,
                    stats,
                    calls_per_op: self.calls_per_op(name),
                    host_ns: report.host_ns(name),
                })
            })
            .collect()
    }

    /// Hooked calls per operation of a loop, counted by the guest kernel.
    fn calls_per_op(&self, lp: &str) -> Option<f64> {
        let l = self.lines.iter().find(|l| l.kind == "calls" && l.get("loop") == Some(lp))?;
        let ops = l.num("ops")?;
        let calls = match lp {
            "pipe" => l.num("mutex_lock")? + l.num("mutex_unlock")?,
            _ => l.num("kfree")?,
        };
        Some(calls / ops)
    }

    /// The tracer's report of a guest run tagged `tag` (`tracer-1`, `cap-tiny`, ...).
    fn summary(&self, tag: &str) -> anyhow::Result<findings::Report> {
        findings::Report::read(&self.dir.join(format!("{tag}.jsonl")))
    }

    fn reps(&self) -> (usize, usize) {
        let reps =
            |kind: &str| self.lines.iter().filter(|l| l.kind == "repetition" && l.get("kind") == Some(kind)).count();
        let (full, extra) = (reps("full"), reps("extra"));
        if full == 0 {
            // Results from before adaptive repetitions: count the repetitions the loops ran.
            let mut seen: Vec<&str> =
                self.lines.iter().filter(|l| l.kind == "loop").filter_map(|l| l.get("rep")).collect();
            seen.sort_unstable();
            seen.dedup();
            return (seen.len(), 0);
        }
        (full, extra)
    }

    fn decision(&self) -> Option<String> {
        let text = fs::read_to_string(self.dir.join("decision.txt")).ok()?;
        let first = text.lines().next()?;
        Some(first.strip_prefix("enough ").unwrap_or(first).to_owned())
    }

    /// What the tracer run tagged `tag` said of its discovery and attaching.
    fn attach_summary(&self, tag: &str) -> Option<AttachSummary> {
        AttachSummary::parse(&fs::read_to_string(self.dir.join(format!("{tag}.log"))).ok()?)
    }

    fn attach_points(&self) -> AttachPoints {
        let mut a = AttachPoints::default();
        let Ok(dir) = fs::read_dir(&self.dir) else { return a };
        let mut logs: Vec<PathBuf> = dir
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        for log in logs {
            let Ok(text) = fs::read_to_string(&log) else { continue };
            // Only the tracer's own logs (bpftrace's say nothing of the kind).
            if !text.contains(PROFILE) {
                continue;
            }
            let name = log.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let kind = if name.starts_with("global") {
                "tracer --lock-events global"
            } else if name.starts_with(NODEREFS) {
                "tracer --no-derefs"
            } else {
                "tracer"
            };
            *a.runs.entry(kind).or_default() += 1;
            let points = a.points.entry(kind).or_default();
            for line in text.lines() {
                if let Some(p) = line.strip_prefix(ATTACH_POINT) {
                    points.insert(p.to_owned());
                }
                if kind == "tracer"
                    && a.profile.is_none()
                    && let Some(p) = line.strip_prefix(PROFILE)
                {
                    a.profile = Some(p.to_owned());
                }
            }
        }
        a
    }

    /// What the kernel said was attached to a hot function while the tracer ran:
    /// (kprobes on it, ftrace users of it, whether the kmem:kfree tracepoint was enabled).
    fn hot(&self, function: &str) -> Option<(u64, u64, u64)> {
        let l = self.lines.iter().find(|l| l.kind == "hot" && l.get("function") == Some(function))?;
        Some((l.num("kprobes")? as u64, l.num("ftrace_users")? as u64, l.num("tracepoint_enabled")? as u64))
    }

    /// Each BPF program's statistics once (a process can hold several descriptors of one
    /// program): (mode, phase, program id) → (program type, runs, run time ns). Each phase
    /// ran with the statistics on from zero (a new process, or counts enabled only then).
    fn prog_stats(&self) -> BTreeMap<(String, String, String), (String, f64, f64)> {
        self.lines
            .iter()
            .filter(|l| l.kind == "progstats")
            .filter_map(|l| {
                Some((
                    (
                        l.get("mode")?.to_owned(),
                        l.get("phase").unwrap_or("load").to_owned(),
                        l.get("prog_id")?.to_owned(),
                    ),
                    (l.get("prog_type")?.to_owned(), l.num("run_cnt")?, l.num("run_time_ns")?),
                ))
            })
            .collect()
    }

    /// Runs of a mode's BPF programs in a phase, summed over its programs.
    fn prog_runs(&self, mode: &str, phase: &str) -> Option<u64> {
        let runs: Vec<f64> = self
            .prog_stats()
            .into_iter()
            .filter(|((m, p, _), _)| m == mode && p == phase)
            .map(|(_, (_, n, _))| n)
            .collect();
        (!runs.is_empty()).then(|| runs.iter().sum::<f64>() as u64)
    }

    /// Hooked calls the loops of the stats phase made (ops counted by the loop, calls per
    /// op by the kernel earlier).
    fn stats_calls(&self, mode: &str, lp: &str) -> Option<f64> {
        let l = self
            .lines
            .iter()
            .find(|l| l.kind == "statsloop" && l.get("mode") == Some(mode) && l.get("loop") == Some(lp))?;
        Some(l.num("ops")? * self.calls_per_op(lp)?)
    }

    /// The `freecount` line of the trace of tracer run `tag`.
    fn free_count(&self, tag: &str) -> Option<Line> {
        read_lines(&self.dir.join(FREE_COUNT))
            .ok()?
            .into_iter()
            .find(|l| l.kind == "freecount" && l.get("tag") == Some(tag))
    }
}

impl Report {
    pub fn render(&self) -> anyhow::Result<String> {
        let mut s = String::new();
        writeln!(s)?;
        writeln!(s, "## cargo xtask bench")?;
        writeln!(s)?;
        writeln!(s, "- {}", self.meta("machine"))?;
        writeln!(
            s,
            "- guest: QEMU TCG (no KVM), 2 vCPUs, topology rp; one boot per kernel ({}); modes {} in turn, their order rotated each repetition",
            self.guests
                .iter()
                .map(|g| format!("{}: {} s", g.name, self.meta(&format!("guest-boot-secs-{}", g.name))))
                .collect::<Vec<_>>()
                .join(", "),
            self.modes.iter().map(|m| mode_name(m)).collect::<Vec<_>>().join(", "),
        )?;
        writeln!(s, "- machine load: at the start {}; at the end {}", self.meta("load-start"), self.meta("load-end"))?;
        writeln!(s)?;
        let mut targets: Vec<(String, Vec<String>)> = Vec::new();
        for g in &self.guests {
            targets.push((format!("Linux {}", g.release), self.render_guest(&mut s, g)?));
        }
        let host_kfree = self.host_kfree();
        self.render_host_kfree(&mut s, &host_kfree)?;
        self.render_memory(&mut s)?;
        let replay = self.criterion.iter().find(|l| l.kind == "criterion").and_then(|l| l.num("events_per_sec"));
        if let Some(rate) = replay {
            writeln!(s, "### Engine replay (criterion, host)")?;
            writeln!(s)?;
            writeln!(s, "`cargo bench -p tracer --bench replay`: **{:.1} million events/s**", rate / 1e6)?;
            writeln!(s)?;
        }
        targets.push(("host".to_owned(), self.host_targets(replay)));

        writeln!(s, "### Targets")?;
        writeln!(s)?;
        for (what, lines) in &targets {
            writeln!(s, "{what}:")?;
            writeln!(s)?;
            for line in lines {
                writeln!(s, "- {line}")?;
            }
            writeln!(s)?;
        }
        writeln!(s, "bench took {} s; raw figures in {}", self.meta("elapsed-secs"), self.out.display())?;
        Ok(s)
    }

    /// One kernel's sections; returns its target lines.
    fn render_guest(&self, s: &mut String, g: &Guest) -> anyhow::Result<Vec<String>> {
        writeln!(s, "### Linux {} (`--kernel {}`)", g.release, g.name)?;
        writeln!(s)?;
        if let Some(why) = &g.failed {
            writeln!(s, "**The guest bench failed on this kernel**: {why}")?;
            writeln!(s)?;
            if g.samples.is_empty() {
                return Ok(vec![format!("not measured: the guest bench failed ({why})")]);
            }
        }
        let (full, extra) = g.reps();
        let decision = g.decision().map_or(String::new(), |d| format!("; stopped because {d}"));
        writeln!(
            s,
            "{} repetitions: {full} of every mode (the first with the hotplug workloads), {extra} more of the loops with the modes an open target needed{decision}.",
            full + extra
        )?;
        writeln!(s)?;
        let rows = g.loop_rows(self);
        self.render_loops(s, g, &rows)?;
        self.render_attach(s, g, &rows)?;
        self.render_prog_stats(s, g)?;
        self.render_capacity(s, g, &rows)?;
        self.render_workloads(s, g)?;
        let frees = self.render_frees(s, g)?;
        self.targets(g, &rows, frees)
    }

    fn render_loops(&self, s: &mut String, g: &Guest, rows: &[LoopRow]) -> anyhow::Result<()> {
        writeln!(s, "#### Untracked hot calls")?;
        writeln!(s)?;
        let others: Vec<&String> = self.modes.iter().filter(|m| *m != stats::NONE && *m != stats::NONE_B).collect();
        let mut header =
            "| loop | hooked calls/op | no tracer: guest ns/op, host ns/op | A/A noise floor (B/A per repetition) |"
                .to_owned();
        for m in &others {
            write!(header, " {} |", mode_name(m))?;
        }
        writeln!(s, "{header}")?;
        writeln!(s, "|{}", "---|".repeat(4 + others.len()))?;
        for r in rows {
            let floor = match &r.stats.floor {
                Some(f) => format!(
                    "±{:.2} % ({})",
                    f.resolution * 100.0,
                    f.ratios.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(" ")
                ),
                None => "–".to_owned(),
            };
            let mut row = format!(
                "| {} | {} {} | {}, {} | {floor} |",
                r.what,
                fmt_opt(r.calls_per_op, 2),
                r.calls,
                fmt_opt(r.stats.reference_ns, 0),
                fmt_opt(r.host_ns, 0)
            );
            for m in &others {
                match r.stats.costs.get(m.as_str()) {
                    Some(c) => write!(row, " {}; {} (n={}) |", pct_bounds(c), r.per_call_bounds(c), c.n)?,
                    None => row.push_str(" – |"),
                }
            }
            writeln!(s, "{row}")?;
        }
        writeln!(s)?;
        writeln!(
            s,
            "Each loop run alternates blocks of its operation with blocks of a control (`getppid`) timed in the same milliseconds; a run's figure is its time per operation over the control's, which takes out most of the host's load on the emulated CPU. Each cost is the mode's figure over the same repetition's no-tracer reference (the geometric mean of the A/A pair), with one-sided 95 % bounds over the repetitions (Student's t; the spread used is the larger of the mode's own and the A/A pair's). The A/A floor is the half-width such a bound has for a mode that costs nothing, from the spread of B over A. Per call: the relative cost × the loop's native host ns/op ÷ hooked calls per op (counted by the guest kernel with kprobe events and kmem:kfree hist triggers)."
        )?;
        if let Some(c) = g.lines.iter().find(|l| l.kind == "calls" && l.get("loop") == Some("control")) {
            let per = |k: &str| c.num(k).zip(c.num("ops")).map(|(n, ops)| n / ops);
            writeln!(
                s,
                "The control made {} mutex_lock, {} mutex_unlock and {} kfree calls per operation.",
                fmt_opt(per("mutex_lock"), 4),
                fmt_opt(per("mutex_unlock"), 4),
                fmt_opt(per("kfree"), 4)
            )?;
        }
        writeln!(s)?;
        Ok(())
    }

    fn render_attach(&self, s: &mut String, g: &Guest, rows: &[LoopRow]) -> anyhow::Result<()> {
        writeln!(s, "#### What is attached outside CXL and devres code")?;
        writeln!(s)?;
        let a = g.attach_points();
        if let Some(p) = &a.profile {
            writeln!(s, "- the tracer's kernel profile: {p}")?;
        }
        for (kind, runs) in &a.runs {
            let points = &a.points[kind];
            if points.is_empty() {
                writeln!(s, "- {kind} ({runs} run(s)): attach points outside CXL and devres code: **none**")?;
            } else {
                writeln!(s, "- {kind} ({runs} run(s)): attach points outside CXL and devres code:")?;
                for p in points {
                    writeln!(s, "  - {p}")?;
                }
            }
        }
        let hot: Vec<String> = ["mutex_lock", "mutex_unlock", "kfree"]
            .iter()
            .filter_map(|f| g.hot(f).map(|(k, t, _)| format!("{f}: {k} kprobe(s), {t} ftrace user(s)")))
            .collect();
        if !hot.is_empty() {
            let tp = g.hot("kfree").map_or("?".to_owned(), |h| h.2.to_string());
            writeln!(
                s,
                "- the guest kernel with the tracer attached (`/sys/kernel/debug/kprobes/list`, `enabled_functions`): {}; kmem:kfree tracepoint enabled: {tp}",
                hot.join(", ")
            )?;
        }
        if let Some(runs) = g.prog_runs(stats::TRACER, "loops") {
            let calls: Vec<String> = rows
                .iter()
                .filter_map(|r| g.stats_calls(stats::TRACER, r.name).map(|c| format!("{c:.0} {}", r.calls)))
                .collect();
            writeln!(
                s,
                "- the tracer's BPF programs ran **{runs}** time(s) in all while one pipe and one select loop made {} calls (kernel.bpf_stats_enabled)",
                calls.join(" and ")
            )?;
        }
        writeln!(s)?;
        Ok(())
    }

    fn render_prog_stats(&self, s: &mut String, g: &Guest) -> anyhow::Result<()> {
        // (mode, program type) → (runs during the loops, during the load, run time in all).
        let mut by: BTreeMap<(String, String), (f64, f64, f64)> = BTreeMap::new();
        for ((mode, phase, _), (t, cnt, ns)) in g.prog_stats() {
            let e = by.entry((mode, prog_type_name(&t).to_owned())).or_default();
            if phase == "loops" {
                e.0 += cnt;
            } else {
                e.1 += cnt;
            }
            e.2 += ns;
        }
        by.retain(|_, (loops, load, _)| *loops + *load > 0.0);
        if by.is_empty() {
            return Ok(());
        }
        writeln!(
            s,
            "BPF programs' own run time (kernel.bpf_stats_enabled) during one run of each loop and, for the tracer, during a tracked-event load:"
        )?;
        writeln!(s)?;
        writeln!(s, "| mode | program type | runs during the loops | runs during the load | guest ns/run |")?;
        writeln!(s, "|---|---|---|---|---|")?;
        for ((mode, t), (loops, load, ns)) in by {
            writeln!(s, "| {} | {t} | {loops:.0} | {load:.0} | {:.0} |", mode_name(&mode), ns / (loops + load))?;
        }
        if let Some(k) = g.lines.iter().find(|l| l.kind == "kprobes") {
            writeln!(s)?;
            writeln!(
                s,
                "Kprobes registered while the tracer was attached: {} ({} optimized to jumps, {} on ftrace).",
                k.get("total").unwrap_or("?"),
                k.get("optimized").unwrap_or("?"),
                k.get("ftrace").unwrap_or("?")
            )?;
        }
        writeln!(s)?;
        Ok(())
    }

    fn render_capacity(&self, s: &mut String, g: &Guest, rows: &[LoopRow]) -> anyhow::Result<()> {
        writeln!(
            s,
            "#### Tracked-event capacity (cxl_dport_bench: lock, lookup, use, unlock of a real dport per iteration)"
        )?;
        writeln!(s)?;
        writeln!(
            s,
            "The loads run under the tracer of the last full repetition after its timed loops, the overflow under the one before it."
        )?;
        writeln!(s)?;
        for l in g.lines.iter().filter(|l| l.kind == "generator") {
            let rate = l.num("rate").unwrap_or(0.0);
            writeln!(
                s,
                "- without a tracer the generator runs {:.0} iterations/s with {} thread(s) (the events it would make: {:.0}/s)",
                rate,
                l.get("threads").unwrap_or("?"),
                rate * 4.0
            )?;
        }
        let per_iter = |l: &Line| l.num("ns").zip(l.num("iterations")).map(|(ns, it)| ns / it);
        let gen1 = g.lines.iter().find(|l| l.kind == "generator" && l.get("threads") == Some("1")).and_then(per_iter);
        let cap1 = g.lines.iter().find(|l| l.kind == "capload" && l.get("tag") == Some("cap-1")).and_then(per_iter);
        // Kernel paths run about this many times slower in the guest than on the host.
        let pipe = rows.iter().find(|r| r.name == "pipe");
        let factor = pipe.and_then(|r| Some(r.stats.reference_ns? / r.host_ns?));
        if let (Some(gn), Some(c)) = (gen1, cap1) {
            writeln!(
                s,
                "- one load iteration takes {:.1} guest µs without a tracer and {:.1} µs with it (1 thread): the tracer adds {:.1} µs per iteration, {:.1} µs per tracked event (≈ {} host µs at the kernel-path ratio of the pipe loop)",
                gn / 1e3,
                c / 1e3,
                (c - gn) / 1e3,
                (c - gn) / 4e3,
                fmt_opt(factor.map(|f| (c - gn) / 4e3 / f), 2)
            )?;
        }
        let stack = |probe: &str| {
            g.lines.iter().find(|l| l.kind == "stackcost" && l.get("probe") == Some(probe)).and_then(per_iter)
        };
        if let (Some(none), Some(count), Some(kstack)) = (stack("none"), stack("count"), stack("kstack")) {
            writeln!(
                s,
                "- a bpftrace kprobe on the use function adds {:.1} guest µs per iteration when it only counts, {:.1} µs when it also takes the kernel stack: one stack capture costs about {:.1} guest µs (≈ {} host µs)",
                (count - none) / 1e3,
                (kstack - none) / 1e3,
                (kstack - count) / 1e3,
                fmt_opt(factor.map(|f| (kstack - count) / 1e3 / f), 2)
            )?;
        }
        writeln!(s)?;
        writeln!(s, "| load | tracer | threads | tracked events/s | generated | tracer CPU, guest µs/event |")?;
        writeln!(s, "|---|---|---|---|---|---|")?;
        for l in g.lines.iter().filter(|l| l.kind == "capload") {
            let generated = l.num("generated").unwrap_or(0.0);
            let secs = l.num("ns").unwrap_or(0.0) / 1e9;
            let ticks = |when: &str| Some(l.num(&format!("utime_{when}"))? + l.num(&format!("stime_{when}"))?);
            let cpu_us = ticks("after")
                .zip(ticks("before"))
                .zip(l.num("hz_after"))
                .map(|((a, b), hz)| (a - b) / hz * 1e6 / generated.max(1.0));
            writeln!(
                s,
                "| {} | {} | {} | {:.0} | {generated:.0} | {} |",
                l.get("tag").unwrap_or("?"),
                l.get("tracer").unwrap_or("?"),
                l.get("threads").unwrap_or("?"),
                generated / secs.max(1e-9),
                fmt_opt(cpu_us, 1)
            )?;
        }
        writeln!(s)?;
        writeln!(
            s,
            "| tracer | ring | generated (+ warm-up) | received | dropped | exact (generated + warm-up + 1 discovery = received + dropped) |"
        )?;
        writeln!(s, "|---|---|---|---|---|---|")?;
        for c in g.lines.iter().filter(|l| matches!(l.kind.as_str(), "capacity" | "overflow")) {
            let tag = c.get("tag").unwrap_or("?");
            let summary = g.summary(tag).with_context(|| format!("the tracer's report of {tag} on {}", g.name))?;
            let received = summary.summary_u64(&["events"])?;
            let dropped = summary.summary_u64(&["dropped"])?;
            let generated = c.num("generated").unwrap_or(0.0) as u64;
            let warmup = c.num("warmup").unwrap_or(0.0) as u64;
            let expected = generated + warmup + 1;
            let ring = match c.kind.as_str() {
                "overflow" => "8192 KiB, the tracer stopped (SIGSTOP) for a 2 s load from 2 threads".to_owned(),
                _ => format!("{} KiB", c.get("ring_kib").unwrap_or("?")),
            };
            writeln!(
                s,
                "| {tag} | {ring} | {generated} (+{warmup}) | {received} | {dropped} | {} ({expected} vs {}) |",
                if expected == received + dropped { "yes" } else { "NO" },
                received + dropped,
            )?;
        }
        writeln!(s)?;
        Ok(())
    }

    fn render_workloads(&self, s: &mut String, g: &Guest) -> anyhow::Result<()> {
        writeln!(
            s,
            "#### Hotplug workloads (guest ms per cycle, median; in brackets the ratio to no tracer in the same repetition, median)"
        )?;
        writeln!(s)?;
        let mut others: Vec<&str> = self.modes.iter().map(String::as_str).filter(|m| *m != stats::NONE).collect();
        if g.lines.iter().any(|l| l.kind == "workload" && l.get("mode") == Some(NODEREFS)) {
            others.push(NODEREFS);
        }
        let mut header = "| workload | no tracer |".to_owned();
        for m in &others {
            write!(header, " {} |", mode_name(m))?;
        }
        writeln!(s, "{header}")?;
        writeln!(s, "|{}", "---|".repeat(2 + others.len()))?;
        for name in ["memdev-bind", "acpi-unbind"] {
            let per = |mode: &str| -> BTreeMap<String, f64> {
                g.lines
                    .iter()
                    .filter(|l| l.kind == "workload" && l.get("name") == Some(name) && l.get("mode") == Some(mode))
                    .filter_map(|l| Some((l.get("rep")?.to_owned(), l.num("total_ms")? / l.num("cycles")?)))
                    .collect()
            };
            let none = per(stats::NONE);
            let mut row = format!("| {name} | {} |", fmt_opt(stats::median(none.values().copied().collect()), 1));
            for m in &others {
                let mine = per(m);
                let ratios: Vec<f64> = mine.iter().filter_map(|(rep, v)| none.get(rep).map(|n| v / n)).collect();
                write!(
                    row,
                    " {} ({}) |",
                    fmt_opt(stats::median(mine.values().copied().collect()), 1),
                    fmt_opt(stats::median(ratios), 2)
                )?;
            }
            writeln!(s, "{row}")?;
        }
        writeln!(s)?;
        writeln!(
            s,
            "The times exclude attaching (the tracer attaches once, before the workloads). No tracer B is the A/A pair's second half: its ratio is the workloads' own noise."
        )?;
        writeln!(s)?;
        self.render_derefs(s, g)
    }

    /// The deref sites: how many the tracer attached, and what they add to
    /// attaching and to the hotplug workloads (the tracer against the tracer with
    /// `--no-derefs`, in the first repetition).
    fn render_derefs(&self, s: &mut String, g: &Guest) -> anyhow::Result<()> {
        let (Some(with), Some(without)) = (g.attach_summary("tracer-1"), g.attach_summary(&format!("{NODEREFS}-1")))
        else {
            return Ok(());
        };
        writeln!(
            s,
            "Deref sites: **{}** in {} functions; the tracer attaches {} kprobes in {:.1} s with them, {} in {:.1} s without (`--no-derefs`).",
            with.deref_sites,
            with.deref_functions,
            with.kprobes,
            with.attach_secs,
            without.kprobes,
            without.attach_secs
        )?;
        for name in ["memdev-bind", "acpi-unbind"] {
            let per_cycle = |mode: &str| {
                g.lines
                    .iter()
                    .find(|l| {
                        l.kind == "workload"
                            && l.get("name") == Some(name)
                            && l.get("mode") == Some(mode)
                            && l.get("rep") == Some("1")
                    })
                    .and_then(|l| Some(l.num("total_ms")? / l.num("cycles")?))
            };
            if let (Some(a), Some(b)) = (per_cycle(stats::TRACER), per_cycle(NODEREFS)) {
                writeln!(
                    s,
                    "- {name}: {a:.1} ms per cycle with the deref sites, {b:.1} without: {:+.1} ms ({:+.1} %)",
                    a - b,
                    100.0 * (a / b - 1.0)
                )?;
            }
        }
        writeln!(s)?;
        Ok(())
    }

    /// The frees check over the tracer periods that ran the workloads; returns whether every
    /// dport free was seen, and the figures (None: not run).
    fn render_frees(&self, s: &mut String, g: &Guest) -> anyhow::Result<Option<(bool, String)>> {
        let runs: Vec<&Line> = g.lines.iter().filter(|l| l.kind == "frees").collect();
        if runs.is_empty() {
            return Ok(None);
        }
        writeln!(s, "#### Every dport free seen")?;
        writeln!(s)?;
        writeln!(
            s,
            "Each tracer period records its events; per period, the host walks the trace (dports by address, in order) after its memdev-bind and acpi-unbind cycles:"
        )?;
        writeln!(s)?;
        writeln!(
            s,
            "| tracer run | dports seen | frees seen | registered over a dport never seen freed | engine's frees_missed | stray frees | tracked alive at the end | dports in sysfs at the end |"
        )?;
        writeln!(s, "|---|---|---|---|---|---|---|---|")?;
        let (mut ok, mut dports, mut frees, mut missed) = (true, 0, 0, 0);
        for run in runs {
            let tag = run.get("tag").unwrap_or("?");
            let Some(count) = g.free_count(tag) else {
                writeln!(s, "| {tag} | not counted | | | | | | |")?;
                ok = false;
                continue;
            };
            let engine = g
                .summary(tag)
                .and_then(|r| r.summary_u64(&["frees_missed"]))
                .with_context(|| format!("the tracer's report of {tag}"))?;
            let n = |l: &Line, k: &str| l.num(k).unwrap_or(0.0) as u64;
            let (d, f, m, stray, live, sysfs) = (
                n(&count, "dports"),
                n(&count, "frees"),
                n(&count, "missed"),
                n(&count, "stray"),
                n(&count, "live_end"),
                n(run, "dports_end"),
            );
            writeln!(s, "| {tag} | {d} | {f} | {m} | {engine} | {stray} | {live} | {sysfs} |")?;
            ok &= f > 0 && m == 0 && engine == 0 && live == sysfs;
            (dports, frees, missed) = (dports + d, frees + f, missed + m + engine);
        }
        writeln!(s)?;
        Ok(Some((
            ok,
            format!(
                "{dports} dports and {frees} frees seen over the tracer periods, {missed} missed, every tracked dport alive at the end of a period listed in sysfs"
            ),
        )))
    }

    fn targets(&self, g: &Guest, rows: &[LoopRow], frees: Option<(bool, String)>) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        let a = g.attach_points();
        let tracer_points = a.points.get("tracer");
        let listed = tracer_points.map_or("not seen (no tracer log)".to_owned(), |p| {
            if p.is_empty() { "none".to_owned() } else { p.iter().cloned().collect::<Vec<_>>().join("; ") }
        });
        for r in rows {
            let Some(t) = r.stats.costs.get(stats::TRACER) else {
                out.push(format!("{}: the tracer's cost was not measured", r.what));
                continue;
            };
            let floor = r
                .stats
                .floor
                .as_ref()
                .map_or("no A/A pair".to_owned(), |f| format!("A/A floor ±{:.2} %", f.resolution * 100.0));
            // Attached to the hooked function itself, by the kernel's own account.
            let functions: &[&str] = if r.name == "pipe" { &["mutex_lock", "mutex_unlock"] } else { &["kfree"] };
            let attached: u64 = functions
                .iter()
                .filter_map(|f| g.hot(f))
                .map(|(k, t, tp)| k + t + if r.name == "select" { tp } else { 0 })
                .sum();
            let hot_known = functions.iter().all(|f| g.hot(f).is_some());
            let nothing = tracer_points.is_some_and(BTreeSet::is_empty) && (!hot_known || attached == 0);
            let verdict = if nothing { stats::at_floor(t) } else { Verdict::NotMet };
            out.push(format!(
                "untracked {}: attach points outside CXL and devres code: {listed}; on {} itself: {}; the tracer's cost {} = {} ({floor}), at the noise floor: {}",
                r.calls,
                functions.join("/"),
                if hot_known { format!("{attached} kprobe(s), ftrace user(s) or tracepoint") } else { "not checked".to_owned() },
                pct_bounds(t),
                r.per_call_bounds(t),
                verdict.describe()
            ));
            out.push(format!(
                "{} slowdown with the tracer {} (≤ {:.0} %, {floor}): {}",
                r.what,
                pct_bounds(t),
                stats::SLOWDOWN_TARGET * 100.0,
                stats::at_most(t, stats::SLOWDOWN_TARGET).describe()
            ));
            if let Some(b) = r.stats.costs.get(stats::BPFTRACE) {
                out.push(format!(
                    "{}: tracer {} vs bpftrace {} doing the same filtering (≥ {:.0}x cheaper: the tracer's upper bound ≤ a third of bpftrace's lower bound): {}",
                    r.what,
                    r.per_call_bounds(t),
                    r.per_call_bounds(b),
                    stats::CHEAPER_FACTOR,
                    stats::cheaper(t, b, stats::CHEAPER_FACTOR).describe()
                ));
            }
        }
        // The loads under the big ring: the highest rate any of them reached, and what that
        // tracer dropped over all of them.
        let capacity = g.lines.iter().find(|l| l.kind == "capacity").and_then(|l| l.get("tag"));
        let rate = g
            .lines
            .iter()
            .filter(|l| l.kind == "capload" && l.get("tracer") == capacity)
            .filter_map(|l| Some((l.num("generated")? / (l.num("ns")? / 1e9), l.get("tag")?.to_owned())))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let (Some((rate, tag)), Some(tracer)) = (rate, capacity) {
            let dropped = g.summary(tracer)?.summary_u64(&["dropped"])?;
            out.push(format!(
                "zero drops at the highest tracked rate the guest generated under the tracer, {rate:.0} events/s ({tag}; 1 M/s is out of reach under TCG): {dropped} dropped over all loads: {}",
                met(dropped == 0)
            ));
        }
        match frees {
            Some((ok, text)) => out.push(format!("every dport free seen ({text}): {}", met(ok))),
            None => out.push("every dport free seen: not measured".to_owned()),
        }
        Ok(out)
    }

    /// The host-native kfree runs (the raw-tracepoint fallback), and kfree calls per op.
    fn host_kfree(&self) -> (LoopStats, Option<f64>) {
        let samples: Vec<Sample> = self
            .host
            .iter()
            .filter(|l| l.kind == "hostkfree")
            .filter_map(|l| {
                Some(Sample {
                    mode: l.get("mode")?.to_owned(),
                    rep: l.num("rep")? as u32,
                    lp: "select".to_owned(),
                    ns_per_op: l.num("ns_per_op")?,
                    rel: l.num("rel"),
                })
            })
            .collect();
        let calls =
            self.host.iter().find(|l| l.kind == "hostcalls").and_then(|l| Some(l.num("kfree")? / l.num("ops")?));
        (LoopStats::compute(&samples, "select"), calls)
    }

    fn render_host_kfree(&self, s: &mut String, (st, calls): &(LoopStats, Option<f64>)) -> anyhow::Result<()> {
        if st.costs.is_empty() {
            return Ok(());
        }
        writeln!(s, "### The kfree raw-tracepoint fallback, natively on the host")?;
        writeln!(s)?;
        writeln!(
            s,
            "The tracer attaches to kfree only on a kernel with neither `free_dport()` nor the devres core's kfree call sites (see each kernel's profile above). What that fallback would cost, measured on the host (its kernel runs raw tracepoints, not kprobes or fentry), `select` loop at {} ns/op, {} kfree per op (counted with bpftrace), A/A floor {}:",
            fmt_opt(st.reference_ns, 0),
            fmt_opt(*calls, 2),
            st.floor.as_ref().map_or("–".to_owned(), |f| format!("±{:.2} %", f.resolution * 100.0))
        )?;
        writeln!(s)?;
        writeln!(s, "| on kfree | cost | host ns per kfree |")?;
        writeln!(s, "|---|---|---|")?;
        for mode in super::hostbpf::MODES {
            let Some(c) = st.costs.get(mode) else { continue };
            let what = match mode {
                "rawtp-lru" => "raw tracepoint, one LRU-hash lookup (the fallback's untracked path)",
                "rawtp-empty" => "raw tracepoint, empty program (the attach point alone)",
                _ => "bpftrace: tracepoint:kmem:kfree with a hash lookup",
            };
            let per = |x: f64| match (st.reference_ns, calls.filter(|c| *c > 0.0)) {
                (Some(ns), Some(k)) => format!("{:+.1}", x * ns / k),
                _ => "–".to_owned(),
            };
            writeln!(s, "| {what} | {} | {} ({}…{}) |", pct_bounds(c), per(c.cost), per(c.lo), per(c.hi))?;
        }
        writeln!(s)?;
        Ok(())
    }

    fn render_memory(&self, s: &mut String) -> anyhow::Result<()> {
        writeln!(s, "### Memory")?;
        writeln!(s)?;
        let c = self.churn_figures();
        writeln!(
            s,
            "- replay (`tracer analyze`, host) of a synthetic churn of {} dports ({} events, every dport at its own address; {} s): VmRSS {} kB after the first {} dports, {} kB at the end; peak of the first quarter of the stream {} kB, of the last quarter {} kB; VmHWM {} kB ({:.1} MiB); engine evictions {}",
            c.dports,
            c.events,
            c.secs,
            c.samples.first().map_or(0, |x| x.1),
            c.samples.first().map_or(0, |x| x.0),
            c.samples.last().map_or(0, |x| x.1),
            c.first_quarter_kb,
            c.last_quarter_kb,
            c.hwm_kb,
            c.hwm_kb as f64 / 1024.0,
            c.evicted
        )?;
        let curve: Vec<String> =
            c.samples.iter().map(|(d, r)| format!("{}k:{:.1}", d / 1000, *r as f64 / 1024.0)).collect();
        writeln!(s, "  (dports:MiB) {}", curve.join(" "))?;
        for g in &self.guests {
            let mib = |kind: &str| -> Vec<String> {
                g.lines
                    .iter()
                    .filter(|l| l.kind == kind && matches!(l.get("mode"), Some("tracer" | "global")))
                    .filter_map(|l| {
                        Some(format!(
                            "{} {}/{}",
                            l.get("tag")?,
                            l.num("rss_kb")? as u64 / 1024,
                            l.num("hwm_kb")? as u64 / 1024
                        ))
                    })
                    .collect()
            };
            writeln!(
                s,
                "- `tracer run` on {}, VmRSS/VmHWM MiB just after attaching: {}",
                g.name,
                mib("attached").join(", ")
            )?;
            writeln!(
                s,
                "- `tracer run` on {}, VmRSS/VmHWM MiB at the end of each mode period: {}",
                g.name,
                mib("memory").join(", ")
            )?;
        }
        if let Some(soak) = &self.soak {
            for line in soak.lines() {
                writeln!(s, "- {line}")?;
            }
        } else {
            writeln!(s, "- the hotplug loop under the tracer did not run (--minutes 0)")?;
        }
        writeln!(s)?;
        Ok(())
    }

    fn host_targets(&self, replay: Option<f64>) -> Vec<String> {
        let mut out = Vec::new();
        let c = self.churn_figures();
        let flat = c.last_quarter_kb <= c.first_quarter_kb + (c.first_quarter_kb / 10).max(2048);
        out.push(format!(
            "memory for {} dports churned: VmHWM {:.1} MiB (< 64), last-quarter peak {} kB vs first-quarter {} kB (flat: within 10 % or 2 MiB): {}",
            c.dports,
            c.hwm_kb as f64 / 1024.0,
            c.last_quarter_kb,
            c.first_quarter_kb,
            met(c.hwm_kb < 64 * 1024 && flat)
        ));
        if let Some(rate) = replay {
            out.push(format!("engine replay {:.1} million events/s (≥ 10): {}", rate / 1e6, met(rate >= 10e6)));
        }
        out
    }
}

fn mode_name(mode: &str) -> &str {
    match mode {
        "none" => "no tracer",
        "none-b" => "no tracer B",
        "tracer" => "tracer",
        "global" => "tracer --lock-events global",
        NODEREFS => "tracer --no-derefs",
        "bpftrace" => "bpftrace",
        other => other,
    }
}

/// `enum bpf_prog_type` numbers as /proc/PID/fdinfo prints them.
fn prog_type_name(t: &str) -> &str {
    match t {
        "2" => "kprobe",
        "5" => "tracepoint",
        "17" => "raw_tracepoint",
        "26" => "tracing (fentry/fexit)",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tracers_discovery_and_attach_lines_give_the_deref_figures() {
        let log = "tracer: kernel 7.2.13+deb14-amd64\n\
            tracer: 41 call sites in CXL code (4 modules: cxl_acpi cxl_mem cxl_pci cxl_port), 12 use sites, 108 deref sites in 24 functions, 0 devres kfree sites; planned 168 sites in 2.1s\n\
            tracer: 161 kprobes attached in 850.5ms (168 sites)\n";
        assert_eq!(
            AttachSummary::parse(log),
            Some(AttachSummary { deref_sites: 108, deref_functions: 24, kprobes: 161, attach_secs: 0.8505 })
        );
        assert_eq!(AttachSummary::parse("tracer: 3 kprobes attached in 1.5s\n"), None);
        assert_eq!(parse_duration_secs("61.25s"), Some(61.25));
        assert_eq!(parse_duration_secs("12"), None);
    }
}
