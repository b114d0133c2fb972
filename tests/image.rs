//! The image: `scripts/image.sh` builds it with Debian's buildah from a static binary built here
//! (the Dockerfile's `prebuilt` target), runs it, and checks `--version`, a bad setting's exit 2,
//! that it starts, and that, given the bus of one of the bed's loginds (elogind on its private
//! bus), it holds a delay lock there.
//!
//! Runs where buildah is installed (`apt-get install --no-install-recommends buildah`); setup.sh
//! does not install it, because the static release build the image needs costs CI more time
//! than it has to spare (docs/operator-guide.md, "The image"). Elsewhere the
//! test says so and checks only that the script refuses to run without buildah.

mod common;

use std::process::Command;
use std::time::Duration;

use common::init_tracing;
use common::tools::{repo, run};
use testbed::logind::{Elogind, ElogindOptions, LogindNode};

fn buildah_installed() -> bool {
    Command::new("buildah")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_answers_refuses_bad_settings_starts_and_holds_a_lock_on_a_nodes_logind() {
    init_tracing();
    let script = repo().join("scripts/image.sh");
    if !buildah_installed() {
        let r = run(Command::new(&script).env("PATH", "/nonexistent"));
        assert!(!r.ok);
        eprintln!(
            "buildah is not installed: the image is not built here ({})",
            r.stderr.trim()
        );
        return;
    }
    let logind = Elogind::start(ElogindOptions::default())
        .await
        .expect("a logind for the image's agent");
    let bus_dir = logind.dir().to_path_buf();
    let mut cmd = tokio::process::Command::new(&script);
    // logind must see the agent's process: the run enters the elogind's PID namespace, as a
    // pod's is a child of the host's where a node's logind runs.
    cmd.arg("--bus-dir")
        .arg(&bus_dir)
        .arg("--pid-ns-of")
        .arg(logind.pid().to_string())
        .kill_on_drop(true);
    // The release build of a cold target takes minutes; bounded all the same.
    let out = tokio::time::timeout(Duration::from_secs(20 * 60), cmd.output())
        .await
        .expect("scripts/image.sh finished within 20 minutes")
        .expect("scripts/image.sh runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "scripts/image.sh failed:\n{stdout}\n{stderr}"
    );
    for check in [
        "image: check --version: shutdown-guard ",
        "image: check bad setting: exit 2",
        "image: check start: /healthz answers",
        "image: check lock: logind lists shutdown-guard's delay lock",
        "image: size ",
    ] {
        assert!(stdout.contains(check), "no {check:?} in:\n{stdout}");
    }
    // The agent in the image is gone with its container: its lock with it.
    let gone = testbed::wait::until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let l = logind.list_inhibitors().await.ok()?;
            (!l.iter().any(|i| i.who == "shutdown-guard")).then_some(())
        },
    )
    .await;
    assert!(gone.is_some(), "the image's agent left its lock behind");
    drop(logind);
}
