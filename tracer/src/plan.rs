//! The probe plan: every site the kernel side will watch on this kernel, from the call
//! sites found in CXL code and the use sites BTF lists, resolved against the symbols, and
//! where each kprobe goes.
use std::{collections::HashMap, sync::Arc};

use tracer_common::{SITE_DIRECT, SITE_UNPAIRED_OK, SiteInfo, SiteRole};

use crate::{
    coverage::SiteKind,
    event::Access,
    kernel::{
        btf::DportFunction,
        callsites::{CallSite, Callee, XaTarget},
        derefs::DerefSite,
        profile::{FreePath, Profile, Registration},
    },
    resolve::SiteName,
    symbolize::{Symbol, Symbols},
};

/// Where a kprobe goes: `[MODULE:]SYMBOL+OFFSET`, or a raw address for a symbol whose name
/// is not unique in vmlinux; or the return of a function (a kretprobe).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ProbePoint {
    Symbol { module: Option<String>, symbol: String, offset: u64 },
    Address(u64),
    Return { module: Option<String>, symbol: String },
}

impl ProbePoint {
    /// The probe's location as kprobe_events takes it.
    pub fn spec(&self) -> String {
        match self {
            ProbePoint::Symbol { module: Some(m), symbol, offset } => format!("{m}:{symbol}+{offset:#x}"),
            ProbePoint::Symbol { module: None, symbol, offset } => format!("{symbol}+{offset:#x}"),
            ProbePoint::Address(addr) => format!("{addr:#x}"),
            ProbePoint::Return { module: Some(m), symbol } => format!("{m}:{symbol}"),
            ProbePoint::Return { module: None, symbol } => symbol.clone(),
        }
    }

    /// `p` for a kprobe, `r` for a kretprobe.
    pub fn kind(&self) -> char {
        match self {
            ProbePoint::Return { .. } => 'r',
            _ => 'p',
        }
    }
}

/// One kprobe: where, and what the kernel side does there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedSite {
    pub role: SiteRole,
    /// For a use: which argument is the dport.
    pub arg: u32,
    pub point: ProbePoint,
    /// Absolute address at planning time.
    pub addr: u64,
    /// Offset of the probed instruction in `function` (0 for an entry or a return probe).
    pub offset: u64,
    pub function: Arc<str>,
    pub module: Option<Arc<str>>,
    /// What is probed, for `doctor`: the callee of a call site, "use" or "deref".
    pub what: &'static str,
    /// For a deref site: the member its instruction touches.
    pub access: Option<Arc<Access>>,
    /// For a lock or unlock call and its return: the global lock it names.
    pub lock: Option<Arc<str>>,
    /// For an xarray call and its return: which xarray it is (`Dports` for a use or deref).
    pub xarray: XaTarget,
}

impl PlannedSite {
    /// The kernel side's view of the site.
    pub fn info(&self) -> SiteInfo {
        SiteInfo { addr: self.addr, role: self.role as u32, arg: self.arg }
    }

    /// What the site's index stands for in events.
    pub fn name(&self) -> SiteName {
        let place = match self.point {
            ProbePoint::Return { .. } => None,
            _ => Some(Arc::from(format!("{}+{:#x}", self.function, self.offset))),
        };
        SiteName { function: self.function.clone(), access: self.access.clone(), place, lock: self.lock.clone() }
    }

    /// What coverage counts this site as, and where it is: the return address of a load
    /// ("match_port_by_dport+0x4a"), the function of a use, the instruction of a deref.
    pub fn coverage(&self) -> Option<(SiteKind, Arc<str>)> {
        let kind = match self.role {
            SiteRole::LoadReturn => SiteKind::Load,
            SiteRole::Use => SiteKind::Use,
            SiteRole::Deref => SiteKind::Deref,
            _ => return None,
        };
        let place = match (kind, &self.access) {
            (SiteKind::Use, _) => self.function.clone(),
            (SiteKind::Deref, Some(access)) => Arc::from(access.place()),
            _ if matches!(self.point, ProbePoint::Return { .. }) => Arc::from(format!("{} (return)", self.function)),
            _ => Arc::from(format!("{}+{:#x}", self.function, self.offset)),
        };
        Some((kind, place))
    }
}

