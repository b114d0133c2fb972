//! The evacuation controller (`pkg/virt-controller/watch/drain/evacuation/evacuation.go`):
//! VMIs marked with `status.evacuationNodeName` (by the eviction webhook) while still on that
//! node, or every VMI on a node tainted `kubevirt.io/drain:NoSchedule`, get a
//! `VirtualMachineInstanceMigration` named `kubevirt-evacuation-*`. Like upstream it creates one
//! per candidate at once; the parallel-migration limits and the failure backoff are applied by
//! the migration controller ([`super::migration`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kube::Api;
use kube::api::PostParams;
use serde_json::json;

use super::Ctx;
use super::admitter::migratable_on_eviction;
use super::crds::{
    VirtualMachineInstance, VirtualMachineInstanceMigration, VirtualMachineInstanceMigrationSpec,
};

pub const EVACUATION_ANNOTATION: &str = "kubevirt.io/evacuationMigration";
pub const VMI_NAME_LABEL: &str = "kubevirt.io/vmi-name";
pub const DRAIN_TAINT_KEY: &str = "kubevirt.io/drain";

pub(crate) async fn run(ctx: Arc<Ctx>) {
    // Creations not yet seen in the cache ("expectations" upstream), so one VMI never gets two.
    let mut expected: HashMap<String, tokio::time::Instant> = HashMap::new();
    loop {
        reconcile(&ctx, &mut expected).await;
        ctx.changed(Duration::from_secs(1)).await;
    }
}

/// The migration upstream's `GenerateNewMigration` builds.
pub fn new_migration(vmi: &VirtualMachineInstance, node: &str) -> VirtualMachineInstanceMigration {
    let name = vmi.metadata.name.clone().unwrap_or_default();
    let mut m = VirtualMachineInstanceMigration::new(
        "",
        VirtualMachineInstanceMigrationSpec {
            vmi_name: name.clone(),
            rest: BTreeMap::from([("priority".to_owned(), json!("system-critical"))]),
        },
    );
    m.metadata.name = None;
    m.metadata.generate_name = Some("kubevirt-evacuation-".into());
    m.metadata.namespace = vmi.metadata.namespace.clone();
    m.metadata.annotations = Some(BTreeMap::from([(
        EVACUATION_ANNOTATION.to_owned(),
        node.to_owned(),
    )]));
    // virt-api's migration mutator adds this label to every migration.
    m.metadata.labels = Some(BTreeMap::from([(VMI_NAME_LABEL.to_owned(), name)]));
    m
}

/// Which VMIs should get a migration now. `unfinished` holds `ns/name` of VMIs with a
/// migration that is not final; `drained_nodes` the nodes with the drain taint;
/// `active_pods` counts a VMI's non-terminal launcher pods.
pub fn candidates<'a>(
    vmis: &'a [Arc<VirtualMachineInstance>],
    unfinished: &HashSet<String>,
    drained_nodes: &HashSet<String>,
    cluster: Option<super::EvictionStrategy>,
    active_pods: impl Fn(&VirtualMachineInstance) -> usize,
) -> Vec<(&'a VirtualMachineInstance, String)> {
    let mut out = Vec::new();
    for vmi in vmis {
        let Some(node) = vmi.node_name() else {
            continue;
        };
        let marked =
            vmi.evacuation_node_name().is_some_and(|evac| evac == node) && !vmi.is_migrating();
        if !marked && !drained_nodes.contains(node) {
            continue;
        }
        if vmi.is_final() || vmi.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if !migratable_on_eviction(vmi, cluster) || !vmi.is_migratable() {
            continue;
        }
        let key = format!(
            "{}/{}",
            vmi.metadata.namespace.as_deref().unwrap_or_default(),
            vmi.metadata.name.as_deref().unwrap_or_default()
        );
        if unfinished.contains(&key) || active_pods(vmi) > 1 {
            continue;
        }
        out.push((vmi.as_ref(), node.to_owned()));
    }
    out
}

