//! A KubeVirt simulator against the real API server, release by release (1.5–1.8,
//! [`KubeVirtVersion`]): the VMI, VMIM, VM and KubeVirt CRDs; virt-api's pod-eviction webhook
//! (real HTTPS, registered with kube-apiserver), its mutating webhooks and its aggregated API
//! `subresources.kubevirt.io/v1`; and watch-driven stand-ins for virt-controller (VMI start,
//! VM run strategies, evacuation, migrations, v1.5's disruption budgets) and virt-handler (VMI
//! boot, migration hand-over, ACPI shutdown when the launcher pod is deleted, the node label).
//!
//! Each part names the upstream file and release it follows. Timings are scaled down and
//! configurable ([`KubeVirtOptions`]); the rules and messages are upstream's. The migration
//! limits and timeouts live in the KubeVirt CR (`kubevirt/kubevirt`), which the simulator writes
//! from the options at start and then reads, as virt-controller does.

pub mod admitter;
pub mod config;
pub mod crds;
pub mod evacuation;
pub mod handover;
pub mod heartbeat;
pub mod hotplug;
pub mod launcher;
mod lifecycle;
pub mod migration;
pub mod pdb;
pub mod spec;
pub mod transfer;
pub mod version;
mod virtapi;
pub mod vm;
pub mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use admitter::EvictionStrategy;
pub use config::{ClusterConfig, KubeVirt, MigrationConfig};
pub use crds::{
    MigrationState, StateChangeRequest, VirtualMachine, VirtualMachineInstance,
    VirtualMachineInstanceMigration, VmStatus, VmiStatus, VmimStatus,
};
pub use launcher::VmiTemplate;
pub use spec::{RunStrategy, SpecError, VmGroup, VmSpec, VmiKind};
pub use version::KubeVirtVersion;
pub use webhook::{WebhookFault, WebhookTls};

use crate::kubelet::Workloads;

#[derive(Debug, thiserror::Error)]
pub enum KubeVirtError {
    #[error("kubernetes API call failed while {action}: {source}")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("waiting failed: {0}")]
    Wait(String),
    #[error("webhook TLS setup failed: {0}")]
    Tls(String),
    #[error("webhook server I/O failed: {0}")]
    Io(#[source] std::io::Error),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(
        "the VM spec places VMs on {node:?}, which is not a node of the bed (nodes: {known}); use one of those or raise --nodes"
    )]
    UnknownNode { node: String, known: String },
}

pub(crate) fn api_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeVirtError {
    let action = action.into();
    move |source| KubeVirtError::Api { action, source }
}

/// Failure injection for migrations.
#[derive(Clone, Debug, Default)]
pub struct FailureInjection {
    /// `"namespace/vmi"` → how many of its next migrations fail (half-way through the copy).
    pub per_vmi: HashMap<String, u32>,
    /// `"namespace/vmi"` → how many of its next migrations stall (no progress, so
    /// virt-launcher aborts them after `progressTimeout`).
    pub stalls: HashMap<String, u32>,
    /// Probability (0..=1) that any migration fails.
    pub probability: f64,
}

/// What an injected fault does to one migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Injected {
    Fail,
    Stall,
}

#[derive(Clone, Debug)]
pub struct KubeVirtOptions {
    /// The release to play; see [`KubeVirtVersion`] for what differs.
    pub version: KubeVirtVersion,
    /// Time from a migration's admission to its success when no bandwidth applies:
    /// Scheduling, Scheduled, PreparingTarget and TargetReady take a tenth each, the copy the
    /// rest. With a bandwidth the copy takes memory ÷ bandwidth instead.
    pub migration_duration: Duration,
    /// The bed's network per migration, bytes/s (`--migration-bandwidth`); `None`: the copy
    /// takes the fixed `migration_duration`.
    pub migration_bandwidth: Option<u64>,
    /// Time a VMI takes to shut down (ACPI) after its launcher pod is deleted or evicted;
    /// capped by the pod's grace period.
    pub shutdown_duration: Duration,
    /// Time a VMI takes from Scheduled (labelled with its node) to Running with its
    /// `LiveMigratable` condition, unless the VMI says otherwise
    /// ([`launcher::BOOT_SECONDS_ANNOTATION`]).
    pub boot_duration: Duration,
    /// How long the source virt-launcher pod keeps running after the hand-over.
    pub source_exit_delay: Duration,
    /// Pause after the first hand-over write: v1.5 between `completed` and the hand-over,
    /// v1.6+ between the hand-over and `completed`.
    pub handover_gap: Duration,
    /// KubeVirt CR `migrations.parallelMigrationsPerCluster` (upstream default 5).
    pub parallel_migrations_per_cluster: usize,
    /// KubeVirt CR `migrations.parallelOutboundMigrationsPerNode` (upstream default 2).
    pub parallel_outbound_migrations_per_node: usize,
    /// KubeVirt CR `migrations.bandwidthPerMigration`, bytes/s (upstream "0Mi": no limit).
    pub bandwidth_per_migration: Option<u64>,
    /// KubeVirt CR `migrations.completionTimeoutPerGiB`, seconds (upstream 150).
    pub completion_timeout_per_gib: u64,
    /// KubeVirt CR `migrations.progressTimeout`, seconds (upstream 150).
    pub progress_timeout: u64,
    /// KubeVirt CR `developerConfiguration.featureGates` (e.g. `MigrationPriorityQueue`).
    pub feature_gates: Vec<String>,
    /// First backoff after a failed evacuation migration, doubling per further failure
    /// (upstream 20 s, `pkg/virt-controller/watch/migration/migration.go`).
    pub migration_backoff: Duration,
    /// KubeVirt CR `migrations.unschedulablePendingTimeoutSeconds`: how long a target pod may
    /// find no schedulable node before the migration fails (upstream 5 min).
    pub unschedulable_timeout: Duration,
    pub failures: FailureInjection,
    /// The KubeVirt CR's `spec.configuration.evictionStrategy`; upstream leaves it unset, which
    /// counts as None (`pkg/virt-config/configuration.go`).
    pub cluster_eviction_strategy: Option<EvictionStrategy>,
    /// Serving certificate for virt-api (webhooks and aggregated API); a fresh CA is made when
    /// absent.
    pub webhook_tls: Option<WebhookTls>,
}

