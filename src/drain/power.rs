//! Power events: every node going down within seconds (a UPS running low and NUT's `upsmon`
//! shutting every node down, a PDU switched off, a rack powered down). Then migrating only
//! moves a VM onto the next node to die and spends the battery on copies, and a VM with
//! `runStrategy: Always` stopped on one node is started again by KubeVirt on another that is
//! about to die. What keeps the VMs is stopping them where they are through KubeVirt's `stop`
//! path and starting them again once the power is back.
//!
//! Pure decisions, each a function of what the agent read: whether this node's shutdown is
//! part of a power event ([`judge`]), and which stopped VMs to start again, when ([`restore`]).

use std::collections::BTreeSet;

use super::model::ObjKey;

/// Another node as the agent sees it when its own shutdown starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// Its `Ready` condition is `True`.
    pub ready: bool,
    /// Not cordoned (`spec.unschedulable` unset): KubeVirt could place a migration target there.
    pub schedulable: bool,
    /// Its agent announced that the node is shutting down, and the announcement is fresh.
    pub shutting_down: bool,
    /// virt-handler's mark, label `kubevirt.io/schedulable`: `true` while it runs there and its
    /// device plugins are up, `false` once it stopped (it sets that on its way out, and
    /// virt-controller when its heartbeat goes stale); `None` where no virt-handler ever ran.
    /// Launcher pods select `true`, so no VM lands anywhere else.
    pub virt_handler: Option<bool>,
}

impl NodeView {
    /// Whether KubeVirt would place a VM there now. `marks`: some node of the cluster carries
    /// virt-handler's label ([`virt_handler_marks`]); without any, KubeVirt's placement is not
    /// known here and the label is not asked for.
    pub fn runs_vms(&self, marks: bool) -> bool {
        self.ready && self.schedulable && (!marks || self.virt_handler == Some(true))
    }

    /// Whether a VM migrated there now would still run after this shutdown.
    fn takes_vms(&self, marks: bool) -> bool {
        self.runs_vms(marks) && !self.shutting_down
    }
}

/// Whether virt-handler marks nodes in this cluster at all.
pub fn virt_handler_marks(nodes: &[NodeView]) -> bool {
    nodes.iter().any(|n| n.virt_handler.is_some())
}

/// When a shutdown counts as part of a power event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerRule {
    /// Fewer nodes than this left to migrate to, besides this one: a power event. 0: never
    /// (every shutdown drains as a single node's would).
    pub min_targets: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Enough nodes stay up: the VMs migrate as in any drain.
    Migrate { targets: Vec<String> },
    /// Too few nodes stay up: the VMs are stopped where they run and started again later.
    PowerEvent {
        /// The nodes that would still take a VM (fewer than the rule asks for).
        targets: Vec<String>,
        /// The other nodes announced as going down.
        down: Vec<String>,
    },
}

impl Verdict {
    pub fn is_power_event(&self) -> bool {
        matches!(self, Verdict::PowerEvent { .. })
    }
}

/// Whether `me`'s shutdown is part of a power event, from the other nodes' state. A node that
/// is not Ready is no target whatever the reason; a cordoned one neither (KubeVirt's scheduler
/// would not place a target pod there).
pub fn judge(me: &str, nodes: &[NodeView], rule: PowerRule) -> Verdict {
    let others = || nodes.iter().filter(|n| n.name != me);
    let marks = virt_handler_marks(nodes);
    let targets: Vec<String> = others()
        .filter(|n| n.takes_vms(marks))
        .map(|n| n.name.clone())
        .collect();
    if rule.min_targets == 0 || targets.len() >= rule.min_targets {
        return Verdict::Migrate { targets };
    }
    let down = others()
        .filter(|n| n.shutting_down)
        .map(|n| n.name.clone())
        .collect();
    Verdict::PowerEvent { targets, down }
}

