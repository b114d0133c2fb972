//! The rest of virt-api: its mutating webhooks and its aggregated API.
//!
//! - Mutators (`pkg/virt-api/webhooks/mutating-webhook/mutators/`): on creation every VMI gets
//!   the finalizer `kubevirt.io/foregroundDeleteVirtualMachine` (`vmi-mutator.go`) and every
//!   migration the label `kubevirt.io/vmi-name` and the finalizer
//!   `kubevirt.io/migrationJobFinalizer` (`migration-create-mutator.go`).
//! - `subresources.kubevirt.io/v1`, served behind an APIService as upstream serves it
//!   (`pkg/virt-api/api.go`): `virtualmachines/{start,stop,restart}`
//!   (`pkg/virt-api/rest/lifecycle.go`) and, from v1.7.0, `evacuate/cancel` on
//!   virtualmachineinstances and virtualmachines (`pkg/virt-api/rest/evacuate_cancel.go`);
//!   older releases answer 404 there.
//!
//! The APIService points at a Service of type ExternalName whose name resolves to loopback:
//! kube-apiserver's aggregator resolves ExternalName services to `externalName:port` (without
//! `--enable-aggregator-routing`) and checks the serving certificate against
//! `virt-api.kubevirt.svc`, which the bed's certificate carries. The mutators are reached by
//! `url`, like the eviction webhook.

// Handlers return the finished error response as their `Err`, as virt-api's handlers write it
// and return; boxing each would only add noise.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::config::{self, ClusterConfig};
use super::crds::{StateChangeRequest, VirtualMachine, VirtualMachineInstance};
use super::evacuation::VMI_NAME_LABEL;
use super::lifecycle::VMI_FINALIZER;
use super::migration::FINALIZER as MIGRATION_FINALIZER;
use super::spec::RunStrategy;
use super::version::KubeVirtVersion;
use super::webhook::{WebhookTls, server_config};
use super::{KubeVirtError, api_err};

pub const GROUP: &str = "subresources.kubevirt.io";
pub const APISERVICE_NAME: &str = "v1.subresources.kubevirt.io";
pub const SERVICE_NAME: &str = "virt-api";
pub const MUTATOR_NAME: &str = "virt-api-mutator";
const MUTATE_VMI_PATH: &str = "/virtualmachineinstances-mutate";
const MUTATE_MIGRATION_PATH: &str = "/migration-mutate-create";

pub(crate) struct VirtApi {
    pub port: u16,
    pub task: JoinHandle<()>,
}

struct State {
    client: Client,
    version: KubeVirtVersion,
    cluster: Arc<dyn Fn() -> ClusterConfig + Send + Sync>,
}

pub(crate) async fn serve(
    client: Client,
    tls: &WebhookTls,
    version: KubeVirtVersion,
    cluster: Arc<dyn Fn() -> ClusterConfig + Send + Sync>,
) -> Result<VirtApi, KubeVirtError> {
    let mut config = server_config(tls)?;
    // The aggregator proxies over HTTP/1.1 or h2; one is enough here.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .map_err(KubeVirtError::Io)?;
    let port = listener.local_addr().map_err(KubeVirtError::Io)?.port();
    let state = Arc::new(State {
        client,
        version,
        cluster,
    });
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            let Ok((tcp, _)) = listener.accept().await else {
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
    });
    Ok(VirtApi { port, task })
}

type Reply = Response<Full<Bytes>>;

fn reply(code: StatusCode, body: &Value) -> Reply {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).expect("json"),
        )))
        .expect("static response parts")
}

