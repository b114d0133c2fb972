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
use shutdown_guard::drain::machine::EVACUATION_SPACING;
use testbed::bed::{Bed, BedOptions, LogindKind, NODE};
use testbed::kubevirt::KubeVirtOptions;
use testbed::ledger::Outcome;
use testbed::timeline::{AuditEntry, Change, Recorder, secs_between};

/// What one power-off looked like.
struct Observed {
    requested: SystemTime,
    released: testbed::bed::Release,
    powered_off: SystemTime,
    recorder: Recorder,
}

/// Runs the agent on node-1, powers node-1 off and records what happened.
async fn power_off_with_agent(
    bed: &Bed,
    agent_args: &[&str],
    timeout: Duration,
) -> (Observed, Agent) {
    let recorder = Recorder::start(bed.client(), NODE).await;
    let agent = Agent::spawn(bed, agent_args).await;
    wait_for_lock(bed, &agent, Duration::from_secs(30)).await;

    // Armed while the lock is held: logind's state file for it, every 0.5 ms.
    let watch = bed.watch_release(WHO, timeout).await;
    assert_eq!(
        watch.method(),
        testbed::logind::ReleaseMethod::StateFile,
        "no inhibitor state file to judge the release by"
    );
    let requested = now();
    bed.poweroff().await.expect("power-off starts");
    let released = watch.wait().await.unwrap_or_else(|| {
        panic!(
            "lock still held after {timeout:?}; agent log:\n{}",
            agent.log_text()
        )
    });
    let powered_off = bed.wait_poweroff(timeout).await.expect("node-1 powers off");
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

/// The lock went only after the API server had the last VMI's departure (a release before it
/// would show in logind's state file earlier than the write), within 1 s of it, and the node
/// powered off only after that. Returns the last VMI, when it left (server time), and how long
/// after that the lock went (s).
fn assert_released_after_last_departure(
    entries: &[AuditEntry],
    o: &Observed,
) -> (String, SystemTime, f64) {
    let departures = vmi_departures(o);
    let (last_vmi, (last_seen, _)) = departures
        .iter()
        .max_by_key(|(_, (at, _))| *at)
        .expect("departures");
    let last_left = server_write_before(entries, last_vmi, *last_seen)
        .expect("the audit log has the write that moved the last VMI");
    let release_after = secs_between(last_left, o.released.gone);
    assert!(
        release_after >= 0.0,
        "lock gone {} before the last VMI ({last_vmi}) left node-1",
        secs(-release_after)
    );
    assert!(
        release_after <= 1.0,
        "lock released {} after the last VMI left node-1 (want ≤ 1 s)",
        secs(release_after)
    );
    assert!(
        o.powered_off >= o.released.last_held,
        "node-1 powered off while logind still held the lock"
    );
    (last_vmi.clone(), last_left, release_after)
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
    assert!(
        cordoned >= o.requested,
        "cordoned before the shutdown began"
    );

    let all = [
        "default/live-1",
        "default/live-2",
        "default/live-3",
        "default/none-1",
    ];
    o.recorder.wait_departed(&all, Duration::from_secs(5)).await;
    let departures = vmi_departures(&o);
    for n in 1..=3 {
        let vmi = format!("default/live-{n}");
        match departures.get(&vmi) {
            Some((_, Change::Migrated { target, .. })) => assert_ne!(target, NODE),
            other => panic!("{vmi} did not migrate: {other:?}; agent log:\n{log}"),
        }
    }
    match departures.get("default/none-1") {
        Some((_, Change::Stopped { phase, .. })) => {
            assert_eq!(phase, "Succeeded", "None VM stopped gracefully")
        }
        other => panic!("none-1 did not stop: {other:?}; agent log:\n{log}"),
    }
    assert!(o.recorder.vmis_on_node().is_empty(), "VMIs left on node-1");

    let entries = audit(&bed);
    let (_, last_left, release_after) = assert_released_after_last_departure(&entries, &o);
    // Every launcher pod was evicted through the Eviction API.
    let evictions: Vec<_> = entries
        .iter()
        .filter(|e| e.subresource == "eviction" && e.verb == "create" && e.received >= o.requested)
        .collect();
    for pod_prefix in ["virt-launcher-live-1", "virt-launcher-none-1"] {
        assert!(
            evictions.iter().any(|e| e.name.starts_with(pod_prefix)),
            "no eviction of {pod_prefix}*: {:?}",
            evictions
                .iter()
                .map(|e| (&e.name, e.code))
                .collect::<Vec<_>>()
        );
    }
    assert_first_evictions_paced(&evictions);
    // Independent of the agent: every VMI left node-1 before it powered off.
    let ledger = assert_none_lost(&bed).await;
    for n in 1..=3 {
        let vmi = format!("default/live-{n}");
        assert!(
            ledger.fate(&vmi).is_some_and(|f| f.is_migrated()),
            "{vmi} not migrated in the ledger:\n{ledger}"
        );
    }
    assert!(
        ledger
            .fate("default/none-1")
            .is_some_and(|f| f.is_stopped_gracefully()),
        "none-1 not stopped gracefully in the ledger:\n{ledger}"
    );
    eprintln!(
        "main scenario ({logind:?}): cordon +{}, last VMI left +{}, lock released +{} ({} after), powered off +{}",
        secs(secs_between(o.requested, cordoned)),
        secs(secs_between(o.requested, last_left)),
        secs(secs_between(o.requested, o.released.gone)),
        secs(release_after),
        secs(secs_between(o.requested, o.powered_off)),
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

/// Each pod's first eviction that follows one KubeVirt answered with an evacuation (429)
/// reached the API server at least [`EVACUATION_SPACING`] after that answer left it, so each
/// VMI's marking wakes KubeVirt's evacuation controller on its own.
fn assert_first_evictions_paced(evictions: &[&AuditEntry]) {
    let mut sorted = evictions.to_vec();
    sorted.sort_by_key(|e| e.received);
    let mut firsts: Vec<&AuditEntry> = Vec::new();
    for e in sorted {
        if !firsts.iter().any(|f| f.name == e.name) {
            firsts.push(e);
        }
    }
    let evacuations = firsts.iter().filter(|e| e.code == 429).count();
    assert!(
        evacuations >= 3,
        "fewer than 3 first evictions answered with an evacuation: {:?}",
        firsts.iter().map(|e| (&e.name, e.code)).collect::<Vec<_>>()
    );
    for pair in firsts.windows(2) {
        if pair[0].code != 429 {
            continue;
        }
        let gap = pair[1]
            .received
            .duration_since(pair[0].completed)
            .unwrap_or_default();
        assert!(
            gap >= EVACUATION_SPACING,
            "{} evicted {gap:?} after {}'s evacuation was answered (want ≥ {EVACUATION_SPACING:?})",
            pair[1].name,
            pair[0].name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poweroff_migrates_live_vms_and_stops_the_rest_systemd() {
    main_scenario(LogindKind::Systemd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poweroff_migrates_live_vms_and_stops_the_rest_elogind() {
    main_scenario(LogindKind::Elogind).await;
}

/// A LiveMigrate VMI that cannot migrate is stopped at once when KubeVirt says so, gracefully,
/// and a Warning Event names it. The agent's fallback would stop any VMI still there at its
/// stop-by point, never before half its budget (InhibitDelayMaxSec minus the 5 s margin), so
/// the bound here — the stop begun within a quarter of that budget — only the immediate stop
/// meets; the lock goes well before logind's limit and no VM is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_migratable_vm_is_stopped_before_the_deadline() {
    let limit = 60;
    let budget = Duration::from_secs(limit - 5);
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
    let (o, agent) = power_off_with_agent(&bed, &[], Duration::from_secs(limit + 20)).await;
    let log = agent.log_text();
    o.recorder
        .wait_departed(&["default/stuck-1"], Duration::from_secs(5))
        .await;
    let departures = vmi_departures(&o);
    match departures.get("default/stuck-1") {
        Some((_, Change::Stopped { phase, .. })) => assert_eq!(phase, "Succeeded"),
        other => panic!("stuck-1 did not stop gracefully: {other:?}; agent log:\n{log}"),
    }
    // The stop was a graceful delete of the launcher pod, not a kill, and it came long before
    // the earliest fallback (half the budget).
    let deletes: Vec<_> = audit(&bed)
        .into_iter()
        .filter(|e| {
            e.resource == "pods"
                && e.verb == "delete"
                && e.name.starts_with("virt-launcher-stuck-1")
                && e.received >= o.requested
        })
        .collect();
    let first_delete = deletes
        .iter()
        .map(|e| e.received)
        .min()
        .unwrap_or_else(|| panic!("the launcher pod of stuck-1 was not deleted; log:\n{log}"));
    let stop_began = secs_between(o.requested, first_delete);
    let bound = budget.as_secs_f64() / 4.0;
    assert!(
        stop_began < bound,
        "stuck-1's stop began {stop_began:.1} s after the shutdown: not at once on \"not \
         live-migratable\" (bound {bound:.1} s; a fallback stop comes at ≥ {:.1} s)",
        budget.as_secs_f64() / 2.0
    );
    let held = secs_between(o.requested, o.released.gone);
    assert!(
        held < bound + 5.0,
        "lock held {held:.1} s, past what an immediate stop needs"
    );
    let ledger = assert_none_lost(&bed).await;
    assert!(
        matches!(
            ledger.fate("default/stuck-1").map(|f| &f.outcome),
            Some(Outcome::StoppedGracefully { grace_seconds: Some(g), .. }) if *g > 1
        ),
        "stuck-1 not stopped with a grace period:\n{ledger}"
    );
    let warned = o.recorder.changes().into_iter().any(
        |s| matches!(&s.change, Change::NodeWarning { message, .. } if message.contains("stuck-1")),
    );
    assert!(
        warned,
        "no Warning Event on node-1 naming stuck-1: {:?}",
        o.recorder.changes()
    );
    eprintln!(
        "non-migratable: stop began +{}, lock released +{}",
        secs(stop_began),
        secs(held)
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

/// A VMI that stops (eviction strategy None) takes longer than the migrations, so it is the
/// last to leave: the lock must wait for it, not only for the migrations, and go within 1 s of
/// its `Succeeded` write; the node powers off after that with no VM lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lock_waits_for_a_stopping_vm_that_leaves_last() {
    let bed = start_bed(BedOptions {
        vms: "live=2,none=1".parse().unwrap(),
        inhibit_delay_max_secs: Some(60),
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs(1),
            // Well past both migrations, well inside the launcher's 60 s grace period.
            shutdown_duration: Duration::from_secs(6),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await;
    let (o, agent) = power_off_with_agent(&bed, &[], Duration::from_secs(60)).await;
    let log = agent.log_text();
    let all = ["default/live-1", "default/live-2", "default/none-1"];
    assert!(
        o.recorder.wait_departed(&all, Duration::from_secs(5)).await,
        "not every VMI left: {:?}; agent log:\n{log}",
        vmi_departures(&o)
    );
    let departures = vmi_departures(&o);
    let (last, (_, change)) = departures
        .iter()
        .max_by_key(|(_, (at, _))| *at)
        .expect("departures");
    assert_eq!(
        (last.as_str(), matches!(change, Change::Stopped { .. })),
        ("default/none-1", true),
        "the scenario needs the stopping VMI to leave last: {departures:?}"
    );
    let entries = audit(&bed);
    let (_, last_left, release_after) = assert_released_after_last_departure(&entries, &o);
    let ledger = assert_none_lost(&bed).await;
    assert!(
        ledger
            .fate("default/none-1")
            .is_some_and(|f| f.is_stopped_gracefully()),
        "none-1 not stopped gracefully:\n{ledger}"
    );
    eprintln!(
        "stopping VMI last: it left +{}, lock released {} after it",
        secs(secs_between(o.requested, last_left)),
        secs(release_after)
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

async fn node_unschedulable(bed: &Bed) -> bool {
    let node = Api::<Node>::all(bed.client())
        .get(NODE)
        .await
        .expect("node-1");
    node.spec.and_then(|s| s.unschedulable).unwrap_or(false)
}

/// `--scope all`: a Deployment's pods and a bare pod on node-1 are evicted too; the DaemonSet's
/// pod stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scope_all_evicts_other_pods_but_not_daemonsets() {
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{ListParams, Patch, PatchParams, PostParams};

    let bed = start_bed(BedOptions {
        vms: "live=1".parse().unwrap(),
        inhibit_delay_max_secs: Some(60),
        ..BedOptions::default()
    })
    .await;
    let client = bed.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let cordon = |unschedulable: bool| {
        Patch::Merge(serde_json::json!({"spec": {"unschedulable": unschedulable}}))
    };
    // The scheduler must place the Deployment's pods on node-1: keep the other nodes closed
    // while they are created.
    for n in ["node-2", "node-3"] {
        nodes
            .patch(n, &PatchParams::default(), &cordon(true))
            .await
            .unwrap();
    }
    let container = serde_json::json!([{"name": "app", "image": "registry.invalid/app:1"}]);
    let deploy: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": container, "terminationGracePeriodSeconds": 2}}}
    })).unwrap();
    let ds: DaemonSet = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "node-agent"},
        "spec": {"selector": {"matchLabels": {"app": "node-agent"}},
                 "template": {"metadata": {"labels": {"app": "node-agent"}},
                              "spec": {"containers": container}}}
    }))
    .unwrap();
    let bare: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "bare"},
        "spec": {"nodeName": NODE, "containers": container, "terminationGracePeriodSeconds": 2}
    }))
    .unwrap();
    let pp = PostParams::default();
    Api::<Deployment>::namespaced(client.clone(), "default")
        .create(&pp, &deploy)
        .await
        .unwrap();
    Api::<DaemonSet>::namespaced(client.clone(), "default")
        .create(&pp, &ds)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&pp, &bare).await.unwrap();

    // Wait until 2 web pods, the DaemonSet's pod and the bare pod run on node-1.
    let on_node1 = ListParams::default().fields(&format!("spec.nodeName={NODE}"));
    let running_on_node1 = |list: &[std::sync::Arc<Pod>]| {
        let running = |prefix: &str| {
            list.iter()
                .filter(|p| {
                    p.metadata.name.as_deref().unwrap_or("").starts_with(prefix)
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                })
                .count()
        };
        running("web-") == 2 && running("node-agent-") == 1 && running("bare") == 1
    };
    let ready = {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, reflector, watcher};
        let (reader, writer) = reflector::store();
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={NODE}"));
        let stream = watcher(pods.clone(), cfg).default_backoff().reflect(writer);
        let mut stream = std::pin::pin!(stream);
        tokio::time::timeout(Duration::from_secs(30), async {
            while stream.next().await.is_some() {
                if running_on_node1(&reader.state()) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false)
    };
    assert!(ready, "workloads did not start on node-1");
    for n in ["node-2", "node-3"] {
        nodes
            .patch(n, &PatchParams::default(), &cordon(false))
            .await
            .unwrap();
    }
    let before = pods.list(&on_node1).await.unwrap();
    let name_of = |prefix: &str| -> Vec<String> {
        before
            .items
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .filter(|n| n.starts_with(prefix))
            .collect()
    };
    let (web, daemon) = (name_of("web-"), name_of("node-agent-"));

    let (o, agent) = power_off_with_agent(&bed, &["--scope", "all"], Duration::from_secs(60)).await;
    let log = agent.log_text();
    let entries = audit(&bed);
    let evicted = |name: &str| {
        entries.iter().any(|e| {
            e.subresource == "eviction"
                && e.verb == "create"
                && e.name == name
                && e.code == 201
                && e.received >= o.requested
        })
    };
    for name in web.iter().chain(std::iter::once(&"bare".to_owned())) {
        assert!(evicted(name), "{name} was not evicted; agent log:\n{log}");
    }
    let daemon = &daemon[0];
    assert!(
        !entries
            .iter()
            .any(|e| e.subresource == "eviction" && &e.name == daemon),
        "the DaemonSet pod {daemon} was evicted"
    );
    assert!(
        pods.get_opt(daemon).await.unwrap().is_some(),
        "the DaemonSet pod is gone"
    );
    o.recorder
        .wait_departed(&["default/live-1"], Duration::from_secs(5))
        .await;
    assert!(matches!(
        o.recorder.departures().get("default/live-1"),
        Some((_, Change::Migrated { .. }))
    ));
    // VMs first: the VM's launcher was evicted before any other pod.
    let first_vm = entries
        .iter()
        .filter(|e| e.subresource == "eviction" && e.name.starts_with("virt-launcher"))
        .map(|e| e.received)
        .min();
    let first_other = entries
        .iter()
        .filter(|e| e.subresource == "eviction" && !e.name.starts_with("virt-launcher"))
        .map(|e| e.received)
        .min();
    assert!(
        first_vm <= first_other,
        "other pods were evicted before the VMs"
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

/// Waits (watch) until node-1's `spec.unschedulable` is `want`.
async fn wait_unschedulable(bed: &Bed, want: bool, timeout: Duration) -> bool {
    let cond = kube::runtime::wait::await_condition(
        Api::<Node>::all(bed.client()),
        NODE,
        move |n: Option<&Node>| {
            n.and_then(|n| n.spec.as_ref())
                .and_then(|s| s.unschedulable)
                .unwrap_or(false)
                == want
        },
    );
    tokio::time::timeout(timeout, cond).await.is_ok()
}

/// Reboot: the agent cordons during the shutdown; after the node is back with a new boot ID, a
/// restarted agent uncordons it. A node an administrator cordoned stays cordoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reboot_uncordons_only_our_own_cordon() {
    let mut bed = start_bed(BedOptions {
        vms: "live=1".parse().unwrap(),
        inhibit_delay_max_secs: Some(60),
        ..BedOptions::default()
    })
    .await;
    let first_boot = bed.logind.read().await.boot_id();
    let agent = Agent::spawn(&bed, &[]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    let exit = bed
        .reboot_node(Duration::from_secs(60))
        .await
        .expect("node-1 reboots");
    assert_eq!(exit.action, testbed::logind::PowerAction::Reboot);
    assert!(
        node_unschedulable(&bed).await,
        "the agent did not cordon node-1 during the reboot; log:\n{}",
        agent.log_text()
    );
    drop(agent);
    let second_boot = bed.logind.read().await.boot_id();
    assert_ne!(
        first_boot, second_boot,
        "the node came back with the same boot ID"
    );

    let agent = Agent::spawn(&bed, &[]).await;
    assert!(
        wait_unschedulable(&bed, false, Duration::from_secs(30)).await,
        "the restarted agent did not uncordon node-1; log:\n{}",
        agent.log_text()
    );
    let node = Api::<Node>::all(bed.client()).get(NODE).await.unwrap();
    let annotations = node.metadata.annotations.unwrap_or_default();
    assert!(
        !annotations.contains_key("shutdown-guard.kubevirt.io/cordoned-boot-id"),
        "our cordon annotation stayed: {annotations:?}"
    );

    // Now an administrator cordons node-1 before the next reboot.
    let nodes: Api<Node> = Api::all(bed.client());
    nodes
        .patch(
            NODE,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    bed.reboot_node(Duration::from_secs(60))
        .await
        .expect("node-1 reboots again");
    drop(agent);
    let agent = Agent::spawn(&bed, &[]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    assert!(
        wait_log(&agent, "nothing of ours to undo", Duration::from_secs(30)).await,
        "the agent did not finish its start-up check; log:\n{}",
        agent.log_text()
    );
    assert!(
        node_unschedulable(&bed).await,
        "the administrator's cordon was undone"
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

/// logind or the bus restarted while the agent idles: the lock is back within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_comes_back_after_logind_or_bus_restart() {
    let bed = start_bed(BedOptions::default()).await;
    let agent = Agent::spawn(&bed, &[]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    // A bus restart takes logind with it (systemd-logind does not survive losing its bus and
    // is not re-activated by the new one, as on a real host): the bed restarts it after the bus.
    let node = bed.node(NODE).expect("node-1");
    for unit in ["systemd-logind.service", "dbus.service"] {
        if unit == "dbus.service" {
            node.restart_bus().await.expect("bus restart");
        } else {
            node.restart_logind().await.expect("logind restart");
        }
        let restarted = std::time::Instant::now();
        let back = testbed::wait::until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || async { holds_lock(&bed).await.then(|| restarted.elapsed()) },
        )
        .await;
        let Some(back) = back else {
            panic!(
                "no lock 10 s after restarting {unit}; inhibitors: {:?}; log:\n{}",
                bed.list_inhibitors().await,
                agent.log_text()
            );
        };
        eprintln!(
            "lock back {:.3} s after restarting {unit}",
            back.as_secs_f64()
        );
        assert!(
            back <= Duration::from_secs(2),
            "lock back only after {back:?} ({unit})"
        );
    }
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

/// Two nodes shut down together, each guarded by its own agent: node-2 starts first (its
/// agent cordons it), node-1 follows while node-2 still drains. Every VMI of both ends on
/// node-3, the only node left open; each lock goes only after its own node is empty (logind's
/// state file on each node), each node powers off after its own release, no VM is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_power_off_together_each_drained_by_its_own_agent() {
    let bed = start_bed(BedOptions {
        vms: "live=2".parse().unwrap(),
        loginds: testbed::bed::Loginds::First(2),
        inhibit_delay_max_secs: Some(60),
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs(2),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await;
    bed.control_plane
        .create_namespace("second")
        .await
        .expect("namespace");
    bed.kubevirt
        .create_vmis("second", "node-2", &"live=2".parse().unwrap())
        .await
        .expect("VMIs on node-2");
    let recorders = [
        Recorder::start(bed.client(), "node-1").await,
        Recorder::start(bed.client(), "node-2").await,
    ];
    let agents = [
        Agent::spawn_on(&bed, "node-1", &[]).await,
        Agent::spawn_on(&bed, "node-2", &[]).await,
    ];
    for (node, agent) in ["node-1", "node-2"].iter().zip(&agents) {
        wait_for_lock_on(&bed, node, agent).await;
    }
    let timeout = Duration::from_secs(60);
    let (n1, n2) = (bed.node("node-1").unwrap(), bed.node("node-2").unwrap());
    let watches = [
        n1.watch_release(WHO, timeout).await,
        n2.watch_release(WHO, timeout).await,
    ];
    n2.poweroff().await.expect("node-2's power-off starts");
    assert!(
        testbed::wait::until(
            Duration::from_secs(10),
            Duration::from_millis(10),
            || async { recorders[1].first(|c| *c == Change::Cordoned) }
        )
        .await
        .is_some(),
        "node-2's agent did not cordon it; log:\n{}",
        agents[1].log_text()
    );
    n1.poweroff().await.expect("node-1's power-off starts");
    let [w1, w2] = watches;
    let (r1, r2) = tokio::join!(w1.wait(), w2.wait());
    let released = [
        r1.expect("node-1's lock goes"),
        r2.expect("node-2's lock goes"),
    ];
    let offs = [
        n1.wait_poweroff(timeout).await.expect("node-1 powers off"),
        n2.wait_poweroff(timeout).await.expect("node-2 powers off"),
    ];
    let entries = audit(&bed);
    let vmis = [
        ["default/live-1", "default/live-2"],
        ["second/live-1", "second/live-2"],
    ];
    for i in 0..2 {
        let node = format!("node-{}", i + 1);
        assert!(
            recorders[i]
                .wait_departed(&vmis[i], Duration::from_secs(5))
                .await,
            "VMIs left on {node}: {:?}",
            recorders[i].vmis_on_node()
        );
        let departures = recorders[i].departures();
        for vmi in vmis[i] {
            match departures.get(vmi) {
                Some((at, Change::Migrated { target, .. })) => {
                    assert_eq!(target, "node-3", "{vmi} went to a node shutting down");
                    let left = server_write_before(&entries, vmi, *at).unwrap_or(*at);
                    assert!(
                        left <= released[i].gone,
                        "{node}'s lock went before {vmi} left"
                    );
                }
                other => panic!(
                    "{vmi} did not migrate off {node}: {other:?}; log:\n{}",
                    agents[i].log_text()
                ),
            }
        }
        assert!(
            offs[i] >= released[i].last_held,
            "{node} powered off while its lock was held"
        );
    }
    let ledger = assert_none_lost(&bed).await;
    assert_eq!(ledger.migrated().len(), 4, "{ledger}");
    drop(agents);
    bed.shutdown().await.expect("teardown");
}
