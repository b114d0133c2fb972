//! `shutdown-guard drain` and `shutdown-guard uncordon`: the agent's drain engine (the same
//! [`Machine`]) run on demand for maintenance without a power-off, and the undo of its cordon.
//!
//! Its cordon is marked with its own annotation, not the agent's boot-ID one: the agent lifts
//! a boot-ID cordon when it restarts, and a maintenance drain must survive that.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::agent::machine::{
    CordonResult, Effect, Input, Machine, MachineConfig, ReleaseReason, WatchUpdate,
};
use crate::bootid::CORDON_ANNOTATION;
use crate::check::{self, ClusterStrategy, Fate};
use crate::config::Scope;
use crate::drain::model::{PodInfo, VMI_NODE_LABEL, VmiInfo};
use crate::drain::plan::{self, SkipReason};
use crate::kube::events::NodeEvents;
use crate::kube::{evict, watch};
use crate::progress::Progress;

/// Marks a cordon set by `shutdown-guard drain` (value: when, RFC 3339).
pub const DRAIN_ANNOTATION: &str = "shutdown-guard.kubevirt.io/drain-cordoned-at";

/// A drain without `--timeout` waits this long at most (kubectl's `--timeout 0` is "forever").
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum OnDemandError {
    #[error(transparent)]
    Client(#[from] crate::kube::ClientError),
    #[error("{what}: {source}")]
    Api { what: String, source: kube::Error },
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    #[error("node {node} was not cordoned by shutdown-guard; use --force to uncordon it anyway")]
    NotOurs { node: String },
}

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> OnDemandError {
    let what = what.into();
    move |source| OnDemandError::Api { what, source }
}

#[derive(Debug, Clone)]
pub struct DrainOptions {
    pub node: String,
    pub scope: Scope,
    pub timeout: Option<Duration>,
    pub dry_run: bool,
    /// Redraw a per-VMI table in place (a terminal) instead of printing one line per change.
    pub live: bool,
}

/// One line of a dry run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Planned {
    pub object: String,
    pub action: String,
    pub why: String,
}

/// What a drain of the node would do, from the VMIs and pods as they are. Pure.
pub fn dry_run_plan(
    node: &str,
    scope: Scope,
    unschedulable: bool,
    vmis: &[(VmiInfo, check::VmiFacts)],
    pods: &[PodInfo],
    cluster: &ClusterStrategy,
) -> Vec<Planned> {
    let mut out = vec![Planned {
        object: format!("node/{node}"),
        action: if unschedulable { "leave" } else { "cordon" }.into(),
        why: if unschedulable {
            "already unschedulable; its cordon stays as it is".into()
        } else {
            format!("so nothing new is scheduled there; marked with {DRAIN_ANNOTATION}")
        },
    }];
    for (v, facts) in vmis {
        if !v.runs_on(node) {
            continue;
        }
        let (f, why) = check::fate(facts, cluster);
        let action = match f {
            Fate::Migrate => "migrate",
            Fate::Stop => "stop",
            Fate::RefusedThenStop => "stop",
            Fate::External => "wait",
        };
        out.push(Planned {
            object: format!("vmi/{}", v.key),
            action: action.into(),
            why,
        });
    }
    let by_uid: std::collections::HashMap<String, VmiInfo> = vmis
        .iter()
        .map(|(v, _)| (v.uid.clone(), v.clone()))
        .collect();
    let p = plan::plan(node, scope, pods.iter(), &by_uid);
    for r in &p.vm_pods {
        out.push(Planned {
            object: format!("pod/{}", r.key),
            action: "evict".into(),
            why: "virt-launcher pod: KubeVirt answers its eviction".into(),
        });
    }
    for r in &p.other_pods {
        out.push(Planned {
            object: format!("pod/{}", r.key),
            action: "evict".into(),
            why: "scope all: evicted once the VMs are gone".into(),
        });
    }
    for (r, reason) in &p.skipped {
        let why = match reason {
            SkipReason::DaemonSet => "DaemonSet pod (its controller would recreate it)",
            SkipReason::Mirror => "mirror of a static pod",
            SkipReason::Finished => "finished",
            SkipReason::Terminating => "already terminating; only waited for",
            SkipReason::OutOfScope => "not a virt-launcher pod (scope vms)",
            SkipReason::NotOurVmi => "launcher of a VMI not running here (migration target)",
        };
        out.push(Planned {
            object: format!("pod/{}", r.key),
            action: "skip".into(),
            why: why.into(),
        });
    }
    out
}

