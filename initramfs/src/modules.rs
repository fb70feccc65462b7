//! Kernel modules and their load order, from `modules.dep` as `depmod` writes it.
//!
//! Each line is `path: dep dep ...`, paths relative to `/lib/modules/<version>/`; the
//! dependencies are listed so that a module's own needs come later in the list (modprobe loads
//! the list back to front). We do not rely on that order: [`load_order`] makes a depth-first
//! topological order of the closure, so every module comes after everything it needs.
//! The file is read from the kernel package and, in the initramfs, by PID 1; both treat it as
//! untrusted text with limits.

use std::collections::{BTreeMap, BTreeSet};

/// Longest `modules.dep` we accept (the full Debian generic kernel's is about 0.5 MiB).
pub const MAX_MODULES_DEP: usize = 8 << 20;
/// Deepest dependency chain we follow before calling it a cycle.
const MAX_DEPTH: usize = 64;

/// The parsed `modules.dep`: module path → dependency paths.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModulesDep {
    deps: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModulesError {
    /// modules.dep is larger than any real one; refusing to read it.
    #[error("modules.dep is {0} bytes, more than the {MAX_MODULES_DEP}-byte limit")]
    TooLarge(usize),
    /// A requested module is not in modules.dep (not built for this kernel, or built in).
    #[error("module {0} is not in modules.dep (built into the kernel, or not built for it)")]
    Unknown(String),
    /// The dependencies loop or are deeper than any real kernel's.
    #[error("module dependencies of {0} loop or nest deeper than {MAX_DEPTH}")]
    Cycle(String),
}

/// A module's name as the kernel and modprobe see it: file name without `.ko[.xz|.zst|.gz]`,
/// `-` and `_` being the same character.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

impl ModulesDep {
    /// Parse `modules.dep` text. Malformed lines (no colon, empty path) are skipped: a line we
    /// cannot read must not stop the others from loading.
    pub fn parse(text: &str) -> Result<ModulesDep, ModulesError> {
        if text.len() > MAX_MODULES_DEP {
            return Err(ModulesError::TooLarge(text.len()));
        }
        let mut deps = BTreeMap::new();
        for line in text.lines() {
            let Some((path, rest)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim();
            if path.is_empty() || path.starts_with('#') {
                continue;
            }
            let list = rest.split_whitespace().map(str::to_owned).collect();
            deps.insert(path.to_owned(), list);
        }
        Ok(ModulesDep { deps })
    }

    /// All module paths, sorted.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.deps.keys().map(String::as_str)
    }

    /// The path of the module called `name` (`virtio-net` or `virtio_net`), if listed.
    pub fn find(&self, name: &str) -> Option<&str> {
        let want = module_name(name);
        self.deps
            .keys()
            .find(|p| module_name(p) == want)
            .map(String::as_str)
    }

    /// The modules `names` and everything they need, each after its dependencies; every
    /// module once. Names not listed are an error; use [`ModulesDep::find`] to skip them.
    pub fn load_order<S: AsRef<str>>(&self, names: &[S]) -> Result<Vec<String>, ModulesError> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        let mut stack = BTreeSet::new();
        for name in names {
            let name = name.as_ref();
            let path = self
                .find(name)
                .ok_or_else(|| ModulesError::Unknown(name.to_owned()))?;
            self.visit(path, &mut stack, &mut done, &mut order)?;
        }
        Ok(order)
    }

    /// Every listed module, each after its dependencies (what PID 1 loads).
    pub fn full_order(&self) -> Result<Vec<String>, ModulesError> {
        let all: Vec<String> = self.deps.keys().cloned().collect();
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        let mut stack = BTreeSet::new();
        for path in &all {
            self.visit(path, &mut stack, &mut done, &mut order)?;
        }
        Ok(order)
    }

    /// A modules.dep for the subset `paths` (as the initramfs carries it).
    pub fn subset(&self, paths: &[String]) -> String {
        let keep: BTreeSet<&str> = paths.iter().map(String::as_str).collect();
        let mut out = String::new();
        for (path, deps) in &self.deps {
            if keep.contains(path.as_str()) {
                out.push_str(path);
                out.push(':');
                for d in deps {
                    out.push(' ');
                    out.push_str(d);
                }
                out.push('\n');
            }
        }
        out
    }

    /// Depth-first visit; `stack` holds the modules being visited, so a loop is seen at once
    /// (and the work stays linear in the size of the file, whatever its shape).
    fn visit(
        &self,
        path: &str,
        stack: &mut BTreeSet<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ModulesError> {
        if done.contains(path) {
            return Ok(());
        }
        if stack.len() > MAX_DEPTH || !stack.insert(path.to_owned()) {
            return Err(ModulesError::Cycle(module_name(path)));
        }
        // A dependency missing from the file is still loaded by path: depmod lists it, so
        // the file exists; only its own needs are unknown.
        if let Some(deps) = self.deps.get(path) {
            for d in deps {
                self.visit(d, stack, done, order)?;
            }
        }
        stack.remove(path);
        if done.insert(path.to_owned()) {
            order.push(path.to_owned());
        }
        Ok(())
    }
}

