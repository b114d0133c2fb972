//! The VM ledger against what really happened on a bed with no agent: a VM migrated, a VM
//! stopped gracefully, a VM whose launcher was killed without its grace period, and a VM its
//! node powered off under. The ledger must call the last two lost.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, EvictParams, ListParams};
use kube::{Api, Client};
use testbed::bed::{Bed, BedOptions, LogindKind, NODE};
use testbed::kubevirt::{KubeVirtOptions, VirtualMachineInstance};
use testbed::ledger::{LossReason, Outcome};

async fn launcher(client: &Client, vmi: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = pods
        .list(&ListParams::default().labels("kubevirt.io=virt-launcher"))
        .await
        .expect("launcher pods");
    list.items
        .into_iter()
        .find(|p| {
            p.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("kubevirt.io/domain"))
                .is_some_and(|d| d == vmi)
                && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(NODE)
        })
        .and_then(|p| p.metadata.name)
        .unwrap_or_else(|| panic!("no launcher of {vmi} on {NODE}"))
}

async fn wait_vmi(
    client: &Client,
    name: &str,
    what: &str,
    cond: impl Fn(&VirtualMachineInstance) -> bool,
) {
    let api: Api<VirtualMachineInstance> = Api::namespaced(client.clone(), "default");
    let waited = tokio::time::timeout(
        Duration::from_secs(30),
        kube::runtime::wait::await_condition(
            api,
            name,
            move |v: Option<&VirtualMachineInstance>| v.is_some_and(&cond),
        ),
    )
    .await;
    assert!(matches!(waited, Ok(Ok(_))), "{name} never {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ledger_names_every_fate_and_calls_a_vm_under_a_powered_off_node_lost() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,kube_client=off")
        .with_test_writer()
        .try_init();
    let bed = Bed::start(BedOptions {
        vms: "live=2,none=2".parse().unwrap(),
        logind: LogindKind::Elogind,
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs(1),
            shutdown_duration: Duration::from_secs(1),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await
    .expect("the bed starts");
    let client = bed.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    // live-2 migrates: its eviction starts KubeVirt's evacuation (the 429 that says so, or
    // the success kube's retry ends with once the source pod has completed).
    let _ = pods
        .evict(&launcher(&client, "live-2").await, &EvictParams::default())
        .await;
    wait_vmi(&client, "live-2", "migrated", |v| {
        v.node_name().is_some_and(|n| n != NODE)
    })
    .await;
    // none-2 stops gracefully: its launcher is deleted with its grace period.
    pods.delete(&launcher(&client, "none-2").await, &DeleteParams::default())
        .await
        .expect("graceful delete");
    wait_vmi(&client, "none-2", "stopped", |v| v.phase() == "Succeeded").await;
    // none-1's launcher is killed at once.
    pods.delete(
        &launcher(&client, "none-1").await,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await
    .expect("force delete");
    wait_vmi(&client, "none-1", "failed", |v| v.is_final()).await;

    // No agent holds the power-off: node-1 goes down with live-1 on it.
    bed.poweroff().await.expect("power-off starts");
    let off = bed
        .wait_poweroff(Duration::from_secs(30))
        .await
        .expect("node-1 powers off");

    let report = bed.ledger().await;
    eprint!("{report}");
    let fate = |vmi: &str| {
        report
            .fate(vmi)
            .unwrap_or_else(|| panic!("{vmi} missing: {report}"))
    };
    match &fate("default/live-1").outcome {
        Outcome::Lost {
            node,
            at,
            reason: LossReason::NodePoweredOff,
        } => {
            assert_eq!(node, NODE);
            assert_eq!(*at, off, "lost at the power-off moment");
        }
        other => panic!("live-1 should be lost under the power-off: {other:?}"),
    }
    let live2 = fate("default/live-2");
    assert!(live2.is_migrated(), "live-2: {live2:?}");
    assert_eq!(live2.migrations.len(), 1);
    assert_eq!(live2.migrations[0].from, NODE);
    assert!(live2.migrations[0].at < off);
    assert!(
        matches!(fate("default/none-2").outcome, Outcome::StoppedGracefully { grace_seconds: Some(g), .. } if g > 0),
        "none-2: {:?}",
        fate("default/none-2")
    );
    assert!(
        matches!(
            fate("default/none-1").outcome,
            Outcome::Lost {
                reason: LossReason::KilledWithoutGrace,
                ..
            }
        ),
        "none-1: {:?}",
        fate("default/none-1")
    );
    assert_eq!(report.lost().len(), 2);
    assert_eq!(
        report.summary(),
        "4 VMIs: 1 migrated, 1 stopped gracefully, 2 lost, 0 other"
    );
    bed.shutdown().await.expect("teardown");
}
