//! elogind 246 on a private dbus-daemon (`scripts/elogind-ns.sh`): up in well under a second,
//! for cases that need logind's lock semantics but not a whole node.
//!
//! elogind runs the hard-coded `/sbin/poweroff` (reboot, halt, kexec) once the delay locks are
//! released or timed out. Inside its namespace every power command is a marker script that
//! records when it was called: that moment is the power-off. Known differences from systemd's
//! logind (see `shared/notes/real-logind.md`): one shutdown per instance, no
//! `PrepareForShutdownWithMetadata`, and a scheduled shutdown ignores delay locks.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{
    CgroupDir, Inhibitor, LOGIN1, LOGIN1_MANAGER, LOGIN1_PATH, LogindError, LogindNode, PodSpec,
    ensure_cached, new_boot_id, pod_command, pss_kib, read_inhibit_delay_max, read_inhibitors,
    remove_state_dir, run_checked, tail, wait_first_child, wait_for_logind, wait_inhibit_delay_max,
    write_file,
};
use crate::process::{ManagedChild, pid_exists};

#[derive(Debug, Clone)]
pub struct ElogindOptions {
    /// `InhibitDelayMaxSec` in elogind's configuration from the start.
    pub inhibit_delay_max_secs: u64,
    pub start_timeout: Duration,
}

impl Default for ElogindOptions {
    fn default() -> Self {
        Self {
            inhibit_delay_max_secs: 5,
            start_timeout: Duration::from_secs(10),
        }
    }
}

/// A private dbus-daemon and elogind in their own PID and mount namespaces.
pub struct Elogind {
    dir: PathBuf,
    outer: ManagedChild,
    /// Host PID of the namespace's PID 1 (the script that started the daemons).
    init_pid: u32,
    boot_id: String,
    cgroup: CgroupDir,
    start_time: Duration,
}

impl std::fmt::Debug for Elogind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elogind")
            .field("dir", &self.dir)
            .field("init_pid", &self.init_pid)
            .finish()
    }
}

/// Runs in place of systemctl, poweroff, reboot, halt, shutdown, telinit and kexec.
const MARKER: &str = r#"#!/bin/sh
echo "$(date +%s.%N) $0 $*" >> "@DIR@/poweroff-marker"
exit 0
"#;

/// The machine's `/usr/share/dbus-1/system.conf` default policy, with a socket of our own, no
/// `<user>`, no forking and no activation.
const BUS_CONF: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=@DIR@/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <includedir>@ROOT@/usr/share/dbus-1/system.d</includedir>
</busconfig>
"#;

fn logind_conf(inhibit_delay_max_secs: u64) -> String {
    // Everything that could act on the machine is off; only the delay limit matters here.
    format!(
        "[Login]\nInhibitDelayMaxSec={inhibit_delay_max_secs}\nHandlePowerKey=ignore\n\
         HandleSuspendKey=ignore\nHandleHibernateKey=ignore\nHandleLidSwitch=ignore\n\
         HandleLidSwitchExternalPower=ignore\nHandleLidSwitchDocked=ignore\nIdleAction=ignore\n\
         RemoveIPC=no\nKillUserProcesses=no\n[Sleep]\nAllowSuspend=no\nAllowHibernation=no\n\
         AllowSuspendThenHibernate=no\nAllowHybridSleep=no\n"
    )
}

