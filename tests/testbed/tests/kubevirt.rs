//! The reference drain against the bed: real control plane, three simulated nodes,
//! the KubeVirt simulator, and the real `kubectl drain`; then the admitter's rules and the
//! kubelet sim's pod lifecycle, through the API.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{EvictParams, ListParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::{Api, Client};
use testbed::controlplane::{ControlPlane, ControlPlaneOptions};
use testbed::kubelet::KubeletSim;
use testbed::kubevirt::{
    KubeVirtOptions, KubeVirtSim, VirtualMachineInstance, VirtualMachineInstanceMigration, VmiKind,
    WebhookTls, launcher,
};

/// Each case starts its own control plane; two at once would starve a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const DRAIN: &[&str] = &[
    "drain",
    "node-1",
    "--delete-emptydir-data",
    "--ignore-daemonsets",
    "--force",
    "--pod-selector=kubevirt.io=virt-launcher",
];

/// Fields drop in order: the simulators stop before the control plane goes away.
struct Bed {
    kubevirt: KubeVirtSim,
    kubelet: KubeletSim,
    client: Client,
    plane: ControlPlane,
    /// When the nodes were registered.
    nodes_since: std::time::Instant,
}

async fn bed() -> Result<Bed> {
    bed_with(KubeVirtOptions {
        migration_duration: Duration::from_secs(2),
        shutdown_duration: Duration::from_secs(1),
        ..KubeVirtOptions::default()
    })
    .await
}

async fn bed_with(opts: KubeVirtOptions) -> Result<Bed> {
    bed_with_plane(opts, ControlPlaneOptions::default()).await
}

/// The node-lifecycle controller's grace periods, shortened so a test can outlast them.
const NODE_GRACE: Duration = Duration::from_secs(20);

async fn bed_with_plane(opts: KubeVirtOptions, plane: ControlPlaneOptions) -> Result<Bed> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "testbed=info".into()),
        )
        .with_test_writer()
        .try_init();
    let plane = ControlPlane::start(plane).await?;
    let client = plane.client().await?;
    let kubelet = KubeletSim::spawn_n(client.clone(), 3).await?;
    let nodes_since = std::time::Instant::now();
    let opts = KubeVirtOptions {
        webhook_tls: Some(WebhookTls::issued_by(plane.ca())?),
        ..opts
    };
    let kubevirt = KubeVirtSim::spawn(client.clone(), kubelet.workloads(), opts).await?;
    Ok(Bed {
        plane,
        client,
        kubelet,
        kubevirt,
        nodes_since,
    })
}

struct Output {
    success: bool,
    text: String,
}

