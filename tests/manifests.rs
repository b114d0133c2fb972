//! The shipped manifests (`manifests/`, kustomize) on the test bed's real API server.
//!
//! - They apply server-side, and the DaemonSet's pod spec is what the agent needs.
//! - The agent, running with the DaemonSet ServiceAccount's pod-bound token under the shipped
//!   RBAC and the same security context (uid 0, every capability dropped, no privilege
//!   escalation), drains node-1 through a real power-off: the RBAC is sufficient.
//! - With that token, patching another Node and deleting another node's pod are refused by the
//!   ValidatingAdmissionPolicy, reading Secrets by RBAC, and a token without a node is refused
//!   whatever it asks.
//! - Why the image runs as uid 0: logind refuses a non-root uid without polkit, and the bus
//!   drops a uid it cannot resolve; uid 0 without capabilities gets its lock.

mod common;

use common::identity::{self, DROP_ALL};
use common::{AGENT, WHO, guard_lock, init_tracing};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::Api;
use testbed::bed::{Bed, BedOptions, NODE};
use testbed::controlplane::{ControlPlane, ControlPlaneOptions};

const NS: &str = "shutdown-guard";
const SA: &str = "shutdown-guard";

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

/// `kubectl apply --server-side -k manifests/` with the bed's kubectl (kustomize built in).
async fn apply_manifests(cp: &ControlPlane) {
    let out = tokio::process::Command::from(cp.kubectl())
        .args([
            "apply",
            "--server-side",
            "--field-manager=shutdown-guard-test",
            "-k",
        ])
        .arg(manifests_dir())
        .stdin(Stdio::null())
        .output()
        .await
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl apply --server-side -k manifests/ failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_apply_server_side_and_the_daemonset_is_what_the_agent_needs() {
    init_tracing();
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane starts");
    apply_manifests(&cp).await;
    // Applying again changes nothing and conflicts with nothing (one field manager).
    apply_manifests(&cp).await;
    let client = cp.client().await.expect("admin client");

    let ds = Api::<DaemonSet>::namespaced(client.clone(), NS)
        .get("shutdown-guard")
        .await
        .expect("the DaemonSet exists");
    let spec = ds.spec.expect("spec");
    let ru = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .expect("a rolling update");
    assert_eq!(
        spec.update_strategy.as_ref().unwrap().type_.as_deref(),
        Some("RollingUpdate")
    );
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(ru.max_surge, Some(IntOrString::Int(1)), "maxSurge 1");
    assert_eq!(
        ru.max_unavailable,
        Some(IntOrString::Int(0)),
        "maxUnavailable 0"
    );

    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some(SA));
    assert_ne!(pod.automount_service_account_token, Some(false));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_ne!(pod.host_network, Some(true), "no host network");
    assert_ne!(pod.host_pid, Some(true), "no host PID namespace");
    let tolerations = pod.tolerations.clone().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "a toleration of every taint (operator Exists, no key, no effect): {tolerations:?}"
    );

    // The only host path is the host's D-Bus socket folder, read-only.
    let volumes = pod.volumes.clone().unwrap_or_default();
    let host_paths: Vec<_> = volumes
        .iter()
        .filter_map(|v| v.host_path.as_ref().map(|h| (v.name.clone(), h.clone())))
        .collect();
    assert_eq!(host_paths.len(), 1, "exactly one hostPath: {host_paths:?}");
    let (bus_volume, bus) = &host_paths[0];
    assert_eq!(bus.path, "/run/dbus");
    assert_eq!(bus.type_.as_deref(), Some("Directory"));

    // Two containers: the lock holder (a restartable init container, the only one with the
    // bus) and the drain worker, which talks to the API server.
    assert_eq!(pod.containers.len(), 1);
    let inits = pod.init_containers.clone().unwrap_or_default();
    assert_eq!(inits.len(), 1, "one init container: the holder");
    let holder = &inits[0];
    let c = &pod.containers[0];
    assert_eq!(
        holder.restart_policy.as_deref(),
        Some("Always"),
        "the holder runs beside the worker (a sidecar), started first"
    );
    let mounts =
        |c: &k8s_openapi::api::core::v1::Container| c.volume_mounts.clone().unwrap_or_default();
    let bus_mount = mounts(holder)
        .into_iter()
        .find(|m| &m.name == bus_volume)
        .expect("the bus folder is mounted");
    assert_eq!(bus_mount.mount_path, "/run/dbus");
    assert_eq!(bus_mount.read_only, Some(true));
    assert!(
        !mounts(c).iter().any(|m| &m.name == bus_volume),
        "the worker never sees the system bus"
    );
    let env_of = |c: &k8s_openapi::api::core::v1::Container| c.env.clone().unwrap_or_default();
    for container in [holder, c] {
        let node_name = env_of(container)
            .into_iter()
            .find(|e| e.name == "NODE_NAME")
            .expect("NODE_NAME is set");
        assert_eq!(
            node_name
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("spec.nodeName"),
            "NODE_NAME from the downward API"
        );
    }
    let bus_addr = env_of(holder)
        .into_iter()
        .find(|e| e.name == "DBUS_SYSTEM_BUS_ADDRESS")
        .and_then(|e| e.value);
    assert_eq!(
        bus_addr.as_deref(),
        Some("unix:path=/run/dbus/system_bus_socket")
    );
    // The two meet at one socket in a volume of the pod's own.
    let arg_after = |c: &k8s_openapi::api::core::v1::Container, flag: &str| {
        let args = c.args.clone().unwrap_or_default();
        let at = args.iter().position(|a| a == flag)?;
        args.get(at + 1).cloned()
    };
    assert_eq!(
        holder
            .args
            .as_ref()
            .and_then(|a| a.first())
            .map(String::as_str),
        Some("run")
    );
    assert_eq!(
        c.args.as_ref().and_then(|a| a.first()).map(String::as_str),
        Some("worker")
    );
    let socket = arg_after(holder, "--link-socket").expect("the holder's --link-socket");
    assert_eq!(arg_after(c, "--link-socket"), Some(socket.clone()));
    let link_volume = |c: &k8s_openapi::api::core::v1::Container| {
        mounts(c)
            .into_iter()
            .find(|m| Path::new(&socket).starts_with(&m.mount_path))
            .map(|m| m.name)
    };
    let shared = link_volume(holder).expect("the socket's folder is mounted in the holder");
    assert_eq!(link_volume(c), Some(shared.clone()));
    assert!(
        volumes
            .iter()
            .any(|v| v.name == shared && v.empty_dir.is_some()),
        "the socket lives in an emptyDir"
    );

    for (who, container, uid) in [("holder", holder, 0), ("worker", c, 65534)] {
        let sc = container
            .security_context
            .clone()
            .unwrap_or_else(|| panic!("{who}: securityContext"));
        assert_eq!(sc.run_as_user, Some(uid), "{who} runs as {uid}");
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{who}");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{who}");
        assert_ne!(sc.privileged, Some(true), "{who}");
        let caps = sc.capabilities.expect("capabilities");
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "{who}");
        assert!(
            caps.add.unwrap_or_default().is_empty(),
            "{who}: no capability added"
        );
        let res = container.resources.clone().expect("resources");
        for (what, m) in [("requests", &res.requests), ("limits", &res.limits)] {
            let m = m.as_ref().unwrap_or_else(|| panic!("{who}: no {what}"));
            assert!(
                m.contains_key("cpu") && m.contains_key("memory"),
                "{who} {what}: {m:?}"
            );
        }
    }
    assert_eq!(
        c.security_context.as_ref().and_then(|s| s.run_as_non_root),
        Some(true)
    );
    // A probe that fails restarts its container: the holder has none.
    assert!(holder.liveness_probe.is_none() && holder.readiness_probe.is_none());

    let port = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("http"))
        .expect("a port named http");
    assert_eq!(port.container_port, 8080);
    for (what, probe, path) in [
        ("liveness", &c.liveness_probe, "/healthz"),
        ("readiness", &c.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("no {what} httpGet probe"));
        assert_eq!(get.path.as_deref(), Some(path), "{what} probe path");
        assert_eq!(get.port, IntOrString::String("http".into()), "{what} port");
    }

    // The agent reads its settings from the generated ConfigMap; the example must load.
    let args = c.args.clone().unwrap_or_default();
    let at = args
        .iter()
        .position(|a| a == "--config")
        .expect("--config in the args");
    let config_path = Path::new(&args[at + 1]);
    let config_mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| config_path.starts_with(&m.mount_path))
        .expect("the config file's folder is mounted");
    let cm_name = volumes
        .iter()
        .find(|v| v.name == config_mount.name)
        .and_then(|v| v.config_map.as_ref())
        .map(|c| c.name.clone())
        .expect("a ConfigMap volume");
    let cm = Api::<ConfigMap>::namespaced(client.clone(), NS)
        .get(&cm_name)
        .await
        .expect("the generated ConfigMap exists");
    let file = config_path.file_name().unwrap().to_str().unwrap();
    let text = cm
        .data
        .and_then(|d| d.get(file).cloned())
        .expect("the config file in the ConfigMap");
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join(file);
    std::fs::write(&local, text).unwrap();
    let settings = shutdown_guard::config::load(&shutdown_guard::config::Sources {
        file: Some(&local),
        env: [("NODE_NAME".to_string(), "node-1".to_string())].into(),
        ..Default::default()
    })
    .expect("the example configuration loads");
    assert_eq!(settings.node, "node-1");

    // The ClusterRole is exactly what src/ uses (a change here is deliberate).
    let role = Api::<ClusterRole>::all(client.clone())
        .get("shutdown-guard")
        .await
        .expect("the ClusterRole exists");
    let mut rules: Vec<String> = role
        .rules
        .unwrap_or_default()
        .iter()
        .flat_map(|r| {
            let groups = r.api_groups.clone().unwrap_or_default();
            let resources = r.resources.clone().unwrap_or_default();
            let verbs = r.verbs.clone();
            groups.into_iter().flat_map(move |g| {
                let verbs = verbs.clone();
                resources.clone().into_iter().flat_map(move |res| {
                    let g = g.clone();
                    verbs
                        .clone()
                        .into_iter()
                        .map(move |v| format!("{g}/{res}:{v}"))
                })
            })
        })
        .collect();
    rules.sort();
    let mut want = vec![
        "/nodes:get",
        "/nodes:patch",
        "/nodes/status:patch",
        "/pods:list",
        "/pods:watch",
        "/pods:delete",
        "/pods/eviction:create",
        "kubevirt.io/virtualmachineinstances:list",
        "kubevirt.io/virtualmachineinstances:watch",
        "kubevirt.io/kubevirts:list",
        "kubevirt.io/virtualmachineinstancemigrations:list",
        "kubevirt.io/virtualmachineinstancemigrations:delete",
        "subresources.kubevirt.io/virtualmachineinstances/evacuate:update",
        "events.k8s.io/events:create",
        "events.k8s.io/events:patch",
    ];
    want.sort();
    assert_eq!(rules, want);

    cp.shutdown().await.expect("control plane stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemonset_identity_drains_its_node_and_is_refused_elsewhere() {
    init_tracing();
    let bed = Bed::start(identity::bed_options())
        .await
        .expect("the bed starts");
    apply_manifests(&bed.control_plane).await;
    identity::drains_its_node_and_is_refused_elsewhere(&bed, NS, SA).await;
    bed.shutdown().await.expect("the bed stops");
}

