//! A KubeVirt simulator against the real API server: the VMI and VMIM CRDs, virt-api's
//! pod-eviction webhook (real HTTPS, registered with kube-apiserver), and watch-driven
//! stand-ins for virt-controller (VMI start, evacuation, migrations) and virt-handler
//! (VMI Running, migration target hand-off, ACPI shutdown when the launcher pod is deleted).
//!
//! Each part names the upstream file it follows. Timings are scaled down and configurable
//! ([`KubeVirtOptions`]); the rules and messages are upstream's.

pub mod admitter;
pub mod crds;
pub mod evacuation;
pub mod launcher;
mod lifecycle;
pub mod migration;
pub mod webhook;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::PostParams;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use admitter::EvictionStrategy;
pub use crds::{
    MigrationState, VirtualMachineInstance, VirtualMachineInstanceMigration, VmiStatus, VmimStatus,
};
pub use launcher::{SpecError, VmSpec, VmiKind};
pub use webhook::WebhookTls;

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
}

pub(crate) fn api_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeVirtError {
    let action = action.into();
    move |source| KubeVirtError::Api { action, source }
}

/// Failure injection for migrations.
#[derive(Clone, Debug, Default)]
pub struct FailureInjection {
    /// `"namespace/vmi"` → how many of its next migrations fail.
    pub per_vmi: HashMap<String, u32>,
    /// Probability (0..=1) that any migration fails.
    pub probability: f64,
}

#[derive(Clone, Debug)]
pub struct KubeVirtOptions {
    /// Time from a migration's admission to its success: Scheduling, Scheduled,
    /// PreparingTarget and TargetReady take a tenth each, Running the rest.
    pub migration_duration: Duration,
    /// Time a VMI takes to shut down (ACPI) after its launcher pod is deleted or evicted;
    /// capped by the pod's grace period.
    pub shutdown_duration: Duration,
    /// `parallelMigrationsPerCluster` (upstream default 5, `pkg/virt-config/virt-config.go`).
    pub parallel_migrations_per_cluster: usize,
    /// `parallelOutboundMigrationsPerNode` (upstream default 2).
    pub parallel_outbound_migrations_per_node: usize,
    /// First backoff after a failed evacuation migration, doubling per further failure
    /// (upstream 20 s, `pkg/virt-controller/watch/migration/migration.go`).
    pub migration_backoff: Duration,
    /// How long a target pod may find no schedulable node before the migration fails
    /// (upstream `defaultUnschedulablePendingTimeoutSeconds`, 5 min).
    pub unschedulable_timeout: Duration,
    pub failures: FailureInjection,
    /// The KubeVirt CR's `spec.configuration.evictionStrategy`; upstream defaults it to None
    /// (`pkg/virt-config/configuration.go`).
    pub cluster_eviction_strategy: Option<EvictionStrategy>,
    /// Serving certificate for the webhook; a fresh CA is made when absent.
    pub webhook_tls: Option<WebhookTls>,
}

impl Default for KubeVirtOptions {
    fn default() -> Self {
        Self {
            migration_duration: Duration::from_secs(2),
            shutdown_duration: Duration::from_secs(2),
            parallel_migrations_per_cluster: 5,
            parallel_outbound_migrations_per_node: 2,
            migration_backoff: Duration::from_secs(20),
            unschedulable_timeout: Duration::from_secs(300),
            failures: FailureInjection::default(),
            cluster_eviction_strategy: Some(EvictionStrategy::None),
            webhook_tls: None,
        }
    }
}

/// Shared state of the simulated controllers: informer-like caches fed by watches, and a
/// change counter every controller waits on.
pub(crate) struct Ctx {
    pub client: Client,
    pub opts: KubeVirtOptions,
    pub vmis: Store<VirtualMachineInstance>,
    pub vmims: Store<VirtualMachineInstanceMigration>,
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub changes: watch::Receiver<u64>,
    pub workloads: Workloads,
    pub failures: Mutex<FailureInjection>,
    /// Running migrations: uid → source node.
    pub slots: Mutex<HashMap<String, String>>,
}

impl Ctx {
    pub fn vmi(&self, namespace: &str, name: &str) -> Option<Arc<VirtualMachineInstance>> {
        self.vmis.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&ObjectRef::new(name).within(namespace))
    }

    /// Launcher pods created for this VMI (by `kubevirt.io/created-by`).
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

    /// Nodes a VMI could move to: Ready, schedulable, without NoSchedule/NoExecute taints,
    /// least loaded (by VMIs) first.
    pub fn target_nodes(&self, exclude: &str) -> Vec<String> {
        let mut candidates: Vec<(usize, String)> = self
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
                name != exclude && ready && !spec.unschedulable.unwrap_or(false) && !tainted
            })
            .map(|n| {
                let name = n.metadata.name.clone().unwrap_or_default();
                let load = self
                    .vmis
                    .state()
                    .iter()
                    .filter(|v| !v.is_final() && v.node_name() == Some(name.as_str()))
                    .count();
                (load, name)
            })
            .collect();
        candidates.sort();
        candidates.into_iter().map(|(_, n)| n).collect()
    }

    /// Waits for any watched object to change, at most `timeout`.
    pub async fn changed(&self, timeout: Duration) {
        let mut rx = self.changes.clone();
        rx.borrow_and_update();
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
    }
}

