//! virt-handler's node heartbeat (`pkg/virt-handler/heartbeat/heartbeat.go`, v1.5.0–v1.8.0):
//! on every node it runs on, virt-handler labels the Node `kubevirt.io/schedulable: "true"`
//! once its device plugins are up, with the annotation `kubevirt.io/heartbeat`. virt-launcher
//! pods select that label, so a node without it runs no VM.
//!
//! Here virt-handler runs on every node of the bed and its device plugins are up from the
//! start: each Node is labelled once (again if the label goes). Not modelled: the periodic
//! re-patch (every 1–2 min upstream), `false` when virt-handler stops or its device plugins
//! are not ready, and virt-controller's node controller setting `false` on a stale heartbeat.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::Ctx;

/// `v1.NodeSchedulable`.
pub const SCHEDULABLE_LABEL: &str = "kubevirt.io/schedulable";
/// `v1.VirtHandlerHeartbeat`.
pub const HEARTBEAT_ANNOTATION: &str = "kubevirt.io/heartbeat";

/// Whether virt-handler still has to mark `node`.
fn unmarked(node: &Node) -> bool {
    node.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SCHEDULABLE_LABEL))
        .map(String::as_str)
        != Some("true")
}

pub(crate) async fn run(ctx: Arc<Ctx>) {
    let api = Api::<Node>::all(ctx.client.clone());
    loop {
        for node in ctx.nodes.state().iter().filter(|n| unmarked(n)) {
            let Some(name) = node.metadata.name.as_deref() else {
                continue;
            };
            let patch = json!({"metadata": {
                "labels": {SCHEDULABLE_LABEL: "true"},
                "annotations": {HEARTBEAT_ANNOTATION: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)},
            }});
            if let Err(e) = api
                .patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                tracing::warn!(node = name, error = %e, "virt-handler heartbeat failed");
            }
        }
        ctx.changed(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_marked_until_it_carries_the_label() {
        let node = |labels: serde_json::Value| -> Node {
            serde_json::from_value(json!({"metadata": {"name": "node-1", "labels": labels}}))
                .unwrap()
        };
        assert!(unmarked(&node(json!({}))));
        assert!(unmarked(&node(json!({SCHEDULABLE_LABEL: "false"}))));
        assert!(!unmarked(&node(json!({SCHEDULABLE_LABEL: "true"}))));
    }
}
