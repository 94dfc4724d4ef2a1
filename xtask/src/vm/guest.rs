//! The guest's own files: the shell every run puts in the initramfs (`/init` and `/vm/*`,
//! from `xtask/guest/`), and `/vm/config`, the run's settings those scripts source.
//!
//! The shell lives in `.sh` files, not in Rust strings, so that it can be read, run by hand
//! and linted: the tests below run shellcheck over every file in `xtask/guest/` and check
//! that each one is included somewhere. Values reach the scripts as `/vm/config` variables
//! or as arguments, never by formatting them into the shell's text.
use std::fmt::Write as _;

use super::Workload;

/// A file of every run's initramfs.
pub struct RunFile {
    /// Its path in the guest, relative to `/`.
    pub path: &'static str,
    pub mode: u32,
    pub text: &'static str,
}

/// The shell of every run: `/init`, the library, the workloads and the scripts around them.
pub const RUN_FILES: &[RunFile] = &[
    RunFile { path: "init", mode: 0o755, text: include_str!("../../guest/init.sh") },
    RunFile { path: "vm/lib.sh", mode: 0o644, text: include_str!("../../guest/lib.sh") },
    RunFile { path: "vm/workloads.sh", mode: 0o644, text: include_str!("../../guest/workloads.sh") },
    RunFile { path: "vm/workload", mode: 0o755, text: include_str!("../../guest/workload.sh") },
    RunFile { path: "vm/run-workloads", mode: 0o755, text: include_str!("../../guest/run-workloads.sh") },
    RunFile { path: "vm/run-workload", mode: 0o755, text: include_str!("../../guest/run-workload.sh") },
    RunFile { path: "vm/debian", mode: 0o755, text: include_str!("../../guest/debian.sh") },
    RunFile { path: "vm/cxl-cli", mode: 0o755, text: include_str!("../../guest/cxl-cli.sh") },
];

/// `/init` of the KVM probe's guest (qemu.rs, `kvm_works`).
pub const KVM_PROBE_INIT: &str = include_str!("../../guest/kvm-probe-init.sh");

/// What `/init` is told, written to `/vm/config` and sourced by every guest script
/// (`xtask/guest/config.example` shows one).
pub struct GuestConfig<'a> {
    pub nonce: &'a str,
    /// The topology's name (`--topology`): the workloads pick devices by it.
    pub topology: &'static str,
    pub expect_memdevs: usize,
    pub tracer: bool,
    /// The tracer is in the guest but the workloads run without it: the script runs it.
    pub manual_tracer: bool,
    /// Load the CXL modules at boot and wait for the topology (else the script does).
    pub load_cxl: bool,
    /// Modules /init loads, in order, before it mounts the results share (basics.rs).
    pub basic_modules: &'a [String],
    /// `[MODULE:]FUNCTION` specs whose calls are counted during the workloads and script.
    pub count_calls: &'a [String],
    pub workloads: &'a [Workload],
    pub cycles: u32,
    /// The user's command, already shell-quoted, or empty.
    pub user_command: String,
    /// Modules to load at boot, in order (the CXL drivers, then the user's extra modules).
    pub load_modules: &'a [String],
    pub settle_secs: u32,
    /// Where the known-findings file is in the guest (`--known`), if given.
    pub known: Option<&'a str>,
    /// The kernel can commit a region in a VM (`CONFIG_CXL_REGION_INVALIDATION_TEST`).
    pub region_commit: bool,
    /// The Debian userland is shared to the guest (vm/userland.rs): /init mounts it.
    pub debian: bool,
    /// Where the script runs (`--userland`): `busybox` or `debian`.
    pub userland: &'static str,
}