/// A `metav1.Status` failure, as virt-api's `writeError` sends it.
fn status(code: u16, reason: &str, message: &str) -> Reply {
    reply(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

fn conflict(kind: &str, name: &str, why: &str) -> Reply {
    status(
        409,
        "Conflict",
        &format!("Operation cannot be fulfilled on {kind}.kubevirt.io \"{name}\": {why}"),
    )
}

fn not_found(kind: &str, name: &str) -> Reply {
    status(
        404,
        "NotFound",
        &format!("{kind}.kubevirt.io \"{name}\" not found"),
    )
}

fn internal(message: &str) -> Reply {
    status(
        500,
        "InternalError",
        &format!("Internal error occurred: {message}"),
    )
}

fn accepted() -> Reply {
    Response::builder()
        .status(StatusCode::ACCEPTED)
        .body(Full::new(Bytes::new()))
        .expect("static response parts")
}

fn ok() -> Reply {
    Response::builder()
        .status(StatusCode::OK)
        .body(Full::new(Bytes::new()))
        .expect("static response parts")
}

/// What a path under `/apis/subresources.kubevirt.io/v1` asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Discovery,
    Vm {
        namespace: &'a str,
        name: &'a str,
        action: &'a str,
    },
    Vmi {
        namespace: &'a str,
        name: &'a str,
        action: &'a str,
    },
    Other,
}

pub fn route(path: &str) -> Route<'_> {
    let Some(rest) = path.strip_prefix("/apis/subresources.kubevirt.io/v1") else {
        return Route::Other;
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Route::Discovery;
    }
    let parts: Vec<&str> = rest.trim_start_matches('/').splitn(5, '/').collect();
    match parts.as_slice() {
        ["namespaces", namespace, "virtualmachines", name, action] => Route::Vm {
            namespace,
            name,
            action,
        },
        [
            "namespaces",
            namespace,
            "virtualmachineinstances",
            name,
            action,
        ] => Route::Vmi {
            namespace,
            name,
            action,
        },
        _ => Route::Other,
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Reply, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(status(400, "BadRequest", "unreadable body")),
    };
    let answer = match (method.clone(), path.as_str()) {
        (Method::POST, MUTATE_VMI_PATH) => mutate(&body, Mutation::Vmi),
        (Method::POST, MUTATE_MIGRATION_PATH) => mutate(&body, Mutation::Migration),
        (Method::GET, "/healthz") => ok(),
        _ => match (method, route(&path)) {
            (Method::GET, Route::Discovery) => reply(StatusCode::OK, &discovery(state.version)),
            (
                Method::PUT,
                Route::Vm {
                    namespace,
                    name,
                    action,
                },
            ) => match action {
                "start" => start(&state, namespace, name).await,
                "stop" => stop(&state, namespace, name, &body).await,
                "restart" => restart(&state, namespace, name).await,
                "evacuate/cancel" if state.version.evacuate_cancel() => {
                    evacuate_cancel(&state, namespace, name, true, &body).await
                }
                _ => status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            },
            (
                Method::PUT,
                Route::Vmi {
                    namespace,
                    name,
                    action: "evacuate/cancel",
                },
            ) if state.version.evacuate_cancel() => {
                evacuate_cancel(&state, namespace, name, false, &body).await
            }
            _ => status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        },
    };
    Ok(answer)
}

/// The group-version's resource list (`subws.GET("/")` in `pkg/virt-api/api.go`), with the
/// subresources the bed serves.
fn discovery(version: KubeVirtVersion) -> Value {
    let mut names = vec![
        "virtualmachines/start",
        "virtualmachines/stop",
        "virtualmachines/restart",
    ];
    if version.evacuate_cancel() {
        names.push("virtualmachines/evacuate/cancel");
        names.push("virtualmachineinstances/evacuate/cancel");
    }
    let resources: Vec<Value> = names
        .into_iter()
        .map(
            |n| json!({"name": n, "singularName": "", "namespaced": true, "kind": "", "verbs": []}),
        )
        .collect();
    json!({"kind": "APIResourceList", "apiVersion": "v1",
           "groupVersion": format!("{GROUP}/v1"), "resources": resources})
}

enum Mutation {
    Vmi,
    Migration,
}

/// A JSONPatch adding `value` under `path` (a map or list the object may lack).
fn add_to(ops: &mut Vec<Value>, exists: bool, path: &str, key: Option<&str>, value: Value) {
    match (exists, key) {
        (true, Some(k)) => ops.push(json!({"op": "add", "path": format!("{path}/{}", k.replace('~', "~0").replace('/', "~1")), "value": value})),
        (true, None) => ops.push(json!({"op": "add", "path": format!("{path}/-"), "value": value})),
        (false, Some(k)) => ops.push(json!({"op": "add", "path": path, "value": {k: value}})),
        (false, None) => ops.push(json!({"op": "add", "path": path, "value": [value]})),
    }
}

