//! The whole bed in one handle: control plane, simulated kubelets and KubeVirt, and node-1's
//! real logind, wired together the way a cluster is.
//!
//! A process that runs "as a pod on node-1" ([`Bed::pod_command`]) lives in a child PID
//! namespace of node-1's logind and cannot see the machine's PIDs, so it cannot `nsenter` the
//! node. The power commands it is given (`TESTBED_POWEROFF`, …) therefore ask the bed over
//! loopback ([`ctl`](crate::ctl)); the bed performs them from the machine's side.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kube::Client;
use tokio::sync::RwLock;

use crate::controlplane::{ControlPlane, ControlPlaneError, ControlPlaneOptions};
use crate::kubelet::{KubeletError, KubeletSim, NodeConfig, node_names};
use crate::kubevirt::{KubeVirtError, KubeVirtOptions, KubeVirtSim, VmSpec};
use crate::logind::{
    Elogind, ElogindOptions, Inhibitor, LogindError, LogindNode, NodeExit, Suite, SystemdNode,
    SystemdOptions,
};

/// The node the agent under test guards.
pub const NODE: &str = "node-1";
/// Namespace the bed's VMIs live in.
pub const VM_NAMESPACE: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum BedError {
    #[error("control plane: {0}")]
    ControlPlane(#[from] ControlPlaneError),
    #[error("kubelet simulator: {0}")]
    Kubelet(#[from] KubeletError),
    #[error("KubeVirt simulator: {0}")]
    KubeVirt(#[from] KubeVirtError),
    #[error("logind: {0}")]
    Logind(#[from] LogindError),
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Which logind node-1 runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogindKind {
    /// systemd 257 (Debian trixie) as PID 1 of a namespace container.
    #[default]
    Systemd,
    /// systemd 252 (Debian bookworm).
    SystemdBookworm,
    /// elogind 246 on a private bus.
    Elogind,
}

impl std::str::FromStr for LogindKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "systemd" | "systemd-trixie" => Ok(Self::Systemd),
            "systemd-bookworm" => Ok(Self::SystemdBookworm),
            "elogind" => Ok(Self::Elogind),
            other => Err(format!(
                "unknown logind {other:?}: use systemd, systemd-bookworm or elogind"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BedOptions {
    /// Nodes `node-1` … `node-N` (at least 2, so VMIs have somewhere to migrate).
    pub nodes: usize,
    /// VMIs created on node-1.
    pub vms: VmSpec,
    pub logind: LogindKind,
    pub kubevirt: KubeVirtOptions,
    /// logind's `InhibitDelayMaxSec` on node-1 (None: logind's default, 5 s).
    pub inhibit_delay_max_secs: Option<u64>,
    pub control_plane: ControlPlaneOptions,
}

impl Default for BedOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            vms: VmSpec::default(),
            logind: LogindKind::default(),
            kubevirt: KubeVirtOptions::default(),
            inhibit_delay_max_secs: None,
            control_plane: ControlPlaneOptions::default(),
        }
    }
}

/// When a lock went away, as seen from outside logind: it was listed at `last_held` (the
/// moment the last query that still listed it was sent) and no more at `gone`.
#[derive(Clone, Copy, Debug)]
pub struct Release {
    pub last_held: SystemTime,
    pub gone: SystemTime,
}

/// node-1's logind, whichever flavour.
pub enum NodeLogind {
    Systemd(SystemdNode),
    Elogind(Elogind),
}

macro_rules! delegate {
    ($self:ident, $n:ident => $e:expr) => {
        match $self {
            NodeLogind::Systemd($n) => $e,
            NodeLogind::Elogind($n) => $e,
        }
    };
}

impl NodeLogind {
    pub fn bus_address(&self) -> String {
        delegate!(self, n => n.bus_address())
    }
    pub fn pod_bus_address(&self) -> String {
        delegate!(self, n => n.pod_bus_address())
    }
    pub fn boot_id(&self) -> String {
        delegate!(self, n => n.boot_id())
    }
    pub fn pod_command(&self, program: &str, args: &[&str]) -> tokio::process::Command {
        delegate!(self, n => n.pod_command(program, args))
    }
    pub async fn poweroff(&self) -> Result<(), LogindError> {
        delegate!(self, n => n.poweroff().await)
    }
    pub async fn wait_poweroff(&self, timeout: Duration) -> Result<SystemTime, LogindError> {
        delegate!(self, n => n.wait_poweroff(timeout).await)
    }
    pub async fn set_inhibit_delay_max(&self, secs: u64) -> Result<Duration, LogindError> {
        delegate!(self, n => n.set_inhibit_delay_max(secs).await)
    }
    pub async fn inhibit_delay_max(&self) -> Result<Duration, LogindError> {
        delegate!(self, n => n.inhibit_delay_max().await)
    }
    pub async fn list_inhibitors(&self) -> Result<Vec<Inhibitor>, LogindError> {
        delegate!(self, n => n.list_inhibitors().await)
    }
    pub fn systemd(&mut self) -> Option<&mut SystemdNode> {
        match self {
            NodeLogind::Systemd(n) => Some(n),
            NodeLogind::Elogind(_) => None,
        }
    }
    pub fn systemd_ref(&self) -> Option<&SystemdNode> {
        match self {
            NodeLogind::Systemd(n) => Some(n),
            NodeLogind::Elogind(_) => None,
        }
    }
    pub fn memory_kib(&self) -> u64 {
        delegate!(self, n => n.memory_kib())
    }
}

async fn start_logind(opts: &BedOptions) -> Result<NodeLogind, BedError> {
    let node = match opts.logind {
        LogindKind::Systemd | LogindKind::SystemdBookworm => {
            let suite = if opts.logind == LogindKind::Systemd {
                Suite::Trixie
            } else {
                Suite::Bookworm
            };
            NodeLogind::Systemd(SystemdNode::boot(SystemdOptions::new(NODE, suite)).await?)
        }
        LogindKind::Elogind => NodeLogind::Elogind(
            Elogind::start(ElogindOptions {
                inhibit_delay_max_secs: opts.inhibit_delay_max_secs.unwrap_or(5),
                ..ElogindOptions::default()
            })
            .await?,
        ),
    };
    if let (Some(secs), NodeLogind::Systemd(_)) = (opts.inhibit_delay_max_secs, &node) {
        node.set_inhibit_delay_max(secs).await?;
    }
    Ok(node)
}

/// A running bed. Dropping it tears everything down by PID (also during a panic); prefer
/// [`Bed::shutdown`] where the caller can await.
pub struct Bed {
    // Field order is drop order: simulators first, then logind, then the control plane.
    ctl: Option<crate::ctl::CtlServer>,
    pub kubevirt: KubeVirtSim,
    pub kubelet: KubeletSim,
    pub logind: Arc<RwLock<NodeLogind>>,
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
        // The control plane and the logind container are independent; start both at once.
        let (cp, logind) = tokio::join!(
            ControlPlane::start(opts.control_plane.clone()),
            start_logind(&opts)
        );
        let control_plane = cp?;
        let logind = logind?;
        let client = control_plane.client().await?;

        let nodes = node_names(opts.nodes);
        let configs = nodes
            .iter()
            .map(|name| {
                let mut node = NodeConfig::new(name.clone());
                // A real kubelet reports the kernel's boot ID; node-1's is its container boot's.
                if name == NODE {
                    node.boot_id = logind.boot_id();
                }
                node
            })
            .collect();
        let kubelet = KubeletSim::spawn(client.clone(), configs).await?;
        let kubevirt =
            KubeVirtSim::spawn(client.clone(), kubelet.workloads(), opts.kubevirt.clone()).await?;
        if opts.vms.total() > 0 {
            kubevirt.create_vmis(VM_NAMESPACE, NODE, &opts.vms).await?;
        }
        let mut bed = Self {
            ctl: None,
            kubevirt,
            kubelet,
            logind: Arc::new(RwLock::new(logind)),
            control_plane,
            client,
            started_in: began.elapsed(),
            nodes,
        };
        bed.ctl = Some(crate::ctl::CtlServer::start(
            bed.control_plane.dir(),
            &bed.logind,
        )?);
        Ok(bed)
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn kubeconfig_path(&self) -> &Path {
        self.control_plane.kubeconfig_path()
    }

    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    pub fn kubectl_path() -> PathBuf {
        crate::paths::bin_dir().join("kubectl")
    }

    /// The variables a pod on node-1 gets (`DBUS_SYSTEM_BUS_ADDRESS` comes from the logind's
    /// pod command itself).
    pub fn pod_env(&self) -> Vec<(String, String)> {
        let ctl = self
            .ctl
            .as_ref()
            .expect("ctl server runs while the bed does");
        let script = |verb: &str| ctl.script(verb).display().to_string();
        let path = format!(
            "{}:{}",
            crate::paths::bin_dir().display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        vec![
            (
                "KUBECONFIG".into(),
                self.kubeconfig_path().display().to_string(),
            ),
            ("TESTBED_NODE".into(), NODE.into()),
            ("TESTBED_POWEROFF".into(), script("poweroff")),
            ("TESTBED_REBOOT".into(), script("reboot")),
            ("TESTBED_WAIT_POWEROFF".into(), script("wait-poweroff")),
            ("TESTBED_CTL_PORT".into(), ctl.port().to_string()),
            ("PATH".into(), path),
        ]
    }

    /// A command that runs `program` as a pod on node-1 runs (see [`LogindNode::pod_command`]),
    /// with [`Bed::pod_env`] set.
    pub async fn pod_command(&self, program: &str, args: &[&str]) -> tokio::process::Command {
        let mut cmd = self.logind.read().await.pod_command(program, args);
        cmd.envs(self.pod_env());
        cmd
    }

    /// Starts node-1's power-off, as an administrator would.
    pub async fn poweroff(&self) -> Result<(), BedError> {
        Ok(self.logind.read().await.poweroff().await?)
    }

    /// When node-1 powered off (systemd reached `Shutting down.`; elogind ran its power command).
    pub async fn wait_poweroff(&self, timeout: Duration) -> Result<SystemTime, BedError> {
        Ok(self.logind.read().await.wait_poweroff(timeout).await?)
    }

    pub async fn list_inhibitors(&self) -> Result<Vec<Inhibitor>, BedError> {
        Ok(self.logind.read().await.list_inhibitors().await?)
    }

    /// Watches logind's inhibitor list from logind's side until no lock of `who` is listed any
    /// more (or logind is gone with the node), polling every 5 ms for at most `timeout`.
    /// logind announces no inhibitor changes on the bus, so polling is the only outside view;
    /// the release happened between the two moments returned.
    pub async fn observe_release(&self, who: &str, timeout: Duration) -> Option<Release> {
        let end = Instant::now() + timeout;
        let mut last_held = SystemTime::now();
        while Instant::now() < end {
            let asked = SystemTime::now();
            match self.list_inhibitors().await {
                Ok(list) if list.iter().any(|i| i.who == who) => last_held = asked,
                _ => {
                    return Some(Release {
                        last_held,
                        gone: SystemTime::now(),
                    });
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }

    /// Reboots node-1 (systemd only) and boots it again with a new boot ID, which the kubelet
    /// simulator then reports as a restarted kubelet would.
    pub async fn reboot_node(&mut self, timeout: Duration) -> Result<NodeExit, BedError> {
        let mut logind = self.logind.write().await;
        let node = logind
            .systemd()
            .ok_or_else(|| BedError::Invalid("reboot needs --logind systemd".into()))?;
        let exit = node.reboot_and_wait(timeout).await?;
        let boot_id = node.boot_id();
        drop(logind);
        self.kubelet.set_boot_id(NODE, &boot_id).await?;
        Ok(exit)
    }

    /// Tears down in order and reports what could not be removed.
    pub async fn shutdown(mut self) -> Result<(), BedError> {
        self.ctl.take();
        let Bed {
            kubevirt,
            kubelet,
            logind,
            control_plane,
            ..
        } = self;
        kubevirt.shutdown().await?;
        drop(kubelet);
        drop(logind);
        control_plane.shutdown().await?;
        Ok(())
    }
}
