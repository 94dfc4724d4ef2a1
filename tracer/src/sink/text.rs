//! Findings as text, laid out like lockdep and KASAN reports.
use std::io::{self, Write};

use crate::{
    coverage::{Coverage, SiteKind, XaTarget},
    engine::{Class, Group},
    event::{Access, Hex, Stack},
    kernel::profile,
    summary::Summary,
};

const RULE: &str = "==================================================================";

/// Seconds.microseconds, as the kernel log prints time.
fn secs(ns: u64) -> String {
    format!("{}.{:06}", ns / 1_000_000_000, (ns % 1_000_000_000) / 1_000)
}

fn write_stack(out: &mut impl Write, title: &str, stack: Option<&Stack>) -> io::Result<()> {
    writeln!(out, "{title}")?;
    match stack {
        Some(stack) if !stack.is_empty() => {
            for frame in stack.iter() {
                writeln!(out, "  {frame}")?;
            }
            Ok(())
        }
        _ => writeln!(out, "  (no stack recorded)"),
    }
}

/// One finding, like a lockdep or KASAN report; `known` says why it is known, if it is.
pub fn write_group(out: &mut impl Write, group: &Group, known: Option<&str>) -> io::Result<()> {
    let f = &group.finding;
    writeln!(out, "{RULE}")?;
    writeln!(out, "BUG: tracer: {}", f.title())?;
    if let Some(reason) = known {
        writeln!(out, "known: {reason}")?;
    }
    if let Some(access) = &f.access {
        // KASAN's first line: what was touched, how wide, where.
        writeln!(out, "{}", describe_access(f.class, access))?;
    }
    writeln!(out, "{}", f.reason)?;
    write!(out, "task {} (tid {}) at {}s", f.comm, f.tid, secs(f.ts))?;
    if group.count > 1 {
        write!(out, ", {} occurrences (last at {}s)", group.count, secs(group.last_ts))?;
    }
    writeln!(out)?;
    if f.dport != 0 {
        write!(out, "dport {} (generation {})", Hex(f.dport), f.generation)?;
        if f.port != 0 {
            write!(out, " of {} {}", if f.root { "root port" } else { "port" }, Hex(f.port))?;
        }
        writeln!(out)?;
    }
    if let Some(lock) = &f.expected_lock {
        writeln!(out, "expected lock: {} {} ({})", lock.role.name(), Hex(lock.addr), lock.what)?;
    }
    // Like lockdep's list: every lock the thread took in CXL code, oldest first.
    writeln!(out, "held locks:{}", if f.held_locks.is_empty() { " none" } else { "" })?;
    for (i, l) in f.held_locks.iter().enumerate() {
        write!(out, "  #{i}: {} {}", Hex(l.lock), l.kind())?;
        match (l.role(f), &l.name) {
            (Some(role), _) => write!(out, " ({role})")?,
            (None, Some(name)) => write!(out, " ({name})")?,
            (None, None) => {}
        }
        match &l.at {
            Some(at) => writeln!(out, ", taken at {at}")?,
            None => writeln!(out, ", taken before tracing started (the kernel's mutex->owner says it is held)")?,
        }
    }
    if !group.also_at.is_empty() {
        writeln!(out, "the same loaded pointer, in the same call chain, also:")?;
        for also in &group.also_at {
            let place = match &also.access {
                Some(access) => describe_access(also.class, access),
                None => format!("passed to {}", also.site),
            };
            let times = if also.count == group.count { String::new() } else { format!(" ({} times)", also.count) };
            writeln!(out, "  {place}{times}")?;
        }
    }
    let what = match f.class {
        _ if f.access.is_some() => "access",
        Class::UnlockedErase => "write",
        Class::RuleMismatch => "free",
        Class::UseAfterFree if f.load.is_none() => "access",
        _ => "use",
    };
    writeln!(out)?;
    write_stack(out, &format!("{what} stack:"), f.stack.as_ref())?;
    if let Some(load) = &f.load {
        let held = if load.free_lock_held { "free lock held" } else { "free lock not held" };
        write_stack(out, &format!("loaded from port->dports at {}s ({held}):", secs(load.ts)), load.stack.as_ref())?;
    }
    if let Some(lock) = &f.lock {
        match &lock.stack {
            Some(_) => {
                write_stack(out, &format!("{} taken at {}s:", lock_name(f), secs(lock.ts)), lock.stack.as_ref())?
            }
            None => writeln!(
                out,
                "{} taken at {}s or earlier (before tracing started, or outside probed code: no stack)",
                lock_name(f),
                secs(lock.ts)
            )?,
        }
    }
    if let Some(free) = &f.free {
        write_stack(
            out,
            &format!("freed by task {} (tid {}) at {}s:", free.comm, free.tid, secs(free.ts)),
            free.stack.as_ref(),
        )?;
    }
    writeln!(out, "{RULE}")
}

