//! The stock Debian kernels of the matrix (README, "The kernel matrix") and where their packages come from.
//!
//! Two of them are in the host's own suite (bookworm): `apt-get download` fetches them with
//! the host's apt configuration. 7.2 is only in `sid`, which this machine reaches through a
//! private apt configuration under the project's cache (its own sources list, lists, cache
//! and an empty dpkg status), so the host's apt sources are never changed.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};

use crate::{
    util::{self, cache_dir},
    vm::expect::{self, CoverageFloor, Expected},
};

/// Where a package is fetched from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// The host's own apt sources (Debian 12 bookworm and its security suite).
    Host,
    /// Debian `sid`, through the private apt configuration.
    Sid,
}

impl Suite {
    pub fn describe(self) -> &'static str {
        match self {
            Suite::Host => "the host's apt sources (Debian bookworm)",
            Suite::Sid => "Debian sid (a private apt configuration under ~/.cache/tracer/apt-sid)",
        }
    }
}

/// One stock Debian kernel of the matrix.
#[derive(Debug, PartialEq, Eq)]
pub struct StockKernel {
    /// The name `--kernel` takes.
    pub name: &'static str,
    /// `uname -r`.
    pub release: &'static str,
    /// The upstream version its source package holds.
    pub version: &'static str,
    pub suite: Suite,
    /// Packages unpacked together into one tree: the image (vmlinuz) and the modules, and
    /// for 7.2 the base package with the config and `modules.builtin`.
    pub image_packages: &'static [&'static str],
    pub headers_package: &'static str,
    pub source_package: &'static str,
    /// The compiler Debian built it with (out-of-tree modules must use the same).
    pub compiler: &'static str,
    /// What it is, for `--help` and messages.
    pub what: &'static str,
    /// The seed's read-side fix for its `drivers/cxl/mem.c`: a header that explains it, then
    /// a `-p1` diff (docs/fixtures.md).
    pub fixed_cxl_mem: &'static str,
    /// What the tracer reports on it under the hotplug workloads (vm/expect.rs says why,
    /// row by row; docs/kernels.md from the source).
    pub expected: &'static [Expected],
    /// The rw_semaphores a region attach holds, by their names on this kernel; None where
    /// `cxl_region_attach()` never dereferences the root dport (6.1).
    pub region_rwsems: Option<&'static [&'static str]>,
    /// What the region case reached when it was written: a run below it lost reach.
    pub region_floor: CoverageFloor,
}

/// The kernel matrix, oldest first (README, "The kernel matrix").
pub const STOCK_KERNELS: &[StockKernel] = &[
    StockKernel {
        name: "6.1",
        release: "6.1.0-57-amd64",
        version: "6.1.192",
        suite: Suite::Host,
        image_packages: &["linux-image-6.1.0-57-amd64-unsigned"],
        headers_package: "linux-headers-6.1.0-57-amd64",
        source_package: "linux-source-6.1",
        compiler: "gcc-12",
        what: "Debian 12's default kernel",
        fixed_cxl_mem: include_str!("../fixtures/cxl-mem-fixed-6.1.patch"),
        expected: expect::KERNEL_6_1,
        region_rwsems: None,
        // Measured 2026-12-06 (region-traced, 2 cycles), as the two below.
        region_floor: CoverageFloor { load: 5, uses: 2, deref: 12 },
    },
    StockKernel {
        name: "6.12",
        release: "6.12.117+deb12-amd64",
        version: "6.12.117",
        suite: Suite::Host,
        image_packages: &["linux-image-6.12.117+deb12-amd64-unsigned"],
        headers_package: "linux-headers-6.12.117+deb12-amd64",
        source_package: "linux-source-6.12",
        compiler: "gcc-12",
        what: "Debian 12's backported kernel",
        fixed_cxl_mem: include_str!("../fixtures/cxl-mem-fixed-6.12.patch"),
        expected: expect::KERNEL_6_12,
        region_rwsems: Some(&["cxl_region_rwsem", "cxl_dpa_rwsem"]),
        region_floor: CoverageFloor { load: 4, uses: 4, deref: 36 },
    },
    StockKernel {
        name: "7.2",
        release: "7.2.13+deb14-amd64",
        version: "7.2.13",
        suite: Suite::Sid,
        image_packages: &[
            "linux-binary-unsigned-7.2.13+deb14-amd64",
            "linux-modules-7.2.13+deb14-amd64",
            "linux-base-7.2.13+deb14-amd64",
        ],
        headers_package: "linux-headers-7.2.13+deb14-amd64",
        source_package: "linux-source-7.2",
        compiler: "gcc-16",
        what: "Debian sid's kernel, the one the seed thread's patch is written against",
        fixed_cxl_mem: include_str!("../fixtures/cxl-mem-fixed-7.2.patch"),
        expected: expect::KERNEL_7_2,
        region_rwsems: Some(&["cxl_rwsem.region", "cxl_rwsem.dpa"]),
        region_floor: CoverageFloor { load: 6, uses: 8, deref: 35 },
    },
];

