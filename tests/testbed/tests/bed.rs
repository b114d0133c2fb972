//! The whole bed: `testbed run` gives a command what a pod on a node has, on one node or on
//! every node at once, a pod turns the bed's faults (KubeVirt's included) through
//! `$TESTBED_CTL`, `testbed fault` reaches a bed kept up, and tearing the bed down leaves no
//! process, mount, cgroup or folder behind.

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
            "run",
            "--logind",
            "elogind",
            "--loginds",
            "1",
            "--vms",
            "live=1",
            "--",
            "bash",
            "-c",
            script,
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

/// `--on all`: one pod per node at once, each with its own node's variables and bus; a pod
/// can ask the bed for faults (`$TESTBED_CTL`): kube-apiserver stopped, then started again
/// (its kubectl, through the API proxy, works again), another node's pod sent SIGTERM, a
/// memory limit exceeded (the OOM group kill takes the asking pod itself); the run ends with
/// the VM ledger and the first failing pod's status.
#[test]
fn testbed_run_on_every_node_at_once_with_faults_from_a_pod() {
    let script = r#"
        set -eu
        echo "node=$TESTBED_NODE"
        busctl --system call org.freedesktop.login1 /org/freedesktop/login1 \
          org.freedesktop.login1.Manager ListInhibitors >/dev/null
        echo "bus=ok"
        case "$TESTBED_NODE" in
          node-1)
            "$TESTBED_CTL" status
            "$TESTBED_CTL" api stop
            if kubectl get ns --request-timeout=3s >/dev/null 2>&1; then echo api-still-up; exit 3; fi
            "$TESTBED_CTL" api start
            kubectl get node node-1 -o name
            if "$TESTBED_CTL" mask node-1 poweroff.target 2>/dev/null; then exit 4; fi
            "$TESTBED_CTL" kill node-2 TERM ;;
          node-2) exec sleep 300 ;;
          node-3) "$TESTBED_CTL" oom node-3; echo survived ;;
        esac
    "#;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_testbed"))
        .args([
            "run",
            "--logind",
            "elogind",
            "--nodes",
            "3",
            "--vms",
            "live=1",
            "--on",
            "all",
            "--memory-max",
            "256Mi",
            "--",
            "bash",
            "-c",
            script,
        ])
        .output()
        .expect("testbed runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown = format!(
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for node in ["node-1", "node-2", "node-3"] {
        assert!(
            stdout.contains(&format!("[{node}] node={node}")),
            "no pod on {node} with its own TESTBED_NODE: {shown}"
        );
        assert!(stdout.contains(&format!("[{node}] bus=ok")), "{shown}");
    }
    assert!(
        stdout.contains("[node-1] kube-apiserver running"),
        "no status from the ctl: {shown}"
    );
    assert!(
        stdout.contains("[node-1] node/node-1"),
        "kubectl did not reach the restarted API server: {shown}"
    );
    assert!(
        stdout.contains("[node-1] SIGTERM sent to bash"),
        "node-2's pod was not signalled: {shown}"
    );
    assert!(
        stderr.contains("the pod on node-2 exited with exit status: 143"),
        "{shown}"
    );
    assert!(
        !stdout.contains("[node-3] survived"),
        "the OOM group kill spared the asking shell: {shown}"
    );
    assert!(
        stderr.contains("the pod on node-3 exited with exit status: 137"),
        "{shown}"
    );
    assert_eq!(
        out.status.code(),
        Some(143),
        "the first failing pod's status: {shown}"
    );
    assert!(
        stderr.contains("VM ledger: 1 VMIs: 0 migrated, 0 stopped gracefully, 0 lost, 1 other"),
        "no ledger at the end: {shown}"
    );
}

