//! The built-in hotplug workloads, as the host names and checks them. Their shell is
//! `xtask/guest/workloads.sh` (one function per workload, kept in step with `Workload` by a
//! test in guest.rs).
//!
//! Each workload cycle tears part of the CXL topology down, checks that the teardown really
//! happened, brings it back, and waits until the topology matches the one seen before the
//! first cycle; a cycle that does not restore it fails the run loudly with a dump of the
//! state. Progress lines start with `tracer-vm:` so the host can pick timings out of the
//! console.
use anyhow::bail;

use super::Topology;

/// A built-in workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Unbind every memdev from `cxl_mem` and bind it again (each bind is a `cxl_mem_probe`).
    MemdevBind,
    /// `rmmod cxl_mem` then `modprobe cxl_mem`.
    CxlMemReload,
    /// `rmmod cxl_pci` then `modprobe cxl_pci` (memdevs disappear and come back).
    CxlPciReload,
    /// PCI remove of every type3 device, then a PCI bus rescan.
    Type3Rescan,
    /// PCI remove of the switch upstream port (the whole switch), then a rescan (switch only).
    UpstreamRescan,
    /// Unbind the CXL root's platform device from `cxl_acpi` (tears down the root and every
    /// port) and bind it again: ACPI0017:00 on QEMU, cxl_test's cxl_acpi.0.
    AcpiUnbind,
    /// Unbind the ports above the endpoints from `cxl_port`, bind them again if they still
    /// exist (a switch port goes away with its last endpoint), then bind the memdevs again.
    PortUnbind,
    /// A manual pmem region through sysfs, as `cxl create-region` makes one: created on a
    /// root decoder, its ways, granularity, uuid and size set, each endpoint decoder given
    /// pmem DPA and attached as a target (`cxl_region_attach()`, a root-port dport lookup);
    /// committed and reset where the kernel can commit in a VM; then detached and deleted.
    RegionAttach,
    /// ndctl's `cxl` tool driving the flows of the maintainers' `test/cxl-*.sh`: topology
    /// listing checked against sysfs, memdev and port disable/enable, region create, disable
    /// and destroy (where the kernel can commit one), bus teardown and bring-up. Runs in the
    /// Debian userland (xtask/guest/cxl-cli.sh); each flow prints its result line.
    CxlCli,
    /// `memdev-bind` and `acpi-unbind` racing in two parallel loops, then a restore.
    Mix,
    /// `memdev-bind` and `cxl-mem-reload` racing in two parallel loops, then a restore: every
    /// memdev probe races another, but no port (so no dport) is torn down.
    ReloadMix,
}

impl Workload {
    pub const ALL: [Workload; 11] = [
        Workload::MemdevBind,
        Workload::CxlMemReload,
        Workload::CxlPciReload,
        Workload::Type3Rescan,
        Workload::UpstreamRescan,
        Workload::AcpiUnbind,
        Workload::PortUnbind,
        Workload::RegionAttach,
        Workload::CxlCli,
        Workload::Mix,
        Workload::ReloadMix,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::MemdevBind => "memdev-bind",
            Workload::CxlMemReload => "cxl-mem-reload",
            Workload::CxlPciReload => "cxl-pci-reload",
            Workload::Type3Rescan => "type3-rescan",
            Workload::UpstreamRescan => "upstream-rescan",
            Workload::AcpiUnbind => "acpi-unbind",
            Workload::PortUnbind => "port-unbind",
            Workload::RegionAttach => "region-attach",
            Workload::CxlCli => "cxl-cli",
            Workload::Mix => "mix",
            Workload::ReloadMix => "reload-mix",
        }
    }

    /// Two loops racing: the cycles are iterations of each loop, with no per-cycle line.
    pub fn is_race(self) -> bool {
        matches!(self, Workload::Mix | Workload::ReloadMix)
    }

    /// It runs in the Debian userland (vm/userland.rs), which the guest then mounts.
    pub fn needs_debian(self) -> bool {
        self == Workload::CxlCli
    }

    pub fn runs_on(self, topology: Topology) -> bool {
        self.unfit(topology).is_none()
    }

    /// What one cycle may take on the topology, for the run's default wall-clock bound.
    /// cxl-cli's flows are many `cxl` commands, each a process in the Debian userland:
    /// measured under the tracer, 14.7 s a cycle on the rp topology (6.12), 90 s on
    /// cxl_test's eleven memdevs and eight ports (7.2-src); the rest take seconds.
    pub fn cycle_bound_secs(self, topology: Topology) -> u64 {
        match (self, topology) {
            (Workload::CxlCli, Topology::CxlTest) => 150,
            (Workload::CxlCli, _) => 45,
            _ => 15,
        }
    }

    /// Why the workload cannot run on the topology, if it cannot.
    fn unfit(self, topology: Topology) -> Option<&'static str> {
        match self {
            Workload::UpstreamRescan if topology != Topology::Switch => {
                Some("needs a CXL switch of PCI functions: use --topology switch")
            }
            // cxl_test's memdevs and ports are platform devices of its mocks: no PCI function
            // to remove, and cxl_pci drives none of them.
            Workload::CxlPciReload | Workload::Type3Rescan if topology == Topology::CxlTest => {
                Some("needs CXL PCI functions, which cxl_test does not make: use --topology rp or switch")
            }
            _ => None,
        }
    }
}

/// Fails before booting when a workload cannot run on the topology.
pub fn check(workloads: &[Workload], topology: Topology) -> anyhow::Result<()> {
    for w in workloads {
        if let Some(why) = w.unfit(topology) {
            bail!("workload {} {why}", w.name());
        }
    }
    Ok(())
}
