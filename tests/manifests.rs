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
use common::{AGENT, WHO, guard_lock, init_tracing, poll_guard_lock};
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
    // The token goes to the worker alone, through its own projected volume.
    assert_eq!(pod.automount_service_account_token, Some(false));
    let worker_token = pod.containers[0]
        .volume_mounts
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|m| m.mount_path == "/var/run/secrets/kubernetes.io/serviceaccount")
        .expect("the worker mounts the API token");
    assert_eq!(worker_token.name, "api-access");
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
        "/nodes:list",
        "/nodes/status:patch",
        "/pods:list",
        "/pods:watch",
        "/pods:delete",
        "/pods/eviction:create",
        "kubevirt.io/virtualmachineinstances:list",
        "kubevirt.io/virtualmachineinstances:watch",
        "kubevirt.io/virtualmachineinstances:get",
        "kubevirt.io/virtualmachineinstances:delete",
        "kubevirt.io/virtualmachines:get",
        "kubevirt.io/virtualmachines:list",
        "kubevirt.io/virtualmachines:patch",
        "subresources.kubevirt.io/virtualmachines/stop:update",
        "subresources.kubevirt.io/virtualmachines/start:update",
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
        let got = poll_guard_lock(&bed, Duration::from_secs(5)).await;
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

/// What the agent's identity may write, with the DaemonSet pod's token on node-1, against the
/// real API server and the installed policies: the cordon, its annotations and its condition
/// on node-1, and nothing else of any Node; evictions of launcher pods only, and of those on
/// any node (the residual risk docs/security.md states: KubeVirt answers with an evacuation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_identity_changes_only_what_a_shutdown_needs() {
    use k8s_openapi::api::core::v1::{Node, Pod};
    use kube::api::{DeleteParams, EvictParams, Patch, PatchParams, PostParams};
    use serde_json::json;
    use testbed::controlplane::Credentials;
    use testbed::kubevirt::{VirtualMachineInstance, VirtualMachineInstanceMigration};

    init_tracing();
    let bed = Bed::start(BedOptions {
        vms: "node-2:live=1".parse().unwrap(),
        ..BedOptions::default()
    })
    .await
    .expect("the bed starts");
    apply_manifests(&bed.control_plane).await;
    let admin = bed.client();
    let pod = identity::daemonset_pod(&admin, NS, NODE).await;
    // The pod as admission made it: API credentials in the worker only, none in the holder.
    let spec = pod.spec.clone().expect("pod spec");
    let token_mounts = |c: &k8s_openapi::api::core::v1::Container| {
        c.volume_mounts
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.mount_path.starts_with("/var/run/secrets/kubernetes.io"))
            .map(|m| m.name)
            .collect::<Vec<_>>()
    };
    let holder = spec
        .init_containers
        .as_ref()
        .and_then(|cs| cs.iter().find(|c| c.name == "holder"))
        .expect("the holder");
    assert_eq!(
        token_mounts(holder),
        Vec::<String>::new(),
        "the holder has a token"
    );
    let worker_mounts = token_mounts(&spec.containers[0]);
    assert_eq!(worker_mounts, vec!["api-access".to_owned()]);
    let api_access = spec
        .volumes
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.name == "api-access")
        .and_then(|v| v.projected)
        .expect("a projected api-access volume");
    assert!(
        api_access
            .sources
            .unwrap_or_default()
            .iter()
            .any(|s| s.service_account_token.is_some()),
        "api-access carries the ServiceAccount token"
    );
    let token = identity::sa_token(&admin, NS, SA, Some(&pod)).await;
    let kubeconfig = bed
        .control_plane
        .write_kubeconfig(
            "shutdown-guard-least",
            &format!("system:serviceaccount:{NS}:{SA}"),
            &Credentials::Token(token),
        )
        .expect("kubeconfig");
    // The agent's own client (no retry of 429s, which would turn KubeVirt's answer into a
    // wait for the migration).
    let agent = shutdown_guard::kube::client(Some(&kubeconfig))
        .await
        .expect("client");
    // Pre-drain turns: Leases in the agent's namespace, taken and given back; none elsewhere.
    let turns =
        shutdown_guard::kube::turns::Turns::new(Api::namespaced(agent.clone(), NS), NODE, 1);
    let turn = turns
        .try_take()
        .await
        .expect("a turn in the agent's namespace");
    assert_eq!(turn.as_deref(), Some("shutdown-guard-turn-0"));
    turns
        .give_back("shutdown-guard-turn-0")
        .await
        .expect("given back");
    let elsewhere = shutdown_guard::kube::turns::Turns::new(
        Api::namespaced(agent.clone(), "kube-node-lease"),
        NODE,
        1,
    );
    let err = elsewhere
        .try_take()
        .await
        .expect_err("a Lease outside its namespace");
    assert_eq!(identity::api_code(&err), Some(403), "{err}");
    let nodes: Api<Node> = Api::all(agent.clone());
    let merge = |v: serde_json::Value| Patch::Merge(v);
    let pp = PatchParams::default();

    // A freshly created policy takes a moment to be enforced: wait for its first refusal.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let r = nodes
            .patch(
                "node-2",
                &pp,
                &merge(json!({"spec": {"unschedulable": true}})),
            )
            .await;
        if r.is_err() {
            break;
        }
        assert!(
            Instant::now() < end,
            "the own-node policy never refused node-2"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = Api::<Node>::all(admin.clone())
        .patch(
            "node-2",
            &pp,
            &merge(json!({"spec": {"unschedulable": null}})),
        )
        .await;

    // Power events: it announces its own node's shutdown, and no other's.
    let leases = Api::namespaced(agent.clone(), NS);
    shutdown_guard::kube::power::announce(&leases, NODE, Duration::from_secs(5))
        .await
        .expect("its own announcement");
    shutdown_guard::kube::power::withdraw(&leases, NODE)
        .await
        .expect("withdrawn");
    let err = shutdown_guard::kube::power::announce(&leases, "node-2", Duration::from_secs(5))
        .await
        .expect_err("another node's announcement");
    assert!(err.contains("may announce only its own shutdown"), "{err}");

    // Allowed on node-1: what a shutdown needs, as src/kube/cordon.rs and condition.rs write it.
    let mark = "shutdown-guard.kubevirt.io/cordoned-boot-id";
    nodes
        .patch(
            NODE,
            &pp,
            &merge(
                json!({"spec": {"unschedulable": true}, "metadata": {"annotations": {mark: "b"}}}),
            ),
        )
        .await
        .expect("cordon and its mark");
    nodes
        .patch_status(
            NODE,
            &pp,
            &Patch::Strategic(json!({"status": {"conditions": [{
                "type": "ShutdownGuard", "status": "True", "reason": "Draining",
                "message": "test", "lastTransitionTime": chrono::Utc::now()}]}})),
        )
        .await
        .expect("its own condition");
    nodes
        .patch(
            NODE,
            &pp,
            &merge(json!({"metadata": {"annotations": {
                "status.shutdown-guard.kubevirt.io/last-shutdown": "{}"}}})),
        )
        .await
        .expect("the last shutdown's record");
    nodes
        .patch(
            NODE,
            &pp,
            &merge(
                json!({"spec": {"unschedulable": null}, "metadata": {"annotations": {mark: null}}}),
            ),
        )
        .await
        .expect("uncordon and unmark");
    nodes
        .patch(
            NODE,
            &pp,
            &merge(json!({"spec": {"taints": [{
                "key": "shutdown-guard.kubevirt.io/reboot-pending", "effect": "PreferNoSchedule"}]}})),
        )
        .await
        .expect("its own PreferNoSchedule taint");
    nodes
        .patch(NODE, &pp, &merge(json!({"spec": {"taints": null}})))
        .await
        .expect("its own taint removed");

    // Refused on node-1: everything else, each with a message that says why.
    let refused = |what: &'static str, want: &'static str, r: Result<Node, kube::Error>| {
        let err = r.expect_err(what);
        assert_eq!(identity::api_code(&err), Some(403), "{what}: {err}");
        let msg = identity::api_message(&err);
        assert!(msg.contains(want), "{what}: {msg}");
    };
    refused(
        "a label",
        "not its labels",
        nodes
            .patch(
                NODE,
                &pp,
                &merge(json!({"metadata": {"labels": {"evil": "x"}}})),
            )
            .await,
    );
    refused(
        "another annotation",
        "only its own annotations",
        nodes
            .patch(
                NODE,
                &pp,
                &merge(json!({"metadata": {"annotations": {"node.alpha.kubernetes.io/ttl": "1"}}})),
            )
            .await,
    );
    refused(
        "a taint",
        "not other taints",
        nodes
            .patch(
                NODE,
                &pp,
                &merge(json!({"spec": {"taints": [{"key": "evil", "effect": "NoSchedule"}]}})),
            )
            .await,
    );
    refused(
        "its own key, NoSchedule",
        "only PreferNoSchedule",
        nodes
            .patch(
                NODE,
                &pp,
                &merge(json!({"spec": {"taints": [{
                    "key": "shutdown-guard.kubevirt.io/reboot-pending", "effect": "NoSchedule"}]}})),
            )
            .await,
    );
    refused(
        "the provider ID",
        "not other taints or the rest of its spec",
        nodes
            .patch(
                NODE,
                &pp,
                &merge(json!({"spec": {"providerID": "evil://x"}})),
            )
            .await,
    );
    refused(
        "allocatable",
        "not kubelet's conditions, capacity, allocatable",
        nodes
            .patch_status(
                NODE,
                &pp,
                &merge(json!({"status": {"allocatable": {"pods": "1000"}}})),
            )
            .await,
    );
    refused(
        "kubelet's Ready condition",
        "only its own condition",
        nodes
            .patch_status(
                NODE,
                &pp,
                &Patch::Strategic(json!({"status": {"conditions": [{
                    "type": "Ready", "status": "False", "reason": "Evil", "message": "x"}]}})),
            )
            .await,
    );
    refused(
        "an address",
        "only its own condition",
        nodes
            .patch_status(
                NODE,
                &pp,
                &merge(json!({"status": {"addresses": [{"type": "InternalIP", "address": "10.9.9.9"}]}})),
            )
            .await,
    );
    // Another Node: nothing at all, not even a cordon.
    refused(
        "cordoning node-2",
        "may not change Node node-2",
        nodes
            .patch(
                "node-2",
                &pp,
                &merge(json!({"spec": {"unschedulable": true}})),
            )
            .await,
    );
    let node1 = Api::<Node>::all(admin.clone()).get(NODE).await.unwrap();
    assert!(
        !node1
            .metadata
            .labels
            .unwrap_or_default()
            .contains_key("evil")
            && node1
                .spec
                .and_then(|s| s.taints)
                .unwrap_or_default()
                .is_empty(),
        "a refused change landed"
    );

    // Evictions: a pod that is not a launcher, on any node, is refused.
    let other = identity::daemonset_pod(&admin, NS, "node-2").await;
    let dry = EvictParams {
        delete_options: Some(DeleteParams {
            dry_run: true,
            ..Default::default()
        }),
        post_options: PostParams {
            dry_run: true,
            ..Default::default()
        },
    };
    let err = Api::<Pod>::namespaced(agent.clone(), NS)
        .evict(other.metadata.name.as_deref().unwrap(), &dry)
        .await
        .expect_err("evicting a pod that is not a launcher is refused");
    assert_eq!(identity::api_code(&err), Some(403), "{err}");
    assert!(
        identity::api_message(&err).contains("evicts only virt-launcher pods"),
        "{err}"
    );
    // The residual risk, measured: a launcher pod on node-2 can be evicted, and KubeVirt
    // answers as it answers any drain: it marks the VMI for evacuation (a live migration).
    let launchers = Api::<Pod>::namespaced(admin.clone(), "default")
        .list(
            &kube::api::ListParams::default()
                .labels("kubevirt.io=virt-launcher")
                .fields("spec.nodeName=node-2"),
        )
        .await
        .unwrap()
        .items;
    let launcher = launchers.first().expect("a launcher pod on node-2");
    let err = Api::<Pod>::namespaced(agent.clone(), "default")
        .evict(
            launcher.metadata.name.as_deref().unwrap(),
            &EvictParams::default(),
        )
        .await
        .expect_err("KubeVirt answers 429");
    assert_eq!(identity::api_code(&err), Some(429), "{err}");
    let vmi = Api::<VirtualMachineInstance>::namespaced(admin.clone(), "default")
        .get("live-1")
        .await
        .unwrap();
    assert_eq!(vmi.evacuation_node_name(), Some("node-2"));
    // And nothing more there: no pod write, no VMI or migration write.
    let err = Api::<Pod>::namespaced(agent.clone(), "default")
        .patch(
            launcher.metadata.name.as_deref().unwrap(),
            &pp,
            &merge(json!({"metadata": {"labels": {"evil": "x"}}})),
        )
        .await
        .expect_err("patching a pod is refused");
    assert_eq!(identity::api_code(&err), Some(403), "{err}");
    let err = Api::<VirtualMachineInstance>::namespaced(agent.clone(), "default")
        .delete("live-1", &DeleteParams::default())
        .await
        .expect_err("deleting a VMI on another node is refused");
    assert_eq!(identity::api_code(&err), Some(403), "{err}");
    assert!(
        err.to_string().contains("which is not on its node"),
        "refused by the own-node policy (RBAC allows a power event's delete): {err}"
    );
    let err = Api::<VirtualMachineInstanceMigration>::namespaced(agent.clone(), "default")
        .create(
            &PostParams::default(),
            &testbed::kubevirt::evacuation::new_migration(&vmi, "node-2", false),
        )
        .await
        .expect_err("creating a migration is refused");
    assert_eq!(identity::api_code(&err), Some(403), "{err}");

    // A host-mode identity (docs/operator-guide.md) is held to its node the same way.
    let host_kc = bed
        .control_plane
        .user_kubeconfig(
            "shutdown-guard-host-node-1",
            "shutdown-guard-host:node-1",
            &[],
        )
        .expect("a host-mode kubeconfig");
    let binding: k8s_openapi::api::rbac::v1::ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "shutdown-guard-host-node-1"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "shutdown-guard"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                      "name": "shutdown-guard-host:node-1"}],
    }))
    .unwrap();
    Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .expect("the host identity's binding");
    let host = shutdown_guard::kube::client(Some(&host_kc))
        .await
        .expect("host client");
    let host_nodes: Api<Node> = Api::all(host.clone());
    host_nodes
        .patch(
            NODE,
            &pp,
            &merge(
                json!({"spec": {"unschedulable": true}, "metadata": {"annotations": {mark: "h"}}}),
            ),
        )
        .await
        .expect("the host identity cordons its node");
    refused(
        "a label by the host identity",
        "not its labels",
        host_nodes
            .patch(
                NODE,
                &pp,
                &merge(json!({"metadata": {"labels": {"evil": "x"}}})),
            )
            .await,
    );
    refused(
        "node-2 by the host identity",
        "may not change Node node-2",
        host_nodes
            .patch(
                "node-2",
                &pp,
                &merge(json!({"spec": {"unschedulable": true}})),
            )
            .await,
    );

    bed.shutdown().await.expect("the bed stops");
}

