//! `shutdown-guard run`: the agent. It takes logind's delay lock before anything else, then
//! runs the [driver](crate::driver) with logind's `PrepareForShutdown` as the trigger, the
//! boot-ID cordon mark, the lock as its gate and [`report::AgentReporter`] for metrics, the
//! Node's condition, Events and `/status`.

pub mod report;
pub mod startup;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::Api;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::config::Settings;
use crate::drain::machine::{Input, MachineConfig};
use crate::drain::model::ObjKey;
use crate::driver::{Driver, DriverConfig, DriverError, Gate, Outcome};
use crate::host::bootid;
use crate::host::logind::{self, LockControl, LogindEvent};
use crate::kube::cordon::CordonMark;
use crate::kube::events::{NodeEvents, Reports};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    BootId(#[from] bootid::BootIdError),
    #[error(transparent)]
    Client(#[from] crate::kube::ClientError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Driver(#[from] DriverError),
}

/// How the agent stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM/SIGINT while idle or after the release.
    Terminated,
    /// SIGTERM/SIGINT during a drain: the shutdown goes on without us.
    TerminatedDuringDrain { remaining: Vec<ObjKey> },
}

/// logind's lock is the agent's gate: releasing the drain closes the lock's fd.
impl Gate for LockControl {
    fn release(&self) -> bool {
        LockControl::release(self)
    }
    fn retake(&self) {
        self.take()
    }
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(settings: Settings) -> Result<Exit, RunError> {
    let node = settings.node.clone();
    let boot_id = bootid::read_boot_id(&settings.boot_id_path)?;
    info!(node = %node, boot_id = %boot_id, scope = %settings.scope, "starting");

    let admin = AdminState::default();
    admin.update(|s| {
        s.node = node.clone();
        s.drain_budget_s = Some(settings.drain_budget.as_secs_f64());
    });
    admin
        .metrics
        .drain_budget
        .set(settings.drain_budget.as_secs_f64());
    admin
        .metrics
        .safety_margin
        .set(settings.safety_margin.as_secs_f64());
    // Metrics and probes are worth less than the lock: a port in use is logged, not fatal.
    match admin::bind(settings.listen_address).await {
        Ok(l) => admin::serve(l, admin.clone()),
        Err(e) => error!(
            node = %node,
            address = %settings.listen_address,
            error = %e,
            "admin server not started; running without /metrics, /healthz and /readyz"
        ),
    }

    // Lock first: nothing talks to the API server before logind holds the shutdown for us.
    let (ltx, mut lrx) = mpsc::unbounded_channel();
    let lock = logind::spawn(node.clone(), ltx);
    let Some((delay_max, preparing, early)) = wait_for_lock(&mut lrx).await? else {
        return Ok(Exit::Terminated);
    };

    let client = crate::kube::client(settings.kubeconfig.as_deref()).await?;
    let _ = admin.client.set(client.clone());
    let events = NodeEvents::new(client.clone(), &node, None);
    let reports = Reports::spawn(client.clone(), &node, events.clone());
    let mut driver = Driver::new(
        DriverConfig {
            machine: MachineConfig {
                node: node.clone(),
                scope: settings.scope,
                safety_margin: settings.safety_margin,
                deadline_override: settings.deadline,
            },
            mark: CordonMark::boot(&boot_id),
            once: false,
        },
        client.clone(),
        Arc::new(lock),
        report::AgentReporter::new(&node, admin.clone(), reports),
    );
    driver.feed(Input::LockTaken { delay_max });

    let tx = driver.sender();
    let metrics = admin.metrics.clone();
    startup::spawn_reconcile(
        Api::all(client.clone()),
        node.clone(),
        boot_id,
        preparing,
        tx.clone(),
        events.clone(),
        // The drain before this boot, for the alerts about it (its node may have gone down
        // before any scrape saw its end).
        move |last| {
            if let Some(last) = last {
                metrics.last_drain(&last);
            }
        },
    );
    startup::spawn_logind_config_check(&settings, delay_max, tx.clone(), events);
    if preparing || early.as_ref().is_some_and(|(s, _)| *s) {
        info!(node = %node, "a shutdown is already under way; draining now");
        let kind = early.and_then(|(_, k)| k);
        let _ = tx.send(Input::Shutdown { start: true, kind });
    }

    let triggers =
        futures::stream::unfold(
            lrx,
            |mut rx| async move { rx.recv().await.map(|e| (e, rx)) },
        )
        .map(move |ev| logind_input(&node, ev));
    let (outcome, _) = driver.run(Box::pin(triggers)).await?;
    Ok(match outcome {
        Outcome::Terminated {
            draining: true,
            remaining,
        } => Exit::TerminatedDuringDrain { remaining },
        _ => Exit::Terminated,
    })
}

/// A shutdown signal that came before the lock: `(start, kind)`.
type Early = Option<(bool, Option<String>)>;

/// Waits for logind's first lock; `None` when told to stop first.
async fn wait_for_lock(
    lrx: &mut mpsc::UnboundedReceiver<LogindEvent>,
) -> Result<Option<(Duration, bool, Early)>, RunError> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    let mut early = None;
    loop {
        tokio::select! {
            ev = lrx.recv() => match ev {
                Some(LogindEvent::LockTaken { delay_max, preparing }) => {
                    return Ok(Some((delay_max, preparing, early)))
                }
                Some(LogindEvent::Shutdown { start, kind }) => early = Some((start, kind)),
                Some(LogindEvent::LockLost { .. }) => {}
                None => return Ok(None),
            },
            _ = sigterm.recv() => return Ok(None),
            _ = sigint.recv() => return Ok(None),
        }
    }
}

fn logind_input(node: &str, ev: LogindEvent) -> Input {
    match ev {
        LogindEvent::LockTaken { delay_max, .. } => Input::LockTaken { delay_max },
        LogindEvent::LockLost { why } => {
            warn!(node = %node, why = %why, "lock lost");
            Input::LockLost
        }
        LogindEvent::Shutdown { start, kind } => {
            info!(node = %node, start, kind = kind.as_deref().unwrap_or(""), "shutdown signal");
            Input::Shutdown { start, kind }
        }
    }
}