/// A function taking `struct cxl_dport *`, and whether it can be probed here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UseSite {
    pub function: String,
    pub module: Option<String>,
    pub arg: u32,
    /// `None` when the function is not in the kernel's symbols: inlined everywhere (its body
    /// is part of its callers) or in a module that is not loaded.
    pub probed: Option<usize>,
}

#[derive(Default)]
pub struct Plan {
    pub sites: Vec<PlannedSite>,
    /// Sites of a module that was loaded again as another build: detached, their indexes
    /// kept so events already sent still name them.
    pub retired: rustc_hash::FxHashSet<usize>,
    pub uses: Vec<UseSite>,
    /// Tail calls whose result could not be probed (a kretprobe needs a unique name).
    pub unprobed_tail_calls: Vec<CallSite>,
}

/// Whether kprobe_events can name `function`: no other symbol of its module (or of vmlinux)
/// has its name.
fn unique(symbols: &Symbols, function: &Symbol) -> bool {
    symbols.lookup(&function.name).filter(|s| s.module == function.module).count() == 1
}

/// Where a probe inside `function` at `offset` goes: by name where the name is unique in
/// its module or in vmlinux, else by address (kprobe_events refuses a name that is not, as
/// for the several static `size_show` of a cxl_core built as a module). A module site by
/// name (`module:function+off`) is re-armed by the kernel when the module is loaded again;
/// one by address is attached again by the module's rescan.
fn point(symbols: &Symbols, function: &Symbol, offset: u64) -> ProbePoint {
    if !unique(symbols, function) {
        return ProbePoint::Address(function.addr + offset);
    }
    ProbePoint::Symbol {
        module: function.module.as_deref().map(str::to_owned),
        symbol: function.name.to_string(),
        offset,
    }
}

impl Plan {
    pub fn build(symbols: &Symbols, calls: &[CallSite], uses: &[DportFunction]) -> Plan {
        let mut plan = Plan::default();
        plan.add_calls(symbols, calls);
        plan.add_uses(symbols, uses);
        plan
    }

    /// A probe on each call and, where its result matters, on its return.
    pub fn add_calls(&mut self, symbols: &Symbols, calls: &[CallSite]) {
        let plan = self;
        for call in calls {
            let function = Symbol {
                addr: call.function_addr,
                name: call.function.clone(),
                module: call.module.clone(),
                text: true,
            };
            let mut add = |role, arg, offset| {
                plan.sites.push(PlannedSite {
                    role,
                    arg,
                    point: point(symbols, &function, offset),
                    addr: function.addr + offset,
                    offset,
                    function: function.name.clone(),
                    module: function.module.clone(),
                    what: call.callee.name,
                    access: None,
                    lock: call.lock.clone(),
                    xarray: call.xarray,
                })
            };
            add(call.callee.call, call.callee.arg, call.offset);
            match (call.callee.ret, call.tail) {
                (Some(ret), false) => add(ret, 0, call.offset + call.len),
                // A tail call returns from the calling function: its callee's result is that
                // function's return value, seen by a kretprobe on it.
                (Some(ret), true) => {
                    // A kretprobe takes a name only.
                    let point = unique(symbols, &function).then(|| ProbePoint::Return {
                        module: function.module.as_deref().map(str::to_owned),
                        symbol: function.name.to_string(),
                    });
                    match point {
                        Some(point) => plan.sites.push(PlannedSite {
                            role: ret,
                            arg: SITE_UNPAIRED_OK,
                            point,
                            addr: function.addr,
                            offset: 0,
                            function: function.name.clone(),
                            module: function.module.clone(),
                            what: call.callee.name,
                            access: None,
                            lock: call.lock.clone(),
                            xarray: call.xarray,
                        }),
                        None => {
                            // No kretprobe by address: drop the call probe again, it would
                            // only leave pending calls behind.
                            plan.sites.pop();
                            plan.unprobed_tail_calls.push(call.clone());
                        }
                    }
                }
                (None, _) => {}
            }
        }
    }

