//! Before a boot: the options checked, the kernel resolved, the modules the guest loads
//! chosen, the tracer built and checked, and the run's initramfs written. Everything that
//! can fail without a guest fails here, before QEMU starts.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};

use super::{
    RunOptions, Workload, basics,
    guest::{self, GuestConfig},
    initramfs::{self, GuestFile},
    kernel::{self, Kernel, ModuleIndex, UserModule},
    kernel_arg, tracer,
    userland::{self, Userland},
    workload,
};
use crate::setup;

/// The packages a guest run needs on the host.
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod", "xz-utils", "zstd"];

/// How long a workload waits for the topology to come back (`SETTLE_SECS` in the guest).
const SETTLE_SECS: u32 = 30;

/// What a boot needs, made ready.
pub struct Prepared {
    pub kernel: Kernel,
    /// The workloads to run, in order (`memdev-bind` when neither they nor a script are given).
    pub workloads: Vec<Workload>,
    /// The checked static tracer, unless `--no-tracer`.
    pub tracer: Option<PathBuf>,
    /// The Debian userland the guest mounts read-only (`--userland debian`, `cxl-cli`).
    pub debian_root: Option<PathBuf>,
    /// In the result line, so that no earlier run's output passes for this one's.
    pub nonce: String,
    pub initrd: PathBuf,
    /// The host directory the guest mounts at /share.
    pub share: PathBuf,
    /// Where the CXL devices' backing files go.
    pub cxl_dir: PathBuf,
    /// Holds the three above; removed when the run is over.
    tmp: TempDir,
}

impl Prepared {
    /// The run's temporary directory (removed with it), for other per-run files.
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp.0
    }
}

pub fn prepare(options: &RunOptions) -> anyhow::Result<Prepared> {
    let workloads = check(options)?;
    setup::ensure_packages(VM_PACKAGES)?;

    let source = kernel_arg::source_with_patches(
        options.kernel.as_ref(),
        options.kernel_deb.as_deref(),
        options.modules_dir.as_deref(),
        &options.kernel_patches,
    )?;
    let emulated = options.topology.emulated();
    let kernel = if emulated { Kernel::resolve(&source)? } else { Kernel::resolve_cxl_test(&source)? };
    let index = kernel.module_index()?;
    let user_modules: Vec<UserModule> =
        options.modules.iter().map(|m| UserModule::inspect(m)).collect::<anyhow::Result<_>>()?;
    for (workload, module) in
        [(Workload::CxlMemReload, "cxl_mem"), (Workload::ReloadMix, "cxl_mem"), (Workload::CxlPciReload, "cxl_pci")]
    {
        if workloads.contains(&workload) && !index.modules.contains_key(module) {
            bail!(
                "workload {} needs {module} built as a module, but kernel {} has it built in",
                workload.name(),
                kernel.release
            );
        }
    }

    // The modules the base archive holds: what /init needs for the share, the CXL drivers,
    // and whatever the user's modules need.
    let basic_modules = basics::modules(&index, &kernel.release)?;
    let cxl_modules = if emulated { initramfs::CXL_MODULES } else { initramfs::CXL_TEST_MODULES };
    let wanted = basic_modules
        .iter()
        .map(String::as_str)
        .chain(cxl_modules.iter().copied())
        .chain(user_modules.iter().flat_map(|u| u.depends.iter().map(String::as_str)));
    let modules = index.closure(wanted)?;
    // cxl_test's topology has its nvdimm bridge and pmem windows: its cxl_pmem always loads
    // (its mailbox is a function call, not the emulated one that makes QEMU's probes slow).
    let pmem = options.pmem || !emulated;
    let load = load_order(cxl_modules, pmem, &index, &modules, &user_modules, &kernel.release);

    let tracer = if options.no_tracer { None } else { Some(tracer::given_or_built(options.tracer_binary.as_deref())?) };

    let nonce = nonce();
    let tmp = TempDir::new(&nonce)?;
    let share = tmp.0.join("share");
    let cxl_dir = tmp.0.join("cxl");
    fs::create_dir_all(&share)?;
    fs::create_dir_all(&cxl_dir)?;

    let debian = options.userland == Userland::Debian || workloads.iter().any(|w| w.needs_debian());
    let debian_root = if debian { Some(userland::ensure()?) } else { None };
    let (script_file, user_command) = user_command(&options.script, options.userland)?;
    let mut extra_files = options.extra_files.clone();
    if let Some(known) = &options.known {
        check_known(tracer.as_deref(), known)?;
        extra_files.push(GuestFile {
            path: KNOWN_IN_GUEST.trim_start_matches('/').to_owned(),
            source: known.clone(),
            mode: 0o644,
        });
    }
    let config = GuestConfig {
        nonce: &nonce,
        topology: options.topology.name(),
        expect_memdevs: options.topology.memdevs(),
        tracer: tracer.is_some(),
        manual_tracer: options.manual_tracer,
        load_cxl: !options.no_cxl_at_boot,
        basic_modules: &basic_modules,
        count_calls: &options.count_calls,
        workloads: &workloads,
        cycles: options.cycles,
        user_command,
        load_modules: &load,
        settle_secs: SETTLE_SECS,
        known: options.known.as_ref().map(|_| KNOWN_IN_GUEST),
        region_commit: kernel_config(&kernel).is_some_and(|c| c.lines().any(|l| l == REGION_COMMIT_OPTION)),
        debian,
        userland: options.userland.name(),
    };
    let base = initramfs::base(&kernel, &index, &modules)?;
    let initrd = tmp.0.join("initrd.cpio");
    initramfs::write_initrd(
        &base,
        &initramfs::RunPart {
            release: &kernel.release,
            config: config.render(),
            modules_dep: initramfs::guest_modules_dep(&index, &modules, &user_modules)?,
            user_modules: &user_modules,
            tracer: tracer.as_deref(),
            script: script_file.as_deref(),
            extra_files: &extra_files,
        },
        &initrd,
    )?;
    Ok(Prepared { kernel, workloads, tracer, debian_root, nonce, initrd, share, cxl_dir, tmp })
}

