//! The guest kernel: the Debian package fetched into the cache, a user's .deb, or a user's
//! own image and modules tree; and the modules the initramfs takes from it.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::util::{self, cache_dir};

/// The kernel the harness boots unless told otherwise (DESIGN §6).
pub const DEFAULT_PACKAGE: &str = "linux-image-6.12.117+deb12-amd64-unsigned";

/// Where the kernel comes from.
pub enum Source {
    /// A Debian package name, fetched with `apt-get download`.
    Package(String),
    /// A kernel image .deb the user built or downloaded.
    Deb(PathBuf),
    /// A bzImage and its installed modules directory (`lib/modules/RELEASE`).
    Tree { image: PathBuf, modules: PathBuf },
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
            Source::Package(package) => {
                let deb = fetch_package(package)?;
                unpacked(&deb)
            }
            Source::Deb(deb) => {
                let deb = fs::canonicalize(deb)
                    .with_context(|| format!("kernel .deb {} not found", deb.display()))?;
                unpacked(&deb)
            }
            Source::Tree { image, modules } => from_tree(image, modules),
        }
    }

    pub fn module_index(&self) -> anyhow::Result<ModuleIndex> {
        ModuleIndex::read(&self.modules)
    }
}

fn kernels_dir() -> PathBuf {
    cache_dir().join("kernels")
}

/// The cached .deb of `package`, downloaded on first use.
fn fetch_package(package: &str) -> anyhow::Result<PathBuf> {
    let dir = kernels_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(deb) = find_deb(&dir, package)? {
        return Ok(deb);
    }
    println!("vm: downloading {package} into {}", dir.display());
    // Download into a staging directory so an interrupted download is never taken for a
    // complete package.
    let staging = dir.join(format!(".download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let result = util::output(
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(&staging),
    )
    .with_context(|| {
        format!(
            "cannot download the kernel package {package}: it comes from Debian bookworm-security; \
                 check the apt sources and run `apt-get update`, or pass --kernel-deb FILE"
        )
    });
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    let deb = find_deb(&staging, package)?.with_context(|| {
        format!(
            "apt-get download {package} left no .deb in {}",
            staging.display()
        )
    })?;
    let target = dir.join(deb.file_name().expect("a found file has a name"));
    fs::rename(&deb, &target)
        .with_context(|| format!("moving {} to {}", deb.display(), target.display()))?;
    let _ = fs::remove_dir_all(&staging);
    Ok(target)
}

fn find_deb(dir: &Path, package: &str) -> anyhow::Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    found.sort();
    Ok(found.pop())
}

/// The unpacked tree of `deb` in the cache, unpacked and indexed (depmod) on first use.
fn unpacked(deb: &Path) -> anyhow::Result<Kernel> {
    let meta = fs::metadata(deb).with_context(|| format!("reading {}", deb.display()))?;
    let stem = deb
        .file_stem()
        .and_then(|s| s.to_str())
        .context("the kernel .deb has no usable file name")?;
    // A user's .deb may be rebuilt under the same name: key its tree on size and mtime too.
    let key = fnv1a(
        format!(
            "{}:{}:{:?}",
            deb.display(),
            meta.len(),
            meta.modified().ok()
        )
        .as_bytes(),
    );
    let tree = kernels_dir().join(format!("{stem}-{key:016x}"));
    if !tree.exists() {
        println!("vm: unpacking {}", deb.display());
        let staging = kernels_dir().join(format!(".unpack-{}", std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
        let result = (|| {
            util::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&staging))
                .with_context(|| format!("unpacking {} failed", deb.display()))?;
            let release = single_release(&staging.join("lib/modules"))
                .with_context(|| format!("{} is not a kernel image package", deb.display()))?;
            // Debian's package carries no modules.dep: the postinst makes it on the target.
            util::output(Command::new("depmod").arg("-b").arg(&staging).arg(&release))
                .context("depmod failed on the unpacked kernel (the kmod package provides it)")?;
            fs::rename(&staging, &tree)
                .with_context(|| format!("moving {} to {}", staging.display(), tree.display()))
        })();
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
    }
    let release = single_release(&tree.join("lib/modules"))?;
    let image = tree.join("boot").join(format!("vmlinuz-{release}"));
    if !image.is_file() {
        bail!(
            "{} has no boot/vmlinuz-{release}: is it a kernel image package?",
            deb.display()
        );
    }
    Ok(Kernel {
        image,
        modules: tree.join("lib/modules").join(&release),
        release,
    })
}

