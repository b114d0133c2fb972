//! The bed's control channel: power commands a pod cannot perform itself (it lives in a child
//! PID namespace of its node and cannot see the machine's PIDs to `nsenter` anything), and the
//! faults a test or a person asks for while the bed runs (`testbed fault …`): kube-apiserver and
//! its connections, logind, the bus, units, pods, and the KubeVirt simulator's eviction webhook
//! and migrations.
//!
//! The bed listens on a loopback TCP port and writes small bash scripts that speak to it
//! (`bash`'s `/dev/tcp`), so a pod needs nothing but bash: `TESTBED_POWEROFF`,
//! `TESTBED_REBOOT` and `TESTBED_WAIT_POWEROFF` name its node's scripts, `TESTBED_CTL` takes
//! any request as its arguments. One request a connection: a [`Request`] on one line, answered
//! by `ok [detail]` or `error: …`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::{Duration, UNIX_EPOCH};

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::apiproxy::Freeze;
use crate::bed::{BedError, BedShared, NODE, VM_NAMESPACE};
use crate::kubevirt::WebhookFault;

/// How long `wait-poweroff` waits for the node.
const WAIT_POWEROFF: Duration = Duration::from_secs(300);

/// What the ctl server can be asked, one line each (`Display` writes the line `FromStr` reads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `poweroff [NODE]`: start the node's power-off (node-1 when none is named).
    PowerOff { node: String },
    /// `reboot [NODE]` (systemd nodes).
    Reboot { node: String },
    /// `wait-poweroff [NODE]`: answer with the power-off moment (unix seconds) once it comes.
    WaitPowerOff { node: String },
    /// `api stop`: stop kube-apiserver.
    ApiStop,
    /// `api start`: start it again (same port and etcd) and wait until it is ready.
    ApiStart,
    /// `api freeze [all|established]`: stall client connections (default all).
    ApiFreeze(Freeze),
    /// `api thaw`: forward again.
    ApiThaw,
    /// `api reset`: RST every open client connection.
    ApiReset,
    /// `restart logind NODE`.
    RestartLogind { node: String },
    /// `restart bus NODE` (logind restarts with it).
    RestartBus { node: String },
    /// `mask NODE UNIT` (systemd nodes, until the node's next boot).
    Mask { node: String, unit: String },
    /// `unmask NODE UNIT`.
    Unmask { node: String, unit: String },
    /// `kill NODE [SIGNAL]`: signal the program of every pod the bed started on NODE
    /// (default SIGKILL).
    Kill { node: String, signal: Signal },
    /// `kill-pid PID [SIGNAL]`: signal one process (host PID) of a pod the bed started.
    KillPid { pid: u32, signal: Signal },
    /// `oom NODE`: exceed the memory limit of every limited pod on NODE.
    Oom { node: String },
    /// `kubevirt webhook down|up`, `kubevirt webhook slow SECONDS`: virt-api's eviction
    /// webhook refuses connections, answers that late, or works again.
    KubeVirtWebhook(WebhookFault),
    /// `kubevirt fail|stall [NAMESPACE/]VMI [COUNT]`: the VMI's next COUNT (default 1)
    /// migrations fail half-way through the copy, or stall until the KubeVirt CR's
    /// `progressTimeout`.
    KubeVirtMigrations {
        fault: MigrationFault,
        vmi: VmiRef,
        count: u32,
    },
    /// `kubevirt failure-probability P`: any migration fails with probability P (0 to 1).
    KubeVirtFailureProbability(Probability),
    /// `status`: the API server, the proxy, the KubeVirt faults, each node's logind and pods.
    Status,
}

macro_rules! kubevirt_grammar {
    () => {
        "kubevirt webhook down|up|slow SECONDS; kubevirt fail|stall [NAMESPACE/]VMI [COUNT]; \
         kubevirt failure-probability P"
    };
}

/// The KubeVirt requests, for error messages.
pub const KUBEVIRT_GRAMMAR: &str = kubevirt_grammar!();

/// The requests, for error messages.
pub const GRAMMAR: &str = concat!(
    "poweroff|reboot|wait-poweroff [NODE]; api stop|start|thaw|reset; \
     api freeze [all|established]; restart logind|bus NODE; mask|unmask NODE UNIT; \
     kill NODE [SIGNAL]; kill-pid PID [SIGNAL]; oom NODE; ",
    kubevirt_grammar!(),
    "; status"
);

