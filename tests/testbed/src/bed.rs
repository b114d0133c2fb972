//! The whole bed in one handle: control plane, simulated kubelets and KubeVirt, and a real
//! logind on node-1 (and on more nodes when asked), wired together the way a cluster is.
//!
//! A process that runs "as a pod" on a node ([`BedNode::spawn_pod`], [`Bed::pod_command`])
//! lives in a child PID namespace of that node's logind and cannot see the machine's PIDs, so
//! it cannot `nsenter` the node. The power commands it is given (`TESTBED_POWEROFF`, …)
//! therefore ask the bed over loopback ([`ctl`](crate::ctl)); the bed performs them from the
//! machine's side. The same channel takes faults (`testbed fault …`), which tests call
//! directly: [`Bed::api`] (stop/start kube-apiserver, freeze/reset its client connections),
//! [`BedNode::restart_logind`], [`BedNode::restart_bus`], [`BedNode::mask_unit`], and the
//! [`Pod`] handle (signals by host PID, OOM kills under kubelet's group-kill semantics).
//!
//! A [`Ledger`] records every VMI from the start; [`Bed::ledger`] reports each one's fate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kube::Client;
use nix::sys::signal::Signal;
use tokio::sync::RwLock;

use crate::apiproxy::Freeze;
use crate::controlplane::{ApiServerControl, ControlPlane, ControlPlaneError, ControlPlaneOptions};
use crate::kubelet::{KubeletError, KubeletSim, NodeConfig, node_names};
use crate::kubevirt::{
    KubeVirtError, KubeVirtFaults, KubeVirtOptions, KubeVirtSim, VmSpec, WebhookFault,
};
use crate::ledger::{Ledger, LedgerReport};
use crate::logind::{
    Elogind, ElogindOptions, Inhibitor, LogindError, NodeExit, ReleaseWatch, Suite, SystemdNode,
    SystemdOptions,
};
pub use crate::logind::{NodeLogind, Release};
use crate::pod::{Pod, PodError, PodRegistry, PodSpec};

/// The node the agent under test guards by default.
pub const NODE: &str = "node-1";
/// Namespace the bed's VMIs live in.
pub const VM_NAMESPACE: &str = "default";

/// What can go wrong with the bed. Each variant shows the whole message of what went wrong
/// below it and does not chain it as its `source()` as well: `{:#}` (anyhow's chain) would
/// print it twice. The inner errors may still chain their own causes.
#[derive(Debug, thiserror::Error)]
pub enum BedError {
    #[error("control plane: {0}")]
    ControlPlane(ControlPlaneError),
    #[error("kubelet simulator: {0}")]
    Kubelet(KubeletError),
    #[error("KubeVirt simulator: {0}")]
    KubeVirt(KubeVirtError),
    #[error("logind: {0}")]
    Logind(LogindError),
    #[error("{0}")]
    Pod(PodError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(
        "{node} runs no logind (nodes with one: {with}); start the bed with more \
         (--loginds N|all, BedOptions::loginds)"
    )]
    NoLogind { node: String, with: String },
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
}

/// `From` without `#[from]`, which would also make the inner error the `source()`.
macro_rules! bed_error_from {
    ($($inner:ty => $variant:ident),* $(,)?) => {
        $(impl From<$inner> for BedError {
            fn from(e: $inner) -> Self {
                Self::$variant(e)
            }
        })*
    };
}

bed_error_from!(
    ControlPlaneError => ControlPlane,
    KubeletError => Kubelet,
    KubeVirtError => KubeVirt,
    LogindError => Logind,
    PodError => Pod,
);

/// Which logind a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogindKind {
    /// systemd 257 (Debian trixie) as PID 1 of a namespace container.
    #[default]
    Systemd,
    /// systemd 252 (Debian bookworm).
    SystemdBookworm,
    /// systemd 257 (Debian trixie) with polkitd on the node.
    SystemdPolkit,
    /// systemd 247 (Debian bullseye).
    SystemdBullseye,
    /// elogind 246 on a private bus.
    Elogind,
}

