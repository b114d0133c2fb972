//! The driver against a mock API (a `tower` service answering the few calls a drain makes):
//! cordon retry on conflict, eviction outcomes and their retry timing, graceful stops, and the
//! release going before everything else of its step. Time is tokio's paused clock, so retry and
//! deadline timings are exact.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::*;
use crate::drain::model::Scope;

const NODE: &str = "node-1";

/// One call as the mock saw it.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    body: Value,
    at: tokio::time::Instant,
}

#[derive(Default)]
struct State {
    node: Value,
    pods: Vec<Value>,
    vmis: Vec<Value>,
    /// 409s to answer before a Node patch goes through.
    conflicts: u32,
    /// Pod name → answers to its evictions, in order (the last one repeats).
    evictions: HashMap<String, VecDeque<(u16, String)>>,
    calls: Vec<Call>,
    /// Open watch streams of VMIs, to push events into.
    vmi_watches: Vec<mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>>,
}

type Shared = Arc<Mutex<State>>;
type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, v: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, message: &str) -> Response<Body> {
    full(
        StatusCode::from_u16(code).unwrap(),
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": message, "reason": "", "code": code}),
    )
}

fn list(kind: &str, items: &[Value]) -> Value {
    json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items})
}

async fn answer(state: Shared, req: Request<kube::client::Body>) -> Response<Body> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let mut s = state.lock().unwrap();
    s.calls.push(Call {
        method: method.clone(),
        path: path.clone(),
        body: body.clone(),
        at: tokio::time::Instant::now(),
    });
    let watch = query.contains("watch=true");
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["api", "v1", "nodes", _]) => full(StatusCode::OK, s.node.clone()),
        ("PATCH", ["api", "v1", "nodes", _]) => {
            if s.conflicts > 0 {
                s.conflicts -= 1;
                return status(409, "the object has been modified");
            }
            merge(&mut s.node, &body);
            let rv = s.node["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            s.node["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
            full(StatusCode::OK, s.node.clone())
        }
        ("GET", ["api", "v1", "pods"]) if !watch => full(StatusCode::OK, list("PodList", &s.pods)),
        ("GET", ["apis", "kubevirt.io", "v1", "virtualmachineinstances"]) if !watch => {
            full(StatusCode::OK, list("VirtualMachineInstanceList", &s.vmis))
        }
        ("GET", _) if watch => {
            let (tx, rx) = mpsc::unbounded_channel();
            if parts.contains(&"virtualmachineinstances") {
                s.vmi_watches.push(tx);
            } else {
                // Pod watches stay open and silent.
                std::mem::forget(tx);
            }
            let stream =
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
                );
            Response::builder()
                .status(200)
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap()
        }
        ("POST", ["api", "v1", "namespaces", _, "pods", name, "eviction"]) => {
            let answers = s.evictions.entry(name.to_string()).or_default();
            let (code, message) = if answers.len() > 1 {
                answers.pop_front().unwrap()
            } else {
                answers.front().cloned().unwrap_or((201, String::new()))
            };
            if code == 201 {
                full(
                    StatusCode::CREATED,
                    json!({"kind": "Status", "status": "Success"}),
                )
            } else {
                status(code, &message)
            }
        }
        ("DELETE", ["api", "v1", "namespaces", _, "pods", name]) => {
            let pod = s
                .pods
                .iter()
                .find(|p| p["metadata"]["name"] == *name)
                .cloned()
                .unwrap_or(Value::Null);
            full(StatusCode::OK, pod)
        }
        _ => status(404, "not found"),
    }
}

/// A JSON merge patch (RFC 7386), enough for the Node patches.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn mock_client(state: Shared) -> kube::Client {
    let svc = tower::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(answer(state, req).await) }
    });
    kube::Client::new(svc, "default")
}

fn node() -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": NODE, "uid": "n1", "resourceVersion": "1"}, "spec": {}})
}

fn vmi(name: &str) -> Value {
    json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
           "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                        "resourceVersion": "1", "labels": {"kubevirt.io/nodeName": NODE}},
           "status": {"phase": "Running", "nodeName": NODE}})
}

fn launcher(vmi: &str, grace: u32) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": format!("virt-launcher-{vmi}-x"), "namespace": "default",
                        "uid": format!("pod-{vmi}"), "resourceVersion": "1",
                        "labels": {"kubevirt.io": "virt-launcher",
                                   "kubevirt.io/created-by": format!("uid-{vmi}")},
                        "annotations": {"kubevirt.io/domain": vmi}},
           "spec": {"nodeName": NODE, "terminationGracePeriodSeconds": grace, "containers": []},
           "status": {"phase": "Running"}})
}