/// "unlocked read of dport->rch (1 byte) at cxl_mem_probe+0x19a".
fn describe_access(class: Class, access: &Access) -> String {
    let how = match class {
        Class::UnlockedUse => "unlocked ",
        Class::StaleUse => "stale ",
        _ => "",
    };
    format!(
        "{how}{} of dport->{} ({} byte{}) at {}",
        access.verb(),
        access.member,
        access.size,
        if access.size == 1 { "" } else { "s" },
        access.place()
    )
}

/// The coverage lines of the summary: per kind, how many dport sites ran, and the functions
/// whose dport sites never ran, with their source file and, for a reader no guest here can
/// run, why (a gate is only as good as what its workload reached).
pub fn write_coverage(out: &mut impl Write, coverage: &Coverage, prefix: &str) -> io::Result<()> {
    let parts: Vec<String> = SiteKind::ALL
        .into_iter()
        .map(|kind| {
            let t = coverage.totals(kind);
            format!("{} of {} ran ({} reports, {} judged)", t.ran, t.sites, t.reported, t.judged)
        })
        .zip(SiteKind::ALL)
        .map(|(counts, kind)| format!("dport {} sites: {counts}", kind.name()))
        .collect();
    writeln!(out, "{prefix}coverage: {}", parts.join("; "))?;
    let (unknown, ran) = coverage.unknown_loads();
    if unknown > 0 {
        writeln!(
            out,
            "{prefix}  load sites on an xarray not known statically that never returned a dport: {unknown} ({ran} ran)"
        )?;
    }
    let (loads, derefs) = coverage.other_sites();
    if loads + derefs > 0 {
        writeln!(out, "{prefix}  sites about other xarrays, not counted: {loads} load, {derefs} deref")?;
    }
    let misread = coverage.misread();
    if !misread.is_empty() {
        writeln!(
            out,
            "{prefix}  WARNING: sites read as being about another xarray reported a dport (counted as dport sites; the kernel profile's reading is wrong there): {}",
            misread.join(", ")
        )?;
    }
    for kind in SiteKind::ALL {
        let never = coverage.never_ran(kind);
        if never.is_empty() {
            continue;
        }
        let list: Vec<String> = never
            .iter()
            .map(|n| {
                let mut what = n.file.as_deref().map(str::to_owned).into_iter().collect::<Vec<_>>();
                if n.sites > 1 {
                    what.push(format!("{} sites", n.sites));
                }
                if let Some(why) = profile::unreachable(&n.function) {
                    what.push(format!("unreachable here: {why}"));
                }
                match what.is_empty() {
                    true => n.function.to_string(),
                    false => format!("{} ({})", n.function, what.join("; ")),
                }
            })
            .collect();
        writeln!(out, "{prefix}  dport {} sites that never ran, by function: {}", kind.name(), list.join(", "))?;
    }
    Ok(())
}

/// `analyze --coverage`: every site, one per line.
pub fn write_coverage_table(out: &mut impl Write, coverage: &Coverage) -> io::Result<()> {
    writeln!(out, "{:<6} {:>8} {:>8} {:>8}  {:<8} site", "kind", "ran", "reported", "judged", "xarray")?;
    for s in &coverage.sites {
        let xarray = match (s.kind, s.xarray) {
            (SiteKind::Load, XaTarget::Dports) => "dports",
            (SiteKind::Load, _) if s.reported > 0 => "dports*",
            (SiteKind::Load, XaTarget::Unknown) => "unknown",
            (SiteKind::Load, XaTarget::Other) => "other",
            _ => "-",
        };
        let file = s.file.as_deref().map_or(String::new(), |f| format!("  ({f})"));
        writeln!(
            out,
            "{:<6} {:>8} {:>8} {:>8}  {xarray:<8} {}{file}",
            s.kind.name(),
            s.ran,
            s.reported,
            s.judged,
            s.place
        )?;
    }
    writeln!(out, "xarray: dports = &port->dports in its code, dports* = proven by a dport it returned")?;
    Ok(())
}

