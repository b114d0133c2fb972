//! The two KubeVirt resources the bed needs, as CRDs, and typed views of the fields the
//! simulators read. Field names follow `staging/src/kubevirt.io/api/core/v1/types.go` in
//! kubevirt/kubevirt; everything else is kept as untyped JSON so objects round-trip.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, CustomResource};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::KubeVirtError;

pub const GROUP: &str = "kubevirt.io";
pub const VMI_CRD: &str = "virtualmachineinstances.kubevirt.io";
pub const VMIM_CRD: &str = "virtualmachineinstancemigrations.kubevirt.io";
pub const VM_CRD: &str = "virtualmachines.kubevirt.io";
pub const KUBEVIRT_CRD: &str = "kubevirts.kubevirt.io";

/// `VirtualMachineInstance` (`kubevirt.io/v1`). Only the fields the simulators use are typed.
#[derive(CustomResource, Clone, Debug, Default, Serialize, Deserialize)]
#[kube(
    group = "kubevirt.io",
    version = "v1",
    kind = "VirtualMachineInstance",
    namespaced,
    status = "VmiStatus",
    schema = "disabled",
    shortname = "vmi",
    plural = "virtualmachineinstances"
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineInstanceSpec {
    /// `None`, `LiveMigrate`, `LiveMigrateIfPossible` or `External`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eviction_strategy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmiStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evacuation_node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<VmiCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_state: Option<MigrationState>,
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmiCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `VirtualMachineInstanceMigrationState`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timestamp: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_timestamp: Option<DateTime<Utc>>,
    #[serde(default)]
    pub completed: bool,
    #[serde(default)]
    pub failed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_uid: Option<String>,
    /// `Succeeded` once the source aborted the migration on request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_status: Option<String>,
    #[serde(default)]
    pub abort_requested: bool,
    #[serde(default)]
    pub target_node_domain_detected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node_domain_ready_timestamp: Option<DateTime<Utc>>,
}

/// `VirtualMachineInstanceMigration` (`kubevirt.io/v1`).
#[derive(CustomResource, Clone, Debug, Default, Serialize, Deserialize)]
#[kube(
    group = "kubevirt.io",
    version = "v1",
    kind = "VirtualMachineInstanceMigration",
    namespaced,
    status = "VmimStatus",
    schema = "disabled",
    shortname = "vmim",
    plural = "virtualmachineinstancemigrations"
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineInstanceMigrationSpec {
    pub vmi_name: String,
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmimStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phase_transition_timestamps: Vec<PhaseTransition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_state: Option<MigrationState>,
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTransition {
    pub phase: String,
    pub phase_transition_timestamp: DateTime<Utc>,
}

impl VirtualMachineInstance {
    pub fn status_or_default(&self) -> VmiStatus {
        self.status.clone().unwrap_or_default()
    }

    pub fn phase(&self) -> &str {
        self.status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("")
    }

    pub fn node_name(&self) -> Option<&str> {
        self.status.as_ref()?.node_name.as_deref()
    }

    pub fn evacuation_node_name(&self) -> Option<&str> {
        self.status
            .as_ref()?
            .evacuation_node_name
            .as_deref()
            .filter(|n| !n.is_empty())
    }

    /// The guest memory in bytes (`spec.domain.memory.guest`, else the memory request).
    pub fn memory_bytes(&self) -> Option<u64> {
        let domain = self.spec.rest.get("domain")?;
        let q = domain["memory"]["guest"]
            .as_str()
            .or(domain["resources"]["requests"]["memory"].as_str())?;
        super::config::parse_quantity(q).ok()
    }

    pub fn migration_state(&self) -> Option<&MigrationState> {
        self.status.as_ref()?.migration_state.as_ref()
    }

    /// The `kubevirt.io/nodeName` label.
    pub fn node_label(&self) -> Option<&str> {
        self.metadata
            .labels
            .as_ref()?
            .get(super::launcher::NODE_NAME_LABEL)
            .map(String::as_str)
    }

    /// The `LiveMigratable` condition, if virt-handler has set it.
    pub fn live_migratable_condition(&self) -> Option<&VmiCondition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "LiveMigratable")
    }

    /// Condition `LiveMigratable` is True (`IsMigratable` in the API types).
    pub fn is_migratable(&self) -> bool {
        self.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "LiveMigratable" && c.status == "True")
        })
    }

    /// Succeeded or Failed (`IsFinal`).
    pub fn is_final(&self) -> bool {
        matches!(self.phase(), "Succeeded" | "Failed")
    }

    /// A migration has started and not ended (`IsMigrating` in `pkg/util/migrations`).
    pub fn is_migrating(&self) -> bool {
        self.status
            .as_ref()
            .and_then(|s| s.migration_state.as_ref())
            .is_some_and(|m| m.start_timestamp.is_some() && m.end_timestamp.is_none())
    }
}

