//! A node whose logind is the real one: a Debian root filesystem booted with its own systemd
//! as PID 1 of fresh pid, mount, uts, ipc, net and cgroup namespaces (`scripts/ct-boot.sh`).
//!
//! The node's "disk" is the upper layer of an overlay over the cached root filesystem, kept
//! across reboots; each boot gets a fresh boot ID. PID 1 logs to a pseudo-terminal bound over
//! the container's `/dev/console`, which the bed reads line by line and timestamps: systemd's
//! `Shutting down.` line is the moment the node powers off, and its `Powering off.` /
//! `Rebooting.` line says which way it went.

use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
use nix::unistd::Pid;
use tokio::sync::watch;

use super::{
    CgroupDir, Inhibitor, LogindError, LogindNode, PodSpec, ensure_cached, new_boot_id,
    node_command, pod_command, pss_kib, read_inhibit_delay_max, read_inhibitors, remove_state_dir,
    run_checked, run_output, tail, wait_first_child, wait_for_logind, wait_inhibit_delay_max,
    write_file,
};
use crate::process::{ManagedChild, pid_exists};

/// The Debian release whose systemd the node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Suite {
    /// Debian 13, systemd 257: emits `PrepareForShutdownWithMetadata`.
    #[default]
    Trixie,
    /// Debian 12, systemd 252: `PrepareForShutdown` only.
    Bookworm,
    /// Debian 13 with polkitd: logind asks polkit about non-root callers.
    TrixiePolkit,
    /// Debian 11, systemd 247: root's legacy `reboot` goes around logind.
    Bullseye,
}

impl Suite {
    pub fn as_str(self) -> &'static str {
        match self {
            Suite::Trixie => "trixie",
            Suite::Bookworm => "bookworm",
            Suite::TrixiePolkit => "trixie-polkit",
            Suite::Bullseye => "bullseye",
        }
    }

    /// The cached root filesystem (built by `scripts/build-rootfs.sh <suite>`).
    pub fn rootfs(self) -> PathBuf {
        crate::paths::cache_dir().join("rootfs").join(self.as_str())
    }

    fn stamp(self) -> PathBuf {
        crate::paths::cache_dir()
            .join("rootfs")
            .join(format!("{}.stamp", self.as_str()))
    }
}

