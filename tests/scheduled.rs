//! Scheduled shutdowns on the bed with a real logind (`shutdown -r +N`, unattended-upgrades'
//! `Automatic-Reboot-Time`): the agent drains the node ahead of the scheduled time, so the
//! shutdown finds nothing left to wait for; `shutdown -c` undoes it.
//!
//! logind's delay here is its own default (5 s) and each migration takes 6 s, so a drain that
//! starts at `PrepareForShutdown` cannot migrate anything: only the pre-drain can. Every verdict
//! comes from the API server's records (ledger, audit log, watches) and logind's side (its
//! inhibitor state file, the node's console), never from the agent.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use testbed::bed::{Bed, BedOptions, LogindKind, NODE, Release};
use testbed::kubevirt::{KubeVirtOptions, VirtualMachineInstance};
use testbed::ledger::LedgerReport;
use testbed::logind::schedule::{cancel_scheduled_shutdown, schedule_shutdown};
use testbed::timeline::{Change, Recorder, secs_between};

/// logind's default `InhibitDelayMaxSec`.
const DELAY_SECS: u64 = 5;
/// Longer than logind's delay.
const MIGRATION: Duration = Duration::from_secs(6);
/// How far ahead the shutdown is scheduled: enough for three migrations two at a time
/// (KubeVirt's default outbound limit per node, about 15 s here) before half the pre-drain's
/// time (when a VMI still here would be stopped) and, on systemd 252 and elogind, which do not
/// announce a schedule, the agent's 10 s poll on top.
const AHEAD: Duration = Duration::from_secs(40);
const AHEAD_POLLED: Duration = Duration::from_secs(50);
const VMIS: [&str; 3] = ["default/live-1", "default/live-2", "default/live-3"];