impl VirtualMachineInstanceMigration {
    pub fn phase(&self) -> &str {
        self.status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("")
    }

    pub fn is_final(&self) -> bool {
        matches!(self.phase(), "Succeeded" | "Failed")
    }

    pub fn transition_time(&self, phase: &str) -> Option<DateTime<Utc>> {
        self.status
            .as_ref()?
            .phase_transition_timestamps
            .iter()
            .find(|t| t.phase == phase)
            .map(|t| t.phase_transition_timestamp)
    }
}

/// `VirtualMachine` (`kubevirt.io/v1`).
#[derive(CustomResource, Clone, Debug, Default, Serialize, Deserialize)]
#[kube(
    group = "kubevirt.io",
    version = "v1",
    kind = "VirtualMachine",
    namespaced,
    status = "VmStatus",
    schema = "disabled",
    shortname = "vm",
    plural = "virtualmachines"
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSpec {
    /// `Always`, `RerunOnFailure`, `Manual`, `Halted` (and `Once`, `WaitAsReceiver`, which the
    /// bed does not model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_strategy: Option<String>,
    /// The deprecated boolean form: true = Always, false = Halted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<bool>,
    /// `{metadata, spec}` of the VMIs the VM starts.
    #[serde(default)]
    pub template: Value,
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub printable_status: Option<String>,
    #[serde(default)]
    pub created: bool,
    #[serde(default)]
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_strategy: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state_change_requests: Vec<StateChangeRequest>,
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

/// `VirtualMachineStateChangeRequest`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StateChangeRequest {
    /// `Start` or `Stop`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

fn crd(kind: &str, plural: &str, short: &str, columns: Value, status: bool) -> Value {
    let subresources = if status {
        json!({"status": {}})
    } else {
        json!({})
    };
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{GROUP}"), "labels": {"app.kubernetes.io/component": "kubevirt"}},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind, "listKind": format!("{kind}List"), "plural": plural,
                "singular": kind.to_lowercase(), "shortNames": [short], "categories": ["all"],
            },
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "subresources": subresources,
                "additionalPrinterColumns": columns,
            }],
        },
    })
}

