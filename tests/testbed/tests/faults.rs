//! Each fault knob of the bed, on the smallest piece that has it: kube-apiserver stopped and
//! started, client connections frozen and reset through the API proxy, logind and the bus
//! restarted (systemd and elogind), a unit masked so the power-off fails.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube::{Client, Config};
use testbed::apiproxy::Freeze;
use testbed::controlplane::{ControlPlane, ControlPlaneOptions, config_from_kubeconfig};
use testbed::logind::{Elogind, ElogindOptions, LogindNode, Suite, SystemdNode, SystemdOptions};
use testbed::pod::{Pod, PodRegistry, PodSpec};

fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,kube_client=off")
        .with_test_writer()
        .try_init();
}

async fn plane() -> Result<ControlPlane> {
    init();
    Ok(ControlPlane::start(ControlPlaneOptions {
        controller_manager: false,
        scheduler: false,
        wait_for_controllers: false,
        ..ControlPlaneOptions::default()
    })
    .await?)
}

/// A client through the proxy, as a pod has, without kube's own retries.
async fn proxied_client(cp: &ControlPlane) -> Result<Client> {
    let mut config: Config = config_from_kubeconfig(cp.client_kubeconfig_path()).await?;
    config.default_retry = false;
    Ok(Client::try_from(config)?)
}

fn config_map(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "data": {"v": value}
    }))
    .expect("literal")
}

