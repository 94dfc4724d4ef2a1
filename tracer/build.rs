//! Builds the eBPF object (`tracer-ebpf`) with the nightly toolchain and bpf-linker, as
//! aya-build does it; the loader embeds it from OUT_DIR.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let package = metadata
        .packages
        .into_iter()
        .find(|package| package.name.as_str() == "tracer-ebpf")
        .ok_or_else(|| anyhow!("tracer-ebpf package not found in the workspace"))?;
    let root_dir = package.manifest_path.parent().ok_or_else(|| anyhow!("no parent for {}", package.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "tracer-ebpf", root_dir: root_dir.as_str(), ..Default::default() }],
        aya_build::Toolchain::Nightly,
    )
    .context("building tracer-ebpf failed; `cargo xtask setup` installs what it needs")
}
