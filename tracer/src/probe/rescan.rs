//! A CXL module loaded again while tracing: the same build (the kernel re-armed this tracer's
//! probes in it) or another one (a patched `cxl_mem.ko`), whose call, use and deref sites are
//! found where its code has them now and attached in place of the old ones.
use std::{path::PathBuf, sync::Arc};

use anyhow::{Context as _, bail};
use aya::maps::Array;
use rustc_hash::{FxHashMap, FxHashSet};
use tracer::{
    kernel::{
        btf::{DportFunction, KernelBtf},
        callsites::{self, Callee, CxlText},
        derefs, globals,
        kcore::Kcore,
        modules,
        profile::Profile,
    },
    plan::{Plan, PlannedSite, ProbePoint, probe_groups},
    symbolize::Symbols,
};
use tracer_common::SiteInfo;

use super::{
    kprobe::AttachError,
    programs::{Attached, FREE_FALLBACK_SITE, set_free_action},
};

/// What it takes to find a CXL module's sites again after it was loaded again, maybe as
/// another build: its call sites, use sites and deref sites are where its code now has them.
pub struct ModuleRescan {
    pub(crate) btf: KernelBtf,
    pub(crate) btf_dir: PathBuf,
    /// The callees probed at their call sites.
    pub(crate) callees: Vec<Callee>,
    pub(crate) vmlinux_uses: Vec<DportFunction>,
    pub(crate) vmlinux_loaders: Vec<DportFunction>,
    /// `--use-site` functions.
    pub(crate) extra_uses: Vec<DportFunction>,
    pub(crate) derefs: bool,
    pub(crate) profile: Profile,
    /// Each module's code as it was when its sites were found, by function.
    pub(crate) texts: FxHashMap<String, ModuleText>,
}

/// A module's functions and their bytes.
pub(crate) type ModuleText = Vec<(Arc<str>, Vec<u8>)>;

/// The code of each module in `text`, by module.
pub(crate) fn module_texts(text: &CxlText) -> FxHashMap<String, ModuleText> {
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
        let core = modules::core(module)
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
        self.profile.keep_host_check_calls(&mut calls, &text);
        // A module's global locks moved with it: named from kallsyms as it is now.
        let _ = globals::name_locks_now(&mut calls, &self.btf);
        self.profile.classify_xarrays(&mut calls);
        let not_dports = callsites::other_xarray_calls(&calls);
        let mut plan = Plan::build(symbols, &calls, &uses);
        plan.add_profile_sites(symbols, &self.profile);
        if self.derefs {
            loaders.extend(self.vmlinux_loaders.iter().cloned());
            let all_uses: Vec<DportFunction> = self.vmlinux_uses.iter().chain(&uses).cloned().collect();
            let lookups = callsites::lookups();
            let sources =
                derefs::Sources { loaders: &loaders, uses: &all_uses, lookups: &lookups, not_dports: &not_dports };
            plan.add_derefs(symbols, &derefs::find_classified(symbols, &text, &sources, &self.profile.dport));
        }
        plan.sites.retain(|s| s.module.as_deref() == Some(module));
        // One probe per place and role: a site found twice would double its events.
        let mut seen = FxHashSet::default();
        plan.sites.retain(|s| seen.insert((s.addr, s.role as u32, s.arg)));
        Ok(plan.sites)
    }
}

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

impl Attached {
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
        // A site by address is the same site at another address after a reload: its
        // function and offset say which.
        let key = |s: &PlannedSite| {
            let spec = match s.point {
                ProbePoint::Address(_) => String::new(),
                _ => s.point.spec(),
            };
            (s.role as u32, s.arg, s.function.clone(), s.offset, spec)
        };
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
            // Addresses move with the module's text.
            let moved: FxHashMap<_, _> = new.iter().map(|s| (key(s), (s.point.clone(), s.addr))).collect();
            for &i in &old {
                if let Some((point, addr)) = moved.get(&key(&plan.sites[i])) {
                    plan.sites[i].point = point.clone();
                    plan.sites[i].addr = *addr;
                }
            }
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
}

/// Ticks a module loaded again may stay unreadable before its sites are searched anyway.
pub const UNSETTLED_TRIES: u32 = 20;

