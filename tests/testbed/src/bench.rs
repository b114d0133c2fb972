//! `testbed bench`: shutdown-guard against the reference `kubectl drain` on the same bed, plus
//! the agent's latencies, footprint and API cost (issue 6).
//!
//! Every figure comes from outside the agent: logind's own state (the inhibitor's state file
//! under logind's `/run/systemd/inhibit`, which logind unlinks the moment it sees the lock's fd
//! close), the API server's audit log, watch events, `/proc` of the agent's process, and a
//! `PrepareForShutdown` subscription of the bench's own on node-1's bus.
//!
//! Overhead is "node known empty" (agent: logind dropped the lock; kubectl: the command exited)
//! minus the moment the API server received the write that moved the last VMI off node-1, i.e.
//! the simulator's own finishing time. Both tools drain the same number of VMIs in the same bed,
//! one after the other, alternating which goes first, a fresh bed per repetition.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};

use crate::bed::{Bed, BedOptions, LogindKind, NODE, NodeLogind};
use crate::controlplane::{ControlPlane, ControlPlaneOptions};
use crate::kubevirt::{KubeVirtOptions, VmSpec};
use crate::logind::{LOGIN1_MANAGER, LOGIN1_PATH};
use crate::timeline::{Recorder, secs_between};

/// The seed's reference drain.
pub const KUBECTL_DRAIN: &[&str] = &[
    "drain",
    NODE,
    "--delete-emptydir-data",
    "--ignore-daemonsets",
    "--force",
    "--pod-selector=kubevirt.io=virt-launcher",
];

/// Users the two tools authenticate as, so the audit log attributes every request.
pub const AGENT_USER: &str = "bench:shutdown-guard";
pub const KUBECTL_USER: &str = "bench:kubectl";
/// `who` of the agent's inhibitor.
pub const WHO: &str = "shutdown-guard";

#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Development run: sizes 1,10, one repetition, 5 latency runs, 10 s idle window.
    #[arg(long)]
    pub quick: bool,
    /// Repetitions per size of the overhead comparison (default 3; quick 1).
    #[arg(long)]
    pub reps: Option<usize>,
    /// VMI counts on node-1 for the overhead comparison (default 1,10,50,200; quick 1,10).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Option<Vec<usize>>,
    /// Power-offs for the latency percentiles (default 20; quick 5).
    #[arg(long)]
    pub latency_runs: Option<usize>,
    /// VMIs on node-1 in each latency run.
    #[arg(long, default_value_t = 3)]
    pub latency_vms: usize,
    /// Seconds of the idle window for RSS, CPU and idle API requests (default 60; quick 10).
    #[arg(long)]
    pub idle_seconds: Option<u64>,
    /// Seconds a simulated live migration takes.
    #[arg(long, default_value_t = 1.0)]
    pub migration_seconds: f64,
    /// logind for the latency runs (systemd reboots the same node between runs).
    #[arg(long, default_value = "systemd")]
    pub latency_logind: LogindKind,
    /// Also poll ListInhibitors (every 2 ms) during the latency runs and report how much later
    /// it saw the release than logind's state file did (validates the method; adds bus load).
    #[arg(long)]
    pub cross_check_release: bool,
    /// Skip the overhead comparison.
    #[arg(long)]
    pub no_overhead: bool,
    /// Skip the latency, footprint and idle runs.
    #[arg(long)]
    pub no_latency: bool,
    /// The agent binary (default: TESTBED_AGENT_BIN, else target/debug/shutdown-guard).
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Where to write the report (default: BENCHMARKS.md at the workspace root).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// The settings one bench run uses, with `--quick` and defaults resolved.
#[derive(Clone, Debug)]
pub struct Settings {
    pub sizes: Vec<usize>,
    pub reps: usize,
    pub latency_runs: usize,
    pub latency_vms: usize,
    pub idle: Duration,
    pub migration: Duration,
    pub latency_logind: LogindKind,
    pub agent: PathBuf,
    pub cross_check: bool,
}

impl Settings {
    pub fn from_args(a: &BenchArgs) -> Result<Self> {
        ensure!(
            a.migration_seconds.is_finite() && a.migration_seconds >= 0.0,
            "--migration-seconds {}: give seconds ≥ 0",
            a.migration_seconds
        );
        let sizes = a.sizes.clone().unwrap_or_else(|| {
            if a.quick {
                vec![1, 10]
            } else {
                vec![1, 10, 50, 200]
            }
        });
        ensure!(
            sizes.iter().all(|&n| n >= 1),
            "--sizes: each size must be at least 1"
        );
        Ok(Self {
            sizes,
            reps: a.reps.unwrap_or(if a.quick { 1 } else { 3 }).max(1),
            latency_runs: a.latency_runs.unwrap_or(if a.quick { 5 } else { 20 }),
            latency_vms: a.latency_vms.max(1),
            idle: Duration::from_secs(a.idle_seconds.unwrap_or(if a.quick { 10 } else { 60 })),
            migration: Duration::from_secs_f64(a.migration_seconds),
            latency_logind: a.latency_logind,
            cross_check: a.cross_check_release,
            agent: a.agent.clone().unwrap_or_else(crate::demo::agent_binary),
        })
    }

    /// KubeVirt's parallel-migration limits (5 per cluster, 2 outbound per node upstream) would
    /// make N=200 a queue of 100 rounds; the bench lifts them for both tools alike.
    fn kubevirt(&self) -> KubeVirtOptions {
        KubeVirtOptions {
            migration_duration: self.migration,
            shutdown_duration: Duration::from_secs(1),
            parallel_migrations_per_cluster: 10_000,
            parallel_outbound_migrations_per_node: 10_000,
            ..KubeVirtOptions::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tool {
    Agent,
    Kubectl,
}

impl Tool {
    pub fn label(self) -> &'static str {
        match self {
            Tool::Agent => "shutdown-guard",
            Tool::Kubectl => "kubectl drain",
        }
    }
}

/// `verb resource[/subresource]` → count.
pub type RequestCounts = BTreeMap<String, u32>;

/// One drain by one tool.
#[derive(Clone, Debug)]
pub struct DrainRun {
    pub tool: Tool,
    pub vmis: usize,
    /// Start of the drain (agent: `PrepareForShutdown` seen on the bus; kubectl: spawned).
    pub started: SystemTime,
    /// The API server received the first eviction request.
    pub first_eviction: Option<SystemTime>,
    /// The API server received the write that moved the last VMI off node-1.
    pub last_vmi_gone: SystemTime,
    /// Node known empty (agent: logind unlinked the lock; kubectl: exited).
    pub empty: SystemTime,
    /// Requests of the tool from `started` until it was stopped.
    pub requests: RequestCounts,
    /// How the agent's release was observed.
    pub release_seen_by: &'static str,
}

impl DrainRun {
    /// Start to node known empty, seconds.
    pub fn wall(&self) -> f64 {
        secs_between(self.started, self.empty)
    }
    /// Node known empty minus last VMI gone, seconds.
    pub fn overhead(&self) -> f64 {
        secs_between(self.last_vmi_gone, self.empty)
    }
    pub fn total_requests(&self) -> u32 {
        self.requests.values().sum()
    }
}

// ---------------------------------------------------------------------------------------------
// Observers from outside the agent

/// Watches the agent's end of the lock: the descriptor in `/proc/<agent>/fd` that points at
/// logind's FIFO (`/run/systemd/inhibit/<id>.ref`), polled every 0.5 ms until it is closed. This
/// splits a slow release into the agent's part and logind's.
fn watch_agent_fd(
    pid: u32,
    timeout: Duration,
) -> Option<std::thread::JoinHandle<Option<SystemTime>>> {
    let fd = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| {
                t.to_string_lossy().contains("/inhibit/") && t.to_string_lossy().ends_with(".ref")
            })
        })?
        .path();
    let target = std::fs::read_link(&fd).ok()?;
    Some(std::thread::spawn(move || {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if std::fs::read_link(&fd).ok().as_ref() != Some(&target) {
                return Some(SystemTime::now());
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        None
    }))
}

