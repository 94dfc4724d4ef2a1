//! The boot: the accelerator chosen, the kernel command line, QEMU run under the console
//! watch with its wall-clock bound, and the guest's results copied to the host.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{Accel, RunOptions, cxl_cli, initramfs, prepare::Prepared, qemu, results};

/// A boot that is over: QEMU is gone and the results are copied.
pub struct Booted {
    pub session: qemu::Session,
    pub out: PathBuf,
    pub accel: Accel,
    pub accel_reason: String,
    /// The wall-clock bound it had, in seconds.
    pub timeout: u64,
}

pub fn boot(options: &RunOptions, prepared: &Prepared) -> anyhow::Result<Booted> {
    let per_cycle: u64 = prepared.workloads.iter().map(|w| w.cycle_bound_secs(options.topology)).sum();
    let timeout = options.timeout.unwrap_or(180 + u64::from(options.cycles) * per_cycle);
    let kernel = &prepared.kernel;
    let (accel, accel_reason) = choose_accel(options.accel, &kernel.image, prepared.tmp_dir())?;
    let out = results::directory(options.out.as_deref())?;
    let cmdline = cmdline(options.cmdline.as_deref());
    let cpus = options.cpus.unwrap_or(accel.default_cpus());
    let machine = qemu::Machine {
        accel,
        cpus,
        kernel: &kernel.image,
        initrd: &prepared.initrd,
        cmdline: &cmdline,
        share: Some(&prepared.share),
        userland: prepared.debian_root.as_deref(),
        cxl: Some((options.topology, &prepared.cxl_dir)),
    };
    println!(
        "vm: booting {} ({}) with topology {} on {accel} with {cpus} vCPU(s), bound {} s; console in {}",
        kernel.release,
        kernel.image.display(),
        options.topology.name(),
        timeout,
        out.join("console.log").display()
    );
    let result_prefix = format!("tracer-vm: result {} ", prepared.nonce);
    let session = qemu::boot(
        machine.command(),
        &qemu::Watch {
            result_prefix: &result_prefix,
            timeout: Duration::from_secs(timeout),
            log: Some(&out.join("console.log")),
            echo: !options.quiet,
        },
    )?;

    results::copy(&prepared.share.join("out"), &out)?;
    if let Some(tracer) = &prepared.tracer {
        results::write_ktap(tracer, &out, options.known.as_deref());
    }
    if let Err(err) = cxl_cli::add_to_ktap(&session.lines, &out) {
        println!("vm: warning: {err:#}");
    }
    Ok(Booted { session, out, accel, accel_reason, timeout })
}

/// The guest kernel's command line (docs/vm.md lists why each parameter is there), then
/// `--cmdline`'s. `quiet` keeps the boot fast on the emulated serial port; failures still
/// reach the console (an oops turns the console verbose) and the full dmesg is saved at the
/// end.
fn cmdline(extra: Option<&str>) -> String {
    let mut cmdline = String::from(
        "console=ttyS0 quiet printk.time=1 pci=nomsi pcie_ports=native panic=1 \
         sysctl.kernel.hung_task_timeout_secs=60",
    );
    if let Some(extra) = extra {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    cmdline
}

/// KVM or TCG, and why: as asked, or probed (`--accel auto`) with a short guest boot whose
/// initrd goes to `tmp`.
fn choose_accel(requested: Accel, kernel: &Path, tmp: &Path) -> anyhow::Result<(Accel, String)> {
    match requested {
        Accel::Kvm => Ok((Accel::Kvm, "requested with --accel kvm".to_owned())),
        Accel::Tcg => Ok((Accel::Tcg, "requested with --accel tcg".to_owned())),
        Accel::Auto => {
            let (works, reason) = qemu::kvm_works(kernel, || {
                let initrd = tmp.join("kvm-probe.cpio");
                initramfs::write_probe_initrd(&initrd)?;
                Ok(initrd)
            })?;
            if works { Ok((Accel::Kvm, reason)) } else { Ok((Accel::Tcg, format!("KVM unusable, {reason}"))) }
        }
    }
}
