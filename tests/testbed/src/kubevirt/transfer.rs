//! How long a migration's memory copy takes and when virt-launcher's migration monitor gives up
//! on it (`pkg/virt-launcher/virtwrap/live-migration-source.go`, v1.8.0: `newMigrationMonitor`,
//! `shouldTriggerTimeout`, `isMigrationProgressing`; the data size of `getVMIMigrationDataSize`
//! in `manager.go` is the guest memory scaled to giga-units and rounded up), and the priority
//! queue's numbers (`pkg/util/migrations/migrations.go`, `getRequeueDelayForPriority` in
//! `pkg/virt-controller/watch/migration/migration.go`).

use std::time::Duration;

use super::crds::VirtualMachineInstanceMigration;

/// The copy phase of a migration moving `memory` bytes. `link` is the bed's bandwidth per
/// migration and `cap` the KubeVirt CR's `bandwidthPerMigration` (bytes/s, `None` = no limit);
/// the slower one wins. With neither, the copy takes `fixed`.
pub fn copy_time(memory: u64, link: Option<u64>, cap: Option<u64>, fixed: Duration) -> Duration {
    let rate = match (link, cap) {
        (Some(l), Some(c)) => Some(l.min(c)),
        (Some(r), None) | (None, Some(r)) => Some(r),
        (None, None) => None,
    };
    match rate {
        Some(r) if r > 0 => Duration::from_secs_f64(memory as f64 / r as f64),
        _ => fixed,
    }
}

/// `acceptableCompletionTime`: `completionTimeoutPerGiB` × the memory in giga-units, rounded
/// up (`resource.Quantity.ScaledValue(resource.Giga)`). Zero: no limit.
pub fn acceptable_completion(memory: u64, per_gib: u64) -> Duration {
    let units = memory.div_ceil(1_000_000_000);
    Duration::from_secs(per_gib * units)
}

/// The monitor's abort messages.
pub fn stuck_message(stalled: Duration) -> String {
    format!(
        "Live migration stuck for {} seconds and has been aborted",
        stalled.as_secs()
    )
}

pub fn not_completed_message(acceptable: Duration) -> String {
    format!(
        "Live migration is not completed after {} seconds and has been aborted",
        acceptable.as_secs()
    )
}

/// `PriorityFromMigration`.
pub fn queue_priority(m: &VirtualMachineInstanceMigration) -> i32 {
    match m.spec.rest.get("priority").and_then(|p| p.as_str()) {
        Some("system-critical") => 100,
        Some("user-triggered") => 50,
        Some("system-maintenance") => 20,
        _ => 0,
    }
}

/// How long a pending migration waits before it looks for room again: 5 s without the
/// priority queue; with it, by priority.
pub fn requeue_delay(priority_queue: bool, priority: i32) -> Duration {
    if !priority_queue {
        return Duration::from_secs(5);
    }
    match priority {
        p if p >= 100 => Duration::from_secs(1),
        p if p >= 50 => Duration::from_secs(3),
        _ => Duration::from_secs(5),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_time_follows_memory_and_the_slower_bandwidth() {
        let gib = 1u64 << 30;
        let fixed = Duration::from_secs(2);
        assert_eq!(
            copy_time(8 * gib, Some(gib), None, fixed),
            Duration::from_secs(8)
        );
        assert_eq!(
            copy_time(8 * gib, Some(gib), Some(gib / 2), fixed),
            Duration::from_secs(16)
        );
        assert_eq!(
            copy_time(8 * gib, None, Some(4 * gib), fixed),
            Duration::from_secs(2)
        );
        assert_eq!(copy_time(8 * gib, None, None, fixed), fixed);
    }

    #[test]
    fn completion_timeout_rounds_memory_up_to_giga_units() {
        assert_eq!(
            acceptable_completion(128 << 20, 150),
            Duration::from_secs(150)
        );
        assert_eq!(
            acceptable_completion(8 << 30, 150),
            Duration::from_secs(9 * 150)
        );
        assert_eq!(acceptable_completion(8 << 30, 0), Duration::ZERO);
    }

    #[test]
    fn requeue_delays() {
        assert_eq!(requeue_delay(false, 100), Duration::from_secs(5));
        assert_eq!(requeue_delay(true, 100), Duration::from_secs(1));
        assert_eq!(requeue_delay(true, 50), Duration::from_secs(3));
        assert_eq!(requeue_delay(true, 0), Duration::from_secs(5));
    }
}
