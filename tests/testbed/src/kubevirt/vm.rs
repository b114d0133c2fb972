//! The VirtualMachine controller (`pkg/virt-controller/watch/vm/vm.go`, v1.8.0; the same run
//! strategies from v1.5.0): `syncRunStrategy` keeps a VMI named like the VM running or stopped
//! according to `spec.runStrategy` and the `status.stateChangeRequests` that virt-api's
//! `start`/`stop`/`restart` subresources add ([`super::virtapi`]); `updateStatus` records
//! `created`, `ready`, `runStrategy`, the printable status and trims the first state change
//! request once it has been acted on (`isTrimFirstChangeRequestNeeded`).
//!
//! - Always: a missing VMI is started; a final one (or one a stop request names) is deleted,
//!   and started again once gone, so a VM whose VMI was stopped comes back, placed anew.
//! - RerunOnFailure: a Failed VMI is deleted and a start request queued; a Succeeded one is
//!   deleted and stays stopped.
//! - Manual: only start and stop requests act.
//! - Halted: any VMI is deleted; a start request switches the VM to Always.
//!
//! Not modelled: the start-failure backoff (VMIs in the bed never fail before running unless a
//! test kills them), instance types, data volumes, revisions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::Ctx;
use super::crds::{VirtualMachine, VirtualMachineInstance, VirtualMachineInstanceSpec};
use super::spec::RunStrategy;

/// The VM controller's finalizer on the VMIs it starts (`VirtualMachineControllerFinalizer`).
pub const VM_CONTROLLER_FINALIZER: &str = "kubevirt.io/virtualMachineControllerFinalize";

/// What `syncRunStrategy` does in one pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create the VMI.
    Start,
    /// Delete the VMI (graceful: its launcher pods get their grace period).
    Stop,
    /// RerunOnFailure after a failure: delete it and queue a start request.
    StopAndRequestStart,
    /// Halted with a start request: switch `spec.runStrategy` to Always.
    SwitchToAlways,
}

/// The VM's run strategy (`RunStrategy()`: `spec.running` maps to Always/Halted).
pub fn run_strategy(vm: &VirtualMachine) -> Option<RunStrategy> {
    match (&vm.spec.run_strategy, vm.spec.running) {
        (Some(s), _) => RunStrategy::parse(s),
        (None, Some(true)) => Some(RunStrategy::Always),
        (None, Some(false)) | (None, None) => Some(RunStrategy::Halted),
    }
}

fn first_request(vm: &VirtualMachine) -> Option<&super::crds::StateChangeRequest> {
    vm.status.as_ref()?.state_change_requests.first()
}

fn has_start_request(vm: &VirtualMachine) -> bool {
    first_request(vm).is_some_and(|r| r.action == "Start")
}

fn has_stop_request_for(vm: &VirtualMachine, vmi: &VirtualMachineInstance) -> bool {
    first_request(vm).is_some_and(|r| {
        r.action == "Stop" && r.uid.is_some() && r.uid.as_deref() == vmi.metadata.uid.as_deref()
    })
}

/// `syncRunStrategy` as a decision.
pub fn decide(vm: &VirtualMachine, vmi: Option<&VirtualMachineInstance>) -> Option<Action> {
    let strategy = run_strategy(vm)?;
    let deleting = vmi.is_some_and(|v| v.metadata.deletion_timestamp.is_some());
    match (strategy, vmi) {
        (RunStrategy::Always, Some(vmi)) => {
            ((has_stop_request_for(vm, vmi) || vmi.is_final()) && !deleting).then_some(Action::Stop)
        }
        (RunStrategy::Always, None) => Some(Action::Start),
        (RunStrategy::RerunOnFailure, Some(vmi)) => {
            if deleting {
                return None;
            }
            match vmi.phase() {
                "Failed" => Some(Action::StopAndRequestStart),
                "Succeeded" => Some(Action::Stop),
                _ if has_stop_request_for(vm, vmi) => Some(Action::Stop),
                _ => None,
            }
        }
        (RunStrategy::RerunOnFailure, None) => {
            let recorded = vm.status.as_ref().and_then(|s| s.run_strategy.as_deref());
            (has_start_request(vm) || recorded != Some(strategy.as_str())).then_some(Action::Start)
        }
        (RunStrategy::Manual, Some(vmi)) => {
            (has_stop_request_for(vm, vmi) && !deleting).then_some(Action::Stop)
        }
        (RunStrategy::Manual, None) => has_start_request(vm).then_some(Action::Start),
        (RunStrategy::Halted, Some(_)) => (!deleting).then_some(Action::Stop),
        (RunStrategy::Halted, None) => has_start_request(vm).then_some(Action::SwitchToAlways),
    }
}

