//! tracer: rebuilds CXL dport lock discipline from kernel events and reports violations.
//!
//! The library holds everything that does not need a kernel: the event model, the formats,
//! the engine and the reports. The binary adds the CLI and the live kernel side.
pub mod analysis;
pub mod coverage;
pub mod decode;
pub mod engine;
pub mod event;
pub mod format;
pub mod fuzzing;
pub mod intern;
pub mod kernel;
pub mod probe;
pub mod resolve;
pub mod sink;
pub mod source;
pub mod summary;
pub mod symbolize;
pub mod synth;
pub mod timeline;
