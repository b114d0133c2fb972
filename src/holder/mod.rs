//! `shutdown-guard run`: the lock holder. It is the only process that talks to logind, and it
//! talks to nothing else: no network, no data from the cluster. It holds the delay lock, relays
//! logind's signals to the drain worker (`shutdown-guard worker`, the same binary), closes the
//! lock when the worker says the node is empty, and on its own at the deadline. A worker that
//! crashes, is OOM-killed or hangs is replaced and resumes the drain; the lock stays held.
//!
//! Two ways to have a worker: on a host the holder starts it itself, as an unprivileged user
//! (`worker_user`); in a pod the worker is a container of its own that connects to the holder's
//! socket (`link_socket`), so an OOM kill of the worker's container (kubelet kills a container's
//! processes together) or its liveness probe never touches the holder, and kubelet restarts it.
//!
//! The decisions are [`crate::drain::keeper`]'s; this module carries them out.

pub mod link;

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, LinesCodec};
use tracing::{debug, error, info, warn};

use crate::config::Settings;
use crate::drain::keeper::{Keeper, KeeperConfig, KeeperEffect, KeeperInput};
use crate::host::logind::{self, LockControl, LogindEvent};
use crate::host::{bootid, logind_conf};
use link::ToHolder;

#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    BootId(#[from] bootid::BootIdError),
    #[error(transparent)]
    Listen(#[from] ListenError),
}

/// The longest line the worker may send. Its messages are single words; a longer line is a
/// broken or hostile worker, and buffering it would let the worker grow the holder, which has
/// the host's bus, until the kernel kills it with its lock.
const MAX_WORKER_LINE: usize = 1024;

/// The worker and our end of its link; the process when we started it.
struct Worker {
    child: Option<Child>,
    lines: FramedRead<OwnedReadHalf, LinesCodec>,
    tx: OwnedWriteHalf,
}

impl Worker {
    fn over(stream: UnixStream, child: Option<Child>) -> Self {
        let (rx, tx) = stream.into_split();
        Worker {
            child,
            lines: FramedRead::new(rx, LinesCodec::new_with_max_length(MAX_WORKER_LINE)),
            tx,
        }
    }
}

/// Where workers come from.
enum Workers {
    /// The holder starts them.
    Spawn(Vec<OsString>),
    /// They connect to this socket (a container of their own).
    Listen(tokio::net::UnixListener),
}

#[derive(Debug, thiserror::Error)]
#[error("listening on {path}: {source}")]
pub struct ListenError {
    path: String,
    source: std::io::Error,
}

fn listen(path: &Path) -> Result<tokio::net::UnixListener, ListenError> {
    let err = |source| ListenError {
        path: path.display().to_string(),
        source,
    };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let l = tokio::net::UnixListener::bind(path).map_err(err)?;
    // The worker runs as another user; the socket's folder is the pod's own (an emptyDir).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    Ok(l)
}

