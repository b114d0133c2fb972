//! VMIs and their virt-launcher pods, shaped as virt-controller renders them
//! (`pkg/virt-controller/services/template.go`, `podLabels`, `RenderLaunchManifest`,
//! `RenderMigrationManifest`), and the `--vms` SPEC (`live=3,none=1,…`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

use super::admitter::{APP_LABEL, DOMAIN_ANNOTATION, EvictionStrategy};
use super::crds::{VirtualMachineInstance, VirtualMachineInstanceSpec};

pub const CREATED_BY_LABEL: &str = "kubevirt.io/created-by";
pub const VM_NAME_LABEL: &str = "vm.kubevirt.io/name";
pub const NODE_NAME_LABEL: &str = "kubevirt.io/nodeName";
pub const MIGRATION_TARGET_NODE_LABEL: &str = "kubevirt.io/migrationTargetNodeName";
/// Marks a migration target pod (`MigrationJobLabel`).
pub const MIGRATION_JOB_LABEL: &str = "kubevirt.io/migrationJobUID";
pub const MIGRATION_JOB_NAME_ANNOTATION: &str = "kubevirt.io/migrationJobName";
/// Whether the bed reports the VMI `LiveMigratable`: "false" stands for what makes real VMIs
/// non-migratable (e.g. a ReadWriteOnce PVC disk). Default true.
pub const LIVE_MIGRATABLE_ANNOTATION: &str = "testbed.shutdown-guard.io/live-migratable";
/// Upstream's default `terminationGracePeriodSeconds` for VMIs.
pub const DEFAULT_VMI_GRACE_SECONDS: i64 = 30;
/// virt-controller pads the launcher's grace period (`gracePeriodPaddingSeconds`).
pub const LAUNCHER_GRACE_PADDING_SECONDS: i64 = 30;
const LAUNCHER_IMAGE: &str = "quay.io/kubevirt/virt-launcher:v1.8.0";

/// The kinds of VMI the SPEC can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VmiKind {
    /// LiveMigrate, migratable.
    Live,
    /// Eviction strategy None: stops on eviction.
    None,
    /// LiveMigrate but not migratable: its eviction is refused forever.
    Stuck,
    /// LiveMigrateIfPossible, migratable.
    IfPossible,
    /// External: marked for evacuation, left to an external controller.
    External,
}

impl VmiKind {
    pub const ALL: [VmiKind; 5] = [
        Self::Live,
        Self::None,
        Self::Stuck,
        Self::IfPossible,
        Self::External,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::None => "none",
            Self::Stuck => "stuck",
            Self::IfPossible => "ifpossible",
            Self::External => "external",
        }
    }

    pub fn strategy(self) -> EvictionStrategy {
        match self {
            Self::Live | Self::Stuck => EvictionStrategy::LiveMigrate,
            Self::None => EvictionStrategy::None,
            Self::IfPossible => EvictionStrategy::LiveMigrateIfPossible,
            Self::External => EvictionStrategy::External,
        }
    }

    pub fn migratable(self) -> bool {
        self != Self::Stuck
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("VM spec entry {0:?} is not KIND=COUNT (e.g. live=3,none=1)")]
    Syntax(String),
    #[error("unknown VM kind {0:?}; known kinds: live, none, stuck, ifpossible, external")]
    UnknownKind(String),
    #[error("count {count:?} for {kind} is not a non-negative integer")]
    Count { kind: String, count: String },
    #[error("VM kind {0} is listed twice")]
    Duplicate(String),
}

/// How many VMIs of each kind: `live=3,none=1,stuck=1,ifpossible=1,external=1`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmSpec {
    pub counts: BTreeMap<VmiKind, u32>,
}

impl VmSpec {
    pub fn total(&self) -> u32 {
        self.counts.values().sum()
    }

    /// `(kind, name)` for every VMI, named `<kind>-<n>` counting from 1.
    pub fn names(&self) -> Vec<(VmiKind, String)> {
        self.counts
            .iter()
            .flat_map(|(kind, count)| {
                (1..=*count).map(move |i| (*kind, format!("{}-{i}", kind.key())))
            })
            .collect()
    }
}

