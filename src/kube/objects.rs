//! API objects → the drain's model: the one place that knows where KubeVirt and Kubernetes keep
//! the fields the decisions read.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::api::DynamicObject;
use serde::Deserialize;

use crate::drain::fate::VmiFacts;
use crate::drain::model::{
    CREATED_BY_LABEL, DEFAULT_GRACE_SECONDS, DOMAIN_ANNOTATION, HOTPLUG_APP_VALUE,
    LAUNCHER_APP_LABEL, LAUNCHER_APP_VALUE, MIGRATION_JOB_ANNOTATION, MIGRATION_JOB_LABEL,
    MIRROR_ANNOTATION, MigrationJob, MigrationState, ObjKey, PodInfo, VMI_NODE_LABEL, VmiInfo,
};

/// A VirtualMachineInstance's fields, or `None` for an object without name, namespace or UID.
pub fn vmi_info(obj: &DynamicObject) -> Option<VmiInfo> {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct Status {
        phase: Option<String>,
        node_name: Option<String>,
        evacuation_node_name: Option<String>,
        migration_state: Option<RawMigration>,
        #[serde(default)]
        conditions: Vec<RawCondition>,
    }
    #[derive(Deserialize, Default)]
    struct RawCondition {
        #[serde(rename = "type", default)]
        type_: String,
        #[serde(default)]
        status: String,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct RawMigration {
        source_node: Option<String>,
        target_node: Option<String>,
        target_pod: Option<String>,
        #[serde(default)]
        completed: bool,
        #[serde(default)]
        failed: bool,
    }
    let meta = &obj.metadata;
    let status: Status = obj
        .data
        .get("status")
        .and_then(|s| serde_json::from_value(s.clone()).ok())
        .unwrap_or_default();
    Some(VmiInfo {
        uid: meta.uid.clone()?,
        key: ObjKey::new(meta.namespace.clone()?, meta.name.clone()?),
        phase: status.phase,
        node_name: status.node_name,
        label_node: meta
            .labels
            .as_ref()
            .and_then(|l| l.get(VMI_NODE_LABEL).cloned()),
        migration: status.migration_state.map(|m| MigrationState {
            source_node: m.source_node,
            target_node: m.target_node,
            target_pod: m.target_pod,
            completed: m.completed,
            failed: m.failed,
        }),
        evacuation_node: status.evacuation_node_name,
        live_migratable: status
            .conditions
            .iter()
            .find(|c| c.type_ == "LiveMigratable")
            .map(|c| c.status == "True"),
    })
}

/// A pod's fields, or `None` for an object without name, namespace or UID.
pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let meta = &pod.metadata;
    let empty = BTreeMap::new();
    let labels = meta.labels.as_ref().unwrap_or(&empty);
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    let spec = pod.spec.as_ref();
    let controller = meta
        .owner_references
        .as_ref()
        .and_then(|o| o.iter().find(|r| r.controller == Some(true)));
    Some(PodInfo {
        uid: meta.uid.clone()?,
        key: ObjKey::new(meta.namespace.clone()?, meta.name.clone()?),
        node_name: spec.and_then(|s| s.node_name.clone()),
        phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
        is_launcher: labels.get(LAUNCHER_APP_LABEL).map(String::as_str) == Some(LAUNCHER_APP_VALUE),
        created_by: labels.get(CREATED_BY_LABEL).cloned(),
        domain: annotations.get(DOMAIN_ANNOTATION).cloned(),
        controller_kind: controller.map(|r| r.kind.clone()),
        is_mirror: annotations.contains_key(MIRROR_ANNOTATION),
        grace_seconds: spec
            .and_then(|s| s.termination_grace_period_seconds)
            .map(|g| g.clamp(0, u32::MAX as i64) as u32)
            .unwrap_or(DEFAULT_GRACE_SECONDS),
        terminating: meta.deletion_timestamp.is_some(),
        migration_job: labels.get(MIGRATION_JOB_LABEL).map(|uid| MigrationJob {
            uid: uid.clone(),
            name: annotations.get(MIGRATION_JOB_ANNOTATION).cloned(),
        }),
        is_hotplug: labels.get(LAUNCHER_APP_LABEL).map(String::as_str) == Some(HOTPLUG_APP_VALUE),
        owner_pod: controller
            .filter(|r| r.kind == "Pod")
            .map(|r| r.uid.clone()),
    })
}

