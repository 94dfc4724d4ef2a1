//! Preflight, discovery (BTF, symbols, call sites) and attachment of the kernel side.
use std::{
    os::fd::AsFd,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{FEntry, FExit, KProbe, RawTracePoint},
};
use rustc_hash::{FxHashMap, FxHashSet};
use tracer::{
    coverage::{Coverage, SiteRun},
    kernel::{
        btf::{DportFunction, KernelBtf},
        callsites::{self, CallSite, CxlText, is_cxl_module},
        derefs,
        kcore::Kcore,
        profile::{FreePath, KFREE, Profile},
    },
    probe::{
        attach::{self, AttachError, Kprobes, ProbePoint},
        plan::{Plan, PlannedSite, probe_groups},
    },
    resolve::SiteName,
    symbolize::Symbols,
};
use tracer_common::{COUNTERS, Counter, MAX_SITES, SiteInfo, SiteRole};

/// The eBPF object built from `tracer-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// Capability bits (include/uapi/linux/capability.h).
const CAP_SYS_RAWIO: u32 = 17;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capabilities of this process, from /proc/self/status.
pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// What is missing for tracing, if anything: root for tracefs, CAP_BPF and CAP_PERFMON (or
/// CAP_SYS_ADMIN) for the programs, CAP_SYS_RAWIO for /proc/kcore.
pub fn privilege_problem() -> Option<String> {
    let caps = effective_caps();
    let has = |cap: u32| caps & (1 << cap) != 0;
    let mut missing = Vec::new();
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (tracefs kprobe_events is root-only)");
    }
    if !(has(CAP_BPF) && has(CAP_PERFMON) || has(CAP_SYS_ADMIN)) {
        missing.push("CAP_BPF and CAP_PERFMON");
    }
    if !has(CAP_SYS_RAWIO) {
        missing.push("CAP_SYS_RAWIO (reading kernel text from /proc/kcore)");
    }
    (!missing.is_empty()).then(|| format!("tracer needs {}: run it as root, e.g. with sudo", missing.join(", ")))
}

/// CXL modules loaded and live now, from /proc/modules (`name size refs deps state
/// address`): (name, "size address"). A module loaded again shows as a change of either
/// (another build usually has another size). One still loading is left out until it is
/// live: its symbols may not be in kallsyms yet.
pub fn cxl_module_layout() -> Vec<(String, String)> {
    std::fs::read_to_string("/proc/modules")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let name = *fields.first()?;
            let live = fields.get(4).is_none_or(|state| *state == "Live");
            let place = format!(
                "{} {}",
                fields.get(1).copied().unwrap_or_default(),
                fields.last().copied().unwrap_or_default()
            );
            (is_cxl_module(name) && live).then(|| (name.to_owned(), place))
        })
        .collect()
}

/// Names of the CXL modules loaded now.
pub fn loaded_cxl_modules() -> Vec<String> {
    cxl_module_layout().into_iter().map(|(name, _)| name).collect()
}

/// How to probe, from the command line.
pub struct ProbeConfig {
    pub extra_uses: Vec<DportFunction>,
    pub ring_bytes: u32,
    pub btf_dir: PathBuf,
    /// Lock events from fexit/fentry on the mutex API instead of CXL call sites.
    pub global_lock_hook: bool,
    /// Probe xa_load itself instead of its call sites in CXL code.
    pub direct_xa_load: bool,
    /// Wait this long for the CXL modules instead of failing without them.
    pub wait_for_cxl: Option<Duration>,
    /// Probe inline dereferences of dports (deref sites).
    pub derefs: bool,
}

/// The CXL driver modules of this kernel (those its modules.dep lists), for the message
/// that says what to load.
pub fn cxl_driver_modules() -> Vec<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dep = std::fs::read_to_string(format!("/lib/modules/{}/modules.dep", release.trim())).unwrap_or_default();
    let mut names: Vec<String> = dep
        .lines()
        .filter_map(|l| l.split(':').next())
        .filter(|path| path.contains("drivers/cxl/"))
        .filter_map(|path| path.rsplit('/').next()?.split('.').next().map(|n| n.replace('-', "_")))
        .filter(|name| ["cxl_acpi", "cxl_pci", "cxl_mem"].contains(&name.as_str()))
        .collect();
    names.sort();
    names
}

/// What is missing for CXL dports to exist and be traced: the driver modules not loaded.
pub fn missing_cxl_modules() -> Vec<String> {
    let loaded = loaded_cxl_modules();
    cxl_driver_modules().into_iter().filter(|m| !loaded.contains(m)).collect()
}

