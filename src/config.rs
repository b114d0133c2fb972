//! The agent's settings, each defined once as a field of [`Settings`]: its type, its default
//! ([`Settings::default`]), its file key (the field name), its variable (`SHUTDOWN_GUARD_` and
//! the name in capitals) and, in [`Flags`], its `--flag` (the name with dashes).
//!
//! Lowest to highest precedence: the defaults, a TOML or YAML file, `SHUTDOWN_GUARD_*` and flags.
//! The `config` crate layers them; every value, whatever its source, goes through the one parser
//! of its type, so a bad value is reported with its key, the value given and what is allowed.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::drain::model::Scope;

/// Environment prefix: `SHUTDOWN_GUARD_SAFETY_MARGIN=10s` sets `safety_margin`.
pub const ENV_PREFIX: &str = "SHUTDOWN_GUARD";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    #[default]
    Text,
}

/// Validated settings of `shutdown-guard run` (and `check`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// This node's name [default: NODE_NAME, else the hostname].
    #[serde(with = "node_name")]
    pub node: String,
    /// Kubeconfig file [default: KUBECONFIG, ~/.kube/config, or in-cluster].
    #[serde(with = "opt_path")]
    pub kubeconfig: Option<PathBuf>,
    /// Pods to evict: vms (virt-launcher pods) or all (all but DaemonSet and mirror pods, VMs
    /// first).
    #[serde(with = "text")]
    pub scope: Scope,
    /// Taken off logind's `InhibitDelayMaxUSec` so the lock is closed before logind stops waiting.
    #[serde(with = "duration")]
    pub safety_margin: Duration,
    /// Fixed drain deadline (from the shutdown signal), replacing the one derived from logind.
    #[serde(with = "opt_duration")]
    pub deadline: Option<Duration>,
    /// How long a drain is wanted to take at most; logind's delay should be at least this long.
    #[serde(with = "duration")]
    pub drain_budget: Duration,
    /// Drain ahead of a shutdown logind has scheduled (`shutdown -r +N`), so the node is empty
    /// when it fires.
    #[serde(with = "text")]
    pub pre_drain: bool,
    /// How long before the scheduled time the pre-drain starts [default: drain_budget].
    #[serde(with = "opt_duration")]
    pub pre_drain_lead: Option<Duration>,
    /// How many nodes of the cluster pre-drain at once (Leases `shutdown-guard-turn-<i>`); 0:
    /// every node on its own, without turns.
    #[serde(with = "text")]
    pub pre_drain_turns: u32,
    /// Where the turns' Leases live; empty: the agent's own namespace (the pod's, or the
    /// kubeconfig context's).
    #[serde(with = "text")]
    pub lease_namespace: String,
    /// Taint the Node `shutdown-guard.kubevirt.io/reboot-pending:PreferNoSchedule` while a
    /// reboot is pending, so migrations from other nodes prefer nodes that stay up.
    #[serde(with = "text")]
    pub reboot_pending_taint: bool,
    /// The distribution's "reboot required" marker (Debian, Ubuntu); empty: none is read.
    #[serde(with = "opt_path")]
    pub reboot_required_file: Option<PathBuf>,
    /// A shutdown is part of a power event (the whole cluster going down) when fewer nodes
    /// than this stay Ready, schedulable and not shutting down; its VMs are then stopped in
    /// place and started again afterwards. 0: never.
    #[serde(with = "text")]
    pub power_event_min_targets: u32,
    /// How long a shutdown's VMs wait for the other nodes to announce theirs before the agent
    /// judges; 0: VMs are evicted at once, and a power event recognised later stops the rest.
    #[serde(with = "duration")]
    pub power_event_settle: Duration,
    /// Start the VMs a power event stopped again once the cluster is back.
    #[serde(with = "text")]
    pub power_event_restore: bool,
    /// At most this many of those VMs starting at once, cluster-wide.
    #[serde(with = "text")]
    pub power_event_restore_parallel: u32,
    /// Start them only once this many nodes are Ready; 0: once every node they ran on is.
    #[serde(with = "text")]
    pub power_event_restore_min_ready_nodes: u32,
    /// Write a logind drop-in raising `InhibitDelayMaxSec` to `drain_budget + safety_margin`.
    #[serde(with = "text")]
    pub write_logind_dropin: bool,
    /// The drop-in written when `write_logind_dropin` is on, relative to `host_root`.
    #[serde(with = "abs_path")]
    pub logind_dropin: PathBuf,
    /// Where the host's filesystem is mounted (a DaemonSet mounts it under e.g. `/host`).
    #[serde(with = "abs_path")]
    pub host_root: PathBuf,
    #[serde(with = "abs_path")]
    pub boot_id_path: PathBuf,
    #[serde(with = "text")]
    pub log_format: LogFormat,
    /// Where `/metrics`, `/healthz`, `/readyz` and `/status` are served.
    #[serde(with = "text")]
    pub listen_address: SocketAddr,
    /// `uid:gid` the drain worker runs as when the holder runs as root; empty: the holder's own.
    #[serde(with = "text")]
    pub worker_user: WorkerUser,
    /// Where the holder notes when a drain began, for a holder restarted during it: a `tmpfs`
    /// that outlives the process (an `emptyDir` in the pod, `RuntimeDirectory` on the host).
    #[serde(with = "abs_path")]
    pub state_dir: PathBuf,
    /// After the lock's release, how long until the holder checks that the shutdown really goes
    /// on (and then every so often); one that failed is guarded again.
    #[serde(with = "duration")]
    pub rearm_after: Duration,
    /// A socket where the holder waits for a worker of its own container (a pod); unset, the
    /// holder starts the worker itself (a host).
    #[serde(with = "opt_path")]
    pub link_socket: Option<PathBuf>,
}

