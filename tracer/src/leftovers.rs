//! `tracer leftovers`: what tracer instances left in the kernel. A clean detach leaves
//! nothing: after Ctrl-C, SIGTERM, even SIGKILL (the kernel frees programs, maps and links
//! with their last file descriptor), only kprobe events of a killed instance can remain,
//! and the next start removes those.
use anyhow::bail;
use tracer::probe::attach;

use crate::Outcome;

/// Our programs' and maps' names as the kernel keeps them (truncated to 15 bytes).
const PROGRAMS: &[&str] = &[
    "site",
    "dport_add_exit",
    "kfree",
    "mutex_lock_exit",
    "mutex_lock_intr_exit",
    "mutex_lock_kill_exit",
    "mutex_trylock_exit",
    "mutex_unlock_entry",
];
const MAPS: &[&str] =
    &["EVENTS", "COUNTS", "DPORTS", "CONTAINERS", "NOT_CONTAINERS", "LOCKS", "BLOCKS", "SITES", "PENDING_XA", "PENDING_LOCK", "PENDING_HOST", "ALLOC_HOST"];

fn truncated(name: &str) -> &str {
    &name[..name.len().min(15)]
}

pub fn run() -> anyhow::Result<Outcome> {
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
            && MAPS.iter().any(|m| truncated(m) == name)
        {
            left.push(format!("bpf map {name} (id {})", map.id()));
        }
    }
    if let Ok(tracefs) = attach::tracefs() {
        for (pid, event) in attach::tracer_events(&tracefs) {
            left.push(format!("kprobe event {event} (tracer pid {pid}, {})", if attach::alive(pid) { "running" } else { "gone" }));
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
