//! shutdown-guard on the test bed with a real logind: a node powers off with VMs on it.
//!
//! Each scenario proves its ordering from what the cluster and logind observed: the API server's
//! audit log and watch events for the VMIs, logind's inhibitor list for the lock, and the node's
//! console for the power-off.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use common::*;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use testbed::bed::{Bed, BedOptions, LogindKind, NODE};
use testbed::kubevirt::KubeVirtOptions;
use testbed::timeline::{Change, Recorder, secs_between};

/// What one power-off looked like.
struct Observed {
    requested: SystemTime,
    released: SystemTime,
    powered_off: SystemTime,
    recorder: Recorder,
}

/// Runs the agent on node-1, powers node-1 off and records what happened.
async fn power_off_with_agent(bed: &Bed, agent_args: &[&str], timeout: Duration) -> (Observed, Agent) {
    let recorder = Recorder::start(bed.client(), NODE).await;
    let agent = Agent::spawn(bed, agent_args).await;
    wait_for_lock(bed, &agent, Duration::from_secs(30)).await;

    let requested = now();
    bed.poweroff().await.expect("power-off starts");
    let released = observe_release(bed, timeout)
        .await
        .unwrap_or_else(|| panic!("lock still held after {timeout:?}; agent log:\n{}", agent.log_text()));
    let powered_off = bed
        .wait_poweroff(timeout)
        .await
        .expect("node-1 powers off");
    (
        Observed {
            requested,
            released,
            powered_off,
            recorder,
        },
        agent,
    )
}

fn vmi_departures(o: &Observed) -> BTreeMap<String, (SystemTime, Change)> {
    o.recorder.departures()
}

/// The three LiveMigrate VMIs migrate, the None VMI stops, and the lock goes only after the
/// last VMI left node-1 (server time), within 1 s of it; the node powers off after that.
async fn main_scenario(logind: LogindKind) {
    let bed = start_bed(BedOptions {
        vms: "live=3,none=1".parse().unwrap(),
        logind,
        inhibit_delay_max_secs: Some(60),
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs(2),
            shutdown_duration: Duration::from_secs(1),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await;
    let (o, agent) = power_off_with_agent(&bed, &[], Duration::from_secs(60)).await;
    let log = agent.log_text();

    let cordoned = o
        .recorder
        .first(|c| *c == Change::Cordoned)
        .unwrap_or_else(|| panic!("node-1 was never cordoned; agent log:\n{log}"));
    assert!(cordoned >= o.requested, "cordoned before the shutdown began");

    let departures = vmi_departures(&o);
    for n in 1..=3 {
        let vmi = format!("default/live-{n}");
        match departures.get(&vmi) {
            Some((_, Change::Migrated { target, .. })) => assert_ne!(target, NODE),
            other => panic!("{vmi} did not migrate: {other:?}; agent log:\n{log}"),
        }
    }
    match departures.get("default/none-1") {
        Some((_, Change::Stopped { phase, .. })) => assert_eq!(phase, "Succeeded", "None VM stopped gracefully"),
        other => panic!("none-1 did not stop: {other:?}; agent log:\n{log}"),
    }
    assert!(o.recorder.vmis_on_node().is_empty(), "VMIs left on node-1");

    // The last VMI left node-1 when the API server accepted the write that moved or stopped it.
    let entries = audit(&bed);
    let (last_vmi, (last_seen, _)) = departures
        .iter()
        .max_by_key(|(_, (at, _))| *at)
        .expect("departures");
    let last_left = server_write_before(&entries, last_vmi, *last_seen)
        .expect("the audit log has the write that moved the last VMI");
    let release_after = secs_between(last_left, o.released);
    assert!(
        release_after >= 0.0,
        "lock released {} before the last VMI ({last_vmi}) left node-1",
        secs(-release_after)
    );
    assert!(
        release_after <= 1.0,
        "lock released {} after the last VMI left node-1 (want ≤ 1 s)",
        secs(release_after)
    );
    assert!(
        o.powered_off >= o.released,
        "node-1 powered off before the lock was released"
    );
    // Every launcher pod was evicted through the Eviction API.
    let evictions: Vec<_> = entries
        .iter()
        .filter(|e| e.subresource == "eviction" && e.verb == "create" && e.received >= o.requested)
        .collect();
    for pod_prefix in ["virt-launcher-live-1", "virt-launcher-none-1"] {
        assert!(
            evictions.iter().any(|e| e.name.starts_with(pod_prefix)),
            "no eviction of {pod_prefix}*: {:?}",
            evictions.iter().map(|e| (&e.name, e.code)).collect::<Vec<_>>()
        );
    }
    eprintln!(
        "main scenario ({logind:?}): cordon +{}, last VMI left +{}, lock released +{} ({} after), powered off +{}",
        secs(secs_between(o.requested, cordoned)),
        secs(secs_between(o.requested, last_left)),
        secs(secs_between(o.requested, o.released)),
        secs(release_after),
        secs(secs_between(o.requested, o.powered_off)),
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poweroff_migrates_live_vms_and_stops_the_rest_systemd() {
    main_scenario(LogindKind::Systemd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poweroff_migrates_live_vms_and_stops_the_rest_elogind() {
    main_scenario(LogindKind::Elogind).await;
}

/// A LiveMigrate VMI that cannot migrate is stopped gracefully well before logind's limit, the
/// lock goes before InhibitDelayMaxSec, and a Warning Event names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_migratable_vm_is_stopped_before_the_deadline() {
    let limit = 40;
    let bed = start_bed(BedOptions {
        vms: "stuck=1".parse().unwrap(),
        inhibit_delay_max_secs: Some(limit),
        kubevirt: KubeVirtOptions {
            shutdown_duration: Duration::from_secs(1),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await;
    let (o, agent) =
        power_off_with_agent(&bed, &[], Duration::from_secs(limit + 20)).await;
    let log = agent.log_text();
    let departures = vmi_departures(&o);
    match departures.get("default/stuck-1") {
        Some((_, Change::Stopped { phase, .. })) => assert_eq!(phase, "Succeeded"),
        other => panic!("stuck-1 did not stop gracefully: {other:?}; agent log:\n{log}"),
    }
    let held = secs_between(o.requested, o.released);
    assert!(
        held < limit as f64 - 1.0,
        "lock held {held:.1} s, not released before InhibitDelayMaxSec={limit}"
    );
    // The stop was a graceful delete of the launcher pod, not a kill.
    let deletes: Vec<_> = audit(&bed)
        .into_iter()
        .filter(|e| e.resource == "pods" && e.verb == "delete" && e.name.starts_with("virt-launcher-stuck-1") && e.received >= o.requested)
        .collect();
    assert!(!deletes.is_empty(), "the launcher pod of stuck-1 was not deleted");
    let warned = o
        .recorder
        .changes()
        .into_iter()
        .any(|s| matches!(&s.change, Change::NodeWarning { message, .. } if message.contains("stuck-1")));
    assert!(warned, "no Warning Event on node-1 naming stuck-1: {:?}", o.recorder.changes());
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

async fn node_unschedulable(bed: &Bed) -> bool {
    let node = Api::<Node>::all(bed.client()).get(NODE).await.expect("node-1");
    node.spec.and_then(|s| s.unschedulable).unwrap_or(false)
}
