//! `testbed demo`: shutdown-guard guarding node-1 through a real power-off, shown to a person.
//!
//! Builds what is missing (control-plane binaries, the node's root filesystem, the agent),
//! starts the bed with VMs of mixed eviction strategies, runs the agent as a pod on node-1,
//! powers node-1 off, prints each VMI's progress while it happens, and ends with a timeline
//! drawn from what the cluster and logind saw.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};

use crate::bed::{Bed, BedOptions, LogindKind, NODE};
use crate::kubevirt::{KubeVirtOptions, VmSpec};
use crate::timeline::{Change, Recorder, audit_evictions, secs_between};

#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// VMIs on node-1 (kinds: live, none, stuck, ifpossible, external).
    #[arg(long, default_value = "live=3,none=1,stuck=1")]
    pub vms: VmSpec,
    /// node-1's logind: systemd, systemd-bookworm or elogind.
    #[arg(long, default_value = "systemd")]
    pub logind: LogindKind,
    /// logind's InhibitDelayMaxSec on node-1.
    #[arg(long, default_value_t = 90)]
    pub inhibit_delay_max_sec: u64,
    /// Seconds a simulated live migration takes.
    #[arg(long, default_value_t = 3.0)]
    pub migration_seconds: f64,
    /// Keep the agent's log here (default: a temporary file, printed path).
    #[arg(long)]
    pub agent_log: Option<PathBuf>,
}

/// The agent binary: `TESTBED_AGENT_BIN`, else the workspace's debug build.
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TESTBED_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::paths::workspace_root().join("target"));
    target.join("debug/shutdown-guard")
}

fn assets_present(logind: LogindKind) -> bool {
    let cache = crate::paths::cache_dir();
    let rootfs_ok = match logind {
        LogindKind::Systemd => cache.join("rootfs/trixie.stamp").exists(),
        LogindKind::SystemdBookworm => cache.join("rootfs/bookworm.stamp").exists(),
        LogindKind::SystemdPolkit => cache.join("rootfs/trixie-polkit.stamp").exists(),
        LogindKind::SystemdBullseye => cache.join("rootfs/bullseye.stamp").exists(),
        LogindKind::Elogind => cache.join("elogind.stamp").exists(),
    };
    crate::paths::bin_dir().join("kube-apiserver").is_file() && rootfs_ok
}

fn step(msg: &str) {
    println!("\x1b[1m==> {msg}\x1b[0m");
}

async fn ensure_built(logind: LogindKind) -> Result<PathBuf> {
    if !assets_present(logind) {
        step(
            "building the test bed (first run only: Go control plane, Debian root filesystem, elogind)",
        );
        let status = tokio::process::Command::new(crate::paths::scripts_dir().join("setup.sh"))
            .env(
                "TESTBED_SKIP_BOOKWORM",
                if logind == LogindKind::SystemdBookworm {
                    "0"
                } else {
                    "1"
                },
            )
            .env(
                "TESTBED_SKIP_POLKIT",
                if logind == LogindKind::SystemdPolkit {
                    "0"
                } else {
                    "1"
                },
            )
            .env(
                "TESTBED_SKIP_BULLSEYE",
                if logind == LogindKind::SystemdBullseye {
                    "0"
                } else {
                    "1"
                },
            )
            .status()
            .await
            .context("running tests/testbed/scripts/setup.sh")?;
        if !status.success() {
            bail!("tests/testbed/scripts/setup.sh failed ({status}); its output above says why");
        }
    }
    if std::env::var_os("TESTBED_AGENT_BIN").is_none() {
        step("building shutdown-guard");
        let status =
            tokio::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args([
                    "build",
                    "--quiet",
                    "-p",
                    "shutdown-guard",
                    "--bin",
                    "shutdown-guard",
                ])
                .current_dir(crate::paths::workspace_root())
                .status()
                .await
                .context("running cargo build")?;
        if !status.success() {
            bail!("cargo build -p shutdown-guard failed ({status})");
        }
    }
    let bin = agent_binary();
    if !bin.is_file() {
        bail!(
            "{} is missing: set TESTBED_AGENT_BIN to the agent binary",
            bin.display()
        );
    }
    Ok(bin)
}

