//! The kernel profile: everything the tracer needs that differs between kernel versions and
//! every CXL name it relies on, in one place, read from the running kernel's BTF and symbols
//! with fallbacks. Code asks the profile, never the release string; adding a kernel, or a
//! second object type, starts here.
//!
//! What differs across the kernels we run on (docs/kernels.md):
//! - member names: `cxl_port.uport_dev` was `uport` and `cxl_dport.dport_dev` was `dport`
//!   before 6.5 (6.1 has the old names);
//! - where the CXL core is: built into vmlinux (every Debian kernel: `CONFIG_CXL_BUS=y`) or
//!   the module `cxl_core` (a kernel built for cxl_test: `CONFIG_CXL_BUS=m`);
//! - which function registers a dport: `__devm_cxl_add_dport()` (6.12, 7.2) or
//!   `devm_cxl_add_dport()` itself (6.1);
//! - how the dport is allocated and freed: `devm_kzalloc(host)`, freed with the host's devres
//!   (6.1, 6.12), or `kzalloc()` freed by the devres action `free_dport()` registered on the
//!   host (7.2). Either way the host's `dev->mutex` is the dport's free lock; what differs is
//!   where the tracer sees the host the kernel really chose, and where it sees the free.
use std::{fmt, sync::Arc};

use btf_rs::{Btf, Type};
use rustc_hash::FxHashMap;
use tracer_common::{MEMBERS, Member, Offsets, SiteRole};

use super::{
    btf::{BtfError, KernelBtf, member_bit_offset, pointee_struct_name},
    callsites::{self, ArgValue, CallSite, Callee, CodeOf, CxlText, XaTarget},
    layout::Layout,
};
use crate::symbolize::{Symbol, Symbols};

/// A member the kernel side reads, with the names it has had (newest first).
pub struct MemberSpec {
    pub member: Member,
    pub strukt: &'static str,
    pub names: &'static [&'static str],
}

/// The one table of the members the kernel side reads: `Offsets` is filled from it by
/// `Member`, and the trace header and `doctor` name each offset from it.
pub const MEMBER_SPECS: [MemberSpec; MEMBERS] = [
    MemberSpec { member: Member::DportPort, strukt: "cxl_dport", names: &["port"] },
    MemberSpec { member: Member::DportDev, strukt: "cxl_dport", names: &["dport_dev", "dport"] },
    MemberSpec { member: Member::PortDev, strukt: "cxl_port", names: &["dev"] },
    MemberSpec { member: Member::PortUportDev, strukt: "cxl_port", names: &["uport_dev", "uport"] },
    MemberSpec { member: Member::PortDports, strukt: "cxl_port", names: &["dports"] },
    MemberSpec { member: Member::DeviceParent, strukt: "device", names: &["parent"] },
    MemberSpec { member: Member::DeviceMutex, strukt: "device", names: &["mutex"] },
    MemberSpec { member: Member::MutexOwner, strukt: "mutex", names: &["owner"] },
    MemberSpec { member: Member::DevresData, strukt: "devres", names: &["data"] },
];

/// The struct the rules are about.
pub const DPORT_STRUCT: &str = "cxl_dport";

/// Whether a module is CXL code (its functions are scanned for call, use and deref sites).
/// cxl_test's own builds (`cxl_mock`, `cxl_mock_mem`, `cxl_test`) are too.
pub fn is_cxl_module(name: &str) -> bool {
    name.starts_with("cxl")
}

/// Whether a vmlinux function is named after CXL (a built-in CXL core is found as a dense
/// run of them: `callsites::code_functions`).
fn is_cxl_name(name: &str) -> bool {
    name.to_ascii_lowercase().contains("cxl")
}

/// Where CXL code is, for the scanners.
pub const CXL_CODE: CodeOf = CodeOf { module: is_cxl_module, name: is_cxl_name };