pub fn render_plan(node: &str, plan: &[Planned]) -> String {
    let w = plan.iter().map(|p| p.object.len()).max().unwrap_or(0);
    let mut s = format!("dry run: nothing is changed on node {node}\n");
    s.push_str(&format!("{:w$}  {:8}  WHY\n", "OBJECT", "ACTION"));
    for p in plan {
        s.push_str(&format!("{:w$}  {:8}  {}\n", p.object, p.action, p.why));
    }
    s
}

/// How a drain ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrainResult {
    pub node: String,
    /// `empty`, `timeout` or `dry-run`.
    pub outcome: String,
    pub migrated: usize,
    pub stopped: usize,
    pub remaining: Vec<String>,
    pub elapsed_s: f64,
}

async fn node_and_lists(
    client: &Client,
    node: &str,
) -> Result<(Node, Vec<DynamicObject>, Vec<Pod>), OnDemandError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let n = nodes
        .get(node)
        .await
        .map_err(api_err(format!("reading node {node}")))?;
    let vmis: Api<DynamicObject> = Api::all_with(client.clone(), &crate::kube::vmi_resource());
    let v = vmis
        .list(&ListParams::default().labels(&format!("{VMI_NODE_LABEL}={node}")))
        .await
        .map_err(api_err("listing VMIs"))?;
    let pods: Api<Pod> = Api::all(client.clone());
    let p = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .map_err(api_err("listing pods"))?;
    Ok((n, v.items, p.items))
}

