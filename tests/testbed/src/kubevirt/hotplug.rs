//! Hotplug attachment pods: a VMI with a hotplugged volume gets a `hp-volume-*` pod next to
//! its launcher pod, owned by it, labelled `kubevirt.io=hotplug-disk`
//! (`RenderHotplugAttachmentPodTemplate` in `pkg/virt-controller/services/template.go`, v1.8.0:
//! controller reference to the launcher pod, node affinity to its node, grace period 0). The
//! VMI controller creates one for the VMI's active launcher pod and removes those of pods that
//! are no longer active; the migration controller creates one for the target pod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

use super::admitter::APP_LABEL;
use super::crds::VirtualMachineInstance;

pub const HOTPLUG_APP: &str = "hotplug-disk";
pub const NAME_PREFIX: &str = "hp-volume-";

/// Whether the VMI's spec has a volume marked `hotpluggable`.
pub fn wants_attachment_pod(vmi: &VirtualMachineInstance) -> bool {
    vmi.spec
        .rest
        .get("volumes")
        .and_then(|v| v.as_array())
        .is_some_and(|vols| {
            vols.iter().any(|v| {
                ["persistentVolumeClaim", "dataVolume"]
                    .iter()
                    .any(|src| v[src]["hotpluggable"].as_bool() == Some(true))
            })
        })
}

/// Whether `pod` is a hotplug attachment pod (`isHotplugPod` in the eviction admitter:
/// the label and exactly one owner).
pub fn is_attachment_pod(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(APP_LABEL))
        .is_some_and(|v| v == HOTPLUG_APP)
        && pod.metadata.owner_references.as_ref().map(Vec::len) == Some(1)
}

/// The launcher pod that owns an attachment pod.
pub fn owner_pod(pod: &Pod) -> Option<(&str, &str)> {
    let owner = pod.metadata.owner_references.as_ref()?.first()?;
    Some((owner.name.as_str(), owner.uid.as_str()))
}

/// The attachment pod for `launcher` (placed on its node: the bed binds it directly instead
/// of leaving the affinity to kube-scheduler).
pub fn attachment_pod(launcher: &Pod, image: &str) -> Pod {
    let node = launcher
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let labels = BTreeMap::from([(APP_LABEL.to_owned(), HOTPLUG_APP.to_owned())]);
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": NAME_PREFIX,
            "namespace": launcher.metadata.namespace,
            "labels": labels,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod",
                                 "name": launcher.metadata.name, "uid": launcher.metadata.uid,
                                 "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": HOTPLUG_APP, "image": image,
                "command": ["/bin/sh", "-c", "/usr/bin/container-disk --copy-path /path/hp"],
                "resources": {"requests": {"cpu": "10m", "memory": "2M"}},
                "volumeMounts": [{"name": "hotplug-disks", "mountPath": "/path", "mountPropagation": "HostToContainer"}],
            }],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}},
            "volumes": [{"name": "hotplug-disks", "emptyDir": {}}],
        },
    }))
    .expect("attachment pod literal is valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubevirt::launcher::VmiTemplate;
    use crate::kubevirt::spec::VmiKind;

    #[test]
    fn attachment_pod_is_owned_by_the_launcher_and_on_its_node() {
        let mut t = VmiTemplate::new(VmiKind::Live, Some("node-1"));
        assert!(!wants_attachment_pod(&t.vmi("a", "default")));
        t.hotplug = true;
        let mut vmi = t.vmi("a", "default");
        assert!(wants_attachment_pod(&vmi));
        vmi.metadata.uid = Some("u".into());
        let mut launcher = crate::kubevirt::launcher::launcher_pod(&vmi, "node-1", None, "img");
        launcher.metadata.name = Some("virt-launcher-a-xyz".into());
        launcher.metadata.uid = Some("p".into());
        let pod = attachment_pod(&launcher, "img");
        assert!(is_attachment_pod(&pod));
        assert_eq!(owner_pod(&pod), Some(("virt-launcher-a-xyz", "p")));
        assert_eq!(pod.metadata.generate_name.as_deref(), Some("hp-volume-"));
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        assert_eq!(spec.termination_grace_period_seconds, Some(0));
    }
}
