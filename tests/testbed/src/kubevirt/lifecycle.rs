//! A VMI's life outside migrations:
//! - start: virt-controller's VMI controller creates the launcher pod (phase Scheduling) and,
//!   once the pod is ready, marks the VMI Scheduled and labels it with its node in one update
//!   (`pkg/virt-controller/watch/vmi/lifecycle.go`, v1.6.0–v1.8.0; `vmi.go` in v1.5.0:
//!   phase Scheduled, `kubevirt.io/nodeName`, `status.nodeName`);
//! - boot: virt-handler reports the domain running only after it booted
//!   (`pkg/virt-handler/vm.go`: phase Running and the conditions, `LiveMigratable` among them),
//!   so between Scheduled and Running a VMI is on its node without that condition;
//! - stop: when a launcher pod gets a deletion timestamp, or kubelet terminates it on its own
//!   (graceful node shutdown), virt-launcher receives SIGTERM and
//!   shuts the domain down gracefully (ACPI) within the grace period
//!   (`cmd/virt-launcher`, `pkg/virt-launcher/virtwrap/manager.go`); virt-handler then
//!   reports the VMI `Succeeded` and the launcher exits. Pods that are not the VMI's active
//!   pod (a migration target on the way out, a finished source) just exit;
//! - delete: a deleted VMI's pods are deleted (`deleteAllMatchingPods`) and its finalizer
//!   `kubevirt.io/foregroundDeleteVirtualMachine` goes once it is final and its pods are gone;
//! - hotplug: a VMI with a hotplugged volume gets an attachment pod for its active launcher
//!   pod ([`super::hotplug`]); those of launcher pods that have finished are removed;
//! - active pods: every sync rewrites `status.activePods` from the pods the VMI controls, in any
//!   phase (`setActivePods`, `vmi.go` v1.5.0, `lifecycle.go` v1.6.0–v1.8.0). The VMI controller
//!   syncs a VMI whenever one of its pods changes, so a pod's deletion becomes a VMI update,
//!   and that is what re-queues the node in the evacuation controller (which has no pod
//!   handler) after it skipped a VMI whose previous migration's pod was still there.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::Ctx;
use super::crds::VirtualMachineInstance;
use super::hotplug;
use super::launcher::{
    self, BOOT_SECONDS_ANNOTATION, DEFAULT_VMI_GRACE_SECONDS, INITIAL_NODE_ANNOTATION,
    LIVE_MIGRATABLE_ANNOTATION, NODE_NAME_LABEL,
};

/// The finalizer virt-api's VMI mutator adds (`VirtualMachineInstanceFinalizer`).
pub const VMI_FINALIZER: &str = "kubevirt.io/foregroundDeleteVirtualMachine";

pub(crate) async fn run(ctx: Arc<Ctx>) {
    let mut creating: HashMap<String, Instant> = HashMap::new();
    let mut shutting_down: HashSet<String> = HashSet::new();
    // Dropping the set (this task aborted) aborts shutdowns in progress.
    let mut shutdowns = tokio::task::JoinSet::new();
    loop {
        let next = sync_vmis(&ctx, &mut creating).await;
        sync_attachment_pods(&ctx).await;
        while shutdowns.try_join_next().is_some() {}
        stop_pods(&ctx, &mut shutting_down, &mut shutdowns);
        let wait = next
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        ctx.changed(wait).await;
    }
}

pub(crate) fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

pub(crate) fn pod_node(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("")
}

fn pod_terminal(pod: &Pod) -> bool {
    matches!(pod_phase(pod), "Succeeded" | "Failed")
}

/// The status fields of a phase change, with its transition time appended
/// (`phaseTransitionTimestamps`, which the VM controller reads).
fn phase_change(vmi: &VirtualMachineInstance, phase: &str, now: DateTime<Utc>) -> Value {
    let mut transitions = vmi
        .status
        .as_ref()
        .and_then(|s| s.rest.get("phaseTransitionTimestamps"))
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    transitions.push(json!({"phase": phase, "phaseTransitionTimestamp": now}));
    json!({"phase": phase, "phaseTransitionTimestamps": transitions})
}