/// The KubeVirt knobs, turned from a pod through `$TESTBED_CTL` and seen at the API server by
/// the pod's kubectl: an eviction of a launcher pod fails (500, connection refused) while the
/// eviction webhook is down, comes late while it is slow, is refused by KubeVirt (429) once it
/// is up; a migration fails as asked, once, and the next one goes through; a stalled one is
/// aborted after the CR's `progressTimeout`; a failure probability of 1 fails every migration
/// and 0 none; a VMI the bed does not know is refused with the ones it does.
#[test]
fn testbed_run_turns_kubevirt_faults_from_a_pod() {
    let script = r#"
        set -eu
        launcher() {
          uid=$(kubectl get vmi "$1" -o jsonpath='{.metadata.uid}')
          kubectl get pod -l "kubevirt.io/created-by=$uid" -o jsonpath='{.items[0].metadata.name}'
        }
        # The HTTP status of an eviction and kubectl's error line.
        evict() {
          out=$(printf '{"apiVersion":"policy/v1","kind":"Eviction","metadata":{"name":"%s","namespace":"default"}}' "$1" \
            | kubectl create --raw "/api/v1/namespaces/default/pods/$1/eviction" -f - -v=6 2>&1) || true
          code=$(printf '%s\n' "$out" | sed -n 's/.*"Response" verb="POST".* status="\([0-9]*\).*/\1/p')
          echo "$code $(printf '%s\n' "$out" | grep '^Error from server')"
        }
        migrate() {
          printf '{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstanceMigration","metadata":{"generateName":"ctl-","namespace":"default"},"spec":{"vmiName":"%s"}}' "$1" \
            | kubectl create -o jsonpath='{.metadata.name}' -f -
        }
        # The migration's final phase and its VMI's node and failure reason after it.
        outcome() {
          m=$(migrate "$1")
          for _ in $(seq 1 300); do
            phase=$(kubectl get vmim "$m" -o jsonpath='{.status.phase}')
            case "$phase" in
              Succeeded|Failed)
                kubectl get vmi "$1" -o jsonpath="$phase {.status.nodeName} {.status.migrationState.failureReason}"
                return ;;
            esac
            sleep 0.2
          done
          echo "migration $m of $1 never ended"
        }

        pod=$(launcher stuck-1)
        "$TESTBED_CTL" kubevirt webhook down
        echo "down: $(evict "$pod")"
        "$TESTBED_CTL" kubevirt webhook up
        echo "up: $(evict "$pod")"
        "$TESTBED_CTL" kubevirt webhook slow 2
        echo "status: $("$TESTBED_CTL" status)"
        start=$(date +%s%N)
        answer=$(evict "$pod")
        echo "slow: $(( ($(date +%s%N) - start) / 1000000 )) ms: $answer"
        "$TESTBED_CTL" kubevirt webhook up

        "$TESTBED_CTL" kubevirt fail live-1
        echo "fail: $(outcome live-1)"
        echo "after fail: $(outcome live-1)"
        kubectl -n kubevirt patch kubevirt kubevirt --type merge \
          -p '{"spec":{"configuration":{"migrations":{"progressTimeout":2}}}}' >/dev/null
        "$TESTBED_CTL" kubevirt stall default/live-2 1
        echo "stall: $(outcome live-2)"
        "$TESTBED_CTL" kubevirt failure-probability 1
        echo "probability 1: $(outcome live-2)"
        "$TESTBED_CTL" kubevirt failure-probability 0
        echo "probability 0: $(outcome live-2)"
        refused=$("$TESTBED_CTL" kubevirt fail nope-1 2>&1) && exit 5
        echo "refused: $refused"
    "#;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_testbed"))
        .args([
            "run",
            "--logind",
            "elogind",
            "--loginds",
            "1",
            "--nodes",
            "3",
            "--vms",
            "live=2,stuck=1",
            "--migration-seconds",
            "1",
            "--",
            "bash",
            "-c",
            script,
        ])
        .output()
        .expect("testbed runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown = format!(
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert_eq!(out.status.code(), Some(0), "{shown}");
    let line = |prefix: &str| -> String {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line: {shown}"))
            .to_owned()
    };
    let not_migratable = "denied the request: VMI stuck-1 is configured with an eviction \
                          strategy but is not live-migratable";

    let down = line("down: ");
    assert!(
        down.starts_with("500 Error from server (InternalError)")
            && down.contains("failed calling webhook")
            && down.contains("connection refused"),
        "eviction with the webhook down: {shown}"
    );
    let up = line("up: ");
    assert!(
        up.starts_with("429 ") && up.contains(not_migratable),
        "eviction with the webhook up: {shown}"
    );
    assert!(
        line("status: ").contains("KubeVirt eviction webhook slow (2 s)"),
        "{shown}"
    );
    let slow = line("slow: ");
    let (ms, answer) = slow.split_once(" ms: ").expect("slow line");
    let ms: u64 = ms.parse().expect("milliseconds");
    assert!(
        ms >= 2000 && answer.starts_with("429 ") && answer.contains(not_migratable),
        "eviction with the webhook 2 s slow: {shown}"
    );

    assert_eq!(
        line("fail: "),
        "Failed node-1 Live migration failed: injected by the test bed",
        "{shown}"
    );
    let after = line("after fail: ");
    assert!(
        after.starts_with("Succeeded node-") && !after.starts_with("Succeeded node-1"),
        "the failure was not used up by one migration: {shown}"
    );
    let stall = line("stall: ");
    assert!(
        stall.starts_with("Failed node-1 Live migration stuck for ")
            && stall.ends_with(" seconds and has been aborted"),
        "{shown}"
    );
    assert_eq!(
        line("probability 1: "),
        "Failed node-1 Live migration failed: injected by the test bed",
        "{shown}"
    );
    assert!(
        line("probability 0: ").starts_with("Succeeded node-")
            && !line("probability 0: ").starts_with("Succeeded node-1"),
        "{shown}"
    );
    assert_eq!(
        line("refused: "),
        "testbed-ctl: error: no VMI default/nope-1 (VMIs: default/live-1, default/live-2, \
         default/stuck-1); name one as NAMESPACE/NAME, or NAME in default",
        "{shown}"
    );
}

