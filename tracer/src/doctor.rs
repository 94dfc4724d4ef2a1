//! `tracer doctor`: what this kernel supports and how each target would be probed.
use std::collections::BTreeMap;

use anyhow::bail;
use tracer::kernel::{
    callsites::XaTarget,
    modules,
    profile::{CxlCore, FreePath, Registration},
};
use tracer_common::SiteRole;

use crate::{
    Outcome,
    discover::{self, ProbeConfig, discover},
    preflight::privilege_problem,
    probe::{kprobe, programs},
};

pub struct DoctorOptions {
    pub probe: ProbeConfig,
    /// Only inspect; do not load and attach the programs as a check.
    pub no_attach: bool,
}

fn traceable(function: &str) -> Option<bool> {
    Some(kprobe::traceable(&kprobe::tracefs().ok()?, function))
}

pub fn run(options: DoctorOptions) -> anyhow::Result<Outcome> {
    let mut problems = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernel: {}", release.trim());
    match privilege_problem() {
        None => println!("privileges: ok"),
        Some(problem) => {
            println!("privileges: MISSING: {problem}");
            bail!(problem);
        }
    }
    let btf_dir = options.probe.btf_dir.as_path();
    println!(
        "btf: vmlinux {}",
        if btf_dir.join("vmlinux").exists() { "present" } else { "MISSING (CONFIG_DEBUG_INFO_BTF)" }
    );
    match kprobe::tracefs() {
        Ok(path) => println!("tracefs: {} (kprobe_events)", path.display()),
        Err(err) => {
            println!("tracefs: MISSING: {err}");
            problems.push(err.to_string());
        }
    }
    let d = discover(&options.probe, false)?;
    print!("{}", d.profile);
    println!(
        "offsets: {}",
        d.profile.named_offsets().iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join(" ")
    );
    let module_btf: Vec<&str> = d.cxl_modules.iter().filter(|m| btf_dir.join(m).exists()).map(String::as_str).collect();
    let core = match &d.profile.core {
        CxlCore::BuiltIn => "built into vmlinux".to_owned(),
        CxlCore::Module(module) => format!("the module {module}"),
        CxlCore::Missing => "not found".to_owned(),
    };
    println!(
        "cxl code: core {core}; modules loaded: {}; module btf: {}",
        if d.cxl_modules.is_empty() { "none".to_owned() } else { d.cxl_modules.join(" ") },
        if module_btf.is_empty() { "none".to_owned() } else { module_btf.join(" ") },
    );
    let missing = modules::missing_drivers();
    if !missing.is_empty() {
        problems.push(format!(
            "CXL modules not loaded: {m} (modprobe {m}; or start `tracer run --wait-for-cxl` first): their call sites cannot be probed",
            m = missing.join(" ")
        ));
    }
    if !discover::has_cxl_code(&d) {
        problems.push("no CXL code in this kernel: no CXL core in vmlinux and no cxl_* module".into());
    }

    println!("targets:");
    let mut by_callee: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for call in &d.calls {
        let place = match &call.module {
            Some(m) => format!("{}+{:#x} [{m}]", call.function, call.offset),
            None => format!("{}+{:#x}", call.function, call.offset),
        };
        let unprobed = d.plan.unprobed_tail_calls.contains(call);
        let mut line = match (call.tail, unprobed) {
            (true, true) => {
                format!("{place} (tail call; its result is not observable: the function name is not unique)")
            }
            (true, false) => format!("{place} (tail call; result seen at the function's return)"),
            (false, _) => place,
        };
        if matches!(call.callee.call, SiteRole::LoadCall | SiteRole::EraseCall | SiteRole::StoreCall) {
            line.push_str(match call.xarray {
                XaTarget::Dports => ": port->dports",
                XaTarget::Other => ": another xarray (probed; not counted as a dport site)",
                XaTarget::Unknown => ": xarray not known statically (a dports xarray if a load there returns a dport)",
            });
        }
        by_callee.entry(call.callee.name).or_default().push(line);
    }
    for (callee, sites) in &by_callee {
        let how = match traceable(callee) {
            Some(true) => "traceable, probed at its call sites in CXL code",
            Some(false) => "notrace on this kernel, probed at its call sites in CXL code",
            None => "probed at its call sites in CXL code",
        };
        println!("  {callee}: {how}: {} call site(s)", sites.len());
        if callee.starts_with("xa_") || callee.starts_with("__xa_") {
            for site in sites {
                println!("    {site}");
            }
        }
    }
    if d.direct_xa_load {
        println!("  xa_load: probed directly (entry and return), in place of its call sites");
    } else if !by_callee.contains_key("xa_load") {
        problems.push(
            "no xa_load call site found in CXL code: lookups (and so read-side findings) are not observable".into(),
        );
    }
    let host_callee = d.profile.host_check_callee();
    let host_checks = d.calls.iter().filter(|c| Some(c.callee) == host_callee).count();
    let how = |r: &Registration| match r {
        Registration::Fexit { .. } => "fexit",
        Registration::Return { .. } => "kretprobe (in a module)",
    };
    match (&d.profile.registration, host_callee) {
        (Some(r), Some(callee)) => println!(
            "  {}: {} (registration; dports are also discovered at first lookup); its devres host is cross-checked at {host_checks} {} call site(s)",
            r.function(),
            how(r),
            callee.name
        ),
        (Some(r), None) => println!(
            "  {}: {} (registration; dports are also discovered at first lookup); devres host not cross-checked",
            r.function(),
            how(r)
        ),
        (None, _) => println!("  registration: not probed (dports are discovered at first lookup)"),
    }
    if host_callee.is_some() && host_checks == 0 {
        problems.push(
            "the devres host cross-check has no call site in CXL code: a wrong free-lock model would go unnoticed"
                .into(),
        );
    }
    match &d.profile.free {
        FreePath::DevresKfree { sites } => {
            let functions: std::collections::BTreeSet<&str> = sites.iter().map(|c| &*c.function).collect();
            println!(
                "  frees: {} kfree call site(s) of the devres core probed ({}): nothing runs on other kfrees",
                sites.len(),
                functions.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        path => println!("  frees: {} ({})", path.describe(), d.profile.free_why),
    }
    let hot = discover::hot_attach_points(&d);
    if hot.is_empty() {
        println!("  attach points outside CXL and devres code: none");
    } else {
        println!("  attach points outside CXL and devres code:");
        for point in &hot {
            println!("    {point}");
        }
    }
    println!("  uses: {} function(s) with a struct cxl_dport * argument:", d.plan.uses.len());
    for u in &d.plan.uses {
        let name = match &u.module {
            Some(m) => format!("{} [{m}]", u.function),
            None => u.function.clone(),
        };
        match u.probed {
            Some(_) => println!("    {name} (argument {}): kprobe at entry", u.arg),
            None => println!(
                "    {name} (argument {}): not in the kernel's symbols (inlined into its callers, or its module is not loaded): not observable as a function; the functions it passes the dport to are",
                u.arg
            ),
        }
    }
    if d.derefs.functions > 0 || !options.probe.derefs {
        println!(
            "  deref sites: {} instructions in {} functions (memory accesses inside struct cxl_dport through a register, in the functions that can hold a loaded dport; reported only when the register holds a dport the thread loaded)",
            d.derefs.sites, d.derefs.functions
        );
    }
    if !options.probe.derefs {
        println!("    not probed (--no-derefs): inline accesses such as `if (dport->rch)` are not seen");
    }
    let locks = d.plan.count(SiteRole::LockCall);
    let unlocks = d.plan.count(SiteRole::UnlockCall);
    if d.global_lock_hook {
        println!(
            "  mutex lock/unlock: fexit/fentry on the mutex API (--lock-events global; events only for tracked mutexes)"
        );
    } else {
        println!(
            "  mutex lock/unlock: {locks} lock and {unlocks} unlock call sites in CXL code (events only for tracked mutexes)"
        );
    }
    println!("plan: {} sites (discovery took {:.1?})", d.plan.sites.len(), d.took);

    if !options.no_attach {
        match programs::load(&d, options.probe.ring_bytes, options.probe.diagnostics) {
            Ok(attached) => {
                println!(
                    "attach check: {} kprobes ({} sites), fexit and tracepoint attached in {:.1?}",
                    attached.kprobe_count(),
                    attached.sites_attached,
                    attached.took
                );
                if d.derefs.sites > 0 {
                    println!("  of which the {} deref sites took {:.1?}", d.derefs.sites, attached.deref_took);
                }
                // What each program cost the verifier, against its limit (a million on 6.1).
                let mut verified: Vec<String> = attached
                    .ebpf
                    .programs()
                    .filter_map(|(name, program)| {
                        Some(format!("{name} {}", program.info().ok()?.verified_instruction_count()?))
                    })
                    .collect();
                verified.sort();
                if !verified.is_empty() {
                    let logging = if options.probe.diagnostics { "with" } else { "without" };
                    println!("  verifier, instructions processed ({logging} -v's logging): {}", verified.join(", "));
                }
                for warning in &attached.warnings {
                    println!("  problem: {warning}");
                    problems.push(warning.clone());
                }
            }
            Err(err) => {
                println!("attach check: FAILED: {err:#}");
                problems.push(format!("{err:#}"));
            }
        }
    }
    if problems.is_empty() {
        println!("verdict: ready");
        Ok(Outcome::Clean)
    } else {
        println!("verdict: {} problem(s):", problems.len());
        for p in &problems {
            println!("  - {p}");
        }
        bail!("{} problem(s) found (listed above)", problems.len())
    }
}
