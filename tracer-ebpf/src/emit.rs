//! Reserves a record, fills the header, submits it or counts the drop by its reason.
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_RING_SIZE},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_get_stack, bpf_ktime_get_ns,
        generated::bpf_get_current_comm,
    },
    maps::ring_buf::RingBufEntry,
};
use tracer_common::{Counter, EventHeader, EventKind, FLAG_STACK_LOST, MAX_STACK_FRAMES, Payload, Record, ShortRecord};

use crate::{COUNTS, EVENTS, SITE_HITS, SITE_REPORTS, diag};

pub fn count(counter: Counter) {
    if let Some(slot) = COUNTS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's slot; per-CPU maps are not shared between CPUs.
        unsafe { *slot += 1 };
    }
}

fn bump(map: &aya_ebpf::maps::PerCpuArray<u64>, index: u64) {
    if let Some(slot) = map.get_ptr_mut(index as u32) {
        // SAFETY: this CPU's slot; per-CPU maps are not shared between CPUs.
        unsafe { *slot += 1 };
    }
}

/// A site's probe ran.
pub fn site_hit(index: u64) {
    bump(&SITE_HITS, index);
}

/// A site reported a tracked dport.
pub fn site_report(index: u64) {
    bump(&SITE_REPORTS, index);
}

/// Reservations tried before an event is counted lost. A kprobe that fires on an int3 runs
/// in NMI-like context, where `bpf_ringbuf_reserve` only tries the ring buffer's lock: while
/// another CPU holds it for its own reservation (a few instructions), the attempt fails at
/// once although the ring has room. Trying again rides that out.
const RESERVE_TRIES: u32 = 64;

/// A ring-buffer entry for a `T`, or the loss of an event of `kind` counted by its reason.
fn reserve<T: 'static>(kind: EventKind) -> Option<RingBufEntry<T>> {
    for _ in 0..RESERVE_TRIES {
        if let Some(entry) = EVENTS.reserve::<T>(0) {
            return Some(entry);
        }
    }
    // Full when the record (and its 8-byte header) no longer fits behind the unread data.
    let unread = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let size = EVENTS.query(BPF_RB_RING_SIZE as u64);
    diag::event_lost(kind, unread + size_of::<T>() as u64 + 8 > size);
    None
}

/// Whether to capture the kernel stack with the event.
#[derive(Copy, Clone, PartialEq, Eq)]
pub enum Stack {
    With,
    Without,
}

/// Fills the header of a reserved record in place, field by field: building it on the stack
/// and copying it in (with `bpf_get_current_comm()`'s zeroed array, a memset call) took the
/// deepest call chain of `site` past the verifier's 512 bytes of stack on 6.1.
///
/// # Safety
/// `header` points to reserved ring-buffer memory for an `EventHeader`.
unsafe fn fill_header(header: *mut EventHeader, kind: EventKind, flags: u32, stack_bytes: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the caller's pointer; every field is written; the helpers have no preconditions
    // but the comm buffer, which is the record's own 16 bytes.
    unsafe {
        (&raw mut (*header).kind).write(kind as u32);
        (&raw mut (*header).flags).write(flags);
        (&raw mut (*header).ts_ns).write(bpf_ktime_get_ns());
        (&raw mut (*header).cpu).write(bpf_get_smp_processor_id());
        (&raw mut (*header).tid).write(pid_tgid as u32);
        (&raw mut (*header).tgid).write((pid_tgid >> 32) as u32);
        (&raw mut (*header).stack_bytes).write(stack_bytes);
        let comm = (&raw mut (*header).comm).cast::<u8>();
        if bpf_get_current_comm(comm.cast(), 16) != 0 {
            // No name: zeros, not the ring's old bytes.
            comm.cast::<[u64; 2]>().write_unaligned([0; 2]);
        }
    }
}

/// Sends one event. `payload` is the kind's payload, written through the matching member.
/// Events without a stack take a `ShortRecord` of the ring buffer, the others a `Record`.
/// Two functions behind it, not one branching on `stack`: which of the two paths the
/// compiler laid out first varied as unrelated code changed (the diagnostics), and a hit
/// then ran a jump more (`cargo xtask bench --hit-path-only`).
#[inline(always)]
pub fn emit<C: EbpfContext>(ctx: &C, kind: EventKind, flags: u32, stack: Stack, payload: Payload) {
    match stack {
        Stack::With => emit_with_stack(ctx, kind, flags, payload),
        Stack::Without => emit_short(kind, flags, payload),
    }
}

/// An event without a stack.
#[inline(never)]
fn emit_short(kind: EventKind, flags: u32, payload: Payload) {
    let Some(mut entry) = reserve::<ShortRecord>(kind) else {
        return;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points to reserved ring-buffer memory of a ShortRecord.
    unsafe {
        fill_header(&raw mut (*record).header, kind, flags, 0);
        (&raw mut (*record).payload).write(payload);
    }
    entry.submit(0);
    count(Counter::Emitted);
}

/// An event with the kernel stack of `ctx`.
#[inline(never)]
fn emit_with_stack<C: EbpfContext>(ctx: &C, kind: EventKind, flags: u32, payload: Payload) {
    let Some(mut entry) = reserve::<Record>(kind) else {
        return;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points to reserved ring-buffer memory of a whole Record.
    let written =
        unsafe { bpf_get_stack(ctx.as_ptr(), (&raw mut (*record).stack).cast(), (MAX_STACK_FRAMES * 8) as u32, 0) };
    let (stack_bytes, flags) = match written {
        0.. => (written as u32 & !7, flags),
        _ => {
            diag::stack_lost(kind, written);
            (0, flags | FLAG_STACK_LOST)
        }
    };
    // SAFETY: as above; the payload is plain data.
    unsafe {
        fill_header(&raw mut (*record).header, kind, flags, stack_bytes);
        (&raw mut (*record).payload).write(payload);
    }
    entry.submit(0);
    count(Counter::Emitted);
}
