//! The VM ledger: what became of every VMI in a run, from what the cluster and the nodes show,
//! never from the agent's own reports.
//!
//! A [`Ledger`] watches every VMI and virt-launcher pod from the moment the bed's KubeVirt is
//! up. At report time each watch sighting that moved a VMI is dated by the API server's audit
//! log (the last write to that VMI the server had completed when the watch delivered it), and
//! the sightings are laid against the moments each node powered off (its console's
//! `Shutting down.`, or elogind's power command). A VMI's fate is then one of:
//!
//! - **migrated**: moved `from → to` at a time (once or more), running elsewhere at the end. A
//!   migration counts from `migrationState.completed` (the domain runs on the target), which
//!   KubeVirt 1.5/1.6 report before the target takes the VMI over;
//! - **stopped gracefully**: reached `Succeeded` (after its launcher pod's graceful deletion,
//!   whose grace period is recorded);
//! - **lost**: still running on its node when that node powered off, its launcher deleted with
//!   no grace period while it ran there, or `Failed`;
//! - running on the node it started on, never scheduled, or deleted.
//!
//! [`compute`] is the whole decision, a plain function of the sightings.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::task::JoinHandle;

use crate::kubevirt::VirtualMachineInstance;
use crate::timeline::AuditEntry;

/// One state of a VMI as a watch delivered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmiSighting {
    pub at: SystemTime,
    /// Where the domain runs: the target of a completed migration, else `status.nodeName`.
    pub node: Option<String>,
    pub phase: String,
    /// The object was deleted.
    pub deleted: bool,
}

/// A virt-launcher pod's deletion, as the pod watch first showed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LauncherDeletion {
    /// `namespace/name` of the VMI the pod runs (`kubevirt.io/domain`).
    pub vmi: String,
    pub pod: String,
    pub node: String,
    pub at: SystemTime,
    /// `deletionGracePeriodSeconds` (0: killed at once).
    pub grace_seconds: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    pub from: String,
    pub to: String,
    pub at: SystemTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LossReason {
    /// Its node powered off (or rebooted) under it.
    NodePoweredOff,
    /// Its launcher pod was deleted with grace period 0 while it ran.
    KilledWithoutGrace,
    /// KubeVirt reported it `Failed`.
    Failed,
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NodePoweredOff => "node powered off under it",
            Self::KilledWithoutGrace => "launcher killed without a grace period",
            Self::Failed => "VMI Failed",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Still running, on `node`, at the end of the record.
    Running { node: String },
    /// Never placed on a node.
    Pending,
    StoppedGracefully {
        node: String,
        at: SystemTime,
        /// The grace period its launcher was deleted with, if it was.
        grace_seconds: Option<i64>,
    },
    /// The VMI object was deleted (by someone) without a final phase seen first.
    Deleted {
        node: Option<String>,
        at: SystemTime,
    },
    Lost {
        node: String,
        at: SystemTime,
        reason: LossReason,
    },
}

/// Everything the ledger knows about one VMI (one incarnation of a name: a VMI recreated
/// under the same name, as a VirtualMachine does, is a new entry `ns/name#2`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmiFate {
    pub vmi: String,
    /// The first node it ran on.
    pub first_node: Option<String>,
    pub migrations: Vec<Migration>,
    pub outcome: Outcome,
}

impl VmiFate {
    pub fn is_lost(&self) -> bool {
        matches!(self.outcome, Outcome::Lost { .. })
    }

    /// Migrated at least once and not lost.
    pub fn is_migrated(&self) -> bool {
        !self.migrations.is_empty() && !self.is_lost()
    }

    pub fn is_stopped_gracefully(&self) -> bool {
        matches!(self.outcome, Outcome::StoppedGracefully { .. })
    }
}

/// The fates of every VMI of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerReport {
    pub vmis: BTreeMap<String, VmiFate>,
}

impl LedgerReport {
    pub fn fate(&self, vmi: &str) -> Option<&VmiFate> {
        self.vmis.get(vmi)
    }

    pub fn lost(&self) -> Vec<&VmiFate> {
        self.vmis.values().filter(|f| f.is_lost()).collect()
    }

    pub fn migrated(&self) -> Vec<&VmiFate> {
        self.vmis.values().filter(|f| f.is_migrated()).collect()
    }