impl std::str::FromStr for Suite {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "trixie" => Ok(Suite::Trixie),
            "bookworm" => Ok(Suite::Bookworm),
            "trixie-polkit" => Ok(Suite::TrixiePolkit),
            "bullseye" => Ok(Suite::Bullseye),
            other => Err(format!(
                "unknown suite {other:?} (trixie|bookworm|trixie-polkit|bullseye)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SystemdOptions {
    /// Host name of the node (`node-1`).
    pub name: String,
    pub suite: Suite,
    /// The node's persistent folder (its disk and console log). `None`: a temporary folder,
    /// removed when the node is dropped. A given folder is kept.
    pub state_dir: Option<PathBuf>,
    /// How long a boot may take until logind is on the node's bus.
    pub boot_timeout: Duration,
}

impl Default for SystemdOptions {
    fn default() -> Self {
        Self {
            name: "node-1".into(),
            suite: Suite::Trixie,
            state_dir: None,
            boot_timeout: Duration::from_secs(30),
        }
    }
}

impl SystemdOptions {
    pub fn new(name: impl Into<String>, suite: Suite) -> Self {
        Self {
            name: name.into(),
            suite,
            ..Self::default()
        }
    }
}

/// Which way systemd left the node, from its last console lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    PowerOff,
    Reboot,
    Halt,
    /// PID 1 ended without systemd's shutdown (killed, or it crashed).
    Unknown,
}

/// How a boot of the node ended.
#[derive(Debug, Clone)]
pub struct NodeExit {
    pub action: PowerAction,
    /// When systemd printed `Shutting down.` (the power-off moment), if it did.
    pub shutting_down_at: Option<SystemTime>,
    /// When the bed saw the container's PID 1 gone.
    pub exited_at: SystemTime,
}

/// One line PID 1 (or `systemd-shutdown`) wrote to the node's console.
#[derive(Debug, Clone)]
pub struct ConsoleLine {
    /// When the bed read it.
    pub at: SystemTime,
    /// Which boot of the node wrote it (1 for the first).
    pub boot: u32,
    pub text: String,
}

/// Console marker of the start of the final shutdown stage, printed by PID 1 as it hands over
/// to systemd-shutdown (systemd `src/core/main.c`).
const SHUTTING_DOWN: &str = "Shutting down.";

struct ConsoleShared {
    lines: Mutex<Vec<ConsoleLine>>,
    boot: std::sync::atomic::AtomicU32,
    seen: watch::Sender<usize>,
    stop: AtomicBool,
}

/// The host end of the pseudo-terminal that is the container's `/dev/console`.
struct Console {
    shared: Arc<ConsoleShared>,
    reader: Option<JoinHandle<()>>,
    /// Held so the terminal never reads as hung up between PID 1's writes (PID 1 reopens the
    /// console for every message).
    _slave: OwnedFd,
    slave_path: PathBuf,
}

impl Console {
    fn open(log_path: &Path) -> Result<Self, LogindError> {
        let pty = nix::pty::openpty(None, None).map_err(|e| LogindError::Io {
            context: "opening a pseudo-terminal".into(),
            source: e.into(),
        })?;
        // Raw, so lines arrive as written (no CR added, no echo back into the reader).
        let mut attrs = tcgetattr(pty.slave.as_fd()).map_err(|e| LogindError::Io {
            context: "tcgetattr".into(),
            source: e.into(),
        })?;
        cfmakeraw(&mut attrs);
        tcsetattr(pty.slave.as_fd(), SetArg::TCSANOW, &attrs).map_err(|e| LogindError::Io {
            context: "tcsetattr".into(),
            source: e.into(),
        })?;
        let slave_path = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd()))
            .map_err(LogindError::io("naming the pseudo-terminal"))?;
        let (seen, _) = watch::channel(0);
        let shared = Arc::new(ConsoleShared {
            lines: Mutex::new(Vec::new()),
            boot: std::sync::atomic::AtomicU32::new(0),
            seen,
            stop: AtomicBool::new(false),
        });
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(LogindError::io(format!("opening {}", log_path.display())))?;
        let reader = {
            let shared = shared.clone();
            let master = pty.master;
            std::thread::Builder::new()
                .name("node-console".into())
                .spawn(move || read_console(master, shared, log))
                .map_err(LogindError::io("starting the console reader"))?
        };
        Ok(Self {
            shared,
            reader: Some(reader),
            _slave: pty.slave,
            slave_path,
        })
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Reads the console until told to stop, stamping each line with the time it arrived and
/// appending it to `log` as `<unix seconds.nanos> <line>` (what shell waiters read).
fn read_console(master: OwnedFd, shared: Arc<ConsoleShared>, mut log: std::fs::File) {
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !shared.stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
        let n = match nix::unistd::read(&master, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
            // EIO: every other holder of the terminal hung it up; wait for the next writer.
            Err(nix::errno::Errno::EIO) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => break,
        };
        let at = SystemTime::now();
        pending.extend_from_slice(&buf[..n]);
        let mut added = 0;
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\n', '\r'])
                .trim_start_matches('\r')
                .to_owned();
            let stamp = at.duration_since(UNIX_EPOCH).unwrap_or_default();
            let _ = writeln!(
                log,
                "{}.{:09} {}",
                stamp.as_secs(),
                stamp.subsec_nanos(),
                text
            );
            let boot = shared.boot.load(Ordering::SeqCst);
            shared
                .lines
                .lock()
                .expect("console lock")
                .push(ConsoleLine { at, boot, text });
            added += 1;
        }
        if added > 0 {
            shared.seen.send_modify(|n| *n += added);
        }
    }
}

/// One boot of the node.
struct Boot {
    number: u32,
    boot_id: String,
    /// `unshare`, in the machine's PID namespace; its child is the container's PID 1.
    outer: ManagedChild,
    init_pid: u32,
    cgroup: CgroupDir,
    exit: Option<NodeExit>,
}

enum StateDir {
    Temp(PathBuf),
    Kept(PathBuf),
}

impl StateDir {
    fn path(&self) -> &Path {
        match self {
            StateDir::Temp(p) | StateDir::Kept(p) => p,
        }
    }
}

/// A node running systemd (and so systemd-logind) as PID 1 of its own namespaces.
pub struct SystemdNode {
    opts: SystemdOptions,
    state: StateDir,
    console: Console,
    boot: Option<Boot>,
    boots: u32,
    last_boot_time: Duration,
}

impl std::fmt::Debug for SystemdNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemdNode")
            .field("name", &self.opts.name)
            .field("suite", &self.opts.suite)
            .field("state_dir", &self.state.path())
            .field("boots", &self.boots)
            .field("init_pid", &self.boot.as_ref().map(|b| b.init_pid))
            .finish()
    }
}