/// What KubeVirt's eviction admitter decides on: the VMI's own strategy and its
/// `LiveMigratable` condition.
pub fn vmi_facts(o: &DynamicObject) -> VmiFacts {
    let key = format!(
        "{}/{}",
        o.metadata.namespace.as_deref().unwrap_or(""),
        o.metadata.name.as_deref().unwrap_or("")
    );
    let strategy = o
        .data
        .pointer("/spec/evictionStrategy")
        .and_then(|v| v.as_str())
        .map(String::from);
    let live_migratable = o
        .data
        .pointer("/status/conditions")
        .and_then(|c| c.as_array())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("type").and_then(|t| t.as_str()) == Some("LiveMigratable"))
        })
        .map(|c| {
            (
                c.get("status").and_then(|s| s.as_str()) == Some("True"),
                c.get("reason")
                    .and_then(|s| s.as_str())
                    .map(String::from)
                    .or_else(|| c.get("message").and_then(|s| s.as_str()).map(String::from)),
            )
        });
    VmiFacts {
        key,
        strategy,
        live_migratable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmi_parsed_from_dynamic_object() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"name": "vm-a", "namespace": "ns", "uid": "u1",
                         "labels": {"kubevirt.io/nodeName": "node-1"}},
            "status": {"phase": "Running", "nodeName": "node-1",
                       "evacuationNodeName": "node-1",
                       "migrationState": {"sourceNode": "node-1", "targetNode": "node-2",
                                          "completed": true}}
        }))
        .unwrap();
        let v = vmi_info(&obj).unwrap();
        assert_eq!(v.key, ObjKey::new("ns", "vm-a"));
        assert_eq!(v.evacuation_node.as_deref(), Some("node-1"));
        assert!(!v.runs_on("node-1"));
        assert_eq!(v.live_migratable, None, "no condition yet: still booting");
        let mut booted = obj.clone();
        booted.data["status"]["conditions"] = serde_json::json!([{"type": "LiveMigratable", "status": "False", "reason": "DisksNotLiveMigratable"}]);
        assert_eq!(vmi_info(&booted).unwrap().live_migratable, Some(false));
    }

    #[test]
    fn target_and_hotplug_pods_are_recognised() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "virt-launcher-vm-a-t", "namespace": "ns", "uid": "p2",
                         "labels": {"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": "u1",
                                    "kubevirt.io/migrationJobUID": "m1"},
                         "annotations": {"kubevirt.io/migrationJobName": "vmim-a"}},
            "spec": {"nodeName": "node-1", "containers": []}
        }))
        .unwrap();
        let p = pod_info(&pod).unwrap();
        assert_eq!(
            p.migration_job,
            Some(MigrationJob {
                uid: "m1".into(),
                name: Some("vmim-a".into())
            })
        );
        let hp: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "hp-volume-x", "namespace": "ns", "uid": "p3",
                         "labels": {"kubevirt.io": "hotplug-disk"},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "virt-launcher-vm-a-x",
                                              "uid": "p1", "controller": true}]},
            "spec": {"nodeName": "node-1", "containers": []}
        }))
        .unwrap();
        let h = pod_info(&hp).unwrap();
        assert!(h.is_hotplug && !h.is_launcher);
        assert_eq!(h.owner_pod.as_deref(), Some("p1"));
    }

    #[test]
    fn pod_parsed_with_launcher_labels_and_grace() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "virt-launcher-vm-a-x", "namespace": "ns", "uid": "p1",
                         "labels": {"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": "u1"},
                         "annotations": {"kubevirt.io/domain": "vm-a"}},
            "spec": {"nodeName": "node-1", "terminationGracePeriodSeconds": 60, "containers": []},
            "status": {"phase": "Running"}
        }))
        .unwrap();
        let p = pod_info(&pod).unwrap();
        assert!(p.is_launcher);
        assert_eq!(p.created_by.as_deref(), Some("u1"));
        assert_eq!(p.domain.as_deref(), Some("vm-a"));
        assert_eq!(p.grace_seconds, 60);
    }
}
