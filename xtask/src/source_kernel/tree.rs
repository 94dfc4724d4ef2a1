//! The kernel source a build compiles: Debian's `linux-source-X.Y` extracted once per package
//! version (the pristine tree), and a work tree per kernel and config that is a hard-linked
//! copy of it with one set of patches applied at a time.
//!
//! Switching patch sets puts back, from the pristine tree, every file the previous set
//! touched, then applies the new set. The restored and patched files get a fresh mtime, so
//! make rebuilds only what they feed: a `drivers/cxl/*` patch costs a rebuild of the CXL
//! modules, not a cold build. `patch` writes a new file and renames it over the old one, so a
//! patched file never writes through a hard link into the pristine tree (a test in
//! patches.rs holds it to that).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::patches::Patch;
use crate::{
    debian::{self, StockKernel},
    fixture::source::pipeline,
    util::{self, cache_dir},
};

/// Marks a complete pristine extraction and names its package version.
const VERSION_FILE: &str = ".package-version";
/// In a work tree: the files the applied patches touch, one per line (written before they
/// are applied, so a failure halfway leaves them to be put back).
const APPLIED_FILES: &str = "applied-files";
/// In a work tree: the key of the patch set applied in full (absent while none is).
const APPLIED_KEY: &str = "applied-key";

/// The source packages' .debs: the fixtures' cache (fixture/source.rs), so the package they
/// fetched for 7.2 is the one built here.
fn debs_dir() -> PathBuf {
    cache_dir().join("fixtures/debs")
}

/// The cached .deb of `kernel`'s source package at `version`, downloaded on first use.
pub fn source_deb(kernel: &StockKernel, version: &str) -> anyhow::Result<PathBuf> {
    let package = kernel.source_package;
    debian::cached_deb(kernel.suite, &format!("{package}={version}"), &debs_dir())
        .with_context(|| format!("fetching {package} {version}, the source of {}", kernel.release))
}

/// The whole source tree of `kernel` from its source package at `version`, extracted under
/// `dir` on first use (about 1.8 GB; 15 to 30 s).
pub fn pristine(kernel: &StockKernel, version: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let root = dir.join(format!("{}_{version}", kernel.source_package));
    if fs::read_to_string(root.join(VERSION_FILE)).ok().as_deref() == Some(version) {
        return Ok(root);
    }
    let deb = source_deb(kernel, version)?;
    println!(
        "kernel: extracting the whole {} {version} source from {} (about 30 s)",
        kernel.source_package,
        deb.display()
    );
    // Beside the final place, then renamed: no run ever sees half a tree.
    let staging = dir.join(format!(".extract-{}", std::process::id()));
    remove_dir(&staging)?;
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let result = extract(&deb, kernel.source_package, &staging, &[]).and_then(|()| {
        check_version(&staging, kernel.version).with_context(|| format!("in {}", deb.display()))?;
        fs::write(staging.join(VERSION_FILE), version).with_context(|| format!("writing in {}", staging.display()))
    });
    if let Err(err) = result {
        let _ = fs::remove_dir_all(&staging);
        return Err(err);
    }
    remove_dir(&root)?;
    fs::rename(&staging, &root).with_context(|| format!("moving {} to {}", staging.display(), root.display()))?;
    Ok(root)
}

/// Extracts `members` (paths under the tree's top; all when empty) of the kernel tarball in
/// the source package `deb` into `into`, streaming: the tarball is never written out.
pub fn extract(deb: &Path, package: &str, into: &Path, members: &[&str]) -> anyhow::Result<()> {
    let mut fsys = Command::new("dpkg-deb");
    fsys.arg("--fsys-tarfile").arg(deb);
    let mut tarball = Command::new("tar");
    tarball.args(["-xO", &format!("./usr/src/{package}.tar.xz")]);
    let mut files = Command::new("tar");
    files.args(["-xJ", "--strip-components=1", "-C"]).arg(into);
    files.args(members.iter().map(|m| format!("{package}/{m}")));
    pipeline(&mut [fsys, tarball, files])
        .with_context(|| format!("extracting {} failed (tar needs xz: install xz-utils)", deb.display()))
}

