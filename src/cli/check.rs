//! `shutdown-guard check`: a preflight run on the node that says, before any shutdown, whether
//! the agent could do its job there, one line per check with the fix when it fails.
//!
//! Gathering (D-Bus, the API server) is kept apart from judging: every `judge_*` function is
//! pure and unit-tested with plain values.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use zbus::Connection;

use crate::config::Settings;
use crate::drain::fate::{ClusterStrategy, Fate, VmiFacts, fate};
use crate::drain::power::{NodeView, PowerRule, Verdict, judge};
use crate::drain::report::{LastShutdown, ShutdownOutcome};
use crate::host::logind::{ManagerProxy, WHO};
use crate::kube::kubevirt::{cluster_strategy, node_vmis};
use crate::kube::objects::vmi_facts;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &str, message: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            status: Status::Pass,
            message: message.into(),
            fix: None,
        }
    }
    fn warn(name: &str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            status: Status::Warn,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(name: &str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            status: Status::Fail,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    pub node: String,
    /// No check failed (and, with `--strict`, none warned).
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl CheckReport {
    pub fn new(node: &str, checks: Vec<Check>, strict: bool) -> Self {
        let ok = checks.iter().all(|c| match c.status {
            Status::Pass => true,
            Status::Warn => !strict,
            Status::Fail => false,
        });
        CheckReport {
            node: node.into(),
            ok,
            checks,
        }
    }

    /// One line per check; the fix indented under a failing or warning one.
    pub fn render_text(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{}  {:width$}  {}\n",
                c.status.label(),
                c.name,
                c.message
            ));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("      {:width$}  fix: {fix}\n", ""));
            }
        }
        let (f, w) = (
            self.checks
                .iter()
                .filter(|c| c.status == Status::Fail)
                .count(),
            self.checks
                .iter()
                .filter(|c| c.status == Status::Warn)
                .count(),
        );
        out.push_str(&if f > 0 {
            format!(
                "node {}: {f} check(s) failed, {w} warning(s): a shutdown now would not be graceful\n",
                self.node
            )
        } else if w > 0 {
            format!("node {}: ready, with {w} warning(s)\n", self.node)
        } else {
            format!("node {}: ready for a graceful shutdown\n", self.node)
        });
        out
    }
}

// ---- judging (pure) -------------------------------------------------------------------------

pub fn judge_logind(bus: &str, delay: &Result<Duration, String>) -> Check {
    match delay {
        Ok(_) => Check::pass("logind", format!("logind answers on {bus}")),
        Err(e) => Check::fail(
            "logind",
            format!("logind does not answer on {bus}: {e}"),
            "run on the node with the host's system bus mounted (DBUS_SYSTEM_BUS_ADDRESS, e.g. \
             unix:path=/var/run/dbus/system_bus_socket) and systemd-logind or elogind running",
        ),
    }
}

pub fn judge_lock(taken: &Result<(), String>) -> Check {
    match taken {
        Ok(()) => Check::pass(
            "delay-lock",
            "a delay inhibitor lock on shutdown can be taken (taken and released at once)",
        ),
        Err(e) => Check::fail(
            "delay-lock",
            format!("logind refused a delay lock on shutdown: {e}"),
            "allow the agent org.freedesktop.login1.inhibit-delay-shutdown in polkit (root has it), \
             or run the agent as root",
        ),
    }
}

fn secs(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// logind's delay against what a drain needs: the drain budget plus the safety margin.
pub fn judge_delay(
    delay: Option<Duration>,
    budget: Duration,
    margin: Duration,
    set_by: Option<&(PathBuf, String)>,
    dropin: &std::path::Path,
) -> Check {
    let Some(delay) = delay else {
        return Check::fail(
            "inhibit-delay",
            "InhibitDelayMaxUSec could not be read",
            "see the logind check",
        );
    };
    let needed = budget + margin;
    let source = match set_by {
        Some((file, value)) => format!("InhibitDelayMaxSec={value} set by {}", file.display()),
        None => "no configuration file sets InhibitDelayMaxSec (logind's default, 5s)".into(),
    };
    if delay >= needed {
        return Check::pass(
            "inhibit-delay",
            format!(
                "logind waits up to {} for delay locks, enough for the drain budget {} + margin {} ({source})",
                secs(delay),
                secs(budget),
                secs(margin)
            ),
        );
    }
    let later_name = match set_by.and_then(|(f, _)| f.file_name()) {
        Some(n) if n.to_string_lossy().as_ref() >= "99-shutdown-guard.conf" => format!(
            "; the file setting it sorts after {} so name yours to sort after {}",
            dropin.display(),
            n.to_string_lossy()
        ),
        _ => String::new(),
    };
    Check::fail(
        "inhibit-delay",
        format!(
            "logind waits at most {} for delay locks but a drain needs {} (budget {} + margin {}): \
             VMs still on the node after {} are cut off ({source})",
            secs(delay),
            secs(needed),
            secs(budget),
            secs(margin),
            secs(delay)
        ),
        format!(
            "set InhibitDelayMaxSec={}s in {} and reload logind (or run the agent with \
             --write-logind-dropin){later_name}; or lower --drain-budget",
            needed.as_secs(),
            dropin.display()
        ),
    )
}

/// An inhibitor as logind lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inhibitor {
    pub what: String,
    pub who: String,
    pub why: String,
    pub mode: String,
    pub pid: u32,
}

