mod cli;
mod commands;
mod discover;
mod doctor;
mod kernel_log;
mod leftovers;
mod live;
mod preflight;
mod probe;
mod recorder;

use std::process::ExitCode;

use clap::Parser as _;

/// Exit status: 0 clean, 1 findings, 2 error (the contract of `run` and `analyze`).
pub enum Outcome {
    Clean,
    Findings,
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::run(cli.command) {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Findings) => ExitCode::from(1),
        Err(err) => {
            eprintln!("tracer: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
