//! The real control plane: it starts, authenticates and authorizes, audits, runs its controllers,
//! and leaves nothing behind, also when the test holding it panics.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Node, Pod, PodSpec, ServiceAccount, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, EvictParams, ObjectMeta, Patch, PatchParams, PostParams};
use testbed::controlplane::{ControlPlane, ControlPlaneOptions, client_from_kubeconfig};
use testbed::process::pid_exists;

const NS: &str = "rbac-check";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_authorizes_audits_runs_controllers_and_tears_down() -> anyhow::Result<()> {
    let began = Instant::now();
    let plane = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let rss: Vec<_> = plane.rss_kib();
    eprintln!(
        "control plane ready in {:.1} s; RSS {} MiB total: {:?}",
        began.elapsed().as_secs_f64(),
        rss.iter().map(|(_, k)| k).sum::<u64>() / 1024,
        rss
    );
    let admin = plane.client().await?;

    let version = admin.apiserver_version().await?;
    ensure!(
        version.git_version == "v1.36.3",
        "server is {}",
        version.git_version
    );

    // The controller manager gives a new namespace its `default` ServiceAccount
    // (create_namespace waits for it) and publishes the cluster CA into it.
    plane.create_namespace(NS).await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
    let root_ca = poll(Duration::from_secs(30), || async {
        Ok(config_maps.get_opt("kube-root-ca.crt").await?)
    })
    .await
    .context("kube-root-ca.crt never appeared")?;
    let published = root_ca.data.unwrap_or_default();
    ensure!(published.get("ca.crt").map(String::as_str) == Some(plane.ca_pem()));

    // A ServiceAccount token authenticates as the ServiceAccount, and RBAC denies it what no
    // role grants.
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("reader".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(admin.clone(), NS)
        .create(&PostParams::default(), &sa)
        .await?;
    let sa_client =
        client_from_kubeconfig(&plane.service_account_kubeconfig(NS, "reader").await?).await?;
    let review: SelfSubjectReview = Api::all(sa_client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await?;
    let username = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username);
    ensure!(
        username.as_deref() == Some("system:serviceaccount:rbac-check:reader"),
        "token authenticated as {username:?}"
    );
    match Api::<Pod>::namespaced(sa_client, NS)
        .list(&Default::default())
        .await
    {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => anyhow::bail!("listing pods as the ServiceAccount was not forbidden: {other:?}"),
    }

    // kubectl (Go's client) accepts the admin kubeconfig, and agrees with RBAC.
    let mut can_i = plane.kubectl();
    can_i.args(["auth", "can-i", "list", "pods", "-n", NS]);
    can_i.arg("--as=system:serviceaccount:rbac-check:reader");
    let out = tokio::process::Command::from(can_i).output().await?;
    let answer = String::from_utf8_lossy(&out.stdout);
    ensure!(answer.trim() == "no", "kubectl auth can-i said {answer:?}");

    // An eviction, which later benchmarks count from the audit log. With no node the pod stays
    // Pending, and a pending pod's eviction is granted at once.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("evict-me".into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "main".into(),
                image: Some("registry.invalid/none".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    pods.create(&PostParams::default(), &pod).await?;
    pods.evict("evict-me", &EvictParams::default()).await?;

    // The audit log (written before each response) holds both requests.
    let events = plane.audit_events()?;
    let denied = events.iter().any(|e| {
        e.verb == "list"
            && e.resource_path() == "pods"
            && e.user.username == "system:serviceaccount:rbac-check:reader"
            && e.code() == Some(403)
    });
    ensure!(denied, "audit log lacks the forbidden list of pods");
    let evictions = events
        .iter()
        .filter(|e| {
            e.verb == "create"
                && e.resource_path() == "pods/eviction"
                && e.object_ref.as_ref().and_then(|r| r.name.as_deref()) == Some("evict-me")
                && e.stage == "ResponseComplete"
        })
        .count();
    ensure!(
        evictions == 1,
        "audit log has {evictions} evictions of evict-me, want 1"
    );
    eprintln!("audit log: {} events", events.len());

    // The scheduler binds a pod to a Node that has room for it.
    let nodes: Api<Node> = Api::all(admin.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some("sched-node".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    nodes.create(&PostParams::default(), &node).await?;
    let capacity: BTreeMap<String, Quantity> = [("cpu", "4"), ("memory", "8Gi"), ("pods", "110")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect();
    let status = serde_json::json!({ "status": {
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady",
                         "lastHeartbeatTime": Time(Timestamp::now()),
                         "lastTransitionTime": Time(Timestamp::now()) }],
    }});
    nodes
        .patch_status(
            "sched-node",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
    let mut pod = pod.clone();
    pod.metadata.name = Some("schedule-me".into());
    if let Some(spec) = pod.spec.as_mut() {
        // The node carries the not-ready taint TaintNodesByCondition adds at creation until the
        // node lifecycle controller sees it Ready; this check is about the scheduler only.
        spec.tolerations = Some(vec![Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        }]);
    }
    pods.create(&PostParams::default(), &pod).await?;
    let bound = poll(Duration::from_secs(30), || async {
        let pod = pods.get("schedule-me").await?;
        Ok(pod.spec.and_then(|s| s.node_name))
    })
    .await
    .context("the scheduler never bound schedule-me")?;
    ensure!(bound == "sched-node", "bound to {bound}");

    let pids = plane.pids();
    ensure!(pids.len() == 4, "expected 4 processes, got {pids:?}");
    let dir = plane.dir().to_path_buf();
    let stopping = Instant::now();
    plane.shutdown().await?;
    eprintln!("shut down in {:.1} s", stopping.elapsed().as_secs_f64());
    for (name, pid) in pids {
        ensure!(!pid_exists(pid), "{name} (pid {pid}) is still there");
    }
    ensure!(!dir.exists(), "{} is still there", dir.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_test_leaves_no_process_or_folder() -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let opts = ControlPlaneOptions {
            wait_for_controllers: false,
            ..Default::default()
        };
        let plane = ControlPlane::start(opts)
            .await
            .expect("control plane starts");
        tx.send((plane.pids(), plane.dir().to_path_buf()))
            .expect("receiver waits");
        panic!("a test fails while holding the control plane");
    });
    let (pids, dir) = rx.await.context("control plane did not start")?;
    let joined = task.await;
    ensure!(
        joined.is_err_and(|e| e.is_panic()),
        "task should have panicked"
    );
    for (name, pid) in pids {
        ensure!(!pid_exists(pid), "{name} (pid {pid}) outlived the panic");
    }
    ensure!(!dir.exists(), "{} outlived the panic", dir.display());
    Ok(())
}

/// Polls `probe` every 100 ms until it yields a value, failing after `timeout`.
async fn poll<T, F, Fut>(timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await? {
            return Ok(value);
        }
        ensure!(Instant::now() < deadline, "gave up after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
