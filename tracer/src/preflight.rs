//! Checks before anything is loaded: privileges, BTF, tracefs and other tracer instances;
//! and the process limits a few hundred kprobes need.
use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::probe::kprobe;

/// Capability bits (include/uapi/linux/capability.h).
const CAP_SYS_RAWIO: u32 = 17;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capabilities of this process, from /proc/self/status.
pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// What is missing for tracing, if anything: root for tracefs, CAP_BPF and CAP_PERFMON (or
/// CAP_SYS_ADMIN) for the programs, CAP_SYS_RAWIO for /proc/kcore.
pub fn privilege_problem() -> Option<String> {
    let caps = effective_caps();
    let has = |cap: u32| caps & (1 << cap) != 0;
    let mut missing = Vec::new();
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (tracefs kprobe_events is root-only)");
    }
    if !(has(CAP_BPF) && has(CAP_PERFMON) || has(CAP_SYS_ADMIN)) {
        missing.push("CAP_BPF and CAP_PERFMON");
    }
    if !has(CAP_SYS_RAWIO) {
        missing.push("CAP_SYS_RAWIO (reading kernel text from /proc/kcore)");
    }
    (!missing.is_empty()).then(|| format!("tracer needs {}: run it as root, e.g. with sudo", missing.join(", ")))
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
pub fn raise_memlock() {
    let limit = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
}

/// The open-files limit before `raise_open_files`, for the command the tracer runs.
static ORIGINAL_OPEN_FILES: std::sync::OnceLock<(libc::rlim_t, libc::rlim_t)> = std::sync::OnceLock::new();

/// Gives a child the open-files limit the tracer started with (it needs none of the
/// tracer's raise; some programs walk every descriptor up to the limit).
pub fn restore_open_files_in(cmd: &mut tokio::process::Command) {
    if let Some(&(cur, max)) = ORIGINAL_OPEN_FILES.get() {
        // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit { rlim_cur: cur, rlim_max: max };
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                Ok(())
            });
        }
    }
}

/// Every kprobe holds file descriptors (its perf event and link): a plan of several hundred
/// sites passes the usual soft limit of 1024. Raise it to the most the kernel allows
/// (`fs.nr_open` for root), or at least to the hard limit.
pub fn raise_open_files() {
    let mut original = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut original) } == 0 {
        let _ = ORIGINAL_OPEN_FILES.set((original.rlim_cur, original.rlim_max));
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(1 << 20);
    let wanted = libc::rlimit { rlim_cur: nr_open, rlim_max: nr_open };
    // SAFETY: valid rlimits.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } != 0 {
        let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: a valid out pointer.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) } == 0 {
            current.rlim_cur = current.rlim_max;
            // SAFETY: a valid rlimit.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &current) };
        }
    }
}

/// Fails unless `btf_dir` has vmlinux's BTF, saying what that costs.
pub fn check_btf(btf_dir: &Path) -> anyhow::Result<()> {
    if !btf_dir.join("vmlinux").exists() {
        bail!(
            "{}/vmlinux is missing: this kernel has no BTF (CONFIG_DEBUG_INFO_BTF); tracer needs it for offsets and use sites (--btf-dir names another place)",
            btf_dir.display()
        );
    }
    Ok(())
}

/// The tracefs mount, with kprobe events left by killed instances removed; fails while
/// another instance is attached (its kprobes patch the call sites this one reads from
/// /proc/kcore).
pub fn tracefs_ready() -> anyhow::Result<PathBuf> {
    let tracefs = kprobe::tracefs()?;
    kprobe::remove_stale_groups(&tracefs);
    let others = kprobe::other_tracers(&tracefs);
    if !others.is_empty() {
        bail!(
            "another tracer is attached (pid {}): its kprobes patch the call sites this one reads from /proc/kcore; stop it first",
            others.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(tracefs)
}
