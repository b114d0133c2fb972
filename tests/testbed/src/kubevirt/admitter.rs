//! The pod-eviction admitter's decision, as pure functions.
//!
//! Follows `pkg/virt-api/webhooks/validating-webhook/admitters/pod-eviction-admitter.go`
//! (kubevirt/kubevirt): which pods it looks at, the eviction strategy lookup of
//! `pkg/util/migrations` (`VMIEvictionStrategy`: the VMI's, else the cluster's, whose default is
//! `None` per `pkg/virt-config/configuration.go`), the order of the checks and the messages, which
//! callers such as the descheduler parse. Every denial is HTTP 429. A VMI without the
//! `LiveMigratable` condition (still booting) counts as not migratable (`IsMigratable` looks for
//! the condition with status True).

use k8s_openapi::api::core::v1::Pod;

use super::crds::VirtualMachineInstance;

pub const APP_LABEL: &str = "kubevirt.io";
pub const DOMAIN_ANNOTATION: &str = "kubevirt.io/domain";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictionStrategy {
    None,
    LiveMigrate,
    LiveMigrateIfPossible,
    External,
}

impl EvictionStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "None",
            Self::LiveMigrate => "LiveMigrate",
            Self::LiveMigrateIfPossible => "LiveMigrateIfPossible",
            Self::External => "External",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "None" => Self::None,
            "LiveMigrate" => Self::LiveMigrate,
            "LiveMigrateIfPossible" => Self::LiveMigrateIfPossible,
            "External" => Self::External,
            _ => return None,
        })
    }
}

/// The strategy in force for a VMI: its own, else the cluster-wide one.
pub fn vmi_eviction_strategy(
    vmi: &VirtualMachineInstance,
    cluster: Option<EvictionStrategy>,
) -> Option<EvictionStrategy> {
    match vmi.spec.eviction_strategy.as_deref() {
        Some(s) => EvictionStrategy::parse(s),
        None => cluster,
    }
}

/// `VMIMigratableOnEviction`: whether the evacuation controller should migrate this VMI.
/// External is left to the external controller.
pub fn migratable_on_eviction(
    vmi: &VirtualMachineInstance,
    cluster: Option<EvictionStrategy>,
) -> bool {
    match vmi_eviction_strategy(vmi, cluster) {
        Some(EvictionStrategy::LiveMigrate) => true,
        Some(EvictionStrategy::LiveMigrateIfPossible) => vmi.is_migratable(),
        _ => false,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    Allow,
    /// Deny with HTTP 429 and this message.
    Deny(String),
    /// Patch `/status/evacuationNodeName` to `node` (dry-run if the request is), then deny
    /// with `message`; if the patch fails deny with [`mark_failed_message`] instead.
    MarkAndDeny {
        node: String,
        message: String,
    },
}

/// The VMI a pod's eviction is about, if the admitter cares: running virt-launcher pods
/// (`kubevirt.io=virt-launcher`, not Succeeded/Failed) naming their VMI in `kubevirt.io/domain`.
pub fn launcher_vmi_name(pod: &Pod) -> Option<&str> {
    let is_launcher = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(APP_LABEL))
        .is_some_and(|v| v == "virt-launcher");
    let completed = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    );
    if !is_launcher || completed {
        return None;
    }
    pod.metadata
        .annotations
        .as_ref()?
        .get(DOMAIN_ANNOTATION)
        .map(String::as_str)
}

/// The answer when the VMI named by the launcher pod cannot be read (not found included).
pub fn vmi_lookup_failed_message(error: &str) -> String {
    format!("kubevirt failed getting the vmi: {error}")
}

/// `admitHotplugPod`'s refusal (v1.7+).
pub fn hotplug_denied_message(pod: &str, vmi: &str, namespace: &str) -> String {
    format!(
        "cannot evict hotplug pod: {pod} associated with running vmi: {vmi} in namespace {namespace}"
    )
}

pub fn mark_failed_message(error: &str) -> String {
    format!("kubevirt failed marking the vmi for eviction: {error}")
}

/// Decides the eviction of a virt-launcher pod on `pod_node` whose VMI is `vmi`.
pub fn decide(
    pod_node: &str,
    vmi: &VirtualMachineInstance,
    cluster: Option<EvictionStrategy>,
) -> Admission {
    let name = vmi.metadata.name.as_deref().unwrap_or_default();
    let namespace = vmi.metadata.namespace.as_deref().unwrap_or_default();
    let Some(strategy) = vmi_eviction_strategy(vmi, cluster) else {
        return Admission::Allow;
    };
    let mark = match strategy {
        EvictionStrategy::LiveMigrate => {
            if !vmi.is_migratable() {
                return Admission::Deny(format!(
                    "VMI {name} is configured with an eviction strategy but is not live-migratable"
                ));
            }
            true
        }
        EvictionStrategy::LiveMigrateIfPossible => vmi.is_migratable(),
        EvictionStrategy::External => true,
        EvictionStrategy::None => false,
    };
    if !mark {
        return Admission::Allow;
    }
    let triggered = format!("Eviction triggered evacuation of VMI \"{namespace}/{name}\"");
    if vmi.evacuation_node_name().is_some() {
        return Admission::Deny(format!("Evacuation in progress: {triggered}"));
    }
    if vmi.node_name() != Some(pod_node) {
        return Admission::Deny("Eviction request for target Pod".into());
    }
    Admission::MarkAndDeny {
        node: pod_node.to_owned(),
        message: triggered,
    }
}

