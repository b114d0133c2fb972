//! The one executor of a drain, for the agent and the `drain` command alike: it owns the node's
//! two watches and the loop, feeds the [`Machine`] every input (a trigger, a watch update, an API
//! answer, the clock, SIGTERM/SIGINT) and carries out its [`Effect`]s — the release first, then
//! the report of the step, then cordon/uncordon, evictions and stops, each API call on a task
//! of its own whose answer comes back as an input, so a slow call never holds up the release.
//!
//! What differs between its two callers is given to it, not copied:
//! - what starts a drain: a stream of trigger inputs (logind's signals, or one `on-demand` start);
//! - how the cordon is marked: a [`CordonMark`] (boot ID, or maintenance);
//! - whether a lock is held: a [`Gate`] (logind's lock, or [`NoLock`]);
//! - how progress is reported: a [`Reporter`] (metrics, condition and Events, or a terminal);
//! - whether it ends at the first release (`once`: the `drain` command).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::drain::machine::{
    CordonResult, Effect, EndReason, Input, Machine, MachineConfig, Note, Phase, ReleaseReason,
    Snapshot, StopReason,
};
use crate::drain::model::ObjKey;
use crate::drain::power::Verdict;
use crate::kube::cordon::{self, CordonMark};
use crate::kube::watch::{self, Pace};
use crate::kube::{kubevirt, pods};

#[cfg(test)]
mod tests;

/// How the shutdown is held: logind's lock for the agent, nothing for the `drain` command.
pub trait Gate {
    /// Lets the shutdown go on now (closes the lock's fd); whether a lock was held.
    fn release(&self) -> bool;
    /// Asks for a new lock (after a cancelled shutdown).
    fn retake(&self);
}

/// No lock: the `drain` command.
pub struct NoLock;

impl Gate for NoLock {
    fn release(&self) -> bool {
        false
    }
    fn retake(&self) {}
}

/// Cluster-wide turns for pre-drains: the agent's Leases ([`crate::kube::turns`]).
pub trait TurnTaker {
    /// Waits for a turn in the background and sends [`Input::Turn`]`(true)` on `tx` once it
    /// is ours (or `false` if it is lost later).
    fn want(&self, tx: mpsc::UnboundedSender<Input>);
    /// Gives the turn back, or stops waiting for one.
    fn release(&self);
}

/// Power events ([`crate::drain::power`]): the agent's announcements and judgement.
pub trait PowerJudge {
    /// Announces this node's shutdown for `fresh_for`, then judges from the other nodes and
    /// sends [`Input::Power`] on `tx`: the first verdict, and every change until a power event.
    fn announce(&self, fresh_for: Duration, tx: mpsc::UnboundedSender<Input>);
    /// Takes the announcement back and stops judging (a cancelled shutdown).
    fn withdraw(&self);
    /// Stops a VMI in place in a power event: recorded on its VM, stopped through KubeVirt.
    fn stop(
        &self,
        vmi: ObjKey,
        grace_seconds: u32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;
}

/// One step of the drain, as reporters see it: what changed and the state after it.
pub struct Step<'a> {
    pub now: Instant,
    pub notes: &'a [Note],
    pub snapshot: &'a Snapshot,
}

/// How progress is reported.
pub trait Reporter {
    /// Called once per input, after the lock's release and before any other effect.
    fn report(&mut self, step: &Step<'_>);
    /// How often [`Reporter::tick`] is called (a terminal's redraw); never by default.
    fn tick_every(&self) -> Option<Duration> {
        None
    }
    fn tick(&mut self, _now: Instant, _snapshot: &Snapshot) {}
}

/// What the driver is run with.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub machine: MachineConfig,
    pub mark: CordonMark,
    /// End at the first release (the `drain` command) instead of running until terminated.
    pub once: bool,
}