/// Where a CXL function's source is, from the module it is in: the single-file drivers and
/// cxl_test's mocks by file, the core by directory (`None`: vmlinux, where the built-in core
/// is). Coverage names the files whose dport readers never ran.
pub fn source_file(module: Option<&str>) -> &'static str {
    match module {
        Some("cxl_mem") => "drivers/cxl/mem.c",
        Some("cxl_pci") => "drivers/cxl/pci.c",
        Some("cxl_acpi") => "drivers/cxl/acpi.c",
        Some("cxl_port") => "drivers/cxl/port.c",
        Some("cxl_pmem") => "drivers/cxl/pmem.c",
        Some("cxl_test") => "tools/testing/cxl/test/cxl.c",
        Some("cxl_mock") => "tools/testing/cxl/test/mock.c",
        Some("cxl_mock_mem") => "tools/testing/cxl/test/mem.c",
        _ => "drivers/cxl/core/",
    }
}

/// Dport readers no guest of this project can run, with the reason (docs/kernels.md):
/// coverage marks them, so a gap a workload could close stands out from one it cannot.
pub const UNREACHABLE: [(&str, &str); 2] = [
    (
        "rcd_pcie_cap_emit",
        "its rcd_link_* attributes exist only on an RCD, a cxl_pci device below an RCH: QEMU emulates no RCH, and cxl_test's RCD is a platform device",
    ),
    (
        "cxl_handle_rdport_errors",
        "an RCH downstream port's RAS errors, reported through an RCEC: real RCH hardware only",
    ),
];

/// Why no guest here can run `function` (or a part of it the compiler split off:
/// `rcd_pcie_cap_emit.isra.0`, `.cold`), if that is so.
pub fn unreachable(function: &str) -> Option<&'static str> {
    let base = function.split('.').next().unwrap_or(function);
    UNREACHABLE.iter().find(|(f, _)| *f == base).map(|(_, why)| *why)
}

/// The module the CXL core is when it is not built into vmlinux (`CONFIG_CXL_BUS=m`).
pub const CORE_MODULE: &str = "cxl_core";

/// Functions only the CXL core has: where one of them is, the core is.
const CORE_MARKERS: [&str; 2] = ["match_port_by_dport", "__devm_cxl_add_dport"];

/// The CXL driver modules a dport needs to be looked up by a memdev probe: the root
/// (`cxl_acpi`) and the memdev driver (`cxl_mem`). `cxl_pci` is not among them: it makes
/// memdevs of PCI devices, and cxl_test's mock memdevs come without it; a module loaded
/// after the tracer started is probed then.
pub const DRIVER_MODULES: [&str; 2] = ["cxl_acpi", "cxl_mem"];

/// Functions that register a dport and return it, innermost first: the registration probe
/// goes on the first this kernel has (every registration path goes through it).
const REGISTRATION: [&str; 2] = ["__devm_cxl_add_dport", "devm_cxl_add_dport"];

/// The devres action that frees a `kzalloc`'d dport (drivers/cxl/core/port.c, v7.2).
const FREE_ACTION: &str = "free_dport";
/// What registers a devres action: `__devm_add_action(dev, action, data, name)`.
const ADD_ACTION: &str = "__devm_add_action";
/// What allocates a devm dport: `devm_kzalloc(host, ...)` is `devm_kmalloc(host, ...)`.
const DEVM_ALLOC: &str = "devm_kmalloc";
/// The lockless lookup readers use (an inline in `drivers/cxl/cxl.h`).
const LOOKUP: &str = "xa_load";

/// The callee whose calls in the devres core free a devm dport's node.
pub const KFREE: Callee = Callee { name: "kfree", call: SiteRole::FreeCall, ret: None, caller: None, arg: 0 };

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(
        "kernel {release}: BTF has no struct {strukt}: is the CXL core in this kernel (CONFIG_CXL_BUS), and its module (cxl_core) loaded?"
    )]
    MissingStruct { release: String, strukt: &'static str },
    #[error("kernel {release}: BTF struct {strukt} has none of the members {} (the tracer knows these names for it; a kernel that renamed it again needs a profile update)", .tried.join(", "))]
    MissingMember { release: String, strukt: &'static str, tried: &'static [&'static str] },
    #[error("kernel {release}: BTF struct {strukt} member {member} is a bitfield")]
    Bitfield { release: String, strukt: &'static str, member: &'static str },
    #[error(
        "--xa-load direct: xa_load is notrace on this kernel (lib/ is built without ftrace), so it cannot be probed itself; the default, --xa-load callsites, probes its calls in CXL code"
    )]
    XaLoadNotTraceable,
    #[error(transparent)]
    Btf(#[from] BtfError),
}

/// One member as found in this kernel's BTF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedMember {
    pub member: Member,
    pub strukt: &'static str,
    /// The name this kernel uses.
    pub name: &'static str,
    /// The names tried, newest first.
    pub tried: &'static [&'static str],
    pub offset: u64,
}

