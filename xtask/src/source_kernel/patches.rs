//! Kernel patches for a source build: the user's files (`--patch FILE`), the shipped ones
//! named (`--patch seed`), which files each touches, and applying them exactly.
use std::{
    fs,
    io::Write as _,
    path::{Component, Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Patches shipped in `xtask/patches/` that `--patch NAME` names.
const NAMED: &[(&str, &str, &str)] =
    &[("seed", "xtask/patches/seed-v2.patch", include_str!("../../patches/seed-v2.patch"))];

/// A patch to apply to a kernel tree with `patch -p1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    /// What the user named (`seed`, or the file as given), for messages.
    pub name: String,
    pub text: String,
}

impl Patch {
    /// The patch `spec` names: a shipped one by name, or a file.
    pub fn load(spec: &str) -> anyhow::Result<Patch> {
        if let Some((name, _, text)) = NAMED.iter().find(|(name, _, _)| *name == spec) {
            return Ok(Patch { name: (*name).to_owned(), text: (*text).to_owned() });
        }
        let path = Path::new(spec);
        if !path.is_file() {
            bail!("--patch {spec}: no such file, and not a shipped patch ({})", names());
        }
        let text = fs::read_to_string(path).with_context(|| format!("reading the patch {spec}"))?;
        let patch = Patch { name: spec.to_owned(), text };
        if patch.touched_files().is_empty() {
            bail!("--patch {spec}: the file holds no diff (no `--- a/FILE` / `+++ b/FILE` lines)");
        }
        Ok(patch)
    }

    /// A patch shipped with the project, always applied by a kernel's recipe.
    pub fn shipped(name: &str, text: &str) -> Patch {
        Patch { name: name.to_owned(), text: text.to_owned() }
    }

    /// The files the patch creates, changes or deletes, relative to the tree's top (`-p1`):
    /// what must be put back before another set of patches is applied.
    pub fn touched_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let mut lines = self.text.lines().peekable();
        while let Some(line) = lines.next() {
            let Some(old) = line.strip_prefix("--- ") else {
                continue;
            };
            let Some(new) = lines.peek().and_then(|next| next.strip_prefix("+++ ")) else {
                continue;
            };
            for name in [old, new] {
                if let Some(path) = strip_one(name)
                    && !files.contains(&path)
                {
                    files.push(path);
                }
            }
            lines.next();
        }
        files
    }

    /// Applies the patch to `tree` with no fuzz, so one that does not fit this source fails
    /// instead of landing somewhere else; the error names the patch and shows patch's output.
    pub fn apply(&self, tree: &Path) -> anyhow::Result<()> {
        let mut child = Command::new("patch")
            .args(["-p1", "--fuzz=0", "--forward", "--batch", "--no-backup-if-mismatch", "--reject-file=-"])
            .arg("--directory")
            .arg(tree)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run patch: install it (`cargo xtask setup` does)")?;
        // Written from another thread while this one reads patch's output: neither pipe can
        // fill up and stall the other.
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let text = self.text.clone();
        let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
        let out = child.wait_with_output().context("waiting for patch")?;
        // patch may stop reading early (a hunk it refuses); its status says what went wrong.
        let _ = writer.join();
        if !out.status.success() {
            bail!(
                "the patch {} does not apply to {} ({}; patch -p1 --fuzz=0):\n{}{}",
                self.name,
                tree.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// `NAME (FILE)` of every shipped patch, for messages and `--help`.
pub fn names() -> String {
    NAMED.iter().map(|(name, file, _)| format!("{name} = {file}")).collect::<Vec<_>>().join(", ")
}

/// The path of a `---`/`+++` line with its first component stripped (`-p1`), or `None` for
/// `/dev/null` (a created or deleted file's other side) and for a path that leaves the tree.
fn strip_one(field: &str) -> Option<PathBuf> {
    // A tab separates an optional time stamp (diff -u); git quotes no plain path.
    let name = field.split('\t').next().unwrap_or(field).trim_end();
    if name == "/dev/null" {
        return None;
    }
    let mut components = Path::new(name).components();
    components.next()?;
    let rest: PathBuf = components.collect();
    let inside = rest.components().all(|c| matches!(c, Component::Normal(_)));
    (inside && !rest.as_os_str().is_empty()).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_FILES: &str = "\
A header that explains the change.
It may say anything but a diff line.

diff --git a/drivers/cxl/core/port.c b/drivers/cxl/core/port.c
index c5aacd7054f1..0b8f144596e8 100644
--- a/drivers/cxl/core/port.c
+++ b/drivers/cxl/core/port.c
@@ -1,2 +1,3 @@
 one
+two
 three
--- a/drivers/cxl/mem.c\t2026-06-08 10:00:00.000000000 +0200
+++ b/drivers/cxl/mem.c\t2026-06-09 10:00:00.000000000 +0200
@@ -1 +1 @@
-x
+y
diff --git a/drivers/cxl/new.c b/drivers/cxl/new.c
new file mode 100644
--- /dev/null
+++ b/drivers/cxl/new.c
@@ -0,0 +1 @@
+new
";

    #[test]
    fn touched_files_are_read_from_the_file_headers() {
        let patch = Patch::shipped("t", TWO_FILES);
        assert_eq!(
            patch.touched_files(),
            [PathBuf::from("drivers/cxl/core/port.c"), "drivers/cxl/mem.c".into(), "drivers/cxl/new.c".into()]
        );
        // A removed line that happens to start with "-- " is no header without its "+++".
        let body = Patch::shipped("t", "--- a/x.c\n+++ b/x.c\n@@ -1 +0,0 @@\n--- not a header\n");
        assert_eq!(body.touched_files(), [PathBuf::from("x.c")]);
        // A path that climbs out of the tree is never restored or written.
        assert_eq!(
            Patch::shipped("t", "--- a/../etc/passwd\n+++ b/../etc/passwd\n").touched_files(),
            Vec::<PathBuf>::new()
        );
    }

    #[test]
    fn the_seed_patch_is_shipped_with_all_three_files() {
        let seed = Patch::load("seed").unwrap();
        assert_eq!(seed.name, "seed");
        assert_eq!(
            seed.touched_files(),
            [PathBuf::from("drivers/cxl/core/port.c"), "drivers/cxl/mem.c".into(), "drivers/cxl/pci.c".into()]
        );
        // The mail lost its tabs: every context and added line of kernel C code that is
        // indented must be indented with tabs again, as in the source.
        for line in seed.text.lines().skip_while(|l| !l.starts_with("diff --git")) {
            let code = line.get(1..).unwrap_or("");
            if (line.starts_with(' ') || line.starts_with('+')) && !line.starts_with("+++") {
                assert!(!code.starts_with("    "), "space-indented line in the seed patch: {line:?}");
            }
        }
    }

    #[test]
    fn a_missing_file_or_a_file_without_a_diff_is_refused() {
        let err = Patch::load("/nonexistent/fix.patch").unwrap_err().to_string();
        assert!(err.contains("no such file") && err.contains("seed = xtask/patches/seed-v2.patch"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("notes.txt");
        fs::write(&file, "just words\n").unwrap();
        let err = Patch::load(file.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("holds no diff"), "{err}");
    }

    #[test]
    fn apply_is_exact_and_names_the_patch_that_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("drivers/cxl/core")).unwrap();
        fs::write(dir.path().join("drivers/cxl/core/port.c"), "one\nthree\n").unwrap();
        let patch = Patch::shipped("first", &TWO_FILES[..TWO_FILES.find("--- a/drivers/cxl/mem.c").unwrap()]);
        patch.apply(dir.path()).unwrap();
        assert_eq!(fs::read_to_string(dir.path().join("drivers/cxl/core/port.c")).unwrap(), "one\ntwo\nthree\n");
        // The same hunk again: its context no longer matches without fuzz.
        let err = format!("{:#}", patch.apply(dir.path()).unwrap_err());
        assert!(err.contains("the patch first does not apply"), "{err}");
        assert!(err.contains("port.c"), "patch's own output is shown: {err}");
    }

    /// The hard-linked work tree relies on this: patch writes a new file and renames it over
    /// the old one, so the pristine copy that shares the old inode is left as it was.
    #[test]
    fn applying_to_a_hard_linked_copy_leaves_the_original_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (pristine, work) = (dir.path().join("pristine"), dir.path().join("work"));
        for tree in [&pristine, &work] {
            fs::create_dir_all(tree.join("drivers/cxl/core")).unwrap();
        }
        fs::write(pristine.join("drivers/cxl/core/port.c"), "one\nthree\n").unwrap();
        fs::hard_link(pristine.join("drivers/cxl/core/port.c"), work.join("drivers/cxl/core/port.c")).unwrap();
        let patch = Patch::shipped("first", &TWO_FILES[..TWO_FILES.find("--- a/drivers/cxl/mem.c").unwrap()]);
        patch.apply(&work).unwrap();
        assert_eq!(fs::read_to_string(work.join("drivers/cxl/core/port.c")).unwrap(), "one\ntwo\nthree\n");
        assert_eq!(fs::read_to_string(pristine.join("drivers/cxl/core/port.c")).unwrap(), "one\nthree\n");
    }

    /// The shipped patches against the real source they were written for: Debian's 7.2.13
    /// (the source .deb the fixtures cache, fetched on first use), with no fuzz, and with the
    /// effect each is for. Needs neither root nor the chroot.
    #[test]
    fn the_shipped_patches_apply_to_the_real_7_2_13_source() {
        use crate::{
            debian,
            source_kernel::{SOURCE_KERNELS, tree},
        };
        let kernel = &SOURCE_KERNELS[0];
        let base = debian::stock_kernel(kernel.base).unwrap();
        let debs = crate::util::cache_dir().join("fixtures/debs");
        let deb = match debian::find_deb(&debs, base.source_package).ok().flatten() {
            Some(deb) => deb,
            None => debian::cached_deb(base.suite, base.source_package, &debs).unwrap(),
        };
        let dir = tempfile::tempdir().unwrap();
        let files = [
            "Makefile",
            "drivers/cxl/core/port.c",
            "drivers/cxl/mem.c",
            "drivers/cxl/pci.c",
            "tools/testing/cxl/test/cxl.c",
        ];
        tree::extract(&deb, base.source_package, dir.path(), &files).unwrap();
        tree::check_version(dir.path(), base.version).unwrap();
        let read = |file: &str| fs::read_to_string(dir.path().join(file)).unwrap();
        let stock_pci = read("drivers/cxl/pci.c");
        assert!(
            stock_pci.contains("\tif (!dport->regs.rcd_pcie_cap)\n\t\treturn -ENXIO;\n\n\tguard(device)(root_dev);")
        );
        assert!(!read("tools/testing/cxl/test/cxl.c").contains("static bool type2_test;"));

        for (file, text) in kernel.recipe_patches {
            Patch::shipped(file, text).apply(dir.path()).unwrap();
        }
        Patch::load("seed").unwrap().apply(dir.path()).unwrap();

        assert!(read("drivers/cxl/core/port.c").contains(
            "\tcond_cxl_root_lock(port);\n\tport->nr_dports--;\n\txa_erase(&port->dports, (unsigned long) dport->dport_dev);\n\tcond_cxl_root_unlock(port);\n"
        ));
        let mem = read("drivers/cxl/mem.c");
        assert!(mem.contains("cxl_mem_find_port(cxlmd, NULL)") && !mem.contains("cxl_mem_find_port(cxlmd, &dport)"));
        assert_eq!(mem.matches("dport = cxl_find_dport_by_dev(parent_port, cxlmd->dev.parent->parent);").count(), 2);
        let pci = read("drivers/cxl/pci.c");
        assert!(pci.contains("\tdport = cxl_find_dport_by_dev(root, cxlmd->dev.parent->parent);\n\tif (!dport || !dport->regs.rcd_pcie_cap)"));
        assert!(read("tools/testing/cxl/test/cxl.c").contains("static bool type2_test;\n"));
        assert!(read("tools/testing/cxl/test/cxl.c").contains("module_param(type2_test, bool, 0444);"));
    }
}
