//! KubeVirt's API as the drain reads it: the VMI resource, the cluster-wide eviction strategy
//! from the KubeVirt CR, and a node's VMIs and pods listed once (for `check`, `status` and a dry
//! run; the drain itself follows them with watches).

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::{Api, Client};

use crate::drain::fate::ClusterStrategy;
use crate::drain::model::VMI_NODE_LABEL;

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
