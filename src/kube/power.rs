//! The API side of power events ([`crate::drain::power`]): each agent announces its node's
//! shutdown as a `coordination.k8s.io` Lease (`shutdown-guard-down-<node>` in the agent's
//! namespace), renewed by nobody, fresh for the node's drain budget; the others read those and
//! the Nodes to judge. VMs are stopped through KubeVirt's `stop` subresource after a record is
//! written on the VM, and started again through `start` (or their run strategy put back).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams,
    PostParams,
};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use super::{CALL_TIMEOUT, bounded};
use crate::drain::model::ObjKey;
use crate::drain::power::{self, NodeView, StopRecord, VmNow};

pub const ANNOUNCE_PREFIX: &str = "shutdown-guard-down-";
/// Marks the announcements, so they are listed apart from the turns.
pub const ANNOUNCE_LABEL: &str = "shutdown-guard.kubevirt.io/announces";
/// virt-handler's mark on a node that can run VMs (`kubevirt.io/schedulable`).
pub const VIRT_HANDLER_LABEL: &str = "kubevirt.io/schedulable";
/// On a VM a power event stopped: the record ([`power::encode`]).
pub const RECORD_ANNOTATION: &str = "shutdown-guard.kubevirt.io/power-event-stopped";
/// The same VMs, listable by label.
pub const RECORD_LABEL: &str = "shutdown-guard.kubevirt.io/power-event-stopped";

/// kubevirt.io/v1 VirtualMachine.
pub fn vm_resource() -> ApiResource {
    ApiResource {
        group: "kubevirt.io".into(),
        version: "v1".into(),
        api_version: "kubevirt.io/v1".into(),
        kind: "VirtualMachine".into(),
        plural: "virtualmachines".into(),
    }
}

/// Whether an announcement read at `now` still stands: its holder set it less than its
/// duration ago (a node that went down leaves it behind, to expire).
pub fn fresh(spec: Option<&LeaseSpec>, now: Timestamp) -> bool {
    let Some(spec) = spec else {
        return false;
    };
    let duration = spec.lease_duration_seconds.unwrap_or(0).max(0) as i64;
    spec.renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .is_some_and(|t| t.0.as_second().saturating_add(duration) >= now.as_second())
}

/// Says that `node` is shutting down, for `fresh_for` (its drain budget): creates or replaces
/// its Lease.
pub async fn announce(api: &Api<Lease>, node: &str, fresh_for: Duration) -> Result<(), String> {
    let name = format!("{ANNOUNCE_PREFIX}{node}");
    let now = Timestamp::now();
    let spec = LeaseSpec {
        holder_identity: Some(node.to_owned()),
        lease_duration_seconds: Some(fresh_for.as_secs().clamp(1, i32::MAX as u64) as i32),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        ..LeaseSpec::default()
    };
    match bounded(api.get_opt(&name)).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name),
                    labels: Some([(ANNOUNCE_LABEL.to_owned(), "shutdown".to_owned())].into()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            bounded(api.create(&PostParams::default(), &lease))
                .await
                .map(|_| ())
        }
        Some(mut lease) => {
            lease.spec = Some(spec);
            bounded(api.replace(&name, &PostParams::default(), &lease))
                .await
                .map(|_| ())
        }
    }
}

/// Takes the announcement back (a cancelled shutdown, or the node up again).
pub async fn withdraw(api: &Api<Lease>, node: &str) -> Result<(), String> {
    let name = format!("{ANNOUNCE_PREFIX}{node}");
    match tokio::time::timeout(CALL_TIMEOUT, api.delete(&name, &DeleteParams::default())).await {
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(kube::Error::Api(s))) if s.code == 404 => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

/// Every node as [`power::judge`] reads it: Ready, schedulable, announced as going down.
pub async fn node_views(client: &Client, leases: &Api<Lease>) -> Result<Vec<NodeView>, String> {
    let (nodes, down) = tokio::join!(nodes(client), announced(leases));
    Ok(with_announced(nodes?, &down?))
}

/// The Nodes, read from the API server's cache (a list at resourceVersion 0: no etcd read,
/// which matters when every agent of a cluster asks at once), none yet announced.
pub async fn nodes(client: &Client) -> Result<Vec<NodeView>, String> {
    let nodes: Api<Node> = Api::all(client.clone());
    Ok(bounded(nodes.list(&ListParams::default().match_any()))
        .await?
        .items
        .into_iter()
        .filter_map(|n| {
            Some(NodeView {
                ready: is_ready(&n),
                schedulable: !n
                    .spec
                    .as_ref()
                    .and_then(|s| s.unschedulable)
                    .unwrap_or(false),
                shutting_down: false,
                virt_handler: n
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(VIRT_HANDLER_LABEL))
                    .map(|v| v == "true"),
                name: n.metadata.name?,
            })
        })
        .collect())
}

