//! `cargo xtask test`: the whole test suite, as CI runs it.
use anyhow::Context as _;

use crate::{setup, util};

/// The lints `cargo xtask test` holds the host crates to.
const CLIPPY: &[&str] =
    &["clippy", "-p", "tracer", "-p", "tracer-common", "-p", "xtask", "--all-targets", "--", "-D", "warnings"];

#[derive(clap::Args)]
pub struct Options {
    /// Run only the host tests (unit, golden, property), not the QEMU guest suite.
    #[arg(long)]
    pub host_only: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    setup::ensure()?;
    // The layout and the lints first: they take seconds and fail for reasons a reader of
    // the diff can see. rustfmt.toml's import options need the nightly rustfmt; clippy
    // skips tracer-ebpf, whose no_std binary cannot build for the host's test target.
    println!("test: layout (cargo +nightly fmt --check)");
    let mut fmt = std::process::Command::new("rustup");
    fmt.args(["run", "nightly", "cargo", "fmt", "--all", "--", "--check"]).current_dir(util::workspace_root());
    util::run(&mut fmt).context("the code is not laid out as rustfmt.toml says: run `cargo +nightly fmt --all`")?;
    println!("test: lints (cargo clippy -- -D warnings)");
    util::run(util::cargo().args(CLIPPY)).context("clippy warns: fix what it says")?;
    println!("test: host suite (cargo test --workspace)");
    util::run(util::cargo().args(["test", "--workspace"]))?;
    if options.host_only {
        println!("test: guest suite not run (--host-only)");
        return Ok(());
    }
    println!("test: guest suite (QEMU CXL guest)");
    crate::vm::suite()
}
