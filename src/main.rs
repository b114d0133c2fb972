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
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    drain: DrainArgs,
    #[command(flatten)]
    logind: LogindArgs,
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
    o
}

/// Exit status for a configuration the agent cannot run with.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let sources = Sources {
                file: args.common.config.as_deref(),
                env: std::env::vars().collect(),
                overrides: overrides(&args),
                hostname: nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok()),
            };
            let settings = match config::load(&sources) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("shutdown-guard: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            shutdown_guard::telemetry::init(settings.log_format);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("shutdown-guard: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = rt.block_on(run(settings));
            // Not waiting for in-flight API calls: on SIGTERM the process must be gone at once.
            rt.shutdown_background();
            match result {
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
            }
        }
    }
}
