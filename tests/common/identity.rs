//! The agent's identity as an installation gives it (kustomize or Helm), on the bed: with the
//! DaemonSet ServiceAccount's pod-bound token, under the installed RBAC and the DaemonSet's
//! security context, it drains node-1 through a real power-off, and it is refused by the
//! own-node admission policy elsewhere, by RBAC for Secrets, and everywhere without a node in
//! its token.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, SelfSubjectReview, TokenRequest, TokenRequestSpec,
};
use k8s_openapi::api::core::v1::{Node, Pod, Secret, ServiceAccount};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use testbed::bed::{Bed, BedOptions, NODE};
use testbed::controlplane::{Credentials, client_from_kubeconfig};
use testbed::kubevirt::KubeVirtOptions;
use testbed::timeline::{Change, Recorder, audit_entries};

use super::{AGENT, WHO, server_write_before, wait_for_lock_logged};

const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

pub fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

/// Waits (bounded) for the DaemonSet's pod on `node`, placed by the real scheduler.
pub async fn daemonset_pod(client: &Client, ns: &str, node: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
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
pub async fn sa_token(client: &Client, ns: &str, sa: &str, pod: Option<&Pod>) -> String {
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
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .and_then(|s| s.token)
        .expect("a token")
}

/// The DaemonSet's security context for a process: uid 0, no capability in any set, no way to
/// gain privileges (`allowPrivilegeEscalation: false` is no_new_privs).
pub const DROP_ALL: &[&str] = &[
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--bounding-set=-all",
    "--no-new-privs",
    "--",
];

/// The bed the identity check runs on: VMs to migrate and one to stop, logind waiting long
/// enough for both.
pub fn bed_options() -> BedOptions {
    BedOptions {
        vms: "live=3,none=1".parse().unwrap(),
        inhibit_delay_max_secs: Some(60),
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs(2),
            shutdown_duration: Duration::from_secs(1),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    }
}

/// The agent runs as the installation's DaemonSet would run it on node-1 (namespace `ns`,
/// ServiceAccount `sa`): it drains node-1 through a power-off with nothing refused, and the same
/// identity is refused on another Node, another node's pod, Secrets, and without a node.
pub async fn drains_its_node_and_is_refused_elsewhere(bed: &Bed, ns: &str, sa: &str) {
    let admin = bed.client();
    let sa_user = format!("system:serviceaccount:{ns}:{sa}");

    // The pod the scheduler placed on node-1 for the DaemonSet; its token names node-1.
    let pod = daemonset_pod(&admin, ns, NODE).await;
    let token = sa_token(&admin, ns, sa, Some(&pod)).await;
    let kubeconfig = bed
        .control_plane
        .write_kubeconfig(
            "shutdown-guard-sa",
            sa_user.as_str(),
            &Credentials::Token(token),
        )
        .expect("kubeconfig");
    let sa_client = client_from_kubeconfig(&kubeconfig)
        .await
        .expect("SA client");
    let review = Api::<SelfSubjectReview>::all(sa_client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview");
    let user = review.status.and_then(|s| s.user_info).expect("user info");
    assert_eq!(user.username.as_deref(), Some(sa_user.as_str()));
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
    let state = shared.path().display().to_string();
    let worker_kc = shared.path().join("token.kubeconfig");
    std::fs::copy(&kubeconfig, &worker_kc).unwrap();
    std::fs::set_permissions(&worker_kc, std::fs::Permissions::from_mode(0o644)).unwrap();
    // The image's binary is readable by anyone; the test's lives under root's home.
    let binary = shared.path().join("shutdown-guard");
    std::fs::copy(AGENT, &binary).unwrap();
    let binary = binary.display().to_string();
    let log = bed.control_plane.dir().join("agent-daemonset-identity.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut args: Vec<&str> = DROP_ALL.to_vec();
    args.extend([
        &binary,
        "run",
        "--log-format",
        "json",
        "--link-socket",
        &socket,
        "--state-dir",
        &state,
    ]);
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
        // In a pod the client's namespace is the ServiceAccount's (where the Leases are).
        .env("SHUTDOWN_GUARD_LEASE_NAMESPACE", ns)
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .expect("the worker starts");
    let lock = wait_for_lock_logged(bed, &log, Duration::from_secs(30)).await;
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

    // Everything the agent asked for as the ServiceAccount was allowed: RBAC is sufficient.
    // (Read before the refusals below, which are made with the same identity.)
    let events = bed.control_plane.audit_events().expect("audit log");
    let by_agent: Vec<_> = events
        .iter()
        .filter(|e| e.user.username == sa_user.as_str() && e.stage == "ResponseComplete")
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
            "no {verb} {resource} by {sa_user} in the audit log"
        );
    }

    // Refused: another Node (the admission policy), another node's pod (the policy), Secrets
    // (RBAC). Checked through the API with the same token.
    let nodes: Api<Node> = Api::all(sa_client.clone());
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
    let other_pod = daemonset_pod(&admin, ns, "node-2").await;
    let err = Api::<Pod>::namespaced(sa_client.clone(), ns)
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
        Api::<Secret>::namespaced(sa_client.clone(), "kube-system")
            .list(&ListParams::default())
            .await
            .expect_err("listing Secrets is refused"),
        Api::<Secret>::all(sa_client.clone())
            .list(&ListParams::default())
            .await
            .expect_err("listing Secrets cluster-wide is refused"),
        Api::<Secret>::namespaced(sa_client.clone(), ns)
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
    let unbound = sa_token(&admin, ns, sa, None).await;
    let kc = bed
        .control_plane
        .write_kubeconfig(
            "shutdown-guard-unbound",
            sa_user.as_str(),
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
}
