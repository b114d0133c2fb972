//! Pods on a logind node: signals by host PID, and OOM kills with kubelet's group semantics
//! (`memory.oom.group=1`: every process of the container dies but those at oom_score_adj
//! −1000; the container's PID namespace ends with its entrypoint). No control plane needed.

use std::time::Duration;

use nix::sys::signal::Signal;
use testbed::logind::{Elogind, ElogindOptions, LogindNode};
use testbed::pod::{CgroupMode, Pod, PodRegistry, PodSpec};
use testbed::process::pid_exists;

async fn elogind() -> Elogind {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    Elogind::start(ElogindOptions::default())
        .await
        .expect("elogind starts")
}

fn spawn(node: &Elogind, spec: PodSpec, registry: &PodRegistry) -> Pod {
    let args: Vec<&str> = spec.args.iter().map(String::as_str).collect();
    let cmd = node.pod_command(&spec.program, &args);
    Pod::spawn(cmd, &spec, "node-1", registry).expect("the pod starts")
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The pod's process whose command line starts with `prefix`, waiting for it to show up.
async fn find(pod: &Pod, prefix: &str) -> u32 {
    testbed::wait::until(
        Duration::from_secs(10),
        Duration::from_millis(10),
        || async {
            pod.processes()
                .into_iter()
                .find(|p| cmdline(*p).starts_with(prefix))
        },
    )
    .await
    .unwrap_or_else(|| panic!("no process {prefix:?} in the pod: {:?}", pod.processes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_program_is_signalled_by_its_host_pid() {
    let node = elogind().await;
    let registry = PodRegistry::default();
    // The entrypoint answers SIGTERM with exit 3, as a program with a handler would.
    let mut graceful = spawn(
        &node,
        PodSpec::new(
            "bash",
            &["-c", "trap 'exit 3' TERM; sleep 300 & wait; exit 9"],
        ),
        &registry,
    );
    let pid = graceful
        .pid(Duration::from_secs(10))
        .await
        .expect("entrypoint");
    // Its child runs once the trap is set.
    find(&graceful, "sleep 300").await;
    assert_ne!(
        pid,
        graceful.parent_pid(),
        "the entrypoint is not the pod's parent"
    );
    assert!(
        cmdline(pid).contains("trap"),
        "host PID {pid} is not the entrypoint: {}",
        cmdline(pid)
    );
    // A PID of another process is refused.
    assert!(
        graceful
            .signal_process(std::process::id(), Signal::SIGTERM)
            .is_err()
    );
    graceful
        .signal(Signal::SIGTERM)
        .await
        .expect("SIGTERM sent");
    let status = graceful
        .wait_timeout(Duration::from_secs(10))
        .await
        .expect("the pod ends on SIGTERM");
    assert_eq!(status.code(), Some(3), "the program's own exit status");

    let mut killed = spawn(&node, PodSpec::new("sleep", &["300"]), &registry);
    let pid = killed
        .pid(Duration::from_secs(10))
        .await
        .expect("entrypoint");
    let child = find(&killed, "sleep 300").await;
    assert_eq!(pid, child);
    killed.signal(Signal::SIGKILL).await.expect("SIGKILL sent");
    let status = killed
        .wait_timeout(Duration::from_secs(10))
        .await
        .expect("the pod ends on SIGKILL");
    assert_eq!(
        status.code(),
        Some(137),
        "128 + SIGKILL, as a container reports"
    );
    assert!(!pid_exists(pid));
}

/// Whether this machine lets a process set `oom_score_adj` to −1000: that takes
/// CAP_SYS_RESOURCE, which some sandboxes leave out of every process's bounding set.
fn can_exempt_from_oom() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_SYS_RESOURCE: u32 = 24;
    bounding & (1 << CAP_SYS_RESOURCE) != 0
}

/// kubelet's container OOM semantics: the OOM killer fires in the pod's cgroup and every
/// process of the group dies (the kernel alone would kill only the biggest, the memory hog);
/// the pod ends with its entrypoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_takes_every_process_of_the_pod() {
    let node = elogind().await;
    let registry = PodRegistry::default();
    let limit = 64 << 20;
    let script = "sleep 301 & sleep 302 & wait";
    let mut pod = spawn(
        &node,
        PodSpec::new("sh", &["-c", script]).memory_max(limit),
        &registry,
    );
    let cg = pod.cgroup().expect("a memory cgroup");
    assert_eq!(cg.limit(), limit);
    eprintln!("pod cgroup {} ({:?})", cg.path().display(), cg.mode());
    let workers = [find(&pod, "sleep 301").await, find(&pod, "sleep 302").await];
    let entry = pod.pid(Duration::from_secs(10)).await.expect("entrypoint");
    for pid in workers.iter().chain([&entry]) {
        assert!(
            cg.pids().contains(pid),
            "pid {pid} ({}) is not in the pod's cgroup",
            cmdline(*pid)
        );
    }
    pod.exceed_memory_limit(Duration::from_secs(10))
        .await
        .expect("the OOM killer fires");
    let status = pod
        .wait_timeout(Duration::from_secs(10))
        .await
        .expect("the pod ends with its entrypoint");
    assert_eq!(
        status.code(),
        Some(137),
        "SIGKILLed, as kubelet reports OOMKilled"
    );
    let all_gone =
        testbed::wait::until(Duration::from_secs(5), Duration::from_millis(5), || async {
            workers.iter().all(|p| !pid_exists(*p)).then_some(())
        })
        .await;
    assert!(all_gone.is_some(), "a worker outlived the group kill");
    let cg = pod.cgroup().expect("a memory cgroup");
    assert!(cg.oom_kills() >= 1, "no OOM kill counted");
    assert!(cg.group_kills() >= 1, "no group kill counted");
    if cg.mode() == CgroupMode::V1Emulated {
        eprintln!("cgroup v1 host: the group kill was the bed's stand-in for memory.oom.group");
    }
}

/// The kernel's group kill spares processes at oom_score_adj −1000, but a container whose
/// entrypoint dies ends, taking them along: only an exempt PID 1 keeps its container alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_exempt_entrypoint_keeps_its_pod_through_an_oom_kill() {
    if !can_exempt_from_oom() {
        // Nothing can set −1000 here, so there is no exempt process to watch.
        eprintln!(
            "this machine's bounding set lacks CAP_SYS_RESOURCE: no process can set \
             oom_score_adj -1000, so the exemption cannot be shown here (the rule itself is \
             unit-tested in testbed::pod)"
        );
        return;
    }
    let node = elogind().await;
    let registry = PodRegistry::default();
    let limit = 64 << 20;
    let script = r#"
        echo -1000 > /proc/self/oom_score_adj
        sh -c 'exec sleep 301' &
        sh -c 'echo 0 > /proc/self/oom_score_adj; exec sleep 302' &
        wait
    "#;
    let mut holder = spawn(
        &node,
        PodSpec::new("sh", &["-c", script]).memory_max(limit),
        &registry,
    );
    let exempt = find(&holder, "sleep 301").await;
    let ordinary = find(&holder, "sleep 302").await;
    let entry = holder
        .pid(Duration::from_secs(10))
        .await
        .expect("entrypoint");
    holder
        .exceed_memory_limit(Duration::from_secs(10))
        .await
        .expect("the OOM killer fires");
    let gone = testbed::wait::until(Duration::from_secs(5), Duration::from_millis(5), || async {
        (!pid_exists(ordinary)).then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "the oom_score_adj 0 worker survived the group kill"
    );
    assert!(pid_exists(exempt), "the -1000 worker was killed");
    assert!(pid_exists(entry), "the -1000 entrypoint was killed");
    assert!(holder.try_wait().expect("try_wait").is_none());

    let script = "sh -c 'echo -1000 > /proc/self/oom_score_adj; exec sleep 303' & wait";
    let mut plain = spawn(
        &node,
        PodSpec::new("sh", &["-c", script]).memory_max(limit),
        &registry,
    );
    let survivor = find(&plain, "sleep 303").await;
    plain
        .exceed_memory_limit(Duration::from_secs(10))
        .await
        .expect("the OOM killer fires");
    plain
        .wait_timeout(Duration::from_secs(10))
        .await
        .expect("the pod ends with its entrypoint");
    let gone = testbed::wait::until(Duration::from_secs(5), Duration::from_millis(5), || async {
        (!pid_exists(survivor)).then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "the exempt worker outlived its container's PID 1"
    );
}
