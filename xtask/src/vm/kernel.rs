//! The guest kernel: a stock Debian kernel of the matrix fetched into the cache, a user's
//! .deb, a user's own image and modules tree, or a kernel built here from source; and the
//! modules the initramfs takes from it.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    debian::{self, StockKernel},
    source_kernel,
    util::{self, cache_dir},
};

/// Where the kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A stock Debian kernel of the matrix (README, "The kernel matrix"): its packages, fetched with apt.
    Stock(&'static StockKernel),
    /// A kernel image .deb the user built or downloaded.
    Deb(PathBuf),
    /// A bzImage and its installed modules directory (`lib/modules/RELEASE`).
    Tree { image: PathBuf, modules: PathBuf },
    /// A kernel built here from source (`--kernel 7.2-src`), built on first use and cached
    /// (docs/source-kernel.md).
    Built(source_kernel::Request),
}

/// A kernel ready to boot: the image and its modules tree with `modules.dep`.
pub struct Kernel {
    pub image: PathBuf,
    /// `.../lib/modules/RELEASE`.
    pub modules: PathBuf,
    pub release: String,
}

impl Kernel {
    pub fn resolve(source: &Source) -> anyhow::Result<Self> {
        match source {
            Source::Stock(stock) => {
                let debs = fetch_stock(stock)?;
                let kernel = unpacked(&debs)?;
                if kernel.release != stock.release {
                    bail!(
                        "the packages of kernel {} ({}) hold release {}, not {}: the matrix in \
                         xtask/src/debian.rs is out of date",
                        stock.name,
                        stock.image_packages.join(", "),
                        kernel.release,
                        stock.release
                    );
                }
                Ok(kernel)
            }
            Source::Deb(deb) => {
                let deb = fs::canonicalize(deb).with_context(|| format!("kernel .deb {} not found", deb.display()))?;
                unpacked(&[deb])
            }
            Source::Tree { image, modules } => from_tree(image, modules),
            Source::Built(request) => {
                let built = source_kernel::build(request.kernel, &request.patches)?;
                from_tree(&built.image, &built.modules)
            }
        }
    }

    /// The kernel of a cxl_test guest (`--topology cxl-test`): a source-built kernel boots
    /// with its cxl_test tree (source_kernel::Built::cxl_test_tree); a user's tree must hold
    /// cxl_test already (`make M=tools/testing/cxl modules_install` into it). A stock kernel
    /// cannot: cxl_test refuses a CXL core built into vmlinux.
    pub fn resolve_cxl_test(source: &Source) -> anyhow::Result<Self> {
        let kernel = match source {
            Source::Built(request) => {
                let built = source_kernel::build(request.kernel, &request.patches)?;
                from_tree(&built.image, &built.cxl_test_tree()?)?
            }
            Source::Tree { .. } | Source::Deb(_) => Self::resolve(source)?,
            Source::Stock(stock) => bail!(
                "--topology cxl-test needs a kernel with the CXL core as modules and tools/testing/cxl built \
                 against it; stock kernel {} builds the core in (CONFIG_CXL_BUS=y), which cxl_test refuses: use \
                 --kernel {} or your own --kernel IMAGE --modules DIR",
                stock.name,
                source_kernel::SOURCE_KERNELS.iter().map(|k| k.name).collect::<Vec<_>>().join(" or --kernel ")
            ),
        };
        let index = kernel.module_index()?;
        if !index.modules.contains_key("cxl_test") {
            bail!(
                "{} has no cxl_test module: install tools/testing/cxl's modules into it \
                 (`make M=tools/testing/cxl modules_install INSTALL_MOD_PATH=DIR`, docs/source-kernel.md)",
                kernel.modules.display()
            );
        }
        Ok(kernel)
    }

    pub fn module_index(&self) -> anyhow::Result<ModuleIndex> {
        ModuleIndex::read(&self.modules)
    }
}

fn kernels_dir() -> PathBuf {
    cache_dir().join("kernels")
}

