//! The kernel side's rare failures: a tracking map that was full, a kernel read that failed,
//! an event the ring buffer could not take or whose stack could not be captured. Each one is
//! counted (`Counter`, in every run's summary) and, with the `diagnostics` feature, told
//! through aya-log with what failed (which map, which address, which error), for
//! `tracer run -v`.
//!
//! Each is a function of its own, called only on a failure branch, so a probe hit that fails
//! nothing runs none of it (`cargo xtask bench --hit-path-only` counts, against the build
//! without the feature, where these count inline as before diagnostics existed). They are global
//! functions (exported, build.rs): the verifier checks each one once, on its own, instead of
//! on every path of every program that calls it, which took `site` past 6.1's million
//! instructions with the logging on. A global function takes and returns scalars only.
#[cfg(feature = "diagnostics")]
use aya_log_ebpf::warn;
use tracer_common::{Counter, EventKind};

use crate::emit::count;

/// The tracking maps of `main.rs`, for `map_full`.
#[derive(Copy, Clone)]
pub enum Map {
    Dports,
    Loaded,
    Containers,
    NotContainers,
    Locks,
    Blocks,
    PendingXa,
    PendingLock,
    PendingHost,
    AllocHost,
}

/// Every `Map`, at its own number: how a global function, given the number, gets it back.
#[cfg(feature = "diagnostics")]
const MAPS: [Map; 10] = [
    Map::Dports,
    Map::Loaded,
    Map::Containers,
    Map::NotContainers,
    Map::Locks,
    Map::Blocks,
    Map::PendingXa,
    Map::PendingLock,
    Map::PendingHost,
    Map::AllocHost,
];

/// Kernel memory the programs read, for `read_failed`.
#[derive(Copy, Clone)]
pub enum Read {
    /// `port->uport_dev` or `port->dev.parent` of a dport being tracked.
    PortDevices,
    /// `dport->port` of a dport returned by its registration.
    DportPort,
    /// The index `xa_find()` wrote back.
    XaFindIndex,
    /// `mutex->owner` of a tracked lock.
    MutexOwner,
    /// The registration function's return value (`bpf_get_func_ret`).
    FuncRet,
}

/// Every `Read`, at its own number.
#[cfg(feature = "diagnostics")]
const READS: [Read; 5] = [Read::PortDevices, Read::DportPort, Read::XaFindIndex, Read::MutexOwner, Read::FuncRet];

// Each table holds every variant at its own number, or a diagnostic would name the wrong one.
#[cfg(feature = "diagnostics")]
const _: () = {
    let mut i = 0;
    while i < MAPS.len() {
        assert!(MAPS[i] as usize == i);
        i += 1;
    }
    let mut i = 0;
    while i < READS.len() {
        assert!(READS[i] as usize == i);
        i += 1;
    }
};

/// `map` had no room for `key`: what it tracks is not tracked.
#[inline(always)]
pub fn map_full(map: Map, key: u64) {
    #[cfg(feature = "diagnostics")]
    tracer_diag_map_full(map as u32, as_scalar(key));
    #[cfg(not(feature = "diagnostics"))]
    let _ = (map, key, count(Counter::DropMapFull));
}

/// A kernel read at `addr` failed with `err`.
#[inline(always)]
pub fn read_failed(what: Read, addr: u64, err: i64) {
    #[cfg(feature = "diagnostics")]
    tracer_diag_read_failed(what as u32, as_scalar(addr), err);
    #[cfg(not(feature = "diagnostics"))]
    let _ = (what, addr, err);
}

/// `value` as the verifier sees a number, not a pointer: in an fentry or fexit program an
/// argument is a typed pointer (`struct cxl_port *`), and so is an address computed from it,
/// which a global function refuses. Read back from the stack, it is a number. On the failure
/// path only.
#[cfg(feature = "diagnostics")]
#[inline(always)]
fn as_scalar(value: u64) -> u64 {
    // SAFETY: reads the 8 bytes of a local.
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(&raw const value) }.unwrap_or(0)
}