async fn bed_with_three_live_vms(logind: LogindKind) -> Bed {
    start_bed(BedOptions {
        vms: "live=3".parse().unwrap(),
        logind,
        inhibit_delay_max_secs: Some(DELAY_SECS),
        kubevirt: KubeVirtOptions {
            migration_duration: MIGRATION,
            shutdown_duration: Duration::from_secs(1),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await
}

/// `shutdown -r <at>` on `node`, as logind takes it.
async fn schedule_on(bed: &Bed, node: &str, kind: &str, at: SystemTime) {
    let n = bed.node(node).unwrap();
    let guard = n.logind().read().await;
    schedule_shutdown(&guard, kind, at)
        .await
        .unwrap_or_else(|e| panic!("logind on {node} does not schedule the {kind}: {e}"));
}

/// `shutdown -c` on `node`; asserts there was a schedule to cancel.
async fn cancel_on(bed: &Bed, node: &str) {
    let n = bed.node(node).unwrap();
    let guard = n.logind().read().await;
    let cancelled = cancel_scheduled_shutdown(&guard)
        .await
        .unwrap_or_else(|e| panic!("shutdown -c on {node}: {e}"));
    assert!(cancelled, "{node} had no schedule to cancel");
}

/// What a scheduled shutdown that fired looked like.
struct Fired {
    at: SystemTime,
    /// When logind's delay ended; `None` on elogind, which does not wait for a scheduled one
    /// (the lock outlives the bed's stand-in power command there).
    released: Option<Release>,
    powered_off: SystemTime,
    recorder: Recorder,
    ledger: LedgerReport,
    log: String,
}

/// Schedules a `kind` on node-1 (which runs `logind`) `ahead` from now, with the agent run
/// with `agent_args`, and waits for it to fire.
async fn scheduled_shutdown_fires(
    bed: &Bed,
    logind: LogindKind,
    kind: &str,
    agent_args: &[&str],
    ahead: Duration,
) -> Fired {
    let recorder = Recorder::start(bed.client(), NODE).await;
    let agent = Agent::spawn(bed, agent_args).await;
    wait_for_lock(bed, &agent, Duration::from_secs(30)).await;
    let timeout = ahead + Duration::from_secs(60);
    let watch = bed.watch_release(WHO, timeout).await;
    let at = now() + ahead;
    schedule_on(bed, NODE, kind, at).await;
    let powered_off = bed.wait_poweroff(timeout).await.unwrap_or_else(|e| {
        panic!(
            "node-1 did not shut down at the scheduled time: {e}; agent log:\n{}",
            agent.log_text()
        )
    });
    let released = match logind {
        LogindKind::Elogind => None,
        _ => Some(watch.wait().await.unwrap_or_else(|| {
            panic!(
                "node-1 shut down but the lock is still held; agent log:\n{}",
                agent.log_text()
            )
        })),
    };
    // Departures seen by the watch after the power-off are still judged by the ledger.
    recorder.wait_departed(&VMIS, Duration::from_secs(5)).await;
    let ledger = bed.ledger().await;
    Fired {
        at,
        released,
        powered_off,
        recorder,
        ledger,
        log: agent.log_text(),
    }
}

/// The pre-drain's verdicts: every VMI migrated and left before the scheduled time, none lost
/// or stopped, node-1 cordoned before it; returns when the last one left, relative to it (s).
fn assert_emptied_ahead(f: &Fired) -> f64 {
    let log = &f.log;
    let cordoned = f
        .recorder
        .first(|c| *c == Change::Cordoned)
        .unwrap_or_else(|| panic!("node-1 was never cordoned; agent log:\n{log}"));
    assert!(cordoned < f.at, "cordoned only when the shutdown fired");
    assert!(
        f.ledger.lost().is_empty() && f.ledger.stopped_gracefully().is_empty(),
        "VMs stopped or lost:\n{}\nagent log:\n{log}",
        f.ledger
    );
    let departures = f.recorder.departures();
    let mut last = f64::MIN;
    for vmi in VMIS {
        assert!(
            f.ledger.fate(vmi).is_some_and(|x| x.is_migrated()),
            "{vmi} not migrated in the ledger:\n{}",
            f.ledger
        );
        let (left, _) = departures
            .get(vmi)
            .unwrap_or_else(|| panic!("{vmi} never left node-1; agent log:\n{log}"));
        let before = secs_between(*left, f.at);
        assert!(
            before > 0.0,
            "{vmi} left {} after the scheduled time",
            secs(-before)
        );
        last = last.max(-before);
    }
    last
}

/// Real systemd (trixie, 257): a reboot scheduled 40 s ahead with three VMIs whose migrations
/// each take longer than logind's delay. With the pre-drain, all three have migrated before the
/// reboot fires, and `PrepareForShutdown` finds nothing left: logind's delay ends within a
/// second of the scheduled time. The same reboot with the pre-drain off migrates nothing (the
/// ledger shows the difference).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduled_reboot_is_drained_ahead_and_fires_on_an_empty_node_systemd_257() {
    let bed = bed_with_three_live_vms(LogindKind::Systemd).await;
    let f = scheduled_shutdown_fires(&bed, LogindKind::Systemd, "reboot", &[], AHEAD).await;
    let last_left = assert_emptied_ahead(&f);
    // The timer fires at the scheduled time (systemd's default accuracy, 250 ms, late at most).
    let delay_over = secs_between(f.at, f.released.as_ref().unwrap().gone);
    let down = secs_between(f.at, f.powered_off);
    assert!(
        delay_over < 1.0,
        "logind's delay ended {} after the scheduled time (want < 1 s: nothing to drain); agent log:\n{}",
        secs(delay_over),
        f.log
    );
    assert!(
        delay_over >= 0.0,
        "the lock went {} before the scheduled time: an empty pre-drained node still holds it",
        secs(-delay_over)
    );
    assert!(
        down < 1.0,
        "node-1 shut down {} after the scheduled time (want < 1 s)",
        secs(down)
    );
    assert!(
        f.log.contains("node empty ahead of the scheduled shutdown"),
        "the agent did not say the node was empty ahead; log:\n{}",
        f.log
    );
    eprintln!(
        "pre-drain (systemd 257): last VMI left {} before the scheduled time, lock released +{}, console 'Shutting down.' +{}; {}",
        secs(-last_left),
        secs(delay_over),
        secs(down),
        f.ledger.summary()
    );
    bed.shutdown().await.expect("teardown");

    let bed = bed_with_three_live_vms(LogindKind::Systemd).await;
    let f = scheduled_shutdown_fires(
        &bed,
        LogindKind::Systemd,
        "reboot",
        &["--pre-drain", "false"],
        // Nothing happens before it fires.
        Duration::from_secs(15),
    )
    .await;
    let cordoned = f.recorder.first(|c| *c == Change::Cordoned);
    assert!(
        cordoned.is_some_and(|c| c >= f.at),
        "without the pre-drain the node is cordoned only when the reboot fires: {cordoned:?} vs {:?}",
        f.at
    );
    assert!(
        f.ledger.migrated().is_empty(),
        "a migration fit into logind's delay after all:\n{}",
        f.ledger
    );
    assert_eq!(
        f.ledger.stopped_gracefully().len() + f.ledger.lost().len(),
        3,
        "{}",
        f.ledger
    );
    eprintln!(
        "without pre-drain (systemd 257): lock released +{} after the scheduled time; {}",
        secs(secs_between(f.at, f.released.as_ref().unwrap().gone)),
        f.ledger.summary()
    );
    bed.shutdown().await.expect("teardown");
}

/// systemd 252 announces no schedule: the agent reads it every 10 s and still empties the node
/// in time; its `PrepareForShutdown` then finds nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduled_reboot_is_drained_ahead_systemd_252() {
    let bed = bed_with_three_live_vms(LogindKind::SystemdBookworm).await;
    let f = scheduled_shutdown_fires(
        &bed,
        LogindKind::SystemdBookworm,
        "reboot",
        &[],
        AHEAD_POLLED,
    )
    .await;
    let last_left = assert_emptied_ahead(&f);
    let delay_over = secs_between(f.at, f.released.as_ref().unwrap().gone);
    assert!(
        delay_over < 1.0,
        "logind's delay ended {} after the scheduled time; agent log:\n{}",
        secs(delay_over),
        f.log
    );
    eprintln!(
        "pre-drain (systemd 252): last VMI left {} before the scheduled time, lock released +{}; {}",
        secs(-last_left),
        secs(delay_over),
        f.ledger.summary()
    );
    bed.shutdown().await.expect("teardown");
}

/// elogind runs its power command the moment a scheduled shutdown fires, without
/// `PrepareForShutdown` and without waiting for delay locks: the pre-drain is the only drain
/// such a shutdown gets, and it has emptied the node by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduled_poweroff_is_drained_ahead_elogind() {
    let bed = bed_with_three_live_vms(LogindKind::Elogind).await;
    let f =
        scheduled_shutdown_fires(&bed, LogindKind::Elogind, "poweroff", &[], AHEAD_POLLED).await;
    let last_left = assert_emptied_ahead(&f);
    eprintln!(
        "pre-drain (elogind): last VMI left {} before the scheduled time, power command +{}; {}",
        secs(-last_left),
        secs(secs_between(f.at, f.powered_off)),
        f.ledger.summary()
    );
    bed.shutdown().await.expect("teardown");
}

