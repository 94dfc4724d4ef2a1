//! One source-kernel build: the cache key, the lock, the steps in the sid chroot, and the
//! finished tree the guest harness boots (docs/source-kernel.md).
//!
//! Under `~/.cache/tracer/source-kernels/`:
//! - `source/linux-source-7.2_VERSION/`: the pristine source, extracted once;
//! - `work/NAME-TREEKEY/`: the work tree per source version and config (`src/` hard-linked
//!   and patched, `obj/` make's output, `cxl-test/` cxl_test's objects), reused by every
//!   patch set so that switching patches rebuilds only what they touch;
//! - `builds/NAME-KEY/`: one finished build per patch set (`bzImage`, `lib/modules/RELEASE`,
//!   `cxl_test/*.ko`, `config`, `build-info`), made in `NAME-KEY.partial` and renamed when
//!   complete; `builds/NAME-KEY.log` is its whole build log.
use std::{
    fs::{self, File},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    SourceKernel, config,
    patches::Patch,
    progress::{BuildLog, minutes},
    tree::{self, WorkTree},
};
use crate::{
    debian::{self, StockKernel},
    fixture::chroot::{Chroot, Session},
    setup,
    util::{self, cache_dir},
};

/// Bumped when the build's steps change what they make: every cached build is then stale.
const RECIPE: u32 = 1;
/// What the sid chroot needs beyond a module build's packages for a whole kernel: Kbuild's
/// tools (bc, bison, flex, libelf for objtool, libssl for the signing tools, cpio and rsync
/// for the headers), and pahole (dwarves) for BTF.
pub const CHROOT_PACKAGES: &[&str] =
    &["bc", "bison", "flex", "libelf-dev", "libssl-dev", "dwarves", "python3", "cpio", "rsync"];
/// Where the source-kernels cache is bound inside the chroot.
const INSIDE: &str = "/tracer-kernels";
/// Marks a finished build and says what went into it.
const INFO_FILE: &str = "build-info";
/// In `obj/`: the config was made from defconfig and the fragment and passed the check.
const CONFIGURED: &str = ".tracer-configured";

fn cache() -> PathBuf {
    cache_dir().join("source-kernels")
}

/// A finished build.
pub struct Built {
    pub dir: PathBuf,
    pub image: PathBuf,
    /// `DIR/lib/modules/RELEASE`, indexed by depmod: `--modules` of a user's tree.
    pub modules: PathBuf,
    pub release: String,
    /// cxl_test's modules (its own builds of the CXL drivers too), never installed.
    pub cxl_test: PathBuf,
}

impl Built {
    fn read(dir: &Path) -> anyhow::Result<Option<Built>> {
        let Ok(info) = fs::read_to_string(dir.join(INFO_FILE)) else {
            return Ok(None);
        };
        let release = info
            .lines()
            .find_map(|l| l.strip_prefix("release "))
            .with_context(|| format!("{} names no release: delete {}", dir.join(INFO_FILE).display(), dir.display()))?
            .to_owned();
        Ok(Some(Built {
            dir: dir.to_owned(),
            image: dir.join("bzImage"),
            modules: dir.join("lib/modules").join(&release),
            release,
            cxl_test: dir.join("cxl_test"),
        }))
    }

    /// The cxl_test module files, by name.
    pub fn cxl_test_modules(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.cxl_test)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| n.ends_with(".ko"))
            .collect();
        names.sort();
        names
    }

    pub fn print(&self) {
        println!("kernel {} in {}", self.release, self.dir.display());
        println!("  image:    {}", self.image.display());
        println!("  modules:  {}", self.modules.display());
        println!("  cxl_test: {} ({})", self.cxl_test.display(), self.cxl_test_modules().join(" "));
        println!("  log:      {}", beside(&self.dir, "log").display());
        println!(
            "  boot it:  cargo xtask vm run --kernel {} --modules {}",
            self.image.display(),
            self.modules.display()
        );
    }
}

/// Versions of what goes into a build besides the fragment and the patches, read from the
/// chroot's dpkg (no lock, nothing run inside).
#[derive(Debug, PartialEq, Eq)]
struct Versions {
    /// The source package's version: the stock kernel's headers package's, as for the
    /// fixtures, so the source is the stock kernel's.
    source: String,
    compiler: String,
    pahole: String,
}

