//! The drain worker (`shutdown-guard worker`, started by the [holder](crate::holder)): the part
//! of the agent that talks to the API server, unprivileged and without the system bus. It runs
//! the [driver](crate::driver) with the holder's relay of logind's signals as the trigger, the
//! boot-ID cordon mark, the holder's lock as its gate and [`report::AgentReporter`] for metrics,
//! the Node's condition, Events and `/status`. Restarted mid-drain, it resumes from the API's
//! state: KubeVirt keeps its evacuations, our annotation says the cordon is ours.

pub mod pending;
pub mod power;
pub mod report;
pub mod startup;
pub mod turns;

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use kube::Api;
use tokio::io::{AsyncBufReadExt, BufReader};
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::config::Settings;
use crate::drain::keeper::Tell;
use crate::drain::machine::{Input, MachineConfig, Note};
use crate::drain::model::{ObjKey, Schedule};
use crate::drain::power::{PowerRule, RestoreRule};
use crate::driver::{Driver, DriverConfig, DriverError, Gate, Outcome, Reporter, Step};
use crate::holder::link::{LinkError, ToHolder};
use crate::host::bootid;
use crate::kube::cordon::CordonMark;
use crate::kube::events::{NodeEvents, Reports};

/// The worker tells the holder it is alive this often.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    BootId(#[from] bootid::BootIdError),
    #[error(transparent)]
    Client(#[from] crate::kube::ClientError),
    #[error("the link to the holder: {0}")]
    Link(std::io::Error),
    #[error(transparent)]
    Driver(#[from] DriverError),
}

/// How the worker stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM/SIGINT, or the holder went away, while idle or after the release.
    Terminated,
    /// Stopped during a drain: the holder takes over (restarts a worker, or releases at the
    /// deadline).
    TerminatedDuringDrain { remaining: Vec<ObjKey> },
}

/// How the worker reaches its holder.
#[derive(Debug, Clone)]
pub enum Handover {
    /// Started by the holder: the link and the kubeconfig it read are these fds.
    Fds {
        link_fd: i32,
        kubeconfig_fd: Option<i32>,
    },
    /// A container of its own: the holder's socket.
    Socket(std::path::PathBuf),
}

