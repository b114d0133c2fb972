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
            note: Some(truncate(note, NOTE_MAX)),
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            action: action.into(),
            secondary: None,
        };
        self.recorder.publish(&ev, &self.node).await
    }
}

/// The API server rejects Event notes longer than this many bytes.
const NOTE_MAX: usize = 1024;

fn truncate(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut cut = max - '…'.len_utf8();
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s.push('…');
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn notes_fit_the_api_limit() {
        let long = "é".repeat(2000);
        let t = super::truncate(long, super::NOTE_MAX);
        assert!(t.len() <= super::NOTE_MAX);
        assert!(t.ends_with('…'));
        assert_eq!(super::truncate("short".into(), 1024), "short");
    }
}
