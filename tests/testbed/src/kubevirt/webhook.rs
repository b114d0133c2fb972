//! virt-api's pod-eviction webhook: an HTTPS server on loopback that kube-apiserver calls for
//! every `pods/eviction` of a pod whose name starts with `virt-launcher`, registered the way
//! virt-operator registers it (`pkg/virt-operator/resource/generate/components/webhooks.go`:
//! `virt-launcher-eviction-interceptor.kubevirt.io`, failurePolicy Fail, sideEffects
//! NoneOnDryRun, timeout 10 s, match condition `only-vms`; from v1.7.0 also
//! `hotplug-pod-eviction-interceptor.kubevirt.io` for `hp-volume-*` pods), but reached by `url`
//! with a `caBundle` since there is no Service network in the bed.
//!
//! It listens on a port of its own so a test can take it down (connection refused) or slow it
//! ([`WebhookFault`]) without touching the rest of virt-api.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{EvictParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use super::admitter::{self, Admission};
use super::crds::VirtualMachineInstance;
use super::version::KubeVirtVersion;
use super::{KubeVirtError, api_err};
use crate::pki::{Ca, KeyPairPem};

/// Name of the ValidatingWebhookConfiguration, as virt-operator names it.
pub const CONFIGURATION_NAME: &str = "virt-api-validator";
pub const WEBHOOK_NAME: &str = "virt-launcher-eviction-interceptor.kubevirt.io";
pub const HOTPLUG_WEBHOOK_NAME: &str = "hotplug-pod-eviction-interceptor.kubevirt.io";

/// A fault of the eviction webhook, as when virt-api is down or overloaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WebhookFault {
    #[default]
    None,
    /// Nothing listens on the webhook's port: kube-apiserver's calls are refused, and with
    /// failurePolicy Fail every eviction of a virt-launcher pod fails (HTTP 500).
    Down,
    /// Every answer comes this late; past the webhook's 10 s timeout kube-apiserver gives up
    /// and the eviction fails.
    Slow(Duration),
}
/// virt-api's path (`components.PodEvictionValidatePath`).
pub const PATH: &str = "/pod-eviction-validate";

/// Serving certificate for the webhook and the CA bundle kube-apiserver verifies it with.
#[derive(Clone, Debug)]
pub struct WebhookTls {
    /// Must be valid for IP 127.0.0.1.
    pub serving: KeyPairPem,
    pub ca_bundle_pem: String,
}

impl WebhookTls {
    /// A fresh CA and a certificate for 127.0.0.1 signed by it.
    pub fn generate() -> Result<Self, KubeVirtError> {
        let ca = Ca::new("testbed-virt-api-ca").map_err(|e| KubeVirtError::Tls(e.to_string()))?;
        Self::issued_by(&ca)
    }

    /// A certificate for 127.0.0.1 from the bed's CA.
    pub fn issued_by(ca: &Ca) -> Result<Self, KubeVirtError> {
        let serving = ca
            .issue_server(
                &["virt-api.kubevirt.svc"],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            )
            .map_err(|e| KubeVirtError::Tls(e.to_string()))?;
        Ok(Self {
            serving,
            ca_bundle_pem: ca.cert_pem().to_owned(),
        })
    }
}

pub(crate) struct Webhook {
    pub port: u16,
    pub requests: Arc<AtomicU64>,
    pub task: JoinHandle<()>,
}

struct State {
    client: Client,
    cluster: Arc<dyn Fn() -> super::config::ClusterConfig + Send + Sync>,
    version: KubeVirtVersion,
    requests: Arc<AtomicU64>,
    fault: watch::Receiver<WebhookFault>,
}

