//! Inline dereferences of dports: the instructions in CXL code that read or write memory
//! through a register at a displacement inside `struct cxl_dport` (the seed's own
//! `if (dport->rch)`, `cmpb $0x0,0x90(%rax)` in 7.2.13's `cxl_mem_probe`).
//!
//! The static filter: only functions that can hold a loaded dport are scanned (those that
//! look one up: an `xa_load` call site, or a call to a function that returns a dport or
//! fills a `struct cxl_dport **`; and the use sites, taking a `struct cxl_dport *`). In
//! them a forward data-flow analysis follows where a dport can be: the return of a loader,
//! the stack slot a loader filled through `&dport` and what is read back from it, the dport
//! argument of a use site, copies between registers and through the stack frame. An
//! instruction is a site when its memory operand is `disp(base)` (no index, no segment
//! override) with a base register that may hold a dport there, and the access falls inside
//! one member of the running kernel's `struct cxl_dport` (from BTF: a hole or padding is
//! never a dport access). The run-time filter is exact: the probe reports only when the
//! base register holds a dport its thread loaded.
use std::sync::Arc;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess, OpKind, Register};
use rustc_hash::{FxHashMap, FxHashSet};
use tracer_common::Reg;

use super::{
    btf::{DportFunction, RETURNS},
    callsites::{CxlText, XaTarget},
    layout::Layout,
};
use crate::symbolize::{Symbol, Symbols};

/// An instruction that accesses `struct cxl_dport` memory through a register that may
/// hold a loaded dport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DerefSite {
    pub function: Arc<str>,
    pub module: Option<Arc<str>>,
    pub function_addr: u64,
    /// Offset of the instruction in the function.
    pub insn: u64,
    pub reg: Reg,
    pub member: Arc<str>,
    /// Offset of the access in the dport, and its size.
    pub offset: u32,
    pub size: u32,
    pub write: bool,
}

/// A function that hands its caller a dport: as its return value (`xa_load` on a dports
/// xarray, `__devm_cxl_add_dport()`), or through a `struct cxl_dport **` argument
/// (`cxl_mem_find_port(cxlmd, &dport)`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Loader {
    pub returns: bool,
    /// Index (0-5) of the `struct cxl_dport **` argument.
    pub out_param: Option<u8>,
}

/// The 16 general-purpose registers, as bit positions: rax rcx rdx rbx rsp rbp rsi rdi
/// r8-r15 (the hardware's numbering).
fn gpr_index(register: Register) -> Option<usize> {
    let full = register.full_register();
    if !full.is_gpr64() {
        return None;
    }
    Some(full.number() - Register::RAX.number())
}

const RSP: usize = 4;
/// Argument registers of the kernel's calling convention: rdi rsi rdx rcx r8 r9.
const ARGS: [usize; 6] = [7, 6, 2, 1, 8, 9];
/// Registers a call may change: rax rcx rdx rsi rdi r8-r11.
const CALLER_SAVED: [usize; 9] = [0, 1, 2, 6, 7, 8, 9, 10, 11];

fn reg_of(index: usize) -> Option<Reg> {
    Some(match index {
        0 => Reg::Rax,
        1 => Reg::Rcx,
        2 => Reg::Rdx,
        3 => Reg::Rbx,
        5 => Reg::Rbp,
        6 => Reg::Rsi,
        7 => Reg::Rdi,
        8 => Reg::R8,
        9 => Reg::R9,
        10 => Reg::R10,
        11 => Reg::R11,
        12 => Reg::R12,
        13 => Reg::R13,
        14 => Reg::R14,
        15 => Reg::R15,
        // rsp is the stack (the `&dport` slot itself, not the dport).
        _ => return None,
    })
}

