//! What the agent does once when it starts, besides taking the lock: lift its cordon from the
//! boot before (telling "we cordoned this node before it went down" from "an administrator
//! cordoned it", as kured does for nodes that were unschedulable before it rebooted them), and
//! check logind's `InhibitDelayMaxSec` against the drain budget.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::config::Settings;
use crate::drain::eviction::backoff;
use crate::drain::machine::Input;
use crate::drain::report::LastShutdown;
use crate::host::logind_conf;
use crate::kube::condition;
use crate::kube::cordon::{self, AGENT_ANNOTATION};
use crate::kube::events::NodeEvents;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupAction {
    /// No annotation of ours: schedulable, or cordoned by someone else. Leave it.
    Nothing,
    /// Our cordon from an earlier boot: the shutdown it guarded is over. Uncordon.
    Uncordon { cordoned_in_boot: String },
    /// Our cordon from this boot, and logind is still preparing the shutdown it was for (the
    /// agent restarted mid-drain): keep it, and undo it if the shutdown is cancelled.
    KeepOurs,
    /// Our annotation but someone has uncordoned the node already: drop the stale annotation.
    ForgetAnnotation,
}

/// What to do about the Node's cordon when the agent starts.
///
/// `preparing` is logind's `PreparingForShutdown`: our cordon from this very boot with no
/// shutdown under way means the shutdown was cancelled while no agent was running.
pub fn on_start(
    unschedulable: bool,
    annotation: Option<&str>,
    boot_id: &str,
    preparing: bool,
) -> StartupAction {
    match annotation {
        None => StartupAction::Nothing,
        Some(_) if !unschedulable => StartupAction::ForgetAnnotation,
        Some(b) if b == boot_id && preparing => StartupAction::KeepOurs,
        Some(b) => StartupAction::Uncordon {
            cordoned_in_boot: b.to_string(),
        },
    }
}

/// Lifts our cordon from an earlier boot, and hands `last_shutdown` the Node's record of the
/// last drain. Retries until the API server answers, since a node that just booted may start the
/// agent before the control plane is reachable.
pub fn spawn_reconcile(
    api: Api<Node>,
    node: String,
    boot: String,
    preparing: bool,
    tx: mpsc::UnboundedSender<Input>,
    events: NodeEvents,
    last_shutdown: impl FnOnce(Option<LastShutdown>) + Send + 'static,
) {
    tokio::spawn(async move {
        let mut failures = 0;
        let state = loop {
            match api.get(&node).await {
                Ok(n) => {
                    last_shutdown(condition::last_shutdown(&n));
                    break cordon::state(&n);
                }
                Err(e) => {
                    failures += 1;
                    let wait = backoff(failures);
                    warn!(node = %node, error = %e, retry_ms = wait.as_millis() as u64, "reading the Node failed");
                    tokio::time::sleep(wait).await;
                }
            }
        };
        let action = on_start(
            state.unschedulable,
            state.our_annotation.as_deref(),
            &boot,
            preparing,
        );
        match action {
            StartupAction::Nothing => {
                info!(node = %node, unschedulable = state.unschedulable, "node cordon: nothing of ours to undo")
            }
            StartupAction::KeepOurs => {
                info!(node = %node, "our cordon from this boot stays while the shutdown is under way");
                let _ = tx.send(Input::CordonedThisBoot);
            }
            StartupAction::ForgetAnnotation => {
                if let Err(e) = cordon::uncordon(&api, &node, AGENT_ANNOTATION, false).await {
                    warn!(node = %node, error = %e, "removing our stale annotation failed");
                }
            }
            StartupAction::Uncordon { cordoned_in_boot } => {
                match cordon::uncordon(&api, &node, AGENT_ANNOTATION, true).await {
                    Ok(_) => {
                        info!(node = %node, cordoned_in_boot = %cordoned_in_boot, boot_id = %boot, "node uncordoned after reboot");
                        let _ = events
                            .publish(
                                false,
                                "UncordonedAfterReboot",
                                "Uncordon",
                                format!("node is back (boot {boot}); lifted the cordon set before shutdown in boot {cordoned_in_boot}"),
                            )
                            .await;
                    }
                    Err(e) => error!(node = %node, error = %e, "uncordon after reboot failed"),
                }
            }
        }
    });
}

/// Warns (log and Event) when logind's effective delay is shorter than the drain budget, naming
/// the file that sets it. (The holder writes the drop-in when asked to; the worker only reads.)
pub fn spawn_logind_config_check(settings: &Settings, delay: Duration, events: NodeEvents) {
    let node = settings.node.clone();
    let s = settings.clone();
    if delay >= s.drain_budget {
        return;
    }
    tokio::spawn(async move {
        let set_by = logind_conf::find_effective_setting(&s.host_root);
        let (file, value) = set_by
            .map(|(p, v)| (p.display().to_string(), v))
            .unwrap_or_else(|| {
                (
                    "(no file sets it: logind's built-in default)".into(),
                    String::new(),
                )
            });
        warn!(
            node = %node,
            inhibit_delay_max_ms = delay.as_millis() as u64,
            drain_budget_ms = s.drain_budget.as_millis() as u64,
            set_by = %file,
            value = %value,
            "logind's InhibitDelayMaxUSec is shorter than the drain budget"
        );
        let note = format!(
            "logind waits at most {:?} for shutdown locks but the drain budget is {:?}; InhibitDelayMaxSec is set by {file}{}",
            delay,
            s.drain_budget,
            if value.is_empty() {
                String::new()
            } else {
                format!(" to {value}")
            }
        );
        if let Err(e) = events
            .publish(true, "InhibitDelayTooShort", "Check", note)
            .await
        {
            debug!(error = %e, "event not recorded");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_boot_lifts_our_cordon() {
        assert_eq!(
            on_start(true, Some("boot-1"), "boot-2", false),
            StartupAction::Uncordon {
                cordoned_in_boot: "boot-1".into()
            }
        );
    }

    #[test]
    fn admin_cordon_is_left_alone() {
        assert_eq!(
            on_start(true, None, "boot-2", false),
            StartupAction::Nothing
        );
        assert_eq!(
            on_start(false, None, "boot-2", false),
            StartupAction::Nothing
        );
    }

    #[test]
    fn same_boot_kept_only_while_the_shutdown_is_under_way() {
        assert_eq!(
            on_start(true, Some("boot-2"), "boot-2", true),
            StartupAction::KeepOurs
        );
        assert!(matches!(
            on_start(true, Some("boot-2"), "boot-2", false),
            StartupAction::Uncordon { .. }
        ));
    }

    #[test]
    fn stale_annotation_on_schedulable_node_is_dropped() {
        assert_eq!(
            on_start(false, Some("boot-1"), "boot-2", false),
            StartupAction::ForgetAnnotation
        );
    }
}
