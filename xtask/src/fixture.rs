//! `cargo xtask fixture NAME [--kernel K]`: out-of-tree rebuilds of the CXL memdev driver for
//! a kernel of the matrix (docs/fixtures.md).
//!
//! Both fixtures compile `drivers/cxl/mem.c` from Debian's source of the kernel against its
//! headers package, with the compiler Debian built it with, so the result loads in place of
//! the distro's `cxl_mem`: `cxl-mem-fixed` with the kernel's `xtask/fixtures/cxl-mem-fixed-K.patch`
//! (the read-side fix of the seed thread: as written for 7.2, adapted to 6.12 and 6.1),
//! `cxl-mem-stock` unmodified, as the control. The stock rebuild is compared function by
//! function with the distro's module to show that the rebuild itself changes nothing.
pub(crate) mod chroot;
mod code;
mod distro;
pub(crate) mod source;
mod toolchain;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use toolchain::Toolchain;

use crate::{
    debian::{self, StockKernel},
    util::{cache_dir, workspace_root},
};

/// The source file a fixture compiles, relative to `drivers/cxl`.
const MAIN_SOURCE: &str = "mem.c";
/// Kbuild for the out-of-tree module: the same object list as `drivers/cxl/Makefile`.
const KBUILD: &str = "obj-m := cxl_mem.o\ncxl_mem-y := mem.o\n";
const MODULE_FILE: &str = "cxl_mem.ko";

#[derive(clap::Args)]
pub struct Options {
    /// The fixture to build
    #[arg(value_enum)]
    pub fixture: Fixture,
    /// The kernel to build it for
    #[arg(
        long,
        value_name = "NAME",
        default_value = debian::DEFAULT_KERNEL,
        value_parser = clap::builder::PossibleValuesParser::new(debian::STOCK_KERNELS.iter().map(|k| k.name)),
        long_help = format!("The kernel to build it for: {}", debian::matrix_help()),
    )]
    pub kernel: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fixture {
    /// cxl_mem.ko whose probe fetches and uses the dport only under its free lock
    CxlMemFixed,
    /// cxl_mem.ko rebuilt from the unmodified source: the control
    CxlMemStock,
}

impl Fixture {
    pub fn name(self) -> &'static str {
        match self {
            Self::CxlMemFixed => "cxl-mem-fixed",
            Self::CxlMemStock => "cxl-mem-stock",
        }
    }

    /// The patch it applies to the kernel's `drivers/cxl/mem.c`: the kernel's own fix, or none.
    fn patch(self, kernel: &StockKernel) -> Option<&'static str> {
        match self {
            Self::CxlMemFixed => Some(kernel.fixed_cxl_mem),
            Self::CxlMemStock => None,
        }
    }
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let kernel = debian::stock_kernel(&options.kernel)?;
    let module = build_for_kernel(options.fixture, kernel)?;
    println!("{}", module.display());
    Ok(())
}

