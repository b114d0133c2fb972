//! Several nodes with a logind each: pods on every node at once, each on its own node's bus,
//! power-offs per node, and faults that name a node.

use std::time::Duration;

use nix::sys::signal::Signal;
use testbed::bed::{Bed, BedOptions, LogindKind, Loginds};
use testbed::logind::ReleaseMethod;
use testbed::pod::{PodOutput, PodSpec};

fn who(node: &str) -> String {
    format!("pod-on-{node}")
}

/// Every node runs its own logind: a pod on each takes a delay lock that only its own node
/// lists; powering node-2 off waits for node-2's lock alone, comes after its release (seen in
/// logind's state file), and leaves the other nodes up with their locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_runs_its_own_logind_and_pods() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,kube_client=off")
        .with_test_writer()
        .try_init();
    let bed = Bed::start(BedOptions {
        nodes: 3,
        loginds: Loginds::All,
        logind: LogindKind::Systemd,
        other_logind: LogindKind::Systemd,
        inhibit_delay_max_secs: Some(30),
        ..BedOptions::default()
    })
    .await
    .expect("the bed starts");
    assert_eq!(bed.logind_nodes(), ["node-1", "node-2", "node-3"]);
    eprintln!(
        "bed with 3 systemd loginds up in {:.1} s",
        bed.started_in().as_secs_f64()
    );
    for node in bed.logind_nodes() {
        let logind = bed.node(&node).unwrap().logind().clone();
        let l = logind.read().await;
        eprintln!(
            "{node}: {}, {} KiB (PSS of the node's processes)",
            l.describe(),
            l.memory_kib()
        );
    }

    let log = bed.control_plane.dir().join("lockers.log");
    let mut holders = Vec::new();
    for node in bed.logind_nodes() {
        // The pod names itself after the node it was told it runs on.
        let spec = PodSpec::new(
            "sh",
            &[
                "-c",
                "exec systemd-inhibit --what=shutdown --mode=delay --who=pod-on-$TESTBED_NODE \
                 --why=test sleep 300",
            ],
        )
        .output(PodOutput::File(log.clone()));
        holders.push(bed.node(&node).unwrap().spawn_pod(spec).await.expect("pod"));
    }
    for node in bed.logind_nodes() {
        let n = bed.node(&node).unwrap();
        let listed = testbed::wait::until(
            Duration::from_secs(20),
            Duration::from_millis(20),
            || async {
                let list = n.list_inhibitors().await.ok()?;
                list.iter().any(|i| i.who == who(&node)).then_some(list)
            },
        )
        .await
        .unwrap_or_else(|| {
            panic!(
                "{node} never listed its pod's lock; pods said:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let others: Vec<_> = listed
            .iter()
            .filter(|i| i.who.starts_with("pod-on-") && i.who != who(&node))
            .collect();
        assert!(
            others.is_empty(),
            "{node} lists other nodes' locks: {others:?}"
        );
    }

    let node2 = bed.node("node-2").unwrap();
    // The power-off comes from a pod on node-2, through its own TESTBED_POWEROFF.
    let mut asker = node2
        .spawn_pod(PodSpec::new("sh", &["-c", "\"$TESTBED_POWEROFF\""]))
        .await
        .expect("pod");
    let asked = asker
        .wait_timeout(Duration::from_secs(30))
        .await
        .expect("asked");
    assert!(asked.success(), "TESTBED_POWEROFF failed on node-2");
    let watch = node2
        .watch_release(&who("node-2"), Duration::from_secs(30))
        .await;
    assert_eq!(watch.method(), ReleaseMethod::StateFile);
    // logind holds the power-off for the lock; the lock goes when node-2's pods are killed.
    node2.kill_pods(Signal::SIGTERM).await.expect("signal sent");
    let released = watch.wait().await.expect("node-2's lock goes");
    let off = node2
        .wait_poweroff(Duration::from_secs(30))
        .await
        .expect("node-2 powers off");
    assert!(
        off >= released.last_held,
        "node-2 powered off while its lock was held"
    );
    assert!(released.resolution() < Duration::from_millis(50));
    for node in ["node-1", "node-3"] {
        let n = bed.node(node).unwrap();
        assert!(n.power_offs().await.is_empty(), "{node} powered off too");
        let list = n.list_inhibitors().await.expect("logind answers");
        assert!(
            list.iter().any(|i| i.who == who(node)),
            "{node} lost its lock: {list:?}"
        );
    }
    drop(holders);
    bed.shutdown().await.expect("teardown");
}
