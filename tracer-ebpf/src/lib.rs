#![no_std]
// Empty library target: lets `tracer` depend on this crate so cargo rebuilds the eBPF object
// when its sources change (the object itself is built by `tracer/build.rs`).