impl GuestConfig<'_> {
    pub fn render(&self) -> String {
        let mut s = String::from("# written by cargo xtask vm run\n");
        let names: Vec<&str> = self.workloads.iter().map(|w| w.name()).collect();
        let vars = [
            ("NONCE", self.nonce.to_owned()),
            ("TOPOLOGY", self.topology.to_owned()),
            ("EXPECT_MEMDEVS", self.expect_memdevs.to_string()),
            (
                "TRACER",
                match (self.tracer, self.manual_tracer) {
                    (true, true) => "manual",
                    (true, false) => "1",
                    (false, _) => "0",
                }
                .to_owned(),
            ),
            ("LOAD_CXL", u8::from(self.load_cxl).to_string()),
            ("BASIC_MODULES", self.basic_modules.join(" ")),
            ("COUNT_CALLS", self.count_calls.join(" ")),
            ("WORKLOADS", names.join(" ")),
            ("CYCLES", self.cycles.to_string()),
            ("USER_CMD", self.user_command.clone()),
            ("LOAD_MODULES", self.load_modules.join(" ")),
            ("SETTLE_SECS", self.settle_secs.to_string()),
            ("TRACER_KNOWN", self.known.map_or(String::new(), str::to_owned)),
            ("REGION_COMMIT", u8::from(self.region_commit).to_string()),
            ("DEBIAN", u8::from(self.debian).to_string()),
            ("USERLAND", self.userland.to_owned()),
        ];
        for (name, value) in vars {
            writeln!(s, "{name}={}", shell_quote(&value)).expect("writing to a String cannot fail");
        }
        s
    }
}

