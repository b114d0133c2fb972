//! Events (events.k8s.io) on our Node and on the VMIs the agent stops, so `kubectl describe`
//! shows what the agent did, and the one task that writes them in order together with the
//! Node's condition.

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::condition::{self, GuardState};
use crate::drain::model::ObjKey;
use crate::drain::report::LastShutdown;

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
        let node = self.node.clone();
        self.publish_on(&node, warning, reason, action, note).await
    }

    /// An Event about any object (a VMI), reported by this node's agent.
    pub async fn publish_on(
        &self,
        regarding: &ObjectReference,
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
        self.recorder.publish(&ev, regarding).await
    }
}

pub fn vmi_ref(vmi: &ObjKey, uid: &str) -> ObjectReference {
    kubevirt_ref("VirtualMachineInstance", vmi, uid)
}

pub fn vm_ref(vm: &ObjKey, uid: &str) -> ObjectReference {
    kubevirt_ref("VirtualMachine", vm, uid)
}

fn kubevirt_ref(kind: &str, key: &ObjKey, uid: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("kubevirt.io/v1".into()),
        kind: Some(kind.into()),
        namespace: Some(key.namespace.clone()),
        name: Some(key.name.clone()),
        uid: Some(uid.to_string()),
        ..Default::default()
    }
}

/// What the agent reports to the API server, in the order it decided it.
#[derive(Debug, Clone)]
pub enum Report {
    NodeEvent {
        warning: bool,
        reason: &'static str,
        action: &'static str,
        note: String,
    },
    VmiEvent {
        vmi: ObjKey,
        uid: String,
        warning: bool,
        reason: &'static str,
        action: &'static str,
        note: String,
    },
    Condition {
        state: GuardState,
        message: String,
    },
    LastShutdown(LastShutdown),
}

/// Sends [`Report`]s to one task that writes them one after another, so Events and condition
/// changes reach the API server in the order they happened.
#[derive(Clone)]
pub struct Reports {
    tx: mpsc::UnboundedSender<Report>,
}

/// Tries per report: a condition or Event is worth a retry, not a stuck queue.
const REPORT_TRIES: u32 = 3;
const REPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Reports {
    pub fn spawn(client: Client, node: &str, events: NodeEvents) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Report>();
        let nodes: Api<Node> = Api::all(client);
        let node = node.to_string();
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                for attempt in 1..=REPORT_TRIES {
                    let call = async {
                        match &r {
                            Report::NodeEvent {
                                warning,
                                reason,
                                action,
                                note,
                            } => events.publish(*warning, reason, action, note.clone()).await,
                            Report::VmiEvent {
                                vmi,
                                uid,
                                warning,
                                reason,
                                action,
                                note,
                            } => {
                                events
                                    .publish_on(
                                        &vmi_ref(vmi, uid),
                                        *warning,
                                        reason,
                                        action,
                                        note.clone(),
                                    )
                                    .await
                            }
                            Report::Condition { state, message } => {
                                condition::set(&nodes, &node, *state, message).await
                            }
                            Report::LastShutdown(l) => {
                                condition::record_shutdown(&nodes, &node, l).await
                            }
                        }
                    };
                    // A report is worth a retry, not a queue stuck behind a hung call.
                    let res = tokio::time::timeout(REPORT_TIMEOUT, call)
                        .await
                        .map_err(|_| {
                            kube::Error::Api(Box::new(
                                kube::core::Status::failure("no answer", "Timeout").with_code(504),
                            ))
                        });
                    match res {
                        Ok(Ok(())) => break,
                        Ok(Err(e)) | Err(e) => {
                            if attempt < REPORT_TRIES {
                                debug!(node = %node, attempt, error = %e, report = ?r, "report not written; retrying");
                                tokio::time::sleep(crate::drain::eviction::backoff(attempt)).await;
                            } else {
                                // Missing RBAC (nodes/status, events) shows here.
                                warn!(node = %node, error = %e, report = ?r, "report not written");
                            }
                        }
                    }
                }
            }
        });
        Reports { tx }
    }

    pub fn send(&self, r: Report) {
        let _ = self.tx.send(r);
    }

    pub fn node_event(
        &self,
        warning: bool,
        reason: &'static str,
        action: &'static str,
        note: String,
    ) {
        self.send(Report::NodeEvent {
            warning,
            reason,
            action,
            note,
        });
    }

    pub fn condition(&self, state: GuardState, message: impl Into<String>) {
        self.send(Report::Condition {
            state,
            message: message.into(),
        });
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
