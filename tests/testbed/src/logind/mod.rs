//! A real logind for the bed, in two flavours behind one trait, [`LogindNode`]:
//!
//! - [`SystemdNode`]: a debootstrapped Debian root filesystem booted with its own systemd as
//!   PID 1 of fresh namespaces (trixie with systemd 257 by default, bookworm with 252). The
//!   real thing: `systemctl poweroff` / `reboot` inside, the container's PID 1 exiting is the
//!   power-off, and a node can boot again from the same "disk".
//! - [`Elogind`]: elogind 246 on a private dbus-daemon, started in well under a second, for
//!   the many small cases that need only the lock semantics.
//!
//! Both show their bus to a process the way a DaemonSet pod sees its node's bus
//! ([`LogindNode::pod_command`]). logind refuses `Inhibit` from a caller whose PID it cannot see
//! ("Object is remote"), so a pod runs in a child PID namespace of logind's, like a real pod
//! is a child of the host's PID namespace, while it keeps the machine's network and files.
//!
//! Safety: whatever runs inside has CAP_SYS_BOOT removed from its bounding set and lives in a
//! private PID namespace, where a reboot(2) could end only that namespace's init; `/proc/sys`
//! and `/sys` are read-only for the systemd container and elogind's power commands are
//! replaced by a marker script. The machine itself never powers off.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use crate::process::ProcessError;

pub mod elogind;
mod node;
pub mod release;
pub mod schedule;
pub mod systemd;

pub use elogind::{Elogind, ElogindOptions};
pub use node::NodeLogind;
pub use release::{Release, ReleaseMethod, ReleaseWatch};
pub use systemd::{ConsoleLine, NodeExit, PowerAction, Suite, SystemdNode, SystemdOptions};

pub const LOGIN1: &str = "org.freedesktop.login1";
pub const LOGIN1_PATH: &str = "/org/freedesktop/login1";
pub const LOGIN1_MANAGER: &str = "org.freedesktop.login1.Manager";

/// How often bounded waits re-check their condition.
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum LogindError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Process(#[from] Box<ProcessError>),
    #[error("D-Bus, {context}: {source}")]
    Bus {
        context: String,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    #[error("{what} is not running{detail}")]
    NotRunning { what: String, detail: String },
    #[error("{0}")]
    State(String),
}

impl LogindError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    pub(crate) fn bus(context: impl Into<String>) -> impl FnOnce(zbus::Error) -> Self {
        let context = context.into();
        move |source| Self::Bus {
            context,
            source: Box::new(source),
        }
    }
}

/// One entry of logind's `ListInhibitors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inhibitor {
    pub what: String,
    pub who: String,
    pub why: String,
    pub mode: String,
    pub uid: u32,
    /// The holder's PID as logind sees it (in logind's PID namespace).
    pub pid: u32,
}

/// What the bed needs from a logind, whichever flavour runs it.
///
/// Methods return `impl Future + Send` rather than being `async fn` so callers can spawn them.
pub trait LogindNode {
    /// The bus address for a process of the machine itself (the test), which may read
    /// properties and subscribe to signals but cannot take locks (see the module docs).
    fn bus_address(&self) -> String;

    /// `DBUS_SYSTEM_BUS_ADDRESS` as a process from [`pod_command`](Self::pod_command) sees it.
    fn pod_bus_address(&self) -> String;

    /// The boot ID of the node's current boot, as a pod reads it from
    /// `/proc/sys/kernel/random/boot_id`.
    fn boot_id(&self) -> String;

    /// A command that runs `program` the way a DaemonSet pod on this node runs: in a child PID
    /// namespace of logind's with its own `/proc`, on the machine's network and file system, with
    /// this boot's ID at `/proc/sys/kernel/random/boot_id` and `DBUS_SYSTEM_BUS_ADDRESS` set.
    /// It dies on SIGTERM (as a node's final shutdown stage sends), with the node, and when the
    /// returned command's process is killed (`kill_on_drop` is set).
    fn pod_command(&self, program: &str, args: &[&str]) -> tokio::process::Command;

    /// Starts a power-off the way an administrator does on the node, without waiting for it.
    fn poweroff(&self) -> impl Future<Output = Result<(), LogindError>> + Send;