/// Plans (dry run) or runs a drain, writing progress to `out`.
pub async fn drain(
    client: Client,
    opts: &DrainOptions,
    json_output: bool,
    out: &mut (dyn Write + Send),
) -> Result<DrainResult, OnDemandError> {
    let node = opts.node.as_str();
    if opts.dry_run {
        let (n, vmis, pods) = node_and_lists(&client, node).await?;
        let cluster = check::cluster_strategy(&client).await;
        let vmis: Vec<(VmiInfo, check::VmiFacts)> = vmis
            .iter()
            .filter_map(|o| Some((VmiInfo::from_dynamic(o)?, check::vmi_facts(o))))
            .collect();
        let pods: Vec<PodInfo> = pods.iter().filter_map(PodInfo::from_pod).collect();
        let unschedulable = crate::kube::node::state(&n).unschedulable;
        let planned = dry_run_plan(node, opts.scope, unschedulable, &vmis, &pods, &cluster);
        if json_output {
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(
                    &json!({"node": node, "dryRun": true, "plan": planned})
                )
                .unwrap_or_default()
            )?;
        } else {
            write!(out, "{}", render_plan(node, &planned))?;
        }
        return Ok(DrainResult {
            node: node.into(),
            outcome: "dry-run".into(),
            migrated: 0,
            stopped: 0,
            remaining: Vec::new(),
            elapsed_s: 0.0,
        });
    }

    let nodes: Api<Node> = Api::all(client.clone());
    let events = NodeEvents::new(client.clone(), node, None);
    let timeout = opts.timeout.unwrap_or(FOREVER);
    let mut machine = Machine::new(MachineConfig {
        node: node.into(),
        scope: opts.scope,
        safety_margin: Duration::ZERO,
        deadline_override: Some(timeout),
    });
    let started = Instant::now();
    machine.handle(started, Input::LockTaken { delay_max: timeout });
    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    {
        let (c, n, t) = (client.clone(), node.to_string(), tx.clone());
        tokio::spawn(async move {
            let mut s = std::pin::pin!(watch::vmis(c, &n));
            while let Some(u) = s.next().await {
                if t.send(Input::Vmis(u)).is_err() {
                    return;
                }
            }
        });
        let (c, n, t) = (client.clone(), node.to_string(), tx.clone());
        tokio::spawn(async move {
            let mut s = std::pin::pin!(watch::pods(c, &n));
            while let Some(u) = s.next().await {
                if t.send(Input::Pods(u)).is_err() {
                    return;
                }
            }
        });
    }
    let _ = tx.send(Input::Shutdown {
        start: true,
        kind: Some("on-demand".into()),
    });
    if !json_output {
        writeln!(
            out,
            "draining node {node} (scope {}, timeout {})",
            opts.scope,
            opts.timeout
                .map(|t| humantime::format_duration(t).to_string())
                .unwrap_or_else(|| "none".into())
        )?;
    }
    let mut progress = Progress::new(node, started);
    let mut lines: Vec<serde_json::Value> = Vec::new();
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let live = opts.live && !json_output;
    let mut drawn = 0usize;
    let mut redraw = tokio::time::interval(Duration::from_secs(1));
    let reason = loop {
        let wake = machine.next_wakeup();
        let input = tokio::select! {
            biased;
            _ = sigint.recv() => break None,
            Some(i) = rx.recv() => i,
            _ = redraw.tick(), if live => {
                drawn = draw_live(out, &progress, Instant::now(), drawn)?;
                continue;
            }
            _ = async move {
                match wake {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => Input::Tick,
        };
        let now = Instant::now();
        let deleted = match &input {
            Input::Vmis(WatchUpdate::Deleted(v)) => Some(v.clone()),
            _ => None,
        };
        let fx = machine.handle(now, input);
        let changes = progress.update(now, &machine, deleted.as_ref());
        for (key, state) in &changes {
            let t = progress.elapsed(now).as_secs_f64();
            if json_output {
                lines.push(json!({"at_s": t, "vmi": key.to_string(), "state": state}));
            } else if !live {
                writeln!(
                    out,
                    "[{t:6.1}s] {:<32} {}",
                    key.to_string(),
                    state.describe()
                )?;
            }
        }
        if live && !changes.is_empty() {
            drawn = draw_live(out, &progress, now, drawn)?;
        }
        let mut done = None;
        for e in fx {
            match e {
                Effect::Cordon => {
                    let (api, n, t) = (nodes.clone(), node.to_string(), tx.clone());
                    tokio::spawn(async move {
                        let _ = t.send(Input::Cordoned(cordon(&api, &n).await));
                    });
                }
                Effect::Evict(pod) => {
                    let (c, t) = (client.clone(), tx.clone());
                    tokio::spawn(async move {
                        let outcome = evict::evict(c, &pod).await;
                        let _ = t.send(Input::Evicted { pod, outcome });
                    });
                }
                Effect::Stop {
                    vmi,
                    vmi_uid,
                    pod,
                    grace_seconds,
                    why,
                } => {
                    let (c, t, ev) = (client.clone(), tx.clone(), events.clone());
                    let n = node.to_string();
                    tokio::spawn(async move {
                        let result = evict::stop(c, &pod, grace_seconds).await;
                        if result.is_ok() {
                            let _ = ev
                                .publish_on(
                                    &crate::kube::events::vmi_ref(&vmi, &vmi_uid),
                                    true,
                                    "VMIStoppedForDrain",
                                    "Stop",
                                    format!(
                                        "stopped gracefully ({grace_seconds}s) to drain node {n}: {}",
                                        why.as_str()
                                    ),
                                )
                                .await;
                        }
                        let _ = t.send(Input::Stopped { vmi_uid, result });
                    });
                }
                Effect::ReleaseLock { reason, .. } => done = Some(reason),
                Effect::Warn { reason, note } => {
                    if !json_output && reason != "ShutdownDeadlineReached" {
                        writeln!(out, "warning: {reason}: {note}")?;
                    }
                }
                Effect::Uncordon | Effect::TakeLock | Effect::Exit { .. } => {}
            }
        }
        if let Some(r) = done {
            break Some(r);
        }
    };
    let now = Instant::now();
    let (migrated, stopped, _) = progress.counts();
    let mut remaining: Vec<String> = machine
        .remaining_vmis()
        .iter()
        .map(|k| format!("vmi/{k}"))
        .collect();
    remaining.extend(
        machine
            .other_pods_remaining()
            .iter()
            .map(|k| format!("pod/{k}")),
    );
    let result = DrainResult {
        node: node.into(),
        outcome: match reason {
            Some(ReleaseReason::Empty) => "empty",
            Some(ReleaseReason::Deadline) => "timeout",
            None => "interrupted",
        }
        .into(),
        migrated,
        stopped,
        remaining,
        elapsed_s: crate::progress::round_ms(progress.elapsed(now)),
    };
    if json_output {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&json!({"result": result, "progress": lines}))
                .unwrap_or_default()
        )?;
    } else {
        writeln!(out, "{}", render_summary(&progress.snapshot()))?;
        match result.outcome.as_str() {
            "empty" => writeln!(
                out,
                "node {node} drained in {:.1}s: {migrated} migrated, {stopped} stopped; it stays cordoned (shutdown-guard uncordon --node {node})",
                result.elapsed_s
            )?,
            other => writeln!(
                out,
                "drain of node {node} {}: still there: {}",
                if other == "timeout" {
                    "timed out"
                } else {
                    "interrupted"
                },
                result.remaining.join(", ")
            )?,
        }
    }
    Ok(result)
}