/// Who we name our own short-lived lock.
pub const CHECK_WHO: &str = "shutdown-guard check";

pub fn judge_inhibitors(list: &[Inhibitor]) -> Check {
    let on_shutdown = |i: &&Inhibitor| i.what.split(':').any(|w| w == "shutdown");
    let agent = list
        .iter()
        .filter(on_shutdown)
        .any(|i| i.who == WHO && i.mode == "delay");
    let others: Vec<&Inhibitor> = list
        .iter()
        .filter(on_shutdown)
        .filter(|i| i.who != WHO && i.who != CHECK_WHO)
        .collect();
    let agent_note = if agent {
        "the agent's lock is held"
    } else {
        "the agent's lock is not held (agent not running here?)"
    };
    let names = |v: &[&Inhibitor]| {
        v.iter()
            .map(|i| format!("{} ({}, pid {}: {:?})", i.who, i.mode, i.pid, i.why))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let kubelet: Vec<&Inhibitor> = others
        .iter()
        .copied()
        .filter(|i| i.who == "kubelet" && i.mode == "delay")
        .collect();
    if !kubelet.is_empty() {
        return Check::fail(
            "inhibitors",
            format!(
                "kubelet holds a delay lock on shutdown ({}): kubelet graceful node shutdown kills the \
                 node's pods locally when the shutdown starts, without the Eviction API, so KubeVirt \
                 stops the VMs instead of migrating them; {agent_note}",
                names(&kubelet)
            ),
            "turn kubelet graceful node shutdown off: shutdownGracePeriod: 0s and \
             shutdownGracePeriodCriticalPods: 0s in the KubeletConfiguration, then restart kubelet",
        );
    }
    let blockers: Vec<&Inhibitor> = others
        .iter()
        .copied()
        .filter(|i| i.mode == "block")
        .collect();
    if !blockers.is_empty() {
        return Check::warn(
            "inhibitors",
            format!(
                "shutdown is blocked by {}: logind refuses the shutdown itself while it is held; {agent_note}",
                names(&blockers)
            ),
            "expected only while that program works; otherwise stop it",
        );
    }
    if !others.is_empty() {
        return Check::warn(
            "inhibitors",
            format!(
                "other delay locks on shutdown: {}; they share logind's InhibitDelayMaxSec with the agent; {agent_note}",
                names(&others)
            ),
            "make sure they release quickly, or their work may race the drain",
        );
    }
    Check::pass(
        "inhibitors",
        format!("no other program delays or blocks shutdown; {agent_note}"),
    )
}

/// The leading number of systemd's `Version` property (`252.30-1~deb12u2` → 252).
pub fn systemd_major(version: &str) -> Option<u32> {
    let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The first systemd whose legacy `reboot`, `poweroff`, `halt` and `shutdown now` ask logind
/// when run by root, and so wait for delay locks (systemd#22058). Measured on the bed: 247
/// goes around logind, 252 and 257 wait.
pub const LEGACY_COMMANDS_WAIT_SINCE: u32 = 251;

/// Which reboot and power-off commands wait for the agent's lock on this node's init:
/// `version` is systemd's `Version`, `None` when no systemd answers on the bus (elogind).
pub fn judge_reboot_commands(version: &Result<Option<String>, String>) -> Check {
    const NAME: &str = "reboot-commands";
    let v = match version {
        Err(e) => {
            return Check::warn(
                NAME,
                format!("systemd's version could not be read over the bus: {e}"),
                "run the check where the agent runs, with the host's system bus mounted",
            );
        }
        Ok(None) => {
            return Check::warn(
                NAME,
                "no systemd on the system bus (elogind?): only shutdowns asked of logind \
                 (`loginctl poweroff`, `loginctl reboot`, the power key it handles) wait for the \
                 agent's lock; the init system's own `reboot`, `poweroff`, `halt` and `shutdown` \
                 never ask it",
                "reboot with `loginctl reboot` (and power off with `loginctl poweroff`) in scripts \
                 and reboot tools",
            );
        }
        Ok(Some(v)) => v,
    };
    match systemd_major(v) {
        Some(major) if major >= LEGACY_COMMANDS_WAIT_SINCE => Check::pass(
            NAME,
            format!(
                "systemd {v}: every reboot and power-off command waits for the agent's lock, root's \
                 legacy `reboot` and `shutdown -r now` included"
            ),
        ),
        Some(_) => Check::warn(
            NAME,
            format!(
                "systemd {v}: run by root, the legacy `reboot`, `poweroff`, `halt` and `shutdown -r \
                 now` go straight to systemd, around logind: no PrepareForShutdown, the lock is not \
                 waited for and the node's VMs are cut off (systemd#22058, fixed in \
                 {LEGACY_COMMANDS_WAIT_SINCE}); `systemctl reboot`, `systemctl poweroff`, a \
                 scheduled `shutdown -r +N` and the power key do wait for it"
            ),
            format!(
                "reboot with `systemctl reboot` (power off with `systemctl poweroff`) in scripts and \
                 reboot tools, or move to systemd {LEGACY_COMMANDS_WAIT_SINCE} or later"
            ),
        ),
        None => Check::warn(
            NAME,
            format!("systemd reports version {v:?}, which this check cannot read"),
            "reboot with `systemctl reboot`, which waits for the lock on every systemd",
        ),
    }
}

/// How a shutdown scheduled with `shutdown -r +N` (unattended-upgrades, NUT's `upsmon`) gets
/// drained here: ahead of its time when the pre-drain is on (`lead`); otherwise when it starts,
/// which elogind never announces (it runs the shutdown without `PrepareForShutdown` and does not
/// wait for delay locks: measured on the bed). `systemd` is `Ok(None)` on elogind.
pub fn judge_scheduled(systemd: &Result<Option<String>, String>, lead: Option<Duration>) -> Check {
    const NAME: &str = "scheduled-shutdowns";
    let elogind = matches!(systemd, Ok(None));
    match (lead, elogind) {
        (Some(lead), false) => Check::pass(
            NAME,
            format!(
                "a scheduled shutdown is drained from {} before its time, so it starts on an                  empty node",
                secs(lead)
            ),
        ),
        (Some(lead), true) => Check::pass(
            NAME,
            format!(
                "a scheduled shutdown is drained from {} before its time: the only drain it                  gets here, since elogind runs it without PrepareForShutdown and without                  waiting for the lock",
                secs(lead)
            ),
        ),
        (None, false) => Check::pass(
            NAME,
            "pre_drain is off: a scheduled shutdown is drained when it starts, inside              InhibitDelayMaxSec",
        ),
        (None, true) => Check::warn(
            NAME,
            "pre_drain is off and elogind runs a scheduled shutdown (`shutdown -h +N`, NUT's              upsmon, unattended-upgrades) without PrepareForShutdown and without waiting for the              lock: its VMs are not drained at all",
            "set pre_drain: true (and pre_drain_lead long enough for a whole drain)",
        ),
    }
}

/// What a shutdown of `node` would do now, by the same rule as the agent's (a power event when
/// too few other nodes take VMs), and whether VMs stopped by an earlier power event wait to be
/// started again. `nodes` and `recorded` (VMs carrying a record) come from the API server.
pub fn judge_power_events(
    node: &str,
    min_targets: u32,
    restore: bool,
    nodes: &Result<Vec<NodeView>, String>,
    recorded: &Result<usize, String>,
) -> Check {
    const NAME: &str = "power-events";
    let waiting = match recorded {
        Ok(0) | Err(_) => String::new(),
        Ok(n) => format!("; {n} VM(s) stopped by a power event wait to be started again"),
    };
    if let Ok(n @ 1..) = recorded
        && !restore
    {
        return Check::warn(
            NAME,
            format!("power_event_restore is off: {n} VM(s) stopped by a power event stay stopped"),
            "start them (`virtctl start`), or set power_event_restore: true",
        );
    }
    if min_targets == 0 {
        return Check::pass(
            NAME,
            format!(
                "power-event detection is off (power_event_min_targets: 0): every shutdown \
                 migrates, even when the whole cluster goes down{waiting}"
            ),
        );
    }
    let nodes = match nodes {
        Ok(n) => n,
        Err(e) => {
            return Check::warn(
                NAME,
                format!("reading the Nodes and shutdown announcements failed: {e}"),
                "see the rbac check (list nodes; list leases in lease_namespace)",
            );
        }
    };
    let rule = PowerRule {
        min_targets: min_targets as usize,
    };
    match judge(node, nodes, rule) {
        Verdict::Migrate { targets } => Check::pass(
            NAME,
            format!(
                "a shutdown of {node} now migrates its VMs: {} other node(s) take VMs \
                 (power_event_min_targets: {min_targets}){waiting}",
                targets.len()
            ),
        ),
        Verdict::PowerEvent { targets, down } => Check::warn(
            NAME,
            format!(
                "a shutdown of {node} now would be a power event: {} other node(s) take VMs{}, \
                 fewer than power_event_min_targets ({min_targets}){}; its VMs would be stopped \
                 in place and started again later, not migrated{waiting}",
                targets.len(),
                list_in_parens(&targets),
                if down.is_empty() {
                    String::new()
                } else {
                    format!(", {} shutting down", down.join(", "))
                }
            ),
            "bring nodes back (Ready and uncordoned), or lower power_event_min_targets \
             (0 turns the detection off)",
        ),
    }
}

fn list_in_parens(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.join(", "))
    }
}