/// The cached .debs of a stock kernel, downloaded on first use. The first package decides
/// the version and the others are pinned to it, so a tree is never unpacked from two builds
/// (sid moves on while a cache keeps an older package).
fn fetch_stock(stock: &StockKernel) -> anyhow::Result<Vec<PathBuf>> {
    let dir = kernels_dir();
    let mut debs: Vec<PathBuf> = Vec::new();
    for package in stock.image_packages {
        let spec = match debs.first().and_then(|first| deb_version(first)) {
            Some(version) => format!("{package}={version}"),
            None => (*package).to_owned(),
        };
        let deb = debian::cached_deb(stock.suite, &spec, &dir)
            .with_context(|| format!("cannot fetch kernel {} ({})", stock.name, stock.release))?;
        debs.push(deb);
    }
    Ok(debs)
}

/// The version in a .deb's file name (`NAME_VERSION_ARCH.deb`, the epoch's colon as `%3a`).
fn deb_version(deb: &Path) -> Option<String> {
    let name = deb.file_name()?.to_str()?.strip_suffix(".deb")?;
    let mut fields = name.split('_');
    let (_, version, _) = (fields.next()?, fields.next()?, fields.next()?);
    Some(version.replace("%3a", ":"))
}

/// The unpacked tree of `debs` (one kernel: image, modules, base) in the cache, unpacked
/// together and indexed (depmod) on first use.
fn unpacked(debs: &[PathBuf]) -> anyhow::Result<Kernel> {
    let first = debs.first().context("no kernel package to unpack")?;
    let stem = first.file_stem().and_then(|s| s.to_str()).context("the kernel .deb has no usable file name")?;
    // A user's .deb may be rebuilt under the same name: key its tree on size and mtime too.
    let mut stamps = Vec::new();
    for deb in debs {
        let meta = fs::metadata(deb).with_context(|| format!("reading {}", deb.display()))?;
        stamps.push(format!("{}:{}:{:?}", deb.display(), meta.len(), meta.modified().ok()));
    }
    let key = fnv1a(stamps.join("\n").as_bytes());
    let tree = kernels_dir().join(format!("{stem}-{key:016x}"));
    let names = || debs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
    if !tree.exists() {
        println!("vm: unpacking {}", names());
        let staging = kernels_dir().join(format!(".unpack-{}", std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
        let result = (|| {
            for deb in debs {
                util::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&staging))
                    .with_context(|| format!("unpacking {} failed", deb.display()))?;
            }
            let layout = Layout::find(&staging).with_context(|| format!("{} do not make a kernel", names()))?;
            // Debian's packages carry no modules.dep: the postinst makes it on the target.
            depmod(&layout)?;
            fs::rename(&staging, &tree).with_context(|| format!("moving {} to {}", staging.display(), tree.display()))
        })();
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
    }
    let layout = Layout::find(&tree).with_context(|| format!("the cached tree {} (of {})", tree.display(), names()))?;
    Ok(Kernel { image: layout.image, modules: layout.modules, release: layout.release })
}

/// Where the modules of an unpacked kernel live: `lib/modules` in Debian 12's packages,
/// `usr/lib/modules` in the merged-/usr packages of later suites.
const MODULE_ROOTS: &[&str] = &["lib/modules", "usr/lib/modules"];

/// An unpacked kernel tree: its image, its modules directory and its release.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    image: PathBuf,
    /// `ROOT/lib/modules/RELEASE` or `ROOT/usr/lib/modules/RELEASE`.
    modules: PathBuf,
    release: String,
}

