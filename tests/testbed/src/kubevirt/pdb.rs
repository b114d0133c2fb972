//! v1.5's disruption budget controller
//! (`pkg/virt-controller/watch/drain/disruptionbudget/disruptionbudget.go`, v1.5.0): every VMI
//! that needs eviction protection (strategy LiveMigrate or External, or LiveMigrateIfPossible
//! while migratable; not final, not being deleted) gets a `kubevirt-disruption-budget-*` PDB
//! owned by it, minAvailable 1, selecting its pods by `kubevirt.io/created-by`. The migration
//! controller raises it to 2 for a migration ([`super::migration`]); once that migration is
//! final and one pod is left, it is shrunk back to 1. PDBs of VMIs that no longer need one are
//! deleted. From v1.6.0 the controller only deletes PDBs, so the bed runs this only for v1.5.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::Ctx;
use super::crds::VirtualMachineInstance;
use super::launcher::CREATED_BY_LABEL;
use super::migration::MIGRATION_NAME_LABEL;

pub const NAME_PREFIX: &str = "kubevirt-disruption-budget-";

/// Whether `pdb` is controlled by the VMI with this uid.
pub fn owned_by(pdb: &PodDisruptionBudget, vmi_uid: &str) -> bool {
    pdb.metadata.owner_references.as_ref().is_some_and(|o| {
        o.iter().any(|r| {
            r.controller == Some(true) && r.kind == "VirtualMachineInstance" && r.uid == vmi_uid
        })
    })
}

/// `isMigrationProtected`: the disruption controller has seen the expansion.
pub fn protects_migration(pdb: &PodDisruptionBudget) -> bool {
    let status = pdb.status.clone().unwrap_or_default();
    status.desired_healthy == Some(2) && pdb.metadata.generation == status.observed_generation
}

/// `vmiNeedsEvictionPDB`.
pub fn needs_pdb(vmi: &VirtualMachineInstance, cluster: Option<super::EvictionStrategy>) -> bool {
    use super::EvictionStrategy as S;
    if vmi.metadata.deletion_timestamp.is_some() || vmi.is_final() {
        return false;
    }
    match super::admitter::vmi_eviction_strategy(vmi, cluster) {
        Some(S::LiveMigrate) | Some(S::External) => true,
        Some(S::LiveMigrateIfPossible) => vmi.is_migratable(),
        _ => false,
    }
}

/// The PDB `createPDB` makes for a VMI.
pub fn pdb_for(vmi: &VirtualMachineInstance) -> PodDisruptionBudget {
    serde_json::from_value(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {
            "generateName": NAME_PREFIX,
            "namespace": vmi.metadata.namespace,
            "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                                 "name": vmi.metadata.name, "uid": vmi.metadata.uid,
                                 "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {"minAvailable": 1,
                 "selector": {"matchLabels": {CREATED_BY_LABEL: vmi.metadata.uid}}},
    }))
    .expect("PDB literal is valid")
}

pub(crate) async fn run(ctx: Arc<Ctx>) {
    loop {
        reconcile(&ctx).await;
        ctx.changed(Duration::from_secs(1)).await;
    }
}

async fn reconcile(ctx: &Ctx) {
    let cluster = ctx.cluster_config().eviction_strategy;
    let vmis = ctx.vmis.state();
    let pdbs = ctx.pdbs.state();
    for vmi in &vmis {
        let uid = vmi.metadata.uid.clone().unwrap_or_default();
        let ns = vmi.metadata.namespace.clone().unwrap_or_default();
        let api = Api::<PodDisruptionBudget>::namespaced(ctx.client.clone(), &ns);
        let mine: Vec<&Arc<PodDisruptionBudget>> =
            pdbs.iter().filter(|p| owned_by(p, &uid)).collect();
        let needed = needs_pdb(vmi, cluster);
        if mine.is_empty() {
            if needed && !ctx.pdb_pending(&uid) {
                ctx.expect_pdb(&uid);
                if let Err(e) = api.create(&PostParams::default(), &pdb_for(vmi)).await {
                    tracing::warn!(vmi = vmi.metadata.name, error = %e, "creating PodDisruptionBudget failed");
                }
            }
            continue;
        }
        for pdb in mine {
            let name = pdb.metadata.name.clone().unwrap_or_default();
            if pdb.metadata.deletion_timestamp.is_some() {
                continue;
            }
            if !needed {
                let _ = api.delete(&name, &DeleteParams::default()).await;
                continue;
            }
            let migration = pdb
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MIGRATION_NAME_LABEL));
            if let Some(migration) = migration {
                let finished = ctx
                    .vmims
                    .state()
                    .iter()
                    .find(|m| {
                        m.metadata.name.as_deref() == Some(migration.as_str())
                            && m.metadata.namespace.as_deref() == Some(ns.as_str())
                    })
                    .is_none_or(|m| m.is_final() && ctx.active_pods(vmi) == 1);
                let min = pdb.spec.as_ref().and_then(|s| s.min_available.clone());
                if finished && min != Some(IntOrString::Int(1)) {
                    // `shrinkPDB` sends the JSON-patch equivalent of this.
                    let patch = json!({"spec": {"minAvailable": 1},
                                       "metadata": {"labels": {MIGRATION_NAME_LABEL: null}}});
                    let _ = api
                        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                        .await;
                }
            }
        }
    }
    // PDBs whose VMI is gone (the garbage collector would also remove them by owner).
    for pdb in &pdbs {
        let owner = pdb
            .metadata
            .owner_references
            .as_ref()
            .and_then(|o| o.iter().find(|r| r.kind == "VirtualMachineInstance"));
        if let Some(owner) = owner
            && !vmis
                .iter()
                .any(|v| v.metadata.uid.as_deref() == Some(owner.uid.as_str()))
            && pdb.metadata.deletion_timestamp.is_none()
        {
            let api = Api::<PodDisruptionBudget>::namespaced(
                ctx.client.clone(),
                pdb.metadata.namespace.as_deref().unwrap_or_default(),
            );
            let _ = api
                .delete(
                    pdb.metadata.name.as_deref().unwrap_or_default(),
                    &DeleteParams::default(),
                )
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubevirt::launcher::VmiTemplate;
    use crate::kubevirt::spec::VmiKind;

    #[test]
    fn pdb_shape_and_need() {
        let mut vmi = VmiTemplate::new(VmiKind::Live, Some("node-1")).vmi("a", "default");
        vmi.metadata.uid = Some("u".into());
        let pdb = pdb_for(&vmi);
        assert!(owned_by(&pdb, "u"));
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.min_available, Some(IntOrString::Int(1)));
        assert_eq!(
            spec.selector.unwrap().match_labels.unwrap()[CREATED_BY_LABEL],
            "u"
        );
        // Running and migratable LiveMigrate: protected; None: not.
        vmi.status = Some(
            serde_json::from_value(json!({"phase": "Running",
            "conditions": [{"type": "LiveMigratable", "status": "True"}]}))
            .unwrap(),
        );
        assert!(needs_pdb(&vmi, None));
        vmi.spec.eviction_strategy = Some("None".into());
        assert!(!needs_pdb(&vmi, None));
        vmi.spec.eviction_strategy = Some("LiveMigrateIfPossible".into());
        assert!(needs_pdb(&vmi, None));
    }
}
