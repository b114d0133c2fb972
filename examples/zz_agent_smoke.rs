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
    let opts = BedOptions { vms, logind: kind, inhibit_delay_max_secs: Some(delay), ..Default::default() };
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
    let bin = concat!(env!("CARGO_MANIFEST_DIR"), "/target/debug/shutdown-guard");
    let mut a = vec!["run", "--node", "node-1", "--log-format", "json"];
    a.extend(extra);
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
    if mode == "reboot" || mode == "admin" {
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(l) = rx.recv().await {
                if l.contains("node cordon") || l.contains("uncordoned") { break; }
            }
        }).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = nodes.get("node-1").await?;
        eprintln!("SMOKE after start: unschedulable={:?} annotations={:?}", n.spec.and_then(|s| s.unschedulable), n.metadata.annotations);
        let t = std::time::Instant::now();
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
    let off = bed.wait_poweroff(Duration::from_secs(90)).await?;
    eprintln!("SMOKE poweroff {:?} after request; at {}", off.duration_since(t), humantime::format_rfc3339_micros(off));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = Api::<Node>::all(bed.client()).get("node-1").await?;
    eprintln!("SMOKE node-1 unschedulable={:?} annotations={:?}", n.spec.and_then(|s| s.unschedulable), n.metadata.annotations);
    let _ = child.kill().await;
    bed.shutdown().await?;
    Ok(())
}
