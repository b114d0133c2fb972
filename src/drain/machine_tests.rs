use std::time::{Duration, Instant};

use super::*;
use crate::drain::eviction::{EvictionOutcome, EvictionState};
use crate::drain::model::fixtures::*;
use crate::drain::model::{ObjKey, PodInfo, Scope, VmiInfo};

const NODE: &str = "node-1";

struct Bed {
    m: Machine,
    t0: Instant,
}

impl Bed {
    /// Lock held with `InhibitDelayMaxUSec = 30 s` and a 5 s margin: a 25 s budget.
    fn new(scope: Scope) -> Self {
        Self::with_lead(scope, None)
    }

    /// Scope `vms` with VMI `a` and its launcher pod listed, draining `lead` ahead of a
    /// scheduled shutdown, with or without turns.
    fn one_vmi(lead: Option<Duration>, take_turns: bool) -> (Self, VmiInfo, PodInfo) {
        let mut b = Self::configured(Scope::Vms, lead, take_turns);
        let a = vmi("a", NODE);
        let pa = launcher(&a, NODE);
        b.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
        (b, a, pa)
    }

    /// The same, draining `lead` ahead of a scheduled shutdown.
    fn with_lead(scope: Scope, lead: Option<Duration>) -> Self {
        Self::configured(scope, lead, false)
    }

    fn configured(scope: Scope, lead: Option<Duration>, take_turns: bool) -> Self {
        Self::build(MachineConfig {
            node: NODE.into(),
            scope,
            safety_margin: Duration::from_secs(5),
            deadline_override: None,
            pre_drain_lead: lead,
            take_turns,
            power_settle: None,
        })
    }

    /// Scope `vms`, judging power events with `settle`.
    fn powered(settle: Duration) -> Self {
        Self::build(MachineConfig {
            node: NODE.into(),
            scope: Scope::Vms,
            safety_margin: Duration::from_secs(5),
            deadline_override: None,
            pre_drain_lead: None,
            take_turns: false,
            power_settle: Some(settle),
        })
    }

    fn build(cfg: MachineConfig) -> Self {
        let mut m = Machine::new(cfg);
        let t0 = Instant::now();
        m.handle(
            t0,
            Input::LockTaken {
                delay_max: Duration::from_secs(30),
            },
        );
        Bed { m, t0 }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn feed(&mut self, ms: u64, i: Input) -> Vec<Effect> {
        let now = self.at(ms);
        self.m.handle(now, i)
    }

    fn list(&mut self, vmis: &[VmiInfo], pods: &[PodInfo]) {
        self.feed(0, Input::Vmis(WatchUpdate::Reset));
        for v in vmis {
            self.feed(0, Input::Vmis(WatchUpdate::Listed(v.clone())));
        }
        self.feed(0, Input::Vmis(WatchUpdate::Synced));
        self.feed(0, Input::Pods(WatchUpdate::Reset));
        for p in pods {
            self.feed(0, Input::Pods(WatchUpdate::Listed(p.clone())));
        }
        self.feed(0, Input::Pods(WatchUpdate::Synced));
    }

    /// Shutdown signal and our own cordon: returns what both sent besides the cordon itself.
    fn start(&mut self, ms: u64) -> Vec<Effect> {
        let mut fx = self.feed(
            ms,
            Input::Shutdown {
                start: true,
                kind: Some("poweroff".into()),
            },
        );
        assert_eq!(fx.first(), Some(&Effect::Cordon), "the cordon goes first");
        fx.remove(0);
        fx.extend(self.feed(ms, Input::Cordoned(CordonResult::CordonedByUs)));
        fx
    }
}

fn evicts(fx: &[Effect]) -> Vec<String> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Evict(p) => Some(p.key.name.clone()),
            _ => None,
        })
        .collect()
}

fn released(fx: &[Effect]) -> Option<(ReleaseReason, Vec<ObjKey>)> {
    fx.iter().find_map(|e| match e {
        Effect::ReleaseLock { reason, remaining } => Some((*reason, remaining.clone())),
        _ => None,
    })
}

fn stops(fx: &[Effect]) -> Vec<(String, u32, StopReason)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Stop {
                vmi,
                grace_seconds,
                why,
                ..
            } => Some((vmi.name.clone(), *grace_seconds, *why)),
            _ => None,
        })
        .collect()
}

#[test]
fn evictions_of_vmis_that_may_migrate_go_one_at_a_time_spaced_after_each_evacuation() {
    let mut b = Bed::new(Scope::Vms);
    let (a, c) = (vmi("a", NODE), vmi("c", NODE));
    let (pa, pc) = (launcher(&a, NODE), launcher(&c, NODE));
    b.list(&[a.clone(), c.clone()], &[pa.clone(), pc.clone()]);
    let fx = b.start(10);
    assert_eq!(evicts(&fx), vec!["virt-launcher-a-abcde"]);
    assert!(released(&fx).is_none());
    let answered = b.feed(
        25,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::Evacuating,
        },
    );
    assert!(evicts(&answered).is_empty(), "c waits for the spacing");
    assert_eq!(
        b.m.next_wakeup(),
        Some(b.at(25) + EVACUATION_SPACING),
        "the pace's end is a wakeup"
    );
    let early = b.feed(25 + EVACUATION_SPACING.as_millis() as u64 - 1, Input::Tick);
    assert!(evicts(&early).is_empty());
    let fx = b.feed(25 + EVACUATION_SPACING.as_millis() as u64, Input::Tick);
    assert_eq!(evicts(&fx), vec!["virt-launcher-c-abcde"]);
}

#[test]
fn an_eviction_kubevirt_lets_through_is_followed_at_once() {
    let mut b = Bed::new(Scope::Vms);
    let (a, c) = (vmi("a", NODE), vmi("c", NODE));
    let (pa, pc) = (launcher(&a, NODE), launcher(&c, NODE));
    b.list(&[a.clone(), c.clone()], &[pa.clone(), pc.clone()]);
    assert_eq!(evicts(&b.start(10)), vec!["virt-launcher-a-abcde"]);
    // Eviction strategy None: the VM stops, nothing for the evacuation controller to pace.
    let fx = b.feed(
        25,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::Evicted,
        },
    );
    assert_eq!(evicts(&fx), vec!["virt-launcher-c-abcde"]);
}

#[test]
fn vmis_known_not_migratable_are_evicted_without_the_pace() {
    let mut b = Bed::new(Scope::Vms);
    let mut stuck = vmi("a", NODE);
    stuck.live_migratable = Some(false);
    let (c, d) = (vmi("c", NODE), vmi("d", NODE));
    b.list(
        &[stuck.clone(), c.clone(), d.clone()],
        &[
            launcher(&stuck, NODE),
            launcher(&c, NODE),
            launcher(&d, NODE),
        ],
    );
    assert_eq!(
        evicts(&b.start(10)),
        vec!["virt-launcher-a-abcde", "virt-launcher-c-abcde"]
    );
}

#[test]
fn an_unanswered_eviction_holds_the_next_one_back_for_a_bounded_time() {
    let mut b = Bed::new(Scope::Vms);
    let (a, c) = (vmi("a", NODE), vmi("c", NODE));
    b.list(
        &[a.clone(), c.clone()],
        &[launcher(&a, NODE), launcher(&c, NODE)],
    );
    assert_eq!(evicts(&b.start(10)), vec!["virt-launcher-a-abcde"]);
    assert_eq!(b.m.next_wakeup(), Some(b.at(10) + PACED_ANSWER_WAIT));
    let fx = b.feed(10 + PACED_ANSWER_WAIT.as_millis() as u64, Input::Tick);
    assert_eq!(evicts(&fx), vec!["virt-launcher-c-abcde"]);
}

