//! The agent's HTTP endpoints: `/metrics` (OpenMetrics), `/healthz` (the process answers),
//! `/readyz` (the lock is held and the API server answers) and `/status` (the agent's own view
//! as JSON, read by `shutdown-guard status`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::drain::report::AgentStatus;
use metrics::Metrics;

pub mod metrics;

#[derive(Clone, Default)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub status: Arc<RwLock<AgentStatus>>,
    /// Set once the lock is taken (the agent makes no API call before).
    pub client: Arc<OnceLock<kube::Client>>,
}

impl AdminState {
    pub fn update(&self, f: impl FnOnce(&mut AgentStatus)) {
        let mut g = self.status.write().unwrap_or_else(|e| e.into_inner());
        f(&mut g);
    }

    pub fn status(&self) -> AgentStatus {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// How long `/readyz` waits for the API server (kubelet's probe timeout defaults to 1 s; the
/// DaemonSet gives it more).
const API_PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Why the agent is not ready, or `None` when it is.
pub fn not_ready(lock_held: bool, api: Result<(), String>) -> Option<String> {
    match (lock_held, api) {
        (true, Ok(())) => None,
        (false, Ok(())) => Some("the logind delay lock is not held".into()),
        (true, Err(e)) => Some(format!("the API server is unreachable: {e}")),
        (false, Err(e)) => Some(format!(
            "the logind delay lock is not held; the API server is unreachable: {e}"
        )),
    }
}

async fn api_reachable(state: &AdminState) -> Result<(), String> {
    let Some(client) = state.client.get() else {
        return Err("no client yet (waiting for the lock)".into());
    };
    match tokio::time::timeout(API_PROBE_TIMEOUT, client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {API_PROBE_TIMEOUT:?}")),
    }
}

fn text(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn route(state: AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        (&hyper::Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (&hyper::Method::GET, "/readyz") => {
            let lock = state.status().lock_held;
            match not_ready(lock, api_reachable(&state).await) {
                None => text(StatusCode::OK, "text/plain", "ok\n".into()),
                Some(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {why}\n"),
                ),
            }
        }
        (&hyper::Method::GET, "/status") => text(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&state.status()).unwrap_or_default(),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves the endpoints on `listener` until the process ends.
pub fn serve(listener: TcpListener, state: AdminState) {
    if let Ok(addr) = listener.local_addr() {
        info!(address = %addr, "admin server listening");
    }
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(state, req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(peer = %peer, error = %e, "admin connection ended");
                }
            });
        }
    });
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_both_the_lock_and_the_api_server() {
        assert_eq!(not_ready(true, Ok(())), None);
        assert!(not_ready(false, Ok(())).unwrap().contains("lock"));
        assert!(
            not_ready(true, Err("refused".into()))
                .unwrap()
                .contains("API server")
        );
        let both = not_ready(false, Err("refused".into())).unwrap();
        assert!(both.contains("lock") && both.contains("refused"));
    }
}
