//! The make steps of a source-kernel build, run in the sid chroot with the source-kernels
//! cache bound inside (docs/source-kernel.md, "What is built"), and the checks of what they
//! made.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{SourceKernel, cache, config, progress::BuildLog, tree::WorkTree};
use crate::{debian::StockKernel, fixture::chroot::Session, util};

/// Where the source-kernels cache is bound inside the chroot.
pub const INSIDE: &str = "/tracer-kernels";
/// In `obj/`: the config was made from defconfig and the fragment and passed the check.
const CONFIGURED: &str = ".tracer-configured";

/// The make steps, run inside the chroot session with the work tree bound under `INSIDE`.
pub struct Make<'a> {
    pub session: &'a Session<'a>,
    pub work: &'a WorkTree,
    pub base: &'a StockKernel,
    pub log: &'a BuildLog,
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
    pub fn configure(&self, kernel: &SourceKernel, tree_key: &str) -> anyhow::Result<Duration> {
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

    pub fn kernel(&self) -> anyhow::Result<Duration> {
        self.log.run("[2/5] the kernel: make bzImage modules", self.make().args(["bzImage", "modules"]))
    }

    /// tools/testing/cxl, built against the kernel just built. Its Kbuild compiles the CXL
    /// drivers again from `../../../drivers/cxl`, relative to its output folder, so that
    /// folder sits three levels down in a tree of its own: those objects land in
    /// `cxl-test/drivers/`, never over the kernel's own in `obj/drivers/`.
    pub fn cxl_test(&self) -> anyhow::Result<Duration> {
        let output = self.work.dir.join("cxl-test/tools/testing/cxl");
        fs::create_dir_all(&output).with_context(|| format!("creating {}", output.display()))?;
        let mut make = self.make();
        make.arg(format!("M={}", self.inside(&self.work.src().join("tools/testing/cxl")).display()));
        make.arg(format!("MO={}", self.inside(&output).display()));
        self.log.run("[3/5] cxl_test: make M=tools/testing/cxl modules", make.arg("modules"))
    }

    /// `make kernelrelease`: the release the image reports (`7.2.13-tracer`).
    pub fn release(&self) -> anyhow::Result<String> {
        let out = util::output(self.make().args(["-s", "kernelrelease"]))?;
        let release = out.trim();
        if release.is_empty() || release.contains(char::is_whitespace) {
            bail!("make kernelrelease printed {out:?}, not a release");
        }
        Ok(release.to_owned())
    }

    /// The image, the config and the modules (stripped of DWARF, which keeps their BTF)
    /// into `partial`; cxl_test's modules into `partial/cxl_test`, stripped the same way.
    pub fn install(&self, partial: &Path, release: &str) -> anyhow::Result<Duration> {
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
pub fn depmod(partial: &Path, release: &str) -> anyhow::Result<()> {
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
pub fn check_module_btf(module: &Path) -> anyhow::Result<()> {
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
