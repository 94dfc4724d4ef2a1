//! What the tracer learns about the running kernel before attaching, without changing it:
//! its profile (what differs between kernels, every CXL name), BTF (offsets, use sites,
//! layouts), symbols of loaded modules, kernel text through /proc/kcore, and the call and
//! deref sites in CXL code.
pub mod btf;
pub mod callsites;
pub mod derefs;
pub mod globals;
pub mod kcore;
pub mod layout;
pub mod modules;
pub mod profile;
