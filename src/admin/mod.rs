//! Admin API: health, readiness, metrics, the config in force, and reload on demand.
//! Listens on loopback unless `mesh.admin` says otherwise.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::reload::Reloader;
use crate::snapshot::Snapshot;
use crate::telemetry::Metrics;

pub struct Admin {
    pub reloader: Arc<Reloader>,
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Vec<u8>> {
    reply(
        status,
        "text/plain; charset=utf-8",
        body.into().into_bytes(),
    )
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(&value).unwrap_or_default();
    body.push(b'\n');
    reply(status, "application/json", body)
}

/// Ok when every data-plane listener of `snapshot` is bound. Checked by trying to bind the
/// same address: that fails while the listener holds it. (Connecting instead would make
/// the TLS listeners log a failed handshake on every probe.) Start-up has already made sure
/// no other process held these addresses.
pub fn listeners_accepting(snapshot: &Snapshot) -> Result<(), String> {
    for l in &snapshot.listeners {
        if std::net::TcpListener::bind(l.addr).is_ok() {
            return Err(format!("listener {} is not bound yet", l.shape()));
        }
    }
    Ok(())
}

impl Admin {
    /// Ready when every data-plane listener accepts connections.
    fn ready(&self) -> Result<(), String> {
        listeners_accepting(&self.reloader.snapshots.load())
    }

    fn config(&self) -> serde_json::Value {
        let status = self.reloader.status();
        let snapshot = self.reloader.snapshots.load();
        let (success, failure) = Metrics::global().reload_counts();
        let listeners: Vec<_> = snapshot
            .listeners
            .iter()
            .map(|l| {
                let mut hosts: Vec<&str> =
                    l.table.vhosts.values().map(|v| v.domain.as_str()).collect();
                hosts.sort_unstable();
                serde_json::json!({
                    "address": l.addr.to_string(),
                    "protocol": if l.tls { "HTTPS" } else { "HTTP" },
                    "hosts": hosts,
                    "certificates": l.certs.as_ref().map(|c| {
                        c.hosts.values().map(|s| serde_json::json!({
                            "file": s.cert_path,
                            "subject": s.subject,
                            "notAfter": s.not_after,
                        })).collect::<Vec<_>>()
                    }),
                })
            })
            .collect();
        let clusters: Vec<_> = snapshot
            .clusters
            .iter()
            .map(|c| {
                serde_json::json!({
                    "name": c.name,
                    "endpoints": c.endpoints.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "generation": status.generation,
            "sources": status.sources,
            "lastReloadError": status.last_reload_error,
            "reloads": { "success": success, "failure": failure },
            "summary": {
                "gateways": snapshot.summary.gateways,
                "hosts": snapshot.summary.hosts,
                "routes": snapshot.summary.routes,
                "clusters": snapshot.summary.clusters,
            },
            "listeners": listeners,
            "clusters": clusters,
        })
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        match (method, path.as_str()) {
            (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (Method::GET, "/ready") => match self.ready() {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            },
            (Method::GET, "/metrics") => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                Metrics::global().render(Some(&self.reloader.snapshots.load())),
            ),
            (Method::GET, "/config") => json(StatusCode::OK, self.config()),
            (Method::POST, "/reload") => {
                let r = self.reloader.clone();
                match tokio::task::spawn_blocking(move || r.reload("admin API")).await {
                    Ok(Ok(generation)) => json(
                        StatusCode::OK,
                        serde_json::json!({ "generation": generation }),
                    ),
                    Ok(Err(e)) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                    Err(e) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("reload panicked: {e}\n"),
                    ),
                }
            }
            (_, "/healthz" | "/ready" | "/metrics" | "/config" | "/reload") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /healthz, /ready, /metrics, /config or POST /reload\n",
            ),
        }
    }
}