/// Where the CXL core's code is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CxlCore {
    /// Built into vmlinux (`CONFIG_CXL_BUS=y`).
    BuiltIn,
    /// A loaded module (`CONFIG_CXL_BUS=m`): its functions are module functions.
    Module(Arc<str>),
    /// Neither: no CXL core in this kernel, or its module is not loaded.
    Missing,
}

/// How the tracer sees a dport registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Registration {
    /// fexit on the registration function in vmlinux: its argument 0 is the port.
    Fexit { function: &'static str },
    /// A kretprobe on the registration function in a module (aya attaches fexit to vmlinux
    /// functions only): the port is read from the returned dport's `port`.
    Return { module: Arc<str>, function: &'static str },
}

impl Registration {
    pub fn function(&self) -> &'static str {
        match self {
            Registration::Fexit { function } | Registration::Return { function, .. } => function,
        }
    }
}

/// Where the tracer sees the devres host a dport was really given, to cross-check the
/// model's free lock at registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostCheck {
    /// `devm_kmalloc(host, ...)` called by the registration function returns the dport.
    DevmAlloc { caller: &'static str },
    /// `__devm_add_action(host, free_dport, dport)` registers the action that frees it.
    FreeAction { action_addr: u64 },
}

/// How this kernel allocates and frees a dport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// `devm_kzalloc(host)`: freed as part of its devres node, `kfree(node)` where
    /// node = dport − `devres.data` (6.1, 6.12).
    Devm,
    /// `kzalloc()`, freed by the devres action `free_dport(dport)` (7.2).
    FreeAction,
}

/// Where the tracer sees a dport's memory freed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FreePath {
    /// The devres action that frees a dport, `free_dport(dport)`: fentry in vmlinux, else
    /// (refused, or in a module) a kprobe at its entry.
    Action { function: &'static str, module: Option<Arc<str>> },
    /// The `kfree` calls of the devres core, where a devm dport's node is freed: kprobes.
    DevresKfree { sites: Vec<CallSite> },
    /// The `kfree` raw tracepoint: every kfree in the system pays a map lookup (the fallback).
    Tracepoint,
}

impl FreePath {
    pub fn describe(&self) -> String {
        match self {
            FreePath::Action { function, module: None } => {
                format!("fentry on {function}() (a kprobe if fentry is refused)")
            }
            FreePath::Action { function, module: Some(module) } => {
                format!("a kprobe at the entry of {function}() [{module}]")
            }
            FreePath::DevresKfree { sites } => {
                format!("kprobes at the {} kfree calls of the devres core (drivers/base/devres.c)", sites.len())
            }
            FreePath::Tracepoint => "the kfree raw tracepoint (every kfree in the system pays a map lookup)".into(),
        }
    }
}

/// What the profile is resolved from.
pub struct Facts<'a> {
    pub btf: &'a KernelBtf,
    pub symbols: &'a Symbols,
    /// `uname -r`.
    pub release: &'a str,
    /// Whether tracefs lists `xa_load` as traceable (a kernel whose lib/ has ftrace).
    pub xa_load_traceable: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub release: String,
    pub members: Vec<ResolvedMember>,
    pub offsets: Offsets,
    pub core: CxlCore,
    pub lifetime: Lifetime,
    /// Why `lifetime` was chosen.
    pub lifetime_why: String,
    /// How registrations are seen, if this kernel has a registration function out of line.
    pub registration: Option<Registration>,
    pub host_check: Option<HostCheck>,
    /// `struct cxl_dport` as this kernel lays it out: what an inline access touches.
    pub dport: Layout,
    /// Where frees are seen, and why.
    pub free: FreePath,
    pub free_why: String,
    pub xa_load_traceable: bool,
}

