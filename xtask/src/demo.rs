//! `cargo xtask demo`: the main job, start to end. Sets up the machine, builds the fixed
//! `cxl_mem.ko` and the guest's tracer, boots a stock Debian kernel (by default 7.2, the
//! kernel the seed thread's patch is written against, so the demo shows the thread's own
//! code) in the QEMU CXL guest and runs the hotplug workloads under the tracer, prints its
//! report; does the same with the seed-fixed driver; then prints both side by side with a
//! verdict per run and the dport coverage of each.
//!
//! On the kernel built from source (`--kernel 7.2-src`) the CXL core is a module, so the
//! demo shows the seed thread's whole patch instead: the build as it is and the build with
//! `--patch` (the seed's v2 patch by default), each on cxl_test's topology with every
//! workload it supports, region commits included.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{
    debian::{self, StockKernel},
    fixture::{self, Fixture},
    setup,
    source_kernel::{self, SourceKernel},
    util,
    vm::{
        self, KernelArg, Topology, cxl_test,
        expect::Expected,
        findings::Report,
        traced::{self, Ground},
    },
};

/// The workloads of the demo: a memdev bind, a driver reload, the root's teardown.
const DEMO_WORKLOADS: [vm::Workload; 3] =
    [vm::Workload::MemdevBind, vm::Workload::CxlMemReload, vm::Workload::AcpiUnbind];

#[derive(clap::Args)]
pub struct Options {
    /// Cycles of each workload (memdev-bind, cxl-mem-reload, acpi-unbind) per run.
    #[arg(long, default_value_t = 5)]
    pub cycles: u32,
    /// The kernel to show: a stock one (its Debian packages are fetched and cached; the
    /// default is the seed thread's), or 7.2-src, the same source built here with the CXL
    /// core as modules (built on first use, 15 to 20 minutes), shown on cxl_test's topology
    /// without and with --patch.
    #[arg(long, default_value = "7.2", value_name = "6.1|6.12|7.2|7.2-src")]
    pub kernel: String,
    /// With --kernel 7.2-src: the patch the second run's build applies (a file, or `seed`
    /// for the seed thread's v2 patch, the default); repeatable, applied in order.
    #[arg(long = "patch", value_name = "FILE|seed")]
    pub patches: Vec<String>,
    /// Where the two runs' results go (default: target/demo).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

struct Outcome {
    name: &'static str,
    report: Report,
    ground: Ground,
    verdict: String,
    expected: bool,
    seconds: f64,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let start = Instant::now();
    if options.cycles == 0 {
        bail!("--cycles must be at least 1");
    }
    if let Some(built) = source_kernel::source_kernel(&options.kernel) {
        return source_demo(options, built, start);
    }
    if !options.patches.is_empty() {
        bail!(
            "--patch needs a kernel built from source (--kernel 7.2-src): the CXL core of stock {} is built \
             into vmlinux, so the demo's fixed run there swaps only cxl_mem.ko (the seed-fixed fixture)",
            options.kernel
        );
    }
    let kernel = debian::stock_kernel(&options.kernel)?;
    setup::ensure()?;
    let fixed = fixture::build_for_kernel(Fixture::CxlMemFixed, kernel)?;
    let tracer = vm::tracer_binary()?;
    let root = options.out.clone().unwrap_or_else(|| util::workspace_root().join("target/demo"));
    println!("demo: set-up and builds done in {:.0} s", start.elapsed().as_secs_f64());

    let root = root.join(kernel.name);
    let stock = traced_run("stock", &root.join("stock"), &tracer, kernel, None, options.cycles)?;
    let fixed = traced_run("fixed", &root.join("fixed"), &tracer, kernel, Some(&fixed), options.cycles)?;