impl Layout {
    /// Finds the one release under the module roots of `tree` and its image: Debian 12's
    /// `boot/vmlinuz-RELEASE`, or the image the merged-/usr packages keep in the modules
    /// directory (`vmlinuz`, or `vmlinuz.unsigned` in sid's `linux-binary-unsigned-*`).
    fn find(tree: &Path) -> anyhow::Result<Self> {
        let mut found = Vec::new();
        for root in MODULE_ROOTS {
            let dir = tree.join(root);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                if entry.path().is_dir() {
                    found.push((dir.join(entry.file_name()), entry.file_name()));
                }
            }
        }
        found.sort();
        let (modules, release) = match found.as_slice() {
            [(modules, release)] => {
                (modules.clone(), release.to_str().context("the kernel release is not UTF-8")?.to_owned())
            }
            [] => bail!(
                "{} has no kernel release under {}: is it a kernel image package?",
                tree.display(),
                MODULE_ROOTS.join(" or ")
            ),
            many => bail!(
                "{} holds several kernel releases ({}): expected one",
                tree.display(),
                many.iter().map(|(m, _)| m.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        };
        let candidates = [
            tree.join("boot").join(format!("vmlinuz-{release}")),
            modules.join("vmlinuz"),
            modules.join("vmlinuz.unsigned"),
        ];
        let image = candidates
            .iter()
            .find(|c| c.is_file())
            .with_context(|| {
                format!(
                    "kernel {release} in {} has no image (looked for {})",
                    tree.display(),
                    candidates
                        .iter()
                        .map(|c| c.strip_prefix(tree).unwrap_or(c).display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?
            .clone();
        Ok(Self { image, modules, release })
    }

    /// The `depmod -b` base of the modules directory: `BASE/lib/modules/RELEASE`.
    fn depmod_base(&self) -> &Path {
        self.modules
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .expect("the modules directory lies under lib/modules")
    }
}

/// Indexes the modules of an unpacked tree (`modules.dep` and friends).
fn depmod(layout: &Layout) -> anyhow::Result<()> {
    util::output(Command::new("depmod").arg("-b").arg(layout.depmod_base()).arg(&layout.release))
        .context("depmod failed on the unpacked kernel (the kmod package provides it)")?;
    if !layout.modules.join("modules.dep").is_file() {
        bail!(
            "depmod -b {} {} wrote no modules.dep in {}: this kmod looks for modules elsewhere",
            layout.depmod_base().display(),
            layout.release,
            layout.modules.display()
        );
    }
    Ok(())
}

fn from_tree(image: &Path, modules: &Path) -> anyhow::Result<Kernel> {
    if !image.is_file() {
        bail!("kernel image {} not found", image.display());
    }
    let modules =
        fs::canonicalize(modules).with_context(|| format!("modules directory {} not found", modules.display()))?;
    let release = modules.file_name().and_then(|n| n.to_str()).context("the modules directory has no name")?.to_owned();
    if !modules.join("modules.dep").is_file() {
        // An installed tree (`make modules_install INSTALL_MOD_PATH=BASE`) lies at
        // BASE/lib/modules/RELEASE: depmod can index it in place.
        let base = modules.parent().and_then(Path::parent).and_then(Path::parent);
        let installed = modules.parent().is_some_and(|p| p.ends_with("lib/modules"));
        match base {
            Some(base) if installed => {
                util::output(Command::new("depmod").arg("-b").arg(base).arg(&release))
                    .with_context(|| format!("depmod failed on {}", modules.display()))?;
            }
            _ => bail!(
                "{} has no modules.dep and is not an installed tree: run \
                 `make modules_install INSTALL_MOD_PATH=DIR` and pass --modules DIR/lib/modules/RELEASE",
                modules.display()
            ),
        }
    }
    Ok(Kernel { image: fs::canonicalize(image)?, modules, release })
}

/// One module of the kernel's tree.
#[derive(Clone, Debug)]
pub struct Module {
    /// Path relative to the modules directory, as in modules.dep (`kernel/drivers/cxl/cxl_mem.ko.xz`).
    pub path: String,
    /// Names of the modules it needs, from modules.dep (already transitive there).
    pub deps: Vec<String>,
}

/// The kernel's modules.dep and modules.builtin, by module name.
pub struct ModuleIndex {
    pub modules: BTreeMap<String, Module>,
    pub builtin: BTreeSet<String>,
}

impl ModuleIndex {
    fn read(dir: &Path) -> anyhow::Result<Self> {
        let dep_path = dir.join("modules.dep");
        let dep = fs::read_to_string(&dep_path).with_context(|| format!("reading {}", dep_path.display()))?;
        let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        Ok(Self::parse(&dep, &builtin))
    }

    pub(super) fn parse(dep: &str, builtin: &str) -> Self {
        let mut modules = BTreeMap::new();
        for line in dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(module_name).collect();
            modules.insert(module_name(path), Module { path: path.trim().to_owned(), deps });
        }
        let builtin = builtin.lines().map(module_name).collect();
        Self { modules, builtin }
    }

    /// Whether `name` is compiled into the kernel (and not also a module).
    pub fn is_builtin(&self, name: &str) -> bool {
        let name = normalize(name);
        self.builtin.contains(&name) && !self.modules.contains_key(&name)
    }

    /// `names` and everything they need, each once, dependencies before their users.
    /// Built-in names are dropped; a name that is neither a module nor built in is an error.
    pub fn closure<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> anyhow::Result<Vec<String>> {
        let mut order = Vec::new();
        for name in names {
            if self.is_builtin(name) {
                continue;
            }
            let name = normalize(name);
            let module = self.modules.get(&name).with_context(|| {
                format!("module {name} is neither built in nor in modules.dep of this kernel: is the driver enabled in its config?")
            })?;
            // modules.dep lists the whole transitive set, the deepest last.
            for dep in module.deps.iter().rev().chain(std::iter::once(&name)) {
                if !order.contains(dep) {
                    if !self.modules.contains_key(dep) {
                        bail!("modules.dep names {dep} as needed by {name} but has no entry for it");
                    }
                    order.push(dep.clone());
                }
            }
        }
        Ok(order)
    }
}

/// A module's name from its path or name: `kernel/fs/9p/9pnet-virtio.ko.xz` → `9pnet_virtio`.
pub fn module_name(path: &str) -> String {
    let file = path.trim().rsplit('/').next().unwrap_or_default();
    let stem = file.split_once(".ko").map_or(file, |(stem, _)| stem);
    normalize(stem)
}

fn normalize(name: &str) -> String {
    name.trim().replace('-', "_")
}

/// The bytes of a module file, decompressed (.ko.xz, .ko.zst, .ko.gz) as the guest's
/// busybox modprobe loads only plain .ko files.
pub fn read_decompressed(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else if name.ends_with(".ko.gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some(tool) => {
            let out = Command::new(tool).arg("-dc").arg(path).output().with_context(|| {
                format!("cannot run {tool} to decompress {} (cargo xtask setup installs it)", path.display())
            })?;
            if !out.status.success() {
                bail!("{tool} -dc {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim_end());
            }
            Ok(out.stdout)
        }
    }
}

/// A user-built module passed with `--module`: its name and the modules it needs, from its
/// own .modinfo (the name a module registers is in .modinfo, not in its file name).
pub struct UserModule {
    pub file: PathBuf,
    pub name: String,
    pub depends: Vec<String>,
}

impl UserModule {
    pub fn inspect(file: &Path) -> anyhow::Result<Self> {
        if !file.is_file() {
            bail!("module file {} not found", file.display());
        }
        let field = |f: &str| {
            util::output(Command::new("modinfo").args(["-F", f]).arg(file))
                .with_context(|| format!("modinfo cannot read {}: is it a kernel module?", file.display()))
        };
        let name = field("name")?.trim().to_owned();
        let name = if name.is_empty() { module_name(&file.to_string_lossy()) } else { normalize(&name) };
        let depends = field("depends")?.split(',').map(normalize).filter(|d| !d.is_empty()).collect();
        Ok(Self { file: fs::canonicalize(file)?, name, depends })
    }
}

/// A stable 64-bit FNV-1a hash, for cache keys that must not change between Rust releases.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet.ko.xz:
kernel/fs/netfs/netfs.ko.xz:
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz
kernel/drivers/cxl/cxl_pmem.ko.xz: kernel/drivers/nvdimm/libnvdimm.ko.xz
kernel/drivers/nvdimm/libnvdimm.ko.xz:
kernel/drivers/cxl/cxl_mem.ko.xz:
";

    #[test]
    fn names_from_paths() {
        assert_eq!(module_name("kernel/drivers/cxl/cxl_mem.ko.xz"), "cxl_mem");
        assert_eq!(module_name("updates/virtio-rng.ko"), "virtio_rng");
        assert_eq!(module_name("cxl_pci"), "cxl_pci");
    }

    #[test]
    fn closure_puts_dependencies_first_once() {
        let index = ModuleIndex::parse(DEP, "kernel/drivers/cxl/core/cxl_core.ko\n");
        let order = index.closure(["9pnet_virtio", "9p", "cxl_pmem", "cxl_core", "cxl-mem"]).unwrap();
        assert_eq!(order, ["9pnet", "9pnet_virtio", "netfs", "9p", "libnvdimm", "cxl_pmem", "cxl_mem"]);
    }

    /// An unpacked tree with `files` (relative paths) in a fresh directory.
    fn tree(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            let path = dir.path().join(f);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, b"").unwrap();
        }
        dir
    }

    #[test]
    fn layout_of_a_debian_12_image_package() {
        // linux-image-6.12.117+deb12-amd64-unsigned: boot/ and lib/modules/.
        let rel = "6.12.117+deb12-amd64";
        let t = tree(&[
            &format!("boot/vmlinuz-{rel}"),
            &format!("boot/config-{rel}"),
            &format!("lib/modules/{rel}/kernel/drivers/cxl/cxl_mem.ko.xz"),
            &format!("lib/modules/{rel}/modules.builtin"),
        ]);
        let layout = Layout::find(t.path()).unwrap();
        assert_eq!(layout.release, rel);
        assert_eq!(layout.image, t.path().join(format!("boot/vmlinuz-{rel}")));
        assert_eq!(layout.modules, t.path().join(format!("lib/modules/{rel}")));
        assert_eq!(layout.depmod_base(), t.path());
    }

    #[test]
    fn layout_of_merged_usr_packages() {
        // linux-binary-unsigned-, linux-modules- and linux-base-7.2.13+deb14-amd64 together.
        let rel = "7.2.13+deb14-amd64";
        let t = tree(&[
            &format!("usr/lib/modules/{rel}/vmlinuz.unsigned"),
            &format!("usr/lib/modules/{rel}/kernel/drivers/cxl/cxl_mem.ko.xz"),
            &format!("usr/lib/modules/{rel}/modules.builtin"),
            &format!("usr/lib/modules/{rel}/modules.order"),
            &format!("usr/lib/modules/{rel}/config"),
            "usr/share/doc/linux-base-7.2.13+deb14-amd64/copyright",
        ]);
        let layout = Layout::find(t.path()).unwrap();
        assert_eq!(layout.release, rel);
        assert_eq!(layout.image, t.path().join(format!("usr/lib/modules/{rel}/vmlinuz.unsigned")));
        assert_eq!(layout.modules, t.path().join(format!("usr/lib/modules/{rel}")));
        assert_eq!(layout.depmod_base(), t.path().join("usr"));
    }

    #[test]
    fn layout_names_what_is_missing() {
        let rel = "7.2.13+deb14-amd64";
        // The modules package alone: no image.
        let t = tree(&[&format!("usr/lib/modules/{rel}/kernel/fs/9p/9p.ko.xz")]);
        let err = format!("{:#}", Layout::find(t.path()).unwrap_err());
        assert!(err.contains("has no image") && err.contains("vmlinuz.unsigned"), "{err}");
        // Not a kernel package at all.
        let t = tree(&["usr/share/doc/x/copyright"]);
        let err = format!("{:#}", Layout::find(t.path()).unwrap_err());
        assert!(err.contains("no kernel release"), "{err}");
        // Two releases.
        let t = tree(&["lib/modules/6.1.0-57-amd64/modules.builtin", "usr/lib/modules/7.2.13/modules.builtin"]);
        let err = format!("{:#}", Layout::find(t.path()).unwrap_err());
        assert!(err.contains("several kernel releases"), "{err}");
    }

    #[test]
    fn versions_from_deb_file_names() {
        let v = |name: &str| deb_version(Path::new(name));
        assert_eq!(v("/c/linux-modules-7.2.13+deb14-amd64_7.2.13-1_amd64.deb").as_deref(), Some("7.2.13-1"));
        assert_eq!(
            v("linux-image-6.12.117+deb12-amd64-unsigned_6.12.117-1~deb12u1_amd64.deb").as_deref(),
            Some("6.12.117-1~deb12u1")
        );
        assert_eq!(v("x_1%3a2.0-1_all.deb").as_deref(), Some("1:2.0-1"));
        assert_eq!(v("not-a-deb.tar"), None);
    }

    #[test]
    fn closure_names_a_missing_module() {
        let index = ModuleIndex::parse(DEP, "");
        let err = index.closure(["cxl_acpi"]).unwrap_err().to_string();
        assert!(err.contains("cxl_acpi"), "{err}");
    }
}
