//! What to probe on this kernel, and the kprobe attachment mechanism.
pub mod attach;
pub mod plan;
