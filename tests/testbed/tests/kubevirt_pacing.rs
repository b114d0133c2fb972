//! Evacuation pacing as upstream's evacuation controller does it
//! (`pkg/virt-controller/watch/drain/evacuation/evacuation.go`, v1.5–v1.8): at most
//! min(parallelMigrationsPerCluster − running, parallelOutboundMigrationsPerNode − running from
//! the node) new migrations per sync, the node looked at again 5 s later when full; with the
//! `MigrationPriorityQueue` gate listed in the KubeVirt CR, all at once with
//! `priority: system-critical`.

mod kubevirt_common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chrono::{DateTime, Utc};
use kube::Api;
use kube::api::ListParams;
use kubevirt_common::{SERIAL, bed, evict, launcher_of, until};
use testbed::kubevirt::config::PRIORITY_QUEUE_GATE;
use testbed::kubevirt::{KubeVirtOptions, VirtualMachineInstance, VirtualMachineInstanceMigration};

const VMS: usize = 6;

fn opts() -> KubeVirtOptions {
    KubeVirtOptions {
        migration_duration: Duration::from_secs(1),
        shutdown_duration: Duration::from_secs(1),
        source_exit_delay: Duration::from_millis(200),
        ..KubeVirtOptions::default()
    }
}

/// Evicts every launcher pod of node-1 at once, as a drain does, and waits until all VMIs
/// migrated. Returns the migrations.
async fn drain_all(b: &kubevirt_common::Bed) -> Result<Vec<VirtualMachineInstanceMigration>> {
    let mut pods = Vec::new();
    for i in 1..=VMS {
        pods.push(launcher_of(&b.client, &format!("live-{i}")).await?);
    }
    let evictions = pods.iter().map(|p| {
        let name = p.metadata.name.clone().unwrap_or_default();
        let raw = b.raw.clone();
        async move { evict(&raw, &name).await }
    });
    for answer in futures::future::join_all(evictions).await {
        match answer? {
            Err((429, m)) if m.contains("Eviction triggered evacuation") => {}
            other => anyhow::bail!("eviction answered {other:?}"),
        }
    }
    let vmis = Api::<VirtualMachineInstance>::namespaced(b.client.clone(), "default");
    until(
        "every VMI to leave node-1",
        Duration::from_secs(120),
        || {
            let vmis = vmis.clone();
            async move {
                let list = vmis.list(&ListParams::default()).await?.items;
                let moved = list.iter().all(|v| {
                    v.node_name() != Some("node-1")
                        && v.migration_state()
                            .is_some_and(|m| m.completed && !m.failed)
                });
                Ok(moved.then_some(()))
            }
        },
    )
    .await?;
    let migrations =
        Api::<VirtualMachineInstanceMigration>::namespaced(b.client.clone(), "default");
    let all = until(
        "every migration to be final",
        Duration::from_secs(30),
        || {
            let migrations = migrations.clone();
            async move {
                let items = migrations.list(&ListParams::default()).await?.items;
                Ok(items
                    .iter()
                    .all(|m| m.phase() == "Succeeded")
                    .then_some(items))
            }
        },
    )
    .await?;
    ensure!(all.len() == VMS, "{} migrations for {VMS} VMIs", all.len());
    Ok(all)
}

/// The most migrations that were between Scheduling and their end at one moment.
fn max_concurrent(migrations: &[VirtualMachineInstanceMigration]) -> Result<usize> {
    let mut edges: Vec<(DateTime<Utc>, i32)> = Vec::new();
    for m in migrations {
        let start = m
            .transition_time("Scheduling")
            .context("no Scheduling time")?;
        let end = m
            .transition_time("Succeeded")
            .context("no Succeeded time")?;
        edges.push((start, 1));
        edges.push((end, -1));
    }
    // Ends before starts at the same instant.
    edges.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        max = max.max(now);
    }
    Ok(max as usize)
}

fn creation_times(migrations: &[VirtualMachineInstanceMigration]) -> Vec<DateTime<Utc>> {
    let mut t: Vec<DateTime<Utc>> = migrations
        .iter()
        .filter_map(|m| m.metadata.creation_timestamp.as_ref())
        .filter_map(|t| DateTime::from_timestamp_millis(t.0.as_millisecond()))
        .collect();
    t.sort();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuation_keeps_two_outbound_and_requeues_after_5s() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let b = bed(3, opts()).await?;
    b.kubevirt
        .create_vmis("default", "node-1", &format!("live={VMS}").parse()?)
        .await?;
    let migrations = drain_all(&b).await?;

    // Never more than parallelOutboundMigrationsPerNode (2) from node-1 at once, and the room
    // was used.
    let concurrent = max_concurrent(&migrations)?;
    ensure!(concurrent == 2, "{concurrent} migrations ran at once");

    // Creation in bursts: what fits at first, then the rest when the node's sync comes round
    // again 5 s later (a migration ending enqueues its VMI's new node, not node-1).
    let created = creation_times(&migrations);
    let mut bursts: Vec<Vec<DateTime<Utc>>> = Vec::new();
    for t in &created {
        match bursts.last_mut() {
            Some(b) if (*t - *b.last().expect("non-empty")).num_milliseconds() < 2000 => b.push(*t),
            _ => bursts.push(vec![*t]),
        }
    }
    println!(
        "creation times: {:?}",
        created
            .iter()
            .map(|t| t.format("%H:%M:%S").to_string())
            .collect::<Vec<_>>()
    );
    ensure!(
        bursts.len() >= 2,
        "all {VMS} migrations created together: {created:?}"
    );
    ensure!(bursts[0].len() < VMS);
    for pair in bursts.windows(2) {
        let gap = (pair[1][0] - pair[0][0]).num_milliseconds();
        // creationTimestamp has whole seconds.
        ensure!(gap >= 4000, "bursts {gap} ms apart: {created:?}");
    }
    // Without the priority queue the evacuation controller sets no priority.
    ensure!(
        migrations
            .iter()
            .all(|m| !m.spec.rest.contains_key("priority")),
        "priority set without the gate"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_queue_gate_creates_evacuations_at_once() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let b = bed(
        3,
        KubeVirtOptions {
            feature_gates: vec![PRIORITY_QUEUE_GATE.into()],
            ..opts()
        },
    )
    .await?;
    b.kubevirt
        .create_vmis("default", "node-1", &format!("live={VMS}").parse()?)
        .await?;
    let migrations = drain_all(&b).await?;
    let created = creation_times(&migrations);
    let spread = (*created.last().context("none")? - created[0]).num_milliseconds();
    ensure!(
        spread <= 2000,
        "creations spread over {spread} ms: {created:?}"
    );
    ensure!(
        migrations.iter().all(
            |m| m.spec.rest.get("priority").and_then(|p| p.as_str()) == Some("system-critical")
        ),
        "evacuation migrations without system-critical priority"
    );
    // The migration controller still runs at most two from the node.
    let concurrent = max_concurrent(&migrations)?;
    ensure!(concurrent == 2, "{concurrent} migrations ran at once");
    Ok(())
}
