//! The lock holder's decisions, pure: when to close logind's lock, when to take it again, and
//! when to (re)start the drain worker. The holder is the only part of the agent that talks to
//! logind and the only one that must never die during a drain; it keeps its lock across a crash
//! or a hang of the worker (which talks to the API server), releases it itself at the deadline,
//! and takes it again when a released shutdown did not happen.
//!
//! [`crate::holder`] runs it.

use std::time::{Duration, Instant};

use super::eviction::backoff;
use super::machine::budget_of;
use super::model::Schedule;

/// What the keeper is run with.
#[derive(Debug, Clone)]
pub struct KeeperConfig {
    pub safety_margin: Duration,
    pub deadline_override: Option<Duration>,
    /// After a release, how long until the keeper first asks logind whether the shutdown is
    /// still under way (and then every so often): a shutdown that failed (logind logs "Error
    /// during inhibitor-delayed operation") sends no `PrepareForShutdown(false)`.
    pub rearm_after: Duration,
    /// The worker says it is alive at least this often; silence for longer is a hang.
    pub heartbeat_timeout: Duration,
}

/// What happened, fed to [`Keeper::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum KeeperInput {
    LockTaken {
        delay_max: Duration,
    },
    LockLost,
    /// logind refuses a delay lock because a shutdown is already being delayed: whoever started
    /// it, the node drains now without a lock of ours.
    LockRefused {
        delay_max: Duration,
    },
    /// logind's `InhibitDelayMaxUSec`, read again (at `PrepareForShutdown(true)` above all).
    DelayMax(Duration),
    /// `PrepareForShutdown(start)`; `since` is how long ago it began (a holder started after it).
    Shutdown {
        start: bool,
        kind: Option<String>,
        since: Duration,
    },
    WorkerStarted,
    WorkerExited,
    /// Any line from the worker.
    WorkerAlive,
    WorkerRelease,
    WorkerRetake,
    /// logind's `PreparingForShutdown`, asked after a release.
    Preparing(bool),
    /// logind's `ScheduledShutdown` changed (or was read for the first time).
    Scheduled(Option<Schedule>),
    Tick,
    Terminate,
}

/// What the holder must tell the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tell {
    /// A lock is held; `preparing` when a drain is under way (a restarted worker's cordon from
    /// this boot is then still wanted).
    Lock {
        delay_max: Duration,
        preparing: bool,
    },
    Lost,
    NoLock {
        delay_max: Duration,
    },
    Delay(Duration),
    Shutdown {
        start: bool,
        kind: Option<String>,
    },
    Resume {
        kind: Option<String>,
        elapsed: Duration,
    },
    /// The shutdown logind has scheduled, or none.
    Schedule(Option<Schedule>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeeperEffect {
    /// Close the lock's fd: the shutdown goes on.
    Release {
        by_deadline: bool,
    },
    TakeLock,
    SpawnWorker,
    /// SIGKILL the worker (it stopped answering).
    KillWorker,
    Tell(Tell),
    /// Ask logind's `PreparingForShutdown`.
    AskPreparing,
    /// Remember the drain's start where a restarted holder finds it (`None`: forget it).
    Remember(Option<Duration>),
    Exit,
}

/// The drain as the holder sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldDrain {
    pub started: Instant,
    pub deadline: Instant,
    pub kind: Option<String>,
    pub released: Option<Instant>,
}

#[derive(Debug)]
pub struct Keeper {
    cfg: KeeperConfig,
    delay_max: Option<Duration>,
    lock_held: bool,
    /// logind refused us because a shutdown is being delayed.
    refused: bool,
    drain: Option<HeldDrain>,
    worker_running: bool,
    restarts: u32,
    restart_at: Option<Instant>,
    last_heard: Option<Instant>,
    next_ask: Option<Instant>,
    terminating: bool,
    /// What logind has scheduled, for every worker to know.
    schedule: Option<Schedule>,
    now: Option<Instant>,
}

impl Keeper {
    pub fn new(cfg: KeeperConfig) -> Self {
        Keeper {
            cfg,
            delay_max: None,
            lock_held: false,
            refused: false,
            drain: None,
            worker_running: false,
            restarts: 0,
            restart_at: None,
            last_heard: None,
            next_ask: None,
            terminating: false,
            schedule: None,
            now: None,
        }
    }

    pub fn drain(&self) -> Option<&HeldDrain> {
        self.drain.as_ref()
    }

    pub fn lock_held(&self) -> bool {
        self.lock_held
    }

