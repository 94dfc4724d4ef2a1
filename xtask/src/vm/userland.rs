//! The guest's Debian userland (`--userland debian`, and the `cxl-cli` workload): a Debian sid
//! root with ndctl's tools (`cxl`, `ndctl`, `daxctl`), bash, jq and kmod, shared read-only to
//! the guest over 9p, where scripts run in it through `chroot` (xtask/guest/debian.sh). See
//! docs/vm.md, "The Debian userland".
//!
//! It is made once with debootstrap from the Debian mirror the host already uses (as the
//! fixtures' sid chroot is, xtask/src/fixture/chroot.rs) under `~/.cache/tracer/userland/`,
//! in a `.partial` folder renamed into place only when complete, with a stamp naming the
//! packages in it; a lock file keeps two runs from making it at once. Nothing in it depends
//! on the guest's kernel: the guest binds its own modules into it.
use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{debian, setup, util::cache_dir};

/// Where a run's script runs in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Userland {
    /// The initramfs's busybox (ash): fast to boot, no bash, jq or ndctl's tools.
    Busybox,
    /// The Debian sid root with ndctl's tools, bash, jq and kmod, over 9p (made on first use).
    Debian,
}

impl Userland {
    pub fn name(self) -> &'static str {
        match self {
            Userland::Busybox => "busybox",
            Userland::Debian => "debian",
        }
    }
}

/// The packages beyond debootstrap's minimal base (bash and util-linux are in it already;
/// named so that the list says what scripts may count on). `cxl`, `ndctl` and `daxctl` are
/// ndctl's three tools, each a package of its own in Debian.
pub const PACKAGES: &[&str] = &["bash", "util-linux", "jq", "kmod", "cxl", "ndctl", "daxctl"];

/// What a script finds there, by the variable the guest sets to its path (debian.sh).
pub const TOOLS: &[(&str, &str)] = &[("CXL", "usr/bin/cxl"), ("NDCTL", "usr/bin/ndctl"), ("DAXCTL", "usr/bin/daxctl")];

/// Bumped when what the build leaves in the root changes (its mount points, say).
const FORMAT: u32 = 1;

/// Folders the guest mounts its own over (the root is read-only in the guest, so they must
/// exist): its results share, its scripts, its kernel's modules (`/lib` is a link to
/// `usr/lib` in sid), and a tmpfs for its tracer and busybox (init.sh).
const MOUNT_POINTS: &[&str] = &["share", "vm", "usr/lib/modules", "usr/local/bin"];

/// Marks a finished root; holds `stamp()`.
const STAMP: &str = ".tracer-userland";

fn stamp() -> String {
    format!("format {FORMAT}\nsuite sid\npackages {}\n", PACKAGES.join(" "))
}

fn dir() -> PathBuf {
    cache_dir().join("userland")
}

/// The finished root, made first when it is missing, unfinished or broken.
pub fn ensure() -> anyhow::Result<PathBuf> {
    let root = dir().join("debian-sid");
    let _lock = lock(&dir().join("debian-sid.lock"))?;
    let why = match health(&root) {
        Ok(()) => return Ok(root),
        Err(why) => why,
    };
    if root.exists() {
        println!("vm: the Debian userland {} {why:#}: making it again", root.display());
    }
    make(&root)?;
    health(&root).context("the Debian userland was just made but is not complete")?;
    Ok(root)
}

/// Why the root cannot be used as it is, if it cannot.
fn health(root: &Path) -> anyhow::Result<()> {
    match fs::read_to_string(root.join(STAMP)).ok() {
        None if !root.exists() => bail!("does not exist"),
        None => bail!("was never finished"),
        Some(found) if found != stamp() => bail!("holds other packages"),
        Some(_) => {}
    }
    let needed = TOOLS.iter().map(|(_, path)| *path).chain(["usr/bin/bash", "usr/bin/jq", "usr/bin/kmod"]);
    for path in needed.chain(MOUNT_POINTS.iter().copied()) {
        if !root.join(path).exists() {
            bail!("lacks /{path}");
        }
    }
    Ok(())
}

