//! The node's VMIs (by the `kubevirt.io/nodeName` label) and pods (by `spec.nodeName`), as
//! streams of [`WatchUpdate`]s. Watches, not polling: a VMI leaving the node reaches the agent
//! as one event, and the lock is released on that event.

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::DynamicObject;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tracing::warn;

use super::objects::{pod_info, vmi_info};
use crate::drain::machine::WatchUpdate;
use crate::drain::model::{PodInfo, VMI_NODE_LABEL, VmiInfo};

fn reduce<K, T>(
    what: &'static str,
    node: String,
    ev: Result<watcher::Event<K>, watcher::Error>,
    f: impl Fn(&K) -> Option<T>,
) -> Option<WatchUpdate<T>> {
    match ev {
        Ok(watcher::Event::Init) => Some(WatchUpdate::Reset),
        Ok(watcher::Event::InitApply(o)) => f(&o).map(WatchUpdate::Listed),
        Ok(watcher::Event::InitDone) => Some(WatchUpdate::Synced),
        Ok(watcher::Event::Apply(o)) => f(&o).map(WatchUpdate::Applied),
        Ok(watcher::Event::Delete(o)) => f(&o).map(WatchUpdate::Deleted),
        Err(e) => {
            warn!(node = %node, watch = what, error = %e, "watch failed; retrying");
            None
        }
    }
}

/// The server ends each watch call after this many seconds; kube-runtime treats a watch silent
/// for 5 s longer as dead and opens a new one from the last resourceVersion. A stalled
/// connection (a frozen load balancer) is thus noticed within 25 s.
pub const WATCH_TIMEOUT: u32 = 20;

pub fn vmis(client: Client, node: &str) -> impl Stream<Item = WatchUpdate<VmiInfo>> + Send {
    let api: Api<DynamicObject> = Api::all_with(client, &super::vmi_resource());
    let cfg = watcher::Config::default()
        .labels(&format!("{VMI_NODE_LABEL}={node}"))
        .timeout(WATCH_TIMEOUT);
    let node = node.to_string();
    watcher(api, cfg).default_backoff().filter_map(move |ev| {
        let r = reduce("vmis", node.clone(), ev, vmi_info);
        async move { r }
    })
}

pub fn pods(client: Client, node: &str) -> impl Stream<Item = WatchUpdate<PodInfo>> + Send {
    let api: Api<Pod> = Api::all(client);
    let cfg = watcher::Config::default()
        .fields(&format!("spec.nodeName={node}"))
        .timeout(WATCH_TIMEOUT);
    let node = node.to_string();
    watcher(api, cfg).default_backoff().filter_map(move |ev| {
        let r = reduce("pods", node.clone(), ev, pod_info);
        async move { r }
    })
}
