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
}