/// Runs `args` inside node `pid` (all its namespaces: its own tools and its /run/dbus, as a pod
/// with the hostPath reaches them) as `uid` (its own group, no other groups) or uid 0, without
/// any capability; returns (success, stdout + stderr).
async fn in_node_as(pid: u32, uid: Option<u32>, args: &[&str]) -> (bool, String) {
    let mut all: Vec<String> = vec![format!("--target={pid}"), "--all".into(), "--".into()];
    all.push("setpriv".into());
    if let Some(uid) = uid {
        all.extend([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
        ]);
    }
    all.extend(DROP_ALL.iter().map(|s| s.to_string()));
    all.extend(args.iter().map(|s| s.to_string()));
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("nsenter")
            .args(&all)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("an answer within 30 s")
    .expect("nsenter runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

const LOGIN1: [&str; 3] = [
    "org.freedesktop.login1",
    "/org/freedesktop/login1",
    "org.freedesktop.login1.Manager",
];
const SYSTEMD1: [&str; 3] = [
    "org.freedesktop.systemd1",
    "/org/freedesktop/systemd1",
    "org.freedesktop.systemd1.Manager",
];

/// `busctl call` arguments for `method` of `to` with `sig` and its arguments.
fn bus_call<'a>(to: [&'a str; 3], method: &'a str, sig: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "busctl",
        "--system",
        "--timeout=10",
        "call",
        to[0],
        to[1],
        to[2],
        method,
    ];
    v.extend(sig);
    v
}

