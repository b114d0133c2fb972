//! The evacuation controller (`pkg/virt-controller/watch/drain/evacuation/evacuation.go`,
//! v1.5.0–v1.8.0): a work queue of node names. A node is queued when one of its VMIs changes
//! (by the VMI's current `status.nodeName`), when a migration is added (by its
//! `kubevirt.io/evacuationMigration` annotation, else its VMI's node) or changes (its VMI's
//! current node), or when the Node changes. Syncing a node picks the VMIs marked with
//! `status.evacuationNodeName` (or all, under the drain taint) that are `LiveMigratable`, have
//! no unfinished migration and one active pod (a VMI skipped for a second pod comes back
//! through the VMI update the VMI controller makes when that pod goes, see
//! [`super::lifecycle`]; there is no pod handler here), and creates `kubevirt-evacuation-*` migrations
//! for them: without the `MigrationPriorityQueue` gate at most
//! min(parallelMigrationsPerCluster − running, parallelOutboundMigrationsPerNode − running from
//! this node), re-queueing the node after 5 s when there is no room; with the gate, all at
//! once, each with `priority: system-critical`. After creating, the node waits until its
//! migrations are seen ("expectations") before it is synced again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use tokio::time::Instant;

use super::Ctx;
use super::admitter::migratable_on_eviction;
use super::config::ClusterConfig;
use super::crds::{
    VirtualMachineInstance, VirtualMachineInstanceMigration, VirtualMachineInstanceMigrationSpec,
};

pub const EVACUATION_ANNOTATION: &str = "kubevirt.io/evacuationMigration";
pub const VMI_NAME_LABEL: &str = "kubevirt.io/vmi-name";
pub const DRAIN_TAINT_KEY: &str = "kubevirt.io/drain";
/// `c.Queue.AddAfter(node.Name, 5*time.Second)` when the limits leave no room.
pub const REQUEUE_WHEN_FULL: Duration = Duration::from_secs(5);
/// `c.Queue.AddAfter(node.Name, 1*time.Minute)` to refresh the "not migrateable" events.
pub const REQUEUE_FOR_NON_MIGRATABLE: Duration = Duration::from_secs(60);
/// Expectations that are never observed expire (`ExpectationsTimeout`, 5 min).
const EXPECTATIONS_TIMEOUT: Duration = Duration::from_secs(300);

/// `IsRunning` of a migration (`staging/src/kubevirt.io/api/core/v1/types.go`): any phase but
/// unset, Pending, WaitingForSync, Synchronizing and the final ones.
pub fn migration_is_running(m: &VirtualMachineInstanceMigration) -> bool {
    !matches!(
        m.phase(),
        "" | "Pending" | "WaitingForSync" | "Synchronizing" | "Succeeded" | "Failed"
    )
}

fn key_of(vmi: &VirtualMachineInstance) -> String {
    format!(
        "{}/{}",
        vmi.metadata.namespace.as_deref().unwrap_or_default(),
        vmi.metadata.name.as_deref().unwrap_or_default()
    )
}

/// What one sync of a node decided.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// `namespace/name` of the VMIs to create a migration for, in order.
    pub migrate: Vec<String>,
    pub requeue_after: Option<Duration>,
}

/// Everything a node's sync reads, from the controller's caches.
pub struct NodeState<'a> {
    pub node: &'a str,
    pub drain_tainted: bool,
    /// VMIs whose `status.nodeName` is this node.
    pub vmis: &'a [Arc<VirtualMachineInstance>],
    /// Migrations not Succeeded or Failed, cluster-wide.
    pub unfinished: &'a [Arc<VirtualMachineInstanceMigration>],
}

