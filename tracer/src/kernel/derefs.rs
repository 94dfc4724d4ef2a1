//! Inline dereferences of dports: the instructions in CXL code that read or write memory
//! through a register at a displacement inside `struct cxl_dport` (the seed's own
//! `if (dport->rch)`, `cmpb $0x0,0x90(%rax)` in 7.2.13's `cxl_mem_probe`).
//!
//! The static filter keeps an instruction when its memory operand is `disp(base)` with a
//! general-purpose base register (not rsp, no index, no segment override) and the access
//! falls inside one member of the running kernel's `struct cxl_dport` (from BTF; a hole or
//! padding is never a dport access). Only functions that can hold a loaded dport are
//! scanned: those that look one up (an `xa_load` call site, or a call to a function that
//! returns a dport or fills a `struct cxl_dport **`) and the use sites (functions taking a
//! `struct cxl_dport *`). The run-time filter is exact: the probe reports only when the base
//! register holds a dport its thread loaded.
use std::sync::Arc;

use btf_rs::{Btf, Type};
use iced_x86::{Decoder, DecoderOptions, InstructionInfoFactory, OpAccess, Register};
use tracer_common::Reg;

use super::btf::{BtfError, find_struct};
use crate::symbolize::Symbol;

/// One member of the dport struct that an access can fall in: a scalar, an array, or a
/// struct whose members are listed too (both are leaves: the innermost that holds an
/// access names it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// "rch", "regs.ras" (nested members joined with dots).
    pub path: Arc<str>,
    pub offset: u64,
    pub size: u64,
}

/// The layout of `struct cxl_dport` in the running kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    /// Every named member at any depth, outer before inner.
    pub members: Vec<Member>,
}

/// How deep nested members are listed (cxl_dport.regs.<union>.ras is three).
const MAX_DEPTH: usize = 4;

impl Layout {
    pub fn from_btf(btf: &Btf, strukt: &'static str) -> Result<Layout, BtfError> {
        let def = find_struct(btf, strukt)?;
        let mut members = Vec::new();
        collect(btf, &def, "", 0, 0, &mut members)?;
        Ok(Layout { size: def.size() as u64, members })
    }

    /// The innermost member holding all of `[offset, offset + size)`; of a union's
    /// alternatives, the first declared.
    pub fn member_at(&self, offset: u64, size: u64) -> Option<&Member> {
        let end = offset.checked_add(size.max(1))?;
        let depth = |m: &Member| m.path.matches('.').count();
        self.members
            .iter()
            .filter(|m| m.offset <= offset && end <= m.offset + m.size)
            .fold(None, |best: Option<&Member>, m| match best {
                Some(b) if depth(b) >= depth(m) => Some(b),
                _ => Some(m),
            })
    }

    /// Reads the text form `tests/data/code/*.layout` holds: `size N`, then `path offset size`
    /// lines; `#` starts a comment.
    pub fn parse(text: &str) -> Option<Layout> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
        let size = lines.next()?.strip_prefix("size ")?.parse().ok()?;
        let members = lines
            .map(|l| {
                let mut f = l.split_whitespace();
                Some(Member { path: Arc::from(f.next()?), offset: f.next()?.parse().ok()?, size: f.next()?.parse().ok()? })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Layout { size, members })
    }
}

fn type_size(btf: &Btf, ty: &Type) -> Option<u64> {
    match ty {
        Type::Int(i) => Some(i.size() as u64),
        Type::Ptr(_) => Some(8),
        Type::Enum(e) => Some(e.size() as u64),
        Type::Enum64(e) => Some(e.size() as u64),
        Type::Float(f) => Some(f.size() as u64),
        Type::Struct(s) | Type::Union(s) => Some(s.size() as u64),
        Type::Array(a) => {
            let elem = btf.resolve_chained_type(a).ok()?;
            Some(type_size(btf, &elem)? * a.len() as u64)
        }
        Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) | Type::Restrict(_) | Type::TypeTag(_) => {
            let next = btf.resolve_chained_type(ty.as_btf_type()?).ok()?;
            type_size(btf, &next)
        }
        _ => None,
    }
}

