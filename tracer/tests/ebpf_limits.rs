//! The kernel side must load on the oldest kernel of the matrix: 6.1's verifier refuses a
//! program whose call chain needs more than 512 bytes of stack, counting each function's
//! frame rounded up to 32 bytes (`check_max_stack_depth`). This computes that figure from the
//! eBPF object build.rs made, for every program, as the verifier does: each function's
//! deepest access below r10 (or address taken from it), summed along the deepest chain of
//! bpf-to-bpf calls. (Its other limit, a million processed instructions, depends on the
//! kernel's pruning and is only measured by loading in the 6.1 guest: the guest suite.)
use std::collections::HashMap;

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionIndex, SymbolKind};

const OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tracer"));
const STACK_LIMIT: u64 = 512;

/// A function: its section, its byte range there.
#[derive(Clone, Copy)]
struct Function {
    section: SectionIndex,
    start: u64,
    size: u64,
}

fn frame_and_calls(
    file: &object::File,
    f: Function,
    functions: &HashMap<(SectionIndex, u64), String>,
) -> (u64, Vec<String>) {
    let section = file.section_by_index(f.section).unwrap();
    let data = section.data().unwrap();
    let code = &data[f.start as usize..(f.start + f.size) as usize];
    let relocations: HashMap<u64, (RelocationTarget, i64)> =
        section.relocations().map(|(offset, r)| (offset, (r.target(), r.addend()))).collect();
    let (mut depth, mut calls) = (0u64, Vec::new());
    let mut from_fp: HashMap<u8, i64> = HashMap::new();
    for (i, insn) in code.chunks_exact(8).enumerate() {
        let (op, dst, src) = (insn[0], insn[1] & 0xf, insn[1] >> 4);
        let off = i16::from_le_bytes([insn[2], insn[3]]) as i64;
        let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]) as i64;
        let class = op & 7;
        // st/stx with r10 as base, ldx with r10 as source: an r10-relative slot.
        if (class == 2 || class == 3) && dst == 10 || class == 1 && src == 10 {
            depth = depth.max((-off).max(0) as u64);
        }
        match (class, op) {
            (7, 0xbf) if src == 10 => {
                from_fp.insert(dst, 0);
            }
            (7, 0x07) if from_fp.contains_key(&dst) => {
                let v = from_fp[&dst] + imm;
                from_fp.insert(dst, v);
                depth = depth.max((-v).max(0) as u64);
            }
            (7, _) => {
                from_fp.remove(&dst);
            }
            _ => {}
        }
        if op == 0x85 && src == 1 {
            let at = f.start + i as u64 * 8;
            let target = match relocations.get(&at) {
                Some((RelocationTarget::Symbol(sym), _)) => {
                    let sym = file.symbol_by_index(*sym).unwrap();
                    match sym.kind() {
                        SymbolKind::Section => (sym.section_index().unwrap(), sym.address() + ((imm + 1) * 8) as u64),
                        _ => (sym.section_index().unwrap(), sym.address()),
                    }
                }
                _ => (f.section, (at as i64 + 8 + imm * 8) as u64),
            };
            if let Some(name) = functions.get(&target) {
                calls.push(name.clone());
            }
        }
    }
    (depth, calls)
}

fn round32(n: u64) -> u64 {
    n.max(1).div_ceil(32) * 32
}

/// The deepest chain from `name`: its combined stack and the path.
fn deepest(name: &str, frames: &HashMap<String, (u64, Vec<String>)>, seen: &mut Vec<String>) -> (u64, Vec<String>) {
    let (frame, calls) = &frames[name];
    seen.push(name.to_owned());
    let mut best = (0, Vec::new());
    for callee in calls {
        if seen.contains(callee) {
            continue; // no recursion in BPF; be safe anyway
        }
        let below = deepest(callee, frames, seen);
        if below.0 > best.0 {
            best = below;
        }
    }
    seen.pop();
    let mut path = vec![format!("{name} ({frame} B)")];
    path.extend(best.1);
    (round32(*frame) + best.0, path)
}

#[test]
fn every_program_fits_the_oldest_verifiers_stack() {
    let file = object::File::parse(OBJECT).unwrap();
    let mut functions = HashMap::new();
    let mut by_name = HashMap::new();
    for sym in file.symbols().filter(|s| s.kind() == SymbolKind::Text && s.size() > 0) {
        let (Some(section), Ok(name)) = (sym.section_index(), sym.name()) else { continue };
        functions.insert((section, sym.address()), name.to_owned());
        by_name.insert(name.to_owned(), Function { section, start: sym.address(), size: sym.size() });
    }
    let frames: HashMap<String, (u64, Vec<String>)> =
        by_name.iter().map(|(name, f)| (name.clone(), frame_and_calls(&file, *f, &functions))).collect();
    let programs =
        ["site", "lock_site", "lifetime_site", "shared_deref", "dport_add_exit", "free_dport_entry", "kfree"];
    let mut over = Vec::new();
    for program in programs {
        assert!(frames.contains_key(program), "the eBPF object has no program {program}");
        let (total, path) = deepest(program, &frames, &mut Vec::new());
        println!("{program}: {total} of {STACK_LIMIT} bytes: {}", path.join(" -> "));
        if total > STACK_LIMIT {
            over.push(format!("{program}: {total} bytes ({})", path.join(" -> ")));
        }
    }
    assert!(over.is_empty(), "past 6.1's combined stack limit of {STACK_LIMIT} bytes: {over:?}");
}