async fn put(api: &Api<ConfigMap>, name: &str, value: &str) -> Result<()> {
    match api.get_opt(name).await? {
        Some(mut cm) => {
            cm.data = config_map(name, value).data;
            api.replace(name, &PostParams::default(), &cm).await?;
        }
        None => {
            api.create(&PostParams::default(), &config_map(name, value))
                .await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_stops_and_starts_on_the_same_port_and_etcd() -> Result<()> {
    let cp = plane().await?;
    assert!(
        cp.client_url() != cp.server_url(),
        "pods must reach the API server through the proxy"
    );
    let api = cp.api_control();
    let direct: Api<ConfigMap> = Api::default_namespaced(cp.client().await?);
    let proxied: Api<ConfigMap> = Api::default_namespaced(proxied_client(&cp).await?);
    put(&direct, "kept", "before").await?;
    let first_pid = api.pid().context("kube-apiserver runs")?;

    api.stop().await?;
    ensure!(!api.is_running(), "still running after stop");
    let refused = tokio::time::timeout(Duration::from_secs(10), proxied.get("kept")).await;
    ensure!(
        matches!(refused, Ok(Err(_))),
        "a request while kube-apiserver is stopped must fail at once: {refused:?}"
    );
    ensure!(
        api.stop().await.is_err(),
        "a second stop must say it is not running"
    );

    let began = Instant::now();
    api.start().await?;
    eprintln!(
        "kube-apiserver ready again in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    ensure!(api.pid() != Some(first_pid), "the same process?");
    // The same client reconnects, and etcd kept the data.
    let kept = proxied.get("kept").await?;
    ensure!(kept.data.unwrap_or_default()["v"] == "before");
    ensure!(
        api.start().await.is_err(),
        "a second start must say it runs"
    );
    cp.shutdown().await?;
    Ok(())
}

/// Next event of a raw watch, within `within`; `None` when none came.
async fn next_event(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin),
    within: Duration,
) -> Option<kube::Result<WatchEvent<ConfigMap>>> {
    tokio::time::timeout(within, stream.next())
        .await
        .ok()
        .flatten()
}

fn value_of(ev: &WatchEvent<ConfigMap>) -> Option<String> {
    match ev {
        WatchEvent::Added(cm) | WatchEvent::Modified(cm) => cm.data.as_ref()?.get("v").cloned(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_connections_stall_and_reset_ones_break() -> Result<()> {
    let cp = plane().await?;
    let api = cp.api_control();
    let direct: Api<ConfigMap> = Api::default_namespaced(cp.client().await?);
    put(&direct, "w", "0").await?;
    let rv = direct
        .get("w")
        .await?
        .metadata
        .resource_version
        .context("resource version")?;
    let watcher: Api<ConfigMap> = Api::default_namespaced(proxied_client(&cp).await?);
    let params = WatchParams::default()
        .fields("metadata.name=w")
        .timeout(290);
    let mut stream = watcher.watch(&params, &rv).await?.boxed();
    put(&direct, "w", "1").await?;
    let ev = next_event(&mut stream, Duration::from_secs(10))
        .await
        .context("the watch delivers")??;
    ensure!(value_of(&ev).as_deref() == Some("1"), "{ev:?}");

    // Freeze everything: the established watch stalls, and so does a new request.
    api.freeze(Freeze::All);
    put(&direct, "w", "2").await?;
    ensure!(
        next_event(&mut stream, Duration::from_secs(2))
            .await
            .is_none(),
        "a frozen watch delivered"
    );
    let fresh: Api<ConfigMap> = Api::default_namespaced(proxied_client(&cp).await?);
    ensure!(
        tokio::time::timeout(Duration::from_secs(2), fresh.get("w"))
            .await
            .is_err(),
        "a new request went through a full freeze"
    );
    // Thaw: the change held back arrives on the same connection.
    api.thaw();
    let ev = next_event(&mut stream, Duration::from_secs(10))
        .await
        .context("the held event arrives after the thaw")??;
    ensure!(value_of(&ev).as_deref() == Some("2"), "{ev:?}");

    // Freeze only what is open, as after a VIP failover: new connections work.
    api.freeze(Freeze::Established);
    put(&direct, "w", "3").await?;
    let another: Api<ConfigMap> = Api::default_namespaced(proxied_client(&cp).await?);
    let got = tokio::time::timeout(Duration::from_secs(10), another.get("w"))
        .await
        .context("a new connection must work after an Established freeze")??;
    ensure!(got.data.unwrap_or_default()["v"] == "3");
    ensure!(
        next_event(&mut stream, Duration::from_secs(2))
            .await
            .is_none(),
        "the established watch delivered while frozen"
    );
    // Reset: the stalled watch breaks at once.
    let open = api.proxy().open_connections();
    ensure!(open >= 1, "no open connection to reset");
    let began = Instant::now();
    api.reset();
    match next_event(&mut stream, Duration::from_secs(5)).await {
        None => eprintln!("watch stream ended after the reset"),
        Some(Err(e)) => eprintln!("watch broke: {e}"),
        Some(Ok(ev)) => bail!("a reset watch delivered {ev:?}"),
    }
    ensure!(
        began.elapsed() < Duration::from_secs(5),
        "the reset did not end the watch"
    );
    api.thaw();
    let after = proxied_client(&cp).await?;
    let list = Api::<ConfigMap>::default_namespaced(after)
        .list(&Default::default())
        .await?;
    ensure!(
        list.items
            .iter()
            .any(|c| c.metadata.name.as_deref() == Some("w"))
    );
    drop(stream);
    cp.shutdown().await?;
    Ok(())
}

/// The PID of the bus name's owner and the bus's own ID, as the bus reports them.
async fn owner_and_bus_id(address: &str) -> Result<(u32, String)> {
    let conn = testbed::logind::connect(address).await?;
    let dbus = |method: &'static str, body: Option<&'static str>| {
        let conn = conn.clone();
        async move {
            match body {
                Some(name) => {
                    conn.call_method(
                        Some("org.freedesktop.DBus"),
                        "/org/freedesktop/DBus",
                        Some("org.freedesktop.DBus"),
                        method,
                        &(name,),
                    )
                    .await
                }
                None => {
                    conn.call_method(
                        Some("org.freedesktop.DBus"),
                        "/org/freedesktop/DBus",
                        Some("org.freedesktop.DBus"),
                        method,
                        &(),
                    )
                    .await
                }
            }
        }
    };
    let pid: u32 = dbus("GetConnectionUnixProcessID", Some(testbed::logind::LOGIN1))
        .await?
        .body()
        .deserialize()?;
    let id: String = dbus("GetId", None).await?.body().deserialize()?;
    Ok((pid, id))
}

/// Restarting logind gives a new logind on the same bus; restarting the bus gives a new bus
/// with a new logind on it.
async fn restarts(
    address: impl Fn() -> String,
    restart_logind: impl AsyncFn() -> Result<()>,
    restart_bus: impl AsyncFn() -> Result<()>,
) -> Result<()> {
    let (pid0, bus0) = owner_and_bus_id(&address()).await?;
    restart_logind().await?;
    let (pid1, bus1) = owner_and_bus_id(&address()).await?;
    ensure!(pid1 != pid0, "logind kept pid {pid0}");
    ensure!(bus1 == bus0, "the bus changed on a logind restart");
    restart_bus().await?;
    let (pid2, bus2) = owner_and_bus_id(&address()).await?;
    ensure!(bus2 != bus1, "the bus kept its ID {bus1}");
    ensure!(pid2 != pid1, "logind kept pid {pid1} across a bus restart");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logind_and_bus_restart_on_systemd_and_elogind() -> Result<()> {
    init();
    let node = SystemdNode::boot(SystemdOptions::new("node-1", Suite::Trixie)).await?;
    restarts(
        || node.bus_address(),
        async || Ok(node.restart_logind().await?),
        async || Ok(node.restart_bus().await?),
    )
    .await
    .context("systemd")?;
    let started = Instant::now();
    let el = Elogind::start(ElogindOptions::default()).await?;
    eprintln!(
        "elogind on its bus in {:.0} ms, {} KiB PSS",
        started.elapsed().as_secs_f64() * 1000.0,
        el.memory_kib()
    );
    restarts(
        || el.bus_address(),
        async || Ok(el.restart_logind().await?),
        async || Ok(el.restart_bus().await?),
    )
    .await
    .context("elogind")?;
    Ok(())
}

async fn journal_line(node: &SystemdNode, needle: &str) -> Option<String> {
    testbed::wait::until(
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async {
            let journal = node
                .exec(
                    "journalctl",
                    &["-u", "systemd-logind", "--no-pager", "-o", "cat"],
                )
                .await
                .ok()?;
            journal
                .lines()
                .find(|l| l.contains(needle))
                .map(str::to_owned)
        },
    )
    .await
}

async fn preparing_for_shutdown(node: &SystemdNode) -> Result<bool> {
    let conn = testbed::logind::connect(&node.bus_address()).await?;
    let reply = conn
        .call_method(
            Some(testbed::logind::LOGIN1),
            testbed::logind::LOGIN1_PATH,
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &(testbed::logind::LOGIN1_MANAGER, "PreparingForShutdown"),
        )
        .await?;
    let value: zbus::zvariant::OwnedValue = reply.body().deserialize()?;
    Ok(bool::try_from(value)?)
}

/// A masked `poweroff.target` makes a power-off fail as on a host where it is masked: logind
/// (systemd 257) refuses `PowerOff` outright; masked while logind delays the power-off for a
/// lock, the delayed power-off fails when the lock goes ("Error during inhibitor-delayed
/// operation") and the node stays up. Unmasked, it powers off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masked_poweroff_target_makes_the_poweroff_fail() -> Result<()> {
    init();
    let mut node = SystemdNode::boot(SystemdOptions::new("node-1", Suite::Trixie)).await?;
    node.mask_unit("poweroff.target").await?;
    let refused = node.poweroff().await;
    ensure!(
        refused.is_err(),
        "PowerOff accepted with poweroff.target masked"
    );
    let line = journal_line(&node, "is masked")
        .await
        .context("no refusal logged")?;
    eprintln!("masked before PowerOff: {line}");

    node.unmask_unit("poweroff.target").await?;
    let mut lock = Pod::spawn(
        node.pod_command(
            "systemd-inhibit",
            &[
                "--what=shutdown",
                "--mode=delay",
                "--who=test",
                "sleep",
                "300",
            ],
        ),
        &PodSpec::default(),
        "node-1",
        &PodRegistry::default(),
    )?;
    testbed::wait::until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let list = node.list_inhibitors().await.ok()?;
            list.iter().any(|i| i.who == "test").then_some(())
        },
    )
    .await
    .context("the lock is taken")?;
    node.poweroff().await?;
    ensure!(preparing_for_shutdown(&node).await?, "no shutdown delayed");
    node.mask_unit("poweroff.target").await?;
    lock.kill().await;
    let failed = journal_line(&node, "Error during inhibitor-delayed operation")
        .await
        .context("logind never reported the failed power-off")?;
    eprintln!("masked during the delay: {failed}");
    ensure!(
        node.is_running(),
        "the node went down although poweroff.target is masked"
    );
    ensure!(node.power_offs().is_empty(), "a power-off happened");
    eprintln!(
        "PreparingForShutdown after the failure: {}",
        preparing_for_shutdown(&node).await?
    );

    node.unmask_unit("poweroff.target").await?;
    node.poweroff().await?;
    node.wait_poweroff(Duration::from_secs(30)).await?;
    Ok(())
}
