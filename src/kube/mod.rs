//! The Kubernetes side, as adapters of the drain's core: the client, reading API objects into
//! the core's model, the Node's cordon, evictions and graceful stops, KubeVirt's resources, the
//! watches, Events and the Node's condition. Nothing here decides; nothing here knows the agent.

pub mod condition;
pub mod cordon;
pub mod events;
pub mod kubevirt;
pub mod objects;
pub mod pods;
pub mod power;
pub mod taint;
pub mod turns;
pub mod watch;

pub use kubevirt::vmi_resource;

use std::path::Path;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::coordination::v1::Lease;
use kube::client::ConfigExt;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tower::ServiceBuilder;

/// A connection to the API server is given this long to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that has sent nothing for this long is dead, whatever TCP thinks (a frozen
/// load balancer keeps acknowledging). Above [`watch::WATCH_TIMEOUT`]: a quiet drain-pace watch
/// ends on the server's side first.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The same for the idle watches' client: above the API server's bookmark interval (one
/// minute, plus its ticker's jitter), so a quiet watch is not taken for a dead one. A stall
/// while idle costs nothing but a stale view: a drain opens watches of its own.
pub const IDLE_READ_TIMEOUT: Duration = Duration::from_secs(120);
/// TCP keepalive probes on idle connections, so a peer gone after a VIP failover is noticed.
const KEEPALIVE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("finding the cluster (KUBECONFIG, ~/.kube/config or in-cluster): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("building the client: {0}")]
    Build(#[from] kube::Error),
}

/// Where the client's configuration comes from.
pub enum Source<'a> {
    /// A kubeconfig file, else `KUBECONFIG`, `~/.kube/config` or in-cluster.
    File(Option<&'a Path>),
    /// A kubeconfig's text (the worker gets it from the holder).
    Text(&'a [u8]),
}

pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    client_from(Source::File(kubeconfig)).await
}

/// The agent's two clients, from one configuration.
pub struct Clients {
    /// Every call, and the watches a drain follows.
    pub calls: Client,
    /// The watches that keep the node's view between drains ([`watch::Pace::Idle`]).
    pub idle_watches: Client,
}

pub async fn clients_from(source: Source<'_>) -> Result<Clients, ClientError> {
    let cfg = config_from(source).await?;
    Ok(Clients {
        calls: build(cfg.clone(), READ_TIMEOUT)?,
        idle_watches: build(cfg, IDLE_READ_TIMEOUT)?,
    })
}

/// A client whose every call is bounded (connect timeout, read timeout, TCP keepalive) and
/// without kube's built-in retry: it retries 429 for up to minutes, and KubeVirt answers every
/// first eviction of a virt-launcher pod with 429 by design. The drain owns the timing of every
/// retry instead. `TCP_NODELAY` too: a small request on a fresh connection must not wait for the
/// peer's delayed ACK.
pub async fn client_from(source: Source<'_>) -> Result<Client, ClientError> {
    build(config_from(source).await?, READ_TIMEOUT)
}

async fn config_from(source: Source<'_>) -> Result<Config, ClientError> {
    Ok(match source {
        Source::File(Some(path)) => {
            let err = |source| ClientError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kc = Kubeconfig::read_from(path).map_err(err)?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        Source::File(None) => Config::infer().await?,
        Source::Text(text) => {
            let err = |source| ClientError::Kubeconfig {
                path: "(from the holder)".into(),
                source,
            };
            let kc = Kubeconfig::from_yaml(&String::from_utf8_lossy(text)).map_err(err)?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
    })
}

/// What the agent calls itself to the API server, so audit logs and API priority and fairness
/// can tell its requests from those of other clients with the same identity.
pub const USER_AGENT: &str = concat!("shutdown-guard/", env!("CARGO_PKG_VERSION"));

fn build(mut cfg: Config, read_timeout: Duration) -> Result<Client, ClientError> {
    cfg.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_keepalive(Some(KEEPALIVE));
    http.set_keepalive_interval(Some(Duration::from_secs(3)));
    http.set_keepalive_retries(Some(3));
    let https = cfg.rustls_https_connector_with_connector(http)?;
    let mut timed = hyper_timeout::TimeoutConnector::new(https);
    timed.set_read_timeout(Some(read_timeout));
    timed.set_write_timeout(Some(READ_TIMEOUT));
    // The read timeout counts from each request, not from when a pooled connection went idle.
    timed.set_reset_reader_on_write(true);
    // No idle connections kept for reuse: after an API VIP failover every pooled connection is
    // dead but looks alive, and each request sent on one waits out the read timeout before the
    // next try (measured on the bed: a watch reopened 55 s after the freeze instead of 25 s). A
    // fresh connection per request costs one TLS handshake, a few per minute while idle.
    let hyper = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(timed);
    let service = ServiceBuilder::new()
        .layer(cfg.base_uri_layer())
        .option_layer(cfg.auth_layer()?)
        .layer(cfg.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(hyper);
    Ok(Client::new(service, cfg.default_namespace))
}

/// How long one API call may take before the caller gives up on it (and retries, or reports).
pub(crate) const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// An API call bounded by [`CALL_TIMEOUT`], its error as text.
pub(crate) async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, ::kube::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
    }
}

/// The Leases of the turns and of power events: in `setting` (`lease_namespace`), else in the
/// client's namespace (in a pod, the ServiceAccount's).
pub fn leases(client: &Client, setting: &str) -> Api<Lease> {
    let namespace = match setting {
        "" => client.default_namespace(),
        ns => ns,
    };
    Api::namespaced(client.clone(), namespace)
}
