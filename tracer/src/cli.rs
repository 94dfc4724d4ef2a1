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
    },
    /// Print the events of a trace: readable text, or the JSON-lines interchange.
    Print {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
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
        #[command(flatten)]
        probe: ProbeArgs,
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
        /// Extra use sites, as for `run`.
        #[arg(long = "use-site", value_name = "[MODULE:]FUNCTION:ARG")]
        use_sites: Vec<String>,
        /// Only inspect: do not load and attach the programs.
        #[arg(long)]
        no_attach: bool,
    },
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
}
