//! Seeing a lock go from logind's side, at the resolution the release latencies need.
//!
//! logind announces no inhibitor changes on the bus. It does keep a state file per inhibitor
//! under its `/run/systemd/inhibit/<id>` while the lock is held and unlinks it the moment it
//! reads EOF on the lock's FIFO (systemd `src/login/logind-inhibit.c`, `inhibitor_stop`; elogind
//! keeps the same paths). A `stat` of that file every 0.5 ms, from the machine through
//! `/proc/<logind's pid>/root`, costs next to nothing, unlike a D-Bus `ListInhibitors` round
//! trip through dbus-daemon and logind at that rate, which would compete with the agent under
//! test for the CPU. Where no state file can be found the watch falls back to `ListInhibitors`
//! every 2 ms on a connection of its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use super::{LOGIN1, LOGIN1_MANAGER, LOGIN1_PATH};

/// How often the state file is looked at.
pub const STATE_FILE_POLL: Duration = Duration::from_micros(500);
/// How often `ListInhibitors` is asked when there is no state file to look at.
pub const LIST_POLL: Duration = Duration::from_millis(2);

/// When a lock went away, as seen from outside logind: it was there at `last_held` (the last
/// look that still found it) and no more at `gone`. The release happened in between.
#[derive(Clone, Copy, Debug)]
pub struct Release {
    pub last_held: SystemTime,
    pub gone: SystemTime,
}

impl Release {
    /// The width of the window the release happened in.
    pub fn resolution(&self) -> Duration {
        self.gone
            .duration_since(self.last_held)
            .unwrap_or(Duration::ZERO)
    }
}

/// How a [`ReleaseWatch`] sees the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseMethod {
    /// logind's inhibitor state file, every 0.5 ms.
    StateFile,
    /// `ListInhibitors`, every 2 ms.
    ListInhibitors,
}

impl ReleaseMethod {
    pub fn describe(self) -> &'static str {
        match self {
            Self::StateFile => "logind's inhibitor state file (stat every 0.5 ms)",
            Self::ListInhibitors => "ListInhibitors (every 2 ms)",
        }
    }
}

enum Inner {
    StateFile {
        stop: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<Option<Release>>,
    },
    List {
        bus: String,
        who: String,
        timeout: Duration,
    },
}

/// An armed watch for one lock's release. Arm it while the lock is held; [`wait`](Self::wait)
/// then returns the release window, or `None` if the lock outlived the timeout.
pub struct ReleaseWatch {
    inner: Inner,
}

impl ReleaseWatch {
    /// Watches the lock of `who` on the logind whose root folder (as the machine sees it) is
    /// `root` and whose bus is at `bus`, for at most `timeout` from now.
    pub fn arm(root: &Path, bus: &str, who: &str, timeout: Duration) -> Self {
        let inner = match find_state_file(root, who) {
            Some(path) => {
                let stop = Arc::new(AtomicBool::new(false));
                let flag = stop.clone();
                let thread = std::thread::Builder::new()
                    .name("release-watch".into())
                    .spawn(move || poll_state_file(&path, timeout, &flag))
                    .expect("starting a thread");
                Inner::StateFile { stop, thread }
            }
            None => Inner::List {
                bus: bus.to_owned(),
                who: who.to_owned(),
                timeout,
            },
        };
        Self { inner }
    }

    pub fn method(&self) -> ReleaseMethod {
        match self.inner {
            Inner::StateFile { .. } => ReleaseMethod::StateFile,
            Inner::List { .. } => ReleaseMethod::ListInhibitors,
        }
    }

    pub async fn wait(self) -> Option<Release> {
        match self.inner {
            Inner::StateFile { thread, .. } => {
                tokio::task::spawn_blocking(move || thread.join().ok().flatten())
                    .await
                    .ok()
                    .flatten()
            }
            Inner::List { bus, who, timeout } => poll_list(&bus, &who, timeout).await,
        }
    }

    /// Stops watching without waiting for the release.
    pub fn cancel(self) {
        if let Inner::StateFile { stop, .. } = self.inner {
            stop.store(true, Ordering::Relaxed);
        }
    }
}

/// The state file of `who`'s lock under a logind's root (`WHO=` is one of its lines).
pub fn find_state_file(root: &Path, who: &str) -> Option<PathBuf> {
    let dir = root.join("run/systemd/inhibit");
    let want = format!("WHO={who}");
    std::fs::read_dir(&dir).ok()?.flatten().find_map(|e| {
        let path = e.path();
        // `<id>.ref` is the lock's FIFO, not its state.
        if path.extension().is_some_and(|x| x == "ref") {
            return None;
        }
        let text = std::fs::read_to_string(&path).ok()?;
        text.lines().any(|l| l == want).then_some(path)
    })
}

fn poll_state_file(path: &Path, timeout: Duration, stop: &AtomicBool) -> Option<Release> {
    let end = Instant::now() + timeout;
    let mut last_held = SystemTime::now();
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let asked = SystemTime::now();
        if std::fs::symlink_metadata(path).is_err() {
            return Some(Release {
                last_held,
                gone: SystemTime::now(),
            });
        }
        last_held = asked;
        std::thread::sleep(STATE_FILE_POLL);
    }
    None
}

/// Polls `ListInhibitors` until `who` is no longer listed (or logind is gone with its node).
async fn poll_list(bus: &str, who: &str, timeout: Duration) -> Option<Release> {
    let end = Instant::now() + timeout;
    let mut last_held = SystemTime::now();
    let mut conn = super::connect(bus).await.ok();
    while Instant::now() < end {
        let asked = SystemTime::now();
        let held = match &conn {
            Some(c) => match c
                .call_method(
                    Some(LOGIN1),
                    LOGIN1_PATH,
                    Some(LOGIN1_MANAGER),
                    "ListInhibitors",
                    &(),
                )
                .await
            {
                Ok(reply) => reply
                    .body()
                    .deserialize::<Vec<(String, String, String, String, u32, u32)>>()
                    .map(|rows| rows.iter().any(|r| r.1 == who))
                    .unwrap_or(false),
                Err(_) => false,
            },
            None => false,
        };
        if !held {
            return Some(Release {
                last_held,
                gone: SystemTime::now(),
            });
        }
        last_held = asked;
        tokio::time::sleep(LIST_POLL).await;
        if conn.is_none() {
            conn = super::connect(bus).await.ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_state_file_of_who_and_sees_it_go() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("run/systemd/inhibit");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("1"), "WHAT=sleep\nWHO=other\nMODE=delay\n").unwrap();
        std::fs::write(dir.join("2.ref"), "").unwrap();
        std::fs::write(
            dir.join("2"),
            "WHAT=shutdown\nWHO=shutdown-guard\nMODE=delay\n",
        )
        .unwrap();
        assert_eq!(
            find_state_file(root.path(), "shutdown-guard"),
            Some(dir.join("2"))
        );
        assert_eq!(find_state_file(root.path(), "nobody"), None);

        let watch = ReleaseWatch::arm(
            root.path(),
            "unix:path=/nonexistent",
            "shutdown-guard",
            Duration::from_secs(5),
        );
        assert_eq!(watch.method(), ReleaseMethod::StateFile);
        let removed_at = SystemTime::now();
        std::fs::remove_file(dir.join("2")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let release = rt.block_on(watch.wait()).expect("seen");
        assert!(release.gone >= removed_at);
        assert!(release.last_held <= release.gone);
    }
}
