//! A node's pods: one eviction or one graceful delete per call; the state machine decides about
//! retries.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, EvictParams, Preconditions};
use kube::{Api, Client};

use crate::drain::eviction::EvictionOutcome;
use crate::drain::model::PodRef;

/// An answer slower than this is treated like a 5xx: try again.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn uid_precondition(pod: &PodRef) -> Preconditions {
    Preconditions {
        uid: Some(pod.uid.clone()),
        resource_version: None,
    }
}

pub async fn evict(client: Client, pod: &PodRef) -> EvictionOutcome {
    let api: Api<Pod> = Api::namespaced(client, &pod.key.namespace);
    let params = EvictParams {
        delete_options: Some(DeleteParams {
            preconditions: Some(uid_precondition(pod)),
            ..Default::default()
        }),
        ..Default::default()
    };
    match tokio::time::timeout(CALL_TIMEOUT, api.evict(&pod.key.name, &params)).await {
        Err(_) => EvictionOutcome::Retry(format!("no answer within {CALL_TIMEOUT:?}")),
        Ok(Ok(_)) => EvictionOutcome::Evicted,
        // The UID precondition failing means the pod we meant is gone.
        Ok(Err(kube::Error::Api(s))) if s.code == 409 && s.message.contains("UID") => {
            EvictionOutcome::Gone
        }
        Ok(Err(kube::Error::Api(s))) => EvictionOutcome::from_status(s.code, &s.message),
        Ok(Err(e)) => EvictionOutcome::Retry(e.to_string()),
    }
}

/// Deletes a launcher pod with `grace_seconds`, which virt-handler turns into a graceful
/// shutdown of the VM. A pod already gone (or replaced) counts as done.
pub async fn stop(client: Client, pod: &PodRef, grace_seconds: u32) -> Result<(), String> {
    let api: Api<Pod> = Api::namespaced(client, &pod.key.namespace);
    let params = DeleteParams {
        grace_period_seconds: Some(grace_seconds),
        preconditions: Some(uid_precondition(pod)),
        ..Default::default()
    };
    match tokio::time::timeout(CALL_TIMEOUT, api.delete(&pod.key.name, &params)).await {
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(kube::Error::Api(s))) if s.code == 404 || s.code == 409 => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}
