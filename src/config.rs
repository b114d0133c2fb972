//! Agent settings from, lowest to highest precedence: built-in defaults, a TOML or YAML file,
//! `SHUTDOWN_GUARD_*` environment variables and command-line flags.
//!
//! Every value goes through the `config` crate as a string and is validated here, so a bad value
//! is reported with its key, the value given and what is allowed, whatever source it came from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment prefix: `SHUTDOWN_GUARD_SAFETY_MARGIN=10s` sets `safety_margin`.
pub const ENV_PREFIX: &str = "SHUTDOWN_GUARD";

/// Keys the agent understands; anything else in a file or a `SHUTDOWN_GUARD_*` variable is an
/// error, because a misspelt key silently falling back to a default is worse than not starting.
pub const KEYS: &[&str] = &[
    "node",
    "kubeconfig",
    "scope",
    "safety_margin",
    "deadline",
    "drain_budget",
    "write_logind_dropin",
    "logind_dropin",
    "host_root",
    "boot_id_path",
    "log_format",
    "listen_address",
];

/// Which pods a drain evicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only virt-launcher pods (`kubectl drain --pod-selector=kubevirt.io=virt-launcher`).
    Vms,
    /// Every pod but DaemonSet and mirror pods, VMs first
    /// (`kubectl drain --ignore-daemonsets --delete-emptydir-data --force`).
    All,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scope::Vms => "vms",
            Scope::All => "all",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub node: String,
    pub kubeconfig: Option<PathBuf>,
    pub scope: Scope,
    /// Taken off logind's `InhibitDelayMaxUSec` so the lock is closed before logind stops waiting.
    pub safety_margin: Duration,
    /// Fixed drain deadline (from the shutdown signal), replacing the one derived from logind.
    pub deadline: Option<Duration>,
    /// How long a drain is wanted to take at most; logind's delay should be at least this long.
    pub drain_budget: Duration,
    /// Write a logind drop-in raising `InhibitDelayMaxSec` to `drain_budget + safety_margin`.
    pub write_logind_dropin: bool,
    /// The drop-in written when `write_logind_dropin` is on, relative to `host_root`.
    pub logind_dropin: PathBuf,
    /// Where the host's filesystem is mounted (a DaemonSet mounts it under e.g. `/host`).
    pub host_root: PathBuf,
    pub boot_id_path: PathBuf,
    pub log_format: LogFormat,
    /// Where `/metrics`, `/healthz`, `/readyz` and `/status` are served.
    pub listen_address: std::net::SocketAddr,
}

impl Settings {
    pub const DEFAULT_SAFETY_MARGIN: Duration = Duration::from_secs(5);
    pub const DEFAULT_DRAIN_BUDGET: Duration = Duration::from_secs(300);
    pub const DEFAULT_DROPIN: &'static str = "/etc/systemd/logind.conf.d/99-shutdown-guard.conf";
    pub const DEFAULT_BOOT_ID_PATH: &'static str = "/proc/sys/kernel/random/boot_id";
    /// The DaemonSet's probes and Prometheus scrape this port.
    pub const DEFAULT_LISTEN_ADDRESS: &'static str = "0.0.0.0:8080";
}

/// Values given on the command line; `None` leaves the key to lower-precedence sources.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub values: Vec<(&'static str, String)>,
}

impl Overrides {
    pub fn set(&mut self, key: &'static str, value: Option<impl ToString>) {
        if let Some(v) = value {
            self.values.push((key, v.to_string()));
        }
    }
}