/// Stamps the first `PrepareForShutdown(true)` / `PrepareForShutdownWithMetadata(true, …)` on
/// node-1's bus, as any process may subscribe to it from outside the node.
async fn subscribe_prepare_for_shutdown(
    bus_address: &str,
) -> Result<tokio::task::JoinHandle<Option<SystemTime>>> {
    let conn = crate::logind::connect(bus_address)
        .await
        .context("connecting to node-1's bus")?;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface(LOGIN1_MANAGER)?
        .path(LOGIN1_PATH)?
        .build();
    let mut stream = zbus::MessageStream::for_match_rule(rule, &conn, Some(64))
        .await
        .context("subscribing to logind's signals")?;
    Ok(tokio::spawn(async move {
        let _conn = conn;
        while let Some(Ok(msg)) = stream.next().await {
            let header = msg.header();
            let member = header.member().map(|m| m.as_str().to_owned());
            let start = match member.as_deref() {
                Some("PrepareForShutdown") => msg.body().deserialize::<bool>().ok(),
                Some("PrepareForShutdownWithMetadata") => msg
                    .body()
                    .deserialize::<(bool, HashMap<String, zbus::zvariant::OwnedValue>)>()
                    .ok()
                    .map(|(b, _)| b),
                _ => None,
            };
            if start == Some(true) {
                return Some(SystemTime::now());
            }
        }
        None
    }))
}

/// The agent process itself: the pod command wraps it in a shell, setpriv, unshare and the
/// pod's init shell, so walk the children of the spawned process.
pub fn find_process(root: u32, comm: &str) -> Option<u32> {
    let mut queue = vec![root];
    let mut seen = 0;
    while let Some(pid) = queue.pop() {
        seen += 1;
        if seen > 256 {
            break;
        }
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if name.trim() == comm {
            return Some(pid);
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            queue.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    None
}

/// When the agent logged each message (JSON log lines), in order. Used only to split a
/// latency into its parts, never as the measurement itself.
fn agent_marks(log: &Path) -> Vec<(String, SystemTime)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let at = parse_time(v.get("timestamp")?.as_str()?)?;
            Some((v.get("message")?.as_str()?.to_owned(), at))
        })
        .collect()
}

fn mark(marks: &[(String, SystemTime)], message: &str, last: bool) -> Option<SystemTime> {
    let mut it = marks.iter().filter(|(m, _)| m == message).map(|(_, t)| *t);
    if last { it.next_back() } else { it.next() }
}

/// `(VmRSS, VmHWM)` in KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are fixed.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|v| v as f64)
        .unwrap_or(100.0)
}

// ---------------------------------------------------------------------------------------------
// Audit log

/// An audit event reduced to what the bench counts.
#[derive(Clone, Debug)]
pub struct Request {
    pub user: String,
    pub verb: String,
    pub resource: String,
    pub name: String,
    pub namespace: String,
    pub stage: String,
    pub uri: String,
    pub received: SystemTime,
}

fn parse_time(s: &str) -> Option<SystemTime> {
    s.parse::<DateTime<Utc>>().ok().map(Into::into)
}

/// The fields of an audit event the bench reads (`requestURI` names non-resource requests such
/// as discovery).
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct AuditLine {
    stage: String,
    verb: String,
    #[serde(rename = "requestURI")]
    request_uri: String,
    user: crate::controlplane::AuditUser,
    object_ref: Option<crate::controlplane::AuditObjectRef>,
    request_received_timestamp: String,
    stage_timestamp: String,
}

impl AuditLine {
    fn resource(&self) -> String {
        match &self.object_ref {
            Some(r) if !r.resource.is_empty() => match &r.subresource {
                Some(sub) => format!("{}/{sub}", r.resource),
                None => r.resource.clone(),
            },
            _ => self
                .request_uri
                .split('?')
                .next()
                .unwrap_or_default()
                .to_owned(),
        }
    }
}