impl Profile {
    /// Resolves the profile of the kernel these facts are about. `devres_frees` finds the
    /// devres core's `kfree` calls: asked only on a kernel whose dports are devm allocations.
    pub fn resolve(
        facts: &Facts,
        devres_frees: impl FnOnce() -> anyhow::Result<Vec<CallSite>>,
    ) -> anyhow::Result<Profile> {
        let Facts { btf, symbols, xa_load_traceable, .. } = *facts;
        let release = facts.release.trim().to_owned();
        let mut members = Vec::with_capacity(MEMBERS);
        let mut offsets = Offsets::ZERO;
        for spec in &MEMBER_SPECS {
            let member = resolve_member(btf, spec, &release)?;
            offsets.set(spec.member, member.offset);
            members.push(member);
        }
        let core = core_location(symbols);
        let in_core = |s: &&Symbol| match (&s.module, &core) {
            (None, _) => true,
            (Some(module), CxlCore::Module(core)) => module == core,
            _ => false,
        };
        let in_vmlinux = |name: &str| symbols.lookup(name).any(|s| s.module.is_none());
        let registration = REGISTRATION.into_iter().find_map(|function| {
            let symbol = symbols.lookup(function).find(in_core)?;
            returns_dport_of_port(btf, function).then(|| match &symbol.module {
                None => Registration::Fexit { function },
                Some(module) => Registration::Return { module: module.clone(), function },
            })
        });
        let free_action = symbols.lookup(FREE_ACTION).find(in_core);
        let (lifetime, lifetime_why, host_check) = match free_action {
            Some(action) if in_vmlinux(ADD_ACTION) => (
                Lifetime::FreeAction,
                format!(
                    "the kernel has {FREE_ACTION}(): dports are kzalloc'd and freed by that devres action on their host"
                ),
                Some(HostCheck::FreeAction { action_addr: action.addr }),
            ),
            Some(_) => (
                Lifetime::FreeAction,
                format!("the kernel has {FREE_ACTION}(), but no {ADD_ACTION}() to see its host by"),
                None,
            ),
            None => (
                Lifetime::Devm,
                format!(
                    "no {FREE_ACTION}() in the kernel: dports are devm_kzalloc'd on their host and freed with its devres"
                ),
                registration
                    .as_ref()
                    .filter(|_| in_vmlinux(DEVM_ALLOC))
                    .map(|r| HostCheck::DevmAlloc { caller: r.function() }),
            ),
        };
        let (dport_btf, dport_def) = btf
            .find_struct(DPORT_STRUCT)
            .map_err(|_| ProfileError::MissingStruct { release: release.clone(), strukt: DPORT_STRUCT })?;
        let dport = Layout::of(dport_btf, &dport_def).map_err(ProfileError::Btf)?;
        let (free, free_why) = match (lifetime.clone(), free_action) {
            (Lifetime::FreeAction, Some(action)) => (
                FreePath::Action { function: FREE_ACTION, module: action.module.clone() },
                format!("{FREE_ACTION}() frees every registered dport: nothing else needs watching"),
            ),
            (Lifetime::FreeAction, None) => (FreePath::Tracepoint, format!("no {FREE_ACTION}() symbol to probe")),
            (Lifetime::Devm, _) => {
                let sites = devres_frees()?;
                if sites.is_empty() {
                    (
                        FreePath::Tracepoint,
                        "no kfree call found in the devres core (devres_release_all and its neighbours)".into(),
                    )
                } else {
                    (
                        FreePath::DevresKfree { sites },
                        "a devm dport is freed with its devres node, by the devres core's kfree calls".into(),
                    )
                }
            }
        };
        Ok(Profile {
            release,
            members,
            offsets,
            core,
            lifetime,
            lifetime_why,
            registration,
            host_check,
            dport,
            free,
            free_why,
            xa_load_traceable,
        })
    }

    /// `struct.member` = offset, for the trace header and `doctor`.
    pub fn named_offsets(&self) -> Vec<(String, u64)> {
        self.members.iter().map(|m| (format!("{}.{}", m.strukt, m.name), m.offset)).collect()
    }