    pub fn stopped_gracefully(&self) -> Vec<&VmiFate> {
        self.vmis
            .values()
            .filter(|f| f.is_stopped_gracefully())
            .collect()
    }

    /// One line: `5 VMIs: 3 migrated, 1 stopped gracefully, 1 lost, 0 other`.
    pub fn summary(&self) -> String {
        let (m, s, l) = (
            self.migrated().len(),
            self.stopped_gracefully().len(),
            self.lost().len(),
        );
        // A VMI that migrated and later stopped counts in both; "other" is neither.
        let other = self
            .vmis
            .values()
            .filter(|f| !f.is_migrated() && !f.is_stopped_gracefully() && !f.is_lost())
            .count();
        format!(
            "{} VMIs: {m} migrated, {s} stopped gracefully, {l} lost, {other} other",
            self.vmis.len(),
        )
    }
}

fn clock(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t)
        .format("%H:%M:%S%.3f")
        .to_string()
}

impl fmt::Display for LedgerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "VM ledger: {}", self.summary())?;
        for fate in self.vmis.values() {
            let mut path: Vec<String> = fate.first_node.iter().cloned().collect();
            for m in &fate.migrations {
                path.push(format!("{} ({})", m.to, clock(m.at)));
            }
            let path = if path.is_empty() {
                "-".to_owned()
            } else {
                path.join(" → ")
            };
            let outcome = match &fate.outcome {
                Outcome::Running { node } if fate.migrations.is_empty() => {
                    format!("running on {node}")
                }
                Outcome::Running { node } => format!("migrated, running on {node}"),
                Outcome::Pending => "never scheduled".into(),
                Outcome::StoppedGracefully {
                    node,
                    at,
                    grace_seconds,
                } => format!(
                    "stopped gracefully on {node} at {}{}",
                    clock(*at),
                    grace_seconds
                        .map(|g| format!(" (launcher grace {g} s)"))
                        .unwrap_or_default()
                ),
                Outcome::Deleted { node, at } => format!(
                    "deleted at {}{}",
                    clock(*at),
                    node.as_ref()
                        .map(|n| format!(" on {n}"))
                        .unwrap_or_default()
                ),
                Outcome::Lost { node, at, reason } => {
                    format!("LOST on {node} at {}: {reason}", clock(*at))
                }
            };
            writeln!(f, "  {:<28} {path}: {outcome}", fate.vmi)?;
        }
        Ok(())
    }
}

fn is_final(phase: &str) -> bool {
    matches!(phase, "Succeeded" | "Failed")
}

/// Decides each VMI's fate from its sightings (in order), its launchers' deletions and the
/// nodes' power-off moments.
pub fn compute(
    vmis: &BTreeMap<String, Vec<VmiSighting>>,
    deletions: &[LauncherDeletion],
    power_offs: &BTreeMap<String, Vec<SystemTime>>,
) -> LedgerReport {
    let mut report = LedgerReport::default();
    for (key, sightings) in vmis {
        // `ns/name#2` shares its launchers' `kubevirt.io/domain` with `ns/name`.
        let name = key.split('#').next().unwrap_or(key);
        let mine: Vec<&LauncherDeletion> = deletions.iter().filter(|d| d.vmi == name).collect();
        report
            .vmis
            .insert(key.clone(), fate_of(key, sightings, &mine, power_offs));
    }
    report
}

