//! Reserves a record, fills the header, submits it or counts the drop.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_get_stack, bpf_ktime_get_ns},
};
use tracer_common::{Counter, EventHeader, EventKind, FLAG_STACK_LOST, MAX_STACK_FRAMES, Payload, Record, ShortRecord};

use crate::{COUNTS, EVENTS};

pub fn count(counter: Counter) {
    if let Some(slot) = COUNTS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's slot; per-CPU maps are not shared between CPUs.
        unsafe { *slot += 1 };
    }
}

/// Whether to capture the kernel stack with the event.
#[derive(Copy, Clone, PartialEq, Eq)]
pub enum Stack {
    With,
    Without,
}

fn header(kind: EventKind, flags: u32) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        kind: kind as u32,
        flags,
        // SAFETY: helpers without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cpu: unsafe { bpf_get_smp_processor_id() },
        tid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        stack_bytes: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

/// Sends one event. `payload` is the kind's payload, written through the matching member.
/// Events without a stack take a `ShortRecord` of the ring buffer, the others a `Record`.
pub fn emit<C: EbpfContext>(ctx: &C, kind: EventKind, flags: u32, stack: Stack, payload: Payload) {
    if stack == Stack::Without {
        let Some(mut entry) = EVENTS.reserve::<ShortRecord>(0) else {
            count(Counter::DropRingFull);
            return;
        };
        let record = entry.as_mut_ptr();
        // SAFETY: `record` points to reserved ring-buffer memory of a ShortRecord.
        unsafe {
            (&raw mut (*record).header).write(header(kind, flags));
            (&raw mut (*record).payload).write(payload);
        }
        entry.submit(0);
        count(Counter::Emitted);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<Record>(0) else {
        count(Counter::DropRingFull);
        return;
    };
    let record = entry.as_mut_ptr();
    let mut header = header(kind, flags);
    // SAFETY: `record` points to reserved ring-buffer memory of a whole Record.
    let written = unsafe {
        bpf_get_stack(ctx.as_ptr(), (&raw mut (*record).stack).cast(), (MAX_STACK_FRAMES * 8) as u32, 0)
    };
    if written >= 0 {
        header.stack_bytes = written as u32 & !7;
    } else {
        header.flags |= FLAG_STACK_LOST;
        count(Counter::StackLost);
    }
    // SAFETY: as above; header and payload are plain data.
    unsafe {
        (&raw mut (*record).header).write(header);
        (&raw mut (*record).payload).write(payload);
    }
    entry.submit(0);
    count(Counter::Emitted);
}
