//! Which of a node's pods a drain evicts, in which group, and which it leaves alone.
//! Pure: the same pods and VMIs always give the same plan, so it is recomputed on every watch
//! update and pods that appear mid-drain are picked up.

use std::collections::HashMap;

use super::model::{MigrationJob, PodInfo, PodRef, Scope, VmiInfo};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// `kubectl drain --ignore-daemonsets`: the DaemonSet controller would recreate it at once.
    DaemonSet,
    /// A static pod's mirror; the API cannot remove the kubelet's static pod.
    Mirror,
    /// Succeeded or Failed: nothing left to stop.
    Finished,
    /// Already being deleted; only its end is awaited.
    Terminating,
    /// Not a virt-launcher pod and the scope is `vms`.
    OutOfScope,
    /// A launcher pod whose VMI does not run on this node (a migration target, or a source pod
    /// finishing after its VMI moved away).
    NotOurVmi,
    /// A hotplugged volume's attachment pod: it goes with its VM's launcher pod.
    Hotplug,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// virt-launcher pods of VMIs running on the node, evicted first.
    pub vm_pods: Vec<PodRef>,
    /// Other evictable pods (scope `all` only).
    pub other_pods: Vec<PodRef>,
    /// Non-VM pods the node must be rid of before it counts as empty (scope `all`): those to
    /// evict plus those already terminating.
    pub other_remaining: Vec<PodRef>,
    /// Target pods of migrations into this node, still under way: the node is not empty while
    /// a VM is being handed to it.
    pub inbound: Vec<(PodRef, MigrationJob)>,
    pub skipped: Vec<(PodRef, SkipReason)>,
}

