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

use common::{AGENT, WHO, guard_lock, init_tracing, server_write_before, wait_for_lock_logged};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, SelfSubjectReview, TokenRequest, TokenRequestSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use testbed::bed::{Bed, BedOptions, NODE};
use testbed::controlplane::{
    ControlPlane, ControlPlaneOptions, Credentials, client_from_kubeconfig,
};
use testbed::kubevirt::KubeVirtOptions;
use testbed::timeline::{Change, Recorder, audit_entries};

const NS: &str = "shutdown-guard";
const SA: &str = "shutdown-guard";
const SA_USER: &str = "system:serviceaccount:shutdown-guard:shutdown-guard";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

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

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
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

/// Waits (bounded) for the DaemonSet's pod on `node`, placed by the real scheduler.
async fn daemonset_pod(client: &Client, node: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let lp = ListParams::default()
        .labels("app.kubernetes.io/name=shutdown-guard")
        .fields(&format!("spec.nodeName={node}"));
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(p) = pods
            .list(&lp)
            .await
            .expect("list pods")
            .items
            .into_iter()
            .next()
        {
            return p;
        }
        assert!(
            Instant::now() < end,
            "no DaemonSet pod on {node} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A token for the agent's ServiceAccount bound to `pod`, as the kubelet projects it into the
/// pod (TokenRequest with a Pod boundObjectRef); `None` gives an unbound token.
async fn sa_token(client: &Client, pod: Option<&Pod>) -> String {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: None,
            expiration_seconds: Some(3600),
            bound_object_ref: pod.map(|p| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: p.metadata.name.clone(),
                uid: p.metadata.uid.clone(),
            }),
        }),
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .create_token_request(SA, &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .and_then(|s| s.token)
        .expect("a token")
}