impl Default for KubeVirtOptions {
    fn default() -> Self {
        Self {
            version: KubeVirtVersion::default(),
            migration_duration: Duration::from_secs(2),
            migration_bandwidth: None,
            shutdown_duration: Duration::from_secs(2),
            boot_duration: Duration::from_millis(500),
            source_exit_delay: Duration::from_secs(1),
            handover_gap: Duration::from_millis(250),
            parallel_migrations_per_cluster: 5,
            parallel_outbound_migrations_per_node: 2,
            bandwidth_per_migration: None,
            completion_timeout_per_gib: 150,
            progress_timeout: 150,
            feature_gates: Vec::new(),
            migration_backoff: Duration::from_secs(20),
            unschedulable_timeout: Duration::from_secs(300),
            failures: FailureInjection::default(),
            cluster_eviction_strategy: None,
            webhook_tls: None,
        }
    }
}

impl KubeVirtOptions {
    /// The KubeVirt CR's configuration these options describe.
    pub fn cluster_config(&self) -> ClusterConfig {
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        ClusterConfig {
            migrations: MigrationConfig {
                parallel_migrations_per_cluster: clamp(self.parallel_migrations_per_cluster),
                parallel_outbound_migrations_per_node: clamp(
                    self.parallel_outbound_migrations_per_node,
                ),
                bandwidth_per_migration: self.bandwidth_per_migration,
                completion_timeout_per_gib: self.completion_timeout_per_gib,
                progress_timeout: self.progress_timeout,
                unschedulable_pending_timeout: self.unschedulable_timeout,
                ..MigrationConfig::default()
            },
            feature_gates: self.feature_gates.clone(),
            eviction_strategy: self.cluster_eviction_strategy,
        }
    }
}

/// `parallelMigrationsPerCluster` and `parallelOutboundMigrationsPerNode`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub cluster: usize,
    pub per_node: usize,
}

/// Admission of a pending migration (`handleTargetPodCreation`): room in the cluster and on its
/// source node; with the priority queue, no waiting migration of higher priority that could
/// take the room first (upstream re-queues pending migrations highest priority first when one
/// ends). A refused migration is recorded as waiting.
pub(crate) fn admit(
    slots: &mut Slots,
    uid: &str,
    source: &str,
    priority: i32,
    pq: bool,
    limits: Limits,
) -> bool {
    if slots.running.contains_key(uid) {
        return true;
    }
    let room = |slots: &Slots, node: &str| {
        let outbound = slots.running.values().filter(|n| *n == node).count();
        slots.running.len() < limits.cluster && outbound < limits.per_node
    };
    let outranked = pq
        && slots
            .waiting
            .iter()
            .any(|(other, (node, p))| other != uid && *p > priority && room(slots, node));
    if !room(slots, source) || outranked {
        slots
            .waiting
            .insert(uid.to_owned(), (source.to_owned(), priority));
        return false;
    }
    slots.waiting.remove(uid);
    slots.running.insert(uid.to_owned(), source.to_owned());
    true
}

/// Running and waiting migrations, for admission within the parallel limits.
#[derive(Default)]
pub(crate) struct Slots {
    /// uid → source node.
    running: HashMap<String, String>,
    /// uid → (source node, priority).
    waiting: HashMap<String, (String, i32)>,
}

/// Shared state of the simulated controllers: informer-like caches fed by watches, and a
/// change counter every controller waits on.
pub(crate) struct Ctx {
    pub client: Client,
    pub opts: KubeVirtOptions,
    pub vmis: Store<VirtualMachineInstance>,
    pub vmims: Store<VirtualMachineInstanceMigration>,
    pub vms: Store<VirtualMachine>,
    pub kubevirts: Store<KubeVirt>,
    pub pods: Store<Pod>,
    pub pdbs: Store<PodDisruptionBudget>,
    pub nodes: Store<Node>,
    pub changes: watch::Receiver<u64>,
    pub workloads: Workloads,
    /// Shared with [`KubeVirtFaults`], so knobs turned from outside reach the controllers.
    pub failures: Arc<Mutex<FailureInjection>>,
    pub slots: Mutex<Slots>,
    pub slot_freed: Notify,
    /// Creations made and not yet seen in a cache ("expectations" upstream), by key.
    pub expected: Mutex<HashMap<String, Instant>>,
}