/// The JSON patch a mutator answers for `object`.
fn mutation_ops(object: &Value, what: &Mutation) -> Vec<Value> {
    let meta = &object["metadata"];
    let has_finalizers = meta["finalizers"].is_array();
    let mut ops = Vec::new();
    match what {
        Mutation::Vmi => {
            add_to(
                &mut ops,
                has_finalizers,
                "/metadata/finalizers",
                None,
                json!(VMI_FINALIZER),
            );
        }
        Mutation::Migration => {
            let vmi = object["spec"]["vmiName"].clone();
            add_to(
                &mut ops,
                meta["labels"].is_object(),
                "/metadata/labels",
                Some(VMI_NAME_LABEL),
                vmi,
            );
            add_to(
                &mut ops,
                has_finalizers,
                "/metadata/finalizers",
                None,
                json!(MIGRATION_FINALIZER),
            );
        }
    }
    ops
}

fn mutate(body: &[u8], what: Mutation) -> Reply {
    let Ok(review) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "not an AdmissionReview");
    };
    let request = &review["request"];
    let ops = mutation_ops(&request["object"], &what);
    let patch =
        base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&ops).expect("json"));
    reply(
        StatusCode::OK,
        &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "response": {"uid": request["uid"], "allowed": true,
                             "patchType": "JSONPatch", "patch": patch}}),
    )
}

fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

async fn fetch_vm(state: &State, ns: &str, name: &str) -> Result<VirtualMachine, Reply> {
    match Api::<VirtualMachine>::namespaced(state.client.clone(), ns)
        .get(name)
        .await
    {
        Ok(vm) => Ok(vm),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(not_found("virtualmachines", name)),
        Err(e) => Err(internal(&describe(&e))),
    }
}

async fn fetch_vmi(
    state: &State,
    ns: &str,
    name: &str,
) -> Result<Option<VirtualMachineInstance>, Reply> {
    match Api::<VirtualMachineInstance>::namespaced(state.client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(v) => Ok(v),
        Err(e) => Err(internal(&describe(&e))),
    }
}

/// `getChangeRequestJson`: the new requests, refused while others are pending unless this is
/// a single stop, which replaces them.
pub fn change_requests(
    pending: &[StateChangeRequest],
    changes: Vec<StateChangeRequest>,
) -> Result<Vec<StateChangeRequest>, String> {
    let lone_stop = changes.len() == 1 && changes[0].action == "Stop";
    if !pending.is_empty() && !lone_stop {
        return Err("unable to complete request: stop/start already underway".into());
    }
    Ok(changes)
}

fn request(action: &str, uid: Option<&str>) -> StateChangeRequest {
    StateChangeRequest {
        action: action.into(),
        data: None,
        uid: uid.map(str::to_owned),
    }
}

async fn patch_requests(
    state: &State,
    vm: &VirtualMachine,
    changes: Vec<StateChangeRequest>,
) -> Reply {
    let ns = vm.metadata.namespace.as_deref().unwrap_or_default();
    let name = vm.metadata.name.as_deref().unwrap_or_default();
    let api = Api::<VirtualMachine>::namespaced(state.client.clone(), ns);
    let mut vm = vm.clone();
    // Upstream guards the update with a JSON-patch `test` of the old list: it fails only if the
    // requests changed meanwhile. A resource version also moves with unrelated status updates,
    // so a conflict here is retried against the fresh object.
    for _ in 0..5 {
        let pending = vm
            .status
            .as_ref()
            .map(|s| s.state_change_requests.clone())
            .unwrap_or_default();
        let requests = match change_requests(&pending, changes.clone()) {
            Ok(r) => r,
            Err(why) => return internal(&why),
        };
        let patch = json!({"metadata": {"resourceVersion": vm.metadata.resource_version},
                           "status": {"stateChangeRequests": requests}});
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => return accepted(),
            Err(kube::Error::Api(s)) if s.code == 409 => match api.get(name).await {
                Ok(fresh)
                    if fresh.status.as_ref().map(|s| &s.state_change_requests)
                        == vm.status.as_ref().map(|s| &s.state_change_requests) =>
                {
                    vm = fresh;
                }
                Ok(_) => return conflict("virtualmachine", name, &s.message),
                Err(e) => return internal(&describe(&e)),
            },
            Err(e) => return internal(&describe(&e)),
        }
    }
    conflict("virtualmachine", name, "the VM kept changing")
}

