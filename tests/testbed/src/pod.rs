//! Processes the bed runs "as pods" on a node, with the handles a test needs to hurt them: the
//! host PID of each process, signals, and a memory cgroup with kubelet's OOM semantics.
//!
//! A pod is a child PID namespace of its node's logind (see [`crate::logind`]): a host-side
//! parent, an init that plays the runtime's part, and the program as the container's
//! entrypoint. When the entrypoint ends, the init ends, and the kernel kills whatever else ran
//! in the pod's PID namespace, as for a container whose PID 1 exits.
//!
//! **Memory.** With a memory limit the entrypoint and everything it starts live in a cgroup of
//! their own (the init stays outside, like a runtime's shim), and an OOM kill there ends every
//! process of the group except those with `oom_score_adj` −1000: kubelet sets
//! `memory.oom.group=1` on each container's cgroup since Kubernetes 1.28 (its
//! `singleProcessOOMKill` is off by default), and the kernel's group kill skips
//! `OOM_SCORE_ADJ_MIN` tasks (`mm/oom_kill.c`, `oom_kill_memcg_member`). On a cgroup v2 host
//! with the memory controller the bed sets `memory.max` and `memory.oom.group` and the kernel
//! does it all ([`CgroupMode::V2`]). On a hybrid host, where the memory controller sits on
//! cgroup v1 and v1 has no group kill, the bed sets `memory.limit_in_bytes`, lets the kernel
//! pick and kill its victim, and kills the rest of the group itself within milliseconds by the
//! same rule ([`CgroupMode::V1Emulated`]).
//!
//! Killing the entrypoint ends the pod even if a −1000 process survived the group kill: a
//! process that must outlive an OOM kill of its container has to be the container's PID 1.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {pod}: {detail}")]
    State { pod: String, detail: String },
    #[error(
        "no memory cgroup to limit a pod with: neither cgroup v2 with the memory controller nor \
         a cgroup v1 memory hierarchy is mounted under /sys/fs/cgroup"
    )]
    NoMemoryCgroup,
    #[error("signal {signal} to pid {pid}: {source}")]
    Signal {
        pid: u32,
        signal: Signal,
        #[source]
        source: nix::errno::Errno,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PodError {
    let what = what.into();
    move |source| PodError::Io { what, source }
}

/// Where a pod's stdout and stderr go.
#[derive(Debug, Clone, Default)]
pub enum PodOutput {
    /// The bed's own (what `testbed run` does).
    Inherit,
    /// Appended to a file.
    File(PathBuf),
    /// Pipes the caller takes with [`Pod::take_output`].
    Piped,
    #[default]
    Null,
}

/// What to run as a pod.
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    /// Shown in errors and `testbed fault status`; defaults to the program's file name.
    pub name: Option<String>,
    pub program: String,
    pub args: Vec<String>,
    /// Set after the bed's own pod variables, so they can override them.
    pub env: Vec<(String, String)>,
    /// The container's memory limit in bytes: runs the pod in a memory cgroup of its own with
    /// kubelet's OOM group-kill semantics (see the module docs).
    pub memory_max: Option<u64>,
    pub output: PodOutput,
}

impl PodSpec {
    pub fn new(program: impl Into<String>, args: &[&str]) -> Self {
        Self {
            program: program.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            ..Self::default()
        }
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn memory_max(mut self, bytes: u64) -> Self {
        self.memory_max = Some(bytes);
        self
    }

    pub fn output(mut self, output: PodOutput) -> Self {
        self.output = output;
        self
    }

    pub(crate) fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            Path::new(&self.program)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.program.clone())
        })
    }
}

/// How a pod's memory cgroup enforces the group kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// cgroup v2 `memory.max` + `memory.oom.group=1`: the kernel kills the group.
    V2,
    /// cgroup v1 `memory.limit_in_bytes`; the kernel kills one victim and the bed the rest.
    V1Emulated,
}