impl Versions {
    fn query(chroot: &Chroot, base: &StockKernel) -> anyhow::Result<Versions> {
        Ok(Versions {
            source: chroot.package_version(base.headers_package)?,
            compiler: chroot.package_version(base.compiler)?,
            pahole: chroot.package_version("dwarves")?,
        })
    }
}

/// What the work tree depends on: a change in any of it means another tree (a cold build).
fn tree_inputs(kernel: &SourceKernel, base: &StockKernel, versions: &Versions) -> String {
    format!(
        "recipe {RECIPE}\nkernel {}\nsource {} {}\ncompiler {} {}\npahole dwarves {}\nfragment {}\n{}",
        kernel.name,
        base.source_package,
        versions.source,
        base.compiler,
        versions.compiler,
        versions.pahole,
        kernel.fragment_file,
        kernel.fragment
    )
}

/// What a build depends on: its tree's inputs and the patches in order (the recipe's, then
/// the user's).
fn build_inputs(tree: &str, patches: &[Patch]) -> String {
    let mut text = tree.to_owned();
    for patch in patches {
        text.push_str(&format!("\npatch {}\n{}", patch.name, patch.text));
    }
    text
}

/// A stable 64-bit FNV-1a hash of `text` in hex: a cache key that does not change between
/// Rust releases (std's hasher may).
fn key_of(text: &str) -> String {
    let hash =
        text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3));
    format!("{hash:016x}")
}

/// The recipe's patches then the user's.
fn all_patches(kernel: &SourceKernel, user: &[Patch]) -> Vec<Patch> {
    kernel.recipe_patches.iter().map(|(file, text)| Patch::shipped(file, text)).chain(user.iter().cloned()).collect()
}

fn describe(kernel: &SourceKernel, user: &[Patch]) -> String {
    match user {
        [] => kernel.name.to_owned(),
        _ => format!("{} with {}", kernel.name, user.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")),
    }
}

/// The build of `kernel` with the user's `patches`: the cached one when its inputs are
/// unchanged, else built now (in the sid chroot, which is made first if missing).
pub fn build(kernel: &'static SourceKernel, patches: &[Patch]) -> anyhow::Result<Built> {
    let base = debian::stock_kernel(kernel.base)?;
    let label = describe(kernel, patches);
    let patches = all_patches(kernel, patches);
    let builds = cache().join("builds");
    let out_dir = |versions: &Versions| {
        let tree = tree_inputs(kernel, base, versions);
        builds.join(format!("{}-{}", kernel.name, key_of(&build_inputs(&tree, &patches))))
    };
    // Nothing to build: no root, no lock, no chroot command.
    if let Some(chroot) = Chroot::finished(base)
        && let Ok(versions) = Versions::query(&chroot, base)
        && let Some(built) = Built::read(&out_dir(&versions))?
    {
        println!("kernel: {label}: up to date in {}", built.dir.display());
        return Ok(built);
    }

    setup::ensure_packages(setup::SOURCE_KERNEL_PACKAGES)?;
    let chroot = Chroot::ensure(base)?;
    fs::create_dir_all(&builds).with_context(|| format!("creating {}", builds.display()))?;
    chroot.install(CHROOT_PACKAGES, &cache().join("chroot-packages.log"))?;
    let versions = Versions::query(&chroot, base)?;
    let tree_text = tree_inputs(kernel, base, &versions);
    let (tree_key, key) = (key_of(&tree_text), key_of(&build_inputs(&tree_text, &patches)));
    let out = out_dir(&versions);
    let work_dir = cache().join("work").join(format!("{}-{tree_key}", kernel.name));
    let _lock = lock(&beside(&work_dir, "lock"))?;
    if let Some(built) = Built::read(&out)? {
        println!("kernel: {label}: built meanwhile by another run, in {}", built.dir.display());
        return Ok(built);
    }

    let started = Instant::now();
    let log = BuildLog::create(&beside(&out, "log"))?;
    println!(
        "kernel: building {label} ({} {}) in {}; the whole log is in {}",
        base.source_package,
        versions.source,
        work_dir.display(),
        log.path.display()
    );
    let steps = (|| {
        let pristine = tree::pristine(base, &versions.source, &cache().join("source"))?;
        let work = WorkTree::ensure(&work_dir, &pristine)?;
        work.apply(&pristine, &patches, &key)?;
        let partial = beside(&out, "partial");
        remove_dir(&partial)?;
        fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
        let session = chroot.session(&[(&cache(), Path::new(INSIDE))])?;
        let make = Make { session: &session, work: &work, base, log: &log };
        let mut times = Vec::new();
        times.push(("config", make.configure(kernel, &tree_key)?));
        times.push(("kernel", make.kernel()?));
        times.push(("cxl_test", make.cxl_test()?));
        let release = make.release()?;
        times.push(("install", make.install(&partial, &release)?));
        drop(session);
        depmod(&partial, &release)?;
        check_module_btf(&partial.join("lib/modules").join(&release).join("kernel/drivers/cxl/core/cxl_core.ko"))?;
        check_module_btf(&partial.join("cxl_test/cxl_core.ko"))?;
        Ok::<_, anyhow::Error>((partial, release, times))
    })();
    let (partial, release, times) =
        steps.with_context(|| format!("building {label} failed; the build log: {}", log.path.display()))?;
    let took = started.elapsed();
    let summary: Vec<String> = times.iter().map(|(step, t)| format!("{step} {}", minutes(*t))).collect();
    let info = format!(
        "release {release}\nbuilt in {} ({})\nkey {key}\ntree {tree_key}\n\n{}\n",
        minutes(took),
        summary.join(", "),
        build_inputs(&tree_text, &patches)
    );
    fs::write(partial.join(INFO_FILE), info).with_context(|| format!("writing {}", partial.display()))?;
    remove_dir(&out)?;
    fs::rename(&partial, &out).with_context(|| format!("moving {} to {}", partial.display(), out.display()))?;
    println!("kernel: {label} ({release}) built in {} ({})", minutes(took), summary.join(", "));
    Built::read(&out)?.with_context(|| format!("{} has no {INFO_FILE} just after the build", out.display()))
}

/// The make steps, run inside the chroot session with the work tree bound under `INSIDE`.
struct Make<'a> {
    session: &'a Session<'a>,
    work: &'a WorkTree,
    base: &'a StockKernel,
    log: &'a BuildLog,
}

