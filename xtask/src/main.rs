//! Developer tasks cargo cannot do by itself: set-up, the test suite, the QEMU CXL guest.
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "tracer developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (idempotent): Debian packages, the nightly
    /// rust-src, the musl target, bpf-linker against the nightly's LLVM.
    Setup,
    /// Set up, then run the unit, golden and property tests, then the guest suite.
    Test(test::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Test(options) => test::run(&options),
    }
}