/// Connects to the holder's socket, waiting for it to be there (the holder's container starts
/// first, but may be restarting).
async fn connect(path: &std::path::Path) -> Result<StdStream, RunError> {
    let mut failures = 0;
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Ok(s) => return s.into_std().map_err(RunError::Link),
            Err(e) => {
                failures += 1;
                let wait = crate::drain::eviction::backoff(failures);
                warn!(path = %path.display(), error = %e, retry_ms = wait.as_millis() as u64, "the holder's socket does not answer");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The holder's lock, through the link.
struct HolderGate {
    link: Arc<Mutex<StdStream>>,
}

fn send(link: &Mutex<StdStream>, m: ToHolder) -> bool {
    let mut g = link.lock().unwrap_or_else(|e| e.into_inner());
    g.write_all(format!("{m}\n").as_bytes()).is_ok()
}

impl Gate for HolderGate {
    fn release(&self) -> bool {
        send(&self.link, ToHolder::Release)
    }
    fn retake(&self) {
        send(&self.link, ToHolder::Retake);
    }
}

/// What the holder says, as the machine takes it.
fn input_of(m: Tell) -> Input {
    match m {
        Tell::Lock { delay_max, .. } => Input::LockTaken { delay_max },
        Tell::Lost => Input::LockLost,
        Tell::NoLock { delay_max } => Input::LockRefused { delay_max },
        Tell::Delay(d) => Input::DelayMax(d),
        Tell::Shutdown { start, kind } => Input::Shutdown { start, kind },
        Tell::Resume { kind, elapsed } => Input::Resume { kind, elapsed },
        Tell::Schedule(schedule) => Input::Schedule {
            due_in: schedule
                .as_ref()
                .and_then(|s| s.at.duration_since(SystemTime::now()).ok())
                .unwrap_or_default(),
            schedule,
        },
    }
}

/// A schedule the holder tells goes to the pending-reboot taint as well as to the drain.
fn share_schedule(to: &tokio::sync::watch::Sender<Option<Schedule>>, m: &Tell) {
    if let Tell::Schedule(s) = m {
        to.send_replace(s.clone());
    }
}

/// Runs the worker until the holder goes away or SIGTERM/SIGINT.
pub async fn run(settings: Settings, handover: Handover) -> Result<Exit, RunError> {
    let node = settings.node.clone();
    // When memory runs out where the holder lives too, the kernel should pick us: a worker is
    // restarted and resumes, the holder's lock is the node's last guard.
    let _ = std::fs::write("/proc/self/oom_score_adj", "500");
    let _ = nix::sys::prctl::set_no_new_privs();
    let (link, kubeconfig) = match handover {
        Handover::Fds {
            link_fd,
            kubeconfig_fd,
        } => (
            // SAFETY: the holder started us with `link_fd` open on our end of its socket pair,
            // and nothing else in this process owns that descriptor.
            StdStream::from(unsafe { OwnedFd::from_raw_fd(link_fd) }),
            kubeconfig_fd.and_then(|fd| std::fs::read(format!("/proc/self/fd/{fd}")).ok()),
        ),
        Handover::Socket(path) => (connect(&path).await?, None),
    };
    let boot_id = bootid::read_boot_id(&settings.boot_id_path)?;
    info!(node = %node, boot_id = %boot_id, scope = %settings.scope, uid = nix::unistd::getuid().as_raw(), "worker starting");

    let admin = AdminState::default();
    admin.update(|s| {
        s.node = node.clone();
        s.drain_budget_s = Some(settings.drain_budget.as_secs_f64());
    });
    admin
        .metrics
        .drain_budget
        .set(settings.drain_budget.as_secs_f64());
    admin
        .metrics
        .safety_margin
        .set(settings.safety_margin.as_secs_f64());
    // Metrics and probes are worth less than the drain: a port in use is logged, not fatal.
    match admin::bind(settings.listen_address).await {
        Ok(l) => admin::serve(l, admin.clone()),
        Err(e) => error!(
            node = %node,
            address = %settings.listen_address,
            error = %e,
            "admin server not started; running without /metrics, /healthz and /readyz"
        ),
    }

    let writer = Arc::new(Mutex::new(link.try_clone().map_err(RunError::Link)?));
    link.set_nonblocking(true).map_err(RunError::Link)?;
    let reader = tokio::net::UnixStream::from_std(link).map_err(RunError::Link)?;
    let mut lines = BufReader::new(reader).lines();
    spawn_heartbeat(writer.clone());

    // Nothing talks to the API server before the holder says where logind stands. A schedule
    // told meanwhile is kept for after.
    let mut schedule: Option<Tell> = None;
    let (schedules, schedule_rx) = tokio::sync::watch::channel(None);
    let first = loop {
        match lines.next_line().await.map_err(RunError::Link)? {
            None => return Ok(Exit::Terminated),
            Some(l) => match l.parse::<Tell>() {
                Ok(m @ (Tell::Lock { .. } | Tell::NoLock { .. })) => break m,
                Ok(m @ Tell::Schedule(_)) => {
                    share_schedule(&schedules, &m);
                    schedule = Some(m)
                }
                Ok(other) => warn!(node = %node, message = %other, "before the lock; ignored"),
                Err(e) => warn!(node = %node, error = %e, "ignoring the holder's line"),
            },
        }
    };
    let (delay_max, preparing) = match &first {
        Tell::Lock {
            delay_max,
            preparing,
        } => (*delay_max, *preparing),
        Tell::NoLock { delay_max } => (*delay_max, true),
        _ => unreachable!("only lock and nolock end the wait"),
    };

    let clients = crate::kube::clients_from(match &kubeconfig {
        Some(text) => crate::kube::Source::Text(text),
        None => crate::kube::Source::File(settings.kubeconfig.as_deref()),
    })
    .await?;
    let client = clients.calls;
    let _ = admin.client.set(client.clone());
    let events = NodeEvents::new(client.clone(), &node, None);
    let reports = Reports::spawn(client.clone(), &node, events.clone());
    let reporter = Faults::from_env(report::AgentReporter::new(&node, admin.clone(), reports));
    let mut driver = Driver::new(
        DriverConfig {
            machine: MachineConfig {
                node: node.clone(),
                scope: settings.scope,
                safety_margin: settings.safety_margin,
                deadline_override: settings.deadline,
                pre_drain_lead: settings.pre_drain_lead(),
                take_turns: settings.pre_drain_turns > 0,
                power_settle: settings.power_event_settle(),
            },
            mark: CordonMark::boot(&boot_id),
            once: false,
        },
        client.clone(),
        Arc::new(HolderGate {
            link: writer.clone(),
        }),
        reporter,
    )
    .with_idle_watches(clients.idle_watches);
    let leases = crate::kube::leases(&client, &settings.lease_namespace);
    if settings.pre_drain_turns > 0 {
        driver = driver.with_turns(Arc::new(turns::LeaseTurns::new(
            crate::kube::turns::Turns::new(leases.clone(), &node, settings.pre_drain_turns),
            &node,
        )));
    }
    if settings.power_event_min_targets > 0 {
        driver = driver.with_power(Arc::new(power::LeaseJudge::new(
            client.clone(),
            leases.clone(),
            &node,
            PowerRule {
                min_targets: settings.power_event_min_targets as usize,
            },
        )));
    }
    driver.feed(input_of(first));
    if let Some(m) = schedule {
        driver.feed(input_of(m));
    }
    if !(preparing || driver.draining()) {
        // Up again (or the agent restarted between shutdowns): this node no longer announces one.
        let (leases, node) = (leases.clone(), node.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::kube::power::withdraw(&leases, &node).await {
                warn!(node = %node, error = %e, "withdrawing an earlier shutdown announcement failed; it expires by itself");
            }
        });
    }
    if settings.power_event_restore {
        power::spawn_restorer(
            client.clone(),
            leases,
            node.clone(),
            RestoreRule {
                min_ready_nodes: settings.power_event_restore_min_ready_nodes as usize,
                parallel: settings.power_event_restore_parallel as usize,
            },
            events.clone(),
            admin.metrics.clone(),
        );
    }

    let tx = driver.sender();
    let metrics = admin.metrics.clone();
    startup::spawn_reconcile(
        Api::all(client.clone()),
        node.clone(),
        boot_id,
        // A pre-drain taken up again keeps our cordon from this boot, as a shutdown does.
        preparing || driver.draining(),
        tx.clone(),
        events.clone(),
        // The drain before this boot, for the alerts about it (its node may have gone down
        // before any scrape saw its end).
        move |last| {
            if let Some(last) = last {
                metrics.last_drain(&last);
            }
        },
    );
    if settings.reboot_pending_taint {
        pending::spawn(
            Api::all(client.clone()),
            node.clone(),
            settings.reboot_required_file.clone(),
            schedule_rx,
            events.clone(),
        );
    }
    startup::spawn_logind_config_check(&settings, delay_max, events);

    let n = node.clone();
    let triggers = futures::stream::unfold(lines, |mut lines| async move {
        match lines.next_line().await {
            Ok(Some(l)) => Some((Some(l), lines)),
            // The holder is gone: nothing guards this node any more.
            _ => Some((None, lines)),
        }
    })
    .filter_map(move |line| {
        let r = match line.map(|l| l.parse::<Tell>()) {
            None => Some(Input::Terminate),
            Some(Ok(m)) => {
                share_schedule(&schedules, &m);
                Some(input_of(m))
            }
            Some(Err(LinkError { line, .. })) => {
                warn!(node = %n, line = %line, "ignoring the holder's line");
                None
            }
        };
        async move { r }
    });
    let (outcome, _) = driver.run(Box::pin(triggers)).await?;
    Ok(match outcome {
        Outcome::Terminated {
            draining: true,
            remaining,
        } => Exit::TerminatedDuringDrain { remaining },
        _ => Exit::Terminated,
    })
}

fn spawn_heartbeat(link: Arc<Mutex<StdStream>>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(HEARTBEAT);
        loop {
            every.tick().await;
            if !send(&link, ToHolder::Alive) {
                return;
            }
        }
    });
}

