//! The VMIs of a cell: a fixed mix of guest memory sizes and eviction strategies, the same
//! for every tool, so each cell drains identical VMs.

use std::time::Duration;

use crate::kubevirt::{VmGroup, VmSpec, VmiKind};

const GIB: u64 = 1 << 30;

/// Guest memory of VMI i is `MEMORY_GIB[i % 10]` GiB; the tenth of each ten (i % 10 == 9) has
/// eviction strategy None, so it is stopped, not migrated. Mean 4.8 GiB.
pub const MEMORY_GIB: [u64; 10] = [4, 1, 8, 2, 16, 1, 2, 4, 8, 2];

/// One VMI of the mix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MixVm {
    pub kind: VmiKind,
    pub memory: u64,
}

/// The first `n` VMIs of the mix.
pub fn vms(n: usize) -> Vec<MixVm> {
    (0..n)
        .map(|i| MixVm {
            kind: if i % 10 == 9 {
                VmiKind::None
            } else {
                VmiKind::Live
            },
            memory: MEMORY_GIB[i % 10] * GIB,
        })
        .collect()
}

/// The mix as a `--vms` SPEC (one group per VMI: the SPEC has one memory size per group).
pub fn spec(n: usize) -> VmSpec {
    VmSpec {
        groups: vms(n)
            .into_iter()
            .map(|vm| VmGroup {
                node: None,
                kind: vm.kind,
                count: 1,
                memory: Some(vm.memory),
                vm: None,
                hotplug: false,
                boot: None,
            })
            .collect(),
    }
}

/// The mix in words, for the report.
pub fn describe() -> String {
    let sizes: Vec<String> = MEMORY_GIB.iter().map(|g| format!("{g}")).collect();
    format!(
        "VMI i has {} GiB of guest memory (i mod 10, in that order; mean 4.8 GiB); every tenth \
         (i mod 10 = 9) has `evictionStrategy: None` and is stopped rather than migrated, the \
         others `LiveMigrate`",
        sizes.join("/")
    )
}

/// Copy time of one migration at `bandwidth` bytes/s.
pub fn copy_time(memory: u64, bandwidth: u64) -> Duration {
    Duration::from_secs_f64(memory as f64 / bandwidth.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tenth_vm_is_stopped_not_migrated() {
        let v = vms(20);
        assert_eq!(v.iter().filter(|m| m.kind == VmiKind::None).count(), 2);
        assert_eq!(v[9].kind, VmiKind::None);
        assert_eq!(v[0].memory, 4 * GIB);
        let mean = MEMORY_GIB.iter().sum::<u64>() as f64 / 10.0;
        assert_eq!(mean, 4.8);
    }

    #[test]
    fn the_spec_names_vmis_by_kind() {
        let names: Vec<String> = spec(11).names().into_iter().map(|(_, n)| n).collect();
        assert_eq!(names[0], "live-1");
        assert_eq!(names[9], "none-1");
        assert_eq!(names[10], "live-10");
    }
}
