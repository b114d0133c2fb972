//! The bed's real logind: a delay lock taken by a pod-like process holds a node's power-off
//! until it is released or `InhibitDelayMaxSec` runs out, on systemd (trixie and bookworm) and
//! on elogind; trixie announces the kind of shutdown; teardown leaves nothing behind.
//!
//! These tests boot containers and time power-offs, so they run one at a time (`SERIAL`).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use testbed::logind::{
    Elogind, ElogindOptions, LogindNode, PowerAction, Suite, SystemdNode, SystemdOptions,
    mounts_under,
};
use testbed::process::pid_exists;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Release → power-off must stay below this (the bound).
const RELEASE_TO_POWEROFF: Duration = Duration::from_secs(1);

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn between(earlier: SystemTime, later: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}

/// A delay lock held by a pod-like process (the machine's `systemd-inhibit` around `cat`):
/// closing `cat`'s stdin ends both, and with them the lock.
struct DelayLock {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl DelayLock {
    async fn take(node: &impl LogindNode, who: &str) -> Result<Self> {
        let what = format!("--who={who}");
        let mut cmd = node.pod_command(
            "systemd-inhibit",
            &[
                "--what=shutdown",
                "--mode=delay",
                &what,
                "--why=test",
                "cat",
            ],
        );
        cmd.stdin(Stdio::piped()).stdout(Stdio::null());
        let mut child = cmd.spawn().context("starting systemd-inhibit")?;
        let stdin = child.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let locks = node.list_inhibitors().await?;
            if locks.iter().any(|l| l.who == who && l.mode == "delay") {
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!("systemd-inhibit exited before taking the lock: {status}");
            }
            ensure!(Instant::now() < deadline, "lock {who} never showed up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { child, stdin })
    }

    fn is_held(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Releases the lock and returns the moment it did.
    async fn release(mut self) -> Result<SystemTime> {
        let mut stdin = self.stdin.take().context("already released")?;
        stdin.shutdown().await.ok();
        drop(stdin);
        let status = tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .context("systemd-inhibit did not exit after its stdin closed")??;
        let at = SystemTime::now();
        ensure!(status.success(), "systemd-inhibit failed: {status}");
        Ok(at)
    }
}

/// `dbus-monitor` in a pod, watching logind's Manager signals.
struct Monitor {
    _child: Child,
    lines: Arc<Mutex<Vec<(SystemTime, String)>>>,
}

impl Monitor {
    async fn start(node: &impl LogindNode) -> Result<Self> {
        let mut cmd = node.pod_command(
            "dbus-monitor",
            &[
                "--system",
                "type='signal',interface='org.freedesktop.login1.Manager'",
            ],
        );
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn().context("starting dbus-monitor")?;
        let out = child.stdout.take().context("no stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(out).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push((SystemTime::now(), line));
            }
        });
        let monitor = Self {
            _child: child,
            lines,
        };
        // dbus-monitor prints the bus's NameAcquired to itself once it is subscribed.
        monitor
            .wait_for("NameAcquired", Duration::from_secs(10))
            .await?;
        Ok(monitor)
    }