    finish(&stock, &fixed, start, &root)
}

/// The two runs side by side, their verdicts, and the demo's own: it fails unless both
/// runs reported what the source says they must.
fn finish(stock: &Outcome, other: &Outcome, start: Instant, root: &Path) -> anyhow::Result<()> {
    table(stock, other);
    for o in [stock, other] {
        println!("{}", o.verdict);
    }
    let ok = stock.expected && other.expected;
    println!(
        "demo: {} in {:.0} s (stock run {:.0} s, {} run {:.0} s); results in {}",
        if ok { "done" } else { "FAILED" },
        start.elapsed().as_secs_f64(),
        stock.seconds,
        other.name,
        other.seconds,
        root.display()
    );
    if !ok {
        bail!("the tracer did not report what the demo expects: see the verdicts above");
    }
    Ok(())
}

/// What makes a run's report untrustworthy or wrong whatever the kernel: lost events, or a
/// class no sequential workload can cause.
fn trace_problem(report: &Report) -> Option<String> {
    if let Err(lost) = report.check_nothing_lost() {
        return Some(format!("events were lost ({lost}): findings may be incomplete"));
    }
    ["use-after-free", "rule-mismatch"]
        .iter()
        .find(|c| report.check_none(c).is_err())
        .map(|class| format!("unexpected {class} findings (see the report)"))
}

fn traced_run(
    name: &'static str,
    out: &Path,
    tracer: &Path,
    kernel: &'static StockKernel,
    module: Option<&Path>,
    cycles: u32,
) -> anyhow::Result<Outcome> {
    let t = Instant::now();
    let what = match module {
        None => format!("the stock Debian {} kernel", kernel.release),
        Some(m) => format!("the same kernel with the seed-fixed cxl_mem ({})", m.display()),
    };
    println!("\ndemo: {name}: {what}: memdev-bind, cxl-mem-reload, acpi-unbind x {cycles} under `tracer run`");
    let mut o = traced::options(Topology::Rp, out, tracer);
    o.kernel = Some(KernelArg::Stock(kernel));
    o.workloads = DEMO_WORKLOADS.to_vec();
    o.cycles = cycles;
    o.modules = module.into_iter().map(Path::to_path_buf).collect();
    traced::completed(&o)?;
    let ground = traced::ground(out)?;
    let report = Report::read(&out.join("findings.jsonl"))?;

    print_report(name, tracer, out)?;

    let problem = trace_problem(&report);
    // cxl_mem_probe's own findings (docs/kernels.md says why each is expected on this
    // kernel), each once per memdev probe; the fix must remove them all.
    let own: Vec<Expected> = kernel.expected.iter().filter(|e| e.fixed_by_cxl_mem).copied().collect();
    let probes = ground.probes;
    let counts: Vec<(Expected, u64)> = own.iter().map(|e| (*e, report.occurrences(e.class, e.site))).collect();
    let list = |counts: &[(Expected, u64)]| {
        counts.iter().map(|(e, n)| format!("{} at {} {n}x", e.class, e.site)).collect::<Vec<_>>().join(", ")
    };
    let (expected, verdict) = match (module, problem) {
        (_, Some(problem)) => (false, format!("{name}: {problem}")),
        (None, None) if probes > 0 && counts.iter().all(|(_, n)| *n == probes) => (
            true,
            format!(
                "stock: on each of the {probes} memdev probes, cxl_mem_probe's own read-side findings ({}), as expected",
                list(&counts)
            ),
        ),
        (None, None) => (
            false,
            format!("stock: expected each of {} once per memdev probe ({probes}), got {}", own.len(), list(&counts)),
        ),
        (Some(_), None) => {
            let read_side: u64 = report
                .findings
                .iter()
                .filter(|f| {
                    f.is_read_side()
                        && f.stack.iter().take(2).any(|fr| vm::findings::frame_function(fr) == "cxl_mem_probe")
                })
                .map(|f| f.count)
                .sum();
            let events = report.summary_u64(&["events"]).unwrap_or(0);
            if read_side == 0 && probes > 0 && events > 0 {
                (
                    true,
                    format!(
                        "fixed: no read-side finding in cxl_mem_probe over {probes} memdev probes \
                         (tracer live: {events} events; what remains is in cxl_core, which the \
                         module fix does not touch)"
                    ),
                )
            } else {
                (
                    false,
                    format!(
                        "fixed: {read_side} read-side finding(s) in cxl_mem_probe over {probes} probes, expected none"
                    ),
                )
            }
        }
    };
    Ok(Outcome { name, report, ground, verdict, expected, seconds: t.elapsed().as_secs_f64() })
}

/// `--kernel 7.2-src`: the build as it is, then with the patches, each on cxl_test's
/// topology; the seed's patch is judged as the suite judges it (cxl_test.rs).
fn source_demo(options: &Options, built: &'static SourceKernel, start: Instant) -> anyhow::Result<()> {
    let patches = if options.patches.is_empty() { vec!["seed".to_owned()] } else { options.patches.clone() };
    let seed = patches == ["seed"];
    setup::ensure()?;
    let tracer = vm::tracer_binary()?;
    let root = options.out.clone().unwrap_or_else(|| util::workspace_root().join("target/demo")).join(built.name);
    println!("demo: set-up done in {:.0} s", start.elapsed().as_secs_f64());
    let stock = source_run("stock", &root.join("stock"), &tracer, built, &[], options.cycles, false)?;
    let patched = source_run("patched", &root.join("patched"), &tracer, built, &patches, options.cycles, seed)?;

    finish(&stock, &patched, start, &root)
}

fn source_run(
    name: &'static str,
    out: &Path,
    tracer: &Path,
    built: &'static SourceKernel,
    patches: &[String],
    cycles: u32,
    seed: bool,
) -> anyhow::Result<Outcome> {
    let t = Instant::now();
    let what = match patches {
        [] => format!("{} as it is", built.name),
        _ => format!("{} with --patch {}", built.name, patches.join(" --patch ")),
    };
    let workloads = cxl_test::WORKLOADS;
    let list = workloads.iter().map(|w| w.name()).collect::<Vec<_>>().join(", ");
    println!("\ndemo: {name}: {what}, cxl_test's topology: {list} x {cycles} under `tracer run`");
    let mut o = traced::options(Topology::CxlTest, out, tracer);
    o.kernel = Some(KernelArg::Built(built));
    o.kernel_patches.patches = patches.to_vec();
    o.workloads = workloads.to_vec();
    o.cycles = cycles;
    traced::completed(&o)?;
    let ground = traced::ground(out)?;
    let report = Report::read(&out.join("findings.jsonl"))?;
    print_report(name, tracer, out)?;

    let verdict = if patches.is_empty() || seed {
        match cxl_test::judge(tracer, out, &report, ground.probes, seed) {
            Ok(lines) => Ok(lines.join("\n  ")),
            Err(err) => Err(format!("{err:#}")),
        }
    } else {
        // The user's own patches: nothing to expect but a clean, complete trace.
        match trace_problem(&report) {
            Some(problem) => Err(problem),
            None => Ok("your patches: compare the side by side with the stock run".to_owned()),
        }
    };
    let (expected, verdict) = match verdict {
        Ok(lines) => (true, format!("{name}: as the source says ({} memdev probes):\n  {lines}", ground.probes)),
        Err(why) => (false, format!("{name}: {why}")),
    };
    Ok(Outcome { name, report, ground, verdict, expected, seconds: t.elapsed().as_secs_f64() })
}

/// The tracer's own report of a run, as a user reads it.
fn print_report(name: &str, tracer: &Path, out: &Path) -> anyhow::Result<()> {
    println!("demo: {name}: the tracer's report (tracer analyze trace.bin):\n");
    let text = Command::new(tracer)
        .arg("analyze")
        .arg(out.join("trace.bin"))
        .output()
        .with_context(|| format!("cannot run {}", tracer.display()))?;
    print!("{}", String::from_utf8_lossy(&text.stdout));
    Ok(())
}

/// Occurrences by class and site, stock next to fixed.
fn table(stock: &Outcome, fixed: &Outcome) {
    let (a, b) = (stock.report.by_site(), fixed.report.by_site());
    let keys: BTreeSet<&(String, String)> = a.keys().chain(b.keys()).collect();
    let width = keys.iter().map(|(c, s)| c.len() + s.len() + 4).max().unwrap_or(20).max(32);
    println!("\ndemo: side by side (occurrences)");
    println!("  {:<width$} {:>8} {:>8}", "class at site", stock.name, fixed.name);
    for k in keys {
        println!(
            "  {:<width$} {:>8} {:>8}",
            format!("{} at {}", k.0, k.1),
            a.get(k).copied().unwrap_or(0),
            b.get(k).copied().unwrap_or(0)
        );
    }
    let n = |o: &Outcome, key: &str| o.report.summary_u64(&[key]).unwrap_or(0);
    println!("  {:<width$} {:>8} {:>8}", "memdev probes (kretprobe count)", stock.ground.probes, fixed.ground.probes);
    println!("  {:<width$} {:>8} {:>8}", "events traced", n(stock, "events"), n(fixed, "events"));
    println!("  {:<width$} {:>8} {:>8}", "events dropped", n(stock, "dropped"), n(fixed, "dropped"));
    // Reach: what the workloads ran of the dport sites the tracer probed (docs/design.md,
    // section 7); a finding can only come from a site that ran.
    let ran = |o: &Outcome, kind: &str| match (
        o.report.summary_u64(&["coverage", kind, "ran"]),
        o.report.summary_u64(&["coverage", kind, "sites"]),
    ) {
        (Ok(ran), Ok(sites)) => format!("{ran}/{sites}"),
        _ => "-".to_owned(),
    };
    for kind in ["load", "use", "deref"] {
        let label = format!("dport {kind} sites ran");
        println!("  {:<width$} {:>8} {:>8}", label, ran(stock, kind), ran(fixed, kind));
    }
    println!();
}