/// `sync` of the evacuation controller, as a decision.
pub fn plan(
    state: &NodeState<'_>,
    config: &ClusterConfig,
    priority_queue: bool,
    active_pods: impl Fn(&VirtualMachineInstance) -> usize,
) -> Plan {
    // vmisToMigrate: the drain taint takes every VMI of the node, else the marked ones that
    // have not moved yet and are not migrating.
    let to_migrate: Vec<&Arc<VirtualMachineInstance>> = if state.drain_tainted {
        state.vmis.iter().collect()
    } else {
        state
            .vmis
            .iter()
            .filter(|v| {
                v.evacuation_node_name()
                    .is_some_and(|evac| Some(evac) == v.node_name())
                    && !v.is_migrating()
            })
            .collect()
    };
    if to_migrate.is_empty() {
        return Plan::default();
    }
    let busy: HashSet<String> = state
        .unfinished
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m.metadata.namespace.as_deref().unwrap_or_default(),
                m.spec.vmi_name
            )
        })
        .collect();
    let mut migratable = Vec::new();
    let mut non_migratable = 0usize;
    for vmi in to_migrate {
        if vmi.is_final() || vmi.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if !migratable_on_eviction(vmi, config.eviction_strategy) {
            continue;
        }
        if !vmi.is_migratable() {
            non_migratable += 1;
            continue;
        }
        let key = key_of(vmi);
        if busy.contains(&key) || active_pods(vmi) > 1 {
            continue;
        }
        migratable.push(key);
    }
    if migratable.is_empty() && non_migratable == 0 {
        return Plan::default();
    }
    // Upstream takes the indexer's order; the bed sorts so runs repeat.
    migratable.sort();
    if priority_queue {
        return Plan {
            migrate: migratable,
            requeue_after: None,
        };
    }
    let running: Vec<&Arc<VirtualMachineInstanceMigration>> = state
        .unfinished
        .iter()
        .filter(|m| migration_is_running(m))
        .collect();
    // `numOfVMIMForThisSourceNode` matches by VMI name only.
    let names_here: HashSet<&str> = state
        .vmis
        .iter()
        .filter_map(|v| v.metadata.name.as_deref())
        .collect();
    let outbound = running
        .iter()
        .filter(|m| names_here.contains(m.spec.vmi_name.as_str()))
        .count() as i64;
    let m = &config.migrations;
    let free_cluster = i64::from(m.parallel_migrations_per_cluster) - running.len() as i64;
    let free_node = i64::from(m.parallel_outbound_migrations_per_node) - outbound;
    let free = free_cluster.min(free_node);
    if free <= 0 {
        return Plan {
            migrate: Vec::new(),
            requeue_after: Some(REQUEUE_WHEN_FULL),
        };
    }
    let take = (free as usize).min(migratable.len());
    let left = free as usize - take;
    let requeue_after =
        (take == 0 && left.min(non_migratable) > 0).then_some(REQUEUE_FOR_NON_MIGRATABLE);
    migratable.truncate(take);
    Plan {
        migrate: migratable,
        requeue_after,
    }
}

/// The migration upstream's `GenerateNewMigration` builds. `priority` is set only where the
/// release sets it: with the priority queue enabled (v1.7, v1.8 behind the gate).
pub fn new_migration(
    vmi: &VirtualMachineInstance,
    node: &str,
    priority: bool,
) -> VirtualMachineInstanceMigration {
    let name = vmi.metadata.name.clone().unwrap_or_default();
    let mut rest = BTreeMap::new();
    if priority {
        rest.insert("priority".to_owned(), json!("system-critical"));
    }
    let mut m = VirtualMachineInstanceMigration::new(
        "",
        VirtualMachineInstanceMigrationSpec {
            vmi_name: name,
            rest,
        },
    );
    m.metadata.name = None;
    m.metadata.generate_name = Some("kubevirt-evacuation-".into());
    m.metadata.namespace = vmi.metadata.namespace.clone();
    m.metadata.annotations = Some(BTreeMap::from([(
        EVACUATION_ANNOTATION.to_owned(),
        node.to_owned(),
    )]));
    m
}

/// The node queue: each node at most once, at its earliest due time (as client-go's delaying
/// work queue keeps the earliest of repeated `AddAfter`s).
#[derive(Default)]
struct Queue {
    due: HashMap<String, Instant>,
}

impl Queue {
    fn add_after(&mut self, node: &str, after: Duration) {
        let at = Instant::now() + after;
        self.due
            .entry(node.to_owned())
            .and_modify(|d| *d = (*d).min(at))
            .or_insert(at);
    }

    fn add(&mut self, node: &str) {
        self.add_after(node, Duration::ZERO);
    }

    fn take_due(&mut self) -> Vec<String> {
        let now = Instant::now();
        let mut ready: Vec<String> = self
            .due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(n, _)| n.clone())
            .collect();
        ready.sort();
        for n in &ready {
            self.due.remove(n);
        }
        ready
    }

    fn next(&self) -> Option<Instant> {
        self.due.values().min().copied()
    }
}