    /// The callees whose call sites in CXL code are probed: the xarray and mutex API
    /// (`callsites::CALLEES`) without the mutex calls when the global lock hook replaces
    /// them and without `xa_load` when it is probed directly, and the one the devres host
    /// cross-check needs.
    pub fn callees(&self, global_lock_hook: bool, direct_xa_load: bool) -> Vec<Callee> {
        callsites::CALLEES
            .iter()
            .copied()
            .filter(|c| !(global_lock_hook && c.name.starts_with("mutex_")))
            .filter(|c| !(direct_xa_load && c.name == LOOKUP))
            .chain(self.host_check_callee())
            .collect()
    }

    /// The call sites the host cross-check probes, with their roles.
    pub fn host_check_callee(&self) -> Option<Callee> {
        match self.host_check.as_ref()? {
            HostCheck::DevmAlloc { caller } => Some(Callee {
                name: DEVM_ALLOC,
                call: SiteRole::HostAllocCall,
                ret: Some(SiteRole::HostAllocReturn),
                caller: Some(caller),
                arg: 0,
            }),
            HostCheck::FreeAction { .. } => {
                Some(Callee { name: ADD_ACTION, call: SiteRole::HostActionCall, ret: None, caller: None, arg: 0 })
            }
        }
    }

    /// The address the kernel side compares `__devm_add_action`'s action with (0: none).
    pub fn free_action_addr(&self) -> u64 {
        match self.host_check {
            Some(HostCheck::FreeAction { action_addr }) => action_addr,
            _ => 0,
        }
    }

    /// `free_dport`'s address now, after the module holding it was loaded again elsewhere;
    /// `None` when the kernel has no free action or it did not move.
    pub fn free_action_moved(&mut self, symbols: &Symbols) -> Option<u64> {
        let FreePath::Action { function, module } = &self.free else { return None };
        let now = symbols.lookup(function).find(|s| s.module == *module)?.addr;
        match &mut self.host_check {
            Some(HostCheck::FreeAction { action_addr }) if *action_addr != now => {
                *action_addr = now;
                Some(now)
            }
            _ => None,
        }
    }

    /// `__devm_add_action` is called for every devres action in CXL code; only the calls that
    /// add the free action say where a dport lives. Keeps those, those whose action argument
    /// is not known statically, and the calls of every other callee.
    pub fn keep_host_check_calls(&self, calls: &mut Vec<CallSite>, text: &CxlText) {
        let action = self.free_action_addr();
        if action == 0 {
            return;
        }
        let code: FxHashMap<u64, &[u8]> = text.functions.iter().map(|(f, c)| (f.addr, c.as_slice())).collect();
        calls.retain(|c| {
            c.callee.call != SiteRole::HostActionCall
                || code
                    .get(&c.function_addr)
                    .and_then(|code| {
                        callsites::arg_before_call(c.function_addr, code, c.offset, iced_x86::Register::RSI)
                    })
                    .is_none_or(|rsi| rsi == action)
        });
    }

    /// Tells, for every xarray call, which xarray it is from the address its code passes:
    /// a register plus `cxl_port.dports`' offset is a dports xarray (`lea 0x318(%rbx),%rdi`),
    /// another displacement another member (not probed); anything else is not known.
    pub fn classify_xarrays(&self, calls: &mut [CallSite]) {
        let dports = self.offsets.get(Member::PortDports) as i64;
        for call in calls {
            if !matches!(call.callee.call, SiteRole::LoadCall | SiteRole::EraseCall | SiteRole::StoreCall) {
                continue;
            }
            call.xarray = match call.rdi {
                ArgValue::Offset(d) if d == dports => XaTarget::Dports,
                ArgValue::Offset(_) => XaTarget::Other,
                _ => XaTarget::Unknown,
            };
        }
    }

    /// Whether `xa_load` itself is probed instead of its call sites: when asked (it must be
    /// traceable), or when CXL code has no call of it but it is traceable.
    pub fn probe_xa_load_directly(&self, asked: bool, calls: &[CallSite]) -> Result<bool, ProfileError> {
        if asked && !self.xa_load_traceable {
            return Err(ProfileError::XaLoadNotTraceable);
        }
        Ok(asked || self.xa_load_traceable && !calls.iter().any(|c| c.callee.name == LOOKUP && !c.tail))
    }

