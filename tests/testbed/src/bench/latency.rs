//! Section 3: the agent's own latencies, over many shutdowns of one systemd node that boots
//! again after each (`systemctl reboot`): `PrepareForShutdown` → first eviction at the API
//! server, and last VMI gone (the API server's write) → logind dropping the lock (its
//! inhibitor state file, looked at every 0.5 ms). The agent's log timestamps split each into
//! parts, only to say where the time goes.
//!
//! The first agent of the bed also gives the idle footprint: holder and worker together.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use futures::StreamExt;

use super::agent::{AgentPod, WHO, marks};
use super::audit::{self, RequestCounts};
use super::procfs::{self, Load, Memory};
use super::{AGENT_USER, Settings, outcome};
use crate::bed::{Bed, NODE};
use crate::kubevirt::VmSpec;
use crate::logind::{LOGIN1_MANAGER, LOGIN1_PATH};
use crate::timeline::{AuditEntry, Recorder, audit_entries, secs_between};

/// The parts a latency is split into, in order, with their labels.
pub const PARTS: [&str; 8] = [
    "bus: logind's signal → the holder logs it",
    "holder → worker: the holder logs the signal → the worker logs its drain started",
    "worker: drain started → node cordoned (the cordon's round trip; evictions go out meanwhile)",
    "API server write → the worker logs the last VMI left (watch delivery)",
    "worker logs the release → the holder logs the lock closed",
    "holder logs the lock closed → its lock fd is closed (`/proc/<holder>/fd`)",
    "lock fd closed → logind unlinks the lock",
    "worker logs the release → logind unlinks the lock (the three above)",
];

#[derive(Clone, Debug, Default)]
pub struct Latencies {
    pub load: Load,
    /// Seconds, per run.
    pub first_eviction: Vec<f64>,
    pub release: Vec<f64>,
    pub parts: Vec<Vec<f64>>,
    pub failures: Vec<String>,
    /// One line per run, as printed while running.
    pub runs: Vec<String>,
}

/// The agent idle on a node with VMIs.
#[derive(Clone, Debug, Default)]
pub struct Idle {
    pub window: Duration,
    /// Holder and worker together.
    pub memory: Memory,
    pub processes: usize,
    pub cpu_secs: f64,
    pub requests: RequestCounts,
    pub startup_requests: RequestCounts,
    pub open_watches: usize,
}