/// Checks the options that go together, and returns the workloads to run.
fn check(options: &RunOptions) -> anyhow::Result<Vec<Workload>> {
    let mut workloads = options.workloads.clone();
    if workloads.is_empty() && options.script.is_empty() {
        workloads.push(Workload::MemdevBind);
    }
    workload::check(&workloads, options.topology)?;
    if options.script.is_empty() && (options.manual_tracer || options.no_cxl_at_boot) {
        bail!(
            "--manual-tracer and --no-cxl-at-boot need a script (-- SCRIPT ARGS) to run the tracer or load the modules"
        );
    }
    if options.no_cxl_at_boot && !workloads.is_empty() {
        bail!(
            "--no-cxl-at-boot cannot run --workload before the script: run it from the script \
             with `/vm/run-workload NAME CYCLES` after loading the modules"
        );
    }
    if options.manual_tracer && options.no_tracer {
        bail!("--manual-tracer puts the tracer in the guest: it cannot go with --no-tracer");
    }
    for spec in &options.count_calls {
        check_count_spec(spec)?;
    }
    if options.cycles == 0 {
        bail!("--cycles must be at least 1");
    }
    Ok(workloads)
}

/// The modules the guest loads at boot, in order: the CXL drivers the initramfs holds
/// (cxl_pmem only with `--pmem`), then the user's modules that replace none of them.
fn load_order(
    cxl_modules: &[&str],
    pmem: bool,
    index: &ModuleIndex,
    modules: &[String],
    user_modules: &[UserModule],
    release: &str,
) -> Vec<String> {
    let mut load: Vec<String> = cxl_modules
        .iter()
        .filter(|m| modules.iter().any(|x| x == *m))
        .filter(|m| pmem || **m != initramfs::PMEM_MODULE)
        .map(|m| (*m).to_owned())
        .collect();
    for u in user_modules {
        if !load.contains(&u.name) {
            load.push(u.name.clone());
        }
    }
    if !pmem {
        // Kernels where another CXL driver links against cxl_pmem (7.2's cxl_acpi imports
        // devm_cxl_add_nvdimm_bridge) load it whatever --pmem says: say so, as it makes
        // every cycle slower.
        let needers: Vec<&str> = load
            .iter()
            .filter(|m| index.modules.get(*m).is_some_and(|m| m.deps.iter().any(|d| d == initramfs::PMEM_MODULE)))
            .map(String::as_str)
            .collect();
        if !needers.is_empty() {
            println!(
                "vm: {} is loaded without --pmem: {} needs it on {release} (modules.dep)",
                initramfs::PMEM_MODULE,
                needers.join(", "),
            );
        }
    }
    load
}

/// What lets a kernel commit a region in a VM: without it, a commit WARNs and fails (the
/// commit checks for a way to invalidate CPU caches that a VM does not offer).
const REGION_COMMIT_OPTION: &str = "CONFIG_CXL_REGION_INVALIDATION_TEST=y";

