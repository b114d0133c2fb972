//! `shutdown-guard drain`: the agent's drain run on demand for maintenance without a power-off,
//! by the same [driver](crate::driver) with a one-off trigger, the maintenance cordon mark, no
//! lock, and a terminal for its reporter; and `--dry-run`, which only plans.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Client;
use serde::Serialize;
use serde_json::json;

use crate::drain::fate::{ClusterStrategy, Fate, VmiFacts, fate};
use crate::drain::machine::{DrainEnd, DrainView};
use crate::drain::machine::{EndReason, Input, MachineConfig, Note, ReleaseReason, Snapshot};
use crate::drain::model::{PodInfo, Scope, VmiInfo};
use crate::drain::plan::{self, SkipReason};
use crate::drain::progress::round_ms;
use crate::driver::{Driver, DriverConfig, DriverError, NoLock, Outcome, Reporter, Step};
use crate::kube::condition::rfc3339;
use crate::kube::cordon::{CordonMark, DRAIN_ANNOTATION};
use crate::kube::events::{NodeEvents, vmi_ref};
use crate::kube::kubevirt::{cluster_strategy, node_pods, node_vmis};
use crate::kube::objects::{pod_info, vmi_facts, vmi_info};

/// A drain without `--timeout` waits this long at most (kubectl's `--timeout 0` is "forever").
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(transparent)]
    Client(#[from] crate::kube::ClientError),
    #[error("{what}: {source}")]
    Api { what: String, source: kube::Error },
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Driver(#[from] DriverError),
}

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> DrainError {
    let what = what.into();
    move |source| DrainError::Api { what, source }
}

#[derive(Debug, Clone)]
pub struct DrainOptions {
    pub node: String,
    pub scope: Scope,
    pub timeout: Option<Duration>,
    pub dry_run: bool,
    /// With `dry_run`: what a power event would do (VMs stopped in place, started again after).
    pub power_event: bool,
    /// Redraw a per-VMI table in place (a terminal) instead of printing one line per change.
    pub live: bool,
    pub json: bool,
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
    vmis: &[(VmiInfo, VmiFacts)],
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
        let (f, why) = fate(facts, cluster);
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
    for (r, job) in &p.inbound {
        out.push(Planned {
            object: format!("pod/{}", r.key),
            action: "cancel".into(),
            why: format!(
                "target of a migration into this node ({}): cancelled so the VM stays on its source",
                job.name.as_deref().unwrap_or(&job.uid)
            ),
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
            SkipReason::Hotplug => "hotplugged volume of a running VM: it goes with the VM",
        };
        out.push(Planned {
            object: format!("pod/{}", r.key),
            action: "skip".into(),
            why: why.into(),
        });
    }
    out
}

/// The same plan as a power event would carry it out: nothing evicted, each VMI stopped where
/// it runs through its VM (`vms` pairs each VMI with its VM's name, if it has one). Pure.
pub fn power_event_plan(plan: Vec<Planned>, vms: &[(VmiInfo, Option<String>)]) -> Vec<Planned> {
    let mut out: Vec<Planned> = plan
        .into_iter()
        .filter(|p| {
            !(p.object.starts_with("vmi/")
                || (p.object.starts_with("pod/")
                    && p.action == "evict"
                    && p.why.starts_with("virt-launcher")))
        })
        .collect();
    let at = out.len().min(1);
    let lines = vms.iter().map(|(v, vm)| Planned {
        object: format!("vmi/{}", v.key),
        action: "stop".into(),
        why: match vm {
            Some(vm) => format!(
                "power event: stopped in place through virtualmachine/{vm} (`stop`, recorded on the VM) and started again when the cluster is back"
            ),
            None => "power event: no VM owns it: deleted gracefully, not started again".into(),
        },
    });
    out.splice(at..at, lines);
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrainOutcome {
    /// The node is empty.
    Empty,
    Timeout,
    /// SIGINT or SIGTERM.
    Interrupted,
    DryRun,
}

/// What `drain` reports at its end.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrainResult {
    pub node: String,
    pub outcome: DrainOutcome,
    pub migrated: usize,
    pub stopped: usize,
    pub remaining: Vec<String>,
    pub elapsed_s: f64,
}

/// Plans (dry run) or runs a drain, writing progress to `out`.
pub async fn drain(
    client: Client,
    opts: &DrainOptions,
    out: Box<dyn Write + Send>,
) -> Result<DrainResult, DrainError> {
    if opts.dry_run {
        return dry_run(client, opts, out).await;
    }
    let node = opts.node.as_str();
    let mut term = Terminal {
        out,
        node: node.to_string(),
        json: opts.json,
        live: opts.live && !opts.json,
        drawn: 0,
        lines: Vec::new(),
        events: NodeEvents::new(client.clone(), node, None),
        end: None,
        view: None,
        error: None,
    };
    if !opts.json {
        writeln!(
            term.out,
            "draining node {node} (scope {}, timeout {})",
            opts.scope,
            opts.timeout
                .map(|t| humantime::format_duration(t).to_string())
                .unwrap_or_else(|| "none".into())
        )?;
    }
    let driver = Driver::new(
        DriverConfig {
            machine: MachineConfig {
                node: node.into(),
                scope: opts.scope,
                safety_margin: Duration::ZERO,
                deadline_override: Some(opts.timeout.unwrap_or(FOREVER)),
                pre_drain_lead: None,
                take_turns: false,
                power_settle: None,
            },
            mark: CordonMark::maintenance(&rfc3339(chrono::Utc::now())),
            once: true,
        },
        client,
        Arc::new(NoLock),
        term,
    );
    let start = futures::stream::iter([Input::Shutdown {
        start: true,
        kind: Some("on-demand".into()),
    }])
    .chain(futures::stream::pending());
    let (outcome, mut term) = driver.run(Box::pin(start)).await?;
    if let Some(e) = term.error.take() {
        return Err(e.into());
    }
    let outcome = match outcome {
        Outcome::Released(ReleaseReason::Empty) => DrainOutcome::Empty,
        Outcome::Released(ReleaseReason::Deadline) => DrainOutcome::Timeout,
        Outcome::Terminated { .. } => DrainOutcome::Interrupted,
    };
    term.finish(outcome)
}

/// The `drain` command's reporter: one line per VMI change, a table redrawn in place, or JSON.
struct Terminal {
    out: Box<dyn Write + Send>,
    node: String,
    json: bool,
    live: bool,
    drawn: usize,
    lines: Vec<serde_json::Value>,
    events: NodeEvents,
    end: Option<DrainEnd>,
    view: Option<DrainView>,
    /// The first write that failed; the drain goes on, the command reports it at the end.
    error: Option<std::io::Error>,
}

impl Terminal {
    fn write(&mut self, notes: &[Note], view: Option<&DrainView>) -> std::io::Result<()> {
        let t = view.map(|v| v.elapsed.as_secs_f64()).unwrap_or(0.0);
        let mut changed = false;
        for n in notes {
            match n {
                Note::Vmi { key, state } => {
                    changed = true;
                    if self.json {
                        self.lines
                            .push(json!({"at_s": t, "vmi": key.to_string(), "state": state}));
                    } else if !self.live {
                        writeln!(
                            self.out,
                            "[{t:6.1}s] {:<32} {}",
                            key.to_string(),
                            state.describe()
                        )?;
                    }
                }
                Note::Stopped(stop) => {
                    let (events, r, node) = (
                        self.events.clone(),
                        vmi_ref(&stop.vmi, &stop.vmi_uid),
                        self.node.clone(),
                    );
                    let note = format!(
                        "stopped gracefully ({}s) to drain node {node}: {}",
                        stop.grace_seconds,
                        stop.why.as_str()
                    );
                    tokio::spawn(async move {
                        let _ = events
                            .publish_on(&r, true, "VMIStoppedForDrain", "Stop", note)
                            .await;
                    });
                }
                Note::Warning { reason, note }
                    if !self.json && *reason != "ShutdownDeadlineReached" =>
                {
                    writeln!(self.out, "warning: {reason}: {note}")?;
                }
                Note::Ended(end) if end.reason != EndReason::Cancelled => {
                    self.end = Some(end.clone())
                }
                _ => {}
            }
        }
        if self.live
            && changed
            && let Some(v) = view
        {
            self.drawn = draw_live(&mut self.out, v, self.drawn)?;
        }
        Ok(())
    }

    fn finish(mut self, outcome: DrainOutcome) -> Result<DrainResult, DrainError> {
        let node = self.node.clone();
        let view = self.view.take();
        let (migrated, stopped, remaining, elapsed) = match (&self.end, &view) {
            (Some(e), _) => (
                e.migrated,
                e.stopped,
                e.remaining
                    .iter()
                    .map(|r| match r.strip_prefix("pod ") {
                        Some(p) => format!("pod/{p}"),
                        None => format!("vmi/{r}"),
                    })
                    .collect(),
                e.elapsed,
            ),
            (None, Some(v)) => {
                let (m, s) = v.vmis.iter().fold((0, 0), |(m, s), p| match p.state {
                    crate::drain::progress::VmiState::Migrated { .. } => (m + 1, s),
                    crate::drain::progress::VmiState::Stopped => (m, s + 1),
                    _ => (m, s),
                });
                let rest = v
                    .vmis
                    .iter()
                    .filter(|p| !p.state.is_final())
                    .map(|p| format!("vmi/{}", p.vmi))
                    .chain(v.pods_remaining.iter().map(|p| format!("pod/{p}")))
                    .collect();
                (m, s, rest, v.elapsed)
            }
            (None, None) => (0, 0, Vec::new(), Duration::ZERO),
        };
        let result = DrainResult {
            node: node.clone(),
            outcome,
            migrated,
            stopped,
            remaining,
            elapsed_s: round_ms(elapsed),
        };
        if self.json {
            writeln!(
                self.out,
                "{}",
                serde_json::to_string_pretty(&json!({"result": result, "progress": self.lines}))
                    .unwrap_or_default()
            )?;
        } else {
            let vmis = view.as_ref().map(|v| v.vmis.as_slice()).unwrap_or(&[]);
            writeln!(self.out, "{}", render_summary(vmis))?;
            match outcome {
                DrainOutcome::Empty => writeln!(
                    self.out,
                    "node {node} drained in {:.1}s: {migrated} migrated, {stopped} stopped; it stays cordoned (shutdown-guard uncordon --node {node})",
                    result.elapsed_s
                )?,
                other => writeln!(
                    self.out,
                    "drain of node {node} {}: still there: {}",
                    if other == DrainOutcome::Timeout {
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
}

impl Reporter for Terminal {
    fn report(&mut self, step: &Step<'_>) {
        let view = step.snapshot.drain.clone();
        if let Err(e) = self.write(step.notes, view.as_ref()) {
            self.error.get_or_insert(e);
        }
        if view.is_some() {
            self.view = view;
        }
    }

    fn tick_every(&self) -> Option<Duration> {
        self.live.then_some(Duration::from_secs(1))
    }

    fn tick(&mut self, _now: Instant, snapshot: &Snapshot) {
        if let Some(v) = &snapshot.drain
            && let Err(e) = draw_live(&mut self.out, v, self.drawn).map(|d| self.drawn = d)
        {
            self.error.get_or_insert(e);
        }
    }
}

async fn dry_run(
    client: Client,
    opts: &DrainOptions,
    mut out: Box<dyn Write + Send>,
) -> Result<DrainResult, DrainError> {
    let node = opts.node.as_str();
    let n = crate::kube::kubevirt::node(&client, node)
        .await
        .map_err(api_err(format!("reading node {node}")))?;
    let vmis = node_vmis(&client, node)
        .await
        .map_err(api_err("listing VMIs"))?;
    let pods = node_pods(&client, node)
        .await
        .map_err(api_err("listing pods"))?;
    let cluster = cluster_strategy(&client).await;
    let owners: std::collections::HashMap<String, String> = vmis
        .iter()
        .filter_map(|o| Some((o.metadata.uid.clone()?, crate::kube::power::owner_vm(o)?)))
        .collect();
    let vmis: Vec<(VmiInfo, VmiFacts)> = vmis
        .iter()
        .filter_map(|o| Some((vmi_info(o)?, vmi_facts(o))))
        .collect();
    let pods: Vec<PodInfo> = pods.iter().filter_map(pod_info).collect();
    let unschedulable = crate::kube::cordon::state(&n).unschedulable;
    let mut planned = dry_run_plan(node, opts.scope, unschedulable, &vmis, &pods, &cluster);
    if opts.power_event {
        let owned: Vec<(VmiInfo, Option<String>)> = vmis
            .iter()
            .filter(|(v, _)| v.runs_on(node))
            .map(|(v, _)| (v.clone(), owners.get(&v.uid).cloned()))
            .collect();
        planned = power_event_plan(planned, &owned);
    }
    if opts.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&json!({"node": node, "dryRun": true, "plan": planned}))
                .unwrap_or_default()
        )?;
    } else {
        write!(out, "{}", render_plan(node, &planned))?;
    }
    Ok(DrainResult {
        node: node.into(),
        outcome: DrainOutcome::DryRun,
        migrated: 0,
        stopped: 0,
        remaining: Vec::new(),
        elapsed_s: 0.0,
    })
}

/// Redraws the per-VMI table over the `drawn` lines written last time; returns its height.
fn draw_live(
    out: &mut (dyn Write + Send),
    view: &DrainView,
    drawn: usize,
) -> std::io::Result<usize> {
    let table = render_live(&view.vmis, view.elapsed.as_secs_f64());
    if drawn > 0 {
        // Cursor up over the old table, then clear to the end of the screen.
        write!(out, "\x1b[{drawn}A\x1b[J")?;
    }
    write!(out, "{table}")?;
    out.flush()?;
    Ok(table.lines().count())
}

/// The live table: each VMI's state and how long it has been in it.
/// The VMI column's width: the longest name, at least the heading's.
fn vmi_width(snapshot: &[crate::drain::progress::VmiProgress]) -> usize {
    snapshot
        .iter()
        .map(|p| p.vmi.len())
        .max()
        .unwrap_or(3)
        .max(3)
}

pub fn render_live(snapshot: &[crate::drain::progress::VmiProgress], elapsed_s: f64) -> String {
    let w = vmi_width(snapshot);
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

fn render_summary(snapshot: &[crate::drain::progress::VmiProgress]) -> String {
    let w = vmi_width(snapshot);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::model::fixtures::*;

    #[test]
    fn live_table_shows_time_in_state() {
        let snap = vec![
            crate::drain::progress::VmiProgress {
                vmi: "default/live-1".into(),
                state: crate::drain::progress::VmiState::Migrating {
                    target: Some("node-2".into()),
                },
                since_s: 1.0,
            },
            crate::drain::progress::VmiProgress {
                vmi: "default/none-1".into(),
                state: crate::drain::progress::VmiState::Stopped,
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

    fn facts(v: &VmiInfo, strategy: &str, migratable: bool) -> VmiFacts {
        VmiFacts {
            key: v.key.to_string(),
            strategy: Some(strategy.into()),
            live_migratable: Some((migratable, None)),
        }
    }

    #[test]
    fn a_power_event_dry_run_stops_every_vmi_in_place_and_evicts_none() {
        let live = vmi("live-1", "node-1");
        let bare = vmi("bare-1", "node-1");
        let pods = vec![launcher(&live, "node-1"), launcher(&bare, "node-1")];
        let vmis = vec![
            (live.clone(), facts(&live, "LiveMigrate", true)),
            (bare.clone(), facts(&bare, "LiveMigrate", true)),
        ];
        let plan = dry_run_plan(
            "node-1",
            Scope::Vms,
            false,
            &vmis,
            &pods,
            &ClusterStrategy::NoCr("none".into()),
        );
        let p = power_event_plan(plan, &[(live, Some("live-1".into())), (bare, None)]);
        assert_eq!(p[0].object, "node/node-1", "the cordon stays first");
        let find = |o: &str| p.iter().find(|x| x.object == o).unwrap().clone();
        assert_eq!(find("vmi/default/live-1").action, "stop");
        assert!(
            find("vmi/default/live-1")
                .why
                .contains("virtualmachine/live-1")
        );
        assert!(find("vmi/default/bare-1").why.contains("not started again"));
        assert!(
            p.iter()
                .all(|x| x.action != "evict" && x.action != "migrate"),
            "{p:?}"
        );
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