impl std::str::FromStr for LogindKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "systemd" | "systemd-trixie" => Ok(Self::Systemd),
            "systemd-bookworm" => Ok(Self::SystemdBookworm),
            "systemd-polkit" => Ok(Self::SystemdPolkit),
            "systemd-bullseye" => Ok(Self::SystemdBullseye),
            "elogind" => Ok(Self::Elogind),
            other => Err(format!(
                "unknown logind {other:?}: use systemd, systemd-bookworm, systemd-bullseye, \
                 systemd-polkit or elogind"
            )),
        }
    }
}

/// Which nodes run a logind (and so can run pods): node-1 … node-N, or every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loginds {
    First(usize),
    All,
}

impl Default for Loginds {
    fn default() -> Self {
        Self::First(1)
    }
}

impl std::str::FromStr for Loginds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Self::All),
            n => match n.parse::<usize>() {
                Ok(k) if k >= 1 => Ok(Self::First(k)),
                _ => Err(format!(
                    "--loginds {n:?}: give a count of nodes from node-1 (at least 1) or `all`"
                )),
            },
        }
    }
}

impl Loginds {
    /// The nodes, out of `nodes`, that get a logind.
    pub fn pick(self, nodes: &[String]) -> Result<Vec<String>, String> {
        match self {
            Self::All => Ok(nodes.to_vec()),
            Self::First(k) if k <= nodes.len() => Ok(nodes[..k].to_vec()),
            Self::First(k) => Err(format!(
                "--loginds {k}: the bed has only {} nodes",
                nodes.len()
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BedOptions {
    /// Nodes `node-1` … `node-N` (at least 2, so VMIs have somewhere to migrate).
    pub nodes: usize,
    /// The VMIs to create, passed to [`KubeVirtSim::create_vmis`] for node-1 as it is.
    pub vms: VmSpec,
    /// node-1's logind.
    pub logind: LogindKind,
    /// Which nodes run a logind (default node-1 only).
    pub loginds: Loginds,
    /// The logind of every other node that runs one.
    pub other_logind: LogindKind,
    pub kubevirt: KubeVirtOptions,
    /// logind's `InhibitDelayMaxSec` on every node with a logind (None: logind's default, 5 s).
    pub inhibit_delay_max_secs: Option<u64>,
    pub control_plane: ControlPlaneOptions,
}

impl Default for BedOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            vms: VmSpec::default(),
            logind: LogindKind::default(),
            loginds: Loginds::default(),
            other_logind: LogindKind::Systemd,
            kubevirt: KubeVirtOptions::default(),
            inhibit_delay_max_secs: None,
            control_plane: ControlPlaneOptions::default(),
        }
    }
}

async fn start_logind(
    name: &str,
    kind: LogindKind,
    delay: Option<u64>,
) -> Result<NodeLogind, BedError> {
    let node = match kind {
        LogindKind::Systemd
        | LogindKind::SystemdBookworm
        | LogindKind::SystemdBullseye
        | LogindKind::SystemdPolkit => {
            let suite = match kind {
                LogindKind::SystemdBookworm => Suite::Bookworm,
                LogindKind::SystemdBullseye => Suite::Bullseye,
                LogindKind::SystemdPolkit => Suite::TrixiePolkit,
                _ => Suite::Trixie,
            };
            NodeLogind::Systemd(SystemdNode::boot(SystemdOptions::new(name, suite)).await?)
        }
        LogindKind::Elogind => NodeLogind::Elogind(
            Elogind::start(ElogindOptions {
                inhibit_delay_max_secs: delay.unwrap_or(5),
                ..ElogindOptions::default()
            })
            .await?,
        ),
    };
    if let (Some(secs), NodeLogind::Systemd(_)) = (delay, &node) {
        node.set_inhibit_delay_max(secs).await?;
    }
    Ok(node)
}

/// How many loginds start at the same time: each waits at most 10 s for its bus name, which
/// 200 starting together on two cores do not all get (measured: a fleet bed of 200 elogind
/// nodes failed so; 50 at once started).
const LOGINDS_AT_ONCE: usize = 16;

/// Starts the loginds of `names`, [`LOGINDS_AT_ONCE`] at a time.
async fn start_loginds(
    opts: &BedOptions,
    names: &[String],
) -> Result<BTreeMap<String, Arc<RwLock<NodeLogind>>>, BedError> {
    use futures::StreamExt;
    let started: Vec<Result<_, BedError>> =
        futures::stream::iter(names.iter().map(|name| async move {
            let kind = if name == NODE {
                opts.logind
            } else {
                opts.other_logind
            };
            let node = start_logind(name, kind, opts.inhibit_delay_max_secs).await?;
            Ok::<_, BedError>((name.clone(), Arc::new(RwLock::new(node))))
        }))
        .buffer_unordered(LOGINDS_AT_ONCE)
        .collect()
        .await;
    started.into_iter().collect()
}

/// What the bed shares with its ctl server: the nodes' loginds, the pods it started, the
/// API server's controls and the KubeVirt simulator's fault knobs.
pub(crate) struct BedShared {
    pub loginds: BTreeMap<String, Arc<RwLock<NodeLogind>>>,
    pub pods: PodRegistry,
    pub api: ApiServerControl,
    pub kubevirt: KubeVirtFaults,
}

impl BedShared {
    pub fn logind(&self, node: &str) -> Result<&Arc<RwLock<NodeLogind>>, BedError> {
        self.loginds.get(node).ok_or_else(|| BedError::NoLogind {
            node: node.to_owned(),
            with: self.loginds.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    pub async fn restart_logind(&self, node: &str) -> Result<(), BedError> {
        Ok(self.logind(node)?.read().await.restart_logind().await?)
    }

    pub async fn restart_bus(&self, node: &str) -> Result<(), BedError> {
        Ok(self.logind(node)?.read().await.restart_bus().await?)
    }

    pub async fn mask_unit(&self, node: &str, unit: &str, mask: bool) -> Result<(), BedError> {
        let logind = self.logind(node)?.read().await;
        let systemd = logind.systemd_ref().ok_or_else(|| {
            BedError::Unsupported(format!(
                "masking {unit} on {node}: it runs elogind, which has no units; use a systemd node"
            ))
        })?;
        if mask {
            systemd.mask_unit(unit).await?;
        } else {
            systemd.unmask_unit(unit).await?;
        }
        Ok(())
    }

    fn pods_on(&self, node: &str) -> Result<Vec<crate::pod::PodRecord>, BedError> {
        let pods: Vec<_> = self
            .pods
            .records()
            .into_iter()
            .filter(|r| r.node == node)
            .collect();
        if pods.is_empty() {
            return Err(BedError::Invalid(format!(
                "no pod the bed started runs on {node}"
            )));
        }
        Ok(pods)
    }

    pub async fn kill_pods(&self, node: &str, signal: Signal) -> Result<String, BedError> {
        let mut done = Vec::new();
        for pod in self.pods_on(node)? {
            let Some(pid) = pod.entrypoint() else {
                continue;
            };
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).map_err(
                |source| PodError::Signal {
                    pid,
                    signal,
                    source,
                },
            )?;
            done.push(format!("{} (pid {pid})", pod.name));
        }
        if done.is_empty() {
            return Err(BedError::Invalid(format!(
                "the pods on {node} have no running program"
            )));
        }
        Ok(format!("{} sent to {}", signal.as_str(), done.join(", ")))
    }

    pub async fn oom_pods(&self, node: &str) -> Result<String, BedError> {
        let mut done = Vec::new();
        for pod in self.pods_on(node)? {
            if let Some(cg) = &pod.cgroup {
                cg.exceed_limit(Duration::from_secs(10)).await?;
                done.push(pod.name.clone());
            }
        }
        if done.is_empty() {
            return Err(BedError::Invalid(format!(
                "no pod on {node} has a memory limit (testbed run --memory-max, PodSpec::memory_max)"
            )));
        }
        Ok(format!("OOM kill in {}", done.join(", ")))
    }

    pub async fn power_offs(&self) -> BTreeMap<String, Vec<SystemTime>> {
        let mut out = BTreeMap::new();
        for (name, logind) in &self.loginds {
            out.insert(name.clone(), logind.read().await.power_offs());
        }
        out
    }

    pub async fn status(&self) -> String {
        let proxy = self.api.proxy();
        let mut lines = vec![format!(
            "kube-apiserver {}; proxy {}, {} open connection(s)",
            match self.api.pid() {
                Some(pid) => format!("running (pid {pid})"),
                None => "stopped".into(),
            },
            match proxy.frozen() {
                Some(Freeze::All) => "frozen (all)",
                Some(Freeze::Established) => "frozen (established)",
                None => "forwarding",
            },
            proxy.open_connections()
        )];
        lines.push(kubevirt_status(
            self.kubevirt.webhook_fault(),
            &self.kubevirt.failures(),
        ));
        for (name, logind) in &self.loginds {
            let l = logind.read().await;
            lines.push(format!("{name}: {} (pid {})", l.describe(), l.pid()));
        }
        for pod in self.pods.records() {
            let pid = pod
                .entrypoint()
                .map_or("not running".to_owned(), |p| format!("pid {p}"));
            let limit = pod
                .cgroup
                .as_ref()
                .map(|c| format!(", memory limit {} bytes ({:?})", c.limit(), c.mode()))
                .unwrap_or_default();
            lines.push(format!("pod {} on {}: {pid}{limit}", pod.name, pod.node));
        }
        // One answer line: the ctl protocol is line-based.
        lines.join(" | ")
    }
}

/// The status line of the KubeVirt simulator's faults: the eviction webhook and the migration
/// failures still to come.
fn kubevirt_status(webhook: WebhookFault, failures: &crate::kubevirt::FailureInjection) -> String {
    let webhook = match webhook {
        WebhookFault::None => "up".to_owned(),
        WebhookFault::Down => "down".to_owned(),
        WebhookFault::Slow(d) => format!("slow ({} s)", d.as_secs_f64()),
    };
    let pending = |what: &str, counts: &std::collections::HashMap<String, u32>| {
        let mut v: Vec<String> = counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(vmi, n)| format!("{what} {vmi} ×{n}"))
            .collect();
        v.sort();
        v
    };
    let mut injected = pending("fail", &failures.per_vmi);
    injected.extend(pending("stall", &failures.stalls));
    if failures.probability > 0.0 {
        injected.push(format!("failure probability {}", failures.probability));
    }
    let injected = if injected.is_empty() {
        "none".to_owned()
    } else {
        injected.join(", ")
    };
    format!("KubeVirt eviction webhook {webhook}; migration faults: {injected}")
}

/// A running bed. Dropping it tears everything down by PID (also during a panic); prefer
/// [`Bed::shutdown`] where the caller can await.
pub struct Bed {
    // Field order is drop order: simulators first, then the loginds, then the control plane.
    ctl: Option<crate::ctl::CtlServer>,
    ledger: Option<Ledger>,
    pub kubevirt: KubeVirtSim,
    pub kubelet: KubeletSim,
    /// node-1's logind (also reachable through [`Bed::node`]).
    pub logind: Arc<RwLock<NodeLogind>>,
    shared: Arc<BedShared>,
    pub control_plane: ControlPlane,
    client: Client,
    started_in: Duration,
    nodes: Vec<String>,
}

impl Bed {
    pub async fn start(opts: BedOptions) -> Result<Self, BedError> {
        if opts.nodes < 2 {
            return Err(BedError::Invalid(format!(
                "--nodes {}: the bed needs at least 2 nodes so VMIs can migrate off node-1",
                opts.nodes
            )));
        }
        let began = Instant::now();
        let nodes = node_names(opts.nodes);
        let with_logind = opts.loginds.pick(&nodes).map_err(BedError::Invalid)?;
        // The control plane and the logind nodes are independent; start them all at once.
        let (cp, loginds) = tokio::join!(
            ControlPlane::start(opts.control_plane.clone()),
            start_loginds(&opts, &with_logind)
        );
        let control_plane = cp?;
        let loginds = loginds?;
        let client = control_plane.client().await?;

        let mut configs = Vec::new();
        for name in &nodes {
            let mut node = NodeConfig::new(name.clone());
            // A real kubelet reports the kernel's boot ID; a logind node's is its boot's.
            if let Some(l) = loginds.get(name) {
                node.boot_id = l.read().await.boot_id();
            }
            configs.push(node);
        }
        let kubelet = KubeletSim::spawn(client.clone(), configs).await?;
        let kubevirt =
            KubeVirtSim::spawn(client.clone(), kubelet.workloads(), opts.kubevirt.clone()).await?;
        // Before any VMI exists, so the ledger sees each from its creation.
        let ledger = Ledger::start(client.clone()).await;
        if opts.vms.total() > 0 {
            kubevirt.create_vmis(VM_NAMESPACE, NODE, &opts.vms).await?;
        }
        let node1 = loginds
            .get(NODE)
            .cloned()
            .ok_or_else(|| BedError::Invalid("node-1 always runs a logind".into()))?;
        let shared = Arc::new(BedShared {
            loginds,
            pods: PodRegistry::default(),
            api: control_plane.api_control(),
            kubevirt: kubevirt.faults(),
        });
        let ctl = crate::ctl::CtlServer::start(control_plane.dir(), &shared, &with_logind)?;
        Ok(Self {
            ctl: Some(ctl),
            ledger: Some(ledger),
            kubevirt,
            kubelet,
            logind: node1,
            shared,
            control_plane,
            client,
            started_in: began.elapsed(),
            nodes,
        })
    }

    /// A client straight to kube-apiserver (not through the proxy: faults do not reach it).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The admin kubeconfig pods get, through the API proxy (so proxy faults reach whoever
    /// uses it). [`ControlPlane::kubeconfig_path`] goes straight to kube-apiserver.
    pub fn kubeconfig_path(&self) -> &Path {
        self.control_plane.client_kubeconfig_path()
    }

    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// The nodes that run a logind, in order.
    pub fn logind_nodes(&self) -> Vec<String> {
        self.shared.loginds.keys().cloned().collect()
    }

    pub fn kubectl_path() -> PathBuf {
        crate::paths::bin_dir().join("kubectl")
    }

    /// The bed's ctl port (`TESTBED_CTL_PORT`, what `testbed fault` talks to).
    pub fn ctl_port(&self) -> u16 {
        self.ctl().port()
    }

    fn ctl(&self) -> &crate::ctl::CtlServer {
        self.ctl
            .as_ref()
            .expect("ctl server runs while the bed does")
    }

    /// One node's handle; fails for a node without a logind.
    pub fn node(&self, name: &str) -> Result<BedNode<'_>, BedError> {
        Ok(BedNode {
            bed: self,
            name: name.to_owned(),
            logind: self.shared.logind(name)?.clone(),
        })
    }

    fn node1(&self) -> BedNode<'_> {
        BedNode {
            bed: self,
            name: NODE.to_owned(),
            logind: self.logind.clone(),
        }
    }

    /// The variables a pod on node-1 gets (see [`BedNode::pod_env`]).
    pub fn pod_env(&self) -> Vec<(String, String)> {
        self.node1().pod_env()
    }

    /// A command that runs `program` as a pod on node-1 runs (see
    /// [`crate::logind::LogindNode::pod_command`]), with [`Bed::pod_env`] set. The caller
    /// spawns it; [`Bed::spawn_pod`] also keeps track of it.
    pub async fn pod_command(&self, program: &str, args: &[&str]) -> tokio::process::Command {
        self.node1().pod_command(program, args).await
    }

    /// Starts `spec` as a pod on node-1 (see [`BedNode::spawn_pod`]).
    pub async fn spawn_pod(&self, spec: PodSpec) -> Result<Pod, BedError> {
        self.node1().spawn_pod(spec).await
    }

    /// Starts node-1's power-off, as an administrator would.
    pub async fn poweroff(&self) -> Result<(), BedError> {
        self.node1().poweroff().await
    }

    /// When node-1 powered off (systemd reached `Shutting down.`; elogind ran its power command).
    pub async fn wait_poweroff(&self, timeout: Duration) -> Result<SystemTime, BedError> {
        self.node1().wait_poweroff(timeout).await
    }

    pub async fn list_inhibitors(&self) -> Result<Vec<Inhibitor>, BedError> {
        self.node1().list_inhibitors().await
    }

    /// Watches node-1's logind until no lock of `who` is held any more (see
    /// [`BedNode::observe_release`]).
    pub async fn observe_release(&self, who: &str, timeout: Duration) -> Option<Release> {
        self.node1().observe_release(who, timeout).await
    }

    /// Arms a watch for the release of `who`'s lock on node-1 (see [`ReleaseWatch`]).
    pub async fn watch_release(&self, who: &str, timeout: Duration) -> ReleaseWatch {
        self.node1().watch_release(who, timeout).await
    }

    /// Reboots node-1 (systemd only) and boots it again with a new boot ID, which the kubelet
    /// simulator then reports as a restarted kubelet would.
    pub async fn reboot_node(&mut self, timeout: Duration) -> Result<NodeExit, BedError> {
        self.node1().reboot(timeout).await
    }

    /// kube-apiserver's and the API proxy's controls: [`ApiServerControl::stop`] / `start`,
    /// `freeze(Freeze::All | Freeze::Established)` / `thaw`, `reset`.
    pub fn api(&self) -> ApiServerControl {
        self.shared.api.clone()
    }

    /// The fate of every VMI so far (see [`crate::ledger`]).
    pub async fn ledger(&self) -> LedgerReport {
        let entries = crate::timeline::audit_entries(&self.control_plane);
        let power_offs = self.shared.power_offs().await;
        match &self.ledger {
            Some(l) => l.report(&entries, &power_offs),
            None => LedgerReport::default(),
        }
    }

    /// Tears down in order and reports what could not be removed.
    pub async fn shutdown(mut self) -> Result<(), BedError> {
        self.ctl.take();
        self.ledger.take();
        let Bed {
            kubevirt,
            kubelet,
            logind,
            shared,
            control_plane,
            ..
        } = self;
        kubevirt.shutdown().await?;
        drop(kubelet);
        drop(logind);
        drop(shared);
        control_plane.shutdown().await?;
        Ok(())
    }
}

/// One node of a running bed that runs a logind.
pub struct BedNode<'a> {
    bed: &'a Bed,
    name: String,
    logind: Arc<RwLock<NodeLogind>>,
}

