//! Admin API: health, readiness, metrics, the config in force, and reload on demand.
//! Listens on loopback unless `mesh.admin` says otherwise; `access` decides which requests
//! it answers.

mod access;

pub use access::{AdminToken, LogLimit};

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::reload::Reloader;
use crate::routing::Action;
use crate::snapshot::Snapshot;
use crate::telemetry::Metrics;
use access::Refusal;
use std::sync::atomic::Ordering;

pub struct Admin {
    pub reloader: Arc<Reloader>,
    pub started: std::time::Instant,
}

const DASHBOARD: &str = include_str!("dashboard.html");

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
pub fn listeners_bound(snapshot: &Snapshot) -> Result<(), String> {
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
        listeners_bound(&self.reloader.snapshots.load())
    }

    fn config(&self) -> serde_json::Value {
        let status = self.reloader.status();
        let snapshot = self.reloader.snapshots.load();
        let (success, failure) = Metrics::global().reload_counts();
        let listeners: Vec<_> = snapshot.listeners.iter().map(listener_json).collect();
        let clusters: Vec<_> = snapshot
            .clusters
            .iter()
            .map(|c| {
                let endpoints: Vec<_> = c
                    .endpoints
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        serde_json::json!({
                            "address": e.addr.to_string(),
                            "healthy": !c.is_ejected(i),
                            "active": e.stats.active.load(Ordering::Relaxed),
                        })
                    })
                    .collect();
                let active: u32 = c
                    .endpoints
                    .iter()
                    .map(|e| e.stats.active.load(Ordering::Relaxed))
                    .sum();
                serde_json::json!({ "name": c.name, "endpoints": endpoints, "active": active })
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
            "egress": snapshot.egress.describe(),
            "acme": crate::tls::acme::status(&snapshot.acme),
        })
    }

    fn stats(&self) -> serde_json::Value {
        let c = Metrics::global().status_classes();
        serde_json::json!({
            "uptimeSeconds": self.started.elapsed().as_secs_f64(),
            "requests": {
                "total": c.iter().sum::<u64>(),
                "1xx": c[1], "2xx": c[2], "3xx": c[3], "4xx": c[4], "5xx": c[5],
            },
        })
    }
}

fn listener_json(l: &crate::snapshot::Listener) -> serde_json::Value {
    let mut vhosts: Vec<_> = l.table.vhosts.values().collect();
    vhosts.sort_by(|a, b| a.domain.cmp(&b.domain));
    let hosts: Vec<&str> = vhosts.iter().map(|v| v.domain.as_str()).collect();
    let virtual_hosts: Vec<_> = vhosts
        .iter()
        .map(|v| {
            let routes: Vec<_> = v
                .routes
                .iter()
                .map(|r| {
                    let matches: Vec<String> = r.matches.iter().map(ToString::to_string).collect();
                    serde_json::json!({
                        "route": r.origin.to_string(),
                        "name": r.name,
                        "match": if matches.is_empty() { "anything".to_string() } else { matches.join(" or ") },
                        "action": action_text(&r.action),
                    })
                })
                .collect();
            serde_json::json!({ "domain": v.domain, "routes": routes })
        })
        .collect();
    let certificates = l.certs.as_ref().map(|c| {
        let mut list: Vec<_> = c
            .hosts
            .entries()
            .map(|(host, s)| {
                serde_json::json!({
                    "host": host,
                    "file": s.cert_path,
                    "subject": s.subject,
                    "notAfter": s.not_after,
                    "standIn": s.stand_in,
                })
            })
            .collect();
        list.sort_by(|a, b| a["host"].as_str().cmp(&b["host"].as_str()));
        list
    });
    serde_json::json!({
        "address": l.addr.to_string(),
        "protocol": l.shape().protocol(),
        "hosts": hosts,
        "virtualHosts": virtual_hosts,
        "certificates": certificates,
        "l4Routes": l.l4.as_ref().map(crate::l4::L4Table::describe),
    })
}

fn action_text(a: &Action) -> String {
    match a {
        Action::Forward(f) => f
            .destinations
            .iter()
            .map(|d| format!("{} ({}/{})", d.cluster.name, d.weight, f.total_weight))
            .collect::<Vec<_>>()
            .join(", "),
        Action::Redirect(r) => format!("redirect {}", r.code),
        Action::Direct(d) => format!("direct response {}", d.status),
    }
}

/// The answer to a refused request: 403 for who is asking (the Host, another origin), 415
/// for a body type only a form would send, 401 with a challenge for a missing or wrong
/// token.
fn refused(refusal: Refusal) -> Response<Vec<u8>> {
    match refusal {
        Refusal::Host => text(
            StatusCode::FORBIDDEN,
            "forbidden: the admin API answers only Host localhost or an IP address\n",
        ),
        Refusal::CrossOrigin => text(
            StatusCode::FORBIDDEN,
            "forbidden: the admin API takes writes only from its own origin\n",
        ),
        Refusal::FormContentType => text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported media type: send no body (or application/json), not a form type\n",
        ),
        Refusal::NoToken | Refusal::WrongToken => {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "unauthorized: bearer token needed\n",
            );
            let challenge = if refusal == Refusal::NoToken {
                r#"Bearer realm="portico admin""#
            } else {
                r#"Bearer realm="portico admin", error="invalid_token""#
            };
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static(challenge),
            );
            r
        }
    }
}

/// Logs a refused request, at most once a second (`REFUSAL_LOG`). Header values are
/// attacker-chosen: logged escaped and cut short; the Authorization header never.
fn log_refused(session: &ServerSession, refusal: Refusal) {
    static REFUSAL_LOG: LogLimit = LogLimit::new();
    let Some(skipped) = REFUSAL_LOG.admit(std::time::Instant::now()) else {
        return;
    };
    let req = session.req_header();
    let cut = |s: &str| s.chars().take(100).collect::<String>();
    let header = |name: http::header::HeaderName| {
        req.headers
            .get(name)
            .map(|v| cut(&String::from_utf8_lossy(v.as_bytes())))
    };
    tracing::warn!(
        reason = refusal.reason(),
        method = %req.method,
        path = ?cut(req.uri.path()),
        host = ?header(http::header::HOST),
        origin = ?header(http::header::ORIGIN),
        peer = ?session.client_addr().map(ToString::to_string),
        refused_since_last_line = skipped,
        "admin request refused"
    );
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let token = self.reloader.snapshots.load().settings.admin_token.clone();
        if let Err(refusal) = access::check(session.req_header(), token.as_ref()) {
            log_refused(session, refusal);
            return refused(refusal);
        }
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        match (method, path.as_str()) {
            (Method::GET, "/") => reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                DASHBOARD.as_bytes().to_vec(),
            ),
            (Method::GET, "/stats") => json(StatusCode::OK, self.stats()),
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
            (Method::POST, "/acme/renew") => {
                // `?name=CREDENTIAL` for one certificate; every managed one without it.
                let name = req.uri.query().and_then(|q| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix("name="))
                        .map(str::to_string)
                });
                let names = crate::tls::acme::manager::request_renewal(name.as_deref());
                if names.is_empty() {
                    text(
                        StatusCode::NOT_FOUND,
                        "no ACME-managed certificate by that name\n",
                    )
                } else {
                    json(
                        StatusCode::ACCEPTED,
                        serde_json::json!({ "renewing": names }),
                    )
                }
            }
            (_, "/healthz" | "/ready" | "/metrics" | "/config" | "/reload" | "/acme/renew") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /, /healthz, /ready, /metrics, /config, /stats, POST /reload or POST /acme/renew\n",
            ),
        }
    }
}