pub fn write_summary(out: &mut impl Write, s: &Summary) -> io::Result<()> {
    writeln!(out, "tracer summary:")?;
    writeln!(out, "  events: {} seen, {} undecodable", s.events, s.undecodable)?;
    let drops: Vec<String> = s.drops().map(|(name, n)| format!("{name} {n}")).collect();
    if drops.is_empty() {
        writeln!(out, "  dropped in the kernel: {} (no kernel counters)", s.dropped())?;
    } else {
        writeln!(out, "  dropped in the kernel: {} ({})", s.dropped(), drops.join(", "))?;
    }
    let other: Vec<String> = s
        .kernel
        .iter()
        .filter(|(name, _)| !s.drops().any(|(drop, _)| drop == name))
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    if !other.is_empty() {
        writeln!(out, "  kernel counters: {}", other.join(", "))?;
    }
    if s.truncated_bytes > 0 {
        writeln!(out, "  trace cut off: {} bytes after the last complete record lost", s.truncated_bytes)?;
    }
    let e = &s.engine;
    writeln!(
        out,
        "  engine: {} uses not judged (pointer not seen loaded), {} unknown objects, {} lock states corrected from mutex->owner",
        e.unjudged_uses, e.unknown_objects, e.stamp_corrections
    )?;
    if e.reregistered > 0 {
        writeln!(
            out,
            "  WARNING: {} dport(s) registered again at a live address: their free was not seen (a free path the tracer does not probe)",
            e.reregistered
        )?;
    }
    if e.evicted() > 0 {
        writeln!(
            out,
            "  evicted past the state caps: {} dports, {} dports xarrays, {} threads, {} references",
            e.evicted_dports, e.evicted_containers, e.evicted_threads, e.evicted_refs
        )?;
    }
    let by_class = |counts: &[(Class, u64, u64)], minus: &[(Class, u64, u64)]| -> Vec<String> {
        counts
            .iter()
            .map(|&(class, n, occurrences)| {
                let (_, kn, ko) = minus.iter().find(|(c, _, _)| *c == class).copied().unwrap_or((class, 0, 0));
                (class, n - kn, occurrences - ko)
            })
            .filter(|(_, n, _)| *n > 0)
            .map(|(class, n, occurrences)| format!("{class} {n} ({occurrences} {})", plural(occurrences, "occurrence")))
            .collect()
    };
    let new = by_class(&s.findings, &s.known);
    match (s.known.is_empty(), new.is_empty()) {
        (true, true) => writeln!(out, "  findings: 0")?,
        (true, false) => writeln!(out, "  findings: {}: {}", s.new_groups(), new.join(", "))?,
        (false, true) => writeln!(out, "  new findings: 0")?,
        (false, false) => writeln!(out, "  new findings: {}: {}", s.new_groups(), new.join(", "))?,
    }
    if !s.known.is_empty() {
        let known = by_class(&s.known, &[]);
        match known.is_empty() {
            true => writeln!(out, "  known findings: 0")?,
            false => writeln!(out, "  known findings: {}: {}", s.known_groups(), known.join(", "))?,
        }
    }
    for entry in &s.known_unseen {
        writeln!(out, "  known but not seen (line {}): {}  # {}", entry.line, entry.title, entry.reason)?;
    }
    if let Some(coverage) = &s.coverage {
        write_coverage(out, coverage, "  ")?;
    }
    if let Some((_, n)) = s.kernel.iter().find(|(name, n)| name == "host_mismatch" && *n > 0) {
        writeln!(
            out,
            "  WARNING: {n} dport(s) were allocated on another devres host than the model predicts (the free lock rule is wrong for this kernel; the real host's mutex was tracked)"
        )?;
    }
    if s.lost_anything() {
        writeln!(out, "  WARNING: events were lost; findings may be incomplete")?;
    }
    Ok(())
}

fn lock_name(f: &crate::engine::Finding) -> &'static str {
    f.expected_lock.map_or("lock", |l| l.role.name())
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 { word.to_owned() } else { format!("{word}s") }
}