/// The harness's kernel when none is named.
pub const DEFAULT_KERNEL: &str = "6.12";

/// The kernel of the matrix called `name`.
pub fn stock_kernel(name: &str) -> anyhow::Result<&'static StockKernel> {
    STOCK_KERNELS.iter().find(|k| k.name == name).with_context(|| {
        format!(
            "no stock kernel {name:?}: the matrix has {}",
            STOCK_KERNELS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
        )
    })
}

/// `--help` text listing the matrix.
pub fn matrix_help() -> String {
    STOCK_KERNELS.iter().map(|k| format!("{} = {} ({})", k.name, k.release, k.what)).collect::<Vec<_>>().join("; ")
}

/// The private apt configuration for sid.
pub struct SidApt {
    root: PathBuf,
}

/// Lists older than this are refreshed before a download (sid moves daily).
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

impl SidApt {
    pub fn new() -> SidApt {
        SidApt { root: cache_dir().join("apt-sid") }
    }

    /// apt options that make apt use only this configuration: its sources list, its lists,
    /// its package cache, and an empty dpkg status (nothing is ever installed through it).
    /// The sid Release served here is past its Valid-Until date, hence the last option.
    pub fn options(&self) -> Vec<String> {
        vec![
            format!("-oDir::Etc::SourceList={}", self.root.join("sources.list").display()),
            "-oDir::Etc::SourceParts=/dev/null".into(),
            format!("-oDir::State::Lists={}", self.root.join("lists").display()),
            format!("-oDir::Cache={}", self.root.join("cache").display()),
            "-oDir::State::status=/dev/null".into(),
            "-oAcquire::Check-Valid-Until=false".into(),
            "-oAPT::Sandbox::User=root".into(),
        ]
    }

    /// Writes the sources list (the Debian mirror the host already uses, suite sid) and
    /// refreshes the lists when they are missing or older than a day.
    pub fn prepare(&self) -> anyhow::Result<()> {
        // One apt-get update at a time: apt's own lock on the lists fails, it does not wait.
        let _lock = util::lock_file(&self.root.join("prepare.lock"), "debian: another update of the sid lists")?;
        for dir in ["lists/partial", "cache/archives/partial"] {
            let dir = self.root.join(dir);
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mirror = host_debian_mirror()?;
        let sources = format!("deb {mirror} sid main\n");
        let sources_path = self.root.join("sources.list");
        let changed = fs::read_to_string(&sources_path).ok().as_deref() != Some(sources.as_str());
        if changed {
            fs::write(&sources_path, &sources).with_context(|| format!("writing {}", sources_path.display()))?;
        }
        let stamp = self.root.join("lists/updated");
        let fresh = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < LISTS_MAX_AGE);
        if changed || !fresh {
            println!("debian: updating the sid package lists ({mirror}, Valid-Until not checked)");
            util::output(Command::new("apt-get").args(self.options()).args(["update", "-q"])).with_context(|| {
                format!(
                    "apt-get update of Debian sid from {mirror} failed (the private configuration in {})",
                    self.root.display()
                )
            })?;
            fs::write(&stamp, b"").with_context(|| format!("writing {}", stamp.display()))?;
        }
        Ok(())
    }
}

/// The Debian mirror the host's apt sources use (deb822 `.sources` or one-line format).
pub fn host_debian_mirror() -> anyhow::Result<String> {
    let mut texts = vec![fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.filter_map(Result::ok).map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            texts.push(fs::read_to_string(path).unwrap_or_default());
        }
    }
    texts
        .iter()
        .find_map(|text| debian_mirror_in(text))
        .context("no Debian mirror in the host's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d): sid is fetched from the same mirror")
}

/// The first mirror of the main Debian archive (not -security) named in `text`.
fn debian_mirror_in(text: &str) -> Option<String> {
    let is_archive = |uri: &str| uri.trim_end_matches('/').ends_with("/debian");
    for line in text.lines().map(str::trim) {
        if let Some(uris) = line.strip_prefix("URIs:") {
            if let Some(uri) = uris.split_whitespace().find(|u| is_archive(u)) {
                return Some(uri.trim_end_matches('/').to_owned());
            }
        } else if let Some(rest) = line.strip_prefix("deb ") {
            let uri = rest.split_whitespace().find(|w| !w.starts_with('['))?;
            if is_archive(uri) {
                return Some(uri.trim_end_matches('/').to_owned());
            }
        }
    }
    None
}