/// What may hold a dport at one instruction: a forward may-analysis over the function's
/// control flow, with the stack frame tracked so a dport that a loader wrote through
/// `&dport` (a stack slot) is seen when the function reads the slot back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Registers that may hold a dport (bit per register).
    dport: u16,
    /// Registers known to hold `entry rsp + value` (an address in this frame).
    frame_addr: [Option<i64>; 16],
    /// Stack slots (entry-rsp relative) that may hold a dport.
    slots: Vec<i64>,
    /// rsp relative to the function's entry; `None` once unknown.
    sp: Option<i64>,
}

impl State {
    /// The state at a function's entry: `dport_args` are the argument indexes holding a dport.
    pub fn entry(dport_args: &[u32]) -> State {
        let mut state = State { sp: Some(0), ..State::default() };
        for &arg in dport_args {
            if let Some(&r) = ARGS.get(arg as usize) {
                state.dport |= 1 << r;
            }
        }
        state
    }

    fn holds(&self, r: usize) -> bool {
        self.dport & (1 << r) != 0
    }

    fn set(&mut self, r: usize, dport: bool, frame_addr: Option<i64>) {
        if dport {
            self.dport |= 1 << r;
        } else {
            self.dport &= !(1 << r);
        }
        self.frame_addr[r] = frame_addr;
    }

    fn join(&mut self, other: &State) -> bool {
        let before = self.clone();
        self.dport |= other.dport;
        for (mine, theirs) in self.frame_addr.iter_mut().zip(other.frame_addr) {
            if *mine != theirs {
                *mine = None;
            }
        }
        for slot in &other.slots {
            if !self.slots.contains(slot) {
                self.slots.push(*slot);
            }
        }
        if self.sp != other.sp {
            self.sp = None;
        }
        *self != before
    }

    /// Entry-relative address of `disp(%rsp)`, or of `disp(%reg)` with reg a frame address.
    fn frame_slot(&self, base: Register, index: Register, disp: i64) -> Option<i64> {
        if index != Register::None {
            return None;
        }
        let b = gpr_index(base)?;
        if b == RSP { self.sp.map(|sp| sp + disp) } else { self.frame_addr[b].map(|a| a + disp) }
    }
}

/// The loader a call target is.
/// The loader a call (its instruction's address, its target) is.
pub type LoaderAt<'a> = &'a dyn Fn(u64, u64) -> Option<Loader>;

