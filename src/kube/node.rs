//! Cordon and uncordon with our boot-ID annotation, guarded by the Node's resourceVersion so an
//! administrator's concurrent change is never overwritten.

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::agent::machine::CordonResult;
use crate::bootid::CORDON_ANNOTATION;

/// Conflicts tolerated before giving up (each is another writer's update in between).
const CONFLICT_TRIES: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub uid: Option<String>,
    pub unschedulable: bool,
    pub our_annotation: Option<String>,
}

pub fn state(n: &Node) -> NodeState {
    NodeState {
        uid: n.metadata.uid.clone(),
        unschedulable: n
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
        our_annotation: n
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CORDON_ANNOTATION).cloned()),
    }
}

pub async fn get(api: &Api<Node>, name: &str) -> Result<NodeState, kube::Error> {
    Ok(state(&api.get(name).await?))
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Cordons the node unless it is unschedulable already, recording `boot_id` when we did.
pub async fn cordon(api: &Api<Node>, name: &str, boot_id: &str) -> CordonResult {
    for _ in 0..CONFLICT_TRIES {
        let node = match api.get(name).await {
            Ok(n) => n,
            Err(e) => return CordonResult::Failed(e.to_string()),
        };
        if state(&node).unschedulable {
            return CordonResult::AlreadyUnschedulable;
        }
        let patch = json!({
            "metadata": {
                "resourceVersion": node.metadata.resource_version,
                "annotations": { CORDON_ANNOTATION: boot_id },
            },
            "spec": { "unschedulable": true },
        });
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return CordonResult::CordonedByUs,
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return CordonResult::Failed(e.to_string()),
        }
    }
    CordonResult::Failed("the Node kept changing under the cordon".into())
}

/// Lifts our cordon, if the annotation still says it is ours; drops the annotation either way.
/// `also_uncordon = false` only removes a stale annotation.
pub async fn uncordon(
    api: &Api<Node>,
    name: &str,
    also_uncordon: bool,
) -> Result<bool, kube::Error> {
    for _ in 0..CONFLICT_TRIES {
        let node = api.get(name).await?;
        if state(&node).our_annotation.is_none() {
            return Ok(false);
        }
        let mut patch = json!({
            "metadata": {
                "resourceVersion": node.metadata.resource_version,
                "annotations": { CORDON_ANNOTATION: null },
            },
        });
        if also_uncordon {
            patch["spec"] = json!({ "unschedulable": null });
        }
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(also_uncordon),
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(kube::Error::Api(Box::new(
        kube::core::Status::failure("the Node kept changing under the uncordon", "Conflict")
            .with_code(409),
    )))
}
