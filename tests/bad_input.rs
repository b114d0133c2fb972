//! Bad input never panics or hangs the agent: property tests (proptest) over the configuration
//! loader, the logind drop-in parser, the decoding of the API objects the drain reads and the
//! eviction answers it acts on, and the lines between holder and worker. Each writes how many
//! cases it ran to the test log; proptest catches a panic in a case, shrinks the input and fails
//! the test with it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};
use shutdown_guard::config::{self, Flags, Sources};
use shutdown_guard::drain::eviction::EvictionOutcome;
use shutdown_guard::drain::model::{ObjKey, PodRef};
use shutdown_guard::host::logind_conf;
use shutdown_guard::kube::{objects, pods};

/// Runs `cases` cases of `test` over `strategy` and says how many ran.
fn check<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: Debug,
{
    let ran = AtomicU32::new(0);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&strategy, |v| {
        ran.fetch_add(1, Ordering::Relaxed);
        test(v)
    });
    if let Err(e) = outcome {
        panic!("{name}: {e}");
    }
    // Straight to stderr: libtest captures the print macros of a passing test, and the count is
    // what a CI log should show.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "{name}: {} cases, every one a value or a clear error",
        ran.load(Ordering::Relaxed)
    );
}

/// Any JSON, nested a few levels, with strings long enough to matter.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::from),
        (0usize..70_000).prop_map(|n| Value::from("x".repeat(n))),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::hash_map(".{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A well-formed object with some of its fields (at any depth) replaced by anything.
fn mutated(base: Value) -> impl Strategy<Value = Value> {
    prop::collection::vec(
        (any::<prop::sample::Index>(), any_json(), any::<bool>()),
        0..6,
    )
    .prop_map(move |edits| {
        let mut v = base.clone();
        for (at, with, remove) in edits {
            let mut paths = Vec::new();
            collect_paths(&v, &mut Vec::new(), &mut paths);
            if paths.is_empty() {
                break;
            }
            let path = &paths[at.index(paths.len())];
            replace_at(&mut v, path, if remove { None } else { Some(with) });
        }
        v
    })
}

fn collect_paths(v: &Value, here: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if let Value::Object(m) = v {
        for (k, child) in m {
            here.push(k.clone());
            out.push(here.clone());
            collect_paths(child, here, out);
            here.pop();
        }
    }
}

fn replace_at(v: &mut Value, path: &[String], with: Option<Value>) {
    let (last, parents) = path.split_last().expect("a path has a key");
    let mut at = v;
    for k in parents {
        at = &mut at[k.as_str()];
    }
    if let Value::Object(m) = at {
        match with {
            Some(w) => {
                m.insert(last.clone(), w);
            }
            None => {
                m.remove(last);
            }
        }
    }
}

const KEYS: &[&str] = &[
    "node",
    "kubeconfig",
    "scope",
    "safety_margin",
    "deadline",
    "drain_budget",
    "pre_drain",
    "pre_drain_lead",
    "pre_drain_turns",
    "lease_namespace",
    "reboot_pending_taint",
    "reboot_required_file",
    "power_event_min_targets",
    "power_event_settle",
    "power_event_restore",
    "power_event_restore_parallel",
    "power_event_restore_min_ready_nodes",
    "write_logind_dropin",
    "logind_dropin",
    "host_root",
    "boot_id_path",
    "log_format",
    "listen_address",
    "worker_user",
    "state_dir",
    "rearm_after",
    "link_socket",
];

fn setting_value() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,30}",
        "[0-9]{1,25}(ms|s|m|h|d|us)?",
        "-[0-9]{1,5}s",
        Just("vms".to_owned()),
        Just("all".to_owned()),
        Just("[1, 2]".to_owned()),
        Just("{a: b}".to_owned()),
        Just("~".to_owned()),
        "[0-9.:]{1,30}",
    ]
}