pub fn plan<'a>(
    node: &str,
    scope: Scope,
    pods: impl IntoIterator<Item = &'a PodInfo>,
    vmis: &HashMap<String, VmiInfo>,
) -> Plan {
    let mut out = Plan::default();
    let mut sorted: Vec<&PodInfo> = pods
        .into_iter()
        .filter(|p| p.node_name.as_deref() == Some(node))
        .collect();
    let launchers: HashMap<&String, &PodInfo> = sorted
        .iter()
        .filter(|p| p.is_launcher)
        .map(|p| (&p.uid, *p))
        .collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    for p in sorted {
        let r = p.pod_ref();
        if p.is_finished() {
            out.skipped.push((r, SkipReason::Finished));
            continue;
        }
        if p.is_launcher {
            let ours = p
                .created_by
                .as_ref()
                .and_then(|uid| vmis.get(uid))
                .or_else(|| {
                    // Pods created before KubeVirt set the created-by label: match by name.
                    let domain = p.domain.as_ref()?;
                    vmis.values()
                        .find(|v| v.key.namespace == p.key.namespace && &v.key.name == domain)
                })
                .is_some_and(|v| v.runs_on(node));
            if !ours {
                if let Some(job) = p.migration_job.clone().filter(|_| !p.terminating) {
                    out.inbound.push((r.clone(), job));
                }
                out.skipped.push((r, SkipReason::NotOurVmi));
            } else if p.terminating {
                // An evicted None-strategy VM's pod: its VMI is followed, nothing to re-send.
                out.skipped.push((r, SkipReason::Terminating));
            } else {
                out.vm_pods.push(r);
            }
            continue;
        }
        let launcher_alive = |uid: &String| {
            launchers
                .get(uid)
                .is_some_and(|l| !l.is_finished() && l.node_name.as_deref() == Some(node))
        };
        if scope == Scope::Vms {
            out.skipped.push((r, SkipReason::OutOfScope));
        } else if p.is_hotplug && p.owner_pod.as_ref().is_some_and(launcher_alive) {
            out.skipped.push((r, SkipReason::Hotplug));
        } else if p.controller_kind.as_deref() == Some("DaemonSet") {
            out.skipped.push((r, SkipReason::DaemonSet));
        } else if p.is_mirror {
            out.skipped.push((r, SkipReason::Mirror));
        } else if p.terminating {
            out.other_remaining.push(r.clone());
            out.skipped.push((r, SkipReason::Terminating));
        } else {
            out.other_remaining.push(r.clone());
            out.other_pods.push(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::model::fixtures::*;

    const NODE: &str = "node-1";

    fn vmi_map(vs: &[VmiInfo]) -> HashMap<String, VmiInfo> {
        vs.iter().map(|v| (v.uid.clone(), v.clone())).collect()
    }

    fn names(rs: &[PodRef]) -> Vec<&str> {
        rs.iter().map(|r| r.key.name.as_str()).collect()
    }

    #[test]
    fn vms_scope_evicts_only_launchers_of_vmis_on_the_node() {
        let a = vmi("a", NODE);
        let b = vmi("b", NODE);
        let elsewhere = vmi("c", "node-2");
        let pods = vec![
            launcher(&a, NODE),
            launcher(&b, NODE),
            pod("web", NODE),
            pod("other-node", "node-2"),
        ];
        // A migration target of a VMI running elsewhere, placed on our node.
        let target = launcher(&elsewhere, NODE);
        let mut all = pods.clone();
        all.push(target);
        let p = plan(NODE, Scope::Vms, &all, &vmi_map(&[a, b, elsewhere]));
        assert_eq!(
            names(&p.vm_pods),
            vec!["virt-launcher-a-abcde", "virt-launcher-b-abcde"]
        );
        assert!(p.other_pods.is_empty());
        assert!(
            p.skipped
                .iter()
                .any(|(r, s)| r.key.name == "web" && *s == SkipReason::OutOfScope)
        );
        assert!(
            p.skipped
                .iter()
                .any(|(r, s)| r.key.name == "virt-launcher-c-abcde" && *s == SkipReason::NotOurVmi)
        );
        assert!(!p.skipped.iter().any(|(r, _)| r.key.name == "other-node"));
    }

    #[test]
    fn all_scope_skips_daemonset_mirror_and_finished_pods() {
        let a = vmi("a", NODE);
        let mut mirror = pod("etcd-node-1", NODE);
        mirror.is_mirror = true;
        let mut done = pod("job-1", NODE);
        done.phase = Some("Succeeded".into());
        let mut leaving = pod("leaving", NODE);
        leaving.terminating = true;
        let pods = vec![
            launcher(&a, NODE),
            owned_by(pod("web-1", NODE), "ReplicaSet"),
            pod("bare", NODE),
            owned_by(pod("virt-handler-x", NODE), "DaemonSet"),
            mirror,
            done,
            leaving,
        ];
        let p = plan(NODE, Scope::All, &pods, &vmi_map(&[a]));
        assert_eq!(names(&p.vm_pods), vec!["virt-launcher-a-abcde"]);
        assert_eq!(names(&p.other_pods), vec!["bare", "web-1"]);
        assert_eq!(names(&p.other_remaining), vec!["bare", "leaving", "web-1"]);
        let skipped: Vec<(&str, SkipReason)> = p
            .skipped
            .iter()
            .map(|(r, s)| (r.key.name.as_str(), *s))
            .collect();
        assert!(skipped.contains(&("virt-handler-x", SkipReason::DaemonSet)));
        assert!(skipped.contains(&("etcd-node-1", SkipReason::Mirror)));
        assert!(skipped.contains(&("job-1", SkipReason::Finished)));
        assert!(skipped.contains(&("leaving", SkipReason::Terminating)));
    }

    #[test]
    fn launcher_of_migrated_vmi_is_not_evicted_again() {
        let a = migrated(vmi("a", NODE), "node-2");
        let pods = vec![launcher(&a, NODE)];
        let p = plan(NODE, Scope::Vms, &pods, &vmi_map(&[a]));
        assert!(p.vm_pods.is_empty());
    }

    #[test]
    fn a_migration_into_the_node_is_inbound_a_source_pod_left_behind_is_not() {
        let here = vmi("a", NODE);
        let elsewhere = vmi("b", "node-2");
        let mut finished_source = launcher(&vmi("c", "node-3"), NODE);
        finished_source.terminating = true;
        let pods = vec![
            launcher(&here, NODE),
            target_pod(&elsewhere, NODE),
            finished_source,
        ];
        let p = plan(NODE, Scope::Vms, &pods, &vmi_map(&[here, elsewhere]));
        assert_eq!(p.inbound.len(), 1);
        assert_eq!(p.inbound[0].0.key.name, "virt-launcher-b-target");
        assert_eq!(p.inbound[0].1.name.as_deref(), Some("vmim-b"));
        assert_eq!(names(&p.vm_pods), vec!["virt-launcher-a-abcde"]);
    }

    #[test]
    fn hotplug_pods_stay_while_their_vm_runs() {
        let a = vmi("a", NODE);
        let l = launcher(&a, NODE);
        let hp = hotplug(&l);
        let p = plan(
            NODE,
            Scope::All,
            &[l.clone(), hp.clone()],
            &vmi_map(std::slice::from_ref(&a)),
        );
        assert!(p.other_pods.is_empty());
        assert!(
            p.skipped
                .iter()
                .any(|(r, s)| r.uid == hp.uid && *s == SkipReason::Hotplug)
        );
        // Its launcher gone: an ordinary pod to evict.
        let p = plan(NODE, Scope::All, &[hp], &vmi_map(&[a]));
        assert_eq!(
            names(&p.other_pods),
            vec!["hp-volume-virt-launcher-a-abcde"]
        );
    }

    #[test]
    fn launcher_without_created_by_matched_by_domain() {
        let a = vmi("a", NODE);
        let mut l = launcher(&a, NODE);
        l.created_by = None;
        let p = plan(NODE, Scope::Vms, &[l], &vmi_map(&[a]));
        assert_eq!(p.vm_pods.len(), 1);
    }
}