/// The nodes whose shutdown is announced now (fresh announcements only).
pub async fn announced(leases: &Api<Lease>) -> Result<Vec<String>, String> {
    let ours = ListParams::default().labels(ANNOUNCE_LABEL).match_any();
    Ok(fresh_holders(
        bounded(leases.list(&ours)).await?.items.iter(),
    ))
}

/// The announcements as they change (list, then watch), retried with backoff.
pub fn announcements(
    leases: Api<Lease>,
) -> impl futures::Stream<Item = Result<watcher::Event<Lease>, watcher::Error>> {
    watcher(leases, watcher::Config::default().labels(ANNOUNCE_LABEL)).default_backoff()
}

/// Applies one watch event to the announcements by name; answers whether they are complete
/// (the first list is in).
pub fn apply_announcement(
    into: &mut std::collections::BTreeMap<String, Lease>,
    ev: watcher::Event<Lease>,
) -> bool {
    let name = |l: &Lease| l.metadata.name.clone().unwrap_or_default();
    match ev {
        watcher::Event::Init => {
            into.clear();
            false
        }
        watcher::Event::InitApply(l) => {
            into.insert(name(&l), l);
            false
        }
        watcher::Event::InitDone => true,
        watcher::Event::Apply(l) => {
            into.insert(name(&l), l);
            true
        }
        watcher::Event::Delete(l) => {
            into.remove(&name(&l));
            true
        }
    }
}

/// The nodes of the announcements that are fresh now.
pub fn fresh_holders<'a>(leases: impl Iterator<Item = &'a Lease>) -> Vec<String> {
    let now = Timestamp::now();
    leases
        .filter(|l| fresh(l.spec.as_ref(), now))
        .filter_map(|l| l.spec.as_ref()?.holder_identity.clone())
        .collect()
}

/// `nodes` with the announced ones marked as shutting down.
pub fn with_announced(mut nodes: Vec<NodeView>, down: &[String]) -> Vec<NodeView> {
    for n in &mut nodes {
        n.shutting_down = down.contains(&n.name);
    }
    nodes
}

/// The node's `Ready` condition is `True`.
pub fn is_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The VM that owns a VMI (KubeVirt's VM controller is its controller owner, same name).
pub fn owner_vm(vmi: &DynamicObject) -> Option<String> {
    vmi.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.kind == "VirtualMachine" && o.controller == Some(true))
        .map(|o| o.name.clone())
}

/// `spec.runStrategy`, or what `spec.running` stands for (`RunStrategy()` upstream).
pub fn run_strategy(vm: &DynamicObject) -> String {
    match (
        vm.data
            .pointer("/spec/runStrategy")
            .and_then(|v| v.as_str()),
        vm.data.pointer("/spec/running").and_then(|v| v.as_bool()),
    ) {
        (Some(s), _) => s.to_owned(),
        (None, Some(true)) => "Always".into(),
        _ => "Halted".into(),
    }
}

/// What KubeVirt's `stop` does to a VM's generation: `Always` and `Once` become `Halted` (a
/// spec change), `Manual` and `RerunOnFailure` get a stop request in their status (none).
fn generation_after_stop(strategy: &str, generation: i64) -> i64 {
    match strategy {
        "Always" | "Once" => generation + 1,
        _ => generation,
    }
}

/// How a VMI was stopped in a power event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoppedVia {
    /// Its VM's `stop`, after writing the record.
    Vm { vm: String, run_strategy: String },
    /// It has no VM: deleted (KubeVirt shuts the guest down within its grace period).
    Deleted,
    /// Its VM is already `Halted`: KubeVirt is stopping it, nothing to record.
    AlreadyHalted,
}

