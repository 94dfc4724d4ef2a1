//! The one kprobe program behind every call site and use site: its attach cookie indexes
//! `SITES`, which says what the probed instruction is.
use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid},
    programs::ProbeContext,
};
use tracer_common::{Counter, DportUse, EventKind, LoadedKey, Payload, SITE_UNPAIRED_OK, SiteInfo, SiteRole};

use crate::{
    ALLOC_HOST, DPORTS, LOADED, PENDING_HOST, PENDING_LOCK, SITES,
    cxl::{self, free_lock_stamp},
    diag::{self, Map},
    emit::{Stack, count, emit, site_hit, site_report},
    free_action, mutex, xarray,
};

/// The probed task's registers. The verifier only allows context reads at constant offsets,
/// so every field is read on its own, volatile, before any choice between them is made.
#[derive(Copy, Clone)]
pub struct Regs {
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub r8: u64,
    pub r9: u64,
    pub rax: u64,
}

pub fn regs(ctx: &ProbeContext) -> Regs {
    let r: *const pt_regs = ctx.regs;
    // SAFETY: a kprobe's context is the probed task's pt_regs; each read has a constant offset.
    unsafe {
        Regs {
            rdi: core::ptr::read_volatile(&raw const (*r).rdi),
            rsi: core::ptr::read_volatile(&raw const (*r).rsi),
            rdx: core::ptr::read_volatile(&raw const (*r).rdx),
            rcx: core::ptr::read_volatile(&raw const (*r).rcx),
            r8: core::ptr::read_volatile(&raw const (*r).r8),
            r9: core::ptr::read_volatile(&raw const (*r).r9),
            rax: core::ptr::read_volatile(&raw const (*r).rax),
        }
    }
}

/// General-purpose register `reg` (a `Reg` value) of the probed task.
fn reg(ctx: &ProbeContext, reg: u32) -> u64 {
    let r: *const pt_regs = ctx.regs;
    // SAFETY: a kprobe's context is the probed task's pt_regs; each arm reads at a constant
    // offset, which is all the verifier allows.
    unsafe {
        match reg {
            0 => core::ptr::read_volatile(&raw const (*r).rax),
            1 => core::ptr::read_volatile(&raw const (*r).rbx),
            2 => core::ptr::read_volatile(&raw const (*r).rcx),
            3 => core::ptr::read_volatile(&raw const (*r).rdx),
            4 => core::ptr::read_volatile(&raw const (*r).rsi),
            5 => core::ptr::read_volatile(&raw const (*r).rdi),
            6 => core::ptr::read_volatile(&raw const (*r).rbp),
            7 => core::ptr::read_volatile(&raw const (*r).r8),
            8 => core::ptr::read_volatile(&raw const (*r).r9),
            9 => core::ptr::read_volatile(&raw const (*r).r10),
            10 => core::ptr::read_volatile(&raw const (*r).r11),
            11 => core::ptr::read_volatile(&raw const (*r).r12),
            12 => core::ptr::read_volatile(&raw const (*r).r13),
            13 => core::ptr::read_volatile(&raw const (*r).r14),
            14 => core::ptr::read_volatile(&raw const (*r).r15),
            _ => 0,
        }
    }
}

/// The site the current kprobe is (its attach cookie indexes `SITES`), counted as run.
fn this_site(ctx: &ProbeContext) -> Option<(u64, SiteInfo, SiteRole)> {
    // SAFETY: the context of a kprobe attached through a perf link.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let site = SITES.get(cookie as u32).copied()?;
    site_hit(cookie);
    Some((cookie, site, SiteRole::from_u32(site.role)?))
}

/// `SiteProgram::Site`: lookups, xarray writes, uses, inline accesses.
pub fn on_site(ctx: &ProbeContext) {
    let Some((cookie, site, role)) = this_site(ctx) else { return };
    match role {
        SiteRole::Use => on_use(ctx, &site, cookie),
        SiteRole::LoadCall | SiteRole::EraseCall => xarray::on_call(ctx, site.arg),
        SiteRole::LoadReturn => xarray::on_load_return(ctx, site.arg == SITE_UNPAIRED_OK, cookie),
        SiteRole::EraseReturn => xarray::on_erase_return(ctx, site.arg == SITE_UNPAIRED_OK),
        SiteRole::StoreCall => xarray::on_store_call(ctx),
        SiteRole::Deref => on_deref(ctx, &site, cookie),
        _ => {}
    }
}

/// `SiteProgram::Lock`: lock and unlock calls.
pub fn on_lock_site(ctx: &ProbeContext) {
    let Some((cookie, site, role)) = this_site(ctx) else { return };
    match role {
        SiteRole::LockCall => on_lock_call(ctx, &site),
        SiteRole::LockReturn | SiteRole::LockReturnIfZero | SiteRole::LockReturnIfOne => {
            on_lock_return(ctx, role, cookie)
        }
        SiteRole::UnlockCall => mutex::emit_unlock(ctx, regs(ctx).rdi, cookie as u32, site.arg),
        _ => {}
    }
}

