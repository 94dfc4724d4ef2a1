//! Finds, in the CXL code the kernel runs, the calls the tracer probes: `xa_load` and the
//! dports xarray writers (notrace on stock kernels, so they are probed where they are called)
//! and the mutex lock/unlock calls (so lock events come only from code that matters, not
//! from a global hook on every mutex in the system).
use std::sync::Arc;

use iced_x86::{Decoder, DecoderOptions, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register};
use rustc_hash::{FxHashMap, FxHashSet};
use tracer_common::{LockMode, SITE_INDEX_BY_REF, SiteRole};

use super::kcore::{Kcore, KcoreError};
use crate::symbolize::{Symbol, Symbols};

/// A callee the tracer probes at its call sites: the role of the probe on the call
/// instruction, and of the one on its return address (when the result matters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Callee {
    pub name: &'static str,
    pub call: SiteRole,
    pub ret: Option<SiteRole>,
    /// Only its calls from this function count (`None`: from any CXL function).
    pub caller: Option<&'static str>,
    /// `SiteInfo::arg` of its call sites: the `LockMode` of a lock or unlock call.
    pub arg: u32,
}

impl Callee {
    const fn new(name: &'static str, call: SiteRole, ret: Option<SiteRole>) -> Callee {
        Callee { name, call, ret, caller: None, arg: 0 }
    }

    /// A lock call: held after it returns (`ret` says when), in `mode`.
    const fn lock(name: &'static str, ret: SiteRole, mode: LockMode) -> Callee {
        Callee { name, call: SiteRole::LockCall, ret: Some(ret), caller: None, arg: mode as u32 }
    }

    const fn unlock(name: &'static str, mode: LockMode) -> Callee {
        Callee { name, call: SiteRole::UnlockCall, ret: None, caller: None, arg: mode as u32 }
    }
}

/// The callees every kernel has; the kernel profile adds the one its devres host check
/// needs (`Profile::host_check_callee`). The mutex calls are where a dport's locks are taken;
/// the rw_semaphore calls (`cxl_rwsem.region` and friends, taken by `guard()` and
/// `ACQUIRE()` in CXL code) never satisfy a rule but are listed in reports as held.
pub const CALLEES: &[Callee] = {
    use LockMode::{Mutex, Read, Write};
    use SiteRole::{LockReturn as Always, LockReturnIfOne as IfOne, LockReturnIfZero as IfZero};
    &[
        Callee::new("xa_load", SiteRole::LoadCall, Some(SiteRole::LoadReturn)),
        // The `xa_for_each` walk: the found entry is a lookup's result, its index by reference.
        Callee { arg: SITE_INDEX_BY_REF, ..Callee::new("xa_find", SiteRole::LoadCall, Some(SiteRole::LoadReturn)) },
        Callee {
            arg: SITE_INDEX_BY_REF,
            ..Callee::new("xa_find_after", SiteRole::LoadCall, Some(SiteRole::LoadReturn))
        },
        Callee::new("xa_erase", SiteRole::EraseCall, Some(SiteRole::EraseReturn)),
        Callee::new("__xa_erase", SiteRole::EraseCall, Some(SiteRole::EraseReturn)),
        Callee::new("__xa_insert", SiteRole::StoreCall, None),
        Callee::new("xa_store", SiteRole::StoreCall, None),
        Callee::new("__xa_store", SiteRole::StoreCall, None),
        Callee::lock("mutex_lock", Always, Mutex),
        Callee::lock("mutex_lock_nested", Always, Mutex),
        Callee::lock("mutex_lock_io", Always, Mutex),
        Callee::lock("mutex_lock_interruptible", IfZero, Mutex),
        Callee::lock("mutex_lock_interruptible_nested", IfZero, Mutex),
        Callee::lock("mutex_lock_killable", IfZero, Mutex),
        Callee::lock("mutex_lock_killable_nested", IfZero, Mutex),
        Callee::lock("mutex_trylock", IfOne, Mutex),
        Callee::unlock("mutex_unlock", Mutex),
        Callee::lock("down_read", Always, Read),
        Callee::lock("down_read_nested", Always, Read),
        Callee::lock("down_read_interruptible", IfZero, Read),
        Callee::lock("down_read_killable", IfZero, Read),
        Callee::lock("down_read_trylock", IfOne, Read),
        Callee::lock("down_write", Always, Write),
        Callee::lock("down_write_nested", Always, Write),
        Callee::lock("down_write_killable", IfZero, Write),
        Callee::lock("down_write_trylock", IfOne, Write),
        Callee::unlock("up_read", Read),
        Callee::unlock("up_write", Write),
    ]
};