/// Redraws the per-VMI table over the `drawn` lines written last time; returns its height.
fn draw_live(
    out: &mut (dyn Write + Send),
    progress: &Progress,
    now: Instant,
    drawn: usize,
) -> std::io::Result<usize> {
    let table = render_live(&progress.snapshot(), progress.elapsed(now).as_secs_f64());
    if drawn > 0 {
        // Cursor up over the old table, then clear to the end of the screen.
        write!(out, "\x1b[{drawn}A\x1b[J")?;
    }
    write!(out, "{table}")?;
    out.flush()?;
    Ok(table.lines().count())
}

/// The live table: each VMI's state and how long it has been in it.
pub fn render_live(snapshot: &[crate::progress::VmiProgress], elapsed_s: f64) -> String {
    let w = snapshot
        .iter()
        .map(|p| p.vmi.len())
        .max()
        .unwrap_or(3)
        .max(3);
    let mut s = format!(
        "elapsed {elapsed_s:.1}s\n{:w$}  {:24}  FOR\n",
        "VMI", "STATE"
    );
    for p in snapshot {
        let for_s = if p.state.is_final() {
            format!("done at {:.1}s", p.since_s)
        } else {
            format!("{:.1}s", (elapsed_s - p.since_s).max(0.0))
        };
        s.push_str(&format!(
            "{:w$}  {:24}  {for_s}\n",
            p.vmi,
            p.state.describe()
        ));
    }
    s
}

fn render_summary(snapshot: &[crate::progress::VmiProgress]) -> String {
    let w = snapshot
        .iter()
        .map(|p| p.vmi.len())
        .max()
        .unwrap_or(3)
        .max(3);
    let mut s = format!("{:w$}  {:24}  AT\n", "VMI", "STATE");
    for p in snapshot {
        s.push_str(&format!(
            "{:w$}  {:24}  {:.1}s\n",
            p.vmi,
            p.state.describe(),
            p.since_s
        ));
    }
    s.pop();
    s
}

/// Cordons for a maintenance drain unless the node is unschedulable already.
async fn cordon(api: &Api<Node>, node: &str) -> CordonResult {
    for _ in 0..5 {
        let n = match api.get(node).await {
            Ok(n) => n,
            Err(e) => return CordonResult::Failed(e.to_string()),
        };
        if crate::kube::node::state(&n).unschedulable {
            return CordonResult::AlreadyUnschedulable;
        }
        let patch = json!({
            "metadata": {
                "resourceVersion": n.metadata.resource_version,
                "annotations": {
                    DRAIN_ANNOTATION: crate::kube::condition::rfc3339(chrono::Utc::now())
                },
            },
            "spec": {"unschedulable": true},
        });
        match api
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return CordonResult::CordonedByUs,
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return CordonResult::Failed(e.to_string()),
        }
    }
    CordonResult::Failed("the Node kept changing under the cordon".into())
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