    /// Waits until the node powered off and returns when (see each implementation for what
    /// marks that moment).
    fn wait_poweroff(
        &self,
        timeout: Duration,
    ) -> impl Future<Output = Result<SystemTime, LogindError>> + Send;

    /// Sets logind's `InhibitDelayMaxSec`, reloads logind, and returns the value logind reports
    /// back in `InhibitDelayMaxUSec`.
    fn set_inhibit_delay_max(
        &self,
        secs: u64,
    ) -> impl Future<Output = Result<Duration, LogindError>> + Send;

    /// logind's effective `InhibitDelayMaxUSec`.
    fn inhibit_delay_max(&self) -> impl Future<Output = Result<Duration, LogindError>> + Send;

    /// logind's `ListInhibitors`.
    fn list_inhibitors(&self) -> impl Future<Output = Result<Vec<Inhibitor>, LogindError>> + Send;

    /// A shell command that starts the power-off when run in a pod of this node (a D-Bus
    /// `PowerOff(false)` to logind, which is what `systemctl poweroff` asks of it). For
    /// `TESTBED_POWEROFF`.
    fn poweroff_shell_command(&self) -> String {
        login1_call_shell(&self.pod_bus_address(), "PowerOff")
    }

    /// Like [`poweroff_shell_command`](Self::poweroff_shell_command), for a reboot
    /// (`TESTBED_REBOOT`).
    fn reboot_shell_command(&self) -> String {
        login1_call_shell(&self.pod_bus_address(), "Reboot")
    }

    /// A shell command that blocks until the node powered off (the moment
    /// [`wait_poweroff`](Self::wait_poweroff) returns) and prints it as `<unix seconds.nanos>`
    /// (`TESTBED_WAIT_POWEROFF`). Gives up after `TESTBED_WAIT_TIMEOUT` seconds (600).
    fn wait_poweroff_shell_command(&self) -> String;
}

fn login1_call_shell(address: &str, method: &str) -> String {
    format!(
        "{} {address} {method}",
        crate::paths::scripts_dir().join("ct-power.sh").display()
    )
}

/// Connects to a bus at `address` (`unix:path=…`).
pub async fn connect(address: &str) -> Result<zbus::Connection, LogindError> {
    let ctx = || format!("connecting to {address}");
    zbus::connection::Builder::address(address)
        .map_err(LogindError::bus(ctx()))?
        .build()
        .await
        .map_err(LogindError::bus(ctx()))
}

