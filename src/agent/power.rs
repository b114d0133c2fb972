//! The agent's side of power events: its shutdown's announcement and the judgement from the
//! other nodes' ([`crate::kube::power`]), the VMs stopped in place, and after the event the
//! restorer that starts them again, one agent at a time, a few VMs at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::admin::metrics::Metrics;
use crate::drain::machine::Input;
use crate::drain::model::ObjKey;
use crate::drain::power::{self, NodeView, PowerRule, RestoreRule, Verdict};
use crate::driver::PowerJudge;
use crate::kube::events::NodeEvents;
use crate::kube::power as api;
use crate::kube::turns::Turns;

/// How often a draining node judges again while no power event is recognised: other nodes'
/// announcements reach it within this.
pub const JUDGE_EVERY: Duration = Duration::from_secs(1);
/// How long a drain keeps judging after its announcement.
pub const JUDGE_FOR: Duration = Duration::from_secs(30);
/// How often a judging drain reads the Nodes again (the announcements are watched).
pub const NODES_EVERY: Duration = Duration::from_secs(10);
/// How often the restorer looks for stopped VMs, and for the cluster to be back.
pub const RESTORE_EVERY: Duration = Duration::from_secs(5);
/// How often the restorer looks while a VM it started has not run yet, for at most
/// [`RESTORE_STARTING_FOR`] after its last start: the next one starts as soon as a slot frees,
/// and a VM that never runs does not keep it asking every second.
pub const RESTORE_STARTING_EVERY: Duration = Duration::from_secs(1);
pub const RESTORE_STARTING_FOR: Duration = Duration::from_secs(60);
/// The restorer's Lease: one agent restores at a time, so the limit holds cluster-wide.
pub const RESTORE_LEASE_PREFIX: &str = "shutdown-guard-restore-";

pub struct LeaseJudge {
    client: Client,
    leases: Api<Lease>,
    node: String,
    rule: PowerRule,
    /// The judging task of the current announcement.
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl LeaseJudge {
    pub fn new(client: Client, leases: Api<Lease>, node: &str, rule: PowerRule) -> Self {
        LeaseJudge {
            client,
            leases,
            node: node.to_owned(),
            rule,
            task: Mutex::new(None),
        }
    }
}

impl PowerJudge for LeaseJudge {
    fn announce(&self, fresh_for: Duration, tx: mpsc::UnboundedSender<Input>) {
        let (client, leases, node, rule) = (
            self.client.clone(),
            self.leases.clone(),
            self.node.clone(),
            self.rule,
        );
        let task = tokio::spawn(async move {
            match api::announce(&leases, &node, fresh_for).await {
                Ok(()) => info!(node = %node, fresh_s = fresh_for.as_secs(), "shutdown announced"),
                Err(e) => {
                    warn!(node = %node, error = %e, "announcing the shutdown failed; the other nodes judge without it")
                }
            }
            let mut last: Option<bool> = None;
            // The nodes of one power event announce themselves within seconds of each other; a
            // node whose shutdown starts later judges for its own VMs (those migrated to it
            // included), so a drain stops looking after a while.
            let end = tokio::time::Instant::now() + fresh_for.min(JUDGE_FOR);
            // The announcements are watched (a new one is judged at once, and nothing is asked
            // while none comes); the Nodes are read every NODES_EVERY: what changes within a
            // power event is announced, and a Node's Ready condition lags by kubelet's grace
            // (40 s) anyway.
            let mut watch = std::pin::pin!(api::announcements(leases.clone()));
            let mut announced: BTreeMap<String, Lease> = BTreeMap::new();
            let mut synced = false;
            let mut nodes: Option<(tokio::time::Instant, Vec<NodeView>)> = None;
            loop {
                if nodes
                    .as_ref()
                    .is_none_or(|(at, _)| at.elapsed() >= NODES_EVERY)
                {
                    match api::nodes(&client).await {
                        Ok(n) => nodes = Some((tokio::time::Instant::now(), n)),
                        Err(e) => {
                            warn!(node = %node, error = %e, "reading the nodes for the power-event check failed")
                        }
                    }
                }
                if let (true, Some((_, n))) = (synced, &nodes) {
                    let down = api::fresh_holders(announced.values());
                    let verdict = power::judge(&node, &api::with_announced(n.clone(), &down), rule);
                    let event = verdict.is_power_event();
                    if last != Some(event) {
                        last = Some(event);
                        if let Verdict::PowerEvent { targets, down } = &verdict {
                            warn!(node = %node, targets = %targets.join(","), down = %down.join(","), "power event: too few nodes stay up to migrate to");
                        }
                        if tx.send(Input::Power(verdict)).is_err() || event {
                            return;
                        }
                    }
                }
                // Woken by a change of the announcements, or to judge again (an announcement
                // going stale, the Nodes due) without one.
                let wake = (tokio::time::Instant::now() + JUDGE_EVERY).min(end);
                tokio::select! {
                    ev = watch.next() => match ev {
                        Some(Ok(ev)) => synced = api::apply_announcement(&mut announced, ev),
                        Some(Err(e)) => warn!(node = %node, error = %e, "watching the shutdown announcements failed; retried"),
                        None => return,
                    },
                    _ = tokio::time::sleep_until(wake) => {}
                }
                if tokio::time::Instant::now() >= end {
                    return;
                }
            }
        });
        let mut slot = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = slot.replace(task.abort_handle()) {
            old.abort();
        }
    }