impl Make<'_> {
    /// A path under the cache as seen inside the chroot.
    fn inside(&self, path: &Path) -> PathBuf {
        Path::new(INSIDE).join(path.strip_prefix(cache()).expect("the build works under its cache"))
    }

    /// `make -C SRC O=OBJ` with the chroot's compiler for the kernel and its host tools.
    fn make(&self) -> Command {
        let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut cmd = self.session.command("make");
        cmd.arg("-C").arg(self.inside(&self.work.src())).arg(format!("O={}", self.inside(&self.work.obj()).display()));
        cmd.arg(format!("CC={}", self.base.compiler)).arg(format!("HOSTCC={}", self.base.compiler));
        cmd.arg(format!("-j{jobs}"));
        cmd
    }

    /// `.config` from `make defconfig` and the fragment, once per work tree; checked every
    /// build, so an option olddefconfig dropped is an error naming it.
    fn configure(&self, kernel: &SourceKernel, tree_key: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let wanted = config::parse(kernel.fragment).with_context(|| format!("in {}", kernel.fragment_file))?;
        let (config_file, stamp) = (self.work.obj().join(".config"), self.work.obj().join(CONFIGURED));
        if fs::read_to_string(&stamp).ok().as_deref() != Some(tree_key) || !config_file.is_file() {
            let _ = fs::remove_file(&stamp);
            self.log.run("[1/5] config: make defconfig", self.make().arg("defconfig"))?;
            let mut text =
                fs::read_to_string(&config_file).with_context(|| format!("reading {}", config_file.display()))?;
            text.push_str(&format!("\n# {}\n{}", kernel.fragment_file, kernel.fragment));
            fs::write(&config_file, text).with_context(|| format!("writing {}", config_file.display()))?;
            self.log.run(
                &format!("[1/5] config: {} merged, make olddefconfig", kernel.fragment_file),
                self.make().arg("olddefconfig"),
            )?;
        }
        let text = fs::read_to_string(&config_file).with_context(|| format!("reading {}", config_file.display()))?;
        let missing = config::missing(&wanted, &text)?;
        if !missing.is_empty() {
            bail!(
                "the kernel config lacks {} option(s) that {} asks for (olddefconfig drops a value whose \
                 dependencies are not met: add them to the fragment):\n  {}\nthe .config: {}",
                missing.len(),
                kernel.fragment_file,
                missing.join("\n  "),
                config_file.display()
            );
        }
        fs::write(&stamp, tree_key).with_context(|| format!("writing {}", stamp.display()))?;
        Ok(started.elapsed())
    }

    fn kernel(&self) -> anyhow::Result<Duration> {
        self.log.run("[2/5] the kernel: make bzImage modules", self.make().args(["bzImage", "modules"]))
    }

    /// tools/testing/cxl, built against the kernel just built. Its Kbuild compiles the CXL
    /// drivers again from `../../../drivers/cxl`, relative to its output folder, so that
    /// folder sits three levels down in a tree of its own: those objects land in
    /// `cxl-test/drivers/`, never over the kernel's own in `obj/drivers/`.
    fn cxl_test(&self) -> anyhow::Result<Duration> {
        let output = self.work.dir.join("cxl-test/tools/testing/cxl");
        fs::create_dir_all(&output).with_context(|| format!("creating {}", output.display()))?;
        let mut make = self.make();
        make.arg(format!("M={}", self.inside(&self.work.src().join("tools/testing/cxl")).display()));
        make.arg(format!("MO={}", self.inside(&output).display()));
        self.log.run("[3/5] cxl_test: make M=tools/testing/cxl modules", make.arg("modules"))
    }

    /// `make kernelrelease`: the release the image reports (`7.2.13-tracer`).
    fn release(&self) -> anyhow::Result<String> {
        let out = util::output(self.make().args(["-s", "kernelrelease"]))?;
        let release = out.trim();
        if release.is_empty() || release.contains(char::is_whitespace) {
            bail!("make kernelrelease printed {out:?}, not a release");
        }
        Ok(release.to_owned())
    }

    /// The image, the config and the modules (stripped of DWARF, which keeps their BTF)
    /// into `partial`; cxl_test's modules into `partial/cxl_test`, stripped the same way.
    fn install(&self, partial: &Path, release: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut install = self.make();
        install.arg(format!("INSTALL_MOD_PATH={}", self.inside(partial).display()));
        install.args(["INSTALL_MOD_STRIP=1", "modules_install"]);
        self.log.run("[4/5] install: make modules_install", &mut install)?;
        let modules = partial.join("lib/modules").join(release);
        if !modules.is_dir() {
            bail!("make modules_install left no {}", modules.display());
        }
        for (from, to) in [("arch/x86/boot/bzImage", "bzImage"), (".config", "config"), ("System.map", "System.map")] {
            let from = self.work.obj().join(from);
            fs::copy(&from, partial.join(to)).with_context(|| format!("copying {}", from.display()))?;
        }
        let cxl_test = partial.join("cxl_test");
        fs::create_dir_all(&cxl_test).with_context(|| format!("creating {}", cxl_test.display()))?;
        let mut copied = Vec::new();
        for module in find_modules(&self.work.dir.join("cxl-test"))? {
            let name = module.file_name().expect("a found file has a name").to_owned();
            if copied.contains(&name) {
                bail!("cxl_test built two modules named {}: its folder cannot hold both", name.to_string_lossy());
            }
            fs::copy(&module, cxl_test.join(&name)).with_context(|| format!("copying {}", module.display()))?;
            copied.push(name);
        }
        if copied.is_empty() {
            bail!("the cxl_test build left no modules in {}", self.work.dir.join("cxl-test").display());
        }
        let mut strip = self.session.command("strip");
        strip.arg("--strip-debug").args(copied.iter().map(|n| self.inside(&cxl_test.join(n))));
        self.log.run("[5/5] cxl_test's modules: strip --strip-debug", &mut strip)?;
        Ok(started.elapsed())
    }
}