#[test]
fn evacuation_429_is_progress_not_retried() {
    let mut b = Bed::new(Scope::Vms);
    let a = vmi("a", NODE);
    let pa = launcher(&a, NODE);
    b.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
    b.start(0);
    let fx = b.feed(
        5,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::Evacuating,
        },
    );
    assert!(fx.is_empty(), "{fx:?}");
    assert_eq!(
        b.m.eviction_states().get(&pa.uid).copied(),
        Some(EvictionState::Evacuating)
    );
    // Nothing is due before the VMI's stop-by point (budget 25 s, grace 60 s → half: 12.5 s).
    assert_eq!(b.m.next_wakeup(), Some(b.at(12_500)));
    assert!(evicts(&b.feed(5_000, Input::Tick)).is_empty());
}

#[test]
fn other_429_and_5xx_retried_with_capped_backoff() {
    let mut b = Bed::new(Scope::Vms);
    let a = vmi("a", NODE);
    let pa = launcher(&a, NODE);
    b.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
    b.start(0);
    let mut now = 0;
    let mut waits = Vec::new();
    for _ in 0..7 {
        b.feed(
            now,
            Input::Evicted {
                pod: pa.pod_ref(),
                outcome: EvictionOutcome::Retry("503: unavailable".into()),
            },
        );
        let next = b.m.next_wakeup().unwrap();
        let wait = next.duration_since(b.at(now)).as_millis() as u64;
        waits.push(wait);
        assert!(evicts(&b.feed(now + wait - 1, Input::Tick)).is_empty());
        now += wait;
        assert_eq!(
            evicts(&b.feed(now, Input::Tick)),
            vec!["virt-launcher-a-abcde"]
        );
    }
    assert_eq!(waits, vec![100, 200, 400, 800, 1600, 2000, 2000]);
}

#[test]
fn eviction_404_means_done() {
    let mut b = Bed::new(Scope::Vms);
    let a = vmi("a", NODE);
    let pa = launcher(&a, NODE);
    b.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
    b.start(0);
    let fx = b.feed(
        3,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::Gone,
        },
    );
    assert!(fx.is_empty());
    assert_eq!(
        b.m.eviction_states().get(&pa.uid).copied(),
        Some(EvictionState::Gone)
    );
    // The VMI's end comes from its watch.
    let mut stopped = a.clone();
    stopped.phase = Some("Failed".into());
    let fx = b.feed(4, Input::Vmis(WatchUpdate::Applied(stopped)));
    assert_eq!(released(&fx), Some((ReleaseReason::Empty, vec![])));
}

#[test]
fn lock_released_exactly_when_the_last_vmi_leaves() {
    let mut b = Bed::new(Scope::Vms);
    let vs: Vec<VmiInfo> = ["a", "b", "c"].iter().map(|n| vmi(n, NODE)).collect();
    let ps: Vec<PodInfo> = vs.iter().map(|v| launcher(v, NODE)).collect();
    b.list(&vs, &ps);
    b.start(0);
    for p in &ps {
        b.feed(
            1,
            Input::Evicted {
                pod: p.pod_ref(),
                outcome: EvictionOutcome::Evacuating,
            },
        );
    }
    // a migrates: status shows the completed migration first, then the label moves and the
    // label-selected watch reports it deleted.
    let fx = b.feed(
        100,
        Input::Vmis(WatchUpdate::Applied(migrated(vs[0].clone(), "node-2"))),
    );
    assert!(released(&fx).is_none());
    b.feed(101, Input::Vmis(WatchUpdate::Deleted(vs[0].clone())));
    // b is deleted outright.
    let fx = b.feed(200, Input::Vmis(WatchUpdate::Deleted(vs[1].clone())));
    assert!(released(&fx).is_none());
    assert!(matches!(b.m.phase(), Phase::Draining(_)));
    // c: its source pod finishing is not enough…
    let mut done_pod = ps[2].clone();
    done_pod.phase = Some("Succeeded".into());
    assert!(released(&b.feed(300, Input::Pods(WatchUpdate::Applied(done_pod)))).is_none());
    // …the VMI leaving the node is.
    let mut moved = vs[2].clone();
    moved.node_name = Some("node-2".into());
    let fx = b.feed(301, Input::Vmis(WatchUpdate::Applied(moved)));
    assert_eq!(released(&fx), Some((ReleaseReason::Empty, vec![])));
    assert!(!b.m.lock_held());
    assert!(
        matches!(b.m.phase(), Phase::Released { reason: ReleaseReason::Empty, at, .. } if *at == b.at(301))
    );
    // Nothing further once released.
    assert!(b.feed(400, Input::Tick).is_empty());
    assert_eq!(b.m.next_wakeup(), None);
}

#[test]
fn empty_node_released_once_cordoned_and_not_before_watches_synced() {
    let mut b = Bed::new(Scope::Vms);
    let fx = b.feed(
        0,
        Input::Shutdown {
            start: true,
            kind: None,
        },
    );
    assert_eq!(fx, vec![Effect::Cordon]);
    // Cordon settled but the VMI watch has not listed yet: the node is not known to be empty.
    let fx = b.feed(1, Input::Cordoned(CordonResult::CordonedByUs));
    assert!(released(&fx).is_none());
    b.feed(2, Input::Vmis(WatchUpdate::Reset));
    let fx = b.feed(3, Input::Vmis(WatchUpdate::Synced));
    assert_eq!(released(&fx), Some((ReleaseReason::Empty, vec![])));
}

#[test]
fn the_node_counts_as_listed_once_both_watches_have_synced() {
    let mut b = Bed::new(Scope::Vms);
    let a = vmi("a", NODE);
    assert_eq!(b.m.listed(), None);
    b.feed(0, Input::Vmis(WatchUpdate::Reset));
    b.feed(0, Input::Vmis(WatchUpdate::Listed(a.clone())));
    b.feed(0, Input::Vmis(WatchUpdate::Synced));
    assert_eq!(b.m.listed(), None, "the pods are not listed yet");
    b.feed(0, Input::Pods(WatchUpdate::Reset));
    b.feed(0, Input::Pods(WatchUpdate::Listed(launcher(&a, NODE))));
    b.feed(0, Input::Pods(WatchUpdate::Synced));
    assert_eq!(b.m.listed(), Some((1, 1)));
}

#[test]
fn a_vmis_launcher_follows_the_pod_watch() {
    let mut b = Bed::new(Scope::Vms);
    let a = vmi("a", NODE);
    let pa = launcher(&a, NODE);
    b.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
    assert_eq!(b.m.launcher(&a.uid), Some(&pa));
    // A second launcher of the same VMI here (a migration target): the first by name counts.
    let mut early = launcher(&a, NODE);
    early.uid = "uid-pod-a-early".into();
    early.key.name = "virt-launcher-a-0000".into();
    b.feed(1, Input::Pods(WatchUpdate::Applied(early.clone())));
    assert_eq!(b.m.launcher(&a.uid), Some(&early));
    b.feed(2, Input::Pods(WatchUpdate::Deleted(early)));
    assert_eq!(b.m.launcher(&a.uid), Some(&pa));
    let mut done = pa.clone();
    done.phase = Some("Succeeded".into());
    b.feed(3, Input::Pods(WatchUpdate::Applied(done)));
    assert_eq!(b.m.launcher(&a.uid), None, "a finished pod is no launcher");
}

#[test]
fn relist_does_not_empty_the_node_early() {
    let mut b = Bed::new(Scope::Vms);
    let a = vmi("a", NODE);
    b.list(std::slice::from_ref(&a), &[launcher(&a, NODE)]);
    b.start(0);
    // A re-list in progress: nothing listed yet must not look like an empty node.
    assert!(released(&b.feed(10, Input::Vmis(WatchUpdate::Reset))).is_none());
    assert!(released(&b.feed(11, Input::Vmis(WatchUpdate::Listed(a.clone())))).is_none());
    assert!(released(&b.feed(12, Input::Vmis(WatchUpdate::Synced))).is_none());
    assert_eq!(b.m.remaining_vmis(), vec![a.key.clone()]);
}