fn single_release(modules_root: &Path) -> anyhow::Result<String> {
    let releases: Vec<String> = fs::read_dir(modules_root)
        .with_context(|| format!("no {}", modules_root.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    match releases.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("{} holds no kernel release", modules_root.display()),
        many => bail!(
            "{} holds several kernel releases ({}): expected one",
            modules_root.display(),
            many.join(", ")
        ),
    }
}

fn from_tree(image: &Path, modules: &Path) -> anyhow::Result<Kernel> {
    if !image.is_file() {
        bail!("kernel image {} not found", image.display());
    }
    let modules = fs::canonicalize(modules)
        .with_context(|| format!("modules directory {} not found", modules.display()))?;
    let release = modules
        .file_name()
        .and_then(|n| n.to_str())
        .context("the modules directory has no name")?
        .to_owned();
    if !modules.join("modules.dep").is_file() {
        // An installed tree (`make modules_install INSTALL_MOD_PATH=BASE`) lies at
        // BASE/lib/modules/RELEASE: depmod can index it in place.
        let base = modules
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent);
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
    Ok(Kernel {
        image: fs::canonicalize(image)?,
        modules,
        release,
    })
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
        let dep = fs::read_to_string(&dep_path)
            .with_context(|| format!("reading {}", dep_path.display()))?;
        let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        Ok(Self::parse(&dep, &builtin))
    }

    fn parse(dep: &str, builtin: &str) -> Self {
        let mut modules = BTreeMap::new();
        for line in dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(module_name).collect();
            modules.insert(
                module_name(path),
                Module {
                    path: path.trim().to_owned(),
                    deps,
                },
            );
        }
        let builtin = builtin.lines().map(module_name).collect();
        Self { modules, builtin }
    }

    /// `names` and everything they need, each once, dependencies before their users.
    /// Built-in names are dropped; a name that is neither a module nor built in is an error.
    pub fn closure<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> anyhow::Result<Vec<String>> {
        let mut order = Vec::new();
        for name in names {
            let name = normalize(name);
            if self.builtin.contains(&name) && !self.modules.contains_key(&name) {
                continue;
            }
            let module = self.modules.get(&name).with_context(|| {
                format!("module {name} is neither built in nor in modules.dep of this kernel: is the driver enabled in its config?")
            })?;
            // modules.dep lists the whole transitive set, the deepest last.
            for dep in module.deps.iter().rev().chain(std::iter::once(&name)) {
                if !order.contains(dep) {
                    if !self.modules.contains_key(dep) {
                        bail!(
                            "modules.dep names {dep} as needed by {name} but has no entry for it"
                        );
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
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| {
                    format!(
                        "cannot run {tool} to decompress {} (cargo xtask setup installs it)",
                        path.display()
                    )
                })?;
            if !out.status.success() {
                bail!(
                    "{tool} -dc {} failed: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr).trim_end()
                );
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
            util::output(Command::new("modinfo").args(["-F", f]).arg(file)).with_context(|| {
                format!(
                    "modinfo cannot read {}: is it a kernel module?",
                    file.display()
                )
            })
        };
        let name = field("name")?.trim().to_owned();
        let name = if name.is_empty() {
            module_name(&file.to_string_lossy())
        } else {
            normalize(&name)
        };
        let depends = field("depends")?
            .split(',')
            .map(normalize)
            .filter(|d| !d.is_empty())
            .collect();
        Ok(Self {
            file: fs::canonicalize(file)?,
            name,
            depends,
        })
    }
}

/// A stable 64-bit FNV-1a hash, for cache keys that must not change between Rust releases.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
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
        let order = index
            .closure(["9pnet_virtio", "9p", "cxl_pmem", "cxl_core", "cxl-mem"])
            .unwrap();
        assert_eq!(
            order,
            [
                "9pnet",
                "9pnet_virtio",
                "netfs",
                "9p",
                "libnvdimm",
                "cxl_pmem",
                "cxl_mem"
            ]
        );
    }

    #[test]
    fn closure_names_a_missing_module() {
        let index = ModuleIndex::parse(DEP, "");
        let err = index.closure(["cxl_acpi"]).unwrap_err().to_string();
        assert!(err.contains("cxl_acpi"), "{err}");
    }
}