    /// A drain is under way and not released yet.
    pub fn draining(&self) -> bool {
        self.drain.as_ref().is_some_and(|d| d.released.is_none())
    }

    /// When the holder must feed [`KeeperInput::Tick`] next; always after the last input.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let mut times = vec![];
        if let Some(d) = &self.drain
            && d.released.is_none()
        {
            times.push(d.deadline);
        }
        times.extend(self.restart_at);
        times.extend(self.next_ask);
        if self.worker_running
            && let Some(t) = self.last_heard
        {
            times.push(t + self.cfg.heartbeat_timeout);
        }
        times
            .into_iter()
            .filter(|t| self.now.is_none_or(|now| *t > now))
            .min()
    }

    fn start(&mut self, now: Instant, since: Duration, kind: Option<String>) -> Vec<KeeperEffect> {
        let started = now.checked_sub(since).unwrap_or(now);
        let (budget, _) = budget_of(
            self.delay_max,
            self.cfg.safety_margin,
            self.cfg.deadline_override,
        );
        // The worker's own deadline is this budget; the holder waits a little longer before it
        // acts alone, but always inside logind's cut.
        let delay = self.delay_max.unwrap_or(budget);
        let grace = (delay.saturating_sub(budget) / 2).min(Duration::from_secs(1));
        self.drain = Some(HeldDrain {
            started,
            deadline: started + budget + grace,
            kind: kind.clone(),
            released: None,
        });
        vec![
            KeeperEffect::Remember(Some(since)),
            KeeperEffect::Tell(if since.is_zero() {
                Tell::Shutdown { start: true, kind }
            } else {
                Tell::Resume {
                    kind,
                    elapsed: since,
                }
            }),
        ]
    }

    fn release(&mut self, now: Instant, by_deadline: bool) -> Vec<KeeperEffect> {
        let Some(d) = self.drain.as_mut() else {
            return vec![];
        };
        if d.released.is_some() {
            return vec![];
        }
        d.released = Some(now);
        self.lock_held = false;
        self.next_ask = Some(now + self.cfg.rearm_after);
        let mut fx = vec![KeeperEffect::Release { by_deadline }];
        if self.terminating {
            fx.push(KeeperEffect::Exit);
        }
        fx
    }

    /// Back to guarding: the shutdown was cancelled, or it failed after our release.
    fn rearm(&mut self) -> Vec<KeeperEffect> {
        let was = self.drain.take();
        self.next_ask = None;
        let mut fx = vec![KeeperEffect::Remember(None)];
        if was.is_some() {
            fx.push(KeeperEffect::Tell(Tell::Shutdown {
                start: false,
                kind: None,
            }));
        }
        if !self.lock_held {
            fx.push(KeeperEffect::TakeLock);
        }
        fx
    }

    /// What a (re)started worker must be told to pick up where things are.
    fn brief(&self, now: Instant) -> Vec<KeeperEffect> {
        let mut fx = vec![];
        // The schedule first: a worker restarted during a pre-drain must know it before it
        // decides about the cordon it finds.
        if self.schedule.is_some() {
            fx.push(KeeperEffect::Tell(Tell::Schedule(self.schedule.clone())));
        }
        let delay = self.delay_max.unwrap_or_default();
        if self.lock_held {
            fx.push(KeeperEffect::Tell(Tell::Lock {
                delay_max: delay,
                preparing: self.draining(),
            }));
        } else if self.refused {
            fx.push(KeeperEffect::Tell(Tell::NoLock { delay_max: delay }));
        }
        if let Some(d) = &self.drain
            && d.released.is_none()
        {
            fx.push(KeeperEffect::Tell(Tell::Resume {
                kind: d.kind.clone(),
                elapsed: now.saturating_duration_since(d.started),
            }));
        }
        fx
    }

    pub fn handle(&mut self, now: Instant, input: KeeperInput) -> Vec<KeeperEffect> {
        self.now = Some(now);
        let mut fx = vec![];
        match input {
            KeeperInput::LockTaken { delay_max } => {
                self.delay_max = Some(delay_max);
                self.refused = false;
                // A lock that comes back while the shutdown we released is still under way is
                // not ours to hold on to.
                if self.drain.as_ref().is_some_and(|d| d.released.is_some()) {
                    return vec![KeeperEffect::Release { by_deadline: false }];
                }
                self.lock_held = true;
                fx.push(KeeperEffect::Tell(Tell::Lock {
                    delay_max,
                    preparing: self.draining(),
                }));
            }
            KeeperInput::LockLost => {
                self.lock_held = false;
                fx.push(KeeperEffect::Tell(Tell::Lost));
            }
            KeeperInput::LockRefused { delay_max } => {
                self.delay_max = Some(delay_max);
                if !self.refused {
                    self.refused = true;
                    fx.push(KeeperEffect::Tell(Tell::NoLock { delay_max }));
                }
            }
            KeeperInput::DelayMax(d) => {
                self.delay_max = Some(d);
                fx.push(KeeperEffect::Tell(Tell::Delay(d)));
            }
            KeeperInput::Shutdown {
                start: true,
                kind,
                since,
            } => match &mut self.drain {
                None => fx.extend(self.start(now, since, kind)),
                Some(d) => {
                    if d.kind.is_none() && kind.is_some() {
                        d.kind = kind.clone();
                        fx.push(KeeperEffect::Tell(Tell::Shutdown { start: true, kind }));
                    }
                }
            },
            KeeperInput::Shutdown { start: false, .. } => fx.extend(self.rearm()),
            KeeperInput::WorkerStarted => {
                self.worker_running = true;
                self.restart_at = None;
                self.last_heard = Some(now);
                fx.extend(self.brief(now));
            }
            KeeperInput::WorkerExited => {
                self.worker_running = false;
                self.last_heard = None;
                if self.terminating && self.drain.as_ref().is_none_or(|d| d.released.is_some()) {
                    return vec![KeeperEffect::Exit];
                }
                self.restarts += 1;
                // The first restart is at once: a drain is waiting for it.
                let wait = match self.restarts {
                    1 => Duration::ZERO,
                    n => backoff(n - 1),
                };
                self.restart_at = Some(now + wait);
                if wait.is_zero() {
                    self.restart_at = None;
                    fx.push(KeeperEffect::SpawnWorker);
                }
            }
            KeeperInput::WorkerAlive => {
                self.last_heard = Some(now);
                // A worker that has stayed up a while earns a fresh restart budget.
                self.restarts = self.restarts.saturating_sub(1);
            }
            KeeperInput::WorkerRelease => {
                self.last_heard = Some(now);
                if self.drain.is_some() {
                    fx.extend(self.release(now, false));
                } else if self.lock_held {
                    // A worker without a drain (the shutdown came before a restart finished):
                    // the worker's view is the API's; trust it.
                    self.lock_held = false;
                    fx.push(KeeperEffect::Release { by_deadline: false });
                }
            }
            KeeperInput::WorkerRetake => {
                self.last_heard = Some(now);
                if self.drain.is_none() && !self.lock_held {
                    fx.push(KeeperEffect::TakeLock);
                }
            }
            KeeperInput::Preparing(still) => {
                if self.drain.as_ref().is_some_and(|d| d.released.is_some()) {
                    if still {
                        self.next_ask = Some(now + self.cfg.rearm_after);
                    } else {
                        fx.extend(self.rearm());
                    }
                }
            }
            KeeperInput::Scheduled(schedule) => {
                if schedule != self.schedule {
                    self.schedule = schedule.clone();
                    fx.push(KeeperEffect::Tell(Tell::Schedule(schedule)));
                }
            }
            KeeperInput::Tick => {}
            KeeperInput::Terminate => {
                self.terminating = true;
                // Mid-drain the holder stays until the drain ends (by the worker or the
                // deadline): leaving now would power the node off at once.
                if self.drain.as_ref().is_none_or(|d| d.released.is_some()) {
                    return vec![KeeperEffect::Exit];
                }
            }
        }
        fx.extend(self.timers(now));
        fx
    }

    fn timers(&mut self, now: Instant) -> Vec<KeeperEffect> {
        let mut fx = vec![];
        if let Some(d) = &self.drain
            && d.released.is_none()
            && now >= d.deadline
        {
            fx.extend(self.release(now, true));
        }
        if self.restart_at.is_some_and(|t| now >= t) {
            self.restart_at = None;
            fx.push(KeeperEffect::SpawnWorker);
        }
        if self.next_ask.is_some_and(|t| now >= t) {
            self.next_ask = None;
            fx.push(KeeperEffect::AskPreparing);
        }
        if self.worker_running
            && self
                .last_heard
                .is_some_and(|t| now >= t + self.cfg.heartbeat_timeout)
        {
            self.last_heard = None;
            fx.push(KeeperEffect::KillWorker);
        }
        fx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn keeper() -> (Keeper, Instant) {
        let mut k = Keeper::new(KeeperConfig {
            safety_margin: S(5),
            deadline_override: None,
            rearm_after: S(5),
            heartbeat_timeout: S(10),
        });
        let t0 = Instant::now();
        k.handle(t0, KeeperInput::WorkerStarted);
        k.handle(t0, KeeperInput::LockTaken { delay_max: S(60) });
        (k, t0)
    }

    fn shutdown(since: Duration) -> KeeperInput {
        KeeperInput::Shutdown {
            start: true,
            kind: Some("poweroff".into()),
            since,
        }
    }

    #[test]
    fn the_holder_releases_at_its_deadline_when_the_worker_cannot() {
        let (mut k, t0) = keeper();
        let fx = k.handle(t0, shutdown(Duration::ZERO));
        assert!(fx.contains(&KeeperEffect::Tell(Tell::Shutdown {
            start: true,
            kind: Some("poweroff".into())
        })));
        // Budget 55 s, then half the margin (capped at 1 s) for the worker to act first.
        assert_eq!(
            k.next_wakeup(),
            Some(t0 + S(10)),
            "the heartbeat comes first"
        );
        k.handle(t0 + S(9), KeeperInput::WorkerAlive);
        let deadline = k.drain().unwrap().deadline;
        assert_eq!(deadline, t0 + S(56));
        assert!(deadline < t0 + S(60), "inside logind's cut");
        let fx = k.handle(deadline, KeeperInput::Tick);
        assert!(fx.contains(&KeeperEffect::Release { by_deadline: true }));
    }

    #[test]
    fn a_crashed_worker_is_restarted_at_once_and_resumes_the_drain() {
        let (mut k, t0) = keeper();
        k.handle(t0, shutdown(Duration::ZERO));
        let fx = k.handle(t0 + S(1), KeeperInput::WorkerExited);
        assert_eq!(fx, vec![KeeperEffect::SpawnWorker], "no release, no wait");
        let fx = k.handle(
            t0 + Duration::from_millis(1_050),
            KeeperInput::WorkerStarted,
        );
        assert_eq!(
            fx,
            vec![
                KeeperEffect::Tell(Tell::Lock {
                    delay_max: S(60),
                    preparing: true
                }),
                KeeperEffect::Tell(Tell::Resume {
                    kind: Some("poweroff".into()),
                    elapsed: Duration::from_millis(1_050)
                })
            ]
        );
        // A worker that keeps dying is restarted with backoff.
        k.handle(t0 + S(2), KeeperInput::WorkerExited);
        assert_eq!(
            k.next_wakeup(),
            Some(t0 + S(2) + Duration::from_millis(100))
        );
    }

    #[test]
    fn a_hung_worker_is_killed_and_replaced() {
        let (mut k, t0) = keeper();
        k.handle(t0, shutdown(Duration::ZERO));
        assert!(k.handle(t0 + S(9), KeeperInput::Tick).is_empty());
        let fx = k.handle(t0 + S(10), KeeperInput::Tick);
        assert_eq!(fx, vec![KeeperEffect::KillWorker]);
        assert_eq!(
            k.handle(t0 + S(10), KeeperInput::WorkerExited),
            vec![KeeperEffect::SpawnWorker]
        );
    }

    #[test]
    fn a_shutdown_that_did_not_happen_rearms_the_lock() {
        let (mut k, t0) = keeper();
        k.handle(t0, shutdown(Duration::ZERO));
        let fx = k.handle(t0 + S(3), KeeperInput::WorkerRelease);
        assert_eq!(fx, vec![KeeperEffect::Release { by_deadline: false }]);
        assert_eq!(k.next_wakeup(), Some(t0 + S(8)));
        // Still powering off: ask again later.
        assert_eq!(
            k.handle(t0 + S(8), KeeperInput::Tick),
            vec![KeeperEffect::AskPreparing]
        );
        assert!(k.handle(t0 + S(8), KeeperInput::Preparing(true)).is_empty());
        k.handle(t0 + S(12), KeeperInput::WorkerAlive);
        assert_eq!(
            k.handle(t0 + S(13), KeeperInput::Tick),
            vec![KeeperEffect::AskPreparing]
        );
        // logind gave up (poweroff.target masked): guard again and undo the cordon.
        let fx = k.handle(t0 + S(13), KeeperInput::Preparing(false));
        assert_eq!(
            fx,
            vec![
                KeeperEffect::Remember(None),
                KeeperEffect::Tell(Tell::Shutdown {
                    start: false,
                    kind: None
                }),
                KeeperEffect::TakeLock
            ]
        );
        assert!(k.drain().is_none());
    }

    #[test]
    fn a_lock_regained_while_the_released_shutdown_runs_is_let_go() {
        let (mut k, t0) = keeper();
        k.handle(t0, shutdown(Duration::ZERO));
        k.handle(t0 + S(1), KeeperInput::WorkerRelease);
        let fx = k.handle(t0 + S(2), KeeperInput::LockTaken { delay_max: S(60) });
        assert_eq!(fx, vec![KeeperEffect::Release { by_deadline: false }]);
    }

    #[test]
    fn sigterm_mid_drain_waits_for_the_drain() {
        let (mut k, t0) = keeper();
        k.handle(t0, shutdown(Duration::ZERO));
        assert!(
            !k.handle(t0 + S(1), KeeperInput::Terminate)
                .contains(&KeeperEffect::Exit)
        );
        let fx = k.handle(t0 + S(2), KeeperInput::WorkerRelease);
        assert_eq!(
            fx,
            vec![
                KeeperEffect::Release { by_deadline: false },
                KeeperEffect::Exit
            ]
        );
        let (mut idle, t1) = keeper();
        assert_eq!(
            idle.handle(t1, KeeperInput::Terminate),
            vec![KeeperEffect::Exit]
        );
    }

    #[test]
    fn started_late_drains_without_a_lock_from_when_the_shutdown_began() {
        let mut k = Keeper::new(KeeperConfig {
            safety_margin: S(5),
            deadline_override: None,
            rearm_after: S(5),
            heartbeat_timeout: S(10),
        });
        let t0 = Instant::now() + S(100);
        k.handle(t0, KeeperInput::WorkerStarted);
        let fx = k.handle(t0, KeeperInput::LockRefused { delay_max: S(60) });
        assert_eq!(
            fx,
            vec![KeeperEffect::Tell(Tell::NoLock { delay_max: S(60) })]
        );
        let fx = k.handle(t0, shutdown(S(20)));
        assert!(fx.contains(&KeeperEffect::Tell(Tell::Resume {
            kind: Some("poweroff".into()),
            elapsed: S(20)
        })));
        assert_eq!(k.drain().unwrap().deadline, t0 - S(20) + S(56));
        // Refused again while it lasts: told once.
        assert!(
            k.handle(t0 + S(1), KeeperInput::LockRefused { delay_max: S(60) })
                .is_empty()
        );
    }

    #[test]
    fn wakeups_are_never_in_the_past() {
        let (mut k, t0) = keeper();
        k.handle(t0, shutdown(Duration::ZERO));
        let mut now = t0;
        for _ in 0..50 {
            let Some(next) = k.next_wakeup() else { break };
            assert!(next > now);
            now = next;
            k.handle(now, KeeperInput::Tick);
            k.handle(now, KeeperInput::WorkerAlive);
        }
    }

    #[test]
    fn the_schedule_goes_to_the_worker_when_it_changes_and_to_every_new_worker() {
        let (mut k, t0) = keeper();
        let reboot = Schedule {
            kind: "reboot".into(),
            at: std::time::UNIX_EPOCH + S(1_796_031_672),
        };
        let told = |fx: &[KeeperEffect]| -> Vec<Tell> {
            fx.iter()
                .filter_map(|e| match e {
                    KeeperEffect::Tell(t @ Tell::Schedule(_)) => Some(t.clone()),
                    _ => None,
                })
                .collect()
        };
        let fx = k.handle(t0, KeeperInput::Scheduled(Some(reboot.clone())));
        assert_eq!(told(&fx), vec![Tell::Schedule(Some(reboot.clone()))]);
        // The same reading again (the poll) says nothing new.
        assert!(told(&k.handle(t0, KeeperInput::Scheduled(Some(reboot.clone())))).is_empty());
        k.handle(t0, KeeperInput::WorkerExited);
        let fx = k.handle(t0, KeeperInput::WorkerStarted);
        assert_eq!(told(&fx), vec![Tell::Schedule(Some(reboot))]);
        // Cancelled: said once; a new worker then hears nothing of it.
        assert_eq!(
            told(&k.handle(t0, KeeperInput::Scheduled(None))),
            vec![Tell::Schedule(None)]
        );
        k.handle(t0, KeeperInput::WorkerExited);
        assert!(told(&k.handle(t0, KeeperInput::WorkerStarted)).is_empty());
    }
}