#[test]
fn stuck_vmi_stopped_at_its_stop_by_point() {
    let mut b = Bed::new(Scope::Vms);
    let a = vmi("a", NODE);
    let mut pa = launcher(&a, NODE);
    pa.grace_seconds = 10;
    b.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
    b.start(0);
    b.feed(
        5,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::Evacuating,
        },
    );
    // The migration keeps failing; KubeVirt retries it, we wait.
    let mut failing = a.clone();
    failing.migration = Some(crate::drain::model::MigrationState {
        source_node: Some(NODE.into()),
        target_node: Some("node-2".into()),
        target_pod: None,
        completed: false,
        failed: true,
    });
    assert!(
        b.feed(3_000, Input::Vmis(WatchUpdate::Applied(failing)))
            .is_empty()
    );
    // Deadline 25 s, grace 10 s: stop-by at 15 s.
    assert_eq!(b.m.next_wakeup(), Some(b.at(15_000)));
    assert!(stops(&b.feed(14_999, Input::Tick)).is_empty());
    let fx = b.feed(15_000, Input::Tick);
    assert_eq!(stops(&fx), vec![("a".into(), 10, StopReason::StopBy)]);
    // Not sent twice while in flight or once done.
    assert!(stops(&b.feed(15_001, Input::Tick)).is_empty());
    b.feed(
        15_010,
        Input::Stopped {
            vmi_uid: a.uid.clone(),
            result: Ok(()),
        },
    );
    assert!(stops(&b.feed(16_000, Input::Tick)).is_empty());
    let mut gone = a.clone();
    gone.phase = Some("Succeeded".into());
    let fx = b.feed(20_000, Input::Vmis(WatchUpdate::Applied(gone)));
    assert_eq!(released(&fx), Some((ReleaseReason::Empty, vec![])));
}

#[test]
fn long_grace_is_shortened_to_fit_and_never_before_half_the_budget() {
    let mut b = Bed::new(Scope::Vms);
    let a = vmi("a", NODE);
    let pa = launcher(&a, NODE); // 60 s grace > 25 s budget
    b.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
    b.start(0);
    assert!(stops(&b.feed(12_499, Input::Tick)).is_empty());
    let fx = b.feed(12_500, Input::Tick);
    assert_eq!(stops(&fx), vec![("a".into(), 12, StopReason::StopBy)]);
}

#[test]
fn not_migratable_vmi_stopped_at_once_and_failed_stop_retried() {
    let mut b = Bed::new(Scope::Vms);
    let mut a = vmi("a", NODE);
    a.live_migratable = Some(false);
    let mut pa = launcher(&a, NODE);
    pa.grace_seconds = 10;
    b.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
    b.start(0);
    let fx = b.feed(
        5,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::NotMigratable,
        },
    );
    assert_eq!(
        stops(&fx),
        vec![("a".into(), 10, StopReason::NotMigratable)]
    );
    b.feed(
        8,
        Input::Stopped {
            vmi_uid: a.uid.clone(),
            result: Err("503".into()),
        },
    );
    assert!(stops(&b.feed(107, Input::Tick)).is_empty());
    assert_eq!(stops(&b.feed(108, Input::Tick)).len(), 1);
}

#[test]
fn deadline_releases_with_a_warning_naming_what_is_left() {
    let mut b = Bed::new(Scope::Vms);
    let a = vmi("a", NODE);
    let pa = launcher(&a, NODE);
    b.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
    b.start(0);
    b.feed(
        1,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::Evacuating,
        },
    );
    b.feed(12_500, Input::Tick);
    b.feed(
        12_510,
        Input::Stopped {
            vmi_uid: a.uid.clone(),
            result: Ok(()),
        },
    );
    assert_eq!(b.m.next_wakeup(), Some(b.at(25_000)));
    assert!(released(&b.feed(24_999, Input::Tick)).is_none());
    let fx = b.feed(25_000, Input::Tick);
    assert_eq!(
        released(&fx),
        Some((ReleaseReason::Deadline, vec![a.key.clone()]))
    );
    assert!(
        matches!(&fx[0], Effect::ReleaseLock { .. }),
        "release first"
    );
    assert!(fx.iter().any(|e| matches!(e,
        Effect::Warn { reason: "ShutdownDeadlineReached", note } if note.contains("default/a"))));
}

#[test]
fn deadline_override_and_margin_rules() {
    let s = Duration::from_secs;
    assert_eq!(drain_budget(Some(s(30)), s(5), None), s(25));
    assert_eq!(drain_budget(Some(s(30)), s(5), Some(s(8))), s(8));
    assert_eq!(drain_budget(None, s(1), None), s(4));
    assert_eq!(drain_budget(Some(s(4)), s(5), None), s(2));
}

#[test]
fn cancel_uncordons_when_we_cordoned_and_takes_a_new_lock() {
    let mut b = Bed::new(Scope::Vms);
    let a = vmi("a", NODE);
    b.list(std::slice::from_ref(&a), &[launcher(&a, NODE)]);
    b.start(0);
    assert!(b.m.cordoned_by_us());
    let fx = b.feed(
        1_000,
        Input::Shutdown {
            start: false,
            kind: None,
        },
    );
    assert_eq!(fx, vec![Effect::Uncordon]);
    assert!(matches!(b.m.phase(), Phase::Idle));
    assert!(b.feed(1_010, Input::Uncordoned(Ok(()))).is_empty());
    assert!(!b.m.cordoned_by_us());
    // Eviction answers arriving late are ignored.
    assert!(
        b.feed(
            1_020,
            Input::Evicted {
                pod: launcher(&a, NODE).pod_ref(),
                outcome: EvictionOutcome::Retry("x".into())
            }
        )
        .is_empty()
    );
    assert_eq!(b.m.next_wakeup(), None);
}

#[test]
fn cancel_after_release_retakes_the_lock() {
    let mut b = Bed::new(Scope::Vms);
    b.list(&[], &[]);
    let fx = b.start(0);
    assert!(released(&fx).is_some());
    let fx = b.feed(
        50,
        Input::Shutdown {
            start: false,
            kind: None,
        },
    );
    assert_eq!(fx, vec![Effect::Uncordon, Effect::TakeLock]);
}

#[test]
fn admin_cordoned_node_is_not_uncordoned_on_cancel() {
    let mut b = Bed::new(Scope::Vms);
    let a = vmi("a", NODE);
    b.list(std::slice::from_ref(&a), &[launcher(&a, NODE)]);
    let mut fx = b.feed(
        0,
        Input::Shutdown {
            start: true,
            kind: None,
        },
    );
    fx.extend(b.feed(1, Input::Cordoned(CordonResult::AlreadyUnschedulable)));
    assert_eq!(evicts(&fx).len(), 1);
    let fx = b.feed(
        2,
        Input::Shutdown {
            start: false,
            kind: None,
        },
    );
    assert!(fx.is_empty(), "{fx:?}");
}

#[test]
fn cancel_while_cordon_in_flight_undoes_it_when_it_lands() {
    let mut b = Bed::new(Scope::Vms);
    b.list(&[vmi("a", NODE)], &[]);
    b.feed(
        0,
        Input::Shutdown {
            start: true,
            kind: None,
        },
    );
    b.feed(
        1,
        Input::Shutdown {
            start: false,
            kind: None,
        },
    );
    let fx = b.feed(2, Input::Cordoned(CordonResult::CordonedByUs));
    assert_eq!(fx, vec![Effect::Uncordon]);
}

#[test]
fn agent_restarted_in_same_boot_still_uncordons_on_cancel() {
    let mut b = Bed::new(Scope::Vms);
    b.list(&[vmi("a", NODE)], &[]);
    b.feed(0, Input::CordonedThisBoot);
    b.feed(
        1,
        Input::Shutdown {
            start: true,
            kind: None,
        },
    );
    b.feed(2, Input::Cordoned(CordonResult::AlreadyUnschedulable));
    let fx = b.feed(
        3,
        Input::Shutdown {
            start: false,
            kind: None,
        },
    );
    assert_eq!(fx, vec![Effect::Uncordon]);
}

