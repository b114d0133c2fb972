//! What the scenario tests share: a bed with the agent running as a pod on node-1, and the
//! observations that prove what happened (logind's inhibitor state, the API server's audit
//! log, watch events, the node's power-off time, the VM ledger) — never the agent's own logs.

#![allow(dead_code)]

pub mod identity;
pub mod tools;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use testbed::bed::{Bed, BedOptions, NODE, Release};
use testbed::ledger::LedgerReport;
use testbed::logind::Inhibitor;
use testbed::pod::{Pod, PodOutput, PodSpec};
use testbed::timeline::{AuditEntry, audit_entries};
use testbed::wait;

pub const AGENT: &str = env!("CARGO_BIN_EXE_shutdown-guard");
pub const WHO: &str = "shutdown-guard";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TESTBED_LOG")
                .unwrap_or_else(|_| "warn,kube_client=off".into()),
        )
        .with_test_writer()
        .try_init();
}

pub async fn start_bed(opts: BedOptions) -> Bed {
    init_tracing();
    Bed::start(opts).await.expect("the bed starts")
}

/// The agent, running as a pod on a node; killed when dropped.
pub struct Agent {
    /// The pod: the agent's host PID ([`Pod::pid`]), signals, its memory cgroup.
    pub pod: Pod,
    pub log: PathBuf,
}

impl Agent {
    /// The agent as a pod on node-1.
    pub async fn spawn(bed: &Bed, extra: &[&str]) -> Agent {
        Self::spawn_on(bed, NODE, extra).await
    }

    /// The agent as a pod on `node` (which must run a logind), guarding that node.
    pub async fn spawn_on(bed: &Bed, node: &str, extra: &[&str]) -> Agent {
        Self::spawn_with(bed, node, extra, |spec| spec).await
    }