/// The DaemonSet's security context for a process: uid 0, no capability in any set, no way to
/// gain privileges (`allowPrivilegeEscalation: false` is no_new_privs).
const DROP_ALL: &[&str] = &[
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--bounding-set=-all",
    "--no-new-privs",
    "--",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemonset_identity_drains_its_node_and_is_refused_elsewhere() {
    init_tracing();
    let bed = Bed::start(BedOptions {
        vms: "live=3,none=1".parse().unwrap(),
        inhibit_delay_max_secs: Some(60),
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
    apply_manifests(&bed.control_plane).await;

    // The pod the scheduler placed on node-1 for the DaemonSet; its token names node-1.
    let pod = daemonset_pod(&admin, NODE).await;
    let token = sa_token(&admin, Some(&pod)).await;
    let kubeconfig = bed
        .control_plane
        .write_kubeconfig("shutdown-guard-sa", SA_USER, &Credentials::Token(token))
        .expect("kubeconfig");
    let sa = client_from_kubeconfig(&kubeconfig)
        .await
        .expect("SA client");
    let review = Api::<SelfSubjectReview>::all(sa.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview");
    let user = review.status.and_then(|s| s.user_info).expect("user info");
    assert_eq!(user.username.as_deref(), Some(SA_USER));
    assert_eq!(
        user.extra.and_then(|e| e.get(NODE_NAME_EXTRA).cloned()),
        Some(vec![NODE.to_string()]),
        "the pod-bound token carries the pod's node"
    );

    // The agent as the DaemonSet runs it: the holder as uid 0 without capabilities, the worker
    // as 65534 without capabilities, meeting at a socket in a folder of their own; the worker
    // with the pod-bound token.
    let recorder = Recorder::start(admin.clone(), NODE).await;
    let shared = tempfile::tempdir_in(bed.control_plane.dir()).unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = shared.path().join("link.sock").display().to_string();
    let worker_kc = shared.path().join("token.kubeconfig");
    std::fs::copy(&kubeconfig, &worker_kc).unwrap();
    std::fs::set_permissions(&worker_kc, std::fs::Permissions::from_mode(0o644)).unwrap();
    let log = bed.control_plane.dir().join("agent-daemonset-identity.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut args: Vec<&str> = DROP_ALL.to_vec();
    args.extend([
        AGENT,
        "run",
        "--log-format",
        "json",
        "--link-socket",
        &socket,
        "--state-dir",
    ]);
    let state = shared.path().display().to_string();
    args.push(&state);
    let mut agent = bed
        .pod_command("setpriv", &args)
        .await
        .env("NODE_NAME", NODE)
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file.try_clone().unwrap()))
        .kill_on_drop(true)
        .spawn()
        .expect("the holder starts");
    let kc = worker_kc.display().to_string();
    // The image's binary is readable by anyone; the test's lives under root's home.
    let binary = shared.path().join("shutdown-guard");
    std::fs::copy(AGENT, &binary).unwrap();
    let binary = binary.display().to_string();
    let mut wargs: Vec<&str> = vec!["--reuid=65534", "--regid=65534", "--clear-groups"];
    wargs.extend(DROP_ALL);
    wargs.extend([
        &binary,
        "worker",
        "--log-format",
        "json",
        "--link-socket",
        &socket,
        "--kubeconfig",
        &kc,
    ]);
    let mut worker = bed
        .pod_command("setpriv", &wargs)
        .await
        .env("NODE_NAME", NODE)
        .env("KUBECONFIG", &worker_kc)
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .expect("the worker starts");
    let lock = wait_for_lock_logged(&bed, &log, Duration::from_secs(30)).await;
    assert_eq!(lock.uid, 0);
    // The agent is running for node-1 with the token before the power-off: no 403 so far.
    let requested = SystemTime::now();
    bed.poweroff().await.expect("power-off starts");
    let timeout = Duration::from_secs(60);
    let released = bed.observe_release(WHO, timeout).await.unwrap_or_else(|| {
        panic!(
            "lock still held after {timeout:?}; agent log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let powered_off = bed.wait_poweroff(timeout).await.expect("node-1 powers off");
    let agent_log = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = worker.kill().await;
    let _ = agent.kill().await;

    // A full drain: cordoned, the LiveMigrate VMIs migrated, the None VM stopped, all before
    // the lock went, and the power-off after it.
    let cordoned = recorder
        .first(|c| *c == Change::Cordoned)
        .unwrap_or_else(|| panic!("node-1 never cordoned; agent log:\n{agent_log}"));
    assert!(cordoned >= requested);
    let departures = recorder.departures();
    let entries = audit_entries(&bed.control_plane);
    for n in 1..=3 {
        let vmi = format!("default/live-{n}");
        match departures.get(&vmi) {
            Some((at, Change::Migrated { target, .. })) => {
                assert_ne!(target, NODE);
                assert!(
                    server_write_before(&entries, &vmi, *at).unwrap_or(*at) <= released.gone,
                    "{vmi} migrated after the lock was released"
                );
            }
            other => panic!("{vmi} did not migrate: {other:?}; agent log:\n{agent_log}"),
        }
    }
    match departures.get("default/none-1") {
        Some((at, Change::Stopped { .. })) => assert!(
            server_write_before(&entries, "default/none-1", *at).unwrap_or(*at) <= released.gone,
            "none-1 stopped after the lock was released"
        ),
        other => panic!("none-1 did not stop: {other:?}; agent log:\n{agent_log}"),
    }
    assert!(recorder.vmis_on_node().is_empty(), "VMIs left on node-1");
    assert!(
        powered_off >= released.last_held,
        "powered off while logind still listed the lock"
    );
    // Independent of the agent: no VM was still on node-1 when it powered off.
    let ledger = bed.ledger().await;
    assert!(ledger.lost().is_empty(), "VMs lost:\n{ledger}");

    // Everything the agent asked for as the ServiceAccount was allowed: RBAC is sufficient.
    // (Read before the refusals below, which are made with the same identity.)
    let events = bed.control_plane.audit_events().expect("audit log");
    let by_agent: Vec<_> = events
        .iter()
        .filter(|e| e.user.username == SA_USER && e.stage == "ResponseComplete")
        .collect();
    let denied: Vec<String> = by_agent
        .iter()
        .filter(|e| e.code() == Some(403) || e.code() == Some(401))
        .map(|e| {
            let name = e
                .object_ref
                .as_ref()
                .and_then(|o| o.name.clone())
                .unwrap_or_default();
            format!("{} {} {name} -> {:?}", e.verb, e.resource_path(), e.code())
        })
        .collect();
    assert!(denied.is_empty(), "the agent was refused: {denied:#?}");
    for (verb, resource) in [
        ("patch", "nodes"),
        ("create", "pods/eviction"),
        ("create", "events"),
    ] {
        assert!(
            by_agent
                .iter()
                .any(|e| e.verb == verb && e.resource_path() == resource),
            "no {verb} {resource} by {SA_USER} in the audit log"
        );
    }

    // Refused: another Node (the admission policy), another node's pod (the policy), Secrets
    // (RBAC). Checked through the API with the same token.
    let nodes: Api<Node> = Api::all(sa.clone());
    let patch = json!({"metadata": {"annotations": {"shutdown-guard.test/poke": "x"}}});
    let err = nodes
        .patch("node-2", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect_err("patching node-2 is refused");
    assert_eq!(api_code(&err), Some(403), "{err}");
    let msg = api_message(&err);
    assert!(
        msg.contains("shutdown-guard-own-node") && msg.contains("may not change Node node-2"),
        "refused by the own-node policy: {msg}"
    );
    let other_pod = daemonset_pod(&admin, "node-2").await;
    let err = Api::<Pod>::namespaced(sa.clone(), NS)
        .delete(
            other_pod.metadata.name.as_deref().unwrap(),
            &DeleteParams {
                dry_run: true,
                ..Default::default()
            },
        )
        .await
        .expect_err("deleting a pod on node-2 is refused");
    assert_eq!(api_code(&err), Some(403), "{err}");
    assert!(api_message(&err).contains("not on its node"), "{err}");
    for err in [
        Api::<Secret>::namespaced(sa.clone(), "kube-system")
            .list(&ListParams::default())
            .await
            .expect_err("listing Secrets is refused"),
        Api::<Secret>::all(sa.clone())
            .list(&ListParams::default())
            .await
            .expect_err("listing Secrets cluster-wide is refused"),
        Api::<Secret>::namespaced(sa.clone(), NS)
            .get("anything")
            .await
            .expect_err("reading a Secret is refused"),
    ] {
        assert_eq!(api_code(&err), Some(403), "{err}");
        assert!(
            api_message(&err).contains("cannot"),
            "an RBAC refusal: {err}"
        );
    }

    // A token of the same ServiceAccount that is not bound to a pod carries no node: the
    // policy fails closed, even for the agent's own Node.
    let unbound = sa_token(&admin, None).await;
    let kc = bed
        .control_plane
        .write_kubeconfig(
            "shutdown-guard-unbound",
            SA_USER,
            &Credentials::Token(unbound),
        )
        .unwrap();
    let unbound = client_from_kubeconfig(&kc).await.unwrap();
    let err = Api::<Node>::all(unbound)
        .patch(NODE, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect_err("an unbound token may not patch any Node");
    assert_eq!(api_code(&err), Some(403), "{err}");
    assert!(api_message(&err).contains("no node in this token"), "{err}");

    drop(recorder);
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