impl Settings {
    /// How long before a scheduled shutdown the node is drained; `None` with `pre_drain` off.
    /// The default gives the pre-drain the whole time a drain may need, and logind's delay
    /// comes on top.
    pub fn pre_drain_lead(&self) -> Option<Duration> {
        self.pre_drain
            .then(|| self.pre_drain_lead.unwrap_or(self.drain_budget))
    }

    /// The settle of the power-event judgement; `None` when power events are not judged.
    pub fn power_event_settle(&self) -> Option<Duration> {
        (self.power_event_min_targets > 0).then_some(self.power_event_settle)
    }

    /// The drain worker's uid and gid, if it is to change.
    pub fn worker_ids(&self) -> Option<(u32, u32)> {
        self.worker_user.0
    }

    pub const DEFAULT_SAFETY_MARGIN: Duration = Duration::from_secs(5);
    pub const DEFAULT_DRAIN_BUDGET: Duration = Duration::from_secs(300);
    pub const DEFAULT_DROPIN: &'static str = "/etc/systemd/logind.conf.d/99-shutdown-guard.conf";
    pub const DEFAULT_BOOT_ID_PATH: &'static str = "/proc/sys/kernel/random/boot_id";
    pub const DEFAULT_REBOOT_REQUIRED_FILE: &'static str = "/run/reboot-required";
    /// The DaemonSet's probes and Prometheus scrape this port.
    pub const DEFAULT_LISTEN_ADDRESS: &'static str = "0.0.0.0:8080";
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            node: String::new(),
            kubeconfig: None,
            scope: Scope::Vms,
            safety_margin: Self::DEFAULT_SAFETY_MARGIN,
            deadline: None,
            drain_budget: Self::DEFAULT_DRAIN_BUDGET,
            pre_drain: true,
            pre_drain_lead: None,
            pre_drain_turns: 1,
            lease_namespace: String::new(),
            reboot_pending_taint: true,
            reboot_required_file: Some(PathBuf::from(Self::DEFAULT_REBOOT_REQUIRED_FILE)),
            power_event_min_targets: 1,
            power_event_settle: Duration::ZERO,
            power_event_restore: true,
            power_event_restore_parallel: 2,
            power_event_restore_min_ready_nodes: 0,
            write_logind_dropin: false,
            logind_dropin: PathBuf::from(Self::DEFAULT_DROPIN),
            host_root: PathBuf::from("/"),
            boot_id_path: PathBuf::from(Self::DEFAULT_BOOT_ID_PATH),
            log_format: LogFormat::Text,
            listen_address: Self::DEFAULT_LISTEN_ADDRESS
                .parse()
                .expect("the default address parses"),
            worker_user: WorkerUser(Some((65534, 65534))),
            state_dir: PathBuf::from("/run/shutdown-guard"),
            rearm_after: Duration::from_secs(5),
            link_socket: None,
        }
    }
}