/// Why the image runs as uid 0: measured against node-1's real logind and dbus-daemon (no
/// polkitd on the node, like many Kubernetes hosts). uid 0 without any capability takes the
/// delay lock; a non-root uid does not (dbus-daemon drops a uid the node cannot resolve, and
/// logind refuses a known non-root uid without polkit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_uid_0_without_capabilities_gets_the_lock_on_a_node_without_polkit() {
    init_tracing();
    let bed = Bed::start(BedOptions::default())
        .await
        .expect("the bed starts");
    // The node's folder (its bus socket's parent) is private to root; let other uids through.
    {
        let logind = bed.logind.read().await;
        let node = logind.systemd_ref().expect("a systemd node");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(node.state_dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    // A kubeconfig any uid can read; the lock comes before any API call anyway.
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let kc = dir.path().join("kubeconfig");
    std::fs::copy(bed.kubeconfig_path(), &kc).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&kc, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let kc = kc.display().to_string();

    let mut outcomes = Vec::new();
    for uid in [0u32, 65534, 65532] {
        let ids = format!("{uid}");
        let mut args: Vec<&str> = vec![];
        if uid != 0 {
            args.extend(["--reuid", &ids, "--regid", &ids, "--clear-groups"]);
        }
        args.extend(DROP_ALL);
        args.extend([AGENT, "run", "--node", NODE, "--kubeconfig", &kc]);
        let log = dir.path().join(format!("agent-{uid}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut child = bed
            .pod_command("setpriv", &args)
            .await
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("the agent starts");
        // Bounded: the lock shows within a second when it can be had at all.
        let end = Instant::now() + Duration::from_secs(5);
        let mut got = None;
        while Instant::now() < end && got.is_none() {
            got = guard_lock(&bed).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill().await;
        let _ = child.wait().await;
        // The next run must not see this one's lock.
        assert!(
            bed.observe_release(WHO, Duration::from_secs(5))
                .await
                .is_some(),
            "uid {uid}'s lock outlived its process"
        );
        outcomes.push((
            uid,
            got.map(|i| i.uid),
            std::fs::read_to_string(&log).unwrap_or_default(),
        ));
    }
    let summary: Vec<String> = outcomes
        .iter()
        .map(|(uid, got, log)| {
            format!(
                "uid {uid}: lock {:?}; log tail: {}",
                got,
                log.lines().rev().take(2).collect::<Vec<_>>().join(" | ")
            )
        })
        .collect();
    assert_eq!(outcomes[0].1, Some(0), "{summary:#?}");
    assert_eq!(outcomes[1].1, None, "{summary:#?}");
    assert_eq!(outcomes[2].1, None, "{summary:#?}");
    eprintln!("{}", summary.join("\n"));
    bed.shutdown().await.expect("the bed stops");
}
