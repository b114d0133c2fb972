//! A VMI's life outside migrations:
//! - start: virt-controller's VMI controller creates the launcher pod
//!   (`pkg/virt-controller/watch/vmi/vmi.go`, phase Pending → Scheduling → Scheduled) and
//!   virt-handler reports the domain running (`pkg/virt-handler/vm.go`: phase Running,
//!   `kubevirt.io/nodeName` label, conditions incl. `LiveMigratable`);
//! - stop: when a launcher pod gets a deletion timestamp, virt-launcher receives SIGTERM and
//!   shuts the domain down gracefully (ACPI) within the grace period
//!   (`cmd/virt-launcher`, `pkg/virt-launcher/virtwrap/manager.go`); virt-handler then
//!   reports the VMI `Succeeded` and the launcher exits. Pods that are not the VMI's active
//!   pod (a migration target on the way out, a finished source) just exit.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use super::Ctx;
use super::crds::VirtualMachineInstance;
use super::launcher::{self, LIVE_MIGRATABLE_ANNOTATION, NODE_NAME_LABEL};

pub(crate) async fn run(ctx: Arc<Ctx>) {
    let mut creating: HashMap<String, tokio::time::Instant> = HashMap::new();
    let mut shutting_down: HashSet<String> = HashSet::new();
    // Dropping the set (this task aborted) aborts shutdowns in progress.
    let mut shutdowns = tokio::task::JoinSet::new();
    loop {
        start_vmis(&ctx, &mut creating).await;
        while shutdowns.try_join_next().is_some() {}
        stop_pods(&ctx, &mut shutting_down, &mut shutdowns);
        ctx.changed(Duration::from_secs(1)).await;
    }
}

fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn pod_node(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("")
}

async fn start_vmis(ctx: &Arc<Ctx>, creating: &mut HashMap<String, tokio::time::Instant>) {
    creating.retain(|_, at| at.elapsed() < Duration::from_secs(10));
    for vmi in ctx.vmis.state() {
        if vmi.metadata.deletion_timestamp.is_some() || vmi.is_final() {
            continue;
        }
        let uid = vmi.metadata.uid.clone().unwrap_or_default();
        let ns = vmi.metadata.namespace.clone().unwrap_or_default();
        let name = vmi.metadata.name.clone().unwrap_or_default();
        let api = Api::<VirtualMachineInstance>::namespaced(ctx.client.clone(), &ns);
        let pods = ctx.pods_of(&vmi);
        match vmi.phase() {
            "" | "Pending" => {
                if !pods.is_empty() || creating.contains_key(&uid) {
                    continue;
                }
                let wanted = vmi
                    .spec
                    .node_selector
                    .as_ref()
                    .and_then(|s| s.get("kubernetes.io/hostname").cloned());
                let Some(node) = wanted.or_else(|| ctx.target_nodes("").into_iter().next()) else {
                    continue;
                };
                creating.insert(uid, tokio::time::Instant::now());
                let pod = launcher::launcher_pod(&vmi, &node, None);
                let created = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
                    .create(&PostParams::default(), &pod)
                    .await;
                if let Err(e) = created {
                    tracing::warn!(vmi = name, error = %e, "creating launcher pod failed");
                    continue;
                }
                let _ = api
                    .patch_status(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"status": {"phase": "Scheduling"}})),
                    )
                    .await;
            }
            "Scheduling" | "Scheduled" => {
                let Some(pod) = pods.iter().find(|p| pod_phase(p) == "Running") else {
                    continue;
                };
                let node = pod_node(pod).to_owned();
                let migratable = vmi
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(LIVE_MIGRATABLE_ANNOTATION))
                    .is_none_or(|v| v != "false");
                let now = Utc::now();
                let live = if migratable {
                    json!({"type": "LiveMigratable", "status": "True", "lastProbeTime": null, "lastTransitionTime": now})
                } else {
                    // The reason upstream gives for the most common cause (`pkg/virt-controller/watch/vmi/conditions.go`).
                    json!({"type": "LiveMigratable", "status": "False", "reason": "DisksNotLiveMigratable",
                           "message": "cannot migrate VMI: PVC rootdisk is not shared, live migration requires that all PVCs must be shared (using ReadWriteMany access mode)",
                           "lastProbeTime": null, "lastTransitionTime": now})
                };
                let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
                let status = json!({"status": {
                    "phase": "Running", "nodeName": node,
                    "conditions": [
                        {"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": now},
                        live,
                    ],
                    "activePods": {pod_uid: node},
                    "migrationMethod": "LiveMigration", "migrationTransport": "Unix",
                    "qosClass": "Burstable", "guestOSInfo": {},
                    "launcherContainerImageVersion": "quay.io/kubevirt/virt-launcher:v1.8.0",
                }});
                let _ = api
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"labels": {NODE_NAME_LABEL: node}}})),
                    )
                    .await;
                if let Err(e) = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                    .await
                {
                    tracing::warn!(vmi = name, error = %e, "reporting VMI Running failed");
                }
            }
            "Running" => {
                // The domain's pod vanished without a shutdown (force deletion): virt-handler
                // finds the domain gone and the VMI fails.
                let node = vmi.node_name().unwrap_or_default();
                if !pods.iter().any(|p| pod_node(p) == node) {
                    let _ = api
                        .patch_status(
                            &name,
                            &PatchParams::default(),
                            &Patch::Merge(json!({"status": {"phase": "Failed",
                                "conditions": [{"type": "Ready", "status": "False", "reason": "PodTerminating"}]}})),
                        )
                        .await;
                }
            }
            _ => {}
        }
    }
}