/// What a person should read about a VMI right now.
fn vmi_line(changes: &[&Change], state: Option<&(Option<String>, String)>) -> String {
    let mut text = "running on node-1".to_owned();
    for c in changes {
        text = match c {
            Change::EvacuationRequested { .. } => "evacuation requested".into(),
            Change::MigrationCreated { .. } => "migration created".into(),
            Change::MigrationPhase { phase, .. } if phase == "Failed" => "migration failed".into(),
            Change::MigrationPhase { phase, .. } => format!("migrating ({phase})"),
            Change::Migrated { target, .. } => format!("migrated → {target}"),
            Change::Stopped { phase, .. } => format!("stopped ({phase})"),
            _ => continue,
        };
    }
    if let Some((Some(node), phase)) = state
        && node != NODE
        && !text.starts_with("migrated")
    {
        text = format!("{text} [now on {node}, {phase}]");
    }
    text
}

fn vmi_of(change: &Change) -> Option<&str> {
    match change {
        Change::EvacuationRequested { vmi }
        | Change::MigrationCreated { vmi, .. }
        | Change::MigrationPhase { vmi, .. }
        | Change::Migrated { vmi, .. }
        | Change::Stopped { vmi, .. } => Some(vmi),
        _ => None,
    }
}

pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    let agent = ensure_built(args.logind).await?;
    step(&format!(
        "starting the bed: 3 nodes, {} on node-1, logind {:?}, InhibitDelayMaxSec={}",
        format_spec(&args.vms),
        args.logind,
        args.inhibit_delay_max_sec
    ));
    let bed = Bed::start(BedOptions {
        nodes: 3,
        vms: args.vms.clone(),
        logind: args.logind,
        inhibit_delay_max_secs: Some(args.inhibit_delay_max_sec),
        kubevirt: KubeVirtOptions {
            migration_duration: Duration::from_secs_f64(args.migration_seconds.max(0.0)),
            ..KubeVirtOptions::default()
        },
        ..BedOptions::default()
    })
    .await
    .context("starting the bed")?;
    println!("    up in {:.1} s", bed.started_in().as_secs_f64());
    let outcome = demo_on(&bed, &agent, &args).await;
    step("tearing the bed down");
    bed.shutdown().await.context("tearing the bed down")?;
    outcome
}