/// debootstrap into a `.partial` folder, the mount points, the stamp, then the rename.
fn make(root: &Path) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("making the guest's Debian userland runs debootstrap, which needs root: run the command as root");
    }
    setup::ensure_packages(&["debootstrap"])?;
    let partial = root.with_file_name("debian-sid.partial");
    let log = root.with_file_name("debian-sid.log");
    for old in [root, partial.as_path()] {
        remove_tree(old)?;
    }
    let mirror = debian::host_debian_mirror()?;
    println!(
        "vm: making the guest's Debian userland (sid, {}) in {} from {mirror}: a few minutes, once; log in {}",
        PACKAGES.join(" "),
        root.display(),
        log.display()
    );
    let started = Instant::now();
    let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    // debootstrap resolves the dependencies of --include itself and never checks the
    // Release file's Valid-Until (which the sid Release served here is past): no apt run
    // inside the root is needed.
    let mut cmd = Command::new("debootstrap");
    cmd.args(["--variant=minbase", &format!("--include={}", PACKAGES.join(",")), "sid"]).arg(&partial).arg(&mirror);
    let status = cmd
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .context("cannot start debootstrap (cargo xtask setup installs it)")?;
    if !status.success() {
        let text = fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        let _ = remove_tree(&partial);
        bail!(
            "debootstrap of Debian sid with {} from {mirror} failed ({status}; sid may have moved on); the end of {}:\n{tail}",
            PACKAGES.join(" "),
            log.display()
        );
    }
    // debootstrap leaves the .debs it installed: nothing in the guest reads them.
    let archives = partial.join("var/cache/apt/archives");
    for entry in fs::read_dir(&archives).into_iter().flatten().filter_map(Result::ok) {
        if entry.path().extension().is_some_and(|e| e == "deb") {
            let _ = fs::remove_file(entry.path());
        }
    }
    for point in MOUNT_POINTS {
        let path = partial.join(point);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    }
    fs::write(partial.join(STAMP), stamp()).with_context(|| format!("writing the stamp in {}", partial.display()))?;
    fs::rename(&partial, root).with_context(|| format!("moving {} to {}", partial.display(), root.display()))?;
    println!(
        "vm: the Debian userland is ready in {:.0} s ({}): cxl {}",
        started.elapsed().as_secs_f64(),
        root.display(),
        package_version(root, "cxl").unwrap_or_else(|e| format!("(version unknown: {e:#})"))
    );
    Ok(())
}

/// The installed version of `package` in the root, from its dpkg database.
pub fn package_version(root: &Path, package: &str) -> anyhow::Result<String> {
    crate::util::output(
        Command::new("dpkg-query").arg(format!("--admindir={}", root.join("var/lib/dpkg").display())).args([
            "-W",
            "-f=${Version}",
            package,
        ]),
    )
}

/// An exclusive lock on `path` for as long as the file is open; says when it waits.
fn lock(path: &Path) -> anyhow::Result<File> {
    crate::util::lock_file(path, "vm: another run that makes the Debian userland")
}

/// Removes a root, after unmounting what a killed debootstrap left mounted inside it (its
/// /proc and /sys): a recursive delete must never walk into them.
fn remove_tree(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in &points {
        println!("vm: unmounting {}, left by an earlier debootstrap", point.display());
        let _ = Command::new("umount").arg("-l").arg(point).status();
    }
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_names_every_package_and_tool_package() {
        let stamp = stamp();
        for package in PACKAGES {
            assert!(stamp.contains(package), "{package} missing from {stamp:?}");
        }
        for (_, path) in TOOLS {
            let tool = path.rsplit('/').next().unwrap();
            assert!(PACKAGES.contains(&tool), "{tool} is no package of the root");
        }
    }
}
