//! `cargo xtask test`: the whole test suite, as CI runs it.
use crate::{setup, util};

#[derive(clap::Args)]
pub struct Options {
    /// Run only the host tests (unit, golden, property), not the QEMU guest suite.
    #[arg(long)]
    pub host_only: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    setup::ensure()?;
    println!("test: host suite (cargo test --workspace)");
    util::run(util::cargo().args(["test", "--workspace"]))?;
    if options.host_only {
        println!("test: guest suite not run (--host-only)");
        return Ok(());
    }
    println!("test: guest suite (QEMU CXL guest)");
    crate::vm::suite()
}
