//! Command-line interface.
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tracer::sink::Format;

#[derive(Parser)]
#[command(name = "tracer", version, about = "eBPF lock-discipline tracer for CXL dports")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Replay a recorded trace (binary or JSON-lines events) through the engine and report
    /// the findings. Exit status: 0 no findings, 1 findings, 2 error.
    Analyze {
        /// Binary trace file or JSON-lines events (told apart by content).
        file: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        report: ReportArgs,
        #[command(flatten)]
        known: KnownArgs,
        /// Exit with status 2 when the input has nothing to judge (empty, or no event about
        /// a dport) or lost events (undecodable, cut off, dropped in the kernel); with
        /// `--format ktap`, lost events also fail the lost-events test.
        #[arg(long)]
        strict: bool,
        /// Print the full site coverage table (every probed load, use and deref site: how
        /// often it ran, reported a dport, was judged) after the report, on stdout (on stderr
        /// with --format json or ktap, which keep stdout machine-readable); the trace must be
        /// one `tracer run --record` wrote.
        #[arg(long)]
        coverage: bool,
    },
    /// Print the events of a trace: readable text, or the JSON-lines interchange.
    Print {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        format: EventFormat,
    },
    /// Draw the findings of a trace (binary or JSON-lines events) on a time axis: a lane
    /// per thread, loads, lock holds, uses, inline accesses, erases and frees, the findings
    /// highlighted. One self-contained HTML page, or Trace Event Format JSON for Perfetto.
    Timeline {
        file: PathBuf,
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: PathBuf,
        /// Only this finding (its number in `tracer analyze`'s report, from 1): its dport,
        /// its locks, from its load to its last occurrence. Default: everything.
        #[arg(long, value_name = "N")]
        finding: Option<usize>,
        #[arg(long, value_enum, default_value = "html")]
        format: TimelineFormat,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// Convert events (a binary trace or JSON lines) into a binary trace file.
    Convert {
        file: PathBuf,
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: PathBuf,
    },
    /// Attach to the running kernel and report findings as they happen, with a summary at
    /// the end. Stops on Ctrl-C, SIGTERM, or when CMD exits. Exit status: 0 no findings,
    /// 1 findings, 2 error. Text findings stream live; JSON findings are printed at the
    /// end, grouped with their final counts.
    Run {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Also keep the raw events in this binary trace file.
        #[arg(long, value_name = "FILE")]
        record: Option<PathBuf>,
        /// Exit with status 2 when any event was lost (dropped in the kernel or undecodable),
        /// when a probe could not be attached, or when the run saw no CXL activity at all.
        #[arg(long)]
        strict: bool,
        #[command(flatten)]
        probe: ProbeArgs,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        report: ReportArgs,
        #[command(flatten)]
        known: KnownArgs,
        /// Command to trace (its stdout goes to tracer's stderr, so stdout carries findings).
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Record kernel events into a binary trace file (analyze it later with `analyze`).
    Record {
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: PathBuf,
        #[command(flatten)]
        probe: ProbeArgs,
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// What this kernel supports: privileges, BTF, offsets, CXL code, each probe target and
    /// how it is probed; then loads and attaches everything once as a check.
    Doctor {
        #[command(flatten)]
        probe: ProbeArgs,
        /// Only inspect: do not load and attach the programs.
        #[arg(long)]
        no_attach: bool,
    },
    /// Write a starting known-findings file from a run: the title of every finding in FILE
    /// (a binary trace, JSON-lines events, or a JSON report such as findings.jsonl), each with
    /// a reason to replace by the real one. Then `run`/`analyze --known OUT` fail only on new
    /// findings.
    Known {
        file: PathBuf,
        /// Where to write it (default: standard output).
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// List what tracer instances left in the kernel: BPF programs, maps and links, and
    /// kprobe events. Programs and maps are given up to 3 s to go (the kernel frees an
    /// exited instance's maps a grace period after its programs). Exit status 0 when
    /// nothing is left, 2 otherwise.
    Leftovers,
}

/// How `timeline` writes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TimelineFormat {
    /// One self-contained HTML page.
    Html,
    /// Trace Event Format JSON (Perfetto's UI, chrome://tracing).
    ChromeTrace,
}

/// How `print` writes events.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EventFormat {
    Text,
    /// The JSON-lines event interchange.
    Json,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LockEvents {
    Callsites,
    Global,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XaLoadProbe {
    Callsites,
    Direct,
}

#[derive(clap::Args)]
pub struct ReportArgs {
    /// Report every use on its own, instead of one finding per root cause (the uses of one
    /// loaded pointer in one call chain, listed under the outermost as "also").
    #[arg(long)]
    pub no_fold: bool,
}

#[derive(clap::Args)]
pub struct KnownArgs {
    /// Known findings: a file of finding titles, one per line with why it is known after a
    /// `#` (`tracer known` writes a starting one). Known findings are still reported, apart;
    /// the exit status and --strict judge only the others.
    #[arg(long, value_name = "FILE")]
    pub known: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct LimitArgs {
    /// Most live dports the engine tracks; past it the oldest are evicted (and counted).
    #[arg(long, default_value_t = 65_536, value_name = "N")]
    pub max_dports: usize,
    /// Most freed dports remembered to recognise a use-after-free.
    #[arg(long, default_value_t = 16_384, value_name = "N")]
    pub max_freed_dports: usize,
    /// Most threads with state; past it the least recently seen are evicted (and counted).
    #[arg(long, default_value_t = 16_384, value_name = "N")]
    pub max_threads: usize,
}

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// Another function that dereferences a dport: `[MODULE:]FUNCTION:ARG`, ARG being the
    /// index (0-5) of its `struct cxl_dport *` argument. Repeatable.
    #[arg(long = "use-site", value_name = "[MODULE:]FUNCTION:ARG")]
    pub use_sites: Vec<String>,
    /// Ring buffer size in KiB (a power of two, at least 4).
    #[arg(long, default_value_t = 8192, value_name = "KIB")]
    pub ring_kib: u32,
    /// Where the kernel's BTF is (vmlinux and module files).
    #[arg(long, default_value = "/sys/kernel/btf", value_name = "DIR")]
    pub btf_dir: PathBuf,
    /// Where lock events come from: `callsites` (the mutex_lock/mutex_unlock calls in CXL
    /// code; nothing else pays) or `global` (fexit/fentry on the mutex API itself: also
    /// sees locks taken outside CXL code, at a map lookup on every mutex in the system).
    #[arg(long, value_enum, default_value = "callsites")]
    pub lock_events: LockEvents,
    /// Where lookups are seen: `callsites` (each `call xa_load` in CXL code, and its return),
    /// or `direct` (xa_load itself, on kernels where it is traceable; every xarray lookup in
    /// the system then pays a map lookup). Without xa_load call sites in CXL code, a
    /// traceable xa_load is probed directly anyway.
    #[arg(long, value_enum, default_value = "callsites")]
    pub xa_load: XaLoadProbe,
    /// Wait (up to SECS, default 600) for the CXL modules to be loaded before attaching,
    /// instead of failing when they are not.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "600")]
    pub wait_for_cxl: Option<u64>,
    /// Do not probe inline dereferences (`if (dport->rch)`): only calls that pass a dport on
    /// are uses then. Fewer kprobes, a faster attach, and a blind spot.
    #[arg(long)]
    pub no_derefs: bool,
    /// Show the kernel side's diagnostics as they happen: which tracking map was full,
    /// which kernel read failed, which event the ring buffer could not take (each is also
    /// counted in the summary either way). For `doctor`: load the programs with their
    /// logging on, as `run -v` does.
    #[arg(short, long)]
    pub verbose: bool,
}