/// The flags of `run` and `check`: one per setting, typed, each overriding the file and the
/// environment when given.
#[derive(Debug, Clone, Default, Serialize, clap::Args)]
pub struct Flags {
    /// Kubeconfig file [default: KUBECONFIG, ~/.kube/config, or in-cluster].
    #[arg(long, value_name = "FILE", help_heading = "General")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name [default: NODE_NAME, else the hostname].
    #[arg(long, help_heading = "General")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub node: Option<NodeName>,
    /// Log format [default: text].
    #[arg(long, value_enum, value_name = "FORMAT", help_heading = "General")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub log_format: Option<LogFormat>,
    /// File holding the boot ID [default: /proc/sys/kernel/random/boot_id].
    #[arg(long, value_name = "FILE", help_heading = "General")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub boot_id_path: Option<AbsPath>,
    /// Pods to evict: vms (virt-launcher pods) or all (all but DaemonSet and mirror pods, VMs first) [default: vms].
    #[arg(long, value_name = "SCOPE", help_heading = "Drain")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub scope: Option<Scope>,
    /// Taken off logind's InhibitDelayMaxUSec to get the drain deadline [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = parse_flag_duration, help_heading = "Drain")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub safety_margin: Option<Duration>,
    /// Fixed drain deadline counted from the shutdown signal, instead of the one from logind.
    #[arg(long, value_name = "DURATION", value_parser = parse_flag_duration, help_heading = "Drain")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub deadline: Option<Duration>,
    /// How long a drain may need; warns when logind's delay is shorter [default: 5m].
    #[arg(long, value_name = "DURATION", value_parser = parse_flag_duration, help_heading = "Drain")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub drain_budget: Option<Duration>,
    /// Drain ahead of a shutdown logind has scheduled (shutdown -r +N) [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL",
          help_heading = "Drain")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub pre_drain: Option<bool>,
    /// How long before a scheduled shutdown the pre-drain starts [default: drain budget].
    #[arg(long, value_name = "DURATION", value_parser = parse_flag_duration, help_heading = "Drain")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub pre_drain_lead: Option<Duration>,
    /// How many nodes pre-drain at once, cluster-wide; 0 for no turns [default: 1].
    #[arg(long, value_name = "N", help_heading = "Drain")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub pre_drain_turns: Option<u32>,
    /// Namespace of the turns' Leases [default: the agent's own].
    #[arg(long, value_name = "NAMESPACE", help_heading = "Drain")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_namespace: Option<String>,
    /// Taint the node PreferNoSchedule while a reboot is pending [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL",
          help_heading = "Drain")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub reboot_pending_taint: Option<bool>,
    /// The reboot-required marker to read; empty for none [default: /run/reboot-required].
    #[arg(long, value_name = "FILE", help_heading = "Drain")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reboot_required_file: Option<PathBuf>,
    /// Fewer nodes than this left to migrate to: a power event, VMs stopped in place; 0: never [default: 1].
    #[arg(long, value_name = "N", help_heading = "Power events")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub power_event_min_targets: Option<u32>,
    /// How long VMs wait for other nodes to announce their shutdown before judging [default: 0s].
    #[arg(long, value_name = "DURATION", value_parser = parse_flag_duration, help_heading = "Power events")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub power_event_settle: Option<Duration>,
    /// Start the VMs a power event stopped once the cluster is back [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL",
          help_heading = "Power events")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub power_event_restore: Option<bool>,
    /// At most this many of them starting at once, cluster-wide [default: 2].
    #[arg(long, value_name = "N", help_heading = "Power events")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub power_event_restore_parallel: Option<u32>,
    /// Start them once this many nodes are Ready; 0: every node they ran on [default: 0].
    #[arg(long, value_name = "N", help_heading = "Power events")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub power_event_restore_min_ready_nodes: Option<u32>,
    /// Write a logind.conf.d drop-in raising InhibitDelayMaxSec to drain budget + margin, and reload logind.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL",
          help_heading = "logind configuration")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub write_logind_dropin: Option<bool>,
    /// The drop-in to write [default: /etc/systemd/logind.conf.d/99-shutdown-guard.conf].
    #[arg(long, value_name = "FILE", help_heading = "logind configuration")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub logind_dropin: Option<AbsPath>,
    /// Where the host's filesystem is mounted, for logind configuration files [default: /].
    #[arg(long, value_name = "DIR", help_heading = "logind configuration")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub host_root: Option<AbsPath>,
    /// Address for /metrics, /healthz, /readyz and /status [default: 0.0.0.0:8080].
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub listen_address: Option<SocketAddr>,
    /// uid:gid of the drain worker when running as root; empty for the holder's own [default: 65534:65534].
    #[arg(long, value_name = "UID:GID", help_heading = "Processes")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub worker_user: Option<WorkerUser>,
    /// Where the holder notes a drain's start for a restarted holder [default: /run/shutdown-guard].
    #[arg(long, value_name = "DIR", help_heading = "Processes")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub state_dir: Option<AbsPath>,
    /// After a release, when to check that the shutdown goes on, and guard again if not [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = parse_flag_duration, help_heading = "Processes")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub rearm_after: Option<Duration>,
    /// Socket between the holder and a worker in a container of its own (a pod); unset: the holder starts the worker.
    #[arg(long, value_name = "PATH", help_heading = "Processes")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_text")]
    pub link_socket: Option<AbsPath>,
}

