//! The layout of `struct cxl_dport` in the running kernel, from BTF: every named member at
//! any depth, so an inline access at a displacement can be named (`dport->rch`,
//! `dport->regs.ras`) and an access into a hole or padding is never taken for a dport access.
use std::sync::Arc;

use btf_rs::{Btf, Type};

use super::btf::BtfError;

/// One member of the dport struct that an access can fall in: a scalar, an array, or a
/// struct whose members are listed too (both are leaves: the innermost that holds an
/// access names it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
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
    pub members: Vec<Field>,
}

/// How deep nested members are listed (cxl_dport.regs.<union>.ras is three).
const MAX_DEPTH: usize = 4;

impl Layout {
    /// The layout of struct `def`, defined in `btf`.
    pub fn of(btf: &Btf, def: &btf_rs::Struct) -> Result<Layout, BtfError> {
        let mut members = Vec::new();
        collect(btf, def, "", 0, 0, &mut members)?;
        Ok(Layout { size: def.size() as u64, members })
    }

    /// The innermost member holding all of `[offset, offset + size)`; of a union's
    /// alternatives, the first declared.
    pub fn member_at(&self, offset: u64, size: u64) -> Option<&Field> {
        let end = offset.checked_add(size.max(1))?;
        let depth = |m: &Field| m.path.matches('.').count();
        self.members.iter().filter(|m| m.offset <= offset && end <= m.offset + m.size).fold(
            None,
            |best: Option<&Field>, m| match best {
                Some(b) if depth(b) >= depth(m) => Some(b),
                _ => Some(m),
            },
        )
    }

    /// Reads the text form `tests/data/code/*.layout` holds: `size N`, then `path offset size`
    /// lines; `#` starts a comment.
    pub fn parse(text: &str) -> Option<Layout> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
        let size = lines.next()?.strip_prefix("size ")?.parse().ok()?;
        let members = lines
            .map(|l| {
                let mut f = l.split_whitespace();
                Some(Field {
                    path: Arc::from(f.next()?),
                    offset: f.next()?.parse().ok()?,
                    size: f.next()?.parse().ok()?,
                })
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
    out: &mut Vec<Field>,
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
            out.push(Field { path: Arc::from(path.as_str()), offset, size });
        }
        if depth < MAX_DEPTH
            && let Type::Struct(inner) | Type::Union(inner) = &ty
        {
            collect(btf, inner, &path, offset, depth + 1, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_innermost_member_names_an_access_and_holes_name_none() {
        // 7.2.13's struct cxl_dport, as read from its BTF (tests/data/code/README.md).
        let layout = Layout::parse(include_str!("../../tests/data/code/cxl_dport-7.2.13.layout")).unwrap();
        assert_eq!(&*layout.member_at(144, 1).unwrap().path, "rch");
        assert_eq!(&*layout.member_at(152, 8).unwrap().path, "port");
        assert_eq!(&*layout.member_at(128, 8).unwrap().path, "rcrb.base");
        // The 7 bytes after rch are a hole; 4 bytes after port_id too.
        assert!(layout.member_at(145, 1).is_none());
        assert!(layout.member_at(124, 4).is_none());
        // An access wider than its member does not fit it.
        assert!(layout.member_at(144, 8).is_none());
        // Past the end.
        assert!(layout.member_at(layout.size, 1).is_none());
    }
}