/// The lookups among `CALLEES`: their result may be a dport.
pub fn lookups() -> Vec<&'static str> {
    CALLEES.iter().filter(|c| c.call == SiteRole::LoadCall).map(|c| c.name).collect()
}

/// A call to one of `CALLEES` inside a CXL function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallSite {
    /// The function containing the call.
    pub function: Arc<str>,
    pub module: Option<Arc<str>>,
    pub function_addr: u64,
    /// Offset of the call instruction in the function.
    pub offset: u64,
    /// Length of the call instruction (the return address is `offset + len`).
    pub len: u64,
    pub callee: Callee,
    /// A tail call (`jmp`): its return is in the caller's caller, not observable here.
    pub tail: bool,
    /// The first argument, as straight-line code sets it before the call.
    pub rdi: ArgValue,
    /// For an xarray call: which xarray it is, as the kernel profile tells from `rdi`.
    pub xarray: XaTarget,
    /// For a lock or unlock call: the global lock that constant is (`cxl_rwsem.region`).
    pub lock: Option<Arc<str>>,
}

/// A vmlinux run of text closer than this (in symbols) to the next symbol named after the
/// subsystem is one stretch of its built-in objects.
const RUN_GAP: usize = 40;
/// A run needs this many named symbols to be taken for the subsystem's code.
const RUN_MIN: usize = 10;

/// What a subsystem's code is, as the kernel profile knows it (`profile::CXL_CODE`): its
/// modules, and the names its functions have in vmlinux.
pub struct CodeOf {
    pub module: fn(&str) -> bool,
    pub name: fn(&str) -> bool,
}

fn is_function(s: &Symbol) -> bool {
    s.text && !s.name.starts_with("__pfx_") && !s.name.starts_with("__cfi_")
}

/// The functions of a subsystem's code: every function of its modules, and the stretches
/// of vmlinux text where its built-in objects were linked (contiguous in link order; a
/// stretch is found as a dense run of symbols named after it).
pub fn code_functions<'a>(symbols: &'a Symbols, code: &CodeOf) -> Vec<&'a Symbol> {
    let vmlinux: Vec<&Symbol> = symbols.iter().filter(|s| s.module.is_none() && is_function(s)).collect();
    let named: Vec<usize> = vmlinux.iter().enumerate().filter(|(_, s)| (code.name)(&s.name)).map(|(i, _)| i).collect();
    let mut runs: Vec<(usize, usize, usize)> = Vec::new(); // (first, last, named count)
    for &i in &named {
        match runs.last_mut() {
            Some((_, last, n)) if i - *last <= RUN_GAP => {
                *last = i;
                *n += 1;
            }
            _ => runs.push((i, i, 1)),
        }
    }
    let mut out: Vec<&Symbol> = runs
        .into_iter()
        .filter(|&(_, _, n)| n >= RUN_MIN)
        .flat_map(|(first, last, _)| vmlinux[first..=last].iter().copied())
        .collect();
    out.extend(symbols.iter().filter(|s| is_function(s) && s.module.as_deref().is_some_and(code.module)));
    // Aliases (`cleanup_module` and the exit function it names) are one function: read and
    // scanned twice, its sites would be probed twice.
    let mut seen = FxHashSet::default();
    out.retain(|s| seen.insert(s.addr));
    out
}

/// The functions of `module` that lie in its `core`, each once. Right after a module's
/// init returns, /proc/modules already calls it Live while kallsyms still lists its init
/// functions (in memory being freed): they are left out, and so is a core function whose
/// extent would run into them, so that the module reads the same whenever it is read.
pub fn module_functions<'a>(symbols: &'a Symbols, module: &str, core: &std::ops::Range<u64>) -> Vec<&'a Symbol> {
    let mut seen = FxHashSet::default();
    symbols
        .iter()
        .filter(|s| is_function(s) && s.module.as_deref() == Some(module) && core.contains(&s.addr))
        .filter(|s| symbols.extent(s).is_some_and(|(_, end)| end <= core.end))
        .filter(|s| seen.insert(s.addr))
        .collect()
}