/// A transient service running /bin/true: what systemd would run as root for the caller.
const TRANSIENT_TRUE: [&str; 12] = [
    "ssa(sv)a(sa(sv))",
    "shutdown-guard-probe.service",
    "fail",
    "1",
    "ExecStart",
    "a(sasb)",
    "1",
    "/bin/true",
    "1",
    "/bin/true",
    "false",
    "0",
];

fn refused(out: &str) -> bool {
    out.contains("Access denied")
        || out.contains("Interactive authentication required")
        || out.contains("Permission denied")
}

/// The worker's uid (65534, no capabilities) on node-1's real system bus: logind's Inhibit and
/// PowerOff and systemd's KillUnit and StartTransientUnit are all refused (no polkit on the
/// node, and a non-root uid), while the holder (uid 0 without capabilities) takes the lock and
/// lets it go. In the DaemonSet the worker's container has no bus socket at all; this is what
/// the uid could do even if it reached one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_uid_is_refused_on_the_system_bus_and_the_holder_is_not() {
    init_tracing();
    let bed = Bed::start(BedOptions::default())
        .await
        .expect("the bed starts");
    let pid = {
        let logind = bed.logind.read().await;
        logind.systemd_ref().expect("a systemd node").pid()
    };
    const WORKER: Option<u32> = Some(65534);
    // Reading is allowed: the uid reaches the bus, so the refusals below are decisions.
    let (read, out) = in_node_as(
        pid,
        WORKER,
        &[
            "busctl",
            "--system",
            "get-property",
            LOGIN1[0],
            LOGIN1[1],
            LOGIN1[2],
            "InhibitDelayMaxUSec",
        ],
    )
    .await;
    assert!(read, "uid 65534 cannot read logind's properties: {out}");
    let calls: [(&str, [&str; 3], &[&str]); 4] = [
        (
            "Inhibit",
            LOGIN1,
            &["ssss", "shutdown", "evil", "test", "delay"],
        ),
        ("PowerOff", LOGIN1, &["b", "false"]),
        (
            "KillUnit",
            SYSTEMD1,
            &["ssi", "systemd-logind.service", "all", "15"],
        ),
        ("StartTransientUnit", SYSTEMD1, &TRANSIENT_TRUE),
    ];
    for (method, to, sig) in calls {
        let (ok, out) = in_node_as(pid, WORKER, &bus_call(to, method, sig)).await;
        assert!(!ok, "uid 65534 may call {method}: {out}");
        assert!(
            refused(&out),
            "{method} failed, but not as a refusal: {out}"
        );
        eprintln!("{method} as uid 65534: {}", out.trim());
    }
    // The same StartTransientUnit from uid 0 without capabilities (the holder's identity) is
    // carried out: the call is well formed, and the holder is host root through systemd, the
    // residual risk docs/security.md states.
    let (ok, out) = in_node_as(
        pid,
        None,
        &bus_call(SYSTEMD1, "StartTransientUnit", &TRANSIENT_TRUE),
    )
    .await;
    assert!(
        ok,
        "uid 0 without capabilities could not start a unit: {out}"
    );
    assert!(out.contains("/org/freedesktop/systemd1/job/"), "{out}");
    assert!(
        guard_lock(&bed).await.is_none()
            && bed
                .list_inhibitors()
                .await
                .unwrap()
                .iter()
                .all(|i| i.who != "evil"),
        "a refused Inhibit left a lock"
    );
    let _ = bed.observe_release("evil", Duration::from_secs(1)).await;

    // The holder, as the DaemonSet runs it, takes the lock and lets it go with its process.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("holder.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut args: Vec<&str> = DROP_ALL.to_vec();
    let kc = bed.kubeconfig_path().display().to_string();
    args.extend([AGENT, "run", "--node", NODE, "--kubeconfig", &kc]);
    let mut holder = bed
        .pod_command("setpriv", &args)
        .await
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .expect("the holder starts");
    let got = poll_guard_lock(&bed, Duration::from_secs(10)).await;
    assert_eq!(
        got.map(|i| i.uid),
        Some(0),
        "the holder got no lock: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let _ = holder.kill().await;
    let _ = holder.wait().await;
    assert!(
        bed.observe_release(WHO, Duration::from_secs(5))
            .await
            .is_some(),
        "the holder's lock outlived it"
    );
    bed.shutdown().await.expect("the bed stops");
}