    /// The callee `xa_load` is, for probing it directly.
    pub fn lookup_callee() -> &'static Callee {
        callsites::CALLEES.iter().find(|c| c.name == LOOKUP).expect("xa_load is a callee")
    }
}

/// Where the CXL core is, from the symbols of its own functions.
pub fn core_location(symbols: &Symbols) -> CxlCore {
    let mut found = CORE_MARKERS.iter().flat_map(|name| symbols.lookup(name));
    match found.next() {
        None => CxlCore::Missing,
        Some(Symbol { module: None, .. }) => CxlCore::BuiltIn,
        Some(Symbol { module: Some(module), .. }) => CxlCore::Module(module.clone()),
    }
}

impl fmt::Display for Profile {
    /// What `doctor` prints: which profile matched and why.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shape = match self.lifetime {
            Lifetime::Devm => "devm dports (devm_kzalloc on the host, freed with its devres)",
            Lifetime::FreeAction => "kzalloc'd dports freed by the devres action free_dport()",
        };
        writeln!(f, "profile: {shape}")?;
        writeln!(f, "  because {}", self.lifetime_why)?;
        let core = match &self.core {
            CxlCore::BuiltIn => "built into vmlinux".to_owned(),
            CxlCore::Module(module) => format!("the module {module}"),
            CxlCore::Missing => "not found (no CXL core function in the kernel's symbols)".to_owned(),
        };
        writeln!(f, "  cxl core: {core}")?;
        let renamed: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.tried.len() > 1)
            .map(|m| {
                let newest = m.tried[0];
                if m.name == newest {
                    format!("{}.{} (the current name)", m.strukt, m.name)
                } else {
                    format!("{}.{} (an older name of {})", m.strukt, m.name, newest)
                }
            })
            .collect();
        writeln!(f, "  members: {}", renamed.join(", "))?;
        writeln!(
            f,
            "  struct cxl_dport: {} bytes, {} members at any depth (for inline accesses)",
            self.dport.size,
            self.dport.members.len()
        )?;
        match &self.registration {
            Some(Registration::Fexit { function }) => writeln!(
                f,
                "  registration: fexit on {function}() (returns the new struct cxl_dport *, the port is its argument 0)"
            )?,
            Some(Registration::Return { module, function }) => writeln!(
                f,
                "  registration: kretprobe on {function}() [{module}] (returns the new struct cxl_dport *, its port read from it)"
            )?,
            None => writeln!(
                f,
                "  registration: none of {} is out of line in the CXL core: dports are only discovered at their first lookup",
                REGISTRATION.join(", ")
            )?,
        }
        match &self.host_check {
            Some(HostCheck::DevmAlloc { caller }) => writeln!(
                f,
                "  devres host: seen at {DEVM_ALLOC}(host, ...) called by {caller}(), which returns the dport"
            )?,
            Some(HostCheck::FreeAction { action_addr }) => writeln!(
                f,
                "  devres host: seen at {ADD_ACTION}(host, {FREE_ACTION} = {action_addr:#x}, dport) in CXL code"
            )?,
            None => {
                writeln!(f, "  devres host: not observable on this kernel: the model's free lock is not cross-checked")?
            }
        }
        writeln!(f, "  frees: {}, because {}", self.free.describe(), self.free_why)
    }
}

fn resolve_member(btf: &KernelBtf, spec: &MemberSpec, release: &str) -> Result<ResolvedMember, ProfileError> {
    let (btf, def) = btf
        .find_struct(spec.strukt)
        .map_err(|_| ProfileError::MissingStruct { release: release.to_owned(), strukt: spec.strukt })?;
    for &name in spec.names {
        if let Some(bits) = member_bit_offset(btf, &def, name)? {
            if bits % 8 != 0 {
                return Err(ProfileError::Bitfield { release: release.to_owned(), strukt: spec.strukt, member: name });
            }
            return Ok(ResolvedMember {
                member: spec.member,
                strukt: spec.strukt,
                name,
                tried: spec.names,
                offset: u64::from(bits / 8),
            });
        }
    }
    Err(ProfileError::MissingMember { release: release.to_owned(), strukt: spec.strukt, tried: spec.names })
}

