//! The alert rules (`monitoring/shutdown-guard.rules.yaml`) with a real promtool built from its Go
//! module, against the series an agent really exported during a failed drain on the bed.
//!
//! The failed drain: node-1's logind waits 25 s; the drain (scope `all`) migrates one VM, stops
//! two (evictionStrategy None, and LiveMigrate without migratability), and cannot evict a pod its
//! PodDisruptionBudget protects, so it ends at its deadline. Before it, logind is stopped for a
//! while (the lock is lost); after it the node powers off (the agent's scrapes fail), boots again,
//! and a new agent reports the drain from the Node's record.
//!
//! `/metrics` is scraped through every phase. The scrapes are kept as the fixture
//! `monitoring/tests/failed-drain.om`; `promtool_test` turns them into the promtool test
//! `monitoring/tests/shutdown-guard.rules.test.yaml`: each phase replayed for a set time, sample
//! values as scraped, timestamps moved onto the replay's clock, and per alert the moments it
//! must and must not fire. To capture a new fixture and regenerate the test:
//!
//! ```text
//! REGENERATE_FIXTURES=1 cargo test --test alerts -- --test-threads=1
//! ```

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::tools::{ops_tool, repo, run};
use common::{Agent, hold_delay_lock, start_bed, wait_for_lock};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};
use shutdown_guard::admin::metrics::sample;
use testbed::bed::{BedOptions, NODE};
use testbed::kubevirt::KubeVirtOptions;
use testbed::logind::LogindNode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FIXTURE: &str = "monitoring/tests/failed-drain.om";
const PROMTOOL_TEST: &str = "monitoring/tests/shutdown-guard.rules.test.yaml";
const RULES: &str = "monitoring/shutdown-guard.rules.yaml";
const REGENERATE: &str = "REGENERATE_FIXTURES";

/// The phases of the failed drain in order, and how long the replay gives each (minutes).
const PHASES: &[(&str, u32)] = &[
    ("idle", 20),
    ("lock-lost", 6),
    ("idle-again", 4),
    ("draining", 15),
    ("released", 6),
    ("gone", 15),
    ("back", 20),
];
/// The replay's scrape and rule evaluation interval.
const STEP_S: u32 = 30;
/// The labels a scrape adds (a PodMonitor's job and instance, and the node it relabels in).
const TARGET: [(&str, &str); 3] = [
    ("instance", "node-1:8080"),
    ("job", "shutdown-guard"),
    ("node", "node-1"),
];

/// One scrape of `/metrics`: its phase, when (Unix seconds), whether it answered, and the text.
#[derive(Clone, Debug, PartialEq)]
struct Scrape {
    phase: String,
    unix: f64,
    up: bool,
    text: String,
}

fn format_fixture(scrapes: &[Scrape]) -> String {
    let mut out = String::from(
        "# The /metrics scrapes of one agent through a failed drain on the test bed (tests/alerts.rs).\n\
         # Regenerate: REGENERATE_FIXTURES=1 cargo test --test alerts -- --test-threads=1\n",
    );
    for s in scrapes {
        out.push_str(&format!(
            "# scrape phase={} unix={:.3} up={}\n",
            s.phase, s.unix, s.up as u8
        ));
        for l in s.text.lines().filter(|l| *l != "# EOF") {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

fn parse_fixture(text: &str) -> Vec<Scrape> {
    let mut out: Vec<Scrape> = Vec::new();
    for line in text.lines() {
        if let Some(head) = line.strip_prefix("# scrape ") {
            let field = |k: &str| {
                head.split_whitespace()
                    .find_map(|f| f.strip_prefix(&format!("{k}=")))
                    .unwrap_or_else(|| panic!("{FIXTURE}: no {k} in {line:?}"))
                    .to_string()
            };
            out.push(Scrape {
                phase: field("phase"),
                unix: field("unix").parse().expect("unix time"),
                up: field("up") == "1",
                text: String::new(),
            });
        } else if let Some(s) = out.last_mut() {
            s.text.push_str(line);
            s.text.push('\n');
        }
    }
    out
}

/// `name{labels}` → value for every sample line, with the target labels added.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("a sample line");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut all: Vec<String> = labels
                .split(',')
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect();
            all.extend(TARGET.iter().map(|(k, v)| format!("{k}=\"{v}\"")));
            all.sort();
            (
                format!("{name}{{{}}}", all.join(",")),
                value.parse().expect("a number"),
            )
        })
        .collect()
}