/// The kernel's build configuration, where its tree has one: `config` in its modules
/// directory (merged-/usr packages, a tree `make modules_install` wrote with the config
/// copied), `boot/config-RELEASE` above it (Debian 12's packages), or `config` above it (a
/// `--kernel 7.2-src` build keeps it beside `lib/` and `cxl-test-modules/`).
fn kernel_config(kernel: &Kernel) -> Option<String> {
    let boot = format!("boot/config-{}", kernel.release);
    let above = || kernel.modules.ancestors().skip(1).take(4);
    let candidates = [kernel.modules.join("config")]
        .into_iter()
        .chain(above().map(|dir| dir.join(&boot)))
        .chain(above().map(|dir| dir.join("config")));
    candidates.into_iter().find_map(|path| fs::read_to_string(path).ok())
}

/// Where `--known`'s file goes in the guest.
const KNOWN_IN_GUEST: &str = "/vm/known";

/// A known-findings file the guest's tracer would refuse fails the run before it boots: the
/// host runs the same tracer on it (an empty input to analyze, the file to check).
fn check_known(tracer: Option<&Path>, known: &Path) -> anyhow::Result<()> {
    let tracer = tracer.context("--known is for the tracer in the guest: it cannot go with --no-tracer")?;
    let empty = std::env::temp_dir().join(format!("tracer-vm-known-check-{}.jsonl", std::process::id()));
    fs::write(&empty, "").with_context(|| format!("writing {}", empty.display()))?;
    let out = Command::new(tracer).args(["analyze", "--known"]).arg(known).arg(&empty).output();
    let _ = fs::remove_file(&empty);
    let out = out.with_context(|| format!("cannot run {}", tracer.display()))?;
    if out.status.code() == Some(2) {
        bail!("--known {}: {}", known.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The user's script as the guest runs it: a host file is copied to /vm/script, anything
/// else is a guest command; in the Debian userland, through its wrapper `/vm/debian`.
/// Returns the file to copy and the shell-quoted command line.
fn user_command(script: &[String], userland: Userland) -> anyhow::Result<(Option<PathBuf>, String)> {
    let Some((first, args)) = script.split_first() else {
        return Ok((None, String::new()));
    };
    let host = Path::new(first);
    let (file, command) = if host.is_file() {
        let file = fs::canonicalize(host).with_context(|| format!("reading {first}"))?;
        if userland == Userland::Busybox && wants_bash(&file) {
            bail!(
                "{first} is a bash script, and the guest's busybox has no bash: run it in the Debian userland \
                 with --userland debian (bash, jq, kmod and ndctl's tools; docs/vm.md)"
            );
        }
        (Some(file), "/vm/script".to_owned())
    } else {
        (None, first.clone())
    };
    let wrapper = (userland == Userland::Debian).then_some("/vm/debian");
    let words: Vec<String> = wrapper
        .into_iter()
        .chain(std::iter::once(command.as_str()))
        .chain(args.iter().map(String::as_str))
        .map(guest::shell_quote)
        .collect();
    Ok((file, words.join(" ")))
}

/// Whether a script's `#!` line asks for bash.
fn wants_bash(script: &Path) -> bool {
    let text = fs::read(script).unwrap_or_default();
    let first = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    first.starts_with("#!") && first.split(['/', ' ']).any(|w| w.trim() == "bash")
}

/// `--count-calls` takes `FUNCTION` or `MODULE:FUNCTION`, both C identifiers (the function
/// name also names the kretprobe event).
fn check_count_spec(spec: &str) -> anyhow::Result<()> {
    let ident = |s: &str| {
        !s.is_empty()
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    let ok = match spec.split_once(':') {
        Some((module, function)) => ident(module) && ident(function),
        None => ident(spec),
    };
    if !ok {
        bail!("--count-calls {spec:?}: expected FUNCTION or MODULE:FUNCTION (C identifiers)");
    }
    Ok(())
}

fn nonce() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    format!("{:08x}{:06x}", kernel::fnv1a(&nanos.to_le_bytes()) as u32, std::process::id() & 0xff_ffff)
}

/// A directory removed when dropped (per-run QEMU files: the share, CXL backing files).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("tracer-vm-{tag}"));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_specs_are_identifiers() {
        for ok in ["cxl_mem:cxl_mem_probe", "devm_cxl_add_port", "_x1"] {
            check_count_spec(ok).unwrap();
        }
        for bad in ["", "a:b:c", "1abc", "f+0x10", "m:", ":f", "f;rm"] {
            assert!(check_count_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn guest_commands_are_quoted() {
        let (file, cmd) =
            user_command(&["sh".to_owned(), "-c".to_owned(), "echo 'c' > /x".to_owned()], Userland::Busybox).unwrap();
        assert!(file.is_none());
        assert_eq!(cmd, r#"'sh' '-c' 'echo '\''c'\'' > /x'"#);
        let (_, cmd) = user_command(&["jq".to_owned(), ".".to_owned()], Userland::Debian).unwrap();
        assert_eq!(cmd, "'/vm/debian' 'jq' '.'");
    }
}