/// Quotes `s` as one word for the guest's shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        fs,
        path::{Path, PathBuf},
        process::Command,
    };

    use super::*;

    fn config(tracer: bool, manual_tracer: bool, load_cxl: bool) -> String {
        GuestConfig {
            nonce: "n",
            topology: "switch",
            expect_memdevs: 2,
            tracer,
            manual_tracer,
            load_cxl,
            basic_modules: &["virtio_pci".to_owned(), "9p".to_owned()],
            count_calls: &["cxl_mem:cxl_mem_probe".to_owned(), "devm_cxl_add_port".to_owned()],
            workloads: &[Workload::MemdevBind, Workload::Mix],
            cycles: 3,
            user_command: "'/vm/script' 'a b'".to_owned(),
            load_modules: &["cxl_acpi".to_owned()],
            settle_secs: 30,
            known: Some("/vm/known"),
            region_commit: false,
            debian: true,
            userland: "debian",
        }
        .render()
    }

    fn run_file(path: &str) -> &'static str {
        RUN_FILES.iter().find(|f| f.path == path).unwrap_or_else(|| panic!("no run file {path}")).text
    }

    /// The names a config or its example assigns, in order.
    fn assigned(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once('=')).map(|(name, _)| name).collect()
    }

    #[test]
    fn config_tells_init_how_to_run_the_tracer() {
        let c = config(true, false, true);
        assert!(c.contains("TRACER='1'\n") && c.contains("LOAD_CXL='1'\n"), "{c}");
        assert!(c.contains("BASIC_MODULES='virtio_pci 9p'\n"), "{c}");
        assert!(c.contains("COUNT_CALLS='cxl_mem:cxl_mem_probe devm_cxl_add_port'\n"), "{c}");
        assert!(c.contains("WORKLOADS='memdev-bind mix'\n"), "{c}");
        // The user's command is quoted once more, to survive `. /vm/config`.
        assert!(c.contains(r#"USER_CMD=''\''/vm/script'\'' '\''a b'\'''"#), "{c}");
        assert!(config(true, true, false).contains("TRACER='manual'\nLOAD_CXL='0'\n"));
        assert!(config(false, false, true).contains("TRACER='0'\n"));
    }

    #[test]
    fn config_example_has_the_names_the_harness_writes() {
        // shellcheck reads config.example in place of /vm/config: it must not drift.
        let example = include_str!("../../guest/config.example");
        assert_eq!(assigned(example), assigned(&config(true, false, true)), "xtask/guest/config.example");
    }

    #[test]
    fn init_branches_on_every_tracer_mode() {
        let init = run_file("init");
        for mode in [r#""$TRACER" = manual"#, r#""$TRACER" = 1"#, r#""$LOAD_CXL" = 1"#] {
            assert!(init.contains(mode), "/init does not test {mode}");
        }
        assert!(run_file("vm/run-workloads").contains("trap count_calls_stop EXIT"));
        let lib = run_file("vm/lib.sh");
        assert!(lib.contains("count_calls_start()") && lib.contains("topology_ready()"));
    }

    #[test]
    fn every_workload_has_its_function_in_workloads_sh() {
        // run_workload calls cycle_NAME for each cycle, and run_NAME for a racing workload.
        let shell = run_file("vm/workloads.sh");
        let defined: BTreeSet<&str> =
            shell.lines().filter_map(|l| l.split_once("() {")).map(|(name, _)| name.trim()).collect();
        for w in Workload::ALL {
            let f = w.name().replace('-', "_");
            assert!(defined.contains(format!("cycle_{f}").as_str()), "workloads.sh has no cycle_{f} for {}", w.name());
            if w.is_race() {
                assert!(defined.contains(format!("run_{f}").as_str()), "workloads.sh has no run_{f} for {}", w.name());
            }
        }
        let known: BTreeSet<String> =
            Workload::ALL.iter().map(|w| format!("cycle_{}", w.name().replace('-', "_"))).collect();
        let extra: Vec<&&str> = defined.iter().filter(|d| d.starts_with("cycle_") && !known.contains(**d)).collect();
        assert!(extra.is_empty(), "workloads.sh has cycles of no Workload (vm/workload.rs): {extra:?}");
    }

    fn guest_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("guest")
    }

    /// Files under `dir` whose name ends in `suffix`, recursively, sorted.
    fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(files(&path, suffix));
            } else if path.to_string_lossy().ends_with(suffix) {
                out.push(path);
            }
        }
        out.sort();
        out
    }

    #[test]
    fn guest_shell_passes_shellcheck() {
        let scripts = files(&guest_dir(), ".sh");
        assert!(scripts.len() >= 10, "only {} .sh files in {}", scripts.len(), guest_dir().display());
        // Busybox ash is closest to dash among shellcheck's dialects (it has `local`); the
        // scripts that run in the Debian userland say `#!/bin/bash` and are checked as bash.
        // The scripts name what they source (`source=` directives) next to the guest paths.
        let is_bash = |p: &PathBuf| fs::read_to_string(p).is_ok_and(|t| t.starts_with("#!/bin/bash\n"));
        let (bash, ash): (Vec<PathBuf>, Vec<PathBuf>) = scripts.into_iter().partition(is_bash);
        for (dialect, scripts) in [("dash", ash), ("bash", bash)] {
            if scripts.is_empty() {
                continue;
            }
            let output = match Command::new("shellcheck")
                .arg(format!("--shell={dialect}"))
                .args(["--external-sources", "--source-path=SCRIPTDIR", "--format=gcc"])
                .args(&scripts)
                .output()
            {
                Ok(output) => output,
                Err(err) => panic!("install shellcheck (cargo xtask setup): cannot run shellcheck: {err}"),
            };
            assert!(
                output.status.success(),
                "shellcheck --shell={dialect} finds problems in the guest shell (fix them, or disable the \
                 rule on that line with a comment saying why):\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    #[test]
    fn every_guest_script_is_included() {
        // Every include_str! of the crate's sources, resolved from the file that holds it.
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut included = BTreeSet::new();
        for rs in files(&src, ".rs") {
            let text = fs::read_to_string(&rs).unwrap();
            for (_, rest) in text.match_indices("include_str!(\"").map(|(at, m)| text.split_at(at + m.len())) {
                let Some((relative, _)) = rest.split_once('"') else { continue };
                if let Ok(path) = fs::canonicalize(rs.parent().unwrap().join(relative)) {
                    included.insert(path);
                }
            }
        }
        let orphans: Vec<PathBuf> = files(&guest_dir(), ".sh")
            .into_iter()
            .map(|p| fs::canonicalize(p).unwrap())
            .filter(|p| !included.contains(p))
            .collect();
        assert!(orphans.is_empty(), "guest scripts no include_str! puts in the harness: {orphans:?}");
    }
}
