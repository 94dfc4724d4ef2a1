//! Developer tasks cargo cannot do by itself: set-up, the test suite, the QEMU CXL guest.
mod bench;
mod debian;
mod demo;
mod dist;
mod fixture;
mod setup;
mod source_kernel;
mod test;
mod util;
mod vm;

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
    /// Build an out-of-tree cxl_mem.ko for a kernel of the matrix from its Debian source
    /// (cached) and print its path: cxl-mem-fixed has the seed's dport read-side fix,
    /// cxl-mem-stock is the unmodified control (docs/fixtures.md).
    Fixture(fixture::Options),
    /// The main job: set up, then run the hotplug workloads under the tracer in the QEMU CXL
    /// guest on a stock kernel (7.2, the seed's, by default) and with the seed-fixed cxl_mem,
    /// and compare (docs/vm.md, docs/kernels.md).
    Demo(demo::Options),
    /// Measure the tracer's cost and capacity in the QEMU guest on 6.12 and 7.2 against no
    /// tracer (an A/A pair: the noise floor) and bpftrace, its memory on a long churn, and the
    /// engine's replay speed; print a table per kernel (README, Performance; docs/bench.md).
    Bench(Box<bench::Options>),
    /// Kernels built from source: `kernel build [--patch FILE|seed]` builds (or finds cached)
    /// the 7.2.13 kernel with the CXL core as modules and cxl_test (docs/source-kernel.md).
    Kernel {
        #[command(subcommand)]
        command: source_kernel::KernelCommand,
    },
    /// Build the static tracer the guest runs, for a test machine of your own, and print its
    /// path and size (README, "On your own test machine").
    Dist(dist::Options),
    /// The QEMU CXL guest: boot it, run hotplug workloads, collect results (docs/vm.md).
    Vm {
        #[command(subcommand)]
        command: vm::VmCommand,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Test(options) => test::run(&options),
        Command::Vm { command } => vm::command(command),
        Command::Kernel { command } => source_kernel::command(command),
        Command::Fixture(options) => fixture::run(&options),
        Command::Demo(options) => demo::run(&options),
        Command::Bench(options) => bench::run(&options),
        Command::Dist(options) => dist::run(&options),
    }
}