fn transfer(insn: &Instruction, state: &mut State, info: &mut InstructionInfoFactory, loader_at: LoaderAt) {
    use iced_x86::Mnemonic::*;
    let reg0 = (insn.op_count() > 0 && insn.op0_kind() == OpKind::Register).then(|| insn.op0_register());
    let reg1 = (insn.op_count() > 1 && insn.op1_kind() == OpKind::Register).then(|| insn.op1_register());
    let mem_slot = || state.frame_slot(insn.memory_base(), insn.memory_index(), insn.memory_displacement64() as i64);
    match insn.mnemonic() {
        Call => {
            let loader = (insn.op0_kind() == OpKind::NearBranch64)
                .then(|| loader_at(insn.ip(), insn.near_branch_target()))
                .flatten();
            if let Some(Loader { out_param: Some(i), .. }) = loader
                && let Some(slot) = ARGS.get(usize::from(i)).and_then(|&r| state.frame_addr[r])
                && !state.slots.contains(&slot)
            {
                state.slots.push(slot);
            }
            for r in CALLER_SAVED {
                state.set(r, false, None);
            }
            if loader.is_some_and(|l| l.returns) {
                state.set(0, true, None);
            }
            return;
        }
        Push => {
            state.sp = state.sp.map(|sp| sp - 8);
            return;
        }
        Pop => {
            state.sp = state.sp.map(|sp| sp + 8);
            if let Some(r) = reg0.and_then(gpr_index) {
                state.set(r, false, None);
            }
            return;
        }
        Sub | Add
            if reg0.and_then(gpr_index) == Some(RSP) && insn.op1_kind() == OpKind::Immediate8to64
                || reg0.and_then(gpr_index) == Some(RSP) && insn.op1_kind() == OpKind::Immediate32to64 =>
        {
            let imm = insn.immediate(1) as i64;
            state.sp = state.sp.map(|sp| if insn.mnemonic() == Sub { sp - imm } else { sp + imm });
            return;
        }
        Mov if reg0.is_some_and(|r| r.is_gpr64()) => {
            let dst = gpr_index(reg0.expect("checked")).expect("a 64-bit register");
            match (reg1, insn.op1_kind()) {
                (Some(src), _) if src.is_gpr64() => {
                    let s = gpr_index(src).expect("a 64-bit register");
                    let (dport, addr) = (state.holds(s), state.frame_addr[s]);
                    if s == RSP {
                        state.set(dst, false, state.sp);
                    } else {
                        state.set(dst, dport, addr);
                    }
                }
                (_, OpKind::Memory) => {
                    let dport = mem_slot().is_some_and(|slot| state.slots.contains(&slot));
                    state.set(dst, dport, None);
                }
                _ => state.set(dst, false, None),
            }
            if dst == RSP {
                state.sp = None;
            }
            return;
        }
        Mov if insn.op0_kind() == OpKind::Memory && reg1.is_some_and(|r| r.is_gpr64()) => {
            if let Some(slot) = mem_slot() {
                let s = gpr_index(reg1.expect("checked")).expect("a 64-bit register");
                state.slots.retain(|&x| x != slot);
                if state.holds(s) {
                    state.slots.push(slot);
                }
            }
            return;
        }
        Lea if reg0.is_some_and(|r| r.is_gpr64()) => {
            let dst = gpr_index(reg0.expect("checked")).expect("a 64-bit register");
            state.set(dst, false, mem_slot());
            if dst == RSP {
                state.sp = None;
            }
            return;
        }
        Xchg if reg0.is_some_and(|r| r.is_gpr64()) && reg1.is_some_and(|r| r.is_gpr64()) => {
            let (a, b) =
                (gpr_index(reg0.expect("checked")).expect("gpr"), gpr_index(reg1.expect("checked")).expect("gpr"));
            let (da, fa, db, fb) = (state.holds(a), state.frame_addr[a], state.holds(b), state.frame_addr[b]);
            state.set(a, db, fb);
            state.set(b, da, fa);
            return;
        }
        _ => {}
    }
    // Anything else that writes a register leaves no dport in it, except a conditional move,
    // which may leave either value.
    let cmov = matches!(
        insn.mnemonic(),
        Cmova
            | Cmovae
            | Cmovb
            | Cmovbe
            | Cmove
            | Cmovg
            | Cmovge
            | Cmovl
            | Cmovle
            | Cmovne
            | Cmovno
            | Cmovnp
            | Cmovns
            | Cmovo
            | Cmovp
            | Cmovs
    );
    let source = reg1.and_then(gpr_index).map(|s| state.holds(s)).unwrap_or(false);
    for used in info.info(insn).used_registers() {
        if !matches!(
            used.access(),
            OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
        ) {
            continue;
        }
        let Some(r) = gpr_index(used.register()) else { continue };
        if r == RSP {
            state.sp = None;
            continue;
        }
        let keep = cmov && (state.holds(r) || source);
        state.set(r, keep, None);
    }
}

/// What a deref site's memory operand touches, if the instruction accesses one through a
/// register that may hold a dport, inside a member of the struct.
fn access(
    insn: &Instruction,
    state: &State,
    info: &mut InstructionInfoFactory,
    layout: &Layout,
) -> Option<(Reg, Arc<str>, u64, u64, bool)> {
    // %gs/%fs-relative accesses are per-CPU or per-task data, not a pointer's target.
    if insn.segment_prefix() != Register::None {
        return None;
    }
    info.info(insn).used_memory().iter().find_map(|m| {
        let base = gpr_index(m.base())?;
        if !state.holds(base) || m.index() != Register::None {
            return None;
        }
        let reg = reg_of(base)?;
        let write = match m.access() {
            OpAccess::Read | OpAccess::CondRead => false,
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite => true,
            _ => return None, // lea, nop, prefetch: no access
        };
        let size = m.memory_size().size() as u64;
        let offset = m.displacement();
        if size == 0 || offset >= layout.size {
            return None;
        }
        let member = layout.member_at(offset, size)?;
        Some((reg, member.path.clone(), offset, size, write))
    })
}

