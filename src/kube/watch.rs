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

/// How closely the node's watches are followed, which sets how long each watch call lasts and
/// so how many requests an agent costs the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// No drain: nothing waits on these watches, they keep the node's view warm for the next
    /// drain and for `status`. Long calls: each one ends on the server after [`IDLE_TIMEOUT`].
    Idle,
    /// A drain is on and the lock's release waits on them: short calls, so a stalled
    /// connection is noticed within seconds.
    Draining,
}

/// The server ends each drain-pace watch call after this many seconds; kube-runtime then opens
/// the next one from the last resourceVersion (no list). With the calls' read timeout
/// ([`super::READ_TIMEOUT`]) a stalled connection is noticed within 30 s.
pub const WATCH_TIMEOUT: u32 = 20;

/// The longest watch kube-runtime accepts (it must end before kube's 295 s client cap). Idle,
/// the API server's bookmarks (about one a minute on a watch with `allowWatchBookmarks`, which
/// kube-runtime asks for) keep the connection from looking dead to
/// [`super::IDLE_READ_TIMEOUT`]: two watches reopened every 290 s cost ~25 requests an hour.
pub const IDLE_TIMEOUT: u32 = 290;

impl Pace {
    pub fn timeout(self) -> u32 {
        match self {
            Pace::Idle => IDLE_TIMEOUT,
            Pace::Draining => WATCH_TIMEOUT,
        }
    }
}

pub fn vmis(
    client: Client,
    node: &str,
    pace: Pace,
) -> impl Stream<Item = WatchUpdate<VmiInfo>> + Send {
    let api: Api<DynamicObject> = Api::all_with(client, &super::vmi_resource());
    let cfg = watcher::Config::default()
        .labels(&format!("{VMI_NODE_LABEL}={node}"))
        .timeout(pace.timeout());
    let node = node.to_string();
    watcher(api, cfg).default_backoff().filter_map(move |ev| {
        let r = reduce("vmis", node.clone(), ev, vmi_info);
        async move { r }
    })
}

pub fn pods(
    client: Client,
    node: &str,
    pace: Pace,
) -> impl Stream<Item = WatchUpdate<PodInfo>> + Send {
    let api: Api<Pod> = Api::all(client);
    let cfg = watcher::Config::default()
        .fields(&format!("spec.nodeName={node}"))
        .timeout(pace.timeout());
    let node = node.to_string();
    watcher(api, cfg).default_backoff().filter_map(move |ev| {
        let r = reduce("pods", node.clone(), ev, pod_info);
        async move { r }
    })
}