/// Pod Security on the real API server: the DaemonSet's pod meets no level stricter than
/// `privileged`, and only because of its one hostPath volume (the host's bus folder): under
/// `baseline` that is the single violation, so `privileged`, enforced on the namespace, is the
/// strictest level it can run under; there its pod is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_namespace_enforces_the_strictest_pod_security_level_the_daemonset_meets() {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use kube::api::PostParams;

    init_tracing();
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane starts");
    apply_manifests(&cp).await;
    let client = cp.client().await.expect("admin client");
    let ns = Api::<Namespace>::all(client.clone())
        .get(NS)
        .await
        .expect("the namespace");
    let labels = ns.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("privileged")
    );
    let template = Api::<DaemonSet>::namespaced(client.clone(), NS)
        .get("shutdown-guard")
        .await
        .expect("the DaemonSet")
        .spec
        .expect("spec")
        .template;
    let pod_in = |ns: &str| Pod {
        metadata: kube::api::ObjectMeta {
            name: Some("pss-probe".into()),
            namespace: Some(ns.into()),
            labels: template.metadata.as_ref().and_then(|m| m.labels.clone()),
            ..Default::default()
        },
        spec: template.spec.clone(),
        ..Default::default()
    };
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    Api::<Pod>::namespaced(client.clone(), NS)
        .create(&dry, &pod_in(NS))
        .await
        .expect("the DaemonSet's pod is admitted in its namespace");

    for (level, want) in [
        ("baseline", vec!["hostPath volumes"]),
        ("restricted", vec!["hostPath", "runAsNonRoot != true"]),
    ] {
        let name = format!("pss-{level}");
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": level}},
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("a namespace");
        let sa: k8s_openapi::api::core::v1::ServiceAccount =
            serde_json::from_value(serde_json::json!({"metadata": {"name": SA}})).unwrap();
        Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &name)
            .create(&PostParams::default(), &sa)
            .await
            .expect("a ServiceAccount");
        let err = Api::<Pod>::namespaced(client.clone(), &name)
            .create(&dry, &pod_in(&name))
            .await
            .expect_err("refused");
        let msg = match &err {
            kube::Error::Api(s) => s.message.clone(),
            other => other.to_string(),
        };
        assert!(msg.contains("violates PodSecurity"), "{level}: {msg}");
        for w in &want {
            assert!(msg.contains(w), "{level}: {msg}");
        }
        if level == "baseline" {
            // Nothing but the bus folder stands between the pod and baseline.
            let violations = msg
                .split_once("latest\": ")
                .map_or(msg.as_str(), |(_, v)| v);
            assert!(
                violations.starts_with("hostPath volumes") && !violations.contains("), "),
                "baseline refuses more than hostPath: {msg}"
            );
        }
        eprintln!("{level}: {msg}");
    }
    cp.shutdown().await.expect("control plane stops");
}

