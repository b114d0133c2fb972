//! `shutdown-guard status`: the node's guard at a glance, or every node's (`--all-nodes`).
//!
//! The state lives in two places: the Node (our `ShutdownGuard` condition, the cordon
//! annotations, the last-shutdown annotation), which any client can read, and the agent's own
//! `/status` endpoint, which adds what only the running agent knows (the lock right now, the
//! per-VMI progress of a drain). `status` reads both and says which answered. `--all-nodes`
//! reads only what the API server has (every Node, every VMI, the KubeVirt CR), since the agents'
//! own endpoints are on the nodes.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{DynamicObject, ListParams};
use kube::{Api, Client};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::drain::fate::{ClusterStrategy, Fate, VmiFacts, fate};
use crate::drain::model::VmiInfo;
use crate::drain::progress::{VmiState, vmi_state};
use crate::drain::report::{AgentStatus, LastShutdown};
use crate::kube::condition;
use crate::kube::kubevirt::{cluster_strategy, node_vmis, vmi_resource};
use crate::kube::objects::{vmi_facts, vmi_info};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Client(#[from] crate::kube::ClientError),
    #[error("reading node {node}: {source}")]
    Node { node: String, source: kube::Error },
    #[error("listing {what}: {source}")]
    List {
        what: &'static str,
        source: kube::Error,
    },
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

impl ConditionView {
    fn of(node: &Node) -> Option<ConditionView> {
        condition::find(node).map(|c| ConditionView {
            status: c.status.clone(),
            reason: c.reason.clone().unwrap_or_default(),
            message: c.message.clone().unwrap_or_default(),
            last_transition_time: c.last_transition_time.as_ref().map(|t| t.0.to_string()),
        })
    }

    /// The agent holds its lock while it is ready and while it drains; it has let it go after
    /// a drain (`Drained`, `DeadlineReached`) and while it takes it again (`LockLost`).
    pub fn lock_held(&self) -> bool {
        self.status == "True" || self.reason == condition::GuardState::Draining.reason()
    }
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
    let cordoned_by = cordoned_by(&st);
    let cond = ConditionView::of(node);
    let (agent, agent_error) = match agent {
        Ok(a) => (Some(a), None),
        Err(e) => (None, Some(e)),
    };
    let (lock_held, lock_source) = match (&agent, &cond) {
        (Some(a), _) => (Some(a.lock_held), "agent"),
        (None, Some(c)) => (Some(c.lock_held()), "condition"),
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

fn cordoned_by(st: &crate::kube::cordon::NodeState) -> Option<String> {
    st.unschedulable.then(|| {
        if let Some(b) = &st.our_annotation {
            format!("shutdown-guard agent (boot {b})")
        } else if let Some(t) = &st.drain_annotation {
            format!("shutdown-guard drain (at {t})")
        } else {
            "someone else (no shutdown-guard annotation)".into()
        }
    })
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
    if let Some(sch) = s.agent.as_ref().and_then(|a| a.scheduled_shutdown.as_ref()) {
        row(
            &mut out,
            "SCHEDULED",
            format!("{} at {} (logind)", sch.r#type, sch.at),
        );
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

/// How a node's shutdown is guarded, as its `ShutdownGuard` condition tells.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Guard {
    /// The agent holds its lock and no drain runs: a shutdown now would be drained.
    Guarded,
    Draining,
    /// The last drain ended and released the lock: the node is going down (or its agent has not
    /// come back since).
    Released,
    /// logind or the bus went away; the agent is taking its lock again.
    LockLost,
    /// No condition of ours: no agent has run on this node.
    Unguarded,
}

impl Guard {
    pub fn of(c: Option<&ConditionView>) -> Guard {
        use condition::GuardState as S;
        match c.and_then(|c| S::from_reason(&c.reason)) {
            Some(S::Ready) => Guard::Guarded,
            Some(S::Draining) => Guard::Draining,
            Some(S::Drained) | Some(S::DeadlineReached) => Guard::Released,
            Some(S::LockLost) => Guard::LockLost,
            None => Guard::Unguarded,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Guard::Guarded => "guarded",
            Guard::Draining => "draining",
            Guard::Released => "released",
            Guard::LockLost => "lock-lost",
            Guard::Unguarded => "unguarded",
        }
    }
}

/// A VMI that a drain of its node would not live-migrate.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VmiFate {
    pub vmi: String,
    /// `stop`, `refused-then-stop` (KubeVirt refuses the eviction; the drain stops it) or
    /// `external` (left to another controller).
    pub fate: String,
    pub why: String,
}

/// One node in `status --all-nodes`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterNode {
    pub node: String,
    pub guard: Guard,
    /// A shutdown starting now would be held and drained.
    pub guarded: bool,
    /// From the condition; `None` without one.
    pub lock_held: Option<bool>,
    pub condition: Option<ConditionView>,
    pub unschedulable: bool,
    pub cordoned_by: Option<String>,
    /// The drain under way (outcome `draining`) or the last one, as recorded on the Node.
    pub shutdown: Option<LastShutdown>,
    /// VMIs running on the node.
    pub vmis: usize,
    pub will_not_migrate: Vec<VmiFate>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterStatus {
    /// The KubeVirt CR's evictionStrategy, which VMIs without their own follow.
    pub cluster_eviction_strategy: String,
    pub nodes: Vec<ClusterNode>,
}

fn describe_strategy(c: &ClusterStrategy) -> String {
    match c {
        ClusterStrategy::Configured(s) => s.clone(),
        ClusterStrategy::Unset => "None (KubeVirt's default; the KubeVirt CR sets none)".into(),
        ClusterStrategy::NoCr(why) => format!("None (KubeVirt's default; no KubeVirt CR: {why})"),
    }
}

/// Every node's guard from the Nodes and VMIs as listed. Pure.
pub fn cluster_view(
    nodes: &[Node],
    vmis: &[(VmiInfo, VmiFacts)],
    cluster: &ClusterStrategy,
) -> ClusterStatus {
    let mut out: Vec<ClusterNode> = nodes
        .iter()
        .map(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            let st = crate::kube::cordon::state(n);
            let cond = ConditionView::of(n);
            let guard = Guard::of(cond.as_ref());
            let here: Vec<&(VmiInfo, VmiFacts)> =
                vmis.iter().filter(|(v, _)| v.runs_on(&name)).collect();
            let mut will_not_migrate: Vec<VmiFate> = here
                .iter()
                .filter_map(|(v, facts)| {
                    let (f, why) = fate(facts, cluster);
                    let fate = match f {
                        Fate::Migrate => return None,
                        Fate::Stop => "stop",
                        Fate::RefusedThenStop => "refused-then-stop",
                        Fate::External => "external",
                    };
                    Some(VmiFate {
                        vmi: v.key.to_string(),
                        fate: fate.into(),
                        why,
                    })
                })
                .collect();
            will_not_migrate.sort_by(|a, b| a.vmi.cmp(&b.vmi));
            ClusterNode {
                guard,
                guarded: guard == Guard::Guarded,
                lock_held: cond.as_ref().map(ConditionView::lock_held),
                condition: cond,
                unschedulable: st.unschedulable,
                cordoned_by: cordoned_by(&st),
                shutdown: condition::last_shutdown(n),
                vmis: here.len(),
                will_not_migrate,
                node: name,
            }
        })
        .collect();
    out.sort_by(|a, b| a.node.cmp(&b.node));
    ClusterStatus {
        cluster_eviction_strategy: describe_strategy(cluster),
        nodes: out,
    }
}

fn shutdown_cell(s: Option<&LastShutdown>) -> String {
    use crate::drain::report::ShutdownOutcome;
    match s {
        None => "none recorded".into(),
        Some(l) if l.outcome == ShutdownOutcome::Draining => {
            format!("{} draining since {}", l.r#type, l.started)
        }
        Some(l) => format!(
            "{} {} at {} ({} migrated, {} stopped, {} left)",
            l.r#type,
            l.outcome,
            l.finished.as_deref().unwrap_or(&l.started),
            l.migrated,
            l.stopped,
            l.remaining.len()
        ),
    }
}

pub fn render_cluster_text(c: &ClusterStatus) -> String {
    let rows: Vec<[String; 7]> = c
        .nodes
        .iter()
        .map(|n| {
            [
                n.node.clone(),
                n.guard.as_str().into(),
                match n.lock_held {
                    Some(true) => "held".into(),
                    Some(false) => "not held".into(),
                    None => "-".into(),
                },
                match &n.cordoned_by {
                    None => "schedulable".into(),
                    Some(by) if by.starts_with("shutdown-guard agent") => "cordoned (agent)".into(),
                    Some(by) if by.starts_with("shutdown-guard drain") => "cordoned (drain)".into(),
                    Some(_) => "cordoned (other)".into(),
                },
                n.vmis.to_string(),
                n.will_not_migrate.len().to_string(),
                shutdown_cell(n.shutdown.as_ref()),
            ]
        })
        .collect();
    let head = [
        "NODE",
        "GUARD",
        "LOCK",
        "SCHEDULING",
        "VMIS",
        "WILL NOT MIGRATE",
        "SHUTDOWN (PENDING OR LAST)",
    ];
    let mut w = head.map(str::len);
    for r in &rows {
        for (i, cell) in r.iter().enumerate() {
            w[i] = w[i].max(cell.len());
        }
    }
    let line = |cells: [&str; 7]| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:width$}   ", width = w[i]));
            }
        }
        l.push('\n');
        l
    };
    let mut out = line(head);
    for r in &rows {
        out.push_str(&line(r.each_ref().map(String::as_str)));
    }
    let stops: Vec<(&str, &VmiFate)> = c
        .nodes
        .iter()
        .flat_map(|n| n.will_not_migrate.iter().map(|v| (n.node.as_str(), v)))
        .collect();
    if !stops.is_empty() {
        out.push_str(&format!(
            "\nWILL NOT MIGRATE (cluster evictionStrategy: {})\n",
            c.cluster_eviction_strategy
        ));
        for (node, v) in stops {
            out.push_str(&format!("{node}  {}  {}: {}\n", v.vmi, v.fate, v.why));
        }
    }
    out
}

