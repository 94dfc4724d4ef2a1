//! `cargo xtask dist`: the static tracer binary for a test machine of your own, the same
//! build the QEMU guest runs (vm/tracer.rs): musl, no loader, no library to install there.
//! README.md, "On your own test machine", says how to copy and run it.
use std::{fs, path::PathBuf};

use anyhow::Context as _;

use crate::vm;

#[derive(clap::Args)]
pub struct Options {
    /// Also copy it here (a file or a directory).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let binary = vm::tracer_binary()?;
    let binary = match &options.out {
        None => binary,
        Some(out) => {
            let target = if out.is_dir() { out.join("tracer") } else { out.clone() };
            fs::copy(&binary, &target)
                .with_context(|| format!("copying {} to {}", binary.display(), target.display()))?;
            target
        }
    };
    let size = fs::metadata(&binary).with_context(|| format!("reading {}", binary.display()))?.len();
    println!(
        "dist: {} ({:.1} MB, static x86_64 musl: copy it to any x86_64 Linux machine and run `sudo ./tracer doctor` there)",
        binary.display(),
        size as f64 / 1e6
    );
    Ok(())
}