/// How a run of the driver ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The drain let the shutdown go on (only with `once`).
    Released(ReleaseReason),
    /// SIGTERM/SIGINT; `draining` when a drain was cut short, with what was left.
    Terminated {
        draining: bool,
        remaining: Vec<ObjKey>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

pub struct Driver<R> {
    node: String,
    client: Client,
    /// The client of the watches between drains; without one they always follow at drain pace.
    idle_client: Option<Client>,
    /// The node's two watch tasks and their pace.
    watching: Option<(Pace, [tokio::task::AbortHandle; 2])>,
    nodes: Api<Node>,
    mark: CordonMark,
    once: bool,
    machine: Machine,
    reporter: R,
    gate: Arc<dyn Gate + Send + Sync>,
    turns: Option<Arc<dyn TurnTaker + Send + Sync>>,
    power: Option<Arc<dyn PowerJudge + Send + Sync>>,
    /// The node's first complete listing has been logged.
    listed: bool,
    tx: mpsc::UnboundedSender<Input>,
    rx: mpsc::UnboundedReceiver<Input>,
}

/// The driver's clock: tokio's, so tests can pause and advance it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl<R: Reporter> Driver<R> {
    pub fn new(
        cfg: DriverConfig,
        client: Client,
        gate: Arc<dyn Gate + Send + Sync>,
        reporter: R,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Driver {
            node: cfg.machine.node.clone(),
            nodes: Api::all(client.clone()),
            client,
            idle_client: None,
            watching: None,
            mark: cfg.mark,
            once: cfg.once,
            machine: Machine::new(cfg.machine),
            reporter,
            gate,
            turns: None,
            power: None,
            listed: false,
            tx,
            rx,
        }
    }

    /// Pre-drains wait for a turn from `turns`.
    pub fn with_turns(mut self, turns: Arc<dyn TurnTaker + Send + Sync>) -> Self {
        self.turns = Some(turns);
        self
    }

    /// Shutdowns announce themselves to `power`, which judges power events.
    pub fn with_power(mut self, power: Arc<dyn PowerJudge + Send + Sync>) -> Self {
        self.power = Some(power);
        self
    }

    /// Between drains, the node's watches use this client at [`Pace::Idle`]: long calls that
    /// cost the API server a few requests an hour. A drain replaces them with watches of its
    /// own at [`Pace::Draining`] on the calls' client.
    pub fn with_idle_watches(mut self, client: Client) -> Self {
        self.idle_client = Some(client);
        self
    }

    /// Where the caller's other tasks send inputs (the start-up reconcile, logind's delay).
    pub fn sender(&self) -> mpsc::UnboundedSender<Input> {
        self.tx.clone()
    }

    /// A drain is under way (a pre-drain included).
    pub fn draining(&self) -> bool {
        matches!(self.machine.phase(), Phase::Draining(_))
    }

    /// Takes one input now, outside the loop (before [`Driver::run`]).
    pub fn feed(&mut self, input: Input) -> Option<Outcome> {
        self.step(now(), input)
    }

    /// Runs until the drain is released (`once`) or SIGTERM/SIGINT; hands the reporter back.
    pub async fn run(
        mut self,
        triggers: impl Stream<Item = Input> + Unpin,
    ) -> Result<(Outcome, R), DriverError> {
        let mut sigterm = signal(SignalKind::terminate()).map_err(DriverError::Signals)?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(DriverError::Signals)?;
        self.follow_watches();
        let mut triggers = triggers.fuse();
        let mut ticks = self.reporter.tick_every().map(tokio::time::interval);
        loop {
            let sleep = wake_at(self.machine.next_wakeup());
            let tick = async {
                match ticks.as_mut() {
                    Some(t) => t.tick().await,
                    None => std::future::pending().await,
                }
            };
            let input = tokio::select! {
                biased;
                _ = sigterm.recv() => Input::Terminate,
                _ = sigint.recv() => Input::Terminate,
                Some(i) = triggers.next() => i,
                Some(i) = self.rx.recv() => i,
                _ = sleep => Input::Tick,
                _ = tick => {
                    let at = now();
                    let snapshot = self.machine.snapshot(at);
                    self.reporter.tick(at, &snapshot);
                    continue;
                }
            };
            if let Some(outcome) = self.step(now(), input) {
                self.stop_watches();
                return Ok((outcome, self.reporter));
            }
            self.follow_watches();
        }
    }

    /// One input through the machine, and its effects carried out: the release first, then the
    /// report, then the rest.
    fn step(&mut self, now: Instant, input: Input) -> Option<Outcome> {
        let fx = self.machine.handle(now, input);
        let mut notes = self.machine.take_notes();
        log_notes(&self.node, &notes);
        if !self.listed
            && let Some((vmis, pods)) = self.machine.listed()
        {
            // From here a shutdown's first evictions need no list of their own.
            self.listed = true;
            info!(node = %self.node, vmis, pods, "node listed");
        }
        let (urgent, rest): (Vec<Effect>, Vec<Effect>) = fx
            .into_iter()
            .partition(|e| matches!(e, Effect::ReleaseLock { .. }));
        let mut outcome = None;
        for e in urgent {
            if let Effect::ReleaseLock { reason, remaining } = e {
                self.release(now, reason, &remaining);
                if self.once {
                    outcome = Some(Outcome::Released(reason));
                }
            }
        }
        for e in &rest {
            if let Effect::Warn { reason, note } = e {
                warn!(node = %self.node, reason, note = %note, "warning event");
                notes.push(Note::Warning {
                    reason,
                    note: note.clone(),
                });
            }
        }
        let snapshot = self.machine.snapshot(now);
        self.reporter.report(&Step {
            now,
            notes: &notes,
            snapshot: &snapshot,
        });
        for e in rest {
            if let Some(o) = self.execute(e) {
                return Some(o);
            }
        }
        outcome
    }

    fn release(&self, now: Instant, reason: ReleaseReason, remaining: &[ObjKey]) {
        let held = self.gate.release();
        let drain_ms = match self.machine.phase() {
            Phase::Released { started, .. } => now.duration_since(*started).as_millis() as u64,
            _ => 0,
        };
        info!(
            node = %self.node,
            reason = reason.as_str(),
            was_held = held,
            drain_ms,
            remaining = %keys(remaining),
            "lock released"
        );
    }

    fn execute(&self, effect: Effect) -> Option<Outcome> {
        let node = self.node.clone();
        let tx = self.tx.clone();
        match effect {
            Effect::Cordon => {
                let (api, mark) = (self.nodes.clone(), self.mark.clone());
                tokio::spawn(async move {
                    let r = cordon::cordon(&api, &node, &mark).await;
                    match &r {
                        CordonResult::CordonedByUs => {
                            info!(node = %node, mark = %mark.value, "node cordoned")
                        }
                        CordonResult::AlreadyUnschedulable => {
                            info!(node = %node, "node already unschedulable; leaving its cordon as it is")
                        }
                        CordonResult::Failed(e) => {
                            warn!(node = %node, error = %e, "cordon failed; evicting anyway")
                        }
                    }
                    let _ = tx.send(Input::Cordoned(r));
                });
            }
            Effect::Uncordon => {
                let (api, annotation) = (self.nodes.clone(), self.mark.annotation);
                tokio::spawn(async move {
                    let r = cordon::uncordon(&api, &node, annotation, true).await;
                    match &r {
                        Ok(true) => info!(node = %node, "node uncordoned"),
                        Ok(false) => {
                            info!(node = %node, "our cordon annotation is gone; node left as it is")
                        }
                        Err(e) => warn!(node = %node, error = %e, "uncordon failed"),
                    }
                    let _ = tx.send(Input::Uncordoned(r.map(|_| ()).map_err(|e| e.to_string())));
                });
            }
            Effect::Evict(pod) => {
                let client = self.client.clone();
                tokio::spawn(async move {
                    let outcome = pods::evict(client, &pod).await;
                    let _ = tx.send(Input::Evicted { pod, outcome });
                });
            }
            Effect::Stop {
                vmi,
                vmi_uid,
                pod,
                grace_seconds,
                why,
            } => {
                info!(
                    node = %node,
                    vmi = %vmi,
                    pod = %pod.key,
                    grace_seconds,
                    why = why.as_str(),
                    "stopping vmi"
                );
                let client = self.client.clone();
                let power = self.power.clone().filter(|_| why == StopReason::PowerEvent);
                tokio::spawn(async move {
                    let result = match power {
                        Some(p) => p.stop(vmi, grace_seconds).await,
                        None => pods::stop(client, &pod, grace_seconds).await,
                    };
                    let _ = tx.send(Input::Stopped { vmi_uid, result });
                });
            }
            Effect::CancelMigration { pod, job } => {
                info!(
                    node = %node,
                    pod = %pod.key,
                    migration = job.name.as_deref().unwrap_or(&job.uid),
                    "cancelling a migration into this node"
                );
                let client = self.client.clone();
                tokio::spawn(async move {
                    let result = kubevirt::cancel_migration(client, &pod.key.namespace, &job).await;
                    let _ = tx.send(Input::MigrationCancelled {
                        pod_uid: pod.uid,
                        result,
                    });
                });
            }
            Effect::CancelEvacuation { vmi } => {
                let client = self.client.clone();
                tokio::spawn(async move {
                    match kubevirt::cancel_evacuation(client, &vmi, &node).await {
                        Ok(true) => info!(node = %node, vmi = %vmi, "evacuation cancelled"),
                        Ok(false) => info!(
                            node = %node,
                            vmi = %vmi,
                            "KubeVirt has no evacuate/cancel here (before 1.7) or the VMI is gone; its migration goes on"
                        ),
                        Err(e) => {
                            warn!(node = %node, vmi = %vmi, error = %e, "cancelling the evacuation failed")
                        }
                    }
                });
            }
            Effect::WantTurn => match &self.turns {
                Some(t) => {
                    info!(node = %node, "waiting for a pre-drain turn");
                    t.want(self.tx.clone());
                }
                None => {
                    let _ = self.tx.send(Input::Turn(true));
                }
            },
            Effect::ReleaseTurn => {
                if let Some(t) = &self.turns {
                    t.release();
                }
            }
            Effect::Announce { fresh_for } => match &self.power {
                Some(p) => p.announce(fresh_for, self.tx.clone()),
                // Nobody to judge with: drain as always.
                None => {
                    let _ = self.tx.send(Input::Power(Verdict::Migrate {
                        targets: Vec::new(),
                    }));
                }
            },
            Effect::Withdraw => {
                if let Some(p) = &self.power {
                    p.withdraw();
                }
            }
            Effect::TakeLock => {
                info!(node = %node, "taking a new lock");
                self.gate.retake();
            }
            // Passed to the reporter with the step's notes.
            Effect::Warn { .. } | Effect::ReleaseLock { .. } => {}
            Effect::Exit {
                draining,
                remaining,
            } => {
                if draining {
                    warn!(
                        node = %node,
                        remaining = %keys(&remaining),
                        "terminated during a drain; the shutdown goes on without us"
                    );
                } else {
                    info!(node = %node, "terminated");
                }
                return Some(Outcome::Terminated {
                    draining,
                    remaining,
                });
            }
        }
        None
    }

    /// The watches at the pace the drain's phase asks for: a drain starting gets fresh
    /// drain-pace watches (their first list replaces the view only once complete, so nothing
    /// is missed in between), its end the idle ones back.
    fn follow_watches(&mut self) {
        let idle = match (self.machine.phase(), &self.idle_client) {
            (Phase::Idle, Some(c)) => Some(c.clone()),
            _ => None,
        };
        let pace = if idle.is_some() {
            Pace::Idle
        } else {
            Pace::Draining
        };
        if self.watching.as_ref().map(|(p, _)| *p) == Some(pace) {
            return;
        }
        self.stop_watches();
        let client = idle.unwrap_or_else(|| self.client.clone());
        let (node, tx) = (self.node.clone(), self.tx.clone());
        let (c, n, t) = (client.clone(), node.clone(), tx.clone());
        let vmis = tokio::spawn(async move {
            let mut s = std::pin::pin!(watch::vmis(c, &n, pace));
            while let Some(u) = s.next().await {
                if t.send(Input::Vmis(u)).is_err() {
                    return;
                }
            }
        });
        let pods = tokio::spawn(async move {
            let mut s = std::pin::pin!(watch::pods(client, &node, pace));
            while let Some(u) = s.next().await {
                if tx.send(Input::Pods(u)).is_err() {
                    return;
                }
            }
        });
        tracing::debug!(node = %self.node, pace = ?pace, "watching the node");
        self.watching = Some((pace, [vmis.abort_handle(), pods.abort_handle()]));
    }

    fn stop_watches(&mut self) {
        if let Some((_, tasks)) = self.watching.take() {
            for t in tasks {
                t.abort();
            }
        }
    }
}

