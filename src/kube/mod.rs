//! The Kubernetes side, as adapters of the drain's core: the client, reading API objects into
//! the core's model, the Node's cordon, evictions and graceful stops, KubeVirt's resources, the
//! watches, Events and the Node's condition. Nothing here decides; nothing here knows the agent.

pub mod condition;
pub mod cordon;
pub mod events;
pub mod kubevirt;
pub mod objects;
pub mod pods;
pub mod watch;

pub use kubevirt::vmi_resource;

use std::path::Path;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

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

/// A client without kube's built-in retry: it retries 429 for up to minutes, and KubeVirt
/// answers every first eviction of a virt-launcher pod with 429 by design. The drain owns the
/// timing of every retry instead.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let mut cfg = match kubeconfig {
        Some(path) => {
            let err = |source| ClientError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kc = Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None => kube::Config::infer().await?,
    };
    cfg.default_retry = false;
    Ok(Client::try_from(cfg)?)
}