/// Where settings come from, so tests can load them without touching the process environment.
#[derive(Debug, Clone, Default)]
pub struct Sources<'a> {
    pub file: Option<&'a Path>,
    /// The whole environment (only `SHUTDOWN_GUARD_*` and `NODE_NAME` are read).
    pub env: HashMap<String, String>,
    pub overrides: Overrides,
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
    for k in prefixed.keys() {
        let key = k[ENV_PREFIX.len() + 1..].to_ascii_lowercase();
        if !KEYS.contains(&key.as_str()) {
            return Err(ConfigError::UnknownKey {
                key,
                origin: format!("environment variable {k}"),
                known: KEYS.join(", "),
            });
        }
    }

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
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .try_parsing(false)
            .source(Some(prefixed.into_iter().collect())),
    );
    for (key, value) in &sources.overrides.values {
        builder = builder.set_override(*key, value.as_str())?;
    }
    let merged = builder.build()?;

    let table: HashMap<String, config::Value> = merged.clone().try_deserialize()?;
    for key in table.keys() {
        if !KEYS.contains(&key.as_str()) {
            return Err(ConfigError::UnknownKey {
                key: key.clone(),
                origin: sources
                    .file
                    .map(|f| f.display().to_string())
                    .unwrap_or_else(|| "configuration".into()),
                known: KEYS.join(", "),
            });
        }
    }
    let get = |key: &str| -> Result<Option<String>, ConfigError> {
        match merged.get_string(key) {
            Ok(v) => Ok(Some(v)),
            Err(config::ConfigError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    };

    let node = match get("node")? {
        Some(n) => validate_node_name(&n)?,
        None => {
            return Err(ConfigError::invalid(
                "node",
                "",
                "a node name (set --node, SHUTDOWN_GUARD_NODE or NODE_NAME; the hostname is unavailable)",
            ));
        }
    };
    let scope = match get("scope")?.as_deref() {
        None | Some("vms") => Scope::Vms,
        Some("all") => Scope::All,
        Some(other) => return Err(ConfigError::invalid("scope", other, "one of: vms, all")),
    };
    let log_format = match get("log_format")?.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            return Err(ConfigError::invalid(
                "log_format",
                other,
                "one of: json, text",
            ));
        }
    };
    let duration = |key: &str| -> Result<Option<Duration>, ConfigError> {
        get(key)?.map(|v| parse_duration(key, &v)).transpose()
    };
    let safety_margin = duration("safety_margin")?.unwrap_or(Settings::DEFAULT_SAFETY_MARGIN);
    let deadline = duration("deadline")?;
    if deadline == Some(Duration::ZERO) {
        return Err(ConfigError::invalid(
            "deadline",
            "0s",
            "a positive duration such as 90s or 2m",
        ));
    }
    let drain_budget = duration("drain_budget")?.unwrap_or(Settings::DEFAULT_DRAIN_BUDGET);
    if drain_budget.is_zero() {
        return Err(ConfigError::invalid(
            "drain_budget",
            "0s",
            "a positive duration such as 300s or 5m",
        ));
    }
    let write_logind_dropin = match get("write_logind_dropin")?.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ConfigError::invalid(
                "write_logind_dropin",
                other,
                "true or false",
            ));
        }
    };
    let absolute = |key: &str, default: &str| -> Result<PathBuf, ConfigError> {
        let v = get(key)?.unwrap_or_else(|| default.to_string());
        if !v.starts_with('/') {
            return Err(ConfigError::invalid(key, &v, "an absolute path"));
        }
        Ok(PathBuf::from(v))
    };
    let logind_dropin = absolute("logind_dropin", Settings::DEFAULT_DROPIN)?;
    if write_logind_dropin && !is_logind_dropin_dir(&logind_dropin) {
        return Err(ConfigError::invalid(
            "logind_dropin",
            &logind_dropin.display().to_string(),
            "a *.conf file directly under /etc/systemd/logind.conf.d, /run/systemd/logind.conf.d or /etc/elogind/logind.conf.d",
        ));
    }
    let host_root = absolute("host_root", "/")?;
    let boot_id_path = absolute("boot_id_path", Settings::DEFAULT_BOOT_ID_PATH)?;
    let kubeconfig = get("kubeconfig")?
        .filter(|k| !k.is_empty())
        .map(PathBuf::from);

    let listen_address = {
        let v =
            get("listen_address")?.unwrap_or_else(|| Settings::DEFAULT_LISTEN_ADDRESS.to_string());
        v.parse().map_err(|_| {
            ConfigError::invalid(
                "listen_address",
                &v,
                "an IP address and port such as 0.0.0.0:8080",
            )
        })?
    };

    Ok(Settings {
        node,
        kubeconfig,
        scope,
        safety_margin,
        deadline,
        drain_budget,
        write_logind_dropin,
        logind_dropin,
        host_root,
        boot_id_path,
        log_format,
        listen_address,
    })
}

fn is_logind_dropin_dir(p: &Path) -> bool {
    let ok_dir = p.parent().is_some_and(|d| {
        d == Path::new("/etc/systemd/logind.conf.d")
            || d == Path::new("/run/systemd/logind.conf.d")
            || d == Path::new("/etc/elogind/logind.conf.d")
    });
    ok_dir && p.extension().is_some_and(|e| e == "conf")
}

/// `90s`, `2m 30s`, `1500ms` (humantime) or a bare number of seconds.
pub fn parse_duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(v).map_err(|_| {
        ConfigError::invalid(
            key,
            value,
            "a duration such as 30s, 2m, 1500ms or a number of seconds",
        )
    })
}

/// Node names are DNS subdomains (RFC 1123): lowercase alphanumerics, `-` and `.`, at most 253.
fn validate_node_name(n: &str) -> Result<String, ConfigError> {
    let ok = !n.is_empty()
        && n.len() <= 253
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
        Ok(n.to_string())
    } else {
        Err(ConfigError::invalid(
            "node",
            n,
            "a DNS subdomain: lowercase letters, digits, '-' and '.', at most 253 characters",
        ))
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
        src.overrides.set("safety_margin", Some("1500ms"));
        src.overrides.set("scope", Some("vms"));
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
}