/// Dry run if the AdmissionReview says so or the Eviction's deleteOptions ask for `All`.
pub fn is_dry_run(request: &serde_json::Value) -> bool {
    request["dryRun"].as_bool().unwrap_or(false)
        || request["object"]["deleteOptions"]["dryRun"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|v| v.as_str())
            == Some("All")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vmi(
        strategy: Option<&str>,
        migratable: bool,
        node: &str,
        evac: Option<&str>,
    ) -> VirtualMachineInstance {
        serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "vm-a", "namespace": "ns"},
            "spec": {"evictionStrategy": strategy},
            "status": {"phase": "Running", "nodeName": node, "evacuationNodeName": evac,
                       "conditions": [{"type": "LiveMigratable",
                                       "status": if migratable { "True" } else { "False" }}]},
        }))
        .unwrap()
    }

    fn pod(labels: serde_json::Value, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "virt-launcher-vm-a-abcde", "labels": labels,
                         "annotations": {"kubevirt.io/domain": "vm-a"}},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn only_running_launcher_pods_are_judged() {
        let launcher = json!({"kubevirt.io": "virt-launcher"});
        assert_eq!(
            launcher_vmi_name(&pod(launcher.clone(), "Running")),
            Some("vm-a")
        );
        assert_eq!(launcher_vmi_name(&pod(launcher.clone(), "Succeeded")), None);
        assert_eq!(launcher_vmi_name(&pod(launcher, "Failed")), None);
        assert_eq!(
            launcher_vmi_name(&pod(json!({"app": "x"}), "Running")),
            None
        );
    }

    #[test]
    fn none_and_unset_strategies_allow() {
        assert_eq!(
            decide("node-1", &vmi(Some("None"), true, "node-1", None), None),
            Admission::Allow
        );
        assert_eq!(
            decide(
                "node-1",
                &vmi(None, true, "node-1", None),
                Some(EvictionStrategy::None)
            ),
            Admission::Allow
        );
        assert_eq!(
            decide("node-1", &vmi(None, true, "node-1", None), None),
            Admission::Allow
        );
    }

    #[test]
    fn cluster_strategy_applies_when_vmi_has_none() {
        let d = decide(
            "node-1",
            &vmi(None, true, "node-1", None),
            Some(EvictionStrategy::LiveMigrate),
        );
        assert!(matches!(d, Admission::MarkAndDeny { .. }));
    }

    #[test]
    fn a_booting_vmi_without_the_condition_is_not_migratable() {
        let mut booting = vmi(Some("LiveMigrate"), true, "node-1", None);
        booting.status.as_mut().unwrap().conditions.clear();
        booting.status.as_mut().unwrap().phase = Some("Scheduled".into());
        assert_eq!(
            decide("node-1", &booting, None),
            Admission::Deny(
                "VMI vm-a is configured with an eviction strategy but is not live-migratable"
                    .into()
            )
        );
    }

    #[test]
    fn live_migrate_not_migratable_is_denied_forever() {
        let d = decide(
            "node-1",
            &vmi(Some("LiveMigrate"), false, "node-1", None),
            None,
        );
        assert_eq!(
            d,
            Admission::Deny(
                "VMI vm-a is configured with an eviction strategy but is not live-migratable"
                    .into()
            )
        );
    }

    #[test]
    fn migratable_strategies_mark_then_report_progress() {
        for s in ["LiveMigrate", "LiveMigrateIfPossible", "External"] {
            assert_eq!(
                decide("node-1", &vmi(Some(s), true, "node-1", None), None),
                Admission::MarkAndDeny {
                    node: "node-1".into(),
                    message: "Eviction triggered evacuation of VMI \"ns/vm-a\"".into()
                },
                "{s}"
            );
            assert_eq!(
                decide(
                    "node-1",
                    &vmi(Some(s), true, "node-1", Some("node-1")),
                    None
                ),
                Admission::Deny(
                    "Evacuation in progress: Eviction triggered evacuation of VMI \"ns/vm-a\""
                        .into()
                )
            );
        }
    }

    #[test]
    fn external_marks_even_when_not_migratable() {
        assert!(matches!(
            decide(
                "node-1",
                &vmi(Some("External"), false, "node-1", None),
                None
            ),
            Admission::MarkAndDeny { .. }
        ));
    }

    #[test]
    fn if_possible_not_migratable_allows() {
        assert_eq!(
            decide(
                "node-1",
                &vmi(Some("LiveMigrateIfPossible"), false, "node-1", None),
                None
            ),
            Admission::Allow
        );
    }

    #[test]
    fn target_pod_is_protected() {
        assert_eq!(
            decide(
                "node-2",
                &vmi(Some("LiveMigrate"), true, "node-1", None),
                None
            ),
            Admission::Deny("Eviction request for target Pod".into())
        );
    }

    #[test]
    fn dry_run_from_review_or_delete_options() {
        assert!(is_dry_run(&json!({"dryRun": true})));
        assert!(is_dry_run(
            &json!({"dryRun": false, "object": {"deleteOptions": {"dryRun": ["All"]}}})
        ));
        assert!(!is_dry_run(&json!({"dryRun": false, "object": {}})));
    }
}
