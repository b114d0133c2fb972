//! `shutdown-guard status`: the node's guard at a glance.
//!
//! The state lives in two places: the Node (our `ShutdownGuard` condition, the cordon
//! annotations, the last-shutdown annotation), which any client can read, and the agent's own
//! `/status` endpoint, which adds what only the running agent knows (the lock right now, the
//! per-VMI progress of a drain). `status` reads both and says which answered.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::drain::model::VmiInfo;
use crate::drain::progress::{VmiState, vmi_state};
use crate::drain::report::{AgentStatus, LastShutdown};
use crate::kube::condition;
use crate::kube::kubevirt::node_vmis;
use crate::kube::objects::vmi_info;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Client(#[from] crate::kube::ClientError),
    #[error("reading node {node}: {source}")]
    Node { node: String, source: kube::Error },
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ConditionView {
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeStatus {
    pub node: String,
    /// Whether the lock is held: from the agent when it answered, else from the condition.
    pub lock_held: Option<bool>,
    /// `agent` or `condition` (or `unknown`).
    pub lock_source: String,
    pub unschedulable: bool,
    /// Who cordoned the node, when it is cordoned.
    pub cordoned_by: Option<String>,
    pub condition: Option<ConditionView>,
    pub last_shutdown: Option<LastShutdown>,
    /// The agent's `/status`, when it answered.
    pub agent: Option<AgentStatus>,
    pub agent_error: Option<String>,
    /// VMIs on the node now, as the API server has them.
    pub vmis: Vec<VmiView>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VmiView {
    pub vmi: String,
    pub state: String,
}

/// Combines what the Node and the agent say. Pure.
pub fn combine(node: &Node, agent: Result<AgentStatus, String>, vmis: &[VmiInfo]) -> NodeStatus {
    let name = node.metadata.name.clone().unwrap_or_default();
    let st = crate::kube::cordon::state(node);
    let cordoned_by = st.unschedulable.then(|| {
        if let Some(b) = &st.our_annotation {
            format!("shutdown-guard agent (boot {b})")
        } else if let Some(t) = &st.drain_annotation {
            format!("shutdown-guard drain (at {t})")
        } else {
            "someone else (no shutdown-guard annotation)".into()
        }
    });
    let cond = condition::find(node).map(|c| ConditionView {
        status: c.status.clone(),
        reason: c.reason.clone().unwrap_or_default(),
        message: c.message.clone().unwrap_or_default(),
        last_transition_time: c.last_transition_time.as_ref().map(|t| t.0.to_string()),
    });
    let (agent, agent_error) = match agent {
        Ok(a) => (Some(a), None),
        Err(e) => (None, Some(e)),
    };
    let (lock_held, lock_source) = match (&agent, &cond) {
        (Some(a), _) => (Some(a.lock_held), "agent"),
        (None, Some(c)) => (
            Some(c.status == "True" || c.reason == "Draining"),
            "condition",
        ),
        (None, None) => (None, "unknown"),
    };
    let vmis = vmis
        .iter()
        .filter(|v| v.runs_on(&name))
        .map(|v| {
            let s = vmi_state(&name, Some(v), None, false, None);
            VmiView {
                vmi: v.key.to_string(),
                state: match s {
                    VmiState::Waiting => "running".into(),
                    other => other.describe(),
                },
            }
        })
        .collect();
    NodeStatus {
        node: name,
        lock_held,
        lock_source: lock_source.into(),
        unschedulable: st.unschedulable,
        cordoned_by,
        condition: cond,
        last_shutdown: condition::last_shutdown(node),
        agent,
        agent_error,
        vmis,
    }
}

pub fn render_text(s: &NodeStatus) -> String {
    let mut out = String::new();
    let row = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<14} {v}\n"));
    row(&mut out, "NODE", s.node.clone());
    row(
        &mut out,
        "LOCK",
        match s.lock_held {
            Some(true) => format!("held (from the {})", s.lock_source),
            Some(false) => format!("not held (from the {})", s.lock_source),
            None => "unknown (no agent answer, no condition)".into(),
        },
    );
    row(
        &mut out,
        "CONDITION",
        match &s.condition {
            Some(c) => format!(
                "{}={} {}: {}",
                condition::CONDITION_TYPE,
                c.status,
                c.reason,
                c.message
            ),
            None => "none".into(),
        },
    );
    row(
        &mut out,
        "SCHEDULING",
        match &s.cordoned_by {
            Some(by) => format!("cordoned by {by}"),
            None => "schedulable".into(),
        },
    );
    row(
        &mut out,
        "LAST SHUTDOWN",
        match &s.last_shutdown {
            Some(l) => format!(
                "{} at {}: {}{} ({} migrated, {} stopped{})",
                l.r#type,
                l.started,
                l.outcome,
                l.duration_s
                    .map(|d| format!(" after {d:.1}s"))
                    .unwrap_or_default(),
                l.migrated,
                l.stopped,
                if l.remaining.is_empty() {
                    String::new()
                } else {
                    format!(", left: {}", l.remaining.join(", "))
                }
            ),
            None => "none recorded".into(),
        },
    );
    match (&s.agent, &s.agent_error) {
        (Some(a), _) => row(
            &mut out,
            "AGENT",
            format!(
                "{}; logind delay {}",
                a.phase,
                a.inhibit_delay_max_s
                    .map(|d| format!("{d}s"))
                    .unwrap_or_else(|| "?".into())
            ),
        ),
        (None, Some(e)) => row(&mut out, "AGENT", format!("no answer ({e})")),
        _ => {}
    }
    if let Some(d) = s.agent.as_ref().and_then(|a| a.drain.as_ref()) {
        out.push_str(&format!(
            "\nDRAIN ({}, {:.1}s of {:.0}s)\n",
            d.r#type, d.elapsed_s, d.deadline_s
        ));
        let w = d.vmis.iter().map(|v| v.vmi.len()).max().unwrap_or(3).max(3);
        out.push_str(&format!("{:w$}  {:24}  SINCE\n", "VMI", "STATE"));
        for v in &d.vmis {
            out.push_str(&format!(
                "{:w$}  {:24}  {:.1}s\n",
                v.vmi,
                v.state.describe(),
                v.since_s
            ));
        }
    }
    out.push_str(&format!("\nVMIS ON NODE ({})\n", s.vmis.len()));
    for v in &s.vmis {
        out.push_str(&format!("{}  {}\n", v.vmi, v.state));
    }
    out
}

/// GETs the agent's `/status` (plain HTTP/1.0 on loopback or the pod network).
pub async fn fetch_agent(addr: &str) -> Result<AgentStatus, String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        s.write_all(format!("GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| "malformed answer".to_string())?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return Err(head.lines().next().unwrap_or("").to_string());
        }
        serde_json::from_str(body).map_err(|e| format!("decoding /status: {e}"))
    };
    match tokio::time::timeout(Duration::from_secs(3), io).await {
        Ok(r) => r,
        Err(_) => Err(format!("{addr}: no answer within 3s")),
    }
}

pub async fn status(client: Client, node: &str, agent: &str) -> Result<NodeStatus, StatusError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let n = nodes.get(node).await.map_err(|source| StatusError::Node {
        node: node.into(),
        source,
    })?;
    let a = fetch_agent(agent).await;
    let vmis: Vec<VmiInfo> = node_vmis(&client, node)
        .await
        .map(|items| items.iter().filter_map(vmi_info).collect())
        .unwrap_or_default();
    Ok(combine(&n, a, &vmis))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::model::fixtures::vmi;
    use serde_json::json;

    fn node(extra: serde_json::Value) -> Node {
        let mut base = json!({
            "metadata": {"name": "node-1", "annotations": {}},
            "spec": {},
            "status": {"conditions": [{"type": "ShutdownGuard", "status": "True", "reason": "Ready", "message": "m"}]},
        });
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn lock_from_the_agent_else_from_the_condition() {
        let n = node(json!({}));
        let s = combine(&n, Err("refused".into()), &[vmi("live-1", "node-1")]);
        assert_eq!(
            (s.lock_held, s.lock_source.as_str()),
            (Some(true), "condition")
        );
        assert_eq!(s.vmis.len(), 1);
        assert_eq!(s.vmis[0].state, "running");
        let a = AgentStatus {
            lock_held: false,
            phase: crate::drain::report::AgentPhase::Released,
            ..Default::default()
        };
        let s = combine(&n, Ok(a), &[]);
        assert_eq!(
            (s.lock_held, s.lock_source.as_str()),
            (Some(false), "agent")
        );
        assert!(render_text(&s).contains("LOCK           not held (from the agent)"));
    }

    #[test]
    fn says_who_cordoned() {
        let n = node(json!({
            "metadata": {"name": "node-1", "annotations": {crate::kube::cordon::AGENT_ANNOTATION: "b1"}},
            "spec": {"unschedulable": true},
        }));
        let s = combine(&n, Err("x".into()), &[]);
        assert!(s.cordoned_by.unwrap().contains("agent (boot b1)"));
        let n = node(json!({"spec": {"unschedulable": true}}));
        assert!(
            combine(&n, Err("x".into()), &[])
                .cordoned_by
                .unwrap()
                .contains("someone else")
        );
    }
}