impl SystemdNode {
    /// Builds the root filesystem if it is not cached yet, boots the node and waits until
    /// logind is on its bus.
    pub async fn boot(opts: SystemdOptions) -> Result<Self, LogindError> {
        let suite = opts.suite;
        ensure_cached("build-rootfs.sh", &[suite.as_str()], &suite.stamp()).await?;
        let state = match &opts.state_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(LogindError::io(format!("creating {}", dir.display())))?;
                StateDir::Kept(dir.clone())
            }
            None => {
                let base = crate::paths::cache_dir().join("nodes");
                std::fs::create_dir_all(&base)
                    .map_err(LogindError::io(format!("creating {}", base.display())))?;
                let dir = tempfile::Builder::new()
                    .prefix(&format!("{}-", opts.name))
                    .tempdir_in(&base)
                    .map_err(LogindError::io("creating the node's folder"))?
                    .keep();
                StateDir::Temp(dir)
            }
        };
        let console = Console::open(&state.path().join("console.log"))?;
        let mut node = Self {
            opts,
            state,
            console,
            boot: None,
            boots: 0,
            last_boot_time: Duration::ZERO,
        };
        node.start().await?;
        Ok(node)
    }

    /// Boots the same node again (same disk, new boot ID) after its previous boot ended.
    pub async fn boot_again(&mut self) -> Result<(), LogindError> {
        if let Some(boot) = &mut self.boot
            && boot.outer.is_running()
        {
            return Err(LogindError::State(format!(
                "{} is still running (boot {})",
                self.opts.name, boot.number
            )));
        }
        self.finish_boot();
        self.start().await
    }

    /// Starts `systemctl reboot`, waits until the container's PID 1 exited, and boots the node
    /// again. Returns how the previous boot ended.
    pub async fn reboot_and_wait(&mut self, timeout: Duration) -> Result<NodeExit, LogindError> {
        self.reboot().await?;
        let exit = self.wait_exit(timeout).await?;
        self.boot_again().await?;
        Ok(exit)
    }

    async fn start(&mut self) -> Result<(), LogindError> {
        let dir = self.state.path().to_path_buf();
        let number = self.boots + 1;
        let boot_id = new_boot_id()?;
        write_file(&dir.join("boot_id"), format!("{boot_id}\n"))?;
        self.ensure_machine_id(&dir)?;
        // A fresh folder for the container's /run/dbus (see scripts/ct-boot.sh).
        let bus = dir.join("bus");
        if bus.exists() {
            std::fs::remove_dir_all(&bus).map_err(LogindError::io("clearing bus/"))?;
        }
        std::fs::create_dir_all(&bus).map_err(LogindError::io("creating bus/"))?;
        let cgroup = CgroupDir::create(&format!("testbed-{}", self.opts.name))?;
        self.console.shared.boot.store(number, Ordering::SeqCst);

        let mut cmd = std::process::Command::new(crate::paths::scripts_dir().join("ct-boot.sh"));
        cmd.env("CT_ROOTFS", self.opts.suite.rootfs())
            .env("CT_STATE", &dir)
            .env("CT_CGROUP", cgroup.path())
            .env("CT_HOSTNAME", &self.opts.name)
            .env("CT_CONSOLE", &self.console.slave_path);
        let started = Instant::now();
        let log = dir.join(format!("boot-{number}.log"));
        let mut outer = ManagedChild::spawn(format!("{} boot {number}", self.opts.name), cmd, &log)
            .map_err(Box::new)?;
        // Teardown kills PID 1 first, after which this exits at once.
        outer.set_term_grace(Duration::from_secs(2));
        self.boots = number;
        let init_pid = match wait_first_child(outer.pid(), Duration::from_secs(10)).await {
            Ok(pid) => pid,
            Err(e) => {
                let detail = tail(&log, 20);
                drop(outer);
                return Err(LogindError::NotRunning {
                    what: format!("{} (boot {number})", self.opts.name),
                    detail: format!(": {e}\n{detail}"),
                });
            }
        };
        self.boot = Some(Boot {
            number,
            boot_id,
            outer,
            init_pid,
            cgroup,
            exit: None,
        });
        let address = self.bus_address();
        let name = self.opts.name.clone();
        let timeout = self.opts.boot_timeout;
        let boot = self.boot.as_mut().expect("just set");
        let waited = wait_for_logind(&address, timeout, || {
            if boot.outer.is_running() {
                Ok(())
            } else {
                Err(LogindError::NotRunning {
                    what: format!("{name} (boot {number})"),
                    detail: format!(" (PID 1 exited during boot)\n{}", tail(&log, 20)),
                })
            }
        })
        .await;
        if let Err(e) = waited {
            self.kill_boot();
            return Err(e);
        }
        self.last_boot_time = started.elapsed();
        tracing::info!(
            node = %self.opts.name,
            boot = number,
            pid = init_pid,
            took = ?self.last_boot_time,
            "node booted, logind on its bus"
        );
        Ok(())
    }

    /// A machine ID of the node's own, kept on its disk like a real one.
    fn ensure_machine_id(&self, dir: &Path) -> Result<(), LogindError> {
        let etc = dir.join("upper/etc");
        let path = etc.join("machine-id");
        if path.is_file() {
            return Ok(());
        }
        std::fs::create_dir_all(&etc).map_err(LogindError::io("creating upper/etc"))?;
        write_file(&path, format!("{}\n", new_boot_id()?.replace('-', "")))
    }

    fn current(&self) -> Result<&Boot, LogindError> {
        self.boot.as_ref().ok_or_else(|| LogindError::NotRunning {
            what: self.opts.name.clone(),
            detail: String::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.opts.name
    }

    pub fn suite(&self) -> Suite {
        self.opts.suite
    }

    /// The node's folder: `upper/` (its disk), `console.log`, `boot-<n>.log`, `boot_id`.
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Host PID of the container's PID 1 in the current (or last) boot.
    pub fn pid(&self) -> u32 {
        self.boot.as_ref().map(|b| b.init_pid).unwrap_or(0)
    }

    /// How many times the node booted (1 after [`boot`](Self::boot)).
    pub fn boot_count(&self) -> u32 {
        self.boots
    }

    /// From starting the container to logind on its bus, for the latest boot.
    pub fn last_boot_time(&self) -> Duration {
        self.last_boot_time
    }

    /// Whether the current boot's PID 1 still runs.
    pub fn is_running(&mut self) -> bool {
        self.boot
            .as_mut()
            .is_some_and(|b| b.exit.is_none() && b.outer.is_running())
    }

    /// Every console line so far, across boots.
    pub fn console(&self) -> Vec<ConsoleLine> {
        self.console
            .shared
            .lines
            .lock()
            .expect("console lock")
            .clone()
    }

    /// The console log file: one `<unix seconds.nanos> <line>` per line.
    pub fn console_log_path(&self) -> PathBuf {
        self.state.path().join("console.log")
    }

    /// Proportional memory of the node's processes (its cgroup), in KiB.
    pub fn memory_kib(&self) -> u64 {
        self.boot
            .as_ref()
            .map(|b| pss_kib(&b.cgroup.pids()))
            .unwrap_or(0)
    }

    /// The node's cgroup folder on the machine (for teardown checks).
    pub fn cgroup_path(&self) -> Option<PathBuf> {
        self.boot.as_ref().map(|b| b.cgroup.path().to_path_buf())
    }

    /// Runs `systemctl <args>` inside the node (its mount and PID namespaces) and waits for it.
    pub async fn systemctl(&self, args: &[&str]) -> Result<(), LogindError> {
        let pid = self.current()?.init_pid;
        run_checked(
            node_command(pid, "systemctl", args),
            Duration::from_secs(30),
        )
        .await
    }

    /// Runs `program` inside the node (its mount and PID namespaces) and returns its stdout;
    /// fails with its output when it exits non-zero.
    pub async fn exec(&self, program: &str, args: &[&str]) -> Result<String, LogindError> {
        let pid = self.current()?.init_pid;
        run_output(node_command(pid, program, args), Duration::from_secs(30)).await
    }

    /// Restarts systemd-logind as an administrator does (`systemctl restart`) and returns once
    /// logind is on the bus again.
    pub async fn restart_logind(&self) -> Result<(), LogindError> {
        self.systemctl(&["restart", "systemd-logind.service"])
            .await?;
        let _bus = wait_for_logind(&self.bus_address(), Duration::from_secs(10), || Ok(())).await?;
        Ok(())
    }

    /// Restarts the system bus, then systemd-logind: logind does not survive losing its bus
    /// and the new bus does not start it again (on a real host too, until something asks for
    /// it). Returns once logind is on the new bus.
    pub async fn restart_bus(&self) -> Result<(), LogindError> {
        self.systemctl(&["restart", "dbus.service"]).await?;
        self.restart_logind().await
    }

    /// Masks `unit` until the node's next boot (`systemctl mask --runtime`), e.g.
    /// `poweroff.target`, so a power-off fails as on a host where it is masked: logind answers
    /// `PowerOff` but its delayed job fails ("Error during inhibitor-delayed operation").
    pub async fn mask_unit(&self, unit: &str) -> Result<(), LogindError> {
        self.systemctl(&["mask", "--runtime", unit]).await
    }

    /// Undoes [`mask_unit`](Self::mask_unit).
    pub async fn unmask_unit(&self, unit: &str) -> Result<(), LogindError> {
        self.systemctl(&["unmask", "--runtime", unit]).await
    }

    /// When the node powered off or rebooted (`Shutting down.` on its console), every boot.
    pub fn power_offs(&self) -> Vec<SystemTime> {
        self.console
            .shared
            .lines
            .lock()
            .expect("console lock")
            .iter()
            .filter(|l| l.text.trim() == SHUTTING_DOWN)
            .map(|l| l.at)
            .collect()
    }

    async fn start_power_action(&self, verb: &str) -> Result<(), LogindError> {
        let boot = self.current()?;
        if boot.exit.is_some() {
            return Err(LogindError::NotRunning {
                what: self.opts.name.clone(),
                detail: " (already exited)".into(),
            });
        }
        let cmd = node_command(boot.init_pid, "systemctl", &[verb]);
        match run_checked(cmd, Duration::from_secs(30)).await {
            Ok(()) => Ok(()),
            // Without locks the node may be gone before systemctl gets its answer.
            Err(_) if self.shutting_down_at().is_some() || !pid_exists(boot.init_pid) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Starts `systemctl reboot` inside the node.
    pub async fn reboot(&self) -> Result<(), LogindError> {
        self.start_power_action("reboot").await
    }

    fn shutting_down_at(&self) -> Option<SystemTime> {
        let boot = self.boots;
        self.console
            .shared
            .lines
            .lock()
            .expect("console lock")
            .iter()
            .find(|l| l.boot == boot && l.text.trim() == SHUTTING_DOWN)
            .map(|l| l.at)
    }

    /// Waits for the current boot's `Shutting down.` console line and returns when it arrived.
    async fn wait_shutting_down(&self, timeout: Duration) -> Result<SystemTime, LogindError> {
        let mut seen = self.console.shared.seen.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(at) = self.shutting_down_at() {
                return Ok(at);
            }
            match tokio::time::timeout_at(deadline, seen.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return self.shutting_down_at().ok_or(LogindError::Timeout {
                        what: format!("{} to power off (`{SHUTTING_DOWN}`)", self.opts.name),
                        after: timeout,
                    });
                }
            }
        }
    }

    /// Waits until the current boot's PID 1 exited and reports how.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<NodeExit, LogindError> {
        let boots = self.boots;
        let name = self.opts.name.clone();
        let boot = self.boot.as_mut().ok_or_else(|| LogindError::NotRunning {
            what: name.clone(),
            detail: String::new(),
        })?;
        if let Some(exit) = &boot.exit {
            return Ok(exit.clone());
        }
        if boot
            .outer
            .wait_timeout(timeout)
            .await
            .map_err(Box::new)?
            .is_none()
        {
            return Err(LogindError::Timeout {
                what: format!("{name}'s PID 1 to exit"),
                after: timeout,
            });
        }
        let exited_at = SystemTime::now();
        // PID 1's last lines may still sit in the terminal; the reader drains them promptly.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let lines: Vec<ConsoleLine> = self
            .console()
            .into_iter()
            .filter(|l| l.boot == boots)
            .collect();
        let shutting_down_at = lines
            .iter()
            .find(|l| l.text.trim() == SHUTTING_DOWN)
            .map(|l| l.at);
        let action = lines
            .iter()
            .rev()
            .find_map(|l| match l.text.trim() {
                "Powering off." => Some(PowerAction::PowerOff),
                "Rebooting." => Some(PowerAction::Reboot),
                "Halting." => Some(PowerAction::Halt),
                _ => None,
            })
            .unwrap_or(PowerAction::Unknown);
        let exit = NodeExit {
            action,
            shutting_down_at,
            exited_at,
        };
        let boot = self.boot.as_mut().expect("checked above");
        boot.exit = Some(exit.clone());
        if let Err(e) = boot.cgroup.remove() {
            tracing::warn!(error = %e, "node cgroup not removed yet");
        }
        Ok(exit)
    }

    /// Kills the current boot (PID 1 first: that ends the whole PID namespace, and with its
    /// mount namespace every mount the container made).
    fn kill_boot(&mut self) {
        if let Some(boot) = &mut self.boot {
            if boot.outer.is_running() && pid_exists(boot.init_pid) {
                let _ = kill(Pid::from_raw(boot.init_pid as i32), Signal::SIGKILL);
            }
            // `unshare` ignores SIGTERM while it waits for PID 1, whose exit can take a second
            // or two on a busy machine (the kernel tears the container's mounts down first):
            // wait for that rather than signal it.
            let deadline = Instant::now() + Duration::from_secs(10);
            while boot.outer.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            boot.outer.kill();
        }
        self.finish_boot();
    }

    fn finish_boot(&mut self) {
        if let Some(boot) = self.boot.take() {
            let Boot { outer, cgroup, .. } = boot;
            drop(outer);
            drop(cgroup);
        }
    }
}