impl Ctx {
    pub fn vmi(&self, namespace: &str, name: &str) -> Option<Arc<VirtualMachineInstance>> {
        self.vmis.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&ObjectRef::new(name).within(namespace))
    }

    /// The KubeVirt CR's configuration, as the cache has it (the options' until it arrives).
    pub fn cluster_config(&self) -> ClusterConfig {
        self.kubevirts
            .get(&ObjectRef::new(config::NAME).within(config::NAMESPACE))
            .map(|kv| ClusterConfig::from_spec(&serde_json::to_value(&kv.spec).unwrap_or_default()))
            .unwrap_or_else(|| self.opts.cluster_config())
    }

    /// Pods created for this VMI (by `kubevirt.io/created-by`): launcher pods.
    pub fn pods_of(&self, vmi: &VirtualMachineInstance) -> Vec<Arc<Pod>> {
        let uid = vmi.metadata.uid.as_deref().unwrap_or_default();
        self.pods
            .state()
            .into_iter()
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(launcher::CREATED_BY_LABEL))
                    .is_some_and(|v| v == uid)
            })
            .collect()
    }

    /// `VMIActivePodsCount`: launcher pods of the VMI not yet terminal.
    pub fn active_pods(&self, vmi: &VirtualMachineInstance) -> usize {
        self.pods_of(vmi)
            .iter()
            .filter(|p| {
                !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded") | Some("Failed")
                )
            })
            .count()
    }

    /// Nodes a VMI could be placed on: Ready, schedulable, without NoSchedule/NoExecute taints,
    /// carrying every label of `selector`, not `exclude`; those with fewer `PreferNoSchedule`
    /// taints first, then the least loaded (by VMIs).
    ///
    /// kube-scheduler's TaintToleration plugin scores a node by its `PreferNoSchedule` taints
    /// the pod does not tolerate (`pkg/scheduler/framework/plugins/tainttoleration/
    /// taint_toleration.go`, v1.36: `countIntolerableTaintsPreferNoSchedule`, normalised so the
    /// fewest score 100) with weight 3 (`pkg/scheduler/apis/config/v1/default_plugins.go`),
    /// against weight 1 for each resource score: between otherwise similar nodes the taint
    /// decides, which is what ordering by it first models. Launcher pods tolerate no such taint
    /// (a VMI's own `tolerations` are not modelled).
    pub fn target_nodes(&self, exclude: &str, selector: &BTreeMap<String, String>) -> Vec<String> {
        let mut candidates: Vec<((usize, usize), String)> = self
            .nodes
            .state()
            .into_iter()
            .filter(|n| {
                let name = n.metadata.name.as_deref().unwrap_or_default();
                let spec = n.spec.clone().unwrap_or_default();
                let ready = n
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let tainted = spec
                    .taints
                    .unwrap_or_default()
                    .iter()
                    .any(|t| t.effect == "NoSchedule" || t.effect == "NoExecute");
                let labels = n.metadata.labels.clone().unwrap_or_default();
                let fits = selector.iter().all(|(k, v)| labels.get(k) == Some(v));
                name != exclude && ready && !spec.unschedulable.unwrap_or(false) && !tainted && fits
            })
            .map(|n| {
                let name = n.metadata.name.clone().unwrap_or_default();
                let preferred_not = n
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .map_or(0, |ts| {
                        ts.iter().filter(|t| t.effect == "PreferNoSchedule").count()
                    });
                let load = self
                    .vmis
                    .state()
                    .iter()
                    .filter(|v| !v.is_final() && v.node_name() == Some(name.as_str()))
                    .count();
                ((preferred_not, load), name)
            })
            .collect();
        candidates.sort();
        candidates.into_iter().map(|(_, n)| n).collect()
    }

    /// Admission of a pending migration within the KubeVirt CR's limits ([`admit`]).
    pub fn admit_migration(&self, uid: &str, source: &str, priority: i32, pq: bool) -> bool {
        let config = self.cluster_config();
        let limits = Limits {
            cluster: config.migrations.parallel_migrations_per_cluster as usize,
            per_node: config.migrations.parallel_outbound_migrations_per_node as usize,
        };
        admit(
            &mut self.slots.lock().expect("slots lock"),
            uid,
            source,
            priority,
            pq,
            limits,
        )
    }

    pub fn release_migration_slot(&self, uid: &str) {
        let mut slots = self.slots.lock().expect("slots lock");
        let freed = slots.running.remove(uid).is_some();
        slots.waiting.remove(uid);
        drop(slots);
        if freed {
            self.slot_freed.notify_waiters();
        }
    }

    pub(crate) fn injected_failure(&self, namespace: &str, vmi: &str) -> Option<Injected> {
        let key = format!("{namespace}/{vmi}");
        let mut f = self.failures.lock().expect("failures lock");
        if let Some(n) = f.stalls.get_mut(&key)
            && *n > 0
        {
            *n -= 1;
            return Some(Injected::Stall);
        }
        if let Some(n) = f.per_vmi.get_mut(&key)
            && *n > 0
        {
            *n -= 1;
            return Some(Injected::Fail);
        }
        (f.probability > 0.0 && rand::random::<f64>() < f.probability).then_some(Injected::Fail)
    }

    fn expect(&self, key: String) {
        self.expected
            .lock()
            .expect("expectations lock")
            .insert(key, Instant::now());
    }

    /// A creation for `key` was made less than 10 s ago and may not be in the cache yet.
    fn pending(&self, key: &str) -> bool {
        let mut e = self.expected.lock().expect("expectations lock");
        e.retain(|_, at| at.elapsed() < Duration::from_secs(10));
        e.contains_key(key)
    }

    pub fn expect_pdb(&self, vmi_uid: &str) {
        self.expect(format!("pdb/{vmi_uid}"));
    }
    pub fn pdb_pending(&self, vmi_uid: &str) -> bool {
        self.pending(&format!("pdb/{vmi_uid}"))
    }
    pub fn expect_attachment(&self, launcher_uid: &str) {
        self.expect(format!("hp/{launcher_uid}"));
    }
    pub fn attachment_pending(&self, launcher_uid: &str) -> bool {
        self.pending(&format!("hp/{launcher_uid}"))
    }
    pub fn expect_vm_start(&self, key: &str) {
        self.expect(format!("vm/{key}"));
    }
    pub fn vm_start_pending(&self, key: &str) -> bool {
        // Seen once a VMI of that name exists (it may be final again by then).
        let (ns, name) = key.split_once('/').unwrap_or_default();
        if self.vmi(ns, name).is_some() {
            self.expected
                .lock()
                .expect("expectations lock")
                .remove(&format!("vm/{key}"));
            return false;
        }
        self.pending(&format!("vm/{key}"))
    }

    /// Waits for any watched object to change, at most `timeout`.
    pub async fn changed(&self, timeout: Duration) {
        let mut rx = self.changes.clone();
        rx.borrow_and_update();
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
    }
}

