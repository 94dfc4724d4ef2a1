//! Runs a program of the eBPF object on the host, counting every instruction it executes
//! (its subprograms' included, a helper call counting as its one `call`), against a mock
//! of the kernel: maps that behave as maps, kernel memory read from a table, a ring buffer
//! that always has room. It is for counting what a given probe hit costs, not for checking
//! what the verifier would accept: an access outside what the program was given fails the
//! run, with the instruction it stopped at. `TRACER_BPFVM_TRACE=1` prints each instruction's
//! place as it runs.
use std::collections::{BTreeMap, HashMap};

use anyhow::{Context as _, bail, ensure};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget, SectionKind, SymbolKind};

/// The object's code laid end to end, its functions, maps and data.
pub struct Program {
    code: Vec<[u8; 8]>,
    /// Function name (demangled) at each instruction index where one starts.
    functions: HashMap<usize, String>,
    /// Each function's length in instructions (8-byte slots).
    lengths: HashMap<String, usize>,
    entries: HashMap<String, usize>,
    /// Call instructions resolved to their target's index.
    calls: HashMap<usize, usize>,
    /// `ld_imm64` instructions resolved to what they load.
    loads: HashMap<usize, Load>,
    maps: Vec<MapDef>,
    /// Data sections (`.rodata`, `.data`, `.bss`), copied into each run's memory.
    data: Vec<Vec<u8>>,
}

#[derive(Clone, Copy)]
enum Load {
    Map(usize),
    /// Data section, byte offset in it.
    Data(usize, u64),
}

pub struct MapDef {
    pub name: String,
    pub kind: u32,
    key_size: usize,
    value_size: usize,
}

const MAP_ARRAY: u32 = 2;
const MAP_PERCPU_ARRAY: u32 = 6;
const MAP_RINGBUF: u32 = 27;
/// The value `ld_imm64` of a map gives: this plus the map's index.
const MAP_HANDLE: u64 = 0x7fff_0000_0000;
/// Where run memory starts: low addresses stay invalid, as NULL must.
const BASE: u64 = 0x1_0000_0000;
const FRAME: usize = 512;