/// Where settings come from, so tests can load them without touching the process environment.
#[derive(Debug, Clone, Default)]
pub struct Sources<'a> {
    pub file: Option<&'a Path>,
    /// The whole environment (only `SHUTDOWN_GUARD_*` and `NODE_NAME` are read).
    pub env: HashMap<String, String>,
    pub flags: Flags,
    /// Used as the node name when neither a source nor `NODE_NAME` gives one.
    pub hostname: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {key} = {value:?}: expected {allowed}")]
    Invalid {
        key: String,
        value: String,
        allowed: String,
    },
    #[error("invalid configuration: unknown key {key:?} (from {origin}); known keys: {known}")]
    UnknownKey {
        key: String,
        origin: String,
        known: String,
    },
    #[error("invalid configuration: {0}")]
    Source(#[from] config::ConfigError),
}

impl ConfigError {
    fn invalid(key: &str, value: &str, allowed: &str) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            value: value.to_string(),
            allowed: allowed.to_string(),
        }
    }
}

pub fn load(sources: &Sources<'_>) -> Result<Settings, ConfigError> {
    let prefixed: HashMap<String, String> = sources
        .env
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}_")))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut builder = config::Config::builder();
    if let Some(node) = sources
        .env
        .get("NODE_NAME")
        .filter(|n| !n.is_empty())
        .or(sources.hostname.as_ref())
    {
        builder = builder.set_default("node", node.as_str())?;
    }
    if let Some(file) = sources.file {
        builder = builder.add_source(config::File::from(file).required(true));
    }
    let merged = builder
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .try_parsing(false)
                .source(Some(prefixed.clone().into_iter().collect())),
        )
        .add_source(config::Config::try_from(&sources.flags)?)
        .build()?;
    let settings: Settings = merged
        .try_deserialize()
        .map_err(|e| explain(e, sources, &prefixed))?;
    check(settings)
}

/// Rules across settings, and the node name that no source gave.
fn check(s: Settings) -> Result<Settings, ConfigError> {
    if s.node.is_empty() {
        return Err(ConfigError::invalid(
            "node",
            "",
            "a node name (set --node, SHUTDOWN_GUARD_NODE or NODE_NAME; the hostname is unavailable)",
        ));
    }
    if s.deadline == Some(Duration::ZERO) {
        return Err(ConfigError::invalid(
            "deadline",
            "0s",
            "a positive duration such as 90s or 2m",
        ));
    }
    if s.drain_budget.is_zero() {
        return Err(ConfigError::invalid(
            "drain_budget",
            "0s",
            "a positive duration such as 300s or 5m",
        ));
    }
    if s.pre_drain_lead == Some(Duration::ZERO) {
        return Err(ConfigError::invalid(
            "pre_drain_lead",
            "0s",
            "a positive duration such as 10m (to drain only when the shutdown starts, set pre_drain: false)",
        ));
    }
    if s.power_event_restore && s.power_event_restore_parallel == 0 {
        return Err(ConfigError::invalid(
            "power_event_restore_parallel",
            "0",
            "at least 1 (to start nothing again, set power_event_restore: false)",
        ));
    }
    if let Some(p) = s.reboot_required_file.as_ref().filter(|p| !p.is_absolute()) {
        return Err(ConfigError::invalid(
            "reboot_required_file",
            &p.display().to_string(),
            "an absolute path such as /run/reboot-required, or empty for none",
        ));
    }
    if s.write_logind_dropin && !is_logind_dropin_dir(&s.logind_dropin) {
        return Err(ConfigError::invalid(
            "logind_dropin",
            &s.logind_dropin.display().to_string(),
            "a *.conf file directly under /etc/systemd/logind.conf.d, /run/systemd/logind.conf.d or /etc/elogind/logind.conf.d",
        ));
    }
    Ok(s)
}

