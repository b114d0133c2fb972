//! How a migrated VMI changes hands, release by release: one update moves the
//! `kubevirt.io/nodeName` label, `status.nodeName` and clears `evacuationNodeName` (the VMI CRD
//! has no status subresource); v1.6+'s target sets `completed` after that update
//! (`pkg/virt-handler/migration-target.go`), v1.5's source before it (`pkg/virt-handler/vm.go`);
//! the source launcher pod outlives the hand-over; v1.5 protects each VMI with a PDB raised to
//! 2 during its migration (`disruptionbudget.go`, `expandPDB`).

mod kubevirt_common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::ListParams;
use kubevirt_common::{
    SERIAL, Seen, VmiRecorder, bed, evict, launcher_of, pod_phase, until, wait_pod, wait_vmi,
};
use testbed::kubevirt::{KubeVirtOptions, KubeVirtVersion};

fn migrated(v: &testbed::kubevirt::VirtualMachineInstance) -> bool {
    v.node_name() != Some("node-1")
        && v.migration_state()
            .is_some_and(|m| m.completed && !m.failed)
}

/// The update that moved the VMI: the first one not on node-1 by label or by status.
fn the_move(seen: &[Seen]) -> Result<usize> {
    seen.iter()
        .position(|s| {
            (s.node.is_some() && s.node.as_deref() != Some("node-1"))
                || (s.label.is_some() && s.label.as_deref() != Some("node-1"))
        })
        .context("no update moved the VMI")
}

