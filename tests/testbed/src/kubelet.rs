//! Simulated nodes and kubelets.
//!
//! The control plane is real, so pods only progress if something plays the kubelet. This
//! module registers `Node` objects, keeps them alive the way kubelet does (a `Lease` in
//! `kube-node-lease` renewed every 10 s, `pkg/kubelet/nodelease` + `k8s.io/component-helpers/apimachinery/lease`,
//! and a fresh `Ready` condition, `pkg/kubelet/kubelet_node_status.go`), so the real
//! node-lifecycle controller stays on and never taints the nodes unreachable.
//!
//! Pods bound to a simulated node follow kubelet's lifecycle (`pkg/kubelet/status/status_manager.go`,
//! `pkg/kubelet/pod_workers.go`, `pkg/kubelet/kubelet_pods.go` in kubernetes/kubernetes):
//! - a bound pod goes `Running` with the conditions, IPs and container statuses kubelet reports;
//!   a status report the API server did not take is sent again by the status manager's periodic
//!   sync (`syncPeriod`, 10 s) until it lands;
//! - a graceful deletion "sends SIGTERM" and waits for the workload to exit, at most the pod's
//!   grace period; the containers then end (exit 0 if the workload exited, 137 if killed), the
//!   pod goes terminal (`Succeeded`/`Failed`), and, like the status manager once a terminal pod has
//!   a deletion timestamp, the sim deletes it with grace 0 and a UID precondition;
//! - a workload exiting on its own makes a `restartPolicy: Never/OnFailure` pod terminal (it stays
//!   until deleted); `Always` restarts the container (restartCount + 1).
//!
//! - kubelet's own termination of a pod, without the API ([`Workloads::kill_locally`], what
//!   graceful node shutdown's `TerminatePodAbnormallyAndWait` does): SIGTERM with a grace
//!   override, the pod's `DisruptionTarget` condition, then phase `Failed` with the given reason
//!   and message; the pod object stays.
//!
//! What the workload does is decided by other simulators through [`Workloads`]: e.g. the KubeVirt
//! sim marks a virt-launcher's workload exited once its VM has shut down or migrated away, and
//! shuts a VM down when its launcher got SIGTERM ([`Workloads::local_kill`]).
//! A pod annotated [`SIGTERM_EXIT_ANNOTATION`] exits that many seconds after SIGTERM by itself.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

/// A pod annotated with this (seconds, integer) exits by itself that long after SIGTERM,
/// like a workload with a shutdown handler. Without it the workload ignores SIGTERM and is
/// killed when the grace period ends, unless a simulator marks it exited first.
pub const SIGTERM_EXIT_ANNOTATION: &str = "testbed.shutdown-guard.io/exit-after-sigterm-seconds";

/// kubelet's defaults: `leaseDurationSeconds` 40, renewed every quarter of it
/// (`pkg/kubelet/nodelease`, `renewIntervalFraction = 0.25`), and `nodeStatusUpdateFrequency` 10 s.
const LEASE_DURATION_SECONDS: i32 = 40;
const RENEW_INTERVAL: Duration = Duration::from_secs(10);
const LEASE_NAMESPACE: &str = "kube-node-lease";
/// The status manager's `syncPeriod`: how soon a status update that failed is sent again.
const STATUS_RESYNC: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("kubernetes API call failed while {action}: {source}")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("unknown simulated node {0:?}")]
    UnknownNode(String),
    #[error("namespace {LEASE_NAMESPACE} did not appear within 30 s")]
    NoLeaseNamespace,
}

fn api_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeletError {
    let action = action.into();
    move |source| KubeletError::Api { action, source }
}

/// One simulated node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    /// `status.nodeInfo.bootID`; a node "reboot" changes it ([`KubeletSim::set_boot_id`]).
    pub boot_id: String,
    /// Extra labels besides the `kubernetes.io/*` ones kubelet sets.
    pub labels: BTreeMap<String, String>,
    pub cpu: String,
    pub memory: String,
    pub max_pods: u32,
}

