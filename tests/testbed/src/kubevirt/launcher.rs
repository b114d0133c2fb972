//! VMIs, VMs and their virt-launcher pods, shaped as virt-controller renders them
//! (`pkg/virt-controller/services/template.go`, `podLabels`, `RenderLaunchManifest`,
//! `RenderMigrationManifest`; the VM's template as `SetupVMIFromVM` in
//! `pkg/virt-controller/watch/vm/vm.go` copies it).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use super::admitter::{APP_LABEL, DOMAIN_ANNOTATION};
use super::config::format_quantity;
use super::crds::{
    VirtualMachine, VirtualMachineInstance, VirtualMachineInstanceSpec, VirtualMachineSpec,
};
use super::spec::{RunStrategy, VmGroup, VmiKind};

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
/// Where the bed's VMI controller starts a VMI the first time: it stands in for kube-scheduler's
/// choice, which the bed does not run for launcher pods. A `nodeSelector` would do the same but
/// also bind every migration target, as it does upstream.
pub const INITIAL_NODE_ANNOTATION: &str = "testbed.shutdown-guard.io/initial-node";
/// Seconds (decimal) the VMI boots, from Scheduled to Running with its `LiveMigratable`
/// condition; absent: the simulator's default.
pub const BOOT_SECONDS_ANNOTATION: &str = "testbed.shutdown-guard.io/boot-seconds";
pub const KIND_LABEL: &str = "testbed.shutdown-guard.io/kind";
/// Upstream's default guest memory in the bed when the SPEC names none.
pub const DEFAULT_MEMORY: u64 = 128 << 20;
/// Upstream's default `terminationGracePeriodSeconds` for VMIs.
pub const DEFAULT_VMI_GRACE_SECONDS: i64 = 30;
/// virt-controller pads the launcher's grace period (`gracePeriodPaddingSeconds`).
pub const LAUNCHER_GRACE_PADDING_SECONDS: i64 = 30;

/// What a VMI of the SPEC looks like, apart from its name.
#[derive(Clone, Debug, PartialEq)]
pub struct VmiTemplate {
    pub kind: VmiKind,
    /// Where it starts ([`INITIAL_NODE_ANNOTATION`]); `None`: the least loaded schedulable node.
    pub node: Option<String>,
    pub memory: Option<u64>,
    pub hotplug: bool,
    pub boot: Option<Duration>,
}

impl VmiTemplate {
    pub fn new(kind: VmiKind, node: Option<&str>) -> Self {
        Self {
            kind,
            node: node.map(str::to_owned),
            memory: None,
            hotplug: false,
            boot: None,
        }
    }

    /// The template of a SPEC group, starting on the group's node or `default_node`.
    pub fn of_group(group: &VmGroup, default_node: &str) -> Self {
        Self {
            kind: group.kind,
            node: Some(
                group
                    .node
                    .clone()
                    .unwrap_or_else(|| default_node.to_owned()),
            ),
            memory: group.memory,
            hotplug: group.hotplug,
            boot: group.boot,
        }
    }

    fn metadata(&self) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        let labels = BTreeMap::from([(KIND_LABEL.to_owned(), self.kind.key().to_owned())]);
        let mut annotations = BTreeMap::from([(
            LIVE_MIGRATABLE_ANNOTATION.to_owned(),
            self.kind.migratable().to_string(),
        )]);
        if let Some(node) = &self.node {
            annotations.insert(INITIAL_NODE_ANNOTATION.into(), node.clone());
        }
        if let Some(boot) = self.boot {
            annotations.insert(
                BOOT_SECONDS_ANNOTATION.into(),
                boot.as_secs_f64().to_string(),
            );
        }
        (labels, annotations)
    }

    fn spec(&self, name: &str) -> VirtualMachineInstanceSpec {
        let memory = format_quantity(self.memory.unwrap_or(DEFAULT_MEMORY));
        let mut disks = vec![json!({"name": "containerdisk", "disk": {"bus": "virtio"}})];
        let mut volumes = vec![json!({"name": "containerdisk",
                                      "containerDisk": {"image": "quay.io/containerdisks/fedora:latest"}})];
        if self.hotplug {
            // A hotplugged PVC, as `virtctl addvolume` leaves it in the spec.
            disks.push(json!({"name": "hotplug-disk", "disk": {"bus": "scsi"}}));
            volumes.push(json!({"name": "hotplug-disk",
                                "persistentVolumeClaim": {"claimName": format!("{name}-hotplug"), "hotpluggable": true}}));
        }
        VirtualMachineInstanceSpec {
            eviction_strategy: Some(self.kind.strategy().as_str().to_owned()),
            termination_grace_period_seconds: Some(DEFAULT_VMI_GRACE_SECONDS),
            node_selector: None,
            rest: BTreeMap::from([
                (
                    "domain".to_owned(),
                    json!({"devices": {"disks": disks}, "resources": {"requests": {"memory": memory}}}),
                ),
                ("volumes".to_owned(), Value::Array(volumes)),
            ]),
        }
    }

    pub fn vmi(&self, name: &str, namespace: &str) -> VirtualMachineInstance {
        let mut vmi = VirtualMachineInstance::new(name, self.spec(name));
        let (labels, annotations) = self.metadata();
        vmi.metadata.namespace = Some(namespace.to_owned());
        vmi.metadata.labels = Some(labels);
        vmi.metadata.annotations = Some(annotations);
        vmi
    }

    /// A VirtualMachine whose VMIs look like [`VmiTemplate::vmi`].
    pub fn vm(&self, name: &str, namespace: &str, strategy: RunStrategy) -> VirtualMachine {
        let (labels, annotations) = self.metadata();
        let mut vm = VirtualMachine::new(
            name,
            VirtualMachineSpec {
                run_strategy: Some(strategy.as_str().to_owned()),
                running: None,
                template: json!({"metadata": {"labels": labels, "annotations": annotations},
                                 "spec": self.spec(name)}),
                rest: BTreeMap::new(),
            },
        );
        vm.metadata.namespace = Some(namespace.to_owned());
        vm
    }
}

/// A VMI of `kind` that starts on `node`.
pub fn vmi_object(
    name: &str,
    namespace: &str,
    node: &str,
    kind: VmiKind,
) -> VirtualMachineInstance {
    VmiTemplate::new(kind, Some(node)).vmi(name, namespace)
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
    image: &str,
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
                "name": "compute", "image": image,
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
    fn launcher_pod_has_upstream_shape() {
        let mut vmi = vmi_object("live-1", "default", "node-1", VmiKind::Live);
        vmi.metadata.uid = Some("u-1".into());
        let pod = launcher_pod(&vmi, "node-1", None, "img");
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

        let target = launcher_pod(
            &vmi,
            "node-2",
            Some(("m-uid", "kubevirt-evacuation-abc")),
            "img",
        );
        assert_eq!(
            target.metadata.labels.unwrap()[MIGRATION_JOB_LABEL],
            "m-uid"
        );
    }
}
