//! Dports: registration, discovery on first sight, frees. The rules come from
//! drivers/cxl/core/port.c (v6.12): a dport is devm-allocated on its host (`port->uport_dev`
//! for a root port, `&port->dev` otherwise) and freed with the host's devres, under the
//! host's `dev->mutex`; `port->dports` is written under `port->dev.mutex`.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_func_ret, bpf_probe_read_kernel},
    programs::{FExitContext, RawTracePointContext},
};
use tracer_common::{
    Counter, DPORT_FREED, DportAdd, DportFree, DportInfo, DportOrigin, EventKind, FLAG_FREE_LOCK_HELD,
    FLAG_FREE_LOCK_KNOWN, Member, Offsets, Payload,
};

use crate::{
    ALLOC_HOST, BLOCKS, CONTAINERS, DPORTS, LOCKS, NOT_CONTAINERS,
    diag::{self, Map, Read},
    emit::{Stack, count, emit},
    mutex, offsets,
};

fn read_u64(addr: u64) -> Result<u64, i64> {
    // SAFETY: bpf_probe_read_kernel checks the address.
    unsafe { bpf_probe_read_kernel(addr as *const u64) }.map_err(i64::from)
}

/// Everything the rules need about a dport of `port`.
fn describe(off: &Offsets, dport: u64, port: u64) -> Option<DportInfo> {
    let dev = port + off.get(Member::PortDev);
    let read = |addr| read_u64(addr).inspect_err(|&err| diag::read_failed(Read::PortDevices, port, err)).ok();
    let uport_dev = read(port + off.get(Member::PortUportDev))?;
    let parent = read(dev + off.get(Member::DeviceParent))?;
    // is_cxl_root(): the root port's uport_dev is its parent (drivers/cxl/core/port.c).
    let root = uport_dev != 0 && uport_dev == parent;
    let host = if root { uport_dev } else { dev };
    Some(DportInfo {
        port,
        xa: port + off.get(Member::PortDports),
        port_lock: dev + off.get(Member::DeviceMutex),
        free_lock: host + off.get(Member::DeviceMutex),
        block: dport - off.get(Member::DevresData),
        uport_lock: if uport_dev == 0 { 0 } else { uport_dev + off.get(Member::DeviceMutex) },
        root: root as u32,
        flags: 0,
    })
}

fn insert<V>(map: &aya_ebpf::maps::LruHashMap<u64, V>, which: Map, key: u64, value: &V) {
    if map.insert(&key, value, 0).is_err() {
        diag::map_full(which, key);
    }
}

/// Starts tracking `dport` and reports it. Inlined: a frame of its own made `site`'s deepest
/// call chain (lookup, discovery, track, emit) pass the verifier's 512 bytes on 6.1.
#[inline(always)]
fn track<C: EbpfContext>(ctx: &C, dport: u64, info: &DportInfo, origin: DportOrigin) {
    insert(&DPORTS, Map::Dports, dport, info);
    insert(&CONTAINERS, Map::Containers, info.xa, &info.port_lock);
    insert(&LOCKS, Map::Locks, info.port_lock, &1);
    insert(&LOCKS, Map::Locks, info.free_lock, &1);
    insert(&BLOCKS, Map::Blocks, info.block, &dport);
    insert(&BLOCKS, Map::Blocks, dport, &dport);
    let payload = Payload {
        dport_add: DportAdd {
            dport,
            port: info.port,
            xa: info.xa,
            port_lock: info.port_lock,
            free_lock: info.free_lock,
            uport_lock: info.uport_lock,
            root: info.root,
            origin: origin as u32,
        },
    };
    emit(ctx, EventKind::DportAdd, 0, Stack::Without, payload);
}