impl NodeConfig {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            boot_id: random_uuid(),
            labels: BTreeMap::new(),
            cpu: "16".into(),
            memory: "64Gi".into(),
            max_pods: 110,
        }
    }
}

/// `node-1` … `node-N`.
pub fn node_names(count: usize) -> Vec<String> {
    (1..=count).map(|i| format!("node-{i}")).collect()
}

/// How a simulated workload ended: its (main) container's exit code.
pub type ExitCode = i32;

/// kubelet ending a pod on its own, not through the API (graceful node shutdown): the
/// containers get SIGTERM and at most `grace`, then the pod reports `Failed` with `reason` and
/// `message` and a `DisruptionTarget` condition with `condition_reason`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalKill {
    pub grace: Duration,
    pub reason: String,
    pub message: String,
    pub condition_reason: String,
}

/// Shared registry of simulated workloads, keyed by pod UID. Other simulators mark a pod's
/// workload exited; the kubelet sim reacts as kubelet reacts to its containers exiting.
#[derive(Clone, Default)]
pub struct Workloads {
    inner: Arc<Mutex<HashMap<String, watch::Sender<Option<ExitCode>>>>>,
    kills: Arc<Mutex<HashMap<String, watch::Sender<Option<LocalKill>>>>>,
}

impl std::fmt::Debug for Workloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workloads").finish_non_exhaustive()
    }
}

impl Workloads {
    /// The workload of the pod with this UID has exited with `code` (0: clean).
    /// Safe to call before the kubelet sim has seen the pod.
    pub fn exit(&self, pod_uid: &str, code: ExitCode) {
        self.sender(pod_uid).send_replace(Some(code));
    }

    /// Whether the workload of this pod has exited, and how.
    pub fn exited(&self, pod_uid: &str) -> Option<ExitCode> {
        *self.sender(pod_uid).borrow()
    }