impl Program {
    pub fn parse(object: &[u8]) -> anyhow::Result<Program> {
        let file = object::File::parse(object).context("the eBPF object is not an ELF file")?;
        let mut code = Vec::new();
        let mut section_start = HashMap::new();
        for section in file.sections().filter(|s| s.kind() == SectionKind::Text && s.size() > 0) {
            section_start.insert(section.index(), code.len());
            code.extend(section.data()?.chunks_exact(8).map(|c| <[u8; 8]>::try_from(c).expect("8 bytes")));
        }
        let mut data_index = HashMap::new();
        let mut data = Vec::new();
        for section in file.sections() {
            if matches!(
                section.kind(),
                SectionKind::Data
                    | SectionKind::ReadOnlyData
                    | SectionKind::ReadOnlyString
                    | SectionKind::UninitializedData
            ) && section.name()? != "maps"
            {
                data_index.insert(section.index(), data.len());
                let bytes = match section.kind() {
                    SectionKind::UninitializedData => vec![0; section.size() as usize],
                    _ => section.data()?.to_vec(),
                };
                data.push(bytes);
            }
        }
        let mut maps = Vec::new();
        let mut map_index = HashMap::new();
        let mut functions = HashMap::new();
        let mut entries = HashMap::new();
        let mut lengths = HashMap::new();
        for sym in file.symbols() {
            let Some(section) = sym.section_index() else { continue };
            let name = format!("{:#}", rustc_demangle::demangle(sym.name()?));
            if sym.kind() == SymbolKind::Text && sym.size() > 0 {
                let start = section_start[&section] + sym.address() as usize / 8;
                functions.insert(start, name.clone());
                lengths.insert(name.clone(), sym.size() as usize / 8);
                entries.insert(name, start);
            } else if file.section_by_index(section)?.name()? == "maps" {
                let bytes = file.section_by_index(section)?.data()?;
                let def =
                    bytes.get(sym.address() as usize..sym.address() as usize + 12).context("short map definition")?;
                let word = |i: usize| u32::from_le_bytes(def[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
                map_index.insert(sym.index(), maps.len());
                maps.push(MapDef { name, kind: word(0), key_size: word(1) as usize, value_size: word(2) as usize });
            }
        }
        let mut calls = HashMap::new();
        let mut loads = HashMap::new();
        for section in file.sections().filter(|s| section_start.contains_key(&s.index())) {
            let start = section_start[&section.index()];
            for (offset, relocation) in section.relocations() {
                let at = start + offset as usize / 8;
                let RelocationTarget::Symbol(target) = relocation.target() else { continue };
                let sym = file.symbol_by_index(target)?;
                let insn = code[at];
                let imm = i32::from_le_bytes(insn[4..8].try_into().expect("4 bytes"));
                let Some(target_section) = sym.section_index() else {
                    bail!("instruction {at} refers to {:?}, which the object does not define", sym.name())
                };
                if insn[0] == 0x85 {
                    let byte = match sym.kind() {
                        SymbolKind::Section => sym.address() as i64 + (i64::from(imm) + 1) * 8,
                        _ => sym.address() as i64,
                    };
                    calls.insert(at, section_start[&target_section] + byte as usize / 8);
                } else if insn[0] == 0x18 {
                    let load = match (map_index.get(&target), data_index.get(&target_section)) {
                        (Some(&map), _) => Load::Map(map),
                        (None, Some(&data)) => Load::Data(data, (sym.address() as i64 + i64::from(imm)) as u64),
                        _ => bail!("instruction {at} loads {:?}, neither a map nor data", sym.name()),
                    };
                    loads.insert(at, load);
                }
            }
        }
        for (at, insn) in code.iter().enumerate() {
            if insn[0] == 0x85 && insn[1] >> 4 == 1 && !calls.contains_key(&at) {
                let imm = i32::from_le_bytes(insn[4..8].try_into().expect("4 bytes"));
                calls.insert(at, (at as i64 + 1 + i64::from(imm)) as usize);
            }
        }
        Ok(Program { code, functions, lengths, entries, calls, loads, maps, data })
    }

    /// Every function of the object: its length in instructions, and the functions it calls.
    pub fn functions(&self) -> BTreeMap<String, (usize, Vec<String>)> {
        let mut out = BTreeMap::new();
        for (name, &start) in &self.entries {
            let len = self.lengths[name];
            let mut callees: Vec<String> = (start..start + len)
                .filter_map(|at| self.calls.get(&at))
                .filter_map(|target| self.functions.get(target).cloned())
                .collect();
            callees.sort();
            out.insert(name.clone(), (len, callees));
        }
        out
    }

    pub fn map(&self, name: &str) -> anyhow::Result<usize> {
        self.maps.iter().position(|m| m.name == name).with_context(|| format!("the object has no map {name}"))
    }
}

/// The kernel as a run sees it.
#[derive(Default)]
pub struct Kernel {
    /// Hash map entries by map index and key bytes; arrays are zero-filled on first use.
    pub entries: HashMap<(usize, Vec<u8>), Vec<u8>>,
    /// 8-byte words of kernel memory `bpf_probe_read_kernel` reads (0 elsewhere).
    pub memory: HashMap<u64, u64>,
    pub pid_tgid: u64,
    pub task: u64,
    pub cookie: u64,
    pub func_ret: u64,
}

/// What one run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Run {
    pub executed: u64,
    /// Ring-buffer records submitted.
    pub submitted: u64,
    /// Functions entered whose name contains the filter given to `run` (the diagnostics).
    pub entered: Vec<String>,
}

struct Machine<'a> {
    program: &'a Program,
    kernel: &'a mut Kernel,
    memory: Vec<u8>,
    /// Addresses of each map value handed out, by map index and key.
    values: HashMap<(usize, Vec<u8>), u64>,
    data_base: Vec<u64>,
}