/// The running simulator. Dropping it stops every task and server (the webhook
/// configurations stay registered: with failurePolicy Fail, evictions of virt-launcher pods
/// then fail, as they do when virt-api is down); [`KubeVirtSim::shutdown`] unregisters them.
pub struct KubeVirtSim {
    client: Client,
    ctx: Arc<Ctx>,
    webhook_port: u16,
    webhook_requests: Arc<std::sync::atomic::AtomicU64>,
    faults: KubeVirtFaults,
    virt_api_port: u16,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for KubeVirtSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeVirtSim")
            .field("version", &self.ctx.opts.version)
            .field("webhook_port", &self.webhook_port)
            .field("virt_api_port", &self.virt_api_port)
            .finish_non_exhaustive()
    }
}

impl Drop for KubeVirtSim {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    bump: watch::Sender<u64>,
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let task = tokio::spawn(async move {
        let stream = watcher(api, config).default_backoff().reflect(writer);
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::debug!(error = %e, "kubevirt sim watch error; retrying");
            }
            bump.send_modify(|n| *n = n.wrapping_add(1));
        }
    });
    (reader, task)
}

/// Writes the KubeVirt CR (server-side apply) and marks it Deployed.
async fn apply_kubevirt_cr(client: &Client, config: &ClusterConfig) -> Result<(), KubeVirtError> {
    let api = Api::<KubeVirt>::namespaced(client.clone(), config::NAMESPACE);
    let params = PatchParams::apply("testbed-kubevirt").force();
    api.patch(
        config::NAME,
        &params,
        &Patch::Apply(config::manifest(config)),
    )
    .await
    .map_err(api_err("writing the KubeVirt CR"))?;
    api.patch_status(
        config::NAME,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Deployed"}})),
    )
    .await
    .map_err(api_err("marking the KubeVirt CR Deployed"))?;
    Ok(())
}

/// The simulator's fault knobs: the eviction webhook and migration failure injection. Clones
/// share them with the simulator; once it is gone they change nothing.
#[derive(Clone)]
pub struct KubeVirtFaults {
    webhook: Arc<watch::Sender<WebhookFault>>,
    webhook_port: u16,
    failures: Arc<Mutex<FailureInjection>>,
    vmis: Store<VirtualMachineInstance>,
}

impl std::fmt::Debug for KubeVirtFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeVirtFaults")
            .field("webhook", &self.webhook_fault())
            .field("failures", &self.failures())
            .finish()
    }
}

impl KubeVirtFaults {
    /// Takes the eviction webhook down (its port refuses connections), slows it, or restores
    /// it. Takes effect for new connections and requests at once; `Down` also closes the
    /// API server's kept-alive connections.
    pub fn set_webhook_fault(&self, fault: WebhookFault) {
        self.webhook.send_replace(fault);
    }