/// Gate and reporter write into one log, so the order of release and report shows.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, s: String) {
        self.0.lock().unwrap().push(s);
    }
    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl Gate for Log {
    fn release(&self) -> bool {
        self.push("release".into());
        true
    }
    fn retake(&self) {
        self.push("retake".into());
    }
}

impl Reporter for Log {
    fn report(&mut self, step: &Step<'_>) {
        for n in step.notes {
            match n {
                Note::Warning { reason, .. } => self.push(format!("warning {reason}")),
                Note::Ended(e) => self.push(format!("ended {:?}", e.reason)),
                Note::Stopped(s) => self.push(format!("stopped {}", s.vmi)),
                _ => {}
            }
        }
    }
}

fn driver(state: &Shared, log: &Log, deadline: Duration) -> Driver<Log> {
    Driver::new(
        DriverConfig {
            machine: MachineConfig {
                node: NODE.into(),
                scope: Scope::Vms,
                safety_margin: Duration::ZERO,
                deadline_override: Some(deadline),
                pre_drain_lead: None,
                take_turns: false,
                power_settle: None,
            },
            mark: CordonMark::maintenance("2026-01-01T00:00:00Z"),
            once: true,
        },
        mock_client(state.clone()),
        Arc::new(log.clone()),
        log.clone(),
    )
}

fn start() -> impl Stream<Item = Input> + Unpin {
    futures::stream::iter([Input::Shutdown {
        start: true,
        kind: Some("test".into()),
    }])
    .chain(futures::stream::pending())
}

fn calls(state: &Shared, method: &str, suffix: &str) -> Vec<Call> {
    state
        .lock()
        .unwrap()
        .calls
        .iter()
        .filter(|c| c.method == method && c.path.ends_with(suffix))
        .cloned()
        .collect()
}

/// Pushes a watch event to every open VMI watch.
fn vmi_event(state: &Shared, kind: &str, obj: Value) {
    let line = format!("{}\n", json!({"type": kind, "object": obj}));
    for w in &state.lock().unwrap().vmi_watches {
        let _ = w.send(Ok(Frame::data(Bytes::from(line.clone()))));
    }
}