    /// A probe at the entry of each function taking a dport that the kernel has out of line.
    pub fn add_uses(&mut self, symbols: &Symbols, uses: &[DportFunction]) {
        let plan = self;
        for use_fn in uses {
            let symbol = symbols.lookup(&use_fn.name).find(|s| {
                s.module.as_deref() == use_fn.module.as_deref() || use_fn.module.is_none() && s.module.is_none()
            });
            let probed = symbol.map(|sym| {
                plan.sites.push(PlannedSite {
                    role: SiteRole::Use,
                    arg: use_fn.arg,
                    point: point(symbols, sym, 0),
                    addr: sym.addr,
                    offset: 0,
                    function: sym.name.clone(),
                    module: sym.module.clone(),
                    what: "use",
                    access: None,
                    lock: None,
                    xarray: XaTarget::Dports,
                });
                plan.sites.len() - 1
            });
            plan.uses.push(UseSite {
                function: use_fn.name.clone(),
                module: use_fn.module.clone(),
                arg: use_fn.arg,
                probed,
            });
        }
    }

    /// The sites the kernel profile asks for besides call, use and deref sites: the devres
    /// core's `kfree` calls (devm kernels), the entry of the free action when it is in a
    /// module (fentry is for vmlinux), and the return of the registration function when it
    /// is in a module (likewise for fexit).
    pub fn add_profile_sites(&mut self, symbols: &Symbols, profile: &Profile) {
        match &profile.free {
            FreePath::DevresKfree { sites } => self.add_calls(symbols, sites),
            FreePath::Action { function, module: Some(module) } => {
                self.add_function(symbols, Some(module), function, SiteRole::FreeEntry, 0, false);
            }
            FreePath::Action { module: None, .. } | FreePath::Tracepoint => {}
        }
        if let Some(Registration::Return { module, function }) = &profile.registration {
            self.add_function(symbols, Some(module), function, SiteRole::RegisterReturn, 0, true);
        }
    }

    /// A probe on function `name` of `module` (`None`: vmlinux) itself, at its entry or (a
    /// kretprobe) its return; false when the kernel has no such function.
    fn add_function(
        &mut self,
        symbols: &Symbols,
        module: Option<&str>,
        name: &'static str,
        role: SiteRole,
        arg: u32,
        at_return: bool,
    ) -> bool {
        let Some(sym) = symbols.lookup(name).find(|s| s.module.as_deref() == module) else { return false };
        let (module, symbol) = (module.map(str::to_owned), name.to_owned());
        let point = match at_return {
            true => ProbePoint::Return { module, symbol },
            false => ProbePoint::Symbol { module, symbol, offset: 0 },
        };
        self.sites.push(PlannedSite {
            role,
            arg,
            point,
            addr: sym.addr,
            offset: 0,
            function: sym.name.clone(),
            module: sym.module.clone(),
            what: name,
            access: None,
            lock: None,
            // A function probed itself (xa_load on a kernel whose lib/ is traceable) sees
            // every xarray of the system.
            xarray: XaTarget::Unknown,
        });
        true
    }

    /// Probes `function` itself, entry and return, with the roles of a call site and its
    /// return: the direct path where the callee is traceable (e.g. `xa_load` on kernels
    /// whose lib/ is built with ftrace).
    pub fn add_direct(&mut self, symbols: &Symbols, callee: &Callee) -> bool {
        if !self.add_function(symbols, None, callee.name, callee.call, SITE_DIRECT, false) {
            return false;
        }
        if let Some(ret) = callee.ret {
            self.add_function(symbols, None, callee.name, ret, SITE_UNPAIRED_OK, true);
        }
        true
    }