/// What the controller last saw of each object, to turn cache snapshots into the add, update
/// and delete events upstream's informer handlers get.
#[derive(Default)]
struct Seen {
    /// VMI uid → (resourceVersion, node).
    vmis: HashMap<String, (String, Option<String>)>,
    /// VMIM uid → (resourceVersion, namespace/vmi).
    vmims: HashMap<String, (String, String)>,
    /// Node name → its spec and metadata, as last seen.
    nodes: HashMap<String, String>,
}

impl Seen {
    /// Queues the nodes the changes since the last call concern.
    fn enqueue_changes(&mut self, ctx: &Ctx, queue: &mut Queue) {
        let vmis = ctx.vmis.state();
        let node_of = |key: &str| -> Option<String> {
            let (ns, name) = key.split_once('/')?;
            ctx.vmi(ns, name)?.node_name().map(str::to_owned)
        };
        let mut present = HashSet::new();
        for vmi in &vmis {
            let uid = vmi.metadata.uid.clone().unwrap_or_default();
            let rv = vmi.metadata.resource_version.clone().unwrap_or_default();
            let node = vmi.node_name().map(str::to_owned);
            present.insert(uid.clone());
            if self.vmis.get(&uid).map(|(r, _)| r) != Some(&rv) {
                if let Some(n) = &node {
                    queue.add(n);
                }
                self.vmis.insert(uid, (rv, node));
            }
        }
        self.vmis.retain(|uid, (_, node)| {
            let keep = present.contains(uid);
            if !keep && let Some(n) = node {
                queue.add(n);
            }
            keep
        });

        let mut present = HashSet::new();
        for m in ctx.vmims.state() {
            let uid = m.metadata.uid.clone().unwrap_or_default();
            let rv = m.metadata.resource_version.clone().unwrap_or_default();
            let key = format!(
                "{}/{}",
                m.metadata.namespace.as_deref().unwrap_or_default(),
                m.spec.vmi_name
            );
            present.insert(uid.clone());
            match self.vmims.get(&uid) {
                None => {
                    let annotated = m
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(EVACUATION_ANNOTATION))
                        .cloned();
                    if let Some(n) = annotated.or_else(|| node_of(&key)) {
                        queue.add(&n);
                    }
                }
                Some((old, _)) if *old != rv => {
                    if let Some(n) = node_of(&key) {
                        queue.add(&n);
                    }
                }
                Some(_) => {}
            }
            self.vmims.insert(uid, (rv, key));
        }
        self.vmims.retain(|uid, (_, key)| {
            let keep = present.contains(uid);
            if !keep && let Some(n) = node_of(key) {
                queue.add(&n);
            }
            keep
        });

        // The bed's kubelets renew the Ready condition every 10 s; a real kubelet writes its
        // Node status only on change or every 5 min (`nodeStatusReportFrequency`), so Node
        // events mean spec or metadata changes (cordon, taints, labels) there. Passing the
        // bed's heartbeats on would re-sync nodes far more often than upstream does.
        for node in ctx.nodes.state() {
            let name = node.metadata.name.clone().unwrap_or_default();
            let fingerprint = serde_json::to_string(&(
                &node.spec,
                &node.metadata.labels,
                &node.metadata.annotations,
            ))
            .unwrap_or_default();
            if self.nodes.get(&name) != Some(&fingerprint) {
                queue.add(&name);
                self.nodes.insert(name, fingerprint);
            }
        }
    }
}

/// Migrations created for a node and not yet seen in the cache.
struct Expectation {
    names: Vec<String>,
    since: Instant,
}