impl Machine<'_> {
    fn alloc(&mut self, len: usize) -> u64 {
        let at = BASE + self.memory.len() as u64;
        self.memory.resize(self.memory.len() + len.div_ceil(8) * 8, 0);
        at
    }

    fn slice(&mut self, addr: u64, len: usize) -> anyhow::Result<&mut [u8]> {
        let start = addr.checked_sub(BASE).with_context(|| format!("access to {addr:#x}, outside the run's memory"))?;
        let range = start as usize..start as usize + len;
        let memory_len = self.memory.len();
        self.memory.get_mut(range).with_context(|| format!("access to {addr:#x}+{len}, past {memory_len} bytes"))
    }

    fn read(&mut self, addr: u64, len: usize) -> anyhow::Result<u64> {
        let mut word = [0u8; 8];
        word[..len].copy_from_slice(self.slice(addr, len)?);
        Ok(u64::from_le_bytes(word))
    }

    fn write(&mut self, addr: u64, len: usize, value: u64) -> anyhow::Result<()> {
        self.slice(addr, len)?.copy_from_slice(&value.to_le_bytes()[..len]);
        Ok(())
    }

    fn map_of(&self, handle: u64) -> anyhow::Result<usize> {
        let index = handle.wrapping_sub(MAP_HANDLE) as usize;
        ensure!(index < self.program.maps.len(), "{handle:#x} is not a map");
        Ok(index)
    }

    /// The address of the value of `key` in `map`, copied into run memory on first use.
    fn value(&mut self, map: usize, key: Vec<u8>) -> anyhow::Result<Option<u64>> {
        if let Some(&at) = self.values.get(&(map, key.clone())) {
            return Ok(Some(at));
        }
        let def = &self.program.maps[map];
        let value = match (self.kernel.entries.get(&(map, key.clone())), def.kind) {
            (Some(value), _) => value.clone(),
            (None, MAP_ARRAY | MAP_PERCPU_ARRAY) => vec![0; def.value_size],
            (None, _) => return Ok(None),
        };
        let at = self.alloc(value.len());
        self.slice(at, value.len())?.copy_from_slice(&value);
        self.values.insert((map, key), at);
        Ok(Some(at))
    }

    fn helper(&mut self, id: i32, r: &mut [u64; 11], run: &mut Run) -> anyhow::Result<u64> {
        Ok(match id {
            // map_lookup_elem
            1 => {
                let map = self.map_of(r[1])?;
                let key = self.slice(r[2], self.program.maps[map].key_size)?.to_vec();
                self.value(map, key)?.unwrap_or(0)
            }
            // map_update_elem
            2 => {
                let map = self.map_of(r[1])?;
                let def = &self.program.maps[map];
                let (key_size, value_size) = (def.key_size, def.value_size);
                let key = self.slice(r[2], key_size)?.to_vec();
                let value = self.slice(r[3], value_size)?.to_vec();
                self.values.remove(&(map, key.clone()));
                self.kernel.entries.insert((map, key), value);
                0
            }
            // map_delete_elem
            3 => {
                let map = self.map_of(r[1])?;
                let key = self.slice(r[2], self.program.maps[map].key_size)?.to_vec();
                self.values.remove(&(map, key.clone()));
                self.kernel.entries.remove(&(map, key));
                0
            }
            // ktime_get_ns, get_smp_processor_id
            5 => 1_000_000,
            8 => 0,
            14 => self.kernel.pid_tgid,
            // get_current_comm
            16 => {
                let comm = self.slice(r[1], r[2] as usize)?;
                comm.fill(0);
                comm[..5].copy_from_slice(b"bench");
                0
            }
            35 => self.kernel.task,
            // get_stack: 16 frames
            67 => {
                let len = (r[3] as usize).min(16 * 8);
                self.slice(r[2], len)?.fill(0xff);
                len as u64
            }
            // probe_read_kernel
            113 => {
                let len = r[2] as usize;
                let value = self.kernel.memory.get(&r[3]).copied().unwrap_or(0);
                let bytes = value.to_le_bytes();
                let dst = self.slice(r[1], len)?;
                for (i, b) in dst.iter_mut().enumerate() {
                    *b = bytes.get(i).copied().unwrap_or(0);
                }
                0
            }
            // ringbuf_reserve, submit, discard, query
            131 => {
                let map = self.map_of(r[1])?;
                ensure!(self.program.maps[map].kind == MAP_RINGBUF, "reserve on a map that is not a ring buffer");
                self.alloc(r[2] as usize)
            }
            132 => {
                run.submitted += 1;
                0
            }
            133 => 0,
            134 => match r[2] {
                // BPF_RB_AVAIL_DATA, BPF_RB_RING_SIZE
                0 => 0,
                1 => 1 << 22,
                _ => 0,
            },
            174 => self.kernel.cookie,
            // get_func_ret
            184 => {
                self.write(r[2], 8, self.kernel.func_ret)?;
                0
            }
            _ => bail!("helper {id} is not mocked"),
        })
    }
}