/// When the VMI became Scheduled, from its own record.
fn scheduled_at(vmi: &VirtualMachineInstance) -> Option<DateTime<Utc>> {
    vmi.status
        .as_ref()?
        .rest
        .get("phaseTransitionTimestamps")?
        .as_array()?
        .iter()
        .rev()
        .find(|t| t["phase"] == "Scheduled")
        .and_then(|t| t["phaseTransitionTimestamp"].as_str())
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// How long this VMI takes to boot.
pub(crate) fn boot_time(vmi: &VirtualMachineInstance, default: Duration) -> Duration {
    vmi.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(BOOT_SECONDS_ANNOTATION))
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(default)
}

/// Where a new VMI starts: the bed's stand-in for the scheduler's choice while that node can
/// take pods (like a preferred node affinity), else its `nodeSelector` hostname, else the
/// least loaded schedulable node that fits it.
fn placement(ctx: &Ctx, vmi: &VirtualMachineInstance) -> Option<String> {
    let selector = vmi.spec.node_selector.clone().unwrap_or_default();
    let fitting = ctx.target_nodes("", &selector);
    let preferred = vmi
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INITIAL_NODE_ANNOTATION))
        .filter(|n| fitting.contains(n))
        .cloned();
    preferred
        .or_else(|| selector.get("kubernetes.io/hostname").cloned())
        .or_else(|| fitting.into_iter().next())
}

async fn update(api: &Api<VirtualMachineInstance>, name: &str, patch: Value, what: &str) {
    if let Err(e) = api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        tracing::warn!(vmi = name, error = %e, "{what} failed");
    }
}

/// The merge patch that makes `status.activePods` (pod uid → node) list exactly `pods`, or
/// `None` when it already does (or has never been set and there are no pods, as upstream
/// leaves it).
fn active_pods_patch(vmi: &VirtualMachineInstance, pods: &[Arc<Pod>]) -> Option<Value> {
    let now: serde_json::Map<String, Value> = pods
        .iter()
        .map(|p| {
            (
                p.metadata.uid.clone().unwrap_or_default(),
                json!(pod_node(p)),
            )
        })
        .collect();
    let status = vmi.status.as_ref();
    let before = status
        .and_then(|s| s.rest.get("activePods"))
        .and_then(Value::as_object);
    if before.is_none() && now.is_empty() {
        return None;
    }
    if before == Some(&now) {
        return None;
    }
    let mut merged = now.clone();
    for gone in before.into_iter().flat_map(|b| b.keys()) {
        if !now.contains_key(gone) {
            merged.insert(gone.clone(), Value::Null);
        }
    }
    Some(json!({"status": {"activePods": merged}}))
}