/// What `rescan_module` made of a module loaded (again).
#[derive(Debug, PartialEq, Eq)]
pub enum Rescanned {
    /// Its code could not be read yet, or read as other code at the first try: look again
    /// at the next tick.
    NotYet,
    /// Done, and the plan's sites are as they were.
    Kept,
    /// Done, and the plan has new sites: the resolver must learn their names.
    NewSites,
}

/// Finds `module`'s sites again after it was loaded (again) and attaches them where its
/// code has them now; says what it did. Not yet when its code could not be read (unloaded
/// again, or still loading) before `UNSETTLED_TRIES`, or when a module traced before reads
/// as other code at the first try (one read while a hotplug loop unloads it again can
/// look so): then nothing is touched, and the next tick looks again. The probes the
/// kernel re-arms at each load stay; detaching and defining them again while a hotplug
/// loop reloads the module loses sites and, on 6.12, makes `register_kprobe()` warn at
/// the next load (a kprobe unregistered just before its module went away is left
/// half-freed, and `reuse_unused_kprobe()` finds it).
pub fn rescan_module(
    attached: &mut Attached,
    plan: &mut Plan,
    rescan: &mut ModuleRescan,
    symbols: &Symbols,
    module: &str,
    tries: u32,
) -> Rescanned {
    // The common case: the same build again, whose probes the kernel re-armed at load.
    let outcome = match rescan.same_code(symbols, module, plan) {
        // Probes by address (a function whose name the module has twice) are not re-armed:
        // their address went with the old text. The sites are found and attached again.
        Ok(true) if has_address_sites(plan, module) => replace_sites(attached, plan, rescan, symbols, module),
        Ok(true) => {
            eprintln!("tracer: {module} loaded again: same code, its probes re-armed by the kernel");
            Rescanned::Kept
        }
        Ok(false) if tries == 0 && rescan.knows(module) => return Rescanned::NotYet,
        Err(_) if tries + 1 < UNSETTLED_TRIES => return Rescanned::NotYet,
        other => {
            if let Err(err) = other {
                eprintln!("tracer: warning: {module}: reading its code again: {err:#}");
            }
            replace_sites(attached, plan, rescan, symbols, module)
        }
    };
    // The CXL core's module loaded elsewhere moves the free action with it.
    if let Some(addr) = rescan.profile.free_action_moved(symbols)
        && let Err(err) = set_free_action(&mut attached.ebpf, addr)
    {
        eprintln!(
            "tracer: warning: {module}: the free action moved and the kernel side was not told ({err:#}): the devres host cross-check misses its registrations"
        );
    }
    outcome
}

fn has_address_sites(plan: &Plan, module: &str) -> bool {
    plan.sites.iter().enumerate().any(|(i, s)| {
        !plan.retired.contains(&i) && s.module.as_deref() == Some(module) && matches!(s.point, ProbePoint::Address(_))
    })
}

fn replace_sites(
    attached: &mut Attached,
    plan: &mut Plan,
    rescan: &mut ModuleRescan,
    symbols: &Symbols,
    module: &str,
) -> Rescanned {
    match attached.rediscover_module(plan, module, || rescan.module_sites(symbols, module)) {
        Ok(r) if r.same => {
            eprintln!("tracer: {module} loaded again: same code, its {} sites attached again", r.added);
            for failure in r.failed {
                eprintln!("tracer: warning: {module}: not attached again: {failure}");
            }
            Rescanned::Kept
        }
        Ok(r) => {
            eprintln!(
                "tracer: {module} loaded with other code (another build, or loaded after the tracer started): {} old sites detached, {} new sites attached",
                r.removed, r.added
            );
            if r.removed > 0 {
                // The kernel re-armed the old probes at module load, before this tick: what
                // the module did in between (its probe runs during insmod) was seen through
                // probes that do not fit its code.
                eprintln!(
                    "tracer: warning: {module}: events between its load and now were seen with its previous build's probes, so findings there may be wrong; load your build before starting the tracer (or start it with --wait-for-cxl)"
                );
            }
            for failure in r.failed {
                eprintln!("tracer: warning: {module}: not attached: {failure}");
            }
            Rescanned::NewSites
        }
        Err(err) => {
            eprintln!(
                "tracer: warning: {module} was loaded again but its sites could not be found again ({err:#}): its previous probes were put back and may no longer fit its code"
            );
            Rescanned::Kept
        }
    }
}