/// What an injected fault does to a VMI's next migrations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationFault {
    /// Fails half-way through the copy; the VMI stays on its source.
    Fail,
    /// Makes no progress, so virt-launcher aborts it after the CR's `progressTimeout`.
    Stall,
}

impl MigrationFault {
    fn verb(self) -> &'static str {
        match self {
            Self::Fail => "fail",
            Self::Stall => "stall",
        }
    }
}

/// A VMI named `NAMESPACE/NAME`, or `NAME` in the bed's namespace ([`VM_NAMESPACE`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmiRef {
    pub namespace: String,
    pub name: String,
}

impl FromStr for VmiRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (namespace, name) = s.split_once('/').unwrap_or((VM_NAMESPACE, s));
        let valid = |part: &str| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        };
        if valid(namespace) && valid(name) {
            Ok(Self {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
        } else {
            Err(format!(
                "{s:?} is not a VMI: give NAMESPACE/NAME or NAME (in {VM_NAMESPACE}), e.g. live-1"
            ))
        }
    }
}

impl std::fmt::Display for VmiRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A probability from 0 to 1; never NaN, hence `Eq`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Probability(f64);

impl Eq for Probability {}

impl Probability {
    pub fn get(self) -> f64 {
        self.0
    }
}

impl FromStr for Probability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.parse::<f64>() {
            Ok(p) if (0.0..=1.0).contains(&p) => Ok(Self(p)),
            _ => Err(format!(
                "{s:?} is not a probability: give a number from 0 to 1 (e.g. 0.25; 0 turns it off)"
            )),
        }
    }
}

impl std::fmt::Display for Probability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The longest delay `kubevirt webhook slow` takes: kube-apiserver gives up on the webhook
/// after its 10 s timeout, so more changes nothing but how long the webhook holds a task.
const MAX_WEBHOOK_DELAY: f64 = 60.0;

/// Seconds for `kubevirt webhook slow`: above 0, at most 60, fractions allowed.
pub fn parse_webhook_delay(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs <= MAX_WEBHOOK_DELAY => Ok(Duration::from_secs_f64(secs)),
        _ => Err(format!(
            "{s:?} is not a webhook delay: give seconds above 0 and at most {MAX_WEBHOOK_DELAY} \
             (past the webhook's 10 s timeout kube-apiserver fails the eviction; \
             `kubevirt webhook up` removes the delay)"
        )),
    }
}

/// `kubevirt …` requests (the words after `kubevirt`).
fn parse_kubevirt(line: &str, words: &[&str]) -> Result<Request, String> {
    let bad = |why: String| format!("{line:?}: {why} (KubeVirt faults: {KUBEVIRT_GRAMMAR})");
    let request = match words {
        ["webhook", "down"] => Request::KubeVirtWebhook(WebhookFault::Down),
        ["webhook", "up"] => Request::KubeVirtWebhook(WebhookFault::None),
        ["webhook", "slow", secs] => {
            Request::KubeVirtWebhook(WebhookFault::Slow(parse_webhook_delay(secs).map_err(bad)?))
        }
        [verb @ ("fail" | "stall"), vmi, rest @ ..] if rest.len() <= 1 => {
            let count = match rest.first() {
                None => 1,
                Some(n) => n.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                    bad(format!("{n:?} is not a count of migrations (1 or more)"))
                })?,
            };
            Request::KubeVirtMigrations {
                fault: if *verb == "fail" {
                    MigrationFault::Fail
                } else {
                    MigrationFault::Stall
                },
                vmi: vmi.parse().map_err(bad)?,
                count,
            }
        }
        ["failure-probability", p] => Request::KubeVirtFailureProbability(p.parse().map_err(bad)?),
        _ => return Err(bad("unknown KubeVirt fault".into())),
    };
    Ok(request)
}

/// `KILL`, `SIGKILL`, `kill` or `9`.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("no signal number {n}"));
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map_err(|_| format!("unknown signal {s:?} (e.g. KILL, TERM, 9)"))
}

impl FromStr for Request {
    type Err = String;

