//! `testbed bench`: what an operator asks of shutdown-guard, measured on the bed and written to
//! BENCHMARKS.md (issue 12).
//!
//! 1. **Outcome**: the same shutdown of a node with N VMIs under logind budgets of 60, 300 and
//!    900 s, met by shutdown-guard, by kubelet's graceful node shutdown, by `kubectl drain` in
//!    a shutdown hook, by the manual procedure and by nothing: VMs migrated, stopped, **lost**
//!    (the ledger), time to an empty node and to power-off ([`outcome`]).
//! 2. **Time to empty against its lower bound** ([`bound`]).
//! 3. **Latencies** of the agent ([`latency`]).
//! 4. **Footprint**: holder and worker together, idle and during a drain; binary and image.
//! 5. **Fleet cost** against one API server ([`fleet`]).
//!
//! One run builds the agent once in the release profile the image ships ([`agent_build`]) and
//! every section uses that binary; the machine's load is recorded before and after each
//! section. Every figure comes from outside the agent: logind's own state (its console, its
//! inhibitor state file), the API server's audit log, watches, the VM ledger, `/proc`.

pub mod agent;
pub mod agent_build;
pub mod audit;
pub mod bound;
pub mod fleet;
pub mod gns;
pub mod hook;
pub mod latency;
pub mod mix;
pub mod outcome;
pub mod procfs;
pub mod report;
pub mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chrono::Utc;

use crate::kubevirt::KubeVirtOptions;
pub use outcome::Tool;
pub use report::Report;

/// The seed's `kubectl drain` flags (after `drain <node>`), for the hook and the manual
/// procedure alike.
pub const KUBECTL_DRAIN_FLAGS: &[&str] = &[
    "--delete-emptydir-data",
    "--ignore-daemonsets",
    "--force",
    "--pod-selector=kubevirt.io=virt-launcher",
];

/// Users the tools authenticate as, so the audit log attributes every request.
pub const AGENT_USER: &str = "bench:shutdown-guard";
pub const KUBECTL_USER: &str = "bench:kubectl";

const GIB: u64 = 1 << 30;

#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Development run: sizes 1,10, budget 60, 5 latency runs, a fleet of 5 and 10 agents with
    /// 20 s windows. Its report says so.
    #[arg(long)]
    pub quick: bool,
    /// VMIs on node-1 per outcome cell (default 1,10,50,200).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Option<Vec<usize>>,
    /// logind budgets (`InhibitDelayMaxSec`), seconds (default 60,300,900).
    #[arg(long, value_delimiter = ',')]
    pub budgets: Option<Vec<u64>>,
    /// Bandwidth of one migration, GiB/s (the bed's network; KubeVirt's own cap stays at its
    /// default, none).
    #[arg(long, default_value_t = 4.0)]
    pub bandwidth_gib: f64,
    /// How long a VM takes to shut down (ACPI) once its launcher gets SIGTERM, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub stop_seconds: f64,
    /// Shutdowns for the latency percentiles (default 20; quick 5).
    #[arg(long)]
    pub latency_runs: Option<usize>,
    /// Seconds the first latency agent stays idle for its footprint (default 60; quick 10).
    #[arg(long)]
    pub idle_seconds: Option<u64>,
    /// Agents in the fleet, one per node (default 50,100,200; quick 5,10).
    #[arg(long, value_delimiter = ',')]
    pub fleet: Option<Vec<usize>>,
    /// Seconds each fleet size stays idle (default 600; quick 20).
    #[arg(long)]
    pub fleet_window: Option<u64>,
    /// Seconds of the fleet's window without agents (default 300; quick 20).
    #[arg(long)]
    pub fleet_baseline: Option<u64>,
    /// Nodes of the fleet's rolling reboot (default 10; quick 2).
    #[arg(long)]
    pub fleet_reboots: Option<usize>,
    /// Skip section 1 and 2.
    #[arg(long)]
    pub no_outcome: bool,
    /// Skip section 3 (and the idle footprint).
    #[arg(long)]
    pub no_latency: bool,
    /// Skip section 5.
    #[arg(long)]
    pub no_fleet: bool,
    /// Measure this agent binary instead of building one (development only: the report says
    /// that the binary was not built by the run).
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Where to write the report (default: BENCHMARKS.md at the workspace root).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// The settings of one run, defaults resolved.
#[derive(Clone, Debug)]
pub struct Settings {
    pub quick: bool,
    pub sizes: Vec<usize>,
    pub budgets: Vec<u64>,
    pub tools: Vec<Tool>,
    /// Bytes per second per migration.
    pub bandwidth: u64,
    /// The fixed migration time of the bed (its phases before the copy take a tenth each).
    pub migration_fixed: Duration,
    pub stop: Duration,
    /// kubelet's `shutdownGracePeriodCriticalPods` (its `shutdownGracePeriod` is the budget).
    pub kubelet_critical: Duration,
    pub latency_runs: usize,
    pub latency_vms: usize,
    pub idle: Duration,
    pub fleet_sizes: Vec<usize>,
    pub fleet_window: Duration,
    pub fleet_baseline: Duration,
    pub fleet_reboots: usize,
    pub agent: PathBuf,
}

