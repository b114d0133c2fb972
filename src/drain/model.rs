//! The few fields of pods and VirtualMachineInstances a drain decides on, read out of the API
//! objects once so the decisions stay pure and testable with plain builders.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::Pod;
use kube::api::DynamicObject;
use serde::Deserialize;

/// KubeVirt's label and annotation names (`staging/src/kubevirt.io/api/core/v1/types.go`).
pub const LAUNCHER_APP_LABEL: &str = "kubevirt.io";
pub const LAUNCHER_APP_VALUE: &str = "virt-launcher";
pub const CREATED_BY_LABEL: &str = "kubevirt.io/created-by";
pub const DOMAIN_ANNOTATION: &str = "kubevirt.io/domain";
pub const VMI_NODE_LABEL: &str = "kubevirt.io/nodeName";
/// The kubelet marks static pods' API mirrors with this annotation.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// Kubernetes' default `terminationGracePeriodSeconds`.
pub const DEFAULT_GRACE_SECONDS: u32 = 30;

/// `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A pod as named in eviction and delete calls; the UID guards against acting on a namesake.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    pub key: ObjKey,
    pub uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationState {
    pub source_node: Option<String>,
    pub target_node: Option<String>,
    pub target_pod: Option<String>,
    pub completed: bool,
    pub failed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmiInfo {
    pub uid: String,
    pub key: ObjKey,
    pub phase: Option<String>,
    /// `status.nodeName`.
    pub node_name: Option<String>,
    /// The `kubevirt.io/nodeName` label.
    pub label_node: Option<String>,
    pub migration: Option<MigrationState>,
    pub evacuation_node: Option<String>,
}

impl VmiInfo {
    pub fn is_finished(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded") | Some("Failed"))
    }

    /// Whether this VMI still runs on `node`. A completed migration to another node counts as
    /// gone even before KubeVirt has rewritten `status.nodeName` and the label.
    pub fn runs_on(&self, node: &str) -> bool {
        if self.is_finished() {
            return false;
        }
        if let Some(m) = &self.migration
            && m.completed
            && !m.failed
            && m.target_node.as_deref().is_some_and(|t| t != node)
        {
            return false;
        }
        match self.node_name.as_deref().filter(|n| !n.is_empty()) {
            Some(n) => n == node,
            None => self.label_node.as_deref() == Some(node),
        }
    }

    pub fn from_dynamic(obj: &DynamicObject) -> Option<Self> {
        #[derive(Deserialize, Default)]
        #[serde(rename_all = "camelCase")]
        struct Status {
            phase: Option<String>,
            node_name: Option<String>,
            evacuation_node_name: Option<String>,
            migration_state: Option<RawMigration>,
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
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub key: ObjKey,
    pub node_name: Option<String>,
    pub phase: Option<String>,
    pub is_launcher: bool,
    /// UID of the VMI a virt-launcher pod runs (`kubevirt.io/created-by`).
    pub created_by: Option<String>,
    /// Name of the VMI a virt-launcher pod runs (`kubevirt.io/domain`).
    pub domain: Option<String>,
    /// Kind of the controlling owner (`DaemonSet`, `ReplicaSet`, …).
    pub controller_kind: Option<String>,
    pub is_mirror: bool,
    pub grace_seconds: u32,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
}

impl PodInfo {
    pub fn pod_ref(&self) -> PodRef {
        PodRef {
            key: self.key.clone(),
            uid: self.uid.clone(),
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded") | Some("Failed"))
    }

    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let empty = BTreeMap::new();
        let labels = meta.labels.as_ref().unwrap_or(&empty);
        let annotations = meta.annotations.as_ref().unwrap_or(&empty);
        let spec = pod.spec.as_ref();
        Some(PodInfo {
            uid: meta.uid.clone()?,
            key: ObjKey::new(meta.namespace.clone()?, meta.name.clone()?),
            node_name: spec.and_then(|s| s.node_name.clone()),
            phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
            is_launcher: labels.get(LAUNCHER_APP_LABEL).map(String::as_str)
                == Some(LAUNCHER_APP_VALUE),
            created_by: labels.get(CREATED_BY_LABEL).cloned(),
            domain: annotations.get(DOMAIN_ANNOTATION).cloned(),
            controller_kind: meta.owner_references.as_ref().and_then(|o| {
                o.iter()
                    .find(|r| r.controller == Some(true))
                    .map(|r| r.kind.clone())
            }),
            is_mirror: annotations.contains_key(MIRROR_ANNOTATION),
            grace_seconds: spec
                .and_then(|s| s.termination_grace_period_seconds)
                .map(|g| g.clamp(0, u32::MAX as i64) as u32)
                .unwrap_or(DEFAULT_GRACE_SECONDS),
            terminating: meta.deletion_timestamp.is_some(),
        })
    }
}

/// Builders for tests across the crate.
#[cfg(test)]
pub mod fixtures {
    use super::*;

    pub fn vmi(name: &str, node: &str) -> VmiInfo {
        VmiInfo {
            uid: format!("uid-vmi-{name}"),
            key: ObjKey::new("default", name),
            phase: Some("Running".into()),
            node_name: Some(node.into()),
            label_node: Some(node.into()),
            migration: None,
            evacuation_node: None,
        }
    }

    pub fn launcher(vmi: &VmiInfo, node: &str) -> PodInfo {
        PodInfo {
            uid: format!("uid-pod-{}", vmi.key.name),
            key: ObjKey::new(
                &vmi.key.namespace,
                format!("virt-launcher-{}-abcde", vmi.key.name),
            ),
            node_name: Some(node.into()),
            phase: Some("Running".into()),
            is_launcher: true,
            created_by: Some(vmi.uid.clone()),
            domain: Some(vmi.key.name.clone()),
            controller_kind: None,
            is_mirror: false,
            grace_seconds: 60,
            terminating: false,
        }
    }

    pub fn pod(name: &str, node: &str) -> PodInfo {
        PodInfo {
            uid: format!("uid-pod-{name}"),
            key: ObjKey::new("default", name),
            node_name: Some(node.into()),
            phase: Some("Running".into()),
            is_launcher: false,
            created_by: None,
            domain: None,
            controller_kind: None,
            is_mirror: false,
            grace_seconds: 30,
            terminating: false,
        }
    }

    pub fn owned_by(mut p: PodInfo, kind: &str) -> PodInfo {
        p.controller_kind = Some(kind.into());
        p
    }

    pub fn migrated(mut v: VmiInfo, to: &str) -> VmiInfo {
        v.migration = Some(MigrationState {
            source_node: v.node_name.clone(),
            target_node: Some(to.into()),
            target_pod: Some(format!("virt-launcher-{}-target", v.key.name)),
            completed: true,
            failed: false,
        });
        v
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn vmi_leaves_node_by_migration_or_stop() {
        let v = vmi("a", "node-1");
        assert!(v.runs_on("node-1"));
        assert!(!v.runs_on("node-2"));

        let moved = migrated(v.clone(), "node-2");
        assert!(
            !moved.runs_on("node-1"),
            "completed migration counts as gone"
        );

        let mut failed = moved.clone();
        failed.migration.as_mut().unwrap().failed = true;
        assert!(
            failed.runs_on("node-1"),
            "a failed migration leaves it here"
        );

        let mut stopped = v.clone();
        stopped.phase = Some("Succeeded".into());
        assert!(!stopped.runs_on("node-1"));

        let mut scheduling = v.clone();
        scheduling.node_name = None;
        scheduling.phase = Some("Scheduled".into());
        assert!(scheduling.runs_on("node-1"), "label names the node");
    }

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
        let v = VmiInfo::from_dynamic(&obj).unwrap();
        assert_eq!(v.key, ObjKey::new("ns", "vm-a"));
        assert_eq!(v.evacuation_node.as_deref(), Some("node-1"));
        assert!(!v.runs_on("node-1"));
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
        let p = PodInfo::from_pod(&pod).unwrap();
        assert!(p.is_launcher);
        assert_eq!(p.created_by.as_deref(), Some("u1"));
        assert_eq!(p.domain.as_deref(), Some("vm-a"));
        assert_eq!(p.grace_seconds, 60);
    }
}