async fn set_run_strategy(state: &State, vm: &VirtualMachine, strategy: RunStrategy) -> Reply {
    let api = Api::<VirtualMachine>::namespaced(
        state.client.clone(),
        vm.metadata.namespace.as_deref().unwrap_or_default(),
    );
    let patch = json!({"spec": {"runStrategy": strategy.as_str()}});
    match api
        .patch(
            vm.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        Ok(_) => accepted(),
        Err(e) => internal(&describe(&e)),
    }
}

fn strategy_of(vm: &VirtualMachine) -> Result<RunStrategy, Reply> {
    super::vm::run_strategy(vm).ok_or_else(|| {
        internal(&format!(
            "unknown runStrategy {:?}",
            vm.spec.run_strategy.as_deref().unwrap_or_default()
        ))
    })
}

/// `StartVMRequestHandler`.
async fn start(state: &State, ns: &str, name: &str) -> Reply {
    let vm = match fetch_vm(state, ns, name).await {
        Ok(vm) => vm,
        Err(r) => return r,
    };
    let vmi = match fetch_vmi(state, ns, name).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if vmi
        .as_ref()
        .is_some_and(|v| !v.is_final() && !matches!(v.phase(), "" | "Unknown"))
    {
        return conflict("virtualmachine", name, "VM is already running");
    }
    let strategy = match strategy_of(&vm) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match strategy {
        RunStrategy::Halted => set_run_strategy(state, &vm, RunStrategy::Always).await,
        RunStrategy::RerunOnFailure | RunStrategy::Manual => {
            let phase = vmi.as_ref().map(|v| v.phase().to_owned());
            if strategy == RunStrategy::RerunOnFailure && phase.as_deref() == Some("Failed") {
                return conflict(
                    "virtualmachine",
                    name,
                    "RerunOnFailure does not support starting VM from failed state",
                );
            }
            let restart = match &vmi {
                Some(v) if strategy == RunStrategy::RerunOnFailure => v.phase() == "Succeeded",
                Some(v) => v.is_final(),
                None => false,
            };
            let changes = if restart {
                vec![
                    request("Stop", vmi.as_ref().and_then(|v| v.metadata.uid.as_deref())),
                    request("Start", None),
                ]
            } else {
                vec![request("Start", None)]
            };
            patch_requests(state, &vm, changes).await
        }
        RunStrategy::Always => conflict(
            "virtualmachine",
            name,
            "Always does not support manual start requests",
        ),
    }
}

/// `StopVMRequestHandler` (KubeVirt v1.7 `pkg/virt-api/rest/lifecycle.go`): a `gracePeriod` in
/// the body first replaces the running VMI's `terminationGracePeriodSeconds`, whatever the run
/// strategy; `Halted` then accepts only a stop with a
/// shorter grace period than the VMI had.
async fn stop(state: &State, ns: &str, name: &str, body: &[u8]) -> Reply {
    let grace = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(options) => options.get("gracePeriod").and_then(Value::as_i64),
            Err(e) => {
                return status(
                    400,
                    "BadRequest",
                    &format!("Can not unmarshal Request body to struct, error: {e}"),
                );
            }
        }
    };
    let vm = match fetch_vm(state, ns, name).await {
        Ok(vm) => vm,
        Err(r) => return r,
    };
    let vmi = match fetch_vmi(state, ns, name).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let running = vmi.as_ref().filter(|v| !v.is_final());
    let old_grace = match (running, grace) {
        (Some(v), Some(g)) => match patch_vmi_grace(state, v, g).await {
            Ok(old) => Some(old),
            Err(r) => return r,
        },
        _ => None,
    };
    match strategy_of(&vm) {
        Err(r) => r,
        Ok(RunStrategy::Halted) => {
            let Some(vmi) = running else {
                return conflict("virtualmachine", name, "VM is not running");
            };
            // Upstream compares with the value it replaced (0 when the VMI had none).
            let shorter = match (grace, old_grace) {
                (Some(g), Some(old)) => {
                    vmi.spec.termination_grace_period_seconds.is_none() || g < old
                }
                _ => false,
            };
            if !shorter {
                return conflict(
                    "virtualmachine",
                    name,
                    "Halted only supports manual stop requests with a shorter graceperiod",
                );
            }
            let uid = vmi.metadata.uid.clone();
            patch_requests(state, &vm, vec![request("Stop", uid.as_deref())]).await
        }
        Ok(RunStrategy::RerunOnFailure | RunStrategy::Manual) => {
            let Some(vmi) = running else {
                return conflict("virtualmachine", name, "VM is not running");
            };
            let uid = vmi.metadata.uid.clone();
            patch_requests(state, &vm, vec![request("Stop", uid.as_deref())]).await
        }
        Ok(RunStrategy::Always) => set_run_strategy(state, &vm, RunStrategy::Halted).await,
    }
}