#[test]
fn duplicate_signal_with_metadata_keeps_one_drain_and_records_type() {
    let mut b = Bed::new(Scope::Vms);
    b.list(&[vmi("a", NODE)], &[]);
    b.feed(
        0,
        Input::Shutdown {
            start: true,
            kind: None,
        },
    );
    let fx = b.feed(
        1,
        Input::Shutdown {
            start: true,
            kind: Some("reboot".into()),
        },
    );
    assert!(fx.is_empty());
    let Phase::Draining(d) = b.m.phase() else {
        panic!()
    };
    assert_eq!(d.kind.as_deref(), Some("reboot"));
    assert_eq!(d.started, b.at(0));
}

#[test]
fn terminate_when_idle_or_draining() {
    let mut b = Bed::new(Scope::Vms);
    let a = vmi("a", NODE);
    b.list(std::slice::from_ref(&a), &[launcher(&a, NODE)]);
    assert_eq!(
        b.feed(0, Input::Terminate),
        vec![Effect::Exit {
            draining: false,
            remaining: vec![]
        }]
    );
    b.start(1);
    assert_eq!(
        b.feed(2, Input::Terminate),
        vec![Effect::Exit {
            draining: true,
            remaining: vec![a.key.clone()]
        }]
    );
}

#[test]
fn scope_all_evicts_vms_first_then_other_pods_and_waits_for_them() {
    let mut b = Bed::new(Scope::All);
    let a = vmi("a", NODE);
    let pa = launcher(&a, NODE);
    let web = owned_by(pod("web-1", NODE), "ReplicaSet");
    let bare = pod("bare", NODE);
    let ds = owned_by(pod("handler", NODE), "DaemonSet");
    b.list(
        std::slice::from_ref(&a),
        &[pa.clone(), web.clone(), bare.clone(), ds.clone()],
    );
    let fx = b.start(0);
    assert_eq!(evicts(&fx), vec!["virt-launcher-a-abcde"]);
    b.feed(
        1,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::Evacuating,
        },
    );
    // The VMI leaves: now the other pods go; the DaemonSet pod stays.
    let fx = b.feed(
        500,
        Input::Vmis(WatchUpdate::Applied(migrated(a.clone(), "node-2"))),
    );
    assert!(released(&fx).is_none());
    assert_eq!(evicts(&fx), vec!["bare", "web-1"]);
    for p in [&web, &bare] {
        b.feed(
            510,
            Input::Evicted {
                pod: p.pod_ref(),
                outcome: EvictionOutcome::Evicted,
            },
        );
    }
    assert!(released(&b.feed(600, Input::Pods(WatchUpdate::Deleted(web)))).is_none());
    let fx = b.feed(700, Input::Pods(WatchUpdate::Deleted(bare)));
    assert_eq!(released(&fx), Some((ReleaseReason::Empty, vec![])));
}

#[test]
fn scope_all_starts_other_pods_at_half_budget_if_vms_linger() {
    let mut b = Bed::new(Scope::All);
    let a = vmi("a", NODE);
    let pa = launcher(&a, NODE);
    let bare = pod("bare", NODE);
    b.list(std::slice::from_ref(&a), &[pa.clone(), bare]);
    b.start(0);
    b.feed(
        1,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::Evacuating,
        },
    );
    assert!(evicts(&b.feed(12_499, Input::Tick)).is_empty());
    assert_eq!(evicts(&b.feed(12_500, Input::Tick)), vec!["bare"]);
}

#[test]
fn launcher_appearing_mid_drain_is_evicted_too() {
    let mut b = Bed::new(Scope::Vms);
    b.list(&[], &[]);
    let a = vmi("a", NODE);
    // The node had a VMI scheduled just as the shutdown started.
    b.feed(0, Input::Vmis(WatchUpdate::Applied(a.clone())));
    b.start(1);
    let fx = b.feed(50, Input::Pods(WatchUpdate::Applied(launcher(&a, NODE))));
    assert_eq!(evicts(&fx), vec!["virt-launcher-a-abcde"]);
}

#[test]
fn deadline_note_lists_a_bounded_number_of_names() {
    let mut b = Bed::new(Scope::Vms);
    let vs: Vec<VmiInfo> = (0..40).map(|i| vmi(&format!("vm-{i:02}"), NODE)).collect();
    b.list(&vs, &[]);
    b.start(0);
    let fx = b.feed(25_000, Input::Tick);
    let note = fx
        .iter()
        .find_map(|e| match e {
            Effect::Warn { note, .. } => Some(note.clone()),
            _ => None,
        })
        .unwrap();
    assert!(note.ends_with("and 28 more"), "{note}");
    assert!(note.len() < 1024);
}

#[test]
fn launchers_go_with_the_cordon_in_flight_other_pods_wait_for_it() {
    let mut b = Bed::new(Scope::All);
    let a = vmi("a", NODE);
    let web = pod("web", NODE);
    b.list(std::slice::from_ref(&a), &[launcher(&a, NODE), web.clone()]);
    let fx = b.feed(
        0,
        Input::Shutdown {
            start: true,
            kind: None,
        },
    );
    assert_eq!(fx.first(), Some(&Effect::Cordon));
    assert_eq!(evicts(&fx), vec!["virt-launcher-a-abcde"]);
    // The VM is gone before the cordon answers: still no release, and the web pod waits.
    let fx = b.feed(3, Input::Vmis(WatchUpdate::Deleted(a.clone())));
    assert!(
        released(&fx).is_none(),
        "released before the cordon landed: {fx:?}"
    );
    assert!(evicts(&fx).is_empty());
    let fx = b.feed(5, Input::Cordoned(CordonResult::CordonedByUs));
    assert_eq!(
        evicts(&fx),
        vec!["web"],
        "the launcher is not evicted twice"
    );
}

#[test]
fn the_record_of_a_drain_counts_the_departure_that_ended_it() {
    let mut b = Bed::new(Scope::Vms);
    let (a, c) = (vmi("a", NODE), vmi("c", NODE));
    b.list(
        &[a.clone(), c.clone()],
        &[launcher(&a, NODE), launcher(&c, NODE)],
    );
    b.start(0);
    b.m.take_notes();
    b.feed(
        100,
        Input::Vmis(WatchUpdate::Deleted(migrated(a, "node-2"))),
    );
    let mut stopped = c.clone();
    stopped.phase = Some("Succeeded".into());
    let fx = b.feed(200, Input::Vmis(WatchUpdate::Applied(stopped)));
    assert!(released(&fx).is_some());
    let notes = b.m.take_notes();
    let end = notes
        .iter()
        .find_map(|n| match n {
            Note::Ended(e) => Some(e.clone()),
            _ => None,
        })
        .expect("the release is recorded");
    assert_eq!((end.migrated, end.stopped), (1, 1), "{notes:?}");
    assert_eq!(end.elapsed, Duration::from_millis(200));
    assert!(
        notes
            .iter()
            .any(|n| matches!(n, Note::VmiLeft { vmi, left: 0, .. } if vmi.name == "c"))
    );
}

#[test]
fn the_budget_grows_with_loginds_delay_and_a_longer_deadline_is_capped_to_it() {
    let s = Duration::from_secs;
    for margin in [s(0), s(1), s(5), s(30)] {
        let mut last = Duration::ZERO;
        for delay_ms in (0..=700_000u64).step_by(250) {
            let b = drain_budget(Some(Duration::from_millis(delay_ms)), margin, None);
            assert!(
                b >= last,
                "delay {delay_ms} ms, margin {margin:?}: {b:?} < {last:?}"
            );
            assert!(b <= Duration::from_millis(delay_ms));
            last = b;
        }
    }
    // Today's sharp edge: 5 s gave 2.5 s and 6 s gave 1 s.
    assert_eq!(
        drain_budget(Some(s(5)), s(5), None),
        Duration::from_millis(2500)
    );
    assert_eq!(drain_budget(Some(s(6)), s(5), None), s(3));
    // An override beyond what logind allows is cut down and says so; a shorter one stands.
    assert_eq!(budget_of(Some(s(60)), s(5), Some(s(90))), (s(55), true));
    assert_eq!(budget_of(Some(s(60)), s(5), Some(s(30))), (s(30), false));
    // The drain command has no logind: its timeout stands.
    assert_eq!(budget_of(None, s(0), Some(s(3600))), (s(3600), false));
}