async fn until_calls(state: &Shared, method: &str, suffix: &str, n: usize) -> Vec<Call> {
    for _ in 0..10_000 {
        let c = calls(state, method, suffix);
        if c.len() >= n {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never saw {n} {method} …{suffix}");
}

#[tokio::test(start_paused = true)]
async fn cordon_retries_conflicts_and_marks_the_cordon_as_ours() {
    let state: Shared = Arc::new(Mutex::new(State {
        node: node(),
        conflicts: 2,
        ..Default::default()
    }));
    let log = Log::default();
    let (outcome, _) = driver(&state, &log, Duration::from_secs(60))
        .run(start())
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Released(ReleaseReason::Empty));
    let patches = calls(&state, "PATCH", "/nodes/node-1");
    assert_eq!(patches.len(), 3, "two conflicts, then the patch that lands");
    for p in &patches {
        assert!(
            p.body["metadata"]["resourceVersion"].is_string(),
            "every patch is guarded by the resourceVersion read: {}",
            p.body
        );
    }
    let node = state.lock().unwrap().node.clone();
    assert_eq!(node["spec"]["unschedulable"], true);
    assert_eq!(
        node["metadata"]["annotations"][cordon::DRAIN_ANNOTATION],
        "2026-01-01T00:00:00Z"
    );
    assert_eq!(log.lines(), vec!["release", "ended Released(Empty)"]);
}

#[tokio::test(start_paused = true)]
async fn evacuation_answer_ends_the_retries_other_429s_are_retried_with_backoff() {
    let mut evictions = HashMap::new();
    evictions.insert(
        "virt-launcher-a-x".to_string(),
        VecDeque::from([
            (429, "Cannot evict pod as it would violate the pod's disruption budget.".into()),
            (503, "unavailable".into()),
            (
                429,
                "admission webhook \"virt-launcher-eviction-interceptor.kubevirt.io\" denied the request: Eviction triggered evacuation of VMI \"default/a\"".into(),
            ),
        ]),
    );
    let state: Shared = Arc::new(Mutex::new(State {
        node: node(),
        pods: vec![launcher("a", 60)],
        vmis: vec![vmi("a")],
        evictions,
        ..Default::default()
    }));
    let log = Log::default();
    let d = driver(&state, &log, Duration::from_secs(600));
    let run = tokio::spawn(d.run(start()));
    let sent = until_calls(&state, "POST", "/eviction", 3).await;
    // 100 ms after the first failure, 200 ms after the second.
    assert_eq!(sent[1].at - sent[0].at, Duration::from_millis(100));
    assert_eq!(sent[2].at - sent[1].at, Duration::from_millis(200));
    // "Evacuation triggered" is progress: nothing more is sent while KubeVirt migrates.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(calls(&state, "POST", "/eviction").len(), 3);
    assert!(calls(&state, "DELETE", "").is_empty());
    // The VMI leaves the node (the label-selected watch reports it deleted): released.
    let mut gone = vmi("a");
    gone["status"]["migrationState"] =
        json!({"sourceNode": NODE, "targetNode": "node-2", "completed": true});
    vmi_event(&state, "DELETED", gone);
    let (outcome, _) = run.await.unwrap().unwrap();
    assert_eq!(outcome, Outcome::Released(ReleaseReason::Empty));
}

#[tokio::test(start_paused = true)]
async fn a_vmi_kubevirt_will_not_migrate_is_stopped_at_once_with_its_grace_period() {
    let mut evictions = HashMap::new();
    evictions.insert(
        "virt-launcher-stuck-x".to_string(),
        VecDeque::from([(
            429,
            "admission webhook \"virt-launcher-eviction-interceptor.kubevirt.io\" denied the request: VMI stuck is configured with an eviction strategy but is not live-migratable".into(),
        )]),
    );
    let mut stuck = vmi("stuck");
    stuck["status"]["conditions"] = json!([{"type": "LiveMigratable", "status": "False"}]);
    let state: Shared = Arc::new(Mutex::new(State {
        node: node(),
        pods: vec![launcher("stuck", 45)],
        vmis: vec![stuck.clone()],
        evictions,
        ..Default::default()
    }));
    let log = Log::default();
    let run = tokio::spawn(driver(&state, &log, Duration::from_secs(600)).run(start()));
    let deleted = until_calls(&state, "DELETE", "/pods/virt-launcher-stuck-x", 1).await;
    let first_eviction = calls(&state, "POST", "/eviction")[0].at;
    assert!(
        deleted[0].at - first_eviction < Duration::from_secs(1),
        "stopped at once, not at its stop-by point"
    );
    assert_eq!(deleted[0].body["gracePeriodSeconds"], 45);
    assert_eq!(deleted[0].body["preconditions"]["uid"], "pod-stuck");
    let mut stopped = stuck;
    stopped["status"]["phase"] = json!("Succeeded");
    vmi_event(&state, "MODIFIED", stopped);
    let (outcome, _) = run.await.unwrap().unwrap();
    assert_eq!(outcome, Outcome::Released(ReleaseReason::Empty));
    assert_eq!(
        log.lines(),
        vec!["stopped default/stuck", "release", "ended Released(Empty)"]
    );
}

#[tokio::test(start_paused = true)]
async fn at_the_deadline_the_release_goes_before_its_warning_and_report() {
    let state: Shared = Arc::new(Mutex::new(State {
        node: node(),
        pods: vec![launcher("a", 1)],
        vmis: vec![vmi("a")],
        evictions: HashMap::from([(
            "virt-launcher-a-x".to_string(),
            VecDeque::from([(
                429,
                "denied the request: Eviction triggered evacuation of VMI \"default/a\"".into(),
            )]),
        )]),
        ..Default::default()
    }));
    let log = Log::default();
    let began = tokio::time::Instant::now();
    let (outcome, _) = driver(&state, &log, Duration::from_secs(30))
        .run(start())
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Released(ReleaseReason::Deadline));
    assert_eq!(began.elapsed(), Duration::from_secs(30));
    // The VMI was stopped at its stop-by point (deadline − 1 s grace, but not before half).
    let stop = calls(&state, "DELETE", "/pods/virt-launcher-a-x");
    assert_eq!(stop.len(), 1);
    assert_eq!(stop[0].at - began, Duration::from_secs(29));
    let lines = log.lines();
    let release = lines.iter().position(|l| l == "release").unwrap();
    let warning = lines
        .iter()
        .position(|l| l == "warning ShutdownDeadlineReached")
        .unwrap();
    assert!(release < warning, "{lines:?}");
}
