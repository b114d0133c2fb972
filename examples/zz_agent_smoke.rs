// TEMPORARY smoke run by the agent helper; deleted after use.
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use testbed::bed::{Bed, BedOptions, LogindKind};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let kind: LogindKind = args.get(1).map(String::as_str).unwrap_or("elogind").parse().map_err(anyhow::Error::msg)?;
    let vms = args.get(2).map(String::as_str).unwrap_or("live=3,none=1").parse()?;
    let delay: u64 = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(30);
    let extra: Vec<&str> = args.iter().skip(4).map(String::as_str).collect();
    let mut opts = BedOptions { vms, logind: kind, inhibit_delay_max_secs: Some(delay), ..Default::default() };
    if let Ok(m) = std::env::var("SMOKE_MIGRATION_S") {
        opts.kubevirt.migration_duration = Duration::from_secs(m.parse()?);
    }
    let t0 = std::time::Instant::now();
    let bed = Bed::start(opts).await?;
    eprintln!("SMOKE bed up in {:?}", t0.elapsed());
    let mode = std::env::var("SMOKE_MODE").unwrap_or_default();
    let nodes: Api<Node> = Api::all(bed.client());
    if mode == "reboot" || mode == "admin" {
        let mut patch = serde_json::json!({"spec": {"unschedulable": true}});
        if mode == "reboot" {
            patch["metadata"] = serde_json::json!({"annotations": {"shutdown-guard.kubevirt.io/cordoned-boot-id": "old-boot"}});
        }
        nodes.patch("node-1", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await?;
    }
    if mode == "all" {
        use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
        use k8s_openapi::api::core::v1::Pod;
        let pp = kube::api::PostParams::default();
        let ctr = serde_json::json!([{"name": "c", "image": "busybox"}]);
        let dep: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"nodeName": "node-1", "containers": ctr}}}}))?;
        Api::<Deployment>::namespaced(bed.client(), "default").create(&pp, &dep).await?;
        let bare: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "bare", "namespace": "default"},
            "spec": {"nodeName": "node-1", "containers": ctr}}))?;
        Api::<Pod>::namespaced(bed.client(), "default").create(&pp, &bare).await?;
        let ds: DaemonSet = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "agentds", "namespace": "default"},
            "spec": {"selector": {"matchLabels": {"app": "ds"}},
                     "template": {"metadata": {"labels": {"app": "ds"}}, "spec": {"containers": ctr}}}}))?;
        Api::<DaemonSet>::namespaced(bed.client(), "default").create(&pp, &ds).await?;
        for _ in 0..100 {
            let pods = Api::<Pod>::all(bed.client()).list(&kube::api::ListParams::default().fields("spec.nodeName=node-1")).await?;
            let running = pods.items.iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")).count();
            if running >= 4 + 1 { eprintln!("SMOKE pods on node-1: {:?}", pods.items.iter().map(|p| p.metadata.name.clone().unwrap()).collect::<Vec<_>>()); break; }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let bin = concat!(env!("CARGO_MANIFEST_DIR"), "/target/debug/shutdown-guard");
    let mut a = vec!["run", "--node", "node-1", "--log-format", "json"];
    a.extend(extra);
    let merged;
    if mode == "dropin" {
        merged = bed.logind.read().await.systemd_ref().unwrap().state_dir().join("merged").display().to_string();
        a.extend(["--write-logind-dropin", "--host-root", merged.as_str(), "--drain-budget", "60s"]);
    }
    let mut cmd = bed.pod_command(bin, &a).await;
    cmd.stderr(Stdio::piped()).stdout(Stdio::null()).kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let stderr = child.stderr.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            eprintln!("AGENT {l}");
            let _ = tx.send(l);
        }
    });
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(l) = rx.recv().await {
            if l.contains("\"lock taken\"") { break; }
        }
    }).await?;
    eprintln!("SMOKE inhibitors: {:?}", bed.list_inhibitors().await?);
    if mode == "dropin" {
        tokio::time::sleep(Duration::from_secs(3)).await;
        eprintln!("SMOKE delay now {:?}", bed.logind.read().await.inhibit_delay_max().await?);
    }
    if mode == "restart" {
        for round in 0..1 {
            let t = std::time::Instant::now();
            let unit = std::env::var("SMOKE_UNIT").unwrap_or("systemd-logind".into());
            bed.logind.read().await.systemd_ref().unwrap().systemctl(&["restart", &unit]).await?;
            let restarted = t.elapsed();
            loop {
                let inh = bed.list_inhibitors().await.unwrap_or_default();
                if inh.iter().any(|i| i.who == "shutdown-guard") { break; }
                if t.elapsed() > Duration::from_secs(12) {
                    eprintln!("SMOKE lock NOT back");
                    let l = bed.logind.read().await;
                    let sd = l.systemd_ref().unwrap();
                    for line in std::fs::read_to_string(sd.console_log_path()).unwrap_or_default().lines().rev().take(40).collect::<Vec<_>>().into_iter().rev() { eprintln!("CONSOLE {line}"); }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            eprintln!("SMOKE round {round}: restart cmd took {restarted:?}; lock back after {:?} from restart request", t.elapsed());
        }
    }
    if mode == "reboot" || mode == "admin" {
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(l) = rx.recv().await {
                if l.contains("node cordon") || l.contains("uncordoned") { break; }
            }
        }).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = nodes.get("node-1").await?;
        eprintln!("SMOKE after start: unschedulable={:?} annotations={:?}", n.spec.and_then(|s| s.unschedulable), n.metadata.annotations);
        let mut agent_pid = None;
        for e in std::fs::read_dir("/proc")?.flatten() {
            if let Ok(exe) = std::fs::read_link(e.path().join("exe")) {
                if exe.to_string_lossy().ends_with("target/debug/shutdown-guard") {
                    agent_pid = e.file_name().to_string_lossy().parse::<i32>().ok();
                }
            }
        }
        let pid = agent_pid.expect("agent pid");
        let t = std::time::Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM)?;
        let st = tokio::time::timeout(Duration::from_secs(5), child.wait()).await??;
        eprintln!("SMOKE SIGTERM idle to agent pid {pid}: wrapper exited {st:?} after {:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
        bed.shutdown().await?;
        return Ok(());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = SystemTime::now();
    bed.poweroff().await?;
    if mode == "termdrain" {
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(l) = rx.recv().await {
                if l.contains("\"eviction\"") { break; }
            }
        }).await?;
        let mut agent_pid = None;
        for e in std::fs::read_dir("/proc")?.flatten() {
            if let Ok(exe) = std::fs::read_link(e.path().join("exe")) {
                if exe.to_string_lossy().ends_with("target/debug/shutdown-guard") {
                    agent_pid = e.file_name().to_string_lossy().parse::<i32>().ok();
                }
            }
        }
        eprintln!("SMOKE SIGTERM during drain at {}", humantime::format_rfc3339_micros(SystemTime::now()));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent_pid.unwrap()), nix::sys::signal::Signal::SIGTERM)?;
    }
    let off = bed.wait_poweroff(Duration::from_secs(90)).await?;
    eprintln!("SMOKE poweroff {:?} after request; at {}", off.duration_since(t), humantime::format_rfc3339_micros(off));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = Api::<Node>::all(bed.client()).get("node-1").await?;
    {
        use k8s_openapi::api::core::v1::Pod;
        let pods = Api::<Pod>::all(bed.client()).list(&kube::api::ListParams::default().fields("spec.nodeName=node-1")).await?;
        eprintln!("SMOKE pods left on node-1: {:?}", pods.items.iter().map(|p| (p.metadata.name.clone().unwrap(), p.status.as_ref().and_then(|s| s.phase.clone()))).collect::<Vec<_>>());
    }
    eprintln!("SMOKE node-1 unschedulable={:?} annotations={:?}", n.spec.and_then(|s| s.unschedulable), n.metadata.annotations);
    let _ = child.kill().await;
    bed.shutdown().await?;
    Ok(())
}