    fn from_str(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let node = |i: usize| words.get(i).map_or(NODE.to_owned(), |n| (*n).to_owned());
        let need = |i: usize, what: &str| {
            words
                .get(i)
                .map(|w| (*w).to_owned())
                .ok_or_else(|| format!("{line:?}: {what} missing ({GRAMMAR})"))
        };
        let signal = |i: usize| {
            words
                .get(i)
                .map_or(Ok(Signal::SIGKILL), |s| parse_signal(s))
        };
        let request = match words.as_slice() {
            ["poweroff", ..] if words.len() <= 2 => Self::PowerOff { node: node(1) },
            ["reboot", ..] if words.len() <= 2 => Self::Reboot { node: node(1) },
            ["wait-poweroff", ..] if words.len() <= 2 => Self::WaitPowerOff { node: node(1) },
            ["api", "stop"] => Self::ApiStop,
            ["api", "start"] => Self::ApiStart,
            ["api", "freeze"] => Self::ApiFreeze(Freeze::All),
            ["api", "freeze", scope] => Self::ApiFreeze(scope.parse()?),
            ["api", "thaw"] => Self::ApiThaw,
            ["api", "reset"] => Self::ApiReset,
            ["restart", "logind", n] => Self::RestartLogind {
                node: (*n).to_owned(),
            },
            ["restart", "bus", n] => Self::RestartBus {
                node: (*n).to_owned(),
            },
            ["mask", ..] if words.len() == 3 => Self::Mask {
                node: need(1, "NODE")?,
                unit: need(2, "UNIT")?,
            },
            ["unmask", ..] if words.len() == 3 => Self::Unmask {
                node: need(1, "NODE")?,
                unit: need(2, "UNIT")?,
            },
            ["kill", ..] if (2..=3).contains(&words.len()) => Self::Kill {
                node: need(1, "NODE")?,
                signal: signal(2)?,
            },
            ["kill-pid", pid, ..] if words.len() <= 3 => Self::KillPid {
                pid: pid
                    .parse()
                    .map_err(|_| format!("{pid:?} is not a PID ({GRAMMAR})"))?,
                signal: signal(2)?,
            },
            ["oom", n] => Self::Oom {
                node: (*n).to_owned(),
            },
            ["kubevirt", rest @ ..] => parse_kubevirt(line, rest)?,
            ["status"] => Self::Status,
            _ => return Err(format!("unknown request {line:?}; requests: {GRAMMAR}")),
        };
        Ok(request)
    }
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PowerOff { node } => write!(f, "poweroff {node}"),
            Self::Reboot { node } => write!(f, "reboot {node}"),
            Self::WaitPowerOff { node } => write!(f, "wait-poweroff {node}"),
            Self::ApiStop => f.write_str("api stop"),
            Self::ApiStart => f.write_str("api start"),
            Self::ApiFreeze(Freeze::All) => f.write_str("api freeze all"),
            Self::ApiFreeze(Freeze::Established) => f.write_str("api freeze established"),
            Self::ApiThaw => f.write_str("api thaw"),
            Self::ApiReset => f.write_str("api reset"),
            Self::RestartLogind { node } => write!(f, "restart logind {node}"),
            Self::RestartBus { node } => write!(f, "restart bus {node}"),
            Self::Mask { node, unit } => write!(f, "mask {node} {unit}"),
            Self::Unmask { node, unit } => write!(f, "unmask {node} {unit}"),
            Self::Kill { node, signal } => write!(f, "kill {node} {}", signal.as_str()),
            Self::KillPid { pid, signal } => write!(f, "kill-pid {pid} {}", signal.as_str()),
            Self::Oom { node } => write!(f, "oom {node}"),
            Self::KubeVirtWebhook(WebhookFault::None) => f.write_str("kubevirt webhook up"),
            Self::KubeVirtWebhook(WebhookFault::Down) => f.write_str("kubevirt webhook down"),
            Self::KubeVirtWebhook(WebhookFault::Slow(d)) => {
                write!(f, "kubevirt webhook slow {}", d.as_secs_f64())
            }
            Self::KubeVirtMigrations { fault, vmi, count } => {
                write!(f, "kubevirt {} {vmi} {count}", fault.verb())
            }
            Self::KubeVirtFailureProbability(p) => write!(f, "kubevirt failure-probability {p}"),
            Self::Status => f.write_str("status"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(
        "cannot reach the bed's ctl port {port}: {source} (is a bed up? `testbed up` prints TESTBED_CTL_PORT)"
    )]
    Connect {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("ctl port {port}: {source}")]
    Io {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("the bed refused `{request}`: {answer}")]
    Refused { request: String, answer: String },
}

