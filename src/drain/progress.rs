//! Where each VMI of a drain is: waiting → evicting → migrating → migrated, or → stopping →
//! stopped. The state machine brings it up to date after every input and reports each change,
//! so the agent's `/status`, the `drain` command's live display and the tests read the same thing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::eviction::EvictionState;
use super::model::{ObjKey, VmiInfo};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum VmiState {
    /// On the node, nothing sent yet.
    Waiting,
    /// Eviction sent; KubeVirt has not started a migration yet.
    Evicting,
    /// KubeVirt refuses to migrate it (LiveMigrate but not live-migratable).
    Refused,
    Migrating {
        target: Option<String>,
    },
    /// Graceful stop sent (its launcher pod is being deleted, or an eviction was allowed).
    Stopping,
    Migrated {
        target: String,
    },
    Stopped,
}

impl VmiState {
    pub fn label(&self) -> &'static str {
        match self {
            VmiState::Waiting => "waiting",
            VmiState::Evicting => "evicting",
            VmiState::Refused => "refused",
            VmiState::Migrating { .. } => "migrating",
            VmiState::Stopping => "stopping",
            VmiState::Migrated { .. } => "migrated",
            VmiState::Stopped => "stopped",
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(self, VmiState::Migrated { .. } | VmiState::Stopped)
    }

    /// `migrating → node-2`, `stopped`, …
    pub fn describe(&self) -> String {
        match self {
            VmiState::Migrating { target: Some(t) } | VmiState::Migrated { target: t } => {
                format!("{} → {t}", self.label())
            }
            other => other.label().to_string(),
        }
    }
}