#[test]
fn a_deadline_beyond_logind_is_capped_with_a_warning() {
    let mut m = Machine::new(MachineConfig {
        node: NODE.into(),
        scope: Scope::Vms,
        safety_margin: Duration::from_secs(5),
        deadline_override: Some(Duration::from_secs(600)),
        pre_drain_lead: None,
        take_turns: false,
        power_settle: None,
    });
    let t0 = Instant::now();
    m.handle(
        t0,
        Input::LockTaken {
            delay_max: Duration::from_secs(60),
        },
    );
    let fx = m.handle(
        t0,
        Input::Shutdown {
            start: true,
            kind: None,
        },
    );
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Warn {
            reason: "DeadlineCapped",
            ..
        }
    )));
    let Phase::Draining(d) = m.phase() else {
        panic!()
    };
    assert_eq!(d.deadline - d.started, Duration::from_secs(55));
}

#[test]
fn logind_delay_read_at_the_shutdown_sets_the_deadline() {
    let mut b = Bed::new(Scope::Vms);
    b.list(&[vmi("a", NODE)], &[]);
    // logind was reloaded with a shorter delay after the lock was taken.
    b.feed(0, Input::DelayMax(Duration::from_secs(12)));
    b.start(0);
    let Phase::Draining(d) = b.m.phase() else {
        panic!()
    };
    assert_eq!(d.deadline, b.at(7_000));
}

#[test]
fn a_booting_vmi_is_asked_again_and_migrates_once_it_runs() {
    let mut b = Bed::new(Scope::Vms);
    let mut a = vmi("a", NODE);
    a.live_migratable = None;
    a.phase = Some("Scheduled".into());
    let pa = launcher(&a, NODE);
    b.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
    b.start(0);
    let fx = b.feed(
        5,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::NotMigratable,
        },
    );
    assert!(stops(&fx).is_empty(), "a booting VM is not stopped: {fx:?}");
    assert_eq!(
        b.m.eviction_states().get(&pa.uid).copied(),
        Some(EvictionState::Retrying)
    );
    // It runs and reports itself migratable; the retried eviction starts its evacuation.
    let mut running = a.clone();
    running.phase = Some("Running".into());
    running.live_migratable = Some(true);
    b.feed(50, Input::Vmis(WatchUpdate::Applied(running)));
    assert_eq!(
        evicts(&b.feed(105, Input::Tick)),
        vec!["virt-launcher-a-abcde"]
    );
    let fx = b.feed(
        110,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::Evacuating,
        },
    );
    assert!(stops(&fx).is_empty());
    // Its stop-by point is the same as any other VMI's: only there is it stopped.
    assert!(stops(&b.feed(12_499, Input::Tick)).is_empty());
}

#[test]
fn a_migration_into_the_node_is_cancelled_and_the_lock_waits_for_it() {
    let mut b = Bed::new(Scope::Vms);
    let incoming = vmi("in", "node-2");
    let target = target_pod(&incoming, NODE);
    b.list(
        std::slice::from_ref(&incoming),
        std::slice::from_ref(&target),
    );
    let fx = b.start(0);
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::CancelMigration { pod, job }
            if pod.uid == target.uid && job.name.as_deref() == Some("vmim-in"))),
        "{fx:?}"
    );
    assert!(released(&fx).is_none(), "a VM is being handed to this node");
    // Cancelling failed: asked again after the backoff.
    b.feed(
        10,
        Input::MigrationCancelled {
            pod_uid: target.uid.clone(),
            result: Err("503".into()),
        },
    );
    let fx = b.feed(110, Input::Tick);
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::CancelMigration { .. }))
    );
    b.feed(
        120,
        Input::MigrationCancelled {
            pod_uid: target.uid.clone(),
            result: Ok(()),
        },
    );
    assert!(released(&b.feed(130, Input::Tick)).is_none());
    // KubeVirt tears the target down: the node is empty.
    let fx = b.feed(500, Input::Pods(WatchUpdate::Deleted(target)));
    assert_eq!(released(&fx), Some((ReleaseReason::Empty, vec![])));
}

#[test]
fn a_migration_that_completes_into_the_node_is_then_evicted() {
    let mut b = Bed::new(Scope::Vms);
    let incoming = vmi("in", "node-2");
    let target = target_pod(&incoming, NODE);
    b.list(
        std::slice::from_ref(&incoming),
        std::slice::from_ref(&target),
    );
    b.start(0);
    // Too late to cancel: the VM arrives.
    let mut arrived = migrated(incoming, NODE);
    arrived.node_name = Some(NODE.into());
    arrived.label_node = Some(NODE.into());
    arrived.migration = None;
    let fx = b.feed(300, Input::Vmis(WatchUpdate::Applied(arrived)));
    assert_eq!(evicts(&fx), vec!["virt-launcher-in-target"]);
}

#[test]
fn wakeups_are_never_in_the_past() {
    // Scope all with a pod a PDB refuses for ever, a VMI whose launcher pod is gone past its
    // stop-by point, an eviction retry of a pod that left: nothing may make the loop spin.
    let mut b = Bed::new(Scope::All);
    let a = vmi("a", NODE);
    let lost = vmi("lost", NODE);
    let pa = launcher(&a, NODE);
    let blocked = pod("blocked", NODE);
    b.list(&[a.clone(), lost], &[pa.clone(), blocked.clone()]);
    b.start(0);
    b.feed(
        1,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::Retry("503".into()),
        },
    );
    b.feed(2, Input::Pods(WatchUpdate::Deleted(pa)));
    let mut now = 2;
    let mut wakeups = 0;
    while let Some(next) = b.m.next_wakeup() {
        assert!(next > b.at(now), "wake-up at {next:?} not after {now} ms");
        now = next.duration_since(b.t0).as_millis() as u64;
        wakeups += 1;
        assert!(
            wakeups < 100,
            "the loop spins: {wakeups} wake-ups by {now} ms"
        );
        for e in b.feed(now, Input::Tick) {
            if let Effect::Evict(p) = e {
                b.feed(
                    now,
                    Input::Evicted {
                        pod: p,
                        outcome: EvictionOutcome::Retry(
                            "429: Cannot evict pod as it would violate the pod's disruption budget."
                                .into(),
                        ),
                    },
                );
            }
        }
    }
    assert_eq!(now, 25_000, "the deadline ends it");
    assert!(wakeups < 30, "{wakeups} wake-ups in a 25 s drain");
}

#[test]
fn a_failing_cordon_is_retried_and_holds_nothing_back_past_its_grace() {
    let mut b = Bed::new(Scope::Vms);
    let mut a = vmi("a", NODE);
    a.live_migratable = Some(false);
    let pa = launcher(&a, NODE);
    b.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
    let fx = b.feed(
        0,
        Input::Shutdown {
            start: true,
            kind: None,
        },
    );
    assert_eq!(
        evicts(&fx),
        vec!["virt-launcher-a-abcde"],
        "launchers go with the cordon"
    );
    b.feed(
        3,
        Input::Cordoned(CordonResult::Failed("connection refused".into())),
    );
    let fx = b.feed(
        5,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::NotMigratable,
        },
    );
    assert!(
        stops(&fx).is_empty(),
        "within the grace the stop waits for the cordon"
    );
    assert_eq!(
        b.feed(103, Input::Tick),
        vec![Effect::Cordon],
        "retried after 100 ms"
    );
    b.feed(110, Input::Cordoned(CordonResult::Failed("timeout".into())));
    let fx = b.feed(2_000, Input::Tick);
    assert!(fx.contains(&Effect::Cordon), "{fx:?}");
    assert_eq!(stops(&fx).len(), 1, "past the grace the stop goes: {fx:?}");
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Warn {
            reason: "CordonNotConfirmed",
            ..
        }
    )));
    let fx = b.feed(
        2_100,
        Input::Cordoned(CordonResult::Failed("timeout".into())),
    );
    assert!(
        !fx.iter().any(|e| matches!(e, Effect::Warn { .. })),
        "told once"
    );
    let mut gone = a.clone();
    gone.phase = Some("Succeeded".into());
    let fx = b.feed(3_000, Input::Vmis(WatchUpdate::Applied(gone)));
    assert_eq!(
        released(&fx),
        Some((ReleaseReason::Empty, vec![])),
        "the cordon does not hold the release"
    );
}