/// A pod's memory cgroup; removed when dropped.
pub struct PodCgroup {
    dir: PathBuf,
    mode: CgroupMode,
    limit: u64,
    emulated_group_kills: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for PodCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCgroup")
            .field("dir", &self.dir)
            .field("mode", &self.mode)
            .field("limit", &self.limit)
            .finish()
    }
}

/// How often the v1 emulation looks for a new OOM kill. The kernel's own victim dies at once;
/// the rest of the group follows within this.
const OOM_POLL: Duration = Duration::from_millis(2);

impl PodCgroup {
    /// Makes a memory cgroup limited to `limit` bytes, the v2 way where the host allows it.
    pub fn create(prefix: &str, limit: u64) -> Result<Self, PodError> {
        let v2 = crate::logind::cgroup2_root().ok();
        let v2_memory = v2
            .as_ref()
            .and_then(|root| std::fs::read_to_string(root.join("cgroup.controllers")).ok())
            .is_some_and(|c| c.split_whitespace().any(|x| x == "memory"));
        let suffix: u32 = rand::random();
        let name = format!("{prefix}-{suffix:08x}");
        if let (true, Some(root)) = (v2_memory, v2) {
            return Self::create_v2(&root, &name, limit);
        }
        let v1 = v1_memory_parent().ok_or(PodError::NoMemoryCgroup)?;
        Self::create_v1(&v1, &name, limit)
    }

    fn create_v2(root: &Path, name: &str, limit: u64) -> Result<Self, PodError> {
        // The root cgroup may hold processes and still hand controllers down.
        let subtree = root.join("cgroup.subtree_control");
        let enabled = std::fs::read_to_string(&subtree).unwrap_or_default();
        if !enabled.split_whitespace().any(|c| c == "memory") {
            std::fs::write(&subtree, "+memory").map_err(io("enabling the memory controller"))?;
        }
        let dir = root.join(name);
        std::fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let mut this = Self::bare(dir, CgroupMode::V2, limit);
        this.write("memory.max", &limit.to_string())?;
        // No swap, so the limit is where the OOM killer acts (absent without swap accounting).
        let _ = this.write("memory.swap.max", "0");
        this.write("memory.oom.group", "1")?;
        this.watcher = None;
        Ok(this)
    }

    fn create_v1(parent: &Path, name: &str, limit: u64) -> Result<Self, PodError> {
        let dir = parent.join(name);
        std::fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let mut this = Self::bare(dir, CgroupMode::V1Emulated, limit);
        this.write("memory.limit_in_bytes", &limit.to_string())?;
        let (dir, stop, kills) = (
            this.dir.clone(),
            this.stop.clone(),
            this.emulated_group_kills.clone(),
        );
        this.watcher = Some(
            std::thread::Builder::new()
                .name("pod-oom-group".into())
                .spawn(move || emulate_group_kill(&dir, &stop, &kills))
                .map_err(io("starting the OOM group-kill watcher"))?,
        );
        Ok(this)
    }

    fn bare(dir: PathBuf, mode: CgroupMode, limit: u64) -> Self {
        Self {
            dir,
            mode,
            limit,
            emulated_group_kills: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            watcher: None,
        }
    }

