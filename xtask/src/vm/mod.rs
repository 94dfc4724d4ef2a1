//! `cargo xtask vm run`: boots a QEMU guest with an emulated CXL topology on a stock (or the
//! user's) kernel, runs hotplug workloads in it, under the tracer or not, and brings the
//! results back. See docs/vm.md.
//!
//! The harness never hangs and never lies: every boot has a wall-clock bound, the host reads
//! the serial console for kernel failures, and a run passes only when the guest printed its
//! result line (which carries a per-run nonce) with exit 0 and no failure was seen.
mod basics;
mod calls;
mod checks;
mod cpio;
pub mod expect;
pub mod findings;
mod guest;
mod initramfs;
mod kernel;
mod kernel_arg;
mod qemu;
mod reliability;
mod selftest;
pub mod soak;
mod suite;
pub mod traced;
mod workload;

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
pub use initramfs::GuestFile;
pub use kernel_arg::KernelArg;
pub use qemu::{Accel, Crash};
pub use suite::suite;
pub use workload::Workload;

use crate::{setup, util};

/// What a run leaves in its results directory (besides files a script writes).
const RESULT_FILES: &[&str] = &[
    "console.log",
    "dmesg.txt",
    "workload.log",
    "findings.jsonl",
    "results.ktap",
    "tracer.log",
    "trace.bin",
    "calls.txt",
    "calls-profile.txt",
];

/// The packages a guest run needs on the host.
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod", "xz-utils", "zstd"];

