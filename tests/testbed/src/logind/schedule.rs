//! Scheduled shutdowns on a node's logind: what `shutdown -r +N` and unattended-upgrades'
//! `Automatic-Reboot-Time` ask of it (`ScheduleShutdown(type, usec)`, the time in microseconds
//! of `CLOCK_REALTIME`), what `shutdown -c` asks (`CancelScheduledShutdown`), and the
//! `ScheduledShutdown` property.
//!
//! The calls are made from a pod of the node (logind checks the caller, which it must see); the
//! property is read from the machine's side, which may read but not act.
//!
//! Measured here (2026-11-30): systemd 257 announces `ScheduledShutdown` changes with
//! `PropertiesChanged`, systemd 252 and elogind 246 do not; with nothing scheduled systemd
//! reports `("", 2^64-1)` and elogind `("", 0)`; both systemd versions send
//! `PrepareForShutdown(true)` when the schedule fires and wait for delay locks, elogind runs
//! its power command at once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::node::NodeLogind;
use super::{LOGIN1, LOGIN1_MANAGER, LOGIN1_PATH, LogindError, manager_property};

fn usec(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

async fn busctl(node: &NodeLogind, args: &[&str]) -> Result<String, LogindError> {
    let mut full = vec!["--system", "call", LOGIN1, LOGIN1_PATH, LOGIN1_MANAGER];
    full.extend_from_slice(args);
    let mut cmd = node.pod_command("busctl", &full);
    cmd.stdin(std::process::Stdio::null());
    let after = Duration::from_secs(10);
    let out = tokio::time::timeout(after, cmd.output())
        .await
        .map_err(|_| LogindError::Timeout {
            what: format!("busctl call {}", args.join(" ")),
            after,
        })?
        .map_err(LogindError::io("running busctl in a pod"))?;
    if !out.status.success() {
        return Err(LogindError::Command {
            command: format!("busctl call … {}", args.join(" ")),
            status: out.status.to_string(),
            output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Schedules a shutdown of `kind` (`reboot`, `poweroff`, …) at `at`, to the microsecond (the
/// `shutdown` command rounds to minutes; logind takes any time).
pub async fn schedule_shutdown(
    node: &NodeLogind,
    kind: &str,
    at: SystemTime,
) -> Result<(), LogindError> {
    busctl(
        node,
        &["ScheduleShutdown", "st", kind, &usec(at).to_string()],
    )
    .await?;
    Ok(())
}

/// Cancels a scheduled shutdown as `shutdown -c` does; whether one was scheduled.
pub async fn cancel_scheduled_shutdown(node: &NodeLogind) -> Result<bool, LogindError> {
    Ok(busctl(node, &["CancelScheduledShutdown"]).await? == "b true")
}

/// logind's `ScheduledShutdown` as it reports it, `(type, usec)`.
pub async fn scheduled_shutdown(node: &NodeLogind) -> Result<(String, u64), LogindError> {
    let value = manager_property(&node.bus_address(), "ScheduledShutdown").await?;
    <(String, u64)>::try_from(value).map_err(|e| LogindError::Bus {
        context: "ScheduledShutdown is not (st)".into(),
        source: Box::new(e.into()),
    })
}
