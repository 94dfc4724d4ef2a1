//! `cargo xtask vm run` from code: prepare (prepare.rs), boot (boot.rs), judge (judge.rs).
use super::{Run, RunOptions, boot, judge, prepare};

/// Boots the guest as `options` say and returns what happened. An `Err` means the run
/// could not be made (a build, a download, a bad option); a run that was made and failed is
/// an `Ok` with `failure` set, its results copied.
pub fn execute(options: &RunOptions) -> anyhow::Result<Run> {
    let prepared = prepare::prepare(options)?;
    let booted = boot::boot(options, &prepared)?;
    Ok(judge::judge(prepared, booted))
}