/// Builds `fixture` for `kernel` unless the cached build is current and returns the module's
/// path, `target/fixtures/KERNEL/NAME/cxl_mem.ko`.
pub fn build_for_kernel(fixture: Fixture, kernel: &'static StockKernel) -> anyhow::Result<PathBuf> {
    let name = fixture.name();
    let label = format!("{name} for {}", kernel.release);
    let toolchain = Toolchain::ensure(kernel)?;
    let versions = Versions::query(kernel, &toolchain)?;
    let source = source::ensure(kernel, &versions.headers)?;

    let dir = kernel_cache(kernel).join(name);
    let build_dir = dir.join("build");
    let built = build_dir.join(MODULE_FILE);
    let inputs_file = dir.join("inputs");
    let inputs = versions.inputs(kernel, fixture)?;
    if fs::read_to_string(&inputs_file).ok().as_deref() == Some(inputs.as_str()) && built.is_file() {
        println!("fixture: {label}: up to date in {}", build_dir.display());
    } else {
        let started = Instant::now();
        // The inputs file goes last: a failed build leaves none and is redone next time.
        let _ = fs::remove_file(&inputs_file);
        prepare(kernel, &source.cxl_dir(), &build_dir, fixture)?;
        toolchain
            .compile(&build_dir)
            .with_context(|| format!("building {label} failed: see the compiler output above"))?;
        fs::write(&inputs_file, &inputs).with_context(|| format!("writing {}", inputs_file.display()))?;
        println!("fixture: {label}: built in {:.1} s", started.elapsed().as_secs_f64());
    }

    let module = fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    check_vermagic(kernel, &module).with_context(|| format!("{} does not fit the guest kernel", built.display()))?;
    report_code(fixture, kernel, &versions.headers, &module)?;

    let out_dir = workspace_root().join("target/fixtures").join(kernel.name).join(name);
    let out = out_dir.join(MODULE_FILE);
    if fs::read(&out).ok().as_deref() != Some(module.as_slice()) {
        fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
        fs::write(&out, &module).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(out)
}

/// `drivers/cxl` of `kernel`'s source (extracted once, cached) and the CXL headers `header`
/// includes, relative to it: for other out-of-tree modules (the bench's load generator).
pub fn cxl_headers(kernel: &'static StockKernel, header: &str) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let toolchain = Toolchain::ensure(kernel)?;
    let versions = Versions::query(kernel, &toolchain)?;
    let cxl_dir = source::ensure(kernel, &versions.headers)?.cxl_dir();
    let files = source::local_includes(&cxl_dir, Path::new(header))?;
    Ok((cxl_dir, files))
}

/// Runs Kbuild for the external module in `build_dir` against `kernel`'s headers, with the
/// compiler Debian built it with (on the host, or in the sid chroot for 7.2).
pub fn compile(kernel: &'static StockKernel, build_dir: &Path) -> anyhow::Result<()> {
    Toolchain::ensure(kernel)?.compile(build_dir)
}

/// The cache of one kernel's fixtures: its extracted source, the distro's module, a folder
/// per fixture.
fn kernel_cache(kernel: &StockKernel) -> PathBuf {
    cache_dir().join("fixtures").join(kernel.name)
}

/// Versions of what goes into a build; a change in any of them means a rebuild. The source
/// package is fetched at the headers package's version, so it needs no version of its own.
struct Versions {
    headers: String,
    compiler: String,
}

impl Versions {
    fn query(kernel: &StockKernel, toolchain: &Toolchain) -> anyhow::Result<Self> {
        Ok(Self {
            headers: toolchain.package_version(kernel.headers_package)?,
            compiler: toolchain.package_version(kernel.compiler)?,
        })
    }

    /// Everything the build depends on, as text: the cache is current when this is equal.
    fn inputs(&self, kernel: &StockKernel, fixture: Fixture) -> anyhow::Result<String> {
        Ok(format!(
            "fixture {}\nkernel {}\nsource {} {}\nheaders {} {}\ncompiler {} {}\nkbuild\n{KBUILD}patch\n{}",
            fixture.name(),
            kernel.release,
            kernel.source_package,
            self.headers,
            kernel.headers_package,
            self.headers,
            kernel.compiler,
            self.compiler,
            fixture.patch(kernel).unwrap_or("none\n"),
        ))
    }
}

/// Fills `build_dir` afresh: `mem.c` and the headers it includes from `cxl_dir`, the
/// fixture's patch applied, and the Kbuild file.
fn prepare(kernel: &StockKernel, cxl_dir: &Path, build_dir: &Path, fixture: Fixture) -> anyhow::Result<()> {
    if build_dir.exists() {
        fs::remove_dir_all(build_dir).with_context(|| format!("removing the old build in {}", build_dir.display()))?;
    }
    for file in source::local_includes(cxl_dir, Path::new(MAIN_SOURCE))? {
        let to = build_dir.join(&file);
        fs::create_dir_all(to.parent().expect("a file has a parent"))
            .with_context(|| format!("creating {}", build_dir.display()))?;
        fs::copy(cxl_dir.join(&file), &to)
            .with_context(|| format!("copying {} to {}", file.display(), to.display()))?;
    }
    if let Some(patch) = fixture.patch(kernel) {
        apply_patch(kernel, build_dir, patch)
            .with_context(|| format!("applying the {} patch for {} failed", fixture.name(), kernel.name))?;
    }
    fs::write(build_dir.join("Kbuild"), KBUILD)
        .with_context(|| format!("writing Kbuild in {}", build_dir.display()))?;
    Ok(())
}

/// Applies a kernel-tree patch (`a/drivers/cxl/...`) to a copy of `drivers/cxl`: exactly,
/// with no fuzz, so a patch that no longer fits the source fails instead of landing
/// somewhere else.
fn apply_patch(kernel: &StockKernel, dir: &Path, patch: &str) -> anyhow::Result<()> {
    let patch_file = dir.join(".fixture.patch");
    fs::write(&patch_file, patch).with_context(|| format!("writing {}", patch_file.display()))?;
    let out = Command::new("patch")
        .args(["--strip=3", "--fuzz=0", "--forward", "--batch", "--no-backup-if-mismatch", "--reject-file=-"])
        .arg("--directory")
        .arg(dir)
        .arg("--input")
        .arg(&patch_file)
        .output()
        .context("cannot start patch: install it (`cargo xtask setup` does)")?;
    let _ = fs::remove_file(&patch_file);
    if !out.status.success() {
        bail!(
            "patch does not apply to the {} source ({}):\n{}{}",
            kernel.version,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The module must carry `kernel`'s release in its vermagic, or modprobe refuses it.
pub fn check_vermagic(kernel: &StockKernel, module: &[u8]) -> anyhow::Result<()> {
    let vermagic = modinfo(module, "vermagic")?.context("the module has no vermagic")?;
    if vermagic.split_whitespace().next() != Some(kernel.release) {
        bail!("its vermagic is \"{vermagic}\", not for {}", kernel.release);
    }
    Ok(())
}

/// The value of `key` in a module's `.modinfo` section (NUL-separated `key=value` strings).
fn modinfo(module: &[u8], key: &str) -> anyhow::Result<Option<String>> {
    use object::{Object as _, ObjectSection as _};
    let file = object::read::elf::ElfFile64::<object::Endianness>::parse(module).context("not a 64-bit ELF file")?;
    let section = file.section_by_name(".modinfo").context("the module has no .modinfo section")?;
    let data = section.data().context("reading .modinfo")?;
    Ok(data
        .split(|&b| b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .find_map(|entry| entry.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned))
}

/// Compares the rebuilt code with the distro's `cxl_mem.ko` of the same kernel and says what
/// differs. For the stock fixture every function must match; for the fixed one, only what
/// the patch touches.
fn report_code(fixture: Fixture, kernel: &StockKernel, version: &str, module: &[u8]) -> anyhow::Result<()> {
    let label = format!("{} for {}", fixture.name(), kernel.release);
    let theirs = match distro::cxl_mem(kernel, version) {
        Ok(theirs) => theirs,
        Err(err) => {
            println!("fixture: {label}: warning: cannot compare with the distro module: {err:#}");
            return Ok(());
        }
    };
    let comparison = code::compare(module, &theirs.bytes)?;
    let same = comparison.same.len();
    let against = format!("the distro's cxl_mem.ko ({})", theirs.origin);
    if comparison.identical() {
        println!("fixture: {label}: code identical to {against} ({same} functions)");
        return Ok(());
    }
    let mut parts = Vec::new();
    for (what, list) in [
        ("differs in", &comparison.different),
        ("adds", &comparison.only_in_ours),
        ("lacks", &comparison.only_in_theirs),
    ] {
        if !list.is_empty() {
            parts.push(format!("{what} {}", list.join(", ")));
        }
    }
    let summary = format!("{} ({same} functions identical)", parts.join("; "));
    match fixture {
        Fixture::CxlMemFixed => println!("fixture: {label}: code against {against}: {summary}"),
        Fixture::CxlMemStock => println!(
            "fixture: {label}: warning: the unmodified rebuild is not the distro's code: {summary}; \
             the compiler or headers differ from Debian's build, so it is a weaker control"
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        debian::{STOCK_KERNELS, SidApt, Suite},
        setup, util,
    };

    #[test]
    fn every_kernel_has_a_fixed_patch_and_setup_installs_what_it_builds_with() {
        for kernel in STOCK_KERNELS {
            assert!(kernel.fixed_cxl_mem.contains("\n--- a/drivers/cxl/mem.c\n"), "{}", kernel.name);
            let packages = setup::fixture_packages(kernel);
            let needed: &[&str] = match kernel.suite {
                Suite::Host => &[kernel.headers_package, kernel.compiler, "make", "patch", "xz-utils"],
                Suite::Sid => &["debootstrap", "patch", "xz-utils"],
            };
            for package in needed {
                assert!(packages.contains(package), "{package} is not in fixture_packages({})", kernel.name);
            }
        }
    }

    #[test]
    fn inputs_change_with_the_patch_the_kernel_and_the_versions() {
        let kernel = debian::stock_kernel("6.12").unwrap();
        let versions = Versions { headers: "1".into(), compiler: "12".into() };
        let fixed = versions.inputs(kernel, Fixture::CxlMemFixed).unwrap();
        let stock = versions.inputs(kernel, Fixture::CxlMemStock).unwrap();
        assert_ne!(fixed, stock);
        assert!(fixed.contains(kernel.fixed_cxl_mem));
        let other = debian::stock_kernel("7.2").unwrap();
        assert_ne!(versions.inputs(other, Fixture::CxlMemStock).unwrap(), stock);
        let newer = Versions { compiler: "12.1".into(), ..versions };
        assert_ne!(newer.inputs(kernel, Fixture::CxlMemFixed).unwrap(), fixed);
    }

    /// The line range of `cxl_mem_probe()` in `source`.
    fn probe_body(source: &str) -> Vec<&str> {
        let lines: Vec<&str> = source.lines().collect();
        let start = lines.iter().position(|l| l.starts_with("static int cxl_mem_probe(")).expect("cxl_mem_probe");
        let len = lines[start..].iter().position(|l| *l == "}").expect("end of cxl_mem_probe");
        lines[start..=start + len].to_vec()
    }

    /// Whether `line` mentions the identifier `dport` itself (not `parent_dport`, not in a
    /// comment).
    fn mentions_dport(line: &str) -> bool {
        let code = line.trim_start();
        if code.starts_with("/*") || code.starts_with('*') {
            return false;
        }
        code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(|word| word == "dport")
    }

    /// The locked sections of a probe body, as inclusive line ranges: each
    /// `scoped_guard(device, ...)` block (6.12, 7.2) and each stretch from `device_lock(` to
    /// `device_unlock(` (6.1).
    fn locked_sections(body: &[&str]) -> Vec<(usize, usize)> {
        let mut sections = Vec::new();
        for (start, line) in body.iter().enumerate() {
            let code = line.trim_start();
            if code.starts_with("scoped_guard(device,") {
                // The guard's block: from its line to the brace that closes it.
                let mut depth = 0i32;
                for (i, line) in body.iter().enumerate().skip(start) {
                    depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
                    if depth == 0 {
                        sections.push((start, i));
                        break;
                    }
                }
            } else if code.starts_with("device_lock(") {
                let end =
                    body[start..].iter().position(|l| l.trim_start().starts_with("device_unlock(")).expect("unlock");
                sections.push((start, start + end));
            }
        }
        sections
    }

    /// Lines of `cxl_mem_probe()` that use `dport` outside every locked section, or inside one
    /// but before the dport was fetched again there. Empty means the probe fetches and uses
    /// the dport only under a lock.
    fn dport_uses_outside_the_lock(source: &str) -> Vec<String> {
        let body = probe_body(source);
        let sections = locked_sections(&body);
        let fetched_under_lock = |i: usize| {
            sections.iter().any(|&(start, end)| {
                (start..=end).contains(&i)
                    && body[start..=i].iter().any(|l| l.trim_start().starts_with("dport = cxl_find_dport_by_dev("))
            })
        };
        body.iter()
            .enumerate()
            .filter(|(_, l)| mentions_dport(l) && l.trim() != "struct cxl_dport *dport;")
            .filter(|(i, _)| !fetched_under_lock(*i))
            .map(|(_, l)| l.trim().to_owned())
            .collect()
    }

    /// The source package version the tests use: the installed headers' version for a
    /// bookworm kernel (set-up installs them), the one sid serves for a sid kernel.
    fn headers_version(kernel: &StockKernel) -> String {
        let mut cmd = match kernel.suite {
            Suite::Host => {
                let mut cmd = Command::new("dpkg-query");
                cmd.args(["-W", "-f=${Version}", kernel.headers_package]);
                cmd
            }
            Suite::Sid => {
                let sid = SidApt::new();
                sid.prepare().expect("the sid package lists");
                let mut cmd = Command::new("apt-cache");
                cmd.args(sid.options()).args(["show", "--no-all-versions", kernel.headers_package]);
                cmd
            }
        };
        let out = util::output(&mut cmd).expect("the headers package's version (run `cargo xtask setup`)");
        out.lines().find_map(|l| l.strip_prefix("Version: ")).unwrap_or(&out).trim().to_owned()
    }

    /// Applies the fix to the real source of `kernel` and checks what it does to the probe:
    /// every use of the dport comes after a fetch under a lock, where the stock source uses
    /// `stock_uses` without one (so the check cannot pass vacuously). Needs `patch` and the
    /// source package (fetched as a .deb and cached on first use).
    fn fix_moves_every_dport_use_under_the_lock(name: &str, stock_uses: &[&str]) {
        let kernel = debian::stock_kernel(name).unwrap();
        let source = source::ensure(kernel, &headers_version(kernel)).unwrap();
        let stock = fs::read_to_string(source.cxl_dir().join(MAIN_SOURCE)).unwrap();
        let found = dport_uses_outside_the_lock(&stock);
        for expected in stock_uses {
            assert!(
                found.iter().any(|l| l.contains(expected)),
                "{name}: the check no longer sees the stock use {expected:?}: {found:?}"
            );
        }

        let dir = tempfile::tempdir().unwrap();
        let build_dir = dir.path().join("build");
        prepare(kernel, &source.cxl_dir(), &build_dir, Fixture::CxlMemFixed).unwrap();
        let fixed = fs::read_to_string(build_dir.join(MAIN_SOURCE)).unwrap();
        assert_ne!(fixed, stock);
        assert!(fixed.contains("cxl_mem_find_port(cxlmd, NULL)"), "{name}");
        assert_eq!(dport_uses_outside_the_lock(&fixed), Vec::<String>::new(), "{name}");
        for file in ["Kbuild", "cxl.h", "cxlmem.h", "cxlpci.h"] {
            assert!(build_dir.join(file).is_file(), "{name}: {file} missing from the build folder");
        }

        prepare(kernel, &source.cxl_dir(), &build_dir, Fixture::CxlMemStock).unwrap();
        assert_eq!(fs::read_to_string(build_dir.join(MAIN_SOURCE)).unwrap(), stock);
    }

    /// 6.1.192: the stock probe locks the right device but uses the dport it loaded before.
    #[test]
    fn fix_6_1_applies_and_moves_every_dport_use_under_the_lock() {
        fix_moves_every_dport_use_under_the_lock(
            "6.1",
            &["cxl_mem_find_port(cxlmd, &dport)", "devm_cxl_add_endpoint(cxlmd, dport)"],
        );
    }

    /// 6.12.117: the stock probe reads dport->rch and sets up RAS with no lock.
    #[test]
    fn fix_6_12_applies_and_moves_every_dport_use_under_the_lock() {
        fix_moves_every_dport_use_under_the_lock("6.12", &["cxl_dport_init_ras_reporting(dport, dev)", "dport->rch"]);
    }

    /// 7.2.13: the seed thread's own hunk against the source it was written for.
    #[test]
    fn fix_7_2_applies_and_moves_every_dport_use_under_the_lock() {
        fix_moves_every_dport_use_under_the_lock(
            "7.2",
            &["dport->rch", "devm_cxl_add_endpoint(endpoint_parent, cxlmd, dport)"],
        );
    }
}
