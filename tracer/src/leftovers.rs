//! `tracer leftovers`: what tracer instances left in the kernel. A clean detach leaves
//! nothing: after Ctrl-C, SIGTERM, even SIGKILL (the kernel frees programs, maps and links
//! with their last file descriptor), only kprobe events of a killed instance can remain,
//! and the next start removes those.
use anyhow::bail;

use crate::{Outcome, probe::kprobe};

/// Our programs' and maps' names as the kernel keeps them (truncated to 15 bytes).
const PROGRAMS: &[&str] = &[
    "site",
    "lock_site",
    "lifetime_site",
    "shared_deref",
    "dport_add_exit",
    "free_dport_entry",
    "kfree",
    "mutex_lock_exit",
    "mutex_lock_intr_exit",
    "mutex_lock_kill_exit",
    "mutex_trylock_exit",
    "mutex_unlock_entry",
];
const MAPS: &[&str] = &[
    "EVENTS",
    "COUNTS",
    "DPORTS",
    "LOADED",
    "CONTAINERS",
    "NOT_CONTAINERS",
    "LOCKS",
    "BLOCKS",
    "SITE_HITS",
    "SITE_REPORTS",
    "SITES",
    "PENDING_XA",
    "PENDING_LOCK",
    "PENDING_HOST",
    "ALLOC_HOST",
    "FREE_ACTION",
];
/// The map aya-log-ebpf adds for the kernel side's diagnostics.
const LOG_MAP: &str = "AYA_LOGS";

/// How long programs and maps of an instance that just exited may take to go: the kernel
/// frees a program's maps a grace period after the program (measured under TCG on 7.2:
/// `leftovers` right after `doctor` exited still listed 7 maps).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(3);

fn truncated(name: &str) -> &str {
    &name[..name.len().min(15)]
}

/// Our BPF programs and maps loaded now.
fn bpf_objects() -> anyhow::Result<Vec<String>> {
    let mut left = Vec::new();
    for program in aya::programs::loaded_programs() {
        let program = program?;
        if let Some(name) = program.name_as_str()
            && PROGRAMS.iter().any(|p| truncated(p) == name)
        {
            left.push(format!("bpf program {name} (id {})", program.id()));
        }
    }
    for map in aya::maps::loaded_maps() {
        let map = map?;
        if let Some(name) = map.name_as_str()
            && MAPS.iter().chain([&LOG_MAP]).any(|m| truncated(m) == name)
        {
            left.push(format!("bpf map {name} (id {})", map.id()));
        }
    }
    Ok(left)
}

pub fn run() -> anyhow::Result<Outcome> {
    let since = std::time::Instant::now();
    let mut left = bpf_objects()?;
    while !left.is_empty() && since.elapsed() < SETTLE {
        std::thread::sleep(std::time::Duration::from_millis(100));
        left = bpf_objects()?;
    }
    if let Ok(tracefs) = kprobe::tracefs() {
        for (pid, event) in kprobe::tracer_events(&tracefs) {
            left.push(format!(
                "kprobe event {event} (tracer pid {pid}, {})",
                if kprobe::alive(pid) { "running" } else { "gone" }
            ));
        }
    }
    if left.is_empty() {
        println!("nothing left in the kernel");
        return Ok(Outcome::Clean);
    }
    for item in &left {
        println!("{item}");
    }
    bail!("{} tracer object(s) still in the kernel", left.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every program and map the kernel side defines is looked for.
    #[test]
    fn every_program_and_map_of_the_kernel_side_is_known() {
        let source = include_str!("../../tracer-ebpf/src/main.rs");
        let lines: Vec<&str> = source.lines().map(str::trim).collect();
        let mut programs = 0;
        let mut maps = 0;
        for (i, line) in lines.iter().enumerate() {
            let next = lines[i + 1..].iter().find(|l| !l.starts_with("#[") && !l.starts_with("//"));
            if ["#[kprobe", "#[fentry", "#[fexit", "#[raw_tracepoint"].iter().any(|m| line.starts_with(m)) {
                let name = next.and_then(|l| l.split("fn ").nth(1)).and_then(|r| r.split('(').next()).unwrap();
                assert!(PROGRAMS.contains(&name), "program {name} is not in PROGRAMS");
                programs += 1;
            }
            if *line == "#[map]" {
                let name = next.and_then(|l| l.split("static ").nth(1)).and_then(|r| r.split(':').next()).unwrap();
                assert!(MAPS.contains(&name), "map {name} is not in MAPS");
                maps += 1;
            }
        }
        assert_eq!((programs, maps), (PROGRAMS.len(), MAPS.len()), "names listed that the kernel side no longer has");
    }
}