#[test]
fn a_shutdown_right_after_a_cancel_cordons_only_once_the_uncordon_landed() {
    let mut b = Bed::new(Scope::Vms);
    let a = vmi("a", NODE);
    b.list(std::slice::from_ref(&a), &[launcher(&a, NODE)]);
    b.start(0);
    let fx = b.feed(
        100,
        Input::Shutdown {
            start: false,
            kind: None,
        },
    );
    assert_eq!(fx, vec![Effect::Uncordon]);
    let fx = b.feed(
        110,
        Input::Shutdown {
            start: true,
            kind: None,
        },
    );
    assert!(
        !fx.contains(&Effect::Cordon),
        "the uncordon may still land: {fx:?}"
    );
    assert_eq!(evicts(&fx), vec!["virt-launcher-a-abcde"]);
    let fx = b.feed(120, Input::Uncordoned(Ok(())));
    assert_eq!(fx, vec![Effect::Cordon]);
    assert!(!b.m.cordoned_by_us());
    b.feed(130, Input::Cordoned(CordonResult::CordonedByUs));
    assert!(b.m.cordoned_by_us());
}

#[test]
fn a_failed_uncordon_is_retried_until_it_lands() {
    let mut b = Bed::new(Scope::Vms);
    b.list(&[vmi("a", NODE)], &[]);
    b.start(0);
    assert_eq!(
        b.feed(
            10,
            Input::Shutdown {
                start: false,
                kind: None
            }
        ),
        vec![Effect::Uncordon]
    );
    b.feed(20, Input::Uncordoned(Err("503".into())));
    assert_eq!(b.m.next_wakeup(), Some(b.at(120)));
    assert_eq!(b.feed(120, Input::Tick), vec![Effect::Uncordon]);
    b.feed(130, Input::Uncordoned(Ok(())));
    assert_eq!(b.m.next_wakeup(), None);
    assert!(!b.m.cordoned_by_us());
}

#[test]
fn a_cancel_stops_the_evacuations_the_drain_started() {
    let mut b = Bed::new(Scope::Vms);
    let (a, c) = (vmi("a", NODE), vmi("c", NODE));
    let (pa, pc) = (launcher(&a, NODE), launcher(&c, NODE));
    b.list(&[a, c], &[pa.clone(), pc.clone()]);
    b.start(0);
    b.feed(
        5,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::Evacuating,
        },
    );
    b.feed(
        5,
        Input::Evicted {
            pod: pc.pod_ref(),
            outcome: EvictionOutcome::Retry("x".into()),
        },
    );
    let fx = b.feed(
        50,
        Input::Shutdown {
            start: false,
            kind: None,
        },
    );
    assert_eq!(
        fx,
        vec![
            Effect::Uncordon,
            Effect::CancelEvacuation {
                vmi: ObjKey::new("default", "a")
            }
        ]
    );
}

#[test]
fn a_resumed_drain_keeps_its_deadline() {
    let mut b = Bed::new(Scope::Vms);
    b.list(&[vmi("a", NODE)], &[]);
    let fx = b.feed(
        10_000,
        Input::Resume {
            kind: Some("poweroff".into()),
            elapsed: Duration::from_secs(4),
        },
    );
    assert_eq!(fx.first(), Some(&Effect::Cordon));
    let Phase::Draining(d) = b.m.phase() else {
        panic!()
    };
    assert_eq!(d.started, b.at(6_000));
    assert_eq!(d.deadline, b.at(31_000));
}

#[test]
fn hotplug_pods_are_not_evicted_while_their_vm_runs() {
    let mut b = Bed::new(Scope::All);
    let a = vmi("a", NODE);
    let pa = launcher(&a, NODE);
    let hp = hotplug(&pa);
    b.list(std::slice::from_ref(&a), &[pa.clone(), hp]);
    let fx = b.start(0);
    assert_eq!(evicts(&fx), vec!["virt-launcher-a-abcde"]);
    let fx = b.feed(12_500, Input::Tick);
    assert!(evicts(&fx).is_empty(), "{fx:?}");
}

#[test]
fn a_scheduled_shutdown_is_noted_once_per_change_and_shown_in_the_snapshot() {
    let mut b = Bed::new(Scope::Vms);
    let reboot = crate::drain::model::Schedule {
        kind: "reboot".into(),
        at: std::time::UNIX_EPOCH + Duration::from_secs(1_796_031_672),
    };
    let scheduled = |m: &mut Machine| -> Vec<(Option<String>, Option<String>)> {
        m.take_notes()
            .into_iter()
            .filter_map(|n| match n {
                Note::Scheduled { now, was } => Some((now.map(|s| s.kind), was.map(|s| s.kind))),
                _ => None,
            })
            .collect()
    };
    b.m.take_notes();
    let due_in = Duration::from_secs(600);
    b.feed(
        10,
        Input::Schedule {
            schedule: Some(reboot.clone()),
            due_in,
        },
    );
    assert_eq!(scheduled(&mut b.m), vec![(Some("reboot".into()), None)]);
    assert_eq!(b.m.snapshot(b.at(10)).scheduled, Some(reboot.clone()));
    b.feed(
        20,
        Input::Schedule {
            schedule: Some(reboot),
            due_in,
        },
    );
    assert!(scheduled(&mut b.m).is_empty(), "the same schedule again");
    b.feed(
        30,
        Input::Schedule {
            schedule: None,
            due_in: Duration::ZERO,
        },
    );
    assert_eq!(scheduled(&mut b.m), vec![(None, Some("reboot".into()))]);
    assert_eq!(b.m.snapshot(b.at(30)).scheduled, None);
}

fn schedule(kind: &str, due_in_s: u64) -> Input {
    Input::Schedule {
        schedule: Some(crate::drain::model::Schedule {
            kind: kind.into(),
            at: std::time::UNIX_EPOCH + Duration::from_secs(1_796_031_672),
        }),
        due_in: Duration::from_secs(due_in_s),
    }
}

fn unscheduled() -> Input {
    Input::Schedule {
        schedule: None,
        due_in: Duration::ZERO,
    }
}

fn warned(fx: &[Effect]) -> Vec<&'static str> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Warn { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

