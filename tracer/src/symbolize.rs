//! Kernel symbols from /proc/kallsyms (modules included): names to addresses, function
//! extents, and addresses to "symbol+0xoff/0xsize [module]" as the kernel prints stacks.
use std::{io::BufRead, sync::Arc};

use rustc_hash::FxHashMap;

use crate::event::Stack;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub addr: u64,
    pub name: Arc<str>,
    /// The module it belongs to; `None` for vmlinux.
    pub module: Option<Arc<str>>,
    /// Text symbol (`t`/`T`).
    pub text: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KallsymsError {
    #[error("cannot read /proc/kallsyms: {0}")]
    Io(#[from] std::io::Error),
    #[error("/proc/kallsyms line {line} is malformed: {text:?}")]
    Malformed { line: usize, text: String },
    #[error("/proc/kallsyms shows every address as 0: run as root (or lower kernel.kptr_restrict)")]
    Hidden,
}

/// Text symbols sorted by address: vmlinux's, shared by every re-read (its text does not
/// move), and the modules'.
#[derive(Default)]
pub struct Symbols {
    vmlinux: Arc<Table>,
    modules: Table,
    /// Functions of module loads kallsyms no longer lists: a stack recorded while a module
    /// was loaded can be read after a hotplug loop unloaded it again. Only for reading
    /// stacks: `lookup` and `iter` (what gets probed) never see them.
    unloaded: Arc<Table>,
}

/// The kernel's page size on x86_64: module text is allocated in whole pages.
const PAGE: u64 = 4096;

/// `init_module` and `cleanup_module`: the names module_init() and module_exit() give a
/// module's init and exit functions besides their own, at the same address.
fn is_loader_alias(name: &str) -> bool {
    matches!(name, "init_module" | "cleanup_module")
}

/// Symbols of unloaded modules kept, at most (the newest unloads win).
const MAX_UNLOADED: usize = 16_384;

/// One sorted run of symbols, with its names indexed.
#[derive(Default)]
struct Table {
    symbols: Vec<Symbol>,
    by_name: FxHashMap<Arc<str>, Vec<usize>>,
}

impl Table {
    fn new(mut symbols: Vec<Symbol>) -> Table {
        symbols.sort_by_key(|s| s.addr);
        // A module's `init_module` and `cleanup_module` are aliases of its init and exit
        // functions (module_init()/module_exit()): kept out wherever the real name is at the
        // same address, so that an address reads as `cxl_test_exit+0x2e`, and every list of
        // a module's functions (at start, after a reload) names it alike, whatever kallsyms'
        // order.
        let symbols: Vec<Symbol> = symbols
            .chunk_by(|a, b| a.addr == b.addr)
            .flat_map(|at_one_address| {
                let named = at_one_address.iter().any(|s| !is_loader_alias(&s.name));
                at_one_address.iter().filter(move |s| !(named && is_loader_alias(&s.name))).cloned()
            })
            .collect();
        let mut by_name: FxHashMap<Arc<str>, Vec<usize>> = FxHashMap::default();
        for (i, s) in symbols.iter().enumerate() {
            by_name.entry(s.name.clone()).or_default().push(i);
        }
        Table { symbols, by_name }
    }

    fn lookup(&self, name: &str) -> impl Iterator<Item = &Symbol> {
        self.by_name.get(name).into_iter().flatten().map(|&i| &self.symbols[i])
    }

    /// Index of the symbol containing `addr`.
    fn index_of(&self, addr: u64) -> Option<usize> {
        match self.symbols.partition_point(|s| s.addr <= addr) {
            0 => None,
            n => Some(n - 1),
        }
    }

    fn extent(&self, sym: &Symbol) -> Option<(u64, u64)> {
        let i = self.index_of(sym.addr)?;
        let next = self.symbols[i + 1..].iter().find(|s| s.addr > sym.addr)?;
        // The last symbol of a module has no successor in that module: bound it.
        if next.module != sym.module {
            return None;
        }
        Some((sym.addr, next.addr))
    }

    /// The symbol holding `addr`, the offset, and the symbol's size (0 when unknown: a
    /// module's last function).
    fn resolve(&self, addr: u64) -> Option<(&Symbol, u64, u64)> {
        let i = self.index_of(addr)?;
        let sym = &self.symbols[i];
        let next = self.symbols.get(i + 1);
        match next {
            Some(next) if next.module == sym.module => {
                let size = next.addr - sym.addr;
                (addr - sym.addr < size).then_some((sym, addr - sym.addr, size))
            }
            // A module's last function (its __exit, say: cxl_test_exit calling
            // platform_device_unregister on rmmod) has no successor in kallsyms. A module's
            // text is whole pages and nothing follows its last function there, so an
            // address in the rest of the page it starts in is in it; its size stays unknown.
            _ if sym.module.is_some() => {
                let page_end = (sym.addr | (PAGE - 1)) + 1;
                let end = next.map_or(page_end, |n| n.addr.min(page_end));
                (addr < end).then_some((sym, addr - sym.addr, 0))
            }
            // Far past vmlinux text: unknown.
            _ => None,
        }
    }
}

/// Parses kallsyms lines (`ADDR TYPE NAME [\t[MODULE]]`) into vmlinux's text symbols and the
/// modules'; with `modules_only`, vmlinux's lines are skipped unparsed.
fn parse_lines(mut input: impl BufRead, modules_only: bool) -> Result<(Vec<Symbol>, Vec<Symbol>), KallsymsError> {
    let mut text = String::new();
    input.read_to_string(&mut text)?;
    // Only module lines have a tab, and kallsyms lists vmlinux first: a re-read starts at
    // the first tab's line. Splitting and parsing vmlinux's ~96,000 lines too, a re-read
    // took 430 ms under TCG during a reload loop (the kernel's listing alone 150 ms): longer
    // than a module's life there, so its events were read after it was gone.
    let start = match modules_only {
        true => text.find('\t').map_or(text.len(), |tab| text[..tab].rfind('\n').map_or(0, |nl| nl + 1)),
        false => 0,
    };
    let line_no = |i: usize| text[..start].matches('\n').count() + i + 1;
    let (mut vmlinux, mut in_modules) = (Vec::new(), Vec::new());
    let mut modules: FxHashMap<&str, Arc<str>> = FxHashMap::default();
    let mut nonzero = false;
    for (i, line) in text[start..].lines().enumerate() {
        let malformed = || KallsymsError::Malformed { line: line_no(i), text: line.to_owned() };
        let mut fields = line.split_ascii_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (fields.next(), fields.next(), fields.next()) else {
            if line.trim().is_empty() {
                continue;
            }
            return Err(malformed());
        };
        let addr = u64::from_str_radix(addr, 16).map_err(|_| malformed())?;
        nonzero |= addr != 0;
        let is_text = matches!(kind.as_bytes()[0], b't' | b'T');
        let module = fields.next().and_then(|m| m.strip_prefix('[')).and_then(|m| m.strip_suffix(']'));
        if !is_text || modules_only && module.is_none() {
            continue;
        }
        let module = module.map(|m| modules.entry(m).or_insert_with(|| Arc::from(m)).clone());
        let symbol = Symbol { addr, name: Arc::from(name), module, text: is_text };
        if symbol.module.is_some() { in_modules.push(symbol) } else { vmlinux.push(symbol) }
    }
    if !nonzero && (!vmlinux.is_empty() || !in_modules.is_empty()) {
        return Err(KallsymsError::Hidden);
    }
    Ok((vmlinux, in_modules))
}

fn open_kallsyms() -> Result<impl BufRead, KallsymsError> {
    let file = std::fs::File::open("/proc/kallsyms")?;
    Ok(std::io::BufReader::with_capacity(1 << 16, file))
}

impl Symbols {
    /// Parses kallsyms lines: `ADDR TYPE NAME [\t[MODULE]]`.
    pub fn parse(input: impl BufRead) -> Result<Symbols, KallsymsError> {
        let (vmlinux, modules) = parse_lines(input, false)?;
        Ok(Symbols { vmlinux: Arc::new(Table::new(vmlinux)), modules: Table::new(modules), unloaded: Arc::default() })
    }

    pub fn load() -> Result<Symbols, KallsymsError> {
        Symbols::parse(open_kallsyms()?)
    }

    /// These symbols with the modules' read again (a module was loaded or unloaded): only
    /// module lines are parsed, vmlinux's table is shared. Parsing all of kallsyms on every
    /// module reload made the heap creep in long reload loops.
    pub fn reload_modules(&self) -> Result<Symbols, KallsymsError> {
        self.with_modules_from(open_kallsyms()?)
    }

    /// `reload_modules` from the given kallsyms text.
    pub fn with_modules_from(&self, input: impl BufRead) -> Result<Symbols, KallsymsError> {
        let (_, modules) = parse_lines(input, true)?;
        let modules = Table::new(modules);
        let unloaded = self.unloaded_now(&modules);
        Ok(Symbols { vmlinux: self.vmlinux.clone(), modules, unloaded })
    }

    /// `unloaded` once `modules` is what kallsyms lists: the functions of this table's
    /// modules that are gone from it, then the older unloaded ones, leaving out whatever
    /// lies in a module's address range now and, at one address, all but the newest.
    fn unloaded_now(&self, modules: &Table) -> Arc<Table> {
        let listed: rustc_hash::FxHashSet<(u64, &str)> = modules.symbols.iter().map(|s| (s.addr, &*s.name)).collect();
        let gone: Vec<&Symbol> =
            self.modules.symbols.iter().filter(|s| !listed.contains(&(s.addr, &*s.name))).collect();
        if gone.is_empty() {
            return self.unloaded.clone();
        }
        let mut ranges: FxHashMap<&str, (u64, u64)> = FxHashMap::default();
        for sym in &modules.symbols {
            let module = sym.module.as_deref().unwrap_or_default();
            let range = ranges.entry(module).or_insert((sym.addr, sym.addr));
            range.0 = range.0.min(sym.addr);
            range.1 = range.1.max(sym.addr);
        }
        let in_a_live_module = |addr: u64| ranges.values().any(|&(first, last)| (first..=last).contains(&addr));
        let mut seen = rustc_hash::FxHashSet::default();
        let kept: Vec<Symbol> = gone
            .into_iter()
            .chain(self.unloaded.symbols.iter())
            .filter(|s| !in_a_live_module(s.addr) && seen.insert(s.addr))
            .take(MAX_UNLOADED)
            .cloned()
            .collect();
        Arc::new(Table::new(kept))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Symbol> {
        self.vmlinux.symbols.iter().chain(self.modules.symbols.iter())
    }

    /// Every text symbol called `name` (static functions can repeat).
    pub fn lookup(&self, name: &str) -> impl Iterator<Item = &Symbol> {
        self.vmlinux.lookup(name).chain(self.modules.lookup(name))
    }

    fn table_of(&self, sym: &Symbol) -> &Table {
        if sym.module.is_some() { &self.modules } else { &self.vmlinux }
    }

    /// Start and end of the function starting at `sym` (up to the next symbol).
    pub fn extent(&self, sym: &Symbol) -> Option<(u64, u64)> {
        self.table_of(sym).extent(sym)
    }

    /// The symbol containing `addr` and the offset into it.
    pub fn resolve(&self, addr: u64) -> Option<(&Symbol, u64, u64)> {
        self.vmlinux.resolve(addr).or_else(|| self.modules.resolve(addr)).or_else(|| self.unloaded.resolve(addr))
    }

    /// "function+0xoff/0xsize [module]", or the raw address when it is in no known symbol.
    pub fn format(&self, addr: u64) -> String {
        match self.resolve(addr) {
            Some((sym, off, 0)) => match &sym.module {
                Some(module) => format!("{}+{off:#x} [{module}]", sym.name),
                None => format!("{}+{off:#x}", sym.name),
            },
            Some((sym, off, size)) => match &sym.module {
                Some(module) => format!("{}+{off:#x}/{size:#x} [{module}]", sym.name),
                None => format!("{}+{off:#x}/{size:#x}", sym.name),
            },
            None => format!("{addr:#x}"),
        }
    }
}

/// Symbolizes stacks, sharing one `Stack` per distinct list of addresses.
#[derive(Default)]
pub struct StackCache {
    cache: FxHashMap<Vec<u64>, Stack>,
}

impl StackCache {
    /// The frames of `addrs`, without the tracer's own leading frames (the BPF program and
    /// the tracepoint runner that called it).
    pub fn symbolize(&mut self, symbols: &Symbols, addrs: &[u64]) -> Stack {
        if let Some(stack) = self.cache.get(addrs) {
            return stack.clone();
        }
        let own = addrs
            .iter()
            .take_while(|&&a| match symbols.resolve(a) {
                None => true,
                Some((sym, _, _)) => is_bpf_frame(&sym.name),
            })
            .count();
        let frames: Vec<Arc<str>> = addrs[own..].iter().map(|&a| Arc::from(symbols.format(a))).collect();
        let stack: Stack = Arc::from(frames);
        self.cache.insert(addrs.to_vec(), stack.clone());
        stack
    }

    /// Forget everything (after the symbols changed: a module was loaded or unloaded).
    pub fn clear(&mut self) {
        self.cache.clear();
    }
}

/// Frames of the BPF machinery between a tracepoint and the program.
fn is_bpf_frame(name: &str) -> bool {
    name.starts_with("bpf_prog_") || name.starts_with("bpf_trace_run") || name.starts_with("__bpf_trace_")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ffffffffb2395a20 t __pfx_match_port_by_dport
ffffffffb2395a30 t match_port_by_dport
ffffffffb2395ab0 t __pfx_find_cxl_port
ffffffffb2395ac0 t find_cxl_port
ffffffffb2400000 D some_data
ffffffffc0732000 t cxl_mem_probe\t[cxl_mem]
ffffffffc07323f0 t cxl_mem_remove\t[cxl_mem]
ffffffffc0732500 t cleanup_module\t[cxl_mem]
ffffffffc0732500 t cxl_mem_exit\t[cxl_mem]
";

    #[test]
    fn resolves_vmlinux_and_module_addresses() {
        let symbols = Symbols::parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(symbols.format(0xffffffffb2395a30 + 0x47), "match_port_by_dport+0x47/0x80");
        assert_eq!(symbols.format(0xffffffffc0732000 + 0xe6), "cxl_mem_probe+0xe6/0x3f0 [cxl_mem]");
        assert_eq!(symbols.format(0x1234), "0x1234");
        // The module's last symbol has no known end: the rest of its page is its, size unknown.
        assert_eq!(symbols.format(0xffffffffc0732510), "cxl_mem_exit+0x10 [cxl_mem]");
        assert_eq!(symbols.format(0xffffffffc0732fff), "cxl_mem_exit+0xaff [cxl_mem]");
        assert_eq!(symbols.format(0xffffffffc0733000), "0xffffffffc0733000");
        // The loader's alias never names an address, whichever kallsyms lists first.
        let swapped = SAMPLE.replace(
            "t cleanup_module\t[cxl_mem]\nffffffffc0732500 t cxl_mem_exit",
            "t cxl_mem_exit\t[cxl_mem]\nffffffffc0732500 t cleanup_module",
        );
        assert_ne!(swapped, SAMPLE);
        assert_eq!(
            Symbols::parse(swapped.as_bytes()).unwrap().format(0xffffffffc0732510),
            "cxl_mem_exit+0x10 [cxl_mem]"
        );
        let probe = symbols.lookup("cxl_mem_probe").next().unwrap();
        assert_eq!(probe.module.as_deref(), Some("cxl_mem"));
        assert_eq!(symbols.extent(probe), Some((0xffffffffc0732000, 0xffffffffc07323f0)));
        // vmlinux's last function here is followed by module text: no known end.
        let find = symbols.lookup("find_cxl_port").next().unwrap();
        assert_eq!(symbols.extent(find), None);
        assert!(symbols.lookup("some_data").next().is_none());
    }

    #[test]
    fn a_module_reread_keeps_vmlinux_and_replaces_the_modules() {
        let symbols = Symbols::parse(SAMPLE.as_bytes()).unwrap();
        let moved = "ffffffffb2395a30 t ignored_on_a_module_reread\nffffffffc0900000 t cxl_mem_probe\t[cxl_mem]\nffffffffc0900400 t cxl_mem_remove\t[cxl_mem]\n";
        let again = symbols.with_modules_from(moved.as_bytes()).unwrap();
        assert!(Arc::ptr_eq(&symbols.vmlinux, &again.vmlinux));
        assert_eq!(again.format(0xffffffffb2395a30 + 0x47), "match_port_by_dport+0x47/0x80");
        assert_eq!(again.format(0xffffffffc0900010), "cxl_mem_probe+0x10/0x400 [cxl_mem]");
        assert_eq!(again.lookup("cxl_mem_probe").count(), 1);
        assert_eq!(again.iter().count(), 4 + 2);
    }

    #[test]
    fn a_stack_of_an_unloaded_module_still_reads() {
        let symbols = Symbols::parse(SAMPLE.as_bytes()).unwrap();
        // cxl_mem unloaded, then loaded elsewhere: a stack from its first load still reads,
        // but nothing of it is found by name (it is not probed).
        let moved = "ffffffffc0900000 t cxl_mem_probe\t[cxl_mem]\nffffffffc0900400 t cxl_mem_remove\t[cxl_mem]\n";
        let again = symbols.with_modules_from(moved.as_bytes()).unwrap();
        assert_eq!(again.format(0xffffffffc0732010), "cxl_mem_probe+0x10/0x3f0 [cxl_mem]");
        assert_eq!(again.format(0xffffffffc0900010), "cxl_mem_probe+0x10/0x400 [cxl_mem]");
        assert_eq!(again.lookup("cxl_mem_probe").map(|s| s.addr).collect::<Vec<_>>(), [0xffffffffc0900000]);
        // Unloaded again: both loads read.
        let none = again.with_modules_from("".as_bytes()).unwrap();
        assert_eq!(none.format(0xffffffffc0732010), "cxl_mem_probe+0x10/0x3f0 [cxl_mem]");
        assert_eq!(none.format(0xffffffffc0900010), "cxl_mem_probe+0x10/0x400 [cxl_mem]");
        assert_eq!(none.iter().count(), 4);
        // Another module loaded over the old range: its symbols win there.
        let over = "ffffffffc0732000 t cxl_pci_probe\t[cxl_pci]\nffffffffc0732800 t cxl_pci_remove\t[cxl_pci]\n";
        let later = none.with_modules_from(over.as_bytes()).unwrap();
        assert_eq!(later.format(0xffffffffc0732010), "cxl_pci_probe+0x10/0x800 [cxl_pci]");
        assert_eq!(later.format(0xffffffffc0900010), "cxl_mem_probe+0x10/0x400 [cxl_mem]");
    }

    #[test]
    fn hidden_addresses_are_an_error() {
        let hidden = "0000000000000000 t match_port_by_dport\n0000000000000000 T xa_load\n";
        assert!(matches!(Symbols::parse(hidden.as_bytes()), Err(KallsymsError::Hidden)));
        assert!(matches!(Symbols::parse("zz t x\n".as_bytes()), Err(KallsymsError::Malformed { line: 1, .. })));
    }

    #[test]
    fn a_module_reread_skips_vmlinux_lines_but_counts_them() {
        let symbols = Symbols::parse("ffffffff81000000 t a\nffffffff81000100 t b\n".as_bytes()).unwrap();
        // vmlinux lines (no tab) before the modules' are not parsed, so not checked.
        let text = "ffffffff81000000 t a\nnot a line\nffffffffc0900000 t cxl_mem_probe\t[cxl_mem]\nffffffffc0900400 t x\t[cxl_mem]\n";
        let reread = symbols.with_modules_from(text.as_bytes()).unwrap();
        assert_eq!(reread.format(0xffffffffc0900010), "cxl_mem_probe+0x10/0x400 [cxl_mem]");
        assert_eq!(reread.format(0xffffffff81000010), "a+0x10/0x100");
        let bad = "ffffffff81000000 t a\nffffffffc0900000 t cxl_mem_probe\t[cxl_mem]\nzz t x\t[cxl_mem]\n";
        assert!(matches!(symbols.with_modules_from(bad.as_bytes()), Err(KallsymsError::Malformed { line: 3, .. })));
        assert!(symbols.with_modules_from("ffffffff81000000 t a\n".as_bytes()).unwrap().modules.symbols.is_empty());
    }

    #[test]
    fn the_tracers_own_frames_are_dropped() {
        let text = "ffffffff81000000 t bpf_trace_run2\nffffffff81000100 T kfree\nffffffff81000400 t release_nodes\nffffffff81000500 t x\n";
        let symbols = Symbols::parse(text.as_bytes()).unwrap();
        let stack = StackCache::default()
            .symbolize(&symbols, &[0xffffffffc0367414, 0xffffffff81000089, 0xffffffff810001e8, 0xffffffff8100044b]);
        let frames: Vec<&str> = stack.iter().map(|f| &**f).collect();
        assert_eq!(frames, ["kfree+0xe8/0x300", "release_nodes+0x4b/0x100"]);
    }

    #[test]
    fn stacks_are_symbolized_once() {
        let symbols = Symbols::parse(SAMPLE.as_bytes()).unwrap();
        let mut cache = StackCache::default();
        let a = cache.symbolize(&symbols, &[0xffffffffb2395a77, 0xffffffffc07320e6]);
        let b = cache.symbolize(&symbols, &[0xffffffffb2395a77, 0xffffffffc07320e6]);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a[1], "cxl_mem_probe+0xe6/0x3f0 [cxl_mem]");
    }
}
