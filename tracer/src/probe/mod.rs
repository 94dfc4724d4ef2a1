//! Putting the plan into the kernel: tracefs kprobes (`kprobe`), the eBPF object loaded and
//! every program attached (`programs`), and a reloaded module's sites found again (`rescan`).
pub mod kprobe;
pub mod programs;
pub mod rescan;