/// `patchVMITerminationGracePeriod`: replaces the VMI's grace period if it did not change;
/// answers the old value (0 when it had none).
async fn patch_vmi_grace(
    state: &State,
    vmi: &VirtualMachineInstance,
    grace: i64,
) -> Result<i64, Reply> {
    let old = vmi.spec.termination_grace_period_seconds;
    // Upstream's JSON patch tests the old value; the VMI's resourceVersion guards the same.
    let patch = json!({
        "metadata": {"resourceVersion": vmi.metadata.resource_version},
        "spec": {"terminationGracePeriodSeconds": grace},
    });
    let api = Api::<VirtualMachineInstance>::namespaced(
        state.client.clone(),
        vmi.metadata.namespace.as_deref().unwrap_or_default(),
    );
    match api
        .patch(
            vmi.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        Ok(_) => Ok(old.unwrap_or(0)),
        Err(e) => Err(internal(&describe(&e))),
    }
}

/// `RestartVMRequestHandler` (without the force-restart grace period).
async fn restart(state: &State, ns: &str, name: &str) -> Reply {
    let vm = match fetch_vm(state, ns, name).await {
        Ok(vm) => vm,
        Err(r) => return r,
    };
    if strategy_of(&vm).ok() == Some(RunStrategy::Halted) {
        return conflict(
            "virtualmachine",
            name,
            "RunStategy Halted does not support manual restart requests",
        );
    }
    let vmi = match fetch_vmi(state, ns, name).await {
        Ok(Some(v)) => v,
        Ok(None) => return conflict("virtualmachine", name, "VM is not running: Halted"),
        Err(r) => return r,
    };
    let uid = vmi.metadata.uid.clone();
    patch_requests(
        state,
        &vm,
        vec![request("Stop", uid.as_deref()), request("Start", None)],
    )
    .await
}

/// `EvacuateCancelHandler` (v1.7+).
async fn evacuate_cancel(state: &State, ns: &str, name: &str, via_vm: bool, body: &[u8]) -> Reply {
    if via_vm && let Err(r) = fetch_vm(state, ns, name).await {
        return r;
    }
    let vmi = match fetch_vmi(state, ns, name).await {
        Ok(Some(v)) => v,
        Ok(None) => return not_found("virtualmachineinstances", name),
        Err(r) => return r,
    };
    // validateEvacuationNode: the deprecated drain taint cannot be cancelled this way.
    let config = (state.cluster)();
    let evacuation = vmi
        .evacuation_node_name()
        .or(vmi.node_name())
        .unwrap_or_default()
        .to_owned();
    let taint_key = config.migrations.node_drain_taint_key.clone();
    match Api::<k8s_openapi::api::core::v1::Node>::all(state.client.clone())
        .get(&evacuation)
        .await
    {
        Ok(node) => {
            let tainted = node
                .spec
                .and_then(|s| s.taints)
                .unwrap_or_default()
                .iter()
                .any(|t| t.key == taint_key && t.effect == "NoSchedule");
            if tainted {
                return status(
                    400,
                    "BadRequest",
                    &format!(
                        "Node \"{evacuation}\" has NodeDrainTaintKey \"{taint_key}:NoSchedule\""
                    ),
                );
            }
        }
        Err(e) => return internal(&describe(&e)),
    }
    if vmi.evacuation_node_name().is_none() {
        return ok();
    }
    if body.is_empty() {
        return status(400, "BadRequest", "No body");
    }
    let Ok(options) = serde_json::from_slice::<Value>(body) else {
        return status(
            400,
            "BadRequest",
            "Can not unmarshal Request body to struct",
        );
    };
    let wanted = options["evacuationNodeName"].as_str().unwrap_or_default();
    if vmi.evacuation_node_name() != Some(wanted) {
        // Upstream's JSON patch `test` of the node name fails; virt-api wraps that error.
        return internal(&format!(
            "the server rejected our request due to an error in our request: testing value /status/evacuationNodeName failed: {wanted:?} != {:?}",
            vmi.evacuation_node_name().unwrap_or_default()
        ));
    }
    let dry_run = options["dryRun"]
        .as_array()
        .is_some_and(|d| d.iter().any(|v| v == "All"));
    let api = Api::<VirtualMachineInstance>::namespaced(state.client.clone(), ns);
    let patch = json!({"metadata": {"resourceVersion": vmi.metadata.resource_version},
                       "status": {"evacuationNodeName": null}});
    let params = PatchParams {
        dry_run,
        ..PatchParams::default()
    };
    match api.patch(name, &params, &Patch::Merge(patch)).await {
        Ok(_) => ok(),
        Err(e) => internal(&describe(&e)),
    }
}