async fn reconcile(ctx: &Arc<Ctx>, expected: &mut HashMap<String, tokio::time::Instant>) {
    let migrations = ctx.vmims.state();
    let unfinished: HashSet<String> = migrations
        .iter()
        .filter(|m| !m.is_final())
        .map(|m| {
            format!(
                "{}/{}",
                m.metadata.namespace.as_deref().unwrap_or_default(),
                m.spec.vmi_name
            )
        })
        .collect();
    expected.retain(|key, at| !unfinished.contains(key) && at.elapsed() < Duration::from_secs(10));
    let drained: HashSet<String> = ctx
        .nodes
        .state()
        .iter()
        .filter(|n| {
            n.spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|ts| {
                    ts.iter()
                        .any(|t| t.key == DRAIN_TAINT_KEY && t.effect == "NoSchedule")
                })
        })
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let vmis = ctx.vmis.state();
    let picked = candidates(
        &vmis,
        &unfinished,
        &drained,
        ctx.opts.cluster_eviction_strategy,
        |v| ctx.active_pods(v),
    );
    for (vmi, node) in picked {
        let ns = vmi.metadata.namespace.clone().unwrap_or_default();
        let key = format!("{ns}/{}", vmi.metadata.name.as_deref().unwrap_or_default());
        if expected.contains_key(&key) {
            continue;
        }
        let api = Api::<VirtualMachineInstanceMigration>::namespaced(ctx.client.clone(), &ns);
        match api
            .create(&PostParams::default(), &new_migration(vmi, &node))
            .await
        {
            Ok(m) => {
                tracing::info!(
                    vmi = key,
                    migration = m.metadata.name,
                    node,
                    "created evacuation migration"
                );
                expected.insert(key, tokio::time::Instant::now());
            }
            Err(e) => tracing::warn!(vmi = key, error = %e, "creating evacuation migration failed"),
        }
    }
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

    fn names(c: Vec<(&VirtualMachineInstance, String)>) -> Vec<String> {
        c.into_iter()
            .map(|(v, _)| v.metadata.name.clone().unwrap())
            .collect()
    }

    #[test]
    fn marked_migratable_vmis_are_picked() {
        let vmis = vec![
            vmi("a", "node-1", Some("node-1"), "LiveMigrate", true),
            vmi("b", "node-1", None, "LiveMigrate", true),
            vmi("c", "node-2", Some("node-1"), "LiveMigrate", true), // already moved
            vmi("d", "node-1", Some("node-1"), "External", true), // left to the external controller
            vmi("e", "node-1", Some("node-1"), "LiveMigrate", false),
            vmi("f", "node-1", Some("node-1"), "LiveMigrateIfPossible", true),
        ];
        let got = candidates(&vmis, &HashSet::new(), &HashSet::new(), None, |_| 1);
        assert_eq!(names(got), ["a", "f"]);
    }

    #[test]
    fn unfinished_migrations_and_extra_pods_hold_back() {
        let vmis = vec![vmi("a", "node-1", Some("node-1"), "LiveMigrate", true)];
        let busy = HashSet::from(["default/a".to_owned()]);
        assert!(candidates(&vmis, &busy, &HashSet::new(), None, |_| 1).is_empty());
        assert!(candidates(&vmis, &HashSet::new(), &HashSet::new(), None, |_| 2).is_empty());
    }

    #[test]
    fn drain_taint_selects_all_vmis_of_the_node() {
        let vmis = vec![
            vmi("a", "node-1", None, "LiveMigrate", true),
            vmi("b", "node-2", None, "LiveMigrate", true),
        ];
        let drained = HashSet::from(["node-1".to_owned()]);
        assert_eq!(
            names(candidates(&vmis, &HashSet::new(), &drained, None, |_| 1)),
            ["a"]
        );
    }

    #[test]
    fn migration_object_matches_upstream() {
        let m = new_migration(
            &vmi("a", "node-1", Some("node-1"), "LiveMigrate", true),
            "node-1",
        );
        assert_eq!(
            m.metadata.generate_name.as_deref(),
            Some("kubevirt-evacuation-")
        );
        assert_eq!(
            m.metadata.annotations.unwrap()[EVACUATION_ANNOTATION],
            "node-1"
        );
        assert_eq!(m.metadata.labels.unwrap()[VMI_NAME_LABEL], "a");
        assert_eq!(m.spec.vmi_name, "a");
    }
}
