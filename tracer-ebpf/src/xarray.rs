//! `port->dports` accesses, probed at their call sites in CXL code (xa_load and xa_erase are
//! notrace on stock kernels: lib/Makefile builds lib/ without ftrace).
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    programs::ProbeContext,
};
use tracer_common::{
    Counter, EventKind, FLAG_PORT_LOCK_HELD, FLAG_PORT_LOCK_KNOWN, LoadedKey, Payload, PendingXa, SITE_DIRECT,
    SITE_INDEX_BY_REF, XaAccess,
};

use crate::{
    CONTAINERS, LOADED, NOT_CONTAINERS, PENDING_XA,
    cxl::{free_lock_stamp, lookup_or_discover},
    diag::{self, Map, Read},
    emit::{Stack, count, emit, site_report},
    mutex, offsets,
    sites::regs,
};

fn tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

/// At a `call xa_load`/`xa_find`/`xa_erase`: remember the arguments for the return site.
pub fn on_call(ctx: &ProbeContext, flags: u32) {
    let r = regs(ctx);
    // With a direct xa_load probe every xarray of the system comes by here: those known not
    // to hold dports are skipped at once (their return site expects that).
    if flags & SITE_DIRECT != 0 && unsafe { NOT_CONTAINERS.get(&r.rdi) }.is_some() {
        return;
    }
    let by_ref = u64::from(flags & SITE_INDEX_BY_REF != 0);
    let pending = PendingXa { xa: r.rdi, index: r.rsi, by_ref };
    if PENDING_XA.insert(&tid(), &pending, 0).is_err() {
        // The thread id again, not kept: keeping it cost the hit path an instruction.
        diag::map_full(Map::PendingXa, u64::from(tid()));
    }
}

/// The call this return pairs with. At the return of a tail-calling function, other return
/// paths have none, which is normal (`tail`); elsewhere a missing call is counted.
fn take_pending(tail: bool) -> Option<PendingXa> {
    let tid = tid();
    let Some(pending) = (unsafe { PENDING_XA.get(&tid) }).copied() else {
        if !tail {
            count(Counter::Unpaired);
        }
        return None;
    };
    let _ = PENDING_XA.remove(&tid);
    Some(pending)
}

/// At the return of `xa_load` (site `index`): a dport loaded from its port's xarray.
pub fn on_load_return(ctx: &ProbeContext, tail: bool, index: u64) {
    let Some(mut call) = take_pending(tail) else { return };
    let entry = regs(ctx).rax;
    if entry == 0 {
        return;
    }
    if call.by_ref != 0 {
        // xa_find() wrote the found entry's index where rsi pointed.
        // SAFETY: bpf_probe_read_kernel checks the address.
        match unsafe { bpf_probe_read_kernel(call.index as *const u64) } {
            Ok(index) => call.index = index,
            Err(err) => {
                diag::read_failed(Read::XaFindIndex, call.index, err.into());
                return;
            }
        }
    }
    let Some(info) = lookup_or_discover(ctx, call.xa, call.index, entry) else { return };
    if LOADED.insert(&LoadedKey { tid: tid(), pad: 0, dport: entry }, &1, 0).is_err() {
        diag::map_full(Map::Loaded, entry);
    }
    let flags = free_lock_stamp(&info);
    site_report(index);
    emit(
        ctx,
        EventKind::XaLoad,
        flags,
        Stack::With,
        Payload { xa: XaAccess { xa: call.xa, index: call.index, entry } },
    );
}

fn port_lock_stamp(xa: u64) -> Option<u32> {
    let port_lock = *unsafe { CONTAINERS.get(&xa) }?;
    Some(mutex::stamp(&offsets(), port_lock, FLAG_PORT_LOCK_KNOWN, FLAG_PORT_LOCK_HELD))
}

/// At the return of `xa_erase`: an entry removed from a dports xarray.
pub fn on_erase_return(ctx: &ProbeContext, tail: bool) {
    let Some(call) = take_pending(tail) else { return };
    let entry = regs(ctx).rax;
    if entry != 0 {
        let _ = lookup_or_discover(ctx, call.xa, call.index, entry);
    }
    let Some(flags) = port_lock_stamp(call.xa) else { return };
    emit(
        ctx,
        EventKind::XaErase,
        flags,
        Stack::With,
        Payload { xa: XaAccess { xa: call.xa, index: call.index, entry } },
    );
}

/// At a `call __xa_insert`/`xa_store`/`__xa_store`: an entry written to a dports xarray.
pub fn on_store_call(ctx: &ProbeContext) {
    let r = regs(ctx);
    let (xa, index, entry) = (r.rdi, r.rsi, r.rdx);
    if entry != 0 {
        let _ = lookup_or_discover(ctx, xa, index, entry);
    }
    let Some(flags) = port_lock_stamp(xa) else { return };
    emit(ctx, EventKind::XaInsert, flags, Stack::With, Payload { xa: XaAccess { xa, index, entry } });
}