/// The CRD manifests as upstream's (`pkg/virt-operator/resource/generate/components/crds.go`,
/// v1.8.0): printer columns, short names, and a status subresource on VMIMs, VMs and the
/// KubeVirt CR but not on VMIs (`NewVirtualMachineInstanceCrd` adds none), so whoever writes a
/// VMI's status writes its labels in the same update.
pub fn crd_manifests() -> Vec<Value> {
    let age = json!({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"});
    vec![
        crd(
            "VirtualMachineInstance",
            "virtualmachineinstances",
            "vmi",
            json!([
                age,
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "IP", "type": "string", "jsonPath": ".status.interfaces[0].ipAddress"},
                {"name": "NodeName", "type": "string", "jsonPath": ".status.nodeName"},
                {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type=='Ready')].status"},
                {"name": "Live-Migratable", "type": "string", "priority": 1,
                 "jsonPath": ".status.conditions[?(@.type=='LiveMigratable')].status"},
            ]),
            false,
        ),
        crd(
            "VirtualMachineInstanceMigration",
            "virtualmachineinstancemigrations",
            "vmim",
            json!([
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "VMI", "type": "string", "jsonPath": ".spec.vmiName"},
                age,
            ]),
            true,
        ),
        crd(
            "VirtualMachine",
            "virtualmachines",
            "vm",
            json!([
                age,
                {"name": "Status", "type": "string", "description": "Human Readable Status",
                 "jsonPath": ".status.printableStatus"},
                {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type=='Ready')].status"},
            ]),
            true,
        ),
        crd(
            "KubeVirt",
            "kubevirts",
            "kv",
            json!([age, {"name": "Phase", "type": "string", "jsonPath": ".status.phase"}]),
            true,
        ),
    ]
}

/// Installs (server-side apply) both CRDs and waits until they are Established.
pub async fn install_crds(client: &Client) -> Result<(), KubeVirtError> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let params = PatchParams::apply("testbed-kubevirt").force();
    for manifest in crd_manifests() {
        let name = manifest["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        api.patch(&name, &params, &Patch::Apply(&manifest))
            .await
            .map_err(super::api_err(format!("installing CRD {name}")))?;
    }
    for name in [VMI_CRD, VMIM_CRD, VM_CRD, KUBEVIRT_CRD] {
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(api.clone(), name, conditions::is_crd_established()),
        )
        .await
        .map_err(|_| KubeVirtError::Timeout(format!("CRD {name} to be Established")))?
        .map_err(|e| KubeVirtError::Wait(e.to_string()))?;
    }
    // Discovery lags Established by a moment; a list proves the resource is served.
    for _ in 0..100 {
        let vmis = Api::<VirtualMachineInstance>::all(client.clone())
            .list(&Default::default())
            .await;
        let vmims = Api::<VirtualMachineInstanceMigration>::all(client.clone())
            .list(&Default::default())
            .await;
        let vms = Api::<VirtualMachine>::all(client.clone())
            .list(&Default::default())
            .await;
        let kvs = Api::<super::config::KubeVirt>::all(client.clone())
            .list(&Default::default())
            .await;
        if vmis.is_ok() && vmims.is_ok() && vms.is_ok() && kvs.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(KubeVirtError::Timeout(
        "KubeVirt resources to be served".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmi_round_trips_unknown_fields() {
        let vmi: VirtualMachineInstance = serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "a", "namespace": "default"},
            "spec": {"evictionStrategy": "LiveMigrate", "domain": {"devices": {}}},
            "status": {"phase": "Running", "nodeName": "node-1", "evacuationNodeName": "node-1",
                       "conditions": [{"type": "LiveMigratable", "status": "True"}],
                       "migrationState": {"startTimestamp": "2026-01-01T00:00:00Z", "completed": false}},
        }))
        .unwrap();
        assert!(vmi.is_migratable());
        assert!(vmi.is_migrating());
        assert_eq!(vmi.evacuation_node_name(), Some("node-1"));
        let back = serde_json::to_value(&vmi).unwrap();
        assert_eq!(back["spec"]["domain"], json!({"devices": {}}));
    }

    #[test]
    fn only_vmis_lack_a_status_subresource() {
        let m = crd_manifests();
        assert_eq!(m[0]["spec"]["names"]["shortNames"], json!(["vmi"]));
        assert_eq!(m[1]["spec"]["names"]["shortNames"], json!(["vmim"]));
        assert_eq!(m[0]["spec"]["versions"][0]["subresources"], json!({}));
        for crd in &m[1..] {
            assert_eq!(
                crd["spec"]["versions"][0]["subresources"],
                json!({"status": {}}),
                "{}",
                crd["metadata"]["name"]
            );
        }
    }
}