/// `ty` without typedefs and qualifiers.
fn strip(btf: &Btf, ty: Type) -> Type {
    let mut ty = ty;
    for _ in 0..16 {
        match &ty {
            Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) | Type::Restrict(_) | Type::TypeTag(_) => {
                match ty.as_btf_type().and_then(|b| btf.resolve_chained_type(b).ok()) {
                    Some(next) => ty = next,
                    None => return ty,
                }
            }
            _ => return ty,
        }
    }
    ty
}

fn collect(
    btf: &Btf,
    def: &btf_rs::Struct,
    prefix: &str,
    base: u64,
    depth: usize,
    out: &mut Vec<Member>,
) -> Result<(), BtfError> {
    for m in &def.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let ty = strip(btf, btf.resolve_chained_type(m)?);
        let offset = base + u64::from(m.bit_offset() / 8);
        let size = match m.bitfield_size() {
            Some(bits) => u64::from(bits.div_ceil(8)).max(1),
            None => type_size(btf, &ty).unwrap_or(0),
        };
        let path = match (prefix.is_empty(), name.is_empty()) {
            (_, true) => prefix.to_owned(),
            (true, false) => name.clone(),
            (false, false) => format!("{prefix}.{name}"),
        };
        if !name.is_empty() {
            out.push(Member { path: Arc::from(path.as_str()), offset, size });
        }
        if depth < MAX_DEPTH
            && let Type::Struct(inner) | Type::Union(inner) = &ty
        {
            collect(btf, inner, &path, offset, depth + 1, out)?;
        }
    }
    Ok(())
}

/// An instruction that accesses `struct cxl_dport` memory if its base register holds one.
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

fn gpr(register: Register) -> Option<Reg> {
    Some(match register {
        Register::RAX => Reg::Rax,
        Register::RBX => Reg::Rbx,
        Register::RCX => Reg::Rcx,
        Register::RDX => Reg::Rdx,
        Register::RSI => Reg::Rsi,
        Register::RDI => Reg::Rdi,
        Register::RBP => Reg::Rbp,
        Register::R8 => Reg::R8,
        Register::R9 => Reg::R9,
        Register::R10 => Reg::R10,
        Register::R11 => Reg::R11,
        Register::R12 => Reg::R12,
        Register::R13 => Reg::R13,
        Register::R14 => Reg::R14,
        Register::R15 => Reg::R15,
        // rsp is the stack (the `&dport` slot itself, not the dport); rip-relative is global
        // data.
        _ => return None,
    })
}

