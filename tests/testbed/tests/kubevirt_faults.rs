//! What goes wrong, as upstream lets it: migrations bounded by the KubeVirt CR's
//! `completionTimeoutPerGiB`, `progressTimeout` and `bandwidthPerMigration` (virt-launcher's
//! migration monitor, `live-migration-source.go`), their time following memory and bandwidth;
//! failed evacuations backing off 20 s (here 2 s), doubling (`handleMigrationBackoff`); a user
//! migration into a chosen node and its cancel by deleting the VMIM; the eviction webhook down
//! or slow; `evacuate/cancel` (v1.7+, `evacuate_cancel.go`).

mod kubevirt_common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use kubevirt_common::{SERIAL, bed, evict, launcher_of, until, wait_vmi};
use serde_json::json;
use testbed::kubevirt::{
    KubeVirtOptions, VirtualMachineInstance, VirtualMachineInstanceMigration, WebhookFault,
};

const GI: u64 = 1 << 30;

/// Waits until the migration is final and returns it.
async fn final_migration(
    client: &kube::Client,
    name: &str,
    limit: Duration,
) -> Result<VirtualMachineInstanceMigration> {
    let api = Api::<VirtualMachineInstanceMigration>::namespaced(client.clone(), "default");
    let name = name.to_owned();
    until(&format!("migration {name} to end"), limit, || {
        let (api, name) = (api.clone(), name.clone());
        async move { Ok(api.get_opt(&name).await?.filter(|m| m.is_final())) }
    })
    .await
}

