//! Section 5: what a fleet of agents costs the API server. One bed of many nodes, each with
//! its own logind (elogind: the agent's code path is the same as on systemd); first a window
//! with no agent at all, then agents on 50, 100, 200 nodes (one per node, each with a user of
//! its own so the audit log attributes every request), each size idle for a window and then
//! through a rolling reboot of 10 nodes that carry VMIs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use super::agent::AgentPod;
use super::audit::{self, Request};
use super::procfs::{self, Load, Memory};
use super::{Settings, stats};
use crate::bed::{Bed, BedOptions, LogindKind, Loginds, NodeLogind};
use crate::controlplane::ControlPlaneOptions;
use crate::kubevirt::{VmGroup, VmSpec, VmiKind};
use crate::logind::{Elogind, ElogindOptions, LogindNode};
use crate::timeline::{Recorder, secs_between};

const DELAY_SECS: u64 = 120;

fn user_of(node: &str) -> String {
    format!("bench:agent:{node}")
}

/// The API server over one window.
#[derive(Clone, Debug, Default)]
pub struct ApiServer {
    /// utime + stime over the window, share of one core.
    pub cpu: f64,
    /// VmRSS at the window's end, KiB.
    pub rss: u64,
    /// Watches open at the window's end, every client.
    pub watches: usize,
    /// Requests per second, every client.
    pub rate: f64,
}

/// One fleet size, idle.
#[derive(Clone, Debug, Default)]
pub struct Step {
    pub agents: usize,
    pub window: Duration,
    pub api: ApiServer,
    /// Requests per hour of each agent, extrapolated from the window.
    pub per_agent_hourly: Vec<f64>,
    /// What the agents asked, all together.
    pub breakdown: audit::RequestCounts,
    pub agent_watches: usize,
    /// CPU of each agent (holder and worker), share of one core.
    pub agent_cpu: Vec<f64>,
    /// Memory of each agent (holder and worker).
    pub agent_memory: Vec<Memory>,
    pub rolling: Option<Rolling>,
}