/// The functions of the devres core (drivers/base/devres.c, built into vmlinux): the dense
/// run of `devres_*`/`devm_*` symbols around `devres_release_all`. Its `kfree` calls are
/// where a devm dport's memory is freed (release_nodes(), devres_free(), devres_release()...).
pub fn devres_functions(symbols: &Symbols) -> Vec<&Symbol> {
    let vmlinux: Vec<&Symbol> = symbols.iter().filter(|s| s.module.is_none() && is_function(s)).collect();
    let Some(anchor) = vmlinux.iter().position(|s| &*s.name == "devres_release_all") else { return Vec::new() };
    let named =
        |s: &Symbol| s.name.starts_with("devres") || s.name.starts_with("devm_") || s.name.contains("release_nodes");
    // Walk out from the anchor while devres-named symbols keep coming (a few helpers with
    // other names, like group_open_release, sit between them).
    let reach = |step: isize| {
        let mut last = anchor as isize;
        let mut i = anchor as isize;
        while i >= 0 && (i as usize) < vmlinux.len() && (i - last).abs() <= DEVRES_GAP {
            if named(vmlinux[i as usize]) {
                last = i;
            }
            i += step;
        }
        last as usize
    };
    let (first, last) = (reach(-1), reach(1));
    vmlinux[first..=last].to_vec()
}

/// Other-named symbols tolerated between two devres-named ones.
const DEVRES_GAP: isize = 4;

/// Callee entry addresses, with the 16 bytes of padding before each: a call rewritten to
/// go through a call-depth thunk in that padding still counts.
fn callee_targets(symbols: &Symbols, callees: &[Callee]) -> FxHashMap<u64, Callee> {
    let mut targets = FxHashMap::default();
    for &callee in callees {
        for sym in symbols.lookup(callee.name).filter(|s| s.module.is_none()) {
            for back in 0..=16 {
                targets.insert(sym.addr - back, callee);
            }
        }
    }
    targets
}

