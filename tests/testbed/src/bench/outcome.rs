//! Section 1 and 2: what each way of protecting a node gets from the same shutdown. Each cell
//! is one shutdown of node-1 (a real systemd node) with a fresh set of VMIs from the mix in a
//! namespace of its own, after which node-1 boots again for the next cell; every figure comes
//! from logind (the node's console and its inhibitor state file), the API server's audit log
//! and the VM ledger.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};

use super::agent::{AgentPod, WHO};
use super::audit::{self, RequestCounts};
use super::bound::{self, Bound};
use super::procfs::{self, Load, Sampler};
use super::{AGENT_USER, KUBECTL_DRAIN_FLAGS, KUBECTL_USER, Settings, gns, hook, mix};
use crate::bed::{Bed, BedOptions, LogindKind, Loginds, NODE};
use crate::controlplane::ControlPlaneOptions;
use crate::kubevirt::{VirtualMachineInstance, VirtualMachineInstanceMigration, VmSpec};
use crate::ledger::Outcome;
use crate::timeline::secs_between;

/// The ways a node can meet its shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tool {
    Guard,
    Kubelet,
    Hook,
    Manual,
    Nothing,
}

impl Tool {
    pub const ALL: [Tool; 5] = [
        Tool::Guard,
        Tool::Kubelet,
        Tool::Hook,
        Tool::Manual,
        Tool::Nothing,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Tool::Guard => "shutdown-guard",
            Tool::Kubelet => "kubelet graceful node shutdown",
            Tool::Hook => "`kubectl drain` in a shutdown hook",
            Tool::Manual => "manual: `kubectl drain`, then power-off",
            Tool::Nothing => "no protection",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Tool::Guard => "guard",
            Tool::Kubelet => "kubelet",
            Tool::Hook => "hook",
            Tool::Manual => "manual",
            Tool::Nothing => "none",
        }
    }

    /// Whether logind's delay bounds what the tool does: the manual drain has no deadline and
    /// no protection has nothing to bound, so those run once per size.
    pub fn budget_applies(self) -> bool {
        matches!(self, Tool::Guard | Tool::Kubelet | Tool::Hook)
    }
}

/// CPU and memory of the agent's processes (holder and worker together) during a drain.
#[derive(Clone, Debug, Default)]
pub struct DrainFootprint {
    /// CPU over the drain apart from its first second, as a share of one core.
    pub cpu_share: f64,
    /// The window it was measured over, seconds.
    pub window: f64,
    /// Highest sum of VmRSS seen (sampled every 100 ms), KiB.
    pub peak_rss: u64,
    /// Sum of each process's VmHWM at the end, KiB (an upper bound on the joint peak).
    pub hwm_sum: u64,
}

/// One migration of a cell, from its `phaseTransitionTimestamps`.
#[derive(Clone, Debug)]
pub struct MigrationRecord {
    pub vmi: String,
    /// Admitted into a slot (phase Scheduling).
    pub admitted: Option<SystemTime>,
    /// Succeeded or Failed.
    pub ended: Option<SystemTime>,
    pub succeeded: bool,
}

/// One shutdown by one tool.
#[derive(Clone, Debug)]
pub struct Cell {
    pub tool: Tool,
    pub n: usize,
    /// logind's `InhibitDelayMaxSec` for this shutdown.
    pub budget: u64,
    pub migrated: usize,
    pub stopped: usize,
    pub lost: usize,
    pub other: usize,
    /// The shutdown request (manual: the drain's start).
    pub requested: SystemTime,
    /// The last VMI left node-1 (before power-off), when none stayed.
    pub empty: Option<SystemTime>,
    /// `Shutting down.` on node-1's console.
    pub powered_off: Option<SystemTime>,
    /// shutdown-guard's lock gone, from logind's state file.
    pub released: Option<SystemTime>,
    pub first_eviction: Option<SystemTime>,
    pub bound: Bound,
    /// The tool's own requests from the request to the power-off.
    pub requests: RequestCounts,
    pub footprint: Option<DrainFootprint>,
    pub migrations: Vec<MigrationRecord>,
    pub notes: Vec<String>,
}