/// One pass over the VMIs; returns when the next boot finishes, if one is pending.
async fn sync_vmis(ctx: &Arc<Ctx>, creating: &mut HashMap<String, Instant>) -> Option<Instant> {
    creating.retain(|_, at| at.elapsed() < Duration::from_secs(10));
    let mut next: Option<Instant> = None;
    for vmi in ctx.vmis.state() {
        let uid = vmi.metadata.uid.clone().unwrap_or_default();
        let ns = vmi.metadata.namespace.clone().unwrap_or_default();
        let name = vmi.metadata.name.clone().unwrap_or_default();
        let api = Api::<VirtualMachineInstance>::namespaced(ctx.client.clone(), &ns);
        let pods: Vec<Arc<Pod>> = ctx
            .pods_of(&vmi)
            .into_iter()
            .filter(|p| !hotplug::is_attachment_pod(p))
            .collect();
        if vmi.metadata.deletion_timestamp.is_some() {
            delete_vmi(ctx, &api, &vmi, &pods).await;
            continue;
        }
        if let Some(patch) = active_pods_patch(&vmi, &pods) {
            update(&api, &name, patch, "updating the VMI's active pods").await;
        }
        if vmi.is_final() {
            continue;
        }
        let now = Utc::now();
        match vmi.phase() {
            "" | "Pending" => {
                // An unprocessed VMI with a pod is Scheduling (`updateStatus`): reported when
                // the pod is created, and again should that report not have landed.
                let just_created = creating.contains_key(&uid);
                let report = if !pods.is_empty() {
                    !just_created
                } else if just_created {
                    false
                } else {
                    let Some(node) = placement(ctx, &vmi) else {
                        continue;
                    };
                    creating.insert(uid, Instant::now());
                    let pod = launcher::launcher_pod(
                        &vmi,
                        &node,
                        None,
                        ctx.opts.version.launcher_image(),
                    );
                    let created = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
                        .create(&PostParams::default(), &pod)
                        .await;
                    if let Err(e) = created {
                        tracing::warn!(vmi = name, error = %e, "creating launcher pod failed");
                        continue;
                    }
                    true
                };
                if report {
                    let mut status = phase_change(&vmi, "Scheduling", now);
                    status["launcherContainerImageVersion"] =
                        json!(ctx.opts.version.launcher_image());
                    update(
                        &api,
                        &name,
                        json!({"status": status}),
                        "reporting VMI Scheduling",
                    )
                    .await;
                }
            }
            "Scheduling" => {
                let Some(pod) = pods.iter().find(|p| !pod_terminal(p)) else {
                    update(
                        &api,
                        &name,
                        json!({"status": phase_change(&vmi, "Failed", now)}),
                        "reporting VMI Failed",
                    )
                    .await;
                    continue;
                };
                if pod_phase(pod) != "Running" {
                    continue;
                }
                // The pod is ready: the VMI controller hands the VMI to the node's virt-handler,
                // labelling it with the node in the same update.
                let node = pod_node(pod).to_owned();
                let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
                let mut status = phase_change(&vmi, "Scheduled", now);
                status["nodeName"] = json!(node);
                status["activePods"] = json!({pod_uid: node});
                status["migrationTransport"] = json!("Unix");
                status["qosClass"] = json!("Burstable");
                update(
                    &api,
                    &name,
                    json!({"metadata": {"labels": {NODE_NAME_LABEL: node}}, "status": status}),
                    "reporting VMI Scheduled",
                )
                .await;
            }
            "Scheduled" => {
                let node = vmi.node_name().unwrap_or_default();
                if !pods.iter().any(|p| pod_node(p) == node && !pod_terminal(p)) {
                    update(
                        &api,
                        &name,
                        json!({"status": phase_change(&vmi, "Failed", now)}),
                        "reporting VMI Failed",
                    )
                    .await;
                    continue;
                }
                let boot = boot_time(&vmi, ctx.opts.boot_duration);
                let since = scheduled_at(&vmi).unwrap_or(now);
                let booted_at = since + chrono::Duration::from_std(boot).unwrap_or_default();
                if booted_at > now {
                    let left = (booted_at - now).to_std().unwrap_or_default();
                    let due = Instant::now() + left;
                    next = Some(next.map_or(due, |n| n.min(due)));
                    continue;
                }
                // virt-handler: the domain runs; only now does it judge migratability.
                let migratable = vmi
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(LIVE_MIGRATABLE_ANNOTATION))
                    .is_none_or(|v| v != "false");
                let live = if migratable {
                    json!({"type": "LiveMigratable", "status": "True", "lastProbeTime": null, "lastTransitionTime": now})
                } else {
                    // The reason upstream gives for the most common cause (`pkg/virt-controller/watch/vmi/conditions.go`).
                    json!({"type": "LiveMigratable", "status": "False", "reason": "DisksNotLiveMigratable",
                           "message": "cannot migrate VMI: PVC rootdisk is not shared, live migration requires that all PVCs must be shared (using ReadWriteMany access mode)",
                           "lastProbeTime": null, "lastTransitionTime": now})
                };
                let mut status = phase_change(&vmi, "Running", now);
                status["conditions"] = json!([
                    {"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": now},
                    live,
                ]);
                status["migrationMethod"] = json!("LiveMigration");
                status["guestOSInfo"] = json!({});
                update(
                    &api,
                    &name,
                    json!({"status": status}),
                    "reporting VMI Running",
                )
                .await;
            }
            "Running" => {
                // The domain's pod vanished without a shutdown (force deletion): virt-handler
                // finds the domain gone and the VMI fails.
                let node = vmi.node_name().unwrap_or_default();
                if !pods.iter().any(|p| pod_node(p) == node) {
                    let mut status = phase_change(&vmi, "Failed", now);
                    status["conditions"] =
                        json!([{"type": "Ready", "status": "False", "reason": "PodTerminating"}]);
                    update(
                        &api,
                        &name,
                        json!({"status": status}),
                        "reporting VMI Failed",
                    )
                    .await;
                }
            }
            _ => {}
        }
    }
    next
}