/// Sends one request to a running bed's ctl server and returns the detail of its `ok` answer.
pub async fn send(port: u16, request: &Request) -> Result<String, CtlError> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|source| CtlError::Connect { port, source })?;
    let (read, mut write) = stream.into_split();
    let io = |source| CtlError::Io { port, source };
    write
        .write_all(format!("{request}\n").as_bytes())
        .await
        .map_err(io)?;
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .map_err(io)?;
    let answer = answer.trim_end();
    match answer.strip_prefix("ok") {
        Some(rest) => Ok(rest.trim_start().to_owned()),
        None => Err(CtlError::Refused {
            request: request.to_string(),
            answer: answer.trim_start_matches("error: ").to_owned(),
        }),
    }
}

pub struct CtlServer {
    port: u16,
    scripts: PathBuf,
    task: JoinHandle<()>,
}

impl Drop for CtlServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CtlServer {
    /// Serves the bed's nodes and faults without owning them: the bed tears everything down
    /// whatever the server does.
    pub(crate) fn start(
        dir: &Path,
        shared: &Arc<BedShared>,
        nodes: &[String],
    ) -> Result<Self, BedError> {
        let shared: Weak<BedShared> = Arc::downgrade(shared);
        let io = |what: &str| {
            let what = what.to_owned();
            move |error| BedError::Io { what, error }
        };
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(io("binding the ctl port"))?;
        std_listener
            .set_nonblocking(true)
            .map_err(io("ctl port non-blocking"))?;
        let port = std_listener.local_addr().map_err(io("ctl port"))?.port();
        let listener = TcpListener::from_std(std_listener).map_err(io("ctl listener"))?;

        let scripts = dir.join("ctl");
        let write_script = |path: &Path, text: String| -> Result<(), BedError> {
            std::fs::write(path, text).map_err(io("writing a ctl script"))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
                .map_err(io("chmod a ctl script"))
        };
        for node in nodes {
            let folder = scripts.join(node);
            std::fs::create_dir_all(&folder).map_err(io("creating the ctl folder"))?;
            for verb in ["poweroff", "reboot", "wait-poweroff"] {
                write_script(
                    &folder.join(format!("testbed-{verb}")),
                    client_script(port, &format!("testbed-{verb}"), &format!("{verb} {node}")),
                )?;
            }
        }
        std::fs::create_dir_all(&scripts).map_err(io("creating the ctl folder"))?;
        write_script(
            &scripts.join("testbed-ctl"),
            client_script(port, "testbed-ctl", "$*"),
        )?;

        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut line = String::new();
                    if BufReader::new(read).read_line(&mut line).await.is_err() {
                        return;
                    }
                    let answer = match (line.trim().parse::<Request>(), shared.upgrade()) {
                        (Err(e), _) => format!("error: {e}"),
                        (Ok(_), None) => "error: the bed is shutting down".to_owned(),
                        (Ok(request), Some(shared)) => match serve(&request, &shared).await {
                            Ok(detail) if detail.is_empty() => "ok".into(),
                            Ok(detail) => format!("ok {detail}"),
                            Err(e) => format!("error: {e}"),
                        },
                    };
                    let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
                });
            }
        });
        Ok(Self {
            port,
            scripts,
            task,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `node`'s script for `verb` (`poweroff`, `reboot`, `wait-poweroff`).
    pub fn node_script(&self, node: &str, verb: &str) -> PathBuf {
        self.scripts.join(node).join(format!("testbed-{verb}"))
    }

    /// The script that sends its arguments as one request (`testbed-ctl api freeze`).
    pub fn ctl_script(&self) -> PathBuf {
        self.scripts.join("testbed-ctl")
    }
}

async fn serve(request: &Request, shared: &BedShared) -> Result<String, BedError> {
    let none = |()| String::new();
    match request {
        Request::PowerOff { node } => shared
            .logind(node)?
            .read()
            .await
            .poweroff()
            .await
            .map(none)
            .map_err(Into::into),
        Request::Reboot { node } => {
            let logind = shared.logind(node)?;
            let guard = logind.read().await;
            let systemd = guard.systemd_ref().ok_or_else(|| {
                BedError::Unsupported(format!(
                    "reboot of {node}: it runs elogind, use a systemd node"
                ))
            })?;
            systemd.reboot().await.map(none).map_err(Into::into)
        }
        Request::WaitPowerOff { node } => {
            let logind = shared.logind(node)?;
            let at = logind.read().await.wait_poweroff(WAIT_POWEROFF).await?;
            let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
            Ok(format!("{}.{:09}", d.as_secs(), d.subsec_nanos()))
        }
        Request::ApiStop => shared.api.stop().await.map(none).map_err(Into::into),
        Request::ApiStart => shared.api.start().await.map(none).map_err(Into::into),
        Request::ApiFreeze(scope) => {
            shared.api.freeze(*scope);
            Ok(format!(
                "{} open connection(s) frozen",
                shared.api.proxy().open_connections()
            ))
        }
        Request::ApiThaw => {
            shared.api.thaw();
            Ok(String::new())
        }
        Request::ApiReset => {
            let open = shared.api.proxy().open_connections();
            shared.api.reset();
            Ok(format!("{open} connection(s) reset"))
        }
        Request::RestartLogind { node } => shared.restart_logind(node).await.map(none),
        Request::RestartBus { node } => shared.restart_bus(node).await.map(none),
        Request::Mask { node, unit } => shared.mask_unit(node, unit, true).await.map(none),
        Request::Unmask { node, unit } => shared.mask_unit(node, unit, false).await.map(none),
        Request::Kill { node, signal } => shared.kill_pods(node, *signal).await,
        Request::KillPid { pid, signal } => {
            let pod = crate::pod::signal_registered(&shared.pods, *pid, *signal)?;
            Ok(format!(
                "{} sent to pid {pid} of pod {pod}",
                signal.as_str()
            ))
        }
        Request::Oom { node } => shared.oom_pods(node).await,
        Request::KubeVirtWebhook(fault) => {
            shared.kubevirt.apply_webhook_fault(*fault).await?;
            Ok(match fault {
                WebhookFault::None => "eviction webhook up".to_owned(),
                WebhookFault::Down => "eviction webhook down: evictions of virt-launcher pods \
                    fail (failurePolicy Fail)"
                    .to_owned(),
                WebhookFault::Slow(d) => {
                    format!("eviction webhook answers after {} s", d.as_secs_f64())
                }
            })
        }
        Request::KubeVirtMigrations { fault, vmi, count } => {
            let known = shared.kubevirt.vmis();
            if !known.contains(&vmi.to_string()) {
                return Err(BedError::Invalid(format!(
                    "no VMI {vmi} (VMIs: {}); name one as NAMESPACE/NAME, or NAME in {VM_NAMESPACE}",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )));
            }
            let (namespace, name) = (&vmi.namespace, &vmi.name);
            match fault {
                MigrationFault::Fail => shared
                    .kubevirt
                    .fail_next_migrations(namespace, name, *count),
                MigrationFault::Stall => shared
                    .kubevirt
                    .stall_next_migrations(namespace, name, *count),
            }
            Ok(format!(
                "the next {count} migration(s) of {vmi} {}",
                match fault {
                    MigrationFault::Fail => "fail half-way through the copy",
                    MigrationFault::Stall => "stall until the KubeVirt CR's progressTimeout",
                }
            ))
        }
        Request::KubeVirtFailureProbability(p) => {
            shared.kubevirt.set_failure_probability(p.get());
            Ok(format!("any migration fails with probability {p}"))
        }
        Request::Status => Ok(shared.status().await),
    }
}

/// A bash client that sends `line` (with `$*` expanded), prints the detail, fails on an error.
fn client_script(port: u16, name: &str, line: &str) -> String {
    format!(
        r#"#!/bin/bash
# Written by the test bed: sends "{line}" to the bed (see tests/testbed/src/ctl.rs).
set -eu
exec 3<>/dev/tcp/127.0.0.1/{port}
printf '%s\n' "{line}" >&3
IFS= read -r answer <&3
case "$answer" in
  ok) exit 0 ;;
  "ok "*) printf '%s\n' "${{answer#ok }}"; exit 0 ;;
  *) printf '{name}: %s\n' "$answer" >&2; exit 1 ;;
