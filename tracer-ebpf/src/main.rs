#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::{PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use tracer_common::{COUNTERS, Counter};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

#[map]
static COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS as u32, 0);

#[btf_tracepoint(function = "kfree")]
pub fn kfree(_ctx: BtfTracePointContext) -> i32 {
    if let Some(slot) = COUNTS.get_ptr_mut(Counter::Emitted as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *slot += 0 };
    }
    let _ = &EVENTS;
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