    /// [`set_webhook_fault`](Self::set_webhook_fault), then waits (at most 10 s) until the
    /// webhook's port refuses connections (`Down`) or takes them again (otherwise), so an
    /// eviction made after it returns meets the new state.
    pub async fn apply_webhook_fault(&self, fault: WebhookFault) -> Result<(), KubeVirtError> {
        self.set_webhook_fault(fault);
        let want_open = fault != WebhookFault::Down;
        let settled = async {
            loop {
                let open = tokio::net::TcpStream::connect(("127.0.0.1", self.webhook_port))
                    .await
                    .is_ok();
                if open == want_open {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), settled)
            .await
            .map_err(|_| {
                KubeVirtError::Timeout(format!(
                    "the eviction webhook's port {} to {}",
                    self.webhook_port,
                    if want_open { "listen again" } else { "close" }
                ))
            })
    }

    pub fn webhook_fault(&self) -> WebhookFault {
        *self.webhook.borrow()
    }

    /// The next `count` migrations of `namespace/vmi` fail half-way through the copy.
    pub fn fail_next_migrations(&self, namespace: &str, vmi: &str, count: u32) {
        let mut f = self.failures.lock().expect("failures lock");
        *f.per_vmi.entry(format!("{namespace}/{vmi}")).or_default() += count;
    }

    /// The next `count` migrations of `namespace/vmi` make no progress, so virt-launcher
    /// aborts them after the CR's `progressTimeout`.
    pub fn stall_next_migrations(&self, namespace: &str, vmi: &str, count: u32) {
        let mut f = self.failures.lock().expect("failures lock");
        *f.stalls.entry(format!("{namespace}/{vmi}")).or_default() += count;
    }

    /// The probability (clamped to 0..=1) that any migration fails half-way through the copy.
    pub fn set_failure_probability(&self, probability: f64) {
        self.failures.lock().expect("failures lock").probability = probability.clamp(0.0, 1.0);
    }

    /// The injections not yet used up.
    pub fn failures(&self) -> FailureInjection {
        self.failures.lock().expect("failures lock").clone()
    }

    /// `namespace/name` of every VMI the simulator knows, sorted.
    pub fn vmis(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .vmis
            .state()
            .iter()
            .map(|v| {
                format!(
                    "{}/{}",
                    v.metadata.namespace.as_deref().unwrap_or_default(),
                    v.metadata.name.as_deref().unwrap_or_default()
                )
            })
            .collect();
        names.sort();
        names
    }
}

impl KubeVirtSim {
    /// Installs the CRDs and the KubeVirt CR, starts and registers virt-api (eviction webhook,
    /// mutators, aggregated API; returning once kube-apiserver uses them), and starts the
    /// controllers. `workloads` is the kubelet sim's handle, through which launcher pods'
    /// workloads end.
    pub async fn spawn(
        client: Client,
        workloads: Workloads,
        opts: KubeVirtOptions,
    ) -> Result<Self, KubeVirtError> {
        crds::install_crds(&client).await?;
        let tls = match &opts.webhook_tls {
            Some(tls) => tls.clone(),
            None => WebhookTls::generate()?,
        };
        let mut tasks = Vec::new();

        let (bump, changes) = watch::channel(0u64);
        let (vmis, t1) = reflect(
            Api::all(client.clone()),
            watcher::Config::default(),
            bump.clone(),
        );
        let (vmims, t2) = reflect(
            Api::all(client.clone()),
            watcher::Config::default(),
            bump.clone(),
        );
        let (pods, t3) = reflect(
            Api::all(client.clone()),
            watcher::Config::default().labels("kubevirt.io in (virt-launcher,hotplug-disk)"),
            bump.clone(),
        );
        let (nodes, t4) = reflect(
            Api::all(client.clone()),
            watcher::Config::default(),
            bump.clone(),
        );
        let (vms, t5) = reflect(
            Api::all(client.clone()),
            watcher::Config::default(),
            bump.clone(),
        );
        let (kubevirts, t6) = reflect(
            Api::all(client.clone()),
            watcher::Config::default(),
            bump.clone(),
        );
        let (pdbs, t7) = reflect(Api::all(client.clone()), watcher::Config::default(), bump);
        tasks.extend([t1, t2, t3, t4, t5, t6, t7]);

        // The CR's namespace; virt-api's Service lives there too.
        virtapi_namespace(&client).await?;
        apply_kubevirt_cr(&client, &opts.cluster_config()).await?;

        let ready = async {
            let _ = vmis.wait_until_ready().await;
            let _ = vmims.wait_until_ready().await;
            let _ = pods.wait_until_ready().await;
            let _ = nodes.wait_until_ready().await;
            let _ = vms.wait_until_ready().await;
            let _ = kubevirts.wait_until_ready().await;
            let _ = pdbs.wait_until_ready().await;
        };
        tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .map_err(|_| KubeVirtError::Timeout("KubeVirt sim caches to sync".into()))?;

        let ctx = Arc::new(Ctx {
            client: client.clone(),
            failures: Arc::new(Mutex::new(opts.failures.clone())),
            opts,
            vmis,
            vmims,
            vms,
            kubevirts,
            pods,
            pdbs,
            nodes,
            changes,
            workloads,
            slots: Mutex::new(Slots::default()),
            slot_freed: Notify::new(),
            expected: Mutex::new(HashMap::new()),
        });
        let version = ctx.opts.version;
        let config_source: Arc<dyn Fn() -> ClusterConfig + Send + Sync> = {
            let ctx = ctx.clone();
            Arc::new(move || ctx.cluster_config())
        };
        let (fault_tx, fault_rx) = watch::channel(WebhookFault::None);
        let hook = webhook::serve(
            client.clone(),
            &tls,
            config_source.clone(),
            version,
            fault_rx,
        )
        .await?;
        tasks.push(hook.task);
        let api = virtapi::serve(client.clone(), &tls, version, config_source).await?;
        tasks.push(api.task);

        tasks.push(tokio::spawn(lifecycle::run(ctx.clone())));
        tasks.push(tokio::spawn(evacuation::run(ctx.clone())));
        tasks.push(tokio::spawn(migration::run(ctx.clone())));
        tasks.push(tokio::spawn(vm::run(ctx.clone())));
        tasks.push(tokio::spawn(heartbeat::run(ctx.clone())));
        if version.per_vmi_pdbs() {
            tasks.push(tokio::spawn(pdb::run(ctx.clone())));
        }

        let faults = KubeVirtFaults {
            webhook: Arc::new(fault_tx),
            webhook_port: hook.port,
            failures: ctx.failures.clone(),
            vmis: ctx.vmis.clone(),
        };
        let sim = Self {
            client,
            ctx,
            webhook_port: hook.port,
            webhook_requests: hook.requests,
            faults,
            virt_api_port: api.port,
            tasks,
        };
        virtapi::register(&sim.client, sim.virt_api_port, &tls).await?;
        webhook::register(&sim.client, sim.webhook_port, &tls.ca_bundle_pem, version).await?;
        webhook::wait_effective(&sim.client, &sim.webhook_requests).await?;
        Ok(sim)
    }

