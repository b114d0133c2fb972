//! The `ShutdownGuard` condition on our Node, so `kubectl describe node` and `kubectl get node
//! -o yaml` show whether the node's shutdown is guarded and how the last drain went, and the
//! record of the last shutdown in an annotation (read back by `shutdown-guard status`).

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::core::v1::{Node, NodeCondition};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde::{Deserialize, Serialize};

use crate::drain::report::LastShutdown;
use serde_json::json;

pub const CONDITION_TYPE: &str = "ShutdownGuard";
/// JSON [`LastShutdown`] of the most recent drain. A record, kept across reboots, so under its
/// own `status.` prefix: everything under `shutdown-guard.kubevirt.io/` is the cordon's and goes
/// when the cordon is lifted.
pub const LAST_SHUTDOWN_ANNOTATION: &str = "status.shutdown-guard.kubevirt.io/last-shutdown";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuardState {
    /// The lock is held and no drain is under way: a shutdown now would be drained.
    Ready,
    Draining,
    /// The last drain emptied the node and released the lock.
    Drained,
    /// The last drain ran out of time with VMIs or pods left.
    DeadlineReached,
    /// logind or the bus went away; the agent is taking the lock again.
    LockLost,
}

impl GuardState {
    pub fn reason(self) -> &'static str {
        match self {
            GuardState::Ready => "Ready",
            GuardState::Draining => "Draining",
            GuardState::Drained => "Drained",
            GuardState::DeadlineReached => "DeadlineReached",
            GuardState::LockLost => "LockLost",
        }
    }

    /// `True` only when a shutdown starting now would be held and drained.
    pub fn status(self) -> &'static str {
        match self {
            GuardState::Ready => "True",
            _ => "False",
        }
    }

    pub fn from_reason(r: &str) -> Option<Self> {
        [
            GuardState::Ready,
            GuardState::Draining,
            GuardState::Drained,
            GuardState::DeadlineReached,
            GuardState::LockLost,
        ]
        .into_iter()
        .find(|s| s.reason() == r)
    }
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The condition to write, keeping `lastTransitionTime` when the status does not change
/// (the API convention: it marks status changes, not reason changes).
pub fn condition(
    state: GuardState,
    message: &str,
    now: DateTime<Utc>,
    previous: Option<&NodeCondition>,
) -> serde_json::Value {
    let transition = previous
        .filter(|p| p.status == state.status())
        .and_then(|p| p.last_transition_time.as_ref())
        .map(|t| t.0.to_string())
        .unwrap_or_else(|| rfc3339(now));
    json!({
        "type": CONDITION_TYPE,
        "status": state.status(),
        "reason": state.reason(),
        "message": message,
        "lastHeartbeatTime": rfc3339(now),
        "lastTransitionTime": transition,
    })
}

pub fn find(node: &Node) -> Option<&NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CONDITION_TYPE)
}

pub fn last_shutdown(node: &Node) -> Option<LastShutdown> {
    node.metadata
        .annotations
        .as_ref()?
        .get(LAST_SHUTDOWN_ANNOTATION)
        .and_then(|s| serde_json::from_str(s).ok())
}

/// Sets our condition through `nodes/status` (a strategic merge keyed by `type`, so the
/// kubelet's conditions are untouched).
pub async fn set(
    api: &Api<Node>,
    node: &str,
    state: GuardState,
    message: &str,
) -> Result<(), kube::Error> {
    // A plain GET: the agent's role has `get` on nodes, not on nodes/status.
    let current = api.get(node).await?;
    let c = condition(state, message, Utc::now(), find(&current));
    api.patch_status(
        node,
        &PatchParams::default(),
        &Patch::Strategic(json!({"status": {"conditions": [c]}})),
    )
    .await?;
    Ok(())
}

pub async fn record_shutdown(
    api: &Api<Node>,
    node: &str,
    last: &LastShutdown,
) -> Result<(), kube::Error> {
    let text = serde_json::to_string(last).unwrap_or_default();
    api.patch(
        node,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {LAST_SHUTDOWN_ANNOTATION: text}}})),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let t1 = t0 + chrono::Duration::seconds(30);
        let prev: NodeCondition = serde_json::from_value(json!({
            "type": CONDITION_TYPE,
            "status": "False",
            "reason": "Draining",
            "lastTransitionTime": rfc3339(t0),
        }))
        .unwrap();
        let drained = condition(GuardState::Drained, "m", t1, Some(&prev));
        assert_eq!(drained["lastTransitionTime"], "2026-01-01T00:00:00Z");
        assert_eq!(drained["reason"], "Drained");
        let ready = condition(GuardState::Ready, "m", t1, Some(&prev));
        assert_eq!(ready["status"], "True");
        assert_eq!(ready["lastTransitionTime"], "2026-01-01T00:00:30Z");
    }

    #[test]
    fn reasons_round_trip() {
        for s in [
            GuardState::Ready,
            GuardState::Draining,
            GuardState::Drained,
            GuardState::DeadlineReached,
            GuardState::LockLost,
        ] {
            assert_eq!(GuardState::from_reason(s.reason()), Some(s));
        }
    }
}
