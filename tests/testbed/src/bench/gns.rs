//! kubelet's graceful node shutdown, simulated as kubelet runs it, so a cell can show what a
//! cluster gets from kubelet alone: pods killed on the node at `PrepareForShutdown`, no
//! eviction, so KubeVirt never gets to migrate a VM.
//!
//! Followed: `pkg/kubelet/nodeshutdown/nodeshutdown_manager_linux.go` and
//! `pkg/kubelet/nodeshutdown/systemd/inhibit_linux.go` (kubernetes/kubernetes, the versions at
//! commits 0239cd7 and 04791b4):
//! - start: read `InhibitDelayMaxUSec`; when the requested period (the sum of the priority
//!   groups' periods) is larger, raise it (kubelet writes `99-kubelet.conf` and sends logind
//!   SIGHUP; here the bed sets it) and fail if logind still has less; then take a delay lock
//!   `Inhibit("shutdown", "kubelet", "Kubelet needs time to handle node shutdown", "delay")`
//!   and watch `PrepareForShutdown`;
//! - on `PrepareForShutdown(true)` (`processShutdownEvent`): the active pods, grouped by
//!   priority (`migrateConfig`: `shutdownGracePeriod − shutdownGracePeriodCriticalPods` for
//!   priority 0, `shutdownGracePeriodCriticalPods` for `system-cluster-critical` and above;
//!   `groupByPriority`), group after group from the lowest priority: every pod of the group is
//!   terminated at once with the group's period as grace override, or the pod's own
//!   `terminationGracePeriodSeconds` when that is shorter, reason `Terminated`, message "Pod
//!   was terminated in response to imminent node shutdown.", a `DisruptionTarget` condition
//!   (`TerminationByKubelet`); the group is waited for at most its period; then the lock is
//!   released (deferred, whatever happened).
//!
//! The lock is held by a `systemd-inhibit` process running in the node (logind answers
//! `EREMOTE` to a caller outside its PID namespace, as the bench is); the decisions and the
//! pod kills run in the bench. Releasing the lock is ending that process.
//!
//! Not simulated: kubelet also rejects new pods and reports the node NotReady while shutting
//! down; nothing in a cell reads either (the bed's kubelet heartbeat would overwrite the latter).

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};

use crate::bed::Bed;
use crate::kubelet::{LocalKill, Workloads};
use crate::logind::{LOGIN1_MANAGER, LOGIN1_PATH};
use crate::pod::{PodOutput, PodSpec};

pub const WHO: &str = "kubelet";
const WHY: &str = "Kubelet needs time to handle node shutdown";
pub const REASON: &str = "Terminated";
pub const MESSAGE: &str = "Pod was terminated in response to imminent node shutdown.";
/// `v1.PodReasonTerminationByKubelet`.
pub const CONDITION_REASON: &str = "TerminationByKubelet";
/// `scheduling.SystemCriticalPriority`.
pub const SYSTEM_CRITICAL_PRIORITY: i32 = 2_000_000_000;

/// `shutdownGracePeriod` and `shutdownGracePeriodCriticalPods` of the kubelet configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub grace_period: Duration,
    pub critical_pods: Duration,
}

/// One priority group: pods of at least `priority` (up to the next group) get `grace_secs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    pub priority: i32,
    pub grace_secs: i64,
}

/// `migrateConfig`: the two groups of the original configuration, lowest priority first;
/// none (graceful shutdown off) when `shutdownGracePeriod` is 0 or smaller than the critical
/// pods' share.
pub fn groups(c: &Config) -> Vec<Group> {
    let total = c.grace_period.as_secs() as i64;
    let critical = c.critical_pods.as_secs() as i64;
    if total == 0 || total < critical {
        return vec![];
    }
    vec![
        Group {
            priority: 0,
            grace_secs: total - critical,
        },
        Group {
            priority: SYSTEM_CRITICAL_PRIORITY,
            grace_secs: critical,
        },
    ]
}

