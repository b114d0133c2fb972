//! `shutdown-guard status --all-nodes` on a three-node bed, each node with its own real logind
//! and agent: node-1 (systemd's logind) mid-drain after a power-off, node-2 and node-3 (elogind)
//! guarded. The view shows node-1 draining and the other two guarded, with the VMIs that would
//! not migrate, in text, in JSON and through kubectl as a plugin.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::tools::run;
use common::{AGENT, Agent, start_bed, wait_for_lock};
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use serde_json::Value;
use testbed::bed::{Bed, BedOptions, NODE};
use testbed::kubevirt::KubeVirtOptions;
use testbed::logind::{Elogind, ElogindOptions, LogindNode};

/// A port nobody listens on right now, for an agent's admin server.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The agent of `node`, as a pod of that node's own logind.
fn agent_on(bed: &Bed, logind: &Elogind, node: &str) -> tokio::process::Child {
    let listen = format!("127.0.0.1:{}", free_port());
    logind
        .pod_command(
            AGENT,
            &[
                "run",
                "--node",
                node,
                "--log-format",
                "json",
                "--listen-address",
                &listen,
            ],
        )
        .env("KUBECONFIG", bed.kubeconfig_path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the agent starts")
}

/// The reason of `node`'s ShutdownGuard condition.
async fn guard_reason(client: &Client, node: &str) -> Option<String> {
    let n = Api::<Node>::all(client.clone()).get(node).await.ok()?;
    n.status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == "ShutdownGuard")?
        .reason
}

async fn wait_reason(client: &Client, node: &str, want: &str) {
    let got = testbed::wait::until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { (guard_reason(client, node).await.as_deref() == Some(want)).then_some(()) },
    )
    .await;
    assert!(
        got.is_some(),
        "{node}'s ShutdownGuard condition is not {want} after 30 s: {:?}",
        guard_reason(client, node).await
    );
}

fn node_of<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["node"] == name))
        .unwrap_or_else(|| panic!("{name} missing from {view:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_all_nodes_shows_the_node_mid_drain_draining_and_the_others_guarded() {
    // Migrations slow enough that node-1 is still draining while the view is taken.
    let bed = start_bed(BedOptions {
        nodes: 3,
        vms: "live=2,stuck=1".parse().unwrap(),
        inhibit_delay_max_secs: Some(180),
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs(90),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await;
    let client = bed.client();
    // A VM that would stop instead of migrating (evictionStrategy None) on a guarded node.
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "team-b"}})).unwrap();
    Api::all(client.clone())
        .create(&Default::default(), &ns)
        .await
        .expect("namespace team-b");
    bed.kubevirt
        .create_vmis("team-b", "node-2", &"none=1".parse().unwrap())
        .await
        .expect("a VMI on node-2");

    let (l2, l3) = tokio::join!(
        Elogind::start(ElogindOptions::default()),
        Elogind::start(ElogindOptions::default())
    );
    let (l2, l3) = (l2.expect("node-2's logind"), l3.expect("node-3's logind"));
    let _a2 = agent_on(&bed, &l2, "node-2");
    let _a3 = agent_on(&bed, &l3, "node-3");
    let port = free_port().to_string();
    let a1 = Agent::spawn(&bed, &["--listen-address", &format!("127.0.0.1:{port}")]).await;
    wait_for_lock(&bed, &a1, Duration::from_secs(30)).await;
    for n in [NODE, "node-2", "node-3"] {
        wait_reason(&client, n, "Ready").await;
    }

    bed.poweroff().await.expect("power-off starts");
    wait_reason(&client, NODE, "Draining").await;

    let kc = bed.kubeconfig_path();
    let status = |json: bool| {
        let mut c = std::process::Command::new(AGENT);
        c.args(["status", "--all-nodes"])
            .env("KUBECONFIG", kc)
            .env_remove("NODE_NAME");
        if json {
            c.args(["-o", "json"]);
        }
        let r = run(&mut c);
        assert!(r.ok, "status --all-nodes failed: {}", r.stderr);
        r.stdout
    };
    let text = status(false);
    eprintln!("$ shutdown-guard status --all-nodes\n{text}");
    let view: Value = serde_json::from_str(&status(true)).expect("JSON");

    let n1 = node_of(&view, NODE);
    assert_eq!(n1["guard"], "draining", "{n1:#}");
    assert_eq!(n1["guarded"], false);
    assert_eq!(n1["lock_held"], true);
    assert_eq!(n1["unschedulable"], true);
    assert!(
        n1["cordoned_by"]
            .as_str()
            .unwrap()
            .starts_with("shutdown-guard agent"),
        "{n1:#}"
    );
    assert_eq!(n1["shutdown"]["outcome"], "draining", "{n1:#}");
    assert_eq!(n1["shutdown"]["type"], "poweroff");
    assert!(
        n1["vmis"].as_u64().unwrap() >= 2,
        "the live VMs are still migrating: {n1:#}"
    );
    for n in ["node-2", "node-3"] {
        let v = node_of(&view, n);
        assert_eq!(
            (&v["guard"], &v["guarded"], &v["lock_held"]),
            (&"guarded".into(), &true.into(), &true.into()),
            "{v:#}"
        );
        assert_eq!(v["unschedulable"], false);
    }
    let n2 = node_of(&view, "node-2");
    let stops: Vec<(&str, &str)> = n2["will_not_migrate"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["vmi"].as_str().unwrap(), v["fate"].as_str().unwrap()))
        .collect();
    assert!(stops.contains(&("team-b/none-1", "stop")), "{n2:#}");
    assert!(
        node_of(&view, "node-3")["will_not_migrate"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    let row = |node: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(node))
            .unwrap_or_else(|| panic!("no row for {node}:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(&row(NODE)[1..3], ["draining", "held"], "{text}");
    assert!(
        row(NODE).join(" ").contains("poweroff draining since"),
        "{text}"
    );
    for n in ["node-2", "node-3"] {
        assert_eq!(&row(n)[1..4], ["guarded", "held", "schedulable"], "{text}");
    }
    assert!(
        text.contains("node-2  team-b/none-1  stop: evictionStrategy None"),
        "{text}"
    );

    // As a kubectl plugin: kubectl runs `kubectl-shutdown_guard` from PATH for `kubectl shutdown-guard`.
    let plugins = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(AGENT, plugins.path().join("kubectl-shutdown_guard")).unwrap();
    let path = format!(
        "{}:{}",
        plugins.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let r = run(std::process::Command::new(Bed::kubectl_path())
        .args(["shutdown-guard", "status", "--all-nodes", "-o", "json"])
        .env("PATH", path)
        .env("KUBECONFIG", kc));
    assert!(r.ok, "kubectl shutdown-guard failed: {}", r.stderr);
    let via_kubectl: Value = serde_json::from_str(&r.stdout).expect("JSON from the plugin");
    for n in [NODE, "node-2", "node-3"] {
        assert_eq!(
            node_of(&via_kubectl, n)["guard"],
            node_of(&view, n)["guard"],
            "{n} through kubectl"
        );
    }

    drop(a1);
    drop((_a2, _a3));
    drop((l2, l3));
    bed.shutdown().await.expect("teardown");
}
