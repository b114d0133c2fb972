//! The runtime around the state machine: feeds it logind signals, watch updates, API answers,
//! the clock and process signals, and carries out its effects. API calls run as tasks whose
//! answers come back as inputs, so a slow call never holds up the lock's release.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::machine::{
    CordonResult, Effect, Input, Machine, MachineConfig, Phase, ReleaseReason, WatchUpdate,
};
use crate::admin::{self, AdminState, DrainStatus};
use crate::bootid::{self, StartupAction};
use crate::config::Settings;
use crate::drain::model::{ObjKey, VmiInfo};
use crate::kube::condition::{GuardState, LastShutdown, rfc3339};
use crate::kube::events::{NodeEvents, Report, Reports};
use crate::kube::{evict, node as nodeapi, watch};
use crate::logind::{self, LockControl, LogindEvent};
use crate::logind_conf;
use crate::progress::{Progress, VmiState, round_ms};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    BootId(#[from] bootid::BootIdError),
    #[error(transparent)]
    Client(#[from] crate::kube::ClientError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// How the agent stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM/SIGINT while idle or after the release.
    Terminated,
    /// SIGTERM/SIGINT during a drain: the shutdown goes on without us.
    TerminatedDuringDrain { remaining: Vec<ObjKey> },
}

struct Ctx {
    node: String,
    boot_id: String,
    client: Client,
    nodes: Api<Node>,
    lock: LockControl,
    events: NodeEvents,
    reports: Reports,
    admin: AdminState,
    tx: mpsc::UnboundedSender<Input>,
}

/// The current drain as the operator sees it: per-VMI progress and the record that ends up in
/// the Node's last-shutdown annotation.
struct Watching {
    progress: Progress,
    kind: String,
    started_wall: chrono::DateTime<chrono::Utc>,
    budget: Duration,
    /// When the lock was released (the drain's clock stops there).
    ended: Option<Instant>,
}

fn keys(v: &[ObjKey]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(settings: Settings) -> Result<Exit, RunError> {
    let node = settings.node.clone();
    let boot_id = bootid::read_boot_id(&settings.boot_id_path)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    info!(node = %node, boot_id = %boot_id, scope = %settings.scope, "starting");

    let admin = AdminState::default();
    admin.update(|s| {
        s.node = node.clone();
        s.phase = "starting".into();
        s.drain_budget_s = Some(settings.drain_budget.as_secs_f64());
    });
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
    let mut early_shutdown = None;
    let (delay_max, preparing) = loop {
        tokio::select! {
            ev = lrx.recv() => match ev {
                Some(LogindEvent::LockTaken { delay_max, preparing }) => break (delay_max, preparing),
                Some(LogindEvent::Shutdown { start, kind }) => early_shutdown = Some((start, kind)),
                Some(LogindEvent::LockLost { .. }) => {}
                None => return Ok(Exit::Terminated),
            },
            _ = sigterm.recv() => return Ok(Exit::Terminated),
            _ = sigint.recv() => return Ok(Exit::Terminated),
        }
    };

    let client = crate::kube::client(settings.kubeconfig.as_deref()).await?;
    let _ = admin.client.set(client.clone());
    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    let events = NodeEvents::new(client.clone(), &node, None);
    let reports = Reports::spawn(client.clone(), &node, events.clone());
    let ctx = Ctx {
        node: node.clone(),
        boot_id,
        client: client.clone(),
        nodes: Api::all(client.clone()),
        lock,
        events,
        reports,
        admin: admin.clone(),
        tx: tx.clone(),
    };
    let mut machine = Machine::new(MachineConfig {
        node: node.clone(),
        scope: settings.scope,
        safety_margin: settings.safety_margin,
        deadline_override: settings.deadline,
    });
    machine.handle(Instant::now(), Input::LockTaken { delay_max });
    admin.metrics.lock_held.set(1);
    admin.metrics.inhibit_delay_max.set(delay_max.as_secs_f64());
    let mut lock_was_lost = false;
    let mut watching: Option<Watching> = None;
    if !preparing {
        ctx.reports
            .condition(GuardState::Ready, ready_message(delay_max));
    }
    publish_status(&ctx, &machine, watching.as_ref(), Instant::now());

    spawn_startup_reconcile(&ctx, preparing);
    spawn_logind_config_check(&ctx, &settings, delay_max);
    spawn_watches(&ctx);
    if preparing || early_shutdown.as_ref().is_some_and(|(s, _)| *s) {
        info!(node = %node, "a shutdown is already under way; draining now");
        let kind = early_shutdown.and_then(|(_, k)| k);
        let _ = tx.send(Input::Shutdown { start: true, kind });
    }

    loop {
        let wake = machine.next_wakeup();
        let sleep = async move {
            match wake {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        let input = tokio::select! {
            biased;
            _ = sigterm.recv() => Input::Terminate,
            _ = sigint.recv() => Input::Terminate,
            Some(ev) = lrx.recv() => match ev {
                LogindEvent::LockTaken { delay_max, .. } => Input::LockTaken { delay_max },
                LogindEvent::LockLost { why } => {
                    warn!(node = %node, why = %why, "lock lost");
                    Input::LockLost
                }
                LogindEvent::Shutdown { start, kind } => {
                    info!(node = %node, start, kind = kind.as_deref().unwrap_or(""), "shutdown signal");
                    Input::Shutdown { start, kind }
                }
            },
            Some(i) = rx.recv() => i,
            _ = sleep => Input::Tick,
        };

        let now = Instant::now();
        let before: BTreeSet<ObjKey> = machine.remaining_vmis().into_iter().collect();
        let was_draining = matches!(machine.phase(), Phase::Draining(_));
        let vmi_seen = match &input {
            Input::Vmis(WatchUpdate::Applied(v)) => Some((v.clone(), false)),
            Input::Vmis(WatchUpdate::Deleted(v)) => Some((v.clone(), true)),
            _ => None,
        };
        let prev = vmi_seen
            .as_ref()
            .and_then(|(v, _)| machine.vmi(&v.uid).cloned());
        log_vmi_progress(&node, prev.as_ref(), vmi_seen.as_ref().map(|(v, _)| v));
        let m = &ctx.admin.metrics;
        match &input {
            Input::LockTaken { delay_max } | Input::DelayMax(delay_max) => {
                m.inhibit_delay_max.set(delay_max.as_secs_f64());
            }
            Input::Evicted { outcome, .. } => m.eviction(outcome.label()),
            _ => {}
        }
        let deleted_vmi = match &input {
            Input::Vmis(WatchUpdate::Deleted(v)) => Some(v.clone()),
            _ => None,
        };
        let lock_input = match &input {
            Input::LockTaken { delay_max } => Some(Some(*delay_max)),
            Input::LockLost => Some(None),
            _ => None,
        };
        let fx = machine.handle(now, input);
        // Logged before the effects (a few microseconds) so logs read in causal order.
        log_transitions(
            &node,
            &machine,
            was_draining,
            &before,
            vmi_seen,
            prev.as_ref(),
        );

        // Release first, everything else after.
        let (urgent, rest): (Vec<Effect>, Vec<Effect>) = fx
            .into_iter()
            .partition(|e| matches!(e, Effect::ReleaseLock { .. }));
        let released = urgent.iter().find_map(|e| match e {
            Effect::ReleaseLock { reason, .. } => Some(*reason),
            _ => None,
        });
        for e in urgent {
            if let Some(exit) = execute(&ctx, &machine, now, e) {
                return Ok(exit);
            }
        }
        account(
            &ctx,
            &machine,
            now,
            was_draining,
            released,
            lock_input,
            deleted_vmi.as_ref(),
            &mut lock_was_lost,
            &mut watching,
        );
        for e in rest {
            if let Some(exit) = execute(&ctx, &machine, now, e) {
                return Ok(exit);
            }
        }
    }
}

fn ready_message(delay_max: Duration) -> String {
    format!(
        "holding a logind delay lock; a shutdown will be held up to {}s while the node's VMs move away",
        delay_max.as_secs()
    )
}

/// Metrics, the Node's condition, the last-shutdown record and `/status`, brought up to date
/// after one input.
#[allow(clippy::too_many_arguments)]
fn account(
    ctx: &Ctx,
    machine: &Machine,
    now: Instant,
    was_draining: bool,
    released: Option<ReleaseReason>,
    lock_input: Option<Option<Duration>>,
    deleted_vmi: Option<&VmiInfo>,
    lock_was_lost: &mut bool,
    watching: &mut Option<Watching>,
) {
    let m = &ctx.admin.metrics;
    m.lock_held.set(machine.lock_held() as i64);
    let idle = matches!(machine.phase(), Phase::Idle);
    match lock_input {
        Some(Some(delay)) => {
            if *lock_was_lost {
                m.logind_reconnects.inc();
                *lock_was_lost = false;
            }
            if idle {
                ctx.reports
                    .condition(GuardState::Ready, ready_message(delay));
            }
        }
        Some(None) => {
            *lock_was_lost = true;
            if idle {
                ctx.reports.condition(
                    GuardState::LockLost,
                    "logind or the system bus went away; taking the lock again",
                );
            }
        }
        None => {}
    }

    if let Phase::Draining(d) = machine.phase()
        && !was_draining
    {
        let kind = d.kind.clone().unwrap_or_else(|| "unknown".into());
        m.shutdown(Some(&kind));
        m.draining.set(1);
        let vmis = machine.remaining_vmis();
        let started_wall = chrono::Utc::now();
        ctx.reports.condition(
            GuardState::Draining,
            format!(
                "{kind} under way: moving {} VMI(s) off the node, deadline in {}s",
                vmis.len(),
                d.deadline.duration_since(d.started).as_secs()
            ),
        );
        ctx.reports.node_event(
            false,
            "DrainStarted",
            "Drain",
            format!(
                "{kind}: cordoning and draining the node; VMIs: {}",
                if vmis.is_empty() {
                    "none".to_string()
                } else {
                    keys(&vmis)
                }
            ),
        );
        ctx.reports.send(Report::LastShutdown(LastShutdown {
            r#type: kind.clone(),
            started: rfc3339(started_wall),
            finished: None,
            outcome: "draining".into(),
            migrated: 0,
            stopped: 0,
            remaining: vmis.iter().map(ToString::to_string).collect(),
            duration_s: None,
        }));
        *watching = Some(Watching {
            progress: Progress::new(&ctx.node, d.started),
            kind,
            started_wall,
            budget: d.deadline.duration_since(d.started),
            ended: None,
        });
    }

    if let Some(w) = watching.as_mut() {
        for (_, state) in w.progress.update(now, machine, deleted_vmi) {
            match state {
                VmiState::Migrated { .. } => m.vmis_migrated.inc(),
                VmiState::Stopped => m.vmis_stopped.inc(),
                _ => 0,
            };
        }
        m.vmis_remaining.set(machine.remaining_vmis().len() as i64);
    }

    if let Some(reason) = released
        && let Some(w) = watching.as_mut()
    {
        w.ended = Some(now);
        let secs = w.progress.elapsed(now).as_secs_f64();
        m.drained(reason.as_str(), secs);
        m.draining.set(0);
        let (migrated, stopped, _) = w.progress.counts();
        let remaining: Vec<String> = machine
            .remaining_vmis()
            .iter()
            .map(ToString::to_string)
            .chain(
                machine
                    .other_pods_remaining()
                    .iter()
                    .map(|p| format!("pod {p}")),
            )
            .collect();
        let state = match reason {
            ReleaseReason::Empty => GuardState::Drained,
            ReleaseReason::Deadline => {
                m.deadline_reached.inc();
                GuardState::DeadlineReached
            }
        };
        let message = match reason {
            ReleaseReason::Empty => format!(
                "node empty after {secs:.1}s ({migrated} migrated, {stopped} stopped); shutdown lock released"
            ),
            ReleaseReason::Deadline => format!(
                "deadline reached after {secs:.1}s ({migrated} migrated, {stopped} stopped, {} left); shutdown lock released",
                remaining.len()
            ),
        };
        ctx.reports.condition(state, message);
        let last = LastShutdown {
            r#type: w.kind.clone(),
            started: rfc3339(w.started_wall),
            finished: Some(rfc3339(chrono::Utc::now())),
            outcome: reason.as_str().into(),
            migrated,
            stopped,
            remaining,
            duration_s: Some(round_ms(w.progress.elapsed(now))),
        };
        ctx.admin.update(|s| s.last_shutdown = Some(last.clone()));
        ctx.reports.send(Report::LastShutdown(last));
    }

    if was_draining && idle {
        // Cancelled: the drain is over without a release.
        m.draining.set(0);
        if let Some(w) = watching.take() {
            let (migrated, stopped, _) = w.progress.counts();
            ctx.reports.send(Report::LastShutdown(LastShutdown {
                r#type: w.kind,
                started: rfc3339(w.started_wall),
                finished: Some(rfc3339(chrono::Utc::now())),
                outcome: "cancelled".into(),
                migrated,
                stopped,
                remaining: machine
                    .remaining_vmis()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                duration_s: Some(round_ms(w.progress.elapsed(now))),
            }));
        }
        if machine.lock_held() {
            ctx.reports.condition(
                GuardState::Ready,
                "shutdown cancelled; holding the lock again",
            );
        }
    }
    publish_status(ctx, machine, watching.as_ref(), now);
}

fn publish_status(ctx: &Ctx, machine: &Machine, watching: Option<&Watching>, now: Instant) {
    let lock_held = machine.lock_held();
    let phase = match machine.phase() {
        Phase::Idle => "idle",
        Phase::Draining(_) => "draining",
        Phase::Released { .. } => "released",
    };
    let drain_status = watching.map(|w| DrainStatus {
        r#type: w.kind.clone(),
        elapsed_s: round_ms(w.progress.elapsed(w.ended.unwrap_or(now))),
        deadline_s: w.budget.as_secs_f64(),
        vmis: w.progress.snapshot(),
        pods_remaining: machine
            .other_pods_remaining()
            .iter()
            .map(ToString::to_string)
            .collect(),
    });
    ctx.admin.update(|s| {
        s.lock_held = lock_held;
        s.phase = phase.into();
        s.inhibit_delay_max_s = Some(ctx.admin.metrics.inhibit_delay_max.get());
        if drain_status.is_some() {
            s.drain = drain_status;
        }
    });
}

/// Per-VMI progress from its watch updates: evacuation requested, migration target chosen,
/// migration failed.
fn log_vmi_progress(node: &str, prev: Option<&VmiInfo>, next: Option<&VmiInfo>) {
    let Some(next) = next else { return };
    if !next.runs_on(node) && prev.is_none_or(|p| !p.runs_on(node)) {
        return;
    }
    let prev_evac = prev.and_then(|p| p.evacuation_node.as_deref());
    if let Some(e) = next.evacuation_node.as_deref()
        && prev_evac != Some(e)
    {
        info!(node = %node, vmi = %next.key, "vmi evacuation requested");
    }
    let prev_m = prev.and_then(|p| p.migration.as_ref());
    if let Some(m) = &next.migration {
        if m.target_node.is_some()
            && prev_m.and_then(|p| p.target_node.as_ref()) != m.target_node.as_ref()
            && !m.completed
        {
            info!(
                node = %node,
                vmi = %next.key,
                target_node = m.target_node.as_deref().unwrap_or(""),
                "vmi migrating"
            );
        }
        if m.failed && !prev_m.is_some_and(|p| p.failed) {
            warn!(
                node = %node,
                vmi = %next.key,
                target_node = m.target_node.as_deref().unwrap_or(""),
                "vmi migration failed"
            );
        }
    }
}

fn log_transitions(
    node: &str,
    machine: &Machine,
    was_draining: bool,
    before: &BTreeSet<ObjKey>,
    vmi_seen: Option<(VmiInfo, bool)>,
    prev: Option<&VmiInfo>,
) {
    let after: BTreeSet<ObjKey> = machine.remaining_vmis().into_iter().collect();
    if was_draining || matches!(machine.phase(), Phase::Draining(_) | Phase::Released { .. }) {
        for gone in before.difference(&after) {
            let how = match &vmi_seen {
                Some((v, deleted)) if &v.key == gone => {
                    if v.is_finished() {
                        format!("stopped ({})", v.phase.as_deref().unwrap_or(""))
                    } else if let Some(t) = v
                        .migration
                        .as_ref()
                        .filter(|m| m.completed)
                        .and_then(|m| m.target_node.clone())
                    {
                        format!("migrated to {t}")
                    } else if let Some(n) = v.node_name.as_ref().filter(|n| n.as_str() != node) {
                        format!("migrated to {n}")
                    } else if *deleted {
                        match prev
                            .and_then(|p| p.migration.as_ref())
                            .and_then(|m| m.target_node.as_ref())
                        {
                            Some(t) => format!("migrated to {t}"),
                            None => "deleted".into(),
                        }
                    } else {
                        "left".into()
                    }
                }
                _ => "left".into(),
            };
            info!(node = %node, vmi = %gone, how = %how, left = after.len(), "vmi left node");
        }
    }
    match machine.phase() {
        Phase::Draining(d) if !was_draining => {
            info!(
                node = %node,
                kind = d.kind.as_deref().unwrap_or(""),
                budget_ms = d.deadline.duration_since(d.started).as_millis() as u64,
                vmis = %keys(&machine.remaining_vmis()),
                "drain started"
            );
        }
        Phase::Idle if was_draining => info!(node = %node, "shutdown cancelled; drain stopped"),
        _ => {}
    }
}

fn execute(ctx: &Ctx, machine: &Machine, now: Instant, effect: Effect) -> Option<Exit> {
    let node = ctx.node.clone();
    match effect {
        Effect::ReleaseLock { reason, remaining } => {
            let held = ctx.lock.release();
            let drain_ms = match machine.phase() {
                Phase::Released { started, .. } => now.duration_since(*started).as_millis() as u64,
                _ => 0,
            };
            info!(
                node = %node,
                reason = reason.as_str(),
                was_held = held,
                drain_ms,
                remaining = %keys(&remaining),
                "lock released"
            );
            ctx.reports.node_event(
                false,
                "ShutdownLockReleased",
                "Release",
                format!("shutdown lock released ({})", reason.as_str()),
            );
        }
        Effect::Cordon => {
            let (api, boot, tx) = (ctx.nodes.clone(), ctx.boot_id.clone(), ctx.tx.clone());
            tokio::spawn(async move {
                let r = nodeapi::cordon(&api, &node, &boot).await;
                match &r {
                    CordonResult::CordonedByUs => {
                        info!(node = %node, boot_id = %boot, "node cordoned")
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
            let (api, tx) = (ctx.nodes.clone(), ctx.tx.clone());
            tokio::spawn(async move {
                let r = nodeapi::uncordon(&api, &node, true).await;
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
            let (client, tx) = (ctx.client.clone(), ctx.tx.clone());
            let vmi = machine
                .pod(&pod.uid)
                .and_then(|p| p.domain.clone())
                .unwrap_or_default();
            tokio::spawn(async move {
                let outcome = evict::evict(client, &pod).await;
                let detail = match &outcome {
                    crate::drain::eviction::EvictionOutcome::Retry(d)
                    | crate::drain::eviction::EvictionOutcome::Refused(d) => d.clone(),
                    _ => String::new(),
                };
                info!(
                    node = %node,
                    pod = %pod.key,
                    vmi = %vmi,
                    outcome = outcome.label(),
                    detail = %detail,
                    "eviction"
                );
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
            let (client, tx, reports) = (ctx.client.clone(), ctx.tx.clone(), ctx.reports.clone());
            info!(
                node = %node,
                vmi = %vmi,
                pod = %pod.key,
                grace_seconds,
                why = why.as_str(),
                "stopping vmi"
            );
            tokio::spawn(async move {
                let result = evict::stop(client, &pod, grace_seconds).await;
                if let Err(e) = &result {
                    warn!(node = %node, vmi = %vmi, pod = %pod.key, error = %e, "stop failed; retrying");
                } else {
                    let note = format!(
                        "stopping VMI {vmi} gracefully ({grace_seconds}s) before the shutdown: {}",
                        why.as_str()
                    );
                    reports.send(Report::VmiEvent {
                        vmi: vmi.clone(),
                        uid: vmi_uid.clone(),
                        warning: true,
                        reason: "VMIStoppedForShutdown",
                        action: "Stop",
                        note: format!(
                            "stopped gracefully ({grace_seconds}s) because node {node} is shutting down: {}",
                            why.as_str()
                        ),
                    });
                    reports.node_event(true, "VMIStoppedForShutdown", "Stop", note);
                }
                let _ = tx.send(Input::Stopped { vmi_uid, result });
            });
        }
        Effect::TakeLock => {
            info!(node = %node, "taking a new lock");
            ctx.lock.take();
        }
        Effect::Warn { reason, note } => {
            warn!(node = %node, reason, note = %note, "warning event");
            ctx.reports.node_event(true, reason, "Drain", note);
        }
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
                return Some(Exit::TerminatedDuringDrain { remaining });
            }
            info!(node = %node, "terminated");
            return Some(Exit::Terminated);
        }
    }
    None
}

/// Lifts our cordon from an earlier boot. Retries until the API server answers, since a node
/// that just booted may start the agent before the control plane is reachable.
fn spawn_startup_reconcile(ctx: &Ctx, preparing: bool) {
    let (api, node, boot, tx, events) = (
        ctx.nodes.clone(),
        ctx.node.clone(),
        ctx.boot_id.clone(),
        ctx.tx.clone(),
        ctx.events.clone(),
    );
    tokio::spawn(async move {
        let mut failures = 0;
        let state = loop {
            match nodeapi::get(&api, &node).await {
                Ok(s) => break s,
                Err(e) => {
                    failures += 1;
                    let wait = crate::drain::eviction::backoff(failures);
                    warn!(node = %node, error = %e, retry_ms = wait.as_millis() as u64, "reading the Node failed");
                    tokio::time::sleep(wait).await;
                }
            }
        };
        let action = bootid::on_start(
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
                if let Err(e) = nodeapi::uncordon(&api, &node, false).await {
                    warn!(node = %node, error = %e, "removing our stale annotation failed");
                }
            }
            StartupAction::Uncordon { cordoned_in_boot } => {
                match nodeapi::uncordon(&api, &node, true).await {
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

/// Optionally raises logind's `InhibitDelayMaxSec` with a drop-in, and in every case warns when
/// the effective delay is shorter than the drain budget.
fn spawn_logind_config_check(ctx: &Ctx, settings: &Settings, delay_max: Duration) {
    let (node, tx, events) = (ctx.node.clone(), ctx.tx.clone(), ctx.events.clone());
    let s = settings.clone();
    tokio::spawn(async move {
        let mut delay = delay_max;
        if s.write_logind_dropin {
            let wanted = s.drain_budget + s.safety_margin;
            match logind_conf::write_dropin(&s.host_root, &s.logind_dropin, wanted) {
                Ok(changed) => {
                    info!(node = %node, dropin = %s.logind_dropin.display(), changed, wanted_s = wanted.as_secs(), "logind drop-in written");
                    if changed || delay < wanted {
                        match logind::reload_and_verify(wanted).await {
                            Ok(d) => {
                                if d < wanted {
                                    warn!(
                                        node = %node,
                                        inhibit_delay_max_ms = d.as_millis() as u64,
                                        wanted_ms = wanted.as_millis() as u64,
                                        dropin = %s.logind_dropin.display(),
                                        "logind reloaded but does not use the drop-in's value"
                                    );
                                } else {
                                    info!(node = %node, inhibit_delay_max_ms = d.as_millis() as u64, "logind reloaded");
                                }
                                delay = d;
                                let _ = tx.send(Input::DelayMax(d));
                            }
                            Err(e) => warn!(node = %node, error = %e, "reloading logind failed"),
                        }
                    }
                }
                Err(e) => warn!(node = %node, error = %e, "writing the logind drop-in failed"),
            }
        }
        if delay < s.drain_budget {
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
        }
    });
}

fn spawn_watches(ctx: &Ctx) {
    let (client, node, tx) = (ctx.client.clone(), ctx.node.clone(), ctx.tx.clone());
    let t = tx.clone();
    let c = client.clone();
    let n = node.clone();
    tokio::spawn(async move {
        let mut s = std::pin::pin!(watch::vmis(c, &n));
        while let Some(u) = s.next().await {
            if t.send(Input::Vmis(u)).is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let mut s = std::pin::pin!(watch::pods(client, &node));
        while let Some(u) = s.next().await {
            if tx.send(Input::Pods(u)).is_err() {
                return;
            }
        }
    });
}