    fn withdraw(&self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
        let (leases, node) = (self.leases.clone(), self.node.clone());
        tokio::spawn(async move {
            if let Err(e) = api::withdraw(&leases, &node).await {
                warn!(node = %node, error = %e, "withdrawing the shutdown announcement failed; it expires by itself");
            }
        });
    }

    fn stop(
        &self,
        vmi: ObjKey,
        grace_seconds: u32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>> {
        let (client, node) = (self.client.clone(), self.node.clone());
        Box::pin(async move {
            let event = event_name();
            let via = api::stop_vmi(&client, &vmi, &event, &node, grace_seconds).await?;
            info!(node = %node, vmi = %vmi, via = ?via, "stopped in place for the power event");
            Ok(())
        })
    }
}

/// The event's name on the records: this node's stop time, in seconds since the epoch.
fn event_name() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("power-event-{secs}")
}

/// Starts the restorer: at the agent's start and then every [`RESTORE_EVERY`] while VMs carry
/// a record, the agent holding the restore Lease starts them again as [`power::restore`] says;
/// it ends when no record is left.
pub fn spawn_restorer(
    client: Client,
    leases: Api<Lease>,
    node: String,
    rule: RestoreRule,
    events: NodeEvents,
    metrics: Arc<Metrics>,
) {
    tokio::spawn(async move {
        let leases_read = leases.clone();
        let turn = Turns::with_prefix(leases, &node, 1, RESTORE_LEASE_PREFIX);
        let mut started: BTreeSet<ObjKey> = BTreeSet::new();
        let mut held: Option<String> = None;
        // Looked for once at the agent's start (the node is up again after an event) and then
        // only while records are left: an idle agent asks nothing for it.
        let mut first = true;
        let mut last_start: Option<std::time::Instant> = None;
        loop {
            if !std::mem::take(&mut first) {
                let starting = !started.is_empty()
                    && last_start.is_some_and(|t| t.elapsed() < RESTORE_STARTING_FOR);
                let every = if starting {
                    RESTORE_STARTING_EVERY
                } else {
                    RESTORE_EVERY
                };
                tokio::time::sleep(every).await;
            }
            let vms = match api::recorded_vms(&client).await {
                Ok(v) => v,
                Err(e) => {
                    warn!(node = %node, error = %e, "listing the VMs a power event stopped failed");
                    continue;
                }
            };
            if vms.iter().all(|v| v.record.is_none()) {
                if let Some(name) = held.take() {
                    let _ = turn.give_back(&name).await;
                }
                return;
            }
            held = match held.take() {
                Some(name) => match turn.renew(&name).await {
                    Ok(true) => Some(name),
                    _ => None,
                },
                None => turn.try_take().await.ok().flatten(),
            };
            if held.is_none() {
                continue;
            }
            let back = match api::up_nodes(&client, &leases_read).await {
                Ok((up, announced)) => power::cluster_back(&up, announced, &vms, rule),
                Err(e) => {
                    warn!(node = %node, error = %e, "listing the nodes failed");
                    continue;
                }
            };
            let plan = power::restore(&vms, &started, back, rule);
            // Events about a VM go on the VM (`kubectl describe vm`), one per VM.
            let regarding = |key: &ObjKey| {
                let uid = vms.iter().find(|v| &v.key == key).map(|v| v.uid.as_str());
                crate::kube::events::vm_ref(key, uid.unwrap_or_default())
            };
            for (vm, why) in &plan.forget {
                match api::forget(&client, vm).await {
                    Ok(()) => {
                        started.remove(vm);
                        info!(node = %node, vm = %vm, why = why.as_str(), "power-event record dropped");
                        if *why == power::Forget::Changed {
                            metrics.power_event_vms_left_alone.inc();
                            let _ = events
                                .publish_on(&regarding(vm), false, "PowerEventVmLeftAlone", "Restore", format!("{vm} was changed after the power event stopped it; left as it is"))
                                .await;
                        }
                    }
                    Err(e) => {
                        warn!(node = %node, vm = %vm, error = %e, "dropping the power-event record failed")
                    }
                }
            }
            for vm in &plan.start {
                let Some(record) = vms
                    .iter()
                    .find(|v| &v.key == vm)
                    .and_then(|v| v.record.clone())
                else {
                    continue;
                };
                match api::start_vm(&client, vm, &record).await {
                    Ok(()) => {
                        started.insert(vm.clone());
                        last_start = Some(std::time::Instant::now());
                        metrics.power_event_vms_restored.inc();
                        info!(node = %node, vm = %vm, run_strategy = %record.run_strategy, "started again after the power event");
                        let _ = events
                            .publish_on(&regarding(vm), false, "PowerEventVmRestored", "Restore", format!("{vm} started again after the power event that stopped it on {}", record.node))
                            .await;
                    }
                    Err(e) => {
                        warn!(node = %node, vm = %vm, error = %e, "starting the VM again failed; retried")
                    }
                }
            }
        }
    });
}
