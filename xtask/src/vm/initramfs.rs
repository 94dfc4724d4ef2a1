//! The guest's initramfs, in two concatenated cpio archives: a base that only changes with
//! the kernel (busybox and the decompressed modules, cached) and a per-run part (/init, the
//! workloads, the tracer, the user's modules and the guest's modules.dep). The kernel
//! unpacks both in order; it accepts uncompressed archives, which also spares the emulated
//! guest a decompression.
use std::{
    collections::BTreeMap,
    fs,
    io::BufWriter,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::{
    cpio, guest,
    kernel::{self, Kernel, ModuleIndex, UserModule, fnv1a},
};
use crate::util::{self, cache_dir};

/// Bumped when the base archive's layout changes, so stale cached bases are not reused.
const BASE_FORMAT: u32 = 2;

/// The CXL drivers the workloads exercise, besides what /init needs for the results share
/// (basics.rs); `cxl_core` and `cxl_port` are built into Debian's kernels. The guest loads
/// them all, in this order, except cxl_pmem unless asked (`--pmem`).
pub const CXL_MODULES: &[&str] = &["cxl_acpi", "cxl_pci", "cxl_mem", "cxl_pmem"];
pub const PMEM_MODULE: &str = "cxl_pmem";
/// What `--topology cxl-test` loads, in order: cxl_test's builds of the CXL drivers (from
/// `updates/`; cxl_core and cxl_mock come as their dependencies), its memdev driver, and
/// cxl_test itself last, whose init makes the mock devices for drivers already there.
pub const CXL_TEST_MODULES: &[&str] = &["cxl_acpi", "cxl_port", "cxl_mem", "cxl_pmem", "cxl_mock_mem", "cxl_test"];

/// The static busybox the guest's userland is made of.
fn busybox() -> anyhow::Result<PathBuf> {
    let path = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("busybox not found: install the busybox-static package (cargo xtask setup does)")?;
    let elf = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    if has_interpreter(&elf)? {
        bail!(
            "{} is dynamically linked and cannot run in the guest: install busybox-static in place of busybox",
            path.display()
        );
    }
    Ok(path)
}

/// Whether a 64-bit little-endian ELF file asks for a dynamic loader (PT_INTERP).
pub fn has_interpreter(elf: &[u8]) -> anyhow::Result<bool> {
    let u16_at = |at: usize| elf.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| elf.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    let u64_at = |at: usize| elf.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        bail!("not a 64-bit ELF file");
    }
    let phoff = u64_at(0x20).context("truncated ELF header")? as usize;
    let phentsize = u16_at(0x36).context("truncated ELF header")? as usize;
    let phnum = u16_at(0x38).context("truncated ELF header")? as usize;
    for i in 0..phnum {
        const PT_INTERP: u32 = 3;
        if u32_at(phoff + i * phentsize).context("truncated ELF program headers")? == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The cached base archive for `kernel` with `modules` (a dependency-closed list).
pub fn base(kernel: &Kernel, index: &ModuleIndex, modules: &[String]) -> anyhow::Result<PathBuf> {
    let busybox = busybox()?;
    let stamp = |p: &Path| {
        fs::metadata(p).map(|m| format!("{}:{}:{:?}", p.display(), m.len(), m.modified().ok())).unwrap_or_default()
    };
    // Keyed on each module file too: a user's tree may be rebuilt in place under the same
    // release, and two kernels may need different modules (basics.rs).
    let module_stamps: Vec<String> =
        modules.iter().map(|m| stamp(&kernel.modules.join(&index.modules[m].path))).collect();
    let key = fnv1a(
        format!(
            "{BASE_FORMAT}\n{}\n{}\n{}\n{}\n{}",
            kernel.release,
            stamp(&kernel.modules.join("modules.dep")),
            stamp(&busybox),
            modules.join(" "),
            module_stamps.join("\n")
        )
        .as_bytes(),
    );
    let dir = cache_dir().join("initramfs");
    let path = dir.join(format!("base-{}-{key:016x}.cpio", kernel.release));
    if path.is_file() {
        return Ok(path);
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    println!("vm: building the base initramfs (busybox, {} modules)", modules.len());
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = cpio::Writer::new(BufWriter::new(file));
    for d in ["dev", "proc", "sys", "tmp", "share", "vm", "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root"] {
        w.dir(d)?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    let data = fs::read(&busybox).with_context(|| format!("reading {}", busybox.display()))?;
    w.file("bin/busybox", 0o755, &data)?;
    let applets = util::output(Command::new(&busybox).arg("--list-full")).context("listing busybox applets")?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet != "bin/busybox" {
            w.symlink(applet, "/bin/busybox")?;
        }
    }
    let root = format!("lib/modules/{}", kernel.release);
    for name in modules {
        let module = &index.modules[name];
        let data = kernel::read_decompressed(&kernel.modules.join(&module.path))?;
        w.file(&format!("{root}/{}", plain_ko(&module.path)), 0o644, &data)?;
    }
    // What kmod's depmod needs besides the modules to say what is built in (the Debian
    // userland indexes the guest's modules with it, init.sh).
    for list in ["modules.builtin", "modules.builtin.modinfo", "modules.order"] {
        if let Ok(data) = fs::read(kernel.modules.join(list)) {
            w.file(&format!("{root}/{list}"), 0o644, &data)?;
        }
    }
    w.finish()?;
    fs::rename(&tmp, &path).with_context(|| format!("moving {} to {}", tmp.display(), path.display()))?;
    Ok(path)
}

/// `kernel/drivers/cxl/cxl_mem.ko.xz` → `kernel/drivers/cxl/cxl_mem.ko`.
fn plain_ko(path: &str) -> String {
    match path.rfind(".ko") {
        Some(at) => format!("{}.ko", &path[..at]),
        None => path.to_owned(),
    }
}

/// The guest's modules.dep: every module of the base by its decompressed path, the user's
/// modules under `updates/` in place of the stock ones of the same name.
pub fn guest_modules_dep(index: &ModuleIndex, modules: &[String], user: &[UserModule]) -> anyhow::Result<String> {
    let mut paths: BTreeMap<&str, String> =
        modules.iter().map(|m| (m.as_str(), plain_ko(&index.modules[m].path))).collect();
    for u in user {
        paths.insert(&u.name, user_module_path(u));
    }
    let mut out = String::new();
    for (name, path) in &paths {
        let deps: Vec<String> = match user.iter().find(|u| u.name == *name) {
            // The user's module needs what its own .modinfo says, with everything those need.
            Some(u) => {
                let mut closure = index.closure(u.depends.iter().map(String::as_str))?;
                closure.retain(|d| d != name);
                closure
            }
            None => index.modules[*name].deps.clone(),
        };
        let dep_paths: Vec<&str> = deps
            .iter()
            .map(|d| {
                paths
                    .get(d.as_str())
                    .map(String::as_str)
                    .with_context(|| format!("module {d} needed by {name} is not in the initramfs"))
            })
            .collect::<anyhow::Result<_>>()?;
        out.push_str(&format!("{path}: {}\n", dep_paths.join(" ")));
    }
    Ok(out)
}

pub fn user_module_path(module: &UserModule) -> String {
    format!("updates/{}.ko", module.name)
}

/// A host file put into the guest at `path` (relative to /), with `mode`.
#[derive(Clone, Debug)]
pub struct GuestFile {
    pub path: String,
    pub source: PathBuf,
    pub mode: u32,
}

/// What goes into the per-run archive.
pub struct RunPart<'a> {
    pub release: &'a str,
    pub config: String,
    pub modules_dep: String,
    pub user_modules: &'a [UserModule],
    pub tracer: Option<&'a Path>,
    /// The user's script, copied to /vm/script.
    pub script: Option<&'a Path>,
    pub extra_files: &'a [GuestFile],
}

/// Writes the initrd for one run: the cached base followed by the per-run archive.
pub fn write_initrd(base: &Path, run: &RunPart<'_>, target: &Path) -> anyhow::Result<()> {
    let mut bytes = fs::read(base).with_context(|| format!("reading {}", base.display()))?;
    let mut w = cpio::Writer::new(Vec::new());
    for file in guest::RUN_FILES {
        w.file(file.path, file.mode, file.text.as_bytes())?;
    }
    w.file("vm/config", 0o644, run.config.as_bytes())?;
    let root = format!("lib/modules/{}", run.release);
    w.file(&format!("{root}/modules.dep"), 0o644, run.modules_dep.as_bytes())?;
    for module in run.user_modules {
        let data = kernel::read_decompressed(&module.file)?;
        w.file(&format!("{root}/{}", user_module_path(module)), 0o644, &data)?;
    }
    if let Some(tracer) = run.tracer {
        let data = fs::read(tracer).with_context(|| format!("reading {}", tracer.display()))?;
        w.file("bin/tracer", 0o755, &data)?;
    }
    if let Some(script) = run.script {
        let data = fs::read(script).with_context(|| format!("reading the script {}", script.display()))?;
        w.file("vm/script", 0o755, &data)?;
    }
    for extra in run.extra_files {
        let data =
            fs::read(&extra.source).with_context(|| format!("reading {} for the guest", extra.source.display()))?;
        w.file(&extra.path, extra.mode, &data)?;
    }
    bytes.extend(w.finish()?);
    fs::write(target, bytes).with_context(|| format!("writing {}", target.display()))
}

/// The initrd of the KVM probe: busybox and an /init that prints the probe's result line.
pub fn write_probe_initrd(target: &Path) -> anyhow::Result<()> {
    let busybox = busybox()?;
    let mut w = cpio::Writer::new(Vec::new());
    w.dir("dev")?;
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.dir("proc")?;
    let data = fs::read(&busybox).with_context(|| format!("reading {}", busybox.display()))?;
    w.file("bin/busybox", 0o755, &data)?;
    for applet in ["sh", "echo", "poweroff", "sleep"] {
        w.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    w.file("init", 0o755, guest::KVM_PROBE_INIT.as_bytes())?;
    fs::write(target, w.finish()?).with_context(|| format!("writing {}", target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_from_setup_is_static() {
        // The same check the harness makes: fails loudly on a machine without busybox-static.
        let path = busybox().unwrap();
        assert!(!has_interpreter(&fs::read(path).unwrap()).unwrap());
    }

    #[test]
    fn dynamic_binaries_are_recognized() {
        let elf = fs::read("/proc/self/exe").unwrap();
        assert!(has_interpreter(&elf).unwrap());
    }

    #[test]
    fn compressed_module_paths_become_plain() {
        assert_eq!(plain_ko("kernel/drivers/cxl/cxl_mem.ko.xz"), "kernel/drivers/cxl/cxl_mem.ko");
        assert_eq!(plain_ko("extra/foo.ko"), "extra/foo.ko");
    }
}
