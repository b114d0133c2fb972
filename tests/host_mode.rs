//! Host mode end to end: the agent installed on node-1 itself as a systemd service
//! (`systemd/shutdown-guard.service`, the `logind.conf.d` drop-in and the environment file),
//! guarding that node's own `systemctl poweroff`.
//!
//! node-1 is a real systemd (257 from Debian 13, and 252 from Debian 12) booted as PID 1 of its
//! own namespaces, network namespace included; its loopback is not the machine's, where the API
//! server listens. The test opens a listener on node-1's own `127.0.0.1:<API server port>` (a
//! socket created in node-1's network namespace by a thread that joined it) and forwards each
//! connection to the machine's loopback, so the unchanged kubeconfig (`https://127.0.0.1:<port>`,
//! the serving certificate's address) works inside the node as it would on a real host.

mod common;

use common::{AGENT, WHO, guard_lock, init_tracing, server_write_before};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use kube::Api;
use kube::api::PostParams;
use testbed::bed::{Bed, BedOptions, LogindKind, NODE};
use testbed::kubevirt::KubeVirtOptions;
use testbed::timeline::{Change, Recorder, audit_entries};

/// The identity the host-mode agent uses: a client certificate, bound to the shipped ClusterRole.
const HOST_USER: &str = "shutdown-guard-host:node-1";
/// `InhibitDelayMaxSec` in `systemd/logind.conf.d/99-shutdown-guard.conf`.
const DROPIN_DELAY: Duration = Duration::from_secs(305);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs `args` inside node-1 (all its namespaces) and returns (success, stdout + stderr).
async fn in_node(pid: u32, args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("nsenter")
            .arg(format!("--target={pid}"))
            .args(["--all", "--"])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{args:?} in node-1 took over 60 s"))
    .expect("nsenter runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Copies `from` to `rel` under node-1's root (through `/proc/<pid>/root`, so the write goes
/// through the node's overlay like any write on its disk).
fn install(pid: u32, from: &Path, rel: &str, mode: u32) {
    let to = PathBuf::from(format!("/proc/{pid}/root")).join(rel.trim_start_matches('/'));
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, &to)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A TCP listener on `addr` inside the network namespace of process `pid`. A thread joins that
/// namespace only to create the socket (a socket stays in the namespace it was made in) and
/// then ends, so no other thread of the test ever leaves the machine's namespace.
fn listen_in_netns(pid: u32, addr: std::net::SocketAddr) -> std::net::TcpListener {
    std::thread::spawn(move || -> std::io::Result<std::net::TcpListener> {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        std::net::TcpListener::bind(addr)
    })
    .join()
    .expect("the namespace thread ran")
    .unwrap_or_else(|e| panic!("listening on {addr} in node-1's network namespace: {e}"))
}

/// Forwards every connection accepted in node-1 to `target` on the machine's loopback.
fn forward(
    listener: std::net::TcpListener,
    target: std::net::SocketAddr,
) -> tokio::task::JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut inside, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if let Ok(mut outside) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inside, &mut outside).await;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unit_guards_the_nodes_own_poweroff() {
    host_mode(LogindKind::Systemd).await;
}

/// The same on systemd 252 (Debian 12), whose sandboxing options are older.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unit_guards_the_nodes_own_poweroff_on_systemd_252() {
    host_mode(LogindKind::SystemdBookworm).await;
}