    fn sender(&self, pod_uid: &str) -> watch::Sender<Option<ExitCode>> {
        let mut map = self.inner.lock().expect("workloads lock");
        map.entry(pod_uid.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    fn subscribe(&self, pod_uid: &str) -> watch::Receiver<Option<ExitCode>> {
        self.sender(pod_uid).subscribe()
    }

    /// kubelet terminates the pod's containers itself (see [`LocalKill`]). A second kill only
    /// shortens the grace period. Safe to call before the kubelet sim has seen the pod.
    pub fn kill_locally(&self, pod_uid: &str, kill: LocalKill) {
        self.kill_sender(pod_uid).send_modify(|k| match k {
            Some(old) if old.grace <= kill.grace => {}
            _ => *k = Some(kill),
        });
    }

    /// Whether kubelet has sent the pod's containers SIGTERM on its own, and how.
    pub fn local_kill(&self, pod_uid: &str) -> Option<LocalKill> {
        self.kill_sender(pod_uid).borrow().clone()
    }

    fn kill_sender(&self, pod_uid: &str) -> watch::Sender<Option<LocalKill>> {
        let mut map = self.kills.lock().expect("workloads lock");
        map.entry(pod_uid.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    /// A restarted container runs a fresh workload.
    fn restart(&self, pod_uid: &str) {
        self.sender(pod_uid).send_replace(None);
    }

    fn forget(&self, pod_uid: &str) {
        self.inner.lock().expect("workloads lock").remove(pod_uid);
        self.kills.lock().expect("workloads lock").remove(pod_uid);
    }
}

/// Simulated kubelets for a set of nodes. Dropping it stops every simulation task (the Node
/// objects stay; their leases then expire as a dead kubelet's would).
pub struct KubeletSim {
    client: Client,
    nodes: Mutex<Vec<NodeConfig>>,
    workloads: Workloads,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for KubeletSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletSim")
            .field("nodes", &self.node_names())
            .finish_non_exhaustive()
    }
}

impl Drop for KubeletSim {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl KubeletSim {
    /// Registers the nodes (Ready, with leases) and starts their kubelets. Returns once every
    /// Node exists with a Ready condition and a lease.
    pub async fn spawn(client: Client, nodes: Vec<NodeConfig>) -> Result<Self, KubeletError> {
        wait_for_lease_namespace(&client).await?;
        let workloads = Workloads::default();
        let mut tasks = Vec::new();
        for (index, node) in nodes.iter().enumerate() {
            let ip = node_ip(index);
            register_node(&client, node, &ip).await?;
            renew(&client, &node.name).await?;
            tasks.push(tokio::spawn(heartbeat_loop(
                client.clone(),
                node.name.clone(),
            )));
            tasks.push(tokio::spawn(pod_loop(
                client.clone(),
                node.name.clone(),
                ip,
                index,
                workloads.clone(),
            )));
        }
        Ok(Self {
            client,
            nodes: Mutex::new(nodes),
            workloads,
            tasks,
        })
    }

    /// `spawn` for `node-1` … `node-N` with default capacity.
    pub async fn spawn_n(client: Client, count: usize) -> Result<Self, KubeletError> {
        Self::spawn(
            client,
            node_names(count).into_iter().map(NodeConfig::new).collect(),
        )
        .await
    }

    pub fn node_names(&self) -> Vec<String> {
        self.nodes
            .lock()
            .expect("nodes lock")
            .iter()
            .map(|n| n.name.clone())
            .collect()
    }

    /// The handle other simulators use to end pods' workloads.
    pub fn workloads(&self) -> Workloads {
        self.workloads.clone()
    }

    /// Sets `status.nodeInfo.bootID`, as a kubelet starting after a reboot reports a new one.
    pub async fn set_boot_id(&self, node: &str, boot_id: &str) -> Result<(), KubeletError> {
        {
            let mut nodes = self.nodes.lock().expect("nodes lock");
            let entry = nodes
                .iter_mut()
                .find(|n| n.name == node)
                .ok_or_else(|| KubeletError::UnknownNode(node.to_owned()))?;
            entry.boot_id = boot_id.to_owned();
        }
        Api::<Node>::all(self.client.clone())
            .patch_status(
                node,
                &PatchParams::default(),
                &Patch::Strategic(json!({"status": {"nodeInfo": {"bootID": boot_id}}})),
            )
            .await
            .map_err(api_err(format!("setting boot ID of {node}")))?;
        Ok(())
    }

    /// The boot ID last reported for `node`.
    pub fn boot_id(&self, node: &str) -> Option<String> {
        self.nodes
            .lock()
            .expect("nodes lock")
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.boot_id.clone())
    }
}

fn random_uuid() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]]),
    )
}

fn node_ip(index: usize) -> String {
    format!("10.0.{}.{}", index / 250, index % 250 + 2)
}

fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

async fn wait_for_lease_namespace(client: &Client) -> Result<(), KubeletError> {
    // kube-apiserver's system-namespaces controller creates it shortly after start.
    let api = Api::<Namespace>::all(client.clone());
    for _ in 0..300 {
        if api
            .get_opt(LEASE_NAMESPACE)
            .await
            .map_err(api_err("reading namespace kube-node-lease"))?
            .is_some()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(KubeletError::NoLeaseNamespace)
}

fn ready_conditions() -> serde_json::Value {
    let now = now_rfc3339();
    let cond = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    json!([
        cond(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available"
        ),
        cond(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure"
        ),
        cond(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available"
        ),
        cond(
            "Ready",
            "True",
            "KubeletReady",
            "kubelet is posting ready status"
        ),
    ])
}

async fn register_node(client: &Client, node: &NodeConfig, ip: &str) -> Result<(), KubeletError> {
    let api = Api::<Node>::all(client.clone());
    let mut labels = node.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), node.name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), "amd64".into());
    let resources = json!({"cpu": node.cpu, "memory": node.memory, "pods": node.max_pods.to_string(),
                           "ephemeral-storage": "100Gi"});
    let status = json!({
        "capacity": resources,
        "allocatable": resources,
        "conditions": ready_conditions(),
        "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": node.name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "machineID": node.name.replace('-', "").repeat(4).chars().take(32).collect::<String>(),
            "systemUUID": random_uuid(), "bootID": node.boot_id,
            "kernelVersion": "6.12.0-testbed", "osImage": "Debian GNU/Linux 13 (trixie)",
            "containerRuntimeVersion": "containerd://2.0.0", "kubeletVersion": "v1.36.0-testbed",
            "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"
        }
    });
    let object: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node.name, "labels": labels},
        "spec": {},
    }))
    .expect("node literal is valid");
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {
            api.patch(
                &node.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels}})),
            )
            .await
            .map_err(api_err(format!("relabelling node {}", node.name)))?;
        }
        Err(e) => return Err(api_err(format!("creating node {}", node.name))(e)),
    }
    // Node status is a subresource: write it explicitly, as kubelet's first status sync does.
    api.patch_status(
        &node.name,
        &PatchParams::default(),
        &Patch::Strategic(json!({"status": status})),
    )
    .await
    .map_err(api_err(format!("writing status of node {}", node.name)))?;
    Ok(())
}