/// Finds calls to `CALLEES` in `code` (the bytes of `function`, which starts at `addr`).
pub fn scan(function: &Symbol, code: &[u8], targets: &FxHashMap<u64, Callee>, out: &mut Vec<CallSite>) {
    let end = function.addr + code.len() as u64;
    let mut decoder = Decoder::with_ip(64, code, function.addr, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    // The first argument as straight-line code last set it: a lock call on a global lock
    // names it (`down_write(&cxl_rwsem.region)`), an xarray call shows which member the
    // xarray is (`lea 0x318(%rbx),%rdi`: `&port->dports`).
    let mut rdi = ArgValue::Unknown;
    for insn in &mut decoder {
        let rdi_here = rdi;
        if let Some(written) = written_value(&insn, Register::RDI, rdi, &mut info) {
            rdi = written;
        }
        if insn.is_invalid() || insn.op0_kind() != OpKind::NearBranch64 {
            continue;
        }
        let target = insn.near_branch_target();
        let tail = match insn.mnemonic() {
            Mnemonic::Call => false,
            Mnemonic::Jmp if !(function.addr..end).contains(&target) => true,
            _ => continue,
        };
        if let Some(&callee) = targets.get(&target)
            && callee.caller.is_none_or(|caller| caller == &*function.name)
        {
            out.push(CallSite {
                function: function.name.clone(),
                module: function.module.clone(),
                function_addr: function.addr,
                offset: insn.ip() - function.addr,
                len: insn.len() as u64,
                callee,
                tail,
                rdi: rdi_here,
                xarray: XaTarget::Unknown,
                lock: None,
            });
        }
    }
}

/// The lookup calls (instruction addresses) that read another xarray as their code reads:
/// the inline accesses only their results reach are not counted as dport sites.
pub fn other_xarray_calls(calls: &[CallSite]) -> FxHashSet<u64> {
    calls.iter().filter(|c| c.xarray == XaTarget::Other).map(|c| c.function_addr + c.offset).collect()
}

/// Largest function scanned; anything bigger is a symbol-table artefact.
const MAX_FUNCTION: u64 = 1 << 20;

/// The code of every CXL function, read once from the running kernel's text.
pub struct CxlText {
    pub functions: Vec<(Symbol, Vec<u8>)>,
}

impl CxlText {
    /// The code of every function of `code` (`profile::CXL_CODE`).
    pub fn read(symbols: &Symbols, kcore: &Kcore, code: &CodeOf) -> Result<CxlText, KcoreError> {
        CxlText::read_functions(symbols, kcore, code_functions(symbols, code))
    }

    /// The code of `functions`.
    pub fn read_functions(symbols: &Symbols, kcore: &Kcore, list: Vec<&Symbol>) -> Result<CxlText, KcoreError> {
        let mut functions = Vec::new();
        for function in list {
            let Some((start, end)) = symbols.extent(function) else { continue };
            if end - start > MAX_FUNCTION {
                continue;
            }
            functions.push((function.clone(), kcore.read(start, (end - start) as usize)?));
        }
        Ok(CxlText { functions })
    }
}

/// Every call site of `callees` in CXL code.
pub fn find(symbols: &Symbols, text: &CxlText, callees: &[Callee]) -> Vec<CallSite> {
    let targets = callee_targets(symbols, callees);
    let mut sites = Vec::new();
    for (function, code) in &text.functions {
        scan(function, code, &targets, &mut sites);
    }
    sites
}

/// Which xarray an xarray call reads or writes, as far as its code shows.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum XaTarget {
    /// Not known statically (the address comes from elsewhere): probed, and proven a dports
    /// xarray when a load there returns a dport.
    #[default]
    Unknown,
    /// `&port->dports`: the address is a register plus that member's offset.
    Dports,
    /// Another member's address, by the same reading: still probed, but not counted as a
    /// dport site (and a dport it returns says the reading was wrong).
    Other,
}

/// What straight-line code last put in an argument register before a call.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum ArgValue {
    /// Anything else: not known statically.
    #[default]
    Unknown,
    /// `lea X(%rip),%reg` or `mov $X,%reg`: an address (a global, a function).
    Const(u64),
    /// Some register plus a displacement: `lea 0x318(%rbx),%rdi` (`&port->dports` when 0x318
    /// is that member's offset), or that then `add $X,%rdi`. A plain register copy is
    /// `Unknown`: the register may already point into the struct.
    Offset(i64),
}

impl ArgValue {
    pub fn constant(self) -> Option<u64> {
        match self {
            ArgValue::Const(x) => Some(x),
            _ => None,
        }
    }
}

/// The value `reg` is set to before the call at `offset` in `code` (a function at `addr`),
/// when the last instruction before it that writes `reg` in straight-line order is
/// `lea X(%rip),%reg` or `mov $X,%reg`; `None` when it is anything else (not known
/// statically). `__devm_add_action`'s action is `rsi`.
pub fn arg_before_call(addr: u64, code: &[u8], offset: u64, reg: Register) -> Option<u64> {
    let mut value = ArgValue::Unknown;
    let mut info = InstructionInfoFactory::new();
    for insn in Decoder::with_ip(64, code, addr, DecoderOptions::NONE) {
        if insn.ip() >= addr + offset {
            break;
        }
        if let Some(written) = written_value(&insn, reg, value, &mut info) {
            value = written;
        }
    }
    value.constant()
}