/// `isTrimFirstChangeRequestNeeded`.
pub fn trim_first_request(vm: &VirtualMachine, vmi: Option<&VirtualMachineInstance>) -> bool {
    let Some(first) = first_request(vm) else {
        return false;
    };
    match first.action.as_str() {
        "Stop" => match vmi {
            None => true,
            Some(vmi) => first.uid.is_none() || first.uid.as_deref() != vmi.metadata.uid.as_deref(),
        },
        "Start" => vmi.is_some_and(|v| v.metadata.deletion_timestamp.is_none() && !v.is_final()),
        _ => false,
    }
}

/// `setPrintableStatus`, for the states the bed produces.
pub fn printable_status(vm: &VirtualMachine, vmi: Option<&VirtualMachineInstance>) -> &'static str {
    match vmi {
        None => {
            if run_strategy(vm) == Some(RunStrategy::Halted) || !has_start_request(vm) {
                "Stopped"
            } else {
                "Starting"
            }
        }
        Some(v) if v.metadata.deletion_timestamp.is_some() => "Stopping",
        Some(v) if v.is_migrating() => "Migrating",
        Some(v) if v.phase() == "Running" => "Running",
        Some(v) if v.is_final() => "Stopped",
        Some(_) => "Starting",
    }
}

/// `SetupVMIFromVM`: the template, named like the VM, owned by it.
pub fn vmi_for(vm: &VirtualMachine) -> Result<VirtualMachineInstance, serde_json::Error> {
    let template = &vm.spec.template;
    let spec: VirtualMachineInstanceSpec = serde_json::from_value(template["spec"].clone())?;
    let name = vm.metadata.name.clone().unwrap_or_default();
    let mut vmi = VirtualMachineInstance::new(&name, spec);
    let meta = &template["metadata"];
    vmi.metadata.namespace = vm.metadata.namespace.clone();
    vmi.metadata.labels = serde_json::from_value(meta["labels"].clone()).ok();
    vmi.metadata.annotations =
        serde_json::from_value::<BTreeMap<String, String>>(meta["annotations"].clone()).ok();
    vmi.metadata.finalizers = Some(vec![VM_CONTROLLER_FINALIZER.to_owned()]);
    vmi.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "kubevirt.io/v1".into(),
            kind: "VirtualMachine".into(),
            name,
            uid: vm.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        },
    ]);
    Ok(vmi)
}

pub(crate) async fn run(ctx: Arc<Ctx>) {
    loop {
        for vm in ctx.vms.state() {
            sync(&ctx, &vm).await;
        }
        ctx.changed(Duration::from_secs(1)).await;
    }
}

