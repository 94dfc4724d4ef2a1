// Rebuild when the linker changes: building this crate needs `bpf-linker`, which cargo does not
// know about (`cargo xtask setup` installs it).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`"),
    }
}