#[test]
fn the_configuration_loader_answers_every_file_and_environment_with_a_value_or_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    let structured = prop::collection::vec(
        (
            prop_oneof![
                prop::sample::select(KEYS).prop_map(str::to_owned),
                "[a-z_]{1,12}"
            ],
            setting_value(),
        ),
        0..8,
    )
    .prop_map(|kv| {
        kv.into_iter()
            .map(|(k, v)| format!("{k}: {v}\n"))
            .collect::<String>()
    });
    let text = prop_oneof![
        structured,
        ".{0,400}",
        any_json().prop_map(|v| v.to_string())
    ];
    let env = prop::collection::hash_map(
        prop::sample::select(KEYS).prop_map(|k| format!("SHUTDOWN_GUARD_{}", k.to_uppercase())),
        setting_value(),
        0..4,
    );
    check("configuration", 2000, (text, env), |(text, env)| {
        std::fs::write(&file, &text).unwrap();
        let env: HashMap<String, String> = env.into_iter().collect();
        let sources = Sources {
            file: Some(&file),
            env,
            flags: Flags::default(),
            hostname: Some("node-1".into()),
        };
        if let Err(e) = config::load(&sources) {
            let msg = e.to_string();
            prop_assert!(msg.starts_with("invalid configuration"), "{msg}");
        }
        Ok(())
    });
}

#[test]
fn the_logind_dropin_parser_reads_any_text_and_finds_the_last_setting() {
    let line = prop_oneof![
        ".{0,60}",
        Just("[Login]".to_owned()),
        Just("[Other]".to_owned()),
        "[ \t]*InhibitDelayMaxSec[ \t]*=[ \t]*.{0,20}",
        "[#;].{0,20}",
    ];
    let text = prop::collection::vec(line, 0..30).prop_map(|l| l.join("\n"));
    check(
        "logind drop-in",
        5000,
        (text, "[0-9a-z ]{0,12}"),
        |(text, value)| {
            let _ = logind_conf::setting_in(&text);
            // Whatever came before, a last `[Login]` section that sets the key wins.
            let appended = format!("{text}\n[Login]\nInhibitDelayMaxSec={value}\n");
            prop_assert_eq!(
                logind_conf::setting_in(&appended),
                Some(value.trim().to_owned())
            );
            Ok(())
        },
    );
}

fn vmi_json() -> Value {
    json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "vm-a", "namespace": "ns", "uid": "u1", "resourceVersion": "7",
                     "labels": {"kubevirt.io/nodeName": "node-1"},
                     "annotations": {"kubevirt.io/latest-observed-api-version": "v1"}},
        "spec": {"evictionStrategy": "LiveMigrate", "domain": {"memory": {"guest": "2Gi"}}},
        "status": {"phase": "Running", "nodeName": "node-1", "evacuationNodeName": "node-1",
                   "conditions": [{"type": "LiveMigratable", "status": "True"}],
                   "migrationState": {"sourceNode": "node-1", "targetNode": "node-2",
                                      "targetPod": "virt-launcher-vm-a-t", "completed": false,
                                      "failed": false, "migrationUid": "m1"}}})
}

fn pod_json() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "virt-launcher-vm-a-x", "namespace": "ns", "uid": "p1",
                     "labels": {"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": "u1"},
                     "annotations": {"kubevirt.io/migrationJobName": "m1"},
                     "ownerReferences": [{"apiVersion": "kubevirt.io/v1",
                         "kind": "VirtualMachineInstance", "name": "vm-a", "uid": "u1",
                         "controller": true}]},
        "spec": {"nodeName": "node-1", "terminationGracePeriodSeconds": 30,
                 "containers": [{"name": "compute", "image": "virt-launcher"}]},
        "status": {"phase": "Running"}})
}

#[test]
fn vmis_and_pods_of_any_shape_decode_to_facts_or_are_skipped() {
    let objects = prop_oneof![mutated(vmi_json()), mutated(pod_json()), any_json()];
    check("API objects", 3000, objects, |v| {
        if let Ok(o) = serde_json::from_value::<DynamicObject>(v.clone()) {
            let _ = objects::vmi_info(&o);
            let _ = objects::vmi_facts(&o);
        }
        if let Ok(p) = serde_json::from_value::<Pod>(v) {
            let _ = objects::pod_info(&p);
        }
        Ok(())
    });
}

