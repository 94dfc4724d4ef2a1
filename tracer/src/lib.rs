//! tracer: rebuilds CXL dport lock discipline from kernel events and reports violations.
//!
//! The library holds everything that judges events and reads a kernel without changing it:
//! the event model, the formats, the engine and the reports (all of which run on a recorded
//! trace anywhere), and what the tracer learns about a kernel before probing it (its
//! profile, BTF, symbols, code and the sites to probe: `kernel`, `plan`). The binary adds
//! the CLI and everything that needs root and changes the running kernel: preflight checks,
//! discovery of the live kernel, loading and attaching the eBPF programs (`probe`), and the
//! live session.
pub mod analysis;
pub mod coverage;
pub mod decode;
pub mod engine;
pub mod event;
pub mod format;
pub mod fuzzing;
pub mod intern;
pub mod kernel;
pub mod known;
pub mod plan;
pub mod resolve;
pub mod sink;
pub mod source;
pub mod summary;
pub mod symbolize;
pub mod synth;
pub mod timeline;
