//! The updates that move a migrated VMI from its source to its target node, release by release.
//! The VMI has no status subresource, so each is one update of labels and status together.
//!
//! - v1.5.0 (`pkg/virt-handler/vm.go`): the source virt-handler first copies the domain's
//!   migration result into the VMI (`endTimestamp`, `completed: true`) while `status.nodeName`
//!   is still the source; the target virt-handler then records that it sees the domain
//!   (`targetNodeDomainDetected`, `targetNodeDomainReadyTimestamp`); the source then hands over
//!   in one update: the `kubevirt.io/nodeName` label, `status.nodeName` and
//!   `evacuationNodeName` cleared.
//! - v1.6.0–v1.8.0 (`pkg/virt-handler/migration-target.go`): the target virt-handler hands over
//!   in one update (`ackMigrationCompletion`: end time, label, `status.nodeName`,
//!   `evacuationNodeName` cleared, with the domain detected) and sets `completed` in a later one
//!   (`finalizeMigration`).
//!
//! None of them touches `status.activePods`: the VMI controller keeps that from the pods
//! (`setActivePods`, see [`super::lifecycle`]).
//!
//! Both end with the target's clean-up removing `kubevirt.io/migrationTargetNodeName`
//! (`finalCleanup`). The bed waits a configurable gap after the first write.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::launcher::{MIGRATION_TARGET_NODE_LABEL, NODE_NAME_LABEL};
use super::version::KubeVirtVersion;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// v1.5 source: the migration ended and completed, the VMI still on the source.
    SourceCompleted,
    /// v1.5 target: the migrated domain is seen.
    TargetDetected,
    /// v1.5 source: ownership moves to the target.
    SourceHandover,
    /// v1.6+ target: ownership moves to the target, not yet `completed`.
    TargetAck,
    /// v1.6+ target: `completed`.
    TargetFinalized,
    /// The target's clean-up of the migration label.
    TargetCleanup,
}

/// The writes in order; the bed pauses for the configured gap after the first.
pub fn sequence(version: KubeVirtVersion) -> &'static [Write] {
    if version.source_completes_before_handover() {
        &[
            Write::SourceCompleted,
            Write::TargetDetected,
            Write::SourceHandover,
            Write::TargetCleanup,
        ]
    } else {
        &[
            Write::TargetAck,
            Write::TargetFinalized,
            Write::TargetCleanup,
        ]
    }
}

/// What the hand-over writes need to know.
pub struct Moved<'a> {
    pub target_node: &'a str,
    /// The VMI's `migrationState` for this migration so far.
    pub state: &'a Value,
}

/// The merge patch of one write.
pub fn patch(write: Write, moved: &Moved<'_>, now: DateTime<Utc>) -> Value {
    let owner = || {
        json!({
            "metadata": {"labels": {NODE_NAME_LABEL: moved.target_node}},
            "status": {
                "nodeName": moved.target_node,
                "evacuationNodeName": null,
                "migrationTransport": "Unix",
                "launcherContainerImageVersion": null,
            },
        })
    };
    let mut state = moved.state.clone();
    match write {
        Write::SourceCompleted => {
            state["endTimestamp"] = json!(now);
            state["completed"] = json!(true);
            json!({"status": {"migrationState": state}})
        }
        Write::TargetDetected => json!({"status": {"migrationState": {
            "targetNodeDomainDetected": true, "targetNodeDomainReadyTimestamp": now}}}),
        Write::SourceHandover => {
            let mut p = owner();
            p["status"]["migrationState"] = json!({"completed": true});
            p
        }
        Write::TargetAck => {
            let mut p = owner();
            state["endTimestamp"] = json!(now);
            state["targetNodeDomainDetected"] = json!(true);
            state["targetNodeDomainReadyTimestamp"] = json!(now);
            p["status"]["migrationState"] = state;
            p
        }
        Write::TargetFinalized => json!({"status": {"migrationState": {"completed": true}}}),
        Write::TargetCleanup => {
            json!({"metadata": {"labels": {MIGRATION_TARGET_NODE_LABEL: null}}})
        }
    }
}

/// Whether this write makes the migration `completed` (the migration controller then reports
/// the VMIM Succeeded, `processMigrationPhase`).
pub fn completes(write: Write) -> bool {
    matches!(
        write,
        Write::SourceCompleted | Write::SourceHandover | Write::TargetFinalized
    )
}

/// Whether this write moves the VMI to the target node.
pub fn moves(write: Write) -> bool {
    matches!(write, Write::SourceHandover | Write::TargetAck)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moved(state: &Value) -> Moved<'_> {
        Moved {
            target_node: "node-2",
            state,
        }
    }

    #[test]
    fn one_update_moves_label_and_node_name_together() {
        let state = json!({"migrationUid": "m", "completed": false});
        for v in KubeVirtVersion::ALL {
            let movers: Vec<Write> = sequence(v).iter().copied().filter(|w| moves(*w)).collect();
            assert_eq!(movers.len(), 1, "{v}");
            let p = patch(movers[0], &moved(&state), Utc::now());
            assert_eq!(p["metadata"]["labels"][NODE_NAME_LABEL], "node-2", "{v}");
            assert_eq!(p["status"]["nodeName"], "node-2", "{v}");
            assert!(p["status"]["evacuationNodeName"].is_null(), "{v}");
            assert!(
                p["status"]
                    .as_object()
                    .unwrap()
                    .contains_key("evacuationNodeName"),
                "cleared explicitly"
            );
        }
    }

    #[test]
    fn v1_5_completes_before_the_handover_and_later_releases_after() {
        let state = json!({"migrationUid": "m", "completed": false});
        let s = sequence(KubeVirtVersion::V1_5);
        assert_eq!(s[0], Write::SourceCompleted);
        let first = patch(s[0], &moved(&state), Utc::now());
        assert_eq!(first["status"]["migrationState"]["completed"], true);
        assert!(
            first["status"].get("nodeName").is_none(),
            "still on the source"
        );
        assert!(first.get("metadata").is_none());

        let s = sequence(KubeVirtVersion::V1_8);
        assert!(moves(s[0]) && !completes(s[0]));
        let ack = patch(s[0], &moved(&state), Utc::now());
        assert_eq!(ack["status"]["migrationState"]["completed"], false);
        assert!(completes(s[1]));
    }
}