/// `groupByPriority`: the index of the group a pod of `priority` belongs to (groups sorted by
/// priority): the highest group whose priority is not above the pod's, the lowest for pods
/// below every group.
pub fn group_of(groups: &[Group], priority: i32) -> usize {
    let i = groups.partition_point(|g| g.priority < priority);
    if i == groups.len() {
        groups.len().saturating_sub(1)
    } else if i > 0 && groups[i].priority > priority {
        i - 1
    } else {
        i
    }
}

/// The grace override of one pod: the group's period, or the pod's own when not longer.
pub fn grace_override(group_secs: i64, pod_grace: Option<i64>) -> i64 {
    match pod_grace {
        Some(p) if p <= group_secs => p,
        _ => group_secs,
    }
}

/// What the simulated kubelet did during one shutdown.
#[derive(Clone, Debug)]
pub struct Run {
    pub signal: SystemTime,
    /// Pods killed, with the grace each got.
    pub killed: Vec<(String, i64)>,
    /// When the lock was released.
    pub released: SystemTime,
}

/// kubelet's shutdown manager on one node of the bed, holding its delay lock.
pub struct GracefulNodeShutdown {
    task: tokio::task::JoinHandle<Result<Run>>,
}

impl GracefulNodeShutdown {
    /// Takes the lock and starts watching for the shutdown (kubelet's `start`).
    pub async fn start(bed: &Bed, node: &str, config: Config) -> Result<Self> {
        let groups = groups(&config);
        if groups.is_empty() {
            bail!("shutdownGracePeriod {config:?}: graceful node shutdown would be off");
        }
        let handle = bed.node(node)?;
        let requested: i64 = groups.iter().map(|g| g.grace_secs).sum();
        let current = handle.inhibit_delay_max().await?;
        if Duration::from_secs(requested as u64) > current {
            handle.set_inhibit_delay_max(requested as u64).await?;
            let now = handle.inhibit_delay_max().await?;
            if Duration::from_secs(requested as u64) > now {
                bail!(
                    "logind's InhibitDelayMaxSec ({now:?}) stays below kubelet's shutdownGracePeriod ({requested} s)"
                );
            }
        }
        let conn = crate::logind::connect(&handle.bus_address().await)
            .await
            .context("connecting to the node's bus")?;
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface(LOGIN1_MANAGER)?
            .member("PrepareForShutdown")?
            .path(LOGIN1_PATH)?
            .build();
        let mut signals = zbus::MessageStream::for_match_rule(rule, &conn, Some(16))
            .await
            .context("subscribing to PrepareForShutdown")?;
        let mut lock = handle
            .spawn_pod(
                PodSpec::new(
                    "systemd-inhibit",
                    &[
                        "--what=shutdown",
                        &format!("--who={WHO}"),
                        &format!("--why={WHY}"),
                        "--mode=delay",
                        "sleep",
                        "infinity",
                    ],
                )
                .name(format!("kubelet-inhibitor-{node}"))
                .output(PodOutput::Null),
            )
            .await?;
        let held = crate::wait::until(Duration::from_secs(10), Duration::from_millis(20), || {
            let handle = &handle;
            async move {
                handle
                    .list_inhibitors()
                    .await
                    .ok()
                    .filter(|l| l.iter().any(|i| i.who == WHO && i.mode == "delay"))
            }
        })
        .await;
        if held.is_none() {
            lock.kill().await;
            bail!("kubelet's delay lock did not show in logind within 10 s");
        }
        let client = bed.client();
        let workloads = bed.kubelet.workloads();
        let node = node.to_owned();
        let task = tokio::spawn(async move {
            let _conn = conn;
            loop {
                let Some(Ok(msg)) = signals.next().await else {
                    bail!("the bus went away before PrepareForShutdown");
                };
                if msg.body().deserialize::<bool>().ok() == Some(true) {
                    break;
                }
            }
            let signal = SystemTime::now();
            // The lock goes whatever happens while killing pods (kubelet's deferred release).
            let killed = kill_pods(&client, &workloads, &node, &groups).await;
            lock.kill().await;
            Ok(Run {
                signal,
                killed: killed.unwrap_or_default(),
                released: SystemTime::now(),
            })
        });
        Ok(Self { task })
    }