fn format_spec(spec: &VmSpec) -> String {
    spec.names()
        .iter()
        .map(|(_, n)| n.clone())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn demo_on(bed: &Bed, agent: &Path, args: &DemoArgs) -> Result<ExitCode> {
    let log_path = match &args.agent_log {
        Some(p) => p.clone(),
        None => bed.control_plane.dir().join("shutdown-guard.log"),
    };
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let recorder = Recorder::start(bed.client(), NODE).await;

    step("starting shutdown-guard as a pod on node-1");
    let agent_str = agent.to_string_lossy().into_owned();
    let mut child = bed
        .pod_command(&agent_str, &["run", "--node", NODE, "--log-format", "json"])
        .await
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting shutdown-guard")?;
    let locked = wait_for_lock(bed, Duration::from_secs(30)).await;
    if !locked {
        let _ = child.kill().await;
        bail!(
            "shutdown-guard took no lock within 30 s; its log: {}",
            log_path.display()
        );
    }
    println!(
        "    logind lists the delay lock of shutdown-guard (log: {})",
        log_path.display()
    );

    step("powering node-1 off (systemctl poweroff)");
    let t0 = SystemTime::now();
    bed.poweroff().await.context("starting the power-off")?;

    let limit = Duration::from_secs(args.inhibit_delay_max_sec + 60);
    let release = bed.observe_release("shutdown-guard", limit);
    let wait = async { tokio::join!(release, bed.wait_poweroff(limit)) };
    let mut wait = std::pin::pin!(wait);
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    let began = Instant::now();
    let (released, powered_off) = loop {
        tokio::select! {
            (released, at) = &mut wait => break (released, at.context("waiting for node-1 to power off")?),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        print_progress(&recorder, &mut shown, began);
    };
    print_progress(&recorder, &mut shown, began);
    println!(
        "    node-1 powered off after {:.2} s",
        secs_between(t0, powered_off)
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    let _ = child.kill().await;

    step("timeline (from the API server's watches and audit log, logind and the node's console)");
    let mut rows: Vec<(SystemTime, String)> =
        vec![(t0, "power-off requested (PrepareForShutdown)".into())];
    for s in recorder.changes() {
        let text = match &s.change {
            Change::Cordoned => "node-1 cordoned".to_owned(),
            Change::Uncordoned => "node-1 uncordoned".to_owned(),
            Change::EvacuationRequested { vmi } => {
                format!("{vmi}: KubeVirt marked it for evacuation")
            }
            Change::MigrationCreated { vmi, migration } => {
                format!("{vmi}: migration {migration} created")
            }
            Change::MigrationPhase { vmi, phase, .. } => format!("{vmi}: migration {phase}"),
            Change::Migrated { vmi, target } => format!("{vmi}: migrated to {target}"),
            Change::Stopped { vmi, phase } => format!("{vmi}: stopped ({phase})"),
            Change::PodDeleted { pod } => format!("pod {pod} deleted"),
            Change::NodeWarning { reason, message } => format!("Warning Event {reason}: {message}"),
            Change::Eviction { .. } => continue,
        };
        if s.at >= t0 {
            rows.push((s.at, text));
        }
    }
    for e in audit_evictions(&bed.control_plane) {
        if e.received >= t0 {
            rows.push((
                e.received,
                format!("eviction of {} → HTTP {}", e.pod, e.code),
            ));
        }
    }
    if let Some(r) = released {
        rows.push((
            r.gone,
            "shutdown-guard's lock gone from logind's ListInhibitors".into(),
        ));
    }
    if let Some(at) = agent_release_time(&log_path) {
        rows.push((at, "lock fd closed (agent's own log)".into()));
    }
    rows.push((
        powered_off,
        "node-1 powered off (systemd: Shutting down.)".into(),
    ));
    rows.sort_by_key(|(at, _)| *at);
    for (at, text) in &rows {
        println!("    {:>+8.3} s  {text}", secs_between(t0, *at));
    }
    let left = recorder.vmis_on_node();
    if left.is_empty() {
        println!("\n    every VMI had left node-1 before it powered off");
    } else {
        println!("\n    still on node-1 at power-off: {}", left.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_lock(bed: &Bed, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Ok(list) = bed.list_inhibitors().await
            && list
                .iter()
                .any(|i| i.who == "shutdown-guard" && i.mode == "delay")
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn print_progress(recorder: &Recorder, shown: &mut BTreeMap<String, String>, began: Instant) {
    let changes = recorder.changes();
    let states = recorder.vmi_states();
    let mut per_vmi: BTreeMap<String, Vec<&Change>> = BTreeMap::new();
    for s in &changes {
        if let Some(v) = vmi_of(&s.change) {
            per_vmi.entry(v.to_owned()).or_default().push(&s.change);
        }
    }
    for (vmi, state) in &states {
        let line = vmi_line(
            per_vmi.get(vmi).map(Vec::as_slice).unwrap_or(&[]),
            Some(state),
        );
        if shown.get(vmi) != Some(&line) {
            println!(
                "    {:>6.1} s  {vmi:<24} {line}",
                began.elapsed().as_secs_f64()
            );
            shown.insert(vmi.clone(), line);
        }
    }
}

/// The agent's own "lock released" moment, from its JSON log (shown, never used as proof).
fn agent_release_time(log: &Path) -> Option<SystemTime> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| {
            v.get("message")
                .and_then(|m| m.as_str())
                .is_some_and(|m| m.contains("lock released"))
        })
        .and_then(|v| {
            v.get("timestamp")?
                .as_str()?
                .parse::<chrono::DateTime<chrono::Utc>>()
                .ok()
        })
        .map(Into::into)
}
