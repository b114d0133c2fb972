//! `shutdown-guard uncordon`: lifts a cordon shutdown-guard set (the agent's or `drain`'s) and
//! drops its annotations; someone else's cordon only with `--force`.

use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use serde_json::json;

use crate::kube::cordon::{self, AGENT_ANNOTATION, Change, DRAIN_ANNOTATION};

#[derive(Debug, thiserror::Error)]
pub enum UncordonError {
    #[error(transparent)]
    Client(#[from] crate::kube::ClientError),
    #[error("uncordoning node {node}: {source}")]
    Api { node: String, source: kube::Error },
    #[error("node {node} was not cordoned by shutdown-guard; use --force to uncordon it anyway")]
    NotOurs { node: String },
}

/// What `uncordon` does with a node. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UncordonAction {
    AlreadySchedulable,
    /// Ours (the agent's or a drain's): lift it and drop our annotations.
    Ours(&'static str),
    /// Someone else's cordon, lifted only with `--force`.
    Forced,
    Refused,
}

pub fn uncordon_action(
    unschedulable: bool,
    agent_annotation: bool,
    drain_annotation: bool,
    force: bool,
) -> UncordonAction {
    match (unschedulable, agent_annotation, drain_annotation) {
        (false, _, _) => UncordonAction::AlreadySchedulable,
        (true, _, true) => UncordonAction::Ours("shutdown-guard drain"),
        (true, true, false) => UncordonAction::Ours("the shutdown-guard agent"),
        (true, false, false) if force => UncordonAction::Forced,
        (true, false, false) => UncordonAction::Refused,
    }
}

pub async fn uncordon(client: Client, node: &str, force: bool) -> Result<String, UncordonError> {
    let api: Api<Node> = Api::all(client);
    let action = cordon::update(&api, node, |n| {
        let st = cordon::state(n);
        let action = uncordon_action(
            st.unschedulable,
            st.our_annotation.is_some(),
            st.drain_annotation.is_some(),
            force,
        );
        match action {
            UncordonAction::AlreadySchedulable | UncordonAction::Refused => Change::Done(action),
            UncordonAction::Ours(_) | UncordonAction::Forced => Change::Patch(
                json!({
                    "metadata": {"annotations": {AGENT_ANNOTATION: null, DRAIN_ANNOTATION: null}},
                    "spec": {"unschedulable": null},
                }),
                action,
            ),
        }
    })
    .await
    .map_err(|source| UncordonError::Api {
        node: node.into(),
        source,
    })?;
    match action {
        UncordonAction::AlreadySchedulable => Ok(format!("node {node} is schedulable already")),
        UncordonAction::Refused => Err(UncordonError::NotOurs { node: node.into() }),
        UncordonAction::Ours(by) => Ok(format!("node {node} uncordoned (cordoned by {by})")),
        UncordonAction::Forced => Ok(format!(
            "node {node} uncordoned (--force: it was not cordoned by shutdown-guard)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncordon_only_undoes_our_own_cordon() {
        assert_eq!(
            uncordon_action(true, false, false, false),
            UncordonAction::Refused
        );
        assert_eq!(
            uncordon_action(true, false, false, true),
            UncordonAction::Forced
        );
        assert!(matches!(
            uncordon_action(true, true, false, false),
            UncordonAction::Ours(_)
        ));
        assert!(matches!(
            uncordon_action(true, false, true, false),
            UncordonAction::Ours(_)
        ));
        assert_eq!(
            uncordon_action(false, false, false, false),
            UncordonAction::AlreadySchedulable
        );
    }
}
