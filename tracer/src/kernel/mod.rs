//! What the tracer learns about the running kernel before attaching: BTF offsets and use
//! sites, kernel text through /proc/kcore, and the call sites in CXL code.
pub mod btf;
pub mod callsites;
pub mod derefs;
pub mod kcore;
pub mod profile;