/// A deleted VMI: its pods go (gracefully, so the domain shuts down), then its finalizer.
/// Upstream's virt-handler shuts the domain down within the VMI's own
/// `terminationGracePeriodSeconds` as it is at the deletion (virt-api's `stop` with a
/// `gracePeriod` shortens it first); here the launcher pods get that grace.
async fn delete_vmi(
    ctx: &Ctx,
    api: &Api<VirtualMachineInstance>,
    vmi: &VirtualMachineInstance,
    pods: &[Arc<Pod>],
) {
    let name = vmi.metadata.name.clone().unwrap_or_default();
    let ns = vmi.metadata.namespace.clone().unwrap_or_default();
    let pod_api = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
    let grace = vmi
        .spec
        .termination_grace_period_seconds
        .unwrap_or(DEFAULT_VMI_GRACE_SECONDS)
        .clamp(1, u32::MAX as i64) as u32;
    for pod in pods {
        if pod.metadata.deletion_timestamp.is_none() {
            let _ = pod_api
                .delete(
                    pod.metadata.name.as_deref().unwrap_or_default(),
                    &DeleteParams {
                        grace_period_seconds: Some(grace),
                        ..DeleteParams::default()
                    },
                )
                .await;
        }
    }
    let live = pods.iter().any(|p| !pod_terminal(p));
    if !vmi.is_final()
        && !live
        && !pods
            .iter()
            .any(|p| pod_node(p) == vmi.node_name().unwrap_or(""))
    {
        // No domain left to report on (never scheduled, or its pod went without a shutdown).
        update(
            api,
            &name,
            json!({"status": phase_change(vmi, "Failed", Utc::now())}),
            "reporting VMI Failed",
        )
        .await;
        return;
    }
    let has_finalizer = vmi
        .metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == VMI_FINALIZER));
    if vmi.is_final() && pods.is_empty() && has_finalizer {
        let kept: Vec<&String> = vmi
            .metadata
            .finalizers
            .iter()
            .flatten()
            .filter(|f| *f != VMI_FINALIZER)
            .collect();
        update(
            api,
            &name,
            json!({"metadata": {"finalizers": kept, "resourceVersion": vmi.metadata.resource_version}}),
            "removing the VMI finalizer",
        )
        .await;
    }
}

/// Attachment pods follow their VMI's active launcher pod.
async fn sync_attachment_pods(ctx: &Ctx) {
    let pods = ctx.pods.state();
    let attachments: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| hotplug::is_attachment_pod(p))
        .collect();
    // Those whose launcher pod has finished or gone (the garbage collector takes the others).
    for a in &attachments {
        let Some((_, owner_uid)) = hotplug::owner_pod(a) else {
            continue;
        };
        let owner = pods
            .iter()
            .find(|p| p.metadata.uid.as_deref() == Some(owner_uid));
        if a.metadata.deletion_timestamp.is_none() && owner.is_none_or(|o| pod_terminal(o)) {
            let api = Api::<Pod>::namespaced(
                ctx.client.clone(),
                a.metadata.namespace.as_deref().unwrap_or_default(),
            );
            let _ = api
                .delete(
                    a.metadata.name.as_deref().unwrap_or_default(),
                    &DeleteParams::default(),
                )
                .await;
        }
    }
    for vmi in ctx.vmis.state() {
        if vmi.phase() != "Running"
            || vmi.metadata.deletion_timestamp.is_some()
            || !hotplug::wants_attachment_pod(&vmi)
        {
            continue;
        }
        let node = vmi.node_name().unwrap_or_default();
        let Some(active) = ctx.pods_of(&vmi).into_iter().find(|p| {
            pod_node(p) == node
                && pod_phase(p) == "Running"
                && p.metadata.deletion_timestamp.is_none()
                && !hotplug::is_attachment_pod(p)
        }) else {
            continue;
        };
        let active_uid = active.metadata.uid.clone().unwrap_or_default();
        if attachments
            .iter()
            .any(|a| hotplug::owner_pod(a).is_some_and(|(_, uid)| uid == active_uid))
            || ctx.attachment_pending(&active_uid)
        {
            continue;
        }
        ctx.expect_attachment(&active_uid);
        let api = Api::<Pod>::namespaced(
            ctx.client.clone(),
            vmi.metadata.namespace.as_deref().unwrap_or_default(),
        );
        let pod = hotplug::attachment_pod(&active, ctx.opts.version.launcher_image());
        if let Err(e) = api.create(&PostParams::default(), &pod).await {
            tracing::warn!(vmi = vmi.metadata.name, error = %e, "creating attachment pod failed");
        }
    }
}