/// The last drain recorded on the Node against the time logind now grants one: a drain that
/// ran out of time, or took longer than logind's delay less the margin, will not fit again.
pub fn judge_last_drain(
    delay: Option<Duration>,
    margin: Duration,
    last: Option<&LastShutdown>,
) -> Check {
    const NAME: &str = "last-drain";
    let Some(last) = last else {
        return Check::pass(NAME, "no drain recorded on this node yet");
    };
    let took = last.duration_s.map(Duration::from_secs_f64);
    let what = format!(
        "the last drain ({}, started {}{})",
        last.r#type,
        last.started,
        took.map(|d| format!(", took {}", secs_f(d)))
            .unwrap_or_default()
    );
    if last.outcome == ShutdownOutcome::Deadline {
        return Check::warn(
            NAME,
            format!(
                "{what} ran out of time with {} left: {}",
                last.remaining.len(),
                last.remaining.join(", ")
            ),
            "raise InhibitDelayMaxSec (see the inhibit-delay check), or move VMs off before \
             the shutdown (`shutdown-guard drain`)",
        );
    }
    match (took, delay) {
        (Some(took), Some(delay)) if took + margin > delay => Check::warn(
            NAME,
            format!(
                "{what} needed more than logind now grants: {} less the margin {}; a drain like it \
                 would be cut off",
                secs(delay),
                secs(margin)
            ),
            format!(
                "set InhibitDelayMaxSec to at least {}s, with room to spare",
                (took + margin).as_secs() + 1
            ),
        ),
        (Some(_), Some(delay)) => {
            Check::pass(NAME, format!("{what} fits in logind's {}", secs(delay)))
        }
        _ => Check::pass(NAME, format!("{what}; nothing to compare it with")),
    }
}