/// Turns the `config` crate's error into ours: a value one of our parsers refused, or a key
/// [`Settings`] does not have (a misspelt key silently falling back to a default is worse than
/// not starting).
fn explain(
    e: config::ConfigError,
    sources: &Sources<'_>,
    env: &HashMap<String, String>,
) -> ConfigError {
    let (key, inner) = match &e {
        config::ConfigError::At {
            error,
            key: Some(key),
            ..
        } => (key.clone(), error.to_string()),
        other => (String::new(), other.to_string()),
    };
    if let Some((value, allowed)) = inner.split_once(REFUSED) {
        return ConfigError::invalid(&key, value, allowed);
    }
    if let Some(rest) = inner.strip_prefix("unknown field `") {
        let (field, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let known = tail
            .split_once("expected one of ")
            .map(|(_, k)| k.replace('`', ""))
            .unwrap_or_default();
        let var = format!("{ENV_PREFIX}_{}", field.to_ascii_uppercase());
        let origin = if env.contains_key(&var) {
            format!("environment variable {var}")
        } else {
            sources
                .file
                .map(|f| f.display().to_string())
                .unwrap_or_else(|| "configuration".into())
        };
        return ConfigError::UnknownKey {
            key: field.to_string(),
            origin,
            known,
        };
    }
    ConfigError::Source(e)
}

/// Separates the value from what is allowed in a parser's refusal as it travels through serde.
const REFUSED: &str = "\u{1f}";

/// A value type of a setting: one parser, whatever the source, and what it allows.
pub trait Setting: Sized {
    fn parse(s: &str) -> Result<Self, String>;
}

impl Setting for Scope {
    fn parse(s: &str) -> Result<Self, String> {
        s.parse()
    }
}

impl Setting for LogFormat {
    fn parse(s: &str) -> Result<Self, String> {
        <LogFormat as clap::ValueEnum>::from_str(s, false).map_err(|_| "one of: json, text".into())
    }
}

impl Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        })
    }
}

impl Setting for bool {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err("true or false".into()),
        }
    }
}

impl Setting for u32 {
    fn parse(s: &str) -> Result<Self, String> {
        s.parse()
            .map_err(|_| "a whole number from 0 to 4294967295".into())
    }
}

impl Setting for String {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(s.to_owned())
    }
}

impl Setting for SocketAddr {
    fn parse(s: &str) -> Result<Self, String> {
        s.parse()
            .map_err(|_| "an IP address and port such as 0.0.0.0:8080".into())
    }
}

/// A node name: a DNS subdomain (RFC 1123), lowercase alphanumerics, `-` and `.`, at most 253.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeName(pub String);

impl Setting for NodeName {
    fn parse(n: &str) -> Result<Self, String> {
        let ok = n.len() <= 253
            && n.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if ok {
            Ok(NodeName(n.to_string()))
        } else {
            Err(
                "a DNS subdomain: lowercase letters, digits, '-' and '.', at most 253 characters"
                    .into(),
            )
        }
    }
}

impl std::ops::Deref for NodeName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Display for NodeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The drain worker's `uid:gid`, or none (the holder's own identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerUser(pub Option<(u32, u32)>);

impl Setting for WorkerUser {
    fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Ok(WorkerUser(None));
        }
        let ids = s
            .split_once(':')
            .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
        match ids {
            Some((0, _)) | Some((_, 0)) => Err(
                "a non-root uid:gid such as 65534:65534 (root would defeat the split), or empty"
                    .into(),
            ),
            Some(ids) => Ok(WorkerUser(Some(ids))),
            None => Err("numeric uid:gid such as 65534:65534, or empty".into()),
        }
    }
}

impl Display for WorkerUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some((u, g)) => write!(f, "{u}:{g}"),
            None => Ok(()),
        }
    }
}

/// An absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsPath(pub PathBuf);

impl Setting for AbsPath {
    fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with('/') {
            Ok(AbsPath(PathBuf::from(s)))
        } else {
            Err("an absolute path".into())
        }
    }
}

