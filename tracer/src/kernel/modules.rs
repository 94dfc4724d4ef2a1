//! The loaded modules, from `/proc/modules`: where each lies, which CXL modules are live, and
//! waiting until the CXL drivers are there.
use std::{
    ops::Range,
    time::{Duration, Instant},
};

use anyhow::bail;

use super::profile::{DRIVER_MODULES, is_cxl_module};

/// One line of `/proc/modules` (`NAME SIZE REFS DEPS STATE ADDRESS [TAINTS]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleLine<'a> {
    pub name: &'a str,
    pub size: u64,
    /// `Live`, `Loading` or `Unloading`.
    pub state: &'a str,
    /// 0 when the address is hidden (without CAP_SYSLOG).
    pub base: u64,
}

impl ModuleLine<'_> {
    /// Where the module lies: its base and its size past it (its core: code and data once
    /// its init is done).
    pub fn range(&self) -> Range<u64> {
        self.base..self.base.saturating_add(self.size)
    }

    pub fn is_live(&self) -> bool {
        self.state == "Live"
    }
}

/// The lines of `/proc/modules` text; malformed ones are left out.
pub fn parse(text: &str) -> impl Iterator<Item = ModuleLine<'_>> {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        let size = fields.get(1)?.parse().ok()?;
        let base = u64::from_str_radix(fields.get(5)?.strip_prefix("0x")?, 16).ok()?;
        Some(ModuleLine { name: fields[0], size, state: fields[4], base })
    })
}

fn read() -> String {
    std::fs::read_to_string("/proc/modules").unwrap_or_default()
}

/// The address ranges of the loaded modules in /proc/modules text whose address is shown:
/// each module's whole size from its text (a range that covers more than its text only
/// costs a needless re-read of the symbols).
pub fn ranges_in(text: &str) -> Vec<Range<u64>> {
    parse(text).filter(|m| m.base != 0).map(|m| m.range()).collect()
}

/// `ranges_in` of /proc/modules now (empty when it cannot be read).
pub fn ranges() -> Vec<Range<u64>> {
    ranges_in(&read())
}

/// Where `module`'s core lies, from /proc/modules text.
pub fn core_in(text: &str, module: &str) -> Option<Range<u64>> {
    parse(text).find(|m| m.name == module && m.base != 0).map(|m| m.range())
}

/// Where `module`'s core lies now.
pub fn core(module: &str) -> Option<Range<u64>> {
    core_in(&read(), module)
}

/// The live CXL modules in /proc/modules text: (name, "size address"). A module loaded
/// again shows as a change of either (another build usually has another size). One still
/// loading is left out until it is live: its symbols may not be in kallsyms yet.
pub fn cxl_layout_in(text: &str) -> Vec<(String, String)> {
    parse(text)
        .filter(|m| is_cxl_module(m.name) && m.is_live())
        .map(|m| (m.name.to_owned(), format!("{} {:#x}", m.size, m.base)))
        .collect()
}

/// `cxl_layout_in` of /proc/modules now.
pub fn cxl_layout() -> Vec<(String, String)> {
    cxl_layout_in(&read())
}

/// Names of the CXL modules live now.
pub fn loaded_cxl() -> Vec<String> {
    cxl_layout().into_iter().map(|(name, _)| name).collect()
}

/// The CXL driver modules a run needs (`DRIVER_MODULES`) that are not loaded now, among those
/// this kernel has (its modules.dep lists them, under any directory: cxl_test installs its
/// own builds of them).
pub fn missing_drivers() -> Vec<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dep = std::fs::read_to_string(format!("/lib/modules/{}/modules.dep", release.trim())).unwrap_or_default();
    missing_drivers_in(&dep, &loaded_cxl())
}

fn missing_drivers_in(modules_dep: &str, loaded: &[String]) -> Vec<String> {
    let mut missing: Vec<String> = modules_dep
        .lines()
        .filter_map(|l| l.split(':').next()?.rsplit('/').next()?.split('.').next())
        .map(|name| name.replace('-', "_"))
        .filter(|name| DRIVER_MODULES.contains(&name.as_str()) && !loaded.contains(name))
        .collect();
    missing.sort();
    missing.dedup();
    missing
}

/// Waits until the CXL driver modules are loaded, or fails saying which to load; without
/// `wait`, fails at once when one is missing.
pub fn wait_for_cxl(wait: Option<Duration>) -> anyhow::Result<()> {
    let deadline = wait.map(|w| Instant::now() + w);
    let mut announced = false;
    loop {
        let missing = missing_drivers();
        if missing.is_empty() {
            return Ok(());
        }
        match deadline {
            None => bail!(
                "CXL modules not loaded: {} (modprobe {}, or start with --wait-for-cxl to wait for them)",
                missing.join(" "),
                missing.join(" ")
            ),
            Some(deadline) if Instant::now() >= deadline => {
                bail!("gave up waiting for the CXL modules {} (--wait-for-cxl)", missing.join(" "))
            }
            Some(_) => {
                if !announced {
                    eprintln!("tracer: waiting for the CXL modules {} to be loaded", missing.join(" "));
                    announced = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULES: &str = "cxl_mem 16384 0 - Live 0xffffffffc0900000\n\
        cxl_pci 32768 0 - Loading 0xffffffffc0a00000 (E)\n\
        hidden 4096 0 - Live 0x0000000000000000\n\
        cxl_core 409600 5 cxl_mem,cxl_pci, Live 0xffffffffc0800000 (O)\n";

    #[test]
    fn ranges_and_cores_come_from_proc_modules() {
        assert_eq!(
            ranges_in(MODULES),
            [
                0xffffffffc0900000..0xffffffffc0904000,
                0xffffffffc0a00000..0xffffffffc0a08000,
                0xffffffffc0800000..0xffffffffc0864000
            ]
        );
        assert_eq!(core_in(MODULES, "cxl_mem"), Some(0xffffffffc0900000..0xffffffffc0904000));
        assert_eq!(core_in(MODULES, "hidden"), None);
        assert_eq!(core_in(MODULES, "cxl_port"), None);
    }

    #[test]
    fn the_cxl_layout_lists_live_cxl_modules_only() {
        let layout = cxl_layout_in(MODULES);
        assert_eq!(
            layout,
            [
                ("cxl_mem".to_owned(), "16384 0xffffffffc0900000".to_owned()),
                ("cxl_core".to_owned(), "409600 0xffffffffc0800000".to_owned())
            ]
        );
    }

    #[test]
    fn drivers_are_missing_only_when_the_kernel_has_them_anywhere() {
        let dep = "kernel/drivers/cxl/cxl_acpi.ko.xz: kernel/drivers/cxl/core/cxl_core.ko.xz\n\
            kernel/drivers/cxl/cxl_pci.ko.xz:\n\
            kernel/drivers/cxl/cxl_mem.ko.xz:\n\
            updates/cxl_acpi.ko: updates/cxl_core.ko\n";
        assert_eq!(missing_drivers_in(dep, &[]), ["cxl_acpi", "cxl_mem"]);
        assert_eq!(missing_drivers_in(dep, &["cxl_acpi".into()]), ["cxl_mem"]);
        // cxl_pci is not needed: cxl_test's memdevs come without it.
        assert!(missing_drivers_in(dep, &["cxl_acpi".into(), "cxl_mem".into()]).is_empty());
        // A kernel without CXL drivers has none missing (doctor says there is no CXL code).
        assert!(missing_drivers_in("kernel/fs/9p/9p.ko:\n", &[]).is_empty());
    }
}
