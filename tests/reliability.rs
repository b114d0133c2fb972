//! The faults every production cluster meets, on the bed with a real logind: the worker dies
//! (SIGKILL, a panic, an OOM kill of its container) mid-drain, the agent starts after the
//! shutdown began, the API server goes away or every connection to it freezes, the drain loop
//! has nothing to do for a long time, a VM is being migrated into the node, a VM is still
//! booting, the power-off fails, logind's delay was lowered after the agent started. The VM
//! ledger, logind's inhibitor state file and the audit log are the judges; the agent's own log
//! is shown, never trusted.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use nix::sys::signal::Signal;
use testbed::bed::{Bed, BedOptions, NODE, Release};
use testbed::kubevirt::KubeVirtOptions;
use testbed::ledger::LedgerReport;
use testbed::pod::{PodOutput, PodSpec};
use testbed::timeline::{AuditEntry, secs_between};
use testbed::wait;

fn live_vms(n: usize, migration: Duration) -> BedOptions {
    BedOptions {
        vms: format!("live={n}").parse().unwrap(),
        inhibit_delay_max_secs: Some(120),
        kubevirt: KubeVirtOptions {
            migration_duration: migration,
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    }
}

/// Evictions the API server received after `after`.
fn evictions_after(entries: &[AuditEntry], after: SystemTime) -> Vec<&AuditEntry> {
    entries
        .iter()
        .filter(|e| e.subresource == "eviction" && e.verb == "create" && e.received > after)
        .collect()
}

/// The process that talks to the API server: the worker the holder started (the agent pod's
/// `shutdown-guard worker`), or, for an agent that is one process, the agent itself.
fn worker_pid(agent: &Agent) -> Option<u32> {
    let arg1 = |pid: &u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .and_then(|c| c.split(|b| *b == 0).nth(1).map(<[u8]>::to_vec))
    };
    let procs = agent.pod.processes();
    procs
        .iter()
        .find(|p| arg1(p).as_deref() == Some(b"worker".as_slice()))
        .or_else(|| {
            procs
                .iter()
                .find(|p| arg1(p).as_deref() == Some(b"run".as_slice()))
        })
        .copied()
}

async fn wait_worker(agent: &Agent, not: Option<u32>) -> u32 {
    wait::until(
        Duration::from_secs(15),
        Duration::from_millis(20),
        || async { worker_pid(agent).filter(|p| Some(*p) != not) },
    )
    .await
    .unwrap_or_else(|| panic!("no drain worker; agent log:\n{}", agent.log_text()))
}

/// Waits until the audit log shows the drain's first eviction.
async fn wait_first_eviction(bed: &Bed, after: SystemTime) -> SystemTime {
    wait::until(
        Duration::from_secs(20),
        Duration::from_millis(20),
        || async {
            evictions_after(&audit(bed), after)
                .first()
                .map(|e| e.received)
        },
    )
    .await
    .expect("the drain evicted something")
}