/// Fuzz entry point: parse arbitrary bytes and compute the full load order; must never panic.
pub fn fuzz_modules_dep(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(dep) = ModulesDep::parse(&text) {
        let _ = dep.full_order();
        let names: Vec<String> = dep.paths().take(8).map(module_name).collect();
        let _ = dep.load_order(&names);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/usb/storage/usb-storage.ko.xz:
";

    fn names(order: &[String]) -> Vec<String> {
        order.iter().map(|p| module_name(p)).collect()
    }

    #[test]
    fn dependencies_come_first() {
        let dep = ModulesDep::parse(DEP).unwrap();
        let order = dep
            .load_order(&["virtio_blk", "virtio-pci", "virtio_net"])
            .unwrap();
        let n = names(&order);
        let pos = |m: &str| n.iter().position(|x| x == m).unwrap();
        assert!(pos("virtio_ring") < pos("virtio"));
        assert!(pos("virtio") < pos("virtio_blk"));
        assert!(pos("virtio_pci_modern_dev") < pos("virtio_pci"));
        assert!(pos("failover") < pos("net_failover"));
        assert!(pos("net_failover") < pos("virtio_net"));
        assert_eq!(n.len(), 9, "every module once: {n:?}");
    }

    #[test]
    fn names_ignore_dashes_and_compression_suffix() {
        assert_eq!(
            module_name("kernel/drivers/usb/storage/usb-storage.ko.xz"),
            "usb_storage"
        );
        let dep = ModulesDep::parse(DEP).unwrap();
        assert!(dep.find("usb_storage").is_some());
        assert_eq!(
            dep.load_order(&["e1000e"]),
            Err(ModulesError::Unknown("e1000e".into()))
        );
    }

    #[test]
    fn cycles_are_reported_not_followed_forever() {
        let dep = ModulesDep::parse("a.ko: b.ko\nb.ko: a.ko\nc.ko:\n").unwrap();
        assert_eq!(dep.full_order(), Err(ModulesError::Cycle("a".into())));
        assert_eq!(dep.load_order(&["c"]).unwrap(), ["c.ko"]);
    }

    #[test]
    fn subset_keeps_only_the_chosen_lines() {
        let dep = ModulesDep::parse(DEP).unwrap();
        let order = dep.load_order(&["virtio_blk"]).unwrap();
        let sub = ModulesDep::parse(&dep.subset(&order)).unwrap();
        assert_eq!(sub.paths().count(), 3);
        assert_eq!(names(&sub.full_order().unwrap()), names(&order));
    }

    #[test]
    fn fuzz_inputs_never_panic() {
        // Deterministic pseudo-random and mutated-valid inputs (xorshift), so the plain test
        // suite exercises the parser the cargo-fuzz target drives.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..3000 {
            let mut data = DEP.as_bytes().to_vec();
            if i % 3 == 0 {
                data = (0..(next() % 300))
                    .map(|_| b"ab.ko: \n-_/"[(next() % 11) as usize])
                    .collect();
            } else {
                for _ in 0..(next() % 8) {
                    let at = (next() as usize) % data.len();
                    data[at] = next() as u8;
                }
            }
            fuzz_modules_dep(&data);
        }
    }
}