fn audit_lines(cp: &ControlPlane) -> Vec<AuditLine> {
    std::fs::read_to_string(cp.audit_log_path())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Requests as the audit log has them: non-watch requests at `ResponseComplete`, watches at
/// `ResponseStarted` (an open watch has no completion yet).
pub fn requests(cp: &ControlPlane) -> Vec<Request> {
    audit_lines(cp)
        .into_iter()
        .filter(|e| {
            (e.verb == "watch" && e.stage == "ResponseStarted")
                || (e.verb != "watch" && e.stage == "ResponseComplete")
        })
        .filter_map(|e| {
            let received = parse_time(&e.request_received_timestamp)?;
            let resource = e.resource();
            let r = e.object_ref.unwrap_or_default();
            Some(Request {
                resource,
                user: e.user.username,
                verb: e.verb,
                name: r.name.unwrap_or_default(),
                namespace: r.namespace.unwrap_or_default(),
                stage: e.stage,
                uri: e.request_uri,
                received,
            })
        })
        .collect()
}

fn count(reqs: &[Request], user: &str, from: SystemTime, to: SystemTime) -> RequestCounts {
    let mut out = RequestCounts::new();
    for r in reqs
        .iter()
        .filter(|r| r.user == user && r.received >= from && r.received <= to)
    {
        *out.entry(format!("{} {}", r.verb, r.resource)).or_default() += 1;
    }
    out
}

fn first_eviction(reqs: &[Request], user: &str, from: SystemTime) -> Option<SystemTime> {
    reqs.iter()
        .filter(|r| {
            r.user == user
                && r.verb == "create"
                && r.resource == "pods/eviction"
                && r.received >= from
        })
        .map(|r| r.received)
        .min()
}

/// When the API server received the write that moved the last VMI of `namespace` off node-1.
///
/// The simulator hands a migrated VMI over in two back-to-back writes, its status
/// (`nodeName`, `migrationState.completed`) and its `kubevirt.io/nodeName` label, either of
/// which tells a watcher the VMI left. Per VMI, take the writes received before the recorder's
/// watch showed it migrated, find the trailing burst (writes less than 250 ms apart; the
/// migration's earlier phases are half the migration time away) and take its first write.
/// The audit log has no bodies, so adjacency is all there is to tell the writes apart.
fn last_vmi_gone(recorder: &Recorder, reqs: &[Request], namespace: &str) -> Option<SystemTime> {
    let prefix = format!("{namespace}/");
    recorder
        .departures()
        .into_iter()
        .filter(|(vmi, _)| vmi.starts_with(&prefix))
        .filter_map(|(vmi, (seen, _))| {
            let name = &vmi[prefix.len()..];
            let mut writes: Vec<SystemTime> = reqs
                .iter()
                .filter(|r| {
                    r.resource.starts_with("virtualmachineinstances")
                        && r.namespace == namespace
                        && r.name == name
                        && matches!(r.verb.as_str(), "update" | "patch" | "delete")
                        && r.received <= seen
                })
                .map(|r| r.received)
                .collect();
            writes.sort();
            let mut first = *writes.last()?;
            for w in writes.iter().rev().skip(1) {
                if secs_between(*w, first) >= 0.25 {
                    break;
                }
                first = *w;
            }
            Some(first)
        })
        .max()
}

// ---------------------------------------------------------------------------------------------
// Bed helpers

async fn start_bed(logind: LogindKind, s: &Settings) -> Result<Bed> {
    Bed::start(BedOptions {
        nodes: 3,
        vms: VmSpec::default(),
        logind,
        inhibit_delay_max_secs: Some(600),
        kubevirt: s.kubevirt(),
        control_plane: ControlPlaneOptions::default(),
        ..BedOptions::default()
    })
    .await
    .context("starting the bed")
}

/// Brings node-1 back to a clean start: schedulable, none of the agent's annotations, no pods
/// left from an earlier drain (finished source pods would add work to the next one).
async fn reset_node(client: &Client) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.uncordon(NODE).await.context("uncordoning node-1")?;
    let pods: Api<Pod> = Api::all(client.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={NODE}"));
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let list = pods.list(&lp).await.context("listing node-1's pods")?;
        if list.items.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < end,
            "node-1 still has {} pods",
            list.items.len()
        );
        for p in list.items {
            let (Some(ns), Some(name)) = (p.metadata.namespace, p.metadata.name) else {
                continue;
            };
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let _ = api
                .delete(&name, &DeleteParams::default().grace_period(0))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes annotations the agent keeps on node-1 so each run starts from the same node.
async fn clear_agent_annotations(client: &Client) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get(NODE).await.context("reading node-1")?;
    let ours: Vec<String> = node
        .metadata
        .annotations
        .unwrap_or_default()
        .into_keys()
        .filter(|k| k.contains("shutdown-guard"))
        .collect();
    if ours.is_empty() {
        return Ok(());
    }
    let nulls: serde_json::Map<String, serde_json::Value> = ours
        .into_iter()
        .map(|k| (k, serde_json::Value::Null))
        .collect();
    nodes
        .patch(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": nulls}})),
        )
        .await
        .context("clearing the agent's annotations")?;
    Ok(())
}

async fn create_batch(bed: &Bed, namespace: &str, n: usize) -> Result<()> {
    bed.control_plane
        .create_namespace(namespace)
        .await
        .with_context(|| format!("creating namespace {namespace}"))?;
    let spec: VmSpec = format!("live={n}").parse().context("VM spec")?;
    bed.kubevirt
        .create_vmis(namespace, NODE, &spec)
        .await
        .with_context(|| format!("creating {n} VMIs in {namespace}"))?;
    Ok(())
}

async fn wait_departed(recorder: &Recorder, namespace: &str, n: usize, timeout: Duration) -> bool {
    let prefix = format!("{namespace}/");
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        let gone = recorder
            .departures()
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .count();
        if gone >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The agent running as a pod on node-1 with its own credentials.
pub struct AgentPod {
    child: tokio::process::Child,
    pub log: PathBuf,
}

impl AgentPod {
    pub async fn spawn(bed: &Bed, agent: &Path, kubeconfig: &Path) -> Result<Self> {
        let log = bed.control_plane.dir().join(format!(
            "bench-agent-{}.log",
            rand::random::<u32>() % 1_000_000
        ));
        let file = std::fs::File::create(&log).context("agent log")?;
        let program = agent.to_str().context("agent path is not UTF-8")?;
        let mut cmd = bed
            .pod_command(program, &["run", "--node", NODE, "--log-format", "json"])
            .await;
        // The agent reads every SHUTDOWN_GUARD_* variable as configuration and refuses unknown
        // keys, so none of the caller's may reach it.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SHUTDOWN_GUARD_") {
                cmd.env_remove(&key);
            }
        }
        let child = cmd
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().context("log fd")?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", agent.display()))?;
        Ok(Self { child, log })
    }

    pub fn pid(&self) -> Option<u32> {
        find_process(self.child.id()?, "shutdown-guard")
    }

    pub fn log_tail(&self) -> String {
        crate::controlplane::log_tail(&self.log, 30)
    }

    /// Waits until logind lists the agent's delay lock.
    pub async fn wait_lock(&mut self, bed: &Bed, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "the agent exited ({status}) before taking its lock; its log:\n{}",
                    self.log_tail()
                );
            }
            let held = bed
                .list_inhibitors()
                .await
                .map(|l| l.iter().any(|i| i.who == WHO && i.mode == "delay"))
                .unwrap_or(false);
            if held {
                return Ok(());
            }
            if Instant::now() >= end {
                bail!(
                    "the agent took no lock within {timeout:?}; its log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The moment `ListInhibitors` stops listing the agent (or logind is gone with the node).
async fn poll_inhibitors(bus: &str, timeout: Duration) -> Option<SystemTime> {
    let conn = crate::logind::connect(bus).await.ok()?;
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        let reply = conn
            .call_method(
                Some(crate::logind::LOGIN1),
                LOGIN1_PATH,
                Some(LOGIN1_MANAGER),
                "ListInhibitors",
                &(),
            )
            .await;
        let held = match reply {
            Ok(r) => r
                .body()
                .deserialize::<Vec<(String, String, String, String, u32, u32)>>()
                .map(|rows| rows.iter().any(|row| row.1 == WHO))
                .unwrap_or(false),
            Err(_) => false,
        };
        if !held {
            return Some(SystemTime::now());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Overhead: one bed, both tools

/// Kubeconfigs with users of their own, so the audit log tells the tools' requests apart.
fn kubeconfigs(bed: &Bed) -> Result<(PathBuf, PathBuf)> {
    let cp = &bed.control_plane;
    let agent = cp
        .user_kubeconfig("bench-agent", AGENT_USER, &["system:masters"])
        .context("agent kubeconfig")?;
    let kubectl = cp
        .user_kubeconfig("bench-kubectl", KUBECTL_USER, &["system:masters"])
        .context("kubectl kubeconfig")?;
    Ok((agent, kubectl))
}

async fn drain_with_kubectl(
    bed: &Bed,
    recorder: &Recorder,
    kubeconfig: &Path,
    namespace: &str,
    n: usize,
) -> Result<DrainRun> {
    let limit = Duration::from_secs(300 + n as u64);
    let started = SystemTime::now();
    let child = tokio::process::Command::new(Bed::kubectl_path())
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(KUBECTL_DRAIN)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(limit, child)
        .await
        .with_context(|| format!("kubectl drain ran longer than {limit:?}"))?
        .context("running kubectl drain")?;
    let empty = SystemTime::now();
    ensure!(
        out.status.success(),
        "kubectl drain failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        wait_departed(recorder, namespace, n, Duration::from_secs(30)).await,
        "kubectl drain exited but not every VMI of {namespace} left node-1"
    );
    let reqs = requests(&bed.control_plane);
    let last = last_vmi_gone(recorder, &reqs, namespace)
        .context("no audit write for the VMIs' departure")?;
    Ok(DrainRun {
        tool: Tool::Kubectl,
        vmis: n,
        started,
        first_eviction: first_eviction(&reqs, KUBECTL_USER, started),
        last_vmi_gone: last,
        empty,
        requests: count(&reqs, KUBECTL_USER, started, empty),
        release_seen_by: "process exit",
    })
}

/// One agent drain: the agent runs as a pod on node-1, node-1 powers off, the lock's release
/// is timed from logind's side.
async fn drain_with_agent(
    bed: &Bed,
    recorder: &Recorder,
    agent_bin: &Path,
    kubeconfig: &Path,
    namespace: &str,
    n: usize,
    trigger: Trigger,
) -> Result<DrainRun> {
    let limit = Duration::from_secs(300 + n as u64);
    let mut agent = AgentPod::spawn(bed, agent_bin, kubeconfig).await?;
    agent.wait_lock(bed, Duration::from_secs(30)).await?;
    let bus = bed.logind.read().await.bus_address();
    let signal = subscribe_prepare_for_shutdown(&bus).await?;
    // logind's inhibitor state file every 0.5 ms (ListInhibitors every 2 ms where it has none).
    let observer = bed.watch_release(WHO, limit).await;
    let method = observer.method().describe();
    let requested = SystemTime::now();
    match trigger {
        Trigger::PowerOff => bed
            .poweroff()
            .await
            .context("starting node-1's power-off")?,
    }
    let Some(released) = observer.wait().await.map(|r| r.gone) else {
        bail!(
            "the lock was still held after {limit:?}; agent log:\n{}",
            agent.log_tail()
        );
    };
    let started = tokio::time::timeout(Duration::from_secs(5), signal)
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .unwrap_or(requested);
    ensure!(
        wait_departed(recorder, namespace, n, Duration::from_secs(30)).await,
        "the agent released the lock but not every VMI of {namespace} left node-1; agent log:\n{}",
        agent.log_tail()
    );
    // Whatever the drain made the agent do after the release counts too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = SystemTime::now();
    agent.stop().await;
    let reqs = requests(&bed.control_plane);
    let last = last_vmi_gone(recorder, &reqs, namespace)
        .context("no audit write for the VMIs' departure")?;
    Ok(DrainRun {
        tool: Tool::Agent,
        vmis: n,
        started,
        first_eviction: first_eviction(&reqs, AGENT_USER, started),
        last_vmi_gone: last,
        empty: released,
        requests: count(&reqs, AGENT_USER, started, stopped),
        release_seen_by: method,
    })
}

#[derive(Clone, Copy, Debug)]
enum Trigger {
    PowerOff,
}

/// Both tools drain `n` LiveMigrate VMIs off node-1 in one fresh elogind bed; `agent_first`
/// picks the order.
pub async fn overhead_pair(s: &Settings, n: usize, agent_first: bool) -> Result<Vec<DrainRun>> {
    let bed = start_bed(LogindKind::Elogind, s).await?;
    let result = overhead_pair_in(&bed, s, n, agent_first).await;
    bed.shutdown().await.context("tearing the bed down")?;
    result
}

async fn overhead_pair_in(
    bed: &Bed,
    s: &Settings,
    n: usize,
    agent_first: bool,
) -> Result<Vec<DrainRun>> {
    let (agent_kc, kubectl_kc) = kubeconfigs(bed)?;
    let recorder = Recorder::start(bed.client(), NODE).await;
    let order = if agent_first {
        [Tool::Agent, Tool::Kubectl]
    } else {
        [Tool::Kubectl, Tool::Agent]
    };
    let mut runs = Vec::new();
    for tool in order {
        reset_node(&bed.client()).await?;
        clear_agent_annotations(&bed.client()).await?;
        let ns = match tool {
            Tool::Agent => "bench-agent",
            Tool::Kubectl => "bench-kubectl",
        };
        create_batch(bed, ns, n).await?;
        let run = match tool {
            Tool::Kubectl => drain_with_kubectl(bed, &recorder, &kubectl_kc, ns, n).await?,
            Tool::Agent => {
                drain_with_agent(
                    bed,
                    &recorder,
                    &s.agent,
                    &agent_kc,
                    ns,
                    n,
                    Trigger::PowerOff,
                )
                .await?
            }
        };
        runs.push(run);
    }
    Ok(runs)
}

// ---------------------------------------------------------------------------------------------
// Latencies, footprint and idle cost: one bed whose node-1 boots again after every shutdown

#[derive(Clone, Debug, Default)]
pub struct Latencies {
    /// The machine's 1-minute load average before the first run and after the last: the bed,
    /// the agent and whatever else runs share the cores, and latencies show it.
    pub load: (String, String),
    /// `PrepareForShutdown` → first eviction at the API server, seconds.
    pub first_eviction: Vec<f64>,
    /// Last VMI gone (API server) → lock gone (logind), seconds.
    pub release: Vec<f64>,
    pub release_seen_by: &'static str,
    /// Parts, from the agent's own log timestamps: signal on the bus → agent logs it.
    pub part_signal: Vec<f64>,
    /// Agent starts the drain → agent logs the node cordoned (the cordon's round trip).
    pub part_cordon: Vec<f64>,
    /// Last VMI gone (API server) → agent logs it left (watch delivery and decoding).
    pub part_watch: Vec<f64>,
    /// Agent logs the release → logind unlinks the lock.
    pub part_logind: Vec<f64>,
    /// Agent logs the release → its lock descriptor is closed (`/proc/<agent>/fd`).
    pub part_fd: Vec<f64>,
    /// Lock descriptor closed → logind unlinks the lock.
    pub part_fd_logind: Vec<f64>,
    /// With `--cross-check-release`: ListInhibitors' view minus the state file's, seconds.
    pub cross_check: Vec<f64>,
    pub logind: String,
    pub failures: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Footprint {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub cpu_secs: f64,
    pub window: Duration,
    /// Requests of the idle agent in the window.
    pub idle_requests: RequestCounts,
    /// Watches the agent holds open (`watch resource` → count).
    pub open_watches: RequestCounts,
    /// `timeoutSeconds` the agent's watches asked for.
    pub watch_timeouts: Vec<String>,
    /// Requests from start until the lock and watches were in place.
    pub startup_requests: RequestCounts,
}

/// Spawns the agent for a latency run on a node that starts clean, with `n` VMIs in `ns`.
async fn ready_agent(bed: &Bed, s: &Settings, kubeconfig: &Path, ns: &str) -> Result<AgentPod> {
    reset_node(&bed.client()).await?;
    create_batch(bed, ns, s.latency_vms).await?;
    let mut agent = AgentPod::spawn(bed, &s.agent, kubeconfig).await?;
    agent.wait_lock(bed, Duration::from_secs(30)).await?;
    Ok(agent)
}

/// The agent idle for `s.idle` on a node with VMIs: RSS, CPU and its requests.
async fn idle_footprint(
    bed: &Bed,
    s: &Settings,
    kubeconfig: &Path,
    ns: &str,
) -> Result<(Footprint, AgentPod)> {
    let spawned = SystemTime::now();
    let agent = ready_agent(bed, s, kubeconfig, ns).await?;
    // Let start-up (node check, initial lists, watches) finish before the window opens.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = agent.pid().with_context(|| {
        format!(
            "no shutdown-guard process under the pod; log:\n{}",
            agent.log_tail()
        )
    })?;
    let w0 = SystemTime::now();
    let cpu0 = cpu_ticks(pid).context("reading the agent's CPU time")?;
    tokio::time::sleep(s.idle).await;
    let cpu1 = cpu_ticks(pid).context("reading the agent's CPU time")?;
    let (rss, hwm) = rss_kib(pid).context("reading the agent's RSS")?;
    let w1 = SystemTime::now();
    let reqs = requests(&bed.control_plane);
    let mut open = RequestCounts::new();
    let mut watch_timeouts = std::collections::BTreeSet::new();
    for e in audit_lines(&bed.control_plane) {
        if e.user.username != AGENT_USER || e.verb != "watch" {
            continue;
        }
        let Some(at) = parse_time(&e.stage_timestamp) else {
            continue;
        };
        if at > w1 {
            continue;
        }
        if let Some(t) = e
            .request_uri
            .split(['?', '&'])
            .find_map(|kv| kv.strip_prefix("timeoutSeconds="))
        {
            watch_timeouts.insert(t.to_owned());
        }
        let entry = open.entry(format!("watch {}", e.resource())).or_insert(0);
        match e.stage.as_str() {
            "ResponseStarted" => *entry += 1,
            "ResponseComplete" => *entry = entry.saturating_sub(1),
            _ => {}
        }
    }
    open.retain(|_, v| *v > 0);
    Ok((
        Footprint {
            rss_kib: rss,
            hwm_kib: hwm,
            cpu_secs: (cpu1 - cpu0) as f64 / clock_ticks_per_sec(),
            window: s.idle,
            idle_requests: count(&reqs, AGENT_USER, w0, w1),
            open_watches: open,
            watch_timeouts: watch_timeouts.into_iter().collect(),
            startup_requests: count(&reqs, AGENT_USER, spawned, w0),
        },
        agent,
    ))
}

/// Latency runs on one bed: node-1 shuts down once per run (systemd: a reboot, after which the
/// same node boots again; elogind: a power-off, then a fresh elogind). The first run also
/// measures the idle footprint, with the agent that then drains.
pub async fn latency_suite(s: &Settings) -> Result<(Latencies, Option<Footprint>)> {
    let mut bed = start_bed(s.latency_logind, s).await?;
    let result = latency_suite_in(&mut bed, s).await;
    bed.shutdown().await.context("tearing the bed down")?;
    result
}

async fn latency_suite_in(bed: &mut Bed, s: &Settings) -> Result<(Latencies, Option<Footprint>)> {
    let (kubeconfig, _) = kubeconfigs(bed)?;
    let recorder = Recorder::start(bed.client(), NODE).await;
    let mut lat = Latencies {
        logind: format!("{:?}", s.latency_logind),
        load: (load_average(), String::new()),
        ..Latencies::default()
    };
    let (footprint, first_agent) = idle_footprint(bed, s, &kubeconfig, "lat-0").await?;
    let mut agent = Some(first_agent);
    for i in 0..s.latency_runs.max(1) {
        let ns = format!("lat-{i}");
        let a = match agent.take() {
            Some(a) => a,
            None => {
                clear_agent_annotations(&bed.client()).await?;
                ready_agent(bed, s, &kubeconfig, &ns).await?
            }
        };
        match latency_once(bed, &recorder, a, &ns, s.latency_vms, s.cross_check).await {
            Ok((first, release, method, cross, parts)) => {
                lat.cross_check.extend(cross);
                lat.part_signal.extend(parts[0]);
                lat.part_cordon.extend(parts[1]);
                lat.part_watch.extend(parts[2]);
                lat.part_logind.extend(parts[3]);
                lat.part_fd.extend(parts[4]);
                lat.part_fd_logind.extend(parts[5]);
                lat.first_eviction.extend(first);
                lat.release.push(release);
                lat.release_seen_by = method;
                eprintln!(
                    "bench: latency run {}/{}: first eviction {}, release {}",
                    i + 1,
                    s.latency_runs,
                    first.map(ms).unwrap_or_else(|| "none".into()),
                    ms(release)
                );
            }
            Err(e) => {
                eprintln!("bench: latency run {} failed: {e:#}", i + 1);
                lat.failures.push(format!("run {}: {e:#}", i + 1));
            }
        }
        // Next node boot: elogind handles one shutdown per instance.
        if bed.logind.read().await.systemd_ref().is_none() {
            let fresh = crate::logind::Elogind::start(crate::logind::ElogindOptions {
                inhibit_delay_max_secs: 600,
                ..crate::logind::ElogindOptions::default()
            })
            .await
            .context("starting a fresh elogind")?;
            *bed.logind.write().await = NodeLogind::Elogind(fresh);
        }
    }
    lat.load.1 = load_average();
    Ok((lat, Some(footprint)))
}

/// One shutdown with the agent holding its lock: (first eviction − PrepareForShutdown,
/// release − last VMI gone, how the release was seen).
async fn latency_once(
    bed: &mut Bed,
    recorder: &Recorder,
    agent: AgentPod,
    ns: &str,
    n: usize,
    cross_check: bool,
) -> Result<(
    Option<f64>,
    f64,
    &'static str,
    Option<f64>,
    [Option<f64>; 6],
)> {
    let limit = Duration::from_secs(120);
    let fd_watch = agent.pid().and_then(|pid| watch_agent_fd(pid, limit));
    let bus = bed.logind.read().await.bus_address();
    let signal = subscribe_prepare_for_shutdown(&bus).await?;
    // logind's inhibitor state file every 0.5 ms (ListInhibitors every 2 ms where it has none).
    let observer = bed.watch_release(WHO, limit).await;
    let method = observer.method().describe();
    let poll = async {
        if cross_check {
            poll_inhibitors(&bus, limit).await
        } else {
            None
        }
    };
    let (released, polled) = if bed.logind.read().await.systemd_ref().is_some() {
        let (released, polled, rebooted) =
            tokio::join!(observer.wait(), poll, bed.reboot_node(limit));
        rebooted.context("rebooting node-1")?;
        (released.map(|r| r.gone), polled)
    } else {
        if let Err(e) = bed.poweroff().await {
            observer.cancel();
            return Err(e).context("starting node-1's power-off");
        }
        let (released, polled) = tokio::join!(observer.wait(), poll);
        (released.map(|r| r.gone), polled)
    };
    let released = released.with_context(|| {
        format!(
            "no release seen within {limit:?}; agent log:\n{}",
            agent.log_tail()
        )
    })?;
    let started = tokio::time::timeout(Duration::from_secs(5), signal)
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .context("no PrepareForShutdown(true) seen on node-1's bus")?;
    ensure!(
        wait_departed(recorder, ns, n, Duration::from_secs(30)).await,
        "lock released but VMIs of {ns} still on node-1; agent log:\n{}",
        agent.log_tail()
    );
    let log = agent.log.clone();
    agent.stop().await;
    let reqs = requests(&bed.control_plane);
    let first = first_eviction(&reqs, AGENT_USER, started).map(|t| secs_between(started, t));
    let last = last_vmi_gone(recorder, &reqs, ns).context("no audit write for the departures")?;
    let cross = polled.map(|p| secs_between(released, p));
    let marks = agent_marks(&log);
    let between = |a: Option<SystemTime>, b: Option<SystemTime>| Some(secs_between(a?, b?));
    let fd_closed = match fd_watch {
        Some(h) => tokio::task::spawn_blocking(move || h.join().ok().flatten())
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let parts = [
        between(Some(started), mark(&marks, "shutdown signal", false)),
        between(
            mark(&marks, "drain started", false),
            mark(&marks, "node cordoned", false),
        ),
        between(Some(last), mark(&marks, "vmi left node", true)),
        between(mark(&marks, "lock released", false), Some(released)),
        between(mark(&marks, "lock released", false), fd_closed),
        between(fd_closed, Some(released)),
    ];
    Ok((first, secs_between(last, released), method, cross, parts))
}
// ---------------------------------------------------------------------------------------------
// Statistics and report

fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

fn min_max(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn ms(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{:.1} ms", x * 1000.0)
    }
}

fn s3(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{x:.3} s")
    }
}

fn counts_line(c: &RequestCounts) -> String {
    if c.is_empty() {
        return "none".into();
    }
    c.iter()
        .map(|(k, v)| format!("{k} ×{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Everything one `testbed bench` measured.
#[derive(Debug, Default)]
pub struct Report {
    pub command: String,
    pub started: Option<DateTime<Utc>>,
    pub took: Duration,
    pub settings: Option<Settings>,
    pub drains: Vec<DrainRun>,
    pub drain_failures: Vec<String>,
    pub latencies: Option<Latencies>,
    pub latency_error: Option<String>,
    pub footprint: Option<Footprint>,
    pub binary: Option<(PathBuf, u64)>,
    /// `(musl binary, layer tar bytes, layer tar.gz bytes)`.
    pub image: Option<(PathBuf, u64, u64)>,
    pub machine: String,
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_owned()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{cores} cores ({cpu}), Linux {}, load average at start {}",
        kernel.trim(),
        load.join(" ")
    )
}

/// Size of the agent binary: `TESTBED_AGENT_BIN` if it names a release build, else the
/// workspace's `target/release/shutdown-guard`.
fn release_binary(agent: &Path) -> Option<(PathBuf, u64)> {
    let candidates = [
        agent.to_path_buf(),
        crate::paths::workspace_root().join("target/release/shutdown-guard"),
    ];
    candidates
        .into_iter()
        .filter(|p| p.components().any(|c| c.as_os_str() == "release"))
        .find_map(|p| Some((p.clone(), std::fs::metadata(&p).ok()?.len())))
}

/// The image the Dockerfile builds is `FROM scratch` plus one layer holding the static musl
/// binary, so without a container daemon its size is that layer's: the binary tarred at
/// `usr/local/bin/shutdown-guard`, as stored (uncompressed) and as pushed (gzip).
/// `(binary, tar bytes, tar.gz bytes)` for the first musl release build found.
fn image_layer() -> Option<(PathBuf, u64, u64)> {
    let root = crate::paths::workspace_root();
    let bin = [
        "target/x86_64-unknown-linux-musl/release/shutdown-guard",
        "target/bench/x86_64-unknown-linux-musl/release/shutdown-guard",
    ]
    .into_iter()
    .map(|p| root.join(p))
    .find(|p| p.is_file())?;
    let dir = tempfile::tempdir().ok()?;
    let dest = dir.path().join("usr/local/bin");
    std::fs::create_dir_all(&dest).ok()?;
    std::fs::copy(&bin, dest.join("shutdown-guard")).ok()?;
    let tar = std::process::Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(dir.path())
        .args(["-cf", "-", "usr"])
        .output()
        .ok()?;
    if !tar.status.success() {
        return None;
    }
    let mut gzip = std::process::Command::new("gzip")
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    let mut stdin = gzip.stdin.take()?;
    let data = tar.stdout.clone();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = gzip.wait_with_output().ok()?;
    writer.join().ok()?.ok()?;
    Some((bin, tar.stdout.len() as u64, out.stdout.len() as u64))
}

impl Report {
    fn by_size(&self, tool: Tool) -> BTreeMap<usize, Vec<&DrainRun>> {
        let mut m: BTreeMap<usize, Vec<&DrainRun>> = BTreeMap::new();
        for d in self.drains.iter().filter(|d| d.tool == tool) {
            m.entry(d.vmis).or_default().push(d);
        }
        m
    }

    /// The whole report as Markdown (also what the command prints).
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let when = self
            .started
            .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_default();
        let _ = writeln!(o, "# Benchmarks\n");
        let _ = writeln!(
            o,
            "Produced by `{}` on {when} ({:.0} s), on {}.\n",
            self.command,
            self.took.as_secs_f64(),
            self.machine
        );
        if let Some(s) = &self.settings {
            let _ = writeln!(
                o,
                "Agent binary: `{}`. Simulated live migration: {:.1} s each. KubeVirt's \
                 parallel-migration limits (upstream 5 per cluster, 2 outbound per node, \
                 `pkg/virt-config/virt-config.go`) are lifted to 10000 for both tools, or N=200 \
                 would be 100 rounds of 2. 3 nodes; VMIs are LiveMigrate on node-1.\n",
                s.agent.display(),
                s.migration.as_secs_f64()
            );
        }
        self.overhead_section(&mut o);
        self.latency_section(&mut o);
        self.footprint_section(&mut o);
        self.api_section(&mut o);
        o
    }

    fn overhead_section(&self, o: &mut String) {
        if self.drains.is_empty() && self.drain_failures.is_empty() {
            return;
        }
        let _ = writeln!(o, "## 1. Drain overhead against `kubectl drain`\n");
        let _ = writeln!(
            o,
            "Each repetition is a fresh bed (elogind on node-1); both tools drain N LiveMigrate \
             VMIs there one after the other, alternating which goes first. kubectl runs the \
             seed's `kubectl {}`. *Overhead* = node known empty (agent: logind dropped the lock, \
             seen through {}; kubectl: the command exited) − the API server \
             receiving the write that moved the last VMI off node-1. *Wall* = start (agent: \
             `PrepareForShutdown` on the bus; kubectl: spawned) → node known empty. Median \
             [min–max] over the repetitions. The simulator hands a migrated VMI over with two \
             back-to-back writes (status with `migrationState.completed`, and the \
             `kubevirt.io/nodeName` label); \"moved\" is the first of them.\n",
            KUBECTL_DRAIN.join(" "),
            {
                let mut m: Vec<&str> = self
                    .drains
                    .iter()
                    .filter(|d| d.tool == Tool::Agent)
                    .map(|d| d.release_seen_by)
                    .collect();
                m.sort();
                m.dedup();
                if m.is_empty() {
                    "logind".to_owned()
                } else {
                    m.join(" / ")
                }
            }
        );
        let _ = writeln!(
            o,
            "| N | reps | shutdown-guard overhead | kubectl overhead | ratio (agent/kubectl) | \
             shutdown-guard wall | kubectl wall | target ≤ 0.1 |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
        let agent = self.by_size(Tool::Agent);
        let kubectl = self.by_size(Tool::Kubectl);
        for (n, a) in &agent {
            let k = kubectl.get(n).cloned().unwrap_or_default();
            let ao: Vec<f64> = a.iter().map(|d| d.overhead()).collect();
            let ko: Vec<f64> = k.iter().map(|d| d.overhead()).collect();
            let aw: Vec<f64> = a.iter().map(|d| d.wall()).collect();
            let kw: Vec<f64> = k.iter().map(|d| d.wall()).collect();
            let ratio = median(&ao) / median(&ko);
            let spread = |v: &[f64]| {
                let (lo, hi) = min_max(v);
                format!("{} [{}–{}]", s3(median(v)), s3(lo), s3(hi))
            };
            let _ = writeln!(
                o,
                "| {n} | {} | {} | {} | {:.3} | {} | {} | {} |",
                a.len().min(k.len()),
                spread(&ao),
                spread(&ko),
                ratio,
                spread(&aw),
                spread(&kw),
                if ratio <= 0.1 { "met" } else { "**missed**" }
            );
        }
        let _ = writeln!(o);
        for f in &self.drain_failures {
            let _ = writeln!(o, "- failed: {f}");
        }
        let _ = writeln!(o);
    }

    fn latency_section(&self, o: &mut String) {
        let _ = writeln!(o, "## 2. Latencies\n");
        if let Some(e) = &self.latency_error {
            let _ = writeln!(o, "Latency runs failed: {e}\n");
        }
        let Some(l) = &self.latencies else {
            return;
        };
        let runs = self
            .settings
            .as_ref()
            .map(|s| (s.latency_runs, s.latency_vms));
        let _ = writeln!(
            o,
            "{} shutdowns of node-1 ({} logind; systemd: `systemctl reboot`, so the same node boots \
             again; each with {} LiveMigrate VMIs and a freshly started agent). \
             *First eviction*: the bench's own subscription to `PrepareForShutdown(true)` on \
             node-1's bus → the API server receiving the agent's first `create pods/eviction` \
             (audit `requestReceivedTimestamp`). *Release*: the API server receiving the write \
             that moved the last VMI off node-1 → logind dropping the lock, seen through {}. \
             Percentiles are nearest-rank (with 20 runs p99 is the maximum). The bench stamps \
             the signal when its own subscription delivers it, which can be up to ~1 ms after \
             the agent got it (the negative \"bus\" part below). 1-minute load average: {} \
             before the first run, {} after the last (2 cores).\n",
            runs.map(|r| r.0).unwrap_or(0),
            l.logind,
            runs.map(|r| r.1).unwrap_or(0),
            l.release_seen_by,
            l.load.0,
            l.load.1
        );
        let _ = writeln!(o, "| latency | runs | p50 | p99 | min | max | target |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|");
        for (name, v) in [
            ("PrepareForShutdown → first eviction", &l.first_eviction),
            ("last VMI gone → lock released", &l.release),
        ] {
            let (lo, hi) = min_max(v);
            let p99 = percentile(v, 99.0);
            let _ = writeln!(
                o,
                "| {name} | {} | {} | {} | {} | {} | ≤ 20 ms p99: {} |",
                v.len(),
                ms(percentile(v, 50.0)),
                ms(p99),
                ms(lo),
                ms(hi),
                if p99 <= 0.020 { "met" } else { "**missed**" }
            );
        }
        let _ = writeln!(o);
        let parts = [
            ("bus: signal → agent logs it", &l.part_signal),
            (
                "agent: drain start → node cordoned (before the first eviction)",
                &l.part_cordon,
            ),
            (
                "API server write → agent logs the last VMI left (watch delivery)",
                &l.part_watch,
            ),
            (
                "agent logs the release → logind unlinks the lock",
                &l.part_logind,
            ),
            (
                "… of which: agent logs the release → its lock fd is closed (`/proc/<agent>/fd`)",
                &l.part_fd,
            ),
            (
                "… of which: lock fd closed → logind unlinks the lock",
                &l.part_fd_logind,
            ),
        ];
        if parts.iter().any(|(_, v)| !v.is_empty()) {
            let _ = writeln!(
                o,
                "Where the time goes, split with the agent's own log timestamps (its clock is \
                 the machine's; used only for this split):\n"
            );
            let _ = writeln!(o, "| part | p50 | p99 | max |");
            let _ = writeln!(o, "|---|---|---|---|");
            for (name, v) in parts {
                let _ = writeln!(
                    o,
                    "| {name} | {} | {} | {} |",
                    ms(percentile(v, 50.0)),
                    ms(percentile(v, 99.0)),
                    ms(min_max(v).1)
                );
            }
            let _ = writeln!(o);
        }
        if !l.cross_check.is_empty() {
            let (lo, hi) = min_max(&l.cross_check);
            let _ = writeln!(
                o,
                "Cross-check: `ListInhibitors` polled every 2 ms saw the release {} later than \
                 the state file (median; range {} to {}).\n",
                ms(median(&l.cross_check)),
                ms(lo),
                ms(hi)
            );
        }
        for f in &l.failures {
            let _ = writeln!(o, "- failed: {f}");
        }
        let _ = writeln!(o);
    }

    fn footprint_section(&self, o: &mut String) {
        let _ = writeln!(o, "## 3. Footprint\n");
        if let Some(f) = &self.footprint {
            let _ = writeln!(
                o,
                "The agent idle (lock held, watches open) for {} s on node-1 with VMIs, read from \
                 `/proc/<agent pid>` (the process itself, found under the pod's wrappers):\n",
                f.window.as_secs()
            );
            let _ = writeln!(o, "| figure | value | target |");
            let _ = writeln!(o, "|---|---|---|");
            let _ = writeln!(
                o,
                "| idle RSS (VmRSS) | {:.1} MiB | ≤ 16 MiB: {} |",
                f.rss_kib as f64 / 1024.0,
                if f.rss_kib <= 16 * 1024 {
                    "met"
                } else {
                    "**missed**"
                }
            );
            let _ = writeln!(
                o,
                "| peak RSS so far (VmHWM) | {:.1} MiB | |",
                f.hwm_kib as f64 / 1024.0
            );
            let _ = writeln!(
                o,
                "| CPU over the window (utime+stime, {:.0} ms ticks) | {} | |",
                1000.0 / clock_ticks_per_sec(),
                if f.cpu_secs == 0.0 {
                    "0 ticks: under one tick in the whole window".to_owned()
                } else {
                    format!(
                        "{:.3} s ({:.3} % of a core)",
                        f.cpu_secs,
                        100.0 * f.cpu_secs / f.window.as_secs_f64().max(1e-9)
                    )
                }
            );
        }
        match &self.binary {
            Some((p, size)) => {
                let _ = writeln!(
                    o,
                    "| release binary | {:.1} MiB (`{}`) | |",
                    *size as f64 / (1024.0 * 1024.0),
                    p.display()
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "| release binary | not measured: no release build (`cargo build --release -p \
                     shutdown-guard`) found | |"
                );
            }
        }
        match &self.image {
            Some((bin, tar, gz)) => {
                let _ = writeln!(
                    o,
                    "| image (Dockerfile: `FROM scratch` + the static musl binary) | not built \
                     (no container daemon here); its only layer, the musl binary `{}` tarred: \
                     {:.1} MiB, {:.1} MiB gzip-compressed as a registry stores it | |\n",
                    bin.display(),
                    *tar as f64 / (1024.0 * 1024.0),
                    *gz as f64 / (1024.0 * 1024.0)
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "| image | not built: no container daemon here, and no musl release build \
                     (`cargo build --release --target x86_64-unknown-linux-musl -p \
                     shutdown-guard`, as the Dockerfile runs) to size its single layer | |\n"
                );
            }
        }
    }

    fn api_section(&self, o: &mut String) {
        let _ = writeln!(o, "## 4. API cost\n");
        let _ = writeln!(
            o,
            "From the API server's audit log (Metadata level; non-watch requests counted at \
             `ResponseComplete`, watches at `ResponseStarted`), attributed by user: each tool \
             authenticates with a client certificate of its own.\n"
        );
        if !self.drains.is_empty() {
            let _ = writeln!(
                o,
                "Per drain (median total over repetitions; breakdown of the last one):\n"
            );
            let _ = writeln!(o, "| N | tool | requests | breakdown |");
            let _ = writeln!(o, "|---|---|---|---|");
            for tool in [Tool::Agent, Tool::Kubectl] {
                for (n, runs) in self.by_size(tool) {
                    let totals: Vec<f64> = runs.iter().map(|d| d.total_requests() as f64).collect();
                    let last = runs
                        .last()
                        .map(|d| counts_line(&d.requests))
                        .unwrap_or_default();
                    let _ = writeln!(
                        o,
                        "| {n} | {} | {:.0} | {last} |",
                        tool.label(),
                        median(&totals)
                    );
                }
            }
            let _ = writeln!(o);
        }
        if let Some(f) = &self.footprint {
            let idle: u32 = f.idle_requests.values().sum();
            let per_hour = idle as f64 * 3600.0 / f.window.as_secs_f64().max(1e-9);
            let _ = writeln!(
                o,
                "Idle agent: {idle} requests in {} s → {per_hour:.0} per hour extrapolated ({}). \
                 Open watches: {}. Start-up (from spawn to 3 s after the lock): {}.\n",
                f.window.as_secs(),
                counts_line(&f.idle_requests),
                counts_line(&f.open_watches),
                counts_line(&f.startup_requests)
            );
            let timeout: Option<f64> = f
                .watch_timeouts
                .iter()
                .filter_map(|t| t.parse::<f64>().ok())
                .reduce(f64::min);
            let watches = f.open_watches.values().sum::<u32>();
            let rewatch = match timeout {
                Some(t) => format!(
                    "the agent's watches ask for `timeoutSeconds={}` (audit `requestURI`), so \
                     each is re-opened (one `watch` request, resuming from its resourceVersion) \
                     about every {t:.0} s: ≈ {:.0} watch requests per hour for {watches} open \
                     watches, which a window shorter than that does not show",
                    f.watch_timeouts.join(", "),
                    watches as f64 * 3600.0 / t.max(1.0)
                ),
                None => "the agent's watches set no `timeoutSeconds`; the API server ends each \
                         after `--min-request-timeout` (1800 s) × a random factor in [1, 2)"
                    .to_owned(),
            };
            let _ = writeln!(
                o,
                "Target \"no requests while idle beyond the open watches\": {}. An open watch is \
                 one long request; {rewatch}.\n",
                if f.idle_requests.keys().all(|k| k.starts_with("watch ")) {
                    "met"
                } else {
                    "**missed**"
                },
            );
        }
    }
}

/// `testbed bench`.
pub async fn run(args: BenchArgs) -> Result<ExitCode> {
    let s = Settings::from_args(&args)?;
    if !s.agent.is_file() {
        bail!(
            "{} is missing: build it (`cargo build --release -p shutdown-guard`) and set \
             TESTBED_AGENT_BIN, or `cargo build -p shutdown-guard` for the debug build",
            s.agent.display()
        );
    }
    let began = Instant::now();
    let mut report = Report {
        command: std::iter::once("testbed".to_owned())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        started: Some(Utc::now()),
        machine: machine(),
        binary: release_binary(&s.agent),
        image: image_layer(),
        ..Report::default()
    };
    if let Ok(bin) = std::env::var("TESTBED_AGENT_BIN") {
        report.command = format!("TESTBED_AGENT_BIN={bin} {}", report.command);
    }
    if !args.no_overhead {
        for rep in 0..s.reps {
            for &n in &s.sizes {
                let agent_first = (rep + n) % 2 == 1;
                eprintln!("bench: overhead N={n} rep {}/{}", rep + 1, s.reps);
                match overhead_pair(&s, n, agent_first).await {
                    Ok(runs) => {
                        for r in &runs {
                            eprintln!(
                                "bench:   {:<14} wall {} overhead {} requests {}",
                                r.tool.label(),
                                s3(r.wall()),
                                s3(r.overhead()),
                                r.total_requests()
                            );
                        }
                        report.drains.extend(runs);
                    }
                    Err(e) => {
                        eprintln!("bench: N={n} rep {} failed: {e:#}", rep + 1);
                        report
                            .drain_failures
                            .push(format!("N={n} rep {}: {e:#}", rep + 1));
                    }
                }
            }
        }
    }
    if !args.no_latency {
        eprintln!("bench: idle footprint and {} latency runs", s.latency_runs);
        match latency_suite(&s).await {
            Ok((l, f)) => {
                report.latencies = Some(l);
                report.footprint = f;
            }
            Err(e) => report.latency_error = Some(format!("{e:#}")),
        }
    }
    report.took = began.elapsed();
    report.settings = Some(s);
    let text = report.markdown();
    println!("{text}");
    let path = args
        .output
        .clone()
        .unwrap_or_else(|| crate::paths::workspace_root().join("BENCHMARKS.md"));
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("bench: wrote {}", path.display());
    Ok(ExitCode::SUCCESS)
}