/// What the agent writes on a VM it stopped in a power event, so that the VM can be started
/// again later by whichever agent restores (the record travels with the VM, not the node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopRecord {
    /// The event's id (the first node's announcement), so a later event's record is told apart.
    pub event: String,
    /// The node it ran on.
    pub node: String,
    /// Its `spec.runStrategy` before the stop (KubeVirt's `stop` turns `Always` into `Halted`).
    pub run_strategy: String,
    /// Its `metadata.generation` after the stop: a later spec change by anyone else raises it.
    pub generation: i64,
}

/// A VM as the restorer reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNow {
    pub key: ObjKey,
    /// Its `metadata.uid`, for Events about it.
    pub uid: String,
    pub generation: i64,
    /// Its VMI exists and is not final (started, by us or by anyone).
    pub has_vmi: bool,
    /// Its VMI is `Running`.
    pub running: bool,
    pub record: Option<StopRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreRule {
    /// Start VMs only once this many nodes are up (Ready and schedulable); 0: once every node
    /// the records name is.
    pub min_ready_nodes: usize,
    /// At most this many VMs starting (started, not yet `Running`) at once.
    pub parallel: usize,
}

/// Whether the cluster is back for the restore: no node still announces a shutdown (the event
/// is over, or its announcements have expired), and enough nodes are up: `up` are those Ready
/// and schedulable (an agent lifts its own cordon when its node is back).
pub fn cluster_back(
    up: &BTreeSet<String>,
    announced: bool,
    vms: &[VmNow],
    rule: RestoreRule,
) -> bool {
    if announced {
        return false;
    }
    if rule.min_ready_nodes > 0 {
        return up.len() >= rule.min_ready_nodes;
    }
    vms.iter()
        .filter_map(|v| v.record.as_ref())
        .all(|r| up.contains(&r.node))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forget {
    /// Someone changed the VM since the stop: it is theirs to run.
    Changed,
    /// It runs again (started by us, or by someone else): nothing more to do.
    Running,
}

impl Forget {
    pub fn as_str(self) -> &'static str {
        match self {
            Forget::Changed => "changed",
            Forget::Running => "running",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestorePlan {
    /// Start these now (KubeVirt's `start`), in this order.
    pub start: Vec<ObjKey>,
    /// Drop the record of these, and why.
    pub forget: Vec<(ObjKey, Forget)>,
    /// Still recorded, waiting for the cluster or a free slot.
    pub waiting: usize,
}

/// Which recorded VMs to start now. `started` are those this restorer asked KubeVirt to start
/// and whose record is still there: they hold a slot until their VMI runs. A VM whose
/// generation moved since the stop was changed by someone (an admin started it, edited it, or
/// deleted and recreated it): its record is dropped and it is left alone.
pub fn restore(
    vms: &[VmNow],
    started: &BTreeSet<ObjKey>,
    back: bool,
    rule: RestoreRule,
) -> RestorePlan {
    let mut plan = RestorePlan::default();
    let mut recorded: Vec<&VmNow> = vms.iter().filter(|v| v.record.is_some()).collect();
    recorded.sort_by(|a, b| a.key.cmp(&b.key));
    let mut candidates = Vec::new();
    let mut starting = 0;
    for vm in recorded {
        let record = vm.record.as_ref().expect("filtered");
        let ours = started.contains(&vm.key);
        if vm.running {
            plan.forget.push((vm.key.clone(), Forget::Running));
        } else if ours {
            // Our own start moves the generation too (`Halted` back to `Always`).
            starting += 1;
        } else if vm.generation != record.generation || vm.has_vmi {
            plan.forget.push((vm.key.clone(), Forget::Changed));
        } else {
            candidates.push(vm.key.clone());
        }
    }
    let room = if back {
        rule.parallel.saturating_sub(starting)
    } else {
        0
    };
    plan.waiting = candidates.len().saturating_sub(room) + starting;
    plan.start = candidates.into_iter().take(room).collect();
    plan
}

/// The annotation value of a [`StopRecord`]: `event/node/runStrategy/generation`, readable
/// with `kubectl get vm -o yaml` and parsed back without a JSON library at this layer.
pub fn encode(r: &StopRecord) -> String {
    format!("{}/{}/{}/{}", r.event, r.node, r.run_strategy, r.generation)
}

/// The record back from its annotation; `None` for a value this version did not write.
pub fn decode(s: &str) -> Option<StopRecord> {
    let mut parts = s.rsplitn(4, '/');
    let generation = parts.next()?.parse().ok()?;
    let run_strategy = parts.next()?.to_owned();
    let node = parts.next()?.to_owned();
    let event = parts.next()?.to_owned();
    if event.is_empty() || node.is_empty() || run_strategy.is_empty() {
        return None;
    }
    Some(StopRecord {
        event,
        node,
        run_strategy,
        generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ready: bool, schedulable: bool, shutting_down: bool) -> NodeView {
        NodeView {
            name: name.into(),
            ready,
            schedulable,
            shutting_down,
            virt_handler: None,
        }
    }

    #[test]
    fn nodes_without_virt_handler_take_no_vms_where_kubevirt_marks_nodes() {
        let marked = |name: &str, mark: Option<bool>| NodeView {
            virt_handler: mark,
            ..node(name, true, true, false)
        };
        // A control-plane node without virt-handler and a node whose virt-handler stopped
        // are no targets: only node-4 is.
        let nodes = [
            marked("node-1", Some(true)),
            marked("cp-1", None),
            marked("node-3", Some(false)),
            marked("node-4", Some(true)),
        ];
        assert_eq!(
            judge("node-1", &nodes, ONE),
            Verdict::Migrate {
                targets: vec!["node-4".into()]
            }
        );
        assert!(judge("node-1", &nodes, PowerRule { min_targets: 2 }).is_power_event());
        // No node marked at all: the label is not asked for.
        let unmarked = [marked("node-1", None), marked("node-2", None)];
        assert!(!judge("node-1", &unmarked, ONE).is_power_event());
    }

    const ONE: PowerRule = PowerRule { min_targets: 1 };

    #[test]
    fn a_single_node_shutting_down_migrates() {
        let nodes = [
            node("node-1", true, false, true),
            node("node-2", true, true, false),
            node("node-3", true, true, false),
        ];
        assert_eq!(
            judge("node-1", &nodes, ONE),
            Verdict::Migrate {
                targets: vec!["node-2".into(), "node-3".into()]
            }
        );
    }

    #[test]
    fn every_node_going_down_is_a_power_event() {
        let nodes = [
            node("node-1", true, false, true),
            node("node-2", true, false, true),
            node("node-3", true, true, true),
        ];
        assert_eq!(
            judge("node-1", &nodes, ONE),
            Verdict::PowerEvent {
                targets: vec![],
                down: vec!["node-2".into(), "node-3".into()]
            }
        );
    }

    #[test]
    fn not_ready_or_cordoned_nodes_take_no_vms() {
        let nodes = [
            node("node-1", true, true, true),
            node("node-2", false, true, false),
            node("node-3", true, false, false),
        ];
        assert!(judge("node-1", &nodes, ONE).is_power_event());
    }

    #[test]
    fn two_of_five_going_down_leave_enough_targets() {
        let nodes = [
            node("node-1", true, false, true),
            node("node-2", true, false, true),
            node("node-3", true, true, false),
            node("node-4", true, true, false),
            node("node-5", true, true, false),
        ];
        assert!(!judge("node-1", &nodes, PowerRule { min_targets: 3 }).is_power_event());
        assert!(judge("node-1", &nodes, PowerRule { min_targets: 4 }).is_power_event());
    }

    #[test]
    fn min_targets_zero_never_sees_a_power_event() {
        let nodes = [node("node-1", true, true, true)];
        assert!(!judge("node-1", &nodes, PowerRule { min_targets: 0 }).is_power_event());
        assert!(judge("node-1", &nodes, ONE).is_power_event(), "a lone node");
    }

    fn record(generation: i64) -> StopRecord {
        StopRecord {
            event: "node-1-1764500000".into(),
            node: "node-1".into(),
            run_strategy: "Always".into(),
            generation,
        }
    }

    fn vm(name: &str, generation: i64, has_vmi: bool, running: bool, rec: Option<i64>) -> VmNow {
        VmNow {
            uid: format!("uid-{name}"),
            key: ObjKey::new("default", name),
            generation,
            has_vmi,
            running,
            record: rec.map(record),
        }
    }

    const RULE: RestoreRule = RestoreRule {
        min_ready_nodes: 3,
        parallel: 2,
    };

    fn up(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn the_cluster_is_back_when_no_node_announces_and_enough_are_up() {
        let vms = [vm("a", 2, false, false, Some(2))];
        let all = up(&["node-1", "node-2", "node-3"]);
        assert!(cluster_back(&all, false, &vms, RULE));
        assert!(!cluster_back(&all, true, &vms, RULE), "still announced");
        assert!(!cluster_back(&up(&["node-1", "node-2"]), false, &vms, RULE));
        let theirs = RestoreRule {
            min_ready_nodes: 0,
            parallel: 2,
        };
        assert!(
            cluster_back(&up(&["node-1"]), false, &vms, theirs),
            "the record's node"
        );
        assert!(!cluster_back(&up(&["node-2"]), false, &vms, theirs));
    }

    #[test]
    fn nothing_starts_before_the_cluster_is_back() {
        let vms = [vm("a", 2, false, false, Some(2))];
        let p = restore(&vms, &BTreeSet::new(), false, RULE);
        assert!(p.start.is_empty());
        assert_eq!(p.waiting, 1);
        let p = restore(&vms, &BTreeSet::new(), true, RULE);
        assert_eq!(p.start, vec![ObjKey::new("default", "a")]);
    }

    #[test]
    fn at_most_parallel_vms_start_at_once() {
        let vms = [
            vm("a", 3, true, false, Some(2)),
            vm("b", 2, false, false, Some(2)),
            vm("c", 2, false, false, Some(2)),
            vm("d", 2, false, false, Some(2)),
        ];
        let started = BTreeSet::from([ObjKey::new("default", "a")]);
        let p = restore(&vms, &started, true, RULE);
        assert_eq!(p.start, vec![ObjKey::new("default", "b")], "a holds a slot");
        assert_eq!(p.waiting, 3);
        // a runs: its record goes and two slots are free.
        let mut vms = vms.to_vec();
        vms[0].running = true;
        let p = restore(&vms, &started, true, RULE);
        assert_eq!(
            p.forget,
            vec![(ObjKey::new("default", "a"), Forget::Running)]
        );
        assert_eq!(
            p.start,
            vec![ObjKey::new("default", "b"), ObjKey::new("default", "c")]
        );
    }

    #[test]
    fn a_vm_changed_or_started_by_someone_else_is_left_alone() {
        let vms = [
            vm("edited", 3, false, false, Some(2)),
            vm("started", 2, true, false, Some(2)),
            vm("unrecorded", 1, false, false, None),
            vm("kept", 2, false, false, Some(2)),
        ];
        let p = restore(&vms, &BTreeSet::new(), true, RULE);
        assert_eq!(
            p.forget,
            vec![
                (ObjKey::new("default", "edited"), Forget::Changed),
                (ObjKey::new("default", "started"), Forget::Changed),
            ]
        );
        assert_eq!(p.start, vec![ObjKey::new("default", "kept")]);
    }

    #[test]
    fn the_record_reads_back() {
        let r = record(7);
        assert_eq!(encode(&r), "node-1-1764500000/node-1/Always/7");
        assert_eq!(decode(&encode(&r)), Some(r));
        assert_eq!(decode("garbage"), None);
        assert_eq!(decode("e/n//3"), None);
    }
}
