//! What the tracer must report on each stock kernel of the matrix, and why, from that
//! kernel's own source (docs/kernels.md tells the story with the code). The suite's traced
//! cases and the demo check runs against these: the exact root-cause findings, each counted
//! against an independent count of what causes it.
//!
//! Sites are those of the root cause after folding (the outermost use of one loaded pointer
//! in one call of the function holding it); `also` lists uses that must be folded into it.
//! Each kernel's rows are named by its entry in the matrix (`debian::STOCK_KERNELS`).

/// How often a finding must occur in a run.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Per {
    /// Once per successful memdev probe (the kretprobe count of `cxl_mem_probe`).
    MemdevProbe,
    /// Once per `cxl_acpi` unbind per dport of the CXL root (the root's teardown erases each
    /// root dport without the root port's lock).
    RootDportTeardown,
    /// Once per target a manual region attaches (`region-attach`: `store_targetN` ->
    /// `cxl_region_attach()`).
    RegionTarget,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub class: &'static str,
    pub site: &'static str,
    /// For an inline access: the member it reads.
    pub member: Option<&'static str>,
    /// Other uses that must be folded into it (sites of `also_at`).
    pub also: &'static [&'static str],
    /// Whether the fixed `cxl_mem` removes it (it comes from `cxl_mem_probe`).
    pub fixed_by_cxl_mem: bool,
    pub per: Per,
    /// One line on where it comes from.
    pub why: &'static str,
    /// Locks its reports must list as held, by name.
    pub held: &'static [&'static str],
}

/// The kernel's core (cxl_core, built in) on every kernel: `devm_cxl_enumerate_ports()` gets
/// the dport of the port above the endpoint with a lockless lookup and passes it to
/// `cxl_add_ep()` with no lock held.
pub const CORE_ADD_EP: Expected = Expected {
    class: "unlocked-use",
    site: "cxl_add_ep",
    member: None,
    also: &[],
    fixed_by_cxl_mem: false,
    per: Per::MemdevProbe,
    why: "devm_cxl_enumerate_ports() passes a lockless dport to cxl_add_ep() (core, not fixed by the cxl_mem patch)",
    held: &[],
};

/// `cxl_acpi` unbind: the root's devres runs `cxl_dport_remove()`, which erases the root
/// dport from `port->dports` without the root port's lock (the thread's first hunk).
pub const ROOT_ERASE: Expected = Expected {
    class: "unlocked-erase",
    site: "cxl_dport_remove",
    member: None,
    also: &[],
    fixed_by_cxl_mem: false,
    per: Per::RootDportTeardown,
    why: "cxl_dport_remove() erases a root dport without the root port's lock (the patch's write-side hunk, in cxl_core)",
    held: &[],
};

pub const KERNEL_6_1: &[Expected] = &[
    CORE_ADD_EP,
    Expected {
        class: "stale-use",
        site: "cxl_mem_probe",
        member: Some("port"),
        also: &["devm_cxl_add_port"],
        fixed_by_cxl_mem: true,
        per: Per::MemdevProbe,
        why: "cxl_mem_probe() loads the dport before device_lock(&parent_port->dev); the inlined devm_cxl_add_endpoint() reads parent_dport->port and passes it to devm_cxl_add_port() under that lock",
        held: &[],
    },
    ROOT_ERASE,
];

pub const KERNEL_6_12: &[Expected] = &[
    CORE_ADD_EP,
    Expected {
        class: "unlocked-use",
        site: "cxl_mem_probe",
        member: Some("rch"),
        also: &["cxl_dport_init_ras_reporting"],
        fixed_by_cxl_mem: true,
        per: Per::MemdevProbe,
        why: "cxl_mem_probe() reads dport->rch and calls cxl_dport_init_ras_reporting(dport) before taking any lock",
        held: &[],
    },
    Expected {
        class: "stale-use",
        site: "cxl_mem_probe",
        member: Some("port"),
        also: &["devm_cxl_add_port"],
        fixed_by_cxl_mem: true,
        per: Per::MemdevProbe,
        why: "under the endpoint parent's lock, the inlined devm_cxl_add_endpoint() reads parent_dport->port and passes the pointer loaded before the lock to devm_cxl_add_port()",
        held: &[],
    },
    ROOT_ERASE,
];

pub const KERNEL_7_2: &[Expected] = &[
    CORE_ADD_EP,
    Expected {
        class: "unlocked-use",
        site: "cxl_mem_probe",
        member: Some("rch"),
        also: &[],
        fixed_by_cxl_mem: true,
        per: Per::MemdevProbe,
        why: "cxl_mem_probe() reads dport->rch (cmpb $0x0,0x90(%rax) at +0x19a) before taking any lock: the seed's first unlocked dereference",
        held: &[],
    },
    Expected {
        class: "stale-use",
        site: "devm_cxl_add_endpoint",
        member: None,
        also: &["devm_cxl_add_port"],
        fixed_by_cxl_mem: true,
        per: Per::MemdevProbe,
        why: "cxl_mem_probe() passes the pointer loaded before scoped_guard(device, endpoint_parent) to devm_cxl_add_endpoint(), which hands it to devm_cxl_add_port()",
        held: &[],
    },
    ROOT_ERASE,
];

/// A manual region attach (`region-attach`): `cxl_region_attach()` looks the root port's
/// dport up for the target's host bridge and passes it to `cxl_region_attach_position()`
/// holding the region and DPA rw_semaphores, not the root dport's free lock
/// (`uport_dev->mutex`). Safe by ordering, docs/kernels.md says why; known in `known/`.
const fn region_attach(held: &'static [&'static str]) -> Expected {
    Expected {
        class: "unlocked-use",
        site: "cxl_region_attach_position",
        member: None,
        also: &[],
        fixed_by_cxl_mem: false,
        per: Per::RegionTarget,
        why: "cxl_region_attach() passes a root dport it looked up under cxl_rwsem.region, not the free lock, to cxl_region_attach_position() (region.c; safe by teardown order)",
        held,
    }
}

/// The region finding of a kernel, with the rw_semaphores it holds by their names there.
/// None on 6.1, whose `cxl_region_attach()` only compares the dport with the root decoder's
/// target for the position (region.c `cxl_region_validate_position()`): no dereference.
/// `rwsems` is the kernel's `region_rwsems`.
pub fn region(rwsems: Option<&'static [&'static str]>) -> Option<Expected> {
    rwsems.map(region_attach)
}

/// Dport sites (load, use, deref) a run must reach, at least.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CoverageFloor {
    pub load: u64,
    pub uses: u64,
    pub deref: u64,
}

/// What remains with the seed-fixed `cxl_mem` of the kernel whose rows are `stock`: the
/// core's findings.
pub fn fixed(stock: &[Expected]) -> Vec<Expected> {
    stock.iter().filter(|e| !e.fixed_by_cxl_mem).copied().collect()
}
