//! Live migrations: virt-controller's migration controller
//! (`pkg/virt-controller/watch/migration/migration.go`, v1.5.0–v1.8.0) together with the two
//! virt-handlers (`pkg/virt-handler/migration-source.go`, `migration-target.go`; v1.5's
//! `vm.go`) and the source virt-launcher's migration monitor
//! (`pkg/virt-launcher/virtwrap/live-migration-source.go`).
//!
//! Phases: Pending → Scheduling → Scheduled → PreparingTarget → TargetReady → Running →
//! Succeeded | Failed. In Pending a migration waits for its evacuation backoff
//! (`handleMigrationBackoff`: 20 s after a failure, doubling) and for room within
//! `parallelMigrationsPerCluster` and `parallelOutboundMigrationsPerNode`
//! (`handleTargetPodCreation`), looking again every 5 s, or, with the priority queue, after a
//! delay by priority and whenever a migration ends (`reEnqueueHighestPriorityPendingMigrations`),
//! highest priority first. In v1.5 it first raises the VMI's PodDisruptionBudget to 2
//! (`expandPDB`) and waits for the disruption controller to have seen that. The copy takes the
//! fixed migration time, or memory ÷ bandwidth; virt-launcher aborts it past
//! `completionTimeoutPerGiB` or after `progressTimeout` without progress. Deleting the VMIM
//! cancels it: before the hand-off to the target it fails at once, after it the source aborts
//! (`AbortRequested`), and the VMI stays on its source. VMIMs carry virt-api's finalizer, which
//! the controller removes once they are final.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use super::Ctx;
use super::crds::{PhaseTransition, VirtualMachineInstance, VirtualMachineInstanceMigration};
use super::evacuation::{EVACUATION_ANNOTATION, VMI_NAME_LABEL};
use super::handover::{self, Moved};
use super::launcher::{self, MIGRATION_TARGET_NODE_LABEL};
use super::transfer;

/// virt-api's finalizer on every migration (`VirtualMachineInstanceMigrationFinalizer`).
pub const FINALIZER: &str = "kubevirt.io/migrationJobFinalizer";
/// v1.5 has no `spec.addedNodeSelector`; the bed reads the target node from this annotation
/// there instead.
pub const TARGET_NODE_ANNOTATION: &str = "testbed.shutdown-guard.io/target-node";
/// `MigrationNameLabel`, set on the PDB while it protects a migration (v1.5).
pub const MIGRATION_NAME_LABEL: &str = "kubevirt.io/migrationName";

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
            if tasks.contains_key(&uid) {
                continue;
            }
            let final_with_finalizer = m.is_final() && has_finalizer(&m);
            if m.is_final() && !final_with_finalizer {
                continue;
            }
            let ctx = ctx.clone();
            let m = (*m).clone();
            tasks.insert(
                uid,
                running.spawn(async move {
                    if final_with_finalizer {
                        remove_finalizer(&ctx, &m).await;
                    } else {
                        Migration::new(ctx, m).run().await;
                    }
                }),
            );
        }
        ctx.changed(Duration::from_secs(1)).await;
    }
}

fn has_finalizer(m: &VirtualMachineInstanceMigration) -> bool {
    m.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}

async fn remove_finalizer(ctx: &Ctx, m: &VirtualMachineInstanceMigration) {
    let Some(finalizers) = m.metadata.finalizers.as_ref() else {
        return;
    };
    let kept: Vec<&String> = finalizers.iter().filter(|f| *f != FINALIZER).collect();
    let api = Api::<VirtualMachineInstanceMigration>::namespaced(
        ctx.client.clone(),
        m.metadata.namespace.as_deref().unwrap_or_default(),
    );
    let name = m.metadata.name.as_deref().unwrap_or_default();
    let patch =
        json!({"metadata": {"finalizers": kept, "resourceVersion": m.metadata.resource_version}});
    if let Err(e) = api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        // A conflict means a newer version: the controller loop sees it and tries again.
        tracing::debug!(migration = name, error = %e, "removing the migration finalizer failed");
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
    /// Done, recorded already.
    Done,
    Failed {
        reason: String,
        /// Aborted on request (the VMIM was deleted after the hand-off).
        aborted: bool,
    },
}