/// Starts a shutdown for each launcher pod newly marked for deletion or sent SIGTERM by kubelet.
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
        if (pod.metadata.deletion_timestamp.is_none() && ctx.workloads.local_kill(&uid).is_none())
            || pod_terminal(&pod)
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
        let grace = match ctx.workloads.local_kill(&pod_uid) {
            Some(kill) if pod.metadata.deletion_timestamp.is_none() => kill.grace,
            _ => Duration::from_secs(
                pod.metadata
                    .deletion_grace_period_seconds
                    .unwrap_or(30)
                    .max(1) as u64,
            ),
        }
        .max(Duration::from_secs(1));
        let took = ctx
            .opts
            .shutdown_duration
            .min(grace.saturating_sub(Duration::from_millis(500)));
        tracing::info!(
            vmi = vmi_name,
            ?took,
            "launcher pod got SIGTERM; shutting the VM down"
        );
        tokio::time::sleep(took).await;
        let api = Api::<VirtualMachineInstance>::namespaced(ctx.client.clone(), &ns);
        let now = Utc::now();
        let current = ctx.vmi(&ns, &vmi_name);
        let mut status = match &current {
            Some(v) => phase_change(v, "Succeeded", now),
            None => json!({"phase": "Succeeded"}),
        };
        status["conditions"] = json!([
            {"type": "Ready", "status": "False", "reason": "PodTerminating",
             "lastProbeTime": null, "lastTransitionTime": now}]);
        update(
            &api,
            &vmi_name,
            json!({"status": status}),
            "reporting VMI Succeeded",
        )
        .await;
    }
    ctx.workloads.exit(&pod_uid, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubevirt::launcher::VmiTemplate;
    use crate::kubevirt::spec::VmiKind;

    #[test]
    fn boot_time_comes_from_the_vmi_or_the_default() {
        let mut t = VmiTemplate::new(VmiKind::Live, Some("node-1"));
        let d = Duration::from_millis(500);
        assert_eq!(boot_time(&t.vmi("a", "default"), d), d);
        t.boot = Some(Duration::from_secs(30));
        assert_eq!(
            boot_time(&t.vmi("a", "default"), d),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn phase_changes_append_transition_times() {
        let mut vmi = VmiTemplate::new(VmiKind::Live, None).vmi("a", "default");
        let t0 = Utc::now();
        let s = phase_change(&vmi, "Scheduled", t0);
        vmi.status = Some(serde_json::from_value(s).unwrap());
        assert_eq!(
            scheduled_at(&vmi).map(|t| t.timestamp_millis()),
            Some(t0.timestamp_millis())
        );
        let s = phase_change(&vmi, "Running", t0);
        assert_eq!(s["phaseTransitionTimestamps"].as_array().unwrap().len(), 2);
    }

    fn pod(uid: &str, node: &str) -> Arc<Pod> {
        let mut p = Pod::default();
        p.metadata.uid = Some(uid.into());
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: Some(node.into()),
            ..Default::default()
        });
        Arc::new(p)
    }

    #[test]
    fn active_pods_follow_the_pods_and_a_gone_pod_is_removed() {
        let mut vmi = VmiTemplate::new(VmiKind::Live, None).vmi("a", "default");
        assert_eq!(active_pods_patch(&vmi, &[]), None, "never set, no pods");
        let both = [pod("s", "node-1"), pod("t", "node-2")];
        let patch = active_pods_patch(&vmi, &both).unwrap();
        assert_eq!(
            patch,
            json!({"status": {"activePods": {"s": "node-1", "t": "node-2"}}})
        );
        vmi.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
        assert_eq!(active_pods_patch(&vmi, &both), None, "unchanged");
        assert_eq!(
            active_pods_patch(&vmi, &both[..1]).unwrap(),
            json!({"status": {"activePods": {"s": "node-1", "t": null}}})
        );
    }
}
