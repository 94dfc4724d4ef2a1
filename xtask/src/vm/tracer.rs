//! The static musl tracer the guest runs: built when stale and checked before a boot is spent
//! on it. The host runs the same build (`tracer analyze`/`print` on a copied trace), so both
//! sides read one format.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::initramfs;
use crate::{setup, util};

/// The static musl tracer, built (when stale) and checked.
pub fn tracer_binary() -> anyhow::Result<PathBuf> {
    check(&build()?)
}

/// Builds the static musl tracer for the guest.
fn build() -> anyhow::Result<PathBuf> {
    setup::ensure()?;
    println!("vm: building the static tracer for the guest");
    util::build_static("tracer", "tracer")
}

/// `binary` (`--tracer-binary`), or a fresh build, checked.
pub fn given_or_built(binary: Option<&Path>) -> anyhow::Result<PathBuf> {
    match binary {
        Some(binary) => check(binary),
        None => tracer_binary(),
    }
}

/// Checks that `binary` has `tracer run` as the guest uses it, and runs without a loader.
fn check(binary: &Path) -> anyhow::Result<PathBuf> {
    let binary = fs::canonicalize(binary).with_context(|| format!("tracer binary {} not found", binary.display()))?;
    let elf = fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
    if elf.starts_with(b"\x7fELF") && initramfs::has_interpreter(&elf)? {
        bail!(
            "{} is dynamically linked and cannot run in the guest: build it with \
             --target x86_64-unknown-linux-musl",
            binary.display()
        );
    }
    // The guest runs `tracer run --format json --record FILE -- CMD`: check the build has it
    // before spending a boot on a binary that would ignore the command.
    let help = Command::new(&binary)
        .args(["run", "--help"])
        .output()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&help.stdout), String::from_utf8_lossy(&help.stderr));
    if !help.status.success() || !text.contains("--record") || !text.contains("--format") {
        bail!(
            "{} does not implement `tracer run --format json --record FILE -- CMD` yet \
             (`tracer run --help` does not list those options): use --no-tracer until it does",
            binary.display()
        );
    }
    Ok(binary)
}