    /// A kprobe on each deref site's instruction; its argument names the base register. The
    /// target says whether a dport lookup reaches it (coverage counts only those).
    pub fn add_derefs(&mut self, symbols: &Symbols, derefs: &[(DerefSite, XaTarget)]) {
        for (d, target) in derefs {
            let function =
                Symbol { addr: d.function_addr, name: d.function.clone(), module: d.module.clone(), text: true };
            let access = Access {
                function: d.function.clone(),
                insn: d.insn,
                member: d.member.clone(),
                offset: d.offset,
                size: d.size,
                write: d.write,
            };
            self.sites.push(PlannedSite {
                role: SiteRole::Deref,
                arg: d.reg as u32,
                point: point(symbols, &function, d.insn),
                addr: d.function_addr + d.insn,
                offset: d.insn,
                function: d.function.clone(),
                module: d.module.clone(),
                what: "deref",
                access: Some(Arc::new(access)),
                lock: None,
                xarray: *target,
            });
        }
    }

    /// The function name a use event's site index stands for.
    pub fn site_function(&self, index: u64) -> Option<&Arc<str>> {
        self.sites.get(usize::try_from(index).ok()?).map(|s| &s.function)
    }

    /// Sites of a role.
    pub fn count(&self, role: SiteRole) -> usize {
        self.sites.iter().filter(|s| s.role == role).count()
    }
}

