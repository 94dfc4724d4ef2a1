//! Kernel side of tracer: probes on CXL dport lookups, xarray writes, device mutexes, uses
//! and frees, filtered in the kernel to tracked objects and sent to userspace through one
//! ring buffer. One ELF so every program shares the maps.
#![no_std]
#![no_main]

mod cxl;
mod diag;
mod emit;
mod mutex;
mod sites;
mod xarray;

use aya_ebpf::{
    macros::{fentry, fexit, kprobe, map, raw_tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::{FEntryContext, FExitContext, ProbeContext, RawTracePointContext},
};
use tracer_common::{COUNTERS, DportInfo, LoadedKey, MAX_SITES, Offsets, PendingXa, SiteInfo};

/// Records for userspace (`tracer_common::Record`). Resized by the loader.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// `tracer_common::Counter` slots, per CPU.
#[map]
static COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS as u32, 0);

/// Tracked dports by address, freed ones included (flagged) so later uses are still seen.
#[map]
static DPORTS: LruHashMap<u64, DportInfo> = LruHashMap::with_max_entries(65536, 0);

/// The dports each thread got from `xa_load`: a deref site reports only those.
#[map]
static LOADED: LruHashMap<LoadedKey, u8> = LruHashMap::with_max_entries(16384, 0);

/// Known dports xarrays (`&port->dports`) and the port lock of their port.
#[map]
static CONTAINERS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

/// Xarrays seen holding an entry that is not a dport: not containers.
#[map]
static NOT_CONTAINERS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(16384, 0);

/// Tracked mutexes: port locks and free locks of tracked dports.
#[map]
static LOCKS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(32768, 0);

/// Blocks `kfree` may receive for a tracked dport (its devres node, and the dport itself
/// for kernels that free it directly), to the dport address.
#[map]
static BLOCKS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65536, 0);

/// How often each site's probe ran, by site index (coverage: a gate that passes because the
/// workload never reached the code proves nothing).
#[map]
static SITE_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_SITES, 0);

/// How often each load, use or deref site reported a tracked dport, by site index.
#[map]
static SITE_REPORTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_SITES, 0);

/// Probed sites; a site's kprobe carries its index as attach cookie.
#[map]
static SITES: Array<SiteInfo> = Array::with_max_entries(MAX_SITES, 0);

/// xarray calls waiting for their return site, by thread id.
#[map]
static PENDING_XA: LruHashMap<u32, PendingXa> = LruHashMap::with_max_entries(4096, 0);

/// Tracked mutexes being taken, waiting for the return of the lock call, by thread id.
#[map]
static PENDING_LOCK: LruHashMap<u32, u64> = LruHashMap::with_max_entries(4096, 0);

/// Devres host devices being given an allocation in dport registration, by thread id.
#[map]
static PENDING_HOST: LruHashMap<u32, u64> = LruHashMap::with_max_entries(1024, 0);

/// The devres host of each allocation made in dport registration (until registered).
#[map]
static ALLOC_HOST: LruHashMap<u64, u64> = LruHashMap::with_max_entries(1024, 0);

/// Struct offsets from the running kernel's BTF, set by the loader.
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets::ZERO;

/// The address of the devres action that frees dports (`free_dport`, 7.2), or 0 on kernels
/// where dports are devm allocations. Set by the loader from the kernel profile; a map, not
/// a global, so that it follows the CXL core's module when that is loaded again elsewhere.
#[map]
static FREE_ACTION: Array<u64> = Array::with_max_entries(1, 0);

fn free_action() -> u64 {
    FREE_ACTION.get(0).copied().unwrap_or(0)
}

fn offsets() -> Offsets {
    // SAFETY: a global the loader sets before load; volatile so it is not constant-folded.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

/// Lookups, xarray writes, uses and inline accesses (`SiteProgram::Site`): dispatches on the
/// site its cookie names.
#[kprobe]
pub fn site(ctx: ProbeContext) -> u32 {
    sites::on_site(&ctx);
    0
}

/// Every lock and unlock call site and lock return site (`SiteProgram::Lock`): a program of
/// its own, so that `site` stays within the verifier's instruction limit of older kernels
/// (6.1: a million).
#[kprobe]
pub fn lock_site(ctx: ProbeContext) -> u32 {
    sites::on_lock_site(&ctx);
    0
}

/// The sites of a dport's registration and free (`SiteProgram::Lifetime`).
#[kprobe]
pub fn lifetime_site(ctx: ProbeContext) -> u32 {
    sites::on_lifetime_site(&ctx);
    0
}

/// A deref site at the instruction of another site: it shares that site's kprobe, linked
/// after `site` (the kernel runs an event's programs in link order, so an `xa_load`
/// return is seen before an inline read of its result). A kprobe of its own there would
/// be stacked with the other under an aggregate kprobe, which 6.12 warns about when a
/// reloaded module re-arms it. A program of its own: the same program cannot be linked
/// twice to one event, and `site` walking a second site doubles its verification, past
/// 6.1's million-instruction limit.
#[kprobe]
pub fn shared_deref(ctx: ProbeContext) -> u32 {
    sites::on_shared_deref(&ctx);
    0
}

/// A dport registered: the kernel profile's registration function (`__devm_cxl_add_dport`,
/// or `devm_cxl_add_dport` on 6.1), whose argument 0 is the port, returned it. In vmlinux;
/// in a module, its kretprobe is a site (`SiteRole::RegisterReturn`).
#[fexit(function = "__devm_cxl_add_dport")]
pub fn dport_add_exit(ctx: FExitContext) -> i32 {
    cxl::on_dport_added(&ctx);
    0
}

/// `free_dport(dport)` (7.2): the devres action that frees a dport, seen where it happens.
#[fentry(function = "free_dport")]
pub fn free_dport_entry(ctx: FEntryContext) -> i32 {
    cxl::on_free(&ctx, ctx.arg(0));
    0
}

/// The fallback free path, for a kernel with neither `free_dport` nor a probeable devres
/// release path: every `kfree`, one map lookup, then out unless it frees a tracked dport. A
/// raw tracepoint: 6.12's verifier refuses tp_btf reads of kfree's `const void *ptr`.
#[raw_tracepoint(tracepoint = "kfree")]
pub fn kfree(ctx: RawTracePointContext) -> i32 {
    cxl::on_kfree(&ctx);
    0
}

// The global lock hook, opt-in (`--lock-events global`): every mutex in the system pays a
// map lookup. By default lock events come from call sites in CXL code only (`site`).

#[fexit(function = "mutex_lock")]
pub fn mutex_lock_exit(ctx: FExitContext) -> i32 {
    mutex::on_lock_exit(&ctx, mutex::Acquired::Always);
    0
}

#[fexit(function = "mutex_lock_interruptible")]
pub fn mutex_lock_intr_exit(ctx: FExitContext) -> i32 {
    mutex::on_lock_exit(&ctx, mutex::Acquired::IfZero);
    0
}

#[fexit(function = "mutex_lock_killable")]
pub fn mutex_lock_kill_exit(ctx: FExitContext) -> i32 {
    mutex::on_lock_exit(&ctx, mutex::Acquired::IfZero);
    0
}

#[fexit(function = "mutex_trylock")]
pub fn mutex_trylock_exit(ctx: FExitContext) -> i32 {
    mutex::on_lock_exit(&ctx, mutex::Acquired::IfOne);
    0
}

#[fentry(function = "mutex_unlock")]
pub fn mutex_unlock_entry(ctx: FEntryContext) -> i32 {
    mutex::on_unlock_entry(&ctx);
    0
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
