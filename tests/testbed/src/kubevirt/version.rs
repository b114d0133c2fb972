//! The KubeVirt minor versions the simulator can play, and what changes between them for a node
//! drain. Each switch names the upstream file (kubevirt/kubevirt, at the tag given) it follows.

use std::fmt;
use std::str::FromStr;

/// A KubeVirt minor release. The default is the newest the bed models.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KubeVirtVersion {
    V1_5,
    V1_6,
    V1_7,
    #[default]
    V1_8,
}

/// The maturity of a feature gate in a release (`pkg/virt-config/featuregate/active.go`).
/// Alpha and beta gates are both off unless listed in the KubeVirt CR's
/// `spec.configuration.developerConfiguration.featureGates` (`isFeatureGateEnabled` in
/// `pkg/virt-config/feature-gates.go`, v1.8.0); GA gates are always on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateState {
    Alpha,
    Beta,
    Ga,
}

impl KubeVirtVersion {
    pub const ALL: [KubeVirtVersion; 4] = [Self::V1_5, Self::V1_6, Self::V1_7, Self::V1_8];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1_5 => "1.5",
            Self::V1_6 => "1.6",
            Self::V1_7 => "1.7",
            Self::V1_8 => "1.8",
        }
    }

    /// The image tag virt-controller puts on launcher pods and reports in
    /// `status.launcherContainerImageVersion`.
    pub fn launcher_image(self) -> &'static str {
        match self {
            Self::V1_5 => "quay.io/kubevirt/virt-launcher:v1.5.3",
            Self::V1_6 => "quay.io/kubevirt/virt-launcher:v1.6.6",
            Self::V1_7 => "quay.io/kubevirt/virt-launcher:v1.7.4",
            Self::V1_8 => "quay.io/kubevirt/virt-launcher:v1.8.4",
        }
    }

    /// One `PodDisruptionBudget` per protected VMI (`kubevirt-disruption-budget-*`, minAvailable
    /// 1, raised to 2 while it migrates): v1.5.0
    /// `pkg/virt-controller/watch/drain/disruptionbudget/disruptionbudget.go` and `expandPDB` in
    /// `pkg/virt-controller/watch/migration/migration.go`. From v1.6.0 the controller only
    /// deletes the PDBs it finds.
    pub fn per_vmi_pdbs(self) -> bool {
        self == Self::V1_5
    }

    /// v1.5.0 `pkg/virt-handler/vm.go` (`setMigrationProgressStatus`): the source virt-handler
    /// copies the domain's migration result, `completed` included, into the VMI while
    /// `status.nodeName` is still the source; the hand-over to the target comes in a later update
    /// by the source once the target has seen the domain. From v1.6.0 the target virt-handler
    /// hands over (`ackMigrationCompletion` in `pkg/virt-handler/migration-target.go`) and sets
    /// `completed` afterwards (`finalizeMigration`).
    pub fn source_completes_before_handover(self) -> bool {
        self == Self::V1_5
    }

    /// `PUT …/virtualmachineinstances/{name}/evacuate/cancel` (and the same on
    /// virtualmachines) in `subresources.kubevirt.io/v1`: routed in `pkg/virt-api/api.go` from
    /// v1.7.0 (`pkg/virt-api/rest/evacuate_cancel.go`); absent in v1.5 and v1.6.
    pub fn evacuate_cancel(self) -> bool {
        self >= Self::V1_7
    }

    /// `MigrationPriorityQueue` (`pkg/virt-config/featuregate/active.go`): alpha in v1.7.0, beta
    /// in v1.8.0 (GA in v1.9.0, out of the bed's range); unknown before.
    pub fn priority_queue_gate(self) -> Option<GateState> {
        match self {
            Self::V1_5 | Self::V1_6 => None,
            Self::V1_7 => Some(GateState::Alpha),
            Self::V1_8 => Some(GateState::Beta),
        }
    }

    /// `spec.addedNodeSelector` on `VirtualMachineInstanceMigration`
    /// (`staging/src/kubevirt.io/api/core/v1/types.go`): from v1.6.0.
    pub fn added_node_selector(self) -> bool {
        self >= Self::V1_6
    }

    /// The second eviction webhook, `hotplug-pod-eviction-interceptor.kubevirt.io`, that refuses
    /// to evict a hotplug attachment pod while its VMI exists: v1.7.0
    /// `pkg/virt-operator/resource/generate/components/webhooks.go` and `admitHotplugPod` in
    /// `pod-eviction-admitter.go`.
    pub fn hotplug_eviction_webhook(self) -> bool {
        self >= Self::V1_7
    }
}

impl fmt::Display for KubeVirtVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown KubeVirt version {0:?}: the bed plays 1.5, 1.6, 1.7 or 1.8")]
pub struct UnknownVersion(pub String);

impl FromStr for KubeVirtVersion {
    type Err = UnknownVersion;

    /// Accepts `1.8`, `v1.8` and a patch release such as `v1.8.2`.
    fn from_str(s: &str) -> Result<Self, UnknownVersion> {
        let trimmed = s.trim().trim_start_matches('v');
        let minor: String = trimmed.split('.').take(2).collect::<Vec<_>>().join(".");
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == minor)
            .ok_or_else(|| UnknownVersion(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minor_and_patch_releases() {
        assert_eq!("1.5".parse(), Ok(KubeVirtVersion::V1_5));
        assert_eq!("v1.6".parse(), Ok(KubeVirtVersion::V1_6));
        assert_eq!("v1.7.3".parse(), Ok(KubeVirtVersion::V1_7));
        assert_eq!(KubeVirtVersion::default(), KubeVirtVersion::V1_8);
        let err = "1.9".parse::<KubeVirtVersion>().unwrap_err();
        assert!(err.to_string().contains("1.5, 1.6, 1.7 or 1.8"), "{err}");
    }

    #[test]
    fn differences_follow_the_releases() {
        use KubeVirtVersion::*;
        assert!(V1_5.per_vmi_pdbs() && !V1_6.per_vmi_pdbs());
        assert!(V1_5.source_completes_before_handover());
        assert!(!V1_6.source_completes_before_handover());
        assert!(!V1_6.evacuate_cancel() && V1_7.evacuate_cancel());
        assert_eq!(V1_6.priority_queue_gate(), None);
        assert_eq!(V1_7.priority_queue_gate(), Some(GateState::Alpha));
        assert_eq!(V1_8.priority_queue_gate(), Some(GateState::Beta));
        assert!(!V1_5.added_node_selector() && V1_6.added_node_selector());
    }
}