fn secs_f(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// A permission the agent needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: Option<&'static str>,
    pub verb: &'static str,
    /// Checked on our Node by name.
    pub on_node: bool,
}

const fn rule(
    group: &'static str,
    resource: &'static str,
    subresource: Option<&'static str>,
    verb: &'static str,
    on_node: bool,
) -> Rule {
    Rule {
        group,
        resource,
        subresource,
        verb,
        on_node,
    }
}

/// Everything `shutdown-guard run` calls (and `drain` on demand).
pub const RULES: &[Rule] = &[
    rule("", "nodes", None, "get", true),
    rule("", "nodes", None, "patch", true),
    rule("", "nodes", Some("status"), "patch", true),
    rule("", "pods", None, "list", false),
    rule("", "pods", None, "watch", false),
    rule("", "pods", None, "delete", false),
    rule("", "pods", Some("eviction"), "create", false),
    rule(
        "kubevirt.io",
        "virtualmachineinstances",
        None,
        "list",
        false,
    ),
    rule(
        "kubevirt.io",
        "virtualmachineinstances",
        None,
        "watch",
        false,
    ),
    rule(
        "kubevirt.io",
        "virtualmachineinstancemigrations",
        None,
        "list",
        false,
    ),
    rule(
        "kubevirt.io",
        "virtualmachineinstancemigrations",
        None,
        "delete",
        false,
    ),
    rule(
        "subresources.kubevirt.io",
        "virtualmachineinstances",
        Some("evacuate"),
        "update",
        false,
    ),
    rule("events.k8s.io", "events", None, "create", false),
    rule("events.k8s.io", "events", None, "patch", false),
];

impl Rule {
    pub fn describe(&self) -> String {
        let res = match self.subresource {
            Some(s) => format!("{}/{s}", self.resource),
            None => self.resource.to_string(),
        };
        let group = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        format!("{} {res} ({group})", self.verb)
    }
}

pub fn judge_rbac(user: &str, answers: &[(Rule, Result<bool, String>)]) -> Check {
    let missing: Vec<&Rule> = answers
        .iter()
        .filter(|(_, a)| !matches!(a, Ok(true)))
        .map(|(r, _)| r)
        .collect();
    let errors: Vec<String> = answers
        .iter()
        .filter_map(|(r, a)| a.as_ref().err().map(|e| format!("{}: {e}", r.describe())))
        .collect();
    if missing.is_empty() {
        return Check::pass(
            "rbac",
            format!(
                "{user} may do all {} API calls the agent makes",
                answers.len()
            ),
        );
    }
    let rules: Vec<String> = missing
        .iter()
        .map(|r| {
            format!(
                "{{apiGroups: [\"{}\"], resources: [\"{}\"], verbs: [\"{}\"]}}",
                r.group,
                match r.subresource {
                    Some(s) => format!("{}/{s}", r.resource),
                    None => r.resource.into(),
                },
                r.verb
            )
        })
        .collect();
    Check::fail(
        "rbac",
        format!(
            "{user} may not: {}{}",
            missing
                .iter()
                .map(|r| r.describe())
                .collect::<Vec<_>>()
                .join(", "),
            if errors.is_empty() {
                String::new()
            } else {
                format!(" (review failed: {})", errors.join("; "))
            }
        ),
        format!(
            "add to the agent's ClusterRole (shutdown-guard): {}",
            rules.join(", ")
        ),
    )
}