impl LogindNode for SystemdNode {
    fn bus_address(&self) -> String {
        format!(
            "unix:path=/proc/{}/root/run/dbus/system_bus_socket",
            self.pid()
        )
    }

    /// The node's `/run/dbus` is a host folder (`bus/` in the node's folder), like the host
    /// path a DaemonSet mounts.
    fn pod_bus_address(&self) -> String {
        format!(
            "unix:path={}/system_bus_socket",
            self.state.path().join("bus").display()
        )
    }

    fn boot_id(&self) -> String {
        self.boot
            .as_ref()
            .map(|b| b.boot_id.clone())
            .unwrap_or_default()
    }

    fn pod_command(&self, program: &str, args: &[&str]) -> tokio::process::Command {
        let pid = self.pid();
        let boot_id_file = self.state.path().join("boot_id");
        let spec = PodSpec {
            ns_pid: pid,
            boot_id_file: &boot_id_file,
            bus_address: self.pod_bus_address(),
        };
        pod_command(&spec, program, args)
    }

    fn poweroff(&self) -> impl Future<Output = Result<(), LogindError>> + Send {
        self.start_power_action("poweroff")
    }

    /// The moment systemd printed `Shutting down.` on the console in the current boot (PID 1
    /// is then about to stop the last processes and exit).
    fn wait_poweroff(
        &self,
        timeout: Duration,
    ) -> impl Future<Output = Result<SystemTime, LogindError>> + Send {
        self.wait_shutting_down(timeout)
    }

