// Rebuild when the linker changes: building this crate needs `bpf-linker`, which cargo does not
// know about (`cargo xtask setup` installs it).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`"),
    }
    // The diagnostics are global functions (src/diag.rs): bpf-linker keeps exported symbols
    // global, and the verifier then checks each once.
    if std::env::var_os("CARGO_FEATURE_DIAGNOSTICS").is_some() {
        println!(
            "cargo:rustc-link-arg-bins=--export=tracer_diag_map_full,tracer_diag_read_failed,tracer_diag_event_lost,tracer_diag_stack_lost"
        );
    }
}