fn pre_drained(m: &mut Machine) -> Vec<(String, Duration)> {
    m.take_notes()
        .into_iter()
        .filter_map(|n| match n {
            Note::PreDrained { kind, ahead } => Some((kind, ahead)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_scheduled_reboot_is_drained_its_lead_ahead_and_its_shutdown_then_released_at_once() {
    let (mut b, a, _) = Bed::one_vmi(Some(Duration::from_secs(60)), false);
    // Due in 100 s: the pre-drain starts at 40 s.
    let fx = b.feed(0, schedule("reboot", 100));
    assert!(fx.is_empty(), "too early to drain: {fx:?}");
    assert_eq!(b.m.next_wakeup(), Some(b.at(40_000)));
    let fx = b.feed(40_000, Input::Tick);
    assert_eq!(fx.first(), Some(&Effect::Cordon), "{fx:?}");
    assert_eq!(evicts(&fx), vec!["virt-launcher-a-abcde"]);
    assert_eq!(b.m.snapshot(b.at(40_000)).phase, PhaseLabel::Draining);
    let kind = match b.m.take_notes().into_iter().find_map(|n| match n {
        Note::DrainStarted { kind, budget, .. } => Some((kind, budget)),
        _ => None,
    }) {
        Some(k) => k,
        None => panic!("no DrainStarted"),
    };
    // Its deadline: the scheduled time plus logind's budget (25 s).
    assert_eq!(kind, ("scheduled-reboot".into(), Duration::from_secs(85)));
    b.feed(40_010, Input::Cordoned(CordonResult::CordonedByUs));
    // The VMI migrates away: the node is empty, but a pre-drain keeps the lock.
    let fx = b.feed(
        70_000,
        Input::Vmis(WatchUpdate::Applied(migrated(a.clone(), "node-2"))),
    );
    assert!(
        released(&fx).is_none(),
        "a pre-drain never releases: {fx:?}"
    );
    assert_eq!(
        pre_drained(&mut b.m),
        vec![("reboot".to_string(), Duration::from_secs(30))]
    );
    assert!(b.m.lock_held());
    let fx = b.feed(80_000, Input::Tick);
    assert!(
        fx.is_empty() && pre_drained(&mut b.m).is_empty(),
        "said once"
    );
    // The reboot fires: nothing left to wait for.
    let fx = b.feed(
        100_000,
        Input::Shutdown {
            start: true,
            kind: Some("reboot".into()),
        },
    );
    assert_eq!(released(&fx), Some((ReleaseReason::Empty, vec![])));
}

#[test]
fn shutdown_c_undoes_a_pre_drain_uncordons_and_cancels_its_evacuations() {
    let (mut b, a, pa) = Bed::one_vmi(Some(Duration::from_secs(300)), false);
    let fx = b.feed(0, schedule("reboot", 60));
    assert_eq!(
        fx.first(),
        Some(&Effect::Cordon),
        "inside the lead: at once"
    );
    b.feed(5, Input::Cordoned(CordonResult::CordonedByUs));
    b.feed(
        20,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::Evacuating,
        },
    );
    let fx = b.feed(10_000, unscheduled());
    assert_eq!(fx.first(), Some(&Effect::Uncordon), "{fx:?}");
    assert!(fx.contains(&Effect::CancelEvacuation { vmi: a.key.clone() }));
    assert!(
        !fx.contains(&Effect::TakeLock),
        "the lock was never given up"
    );
    assert_eq!(b.m.snapshot(b.at(10_000)).phase, PhaseLabel::Idle);
    let ended: Vec<EndReason> =
        b.m.take_notes()
            .into_iter()
            .filter_map(|n| match n {
                Note::Ended(e) => Some(e.reason),
                _ => None,
            })
            .collect();
    assert_eq!(ended, vec![EndReason::Cancelled]);
    assert_eq!(
        b.m.next_wakeup(),
        None,
        "nothing to do until a new schedule"
    );
}

#[test]
fn a_schedule_gone_at_its_time_has_fired_and_prepare_for_shutdown_takes_over() {
    let (mut b, _, _) = Bed::one_vmi(Some(Duration::from_secs(300)), false);
    b.feed(0, schedule("poweroff", 30));
    b.feed(5, Input::Cordoned(CordonResult::CordonedByUs));
    // systemd 252 clears the property as it fires; the poll sees it before the signal.
    let fx = b.feed(29_500, unscheduled());
    assert!(
        !fx.iter()
            .any(|e| matches!(e, Effect::Uncordon | Effect::CancelEvacuation { .. })),
        "not a cancel: {fx:?}"
    );
    assert_eq!(b.m.snapshot(b.at(29_500)).phase, PhaseLabel::Draining);
    let fx = b.feed(
        30_000,
        Input::Shutdown {
            start: true,
            kind: None,
        },
    );
    assert!(released(&fx).is_none(), "the VMI is still here");
    // From now on logind's delay counts: 25 s.
    let fx = b.feed(55_000, Input::Tick);
    assert_eq!(released(&fx).map(|r| r.0), Some(ReleaseReason::Deadline));
}

#[test]
fn a_pre_drain_whose_shutdown_never_comes_is_undone_at_its_deadline_and_not_started_again() {
    let (mut b, _, _) = Bed::one_vmi(Some(Duration::from_secs(300)), false);
    b.feed(0, schedule("reboot", 30));
    b.feed(5, Input::Cordoned(CordonResult::CordonedByUs));
    assert_eq!(b.m.next_wakeup().map(|t| t <= b.at(55_000)), Some(true));
    let fx = b.feed(55_000, Input::Tick);
    assert!(released(&fx).is_none(), "{fx:?}");
    assert_eq!(warned(&fx), vec!["ScheduledShutdownMissed"]);
    assert_eq!(fx.first(), Some(&Effect::Uncordon));
    assert_eq!(b.m.snapshot(b.at(55_000)).phase, PhaseLabel::Idle);
    let fx = b.feed(56_000, Input::Tick);
    assert!(fx.is_empty(), "its time is past: {fx:?}");
}

#[test]
fn a_pre_drain_stops_what_cannot_migrate_only_by_the_shutdown_s_own_deadline() {
    let (mut b, _, pa) = Bed::one_vmi(Some(Duration::from_secs(300)), false);
    // Due in 200 s, deadline 225 s, 60 s of grace: stopped at 165 s, not at half the budget.
    b.feed(0, schedule("reboot", 200));
    b.feed(5, Input::Cordoned(CordonResult::CordonedByUs));
    b.feed(
        20,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::Evacuating,
        },
    );
    assert!(stops(&b.feed(164_000, Input::Tick)).is_empty());
    assert_eq!(
        stops(&b.feed(165_000, Input::Tick)),
        vec![("a".to_string(), 60, StopReason::StopBy)]
    );
}

#[test]
fn no_pre_drain_for_a_dry_run_without_a_lead_or_for_a_schedule_moved_far_off() {
    let a = vmi("a", NODE);
    let pa = launcher(&a, NODE);
    let mut off = Bed::with_lead(Scope::Vms, None);
    off.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
    assert!(off.feed(0, schedule("reboot", 30)).is_empty());
    assert_eq!(off.m.next_wakeup(), None);

    let mut b = Bed::with_lead(Scope::Vms, Some(Duration::from_secs(300)));
    b.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
    assert!(b.feed(0, schedule("dry-reboot", 30)).is_empty());
    // Rescheduled from +60 s to +1 h: undone, and drained again 5 min before.
    let fx = b.feed(1_000, schedule("reboot", 60));
    assert_eq!(fx.first(), Some(&Effect::Cordon));
    b.feed(1_005, Input::Cordoned(CordonResult::CordonedByUs));
    let fx = b.feed(2_000, schedule("reboot", 3_600));
    assert_eq!(fx.first(), Some(&Effect::Uncordon), "{fx:?}");
    assert_eq!(b.m.next_wakeup(), Some(b.at(2_000 + 3_300_000)));
    // Moved a little within the lead: the pre-drain goes on.
    let mut c = Bed::with_lead(Scope::Vms, Some(Duration::from_secs(300)));
    c.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
    c.feed(0, schedule("reboot", 60));
    c.feed(5, Input::Cordoned(CordonResult::CordonedByUs));
    let fx = c.feed(1_000, schedule("reboot", 120));
    assert!(fx.is_empty(), "{fx:?}");
    assert_eq!(c.m.snapshot(c.at(1_000)).phase, PhaseLabel::Draining);
}

#[test]
fn a_pre_drain_waits_for_its_turn_and_gives_it_back_once_the_node_is_empty() {
    let (mut b, a, _) = Bed::one_vmi(Some(Duration::from_secs(300)), true);
    let fx = b.feed(0, schedule("reboot", 60));
    assert_eq!(fx, vec![Effect::WantTurn], "no drain before the turn");
    assert!(b.feed(1_000, Input::Tick).is_empty(), "asked once");
    let fx = b.feed(5_000, Input::Turn(true));
    assert_eq!(fx.first(), Some(&Effect::Cordon), "{fx:?}");
    assert_eq!(evicts(&fx), vec!["virt-launcher-a-abcde"]);
    b.feed(5_010, Input::Cordoned(CordonResult::CordonedByUs));
    let fx = b.feed(
        20_000,
        Input::Vmis(WatchUpdate::Applied(migrated(a.clone(), "node-2"))),
    );
    assert_eq!(fx, vec![Effect::ReleaseTurn], "empty: the next node's turn");
    let fx = b.feed(
        60_000,
        Input::Shutdown {
            start: true,
            kind: Some("reboot".into()),
        },
    );
    assert!(released(&fx).is_some());
    assert!(!fx.contains(&Effect::ReleaseTurn), "given back once");
}

#[test]
fn a_turn_that_does_not_come_before_the_scheduled_time_is_given_up_with_a_warning() {
    let (mut b, a, pa) = Bed::one_vmi(Some(Duration::from_secs(300)), true);
    assert_eq!(b.feed(0, schedule("reboot", 60)), vec![Effect::WantTurn]);
    assert_eq!(b.m.next_wakeup(), Some(b.at(60_000)));
    let fx = b.feed(60_000, Input::Tick);
    assert_eq!(warned(&fx), vec!["PreDrainTurnMissed"]);
    assert!(fx.contains(&Effect::ReleaseTurn));
    assert_eq!(b.m.snapshot(b.at(60_000)).phase, PhaseLabel::Idle);
    // A turn that comes after all goes straight back.
    assert_eq!(b.feed(60_100, Input::Turn(true)), vec![Effect::ReleaseTurn]);
    // shutdown -c while waiting: stop waiting, no warning.
    let mut c = Bed::configured(Scope::Vms, Some(Duration::from_secs(300)), true);
    c.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
    c.feed(0, schedule("reboot", 60));
    assert_eq!(c.feed(1_000, unscheduled()), vec![Effect::ReleaseTurn]);
}

#[test]
fn a_shutdown_that_comes_while_waiting_for_a_turn_stops_the_wait() {
    let (mut b, _, _) = Bed::one_vmi(Some(Duration::from_secs(300)), true);
    assert_eq!(b.feed(0, schedule("reboot", 60)), vec![Effect::WantTurn]);
    let fx = b.feed(
        1_000,
        Input::Shutdown {
            start: true,
            kind: Some("reboot".into()),
        },
    );
    assert!(fx.contains(&Effect::ReleaseTurn), "{fx:?}");
    assert!(fx.contains(&Effect::Cordon));
    // The turn granted meanwhile goes straight back.
    assert_eq!(b.feed(1_500, Input::Turn(true)), vec![Effect::ReleaseTurn]);
}

fn power_event() -> Input {
    Input::Power(Verdict::PowerEvent {
        targets: vec![],
        down: vec!["node-2".into(), "node-3".into()],
    })
}

fn migrate() -> Input {
    Input::Power(Verdict::Migrate {
        targets: vec!["node-2".into()],
    })
}

fn announced(fx: &[Effect]) -> bool {
    fx.iter().any(|e| matches!(e, Effect::Announce { .. }))
}

#[test]
fn a_power_event_stops_the_vms_in_place_after_the_settle() {
    let mut b = Bed::powered(Duration::from_secs(2));
    let (a, c) = (vmi("a", NODE), vmi("c", NODE));
    b.list(
        &[a.clone(), c.clone()],
        &[launcher(&a, NODE), launcher(&c, NODE)],
    );
    let fx = b.start(0);
    assert!(announced(&fx), "the shutdown is announced: {fx:?}");
    assert!(evicts(&fx).is_empty(), "nothing evicted while settling");
    assert_eq!(b.m.next_wakeup(), Some(b.at(2000)));
    // The verdict comes before the settle is over: still nothing.
    let fx = b.feed(500, power_event());
    assert!(evicts(&fx).is_empty() && stops(&fx).is_empty());
    let fx = b.feed(2000, Input::Tick);
    assert!(evicts(&fx).is_empty(), "never evicted in a power event");
    let mut stopped = stops(&fx);
    stopped.sort();
    assert_eq!(
        stopped,
        vec![
            ("a".into(), 23, StopReason::PowerEvent),
            ("c".into(), 23, StopReason::PowerEvent)
        ],
        "grace capped by what is left of the 25 s budget"
    );
    assert!(
        b.m.take_notes()
            .iter()
            .any(|n| matches!(n, Note::PowerEvent { down, .. } if down.len() == 2))
    );
    assert!(b.m.snapshot(b.at(2000)).power_event);
}

#[test]
fn enough_nodes_left_drain_as_always_after_the_settle() {
    let mut b = Bed::powered(Duration::from_secs(2));
    let a = vmi("a", NODE);
    b.list(std::slice::from_ref(&a), &[launcher(&a, NODE)]);
    b.start(0);
    b.feed(100, migrate());
    assert!(evicts(&b.feed(1999, Input::Tick)).is_empty());
    assert_eq!(
        evicts(&b.feed(2000, Input::Tick)),
        vec!["virt-launcher-a-abcde"]
    );
}

#[test]
fn without_a_verdict_the_drain_goes_on_as_always() {
    let mut b = Bed::powered(Duration::from_secs(2));
    let a = vmi("a", NODE);
    b.list(std::slice::from_ref(&a), &[launcher(&a, NODE)]);
    b.start(0);
    assert!(
        evicts(&b.feed(2000, Input::Tick)).is_empty(),
        "waits for a verdict"
    );
    let at = 2000 + VERDICT_WAIT.as_millis() as u64;
    assert_eq!(b.m.next_wakeup(), Some(b.at(at)));
    assert_eq!(
        evicts(&b.feed(at, Input::Tick)),
        vec!["virt-launcher-a-abcde"]
    );
}

#[test]
fn a_zero_settle_evicts_at_once_and_a_later_power_event_cancels_the_evacuation() {
    let mut b = Bed::powered(Duration::ZERO);
    let a = vmi("a", NODE);
    let pa = launcher(&a, NODE);
    b.list(std::slice::from_ref(&a), std::slice::from_ref(&pa));
    let fx = b.start(0);
    assert_eq!(
        evicts(&fx),
        vec!["virt-launcher-a-abcde"],
        "as without detection"
    );
    b.feed(
        20,
        Input::Evicted {
            pod: pa.pod_ref(),
            outcome: EvictionOutcome::Evacuating,
        },
    );
    let fx = b.feed(500, power_event());
    assert!(
        fx.contains(&Effect::CancelEvacuation { vmi: a.key.clone() }),
        "KubeVirt stops evacuating: {fx:?}"
    );
    assert_eq!(stops(&fx), vec![("a".into(), 24, StopReason::PowerEvent)]);
    // Once recognised, a later verdict does not turn it back.
    let fx = b.feed(600, migrate());
    assert!(evicts(&fx).is_empty());
    assert!(b.m.snapshot(b.at(600)).power_event);
}

#[test]
fn a_cancelled_shutdown_withdraws_its_announcement() {
    let mut b = Bed::powered(Duration::from_secs(2));
    let a = vmi("a", NODE);
    b.list(std::slice::from_ref(&a), &[launcher(&a, NODE)]);
    b.start(0);
    let fx = b.feed(
        100,
        Input::Shutdown {
            start: false,
            kind: None,
        },
    );
    assert!(fx.contains(&Effect::Withdraw), "{fx:?}");
}

#[test]
fn without_detection_nothing_is_announced() {
    let mut b = Bed::new(Scope::Vms);
    let a = vmi("a", NODE);
    b.list(std::slice::from_ref(&a), &[launcher(&a, NODE)]);
    let fx = b.start(0);
    assert!(!announced(&fx));
    assert!(
        stops(&b.feed(100, power_event())).is_empty(),
        "verdicts are ignored"
    );
}