fn print(seen: &[Seen]) {
    for s in seen {
        println!(
            "rv {} {:>9} node={:?} label={:?} evac={:?} completed={}",
            s.resource_version, s.phase, s.node, s.label, s.evacuation, s.completed
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_hands_over_label_and_node_name_in_one_update() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let b = bed(
        3,
        KubeVirtOptions {
            migration_duration: Duration::from_secs(1),
            handover_gap: Duration::from_millis(500),
            source_exit_delay: Duration::from_secs(3),
            ..KubeVirtOptions::default()
        },
    )
    .await?;
    b.kubevirt
        .create_vmis("default", "node-1", &"live=1".parse()?)
        .await?;
    let recorder = VmiRecorder::start(&b.client, "live-1").await;
    let source = launcher_of(&b.client, "live-1").await?;
    let source_name = source.metadata.name.clone().unwrap_or_default();
    match evict(&b.raw, &source_name).await? {
        Err((429, m)) if m.contains("Eviction triggered evacuation") => {}
        other => anyhow::bail!("eviction answered {other:?}"),
    }
    let moved = wait_vmi(
        &b.client,
        "live-1",
        "migrated",
        Duration::from_secs(60),
        migrated,
    )
    .await?;
    // The source launcher is still up when the VMI has moved; it exits a while later.
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(b.client.clone(), "default");
    let now = pods.get(&source_name).await?;
    ensure!(
        pod_phase(Some(&now)) == Some("Running"),
        "source pod {:?} right after the hand-over",
        pod_phase(Some(&now))
    );
    let done = wait_pod(&b.client, &source_name, "source Succeeded", |p| {
        pod_phase(p) == Some("Succeeded")
    })
    .await?
    .context("source pod gone")?;
    // It exited about source_exit_delay (3 s) after the hand-over (finishedAt has whole
    // seconds, hence the slack).
    let finished = done
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default()
        .into_iter()
        .find_map(|c| c.state?.terminated?.finished_at)
        .context("no finishedAt")?;
    let finished =
        chrono::DateTime::from_timestamp_millis(finished.0.as_millisecond()).context("time")?;
    let handed_over = moved
        .migration_state()
        .and_then(|m| m.end_timestamp)
        .context("no endTimestamp")?;
    let lived = (finished - handed_over).num_milliseconds();
    ensure!(
        lived >= 2000,
        "source launcher exited {lived} ms after the hand-over"
    );

    let seen = recorder
        .wait("completed", Duration::from_secs(10), |s| {
            s.iter()
                .any(|s| s.completed && s.node.as_deref() != Some("node-1"))
        })
        .await?;
    print(&seen);
    let target = moved.node_name().context("no node")?.to_owned();
    let at = the_move(&seen)?;
    let hand_over = &seen[at];
    ensure!(
        hand_over.node.as_deref() == Some(target.as_str())
            && hand_over.label.as_deref() == Some(target.as_str()),
        "label and status.nodeName moved in different updates: {hand_over:?}"
    );
    ensure!(
        hand_over.evacuation.is_none(),
        "evacuationNodeName kept: {hand_over:?}"
    );
    let before = &seen[at - 1];
    ensure!(
        before.node.as_deref() == Some("node-1") && before.label.as_deref() == Some("node-1"),
        "{before:?}"
    );
    // v1.6+: the target acknowledges first and sets `completed` afterwards.
    ensure!(
        !hand_over.completed,
        "completed set with the hand-over in 1.8"
    );
    ensure!(
        seen[at..].iter().any(|s| s.completed),
        "completed never set"
    );
    // Never a VMI labelled for one node while its status names another.
    ensure!(
        seen.iter()
            .filter(|s| s.label.is_some())
            .all(|s| s.label == s.node),
        "label and nodeName disagreed in some update"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_5_completes_before_the_handover_and_guards_migrations_with_pdbs() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let b = bed(
        3,
        KubeVirtOptions {
            version: KubeVirtVersion::V1_5,
            migration_duration: Duration::from_secs(3),
            handover_gap: Duration::from_secs(1),
            ..KubeVirtOptions::default()
        },
    )
    .await?;
    let vmis = b
        .kubevirt
        .create_vmis("default", "node-1", &"live=1,none=1".parse()?)
        .await?;
    let uid = |name: &str| {
        vmis.iter()
            .find(|v| v.metadata.name.as_deref() == Some(name))
            .and_then(|v| v.metadata.uid.clone())
            .unwrap_or_default()
    };
    let (live_uid, none_uid) = (uid("live-1"), uid("none-1"));
    let pdbs = Api::<PodDisruptionBudget>::namespaced(b.client.clone(), "default");
    let of = move |list: &[PodDisruptionBudget], uid: &str| -> Option<PodDisruptionBudget> {
        list.iter()
            .find(|p| {
                p.metadata
                    .owner_references
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|r| r.uid == uid))
            })
            .cloned()
    };
    let pdb = until("live-1's PDB", Duration::from_secs(30), || {
        let pdbs = pdbs.clone();
        let live_uid = live_uid.clone();
        async move {
            Ok(of(
                &pdbs.list(&ListParams::default()).await?.items,
                &live_uid,
            ))
        }
    })
    .await?;
    let name = pdb.metadata.name.clone().unwrap_or_default();
    ensure!(name.starts_with("kubevirt-disruption-budget-"), "{name}");
    let spec = pdb.spec.clone().context("no spec")?;
    ensure!(spec.min_available == Some(IntOrString::Int(1)), "{spec:?}");
    ensure!(
        spec.selector
            .and_then(|s| s.match_labels)
            .unwrap_or_default()["kubevirt.io/created-by"]
            == live_uid
    );
    ensure!(
        of(&pdbs.list(&ListParams::default()).await?.items, &none_uid).is_none(),
        "a PDB for the None VMI"
    );

    let recorder = VmiRecorder::start(&b.client, "live-1").await;
    let source = launcher_of(&b.client, "live-1").await?;
    match evict(&b.raw, source.metadata.name.as_deref().unwrap_or_default()).await? {
        Err((429, m)) if m.contains("Eviction triggered evacuation") => {}
        other => anyhow::bail!("eviction answered {other:?}"),
    }
    // Raised to 2 and labelled with the migration while it runs.
    let expanded = until("the PDB raised to 2", Duration::from_secs(30), || {
        let pdbs = pdbs.clone();
        let name = name.clone();
        async move {
            let p = pdbs.get(&name).await?;
            let two =
                p.spec.as_ref().and_then(|s| s.min_available.clone()) == Some(IntOrString::Int(2));
            Ok(two.then_some(p))
        }
    })
    .await?;
    let label = expanded
        .metadata
        .labels
        .unwrap_or_default()
        .get("kubevirt.io/migrationName")
        .cloned()
        .context("no migration label on the expanded PDB")?;
    ensure!(label.starts_with("kubevirt-evacuation-"), "{label}");

    wait_vmi(
        &b.client,
        "live-1",
        "migrated",
        Duration::from_secs(60),
        migrated,
    )
    .await?;
    let seen = recorder
        .wait("the move", Duration::from_secs(10), |s| the_move(s).is_ok())
        .await?;
    print(&seen);
    let at = the_move(&seen)?;
    let early = seen[..at]
        .iter()
        .find(|s| s.completed)
        .context("v1.5: completed never seen while the VMI was still on node-1")?;
    ensure!(
        early.node.as_deref() == Some("node-1") && early.label.as_deref() == Some("node-1"),
        "{early:?}"
    );
    ensure!(
        seen[at].label == seen[at].node && seen[at].evacuation.is_none(),
        "hand-over not in one update: {:?}",
        seen[at]
    );

    // Back to 1 once the migration is over and one pod is left.
    until("the PDB shrunk back to 1", Duration::from_secs(30), || {
        let pdbs = pdbs.clone();
        let name = name.clone();
        async move {
            let p = pdbs.get(&name).await?;
            let one =
                p.spec.as_ref().and_then(|s| s.min_available.clone()) == Some(IntOrString::Int(1));
            let unlabelled = !p
                .metadata
                .labels
                .unwrap_or_default()
                .contains_key("kubevirt.io/migrationName");
            Ok((one && unlabelled).then_some(()))
        }
    })
    .await?;

    // v1.5 has no evacuate/cancel.
    let (code, _) = b
        .kubevirt
        .subresource(
            "default",
            "virtualmachineinstances",
            "live-1",
            "evacuate/cancel",
            Some(serde_json::json!({"evacuationNodeName": "node-1"})),
        )
        .await?;
    ensure!(code == 404, "evacuate/cancel answered {code} in 1.5");
    Ok(())
}