pub(crate) fn server_config(tls: &WebhookTls) -> Result<rustls::ServerConfig, KubeVirtError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls_err = |e: &dyn std::fmt::Display| KubeVirtError::Tls(e.to_string());
    let certs = CertificateDer::pem_slice_iter(tls.serving.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(&e))?;
    let key =
        PrivateKeyDer::from_pem_slice(tls.serving.key_pem.as_bytes()).map_err(|e| tls_err(&e))?;
    // Pick the provider explicitly: more than one may be compiled in through other crates.
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls_err(&e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| tls_err(&e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Starts serving on a free loopback port; `fault` takes it down or slows it.
pub(crate) async fn serve(
    client: Client,
    tls: &WebhookTls,
    cluster: Arc<dyn Fn() -> super::config::ClusterConfig + Send + Sync>,
    version: KubeVirtVersion,
    fault: watch::Receiver<WebhookFault>,
) -> Result<Webhook, KubeVirtError> {
    let acceptor = TlsAcceptor::from(Arc::new(server_config(tls)?));
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .map_err(KubeVirtError::Io)?;
    let port = listener.local_addr().map_err(KubeVirtError::Io)?.port();
    let requests = Arc::new(AtomicU64::new(0));
    let state = Arc::new(State {
        client,
        cluster,
        version,
        requests: requests.clone(),
        fault: fault.clone(),
    });
    let task = tokio::spawn(listen(listener, port, acceptor, state, fault));
    Ok(Webhook {
        port,
        requests,
        task,
    })
}

/// Accepts until the webhook is taken down, then binds the same port again once it is back.
async fn listen(
    first: TcpListener,
    port: u16,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    mut fault: watch::Receiver<WebhookFault>,
) {
    let mut listener = Some(first);
    loop {
        let Some(l) = listener.take() else {
            // Down: wait until it is wanted again, then listen on the same port.
            while *fault.borrow_and_update() == WebhookFault::Down {
                if fault.changed().await.is_err() {
                    return;
                }
            }
            match TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    tracing::warn!(port, error = %e, "eviction webhook cannot listen again; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            continue;
        };
        // Dropping the set closes every connection, so a downed or stopped webhook stops
        // answering even on the API server's kept-alive connections.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            tokio::select! {
                accepted = l.accept() => {
                    let Ok((tcp, _)) = accepted else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let acceptor = acceptor.clone();
                    let state = state.clone();
                    connections.spawn(async move {
                        let Ok(stream) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = service_fn(move |req| handle(state.clone(), req));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                changed = fault.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if *fault.borrow_and_update() == WebhookFault::Down {
                        tracing::info!(port, "eviction webhook down");
                        break;
                    }
                }
            }
        }
        drop(l);
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let slow = match *state.fault.borrow() {
        WebhookFault::Slow(d) => Some(d),
        _ => None,
    };
    if let Some(delay) = slow {
        tokio::time::sleep(delay).await;
    }
    let reply = |code: StatusCode, body: Vec<u8>| {
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    if req.uri().path() != PATH {
        return Ok(reply(StatusCode::NOT_FOUND, b"{}".to_vec()));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(reply(StatusCode::BAD_REQUEST, b"{}".to_vec())),
    };
    let Ok(review) = serde_json::from_slice::<Value>(&body) else {
        return Ok(reply(StatusCode::BAD_REQUEST, b"{}".to_vec()));
    };
    let request = &review["request"];
    let admission = admit(&state, request).await;
    let mut response = json!({"uid": request["uid"], "allowed": true});
    if let Admission::Deny(message) = &admission {
        tracing::info!(pod = %request["name"], message, "eviction denied");
        response["allowed"] = json!(false);
        response["status"] = json!({"code": 429, "message": message});
    }
    let out = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response});
    Ok(reply(
        StatusCode::OK,
        serde_json::to_vec(&out).expect("json"),
    ))
}

fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

/// The admitter's flow around the pure decision (`Admit`/`admitLauncherPod` upstream).
/// Returns only `Allow` or `Deny`.
async fn admit(state: &State, request: &Value) -> Admission {
    let namespace = request["namespace"].as_str().unwrap_or("default");
    let name = request["name"].as_str().unwrap_or_default();
    let pods = Api::<Pod>::namespaced(state.client.clone(), namespace);
    let Ok(pod) = pods.get(name).await else {
        return Admission::Allow;
    };
    if state.version.hotplug_eviction_webhook() && super::hotplug::is_attachment_pod(&pod) {
        return admit_hotplug_pod(state, namespace, &pod).await;
    }
    let Some(vmi_name) = admitter::launcher_vmi_name(&pod) else {
        return Admission::Allow;
    };
    let vmis = Api::<VirtualMachineInstance>::namespaced(state.client.clone(), namespace);
    let vmi = match vmis.get(vmi_name).await {
        Ok(vmi) => vmi,
        Err(e) => return Admission::Deny(admitter::vmi_lookup_failed_message(&describe(&e))),
    };
    let pod_node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or_default();
    match admitter::decide(pod_node, &vmi, (state.cluster)().eviction_strategy) {
        Admission::MarkAndDeny { node, message } => {
            // Upstream sends a JSON patch `add /status/evacuationNodeName` to the VMI itself
            // (no status subresource); a merge patch has the same effect.
            let params = PatchParams {
                dry_run: admitter::is_dry_run(request),
                ..PatchParams::default()
            };
            let patch = json!({"status": {"evacuationNodeName": node}});
            match vmis.patch(vmi_name, &params, &Patch::Merge(patch)).await {
                Ok(_) => Admission::Deny(message),
                Err(e) => Admission::Deny(admitter::mark_failed_message(&describe(&e))),
            }
        }
        other => other,
    }
}

/// `admitHotplugPod` (v1.7+): an attachment pod may not be evicted while its launcher pod
/// runs and the VMI it names exists.
async fn admit_hotplug_pod(state: &State, namespace: &str, pod: &Pod) -> Admission {
    let Some((owner, _)) = super::hotplug::owner_pod(pod) else {
        return Admission::Allow;
    };
    let pods = Api::<Pod>::namespaced(state.client.clone(), namespace);
    let owner = match pods.get(owner).await {
        Ok(p) => p,
        Err(kube::Error::Api(s)) if s.code == 404 => return Admission::Allow,
        Err(e) => {
            return Admission::Deny(format!(
                "failed getting owner for hotplug pod: {}",
                describe(&e)
            ));
        }
    };
    let Some(vmi_name) = admitter::launcher_vmi_name(&owner) else {
        return Admission::Allow;
    };
    let vmis = Api::<VirtualMachineInstance>::namespaced(state.client.clone(), namespace);
    match vmis.get(vmi_name).await {
        Ok(_) => Admission::Deny(admitter::hotplug_denied_message(
            pod.metadata.name.as_deref().unwrap_or_default(),
            vmi_name,
            namespace,
        )),
        Err(kube::Error::Api(s)) if s.code == 404 => Admission::Allow,
        Err(e) => Admission::Deny(admitter::vmi_lookup_failed_message(&describe(&e))),
    }
}

/// Registers the webhook at `https://127.0.0.1:<port>/pod-eviction-validate`.
pub(crate) async fn register(
    client: &Client,
    port: u16,
    ca_bundle_pem: &str,
    version: KubeVirtVersion,
) -> Result<(), KubeVirtError> {
    let hook = |name: &str, condition: serde_json::Value| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "sideEffects": "NoneOnDryRun",
            "rules": [{"operations": ["*"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods/eviction"]}],
            "clientConfig": {"url": format!("https://127.0.0.1:{port}{PATH}"), "caBundle": ByteString(ca_bundle_pem.as_bytes().to_vec())},
            "matchConditions": [condition],
        })
    };
    let mut webhooks = vec![hook(
        WEBHOOK_NAME,
        json!({"name": "only-vms", "expression": "object.metadata.name.startsWith(\"virt-launcher\")"}),
    )];
    if version.hotplug_eviction_webhook() {
        webhooks.push(hook(
            HOTPLUG_WEBHOOK_NAME,
            json!({"name": "only-hotplug-pods", "expression": "object.metadata.name.startsWith(\"hp-volume-\")"}),
        ));
    }
    let config = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": CONFIGURATION_NAME, "labels": {"app.kubernetes.io/component": "kubevirt"}},
        "webhooks": webhooks,
    });
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .patch(
            CONFIGURATION_NAME,
            &PatchParams::apply("testbed-kubevirt").force(),
            &Patch::Apply(&config),
        )
        .await
        .map_err(api_err("registering the eviction webhook"))?;
    Ok(())
}

/// kube-apiserver picks up webhook configurations from an informer; until it has, evictions
/// bypass the webhook. Probe with dry-run evictions of a pod that does not exist until the
/// server has seen a request (the admitter allows those, and the API then answers 404).
pub(crate) async fn wait_effective(
    client: &Client,
    requests: &AtomicU64,
) -> Result<(), KubeVirtError> {
    let pods = Api::<Pod>::namespaced(client.clone(), "default");
    let before = requests.load(Ordering::SeqCst);
    let params = EvictParams {
        delete_options: None,
        post_options: kube::api::PostParams {
            dry_run: true,
            field_manager: None,
        },
    };
    for _ in 0..150 {
        let _ = pods
            .evict("virt-launcher-testbed-webhook-probe", &params)
            .await;
        if requests.load(Ordering::SeqCst) > before {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(KubeVirtError::Timeout(
        "kube-apiserver to call the eviction webhook".into(),
    ))
}