pub fn judge_crds(resources: &Result<Vec<String>, String>) -> Check {
    match resources {
        Ok(r) if r.iter().any(|n| n == "virtualmachineinstances") => Check::pass(
            "kubevirt",
            "kubevirt.io/v1 virtualmachineinstances is served",
        ),
        Ok(_) => Check::fail(
            "kubevirt",
            "kubevirt.io/v1 is served but without virtualmachineinstances",
            "install KubeVirt (virt-operator and a KubeVirt CR)",
        ),
        Err(e) => Check::fail(
            "kubevirt",
            format!("kubevirt.io/v1 is not served: {e}"),
            "install KubeVirt (virt-operator and a KubeVirt CR); without it the agent has nothing to move",
        ),
    }
}

/// KubeVirt's rule (`pod-eviction-admitter.go`): the VMI's strategy, else the cluster's, else
/// None. One check per VMI that will not migrate; a single pass when all will.
pub fn judge_vmis(node: &str, vmis: &[VmiFacts], cluster: &ClusterStrategy) -> Vec<Check> {
    let mut out = Vec::new();
    let mut migrating = 0;
    for v in vmis {
        let name = format!("vmi {}", v.key);
        let (f, why) = fate(v, cluster);
        match f {
            Fate::Migrate => migrating += 1,
            Fate::Stop => out.push(Check::warn(
                &name,
                format!("will be shut down, not migrated: {why}"),
                "if it should move, set spec.evictionStrategy: LiveMigrate on its VM \
                 (or spec.configuration.evictionStrategy in the KubeVirt CR)",
            )),
            Fate::RefusedThenStop => out.push(Check::warn(
                &name,
                format!("will be shut down, not migrated: {why}"),
                "remove what makes it non-migratable (e.g. a ReadWriteOnce disk, host devices), \
                 or accept that it stops",
            )),
            Fate::External => out.push(Check::warn(
                &name,
                why,
                "make sure the external controller runs, or use LiveMigrate",
            )),
        }
    }
    if out.is_empty() {
        out.push(Check::pass(
            "vmis",
            format!("all {migrating} VMI(s) on {node} will live-migrate"),
        ));
    }
    out
}

// ---- gathering ------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Client(#[from] crate::kube::ClientError),
}

const BUS_TIMEOUT: Duration = Duration::from_secs(5);

async fn timed<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(BUS_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {BUS_TIMEOUT:?}")),
    }
}

struct LogindFacts {
    delay: Result<Duration, String>,
    lock: Result<(), String>,
    inhibitors: Result<Vec<Inhibitor>, String>,
    /// systemd's `Version`; `None` when no systemd is on the bus.
    systemd: Result<Option<String>, String>,
}

/// systemd's `Version` property, or `None` when nothing owns `org.freedesktop.systemd1`.
async fn systemd_version(conn: &Connection) -> Result<Option<String>, String> {
    let proxy = timed(zbus::Proxy::new(
        conn,
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
    ))
    .await?;
    match tokio::time::timeout(BUS_TIMEOUT, proxy.get_property::<String>("Version")).await {
        Ok(Ok(v)) => Ok(Some(v)),
        Ok(Err(zbus::Error::MethodError(name, _, _)))
            if name.as_str() == "org.freedesktop.DBus.Error.ServiceUnknown"
                || name.as_str() == "org.freedesktop.DBus.Error.NameHasNoOwner" =>
        {
            Ok(None)
        }
        Ok(Err(zbus::Error::FDO(e)))
            if matches!(
                *e,
                zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_)
            ) =>
        {
            Ok(None)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {BUS_TIMEOUT:?}")),
    }
}

async fn logind_facts() -> LogindFacts {
    let conn = match timed(Connection::system()).await {
        Ok(c) => c,
        Err(e) => {
            return LogindFacts {
                delay: Err(e.clone()),
                lock: Err(e.clone()),
                inhibitors: Err(e.clone()),
                systemd: Err(e),
            };
        }
    };
    let proxy = match timed(
        ManagerProxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build(),
    )
    .await
    {
        Ok(p) => p,
        Err(e) => {
            return LogindFacts {
                delay: Err(e.clone()),
                lock: Err(e.clone()),
                inhibitors: Err(e.clone()),
                systemd: Err(e),
            };
        }
    };
    let delay = timed(proxy.inhibit_delay_max_usec())
        .await
        .map(Duration::from_micros);
    // Taken and dropped at once: the fd closing releases it.
    let lock = timed(proxy.inhibit(
        "shutdown",
        CHECK_WHO,
        "preflight: checking that a delay lock can be taken",
        "delay",
    ))
    .await
    .map(drop);
    let inhibitors = timed(proxy.list_inhibitors()).await.map(|l| {
        l.into_iter()
            .map(|(what, who, why, mode, _uid, pid)| Inhibitor {
                what,
                who,
                why,
                mode,
                pid,
            })
            .collect()
    });
    let systemd = systemd_version(&conn).await;
    LogindFacts {
        delay,
        lock,
        inhibitors,
        systemd,
    }
}