/// Renews the node's lease (creating it, owned by the Node as kubelet does) and refreshes
/// the Ready heartbeat.
async fn renew(client: &Client, node: &str) -> Result<(), KubeletError> {
    let leases = Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE);
    let renew_time = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    let patched = leases
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"renewTime": renew_time, "holderIdentity": node}})),
        )
        .await;
    match patched {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {
            let node_obj = Api::<Node>::all(client.clone())
                .get(node)
                .await
                .map_err(api_err(format!("reading node {node}")))?;
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": node, "namespace": LEASE_NAMESPACE, "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": node,
                    "uid": node_obj.metadata.uid.unwrap_or_default()}]},
                "spec": {"holderIdentity": node, "leaseDurationSeconds": LEASE_DURATION_SECONDS,
                         "renewTime": renew_time},
            }))
            .expect("lease literal is valid");
            leases
                .create(&PostParams::default(), &lease)
                .await
                .map_err(api_err(format!("creating lease of {node}")))?;
        }
        Err(e) => return Err(api_err(format!("renewing lease of {node}"))(e)),
    }
    let now = now_rfc3339();
    Api::<Node>::all(client.clone())
        .patch_status(
            node,
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "kubelet is posting ready status", "lastHeartbeatTime": now}
            ]}})),
        )
        .await
        .map_err(api_err(format!("heartbeat of node {node}")))?;
    Ok(())
}

async fn heartbeat_loop(client: Client, node: String) {
    let mut tick = tokio::time::interval(RENEW_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = renew(&client, &node).await {
            tracing::warn!(node, error = %e, "node heartbeat failed; retrying next interval");
        }
    }
}

