//! Whether the current task owns a mutex, read exactly from `mutex->owner` (the task pointer
//! with flag bits below MUTEX_FLAGS; kernel/locking/mutex.c, v6.12).
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};
use tracer_common::{MUTEX_OWNER_FLAGS, Offsets};

pub fn owned_by_current(off: &Offsets, lock: u64) -> Option<bool> {
    if lock == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address.
    let owner = unsafe { bpf_probe_read_kernel((lock + off.mutex_owner) as *const u64) }.ok()?;
    // SAFETY: no preconditions.
    let current = unsafe { bpf_get_current_task() };
    Some(owner & !MUTEX_OWNER_FLAGS == current)
}

/// `FLAG_*` bits for a stamp: `known` set when the owner could be read, `held` when owned.
pub fn stamp(off: &Offsets, lock: u64, known: u32, held: u32) -> u32 {
    match owned_by_current(off, lock) {
        Some(true) => known | held,
        Some(false) => known,
        None => 0,
    }
}
