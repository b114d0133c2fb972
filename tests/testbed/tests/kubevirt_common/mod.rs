//! What the KubeVirt simulator's tests share: a bed without logind (control plane, simulated
//! nodes, the simulator), a client that does not retry 429s, and a recorder of every update
//! of a VMI as a watch delivers it.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{EvictParams, ListParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::runtime::watcher;
use kube::{Api, Client};
use testbed::controlplane::{ControlPlane, ControlPlaneOptions};
use testbed::kubelet::KubeletSim;
use testbed::kubevirt::{KubeVirtOptions, KubeVirtSim, VirtualMachineInstance, WebhookTls};

/// Each case starts its own control plane; two at once would starve a 2-core machine.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Fields drop in order: the simulators stop before the control plane goes away.
pub struct Bed {
    pub kubevirt: KubeVirtSim,
    pub kubelet: KubeletSim,
    pub client: Client,
    /// Without kube's retry of 429s, so a test sees each refusal.
    pub raw: Client,
    pub plane: ControlPlane,
}

pub async fn bed(nodes: usize, opts: KubeVirtOptions) -> Result<Bed> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "testbed=info".into()),
        )
        .with_test_writer()
        .try_init();
    let plane = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let client = plane.client().await?;
    let mut config = plane.config().await?;
    config.default_retry = false;
    let raw = Client::try_from(config)?;
    let kubelet = KubeletSim::spawn_n(client.clone(), nodes).await?;
    let opts = KubeVirtOptions {
        webhook_tls: Some(WebhookTls::issued_by(plane.ca())?),
        ..opts
    };
    let kubevirt = KubeVirtSim::spawn(client.clone(), kubelet.workloads(), opts).await?;
    Ok(Bed {
        kubevirt,
        kubelet,
        client,
        raw,
        plane,
    })
}

/// Evicts a pod; the refusal as (code, message).
pub async fn evict(client: &Client, pod: &str) -> Result<Result<(), (u16, String)>> {
    match Api::<Pod>::namespaced(client.clone(), "default")
        .evict(pod, &EvictParams::default())
        .await
    {
        Ok(_) => Ok(Ok(())),
        Err(kube::Error::Api(s)) => Ok(Err((s.code, s.message))),
        Err(e) => Err(e.into()),
    }
}

/// The running launcher pod of a VMI on its current node.
pub async fn launcher_of(client: &Client, vmi: &str) -> Result<Pod> {
    let vmi = Api::<VirtualMachineInstance>::namespaced(client.clone(), "default")
        .get(vmi)
        .await?;
    let uid = vmi.metadata.uid.clone().unwrap_or_default();
    let pods = Api::<Pod>::namespaced(client.clone(), "default")
        .list(&ListParams::default().labels(&format!("kubevirt.io/created-by={uid}")))
        .await?;
    pods.items
        .into_iter()
        .find(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == vmi.node_name()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .context("no running launcher pod")
}

pub async fn wait_vmi(
    client: &Client,
    name: &str,
    what: &str,
    limit: Duration,
    cond: impl Fn(&VirtualMachineInstance) -> bool,
) -> Result<VirtualMachineInstance> {
    let api = Api::<VirtualMachineInstance>::namespaced(client.clone(), "default");
    let found = tokio::time::timeout(
        limit,
        await_condition(api, name, move |v: Option<&VirtualMachineInstance>| {
            v.is_some_and(&cond)
        }),
    )
    .await
    .with_context(|| format!("timed out waiting for VMI {name}: {what}"))??;
    found.with_context(|| format!("VMI {name} vanished"))
}

pub async fn wait_pod(
    client: &Client,
    name: &str,
    what: &str,
    cond: impl Fn(Option<&Pod>) -> bool,
) -> Result<Option<Pod>> {
    let api = Api::<Pod>::namespaced(client.clone(), "default");
    tokio::time::timeout(Duration::from_secs(60), await_condition(api, name, cond))
        .await
        .with_context(|| format!("timed out waiting for pod {name}: {what}"))?
        .map_err(Into::into)
}

pub fn pod_phase(p: Option<&Pod>) -> Option<&str> {
    p?.status.as_ref()?.phase.as_deref()
}

/// Polls `probe` every 100 ms until it yields, at most `limit` (for what no watch shows,
/// e.g. a list of several objects reaching a state together).
pub async fn until<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if Instant::now() >= end {
            anyhow::bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One update of a VMI as a watch delivered it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub resource_version: String,
    pub at: Instant,
    pub phase: String,
    pub node: Option<String>,
    pub label: Option<String>,
    pub evacuation: Option<String>,
    pub completed: bool,
    pub live_migratable: Option<String>,
}

impl Seen {
    fn of(v: &VirtualMachineInstance) -> Self {
        Self {
            resource_version: v.metadata.resource_version.clone().unwrap_or_default(),
            at: Instant::now(),
            phase: v.phase().to_owned(),
            node: v.node_name().map(str::to_owned),
            label: v.node_label().map(str::to_owned),
            evacuation: v.evacuation_node_name().map(str::to_owned),
            completed: v.migration_state().is_some_and(|m| m.completed),
            live_migratable: v.live_migratable_condition().map(|c| c.status.clone()),
        }
    }
}

/// Records every update of one VMI from the moment it is started (the watch is open when
/// `start` returns).
pub struct VmiRecorder {
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for VmiRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl VmiRecorder {
    pub async fn start(client: &Client, name: &str) -> Self {
        let api = Api::<VirtualMachineInstance>::namespaced(client.clone(), "default");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut stream = std::pin::pin!(watcher(api, config));
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(watcher::Event::Apply(v) | watcher::Event::InitApply(v)) => {
                        sink.lock().expect("recorder lock").push(Seen::of(&v));
                    }
                    _ => {}
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
        Self { seen, task }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("recorder lock").clone()
    }

    /// Waits (polling the record every 50 ms, at most `limit`) until `cond` holds for what has
    /// been seen; returns the record.
    pub async fn wait(
        &self,
        what: &str,
        limit: Duration,
        cond: impl Fn(&[Seen]) -> bool,
    ) -> Result<Vec<Seen>> {
        let end = Instant::now() + limit;
        loop {
            let seen = self.seen();
            if cond(&seen) {
                return Ok(seen);
            }
            if Instant::now() >= end {
                anyhow::bail!(
                    "timed out after {limit:?} waiting for the VMI record to show {what}: {seen:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub async fn create_vmi(client: &Client, vmi: &VirtualMachineInstance) -> Result<()> {
    Api::<VirtualMachineInstance>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), vmi)
        .await?;
    Ok(())
}
