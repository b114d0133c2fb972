//! A drain as a pure state machine: `Idle → Draining → Released` (and back to `Idle` when a
//! shutdown is cancelled). Inputs are what happened (a logind signal or the drain command, a
//! watch update, an API answer, the clock); outputs are [`Effect`]s for the driver to carry out
//! and [`Note`]s saying what changed, for whoever reports progress. No I/O and no clock of its
//! own: every decision is unit-tested with plain values and explicit instants.
//!
//! The one driver that runs it is [`crate::driver`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::eviction::{EvictionOutcome, EvictionState, backoff};
use super::model::{
    DEFAULT_GRACE_SECONDS, MigrationJob, ObjKey, PodInfo, PodRef, Schedule, Scope, VmiInfo,
};
use super::plan::{self, Plan};
use super::power::Verdict;
use super::progress::{Progress, VmiProgress, VmiState};

/// logind's own default `InhibitDelayMaxSec`, used when the property could not be read.
pub const LOGIND_DEFAULT_DELAY: Duration = Duration::from_secs(5);

/// How long a cordon that has not landed (on its way, or failing) holds back everything but the
/// launcher pods' evictions. Past it the drain goes on without the cordon: a node that cannot be
/// cordoned still has to be emptied before logind's cut.
pub const CORDON_GRACE: Duration = Duration::from_secs(2);

/// How long after KubeVirt answered an eviction with an evacuation the next VMI that may
/// migrate is evicted. KubeVirt's evacuation controller creates a node's migrations only when a
/// VMI update wakes it (or 5 s after it found no room), and counts only migrations already
/// running against its limits: evictions spread out wake it once each, and each wake creates
/// migrations that wait in KubeVirt's own queue for a slot; a burst wakes it once, and then the
/// node gets two migrations per 5 s. About kubectl's pace (client-go's 5 requests/s).
pub const EVACUATION_SPACING: Duration = Duration::from_millis(200);

/// A paced first eviction unanswered this long no longer holds the next one back: one slow
/// answer must not stall the node's evacuation.
pub const PACED_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// A scheduled shutdown that disappears this close to its time has fired rather than been
/// cancelled: `PrepareForShutdown` is on its way (systemd 252 and elogind clear the property
/// when it fires, and a poll may see that before the signal arrives).
pub const FIRING_SLACK: Duration = Duration::from_secs(2);

/// Past the power-event settle, how long a drain waits for the first verdict before it drains
/// as any other (the API server may not answer the nodes' list).
pub const VERDICT_WAIT: Duration = Duration::from_secs(3);

/// What a drain is run with; the same for the agent and the `drain` command.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub node: String,
    pub scope: Scope,
    pub safety_margin: Duration,
    /// Replaces `InhibitDelayMaxUSec − safety_margin` when set.
    pub deadline_override: Option<Duration>,
    /// How long before a scheduled shutdown the node is drained (a pre-drain); `None`: only at
    /// `PrepareForShutdown`.
    pub pre_drain_lead: Option<Duration>,
    /// A pre-drain waits for a cluster-wide turn ([`Effect::WantTurn`]).
    pub take_turns: bool,
    /// Whether a shutdown may be part of a power event: the drain announces itself and is
    /// told [`Input::Power`] verdicts. `Some(settle)`: VMs are neither evicted nor stopped for
    /// `settle` after the shutdown starts, for the other nodes to announce theirs (zero: they
    /// are evicted at once, and a later verdict still stops the rest in place).
    pub power_settle: Option<Duration>,
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

/// Something that happened, fed to [`Machine::handle`].
#[derive(Debug, Clone)]
pub enum Input {
    /// logind holds shutdowns for us; `delay_max` is its `InhibitDelayMaxUSec`.
    LockTaken {
        delay_max: Duration,
    },
    /// logind or the bus went away with our lock.
    LockLost,
    /// logind refuses a lock because a shutdown is already being delayed: the drain goes on
    /// without one, inside logind's own cut.
    LockRefused {
        delay_max: Duration,
    },
    /// logind's `InhibitDelayMaxUSec` read again (after a reload of its configuration).
    DelayMax(Duration),
    /// `PrepareForShutdown(start)`, or its `WithMetadata` form carrying the shutdown type; the
    /// `drain` command sends `start: true` with kind `on-demand`. `start: false` cancels.
    Shutdown {
        start: bool,
        kind: Option<String>,
    },
    /// A drain that began `elapsed` ago, taken up again by a restarted worker (same deadline).
    Resume {
        kind: Option<String>,
        elapsed: Duration,
    },
    /// At start the node carried our annotation with this boot's ID: we cordoned it earlier in
    /// this boot (the agent was restarted), so a cancel must undo it.
    CordonedThisBoot,
    Vmis(WatchUpdate<VmiInfo>),
    Pods(WatchUpdate<PodInfo>),
    /// The answers to [`Effect::Cordon`], [`Effect::Uncordon`], [`Effect::Evict`] and
    /// [`Effect::Stop`].
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
    /// The answer to [`Effect::CancelMigration`].
    MigrationCancelled {
        pod_uid: String,
        result: Result<(), String>,
    },
    /// The clock reached [`Machine::next_wakeup`] (or any later instant).
    Tick,
    /// SIGTERM or SIGINT.
    Terminate,
    /// A turn to pre-drain was given (`true`), or the one held was lost (`false`).
    Turn(bool),
    /// The shutdown logind has scheduled, or none (the holder tells every change); `due_in`:
    /// how far ahead its time was when it was read (the machine keeps no wall clock).
    Schedule {
        schedule: Option<Schedule>,
        due_in: Duration,
    },
    /// Whether this shutdown is part of a power event, judged from the other nodes (answers
    /// [`Effect::Announce`], again whenever it changes while the drain lasts).
    Power(Verdict),
}

/// Why the drain let the shutdown go on.
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

/// What the machine asks the driver to do. The driver carries out [`Effect::ReleaseLock`] before
/// anything else of the same step, and sends every answer back as an [`Input`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Make the node unschedulable, marked as ours.
    Cordon,
    /// Lift our cordon (a cancelled shutdown).
    Uncordon,
    /// `POST pods/<name>/eviction`, once; the machine decides about retries.
    Evict(PodRef),
    /// Stop a VMI gracefully with `grace_seconds`: by deleting its launcher pod, or in a power
    /// event ([`StopReason::PowerEvent`]) through its VM's `stop`, recorded on the VM, so that
    /// KubeVirt starts it nowhere else.
    Stop {
        vmi: ObjKey,
        vmi_uid: String,
        pod: PodRef,
        grace_seconds: u32,
        why: StopReason,
    },
    /// The drain is over: let the shutdown go on now (close the lock's fd). The `drain` command
    /// ends here.
    ReleaseLock {
        reason: ReleaseReason,
        remaining: Vec<ObjKey>,
    },
    /// Abort a migration into this node by deleting its VirtualMachineInstanceMigration, so the
    /// VM stays on its source; `pod` is its target pod here.
    CancelMigration { pod: PodRef, job: MigrationJob },
    /// Ask KubeVirt to stop evacuating a VMI this drain had it evacuate (a cancelled shutdown;
    /// `evacuate/cancel`, KubeVirt ≥ 1.7).
    CancelEvacuation { vmi: ObjKey },
    /// Ask logind for a new lock (after a cancelled shutdown).
    TakeLock,
    /// Tell the other nodes that this one is shutting down (for `fresh_for`), and judge from
    /// theirs whether this is a power event: [`Input::Power`] now and on every change.
    Announce { fresh_for: Duration },
    /// Take the announcement back and stop judging (a cancelled shutdown).
    Withdraw,
    /// Wait for a cluster-wide turn to pre-drain; the answer is [`Input::Turn`].
    WantTurn,
    /// Give the turn back (or stop waiting for one): this node's pre-drain is over.
    ReleaseTurn,
    /// Something an operator must hear about (a Warning Event on the Node for the agent).
    Warn { reason: &'static str, note: String },
    /// Stop running; `draining` when a drain is cut short.
    Exit {
        draining: bool,
        remaining: Vec<ObjKey>,
    },
}