impl BedNode<'_> {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's logind (lock it to reach systemd-only operations).
    pub fn logind(&self) -> &Arc<RwLock<NodeLogind>> {
        &self.logind
    }

    pub async fn bus_address(&self) -> String {
        self.logind.read().await.bus_address()
    }

    pub async fn pod_bus_address(&self) -> String {
        self.logind.read().await.pod_bus_address()
    }

    pub async fn boot_id(&self) -> String {
        self.logind.read().await.boot_id()
    }

    /// The variables a pod on this node gets besides `DBUS_SYSTEM_BUS_ADDRESS` (which the pod
    /// command sets): `KUBECONFIG` (through the API proxy), `TESTBED_NODE`, `TESTBED_POWEROFF`,
    /// `TESTBED_REBOOT`, `TESTBED_WAIT_POWEROFF` (this node's), `TESTBED_CTL` (any ctl request
    /// as arguments), `TESTBED_CTL_PORT`, and `PATH` with the bed's `kubectl`.
    pub fn pod_env(&self) -> Vec<(String, String)> {
        let ctl = self.bed.ctl();
        let script = |verb: &str| ctl.node_script(&self.name, verb).display().to_string();
        let path = format!(
            "{}:{}",
            crate::paths::bin_dir().display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        vec![
            (
                "KUBECONFIG".into(),
                self.bed.kubeconfig_path().display().to_string(),
            ),
            ("TESTBED_NODE".into(), self.name.clone()),
            ("TESTBED_POWEROFF".into(), script("poweroff")),
            ("TESTBED_REBOOT".into(), script("reboot")),
            ("TESTBED_WAIT_POWEROFF".into(), script("wait-poweroff")),
            ("TESTBED_CTL".into(), ctl.ctl_script().display().to_string()),
            ("TESTBED_CTL_PORT".into(), ctl.port().to_string()),
            ("PATH".into(), path),
        ]
    }

    /// A command that runs `program` as a pod on this node, with [`pod_env`](Self::pod_env).
    pub async fn pod_command(&self, program: &str, args: &[&str]) -> tokio::process::Command {
        let mut cmd = self.logind.read().await.pod_command(program, args);
        cmd.envs(self.pod_env());
        cmd
    }

    /// Starts `spec` as a pod on this node and keeps track of it, so faults can name it
    /// (`testbed fault kill NODE`); dropping the [`Pod`] kills it.
    pub async fn spawn_pod(&self, spec: PodSpec) -> Result<Pod, BedError> {
        let args: Vec<&str> = spec.args.iter().map(String::as_str).collect();
        let cmd = self.pod_command(&spec.program, &args).await;
        Ok(Pod::spawn(cmd, &spec, &self.name, &self.bed.shared.pods)?)
    }

    pub async fn poweroff(&self) -> Result<(), BedError> {
        Ok(self.logind.read().await.poweroff().await?)
    }

    pub async fn wait_poweroff(&self, timeout: Duration) -> Result<SystemTime, BedError> {
        Ok(self.logind.read().await.wait_poweroff(timeout).await?)
    }

    /// Reboots the node (systemd only), boots it again with a new boot ID and has the kubelet
    /// simulator report that ID.
    pub async fn reboot(&self, timeout: Duration) -> Result<NodeExit, BedError> {
        let mut logind = self.logind.write().await;
        let node = logind.systemd().ok_or_else(|| {
            BedError::Unsupported(format!(
                "reboot of {}: it runs elogind; use a systemd node",
                self.name
            ))
        })?;
        let exit = node.reboot_and_wait(timeout).await?;
        let boot_id = crate::logind::LogindNode::boot_id(node);
        drop(logind);
        self.bed.kubelet.set_boot_id(&self.name, &boot_id).await?;
        Ok(exit)
    }

    pub async fn list_inhibitors(&self) -> Result<Vec<Inhibitor>, BedError> {
        Ok(self.logind.read().await.list_inhibitors().await?)
    }

    pub async fn set_inhibit_delay_max(&self, secs: u64) -> Result<Duration, BedError> {
        Ok(self.logind.read().await.set_inhibit_delay_max(secs).await?)
    }

    pub async fn inhibit_delay_max(&self) -> Result<Duration, BedError> {
        Ok(self.logind.read().await.inhibit_delay_max().await?)
    }

    /// Arms a watch for the release of `who`'s lock (see [`ReleaseWatch`]); arm it before
    /// the release can happen.
    pub async fn watch_release(&self, who: &str, timeout: Duration) -> ReleaseWatch {
        self.logind.read().await.watch_release(who, timeout)
    }

    /// Watches the node's logind until no lock of `who` is held any more (or logind is gone
    /// with the node), for at most `timeout`: logind's inhibitor state file every 0.5 ms,
    /// `ListInhibitors` every 2 ms where there is none. The release happened between the two
    /// moments returned.
    pub async fn observe_release(&self, who: &str, timeout: Duration) -> Option<Release> {
        self.watch_release(who, timeout).await.wait().await
    }

    /// Restarts logind (systemd: `systemctl restart systemd-logind`; elogind: stopped and
    /// started again) and returns once it is on the bus.
    pub async fn restart_logind(&self) -> Result<(), BedError> {
        self.bed.shared.restart_logind(&self.name).await
    }

    /// Restarts the node's system bus and logind with it.
    pub async fn restart_bus(&self) -> Result<(), BedError> {
        self.bed.shared.restart_bus(&self.name).await
    }

    /// Masks a unit until the node's next boot (systemd only; e.g. `poweroff.target`).
    pub async fn mask_unit(&self, unit: &str) -> Result<(), BedError> {
        self.bed.shared.mask_unit(&self.name, unit, true).await
    }

    pub async fn unmask_unit(&self, unit: &str) -> Result<(), BedError> {
        self.bed.shared.mask_unit(&self.name, unit, false).await
    }

    /// Every moment this node powered off or rebooted so far.
    pub async fn power_offs(&self) -> Vec<SystemTime> {
        self.logind.read().await.power_offs()
    }

    /// Signals the program of every pod the bed started on this node.
    pub async fn kill_pods(&self, signal: Signal) -> Result<String, BedError> {
        self.bed.shared.kill_pods(&self.name, signal).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf() -> std::io::Error {
        std::io::Error::other("the leaf cause")
    }

    #[test]
    fn an_error_chain_shows_each_cause_once() {
        let errors: Vec<BedError> = vec![
            ControlPlaneError::Io {
                what: "starting etcd".into(),
                source: leaf(),
            }
            .into(),
            KubeletError::Api {
                action: "renewing a lease".into(),
                source: kube::Error::ReadEvents(leaf()),
            }
            .into(),
            KubeVirtError::Io(leaf()).into(),
            LogindError::Io {
                context: "booting node-1".into(),
                source: leaf(),
            }
            .into(),
            PodError::Io {
                what: "spawning a pod".into(),
                source: leaf(),
            }
            .into(),
            BedError::Io {
                what: "binding the ctl port".into(),
                error: leaf(),
            },
        ];
        for e in errors {
            let shown = e.to_string();
            let chain = format!("{:#}", anyhow::Error::new(e).context("starting the bed"));
            assert!(shown.contains("the leaf cause"), "{shown}");
            assert_eq!(chain.matches("the leaf cause").count(), 1, "{chain}");
        }
    }

    #[test]
    fn kubevirt_status_names_the_webhook_and_what_is_still_to_fail() {
        let mut failures = crate::kubevirt::FailureInjection::default();
        assert_eq!(
            kubevirt_status(WebhookFault::None, &failures),
            "KubeVirt eviction webhook up; migration faults: none"
        );
        failures.per_vmi.insert("default/live-1".into(), 2);
        failures.per_vmi.insert("default/live-2".into(), 0);
        failures.stalls.insert("default/live-3".into(), 1);
        failures.probability = 0.5;
        assert_eq!(
            kubevirt_status(WebhookFault::Slow(Duration::from_millis(2500)), &failures),
            "KubeVirt eviction webhook slow (2.5 s); migration faults: fail default/live-1 ×2, \
             stall default/live-3 ×1, failure probability 0.5"
        );
        assert_eq!(
            kubevirt_status(WebhookFault::Down, &Default::default()),
            "KubeVirt eviction webhook down; migration faults: none"
        );
    }
}
