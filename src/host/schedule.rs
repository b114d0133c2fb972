//! logind's scheduled shutdown (`shutdown -r +10`, unattended-upgrades'
//! `Automatic-Reboot-Time`): the `ScheduledShutdown` property, followed on a bus connection of
//! its own so that nothing here can cost the lock; a failure only delays what is reported.
//!
//! Measured on the bed: systemd 257 sends `PropertiesChanged` for it when a shutdown is
//! scheduled, cancelled and when it fires; systemd 252 and elogind send nothing, so the property
//! is also read every [`POLL`].

use std::time::{Duration, UNIX_EPOCH};

use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, info};
use zbus::Connection;

use super::logind::{LogindError, LogindEvent, ManagerProxy, bounded};
use crate::drain::model::Schedule;

/// How often the schedule is read where logind does not announce its changes.
pub const POLL: Duration = Duration::from_secs(10);
/// After the bus or logind failed us, the next try.
const RETRY: Duration = Duration::from_secs(5);
/// Earlier values are not wall-clock times: when the shutdown fires, systemd 257 rewrites the
/// time as a monotonic one (2001-01-01 in microseconds).
const WALL_CLOCK_FROM_USEC: u64 = 978_307_200_000_000;

/// What one reading of `ScheduledShutdown` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// No shutdown scheduled: systemd's `("", 2^64-1)`, elogind's `("", 0)`.
    Nothing,
    Scheduled(Schedule),
    /// The scheduled shutdown is starting; `PrepareForShutdown` takes it from here.
    Firing,
}

pub fn reading(kind: &str, usec: u64) -> Reading {
    if kind.is_empty() || usec == 0 || usec == u64::MAX {
        return Reading::Nothing;
    }
    if usec < WALL_CLOCK_FROM_USEC {
        return Reading::Firing;
    }
    Reading::Scheduled(Schedule {
        kind: kind.to_owned(),
        at: UNIX_EPOCH + Duration::from_micros(usec),
    })
}

/// Follows the schedule; each change goes to `events` as [`LogindEvent::Scheduled`], the first
/// reading too (so a schedule made before the agent started is known).
pub fn spawn(node: String, events: mpsc::UnboundedSender<LogindEvent>) {
    tokio::spawn(async move {
        let mut last: Option<Option<Schedule>> = None;
        loop {
            match follow(&node, &events, &mut last).await {
                Ok(()) => return,
                Err(e) => {
                    debug!(node = %node, error = %e, "following logind's scheduled shutdown failed; trying again");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    });
}

/// Until the receiver is gone (`Ok`) or the bus fails us (`Err`).
async fn follow(
    node: &str,
    events: &mpsc::UnboundedSender<LogindEvent>,
    last: &mut Option<Option<Schedule>>,
) -> Result<(), LogindError> {
    let conn = bounded("connect", Connection::system()).await?;
    let proxy = bounded(
        "logind proxy",
        ManagerProxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build(),
    )
    .await?;
    let properties = bounded(
        "properties proxy",
        zbus::fdo::PropertiesProxy::builder(&conn)
            .destination("org.freedesktop.login1")?
            .path("/org/freedesktop/login1")?
            .build(),
    )
    .await?;
    let mut changes = bounded(
        "subscribe PropertiesChanged",
        properties.receive_properties_changed(),
    )
    .await?;
    let mut every = tokio::time::interval(POLL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = conn.closed() => return Err(zbus::Error::InputOutput(std::sync::Arc::new(
                std::io::Error::other("bus connection closed"))).into()),
            changed = changes.next() => {
                let Some(signal) = changed else {
                    return Err(zbus::Error::Failure("PropertiesChanged stream ended".into()).into());
                };
                let about_schedule = signal.args().is_ok_and(|a| {
                    a.changed_properties().contains_key("ScheduledShutdown")
                        || a.invalidated_properties().contains(&"ScheduledShutdown")
                });
                if !about_schedule {
                    continue;
                }
            }
            _ = every.tick() => {}
        }
        let (kind, usec) = bounded("ScheduledShutdown", proxy.scheduled_shutdown()).await?;
        let now = match reading(&kind, usec) {
            Reading::Firing => continue,
            Reading::Nothing => None,
            Reading::Scheduled(s) => Some(s),
        };
        if last.as_ref() == Some(&now) {
            continue;
        }
        match &now {
            Some(s) => info!(
                node = %node,
                kind = %s.kind,
                at = %humantime::format_rfc3339_seconds(s.at),
                "logind has a shutdown scheduled"
            ),
            None if last.is_some() => info!(node = %node, "logind's scheduled shutdown is gone"),
            None => {}
        }
        *last = Some(now.clone());
        if events.send(LogindEvent::Scheduled(now)).is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_schedule_reads_as_nothing_on_systemd_and_on_elogind() {
        assert_eq!(reading("", u64::MAX), Reading::Nothing);
        assert_eq!(reading("", 0), Reading::Nothing);
    }

    #[test]
    fn a_schedule_is_its_type_and_wall_clock_time() {
        let usec = 1_796_031_672_262_760;
        assert_eq!(
            reading("reboot", usec),
            Reading::Scheduled(Schedule {
                kind: "reboot".into(),
                at: UNIX_EPOCH + Duration::from_micros(usec),
            })
        );
    }

    #[test]
    fn the_monotonic_time_systemd_writes_when_it_fires_is_not_a_schedule() {
        // Read on trixie's logind the moment its scheduled power-off began.
        assert_eq!(reading("poweroff", 48_765_173_161), Reading::Firing);
    }
}