/// Finds the deref sites in `code`, the bytes of `function`.
pub fn scan(function: &Symbol, code: &[u8], layout: &Layout, out: &mut Vec<DerefSite>) {
    let mut decoder = Decoder::with_ip(64, code, function.addr, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    for insn in &mut decoder {
        if insn.is_invalid() {
            continue;
        }
        // One site per instruction: the first memory operand that qualifies (an instruction
        // with two, like `movs`, has an index-free pair only through rsi/rdi strings, which
        // the kernel's CXL code does not use on dports).
        // %gs/%fs-relative accesses are per-CPU or per-task data, not a pointer's target.
        if insn.segment_prefix() != Register::None {
            continue;
        }
        let used = info.info(&insn).used_memory().iter().find_map(|m| {
            let reg = gpr(m.base())?;
            let plain = m.index() == Register::None;
            let write = match m.access() {
                OpAccess::Read | OpAccess::CondRead => false,
                OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite => true,
                _ => return None, // lea, nop, prefetch: no access
            };
            let size = m.memory_size().size() as u64;
            let offset = m.displacement();
            if !plain || size == 0 || offset >= layout.size {
                return None;
            }
            let member = layout.member_at(offset, size)?;
            Some((reg, member.path.clone(), offset, size, write))
        });
        if let Some((reg, member, offset, size, write)) = used {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `struct cxl_dport` of Debian 7.2.13 (its BTF, as pahole prints it), as far as the
    /// tests need: dport_dev@0 (8), reg_map@8 (112), port_id@120 (4), rcrb@128 (16),
    /// rch@144 (1), port@152 (8), regs@160 (64), coord@224 (32), link_latency@256 (8),
    /// gpf_dvsec@264 (4); size 272.
    fn layout_7_2() -> Layout {
        let m = |path: &str, offset, size| Member { path: Arc::from(path), offset, size };
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

    /// Real code: `cxl_mem_probe` of Debian's `cxl_mem.ko` (tests/data/code/README.md says
    /// where the bytes come from), scanned with that kernel's `struct cxl_dport` layout.
    fn real_sites(version: &str, code: &[u8], layout: &str) -> Vec<DerefSite> {
        let layout = Layout::parse(layout).expect("a well-formed layout file");
        let f = Symbol {
            addr: 0xffffffffc0a00000,
            name: Arc::from("cxl_mem_probe"),
            module: Some(Arc::from("cxl_mem")),
            text: true,
        };
        let mut sites = Vec::new();
        scan(&f, code, &layout, &mut sites);
        assert!(!sites.is_empty(), "{version}: no site");
        sites
    }

    #[test]
    fn the_seeds_inline_rch_read_is_a_site_in_7_2_13_cxl_mem_probe() {
        let sites = real_sites(
            "7.2.13",
            include_bytes!("../../tests/data/code/cxl_mem_probe-7.2.13.bin"),
            include_str!("../../tests/data/code/cxl_dport-7.2.13.layout"),
        );
        // cxl_mem_probe+0x19a: cmpb $0x0,0x90(%rax), `if (dport->rch)` before the lock.
        let rch = sites.iter().find(|s| s.insn == 0x19a).expect("the rch read is a site");
        assert_eq!((rch.reg, &*rch.member, rch.offset, rch.size, rch.write), (Reg::Rax, "rch", 144, 1, false));
        // +0x192 `mov 0x8(%rsp),%rax` loads the dport from its stack slot: not a dport access.
        assert!(!sites.iter().any(|s| s.insn == 0x192));
        // +0x1b6 `cmpq $0x0,0x68(%rbx)` reads endpoint_parent->driver: the filter cannot know
        // rbx is a device (0x68 is inside reg_map), so it is a site, and the probe's
        // run-time check (is rbx a dport this thread loaded?) is what keeps it silent.
        assert!(sites.iter().any(|s| s.insn == 0x1b6 && s.reg == Reg::Rbx));
        // Nothing at a displacement past the struct or in a hole.
        assert!(sites.iter().all(|s| s.offset < 272));
        assert_eq!(sites.len(), 8, "{sites:#?}");
    }

    #[test]
    fn the_inline_rch_read_is_a_site_in_6_12_117_cxl_mem_probe() {
        let sites = real_sites(
            "6.12.117",
            include_bytes!("../../tests/data/code/cxl_mem_probe-6.12.117.bin"),
            include_str!("../../tests/data/code/cxl_dport-6.12.117.layout"),
        );
        // cxl_mem_probe+0x147: cmpb $0x0,0x90(%rdi), the same `if (dport->rch)`.
        let rch = sites.iter().find(|s| s.insn == 0x147).expect("the rch read is a site");
        assert_eq!((rch.reg, &*rch.member, rch.offset, rch.size, rch.write), (Reg::Rdi, "rch", 144, 1, false));
        assert!(sites.iter().all(|s| s.offset < 256));
        assert_eq!(sites.len(), 15, "{sites:#?}");
    }

    #[test]
    fn the_innermost_member_names_an_access_and_holes_name_none() {
        let layout = layout_7_2();
        assert_eq!(&*layout.member_at(144, 1).unwrap().path, "rch");
        assert_eq!(&*layout.member_at(176, 8).unwrap().path, "regs.ras");
        assert_eq!(&*layout.member_at(168, 8).unwrap().path, "regs");
        assert_eq!(&*layout.member_at(128, 8).unwrap().path, "rcrb.base");
        // The 7 bytes after rch are a hole; 4 bytes after port_id too.
        assert!(layout.member_at(145, 1).is_none());
        assert!(layout.member_at(124, 4).is_none());
        // An access wider than its member does not fit it.
        assert!(layout.member_at(144, 8).is_none());
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
        let mut sites = Vec::new();
        scan(&f, &code, &layout_7_2(), &mut sites);
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
