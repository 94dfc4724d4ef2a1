//! What the running kernel's BTF tells: the struct offsets the kernel side needs, and every
//! function taking a `struct cxl_dport *` (the use sites), in vmlinux and in module BTF.
use std::path::{Path, PathBuf};

use btf_rs::{Btf, Type};
use fallible_iterator::FallibleIterator;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read BTF {path}: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF)")]
    Open { path: PathBuf, source: btf_rs::Error },
    #[error("BTF has no struct {name}: is the CXL core built into this kernel?")]
    MissingStruct { name: &'static str },
    #[error("BTF struct {strukt} has no member {member}")]
    MissingMember { strukt: &'static str, member: &'static str },
    #[error("BTF struct {strukt} member {member} is a bitfield")]
    Bitfield { strukt: &'static str, member: &'static str },
    #[error("reading BTF types: {0}")]
    Types(#[from] btf_rs::Error),
}

pub struct KernelBtf {
    pub vmlinux: Btf,
    /// Module BTF (split on vmlinux), by module name.
    pub modules: Vec<(String, Btf)>,
}

/// A function with a `struct cxl_dport *` parameter (a use site), or one that hands its
/// caller a dport (a loader).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DportFunction {
    pub name: String,
    /// `None` for vmlinux.
    pub module: Option<String>,
    /// Index of the dport parameter (0-based), or `RETURNS` for a loader that returns it.
    pub arg: u32,
}

/// `DportFunction::arg` of a loader that returns the dport.
pub const RETURNS: u32 = 6;

impl KernelBtf {
    /// vmlinux BTF and that of each named module present under `dir` (/sys/kernel/btf).
    pub fn load(dir: &Path, modules: &[&str]) -> Result<KernelBtf, BtfError> {
        let path = dir.join("vmlinux");
        let vmlinux = Btf::from_file(&path).map_err(|source| BtfError::Open { path, source })?;
        let mut loaded = Vec::new();
        for &module in modules {
            let path = dir.join(module);
            if path.exists() {
                let btf = Btf::from_split_file(&path, &vmlinux).map_err(|source| BtfError::Open { path, source })?;
                loaded.push((module.to_owned(), btf));
            }
        }
        Ok(KernelBtf { vmlinux, modules: loaded })
    }

    /// vmlinux's BTF, then each module's.
    pub fn all(&self) -> impl Iterator<Item = &Btf> {
        std::iter::once(&self.vmlinux).chain(self.modules.iter().map(|(_, btf)| btf))
    }

    /// The definition of `struct strukt` and the BTF it is in: vmlinux's, else a module's (a
    /// kernel built with the CXL core as a module has `struct cxl_dport` in `cxl_core`'s).
    pub fn find_struct(&self, strukt: &'static str) -> Result<(&Btf, btf_rs::Struct), BtfError> {
        self.all()
            .find_map(|btf| find_struct(btf, strukt).ok().map(|def| (btf, def)))
            .ok_or(BtfError::MissingStruct { name: strukt })
    }

    /// The use sites and loaders of one module, from its BTF in `dir` (after it was loaded
    /// again): (functions taking a dport, functions handing one back).
    pub fn module_functions(
        &self,
        dir: &Path,
        module: &str,
    ) -> Result<(Vec<DportFunction>, Vec<DportFunction>), BtfError> {
        let path = dir.join(module);
        let (mut uses, mut loaders) = (Vec::new(), Vec::new());
        if !path.exists() {
            return Ok((uses, loaders));
        }
        let btf = Btf::from_split_file(&path, &self.vmlinux).map_err(|source| BtfError::Open { path, source })?;
        if let Some(split) = btf.split() {
            collect_pointer_params(&btf, split.type_iter(), "cxl_dport", Some(module), &mut uses)?;
            collect_loaders(&btf, split.type_iter(), Some(module), &mut loaders)?;
        }
        Ok((uses, loaders))
    }