impl Cell {
    pub fn time_to_empty(&self) -> Option<f64> {
        self.empty.map(|e| secs_between(self.requested, e))
    }
    pub fn time_to_power_off(&self) -> Option<f64> {
        self.powered_off.map(|p| secs_between(self.requested, p))
    }
}

/// A cell that could not be measured, and why.
#[derive(Clone, Debug)]
pub struct Failure {
    pub tool: Tool,
    pub n: usize,
    pub budget: u64,
    pub error: String,
}

/// Everything section 1 measured.
#[derive(Clone, Debug, Default)]
pub struct Matrix {
    pub cells: Vec<Cell>,
    pub failures: Vec<Failure>,
    /// Cells whose setup (before the shutdown) failed once and were run again.
    pub retried: Vec<Failure>,
    /// Load before and after each size's bed.
    pub loads: BTreeMap<usize, Load>,
    pub params: Option<bound::BoundParams>,
}

/// Kubeconfigs of the tools' own users, so the audit log tells their requests apart.
pub(super) fn kubeconfigs(bed: &Bed) -> Result<(PathBuf, PathBuf)> {
    let cp = &bed.control_plane;
    Ok((
        cp.user_kubeconfig("bench-agent", AGENT_USER, &["system:masters"])?,
        cp.user_kubeconfig("bench-kubectl", KUBECTL_USER, &["system:masters"])?,
    ))
}

/// Nodes for `n` VMIs: node-1 and enough others that the migrated VMIs fit well within
/// kubelet's 110 pods per node.
fn nodes_for(n: usize) -> usize {
    1 + n.div_ceil(60).max(2)
}

pub(super) fn bed_options(s: &Settings, nodes: usize, delay: u64) -> BedOptions {
    BedOptions {
        nodes,
        vms: VmSpec::default(),
        logind: LogindKind::Systemd,
        loginds: Loginds::First(1),
        inhibit_delay_max_secs: Some(delay),
        kubevirt: s.kubevirt(),
        control_plane: ControlPlaneOptions::default(),
        ..BedOptions::default()
    }
}

/// Every cell of one size, on one bed.
pub async fn run_size(s: &Settings, n: usize, matrix: &mut Matrix) -> Result<()> {
    let mut load = Load::start();
    let first = s.budgets.first().copied().unwrap_or(60);
    let mut bed = Bed::start(bed_options(s, nodes_for(n), first))
        .await
        .context("starting the bed")?;
    let result = run_size_in(&mut bed, s, n, matrix).await;
    let down = bed.shutdown().await;
    load.end();
    matrix.loads.insert(n, load);
    result?;
    down.context("tearing the bed down")?;
    Ok(())
}

async fn run_size_in(bed: &mut Bed, s: &Settings, n: usize, matrix: &mut Matrix) -> Result<()> {
    let (agent_kc, kubectl_kc) = kubeconfigs(bed)?;
    let mut plan: Vec<(Tool, u64)> = Vec::new();
    for &budget in &s.budgets {
        for tool in s.tools.iter().copied().filter(|t| t.budget_applies()) {
            plan.push((tool, budget));
        }
    }
    let last = s.budgets.last().copied().unwrap_or(60);
    for tool in s.tools.iter().copied().filter(|t| !t.budget_applies()) {
        plan.push((tool, last));
    }
    for (tool, budget) in plan {
        eprintln!("bench: outcome N={n} budget {budget} s: {}", tool.label());
        let kc = match tool {
            Tool::Guard => &agent_kc,
            _ => &kubectl_kc,
        };
        let mut cell = run_cell(bed, s, tool, n, budget, kc).await;
        // Whatever happened, node-1 boots again and nothing of the cell stays behind.
        let mut restored = restore(bed, &namespace(tool, n, budget)).await;
        // A cell that failed before its shutdown measured nothing: run it once more, and say so.
        if restored.is_ok()
            && let Err(e) = &cell
            && e.downcast_ref::<Setup>().is_some()
        {
            eprintln!("bench:   setup failed ({e:#}); running the cell once more");
            matrix.retried.push(Failure {
                tool,
                n,
                budget,
                error: format!("{e:#}"),
            });
            cell = run_cell(bed, s, tool, n, budget, kc).await;
            restored = restore(bed, &namespace(tool, n, budget)).await;
        }
        match cell {
            Ok(c) => {
                eprintln!(
                    "bench:   {} migrated, {} stopped, {} lost; empty after {}, power-off after {}",
                    c.migrated,
                    c.stopped,
                    c.lost,
                    c.time_to_empty().map_or("–".into(), super::stats::secs),
                    c.time_to_power_off().map_or("–".into(), super::stats::secs)
                );
                matrix.cells.push(c);
            }
            Err(e) => {
                eprintln!("bench:   failed: {e:#}");
                matrix.failures.push(Failure {
                    tool,
                    n,
                    budget,
                    error: format!("{e:#}"),
                });
            }
        }
        restored.context("restoring node-1 for the next cell")?;
    }
    Ok(())
}