fn alu(op: u8, dst: u64, src: u64, wide: bool) -> anyhow::Result<u64> {
    let (d32, s32) = (dst as u32, src as u32);
    let v = match (op & 0xf0, wide) {
        (0x00, true) => dst.wrapping_add(src),
        (0x10, true) => dst.wrapping_sub(src),
        (0x20, true) => dst.wrapping_mul(src),
        (0x30, true) => dst.checked_div(src).unwrap_or(0),
        (0x40, true) => dst | src,
        (0x50, true) => dst & src,
        (0x60, true) => dst.wrapping_shl(src as u32),
        (0x70, true) => dst.wrapping_shr(src as u32),
        (0x80, true) => dst.wrapping_neg(),
        (0x90, true) => dst.checked_rem(src).unwrap_or(dst),
        (0xa0, true) => dst ^ src,
        (0xb0, true) => src,
        (0xc0, true) => (dst as i64).wrapping_shr(src as u32) as u64,
        (0x00, false) => u64::from(d32.wrapping_add(s32)),
        (0x10, false) => u64::from(d32.wrapping_sub(s32)),
        (0x20, false) => u64::from(d32.wrapping_mul(s32)),
        (0x30, false) => u64::from(d32.checked_div(s32).unwrap_or(0)),
        (0x40, false) => u64::from(d32 | s32),
        (0x50, false) => u64::from(d32 & s32),
        (0x60, false) => u64::from(d32.wrapping_shl(s32)),
        (0x70, false) => u64::from(d32.wrapping_shr(s32)),
        (0x80, false) => u64::from(d32.wrapping_neg()),
        (0x90, false) => u64::from(d32.checked_rem(s32).unwrap_or(d32)),
        (0xa0, false) => u64::from(d32 ^ s32),
        (0xb0, false) => u64::from(s32),
        (0xc0, false) => u64::from((d32 as i32).wrapping_shr(s32) as u32),
        (code, _) => bail!("ALU operation {code:#x}"),
    };
    Ok(v)
}

fn jump(op: u8, dst: u64, src: u64, wide: bool) -> anyhow::Result<bool> {
    let (d, s) = if wide { (dst, src) } else { (u64::from(dst as u32), u64::from(src as u32)) };
    let (sd, ss) = if wide { (d as i64, s as i64) } else { (i64::from(d as u32 as i32), i64::from(s as u32 as i32)) };
    Ok(match op & 0xf0 {
        0x10 => d == s,
        0x20 => d > s,
        0x30 => d >= s,
        0x40 => d & s != 0,
        0x50 => d != s,
        0x60 => sd > ss,
        0x70 => sd >= ss,
        0xa0 => d < s,
        0xb0 => d <= s,
        0xc0 => sd < ss,
        0xd0 => sd <= ss,
        code => bail!("jump operation {code:#x}"),
    })
}