/// Where control leaves a function to somewhere else than a call's return: a jump into its
/// `.cold` part, or a tail call, with the state at the jump.
pub type Exits = Vec<(u64, State)>;

/// Finds the deref sites of `function` (whose bytes are `code`), starting from `entries`
/// (address, state): the function's start with `State::entry`, or for a `.cold` part the
/// states its parent jumped in with. Returns where control left the function.
pub fn scan(
    function: &Symbol,
    code: &[u8],
    entries: &[(u64, State)],
    loader_at: LoaderAt,
    layout: &Layout,
    out: &mut Vec<DerefSite>,
) -> Exits {
    let end = function.addr + code.len() as u64;
    let insns: Vec<Instruction> = Decoder::with_ip(64, code, function.addr, DecoderOptions::NONE).into_iter().collect();
    let index_of = |addr: u64| insns.binary_search_by_key(&addr, Instruction::ip).ok();
    let mut states: Vec<Option<State>> = vec![None; insns.len()];
    let mut work = Vec::new();
    for (addr, state) in entries {
        if let Some(i) = index_of(*addr) {
            match &mut states[i] {
                Some(existing) => {
                    existing.join(state);
                }
                slot @ None => *slot = Some(state.clone()),
            }
            work.push(i);
        }
    }
    let mut info = InstructionInfoFactory::new();
    let mut exits: Exits = Vec::new();
    while let Some(i) = work.pop() {
        let insn = &insns[i];
        let mut state = states[i].clone().expect("queued with a state");
        if insn.is_invalid() {
            continue;
        }
        transfer(insn, &mut state, &mut info, loader_at);
        let target = (insn.op0_kind() == OpKind::NearBranch64).then(|| insn.near_branch_target());
        let (fall_through, jump) = match insn.flow_control() {
            FlowControl::UnconditionalBranch => (false, target),
            FlowControl::ConditionalBranch => (true, target),
            FlowControl::Return | FlowControl::IndirectBranch | FlowControl::Exception | FlowControl::Interrupt => {
                (false, None)
            }
            _ => (true, None),
        };
        let mut successors = Vec::with_capacity(2);
        if fall_through && i + 1 < insns.len() {
            successors.push(i + 1);
        }
        if let Some(t) = jump {
            if (function.addr..end).contains(&t) {
                successors.extend(index_of(t));
            } else {
                exits.push((t, state.clone()));
            }
        }
        for next in successors {
            let changed = match &mut states[next] {
                Some(existing) => existing.join(&state),
                slot @ None => {
                    *slot = Some(state.clone());
                    true
                }
            };
            if changed {
                work.push(next);
            }
        }
    }
    for (insn, state) in insns.iter().zip(&states) {
        let Some(state) = state else { continue };
        if let Some((reg, member, offset, size, write)) = access(insn, state, &mut info, layout) {
            out.push(DerefSite {
                function: function.name.clone(),
                module: function.module.clone(),
                function_addr: function.addr,
                insn: insn.ip() - function.addr,
                reg,
                member,
                offset: offset as u32,
                size: size as u32,
                write,
            });
        }
    }
    exits
}

/// Where dports come from, for `find`.
#[derive(Clone, Copy)]
pub struct Sources<'a> {
    /// Functions that hand a dport to their caller (BTF).
    pub loaders: &'a [DportFunction],
    /// Functions taking one (BTF): their argument is a dport inside them.
    pub uses: &'a [DportFunction],
    /// The xarray lookups whose result may be a dport (`xa_load`, `xa_find`...).
    pub lookups: &'a [&'a str],
    /// Lookup calls (by instruction address) known to read another xarray: their results
    /// are not dports.
    pub not_dports: &'a FxHashSet<u64>,
}