fn target_labels() -> BTreeMap<String, String> {
    TARGET
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Replay seconds at which each phase starts.
fn phase_starts() -> BTreeMap<&'static str, u32> {
    let mut t = 0;
    PHASES
        .iter()
        .map(|(p, min)| {
            let s = (*p, t);
            t += min * 60;
            s
        })
        .collect()
}

fn duration(secs: u32) -> String {
    match (secs / 60, secs % 60) {
        (m, 0) => format!("{m}m"),
        (0, s) => format!("{s}s"),
        (m, s) => format!("{m}m{s}s"),
    }
}

/// promtool's notation for a run of `n` equal values.
fn run_of(token: &str, n: usize) -> String {
    match (token, n) {
        (_, 1) => token.to_string(),
        ("_", n) => format!("_x{n}"),
        (t, n) => format!("{t}x{}", n - 1),
    }
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// The promtool unit test over the replayed scrapes; `rule_file` as the test file names it.
fn promtool_test(scrapes: &[Scrape], rule_file: &str) -> String {
    let starts = phase_starts();
    // Each scrape covers an equal share of its phase's steps.
    let mut per_step: Vec<&Scrape> = Vec::new();
    let mut warp: Vec<(f64, f64)> = Vec::new();
    for (phase, minutes) in PHASES {
        let of: Vec<&Scrape> = scrapes.iter().filter(|s| s.phase == *phase).collect();
        assert!(!of.is_empty(), "{FIXTURE} has no scrape of phase {phase}");
        let steps = (minutes * 60 / STEP_S) as usize;
        assert!(of.len() <= steps, "phase {phase}: more scrapes than steps");
        for (i, s) in of.iter().enumerate() {
            let first = per_step.len();
            warp.push((s.unix, (first as u32 * STEP_S) as f64));
            let n = (i + 1) * steps / of.len() - i * steps / of.len();
            per_step.extend(std::iter::repeat_n(*s, n));
        }
        assert_eq!(per_step.len() as u32 * STEP_S, starts[phase] + minutes * 60);
    }
    // A Unix time as the replay's clock: linear between the scrapes around it.
    let moved = |u: f64| -> f64 {
        let after = warp.iter().position(|(t, _)| *t > u);
        match after {
            Some(0) => warp[0].1 - (warp[0].0 - u),
            None => {
                let (t, r) = warp[warp.len() - 1];
                r + (u - t)
            }
            Some(i) => {
                let ((t0, r0), (t1, r1)) = (warp[i - 1], warp[i]);
                r0 + (u - t0) / (t1 - t0) * (r1 - r0)
            }
        }
        .round()
    };
    let mut series: BTreeMap<String, Vec<Option<f64>>> = BTreeMap::new();
    let steps = per_step.len();
    let up_key = {
        let l: Vec<String> = TARGET.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        format!("up{{{}}}", l.join(","))
    };
    for (i, s) in per_step.iter().enumerate() {
        series
            .entry(up_key.clone())
            .or_insert_with(|| vec![None; steps])[i] = Some(if s.up { 1.0 } else { 0.0 });
        for (key, v) in samples(&s.text) {
            let v = if key.contains("_timestamp_seconds{") {
                moved(v)
            } else {
                v
            };
            series.entry(key).or_insert_with(|| vec![None; steps])[i] = Some(v);
        }
    }
    let mut input = String::new();
    for (key, values) in &series {
        // A series that stops being scraped is marked stale, as Prometheus does.
        let tokens: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Some(v) => number(*v),
                None if i > 0 && values[i - 1].is_some() => "stale".into(),
                None => "_".into(),
            })
            .collect();
        let mut runs: Vec<String> = Vec::new();
        let mut i = 0;
        while i < tokens.len() {
            let mut j = i;
            while j < tokens.len() && tokens[j] == tokens[i] && tokens[i] != "stale" {
                j += 1;
            }
            let j = j.max(i + 1);
            runs.push(run_of(&tokens[i], j - i));
            i = j;
        }
        input.push_str(&format!(
            "      - series: '{key}'\n        values: '{}'\n",
            runs.join(" ")
        ));
    }

    let rules: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo().join(RULES)).unwrap()).unwrap();
    let annotations = |alert: &str, summary: &str| -> Value {
        let rule = rules["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["alert"] == alert)
            .unwrap_or_else(|| panic!("no rule {alert}"));
        json!({
            "summary": summary,
            "description": rule["annotations"]["description"],
            "runbook_url": rule["annotations"]["runbook_url"],
        })
    };
    let labels = |alert: &str, severity: &str, extra: &[(&str, &str)]| -> Value {
        let mut l = target_labels();
        l.insert("alertname".into(), alert.into());
        l.insert("severity".into(), severity.into());
        for (k, v) in extra {
            l.insert(k.to_string(), v.to_string());
        }
        json!(l)
    };
    let at = |phase: &str, minutes: u32| duration(starts[phase] + minutes * 60);
    let firing = |alert: &str, severity: &str, extra: &[(&str, &str)], summary: &str| json!([{"exp_labels": labels(alert, severity, extra), "exp_annotations": annotations(alert, summary)}]);
    let none = json!([]);
    let lock = "ShutdownGuardLockNotHeld";
    let deadline = "ShutdownGuardDrainDeadlineReached";
    let stopped = "ShutdownGuardVMsStopped";
    let delay = "ShutdownGuardInhibitDelayTooShort";
    let ready = "ShutdownGuardAgentNotReady";
    let lock_firing = firing(
        lock,
        "critical",
        &[],
        "shutdown-guard holds no logind lock on node node-1",
    );
    let deadline_firing = firing(
        deadline,
        "warning",
        &[("outcome", "deadline")],
        "The last shutdown drain on node node-1 ran out of time",
    );
    let stopped_firing = firing(
        stopped,
        "warning",
        &[("result", "stopped")],
        "2 VM(s) stopped instead of migrating in the last shutdown of node node-1",
    );
    // (eval time, alert, expected alerts, why)
    let cases: Vec<(String, &str, Value, &str)> = vec![
        (
            at("idle", 16),
            delay,
            firing(
                delay,
                "warning",
                &[],
                "logind on node node-1 waits 25s for shutdown locks, less than a drain needs",
            ),
            "logind waits 25 s, the budget is 5 m",
        ),
        (at("idle", 16), lock, none.clone(), "the lock is held"),
        (at("idle", 16), ready, none.clone(), "the agent answers"),
        (
            at("lock-lost", 1),
            lock,
            none.clone(),
            "lost for less than 2 m",
        ),
        (
            at("lock-lost", 3),
            lock,
            lock_firing,
            "logind stopped: the lock is gone",
        ),
        (
            at("draining", 5),
            lock,
            none.clone(),
            "the lock is held while draining",
        ),
        (
            at("draining", 5),
            deadline,
            none.clone(),
            "no drain has ended yet",
        ),
        (
            at("released", 5),
            lock,
            none.clone(),
            "a drain just released the lock on purpose",
        ),
        (
            at("released", 1),
            deadline,
            deadline_firing.clone(),
            "the drain ended at its deadline",
        ),
        (
            at("released", 1),
            stopped,
            stopped_firing.clone(),
            "two VMs were stopped",
        ),
        (
            at("gone", 11),
            ready,
            firing(
                ready,
                "warning",
                &[],
                "shutdown-guard on node node-1 is not ready",
            ),
            "the agent has not answered for 10 m",
        ),
        (
            at("gone", 11),
            deadline,
            deadline_firing.clone(),
            "kept firing while the node is down",
        ),
        (
            at("back", 2),
            deadline,
            deadline_firing,
            "the agent after the reboot reports the drain from the Node's record",
        ),
        (
            at("back", 2),
            stopped,
            stopped_firing,
            "the agent after the reboot reports the stopped VMs",
        ),
        (
            at("back", 5),
            lock,
            none.clone(),
            "the new agent holds the lock",
        ),
        (at("back", 5), ready, none, "the new agent answers"),
    ];
    let mut tests = String::new();
    for (eval, alert, exp, why) in &cases {
        let exp = serde_yaml::to_string(exp).unwrap();
        let exp = exp
            .lines()
            .map(|l| format!("          {l}"))
            .collect::<Vec<_>>()
            .join("\n");
        tests.push_str(&format!(
            "      # {why}\n      - eval_time: {eval}\n        alertname: {alert}\n        exp_alerts:\n{exp}\n"
        ));
    }
    format!(
        "# Generated by tests/alerts.rs from failed-drain.om, the scrapes of an agent through a failed\n\
         # drain on the test bed; each phase replayed for a set time. Do not edit; regenerate with\n\
         # REGENERATE_FIXTURES=1 cargo test --test alerts -- --test-threads=1\n\
         # Run: promtool test rules monitoring/tests/shutdown-guard.rules.test.yaml\n\
         rule_files:\n  - {rule_file}\nevaluation_interval: {STEP_S}s\ntests:\n  - interval: {STEP_S}s\n    input_series:\n{input}    alert_rule_test:\n{tests}"
    )
}