async fn sync(ctx: &Ctx, vm: &VirtualMachine) {
    let ns = vm.metadata.namespace.clone().unwrap_or_default();
    let name = vm.metadata.name.clone().unwrap_or_default();
    if vm.metadata.deletion_timestamp.is_some() {
        return;
    }
    let vms = Api::<VirtualMachine>::namespaced(ctx.client.clone(), &ns);
    let vmis = Api::<VirtualMachineInstance>::namespaced(ctx.client.clone(), &ns);
    // Only a VMI this VM controls counts as its own.
    let vmi = ctx.vmi(&ns, &name).filter(|v| {
        v.metadata.owner_references.as_ref().is_some_and(|o| {
            o.iter()
                .any(|r| r.controller == Some(true) && Some(&r.uid) == vm.metadata.uid.as_ref())
        })
    });
    let mut requests = vm
        .status
        .as_ref()
        .map(|s| s.state_change_requests.clone())
        .unwrap_or_default();
    match decide(vm, vmi.as_deref()) {
        Some(Action::Start) if !ctx.vm_start_pending(&format!("{ns}/{name}")) => {
            match vmi_for(vm) {
                Ok(new) => {
                    ctx.expect_vm_start(&format!("{ns}/{name}"));
                    match vmis.create(&PostParams::default(), &new).await {
                        Ok(_) => tracing::info!(vm = name, "started the virtual machine"),
                        Err(e) => tracing::warn!(vm = name, error = %e, "starting VM failed"),
                    }
                }
                Err(e) => tracing::warn!(vm = name, error = %e, "VM template is not a VMI spec"),
            }
        }
        Some(action @ (Action::Stop | Action::StopAndRequestStart)) => {
            match vmis.delete(&name, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(vm = name, "stopped the virtual machine"),
                Err(e) => tracing::warn!(vm = name, error = %e, "stopping VM failed"),
            }
            if action == Action::StopAndRequestStart {
                requests.push(super::crds::StateChangeRequest {
                    action: "Start".into(),
                    data: None,
                    uid: None,
                });
            }
        }
        Some(Action::SwitchToAlways) => {
            let patch = json!({"spec": {"runStrategy": "Always"}});
            if let Err(e) = vms
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                tracing::warn!(vm = name, error = %e, "switching VM to Always failed");
            }
        }
        Some(Action::Start) | None => {}
    }

    // updateStatus.
    let mut trimmed = vm.clone();
    if let Some(s) = trimmed.status.as_mut() {
        s.state_change_requests = requests.clone();
    }
    if trim_first_request(&trimmed, vmi.as_deref()) {
        requests.remove(0);
    }
    let created = vmi.is_some();
    let ready = vmi.as_ref().is_some_and(|v| {
        v.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    });
    let strategy = run_strategy(vm).map(RunStrategy::as_str);
    let recorded = vm.status.as_ref().and_then(|s| s.run_strategy.clone());
    let run_strategy = if recorded.is_some() || created {
        strategy.map(str::to_owned)
    } else {
        recorded
    };
    let status = json!({"created": created, "ready": ready,
                        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                        "runStrategy": run_strategy,
                        "printableStatus": printable_status(vm, vmi.as_deref()),
                        "stateChangeRequests": requests});
    let old = vm.status.clone().unwrap_or_default();
    let changed = old.created != created
        || old.ready != ready
        || old.run_strategy != run_strategy
        || old.printable_status.as_deref() != status["printableStatus"].as_str()
        || old.state_change_requests.len() != requests.len();
    if changed
        && let Err(e) = vms
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
    {
        tracing::warn!(vm = name, error = %e, "updating VM status failed");
    }
    // Release a final VMI once its state is recorded.
    if let Some(v) = &vmi
        && v.is_final()
        && v.metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|f| f == VM_CONTROLLER_FINALIZER))
    {
        let kept: Vec<&String> = v
            .metadata
            .finalizers
            .iter()
            .flatten()
            .filter(|f| *f != VM_CONTROLLER_FINALIZER)
            .collect();
        let _ = vmis
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": kept,
                                                  "resourceVersion": v.metadata.resource_version}})),
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubevirt::launcher::VmiTemplate;
    use crate::kubevirt::spec::VmiKind;

    fn vm(strategy: RunStrategy, requests: serde_json::Value) -> VirtualMachine {
        let mut vm = VmiTemplate::new(VmiKind::Live, Some("node-1")).vm("a", "default", strategy);
        vm.metadata.uid = Some("vm-uid".into());
        vm.status = Some(serde_json::from_value(json!({"stateChangeRequests": requests})).unwrap());
        vm
    }

    fn vmi(phase: &str, uid: &str) -> VirtualMachineInstance {
        let mut v = VmiTemplate::new(VmiKind::Live, Some("node-1")).vmi("a", "default");
        v.metadata.uid = Some(uid.into());
        v.status = Some(serde_json::from_value(json!({"phase": phase})).unwrap());
        v
    }

    #[test]
    fn always_restarts_a_stopped_vmi() {
        let always = vm(RunStrategy::Always, json!([]));
        assert_eq!(decide(&always, None), Some(Action::Start));
        assert_eq!(decide(&always, Some(&vmi("Running", "u"))), None);
        assert_eq!(
            decide(&always, Some(&vmi("Succeeded", "u"))),
            Some(Action::Stop)
        );
        assert_eq!(
            decide(&always, Some(&vmi("Failed", "u"))),
            Some(Action::Stop)
        );
        let restart = vm(
            RunStrategy::Always,
            json!([{"action": "Stop", "uid": "u"}, {"action": "Start"}]),
        );
        assert_eq!(
            decide(&restart, Some(&vmi("Running", "u"))),
            Some(Action::Stop)
        );
    }

    #[test]
    fn rerun_on_failure_restarts_only_failures() {
        let mut rerun = vm(RunStrategy::RerunOnFailure, json!([]));
        assert_eq!(
            decide(&rerun, Some(&vmi("Succeeded", "u"))),
            Some(Action::Stop)
        );
        assert_eq!(
            decide(&rerun, Some(&vmi("Failed", "u"))),
            Some(Action::StopAndRequestStart)
        );
        // A new VM starts; a stopped one whose status already says RerunOnFailure stays off.
        assert_eq!(decide(&rerun, None), Some(Action::Start));
        rerun.status.as_mut().unwrap().run_strategy = Some("RerunOnFailure".into());
        assert_eq!(decide(&rerun, None), None);
    }

    #[test]
    fn manual_and_halted_follow_requests() {
        let manual = vm(RunStrategy::Manual, json!([]));
        assert_eq!(decide(&manual, None), None);
        let start = vm(RunStrategy::Manual, json!([{"action": "Start"}]));
        assert_eq!(decide(&start, None), Some(Action::Start));
        let stop = vm(RunStrategy::Manual, json!([{"action": "Stop", "uid": "u"}]));
        assert_eq!(
            decide(&stop, Some(&vmi("Running", "u"))),
            Some(Action::Stop)
        );
        assert_eq!(decide(&stop, Some(&vmi("Running", "other"))), None);
        let halted = vm(RunStrategy::Halted, json!([]));
        assert_eq!(
            decide(&halted, Some(&vmi("Running", "u"))),
            Some(Action::Stop)
        );
        let halted_start = vm(RunStrategy::Halted, json!([{"action": "Start"}]));
        assert_eq!(decide(&halted_start, None), Some(Action::SwitchToAlways));
    }

    #[test]
    fn requests_are_trimmed_once_acted_on() {
        let stop = vm(RunStrategy::Manual, json!([{"action": "Stop", "uid": "u"}]));
        assert!(!trim_first_request(&stop, Some(&vmi("Running", "u"))));
        assert!(trim_first_request(&stop, None));
        let start = vm(RunStrategy::Manual, json!([{"action": "Start"}]));
        assert!(!trim_first_request(&start, None));
        assert!(trim_first_request(&start, Some(&vmi("Scheduling", "n"))));
    }

    #[test]
    fn vmi_from_template_is_owned_and_named_like_the_vm() {
        let v = vm(RunStrategy::Always, json!([]));
        let vmi = vmi_for(&v).unwrap();
        assert_eq!(vmi.metadata.name.as_deref(), Some("a"));
        let owner = &vmi.metadata.owner_references.unwrap()[0];
        assert_eq!(owner.kind, "VirtualMachine");
        assert_eq!(owner.uid, "vm-uid");
        assert_eq!(vmi.spec.eviction_strategy.as_deref(), Some("LiveMigrate"));
        assert!(
            vmi.metadata
                .annotations
                .unwrap()
                .contains_key(crate::kubevirt::launcher::INITIAL_NODE_ANNOTATION)
        );
    }
}
