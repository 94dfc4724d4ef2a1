//! What `/init` needs from the guest kernel before the CXL drivers: the results share, a
//! `virtio-9p-pci` device mounted over 9p. Which of these a kernel builds as modules differs
//! (6.12 and 7.2 build the virtio PCI transport in, 6.1 builds it as a module), so the
//! modules are chosen from that kernel's own `modules.dep` and `modules.builtin`.
use anyhow::bail;

use super::kernel::ModuleIndex;

/// A driver the guest cannot do without.
pub struct Need {
    /// The module it is when not built in.
    pub module: &'static str,
    /// The config option that builds it, for the message when a kernel lacks it.
    pub config: &'static str,
    /// What the guest uses it for.
    pub what: &'static str,
}

/// The guest's needs, in the order they must load: the transport before the 9p transport
/// that binds to its devices (it is no symbol dependency, so modules.dep cannot order it),
/// then the file system.
pub const NEEDS: &[Need] = &[
    Need {
        module: "virtio_pci",
        config: "CONFIG_VIRTIO_PCI",
        what: "the virtio PCI transport of the results share's virtio-9p-pci device",
    },
    Need {
        module: "9pnet_virtio",
        config: "CONFIG_NET_9P_VIRTIO",
        what: "9p over virtio, the results share's transport",
    },
    Need { module: "9p", config: "CONFIG_9P_FS", what: "the 9p file system of the results share" },
];

/// The modules `/init` loads, in this order, before it mounts the share: each need that
/// is a module, after the modules it depends on. A need built into the kernel is skipped;
/// one that is neither built in nor a module fails, naming its config option.
pub fn modules(index: &ModuleIndex, release: &str) -> anyhow::Result<Vec<String>> {
    let mut order: Vec<String> = Vec::new();
    for need in NEEDS {
        if index.is_builtin(need.module) {
            continue;
        }
        if !index.modules.contains_key(need.module) {
            bail!(
                "kernel {release} has no {} ({}): it is neither built in (modules.builtin) nor a \
                 module (modules.dep); the guest needs a kernel with {}=y or =m",
                need.module,
                need.what,
                need.config
            );
        }
        for module in index.closure([need.module])? {
            if !order.contains(&module) {
                order.push(module);
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of 6.1.0-57's modules.dep: virtio and its PCI transport are modules.
    const DEP_6_1: &str = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/fs/9p/9p.ko: kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko kernel/net/9p/9pnet.ko
kernel/drivers/cxl/cxl_mem.ko:
";

    /// The shape of 6.12.117's: virtio and its PCI transport are built in.
    const DEP_6_12: &str = "\
kernel/net/9p/9pnet.ko.xz:
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz
kernel/fs/netfs/netfs.ko.xz:
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
";
    const BUILTIN_6_12: &str = "\
kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko
";

    #[test]
    fn a_modular_transport_loads_first_with_its_dependencies() {
        let index = ModuleIndex::parse(DEP_6_1, "kernel/fs/tracefs/tracefs.ko\n");
        let order = modules(&index, "6.1.0-57-amd64").unwrap();
        assert_eq!(
            order,
            [
                "virtio",
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
                "9pnet",
                "9pnet_virtio",
                "netfs",
                "fscache",
                "9p"
            ]
        );
    }

    #[test]
    fn built_in_needs_are_skipped() {
        let index = ModuleIndex::parse(DEP_6_12, BUILTIN_6_12);
        let order = modules(&index, "6.12.117+deb12-amd64").unwrap();
        assert_eq!(order, ["9pnet", "9pnet_virtio", "netfs", "9p"]);
    }

    #[test]
    fn a_missing_need_names_its_config_option() {
        // No modules.builtin (a tree without it) and no virtio_pci module.
        let index = ModuleIndex::parse(DEP_6_12, "");
        let err = modules(&index, "7.2.13+deb14-amd64").unwrap_err().to_string();
        assert!(err.contains("virtio_pci") && err.contains("CONFIG_VIRTIO_PCI"), "{err}");
        assert!(err.contains("7.2.13+deb14-amd64"), "{err}");
    }
}