/// Stops a VMI where it runs without KubeVirt starting it anywhere else: records on its VM
/// that `event` stopped it and how it ran, then asks virt-api to `stop` it. The record goes
/// first, so a VM is never stopped without the note that brings it back.
pub async fn stop_vmi(
    client: &Client,
    vmi: &ObjKey,
    event: &str,
    node: &str,
    grace_seconds: u32,
) -> Result<StoppedVia, String> {
    let vmis: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &vmi.namespace,
        &super::kubevirt::vmi_resource(),
    );
    let Some(obj) = bounded(vmis.get_opt(&vmi.name)).await? else {
        return Ok(StoppedVia::Deleted);
    };
    let Some(vm_name) = owner_vm(&obj) else {
        return match tokio::time::timeout(
            CALL_TIMEOUT,
            vmis.delete(
                &vmi.name,
                &DeleteParams::default().grace_period(grace_seconds),
            ),
        )
        .await
        {
            Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
            Ok(Ok(_)) => Ok(StoppedVia::Deleted),
            Ok(Err(kube::Error::Api(s))) if s.code == 404 => Ok(StoppedVia::Deleted),
            Ok(Err(e)) => Err(e.to_string()),
        };
    };
    let vms: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &vmi.namespace, &vm_resource());
    let vm = bounded(vms.get(&vm_name)).await?;
    let strategy = run_strategy(&vm);
    if strategy == "Halted" {
        return Ok(StoppedVia::AlreadyHalted);
    }
    let generation = vm.metadata.generation.unwrap_or(0);
    let record = StopRecord {
        event: event.to_owned(),
        node: node.to_owned(),
        run_strategy: strategy.clone(),
        generation: generation_after_stop(&strategy, generation),
    };
    // The resourceVersion makes the record a compare-and-swap against the VM just read.
    let patch = serde_json::json!({
        "metadata": {
            "resourceVersion": vm.metadata.resource_version,
            "annotations": { RECORD_ANNOTATION: power::encode(&record) },
            "labels": { RECORD_LABEL: "true" },
        }
    });
    bounded(vms.patch(&vm_name, &PatchParams::default(), &Patch::Merge(&patch))).await?;
    // `gracePeriod`: no longer than the drain has left (virt-api shortens the VMI's own).
    let body = serde_json::json!({ "gracePeriod": grace_seconds });
    subresource(client, &vmi.namespace, &vm_name, "stop", &body).await?;
    Ok(StoppedVia::Vm {
        vm: vm_name,
        run_strategy: strategy,
    })
}

/// `PUT /apis/subresources.kubevirt.io/v1/namespaces/<ns>/virtualmachines/<name>/<verb>`.
async fn subresource(
    client: &Client,
    ns: &str,
    name: &str,
    verb: &str,
    body: &serde_json::Value,
) -> Result<(), String> {
    let url =
        format!("/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachines/{name}/{verb}");
    let req = http::Request::put(url)
        .header("content-type", "application/json")
        .body(body.to_string().into_bytes())
        .map_err(|e| e.to_string())?;
    bounded(client.request_text(req)).await.map(|_| ())
}

/// The VMs carrying a power-event record, cluster-wide, with whether their VMI runs.
pub async fn recorded_vms(client: &Client) -> Result<Vec<VmNow>, String> {
    let vms: Api<DynamicObject> = Api::all_with(client.clone(), &vm_resource());
    let list = bounded(vms.list(&ListParams::default().labels(RECORD_LABEL))).await?;
    if list.items.is_empty() {
        return Ok(Vec::new());
    }
    let vmis: Api<DynamicObject> = Api::all_with(client.clone(), &super::kubevirt::vmi_resource());
    let phases: Vec<(ObjKey, String)> = bounded(vmis.list(&ListParams::default()))
        .await?
        .items
        .into_iter()
        .filter_map(|v| {
            let key = ObjKey::new(v.metadata.namespace.clone()?, v.metadata.name.clone()?);
            let phase = v
                .data
                .pointer("/status/phase")
                .and_then(|p| p.as_str())
                .unwrap_or("")
                .to_owned();
            Some((key, phase))
        })
        .collect();
    Ok(list
        .items
        .into_iter()
        .filter_map(|vm| {
            let key = ObjKey::new(vm.metadata.namespace.clone()?, vm.metadata.name.clone()?);
            let phase = phases
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, p)| p.as_str());
            Some(VmNow {
                uid: vm.metadata.uid.clone().unwrap_or_default(),
                generation: vm.metadata.generation.unwrap_or(0),
                has_vmi: phase.is_some_and(|p| p != "Succeeded" && p != "Failed"),
                running: phase == Some("Running"),
                record: vm
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(RECORD_ANNOTATION))
                    .and_then(|r| power::decode(r)),
                key,
            })
        })
        .collect())
}

