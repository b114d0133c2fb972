//! VMIs and VMs over their life: a booting VMI is labelled with its node at Scheduled before
//! virt-handler reports it `LiveMigratable` (`pkg/virt-controller/watch/vmi/lifecycle.go`,
//! `pkg/virt-handler/vm.go`), and the eviction admitter refuses it meanwhile; hotplug
//! attachment pods follow their launcher pod (`template.go`, `admitHotplugPod`); VMs follow
//! their `runStrategy` and the `start`/`stop`/`restart` subresources
//! (`pkg/virt-controller/watch/vm/vm.go`, `pkg/virt-api/rest/lifecycle.go`).

mod kubevirt_common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kubevirt_common::{SERIAL, VmiRecorder, bed, evict, launcher_of, pod_phase, until, wait_vmi};
use testbed::kubevirt::{KubeVirtOptions, VirtualMachine, VirtualMachineInstance};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn booting_vmi_is_labelled_before_it_is_live_migratable() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let b = bed(3, KubeVirtOptions::default()).await?;
    let recorder = VmiRecorder::start(&b.client, "live-1").await;
    // create_vmis returns boot= VMIs once they are scheduled, still booting.
    let created = b
        .kubevirt
        .create_vmis("default", "node-1", &"live=1/boot=4s".parse()?)
        .await?;
    ensure!(created[0].phase() == "Scheduled", "{:?}", created[0].status);

    // The admitter reads a missing condition as not migratable.
    let pod = launcher_of_any(&b.client, "live-1").await?;
    match evict(&b.raw, &pod).await? {
        Err((429, m))
            if m.ends_with(
                "VMI live-1 is configured with an eviction strategy but is not live-migratable",
            ) => {}
        other => anyhow::bail!("eviction of a booting VMI answered {other:?}"),
    }

    wait_vmi(
        &b.client,
        "live-1",
        "running and migratable",
        Duration::from_secs(30),
        |v| v.phase() == "Running" && v.is_migratable(),
    )
    .await?;
    let seen = recorder
        .wait("LiveMigratable True", Duration::from_secs(10), |s| {
            s.iter()
                .any(|s| s.live_migratable.as_deref() == Some("True"))
        })
        .await?;
    let labelled = seen
        .iter()
        .position(|s| s.label.as_deref() == Some("node-1"))
        .context("never labelled")?;
    let migratable = seen
        .iter()
        .position(|s| s.live_migratable.as_deref() == Some("True"))
        .context("never migratable")?;
    ensure!(
        labelled < migratable,
        "labelled at update {labelled}, migratable at {migratable}"
    );
    let first = &seen[labelled];
    ensure!(
        first.phase == "Scheduled"
            && first.node.as_deref() == Some("node-1")
            && first.live_migratable.is_none(),
        "labelled as {first:?}"
    );

    // Running now: the same eviction starts an evacuation.
    match evict(&b.raw, &pod).await? {
        Err((429, m)) if m.contains("Eviction triggered evacuation") => {}
        other => anyhow::bail!("eviction of the running VMI answered {other:?}"),
    }
    Ok(())
}

/// The launcher pod of a VMI on its node, Running or not yet.
async fn launcher_of_any(client: &kube::Client, vmi: &str) -> Result<String> {
    let v = Api::<VirtualMachineInstance>::namespaced(client.clone(), "default")
        .get(vmi)
        .await?;
    let uid = v.metadata.uid.clone().unwrap_or_default();
    let pods = Api::<Pod>::namespaced(client.clone(), "default")
        .list(&ListParams::default().labels(&format!("kubevirt.io/created-by={uid}")))
        .await?;
    pods.items
        .into_iter()
        .find_map(|p| p.metadata.name)
        .context("no launcher pod")
}

fn attachment_pods(pods: &[Pod]) -> Vec<&Pod> {
    pods.iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubevirt.io"))
                .is_some_and(|v| v == "hotplug-disk")
        })
        .collect()
}