/// A client whose every answer is `code` with `body`.
fn answering(code: u16, body: Bytes) -> kube::Client {
    let svc = tower::service_fn(move |_req: Request<kube::client::Body>| {
        let body = body.clone();
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Full::new(body).boxed())
                    .unwrap(),
            )
        }
    });
    kube::Client::new(svc, "default")
}

#[test]
fn any_eviction_answer_becomes_an_outcome_in_bounded_time() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = |code: u16, message: String| {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": message, "reason": "TooManyRequests", "code": code})
        .to_string()
        .into_bytes()
    };
    let message = prop_oneof![
        ".{0,80}",
        Just("Eviction triggered evacuation of VMI".to_owned()),
        Just(
            "VMI ns/vm-a is configured with an eviction strategy but is not live-migratable"
                .to_owned()
        ),
        (0usize..2_000_000).prop_map(|n| "m".repeat(n)),
    ];
    let body = prop_oneof![
        (100u16..600, message.clone()).prop_map(move |(c, m)| (c, status(c, m))),
        (100u16..600, prop::collection::vec(any::<u8>(), 0..300)),
        (
            100u16..600,
            mutated(json!({"kind": "Status", "apiVersion": "v1", "code": 429,
                                     "message": "Eviction triggered evacuation"}))
        )
            .prop_map(|(c, v)| (c, v.to_string().into_bytes())),
    ];
    let pod = PodRef {
        key: ObjKey {
            namespace: "ns".into(),
            name: "virt-launcher-vm-a-x".into(),
        },
        uid: "p1".into(),
    };
    check("eviction answers", 1500, body, |(code, body)| {
        let well_formed = serde_json::from_slice::<Value>(&body)
            .ok()
            .filter(|v| v["kind"] == "Status" && v["code"] == code && v["message"].is_string());
        let outcome = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                pods::evict(answering(code, Bytes::from(body)), &pod),
            )
            .await
        });
        let outcome = outcome.map_err(|_| TestCaseError::fail("no outcome within 10 s"))?;
        // A readable Status decides as the classifier says (a 409 naming the UID precondition
        // means the pod was replaced: gone).
        if let Some(v) = well_formed
            && code >= 400
        {
            let message = v["message"].as_str().unwrap_or_default();
            let want = if code == 409 && message.contains("UID") {
                EvictionOutcome::Gone
            } else {
                EvictionOutcome::from_status(code, message)
            };
            prop_assert_eq!(outcome, want);
        }
        Ok(())
    });
}

#[test]
fn link_lines_between_holder_and_worker_parse_or_are_refused_and_messages_read_back() {
    use shutdown_guard::drain::keeper::Tell;
    use shutdown_guard::holder::link::ToHolder;
    let word = prop_oneof![
        prop::sample::select(vec![
            "lock", "lost", "nolock", "delay", "shutdown", "resume", "alive", "release", "retake",
            "0", "1", "poweroff", "reboot",
        ])
        .prop_map(str::to_owned),
        "[0-9]{1,25}",
        ".{0,12}",
    ];
    let line = prop::collection::vec(word, 0..5).prop_map(|w| w.join(" "));
    check("link lines", 5000, line, |line| {
        // What the holder writes, the worker reads back; a kind with characters a line cannot
        // carry is written with `_` in their place, and then reads back as written.
        if let Ok(t) = line.parse::<Tell>() {
            let written = t.to_string();
            let read = written.parse::<Tell>();
            prop_assert!(read.is_ok(), "{written:?} does not read back");
            prop_assert_eq!(read.unwrap().to_string(), written);
        }
        if let Ok(m) = line.parse::<ToHolder>() {
            prop_assert_eq!(m.to_string().parse::<ToHolder>().ok(), Some(m));
        }
        Ok(())
    });
}
