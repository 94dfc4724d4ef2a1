//! Whether the current task owns a mutex, read exactly from `mutex->owner` (the task pointer
//! with flag bits below MUTEX_FLAGS; kernel/locking/mutex.c, v6.12).
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_task, bpf_probe_read_kernel},
    programs::{FEntryContext, FExitContext},
};
use tracer_common::{EventKind, LockMode, LockOp, MUTEX_OWNER_FLAGS, Member, NO_SITE, Offsets, Payload};

use crate::{
    LOCKS,
    diag::{self, Read},
    emit::{Stack, emit},
};

pub fn owned_by_current(off: &Offsets, lock: u64) -> Option<bool> {
    if lock == 0 {
        return None;
    }
    let at = lock + off.get(Member::MutexOwner);
    // SAFETY: bpf_probe_read_kernel checks the address.
    let owner = match unsafe { bpf_probe_read_kernel(at as *const u64) } {
        Ok(owner) => owner,
        Err(err) => {
            diag::read_failed(Read::MutexOwner, lock, err.into());
            return None;
        }
    };
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

/// A lock was taken at `site` (`NO_SITE`: the global lock hook): the stack, for a tracked
/// mutex, says where a finding's lock was taken; other locks are only listed as held, where
/// their site says enough.
pub fn emit_lock<C: EbpfContext>(ctx: &C, lock: u64, site: u32, mode: u32) {
    let payload = Payload { lock: LockOp { lock, site, mode } };
    if unsafe { LOCKS.get(&lock) }.is_some() {
        emit(ctx, EventKind::Lock, 0, Stack::With, payload);
    } else {
        // The colder path (no stack to take), told to the compiler: without a hint it laid
        // the two out one way or the other as unrelated code changed, and a hit on one of
        // them ran a jump more (`cargo xtask bench --hit-path-only`).
        core::hint::cold_path();
        emit(ctx, EventKind::Lock, 0, Stack::Without, payload);
    }
}

/// A lock was released at `site`.
pub fn emit_unlock<C: EbpfContext>(ctx: &C, lock: u64, site: u32, mode: u32) {
    emit(ctx, EventKind::Unlock, 0, Stack::Without, Payload { lock: LockOp { lock, site, mode } });
}

/// How a mutex API function reports success.
#[derive(Copy, Clone)]
pub enum Acquired {
    Always,
    IfZero,
    IfOne,
}

/// The global lock hook (opt-in: `--lock-events global`): fexit of a mutex_lock variant.
/// One map lookup for an untracked mutex.
pub fn on_lock_exit(ctx: &FExitContext, acquired: Acquired) {
    let lock: u64 = ctx.arg(0);
    if unsafe { LOCKS.get(&lock) }.is_none() {
        return;
    }
    let ok = match acquired {
        Acquired::Always => true,
        Acquired::IfZero => ctx.arg::<i32>(1) == 0,
        Acquired::IfOne => ctx.arg::<i32>(1) == 1,
    };
    if ok {
        emit_lock(ctx, lock, NO_SITE, LockMode::Mutex as u32);
    }
}

/// fentry of `mutex_unlock` (global hook): an event if the mutex is tracked.
pub fn on_unlock_entry(ctx: &FEntryContext) {
    let lock: u64 = ctx.arg(0);
    if unsafe { LOCKS.get(&lock) }.is_some() {
        emit_unlock(ctx, lock, NO_SITE, LockMode::Mutex as u32);
    }
}