/// Faults the reliability tests inject into a real worker (`SGTEST_FAULT=panic:N` or `oom:N`:
/// after the N-th eviction answer, panic, or allocate until the kernel kills it; with
/// `SGTEST_FAULT_ONCE=<file>` only while that file does not exist, so a restarted worker goes
/// on). Unset in production; the variables are outside the `SHUTDOWN_GUARD_*` settings on
/// purpose.
struct Faults<R> {
    inner: R,
    fault: Option<(String, usize)>,
    evictions: usize,
}

impl<R> Faults<R> {
    fn from_env(inner: R) -> Self {
        let once = std::env::var_os("SGTEST_FAULT_ONCE").map(std::path::PathBuf::from);
        let spent = once.as_ref().is_some_and(|f| f.exists());
        let fault = std::env::var("SGTEST_FAULT")
            .ok()
            .filter(|_| !spent)
            .and_then(|v| {
                let (kind, n) = v.split_once(':')?;
                Some((kind.to_string(), n.parse().ok()?))
            });
        if fault.is_some()
            && let Some(f) = &once
        {
            let _ = std::fs::write(f, b"");
        }
        Faults {
            inner,
            fault,
            evictions: 0,
        }
    }
}

impl<R: Reporter> Reporter for Faults<R> {
    fn report(&mut self, step: &Step<'_>) {
        self.inner.report(step);
        let Some((kind, after)) = &self.fault else {
            return;
        };
        self.evictions += step
            .notes
            .iter()
            .filter(|n| matches!(n, Note::Evicted { .. }))
            .count();
        if self.evictions < *after {
            return;
        }
        match kind.as_str() {
            "panic" => panic!("SGTEST_FAULT: panic after {after} eviction answers"),
            "oom" => {
                let mut hog: Vec<Vec<u8>> = Vec::new();
                // Up to 64 GiB, touched so the pages are really used; the kernel ends it long
                // before under any memory limit.
                for _ in 0..4096 {
                    hog.push(vec![1u8; 16 << 20]);
                    std::hint::black_box(&hog);
                }
                std::process::abort();
            }
            _ => {}
        }
    }
}
