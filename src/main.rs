//! `shutdown-guard`: command line → settings → the agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use shutdown_guard::agent::run::{Exit, run};
use shutdown_guard::config::{self, Overrides, Sources};

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
    /// Preflight on the node: would a shutdown now be graceful? Takes the agent's settings.
    /// Exit 1 when a check fails (with --strict also on warnings), 2 on invalid settings.
    Check(CheckArgs),
    /// The node's guard: lock, last shutdown and its outcome, current drain progress.
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
    /// vms (virt-launcher pods) or all (all but DaemonSet and mirror pods, VMs first).
    #[arg(long, default_value = "vms")]
    scope: String,
    /// Give up after this long (VMs that cannot make it are stopped gracefully before); none by default.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    output: Output,
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
struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    drain: DrainArgs,
    #[command(flatten)]
    logind: LogindArgs,
    /// Address for /metrics, /healthz, /readyz and /status [default: 0.0.0.0:8080].
    #[arg(long, value_name = "ADDR")]
    listen_address: Option<String>,
}

/// Where settings and the cluster come from.
#[derive(Args)]
#[command(next_help_heading = "General")]
struct CommonArgs {
    /// TOML or YAML settings file (keys as in SHUTDOWN_GUARD_* without the prefix, lowercase).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kubeconfig file [default: KUBECONFIG, ~/.kube/config, or in-cluster].
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<String>,
    /// This node's name [default: NODE_NAME, else the hostname].
    #[arg(long)]
    node: Option<String>,
    /// Log format: json or text [default: text].
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// File holding the boot ID [default: /proc/sys/kernel/random/boot_id].
    #[arg(long, value_name = "FILE")]
    boot_id_path: Option<String>,
}

#[derive(Args)]
#[command(next_help_heading = "Drain")]
struct DrainArgs {
    /// Pods to evict: vms (virt-launcher pods) or all (all but DaemonSet and mirror pods, VMs first) [default: vms].
    #[arg(long)]
    scope: Option<String>,
    /// Taken off logind's InhibitDelayMaxUSec to get the drain deadline [default: 5s].
    #[arg(long, value_name = "DURATION")]
    safety_margin: Option<String>,
    /// Fixed drain deadline counted from the shutdown signal, instead of the one from logind.
    #[arg(long, value_name = "DURATION")]
    deadline: Option<String>,
    /// How long a drain may need; warns when logind's delay is shorter [default: 5m].
    #[arg(long, value_name = "DURATION")]
    drain_budget: Option<String>,
}

#[derive(Args)]
#[command(next_help_heading = "logind configuration")]
struct LogindArgs {
    /// Write a logind.conf.d drop-in raising InhibitDelayMaxSec to drain budget + margin, and reload logind.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    write_logind_dropin: Option<String>,
    /// The drop-in to write [default: /etc/systemd/logind.conf.d/99-shutdown-guard.conf].
    #[arg(long, value_name = "FILE")]
    logind_dropin: Option<String>,
    /// Where the host's filesystem is mounted, for logind configuration files [default: /].
    #[arg(long, value_name = "DIR")]
    host_root: Option<String>,
}

fn overrides(a: &RunArgs) -> Overrides {
    let mut o = Overrides::default();
    o.set("kubeconfig", a.common.kubeconfig.as_ref());
    o.set("node", a.common.node.as_ref());
    o.set("log_format", a.common.log_format.as_ref());
    o.set("boot_id_path", a.common.boot_id_path.as_ref());
    o.set("scope", a.drain.scope.as_ref());
    o.set("safety_margin", a.drain.safety_margin.as_ref());
    o.set("deadline", a.drain.deadline.as_ref());
    o.set("drain_budget", a.drain.drain_budget.as_ref());
    o.set("write_logind_dropin", a.logind.write_logind_dropin.as_ref());
    o.set("logind_dropin", a.logind.logind_dropin.as_ref());
    o.set("host_root", a.logind.host_root.as_ref());
    o.set("listen_address", a.listen_address.as_ref());
    o
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
        file: args.common.config.as_deref(),
        env: std::env::vars().collect(),
        overrides: overrides(args),
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
        Command::Run(args) => run_agent(args),
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
        .block_on(shutdown_guard::check::run(&settings, a.strict))
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
    let node = node_of(&a.target)?;
    shutdown_guard::telemetry::init_cli();
    let rt = runtime()?;
    let s = rt
        .block_on(async {
            let client = shutdown_guard::kube::client(a.target.kubeconfig.as_deref()).await?;
            shutdown_guard::status::status(client, &node, &a.agent).await
        })
        .map_err(fail)?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default()),
        Output::Text => print!("{}", shutdown_guard::status::render_text(&s)),
    }
    Ok(ExitCode::SUCCESS)
}

fn drain(a: DrainCmdArgs) -> Result<ExitCode, ExitCode> {
    use shutdown_guard::config::Scope;
    let node = node_of(&a.target)?;
    let scope = match a.scope.as_str() {
        "vms" => Scope::Vms,
        "all" => Scope::All,
        other => {
            eprintln!("shutdown-guard: invalid --scope {other:?}: expected one of: vms, all");
            return Err(ExitCode::from(EXIT_CONFIG));
        }
    };
    let timeout = match &a.timeout {
        None => None,
        Some(t) => match config::parse_duration("timeout", t) {
            Ok(d) if d.is_zero() => None,
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("shutdown-guard: {e}");
                return Err(ExitCode::from(EXIT_CONFIG));
            }
        },
    };
    shutdown_guard::telemetry::init_cli();
    let rt = runtime()?;
    let opts = shutdown_guard::ondemand::DrainOptions {
        node,
        scope,
        timeout,
        dry_run: a.dry_run,
        live: std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    let json = a.output == Output::Json;
    let r = rt
        .block_on(async {
            let client = shutdown_guard::kube::client(a.target.kubeconfig.as_deref())
                .await
                .map_err(shutdown_guard::ondemand::OnDemandError::from)?;
            let mut out = std::io::stdout();
            shutdown_guard::ondemand::drain(client, &opts, json, &mut out).await
        })
        .map_err(fail)?;
    rt.shutdown_background();
    Ok(match r.outcome.as_str() {
        "empty" | "dry-run" => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
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
                .map_err(shutdown_guard::ondemand::OnDemandError::from)?;
            shutdown_guard::ondemand::uncordon(client, &node, a.force).await
        })
        .map_err(fail)?;
    println!("{msg}");
    Ok(ExitCode::SUCCESS)
}

fn run_agent(args: RunArgs) -> Result<ExitCode, ExitCode> {
    let settings = load_settings(&args)?;
    shutdown_guard::telemetry::init(settings.log_format);
    let rt = runtime()?;
    let result = rt.block_on(run(settings));
    // Not waiting for in-flight API calls: on SIGTERM the process must be gone at once.
    rt.shutdown_background();
    Ok(match result {
        Ok(Exit::Terminated) | Ok(Exit::TerminatedDuringDrain { .. }) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = anyhow::Error::from(e);
            tracing::error!(error = format!("{msg:#}"), "fatal");
            // Kubernetes shows this file's text in the pod's status; only inside a pod.
            let term_log = std::path::Path::new("/dev/termination-log");
            if term_log.exists() {
                let _ = std::fs::write(term_log, format!("{msg:#}\n"));
            }
            ExitCode::FAILURE
        }
    })
}
