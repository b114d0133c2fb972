//! The few fields of pods and VirtualMachineInstances a drain decides on. The adapters in
//! [`crate::kube::objects`] read them out of the API objects once, so every decision here stays
//! pure and is tested with plain builders.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

/// KubeVirt's label and annotation names (`staging/src/kubevirt.io/api/core/v1/types.go`).
pub const LAUNCHER_APP_LABEL: &str = "kubevirt.io";
pub const LAUNCHER_APP_VALUE: &str = "virt-launcher";
pub const CREATED_BY_LABEL: &str = "kubevirt.io/created-by";
pub const DOMAIN_ANNOTATION: &str = "kubevirt.io/domain";
pub const VMI_NODE_LABEL: &str = "kubevirt.io/nodeName";
/// On a migration's target launcher pod: the VirtualMachineInstanceMigration's UID and name.
pub const MIGRATION_JOB_LABEL: &str = "kubevirt.io/migrationJobUID";
pub const MIGRATION_JOB_ANNOTATION: &str = "kubevirt.io/migrationJobName";
/// `kubevirt.io=hotplug-disk`: a hotplugged volume's attachment pod, owned by the launcher pod.
pub const HOTPLUG_APP_VALUE: &str = "hotplug-disk";
/// The kubelet marks static pods' API mirrors with this annotation.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// Kubernetes' default `terminationGracePeriodSeconds`.
pub const DEFAULT_GRACE_SECONDS: u32 = 30;

/// A shutdown logind has scheduled (`shutdown -r +10`, unattended-upgrades'
/// `Automatic-Reboot-Time`): its type (`reboot`, `poweroff`, …) and when it is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub kind: String,
    pub at: SystemTime,
}

impl Schedule {
    /// Whether it will take the node down: logind's `dry-*` types (`shutdown --dry-run`) only
    /// pretend.
    pub fn takes_node_down(&self) -> bool {
        !self.kind.starts_with("dry-")
    }
}

/// Which pods a drain evicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// Only virt-launcher pods (`kubectl drain --pod-selector=kubevirt.io=virt-launcher`).
    #[default]
    Vms,
    /// Every pod but DaemonSet and mirror pods, VMs first
    /// (`kubectl drain --ignore-daemonsets --delete-emptydir-data --force`).
    All,
}

impl Scope {
    pub const ALLOWED: &'static str = "one of: vms, all";

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Vms => "vms",
            Scope::All => "all",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vms" => Ok(Scope::Vms),
            "all" => Ok(Scope::All),
            _ => Err(Scope::ALLOWED.to_string()),
        }
    }
}

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
    /// The `LiveMigratable` condition; `None` while virt-handler has not reported it (a VMI
    /// still booting).
    pub live_migratable: Option<bool>,
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
    /// A migration target pod: the migration's UID and name.
    pub migration_job: Option<MigrationJob>,
    /// A hotplugged volume's attachment pod.
    pub is_hotplug: bool,
    /// UID of the controlling owner when it is a Pod (a hotplug pod's launcher).
    pub owner_pod: Option<String>,
}

/// The migration a target launcher pod was created for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MigrationJob {
    pub uid: String,
    pub name: Option<String>,
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
            live_migratable: Some(true),
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
            migration_job: None,
            is_hotplug: false,
            owner_pod: None,
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
            migration_job: None,
            is_hotplug: false,
            owner_pod: None,
        }
    }

    pub fn owned_by(mut p: PodInfo, kind: &str) -> PodInfo {
        p.controller_kind = Some(kind.into());
        p
    }

    /// The target pod on `node` of a migration of `vmi` (which runs elsewhere) into it.
    pub fn target_pod(vmi: &VmiInfo, node: &str) -> PodInfo {
        let mut p = launcher(vmi, node);
        p.uid = format!("uid-target-{}", vmi.key.name);
        p.key.name = format!("virt-launcher-{}-target", vmi.key.name);
        p.migration_job = Some(MigrationJob {
            uid: format!("uid-vmim-{}", vmi.key.name),
            name: Some(format!("vmim-{}", vmi.key.name)),
        });
        p
    }

    /// A hotplug attachment pod of `launcher`.
    pub fn hotplug(launcher: &PodInfo) -> PodInfo {
        let mut p = pod(
            &format!("hp-volume-{}", launcher.key.name),
            launcher.node_name.as_deref().unwrap_or(""),
        );
        p.is_hotplug = true;
        p.controller_kind = Some("Pod".into());
        p.owner_pod = Some(launcher.uid.clone());
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
}