pub async fn uncordon(client: Client, node: &str, force: bool) -> Result<String, OnDemandError> {
    let api: Api<Node> = Api::all(client);
    for _ in 0..5 {
        let n = api
            .get(node)
            .await
            .map_err(api_err(format!("reading node {node}")))?;
        let anns = n.metadata.annotations.clone().unwrap_or_default();
        let unschedulable = crate::kube::node::state(&n).unschedulable;
        let action = uncordon_action(
            unschedulable,
            anns.contains_key(CORDON_ANNOTATION),
            anns.contains_key(DRAIN_ANNOTATION),
            force,
        );
        let message = match &action {
            UncordonAction::AlreadySchedulable => {
                return Ok(format!("node {node} is schedulable already"));
            }
            UncordonAction::Refused => {
                return Err(OnDemandError::NotOurs { node: node.into() });
            }
            UncordonAction::Ours(by) => format!("node {node} uncordoned (cordoned by {by})"),
            UncordonAction::Forced => {
                format!("node {node} uncordoned (--force: it was not cordoned by shutdown-guard)")
            }
        };
        let mut annotations = BTreeMap::new();
        annotations.insert(CORDON_ANNOTATION, serde_json::Value::Null);
        annotations.insert(DRAIN_ANNOTATION, serde_json::Value::Null);
        let patch = json!({
            "metadata": {"resourceVersion": n.metadata.resource_version, "annotations": annotations},
            "spec": {"unschedulable": null},
        });
        match api
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(message),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(api_err(format!("uncordoning node {node}"))(e)),
        }
    }
    Err(OnDemandError::Api {
        what: format!("uncordoning node {node}"),
        source: kube::Error::Api(Box::new(
            kube::core::Status::failure("the Node kept changing", "Conflict").with_code(409),
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::model::fixtures::*;

    #[test]
    fn live_table_shows_time_in_state() {
        let snap = vec![
            crate::progress::VmiProgress {
                vmi: "default/live-1".into(),
                state: crate::progress::VmiState::Migrating {
                    target: Some("node-2".into()),
                },
                since_s: 1.0,
            },
            crate::progress::VmiProgress {
                vmi: "default/none-1".into(),
                state: crate::progress::VmiState::Stopped,
                since_s: 0.5,
            },
        ];
        let t = render_live(&snap, 3.5);
        assert!(t.starts_with("elapsed 3.5s\n"));
        assert!(
            t.lines().any(
                |l| l.starts_with("default/live-1  migrating → node-2") && l.ends_with(" 2.5s")
            ),
            "{t}"
        );
        assert!(t.contains("done at 0.5s"));
    }

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

    fn facts(v: &VmiInfo, strategy: &str, migratable: bool) -> check::VmiFacts {
        check::VmiFacts {
            key: v.key.to_string(),
            strategy: Some(strategy.into()),
            live_migratable: Some((migratable, None)),
        }
    }

    #[test]
    fn dry_run_says_what_and_why() {
        let live = vmi("live-1", "node-1");
        let none = vmi("none-1", "node-1");
        let pods = vec![
            launcher(&live, "node-1"),
            launcher(&none, "node-1"),
            owned_by(pod("agent-x", "node-1"), "DaemonSet"),
            pod("bare", "node-1"),
        ];
        let vmis = vec![
            (live.clone(), facts(&live, "LiveMigrate", true)),
            (none.clone(), facts(&none, "None", true)),
        ];
        let p = dry_run_plan(
            "node-1",
            Scope::All,
            false,
            &vmis,
            &pods,
            &ClusterStrategy::NoCr("none".into()),
        );
        let find = |o: &str| p.iter().find(|x| x.object == o).unwrap().action.clone();
        assert_eq!(find("node/node-1"), "cordon");
        assert_eq!(find("vmi/default/live-1"), "migrate");
        assert_eq!(find("vmi/default/none-1"), "stop");
        assert_eq!(find("pod/default/bare"), "evict");
        assert_eq!(find("pod/default/agent-x"), "skip");
        let vms_only = dry_run_plan(
            "node-1",
            Scope::Vms,
            true,
            &vmis,
            &pods,
            &ClusterStrategy::NoCr("none".into()),
        );
        assert_eq!(
            vms_only
                .iter()
                .find(|x| x.object == "pod/default/bare")
                .unwrap()
                .action,
            "skip"
        );
        assert_eq!(vms_only[0].action, "leave");
    }
}
