//! Bad environments get a clear message and exit status 2, before anything is attached.
use std::process::{Command, Output};

fn tracer(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tracer"));
    cmd.args(args);
    cmd
}

fn check(out: Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(expected), "expected {expected:?} in: {stderr}");
}

/// As an unprivileged user: as root, drop to nobody with setpriv (all capabilities gone).
fn unprivileged(args: &[&str]) -> Command {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]);
        cmd.arg(env!("CARGO_BIN_EXE_tracer")).args(args);
        cmd
    } else {
        tracer(args)
    }
}

#[test]
fn without_privileges_run_record_and_doctor_say_what_is_missing() {
    for args in [&["run", "--", "true"][..], &["record", "-o", "/tmp/never.trace"], &["doctor"]] {
        let out = unprivileged(args).output().expect("setpriv (util-linux) runs");
        check(out, "tracer needs root");
    }
    assert!(!std::path::Path::new("/tmp/never.trace").exists());
}

#[test]
fn without_btf_run_says_so() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Unprivileged, the privilege check comes first (tested above).
        check(tracer(&["run", "--btf-dir", "/nonexistent"]).output().unwrap(), "tracer needs root");
        return;
    }
    check(
        tracer(&["run", "--btf-dir", "/nonexistent/btf", "--", "true"]).output().unwrap(),
        "/nonexistent/btf/vmlinux is missing: this kernel has no BTF",
    );
}

#[test]
fn bad_arguments_are_refused() {
    check(tracer(&["run", "--ring-kib", "1000", "--", "true"]).output().unwrap(), "must be a power of two");
    check(tracer(&["run", "--use-site", "devm_cxl_add_port", "--", "true"]).output().unwrap(), "expected FUNCTION:ARG");
    check(tracer(&["run", "--use-site", "devm_cxl_add_port:9", "--", "true"]).output().unwrap(), "must be 0-5");
}