/// What `insn` leaves in `reg` (`before` is what it held): `None` when it does not write it;
/// anything it cannot tell, a call (which may change every caller-saved register) included,
/// is `Unknown`.
fn written_value(
    insn: &Instruction,
    reg: Register,
    before: ArgValue,
    info: &mut InstructionInfoFactory,
) -> Option<ArgValue> {
    let writes = insn.mnemonic() == Mnemonic::Call
        || info.info(insn).used_registers().iter().any(|r| {
            r.register().full_register() == reg
                && matches!(r.access(), OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite)
        });
    if !writes {
        return None;
    }
    let to_reg = insn.op_count() > 0 && insn.op0_kind() == OpKind::Register && insn.op0_register() == reg;
    let imm = matches!(insn.op1_kind(), OpKind::Immediate32 | OpKind::Immediate32to64 | OpKind::Immediate64)
        || matches!(insn.op1_kind(), OpKind::Immediate8to64);
    Some(match insn.mnemonic() {
        Mnemonic::Lea if to_reg && insn.is_ip_rel_memory_operand() => ArgValue::Const(insn.ip_rel_memory_address()),
        Mnemonic::Lea if to_reg && insn.memory_index() == Register::None && insn.memory_base().is_gpr64() => {
            ArgValue::Offset(insn.memory_displacement64() as i64)
        }
        Mnemonic::Mov if to_reg && imm => ArgValue::Const(insn.immediate(1)),
        Mnemonic::Add if to_reg && imm => match before {
            ArgValue::Offset(d) => ArgValue::Offset(d.wrapping_add(insn.immediate(1) as i64)),
            _ => ArgValue::Unknown,
        },
        _ => ArgValue::Unknown,
    })
}

/// Whether a function's code `now` (its probes re-armed by the kernel, its module maybe at
/// another address) is the code it had `before`, when its sites were found. The bytes a
/// probe of this tracer patches (each probed instruction's first five: an int3, or an
/// optimized kprobe's jump; and the first 16, where an entry probe patches the ftrace call)
/// are taken from `before`; then both decode to the same instructions, compared without
/// their displacement and immediate fields (what the module loader relocates: calls into
/// vmlinux, addresses of the module's data), but for the slots the kernel patches at run
/// time (`patch_slot`).
pub fn same_code(before: &[u8], now: &[u8], probes: &[u64]) -> bool {
    if before.len() != now.len() {
        return false;
    }
    let mut now = now.to_vec();
    for at in 0..now.len() {
        if at < 16 || probes.iter().any(|&p| (p as usize..p as usize + 5).contains(&at)) {
            now[at] = before[at];
        }
    }
    let mut a = Decoder::with_ip(64, before, 0, DecoderOptions::NONE);
    let mut b = Decoder::with_ip(64, &now, 0, DecoderOptions::NONE);
    let (mut x, mut y) = (iced_x86::Instruction::default(), iced_x86::Instruction::default());
    while a.can_decode() {
        if !b.can_decode() {
            return false;
        }
        a.decode_out(&mut x);
        b.decode_out(&mut y);
        let (start, len) = (x.ip() as usize, x.len());
        let slot = |insn, code: &[u8]| patch_slot(insn, &code[start..start + len]);
        if x.len() == y.len() && slot(&x, before) && slot(&y, &now) {
            continue;
        }
        if x.len() != y.len() || x.code() != y.code() {
            return false;
        }
        let offsets = a.get_constant_offsets(&x);
        let relocatable = |i: usize| {
            let within = |off: usize, size: usize| size > 0 && (off..off + size).contains(&i);
            within(offsets.displacement_offset(), offsets.displacement_size())
                || within(offsets.immediate_offset(), offsets.immediate_size())
                || within(offsets.immediate_offset2(), offsets.immediate_size2())
        };
        if (0..len).any(|i| !relocatable(i) && before[start + i] != now[start + i]) {
            return false;
        }
    }
    !b.can_decode()
}

/// Whether `insn` (its `bytes`) fills a slot the kernel rewrites in loaded code: a static
/// call (`call`/`jmp rel32`, a 5-byte NOP, or `xor %eax,%eax` with three CS prefixes for a
/// call returning 0) or a static key (`jmp` or a NOP, of 2 or 5 bytes). A module read just
/// after its load can show such a slot before the kernel set it (seen on 7.2: a static call
/// in `cxl_pci`'s `cxl_event_thread` read as `call` once, as the return-0 form the next time).
fn patch_slot(insn: &iced_x86::Instruction, bytes: &[u8]) -> bool {
    use iced_x86::Code;
    match insn.len() {
        5 => {
            matches!(insn.code(), Code::Call_rel32_64 | Code::Jmp_rel32_64)
                || insn.mnemonic() == Mnemonic::Nop
                || bytes == [0x2e, 0x2e, 0x2e, 0x31, 0xc0]
        }
        2 => insn.code() == Code::Jmp_rel8_64 || insn.mnemonic() == Mnemonic::Nop,
        _ => false,
    }
}