/// A cell's setup failed before its shutdown started: nothing was measured.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Setup(String);

fn namespace(tool: Tool, n: usize, budget: u64) -> String {
    format!("{}-n{n}-b{budget}", tool.slug())
}

/// One shutdown of node-1 by `tool`.
async fn run_cell(
    bed: &mut Bed,
    s: &Settings,
    tool: Tool,
    n: usize,
    budget: u64,
    kubeconfig: &Path,
) -> Result<Cell> {
    let ns = namespace(tool, n, budget);
    let client = bed.client();
    bed.control_plane.create_namespace(&ns).await?;
    bed.node(NODE)?.set_inhibit_delay_max(budget).await?;
    reset_node(&client).await?;
    bed.kubevirt
        .create_vmis(&ns, NODE, &mix::spec(n))
        .await
        .map_err(|e| Setup(format!("creating {n} VMIs: {e}")))?;
    let mut notes = Vec::new();

    // Arm the tool.
    let mut agent = None;
    let mut kubelet = None;
    let mut _hook = None;
    match tool {
        Tool::Guard => {
            let mut a = AgentPod::spawn(bed, NODE, &s.agent, kubeconfig).await?;
            a.wait_ready(bed, Duration::from_secs(30)).await?;
            agent = Some(a);
        }
        Tool::Kubelet => {
            kubelet = Some(
                gns::GracefulNodeShutdown::start(
                    bed,
                    NODE,
                    gns::Config {
                        grace_period: Duration::from_secs(budget),
                        critical_pods: s.kubelet_critical,
                    },
                )
                .await?,
            );
        }
        Tool::Hook => {
            _hook = Some(hook::install(bed, NODE, kubeconfig, Duration::from_secs(budget)).await?);
        }
        Tool::Manual | Tool::Nothing => {}
    }
    let sampler = match &agent {
        Some(a) => Some(Sampler::start(
            a.processes(Duration::from_secs(10)).await?,
            Duration::from_millis(100),
        )),
        None => None,
    };
    let release = match tool {
        Tool::Guard => Some(
            bed.watch_release(WHO, Duration::from_secs(budget + 60))
                .await,
        ),
        _ => None,
    };

    // The shutdown.
    let requested = SystemTime::now();
    if tool == Tool::Manual {
        let out = manual_drain(kubeconfig, n).await?;
        notes.push(out);
    }
    bed.poweroff()
        .await
        .context("starting node-1's power-off")?;
    // The agent's CPU from one second into the drain.
    let after_first_second = match &sampler {
        Some(sm) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            sm.last()
        }
        None => None,
    };
    let limit = Duration::from_secs(budget + 120);
    let powered_off = bed.wait_poweroff(limit).await.ok();
    let released = match release {
        Some(w) => w.wait().await.map(|r| r.gone),
        None => None,
    };
    if let Some(k) = kubelet {
        match k.wait(Duration::from_secs(10)).await {
            Ok(run) => notes.push(format!(
                "kubelet killed {} pods and released its lock {:.1} s after the signal",
                run.killed.len(),
                secs_between(run.signal, run.released)
            )),
            Err(e) => notes.push(format!("kubelet's shutdown manager: {e:#}")),
        }
    }
    let footprint = sampler.map(|sm| {
        let peak = sm.peak_rss();
        let (_, last) = sm.finish();
        drain_footprint(after_first_second, last, peak)
    });
    if let Some(a) = agent {
        a.stop().await;
    }
    if powered_off.is_none() {
        notes.push(format!("node-1 did not power off within {limit:?}"));
    }

    // Let the watches deliver what happened up to the power-off, then read the ledger.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledger = bed.ledger().await;
    let prefix = format!("{ns}/");
    let mut cell = Cell {
        tool,
        n,
        budget,
        migrated: 0,
        stopped: 0,
        lost: 0,
        other: 0,
        requested,
        empty: None,
        powered_off,
        released,
        first_eviction: None,
        bound: bound::lower_bound(&mix::vms(n), &s.bound_params()),
        requests: RequestCounts::new(),
        footprint,
        migrations: migrations(&client, &ns).await?,
        notes,
    };
    let mut last_departure = requested;
    let mut all_left = true;
    for (key, fate) in ledger.vmis.iter().filter(|(k, _)| k.starts_with(&prefix)) {
        let left = match &fate.outcome {
            Outcome::Lost { .. } => {
                cell.lost += 1;
                None
            }
            Outcome::StoppedGracefully { at, node, .. } if node == NODE => {
                cell.stopped += 1;
                Some(*at)
            }
            _ if fate.is_migrated() => {
                cell.migrated += 1;
                fate.migrations.first().map(|m| m.at)
            }
            other => {
                cell.other += 1;
                cell.notes.push(format!("{key}: {other:?}"));
                None
            }
        };
        match left {
            Some(t) if powered_off.is_none_or(|p| t <= p) => last_departure = last_departure.max(t),
            _ => all_left = false,
        }
    }
    ensure!(
        cell.migrated + cell.stopped + cell.lost + cell.other == n,
        "the ledger knows {} of the {n} VMIs of {ns}",
        cell.migrated + cell.stopped + cell.lost + cell.other
    );
    if all_left {
        cell.empty = Some(last_departure);
    }
    let reqs = audit::requests(&bed.control_plane);
    let user = match tool {
        Tool::Guard => Some(AGENT_USER),
        Tool::Hook | Tool::Manual => Some(KUBECTL_USER),
        _ => None,
    };
    if let Some(user) = user {
        let end = powered_off.unwrap_or_else(SystemTime::now);
        let from = if tool == Tool::Manual {
            requested
        } else {
            requested - Duration::from_millis(1)
        };
        cell.requests = audit::count(&reqs, |u| u == user, from, end);
        cell.first_eviction = audit::first_eviction(&reqs, user, from);
    }
    Ok(cell)
}