#[derive(clap::Subcommand)]
pub enum VmCommand {
    /// Boot the CXL guest, run workloads (under the tracer unless --no-tracer), collect results.
    Run(Box<RunOptions>),
    /// The guest suite alone (what `cargo xtask test` runs after the host tests).
    Suite {
        /// Run only these cases (repeatable or comma-separated; default: all).
        #[arg(long, value_delimiter = ',', value_name = "CASE")]
        only: Vec<String>,
    },
    /// The racing hotplug mix under the tracer for N minutes, sampling its memory and the
    /// kernel's drop counters; fails on memory growth, a drop, a guest failure or a tracer
    /// crash.
    Soak(soak::SoakOptions),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Topology {
    /// A CXL host bridge with one root port and one type3 memdev below it.
    Rp,
    /// A host bridge, one root port, a switch (upstream port, two downstream ports), two memdevs.
    Switch,
}

impl Topology {
    fn memdevs(self) -> usize {
        match self {
            Topology::Rp => 1,
            Topology::Switch => 2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Topology::Rp => "rp",
            Topology::Switch => "switch",
        }
    }
}

#[derive(clap::Args, Clone)]
pub struct RunOptions {
    /// The emulated CXL topology.
    #[arg(long, value_enum, default_value = "rp")]
    pub topology: Topology,
    /// A built-in workload to run (repeatable, or comma-separated); they run in the order
    /// given. Default: memdev-bind, unless a script is given.
    #[arg(long = "workload", value_enum, value_delimiter = ',')]
    pub workloads: Vec<Workload>,
    /// Cycles of each workload (for mix: iterations of each of its two racing loops).
    #[arg(long, default_value_t = 5)]
    pub cycles: u32,
    /// Run the workload without the tracer.
    #[arg(long)]
    pub no_tracer: bool,
    /// Put this static tracer binary in the guest instead of building one.
    #[arg(long, value_name = "FILE", conflicts_with = "no_tracer")]
    pub tracer_binary: Option<PathBuf>,
    /// Put the tracer in the guest (/bin/tracer) but run the workloads and the script
    /// without it: the script runs `tracer` itself (doctor, leftovers, signals).
    #[arg(long, conflicts_with = "no_tracer", requires = "script")]
    pub manual_tracer: bool,
    /// Do not load the CXL modules at boot nor wait for the topology: the script does
    /// (`load_modules`, `topology_ready SECS`, then `/vm/run-workload NAME CYCLES`).
    #[arg(long, requires = "script", conflicts_with = "workloads")]
    pub no_cxl_at_boot: bool,
    /// Count the calls of a kernel function during the workloads and the script, with a
    /// kretprobe: every return, its value and its caller go to calls.txt (repeatable;
    /// `FUNCTION` or `MODULE:FUNCTION`, e.g. cxl_mem:cxl_mem_probe).
    #[arg(long = "count-calls", value_name = "[MODULE:]FUNCTION")]
    pub count_calls: Vec<String>,
    /// Also load cxl_pmem (the nvdimm side of CXL). Off by default: every probe then reads
    /// the label area through the emulated mailbox (cycles get about 15 times slower), and on
    /// 6.12 its cxl_nvdimm_probe oopses when a memdev probe races a cxl_acpi unbind (mix), a
    /// kernel bug outside the dport rules.
    #[arg(long)]
    pub pmem: bool,
    /// A module (.ko, .ko.xz, ...) loaded in place of the stock module of the same name, or
    /// loaded after the CXL drivers when no stock module has its name (repeatable).
    #[arg(long = "module", value_name = "FILE")]
    pub modules: Vec<PathBuf>,
    /// The kernel: a stock Debian kernel of the matrix, or the user's image (with
    /// `modules_dir`); `None` boots debian::DEFAULT_KERNEL. From code:
    /// `options.kernel = Some(KernelArg::stock("7.2")?)`.
    #[arg(long, value_name = "NAME|IMAGE", value_parser = KernelArg::parse, help = kernel_arg::help())]
    pub kernel: Option<KernelArg>,
    /// Boot the kernel of this linux-image .deb instead of a stock Debian kernel.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "modules_dir"])]
    pub kernel_deb: Option<PathBuf>,
    /// The installed modules of --kernel IMAGE: DIR/lib/modules/RELEASE after
    /// `make modules_install INSTALL_MOD_PATH=DIR`.
    #[arg(long = "modules", value_name = "DIR", requires = "kernel")]
    pub modules_dir: Option<PathBuf>,
    /// Where the results go (default: target/vm/<UTC time>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Wall-clock bound for the whole boot, in seconds; QEMU is killed after it. Default:
    /// 180 s plus 15 s per workload cycle.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// How QEMU runs the guest: auto probes KVM once per host boot and falls back to TCG.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: Accel,
    /// Virtual CPUs. Default: 2 with KVM, 1 with TCG, where QEMU's multi-threaded
    /// emulation can oops the guest (`Oops: int3`) whenever kernel text is patched, as
    /// attaching or detaching the tracer does (docs/vm.md).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=8))]
    pub cpus: Option<u32>,
    /// Extra kernel command-line parameters (e.g. "dyndbg=\"module cxl_core +p\"").
    #[arg(long, value_name = "PARAMS")]
    pub cmdline: Option<String>,
    /// Do not echo the guest console (it is still saved to console.log).
    #[arg(long)]
    pub quiet: bool,
    /// A script to run in the guest after the workloads, and its arguments: a host file
    /// (copied into the guest) or else a command of the guest's busybox.
    #[arg(last = true, value_name = "SCRIPT ARGS")]
    pub script: Vec<String>,
    /// More files for the guest, from code (the bench's load programs, bpftrace and the
    /// libraries it needs).
    #[arg(skip)]
    pub extra_files: Vec<GuestFile>,
}

impl RunOptions {
    /// Defaults for a run driven from code (the suite, the demo).
    pub fn new(topology: Topology) -> Self {
        Self {
            topology,
            workloads: Vec::new(),
            cycles: 5,
            no_tracer: false,
            tracer_binary: None,
            manual_tracer: false,
            no_cxl_at_boot: false,
            count_calls: Vec::new(),
            pmem: false,
            modules: Vec::new(),
            kernel: None,
            kernel_deb: None,
            modules_dir: None,
            out: None,
            timeout: None,
            accel: Accel::Auto,
            cpus: None,
            cmdline: None,
            quiet: false,
            script: Vec::new(),
            extra_files: Vec::new(),
        }
    }
}

pub fn command(command: VmCommand) -> anyhow::Result<()> {
    match command {
        VmCommand::Run(options) => {
            let run = execute(&options)?;
            run.print_summary();
            match &run.failure {
                None => Ok(()),
                Some(failure) => bail!("{failure}"),
            }
        }
        VmCommand::Suite { only } => suite::run(&only),
        VmCommand::Soak(options) => soak::command(&options),
    }
}

/// How long a workload's cycles took, from the guest's own `workload NAME passed` line.
#[derive(Clone, Debug)]
pub struct WorkloadTiming {
    pub name: String,
    pub cycles: u32,
    pub per_cycle: Duration,
}

/// Why a run failed. Each names what was seen and carries the console lines that show it.
#[derive(Debug)]
pub enum Failure {
    Crash {
        crash: Crash,
        line: String,
        excerpt: String,
    },
    Timeout {
        secs: u64,
        tail: String,
    },
    NoResult {
        status: String,
        tail: String,
    },
    Guest {
        exit: i32,
        /// The guest's own explanation (`tracer-vm: error:` or `tracer-vm: FAIL:`).
        reason: Option<String>,
        tail: String,
    },
    Findings {
        count: usize,
    },
}

impl Failure {
    pub fn crash(&self) -> Option<Crash> {
        match self {
            Failure::Crash { crash, .. } => Some(*crash),
            _ => None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Crash { crash, line, excerpt } => write!(
                f,
                "guest {} detected: {line}\n--- console excerpt ---\n{excerpt}\n--- end of excerpt ---",
                crash.describe()
            ),
            Failure::Timeout { secs, tail } => write!(
                f,
                "the guest did not finish within {secs} s (--timeout): qemu killed; last console lines:\n{tail}"
            ),
            Failure::NoResult { status, tail } => {
                write!(f, "the guest stopped without its result line (qemu {status}); last console lines:\n{tail}")
            }
            Failure::Guest { exit, reason, tail } => {
                write!(f, "the guest run failed with exit status {exit}")?;
                if let Some(reason) = reason {
                    write!(f, ": {reason}")?;
                }
                write!(f, "\nlast console lines:\n{tail}")
            }
            Failure::Findings { count } => {
                write!(f, "the tracer reported {count} finding(s): see findings.jsonl in the results")
            }
        }
    }
}

/// One guest run, after QEMU is gone and the results are copied.
pub struct Run {
    pub out: PathBuf,
    /// The guest kernel's release (`uname -r`).
    pub release: String,
    pub accel: Accel,
    pub accel_reason: String,
    /// From QEMU's start to /init's first line, and to the CXL topology being ready.
    pub to_init: Option<Duration>,
    pub to_ready: Option<Duration>,
    pub elapsed: Duration,
    pub workloads: Vec<WorkloadTiming>,
    /// The tracer's exit status (0 clean, 1 findings, 2 error), when it ran.
    pub tracer_exit: Option<i32>,
    pub failure: Option<Failure>,
    /// The whole console, for callers that check what the guest printed.
    pub console: Vec<String>,
}

impl Run {
    pub fn print_summary(&self) {
        let secs = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()));
        let verdict = match self.failure {
            None => "passed",
            Some(Failure::Findings { .. }) => "finished with tracer findings",
            Some(_) => "failed",
        };
        println!(
            "vm: {verdict} in {:.1} s (kernel {}, {}: {}; boot to /init {}, CXL ready {})",
            self.elapsed.as_secs_f64(),
            self.release,
            self.accel,
            self.accel_reason,
            secs(self.to_init),
            secs(self.to_ready)
        );
        for w in &self.workloads {
            println!("vm: workload {}: {} cycles, {:.2} s per cycle", w.name, w.cycles, w.per_cycle.as_secs_f64());
        }
        if let Some(exit) = self.tracer_exit {
            println!("vm: tracer exit status {exit}");
        }
        let mut files: Vec<String> = fs::read_dir(&self.out)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        files.sort();
        println!("vm: results in {}: {}", self.out.display(), files.join(" "));
    }
}