impl Elogind {
    /// Unpacks elogind if it is not cached yet, starts the bus and elogind, and waits until
    /// elogind owns `org.freedesktop.login1`.
    pub async fn start(opts: ElogindOptions) -> Result<Self, LogindError> {
        let root = crate::paths::cache_dir().join("elogind");
        ensure_cached(
            "fetch-elogind.sh",
            &[],
            &crate::paths::cache_dir().join("elogind.stamp"),
        )
        .await?;
        let dir = tempfile::Builder::new()
            .prefix("testbed-elogind-")
            .tempdir()
            .map_err(LogindError::io("creating elogind's folder"))?
            .keep();
        let d = dir.display().to_string();
        let r = root.display().to_string();
        write_file(
            &dir.join("system-bus.conf"),
            BUS_CONF.replace("@DIR@", &d).replace("@ROOT@", &r),
        )?;
        write_file(
            &dir.join("logind.conf"),
            logind_conf(opts.inhibit_delay_max_secs),
        )?;
        let marker = dir.join("marker.sh");
        write_file(&marker, MARKER.replace("@DIR@", &d))?;
        set_mode(&marker, 0o755)?;
        let boot_id = new_boot_id()?;
        write_file(&dir.join("boot_id"), format!("{boot_id}\n"))?;
        let cgroup = CgroupDir::create("testbed-elogind")?;

        let mut cmd = std::process::Command::new(crate::paths::scripts_dir().join("elogind-ns.sh"));
        cmd.env("EL_DIR", &dir)
            .env("EL_ROOT", &root)
            .env("EL_CGROUP", cgroup.path());
        let started = Instant::now();
        let log = dir.join("ns.log");
        let mut outer = ManagedChild::spawn("elogind", cmd, &log).map_err(Box::new)?;
        outer.set_term_grace(Duration::from_secs(2));
        let init_pid = match wait_first_child(outer.pid(), Duration::from_secs(5)).await {
            Ok(pid) => pid,
            Err(e) => {
                drop(outer);
                let detail = tail(&log, 20);
                let _ = remove_state_dir(&dir);
                return Err(LogindError::NotRunning {
                    what: "elogind".into(),
                    detail: format!(": {e}\n{detail}"),
                });
            }
        };
        let mut this = Self {
            dir,
            outer,
            init_pid,
            boot_id,
            cgroup,
            start_time: Duration::ZERO,
        };
        let address = this.bus_address();
        let outer = &mut this.outer;
        let _bus = wait_for_logind(&address, opts.start_timeout, || {
            if outer.is_running() {
                Ok(())
            } else {
                Err(LogindError::NotRunning {
                    what: "elogind".into(),
                    detail: format!(" (exited while starting)\n{}", tail(&log, 20)),
                })
            }
        })
        .await?;
        this.start_time = started.elapsed();
        tracing::info!(pid = init_pid, took = ?this.start_time, "elogind on its bus");
        Ok(this)
    }

    /// The folder holding the bus socket, configuration, logs and the power-off marker.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Host PID of the namespace's PID 1.
    pub fn pid(&self) -> u32 {
        self.init_pid
    }

    /// From start to elogind on the bus.
    pub fn start_time(&self) -> Duration {
        self.start_time
    }

    /// Proportional memory of the namespace's processes, in KiB.
    pub fn memory_kib(&self) -> u64 {
        pss_kib(&self.cgroup.pids())
    }

    pub fn cgroup_path(&self) -> PathBuf {
        self.cgroup.path().to_path_buf()
    }

