//! KubeVirt's API as the drain reads it: the VMI resource, the cluster-wide eviction strategy
//! from the KubeVirt CR, and a node's VMIs and pods listed once (for `check`, `status` and a dry
//! run; the drain itself follows them with watches).

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams, Preconditions};
use kube::{Api, Client};

use super::{CALL_TIMEOUT, bounded};
use crate::drain::fate::ClusterStrategy;
use crate::drain::model::{MigrationJob, ObjKey, VMI_NODE_LABEL};

/// kubevirt.io/v1 VirtualMachineInstance, read as a dynamic object.
pub fn vmi_resource() -> ApiResource {
    ApiResource {
        group: "kubevirt.io".into(),
        version: "v1".into(),
        api_version: "kubevirt.io/v1".into(),
        kind: "VirtualMachineInstance".into(),
        plural: "virtualmachineinstances".into(),
    }
}

/// kubevirt.io/v1 VirtualMachineInstanceMigration.
pub fn vmim_resource() -> ApiResource {
    ApiResource {
        group: "kubevirt.io".into(),
        version: "v1".into(),
        api_version: "kubevirt.io/v1".into(),
        kind: "VirtualMachineInstanceMigration".into(),
        plural: "virtualmachineinstancemigrations".into(),
    }
}

fn kubevirt_cr_resource() -> ApiResource {
    ApiResource {
        group: "kubevirt.io".into(),
        version: "v1".into(),
        api_version: "kubevirt.io/v1".into(),
        kind: "KubeVirt".into(),
        plural: "kubevirts".into(),
    }
}

/// The KubeVirt CR's `spec.configuration.evictionStrategy`, or why KubeVirt's default applies.
pub async fn cluster_strategy(client: &Client) -> ClusterStrategy {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &kubevirt_cr_resource());
    match api.list(&ListParams::default()).await {
        Ok(list) => match list.items.first() {
            None => ClusterStrategy::NoCr("none exists".into()),
            Some(cr) => match cr
                .data
                .pointer("/spec/configuration/evictionStrategy")
                .and_then(|v| v.as_str())
            {
                Some(s) => ClusterStrategy::Configured(s.into()),
                None => ClusterStrategy::Unset,
            },
        },
        Err(kube::Error::Api(s)) if s.code == 404 => {
            ClusterStrategy::NoCr("the KubeVirt resource is not served".into())
        }
        Err(e) => ClusterStrategy::NoCr(format!("cannot list it: {e}")),
    }
}

/// The VMIs labelled with `node`.
pub async fn node_vmis(client: &Client, node: &str) -> Result<Vec<DynamicObject>, kube::Error> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &vmi_resource());
    let list = api
        .list(&ListParams::default().labels(&format!("{VMI_NODE_LABEL}={node}")))
        .await?;
    Ok(list.items)
}

/// The pods bound to `node`.
pub async fn node_pods(client: &Client, node: &str) -> Result<Vec<Pod>, kube::Error> {
    let api: Api<Pod> = Api::all(client.clone());
    let list = api
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await?;
    Ok(list.items)
}

pub async fn node(client: &Client, node: &str) -> Result<Node, kube::Error> {
    Api::<Node>::all(client.clone()).get(node).await
}

/// Aborts a migration by deleting its VirtualMachineInstanceMigration, as `virtctl
/// migrate-cancel` does: KubeVirt's migration controller then tears the target down and the VM
/// stays on its source. A migration already gone counts as done.
pub async fn cancel_migration(client: Client, ns: &str, job: &MigrationJob) -> Result<(), String> {
    let api: Api<DynamicObject> = Api::namespaced_with(client, ns, &vmim_resource());
    let name = match &job.name {
        Some(n) => n.clone(),
        None => {
            let list = bounded(api.list(&ListParams::default())).await?;
            match list
                .items
                .into_iter()
                .find(|m| m.metadata.uid.as_deref() == Some(job.uid.as_str()))
                .and_then(|m| m.metadata.name)
            {
                Some(n) => n,
                None => return Ok(()),
            }
        }
    };
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(job.uid.clone()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match tokio::time::timeout(CALL_TIMEOUT, api.delete(&name, &params)).await {
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(kube::Error::Api(s))) if s.code == 404 || s.code == 409 => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

/// Asks KubeVirt to stop evacuating a VMI off `node` (`PUT …/virtualmachineinstances/<name>/
/// evacuate/cancel` of virt-api's subresource group, KubeVirt ≥ 1.7). `Ok(false)` where KubeVirt
/// has no such subresource (older versions) or the VMI is gone.
///
/// virt-api patches the mark away only under a JSON-patch `test` that it still names the node
/// the body gives (`pkg/virt-api/rest/evacuate_cancel.go`): an empty body's `""` fails that test
/// with a 500 whenever there is something to cancel.
pub async fn cancel_evacuation(client: Client, vmi: &ObjKey, node: &str) -> Result<bool, String> {
    let url = format!(
        "/apis/subresources.kubevirt.io/v1/namespaces/{}/virtualmachineinstances/{}/evacuate/cancel",
        vmi.namespace, vmi.name
    );
    let req = http::Request::put(url)
        .header("content-type", "application/json")
        .body(
            serde_json::json!({ "evacuationNodeName": node })
                .to_string()
                .into_bytes(),
        )
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(CALL_TIMEOUT, client.request_text(req)).await {
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        Ok(Ok(_)) => Ok(true),
        Ok(Err(kube::Error::Api(s))) if s.code == 404 => Ok(false),
        Ok(Err(e)) => Err(e.to_string()),
    }
}
