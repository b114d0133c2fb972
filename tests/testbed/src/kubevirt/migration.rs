//! Live migrations: virt-controller's migration controller
//! (`pkg/virt-controller/watch/migration/migration.go`: admission within
//! `parallelMigrationsPerCluster` / `parallelOutboundMigrationsPerNode` in
//! `handleTargetPodCreation`, the evacuation backoff of `handleMigrationBackoff`, the target pod
//! of `createTargetPod`, the hand-off of `handleTargetPodHandoff`) together with the two
//! virt-handlers (`pkg/virt-handler/migration-source.go`, `migration-target.go`: on completion the
//! target sets `status.nodeName`, the `kubevirt.io/nodeName` label, clears
//! `evacuationNodeName`; the source launcher then exits).
//!
//! Phases: Pending → Scheduling → Scheduled → PreparingTarget → TargetReady → Running →
//! Succeeded | Failed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::task::{AbortHandle, JoinSet};

use super::Ctx;
use super::crds::{PhaseTransition, VirtualMachineInstance, VirtualMachineInstanceMigration};
use super::evacuation::{EVACUATION_ANNOTATION, VMI_NAME_LABEL};
use super::launcher::{self, MIGRATION_TARGET_NODE_LABEL, NODE_NAME_LABEL};

pub(crate) async fn run(ctx: Arc<Ctx>) {
    // Dropping the set (this task aborted) aborts every migration task.
    let mut running = JoinSet::new();
    // One task per migration, ever: a finished task's final phase may not be in the cache
    // yet, and the migration must not start over.
    let mut tasks: HashMap<String, AbortHandle> = HashMap::new();
    loop {
        while running.try_join_next().is_some() {}
        let migrations = ctx.vmims.state();
        tasks.retain(|uid, task| {
            !task.is_finished()
                || migrations
                    .iter()
                    .any(|m| m.metadata.uid.as_deref() == Some(uid) && !m.is_final())
        });
        for m in migrations {
            let uid = m.metadata.uid.clone().unwrap_or_default();
            if m.is_final() || m.metadata.deletion_timestamp.is_some() || tasks.contains_key(&uid) {
                continue;
            }
            let ctx = ctx.clone();
            let m = (*m).clone();
            tasks.insert(
                uid,
                running.spawn(async move { Migration::new(ctx, m).run().await }),
            );
        }
        ctx.changed(Duration::from_secs(1)).await;
    }
}

/// When a new evacuation migration of a VMI may start, given that VMI's migrations:
/// 20 s (`base`) after the previous one failed, doubling for each earlier failure back to the
/// last success. `None`: no wait. Mirrors `handleMigrationBackoff`.
pub fn backoff_until(
    this: &VirtualMachineInstanceMigration,
    same_vmi: &[&VirtualMachineInstanceMigration],
    base: Duration,
) -> Option<DateTime<Utc>> {
    let annotated = this.metadata.annotations.as_ref().is_some_and(|a| {
        a.contains_key(EVACUATION_ANNOTATION)
            || a.contains_key("kubevirt.io/workloadUpdateMigration")
    });
    if !annotated || same_vmi.len() < 2 {
        return None;
    }
    let mut sorted: Vec<&VirtualMachineInstanceMigration> = same_vmi.to_vec();
    // Newest first.
    sorted.sort_by(|a, b| {
        b.metadata
            .creation_timestamp
            .cmp(&a.metadata.creation_timestamp)
    });
    if sorted[0].metadata.uid != this.metadata.uid {
        return None;
    }
    let mut backoff = Duration::ZERO;
    for m in &sorted[1..] {
        if m.phase() == "Succeeded" {
            break;
        }
        if m.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if m.phase() == "Failed" {
            backoff = if backoff.is_zero() { base } else { backoff * 2 };
        }
    }
    if backoff.is_zero() {
        return None;
    }
    let failed_at = sorted[1].transition_time("Failed")?;
    Some(failed_at + chrono::Duration::from_std(backoff).ok()?)
}

