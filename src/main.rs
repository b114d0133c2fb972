//! `shutdown-guard`: command line → settings → the agent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use shutdown_guard::agent::{Exit, Handover, run};
use shutdown_guard::config::{self, Flags, Sources};
use shutdown_guard::drain::model::Scope;

#[derive(Parser)]
#[command(
    name = "shutdown-guard",
    version,
    about = "Holds a node's shutdown until its KubeVirt VMs have migrated or stopped"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: hold a logind delay lock and drain the node's VMs when it shuts down.
    Run(RunArgs),
    /// The drain worker `run` starts (internal).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Preflight on the node: would a shutdown now be graceful? Takes the agent's settings.
    /// Exit 1 when a check fails (with --strict also on warnings), 2 on invalid settings.
    Check(CheckArgs),
    /// The node's guard: lock, last shutdown and its outcome, current drain progress; with
    /// --all-nodes every node's, from the API server (also as `kubectl shutdown-guard status`).
    Status(StatusArgs),
    /// Drain a node now with the agent's engine, without a power-off (maintenance).
    /// Exit 0 when the node is empty, 1 on timeout or error.
    Drain(DrainCmdArgs),
    /// Lift a cordon set by shutdown-guard (the agent's or `drain`'s); others' only with --force.
    Uncordon(UncordonArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Report format.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    output: Output,
    /// Count warnings (VMIs that will not migrate, other delay locks) as failures.
    #[arg(long)]
    strict: bool,
}

/// Which node and cluster, for the commands run from anywhere.
#[derive(Args)]
struct Target {
    /// The node [default: NODE_NAME, else the hostname].
    #[arg(long)]
    node: Option<String>,
    /// Kubeconfig file [default: KUBECONFIG, ~/.kube/config, or in-cluster].
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// The agent's admin address, for its live view.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8080")]
    agent: String,
    /// Every node: guarded or not, lock, pending or last shutdown, VMIs that would not migrate.
    #[arg(long, short = 'A', conflicts_with_all = ["node", "agent"])]
    all_nodes: bool,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    output: Output,
}

#[derive(Args)]
struct DrainCmdArgs {
    #[command(flatten)]
    target: Target,
    /// List what would happen and why; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: what a power event (the whole cluster going down) would do instead.
    #[arg(long, requires = "dry_run")]
    power_event: bool,
    /// vms (virt-launcher pods) or all (all but DaemonSet and mirror pods, VMs first).
    #[arg(long, default_value = "vms")]
    scope: Scope,
    /// Give up after this long (VMs that cannot make it are stopped gracefully before); none by default.
    #[arg(long, value_name = "DURATION", value_parser = timeout)]
    timeout: Option<Duration>,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    output: Output,
}

/// `--timeout 0` is kubectl's "no timeout".
fn timeout(v: &str) -> Result<Duration, String> {
    config::parse_duration("timeout", v).map_err(|e| e.to_string())
}

#[derive(Args)]
struct UncordonArgs {
    #[command(flatten)]
    target: Target,
    /// Uncordon even when shutdown-guard did not cordon the node.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct WorkerArgs {
    /// Our end of the holder's link (when the holder started us; else `link_socket`).
    #[arg(long)]
    link_fd: Option<i32>,
    /// The kubeconfig the holder read for us.
    #[arg(long)]
    kubeconfig_fd: Option<i32>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct RunArgs {
    /// TOML or YAML settings file (keys as in SHUTDOWN_GUARD_* without the prefix, lowercase).
    #[arg(long, value_name = "FILE", help_heading = "General")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Flags,
}

/// Exit status for a configuration the agent cannot run with.
const EXIT_CONFIG: u8 = 2;

fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
}

fn load_settings(args: &RunArgs) -> Result<config::Settings, ExitCode> {
    let sources = Sources {
        file: args.config.as_deref(),
        env: std::env::vars().collect(),
        flags: args.flags.clone(),
        hostname: hostname(),
    };
    config::load(&sources).map_err(|e| {
        eprintln!("shutdown-guard: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("shutdown-guard: starting the runtime: {e}");
            ExitCode::FAILURE
        })
}

fn node_of(t: &Target) -> Result<String, ExitCode> {
    t.node
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
        .or_else(hostname)
        .ok_or_else(|| {
            eprintln!("shutdown-guard: no node: give --node or set NODE_NAME");
            ExitCode::from(EXIT_CONFIG)
        })
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("shutdown-guard: {e}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_holder(args),
        Command::Worker(args) => run_worker(args),
        Command::Check(a) => check(a),
        Command::Status(a) => status(a),
        Command::Drain(a) => drain(a),
        Command::Uncordon(a) => uncordon(a),
    };
    result.unwrap_or_else(|code| code)
}

fn check(a: CheckArgs) -> Result<ExitCode, ExitCode> {
    let settings = load_settings(&a.run)?;
    shutdown_guard::telemetry::init_cli();
    let rt = runtime()?;
    let report = rt
        .block_on(shutdown_guard::cli::check::run(&settings, a.strict))
        .map_err(fail)?;
    match a.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
        Output::Text => print!("{}", report.render_text()),
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn status(a: StatusArgs) -> Result<ExitCode, ExitCode> {
    if a.all_nodes {
        return status_all_nodes(a);
    }
    let node = node_of(&a.target)?;
    shutdown_guard::telemetry::init_cli();
    let rt = runtime()?;
    let s = rt
        .block_on(async {
            let client = shutdown_guard::kube::client(a.target.kubeconfig.as_deref()).await?;
            shutdown_guard::cli::status::status(client, &node, &a.agent).await
        })
        .map_err(fail)?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default()),
        Output::Text => print!("{}", shutdown_guard::cli::status::render_text(&s)),
    }
    Ok(ExitCode::SUCCESS)
}