impl std::ops::Deref for AbsPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Display for AbsPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.display().fmt(f)
    }
}

/// clap parses flags with the same parsers as the other sources.
macro_rules! flag_from_str {
    ($($t:ty),*) => {$(
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                <$t as Setting>::parse(s)
            }
        }
    )*};
}
flag_from_str!(NodeName, AbsPath, WorkerUser);

/// `90s`, `2m 30s`, `1500ms` (humantime) or a bare number of seconds.
pub fn parse_duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    duration_of(value).map_err(|allowed| ConfigError::invalid(key, value, &allowed))
}

fn duration_of(value: &str) -> Result<Duration, String> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(v)
        .map_err(|_| "a duration such as 30s, 2m, 1500ms or a number of seconds".into())
}

fn parse_flag_duration(value: &str) -> Result<Duration, String> {
    duration_of(value)
}

fn is_logind_dropin_dir(p: &Path) -> bool {
    let ok_dir = p.parent().is_some_and(|d| {
        d == Path::new("/etc/systemd/logind.conf.d")
            || d == Path::new("/run/systemd/logind.conf.d")
            || d == Path::new("/etc/elogind/logind.conf.d")
    });
    ok_dir && p.extension().is_some_and(|e| e == "conf")
}

/// Any scalar a source gives (a string from the environment, a number or a boolean from a
/// file), as the text the setting's parser reads.
fn scalar<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string, number or boolean")
        }
        fn visit_str<E>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        // An unset optional setting, as a layer writes it.
        fn visit_unit<E>(self) -> Result<String, E> {
            Ok(String::new())
        }
        fn visit_none<E>(self) -> Result<String, E> {
            Ok(String::new())
        }
    }
    d.deserialize_any(V)
}

fn refused<E: serde::de::Error>(value: &str, allowed: &str) -> E {
    E::custom(format!("{value}{REFUSED}{allowed}"))
}

/// A setting read with its type's [`Setting`] parser and written with `Display`.
mod text {
    use super::*;

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T: Setting, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let raw = scalar(d)?;
        T::parse(&raw).map_err(|allowed| refused(&raw, &allowed))
    }
}

mod opt_text {
    use super::*;

    pub fn serialize<T: Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }
}

mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let raw = scalar(d)?;
        duration_of(&raw).map_err(|allowed| refused(&raw, &allowed))
    }
}

mod opt_duration {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(&humantime::format_duration(*v)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let raw = scalar(d)?;
        if raw.is_empty() {
            return Ok(None);
        }
        duration_of(&raw)
            .map(Some)
            .map_err(|allowed| refused(&raw, &allowed))
    }
}

mod node_name {
    use super::*;

    pub fn serialize<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        super::text::deserialize::<NodeName, D>(d).map(|n| n.0)
    }
}

mod abs_path {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Path, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&v.display())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        super::text::deserialize::<AbsPath, D>(d).map(|p| p.0)
    }
}