/// Every Node, every VMI and the KubeVirt CR, listed once each.
pub async fn cluster_status(client: Client) -> Result<ClusterStatus, StatusError> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|source| StatusError::List {
            what: "nodes",
            source,
        })?;
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &vmi_resource());
    let vmis = match api.list(&ListParams::default()).await {
        Ok(l) => l.items,
        // KubeVirt not installed: no VMIs anywhere.
        Err(kube::Error::Api(s)) if s.code == 404 => Vec::new(),
        Err(source) => {
            return Err(StatusError::List {
                what: "VirtualMachineInstances",
                source,
            });
        }
    };
    let vmis: Vec<(VmiInfo, VmiFacts)> = vmis
        .iter()
        .filter_map(|o| Some((vmi_info(o)?, vmi_facts(o))))
        .collect();
    let cluster = cluster_strategy(&client).await;
    Ok(cluster_view(&nodes.items, &vmis, &cluster))
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

    fn named(name: &str, reason: Option<&str>, extra: serde_json::Value) -> Node {
        let mut n =
            json!({"metadata": {"name": name, "annotations": {}}, "spec": {}, "status": {}});
        if let Some(r) = reason {
            let status = if r == "Ready" { "True" } else { "False" };
            n["status"]["conditions"] =
                json!([{"type": "ShutdownGuard", "status": status, "reason": r, "message": "m"}]);
        }
        if let (Some(b), Some(e)) = (n.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                if k == "metadata" {
                    b["metadata"]
                        .as_object_mut()
                        .unwrap()
                        .extend(v.as_object().unwrap().clone());
                } else {
                    b.insert(k.clone(), v.clone());
                }
            }
        }
        serde_json::from_value(n).unwrap()
    }

    fn facts(name: &str, strategy: Option<&str>, migratable: bool) -> VmiFacts {
        VmiFacts {
            key: format!("default/{name}"),
            strategy: strategy.map(String::from),
            live_migratable: Some((migratable, (!migratable).then(|| "HostDisk".into()))),
        }
    }

    #[test]
    fn all_nodes_tells_draining_guarded_and_unguarded_nodes_and_what_would_not_migrate() {
        let record = json!({"type": "poweroff", "started": "2026-01-01T00:00:00Z", "outcome": "draining",
                            "migrated": 0, "stopped": 0, "remaining": ["default/live-1", "default/stuck-1"]})
        .to_string();
        let nodes = [
            named("node-3", None, json!({})),
            named(
                "node-1",
                Some("Draining"),
                json!({"metadata": {"annotations": {
                    crate::kube::cordon::AGENT_ANNOTATION: "b1",
                    condition::LAST_SHUTDOWN_ANNOTATION: record}},
                       "spec": {"unschedulable": true}}),
            ),
            named("node-2", Some("Ready"), json!({})),
        ];
        let vmis = [
            (
                vmi("live-1", "node-1"),
                facts("live-1", Some("LiveMigrate"), true),
            ),
            (
                vmi("stuck-1", "node-1"),
                facts("stuck-1", Some("LiveMigrate"), false),
            ),
            (vmi("plain-1", "node-2"), facts("plain-1", None, true)),
            (
                vmi("live-2", "node-2"),
                facts("live-2", Some("LiveMigrate"), true),
            ),
        ];
        let c = cluster_view(&nodes, &vmis, &ClusterStrategy::Unset);
        let names: Vec<&str> = c.nodes.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(names, ["node-1", "node-2", "node-3"]);
        let (n1, n2, n3) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
        assert_eq!(
            (n1.guard, n1.guarded, n1.lock_held),
            (Guard::Draining, false, Some(true))
        );
        assert_eq!(n1.vmis, 2);
        assert_eq!(
            n1.will_not_migrate
                .iter()
                .map(|v| (v.vmi.as_str(), v.fate.as_str()))
                .collect::<Vec<_>>(),
            [("default/stuck-1", "refused-then-stop")]
        );
        assert_eq!(
            n1.shutdown.as_ref().map(|s| s.outcome),
            Some(crate::drain::report::ShutdownOutcome::Draining)
        );
        assert_eq!(
            (n2.guard, n2.guarded, n2.lock_held),
            (Guard::Guarded, true, Some(true))
        );
        // No strategy of its own and none in the cluster: KubeVirt's default None stops it.
        assert_eq!(n2.will_not_migrate.len(), 1);
        assert_eq!(n2.will_not_migrate[0].fate, "stop");
        assert_eq!(
            (n3.guard, n3.guarded, n3.lock_held),
            (Guard::Unguarded, false, None)
        );

        let text = render_cluster_text(&c);
        let row = |node: &str| {
            text.lines()
                .find(|l| l.starts_with(node))
                .unwrap()
                .to_string()
        };
        assert!(
            row("node-1").contains("draining") && row("node-1").contains("cordoned (agent)"),
            "{text}"
        );
        assert!(
            row("node-1").contains("poweroff draining since 2026-01-01T00:00:00Z"),
            "{text}"
        );
        assert!(
            row("node-2").contains("guarded") && row("node-2").contains("held"),
            "{text}"
        );
        assert!(row("node-3").contains("unguarded"), "{text}");
        assert!(
            text.contains(
                "node-1  default/stuck-1  refused-then-stop: evictionStrategy LiveMigrate"
            ),
            "{text}"
        );

        // A cluster-wide LiveMigrate moves the VMI without its own strategy.
        let c = cluster_view(
            &nodes,
            &vmis,
            &ClusterStrategy::Configured("LiveMigrate".into()),
        );
        assert!(c.nodes[1].will_not_migrate.is_empty());
    }
}