    /// Every function (vmlinux and modules) that hands its caller a dport: one returning a
    /// `struct cxl_dport *` or filling a `struct cxl_dport **` parameter
    /// (`cxl_mem_find_port(cxlmd, &dport)`). Their callers can hold a loaded dport.
    pub fn dport_loaders(&self) -> Result<Vec<DportFunction>, BtfError> {
        let mut found = Vec::new();
        collect_loaders(&self.vmlinux, self.vmlinux.type_iter(), None, &mut found)?;
        for (module, btf) in &self.modules {
            if let Some(split) = btf.split() {
                collect_loaders(btf, split.type_iter(), Some(module), &mut found)?;
            }
        }
        found.sort();
        found.dedup();
        Ok(found)
    }

    /// Every function (vmlinux and modules) with a `struct cxl_dport *` parameter.
    pub fn dport_functions(&self) -> Result<Vec<DportFunction>, BtfError> {
        let mut found = Vec::new();
        collect_pointer_params(&self.vmlinux, self.vmlinux.type_iter(), "cxl_dport", None, &mut found)?;
        for (module, btf) in &self.modules {
            if let Some(split) = btf.split() {
                collect_pointer_params(btf, split.type_iter(), "cxl_dport", Some(module), &mut found)?;
            }
        }
        found.sort();
        found.dedup();
        Ok(found)
    }
}

/// The definition of `struct strukt` (not a forward declaration).
pub fn find_struct(btf: &Btf, strukt: &'static str) -> Result<btf_rs::Struct, BtfError> {
    let types = btf.resolve_types_by_name(strukt).map_err(|_| BtfError::MissingStruct { name: strukt })?;
    types
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or(BtfError::MissingStruct { name: strukt })
}

/// Byte offset of `member` in `struct strukt`, looking into anonymous members.
pub fn member_offset(btf: &Btf, strukt: &'static str, member: &'static str) -> Result<u64, BtfError> {
    let def = find_struct(btf, strukt)?;
    let bits = member_bit_offset(btf, &def, member)?.ok_or(BtfError::MissingMember { strukt, member })?;
    if bits % 8 != 0 {
        return Err(BtfError::Bitfield { strukt, member });
    }
    Ok(u64::from(bits / 8))
}

/// Bit offset of `member`, searching anonymous struct/union members too.
pub fn member_bit_offset(btf: &Btf, def: &btf_rs::Struct, member: &str) -> Result<Option<u32>, BtfError> {
    for m in &def.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == member {
            return Ok(Some(m.bit_offset()));
        }
        if name.is_empty()
            && let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m)
            && let Some(bits) = member_bit_offset(btf, &inner, member)?
        {
            return Ok(Some(m.bit_offset() + bits));
        }
    }
    Ok(None)
}

/// The name of the struct `ty` points to (through const, volatile, typedefs), if it is a
/// pointer to a struct.
pub fn pointee_struct_name(btf: &Btf, ty: &Type) -> Option<String> {
    let Type::Ptr(ptr) = ty else { return None };
    let mut next = btf.resolve_chained_type(ptr).ok();
    while let Some(t) = next {
        match &t {
            Type::Struct(_) | Type::Fwd(_) => return t.as_btf_type().and_then(|b| btf.resolve_name(b).ok()),
            Type::Const(_) | Type::Volatile(_) | Type::Restrict(_) | Type::Typedef(_) | Type::TypeTag(_) => {
                next = t.as_btf_type().and_then(|b| btf.resolve_chained_type(b).ok());
            }
            _ => return None,
        }
    }
    None
}

/// Whether `ty` is a pointer to `struct strukt` (through const, volatile, typedefs).
fn is_struct_pointer(btf: &Btf, ty: &Type, strukt: &str) -> bool {
    pointee_struct_name(btf, ty).as_deref() == Some(strukt)
}

/// Whether `ty` is a `struct cxl_dport **`.
fn is_dport_out_param(btf: &Btf, ty: &Type) -> bool {
    let Type::Ptr(ptr) = ty else { return false };
    btf.resolve_chained_type(ptr).is_ok_and(|inner| is_struct_pointer(btf, &inner, "cxl_dport"))
}