async fn migrations(client: &Client, ns: &str) -> Result<Vec<MigrationRecord>> {
    let api: Api<VirtualMachineInstanceMigration> = Api::namespaced(client.clone(), ns);
    let at = |m: &VirtualMachineInstanceMigration, phase: &str| {
        m.transition_time(phase).map(SystemTime::from)
    };
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|m| MigrationRecord {
            vmi: m.spec.vmi_name.clone(),
            admitted: at(m, "Scheduling"),
            ended: at(m, "Succeeded").or_else(|| at(m, "Failed")),
            succeeded: m.phase() == "Succeeded",
        })
        .collect())
}

fn drain_footprint(
    from: Option<procfs::Sample>,
    to: Option<procfs::Sample>,
    peak_rss: u64,
) -> DrainFootprint {
    let (Some(a), Some(b)) = (from, to) else {
        return DrainFootprint::default();
    };
    let window = match (a.at, b.at) {
        (Some(x), Some(y)) => secs_between(x, y),
        _ => 0.0,
    };
    DrainFootprint {
        cpu_share: if window > 0.0 {
            (b.cpu_ticks.saturating_sub(a.cpu_ticks)) as f64 / procfs::ticks_per_sec() / window
        } else {
            f64::NAN
        },
        window,
        peak_rss,
        hwm_sum: b.memory.hwm,
    }
}