/// The sites of `indexes` by kprobe, in plan order: a deref site at the instruction of
/// the site before it shares that site's kprobe (the `shared_deref` program, linked after
/// `site`), so an `xa_load` return is seen before an inline read of its result there;
/// every other site has its own.
pub fn probe_groups(sites: &[PlannedSite], indexes: impl IntoIterator<Item = usize>) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut open: HashMap<&ProbePoint, usize> = HashMap::new();
    for i in indexes {
        let point = &sites[i].point;
        match open.get(point) {
            Some(&g) if groups[g].len() == 1 && sites[i].role == SiteRole::Deref => groups[g].push(i),
            _ => {
                open.insert(point, groups.len());
                groups.push(vec![i]);
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::callsites::{ArgValue, CALLEES};

    #[test]
    fn a_deref_at_a_call_sites_instruction_shares_its_kprobe() {
        let site = |role, offset: u64| PlannedSite {
            role,
            arg: 0,
            point: ProbePoint::Symbol { module: Some("cxl_mem".into()), symbol: "cxl_mem_probe".into(), offset },
            addr: 0xffffffffc0001000 + offset,
            offset,
            function: "cxl_mem_probe".into(),
            module: Some("cxl_mem".into()),
            what: "xa_load",
            access: None,
            lock: None,
            xarray: XaTarget::Dports,
        };
        let sites = vec![
            site(SiteRole::LoadCall, 0x1a8),
            site(SiteRole::LoadReturn, 0x1ad),
            site(SiteRole::LockCall, 0x1c0),
            site(SiteRole::Deref, 0x1ad),
            site(SiteRole::Deref, 0x1c8),
            site(SiteRole::LockReturn, 0x1c8),
            site(SiteRole::Deref, 0x1ad),
        ];
        let groups = probe_groups(&sites, 0..sites.len());
        // A deref rides on the site before it; nothing else does, and only one.
        assert_eq!(groups, vec![vec![0], vec![1, 3], vec![2], vec![4], vec![5], vec![6]]);
        // A subset (one module's sites) groups the same way.
        assert_eq!(probe_groups(&sites, [1, 2, 3]), vec![vec![1, 3], vec![2]]);
    }

    #[test]
    fn call_sites_get_call_and_return_probes_and_uses_resolve() {
        let symbols = Symbols::parse(
            "ffffffff81000000 T xa_load\n\
             ffffffff81001000 t match_port_by_dport\n\
             ffffffff81001100 t dup\n\
             ffffffff81001200 t dup\n\
             ffffffff81001300 T cxl_dport_init_ras_reporting\n\
             ffffffffc0001000 t cxl_mem_probe\t[cxl_mem]\n\
             ffffffffc0001400 t cxl_mem_remove\t[cxl_mem]\n\
             ffffffffc0002000 t size_show\t[cxl_core]\n\
             ffffffffc0002100 t size_show\t[cxl_core]\n\
             ffffffffc0003000 t size_show\t[cxl_pmem]\n"
                .as_bytes(),
        )
        .unwrap();
        let xa_load = CALLEES.iter().find(|c| c.name == "xa_load").unwrap();
        let mutex_unlock = CALLEES.iter().find(|c| c.name == "mutex_unlock").unwrap();
        let call = |function: &str, addr: u64, module: Option<&str>, offset: u64, callee, tail| CallSite {
            function: Arc::from(function),
            module: module.map(Arc::from),
            function_addr: addr,
            offset,
            len: 5,
            callee,
            tail,
            rdi: ArgValue::Unknown,
            xarray: Default::default(),
            lock: None,
        };
        let calls = [
            call("match_port_by_dport", 0xffffffff81001000, None, 0x42, *xa_load, false),
            call("dup", 0xffffffff81001200, None, 0x10, *mutex_unlock, false),
            call("cxl_mem_probe", 0xffffffffc0001000, Some("cxl_mem"), 0x1c2, *xa_load, false),
            call("cxl_mem_probe", 0xffffffffc0001000, Some("cxl_mem"), 0x300, *xa_load, true),
            call("dup", 0xffffffff81001200, None, 0x20, *xa_load, true),
        ];
        let uses = [
            DportFunction { name: "cxl_dport_init_ras_reporting".into(), module: None, arg: 0 },
            DportFunction { name: "devm_cxl_add_endpoint".into(), module: Some("cxl_mem".into()), arg: 2 },
        ];
        let plan = Plan::build(&symbols, &calls, &uses);
        let specs: Vec<(SiteRole, String)> = plan.sites.iter().map(|s| (s.role, s.point.spec())).collect();
        // A name twice in one module goes by address (kprobe_events refuses it); once in a
        // module is unique there, whatever other modules have.
        let down_read = CALLEES.iter().find(|c| c.name == "down_read").unwrap();
        let shows = [
            call("size_show", 0xffffffffc0002100, Some("cxl_core"), 0x28, *down_read, false),
            call("size_show", 0xffffffffc0003000, Some("cxl_pmem"), 0x28, *down_read, false),
        ];
        let show_specs: Vec<String> = Plan::build(&symbols, &shows, &[]).sites.iter().map(|s| s.point.spec()).collect();
        assert_eq!(
            show_specs,
            ["0xffffffffc0002128", "0xffffffffc000212d", "cxl_pmem:size_show+0x28", "cxl_pmem:size_show+0x2d"]
        );
        assert_eq!(
            specs,
            [
                (SiteRole::LoadCall, "match_port_by_dport+0x42".to_string()),
                (SiteRole::LoadReturn, "match_port_by_dport+0x47".to_string()),
                (SiteRole::UnlockCall, "0xffffffff81001210".to_string()),
                (SiteRole::LoadCall, "cxl_mem:cxl_mem_probe+0x1c2".to_string()),
                (SiteRole::LoadReturn, "cxl_mem:cxl_mem_probe+0x1c7".to_string()),
                (SiteRole::LoadCall, "cxl_mem:cxl_mem_probe+0x300".to_string()),
                (SiteRole::LoadReturn, "cxl_mem:cxl_mem_probe".to_string()),
                (SiteRole::Use, "cxl_dport_init_ras_reporting+0x0".to_string()),
            ]
        );
        assert_eq!(
            plan.sites[6].point,
            ProbePoint::Return { module: Some("cxl_mem".into()), symbol: "cxl_mem_probe".into() }
        );
        assert_eq!(plan.sites[6].arg, SITE_UNPAIRED_OK);
        // A tail call in a function whose name is not unique: no kretprobe, so no call probe.
        assert_eq!(plan.unprobed_tail_calls.len(), 1);
        assert_eq!(plan.unprobed_tail_calls[0].function.as_ref(), "dup");
        assert_eq!(plan.uses[0].probed, Some(7));
        assert_eq!(plan.site_function(7).map(|f| &**f), Some("cxl_dport_init_ras_reporting"));
        assert_eq!(plan.uses[1].probed, None, "inlined devm_cxl_add_endpoint is not probed");
    }
}
