//! The agent under test as a pod on a node: `shutdown-guard run` (the lock holder), which
//! starts the drain worker itself (`shutdown-guard worker`, same binary, as an unprivileged
//! user). Footprints cover both processes.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};

use super::procfs;
use crate::bed::Bed;
use crate::pod::{Pod, PodOutput, PodSpec};

/// `who` of the agent's inhibitor.
pub const WHO: &str = "shutdown-guard";
const COMM: &str = "shutdown-guard";
/// The worker's log message once its node's VMIs and pods are listed.
const LISTED: &str = "node listed";

pub struct AgentPod {
    pub pod: Pod,
    pub node: String,
    pub log: PathBuf,
}

impl AgentPod {
    /// Starts the agent guarding `node` with the credentials of `kubeconfig`; its state (drain
    /// memory) in a folder of its own, its admin port on any free loopback port.
    pub async fn spawn(bed: &Bed, node: &str, binary: &Path, kubeconfig: &Path) -> Result<Self> {
        let dir = bed.control_plane.dir().join(format!(
            "bench-agent-{node}-{}",
            rand::random::<u32>() % 1_000_000
        ));
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("agent.log");
        let state = dir.join("state");
        let program = binary.to_str().context("agent path is not UTF-8")?;
        let state_arg = state.to_str().context("state path is not UTF-8")?;
        let spec = PodSpec::new(
            program,
            &[
                "run",
                "--node",
                node,
                "--log-format",
                "json",
                "--listen-address",
                "127.0.0.1:0",
                "--state-dir",
                state_arg,
            ],
        )
        .name(format!("shutdown-guard-{node}"))
        .env("KUBECONFIG", kubeconfig.display().to_string())
        .output(PodOutput::File(log.clone()));
        let pod = bed.node(node)?.spawn_pod(spec).await?;
        Ok(Self {
            pod,
            node: node.to_owned(),
            log,
        })
    }

    pub fn log_tail(&self) -> String {
        crate::controlplane::log_tail(&self.log, 30)
    }

    /// Waits until logind lists the agent's delay lock and the agent has listed its node's
    /// VMIs and pods: a shutdown in the first milliseconds of a worker would time its first
    /// list, which a node up for longer never waits for.
    pub async fn wait_ready(&mut self, bed: &Bed, timeout: Duration) -> Result<()> {
        let node = bed.node(&self.node)?;
        let end = tokio::time::Instant::now() + timeout;
        let mut held = false;
        loop {
            if let Ok(Some(status)) = self.pod.try_wait() {
                bail!(
                    "the agent exited ({status}) before it was ready; its log:\n{}",
                    self.log_tail()
                );
            }
            held = held
                || node
                    .list_inhibitors()
                    .await
                    .map(|l| l.iter().any(|i| i.who == WHO && i.mode == "delay"))
                    .unwrap_or(false);
            if held && self.logged(LISTED) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= end {
                let missing = if held {
                    "did not list its node"
                } else {
                    "took no lock"
                };
                bail!(
                    "the agent {missing} within {timeout:?}; its log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The agent's JSON log has a line with this message.
    fn logged(&self, message: &str) -> bool {
        marks(&self.log).iter().any(|(m, _)| m == message)
    }

    /// Host PIDs of the holder and the worker it started, once both run.
    pub async fn processes(&self, timeout: Duration) -> Result<Vec<u32>> {
        let root = self.pod.parent_pid();
        crate::wait::until(timeout, Duration::from_millis(20), || async {
            let pids = procfs::descendants_named(root, COMM);
            (pids.len() >= 2).then_some(pids)
        })
        .await
        .with_context(|| {
            format!(
                "no holder and worker under the agent's pod; log:\n{}",
                self.log_tail()
            )
        })
    }

    pub async fn stop(mut self) {
        self.pod.kill().await;
    }
}

/// `(message, when)` of each JSON log line of the agent, in order.
pub fn marks(log: &Path) -> Vec<(String, SystemTime)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let at: DateTime<Utc> = v.get("timestamp")?.as_str()?.parse().ok()?;
            Some((v.get("message")?.as_str()?.to_owned(), at.into()))
        })
        .collect()
}