    /// Waits until kubelet has released its lock.
    pub async fn wait(self, timeout: Duration) -> Result<Run> {
        tokio::time::timeout(timeout, self.task)
            .await
            .context("kubelet's shutdown manager did not finish in time")?
            .context("kubelet's shutdown manager panicked")?
    }
}

fn is_terminal(p: &Pod) -> bool {
    matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

/// `processShutdownEvent`'s loop over the groups.
async fn kill_pods(
    client: &Client,
    workloads: &Workloads,
    node: &str,
    groups: &[Group],
) -> Result<Vec<(String, i64)>> {
    let pods: Api<Pod> = Api::all(client.clone());
    let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let active: Vec<Pod> = pods
        .list(&on_node)
        .await?
        .items
        .into_iter()
        .filter(|p| !is_terminal(p) && p.metadata.deletion_timestamp.is_none())
        .collect();
    let mut by_group: Vec<Vec<&Pod>> = vec![vec![]; groups.len()];
    for p in &active {
        let priority = p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0);
        by_group[group_of(groups, priority)].push(p);
    }
    let mut killed = Vec::new();
    for (group, members) in groups.iter().zip(by_group) {
        if members.is_empty() {
            continue;
        }
        let mut uids = Vec::new();
        for p in members {
            let own = p
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds);
            let grace = grace_override(group.grace_secs, own);
            let uid = p.metadata.uid.clone().unwrap_or_default();
            workloads.kill_locally(
                &uid,
                LocalKill {
                    grace: Duration::from_secs(grace.max(0) as u64),
                    reason: REASON.into(),
                    message: MESSAGE.into(),
                    condition_reason: CONDITION_REASON.into(),
                },
            );
            killed.push((
                format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap_or_default(),
                    p.metadata.name.as_deref().unwrap_or_default()
                ),
                grace,
            ));
            uids.push(uid);
        }
        // TerminatePodAbnormallyAndWait for each, the group bounded by its period.
        let end = tokio::time::Instant::now() + Duration::from_secs(group.grace_secs as u64);
        while tokio::time::Instant::now() < end {
            let list = pods.list(&on_node).await?;
            let running = list
                .items
                .iter()
                .filter(|p| {
                    p.metadata
                        .uid
                        .as_deref()
                        .is_some_and(|u| uids.iter().any(|x| x == u))
                        && !is_terminal(p)
                })
                .count();
            if running == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(killed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_original_configuration_makes_two_groups() {
        let g = groups(&Config {
            grace_period: Duration::from_secs(60),
            critical_pods: Duration::from_secs(10),
        });
        assert_eq!(
            g,
            [
                Group {
                    priority: 0,
                    grace_secs: 50
                },
                Group {
                    priority: SYSTEM_CRITICAL_PRIORITY,
                    grace_secs: 10
                }
            ]
        );
        assert!(
            groups(&Config {
                grace_period: Duration::ZERO,
                critical_pods: Duration::ZERO
            })
            .is_empty(),
            "shutdownGracePeriod 0 turns the feature off"
        );
    }

    #[test]
    fn pods_fall_into_the_highest_group_not_above_them() {
        let g = groups(&Config {
            grace_period: Duration::from_secs(30),
            critical_pods: Duration::from_secs(10),
        });
        assert_eq!(group_of(&g, 0), 0);
        assert_eq!(group_of(&g, 1000), 0);
        assert_eq!(group_of(&g, -5), 0);
        assert_eq!(group_of(&g, SYSTEM_CRITICAL_PRIORITY), 1);
        assert_eq!(group_of(&g, SYSTEM_CRITICAL_PRIORITY + 1000), 1);
    }

    #[test]
    fn a_shorter_pod_grace_wins() {
        assert_eq!(grace_override(50, Some(60)), 50);
        assert_eq!(grace_override(50, Some(30)), 30);
        assert_eq!(grace_override(50, None), 50);
    }
}