    /// Like [`spawn_on`](Self::spawn_on), with the pod spec adjusted by `adjust` (a memory
    /// limit, variables).
    pub async fn spawn_with(
        bed: &Bed,
        node: &str,
        extra: &[&str],
        adjust: impl FnOnce(PodSpec) -> PodSpec,
    ) -> Agent {
        let log = bed
            .control_plane
            .dir()
            .join(format!("agent-{node}-{}.log", rand_suffix()));
        let mut args = vec!["run", "--node", node, "--log-format", "json"];
        args.extend_from_slice(extra);
        // The bed's pods see the machine's own /run: a reboot-required marker there must not
        // taint the bed's nodes. Each node's marker is a file of the bed's (absent unless a
        // test writes it); a flag still overrides it.
        let marker = bed
            .control_plane
            .dir()
            .join(format!("{node}-reboot-required"));
        let spec = adjust(
            PodSpec::new(AGENT, &args)
                .name(format!("shutdown-guard-{node}"))
                .env(
                    "SHUTDOWN_GUARD_REBOOT_REQUIRED_FILE",
                    marker.display().to_string(),
                )
                .output(PodOutput::File(log.clone())),
        );
        let pod = bed
            .node(node)
            .expect("the node runs a logind")
            .spawn_pod(spec)
            .await
            .expect("the agent starts");
        Agent { pod, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent's host PID.
    pub async fn pid(&self) -> u32 {
        self.pod
            .pid(Duration::from_secs(10))
            .await
            .expect("the agent runs")
    }
}

fn rand_suffix() -> u32 {
    rand::random::<u32>() % 1_000_000
}

/// shutdown-guard's delay lock on node-1, as logind lists it.
pub async fn guard_lock(bed: &Bed) -> Option<Inhibitor> {
    bed.list_inhibitors()
        .await
        .ok()?
        .into_iter()
        .find(|i| i.who == WHO && i.mode == "delay" && i.what.contains("shutdown"))
}

/// Waits (30 s at most) until `node`'s logind lists the lock of `agent` running there; panics
/// with its log otherwise.
pub async fn wait_for_lock_on(bed: &Bed, node: &str, agent: &Agent) {
    let n = bed.node(node).expect("the node runs a logind");
    let locked = wait::until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        || async {
            let list = n.list_inhibitors().await.ok()?;
            list.iter().any(|i| i.who == WHO).then_some(())
        },
    )
    .await;
    assert!(
        locked.is_some(),
        "no lock on {node}; agent log:\n{}",
        agent.log_text()
    );
}

/// Polls logind (every 50 ms, at most `timeout`) until the agent's delay lock shows.
pub async fn poll_guard_lock(bed: &Bed, timeout: Duration) -> Option<Inhibitor> {
    wait::until(timeout, Duration::from_millis(50), || guard_lock(bed)).await
}

pub async fn holds_lock(bed: &Bed) -> bool {
    guard_lock(bed).await.is_some()
}

/// Waits until logind lists shutdown-guard's lock; panics with the agent's log (at `log`)
/// otherwise.
pub async fn wait_for_lock_logged(bed: &Bed, log: &Path, timeout: Duration) -> Inhibitor {
    wait::until(timeout, Duration::from_millis(20), || guard_lock(bed))
        .await
        .unwrap_or_else(|| {
            panic!(
                "shutdown-guard took no lock within {timeout:?}; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })
}

pub async fn wait_for_lock(bed: &Bed, agent: &Agent, timeout: Duration) -> Inhibitor {
    wait_for_lock_logged(bed, &agent.log, timeout).await
}

/// Waits until the agent's log has a line containing `text` (synchronisation only).
pub async fn wait_log(agent: &Agent, text: &str, timeout: Duration) -> bool {
    wait::until(timeout, Duration::from_millis(50), || async {
        agent.log_text().contains(text).then_some(())
    })
    .await
    .is_some()
}

/// When shutdown-guard's lock on node-1 went, from logind's side: its inhibitor state file,
/// looked at every 0.5 ms (see [`testbed::logind::ReleaseWatch`]). Call it while the lock is
/// held; [`Bed::watch_release`] arms the watch ahead of time.
pub async fn observe_release(bed: &Bed, timeout: Duration) -> Option<Release> {
    bed.observe_release(WHO, timeout).await
}

/// The ledger of every VMI so far; panics, showing it, if any VMI was lost.
pub async fn assert_none_lost(bed: &Bed) -> LedgerReport {
    let report = bed.ledger().await;
    assert!(report.lost().is_empty(), "VMs lost:\n{report}");
    report
}

/// The audit log's entries, in order.
pub fn audit(bed: &Bed) -> Vec<AuditEntry> {
    audit_entries(&bed.control_plane)
}

/// When the API server received the write that took `vmi` (`ns/name`) off the node: the last
/// write (or deletion) it received at or before `seen`, the moment the test's watch showed the
/// VMI gone. A migration and a stop both end with a write of the VMI's status (`nodeName`
/// moved and `migrationState.completed`, or a final phase). Where the VMI CRD has a status
/// subresource, only `/status` writes count: a label write that follows a migration is not
/// what took the VMI off the node, even when the watch trails it. Upstream's CRD has none
/// and moves the label and `nodeName` in one update, so there every write of the VMI counts.
pub fn server_write_before(
    entries: &[AuditEntry],
    vmi: &str,
    seen: SystemTime,
) -> Option<SystemTime> {
    let (ns, name) = vmi.split_once('/')?;
    let writes: Vec<&AuditEntry> = entries
        .iter()
        .filter(|e| {
            e.resource == "virtualmachineinstances"
                && e.namespace == ns
                && e.name == name
                && matches!(e.verb.as_str(), "update" | "patch" | "delete")
        })
        .collect();
    let has_status = writes.iter().any(|e| e.subresource == "status");
    writes
        .into_iter()
        .filter(|e| !has_status || e.subresource == "status" || e.verb == "delete")
        .filter(|e| e.received <= seen)
        .map(|e| e.received)
        .max()
}

pub fn secs(d: f64) -> String {
    format!("{d:.3} s")
}

pub fn now() -> SystemTime {
    SystemTime::now()
}

/// A delay lock on node-1 held by `systemd-inhibit` as a pod, until the child is dropped.
pub async fn hold_delay_lock(bed: &Bed, who: &str, why: &str) -> tokio::process::Child {
    let what = format!("--who={who}");
    let why = format!("--why={why}");
    let child = bed
        .pod_command(
            "systemd-inhibit",
            &[
                "--what=shutdown",
                &what,
                &why,
                "--mode=delay",
                "sleep",
                "300",
            ],
        )
        .await
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("systemd-inhibit starts");
    let listed = testbed::wait::until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            bed.list_inhibitors()
                .await
                .ok()
                .filter(|l| l.iter().any(|i| i.who == who && i.mode == "delay"))
        },
    )
    .await;
    assert!(
        listed.is_some(),
        "{who}'s lock not listed by logind within 10 s"
    );
    child
}
