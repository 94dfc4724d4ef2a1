//! Shares one allocation per distinct string and stack: traces repeat the same task names,
//! sites and stacks millions of times.
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::event::{Access, Stack};

#[derive(Default)]
pub struct Interner {
    strings: FxHashMap<Arc<str>, ()>,
    stacks: FxHashMap<Stack, ()>,
    accesses: FxHashMap<Arc<Access>, ()>,
}

impl Interner {
    pub fn string(&mut self, text: &str) -> Arc<str> {
        if let Some((existing, ())) = self.strings.get_key_value(text) {
            return existing.clone();
        }
        let new: Arc<str> = Arc::from(text);
        self.strings.insert(new.clone(), ());
        new
    }

    pub fn access(&mut self, access: Access) -> Arc<Access> {
        if let Some((existing, ())) = self.accesses.get_key_value(&access) {
            return existing.clone();
        }
        let new = Arc::new(access);
        self.accesses.insert(new.clone(), ());
        new
    }

    pub fn stack<S: AsRef<str>>(&mut self, frames: &[S]) -> Stack {
        let frames: Vec<Arc<str>> = frames.iter().map(|f| self.string(f.as_ref())).collect();
        if let Some((existing, ())) = self.stacks.get_key_value(frames.as_slice()) {
            return existing.clone();
        }
        let new: Stack = Arc::from(frames);
        self.stacks.insert(new.clone(), ());
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_equal_strings_and_stacks() {
        let mut interner = Interner::default();
        let a = interner.string("cxl_mem_probe");
        let b = interner.string("cxl_mem_probe");
        assert!(Arc::ptr_eq(&a, &b));
        let s1 = interner.stack(&["a+0x1", "b+0x2"]);
        let s2 = interner.stack(&["a+0x1".to_string(), "b+0x2".to_string()]);
        assert!(Arc::ptr_eq(&s1, &s2));
        assert!(Arc::ptr_eq(&s1[0], &interner.string("a+0x1")));
    }
}