/// What changed in one step, said once by the machine so reporters (logs, metrics, Events, the
/// Node's condition, a terminal) never have to ask it again.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    /// A lock was taken; `again` after logind or the bus had gone away with the last one.
    LockTaken {
        delay_max: Duration,
        again: bool,
    },
    LockLost,
    DelayMax(Duration),
    DrainStarted {
        kind: String,
        budget: Duration,
        vmis: Vec<ObjKey>,
    },
    /// The API server answered an eviction.
    Evicted {
        pod: PodRef,
        vmi: Option<String>,
        outcome: EvictionOutcome,
    },
    /// The API server accepted a graceful stop.
    Stopped(StopDone),
    StopFailed {
        vmi: ObjKey,
        error: String,
    },
    /// A migration into this node was found; the drain cancels it.
    Inbound {
        pod: PodRef,
        job: MigrationJob,
    },
    MigrationCancelled {
        pod: PodRef,
        result: Result<(), String>,
    },
    /// KubeVirt said "not live-migratable" while the VMI has not reported whether it is (it is
    /// still booting): asked again, not stopped.
    NotMigratableYet {
        pod: PodRef,
    },
    /// KubeVirt marked a VMI of this node for evacuation.
    EvacuationRequested {
        vmi: ObjKey,
    },
    Migrating {
        vmi: ObjKey,
        target: Option<String>,
    },
    MigrationFailed {
        vmi: ObjKey,
        target: Option<String>,
    },
    /// A VMI of the current drain reached a new state.
    Vmi {
        key: ObjKey,
        state: VmiState,
    },
    /// A VMI is no longer on the node; `how` in words, `left` how many remain.
    VmiLeft {
        vmi: ObjKey,
        how: String,
        left: usize,
    },
    /// Passed on from [`Effect::Warn`] by the driver.
    Warning {
        reason: &'static str,
        note: String,
    },
    /// The drain is over: released (empty or deadline) or cancelled.
    Ended(DrainEnd),
    /// logind scheduled a shutdown (`now`), or the one it had (`was`) is gone: cancelled, or
    /// become the shutdown under way.
    Scheduled {
        now: Option<Schedule>,
        was: Option<Schedule>,
    },
    /// A pre-drain found the node empty `ahead` of the scheduled shutdown: the lock stays
    /// taken until `PrepareForShutdown`, which then has nothing left to wait for.
    PreDrained {
        kind: String,
        ahead: Duration,
    },
    /// Too few nodes stay up for migrations to help: the node's VMs are stopped in place.
    /// `targets`: the nodes that would still take VMs; `down`: those announced as going down.
    PowerEvent {
        targets: Vec<String>,
        down: Vec<String>,
    },
}

/// A graceful stop the API server accepted: which VMI, with what grace period, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopDone {
    pub vmi: ObjKey,
    pub vmi_uid: String,
    pub grace_seconds: u32,
    pub why: StopReason,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Released(ReleaseReason),
    Cancelled,
}

/// The record of a drain that ended.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainEnd {
    pub reason: EndReason,
    pub kind: String,
    pub elapsed: Duration,
    pub migrated: usize,
    pub stopped: usize,
    /// VMIs (`ns/name`) and, in scope `all`, pods (`pod ns/name`) still on the node.
    pub remaining: Vec<String>,
}

/// Where the machine is, as reporters show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseLabel {
    Idle,
    Draining,
    Released,
}

impl PhaseLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseLabel::Idle => "idle",
            PhaseLabel::Draining => "draining",
            PhaseLabel::Released => "released",
        }
    }
}

/// The current or last drain as reporters show it.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainView {
    pub kind: String,
    /// Up to now, or to the release.
    pub elapsed: Duration,
    pub budget: Duration,
    pub vmis: Vec<VmiProgress>,
    /// VMIs still on the node (scope `all`: without its other pods).
    pub vmis_remaining: usize,
    pub pods_remaining: Vec<String>,
}

/// The machine's state after a step, as one value for reporters.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub phase: PhaseLabel,
    pub lock_held: bool,
    pub delay_max: Option<Duration>,
    pub drain: Option<DrainView>,
    pub scheduled: Option<Schedule>,
    /// A pre-drain for the scheduled shutdown is under way (it has not started).
    pub pre_draining: bool,
    /// The drain stops the node's VMs in place: the cluster is going down.
    pub power_event: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopReason {
    /// KubeVirt refuses to migrate it: waiting gains nothing.
    NotMigratable,
    /// Its graceful stop would no longer fit before the deadline otherwise.
    StopBy,
    /// The whole cluster is going down: stopped in place through its VM, to start again later.
    PowerEvent,
}

impl StopReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            StopReason::NotMigratable => "not_migratable",
            StopReason::StopBy => "stop_by",
            StopReason::PowerEvent => "power_event",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Attempt {
    InFlight,
    RetryAt(Instant),
    /// Nothing more to send; the watches tell how it ends.
    Settled(EvictionState),
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
    fn state(&self) -> EvictionState {
        match self.attempt {
            Attempt::InFlight => EvictionState::InFlight,
            Attempt::RetryAt(_) => EvictionState::Retrying,
            Attempt::Settled(s) => s,
        }
    }
}

/// This node's place in the pre-drain turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TurnState {
    None,
    Wanted,
    Held,
}

#[derive(Debug, Clone)]
enum CordonState {
    /// Waits for the uncordon of a cancelled shutdown to land first, so it cannot undo ours.
    AfterUncordon,
    /// On its way, or failed and waiting for its retry.
    Pending(Track),
    Settled,
}

/// Where a drain stands on power events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Power {
    /// Not judged (detection off, or a pre-drain: a scheduled shutdown of this node).
    Off,
    /// VMs wait until `until` for the other nodes to announce themselves, then for the first
    /// verdict (for at most [`VERDICT_WAIT`]).
    Settling { until: Instant },
    /// VMs migrate; a later power-event verdict still switches to [`Power::Event`].
    Migrating,
    /// VMs are stopped in place.
    Event,
}

