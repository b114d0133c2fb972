//! The do-it-yourself protection many clusters run instead of an agent: a systemd unit whose
//! `ExecStop` runs `kubectl drain` with the seed's flags, ordered after kubelet and the
//! network so that at shutdown it stops (drains) before them, bounded by `TimeoutStopSec`.
//! It runs on the node's real systemd, inside the node: systemd kills it at its timeout and
//! then powers off, whatever is left.
//!
//! The bed's nodes have a network namespace of their own with only loopback; the bench gives
//! node-1 its route to the API server as a listener on the node's `127.0.0.1:6443`, made inside
//! that namespace and served from the machine's side, so it stays up through the node's whole
//! shutdown as a host's network does for the units ordered before it.

use std::path::{Path, PathBuf};

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::{TcpListener, TcpStream};

use super::KUBECTL_DRAIN_FLAGS;
use crate::bed::Bed;

pub const UNIT: &str = "kubectl-drain-on-shutdown.service";
/// Where the API server is, as seen from inside the node.
pub const NODE_API_PORT: u16 = 6443;
const KUBECONFIG_IN_NODE: &str = "/etc/kubernetes/drain-hook.kubeconfig";

/// The hook unit as an administrator writes it.
pub fn hook_unit(node: &str, timeout: Duration) -> String {
    format!(
        "[Unit]\n\
         Description=Drain this node with kubectl before it shuts down\n\
         # Stopped before kubelet and the network, so the drain runs while both still work.\n\
         After=network-online.target kubelet.service\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         Environment=HOME=/root\n\
         ExecStart=/bin/true\n\
         ExecStop=/usr/local/bin/kubectl --kubeconfig={KUBECONFIG_IN_NODE} drain {node} {}\n\
         TimeoutStopSec={}\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        KUBECTL_DRAIN_FLAGS.join(" "),
        timeout.as_secs()
    )
}

/// A TCP listener on `addr` inside the network namespace of process `pid`: a thread joins
/// that namespace only to make the socket (a socket stays where it was made) and ends, so no
/// other thread ever leaves the machine's namespace.
fn listen_in_netns(pid: u32, addr: std::net::SocketAddr) -> Result<std::net::TcpListener> {
    std::thread::spawn(move || -> std::io::Result<std::net::TcpListener> {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    .with_context(|| format!("listening on {addr} in the network of pid {pid}"))
}

/// Forwards each connection on the node's listener to the API server.
struct ApiBridge {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiBridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiBridge {
    fn start(listener: std::net::TcpListener, api: String) -> Result<Self> {
        let listener = TcpListener::from_std(listener)?;
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inner, _)) = listener.accept().await {
                let api = api.clone();
                conns.spawn(async move {
                    let _ = inner.set_nodelay(true);
                    if let Ok(mut outer) = TcpStream::connect(&api).await {
                        let _ = outer.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inner, &mut outer).await;
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Self { task })
    }
}

/// The hook installed and started on a node for its current boot; dropping it stops the
/// bench's end of the node's route to the API server.
pub struct Hook {
    _bridge: ApiBridge,
}

/// `host:port` of a `https://host:port` URL.
fn authority(url: &str) -> Result<String> {
    let rest = url
        .strip_prefix("https://")
        .with_context(|| format!("{url} is not an https URL"))?;
    Ok(rest.trim_end_matches('/').to_owned())
}

/// Installs the hook (kubectl, its kubeconfig, the units) into `node`'s running boot and
/// starts it, as `systemctl enable --now` would. `kubeconfig` names the user it drains as;
/// its server is rewritten to the node's view of the API server. Checks the route with a
/// `kubectl get node` from inside the node.
pub async fn install(bed: &Bed, node: &str, kubeconfig: &Path, timeout: Duration) -> Result<Hook> {
    let handle = bed.node(node)?;
    let pid = {
        let l = handle.logind().read().await;
        let Some(systemd) = l.systemd_ref() else {
            bail!("the drain hook is a systemd unit: {node} must run systemd, not elogind");
        };
        systemd.pid()
    };
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let kubectl = root.join("usr/local/bin/kubectl");
    let want = std::fs::metadata(Bed::kubectl_path())
        .context("the bed's kubectl")?
        .len();
    if std::fs::metadata(&kubectl).map(|m| m.len()).ok() != Some(want) {
        std::fs::create_dir_all(kubectl.parent().expect("has a parent"))?;
        std::fs::copy(Bed::kubectl_path(), &kubectl).context("copying kubectl into the node")?;
    }
    let api = authority(&bed.control_plane.client_url())?;
    let text = std::fs::read_to_string(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?
        .replace(
            &format!("server: https://{api}"),
            &format!("server: https://127.0.0.1:{NODE_API_PORT}"),
        );
    let kc = root.join(KUBECONFIG_IN_NODE.trim_start_matches('/'));
    std::fs::create_dir_all(kc.parent().expect("has a parent"))?;
    std::fs::write(&kc, text).context("writing the hook's kubeconfig")?;
    let units = root.join("run/systemd/system");
    std::fs::create_dir_all(&units)?;
    std::fs::write(units.join(UNIT), hook_unit(node, timeout))?;
    let bridge = ApiBridge::start(
        listen_in_netns(pid, ([127, 0, 0, 1], NODE_API_PORT).into())?,
        api,
    )?;
    let l = handle.logind().read().await;
    let systemd = l.systemd_ref().expect("checked above");
    systemd.systemctl(&["daemon-reload"]).await?;
    systemd.systemctl(&["start", UNIT]).await?;
    // A transient unit, so the check runs in the node's network as the hook will (a plain
    // exec would share the machine's).
    let seen = systemd
        .exec(
            "systemd-run",
            &[
                "--wait",
                "--pipe",
                "--quiet",
                "--property=Environment=HOME=/root",
                "/usr/local/bin/kubectl",
                &format!("--kubeconfig={KUBECONFIG_IN_NODE}"),
                "get",
                "node",
                node,
                "-o",
                "name",
            ],
        )
        .await
        .context("kubectl inside the node cannot reach the API server")?;
    if seen.trim() != format!("node/{node}") {
        bail!("kubectl inside the node answered {seen:?}");
    }
    Ok(Hook { _bridge: bridge })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_drains_with_the_seed_flags_before_kubelet_stops() {
        let u = hook_unit("node-1", Duration::from_secs(300));
        assert!(u.contains(
            "ExecStop=/usr/local/bin/kubectl --kubeconfig=/etc/kubernetes/drain-hook.kubeconfig drain node-1 --delete-emptydir-data --ignore-daemonsets --force --pod-selector=kubevirt.io=virt-launcher"
        ));
        assert!(u.contains("TimeoutStopSec=300"));
        let after = u.lines().find(|l| l.starts_with("After=")).unwrap();
        assert!(after.contains("kubelet.service") && after.contains("network-online.target"));
    }

    #[test]
    fn the_api_authority_comes_from_its_url() {
        assert_eq!(
            authority("https://127.0.0.1:41234").unwrap(),
            "127.0.0.1:41234"
        );
        assert!(authority("http://x").is_err());
    }
}