    /// Unregisters virt-api's webhooks and APIService, then stops everything (as uninstalling
    /// virt-operator would), so evictions and creations no longer need the sim once it is gone.
    pub async fn shutdown(self) -> Result<(), KubeVirtError> {
        use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
        let deleted = Api::<ValidatingWebhookConfiguration>::all(self.client.clone())
            .delete(webhook::CONFIGURATION_NAME, &Default::default())
            .await;
        match deleted {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(api_err("unregistering the eviction webhook")(e)),
        }
        virtapi::unregister(&self.client).await
    }

    pub fn version(&self) -> KubeVirtVersion {
        self.ctx.opts.version
    }

    pub fn options(&self) -> &KubeVirtOptions {
        &self.ctx.opts
    }

    pub fn webhook_url(&self) -> String {
        format!("https://127.0.0.1:{}{}", self.webhook_port, webhook::PATH)
    }

    /// Admission requests the eviction webhook has served (including the readiness probe).
    pub fn webhook_requests(&self) -> u64 {
        self.webhook_requests.load(Ordering::SeqCst)
    }

    /// A cloneable handle on the fault knobs below, for whoever must turn them without owning
    /// the simulator (the bed's ctl server).
    pub fn faults(&self) -> KubeVirtFaults {
        self.faults.clone()
    }

    /// See [`KubeVirtFaults::set_webhook_fault`].
    pub fn set_webhook_fault(&self, fault: WebhookFault) {
        self.faults.set_webhook_fault(fault);
    }

    pub fn webhook_fault(&self) -> WebhookFault {
        self.faults.webhook_fault()
    }

    /// See [`KubeVirtFaults::fail_next_migrations`].
    pub fn fail_next_migrations(&self, namespace: &str, vmi: &str, count: u32) {
        self.faults.fail_next_migrations(namespace, vmi, count);
    }

    /// See [`KubeVirtFaults::stall_next_migrations`].
    pub fn stall_next_migrations(&self, namespace: &str, vmi: &str, count: u32) {
        self.faults.stall_next_migrations(namespace, vmi, count);
    }

    /// See [`KubeVirtFaults::set_failure_probability`].
    pub fn set_failure_probability(&self, probability: f64) {
        self.faults.set_failure_probability(probability);
    }

    /// The KubeVirt CR's configuration as the simulator reads it now.
    pub fn cluster_config(&self) -> ClusterConfig {
        self.ctx.cluster_config()
    }

