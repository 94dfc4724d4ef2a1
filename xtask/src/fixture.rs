//! `cargo xtask fixture NAME`: out-of-tree rebuilds of the CXL memdev driver for the guest.
//!
//! Both fixtures compile `drivers/cxl/mem.c` from Debian's 6.12 source against the headers
//! package of the guest kernel, so the result loads in place of the distro's `cxl_mem`:
//! `cxl-mem-fixed` with `xtask/fixtures/cxl-mem-fixed.patch` (the read-side fix of the
//! seed thread, adapted to 6.12), `cxl-mem-stock` unmodified, as the control. The stock
//! rebuild is compared function by function with the distro's module to show that the
//! rebuild itself changes nothing.
mod code;
mod source;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{
    setup,
    util::{self, cache_dir, workspace_root},
};

/// The guest kernel the fixtures are built for (DESIGN §6): its `uname -r`.
pub const KERNEL_RELEASE: &str = "6.12.117+deb12-amd64";
/// The upstream version of that kernel; the source tarball must hold exactly this.
const KERNEL_VERSION: &str = "6.12.117";
const SOURCE_PACKAGE: &str = "linux-source-6.12";
/// The compiler Debian built the kernel with; the headers package's Makefile expects it.
const COMPILER: &str = "gcc-12";

/// The read-side fix for `cxl_mem_probe()`: a header that explains it, then a `-p1` diff.
const FIXED_PATCH: &str = include_str!("../fixtures/cxl-mem-fixed.patch");

/// The source files a fixture compiles, relative to `drivers/cxl`.
const MAIN_SOURCE: &str = "mem.c";
/// Kbuild for the out-of-tree module: the same object list as `drivers/cxl/Makefile`.
const KBUILD: &str = "obj-m := cxl_mem.o\ncxl_mem-y := mem.o\n";
const MODULE_FILE: &str = "cxl_mem.ko";

#[derive(clap::Args)]
pub struct Options {
    /// The fixture to build
    #[arg(value_enum)]
    pub fixture: Fixture,
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

    fn patch(self) -> Option<&'static str> {
        match self {
            Self::CxlMemFixed => Some(FIXED_PATCH),
            Self::CxlMemStock => None,
        }
    }
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let module = build(options.fixture)?;
    println!("{}", module.display());
    Ok(())
}

/// Builds `fixture` unless the cached build is current and returns the module's path,
/// `target/fixtures/NAME/cxl_mem.ko`.
pub fn build(fixture: Fixture) -> anyhow::Result<PathBuf> {
    let name = fixture.name();
    setup::ensure_packages(setup::FIXTURE_PACKAGES)?;
    let versions = Versions::query()?;
    let cache = cache_dir().join("fixtures");
    let source = source::ensure(&cache, &versions.source)?;

    let dir = cache.join(name);
    let build_dir = dir.join("build");
    let built = build_dir.join(MODULE_FILE);
    let inputs_file = dir.join("inputs");
    let inputs = versions.inputs(fixture);
    if fs::read_to_string(&inputs_file).ok().as_deref() == Some(inputs.as_str()) && built.is_file() {
        println!("fixture: {name}: up to date in {}", build_dir.display());
    } else {
        let started = Instant::now();
        // The inputs file goes last: a failed build leaves none and is redone next time.
        let _ = fs::remove_file(&inputs_file);
        prepare(&source.cxl_dir(), &build_dir, fixture)?;
        compile(&build_dir).with_context(|| format!("building {name} failed: see the compiler output above"))?;
        fs::write(&inputs_file, &inputs).with_context(|| format!("writing {}", inputs_file.display()))?;
        println!("fixture: {name}: built in {:.1} s", started.elapsed().as_secs_f64());
    }

    let module = fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    check_vermagic(&module).with_context(|| format!("{} does not fit the guest kernel", built.display()))?;
    report_code(fixture, &module)?;

    let out_dir = workspace_root().join("target/fixtures").join(name);
    let out = out_dir.join(MODULE_FILE);
    if fs::read(&out).ok().as_deref() != Some(module.as_slice()) {
        fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
        fs::write(&out, &module).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(out)
}

/// `drivers/cxl` of the guest kernel's source (extracted once, cached) and the CXL headers
/// `header` includes, relative to it: for other out-of-tree modules (the bench's load
/// generator).
pub fn cxl_headers(header: &str) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    setup::ensure_packages(setup::FIXTURE_PACKAGES)?;
    let versions = Versions::query()?;
    let cxl_dir = source::ensure(&cache_dir().join("fixtures"), &versions.source)?.cxl_dir();
    let files = source::local_includes(&cxl_dir, Path::new(header))?;
    Ok((cxl_dir, files))
}