/// `DIR/NAME.SUFFIX` for `DIR/NAME`. Not `with_extension`: a name like `7.2-src-KEY` has a
/// dot of its own.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let name = path.file_name().expect("a cache path has a name").to_string_lossy();
    path.with_file_name(format!("{name}.{suffix}"))
}

/// Every `.ko` under `dir`, sorted.
fn find_modules(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            found.extend(find_modules(&path)?);
        } else if path.extension().is_some_and(|e| e == "ko") {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Indexes the installed modules with the host's depmod, the one the harness uses for every
/// other kernel tree (the chroot's may look under usr/lib/modules).
fn depmod(partial: &Path, release: &str) -> anyhow::Result<()> {
    util::output(Command::new("depmod").arg("-b").arg(partial).arg(release))
        .with_context(|| format!("depmod of {} failed", partial.display()))?;
    let dep = partial.join("lib/modules").join(release).join("modules.dep");
    if !dep.is_file() {
        bail!("depmod wrote no {}", dep.display());
    }
    Ok(())
}

/// The tracer reads a module's types from its BTF (`/sys/kernel/btf/MODULE`): a module
/// without a `.BTF` section means pahole or the config failed somewhere.
fn check_module_btf(module: &Path) -> anyhow::Result<()> {
    use object::Object as _;
    let bytes = fs::read(module).with_context(|| format!("reading {}", module.display()))?;
    let file =
        object::File::parse(bytes.as_slice()).with_context(|| format!("{} is not an ELF file", module.display()))?;
    if file.section_by_name(".BTF").is_none() {
        bail!(
            "{} has no .BTF section: the tracer needs module BTF (CONFIG_DEBUG_INFO_BTF_MODULES, pahole)",
            module.display()
        );
    }
    Ok(())
}

/// An exclusive lock on `path` for as long as the file is open; says when it waits.
fn lock(path: &Path) -> anyhow::Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        println!("kernel: waiting for another build in the same work tree ({})", path.display());
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {}", path.display()));
        }
    }
    Ok(file)
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source_kernel::SOURCE_KERNELS;

    fn versions() -> Versions {
        Versions { source: "7.2.13-1".into(), compiler: "16.1.0-3".into(), pahole: "1.32-1".into() }
    }

    #[test]
    fn the_key_changes_with_each_input_and_only_then() {
        let kernel = &SOURCE_KERNELS[0];
        let base = debian::stock_kernel(kernel.base).unwrap();
        let tree = tree_inputs(kernel, base, &versions());
        let seed = Patch::load("seed").unwrap();
        let stock = key_of(&build_inputs(&tree, &all_patches(kernel, &[])));
        let seeded = key_of(&build_inputs(&tree, &all_patches(kernel, std::slice::from_ref(&seed))));
        assert_eq!(stock, key_of(&build_inputs(&tree_inputs(kernel, base, &versions()), &all_patches(kernel, &[]))));
        assert_ne!(stock, seeded, "a patch is part of the key");
        let other = Patch::shipped("other", "--- a/x\n+++ b/x\n");
        let two = |a: &Patch, b: &Patch| key_of(&build_inputs(&tree, &all_patches(kernel, &[a.clone(), b.clone()])));
        assert_ne!(two(&seed, &other), two(&other, &seed), "so is their order");
        for changed in [
            Versions { source: "7.2.13-2".into(), ..versions() },
            Versions { compiler: "16.1.0-4".into(), ..versions() },
            Versions { pahole: "1.33-1".into(), ..versions() },
        ] {
            assert_ne!(key_of(&tree_inputs(kernel, base, &changed)), key_of(&tree));
        }
        let fragment = SourceKernel { fragment: "CONFIG_CXL_BUS=m\n", ..kernel.clone() };
        assert_ne!(key_of(&tree_inputs(&fragment, base, &versions())), key_of(&tree));
        // The recipe's own patch comes first in every build.
        assert_eq!(
            all_patches(kernel, std::slice::from_ref(&seed))[0].name,
            "xtask/patches/cxl-test-type2-param.patch"
        );
    }

    #[test]
    fn files_beside_a_build_keep_its_whole_name() {
        let out = Path::new("/c/builds/7.2-src-0123456789abcdef");
        assert_eq!(beside(out, "log"), Path::new("/c/builds/7.2-src-0123456789abcdef.log"));
        assert_eq!(beside(out, "partial"), Path::new("/c/builds/7.2-src-0123456789abcdef.partial"));
    }

    #[test]
    fn a_build_is_found_only_with_its_info_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Built::read(dir.path()).unwrap().is_none());
        fs::create_dir_all(dir.path().join("cxl_test")).unwrap();
        fs::write(dir.path().join("cxl_test/cxl_test.ko"), b"").unwrap();
        fs::write(dir.path().join("cxl_test/cxl_mock.ko"), b"").unwrap();
        fs::write(dir.path().join(INFO_FILE), "release 7.2.13-tracer\nbuilt in 14m\n").unwrap();
        let built = Built::read(dir.path()).unwrap().unwrap();
        assert_eq!(built.release, "7.2.13-tracer");
        assert_eq!(built.modules, dir.path().join("lib/modules/7.2.13-tracer"));
        assert_eq!(built.cxl_test_modules(), ["cxl_mock.ko", "cxl_test.ko"]);
    }
}