/// Every VMI of the bed left node-1 by migrating, none lost; the lock went only after the last
/// move, and node-1 powered off only after that.
async fn assert_all_migrated_then_released(
    bed: &Bed,
    released: &Release,
    vmis: &[&str],
) -> LedgerReport {
    let ledger = assert_none_lost(bed).await;
    // The ledger's watch may deliver a move a few ms after the agent's did: compare with the
    // write the API server received, not with the ledger's sighting of it.
    let entries = audit(bed);
    let mut last_move = SystemTime::UNIX_EPOCH;
    for v in vmis {
        let fate = ledger
            .fate(v)
            .unwrap_or_else(|| panic!("{v} not in the ledger:\n{ledger}"));
        assert!(fate.is_migrated(), "{v} did not migrate:\n{ledger}");
        let seen = fate.migrations.last().unwrap().at;
        last_move = last_move.max(server_write_before(&entries, v, seen).unwrap_or(seen));
    }
    assert!(
        released.gone >= last_move,
        "the lock went {:.3} s before the last VMI left node-1",
        secs_between(released.gone, last_move)
    );
    ledger
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_drain_leaves_the_lock_held_and_the_drain_resumes() {
    let bed = start_bed(live_vms(3, Duration::from_secs(6))).await;
    let agent = Agent::spawn(&bed, &[]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    let worker = wait_worker(&agent, None).await;
    let watch = bed.watch_release(WHO, Duration::from_secs(120)).await;
    let requested = now();
    bed.poweroff().await.expect("power-off starts");
    wait_first_eviction(&bed, requested).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    agent
        .pod
        .signal_process(worker, Signal::SIGKILL)
        .expect("the worker is killed");
    let killed = now();
    // The next worker takes the drain up: its first eviction within 2 s of the kill.
    let resumed = wait::until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            evictions_after(&audit(&bed), killed)
                .first()
                .map(|e| e.received)
        },
    )
    .await
    .unwrap_or_else(|| panic!("the drain never resumed; agent log:\n{}", agent.log_text()));
    let resume_s = secs_between(killed, resumed);
    let released = watch
        .wait()
        .await
        .unwrap_or_else(|| panic!("lock still held; agent log:\n{}", agent.log_text()));
    assert!(
        released.gone > killed + Duration::from_secs(2),
        "the lock went with the worker ({:.3} s after the kill)",
        secs_between(killed, released.gone)
    );
    let powered_off = bed.wait_poweroff(Duration::from_secs(60)).await.unwrap();
    assert!(powered_off >= released.last_held);
    assert_all_migrated_then_released(
        &bed,
        &released,
        &["default/live-1", "default/live-2", "default/live-3"],
    )
    .await;
    assert!(resume_s <= 2.0, "resumed {resume_s:.3} s after the kill");
    eprintln!(
        "worker SIGKILLed +{:.3} s into the drain; next eviction {resume_s:.3} s later; lock released +{:.3} s",
        secs_between(requested, killed),
        secs_between(requested, released.gone)
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_that_panics_mid_drain_is_replaced_and_the_drain_finishes() {
    let bed = start_bed(live_vms(3, Duration::from_secs(6))).await;
    let once = bed.control_plane.dir().join("panic-once");
    let agent = Agent::spawn_with(&bed, NODE, &[], |spec| {
        spec.env("SGTEST_FAULT", "panic:1")
            .env("SGTEST_FAULT_ONCE", once.display().to_string())
    })
    .await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    let watch = bed.watch_release(WHO, Duration::from_secs(120)).await;
    let requested = now();
    bed.poweroff().await.expect("power-off starts");
    let released = watch
        .wait()
        .await
        .unwrap_or_else(|| panic!("lock still held; agent log:\n{}", agent.log_text()));
    let log = agent.log_text();
    assert!(
        log.contains("SGTEST_FAULT: panic"),
        "the worker never panicked:\n{log}"
    );
    assert!(log.contains("drain worker gone"), "{log}");
    bed.wait_poweroff(Duration::from_secs(60)).await.unwrap();
    assert_all_migrated_then_released(
        &bed,
        &released,
        &["default/live-1", "default/live-2", "default/live-3"],
    )
    .await;
    eprintln!(
        "worker panicked; lock released +{:.3} s",
        secs_between(requested, released.gone)
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

/// The holder as the DaemonSet's `holder` container runs it on node-1: listening for its worker
/// on `dir`/link.sock, its state in `dir`, its log in `dir`/holder.log.
async fn spawn_holder_pod(
    bed: &Bed,
    dir: &std::path::Path,
) -> (testbed::pod::Pod, std::path::PathBuf) {
    let socket = dir.join("link.sock").display().to_string();
    let state = dir.display().to_string();
    let log = dir.join("holder.log");
    let pod = bed
        .node(NODE)
        .unwrap()
        .spawn_pod(
            PodSpec::new(
                AGENT,
                &[
                    "run",
                    "--node",
                    NODE,
                    "--log-format",
                    "json",
                    "--link-socket",
                    &socket,
                    "--state-dir",
                    &state,
                ],
            )
            .name("shutdown-guard-holder")
            .output(PodOutput::File(log.clone())),
        )
        .await
        .expect("the holder starts");
    (pod, log)
}

/// The DaemonSet's shape: the holder and the worker in containers of their own, the worker's
/// with the DaemonSet's memory limit and kubelet's OOM group kill. The test plays kubelet's part
/// of restarting the worker's container.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_oom_killed_in_its_own_container_is_replaced_and_the_lock_stays() {
    let bed = start_bed(live_vms(3, Duration::from_secs(6))).await;
    let dir = tempfile::tempdir_in(bed.control_plane.dir()).unwrap();
    let socket = dir.path().join("link.sock").display().to_string();
    let once = dir.path().join("oom-once").display().to_string();
    let (holder, holder_log) = spawn_holder_pod(&bed, dir.path()).await;
    let node1 = bed.node(NODE).unwrap();
    // Kubelet's part: the worker container, restarted whenever it dies (bounded).
    let worker_log = dir.path().join("worker.log");
    let spawn_worker = || {
        PodSpec::new(
            AGENT,
            &[
                "worker",
                "--node",
                NODE,
                "--log-format",
                "json",
                "--link-socket",
                &socket,
            ],
        )
        .name("shutdown-guard-worker")
        .memory_max(128 << 20)
        .env("SGTEST_FAULT", "oom:1")
        .env("SGTEST_FAULT_ONCE", once.clone())
        .output(PodOutput::File(worker_log.clone()))
    };
    let mut worker = node1
        .spawn_pod(spawn_worker())
        .await
        .expect("the worker starts");
    wait_for_lock_logged(&bed, &holder_log, Duration::from_secs(30)).await;
    let watch = bed.watch_release(WHO, Duration::from_secs(120)).await;
    let requested = now();
    bed.poweroff().await.expect("power-off starts");
    let status = worker
        .wait_timeout(Duration::from_secs(60))
        .await
        .expect("the worker was OOM-killed");
    let cgroup_kills = worker
        .cgroup()
        .map(|c| c.oom_kills() + c.group_kills())
        .unwrap_or(0);
    assert!(
        cgroup_kills > 0,
        "no OOM kill in the worker's container ({status:?})"
    );
    let killed = now();
    let _restarted = node1
        .spawn_pod(spawn_worker())
        .await
        .expect("kubelet restarts it");
    let released = watch.wait().await.unwrap_or_else(|| {
        panic!(
            "lock still held; holder log:\n{}",
            std::fs::read_to_string(&holder_log).unwrap_or_default()
        )
    });
    assert!(
        released.gone > killed,
        "the lock went with the worker's container"
    );
    bed.wait_poweroff(Duration::from_secs(60)).await.unwrap();
    assert_all_migrated_then_released(
        &bed,
        &released,
        &["default/live-1", "default/live-2", "default/live-3"],
    )
    .await;
    eprintln!(
        "worker container OOM-killed +{:.3} s into the drain ({cgroup_kills} kills); lock released +{:.3} s",
        secs_between(requested, killed),
        secs_between(requested, released.gone)
    );
    drop(holder);
    bed.shutdown().await.expect("teardown");
}

/// The holder has the host's bus; the worker is the part that faces the network. A worker that
/// sends the holder an endless line (broken, or taken over) must not grow the holder until the
/// kernel kills it and its lock: the holder cuts that link after 1 KiB, keeps its lock, and
/// takes the next worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_flooding_its_link_is_cut_off_and_the_lock_stays() {
    use tokio::io::AsyncWriteExt;

    let bed = start_bed(BedOptions::default()).await;
    let dir = tempfile::tempdir_in(bed.control_plane.dir()).unwrap();
    let socket = dir.path().join("link.sock");
    let (holder, holder_log) = spawn_holder_pod(&bed, dir.path()).await;
    wait_for_lock_logged(&bed, &holder_log, Duration::from_secs(30)).await;
    let log = || std::fs::read_to_string(&holder_log).unwrap_or_default();

    // 8 MiB without a newline; the holder may hang up long before the end.
    let mut flood = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("the worker's socket");
    let chunk = vec![b'x'; 64 << 10];
    let mut sent = 0usize;
    for _ in 0..128 {
        match tokio::time::timeout(Duration::from_secs(5), flood.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            _ => break,
        }
    }
    let cut = wait::until(Duration::from_secs(15), Duration::from_millis(100), || {
        std::future::ready(log().contains("the worker's link broke").then_some(()))
    })
    .await;
    assert!(
        cut.is_some(),
        "the holder never cut the flooding link ({sent} bytes sent); holder log:\n{}",
        log()
    );
    assert!(
        guard_lock(&bed).await.is_some(),
        "the holder lost its lock; log:\n{}",
        log()
    );
    drop(flood);

    // The next worker is taken as usual.
    let mut next = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("the socket still accepts");
    next.write_all(b"alive\n").await.expect("a line");
    let connected = wait::until(Duration::from_secs(10), Duration::from_millis(100), || {
        std::future::ready((log().matches("drain worker connected").count() >= 2).then_some(()))
    })
    .await;
    assert!(
        connected.is_some(),
        "no second worker taken; log:\n{}",
        log()
    );
    assert!(guard_lock(&bed).await.is_some(), "the lock went");
    eprintln!("cut off after {sent} bytes written into the link");
    drop(next);
    drop(holder);
    bed.shutdown().await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_started_while_a_shutdown_is_delayed_drains_without_a_lock() {
    let bed = start_bed(BedOptions {
        vms: "live=2,none=1".parse().unwrap(),
        inhibit_delay_max_secs: Some(40),
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs(2),
            shutdown_duration: Duration::from_secs(1),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await;
    // Someone else's lock keeps the shutdown delayed until logind's cut.
    let _other = hold_delay_lock(&bed, "backup", "a backup that never ends").await;
    let requested = now();
    bed.poweroff().await.expect("power-off starts");
    let agent = Agent::spawn(&bed, &[]).await;
    let powered_off = bed
        .wait_poweroff(Duration::from_secs(60))
        .await
        .expect("node-1 powers off at logind's cut");
    let ledger = assert_none_lost(&bed).await;
    let log = agent.log_text();
    assert!(
        log.contains("DrainWithoutLock") || log.contains("draining without one"),
        "the agent did not say it drains without a lock:\n{log}"
    );
    for v in ["default/live-1", "default/live-2"] {
        assert!(
            ledger.fate(v).is_some_and(|f| f.is_migrated()),
            "{v}:\n{ledger}"
        );
    }
    assert!(
        ledger
            .fate("default/none-1")
            .is_some_and(|f| f.is_stopped_gracefully()),
        "{ledger}"
    );
    eprintln!(
        "started late: node powered off +{:.3} s with every VM gone",
        secs_between(requested, powered_off)
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

/// Whether node-1 is cordoned, read from the API server. After a test restarted or froze the
/// API server the first read can fail on the way there; reads are retried (10 s at most) so
/// that a failed read is not taken for an answer.
async fn node_cordoned(bed: &Bed) -> bool {
    let read = wait::until(
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async { Api::<Node>::all(bed.client()).get(NODE).await.ok() },
    )
    .await
    .expect("node-1 could not be read within 10 s");
    read.spec.and_then(|s| s.unschedulable).unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_server_down_for_10s_as_the_shutdown_begins() {
    let bed = start_bed(live_vms(2, Duration::from_secs(3))).await;
    let agent = Agent::spawn(&bed, &[]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    let watch = bed.watch_release(WHO, Duration::from_secs(120)).await;
    let api = bed.api();
    // Down as the shutdown begins: the cordon's first attempts find nobody.
    api.stop().await.expect("kube-apiserver stops");
    let requested = now();
    bed.poweroff().await.expect("power-off starts");
    tokio::time::sleep(Duration::from_secs(10)).await;
    api.start().await.expect("kube-apiserver is back");
    let released = watch
        .wait()
        .await
        .unwrap_or_else(|| panic!("lock still held; agent log:\n{}", agent.log_text()));
    bed.wait_poweroff(Duration::from_secs(60)).await.unwrap();
    assert!(
        node_cordoned(&bed).await,
        "node-1 was never cordoned; agent log:\n{}",
        agent.log_text()
    );
    assert_all_migrated_then_released(&bed, &released, &["default/live-1", "default/live-2"]).await;
    eprintln!(
        "API server down 10 s: lock released +{:.3} s",
        secs_between(requested, released.gone)
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

/// As after an API VIP failover: the agent's open connections go silent for good (a load
/// balancer that keeps acknowledging), new ones work. The drain must notice and reconnect,
/// not wait for the deadline with a dead watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_open_api_connection_frozen_mid_drain() {
    let bed = start_bed(live_vms(3, Duration::from_secs(4))).await;
    let agent = Agent::spawn(&bed, &[]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    let watch = bed.watch_release(WHO, Duration::from_secs(150)).await;
    let api = bed.api();
    let requested = now();
    bed.poweroff().await.expect("power-off starts");
    wait_first_eviction(&bed, requested).await;
    api.freeze(testbed::apiproxy::Freeze::Established);
    let frozen = now();
    let released = watch
        .wait()
        .await
        .unwrap_or_else(|| panic!("lock still held; agent log:\n{}", agent.log_text()));
    api.thaw();
    bed.wait_poweroff(Duration::from_secs(60)).await.unwrap();
    assert!(node_cordoned(&bed).await, "node-1 was never cordoned");
    let ledger = assert_all_migrated_then_released(
        &bed,
        &released,
        &["default/live-1", "default/live-2", "default/live-3"],
    )
    .await;
    let last_move = ledger
        .migrated()
        .iter()
        .filter_map(|f| f.migrations.last().map(|m| m.at))
        .max()
        .unwrap();
    let lag = secs_between(last_move, released.gone);
    // Budget 115 s: a drain stuck on its dead watch would hold the lock to there.
    assert!(
        lag < 35.0,
        "the lock went {lag:.3} s after the last VMI left: the frozen watch was not noticed; \
         agent log:\n{}",
        agent.log_text()
    );
    eprintln!(
        "open connections frozen +{:.3} s: last VMI left +{:.3} s, lock released {lag:.3} s after it",
        secs_between(requested, frozen),
        secs_between(requested, last_move)
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_longer_than_the_budget_ends_at_the_deadline() {
    let mut opts = live_vms(1, Duration::from_secs(2));
    opts.inhibit_delay_max_secs = Some(20);
    let bed = start_bed(opts).await;
    let agent = Agent::spawn(&bed, &[]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    let watch = bed.watch_release(WHO, Duration::from_secs(60)).await;
    let api = bed.api();
    api.stop().await.expect("kube-apiserver stops");
    let requested = now();
    bed.poweroff().await.expect("power-off starts");
    let released = watch.wait().await.expect("the lock goes at the deadline");
    let powered_off = bed.wait_poweroff(Duration::from_secs(60)).await.unwrap();
    let at = secs_between(requested, released.gone);
    // Budget 15 s (20 s − 5 s margin); logind's own cut is at 20 s.
    assert!((14.0..19.5).contains(&at), "lock released +{at:.3} s");
    assert!(powered_off >= released.last_held);
    api.start().await.expect("kube-apiserver is back");
    eprintln!("API server down throughout: lock released +{at:.3} s, before logind's cut at 20 s");
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

/// The agent's watch calls as the API server received them: (when, resource, timeoutSeconds).
fn agent_watches(bed: &Bed) -> Vec<(SystemTime, String, u32)> {
    let events = bed.control_plane.audit_events().expect("audit log");
    events
        .iter()
        .filter(|e| {
            e.stage == "ResponseStarted"
                && e.verb == "watch"
                && e.user_agent.starts_with("shutdown-guard/")
        })
        .map(|e| {
            let at: chrono::DateTime<chrono::Utc> = e
                .request_received_timestamp
                .parse()
                .expect("an audit timestamp");
            let timeout = e
                .request_uri
                .split(['?', '&'])
                .find_map(|kv| kv.strip_prefix("timeoutSeconds="))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("a watch without timeoutSeconds: {}", e.request_uri));
            (at.into(), e.resource_path(), timeout)
        })
        .collect()
}

/// Between drains nothing waits on the node's watches: they are long calls, a few requests an
/// hour per agent. A drain opens its own short ones on the calls' client, whose read timeout
/// notices a stalled connection within seconds (`every_open_api_connection_frozen_mid_drain`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_watches_are_long_calls_and_a_drain_follows_with_short_ones() {
    let bed = start_bed(live_vms(2, Duration::from_secs(2))).await;
    let agent = Agent::spawn(&bed, &[]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    let both_open = |w: &[(SystemTime, String, u32)]| {
        ["pods", "virtualmachineinstances"]
            .iter()
            .all(|r| w.iter().any(|(_, res, _)| res == r))
    };
    wait::until(
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async { both_open(&agent_watches(&bed)).then_some(()) },
    )
    .await
    .unwrap_or_else(|| {
        panic!(
            "the idle watches never opened; agent log:\n{}",
            agent.log_text()
        )
    });
    let watch = bed.watch_release(WHO, Duration::from_secs(60)).await;
    let requested = now();
    bed.poweroff().await.expect("power-off starts");
    let released = watch
        .wait()
        .await
        .unwrap_or_else(|| panic!("lock still held; agent log:\n{}", agent.log_text()));
    bed.wait_poweroff(Duration::from_secs(60)).await.unwrap();
    assert_all_migrated_then_released(&bed, &released, &["default/live-1", "default/live-2"]).await;

    let all = agent_watches(&bed);
    let (idle, draining): (Vec<_>, Vec<_>) = all.iter().partition(|(at, _, _)| *at < requested);
    assert!(
        both_open(&idle.iter().map(|w| (*w).clone()).collect::<Vec<_>>()),
        "no idle watch of pods and VMIs: {all:?}"
    );
    assert!(
        idle.iter().all(|(_, _, t)| *t == 290),
        "an idle watch was not a 290 s call: {idle:?}"
    );
    for r in ["pods", "virtualmachineinstances"] {
        assert!(
            draining.iter().any(|(_, res, t)| res == r && *t == 20),
            "the drain followed {r} with no 20 s watch: {draining:?}; agent log:\n{}",
            agent.log_text()
        );
    }
    eprintln!(
        "agent watches: {} before the shutdown (290 s calls), {} after it",
        idle.len(),
        draining.len()
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

/// CPU time (utime + stime, in clock ticks) of the given processes.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_that_waits_on_a_refused_pod_costs_almost_no_cpu() {
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use kube::api::PostParams;

    let mut opts = live_vms(1, Duration::from_secs(1));
    opts.inhibit_delay_max_secs = Some(35);
    let bed = start_bed(opts).await;
    let client = bed.client();
    // A bare pod on node-1 that a PodDisruptionBudget never lets go.
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "precious", "namespace": "default", "labels": {"app": "precious"}},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "none"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    let pdb: PodDisruptionBudget = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "precious", "namespace": "default"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "precious"}}}
    }))
    .unwrap();
    Api::<PodDisruptionBudget>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pdb)
        .await
        .unwrap();
    let agent = Agent::spawn(&bed, &["--scope", "all"]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    let watch = bed.watch_release(WHO, Duration::from_secs(60)).await;
    bed.poweroff().await.expect("power-off starts");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pids = agent.pod.processes();
    let before = (cpu_ticks(&pids), std::time::Instant::now());
    let released = watch.wait().await.expect("released at the deadline");
    let ticks = cpu_ticks(&pids) - before.0;
    let wall = before.1.elapsed().as_secs_f64();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let share = ticks as f64 / hz / wall;
    let refused = evictions_after(&audit(&bed), SystemTime::UNIX_EPOCH)
        .iter()
        .filter(|e| e.name == "precious" && e.code == 429)
        .count();
    eprintln!(
        "drain of {wall:.1} s waiting on a PDB-refused pod: agent CPU {:.3} s = {:.3} % of one core ({refused} refused evictions); lock released at {:?}",
        ticks as f64 / hz,
        share * 100.0,
        released.gone
    );
    assert!(refused >= 2, "the pod's eviction was not retried");
    assert!(
        share < 0.01,
        "the agent used {:.2} % of a core",
        share * 100.0
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_into_the_node_is_cancelled_before_the_lock_goes() {
    let bed = start_bed(BedOptions {
        vms: "live=1,node-2:live=1".parse().unwrap(),
        inhibit_delay_max_secs: Some(120),
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs(20),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await;
    let agent = Agent::spawn(&bed, &[]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    // live-2 is on its way from node-2 into node-1.
    bed.kubevirt
        .migrate("default", "live-2", NODE)
        .await
        .expect("a migration into node-1");
    let target_up = wait::until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(bed.client(), "default")
                .list(&kube::api::ListParams::default().labels("kubevirt.io/migrationJobUID"))
                .await
                .ok()?;
            pods.items
                .iter()
                .any(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(NODE))
                .then_some(())
        },
    )
    .await;
    assert!(target_up.is_some(), "no target pod on node-1");
    let watch = bed.watch_release(WHO, Duration::from_secs(120)).await;
    let requested = now();
    bed.poweroff().await.expect("power-off starts");
    let released = watch
        .wait()
        .await
        .unwrap_or_else(|| panic!("lock still held; agent log:\n{}", agent.log_text()));
    bed.wait_poweroff(Duration::from_secs(60)).await.unwrap();
    let ledger = assert_none_lost(&bed).await;
    let fate = ledger.fate("default/live-2").expect("live-2 in the ledger");
    let cancelled = fate.migrations.iter().all(|m| m.to != NODE);
    let entries = audit(&bed);
    let vmim_deleted = entries.iter().any(|e| {
        e.resource == "virtualmachineinstancemigrations"
            && e.verb == "delete"
            && e.received > requested
    });
    if cancelled {
        assert!(
            vmim_deleted,
            "live-2 stayed on node-2 without the agent cancelling"
        );
    } else {
        // Too late to cancel: it arrived, and then left again before the lock went.
        let arrived_and_left = fate.migrations.len() >= 2;
        assert!(
            arrived_and_left,
            "live-2 reached node-1 and stayed:\n{ledger}"
        );
    }
    assert!(
        ledger
            .fate("default/live-1")
            .is_some_and(|f| f.is_migrated()),
        "{ledger}"
    );
    eprintln!(
        "inbound migration {}; lock released +{:.3} s",
        if cancelled {
            "cancelled"
        } else {
            "completed, then evicted"
        },
        secs_between(requested, released.gone)
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_booting_vmi_migrates_once_it_runs_instead_of_being_stopped() {
    let bed = start_bed(BedOptions {
        vms: "live=1/boot=8s".parse().unwrap(),
        inhibit_delay_max_secs: Some(60),
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs(2),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await;
    let agent = Agent::spawn(&bed, &[]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    let watch = bed.watch_release(WHO, Duration::from_secs(60)).await;
    bed.poweroff().await.expect("power-off starts");
    let released = watch
        .wait()
        .await
        .unwrap_or_else(|| panic!("lock still held; agent log:\n{}", agent.log_text()));
    bed.wait_poweroff(Duration::from_secs(60)).await.unwrap();
    assert_all_migrated_then_released(&bed, &released, &["default/live-1"]).await;
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_power_off_that_fails_gives_the_lock_back_and_uncordons() {
    let bed = start_bed(live_vms(1, Duration::from_secs(1))).await;
    let agent = Agent::spawn(&bed, &[]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    let watch = bed.watch_release(WHO, Duration::from_secs(60)).await;
    bed.poweroff().await.expect("power-off starts");
    // Masked while the delay runs: logind's delayed power-off fails once the lock goes.
    bed.node(NODE)
        .unwrap()
        .mask_unit("poweroff.target")
        .await
        .expect("poweroff.target masked");
    let released = watch.wait().await.expect("the drain releases");
    assert!(node_cordoned(&bed).await);
    let back = wait::until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { (holds_lock(&bed).await && !node_cordoned(&bed).await).then_some(now()) },
    )
    .await
    .unwrap_or_else(|| {
        panic!(
            "no lock again or still cordoned; agent log:\n{}",
            agent.log_text()
        )
    });
    assert!(
        bed.node(NODE).unwrap().power_offs().await.is_empty(),
        "node-1 powered off after all"
    );
    eprintln!(
        "failed power-off: lock back and node uncordoned {:.3} s after the release",
        secs_between(released.gone, back)
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delay_lowered_after_the_start_still_stops_vms_before_logind_cuts() {
    let bed = start_bed(BedOptions {
        vms: "live=1".parse().unwrap(),
        inhibit_delay_max_secs: Some(120),
        kubevirt: KubeVirtOptions {
            shutdown_duration: Duration::from_secs(2),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await;
    // Its migrations never finish: only a graceful stop in time saves it.
    bed.kubevirt.stall_next_migrations("default", "live-1", 10);
    let agent = Agent::spawn(&bed, &[]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    let node = bed.node(NODE).unwrap();
    node.set_inhibit_delay_max(20)
        .await
        .expect("logind reloaded with a shorter delay");
    let watch = bed.watch_release(WHO, Duration::from_secs(60)).await;
    let requested = now();
    bed.poweroff().await.expect("power-off starts");
    let released = watch.wait().await.expect("released");
    let powered_off = bed.wait_poweroff(Duration::from_secs(60)).await.unwrap();
    let ledger = assert_none_lost(&bed).await;
    assert!(
        ledger
            .fate("default/live-1")
            .is_some_and(|f| f.is_stopped_gracefully()),
        "{ledger}"
    );
    eprintln!(
        "delay lowered to 20 s: lock released +{:.3} s, powered off +{:.3} s",
        secs_between(requested, released.gone),
        secs_between(requested, powered_off)
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}