fn fate_of(
    key: &str,
    sightings: &[VmiSighting],
    deletions: &[&LauncherDeletion],
    power_offs: &BTreeMap<String, Vec<SystemTime>>,
) -> VmiFate {
    let mut fate = VmiFate {
        vmi: key.to_owned(),
        first_node: None,
        migrations: Vec::new(),
        outcome: Outcome::Pending,
    };
    // The node the domain runs on, from the sighting at `since` on.
    let mut on: Option<String> = None;
    let mut since = sightings
        .first()
        .map(|s| s.at)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    // What can end a VMI while it runs on `node` in [from, until).
    let harm = |node: &str, from: SystemTime, until: Option<SystemTime>| {
        let within = |t: SystemTime| t >= from && until.is_none_or(|u| t < u);
        let off = power_offs
            .get(node)
            .into_iter()
            .flatten()
            .copied()
            .filter(|t| within(*t))
            .min()
            .map(|t| (t, LossReason::NodePoweredOff));
        let killed = deletions
            .iter()
            .filter(|d| d.node == node && d.grace_seconds == 0 && within(d.at))
            .map(|d| (d.at, LossReason::KilledWithoutGrace))
            .min();
        match (off, killed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    };
    for s in sightings {
        if let Some(node) = &on
            && let Some((at, reason)) = harm(node, since, Some(s.at))
        {
            fate.outcome = Outcome::Lost {
                node: node.clone(),
                at,
                reason,
            };
            return fate;
        }
        since = s.at;
        if s.deleted {
            fate.outcome = Outcome::Deleted {
                node: on.clone(),
                at: s.at,
            };
            return fate;
        }
        if is_final(&s.phase) {
            let node = on.clone().or_else(|| s.node.clone()).unwrap_or_default();
            fate.outcome = if s.phase == "Failed" {
                Outcome::Lost {
                    node,
                    at: s.at,
                    reason: LossReason::Failed,
                }
            } else {
                // The VMI's and its launcher's watches are separate streams: the launcher's
                // deletion may be seen after the VMI's final phase, so order is not required.
                let grace = deletions
                    .iter()
                    .rfind(|d| d.node == node && d.at <= s.at)
                    .or_else(|| deletions.iter().find(|d| d.node == node))
                    .map(|d| d.grace_seconds);
                Outcome::StoppedGracefully {
                    node,
                    at: s.at,
                    grace_seconds: grace,
                }
            };
            return fate;
        }
        if let Some(now) = &s.node {
            match &on {
                Some(prev) if prev != now => fate.migrations.push(Migration {
                    from: prev.clone(),
                    to: now.clone(),
                    at: s.at,
                }),
                Some(_) => {}
                None => {
                    fate.first_node.get_or_insert_with(|| now.clone());
                }
            }
            on = Some(now.clone());
        }
    }
    fate.outcome = match on {
        Some(node) => match harm(&node, since, None) {
            Some((at, reason)) => Outcome::Lost { node, at, reason },
            None => Outcome::Running { node },
        },
        None => Outcome::Pending,
    };
    fate
}

/// What the watches saw, before dating by the audit log.
#[derive(Default)]
struct Raw {
    /// Ledger key → (uid, sightings).
    vmis: BTreeMap<String, (String, Vec<VmiSighting>)>,
    /// uid → ledger key, for incarnations of a name.
    keys: BTreeMap<String, String>,
    deletions: Vec<LauncherDeletion>,
    /// Launcher pods whose deletion was already recorded.
    deleted_pods: std::collections::BTreeSet<String>,
}

impl Raw {
    fn key_for(&mut self, name: &str, uid: &str) -> String {
        if let Some(k) = self.keys.get(uid) {
            return k.clone();
        }
        let mut key = name.to_owned();
        let mut n = 1;
        while self.vmis.contains_key(&key) {
            n += 1;
            key = format!("{name}#{n}");
        }
        self.keys.insert(uid.to_owned(), key.clone());
        self.vmis.insert(key.clone(), (uid.to_owned(), Vec::new()));
        key
    }

    fn sight(&mut self, vmi: &VirtualMachineInstance, deleted: bool) {
        let name = format!("{}/{}", vmi.namespace().unwrap_or_default(), vmi.name_any());
        let uid = vmi.metadata.uid.clone().unwrap_or_default();
        let key = self.key_for(&name, &uid);
        let status = vmi.status.clone().unwrap_or_default();
        let moved_to = status
            .migration_state
            .as_ref()
            .filter(|m| m.completed && !m.failed)
            .and_then(|m| m.target_node.clone());
        let sighting = VmiSighting {
            at: SystemTime::now(),
            node: moved_to.or(status.node_name),
            phase: status.phase.unwrap_or_default(),
            deleted,
        };
        let list = &mut self.vmis.get_mut(&key).expect("key_for inserts").1;
        // Only changes of where it runs or how matter.
        let changed = list.last().is_none_or(|last| {
            last.node != sighting.node || last.phase != sighting.phase || last.deleted != deleted
        });
        if changed {
            list.push(sighting);
        }
    }

    /// Records a launcher's first deletion: the first sighting with a deletion timestamp, or,
    /// for a pod removed at once, its watch's Delete event.
    fn pod(&mut self, pod: &Pod, deleted: bool) {
        let grace = match (
            &pod.metadata.deletion_timestamp,
            pod.metadata.deletion_grace_period_seconds,
        ) {
            (Some(_), Some(g)) => g,
            _ if deleted => 0,
            _ => return,
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if !self.deleted_pods.insert(uid) {
            return;
        }
        let ns = pod.namespace().unwrap_or_default();
        let domain = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(crate::kubevirt::admitter::DOMAIN_ANNOTATION))
            .cloned()
            .unwrap_or_default();
        self.deletions.push(LauncherDeletion {
            vmi: format!("{ns}/{domain}"),
            pod: format!("{ns}/{}", pod.name_any()),
            node: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            at: SystemTime::now(),
            grace_seconds: grace,
        });
    }
}

/// Watches VMIs and launcher pods until dropped.
pub struct Ledger {
    raw: Arc<Mutex<Raw>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Ledger {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger").finish_non_exhaustive()
    }
}

impl Ledger {
    /// Starts the watches and returns once both have listed what exists (at most 30 s).
    pub async fn start(client: Client) -> Self {
        let raw = Arc::new(Mutex::new(Raw::default()));
        let (vmi_ready, vmi_rx) = tokio::sync::oneshot::channel();
        let (pod_ready, pod_rx) = tokio::sync::oneshot::channel();
        let vmis = {
            let raw = raw.clone();
            tokio::spawn(watch(
                Api::<VirtualMachineInstance>::all(client.clone()),
                watcher::Config::default(),
                vmi_ready,
                move |ev| {
                    let mut r = raw.lock().expect("ledger lock");
                    match ev {
                        Event::Apply(v) | Event::InitApply(v) => r.sight(&v, false),
                        Event::Delete(v) => r.sight(&v, true),
                        _ => {}
                    }
                },
            ))
        };
        let pods = {
            let raw = raw.clone();
            tokio::spawn(watch(
                Api::<Pod>::all(client),
                watcher::Config::default().labels("kubevirt.io=virt-launcher"),
                pod_ready,
                move |ev| match ev {
                    Event::Apply(p) | Event::InitApply(p) => {
                        raw.lock().expect("ledger lock").pod(&p, false)
                    }
                    Event::Delete(p) => raw.lock().expect("ledger lock").pod(&p, true),
                    _ => {}
                },
            ))
        };
        for rx in [vmi_rx, pod_rx] {
            let _ = tokio::time::timeout(Duration::from_secs(30), rx).await;
        }
        Self {
            raw,
            tasks: vec![vmis, pods],
        }
    }

    /// The fates so far, each move dated by the audit log's `entries` and laid against the
    /// nodes' `power_offs`.
    pub fn report(
        &self,
        entries: &[AuditEntry],
        power_offs: &BTreeMap<String, Vec<SystemTime>>,
    ) -> LedgerReport {
        let raw = self.raw.lock().expect("ledger lock");
        let vmis: BTreeMap<String, Vec<VmiSighting>> = raw
            .vmis
            .iter()
            .map(|(key, (_, sightings))| {
                let name = key.split('#').next().unwrap_or(key);
                (key.clone(), date_by_audit(name, sightings, entries))
            })
            .collect();
        let deletions: Vec<LauncherDeletion> = raw
            .deletions
            .iter()
            .map(|d| date_deletion(d, entries))
            .collect();
        compute(&vmis, &deletions, power_offs)
    }
}

/// Moves a launcher's deletion back to when the API server completed the `delete` request.
fn date_deletion(d: &LauncherDeletion, entries: &[AuditEntry]) -> LauncherDeletion {
    let Some((ns, name)) = d.pod.split_once('/') else {
        return d.clone();
    };
    let at = entries
        .iter()
        .filter(|e| {
            e.resource == "pods"
                && e.subresource.is_empty()
                && e.verb == "delete"
                && e.namespace == ns
                && e.name == name
                && (200..300).contains(&e.code)
                && e.completed <= d.at
        })
        .map(|e| e.completed)
        .min()
        .unwrap_or(d.at);
    LauncherDeletion { at, ..d.clone() }
}

/// Moves each sighting back to when the API server completed the last write to the VMI it had
/// by then (never before the previous sighting): a watch delivers a change milliseconds after
/// the server had it, which matters when a node powers off right after its last VMI left.
pub fn date_by_audit(
    vmi: &str,
    sightings: &[VmiSighting],
    entries: &[AuditEntry],
) -> Vec<VmiSighting> {
    let Some((ns, name)) = vmi.split_once('/') else {
        return sightings.to_vec();
    };
    let writes: Vec<SystemTime> = entries
        .iter()
        .filter(|e| {
            e.resource == "virtualmachineinstances"
                && e.namespace == ns
                && e.name == name
                && matches!(e.verb.as_str(), "update" | "patch" | "delete")
                && (200..300).contains(&e.code)
        })
        .map(|e| e.completed)
        .collect();
    let mut out: Vec<VmiSighting> = Vec::with_capacity(sightings.len());
    for s in sightings {
        let floor = out.last().map(|p| p.at);
        let dated = writes
            .iter()
            .copied()
            .filter(|w| *w <= s.at && floor.is_none_or(|f| *w >= f))
            .max()
            .unwrap_or(s.at);
        out.push(VmiSighting {
            at: dated,
            ..s.clone()
        });
    }
    out
}

async fn watch<K>(
    api: Api<K>,
    cfg: watcher::Config,
    ready: tokio::sync::oneshot::Sender<()>,
    mut on_event: impl FnMut(Event<K>) + Send + 'static,
) where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    let mut ready = Some(ready);
    let mut stream = std::pin::pin!(watcher::watcher(api, cfg));
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(ev) => {
                let done = matches!(ev, Event::InitDone);
                on_event(ev);
                if done && let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "ledger watch error");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000) + Duration::from_millis(ms)
    }

    fn s(ms: u64, node: Option<&str>, phase: &str) -> VmiSighting {
        VmiSighting {
            at: t(ms),
            node: node.map(str::to_owned),
            phase: phase.into(),
            deleted: false,
        }
    }

    fn one(
        sightings: Vec<VmiSighting>,
        deletions: &[LauncherDeletion],
        offs: &[(&str, u64)],
    ) -> VmiFate {
        let mut power = BTreeMap::<String, Vec<SystemTime>>::new();
        for (node, ms) in offs {
            power.entry((*node).into()).or_default().push(t(*ms));
        }
        let vmis = BTreeMap::from([("default/vm".to_owned(), sightings)]);
        compute(&vmis, deletions, &power).vmis["default/vm"].clone()
    }

    fn started_on(node: &str) -> Vec<VmiSighting> {
        vec![
            s(0, None, "Pending"),
            s(10, Some(node), "Scheduled"),
            s(20, Some(node), "Running"),
        ]
    }

    #[test]
    fn a_vm_still_running_when_its_node_powers_off_is_lost() {
        let f = one(started_on("node-1"), &[], &[("node-1", 500)]);
        assert_eq!(
            f.outcome,
            Outcome::Lost {
                node: "node-1".into(),
                at: t(500),
                reason: LossReason::NodePoweredOff
            }
        );
        assert!(f.is_lost() && !f.is_migrated());
    }

    #[test]
    fn a_vm_that_left_before_the_power_off_migrated() {
        let mut v = started_on("node-1");
        v.push(s(400, Some("node-2"), "Running"));
        let f = one(v, &[], &[("node-1", 500)]);
        assert_eq!(
            f.outcome,
            Outcome::Running {
                node: "node-2".into()
            }
        );
        assert_eq!(
            f.migrations,
            vec![Migration {
                from: "node-1".into(),
                to: "node-2".into(),
                at: t(400)
            }]
        );
        assert_eq!(f.first_node.as_deref(), Some("node-1"));
        assert!(f.is_migrated());
    }

    #[test]
    fn leaving_after_the_power_off_is_too_late() {
        let mut v = started_on("node-1");
        v.push(s(600, Some("node-2"), "Running"));
        let f = one(v, &[], &[("node-1", 500)]);
        assert!(matches!(
            f.outcome,
            Outcome::Lost {
                reason: LossReason::NodePoweredOff,
                ..
            }
        ));
    }

    #[test]
    fn a_power_off_of_another_node_does_not_matter() {
        let f = one(started_on("node-1"), &[], &[("node-2", 500)]);
        assert_eq!(
            f.outcome,
            Outcome::Running {
                node: "node-1".into()
            }
        );
    }

    #[test]
    fn a_graceful_stop_before_the_power_off_is_not_a_loss() {
        let mut v = started_on("node-1");
        v.push(s(300, Some("node-1"), "Succeeded"));
        let del = LauncherDeletion {
            vmi: "default/vm".into(),
            pod: "default/virt-launcher-vm-abcde".into(),
            node: "node-1".into(),
            at: t(100),
            grace_seconds: 60,
        };
        let f = one(v, &[del], &[("node-1", 500)]);
        assert_eq!(
            f.outcome,
            Outcome::StoppedGracefully {
                node: "node-1".into(),
                at: t(300),
                grace_seconds: Some(60)
            }
        );
    }

    #[test]
    fn a_launcher_deletion_seen_after_the_final_phase_still_gives_the_grace() {
        let mut v = started_on("node-1");
        v.push(s(300, Some("node-1"), "Succeeded"));
        let del = LauncherDeletion {
            vmi: "default/vm".into(),
            pod: "default/virt-launcher-vm-abcde".into(),
            node: "node-1".into(),
            at: t(310),
            grace_seconds: 30,
        };
        let f = one(v, &[del], &[("node-1", 500)]);
        assert!(
            matches!(
                f.outcome,
                Outcome::StoppedGracefully {
                    grace_seconds: Some(30),
                    ..
                }
            ),
            "{f:?}"
        );
    }

    #[test]
    fn a_launcher_deleted_without_grace_loses_its_vm() {
        let del = LauncherDeletion {
            vmi: "default/vm".into(),
            pod: "default/virt-launcher-vm-abcde".into(),
            node: "node-1".into(),
            at: t(100),
            grace_seconds: 0,
        };
        let f = one(started_on("node-1"), std::slice::from_ref(&del), &[]);
        assert!(matches!(
            f.outcome,
            Outcome::Lost {
                reason: LossReason::KilledWithoutGrace,
                ..
            }
        ));
        // The same kill of a launcher on another node (a migration target) does not.
        let elsewhere = LauncherDeletion {
            node: "node-2".into(),
            ..del
        };
        let f = one(started_on("node-1"), &[elsewhere], &[]);
        assert_eq!(
            f.outcome,
            Outcome::Running {
                node: "node-1".into()
            }
        );
    }

    #[test]
    fn failed_is_lost_and_pending_is_not() {
        let mut v = started_on("node-1");
        v.push(s(50, Some("node-1"), "Failed"));
        assert!(one(v, &[], &[]).is_lost());
        let f = one(vec![s(0, None, "Pending")], &[], &[("node-1", 5)]);
        assert_eq!(f.outcome, Outcome::Pending);
    }

    #[test]
    fn sightings_are_dated_by_the_last_write_the_server_had() {
        let entry = |verb: &str, ms: u64| AuditEntry {
            verb: verb.into(),
            resource: "virtualmachineinstances".into(),
            subresource: String::new(),
            namespace: "default".into(),
            name: "vm".into(),
            user: "kubevirt".into(),
            code: 200,
            received: t(ms - 1),
            completed: t(ms),
        };
        let sightings = vec![
            s(20, Some("node-1"), "Running"),
            s(505, Some("node-2"), "Running"),
        ];
        let entries = vec![
            entry("update", 15),
            entry("update", 498),
            entry("update", 520),
        ];
        let dated = date_by_audit("default/vm", &sightings, &entries);
        assert_eq!(dated[0].at, t(15));
        assert_eq!(
            dated[1].at,
            t(498),
            "the write at 520 came after the watch saw it"
        );
        // With the power-off at 500, the watch alone would call it lost; the server had it first.
        let vmis = BTreeMap::from([("default/vm".to_owned(), dated)]);
        let offs = BTreeMap::from([("node-1".to_owned(), vec![t(500)])]);
        assert!(compute(&vmis, &[], &offs).vmis["default/vm"].is_migrated());
    }

    #[test]
    fn the_report_counts_and_names_the_lost() {
        let mut vmis = BTreeMap::new();
        vmis.insert("default/a".to_owned(), started_on("node-1"));
        let mut b = started_on("node-1");
        b.push(s(100, Some("node-3"), "Running"));
        vmis.insert("default/b".to_owned(), b);
        let offs = BTreeMap::from([("node-1".to_owned(), vec![t(200)])]);
        let report = compute(&vmis, &[], &offs);
        assert_eq!(
            report.summary(),
            "2 VMIs: 1 migrated, 0 stopped gracefully, 1 lost, 0 other"
        );
        let text = report.to_string();
        assert!(text.contains("LOST on node-1"), "{text}");
        assert!(text.contains("node-1 → node-3"), "{text}");
    }
}