/// Waits until `org.freedesktop.login1` has an owner on the bus at `address`, while `alive`
/// says the thing that should provide it still runs.
pub(crate) async fn wait_for_logind(
    address: &str,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), LogindError>,
) -> Result<zbus::Connection, LogindError> {
    let deadline = Instant::now() + timeout;
    let mut conn: Option<zbus::Connection> = None;
    loop {
        alive()?;
        if conn.is_none() {
            conn = connect(address).await.ok();
        }
        if let Some(c) = &conn {
            match name_has_owner(c, LOGIN1).await {
                Ok(true) => return Ok(conn.take().expect("connected")),
                Ok(false) => {}
                // The bus went away under us (the daemon restarted): connect again.
                Err(_) => conn = None,
            }
        }
        if Instant::now() >= deadline {
            return Err(LogindError::Timeout {
                what: format!("{LOGIN1} on {address}"),
                after: timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

pub(crate) async fn name_has_owner(
    conn: &zbus::Connection,
    name: &str,
) -> Result<bool, LogindError> {
    let reply = conn
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus"),
            "NameHasOwner",
            &(name,),
        )
        .await
        .map_err(LogindError::bus("NameHasOwner"))?;
    reply
        .body()
        .deserialize::<bool>()
        .map_err(LogindError::bus("NameHasOwner reply"))
}

/// Reads a property of logind's Manager without any property cache (logind announces changes
/// of few of them).
pub(crate) async fn manager_property(
    address: &str,
    name: &str,
) -> Result<zbus::zvariant::OwnedValue, LogindError> {
    let conn = connect(address).await?;
    let reply = conn
        .call_method(
            Some(LOGIN1),
            LOGIN1_PATH,
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &(LOGIN1_MANAGER, name),
        )
        .await
        .map_err(LogindError::bus(format!("Get {name}")))?;
    reply
        .body()
        .deserialize()
        .map_err(LogindError::bus(format!("{name} reply")))
}

/// Reads `InhibitDelayMaxUSec`: logind does not announce changes of it, so a cached value
/// would go stale after a reload.
pub(crate) async fn read_inhibit_delay_max(address: &str) -> Result<Duration, LogindError> {
    let value = manager_property(address, "InhibitDelayMaxUSec").await?;
    let usec = u64::try_from(value).map_err(|e| LogindError::Bus {
        context: "InhibitDelayMaxUSec is not a u64".into(),
        source: Box::new(e.into()),
    })?;
    Ok(Duration::from_micros(usec))
}

/// Polls `InhibitDelayMaxUSec` until it equals `want` (logind applies a reload asynchronously).
pub(crate) async fn wait_inhibit_delay_max(
    address: &str,
    want: Duration,
    timeout: Duration,
) -> Result<Duration, LogindError> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = read_inhibit_delay_max(address).await?;
        if got == want {
            return Ok(got);
        }
        if Instant::now() >= deadline {
            return Err(LogindError::Timeout {
                what: format!("InhibitDelayMaxUSec to become {want:?} (still {got:?})"),
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn read_inhibitors(address: &str) -> Result<Vec<Inhibitor>, LogindError> {
    let conn = connect(address).await?;
    let reply = conn
        .call_method(
            Some(LOGIN1),
            LOGIN1_PATH,
            Some(LOGIN1_MANAGER),
            "ListInhibitors",
            &(),
        )
        .await
        .map_err(LogindError::bus("ListInhibitors"))?;
    let rows: Vec<(String, String, String, String, u32, u32)> = reply
        .body()
        .deserialize()
        .map_err(LogindError::bus("ListInhibitors reply"))?;
    Ok(rows
        .into_iter()
        .map(|(what, who, why, mode, uid, pid)| Inhibitor {
            what,
            who,
            why,
            mode,
            uid,
            pid,
        })
        .collect())
}

/// A fresh random boot ID in the kernel's format (a version 4 UUID).
pub(crate) fn new_boot_id() -> Result<String, LogindError> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map_err(LogindError::io("reading /proc/sys/kernel/random/uuid"))?;
    Ok(id.trim().to_owned())
}

/// Runs in the pod's fresh PID and mount namespaces as their PID 1 (a shell, because a PID 1
/// without a SIGTERM handler would ignore the node's final SIGTERM and hold its shutdown for
/// 90 s). The program runs as its child with the shell's stdin; the shell's exit status is the
/// program's. With `TESTBED_POD_CGROUP` set, the program (the container's entrypoint) moves
/// into that cgroup before it starts, while this init stays outside, like a runtime's shim
/// (see [`crate::pod`]); with `TESTBED_POD_PIDFILE` set, the init writes the program's PID (in
/// the pod's namespace) there, so the bed can tell it from the init's passing helpers.
const POD_INIT: &str = r#"set -e
mount -t proc proc /proc
mount --bind "$TESTBED_POD_BOOT_ID" /proc/sys/kernel/random/boot_id
mount -o remount,bind,ro /proc/sys/kernel/random/boot_id
cg=${TESTBED_POD_CGROUP:-}
pidfile=${TESTBED_POD_PIDFILE:-}
unset TESTBED_POD_BOOT_ID TESTBED_POD_CGROUP TESTBED_POD_PIDFILE
set +e
trap 'exit 143' TERM
trap 'exit 130' INT
exec 3<&0
if [ -n "$cg" ]; then
  sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$cg" "$@" <&3 3<&- &
else
  "$@" <&3 3<&- &
fi
child=$!
exec 3<&-
if [ -n "$pidfile" ]; then echo "$child" > "$pidfile"; fi
wait "$child"
"#;

/// The pod's parent in the machine's PID namespace: starts the pod with the parent's stdin
/// (a non-interactive shell would give a background job /dev/null) and exits with its status.
const POD_PARENT: &str = r#"exec 3<&0
"$@" <&3 3<&- &
child=$!
exec 3<&-
wait "$child"
"#;

/// Where a pod finds its node's logind.
pub(crate) struct PodSpec<'a> {
    /// Host PID of a process in logind's PID namespace.
    pub ns_pid: u32,
    /// File holding the node's current boot ID.
    pub boot_id_file: &'a Path,
    pub bus_address: String,
}

pub(crate) fn pod_command(
    spec: &PodSpec<'_>,
    program: &str,
    args: &[&str],
) -> tokio::process::Command {
    // A shell in the machine's PID namespace whose children start in logind's (setns before
    // exec). Not `nsenter --pid`: when a node's final stage stops every process of its PID
    // namespace with SIGSTOP, nsenter stops itself to mirror its child and is never continued
    // (the SIGCONT reaches only the namespace), so its child stays an unreaped zombie that holds
    // the node's exit until systemd-shutdown's timeout.
    let ns = std::fs::File::open(format!("/proc/{}/ns/pid", spec.ns_pid));
    let mut cmd = tokio::process::Command::new("sh");
    cmd.args(["-c", POD_PARENT, "testbed-pod-parent"])
        // If the parent is killed, the parent death signal takes the pod's unshare, whose
        // --kill-child takes the pod's PID 1 and with it the pod's PID namespace.
        .args([
            "setpriv",
            "--pdeathsig",
            "KILL",
            "--bounding-set",
            "-sys_boot",
            "--",
        ])
        .args([
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            POD_INIT,
            "testbed-pod",
        ])
        .arg(program)
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &spec.bus_address)
        .env("TESTBED_POD_BOOT_ID", spec.boot_id_file)
        .kill_on_drop(true);
    // A node that is gone makes the spawn fail (ENOENT), as a pod could not start there.
    let ns = ns.map_err(|e| e.raw_os_error().unwrap_or(libc::ENOENT));
    // SAFETY: between fork and exec only setns(2) runs, an async-signal-safe system call on a
    // descriptor opened before the fork; nothing allocates or takes a lock.
    unsafe {
        cmd.pre_exec(move || match &ns {
            Ok(ns) => {
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWPID).map_err(io::Error::from)
            }
            Err(code) => Err(io::Error::from_raw_os_error(*code)),
        });
    }
    cmd
}

/// A command that runs `program` inside a node: in its mount namespace (so its own binaries
/// and `/run`) and as a child in its PID namespace, like `nsenter --mount --pid` but without
/// nsenter's stop mirroring (see [`pod_command`]), so a command still running when the node
/// shuts down cannot hold the node's exit.
pub(crate) fn node_command(ns_pid: u32, program: &str, args: &[&str]) -> tokio::process::Command {
    let open = |ns: &str| {
        std::fs::File::open(format!("/proc/{ns_pid}/ns/{ns}"))
            .map_err(|e| e.raw_os_error().unwrap_or(libc::ENOENT))
    };
    let (pid_ns, mnt_ns) = (open("pid"), open("mnt"));
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.args(["-c", POD_PARENT, "testbed-node-exec", program])
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LANG", "C.UTF-8")
        .current_dir("/")
        .kill_on_drop(true);
    // SAFETY: between fork and exec only setns(2) runs, an async-signal-safe system call on
    // descriptors opened before the fork; nothing allocates or takes a lock.
    unsafe {
        cmd.pre_exec(move || match (&pid_ns, &mnt_ns) {
            (Ok(pid_ns), Ok(mnt_ns)) => {
                nix::sched::setns(pid_ns, nix::sched::CloneFlags::CLONE_NEWPID)?;
                // Also moves this process's root and working folder to the node's root.
                nix::sched::setns(mnt_ns, nix::sched::CloneFlags::CLONE_NEWNS)?;
                Ok(())
            }
            (Err(code), _) | (_, Err(code)) => Err(io::Error::from_raw_os_error(*code)),
        });
    }
    cmd
}

/// Runs a short helper command to completion (bounded), failing on a non-zero exit.
pub(crate) async fn run_checked(
    cmd: tokio::process::Command,
    timeout: Duration,
) -> Result<(), LogindError> {
    run_output(cmd, timeout).await.map(drop)
}

/// Runs a short helper command to completion (bounded) and returns its stdout, failing on a
/// non-zero exit.
pub(crate) async fn run_output(
    mut cmd: tokio::process::Command,
    timeout: Duration,
) -> Result<String, LogindError> {
    let shown = format!("{:?}", cmd.as_std());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(LogindError::io(format!("starting {shown}")))?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| LogindError::Timeout {
            what: shown.clone(),
            after: timeout,
        })?
        .map_err(LogindError::io(format!("waiting for {shown}")))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(LogindError::Command {
        command: shown,
        status: out.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .trim()
        .to_owned(),
    })
}

/// Runs one of the bed's idempotent cache scripts (root filesystem, elogind) if its stamp is
/// missing; the script itself decides whether anything needs doing.
pub(crate) async fn ensure_cached(
    script: &str,
    args: &[&str],
    stamp: &Path,
) -> Result<(), LogindError> {
    if stamp.is_file() {
        return Ok(());
    }
    let path = crate::paths::scripts_dir().join(script);
    tracing::info!(script = %path.display(), ?args, "building cached logind input (once)");
    let mut cmd = tokio::process::Command::new(&path);
    cmd.args(args)
        .env("TESTBED_CACHE", crate::paths::cache_dir());
    // debootstrap takes minutes on a cold cache.
    run_checked(cmd, Duration::from_secs(1200)).await
}

/// The machine's cgroup v2 hierarchy: `/sys/fs/cgroup` on a unified host, or the `unified`
/// mount of a hybrid one.
pub(crate) fn cgroup2_root() -> Result<PathBuf, LogindError> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").is_file())
        .ok_or_else(|| LogindError::State("no cgroup v2 hierarchy under /sys/fs/cgroup".into()))
}

/// A cgroup folder the bed made for one container; removed (children first) when dropped.
#[derive(Debug)]
pub(crate) struct CgroupDir {
    path: PathBuf,
}

impl CgroupDir {
    pub fn create(prefix: &str) -> Result<Self, LogindError> {
        let root = cgroup2_root()?;
        let suffix = new_boot_id()?;
        let path = root.join(format!("{prefix}-{}", &suffix[..8]));
        std::fs::create_dir(&path).map_err(LogindError::io(format!(
            "creating cgroup {}",
            path.display()
        )))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// PIDs in this cgroup and below.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        collect_pids(&self.path, &mut pids);
        pids
    }

    /// Removes the folder and its children, retrying briefly: the kernel releases a cgroup
    /// only after its last (zombie) member is reaped.
    pub fn remove(&self) -> Result<(), LogindError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match remove_cgroup_tree(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(LogindError::Io {
                        context: format!("removing cgroup {}", self.path.display()),
                        source: e,
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(error = %e, "cgroup left behind");
        }
    }
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_pids(&e.path(), out);
            }
        }
    }
}

