//! A pending reboot, told to the scheduler: while logind has a shutdown scheduled, or the
//! distribution's marker says a reboot is required (`/run/reboot-required`, written by Debian's
//! and Ubuntu's package hooks), the Node carries our `PreferNoSchedule` taint, so the VMs that
//! other nodes evacuate do not land here only to move again. Reconciled at start too: a taint
//! left from before the reboot goes once nothing is pending any more.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::drain::eviction::backoff;
use crate::drain::model::Schedule;
use crate::kube::events::NodeEvents;
use crate::kube::taint::{self, REBOOT_PENDING_TAINT};

/// The marker is a file with no change signal; a reboot is rarely urgent to the minute.
pub const MARKER_POLL: Duration = Duration::from_secs(30);

/// Why a reboot is pending, if one is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    Scheduled(String),
    Marker(PathBuf),
}

impl std::fmt::Display for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pending::Scheduled(kind) => write!(f, "logind has a {kind} scheduled"),
            Pending::Marker(p) => write!(f, "{} exists", p.display()),
        }
    }
}

/// A schedule that will really take the node down (not logind's `dry-*`), else the marker.
pub fn pending(schedule: Option<&Schedule>, marker: Option<&PathBuf>) -> Option<Pending> {
    if let Some(s) = schedule.filter(|s| s.takes_node_down()) {
        return Some(Pending::Scheduled(s.kind.clone()));
    }
    marker.map(|p| Pending::Marker(p.clone()))
}

/// Follows the schedule and the marker (checked every [`MARKER_POLL`]) and keeps the taint in
/// step, retrying with backoff when the API server fails.
pub fn spawn(
    api: Api<Node>,
    node: String,
    marker: Option<PathBuf>,
    mut schedule: watch::Receiver<Option<Schedule>>,
    events: NodeEvents,
) {
    tokio::spawn(async move {
        let mut applied: Option<bool> = None;
        let mut failures = 0;
        loop {
            let present = marker.clone().filter(|p| p.exists());
            let why = pending(schedule.borrow_and_update().as_ref(), present.as_ref());
            let want = why.is_some();
            let mut wait = MARKER_POLL;
            if applied != Some(want) {
                match taint::set_reboot_pending(&api, &node, want).await {
                    Ok(changed) => {
                        failures = 0;
                        applied = Some(want);
                        if changed {
                            let note = match &why {
                                Some(w) => format!(
                                    "reboot pending ({w}): tainted {REBOOT_PENDING_TAINT}:PreferNoSchedule so migrations prefer other nodes"
                                ),
                                None => format!(
                                    "no reboot pending any more: taint {REBOOT_PENDING_TAINT} removed"
                                ),
                            };
                            info!(node = %node, pending = want, "{note}");
                            let reason = if want {
                                "RebootPending"
                            } else {
                                "RebootNoLongerPending"
                            };
                            let _ = events.publish(false, reason, "Taint", note).await;
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        wait = backoff(failures);
                        warn!(node = %node, error = %e, retry_ms = wait.as_millis() as u64, "setting the reboot-pending taint failed");
                    }
                }
            }
            tokio::select! {
                changed = schedule.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn sched(kind: &str) -> Schedule {
        Schedule {
            kind: kind.into(),
            at: UNIX_EPOCH,
        }
    }

    #[test]
    fn a_schedule_or_the_marker_makes_a_reboot_pending_a_dry_run_does_not() {
        let marker = PathBuf::from("/run/reboot-required");
        assert_eq!(pending(None, None), None);
        assert_eq!(
            pending(Some(&sched("reboot")), Some(&marker)),
            Some(Pending::Scheduled("reboot".into()))
        );
        assert_eq!(pending(Some(&sched("dry-reboot")), None), None);
        assert_eq!(
            pending(Some(&sched("dry-poweroff")), Some(&marker)),
            Some(Pending::Marker(marker.clone()))
        );
        assert_eq!(pending(None, Some(&marker)), Some(Pending::Marker(marker)));
    }
}