/// Whether `code` (of a function at `addr`) calls or tail-calls one of `targets`.
pub fn calls_any(addr: u64, code: &[u8], targets: &FxHashSet<u64>) -> bool {
    let decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    decoder.into_iter().any(|insn| {
        !insn.is_invalid()
            && insn.op0_kind() == OpKind::NearBranch64
            && matches!(insn.mnemonic(), Mnemonic::Call | Mnemonic::Jmp)
            && targets.contains(&insn.near_branch_target())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbol(addr: u64, name: &str) -> Symbol {
        Symbol { addr, name: Arc::from(name), module: None, text: true }
    }

    #[test]
    fn a_module_is_named_alike_at_start_and_after_a_reload() {
        // kallsyms lists the exit function and its loader alias in either order; the list
        // read at start (code_functions) and the one read after a reload (module_functions)
        // must name it alike, or the reloaded module reads as other code.
        let modules = "cxl_mem 16384 0 - Live 0xffffffffc04c9000\n";
        let core = crate::kernel::modules::core_in(modules, "cxl_mem").unwrap();
        for (first, second) in [("cxl_mem_driver_exit", "cleanup_module"), ("cleanup_module", "cxl_mem_driver_exit")] {
            let text = format!(
                "ffffffffc04c9000 t enable_suspend\t[cxl_mem]
ffffffffc04c9040 t cxl_mem_probe\t[cxl_mem]
ffffffffc04c926b t {first}\t[cxl_mem]
ffffffffc04c926b t {second}\t[cxl_mem]
ffffffffc04c9277 t cxl_mem_probe.cold\t[cxl_mem]
ffffffffc04c9300 t cxl_mem_last\t[cxl_mem]
"
            );
            let symbols = Symbols::parse(text.as_bytes()).unwrap();
            let names = |list: Vec<&Symbol>| list.iter().map(|s| s.name.to_string()).collect::<Vec<_>>();
            let at_start = names(code_functions(&symbols, &crate::kernel::profile::CXL_CODE));
            let reloaded = names(module_functions(&symbols, "cxl_mem", &core));
            assert!(at_start.contains(&"cxl_mem_driver_exit".to_owned()), "{at_start:?}");
            assert!(!at_start.contains(&"cleanup_module".to_owned()), "{at_start:?}");
            assert!(reloaded.iter().all(|n| at_start.contains(n)), "{reloaded:?} against {at_start:?}");
        }
    }

    #[test]
    fn a_module_reads_the_same_while_its_init_symbols_are_still_listed() {
        let modules = "cxl_mem 16384 0 - Live 0xffffffffc04c9000\ncxl_pci 90112 0 - Live 0xffffffffc0500000 (E)\n";
        let core = crate::kernel::modules::core_in(modules, "cxl_mem").unwrap();
        assert_eq!(core, 0xffffffffc04c9000..0xffffffffc04cd000);
        let after = "ffffffffc04c9000 t enable_suspend\t[cxl_mem]
ffffffffc04c9040 t cxl_mem_probe\t[cxl_mem]
ffffffffc04c926b t cxl_mem_driver_exit\t[cxl_mem]
ffffffffc04c926b t cleanup_module\t[cxl_mem]
ffffffffc04c9277 t cxl_mem_probe.cold\t[cxl_mem]
";
        // Init text just past the core, still listed just after init returned.
        let during = format!(
            "{after}ffffffffc04ce000 t cxl_mem_driver_init\t[cxl_mem]\nffffffffc04ce000 t init_module\t[cxl_mem]\n"
        );
        let names = |text: &str| -> Vec<(u64, String)> {
            let symbols = Symbols::parse(text.as_bytes()).unwrap();
            module_functions(&symbols, "cxl_mem", &core).iter().map(|s| (s.addr, s.name.to_string())).collect()
        };
        let settled = names(after);
        assert_eq!(
            settled.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(),
            ["enable_suspend", "cxl_mem_probe", "cxl_mem_driver_exit"],
            "the last function has no known end; the alias is read once"
        );
        assert_eq!(names(&during), settled);
    }

    #[test]
    fn finds_calls_and_tail_calls_to_callees() {
        let symbols = Symbols::parse(
            "ffffffff81000000 T xa_load\nffffffff81000100 T mutex_unlock\nffffffff81001000 t match_port_by_dport\n"
                .as_bytes(),
        )
        .unwrap();
        let targets = callee_targets(&symbols, CALLEES);
        let f = symbol(0xffffffff81001000, "match_port_by_dport");
        // endbr64; mov rdi,rbx; call xa_load; mov rdi,r12; call 0x...; jmp mutex_unlock
        let mut code = vec![0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x89, 0xdf];
        let rel = |from_end: u64, to: u64| ((to as i64 - from_end as i64) as i32).to_le_bytes();
        let call_at = f.addr + code.len() as u64;
        code.push(0xe8);
        code.extend(rel(call_at + 5, 0xffffffff81000000));
        code.extend([0x4c, 0x89, 0xe7]);
        let other_at = f.addr + code.len() as u64;
        code.push(0xe8);
        code.extend(rel(other_at + 5, 0xffffffff81000800));
        let jmp_at = f.addr + code.len() as u64;
        code.push(0xe9);
        code.extend(rel(jmp_at + 5, 0xffffffff81000100));
        let mut sites = Vec::new();
        scan(&f, &code, &targets, &mut sites);
        assert_eq!(sites.len(), 2);
        assert_eq!((sites[0].callee.name, sites[0].offset, sites[0].len, sites[0].tail), ("xa_load", 7, 5, false));
        assert_eq!((sites[1].callee.name, sites[1].tail), ("mutex_unlock", true));
    }

    #[test]
    fn the_same_code_at_another_address_with_probes_re_armed_is_the_same() {
        // endbr64 (4 bytes of ftrace room after it); call rel32 (a call into vmlinux);
        // mov 0x98(%rax),%r15; mov $imm32,%rdi (a string of the module's); ret
        let before: Vec<u8> = [
            &[0xf3, 0x0f, 0x1e, 0xfa][..],
            &[0x0f, 0x1f, 0x44, 0x00, 0x00],
            &[0x0f, 0x1f, 0x44, 0x00, 0x00, 0x90, 0x90],
            &[0xe8, 0x10, 0x20, 0x30, 0x40],
            &[0x4c, 0x8b, 0xb8, 0x98, 0x00, 0x00, 0x00],
            &[0x48, 0xc7, 0xc7, 0x00, 0x10, 0x00, 0xc0],
            &[0xc3],
        ]
        .concat();
        // Loaded elsewhere: the call's displacement and the string's address differ; the
        // probe at 21 (the mov) is armed (int3), the ftrace call at 4 patched.
        let mut now = before.clone();
        now[17..21].copy_from_slice(&[0x50, 0x60, 0x70, 0x01]);
        now[31..35].copy_from_slice(&[0x00, 0x90, 0x01, 0xc0]);
        now[21] = 0xcc;
        now[4..9].copy_from_slice(&[0xe8, 1, 2, 3, 4]);
        assert!(same_code(&before, &now, &[21]));
        // Without knowing the probe there, the int3 is a difference.
        assert!(!same_code(&before, &now, &[]));
        // Another register for the string's address: another build.
        let mut other = now.clone();
        other[30] = 0xc6;
        assert!(!same_code(&before, &other, &[21]));
        // Another length: another build.
        assert!(!same_code(&before, &before[..before.len() - 1], &[]));
    }

    #[test]
    fn slots_the_kernel_patches_at_run_time_are_the_same_code() {
        // The entry (endbr64, ftrace's room); call rel32 (a static call); jmp rel8 (a static
        // key); mov %rdi,%rax; ret
        let entry: &[u8] =
            &[0xf3, 0x0f, 0x1e, 0xfa, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x90, 0x90];
        let before: Vec<u8> =
            [entry, &[0xe8, 0x10, 0x20, 0x30, 0x40], &[0xeb, 0x02], &[0x48, 0x89, 0xf8], &[0xc3]].concat();
        // The static call set to return 0, the key's jump a NOP.
        let now: Vec<u8> =
            [entry, &[0x2e, 0x2e, 0x2e, 0x31, 0xc0], &[0x66, 0x90], &[0x48, 0x89, 0xf8], &[0xc3]].concat();
        assert!(same_code(&before, &now, &[]));
        // A 5-byte NOP there, or a jmp rel32: the same slot.
        let mut nop = now.clone();
        nop[16..21].copy_from_slice(&[0x0f, 0x1f, 0x44, 0x00, 0x00]);
        assert!(same_code(&before, &nop, &[]));
        nop[16..21].copy_from_slice(&[0xe9, 1, 2, 3, 4]);
        assert!(same_code(&before, &nop, &[]));
        // Any other 5-byte instruction there is other code: mov $imm32,%eax.
        let mut other = now.clone();
        other[16..21].copy_from_slice(&[0xb8, 0, 0, 0, 0]);
        assert!(!same_code(&before, &other, &[]));
        // So is another register in the mov after the slots.
        let mut other = now;
        other[25] = 0xf0;
        assert!(!same_code(&before, &other, &[]));
    }

    #[test]
    fn the_action_argument_of_a_call_is_read_back_when_it_is_a_constant() {
        let addr = 0xffffffff81002000u64;
        // lea 0x100(%rip),%rsi; mov %rbx,%rdx; call ...; mov %r12,%rsi; call ...;
        // mov $0xffffffff81003000,%rsi (sign-extended imm32); call ...
        let code: Vec<u8> = [
            &[0x48, 0x8d, 0x35, 0x00, 0x01, 0x00, 0x00][..],
            &[0x48, 0x89, 0xda],
            &[0xe8, 0, 0, 0, 0],
            &[0x4c, 0x89, 0xe6],
            &[0xe8, 0, 0, 0, 0],
            &[0x48, 0xc7, 0xc6, 0x00, 0x30, 0x00, 0x81],
            &[0xe8, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(arg_before_call(addr, &code, 10, Register::RSI), Some(addr + 7 + 0x100));
        assert_eq!(arg_before_call(addr, &code, 18, Register::RSI), None, "rsi copied from a register: not known");
        assert_eq!(arg_before_call(addr, &code, 30, Register::RSI), Some(0xffffffff81003000));
    }

    #[test]
    fn cxl_code_is_the_dense_run_and_the_cxl_modules() {
        let mut text = String::new();
        let mut addr = 0xffffffff81000000u64;
        let mut add = |name: &str, module: Option<&str>| {
            match module {
                Some(m) => text.push_str(&format!("{addr:x} t {name}\t[{m}]\n")),
                None => text.push_str(&format!("{addr:x} t {name}\n")),
            }
            addr += 0x40;
        };
        for i in 0..50 {
            add(&format!("udmabuf_{i}"), None);
        }
        add("is_cxl_port", None);
        for i in 0..30 {
            add(&format!("cxl_fn_{i}"), None);
            add(&format!("helper_{i}"), None);
        }
        add("cxl_port_probe", None);
        for i in 0..50 {
            add(&format!("mac_hid_{i}"), None);
        }
        add("cxl_reset_bus_function", None); // a lone quirk elsewhere: not the core
        add("cxl_mem_probe", Some("cxl_mem"));
        add("nvdimm_bus_probe", Some("libnvdimm"));
        let symbols = Symbols::parse(text.as_bytes()).unwrap();
        let names: Vec<&str> =
            code_functions(&symbols, &crate::kernel::profile::CXL_CODE).iter().map(|s| &*s.name).collect();
        assert_eq!(names.first(), Some(&"is_cxl_port"));
        assert!(names.contains(&"helper_29") && names.contains(&"cxl_port_probe"));
        assert!(!names.iter().any(|n| n.starts_with("udmabuf") || n.starts_with("mac_hid")));
        assert!(!names.contains(&"cxl_reset_bus_function"));
        assert!(names.contains(&"cxl_mem_probe") && !names.contains(&"nvdimm_bus_probe"));
    }
}