/// Every deref site in CXL code, and which can hold a dport: found once with every lookup
/// as a loader (all are probed: the kernel side judges only dports, and a misread of which
/// xarray a lookup reads must not blind it), once without the lookups of other xarrays
/// (`Sources::not_dports`); a site only the first finds is `Other` (counted apart).
pub fn find_classified(
    symbols: &Symbols,
    text: &CxlText,
    sources: &Sources,
    layout: &Layout,
) -> Vec<(DerefSite, XaTarget)> {
    let all = find(symbols, text, &Sources { not_dports: &FxHashSet::default(), ..*sources }, layout);
    let reached: FxHashSet<(u64, u64)> =
        find(symbols, text, sources, layout).into_iter().map(|s| (s.function_addr, s.insn)).collect();
    all.into_iter()
        .map(|s| {
            let target = if reached.contains(&(s.function_addr, s.insn)) { XaTarget::Dports } else { XaTarget::Other };
            (s, target)
        })
        .collect()
}

/// Every deref site in CXL code. The lookups are loaders too, but for the calls in
/// `not_dports`.
pub fn find(symbols: &Symbols, text: &CxlText, sources: &Sources, layout: &Layout) -> Vec<DerefSite> {
    let Sources { loaders, uses, lookups, not_dports } = *sources;
    let addrs = |f: &DportFunction| -> Vec<u64> {
        symbols.lookup(&f.name).filter(|s| s.module.as_deref() == f.module.as_deref()).map(|s| s.addr).collect()
    };
    let mut loader_map: FxHashMap<u64, Loader> = FxHashMap::default();
    for loader in loaders {
        let kind = Loader { returns: loader.arg == RETURNS, out_param: (loader.arg < 6).then_some(loader.arg as u8) };
        for addr in addrs(loader) {
            loader_map.insert(addr, kind);
        }
    }
    for sym in lookups.iter().flat_map(|name| symbols.lookup(name)).filter(|s| s.module.is_none()) {
        // A call through a call-depth thunk lands in the 16 bytes before the entry.
        for back in 0..=16 {
            loader_map.insert(sym.addr - back, Loader { returns: true, out_param: None });
        }
    }
    let mut dport_args: FxHashMap<u64, Vec<u32>> = FxHashMap::default();
    for u in uses {
        for addr in addrs(u) {
            dport_args.entry(addr).or_default().push(u.arg);
        }
    }
    let loader_at = |ip: u64, target: u64| match not_dports.contains(&ip) {
        true => None,
        false => loader_map.get(&target).copied(),
    };
    let mut sites = Vec::new();
    let mut cold_entries: FxHashMap<u64, Vec<(u64, State)>> = FxHashMap::default();
    let by_addr: FxHashMap<u64, usize> = text.functions.iter().enumerate().map(|(i, (f, _))| (f.addr, i)).collect();
    for (function, code) in &text.functions {
        let args = dport_args.get(&function.addr).map_or(&[][..], Vec::as_slice);
        let exits = scan(function, code, &[(function.addr, State::entry(args))], &loader_at, layout, &mut sites);
        // GCC moves unlikely paths to `<function>.cold`: follow the jumps into it with the
        // state they carry (a dport can be dereferenced on an error path).
        let cold = format!("{}.cold", function.name);
        for (target, state) in exits {
            if let Some((sym, _, _)) = symbols.resolve(target)
                && *sym.name == *cold
                && sym.module == function.module
                && (state.dport != 0 || !state.slots.is_empty())
            {
                cold_entries.entry(sym.addr).or_default().push((target, state));
            }
        }
    }
    for (addr, entries) in cold_entries {
        if let Some(&i) = by_addr.get(&addr) {
            let (function, code) = &text.functions[i];
            scan(function, code, &entries, &loader_at, layout, &mut sites);
        }
    }
    sites.sort_by_key(|s| (s.function_addr, s.insn));
    sites
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::layout::Field;

    /// `struct cxl_dport` of Debian 7.2.13 (its BTF, as pahole prints it), as far as the
    /// tests need: dport_dev@0 (8), reg_map@8 (112), port_id@120 (4), rcrb@128 (16),
    /// rch@144 (1), port@152 (8), regs@160 (64), coord@224 (32), link_latency@256 (8),
    /// gpf_dvsec@264 (4); size 272.
    fn layout_7_2() -> Layout {
        let m = |path: &str, offset, size| Field { path: Arc::from(path), offset, size };
        Layout {
            size: 272,
            members: vec![
                m("dport_dev", 0, 8),
                m("reg_map", 8, 112),
                m("port_id", 120, 4),
                m("rcrb", 128, 16),
                m("rcrb.base", 128, 8),
                m("rch", 144, 1),
                m("port", 152, 8),
                m("regs", 160, 64),
                m("regs.ras", 176, 8),
                m("coord", 224, 32),
                m("link_latency", 256, 8),
                m("gpf_dvsec", 264, 4),
            ],
        }
    }

    const LOADED_FROM: u64 = 0xffffffffc0a00000;

    /// Real code: `cxl_mem_probe` of Debian's `cxl_mem.ko` (tests/data/code/README.md says
    /// where the bytes come from), its calls relocated to a made-up address per callee as
    /// the kernel's module loader would, scanned with that kernel's `struct cxl_dport`.
    fn real_sites(code: &[u8], calls: &str, layout: &str) -> Vec<DerefSite> {
        let layout = Layout::parse(layout).expect("a well-formed layout file");
        let f = Symbol {
            addr: LOADED_FROM,
            name: Arc::from("cxl_mem_probe"),
            module: Some(Arc::from("cxl_mem")),
            text: true,
        };
        let mut code = code.to_vec();
        let mut callees: Vec<&str> = Vec::new();
        for line in calls.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (at, callee) = line.split_once(' ').expect("offset callee");
            let at = usize::from_str_radix(at.trim_start_matches("0x"), 16).expect("a hex offset");
            let k = callees.iter().position(|c| *c == callee).unwrap_or_else(|| {
                callees.push(callee);
                callees.len() - 1
            });
            let target = 0xffffffff81000000u64 + k as u64 * 0x1000;
            let rel = (target as i64 - (f.addr + at as u64 + 4) as i64) as i32;
            code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        let find_port = callees.iter().position(|c| *c == "cxl_mem_find_port").expect("stock cxl_mem_probe calls it");
        let find_port = 0xffffffff81000000u64 + find_port as u64 * 0x1000;
        // cxl_mem_find_port(cxlmd, &dport): the dport comes back through argument 1.
        let loader_at =
            |_: u64, target: u64| (target == find_port).then_some(Loader { returns: false, out_param: Some(1) });
        let mut sites = Vec::new();
        scan(&f, &code, &[(f.addr, State::entry(&[]))], &loader_at, &layout, &mut sites);
        sites
    }

    #[test]
    fn the_seeds_inline_rch_read_is_the_site_in_7_2_13_cxl_mem_probe() {
        let sites = real_sites(
            include_bytes!("../../tests/data/code/cxl_mem_probe-7.2.13.bin"),
            include_str!("../../tests/data/code/cxl_mem_probe-7.2.13.calls"),
            include_str!("../../tests/data/code/cxl_dport-7.2.13.layout"),
        );
        // +0xfa `lea 0x8(%rsp),%rsi; ... call cxl_mem_find_port` fills the slot; +0x192
        // `mov 0x8(%rsp),%rax` reads it back; +0x19a `cmpb $0x0,0x90(%rax)` is
        // `if (dport->rch)`, before the lock. `cmpq $0x0,0x68(%rbx)` at +0x1b6 reads
        // endpoint_parent->driver: rbx never holds the dport, so it is not a site.
        let got: Vec<(u64, Reg, &str, u32, u32, bool)> =
            sites.iter().map(|s| (s.insn, s.reg, &*s.member, s.offset, s.size, s.write)).collect();
        assert_eq!(got, [(0x19a, Reg::Rax, "rch", 144, 1, false)]);
    }

    #[test]
    fn the_inline_rch_read_is_the_site_in_6_12_117_cxl_mem_probe() {
        let sites = real_sites(
            include_bytes!("../../tests/data/code/cxl_mem_probe-6.12.117.bin"),
            include_str!("../../tests/data/code/cxl_mem_probe-6.12.117.calls"),
            include_str!("../../tests/data/code/cxl_dport-6.12.117.layout"),
        );
        let got: Vec<(u64, Reg, &str, u32, u32, bool)> =
            sites.iter().map(|s| (s.insn, s.reg, &*s.member, s.offset, s.size, s.write)).collect();
        // +0x147 `cmpb $0x0,0x90(%rdi)` is `if (dport->rch)` before any lock; +0x181
        // `mov 0x98(%rax),%r15` is `parent_dport->port` in the inlined
        // devm_cxl_add_endpoint(), under the lock but with the pointer loaded before it.
        assert_eq!(got, [(0x147, Reg::Rdi, "rch", 144, 1, false), (0x181, Reg::Rax, "port", 152, 8, false)]);
    }

    // Real instruction bytes live in tests/data (kernel-code/); this one is hand-assembled to
    // pin the filter's corner cases.
    #[test]
    fn only_base_plus_displacement_accesses_inside_a_member_qualify() {
        let f = Symbol { addr: 0xffffffffc0000000, name: Arc::from("f"), module: Some(Arc::from("m")), text: true };
        let code: Vec<u8> = [
            &[0x80, 0xb8, 0x90, 0x00, 0x00, 0x00, 0x00][..], // cmpb $0x0,0x90(%rax): rch, read
            &[0x4c, 0x89, 0xab, 0x98, 0x00, 0x00, 0x00],     // mov %r13,0x98(%rbx): port, write
            &[0x48, 0x8b, 0x44, 0x24, 0x08],                 // mov 0x8(%rsp),%rax: the stack
            &[0x48, 0x8d, 0x78, 0x08],                       // lea 0x8(%rax),%rdi: no access
            &[0x0f, 0x1f, 0x40, 0x00],                       // nopl 0x0(%rax): no access
            &[0x48, 0x8b, 0x04, 0xc8],                       // mov (%rax,%rcx,8),%rax: indexed
            &[0x48, 0x8b, 0x80, 0x18, 0x03, 0x00, 0x00],     // mov 0x318(%rax),%rax: past the end
            &[0x48, 0x8b, 0x80, 0x91, 0x00, 0x00, 0x00],     // mov 0x91(%rax),%rax: a hole
            &[0x65, 0x48, 0x8b, 0x04, 0x25, 0x28, 0x00, 0x00, 0x00], // mov %gs:0x28,%rax
            &[0x83, 0x45, 0x78, 0x01],                       // addl $1,0x78(%rbp): port_id, read-write
        ]
        .concat();
        // Every register but rsp holds a dport at entry (as if all were use-site arguments),
        // and nothing in the code writes one before the accesses, except the last mov.
        let all = State { dport: !(1 << RSP), sp: Some(0), ..State::default() };
        let mut sites = Vec::new();
        scan(&f, &code, &[(f.addr, all)], &|_, _| None, &layout_7_2(), &mut sites);
        let got: Vec<(u64, Reg, &str, u32, u32, bool)> =
            sites.iter().map(|s| (s.insn, s.reg, &*s.member, s.offset, s.size, s.write)).collect();
        assert_eq!(
            got,
            [
                (0, Reg::Rax, "rch", 144, 1, false),
                (7, Reg::Rbx, "port", 152, 8, true),
                (54, Reg::Rbp, "port_id", 120, 4, true),
            ]
        );
    }
}
