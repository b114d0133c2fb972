//! Operability on the test bed: `check`, `status`, `drain` and `uncordon` (output and exit code),
//! the agent's `/metrics`, `/readyz` and `/status` during a real drain, and the Node condition
//! and Events it leaves. Every claim is checked against logind or the API server (watches, the
//! audit log), not against the agent's own logs.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::json;
use shutdown_guard::admin::metrics::sample;
use testbed::bed::{Bed, BedOptions, LogindKind, NODE};
use testbed::kubevirt::KubeVirtOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A port nobody listens on right now (the agent binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` on loopback: (status code, body).
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

async fn wait_http(port: u16, path: &str, want: u16, timeout: Duration) -> String {
    let got = testbed::wait::until(timeout, Duration::from_millis(50), || async {
        http_get(port, path)
            .await
            .and_then(|(code, body)| (code == want).then_some(body))
    })
    .await;
    got.unwrap_or_else(|| panic!("GET {path} did not answer {want} within {timeout:?}"))
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn finish(mut cmd: tokio::process::Command, what: &str) -> Ran {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 120 s"))
        .unwrap_or_else(|e| panic!("{what} did not start: {e}"));
    let ran = Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "$ shutdown-guard {what}  → exit {}\n{}{}",
        ran.code,
        ran.stdout,
        if ran.stderr.is_empty() {
            String::new()
        } else {
            format!("stderr: {}\n", ran.stderr)
        }
    );
    ran
}

/// Runs `shutdown-guard ARGS` as a pod on node-1 (where logind is).
async fn on_node(bed: &Bed, args: &[&str]) -> Ran {
    let cmd = bed.pod_command(AGENT, args).await;
    finish(cmd, &args.join(" ")).await
}

/// Runs `shutdown-guard ARGS` on the machine, with `kubeconfig`.
async fn on_machine(kubeconfig: &Path, args: &[&str]) -> Ran {
    let mut cmd = tokio::process::Command::new(AGENT);
    cmd.args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("NODE_NAME")
        .kill_on_drop(true);
    finish(cmd, &args.join(" ")).await
}

/// The line of a check's text report for `name`.
fn line<'a>(out: &'a str, status: &str, name: &str) -> &'a str {
    out.lines()
        .find(|l| {
            let mut w = l.split_whitespace();
            w.next() == Some(status) && w.next() == Some(name)
        })
        .unwrap_or_else(|| panic!("no {status} line for {name} in:\n{out}"))
}

/// The fix printed under the check `name`.
fn fix_of<'a>(out: &'a str, name: &str) -> &'a str {
    let mut lines = out.lines().skip_while(|l| {
        let mut w = l.split_whitespace();
        w.next();
        w.next() != Some(name)
    });
    lines.next();
    lines
        .next()
        .filter(|l| l.trim_start().starts_with("fix:"))
        .unwrap_or_else(|| panic!("no fix under {name} in:\n{out}"))
}

/// logind's configuration files of node-1 copied into a host-root folder, as a DaemonSet sees
/// them through its hostPath mount (a pod here cannot see the node's PID 1 to reach its root).
fn snapshot_logind_conf(bed_dir: &Path, node_pid: u32) -> PathBuf {
    let dst = bed_dir.join(format!("host-root-{}", rand::random::<u32>()));
    let src = PathBuf::from(format!("/proc/{node_pid}/root"));
    for rel in [
        "usr/lib/systemd/logind.conf",
        "etc/systemd/logind.conf",
        "etc/systemd/logind.conf.d",
        "run/systemd/logind.conf.d",
        "usr/lib/systemd/logind.conf.d",
    ] {
        let from = src.join(rel);
        let to = dst.join(rel);
        if from.is_file() {
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&from, &to).unwrap();
        } else if from.is_dir() {
            std::fs::create_dir_all(&to).unwrap();
            for e in std::fs::read_dir(&from).unwrap().flatten() {
                if e.path().is_file() {
                    std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
                }
            }
        }
    }
    dst
}

async fn node_pid(bed: &Bed) -> u32 {
    bed.logind
        .read()
        .await
        .systemd_ref()
        .expect("systemd logind")
        .pid()
}

/// A process on node-1 holding a delay lock on shutdown as `who`; killed when dropped.
async fn apply(client: &Client, obj: serde_json::Value) {
    let kind = obj["kind"].as_str().unwrap().to_string();
    let (group, version) = match obj["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            obj["apiVersion"].as_str().unwrap().to_string(),
        ),
    };
    let gvk = kube::api::GroupVersionKind::gvk(&group, &version, &kind);
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .expect("kind served");
    let api: Api<DynamicObject> = match (caps.scope, obj["metadata"]["namespace"].as_str()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => {
            Api::namespaced_with(client.clone(), ns, &ar)
        }
        _ => Api::all_with(client.clone(), &ar),
    };
    let o: DynamicObject = serde_json::from_value(obj).unwrap();
    api.create(&PostParams::default(), &o)
        .await
        .unwrap_or_else(|e| panic!("creating {kind}: {e}"));
}

/// `check` on node-1: passes on a healthy node, and fails, naming the fix, on a short
/// InhibitDelayMaxSec, a kubelet-style delay lock and a missing RBAC rule; VMIs that will not
/// migrate (None, also by KubeVirt's default; not live-migratable) are warnings, failures with
/// `--strict`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_reports_what_would_defeat_a_graceful_shutdown() {
    let bed = start_bed(BedOptions {
        vms: "live=1,none=1,stuck=1".parse().unwrap(),
        logind: LogindKind::Systemd,
        inhibit_delay_max_secs: Some(60),
        ..BedOptions::default()
    })
    .await;
    let port = free_port().to_string();
    let agent = Agent::spawn(&bed, &["--listen-address", &format!("127.0.0.1:{port}")]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    let pid = node_pid(&bed).await;
    let root = snapshot_logind_conf(bed.control_plane.dir(), pid);
    let root_s = root.display().to_string();
    let base = [
        "check",
        "--node",
        NODE,
        "--drain-budget",
        "30s",
        "--host-root",
        &root_s,
    ];

    // Healthy node: every check passes; the two VMIs that will not migrate are warnings.
    let ok = on_node(&bed, &base).await;
    assert_eq!(ok.code, 0, "healthy node: exit 0");
    for name in [
        "logind",
        "delay-lock",
        "inhibit-delay",
        "inhibitors",
        "reboot-commands",
        "scheduled-shutdowns",
        "api-server",
        "last-drain",
        "rbac",
        "kubevirt",
        "power-events",
    ] {
        line(&ok.stdout, "PASS", name);
    }
    assert!(line(&ok.stdout, "PASS", "power-events").contains("node-1 now migrates its VMs"));
    assert!(line(&ok.stdout, "PASS", "reboot-commands").contains("systemd 257"));
    assert!(line(&ok.stdout, "PASS", "scheduled-shutdowns").contains("before its time"));
    assert!(line(&ok.stdout, "PASS", "last-drain").contains("no drain recorded"));
    assert!(line(&ok.stdout, "PASS", "inhibit-delay").contains("90-testbed.conf"));
    assert!(line(&ok.stdout, "PASS", "inhibitors").contains("the agent's lock is held"));
    let none = line(&ok.stdout, "WARN", "vmi");
    assert!(
        none.contains("default/none-1") && none.contains("evictionStrategy None from its spec")
    );
    assert!(
        ok.stdout
            .lines()
            .any(|l| l.contains("default/stuck-1") && l.contains("not live-migratable")),
        "stuck-1 not reported:\n{}",
        ok.stdout
    );
    assert!(!ok.stdout.contains("default/live-1"), "live-1 migrates");

    let strict = on_node(&bed, &[&base[..], &["--strict"]].concat()).await;
    assert_eq!(strict.code, 1, "--strict fails on warnings");

    let json_run = on_node(&bed, &[&base[..], &["--output", "json"]].concat()).await;
    assert_eq!(json_run.code, 0);
    let report: serde_json::Value = serde_json::from_str(&json_run.stdout).expect("JSON report");
    assert_eq!(report["ok"], true);
    assert_eq!(report["node"], NODE);
    let statuses: BTreeMap<String, String> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(statuses["rbac"], "pass");
    assert_eq!(statuses["vmi default/none-1"], "warn");

    // A short InhibitDelayMaxSec: named with the file that sets it, and the fix.
    bed.logind
        .read()
        .await
        .set_inhibit_delay_max(10)
        .await
        .expect("delay lowered");
    let short_root = snapshot_logind_conf(bed.control_plane.dir(), pid);
    let short_root_s = short_root.display().to_string();
    let mut short_args = base.to_vec();
    short_args[6] = &short_root_s;
    let short = on_node(&bed, &short_args).await;
    assert_eq!(short.code, 1, "short delay: exit 1");
    let l = line(&short.stdout, "FAIL", "inhibit-delay");
    assert!(l.contains("at most 10s") && l.contains("InhibitDelayMaxSec=10 set by"));
    assert!(l.contains("/run/systemd/logind.conf.d/90-testbed.conf"));
    assert!(fix_of(&short.stdout, "inhibit-delay").contains("InhibitDelayMaxSec=35s"));
    bed.logind
        .read()
        .await
        .set_inhibit_delay_max(60)
        .await
        .expect("delay restored");

    // kubelet graceful node shutdown's lock: kubelet would kill the VMs' pods locally.
    let kubelet = hold_delay_lock(
        &bed,
        "kubelet",
        "Kubelet needs time to handle node shutdown",
    )
    .await;
    let with_kubelet = on_node(&bed, &base).await;
    assert_eq!(with_kubelet.code, 1, "kubelet's lock: exit 1");
    assert!(
        line(&with_kubelet.stdout, "FAIL", "inhibitors").contains("kills the node's pods locally")
    );
    assert!(fix_of(&with_kubelet.stdout, "inhibitors").contains("shutdownGracePeriod: 0s"));
    drop(kubelet);

    // The last drain recorded on the Node took longer than logind's 60 s less the 5 s margin.
    let nodes: Api<Node> = Api::all(bed.client());
    let record = json!({"type": "reboot", "started": "2026-11-30T06:00:00Z", "outcome": "empty",
                        "migrated": 3, "stopped": 0, "remaining": [], "durationS": 58.2});
    let annotate = |v: serde_json::Value| {
        json!({"metadata": {"annotations": {
            shutdown_guard::kube::condition::LAST_SHUTDOWN_ANNOTATION: v}}})
    };
    nodes
        .patch(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(annotate(json!(record.to_string()))),
        )
        .await
        .expect("record written");
    let long = on_node(&bed, &base).await;
    assert_eq!(long.code, 0, "a long last drain is a warning");
    let l = line(&long.stdout, "WARN", "last-drain");
    assert!(
        l.contains("took 58.2s") && l.contains("less the margin 5s"),
        "{l}"
    );
    assert!(fix_of(&long.stdout, "last-drain").contains("at least 64s"));
    nodes
        .patch(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(annotate(serde_json::Value::Null)),
        )
        .await
        .expect("record removed");

    // A ServiceAccount whose ClusterRole lacks pods/eviction and nodes/status.
    let client = bed.client();
    apply(
        &client,
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "sg-reduced", "namespace": "default"}}),
    )
    .await;
    apply(
        &client,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "sg-reduced"},
               "rules": [
                   {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch", "list", "watch"]},
                   {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]},
                   {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachineinstances"], "verbs": ["get", "list", "watch"]},
                   {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]}
               ]}),
    )
    .await;
    apply(
        &client,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "sg-reduced"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "sg-reduced"},
               "subjects": [{"kind": "ServiceAccount", "name": "sg-reduced", "namespace": "default"}]}),
    )
    .await;
    let kc = bed
        .control_plane
        .service_account_kubeconfig("default", "sg-reduced")
        .await
        .expect("SA kubeconfig");
    let kc_s = kc.display().to_string();
    let reduced = on_node(&bed, &[&base[..], &["--kubeconfig", &kc_s]].concat()).await;
    assert_eq!(reduced.code, 1, "missing RBAC: exit 1");
    let l = line(&reduced.stdout, "FAIL", "rbac");
    assert!(
        l.contains("system:serviceaccount:default:sg-reduced"),
        "{l}"
    );
    assert!(l.contains("create pods/eviction (core)") && l.contains("patch nodes/status (core)"));
    assert!(fix_of(&reduced.stdout, "rbac").contains("resources: [\"pods/eviction\"]"));

    // A VMI without its own strategy gets the cluster's; with no KubeVirt CR that is None.
    let vmis: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &shutdown_guard::kube::vmi_resource(),
    );
    vmis.patch(
        "live-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"evictionStrategy": null}})),
    )
    .await
    .expect("strategy removed");
    let by_default = on_node(&bed, &base).await;
    assert_eq!(by_default.code, 0);
    assert!(
        by_default.stdout.lines().any(|l| l.starts_with("WARN")
            && l.contains("default/live-1")
            && l.contains("KubeVirt's default (")),
        "live-1's default None not reported:\n{}",
        by_default.stdout
    );

    drop(agent);
    bed.shutdown().await.expect("teardown");
}

/// Root's legacy `reboot` on node-1, run as an administrator or a reboot tool would.
async fn legacy_reboot(bed: &Bed) {
    // The node may be gone before the command has its answer; the ledger and the console judge.
    let _ = bed
        .logind
        .read()
        .await
        .systemd_ref()
        .expect("systemd logind")
        .exec("reboot", &[])
        .await;
}

/// systemd 247 (Debian bullseye): root's legacy `reboot` asks systemd directly, not logind, so
/// no `PrepareForShutdown` is sent, the lock is not waited for and the VM dies with the node.
/// `check` says so beforehand and names the commands that do wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_systemd_247_roots_legacy_reboot_skips_the_lock_and_check_warns() {
    let bed = start_bed(BedOptions {
        vms: "live=1".parse().unwrap(),
        logind: LogindKind::SystemdBullseye,
        inhibit_delay_max_secs: Some(60),
        ..BedOptions::default()
    })
    .await;
    let agent = Agent::spawn(&bed, &[]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    let out = check_on(&bed).await;
    let l = line(&out.stdout, "WARN", "reboot-commands");
    assert!(
        l.contains("systemd 247")
            && l.contains("systemd#22058")
            && l.contains("`systemctl reboot`"),
        "{l}"
    );
    assert!(fix_of(&out.stdout, "reboot-commands").contains("systemctl reboot"));

    let requested = std::time::SystemTime::now();
    legacy_reboot(&bed).await;
    bed.wait_poweroff(Duration::from_secs(30))
        .await
        .expect("node-1 goes down");
    let ledger = bed.ledger().await;
    assert_eq!(
        ledger.lost().len(),
        1,
        "the legacy reboot should have cut live-1 off:\n{ledger}\nagent log:\n{}",
        agent.log_text()
    );
    let evictions = audit(&bed)
        .into_iter()
        .filter(|e| e.subresource == "eviction" && e.received >= requested)
        .count();
    assert_eq!(
        evictions, 0,
        "no drain can have run without PrepareForShutdown"
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

/// `shutdown-guard check` on node-1, with the node's logind configuration as its host root.
async fn check_on(bed: &Bed) -> Ran {
    let root = snapshot_logind_conf(bed.control_plane.dir(), node_pid(bed).await);
    let root_s = root.display().to_string();
    on_node(
        bed,
        &[
            "check",
            "--node",
            NODE,
            "--drain-budget",
            "30s",
            "--host-root",
            &root_s,
        ],
    )
    .await
}

/// From systemd 251 the same legacy `reboot` goes through logind and waits for the agent's
/// drain, and `check` passes it.
async fn legacy_reboot_waits_for_the_drain(logind: LogindKind, version: &str) {
    let bed = start_bed(BedOptions {
        vms: "live=1".parse().unwrap(),
        logind,
        inhibit_delay_max_secs: Some(60),
        ..BedOptions::default()
    })
    .await;
    let agent = Agent::spawn(&bed, &[]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    let out = check_on(&bed).await;
    let l = line(&out.stdout, "PASS", "reboot-commands");
    assert!(l.contains(&format!("systemd {version}")), "{l}");
    legacy_reboot(&bed).await;
    bed.wait_poweroff(Duration::from_secs(60))
        .await
        .expect("node-1 goes down");
    let ledger = assert_none_lost(&bed).await;
    assert!(
        ledger
            .fate("default/live-1")
            .is_some_and(|f| f.is_migrated()),
        "live-1 did not migrate:\n{ledger}\nagent log:\n{}",
        agent.log_text()
    );
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_systemd_252_roots_legacy_reboot_waits_for_the_drain() {
    legacy_reboot_waits_for_the_drain(LogindKind::SystemdBookworm, "252").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_systemd_257_roots_legacy_reboot_waits_for_the_drain() {
    legacy_reboot_waits_for_the_drain(LogindKind::Systemd, "257").await;
}

/// The ShutdownGuard condition reasons the Node went through, in order.
fn watch_condition(client: Client) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        let api: Api<Node> = Api::all(client);
        let cfg = watcher::Config::default().fields(&format!("metadata.name={NODE}"));
        // Backoff: once the bed is torn down every retry fails at once, and a retry loop that
        // never waits would keep the runtime from shutting the test down.
        let mut stream = std::pin::pin!(watcher::watcher(api, cfg).default_backoff());
        while let Some(ev) = stream.next().await {
            let node = match ev {
                Ok(watcher::Event::Apply(n)) | Ok(watcher::Event::InitApply(n)) => n,
                _ => continue,
            };
            let reason = node
                .status
                .and_then(|s| s.conditions)
                .and_then(|c| c.into_iter().find(|c| c.type_ == "ShutdownGuard"))
                .and_then(|c| c.reason);
            if let Some(r) = reason {
                let mut g = s.lock().unwrap();
                if g.last() != Some(&r) {
                    g.push(r);
                }
            }
        }
    });
    seen
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counts {
    lock: f64,
    draining: f64,
    migrated: f64,
    stopped: f64,
    remaining: f64,
    drains: f64,
}

fn counts(text: &str) -> Counts {
    let g = |n: &str, l: &str| sample(text, n, l).unwrap_or(f64::NAN);
    Counts {
        lock: g("shutdown_guard_lock_held", ""),
        draining: g("shutdown_guard_draining", ""),
        migrated: g("shutdown_guard_vmis_migrated_total", ""),
        stopped: g("shutdown_guard_vmis_stopped_total", ""),
        remaining: g("shutdown_guard_vmis_remaining", ""),
        drains: g(
            "shutdown_guard_drain_duration_seconds_count",
            "outcome=\"empty\"",
        ),
    }
}

/// A real power-off drain, watched from outside: `/metrics` scraped throughout shows the counts
/// moving and ending right, `/readyz` flips when the lock goes, the Node's condition goes
/// Ready → LockLost (logind restarted) → Ready → Draining → Drained, the Events come in order,
/// and `status` tells the outcome.
/// A second delay lock (a stand-in for any slow program) keeps node-1 up after our release so
/// the agent can still be asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_condition_events_and_status_during_a_real_drain() {
    let bed = start_bed(BedOptions {
        vms: "live=3,none=1,stuck=1".parse().unwrap(),
        logind: LogindKind::Systemd,
        inhibit_delay_max_secs: Some(60),
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs(2),
            shutdown_duration: Duration::from_secs(1),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await;
    let client = bed.client();
    let conditions = watch_condition(client.clone());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::spawn(&bed, &["--listen-address", &addr]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    wait_http(port, "/healthz", 200, Duration::from_secs(10)).await;
    wait_http(port, "/readyz", 200, Duration::from_secs(10)).await;
    let before = wait_http(port, "/metrics", 200, Duration::from_secs(5)).await;
    assert!(before.ends_with("# EOF\n"), "OpenMetrics text");
    let c0 = counts(&before);
    assert_eq!(
        (c0.lock, c0.draining, c0.migrated, c0.stopped),
        (1.0, 0.0, 0.0, 0.0)
    );
    assert_eq!(
        sample(&before, "shutdown_guard_inhibit_delay_max_seconds", ""),
        Some(60.0)
    );

    // The condition is written by the agent's report queue a moment after the lock.
    let end_t = Instant::now() + Duration::from_secs(10);
    while conditions.lock().unwrap().last().map(String::as_str) != Some("Ready") {
        assert!(Instant::now() < end_t, "condition never Ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kc = bed.kubeconfig_path().to_path_buf();
    let st = on_machine(&kc, &["status", "--node", NODE, "--agent", &addr]).await;
    assert_eq!(st.code, 0);
    assert!(
        st.stdout.contains("LOCK           held (from the agent)"),
        "{}",
        st.stdout
    );
    assert!(
        st.stdout.contains("ShutdownGuard=True Ready"),
        "{}",
        st.stdout
    );

    // logind restarted while idle: the lock comes back and is counted as a reconnect.
    bed.logind
        .read()
        .await
        .systemd_ref()
        .expect("systemd")
        .systemctl(&["restart", "systemd-logind.service"])
        .await
        .expect("logind restarts");
    let end_t = Instant::now() + Duration::from_secs(10);
    loop {
        let m = wait_http(port, "/metrics", 200, Duration::from_secs(5)).await;
        if sample(&m, "shutdown_guard_logind_reconnects_total", "") == Some(1.0)
            && sample(&m, "shutdown_guard_lock_held", "") == Some(1.0)
        {
            break;
        }
        assert!(
            Instant::now() < end_t,
            "no reconnect counted 10 s after restarting logind:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_lock(&bed, &agent, Duration::from_secs(5)).await;

    let holdup = hold_delay_lock(&bed, "holdup", "keeps node-1 up after the agent's release").await;
    let requested = now();
    bed.poweroff().await.expect("power-off starts");

    // Scrape until the drain is over; /status shows each VMI's state meanwhile.
    let mut samples: Vec<(f64, Counts)> = Vec::new();
    let mut states_seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let t0 = Instant::now();
    let last = loop {
        let (code, text) = http_get(port, "/metrics").await.expect("/metrics answers");
        assert_eq!(code, 200);
        let c = counts(&text);
        samples.push((t0.elapsed().as_secs_f64(), c));
        if let Ok(s) = shutdown_guard::cli::status::fetch_agent(&addr).await
            && s.phase == "draining"
            && let Some(d) = s.drain
        {
            for v in d.vmis {
                let seen = states_seen.entry(v.vmi).or_default();
                let label = v.state.label().to_string();
                if seen.last() != Some(&label) {
                    seen.push(label);
                }
            }
        }
        if c.drains == 1.0 {
            break text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "drain not over after 60 s; agent log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let released = observe_release(&bed, Duration::from_secs(5))
        .await
        .expect("our lock is gone");
    let end = counts(&last);
    eprintln!(
        "{} scrapes over {:.1} s",
        samples.len(),
        t0.elapsed().as_secs_f64()
    );
    let mut shown = Counts::default();
    for (t, c) in &samples {
        if (c.migrated, c.stopped, c.remaining) != (shown.migrated, shown.stopped, shown.remaining)
        {
            eprintln!(
                "  +{t:5.2}s migrated={} stopped={} remaining={} draining={} lock={}",
                c.migrated, c.stopped, c.remaining, c.draining, c.lock
            );
            shown = *c;
        }
    }
    eprintln!("per-VMI states seen on /status during the drain: {states_seen:?}");
    assert!(
        states_seen
            .get("default/live-3")
            .is_some_and(|s| s.iter().any(|x| x == "migrating")),
        "/status never showed live-3 migrating: {states_seen:?}"
    );
    // Counts only go up, and pass through intermediate values (they move during the drain).
    for w in samples.windows(2) {
        assert!(w[1].1.migrated >= w[0].1.migrated && w[1].1.stopped >= w[0].1.stopped);
    }
    assert!(
        samples
            .iter()
            .any(|(_, c)| c.draining == 1.0 && c.remaining > 0.0 && c.remaining < 5.0),
        "no scrape caught the drain half-way: {samples:?}"
    );
    assert!(
        samples
            .iter()
            .any(|(_, c)| c.migrated > 0.0 && c.migrated < 3.0),
        "migrations not seen one by one: {samples:?}"
    );
    assert_eq!(
        (
            end.migrated,
            end.stopped,
            end.remaining,
            end.draining,
            end.lock
        ),
        (3.0, 2.0, 0.0, 0.0, 0.0),
        "final counts"
    );
    let shutdowns: f64 = last
        .lines()
        .filter(|l| l.starts_with("shutdown_guard_shutdowns_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(shutdowns, 1.0, "one shutdown counted:\n{last}");
    assert!(
        sample(
            &last,
            "shutdown_guard_evictions_total",
            "outcome=\"evacuating\""
        )
        .unwrap_or(0.0)
            >= 3.0
    );
    assert_eq!(
        sample(
            &last,
            "shutdown_guard_evictions_total",
            "outcome=\"evicted\""
        ),
        Some(1.0),
        "the None VM's eviction was allowed"
    );
    assert_eq!(
        sample(
            &last,
            "shutdown_guard_evictions_total",
            "outcome=\"not_migratable\""
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&last, "shutdown_guard_deadline_reached_total", ""),
        Some(0.0)
    );
    let drain_s = sample(
        &last,
        "shutdown_guard_drain_duration_seconds_sum",
        "outcome=\"empty\"",
    )
    .unwrap();
    eprintln!(
        "drain took {drain_s:.2} s (agent's histogram); lock gone {:.2} s after the power-off request",
        testbed::timeline::secs_between(requested, released.gone)
    );

    // Not ready once the lock is gone; still healthy.
    let why = wait_http(port, "/readyz", 503, Duration::from_secs(5)).await;
    assert!(why.contains("lock is not held"), "{why}");
    wait_http(port, "/healthz", 200, Duration::from_secs(2)).await;

    // The condition went Ready → Draining → Drained.
    let end_t = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = conditions.lock().unwrap().clone();
        if seen.last().map(String::as_str) == Some("Drained") {
            assert_eq!(
                seen,
                ["Ready", "LockLost", "Ready", "Draining", "Drained"],
                "condition order"
            );
            break;
        }
        assert!(Instant::now() < end_t, "condition never Drained: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Events, in the order the agent wrote them (events.k8s.io eventTime).
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
    let end_t = Instant::now() + Duration::from_secs(10);
    let node_events = loop {
        let list = events.list(&ListParams::default()).await.expect("events");
        let mut ours: Vec<_> = list
            .items
            .iter()
            .filter(|e| e.reporting_controller.as_deref() == Some("shutdown-guard"))
            .collect();
        ours.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
        let node_events: Vec<(String, String)> = ours
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Node"))
            .map(|e| {
                (
                    e.reason.clone().unwrap_or_default(),
                    e.type_.clone().unwrap_or_default(),
                )
            })
            .collect();
        let on_vmi = ours.iter().any(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("stuck-1")
                && e.reason.as_deref() == Some("VMIStoppedForShutdown")
        });
        if on_vmi && node_events.iter().any(|(r, _)| r == "ShutdownLockReleased") {
            break node_events;
        }
        assert!(Instant::now() < end_t, "events incomplete: {node_events:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("node events in order: {node_events:?}");
    let pos = |r: &str| {
        node_events
            .iter()
            .position(|(x, _)| x == r)
            .unwrap_or_else(|| panic!("no {r} event: {node_events:?}"))
    };
    assert!(pos("DrainStarted") < pos("VMIStoppedForShutdown"));
    assert!(pos("VMIStoppedForShutdown") < pos("ShutdownLockReleased"));
    assert_eq!(node_events[pos("VMIStoppedForShutdown")].1, "Warning");

    // status: the last shutdown and its outcome, from the Node and from the agent.
    let st = on_machine(
        &kc,
        &[
            "status", "--node", NODE, "--agent", &addr, "--output", "json",
        ],
    )
    .await;
    assert_eq!(st.code, 0);
    let s: serde_json::Value = serde_json::from_str(&st.stdout).expect("status JSON");
    assert_eq!(s["lock_held"], false);
    assert_eq!(s["lock_source"], "agent");
    assert_eq!(s["condition"]["reason"], "Drained");
    assert_eq!(s["last_shutdown"]["outcome"], "empty");
    assert_eq!(s["last_shutdown"]["migrated"], 3);
    assert_eq!(s["last_shutdown"]["stopped"], 2);
    assert!(
        s["cordoned_by"]
            .as_str()
            .unwrap()
            .contains("shutdown-guard agent")
    );
    let per_vmi: BTreeMap<String, String> = s["agent"]["drain"]["vmis"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["vmi"].as_str().unwrap().into(),
                v["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(per_vmi["default/live-1"], "migrated");
    assert_eq!(per_vmi["default/none-1"], "stopped");
    assert_eq!(per_vmi["default/stuck-1"], "stopped");
    let text = on_machine(&kc, &["status", "--node", NODE, "--agent", &addr]).await;
    assert!(text.stdout.contains("LAST SHUTDOWN"), "{}", text.stdout);
    assert!(text.stdout.contains(": empty after"), "{}", text.stdout);

    // Let the shutdown go on.
    drop(holdup);
    bed.wait_poweroff(Duration::from_secs(60))
        .await
        .expect("node-1 powers off");
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

/// `drain --dry-run` says what would happen and why and writes nothing (the audit log has no
/// write by its user, the Node's spec and the VMIs are unchanged); `drain` then empties the node
/// with a per-VMI progress display; `uncordon` lifts only our own cordon unless `--force`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_on_demand_dry_run_changes_nothing_and_uncordon_is_careful() {
    let bed = start_bed(BedOptions {
        vms: "live=2,none=1".parse().unwrap(),
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs(2),
            shutdown_duration: Duration::from_secs(1),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await;
    let client = bed.client();
    let operator = bed
        .control_plane
        .user_kubeconfig("drain-operator", "drain-operator", &["system:masters"])
        .expect("operator kubeconfig");
    let nodes: Api<Node> = Api::all(client.clone());
    let vmis: Api<DynamicObject> =
        Api::all_with(client.clone(), &shutdown_guard::kube::vmi_resource());
    let vmi_versions = |l: kube::core::ObjectList<DynamicObject>| -> BTreeMap<String, String> {
        l.items
            .into_iter()
            .map(|o| {
                (
                    o.metadata.name.unwrap(),
                    o.metadata.resource_version.unwrap(),
                )
            })
            .collect()
    };
    let node_before = nodes.get(NODE).await.unwrap();
    let vmis_before = vmi_versions(vmis.list(&ListParams::default()).await.unwrap());

    let dry = on_machine(&operator, &["drain", "--node", NODE, "--dry-run"]).await;
    assert_eq!(dry.code, 0);
    let row = |obj: &str| {
        dry.stdout
            .lines()
            .find(|l| l.starts_with(obj))
            .unwrap_or_else(|| panic!("no row for {obj}:\n{}", dry.stdout))
            .to_string()
    };
    assert!(row("node/node-1").contains("cordon"));
    assert!(row("vmi/default/live-1").contains("migrate"));
    assert!(
        row("vmi/default/none-1").contains("stop") && row("vmi/default/none-1").contains("None")
    );
    assert!(
        dry.stdout
            .lines()
            .filter(|l| l.contains("virt-launcher") && l.contains("evict"))
            .count()
            == 3
    );

    let writes: Vec<_> = audit(&bed)
        .into_iter()
        .filter(|e| e.user == "drain-operator")
        .collect();
    assert!(
        !writes.is_empty(),
        "the dry run's reads are in the audit log"
    );
    let bad: Vec<_> = writes
        .iter()
        .filter(|e| !matches!(e.verb.as_str(), "get" | "list" | "watch"))
        .map(|e| format!("{} {}/{} {}", e.verb, e.resource, e.subresource, e.name))
        .collect();
    assert!(bad.is_empty(), "the dry run wrote: {bad:?}");
    let node_after = nodes.get(NODE).await.unwrap();
    assert_eq!(node_before.spec, node_after.spec, "node spec unchanged");
    assert_eq!(
        node_before.metadata.annotations,
        node_after.metadata.annotations
    );
    assert_eq!(
        vmis_before,
        vmi_versions(vmis.list(&ListParams::default()).await.unwrap()),
        "VMI resourceVersions unchanged"
    );

    let run = on_machine(&operator, &["drain", "--node", NODE, "--timeout", "60s"]).await;
    assert_eq!(run.code, 0, "drained");
    for vmi in ["default/live-1", "default/live-2"] {
        let states: Vec<&str> = run
            .stdout
            .lines()
            .filter(|l| l.starts_with('[') && l.contains(vmi))
            .collect();
        assert!(
            states.iter().any(|l| l.contains("migrating")),
            "{vmi} never shown migrating:\n{}",
            run.stdout
        );
        assert!(
            states.last().unwrap().contains("migrated → node-"),
            "{states:?}"
        );
    }
    assert!(run.stdout.contains("drained in"), "{}", run.stdout);
    let on_node_1: Vec<String> = vmis
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(shutdown_guard::kube::objects::vmi_info)
        .filter(|v| v.runs_on(NODE))
        .map(|v| v.key.to_string())
        .collect();
    assert!(on_node_1.is_empty(), "still on node-1: {on_node_1:?}");
    let n = nodes.get(NODE).await.unwrap();
    assert_eq!(n.spec.as_ref().unwrap().unschedulable, Some(true));
    assert!(
        n.metadata
            .annotations
            .unwrap()
            .contains_key(shutdown_guard::kube::cordon::DRAIN_ANNOTATION)
    );

    let json_dry = on_machine(
        &operator,
        &["drain", "--node", NODE, "--dry-run", "-o", "json"],
    )
    .await;
    assert_eq!(json_dry.code, 0);
    let j: serde_json::Value = serde_json::from_str(&json_dry.stdout).unwrap();
    assert_eq!(j["plan"][0]["action"], "leave", "already cordoned");

    // Our cordon goes; an administrator's stays unless --force.
    let un = on_machine(&operator, &["uncordon", "--node", NODE]).await;
    assert_eq!(un.code, 0);
    assert!(un.stdout.contains("cordoned by shutdown-guard drain"));
    assert_ne!(
        nodes.get(NODE).await.unwrap().spec.unwrap().unschedulable,
        Some(true)
    );
    nodes
        .patch(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    let refused = on_machine(&operator, &["uncordon", "--node", NODE]).await;
    assert_eq!(refused.code, 1);
    assert!(
        refused
            .stderr
            .contains("not cordoned by shutdown-guard; use --force")
    );
    assert_eq!(
        nodes.get(NODE).await.unwrap().spec.unwrap().unschedulable,
        Some(true)
    );
    let forced = on_machine(&operator, &["uncordon", "--node", NODE, "--force"]).await;
    assert_eq!(forced.code, 0);
    assert_ne!(
        nodes.get(NODE).await.unwrap().spec.unwrap().unschedulable,
        Some(true)
    );

    bed.shutdown().await.expect("teardown");
}

/// The agent's Events on node-1 with `reason`, oldest first.
async fn node_events_with(client: &Client, reason: &str) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
    let list = events.list(&ListParams::default()).await.expect("events");
    let mut ours: Vec<_> = list
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("shutdown-guard"))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(NODE))
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect();
    ours.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    ours.into_iter().filter_map(|e| e.note).collect()
}

/// Waits (10 s at most) for the agent's Events on node-1 with `reason`; their notes.
async fn wait_node_events(client: &Client, reason: &str) -> Vec<String> {
    testbed::wait::until(
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async {
            let e = node_events_with(client, reason).await;
            (!e.is_empty()).then_some(e)
        },
    )
    .await
    .unwrap_or_else(|| panic!("no {reason} Event on node-1"))
}

/// `shutdown -r +10` as logind takes it, then `shutdown -c`: the agent's `/status`, metric
/// and Events follow both, read from logind's `ScheduledShutdown` (announced by systemd 257,
/// read every 10 s on 252 and elogind, which announce nothing), and nothing is drained.
async fn a_scheduled_reboot_is_reported_and_its_cancel_too(logind: LogindKind) {
    use testbed::logind::schedule::{
        cancel_scheduled_shutdown, schedule_shutdown, scheduled_shutdown,
    };
    let bed = start_bed(BedOptions {
        logind,
        ..BedOptions::default()
    })
    .await;
    let client = bed.client();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::spawn(&bed, &["--listen-address", &addr]).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    wait_http(port, "/healthz", 200, Duration::from_secs(10)).await;

    // Whole seconds, as `shutdown -r HH:MM` gives, so /status's RFC 3339 time shows it exactly.
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let at = std::time::UNIX_EPOCH + Duration::from_secs(now_s + 600);
    let at_text = humantime::format_rfc3339_seconds(at).to_string();
    {
        let node = bed.node(NODE).unwrap();
        let guard = node.logind().read().await;
        schedule_shutdown(&guard, "reboot", at)
            .await
            .expect("logind schedules the reboot");
        assert_eq!(
            scheduled_shutdown(&guard).await.unwrap(),
            ("reboot".to_owned(), (now_s + 600) * 1_000_000),
            "logind's own record of the schedule"
        );
    }
    let scheduled =
        testbed::wait::until(Duration::from_secs(30), Duration::from_millis(200), || {
            let addr = addr.clone();
            async move {
                let s = shutdown_guard::cli::status::fetch_agent(&addr).await.ok()?;
                s.scheduled_shutdown
            }
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "/status never showed the scheduled reboot; agent log:\n{}",
                agent.log_text()
            )
        });
    assert_eq!(scheduled.r#type, "reboot");
    assert_eq!(scheduled.at, at_text, "the time logind has");
    let metrics = wait_http(port, "/metrics", 200, Duration::from_secs(5)).await;
    assert_eq!(
        sample(
            &metrics,
            "shutdown_guard_scheduled_shutdown_timestamp_seconds",
            ""
        ),
        Some((now_s + 600) as f64)
    );
    let kc = bed.kubeconfig_path().to_path_buf();
    let st = on_machine(&kc, &["status", "--node", NODE, "--agent", &addr]).await;
    assert!(
        st.stdout.contains(&format!("reboot at {at_text} (logind)")),
        "{}",
        st.stdout
    );
    let noted = wait_node_events(&client, "ShutdownScheduled").await;
    assert!(
        noted[0].contains("reboot") && noted[0].contains(&at_text),
        "{noted:?}"
    );

    {
        let node = bed.node(NODE).unwrap();
        let guard = node.logind().read().await;
        assert!(
            cancel_scheduled_shutdown(&guard)
                .await
                .expect("shutdown -c")
        );
        assert_eq!(
            scheduled_shutdown(&guard).await.unwrap().0,
            "",
            "logind cancelled it"
        );
    }
    let gone = testbed::wait::until(Duration::from_secs(30), Duration::from_millis(200), || {
        let addr = addr.clone();
        async move {
            let s = shutdown_guard::cli::status::fetch_agent(&addr).await.ok()?;
            s.scheduled_shutdown.is_none().then_some(())
        }
    })
    .await;
    assert!(gone.is_some(), "/status still shows the cancelled reboot");
    let metrics = wait_http(port, "/metrics", 200, Duration::from_secs(5)).await;
    assert_eq!(
        sample(
            &metrics,
            "shutdown_guard_scheduled_shutdown_timestamp_seconds",
            ""
        ),
        Some(0.0)
    );
    let gone_events = wait_node_events(&client, "ScheduledShutdownGone").await;
    assert!(gone_events[0].contains(&at_text), "{gone_events:?}");

    // A schedule is not a shutdown: the lock is still held and nothing was drained.
    let node: Node = Api::<Node>::all(client.clone()).get(NODE).await.unwrap();
    assert_ne!(
        node.spec.and_then(|s| s.unschedulable),
        Some(true),
        "node-1 was cordoned for a schedule"
    );
    let status = shutdown_guard::cli::status::fetch_agent(&addr)
        .await
        .unwrap();
    assert!(status.lock_held, "the lock went with the schedule");
    drop(agent);
    bed.shutdown().await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduled_reboot_is_reported_and_its_cancel_too_systemd_257() {
    a_scheduled_reboot_is_reported_and_its_cancel_too(LogindKind::Systemd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduled_reboot_is_reported_and_its_cancel_too_systemd_252() {
    a_scheduled_reboot_is_reported_and_its_cancel_too(LogindKind::SystemdBookworm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduled_reboot_is_reported_and_its_cancel_too_elogind() {
    a_scheduled_reboot_is_reported_and_its_cancel_too(LogindKind::Elogind).await;
}