/// Whether BTF (vmlinux's or a module's) has function `name` returning `struct cxl_dport *`
/// with a `struct cxl_port *` first parameter: the shape the registration probe reads.
fn returns_dport_of_port(btf: &KernelBtf, name: &str) -> bool {
    btf.all().any(|btf| function_returns_dport_of_port(btf, name))
}

fn function_returns_dport_of_port(btf: &Btf, name: &str) -> bool {
    let Ok(types) = btf.resolve_types_by_name(name) else { return false };
    types.iter().any(|t| {
        let Type::Func(func) = t else { return false };
        let Ok(Type::FuncProto(proto)) = btf.resolve_chained_type(func) else { return false };
        let returns = btf.resolve_type_by_id(proto.return_type_id()).ok().and_then(|r| pointee_struct_name(btf, &r));
        let first = proto
            .parameters
            .first()
            .and_then(|p| btf.resolve_chained_type(p).ok())
            .and_then(|p| pointee_struct_name(btf, &p));
        returns.as_deref() == Some(DPORT_STRUCT) && first.as_deref() == Some("cxl_port")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> KernelBtf {
        KernelBtf::load(std::path::Path::new("/sys/kernel/btf"), &[])
            .expect("the host kernel has BTF (/sys/kernel/btf/vmlinux)")
    }

    #[test]
    fn the_member_table_names_every_member_once() {
        for member in Member::ALL {
            let specs = MEMBER_SPECS.iter().filter(|s| s.member == member).count();
            assert_eq!(specs, 1, "{member:?} has {specs} entries in MEMBER_SPECS");
        }
    }

    // The host kernel has no CXL, but `struct device` and `struct mutex` show the mechanism.
    #[test]
    fn a_member_resolves_to_the_first_name_the_kernel_has() {
        let btf = host();
        let spec = MemberSpec { member: Member::DeviceParent, strukt: "device", names: &["no_such_member", "parent"] };
        let m = resolve_member(&btf, &spec, "test").unwrap();
        assert_eq!(m.name, "parent");
        assert!(m.offset > 0);
        let newest = MemberSpec { member: Member::MutexOwner, strukt: "mutex", names: &["owner", "wait_lock"] };
        assert_eq!(resolve_member(&btf, &newest, "test").unwrap().name, "owner");
    }

    #[test]
    fn a_missing_member_names_the_struct_the_names_and_the_kernel() {
        let btf = host();
        let spec = MemberSpec { member: Member::PortUportDev, strukt: "device", names: &["uport_dev", "uport"] };
        let err = resolve_member(&btf, &spec, "6.1.0-57-amd64").unwrap_err().to_string();
        assert!(
            err.contains("6.1.0-57-amd64") && err.contains("struct device") && err.contains("uport_dev, uport"),
            "{err}"
        );
        let spec = MemberSpec { member: Member::DportPort, strukt: "no_such_struct_xyz", names: &["x"] };
        let err = resolve_member(&btf, &spec, "7.2.13+deb14-amd64").unwrap_err().to_string();
        assert!(err.contains("7.2.13+deb14-amd64") && err.contains("no struct no_such_struct_xyz"), "{err}");
    }

    #[test]
    fn the_registration_shape_is_read_from_the_function_prototype() {
        // No CXL on the host: the check must say no for a function of another shape.
        let btf = host();
        assert!(!returns_dport_of_port(&btf, "device_add"));
        assert!(!returns_dport_of_port(&btf, "no_such_function_xyz"));
    }

    #[test]
    fn the_core_is_where_its_own_functions_are() {
        let symbols = |text: &str| Symbols::parse(text.as_bytes()).unwrap();
        let built_in = symbols("ffffffff81000000 t match_port_by_dport\nffffffff81000100 T xa_load\n");
        assert_eq!(core_location(&built_in), CxlCore::BuiltIn);
        let module = symbols(
            "ffffffff81000100 T xa_load\nffffffffc0010000 t match_port_by_dport\t[cxl_core]\nffffffffc0010100 t cxl_port_probe\t[cxl_core]\n",
        );
        assert_eq!(core_location(&module), CxlCore::Module(Arc::from("cxl_core")));
        assert_eq!(core_location(&symbols("ffffffff81000100 T xa_load\n")), CxlCore::Missing);
    }
}