/// Waits until the CXL driver modules are loaded, or fails saying which to load.
fn wait_for_cxl(wait: Option<Duration>) -> anyhow::Result<()> {
    let deadline = wait.map(|w| Instant::now() + w);
    let mut announced = false;
    loop {
        let missing = missing_cxl_modules();
        if missing.is_empty() {
            return Ok(());
        }
        match deadline {
            None => bail!(
                "CXL modules not loaded: {} (modprobe {}, or start with --wait-for-cxl to wait for them)",
                missing.join(" "),
                missing.join(" ")
            ),
            Some(deadline) if Instant::now() >= deadline => {
                bail!("gave up waiting for the CXL modules {} (--wait-for-cxl)", missing.join(" "))
            }
            Some(_) => {
                if !announced {
                    eprintln!("tracer: waiting for the CXL modules {} to be loaded", missing.join(" "));
                    announced = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Everything learnt about this kernel before attaching.
pub struct Discovery {
    pub symbols: Symbols,
    /// What differs on this kernel: member names and offsets, registration, devres host.
    pub profile: Profile,
    pub cxl_modules: Vec<String>,
    /// Whether the built-in CXL core is in vmlinux (its functions are in kallsyms).
    pub cxl_core: bool,
    pub calls: Vec<CallSite>,
    pub plan: Plan,
    pub global_lock_hook: bool,
    pub direct_xa_load: bool,
    /// The plan's sites of the functions the user named (`--use-site`): one that cannot be
    /// probed is an error.
    pub asked_sites: Vec<usize>,
    pub derefs: DerefScan,
    /// The devres core's `kfree` call sites, when frees are seen there.
    pub frees: Vec<CallSite>,
    /// For finding a module's sites again when it is reloaded.
    pub rescan: ModuleRescan,
    pub took: Duration,
}

/// A user-added use site: `FUNCTION:ARG` or `MODULE:FUNCTION:ARG`.
pub fn parse_use_site(spec: &str) -> anyhow::Result<DportFunction> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (module, name, arg) = match parts[..] {
        [name, arg] => (None, name, arg),
        [module, name, arg] => (Some(module.to_owned()), name, arg),
        _ => bail!("--use-site {spec:?}: expected FUNCTION:ARG or MODULE:FUNCTION:ARG (ARG = 0-5, the dport argument)"),
    };
    let arg: u32 = arg
        .parse()
        .ok()
        .filter(|a| *a < 6)
        .with_context(|| format!("--use-site {spec:?}: the argument index must be 0-5 (registers rdi..r9)"))?;
    Ok(DportFunction { name: name.to_owned(), module, arg })
}

/// Learns this kernel: `strict_cxl` fails (or waits, per `config`) when the CXL modules
/// are not loaded; doctor reports it instead.
pub fn discover(config: &ProbeConfig, strict_cxl: bool) -> anyhow::Result<Discovery> {
    let btf_dir = &config.btf_dir;
    if !btf_dir.join("vmlinux").exists() {
        bail!(
            "{}/vmlinux is missing: this kernel has no BTF (CONFIG_DEBUG_INFO_BTF); tracer needs it for offsets and use sites (--btf-dir names another place)",
            btf_dir.display()
        );
    }
    if strict_cxl {
        wait_for_cxl(config.wait_for_cxl)?;
    }
    let start = Instant::now();
    let tracefs = attach::tracefs()?;
    attach::remove_stale_groups(&tracefs);
    let others = attach::other_tracers(&tracefs);
    if !others.is_empty() {
        bail!(
            "another tracer is attached (pid {}): its kprobes patch the call sites this one reads from /proc/kcore; stop it first",
            others.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
        );
    }
    let symbols = Symbols::load().context("reading kernel symbols")?;
    let cxl_modules = loaded_cxl_modules();
    let cxl_core = symbols.lookup("match_port_by_dport").next().is_some()
        || symbols.lookup("__devm_cxl_add_dport").any(|s| s.module.is_none());
    let module_refs: Vec<&str> = cxl_modules.iter().map(String::as_str).collect();
    let btf = KernelBtf::load(btf_dir, &module_refs)?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let profile = Profile::resolve(&btf, &symbols, &release).context("resolving the kernel profile from BTF")?;
    let mut uses = btf.dport_functions().context("listing functions with a struct cxl_dport * argument")?;
    uses.extend(config.extra_uses.iter().cloned());
    let kcore = Kcore::open()?;
    let text = CxlText::read(&symbols, &kcore)?;
    let callees: Vec<_> = callsites::CALLEES.iter().copied().chain(profile.host_check_callee()).collect();
    let mut calls = callsites::find(&symbols, &text, &callees);
    keep_free_action_calls(&mut calls, &text, profile.free_action_addr());
    let mut profile = profile;
    let frees = match profile.free {
        FreePath::DevresKfree => {
            let devres = CxlText::read_functions(&symbols, &kcore, callsites::devres_functions(&symbols))?;
            let frees = callsites::find(&symbols, &devres, &[KFREE]);
            if frees.is_empty() {
                profile.free = FreePath::Tracepoint;
                profile.free_why =
                    "no kfree call found in the devres core (devres_release_all and its neighbours)".into();
            }
            frees
        }
        _ => Vec::new(),
    };
    // xa_load itself when asked, or when CXL code has no call site of it but it is traceable.
    let xa_load_traceable = attach::traceable(&tracefs, "xa_load");
    if config.direct_xa_load && !xa_load_traceable {
        bail!(
            "--xa-load direct: xa_load is notrace on this kernel (lib/ is built without ftrace), so it cannot be probed itself; the default, --xa-load callsites, probes its calls in CXL code"
        );
    }
    let direct_xa_load =
        config.direct_xa_load || xa_load_traceable && !calls.iter().any(|c| c.callee.name == "xa_load" && !c.tail);
    let probed: Vec<CallSite> = calls
        .iter()
        .filter(|c| !(config.global_lock_hook && c.callee.name.starts_with("mutex_")))
        .filter(|c| !(direct_xa_load && c.callee.name == "xa_load"))
        .chain(&frees)
        .cloned()
        .collect();
    let mut plan = Plan::build(&symbols, &probed, &uses);
    // A use site the user named must exist: a silent miss would hide every finding there.
    let mut asked_sites = Vec::new();
    for asked in &config.extra_uses {
        let found =
            plan.uses.iter().find(|u| u.function == asked.name && u.module == asked.module).and_then(|u| u.probed);
        let Some(site) = found else {
            let module = asked.module.as_deref().map_or(String::new(), |m| format!(" in module {m}"));
            bail!(
                "--use-site {}: no function of that name{module} in the kernel's symbols (inlined into its callers, misspelled, or its module is not loaded): uses there could not be seen, so unlocked-use, stale-use and use-after-free at it would go unreported",
                asked.name
            );
        };
        asked_sites.push(site);
    }
    let loaders = btf.dport_loaders().context("listing functions that return a struct cxl_dport")?;
    let derefs = if config.derefs {
        let sites = derefs::find(&symbols, &text, &loaders, &uses, &profile.dport);
        plan.add_derefs(&symbols, &sites);
        let functions: FxHashSet<u64> = sites.iter().map(|s| s.function_addr).collect();
        DerefScan { functions: functions.len(), sites: sites.len() }
    } else {
        DerefScan::default()
    };
    let rescan = ModuleRescan {
        btf_dir: btf_dir.clone(),
        callees: callees
            .iter()
            .copied()
            .filter(|c| !(config.global_lock_hook && c.name.starts_with("mutex_")))
            .filter(|c| !(direct_xa_load && c.name == "xa_load"))
            .collect(),
        vmlinux_uses: uses.iter().filter(|u| u.module.is_none()).cloned().collect(),
        vmlinux_loaders: loaders.iter().filter(|l| l.module.is_none()).cloned().collect(),
        extra_uses: config.extra_uses.clone(),
        layout: profile.dport.clone(),
        derefs: config.derefs,
        free_action: profile.free_action_addr(),
        texts: module_texts(&text),
        btf,
    };
    if direct_xa_load {
        let xa_load = callsites::CALLEES.iter().find(|c| c.name == "xa_load").expect("xa_load is a callee");
        if !plan.add_direct(&symbols, xa_load) {
            bail!("xa_load is not in the kernel's symbols: lookups cannot be probed directly");
        }
    }
    Ok(Discovery {
        symbols,
        profile,
        cxl_modules,
        cxl_core,
        calls,
        plan,
        global_lock_hook: config.global_lock_hook,
        direct_xa_load,
        asked_sites,
        derefs,
        frees,
        rescan,
        took: start.elapsed(),
    })
}

/// What it takes to find a CXL module's sites again after it was loaded again, maybe as
/// another build (a patched `cxl_mem.ko` in place of the distro's): its call sites, use
/// sites and deref sites are where its code now has them.
pub struct ModuleRescan {
    btf: KernelBtf,
    btf_dir: PathBuf,
    callees: Vec<tracer::kernel::callsites::Callee>,
    vmlinux_uses: Vec<DportFunction>,
    vmlinux_loaders: Vec<DportFunction>,
    extra_uses: Vec<DportFunction>,
    layout: tracer::kernel::derefs::Layout,
    derefs: bool,
    /// The devres action that frees a dport (in vmlinux), as discovery filtered its calls.
    free_action: u64,
    /// Each module's code as it was when its sites were found, by function.
    texts: FxHashMap<String, ModuleText>,
}

/// A module's functions and their bytes.
type ModuleText = Vec<(std::sync::Arc<str>, Vec<u8>)>;

fn module_texts(text: &CxlText) -> FxHashMap<String, ModuleText> {
    let mut texts: FxHashMap<String, ModuleText> = FxHashMap::default();
    for (function, code) in &text.functions {
        if let Some(module) = &function.module {
            texts.entry(module.to_string()).or_default().push((function.name.clone(), code.clone()));
        }
    }
    texts
}

impl ModuleRescan {
    fn read_module(symbols: &Symbols, module: &str) -> anyhow::Result<CxlText> {
        let modules = std::fs::read_to_string("/proc/modules").context("reading /proc/modules")?;
        let core = callsites::module_core(&modules, module)
            .with_context(|| format!("{module} is not in /proc/modules with an address (unloaded again?)"))?;
        let functions = callsites::module_functions(symbols, module, &core);
        if functions.is_empty() {
            bail!("no function of {module} in the kernel's symbols (is it still loading?)");
        }
        Ok(CxlText::read_functions(symbols, &Kcore::open()?, functions)?)
    }

    /// Whether `module`'s code was read before (its sites were found in it).
    pub fn knows(&self, module: &str) -> bool {
        self.texts.contains_key(module)
    }

    /// Whether `module`, loaded again, has the code it had when its sites were found, but
    /// for the bytes this tracer's own probes (`plan`'s sites, which the kernel re-armed at
    /// load) patch and what the module loader relocates. Then nothing needs doing.
    pub fn same_code(&self, symbols: &Symbols, module: &str, plan: &Plan) -> anyhow::Result<bool> {
        let Some(old) = self.texts.get(module) else { return Ok(false) };
        let now = ModuleRescan::read_module(symbols, module)?;
        if now.functions.len() != old.len() {
            return Ok(false);
        }
        for ((function, code), (name, before)) in now.functions.iter().zip(old) {
            if function.name != *name {
                return Ok(false);
            }
            let probes: Vec<u64> = plan
                .sites
                .iter()
                .enumerate()
                .filter(|(i, s)| {
                    !plan.retired.contains(i) && s.module.as_deref() == Some(module) && s.function == *name
                })
                .map(|(_, s)| s.offset)
                .collect();
            if !callsites::same_code(before, code, &probes) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The sites of `module` in the running kernel (symbols re-read since it was loaded), its
    /// code read with none of this tracer's probes in it; remembered for `same_code`.
    pub fn module_sites(&mut self, symbols: &Symbols, module: &str) -> anyhow::Result<Vec<PlannedSite>> {
        let (mut uses, mut loaders) = self.btf.module_functions(&self.btf_dir, module)?;
        uses.extend(self.extra_uses.iter().filter(|u| u.module.as_deref() == Some(module)).cloned());
        let text = ModuleRescan::read_module(symbols, module)?;
        self.texts.extend(module_texts(&text));
        let mut calls = callsites::find(symbols, &text, &self.callees);
        keep_free_action_calls(&mut calls, &text, self.free_action);
        let mut plan = Plan::build(symbols, &calls, &uses);
        if self.derefs {
            loaders.extend(self.vmlinux_loaders.iter().cloned());
            let all_uses: Vec<DportFunction> = self.vmlinux_uses.iter().chain(&uses).cloned().collect();
            plan.add_derefs(symbols, &derefs::find(symbols, &text, &loaders, &all_uses, &self.layout));
        }
        plan.sites.retain(|s| s.module.as_deref() == Some(module));
        // One probe per place and role: a site found twice would double its events.
        let mut seen = FxHashSet::default();
        plan.sites.retain(|s| seen.insert((s.addr, s.role as u32, s.arg)));
        Ok(plan.sites)
    }
}

/// `__devm_add_action` is called for every devres action in CXL code; only the calls that
/// add the free action (at `action`; 0 when the kernel has none) say where a dport lives.
/// Keeps those, those whose action argument is not known statically, and the other calls.
fn keep_free_action_calls(calls: &mut Vec<CallSite>, text: &CxlText, action: u64) {
    if action == 0 {
        return;
    }
    let code: FxHashMap<u64, &[u8]> = text.functions.iter().map(|(f, c)| (f.addr, c.as_slice())).collect();
    calls.retain(|c| {
        c.callee.call != SiteRole::HostActionCall
            || code
                .get(&c.function_addr)
                .and_then(|code| callsites::rsi_before_call(c.function_addr, code, c.offset))
                .is_none_or(|rsi| rsi == action)
    });
}

/// Every attach point outside CXL and devres code, with what it costs: a probe there runs
/// on paths the tracer does not care about (empty by default).
pub fn hot_attach_points(d: &Discovery) -> Vec<String> {
    let mut out = Vec::new();
    if d.profile.free == FreePath::Tracepoint {
        out.push("kfree raw tracepoint: every kfree in the system pays a map lookup".to_owned());
    }
    if d.global_lock_hook {
        out.push("fexit/fentry on mutex_lock*/mutex_unlock (--lock-events global): every mutex in the system pays a map lookup".to_owned());
    }
    if d.direct_xa_load {
        out.push("kprobe on xa_load itself: every xarray lookup in the system pays a map lookup".to_owned());
    }
    out
}

/// How many deref sites were found, in how many functions.
#[derive(Copy, Clone, Debug, Default)]
pub struct DerefScan {
    pub functions: usize,
    pub sites: usize,
}

/// The `SITES` slot of the free path's fallback kprobe.
const FREE_FALLBACK_SITE: u32 = MAX_SITES - 1;

/// What `Attached::rediscover_module` did.
#[derive(Debug, Default)]
pub struct Replaced {
    /// The module's code has the same sites as before: they were attached again as they were.
    pub same: bool,
    pub removed: usize,
    pub added: usize,
    /// Sites that could not be attached, with the kernel's reason.
    pub failed: Vec<String>,
}

impl Replaced {
    /// Counts what attaching sites gave.
    fn attached(&mut self, sites: &[PlannedSite], results: Vec<(usize, Result<(), AttachError>)>) {
        for (i, result) in results {
            match result {
                Ok(()) => self.added += 1,
                Err(err) => self.failed.push(format!("{} {}: {err}", sites[i].what, sites[i].point.spec())),
            }
        }
    }
}

/// The kernel side, loaded and attached. Dropping it detaches everything (kprobes first).
pub struct Attached {
    kprobes: Kprobes,
    /// The programs behind the kprobes, for sites attached later.
    programs: SitePrograms,
    pub ebpf: Ebpf,
    /// What could not be attached, and what that disables.
    pub warnings: Vec<String>,
    pub took: Duration,
    /// Of which attaching the deref sites.
    pub deref_took: Duration,
    /// Planned sites on the kprobes attached at start (sites at one instruction share one).
    pub sites_attached: usize,
}

impl Attached {
    pub fn kprobe_count(&self) -> usize {
        self.kprobes.probes()
    }

    pub fn take_ring_buffer(&mut self) -> anyhow::Result<RingBuf<aya::maps::MapData>> {
        let map = self.ebpf.take_map("EVENTS").context("the eBPF object has no EVENTS map")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// A CXL module was loaded again: find its sites where its code has them now. The kernel
    /// re-armed this tracer's probes in the new text, so they are detached before `rescan`
    /// reads it (a probe's int3 would garble the decoding). The same code gets its probes
    /// back at the same site indexes; another build (a patched `cxl_mem.ko`) gets new ones,
    /// and its old ones stay in the plan, retired, so events already sent still name them.
    pub fn rediscover_module(
        &mut self,
        plan: &mut Plan,
        module: &str,
        rescan: impl FnOnce() -> anyhow::Result<Vec<PlannedSite>>,
    ) -> anyhow::Result<Replaced> {
        let key = |s: &PlannedSite| (s.role as u32, s.arg, s.function.clone(), s.offset, s.point.spec());
        let old: Vec<usize> = (0..plan.sites.len())
            .filter(|&i| plan.sites[i].module.as_deref() == Some(module) && !plan.retired.contains(&i))
            .collect();
        for &i in &old {
            self.kprobes.detach(i as u64);
        }
        let found = rescan();
        let mut replaced = Replaced::default();
        let new = match found {
            Ok(new) => new,
            Err(err) => {
                // Put the old probes back: a stale site is better than none.
                for group in probe_groups(&plan.sites, old.iter().copied()) {
                    self.programs.attach(&mut self.kprobes, &plan.sites, &group);
                }
                return Err(err);
            }
        };
        let mut old_keys: Vec<_> = old.iter().map(|&i| key(&plan.sites[i])).collect();
        let mut new_keys: Vec<_> = new.iter().map(key).collect();
        old_keys.sort();
        new_keys.sort();
        if old_keys == new_keys {
            replaced.same = true;
            for group in probe_groups(&plan.sites, old.iter().copied()) {
                replaced.attached(&plan.sites, self.programs.attach(&mut self.kprobes, &plan.sites, &group));
            }
            return Ok(replaced);
        }
        if plan.sites.len() + new.len() >= FREE_FALLBACK_SITE as usize {
            bail!("{module}: {} new sites would pass the kernel side's {FREE_FALLBACK_SITE} site slots", new.len());
        }
        let mut sites: Array<_, SiteInfo> =
            Array::try_from(self.ebpf.map_mut("SITES").context("the eBPF object has no SITES map")?)?;
        for &i in &old {
            // A late hit of a retired site does nothing.
            sites.set(i as u32, SiteInfo::default(), 0)?;
            plan.retired.insert(i);
            replaced.removed += 1;
        }
        let first = plan.sites.len();
        plan.sites.extend(new);
        for i in first..plan.sites.len() {
            sites.set(i as u32, plan.sites[i].info(), 0)?;
        }
        for group in probe_groups(&plan.sites, first..plan.sites.len()) {
            replaced.attached(&plan.sites, self.programs.attach(&mut self.kprobes, &plan.sites, &group));
        }
        Ok(replaced)
    }

    /// How often each load, use and deref site ran and reported a tracked dport, from the
    /// kernel's per-site counters (summed over CPUs). `judged` is left for the engine.
    pub fn coverage(&self, plan: &Plan) -> anyhow::Result<Coverage> {
        let per_cpu = |name: &str| -> anyhow::Result<PerCpuArray<&MapData, u64>> {
            Ok(PerCpuArray::try_from(
                self.ebpf.map(name).with_context(|| format!("the eBPF object has no {name} map"))?,
            )?)
        };
        let (hits, reports) = (per_cpu("SITE_HITS")?, per_cpu("SITE_REPORTS")?);
        let mut sites = Vec::new();
        for (i, site) in plan.sites.iter().enumerate() {
            let Some((kind, mut place)) = site.coverage() else { continue };
            if plan.retired.contains(&i) {
                place =
                    format!("{place} (before {} was reloaded)", site.module.as_deref().unwrap_or("its module")).into();
            }
            let ran = hits.get(&(i as u32), 0)?.iter().sum();
            let reported = reports.get(&(i as u32), 0)?.iter().sum();
            sites.push(SiteRun { kind, place, function: site.function.clone(), ran, reported, judged: 0 });
        }
        Ok(Coverage { sites })
    }

    /// Kernel counters, summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<[u64; COUNTERS]> {
        let map = self.ebpf.map("COUNTS").context("the eBPF object has no COUNTS map")?;
        let counts: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        let mut out = [0u64; COUNTERS];
        for counter in Counter::ALL {
            out[counter as usize] = counts.get(&(counter as u32), 0)?.iter().sum();
        }
        Ok(out)
    }
}

/// The kprobe programs of the sites: `site` for every site, `shared_deref` for a deref site
/// at the instruction of another (`probe_groups`), linked after it on the same kprobe.
struct SitePrograms {
    site: aya::programs::ProgramFd,
    shared_deref: aya::programs::ProgramFd,
}

impl SitePrograms {
    fn load(ebpf: &mut Ebpf) -> anyhow::Result<SitePrograms> {
        let mut load = |name: &str| -> anyhow::Result<aya::programs::ProgramFd> {
            let program: &mut KProbe =
                ebpf.program_mut(name).with_context(|| format!("no {name} program"))?.try_into()?;
            program.load().with_context(|| {
                format!("the kernel refused the {name} kprobe program (see the verifier log above)")
            })?;
            Ok(program.fd()?.try_clone()?)
        };
        Ok(SitePrograms { site: load("site")?, shared_deref: load("shared_deref")? })
    }

    /// Attaches a group of `probe_groups` on one kprobe, its head first; each site's result.
    fn attach(
        &self,
        kprobes: &mut Kprobes,
        sites: &[PlannedSite],
        group: &[usize],
    ) -> Vec<(usize, Result<(), AttachError>)> {
        self.attach_timed(kprobes, sites, group).into_iter().map(|(i, result, _)| (i, result)).collect()
    }

    fn attach_timed(
        &self,
        kprobes: &mut Kprobes,
        sites: &[PlannedSite],
        group: &[usize],
    ) -> Vec<(usize, Result<(), AttachError>, Duration)> {
        group
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let program = if k == 0 { self.site.as_fd() } else { self.shared_deref.as_fd() };
                let started = Instant::now();
                let result = kprobes.attach(program, &sites[i].point, i as u64);
                (i, result, started.elapsed())
            })
            .collect()
    }
}

/// Loads the eBPF object with this kernel's offsets and attaches every planned probe.
pub fn attach(discovery: &Discovery, ring_bytes: u32) -> anyhow::Result<Attached> {
    let start = Instant::now();
    raise_memlock();
    raise_open_files();
    let plan = &discovery.plan;
    // The last slot stays free for the fallback kprobe of the free path.
    if plan.sites.len() >= FREE_FALLBACK_SITE as usize {
        bail!("{} probe sites planned, the kernel side holds at most {FREE_FALLBACK_SITE}", plan.sites.len());
    }
    let mut ebpf = EbpfLoader::new()
        .override_global("OFFSETS", &discovery.profile.offsets, true)
        .override_global("FREE_ACTION", &discovery.profile.free_action_addr(), true)
        .map_max_entries("EVENTS", ring_bytes)
        .load(EBPF_OBJECT)
        .context("loading the eBPF programs (run `tracer doctor` for what this kernel supports)")?;
    {
        let mut sites: Array<_, SiteInfo> =
            Array::try_from(ebpf.map_mut("SITES").context("the eBPF object has no SITES map")?)?;
        for (i, site) in plan.sites.iter().enumerate() {
            sites.set(i as u32, site.info(), 0)?;
        }
    }
    let mut warnings = Vec::new();
    let btf = aya::Btf::from_sys_fs().context("reading /sys/kernel/btf/vmlinux")?;

    let programs = SitePrograms::load(&mut ebpf)?;
    let mut kprobes = Kprobes::new()?;
    let mut attached_roles = Vec::new();
    let mut deref_took = Duration::ZERO;
    for group in probe_groups(&plan.sites, 0..plan.sites.len()) {
        for (i, result, took) in programs.attach_timed(&mut kprobes, &plan.sites, &group) {
            let site = &plan.sites[i];
            if site.role == SiteRole::Deref {
                deref_took += took;
            }
            match result {
                Ok(()) => attached_roles.push(site.role),
                Err(err) if discovery.asked_sites.contains(&i) => bail!(
                    "--use-site {}: not probed ({err}): uses there could not be seen, so unlocked-use, stale-use and use-after-free at it would go unreported",
                    site.function
                ),
                Err(err) => warnings.push(format!(
                    "{} {} in {}: not attached ({err}): {}",
                    site.what,
                    role_word(site),
                    site.function,
                    what_is_lost(site.role)
                )),
            }
        }
    }
    let has = |roles: &[SiteRole]| attached_roles.iter().any(|r| roles.contains(r));
    if !has(&[SiteRole::LoadReturn]) {
        warnings.push(
            "no xa_load call site is probed: lookups are not seen, so unlocked-use, stale-use and use-after-free cannot be judged".into(),
        );
    }
    if !has(&[SiteRole::Use]) {
        warnings.push(
            "no function taking struct cxl_dport * is probed: uses are not seen, so unlocked-use, stale-use and use-after-free cannot be judged (add one with --use-site)".into(),
        );
    }
    if !has(&[SiteRole::EraseReturn, SiteRole::StoreCall]) {
        warnings.push("no xarray writer call site is probed: unlocked-erase cannot be judged".into());
    }

    if discovery.global_lock_hook {
        attach_global_lock_hook(&mut ebpf, &btf).context(
            "--lock-events global: attaching fexit/fentry on the mutex API failed (use the default, callsites)",
        )?;
    }
    match discovery.profile.registration {
        Some(function) => {
            if let Err(err) = attach_dport_registration(&mut ebpf, &btf, function) {
                warnings.push(format!(
                    "{function}: fexit not attached ({err:#}): dports are still discovered at their first lookup, but the devres host cross-check is off"
                ));
            }
        }
        None => warnings.push(
            "no dport registration function to attach to (kernel profile): dports are only discovered at their first lookup, and the devres host cross-check is off".into(),
        ),
    }
    attach_free_path(&mut ebpf, &btf, discovery, &mut kprobes, programs.site.as_fd(), &mut warnings)?;
    let sites_attached = attached_roles.len();
    Ok(Attached { kprobes, programs, ebpf, warnings, took: start.elapsed(), deref_took, sites_attached })
}

/// Attaches where the profile says frees are seen. `free_dport` falls back from fentry to a
/// kprobe; any path that cannot be attached falls back to the kfree raw tracepoint, with a
/// warning (every kfree in the system then pays a map lookup).
fn attach_free_path(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    discovery: &Discovery,
    kprobes: &mut Kprobes,
    kprobe: std::os::fd::BorrowedFd<'_>,
    warnings: &mut Vec<String>,
) -> anyhow::Result<()> {
    let fallback = match &discovery.profile.free {
        FreePath::Action { function } => {
            let program: &mut FEntry =
                ebpf.program_mut("free_dport_entry").context("no free_dport_entry program")?.try_into()?;
            let fentry = program.load(function, btf).map_err(anyhow::Error::from).and_then(|()| Ok(program.attach()?));
            match fentry {
                Ok(_) => None,
                Err(fentry_err) => {
                    // The last SITES slot is the fallback kprobe's (plans stop short of it).
                    let index = FREE_FALLBACK_SITE as usize;
                    let mut sites: Array<_, SiteInfo> =
                        Array::try_from(ebpf.map_mut("SITES").context("the eBPF object has no SITES map")?)?;
                    sites.set(index as u32, SiteInfo { role: SiteRole::FreeEntry as u32, ..SiteInfo::default() }, 0)?;
                    let point = ProbePoint::Symbol { module: None, symbol: function.to_string(), offset: 0 };
                    match kprobes.attach(kprobe, &point, index as u64) {
                        Ok(()) => {
                            warnings.push(format!(
                                "{function}: fentry refused ({fentry_err:#}), frees are seen by a kprobe instead"
                            ));
                            None
                        }
                        Err(kprobe_err) => Some(format!(
                            "{function}: neither fentry ({fentry_err:#}) nor a kprobe ({kprobe_err}) attached"
                        )),
                    }
                }
            }
        }
        FreePath::DevresKfree => {
            let attached = discovery.plan.count(SiteRole::FreeCall);
            (attached == 0).then(|| "no kfree call site of the devres core is probed".to_owned())
        }
        FreePath::Tracepoint => Some(format!("the kernel profile chose it: {}", discovery.profile.free_why)),
    };
    let Some(why) = fallback else { return Ok(()) };
    let tracepoint: &mut RawTracePoint = ebpf.program_mut("kfree").context("no kfree program")?.try_into()?;
    match tracepoint.load().map_err(anyhow::Error::from).and_then(|()| Ok(tracepoint.attach("kfree")?)) {
        Ok(_) if matches!(discovery.profile.free, FreePath::Tracepoint) => {}
        Ok(_) => warnings.push(format!("frees are seen by the kfree raw tracepoint ({why}): every kfree in the system pays a map lookup")),
        Err(err) => warnings.push(format!(
            "no free path attached ({why}; kfree tracepoint: {err:#}): frees are not seen, so use-after-free and rule-mismatch are disabled"
        )),
    }
    Ok(())
}

/// The opt-in global lock hook: (program, kernel function, fentry or fexit).
const GLOBAL_LOCK_HOOK: [(&str, &str, bool); 5] = [
    ("mutex_lock_exit", "mutex_lock", false),
    ("mutex_lock_intr_exit", "mutex_lock_interruptible", false),
    ("mutex_lock_kill_exit", "mutex_lock_killable", false),
    ("mutex_trylock_exit", "mutex_trylock", false),
    ("mutex_unlock_entry", "mutex_unlock", true),
];

fn attach_global_lock_hook(ebpf: &mut Ebpf, btf: &aya::Btf) -> anyhow::Result<()> {
    for (name, function, entry) in GLOBAL_LOCK_HOOK {
        let program = ebpf.program_mut(name).with_context(|| format!("no {name} program"))?;
        if entry {
            let program: &mut FEntry = program.try_into()?;
            program.load(function, btf).with_context(|| format!("loading fentry {function}"))?;
            program.attach().with_context(|| format!("attaching fentry {function}"))?;
        } else {
            let program: &mut FExit = program.try_into()?;
            program.load(function, btf).with_context(|| format!("loading fexit {function}"))?;
            program.attach().with_context(|| format!("attaching fexit {function}"))?;
        }
    }
    Ok(())
}

fn attach_dport_registration(ebpf: &mut Ebpf, btf: &aya::Btf, function: &str) -> anyhow::Result<()> {
    let program: &mut FExit = ebpf.program_mut("dport_add_exit").context("no dport_add_exit program")?.try_into()?;
    program.load(function, btf)?;
    program.attach()?;
    Ok(())
}

/// What a probe that failed to attach costs, in finding classes.
fn what_is_lost(role: SiteRole) -> &'static str {
    use SiteRole::*;
    match role {
        Use => "uses at this site are not seen (unlocked-use, stale-use, use-after-free there)",
        Deref => "inline accesses at this instruction are not seen (unlocked-use, stale-use, use-after-free there)",
        LoadCall | LoadReturn => {
            "lookups here are not seen (unlocked-use, stale-use, use-after-free of dports loaded here)"
        }
        EraseCall | EraseReturn | StoreCall => "writes here are not seen (unlocked-erase)",
        LockCall | LockReturn | LockReturnIfZero | LockReturnIfOne | UnlockCall => {
            "lock events here are not seen (stale-use across an unlock/relock here; held state still comes from mutex->owner)"
        }
        HostAllocCall | HostAllocReturn | HostActionCall => "the devres host cross-check of registrations is off",
        FreeCall | FreeEntry => "frees through this call are not seen (use-after-free, rule-mismatch)",
    }
}

fn role_word(site: &PlannedSite) -> &'static str {
    use tracer_common::SiteRole::*;
    match site.role {
        Use | Deref => "site",
        LoadCall | EraseCall | StoreCall | LockCall | UnlockCall | HostAllocCall | HostActionCall | FreeCall => "call",
        FreeEntry => "entry",
        LoadReturn | EraseReturn | LockReturn | LockReturnIfZero | LockReturnIfOne | HostAllocReturn => "return",
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock() {
    let limit = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
}

/// The open-files limit before `raise_open_files`, for the command the tracer runs.
static ORIGINAL_OPEN_FILES: std::sync::OnceLock<(libc::rlim_t, libc::rlim_t)> = std::sync::OnceLock::new();

/// Gives a child the open-files limit the tracer started with (it needs none of the
/// tracer's raise; some programs walk every descriptor up to the limit).
pub fn restore_open_files_in(cmd: &mut tokio::process::Command) {
    if let Some(&(cur, max)) = ORIGINAL_OPEN_FILES.get() {
        // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit { rlim_cur: cur, rlim_max: max };
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                Ok(())
            });
        }
    }
}

/// Every kprobe holds file descriptors (its perf event and link): a plan of several hundred
/// sites passes the usual soft limit of 1024. Raise it to the most the kernel allows
/// (`fs.nr_open` for root), or at least to the hard limit.
fn raise_open_files() {
    let mut original = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut original) } == 0 {
        let _ = ORIGINAL_OPEN_FILES.set((original.rlim_cur, original.rlim_max));
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(1 << 20);
    let wanted = libc::rlimit { rlim_cur: nr_open, rlim_max: nr_open };
    // SAFETY: valid rlimits.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } != 0 {
        let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: a valid out pointer.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) } == 0 {
            current.rlim_cur = current.rlim_max;
            // SAFETY: a valid rlimit.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &current) };
        }
    }
}

/// What each site index stands for, for the resolver.
pub fn site_names(plan: &Plan) -> Vec<SiteName> {
    plan.sites.iter().map(PlannedSite::name).collect()
}