    /// Every call of a power command so far: `(when, "<command> <args>")`.
    pub fn power_commands(&self) -> Vec<(SystemTime, String)> {
        let text = std::fs::read_to_string(self.dir.join("poweroff-marker")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (stamp, cmd) = l.split_once(' ')?;
                let (s, n) = stamp.split_once('.')?;
                let at = UNIX_EPOCH + Duration::new(s.parse().ok()?, n.get(..9)?.parse().ok()?);
                Some((at, cmd.to_owned()))
            })
            .collect()
    }

    fn elogind_pid(&self) -> Option<u32> {
        self.daemon_pid("elogind")
    }

    /// A daemon the namespace's init started (and restarts when it ends), by its `comm`.
    fn daemon_pid(&self, comm: &str) -> Option<u32> {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.init_pid)).ok()?;
        children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
            })
    }

    /// Stops elogind (SIGTERM); the namespace's init starts it again, as systemd restarts
    /// systemd-logind. Returns once a new elogind owns `org.freedesktop.login1`.
    pub async fn restart_logind(&self) -> Result<(), LogindError> {
        self.restart(&["elogind"]).await
    }

    /// Stops the bus and elogind; the init starts the bus again, then elogind.
    pub async fn restart_bus(&self) -> Result<(), LogindError> {
        self.restart(&["dbus-daemon", "elogind"]).await
    }

    async fn restart(&self, daemons: &[&str]) -> Result<(), LogindError> {
        let mut old = Vec::new();
        for comm in daemons {
            let pid = self
                .daemon_pid(comm)
                .ok_or_else(|| LogindError::NotRunning {
                    what: (*comm).to_owned(),
                    detail: " in the elogind namespace".into(),
                })?;
            kill(Pid::from_raw(pid as i32), Signal::SIGTERM).map_err(|e| LogindError::Io {
                context: format!("SIGTERM to {comm} ({pid})"),
                source: e.into(),
            })?;
            old.push(pid);
        }
        let timeout = Duration::from_secs(10);
        let gone = crate::wait::until(timeout, Duration::from_millis(5), || async {
            old.iter().all(|p| !pid_exists(*p)).then_some(())
        })
        .await;
        if gone.is_none() {
            return Err(LogindError::Timeout {
                what: format!("{daemons:?} to stop"),
                after: timeout,
            });
        }
        let fresh = crate::wait::until(timeout, Duration::from_millis(5), || async {
            let pid = self.elogind_pid()?;
            (!old.contains(&pid)).then_some(())
        })
        .await;
        if fresh.is_none() {
            return Err(LogindError::Timeout {
                what: "a new elogind".into(),
                after: timeout,
            });
        }
        let _bus = wait_for_logind(&self.bus_address(), timeout, || Ok(())).await?;
        Ok(())
    }

    async fn do_poweroff(&self) -> Result<(), LogindError> {
        let cmd = self.pod_command(
            "busctl",
            &[
                "call",
                LOGIN1,
                LOGIN1_PATH,
                LOGIN1_MANAGER,
                "PowerOff",
                "b",
                "false",
            ],
        );
        run_checked(cmd, Duration::from_secs(10)).await
    }

    async fn do_wait_poweroff(&self, timeout: Duration) -> Result<SystemTime, LogindError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((at, _)) = self.power_commands().into_iter().next() {
                return Ok(at);
            }
            if Instant::now() >= deadline {
                return Err(LogindError::Timeout {
                    what: "elogind to run its power-off command".into(),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn do_set_inhibit_delay_max(&self, secs: u64) -> Result<Duration, LogindError> {
        write_file(&self.dir.join("logind.conf"), logind_conf(secs))?;
        let pid = self.elogind_pid().ok_or_else(|| LogindError::NotRunning {
            what: "elogind".into(),
            detail: String::new(),
        })?;
        kill(Pid::from_raw(pid as i32), Signal::SIGHUP).map_err(|e| LogindError::Io {
            context: format!("SIGHUP to elogind ({pid})"),
            source: e.into(),
        })?;
        wait_inhibit_delay_max(
            &self.bus_address(),
            Duration::from_secs(secs),
            Duration::from_secs(5),
        )
        .await
    }
}

impl LogindNode for Elogind {
    fn bus_address(&self) -> String {
        format!("unix:path={}", self.dir.join("system_bus_socket").display())
    }

    fn pod_bus_address(&self) -> String {
        self.bus_address()
    }

    fn boot_id(&self) -> String {
        self.boot_id.clone()
    }

    fn pod_command(&self, program: &str, args: &[&str]) -> tokio::process::Command {
        let boot_id_file = self.dir.join("boot_id");
        let spec = PodSpec {
            ns_pid: self.init_pid,
            boot_id_file: &boot_id_file,
            bus_address: self.pod_bus_address(),
        };
        pod_command(&spec, program, args)
    }

    /// `PowerOff(false)` from a pod, like `systemctl poweroff` asks logind.
    fn poweroff(&self) -> impl Future<Output = Result<(), LogindError>> + Send {
        self.do_poweroff()
    }

    /// The moment elogind ran its power-off command (the marker's timestamp).
    fn wait_poweroff(
        &self,
        timeout: Duration,
    ) -> impl Future<Output = Result<SystemTime, LogindError>> + Send {
        self.do_wait_poweroff(timeout)
    }

    /// Rewrites `ELOGIND_CONF_FILE` and sends elogind SIGHUP.
    fn set_inhibit_delay_max(
        &self,
        secs: u64,
    ) -> impl Future<Output = Result<Duration, LogindError>> + Send {
        self.do_set_inhibit_delay_max(secs)
    }

    async fn inhibit_delay_max(&self) -> Result<Duration, LogindError> {
        read_inhibit_delay_max(&self.bus_address()).await
    }

    async fn list_inhibitors(&self) -> Result<Vec<Inhibitor>, LogindError> {
        read_inhibitors(&self.bus_address()).await
    }

    /// Waits for the marker's first line and prints its timestamp.
    fn wait_poweroff_shell_command(&self) -> String {
        format!(
            "sh -c 'm={}; n=$(( ${{TESTBED_WAIT_TIMEOUT:-600}} * 20 )); \
             while [ ! -s \"$m\" ]; do n=$((n - 1)); [ $n -gt 0 ] || exit 1; sleep 0.05; done; \
             head -n1 \"$m\" | cut -d\" \" -f1'",
            self.dir.join("poweroff-marker").display()
        )
    }
}

impl Drop for Elogind {
    fn drop(&mut self) {
        // PID 1 first: its death ends every process and mount of the namespace.
        if self.outer.is_running() && pid_exists(self.init_pid) {
            let _ = kill(Pid::from_raw(self.init_pid as i32), Signal::SIGKILL);
        }
        self.outer.kill();
        if let Err(e) = self.cgroup.remove() {
            tracing::warn!(error = %e, "elogind cgroup left behind");
        }
        if let Err(e) = remove_state_dir(&self.dir) {
            tracing::warn!(error = %e, "elogind folder left behind");
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), LogindError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(LogindError::io(format!("chmod {}", path.display())))
}