impl FromStr for VmSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let mut counts = BTreeMap::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (kind, count) = entry
                .split_once('=')
                .ok_or_else(|| SpecError::Syntax(entry.to_owned()))?;
            let (kind, count) = (kind.trim(), count.trim());
            let parsed = VmiKind::ALL
                .into_iter()
                .find(|k| k.key().eq_ignore_ascii_case(kind))
                .ok_or_else(|| SpecError::UnknownKind(kind.to_owned()))?;
            let n = count.parse::<u32>().map_err(|_| SpecError::Count {
                kind: kind.to_owned(),
                count: count.to_owned(),
            })?;
            if counts.insert(parsed, n).is_some() {
                return Err(SpecError::Duplicate(kind.to_owned()));
            }
        }
        Ok(Self { counts })
    }
}

impl fmt::Display for VmSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .counts
            .iter()
            .map(|(k, n)| format!("{}={n}", k.key()))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// A VMI pinned to `node` (by `nodeSelector`, which the bed's VMI controller honours).
pub fn vmi_object(
    name: &str,
    namespace: &str,
    node: &str,
    kind: VmiKind,
) -> VirtualMachineInstance {
    let mut vmi = VirtualMachineInstance::new(
        name,
        VirtualMachineInstanceSpec {
            eviction_strategy: Some(kind.strategy().as_str().to_owned()),
            termination_grace_period_seconds: Some(DEFAULT_VMI_GRACE_SECONDS),
            node_selector: Some(BTreeMap::from([(
                "kubernetes.io/hostname".to_owned(),
                node.to_owned(),
            )])),
            rest: BTreeMap::from([(
                "domain".to_owned(),
                json!({"devices": {"disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}}]},
                       "resources": {"requests": {"memory": "128Mi"}}}),
            )]),
        },
    );
    vmi.metadata.namespace = Some(namespace.to_owned());
    vmi.metadata.labels = Some(BTreeMap::from([(
        "testbed.shutdown-guard.io/kind".to_owned(),
        kind.key().to_owned(),
    )]));
    vmi.metadata.annotations = Some(BTreeMap::from([(
        LIVE_MIGRATABLE_ANNOTATION.to_owned(),
        kind.migratable().to_string(),
    )]));
    vmi
}

/// The launcher pod's grace period: the VMI's plus virt-controller's padding.
pub fn launcher_grace_seconds(vmi: &VirtualMachineInstance) -> i64 {
    vmi.spec
        .termination_grace_period_seconds
        .unwrap_or(DEFAULT_VMI_GRACE_SECONDS)
        + LAUNCHER_GRACE_PADDING_SECONDS
}

/// The virt-launcher pod for `vmi` on `node`. `migration` = `(uid, name)` of the migration
/// when this is a migration target pod.
pub fn launcher_pod(
    vmi: &VirtualMachineInstance,
    node: &str,
    migration: Option<(&str, &str)>,
) -> Pod {
    let name = vmi.metadata.name.clone().unwrap_or_default();
    let uid = vmi.metadata.uid.clone().unwrap_or_default();
    let mut labels: BTreeMap<String, String> = vmi
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != NODE_NAME_LABEL && k != MIGRATION_TARGET_NODE_LABEL)
        .collect();
    labels.insert(APP_LABEL.into(), "virt-launcher".into());
    labels.insert(CREATED_BY_LABEL.into(), uid.clone());
    labels.insert(VM_NAME_LABEL.into(), name.clone());
    let mut annotations = BTreeMap::from([
        (DOMAIN_ANNOTATION.to_owned(), name.clone()),
        (
            "kubectl.kubernetes.io/default-container".to_owned(),
            "compute".to_owned(),
        ),
    ]);
    if let Some((job_uid, job_name)) = migration {
        labels.insert(MIGRATION_JOB_LABEL.into(), job_uid.to_owned());
        annotations.insert(MIGRATION_JOB_NAME_ANNOTATION.into(), job_name.to_owned());
    }
    let empty_dirs = [
        "private",
        "public",
        "sockets",
        "virt-bin-share-dir",
        "libvirt-runtime",
        "ephemeral-disks",
        "container-disks",
        "hotplug-disks",
    ];
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": format!("virt-launcher-{name}-"),
            "namespace": vmi.metadata.namespace,
            "labels": labels, "annotations": annotations,
            "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                                 "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "nodeName": node,
            "hostname": name,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": launcher_grace_seconds(vmi),
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "containers": [{
                "name": "compute", "image": LAUNCHER_IMAGE,
                "command": ["/usr/bin/virt-launcher-monitor", "--qemu-timeout", "5m", "--name", name,
                            "--uid", uid, "--namespace", vmi.metadata.namespace, "--kubevirt-share-dir",
                            "/var/run/kubevirt", "--ephemeral-disk-dir", "/var/run/kubevirt-ephemeral-disks",
                            "--container-disk-dir", "/var/run/kubevirt/container-disks",
                            "--grace-period-seconds", (launcher_grace_seconds(vmi) - LAUNCHER_GRACE_PADDING_SECONDS + 15).to_string(),
                            "--hook-sidecars", "0"],
                "resources": {"requests": {"cpu": "100m", "memory": "300Mi"}},
                "volumeMounts": empty_dirs.iter().map(|v| json!({"name": v, "mountPath": format!("/var/run/kubevirt-{v}")})).collect::<Vec<_>>(),
            }],
            "volumes": empty_dirs.iter().map(|v| json!({"name": v, "emptyDir": {}})).collect::<Vec<_>>(),
        },
    }))
    .expect("launcher pod literal is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_counts_and_names() {
        let spec: VmSpec = "live=3,none=1,stuck=1,ifpossible=1,external=1"
            .parse()
            .unwrap();
        assert_eq!(spec.total(), 7);
        assert_eq!(spec.counts[&VmiKind::Live], 3);
        let names: Vec<String> = spec.names().into_iter().map(|(_, n)| n).collect();
        assert_eq!(names[..3], ["live-1", "live-2", "live-3"]);
        assert_eq!(
            spec.to_string(),
            "live=3,none=1,stuck=1,ifpossible=1,external=1"
        );
        assert_eq!("".parse::<VmSpec>().unwrap().total(), 0);
    }

    #[test]
    fn spec_errors_are_clear() {
        assert_eq!(
            "live3".parse::<VmSpec>(),
            Err(SpecError::Syntax("live3".into()))
        );
        assert_eq!(
            "fast=1".parse::<VmSpec>(),
            Err(SpecError::UnknownKind("fast".into()))
        );
        assert!(matches!(
            "live=x".parse::<VmSpec>(),
            Err(SpecError::Count { .. })
        ));
        assert!(matches!(
            "live=-1".parse::<VmSpec>(),
            Err(SpecError::Count { .. })
        ));
        assert_eq!(
            "live=1,live=2".parse::<VmSpec>(),
            Err(SpecError::Duplicate("live".into()))
        );
        assert!(
            SpecError::UnknownKind("fast".into())
                .to_string()
                .contains("live, none, stuck, ifpossible, external")
        );
    }

    #[test]
    fn launcher_pod_has_upstream_shape() {
        let mut vmi = vmi_object("live-1", "default", "node-1", VmiKind::Live);
        vmi.metadata.uid = Some("u-1".into());
        let pod = launcher_pod(&vmi, "node-1", None);
        let labels = pod.metadata.labels.clone().unwrap();
        assert_eq!(labels["kubevirt.io"], "virt-launcher");
        assert_eq!(labels["kubevirt.io/created-by"], "u-1");
        assert_eq!(labels["vm.kubevirt.io/name"], "live-1");
        assert_eq!(
            pod.metadata.annotations.clone().unwrap()["kubevirt.io/domain"],
            "live-1"
        );
        let spec = pod.spec.unwrap();
        assert_eq!(spec.termination_grace_period_seconds, Some(60));
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        assert!(spec.volumes.unwrap().iter().all(|v| v.empty_dir.is_some()));
        assert_eq!(
            pod.metadata.owner_references.unwrap()[0].controller,
            Some(true)
        );

        let target = launcher_pod(&vmi, "node-2", Some(("m-uid", "kubevirt-evacuation-abc")));
        assert_eq!(
            target.metadata.labels.unwrap()[MIGRATION_JOB_LABEL],
            "m-uid"
        );
    }
}