/// Runs function `entry` with `ctx` (the bytes the context pointer points to). Functions whose
/// name contains `watch` are listed in `Run::entered` when called.
pub fn run(program: &Program, kernel: &mut Kernel, entry: &str, ctx: &[u8], watch: &str) -> anyhow::Result<Run> {
    let mut m = Machine { program, kernel, memory: Vec::new(), values: HashMap::new(), data_base: Vec::new() };
    for data in &program.data {
        let at = m.alloc(data.len());
        m.slice(at, data.len())?.copy_from_slice(data);
        m.data_base.push(at);
    }
    let ctx_at = m.alloc(ctx.len());
    m.slice(ctx_at, ctx.len())?.copy_from_slice(ctx);
    let mut pc = *program.entries.get(entry).with_context(|| format!("the object has no function {entry}"))?;
    let mut r = [0u64; 11];
    r[1] = ctx_at;
    r[10] = m.alloc(FRAME) + FRAME as u64;
    let mut frames: Vec<(usize, [u64; 4], u64)> = Vec::new();
    let mut out = Run::default();
    // Every instruction's place on stderr: to see where two builds' hits part ways.
    let trace = std::env::var_os("TRACER_BPFVM_TRACE").is_some();
    loop {
        let insn = *program.code.get(pc).with_context(|| format!("ran off the code at {pc}"))?;
        out.executed += 1;
        if trace {
            eprintln!("bpfvm: {}", where_in(program, pc));
        }
        ensure!(out.executed < 1_000_000, "more than a million instructions: a loop the mock never ends");
        let (op, dst, src) = (insn[0], (insn[1] & 0xf) as usize, (insn[1] >> 4) as usize);
        let off = i64::from(i16::from_le_bytes([insn[2], insn[3]]));
        let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
        let k = i64::from(imm) as u64;
        let operand = if op & 0x08 != 0 { r[src] } else { k };
        let fail = |what: &str| anyhow::anyhow!("{what} at instruction {pc} ({})", where_in(program, pc));
        let size = [4, 2, 1, 8][((op >> 3) & 3) as usize];
        match op & 7 {
            // ALU, ALU64
            4 | 7 if op & 0xf0 == 0xd0 => {
                let v = r[dst];
                r[dst] = match (op & 0x08 != 0, imm) {
                    (false, 16) => v & 0xffff,
                    (false, 32) => v & 0xffff_ffff,
                    (false, 64) => v,
                    (true, 16) => u64::from((v as u16).swap_bytes()),
                    (true, 32) => u64::from((v as u32).swap_bytes()),
                    (true, 64) => v.swap_bytes(),
                    _ => return Err(fail("byte swap width")),
                };
            }
            4 | 7 => {
                ensure!(off == 0, fail("signed division or sign-extending move"));
                r[dst] = alu(op, r[dst], operand, op & 7 == 7).map_err(|e| fail(&e.to_string()))?;
            }
            // LD: only ld_imm64
            0 => {
                ensure!(op == 0x18, fail("legacy packet load"));
                let high = program.code.get(pc + 1).ok_or_else(|| fail("ld_imm64 cut off"))?;
                let value =
                    u64::from(imm as u32) | (u64::from(u32::from_le_bytes([high[4], high[5], high[6], high[7]])) << 32);
                r[dst] = match program.loads.get(&pc) {
                    Some(Load::Map(map)) => MAP_HANDLE + *map as u64,
                    Some(Load::Data(data, offset)) => m.data_base[*data] + offset,
                    None => value,
                };
                pc += 2;
                continue;
            }
            // LDX
            1 => {
                ensure!(op & 0xe0 == 0x60, fail("load mode"));
                r[dst] = m.read(r[src].wrapping_add(off as u64), size).map_err(|e| fail(&e.to_string()))?;
            }
            // ST, STX
            2 | 3 => {
                ensure!(op & 0xe0 == 0x60, fail("atomic store"));
                let value = if op & 7 == 3 { r[src] } else { k };
                m.write(r[dst].wrapping_add(off as u64), size, value).map_err(|e| fail(&e.to_string()))?;
            }
            // JMP, JMP32
            5 | 6 => match op & 0xf0 {
                0x00 => {
                    pc = (pc as i64 + 1 + off) as usize;
                    continue;
                }
                0x80 if src == 1 => {
                    let target = *program.calls.get(&pc).ok_or_else(|| fail("unresolved call"))?;
                    if let Some(name) = program.functions.get(&target)
                        && name.contains(watch)
                    {
                        out.entered.push(name.clone());
                    }
                    frames.push((pc + 1, [r[6], r[7], r[8], r[9]], r[10]));
                    r[10] = m.alloc(FRAME) + FRAME as u64;
                    pc = target;
                    continue;
                }
                0x80 => r[0] = m.helper(imm, &mut r, &mut out).map_err(|e| fail(&e.to_string()))?,
                0x90 => match frames.pop() {
                    Some((back, saved, fp)) => {
                        [r[6], r[7], r[8], r[9]] = saved;
                        r[10] = fp;
                        pc = back;
                        continue;
                    }
                    None => return Ok(out),
                },
                _ => {
                    if jump(op, r[dst], operand, op & 7 == 5).map_err(|e| fail(&e.to_string()))? {
                        pc = (pc as i64 + 1 + off) as usize;
                        continue;
                    }
                }
            },
            _ => return Err(fail("instruction class")),
        }
        pc += 1;
    }
}

