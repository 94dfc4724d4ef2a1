//! Names of the global locks CXL code takes by address (`down_write(&cxl_rwsem.region)`):
//! the kallsyms data symbol the address falls in, and the member at its offset when BTF has
//! a struct of the symbol's name (7.2's `struct cxl_rwsem cxl_rwsem`). Reports list them
//! among a thread's held locks.
use std::{io::BufRead, sync::Arc};

use rustc_hash::FxHashMap;
use tracer_common::SiteRole;

use super::{
    btf::{KernelBtf, member_bit_offset},
    callsites::CallSite,
};

/// A data symbol: where it starts and its name (`cxl_rwsem`, or `cxl_rwsem [cxl_core]`).
struct DataSymbol {
    addr: u64,
    name: Arc<str>,
}

/// The data symbols of kallsyms text (`ADDR TYPE NAME [\t[MODULE]]`, types b, d, r), sorted.
fn data_symbols(input: impl BufRead) -> Vec<DataSymbol> {
    let mut symbols: Vec<DataSymbol> = input
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let addr = u64::from_str_radix(fields.next()?, 16).ok()?;
            let kind = fields.next()?.as_bytes()[0].to_ascii_lowercase();
            let name = fields.next()?;
            (addr != 0 && matches!(kind, b'b' | b'd' | b'r')).then(|| DataSymbol { addr, name: Arc::from(name) })
        })
        .collect();
    symbols.sort_by_key(|s| s.addr);
    symbols
}

/// The symbol `addr` falls in (up to the next symbol), and the offset into it.
fn containing(symbols: &[DataSymbol], addr: u64) -> Option<(&DataSymbol, u64)> {
    let i = symbols.partition_point(|s| s.addr <= addr).checked_sub(1)?;
    Some((&symbols[i], addr - symbols[i].addr))
}

/// The name of `offset` into global `symbol`: `symbol.member` where a struct named like it
/// has a member there (7.2's `cxl_rwsem.region` is at offset 0), else the symbol alone at 0
/// (6.12's `cxl_region_rwsem`), else `symbol+0xOFF`.
fn name(btf: &KernelBtf, symbol: &str, offset: u64) -> String {
    let member = btf.all().find_map(|btf| {
        let types = btf.resolve_types_by_name(symbol).ok()?;
        types.into_iter().find_map(|t| {
            let btf_rs::Type::Struct(def) = t else { return None };
            def.members.iter().find_map(|m| {
                let name = btf.resolve_name(m).ok().filter(|n| !n.is_empty())?;
                let bits = member_bit_offset(btf, &def, &name).ok()??;
                (u64::from(bits) == offset * 8).then_some(name)
            })
        })
    });
    match member {
        Some(member) => format!("{symbol}.{member}"),
        None if offset == 0 => symbol.to_owned(),
        None => format!("{symbol}+{offset:#x}"),
    }
}

/// Names the lock of every lock and unlock call whose first argument is a constant address
/// in a global, from `kallsyms` (the text of /proc/kallsyms).
pub fn name_locks(calls: &mut [CallSite], btf: &KernelBtf, kallsyms: impl BufRead) {
    let is_lock = |c: &CallSite| matches!(c.callee.call, SiteRole::LockCall | SiteRole::UnlockCall);
    if !calls.iter().any(|c| is_lock(c) && c.rdi.constant().is_some()) {
        return;
    }
    let symbols = data_symbols(kallsyms);
    let mut names: FxHashMap<u64, Option<Arc<str>>> = FxHashMap::default();
    for call in calls.iter_mut().filter(|c| is_lock(c)) {
        let Some(addr) = call.rdi.constant() else { continue };
        call.lock = names
            .entry(addr)
            .or_insert_with(|| containing(&symbols, addr).map(|(s, offset)| Arc::from(name(btf, &s.name, offset))))
            .clone();
    }
}

/// `name_locks` with the running kernel's /proc/kallsyms.
pub fn name_locks_now(calls: &mut [CallSite], btf: &KernelBtf) -> std::io::Result<()> {
    let file = std::fs::File::open("/proc/kallsyms")?;
    name_locks(calls, btf, std::io::BufReader::with_capacity(1 << 16, file));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_named_by_the_data_symbol_it_falls_in() {
        let kallsyms = "ffffffff81000000 T cxl_region_probe\n\
                        ffffffff83001000 D cxl_rwsem\n\
                        ffffffff83001100 d other_lock\n\
                        ffffffffc0102000 b cxl_dpa_rwsem\t[cxl_core]\n";
        let symbols = data_symbols(kallsyms.as_bytes());
        assert_eq!(symbols.len(), 3, "text symbols are not data");
        let (s, off) = containing(&symbols, 0xffffffff83001048).unwrap();
        assert_eq!((&*s.name, off), ("cxl_rwsem", 0x48));
        let (s, off) = containing(&symbols, 0xffffffffc0102000).unwrap();
        assert_eq!((&*s.name, off), ("cxl_dpa_rwsem", 0));
        assert!(containing(&symbols, 0xffffffff80000000).is_none());
    }

    #[test]
    fn a_member_is_named_where_btf_has_a_struct_of_the_symbols_name() {
        // The host kernel has no CXL, but `struct mutex` shows the mechanism: a global
        // called `mutex` at offset 0 is itself, at its `owner` member's offset named so.
        let btf = KernelBtf::load(std::path::Path::new("/sys/kernel/btf"), &[]).unwrap();
        let (vmlinux, def) = btf.find_struct("mutex").unwrap();
        let bits = member_bit_offset(vmlinux, &def, "wait_lock").unwrap().unwrap();
        assert_eq!(name(&btf, "mutex", u64::from(bits) / 8), "mutex.wait_lock");
        // At 0, the first member (mutex.owner): a struct global names its member there.
        assert_eq!(name(&btf, "mutex", 0), "mutex.owner");
        assert_eq!(name(&btf, "no_such_global_xyz", 0), "no_such_global_xyz");
        assert_eq!(name(&btf, "no_such_global_xyz", 0x48), "no_such_global_xyz+0x48");
    }
}
