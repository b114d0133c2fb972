//! The logind side: a `delay` inhibitor lock on `shutdown`, the shutdown signals, and keeping
//! both across logind or bus restarts.
//!
//! The lock is the fd `Inhibit` returns; logind holds the shutdown until every delay lock's fd
//! is closed or `InhibitDelayMaxUSec` has passed. The fd lives in a [`LockControl`] shared with
//! the agent so releasing it is a plain `close(2)` on the agent's own task, with no hop.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};
use zbus::Connection;
use zbus::zvariant::OwnedValue;

use crate::drain::model::Schedule;

#[zbus::proxy(
    interface = "org.freedesktop.login1.Manager",
    default_service = "org.freedesktop.login1",
    default_path = "/org/freedesktop/login1",
    gen_blocking = false
)]
pub trait Manager {
    fn inhibit(
        &self,
        what: &str,
        who: &str,
        why: &str,
        mode: &str,
    ) -> zbus::Result<zbus::zvariant::OwnedFd>;

    #[zbus(signal)]
    fn prepare_for_shutdown(&self, start: bool) -> zbus::Result<()>;

    /// systemd ≥ 255 sends this before `PrepareForShutdown`, with `type` = poweroff, reboot, …
    #[zbus(signal)]
    fn prepare_for_shutdown_with_metadata(
        &self,
        start: bool,
        metadata: HashMap<String, OwnedValue>,
    ) -> zbus::Result<()>;

    /// `(what, who, why, mode, uid, pid)` of every inhibitor logind knows.
    fn list_inhibitors(&self) -> zbus::Result<Vec<(String, String, String, String, u32, u32)>>;

    #[zbus(property(emits_changed_signal = "false"), name = "InhibitDelayMaxUSec")]
    fn inhibit_delay_max_usec(&self) -> zbus::Result<u64>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn preparing_for_shutdown(&self) -> zbus::Result<bool>;

    /// `(type, usec since the epoch)` of a scheduled shutdown; followed by
    /// [`crate::host::schedule`], which subscribes to its changes itself (systemd 257 announces
    /// them, 252 and elogind do not).
    #[zbus(property(emits_changed_signal = "false"))]
    fn scheduled_shutdown(&self) -> zbus::Result<(String, u64)>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1",
    gen_blocking = false
)]
pub trait Systemd {
    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;
}

pub const WHO: &str = "shutdown-guard";
const LOGIND: &str = "org.freedesktop.login1";

pub fn why(node: &str) -> String {
    format!("Moving the KubeVirt VMs of node {node} away before it shuts down")
}

#[derive(Debug, Clone, PartialEq)]
pub enum LogindEvent {
    LockTaken {
        delay_max: Duration,
        preparing: bool,
    },
    LockLost {
        why: String,
    },
    /// logind refuses the lock because a shutdown is already being delayed (`method_inhibit`:
    /// a delayed action for `shutdown` is pending). Asked again every second until it passes.
    Refused {
        delay_max: Duration,
        preparing: bool,
    },
    /// `PrepareForShutdown(start)`; with `start`, `InhibitDelayMaxUSec` read again right then,
    /// since a reload after the lock was taken may have changed logind's real cut.
    Shutdown {
        start: bool,
        kind: Option<String>,
        delay_max: Option<Duration>,
    },
    /// `PreparingForShutdown`, as asked with [`LockControl::ask_preparing`].
    Preparing(bool),
    /// `ScheduledShutdown` changed: a shutdown is now scheduled, or none is any more.
    Scheduled(Option<Schedule>),
}