/// Registers the mutators and the APIService, and waits until both are in effect.
pub(crate) async fn register(
    client: &Client,
    port: u16,
    tls: &WebhookTls,
) -> Result<(), KubeVirtError> {
    let bundle = ByteString(tls.ca_bundle_pem.as_bytes().to_vec());
    let hook = |name: &str, path: &str, resource: &str| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "sideEffects": "None",
            "rules": [{"operations": ["CREATE"], "apiGroups": ["kubevirt.io"], "apiVersions": ["v1"], "resources": [resource]}],
            "clientConfig": {"url": format!("https://127.0.0.1:{port}{path}"), "caBundle": bundle},
        })
    };
    let mutating = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": MUTATOR_NAME, "labels": {"app.kubernetes.io/component": "kubevirt"}},
        "webhooks": [
            hook("virtualmachineinstances-mutator.kubevirt.io", MUTATE_VMI_PATH, "virtualmachineinstances"),
            hook("migrations-mutator.kubevirt.io", MUTATE_MIGRATION_PATH, "virtualmachineinstancemigrations"),
        ],
    });
    let apply = PatchParams::apply("testbed-kubevirt").force();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(MUTATOR_NAME, &apply, &Patch::Apply(&mutating))
        .await
        .map_err(api_err("registering virt-api's mutating webhooks"))?;

    let namespaces = Api::<Namespace>::all(client.clone());
    if namespaces
        .get_opt(config::NAMESPACE)
        .await
        .map_err(api_err("reading the kubevirt namespace"))?
        .is_none()
    {
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": config::NAMESPACE}}))
                .expect("namespace literal");
        match namespaces.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(api_err("creating the kubevirt namespace")(e)),
        }
    }
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": SERVICE_NAME, "namespace": config::NAMESPACE},
        "spec": {"type": "ExternalName", "externalName": "localhost",
                 "ports": [{"name": "https", "port": port, "protocol": "TCP"}]},
    });
    Api::<Service>::namespaced(client.clone(), config::NAMESPACE)
        .patch(SERVICE_NAME, &apply, &Patch::Apply(&service))
        .await
        .map_err(api_err("creating the virt-api Service"))?;
    let apiservice = json!({
        "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
        "metadata": {"name": APISERVICE_NAME},
        "spec": {"group": GROUP, "version": "v1", "groupPriorityMinimum": 1000, "versionPriority": 15,
                 "service": {"namespace": config::NAMESPACE, "name": SERVICE_NAME, "port": port},
                 "caBundle": bundle},
    });
    let apiservices = Api::<APIService>::all(client.clone());
    apiservices
        .patch(APISERVICE_NAME, &apply, &Patch::Apply(&apiservice))
        .await
        .map_err(api_err(
            "registering the subresources.kubevirt.io APIService",
        ))?;

    // The aggregator probes the service before it routes to it.
    let available = async {
        loop {
            if let Ok(s) = apiservices.get(APISERVICE_NAME).await
                && s.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Available" && c.status == "True")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), available)
        .await
        .map_err(|_| {
            KubeVirtError::Timeout("the subresources.kubevirt.io APIService to be Available".into())
        })?;

    // kube-apiserver picks webhook configurations up from an informer: probe with a dry-run
    // migration until it comes back mutated.
    let probe: super::crds::VirtualMachineInstanceMigration = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
        "metadata": {"generateName": "testbed-mutator-probe-", "namespace": "default"},
        "spec": {"vmiName": "testbed-mutator-probe"},
    }))
    .expect("probe literal");
    let api =
        Api::<super::crds::VirtualMachineInstanceMigration>::namespaced(client.clone(), "default");
    let params = PostParams {
        dry_run: true,
        field_manager: None,
    };
    for _ in 0..150 {
        if let Ok(m) = api.create(&params, &probe).await
            && m.metadata
                .finalizers
                .as_ref()
                .is_some_and(|f| f.iter().any(|f| f == MIGRATION_FINALIZER))
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(KubeVirtError::Timeout(
        "kube-apiserver to call virt-api's mutating webhooks".into(),
    ))
}

