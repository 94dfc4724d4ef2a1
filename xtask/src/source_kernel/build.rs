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
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, bail};

use super::{
    SourceKernel, cache,
    patches::Patch,
    progress::{BuildLog, minutes},
    steps::{INSIDE, Make, check_module_btf, depmod},
    tree::{self, WorkTree},
};
use crate::{
    debian::{self, StockKernel},
    fixture::chroot::Chroot,
    setup,
};

/// Bumped when the build's steps change what they make: every cached build is then stale.
const RECIPE: u32 = 1;
/// What the sid chroot needs beyond a module build's packages for a whole kernel: Kbuild's
/// tools (bc, bison, flex, libelf for objtool, libssl for the signing tools, cpio and rsync
/// for the headers), and pahole (dwarves) for BTF.
pub const CHROOT_PACKAGES: &[&str] =
    &["bc", "bison", "flex", "libelf-dev", "libssl-dev", "dwarves", "python3", "cpio", "rsync"];
/// Marks a finished build and says what went into it.
const INFO_FILE: &str = "build-info";

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

    /// The modules tree a cxl_test guest boots with (`--topology cxl-test`): the installed
    /// modules with cxl_test's in `updates/`, which depmod prefers, so that `modprobe
    /// cxl_core` loads cxl_test's build of it (the mock's `--wrap`ped calls), as on a
    /// developer's machine after `make M=tools/testing/cxl modules_install`. Made on first
    /// use beside the build (`DIR/cxl-test-modules/lib/modules/RELEASE`), a plain copy of
    /// the build's 20 MB so that depmod never writes through a link into the build.
    pub fn cxl_test_tree(&self) -> anyhow::Result<PathBuf> {
        let out = self.dir.join("cxl-test-modules");
        let modules = out.join("lib/modules").join(&self.release);
        if modules.join("modules.dep").is_file() {
            return Ok(modules);
        }
        let _lock = crate::util::lock_file(&beside(&out, "lock"), "kernel: another build of the same kernel")?;
        if modules.join("modules.dep").is_file() {
            return Ok(modules);
        }
        let partial = beside(&out, "partial");
        remove_dir(&partial)?;
        let tree = partial.join("lib/modules");
        fs::create_dir_all(&tree).with_context(|| format!("creating {}", tree.display()))?;
        crate::util::output(std::process::Command::new("cp").arg("-a").arg(&self.modules).arg(&tree))
            .with_context(|| format!("copying {} to {}", self.modules.display(), tree.display()))?;
        let updates = tree.join(&self.release).join("updates");
        fs::create_dir_all(&updates).with_context(|| format!("creating {}", updates.display()))?;
        let names = self.cxl_test_modules();
        if !names.iter().any(|n| n == "cxl_test.ko") {
            bail!("{} holds no cxl_test.ko: delete {} to build it again", self.cxl_test.display(), self.dir.display());
        }
        for name in &names {
            fs::copy(self.cxl_test.join(name), updates.join(name))
                .with_context(|| format!("copying {name} to {}", updates.display()))?;
        }
        depmod(&partial, &self.release)?;
        let dep = fs::read_to_string(tree.join(&self.release).join("modules.dep"))?;
        if !dep.lines().any(|l| l.starts_with("updates/cxl_core.ko:")) {
            bail!("depmod did not prefer cxl_test's cxl_core in {}: its modules.dep names another", partial.display());
        }
        remove_dir(&out)?;
        fs::rename(&partial, &out).with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
        Ok(modules)
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
    let _lock = crate::util::lock_file(&beside(&work_dir, "lock"), "kernel: another build in the same work tree")?;
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
    if !work_dir.join("obj/vmlinux").is_file() {
        println!(
            "kernel: nothing of this kernel and config is built yet: a cold build, 15 to 20 minutes on 2 \
             cores; later builds and other --patch sets reuse it"
        );
    }
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

/// `DIR/NAME.SUFFIX` for `DIR/NAME`. Not `with_extension`: a name like `7.2-src-KEY` has a
/// dot of its own.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let name = path.file_name().expect("a cache path has a name").to_string_lossy();
    path.with_file_name(format!("{name}.{suffix}"))
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