/// A directory removed when dropped (per-run QEMU files: the share, CXL backing files).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("tracer-vm-{tag}"));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Boots the guest as `options` say and returns what happened. An `Err` means the run
/// could not be made (a build, a download, a bad option); a run that was made and failed is
/// an `Ok` with `failure` set, its results copied.
pub fn execute(options: &RunOptions) -> anyhow::Result<Run> {
    let mut workloads = options.workloads.clone();
    if workloads.is_empty() && options.script.is_empty() {
        workloads.push(Workload::MemdevBind);
    }
    workload::check(&workloads, options.topology)?;
    if options.script.is_empty() && (options.manual_tracer || options.no_cxl_at_boot) {
        bail!(
            "--manual-tracer and --no-cxl-at-boot need a script (-- SCRIPT ARGS) to run the tracer or load the modules"
        );
    }
    if options.no_cxl_at_boot && !workloads.is_empty() {
        bail!(
            "--no-cxl-at-boot cannot run --workload before the script: run it from the script \
             with `/vm/run-workload NAME CYCLES` after loading the modules"
        );
    }
    if options.manual_tracer && options.no_tracer {
        bail!("--manual-tracer puts the tracer in the guest: it cannot go with --no-tracer");
    }
    for spec in &options.count_calls {
        check_count_spec(spec)?;
    }
    if options.cycles == 0 {
        bail!("--cycles must be at least 1");
    }
    setup::ensure_packages(VM_PACKAGES)?;

    let source =
        kernel_arg::source(options.kernel.as_ref(), options.kernel_deb.as_deref(), options.modules_dir.as_deref())?;
    let kernel = kernel::Kernel::resolve(&source)?;
    let index = kernel.module_index()?;
    let user_modules: Vec<kernel::UserModule> =
        options.modules.iter().map(|m| kernel::UserModule::inspect(m)).collect::<anyhow::Result<_>>()?;
    for (workload, module) in
        [(Workload::CxlMemReload, "cxl_mem"), (Workload::ReloadMix, "cxl_mem"), (Workload::CxlPciReload, "cxl_pci")]
    {
        if workloads.contains(&workload) && !index.modules.contains_key(module) {
            bail!(
                "workload {} needs {module} built as a module, but kernel {} has it built in",
                workload.name(),
                kernel.release
            );
        }
    }

    // The modules the base archive holds: what /init needs for the share, the CXL drivers,
    // and whatever the user's modules need.
    let basic_modules = basics::modules(&index, &kernel.release)?;
    let wanted = basic_modules
        .iter()
        .map(String::as_str)
        .chain(initramfs::CXL_MODULES.iter().copied())
        .chain(user_modules.iter().flat_map(|u| u.depends.iter().map(String::as_str)));
    let modules = index.closure(wanted)?;
    let mut load: Vec<String> = initramfs::CXL_MODULES
        .iter()
        .filter(|m| modules.iter().any(|x| x == *m))
        .filter(|m| options.pmem || **m != initramfs::PMEM_MODULE)
        .map(|m| (*m).to_owned())
        .collect();
    for u in &user_modules {
        if !load.contains(&u.name) {
            load.push(u.name.clone());
        }
    }
    if !options.pmem {
        // Kernels where another CXL driver links against cxl_pmem (7.2's cxl_acpi imports
        // devm_cxl_add_nvdimm_bridge) load it whatever --pmem says: say so, as it makes
        // every cycle slower.
        let needers: Vec<&str> = load
            .iter()
            .filter(|m| index.modules.get(*m).is_some_and(|m| m.deps.iter().any(|d| d == initramfs::PMEM_MODULE)))
            .map(String::as_str)
            .collect();
        if !needers.is_empty() {
            println!(
                "vm: {} is loaded without --pmem: {} needs it on {} (modules.dep)",
                initramfs::PMEM_MODULE,
                needers.join(", "),
                kernel.release
            );
        }
    }

    let tracer = match (&options.tracer_binary, options.no_tracer) {
        (_, true) => None,
        (Some(binary), false) => Some(check_tracer(binary)?),
        (None, false) => Some(check_tracer(&build_tracer()?)?),
    };

    let nonce = nonce();
    let tmp = TempDir::new(&nonce)?;
    let share = tmp.0.join("share");
    let cxl_dir = tmp.0.join("cxl");
    fs::create_dir_all(&share)?;
    fs::create_dir_all(&cxl_dir)?;

    let (script_file, user_command) = user_command(&options.script)?;
    let config = guest::GuestConfig {
        nonce: &nonce,
        expect_memdevs: options.topology.memdevs(),
        tracer: tracer.is_some(),
        manual_tracer: options.manual_tracer,
        load_cxl: !options.no_cxl_at_boot,
        basic_modules: &basic_modules,
        count_calls: &options.count_calls,
        workloads: &workloads,
        cycles: options.cycles,
        user_command,
        load_modules: &load,
        settle_secs: 30,
    };
    let base = initramfs::base(&kernel, &index, &modules)?;
    let initrd = tmp.0.join("initrd.cpio");
    initramfs::write_initrd(
        &base,
        &initramfs::RunPart {
            release: &kernel.release,
            config: config.render(),
            modules_dep: initramfs::guest_modules_dep(&index, &modules, &user_modules)?,
            user_modules: &user_modules,
            tracer: tracer.as_deref(),
            script: script_file.as_deref(),
            extra_files: &options.extra_files,
        },
        &initrd,
    )?;

    let timeout = options.timeout.unwrap_or(180 + 15 * u64::from(options.cycles) * workloads.len() as u64);
    let (accel, accel_reason) = choose_accel(options.accel, &kernel.image, &tmp.0)?;
    let out = match &options.out {
        Some(out) => out.clone(),
        None => util::workspace_root().join("target/vm").join(utc_stamp()),
    };
    fs::create_dir_all(&out).with_context(|| format!("creating the results directory {}", out.display()))?;
    // A reused --out must not show an earlier run's results as this one's.
    for stale in RESULT_FILES {
        let _ = fs::remove_file(out.join(stale));
    }

    // `quiet` keeps the boot fast on the emulated serial port; failures still reach the
    // console (an oops turns the console verbose) and the full dmesg is saved at the end.
    let mut cmdline = String::from(
        "console=ttyS0 quiet printk.time=1 pci=nomsi pcie_ports=native panic=1 \
         sysctl.kernel.hung_task_timeout_secs=60",
    );
    if let Some(extra) = &options.cmdline {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    let cpus = options.cpus.unwrap_or(accel.default_cpus());
    let machine = qemu::Machine {
        accel,
        cpus,
        kernel: &kernel.image,
        initrd: &initrd,
        cmdline: &cmdline,
        share: Some(&share),
        cxl: Some((options.topology, &cxl_dir)),
    };
    println!(
        "vm: booting {} ({}) with topology {} on {accel} with {cpus} vCPU(s), bound {} s; console in {}",
        kernel.release,
        kernel.image.display(),
        options.topology.name(),
        timeout,
        out.join("console.log").display()
    );
    let result_prefix = format!("tracer-vm: result {nonce} ");
    let session = qemu::boot(
        machine.command(),
        &qemu::Watch {
            result_prefix: &result_prefix,
            timeout: Duration::from_secs(timeout),
            log: Some(&out.join("console.log")),
            echo: !options.quiet,
        },
    )?;

    copy_results(&share.join("out"), &out)?;
    if let Some(tracer) = &tracer {
        write_ktap(tracer, &out);
    }
    let failure = judge(&session, timeout, &out);
    let tracer_exit = last_value(&session.lines, "tracer-vm: tracer exit=");
    let failure = failure.or_else(|| {
        (tracer_exit == Some(1)).then(|| Failure::Findings { count: count_findings(&out.join("findings.jsonl")) })
    });
    Ok(Run {
        out,
        release: kernel.release,
        accel,
        accel_reason,
        to_init: session.mark("tracer-vm: init started"),
        to_ready: session.mark("tracer-vm: topology ready"),
        elapsed: session.elapsed,
        workloads: workload_timings(&session.lines),
        tracer_exit,
        failure,
        console: session.lines,
    })
}

/// `results.ktap` next to `findings.jsonl`, for CI systems that read KTAP: the recorded trace
/// analyzed by the same (static) tracer build on the host. A run without a trace has none;
/// a failure to write it is said, not fatal (findings.jsonl is the run's verdict).
fn write_ktap(tracer: &Path, out: &Path) {
    let trace = out.join("trace.bin");
    if !trace.exists() {
        return;
    }
    match std::process::Command::new(tracer).args(["analyze", "--format", "ktap", "--strict"]).arg(&trace).output() {
        Ok(result) if matches!(result.status.code(), Some(0..=2)) && !result.stdout.is_empty() => {
            if let Err(err) = fs::write(out.join("results.ktap"), &result.stdout) {
                println!("vm: warning: writing results.ktap: {err}");
            }
        }
        Ok(result) => println!(
            "vm: warning: no results.ktap: tracer analyze --format ktap exited {}: {}",
            result.status,
            String::from_utf8_lossy(&result.stderr).trim()
        ),
        Err(err) => println!("vm: warning: no results.ktap: cannot run {}: {err}", tracer.display()),
    }
}

/// The verdict on a finished boot, in order of what explains it best.
fn judge(session: &qemu::Session, timeout: u64, out: &Path) -> Option<Failure> {
    if let Some((crash, at)) = session.crash {
        return Some(Failure::Crash { crash, line: session.lines[at].clone(), excerpt: session.excerpt(at) });
    }
    // Failures that stay off the console under `quiet` (warnings) are in the saved dmesg.
    if let Ok(dmesg) = fs::read_to_string(out.join("dmesg.txt")) {
        let lines: Vec<&str> = dmesg.lines().collect();
        if let Some((at, crash)) = lines.iter().enumerate().find_map(|(i, l)| Crash::detect(l).map(|c| (i, c))) {
            let excerpt = lines[at.saturating_sub(8)..(at + 45).min(lines.len())].join("\n");
            return Some(Failure::Crash { crash, line: lines[at].to_owned(), excerpt });
        }
    }
    if session.timed_out {
        return Some(Failure::Timeout { secs: timeout, tail: session.tail(30) });
    }
    match session.result {
        None => Some(Failure::NoResult {
            status: session.status.map_or("status unknown".to_owned(), |s| s.to_string()),
            tail: session.tail(30),
        }),
        Some(0) => None,
        Some(exit) => Some(Failure::Guest {
            exit,
            reason: session.lines.iter().find_map(|l| {
                l.strip_prefix("tracer-vm: error: ").or_else(|| l.strip_prefix("tracer-vm: FAIL: ")).map(str::to_owned)
            }),
            tail: session.tail(30),
        }),
    }
}

/// The user's script as the guest runs it: a host file is copied to /vm/script, anything
/// else is a guest command. Returns the file to copy and the shell-quoted command line.
fn user_command(script: &[String]) -> anyhow::Result<(Option<PathBuf>, String)> {
    let Some((first, args)) = script.split_first() else {
        return Ok((None, String::new()));
    };
    let host = Path::new(first);
    let (file, command) = if host.is_file() {
        let file = fs::canonicalize(host).with_context(|| format!("reading {first}"))?;
        (Some(file), "/vm/script".to_owned())
    } else {
        (None, first.clone())
    };
    let words: Vec<String> =
        std::iter::once(command.as_str()).chain(args.iter().map(String::as_str)).map(guest::shell_quote).collect();
    Ok((file, words.join(" ")))
}

fn choose_accel(requested: Accel, kernel: &Path, tmp: &Path) -> anyhow::Result<(Accel, String)> {
    match requested {
        Accel::Kvm => Ok((Accel::Kvm, "requested with --accel kvm".to_owned())),
        Accel::Tcg => Ok((Accel::Tcg, "requested with --accel tcg".to_owned())),
        Accel::Auto => {
            let (works, reason) = qemu::kvm_works(kernel, || {
                let initrd = tmp.join("kvm-probe.cpio");
                initramfs::write_probe_initrd(&initrd)?;
                Ok(initrd)
            })?;
            if works { Ok((Accel::Kvm, reason)) } else { Ok((Accel::Tcg, format!("KVM unusable, {reason}"))) }
        }
    }
}

/// `--count-calls` takes `FUNCTION` or `MODULE:FUNCTION`, both C identifiers (the function
/// name also names the kretprobe event).
fn check_count_spec(spec: &str) -> anyhow::Result<()> {
    let ident = |s: &str| {
        !s.is_empty()
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    let ok = match spec.split_once(':') {
        Some((module, function)) => ident(module) && ident(function),
        None => ident(spec),
    };
    if !ok {
        bail!("--count-calls {spec:?}: expected FUNCTION or MODULE:FUNCTION (C identifiers)");
    }
    Ok(())
}

/// The static musl tracer the guest runs, built (when stale) and checked; the host can run
/// it too (`tracer analyze`/`print` on a copied trace), so both sides use the same build.
pub fn tracer_binary() -> anyhow::Result<PathBuf> {
    check_tracer(&build_tracer()?)
}

/// Builds the static musl tracer for the guest and checks that it has `tracer run`.
fn build_tracer() -> anyhow::Result<PathBuf> {
    setup::ensure()?;
    println!("vm: building the static tracer for the guest");
    util::build_static("tracer", "tracer")
}

/// Checks that `binary` has `tracer run` as the guest uses it, and runs without a loader.
fn check_tracer(binary: &Path) -> anyhow::Result<PathBuf> {
    let binary = fs::canonicalize(binary).with_context(|| format!("tracer binary {} not found", binary.display()))?;
    let elf = fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
    if elf.starts_with(b"\x7fELF") && initramfs::has_interpreter(&elf)? {
        bail!(
            "{} is dynamically linked and cannot run in the guest: build it with \
             --target x86_64-unknown-linux-musl",
            binary.display()
        );
    }
    // The guest runs `tracer run --format json --record FILE -- CMD`: check the build has it
    // before spending a boot on a binary that would ignore the command.
    let help = Command::new(&binary)
        .args(["run", "--help"])
        .output()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&help.stdout), String::from_utf8_lossy(&help.stderr));
    if !help.status.success() || !text.contains("--record") || !text.contains("--format") {
        bail!(
            "{} does not implement `tracer run --format json --record FILE -- CMD` yet \
             (`tracer run --help` does not list those options): use --no-tracer until it does",
            binary.display()
        );
    }
    Ok(binary)
}