/// The state of one VMI from what is known of it. `eviction` is where its launcher pod's
/// eviction stands (`None`: none sent), `stop_sent` whether the drain deleted its launcher pod.
pub fn vmi_state(
    node: &str,
    vmi: Option<&VmiInfo>,
    eviction: Option<EvictionState>,
    stop_sent: bool,
    last: Option<&VmiState>,
) -> VmiState {
    let Some(v) = vmi else {
        // Gone from the watch: the watch selects by the node label, and the API server reports
        // an object that stops matching as a deletion carrying its previous content
        // (apiserver `cacher/cache_watcher.go`, convertToWatchEvent). A VMI last seen migrating
        // has therefore left by that migration.
        return match last {
            Some(s @ VmiState::Migrated { .. }) => s.clone(),
            Some(VmiState::Migrating {
                target: Some(target),
            }) => VmiState::Migrated {
                target: target.clone(),
            },
            _ => VmiState::Stopped,
        };
    };
    if !v.runs_on(node) {
        if v.is_finished() {
            return VmiState::Stopped;
        }
        let target = v
            .migration
            .as_ref()
            .filter(|m| m.completed && !m.failed)
            .and_then(|m| m.target_node.clone())
            .or_else(|| v.node_name.clone().filter(|n| n != node));
        return match target {
            Some(target) => VmiState::Migrated { target },
            None => VmiState::Stopped,
        };
    }
    if stop_sent || eviction == Some(EvictionState::Evicted) {
        return VmiState::Stopping;
    }
    if let Some(m) = v.migration.as_ref().filter(|m| !m.completed && !m.failed) {
        return VmiState::Migrating {
            target: m.target_node.clone(),
        };
    }
    match eviction {
        Some(EvictionState::NotMigratable) => VmiState::Refused,
        Some(_) => VmiState::Evicting,
        None if v.evacuation_node.is_some() => VmiState::Evicting,
        None => VmiState::Waiting,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmiProgress {
    pub vmi: String,
    #[serde(flatten)]
    pub state: VmiState,
    /// Seconds from the start of the drain to this state.
    pub since_s: f64,
}

/// The VMIs of one drain and their states; VMIs that left stay listed with their last state.
#[derive(Debug, Clone)]
pub struct Progress {
    node: String,
    started: Instant,
    vmis: BTreeMap<ObjKey, (String, VmiState, Instant)>,
}

impl Progress {
    pub fn new(node: &str, started: Instant) -> Self {
        Progress {
            node: node.to_string(),
            started,
            vmis: BTreeMap::new(),
        }
    }

    /// Brings every VMI up to date; returns the ones whose state changed. `known` is every VMI
    /// the watch knows, each with its launcher's eviction state and whether the drain stopped it.
    /// `deleted` is the VMI of a watch `Deleted` event just taken in: the watch selects by the
    /// node label, so a VMI migrated away leaves it as a deletion whose last state tells where
    /// it went.
    pub fn update(
        &mut self,
        now: Instant,
        known: &[(&VmiInfo, Option<EvictionState>, bool)],
        deleted: Option<&VmiInfo>,
    ) -> Vec<(ObjKey, VmiState)> {
        let mut changes = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (v, eviction, stop_sent) in known {
            let tracked = self.vmis.contains_key(&v.key);
            if !tracked && !v.runs_on(&self.node) {
                continue;
            }
            seen.insert(v.key.clone());
            let last = self.vmis.get(&v.key).map(|(_, s, _)| s);
            let next = vmi_state(&self.node, Some(v), *eviction, *stop_sent, last);
            // A launcher pod gone after an eviction leaves no label to read; keep what we knew.
            let next = match (last, &next) {
                (Some(l), VmiState::Waiting) if *l != VmiState::Waiting => l.clone(),
                _ => next,
            };
            if last != Some(&next) {
                self.vmis
                    .insert(v.key.clone(), (v.uid.clone(), next.clone(), now));
                changes.push((v.key.clone(), next));
            }
        }
        for (key, (_, state, at)) in self.vmis.iter_mut() {
            if !seen.contains(key) && !state.is_final() {
                let last_seen = deleted
                    .filter(|d| &d.key == key)
                    .map(|d| vmi_state(&self.node, Some(d), None, false, Some(state)));
                let last = match last_seen {
                    Some(
                        s @ (VmiState::Migrating { target: Some(_) } | VmiState::Migrated { .. }),
                    ) => s,
                    Some(VmiState::Stopped) => VmiState::Stopped,
                    _ => state.clone(),
                };
                *state = vmi_state(&self.node, None, None, false, Some(&last));
                *at = now;
                changes.push((key.clone(), state.clone()));
            }
        }
        changes
    }

    pub fn elapsed(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.started)
    }

    pub fn snapshot(&self) -> Vec<VmiProgress> {
        self.vmis
            .iter()
            .map(|(k, (_, s, at))| VmiProgress {
                vmi: k.to_string(),
                state: s.clone(),
                since_s: round_ms(self.elapsed(*at)),
            })
            .collect()
    }

    pub fn counts(&self) -> (usize, usize, usize) {
        let mut migrated = 0;
        let mut stopped = 0;
        let mut remaining = 0;
        for (_, s, _) in self.vmis.values() {
            match s {
                VmiState::Migrated { .. } => migrated += 1,
                VmiState::Stopped => stopped += 1,
                _ => remaining += 1,
            }
        }
        (migrated, stopped, remaining)
    }
}

pub fn round_ms(d: Duration) -> f64 {
    (d.as_millis() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::machine::{Machine, MachineConfig};
    use crate::drain::model::MigrationState;
    use crate::drain::model::fixtures::*;

    const N: &str = "node-1";

    fn migrating(mut v: VmiInfo, to: &str) -> VmiInfo {
        v.migration = Some(MigrationState {
            source_node: Some(N.into()),
            target_node: Some(to.into()),
            target_pod: None,
            completed: false,
            failed: false,
        });
        v
    }

    #[test]
    fn a_live_migration_goes_evicting_migrating_migrated() {
        let v = vmi("live-1", N);
        assert_eq!(vmi_state(N, Some(&v), None, false, None), VmiState::Waiting);
        assert_eq!(
            vmi_state(N, Some(&v), Some(EvictionState::Evacuating), false, None),
            VmiState::Evicting
        );
        let m = migrating(v.clone(), "node-2");
        assert_eq!(
            vmi_state(N, Some(&m), Some(EvictionState::Evacuating), false, None),
            VmiState::Migrating {
                target: Some("node-2".into())
            }
        );
        let done = migrated(v, "node-2");
        assert_eq!(
            vmi_state(N, Some(&done), Some(EvictionState::Evacuating), false, None),
            VmiState::Migrated {
                target: "node-2".into()
            }
        );
    }

    #[test]
    fn a_none_vm_goes_stopping_then_stopped() {
        let v = vmi("none-1", N);
        assert_eq!(
            vmi_state(N, Some(&v), Some(EvictionState::Evicted), false, None),
            VmiState::Stopping
        );
        let mut s = v.clone();
        s.phase = Some("Succeeded".into());
        assert_eq!(vmi_state(N, Some(&s), None, false, None), VmiState::Stopped);
        assert_eq!(
            vmi_state(N, None, None, false, Some(&VmiState::Stopping)),
            VmiState::Stopped
        );
    }

    #[test]
    fn refused_then_stopped_by_the_drain() {
        let v = vmi("stuck-1", N);
        assert_eq!(
            vmi_state(N, Some(&v), Some(EvictionState::NotMigratable), false, None),
            VmiState::Refused
        );
        assert_eq!(
            vmi_state(N, Some(&v), Some(EvictionState::NotMigratable), true, None),
            VmiState::Stopping
        );
    }

    fn machine() -> Machine {
        Machine::new(MachineConfig {
            node: N.into(),
            scope: crate::drain::model::Scope::Vms,
            safety_margin: Duration::from_secs(5),
            deadline_override: None,
            pre_drain_lead: None,
            take_turns: false,
            power_settle: None,
        })
    }

    /// What the machine tells progress about every VMI it knows.
    fn update(
        p: &mut Progress,
        now: Instant,
        m: &Machine,
        deleted: Option<&VmiInfo>,
    ) -> Vec<(ObjKey, VmiState)> {
        let known: Vec<(&VmiInfo, Option<EvictionState>, bool)> = m
            .vmis()
            .map(|v| {
                let e = m
                    .launcher(&v.uid)
                    .and_then(|l| m.eviction_states().get(&l.uid).copied());
                (v, e, m.stop_sent(&v.uid))
            })
            .collect();
        p.update(now, &known, deleted)
    }

    #[test]
    fn leaving_the_node_label_watch_reads_as_migrated_not_stopped() {
        use crate::drain::machine::{Input, WatchUpdate};
        let t0 = Instant::now();
        let (a, b) = (vmi("live-1", N), vmi("none-1", N));
        let mut m = machine();
        for v in [&a, &b] {
            m.handle(t0, Input::Vmis(WatchUpdate::Listed(v.clone())));
        }
        m.handle(t0, Input::Vmis(WatchUpdate::Synced));
        let mut p = Progress::new(N, t0);
        assert_eq!(update(&mut p, t0, &m, None).len(), 2);
        let gone = migrated(a.clone(), "node-2");
        m.handle(t0, Input::Vmis(WatchUpdate::Deleted(gone.clone())));
        let ch = update(&mut p, t0, &m, Some(&gone));
        assert_eq!(
            ch,
            vec![(
                a.key.clone(),
                VmiState::Migrated {
                    target: "node-2".into()
                }
            )]
        );
        // The usual case: the deletion carries the content from before the label moved.
        let c = vmi("live-2", N);
        m.handle(t0, Input::Vmis(WatchUpdate::Applied(c.clone())));
        update(&mut p, t0, &m, None);
        let before_move = migrating(c.clone(), "node-3");
        m.handle(t0, Input::Vmis(WatchUpdate::Deleted(before_move.clone())));
        assert_eq!(
            update(&mut p, t0, &m, Some(&before_move)),
            vec![(
                c.key.clone(),
                VmiState::Migrated {
                    target: "node-3".into()
                }
            )]
        );
        m.handle(t0, Input::Vmis(WatchUpdate::Deleted(b.clone())));
        let ch = update(&mut p, t0, &m, Some(&b));
        assert_eq!(ch, vec![(b.key.clone(), VmiState::Stopped)]);
        assert_eq!(p.counts(), (2, 1, 0));
    }

    #[test]
    fn a_deleted_vmi_keeps_its_migration() {
        let last = VmiState::Migrated {
            target: "node-3".into(),
        };
        assert_eq!(vmi_state(N, None, None, false, Some(&last)), last);
    }
}