async fn kubectl(plane: &ControlPlane, args: &[&str], limit: Duration) -> Result<Output> {
    let bin = testbed::paths::bin_dir().join("kubectl");
    let child = tokio::process::Command::new(&bin)
        .arg(format!(
            "--kubeconfig={}",
            plane.kubeconfig_path().display()
        ))
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(limit, child)
        .await
        .with_context(|| format!("kubectl {args:?} ran longer than {limit:?}"))?
        .with_context(|| format!("running {}", bin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(Output {
        success: out.status.success(),
        text,
    })
}

async fn unschedulable(client: &Client, node: &str) -> Result<bool> {
    let node = Api::<Node>::all(client.clone()).get(node).await?;
    Ok(node.spec.and_then(|s| s.unschedulable).unwrap_or(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_drain_migrates_live_vmis_and_stops_the_others() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = bed().await?;
    let created = bed
        .kubevirt
        .create_vmis("default", "node-1", &"live=3,none=1".parse()?)
        .await?;
    ensure!(created.len() == 4, "created {} VMIs", created.len());

    let started = std::time::Instant::now();
    let drain = kubectl(&bed.plane, DRAIN, Duration::from_secs(180)).await?;
    let took = started.elapsed();
    println!("kubectl drain took {took:?}:\n{}", drain.text);
    ensure!(drain.success, "kubectl drain failed:\n{}", drain.text);
    ensure!(
        drain.text.contains("node/node-1 drained"),
        "no success line:\n{}",
        drain.text
    );

    let vmis = Api::<VirtualMachineInstance>::namespaced(bed.client.clone(), "default");
    for name in ["live-1", "live-2", "live-3"] {
        let vmi = vmis.get(name).await?;
        let status = vmi.status.clone().unwrap_or_default();
        let node = status.node_name.clone().unwrap_or_default();
        ensure!(vmi.phase() == "Running", "{name} is {}", vmi.phase());
        ensure!(
            node != "node-1" && !node.is_empty(),
            "{name} still on {node:?}"
        );
        let label = vmi
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubevirt.io/nodeName"));
        ensure!(label == Some(&node), "{name} label {label:?} != {node}");
        let state = status.migration_state.context("no migrationState")?;
        ensure!(state.completed && !state.failed, "{name}: {state:?}");
        ensure!(
            state.source_node.as_deref() == Some("node-1"),
            "{name}: {state:?}"
        );
        ensure!(
            state.target_node.as_deref() == Some(node.as_str()),
            "{name}: {state:?}"
        );
        ensure!(
            state.start_timestamp.is_some() && state.end_timestamp.is_some(),
            "{state:?}"
        );
        ensure!(
            status.evacuation_node_name.is_none(),
            "{name} still marked for evacuation"
        );
    }
    // Short names and printer columns work for kubectl users.
    let table = kubectl(
        &bed.plane,
        &["get", "vmi", "-o", "wide"],
        Duration::from_secs(30),
    )
    .await?;
    ensure!(table.success, "kubectl get vmi failed:\n{}", table.text);
    let header = table.text.lines().next().unwrap_or_default();
    ensure!(
        header.contains("PHASE")
            && header.contains("NODENAME")
            && header.contains("LIVE-MIGRATABLE"),
        "{}",
        table.text
    );
    ensure!(
        table
            .text
            .lines()
            .any(|l| l.starts_with("none-1") && l.contains("Succeeded")),
        "{}",
        table.text
    );
    let stopped = vmis.get("none-1").await?;
    ensure!(
        stopped.phase() == "Succeeded",
        "none-1 is {}",
        stopped.phase()
    );

    // Nothing of KubeVirt's is left on the drained node.
    let left = Api::<Pod>::all(bed.client.clone())
        .list(&ListParams::default().fields("spec.nodeName=node-1"))
        .await?;
    ensure!(
        left.items.is_empty(),
        "pods left on node-1: {:?}",
        left.items
            .iter()
            .map(|p| &p.metadata.name)
            .collect::<Vec<_>>()
    );
    ensure!(
        unschedulable(&bed.client, "node-1").await?,
        "node-1 schedulable after drain"
    );

    let uncordon = kubectl(&bed.plane, &["uncordon", "node-1"], Duration::from_secs(30)).await?;
    ensure!(uncordon.success, "uncordon failed:\n{}", uncordon.text);
    ensure!(
        !unschedulable(&bed.client, "node-1").await?,
        "node-1 still unschedulable"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_with_a_non_migratable_vmi_times_out_on_429s() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let grace = format!("{}s", NODE_GRACE.as_secs());
    let bed = bed_with_plane(
        KubeVirtOptions::default(),
        ControlPlaneOptions {
            extra_controller_manager_args: vec![
                format!("--node-monitor-grace-period={grace}"),
                format!("--node-startup-grace-period={grace}"),
            ],
            ..ControlPlaneOptions::default()
        },
    )
    .await?;
    bed.kubevirt
        .create_vmis("default", "node-1", &"stuck=1".parse()?)
        .await?;

    let mut args = DRAIN.to_vec();
    args.push("--timeout=30s");
    let started = std::time::Instant::now();
    let drain = kubectl(&bed.plane, &args, Duration::from_secs(90)).await?;
    let took = started.elapsed();
    println!("kubectl drain took {took:?}:\n{}", drain.text);
    ensure!(!drain.success, "drain succeeded:\n{}", drain.text);
    ensure!(took >= Duration::from_secs(30), "gave up after {took:?}");
    let refusal = "denied the request: VMI stuck-1 is configured with an eviction strategy but is not live-migratable";
    let retries = drain.text.matches(refusal).count();
    ensure!(
        retries >= 2,
        "expected repeated 429 refusals, saw {retries}:\n{}",
        drain.text
    );
    ensure!(drain.text.contains("will retry after 5s"), "{}", drain.text);

    // The refusals were HTTP 429 (kubectl only retries on 429; the audit log shows the code).
    let audit = std::fs::read_to_string(bed.plane.audit_log_path())?;
    let denied = audit
        .lines()
        .filter(|l| l.contains("\"subresource\":\"eviction\"") && l.contains("\"code\":429"))
        .count();
    ensure!(denied >= 2, "audit log has {denied} evictions answered 429");

    // The VMI keeps running where it was.
    let vmi = Api::<VirtualMachineInstance>::namespaced(bed.client.clone(), "default")
        .get("stuck-1")
        .await?;
    ensure!(
        vmi.phase() == "Running" && vmi.node_name() == Some("node-1"),
        "{:?}",
        vmi.status
    );

    // The kubelet sim's leases and heartbeats keep the real node-lifecycle controller content
    // past its (shortened) grace periods: no node went NotReady/Unknown or got tainted.
    let outlast = NODE_GRACE + Duration::from_secs(10);
    if let Some(rest) = outlast.checked_sub(bed.nodes_since.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    for node in Api::<Node>::all(bed.client.clone())
        .list(&ListParams::default())
        .await?
        .items
    {
        let name = node.metadata.name.clone().unwrap_or_default();
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        ensure!(
            taints
                .iter()
                .all(|t| t.key != "node.kubernetes.io/unreachable"
                    && t.key != "node.kubernetes.io/not-ready"),
            "{name} tainted: {taints:?}"
        );
        let ready = node
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status);
        ensure!(ready.as_deref() == Some("True"), "{name} Ready={ready:?}");
    }
    Ok(())
}

/// Evicts with a client that does not retry 429s; returns the refusal as (code, message).
async fn evict(client: &Client, pod: &str, dry_run: bool) -> Result<Result<(), (u16, String)>> {
    let params = EvictParams {
        delete_options: None,
        post_options: PostParams {
            dry_run,
            field_manager: None,
        },
    };
    match Api::<Pod>::namespaced(client.clone(), "default")
        .evict(pod, &params)
        .await
    {
        Ok(_) => Ok(Ok(())),
        Err(kube::Error::Api(s)) => Ok(Err((s.code, s.message))),
        Err(e) => Err(e.into()),
    }
}

/// The running launcher pod of a VMI on its current node.
async fn launcher_of(client: &Client, vmi: &VirtualMachineInstance) -> Result<String> {
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
        .and_then(|p| p.metadata.name)
        .context("no running launcher pod")
}

async fn wait_vmi(
    client: &Client,
    name: &str,
    what: &str,
    cond: impl Fn(&VirtualMachineInstance) -> bool,
) -> Result<VirtualMachineInstance> {
    let api = Api::<VirtualMachineInstance>::namespaced(client.clone(), "default");
    let found = tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(api, name, move |v: Option<&VirtualMachineInstance>| {
            v.is_some_and(&cond)
        }),
    )
    .await
    .with_context(|| format!("timed out waiting for VMI {name}: {what}"))??;
    found.with_context(|| format!("VMI {name} vanished"))
}

fn refused(answer: &Result<(), (u16, String)>, message: &str) -> Result<()> {
    match answer {
        Err((429, m)) if m.ends_with(message) => Ok(()),
        other => anyhow::bail!("expected 429 {message:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_follow_the_admitter_and_failed_migrations_back_off() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let backoff = Duration::from_secs(3);
    let bed = bed_with(KubeVirtOptions {
        migration_duration: Duration::from_secs(2),
        shutdown_duration: Duration::from_secs(1),
        migration_backoff: backoff,
        ..KubeVirtOptions::default()
    })
    .await?;
    let mut config = bed.plane.config().await?;
    config.default_retry = false;
    let raw = Client::try_from(config)?;
    bed.kubevirt
        .create_vmis(
            "default",
            "node-1",
            &"live=1,stuck=1,ifpossible=1,external=1".parse()?,
        )
        .await?;
    // LiveMigrateIfPossible on a VMI that cannot migrate.
    let mut maybe = launcher::vmi_object("maybe-1", "default", "node-1", VmiKind::IfPossible);
    maybe
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(launcher::LIVE_MIGRATABLE_ANNOTATION.into(), "false".into());
    let vmis = Api::<VirtualMachineInstance>::namespaced(bed.client.clone(), "default");
    vmis.create(&PostParams::default(), &maybe).await?;
    let maybe = wait_vmi(&bed.client, "maybe-1", "Running", |v| {
        v.phase() == "Running"
    })
    .await?;
    ensure!(!maybe.is_migratable());

    let live = vmis.get("live-1").await?;
    let live_pod = launcher_of(&bed.client, &live).await?;

    // Dry run: the answer, but no mark.
    let answer = evict(&raw, &live_pod, true).await?;
    refused(
        &answer,
        "Eviction triggered evacuation of VMI \"default/live-1\"",
    )?;
    ensure!(vmis.get("live-1").await?.evacuation_node_name().is_none());

    // Not migratable under LiveMigrate: refused, every time.
    let stuck_pod = launcher_of(&bed.client, &vmis.get("stuck-1").await?).await?;
    for _ in 0..2 {
        refused(
            &evict(&raw, &stuck_pod, false).await?,
            "VMI stuck-1 is configured with an eviction strategy but is not live-migratable",
        )?;
    }

    // External: marked, then "in progress", and left to the external controller.
    let external_pod = launcher_of(&bed.client, &vmis.get("external-1").await?).await?;
    refused(
        &evict(&raw, &external_pod, false).await?,
        "Eviction triggered evacuation of VMI \"default/external-1\"",
    )?;
    refused(
        &evict(&raw, &external_pod, false).await?,
        "Evacuation in progress: Eviction triggered evacuation of VMI \"default/external-1\"",
    )?;
    ensure!(vmis.get("external-1").await?.evacuation_node_name() == Some("node-1"));

    // LiveMigrateIfPossible that cannot migrate: evicted; the VM shuts down.
    ensure!(
        evict(&raw, &launcher_of(&bed.client, &maybe).await?, false)
            .await?
            .is_ok()
    );
    wait_vmi(&bed.client, "maybe-1", "Succeeded", |v| {
        v.phase() == "Succeeded"
    })
    .await?;

    // LiveMigrate: the first migration fails, the next one waits out the backoff and moves it.
    bed.kubevirt.fail_next_migrations("default", "live-1", 1);
    refused(
        &evict(&raw, &live_pod, false).await?,
        "Eviction triggered evacuation of VMI \"default/live-1\"",
    )?;
    let failed = wait_vmi(&bed.client, "live-1", "a failed migration", |v| {
        v.status
            .as_ref()
            .and_then(|s| s.migration_state.as_ref())
            .is_some_and(|m| m.failed)
    })
    .await?;
    ensure!(failed.node_name() == Some("node-1"), "{:?}", failed.status);
    let moved = wait_vmi(&bed.client, "live-1", "migrated", |v| {
        v.node_name() != Some("node-1")
            && v.status
                .as_ref()
                .and_then(|s| s.migration_state.as_ref())
                .is_some_and(|m| m.completed && !m.failed)
    })
    .await?;
    ensure!(moved.evacuation_node_name().is_none());

    // The migration object reports Succeeded right after the VMI shows the hand-over.
    let api = Api::<VirtualMachineInstanceMigration>::namespaced(bed.client.clone(), "default");
    let migrations = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let mut items = api
                .list(&ListParams::default().labels("kubevirt.io/vmi-name=live-1"))
                .await?
                .items;
            items.sort_by_key(|m| m.transition_time("Pending"));
            if items.iter().all(|m| m.is_final()) {
                return anyhow::Ok(items);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .context("migrations of live-1 did not finish")??;
    let phases: Vec<&str> = migrations.iter().map(|m| m.phase()).collect();
    ensure!(phases == ["Failed", "Succeeded"], "phases {phases:?}");
    let failed_at = migrations[0]
        .transition_time("Failed")
        .context("no Failed time")?;
    let retried_at = migrations[1]
        .transition_time("Scheduling")
        .context("no Scheduling time")?;
    let waited = (retried_at - failed_at).to_std()?;
    ensure!(
        waited >= backoff - Duration::from_millis(100),
        "retried after {waited:?}"
    );
    // The failed attempt's target pod is gone; the source pod completed and stays until evicted.
    let failed_target = failed
        .status
        .as_ref()
        .and_then(|s| s.migration_state.as_ref())
        .and_then(|m| m.target_pod.clone())
        .context("no target pod")?;
    let pods = Api::<Pod>::namespaced(bed.client.clone(), "default");
    ensure!(
        pods.get_opt(&failed_target).await?.is_none(),
        "failed target pod left"
    );
    // The source launcher exits a moment after the hand-over, as upstream's does.
    wait_pod(&bed.client, &live_pod, "source Succeeded", |p| {
        phase(p) == Some("Succeeded")
    })
    .await?;
    ensure!(evict(&raw, &live_pod, false).await?.is_ok());

    // External was never migrated.
    let external = migrations_of(&bed.client, "external-1").await?;
    ensure!(external == 0, "{external} migrations for external-1");
    Ok(())
}

async fn migrations_of(client: &Client, vmi: &str) -> Result<usize> {
    Ok(
        Api::<VirtualMachineInstanceMigration>::namespaced(client.clone(), "default")
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|m| m.spec.vmi_name == vmi)
            .count(),
    )
}

async fn wait_pod(
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

fn phase(p: Option<&Pod>) -> Option<&str> {
    p?.status.as_ref()?.phase.as_deref()
}

fn bare_pod(name: &str, node: &str, grace: i64, annotations: serde_json::Value) -> Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {"nodeName": node, "restartPolicy": "Never", "terminationGracePeriodSeconds": grace,
                 "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
    }))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_sim_runs_scheduled_pods_and_honours_grace_periods() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = bed().await?;
    let pods = Api::<Pod>::namespaced(bed.client.clone(), "default");

    // Placed by the real kube-scheduler, run by the sim.
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": "registry.k8s.io/pause:3.10"}]}}},
    }))?;
    Api::<Deployment>::namespaced(bed.client.clone(), "default")
        .create(&PostParams::default(), &deployment)
        .await?;
    let all_running = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let list = pods.list(&ListParams::default().labels("app=web")).await?;
            let running = list
                .items
                .iter()
                .filter(|p| {
                    phase(Some(p)) == Some("Running")
                        && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
                })
                .count();
            if running == 3 {
                return anyhow::Ok(list.items);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await
    .context("Deployment pods did not all run")??;
    for p in &all_running {
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        ensure!(node.starts_with("node-"), "pod on {node:?}");
    }

    // A workload that ignores SIGTERM is killed when its grace period ends.
    pods.create(
        &PostParams::default(),
        &bare_pod("slow", "node-2", 3, serde_json::json!({}))?,
    )
    .await?;
    wait_pod(&bed.client, "slow", "Running", |p| {
        phase(p) == Some("Running")
    })
    .await?;
    let started = std::time::Instant::now();
    pods.delete("slow", &Default::default()).await?;
    wait_pod(&bed.client, "slow", "gone", |p| p.is_none()).await?;
    let took = started.elapsed();
    ensure!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "took {took:?}"
    );

    // One that handles SIGTERM exits sooner.
    let quick = bare_pod(
        "quick",
        "node-2",
        30,
        serde_json::json!({(testbed::kubelet::SIGTERM_EXIT_ANNOTATION): "1"}),
    )?;
    pods.create(&PostParams::default(), &quick).await?;
    wait_pod(&bed.client, "quick", "Running", |p| {
        phase(p) == Some("Running")
    })
    .await?;
    let started = std::time::Instant::now();
    pods.delete("quick", &Default::default()).await?;
    wait_pod(&bed.client, "quick", "gone", |p| p.is_none()).await?;
    let took = started.elapsed();
    ensure!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "took {took:?}"
    );

    // A workload exiting by itself: Succeeded, and the pod stays until deleted.
    pods.create(
        &PostParams::default(),
        &bare_pod("job", "node-3", 30, serde_json::json!({}))?,
    )
    .await?;
    let running = wait_pod(&bed.client, "job", "Running", |p| {
        phase(p) == Some("Running")
    })
    .await?
    .context("job pod vanished")?;
    bed.kubelet
        .workloads()
        .exit(running.metadata.uid.as_deref().unwrap_or_default(), 0);
    wait_pod(&bed.client, "job", "Succeeded", |p| {
        phase(p) == Some("Succeeded")
    })
    .await?;
    ensure!(pods.get_opt("job").await?.is_some());
    let started = std::time::Instant::now();
    pods.delete("job", &Default::default()).await?;
    wait_pod(&bed.client, "job", "gone", |p| p.is_none()).await?;
    ensure!(
        started.elapsed() < Duration::from_secs(3),
        "completed pod lingered"
    );
    Ok(())
}