/// Removes what [`register`] added (as uninstalling virt-operator would), so creations no
/// longer need virt-api once the simulator is gone.
pub(crate) async fn unregister(client: &Client) -> Result<(), KubeVirtError> {
    let ignore_missing = |r: Result<(), kube::Error>, what: &str| match r {
        Ok(()) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(api_err(what.to_owned())(e)),
    };
    let r = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(MUTATOR_NAME, &Default::default())
        .await
        .map(|_| ());
    ignore_missing(r, "unregistering virt-api's mutating webhooks")?;
    let r = Api::<APIService>::all(client.clone())
        .delete(APISERVICE_NAME, &Default::default())
        .await
        .map(|_| ());
    ignore_missing(r, "unregistering the subresources.kubevirt.io APIService")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/apis/subresources.kubevirt.io/v1"), Route::Discovery);
        assert_eq!(
            route("/apis/subresources.kubevirt.io/v1/"),
            Route::Discovery
        );
        assert_eq!(
            route(
                "/apis/subresources.kubevirt.io/v1/namespaces/default/virtualmachineinstances/a/evacuate/cancel"
            ),
            Route::Vmi {
                namespace: "default",
                name: "a",
                action: "evacuate/cancel"
            }
        );
        assert_eq!(
            route("/apis/subresources.kubevirt.io/v1/namespaces/ns/virtualmachines/vm/start"),
            Route::Vm {
                namespace: "ns",
                name: "vm",
                action: "start"
            }
        );
        assert_eq!(route("/apis"), Route::Other);
    }

    #[test]
    fn discovery_lists_evacuate_cancel_from_1_7() {
        let names = |v| {
            discovery(v)["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["name"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert!(
            !names(KubeVirtVersion::V1_6)
                .contains(&"virtualmachineinstances/evacuate/cancel".to_owned())
        );
        assert!(
            names(KubeVirtVersion::V1_7)
                .contains(&"virtualmachineinstances/evacuate/cancel".to_owned())
        );
    }

    #[test]
    fn pending_requests_refuse_all_but_a_lone_stop() {
        let pending = vec![request("Start", None)];
        assert!(change_requests(&pending, vec![request("Start", None)]).is_err());
        assert_eq!(
            change_requests(&pending, vec![request("Stop", Some("u"))]).unwrap(),
            vec![request("Stop", Some("u"))]
        );
        assert!(
            change_requests(
                &[],
                vec![request("Stop", Some("u")), request("Start", None)]
            )
            .is_ok()
        );
    }

    #[test]
    fn migration_mutator_adds_label_and_finalizer() {
        let bare = json!({"metadata": {"generateName": "m-"}, "spec": {"vmiName": "a"}});
        assert_eq!(
            mutation_ops(&bare, &Mutation::Migration),
            vec![
                json!({"op": "add", "path": "/metadata/labels", "value": {"kubevirt.io/vmi-name": "a"}}),
                json!({"op": "add", "path": "/metadata/finalizers", "value": ["kubevirt.io/migrationJobFinalizer"]}),
            ]
        );
        let dressed = json!({"metadata": {"labels": {"x": "y"}, "finalizers": ["f"]}, "spec": {"vmiName": "a"}});
        assert_eq!(
            mutation_ops(&dressed, &Mutation::Migration),
            vec![
                json!({"op": "add", "path": "/metadata/labels/kubevirt.io~1vmi-name", "value": "a"}),
                json!({"op": "add", "path": "/metadata/finalizers/-", "value": "kubevirt.io/migrationJobFinalizer"}),
            ]
        );
        assert_eq!(
            mutation_ops(&dressed, &Mutation::Vmi),
            vec![
                json!({"op": "add", "path": "/metadata/finalizers/-", "value": "kubevirt.io/foregroundDeleteVirtualMachine"})
            ]
        );
    }
}