    fn write(&self, file: &str, value: &str) -> Result<(), PodError> {
        let path = self.dir.join(file);
        std::fs::write(&path, value).map_err(io(format!("writing {value} to {}", path.display())))
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn mode(&self) -> CgroupMode {
        self.mode
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Host PIDs in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        read_pids(&self.dir)
    }

    /// How many times the kernel's OOM killer fired in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        match self.mode {
            CgroupMode::V2 => counter(&self.dir.join("memory.events"), "oom_kill"),
            CgroupMode::V1Emulated => counter(&self.dir.join("memory.oom_control"), "oom_kill"),
        }
    }

    /// How many group kills followed (the kernel's on v2, the bed's on v1).
    pub fn group_kills(&self) -> u64 {
        match self.mode {
            CgroupMode::V2 => counter(&self.dir.join("memory.events"), "oom_group_kill"),
            CgroupMode::V1Emulated => self.emulated_group_kills.load(Ordering::SeqCst),
        }
    }

    /// Runs a process in the cgroup that allocates twice the limit, as a container exceeding
    /// its limit does, and waits (bounded) until the OOM killer has fired. The process lives
    /// in the machine's PID namespace; only its cgroup is the pod's.
    pub async fn exceed_limit(&self, timeout: Duration) -> Result<(), PodError> {
        let before = self.oom_kills();
        let group_before = self.group_kills();
        let block = (self.limit.saturating_mul(2)).max(1 << 20);
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args([
            "-c",
            r#"echo $$ > "$0/cgroup.procs" && exec dd if=/dev/zero of=/dev/null bs="$1" count=1"#,
        ])
        .arg(&self.dir)
        .arg(block.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
        let mut hog = cmd.spawn().map_err(io("starting a memory hog"))?;
        let status = tokio::time::timeout(timeout, hog.wait()).await;
        // Returns only once the whole group is gone: on v1 the bed's kill follows the
        // kernel's by a few milliseconds, and whoever asked must not see the pod in between.
        let fired = crate::wait::until(timeout, Duration::from_millis(2), || async {
            let group_done = self.mode == CgroupMode::V2 || self.group_kills() > group_before;
            (self.oom_kills() > before && group_done).then_some(())
        })
        .await;
        match (status, fired) {
            (_, Some(())) => Ok(()),
            (Ok(Ok(status)), None) => Err(PodError::State {
                pod: self.dir.display().to_string(),
                detail: format!("the memory hog ended ({status}) without an OOM kill"),
            }),
            _ => Err(PodError::State {
                pod: self.dir.display().to_string(),
                detail: format!("no OOM kill within {timeout:?}"),
            }),
        }
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        // Whatever is left (a hog, a −1000 survivor) goes with the pod.
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && self.dir.exists() {
            if Instant::now() >= deadline {
                tracing::warn!(dir = %self.dir.display(), "pod cgroup left behind");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The cgroup v1 memory hierarchy's folder for this process's own memory cgroup, so pod
/// cgroups nest under whatever limits the machine already put on the bed.
fn v1_memory_parent() -> Option<PathBuf> {
    let mount = PathBuf::from("/sys/fs/cgroup/memory");
    if !mount.join("memory.limit_in_bytes").is_file() {
        return None;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.trim_start_matches('/').to_owned())
    })?;
    let dir = mount.join(rel);
    dir.is_dir().then_some(dir)
}

fn read_pids(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// `key value` lines (memory.events, memory.oom_control): the value of `key`, 0 if absent.
fn counter(file: &Path, key: &str) -> u64 {
    parse_counter(&std::fs::read_to_string(file).unwrap_or_default(), key)
}

fn parse_counter(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// Whether the kernel's group kill spares this process: `oom_score_adj` at `OOM_SCORE_ADJ_MIN`.
fn spared_by_group_kill(oom_score_adj: &str) -> bool {
    oom_score_adj.trim() == "-1000"
}

/// The v1 stand-in for `memory.oom.group=1`: after each kernel OOM kill in `dir`, SIGKILL every
/// other member not at `oom_score_adj` −1000.
fn emulate_group_kill(dir: &Path, stop: &AtomicBool, kills: &AtomicU64) {
    let oom_control = dir.join("memory.oom_control");
    let mut seen = counter(&oom_control, "oom_kill");
    while !stop.load(Ordering::SeqCst) {
        let now = counter(&oom_control, "oom_kill");
        if now > seen {
            seen = now;
            let mut killed = 0;
            for pid in read_pids(dir) {
                let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
                    .unwrap_or_default();
                if !spared_by_group_kill(&adj)
                    && kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok()
                {
                    killed += 1;
                }
            }
            kills.fetch_add(1, Ordering::SeqCst);
            tracing::info!(cgroup = %dir.display(), killed, "OOM group kill (emulated on cgroup v1)");
        }
        std::thread::sleep(OOM_POLL);
    }
}

/// What the bed keeps about each pod it started, for faults that name a node or a PID.
#[derive(Clone)]
pub struct PodRecord {
    pub name: String,
    pub node: String,
    /// The pod's parent in the machine's PID namespace.
    pub parent_pid: u32,
    /// Where the pod's init writes the entrypoint's PID (in the pod's namespace).
    pub pidfile: PathBuf,
    pub cgroup: Option<Arc<PodCgroup>>,
}

impl PodRecord {
    /// The entrypoint's host PID, once the pod's init has started it.
    pub fn entrypoint(&self) -> Option<u32> {
        entrypoint_pid(self.parent_pid, &self.pidfile)
    }
}

/// The pods the bed started and that still have a handle.
#[derive(Clone, Default)]
pub struct PodRegistry {
    inner: Arc<Mutex<(u64, BTreeMap<u64, PodRecord>)>>,
}

impl PodRegistry {
    fn add(&self, record: PodRecord) -> u64 {
        let mut g = self.inner.lock().expect("pod registry lock");
        g.0 += 1;
        let id = g.0;
        g.1.insert(id, record);
        id
    }

    fn remove(&self, id: u64) {
        self.inner.lock().expect("pod registry lock").1.remove(&id);
    }

    pub fn records(&self) -> Vec<PodRecord> {
        self.inner
            .lock()
            .expect("pod registry lock")
            .1
            .values()
            .cloned()
            .collect()
    }
}

/// A running pod; dropping it kills every process of the pod and removes its cgroup.
pub struct Pod {
    name: String,
    node: String,
    child: tokio::process::Child,
    parent_pid: u32,
    /// Holds the pidfile; removed with the pod.
    state: tempfile::TempDir,
    cgroup: Option<Arc<PodCgroup>>,
    registry: PodRegistry,
    id: u64,
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("name", &self.name)
            .field("node", &self.node)
            .field("parent_pid", &self.parent_pid)
            .field("cgroup", &self.cgroup)
            .finish()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.registry.remove(self.id);
        self.stop_bottom_up();
    }
}

impl Pod {
    /// Spawns `cmd` (a node's [`pod_command`](crate::logind::LogindNode::pod_command)) with
    /// `spec`'s output, limit and variables, and registers the pod. [`crate::bed::BedNode::spawn_pod`]
    /// does this for a bed's nodes; a logind started on its own can use it with a registry of
    /// its own.
    pub fn spawn(
        mut cmd: tokio::process::Command,
        spec: &PodSpec,
        node: &str,
        registry: &PodRegistry,
    ) -> Result<Self, PodError> {
        let name = spec.display_name();
        let cgroup = match spec.memory_max {
            Some(limit) => Some(Arc::new(PodCgroup::create(
                &format!("testbed-pod-{node}"),
                limit,
            )?)),
            None => None,
        };
        if let Some(cg) = &cgroup {
            cmd.env("TESTBED_POD_CGROUP", cg.path());
        }
        let state = tempfile::Builder::new()
            .prefix("testbed-pod-")
            .tempdir()
            .map_err(io("creating the pod's folder"))?;
        let pidfile = state.path().join("entrypoint.pid");
        cmd.env("TESTBED_POD_PIDFILE", &pidfile);
        cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
        let (out, err) = match &spec.output {
            PodOutput::Inherit => (Stdio::inherit(), Stdio::inherit()),
            PodOutput::Null => (Stdio::null(), Stdio::null()),
            PodOutput::Piped => (Stdio::piped(), Stdio::piped()),
            PodOutput::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(io(format!("opening {}", path.display())))?;
                let copy = file
                    .try_clone()
                    .map_err(io(format!("opening {}", path.display())))?;
                (Stdio::from(file), Stdio::from(copy))
            }
        };
        cmd.stdout(out).stderr(err).kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {name} as a pod on {node}")))?;
        let parent_pid = child.id().unwrap_or(0);
        let id = registry.add(PodRecord {
            name: name.clone(),
            node: node.to_owned(),
            parent_pid,
            pidfile,
            cgroup: cgroup.clone(),
        });
        Ok(Self {
            name,
            node: node.to_owned(),
            child,
            parent_pid,
            state,
            cgroup,
            registry: registry.clone(),
            id,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The pod's parent in the machine's PID namespace (not the program).
    pub fn parent_pid(&self) -> u32 {
        self.parent_pid
    }

    /// The program's (the container entrypoint's) host PID, waiting up to `timeout` for the
    /// pod to have started it.
    pub async fn pid(&self, timeout: Duration) -> Result<u32, PodError> {
        let pidfile = self.state.path().join("entrypoint.pid");
        crate::wait::until(timeout, Duration::from_millis(5), || async {
            entrypoint_pid(self.parent_pid, &pidfile)
        })
        .await
        .ok_or_else(|| PodError::State {
            pod: self.name.clone(),
            detail: format!("its program did not start within {timeout:?}"),
        })
    }

    /// Host PIDs of every process in the pod (the entrypoint and its descendants, orphans the
    /// pod's init adopted included), read from `/proc` now.
    pub fn processes(&self) -> Vec<u32> {
        pod_processes(self.parent_pid)
    }

    /// Sends `signal` to the entrypoint.
    pub async fn signal(&self, signal: Signal) -> Result<u32, PodError> {
        let pid = self.pid(Duration::from_secs(5)).await?;
        send(pid, signal)?;
        Ok(pid)
    }

    /// Sends `signal` to one of the pod's processes by host PID; refuses a PID that is not in
    /// this pod.
    pub fn signal_process(&self, pid: u32, signal: Signal) -> Result<(), PodError> {
        if !self.processes().contains(&pid) {
            return Err(PodError::State {
                pod: self.name.clone(),
                detail: format!("pid {pid} is not one of its processes"),
            });
        }
        send(pid, signal)
    }

    /// The pod's memory cgroup, if it was given a limit.
    pub fn cgroup(&self) -> Option<&PodCgroup> {
        self.cgroup.as_deref()
    }

    /// Runs a process in the pod's cgroup that exceeds the memory limit, so the OOM killer
    /// fires there (see [`PodCgroup::exceed_limit`]).
    pub async fn exceed_memory_limit(&self, timeout: Duration) -> Result<(), PodError> {
        let cg = self.cgroup.as_ref().ok_or_else(|| PodError::State {
            pod: self.name.clone(),
            detail: "it has no memory limit (PodSpec::memory_max)".into(),
        })?;
        cg.exceed_limit(timeout).await
    }

    /// The pod's stdout and stderr, once, when it was started with [`PodOutput::Piped`].
    pub fn take_output(
        &mut self,
    ) -> (
        Option<tokio::process::ChildStdout>,
        Option<tokio::process::ChildStderr>,
    ) {
        (self.child.stdout.take(), self.child.stderr.take())
    }

    /// Waits for the pod's parent to exit (the entrypoint ended, or the pod was killed).
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// [`wait`](Self::wait), bounded; `None` if the pod still runs.
    pub async fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()?
            .ok()
    }

    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Kills the pod and waits for its parent to exit.
    pub async fn kill(&mut self) {
        self.stop_bottom_up();
        let _ = self.child.kill().await;
    }

    /// Kills the pod's `unshare` (in the node's PID namespace) before its parent, so the
    /// parent reaps it. Killing the parent first would leave it to the machine's init, which
    /// may take its time, and the node's PID namespace cannot end (nor the node shut down)
    /// while one of its processes is an unreaped zombie. Blocks for at most a second.
    fn stop_bottom_up(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        if let Some(unshare) = children(self.parent_pid).first() {
            let _ = kill(Pid::from_raw(*unshare as i32), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        // Whatever remains, kill_on_drop ends.
    }
}

/// A byte count as Kubernetes writes memory (`64Mi`, `1Gi`, `500M`, `1048576`).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count (e.g. 64Mi, 1Gi, 500M)"))?;
    let factor: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use Ki, Mi, Gi, k, M or G)"
            ));
        }
    };
    n.checked_mul(factor)
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("{s:?}: give a positive size that fits 64 bits"))
}