async fn host_mode(logind: LogindKind) {
    init_tracing();
    let bed = Bed::start(BedOptions {
        logind,
        vms: "live=2".parse().unwrap(),
        // No bed drop-in: the only InhibitDelayMaxSec is the shipped one.
        inhibit_delay_max_secs: None,
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs(2),
            shutdown_duration: Duration::from_secs(1),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await
    .expect("the bed starts");
    let admin = bed.client();
    let pid = {
        let logind = bed.logind.read().await;
        logind.systemd_ref().expect("a systemd node").pid()
    };

    // The shipped ClusterRole, bound to the host agent's own identity.
    let out = tokio::process::Command::from(bed.control_plane.kubectl())
        .args(["apply", "--server-side", "-k"])
        .arg(repo("manifests"))
        .output()
        .await
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(
            &PostParams::default(),
            &ClusterRoleBinding {
                metadata: kube::api::ObjectMeta {
                    name: Some("shutdown-guard-host".into()),
                    ..Default::default()
                },
                role_ref: RoleRef {
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    kind: "ClusterRole".into(),
                    name: "shutdown-guard".into(),
                },
                subjects: Some(vec![Subject {
                    kind: "User".into(),
                    name: HOST_USER.into(),
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    namespace: None,
                }]),
            },
        )
        .await
        .expect("binding created");
    let kubeconfig = bed
        .control_plane
        .user_kubeconfig("shutdown-guard-host", HOST_USER, &[])
        .expect("kubeconfig");

    // node-1 reaches the API server at the kubeconfig's own address (the bed's API proxy).
    let api: std::net::SocketAddr = bed
        .control_plane
        .client_url()
        .trim_start_matches("https://")
        .parse()
        .expect("https://127.0.0.1:<port>");
    let forwarder = forward(listen_in_netns(pid, api), api);

    // Install as an administrator would (systemd/shutdown-guard.service's header).
    install(
        pid,
        Path::new(AGENT),
        "/usr/local/bin/shutdown-guard",
        0o755,
    );
    install(
        pid,
        &repo("systemd/shutdown-guard.service"),
        "/etc/systemd/system/shutdown-guard.service",
        0o644,
    );
    install(
        pid,
        &repo("systemd/shutdown-guard.env"),
        "/etc/shutdown-guard/shutdown-guard.env",
        0o600,
    );
    install(pid, &kubeconfig, "/etc/shutdown-guard/kubeconfig", 0o600);
    install(
        pid,
        &repo("systemd/logind.conf.d/99-shutdown-guard.conf"),
        "/etc/systemd/logind.conf.d/99-shutdown-guard.conf",
        0o644,
    );

    let (ok, text) = in_node(
        pid,
        &[
            "systemd-analyze",
            "verify",
            "/etc/systemd/system/shutdown-guard.service",
        ],
    )
    .await;
    assert!(ok, "systemd-analyze verify failed:\n{text}");
    assert!(
        !text.contains("shutdown-guard.service:"),
        "systemd-analyze verify has remarks on the unit:\n{text}"
    );

    // logind picks the drop-in up on SIGHUP; read the effective value back.
    let (ok, text) = in_node(
        pid,
        &[
            "systemctl",
            "kill",
            "--signal=HUP",
            "systemd-logind.service",
        ],
    )
    .await;
    assert!(ok, "{text}");
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let delay = bed
            .logind
            .read()
            .await
            .inhibit_delay_max()
            .await
            .expect("InhibitDelayMaxUSec");
        if delay == DROPIN_DELAY {
            break;
        }
        assert!(
            Instant::now() < end,
            "InhibitDelayMaxUSec is {delay:?}, want {DROPIN_DELAY:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for args in [
        &["systemctl", "daemon-reload"][..],
        &["systemctl", "enable", "--now", "shutdown-guard.service"],
    ] {
        let (ok, text) = in_node(pid, args).await;
        assert!(ok, "{args:?}: {text}");
    }
    let journal = || async move {
        in_node(
            pid,
            &[
                "journalctl",
                "--no-pager",
                "-o",
                "cat",
                "-u",
                "shutdown-guard.service",
            ],
        )
        .await
        .1
    };

    // The lock is the service's: logind's holder PID is the unit's main PID.
    let end = Instant::now() + Duration::from_secs(30);
    let held = loop {
        if let Some(i) = guard_lock(&bed).await {
            break i;
        }
        if Instant::now() >= end {
            panic!("no lock within 30 s; journal:\n{}", journal().await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (_, main_pid) = in_node(
        pid,
        &[
            "systemctl",
            "show",
            "--property=MainPID",
            "--value",
            "shutdown-guard.service",
        ],
    )
    .await;
    assert_eq!(
        held.pid.to_string(),
        main_pid.trim(),
        "the lock holder is the service's main process"
    );
    assert_eq!(held.uid, 0);
    let (_, cgroup) = in_node(pid, &["cat", &format!("/proc/{}/cgroup", held.pid)]).await;
    assert!(
        cgroup.contains("/system.slice/shutdown-guard.service"),
        "{cgroup}"
    );
    let (_, caps) = in_node(
        pid,
        &[
            "grep",
            "-E",
            "^Cap(Eff|Prm|Bnd)|^NoNewPrivs",
            &format!("/proc/{}/status", held.pid),
        ],
    )
    .await;
    // The holder keeps exactly CAP_SETGID and CAP_SETUID (bits 6 and 7), to start the worker as
    // nobody; the worker, which talks to the API server, has none and is not root.
    for line in caps.lines().filter(|l| l.starts_with("Cap")) {
        assert!(
            line.ends_with("00000000000000c0"),
            "the holder has more than CAP_SETGID and CAP_SETUID: {caps}"
        );
    }
    let (_, children) = in_node(
        pid,
        &["cat", &format!("/proc/{0}/task/{0}/children", held.pid)],
    )
    .await;
    let worker = children
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("the holder started no worker: {children:?}"))
        .to_string();
    let (_, status) = in_node(
        pid,
        &[
            "grep",
            "-E",
            "^(Uid|Gid|CapEff|CapPrm|NoNewPrivs)",
            &format!("/proc/{worker}/status"),
        ],
    )
    .await;
    assert!(
        status.contains("Uid:\t65534\t65534\t65534\t65534")
            && status.contains("CapEff:\t0000000000000000")
            && status.contains("CapPrm:\t0000000000000000")
            && status.contains("NoNewPrivs:\t1"),
        "the worker runs as nobody without capabilities: {status}"
    );

    // Wait until the agent has read its Node (it cordons only what it has seen), then power off.
    let recorder = Recorder::start(admin.clone(), NODE).await;
    let end = Instant::now() + Duration::from_secs(30);
    while !journal().await.contains("node cordon") {
        assert!(
            Instant::now() < end,
            "the agent never reached the API server; journal:\n{}",
            journal().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let journal_before = journal().await;

    let requested = SystemTime::now();
    let (ok, text) = in_node(pid, &["systemctl", "poweroff"]).await;
    assert!(ok, "systemctl poweroff: {text}");
    let released = bed
        .observe_release(WHO, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| {
            panic!("lock held for 60 s; journal before the power-off:\n{journal_before}")
        });
    let powered_off = bed
        .wait_poweroff(Duration::from_secs(60))
        .await
        .expect("node-1 powers off");

    let cordoned = recorder
        .first(|c| *c == Change::Cordoned)
        .expect("node-1 was cordoned");
    assert!(
        cordoned >= requested && cordoned <= released.gone,
        "cordoned during the drain"
    );
    let departures = recorder.departures();
    let entries = audit_entries(&bed.control_plane);
    for vmi in ["default/live-1", "default/live-2"] {
        match departures.get(vmi) {
            Some((at, Change::Migrated { target, .. })) => {
                assert_ne!(target, NODE);
                let left = server_write_before(&entries, vmi, *at).unwrap_or(*at);
                assert!(
                    left <= released.gone,
                    "{vmi} migrated after the lock was released: left (server) {left:?}, seen {at:?}, \
                     lock listed until {:?}, gone at {:?}; journal before the power-off:\n{journal_before}",
                    released.last_held,
                    released.gone
                );
            }
            other => panic!("{vmi} did not migrate: {other:?}"),
        }
    }
    assert!(recorder.vmis_on_node().is_empty(), "VMIs left on node-1");
    assert!(
        released.last_held <= powered_off,
        "node-1 powered off before the lock was released"
    );
    // Independent of the agent: no VM was still on node-1 when it powered off.
    let ledger = bed.ledger().await;
    assert!(ledger.lost().is_empty(), "VMs lost:\n{ledger}");
    assert!(
        powered_off
            .duration_since(released.gone)
            .unwrap_or_default()
            < Duration::from_secs(5),
        "the power-off did not follow the release"
    );

    forwarder.abort();
    drop(recorder);
    bed.shutdown().await.expect("the bed stops");
}