/// Stamps the first `PrepareForShutdown(true)` (or its `WithMetadata` twin) on a bus, as any
/// process on the node may see it.
async fn subscribe_prepare_for_shutdown(
    bus: &str,
) -> Result<tokio::task::JoinHandle<Option<SystemTime>>> {
    let conn = crate::logind::connect(bus).await?;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface(LOGIN1_MANAGER)?
        .path(LOGIN1_PATH)?
        .build();
    let mut stream = zbus::MessageStream::for_match_rule(rule, &conn, Some(64)).await?;
    Ok(tokio::spawn(async move {
        let _conn = conn;
        while let Some(Ok(msg)) = stream.next().await {
            let header = msg.header();
            let start = match header.member().map(|m| m.as_str()) {
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

/// Watches the holder's end of the lock (its descriptor on logind's `.ref` FIFO) every 0.5 ms
/// until it is closed.
fn watch_lock_fd(
    pid: u32,
    timeout: Duration,
) -> Option<std::thread::JoinHandle<Option<SystemTime>>> {
    let fd = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| {
                let t = t.to_string_lossy();
                t.contains("/inhibit/") && t.ends_with(".ref")
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

fn mark(marks: &[(String, SystemTime)], message: &str, last: bool) -> Option<SystemTime> {
    let mut it = marks.iter().filter(|(m, _)| m == message).map(|(_, t)| *t);
    if last { it.next_back() } else { it.next() }
}

/// When the API server received the write that took the last of `vmis` off the node: per VMI
/// the last write received at or before the recorder saw it leave (upstream's VMI has no status
/// subresource and moves `nodeName` and the label in one update), the latest over the VMIs.
pub fn last_vmi_gone(
    entries: &[AuditEntry],
    departures: &[(String, SystemTime)],
) -> Option<SystemTime> {
    departures
        .iter()
        .map(|(vmi, seen)| {
            let (ns, name) = vmi.split_once('/')?;
            entries
                .iter()
                .filter(|e| {
                    e.resource == "virtualmachineinstances"
                        && e.namespace == ns
                        && e.name == name
                        && matches!(e.verb.as_str(), "update" | "patch" | "delete")
                        && e.received <= *seen
                })
                .map(|e| e.received)
                .max()
        })
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .max()
}

async fn ready_agent(bed: &Bed, s: &Settings, kubeconfig: &Path, ns: &str) -> Result<AgentPod> {
    outcome::reset_node(&bed.client()).await?;
    bed.control_plane.create_namespace(ns).await?;
    let spec: VmSpec = format!("live={}", s.latency_vms).parse()?;
    bed.kubevirt.create_vmis(ns, NODE, &spec).await?;
    let mut agent = AgentPod::spawn(bed, NODE, &s.agent, kubeconfig).await?;
    agent.wait_ready(bed, Duration::from_secs(30)).await?;
    Ok(agent)
}

/// The latency runs, and the idle footprint of the first agent.
pub async fn run(s: &Settings) -> Result<(Latencies, Idle)> {
    let mut bed = Bed::start(outcome::bed_options(s, 3, 600))
        .await
        .context("starting the bed")?;
    let result = run_in(&mut bed, s).await;
    bed.shutdown().await.context("tearing the bed down")?;
    result
}

async fn run_in(bed: &mut Bed, s: &Settings) -> Result<(Latencies, Idle)> {
    let (kubeconfig, _) = outcome::kubeconfigs(bed)?;
    let recorder = Recorder::start(bed.client(), NODE).await;
    let mut lat = Latencies {
        load: Load::start(),
        parts: vec![Vec::new(); PARTS.len()],
        ..Latencies::default()
    };
    let spawned = SystemTime::now();
    let first = ready_agent(bed, s, &kubeconfig, "lat-0").await?;
    let idle = idle(bed, s, &first, spawned).await?;
    let mut agent = Some(first);
    for i in 0..s.latency_runs.max(1) {
        let ns = format!("lat-{i}");
        let a = match agent.take() {
            Some(a) => a,
            None => match ready_agent(bed, s, &kubeconfig, &ns).await {
                Ok(a) => a,
                Err(e) => {
                    lat.failures.push(format!("run {}: {e:#}", i + 1));
                    continue;
                }
            },
        };
        match once(bed, &recorder, a, &ns).await {
            Ok((first_eviction, release, parts)) => {
                let line = format!(
                    "run {}/{}: first eviction {}, release {}",
                    i + 1,
                    s.latency_runs,
                    first_eviction.map_or("none".into(), super::stats::ms),
                    super::stats::ms(release)
                );
                eprintln!("bench: latency {line}");
                lat.runs.push(line);
                lat.first_eviction.extend(first_eviction);
                lat.release.push(release);
                for (k, p) in parts.into_iter().enumerate() {
                    lat.parts[k].extend(p);
                }
            }
            Err(e) => {
                eprintln!("bench: latency run {} failed: {e:#}", i + 1);
                lat.failures.push(format!("run {}: {e:#}", i + 1));
            }
        }
    }
    lat.load.end();
    Ok((lat, idle))
}

/// The agent idle for the idle window: memory of holder and worker, their CPU, its requests.
async fn idle(bed: &Bed, s: &Settings, agent: &AgentPod, spawned: SystemTime) -> Result<Idle> {
    // Start-up (node check, initial lists, watches) done before the window opens.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pids = agent.processes(Duration::from_secs(10)).await?;
    let cpu = |pids: &[u32]| {
        pids.iter()
            .filter_map(|&p| procfs::cpu_ticks(p))
            .sum::<u64>()
    };
    let w0 = SystemTime::now();
    let c0 = cpu(&pids);
    tokio::time::sleep(s.idle).await;
    let c1 = cpu(&pids);
    let memory = pids
        .iter()
        .filter_map(|&p| procfs::memory(p))
        .fold(Memory::default(), |a, b| a + b);
    let w1 = SystemTime::now();
    let reqs = audit::requests(&bed.control_plane);
    Ok(Idle {
        window: s.idle,
        memory,
        processes: pids.len(),
        cpu_secs: c1.saturating_sub(c0) as f64 / procfs::ticks_per_sec(),
        requests: audit::count(&reqs, |u| u == AGENT_USER, w0, w1),
        startup_requests: audit::count(&reqs, |u| u == AGENT_USER, spawned, w0),
        open_watches: audit::open_watches(&reqs, |u| u == AGENT_USER, w1),
    })
}

type Parts = Vec<Option<f64>>;

/// One shutdown: (first eviction, release, parts), seconds.
async fn once(
    bed: &mut Bed,
    recorder: &Recorder,
    agent: AgentPod,
    ns: &str,
) -> Result<(Option<f64>, f64, Parts)> {
    let limit = Duration::from_secs(120);
    let pids = agent.processes(Duration::from_secs(10)).await?;
    let holder = pids.iter().copied().min();
    let fd_watch = holder.and_then(|pid| watch_lock_fd(pid, limit));
    let bus = bed.logind.read().await.bus_address();
    let signal = subscribe_prepare_for_shutdown(&bus).await?;
    let observer = bed.watch_release(WHO, limit).await;
    let (released, rebooted) = tokio::join!(observer.wait(), bed.reboot_node(limit));
    rebooted.context("rebooting node-1")?;
    let released = released
        .map(|r| r.gone)
        .with_context(|| format!("no release seen; agent log:\n{}", agent.log_tail()))?;
    let started = tokio::time::timeout(Duration::from_secs(5), signal)
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .context("no PrepareForShutdown(true) seen on node-1's bus")?;
    let prefix = format!("{ns}/");
    let departures: Vec<(String, SystemTime)> = recorder
        .departures()
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(k, (at, _))| (k, at))
        .collect();
    let log = agent.log.clone();
    agent.stop().await;
    let entries = audit_entries(&bed.control_plane);
    let reqs = audit::requests(&bed.control_plane);
    ensure!(
        !departures.is_empty(),
        "lock released but no VMI of {ns} seen leaving"
    );
    let first = audit::first_eviction(&reqs, AGENT_USER, started).map(|t| secs_between(started, t));
    let last = last_vmi_gone(&entries, &departures).context("no audit write for the departures")?;
    let m = marks(&log);
    let between = |a: Option<SystemTime>, b: Option<SystemTime>| Some(secs_between(a?, b?));
    let fd_closed = match fd_watch {
        Some(h) => tokio::task::spawn_blocking(move || h.join().ok().flatten())
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let worker_release = mark(&m, "lock released", false);
    let holder_closed = mark(&m, "lock closed", false);
    let parts = vec![
        between(Some(started), mark(&m, "shutdown signal", false)),
        between(
            mark(&m, "shutdown signal", false),
            mark(&m, "drain started", false),
        ),
        between(
            mark(&m, "drain started", false),
            mark(&m, "node cordoned", false),
        ),
        between(Some(last), mark(&m, "vmi left node", true)),
        between(worker_release, holder_closed),
        between(holder_closed, fd_closed),
        between(fd_closed, Some(released)),
        between(worker_release, Some(released)),
    ];
    Ok((first, secs_between(last, released), parts))
}