/// Sleeps until `t`, or for ever: a state machine's next wake-up as a future.
pub async fn wake_at(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

pub fn keys(v: &[ObjKey]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The drain's log, the same for both callers: every event names the node, pod and VMI.
fn log_notes(node: &str, notes: &[Note]) {
    for n in notes {
        match n {
            Note::DrainStarted { kind, budget, vmis } => info!(
                node = %node,
                kind = %kind,
                budget_ms = budget.as_millis() as u64,
                vmis = %keys(vmis),
                "drain started"
            ),
            Note::PowerEvent { targets, down } => warn!(
                node = %node,
                targets = %targets.join(","),
                down = %down.join(","),
                "power event recognised; stopping the node's VMs in place"
            ),
            Note::PreDrained { kind, ahead } => info!(
                node = %node,
                kind = %kind,
                ahead_ms = ahead.as_millis() as u64,
                "node empty ahead of the scheduled shutdown; the lock stays until it starts"
            ),
            Note::Ended(end) if end.reason == EndReason::Cancelled => {
                info!(node = %node, "shutdown cancelled; drain stopped")
            }
            Note::VmiLeft { vmi, how, left } => {
                info!(node = %node, vmi = %vmi, how = %how, left, "vmi left node")
            }
            Note::EvacuationRequested { vmi } => {
                info!(node = %node, vmi = %vmi, "vmi evacuation requested")
            }
            Note::Migrating { vmi, target } => info!(
                node = %node,
                vmi = %vmi,
                target_node = target.as_deref().unwrap_or(""),
                "vmi migrating"
            ),
            Note::MigrationFailed { vmi, target } => warn!(
                node = %node,
                vmi = %vmi,
                target_node = target.as_deref().unwrap_or(""),
                "vmi migration failed"
            ),
            Note::Evicted { pod, vmi, outcome } => info!(
                node = %node,
                pod = %pod.key,
                vmi = vmi.as_deref().unwrap_or(""),
                outcome = outcome.label(),
                detail = %outcome.detail(),
                "eviction"
            ),
            Note::StopFailed { vmi, error } => {
                warn!(node = %node, vmi = %vmi, error = %error, "stop failed; retrying")
            }
            Note::Inbound { pod, job } => info!(
                node = %node,
                pod = %pod.key,
                migration = job.name.as_deref().unwrap_or(&job.uid),
                "migration into this node under way"
            ),
            Note::MigrationCancelled { pod, result } => match result {
                Ok(()) => info!(node = %node, pod = %pod.key, "inbound migration cancelled"),
                Err(e) => {
                    warn!(node = %node, pod = %pod.key, error = %e, "cancelling the inbound migration failed; retrying")
                }
            },
            Note::NotMigratableYet { pod } => info!(
                node = %node,
                pod = %pod.key,
                "KubeVirt says not live-migratable but the VMI has not reported it yet (booting); asking again"
            ),
            _ => {}
        }
    }
}
