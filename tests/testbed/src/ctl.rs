//! The bed's control channel for pods: power commands a process inside node-1's PID namespace
//! cannot perform itself (it cannot see the machine's PIDs to `nsenter` the node).
//!
//! The bed listens on a loopback TCP port and writes small bash scripts that speak to it
//! (`bash`'s `/dev/tcp`), so a pod needs nothing but bash: `TESTBED_POWEROFF`,
//! `TESTBED_REBOOT` and `TESTBED_WAIT_POWEROFF` name those scripts. One request a connection:
//! a verb on one line, answered by `ok [detail]` or `error: …`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::RwLock;
use tokio::task::JoinHandle;

use crate::bed::{BedError, NodeLogind};

/// How long `wait-poweroff` waits for the node.
const WAIT_POWEROFF: Duration = Duration::from_secs(300);

pub struct CtlServer {
    port: u16,
    scripts: PathBuf,
    task: JoinHandle<()>,
}

impl Drop for CtlServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CtlServer {
    /// Serves `logind` without owning it: the bed tears the node down whatever the server does.
    pub fn start(dir: &Path, logind: &Arc<RwLock<NodeLogind>>) -> Result<Self, BedError> {
        let logind: Weak<RwLock<NodeLogind>> = Arc::downgrade(logind);
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| BedError::Io { what, source }
        };
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(io("binding the ctl port"))?;
        std_listener
            .set_nonblocking(true)
            .map_err(io("ctl port non-blocking"))?;
        let port = std_listener.local_addr().map_err(io("ctl port"))?.port();
        let listener = TcpListener::from_std(std_listener).map_err(io("ctl listener"))?;

        let scripts = dir.join("ctl");
        std::fs::create_dir_all(&scripts).map_err(io("creating the ctl folder"))?;
        for verb in ["poweroff", "reboot", "wait-poweroff"] {
            let path = scripts.join(format!("testbed-{verb}"));
            std::fs::write(&path, client_script(port, verb)).map_err(io("writing a ctl script"))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .map_err(io("chmod a ctl script"))?;
        }

        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let logind = logind.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut line = String::new();
                    if BufReader::new(read).read_line(&mut line).await.is_err() {
                        return;
                    }
                    let answer = match logind.upgrade() {
                        Some(logind) => serve(line.trim(), &logind).await,
                        None => "error: the bed is shutting down".to_owned(),
                    };
                    let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
                });
            }
        });
        Ok(Self {
            port,
            scripts,
            task,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The script that performs `verb` (`poweroff`, `reboot`, `wait-poweroff`).
    pub fn script(&self, verb: &str) -> PathBuf {
        self.scripts.join(format!("testbed-{verb}"))
    }
}

async fn serve(verb: &str, logind: &RwLock<NodeLogind>) -> String {
    let result = match verb {
        "poweroff" => logind.read().await.poweroff().await.map(|()| String::new()),
        "reboot" => match logind.read().await.systemd_ref() {
            Some(node) => node.reboot().await.map(|()| String::new()),
            None => return "error: reboot needs --logind systemd".into(),
        },
        "wait-poweroff" => logind
            .read()
            .await
            .wait_poweroff(WAIT_POWEROFF)
            .await
            .map(|at| {
                let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
                format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
            }),
        other => return format!("error: unknown verb {other:?} (poweroff, reboot, wait-poweroff)"),
    };
    match result {
        Ok(detail) if detail.is_empty() => "ok".into(),
        Ok(detail) => format!("ok {detail}"),
        Err(e) => format!("error: {e}"),
    }
}

/// A bash client: sends the verb, prints the detail, fails on an error answer.
fn client_script(port: u16, verb: &str) -> String {
    format!(
        r#"#!/bin/bash
# Written by the test bed: asks the bed to {verb} node-1 (see tests/testbed/src/ctl.rs).
set -eu
exec 3<>/dev/tcp/127.0.0.1/{port}
printf '%s\n' {verb} >&3
IFS= read -r answer <&3
case "$answer" in
  ok) exit 0 ;;
  "ok "*) printf '%s\n' "${{answer#ok }}"; exit 0 ;;
  *) printf 'testbed-{verb}: %s\n' "$answer" >&2; exit 1 ;;
esac
"#
    )
}