/// Versions of what goes into a build; a change in any of them means a rebuild.
struct Versions {
    source: String,
    headers: String,
    compiler: String,
}

impl Versions {
    fn query() -> anyhow::Result<Self> {
        let version = |package: &str| {
            util::output(Command::new("dpkg-query").args(["-W", "-f=${Version}", package]))
                .with_context(|| format!("asking dpkg for the version of {package}"))
        };
        let versions = Self {
            source: version(SOURCE_PACKAGE)?,
            headers: version(&headers_package())?,
            compiler: version(COMPILER)?,
        };
        if versions.source != versions.headers {
            bail!(
                "{SOURCE_PACKAGE} {} does not match {} {}: install the matching source with \
                 `apt-get install {SOURCE_PACKAGE}={}`",
                versions.source,
                headers_package(),
                versions.headers,
                versions.headers
            );
        }
        Ok(versions)
    }

    /// Everything the build depends on, as text: the cache is current when this is equal.
    fn inputs(&self, fixture: Fixture) -> String {
        format!(
            "fixture {}\nsource {}\nheaders {}\ncompiler {}\nkbuild\n{KBUILD}patch\n{}",
            fixture.name(),
            self.source,
            self.headers,
            self.compiler,
            fixture.patch().unwrap_or("none\n"),
        )
    }
}

fn headers_package() -> String {
    format!("linux-headers-{KERNEL_RELEASE}")
}

fn headers_dir() -> PathBuf {
    Path::new("/usr/src").join(headers_package())
}

/// Fills `build_dir` afresh: `mem.c` and the headers it includes from `cxl_dir`, the
/// fixture's patch applied, and the Kbuild file.
fn prepare(cxl_dir: &Path, build_dir: &Path, fixture: Fixture) -> anyhow::Result<()> {
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
    if let Some(patch) = fixture.patch() {
        apply_patch(build_dir, patch).with_context(|| format!("applying the {} patch failed", fixture.name()))?;
    }
    fs::write(build_dir.join("Kbuild"), KBUILD)
        .with_context(|| format!("writing Kbuild in {}", build_dir.display()))?;
    Ok(())
}