async fn unschedulable(bed: &Bed) -> bool {
    Api::<Node>::all(bed.client())
        .get(NODE)
        .await
        .ok()
        .and_then(|n| n.spec)
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

/// `shutdown -r +1`, then `shutdown -c` while the pre-drain is under way: node-1 is uncordoned,
/// no VMI is stopped, the evacuations KubeVirt had not finished are cancelled
/// (`evacuate/cancel`, KubeVirt 1.8), and the lock is still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_c_undoes_the_pre_drain_systemd_257() {
    let bed = start_bed(BedOptions {
        vms: "live=3".parse().unwrap(),
        inhibit_delay_max_secs: Some(DELAY_SECS),
        kubevirt: KubeVirtOptions {
            // Long enough that some are still evacuating when the schedule is cancelled.
            migration_duration: Duration::from_secs(20),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await;
    let recorder = Recorder::start(bed.client(), NODE).await;
    let agent = Agent::spawn(&bed, &[]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    schedule_on(&bed, NODE, "reboot", now() + Duration::from_secs(60)).await;
    let evacuating = testbed::wait::until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let marked = recorder
                .changes()
                .iter()
                .filter(|s| matches!(s.change, Change::EvacuationRequested { .. }))
                .count();
            (marked == VMIS.len()).then_some(())
        },
    )
    .await;
    assert!(
        evacuating.is_some(),
        "the pre-drain did not have every VMI marked for evacuation; agent log:\n{}",
        agent.log_text()
    );
    assert!(unschedulable(&bed).await, "node-1 not cordoned");
    let cancelled_at = now();
    cancel_on(&bed, NODE).await;
    let uncordoned = testbed::wait::until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async { (!unschedulable(&bed).await).then_some(()) },
    )
    .await;
    assert!(
        uncordoned.is_some(),
        "node-1 still cordoned after shutdown -c; agent log:\n{}",
        agent.log_text()
    );
    let cancels = testbed::wait::until(Duration::from_secs(10), Duration::from_millis(200), || {
        let entries = audit(&bed);
        async move {
            let n = entries
                .iter()
                .filter(|e| {
                    // The API server's request info names the first segment only.
                    e.resource == "virtualmachineinstances"
                        && e.subresource == "evacuate"
                        && e.received >= cancelled_at
                        && (200..300).contains(&e.code)
                })
                .count();
            (n > 0).then_some(n)
        }
    })
    .await;
    assert!(
        cancels.is_some(),
        "no evacuate/cancel after shutdown -c; agent log:\n{}",
        agent.log_text()
    );
    // KubeVirt's own record: no VMI is marked for evacuation any more.
    let vmis = Api::<VirtualMachineInstance>::namespaced(bed.client(), "default");
    let unmarked =
        testbed::wait::until(Duration::from_secs(10), Duration::from_millis(200), || {
            let vmis = vmis.clone();
            async move {
                let list = vmis.list(&Default::default()).await.ok()?;
                list.items
                    .iter()
                    .all(|v| v.evacuation_node_name().is_none())
                    .then_some(())
            }
        })
        .await;
    assert!(
        unmarked.is_some(),
        "VMIs still marked for evacuation after shutdown -c; agent log:\n{}",
        agent.log_text()
    );
    // Nothing stops for a cancelled schedule, and the lock stays for the next shutdown.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ledger = bed.ledger().await;
    assert!(
        ledger.lost().is_empty() && ledger.stopped_gracefully().is_empty(),
        "{ledger}"
    );
    assert!(holds_lock(&bed).await, "the lock went with the schedule");
    eprintln!(
        "shutdown -c: uncordoned, {} evacuate/cancel call(s); {}",
        cancels.unwrap_or(0),
        ledger.summary()
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

/// Whether `node` carries the agent's reboot-pending taint (PreferNoSchedule).
async fn reboot_pending_taint(bed: &Bed, node: &str) -> bool {
    Api::<Node>::all(bed.client())
        .get(node)
        .await
        .ok()
        .and_then(|n| n.spec)
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .iter()
        .any(|t| {
            t.key == shutdown_guard::kube::taint::REBOOT_PENDING_TAINT
                && t.effect == "PreferNoSchedule"
        })
}

async fn wait_taint(bed: &Bed, node: &str, want: bool, timeout: Duration) -> bool {
    testbed::wait::until(timeout, Duration::from_millis(200), || async {
        (reboot_pending_taint(bed, node).await == want).then_some(())
    })
    .await
    .is_some()
}

/// Three nodes. node-2's reboot is pending (scheduled an hour ahead: beyond the lead, so not
/// drained yet, but tainted `PreferNoSchedule` by its agent); node-1 powers off: every VMI its
/// agent evacuates lands on node-3, none on node-2. `shutdown -c` on node-2 takes the taint
/// away; the distribution's marker (`/run/reboot-required`, here a file of the bed's) alone
/// puts it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_avoid_a_node_whose_reboot_is_pending() {
    let bed = start_bed(BedOptions {
        vms: "live=4".parse().unwrap(),
        loginds: testbed::bed::Loginds::First(2),
        inhibit_delay_max_secs: Some(60),
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs(1),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await;
    // The bed's pods see the machine's own /run: node-2's marker lives in the bed's folder.
    let marker = bed.control_plane.dir().join("node-2-reboot-required");
    let marker_arg = marker.display().to_string();
    let second = Agent::spawn_on(&bed, "node-2", &["--reboot-required-file", &marker_arg]).await;
    assert!(
        !wait_taint(&bed, "node-2", true, Duration::from_secs(3)).await,
        "node-2 tainted with nothing pending"
    );
    schedule_on(&bed, "node-2", "reboot", now() + Duration::from_secs(3600)).await;
    assert!(
        wait_taint(&bed, "node-2", true, Duration::from_secs(20)).await,
        "node-2 not tainted for its pending reboot; its agent's log:\n{}",
        second.log_text()
    );
    let nodes: Api<Node> = Api::all(bed.client());
    let n2_node = nodes.get("node-2").await.unwrap();
    assert_ne!(
        n2_node.spec.and_then(|s| s.unschedulable),
        Some(true),
        "node-2 was cordoned for a reboot an hour away"
    );

    let (o, agent) = (
        Recorder::start(bed.client(), NODE).await,
        Agent::spawn(&bed, &[]).await,
    );
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    let watch = bed.watch_release(WHO, Duration::from_secs(60)).await;
    bed.poweroff().await.expect("node-1's power-off starts");
    watch.wait().await.expect("node-1's lock goes");
    bed.wait_poweroff(Duration::from_secs(60))
        .await
        .expect("node-1 powers off");
    let vmis = [
        "default/live-1",
        "default/live-2",
        "default/live-3",
        "default/live-4",
    ];
    o.wait_departed(&vmis, Duration::from_secs(5)).await;
    let ledger = assert_none_lost(&bed).await;
    for vmi in vmis {
        let fate = ledger.fate(vmi).expect("in the ledger");
        let targets: Vec<&str> = fate.migrations.iter().map(|m| m.to.as_str()).collect();
        assert_eq!(
            targets,
            vec!["node-3"],
            "{vmi} went to {targets:?}, not to node-3 alone:\n{ledger}"
        );
    }
    eprintln!("pending reboot on node-2: {}", ledger.summary());

    cancel_on(&bed, "node-2").await;
    assert!(
        wait_taint(&bed, "node-2", false, Duration::from_secs(20)).await,
        "the taint stayed after shutdown -c; node-2's agent log:\n{}",
        second.log_text()
    );
    std::fs::write(&marker, b"").expect("node-2's marker written");
    assert!(
        wait_taint(
            &bed,
            "node-2",
            true,
            shutdown_guard::agent::pending::MARKER_POLL + Duration::from_secs(5)
        )
        .await,
        "the reboot-required marker did not taint node-2; its agent's log:\n{}",
        second.log_text()
    );
    drop((agent, second));
    bed.shutdown().await.expect("teardown");
}

/// Four nodes; node-1, node-2 and node-3 each run two VMIs and an agent, and all three have
/// their reboot scheduled for the same moment (unattended-upgrades' `Automatic-Reboot-Time`).
/// They pre-drain in turns (one at a time: the default), never two at once (from the audit
/// log: each node's first eviction after the previous node's last VMI left), every VMI
/// migrates exactly once (to node-4, the one node whose reboot is not pending), and none is
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_scheduled_reboots_pre_drain_in_turns() {
    let bed = start_bed(BedOptions {
        nodes: 4,
        vms: "live=2".parse().unwrap(),
        loginds: testbed::bed::Loginds::First(3),
        inhibit_delay_max_secs: Some(DELAY_SECS),
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs(3),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await;
    let spread = [
        ("node-1", "default"),
        ("node-2", "second"),
        ("node-3", "third"),
    ];
    for (node, ns) in &spread[1..] {
        bed.control_plane
            .create_namespace(ns)
            .await
            .expect("namespace");
        bed.kubevirt
            .create_vmis(ns, node, &"live=2".parse().unwrap())
            .await
            .expect("VMIs");
    }
    let mut recorders = Vec::new();
    let mut agents = Vec::new();
    for (node, _) in &spread {
        recorders.push(Recorder::start(bed.client(), node).await);
        let agent = Agent::spawn_on(&bed, node, &[]).await;
        wait_for_lock_on(&bed, node, &agent).await;
        agents.push(agent);
    }
    let at = now() + Duration::from_secs(60);
    for (node, _) in &spread {
        schedule_on(&bed, node, "reboot", at).await;
    }
    let logs = || {
        agents
            .iter()
            .map(|a| a.log_text())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    for (node, _) in &spread {
        let n = bed.node(node).unwrap();
        n.wait_poweroff(Duration::from_secs(120))
            .await
            .unwrap_or_else(|e| panic!("{node} did not reboot: {e}; agent logs:\n{}", logs()));
    }
    let names = |ns: &str| [format!("{ns}/live-1"), format!("{ns}/live-2")];
    for ((_, ns), r) in spread.iter().zip(&recorders) {
        let vmis = names(ns);
        let vmis: Vec<&str> = vmis.iter().map(String::as_str).collect();
        r.wait_departed(&vmis, Duration::from_secs(5)).await;
    }
    let ledger = assert_none_lost(&bed).await;
    for (_, ns) in &spread {
        for vmi in names(ns) {
            let fate = ledger.fate(&vmi).expect("in the ledger");
            let targets: Vec<&str> = fate.migrations.iter().map(|m| m.to.as_str()).collect();
            assert_eq!(
                targets,
                vec!["node-4"],
                "{vmi}:\n{ledger}\nagent logs:\n{}",
                logs()
            );
        }
    }
    // Each node's pre-drain: from its first eviction to the server's write of its last
    // departure; sorted by start, none begins before the one before it ended.
    let entries = audit(&bed);
    let mut windows: Vec<(SystemTime, SystemTime, &str)> = Vec::new();
    for ((node, ns), r) in spread.iter().zip(&recorders) {
        let first = entries
            .iter()
            .filter(|e| e.subresource == "eviction" && e.verb == "create" && e.namespace == *ns)
            .map(|e| e.received)
            .min()
            .unwrap_or_else(|| panic!("no eviction on {node}"));
        let departures = r.departures();
        let last = names(ns)
            .iter()
            .map(|v| {
                let (seen, _) = departures.get(v).expect("departed");
                server_write_before(&entries, v, *seen).expect("its departing write")
            })
            .max()
            .unwrap();
        assert!(
            last < at,
            "{node}'s pre-drain ended after the scheduled time"
        );
        windows.push((first, last, node));
    }
    windows.sort();
    for pair in windows.windows(2) {
        let ((_, end, a), (start, _, b)) = (pair[0], pair[1]);
        assert!(
            start >= end,
            "{b}'s pre-drain began {} before {a}'s ended; agent logs:\n{}",
            secs(secs_between(start, end)),
            logs()
        );
    }
    eprintln!(
        "turns: {}; {}",
        windows
            .iter()
            .map(|(s, e, n)| format!(
                "{n} +{}..+{}",
                secs(secs_between(windows[0].0, *s)),
                secs(secs_between(windows[0].0, *e))
            ))
            .collect::<Vec<_>>()
            .join(", "),
        ledger.summary()
    );
    drop(agents);
    bed.shutdown().await.expect("teardown");
}
