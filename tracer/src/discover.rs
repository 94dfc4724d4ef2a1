//! Discovery: what to probe on this kernel. The kernel profile applied to the running
//! kernel's symbols, BTF and code: the call sites in CXL code, the use sites BTF lists, the
//! inline dereferences, the free path, all resolved into one probe plan.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use rustc_hash::FxHashSet;
use tracer::{
    kernel::{
        btf::{DportFunction, KernelBtf},
        callsites::{self, CallSite, CxlText, XaTarget},
        derefs, globals,
        kcore::Kcore,
        modules,
        profile::{CXL_CODE, CxlCore, Facts, FreePath, KFREE, Profile},
    },
    plan::Plan,
    symbolize::Symbols,
};

use crate::{
    preflight,
    probe::{
        kprobe,
        rescan::{ModuleRescan, module_texts},
    },
};

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
    /// Turn on the kernel side's diagnostics (`-v`), shown through aya-log.
    pub diagnostics: bool,
}

/// Everything learnt about this kernel before attaching.
pub struct Discovery {
    pub symbols: Symbols,
    /// What differs on this kernel: member names and offsets, where the core is,
    /// registration, devres host, frees.
    pub profile: Profile,
    pub cxl_modules: Vec<String>,
    pub calls: Vec<CallSite>,
    pub plan: Plan,
    pub global_lock_hook: bool,
    pub direct_xa_load: bool,
    /// The plan's sites of the functions the user named (`--use-site`): one that cannot be
    /// probed is an error.
    pub asked_sites: Vec<usize>,
    pub derefs: DerefScan,
    /// For finding a module's sites again when it is reloaded.
    pub rescan: ModuleRescan,
    pub took: Duration,
}

/// How many deref sites were found, in how many functions.
#[derive(Copy, Clone, Debug, Default)]
pub struct DerefScan {
    pub functions: usize,
    pub sites: usize,
    /// Of the sites, those a dport lookup reaches (the others only follow lookups of other
    /// xarrays).
    pub dport_sites: usize,
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

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default()
}