    fn text(&self) -> String {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn wait_for(&self, needle: &str, timeout: Duration) -> Result<SystemTime> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((at, _)) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|(_, l)| l.contains(needle))
            {
                return Ok(*at);
            }
            ensure!(
                Instant::now() < deadline,
                "dbus-monitor never showed {needle:?}; got:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The `type` entry of the first `PrepareForShutdownWithMetadata`, if one came.
    fn metadata_type(&self) -> Option<String> {
        let lines = self.lines.lock().unwrap();
        let mut in_signal = false;
        let mut after_type_key = false;
        for (_, line) in lines.iter() {
            let line = line.trim();
            if line.starts_with("signal ") {
                in_signal = line.contains("member=PrepareForShutdownWithMetadata");
                after_type_key = false;
            } else if in_signal && line == "string \"type\"" {
                after_type_key = true;
            } else if in_signal && after_type_key {
                // `variant             string "poweroff"`
                let value = line.split("string \"").nth(1)?;
                return Some(value.trim_end_matches('"').to_owned());
            }
        }
        None
    }
}

async fn boot(suite: Suite) -> Result<SystemdNode> {
    let started = Instant::now();
    let node = SystemdNode::boot(SystemdOptions::new("node-1", suite)).await?;
    println!(
        "{}: booted in {:.2} s (logind on bus after {:.2} s of container start), node memory {} KiB PSS",
        suite.as_str(),
        secs(started.elapsed()),
        secs(node.last_boot_time()),
        node.memory_kib()
    );
    Ok(node)
}

/// A lock delays the power-off; once it is released the node powers off within a second.
async fn lock_delays_until_release(node: &mut SystemdNode, monitor: &Monitor) -> Result<()> {
    let lock = DelayLock::take(node, "testbed-drain").await?;
    node.poweroff().await?;
    monitor
        .wait_for("member=PrepareForShutdown", Duration::from_secs(5))
        .await?;
    // Held well below InhibitDelayMaxSec (5 s by default): the node must still be up.
    let held = node.wait_poweroff(Duration::from_millis(1500)).await;
    ensure!(
        held.is_err(),
        "powered off while the lock was held: {held:?}"
    );
    ensure!(node.is_running(), "PID 1 exited while the lock was held");
    let released = lock.release().await?;
    let off = node.wait_poweroff(Duration::from_secs(10)).await?;
    let latency = between(released, off);
    println!(
        "{}: release -> `Shutting down.` {:.0} ms",
        node.suite().as_str(),
        latency.as_secs_f64() * 1000.0
    );
    ensure!(
        latency < RELEASE_TO_POWEROFF,
        "power-off {latency:?} after release"
    );
    let exit = node.wait_exit(Duration::from_secs(30)).await?;
    ensure!(exit.action == PowerAction::PowerOff, "{exit:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trixie_delay_lock_holds_poweroff_until_released() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut node = boot(Suite::Trixie).await?;
    let monitor = Monitor::start(&node).await?;
    lock_delays_until_release(&mut node, &monitor).await?;
    ensure!(
        monitor.metadata_type().as_deref() == Some("poweroff"),
        "PrepareForShutdownWithMetadata type: {:?}\n{}",
        monitor.metadata_type(),
        monitor.text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookworm_delay_lock_holds_poweroff_until_released() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut node = boot(Suite::Bookworm).await?;
    // systemd 252's logind reloads InhibitDelayMaxSec on SIGHUP too (kubelet relies on it).
    let limit = node.set_inhibit_delay_max(8).await?;
    ensure!(limit == Duration::from_secs(8), "{limit:?}");
    let monitor = Monitor::start(&node).await?;
    lock_delays_until_release(&mut node, &monitor).await?;
    // systemd 252 predates the metadata signal.
    ensure!(
        !monitor.text().contains("PrepareForShutdownWithMetadata"),
        "{}",
        monitor.text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trixie_without_lock_powers_off_at_once() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut node = boot(Suite::Trixie).await?;
    let asked = SystemTime::now();
    node.poweroff().await?;
    let off = node.wait_poweroff(Duration::from_secs(10)).await?;
    let latency = between(asked, off);
    println!(
        "trixie: no lock, poweroff -> `Shutting down.` {:.0} ms",
        latency.as_secs_f64() * 1000.0
    );
    ensure!(latency < RELEASE_TO_POWEROFF, "took {latency:?}");
    let exit = node.wait_exit(Duration::from_secs(30)).await?;
    ensure!(exit.action == PowerAction::PowerOff, "{exit:?}");
    println!(
        "trixie: `Shutting down.` -> PID 1 gone {:.0} ms",
        between(off, exit.exited_at).as_secs_f64() * 1000.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trixie_lock_past_inhibit_delay_max_is_overridden() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut node = boot(Suite::Trixie).await?;
    let limit = node.set_inhibit_delay_max(3).await?;
    ensure!(
        limit == Duration::from_secs(3),
        "InhibitDelayMaxUSec {limit:?}"
    );
    let mut lock = DelayLock::take(&node, "testbed-stuck").await?;
    let asked = SystemTime::now();
    node.poweroff().await?;
    // Shortly before the limit the lock is still there and the node still up.
    tokio::time::sleep(limit - Duration::from_millis(500)).await;
    ensure!(lock.is_held(), "the lock holder went away early");
    let locks = node.list_inhibitors().await?;
    ensure!(locks.iter().any(|l| l.who == "testbed-stuck"), "{locks:?}");
    ensure!(node.is_running());
    let off = node.wait_poweroff(Duration::from_secs(15)).await?;
    let waited = between(asked, off);
    println!(
        "trixie: lock held past InhibitDelayMaxSec=3, poweroff -> `Shutting down.` {:.2} s",
        secs(waited)
    );
    ensure!(
        waited >= limit && waited < limit + RELEASE_TO_POWEROFF,
        "powered off after {waited:?}, limit {limit:?}"
    );
    node.wait_exit(Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trixie_reboot_announces_reboot_and_boots_same_disk_with_new_boot_id() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut node = boot(Suite::Trixie).await?;
    let first_id = node.boot_id();
    // A pod sees this boot's ID at the standard path, not the machine's.
    let seen = pod_output(&node, "cat", &["/proc/sys/kernel/random/boot_id"]).await?;
    ensure!(seen.trim() == first_id, "pod saw {seen:?}, node {first_id}");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    ensure!(kernel.trim() != first_id);
    // A drop-in on the node's disk, as kubelet writes one, must survive the reboot.
    let etc = PathBuf::from(format!(
        "/proc/{}/root/etc/systemd/logind.conf.d",
        node.pid()
    ));
    std::fs::create_dir_all(&etc)?;
    std::fs::write(
        etc.join("99-kubelet.conf"),
        "[Login]\nInhibitDelayMaxSec=7\n",
    )?;

    let monitor = Monitor::start(&node).await?;
    let exit = {
        node.reboot().await?;
        monitor
            .wait_for(
                "member=PrepareForShutdownWithMetadata",
                Duration::from_secs(5),
            )
            .await?;
        node.wait_exit(Duration::from_secs(30)).await?
    };
    ensure!(exit.action == PowerAction::Reboot, "{exit:?}");
    ensure!(
        monitor.metadata_type().as_deref() == Some("reboot"),
        "PrepareForShutdownWithMetadata type: {:?}\n{}",
        monitor.metadata_type(),
        monitor.text()
    );
    let started = Instant::now();
    node.boot_again().await?;
    println!("trixie: second boot in {:.2} s", secs(started.elapsed()));
    ensure!(node.boot_count() == 2);
    let second_id = node.boot_id();
    ensure!(second_id != first_id, "boot ID unchanged");
    let seen = pod_output(&node, "cat", &["/proc/sys/kernel/random/boot_id"]).await?;
    ensure!(
        seen.trim() == second_id,
        "pod saw {seen:?}, node {second_id}"
    );
    let limit = node.inhibit_delay_max().await?;
    ensure!(
        limit == Duration::from_secs(7),
        "drop-in lost across reboot: {limit:?}"
    );
    Ok(())
}

/// What the CLI hands a command in a pod: `TESTBED_POWEROFF` run in the pod, and
/// `TESTBED_WAIT_POWEROFF` printing the same moment [`LogindNode::wait_poweroff`] returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trixie_poweroff_from_a_pod_over_dbus_with_shell_waiter() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut node = boot(Suite::Trixie).await?;
    let waiter = tokio::process::Command::new("sh")
        .args([
            "-c",
            &format!("exec {}", node.wait_poweroff_shell_command()),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let asked = SystemTime::now();
    pod_output(&node, "sh", &["-c", &node.poweroff_shell_command()]).await?;
    let off = node.wait_poweroff(Duration::from_secs(10)).await?;
    ensure!(
        between(asked, off) < RELEASE_TO_POWEROFF,
        "{:?}",
        between(asked, off)
    );
    let out = tokio::time::timeout(Duration::from_secs(10), waiter.wait_with_output()).await??;
    ensure!(out.status.success(), "waiter: {}", out.status);
    let printed: f64 = String::from_utf8(out.stdout)?.trim().parse()?;
    let expected = off.duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    ensure!(
        (printed - expected).abs() < 0.001,
        "waiter printed {printed}, node {expected}"
    );
    let exit = node.wait_exit(Duration::from_secs(30)).await?;
    ensure!(exit.action == PowerAction::PowerOff, "{exit:?}");
    Ok(())
}

async fn pod_output(node: &impl LogindNode, program: &str, args: &[&str]) -> Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        node.pod_command(program, args).output(),
    )
    .await
    .context("pod command timed out")??;
    ensure!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elogind_delay_lock_semantics() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let opts = ElogindOptions {
        inhibit_delay_max_secs: 10,
        ..ElogindOptions::default()
    };

    // Held, then released: power-off follows the release within a second.
    let started = Instant::now();
    let el = Elogind::start(opts.clone()).await?;
    println!(
        "elogind: on its bus after {:.0} ms ({} KiB PSS)",
        started.elapsed().as_secs_f64() * 1000.0,
        el.memory_kib()
    );
    let lock = DelayLock::take(&el, "testbed-drain").await?;
    el.poweroff().await?;
    let held = el.wait_poweroff(Duration::from_millis(1500)).await;
    ensure!(held.is_err(), "powered off while locked: {held:?}");
    let released = lock.release().await?;
    let off = el.wait_poweroff(Duration::from_secs(5)).await?;
    let latency = between(released, off);
    println!(
        "elogind: release -> power command {:.0} ms",
        latency.as_secs_f64() * 1000.0
    );
    ensure!(latency < RELEASE_TO_POWEROFF, "took {latency:?}");
    drop(el);

    // No lock: at once.
    let el = Elogind::start(opts.clone()).await?;
    let asked = SystemTime::now();
    el.poweroff().await?;
    let off = el.wait_poweroff(Duration::from_secs(5)).await?;
    let latency = between(asked, off);
    println!(
        "elogind: no lock, PowerOff -> power command {:.0} ms",
        latency.as_secs_f64() * 1000.0
    );
    ensure!(latency < RELEASE_TO_POWEROFF, "took {latency:?}");
    drop(el);

    // Held past InhibitDelayMaxSec: at the limit.
    let el = Elogind::start(opts).await?;
    let limit = el.set_inhibit_delay_max(2).await?;
    ensure!(limit == Duration::from_secs(2), "{limit:?}");
    let mut lock = DelayLock::take(&el, "testbed-stuck").await?;
    let asked = SystemTime::now();
    el.poweroff().await?;
    let off = el.wait_poweroff(Duration::from_secs(10)).await?;
    let waited = between(asked, off);
    println!(
        "elogind: lock held past InhibitDelayMaxSec=2, PowerOff -> power command {:.2} s",
        secs(waited)
    );
    ensure!(
        waited >= limit && waited < limit + RELEASE_TO_POWEROFF,
        "after {waited:?}"
    );
    ensure!(lock.is_held(), "the lock holder went away early");
    let commands = el.power_commands();
    ensure!(
        commands.len() == 1 && commands[0].1.contains("poweroff"),
        "{commands:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_leaves_nothing_behind() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let node = boot(Suite::Trixie).await?;
    let el = Elogind::start(ElogindOptions::default()).await?;
    let mut pids = vec![node.pid(), el.pid()];
    pids.extend(
        std::fs::read_to_string(node.cgroup_path().unwrap().join("init.scope/cgroup.procs"))
            .iter()
            .flat_map(|t| t.lines().filter_map(|l| l.parse::<u32>().ok())),
    );
    // A pod on each, still running at teardown.
    let mut pods = Vec::new();
    for cmd in [
        node.pod_command("sleep", &["300"]),
        el.pod_command("sleep", &["300"]),
    ] {
        let mut cmd = cmd;
        cmd.kill_on_drop(false);
        let child = cmd.spawn()?;
        pids.push(child.id().context("pod pid")?);
        pods.push(child);
    }
    // Let the pods' namespaces come up (their PID 1 forks `sleep`).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for pod in &pods {
        let pid = pod.id().unwrap();
        let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?;
        pids.extend(
            kids.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    let dirs: Vec<PathBuf> = vec![node.state_dir().to_path_buf(), el.dir().to_path_buf()];
    let cgroups = vec![node.cgroup_path().unwrap(), el.cgroup_path()];
    let mountinfo_before = std::fs::read_to_string("/proc/self/mountinfo")?;

    drop(node);
    drop(el);
    // The pods die with their node; their nsenter parents are reaped here.
    for mut pod in pods {
        let status = tokio::time::timeout(Duration::from_secs(10), pod.wait()).await??;
        ensure!(!status.success(), "pod exited cleanly?");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|p| pid_exists(*p)).collect();
        if alive.is_empty() {
            break;
        }
        ensure!(Instant::now() < deadline, "processes left: {alive:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for dir in &dirs {
        ensure!(mounts_under(dir).is_empty(), "mounts left under {dir:?}");
        ensure!(!dir.exists(), "folder left: {dir:?}");
    }
    for cg in &cgroups {
        ensure!(!cg.exists(), "cgroup left: {cg:?}");
    }
    let mountinfo_after = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(
        mountinfo_after.lines().count() <= mountinfo_before.lines().count(),
        "the machine has more mounts than before"
    );
    Ok(())
}