/// The verdict state of a drain: the phase and the last verdict told.
#[derive(Debug, Clone)]
struct PowerJudgement {
    power: Power,
    verdict: Option<Verdict>,
}

/// A drain under way.
#[derive(Debug, Clone)]
pub struct Drain {
    pub started: Instant,
    pub deadline: Instant,
    pub kind: Option<String>,
    cordon: CordonState,
    /// The operator was told the cordon had not landed within [`CORDON_GRACE`].
    cordon_warned: bool,
    /// Non-VM pods are evicted once no VMI is left, or from this instant on at the latest.
    others_from: Instant,
    evictions: HashMap<String, Track>,
    /// By VMI UID, with what was sent.
    stops: HashMap<String, (Track, StopSent)>,
    /// VMIs KubeVirt refused to migrate (by UID).
    not_migratable: Vec<String>,
    /// Cancels of migrations into this node, by target pod UID.
    inbound: HashMap<String, Track>,
    /// VMIs KubeVirt is evacuating because of this drain's evictions.
    evacuating: BTreeSet<ObjKey>,
    /// The paced first eviction awaiting its answer (pod UID, sent at); see
    /// [`EVACUATION_SPACING`].
    paced: Option<(String, Instant)>,
    /// The next paced first eviction goes no earlier than this.
    paced_from: Instant,
    /// The last pump held a first eviction back for the pace.
    paced_waiting: bool,
    /// A pre-drain: the instant the scheduled shutdown is due, until `PrepareForShutdown`
    /// makes it the drain of a shutdown under way. A pre-drain never releases the lock.
    pre: Option<Instant>,
    /// The pre-drain has said that the node is empty.
    pre_told: bool,
    power: PowerJudgement,
}

impl Drain {
    /// A first eviction of a VMI that may migrate can go now.
    fn pace_open(&self, now: Instant) -> bool {
        now >= self.paced_from
            && self
                .paced
                .as_ref()
                .is_none_or(|(_, at)| now >= *at + PACED_ANSWER_WAIT)
    }

    /// The cordon has not landed and its grace has not run out.
    fn cordon_holds(&self, now: Instant) -> bool {
        !matches!(self.cordon, CordonState::Settled) && now < self.started + CORDON_GRACE
    }
}

#[derive(Debug, Clone)]
struct StopSent {
    vmi: ObjKey,
    grace_seconds: u32,
    why: StopReason,
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

/// The drain's state machine. Feed it with [`Machine::handle`], wake it at
/// [`Machine::next_wakeup`], and read what changed with [`Machine::take_notes`].
#[derive(Debug)]
pub struct Machine {
    cfg: MachineConfig,
    phase: Phase,
    lock_held: bool,
    /// The lock went away with logind or the bus; the next one taken is a reconnect.
    lock_lost: bool,
    delay_max: Option<Duration>,
    cordoned_by_us: bool,
    vmis: Inventory<VmiInfo>,
    pods: Inventory<PodInfo>,
    /// Each VMI's running launcher pod on this node (VMI UID → pod UID), kept with the pods:
    /// asked for every VMI on every input, a scan of all pods each time grows with VMIs × pods.
    launchers: HashMap<String, String>,
    /// Per-VMI progress of the current or last drain.
    progress: Option<Tracked>,
    notes: Vec<Note>,
    /// The drain was released in the step being handled.
    released_now: Option<ReleaseReason>,
    /// The uncordon of a cancelled shutdown, until it lands.
    uncordon: Option<Track>,
    /// logind refused us a lock (told once).
    lock_refused: bool,
    /// The shutdown logind has scheduled, and when it is due.
    scheduled: Option<Schedule>,
    scheduled_due: Option<Instant>,
    turn: TurnState,
    /// The instant of the last input: wake-ups are always after it.
    now: Option<Instant>,
}

#[derive(Debug)]
struct Tracked {
    kind: String,
    budget: Duration,
    progress: Progress,
    ended: Option<Instant>,
}

impl Machine {
    pub fn new(cfg: MachineConfig) -> Self {
        Machine {
            cfg,
            phase: Phase::Idle,
            lock_held: false,
            lock_lost: false,
            delay_max: None,
            cordoned_by_us: false,
            vmis: Inventory::default(),
            pods: Inventory::default(),
            launchers: HashMap::new(),
            progress: None,
            notes: Vec::new(),
            released_now: None,
            uncordon: None,
            lock_refused: false,
            scheduled: None,
            scheduled_due: None,
            turn: TurnState::None,
            now: None,
        }
    }

    /// What changed since the last call, in order.
    pub fn take_notes(&mut self) -> Vec<Note> {
        std::mem::take(&mut self.notes)
    }

