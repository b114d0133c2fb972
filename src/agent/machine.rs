//! The agent as a pure state machine: `Idle → Draining → Released` (and back to `Idle` when a
//! shutdown is cancelled). Inputs are what happened (a logind signal, a watch update, an API
//! answer, the clock); outputs are effects the runtime carries out. No I/O here, so every
//! decision is unit-tested with plain values and explicit instants.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::config::Scope;
use crate::drain::eviction::{EvictionOutcome, backoff};
use crate::drain::model::{ObjKey, PodInfo, PodRef, VmiInfo};
use crate::drain::plan::{self, Plan};

/// logind's own default `InhibitDelayMaxSec`, used when the property could not be read.
pub const LOGIND_DEFAULT_DELAY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub node: String,
    pub scope: Scope,
    pub safety_margin: Duration,
    /// Replaces `InhibitDelayMaxUSec − safety_margin` when set.
    pub deadline_override: Option<Duration>,
}

/// One step of a `kube::runtime::watcher` stream, with the object already reduced.
#[derive(Debug, Clone)]
pub enum WatchUpdate<T> {
    /// A (re-)list starts; the objects that follow replace the current set at `Synced`.
    Reset,
    Listed(T),
    Synced,
    Applied(T),
    Deleted(T),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CordonResult {
    /// We set `spec.unschedulable` and recorded it in our annotation.
    CordonedByUs,
    /// It was unschedulable already (an administrator's cordon, or ours from this boot).
    AlreadyUnschedulable,
    Failed(String),
}

#[derive(Debug, Clone)]
pub enum Input {
    LockTaken {
        delay_max: Duration,
    },
    LockLost,
    /// logind's `InhibitDelayMaxUSec` read again (after a reload of its configuration).
    DelayMax(Duration),
    /// `PrepareForShutdown(start)`, or its `WithMetadata` form carrying the shutdown type.
    Shutdown {
        start: bool,
        kind: Option<String>,
    },
    /// At start the node carried our annotation with this boot's ID: we cordoned it earlier in
    /// this boot (the agent was restarted), so a cancel must undo it.
    CordonedThisBoot,
    Vmis(WatchUpdate<VmiInfo>),
    Pods(WatchUpdate<PodInfo>),
    Cordoned(CordonResult),
    Uncordoned(Result<(), String>),
    Evicted {
        pod: PodRef,
        outcome: EvictionOutcome,
    },
    Stopped {
        vmi_uid: String,
        result: Result<(), String>,
    },
    /// The clock reached [`Machine::next_wakeup`] (or any later instant).
    Tick,
    Terminate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReason {
    /// No VMI (and in scope `all` no evictable pod) is left on the node.
    Empty,
    Deadline,
}

impl ReleaseReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            ReleaseReason::Empty => "empty",
            ReleaseReason::Deadline => "deadline",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Cordon,
    Uncordon,
    Evict(PodRef),
    /// Stop a VMI gracefully by deleting its launcher pod with `grace_seconds`.
    Stop {
        vmi: ObjKey,
        vmi_uid: String,
        pod: PodRef,
        grace_seconds: u32,
        why: StopReason,
    },
    ReleaseLock {
        reason: ReleaseReason,
        remaining: Vec<ObjKey>,
    },
    TakeLock,
    /// A Warning Event on the Node.
    Warn {
        reason: &'static str,
        note: String,
    },
    Exit {
        draining: bool,
        remaining: Vec<ObjKey>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// KubeVirt refuses to migrate it: waiting gains nothing.
    NotMigratable,
    /// Its graceful stop would no longer fit before the deadline otherwise.
    StopBy,
}

impl StopReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            StopReason::NotMigratable => "not_migratable",
            StopReason::StopBy => "stop_by",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Attempt {
    InFlight,
    RetryAt(Instant),
    /// Nothing more to send; the watches tell how it ends.
    Settled(&'static str),
}

#[derive(Debug, Clone)]
struct Track {
    attempt: Attempt,
    failures: u32,
}

impl Track {
    fn in_flight() -> Self {
        Track {
            attempt: Attempt::InFlight,
            failures: 0,
        }
    }
    fn due(&self, now: Instant) -> bool {
        matches!(self.attempt, Attempt::RetryAt(t) if t <= now)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CordonState {
    Pending,
    Settled,
}

#[derive(Debug, Clone)]
pub struct Drain {
    pub started: Instant,
    pub deadline: Instant,
    pub kind: Option<String>,
    cordon: CordonState,
    /// Non-VM pods are evicted once no VMI is left, or from this instant on at the latest.
    others_from: Instant,
    evictions: HashMap<String, Track>,
    /// By VMI UID.
    stops: HashMap<String, Track>,
    /// VMIs KubeVirt refused to migrate (by UID).
    not_migratable: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum Phase {
    Idle,
    Draining(Box<Drain>),
    Released {
        reason: ReleaseReason,
        started: Instant,
        at: Instant,
    },
}

/// Objects from one watch, replaced wholesale when the watch re-lists.
#[derive(Debug, Clone)]
struct Inventory<T> {
    live: HashMap<String, T>,
    relisting: Option<HashMap<String, T>>,
    synced: bool,
}

impl<T> Default for Inventory<T> {
    fn default() -> Self {
        Inventory {
            live: HashMap::new(),
            relisting: None,
            synced: false,
        }
    }
}

impl<T> Inventory<T> {
    fn apply(&mut self, u: WatchUpdate<T>, uid: impl Fn(&T) -> String) {
        match u {
            WatchUpdate::Reset => self.relisting = Some(HashMap::new()),
            WatchUpdate::Listed(o) => {
                let k = uid(&o);
                self.relisting.get_or_insert_with(HashMap::new).insert(k, o);
            }
            WatchUpdate::Synced => {
                if let Some(fresh) = self.relisting.take() {
                    self.live = fresh;
                }
                self.synced = true;
            }
            WatchUpdate::Applied(o) => {
                self.live.insert(uid(&o), o);
            }
            WatchUpdate::Deleted(o) => {
                self.live.remove(&uid(&o));
            }
        }
    }
}

#[derive(Debug)]
pub struct Machine {
    cfg: MachineConfig,
    phase: Phase,
    lock_held: bool,
    delay_max: Option<Duration>,
    cordoned_by_us: bool,
    vmis: Inventory<VmiInfo>,
    pods: Inventory<PodInfo>,
}

impl Machine {
    pub fn new(cfg: MachineConfig) -> Self {
        Machine {
            cfg,
            phase: Phase::Idle,
            lock_held: false,
            delay_max: None,
            cordoned_by_us: false,
            vmis: Inventory::default(),
            pods: Inventory::default(),
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn lock_held(&self) -> bool {
        self.lock_held
    }

    pub fn cordoned_by_us(&self) -> bool {
        self.cordoned_by_us
    }

    /// How long a drain may take: the override, else logind's maximum delay minus the margin.
    /// A margin that would eat the whole delay is ignored in favour of half the delay, so a
    /// short delay still gets a drain attempt rather than none.
    pub fn budget(&self) -> Duration {
        drain_budget(
            self.delay_max,
            self.cfg.safety_margin,
            self.cfg.deadline_override,
        )
    }

    /// VMIs still running on the node, sorted.
    pub fn remaining_vmis(&self) -> Vec<ObjKey> {
        let mut v: Vec<ObjKey> = self
            .vmis
            .live
            .values()
            .filter(|v| v.runs_on(&self.cfg.node))
            .map(|v| v.key.clone())
            .collect();
        v.sort();
        v
    }

    pub fn vmi(&self, uid: &str) -> Option<&VmiInfo> {
        self.vmis.live.get(uid)
    }

    pub fn pod(&self, uid: &str) -> Option<&PodInfo> {
        self.pods.live.get(uid)
    }

    fn plan(&self) -> Plan {
        plan::plan(
            &self.cfg.node,
            self.cfg.scope,
            self.pods.live.values(),
            &self.vmis.live,
        )
    }

    /// When the runtime must feed [`Input::Tick`] next, if at all.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let Phase::Draining(d) = &self.phase else {
            return None;
        };
        let mut next = d.deadline;
        let mut consider = |t: Instant| next = next.min(t);
        if d.cordon == CordonState::Settled {
            for t in d.evictions.values().chain(d.stops.values()) {
                if let Attempt::RetryAt(at) = t.attempt {
                    consider(at);
                }
            }
            if self.cfg.scope == Scope::All {
                consider(d.others_from);
            }
            for v in self.vmis.live.values() {
                if v.runs_on(&self.cfg.node) && !d.stops.contains_key(&v.uid) {
                    consider(self.stop_by(d, v));
                }
            }
        }
        Some(next)
    }

    /// The last instant at which `vmi` can be stopped with its launcher pod's full grace period
    /// (but not before half the budget has gone, so migrations always get that long).
    fn stop_by(&self, d: &Drain, vmi: &VmiInfo) -> Instant {
        let grace = self
            .launcher_of(&vmi.uid)
            .map(|p| Duration::from_secs(p.grace_seconds as u64))
            .unwrap_or(Duration::from_secs(
                crate::drain::model::DEFAULT_GRACE_SECONDS as u64,
            ));
        let half = d.started + (d.deadline - d.started) / 2;
        d.deadline.checked_sub(grace).unwrap_or(d.started).max(half)
    }

    fn launcher_of(&self, vmi_uid: &str) -> Option<&PodInfo> {
        let mut pods: Vec<&PodInfo> = self
            .pods
            .live
            .values()
            .filter(|p| {
                p.is_launcher
                    && !p.is_finished()
                    && p.node_name.as_deref() == Some(self.cfg.node.as_str())
                    && p.created_by.as_deref() == Some(vmi_uid)
            })
            .collect();
        pods.sort_by(|a, b| a.key.cmp(&b.key));
        pods.into_iter().next()
    }

    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        let mut fx = Vec::new();
        match input {
            Input::LockTaken { delay_max } => {
                self.lock_held = true;
                self.delay_max = Some(delay_max);
            }
            Input::LockLost => self.lock_held = false,
            Input::DelayMax(d) => self.delay_max = Some(d),
            Input::CordonedThisBoot => self.cordoned_by_us = true,
            Input::Shutdown { start: true, kind } => match &mut self.phase {
                Phase::Idle => {
                    let budget = self.budget();
                    self.phase = Phase::Draining(Box::new(Drain {
                        started: now,
                        deadline: now + budget,
                        kind,
                        cordon: CordonState::Pending,
                        others_from: now + budget / 2,
                        evictions: HashMap::new(),
                        stops: HashMap::new(),
                        not_migratable: Vec::new(),
                    }));
                    fx.push(Effect::Cordon);
                }
                Phase::Draining(d) => {
                    if d.kind.is_none() {
                        d.kind = kind;
                    }
                }
                Phase::Released { .. } => {}
            },
            Input::Shutdown { start: false, .. } => {
                if !matches!(self.phase, Phase::Idle) {
                    self.phase = Phase::Idle;
                    if self.cordoned_by_us {
                        fx.push(Effect::Uncordon);
                    }
                }
                if !self.lock_held {
                    fx.push(Effect::TakeLock);
                }
            }
            Input::Vmis(u) => self.vmis.apply(u, |v| v.uid.clone()),
            Input::Pods(u) => self.pods.apply(u, |p| p.uid.clone()),
            Input::Cordoned(r) => {
                if r == CordonResult::CordonedByUs {
                    self.cordoned_by_us = true;
                }
                match &mut self.phase {
                    Phase::Draining(d) => d.cordon = CordonState::Settled,
                    // Cancelled while the cordon was on its way: undo it.
                    Phase::Idle if r == CordonResult::CordonedByUs => fx.push(Effect::Uncordon),
                    _ => {}
                }
            }
            Input::Uncordoned(r) => {
                if r.is_ok() {
                    self.cordoned_by_us = false;
                }
            }
            Input::Evicted { pod, outcome } => {
                if let Phase::Draining(d) = &mut self.phase {
                    let vmi_uid = self
                        .pods
                        .live
                        .get(&pod.uid)
                        .and_then(|p| p.created_by.clone());
                    let t = d
                        .evictions
                        .entry(pod.uid.clone())
                        .or_insert_with(Track::in_flight);
                    match outcome {
                        EvictionOutcome::Retry(_) => {
                            t.failures += 1;
                            t.attempt = Attempt::RetryAt(now + backoff(t.failures));
                        }
                        EvictionOutcome::NotMigratable => {
                            t.attempt = Attempt::Settled(outcome.label());
                            if let Some(uid) = vmi_uid
                                && !d.not_migratable.contains(&uid)
                            {
                                d.not_migratable.push(uid);
                            }
                        }
                        other => t.attempt = Attempt::Settled(other.label()),
                    }
                }
            }
            Input::Stopped { vmi_uid, result } => {
                if let Phase::Draining(d) = &mut self.phase
                    && let Some(t) = d.stops.get_mut(&vmi_uid)
                {
                    match result {
                        Ok(()) => t.attempt = Attempt::Settled("deleted"),
                        Err(_) => {
                            t.failures += 1;
                            t.attempt = Attempt::RetryAt(now + backoff(t.failures));
                        }
                    }
                }
            }
            Input::Tick => {}
            Input::Terminate => {
                let draining = matches!(self.phase, Phase::Draining(_));
                fx.push(Effect::Exit {
                    draining,
                    remaining: if draining {
                        self.remaining_vmis()
                    } else {
                        Vec::new()
                    },
                });
                return fx;
            }
        }
        self.pump(now, &mut fx);
        fx
    }

    /// Moves a drain on: sends due evictions and stops, and releases the lock when the node is
    /// empty or the deadline has come.
    fn pump(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let Phase::Draining(d) = &self.phase else {
            return;
        };
        let plan = self.plan();
        if d.cordon == CordonState::Pending {
            if now >= d.deadline {
                self.release(now, ReleaseReason::Deadline, fx);
                return;
            }
            // Launcher pods go at once, with the cordon in flight: nothing puts a VM back on
            // this node within that round trip (a migration target never lands on its source,
            // a restarted VMI comes only after the old one has shut down), and every
            // millisecond here is taken from the migrations. Other pods wait for the cordon, or
            // their controllers could recreate them right here; stops and the release wait
            // too, so the node is never left without our cordon.
            let Phase::Draining(d) = &mut self.phase else {
                return;
            };
            for r in &plan.vm_pods {
                if !d.evictions.contains_key(&r.uid) {
                    d.evictions.insert(r.uid.clone(), Track::in_flight());
                    fx.push(Effect::Evict(r.clone()));
                }
            }
            return;
        }
        let vmis_left: Vec<&VmiInfo> = self
            .vmis
            .live
            .values()
            .filter(|v| v.runs_on(&self.cfg.node))
            .collect();
        let empty = self.vmis.synced
            && vmis_left.is_empty()
            && (self.cfg.scope == Scope::Vms
                || (self.pods.synced && plan.other_remaining.is_empty()));
        if empty {
            self.release(now, ReleaseReason::Empty, fx);
            return;
        }
        if now >= d.deadline {
            self.release(now, ReleaseReason::Deadline, fx);
            return;
        }

        let stop_plan: Vec<(VmiInfo, Instant)> = vmis_left
            .iter()
            .map(|v| ((*v).clone(), self.stop_by(d, v)))
            .collect();
        let launchers: HashMap<String, PodInfo> = stop_plan
            .iter()
            .filter_map(|(v, _)| Some((v.uid.clone(), self.launcher_of(&v.uid)?.clone())))
            .collect();
        let others_due = vmis_left.is_empty() || now >= d.others_from;

        let Phase::Draining(d) = &mut self.phase else {
            return;
        };
        let mut send = |r: &PodRef, fx: &mut Vec<Effect>| {
            let due = match d.evictions.get(&r.uid) {
                None => true,
                Some(t) => t.due(now),
            };
            if due {
                let t = d
                    .evictions
                    .entry(r.uid.clone())
                    .or_insert_with(Track::in_flight);
                t.attempt = Attempt::InFlight;
                fx.push(Effect::Evict(r.clone()));
            }
        };
        for r in &plan.vm_pods {
            send(r, fx);
        }
        if others_due {
            for r in &plan.other_pods {
                send(r, fx);
            }
        }

        let remaining = d.deadline.saturating_duration_since(now);
        for (v, stop_by) in stop_plan {
            let why = if d.not_migratable.contains(&v.uid) {
                StopReason::NotMigratable
            } else if now >= stop_by {
                StopReason::StopBy
            } else {
                continue;
            };
            let due = match d.stops.get(&v.uid) {
                None => true,
                Some(t) => t.due(now),
            };
            let Some(pod) = launchers.get(&v.uid) else {
                continue;
            };
            if due {
                let grace = (pod.grace_seconds as u64).min(remaining.as_secs()).max(1) as u32;
                let t = d
                    .stops
                    .entry(v.uid.clone())
                    .or_insert_with(Track::in_flight);
                t.attempt = Attempt::InFlight;
                fx.push(Effect::Stop {
                    vmi: v.key.clone(),
                    vmi_uid: v.uid.clone(),
                    pod: pod.pod_ref(),
                    grace_seconds: grace,
                    why,
                });
            }
        }
    }

    fn release(&mut self, now: Instant, reason: ReleaseReason, fx: &mut Vec<Effect>) {
        let remaining = self.remaining_vmis();
        // The release goes first: the Event is sent at leisure, the fd must close at once.
        fx.push(Effect::ReleaseLock {
            reason,
            remaining: remaining.clone(),
        });
        if reason == ReleaseReason::Deadline {
            let mut names: Vec<String> = remaining.iter().map(ToString::to_string).collect();
            if self.cfg.scope == Scope::All {
                let plan = self.plan();
                names.extend(
                    plan.other_remaining
                        .iter()
                        .map(|p| format!("pod {}", p.key)),
                );
            }
            fx.push(Effect::Warn {
                reason: "ShutdownDeadlineReached",
                note: if names.is_empty() {
                    "drain deadline reached; releasing the shutdown lock".to_string()
                } else {
                    format!(
                        "drain deadline reached; releasing the shutdown lock with still on the node: {}",
                        name_list(&names, NOTE_NAMES)
                    )
                },
            });
        }
        self.lock_held = false;
        let started = match &self.phase {
            Phase::Draining(d) => d.started,
            _ => now,
        };
        self.phase = Phase::Released {
            reason,
            started,
            at: now,
        };
    }

    /// Every VMI the VMI watch knows (on the node or just moved off it).
    pub fn vmis(&self) -> impl Iterator<Item = &VmiInfo> {
        self.vmis.live.values()
    }

    /// The running launcher pod of a VMI on this node.
    pub fn launcher(&self, vmi_uid: &str) -> Option<&PodInfo> {
        self.launcher_of(vmi_uid)
    }

    /// Whether a graceful stop was sent for this VMI in the current drain.
    pub fn stop_sent(&self, vmi_uid: &str) -> bool {
        matches!(&self.phase, Phase::Draining(d) if d.stops.contains_key(vmi_uid))
    }

    /// Pods the current plan still has to evict or see gone (scope `all`), by key.
    pub fn other_pods_remaining(&self) -> Vec<ObjKey> {
        self.plan()
            .other_remaining
            .into_iter()
            .map(|p| p.key)
            .collect()
    }

    /// Per-pod eviction progress for logs and status: pod UID → state label.
    pub fn eviction_states(&self) -> BTreeMap<String, &'static str> {
        let mut out = BTreeMap::new();
        if let Phase::Draining(d) = &self.phase {
            for (uid, t) in &d.evictions {
                out.insert(
                    uid.clone(),
                    match t.attempt {
                        Attempt::InFlight => "in_flight",
                        Attempt::RetryAt(_) => "retrying",
                        Attempt::Settled(s) => s,
                    },
                );
            }
        }
        out
    }
}

/// Names an Event note lists before summarising the rest (notes are capped at 1 kB).
const NOTE_NAMES: usize = 12;

fn name_list(names: &[String], max: usize) -> String {
    if names.len() <= max {
        return names.join(", ");
    }
    format!("{} and {} more", names[..max].join(", "), names.len() - max)
}

pub fn drain_budget(
    delay_max: Option<Duration>,
    margin: Duration,
    deadline_override: Option<Duration>,
) -> Duration {
    if let Some(d) = deadline_override {
        return d;
    }
    let delay = delay_max.unwrap_or(LOGIND_DEFAULT_DELAY);
    match delay.checked_sub(margin) {
        Some(b) if !b.is_zero() => b,
        _ => delay / 2,
    }
}
