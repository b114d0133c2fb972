//! How the agent reports a drain: Prometheus metrics, the Node's `ShutdownGuard` condition and
//! last-shutdown record, Events on the Node and on the VMIs it stops, and its `/status` view —
//! all from the step the driver hands over, never by asking the machine again.

use std::time::{Duration, UNIX_EPOCH};

use chrono::{DateTime, Utc};

use crate::admin::AdminState;
use crate::drain::machine::{DrainEnd, EndReason, Note, PhaseLabel, ReleaseReason, Snapshot};
use crate::drain::model::Schedule;
use crate::drain::progress::{VmiState, round_ms};
use crate::drain::report::{
    AgentPhase, DrainStatus, LastShutdown, ScheduledStatus, ShutdownOutcome,
};
use crate::driver::{Reporter, Step, keys};
use crate::kube::condition::{GuardState, rfc3339};
use crate::kube::events::{Report, Reports};

pub struct AgentReporter {
    node: String,
    admin: AdminState,
    reports: Reports,
    /// Wall-clock start of the current drain, for its record.
    started_wall: Option<DateTime<Utc>>,
}

pub fn ready_message(delay_max: Duration) -> String {
    format!(
        "holding a logind delay lock; a shutdown will be held up to {}s while the node's VMs move away",
        delay_max.as_secs()
    )
}

impl AgentReporter {
    pub fn new(node: &str, admin: AdminState, reports: Reports) -> Self {
        AgentReporter {
            node: node.to_string(),
            admin,
            reports,
            started_wall: None,
        }
    }

    fn record(&self, end: &DrainEnd, outcome: ShutdownOutcome) -> LastShutdown {
        LastShutdown {
            r#type: end.kind.clone(),
            started: rfc3339(self.started_wall.unwrap_or_else(Utc::now)),
            finished: Some(rfc3339(Utc::now())),
            outcome,
            migrated: end.migrated,
            stopped: end.stopped,
            remaining: end.remaining.clone(),
            duration_s: Some(round_ms(end.elapsed)),
        }
    }

    fn ended(&mut self, end: &DrainEnd, snapshot: &Snapshot) {
        let m = &self.admin.metrics;
        m.draining.set(0);
        let reason = match end.reason {
            EndReason::Cancelled => {
                let last = self.record(end, ShutdownOutcome::Cancelled);
                m.last_drain(&last);
                self.reports.send(Report::LastShutdown(last));
                if snapshot.lock_held {
                    self.reports.condition(
                        GuardState::Ready,
                        "shutdown cancelled; holding the lock again",
                    );
                }
                return;
            }
            EndReason::Released(r) => r,
        };
        self.reports.node_event(
            false,
            "ShutdownLockReleased",
            "Release",
            format!("shutdown lock released ({})", reason.as_str()),
        );
        let secs = end.elapsed.as_secs_f64();
        m.drained(reason.as_str(), secs);
        let (migrated, stopped) = (end.migrated, end.stopped);
        let (state, message, outcome) = match reason {
            ReleaseReason::Empty => (
                GuardState::Drained,
                format!(
                    "node empty after {secs:.1}s ({migrated} migrated, {stopped} stopped); shutdown lock released"
                ),
                ShutdownOutcome::Empty,
            ),
            ReleaseReason::Deadline => {
                m.deadline_reached.inc();
                (
                    GuardState::DeadlineReached,
                    format!(
                        "deadline reached after {secs:.1}s ({migrated} migrated, {stopped} stopped, {} left); shutdown lock released",
                        end.remaining.len()
                    ),
                    ShutdownOutcome::Deadline,
                )
            }
        };
        self.reports.condition(state, message);
        let last = self.record(end, outcome);
        m.last_drain(&last);
        self.admin.update(|s| s.last_shutdown = Some(last.clone()));
        self.reports.send(Report::LastShutdown(last));
    }

    fn scheduled(&self, now: Option<&Schedule>, was: Option<&Schedule>) {
        let at = |s: &Schedule| rfc3339(DateTime::<Utc>::from(s.at));
        let due = now.map_or(0.0, |s| {
            s.at.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
        });
        self.admin.metrics.scheduled_shutdown.set(due);
        match (now, was) {
            (Some(s), _) => self.reports.node_event(
                false,
                "ShutdownScheduled",
                "Schedule",
                format!("logind has a {} scheduled for {}", s.kind, at(s)),
            ),
            (None, Some(w)) => self.reports.node_event(
                false,
                "ScheduledShutdownGone",
                "Schedule",
                format!(
                    "the {} scheduled for {} is no longer scheduled (cancelled, or begun)",
                    w.kind,
                    at(w)
                ),
            ),
            (None, None) => {}
        }
    }
}

