//! `testbed`: start the bed and run a command as a pod on node-1 (`run`), keep it up (`up`),
//! or show shutdown-guard at work (`demo`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use testbed::bed::{Bed, BedOptions, LogindKind};
use testbed::kubevirt::config::parse_quantity;
use testbed::kubevirt::{KubeVirtOptions, KubeVirtVersion, VmSpec};

#[derive(Parser)]
#[command(
    name = "testbed",
    version,
    about = "A real control plane, simulated KubeVirt nodes and a real logind on one machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the bed, run CMD as a pod on node-1, tear down, exit with CMD's status.
    Run {
        #[command(flatten)]
        bed: BedArgs,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Start the bed, print the exports, stay up until interrupted.
    Up {
        #[command(flatten)]
        bed: BedArgs,
    },
    /// Build what is needed, start the bed with mixed VMs, run shutdown-guard for node-1, power
    /// node-1 off and show what happened.
    Demo(testbed::demo::DemoArgs),
    /// Measure shutdown-guard against kubectl drain, its latencies, footprint and API cost;
    /// print a table and write BENCHMARKS.md.
    Bench(testbed::bench::BenchArgs),
}

#[derive(Args, Clone)]
struct BedArgs {
    /// Nodes node-1 … node-N.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// VMIs by kind (live, none, stuck, ifpossible, external), on node-1 unless a group names
    /// its node, with optional memory and options: e.g.
    /// live=4:8Gi,none=1,node-2:live=1/vm=Always (options: vm=RUNSTRATEGY, hotplug, boot=Ns).
    #[arg(long, default_value = "")]
    vms: VmSpec,
    /// Seconds a simulated live migration takes; with --migration-bandwidth its memory copy
    /// takes memory ÷ bandwidth instead of most of this.
    #[arg(long, default_value_t = 2.0)]
    migration_seconds: f64,
    /// Bytes per second each migration copies (e.g. 1Gi): the copy then takes the VMI's
    /// memory divided by this. Default: none, the copy takes --migration-seconds.
    #[arg(long, value_parser = parse_bandwidth)]
    migration_bandwidth: Option<u64>,
    /// The KubeVirt release to simulate: 1.5, 1.6, 1.7 or 1.8.
    #[arg(long, default_value_t = KubeVirtVersion::default())]
    kubevirt: KubeVirtVersion,
    /// Seconds a VMI takes to shut down after its launcher pod is deleted or evicted.
    #[arg(long, default_value_t = 2.0)]
    shutdown_seconds: f64,
    /// node-1's logind: systemd (trixie, 257), systemd-bookworm (252) or elogind (246).
    #[arg(long, default_value = "systemd")]
    logind: LogindKind,
    /// logind's InhibitDelayMaxSec on node-1 (default: logind's own, 5 s).
    #[arg(long)]
    inhibit_delay_max_sec: Option<u64>,
}

impl BedArgs {
    fn options(&self) -> Result<BedOptions> {
        let secs = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                bail!("--{name} {v}: give a number of seconds ≥ 0")
            }
        };
        Ok(BedOptions {
            nodes: self.nodes,
            vms: self.vms.clone(),
            logind: self.logind,
            inhibit_delay_max_secs: self.inhibit_delay_max_sec,
            kubevirt: KubeVirtOptions {
                version: self.kubevirt,
                migration_duration: secs("migration-seconds", self.migration_seconds)?,
                migration_bandwidth: self.migration_bandwidth,
                shutdown_duration: secs("shutdown-seconds", self.shutdown_seconds)?,
                ..KubeVirtOptions::default()
            },
            ..BedOptions::default()
        })
    }
}

fn parse_bandwidth(s: &str) -> Result<u64, String> {
    match parse_quantity(s) {
        Ok(0) => Err("give a bandwidth above 0 (e.g. 1Gi), or leave the flag out".into()),
        Ok(b) => Ok(b),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TESTBED_LOG")
                .unwrap_or_else(|_| "warn,kube_client=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("testbed: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run { bed, cmd } => run_cmd(bed, cmd).await,
        Command::Up { bed } => up(bed).await,
        Command::Demo(args) => testbed::demo::run(args).await,
        Command::Bench(args) => testbed::bench::run(args).await,
    }
}

async fn run_cmd(args: BedArgs, cmd: Vec<String>) -> Result<ExitCode> {
    let bed = Bed::start(args.options()?)
        .await
        .context("starting the bed")?;
    eprintln!(
        "testbed: up in {:.1} s; running {:?} as a pod on node-1",
        bed.started_in().as_secs_f64(),
        cmd
    );
    let rest: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
    let mut child = bed
        .pod_command(&cmd[0], &rest)
        .await
        .spawn()
        .with_context(|| format!("starting {:?}", cmd[0]))?;
    let status = tokio::select! {
        status = child.wait() => status.context("waiting for the command")?,
        _ = interrupted() => {
            let _ = child.kill().await;
            bed.shutdown().await.context("tearing the bed down")?;
            return Ok(ExitCode::from(130));
        }
    };
    bed.shutdown().await.context("tearing the bed down")?;
    Ok(match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::from(128 + 15),
    })
}

async fn up(args: BedArgs) -> Result<ExitCode> {
    let bed = Bed::start(args.options()?)
        .await
        .context("starting the bed")?;
    eprintln!(
        "testbed: up in {:.1} s; Ctrl-C tears it down",
        bed.started_in().as_secs_f64()
    );
    let logind = bed.logind.read().await;
    println!(
        "export DBUS_SYSTEM_BUS_ADDRESS='{}'",
        logind.pod_bus_address()
    );
    drop(logind);
    for (key, value) in bed.pod_env() {
        println!("export {key}='{value}'");
    }
    println!(
        "# a pod on node-1 also runs in node-1's PID namespace; `testbed run` does that for you"
    );
    interrupted().await;
    bed.shutdown().await.context("tearing the bed down")?;
    Ok(ExitCode::SUCCESS)
}

async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