/// logind's answer to `Inhibit` while the shutdown it would hold is already delayed.
const OPERATION_IN_PROGRESS: &str = "org.freedesktop.login1.OperationInProgress";
const REFUSED_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LogindError {
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
    #[error("D-Bus: {0}")]
    Fdo(#[from] zbus::fdo::Error),
    #[error("reloading logind: {0}")]
    Reload(String),
    #[error("no answer from the bus within {0:?} ({1})")]
    Timeout(Duration, &'static str),
}

/// A bus that accepts calls but never answers (a dbus-daemon mid-restart) must not wedge the
/// agent: every call gets this long, then the session starts over.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn bounded<T, E: Into<LogindError>>(
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, LogindError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(LogindError::Timeout(CALL_TIMEOUT, what)),
    }
}

/// The lock's fd and whether the agent wants it held, shared between the agent and the task
/// that talks to logind.
#[derive(Debug, Clone, Default)]
pub struct LockControl {
    fd: Arc<Mutex<Option<OwnedFd>>>,
    want: Arc<AtomicBool>,
    ask: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl LockControl {
    fn new() -> Self {
        let c = LockControl::default();
        c.want.store(true, Ordering::SeqCst);
        c
    }

    /// Closes the lock's fd now; logind lets the shutdown go on once no other delay lock is left.
    /// Returns whether a lock was held.
    pub fn release(&self) -> bool {
        let mut g = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        self.want.store(false, Ordering::SeqCst);
        g.take().is_some()
    }

    /// Asks for a new lock (after a cancelled shutdown).
    pub fn take(&self) {
        self.want.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Asks logind's `PreparingForShutdown`; the answer comes as [`LogindEvent::Preparing`].
    pub fn ask_preparing(&self) {
        self.ask.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    pub fn held(&self) -> bool {
        self.fd.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    fn wanted(&self) -> bool {
        self.want.load(Ordering::SeqCst)
    }

    /// Keeps `fd` unless the lock was released meanwhile.
    fn store(&self, fd: OwnedFd) -> bool {
        let mut g = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        if self.want.load(Ordering::SeqCst) {
            *g = Some(fd);
            true
        } else {
            false
        }
    }

    fn drop_fd(&self) -> bool {
        self.fd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some()
    }
}

/// Starts the task that holds the lock; its events go to `events`.
pub fn spawn(node: String, events: mpsc::UnboundedSender<LogindEvent>) -> LockControl {
    let ctl = LockControl::new();
    let c = ctl.clone();
    tokio::spawn(async move { hold(node, c, events).await });
    ctl
}

const FIRST_RETRY: Duration = Duration::from_millis(50);
/// Kept short so a lock lost to a restart is back well within 2 s of logind's return.
const MAX_RETRY: Duration = Duration::from_millis(500);

enum Ended {
    /// logind's name changed owner: start over on the same connection at once.
    OwnerChanged,
    BusClosed,
    Receiver,
}

async fn hold(node: String, ctl: LockControl, events: mpsc::UnboundedSender<LogindEvent>) {
    let mut delay = FIRST_RETRY;
    let mut conn: Option<Connection> = None;
    loop {
        let c = match &conn {
            Some(c) => c.clone(),
            None => match bounded("connect", Connection::system()).await {
                Ok(c) => {
                    conn = Some(c.clone());
                    c
                }
                Err(e) => {
                    warn!(node = %node, error = %e, retry_ms = delay.as_millis() as u64, "system bus unavailable");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY);
                    continue;
                }
            },
        };
        match session(&node, &c, &ctl, &events).await {
            Ok(Ended::OwnerChanged) => {
                delay = FIRST_RETRY;
                continue;
            }
            Ok(Ended::Receiver) => return,
            Ok(Ended::BusClosed) => {
                warn!(node = %node, "system bus connection closed; reconnecting");
                conn = None;
                delay = FIRST_RETRY;
            }
            Err(e) => {
                warn!(node = %node, error = %e, retry_ms = delay.as_millis() as u64, "logind session failed");
                if c.is_closed() {
                    conn = None;
                }
                if ctl.drop_fd() {
                    let _ = events.send(LogindEvent::LockLost { why: e.to_string() });
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY);
            }
        }
    }
}

/// One life of logind on one connection: subscribe, take the lock, relay signals.
async fn session(
    node: &str,
    conn: &Connection,
    ctl: &LockControl,
    events: &mpsc::UnboundedSender<LogindEvent>,
) -> Result<Ended, LogindError> {
    let proxy = bounded(
        "logind proxy",
        ManagerProxy::builder(conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build(),
    )
    .await?;
    let dbus = bounded("bus proxy", zbus::fdo::DBusProxy::new(conn)).await?;
    let mut owner = bounded(
        "subscribe NameOwnerChanged",
        dbus.receive_name_owner_changed_with_args(&[(0, LOGIND)]),
    )
    .await?;
    // Subscribed before the lock is taken, so a shutdown starting in between is not missed.
    let mut plain = bounded(
        "subscribe PrepareForShutdown",
        proxy.receive_prepare_for_shutdown(),
    )
    .await?;
    let mut with_meta = bounded(
        "subscribe PrepareForShutdownWithMetadata",
        proxy.receive_prepare_for_shutdown_with_metadata(),
    )
    .await?;

    let name: zbus::names::BusName<'_> = LOGIND.try_into().map_err(zbus::Error::from)?;
    if !bounded("NameHasOwner", dbus.name_has_owner(name)).await? {
        // logind is gone (a restart, or the bus came back without it). Ask the bus to start it
        // (systemd-logind is bus-activatable; after a dbus restart nothing else may), then wait
        // for its name to appear rather than polling.
        info!(node = %node, "waiting for logind on the bus");
        let wk: zbus::names::WellKnownName<'_> = LOGIND.try_into().map_err(zbus::Error::from)?;
        let activation = dbus.start_service_by_name(wk, 0);
        tokio::pin!(activation);
        let mut activation_done = false;
        loop {
            tokio::select! {
                _ = owner.next() => return Ok(Ended::OwnerChanged),
                _ = conn.closed() => return Ok(Ended::BusClosed),
                r = &mut activation, if !activation_done => {
                    activation_done = true;
                    match r {
                        // Started, or it appeared meanwhile: go and take the lock.
                        Ok(_) => return Ok(Ended::OwnerChanged),
                        Err(e) => debug!(node = %node, error = %e, "logind could not be activated; waiting for it"),
                    }
                }
            }
        }
    }

    let mut retry_at: Option<tokio::time::Instant> = None;
    if ctl.wanted() && !ctl.held() {
        retry_at = take(node, &proxy, ctl, events).await?;
    }
    loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = conn.closed() => {
                if ctl.drop_fd() {
                    let _ = events.send(LogindEvent::LockLost { why: "bus closed".into() });
                }
                return Ok(Ended::BusClosed);
            }
            changed = owner.next() => {
                let new_owner = changed
                    .and_then(|c| c.args().ok().map(|a| a.new_owner().as_ref().map(|o| o.to_string())))
                    .flatten();
                // logind forgets every lock when it stops; our fd is now meaningless.
                if ctl.drop_fd() {
                    let _ = events.send(LogindEvent::LockLost { why: "logind restarted".into() });
                }
                info!(node = %node, new_owner = new_owner.as_deref().unwrap_or(""), "logind owner changed");
                return Ok(Ended::OwnerChanged);
            }
            s = with_meta.next() => {
                let Some(s) = s else { return Ok(Ended::BusClosed) };
                let args = s.args()?;
                let kind = args.metadata().get("type").and_then(|v| String::try_from(v.clone()).ok());
                let start = *args.start();
                let delay_max = if start { delay_now(&proxy).await } else { None };
                if events.send(LogindEvent::Shutdown { start, kind, delay_max }).is_err() {
                    return Ok(Ended::Receiver);
                }
            }
            s = plain.next() => {
                let Some(s) = s else { return Ok(Ended::BusClosed) };
                let start = *s.args()?.start();
                let delay_max = if start { delay_now(&proxy).await } else { None };
                if events.send(LogindEvent::Shutdown { start, kind: None, delay_max }).is_err() {
                    return Ok(Ended::Receiver);
                }
            }
            _ = retry => {
                retry_at = None;
                if ctl.wanted() && !ctl.held() {
                    retry_at = take(node, &proxy, ctl, events).await?;
                }
            }
            _ = ctl.wake.notified() => {
                if ctl.ask.swap(false, Ordering::SeqCst) {
                    let preparing = bounded("PreparingForShutdown", proxy.preparing_for_shutdown()).await?;
                    let _ = events.send(LogindEvent::Preparing(preparing));
                }
                if ctl.wanted() && !ctl.held() && retry_at.is_none() {
                    retry_at = take(node, &proxy, ctl, events).await?;
                }
            }
        }
    }
}

/// `InhibitDelayMaxUSec` now, or `None` when logind does not answer in time.
async fn delay_now(proxy: &ManagerProxy<'_>) -> Option<Duration> {
    bounded("InhibitDelayMaxUSec", proxy.inhibit_delay_max_usec())
        .await
        .ok()
        .map(Duration::from_micros)
}

/// Takes the lock. While logind refuses it because a shutdown is already being delayed, says so
/// and returns when to ask again.
async fn take(
    node: &str,
    proxy: &ManagerProxy<'_>,
    ctl: &LockControl,
    events: &mpsc::UnboundedSender<LogindEvent>,
) -> Result<Option<tokio::time::Instant>, LogindError> {
    let why = why(node);
    let fd: OwnedFd = match bounded("Inhibit", proxy.inhibit("shutdown", WHO, &why, "delay")).await
    {
        Ok(fd) => fd.into(),
        Err(LogindError::Bus(zbus::Error::MethodError(name, msg, _)))
            if name.as_str() == OPERATION_IN_PROGRESS =>
        {
            let delay_max = delay_now(proxy).await.unwrap_or_default();
            let preparing = bounded("PreparingForShutdown", proxy.preparing_for_shutdown())
                .await
                .unwrap_or(true);
            debug!(node = %node, message = msg.as_deref().unwrap_or(""), "logind refuses a lock while a shutdown is delayed");
            let _ = events.send(LogindEvent::Refused {
                delay_max,
                preparing,
            });
            return Ok(Some(tokio::time::Instant::now() + REFUSED_RETRY));
        }
        Err(e) => return Err(e),
    };
    let delay_usec = bounded("InhibitDelayMaxUSec", proxy.inhibit_delay_max_usec()).await?;
    let preparing = bounded("PreparingForShutdown", proxy.preparing_for_shutdown())
        .await
        .unwrap_or(false);
    if !ctl.store(fd) {
        return Ok(None);
    }
    let delay_max = Duration::from_micros(delay_usec);
    info!(
        node = %node,
        what = "shutdown",
        who = WHO,
        mode = "delay",
        inhibit_delay_max_ms = delay_max.as_millis() as u64,
        preparing_for_shutdown = preparing,
        "lock taken"
    );
    let _ = events.send(LogindEvent::LockTaken {
        delay_max,
        preparing,
    });
    Ok(None)
}

/// Makes logind re-read its configuration (SIGHUP through systemd, as kubelet does) and waits,
/// boundedly, until `InhibitDelayMaxUSec` reads at least `wanted`. Returns the value read last.
pub async fn reload_and_verify(wanted: Duration) -> Result<Duration, LogindError> {
    let conn = Connection::system().await?;
    let systemd = SystemdProxy::new(&conn).await?;
    systemd
        .kill_unit("systemd-logind.service", "all", nix::libc::SIGHUP)
        .await
        .map_err(|e| LogindError::Reload(e.to_string()))?;
    let logind = ManagerProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    // logind announces no change of this property; a short bounded poll is all there is.
    let mut last = Duration::ZERO;
    for _ in 0..30 {
        last = Duration::from_micros(logind.inhibit_delay_max_usec().await?);
        if last >= wanted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(last)
}