    async fn set_inhibit_delay_max(&self, secs: u64) -> Result<Duration, LogindError> {
        let pid = self.current()?.init_pid;
        let dir = PathBuf::from(format!("/proc/{pid}/root/run/systemd/logind.conf.d"));
        std::fs::create_dir_all(&dir)
            .map_err(LogindError::io(format!("creating {}", dir.display())))?;
        write_file(
            &dir.join("90-testbed.conf"),
            format!("[Login]\nInhibitDelayMaxSec={secs}\n"),
        )?;
        // The same reload kubelet asks for (KillUnit systemd-logind.service SIGHUP).
        self.systemctl(&["kill", "--signal=HUP", "systemd-logind.service"])
            .await?;
        wait_inhibit_delay_max(
            &self.bus_address(),
            Duration::from_secs(secs),
            Duration::from_secs(5),
        )
        .await
    }

    async fn inhibit_delay_max(&self) -> Result<Duration, LogindError> {
        read_inhibit_delay_max(&self.bus_address()).await
    }

    async fn list_inhibitors(&self) -> Result<Vec<Inhibitor>, LogindError> {
        read_inhibitors(&self.bus_address()).await
    }

    /// Waits for the current boot's `Shutting down.` in the node's console log
    /// (`scripts/ct-wait-poweroff.sh`).
    fn wait_poweroff_shell_command(&self) -> String {
        let earlier_boots = self
            .console()
            .iter()
            .filter(|l| l.boot < self.boots)
            .count();
        format!(
            "{} {} {}",
            crate::paths::scripts_dir()
                .join("ct-wait-poweroff.sh")
                .display(),
            self.console_log_path().display(),
            earlier_boots
        )
    }
}

impl Drop for SystemdNode {
    fn drop(&mut self) {
        self.kill_boot();
        if let StateDir::Temp(dir) = &self.state
            && let Err(e) = remove_state_dir(dir)
        {
            tracing::warn!(error = %e, "node folder left behind");
        }
    }
}
