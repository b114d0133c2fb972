//! What happened to a node, as the cluster saw it: a recorder that watches the Node, the VMIs,
//! the migrations and the pods and stamps each change with the moment its watch event arrived,
//! plus the eviction requests from the API server's audit log.
//!
//! Scenario tests prove orderings from these stamps and the node's power-off time, never from
//! the agent's own logs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::task::JoinHandle;

use crate::controlplane::{AuditEvent, ControlPlane};
use crate::kubevirt::{VirtualMachineInstance, VirtualMachineInstanceMigration};

/// One observed change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Cordoned,
    Uncordoned,
    /// KubeVirt marked the VMI for evacuation (`status.evacuationNodeName`).
    EvacuationRequested {
        vmi: String,
    },
    MigrationCreated {
        vmi: String,
        migration: String,
    },
    MigrationPhase {
        vmi: String,
        migration: String,
        phase: String,
    },
    /// The VMI now runs elsewhere (`status.nodeName` moved: the hand-over).
    Migrated {
        vmi: String,
        target: String,
    },
    /// The VMI reached a final phase on the node, or was deleted while there.
    Stopped {
        vmi: String,
        phase: String,
    },
    PodDeleted {
        pod: String,
    },
    /// An eviction request as the audit log has it (`code` 201 allowed, 429 refused, …).
    Eviction {
        pod: String,
        code: u16,
    },
    /// A Warning Event on the Node.
    NodeWarning {
        reason: String,
        message: String,
    },
}

#[derive(Clone, Debug)]
pub struct Stamped {
    pub at: SystemTime,
    pub change: Change,
}

#[derive(Default)]
struct State {
    log: Vec<Stamped>,
    unschedulable: Option<bool>,
    /// vmi → (node, phase, evacuation requested, completed migration seen)
    vmis: HashMap<String, (Option<String>, String, bool)>,
    vmim_phase: HashMap<String, String>,
}

/// Records changes around `node` until dropped.
pub struct Recorder {
    node: String,
    state: Arc<Mutex<State>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn key(obj: &impl ResourceExt) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

impl Recorder {
    /// Starts the watches and returns once each has listed its objects, so every later change
    /// is seen.
    pub async fn start(client: Client, node: &str) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let mut tasks = Vec::new();
        let mut ready = Vec::new();

        let mut spawn_watch = |task: JoinHandle<()>, rx: tokio::sync::oneshot::Receiver<()>| {
            tasks.push(task);
            ready.push(rx);
        };