fn remove_cgroup_tree(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            remove_cgroup_tree(&e.path())?;
        }
    }
    // cgroup folders hold only kernel files, which rmdir takes with them.
    std::fs::remove_dir(dir)
}

/// Proportional set size of the processes, in KiB (shared pages split among their users).
pub fn pss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// Mount points of the machine's mount namespace at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Removes a folder the bed created, unless something is still mounted below it: deleting
/// through a live overlay would reach into the cached root filesystem.
pub(crate) fn remove_state_dir(dir: &Path) -> Result<(), LogindError> {
    let mounted = mounts_under(dir);
    if !mounted.is_empty() {
        return Err(LogindError::State(format!(
            "not removing {}: still mounted: {mounted:?}",
            dir.display()
        )));
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LogindError::Io {
            context: format!("removing {}", dir.display()),
            source: e,
        }),
    }
}

/// The first child of `pid` (from `/proc/<pid>/task/<pid>/children`), waiting for it to appear.
pub(crate) async fn wait_first_child(pid: u32, timeout: Duration) -> Result<u32, LogindError> {
    let deadline = Instant::now() + timeout;
    loop {
        let text =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(child) = text.split_whitespace().next().and_then(|c| c.parse().ok()) {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            return Err(LogindError::Timeout {
                what: format!("a child of pid {pid}"),
                after: timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Writes `content` to `path`, naming the path in the error.
pub(crate) fn write_file(path: &Path, content: impl AsRef<[u8]>) -> Result<(), LogindError> {
    std::fs::write(path, content).map_err(LogindError::io(format!("writing {}", path.display())))
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