/// The top Makefile of `tree` must be of `version` (`7.2.13`).
pub fn check_version(tree: &Path, version: &str) -> anyhow::Result<()> {
    let makefile = fs::read_to_string(tree.join("Makefile"))
        .with_context(|| format!("reading {}", tree.join("Makefile").display()))?;
    let field = |name: &str| {
        makefile.lines().find_map(|l| l.split_once('=').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim()))
    };
    let found = format!(
        "{}.{}.{}",
        field("VERSION").unwrap_or("?"),
        field("PATCHLEVEL").unwrap_or("?"),
        field("SUBLEVEL").unwrap_or("?")
    );
    if found != version {
        bail!("the source is linux {found}, not {version}: the source package and the kernel no longer match");
    }
    Ok(())
}

/// A work tree: `src/` (the hard-linked copy, patched) and `obj/` (make's `O=`).
pub struct WorkTree {
    pub dir: PathBuf,
}

impl WorkTree {
    pub fn src(&self) -> PathBuf {
        self.dir.join("src")
    }

    pub fn obj(&self) -> PathBuf {
        self.dir.join("obj")
    }

    /// The work tree in `dir`, its `src/` copied from `pristine` (hard links: seconds, no
    /// space) when missing. The caller holds the work tree's lock.
    pub fn ensure(dir: &Path, pristine: &Path) -> anyhow::Result<WorkTree> {
        let tree = WorkTree { dir: dir.to_owned() };
        if !tree.src().join(VERSION_FILE).is_file() {
            let partial = dir.join("src.partial");
            remove_dir(&partial)?;
            remove_dir(&tree.src())?;
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            util::output(Command::new("cp").arg("-al").arg(pristine).arg(&partial))
                .with_context(|| format!("hard-linking {} to {}", pristine.display(), partial.display()))?;
            fs::rename(&partial, tree.src()).with_context(|| format!("moving {}", partial.display()))?;
            let _ = fs::remove_file(dir.join(APPLIED_FILES));
            let _ = fs::remove_file(dir.join(APPLIED_KEY));
        }
        fs::create_dir_all(tree.obj()).with_context(|| format!("creating {}", tree.obj().display()))?;
        Ok(tree)
    }

    /// Makes `patches` (in order) the applied set, known by `key`: nothing when it already is;
    /// otherwise the files of the previous set are put back from `pristine` and these applied.
    /// Returns whether anything changed.
    pub fn apply(&self, pristine: &Path, patches: &[Patch], key: &str) -> anyhow::Result<bool> {
        let (key_file, files_file) = (self.dir.join(APPLIED_KEY), self.dir.join(APPLIED_FILES));
        if fs::read_to_string(&key_file).ok().as_deref() == Some(key) {
            return Ok(false);
        }
        let previous = fs::read_to_string(&files_file).unwrap_or_default();
        for file in previous.lines().filter(|l| !l.is_empty()) {
            restore(pristine, &self.src(), Path::new(file))?;
        }
        let _ = fs::remove_file(&key_file);
        let mut touched: Vec<PathBuf> = Vec::new();
        for patch in patches {
            touched.extend(patch.touched_files().into_iter().filter(|f| !touched.contains(f)).collect::<Vec<_>>());
        }
        let list: String = touched.iter().map(|f| format!("{}\n", f.display())).collect();
        fs::write(&files_file, list).with_context(|| format!("writing {}", files_file.display()))?;
        for patch in patches {
            println!("kernel: applying {}", patch.name);
            patch.apply(&self.src())?;
        }
        fs::write(&key_file, key).with_context(|| format!("writing {}", key_file.display()))?;
        Ok(true)
    }
}