/// The function holding instruction `pc`, for errors.
fn where_in(program: &Program, pc: usize) -> String {
    match program.functions.iter().filter(|(start, _)| **start <= pc).max_by_key(|(start, _)| **start) {
        Some((start, name)) => format!("{name}+{}", pc - start),
        None => "?".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
        let mut raw = [0u8; 8];
        raw[0] = op;
        raw[1] = dst | src << 4;
        raw[2..4].copy_from_slice(&off.to_le_bytes());
        raw[4..8].copy_from_slice(&imm.to_le_bytes());
        raw
    }

    /// `main` counts down r6 from 3 in a loop, calling `twice` (a subprogram) each time,
    /// then looks up key 7 of the map and returns its first byte (0 when absent).
    fn program() -> Program {
        let code = vec![
            insn(0xb7, 6, 0, 0, 3),   // 0: r6 = 3
            insn(0xb7, 7, 0, 0, 0),   // 1: r7 = 0
            insn(0xbf, 1, 6, 0, 0),   // 2: r1 = r6
            insn(0x85, 0, 1, 0, 0),   // 3: call twice (resolved below)
            insn(0x0f, 7, 0, 0, 0),   // 4: r7 += r0
            insn(0x07, 6, 0, 0, -1),  // 5: r6 -= 1
            insn(0x55, 6, 0, -5, 0),  // 6: if r6 != 0 goto 2
            insn(0x62, 10, 0, -4, 7), // 7: *(u32 *)(r10 - 4) = 7
            insn(0x18, 1, 0, 0, 0),   // 8: r1 = map (ld_imm64)
            insn(0, 0, 0, 0, 0),      // 9
            insn(0xbf, 2, 10, 0, 0),  // 10: r2 = r10
            insn(0x07, 2, 0, 0, -4),  // 11: r2 -= 4
            insn(0x85, 0, 0, 0, 1),   // 12: call map_lookup_elem
            insn(0x15, 0, 0, 2, 0),   // 13: if r0 == 0 goto 16
            insn(0x71, 0, 0, 0, 0),   // 14: r0 = *(u8 *)(r0 + 0)
            insn(0x95, 0, 0, 0, 0),   // 15: exit
            insn(0xbf, 0, 7, 0, 0),   // 16: r0 = r7
            insn(0x95, 0, 0, 0, 0),   // 17: exit
            insn(0xbf, 0, 1, 0, 0),   // 18: twice: r0 = r1
            insn(0x0f, 0, 1, 0, 0),   // 19: r0 += r1
            insn(0x95, 0, 0, 0, 0),   // 20: exit
        ];
        Program {
            code,
            functions: HashMap::from([(0, "main".to_owned()), (18, "tracer::diag::twice".to_owned())]),
            lengths: HashMap::from([("main".to_owned(), 18), ("tracer::diag::twice".to_owned(), 3)]),
            entries: HashMap::from([("main".to_owned(), 0), ("tracer::diag::twice".to_owned(), 18)]),
            calls: HashMap::from([(3, 18)]),
            loads: HashMap::from([(8, Load::Map(0))]),
            maps: vec![MapDef { name: "M".to_owned(), kind: 1, key_size: 4, value_size: 1 }],
            data: Vec::new(),
        }
    }

    #[test]
    fn every_executed_instruction_counts_subprograms_included() {
        let program = program();
        let mut kernel = Kernel::default();
        let run = run(&program, &mut kernel, "main", &[], "::diag::").unwrap();
        // 2 before the loop, 3 loops of (5 + 3 in the subprogram), 6 for the lookup miss
        // and the exit after it.
        assert_eq!(run.executed, 2 + 3 * 8 + 8);
        assert_eq!(run.entered.len(), 3);
        let functions = program.functions();
        assert_eq!(functions["main"], (18, vec!["tracer::diag::twice".to_owned()]));
        assert_eq!(functions["tracer::diag::twice"], (3, vec![]));
    }

    #[test]
    fn map_entries_are_found_by_their_key_bytes() {
        let program = program();
        let mut kernel = Kernel::default();
        kernel.entries.insert((0, 7u32.to_le_bytes().to_vec()), vec![42]);
        let mut m = Machine {
            program: &program,
            kernel: &mut kernel,
            memory: Vec::new(),
            values: HashMap::new(),
            data_base: Vec::new(),
        };
        let key = m.alloc(4);
        m.write(key, 4, 7).unwrap();
        let mut r = [0u64; 11];
        (r[1], r[2]) = (MAP_HANDLE, key);
        let value = m.helper(1, &mut r, &mut Run::default()).unwrap();
        assert_eq!(m.read(value, 1).unwrap(), 42);
        m.write(key, 4, 8).unwrap();
        assert_eq!(m.helper(1, &mut r, &mut Run::default()).unwrap(), 0);
    }

    #[test]
    fn an_access_outside_the_run_memory_names_the_instruction() {
        let mut program = program();
        program.code[14] = insn(0x71, 0, 0, 0x100, 0); // read far past the map value
        let mut kernel = Kernel::default();
        kernel.entries.insert((0, 7u32.to_le_bytes().to_vec()), vec![42]);
        let err = run(&program, &mut kernel, "main", &[], "::diag::").unwrap_err().to_string();
        assert!(err.contains("instruction 14 (main+14)"), "{err}");
    }
}