/// Signals a pod process of any registered pod, by host PID.
pub(crate) fn signal_registered(
    registry: &PodRegistry,
    pid: u32,
    signal: Signal,
) -> Result<String, PodError> {
    let owner = registry
        .records()
        .into_iter()
        .find(|r| pod_processes(r.parent_pid).contains(&pid))
        .ok_or_else(|| PodError::State {
            pod: format!("pid {pid}"),
            detail: "no pod the bed started has this process".into(),
        })?;
    send(pid, signal)?;
    Ok(owner.name)
}

fn send(pid: u32, signal: Signal) -> Result<(), PodError> {
    kill(Pid::from_raw(pid as i32), signal).map_err(|source| PodError::Signal {
        pid,
        signal,
        source,
    })
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    out
}

/// The pod's init (PID 1 of its namespace): parent → setpriv/unshare → init.
fn pod_init(parent_pid: u32) -> Option<u32> {
    let unshare = *children(parent_pid).first()?;
    children(unshare).first().copied()
}

/// The entrypoint: the init's child whose PID in the pod's namespace the init wrote to
/// `pidfile` (the init's other children are passing `mount` helpers).
pub(crate) fn entrypoint_pid(parent_pid: u32, pidfile: &Path) -> Option<u32> {
    let inner: u32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    let init = pod_init(parent_pid)?;
    children(init)
        .into_iter()
        .find(|c| innermost_pid(*c) == Some(inner))
}

