//! A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler, started from the binaries `scripts/build-control-plane.sh` builds.
//!
//! The flags follow what kubeadm and envtest pass (kubernetes/kubernetes
//! `cmd/kubeadm/app/phases/controlplane/manifests.go`, kubernetes-sigs/controller-runtime
//! `pkg/internal/testing/controlplane/apiserver.go`), trimmed to one loopback node-less cluster:
//! - the API server serves TLS with a bed-generated CA, authorizes with `Node,RBAC`, issues
//!   service-account tokens, and writes every request at Metadata level to an audit log, so
//!   benchmarks can count requests by verb and resource (evictions included);
//! - the controller manager runs its default controllers, node lifecycle included, so a Node
//!   whose Lease stops being renewed goes Unknown as on a real cluster (the kubelet simulator
//!   keeps Leases and Ready conditions fresh);
//! - the scheduler places DaemonSet and Deployment pods.
//!
//! Clients other than the control plane's own components reach the API server through a
//! loopback proxy ([`crate::apiproxy`]) that can freeze or reset their connections, and
//! kube-apiserver itself can be stopped and started again on the same port and etcd
//! ([`ApiServerControl`]): the faults an agent meets when its API server goes away.
//!
//! Every process is a [`ManagedChild`], so dropping the [`ControlPlane`] (also during a panic)
//! stops them by PID and removes the temporary folder.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::apiproxy::{ApiProxy, Freeze, ProxyControl};
use crate::pki::{Ca, KeyPairPem, PkiError, SigningKeyPem};
use crate::process::{ManagedChild, ProcessError, pid_exists, rss_kib};

/// First address of `SERVICE_CIDR`, which the API server gives the `kubernetes` Service.
const SERVICE_CIDR: &str = "10.96.0.0/16";
const SERVICE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1));
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const POLL: Duration = Duration::from_millis(100);

/// Every request, one event per stage that completes it, at Metadata level: who did which verb on
/// which resource/subresource, with the response code, and no bodies (which would slow the API
/// server and bloat the file). `RequestReceived` is omitted so an ordinary request is one line;
/// watches and other long-running requests also log `ResponseStarted`.
const AUDIT_POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages:
  - RequestReceived
rules:
  - level: Metadata
";

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error(
        "{path} is missing: run tests/testbed/scripts/build-control-plane.sh or set KUBEBUILDER_ASSETS"
    )]
    MissingBinary { path: PathBuf },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("{name} exited during start-up ({status}); last lines of {log}:\n{tail}")]
    Exited {
        name: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{what} not ready after {waited:?}: {last}")]
    NotReady {
        what: String,
        waited: Duration,
        last: String,
    },
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("cannot build a client: {0}")]
    Client(#[source] kube::Error),
    #[error("{what}: {source}")]
    Api { what: String, source: kube::Error },
    #[error("TokenRequest for {service_account} returned no token")]
    NoToken { service_account: String },
    #[error("unreadable audit event {line}: {source}")]
    Audit {
        line: String,
        source: serde_json::Error,
    },
    #[error("after shutdown, still present: {0}")]
    Leftovers(String),
    #[error("kube-apiserver is {0}")]
    ApiServerState(&'static str),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlPlaneError {
    let what = what.into();
    move |source| ControlPlaneError::Io { what, source }
}

/// What to start and how.
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// Folder with etcd, kube-apiserver, kube-controller-manager and kube-scheduler.
    pub bin_dir: PathBuf,
    /// Parent of the plane's temporary folder (default: the system temp folder).
    pub temp_parent: Option<PathBuf>,
    pub controller_manager: bool,
    pub scheduler: bool,
    /// Wait in [`ControlPlane::start`] until the controller manager has created the `default`
    /// ServiceAccount in `default`: pods cannot be created in a namespace before that.
    pub wait_for_controllers: bool,
    pub extra_apiserver_args: Vec<String>,
    pub extra_controller_manager_args: Vec<String>,
    pub extra_scheduler_args: Vec<String>,
    /// Bound on each start-up wait.
    pub start_timeout: Duration,
    /// Keep the temporary folder (logs, audit log, etcd data) after teardown; defaults to
    /// whether `TESTBED_KEEP_DIR` is set and not empty.
    pub keep_dir: bool,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            bin_dir: crate::paths::bin_dir(),
            temp_parent: None,
            controller_manager: true,
            scheduler: true,
            wait_for_controllers: true,
            extra_apiserver_args: Vec::new(),
            extra_controller_manager_args: Vec::new(),
            extra_scheduler_args: Vec::new(),
            start_timeout: Duration::from_secs(60),
            keep_dir: std::env::var_os("TESTBED_KEEP_DIR").is_some_and(|v| !v.is_empty()),
        }
    }
}

