//! `cargo xtask vm`: boots a QEMU guest with an emulated CXL topology on a stock (or the
//! user's) kernel, runs hotplug workloads in it, under the tracer or not, and brings the
//! results back; the guest suite and the soak are built on it. See docs/vm.md.
//!
//! The harness never hangs and never lies: every boot has a wall-clock bound, the host reads
//! the serial console for kernel failures, and a run passes only when the guest printed its
//! result line (which carries a per-run nonce) with exit 0 and no failure was seen.
//!
//! This file holds the command and the types; a run is `run.rs` (prepare.rs, boot.rs,
//! judge.rs), the guest's shell is `xtask/guest/` (guest.rs), and the suite is `suite.rs`
//! (its cases in selftest.rs, traced.rs, reliability.rs and soak.rs, their shared part in
//! checks.rs).
mod basics;
mod boot;
mod calls;
mod checks;
mod cpio;
mod cxl_cli;
pub mod cxl_test;
pub mod expect;
pub mod findings;
mod guest;
mod initramfs;
mod judge;
mod kernel;
mod kernel_arg;
mod prepare;
mod qemu;
mod reliability;
mod results;
mod run;
mod selftest;
pub mod soak;
mod suite;
pub mod traced;
mod tracer;
mod userland;
mod workload;

use std::{fmt, fs, path::PathBuf, time::Duration};

use anyhow::bail;
pub use initramfs::GuestFile;
pub use kernel_arg::KernelArg;
pub use qemu::{Accel, Crash};
pub use results::utc_stamp;
pub use run::execute;
pub use suite::suite;
pub use tracer::tracer_binary;
pub use userland::Userland;
pub use workload::Workload;

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
    /// No emulated CXL device: the kernel's mock topology, tools/testing/cxl (cxl_test),
    /// loaded as modules (a kernel with the CXL core as modules: --kernel 7.2-src). Four host
    /// bridges (one of them an RCH with its RCD), switches, eleven memdevs.
    CxlTest,
}

impl Topology {
    fn memdevs(self) -> usize {
        match self {
            Topology::Rp => 1,
            Topology::Switch => 2,
            // tools/testing/cxl/test/cxl.c: 8 below the two multi-port host bridges, 2 below
            // the single-port one, 1 RCD.
            Topology::CxlTest => 11,
        }
    }

    /// QEMU emulates its CXL devices (else they are the kernel's own mocks).
    pub fn emulated(self) -> bool {
        self != Topology::CxlTest
    }

    pub fn name(self) -> &'static str {
        match self {
            Topology::Rp => "rp",
            Topology::Switch => "switch",
            Topology::CxlTest => "cxl-test",
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
    #[command(flatten)]
    pub kernel_patches: crate::source_kernel::PatchOptions,
    /// Where the results go (default: target/vm/<UTC time>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Wall-clock bound for the whole boot, in seconds; QEMU is killed after it. Default:
    /// 180 s plus 15 s per workload cycle (cxl-cli: 45 s, 150 s on cxl-test).
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
    /// Known findings (`tracer run --known`): a file of finding titles, each with why it is
    /// known (the repository's `known/` has one per stock kernel). Known findings are still
    /// reported, apart; only the others fail the run. results.ktap shows them skipped.
    #[arg(long, value_name = "FILE", conflicts_with = "no_tracer")]
    pub known: Option<PathBuf>,
    /// Where the script runs: busybox (the initramfs's ash), or debian, a Debian sid root
    /// with ndctl's tools (`$CXL`, `$NDCTL`, `$DAXCTL`), bash, jq and kmod, made on first use
    /// (docs/vm.md). The cxl-cli workload runs there whatever this says.
    #[arg(long, value_enum, default_value = "busybox")]
    pub userland: Userland,
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
            kernel_patches: Default::default(),
            out: None,
            timeout: None,
            accel: Accel::Auto,
            cpus: None,
            cmdline: None,
            quiet: false,
            known: None,
            userland: Userland::Busybox,
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
        cxl_cli::print_summary(&self.console, &self.out);
        let mut files: Vec<String> = fs::read_dir(&self.out)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        files.sort();
        println!("vm: results in {}: {}", self.out.display(), files.join(" "));
    }
}