/// Watches the pods bound to one node (`spec.nodeName=<node>`, the field selector kubelet
/// itself uses) and runs one lifecycle task per pod.
async fn pod_loop(
    client: Client,
    node: String,
    node_ip: String,
    index: usize,
    workloads: Workloads,
) {
    let api = Api::<Pod>::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = std::pin::pin!(watcher(api, config));
    // Dropping the set (this task aborted) aborts every pod task.
    let mut running = tokio::task::JoinSet::new();
    let mut pods: HashMap<String, (watch::Sender<Option<Pod>>, AbortHandle)> = HashMap::new();
    let mut seen_in_init: Vec<String> = Vec::new();
    let ctx = Arc::new(PodCtx {
        client,
        node_ip,
        node_index: index,
        next_ip: Mutex::new(0),
        workloads,
    });
    let deliver = |running: &mut tokio::task::JoinSet<()>,
                   pods: &mut HashMap<String, (watch::Sender<Option<Pod>>, AbortHandle)>,
                   pod: Option<Pod>,
                   uid: String| {
        while running.try_join_next().is_some() {}
        pods.retain(|_, (_, task)| !task.is_finished());
        match (pods.get(&uid), pod) {
            (Some((tx, _)), pod) => {
                tx.send_replace(pod);
            }
            (None, Some(pod)) => {
                let (tx, rx) = watch::channel(Some(pod));
                let task = running.spawn(run_pod(ctx.clone(), uid.clone(), rx));
                pods.insert(uid, (tx, task));
            }
            (None, None) => {}
        }
    };
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => seen_in_init.clear(),
            Ok(watcher::Event::InitApply(pod)) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                seen_in_init.push(uid.clone());
                deliver(&mut running, &mut pods, Some(pod), uid);
            }
            Ok(watcher::Event::Apply(pod)) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                deliver(&mut running, &mut pods, Some(pod), uid);
            }
            Ok(watcher::Event::InitDone) => {
                let gone: Vec<String> = pods
                    .keys()
                    .filter(|uid| !seen_in_init.contains(uid))
                    .cloned()
                    .collect();
                for uid in gone {
                    deliver(&mut running, &mut pods, None, uid);
                }
            }
            Ok(watcher::Event::Delete(pod)) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                deliver(&mut running, &mut pods, None, uid);
            }
            Err(e) => {
                tracing::debug!(node, error = %e, "pod watch error; the watcher retries");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

struct PodCtx {
    client: Client,
    node_ip: String,
    node_index: usize,
    next_ip: Mutex<u32>,
    workloads: Workloads,
}

impl PodCtx {
    fn allocate_ip(&self) -> String {
        let mut n = self.next_ip.lock().expect("ip lock");
        *n += 1;
        let host = *n % 60000 + 2;
        // One /16 per node, as a CNI with per-node pod CIDRs hands out.
        format!(
            "10.{}.{}.{}",
            100 + self.node_index % 150,
            host / 250,
            host % 250 + 1
        )
    }
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

fn deletion_grace(pod: &Pod) -> Option<Duration> {
    pod.metadata.deletion_timestamp.as_ref()?;
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .unwrap_or(30)
        .max(0);
    Some(Duration::from_secs(secs as u64))
}

fn sigterm_exit_after(pod: &Pod) -> Option<Duration> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(SIGTERM_EXIT_ANNOTATION)?
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The lifecycle of one pod on a simulated node.
async fn run_pod(ctx: Arc<PodCtx>, uid: String, mut updates: watch::Receiver<Option<Pod>>) {
    let mut exits = ctx.workloads.subscribe(&uid);
    let mut kills = ctx.workloads.kill_sender(&uid).subscribe();
    // A kill sent before this task subscribed counts too.
    kills.mark_changed();
    let mut killed: Option<LocalKill> = None;
    let pods_of = |pod: &Pod| {
        Api::<Pod>::namespaced(
            ctx.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        )
    };
    let Some(first) = updates.borrow_and_update().clone() else {
        return;
    };
    let name = first.metadata.name.clone().unwrap_or_default();
    let started = Utc::now();
    let mut restarts = 0;
    let pod_ip = if first
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        ctx.node_ip.clone()
    } else {
        ctx.allocate_ip()
    };

    // A report the API server did not take (a reset pooled connection, a timeout) and when
    // it goes again; a later report replaces it.
    let mut unsynced: Option<(serde_json::Value, Instant)> = None;
    if !is_terminal(&first) && first.metadata.deletion_timestamp.is_none() {
        let status = running_status(&first, &ctx.node_ip, &pod_ip, started, restarts);
        unsynced = report_status(&pods_of(&first), &name, status, "Running").await;
    }

    let mut terminal = is_terminal(&first);
    let mut kill_deadline: Option<Instant> = None;
    let mut self_exit: Option<Instant> = None;
    let mut current = first;
    loop {
        if let Some(grace) = deletion_grace(&current) {
            if terminal {
                delete_now(&pods_of(&current), &name, &uid).await;
                // Keep following until the watch reports it gone.
            } else {
                // A second delete may shorten the grace period; never lengthen it.
                let deadline = Instant::now() + grace;
                kill_deadline = Some(kill_deadline.map_or(deadline, |d| d.min(deadline)));
                if self_exit.is_none()
                    && let Some(after) = sigterm_exit_after(&current)
                {
                    self_exit = Some(Instant::now() + after);
                }
            }
        }
        let sleep_until = [kill_deadline, self_exit].into_iter().flatten().min();
        let resync_at = unsynced.as_ref().map(|(_, at)| *at).filter(|_| !terminal);
        tokio::select! {
            _ = sleep_until_opt(resync_at), if resync_at.is_some() => {
                if let Some((status, _)) = unsynced.take() {
                    unsynced = report_status(&pods_of(&current), &name, status, "status").await;
                }
                continue;
            }
            changed = updates.changed() => {
                if changed.is_err() {
                    break;
                }
                match updates.borrow_and_update().clone() {
                    Some(pod) => {
                        terminal = terminal || is_terminal(&pod);
                        current = pod;
                    }
                    None => break,
                }
                continue;
            }
            changed = kills.changed(), if !terminal => {
                if changed.is_err() {
                    break;
                }
                let Some(kill) = kills.borrow_and_update().clone() else { continue };
                let deadline = Instant::now() + kill.grace;
                kill_deadline = Some(kill_deadline.map_or(deadline, |d| d.min(deadline)));
                if self_exit.is_none()
                    && let Some(after) = sigterm_exit_after(&current)
                {
                    self_exit = Some(Instant::now() + after);
                }
                let now = now_rfc3339();
                let condition = json!({"status": {"conditions": [{
                    "type": "DisruptionTarget", "status": "True", "reason": kill.condition_reason,
                    "message": kill.message, "lastTransitionTime": now}]}});
                // Merged into a report still unsent, so neither is lost.
                let condition = match unsynced.take() {
                    Some((mut status, _)) => {
                        merge_conditions(&mut status, &condition);
                        status
                    }
                    None => condition,
                };
                unsynced = report_status(&pods_of(&current), &name, condition, "DisruptionTarget").await;
                killed = Some(kill);
                continue;
            }
            changed = exits.changed(), if !terminal => {
                if changed.is_err() {
                    break;
                }
                let Some(code) = *exits.borrow_and_update() else { continue };
                let restart_policy = current.spec.as_ref().and_then(|s| s.restart_policy.clone())
                    .unwrap_or_else(|| "Always".into());
                let stays = restart_policy == "Always" || (restart_policy == "OnFailure" && code != 0);
                if stays && current.metadata.deletion_timestamp.is_none() {
                    restarts += 1;
                    ctx.workloads.restart(&uid);
                    let status = running_status(&current, &ctx.node_ip, &pod_ip, Utc::now(), restarts);
                    unsynced = report_status(&pods_of(&current), &name, status, "the restart").await;
                    continue;
                }
                terminal = finish(&ctx, &current, &name, &pod_ip, started, restarts, code, killed.as_ref()).await;
                continue;
            }
            _ = sleep_until_opt(sleep_until), if !terminal && sleep_until.is_some() => {
                let now = Instant::now();
                if self_exit.is_some_and(|t| t <= now) {
                    self_exit = None;
                    ctx.workloads.exit(&uid, 0);
                    continue;
                }
                if kill_deadline.is_some_and(|t| t <= now) {
                    // Grace period over: SIGKILL.
                    terminal = finish(&ctx, &current, &name, &pod_ip, started, restarts, 137, killed.as_ref()).await;
                }
                continue;
            }
        }
    }
    ctx.workloads.forget(&uid);
}

/// Sends a status patch; on failure returns it with the instant of its next attempt. A pod
/// that is gone needs no report.
async fn report_status(
    api: &Api<Pod>,
    name: &str,
    status: serde_json::Value,
    what: &str,
) -> Option<(serde_json::Value, Instant)> {
    match api
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Strategic(status.clone()),
        )
        .await
    {
        Ok(_) => None,
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(e) => {
            tracing::info!(pod = name, error = %e, "could not report {what}; the status sync sends it again");
            Some((status, Instant::now() + STATUS_RESYNC))
        }
    }
}