/// The fields of an `audit.k8s.io/v1` Event that request counting needs.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuditEvent {
    /// `ResponseComplete`, or `ResponseStarted` for long-running requests (watches).
    pub stage: String,
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, …
    pub verb: String,
    #[serde(rename = "requestURI")]
    pub request_uri: String,
    pub user: AuditUser,
    pub object_ref: Option<AuditObjectRef>,
    pub response_status: Option<AuditResponseStatus>,
    pub request_received_timestamp: String,
    pub stage_timestamp: String,
    /// The client's `User-Agent` header, as sent.
    pub user_agent: String,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct AuditUser {
    pub username: String,
    pub groups: Vec<String>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuditObjectRef {
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub api_group: Option<String>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct AuditResponseStatus {
    pub code: Option<u16>,
}

impl AuditEvent {
    /// `resource` or `resource/subresource` (e.g. `pods/eviction`), empty for non-resource URLs.
    pub fn resource_path(&self) -> String {
        match &self.object_ref {
            Some(AuditObjectRef {
                resource,
                subresource: Some(sub),
                ..
            }) => format!("{resource}/{sub}"),
            Some(r) => r.resource.clone(),
            None => String::new(),
        }
    }

    pub fn code(&self) -> Option<u16> {
        self.response_status.as_ref().and_then(|s| s.code)
    }
}

/// Credentials for a kubeconfig written by [`ControlPlane::write_kubeconfig`].
#[derive(Clone, Debug)]
pub enum Credentials {
    Token(String),
    ClientCert(KeyPairPem),
}

/// A running control plane; dropping it stops every process and removes its folder.
pub struct ControlPlane {
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    keep_dir: bool,
    ca: Ca,
    server_url: String,
    etcd_url: String,
    kubeconfig: PathBuf,
    /// The admin's kubeconfig through the proxy, for pods.
    client_kubeconfig: PathBuf,
    audit_log: PathBuf,
    bin_dir: PathBuf,
    /// etcd, kube-controller-manager, kube-scheduler, in start order; stopped in reverse.
    children: Vec<ManagedChild>,
    /// Set once started; kept apart from `children` because a test may stop and start it.
    apiserver: Option<Arc<ApiServerProcess>>,
    proxy: Option<ApiProxy>,
    started_in: Duration,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("dir", &self.dir_path)
            .field("server_url", &self.server_url)
            .field("pids", &self.pids())
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver (and waits for `/readyz`), then the controller manager and the
    /// scheduler as configured.
    pub async fn start(opts: ControlPlaneOptions) -> Result<Self, ControlPlaneError> {
        // Free ports are chosen before the components bind them, so a parallel test can take one
        // in between; a component that dies of that is retried with new ports.
        let mut attempt = 1;
        loop {
            match Self::start_once(&opts).await {
                Err(ControlPlaneError::Exited { name, tail, .. })
                    if attempt < 3 && tail.contains("address already in use") =>
                {
                    tracing::warn!(name, attempt, "port taken meanwhile, starting again");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(opts: &ControlPlaneOptions) -> Result<Self, ControlPlaneError> {
        let began = Instant::now();
        let bin = |name: &str| {
            let path = opts.bin_dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(ControlPlaneError::MissingBinary { path })
            }
        };
        let etcd_bin = bin("etcd")?;
        let apiserver_bin = bin("kube-apiserver")?;
        let kcm_bin = bin("kube-controller-manager")?;
        let scheduler_bin = bin("kube-scheduler")?;

        let mut builder = tempfile::Builder::new();
        builder.prefix("testbed-cp-");
        let dir = match &opts.temp_parent {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .map_err(io_err("cannot create the control plane's temp folder"))?;
        let d = dir.path().to_path_buf();
        let pki = d.join("pki");
        std::fs::create_dir_all(&pki).map_err(io_err("cannot create pki folder"))?;
        let logs = d.join("logs");

        let ca = Ca::new("testbed-ca")?;
        let (ca_crt, ca_key) = ca.write(&pki, "ca")?;
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (serving_crt, serving_key) = ca
            .issue_server(
                &[
                    "localhost",
                    "kubernetes",
                    "kubernetes.default",
                    "kubernetes.default.svc",
                    "kubernetes.default.svc.cluster.local",
                ],
                &[localhost, SERVICE_IP],
            )?
            .write(&pki, "apiserver")?;
        let (sa_key, sa_pub) = SigningKeyPem::generate()?.write(&pki, "service-account")?;

        let [etcd_port, etcd_peer_port, apiserver_port] = free_ports()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let server_url = format!("https://127.0.0.1:{apiserver_port}");

        let mut plane = ControlPlane {
            dir: Some(dir),
            dir_path: d.clone(),
            keep_dir: opts.keep_dir,
            ca,
            server_url,
            etcd_url,
            kubeconfig: d.join("admin.kubeconfig"),
            client_kubeconfig: d.join("admin-via-proxy.kubeconfig"),
            audit_log: d.join("audit.log"),
            bin_dir: opts.bin_dir.clone(),
            children: Vec::new(),
            apiserver: None,
            proxy: None,
            started_in: Duration::ZERO,
        };

        // etcd: plain HTTP is enough on loopback; fsync is skipped because the data dies with
        // the bed and fsync dominates API write latency on a VM disk.
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let mut etcd = Command::new(etcd_bin);
        etcd.args([
            "--name",
            "default",
            "--log-level",
            "warn",
            "--unsafe-no-fsync",
        ])
        .arg(format!("--data-dir={}", d.join("etcd").display()))
        .arg(format!("--listen-client-urls={}", plane.etcd_url))
        .arg(format!("--advertise-client-urls={}", plane.etcd_url))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=default={peer_url}"));
        plane.spawn("etcd", etcd, &logs)?;
        plane
            .wait_tcp(
                "etcd",
                SocketAddr::from((localhost, etcd_port)),
                opts.start_timeout,
            )
            .await?;

        tracing::debug!(took = ?began.elapsed(), "etcd listening");
        let audit_policy = d.join("audit-policy.yaml");
        std::fs::write(&audit_policy, AUDIT_POLICY).map_err(io_err("cannot write audit policy"))?;
        let mut apiserver = Command::new(apiserver_bin);
        apiserver
            .arg(format!("--etcd-servers={}", plane.etcd_url))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={apiserver_port}"))
            .arg(format!("--cert-dir={}", pki.display()))
            .arg(format!("--tls-cert-file={}", serving_crt.display()))
            .arg(format!("--tls-private-key-file={}", serving_key.display()))
            .arg(format!("--client-ca-file={}", ca_crt.display()))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg(format!("--service-account-issuer={ISSUER}"))
            .arg(format!("--service-account-key-file={}", sa_pub.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key.display()
            ))
            .arg("--authorization-mode=Node,RBAC")
            // Added to the default set (NamespaceLifecycle, ServiceAccount, PodSecurity,
            // TaintNodesByCondition, DefaultTolerationSeconds, the admission webhooks and
            // policies, ResourceQuota, …); NodeRestriction limits node credentials to their own
            // Node and pods, as on kubeadm clusters.
            .arg("--enable-admission-plugins=NodeRestriction")
            .arg("--allow-privileged=true")
            .arg(format!("--audit-policy-file={}", audit_policy.display()))
            .arg(format!("--audit-log-path={}", plane.audit_log.display()))
            // Blocking: an event is on disk before the response is sent, so a test can read the
            // audit log right after its requests returned.
            .args(["--audit-log-mode=blocking", "--audit-log-maxsize=0"])
            .arg("--profiling=false")
            .args(&opts.extra_apiserver_args);
        let process = Arc::new(ApiServerProcess {
            program: apiserver.get_program().to_owned(),
            args: apiserver.get_args().map(ToOwned::to_owned).collect(),
            log: logs.join("kube-apiserver.log"),
            child: Mutex::new(None),
        });
        process.spawn()?;
        plane.apiserver = Some(process);

        // Start-up credentials; a kubeconfig per component, each with its own identity so RBAC's
        // bootstrap roles (system:kube-controller-manager, system:kube-scheduler) apply.
        let admin = Credentials::ClientCert(
            plane
                .ca
                .issue_client("kubernetes-admin", &["system:masters"])?,
        );
        plane.write_kubeconfig_at(
            &plane.kubeconfig,
            "kubernetes-admin",
            &admin,
            &plane.server_url,
        )?;
        plane.wait_readyz(opts.start_timeout).await?;
        tracing::debug!(took = ?began.elapsed(), "kube-apiserver ready");
        let proxy = ApiProxy::start(SocketAddr::from((localhost, apiserver_port)))
            .await
            .map_err(io_err("cannot start the API proxy"))?;
        plane.proxy = Some(proxy);
        plane.write_kubeconfig_at(
            &plane.client_kubeconfig,
            "kubernetes-admin",
            &admin,
            &plane.client_url(),
        )?;

        if opts.controller_manager {
            let kubeconfig = plane
                .component_kubeconfig("controller-manager", "system:kube-controller-manager")?;
            let mut kcm = Command::new(kcm_bin);
            kcm.arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg(format!(
                    "--service-account-private-key-file={}",
                    sa_key.display()
                ))
                .arg(format!("--root-ca-file={}", ca_crt.display()))
                .arg("--use-service-account-credentials=true")
                .arg(format!("--cluster-signing-cert-file={}", ca_crt.display()))
                .arg(format!("--cluster-signing-key-file={}", ca_key.display()))
                .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
                // One instance: leader election would only add Lease traffic and start latency.
                .args([
                    "--leader-elect=false",
                    "--secure-port=0",
                    "--profiling=false",
                ])
                // At the default 20 QPS, setting up each controller's ServiceAccount credentials
                // one after another takes seconds of client-side throttling at start.
                .args(["--kube-api-qps=200", "--kube-api-burst=400"])
                .args(&opts.extra_controller_manager_args);
            plane.spawn("kube-controller-manager", kcm, &logs)?;
        }
        if opts.scheduler {
            let kubeconfig = plane.component_kubeconfig("scheduler", "system:kube-scheduler")?;
            let mut scheduler = Command::new(scheduler_bin);
            scheduler
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .args([
                    "--leader-elect=false",
                    "--secure-port=0",
                    "--profiling=false",
                ])
                .args(&opts.extra_scheduler_args);
            plane.spawn("kube-scheduler", scheduler, &logs)?;
        }
        if opts.controller_manager && opts.wait_for_controllers {
            plane
                .wait_service_account("default", "default", opts.start_timeout)
                .await?;
        }
        plane.started_in = began.elapsed();
        tracing::info!(
            server = plane.server_url,
            dir = %plane.dir_path.display(),
            took = ?plane.started_in,
            "control plane ready"
        );
        Ok(plane)
    }

    /// The admin kubeconfig (client certificate in group `system:masters`), straight to
    /// kube-apiserver: what the bed and its simulators use, unaffected by proxy faults.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The admin kubeconfig through the API proxy: what pods get, so proxy faults reach them.
    pub fn client_kubeconfig_path(&self) -> &Path {
        &self.client_kubeconfig
    }

    /// kube-apiserver's own address, `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The address clients under test use: the API proxy's `https://127.0.0.1:<port>`.
    pub fn client_url(&self) -> String {
        self.proxy
            .as_ref()
            .map(ApiProxy::url)
            .unwrap_or_else(|| self.server_url.clone())
    }

    /// Stops and starts kube-apiserver, freezes or resets client connections.
    pub fn api_control(&self) -> ApiServerControl {
        ApiServerControl {
            process: self.apiserver.clone().expect("kube-apiserver started"),
            proxy: self.proxy.as_ref().expect("API proxy started").control(),
            kubeconfig: self.kubeconfig.clone(),
        }
    }

    /// etcd's client URL (`http://127.0.0.1:<port>`).
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The CA that signed the API server's serving certificate and every client certificate.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// The API server's audit log: JSON lines, one `audit.k8s.io/v1` Event each.
    pub fn audit_log_path(&self) -> &Path {
        &self.audit_log
    }

    /// A `kubectl` command (the bed's build) using the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("kubectl"));
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// The audit log's events so far, in the order the API server wrote them.
    pub fn audit_events(&self) -> Result<Vec<AuditEvent>, ControlPlaneError> {
        let text = std::fs::read_to_string(&self.audit_log)
            .map_err(io_err(format!("cannot read {}", self.audit_log.display())))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).map_err(|e| ControlPlaneError::Audit {
                    line: l.chars().take(200).collect(),
                    source: e,
                })
            })
            .collect()
    }

    /// The plane's temporary folder (pki/, logs/<component>.log, etcd/, kubeconfigs).
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The component logs folder.
    pub fn logs_dir(&self) -> PathBuf {
        self.dir_path.join("logs")
    }

    /// How long [`start`](Self::start) took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// `(component, pid)` for every running process of the plane, in start order.
    pub fn pids(&self) -> Vec<(String, u32)> {
        let mut out: Vec<(String, u32)> = self
            .children
            .iter()
            .map(|c| (c.name().to_string(), c.pid()))
            .collect();
        if let Some(pid) = self.apiserver.as_ref().and_then(|a| a.pid()) {
            out.insert(out.len().min(1), ("kube-apiserver".into(), pid));
        }
        out
    }

    /// Resident memory of each running component in KiB, in start order.
    pub fn rss_kib(&self) -> Vec<(String, u64)> {
        self.pids()
            .into_iter()
            .filter_map(|(name, pid)| Some((name, rss_kib(pid)?)))
            .collect()
    }

    /// A client configuration for the admin kubeconfig; change it (e.g. `default_retry`) before
    /// building a client.
    pub async fn config(&self) -> Result<Config, ControlPlaneError> {
        config_from_kubeconfig(&self.kubeconfig).await
    }

    /// A client with the admin's credentials and kube's default settings.
    pub async fn client(&self) -> Result<Client, ControlPlaneError> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Writes `<dir>/<file_stem>.kubeconfig` with `credentials` for the API server as clients
    /// under test reach it (through the proxy, [`client_url`](Self::client_url)); the CA and
    /// credentials are embedded, so the file works from any mount namespace.
    pub fn write_kubeconfig(
        &self,
        file_stem: &str,
        user: &str,
        credentials: &Credentials,
    ) -> Result<PathBuf, ControlPlaneError> {
        let path = self.dir_path.join(format!("{file_stem}.kubeconfig"));
        self.write_kubeconfig_at(&path, user, credentials, &self.client_url())?;
        Ok(path)
    }

    /// A kubeconfig for one of the plane's own components, straight to kube-apiserver.
    fn component_kubeconfig(
        &self,
        file_stem: &str,
        common_name: &str,
    ) -> Result<PathBuf, ControlPlaneError> {
        let cert = self.ca.issue_client(common_name, &[])?;
        let path = self.dir_path.join(format!("{file_stem}.kubeconfig"));
        self.write_kubeconfig_at(
            &path,
            common_name,
            &Credentials::ClientCert(cert),
            &self.server_url,
        )?;
        Ok(path)
    }

    /// A kubeconfig authenticating with a fresh client certificate: user `common_name`, groups
    /// `groups` (e.g. `system:node:node-1` in `system:nodes` for a kubelet).
    pub fn user_kubeconfig(
        &self,
        file_stem: &str,
        common_name: &str,
        groups: &[&str],
    ) -> Result<PathBuf, ControlPlaneError> {
        let cert = self.ca.issue_client(common_name, groups)?;
        self.write_kubeconfig(file_stem, common_name, &Credentials::ClientCert(cert))
    }

    /// A token for ServiceAccount `namespace/name` from the TokenRequest API, valid for
    /// `expiration` (the API server enforces at least 10 minutes).
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        expiration: Duration,
    ) -> Result<String, ControlPlaneError> {
        let client = self.client().await?;
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(expiration.as_secs() as i64),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sas: Api<ServiceAccount> = Api::namespaced(client, namespace);
        let response = sas
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .map_err(|source| ControlPlaneError::Api {
                what: format!("TokenRequest for {namespace}/{name}"),
                source,
            })?;
        response
            .status
            .and_then(|s| s.token)
            .ok_or_else(|| ControlPlaneError::NoToken {
                service_account: format!("{namespace}/{name}"),
            })
    }

    /// A kubeconfig for ServiceAccount `namespace/name` with a one-hour token.
    pub async fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<PathBuf, ControlPlaneError> {
        let token = self
            .service_account_token(namespace, name, Duration::from_secs(3600))
            .await?;
        self.write_kubeconfig(
            &format!("sa-{namespace}-{name}"),
            &format!("system:serviceaccount:{namespace}:{name}"),
            &Credentials::Token(token),
        )
    }

    /// Creates namespace `name` (one that exists already is used as it is: a bench cell run
    /// again after a failed setup) and waits until the controller manager has given it its
    /// `default` ServiceAccount, so pods can be created in it.
    pub async fn create_namespace(&self, name: &str) -> Result<(), ControlPlaneError> {
        let client = self.client().await?;
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        match Api::<Namespace>::all(client)
            .create(&PostParams::default(), &ns)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(source) => {
                return Err(ControlPlaneError::Api {
                    what: format!("create namespace {name}"),
                    source,
                });
            }
        }
        let api: Api<ServiceAccount> = Api::namespaced(self.client().await?, name);
        poll_service_account(&api, name, "default", Duration::from_secs(30), || Ok(())).await
    }

    /// Stops every process (scheduler and controller manager first, etcd last), then removes
    /// the folder unless kept, and checks that none of the PIDs and not the folder remain.
    pub async fn shutdown(self) -> Result<(), ControlPlaneError> {
        let pids: Vec<u32> = self.pids().into_iter().map(|(_, p)| p).collect();
        let dir = self.dir_path.clone();
        let keep = self.keep_dir;
        tokio::task::spawn_blocking(move || drop(self))
            .await
            .map_err(|e| ControlPlaneError::Leftovers(format!("teardown panicked: {e}")))?;
        let mut left: Vec<String> = pids
            .into_iter()
            .filter(|&p| pid_exists(p))
            .map(|p| format!("pid {p}"))
            .collect();
        if !keep && dir.exists() {
            left.push(dir.display().to_string());
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(ControlPlaneError::Leftovers(left.join(", ")))
        }
    }

    fn spawn(&mut self, name: &str, cmd: Command, logs: &Path) -> Result<(), ControlPlaneError> {
        let child = spawn_component(name, cmd, &logs.join(format!("{name}.log")))?;
        self.children.push(child);
        Ok(())
    }

    fn write_kubeconfig_at(
        &self,
        path: &Path,
        user: &str,
        credentials: &Credentials,
        server: &str,
    ) -> Result<(), ControlPlaneError> {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mut user_fields = String::new();
        match credentials {
            Credentials::Token(token) => {
                let _ = writeln!(user_fields, "      token: {token}");
            }
            Credentials::ClientCert(cert) => {
                let _ = writeln!(
                    user_fields,
                    "      client-certificate-data: {}\n      client-key-data: {}",
                    b64(&cert.cert_pem),
                    b64(&cert.key_pem)
                );
            }
        }
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
  - name: testbed
    cluster:
      server: {server}
      certificate-authority-data: {ca}
users:
  - name: {user:?}
    user:
{user_fields}contexts:
  - name: testbed
    context:
      cluster: testbed
      user: {user:?}
current-context: testbed
",
            ca = b64(self.ca.cert_pem()),
        );
        write_private(path, &text)
    }

    async fn wait_tcp(
        &mut self,
        name: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<(), ControlPlaneError> {
        let began = Instant::now();
        loop {
            let last = match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            self.check_alive()?;
            if began.elapsed() > timeout {
                return Err(ControlPlaneError::NotReady {
                    what: format!("{name} on {addr}"),
                    waited: began.elapsed(),
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_readyz(&mut self, timeout: Duration) -> Result<(), ControlPlaneError> {
        let kubeconfig = self.kubeconfig.clone();
        wait_readyz(&kubeconfig, timeout, || self.check_alive()).await
    }

    async fn wait_service_account(
        &mut self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<(), ControlPlaneError> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client().await?, namespace);
        poll_service_account(&api, namespace, name, timeout, || self.check_alive()).await
    }

    /// Fails fast, with the log's tail, when a component died instead of letting a readiness
    /// wait run into its timeout.
    fn check_alive(&mut self) -> Result<(), ControlPlaneError> {
        for child in &mut self.children {
            check_child(child)?;
        }
        if let Some(api) = &self.apiserver {
            api.check_alive()?;
        }
        Ok(())
    }

    fn teardown(&mut self) {
        if self.children.is_empty() && self.apiserver.is_none() && self.dir.is_none() {
            return;
        }
        if std::thread::panicking() {
            for (name, pid) in self.pids() {
                let log = self.logs_dir().join(format!("{name}.log"));
                eprintln!(
                    "---- {name} (pid {pid}) {} ----\n{}",
                    log.display(),
                    log_tail(&log, 15)
                );
            }
        }
        self.proxy.take();
        // Clients of the API server go first so they do not spend the API server's shutdown
        // retrying; etcd goes last so the API server can finish its requests.
        for child in self.children.iter().skip(1) {
            child.terminate();
        }
        if let Some(api) = &self.apiserver {
            api.terminate();
        }
        while self.children.len() > 1 {
            if let Some(mut child) = self.children.pop() {
                child.kill();
            }
        }
        if let Some(api) = self.apiserver.take() {
            api.kill();
        }
        if let Some(mut etcd) = self.children.pop() {
            etcd.terminate();
            etcd.kill();
        }
        if let Some(dir) = self.dir.take() {
            if self.keep_dir {
                let kept = dir.keep();
                eprintln!("control plane folder kept: {}", kept.display());
            } else if let Err(e) = dir.close() {
                tracing::warn!(error = %e, "cannot remove the control plane's folder");
            }
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// kube-apiserver as a process that can be stopped and started again with the same flags (same
/// port, certificates, etcd and audit log).
struct ApiServerProcess {
    program: OsString,
    args: Vec<OsString>,
    log: PathBuf,
    child: Mutex<Option<ManagedChild>>,
}

impl ApiServerProcess {
    fn spawn(&self) -> Result<(), ControlPlaneError> {
        let mut child = self.child.lock().expect("apiserver lock");
        if child.as_mut().is_some_and(ManagedChild::is_running) {
            return Err(ControlPlaneError::ApiServerState("already running"));
        }
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        *child = Some(spawn_component("kube-apiserver", cmd, &self.log)?);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        let mut child = self.child.lock().expect("apiserver lock");
        let c = child.as_mut()?;
        c.is_running().then(|| c.pid())
    }

    fn check_alive(&self) -> Result<(), ControlPlaneError> {
        match self.child.lock().expect("apiserver lock").as_mut() {
            Some(child) => check_child(child),
            None => Ok(()),
        }
    }

    fn terminate(&self) {
        if let Some(child) = self.child.lock().expect("apiserver lock").as_ref() {
            child.terminate();
        }
    }

    /// SIGTERM, bounded wait, SIGKILL; blocks (see [`ManagedChild::kill`]).
    fn kill(&self) {
        let taken = self.child.lock().expect("apiserver lock").take();
        if let Some(mut child) = taken {
            child.kill();
        }
    }
}

/// Stops and starts kube-apiserver and freezes or resets its clients' connections; cheap to
/// clone and usable while the bed runs (the bed's ctl server holds one).
#[derive(Clone)]
pub struct ApiServerControl {
    process: Arc<ApiServerProcess>,
    proxy: ProxyControl,
    kubeconfig: PathBuf,
}

impl std::fmt::Debug for ApiServerControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServerControl")
            .field("pid", &self.process.pid())
            .field("proxy", &self.proxy)
            .finish()
    }
}

impl ApiServerControl {
    /// Stops kube-apiserver as `systemctl stop` would (SIGTERM, then SIGKILL after 3 s) and
    /// returns once it is gone. Its clients see their connections closed and new ones refused.
    /// The bed's own components lose it too: past kube-controller-manager's node monitor grace
    /// period (tens of seconds) it may mark nodes Unknown once it is back, before the kubelet
    /// simulator's next Lease renewal, as on a real cluster.
    pub async fn stop(&self) -> Result<(), ControlPlaneError> {
        if self.process.pid().is_none() {
            return Err(ControlPlaneError::ApiServerState("not running"));
        }
        let process = self.process.clone();
        tokio::task::spawn_blocking(move || process.kill())
            .await
            .map_err(|e| ControlPlaneError::Leftovers(format!("stopping kube-apiserver: {e}")))?;
        tracing::info!("kube-apiserver stopped");
        Ok(())
    }

    /// Starts kube-apiserver again with the same flags and waits for `/readyz`.
    pub async fn start(&self) -> Result<(), ControlPlaneError> {
        self.process.spawn()?;
        let process = self.process.clone();
        wait_readyz(&self.kubeconfig, Duration::from_secs(60), || {
            process.check_alive()
        })
        .await?;
        tracing::info!("kube-apiserver started again");
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.process.pid().is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The proxy every client under test goes through.
    pub fn proxy(&self) -> &ProxyControl {
        &self.proxy
    }

    /// See [`ProxyControl::freeze`].
    pub fn freeze(&self, scope: Freeze) {
        self.proxy.freeze(scope);
    }

    /// See [`ProxyControl::thaw`].
    pub fn thaw(&self) {
        self.proxy.thaw();
    }

    /// See [`ProxyControl::reset`].
    pub fn reset(&self) {
        self.proxy.reset();
    }
}

fn spawn_component(
    name: &str,
    mut cmd: Command,
    log: &Path,
) -> Result<ManagedChild, ControlPlaneError> {
    // Loopback only: a proxy from the environment must not see webhook or API calls.
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    let mut child = ManagedChild::spawn(name, cmd, log)?;
    // These components stop within a second or two of SIGTERM; a hung one should not hold up
    // a test's teardown for long.
    child.set_term_grace(Duration::from_secs(3));
    Ok(child)
}

fn check_child(child: &mut ManagedChild) -> Result<(), ControlPlaneError> {
    if let Some(status) = child.try_wait()? {
        return Err(ControlPlaneError::Exited {
            name: child.name().to_string(),
            status: status.to_string(),
            log: child.log_path().to_path_buf(),
            tail: log_tail(child.log_path(), 30),
        });
    }
    Ok(())
}

/// Polls kube-apiserver's `/readyz` with the (direct) kubeconfig until it answers, while
/// `alive` says the process still runs.
async fn wait_readyz(
    kubeconfig: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), ControlPlaneError>,
) -> Result<(), ControlPlaneError> {
    let began = Instant::now();
    let mut config = config_from_kubeconfig(kubeconfig).await?;
    config.default_retry = false;
    let client = Client::try_from(config).map_err(ControlPlaneError::Client)?;
    loop {
        let request = http::Request::get("/readyz")
            .body(Vec::new())
            .expect("static request is valid");
        let last = match client.request_text(request).await {
            Ok(_) => return Ok(()),
            Err(e) => e.to_string(),
        };
        alive()?;
        if began.elapsed() > timeout {
            return Err(ControlPlaneError::NotReady {
                what: "kube-apiserver /readyz".into(),
                waited: began.elapsed(),
                last,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn poll_service_account(
    api: &Api<ServiceAccount>,
    namespace: &str,
    name: &str,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), ControlPlaneError>,
) -> Result<(), ControlPlaneError> {
    let began = Instant::now();
    loop {
        let last = match api.get_opt(name).await {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => "not created yet".to_string(),
            Err(e) => e.to_string(),
        };
        alive()?;
        if began.elapsed() > timeout {
            return Err(ControlPlaneError::NotReady {
                what: format!("ServiceAccount {namespace}/{name}"),
                waited: began.elapsed(),
                last,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A client configuration from any kubeconfig file (e.g. one from
/// [`ControlPlane::write_kubeconfig`]).
pub async fn config_from_kubeconfig(path: &Path) -> Result<Config, ControlPlaneError> {
    // kube's rustls backend needs a process-wide provider when more than one is compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig =
        Kubeconfig::read_from(path).map_err(|source| ControlPlaneError::Kubeconfig {
            path: path.to_path_buf(),
            source,
        })?;
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| ControlPlaneError::Kubeconfig {
            path: path.to_path_buf(),
            source,
        })
}

/// A client with kube's default settings from any kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client, ControlPlaneError> {
    Client::try_from(config_from_kubeconfig(path).await?).map_err(ControlPlaneError::Client)
}

/// Distinct free loopback ports, all held open until every one is chosen so none repeats.
fn free_ports<const N: usize>() -> Result<[u16; N], ControlPlaneError> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err("cannot reserve a loopback port"))?;
    let mut ports = [0u16; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener
            .local_addr()
            .map_err(io_err("cannot read a reserved port"))?
            .port();
    }
    Ok(ports)
}

fn write_private(path: &Path, text: &str) -> Result<(), ControlPlaneError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let what = || format!("cannot write {}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(what()))?;
    file.write_all(text.as_bytes()).map_err(io_err(what()))
}

/// The last `lines` lines of a log file (empty if unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