    /// The state after the last step, for reporters.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let phase = match self.phase {
            Phase::Idle => PhaseLabel::Idle,
            Phase::Draining(_) => PhaseLabel::Draining,
            Phase::Released { .. } => PhaseLabel::Released,
        };
        Snapshot {
            phase,
            lock_held: self.lock_held,
            delay_max: self.delay_max,
            drain: self.progress.as_ref().map(|t| DrainView {
                kind: t.kind.clone(),
                elapsed: t.progress.elapsed(t.ended.unwrap_or(now)),
                budget: t.budget,
                vmis: t.progress.snapshot(),
                vmis_remaining: self.remaining_vmis().len(),
                pods_remaining: self
                    .other_pods_remaining()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            }),
            scheduled: self.scheduled.clone(),
            pre_draining: matches!(&self.phase, Phase::Draining(d) if d.pre.is_some()),
            power_event: matches!(&self.phase, Phase::Draining(d) if d.power.power == Power::Event),
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// How many VMIs and pods the node's watches hold, once both have listed the node.
    pub fn listed(&self) -> Option<(usize, usize)> {
        (self.vmis.synced && self.pods.synced)
            .then_some((self.vmis.live.len(), self.pods.live.len()))
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

    fn budget_capped(&self) -> bool {
        budget_of(
            self.delay_max,
            self.cfg.safety_margin,
            self.cfg.deadline_override,
        )
        .1
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

    /// When the driver must feed [`Input::Tick`] next, if at all. Only inputs change it, and it
    /// is always after the last input's instant: something due that cannot be done yet (a stop
    /// without a launcher pod, a retry of a pod that left) waits for the input that changes
    /// that, never for a clock that would spin.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let mut times: Vec<Instant> = Vec::new();
        let retry = |t: &Track| match t.attempt {
            Attempt::RetryAt(at) => Some(at),
            _ => None,
        };
        times.extend(self.uncordon.as_ref().and_then(retry));
        times.extend(self.pre_drain_from());
        if self.turn == TurnState::Wanted {
            times.extend(self.scheduled_due);
        }
        if let Phase::Draining(d) = &self.phase {
            times.push(d.deadline);
            if let Power::Settling { until } = d.power.power {
                times.push(until);
                times.push(until + VERDICT_WAIT);
            }
            if let CordonState::Pending(t) = &d.cordon {
                times.extend(retry(t));
                times.push(d.started + CORDON_GRACE);
            }
            times.extend(
                d.evictions
                    .values()
                    .chain(d.stops.values().map(|(t, _)| t))
                    .chain(d.inbound.values())
                    .filter_map(retry),
            );
            if self.cfg.scope == Scope::All {
                times.push(d.others_from);
            }
            if d.paced_waiting {
                times.push(d.paced_from);
                times.extend(d.paced.as_ref().map(|(_, at)| *at + PACED_ANSWER_WAIT));
            }
            for v in self.vmis.live.values() {
                if v.runs_on(&self.cfg.node)
                    && !d.stops.contains_key(&v.uid)
                    && self.launcher_of(&v.uid).is_some()
                {
                    times.push(self.stop_by(d, v));
                }
            }
        }
        times
            .into_iter()
            .filter(|t| self.now.is_none_or(|now| *t > now))
            .min()
    }

    /// The last instant at which `vmi` can be stopped with its launcher pod's full grace period
    /// (but not before half the budget has gone, so migrations always get that long).
    fn stop_by(&self, d: &Drain, vmi: &VmiInfo) -> Instant {
        let grace = self
            .launcher_of(&vmi.uid)
            .map(|p| Duration::from_secs(p.grace_seconds as u64))
            .unwrap_or(Duration::from_secs(DEFAULT_GRACE_SECONDS as u64));
        let half = d.started + (d.deadline - d.started) / 2;
        d.deadline.checked_sub(grace).unwrap_or(d.started).max(half)
    }

    fn launcher_of(&self, vmi_uid: &str) -> Option<&PodInfo> {
        self.launchers
            .get(vmi_uid)
            .and_then(|uid| self.pods.live.get(uid))
    }

    /// Rebuilds [`Machine::launchers`] from the pods: per VMI the first of its running
    /// launcher pods on this node by name (two during a migration into the node, briefly).
    fn index_launchers(&mut self) {
        let node = self.cfg.node.as_str();
        let mut index: HashMap<String, &PodInfo> = HashMap::new();
        for p in
            self.pods.live.values().filter(|p| {
                p.is_launcher && !p.is_finished() && p.node_name.as_deref() == Some(node)
            })
        {
            let Some(vmi) = p.created_by.as_ref() else {
                continue;
            };
            let first = index.entry(vmi.clone()).or_insert(p);
            if p.key < first.key {
                *first = p;
            }
        }
        self.launchers = index
            .into_iter()
            .map(|(vmi, p)| (vmi, p.uid.clone()))
            .collect();
    }

    /// Takes one input at `now` and returns what must be done; [`Machine::take_notes`] then
    /// says what changed.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.now = Some(now);
        let was_draining = matches!(self.phase, Phase::Draining(_));
        let before: BTreeSet<ObjKey> = self.remaining_vmis().into_iter().collect();
        let mut seen: Option<(VmiInfo, bool)> = None;
        let mut prev: Option<VmiInfo> = None;
        match input {
            Input::LockTaken { delay_max } => {
                self.lock_held = true;
                self.lock_refused = false;
                self.delay_max = Some(delay_max);
                self.notes.push(Note::LockTaken {
                    delay_max,
                    again: std::mem::take(&mut self.lock_lost),
                });
            }
            Input::LockLost => {
                self.lock_held = false;
                self.lock_lost = true;
                self.notes.push(Note::LockLost);
            }
            Input::DelayMax(d) => {
                self.delay_max = Some(d);
                self.notes.push(Note::DelayMax(d));
            }
            Input::LockRefused { delay_max } => {
                self.delay_max = Some(delay_max);
                self.notes.push(Note::DelayMax(delay_max));
                if !self.lock_refused {
                    self.lock_refused = true;
                    fx.push(Effect::Warn {
                        reason: "DrainWithoutLock",
                        note: "logind refused a delay lock: a shutdown was already being delayed when the agent started; draining without a lock, inside logind's own deadline".into(),
                    });
                }
            }
            Input::CordonedThisBoot => self.cordoned_by_us = true,
            Input::Shutdown { start: true, kind } => self.start(now, kind, None, &mut fx),
            Input::Resume { kind, elapsed } => {
                let started = now.checked_sub(elapsed).unwrap_or(now);
                self.start(started, kind, None, &mut fx)
            }
            Input::Shutdown { start: false, .. } => {
                // Only a shutdown under way is cancelled so; a pre-drain follows the schedule.
                if !matches!(&self.phase, Phase::Draining(d) if d.pre.is_some()) {
                    self.cancel(now, &mut fx);
                }
            }
            Input::Vmis(u) => {
                if let WatchUpdate::Applied(v) | WatchUpdate::Deleted(v) = &u {
                    prev = self.vmis.live.get(&v.uid).cloned();
                    seen = Some((v.clone(), matches!(u, WatchUpdate::Deleted(_))));
                    if let WatchUpdate::Applied(v) = &u {
                        self.note_vmi_update(prev.as_ref(), v);
                    }
                }
                self.vmis.apply(u, |v| v.uid.clone())
            }
            Input::Pods(u) => {
                self.pods.apply(u, |p| p.uid.clone());
                self.index_launchers();
            }
            Input::Cordoned(r) => {
                if r == CordonResult::CordonedByUs {
                    self.cordoned_by_us = true;
                }
                match &mut self.phase {
                    Phase::Draining(d) => {
                        if let (CordonResult::Failed(_), CordonState::Pending(t)) =
                            (&r, &mut d.cordon)
                        {
                            t.failures += 1;
                            t.attempt = Attempt::RetryAt(now + backoff(t.failures));
                        } else {
                            d.cordon = CordonState::Settled;
                        }
                    }
                    // Cancelled while the cordon was on its way: undo it.
                    Phase::Idle if r == CordonResult::CordonedByUs => {
                        self.uncordon = Some(Track::in_flight());
                        fx.push(Effect::Uncordon);
                    }
                    _ => {}
                }
            }
            Input::Uncordoned(r) => {
                let draining = matches!(self.phase, Phase::Draining(_));
                match (&r, self.uncordon.as_mut()) {
                    (Ok(()), _) => {
                        self.cordoned_by_us = false;
                        self.uncordon = None;
                    }
                    // A new drain wants the node cordoned anyway.
                    (Err(_), _) if draining => self.uncordon = None,
                    (Err(_), Some(t)) => {
                        t.failures += 1;
                        t.attempt = Attempt::RetryAt(now + backoff(t.failures));
                    }
                    (Err(_), None) => {}
                }
                if let Phase::Draining(d) = &mut self.phase
                    && matches!(d.cordon, CordonState::AfterUncordon)
                {
                    d.cordon = CordonState::Pending(Track::in_flight());
                    fx.push(Effect::Cordon);
                }
            }
            Input::Evicted { pod, outcome } => {
                if let Phase::Draining(d) = &mut self.phase {
                    let launcher = self.pods.live.get(&pod.uid);
                    let vmi_uid = launcher.and_then(|p| p.created_by.clone());
                    self.notes.push(Note::Evicted {
                        pod: pod.clone(),
                        vmi: launcher.and_then(|p| p.domain.clone()),
                        outcome: outcome.clone(),
                    });
                    if d.paced.as_ref().is_some_and(|(uid, _)| *uid == pod.uid) {
                        d.paced = None;
                        d.paced_from = match outcome {
                            EvictionOutcome::Evacuating => now + EVACUATION_SPACING,
                            _ => now,
                        };
                    }
                    let t = d
                        .evictions
                        .entry(pod.uid.clone())
                        .or_insert_with(Track::in_flight);
                    match outcome {
                        EvictionOutcome::Retry(_) => {
                            t.failures += 1;
                            t.attempt = Attempt::RetryAt(now + backoff(t.failures));
                        }
                        // Final only once the VMI itself says it cannot migrate: KubeVirt also
                        // answers so while a VMI boots and has not reported `LiveMigratable`.
                        EvictionOutcome::NotMigratable
                            if vmi_uid
                                .as_ref()
                                .and_then(|u| self.vmis.live.get(u))
                                .is_some_and(|v| v.live_migratable != Some(false)) =>
                        {
                            t.failures += 1;
                            t.attempt = Attempt::RetryAt(now + backoff(t.failures));
                            self.notes.push(Note::NotMigratableYet { pod: pod.clone() });
                        }
                        EvictionOutcome::NotMigratable => {
                            t.attempt = Attempt::Settled(EvictionState::NotMigratable);
                            if let Some(uid) = vmi_uid
                                && !d.not_migratable.contains(&uid)
                            {
                                d.not_migratable.push(uid);
                            }
                        }
                        EvictionOutcome::Evacuating => {
                            t.attempt = Attempt::Settled(EvictionState::Evacuating);
                            if let Some(name) = launcher.and_then(|p| p.domain.clone()) {
                                d.evacuating.insert(ObjKey::new(&pod.key.namespace, name));
                            }
                        }
                        other => t.attempt = Attempt::Settled(other.settled()),
                    }
                }
            }
            Input::Stopped { vmi_uid, result } => {
                if let Phase::Draining(d) = &mut self.phase
                    && let Some((t, sent)) = d.stops.get_mut(&vmi_uid)
                {
                    match result {
                        Ok(()) => {
                            t.attempt = Attempt::Settled(EvictionState::Evicted);
                            self.notes.push(Note::Stopped(StopDone {
                                vmi: sent.vmi.clone(),
                                vmi_uid,
                                grace_seconds: sent.grace_seconds,
                                why: sent.why,
                            }));
                        }
                        Err(error) => {
                            t.failures += 1;
                            t.attempt = Attempt::RetryAt(now + backoff(t.failures));
                            self.notes.push(Note::StopFailed {
                                vmi: sent.vmi.clone(),
                                error,
                            });
                        }
                    }
                }
            }
            Input::MigrationCancelled { pod_uid, result } => {
                if let Phase::Draining(d) = &mut self.phase
                    && let Some(t) = d.inbound.get_mut(&pod_uid)
                {
                    let pod = self
                        .pods
                        .live
                        .get(&pod_uid)
                        .map(PodInfo::pod_ref)
                        .unwrap_or_else(|| PodRef {
                            key: ObjKey::new("", ""),
                            uid: pod_uid.clone(),
                        });
                    match &result {
                        Ok(()) => t.attempt = Attempt::Settled(EvictionState::Evicted),
                        Err(_) => {
                            t.failures += 1;
                            t.attempt = Attempt::RetryAt(now + backoff(t.failures));
                        }
                    }
                    self.notes.push(Note::MigrationCancelled { pod, result });
                }
            }
            Input::Power(verdict) => self.judged(now, verdict, &mut fx),
            Input::Tick => {}
            Input::Turn(given) => {
                self.turn = match (given, self.turn) {
                    (true, TurnState::Wanted) => TurnState::Held,
                    // Given after we stopped waiting: back at once.
                    (true, _) => {
                        fx.push(Effect::ReleaseTurn);
                        TurnState::None
                    }
                    // Lost while pre-draining: the drain goes on rather than stop half-way.
                    (false, _) => TurnState::None,
                };
            }
            Input::Schedule { schedule, due_in } => {
                self.scheduled_due = schedule.as_ref().map(|_| now + due_in);
                if schedule != self.scheduled {
                    let was = std::mem::replace(&mut self.scheduled, schedule.clone());
                    self.notes.push(Note::Scheduled { now: schedule, was });
                }
                self.follow_schedule(now, &mut fx);
            }
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
        self.take_turn(now, &mut fx);
        self.pump(now, &mut fx);
        if let Some(t) = self.uncordon.as_mut()
            && t.due(now)
        {
            t.attempt = Attempt::InFlight;
            fx.push(Effect::Uncordon);
        }
        self.note_progress(now, was_draining, &before, seen, prev.as_ref());
        if let Some(reason) = self.released_now.take() {
            let end = self.end(now, EndReason::Released(reason));
            self.notes.push(Note::Ended(end));
        }
        fx
    }

    /// Evacuation and migration milestones of a VMI of this node, from one watch update.
    fn note_vmi_update(&mut self, prev: Option<&VmiInfo>, next: &VmiInfo) {
        let node = self.cfg.node.as_str();
        if !next.runs_on(node) && prev.is_none_or(|p| !p.runs_on(node)) {
            return;
        }
        let prev_evac = prev.and_then(|p| p.evacuation_node.as_deref());
        if next.evacuation_node.is_some() && prev_evac != next.evacuation_node.as_deref() {
            self.notes.push(Note::EvacuationRequested {
                vmi: next.key.clone(),
            });
        }
        let prev_m = prev.and_then(|p| p.migration.as_ref());
        if let Some(m) = &next.migration {
            if m.target_node.is_some()
                && prev_m.and_then(|p| p.target_node.as_ref()) != m.target_node.as_ref()
                && !m.completed
            {
                self.notes.push(Note::Migrating {
                    vmi: next.key.clone(),
                    target: m.target_node.clone(),
                });
            }
            if m.failed && !prev_m.is_some_and(|p| p.failed) {
                self.notes.push(Note::MigrationFailed {
                    vmi: next.key.clone(),
                    target: m.target_node.clone(),
                });
            }
        }
    }

    /// Per-VMI progress and departures after one input.
    fn note_progress(
        &mut self,
        now: Instant,
        was_draining: bool,
        before: &BTreeSet<ObjKey>,
        seen: Option<(VmiInfo, bool)>,
        prev: Option<&VmiInfo>,
    ) {
        let deleted = seen.as_ref().filter(|(_, d)| *d).map(|(v, _)| v);
        if self.progress.as_ref().is_some_and(|t| t.ended.is_none()) {
            let known: Vec<(&VmiInfo, Option<EvictionState>, bool)> = self
                .vmis
                .live
                .values()
                .map(|v| {
                    let eviction = self
                        .launcher_of(&v.uid)
                        .and_then(|p| self.eviction_state(&p.uid));
                    (v, eviction, self.stop_sent(&v.uid))
                })
                .collect();
            let changes = match self.progress.as_mut() {
                Some(t) => t.progress.update(now, &known, deleted),
                None => Vec::new(),
            };
            for (key, state) in changes {
                self.notes.push(Note::Vmi { key, state });
            }
        }
        if !was_draining && matches!(self.phase, Phase::Idle) {
            return;
        }
        let after: BTreeSet<ObjKey> = self.remaining_vmis().into_iter().collect();
        for gone in before.difference(&after) {
            let how = match &seen {
                Some((v, deleted)) if &v.key == gone => {
                    departure(&self.cfg.node, v, *deleted, prev)
                }
                _ => "left".into(),
            };
            self.notes.push(Note::VmiLeft {
                vmi: gone.clone(),
                how,
                left: after.len(),
            });
        }
    }

    /// The record of the current drain, as it ends now.
    fn end(&mut self, now: Instant, reason: EndReason) -> DrainEnd {
        let mut remaining: Vec<String> = self
            .remaining_vmis()
            .iter()
            .map(ToString::to_string)
            .collect();
        if reason != EndReason::Cancelled {
            remaining.extend(
                self.other_pods_remaining()
                    .iter()
                    .map(|p| format!("pod {p}")),
            );
        }
        let (kind, elapsed, (migrated, stopped, _)) = match self.progress.as_mut() {
            Some(t) => {
                t.ended = Some(now);
                (t.kind.clone(), t.progress.elapsed(now), t.progress.counts())
            }
            None => ("unknown".into(), Duration::ZERO, (0, 0, 0)),
        };
        DrainEnd {
            reason,
            kind,
            elapsed,
            migrated,
            stopped,
            remaining,
        }
    }

    /// Ends the drain of a cancelled shutdown or pre-drain: KubeVirt stops evacuating what we
    /// asked it to, our cordon goes, and the lock is taken again if it was given up.
    fn cancel(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        self.release_turn(fx);
        if let Phase::Draining(d) = &self.phase {
            for vmi in &d.evacuating {
                fx.push(Effect::CancelEvacuation { vmi: vmi.clone() });
            }
            if d.power.power != Power::Off {
                fx.push(Effect::Withdraw);
            }
            let end = self.end(now, EndReason::Cancelled);
            self.notes.push(Note::Ended(end));
            self.progress = None;
        }
        if !matches!(self.phase, Phase::Idle) {
            self.phase = Phase::Idle;
            if self.cordoned_by_us {
                self.uncordon = Some(Track::in_flight());
                fx.insert(0, Effect::Uncordon);
            }
        }
        if !self.lock_held {
            fx.push(Effect::TakeLock);
        }
    }

    /// When a pre-drain for the scheduled shutdown is to start, if one is to: configured, a
    /// schedule that really shuts down (not `dry-*`), nothing under way, and its time still
    /// ahead (past it, `PrepareForShutdown` takes over).
    fn pre_drain_from(&self) -> Option<Instant> {
        let lead = self.cfg.pre_drain_lead?;
        let due = self.scheduled_due?;
        let real = self.scheduled.as_ref()?.takes_node_down();
        let idle = matches!(self.phase, Phase::Idle);
        let ahead = self.now.is_none_or(|now| now < due);
        (idle && ahead && real).then(|| due.checked_sub(lead).unwrap_or(due))
    }

    fn start_pre_drain(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        if let (Some(due), Some(s)) = (self.scheduled_due, self.scheduled.clone()) {
            self.start(now, Some(s.kind), Some(due), fx);
        }
    }

    /// Starts the pre-drain when it is due, after waiting for a turn where turns are taken. A
    /// turn that has not come by the scheduled time is given up: the shutdown is drained when
    /// it starts, as without a schedule.
    fn take_turn(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        if self.pre_drain_from().is_some_and(|t| now >= t) {
            match (self.cfg.take_turns, self.turn) {
                (false, _) | (true, TurnState::Held) => self.start_pre_drain(now, fx),
                (true, TurnState::None) => {
                    self.turn = TurnState::Wanted;
                    fx.push(Effect::WantTurn);
                }
                (true, TurnState::Wanted) => {}
            }
            return;
        }
        if self.turn == TurnState::Wanted && matches!(self.phase, Phase::Idle) {
            let gone = self.scheduled.is_none();
            if !gone {
                fx.push(Effect::Warn {
                    reason: "PreDrainTurnMissed",
                    note: "no pre-drain turn came before the scheduled shutdown (other nodes held them); the node is drained when the shutdown starts".into(),
                });
            }
            self.release_turn(fx);
        }
    }

    fn release_turn(&mut self, fx: &mut Vec<Effect>) {
        if self.turn != TurnState::None {
            self.turn = TurnState::None;
            fx.push(Effect::ReleaseTurn);
        }
    }

    /// A pre-drain follows its schedule: moved within the lead, it keeps the node empty until
    /// the new time; moved further off (or to a dry run), it is undone and may come again; gone
    /// before its time (`shutdown -c`), it is undone; gone at its time, it has fired and
    /// `PrepareForShutdown` takes over.
    fn follow_schedule(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let Phase::Draining(d) = &self.phase else {
            return;
        };
        let Some(was_due) = d.pre else {
            return;
        };
        let budget = self.budget();
        let lead = self.cfg.pre_drain_lead.unwrap_or_default();
        let real = self
            .scheduled
            .as_ref()
            .is_some_and(Schedule::takes_node_down);
        match self.scheduled_due {
            Some(due) if real && due.checked_sub(lead).is_none_or(|from| from <= now) => {
                if let Phase::Draining(d) = &mut self.phase {
                    d.pre = Some(due);
                    d.deadline = due + budget;
                }
            }
            None if now + FIRING_SLACK >= was_due => {}
            _ => self.cancel(now, fx),
        }
    }

    /// Starts a drain that began at `started` (now, or earlier for a resumed one); a second
    /// start signal (`PrepareForShutdownWithMetadata` then `PrepareForShutdown`) only adds the
    /// shutdown's type, and one during a pre-drain makes it the shutdown's drain. With
    /// `pre_due`, a pre-drain for the shutdown scheduled then: its deadline is logind's delay
    /// counted from that time.
    fn start(
        &mut self,
        started: Instant,
        kind: Option<String>,
        pre_due: Option<Instant>,
        fx: &mut Vec<Effect>,
    ) {
        if pre_due.is_none() {
            // The shutdown has come: this node no longer waits for a turn, nor needs one.
            self.release_turn(fx);
        }
        let budget = self.budget();
        match &mut self.phase {
            Phase::Idle => {}
            Phase::Draining(d) => {
                if d.pre.take().is_some() {
                    // The scheduled shutdown has come: from now on logind's delay counts.
                    d.deadline = started + budget;
                    if kind.is_some() {
                        d.kind = kind;
                    }
                    self.announce(started, fx);
                    return;
                }
                if d.kind.is_none() {
                    if let (Some(k), Some(t)) = (&kind, self.progress.as_mut()) {
                        t.kind = k.clone();
                    }
                    d.kind = kind;
                }
                return;
            }
            Phase::Released { .. } => return,
        }
        let deadline = pre_due.unwrap_or(started) + budget;
        let budget = deadline.saturating_duration_since(started);
        let kind_label = match (&kind, pre_due) {
            (Some(k), Some(_)) => format!("scheduled-{k}"),
            (Some(k), None) => k.clone(),
            (None, _) => "unknown".into(),
        };
        self.progress = Some(Tracked {
            kind: kind_label.clone(),
            budget,
            progress: Progress::new(&self.cfg.node, started),
            ended: None,
        });
        self.notes.push(Note::DrainStarted {
            kind: kind_label,
            budget,
            vmis: self.remaining_vmis(),
        });
        // The uncordon of a cancelled shutdown still on its way could land after our cordon's
        // read and undo it: ours goes once it has landed. One waiting for a retry is dropped.
        let after_uncordon = match &self.uncordon {
            Some(t) if t.attempt == Attempt::InFlight => true,
            _ => {
                self.uncordon = None;
                false
            }
        };
        self.phase = Phase::Draining(Box::new(Drain {
            started,
            deadline,
            kind,
            cordon: if after_uncordon {
                CordonState::AfterUncordon
            } else {
                CordonState::Pending(Track::in_flight())
            },
            cordon_warned: false,
            others_from: started + budget / 2,
            evictions: HashMap::new(),
            stops: HashMap::new(),
            not_migratable: Vec::new(),
            inbound: HashMap::new(),
            evacuating: BTreeSet::new(),
            paced: None,
            paced_from: started,
            paced_waiting: false,
            pre: pre_due,
            pre_told: false,
            power: PowerJudgement {
                power: Power::Off,
                verdict: None,
            },
        }));
        if !after_uncordon {
            fx.push(Effect::Cordon);
        }
        if pre_due.is_none() {
            self.announce(started, fx);
        }
        if self.budget_capped() {
            fx.push(Effect::Warn {
                reason: "DeadlineCapped",
                note: format!(
                    "the configured deadline of {}s is more than logind allows (InhibitDelayMaxUSec {}s minus the safety margin); draining for {}s",
                    self.cfg.deadline_override.unwrap_or_default().as_secs(),
                    self.delay_max.unwrap_or_default().as_secs(),
                    budget.as_secs()
                ),
            });
        }
    }

    /// A shutdown's drain announces itself, where power events are judged at all (once: a
    /// second start signal changes nothing).
    fn announce(&mut self, started: Instant, fx: &mut Vec<Effect>) {
        let Some(settle) = self.cfg.power_settle else {
            return;
        };
        let Phase::Draining(d) = &mut self.phase else {
            return;
        };
        if d.power.power != Power::Off {
            return;
        }
        d.power.power = if settle.is_zero() {
            Power::Migrating
        } else {
            Power::Settling {
                until: started + settle,
            }
        };
        fx.push(Effect::Announce {
            fresh_for: d.deadline.saturating_duration_since(started),
        });
    }

    fn judged(&mut self, now: Instant, verdict: Verdict, fx: &mut Vec<Effect>) {
        if let Phase::Draining(d) = &mut self.phase
            && !matches!(d.power.power, Power::Off | Power::Event)
        {
            d.power.verdict = Some(verdict);
        }
        self.follow_power(now, fx);
    }

    /// Decides once the settle is over (on the last verdict, or without one after
    /// [`VERDICT_WAIT`]: as any drain), and switches a migrating drain to stopping in place when
    /// a power event is recognised. A power event, once recognised, stays.
    fn follow_power(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let Phase::Draining(d) = &mut self.phase else {
            return;
        };
        let event = d.power.verdict.as_ref().map(Verdict::is_power_event);
        let to_event = match (d.power.power, event) {
            (Power::Settling { until }, _) if now < until => return,
            (Power::Settling { .. }, Some(e)) => e,
            (Power::Settling { until }, None) if now >= until + VERDICT_WAIT => false,
            (Power::Migrating, Some(true)) => true,
            _ => return,
        };
        if !to_event {
            d.power.power = Power::Migrating;
            return;
        }
        d.power.power = Power::Event;
        // KubeVirt stops evacuating this node's VMIs: no migration is created for them now.
        for vmi in std::mem::take(&mut d.evacuating) {
            fx.push(Effect::CancelEvacuation { vmi });
        }
        let (targets, down) = match d.power.verdict.clone() {
            Some(Verdict::PowerEvent { targets, down }) => (targets, down),
            _ => (Vec::new(), Vec::new()),
        };
        self.notes.push(Note::PowerEvent { targets, down });
    }

    /// Moves a drain on: sends due evictions, stops and cancels of inbound migrations, and
    /// releases the lock when the node is empty or the deadline has come.
    ///
    /// While the cordon has not landed (for at most [`CORDON_GRACE`]), launcher pods are
    /// evicted and inbound migrations cancelled, and nothing else happens: nothing puts a VM
    /// back on this node within that round trip (a migration target never lands on its source,
    /// a restarted VMI comes only after the old one has shut down), and every millisecond here
    /// is taken from the migrations. Other pods wait for the cordon, or their controllers could
    /// recreate them right here; stops and the release wait too, so the node is not left
    /// without our cordon. Past the grace a cordon still failing holds nothing back: it is
    /// retried with backoff and the operator is told.
    fn pump(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        self.follow_power(now, fx);
        let Phase::Draining(d) = &self.phase else {
            return;
        };
        let plan = self.plan();
        if now >= d.deadline {
            if let Some(due) = d.pre {
                // The scheduled time came and went without a shutdown: undo the pre-drain.
                let late = now.saturating_duration_since(due).as_secs();
                fx.push(Effect::Warn {
                    reason: "ScheduledShutdownMissed",
                    note: format!(
                        "the scheduled shutdown did not start ({late}s past its time); uncordoning the pre-drained node"
                    ),
                });
                self.cancel(now, fx);
                return;
            }
            self.release(now, ReleaseReason::Deadline, fx);
            return;
        }
        let held = d.cordon_holds(now);
        let vmis_left: Vec<&VmiInfo> = self
            .vmis
            .live
            .values()
            .filter(|v| v.runs_on(&self.cfg.node))
            .collect();
        let empty = self.vmis.synced
            && vmis_left.is_empty()
            && plan.inbound.is_empty()
            && (self.cfg.scope == Scope::Vms
                || (self.pods.synced && plan.other_remaining.is_empty()));
        if empty && !held {
            if let (Some(due), Phase::Draining(d)) = (d.pre, &mut self.phase) {
                if !std::mem::replace(&mut d.pre_told, true) {
                    self.notes.push(Note::PreDrained {
                        kind: d.kind.clone().unwrap_or_default(),
                        ahead: due.saturating_duration_since(now),
                    });
                }
                // Empty: the next node may take its turn.
                self.release_turn(fx);
                return;
            }
            self.release(now, ReleaseReason::Empty, fx);
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
        let unpaced: BTreeSet<String> = plan
            .vm_pods
            .iter()
            .filter(|r| {
                self.pods
                    .live
                    .get(&r.uid)
                    .and_then(|p| p.created_by.as_ref())
                    .and_then(|uid| self.vmis.live.get(uid))
                    .is_some_and(|v| v.live_migratable == Some(false))
            })
            .map(|r| r.uid.clone())
            .collect();

        let Phase::Draining(d) = &mut self.phase else {
            return;
        };
        if let CordonState::Pending(t) = &mut d.cordon
            && t.due(now)
        {
            t.attempt = Attempt::InFlight;
            fx.push(Effect::Cordon);
        }
        if !held && !matches!(d.cordon, CordonState::Settled) && !d.cordon_warned {
            d.cordon_warned = true;
            fx.push(Effect::Warn {
                reason: "CordonNotConfirmed",
                note: format!(
                    "the node could not be cordoned within {}s; draining anyway and retrying the cordon",
                    CORDON_GRACE.as_secs()
                ),
            });
        }
        for (r, job) in &plan.inbound {
            let due = d.inbound.get(&r.uid).is_none_or(|t| t.due(now));
            if due {
                if !d.inbound.contains_key(&r.uid) {
                    self.notes.push(Note::Inbound {
                        pod: r.clone(),
                        job: job.clone(),
                    });
                }
                d.inbound
                    .entry(r.uid.clone())
                    .or_insert_with(Track::in_flight)
                    .attempt = Attempt::InFlight;
                fx.push(Effect::CancelMigration {
                    pod: r.clone(),
                    job: job.clone(),
                });
            }
        }
        // One first eviction at a time for VMIs that may migrate (see EVACUATION_SPACING);
        // those KubeVirt has found not migratable only stop, and retries keep their backoff.
        d.paced_waiting = false;
        // Nothing is evicted while the power event is judged, nor in one: evicted, a VM would
        // migrate to a node that goes down next, or stop and start elsewhere.
        let evicting = matches!(d.power.power, Power::Off | Power::Migrating);
        for r in plan.vm_pods.iter().filter(|_| evicting) {
            if !d.evictions.contains_key(&r.uid) && !unpaced.contains(&r.uid) {
                if !d.pace_open(now) {
                    d.paced_waiting = true;
                    continue;
                }
                d.paced = Some((r.uid.clone(), now));
            }
            send_eviction(d, r, now, fx);
        }
        if held {
            return;
        }
        if others_due {
            for r in &plan.other_pods {
                send_eviction(d, r, now, fx);
            }
        }

        let remaining = d.deadline.saturating_duration_since(now);
        for (v, stop_by) in stop_plan {
            let why = if d.power.power == Power::Event {
                StopReason::PowerEvent
            } else if d.not_migratable.contains(&v.uid) {
                StopReason::NotMigratable
            } else if now >= stop_by {
                StopReason::StopBy
            } else {
                continue;
            };
            let due = match d.stops.get(&v.uid) {
                None => true,
                Some((t, _)) => t.due(now),
            };
            let Some(pod) = launchers.get(&v.uid) else {
                continue;
            };
            if due {
                let grace = (pod.grace_seconds as u64).min(remaining.as_secs()).max(1) as u32;
                let sent = StopSent {
                    vmi: v.key.clone(),
                    grace_seconds: grace,
                    why,
                };
                let (t, s) = d
                    .stops
                    .entry(v.uid.clone())
                    .or_insert_with(|| (Track::in_flight(), sent.clone()));
                t.attempt = Attempt::InFlight;
                *s = sent;
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
        // Recorded once this step's progress is in (see `handle`).
        self.released_now = Some(reason);
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

    fn eviction_state(&self, pod_uid: &str) -> Option<EvictionState> {
        let Phase::Draining(d) = &self.phase else {
            return None;
        };
        d.evictions.get(pod_uid).map(|t| t.state())
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

    /// Per-pod eviction progress: pod UID → state.
    pub fn eviction_states(&self) -> BTreeMap<String, EvictionState> {
        let mut out = BTreeMap::new();
        if let Phase::Draining(d) = &self.phase {
            for (uid, t) in &d.evictions {
                out.insert(uid.clone(), t.state());
            }
        }
        out
    }
}

/// Names an Event note lists before summarising the rest (notes are capped at 1 kB).
const NOTE_NAMES: usize = 12;

/// Sends `r`'s eviction unless one is on its way or waiting for its retry.
fn send_eviction(d: &mut Drain, r: &PodRef, now: Instant, fx: &mut Vec<Effect>) {
    let due = d.evictions.get(&r.uid).is_none_or(|t| t.due(now));
    if due {
        let t = d
            .evictions
            .entry(r.uid.clone())
            .or_insert_with(Track::in_flight);
        t.attempt = Attempt::InFlight;
        fx.push(Effect::Evict(r.clone()));
    }
}

fn name_list(names: &[String], max: usize) -> String {
    if names.len() <= max {
        return names.join(", ");
    }
    format!("{} and {} more", names[..max].join(", "), names.len() - max)
}

/// How VMI `v` left the node, in words for the log.
fn departure(node: &str, v: &VmiInfo, deleted: bool, prev: Option<&VmiInfo>) -> String {
    if v.is_finished() {
        return format!("stopped ({})", v.phase.as_deref().unwrap_or(""));
    }
    if let Some(t) = v
        .migration
        .as_ref()
        .filter(|m| m.completed)
        .and_then(|m| m.target_node.clone())
    {
        return format!("migrated to {t}");
    }
    if let Some(n) = v.node_name.as_ref().filter(|n| n.as_str() != node) {
        return format!("migrated to {n}");
    }
    if deleted {
        return match prev
            .and_then(|p| p.migration.as_ref())
            .and_then(|m| m.target_node.as_ref())
        {
            Some(t) => format!("migrated to {t}"),
            None => "deleted".into(),
        };
    }
    "left".into()
}

/// How long a drain may take: logind's maximum delay minus the margin, but never less than half
/// the delay (so the budget grows with the delay, and a short delay still gets a drain attempt);
/// the override instead when it is shorter.
pub fn drain_budget(
    delay_max: Option<Duration>,
    margin: Duration,
    deadline_override: Option<Duration>,
) -> Duration {
    budget_of(delay_max, margin, deadline_override).0
}

/// The budget, and whether the override had to be cut down to what logind allows. Without a
/// known delay (the `drain` command) the override stands as it is.
pub fn budget_of(
    delay_max: Option<Duration>,
    margin: Duration,
    deadline_override: Option<Duration>,
) -> (Duration, bool) {
    let natural = |d: Duration| d.saturating_sub(margin).max(d / 2);
    match (deadline_override, delay_max) {
        (Some(o), Some(d)) if o > natural(d) => (natural(d), true),
        (Some(o), _) => (o, false),
        (None, d) => (natural(d.unwrap_or(LOGIND_DEFAULT_DELAY)), false),
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