/// The tracked dport `entry` at `index` of xarray `xa`, discovering it on first sight: an
/// entry is a dport iff `&entry->port->dports == xa` and `entry->dport_dev == index` (a
/// dport is stored under its device, drivers/cxl/core/port.c `add_dport()`).
pub fn lookup_or_discover<C: EbpfContext>(ctx: &C, xa: u64, index: u64, entry: u64) -> Option<DportInfo> {
    if let Some(info) = unsafe { DPORTS.get(&entry) }
        && info.xa == xa
        && info.flags & DPORT_FREED == 0
    {
        return Some(*info);
    }
    if unsafe { NOT_CONTAINERS.get(&xa) }.is_some() {
        return None;
    }
    let off = offsets();
    // Not a dport, when these fail: nothing to tell.
    let port = read_u64(entry + off.get(Member::DportPort)).ok()?;
    let dport_dev = read_u64(entry + off.get(Member::DportDev)).ok()?;
    if port == 0 || port + off.get(Member::PortDports) != xa || dport_dev != index {
        if unsafe { CONTAINERS.get(&xa) }.is_none() {
            insert(&NOT_CONTAINERS, Map::NotContainers, xa, &1);
        }
        // A freed dport still in the xarray is reported as it was tracked.
        return unsafe { DPORTS.get(&entry) }.filter(|info| info.xa == xa).copied();
    }
    let info = describe(&off, entry, port)?;
    track(ctx, entry, &info, DportOrigin::Discovered);
    Some(info)
}

/// `FLAG_FREE_LOCK_*` for the dport's free lock.
pub fn free_lock_stamp(info: &DportInfo) -> u32 {
    mutex::stamp(&offsets(), info.free_lock, FLAG_FREE_LOCK_KNOWN, FLAG_FREE_LOCK_HELD)
}

/// fexit of the registration function (`__devm_cxl_add_dport(port, ...)`, or
/// `devm_cxl_add_dport(port, ...)` on 6.1: their argument counts differ, so the return value
/// is read with `bpf_get_func_ret`).
pub fn on_dport_added(ctx: &FExitContext) {
    let port: u64 = ctx.arg(0);
    let mut dport: u64 = 0;
    // SAFETY: the context of an fexit program; the helper writes one u64.
    let err = unsafe { bpf_get_func_ret(ctx.as_ptr(), &mut dport) };
    if err != 0 {
        diag::read_failed(Read::FuncRet, 0, err);
        return;
    }
    registered(ctx, port, dport);
}

/// The kretprobe of the registration function in a module: only the dport is at hand, and
/// its `port` member says whose it is (set before it is returned).
pub fn on_dport_returned<C: EbpfContext>(ctx: &C, dport: u64) {
    if !is_dport(dport) {
        return;
    }
    match read_u64(dport + offsets().get(Member::DportPort)) {
        Ok(port) => registered(ctx, port, dport),
        Err(err) => diag::read_failed(Read::DportPort, dport, err),
    }
}

/// ERR_PTR values are the top 4095 addresses.
fn is_dport(dport: u64) -> bool {
    dport != 0 && dport < (-4095i64) as u64
}

/// `dport` of `port` was registered. Cross-checks the predicted free lock against the
/// devres host the dport was really given (seen at its `devm_kmalloc` call, or where its
/// `free_dport` action was added), and tracks the real one.
fn registered<C: EbpfContext>(ctx: &C, port: u64, dport: u64) {
    if !is_dport(dport) {
        return;
    }
    let off = offsets();
    let Some(mut info) = describe(&off, dport, port) else { return };
    if let Some(&host) = unsafe { ALLOC_HOST.get(&dport) } {
        let _ = ALLOC_HOST.remove(&dport);
        count(Counter::HostChecked);
        let real = host + off.get(Member::DeviceMutex);
        if real != info.free_lock {
            count(Counter::HostMismatch);
            info.free_lock = real;
        }
    }
    track(ctx, dport, &info, DportOrigin::Registered);
}

/// `kfree(call_site, ptr)` at the raw tracepoint (the fallback free path).
pub fn on_kfree(ctx: &RawTracePointContext) {
    on_free(ctx, ctx.arg(1));
}

/// `ptr` is being freed: reports it if it is a tracked dport's memory (the dport itself, or
/// the devres node holding a devm dport).
pub fn on_free<C: EbpfContext>(ctx: &C, ptr: u64) {
    let Some(&dport) = (unsafe { BLOCKS.get(&ptr) }) else { return };
    let Some(info) = (unsafe { DPORTS.get(&dport) }).copied() else { return };
    let _ = BLOCKS.remove(&info.block);
    let _ = BLOCKS.remove(&dport);
    let flags = free_lock_stamp(&info);
    let freed = DportInfo { flags: info.flags | DPORT_FREED, ..info };
    insert(&DPORTS, Map::Dports, dport, &freed);
    emit(ctx, EventKind::Free, flags, Stack::With, Payload { free: DportFree { dport, block: ptr } });
}