/// Puts `file` of the work tree `src` back as it is in `pristine` (or removes it, when a
/// patch created it), as a new file with a fresh mtime: a hard link would carry the pristine
/// file's old mtime, and make would keep the objects built from the patched text.
fn restore(pristine: &Path, src: &Path, file: &Path) -> anyhow::Result<()> {
    let (from, to) = (pristine.join(file), src.join(file));
    match fs::remove_file(&to) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing {}", to.display())),
    }
    if from.is_file() {
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        fs::copy(&from, &to).with_context(|| format!("restoring {} from {}", to.display(), from.display()))?;
    }
    Ok(())
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn patch(name: &str, file: &str, from: &str, to: &str) -> Patch {
        Patch::shipped(name, &format!("--- a/{file}\n+++ b/{file}\n@@ -1 +1 @@\n-{from}\n+{to}\n"))
    }

    #[test]
    fn switching_patch_sets_restores_the_previous_files_with_a_fresh_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let pristine = dir.path().join("pristine");
        fs::create_dir_all(pristine.join("drivers/cxl/core")).unwrap();
        fs::write(pristine.join("drivers/cxl/mem.c"), "mem\n").unwrap();
        fs::write(pristine.join("drivers/cxl/core/port.c"), "port\n").unwrap();
        fs::write(pristine.join(VERSION_FILE), "1").unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        for file in ["drivers/cxl/mem.c", "drivers/cxl/core/port.c"] {
            fs::File::options().write(true).open(pristine.join(file)).unwrap().set_modified(old).unwrap();
        }
        let work = WorkTree::ensure(&dir.path().join("work"), &pristine).unwrap();
        let read = |file: &str| fs::read_to_string(work.src().join(file)).unwrap();

        let a = [patch("a", "drivers/cxl/mem.c", "mem", "mem fixed")];
        assert!(work.apply(&pristine, &a, "A").unwrap());
        assert_eq!(read("drivers/cxl/mem.c"), "mem fixed\n");
        assert!(!work.apply(&pristine, &a, "A").unwrap(), "the same set again changes nothing");

        let b = [patch("b", "drivers/cxl/core/port.c", "port", "port locked")];
        assert!(work.apply(&pristine, &b, "B").unwrap());
        assert_eq!(read("drivers/cxl/mem.c"), "mem\n", "a's file is put back");
        assert_eq!(read("drivers/cxl/core/port.c"), "port locked\n");
        // Put back as a new file, newer than the objects built from the patched one.
        let restored = fs::metadata(work.src().join("drivers/cxl/mem.c")).unwrap().modified().unwrap();
        assert!(restored > old + Duration::from_secs(1800));

        assert!(work.apply(&pristine, &[], "none").unwrap());
        assert_eq!(read("drivers/cxl/core/port.c"), "port\n");
        assert_eq!(fs::read_to_string(pristine.join("drivers/cxl/core/port.c")).unwrap(), "port\n");
    }

    #[test]
    fn a_set_that_fails_halfway_is_put_back_by_the_next_switch() {
        let dir = tempfile::tempdir().unwrap();
        let pristine = dir.path().join("pristine");
        fs::create_dir_all(pristine.join("d")).unwrap();
        fs::write(pristine.join("d/x.c"), "x\n").unwrap();
        fs::write(pristine.join("d/y.c"), "y\n").unwrap();
        fs::write(pristine.join(VERSION_FILE), "1").unwrap();
        let work = WorkTree::ensure(&dir.path().join("work"), &pristine).unwrap();
        let broken = [patch("good", "d/x.c", "x", "x2"), patch("bad", "d/y.c", "not there", "y2")];
        let err = format!("{:#}", work.apply(&pristine, &broken, "broken").unwrap_err());
        assert!(err.contains("the patch bad does not apply"), "{err}");
        assert!(work.apply(&pristine, &[], "none").unwrap());
        assert_eq!(fs::read_to_string(work.src().join("d/x.c")).unwrap(), "x\n");
    }

    #[test]
    fn the_version_comes_from_the_top_makefile() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("Makefile"), "VERSION = 7\nPATCHLEVEL = 2\nSUBLEVEL = 13\nEXTRAVERSION =\n").unwrap();
        check_version(dir.path(), "7.2.13").unwrap();
        let err = check_version(dir.path(), "7.2.14").unwrap_err().to_string();
        assert!(err.contains("linux 7.2.13, not 7.2.14"), "{err}");
    }
}