fn secs(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> Result<f64> {
    let (from, to) = (from.context("no start")?, to.context("no end")?);
    Ok((to - from).num_milliseconds() as f64 / 1000.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_take_memory_over_bandwidth_within_the_crs_bounds() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let b = bed(
        3,
        KubeVirtOptions {
            migration_duration: Duration::from_secs(1),
            migration_bandwidth: Some(GI),
            completion_timeout_per_gib: 2,
            progress_timeout: 2,
            handover_gap: Duration::from_millis(100),
            ..KubeVirtOptions::default()
        },
    )
    .await?;
    b.kubevirt
        .create_vmis(
            "default",
            "node-1",
            &"live=1:1Gi,node-2:live=1:3Gi".parse()?,
        )
        .await?;

    // Copy time = memory ÷ the bed's 1 GiB/s.
    let small = b.kubevirt.migrate("default", "live-1", "node-3").await?;
    let large = b.kubevirt.migrate("default", "live-2", "node-3").await?;
    let small = final_migration(
        &b.client,
        small.metadata.name.as_deref().unwrap_or_default(),
        Duration::from_secs(30),
    )
    .await?;
    let large = final_migration(
        &b.client,
        large.metadata.name.as_deref().unwrap_or_default(),
        Duration::from_secs(30),
    )
    .await?;
    ensure!(small.phase() == "Succeeded" && large.phase() == "Succeeded");
    let copy_small = secs(
        small.transition_time("Running"),
        small.transition_time("Succeeded"),
    )?;
    let copy_large = secs(
        large.transition_time("Running"),
        large.transition_time("Succeeded"),
    )?;
    println!("copy 1Gi: {copy_small:.2} s, 3Gi: {copy_large:.2} s");
    ensure!(
        copy_small >= 1.0 && copy_large >= 3.0,
        "{copy_small} {copy_large}"
    );
    ensure!(
        copy_large - copy_small >= 1.5,
        "copy time does not follow memory"
    );

    // The CR caps the bandwidth: 1 GiB at 256 MiB/s takes 4 s, past the 2 s per giga-unit
    // (1 GiB rounds up to 2 units: 4 s) that virt-launcher allows; it aborts, the VMI stays.
    let mut config = b.kubevirt.cluster_config();
    config.migrations.bandwidth_per_migration = Some(GI / 4);
    b.kubevirt.set_cluster_config(&config).await?;
    let m = b.kubevirt.migrate("default", "live-1", "node-2").await?;
    let m = final_migration(
        &b.client,
        m.metadata.name.as_deref().unwrap_or_default(),
        Duration::from_secs(30),
    )
    .await?;
    ensure!(m.phase() == "Failed", "{}", m.phase());
    let vmi = Api::<VirtualMachineInstance>::namespaced(b.client.clone(), "default")
        .get("live-1")
        .await?;
    let state = vmi.migration_state().context("no migrationState")?;
    ensure!(
        vmi.node_name() == Some("node-3") && vmi.phase() == "Running",
        "{:?}",
        vmi.status
    );
    ensure!(
        state.failed
            && state.abort_status.as_deref() == Some("Succeeded")
            && state.failure_reason.as_deref()
                == Some("Live migration is not completed after 4 seconds and has been aborted"),
        "{state:?}"
    );

    // Lifted again in the CR: the next migration goes through.
    config.migrations.bandwidth_per_migration = None;
    b.kubevirt.set_cluster_config(&config).await?;
    let m = b.kubevirt.migrate("default", "live-1", "node-2").await?;
    let m = final_migration(
        &b.client,
        m.metadata.name.as_deref().unwrap_or_default(),
        Duration::from_secs(30),
    )
    .await?;
    ensure!(m.phase() == "Succeeded", "{}", m.phase());

    // A migration that makes no progress is aborted after progressTimeout (2 s).
    b.kubevirt.stall_next_migrations("default", "live-2", 1);
    let m = b.kubevirt.migrate("default", "live-2", "node-1").await?;
    let m = final_migration(
        &b.client,
        m.metadata.name.as_deref().unwrap_or_default(),
        Duration::from_secs(30),
    )
    .await?;
    ensure!(m.phase() == "Failed", "{}", m.phase());
    let vmi = Api::<VirtualMachineInstance>::namespaced(b.client.clone(), "default")
        .get("live-2")
        .await?;
    let reason = vmi
        .migration_state()
        .and_then(|s| s.failure_reason.clone())
        .unwrap_or_default();
    ensure!(
        reason.starts_with("Live migration stuck for ")
            && reason.ends_with(" seconds and has been aborted"),
        "{reason}"
    );
    ensure!(vmi.node_name() == Some("node-3"), "{:?}", vmi.node_name());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_evacuations_back_off_doubling() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let base = Duration::from_secs(2);
    let b = bed(
        3,
        KubeVirtOptions {
            migration_duration: Duration::from_secs(1),
            migration_backoff: base,
            ..KubeVirtOptions::default()
        },
    )
    .await?;
    b.kubevirt
        .create_vmis("default", "node-1", &"live=1,node-2:live=1".parse()?)
        .await?;
    b.kubevirt.fail_next_migrations("default", "live-1", 2);
    let pod = launcher_of(&b.client, "live-1").await?;
    match evict(&b.raw, pod.metadata.name.as_deref().unwrap_or_default()).await? {
        Err((429, m)) if m.contains("Eviction triggered evacuation") => {}
        other => anyhow::bail!("eviction answered {other:?}"),
    }
    wait_vmi(
        &b.client,
        "live-1",
        "migrated",
        Duration::from_secs(60),
        |v| {
            v.node_name() != Some("node-1")
                && v.migration_state()
                    .is_some_and(|m| m.completed && !m.failed)
        },
    )
    .await?;
    let api = Api::<VirtualMachineInstanceMigration>::namespaced(b.client.clone(), "default");
    let mut runs: Vec<VirtualMachineInstanceMigration> =
        until("three final migrations", Duration::from_secs(20), || {
            let api = api.clone();
            async move {
                let items = api
                    .list(&ListParams::default().labels("kubevirt.io/vmi-name=live-1"))
                    .await?
                    .items;
                Ok((items.len() == 3 && items.iter().all(|m| m.is_final())).then_some(items))
            }
        })
        .await?;
    runs.sort_by_key(|m| m.transition_time("Pending"));
    let phases: Vec<&str> = runs.iter().map(|m| m.phase()).collect();
    ensure!(phases == ["Failed", "Failed", "Succeeded"], "{phases:?}");
    let first = secs(
        runs[0].transition_time("Failed"),
        runs[1].transition_time("Scheduling"),
    )?;
    let second = secs(
        runs[1].transition_time("Failed"),
        runs[2].transition_time("Scheduling"),
    )?;
    println!("retried after {first:.2} s, then {second:.2} s");
    ensure!(
        first >= base.as_secs_f64() - 0.1,
        "first retry after {first} s"
    );
    ensure!(
        second >= 2.0 * base.as_secs_f64() - 0.1,
        "second retry after {second} s: no doubling"
    );

    // By rate: every migration fails; user migrations have no backoff.
    b.kubevirt.set_failure_probability(1.0);
    let m = b.kubevirt.migrate("default", "live-2", "node-3").await?;
    let m = final_migration(
        &b.client,
        m.metadata.name.as_deref().unwrap_or_default(),
        Duration::from_secs(30),
    )
    .await?;
    ensure!(m.phase() == "Failed", "{}", m.phase());
    let vmi = Api::<VirtualMachineInstance>::namespaced(b.client.clone(), "default")
        .get("live-2")
        .await?;
    ensure!(
        vmi.migration_state()
            .and_then(|s| s.failure_reason.as_deref())
            == Some("Live migration failed: injected by the test bed"),
        "{:?}",
        vmi.migration_state()
    );
    Ok(())
}

/// Upstream's evacuation controller skips a VMI that still has a second active launcher pod
/// (a previous migration's target on its way out) and has no pod handler of its own: what
/// re-queues the node is the VMI update the VMI controller makes when that pod is gone
/// (`status.activePods`). Without it the evacuation stalled for good after a failed migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuation_resumes_when_a_lingering_launcher_pod_is_gone() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let b = bed(
        2,
        KubeVirtOptions {
            migration_duration: Duration::from_secs(1),
            ..KubeVirtOptions::default()
        },
    )
    .await?;
    b.kubevirt
        .create_vmis("default", "node-1", &"live=1".parse()?)
        .await?;
    let pod = launcher_of(&b.client, "live-1").await?;
    let pods = Api::<Pod>::namespaced(b.client.clone(), "default");
    // A second pod of the VMI, as a failed migration's target leaves it for a while.
    let mut lingering = pod.clone();
    lingering.metadata = kube::api::ObjectMeta {
        name: Some("lingering-target".into()),
        labels: pod.metadata.labels.clone(),
        owner_references: pod.metadata.owner_references.clone(),
        ..Default::default()
    };
    lingering.status = None;
    if let Some(spec) = lingering.spec.as_mut() {
        spec.node_name = Some("node-2".into());
    }
    pods.create(&kube::api::PostParams::default(), &lingering)
        .await?;
    until("the lingering pod to run", Duration::from_secs(20), || {
        let pods = pods.clone();
        async move {
            let p = pods.get("lingering-target").await?;
            Ok((kubevirt_common::pod_phase(Some(&p)) == Some("Running")).then_some(()))
        }
    })
    .await?;
    match evict(&b.raw, pod.metadata.name.as_deref().unwrap_or_default()).await? {
        Err((429, m)) if m.contains("Eviction triggered evacuation") => {}
        other => anyhow::bail!("eviction answered {other:?}"),
    }
    let migrations =
        Api::<VirtualMachineInstanceMigration>::namespaced(b.client.clone(), "default");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let early = migrations.list(&ListParams::default()).await?.items.len();
    ensure!(
        early == 0,
        "{early} migrations while two launcher pods are active"
    );

    pods.delete("lingering-target", &kube::api::DeleteParams::default())
        .await?;
    until("an evacuation migration", Duration::from_secs(20), || {
        let migrations = migrations.clone();
        async move {
            let items = migrations.list(&ListParams::default()).await?.items;
            Ok((!items.is_empty()).then_some(()))
        }
    })
    .await?;
    wait_vmi(
        &b.client,
        "live-1",
        "migrated to node-2",
        Duration::from_secs(30),
        |v| v.node_name() == Some("node-2"),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_migration_into_a_node_and_its_cancel() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let b = bed(
        3,
        KubeVirtOptions {
            migration_duration: Duration::from_secs(4),
            ..KubeVirtOptions::default()
        },
    )
    .await?;
    let vmis = b
        .kubevirt
        .create_vmis("default", "node-1", &"live=1,node-2:live=1".parse()?)
        .await?;
    ensure!(
        vmis[1].node_name() == Some("node-2"),
        "{:?}",
        vmis[1].node_name()
    );

    // From node-2 into node-1, as a user (or the descheduler) would.
    let into = b.kubevirt.migrate("default", "live-2", "node-1").await?;
    ensure!(
        into.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubevirt.io/vmi-name"))
            .map(String::as_str)
            == Some("live-2")
            && into
                .metadata
                .finalizers
                .as_ref()
                .is_some_and(|f| f.iter().any(|f| f == "kubevirt.io/migrationJobFinalizer")),
        "virt-api's mutator did not run: {:?}",
        into.metadata
    );
    let into = final_migration(
        &b.client,
        into.metadata.name.as_deref().unwrap_or_default(),
        Duration::from_secs(30),
    )
    .await?;
    ensure!(into.phase() == "Succeeded");
    let moved = Api::<VirtualMachineInstance>::namespaced(b.client.clone(), "default")
        .get("live-2")
        .await?;
    ensure!(
        moved.node_name() == Some("node-1"),
        "{:?}",
        moved.node_name()
    );

    // Deleted while copying: the source aborts, the VMI stays, the VMIM goes.
    let vmims = Api::<VirtualMachineInstanceMigration>::namespaced(b.client.clone(), "default");
    let m = b.kubevirt.migrate("default", "live-1", "node-3").await?;
    let name = m.metadata.name.clone().unwrap_or_default();
    until("the migration to copy", Duration::from_secs(30), || {
        let (vmims, name) = (vmims.clone(), name.clone());
        async move {
            Ok(vmims
                .get_opt(&name)
                .await?
                .filter(|m| m.phase() == "Running"))
        }
    })
    .await?;
    let target_pod = Api::<VirtualMachineInstance>::namespaced(b.client.clone(), "default")
        .get("live-1")
        .await?
        .migration_state()
        .and_then(|s| s.target_pod.clone())
        .context("no target pod")?;
    b.kubevirt.cancel_migration("default", &name).await?;
    until(
        "the cancelled migration to go",
        Duration::from_secs(30),
        || {
            let (vmims, name) = (vmims.clone(), name.clone());
            async move { Ok(vmims.get_opt(&name).await?.is_none().then_some(())) }
        },
    )
    .await?;
    let vmi = wait_vmi(
        &b.client,
        "live-1",
        "abort recorded",
        Duration::from_secs(10),
        |v| {
            v.migration_state()
                .is_some_and(|s| s.abort_status.as_deref() == Some("Succeeded"))
        },
    )
    .await?;
    ensure!(
        vmi.node_name() == Some("node-1") && vmi.phase() == "Running",
        "{:?}",
        vmi.status
    );
    ensure!(
        vmi.migration_state()
            .is_some_and(|s| s.failed && !s.completed),
        "{:?}",
        vmi.migration_state()
    );
    let pods = Api::<Pod>::namespaced(b.client.clone(), "default");
    until("the target pod to go", Duration::from_secs(30), || {
        let (pods, target_pod) = (pods.clone(), target_pod.clone());
        async move { Ok(pods.get_opt(&target_pod).await?.is_none().then_some(())) }
    })
    .await?;

    // Deleted before the hand-off: it fails at once.
    let m = b.kubevirt.migrate("default", "live-1", "node-3").await?;
    let name = m.metadata.name.clone().unwrap_or_default();
    b.kubevirt.cancel_migration("default", &name).await?;
    until(
        "the early cancelled migration to go",
        Duration::from_secs(30),
        || {
            let (vmims, name) = (vmims.clone(), name.clone());
            async move { Ok(vmims.get_opt(&name).await?.is_none().then_some(())) }
        },
    )
    .await?;
    let vmi = Api::<VirtualMachineInstance>::namespaced(b.client.clone(), "default")
        .get("live-1")
        .await?;
    ensure!(vmi.node_name() == Some("node-1"), "{:?}", vmi.node_name());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_webhook_down_or_slow() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let b = bed(3, KubeVirtOptions::default()).await?;
    b.kubevirt
        .create_vmis("default", "node-1", &"stuck=1".parse()?)
        .await?;
    let pod = launcher_of(&b.client, "stuck-1").await?;
    let pod = pod.metadata.name.clone().unwrap_or_default();
    let refused = "VMI stuck-1 is configured with an eviction strategy but is not live-migratable";

    // Down: kube-apiserver cannot reach it and, failurePolicy Fail, refuses the eviction.
    b.kubevirt.set_webhook_fault(WebhookFault::Down);
    match evict(&b.raw, &pod).await? {
        Err((500, m))
            if m.contains("failed calling webhook") && m.contains("connection refused") => {}
        other => anyhow::bail!("eviction with the webhook down answered {other:?}"),
    }
    b.kubevirt.set_webhook_fault(WebhookFault::None);
    let raw = b.raw.clone();
    let pod2 = pod.clone();
    until(
        "the webhook to answer again",
        Duration::from_secs(10),
        || {
            let (raw, pod) = (raw.clone(), pod2.clone());
            async move {
                Ok(match evict(&raw, &pod).await? {
                    Err((429, m)) if m.ends_with(refused) => Some(()),
                    _ => None,
                })
            }
        },
    )
    .await?;

    // Slow: the answer comes that late.
    b.kubevirt
        .set_webhook_fault(WebhookFault::Slow(Duration::from_secs(2)));
    let asked = Instant::now();
    match evict(&b.raw, &pod).await? {
        Err((429, m)) if m.ends_with(refused) => {}
        other => anyhow::bail!("eviction with a slow webhook answered {other:?}"),
    }
    ensure!(
        asked.elapsed() >= Duration::from_secs(2),
        "answered after {:?}",
        asked.elapsed()
    );

    // Slower than the webhook's 10 s timeout: kube-apiserver gives up.
    b.kubevirt
        .set_webhook_fault(WebhookFault::Slow(Duration::from_secs(11)));
    match evict(&b.raw, &pod).await? {
        Err((code, m)) if code >= 500 && m.contains("failed calling webhook") => {
            println!("timed out: {code} {m}");
        }
        other => anyhow::bail!("eviction with a webhook past its timeout answered {other:?}"),
    }
    b.kubevirt.set_webhook_fault(WebhookFault::None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuate_cancel_clears_the_mark() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let b = bed(3, KubeVirtOptions::default()).await?;
    b.kubevirt
        .create_vmis("default", "node-1", &"external=1,live=1".parse()?)
        .await?;
    // External: marked, no migration (left to the external controller), so the mark stays.
    let pod = launcher_of(&b.client, "external-1").await?;
    let pod = pod.metadata.name.clone().unwrap_or_default();
    let triggered = "Eviction triggered evacuation of VMI \"default/external-1\"";
    match evict(&b.raw, &pod).await? {
        Err((429, m)) if m.ends_with(triggered) => {}
        other => anyhow::bail!("eviction answered {other:?}"),
    }
    let cancel = |body: Option<serde_json::Value>| {
        b.kubevirt.subresource(
            "default",
            "virtualmachineinstances",
            "external-1",
            "evacuate/cancel",
            body,
        )
    };
    let (code, body) = cancel(None).await?;
    ensure!(code == 400 && body.contains("No body"), "{code}: {body}");
    let (code, body) = cancel(Some(json!({"evacuationNodeName": "node-2"}))).await?;
    ensure!(
        code == 500,
        "a cancel for the wrong node answered {code}: {body}"
    );
    let (code, body) = cancel(Some(
        json!({"evacuationNodeName": "node-1", "dryRun": ["All"]}),
    ))
    .await?;
    ensure!(code == 200, "{code}: {body}");
    let vmis = Api::<VirtualMachineInstance>::namespaced(b.client.clone(), "default");
    ensure!(
        vmis.get("external-1").await?.evacuation_node_name() == Some("node-1"),
        "dry run cleared the mark"
    );
    let (code, body) = cancel(Some(json!({"evacuationNodeName": "node-1"}))).await?;
    ensure!(code == 200, "{code}: {body}");
    ensure!(
        vmis.get("external-1")
            .await?
            .evacuation_node_name()
            .is_none(),
        "mark kept"
    );
    // Unmarked: a fresh eviction marks again instead of reporting an evacuation in progress.
    match evict(&b.raw, &pod).await? {
        Err((429, m)) if m.ends_with(triggered) && !m.starts_with("Evacuation in progress") => {}
        other => anyhow::bail!("eviction after the cancel answered {other:?}"),
    }
    // Nothing to cancel: fine without a body; no such VM: 404.
    let (code, body) = b
        .kubevirt
        .subresource(
            "default",
            "virtualmachineinstances",
            "live-1",
            "evacuate/cancel",
            None,
        )
        .await?;
    ensure!(code == 200, "{code}: {body}");
    let (code, _) = b
        .kubevirt
        .subresource(
            "default",
            "virtualmachines",
            "live-1",
            "evacuate/cancel",
            None,
        )
        .await?;
    ensure!(code == 404, "{code}");
    Ok(())
}