async fn rbac_answers(client: &Client, node: &str) -> Vec<(Rule, Result<bool, String>)> {
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut out = Vec::new();
    for r in RULES {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(r.group.into()),
                    resource: Some(r.resource.into()),
                    subresource: r.subresource.map(Into::into),
                    verb: Some(r.verb.into()),
                    name: r.on_node.then(|| node.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map(|r| r.status.map(|s| s.allowed).unwrap_or(false))
            .map_err(|e| e.to_string());
        out.push((*r, answer));
    }
    out
}

async fn whoami(client: &Client) -> String {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    match api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
    {
        Ok(r) => r
            .status
            .and_then(|s| s.user_info)
            .and_then(|u| u.username)
            .unwrap_or_else(|| "this user".into()),
        Err(_) => "this user".into(),
    }
}

/// Runs every check against this node's logind and the cluster.
pub async fn run(settings: &Settings, strict: bool) -> Result<CheckReport, CheckError> {
    let node = &settings.node;
    let bus = std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
        .unwrap_or_else(|_| "unix:path=/var/run/dbus/system_bus_socket".into());
    let lf = logind_facts().await;
    let mut checks = vec![judge_logind(&bus, &lf.delay)];
    if lf.delay.is_ok() {
        checks.push(judge_lock(&lf.lock));
        let set_by = crate::host::logind_conf::find_effective_setting(&settings.host_root);
        checks.push(judge_delay(
            lf.delay.as_ref().ok().copied(),
            settings.drain_budget,
            settings.safety_margin,
            set_by.as_ref(),
            &settings.logind_dropin,
        ));
        match &lf.inhibitors {
            Ok(list) => checks.push(judge_inhibitors(list)),
            Err(e) => checks.push(Check::fail(
                "inhibitors",
                format!("ListInhibitors failed: {e}"),
                "see the logind check",
            )),
        }
        checks.push(judge_reboot_commands(&lf.systemd));
        checks.push(judge_scheduled(&lf.systemd, settings.pre_drain_lead()));
    }

    let client = crate::kube::client(settings.kubeconfig.as_deref()).await?;
    match tokio::time::timeout(BUS_TIMEOUT, client.apiserver_version()).await {
        Ok(Ok(v)) => checks.push(Check::pass(
            "api-server",
            format!(
                "the API server answers (Kubernetes {}.{})",
                v.major, v.minor
            ),
        )),
        other => {
            let e = match other {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {BUS_TIMEOUT:?}"),
            };
            checks.push(Check::fail(
                "api-server",
                format!("the API server does not answer: {e}"),
                "check --kubeconfig / the in-cluster service account and the network to the API server",
            ));
            return Ok(CheckReport::new(node, checks, strict));
        }
    }
    let last = match tokio::time::timeout(
        BUS_TIMEOUT,
        Api::<k8s_openapi::api::core::v1::Node>::all(client.clone()).get_opt(node),
    )
    .await
    {
        Ok(Ok(n)) => Ok(n.as_ref().and_then(crate::kube::condition::last_shutdown)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {BUS_TIMEOUT:?}")),
    };
    checks.push(match last {
        Ok(last) => judge_last_drain(
            lf.delay.as_ref().ok().copied(),
            settings.safety_margin,
            last.as_ref(),
        ),
        Err(e) => Check::warn(
            "last-drain",
            format!("reading node {node} failed: {e}"),
            "see the rbac check",
        ),
    });
    let user = whoami(&client).await;
    checks.push(judge_rbac(&user, &rbac_answers(&client, node).await));
    let served = client
        .list_api_group_resources("kubevirt.io/v1")
        .await
        .map(|l| l.resources.into_iter().map(|r| r.name).collect::<Vec<_>>())
        .map_err(|e| e.to_string());
    checks.push(judge_crds(&served));
    if served.is_ok() {
        match node_vmis(&client, node).await {
            Ok(items) => {
                let facts: Vec<VmiFacts> = items.iter().map(vmi_facts).collect();
                let cluster = cluster_strategy(&client).await;
                checks.extend(judge_vmis(node, &facts, &cluster));
            }
            Err(e) => checks.push(Check::fail(
                "vmis",
                format!("listing the node's VMIs failed: {e}"),
                "see the rbac check",
            )),
        }
    }
    checks.push(power_events(settings, &client, node).await);
    Ok(CheckReport::new(node, checks, strict))
}

async fn power_events(settings: &Settings, client: &Client, node: &str) -> Check {
    let leases = crate::kube::leases(client, &settings.lease_namespace);
    let (nodes, recorded) = tokio::join!(
        crate::kube::power::node_views(client, &leases),
        crate::kube::power::recorded_vms(client)
    );
    let recorded = recorded.map(|vms| vms.iter().filter(|v| v.record.is_some()).count());
    judge_power_events(
        node,
        settings.power_event_min_targets,
        settings.power_event_restore,
        &nodes,
        &recorded,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inh(who: &str, mode: &str) -> Inhibitor {
        Inhibitor {
            what: "shutdown".into(),
            who: who.into(),
            why: "w".into(),
            mode: mode.into(),
            pid: 7,
        }
    }

    fn view(name: &str, ready: bool, schedulable: bool, shutting_down: bool) -> NodeView {
        NodeView {
            name: name.into(),
            ready,
            schedulable,
            shutting_down,
            virt_handler: Some(true),
        }
    }

    #[test]
    fn the_power_event_line_says_what_a_shutdown_would_do_now() {
        let up = Ok(vec![
            view("node-1", true, true, false),
            view("node-2", true, true, false),
        ]);
        let c = judge_power_events("node-1", 1, true, &up, &Ok(0));
        assert_eq!(c.status, Status::Pass, "{c:?}");
        assert!(c.message.contains("migrates"), "{}", c.message);
        // The only other node is cordoned, the third announced its shutdown.
        let alone = Ok(vec![
            view("node-1", true, true, false),
            view("node-2", true, false, false),
            view("node-3", true, true, true),
        ]);
        let c = judge_power_events("node-1", 1, true, &alone, &Ok(0));
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(
            c.message.contains("power event") && c.message.contains("node-3 shutting down"),
            "{}",
            c.message
        );
        assert!(c.fix.unwrap().contains("power_event_min_targets"));
        // Off: said, whatever the nodes.
        let c = judge_power_events("node-1", 0, true, &alone, &Ok(0));
        assert_eq!(c.status, Status::Pass);
        assert!(c.message.contains("off"), "{}", c.message);
        // Records left: said; with the restore off, a warning to start them by hand.
        let c = judge_power_events("node-1", 1, true, &up, &Ok(3));
        assert!(
            c.message.contains("3 VM(s) stopped by a power event"),
            "{}",
            c.message
        );
        let c = judge_power_events("node-1", 1, false, &up, &Ok(3));
        assert_eq!(c.status, Status::Warn);
        assert!(c.fix.unwrap().contains("virtctl start"));
        let c = judge_power_events("node-1", 1, true, &Err("403".into()), &Ok(0));
        assert_eq!(c.status, Status::Warn);
        assert!(c.message.contains("403"));
    }

    #[test]
    fn a_scheduled_shutdown_without_pre_drain_on_elogind_is_called_out() {
        let lead = Some(Duration::from_secs(300));
        let systemd = Ok(Some("257.9-1~deb13u1".to_string()));
        assert_eq!(judge_scheduled(&systemd, lead).status, Status::Pass);
        assert_eq!(judge_scheduled(&systemd, None).status, Status::Pass);
        let on = judge_scheduled(&Ok(None), lead);
        assert_eq!(on.status, Status::Pass);
        assert!(on.message.contains("only drain"), "{}", on.message);
        let off = judge_scheduled(&Ok(None), None);
        assert_eq!(off.status, Status::Warn);
        assert!(off.fix.as_deref().unwrap_or("").contains("pre_drain: true"));
    }

    #[test]
    fn legacy_reboot_commands_are_called_out_before_systemd_251() {
        let on = |v: &str| judge_reboot_commands(&Ok(Some(v.into())));
        assert_eq!(systemd_major("252.30-1~deb12u2"), Some(252));
        assert_eq!(systemd_major("v252"), None);
        let old = on("247.3-7+deb11u6");
        assert_eq!(old.status, Status::Warn);
        assert!(old.message.contains("systemd#22058"), "{}", old.message);
        assert!(
            old.message.contains("`systemctl reboot`"),
            "{}",
            old.message
        );
        assert!(old.fix.unwrap().contains("systemctl reboot"));
        assert_eq!(on("250.4-1").status, Status::Warn);
        assert_eq!(on("251").status, Status::Pass);
        assert_eq!(on("252.30-1~deb12u2").status, Status::Pass);
        assert_eq!(on("257.9-1~deb13u1").status, Status::Pass);
        assert_eq!(on("258").status, Status::Pass);
        assert_eq!(on("unknown").status, Status::Warn);
        let elogind = judge_reboot_commands(&Ok(None));
        assert_eq!(elogind.status, Status::Warn);
        assert!(elogind.message.contains("loginctl reboot"));
        assert_eq!(
            judge_reboot_commands(&Err("no bus".into())).status,
            Status::Warn
        );
    }

    #[test]
    fn a_last_drain_longer_than_the_delay_allows_is_a_warning() {
        let rec = |outcome, took: f64, remaining: &[&str]| LastShutdown {
            r#type: "reboot".into(),
            started: "2026-11-30T06:00:00Z".into(),
            finished: None,
            outcome,
            migrated: 3,
            stopped: 0,
            remaining: remaining.iter().map(|s| s.to_string()).collect(),
            duration_s: Some(took),
        };
        let (delay, margin) = (Some(Duration::from_secs(60)), Duration::from_secs(5));
        assert_eq!(judge_last_drain(delay, margin, None).status, Status::Pass);
        let fits = judge_last_drain(delay, margin, Some(&rec(ShutdownOutcome::Empty, 54.0, &[])));
        assert_eq!(fits.status, Status::Pass, "{}", fits.message);
        let long = judge_last_drain(delay, margin, Some(&rec(ShutdownOutcome::Empty, 56.0, &[])));
        assert_eq!(long.status, Status::Warn, "{}", long.message);
        assert!(long.message.contains("took 56.0s"), "{}", long.message);
        assert!(long.fix.unwrap().contains("at least 62s"));
        let cut = judge_last_drain(
            delay,
            margin,
            Some(&rec(ShutdownOutcome::Deadline, 55.0, &["default/big-1"])),
        );
        assert_eq!(cut.status, Status::Warn);
        assert!(cut.message.contains("default/big-1"), "{}", cut.message);
    }

    #[test]
    fn a_short_delay_fails_and_names_the_file() {
        let set_by = (
            PathBuf::from("/run/systemd/logind.conf.d/90-testbed.conf"),
            "5".to_string(),
        );
        let c = judge_delay(
            Some(Duration::from_secs(5)),
            Duration::from_secs(300),
            Duration::from_secs(5),
            Some(&set_by),
            std::path::Path::new("/etc/systemd/logind.conf.d/99-shutdown-guard.conf"),
        );
        assert_eq!(c.status, Status::Fail);
        assert!(c.message.contains("90-testbed.conf"), "{}", c.message);
        assert!(c.fix.unwrap().contains("InhibitDelayMaxSec=305s"));
        let ok = judge_delay(
            Some(Duration::from_secs(400)),
            Duration::from_secs(300),
            Duration::from_secs(5),
            None,
            std::path::Path::new("/x.conf"),
        );
        assert_eq!(ok.status, Status::Pass);
    }

    #[test]
    fn a_later_sorting_dropin_is_called_out() {
        let set_by = (
            PathBuf::from("/etc/systemd/logind.conf.d/99-unattended-upgrades.conf"),
            "30".to_string(),
        );
        let c = judge_delay(
            Some(Duration::from_secs(30)),
            Duration::from_secs(60),
            Duration::from_secs(5),
            Some(&set_by),
            std::path::Path::new("/etc/systemd/logind.conf.d/99-shutdown-guard.conf"),
        );
        assert!(
            c.fix
                .unwrap()
                .contains("sort after 99-unattended-upgrades.conf")
        );
    }

    #[test]
    fn kubelet_lock_fails_other_delay_locks_warn() {
        let c = judge_inhibitors(&[inh(WHO, "delay"), inh("kubelet", "delay")]);
        assert_eq!(c.status, Status::Fail);
        assert!(c.message.contains("kills the node's pods locally"));
        assert!(c.fix.unwrap().contains("shutdownGracePeriod: 0s"));
        assert_eq!(
            judge_inhibitors(&[inh(WHO, "delay"), inh("backup", "delay")]).status,
            Status::Warn
        );
        let ok = judge_inhibitors(&[inh(WHO, "delay"), inh(CHECK_WHO, "delay")]);
        assert_eq!(ok.status, Status::Pass);
        assert!(ok.message.contains("agent's lock is held"));
    }

    #[test]
    fn missing_rbac_names_the_rule() {
        let answers = vec![
            (RULES[0], Ok(true)),
            (RULES[6], Ok(false)),
            (RULES[2], Err("boom".to_string())),
        ];
        let c = judge_rbac("system:serviceaccount:x:y", &answers);
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.message.contains("create pods/eviction (core)"),
            "{}",
            c.message
        );
        assert!(c.message.contains("patch nodes/status"));
        assert!(c.fix.unwrap().contains("pods/eviction"));
        assert_eq!(
            judge_rbac("u", &[(RULES[0], Ok(true))]).status,
            Status::Pass
        );
    }

    #[test]
    fn vmis_that_will_not_migrate() {
        let live = VmiFacts {
            key: "default/live-1".into(),
            strategy: Some("LiveMigrate".into()),
            live_migratable: Some((true, None)),
        };
        let by_default = VmiFacts {
            key: "default/plain-1".into(),
            strategy: None,
            live_migratable: Some((true, None)),
        };
        let stuck = VmiFacts {
            key: "default/stuck-1".into(),
            strategy: Some("LiveMigrate".into()),
            live_migratable: Some((false, Some("DisksNotLiveMigratable".into()))),
        };
        let out = judge_vmis(
            "n",
            &[live.clone(), by_default.clone(), stuck],
            &ClusterStrategy::NoCr("none exists".into()),
        );
        assert_eq!(out.len(), 2);
        assert!(out[0].message.contains("KubeVirt's default"));
        assert!(out[1].message.contains("DisksNotLiveMigratable"));
        assert!(out.iter().all(|c| c.status == Status::Warn));
        let cluster_live = judge_vmis(
            "n",
            &[live, by_default],
            &ClusterStrategy::Configured("LiveMigrate".into()),
        );
        assert_eq!(cluster_live.len(), 1);
        assert_eq!(cluster_live[0].status, Status::Pass);
    }

    #[test]
    fn strict_turns_warnings_into_failure() {
        let checks = vec![Check::warn("vmi x", "m", "f")];
        assert!(CheckReport::new("n", checks.clone(), false).ok);
        assert!(!CheckReport::new("n", checks, true).ok);
    }
}