/// Starts a shutdown for each launcher pod newly marked for deletion.
fn stop_pods(
    ctx: &Arc<Ctx>,
    shutting_down: &mut HashSet<String>,
    shutdowns: &mut tokio::task::JoinSet<()>,
) {
    let pods = ctx.pods.state();
    let present: HashSet<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
    shutting_down.retain(|uid| present.contains(uid));
    for pod in pods {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_none()
            || matches!(pod_phase(&pod), "Succeeded" | "Failed")
            || !shutting_down.insert(uid.clone())
        {
            continue;
        }
        let ctx = ctx.clone();
        shutdowns.spawn(async move { shut_down(ctx, pod, uid).await });
    }
}

async fn shut_down(ctx: Arc<Ctx>, pod: Arc<Pod>, pod_uid: String) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let vmi_name = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(super::admitter::DOMAIN_ANNOTATION))
        .cloned()
        .unwrap_or_default();
    let vmi = ctx.vmi(&ns, &vmi_name);
    let active = vmi.as_ref().is_some_and(|v| {
        !v.is_final()
            && v.node_name() == Some(pod_node(&pod))
            && v.metadata.uid.as_deref()
                == pod
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(launcher::CREATED_BY_LABEL))
                    .map(String::as_str)
    });
    if active {
        let grace = Duration::from_secs(
            pod.metadata
                .deletion_grace_period_seconds
                .unwrap_or(30)
                .max(1) as u64,
        );
        let took = ctx
            .opts
            .shutdown_duration
            .min(grace.saturating_sub(Duration::from_millis(500)));
        tracing::info!(
            vmi = vmi_name,
            ?took,
            "launcher pod deleted; shutting the VM down"
        );
        tokio::time::sleep(took).await;
        let api = Api::<VirtualMachineInstance>::namespaced(ctx.client.clone(), &ns);
        let now = Utc::now();
        let done = api
            .patch_status(
                &vmi_name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Succeeded", "conditions": [
                    {"type": "Ready", "status": "False", "reason": "PodTerminating",
                     "lastProbeTime": null, "lastTransitionTime": now}]}})),
            )
            .await;
        if let Err(e) = done {
            tracing::warn!(vmi = vmi_name, error = %e, "reporting VMI Succeeded failed");
        }
    }
    ctx.workloads.exit(&pod_uid, 0);
}