fn copy_results(from: &Path, to: &Path) -> anyhow::Result<()> {
    let Ok(entries) = fs::read_dir(from) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            fs::create_dir_all(&target)?;
            copy_results(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {} to {}", entry.path().display(), target.display()))?;
        }
    }
    Ok(())
}

fn count_findings(path: &Path) -> usize {
    fs::read_to_string(path)
        .map(|s| s.lines().filter(|l| l.starts_with('{') && !l.starts_with("{\"summary\"")).count())
        .unwrap_or(0)
}

/// The value after the last line starting with `prefix`.
fn last_value(lines: &[String], prefix: &str) -> Option<i32> {
    lines.iter().rev().find_map(|l| l.strip_prefix(prefix)).and_then(|v| v.trim().parse().ok())
}

/// Parses `tracer-vm: workload NAME passed cycles=N total_ms=T per_cycle_ms=P` lines.
fn workload_timings(lines: &[String]) -> Vec<WorkloadTiming> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("tracer-vm: workload "))
        .filter_map(|rest| {
            let (name, rest) = rest.split_once(" passed ")?;
            let field = |key: &str| {
                rest.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
            };
            Some(WorkloadTiming {
                name: name.to_owned(),
                cycles: u32::try_from(field("cycles")?).ok()?,
                per_cycle: Duration::from_millis(field("per_cycle_ms")?),
            })
        })
        .collect()
}

