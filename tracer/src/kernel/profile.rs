//! The kernel profile: everything the tracer needs that differs between kernel versions, in
//! one place, read from the running kernel's BTF and symbols with fallbacks. Code asks the
//! profile, never the release string.
//!
//! What differs across the kernels we run on (DESIGN §7):
//! - member names: `cxl_port.uport_dev` was `uport` and `cxl_dport.dport_dev` was `dport`
//!   before 6.5 (6.1 has the old names);
//! - which function registers a dport: `__devm_cxl_add_dport()` (6.12, 7.2) or
//!   `devm_cxl_add_dport()` itself (6.1);
//! - how the dport is allocated and freed: `devm_kzalloc(host)`, freed with the host's devres
//!   (6.1, 6.12), or `kzalloc()` freed by the devres action `free_dport()` registered on the
//!   host (7.2). Either way the host's `dev->mutex` is the dport's free lock; what differs is
//!   where the tracer sees the host the kernel really chose, and where it sees the free.
use std::fmt;

use btf_rs::{Btf, Type};
use tracer_common::{Offsets, SiteRole};

use super::{
    btf::{BtfError, KernelBtf, find_struct, member_bit_offset, pointee_struct_name},
    callsites::Callee,
    derefs::Layout,
};
use crate::symbolize::Symbols;

/// A member the kernel side reads, with the names it has had (newest first).
pub struct MemberSpec {
    pub strukt: &'static str,
    pub names: &'static [&'static str],
}

/// In the order of `Offsets`' fields.
pub const MEMBERS: [MemberSpec; 9] = [
    MemberSpec { strukt: "cxl_dport", names: &["port"] },
    MemberSpec { strukt: "cxl_dport", names: &["dport_dev", "dport"] },
    MemberSpec { strukt: "cxl_port", names: &["dev"] },
    MemberSpec { strukt: "cxl_port", names: &["uport_dev", "uport"] },
    MemberSpec { strukt: "cxl_port", names: &["dports"] },
    MemberSpec { strukt: "device", names: &["parent"] },
    MemberSpec { strukt: "device", names: &["mutex"] },
    MemberSpec { strukt: "mutex", names: &["owner"] },
    MemberSpec { strukt: "devres", names: &["data"] },
];

/// Functions that register a dport and return it, innermost first: the fexit goes on the
/// first this kernel has (every registration path goes through it).
const REGISTRATION: [&str; 2] = ["__devm_cxl_add_dport", "devm_cxl_add_dport"];