/// Adds the conditions of `extra` to `status` (both `{"status": {...}}` patches).
fn merge_conditions(status: &mut serde_json::Value, extra: &serde_json::Value) {
    let add = extra["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let Some(conditions) = status["status"]
        .as_object_mut()
        .map(|s| s.entry("conditions").or_insert_with(|| json!([])))
        .and_then(|c| c.as_array_mut())
    else {
        return;
    };
    for c in add {
        conditions.retain(|old| old["type"] != c["type"]);
        conditions.push(c);
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

/// Reports the containers ended and the pod terminal. Returns whether that is now so. A pod
/// kubelet killed on its own ends `Failed` with the kill's reason and message, whatever its
/// containers' exit codes (the status function graceful node shutdown passes).
#[allow(clippy::too_many_arguments)]
async fn finish(
    ctx: &PodCtx,
    pod: &Pod,
    name: &str,
    pod_ip: &str,
    started: DateTime<Utc>,
    restarts: i32,
    code: ExitCode,
    killed: Option<&LocalKill>,
) -> bool {
    let api = Api::<Pod>::namespaced(
        ctx.client.clone(),
        pod.metadata.namespace.as_deref().unwrap_or("default"),
    );
    let mut status = terminated_status(pod, &ctx.node_ip, pod_ip, started, restarts, code);
    if let Some(kill) = killed {
        status["status"]["phase"] = json!("Failed");
        status["status"]["reason"] = json!(kill.reason);
        status["status"]["message"] = json!(kill.message);
    }
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(status))
        .await
    {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 404 => true,
        Err(e) => {
            tracing::warn!(pod = name, error = %e, "could not report pod terminal");
            false
        }
    }
}

async fn delete_now(api: &Api<Pod>, name: &str, uid: &str) {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
        Err(e) => tracing::warn!(pod = name, error = %e, "could not delete terminal pod"),
    }
}

/// `(name, image)` of each container.
type Containers = Vec<(String, String)>;

/// The pod's containers and init containers.
fn container_names(pod: &Pod) -> (Containers, Containers) {
    let spec = pod.spec.as_ref();
    let pairs = |cs: Option<&Vec<k8s_openapi::api::core::v1::Container>>| {
        cs.map(|cs| {
            cs.iter()
                .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
    };
    (
        pairs(spec.map(|s| &s.containers)),
        pairs(spec.and_then(|s| s.init_containers.as_ref())),
    )
}

fn container_id(pod: &Pod, name: &str) -> String {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let digest: String = format!("{uid}{name}")
        .bytes()
        .map(|b| format!("{:02x}", b))
        .collect();
    format!("containerd://{}", &digest[..digest.len().min(64)])
}

fn pod_conditions(now: &str, ready: bool, completed: bool) -> serde_json::Value {
    let (status, reason) = match (ready, completed) {
        (true, _) => ("True", None),
        (false, true) => ("False", Some("PodCompleted")),
        (false, false) => ("False", Some("ContainersNotReady")),
    };
    let cond = |t: &str, s: &str, reason: Option<&str>| {
        let mut c =
            json!({"type": t, "status": s, "lastTransitionTime": now, "lastProbeTime": null});
        if let Some(r) = reason {
            c["reason"] = json!(r);
        }
        c
    };
    json!([
        cond(
            "PodReadyToStartContainers",
            if completed { "False" } else { "True" },
            None
        ),
        cond(
            "Initialized",
            "True",
            if completed {
                Some("PodCompleted")
            } else {
                None
            }
        ),
        cond("Ready", status, reason),
        cond("ContainersReady", status, reason),
        cond("PodScheduled", "True", None),
    ])
}

fn running_status(
    pod: &Pod,
    node_ip: &str,
    pod_ip: &str,
    started: DateTime<Utc>,
    restarts: i32,
) -> serde_json::Value {
    let now = now_rfc3339();
    let started_at = started.to_rfc3339_opts(SecondsFormat::Secs, true);
    let (containers, inits) = container_names(pod);
    let statuses: Vec<_> = containers
        .iter()
        .map(|(name, image)| {
            json!({"name": name, "image": image, "imageID": format!("{image}@sha256:testbed"),
                   "containerID": container_id(pod, name), "ready": true, "started": true,
                   "restartCount": restarts, "state": {"running": {"startedAt": now}}})
        })
        .collect();
    let init_statuses: Vec<_> = inits
        .iter()
        .map(|(name, image)| {
            json!({"name": name, "image": image, "imageID": format!("{image}@sha256:testbed"),
                   "containerID": container_id(pod, name), "ready": true, "started": false,
                   "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                   "startedAt": started_at, "finishedAt": started_at}}})
        })
        .collect();
    json!({"status": {
        "phase": "Running", "hostIP": node_ip, "hostIPs": [{"ip": node_ip}],
        "podIP": pod_ip, "podIPs": [{"ip": pod_ip}], "startTime": started_at,
        "conditions": pod_conditions(&now, true, false),
        "containerStatuses": statuses, "initContainerStatuses": init_statuses,
    }})
}

fn terminated_status(
    pod: &Pod,
    node_ip: &str,
    pod_ip: &str,
    started: DateTime<Utc>,
    restarts: i32,
    code: ExitCode,
) -> serde_json::Value {
    let now = now_rfc3339();
    let started_at = started.to_rfc3339_opts(SecondsFormat::Secs, true);
    let (containers, _) = container_names(pod);
    let reason = if code == 0 { "Completed" } else { "Error" };
    let statuses: Vec<_> = containers
        .iter()
        .map(|(name, image)| {
            json!({"name": name, "image": image, "imageID": format!("{image}@sha256:testbed"),
                   "containerID": container_id(pod, name), "ready": false, "started": false,
                   "restartCount": restarts, "state": {"terminated": {"exitCode": code, "reason": reason,
                   "startedAt": started_at, "finishedAt": now, "containerID": container_id(pod, name)}}})
        })
        .collect();
    json!({"status": {
        "phase": if code == 0 { "Succeeded" } else { "Failed" },
        "hostIP": node_ip, "hostIPs": [{"ip": node_ip}],
        "podIP": pod_ip, "podIPs": [{"ip": pod_ip}], "startTime": started_at,
        "conditions": pod_conditions(&now, false, true),
        "containerStatuses": statuses,
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_count_from_one() {
        assert_eq!(node_names(3), vec!["node-1", "node-2", "node-3"]);
    }

    #[test]
    fn boot_ids_are_fresh_uuids() {
        let a = random_uuid();
        assert_eq!(a.len(), 36);
        assert_ne!(a, random_uuid());
    }

    #[test]
    fn workload_exit_before_subscribe_is_seen() {
        let w = Workloads::default();
        w.exit("uid-1", 0);
        let rx = w.subscribe("uid-1");
        assert_eq!(*rx.borrow(), Some(0));
        assert_eq!(w.exited("uid-2"), None);
    }

    #[test]
    fn a_local_kill_is_seen_however_early_and_only_ever_shortens_the_grace() {
        let w = Workloads::default();
        let kill = |secs| LocalKill {
            grace: Duration::from_secs(secs),
            reason: "Terminated".into(),
            message: "m".into(),
            condition_reason: "TerminationByKubelet".into(),
        };
        assert_eq!(w.local_kill("uid-1"), None);
        w.kill_locally("uid-1", kill(50));
        assert_eq!(w.local_kill("uid-1"), Some(kill(50)));
        w.kill_locally("uid-1", kill(80));
        assert_eq!(
            w.local_kill("uid-1").unwrap().grace,
            Duration::from_secs(50)
        );
        w.kill_locally("uid-1", kill(10));
        assert_eq!(
            w.local_kill("uid-1").unwrap().grace,
            Duration::from_secs(10)
        );
        // The pod's task subscribes later and still sees it.
        let mut rx = w.kill_sender("uid-1").subscribe();
        rx.mark_changed();
        assert!(rx.has_changed().unwrap());
    }

    #[test]
    fn deletion_grace_comes_from_the_pod() {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p",
            "deletionTimestamp": "2026-01-01T00:00:00Z", "deletionGracePeriodSeconds": 60}}))
        .unwrap();
        assert_eq!(deletion_grace(&pod), Some(Duration::from_secs(60)));
        let alive: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}})).unwrap();
        assert_eq!(deletion_grace(&alive), None);
    }
}
