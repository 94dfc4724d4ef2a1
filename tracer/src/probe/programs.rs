//! The eBPF object loaded with this kernel's offsets, and every program attached where the
//! plan says: the site kprobes, the registration fexit, the free path, the opt-in global
//! lock hook. Dropping `Attached` detaches everything.
use std::{
    os::fd::AsFd,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{FEntry, FExit, KProbe, RawTracePoint},
};
use tracer::{
    coverage::{Coverage, SiteRun},
    kernel::profile::{self, FreePath, Registration},
    plan::{Plan, PlannedSite, ProbePoint, probe_groups},
    resolve::SiteName,
};
use tracer_common::{COUNTERS, Counter, MAX_SITES, SiteInfo, SiteProgram, SiteRole};

use super::kprobe::{AttachError, Kprobes};
use crate::{discover::Discovery, preflight};

/// The eBPF object built from `tracer-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// The `SITES` slot of the free path's fallback kprobe.
pub(super) const FREE_FALLBACK_SITE: u32 = MAX_SITES - 1;

/// The kernel side, loaded and attached. Dropping it detaches everything (kprobes first).
pub struct Attached {
    pub(super) kprobes: Kprobes,
    /// The programs behind the kprobes, for sites attached later.
    pub(super) programs: SitePrograms,
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
            sites.push(SiteRun {
                kind,
                place,
                function: site.function.clone(),
                ran,
                reported,
                judged: 0,
                xarray: site.xarray,
                file: Some(Arc::from(profile::source_file(site.module.as_deref()))),
            });
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

/// The kprobe programs of the sites: the one of each role's `SiteProgram`, and
/// `shared_deref` for a deref site at the instruction of another (`probe_groups`), linked
/// after it on the same kprobe.
pub(super) struct SitePrograms {
    /// In `SiteProgram::ALL` order.
    programs: Vec<aya::programs::ProgramFd>,
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
        let programs = SiteProgram::ALL.iter().map(|p| load(p.name())).collect::<anyhow::Result<_>>()?;
        Ok(SitePrograms { programs, shared_deref: load("shared_deref")? })
    }

    /// The program of sites of `role`.
    pub(super) fn of(&self, role: SiteRole) -> std::os::fd::BorrowedFd<'_> {
        let index = SiteProgram::ALL.iter().position(|p| *p == role.program()).expect("every program is in ALL");
        self.programs[index].as_fd()
    }

    /// Attaches a group of `probe_groups` on one kprobe, its head first; each site's result.
    pub(super) fn attach(
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
                let program = if k == 0 { self.of(sites[i].role) } else { self.shared_deref.as_fd() };
                let started = Instant::now();
                let result = kprobes.attach(program, &sites[i].point, i as u64);
                (i, result, started.elapsed())
            })
            .collect()
    }
}

/// aya-log's level global in the eBPF object: the kernel side logs nothing at 0.
const LOG_LEVEL: &str = "AYA_LOG_LEVEL";

/// Loads the eBPF object with this kernel's offsets and attaches every planned probe. With
/// `diagnostics`, the kernel side logs its failures (`KernelLog` shows them).
pub fn load(discovery: &Discovery, ring_bytes: u32, diagnostics: bool) -> anyhow::Result<Attached> {
    let start = Instant::now();
    preflight::raise_memlock();
    preflight::raise_open_files();
    let plan = &discovery.plan;
    // The last slot stays free for the fallback kprobe of the free path.
    if plan.sites.len() >= FREE_FALLBACK_SITE as usize {
        bail!("{} probe sites planned, the kernel side holds at most {FREE_FALLBACK_SITE}", plan.sites.len());
    }
    let log_level = if diagnostics { aya_log::Level::Warn as u8 } else { 0 };
    let mut ebpf = EbpfLoader::new()
        .override_global("OFFSETS", &discovery.profile.offsets, true)
        .override_global(LOG_LEVEL, &log_level, true)
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
    set_free_action(&mut ebpf, discovery.profile.free_action_addr())?;
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
    match &discovery.profile.registration {
        Some(Registration::Fexit { function }) => {
            if let Err(err) = attach_dport_registration(&mut ebpf, &btf, function) {
                warnings.push(format!(
                    "{function}: fexit not attached ({err:#}): dports are still discovered at their first lookup, but the devres host cross-check is off"
                ));
            }
        }
        // A site of the plan: attached above, a warning there if it failed.
        Some(Registration::Return { .. }) => {}
        None => warnings.push(
            "no dport registration function to attach to (kernel profile): dports are only discovered at their first lookup, and the devres host cross-check is off".into(),
        ),
    }
    let free_sites = attached_roles.iter().filter(|r| matches!(r, SiteRole::FreeCall | SiteRole::FreeEntry)).count();
    let lifetime = programs.of(SiteRole::FreeEntry);
    attach_free_path(&mut ebpf, &btf, discovery, free_sites, &mut kprobes, lifetime, &mut warnings)?;
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
    free_sites: usize,
    kprobes: &mut Kprobes,
    kprobe: std::os::fd::BorrowedFd<'_>,
    warnings: &mut Vec<String>,
) -> anyhow::Result<()> {
    let fallback = match &discovery.profile.free {
        FreePath::Action { function, module: None } => {
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
        FreePath::Action { function, module: Some(module) } => {
            (free_sites == 0).then(|| format!("the entry of {function} [{module}] is not probed"))
        }
        FreePath::DevresKfree { .. } => {
            (free_sites == 0).then(|| "no kfree call site of the devres core is probed".to_owned())
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

/// Tells the kernel side where the devres action that frees dports is (0: none).
pub(super) fn set_free_action(ebpf: &mut Ebpf, addr: u64) -> anyhow::Result<()> {
    let mut map: Array<_, u64> =
        Array::try_from(ebpf.map_mut("FREE_ACTION").context("the eBPF object has no FREE_ACTION map")?)?;
    map.set(0, addr, 0)?;
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
        RegisterReturn => {
            "registrations are not seen: dports are still discovered at their first lookup, but the devres host cross-check is off"
        }
    }
}

fn role_word(site: &PlannedSite) -> &'static str {
    use tracer_common::SiteRole::*;
    match site.role {
        Use | Deref => "site",
        LoadCall | EraseCall | StoreCall | LockCall | UnlockCall | HostAllocCall | HostActionCall | FreeCall => "call",
        FreeEntry => "entry",
        LoadReturn | EraseReturn | LockReturn | LockReturnIfZero | LockReturnIfOne | HostAllocReturn
        | RegisterReturn => "return",
    }
}

/// What each site index stands for, for the resolver.
pub fn site_names(plan: &Plan) -> Vec<SiteName> {
    plan.sites.iter().map(PlannedSite::name).collect()
}