/// The seed's manual procedure, first half: `kubectl drain` with its flags until it exits.
async fn manual_drain(kubeconfig: &Path, n: usize) -> Result<String> {
    let limit = Duration::from_secs(1800 + 5 * n as u64);
    let out = tokio::time::timeout(
        limit,
        tokio::process::Command::new(Bed::kubectl_path())
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["drain", NODE])
            .args(KUBECTL_DRAIN_FLAGS)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("kubectl drain ran longer than {limit:?}"))?
    .context("running kubectl drain")?;
    if !out.status.success() {
        bail!(
            "kubectl drain failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(format!(
        "kubectl drain exited {} ({} lines of output)",
        out.status,
        out.stdout.iter().filter(|&&b| b == b'\n').count()
    ))
}

/// Node-1 schedulable, without the agent's annotations and without pods.
pub(super) async fn reset_node(client: &Client) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get(NODE).await?;
    let ours: serde_json::Map<String, serde_json::Value> = node
        .metadata
        .annotations
        .unwrap_or_default()
        .into_keys()
        .filter(|k| k.contains("shutdown-guard"))
        .map(|k| (k, serde_json::Value::Null))
        .collect();
    nodes
        .patch(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "metadata": {"annotations": ours},
                "spec": {"unschedulable": null},
            })),
        )
        .await
        .context("resetting node-1")?;
    Ok(())
}

/// After a cell: node-1 up again (a new boot), the cell's VMIs and migrations gone, no pods
/// left on node-1. A node-1 that never shut down (the cell failed before) is rebooted, so
/// nothing the cell started in it (a hook, a lock) reaches the next cell.
async fn restore(bed: &mut Bed, ns: &str) -> Result<()> {
    let alive = {
        let mut logind = bed.logind.write().await;
        let node = logind
            .systemd()
            .context("the outcome cells need a systemd node-1")?;
        let shut_down = node.power_offs().len() as u32 >= node.boot_count();
        if !node.is_running() || shut_down {
            node.wait_exit(Duration::from_secs(120)).await?;
            node.boot_again().await?;
            let id = crate::logind::LogindNode::boot_id(&*node);
            drop(logind);
            bed.kubelet.set_boot_id(NODE, &id).await?;
            false
        } else {
            true
        }
    };
    cleanup(bed, ns).await?;
    if alive {
        bed.reboot_node(Duration::from_secs(120)).await?;
    }
    Ok(())
}

async fn cleanup(bed: &Bed, ns: &str) -> Result<()> {
    let client = bed.client();
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(client.clone(), ns);
    let vmims: Api<VirtualMachineInstanceMigration> = Api::namespaced(client.clone(), ns);
    let pods_ns: Api<Pod> = Api::namespaced(client.clone(), ns);
    let _ = vmims
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    let _ = vmis
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    let end = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        // Launchers on node-1 are on a node that powered off: gone at once.
        let pods = pods_ns.list(&ListParams::default()).await?;
        for p in &pods.items {
            let name = p.metadata.name.clone().unwrap_or_default();
            let _ = pods_ns
                .delete(&name, &DeleteParams::default().grace_period(0))
                .await;
        }
        let left_vmis = vmis.list(&ListParams::default()).await?.items.len();
        let running_migrations = vmims
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|m| !matches!(m.phase(), "Succeeded" | "Failed"))
            .count();
        if pods.items.is_empty() && left_vmis == 0 && running_migrations == 0 {
            break;
        }
        if tokio::time::Instant::now() >= end {
            bail!(
                "{ns} still has {} pods, {left_vmis} VMIs and {running_migrations} unfinished migrations",
                pods.items.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    reset_node(&client).await
}