fn owner_uid(p: &Pod) -> Option<&str> {
    p.metadata
        .owner_references
        .as_ref()?
        .first()
        .map(|o| o.uid.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotplug_attachment_pods_follow_their_launcher() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let b = bed(
        3,
        KubeVirtOptions {
            migration_duration: Duration::from_secs(1),
            source_exit_delay: Duration::from_millis(500),
            ..KubeVirtOptions::default()
        },
    )
    .await?;
    b.kubevirt
        .create_vmis("default", "node-1", &"live=1/hotplug".parse()?)
        .await?;
    let source = launcher_of(&b.client, "live-1").await?;
    let source_uid = source.metadata.uid.clone().unwrap_or_default();
    let pods = Api::<Pod>::namespaced(b.client.clone(), "default");
    let hp = until("an attachment pod", Duration::from_secs(30), || {
        let pods = pods.clone();
        let source_uid = source_uid.clone();
        async move {
            let list = pods.list(&ListParams::default()).await?.items;
            Ok(attachment_pods(&list)
                .into_iter()
                .find(|p| {
                    owner_uid(p) == Some(source_uid.as_str())
                        && pod_phase(Some(p)) == Some("Running")
                })
                .cloned())
        }
    })
    .await?;
    let hp_name = hp.metadata.name.clone().unwrap_or_default();
    ensure!(hp_name.starts_with("hp-volume-"), "{hp_name}");
    let owner = &hp.metadata.owner_references.as_ref().context("no owner")?[0];
    ensure!(
        owner.kind == "Pod" && owner.controller == Some(true),
        "{owner:?}"
    );
    ensure!(hp.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-1"));

    // v1.7+: not while its VMI exists.
    match evict(&b.raw, &hp_name).await? {
        Err((429, m)) if m.ends_with(&format!(
            "cannot evict hotplug pod: {hp_name} associated with running vmi: live-1 in namespace default"
        )) => {}
        other => anyhow::bail!("eviction of the attachment pod answered {other:?}"),
    }

    // A user migration to a chosen node: the target launcher gets its own attachment pod and
    // the source's goes once the source launcher has finished.
    let m = b.kubevirt.migrate("default", "live-1", "node-3").await?;
    ensure!(
        m.spec.rest["addedNodeSelector"]["kubernetes.io/hostname"] == "node-3",
        "{:?}",
        m.spec
    );
    wait_vmi(
        &b.client,
        "live-1",
        "on node-3",
        Duration::from_secs(60),
        |v| v.node_name() == Some("node-3") && v.migration_state().is_some_and(|m| m.completed),
    )
    .await?;
    let target = launcher_of(&b.client, "live-1").await?;
    let target_uid = target.metadata.uid.clone().unwrap_or_default();
    until(
        "the attachment pods to follow",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            let (source_uid, target_uid) = (source_uid.clone(), target_uid.clone());
            async move {
                let list = pods.list(&ListParams::default()).await?.items;
                let hps = attachment_pods(&list);
                let on_target = hps.iter().any(|p| {
                    owner_uid(p) == Some(target_uid.as_str())
                        && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-3")
                });
                let source_gone = !hps
                    .iter()
                    .any(|p| owner_uid(p) == Some(source_uid.as_str()));
                Ok((on_target && source_gone).then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}

async fn vmi_uid(client: &kube::Client, name: &str) -> Result<Option<String>> {
    Ok(
        Api::<VirtualMachineInstance>::namespaced(client.clone(), "default")
            .get_opt(name)
            .await?
            .and_then(|v| v.metadata.uid),
    )
}

async fn gone(client: &kube::Client, name: &str) -> Result<()> {
    let c = client.clone();
    let name = name.to_owned();
    until(&format!("VMI {name} gone"), Duration::from_secs(30), || {
        let (c, name) = (c.clone(), name.clone());
        async move { Ok(vmi_uid(&c, &name).await?.is_none().then_some(())) }
    })
    .await
}

async fn running_elsewhere_than(
    client: &kube::Client,
    name: &str,
    old_uid: &str,
    not_on: &str,
) -> Result<VirtualMachineInstance> {
    let old_uid = old_uid.to_owned();
    let not_on = not_on.to_owned();
    wait_vmi(
        client,
        name,
        "a new VMI running",
        Duration::from_secs(30),
        move |v| {
            v.metadata.uid.as_deref() != Some(old_uid.as_str())
                && v.phase() == "Running"
                && v.node_name() != Some(not_on.as_str())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_follow_their_run_strategy() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let b = bed(
        3,
        KubeVirtOptions {
            shutdown_duration: Duration::from_millis(500),
            ..KubeVirtOptions::default()
        },
    )
    .await?;
    // live-1: Always, none-1: RerunOnFailure (both start on node-1), live-2: Manual on node-2
    // (not started), none-2: a bare VMI on node-3.
    let started = b
        .kubevirt
        .create_vmis(
            "default",
            "node-1",
            &"live=1/vm=Always,none=1/vm=RerunOnFailure,node-2:live=1/vm=Manual,node-3:none=1"
                .parse()?,
        )
        .await?;
    let names: Vec<(&str, Option<&str>)> = started
        .iter()
        .map(|v| {
            (
                v.metadata.name.as_deref().unwrap_or_default(),
                v.node_name(),
            )
        })
        .collect();
    ensure!(
        names
            == [
                ("live-1", Some("node-1")),
                ("none-1", Some("node-1")),
                ("none-2", Some("node-3"))
            ],
        "{names:?}"
    );
    ensure!(
        vmi_uid(&b.client, "live-2").await?.is_none(),
        "Manual VM started by itself"
    );
    let vms = Api::<VirtualMachine>::namespaced(b.client.clone(), "default");
    let owner = started[0]
        .metadata
        .owner_references
        .as_ref()
        .context("no owner")?;
    ensure!(owner[0].kind == "VirtualMachine" && owner[0].name == "live-1");

    // node-1 is drained: a stopped VMI of an Always VM comes back elsewhere.
    Api::<Node>::all(b.client.clone())
        .patch(
            "node-1",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"unschedulable": true}})),
        )
        .await?;
    let pods = Api::<Pod>::namespaced(b.client.clone(), "default");
    let always_uid = started[0].metadata.uid.clone().unwrap_or_default();
    let pod = launcher_of(&b.client, "live-1").await?;
    pods.delete(
        pod.metadata.name.as_deref().unwrap_or_default(),
        &DeleteParams::default(),
    )
    .await?;
    let back = running_elsewhere_than(&b.client, "live-1", &always_uid, "node-1").await?;
    println!("live-1 came back on {:?}", back.node_name());

    // RerunOnFailure: a VMI that shut down cleanly stays down, until started.
    let rerun_uid = started[1].metadata.uid.clone().unwrap_or_default();
    let pod = launcher_of(&b.client, "none-1").await?;
    pods.delete(
        pod.metadata.name.as_deref().unwrap_or_default(),
        &DeleteParams::default(),
    )
    .await?;
    gone(&b.client, "none-1").await?;
    let stopped = until(
        "none-1's VM to say Stopped",
        Duration::from_secs(30),
        || {
            let vms = vms.clone();
            async move {
                let vm = vms.get("none-1").await?;
                let s = vm.status.clone().unwrap_or_default();
                Ok((s.printable_status.as_deref() == Some("Stopped") && !s.created).then_some(vm))
            }
        },
    )
    .await?;
    ensure!(stopped.spec.run_strategy.as_deref() == Some("RerunOnFailure"));
    let (code, body) = b
        .kubevirt
        .subresource("default", "virtualmachines", "none-1", "start", None)
        .await?;
    ensure!(code == 202, "start answered {code}: {body}");
    running_elsewhere_than(&b.client, "none-1", &rerun_uid, "node-1").await?;

    // Always: stop switches the VM to Halted and the VMI goes; start brings it back.
    let (code, body) = b
        .kubevirt
        .subresource("default", "virtualmachines", "live-1", "stop", None)
        .await?;
    ensure!(code == 202, "stop answered {code}: {body}");
    gone(&b.client, "live-1").await?;
    ensure!(vms.get("live-1").await?.spec.run_strategy.as_deref() == Some("Halted"));
    let (code, _) = b
        .kubevirt
        .subresource("default", "virtualmachines", "live-1", "start", None)
        .await?;
    ensure!(code == 202, "start answered {code}");
    let again = running_elsewhere_than(
        &b.client,
        "live-1",
        back.metadata.uid.as_deref().unwrap_or_default(),
        "node-1",
    )
    .await?;
    ensure!(vms.get("live-1").await?.spec.run_strategy.as_deref() == Some("Always"));
    let (code, body) = b
        .kubevirt
        .subresource("default", "virtualmachines", "live-1", "start", None)
        .await?;
    ensure!(
        code == 409 && body.contains("VM is already running"),
        "{code}: {body}"
    );

    // Manual: started on request (on its node, node-2), restarted with a new VMI, stopped.
    let (code, _) = b
        .kubevirt
        .subresource("default", "virtualmachines", "live-2", "start", None)
        .await?;
    ensure!(code == 202, "start answered {code}");
    let manual = wait_vmi(
        &b.client,
        "live-2",
        "running",
        Duration::from_secs(30),
        |v| v.phase() == "Running",
    )
    .await?;
    ensure!(
        manual.node_name() == Some("node-2"),
        "{:?}",
        manual.node_name()
    );
    let (code, _) = b
        .kubevirt
        .subresource("default", "virtualmachines", "live-2", "restart", None)
        .await?;
    ensure!(code == 202, "restart answered {code}");
    running_elsewhere_than(
        &b.client,
        "live-2",
        manual.metadata.uid.as_deref().unwrap_or_default(),
        "none",
    )
    .await?;
    let (code, _) = b
        .kubevirt
        .subresource("default", "virtualmachines", "live-2", "stop", None)
        .await?;
    ensure!(code == 202, "stop answered {code}");
    gone(&b.client, "live-2").await?;
    let _ = again;
    Ok(())
}