fn promtool(args: &[&str], file: &Path) -> common::tools::Ran {
    run(Command::new(ops_tool("promtool")).args(args).arg(file))
}

fn regenerating() -> bool {
    std::env::var_os(REGENERATE).is_some_and(|v| !v.is_empty() && v != "0")
}

#[test]
fn rules_check_clean_and_the_committed_alert_tests_pass_on_the_captured_failed_drain() {
    let check = promtool(&["check", "rules"], &repo().join(RULES));
    eprintln!("promtool check rules:\n{}{}", check.stdout, check.stderr);
    assert!(
        check.ok,
        "promtool check rules: {}{}",
        check.stdout, check.stderr
    );
    assert!(
        check.stdout.contains("SUCCESS: 5 rules found"),
        "{}",
        check.stdout
    );

    let fixture = parse_fixture(&std::fs::read_to_string(repo().join(FIXTURE)).unwrap());
    let want = promtool_test(&fixture, "../shutdown-guard.rules.yaml");
    let path = repo().join(PROMTOOL_TEST);
    if regenerating() {
        std::fs::write(&path, &want).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == want,
        "{PROMTOOL_TEST} is not what {FIXTURE} and tests/alerts.rs make: regenerate it with \
         {REGENERATE}=1 cargo test --test alerts -- --test-threads=1"
    );
    let t = promtool(&["test", "rules"], &path);
    eprintln!("promtool test rules:\n{}{}", t.stdout, t.stderr);
    assert!(
        t.ok,
        "promtool test rules failed:\n{}{}",
        t.stdout, t.stderr
    );

    // Every alert has a case where it must fire.
    let rules: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo().join(RULES)).unwrap()).unwrap();
    for r in rules["groups"][0]["rules"].as_array().unwrap() {
        let name = r["alert"].as_str().unwrap();
        assert!(
            want.contains(&format!(
                "alertname: {name}\n        exp_alerts:\n          - exp_"
            )),
            "{name} has no test where it fires"
        );
    }
    // The rules and the dashboard name only series the agent exports.
    let exported: Vec<String> = fixture
        .iter()
        .flat_map(|s| samples(&s.text))
        .map(|(k, _)| k.split('{').next().unwrap().to_string())
        .collect();
    let dashboard =
        std::fs::read_to_string(repo().join("monitoring/shutdown-guard.dashboard.json")).unwrap();
    let rules_text = std::fs::read_to_string(repo().join(RULES)).unwrap();
    for (what, text) in [("rules", &rules_text), ("dashboard", &dashboard)] {
        for name in metric_names(text) {
            assert!(
                exported
                    .iter()
                    .any(|e| e == &name || e.starts_with(&format!("{name}_"))),
                "the {what} name {name}, which the agent does not export"
            );
        }
    }
}