enum Outcome {
    Succeeded,
    Failed(String),
}

struct Migration {
    ctx: Arc<Ctx>,
    m: VirtualMachineInstanceMigration,
    ns: String,
    name: String,
    uid: String,
    transitions: Vec<PhaseTransition>,
    state: Value,
    target_pod: Option<(String, String)>,
}

impl Migration {
    fn new(ctx: Arc<Ctx>, m: VirtualMachineInstanceMigration) -> Self {
        let transitions = m
            .status
            .as_ref()
            .map(|s| s.phase_transition_timestamps.clone())
            .unwrap_or_default();
        Self {
            ns: m.metadata.namespace.clone().unwrap_or_default(),
            name: m.metadata.name.clone().unwrap_or_default(),
            uid: m.metadata.uid.clone().unwrap_or_default(),
            ctx,
            m,
            transitions,
            state: json!({}),
            target_pod: None,
        }
    }

    fn vmims(&self) -> Api<VirtualMachineInstanceMigration> {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    fn vmis(&self) -> Api<VirtualMachineInstance> {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    fn vmi(&self) -> Option<Arc<VirtualMachineInstance>> {
        self.ctx.vmi(&self.ns, &self.m.spec.vmi_name)
    }

    async fn set_phase(&mut self, phase: &str) {
        self.transitions.push(PhaseTransition {
            phase: phase.to_owned(),
            phase_transition_timestamp: Utc::now(),
        });
        let patch = json!({"status": {"phase": phase, "phaseTransitionTimestamps": self.transitions,
                                      "migrationState": self.state}});
        if let Err(e) = self
            .vmims()
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            tracing::warn!(migration = self.name, phase, error = %e, "updating migration phase failed");
        }
        tracing::info!(
            migration = self.name,
            vmi = self.m.spec.vmi_name,
            phase,
            "migration phase"
        );
    }

    async fn patch_vmi_status(&self, patch: Value) {
        if let Err(e) = self
            .vmis()
            .patch_status(
                &self.m.spec.vmi_name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": patch})),
            )
            .await
        {
            tracing::warn!(vmi = self.m.spec.vmi_name, error = %e, "updating VMI status failed");
        }
    }

    async fn patch_vmi_labels(&self, labels: Value) {
        let _ = self
            .vmis()
            .patch(
                &self.m.spec.vmi_name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels}})),
            )
            .await;
    }

    fn release_slot(&self) {
        self.ctx.slots.lock().expect("slots lock").remove(&self.uid);
    }

    async fn run(mut self) {
        if self.m.phase().is_empty() {
            self.set_phase("Pending").await;
        }
        let outcome = self.drive().await;
        self.release_slot();
        match outcome {
            Outcome::Succeeded => self.set_phase("Succeeded").await,
            Outcome::Failed(reason) => {
                tracing::info!(migration = self.name, reason, "migration failed");
                if let Some((pod_name, _)) = &self.target_pod {
                    let _ = Api::<Pod>::namespaced(self.ctx.client.clone(), &self.ns)
                        .delete(pod_name, &DeleteParams::default())
                        .await;
                }
                self.state["failed"] = json!(true);
                self.state["completed"] = json!(true);
                self.state["failureReason"] = json!(reason);
                self.state["endTimestamp"] = json!(Utc::now());
                let vmi_owns_state = self.vmi().is_some_and(|v| {
                    v.status
                        .as_ref()
                        .and_then(|s| s.migration_state.as_ref())
                        .and_then(|m| m.migration_uid.as_deref())
                        == Some(self.uid.as_str())
                });
                if vmi_owns_state {
                    self.patch_vmi_status(json!({"migrationState": self.state}))
                        .await;
                    self.patch_vmi_labels(json!({MIGRATION_TARGET_NODE_LABEL: null}))
                        .await;
                }
                self.set_phase("Failed").await;
            }
        }
    }

    /// Runs the migration up to its outcome; the caller records it.
    async fn drive(&mut self) -> Outcome {
        let opts = self.ctx.opts.clone();
        let step = opts.migration_duration / 10;

        // Pending: wait for room and for the backoff, as the migration controller re-queues.
        let source = loop {
            let Some(vmi) = self.vmi() else {
                return Outcome::Failed("Migration failed because vmi does not exist.".into());
            };
            if vmi.is_final() || vmi.metadata.deletion_timestamp.is_some() {
                return Outcome::Failed("Migration failed vmi shutdown during migration.".into());
            }
            if !vmi.is_migratable() {
                return Outcome::Failed("VMI is not live-migratable".into());
            }
            if let Some(until) = self.backoff() {
                let wait = (until - Utc::now()).to_std().unwrap_or_default();
                if !wait.is_zero() {
                    tracing::info!(migration = self.name, ?wait, "vmi in migration backoff");
                    tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
                    continue;
                }
            }
            let source = vmi.node_name().unwrap_or_default().to_owned();
            if self.ctx.active_pods(&vmi) <= 1 && self.try_take_slot(&source) {
                break vmi;
            }
            self.ctx.changed(Duration::from_secs(1)).await;
        };
        let source_node = source.node_name().unwrap_or_default().to_owned();
        let source_pod = self.ctx.pods_of(&source).into_iter().find(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(source_node.as_str())
                && !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded") | Some("Failed")
                )
        });
        let Some(source_pod) = source_pod else {
            return Outcome::Failed("source virt-launcher pod not found".into());
        };
        let source_pod_name = source_pod.metadata.name.clone().unwrap_or_default();
        let source_pod_uid = source_pod.metadata.uid.clone().unwrap_or_default();

        // Scheduling: the target pod, on another schedulable node.
        self.set_phase("Scheduling").await;
        tokio::time::sleep(step).await;
        let deadline = tokio::time::Instant::now() + opts.unschedulable_timeout;
        let target_node = loop {
            if let Some(n) = self.ctx.target_nodes(&source_node).into_iter().next() {
                break n;
            }
            if tokio::time::Instant::now() >= deadline {
                return Outcome::Failed(
                    "Migration target pod unschedulable: no schedulable node".into(),
                );
            }
            self.ctx.changed(Duration::from_secs(1)).await;
        };
        let pod = launcher::launcher_pod(&source, &target_node, Some((&self.uid, &self.name)));
        let created = match Api::<Pod>::namespaced(self.ctx.client.clone(), &self.ns)
            .create(&PostParams::default(), &pod)
            .await
        {
            Ok(p) => p,
            Err(e) => return Outcome::Failed(format!("failed to create target pod: {e}")),
        };
        let target_pod = created.metadata.name.clone().unwrap_or_default();
        self.target_pod = Some((
            target_pod.clone(),
            created.metadata.uid.clone().unwrap_or_default(),
        ));
        // A fresh state per migration, as the hand-off does upstream: the nulls clear what an
        // earlier migration left behind (this is merged into the VMI's status).
        self.state = json!({"migrationUid": self.uid, "sourceNode": source_node, "targetNode": target_node,
                            "sourcePod": source_pod_name, "targetPod": target_pod,
                            "startTimestamp": null, "endTimestamp": null, "completed": false,
                            "failed": false, "failureReason": null});

        // Scheduled: the target pod runs.
        let running_by = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match self.ctx.pod(&self.ns, &target_pod) {
                Some(p)
                    if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") =>
                {
                    break;
                }
                Some(p) if p.metadata.deletion_timestamp.is_some() => {
                    return Outcome::Failed(
                        "Migration failed because target pod shutdown during migration".into(),
                    );
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= running_by {
                return Outcome::Failed("target pod did not start".into());
            }
            self.ctx.changed(Duration::from_millis(500)).await;
        }
        self.set_phase("Scheduled").await;
        tokio::time::sleep(step).await;

        // PreparingTarget: hand-off to the target virt-handler.
        self.patch_vmi_labels(json!({MIGRATION_TARGET_NODE_LABEL: target_node}))
            .await;
        self.patch_vmi_status(json!({"migrationState": self.state}))
            .await;
        self.set_phase("PreparingTarget").await;
        tokio::time::sleep(step).await;
        if let Some(reason) = self.interrupted() {
            return Outcome::Failed(reason);
        }
        self.set_phase("TargetReady").await;
        tokio::time::sleep(step).await;
        if let Some(reason) = self.interrupted() {
            return Outcome::Failed(reason);
        }

        // Running: memory is copied.
        self.state["startTimestamp"] = json!(Utc::now());
        self.patch_vmi_status(json!({"migrationState": self.state}))
            .await;
        self.set_phase("Running").await;
        let fail = self.injected_failure();
        let copy = opts.migration_duration.saturating_sub(step * 4);
        if fail {
            tokio::time::sleep(copy / 2).await;
            return Outcome::Failed("Live migration failed: injected by the test bed".into());
        }
        tokio::time::sleep(copy).await;
        if let Some(reason) = self.interrupted() {
            return Outcome::Failed(reason);
        }

        // Completed: the target virt-handler takes the VMI over; the source launcher exits.
        self.state["endTimestamp"] = json!(Utc::now());
        self.state["completed"] = json!(true);
        self.state["failed"] = json!(false);
        let target_uid = self
            .target_pod
            .as_ref()
            .map(|(_, u)| u.clone())
            .unwrap_or_default();
        // Upstream the target virt-handler changes the status and the label in one update.
        // With the status subresource that takes two writes here: status first, so nobody
        // watching by label sees the VMI leave the source node's selection while its status
        // still says it runs there.
        self.patch_vmi_status(json!({
            "nodeName": target_node, "evacuationNodeName": null, "migrationState": self.state,
            "activePods": {target_uid: target_node},
        }))
        .await;
        self.patch_vmi_labels(json!({NODE_NAME_LABEL: target_node}))
            .await;
        self.ctx.workloads.exit(&source_pod_uid, 0);
        // Upstream the migration controller reports Succeeded only after its VMI informer
        // shows the hand-over; keep that order, or the evacuation controller could see the
        // migration finished next to a stale VMI still marked on the source node and
        // migrate it again.
        let seen_by = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < seen_by
            && self
                .vmi()
                .is_some_and(|v| v.node_name() != Some(target_node.as_str()))
        {
            self.ctx.changed(Duration::from_millis(200)).await;
        }
        Outcome::Succeeded
    }

    fn backoff(&self) -> Option<DateTime<Utc>> {
        let all = self.ctx.vmims.state();
        let same: Vec<&VirtualMachineInstanceMigration> = all
            .iter()
            .map(|m| m.as_ref())
            .filter(|m| {
                m.metadata.namespace.as_deref() == Some(self.ns.as_str())
                    && (m.spec.vmi_name == self.m.spec.vmi_name
                        || m.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(VMI_NAME_LABEL))
                            == Some(&self.m.spec.vmi_name))
            })
            .collect();
        // Our own object from the cache carries the creation timestamp.
        let this = all
            .iter()
            .find(|m| m.metadata.uid.as_deref() == Some(self.uid.as_str()))?;
        backoff_until(this, &same, self.ctx.opts.migration_backoff)
    }

    fn try_take_slot(&self, source_node: &str) -> bool {
        let mut slots = self.ctx.slots.lock().expect("slots lock");
        if slots.contains_key(&self.uid) {
            return true;
        }
        let outbound = slots.values().filter(|n| *n == source_node).count();
        if slots.len() >= self.ctx.opts.parallel_migrations_per_cluster
            || outbound >= self.ctx.opts.parallel_outbound_migrations_per_node
        {
            return false;
        }
        slots.insert(self.uid.clone(), source_node.to_owned());
        true
    }

    /// Something ended the migration from outside: the VMI stopped or went away, or the
    /// target pod is being removed.
    fn interrupted(&self) -> Option<String> {
        let Some(vmi) = self.vmi() else {
            return Some("Migration failed because vmi does not exist.".into());
        };
        if vmi.is_final() || vmi.metadata.deletion_timestamp.is_some() {
            return Some("Migration failed vmi shutdown during migration.".into());
        }
        let (pod, _) = self.target_pod.as_ref()?;
        match self.ctx.pod(&self.ns, pod) {
            None => Some("Migration target pod was removed during active migration.".into()),
            Some(p) if p.metadata.deletion_timestamp.is_some() => {
                Some("Migration failed because target pod shutdown during migration".into())
            }
            _ => None,
        }
    }

    fn injected_failure(&self) -> bool {
        let key = format!("{}/{}", self.ns, self.m.spec.vmi_name);
        let mut f = self.ctx.failures.lock().expect("failures lock");
        if let Some(n) = f.per_vmi.get_mut(&key)
            && *n > 0
        {
            *n -= 1;
            return true;
        }
        f.probability > 0.0 && rand::random::<f64>() < f.probability
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mig(
        uid: &str,
        created: &str,
        phase: &str,
        failed_at: Option<&str>,
    ) -> VirtualMachineInstanceMigration {
        let mut transitions = vec![];
        if let Some(t) = failed_at {
            transitions.push(json!({"phase": "Failed", "phaseTransitionTimestamp": t}));
        }
        serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": uid, "uid": uid, "creationTimestamp": created,
                         "annotations": {EVACUATION_ANNOTATION: "node-1"}},
            "spec": {"vmiName": "a"},
            "status": {"phase": phase, "phaseTransitionTimestamps": transitions},
        }))
        .unwrap()
    }

    #[test]
    fn no_backoff_without_failures() {
        let a = mig("a", "2026-01-01T00:00:00Z", "Succeeded", None);
        let b = mig("b", "2026-01-01T00:01:00Z", "", None);
        assert_eq!(backoff_until(&b, &[&a, &b], Duration::from_secs(20)), None);
        assert_eq!(backoff_until(&b, &[&b], Duration::from_secs(20)), None);
    }

    #[test]
    fn backoff_doubles_per_failure_since_last_success() {
        let s = mig("s", "2026-01-01T00:00:00Z", "Succeeded", None);
        let f1 = mig(
            "f1",
            "2026-01-01T00:01:00Z",
            "Failed",
            Some("2026-01-01T00:01:10Z"),
        );
        let f2 = mig(
            "f2",
            "2026-01-01T00:02:00Z",
            "Failed",
            Some("2026-01-01T00:02:10Z"),
        );
        let new = mig("n", "2026-01-01T00:03:00Z", "", None);
        let until = backoff_until(&new, &[&s, &f1, &f2, &new], Duration::from_secs(20)).unwrap();
        assert_eq!(until.to_rfc3339(), "2026-01-01T00:02:50+00:00");
        let until = backoff_until(&f1, &[&s, &f1, &f2], Duration::from_secs(20));
        assert_eq!(until, None, "only the newest migration waits");
        let one = backoff_until(&f2.clone(), &[&s, &f1], Duration::from_secs(20));
        assert_eq!(
            one, None,
            "a migration not among the VMI's is not the newest"
        );
    }

    #[test]
    fn user_migrations_do_not_back_off() {
        let f1 = mig(
            "f1",
            "2026-01-01T00:01:00Z",
            "Failed",
            Some("2026-01-01T00:01:10Z"),
        );
        let mut new = mig("n", "2026-01-01T00:03:00Z", "", None);
        new.metadata.annotations = None;
        assert_eq!(
            backoff_until(&new, &[&f1, &new], Duration::from_secs(20)),
            None
        );
    }
}