    /// Rewrites the KubeVirt CR's configuration, as an administrator editing it would, and
    /// waits until the simulator reads the new one.
    pub async fn set_cluster_config(&self, config: &ClusterConfig) -> Result<(), KubeVirtError> {
        apply_kubevirt_cr(&self.client, config).await?;
        let seen = async {
            while self.ctx.cluster_config() != *config {
                self.ctx.changed(Duration::from_millis(200)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), seen)
            .await
            .map_err(|_| KubeVirtError::Timeout("the KubeVirt CR change to be seen".into()))
    }

    /// Starts a migration of `namespace/vmi` to `target_node` now, as a user would: a
    /// `VirtualMachineInstanceMigration` named `testbed-migrate-*` with
    /// `spec.addedNodeSelector: {kubernetes.io/hostname: target_node}` (v1.6+; v1.5 has no such
    /// field, so the bed's [`migration::TARGET_NODE_ANNOTATION`] carries the node there).
    /// Deleting the returned object cancels it ([`KubeVirtSim::cancel_migration`]).
    pub async fn migrate(
        &self,
        namespace: &str,
        vmi: &str,
        target_node: &str,
    ) -> Result<VirtualMachineInstanceMigration, KubeVirtError> {
        let mut m = VirtualMachineInstanceMigration::new(
            "",
            crds::VirtualMachineInstanceMigrationSpec {
                vmi_name: vmi.to_owned(),
                rest: BTreeMap::new(),
            },
        );
        m.metadata.name = None;
        m.metadata.generate_name = Some("testbed-migrate-".into());
        m.metadata.namespace = Some(namespace.to_owned());
        if self.version().added_node_selector() {
            m.spec.rest.insert(
                "addedNodeSelector".into(),
                json!({"kubernetes.io/hostname": target_node}),
            );
        } else {
            m.metadata.annotations = Some(BTreeMap::from([(
                migration::TARGET_NODE_ANNOTATION.to_owned(),
                target_node.to_owned(),
            )]));
        }
        Api::<VirtualMachineInstanceMigration>::namespaced(self.client.clone(), namespace)
            .create(&PostParams::default(), &m)
            .await
            .map_err(api_err(format!(
                "creating a migration of {namespace}/{vmi}"
            )))
    }

    /// Deletes a migration, which cancels it (upstream: before the hand-off it fails at once;
    /// after it the source aborts; the VMI stays on its source either way).
    pub async fn cancel_migration(&self, namespace: &str, name: &str) -> Result<(), KubeVirtError> {
        match Api::<VirtualMachineInstanceMigration>::namespaced(self.client.clone(), namespace)
            .delete(name, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(api_err(format!("deleting migration {namespace}/{name}"))(e)),
        }
    }

    /// `PUT …/{virtualmachines|virtualmachineinstances}/{name}/{action}` through kube-apiserver's
    /// aggregator (`subresources.kubevirt.io/v1`), with an optional JSON body. Returns the HTTP
    /// status (e.g. 202 for an accepted start, 404 where the release has no such subresource)
    /// and the body. Actions: `start`, `stop`, `restart` (VMs), `evacuate/cancel` (both,
    /// v1.7+).
    pub async fn subresource(
        &self,
        namespace: &str,
        resource: &str,
        name: &str,
        action: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, String), KubeVirtError> {
        subresource(&self.client, namespace, resource, name, action, body).await
    }

    /// Creates the VMIs (and VMs) of `spec`, each group on its node or `default_node`, and
    /// waits until they run (groups with a `boot=` option: until they are scheduled and still
    /// booting; VMs that do not start on creation: not at all). Returns the VMIs waited for.
    pub async fn create_vmis(
        &self,
        namespace: &str,
        default_node: &str,
        spec: &VmSpec,
    ) -> Result<Vec<VirtualMachineInstance>, KubeVirtError> {
        match create_vmis(&self.client, namespace, default_node, spec).await {
            // What the simulator's own caches held, next to the API server's record: a start
            // that stalls is either a step the simulator did not take or one it did not see.
            Err(KubeVirtError::Timeout(what)) => Err(KubeVirtError::Timeout(format!(
                "{what}; the simulator's cache: {}",
                self.cached_not_running(namespace)
            ))),
            other => other,
        }
    }

    fn cached_not_running(&self, namespace: &str) -> String {
        let ctx = &self.ctx;
        let stalled: Vec<String> = ctx
            .vmis
            .state()
            .iter()
            .filter(|v| v.metadata.namespace.as_deref() == Some(namespace))
            .filter(|v| v.phase() != "Running")
            .map(|v| {
                let transitions = v
                    .status
                    .as_ref()
                    .and_then(|s| s.rest.get("phaseTransitionTimestamps"))
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                let pods: Vec<String> = ctx
                    .pods_of(v)
                    .iter()
                    .map(|p| {
                        format!(
                            "{} {}",
                            p.metadata.name.as_deref().unwrap_or_default(),
                            lifecycle::pod_phase(p)
                        )
                    })
                    .collect();
                format!(
                    "{} phase {:?} transitions {transitions} pods [{}]",
                    v.metadata.name.as_deref().unwrap_or_default(),
                    v.phase(),
                    pods.join(", ")
                )
            })
            .collect();
        if stalled.is_empty() {
            "every VMI Running".into()
        } else {
            stalled.join("; ")
        }
    }
}

async fn virtapi_namespace(client: &Client) -> Result<(), KubeVirtError> {
    use k8s_openapi::api::core::v1::Namespace;
    let api = Api::<Namespace>::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": config::NAMESPACE}}))
        .expect("namespace literal");
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(api_err("creating the kubevirt namespace")(e)),
    }
}

/// See [`KubeVirtSim::subresource`].
pub async fn subresource(
    client: &Client,
    namespace: &str,
    resource: &str,
    name: &str,
    action: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, String), KubeVirtError> {
    let path = format!(
        "/apis/{}/v1/namespaces/{namespace}/{resource}/{name}/{action}",
        virtapi::GROUP
    );
    let bytes = body
        .map(|b| serde_json::to_vec(&b).expect("json"))
        .unwrap_or_default();
    let request = http::Request::put(&path)
        .header("content-type", "application/json")
        .body(bytes)
        .map_err(|e| KubeVirtError::Wait(format!("building PUT {path}: {e}")))?;
    let response = client
        .send(request.map(kube::client::Body::from))
        .await
        .map_err(api_err(format!("PUT {path}")))?;
    let code = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .map_err(|e| KubeVirtError::Wait(format!("reading the answer to PUT {path}: {e}")))?
        .to_bytes();
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// Creates the VMIs and VMs of `spec` (see [`KubeVirtSim::create_vmis`]). Needs a running
/// [`KubeVirtSim`] and kubelet sim.
pub async fn create_vmis(
    client: &Client,
    namespace: &str,
    default_node: &str,
    spec: &VmSpec,
) -> Result<Vec<VirtualMachineInstance>, KubeVirtError> {
    let vmis = Api::<VirtualMachineInstance>::namespaced(client.clone(), namespace);
    let vms = Api::<VirtualMachine>::namespaced(client.clone(), namespace);
    let nodes: Vec<String> = Api::<Node>::all(client.clone())
        .list(&Default::default())
        .await
        .map_err(api_err("listing nodes"))?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    for wanted in spec
        .groups
        .iter()
        .map(|g| g.node.as_deref().unwrap_or(default_node))
    {
        if !nodes.iter().any(|n| n == wanted) {
            return Err(KubeVirtError::UnknownNode {
                node: wanted.to_owned(),
                known: nodes.join(", "),
            });
        }
    }
    let mut waits: Vec<(String, bool)> = Vec::new();
    for instance in spec.instances() {
        let template = VmiTemplate::of_group(instance.group, default_node);
        let name = &instance.name;
        match instance.group.vm {
            Some(strategy) => {
                vms.create(
                    &PostParams::default(),
                    &template.vm(name, namespace, strategy),
                )
                .await
                .map_err(api_err(format!("creating VM {namespace}/{name}")))?;
                if strategy.starts_on_creation() {
                    waits.push((name.clone(), instance.group.boot.is_some()));
                }
            }
            None => {
                vmis.create(&PostParams::default(), &template.vmi(name, namespace))
                    .await
                    .map_err(api_err(format!("creating VMI {namespace}/{name}")))?;
                waits.push((name.clone(), instance.group.boot.is_some()));
            }
        }
    }
    let mut out = Vec::new();
    for (name, booting) in waits {
        let vmi = tokio::time::timeout(
            Duration::from_secs(60),
            kube::runtime::wait::await_condition(
                vmis.clone(),
                &name,
                move |v: Option<&VirtualMachineInstance>| {
                    v.is_some_and(|v| {
                        v.phase() == "Running" || (booting && v.phase() == "Scheduled")
                    })
                },
            ),
        )
        .await;
        let Ok(vmi) = vmi else {
            let seen = where_it_stands(client, namespace, &name).await;
            return Err(KubeVirtError::Timeout(format!(
                "VMI {namespace}/{name} to run ({seen})"
            )));
        };
        let vmi = vmi.map_err(|e| KubeVirtError::Wait(e.to_string()))?;
        out.extend(vmi);
    }
    Ok(out)
}

/// The API server's record of a VMI that did not start and of its pods, for the error: which
/// step of the start (pod created, pod Running, VMI Scheduled) did not happen.
async fn where_it_stands(client: &Client, namespace: &str, name: &str) -> String {
    let vmi = Api::<VirtualMachineInstance>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await;
    let (phase, uid) = match &vmi {
        Ok(Some(v)) => {
            let status = v.status.as_ref();
            let transitions = status
                .and_then(|s| s.rest.get("phaseTransitionTimestamps"))
                .map(|t| t.to_string())
                .unwrap_or_default();
            (
                format!(
                    "phase {:?} on {:?}, transitions {transitions}",
                    v.phase(),
                    v.node_name()
                ),
                v.metadata.uid.clone().unwrap_or_default(),
            )
        }
        Ok(None) => return "the VMI is gone".into(),
        Err(e) => return format!("reading the VMI failed: {e}"),
    };
    let selector = format!("{}={uid}", launcher::CREATED_BY_LABEL);
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await;
    let pods = match pods {
        Ok(list) if list.items.is_empty() => "no launcher pod".to_owned(),
        Ok(list) => list
            .items
            .iter()
            .map(|p| {
                format!(
                    "pod {} on {:?} phase {:?}",
                    p.metadata.name.as_deref().unwrap_or_default(),
                    p.spec.as_ref().and_then(|s| s.node_name.as_deref()),
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("listing its pods failed: {e}"),
    };
    format!("{phase}; {pods}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        cluster: 5,
        per_node: 2,
    };

    #[test]
    fn two_outbound_per_node_five_per_cluster() {
        let mut s = Slots::default();
        assert!(admit(&mut s, "a", "node-1", 0, false, LIMITS));
        assert!(admit(&mut s, "b", "node-1", 0, false, LIMITS));
        assert!(!admit(&mut s, "c", "node-1", 0, false, LIMITS));
        for (uid, node) in [("d", "node-2"), ("e", "node-2"), ("f", "node-3")] {
            assert!(admit(&mut s, uid, node, 0, false, LIMITS));
        }
        assert!(
            !admit(&mut s, "g", "node-3", 0, false, LIMITS),
            "cluster full"
        );
        assert!(
            admit(&mut s, "a", "node-1", 0, false, LIMITS),
            "already running"
        );
    }

    #[test]
    fn priority_queue_lets_the_higher_priority_take_freed_room() {
        let mut s = Slots::default();
        assert!(admit(&mut s, "a", "node-1", 0, true, LIMITS));
        assert!(admit(&mut s, "b", "node-1", 0, true, LIMITS));
        assert!(!admit(&mut s, "user", "node-1", 50, true, LIMITS));
        assert!(!admit(&mut s, "drain", "node-1", 100, true, LIMITS));
        s.running.remove("a");
        assert!(
            !admit(&mut s, "user", "node-1", 50, true, LIMITS),
            "outranked"
        );
        assert!(admit(&mut s, "drain", "node-1", 100, true, LIMITS));
        // Without the queue, whoever looks first.
        let mut s = Slots::default();
        assert!(admit(&mut s, "a", "node-1", 0, false, LIMITS));
        assert!(admit(&mut s, "b", "node-1", 0, false, LIMITS));
        assert!(!admit(&mut s, "drain", "node-1", 100, false, LIMITS));
        s.running.remove("a");
        assert!(admit(&mut s, "user", "node-1", 50, false, LIMITS));
    }
}
