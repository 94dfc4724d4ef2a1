//! `--kernel`: a stock kernel of the matrix by name, a kernel built here from source by name
//! (`7.2-src`), or the path of the user's own image; and which kernel a run boots once
//! `--kernel-deb`, `--modules` and `--patch` are taken into account.
use std::path::{Path, PathBuf};

use anyhow::bail;

use super::kernel::Source;
use crate::{
    debian::{self, StockKernel},
    source_kernel::{self, PatchOptions, SourceKernel},
};

/// What `--kernel` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelArg {
    /// A stock Debian kernel of the matrix (`6.1`, `6.12`, `7.2`).
    Stock(&'static StockKernel),
    /// A kernel of the matrix built here from source (`7.2-src`, docs/source-kernel.md).
    Built(&'static SourceKernel),
    /// The user's kernel image (bzImage); its modules come with `--modules`.
    Image(PathBuf),
}

impl KernelArg {
    /// The stock kernel `name` of the matrix, for runs made from code
    /// (`options.kernel = Some(KernelArg::stock("7.2")?)`).
    pub fn stock(name: &str) -> anyhow::Result<Self> {
        Ok(Self::Stock(debian::stock_kernel(name)?))
    }

    /// clap's parser for `--kernel`.
    pub fn parse(arg: &str) -> Result<Self, String> {
        Self::parse_with(arg, Path::is_file)
    }

    /// A matrix name wins over a file of the same name in the working directory (write
    /// `./6.1` for that); anything else must look like a path, so that a mistyped name is
    /// reported as one and not as a missing image.
    fn parse_with(arg: &str, is_file: impl Fn(&Path) -> bool) -> Result<Self, String> {
        if let Some(stock) = debian::STOCK_KERNELS.iter().find(|k| k.name == arg) {
            return Ok(Self::Stock(stock));
        }
        if let Some(built) = source_kernel::source_kernel(arg) {
            return Ok(Self::Built(built));
        }
        let path = Path::new(arg);
        if arg.contains('/') || is_file(path) {
            return Ok(Self::Image(path.to_owned()));
        }
        Err(format!("{arg:?} is neither a kernel of the matrix ({}) nor a kernel image file", names()))
    }
}

fn names() -> String {
    let stock = debian::STOCK_KERNELS.iter().map(|k| k.name);
    stock.chain(source_kernel::SOURCE_KERNELS.iter().map(|k| k.name)).collect::<Vec<_>>().join(", ")
}

/// `--kernel` help: the matrix and the default.
pub fn help() -> String {
    format!(
        "The kernel to boot: a stock Debian kernel by name, default {} ({}); a kernel built \
         here from source by name ({}; with --patch); or the path of your own kernel image \
         (bzImage), with --modules",
        debian::DEFAULT_KERNEL,
        debian::matrix_help(),
        source_kernel::matrix_help()
    )
}

/// The kernel a run boots, from `--kernel`, `--kernel-deb` and `--modules` (the stock
/// default when none is given).
pub fn source(kernel: Option<&KernelArg>, deb: Option<&Path>, modules: Option<&Path>) -> anyhow::Result<Source> {
    Ok(match (kernel, deb, modules) {
        (Some(_), Some(_), _) => {
            bail!("--kernel and --kernel-deb each name the kernel to boot: give one of them")
        }
        (None, Some(_), Some(_)) => {
            bail!("--modules goes with --kernel IMAGE: a --kernel-deb package brings its own modules")
        }
        (None, Some(deb), None) => Source::Deb(deb.to_owned()),
        (Some(KernelArg::Stock(stock)), None, Some(_)) => bail!(
            "--kernel {} is a stock kernel with its own modules: --modules goes only with \
             --kernel IMAGE (a path)",
            stock.name
        ),
        (Some(KernelArg::Stock(stock)), None, None) => Source::Stock(stock),
        (Some(KernelArg::Built(built)), None, Some(_)) => bail!(
            "--kernel {} is built here with its own modules: --modules goes only with --kernel \
             IMAGE (a path)",
            built.name
        ),
        (Some(KernelArg::Built(built)), None, None) => {
            Source::Built(source_kernel::Request { kernel: built, patches: Vec::new() })
        }
        (Some(KernelArg::Image(image)), None, Some(modules)) => {
            Source::Tree { image: image.clone(), modules: modules.to_owned() }
        }
        (Some(KernelArg::Image(image)), None, None) => bail!(
            "--kernel {} is a kernel image: it needs --modules DIR (its installed modules, \
             DIR/lib/modules/RELEASE); to boot a stock kernel name one of {}",
            image.display(),
            names()
        ),
        (None, None, Some(_)) => bail!("--modules needs --kernel IMAGE (the image they belong to)"),
        (None, None, None) => {
            return source(Some(&KernelArg::stock(debian::DEFAULT_KERNEL)?), None, None);
        }
    })
}

/// `source()` with the user's `--patch`es, which only a kernel built from source takes.
pub fn source_with_patches(
    kernel: Option<&KernelArg>,
    deb: Option<&Path>,
    modules: Option<&Path>,
    patches: &PatchOptions,
) -> anyhow::Result<Source> {
    let patches = patches.load()?;
    match source(kernel, deb, modules)? {
        Source::Built(request) => Ok(Source::Built(source_kernel::Request { patches, ..request })),
        other if patches.is_empty() => Ok(other),
        _ => bail!(
            "--patch changes the kernel's source, so it needs a kernel built from source: --kernel {}",
            source_kernel::SOURCE_KERNELS.iter().map(|k| k.name).collect::<Vec<_>>().join(" or --kernel ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(arg: &str, files: &[&str]) -> Result<KernelArg, String> {
        KernelArg::parse_with(arg, |p| files.iter().any(|f| Path::new(f) == p))
    }

    #[test]
    fn names_are_stock_kernels_and_paths_are_images() {
        for name in ["6.1", "6.12", "7.2"] {
            assert_eq!(parse(name, &[]).unwrap(), KernelArg::Stock(debian::stock_kernel(name).unwrap()));
        }
        // A name wins over a file of that name; ./NAME is the file.
        assert!(matches!(parse("6.1", &["6.1"]), Ok(KernelArg::Stock(_))));
        assert_eq!(parse("./6.1", &[]).unwrap(), KernelArg::Image("./6.1".into()));
        assert_eq!(parse("arch/x86/boot/bzImage", &[]).unwrap(), KernelArg::Image("arch/x86/boot/bzImage".into()));
        assert_eq!(parse("bzImage", &["bzImage"]).unwrap(), KernelArg::Image("bzImage".into()));
    }

    #[test]
    fn an_unknown_name_lists_the_matrix() {
        let err = parse("6.6", &[]).unwrap_err();
        assert!(err.contains("6.1, 6.12, 7.2, 7.2-src"), "{err}");
    }

    #[test]
    fn a_source_built_kernel_is_named_and_takes_patches() {
        let built = source_kernel::source_kernel("7.2-src").unwrap();
        assert_eq!(parse("7.2-src", &[]).unwrap(), KernelArg::Built(built));
        assert!(help().contains("7.2-src"), "--help lists it");
        let seed = PatchOptions { patches: vec!["seed".into()] };
        let patched = source_with_patches(Some(&KernelArg::Built(built)), None, None, &seed).unwrap();
        let Source::Built(request) = patched else { panic!("not a source build: {patched:?}") };
        assert_eq!(request.kernel, built);
        assert_eq!(request.patches.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["seed"]);
        // No patches: the same as source().
        assert_eq!(
            source_with_patches(Some(&KernelArg::Built(built)), None, None, &PatchOptions::default()).unwrap(),
            source(Some(&KernelArg::Built(built)), None, None).unwrap()
        );
        // A stock kernel cannot take a patch; a built one takes no --modules.
        let err = source_with_patches(Some(&KernelArg::stock("7.2").unwrap()), None, None, &seed).unwrap_err();
        assert!(err.to_string().contains("--kernel 7.2-src"), "{err}");
        let err = source(Some(&KernelArg::Built(built)), None, Some(Path::new("/k"))).unwrap_err();
        assert!(err.to_string().contains("own modules"), "{err}");
    }

    #[test]
    fn the_options_combine_into_one_source() {
        let stock = |n| KernelArg::stock(n).unwrap();
        let image = KernelArg::Image("/k/bzImage".into());
        let dir = Path::new("/k/lib/modules/7.2.0");
        let deb = Path::new("/k/linux-image.deb");
        assert_eq!(
            source(None, None, None).unwrap(),
            Source::Stock(debian::stock_kernel(debian::DEFAULT_KERNEL).unwrap())
        );
        assert_eq!(
            source(Some(&stock("7.2")), None, None).unwrap(),
            Source::Stock(debian::stock_kernel("7.2").unwrap())
        );
        assert_eq!(
            source(Some(&image), None, Some(dir)).unwrap(),
            Source::Tree { image: "/k/bzImage".into(), modules: dir.to_owned() }
        );
        assert_eq!(source(None, Some(deb), None).unwrap(), Source::Deb(deb.to_owned()));
        let err = |k: Option<&KernelArg>, d: Option<&Path>, m: Option<&Path>| source(k, d, m).unwrap_err().to_string();
        assert!(err(Some(&stock("6.1")), None, Some(dir)).contains("stock kernel"));
        assert!(err(Some(&image), None, None).contains("needs --modules"));
        assert!(err(None, None, Some(dir)).contains("needs --kernel IMAGE"));
        assert!(err(Some(&stock("6.1")), Some(deb), None).contains("give one"));
        assert!(err(None, Some(deb), Some(dir)).contains("--kernel IMAGE"));
    }
}