/// The devres action that frees a `kzalloc`'d dport (drivers/cxl/core/port.c, v7.2).
const FREE_ACTION: &str = "free_dport";
/// What registers a devres action: `__devm_add_action(dev, action, data, name)`.
const ADD_ACTION: &str = "__devm_add_action";
/// What allocates a devm dport: `devm_kzalloc(host, ...)` is `devm_kmalloc(host, ...)`.
const DEVM_ALLOC: &str = "devm_kmalloc";

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("kernel {release}: BTF has no struct {strukt}: is the CXL core built into this kernel (CONFIG_CXL_BUS)?")]
    MissingStruct { release: String, strukt: &'static str },
    #[error("kernel {release}: BTF struct {strukt} has none of the members {} (the tracer knows these names for it; a kernel that renamed it again needs a profile update)", .tried.join(", "))]
    MissingMember { release: String, strukt: &'static str, tried: &'static [&'static str] },
    #[error("kernel {release}: BTF struct {strukt} member {member} is a bitfield")]
    Bitfield { release: String, strukt: &'static str, member: &'static str },
    #[error(transparent)]
    Btf(#[from] BtfError),
}

/// One member as found in this kernel's BTF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedMember {
    pub strukt: &'static str,
    /// The name this kernel uses.
    pub name: &'static str,
    /// The names tried, newest first.
    pub tried: &'static [&'static str],
    pub offset: u64,
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
    /// The devres action that frees a dport, `free_dport(dport)`: fentry, else a kprobe.
    Action { function: &'static str },
    /// The `kfree` calls of the devres core, where a devm dport's node is freed: kprobes.
    DevresKfree,
    /// The `kfree` raw tracepoint: every kfree in the system pays a map lookup (the fallback).
    Tracepoint,
}

impl FreePath {
    pub fn describe(&self) -> String {
        match self {
            FreePath::Action { function } => format!("fentry on {function}() (a kprobe if fentry is refused)"),
            FreePath::DevresKfree => "kprobes at the kfree calls of the devres core (drivers/base/devres.c)".into(),
            FreePath::Tracepoint => "the kfree raw tracepoint (every kfree in the system pays a map lookup)".into(),
        }
    }
}

/// The callee whose calls in the devres core free a devm dport's node.
pub const KFREE: Callee = Callee { name: "kfree", call: SiteRole::FreeCall, ret: None, caller: None };

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub release: String,
    pub members: Vec<ResolvedMember>,
    pub offsets: Offsets,
    pub lifetime: Lifetime,
    /// Why `lifetime` was chosen.
    pub lifetime_why: String,
    /// The registration function the fexit goes on, if this kernel has one out of line.
    pub registration: Option<&'static str>,
    pub host_check: Option<HostCheck>,
    /// `struct cxl_dport` as this kernel lays it out: what an inline access touches.
    pub dport: Layout,
    /// Where frees are seen, and why.
    pub free: FreePath,
    pub free_why: String,
}

impl Profile {
    /// Resolves the profile of the kernel whose BTF and symbols these are.
    pub fn resolve(btf: &KernelBtf, symbols: &Symbols, release: &str) -> Result<Profile, ProfileError> {
        let release = release.trim().to_owned();
        let mut members = Vec::with_capacity(MEMBERS.len());
        for spec in &MEMBERS {
            members.push(resolve_member(&btf.vmlinux, spec, &release)?);
        }
        let at = |i: usize| members[i].offset;
        let offsets = Offsets {
            dport_port: at(0),
            dport_dev: at(1),
            port_dev: at(2),
            port_uport_dev: at(3),
            port_dports: at(4),
            device_parent: at(5),
            device_mutex: at(6),
            mutex_owner: at(7),
            devres_data: at(8),
        };
        let in_vmlinux = |name: &str| symbols.lookup(name).any(|s| s.module.is_none());
        let registration =
            REGISTRATION.into_iter().find(|name| in_vmlinux(name) && returns_dport_of_port(&btf.vmlinux, name));
        let free_action = symbols.lookup(FREE_ACTION).find(|s| s.module.is_none()).map(|s| s.addr);
        let (lifetime, lifetime_why, host_check) = match free_action {
            Some(action_addr) if in_vmlinux(ADD_ACTION) => (
                Lifetime::FreeAction,
                format!(
                    "the kernel has {FREE_ACTION}(): dports are kzalloc'd and freed by that devres action on their host"
                ),
                Some(HostCheck::FreeAction { action_addr }),
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
                registration.filter(|_| in_vmlinux(DEVM_ALLOC)).map(|caller| HostCheck::DevmAlloc { caller }),
            ),
        };
        let dport = Layout::from_btf(&btf.vmlinux, "cxl_dport")
            .map_err(|_| ProfileError::MissingStruct { release: release.clone(), strukt: "cxl_dport" })?;
        let (free, free_why) = match lifetime {
            Lifetime::FreeAction if free_action.is_some() => (
                FreePath::Action { function: FREE_ACTION },
                format!("{FREE_ACTION}() frees every registered dport: nothing else needs watching"),
            ),
            Lifetime::FreeAction => (FreePath::Tracepoint, format!("no {FREE_ACTION}() symbol to probe")),
            Lifetime::Devm => (
                FreePath::DevresKfree,
                "a devm dport is freed with its devres node, by the devres core's kfree calls".into(),
            ),
        };
        Ok(Profile {
            release,
            members,
            offsets,
            lifetime,
            lifetime_why,
            registration,
            host_check,
            dport,
            free,
            free_why,
        })
    }

    /// `struct.member` = offset, for the trace header and `doctor`.
    pub fn named_offsets(&self) -> Vec<(String, u64)> {
        self.members.iter().map(|m| (format!("{}.{}", m.strukt, m.name), m.offset)).collect()
    }

    /// The call sites the host cross-check probes, with their roles.
    pub fn host_check_callee(&self) -> Option<Callee> {
        match self.host_check.as_ref()? {
            HostCheck::DevmAlloc { caller } => Some(Callee {
                name: DEVM_ALLOC,
                call: SiteRole::HostAllocCall,
                ret: Some(SiteRole::HostAllocReturn),
                caller: Some(caller),
            }),
            HostCheck::FreeAction { .. } => {
                Some(Callee { name: ADD_ACTION, call: SiteRole::HostActionCall, ret: None, caller: None })
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
        match self.registration {
            Some(name) => writeln!(
                f,
                "  registration: {name}() (returns the new struct cxl_dport *, the port is its argument 0)"
            )?,
            None => writeln!(
                f,
                "  registration: none of {} is out of line in vmlinux: dports are only discovered at their first lookup",
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

fn resolve_member(btf: &Btf, spec: &MemberSpec, release: &str) -> Result<ResolvedMember, ProfileError> {
    let def = find_struct(btf, spec.strukt)
        .map_err(|_| ProfileError::MissingStruct { release: release.to_owned(), strukt: spec.strukt })?;
    for &name in spec.names {
        if let Some(bits) = member_bit_offset(btf, &def, name)? {
            if bits % 8 != 0 {
                return Err(ProfileError::Bitfield { release: release.to_owned(), strukt: spec.strukt, member: name });
            }
            return Ok(ResolvedMember { strukt: spec.strukt, name, tried: spec.names, offset: u64::from(bits / 8) });
        }
    }
    Err(ProfileError::MissingMember { release: release.to_owned(), strukt: spec.strukt, tried: spec.names })
}

/// Whether BTF has function `name` returning `struct cxl_dport *` with a `struct cxl_port *`
/// first parameter: the shape the registration fexit reads.
fn returns_dport_of_port(btf: &Btf, name: &str) -> bool {
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
        returns.as_deref() == Some("cxl_dport") && first.as_deref() == Some("cxl_port")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Btf {
        Btf::from_file("/sys/kernel/btf/vmlinux").expect("the host kernel has BTF (/sys/kernel/btf/vmlinux)")
    }

    // The host kernel has no CXL, but `struct device` and `struct mutex` show the mechanism.
    #[test]
    fn a_member_resolves_to_the_first_name_the_kernel_has() {
        let btf = host();
        let spec = MemberSpec { strukt: "device", names: &["no_such_member", "parent"] };
        let m = resolve_member(&btf, &spec, "test").unwrap();
        assert_eq!(m.name, "parent");
        assert!(m.offset > 0);
        let newest = MemberSpec { strukt: "mutex", names: &["owner", "wait_lock"] };
        assert_eq!(resolve_member(&btf, &newest, "test").unwrap().name, "owner");
    }

    #[test]
    fn a_missing_member_names_the_struct_the_names_and_the_kernel() {
        let btf = host();
        let spec = MemberSpec { strukt: "device", names: &["uport_dev", "uport"] };
        let err = resolve_member(&btf, &spec, "6.1.0-57-amd64").unwrap_err().to_string();
        assert!(
            err.contains("6.1.0-57-amd64") && err.contains("struct device") && err.contains("uport_dev, uport"),
            "{err}"
        );
        let spec = MemberSpec { strukt: "no_such_struct_xyz", names: &["x"] };
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
}