impl Settings {
    pub fn from_args(a: &BenchArgs, agent: PathBuf) -> Result<Self> {
        ensure!(
            a.bandwidth_gib.is_finite() && a.bandwidth_gib > 0.0,
            "--bandwidth-gib {}: give GiB per second above 0, e.g. 4",
            a.bandwidth_gib
        );
        ensure!(
            a.stop_seconds.is_finite() && a.stop_seconds >= 0.0,
            "--stop-seconds {}: give seconds ≥ 0",
            a.stop_seconds
        );
        let q = a.quick;
        let sizes = a
            .sizes
            .clone()
            .unwrap_or(if q { vec![1, 10] } else { vec![1, 10, 50, 200] });
        ensure!(
            sizes.iter().all(|&n| n >= 1),
            "--sizes: each size must be at least 1"
        );
        let budgets = a
            .budgets
            .clone()
            .unwrap_or(if q { vec![60] } else { vec![60, 300, 900] });
        ensure!(
            budgets.iter().all(|&b| b >= 15),
            "--budgets: each budget must be at least 15 s (the agent keeps a 5 s margin and \
             kubelet gives critical pods 10 s)"
        );
        let fleet_sizes =
            a.fleet
                .clone()
                .unwrap_or(if q { vec![5, 10] } else { vec![50, 100, 200] });
        ensure!(
            fleet_sizes.windows(2).all(|w| w[0] < w[1]) && fleet_sizes.iter().all(|&n| n >= 1),
            "--fleet: give growing sizes of at least 1, e.g. 50,100,200"
        );
        let fleet_reboots = a.fleet_reboots.unwrap_or(if q { 2 } else { 10 });
        ensure!(
            fleet_sizes.first().is_none_or(|&f| f >= fleet_reboots),
            "--fleet-reboots {fleet_reboots}: the smallest fleet must have that many nodes"
        );
        Ok(Self {
            quick: q,
            sizes,
            budgets,
            tools: Tool::ALL.to_vec(),
            bandwidth: (a.bandwidth_gib * GIB as f64) as u64,
            migration_fixed: Duration::from_secs(1),
            stop: Duration::from_secs_f64(a.stop_seconds),
            kubelet_critical: Duration::from_secs(10),
            latency_runs: a.latency_runs.unwrap_or(if q { 5 } else { 20 }),
            latency_vms: 3,
            idle: Duration::from_secs(a.idle_seconds.unwrap_or(if q { 10 } else { 60 })),
            fleet_sizes,
            fleet_window: Duration::from_secs(a.fleet_window.unwrap_or(if q { 20 } else { 600 })),
            fleet_baseline: Duration::from_secs(a.fleet_baseline.unwrap_or(if q {
                20
            } else {
                300
            })),
            fleet_reboots,
            agent,
        })
    }

