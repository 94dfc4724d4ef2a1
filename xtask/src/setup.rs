//! `cargo xtask setup`: installs what a fresh Debian machine lacks, idempotently.
//!
//! Each step checks first and only acts when something is missing, so every task that needs
//! the toolchain can call `ensure()` cheaply.
use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{
    debian::{STOCK_KERNELS, StockKernel, Suite},
    util::{self, cache_dir, cargo_home, output},
};

/// Debian packages the project uses: the QEMU guest (qemu, busybox for its userland, kmod
/// for depmod), bpftool/bpftrace for the guest's comparison runs and leak checks, Chromium
/// for the timeline page's browser test, and a kernel source tarball for the kernel's own
/// KTAP parser (tools/testing/kunit; any version will do) that the KTAP test runs, and
/// shellcheck for the guest's shell (`xtask/guest/`, linted in `cargo test -p xtask`); the
/// out-of-tree module fixtures add `fixture_packages()`.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "xz-utils",
    "zstd",
    "gcc-12",
    "make",
    "bpftool",
    "bpftrace",
    "chromium",
    "linux-source-6.12",
    "python3",
    "shellcheck",
];

/// Host tools every fixture build uses: patch to apply the fix, xz for the source tarball and
/// the distro's modules, make for Kbuild.
const FIXTURE_TOOLS: &[&str] = &["make", "patch", "xz-utils"];

/// What `cargo xtask fixture --kernel K` needs on the host (it ensures only these; set-up
/// installs them for every kernel). A bookworm kernel builds on the host: its headers package
/// (which pulls in `-common`, `linux-kbuild` and pahole for module BTF) and the compiler
/// Debian built it with. A sid kernel builds in a sid chroot that debootstrap makes. The
/// source packages are not installed: the fixtures fetch them as .debs pinned to the headers'
/// version.
pub fn fixture_packages(kernel: &StockKernel) -> Vec<&'static str> {
    let mut packages = FIXTURE_TOOLS.to_vec();
    match kernel.suite {
        Suite::Host => packages.extend([kernel.headers_package, kernel.compiler]),
        Suite::Sid => packages.push("debootstrap"),
    }
    packages
}

/// What `--kernel 7.2-src` needs on the host (docs/source-kernel.md): debootstrap for the sid
/// chroot it builds in, patch for `--patch`, xz to extract the source, kmod's depmod for the
/// installed modules. The chroot's own build packages are installed inside it on first use.
pub const SOURCE_KERNEL_PACKAGES: &[&str] = &["debootstrap", "patch", "xz-utils", "kmod"];

/// bpf-linker release the eBPF build is known to work with (docs/design.md, section 6).
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> anyhow::Result<()> {
    let mut packages = DEBIAN_PACKAGES.to_vec();
    for kernel in STOCK_KERNELS {
        packages.extend(fixture_packages(kernel));
    }
    packages.extend(SOURCE_KERNEL_PACKAGES);
    packages.sort_unstable();
    packages.dedup();
    ensure_packages(&packages)?;
    ensure_rust()?;
    ensure_bpf_linker()?;
    println!("setup: done");
    Ok(())
}

/// Set-up as a first step of other tasks.
pub fn ensure() -> anyhow::Result<()> {
    run()
}

fn step(what: &str) {
    println!("setup: {what}");
}

/// Installs those of `packages` that are not installed yet (one `apt-get update` first).
pub fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !package_installed(p)).collect();
    if missing.is_empty() {
        step(&format!("debian packages: all {} present", packages.len()));
        return Ok(());
    }
    step(&format!("debian packages: installing {}", missing.join(" ")));
    let sudo = needs_sudo()?;
    let apt = |args: &[&str]| {
        let mut cmd = if sudo { Command::new("sudo") } else { Command::new("apt-get") };
        if sudo {
            cmd.arg("apt-get");
        }
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    util::run(&mut apt(&["update", "-q"])).context("apt-get update failed")?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&missing);
    util::run(&mut install).context("installing Debian packages failed")?;
    Ok(())
}

pub fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|out| out.status.success() && out.stdout.ends_with(b"install ok installed"))
        .unwrap_or(false)
}

fn needs_sudo() -> anyhow::Result<bool> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(false);
    }
    if Command::new("sudo").arg("-n").arg("true").status().is_ok_and(|s| s.success()) {
        return Ok(true);
    }
    bail!("installing Debian packages needs root: run `cargo xtask setup` as root or with passwordless sudo")
}

fn ensure_rust() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF side")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("rust: installing the nightly toolchain");
        util::run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let components =
        output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]))?;
    for (component, why) in [
        ("rust-src", "the eBPF build compiles core"),
        ("rustfmt", "`cargo xtask test` checks the layout with rustfmt.toml's unstable import options"),
    ] {
        if !components.lines().any(|l| l.starts_with(component)) {
            step(&format!("rust: adding {component} to nightly ({why})"));
            util::run(Command::new("rustup").args(["component", "add", component, "--toolchain", "nightly"]))?;
        }
    }
    let stable = output(Command::new("rustup").args(["component", "list", "--installed"]))?;
    if !stable.lines().any(|l| l.starts_with("clippy")) {
        step("rust: adding clippy (`cargo xtask test` runs it)");
        util::run(Command::new("rustup").args(["component", "add", "clippy"]))?;
    }
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !targets.lines().any(|l| l == "x86_64-unknown-linux-musl") {
        step("rust: adding the x86_64-unknown-linux-musl target (static tracer for the guest)");
        util::run(Command::new("rustup").args(["target", "add", "x86_64-unknown-linux-musl"]))?;
    }
    step("rust: nightly with rust-src and rustfmt, clippy, the musl target present");
    Ok(())
}

/// bpf-linker must link against the same LLVM as the nightly rustc that emits the bitcode,
/// so it is built from source against the nightly's own libLLVM (docs/design.md, section 6).
fn ensure_bpf_linker() -> anyhow::Result<()> {
    let linker = cargo_home().join("bin/bpf-linker");
    if let Ok(version) = output(Command::new(&linker).arg("--version"))
        && version.contains(BPF_LINKER_VERSION)
    {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let verbose = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("nightly rustc -vV does not name its LLVM version")?
        .to_owned();
    let libllvm = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}: the nightly ships without its LLVM", lib_dir.display()))?;
    // A permanent prefix: bpf-linker loads libLLVM from it at run time.
    let prefix = cache_dir().join(format!("llvm-{llvm_major}-nightly"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib).with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(&libllvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    step(&format!(
        "bpf-linker: building {BPF_LINKER_VERSION} against the nightly's LLVM {llvm_major} (about a minute)"
    ));
    util::run(
        Command::new("cargo")
            .args(["install", "--locked", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", &format!("llvm-{llvm_major}")])
            .env("LLVM_PREFIX", &prefix),
    )
    .context("building bpf-linker failed")?;
    Ok(())
}