impl Reporter for AgentReporter {
    fn report(&mut self, step: &Step<'_>) {
        let snap = step.snapshot;
        let idle = snap.phase == PhaseLabel::Idle;
        self.admin.metrics.lock_held.set(snap.lock_held as i64);
        self.admin
            .metrics
            .pre_draining
            .set(snap.pre_draining as i64);
        self.admin.metrics.power_event.set(snap.power_event as i64);
        for note in step.notes {
            let m = &self.admin.metrics;
            match note {
                Note::LockTaken { delay_max, again } => {
                    m.inhibit_delay_max.set(delay_max.as_secs_f64());
                    if *again {
                        m.logind_reconnects.inc();
                    }
                    if idle {
                        self.reports
                            .condition(GuardState::Ready, ready_message(*delay_max));
                    }
                }
                Note::LockLost if idle => self.reports.condition(
                    GuardState::LockLost,
                    "logind or the system bus went away; taking the lock again",
                ),
                Note::DelayMax(d) => {
                    m.inhibit_delay_max.set(d.as_secs_f64());
                }
                Note::DrainStarted { kind, budget, vmis } => {
                    m.shutdown(Some(kind));
                    m.draining.set(1);
                    let started = Utc::now();
                    self.started_wall = Some(started);
                    self.reports.condition(
                        GuardState::Draining,
                        format!(
                            "{kind} under way: moving {} VMI(s) off the node, deadline in {}s",
                            vmis.len(),
                            budget.as_secs()
                        ),
                    );
                    self.reports.node_event(
                        false,
                        "DrainStarted",
                        "Drain",
                        format!(
                            "{kind}: cordoning and draining the node; VMIs: {}",
                            if vmis.is_empty() {
                                "none".to_string()
                            } else {
                                keys(vmis)
                            }
                        ),
                    );
                    self.reports.send(Report::LastShutdown(LastShutdown {
                        r#type: kind.clone(),
                        started: rfc3339(started),
                        finished: None,
                        outcome: ShutdownOutcome::Draining,
                        migrated: 0,
                        stopped: 0,
                        remaining: vmis.iter().map(ToString::to_string).collect(),
                        duration_s: None,
                    }));
                }
                Note::Evicted { outcome, .. } => m.eviction(outcome.label()),
                Note::Vmi { state, .. } => {
                    match state {
                        VmiState::Migrated { .. } => m.vmis_migrated.inc(),
                        VmiState::Stopped => m.vmis_stopped.inc(),
                        _ => 0,
                    };
                }
                Note::Stopped(stop) => {
                    let node = &self.node;
                    let (grace, why) = (stop.grace_seconds, stop.why.as_str());
                    self.reports.send(Report::VmiEvent {
                        vmi: stop.vmi.clone(),
                        uid: stop.vmi_uid.clone(),
                        warning: true,
                        reason: "VMIStoppedForShutdown",
                        action: "Stop",
                        note: format!(
                            "stopped gracefully ({grace}s) because node {node} is shutting down: {why}"
                        ),
                    });
                    self.reports.node_event(
                        true,
                        "VMIStoppedForShutdown",
                        "Stop",
                        format!(
                            "stopping VMI {} gracefully ({grace}s) before the shutdown: {why}",
                            stop.vmi
                        ),
                    );
                }
                Note::Warning { reason, note } => {
                    self.reports.node_event(true, reason, "Drain", note.clone())
                }
                Note::Ended(end) => self.ended(end, snap),
                Note::Scheduled { now, was } => self.scheduled(now.as_ref(), was.as_ref()),
                Note::PowerEvent { targets, down } => {
                    let why = format!(
                        "too few nodes stay up to migrate to ({} left; going down: {})",
                        targets.len(),
                        if down.is_empty() {
                            "none announced".into()
                        } else {
                            down.join(", ")
                        }
                    );
                    self.reports.condition(
                        GuardState::Draining,
                        format!("power event: stopping the node's VMs in place, to start them again when the cluster is back; {why}"),
                    );
                    self.reports.node_event(
                        true,
                        "PowerEvent",
                        "Drain",
                        format!("{why}: the node's VMs are stopped through KubeVirt where they run, recorded on their VMs, and started again once the cluster is back"),
                    );
                }
                Note::PreDrained { kind, ahead } => {
                    let ahead = ahead.as_secs();
                    self.reports.condition(
                        GuardState::Draining,
                        format!("node empty {ahead}s ahead of the scheduled {kind}; holding the lock until it starts"),
                    );
                    self.reports.node_event(
                        false,
                        "PreDrainComplete",
                        "Drain",
                        format!("node empty {ahead}s ahead of the scheduled {kind}; it will find nothing left to drain"),
                    );
                }
                _ => {}
            }
        }
        if let Some(d) = &snap.drain {
            self.admin
                .metrics
                .vmis_remaining
                .set(d.vmis_remaining as i64);
        }
        let drain = snap.drain.as_ref().map(|d| DrainStatus {
            r#type: d.kind.clone(),
            elapsed_s: round_ms(d.elapsed),
            deadline_s: d.budget.as_secs_f64(),
            vmis: d.vmis.clone(),
            pods_remaining: d.pods_remaining.clone(),
        });
        let phase = match snap.phase {
            PhaseLabel::Idle => AgentPhase::Idle,
            PhaseLabel::Draining => AgentPhase::Draining,
            PhaseLabel::Released => AgentPhase::Released,
        };
        let delay = self.admin.metrics.inhibit_delay_max.get();
        let scheduled = snap.scheduled.as_ref().map(|sch| ScheduledStatus {
            r#type: sch.kind.clone(),
            at: rfc3339(DateTime::<Utc>::from(sch.at)),
        });
        self.admin.update(|s| {
            s.lock_held = snap.lock_held;
            s.phase = phase;
            s.scheduled_shutdown = scheduled;
            s.power_event = snap.power_event;
            s.inhibit_delay_max_s = Some(delay);
            if drain.is_some() {
                s.drain = drain;
            }
        });
    }
}