pub(crate) async fn run(ctx: Arc<Ctx>) {
    let mut queue = Queue::default();
    let mut seen = Seen::default();
    let mut expected: HashMap<String, Expectation> = HashMap::new();
    loop {
        seen.enqueue_changes(&ctx, &mut queue);
        for node in queue.take_due() {
            if let Some(e) = expected.get(&node) {
                let all_seen = e.names.iter().all(|name| {
                    ctx.vmims
                        .state()
                        .iter()
                        .any(|m| m.metadata.name.as_deref() == Some(name))
                });
                if !all_seen && e.since.elapsed() < EXPECTATIONS_TIMEOUT {
                    // The migration's add event queues the node again.
                    continue;
                }
                expected.remove(&node);
            }
            let (created, requeue) = sync(&ctx, &node).await;
            if !created.is_empty() {
                expected.insert(
                    node.clone(),
                    Expectation {
                        names: created,
                        since: Instant::now(),
                    },
                );
            }
            if let Some(after) = requeue {
                queue.add_after(&node, after);
            }
        }
        let wait = queue
            .next()
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        if !wait.is_zero() {
            ctx.changed(wait).await;
        }
    }
}

/// Syncs one node; returns the names of the migrations created and when to look again.
async fn sync(ctx: &Arc<Ctx>, node_name: &str) -> (Vec<String>, Option<Duration>) {
    let Some(node) = ctx
        .nodes
        .state()
        .into_iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name))
    else {
        return (Vec::new(), None);
    };
    let config = ctx.cluster_config();
    let drain_tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| {
            ts.iter().any(|t| {
                t.key == config.migrations.node_drain_taint_key && t.effect == "NoSchedule"
            })
        });
    let vmis: Vec<Arc<VirtualMachineInstance>> = ctx
        .vmis
        .state()
        .into_iter()
        .filter(|v| v.node_name() == Some(node_name))
        .collect();
    let unfinished: Vec<Arc<VirtualMachineInstanceMigration>> = ctx
        .vmims
        .state()
        .into_iter()
        .filter(|m| !m.is_final())
        .collect();
    let priority_queue = config.priority_queue_enabled(ctx.opts.version);
    let decided = plan(
        &NodeState {
            node: node_name,
            drain_tainted,
            vmis: &vmis,
            unfinished: &unfinished,
        },
        &config,
        priority_queue,
        |v| ctx.active_pods(v),
    );
    let mut created = Vec::new();
    for key in &decided.migrate {
        let Some(vmi) = vmis.iter().find(|v| key_of(v) == *key) else {
            continue;
        };
        let ns = vmi.metadata.namespace.clone().unwrap_or_default();
        let api = Api::<VirtualMachineInstanceMigration>::namespaced(ctx.client.clone(), &ns);
        match api
            .create(
                &PostParams::default(),
                &new_migration(vmi, node_name, priority_queue),
            )
            .await
        {
            Ok(m) => {
                tracing::info!(
                    vmi = key,
                    migration = m.metadata.name,
                    node = node_name,
                    "created evacuation migration"
                );
                created.extend(m.metadata.name);
            }
            Err(e) => {
                tracing::warn!(vmi = key, error = %e, "creating evacuation migration failed")
            }
        }
    }
    (created, decided.requeue_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmi(
        name: &str,
        node: &str,
        evac: Option<&str>,
        strategy: &str,
        migratable: bool,
    ) -> Arc<VirtualMachineInstance> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"evictionStrategy": strategy},
                "status": {"phase": "Running", "nodeName": node, "evacuationNodeName": evac,
                           "conditions": [{"type": "LiveMigratable", "status": if migratable {"True"} else {"False"}}]},
            }))
            .unwrap(),
        )
    }

    fn mig(vmi: &str, phase: &str) -> Arc<VirtualMachineInstanceMigration> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                "metadata": {"name": format!("m-{vmi}"), "namespace": "default"},
                "spec": {"vmiName": vmi},
                "status": {"phase": phase},
            }))
            .unwrap(),
        )
    }

    fn marked(n: usize) -> Vec<Arc<VirtualMachineInstance>> {
        (1..=n)
            .map(|i| {
                vmi(
                    &format!("v{i}"),
                    "node-1",
                    Some("node-1"),
                    "LiveMigrate",
                    true,
                )
            })
            .collect()
    }

    fn plan_for(
        vmis: &[Arc<VirtualMachineInstance>],
        unfinished: &[Arc<VirtualMachineInstanceMigration>],
        pq: bool,
    ) -> Plan {
        plan(
            &NodeState {
                node: "node-1",
                drain_tainted: false,
                vmis,
                unfinished,
            },
            &ClusterConfig::default(),
            pq,
            |_| 1,
        )
    }

    #[test]
    fn marked_migratable_vmis_are_picked() {
        let vmis = vec![
            vmi("a", "node-1", Some("node-1"), "LiveMigrate", true),
            vmi("b", "node-1", None, "LiveMigrate", true),
            vmi("d", "node-1", Some("node-1"), "External", true), // left to the external controller
            vmi("e", "node-1", Some("node-1"), "LiveMigrate", false),
            vmi("f", "node-1", Some("node-1"), "LiveMigrateIfPossible", true),
        ];
        assert_eq!(
            plan_for(&vmis, &[], true).migrate,
            ["default/a", "default/f"]
        );
    }

    #[test]
    fn at_most_the_free_outbound_slots_then_requeue_after_5s() {
        let vmis = marked(5);
        let first = plan_for(&vmis, &[], false);
        assert_eq!(first.migrate, ["default/v1", "default/v2"]);
        assert_eq!(first.requeue_after, None);
        // Two of this node's migrations running: no room, look again in 5 s.
        let running = [mig("v1", "Running"), mig("v2", "Scheduling")];
        let full = plan_for(&vmis, &running, false);
        assert!(full.migrate.is_empty());
        assert_eq!(full.requeue_after, Some(REQUEUE_WHEN_FULL));
        // Pending migrations hold no slot (only running ones count), but their VMIs are busy.
        let pending = [mig("v1", "Pending"), mig("v2", "")];
        assert_eq!(
            plan_for(&vmis, &pending, false).migrate,
            ["default/v3", "default/v4"]
        );
        // One slot left.
        let one = [mig("v1", "Running")];
        assert_eq!(plan_for(&vmis, &one, false).migrate, ["default/v2"]);
    }

    #[test]
    fn the_cluster_limit_counts_other_nodes_migrations() {
        let vmis = marked(3);
        let elsewhere: Vec<_> = (0..4).map(|i| mig(&format!("x{i}"), "Running")).collect();
        assert_eq!(plan_for(&vmis, &elsewhere, false).migrate, ["default/v1"]);
    }

    #[test]
    fn priority_queue_creates_all_at_once() {
        let vmis = marked(5);
        let running = [mig("x1", "Running"), mig("x2", "Running")];
        let p = plan_for(&vmis, &running, true);
        assert_eq!(p.migrate.len(), 5);
        assert_eq!(p.requeue_after, None);
    }

    #[test]
    fn unfinished_migrations_and_extra_pods_hold_back() {
        let vmis = vec![vmi("a", "node-1", Some("node-1"), "LiveMigrate", true)];
        assert!(
            plan_for(&vmis, &[mig("a", "Pending")], false)
                .migrate
                .is_empty()
        );
        let p = plan(
            &NodeState {
                node: "node-1",
                drain_tainted: false,
                vmis: &vmis,
                unfinished: &[],
            },
            &ClusterConfig::default(),
            false,
            |_| 2,
        );
        assert!(p.migrate.is_empty());
    }

    #[test]
    fn drain_taint_selects_all_vmis_of_the_node() {
        let vmis = vec![vmi("a", "node-1", None, "LiveMigrate", true)];
        let p = plan(
            &NodeState {
                node: "node-1",
                drain_tainted: true,
                vmis: &vmis,
                unfinished: &[],
            },
            &ClusterConfig::default(),
            false,
            |_| 1,
        );
        assert_eq!(p.migrate, ["default/a"]);
    }

    #[test]
    fn migration_object_matches_upstream() {
        let v = vmi("a", "node-1", Some("node-1"), "LiveMigrate", true);
        let m = new_migration(&v, "node-1", false);
        assert_eq!(
            m.metadata.generate_name.as_deref(),
            Some("kubevirt-evacuation-")
        );
        assert_eq!(
            m.metadata.annotations.unwrap()[EVACUATION_ANNOTATION],
            "node-1"
        );
        assert_eq!(m.spec.vmi_name, "a");
        assert!(!m.spec.rest.contains_key("priority"));
        let critical = new_migration(&v, "node-1", true);
        assert_eq!(critical.spec.rest["priority"], "system-critical");
    }

    #[test]
    fn queue_keeps_the_earliest_due_time() {
        let mut q = Queue::default();
        q.add_after("node-1", Duration::from_secs(5));
        q.add("node-1");
        assert_eq!(q.take_due(), ["node-1"]);
        assert!(q.take_due().is_empty());
    }
}
