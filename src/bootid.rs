//! Telling "we cordoned this node before it went down" from "an administrator cordoned it".
//!
//! When the agent cordons, it writes the kernel boot ID into an annotation on the Node. A later
//! agent that finds the annotation with a different boot ID knows the node has rebooted since
//! our cordon and lifts it; a node cordoned without our annotation is left alone, as kured does
//! for nodes that were unschedulable before it rebooted them.

use std::path::Path;

/// Annotation on the Node holding the boot ID of the boot in which we cordoned it.
pub const CORDON_ANNOTATION: &str = "shutdown-guard.kubevirt.io/cordoned-boot-id";

#[derive(Debug, thiserror::Error)]
pub enum BootIdError {
    #[error("reading the boot ID from {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the boot ID in {path} is empty")]
    Empty { path: String },
}

pub fn read_boot_id(path: &Path) -> Result<String, BootIdError> {
    let raw = std::fs::read_to_string(path).map_err(|source| BootIdError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let id = raw.trim().to_string();
    if id.is_empty() {
        return Err(BootIdError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(id)
}

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

    #[test]
    fn boot_id_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("boot_id");
        std::fs::write(&p, "0f1e2d3c-aaaa-bbbb-cccc-123456789abc\n").unwrap();
        assert_eq!(
            read_boot_id(&p).unwrap(),
            "0f1e2d3c-aaaa-bbbb-cccc-123456789abc"
        );
        std::fs::write(&p, "\n").unwrap();
        assert!(matches!(read_boot_id(&p), Err(BootIdError::Empty { .. })));
        assert!(matches!(
            read_boot_id(&dir.path().join("missing")),
            Err(BootIdError::Read { .. })
        ));
    }
}