/// The non-root holder on a node with polkitd (Debian trixie's polkitd) and the shipped rule
/// (`systemd/polkit/50-shutdown-guard.rules`): the holder, as the node's system user
/// `shutdown-guard` without capabilities, takes and releases the delay lock; the same uid may do
/// nothing else on the bus, not even what polkit's defaults let any uid do (an idle lock). One
/// thing follows from the lock itself: logind's policy says a delay lock on shutdown implies one
/// on sleep (`imply`), which polkit grants whatever a rule says; it delays a suspend, no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_root_holder_gets_the_lock_where_polkit_runs_and_nothing_else() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use testbed::bed::LogindKind;

    init_tracing();
    let bed = Bed::start(BedOptions {
        logind: LogindKind::SystemdPolkit,
        ..BedOptions::default()
    })
    .await
    .expect("the bed starts");
    let pid = {
        let logind = bed.logind.read().await;
        logind.systemd_ref().expect("a systemd node").pid()
    };
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    const UID: u32 = 64010;
    let holder_uid = Some(UID);
    // The system user the rule names, as `useradd --system` would add it.
    for (file, line) in [
        (
            "etc/passwd",
            format!("shutdown-guard:x:{UID}:{UID}:shutdown-guard:/nonexistent:/usr/sbin/nologin\n"),
        ),
        ("etc/group", format!("shutdown-guard:x:{UID}:\n")),
    ] {
        std::fs::OpenOptions::new()
            .append(true)
            .open(root.join(file))
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    let idle_block = bus_call(
        LOGIN1,
        "Inhibit",
        &["ssss", "idle", "probe", "test", "block"],
    );

    // polkit's defaults alone: logind's policy lets any uid block idleness.
    let (ok, out) = in_node_as(pid, holder_uid, &idle_block).await;
    assert!(
        ok,
        "without the rule, polkit's default should allow an idle lock: {out}"
    );

    // The rule: polkitd reloads its rules when the folder changes.
    let rules = root.join("etc/polkit-1/rules.d/50-shutdown-guard.rules");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/polkit/50-shutdown-guard.rules"),
        &rules,
    )
    .expect("installing the rule");
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out) = in_node_as(pid, holder_uid, &idle_block).await;
        if !ok && refused(&out) {
            break;
        }
        if Instant::now() >= end {
            let (_, journal) = in_node_as(
                pid,
                None,
                &["journalctl", "--no-pager", "-u", "polkit", "-n", "40"],
            )
            .await;
            panic!("the rule never took effect: {out}; polkitd's journal:\n{journal}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The holder as that user: the agent's binary on the node, the worker's socket in /tmp.
    let bin = root.join("usr/local/bin/shutdown-guard");
    std::fs::copy(AGENT, &bin).expect("the binary on the node");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("holder.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut args: Vec<String> = vec![format!("--target={pid}"), "--all".into(), "--".into()];
    args.extend(
        // nsenter forks into the node's PID namespace; the parent death signal (set after the
        // uid change, which clears an earlier one) ends the holder with the test's nsenter.
        [
            "setpriv",
            "--pdeathsig=KILL",
            &format!("--reuid={UID}"),
            &format!("--regid={UID}"),
            "--clear-groups",
        ]
        .iter()
        .chain(DROP_ALL)
        .map(|s| s.to_string()),
    );
    args.extend(
        [
            "/usr/local/bin/shutdown-guard",
            "run",
            "--node",
            NODE,
            "--log-format",
            "json",
            "--link-socket",
            "/tmp/shutdown-guard-link.sock",
            "--state-dir",
            "/tmp",
        ]
        .map(String::from),
    );
    let mut holder = tokio::process::Command::new("nsenter")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .expect("the holder starts");
    let got = poll_guard_lock(&bed, Duration::from_secs(15)).await;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        got.as_ref().map(|i| (i.uid, i.mode.as_str())),
        Some((UID, "delay")),
        "the non-root holder got no delay lock: {}",
        log_text()
    );

    // Everything else, refused for that uid.
    let calls: [(&str, [&str; 3], &[&str]); 5] = [
        (
            "Inhibit (idle, block)",
            LOGIN1,
            &["ssss", "idle", "evil", "test", "block"],
        ),
        (
            "Inhibit (shutdown, block)",
            LOGIN1,
            &["ssss", "shutdown", "evil", "test", "block"],
        ),
        ("PowerOff", LOGIN1, &["b", "false"]),
        (
            "KillUnit",
            SYSTEMD1,
            &["ssi", "systemd-logind.service", "all", "15"],
        ),
        ("StartTransientUnit", SYSTEMD1, &TRANSIENT_TRUE),
    ];
    for (what, to, sig) in calls {
        let method = what.split(' ').next().unwrap();
        let (ok, out) = in_node_as(pid, holder_uid, &bus_call(to, method, sig)).await;
        assert!(!ok && refused(&out), "uid {UID}: {what}: {out}");
        eprintln!("{what} as the non-root holder's uid: {}", out.trim());
    }

    let _ = holder.kill().await;
    let _ = holder.wait().await;
    assert!(
        bed.observe_release(WHO, Duration::from_secs(5))
            .await
            .is_some(),
        "the non-root holder's lock outlived it: {}",
        log_text()
    );
    bed.shutdown().await.expect("the bed stops");
}