/// `testbed fault` against a bed that `testbed up` keeps: status, a freeze of established
/// connections and the thaw, and clear refusals for what the bed cannot do.
#[test]
fn testbed_fault_reaches_a_bed_kept_up() {
    use std::io::BufRead;
    let mut up = std::process::Command::new(env!("CARGO_BIN_EXE_testbed"))
        .args([
            "up",
            "--logind",
            "elogind",
            "--nodes",
            "2",
            "--loginds",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("testbed up starts");
    let mut port = None;
    let mut lines = std::io::BufReader::new(up.stdout.take().expect("stdout")).lines();
    // `up` prints its exports once the bed is up, then waits for a signal.
    for line in lines.by_ref() {
        let line = line.expect("stdout line");
        if let Some(p) = line.strip_prefix("export TESTBED_CTL_PORT='") {
            port = p.trim_end_matches('\'').parse::<u16>().ok();
        }
        if line.starts_with("# nodes with a logind") {
            break;
        }
    }
    let fault = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_testbed"))
            .arg("fault")
            .args(args)
            .env("TESTBED_CTL_PORT", port.expect("ctl port").to_string())
            .output()
            .expect("testbed fault runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, status, _) = fault(&["status"]);
    assert_eq!(code, Some(0), "{status}");
    assert!(status.contains("kube-apiserver running"), "{status}");
    assert!(status.contains("node-1: elogind 246"), "{status}");
    let (code, frozen, err) = fault(&["api", "freeze", "--established"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(frozen.contains("frozen"), "{frozen}");
    let (_, status, _) = fault(&["status"]);
    assert!(status.contains("frozen (established)"), "{status}");
    let (code, _, err) = fault(&["api", "thaw"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = fault(&["kubevirt", "webhook", "slow", "1.5"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "eviction webhook answers after 1.5 s");
    let (_, status, _) = fault(&["status"]);
    assert!(
        status.contains("KubeVirt eviction webhook slow (1.5 s); migration faults: none"),
        "{status}"
    );
    let (code, _, err) = fault(&["kubevirt", "webhook", "up"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = fault(&["kubevirt", "failure-probability", "0.5"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, status, _) = fault(&["status"]);
    assert!(
        status.contains("KubeVirt eviction webhook up; migration faults: failure probability 0.5"),
        "{status}"
    );
    let (code, _, err) = fault(&["kubevirt", "stall", "live-1", "--count", "2"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no VMI default/live-1 (VMIs: none)"), "{err}");
    let (code, _, err) = fault(&["mask", "poweroff.target"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("elogind, which has no units"), "{err}");
    let (code, _, err) = fault(&["kill", "--node", "node-2"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no pod the bed started runs on node-2"),
        "{err}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM to testbed up");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = up.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "testbed up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "testbed up exited {status}");
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
