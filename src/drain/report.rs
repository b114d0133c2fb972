//! What a drain reports, as plain data: the record of one shutdown kept on the Node, and the
//! agent's own view served on `/status`. Written by the reporters, read back by `status`.

use serde::{Deserialize, Serialize};

use super::progress::VmiProgress;

/// How a shutdown's drain went (or goes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownOutcome {
    Draining,
    /// The node emptied and the lock was released.
    Empty,
    /// The deadline came with VMIs or pods left.
    Deadline,
    /// logind cancelled the shutdown.
    Cancelled,
}

impl ShutdownOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownOutcome::Draining => "draining",
            ShutdownOutcome::Empty => "empty",
            ShutdownOutcome::Deadline => "deadline",
            ShutdownOutcome::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for ShutdownOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the agent is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentPhase {
    /// Waiting for its lock.
    #[default]
    Starting,
    Idle,
    Draining,
    Released,
}

impl AgentPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentPhase::Starting => "starting",
            AgentPhase::Idle => "idle",
            AgentPhase::Draining => "draining",
            AgentPhase::Released => "released",
        }
    }
}

/// `/status` readers compare with the JSON text.
impl PartialEq<&str> for AgentPhase {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for AgentPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One drain's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastShutdown {
    /// `poweroff`, `reboot`, … (`unknown` when logind sent no type).
    pub r#type: String,
    pub started: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    pub outcome: ShutdownOutcome,
    pub migrated: usize,
    pub stopped: usize,
    #[serde(default)]
    pub remaining: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
}

/// What `/status` reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node: String,
    pub lock_held: bool,
    pub phase: AgentPhase,
    pub inhibit_delay_max_s: Option<f64>,
    pub drain_budget_s: Option<f64>,
    pub drain: Option<DrainStatus>,
    pub last_shutdown: Option<LastShutdown>,
    /// The shutdown logind has scheduled, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_shutdown: Option<ScheduledStatus>,
    /// The drain stops the node's VMs in place: too few nodes stay up (a power event).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub power_event: bool,
}

/// A scheduled shutdown as `/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduledStatus {
    pub r#type: String,
    /// When it is due, RFC 3339.
    pub at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DrainStatus {
    pub r#type: String,
    pub elapsed_s: f64,
    pub deadline_s: f64,
    pub vmis: Vec<VmiProgress>,
    #[serde(default)]
    pub pods_remaining: Vec<String>,
}
