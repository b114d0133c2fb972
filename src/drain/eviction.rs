//! What an answer to `POST pods/<name>/eviction` means for the drain.
//!
//! KubeVirt's eviction webhook (`pkg/virt-api/webhooks/validating-webhook/admitters/
//! pod-eviction-admitter.go`) denies every eviction of a virt-launcher pod it handles with HTTP
//! 429; the message tells progress (an evacuation was started or is running) from a refusal that
//! will never change (the VMI cannot be live-migrated). The API server prefixes webhook
//! messages with `admission webhook "…" denied the request: `, so messages are matched inside.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvictionOutcome {
    /// 200/201: the pod is being deleted with its grace period.
    Evicted,
    /// 404: the pod is already gone.
    Gone,
    /// 429 from KubeVirt: the VMI is being live-migrated away.
    Evacuating,
    /// 429 from KubeVirt: LiveMigrate strategy but the VMI is not live-migratable.
    NotMigratable,
    /// 429 from KubeVirt: this is the target pod of a migration, not ours to evict.
    TargetPod,
    /// Another 429 (e.g. a PodDisruptionBudget), a 5xx or a transport error: try again soon.
    Retry(String),
    /// Any other answer (403, 422, …): retrying will not help.
    Refused(String),
}

impl EvictionOutcome {
    pub fn from_status(code: u16, message: &str) -> Self {
        match code {
            200 | 201 => EvictionOutcome::Evicted,
            404 => EvictionOutcome::Gone,
            429 => {
                if message.contains("Eviction triggered evacuation")
                    || message.contains("Evacuation in progress")
                {
                    EvictionOutcome::Evacuating
                } else if message.contains("not live-migratable") {
                    EvictionOutcome::NotMigratable
                } else if message.contains("Eviction request for target Pod") {
                    EvictionOutcome::TargetPod
                } else {
                    EvictionOutcome::Retry(format!("429: {message}"))
                }
            }
            500..=599 => EvictionOutcome::Retry(format!("{code}: {message}")),
            _ => EvictionOutcome::Refused(format!("{code}: {message}")),
        }
    }

    /// Where the eviction stands once this answer is in; a retry is not settled.
    pub fn settled(&self) -> EvictionState {
        match self {
            EvictionOutcome::Evicted => EvictionState::Evicted,
            EvictionOutcome::Gone => EvictionState::Gone,
            EvictionOutcome::Evacuating => EvictionState::Evacuating,
            EvictionOutcome::NotMigratable => EvictionState::NotMigratable,
            EvictionOutcome::TargetPod => EvictionState::TargetPod,
            EvictionOutcome::Retry(_) => EvictionState::Retrying,
            EvictionOutcome::Refused(_) => EvictionState::Refused,
        }
    }

    /// The detail worth logging (the API's message), if any.
    pub fn detail(&self) -> &str {
        match self {
            EvictionOutcome::Retry(d) | EvictionOutcome::Refused(d) => d,
            _ => "",
        }
    }

    /// Short name for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            EvictionOutcome::Evicted => "evicted",
            EvictionOutcome::Gone => "gone",
            EvictionOutcome::Evacuating => "evacuating",
            EvictionOutcome::NotMigratable => "not_migratable",
            EvictionOutcome::TargetPod => "target_pod",
            EvictionOutcome::Retry(_) => "retry",
            EvictionOutcome::Refused(_) => "refused",
        }
    }
}

/// Where one pod's eviction stands in a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionState {
    /// Sent; no answer yet.
    InFlight,
    /// Answered with something worth trying again; waiting for the retry.
    Retrying,
    /// Allowed: the pod is going with its grace period (or the drain deleted it).
    Evicted,
    Gone,
    Evacuating,
    NotMigratable,
    TargetPod,
    Refused,
}

impl EvictionState {
    pub fn label(self) -> &'static str {
        match self {
            EvictionState::InFlight => "in_flight",
            EvictionState::Retrying => "retrying",
            EvictionState::Evicted => "evicted",
            EvictionState::Gone => "gone",
            EvictionState::Evacuating => "evacuating",
            EvictionState::NotMigratable => "not_migratable",
            EvictionState::TargetPod => "target_pod",
            EvictionState::Refused => "refused",
        }
    }
}

/// The longest pause between two attempts of one call.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Pause before attempt `failures + 1`: 100 ms doubling, capped at [`MAX_BACKOFF`].
pub fn backoff(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(10);
    (FIRST_BACKOFF * factor).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEBHOOK: &str =
        "admission webhook \"virt-launcher-eviction-interceptor.kubevirt.io\" denied the request: ";

    #[test]
    fn kubevirt_429s_are_told_apart() {
        assert_eq!(
            EvictionOutcome::from_status(
                429,
                &format!("{WEBHOOK}Eviction triggered evacuation of VMI \"default/a\"")
            ),
            EvictionOutcome::Evacuating
        );
        assert_eq!(
            EvictionOutcome::from_status(
                429,
                &format!(
                    "{WEBHOOK}Evacuation in progress: Eviction triggered evacuation of VMI \"default/a\""
                )
            ),
            EvictionOutcome::Evacuating
        );
        assert_eq!(
            EvictionOutcome::from_status(
                429,
                &format!(
                    "{WEBHOOK}VMI a is configured with an eviction strategy but is not live-migratable"
                )
            ),
            EvictionOutcome::NotMigratable
        );
        assert_eq!(
            EvictionOutcome::from_status(429, &format!("{WEBHOOK}Eviction request for target Pod")),
            EvictionOutcome::TargetPod
        );
    }

    #[test]
    fn other_answers() {
        assert_eq!(
            EvictionOutcome::from_status(201, ""),
            EvictionOutcome::Evicted
        );
        assert_eq!(
            EvictionOutcome::from_status(404, "x"),
            EvictionOutcome::Gone
        );
        assert!(matches!(
            EvictionOutcome::from_status(
                429,
                "Cannot evict pod as it would violate the pod's disruption budget."
            ),
            EvictionOutcome::Retry(_)
        ));
        assert!(matches!(
            EvictionOutcome::from_status(503, "unavailable"),
            EvictionOutcome::Retry(_)
        ));
        assert!(matches!(
            EvictionOutcome::from_status(403, "forbidden"),
            EvictionOutcome::Refused(_)
        ));
    }

    #[test]
    fn backoff_is_capped_at_two_seconds() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(5), Duration::from_millis(1600));
        assert_eq!(backoff(6), MAX_BACKOFF);
        assert_eq!(backoff(100), MAX_BACKOFF);
    }
}