fn failed(reason: impl Into<String>) -> Outcome {
    Outcome::Failed {
        reason: reason.into(),
        aborted: false,
    }
}

const CANCELED: &str = "Migration failed due to being canceled";

struct Migration {
    ctx: Arc<Ctx>,
    m: VirtualMachineInstanceMigration,
    ns: String,
    name: String,
    uid: String,
    priority: i32,
    transitions: Vec<PhaseTransition>,
    conditions: Vec<Value>,
    /// The VMI's `migrationState` for this migration, once handed off.
    state: Value,
    target_pod: Option<(String, String)>,
    attachment_pod: Option<String>,
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
            priority: transfer::queue_priority(&m),
            ctx,
            m,
            transitions,
            conditions: Vec::new(),
            state: json!({}),
            target_pod: None,
            attachment_pod: None,
        }
    }

    fn vmims(&self) -> Api<VirtualMachineInstanceMigration> {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    fn vmis(&self) -> Api<VirtualMachineInstance> {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    fn vmi(&self) -> Option<Arc<VirtualMachineInstance>> {
        self.ctx.vmi(&self.ns, &self.m.spec.vmi_name)
    }

    /// The migration object as the cache has it now (`None`: gone).
    fn current(&self) -> Option<Arc<VirtualMachineInstanceMigration>> {
        self.ctx
            .vmims
            .state()
            .into_iter()
            .find(|m| m.metadata.uid.as_deref() == Some(self.uid.as_str()))
    }

    /// Someone deleted the migration: a cancel.
    fn cancelled(&self) -> bool {
        self.current()
            .is_none_or(|m| m.metadata.deletion_timestamp.is_some())
    }

    async fn write_status(&self, phase: &str) {
        let patch = json!({"status": {"phase": phase, "phaseTransitionTimestamps": self.transitions,
                                      "migrationState": self.state, "conditions": self.conditions}});
        if let Err(e) = self
            .vmims()
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            tracing::warn!(migration = self.name, phase, error = %e, "updating migration phase failed");
        }
    }

    async fn set_phase(&mut self, phase: &str) {
        self.transitions.push(PhaseTransition {
            phase: phase.to_owned(),
            phase_transition_timestamp: Utc::now(),
        });
        self.write_status(phase).await;
        tracing::info!(
            migration = self.name,
            vmi = self.m.spec.vmi_name,
            phase,
            "migration phase"
        );
    }

    /// One update of the VMI (labels and status together: it has no status subresource).
    async fn patch_vmi(&self, patch: Value) {
        if let Err(e) = self
            .vmis()
            .patch(
                &self.m.spec.vmi_name,
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
        {
            tracing::warn!(vmi = self.m.spec.vmi_name, error = %e, "updating VMI failed");
        }
    }

    fn release_slot(&self) {
        self.ctx.release_migration_slot(&self.uid);
    }

    async fn finish(&self) {
        if let Some(m) = self.current() {
            remove_finalizer(&self.ctx, &m).await;
        }
    }

    async fn run(mut self) {
        if self.m.phase().is_empty() {
            self.set_phase("Pending").await;
        }
        let outcome = self.drive().await;
        self.release_slot();
        if let Outcome::Failed { reason, aborted } = outcome {
            self.fail(&reason, aborted).await;
        }
        // The finalizer goes with the final phase; the cache may lag behind our own writes.
        for _ in 0..50 {
            match self.current() {
                None => return,
                Some(m) if m.is_final() => {
                    remove_finalizer(&self.ctx, &m).await;
                    if self.current().is_none_or(|m| !has_finalizer(&m)) {
                        return;
                    }
                }
                Some(_) => {}
            }
            self.ctx.changed(Duration::from_millis(200)).await;
        }
    }

    async fn fail(&mut self, reason: &str, aborted: bool) {
        tracing::info!(migration = self.name, reason, aborted, "migration failed");
        if let Some((pod_name, _)) = &self.target_pod {
            let _ = self.pods().delete(pod_name, &DeleteParams::default()).await;
        }
        if let Some(pod_name) = &self.attachment_pod {
            let _ = self.pods().delete(pod_name, &DeleteParams::default()).await;
        }
        let vmi_owns_state = self.vmi().is_some_and(|v| {
            v.status
                .as_ref()
                .and_then(|s| s.migration_state.as_ref())
                .and_then(|m| m.migration_uid.as_deref())
                == Some(self.uid.as_str())
        });
        if vmi_owns_state {
            self.state["failed"] = json!(true);
            // v1.5's source copies libvirt's `completed`, which a failed job also sets.
            self.state["completed"] =
                json!(self.ctx.opts.version.source_completes_before_handover());
            self.state["failureReason"] = json!(reason);
            self.state["endTimestamp"] = json!(Utc::now());
            if aborted {
                self.state["abortStatus"] = json!("Succeeded");
            }
            self.patch_vmi(
                json!({"metadata": {"labels": {MIGRATION_TARGET_NODE_LABEL: null}},
                                  "status": {"migrationState": self.state}}),
            )
            .await;
        }
        self.set_phase("Failed").await;
    }

    /// Waits up to `wait` for a change, returning early if the migration is cancelled.
    async fn pause(&self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        loop {
            if self.cancelled() {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            self.ctx.changed(left.min(Duration::from_millis(250))).await;
        }
    }

    /// Runs the migration up to its outcome.
    async fn drive(&mut self) -> Outcome {
        let source = match self.pending().await {
            Ok(vmi) => vmi,
            Err(outcome) => return outcome,
        };
        let source_node = source.node_name().unwrap_or_default().to_owned();
        if self.ctx.opts.version.per_vmi_pdbs()
            && let Err(outcome) = self.protect_with_pdb(&source).await
        {
            return outcome;
        }
        let source_pod = self.ctx.pods_of(&source).into_iter().find(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(source_node.as_str())
                && !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded") | Some("Failed")
                )
                && !super::hotplug::is_attachment_pod(p)
        });
        let Some(source_pod) = source_pod else {
            return failed("source virt-launcher pod not found");
        };
        let source_pod_name = source_pod.metadata.name.clone().unwrap_or_default();
        let source_pod_uid = source_pod.metadata.uid.clone().unwrap_or_default();
        let step = self.ctx.opts.migration_duration / 10;

        // Scheduling: the target pod, on another schedulable node.
        self.set_phase("Scheduling").await;
        tokio::time::sleep(step).await;
        let config = self.ctx.cluster_config();
        let deadline = Instant::now() + config.migrations.unschedulable_pending_timeout;
        let selector = self.node_selector(&source);
        let target_node = loop {
            if self.cancelled() {
                return failed(CANCELED);
            }
            if let Some(n) = self
                .ctx
                .target_nodes(&source_node, &selector)
                .into_iter()
                .next()
            {
                break n;
            }
            if Instant::now() >= deadline {
                return failed("Migration target pod unschedulable: no schedulable node");
            }
            self.ctx.changed(Duration::from_secs(1)).await;
        };
        let pod = launcher::launcher_pod(
            &source,
            &target_node,
            Some((&self.uid, &self.name)),
            self.ctx.opts.version.launcher_image(),
        );
        let created = match self.pods().create(&PostParams::default(), &pod).await {
            Ok(p) => p,
            Err(e) => return failed(format!("failed to create target pod: {e}")),
        };
        let target_pod = created.metadata.name.clone().unwrap_or_default();
        let target_pod_uid = created.metadata.uid.clone().unwrap_or_default();
        self.target_pod = Some((target_pod.clone(), target_pod_uid.clone()));
        // A fresh state per migration, as the hand-off does upstream: the nulls clear what an
        // earlier migration left behind (this is merged into the VMI's status).
        self.state = json!({"migrationUid": self.uid, "sourceNode": source_node, "targetNode": target_node,
                            "sourcePod": source_pod_name, "targetPod": target_pod,
                            "startTimestamp": null, "endTimestamp": null, "completed": false,
                            "failed": false, "failureReason": null, "abortStatus": null,
                            "abortRequested": null, "targetNodeDomainDetected": null,
                            "targetNodeDomainReadyTimestamp": null});

        // Scheduled: the target pod runs.
        let running_by = Instant::now() + Duration::from_secs(60);
        loop {
            if self.cancelled() {
                return failed(CANCELED);
            }
            match self.ctx.pod(&self.ns, &target_pod) {
                Some(p)
                    if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") =>
                {
                    if super::hotplug::wants_attachment_pod(&source) {
                        self.create_attachment_pod(&p).await;
                    }
                    break;
                }
                Some(p) if p.metadata.deletion_timestamp.is_some() => {
                    return failed("Migration failed because target pod shutdown during migration");
                }
                _ => {}
            }
            if Instant::now() >= running_by {
                return failed("target pod did not start");
            }
            self.ctx.changed(Duration::from_millis(500)).await;
        }
        self.set_phase("Scheduled").await;
        tokio::time::sleep(step).await;
        if self.cancelled() {
            return failed(CANCELED);
        }

        // PreparingTarget: hand-off to the target virt-handler (one VMI update).
        self.patch_vmi(
            json!({"metadata": {"labels": {MIGRATION_TARGET_NODE_LABEL: target_node}},
                              "status": {"migrationState": self.state}}),
        )
        .await;
        self.set_phase("PreparingTarget").await;
        if let Some(outcome) = self.sleep_handed_off(step).await {
            return outcome;
        }
        self.set_phase("TargetReady").await;
        if let Some(outcome) = self.sleep_handed_off(step).await {
            return outcome;
        }

        // Running: memory is copied while virt-launcher's monitor watches.
        self.state["startTimestamp"] = json!(Utc::now());
        self.patch_vmi(json!({"status": {"migrationState": self.state}}))
            .await;
        self.set_phase("Running").await;
        if let Some(outcome) = self.copy(&source).await {
            return outcome;
        }
        self.hand_over(&target_node, &source_pod_uid).await;
        Outcome::Done
    }

    /// Pending: waits for the VMI to run, the backoff and room. Returns the VMI to migrate.
    async fn pending(&mut self) -> Result<Arc<VirtualMachineInstance>, Outcome> {
        loop {
            if self.cancelled() {
                return Err(failed(CANCELED));
            }
            let Some(vmi) = self.vmi() else {
                return Err(failed("Migration failed because vmi does not exist."));
            };
            if vmi.is_final() || vmi.metadata.deletion_timestamp.is_some() {
                return Err(failed("Migration failed vmi shutdown during migration."));
            }
            if let Some(c) = vmi
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "LiveMigratable"))
                && c.status == "False"
            {
                return Err(failed("VMI is not live-migratable"));
            }
            // A VMI still booting gets its target pod once it runs.
            if vmi.phase() != "Running" || !vmi.is_migratable() {
                self.ctx.changed(Duration::from_millis(500)).await;
                continue;
            }
            if let Some(until) = self.backoff() {
                let wait = (until - Utc::now()).to_std().unwrap_or_default();
                if !wait.is_zero() {
                    tracing::info!(migration = self.name, ?wait, "vmi in migration backoff");
                    self.pause(wait.min(Duration::from_secs(1))).await;
                    continue;
                }
            }
            let source = vmi.node_name().unwrap_or_default().to_owned();
            let pq = self
                .ctx
                .cluster_config()
                .priority_queue_enabled(self.ctx.opts.version);
            if self.ctx.active_pods(&vmi) <= 1
                && self
                    .ctx
                    .admit_migration(&self.uid, &source, self.priority, pq)
            {
                return Ok(vmi);
            }
            let delay = transfer::requeue_delay(pq, self.priority);
            if pq {
                // Woken early when a migration ends and frees room.
                let freed = self.ctx.slot_freed.notified();
                tokio::select! {
                    _ = freed => {}
                    _ = self.pause(delay) => {}
                }
            } else {
                self.pause(delay).await;
            }
        }
    }

    /// The scheduling constraints of the target pod: the VMI's `nodeSelector` and the
    /// migration's `addedNodeSelector` (v1.6+; v1.5: [`TARGET_NODE_ANNOTATION`]).
    fn node_selector(&self, vmi: &VirtualMachineInstance) -> BTreeMap<String, String> {
        let mut selector = vmi.spec.node_selector.clone().unwrap_or_default();
        if self.ctx.opts.version.added_node_selector() {
            if let Some(added) = self
                .m
                .spec
                .rest
                .get("addedNodeSelector")
                .and_then(|v| v.as_object())
            {
                for (k, v) in added {
                    if let Some(v) = v.as_str() {
                        selector.insert(k.clone(), v.to_owned());
                    }
                }
            }
        } else if let Some(node) = self
            .m
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TARGET_NODE_ANNOTATION))
        {
            selector.insert("kubernetes.io/hostname".into(), node.clone());
        }
        selector
    }

    /// After the hand-off a cancel is an abort the source carries out.
    async fn sleep_handed_off(&mut self, wait: Duration) -> Option<Outcome> {
        let until = Instant::now() + wait;
        loop {
            if let Some(outcome) = self.check_running().await {
                return Some(outcome);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.ctx.changed(left.min(Duration::from_millis(200))).await;
        }
    }

    /// What ends a handed-off migration from outside: a cancel (abort), the VMI stopping or
    /// going away, the target pod being removed.
    async fn check_running(&mut self) -> Option<Outcome> {
        if self.cancelled() {
            self.conditions
                .push(json!({"type": "AbortRequested", "status": "True",
                                        "lastProbeTime": Utc::now()}));
            self.state["abortRequested"] = json!(true);
            self.patch_vmi(json!({"status": {"migrationState": {"abortRequested": true}}}))
                .await;
            return Some(Outcome::Failed {
                reason: "Live migration aborted ".into(),
                aborted: true,
            });
        }
        let Some(vmi) = self.vmi() else {
            return Some(failed("Migration failed because vmi does not exist."));
        };
        if vmi.is_final() || vmi.metadata.deletion_timestamp.is_some() {
            return Some(failed("Migration failed vmi shutdown during migration."));
        }
        let (pod, _) = self.target_pod.as_ref()?;
        match self.ctx.pod(&self.ns, pod) {
            None => Some(failed(
                "Migration target pod was removed during active migration.",
            )),
            Some(p) if p.metadata.deletion_timestamp.is_some() => Some(failed(
                "Migration failed because target pod shutdown during migration",
            )),
            _ => None,
        }
    }

    /// The copy, as virt-launcher's monitor sees it. `None`: it completed.
    async fn copy(&mut self, vmi: &VirtualMachineInstance) -> Option<Outcome> {
        let opts = &self.ctx.opts;
        let config = self.ctx.cluster_config();
        let memory = vmi.memory_bytes().unwrap_or(launcher::DEFAULT_MEMORY);
        let copy = transfer::copy_time(
            memory,
            opts.migration_bandwidth,
            config.migrations.bandwidth_per_migration,
            opts.migration_duration
                .saturating_sub((opts.migration_duration / 10) * 4),
        );
        let acceptable =
            transfer::acceptable_completion(memory, config.migrations.completion_timeout_per_gib);
        let progress_timeout = Duration::from_secs(config.migrations.progress_timeout);
        let injected = self.ctx.injected_failure(&self.ns, &self.m.spec.vmi_name);
        let started = Instant::now();
        loop {
            if let Some(outcome) = self.check_running().await {
                return Some(outcome);
            }
            let elapsed = started.elapsed();
            match injected {
                Some(super::Injected::Fail) if elapsed >= copy / 2 => {
                    return Some(failed("Live migration failed: injected by the test bed"));
                }
                Some(super::Injected::Stall)
                    if !progress_timeout.is_zero() && elapsed > progress_timeout =>
                {
                    return Some(Outcome::Failed {
                        reason: transfer::stuck_message(elapsed),
                        aborted: true,
                    });
                }
                _ => {}
            }
            if !acceptable.is_zero() && elapsed > acceptable {
                return Some(Outcome::Failed {
                    reason: transfer::not_completed_message(acceptable),
                    aborted: true,
                });
            }
            if injected != Some(super::Injected::Stall) && elapsed >= copy {
                return None;
            }
            let mut next = Duration::from_millis(200);
            if injected != Some(super::Injected::Stall) {
                next = next.min(copy.saturating_sub(elapsed));
            }
            self.ctx.changed(next.max(Duration::from_millis(1))).await;
        }
    }

    /// The hand-over writes of this release; the migration is reported Succeeded once
    /// `completed` is seen, and the source launcher exits a while after the hand-over.
    async fn hand_over(&mut self, target_node: &str, source_pod_uid: &str) {
        let version = self.ctx.opts.version;
        let state = self.state.clone();
        let moved = Moved {
            target_node,
            state: &state,
        };
        for (i, write) in handover::sequence(version).iter().enumerate() {
            if i == 1 {
                tokio::time::sleep(self.ctx.opts.handover_gap).await;
            }
            let patch = handover::patch(*write, &moved, Utc::now());
            if matches!(
                write,
                handover::Write::SourceCompleted | handover::Write::TargetAck
            ) {
                self.state = patch["status"]["migrationState"].clone();
            }
            if handover::completes(*write) {
                self.state["completed"] = json!(true);
            }
            self.patch_vmi(patch).await;
            if handover::completes(*write)
                && !self.transitions.iter().any(|t| t.phase == "Succeeded")
            {
                self.wait_vmi_completed().await;
                self.state["completed"] = json!(true);
                self.set_phase("Succeeded").await;
                self.release_slot();
                self.finish().await;
            }
        }
        // virt-launcher on the source exits once its domain is gone, not at once.
        tokio::time::sleep(self.ctx.opts.source_exit_delay).await;
        self.ctx.workloads.exit(source_pod_uid, 0);
    }

    /// The migration controller acts on its VMI informer: wait until it shows `completed`.
    async fn wait_vmi_completed(&self) {
        let seen_by = Instant::now() + Duration::from_secs(10);
        while Instant::now() < seen_by
            && !self.vmi().is_some_and(|v| {
                v.status
                    .as_ref()
                    .and_then(|s| s.migration_state.as_ref())
                    .is_some_and(|m| {
                        m.completed && m.migration_uid.as_deref() == Some(self.uid.as_str())
                    })
            })
        {
            self.ctx.changed(Duration::from_millis(200)).await;
        }
    }

    /// v1.5's `expandPDB`: minAvailable 2 and the migration's name on the VMI's PDB, then wait
    /// until the disruption controller has seen it (`isMigrationProtected`).
    async fn protect_with_pdb(&self, vmi: &VirtualMachineInstance) -> Result<(), Outcome> {
        use super::admitter::migratable_on_eviction;
        if !migratable_on_eviction(vmi, self.ctx.cluster_config().eviction_strategy) {
            return Ok(());
        }
        let api = Api::<PodDisruptionBudget>::namespaced(self.ctx.client.clone(), &self.ns);
        let vmi_uid = vmi.metadata.uid.clone().unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.cancelled() {
                return Err(failed(CANCELED));
            }
            if Instant::now() >= deadline {
                return Err(failed(format!(
                    "Found no PDB protecting the vmi {}",
                    self.m.spec.vmi_name
                )));
            }
            let pdb = self
                .ctx
                .pdbs
                .state()
                .into_iter()
                .find(|p| super::pdb::owned_by(p, &vmi_uid));
            let Some(pdb) = pdb else {
                self.ctx.changed(Duration::from_millis(500)).await;
                continue;
            };
            let name = pdb.metadata.name.clone().unwrap_or_default();
            let expanded = pdb
                .spec
                .as_ref()
                .and_then(|s| s.min_available.as_ref())
                .is_some_and(|m| {
                    *m == k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(2)
                })
                && pdb
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(MIGRATION_NAME_LABEL))
                    == Some(&self.name);
            if !expanded {
                let patch = json!({"spec": {"minAvailable": 2},
                                   "metadata": {"labels": {MIGRATION_NAME_LABEL: self.name}}});
                if let Err(e) = api
                    .patch(&name, &PatchParams::default(), &Patch::Strategic(patch))
                    .await
                {
                    tracing::warn!(pdb = name, error = %e, "expanding the PodDisruptionBudget failed");
                }
                self.ctx.changed(Duration::from_millis(200)).await;
                continue;
            }
            if super::pdb::protects_migration(&pdb) {
                return Ok(());
            }
            self.ctx.changed(Duration::from_millis(200)).await;
        }
    }

    async fn create_attachment_pod(&mut self, target: &Pod) {
        let pod = super::hotplug::attachment_pod(target, self.ctx.opts.version.launcher_image());
        match self.pods().create(&PostParams::default(), &pod).await {
            Ok(p) => self.attachment_pod = p.metadata.name,
            Err(e) => {
                tracing::warn!(migration = self.name, error = %e, "creating the target attachment pod failed")
            }
        }
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
