//! Child processes that cannot outlive their handle.
//!
//! Every process the bed starts is a [`ManagedChild`]: it runs in its own process group with
//! stdout and stderr appended to a log file, and dropping the handle (also while a test unwinds
//! from a panic) sends SIGTERM to the group, waits a bounded time, then sends SIGKILL and reaps
//! the child. Only the group this handle created is ever signalled.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// How long [`ManagedChild::kill`] waits after SIGTERM before it sends SIGKILL, unless changed
/// with [`ManagedChild::set_term_grace`].
pub const DEFAULT_TERM_GRACE: Duration = Duration::from_secs(5);

/// How often exit is polled while waiting; short, because teardown time adds to every test.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot open log file {path}: {source}")]
    LogFile { path: PathBuf, source: io::Error },
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: String,
        source: io::Error,
    },
    #[error("cannot wait for {name} (pid {pid}): {source}")]
    Wait {
        name: String,
        pid: u32,
        source: io::Error,
    },
}

/// A child process in its own process group, killed by PID when dropped.
#[derive(Debug)]
pub struct ManagedChild {
    name: String,
    child: Child,
    log_path: PathBuf,
    term_grace: Duration,
    status: Option<ExitStatus>,
}

impl ManagedChild {
    /// Starts `cmd` as the leader of a new process group, with stdin from /dev/null and stdout and
    /// stderr appended to `log_path` (created if missing). `name` only labels errors and logs.
    pub fn spawn(
        name: impl Into<String>,
        mut cmd: Command,
        log_path: impl AsRef<Path>,
    ) -> Result<Self, ProcessError> {
        let name = name.into();
        let log_path = log_path.as_ref().to_path_buf();
        let log = open_log(&log_path)?;
        let log_err = log.try_clone().map_err(|source| ProcessError::LogFile {
            path: log_path.clone(),
            source,
        })?;
        // A group of its own lets teardown reach helpers the child forks, and keeps a Ctrl-C
        // aimed at the test runner's group from racing our ordered shutdown.
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            name: name.clone(),
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        tracing::debug!(name, pid = child.id(), log = %log_path.display(), "started");
        Ok(Self {
            name,
            child,
            log_path,
            term_grace: DEFAULT_TERM_GRACE,
            status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's PID, which is also its process-group ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Sets how long [`kill`](Self::kill) (and drop) waits between SIGTERM and SIGKILL.
    pub fn set_term_grace(&mut self, grace: Duration) {
        self.term_grace = grace;
    }

    /// The exit status if the child has exited (reaping it), without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(|source| self.wait_error(source))?;
        }
        Ok(self.status)
    }

    /// Whether the child is still running (not yet exited or not yet reaped).
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the child to exit on its own; `None` if it is still running.
    pub async fn wait_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<ExitStatus>, ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends `signal` to the child's process group; a group that is already gone is not an error.
    pub fn signal(&self, signal: Signal) -> Result<(), Errno> {
        if self.status.is_some() {
            // The PID may already belong to someone else once reaped.
            return Ok(());
        }
        match killpg(Pid::from_raw(self.child.id() as i32), signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Asks the process group to stop (SIGTERM) without waiting. Lets a caller stop several
    /// children in parallel and then [`kill`](Self::kill) each.
    pub fn terminate(&self) {
        if let Err(e) = self.signal(Signal::SIGTERM) {
            tracing::warn!(name = self.name, pid = self.pid(), error = %e, "SIGTERM failed");
        }
    }

    /// Stops the child: SIGTERM to its group, up to the term grace for it to exit, then SIGKILL
    /// to the group, and reaps it. Blocks for at most the grace plus a short bounded wait.
    /// Returns the exit status, or `None` if even SIGKILL did not end it in time (a process in
    /// uninterruptible sleep).
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if let Some(status) = self.status {
            return Some(status);
        }
        self.terminate();
        if let Some(status) = self.poll_exit(self.term_grace) {
            self.sweep_group();
            return Some(status);
        }
        tracing::warn!(name = self.name, pid = self.pid(), grace = ?self.term_grace, "did not stop on SIGTERM, sending SIGKILL");
        let _ = self.signal(Signal::SIGKILL);
        let status = self.poll_exit(Duration::from_secs(5));
        if status.is_none() {
            tracing::error!(
                name = self.name,
                pid = self.pid(),
                "still running after SIGKILL"
            );
        }
        status
    }

    fn poll_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for child failed");
                    return None;
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// After the leader exited, kills members of its group that outlived it. The group ID stays
    /// reserved while any member lives, so it cannot name a stranger's group.
    fn sweep_group(&self) {
        if killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL).is_ok() {
            tracing::debug!(name = self.name, "killed leftovers of the process group");
        }
    }

    fn wait_error(&self, source: io::Error) -> ProcessError {
        ProcessError::Wait {
            name: self.name.clone(),
            pid: self.child.id(),
            source,
        }
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        self.kill();
    }
}

fn open_log(path: &Path) -> Result<File, ProcessError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| ProcessError::LogFile {
            path: path.to_path_buf(),
            source,
        })?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| ProcessError::LogFile {
            path: path.to_path_buf(),
            source,
        })
}

/// Whether a process with this PID exists (zombies included), read from /proc.
pub fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Resident memory of a process in KiB (`VmRSS` from /proc), if it is running.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sleep.log");
        let mut cmd = Command::new("sh");
        // The shell forks a grandchild and ignores SIGTERM, so only the SIGKILL escalation and
        // the group-wide signal can end both.
        cmd.args(["-c", "trap '' TERM; sleep 300 & echo grandchild $!; wait"]);
        let mut child = ManagedChild::spawn("sh", cmd, &log).unwrap();
        child.set_term_grace(Duration::from_millis(200));
        let pid = child.pid();
        let deadline = Instant::now() + Duration::from_secs(5);
        let grandchild = loop {
            let text = std::fs::read_to_string(&log).unwrap();
            if let Some(p) = text.split_whitespace().nth(1) {
                break p.parse::<u32>().unwrap();
            }
            assert!(Instant::now() < deadline, "grandchild never started");
            std::thread::sleep(POLL);
        };
        assert!(pid_exists(pid) && pid_exists(grandchild));
        drop(child);
        assert!(!pid_exists(pid), "leader {pid} survived");
        // The grandchild is re-parented to init (or a subreaper) which reaps it shortly after.
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_exists(grandchild) && Instant::now() < deadline {
            let stat =
                std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
            if stat.split_whitespace().nth(2) == Some("Z") {
                break;
            }
            std::thread::sleep(POLL);
        }
        let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.split_whitespace().nth(2) == Some("Z"),
            "grandchild {grandchild} survived: {stat}"
        );
    }
}
