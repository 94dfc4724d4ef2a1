//! Kernels built here from Debian's source, as kernels of the guest harness's matrix
//! (`--kernel 7.2-src`): the CXL core as modules, cxl_test, region commits in a VM, and the
//! user's patches (`--patch FILE`, `--patch seed`). See docs/source-kernel.md.
//!
//! Debian's kernels build the CXL core into vmlinux (`CONFIG_CXL_BUS=y`), which
//! tools/testing/cxl refuses, and leave `CONFIG_CXL_REGION_INVALIDATION_TEST` off, so a
//! region cannot be committed in QEMU. A CXL developer builds their own kernel; this builds
//! the same 7.2.13 source as the stock 7.2 kernel with `make defconfig` and the project's
//! fragment (`xtask/kernel/7.2-src.config`), in the Debian sid chroot the fixtures make
//! (gcc-16), cached by a hash of what goes in.
mod build;
mod config;
mod patches;
mod progress;
mod steps;
mod tree;

pub use build::build;
pub use patches::Patch;

/// Everything the source-kernel builds keep (docs/source-kernel.md, "What is built").
fn cache() -> std::path::PathBuf {
    crate::util::cache_dir().join("source-kernels")
}

/// A kernel of the matrix built from source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceKernel {
    /// The name `--kernel` takes.
    pub name: &'static str,
    /// The stock kernel whose source package, version and compiler (the sid chroot) it uses.
    pub base: &'static str,
    /// The config fragment applied on top of `make defconfig`, and where it lives.
    pub fragment_file: &'static str,
    pub fragment: &'static str,
    /// Patches every build applies first (file, text): fixes the source needs to build.
    pub recipe_patches: &'static [(&'static str, &'static str)],
    /// What it is, for `--help` and messages.
    pub what: &'static str,
}

pub const SOURCE_KERNELS: &[SourceKernel] = &[SourceKernel {
    name: "7.2-src",
    base: "7.2",
    fragment_file: "xtask/kernel/7.2-src.config",
    fragment: include_str!("../kernel/7.2-src.config"),
    recipe_patches: &[(
        "xtask/patches/cxl-test-type2-param.patch",
        include_str!("../patches/cxl-test-type2-param.patch"),
    )],
    what: "Debian's 7.2.13 source built here: the CXL core as modules, cxl_test, region commits; \
           built on first use (15 to 20 minutes on 2 cores), then cached",
}];

/// The source-built kernel called `name`.
pub fn source_kernel(name: &str) -> Option<&'static SourceKernel> {
    SOURCE_KERNELS.iter().find(|k| k.name == name)
}

/// `--help` text listing the source-built kernels.
pub fn matrix_help() -> String {
    SOURCE_KERNELS.iter().map(|k| format!("{} = {}", k.name, k.what)).collect::<Vec<_>>().join("; ")
}

/// A build to make: the kernel and the user's patches, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kernel: &'static SourceKernel,
    pub patches: Vec<Patch>,
}

/// `--patch`, for any command that builds a kernel from source (`vm run` flattens it in).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PatchOptions {
    /// A kernel patch applied with `patch -p1 --fuzz=0` before a source-built kernel
    /// (--kernel 7.2-src) is built; repeatable, applied in order, part of the build's cache
    /// key. `seed` names the seed thread's v2 patch (xtask/patches/seed-v2.patch).
    #[arg(long = "patch", value_name = "FILE|seed")]
    pub patches: Vec<String>,
}

impl PatchOptions {
    pub fn load(&self) -> anyhow::Result<Vec<Patch>> {
        self.patches.iter().map(|spec| Patch::load(spec)).collect()
    }
}

#[derive(clap::Subcommand)]
pub enum KernelCommand {
    /// Build a kernel from source (cached; the first build takes 15 to 20 minutes on 2 cores) and print
    /// where its image, modules and cxl_test modules are.
    Build(BuildOptions),
}

#[derive(clap::Args)]
pub struct BuildOptions {
    /// The kernel to build
    #[arg(
        long,
        value_name = "NAME",
        default_value = SOURCE_KERNELS[0].name,
        value_parser = clap::builder::PossibleValuesParser::new(SOURCE_KERNELS.iter().map(|k| k.name)),
        long_help = format!("The kernel to build: {}", matrix_help()),
    )]
    pub kernel: String,
    #[command(flatten)]
    pub patches: PatchOptions,
}

pub fn command(command: KernelCommand) -> anyhow::Result<()> {
    match command {
        KernelCommand::Build(options) => {
            let kernel = source_kernel(&options.kernel).expect("clap checks the name");
            let built = build(kernel, &options.patches.load()?)?;
            built.print();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, process::Command};

    /// The guest check of docs/source-kernel.md is run by hand (`-- xtask/kernel/check-guest.sh`),
    /// so nothing else would notice it break: shellcheck it as the harness's own guest shell.
    #[test]
    fn the_guest_check_passes_shellcheck() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel");
        let output = Command::new("shellcheck")
            .args(["--shell=dash", "--external-sources", "--source-path=SCRIPTDIR", "--format=gcc"])
            .arg(dir.join("check-guest.sh"))
            .output()
            .unwrap_or_else(|err| panic!("install shellcheck (cargo xtask setup): cannot run shellcheck: {err}"));
        assert!(
            output.status.success(),
            "shellcheck finds problems in xtask/kernel/check-guest.sh:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