fn status_all_nodes(a: StatusArgs) -> Result<ExitCode, ExitCode> {
    use shutdown_guard::cli::status;
    shutdown_guard::telemetry::init_cli();
    let rt = runtime()?;
    let s = rt
        .block_on(async {
            let client = shutdown_guard::kube::client(a.target.kubeconfig.as_deref()).await?;
            status::cluster_status(client).await
        })
        .map_err(fail)?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default()),
        Output::Text => print!("{}", status::render_cluster_text(&s)),
    }
    Ok(ExitCode::SUCCESS)
}

fn drain(a: DrainCmdArgs) -> Result<ExitCode, ExitCode> {
    let node = node_of(&a.target)?;
    let (scope, timeout) = (a.scope, a.timeout.filter(|t| !t.is_zero()));
    shutdown_guard::telemetry::init_cli();
    let rt = runtime()?;
    use shutdown_guard::cli::drain::{DrainError, DrainOptions, DrainOutcome};
    let opts = DrainOptions {
        node,
        scope,
        timeout,
        dry_run: a.dry_run,
        power_event: a.power_event,
        live: std::io::IsTerminal::is_terminal(&std::io::stdout()),
        json: a.output == Output::Json,
    };
    let r = rt
        .block_on(async {
            let client = shutdown_guard::kube::client(a.target.kubeconfig.as_deref())
                .await
                .map_err(DrainError::from)?;
            shutdown_guard::cli::drain::drain(client, &opts, Box::new(std::io::stdout())).await
        })
        .map_err(fail)?;
    rt.shutdown_background();
    Ok(match r.outcome {
        DrainOutcome::Empty | DrainOutcome::DryRun => ExitCode::SUCCESS,
        DrainOutcome::Timeout | DrainOutcome::Interrupted => ExitCode::FAILURE,
    })
}

fn uncordon(a: UncordonArgs) -> Result<ExitCode, ExitCode> {
    let node = node_of(&a.target)?;
    shutdown_guard::telemetry::init_cli();
    let rt = runtime()?;
    let msg = rt
        .block_on(async {
            let client = shutdown_guard::kube::client(a.target.kubeconfig.as_deref())
                .await
                .map_err(shutdown_guard::cli::uncordon::UncordonError::from)?;
            shutdown_guard::cli::uncordon::uncordon(client, &node, a.force).await
        })
        .map_err(fail)?;
    println!("{msg}");
    Ok(ExitCode::SUCCESS)
}

fn run_holder(args: RunArgs) -> Result<ExitCode, ExitCode> {
    let settings = load_settings(&args)?;
    shutdown_guard::telemetry::init(settings.log_format);
    // The worker gets the same settings: the same flags after `worker`.
    let worker_args: Vec<std::ffi::OsString> = std::env::args_os().skip(2).collect();
    let rt = runtime()?;
    let result = rt.block_on(shutdown_guard::holder::run(settings, worker_args));
    rt.shutdown_background();
    Ok(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fatal(anyhow::Error::from(e)),
    })
}

fn run_worker(args: WorkerArgs) -> Result<ExitCode, ExitCode> {
    let settings = load_settings(&args.run)?;
    shutdown_guard::telemetry::init(settings.log_format);
    let rt = runtime()?;
    let handover = match (args.link_fd, &settings.link_socket) {
        (Some(link_fd), _) => Handover::Fds {
            link_fd,
            kubeconfig_fd: args.kubeconfig_fd,
        },
        (None, Some(path)) => Handover::Socket(path.clone()),
        (None, None) => {
            eprintln!(
                "shutdown-guard: the worker needs its holder: set link_socket (SHUTDOWN_GUARD_LINK_SOCKET) to the holder's socket; `shutdown-guard run` starts a worker itself"
            );
            return Err(ExitCode::from(EXIT_CONFIG));
        }
    };
    let result = rt.block_on(run(settings, handover));
    // Not waiting for in-flight API calls: on SIGTERM the process must be gone at once.
    rt.shutdown_background();
    Ok(match result {
        Ok(Exit::Terminated) | Ok(Exit::TerminatedDuringDrain { .. }) => ExitCode::SUCCESS,
        Err(e) => fatal(anyhow::Error::from(e)),
    })
}

fn fatal(msg: anyhow::Error) -> ExitCode {
    tracing::error!(error = format!("{msg:#}"), "fatal");
    // Kubernetes shows this file's text in the pod's status; only inside a pod.
    let term_log = std::path::Path::new("/dev/termination-log");
    if term_log.exists() {
        let _ = std::fs::write(term_log, format!("{msg:#}\n"));
    }
    ExitCode::FAILURE
}