/// A process's PID in the innermost PID namespace it belongs to (`NSpid`'s last field).
fn innermost_pid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// Every descendant of the pod's init.
pub(crate) fn pod_processes(parent_pid: u32) -> Vec<u32> {
    let Some(init) = pod_init(parent_pid) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut todo = children(init);
    // Bounded: a process table is finite and each PID is visited once.
    while let Some(pid) = todo.pop() {
        if out.contains(&pid) || out.len() > 10_000 {
            continue;
        }
        out.push(pid);
        todo.extend(children(pid));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_by_key() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_counter(v1, "oom_kill"), 3);
        assert_eq!(parse_counter(v1, "under_oom"), 0);
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 1\n";
        assert_eq!(parse_counter(v2, "oom_kill"), 2);
        assert_eq!(parse_counter(v2, "oom_group_kill"), 1);
        assert_eq!(parse_counter(v2, "missing"), 0);
    }

    #[test]
    fn only_oom_score_adj_min_is_spared() {
        assert!(spared_by_group_kill("-1000\n"));
        assert!(!spared_by_group_kill("-999\n"));
        assert!(!spared_by_group_kill("0\n"));
        assert!(!spared_by_group_kill(""));
    }

    #[test]
    fn byte_counts_read_as_kubernetes_writes_them() {
        assert_eq!(parse_bytes("64Mi"), Ok(64 << 20));
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("500M"), Ok(500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("Mi").is_err());
    }

    #[test]
    fn pod_name_defaults_to_the_program_file_name() {
        assert_eq!(
            PodSpec::new("/usr/bin/sleep", &["1"]).display_name(),
            "sleep"
        );
        assert_eq!(
            PodSpec::new("sleep", &[]).name("agent").display_name(),
            "agent"
        );
    }
}