/// The running simulator. Dropping it stops every task and the webhook server (the webhook
/// configuration stays registered: with failurePolicy Fail, evictions of virt-launcher pods
/// then fail, as they do when virt-api is down).
pub struct KubeVirtSim {
    client: Client,
    ctx: Arc<Ctx>,
    webhook_port: u16,
    webhook_requests: Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for KubeVirtSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeVirtSim")
            .field("webhook_port", &self.webhook_port)
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

impl KubeVirtSim {
    /// Installs the CRDs, starts and registers the webhook (returning once kube-apiserver
    /// calls it), and starts the controllers. `workloads` is the kubelet sim's handle, through
    /// which launcher pods' workloads end.
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
        let hook = webhook::serve(client.clone(), &tls, opts.cluster_eviction_strategy).await?;
        tasks.push(hook.task);

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
            watcher::Config::default().labels("kubevirt.io=virt-launcher"),
            bump.clone(),
        );
        let (nodes, t4) = reflect(Api::all(client.clone()), watcher::Config::default(), bump);
        tasks.extend([t1, t2, t3, t4]);
        let ready = async {
            let _ = vmis.wait_until_ready().await;
            let _ = vmims.wait_until_ready().await;
            let _ = pods.wait_until_ready().await;
            let _ = nodes.wait_until_ready().await;
        };
        tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .map_err(|_| KubeVirtError::Timeout("KubeVirt sim caches to sync".into()))?;

        let ctx = Arc::new(Ctx {
            client: client.clone(),
            failures: Mutex::new(opts.failures.clone()),
            opts,
            vmis,
            vmims,
            pods,
            nodes,
            changes,
            workloads,
            slots: Mutex::new(HashMap::new()),
        });
        tasks.push(tokio::spawn(lifecycle::run(ctx.clone())));
        tasks.push(tokio::spawn(evacuation::run(ctx.clone())));
        tasks.push(tokio::spawn(migration::run(ctx.clone())));

        let sim = Self {
            client,
            ctx,
            webhook_port: hook.port,
            webhook_requests: hook.requests,
            tasks,
        };
        webhook::register(&sim.client, sim.webhook_port, &tls.ca_bundle_pem).await?;
        webhook::wait_effective(&sim.client, &sim.webhook_requests).await?;
        Ok(sim)
    }

    /// Unregisters the webhook, then stops everything (as uninstalling virt-operator would),
    /// so evictions of virt-launcher pods no longer fail once the sim is gone.
    pub async fn shutdown(self) -> Result<(), KubeVirtError> {
        use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
        let deleted = Api::<ValidatingWebhookConfiguration>::all(self.client.clone())
            .delete(webhook::CONFIGURATION_NAME, &Default::default())
            .await;
        match deleted {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(api_err("unregistering the eviction webhook")(e)),
        }
    }

    pub fn webhook_url(&self) -> String {
        format!("https://127.0.0.1:{}{}", self.webhook_port, webhook::PATH)
    }

    /// Admission requests the webhook has served (including the readiness probe).
    pub fn webhook_requests(&self) -> u64 {
        self.webhook_requests.load(Ordering::SeqCst)
    }

    /// The next `count` migrations of `namespace/vmi` fail.
    pub fn fail_next_migrations(&self, namespace: &str, vmi: &str, count: u32) {
        let mut f = self.ctx.failures.lock().expect("failures lock");
        *f.per_vmi.entry(format!("{namespace}/{vmi}")).or_default() += count;
    }

    pub fn set_failure_probability(&self, probability: f64) {
        self.ctx.failures.lock().expect("failures lock").probability = probability.clamp(0.0, 1.0);
    }

    /// Creates the VMIs of `spec` on `node` and waits until all run.
    pub async fn create_vmis(
        &self,
        namespace: &str,
        node: &str,
        spec: &VmSpec,
    ) -> Result<Vec<VirtualMachineInstance>, KubeVirtError> {
        create_vmis(&self.client, namespace, node, spec).await
    }
}

/// Creates the VMIs of `spec` (named `<kind>-<n>`) pinned to `node` and waits up to 60 s until
/// they are Running. Needs a running [`KubeVirtSim`] and kubelet sim.
pub async fn create_vmis(
    client: &Client,
    namespace: &str,
    node: &str,
    spec: &VmSpec,
) -> Result<Vec<VirtualMachineInstance>, KubeVirtError> {
    let api = Api::<VirtualMachineInstance>::namespaced(client.clone(), namespace);
    for (kind, name) in spec.names() {
        let vmi = launcher::vmi_object(&name, namespace, node, kind);
        api.create(&PostParams::default(), &vmi)
            .await
            .map_err(api_err(format!("creating VMI {namespace}/{name}")))?;
    }
    let mut running = Vec::new();
    for (_, name) in spec.names() {
        let vmi = tokio::time::timeout(
            Duration::from_secs(60),
            kube::runtime::wait::await_condition(
                api.clone(),
                &name,
                |v: Option<&VirtualMachineInstance>| v.is_some_and(|v| v.phase() == "Running"),
            ),
        )
        .await
        .map_err(|_| KubeVirtError::Timeout(format!("VMI {namespace}/{name} to run")))?
        .map_err(|e| KubeVirtError::Wait(e.to_string()))?;
        running.extend(vmi);
    }
    Ok(running)
}
