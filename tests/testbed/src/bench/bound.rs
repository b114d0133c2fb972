//! The lower bound on a node's time to empty that KubeVirt's limits and the bandwidth allow,
//! whatever drains it.
//!
//! A migration occupies one of the node's outbound slots (`parallelOutboundMigrationsPerNode`,
//! within `parallelMigrationsPerCluster`) from its creation to its end: the bed's fixed phases
//! before the copy (Scheduling, Scheduled, PreparingTarget, TargetReady: a tenth of the
//! migration time each) and its hand-over, plus the copy, memory ÷ bandwidth. With `k` slots
//! and migration times `m_i`, no schedule empties the node before
//! `max(max_i m_i, Σ m_i / k)`. A VMI that cannot migrate is stopped (ACPI shutdown) and
//! stops need no slot, so they overlap the migrations: the bound is the larger of the two.
//! Anything a drain adds on top (eviction round trips, the evacuation controller's 5 s
//! re-queue, a poor order) shows as a ratio above 1.

use std::time::Duration;

use super::mix::{MixVm, copy_time};
use crate::kubevirt::VmiKind;

#[derive(Clone, Copy, Debug)]
pub struct BoundParams {
    /// Slot time of a migration besides its copy.
    pub fixed: Duration,
    /// Bytes per second per migration.
    pub bandwidth: u64,
    /// Outbound migrations from one node at once.
    pub slots: usize,
    /// How long a VMI takes to stop.
    pub stop: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bound {
    pub longest: f64,
    pub sum_over_slots: f64,
    /// 0 when every VMI migrates.
    pub stop: f64,
    /// Seconds: the largest of the three.
    pub total: f64,
}

pub fn lower_bound(vms: &[MixVm], p: &BoundParams) -> Bound {
    let times: Vec<f64> = vms
        .iter()
        .filter(|v| v.kind.migratable() && v.kind != VmiKind::None)
        .map(|v| (p.fixed + copy_time(v.memory, p.bandwidth)).as_secs_f64())
        .collect();
    let longest = times.iter().copied().fold(0.0, f64::max);
    let sum_over_slots = times.iter().sum::<f64>() / p.slots.max(1) as f64;
    let stop = if vms.iter().any(|v| v.kind == VmiKind::None) {
        p.stop.as_secs_f64()
    } else {
        0.0
    };
    Bound {
        longest,
        sum_over_slots,
        stop,
        total: longest.max(sum_over_slots).max(stop),
    }
}

/// The target "time to empty ≤ 1.1 × lower bound + 1 s".
pub fn within_target(time_to_empty: f64, bound: f64) -> bool {
    time_to_empty <= 1.1 * bound + 1.0
}

#[cfg(test)]
mod tests {
    use super::super::mix::vms;
    use super::*;

    const GIB: u64 = 1 << 30;

    fn params() -> BoundParams {
        BoundParams {
            fixed: Duration::from_millis(650),
            bandwidth: 4 * GIB,
            slots: 2,
            stop: Duration::from_secs(10),
        }
    }

    #[test]
    fn one_vm_is_its_own_migration() {
        let b = lower_bound(&vms(1), &params());
        assert!((b.total - 1.65).abs() < 1e-9, "{b:?}");
        assert_eq!(b.stop, 0.0);
    }

    #[test]
    fn many_vms_share_the_outbound_slots() {
        // Nine migrations of 46 GiB in all at 4 GiB/s plus 0.65 s each, over 2 slots.
        let b = lower_bound(&vms(10), &params());
        let expected = (46.0 / 4.0 + 9.0 * 0.65) / 2.0;
        assert!((b.sum_over_slots - expected).abs() < 1e-9, "{b:?}");
        assert_eq!(b.longest, 16.0 / 4.0 + 0.65);
        // The stop of the tenth VMI (10 s) is the longest part.
        assert_eq!(b.total, 10.0);
        let b = lower_bound(&vms(50), &params());
        assert_eq!(b.total, b.sum_over_slots);
    }

    #[test]
    fn the_target_allows_ten_percent_and_a_second() {
        assert!(within_target(12.0, 10.0));
        assert!(!within_target(12.1, 10.0));
    }
}