/// An optional path; empty means unset.
mod opt_path {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(p) => s.collect_str(&p.display()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        let raw = scalar(d)?;
        Ok((!raw.is_empty()).then(|| PathBuf::from(raw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sources<'a>(pairs: &[(&str, &str)]) -> Sources<'a> {
        Sources {
            env: env(pairs),
            hostname: Some("host-a".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_take_hostname_and_vms_scope() {
        let s = load(&sources(&[])).unwrap();
        assert_eq!(s.node, "host-a");
        assert_eq!(s.scope, Scope::Vms);
        assert_eq!(s.safety_margin, Settings::DEFAULT_SAFETY_MARGIN);
        assert_eq!(s.deadline, None);
        assert!(!s.write_logind_dropin);
        assert_eq!(s.log_format, LogFormat::Text);
    }

    #[test]
    fn node_name_from_downward_api_beats_hostname_and_env_key_beats_both() {
        assert_eq!(
            load(&sources(&[("NODE_NAME", "node-1")])).unwrap().node,
            "node-1"
        );
        let s = load(&sources(&[
            ("NODE_NAME", "node-1"),
            ("SHUTDOWN_GUARD_NODE", "node-2"),
        ]))
        .unwrap();
        assert_eq!(s.node, "node-2");
    }

    #[test]
    fn flags_beat_env_which_beats_file() {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        writeln!(
            f,
            "scope = \"all\"\nsafety_margin = 7\nlog_format = \"json\""
        )
        .unwrap();
        let mut src = sources(&[("SHUTDOWN_GUARD_SAFETY_MARGIN", "3s")]);
        src.file = Some(f.path());
        let s = load(&src).unwrap();
        assert_eq!(s.scope, Scope::All);
        assert_eq!(s.safety_margin, Duration::from_secs(3));
        assert_eq!(s.log_format, LogFormat::Json);
        src.flags.safety_margin = Some(parse_flag_duration("1500ms").unwrap());
        src.flags.scope = Some("vms".parse().unwrap());
        let s = load(&src).unwrap();
        assert_eq!(s.safety_margin, Duration::from_millis(1500));
        assert_eq!(s.scope, Scope::Vms);
    }

    #[test]
    fn yaml_file_is_read() {
        let mut f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        writeln!(f, "deadline: 2m\nwrite_logind_dropin: true").unwrap();
        let mut src = sources(&[]);
        src.file = Some(f.path());
        let s = load(&src).unwrap();
        assert_eq!(s.deadline, Some(Duration::from_secs(120)));
        assert!(s.write_logind_dropin);
    }

    fn invalid(src: &Sources<'_>) -> (String, String, String) {
        match load(src).unwrap_err() {
            ConfigError::Invalid {
                key,
                value,
                allowed,
            } => (key, value, allowed),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn bad_values_name_key_value_and_what_is_allowed() {
        let (k, v, a) = invalid(&sources(&[("SHUTDOWN_GUARD_SCOPE", "everything")]));
        assert_eq!((k.as_str(), v.as_str()), ("scope", "everything"));
        assert!(a.contains("vms") && a.contains("all"), "{a}");

        let (k, v, _) = invalid(&sources(&[("SHUTDOWN_GUARD_SAFETY_MARGIN", "soon")]));
        assert_eq!((k.as_str(), v.as_str()), ("safety_margin", "soon"));

        let (k, _, _) = invalid(&sources(&[("NODE_NAME", "Node_1")]));
        assert_eq!(k, "node");

        let (k, _, a) = invalid(&sources(&[("SHUTDOWN_GUARD_LOG_FORMAT", "xml")]));
        assert_eq!(k, "log_format");
        assert!(a.contains("json"));

        let (k, _, _) = invalid(&sources(&[("SHUTDOWN_GUARD_DEADLINE", "0")]));
        assert_eq!(k, "deadline");

        let (k, _, _) = invalid(&sources(&[("SHUTDOWN_GUARD_HOST_ROOT", "host")]));
        assert_eq!(k, "host_root");

        let (k, _, _) = invalid(&sources(&[
            ("SHUTDOWN_GUARD_WRITE_LOGIND_DROPIN", "true"),
            ("SHUTDOWN_GUARD_LOGIND_DROPIN", "/tmp/x.conf"),
        ]));
        assert_eq!(k, "logind_dropin");

        let msg = load(&sources(&[("SHUTDOWN_GUARD_SCOPE", "x")]))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("scope") && msg.contains("\"x\""), "{msg}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = load(&sources(&[("SHUTDOWN_GUARD_SAFETY_MARGN", "3s")])).unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownKey { key, .. } if key == "safety_margn"),
            "{err:?}"
        );
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        writeln!(f, "scop = \"all\"").unwrap();
        let mut src = sources(&[]);
        src.file = Some(f.path());
        assert!(matches!(
            load(&src).unwrap_err(),
            ConfigError::UnknownKey { .. }
        ));
    }

    #[test]
    fn no_node_name_anywhere_is_an_error() {
        let src = Sources::default();
        let (k, _, _) = invalid(&src);
        assert_eq!(k, "node");
    }

    #[test]
    fn every_setting_round_trips_through_its_own_text() {
        // The flags reach the settings as text; what a setting writes, it must read back.
        let mut s = Settings {
            node: "node-1".into(),
            kubeconfig: Some(PathBuf::from("/k")),
            scope: Scope::All,
            safety_margin: Duration::from_millis(1500),
            deadline: Some(Duration::from_secs(90)),
            drain_budget: Duration::from_secs(600),
            write_logind_dropin: true,
            log_format: LogFormat::Json,
            listen_address: "127.0.0.1:9".parse().unwrap(),
            ..Settings::default()
        };
        s.host_root = "/host".into();
        let c = config::Config::try_from(&s).unwrap();
        let back: Settings = c.try_deserialize().unwrap();
        assert_eq!(back, s);
    }
}
