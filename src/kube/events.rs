//! Events on our Node, so `kubectl describe node` shows what the agent did.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

#[derive(Clone)]
pub struct NodeEvents {
    recorder: Recorder,
    node: ObjectReference,
}

impl NodeEvents {
    pub fn new(client: Client, node: &str, node_uid: Option<String>) -> Self {
        NodeEvents {
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "shutdown-guard".into(),
                    instance: Some(node.to_string()),
                },
            ),
            node: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.to_string()),
                uid: node_uid,
                ..Default::default()
            },
        }
    }

    pub async fn publish(
        &self,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) -> Result<(), kube::Error> {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        self.recorder.publish(&ev, &self.node).await
    }
}
