//! `testbed`: start the bed and run a command as a pod on one node or several (`run`), keep it
//! up (`up`), hurt a running bed (`fault`), or show shutdown-guard at work (`demo`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use testbed::bed::{Bed, BedOptions, LogindKind, Loginds};
use testbed::ctl::{
    MigrationFault, Probability, Request, VmiRef, parse_signal, parse_webhook_delay,
};
use testbed::kubevirt::config::parse_quantity;
use testbed::kubevirt::{KubeVirtOptions, KubeVirtVersion, VmSpec, WebhookFault};
use testbed::pod::{Pod, PodOutput, PodSpec, parse_bytes};

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
    /// Start the bed, run CMD as a pod on each node of --on, print the VM ledger, tear down,
    /// exit with the first failing pod's status.
    Run {
        #[command(flatten)]
        bed: BedArgs,
        #[command(flatten)]
        pods: RunArgs,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Start the bed, print the exports, stay up until interrupted.
    Up {
        #[command(flatten)]
        bed: BedArgs,
    },
    /// Hurt a running bed (`testbed up`, or `$TESTBED_CTL` from a pod of `testbed run`):
    /// kube-apiserver, its connections, logind, the bus, units, pods, KubeVirt's eviction
    /// webhook and migrations.
    Fault(FaultArgs),
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
    /// Nodes that run a real logind (and can run pods): a count from node-1, or `all`. Each
    /// systemd node adds about a second to the start and 10 MiB.
    #[arg(long, default_value = "all")]
    loginds: Loginds,
    /// The logind of the nodes after node-1 that run one (default: the same as --logind).
    #[arg(long)]
    other_logind: Option<LogindKind>,
    /// logind's InhibitDelayMaxSec on every node with a logind (default: logind's own, 5 s).
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
            loginds: self.loginds,
            other_logind: self.other_logind.unwrap_or(self.logind),
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

#[derive(Args, Clone)]
struct RunArgs {
    /// Nodes to run CMD on, one pod each, at once: names (node-1,node-2) or `all` (every node
    /// with a logind). Each pod gets its own node's TESTBED_NODE, bus and power commands.
    #[arg(long, default_value = "node-1", value_delimiter = ',')]
    on: Vec<String>,
    /// Memory limit of each pod (e.g. 64Mi): a cgroup of its own with kubelet's OOM group kill
    /// (`testbed fault oom` exceeds it).
    #[arg(long, value_parser = parse_bytes)]
    memory_max: Option<u64>,
}

#[derive(Args)]
struct FaultArgs {
    /// The bed's ctl port (`testbed up` prints it; pods have it).
    #[arg(long, env = "TESTBED_CTL_PORT")]
    ctl_port: u16,
    #[command(subcommand)]
    fault: Fault,
}

#[derive(Subcommand)]
enum Fault {
    /// kube-apiserver and the proxy every pod's kubeconfig goes through.
    Api {
        #[command(subcommand)]
        action: ApiFault,
    },
    /// Restart logind on a node and wait until it is on the bus again.
    RestartLogind {
        #[arg(long, default_value = "node-1")]
        node: String,
    },
    /// Restart a node's system bus (and logind with it).
    RestartBus {
        #[arg(long, default_value = "node-1")]
        node: String,
    },
    /// Mask a unit inside a systemd node until its next boot (e.g. poweroff.target, so a
    /// power-off fails).
    Mask {
        unit: String,
        #[arg(long, default_value = "node-1")]
        node: String,
    },
    /// Undo `mask`.
    Unmask {
        unit: String,
        #[arg(long, default_value = "node-1")]
        node: String,
    },
    /// Signal the program of every pod the bed started on a node.
    Kill {
        #[arg(long, default_value = "node-1")]
        node: String,
        /// KILL, TERM, … or a number.
        #[arg(long, default_value = "KILL", value_parser = parse_signal)]
        signal: nix::sys::signal::Signal,
    },
    /// Signal one process of a pod by its host PID.
    KillPid {
        pid: u32,
        #[arg(long, default_value = "KILL", value_parser = parse_signal)]
        signal: nix::sys::signal::Signal,
    },
    /// Make every memory-limited pod on a node exceed its limit: the OOM killer fires and
    /// kills the pod's processes except those at oom_score_adj -1000.
    Oom {
        #[arg(long, default_value = "node-1")]
        node: String,
    },
    /// The KubeVirt simulator: virt-api's eviction webhook and the migrations of VMIs.
    Kubevirt {
        #[command(subcommand)]
        action: KubeVirtFault,
    },
    /// Start a node's power-off.
    Poweroff {
        #[arg(long, default_value = "node-1")]
        node: String,
    },
    /// Start a systemd node's reboot.
    Reboot {
        #[arg(long, default_value = "node-1")]
        node: String,
    },
    /// Wait until a node powered off; print when (unix seconds).
    WaitPoweroff {
        #[arg(long, default_value = "node-1")]
        node: String,
    },
    /// What the bed runs: kube-apiserver, the proxy, the KubeVirt faults, each node's logind,
    /// the pods.
    Status,
}

#[derive(Subcommand)]
enum KubeVirtFault {
    /// virt-api's pod-eviction webhook; with its failurePolicy Fail, kube-apiserver fails the
    /// eviction of a virt-launcher pod (500) while it is down or slower than its 10 s timeout.
    Webhook {
        #[command(subcommand)]
        state: WebhookState,
    },
    /// The next COUNT migrations of a VMI fail half-way through the copy (the VMI stays on its
    /// source; evacuations retry after their backoff).
    Fail {
        /// NAMESPACE/NAME, or NAME in `default`.
        vmi: VmiRef,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
    },
    /// The next COUNT migrations of a VMI make no progress: virt-launcher aborts each after
    /// the KubeVirt CR's progressTimeout (150 s unless the CR says otherwise).
    Stall {
        /// NAMESPACE/NAME, or NAME in `default`.
        vmi: VmiRef,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
    },
    /// Any migration fails half-way through the copy with this probability (0 to 1; 0 turns
    /// it off).
    FailureProbability { probability: Probability },
}

#[derive(Subcommand)]
enum WebhookState {
    /// Close its port: kube-apiserver's calls are refused.
    Down,
    /// Answer every request SECONDS late (above 0, at most 60).
    Slow {
        #[arg(value_parser = parse_webhook_delay)]
        seconds: Duration,
    },
    /// Listen and answer at once again.
    Up,
}

#[derive(Subcommand)]
enum ApiFault {
    /// Stop kube-apiserver (SIGTERM, SIGKILL after 3 s).
    Stop,
    /// Start it again on the same port and etcd; returns once it is ready.
    Start,
    /// Stop forwarding bytes on every client connection, sockets kept open.
    Freeze {
        /// Only the connections open now; new ones work (as after a VIP failover).
        #[arg(long)]
        established: bool,
    },
    /// Forward again.
    Thaw,
    /// Reset (RST) every open client connection.
    Reset,
}

impl Fault {
    fn request(self) -> Request {
        use testbed::apiproxy::Freeze;
        match self {
            Fault::Api { action } => match action {
                ApiFault::Stop => Request::ApiStop,
                ApiFault::Start => Request::ApiStart,
                ApiFault::Freeze { established } => Request::ApiFreeze(if established {
                    Freeze::Established
                } else {
                    Freeze::All
                }),
                ApiFault::Thaw => Request::ApiThaw,
                ApiFault::Reset => Request::ApiReset,
            },
            Fault::RestartLogind { node } => Request::RestartLogind { node },
            Fault::RestartBus { node } => Request::RestartBus { node },
            Fault::Mask { unit, node } => Request::Mask { node, unit },
            Fault::Unmask { unit, node } => Request::Unmask { node, unit },
            Fault::Kill { node, signal } => Request::Kill { node, signal },
            Fault::KillPid { pid, signal } => Request::KillPid { pid, signal },
            Fault::Oom { node } => Request::Oom { node },
            Fault::Kubevirt { action } => match action {
                KubeVirtFault::Webhook { state } => Request::KubeVirtWebhook(match state {
                    WebhookState::Down => WebhookFault::Down,
                    WebhookState::Slow { seconds } => WebhookFault::Slow(seconds),
                    WebhookState::Up => WebhookFault::None,
                }),
                KubeVirtFault::Fail { vmi, count } => Request::KubeVirtMigrations {
                    fault: MigrationFault::Fail,
                    vmi,
                    count,
                },
                KubeVirtFault::Stall { vmi, count } => Request::KubeVirtMigrations {
                    fault: MigrationFault::Stall,
                    vmi,
                    count,
                },
                KubeVirtFault::FailureProbability { probability } => {
                    Request::KubeVirtFailureProbability(probability)
                }
            },
            Fault::Poweroff { node } => Request::PowerOff { node },
            Fault::Reboot { node } => Request::Reboot { node },
            Fault::WaitPoweroff { node } => Request::WaitPowerOff { node },
            Fault::Status => Request::Status,
        }
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
        Command::Run { bed, pods, cmd } => run_cmd(bed, pods, cmd).await,
        Command::Up { bed } => up(bed).await,
        Command::Fault(args) => fault(args).await,
        Command::Demo(args) => testbed::demo::run(args).await,
        Command::Bench(args) => testbed::bench::run(args).await,
    }
}

/// The nodes `--on` names, checked against the nodes that run a logind.
fn pod_nodes(on: &[String], with_logind: &[String]) -> Result<Vec<String>> {
    if on.iter().any(|n| n == "all") {
        return Ok(with_logind.to_vec());
    }
    for node in on {
        if !with_logind.contains(node) {
            bail!(
                "--on {node}: {node} runs no logind, so no pod can run there (nodes with one: {}); \
                 add --loginds all or --loginds N",
                with_logind.join(", ")
            );
        }
    }
    let mut nodes = on.to_vec();
    nodes.dedup();
    Ok(nodes)
}

async fn run_cmd(args: BedArgs, run: RunArgs, cmd: Vec<String>) -> Result<ExitCode> {
    let bed = Bed::start(args.options()?)
        .await
        .context("starting the bed")?;
    let nodes = match pod_nodes(&run.on, &bed.logind_nodes()) {
        Ok(n) => n,
        Err(e) => {
            bed.shutdown().await.context("tearing the bed down")?;
            return Err(e);
        }
    };
    eprintln!(
        "testbed: up in {:.1} s; running {:?} as a pod on {}",
        bed.started_in().as_secs_f64(),
        cmd,
        nodes.join(", ")
    );
    let prefixed = nodes.len() > 1;
    let mut pods: Vec<Pod> = Vec::new();
    let mut relays = Vec::new();
    for node in &nodes {
        let mut spec = PodSpec::new(
            &cmd[0],
            &cmd[1..].iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .output(if prefixed {
            PodOutput::Piped
        } else {
            PodOutput::Inherit
        });
        spec.memory_max = run.memory_max;
        let started = async { bed.node(node)?.spawn_pod(spec).await }.await;
        let mut pod = match started {
            Ok(p) => p,
            Err(e) => {
                drop(pods);
                bed.shutdown().await.context("tearing the bed down")?;
                return Err(e).with_context(|| format!("starting {:?} on {node}", cmd[0]));
            }
        };
        if prefixed {
            let (out, err) = pod.take_output();
            relays.push(tokio::spawn(relay(out, format!("[{node}] "), false)));
            relays.push(tokio::spawn(relay(err, format!("[{node}] "), true)));
        }
        pods.push(pod);
    }
    let waited = tokio::select! {
        statuses = futures::future::join_all(pods.iter_mut().map(Pod::wait)) => Some(statuses),
        _ = interrupted() => None,
    };
    for r in relays {
        let _ = r.await;
    }
    let Some(statuses) = waited else {
        drop(pods);
        bed.shutdown().await.context("tearing the bed down")?;
        return Ok(ExitCode::from(130));
    };
    eprint!("{}", bed.ledger().await);
    drop(pods);
    bed.shutdown().await.context("tearing the bed down")?;
    let mut code = 0u8;
    for (node, status) in nodes.iter().zip(statuses) {
        let status = status.with_context(|| format!("waiting for the pod on {node}"))?;
        let c = match status.code() {
            Some(c) => u8::try_from(c).unwrap_or(1),
            None => 128 + 15,
        };
        if prefixed && c != 0 {
            eprintln!("testbed: the pod on {node} exited with {status}");
        }
        if code == 0 {
            code = c;
        }
    }
    Ok(ExitCode::from(code))
}

/// Copies a pod's output line by line with `prefix`, to the bed's stdout or stderr.
async fn relay<R: tokio::io::AsyncRead + Unpin>(from: Option<R>, prefix: String, to_stderr: bool) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let Some(from) = from else { return };
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let text = format!("{prefix}{line}\n");
        let _ = if to_stderr {
            tokio::io::stderr().write_all(text.as_bytes()).await
        } else {
            tokio::io::stdout().write_all(text.as_bytes()).await
        };
    }
}

async fn up(args: BedArgs) -> Result<ExitCode> {
    let bed = Bed::start(args.options()?)
        .await
        .context("starting the bed")?;
    eprintln!(
        "testbed: up in {:.1} s; Ctrl-C tears it down",
        bed.started_in().as_secs_f64()
    );
    let node = bed.node(testbed::bed::NODE)?;
    println!(
        "export DBUS_SYSTEM_BUS_ADDRESS='{}'",
        node.pod_bus_address().await
    );
    for (key, value) in bed.pod_env() {
        println!("export {key}='{value}'");
    }
    println!(
        "# a pod on node-1 also runs in node-1's PID namespace; `testbed run` does that for you"
    );
    println!(
        "# nodes with a logind: {}; `testbed fault status` shows the bed",
        bed.logind_nodes().join(", ")
    );
    interrupted().await;
    eprint!("{}", bed.ledger().await);
    bed.shutdown().await.context("tearing the bed down")?;
    Ok(ExitCode::SUCCESS)
}

async fn fault(args: FaultArgs) -> Result<ExitCode> {
    let detail = testbed::ctl::send(args.ctl_port, &args.fault.request()).await?;
    if !detail.is_empty() {
        for part in detail.split(" | ") {
            println!("{part}");
        }
    }
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