fn nonce() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    format!("{:08x}{:06x}", kernel::fnv1a(&nanos.to_le_bytes()) as u32, std::process::id() & 0xff_ffff)
}

/// `20261123-210501` in UTC, for result directory names.
pub fn utc_stamp() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian), by 400-year eras.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workload_timings() {
        let lines = vec![
            "tracer-vm: cycle memdev-bind 1/2 ms=400".to_owned(),
            "tracer-vm: workload memdev-bind passed cycles=2 total_ms=900 per_cycle_ms=450".to_owned(),
        ];
        let t = workload_timings(&lines);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].name, "memdev-bind");
        assert_eq!(t[0].cycles, 2);
        assert_eq!(t[0].per_cycle, Duration::from_millis(450));
    }

    #[test]
    fn count_specs_are_identifiers() {
        for ok in ["cxl_mem:cxl_mem_probe", "devm_cxl_add_port", "_x1"] {
            check_count_spec(ok).unwrap();
        }
        for bad in ["", "a:b:c", "1abc", "f+0x10", "m:", ":f", "f;rm"] {
            assert!(check_count_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn guest_commands_are_quoted() {
        let (file, cmd) = user_command(&["sh".to_owned(), "-c".to_owned(), "echo 'c' > /x".to_owned()]).unwrap();
        assert!(file.is_none());
        assert_eq!(cmd, r#"'sh' '-c' 'echo '\''c'\'' > /x'"#);
    }

    #[test]
    fn utc_stamp_has_the_shape_of_a_date() {
        let s = utc_stamp();
        assert_eq!(s.len(), 15);
        assert!(s.starts_with("20"));
        assert_eq!(&s[8..9], "-");
    }
}