/// Starts a stopped VM again the way it ran: `Always` through `start` (virt-api turns
/// `Halted` back into `Always`), `Once` by putting the strategy back (`start` refuses it),
/// `Manual` and `RerunOnFailure` through `start` (a start request).
pub async fn start_vm(client: &Client, vm: &ObjKey, record: &StopRecord) -> Result<(), String> {
    if record.run_strategy == "Once" {
        let vms: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &vm.namespace, &vm_resource());
        let current = bounded(vms.get(&vm.name)).await?;
        if run_strategy(&current) != "Halted" {
            return Err(format!("its runStrategy is {} now", run_strategy(&current)));
        }
        // Against the VM just read: nobody's change in between is overwritten.
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": current.metadata.resource_version },
            "spec": { "runStrategy": "Once" },
        });
        return bounded(vms.patch(&vm.name, &PatchParams::default(), &Patch::Merge(&patch)))
            .await
            .map(|_| ());
    }
    subresource(
        client,
        &vm.namespace,
        &vm.name,
        "start",
        &serde_json::json!({}),
    )
    .await
}

/// The nodes up for a restore (Ready and schedulable), and whether any node still announces a
/// shutdown.
pub async fn up_nodes(
    client: &Client,
    leases: &Api<Lease>,
) -> Result<(std::collections::BTreeSet<String>, bool), String> {
    let views = node_views(client, leases).await?;
    let announced = views.iter().any(|v| v.shutting_down);
    let marks = power::virt_handler_marks(&views);
    Ok((
        views
            .iter()
            .filter(|v| v.runs_vms(marks))
            .map(|v| v.name.clone())
            .collect(),
        announced,
    ))
}

/// Drops a VM's record (it runs again, or someone else took it over).
pub async fn forget(client: &Client, vm: &ObjKey) -> Result<(), String> {
    let vms: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &vm.namespace, &vm_resource());
    let patch = serde_json::json!({
        "metadata": {
            "annotations": { RECORD_ANNOTATION: null },
            "labels": { RECORD_LABEL: null },
        }
    });
    match bounded(vms.patch(&vm.name, &PatchParams::default(), &Patch::Merge(&patch))).await {
        Err(e) if e.contains("NotFound") || e.contains("not found") => Ok(()),
        r => r.map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn an_announcement_stands_for_its_duration() {
        let spec = LeaseSpec {
            holder_identity: Some("node-2".into()),
            lease_duration_seconds: Some(60),
            renew_time: Some(MicroTime(at(1000))),
            ..LeaseSpec::default()
        };
        assert!(fresh(Some(&spec), at(1000)));
        assert!(fresh(Some(&spec), at(1060)));
        assert!(!fresh(Some(&spec), at(1061)));
        assert!(!fresh(None, at(1000)));
    }

    #[test]
    fn announcements_count_once_listed_and_follow_the_watch() {
        let lease = |node: &str, renewed: Timestamp| Lease {
            metadata: ObjectMeta {
                name: Some(format!("{ANNOUNCE_PREFIX}{node}")),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.into()),
                lease_duration_seconds: Some(60),
                renew_time: Some(MicroTime(renewed)),
                ..LeaseSpec::default()
            }),
        };
        let now = Timestamp::now();
        let mut seen = std::collections::BTreeMap::new();
        assert!(!apply_announcement(&mut seen, watcher::Event::Init));
        assert!(!apply_announcement(
            &mut seen,
            watcher::Event::InitApply(lease("node-2", now))
        ));
        // Left behind by a node that went down long ago: not fresh.
        assert!(!apply_announcement(
            &mut seen,
            watcher::Event::InitApply(lease("node-4", at(1000)))
        ));
        assert!(apply_announcement(&mut seen, watcher::Event::InitDone));
        assert!(apply_announcement(
            &mut seen,
            watcher::Event::Apply(lease("node-3", now))
        ));
        assert_eq!(fresh_holders(seen.values()), ["node-2", "node-3"]);
        assert!(apply_announcement(
            &mut seen,
            watcher::Event::Delete(lease("node-2", now))
        ));
        assert_eq!(fresh_holders(seen.values()), ["node-3"]);
        // A relist starts over.
        assert!(!apply_announcement(&mut seen, watcher::Event::Init));
        assert!(seen.is_empty());
    }

    #[test]
    fn stop_moves_the_generation_of_always_and_once_only() {
        assert_eq!(generation_after_stop("Always", 4), 5);
        assert_eq!(generation_after_stop("Once", 4), 5);
        assert_eq!(generation_after_stop("Manual", 4), 4);
        assert_eq!(generation_after_stop("RerunOnFailure", 4), 4);
    }
}