/// Applies a kernel-tree patch (`a/drivers/cxl/...`) to a copy of `drivers/cxl`: exactly,
/// with no fuzz, so a patch that no longer fits the source fails instead of landing
/// somewhere else.
fn apply_patch(dir: &Path, patch: &str) -> anyhow::Result<()> {
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
            "patch does not apply to the {KERNEL_VERSION} source ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs Kbuild for the module in `build_dir` against the installed headers.
pub fn compile(build_dir: &Path) -> anyhow::Result<()> {
    let headers = headers_dir();
    if !headers.join("Makefile").is_file() {
        bail!("{} has no Makefile: install {}", headers.display(), headers_package());
    }
    util::run(
        Command::new("make")
            .arg("-C")
            .arg(&headers)
            .arg(format!("M={}", build_dir.display()))
            .arg(format!("CC={COMPILER}"))
            .arg("modules")
            // A jobserver inherited from an outer make would not fit this one.
            .env_remove("MAKEFLAGS")
            .env_remove("MFLAGS"),
    )
}

/// The module must carry the guest kernel's release in its vermagic, or modprobe refuses it.
pub fn check_vermagic(module: &[u8]) -> anyhow::Result<()> {
    let vermagic = modinfo(module, "vermagic")?.context("the module has no vermagic")?;
    if vermagic.split_whitespace().next() != Some(KERNEL_RELEASE) {
        bail!("its vermagic is \"{vermagic}\", not for {KERNEL_RELEASE}");
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

/// Compares the rebuilt code with the distro's `cxl_mem.ko` and says what differs. For the
/// stock fixture every function must match; for the fixed one, only what the patch touches.
fn report_code(fixture: Fixture, module: &[u8]) -> anyhow::Result<()> {
    let name = fixture.name();
    let distro = Path::new("/lib/modules").join(KERNEL_RELEASE).join("kernel/drivers/cxl/cxl_mem.ko.xz");
    let theirs = match decompress_xz(&distro) {
        Ok(theirs) => theirs,
        Err(err) => {
            println!("fixture: {name}: warning: cannot compare with the distro module: {err:#}");
            return Ok(());
        }
    };
    let comparison = code::compare(module, &theirs)?;
    let same = comparison.same.len();
    if comparison.identical() {
        println!("fixture: {name}: code identical to the distro's cxl_mem.ko ({same} functions)");
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
    match fixture.patch() {
        Some(_) => println!("fixture: {name}: code against the distro's cxl_mem.ko: {summary}"),
        None => println!(
            "fixture: {name}: warning: the unmodified rebuild is not the distro's code: {summary}; \
             the compiler or headers differ from Debian's build, so it is a weaker control"
        ),
    }
    Ok(())
}

fn decompress_xz(path: &Path) -> anyhow::Result<Vec<u8>> {
    if !path.is_file() {
        bail!("{} is missing (it comes with the kernel image package)", path.display());
    }
    let out = Command::new("xz").arg("-dc").arg(path).output().context("cannot start xz: install xz-utils")?;
    if !out.status.success() {
        bail!("xz -dc {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim_end());
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_installs_what_the_fixtures_build_with() {
        for package in [SOURCE_PACKAGE, &headers_package(), COMPILER, "make", "patch"] {
            assert!(setup::FIXTURE_PACKAGES.contains(&package), "{package} is not in FIXTURE_PACKAGES");
        }
    }

    #[test]
    fn inputs_change_with_the_patch_and_the_versions() {
        let versions = Versions { source: "1".into(), headers: "1".into(), compiler: "12".into() };
        let fixed = versions.inputs(Fixture::CxlMemFixed);
        let stock = versions.inputs(Fixture::CxlMemStock);
        assert_ne!(fixed, stock);
        assert!(fixed.contains(FIXED_PATCH));
        let newer = Versions { compiler: "12.1".into(), ..versions };
        assert_ne!(newer.inputs(Fixture::CxlMemFixed), fixed);
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

    /// Lines of `cxl_mem_probe()` that use `dport` outside the `scoped_guard` on the
    /// endpoint's parent, or before it was fetched there. Empty means the probe keeps the
    /// dport under the lock.
    fn dport_uses_outside_the_lock(source: &str) -> Vec<String> {
        let body = probe_body(source);
        let guard = body
            .iter()
            .position(|l| l.contains("scoped_guard(device, endpoint_parent)"))
            .expect("the scoped_guard on endpoint_parent");
        // The guard's block: from its line to the brace that closes it.
        let mut depth = 0i32;
        let mut guard_end = guard;
        for (i, line) in body.iter().enumerate().skip(guard) {
            depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
            if depth == 0 {
                guard_end = i;
                break;
            }
        }
        let fetch = body[guard..=guard_end]
            .iter()
            .position(|l| l.trim_start().starts_with("dport = cxl_find_dport_by_dev("))
            .map(|i| guard + i);
        body.iter()
            .enumerate()
            .filter(|(_, l)| mentions_dport(l) && l.trim() != "struct cxl_dport *dport;")
            .filter(|(i, _)| fetch.is_none_or(|fetch| *i < fetch || *i > guard_end))
            .map(|(_, l)| l.trim().to_owned())
            .collect()
    }

    /// Applies the fix to the real 6.12 source and checks what it does to the probe. Needs
    /// the `linux-source-6.12` package and `patch` (`cargo xtask setup` installs both).
    #[test]
    fn fixed_patch_applies_to_the_pristine_source_and_moves_every_dport_use_under_the_lock() {
        let versions = Versions::query().expect("the fixture packages (run `cargo xtask setup`)");
        let source = source::ensure(&cache_dir().join("fixtures"), &versions.source).unwrap();
        let stock = fs::read_to_string(source.cxl_dir().join(MAIN_SOURCE)).unwrap();
        let stock_uses = dport_uses_outside_the_lock(&stock);
        assert!(
            stock_uses.iter().any(|l| l.contains("cxl_dport_init_ras_reporting(dport, dev)"))
                && stock_uses.iter().any(|l| l.contains("dport->rch")),
            "the check no longer sees the stock bug: {stock_uses:?}"
        );

        let dir = tempfile::tempdir().unwrap();
        let build_dir = dir.path().join("build");
        prepare(&source.cxl_dir(), &build_dir, Fixture::CxlMemFixed).unwrap();
        let fixed = fs::read_to_string(build_dir.join(MAIN_SOURCE)).unwrap();
        assert_ne!(fixed, stock);
        assert!(fixed.contains("cxl_mem_find_port(cxlmd, NULL)"));
        assert_eq!(dport_uses_outside_the_lock(&fixed), Vec::<String>::new());
        for file in ["Kbuild", "cxl.h", "cxlmem.h", "cxlpci.h"] {
            assert!(build_dir.join(file).is_file(), "{file} missing from the build folder");
        }

        prepare(&source.cxl_dir(), &build_dir, Fixture::CxlMemStock).unwrap();
        assert_eq!(fs::read_to_string(build_dir.join(MAIN_SOURCE)).unwrap(), stock);
    }
}