/// The ring buffer could not take an event of `kind`: `full`, or busy on another CPU.
#[inline(always)]
pub fn event_lost(kind: EventKind, full: bool) {
    #[cfg(feature = "diagnostics")]
    tracer_diag_event_lost(kind as u32, u32::from(full));
    #[cfg(not(feature = "diagnostics"))]
    let _ = (kind, count(if full { Counter::DropRingFull } else { Counter::DropRingBusy }));
}

/// `bpf_get_stack` failed with `err` for an event of `kind`, sent without its stack.
#[inline(always)]
pub fn stack_lost(kind: EventKind, err: i64) {
    #[cfg(feature = "diagnostics")]
    tracer_diag_stack_lost(kind as u32, err);
    #[cfg(not(feature = "diagnostics"))]
    let _ = (kind, err, count(Counter::StackLost));
}

// The global functions, only with the `diagnostics` feature: without it, the functions above
// count inline as the kernel side did before it had diagnostics, which is what the bench
// compares a hit against. Their names are in build.rs's export list. In `.text` with the
// other subprograms, although cold (LLVM puts cold code in `.text.unlikely.`): aya links only
// `.text` functions into a program correctly; from another section their BTF records were
// matched to the wrong functions (6.1 took a static subprogram for a global one).

#[cfg(feature = "diagnostics")]
#[cold]
#[inline(never)]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text")]
pub extern "C" fn tracer_diag_map_full(map: u32, key: u64) -> i32 {
    count(Counter::DropMapFull);
    match MAPS.get(map as usize) {
        Some(Map::Dports) => warn!((), "map DPORTS full: dport {:x} not tracked", key),
        Some(Map::Loaded) => warn!((), "map LOADED full: dport {:x} loaded by this thread not remembered", key),
        Some(Map::Containers) => warn!((), "map CONTAINERS full: dports xarray {:x} not remembered", key),
        Some(Map::NotContainers) => warn!((), "map NOT_CONTAINERS full: xarray {:x} not remembered", key),
        Some(Map::Locks) => warn!((), "map LOCKS full: mutex {:x} not tracked", key),
        Some(Map::Blocks) => warn!((), "map BLOCKS full: free of block {:x} will not be seen", key),
        Some(Map::PendingXa) => warn!((), "map PENDING_XA full: xarray call of thread {} lost", key),
        Some(Map::PendingLock) => warn!((), "map PENDING_LOCK full: lock call of thread {} lost", key),
        Some(Map::PendingHost) => warn!((), "map PENDING_HOST full: devres host of thread {} lost", key),
        Some(Map::AllocHost) => warn!((), "map ALLOC_HOST full: devres host of allocation {:x} lost", key),
        None => {}
    }
    0
}

#[cfg(feature = "diagnostics")]
#[cold]
#[inline(never)]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text")]
pub extern "C" fn tracer_diag_read_failed(what: u32, addr: u64, err: i64) -> i32 {
    match READS.get(what as usize) {
        Some(Read::PortDevices) => {
            warn!((), "cannot read the devices of port {:x} (error {}): dport not tracked", addr, err)
        }
        Some(Read::DportPort) => warn!((), "cannot read the port of registered dport {:x} (error {})", addr, err),
        Some(Read::XaFindIndex) => warn!((), "cannot read the index xa_find() wrote at {:x} (error {})", addr, err),
        Some(Read::MutexOwner) => {
            warn!((), "cannot read the owner of mutex {:x} (error {}): held unknown", addr, err)
        }
        Some(Read::FuncRet) => warn!((), "cannot read the return value of the dport registration (error {})", err),
        None => {}
    }
    0
}

#[cfg(feature = "diagnostics")]
#[cold]
#[inline(never)]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text")]
pub extern "C" fn tracer_diag_event_lost(kind: u32, full: u32) -> i32 {
    count(if full != 0 { Counter::DropRingFull } else { Counter::DropRingBusy });
    if full != 0 {
        warn!((), "ring buffer full: event of kind {} lost", kind);
    } else {
        warn!((), "ring buffer busy on another CPU: event of kind {} lost", kind);
    }
    0
}

#[cfg(feature = "diagnostics")]
#[cold]
#[inline(never)]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text")]
pub extern "C" fn tracer_diag_stack_lost(kind: u32, err: i64) -> i32 {
    count(Counter::StackLost);
    warn!((), "kernel stack of an event of kind {} not captured (error {})", kind, err);
    0
}