    /// The smallest run that still goes through every code path (the smoke test's): one
    /// VMI, one budget of 20 s, quick VM stops, two latency runs, a fleet of one then two
    /// agents with 2 s windows and one rolling reboot.
    pub fn tiny(agent: PathBuf) -> Self {
        Self {
            quick: true,
            sizes: vec![1],
            budgets: vec![20],
            tools: Tool::ALL.to_vec(),
            bandwidth: 4 * GIB,
            migration_fixed: Duration::from_secs(1),
            stop: Duration::from_secs(1),
            kubelet_critical: Duration::from_secs(10),
            latency_runs: 2,
            latency_vms: 1,
            idle: Duration::from_secs(1),
            fleet_sizes: vec![1, 2],
            fleet_window: Duration::from_secs(2),
            fleet_baseline: Duration::from_secs(2),
            fleet_reboots: 1,
            agent,
        }
    }

    /// KubeVirt as upstream configures it (limits, re-queue, timeouts), with this run's
    /// bandwidth, fixed phases and VM stop time.
    pub fn kubevirt(&self) -> KubeVirtOptions {
        KubeVirtOptions {
            migration_duration: self.migration_fixed,
            migration_bandwidth: Some(self.bandwidth),
            shutdown_duration: self.stop,
            ..KubeVirtOptions::default()
        }
    }

    /// What the lower bound assumes of the bed (see [`bound`]).
    pub fn bound_params(&self) -> bound::BoundParams {
        let kv = self.kubevirt();
        let cfg = kv.cluster_config().migrations;
        bound::BoundParams {
            fixed: (kv.migration_duration / 10) * 4 + kv.handover_gap,
            bandwidth: self.bandwidth,
            slots: cfg
                .parallel_outbound_migrations_per_node
                .min(cfg.parallel_migrations_per_cluster) as usize,
            stop: self.stop,
        }
    }
}

/// `testbed bench`.
pub async fn run(args: BenchArgs) -> Result<ExitCode> {
    if let Some((k, _)) = std::env::vars().find(|(k, _)| k.starts_with("SHUTDOWN_GUARD_")) {
        bail!(
            "{k} is set: the agents the bench starts would read it as configuration; unset every \
             SHUTDOWN_GUARD_* variable first"
        );
    }
    let began = Instant::now();
    let machine_load = procfs::Load::start();
    let build = tokio::task::spawn_blocking({
        let given = args.agent.clone();
        move || agent_build::build(given.as_deref())
    })
    .await
    .context("the build task")??;
    let installed = agent_build::Installed::new(&build.binary)?;
    let s = Settings::from_args(&args, installed.path())?;
    let mut report = Report {
        command: std::iter::once("testbed".to_owned())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        started: Some(Utc::now()),
        machine: procfs::machine(),
        image: agent_build::image_layer(&build.binary),
        build: Some(build),
        settings: Some(s.clone()),
        load: machine_load,
        ..Report::default()
    };
    if !args.no_outcome {
        let mut matrix = outcome::Matrix {
            params: Some(s.bound_params()),
            ..outcome::Matrix::default()
        };
        for &n in &s.sizes {
            if let Err(e) = outcome::run_size(&s, n, &mut matrix).await {
                eprintln!("bench: outcome N={n} stopped: {e:#}");
                matrix.failures.push(outcome::Failure {
                    tool: Tool::Guard,
                    n,
                    budget: 0,
                    error: format!("the size's bed: {e:#}"),
                });
            }
        }
        report.matrix = Some(matrix);
    }
    if !args.no_latency {
        eprintln!("bench: latencies ({} shutdowns)", s.latency_runs);
        match latency::run(&s).await {
            Ok((l, idle)) => {
                report.latencies = Some(l);
                report.idle = Some(idle);
            }
            Err(e) => report.errors.push(format!("latencies: {e:#}")),
        }
    }
    if !args.no_fleet {
        match fleet::run(&s).await {
            Ok(f) => report.fleet = Some(f),
            Err(e) => report.errors.push(format!("fleet: {e:#}")),
        }
    }
    report.load.end();
    report.took = began.elapsed();
    let text = report.markdown();
    println!("{text}");
    let path = args
        .output
        .clone()
        .unwrap_or_else(|| crate::paths::workspace_root().join("BENCHMARKS.md"));
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("bench: wrote {}", path.display());
    drop(installed);
    Ok(ExitCode::SUCCESS)
}