/// A rolling reboot, one node after the other.
#[derive(Clone, Debug, Default)]
pub struct Rolling {
    pub nodes: usize,
    pub vmis: usize,
    pub took: f64,
    pub api: ApiServer,
    /// Requests of the agents of the rebooted nodes (old and new pods), per node.
    pub per_rebooted_node: f64,
    /// Requests of every other agent, all together.
    pub others: u32,
    /// Per node: shutdown requested → lock released, seconds.
    pub drains: Vec<f64>,
    /// VMIs still on a node when it powered off, as a watch saw them.
    pub left_on_node: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Fleet {
    pub nodes: usize,
    pub baseline: Step,
    pub steps: Vec<Step>,
    pub load: Load,
    pub failures: Vec<String>,
}

fn api_pid(bed: &Bed) -> Option<u32> {
    bed.control_plane
        .pids()
        .into_iter()
        .find(|(n, _)| n == "kube-apiserver")
        .map(|(_, p)| p)
}

/// Measures the API server (and whatever `during` does) over `window`, or for as long as
/// `during` runs.
async fn measure<F, T>(bed: &Bed, during: F) -> (ApiServer, T, SystemTime, SystemTime)
where
    F: std::future::Future<Output = T>,
{
    let pid = api_pid(bed);
    let c0 = pid.and_then(procfs::cpu_ticks).unwrap_or(0);
    let t0 = SystemTime::now();
    let out = during.await;
    let t1 = SystemTime::now();
    let c1 = pid.and_then(procfs::cpu_ticks).unwrap_or(0);
    let secs = secs_between(t0, t1).max(1e-9);
    let reqs = audit::requests(&bed.control_plane);
    let api = ApiServer {
        cpu: c1.saturating_sub(c0) as f64 / procfs::ticks_per_sec() / secs,
        rss: pid.and_then(procfs::memory).map(|m| m.rss).unwrap_or(0),
        watches: audit::open_watches(&reqs, |_| true, t1),
        rate: reqs
            .iter()
            .filter(|r| r.received >= t0 && r.received <= t1)
            .count() as f64
            / secs,
    };
    (api, out, t0, t1)
}

/// Requests per user in `[from, to]`.
fn by_user(reqs: &[Request], from: SystemTime, to: SystemTime) -> BTreeMap<&str, u32> {
    let mut m = BTreeMap::new();
    for r in reqs
        .iter()
        .filter(|r| r.received >= from && r.received <= to)
    {
        *m.entry(r.user.as_str()).or_default() += 1;
    }
    m
}

struct Agents {
    pods: BTreeMap<String, AgentPod>,
    kubeconfigs: BTreeMap<String, PathBuf>,
}

impl Agents {
    async fn start(&mut self, bed: &Bed, s: &Settings, nodes: &[String]) -> Result<()> {
        for node in nodes {
            if self.pods.contains_key(node) {
                continue;
            }
            let kc = match self.kubeconfigs.get(node) {
                Some(k) => k.clone(),
                None => {
                    let k = bed.control_plane.user_kubeconfig(
                        &format!("bench-agent-{node}"),
                        &user_of(node),
                        &["system:masters"],
                    )?;
                    self.kubeconfigs.insert(node.clone(), k.clone());
                    k
                }
            };
            let pod = AgentPod::spawn(bed, node, &s.agent, &kc).await?;
            self.pods.insert(node.clone(), pod);
        }
        for node in nodes {
            let pod = self.pods.get_mut(node).expect("just started");
            pod.wait_ready(bed, Duration::from_secs(120))
                .await
                .with_context(|| format!("the agent on {node}"))?;
        }
        Ok(())
    }
}

pub async fn run(s: &Settings) -> Result<Fleet> {
    let nodes = s.fleet_sizes.iter().copied().max().unwrap_or(0).max(2);
    let mut fleet = Fleet {
        nodes,
        load: Load::start(),
        ..Fleet::default()
    };
    eprintln!("bench: fleet bed of {nodes} nodes with a logind each");
    let mut bed = Bed::start(BedOptions {
        nodes,
        vms: VmSpec::default(),
        logind: LogindKind::Elogind,
        loginds: Loginds::All,
        other_logind: LogindKind::Elogind,
        inhibit_delay_max_secs: Some(DELAY_SECS),
        kubevirt: s.kubevirt(),
        control_plane: ControlPlaneOptions::default(),
    })
    .await
    .context("starting the fleet's bed")?;
    // A size that fails (its agents do not start, say) keeps the sizes measured before it.
    if let Err(e) = run_in(&mut bed, s, &mut fleet).await {
        eprintln!("bench: fleet stopped: {e:#}");
        fleet.failures.push(format!("{e:#}"));
    }
    bed.shutdown().await.context("tearing the bed down")?;
    fleet.load.end();
    Ok(fleet)
}

async fn run_in(bed: &mut Bed, s: &Settings, fleet: &mut Fleet) -> Result<()> {
    eprintln!(
        "bench: fleet baseline, no agent, {} s",
        s.fleet_baseline.as_secs()
    );
    let (api, (), _, _) = measure(bed, tokio::time::sleep(s.fleet_baseline)).await;
    fleet.baseline = Step {
        agents: 0,
        window: s.fleet_baseline,
        api,
        ..Step::default()
    };
    let mut agents = Agents {
        pods: BTreeMap::new(),
        kubeconfigs: BTreeMap::new(),
    };
    let names = bed.nodes().to_vec();
    for (i, &size) in s.fleet_sizes.iter().enumerate() {
        let on: Vec<String> = names.iter().take(size).cloned().collect();
        eprintln!("bench: fleet of {size} agents: starting them");
        agents.start(bed, s, &on).await?;
        // Start-up lists and watches done before the window.
        tokio::time::sleep(Duration::from_secs(10)).await;
        eprintln!(
            "bench: fleet of {size} agents idle for {} s",
            s.fleet_window.as_secs()
        );
        let mut pids: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for node in &on {
            pids.insert(
                node.clone(),
                agents.pods[node].processes(Duration::from_secs(10)).await?,
            );
        }
        let cpu = |p: &Vec<u32>| p.iter().filter_map(|&x| procfs::cpu_ticks(x)).sum::<u64>();
        let c0: BTreeMap<&String, u64> = pids.iter().map(|(n, p)| (n, cpu(p))).collect();
        let (api, (), t0, t1) = measure(bed, tokio::time::sleep(s.fleet_window)).await;
        let secs = secs_between(t0, t1);
        let reqs = audit::requests(&bed.control_plane);
        let users = by_user(&reqs, t0, t1);
        let mut step = Step {
            agents: size,
            window: s.fleet_window,
            api,
            per_agent_hourly: on
                .iter()
                .map(|n| *users.get(user_of(n).as_str()).unwrap_or(&0) as f64 * 3600.0 / secs)
                .collect(),
            breakdown: audit::count(&reqs, |u| u.starts_with("bench:agent:"), t0, t1),
            agent_watches: audit::open_watches(&reqs, |u| u.starts_with("bench:agent:"), t1),
            agent_cpu: pids
                .iter()
                .map(|(n, p)| cpu(p).saturating_sub(c0[n]) as f64 / procfs::ticks_per_sec() / secs)
                .collect(),
            agent_memory: pids
                .values()
                .map(|p| {
                    p.iter()
                        .filter_map(|&x| procfs::memory(x))
                        .fold(Memory::default(), |a, b| a + b)
                })
                .collect(),
            rolling: None,
        };
        eprintln!(
            "bench:   API server {:.1} % of a core, {} watches; agents: median {:.1} requests/h, median CPU {:.4} % of a core",
            100.0 * step.api.cpu,
            step.api.watches,
            stats::median(&step.per_agent_hourly),
            100.0 * stats::median(&step.agent_cpu)
        );
        let reboot: Vec<String> = on.iter().take(s.fleet_reboots).cloned().collect();
        match rolling(bed, s, &mut agents, &reboot, i).await {
            Ok(r) => step.rolling = Some(r),
            Err(e) => fleet
                .failures
                .push(format!("rolling reboot at {size} agents: {e:#}")),
        }
        fleet.steps.push(step);
    }
    for (_, pod) in std::mem::take(&mut agents.pods) {
        pod.stop().await;
    }
    Ok(())
}

/// Two VMIs on each of `nodes`, then each node in turn: power-off, wait for its agent to let
/// go, a fresh logind (the node's next boot), a fresh agent.
async fn rolling(
    bed: &mut Bed,
    s: &Settings,
    agents: &mut Agents,
    nodes: &[String],
    round: usize,
) -> Result<Rolling> {
    let ns = format!("fleet-{round}");
    bed.control_plane.create_namespace(&ns).await?;
    let spec = VmSpec {
        groups: nodes
            .iter()
            .map(|n| VmGroup {
                node: Some(n.clone()),
                kind: VmiKind::Live,
                count: 2,
                memory: None,
                vm: None,
                hotplug: false,
                boot: None,
            })
            .collect(),
    };
    bed.kubevirt
        .create_vmis(&ns, &nodes[0], &spec)
        .await
        .context("creating the VMIs of the rolling reboot")?;
    eprintln!("bench:   rolling reboot of {} nodes", nodes.len());
    let mut drains = Vec::new();
    let mut left = 0;
    let users: Vec<String> = nodes.iter().map(|n| user_of(n)).collect();
    let (api, result, t0, t1) = measure(bed, async {
        for node in nodes {
            let recorder = Recorder::start(bed.client(), node).await;
            let handle = bed.node(node)?;
            let watch = handle
                .watch_release(super::agent::WHO, Duration::from_secs(DELAY_SECS + 30))
                .await;
            let asked = SystemTime::now();
            handle.poweroff().await?;
            let released = watch.wait().await.map(|r| r.gone);
            handle
                .wait_poweroff(Duration::from_secs(DELAY_SECS + 30))
                .await?;
            left += recorder.vmis_on_node().len();
            if let Some(r) = released {
                drains.push(secs_between(asked, r));
            }
            // The node boots again: its pods are gone with it, it has a fresh logind and a
            // new boot ID, and the DaemonSet starts the agent again.
            if let Some(old) = agents.pods.remove(node) {
                old.stop().await;
            }
            let fresh = Elogind::start(ElogindOptions {
                inhibit_delay_max_secs: DELAY_SECS,
                ..ElogindOptions::default()
            })
            .await?;
            let id = fresh.boot_id();
            *handle.logind().write().await = NodeLogind::Elogind(fresh);
            bed.kubelet.set_boot_id(node, &id).await?;
            agents.start(bed, s, std::slice::from_ref(node)).await?;
        }
        anyhow::Ok(())
    })
    .await;
    result?;
    let reqs = audit::requests(&bed.control_plane);
    let counts = by_user(&reqs, t0, t1);
    let ours: u32 = users
        .iter()
        .map(|u| counts.get(u.as_str()).copied().unwrap_or(0))
        .sum();
    let all: u32 = counts
        .iter()
        .filter(|(u, _)| u.starts_with("bench:agent:"))
        .map(|(_, c)| *c)
        .sum();
    Ok(Rolling {
        nodes: nodes.len(),
        vmis: 2 * nodes.len(),
        took: secs_between(t0, t1),
        api,
        per_rebooted_node: ours as f64 / nodes.len().max(1) as f64,
        others: all - ours,
        drains,
        left_on_node: left,
    })
}