/// Every `shutdown_guard_…` name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .match_indices("shutdown_guard_")
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `GET /metrics` on loopback: the text, or `None` when nothing answers.
async fn get_metrics(port: u16) -> Option<String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.contains(" 200 ").then(|| body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(3), io)
        .await
        .ok()
        .flatten()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

struct Capture {
    port: u16,
    scrapes: Vec<Scrape>,
}

impl Capture {
    async fn scrape(&mut self, phase: &str) -> Option<String> {
        let text = get_metrics(self.port).await;
        self.scrapes.push(Scrape {
            phase: phase.into(),
            unix: unix_now(),
            up: text.is_some(),
            text: text.clone().unwrap_or_default(),
        });
        text
    }

    async fn scrape_n(&mut self, phase: &str, n: usize) {
        for _ in 0..n {
            self.scrape(phase).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Waits (bounded) until the agent's `/metrics` satisfies `ok`.
async fn wait_metrics(port: u16, what: &str, ok: impl Fn(&str) -> bool) -> String {
    testbed::wait::until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { get_metrics(port).await.filter(|t| ok(t)) },
    )
    .await
    .unwrap_or_else(|| panic!("/metrics never showed {what} within 30 s"))
}

fn value(text: &str, name: &str, labels: &str) -> Option<f64> {
    sample(text, name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_drain_on_the_bed_fires_each_alert_from_the_series_the_agent_exports() {
    let bed = start_bed(BedOptions {
        vms: "live=1,none=1,stuck=1".parse().unwrap(),
        inhibit_delay_max_secs: Some(25),
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs(2),
            shutdown_duration: Duration::from_secs(1),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await;
    let client = bed.client();
    // A pod no eviction may take (its budget allows no disruption): the drain runs out of time.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "guarded", "labels": {"app": "guarded"}},
        "spec": {"nodeName": NODE, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
    }))
    .unwrap();
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "guarded"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "guarded"}}}
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod).await.unwrap();
    Api::<PodDisruptionBudget>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pdb)
        .await
        .unwrap();
    let running = testbed::wait::until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let p = pods.get("guarded").await.ok()?;
            (p.status?.phase.as_deref() == Some("Running")).then_some(())
        },
    )
    .await;
    assert!(running.is_some(), "the guarded pod does not run");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--scope", "all", "--listen-address", listen.as_str()];
    let agent = Agent::spawn(&bed, &args).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    wait_metrics(port, "the lock", |t| {
        value(t, "shutdown_guard_lock_held", "") == Some(1.0)
    })
    .await;
    let mut cap = Capture {
        port,
        scrapes: Vec::new(),
    };
    cap.scrape_n("idle", 3).await;

    // logind stopped (and kept from being started by the bus): the lock is lost.
    let systemctl = |args: &'static [&'static str]| {
        let logind = bed.logind.clone();
        async move {
            logind
                .read()
                .await
                .systemd_ref()
                .expect("systemd")
                .systemctl(args)
                .await
                .unwrap_or_else(|e| panic!("systemctl {args:?}: {e}"))
        }
    };
    systemctl(&["mask", "--runtime", "systemd-logind.service"]).await;
    systemctl(&["stop", "systemd-logind.service"]).await;
    wait_metrics(port, "the lock lost", |t| {
        value(t, "shutdown_guard_lock_held", "") == Some(0.0)
    })
    .await;
    cap.scrape_n("lock-lost", 3).await;
    systemctl(&["unmask", "--runtime", "systemd-logind.service"]).await;
    systemctl(&["start", "systemd-logind.service"]).await;
    wait_metrics(port, "the lock back", |t| {
        value(t, "shutdown_guard_lock_held", "") == Some(1.0)
    })
    .await;
    cap.scrape_n("idle-again", 2).await;

    // Another delay lock keeps node-1 up after the agent's release until logind's delay is
    // over, so the released agent can still be scraped.
    let holdup = hold_delay_lock(&bed, "holdup", "keeps node-1 up").await;
    bed.poweroff().await.expect("power-off starts");
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < end,
            "the drain did not end within 60 s; agent log:\n{}",
            agent.log_text()
        );
        let t = cap.scrape("draining").await.unwrap_or_else(|| {
            panic!(
                "the agent stopped answering during the drain; agent log:\n{}",
                agent.log_text()
            )
        });
        if value(&t, "shutdown_guard_deadline_reached_total", "") == Some(1.0) {
            // This scrape already saw the end.
            cap.scrapes.last_mut().unwrap().phase = "released".into();
            break;
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    cap.scrape_n("released", 2).await;
    let released = cap.scrapes.last().unwrap().text.clone();
    assert_eq!(value(&released, "shutdown_guard_lock_held", ""), Some(0.0));
    assert_eq!(
        value(
            &released,
            "shutdown_guard_last_drain_vmis",
            "result=\"stopped\""
        ),
        Some(2.0),
        "{released}"
    );
    assert_eq!(
        value(
            &released,
            "shutdown_guard_last_drain_vmis",
            "result=\"migrated\""
        ),
        Some(1.0)
    );
    assert!(
        value(
            &released,
            "shutdown_guard_last_drain_timestamp_seconds",
            "outcome=\"deadline\""
        )
        .is_some(),
        "{released}"
    );

    // The node goes down with the agent; its scrapes fail.
    drop(holdup);
    bed.wait_poweroff(Duration::from_secs(60))
        .await
        .expect("node-1 powers off");
    let gone = testbed::wait::until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { get_metrics(port).await.is_none().then_some(()) },
    )
    .await;
    assert!(
        gone.is_some(),
        "the agent still answers after the power-off"
    );
    drop(agent);
    cap.scrape_n("gone", 3).await;
    assert!(
        cap.scrapes
            .iter()
            .filter(|s| s.phase == "gone")
            .all(|s| !s.up)
    );

    // The node boots again; a new agent reads the drain's record from the Node.
    let boot_id = {
        let mut logind = bed.logind.write().await;
        let node = logind.systemd().expect("systemd");
        node.wait_exit(Duration::from_secs(60))
            .await
            .expect("node-1 stops");
        node.boot_again().await.expect("node-1 boots again");
        node.set_inhibit_delay_max(25)
            .await
            .expect("InhibitDelayMaxSec");
        node.boot_id()
    };
    bed.kubelet.set_boot_id(NODE, &boot_id).await.unwrap();
    let agent = Agent::spawn(&bed, &args).await;
    wait_for_lock(&bed, &agent, Duration::from_secs(30)).await;
    wait_metrics(port, "the last drain from the Node", |t| {
        value(
            t,
            "shutdown_guard_last_drain_timestamp_seconds",
            "outcome=\"deadline\"",
        )
        .is_some()
            && value(t, "shutdown_guard_lock_held", "") == Some(1.0)
    })
    .await;
    cap.scrape_n("back", 3).await;
    drop(agent);

    let dir = tempfile::tempdir().unwrap();
    let test_file = dir.path().join("alerts.test.yaml");
    let rules = repo().join(RULES);
    std::fs::write(
        &test_file,
        promtool_test(&cap.scrapes, rules.to_str().unwrap()),
    )
    .unwrap();
    let t = promtool(&["test", "rules"], &test_file);
    eprintln!(
        "promtool test rules (this run's scrapes):\n{}{}",
        t.stdout, t.stderr
    );
    if regenerating() {
        std::fs::write(repo().join(FIXTURE), format_fixture(&cap.scrapes)).unwrap();
    }
    assert!(
        t.ok,
        "promtool test rules on this run's scrapes failed:\n{}{}",
        t.stdout, t.stderr
    );
    // The fixture format keeps every scrape as it was.
    assert_eq!(
        parse_fixture(&format_fixture(&cap.scrapes)).len(),
        cap.scrapes.len()
    );
    bed.shutdown().await.expect("teardown");
}