/// `SiteProgram::Lifetime`: a dport's registration and its free.
pub fn on_lifetime_site(ctx: &ProbeContext) {
    let Some((_, site, role)) = this_site(ctx) else { return };
    match role {
        SiteRole::HostAllocCall => on_host_alloc_call(ctx),
        SiteRole::HostAllocReturn => on_host_alloc_return(ctx, site.arg == SITE_UNPAIRED_OK),
        SiteRole::HostActionCall => on_host_action_call(ctx),
        SiteRole::FreeCall => cxl::on_free(ctx, regs(ctx).rdi),
        SiteRole::FreeEntry => cxl::on_free(ctx, arg(&regs(ctx), site.arg)),
        SiteRole::RegisterReturn => cxl::on_dport_returned(ctx, regs(ctx).rax),
        _ => {}
    }
}

pub fn on_shared_deref(ctx: &ProbeContext) {
    // SAFETY: the context of a kprobe attached through a perf link.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let Some(site) = SITES.get(cookie as u32).copied() else {
        return;
    };
    if SiteRole::from_u32(site.role) == Some(SiteRole::Deref) {
        site_hit(cookie);
        on_deref(ctx, &site, cookie);
    }
}

fn arg(r: &Regs, n: u32) -> u64 {
    match n {
        0 => r.rdi,
        1 => r.rsi,
        2 => r.rdx,
        3 => r.rcx,
        4 => r.r8,
        5 => r.r9,
        _ => 0,
    }
}

/// Entry of a function taking `struct cxl_dport *`: a use, if the dport is tracked.
fn on_use(ctx: &ProbeContext, site: &SiteInfo, index: u64) {
    let dport = arg(&regs(ctx), site.arg);
    let Some(info) = (unsafe { DPORTS.get(&dport) }).copied() else { return };
    let flags = free_lock_stamp(&info);
    site_report(index);
    emit(ctx, EventKind::Use, flags, Stack::With, Payload { dport_use: DportUse { dport, site: index } });
}

/// An instruction about to access a field through its base register: a deref, if the
/// register holds a dport this thread loaded. A pointer to anything else at the same
/// displacement misses the map and costs one lookup.
fn on_deref(ctx: &ProbeContext, site: &SiteInfo, index: u64) {
    let dport = reg(ctx, site.arg);
    if unsafe { LOADED.get(&LoadedKey { tid: tid(), pad: 0, dport }) }.is_none() {
        return;
    }
    let Some(info) = (unsafe { DPORTS.get(&dport) }).copied() else { return };
    let flags = free_lock_stamp(&info);
    site_report(index);
    emit(ctx, EventKind::Deref, flags, Stack::With, Payload { dport_use: DportUse { dport, site: index } });
}

fn tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

/// A lock call in CXL code: remember the lock and its mode (in the low bits of its address,
/// which a mutex's or rw_semaphore's alignment leaves zero) for the return site. Every lock
/// taken in CXL code is reported, tracked or not: a report lists what its thread held.
fn on_lock_call(ctx: &ProbeContext, site: &SiteInfo) {
    let lock = regs(ctx).rdi;
    if lock == 0 {
        return;
    }
    let pending = lock | u64::from(site.arg & LOCK_MODE_BITS as u32);
    if PENDING_LOCK.insert(&tid(), &pending, 0).is_err() {
        // The thread id again, not kept: keeping it cost the hit path an instruction.
        diag::map_full(Map::PendingLock, u64::from(tid()));
    }
}

/// Bits of a pending lock's value that hold its `LockMode`.
const LOCK_MODE_BITS: u64 = 0x3;

/// After the lock call returned: the lock is held (for the conditional variants, if the
/// return value says so).
fn on_lock_return(ctx: &ProbeContext, role: SiteRole, site: u64) {
    let tid = tid();
    let Some(pending) = (unsafe { PENDING_LOCK.get(&tid) }).copied() else { return };
    let _ = PENDING_LOCK.remove(&tid);
    let ret = regs(ctx).rax;
    let acquired = match role {
        SiteRole::LockReturnIfZero => ret as u32 == 0,
        SiteRole::LockReturnIfOne => ret as u32 == 1,
        _ => true,
    };
    if acquired {
        mutex::emit_lock(ctx, pending & !LOCK_MODE_BITS, site as u32, (pending & LOCK_MODE_BITS) as u32);
    }
}

/// `devm_kmalloc(dev, ...)` called by dport registration: remember the host device.
fn on_host_alloc_call(ctx: &ProbeContext) {
    if PENDING_HOST.insert(&tid(), &regs(ctx).rdi, 0).is_err() {
        diag::map_full(Map::PendingHost, u64::from(tid()));
    }
}

/// `__devm_add_action(host, action, data, name)`: when the action is the one that frees
/// dports (`free_dport`, 7.2), `data` is a dport being registered and `host` the device
/// whose devres will free it.
fn on_host_action_call(ctx: &ProbeContext) {
    let r = regs(ctx);
    let action = free_action();
    if action == 0 || r.rsi != action || r.rdx == 0 {
        return;
    }
    if ALLOC_HOST.insert(&r.rdx, &r.rdi, 0).is_err() {
        diag::map_full(Map::AllocHost, r.rdx);
    }
}

/// Its return: the allocation (the dport to be) belongs to that host's devres.
fn on_host_alloc_return(ctx: &ProbeContext, tail: bool) {
    let tid = tid();
    let Some(host) = (unsafe { PENDING_HOST.get(&tid) }).copied() else {
        if !tail {
            count(Counter::Unpaired);
        }
        return;
    };
    let _ = PENDING_HOST.remove(&tid);
    let allocation = regs(ctx).rax;
    if allocation != 0 && ALLOC_HOST.insert(&allocation, &host, 0).is_err() {
        diag::map_full(Map::AllocHost, allocation);
    }
}