/// Calls `f` with every function among `types` and its prototype.
fn each_function(
    btf: &Btf,
    mut types: impl FallibleIterator<Item = Type, Error = btf_rs::Error>,
    mut f: impl FnMut(&btf_rs::Func, &btf_rs::FuncProto) -> Result<(), BtfError>,
) -> Result<(), BtfError> {
    while let Some(ty) = types.next()? {
        let Type::Func(func) = &ty else { continue };
        let Ok(Type::FuncProto(proto)) = btf.resolve_chained_type(func) else { continue };
        f(func, &proto)?;
    }
    Ok(())
}

/// Functions among `types` returning a `struct cxl_dport *` or taking a `struct cxl_dport **`
/// (`arg` is that parameter's index, or `RETURNS` for the return value).
fn collect_loaders(
    btf: &Btf,
    types: impl FallibleIterator<Item = Type, Error = btf_rs::Error>,
    module: Option<&str>,
    found: &mut Vec<DportFunction>,
) -> Result<(), BtfError> {
    each_function(btf, types, |func, proto| {
        let returns =
            btf.resolve_type_by_id(proto.return_type_id()).is_ok_and(|r| is_struct_pointer(btf, &r, "cxl_dport"));
        let out_param = proto
            .parameters
            .iter()
            .position(|p| btf.resolve_chained_type(p).is_ok_and(|t| is_dport_out_param(btf, &t)));
        let arg = match (out_param, returns) {
            (Some(i), _) => i as u32,
            (None, true) => RETURNS,
            (None, false) => return Ok(()),
        };
        found.push(DportFunction { name: btf.resolve_name(func)?, module: module.map(str::to_owned), arg });
        Ok(())
    })
}

/// Functions among `types` with a parameter pointing to `struct strukt`.
fn collect_pointer_params(
    btf: &Btf,
    types: impl FallibleIterator<Item = Type, Error = btf_rs::Error>,
    strukt: &str,
    module: Option<&str>,
    found: &mut Vec<DportFunction>,
) -> Result<(), BtfError> {
    each_function(btf, types, |func, proto| {
        for (i, param) in proto.parameters.iter().enumerate() {
            let Ok(param_type) = btf.resolve_chained_type(param) else { continue };
            if is_struct_pointer(btf, &param_type, strukt) {
                found.push(DportFunction {
                    name: btf.resolve_name(func)?,
                    module: module.map(str::to_owned),
                    arg: i as u32,
                });
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The host's own kernel BTF: no CXL there, but the same mechanism finds `struct device`
    // members and functions taking `struct device *`.
    fn host() -> Btf {
        Btf::from_file("/sys/kernel/btf/vmlinux").expect("the host kernel has BTF (/sys/kernel/btf/vmlinux)")
    }

    #[test]
    fn member_offsets_come_from_btf() {
        let btf = host();
        assert_eq!(member_offset(&btf, "mutex", "owner").unwrap(), 0);
        let parent = member_offset(&btf, "device", "parent").unwrap();
        let mutex = member_offset(&btf, "device", "mutex").unwrap();
        assert!(parent > 0 && mutex > parent, "device.parent {parent}, device.mutex {mutex}");
        assert!(matches!(member_offset(&btf, "device", "no_such_member"), Err(BtfError::MissingMember { .. })));
        assert!(matches!(member_offset(&btf, "no_such_struct_xyz", "x"), Err(BtfError::MissingStruct { .. })));
    }

    #[test]
    fn pointer_parameters_are_found() {
        let btf = host();
        let mut found = Vec::new();
        collect_pointer_params(&btf, btf.type_iter(), "device", None, &mut found).unwrap();
        assert!(found.contains(&DportFunction { name: "device_add".into(), module: None, arg: 0 }));
        assert!(found.iter().any(|f| f.name == "device_move" && f.arg == 1));
        assert!(!found.iter().any(|f| f.name == "kfree"));
    }
}