pub async fn run(settings: Settings, worker_args: Vec<OsString>) -> Result<(), HolderError> {
    let node = settings.node.clone();
    let boot_id = bootid::read_boot_id(&settings.boot_id_path)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(HolderError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(HolderError::Signals)?;
    let workers = match &settings.link_socket {
        Some(path) => Workers::Listen(listen(path)?),
        None => Workers::Spawn(worker_args),
    };
    info!(node = %node, listen = ?settings.link_socket, "holder starting");

    let (ltx, mut lrx) = mpsc::unbounded_channel();
    crate::host::schedule::spawn(node.clone(), ltx.clone());
    let lock = logind::spawn(node.clone(), ltx);
    let mut keeper = Keeper::new(KeeperConfig {
        safety_margin: settings.safety_margin,
        deadline_override: settings.deadline,
        rearm_after: settings.rearm_after,
        heartbeat_timeout: HEARTBEAT_TIMEOUT,
    });
    let memory = DrainMemory::new(&settings.state_dir, &boot_id);
    let kubeconfig = kubeconfig_text(&settings);
    let mut worker: Option<Worker> = None;
    let mut wrote_dropin = false;
    let mut inputs: Vec<KeeperInput> = vec![];
    let mut fx: Vec<KeeperEffect> = match workers {
        Workers::Spawn(_) => vec![KeeperEffect::SpawnWorker],
        Workers::Listen(_) => vec![],
    };
    loop {
        // Carry out what the keeper asked, feeding back what that starts.
        while !fx.is_empty() || !inputs.is_empty() {
            for e in std::mem::take(&mut fx) {
                if let Some(input) = execute(
                    &settings,
                    &workers,
                    &kubeconfig,
                    &lock,
                    &memory,
                    &mut worker,
                    e,
                )
                .await
                {
                    if input == KeeperInput::Terminate {
                        return Ok(());
                    }
                    inputs.push(input);
                }
            }
            for i in std::mem::take(&mut inputs) {
                fx.extend(keeper.handle(Instant::now(), i));
            }
        }
        let sleep = crate::driver::wake_at(keeper.next_wakeup());
        let from_worker = async {
            match worker.as_mut() {
                Some(Worker {
                    child: Some(child),
                    lines,
                    ..
                }) => tokio::select! {
                    line = lines.next() => Some(line.transpose()),
                    _ = child.wait() => None,
                },
                Some(w) => Some(w.lines.next().await.transpose()),
                None => std::future::pending().await,
            }
        };
        let accept = async {
            match &workers {
                Workers::Listen(l) => l.accept().await,
                Workers::Spawn(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = sigterm.recv() => inputs.push(KeeperInput::Terminate),
            _ = sigint.recv() => inputs.push(KeeperInput::Terminate),
            Some(ev) = lrx.recv() => {
                if let LogindEvent::LockTaken { .. } = ev
                    && settings.write_logind_dropin
                    && !wrote_dropin
                {
                    wrote_dropin = true;
                    if let Some(d) = raise_logind_delay(&settings).await {
                        inputs.push(KeeperInput::DelayMax(d));
                    }
                }
                inputs.extend(logind_inputs(&node, ev, &memory, keeper.drain().is_some()));
            }
            got = from_worker => match got {
                Some(Ok(Some(line))) => match line.parse::<ToHolder>() {
                    Ok(ToHolder::Alive) => inputs.push(KeeperInput::WorkerAlive),
                    Ok(ToHolder::Release) => inputs.push(KeeperInput::WorkerRelease),
                    Ok(ToHolder::Retake) => inputs.push(KeeperInput::WorkerRetake),
                    Err(e) => warn!(node = %node, error = %e, "ignoring the worker's line"),
                },
                // The link closed, broke the protocol (a line over MAX_WORKER_LINE) or the
                // process ended: either way this worker is done. A worker we started is ended
                // first, so waiting for it cannot hang the holder.
                other => {
                    if let Some(Err(e)) = &other {
                        warn!(node = %node, error = %e, "the worker's link broke");
                    }
                    if let Some(w) = worker.take() {
                        let status = match w.child {
                            Some(mut c) => {
                                let _ = c.start_kill();
                                c.wait().await.ok().map(|s| s.to_string())
                            }
                            None => None,
                        };
                        warn!(node = %node, status = status.as_deref().unwrap_or("disconnected"), "drain worker gone");
                    }
                    inputs.push(KeeperInput::WorkerExited);
                }
            },
            conn = accept => match conn {
                Ok((stream, _)) => {
                    if worker.is_some() {
                        // The old one is gone or going (kubelet restarted its container).
                        inputs.push(KeeperInput::WorkerExited);
                    }
                    info!(node = %node, "drain worker connected");
                    worker = Some(Worker::over(stream, None));
                    inputs.push(KeeperInput::WorkerStarted);
                }
                Err(e) => warn!(node = %node, error = %e, "accepting the worker failed"),
            },
            _ = sleep => inputs.push(KeeperInput::Tick),
        }
    }
}

/// The worker says it is alive every [`crate::agent::HEARTBEAT`]; this much silence is a hang.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// What logind said, as the keeper takes it.
fn logind_inputs(
    node: &str,
    ev: LogindEvent,
    memory: &DrainMemory,
    draining: bool,
) -> Vec<KeeperInput> {
    match ev {
        LogindEvent::LockTaken { delay_max, .. } => {
            vec![KeeperInput::LockTaken { delay_max }]
        }
        LogindEvent::LockLost { why } => {
            warn!(node = %node, why = %why, "lock lost");
            vec![KeeperInput::LockLost]
        }
        LogindEvent::Refused {
            delay_max,
            preparing,
        } => {
            let mut v = vec![KeeperInput::LockRefused { delay_max }];
            if preparing && !draining {
                // Started while logind already delays a shutdown: drain now, from when our
                // predecessor saw it begin if it left a note, else from now.
                let since = memory.recall().unwrap_or_default();
                warn!(
                    node = %node,
                    since_ms = since.as_millis() as u64,
                    "logind refuses a lock: a shutdown is already being delayed; draining without one"
                );
                v.push(KeeperInput::Shutdown {
                    start: true,
                    kind: None,
                    since,
                });
            }
            v
        }
        LogindEvent::Shutdown {
            start,
            kind,
            delay_max,
        } => {
            info!(node = %node, start, kind = kind.as_deref().unwrap_or(""), "shutdown signal");
            let mut v: Vec<KeeperInput> =
                delay_max.map(KeeperInput::DelayMax).into_iter().collect();
            v.push(KeeperInput::Shutdown {
                start,
                kind,
                since: Duration::ZERO,
            });
            v
        }
        LogindEvent::Preparing(p) => vec![KeeperInput::Preparing(p)],
        LogindEvent::Scheduled(s) => vec![KeeperInput::Scheduled(s)],
    }
}

async fn execute(
    settings: &Settings,
    workers: &Workers,
    kubeconfig: &Option<Vec<u8>>,
    lock: &LockControl,
    memory: &DrainMemory,
    worker: &mut Option<Worker>,
    effect: KeeperEffect,
) -> Option<KeeperInput> {
    let node = settings.node.as_str();
    match effect {
        KeeperEffect::Release { by_deadline } => {
            let held = lock.release();
            if by_deadline {
                warn!(node = %node, was_held = held, "deadline reached without the worker's word; lock closed by the holder");
            } else {
                info!(node = %node, was_held = held, "lock closed");
            }
        }
        KeeperEffect::TakeLock => lock.take(),
        KeeperEffect::SpawnWorker => {
            // A worker of its own container is restarted by kubelet and connects again.
            let Workers::Spawn(args) = workers else {
                return None;
            };
            match spawn_worker(settings, args, kubeconfig) {
                Ok(w) => {
                    let pid = w.child.as_ref().and_then(Child::id).unwrap_or(0);
                    info!(node = %node, pid, "drain worker started");
                    *worker = Some(w);
                    return Some(KeeperInput::WorkerStarted);
                }
                Err(e) => {
                    error!(node = %node, error = %e, "starting the drain worker failed");
                    return Some(KeeperInput::WorkerExited);
                }
            }
        }
        KeeperEffect::KillWorker => {
            warn!(node = %node, "the drain worker stopped answering; dropping it");
            if let Some(Worker {
                child: Some(mut c), ..
            }) = worker.take()
            {
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
            // A worker of its own container sees its link close; if it is hung, its liveness
            // probe has kubelet restart it.
            return Some(KeeperInput::WorkerExited);
        }
        KeeperEffect::Tell(t) => {
            if let Some(w) = worker.as_mut() {
                let line = format!("{t}\n");
                if let Err(e) = w.tx.write_all(line.as_bytes()).await {
                    debug!(node = %node, error = %e, "writing to the worker failed");
                }
            }
        }
        KeeperEffect::AskPreparing => lock.ask_preparing(),
        KeeperEffect::Remember(since) => memory.store(since),
        KeeperEffect::Exit => {
            if let Some(Worker {
                child: Some(mut c), ..
            }) = worker.take()
            {
                if let Some(pid) = c.id() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                let _ = tokio::time::timeout(Duration::from_secs(2), c.wait()).await;
            }
            info!(node = %node, "holder terminated");
            return Some(KeeperInput::Terminate);
        }
    }
    None
}

/// Starts the worker on the other end of a fresh link, as the configured unprivileged user.
fn spawn_worker(
    settings: &Settings,
    args: &[OsString],
    kubeconfig: &Option<Vec<u8>>,
) -> std::io::Result<Worker> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let theirs: OwnedFd = theirs.into();
    inheritable(&theirs)?;
    let kube_fd = match kubeconfig {
        Some(text) => {
            let fd =
                nix::sys::memfd::memfd_create(c"kubeconfig", nix::sys::memfd::MFdFlags::empty())?;
            let mut f = std::fs::File::from(fd);
            std::io::Write::write_all(&mut f, text)?;
            Some(OwnedFd::from(f))
        }
        None => None,
    };
    let command = |ids: Option<(u32, u32)>| -> std::io::Result<Command> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("worker")
            .arg("--link-fd")
            .arg(theirs.as_raw_fd().to_string());
        if let Some(fd) = &kube_fd {
            cmd.arg("--kubeconfig-fd").arg(fd.as_raw_fd().to_string());
        }
        cmd.args(args).kill_on_drop(true);
        if let Some((uid, gid)) = ids {
            cmd.uid(uid).gid(gid);
        }
        Ok(cmd)
    };
    let ids = settings
        .worker_ids()
        .filter(|_| nix::unistd::geteuid().is_root());
    let child = match command(ids)?.spawn() {
        // No CAP_SETUID/CAP_SETGID (EPERM), or the binary is not reachable for that user
        // (EACCES: it lives under root's home). The worker still is a process of its own, so
        // its crash does not take the lock; it just is not unprivileged.
        Err(e)
            if ids.is_some()
                && matches!(e.raw_os_error(), Some(nix::libc::EPERM | nix::libc::EACCES)) =>
        {
            warn!(
                node = %settings.node,
                worker_user = %settings.worker_user,
                error = %e,
                "cannot start the worker as worker_user; it runs as the holder's user"
            );
            command(None)?.spawn()?
        }
        other => other?,
    };
    // Our copies of the worker's ends go now: only the worker holds them.
    drop(theirs);
    drop(kube_fd);
    ours.set_nonblocking(true)?;
    Ok(Worker::over(UnixStream::from_std(ours)?, Some(child)))
}

/// Lets a child inherit `fd` (Rust opens everything close-on-exec).
fn inheritable(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
    Ok(())
}

/// The kubeconfig's text, read with the holder's rights and handed to the worker, which may not
/// be allowed to read the file. `None` in a pod (in-cluster credentials, readable by any user).
fn kubeconfig_text(settings: &Settings) -> Option<Vec<u8>> {
    let path = settings
        .kubeconfig
        .clone()
        .or_else(|| std::env::var_os("KUBECONFIG").map(PathBuf::from))
        .filter(|p| !p.as_os_str().is_empty())?;
    match std::fs::read(&path) {
        Ok(t) => Some(t),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the kubeconfig; the worker will look for one itself");
            None
        }
    }
}

/// Writes the logind drop-in and reloads logind; the delay it reads back.
async fn raise_logind_delay(s: &Settings) -> Option<Duration> {
    let node = &s.node;
    let wanted = s.drain_budget + s.safety_margin;
    match logind_conf::write_dropin(&s.host_root, &s.logind_dropin, wanted) {
        Ok(changed) => {
            info!(node = %node, dropin = %s.logind_dropin.display(), changed, wanted_s = wanted.as_secs(), "logind drop-in written");
            match logind::reload_and_verify(wanted).await {
                Ok(d) => {
                    if d < wanted {
                        warn!(node = %node, inhibit_delay_max_ms = d.as_millis() as u64, wanted_ms = wanted.as_millis() as u64, dropin = %s.logind_dropin.display(), "logind reloaded but does not use the drop-in's value");
                    } else {
                        info!(node = %node, inhibit_delay_max_ms = d.as_millis() as u64, "logind reloaded");
                    }
                    Some(d)
                }
                Err(e) => {
                    warn!(node = %node, error = %e, "reloading logind failed");
                    None
                }
            }
        }
        Err(e) => {
            warn!(node = %node, error = %e, "writing the logind drop-in failed");
            None
        }
    }
}

/// When the current drain began, kept in the state folder (a `tmpfs` that outlives the holder,
/// not the boot): a holder restarted mid-drain cannot ask logind, which tells no start time.
struct DrainMemory {
    path: PathBuf,
    boot_id: String,
}

impl DrainMemory {
    fn new(dir: &Path, boot_id: &str) -> Self {
        DrainMemory {
            path: dir.join("drain"),
            boot_id: boot_id.to_string(),
        }
    }

    fn boottime() -> Option<Duration> {
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .ok()
            .map(Duration::from)
    }

    fn store(&self, since: Option<Duration>) {
        let r = match (since, Self::boottime()) {
            (Some(since), Some(now)) => {
                let started = now.saturating_sub(since).as_millis();
                if let Some(dir) = self.path.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                std::fs::write(&self.path, format!("{} {started}\n", self.boot_id))
            }
            _ => match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        };
        if let Err(e) = r {
            debug!(path = %self.path.display(), error = %e, "drain start not recorded");
        }
    }

    /// How long ago the drain of this boot began, if a predecessor noted it.
    fn recall(&self) -> Option<Duration> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let (boot, ms) = text.trim().split_once(' ')?;
        if boot != self.boot_id {
            return None;
        }
        let started = Duration::from_millis(ms.parse().ok()?);
        Some(Self::boottime()?.saturating_sub(started))
    }
}