/// Learns this kernel: `strict_cxl` fails (or waits, per `config`) when the CXL modules
/// are not loaded; doctor reports it instead.
pub fn discover(config: &ProbeConfig, strict_cxl: bool) -> anyhow::Result<Discovery> {
    preflight::check_btf(&config.btf_dir)?;
    if strict_cxl {
        modules::wait_for_cxl(config.wait_for_cxl)?;
    }
    let start = Instant::now();
    let tracefs = preflight::tracefs_ready()?;
    let symbols = Symbols::load().context("reading kernel symbols")?;
    let cxl_modules = modules::loaded_cxl();
    let module_refs: Vec<&str> = cxl_modules.iter().map(String::as_str).collect();
    let btf = KernelBtf::load(&config.btf_dir, &module_refs)?;
    let kcore = Kcore::open()?;
    let release = kernel_release();
    let facts = Facts {
        btf: &btf,
        symbols: &symbols,
        release: &release,
        xa_load_traceable: kprobe::traceable(&tracefs, Profile::lookup_callee().name),
    };
    let profile = Profile::resolve(&facts, || {
        let devres = CxlText::read_functions(&symbols, &kcore, callsites::devres_functions(&symbols))?;
        Ok(callsites::find(&symbols, &devres, &[KFREE]))
    })
    .context("resolving the kernel profile from BTF and symbols")?;
    let mut uses = btf.dport_functions().context("listing functions with a struct cxl_dport * argument")?;
    uses.extend(config.extra_uses.iter().cloned());
    let text = CxlText::read(&symbols, &kcore, &CXL_CODE)?;
    // The call sites of every callee, xa_load's included, decide whether it is probed there.
    let mut calls = callsites::find(&symbols, &text, &profile.callees(false, false));
    profile.keep_host_check_calls(&mut calls, &text);
    if let Err(err) = globals::name_locks_now(&mut calls, &btf) {
        eprintln!("tracer: warning: global locks are not named in reports: reading /proc/kallsyms: {err}");
    }
    profile.classify_xarrays(&mut calls);
    let direct_xa_load = profile.probe_xa_load_directly(config.direct_xa_load, &calls)?;
    let callees = profile.callees(config.global_lock_hook, direct_xa_load);
    let probed: Vec<CallSite> = calls.iter().filter(|c| callees.contains(&c.callee)).cloned().collect();
    let mut plan = Plan::build(&symbols, &probed, &uses);
    plan.add_profile_sites(&symbols, &profile);
    let asked_sites = asked_sites(&plan, &config.extra_uses)?;
    let loaders = btf.dport_loaders().context("listing functions that return a struct cxl_dport")?;
    let derefs = if config.derefs {
        let not_dports = callsites::other_xarray_calls(&calls);
        let sources =
            derefs::Sources { loaders: &loaders, uses: &uses, lookups: &callsites::lookups(), not_dports: &not_dports };
        let sites = derefs::find_classified(&symbols, &text, &sources, &profile.dport);
        plan.add_derefs(&symbols, &sites);
        let functions: FxHashSet<u64> = sites.iter().map(|(s, _)| s.function_addr).collect();
        let dport_sites = sites.iter().filter(|(_, target)| *target == XaTarget::Dports).count();
        DerefScan { functions: functions.len(), sites: sites.len(), dport_sites }
    } else {
        DerefScan::default()
    };
    if direct_xa_load && !plan.add_direct(&symbols, Profile::lookup_callee()) {
        bail!("xa_load is not in the kernel's symbols: lookups cannot be probed directly");
    }
    let rescan = ModuleRescan {
        btf,
        btf_dir: config.btf_dir.clone(),
        callees,
        vmlinux_uses: uses.iter().filter(|u| u.module.is_none()).cloned().collect(),
        vmlinux_loaders: loaders.iter().filter(|l| l.module.is_none()).cloned().collect(),
        extra_uses: config.extra_uses.clone(),
        derefs: config.derefs,
        profile: profile.clone(),
        texts: module_texts(&text),
    };
    Ok(Discovery {
        symbols,
        profile,
        cxl_modules,
        calls,
        plan,
        global_lock_hook: config.global_lock_hook,
        direct_xa_load,
        asked_sites,
        derefs,
        rescan,
        took: start.elapsed(),
    })
}

/// The plan's sites of the use sites the user named. One that does not exist is an error:
/// a silent miss would hide every finding there.
fn asked_sites(plan: &Plan, asked: &[DportFunction]) -> anyhow::Result<Vec<usize>> {
    let mut sites = Vec::new();
    for asked in asked {
        let found =
            plan.uses.iter().find(|u| u.function == asked.name && u.module == asked.module).and_then(|u| u.probed);
        let Some(site) = found else {
            let module = asked.module.as_deref().map_or(String::new(), |m| format!(" in module {m}"));
            bail!(
                "--use-site {}: no function of that name{module} in the kernel's symbols (inlined into its callers, misspelled, or its module is not loaded): uses there could not be seen, so unlocked-use, stale-use and use-after-free at it would go unreported",
                asked.name
            );
        };
        sites.push(site);
    }
    Ok(sites)
}

/// Every attach point outside CXL and devres code, with what it costs: a probe there runs
/// on paths the tracer does not care about (empty by default).
pub fn hot_attach_points(d: &Discovery) -> Vec<String> {
    let mut out = Vec::new();
    if d.profile.free == FreePath::Tracepoint {
        out.push("kfree raw tracepoint: every kfree in the system pays a map lookup".to_owned());
    }
    if d.global_lock_hook {
        out.push(
            "fexit/fentry on mutex_lock*/mutex_unlock (--lock-events global): every mutex in the system pays a map lookup"
                .to_owned(),
        );
    }
    if d.direct_xa_load {
        out.push("kprobe on xa_load itself: every xarray lookup in the system pays a map lookup".to_owned());
    }
    out
}

/// Whether this kernel has any CXL code to trace: a core (built in or its module) or a
/// loaded CXL module.
pub fn has_cxl_code(d: &Discovery) -> bool {
    d.profile.core != CxlCore::Missing || !d.cxl_modules.is_empty()
}
