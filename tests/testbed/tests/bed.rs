//! The whole bed: `testbed run` gives a command what a pod on node-1 has, and tearing the bed
//! down leaves no process, mount, cgroup or folder behind.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use testbed::bed::{Bed, BedOptions, LogindKind};
use testbed::logind::mounts_under;
use testbed::process::pid_exists;

#[test]
fn testbed_run_gives_the_command_a_pod_on_node1_and_its_exit_status() {
    let script = r#"
        set -eu
        test "$TESTBED_NODE" = node-1
        kubectl get node node-1 -o name
        kubectl get vmi live-1 -o jsonpath='vmi={.status.nodeName}{"\n"}'
        echo "pid=$$"
        case "$DBUS_SYSTEM_BUS_ADDRESS" in unix:path=*) echo bus=ok ;; esac
        test -x "$TESTBED_POWEROFF" && test -x "$TESTBED_WAIT_POWEROFF" && test -x "$TESTBED_REBOOT"
        "$TESTBED_POWEROFF"
        at=$("$TESTBED_WAIT_POWEROFF")
        echo "powered_off=$at"
        exit 7
    "#;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_testbed"))
        .args([
            "run", "--logind", "elogind", "--vms", "live=1", "--", "bash", "-c", script,
        ])
        .output()
        .expect("testbed runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(7),
        "exit status passes through\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("node/node-1"),
        "kubectl reaches the API server:\n{stdout}"
    );
    assert!(
        stdout.contains("vmi=node-1"),
        "the VMI runs on node-1:\n{stdout}"
    );
    assert!(stdout.contains("bus=ok"), "{stdout}");
    // A pod has a PID namespace of its own: its shell is not a machine PID.
    let pid: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .expect("pid line");
    assert!(
        pid < 100,
        "the command does not run in a PID namespace of its own (pid {pid})"
    );
    let at: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("powered_off="))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no power-off time:\n{stdout}\n{stderr}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        now - at < 120.0 && at <= now,
        "power-off time {at} is not recent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bed_teardown_leaves_nothing_behind() {
    let bed = Bed::start(BedOptions {
        vms: "live=1,none=1".parse().unwrap(),
        logind: LogindKind::Systemd,
        ..BedOptions::default()
    })
    .await
    .expect("bed starts");
    let mut pids: Vec<u32> = bed
        .control_plane
        .pids()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let (node_dir, cgroup) = {
        let mut logind = bed.logind.write().await;
        let node = logind.systemd().expect("systemd node");
        pids.push(node.pid());
        (node.state_dir().to_path_buf(), node.cgroup_path())
    };
    // A pod still running at teardown.
    let mut pod = bed.pod_command("sleep", &["300"]).await;
    pod.kill_on_drop(false);
    let mut pod = pod.spawn().expect("pod starts");
    pids.push(pod.id().expect("pod pid"));
    let dirs: Vec<PathBuf> = vec![bed.control_plane.dir().to_path_buf(), node_dir];
    assert!(bed.started_in() < Duration::from_secs(60));
    eprintln!("bed up in {:.1} s", bed.started_in().as_secs_f64());

    bed.shutdown().await.expect("teardown");
    let _ = tokio::time::timeout(Duration::from_secs(10), pod.wait()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|p| pid_exists(*p)).collect();
        if alive.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left: {alive:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for dir in &dirs {
        assert!(mounts_under(dir).is_empty(), "mounts left under {dir:?}");
        assert!(!dir.exists(), "folder left: {dir:?}");
    }
    if let Some(cg) = cgroup {
        assert!(!cg.exists(), "cgroup left: {cg:?}");
    }
}