        {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let api: Api<Node> = Api::all(client.clone());
            let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
            let st = state.clone();
            spawn_watch(
                tokio::spawn(watch_loop(api, cfg, tx, move |ev| {
                    if let Event::Apply(n) | Event::InitApply(n) = ev {
                        let now = n
                            .spec
                            .as_ref()
                            .and_then(|s| s.unschedulable)
                            .unwrap_or(false);
                        let mut s = st.lock().expect("timeline lock");
                        let before = s.unschedulable.replace(now);
                        if before.is_some_and(|b| b != now) {
                            let change = if now {
                                Change::Cordoned
                            } else {
                                Change::Uncordoned
                            };
                            s.log.push(stamp(change));
                        }
                    }
                })),
                rx,
            );
        }
        {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let api: Api<VirtualMachineInstance> = Api::all(client.clone());
            let st = state.clone();
            let node = node.to_owned();
            spawn_watch(
                tokio::spawn(watch_loop(api, watcher::Config::default(), tx, move |ev| {
                    let mut s = st.lock().expect("timeline lock");
                    match ev {
                        Event::Apply(v) | Event::InitApply(v) => observe_vmi(&mut s, &node, &v),
                        Event::Delete(v) => {
                            let k = key(&v);
                            if let Some((Some(on), phase, _)) = s.vmis.remove(&k)
                                && on == node
                                && !is_final(&phase)
                            {
                                s.log.push(stamp(Change::Stopped {
                                    vmi: k,
                                    phase: "Deleted".into(),
                                }));
                            }
                        }
                        _ => {}
                    }
                })),
                rx,
            );
        }
        {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let api: Api<VirtualMachineInstanceMigration> = Api::all(client.clone());
            let st = state.clone();
            spawn_watch(
                tokio::spawn(watch_loop(api, watcher::Config::default(), tx, move |ev| {
                    let (Event::Apply(m) | Event::InitApply(m)) = ev else {
                        return;
                    };
                    let mut s = st.lock().expect("timeline lock");
                    let k = key(&m);
                    let vmi = format!("{}/{}", m.namespace().unwrap_or_default(), m.spec.vmi_name);
                    let phase = m
                        .status
                        .as_ref()
                        .and_then(|st| st.phase.clone())
                        .unwrap_or_default();
                    match s.vmim_phase.get(&k).cloned() {
                        None => {
                            s.log.push(stamp(Change::MigrationCreated {
                                vmi: vmi.clone(),
                                migration: k.clone(),
                            }));
                            if !phase.is_empty() {
                                s.log.push(stamp(Change::MigrationPhase {
                                    vmi,
                                    migration: k.clone(),
                                    phase: phase.clone(),
                                }));
                            }
                        }
                        Some(old) if old != phase && !phase.is_empty() => {
                            s.log.push(stamp(Change::MigrationPhase {
                                vmi,
                                migration: k.clone(),
                                phase: phase.clone(),
                            }));
                        }
                        _ => {}
                    }
                    s.vmim_phase.insert(k, phase);
                })),
                rx,
            );
        }
        {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let api: Api<Pod> = Api::all(client.clone());
            let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
            let st = state.clone();
            spawn_watch(
                tokio::spawn(watch_loop(api, cfg, tx, move |ev| {
                    if let Event::Delete(p) = ev {
                        st.lock()
                            .expect("timeline lock")
                            .log
                            .push(stamp(Change::PodDeleted { pod: key(&p) }));
                    }
                })),
                rx,
            );
        }
        {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let api: Api<k8s_openapi::api::core::v1::Event> = Api::all(client.clone());
            let cfg = watcher::Config::default().fields(&format!(
                "involvedObject.kind=Node,involvedObject.name={node},type=Warning"
            ));
            let st = state.clone();
            spawn_watch(
                tokio::spawn(watch_loop(api, cfg, tx, move |ev| {
                    if let Event::Apply(e) = ev {
                        st.lock()
                            .expect("timeline lock")
                            .log
                            .push(stamp(Change::NodeWarning {
                                reason: e.reason.unwrap_or_default(),
                                message: e.message.unwrap_or_default(),
                            }));
                    }
                })),
                rx,
            );
        }
        for rx in ready {
            let _ = tokio::time::timeout(Duration::from_secs(30), rx).await;
        }
        Self {
            node: node.to_owned(),
            state,
            tasks,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Everything recorded so far, in the order seen.
    pub fn changes(&self) -> Vec<Stamped> {
        self.state.lock().expect("timeline lock").log.clone()
    }

    /// When the change matching `pred` was first seen.
    pub fn first(&self, pred: impl Fn(&Change) -> bool) -> Option<SystemTime> {
        self.changes()
            .into_iter()
            .find(|s| pred(&s.change))
            .map(|s| s.at)
    }

    /// When each VMI left the node (migrated or stopped), by VMI.
    pub fn departures(&self) -> BTreeMap<String, (SystemTime, Change)> {
        let mut out = BTreeMap::new();
        for s in self.changes() {
            let vmi = match &s.change {
                Change::Migrated { vmi, .. } | Change::Stopped { vmi, .. } => vmi.clone(),
                _ => continue,
            };
            out.entry(vmi).or_insert((s.at, s.change));
        }
        out
    }

    /// Waits until every VMI in `vmis` has left the node as the recorder saw it (its watch may
    /// trail the agent's by a few milliseconds); returns whether they all did within `timeout`.
    pub async fn wait_departed(&self, vmis: &[&str], timeout: Duration) -> bool {
        crate::wait::until(timeout, Duration::from_millis(10), || async {
            let gone = self.departures();
            vmis.iter().all(|v| gone.contains_key(*v)).then_some(())
        })
        .await
        .is_some()
    }

    /// VMIs the recorder currently believes run on the node.
    pub fn vmis_on_node(&self) -> Vec<String> {
        let s = self.state.lock().expect("timeline lock");
        let mut v: Vec<String> = s
            .vmis
            .iter()
            .filter(|(_, (on, phase, _))| {
                on.as_deref() == Some(self.node.as_str()) && !is_final(phase)
            })
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// Per VMI: (node, phase) as last seen.
    pub fn vmi_states(&self) -> BTreeMap<String, (Option<String>, String)> {
        let s = self.state.lock().expect("timeline lock");
        s.vmis
            .iter()
            .map(|(k, (n, p, _))| (k.clone(), (n.clone(), p.clone())))
            .collect()
    }
}

fn stamp(change: Change) -> Stamped {
    Stamped {
        at: SystemTime::now(),
        change,
    }
}

fn is_final(phase: &str) -> bool {
    matches!(phase, "Succeeded" | "Failed")
}

fn observe_vmi(s: &mut State, node: &str, v: &VirtualMachineInstance) {
    let k = key(v);
    let status = v.status.clone().unwrap_or_default();
    let now_node = status.node_name.clone();
    let phase = status.phase.clone().unwrap_or_default();
    let evac = status.evacuation_node_name.as_deref() == Some(node);
    let prev = s.vmis.get(&k).cloned();
    if let Some((prev_node, prev_phase, prev_evac)) = prev {
        if evac && !prev_evac {
            s.log
                .push(stamp(Change::EvacuationRequested { vmi: k.clone() }));
        }
        let was_here = prev_node.as_deref() == Some(node) && !is_final(&prev_phase);
        // The hand-over moves `status.nodeName`; from KubeVirt 1.6 `completed` follows in a
        // later update, in 1.5 it came before.
        if was_here && now_node.as_deref().is_some_and(|n| n != node) {
            s.log.push(stamp(Change::Migrated {
                vmi: k.clone(),
                target: now_node.clone().unwrap_or_default(),
            }));
        }
        if was_here && now_node.as_deref() == Some(node) && is_final(&phase) {
            s.log.push(stamp(Change::Stopped {
                vmi: k.clone(),
                phase: phase.clone(),
            }));
        }
    } else if evac {
        s.log
            .push(stamp(Change::EvacuationRequested { vmi: k.clone() }));
    }
    s.vmis.insert(k, (now_node, phase, evac));
}

async fn watch_loop<K>(
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
                let init_done = matches!(ev, Event::InitDone);
                on_event(ev);
                if init_done && let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "timeline watch error");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// One eviction request from the audit log.
#[derive(Clone, Debug)]
pub struct AuditEviction {
    pub pod: String,
    pub code: u16,
    pub received: SystemTime,
    pub user: String,
}

/// Every `create pods/eviction` the API server answered, from its audit log.
pub fn audit_evictions(cp: &ControlPlane) -> Vec<AuditEviction> {
    audit_entries(cp)
        .into_iter()
        .filter(|e| e.resource == "pods" && e.subresource == "eviction" && e.verb == "create")
        .map(|e| AuditEviction {
            pod: format!("{}/{}", e.namespace, e.name),
            code: e.code,
            received: e.received,
            user: e.user,
        })
        .collect()
}

/// A completed request from the audit log, flattened for matching in tests.
#[derive(Clone, Debug)]
pub struct AuditEntry {
    pub verb: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    pub user: String,
    pub code: u16,
    /// When the API server received the request (`requestReceivedTimestamp`).
    pub received: SystemTime,
    /// When it had answered it (`stageTimestamp` of `ResponseComplete`).
    pub completed: SystemTime,
}

impl AuditEntry {
    fn from_event(e: &AuditEvent) -> Option<Self> {
        let received: DateTime<Utc> = e.request_received_timestamp.parse().ok()?;
        let completed: DateTime<Utc> = e.stage_timestamp.parse().unwrap_or(received);
        let r = e.object_ref.clone().unwrap_or_default();
        Some(Self {
            verb: e.verb.clone(),
            resource: r.resource,
            subresource: r.subresource.unwrap_or_default(),
            namespace: r.namespace.unwrap_or_default(),
            name: r.name.unwrap_or_default(),
            user: e.user.username.clone(),
            code: e.code().unwrap_or(0),
            received: received.into(),
            completed: completed.into(),
        })
    }
}

/// The completed requests of the plane's audit log, in order (an unreadable log reads as empty).
pub fn audit_entries(cp: &ControlPlane) -> Vec<AuditEntry> {
    cp.audit_events()
        .unwrap_or_default()
        .iter()
        .filter(|e| e.stage == "ResponseComplete")
        .filter_map(AuditEntry::from_event)
        .collect()
}

/// Seconds between two moments, negative when `b` is before `a`.
pub fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}