/// Downloads `package` from `suite` into `dir` (an existing directory) and returns the .deb.
pub fn download(suite: Suite, package: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let mut cmd = Command::new("apt-get");
    if suite == Suite::Sid {
        let sid = SidApt::new();
        sid.prepare()?;
        cmd.args(sid.options());
    }
    cmd.args(["download", "-q", package]).current_dir(dir);
    let out = cmd.output().with_context(|| format!("cannot run apt-get to download {package}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let gone = stderr.contains("Unable to locate package")
            || stderr.contains("Can't select candidate version")
            || stderr.contains("has no installation candidate")
            || stderr.contains("Can't find a source to download");
        if gone {
            let why = match suite {
                Suite::Sid => "Debian sid no longer serves it (sid moves on: a newer kernel replaced it)",
                Suite::Host => "the host's apt sources do not serve it (run `apt-get update`, or the suite dropped it)",
            };
            bail!(
                "package {package} cannot be downloaded: {why}; boot your own copy with --kernel-deb FILE or --kernel IMAGE --modules DIR\napt-get said: {}",
                stderr.trim_end()
            );
        }
        bail!("apt-get download {package} from {} failed: {}", suite.describe(), stderr.trim_end());
    }
    find_deb(dir, package)?.with_context(|| format!("apt-get download {package} left no .deb in {}", dir.display()))
}

/// The newest `PACKAGE_*.deb` in `dir`. `package` may pin a version as apt does,
/// `NAME=VERSION`: then only that version's file counts.
pub fn find_deb(dir: &Path, package: &str) -> anyhow::Result<Option<PathBuf>> {
    let prefix = match package.split_once('=') {
        // apt-get download spells an epoch's colon as %3a in the file name.
        Some((name, version)) => format!("{name}_{}_", version.replace(':', "%3a")),
        None => format!("{package}_"),
    };
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    found.sort();
    Ok(found.pop())
}

/// The cached .deb of `package` (or `NAME=VERSION`) under `dir`, downloaded on first use. The
/// download goes to a staging directory first, so an interrupted one is never taken for a
/// complete package.
pub fn cached_deb(suite: Suite, package: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(deb) = find_deb(dir, package)? {
        return Ok(deb);
    }
    println!("debian: downloading {package} from {}", suite.describe());
    // Per process and call: two threads may download into one folder at once.
    static DOWNLOADS: AtomicUsize = AtomicUsize::new(0);
    let staging = dir.join(format!(".download-{}-{}", std::process::id(), DOWNLOADS.fetch_add(1, Ordering::Relaxed)));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let result = download(suite, package, &staging).and_then(|deb| {
        let target = dir.join(deb.file_name().expect("a found file has a name"));
        fs::rename(&deb, &target).with_context(|| format!("moving {} to {}", deb.display(), target.display()))?;
        Ok(target)
    });
    let _ = fs::remove_dir_all(&staging);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_of_the_matrix_has_expectations_and_the_fix_removes_cxl_mem_probes_own() {
        for k in STOCK_KERNELS {
            let fixed = expect::fixed(k.expected);
            assert!(k.expected.iter().any(|e| e.fixed_by_cxl_mem), "{}: the fix must remove something", k.name);
            assert!(fixed.iter().all(|e| !e.fixed_by_cxl_mem));
            assert!(fixed.contains(&expect::ROOT_ERASE) && fixed.contains(&expect::CORE_ADD_EP));
        }
    }

    #[test]
    fn mirror_from_either_sources_format() {
        let deb822 = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\n";
        assert_eq!(debian_mirror_in(deb822).as_deref(), Some("http://deb.debian.org/debian"));
        let one_line = "deb [arch=amd64] http://ftp.de.debian.org/debian/ bookworm main\n";
        assert_eq!(debian_mirror_in(one_line).as_deref(), Some("http://ftp.de.debian.org/debian"));
        assert_eq!(debian_mirror_in("deb https://packages.cloud.google.com/apt cloud-sdk main\n"), None);
    }

    #[test]
    fn a_pinned_version_finds_only_its_own_deb() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "linux-source-6.12_6.12.117-1~deb12u1_all.deb",
            "linux-source-6.12_6.12.118-1~deb12u1_all.deb",
            "x_1%3a2.0-1_all.deb",
        ] {
            fs::write(dir.path().join(name), b"").unwrap();
        }
        let found = |package: &str| {
            find_deb(dir.path(), package).unwrap().map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
        };
        assert_eq!(found("linux-source-6.12").as_deref(), Some("linux-source-6.12_6.12.118-1~deb12u1_all.deb"));
        assert_eq!(
            found("linux-source-6.12=6.12.117-1~deb12u1").as_deref(),
            Some("linux-source-6.12_6.12.117-1~deb12u1_all.deb")
        );
        assert_eq!(found("linux-source-6.12=6.12.116-1"), None);
        assert_eq!(found("x=1:2.0-1").as_deref(), Some("x_1%3a2.0-1_all.deb"));
    }

    #[test]
    fn the_matrix_names_resolve() {
        for name in ["6.1", "6.12", "7.2"] {
            assert_eq!(stock_kernel(name).unwrap().name, name);
        }
        let err = stock_kernel("5.10").unwrap_err().to_string();
        assert!(err.contains("6.1, 6.12, 7.2"), "{err}");
        assert!(stock_kernel(DEFAULT_KERNEL).is_ok());
    }
}
