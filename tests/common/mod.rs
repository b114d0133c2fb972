//! What the scenario tests share: a bed with the agent running as a pod on node-1, and the
//! observations that prove what happened (logind's inhibitor list, the API server's audit log,
//! watch events, the node's power-off time) — never the agent's own logs.

#![allow(dead_code)]

pub mod identity;
pub mod tools;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use testbed::bed::{Bed, BedOptions, NODE, Release};
use testbed::logind::Inhibitor;
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

/// The agent, running as a pod on node-1; killed when dropped.
pub struct Agent {
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl Agent {
    pub async fn spawn(bed: &Bed, extra: &[&str]) -> Agent {
        let log = bed
            .control_plane
            .dir()
            .join(format!("agent-{}.log", rand_suffix()));
        let file = std::fs::File::create(&log).expect("agent log");
        let mut args = vec!["run", "--node", NODE, "--log-format", "json"];
        args.extend_from_slice(extra);
        let child = bed
            .pod_command(AGENT, &args)
            .await
            .stdout(Stdio::from(file.try_clone().expect("log fd")))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("the agent starts");
        Agent { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

/// The moment logind stopped listing shutdown-guard's lock.
pub async fn observe_release(bed: &Bed, timeout: Duration) -> Option<Release> {
    bed.observe_release(WHO, timeout).await
}

/// The audit log's entries, in order.
pub fn audit(bed: &Bed) -> Vec<AuditEntry> {
    audit_entries(&bed.control_plane)
}

/// When the API server received the write that took `vmi` (`ns/name`) off the node: the last
/// status write (or deletion) it received at or before `seen`, the moment the test's watch showed
/// the VMI gone. A migration and a stop both end with a status write (`nodeName` moved and
/// `migrationState.completed`, or a final phase); the label write that may follow a migration
/// is not what took the VMI off the node, so it does not count even when the watch trails it.
pub fn server_write_before(
    entries: &[AuditEntry],
    vmi: &str,
    seen: SystemTime,
) -> Option<SystemTime> {
    let (ns, name) = vmi.split_once('/')?;
    entries
        .iter()
        .filter(|e| {
            e.resource == "virtualmachineinstances"
                && e.namespace == ns
                && e.name == name
                && ((e.subresource == "status" && matches!(e.verb.as_str(), "update" | "patch"))
                    || e.verb == "delete")
                && e.received <= seen
        })
        .map(|e| e.received)
        .max()
}

pub fn secs(d: f64) -> String {
    format!("{d:.3} s")
}

pub fn now() -> SystemTime {
    SystemTime::now()
}
