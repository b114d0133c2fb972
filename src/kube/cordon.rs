//! The Node's cordon, marked as ours with an annotation, and every change to it guarded by the
//! Node's resourceVersion so an administrator's concurrent change is never overwritten.
//!
//! Two marks exist: the agent's records the boot ID (so the agent lifts it once the node is back
//! from the shutdown), the `drain` command's records when (a maintenance drain must survive the
//! agent's restart, so the agent never lifts it).

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use crate::drain::machine::CordonResult;

/// The agent's cordon: the boot ID of the boot in which it cordoned the node.
pub const AGENT_ANNOTATION: &str = "shutdown-guard.kubevirt.io/cordoned-boot-id";
/// A cordon set by `shutdown-guard drain` (value: when, RFC 3339).
pub const DRAIN_ANNOTATION: &str = "shutdown-guard.kubevirt.io/drain-cordoned-at";

/// Conflicts tolerated before giving up (each is another writer's update in between).
const CONFLICT_TRIES: usize = 5;
/// Each read and write of the Node gets this long; the caller retries.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn timed_out() -> kube::Error {
    kube::Error::Api(Box::new(
        kube::core::Status::failure(&format!("no answer within {CALL_TIMEOUT:?}"), "Timeout")
            .with_code(504),
    ))
}

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(timed_out()))
}

/// How a cordon is marked as ours: the annotation and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CordonMark {
    pub annotation: &'static str,
    pub value: String,
}

impl CordonMark {
    /// The agent's mark, lifted after the reboot.
    pub fn boot(boot_id: &str) -> Self {
        CordonMark {
            annotation: AGENT_ANNOTATION,
            value: boot_id.to_string(),
        }
    }

    /// The `drain` command's mark, lifted only by `shutdown-guard uncordon`.
    pub fn maintenance(at: &str) -> Self {
        CordonMark {
            annotation: DRAIN_ANNOTATION,
            value: at.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub uid: Option<String>,
    pub unschedulable: bool,
    /// The agent's annotation (boot ID), if present.
    pub our_annotation: Option<String>,
    pub drain_annotation: Option<String>,
}

pub fn state(n: &Node) -> NodeState {
    let ann = |k: &str| {
        n.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(k).cloned())
    };
    NodeState {
        uid: n.metadata.uid.clone(),
        unschedulable: n
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
        our_annotation: ann(AGENT_ANNOTATION),
        drain_annotation: ann(DRAIN_ANNOTATION),
    }
}

pub async fn get(api: &Api<Node>, name: &str) -> Result<NodeState, kube::Error> {
    Ok(state(&bounded(api.get(name)).await?))
}

/// What to do with the Node as read: stop with an answer, or apply a merge patch (guarded by
/// the resourceVersion read) and then answer.
pub enum Change<T> {
    Done(T),
    Patch(Value, T),
}

/// Reads the Node, asks `decide` what to change, and applies it guarded by the
/// resourceVersion it was decided on; a conflict (someone else's write in between) decides
/// again on a fresh read.
pub async fn update<T>(
    api: &Api<Node>,
    name: &str,
    decide: impl Fn(&Node) -> Change<T>,
) -> Result<T, kube::Error> {
    for _ in 0..CONFLICT_TRIES {
        let node = bounded(api.get(name)).await?;
        let (mut patch, answer) = match decide(&node) {
            Change::Done(t) => return Ok(t),
            Change::Patch(p, t) => (p, t),
        };
        patch["metadata"]["resourceVersion"] = json!(node.metadata.resource_version);
        match bounded(api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))).await {
            Ok(_) => return Ok(answer),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
    Err(kube::Error::Api(Box::new(
        kube::core::Status::failure("the Node kept changing under the update", "Conflict")
            .with_code(409),
    )))
}

/// Cordons the node unless it is unschedulable already, marking the cordon as ours.
pub async fn cordon(api: &Api<Node>, name: &str, mark: &CordonMark) -> CordonResult {
    let r = update(api, name, |node| {
        if state(node).unschedulable {
            return Change::Done(CordonResult::AlreadyUnschedulable);
        }
        Change::Patch(
            json!({
                "metadata": { "annotations": { mark.annotation: mark.value } },
                "spec": { "unschedulable": true },
            }),
            CordonResult::CordonedByUs,
        )
    })
    .await;
    r.unwrap_or_else(|e| CordonResult::Failed(e.to_string()))
}

/// Lifts our cordon if `annotation` still says it is ours, and drops the annotation either way.
/// `also_uncordon = false` only removes a stale annotation. Returns whether the node was
/// uncordoned.
pub async fn uncordon(
    api: &Api<Node>,
    name: &str,
    annotation: &'static str,
    also_uncordon: bool,
) -> Result<bool, kube::Error> {
    update(api, name, |node| {
        let ours = node
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(annotation));
        if !ours {
            return Change::Done(false);
        }
        let mut patch = json!({ "metadata": { "annotations": { annotation: null } } });
        if also_uncordon {
            patch["spec"] = json!({ "unschedulable": null });
        }
        Change::Patch(patch, also_uncordon)
    })
    .await
}