esac
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_back_what_they_write() {
        let all = [
            Request::PowerOff {
                node: "node-2".into(),
            },
            Request::Reboot {
                node: "node-1".into(),
            },
            Request::WaitPowerOff {
                node: "node-3".into(),
            },
            Request::ApiStop,
            Request::ApiStart,
            Request::ApiFreeze(Freeze::All),
            Request::ApiFreeze(Freeze::Established),
            Request::ApiThaw,
            Request::ApiReset,
            Request::RestartLogind {
                node: "node-2".into(),
            },
            Request::RestartBus {
                node: "node-1".into(),
            },
            Request::Mask {
                node: "node-1".into(),
                unit: "poweroff.target".into(),
            },
            Request::Unmask {
                node: "node-1".into(),
                unit: "poweroff.target".into(),
            },
            Request::Kill {
                node: "node-1".into(),
                signal: Signal::SIGTERM,
            },
            Request::KillPid {
                pid: 4242,
                signal: Signal::SIGKILL,
            },
            Request::Oom {
                node: "node-2".into(),
            },
            Request::KubeVirtWebhook(WebhookFault::Down),
            Request::KubeVirtWebhook(WebhookFault::None),
            Request::KubeVirtWebhook(WebhookFault::Slow(Duration::from_millis(2500))),
            Request::KubeVirtMigrations {
                fault: MigrationFault::Fail,
                vmi: "default/live-1".parse().unwrap(),
                count: 2,
            },
            Request::KubeVirtMigrations {
                fault: MigrationFault::Stall,
                vmi: "other/live-2".parse().unwrap(),
                count: 1,
            },
            Request::KubeVirtFailureProbability("0.25".parse().unwrap()),
            Request::Status,
        ];
        for r in all {
            assert_eq!(r.to_string().parse::<Request>(), Ok(r.clone()), "{r}");
        }
    }

    #[test]
    fn node_one_is_the_default_and_signals_parse_every_way() {
        assert_eq!(
            "poweroff".parse::<Request>(),
            Ok(Request::PowerOff { node: NODE.into() })
        );
        assert_eq!(
            "kill node-2".parse::<Request>(),
            Ok(Request::Kill {
                node: "node-2".into(),
                signal: Signal::SIGKILL
            })
        );
        for s in ["TERM", "SIGTERM", "term", "15"] {
            assert_eq!(parse_signal(s), Ok(Signal::SIGTERM), "{s}");
        }
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn bad_requests_name_the_grammar() {
        for bad in [
            "",
            "api",
            "api freeze sideways",
            "kill",
            "mask node-1",
            "kill-pid x",
            "dance",
        ] {
            let err = bad.parse::<Request>().unwrap_err();
            assert!(
                err.contains("poweroff") || err.contains("all or established"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn kubevirt_requests_default_and_refuse_what_cannot_be() {
        assert_eq!(
            "kubevirt stall live-3".parse::<Request>(),
            Ok(Request::KubeVirtMigrations {
                fault: MigrationFault::Stall,
                vmi: VmiRef {
                    namespace: VM_NAMESPACE.into(),
                    name: "live-3".into()
                },
                count: 1,
            })
        );
        assert_eq!(
            "kubevirt webhook slow 0.5".parse::<Request>(),
            Ok(Request::KubeVirtWebhook(WebhookFault::Slow(
                Duration::from_millis(500)
            )))
        );
        for (bad, why) in [
            ("kubevirt", "unknown KubeVirt fault"),
            ("kubevirt webhook", "unknown KubeVirt fault"),
            ("kubevirt webhook sideways", "unknown KubeVirt fault"),
            ("kubevirt webhook slow 0", "not a webhook delay"),
            ("kubevirt webhook slow 61", "not a webhook delay"),
            ("kubevirt webhook slow soon", "not a webhook delay"),
            ("kubevirt fail", "unknown KubeVirt fault"),
            ("kubevirt fail live-1 0", "not a count of migrations"),
            ("kubevirt fail live-1 -2", "not a count of migrations"),
            ("kubevirt fail live-1 2 3", "unknown KubeVirt fault"),
            ("kubevirt stall Live_1", "not a VMI"),
            ("kubevirt stall ns/", "not a VMI"),
            ("kubevirt failure-probability 1.5", "not a probability"),
            ("kubevirt failure-probability -0.1", "not a probability"),
            ("kubevirt failure-probability NaN", "not a probability"),
        ] {
            let err = bad.parse::<Request>().unwrap_err();
            assert!(
                err.contains(why) && err.contains(KUBEVIRT_GRAMMAR),
                "{bad:?}: {err}"
            );
        }
        assert!(GRAMMAR.contains(KUBEVIRT_GRAMMAR) && GRAMMAR.ends_with("; status"));
    }
}
