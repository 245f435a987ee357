//! Assembles the process: one pingora service per listener, the admin service and the
//! config watcher, then runs until a signal says stop.

use std::sync::Arc;

use pingora::apps::http_app::HttpServer;
use pingora::apps::{HttpServerOptions, ServerApp};
use pingora::listeners::tls::Acceptor;
use pingora::listeners::{L4BufferSettings, ListenerConfig, TlsAccept};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::admin::Admin;
use crate::config::ConfigErrors;
use crate::listener::Kind;
use crate::proxy::RequestCycle;
use crate::reload::{Reloader, Watcher};

/// Keeps the SNI of each TLS connection (for the request's log line) and, on a
/// mutual-TLS server, the verified client certificate (`tls::client_auth::TlsConn`).
pub(crate) struct KeepTls {
    /// The URI SANs of the server's certificate (XFCC's `By`), on a mutual-TLS server.
    pub by: Arc<[String]>,
}

#[async_trait::async_trait]
impl TlsAccept for KeepTls {
    async fn handshake_complete_callback(
        &self,
        tls: &pingora::protocols::tls::TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        use crate::tls::client_auth::{PeerCert, TlsConn};
        // rustls verified the chain (the server's verifier) before the handshake ended.
        let peer = tls
            .peer_certificate_der()
            .and_then(|der| PeerCert::from_der(der, &self.by))
            .map(Arc::new);
        let sni = tls.server_name().map(str::to_string);
        if sni.is_none() && peer.is_none() {
            return None;
        }
        Some(Arc::new(TlsConn { sni, peer }) as _)
    }
}

/// The pingora request cycle of listener `i`, for the requests Portico's codecs lend it
/// (and the h2 connections they hand over): h2c when the listener serves it, and its
/// connections' h2 idle timeout.
fn pingora_cycle(
    server_conf: &Arc<ServerConf>,
    cycle: RequestCycle,
    h2c: bool,
    h2_idle: std::time::Duration,
) -> Arc<pingora_proxy::HttpProxy<RequestCycle>> {
    let mut proxy = pingora_proxy::http_proxy(server_conf, cycle);
    let mut opts = HttpServerOptions::default();
    opts.h2c = h2c;
    opts.h2_idle_timeout = Some(h2_idle);
    proxy.server_options = Some(opts);
    proxy.h2_options = Some(crate::protocol::fast::http2::options());
    Arc::new(proxy)
}

/// Portico's HTTP/1.1 front of listener `i` (see `protocol::fast`), lending requests to `http`.
fn front(
    i: usize,
    l: &crate::snapshot::Listener,
    reloader: &Arc<Reloader>,
    http: Arc<pingora_proxy::HttpProxy<RequestCycle>>,
    fast_path: bool,
) -> crate::protocol::fast::HttpFront {
    crate::protocol::fast::HttpFront {
        listener: i,
        tls: l.tls,
        h2c: l.h2c,
        forward: fast_path && !l.forward_proxy,
        snapshots: reloader.snapshots.clone(),
        http,
        connections: crate::listener::ConnectionLimit::new(l.shape().to_string()),
    }
}

/// The app of HTTPS listener `i`: Portico's TLS accept, then Portico's HTTP/1.1 front or
/// h2 (the fast path's, or pingora's when it is off) on the TLS stream.
fn https_app(
    i: usize,
    l: &crate::snapshot::Listener,
    reloader: &Arc<Reloader>,
    server_conf: &Arc<ServerConf>,
    cycle: RequestCycle,
    fast_path: bool,
) -> Result<crate::listener::https::Https, RunError> {
    let name = format!("listener {}", l.shape());
    let idle = reloader.snapshots.load().settings.downstream.idle_timeout;
    let proxy = pingora_cycle(server_conf, cycle, false, idle);
    Ok(crate::listener::https::Https {
        acceptor: tls_acceptor(i, reloader, &name)?,
        front: Arc::new(front(i, l, reloader, proxy.clone(), fast_path)),
        proxy,
        fast_h2: fast_path,
        snapshots: reloader.snapshots.clone(),
    })
}

#[derive(Debug)]
pub enum RunError {
    Config(ConfigErrors),
    Tls(String),
    Bind(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Config(e) => write!(f, "{e}"),
            RunError::Tls(e) | RunError::Bind(e) => write!(f, "{e}"),
        }
    }
}

/// TLS for listener `i`: certificates chosen by SNI from the current Snapshot, h2 by ALPN,
/// session resumption by stateless tickets (see `listener::https`).
fn tls_acceptor(i: usize, reloader: &Arc<Reloader>, name: &str) -> Result<Acceptor, RunError> {
    crate::listener::https::acceptor(i, &reloader.snapshots, None)
        .map_err(|e| RunError::Tls(format!("{name}: {e}")))
}

/// One pingora service: `app` on `socket`.
fn listen<A: ServerApp + Send + Sync + 'static>(
    server: &mut Server,
    name: String,
    app: A,
    socket: ListenerConfig,
) {
    let mut svc = Service::new(name, app);
    svc.add_listener(socket);
    server.add_service(svc);
}

/// Loads the config and serves it. Returns only on a start-up error; after start the
/// process exits when pingora's signal handling says so.
///
/// With `upgrade`, the listening sockets are taken over from a running Portico (pingora's
/// graceful upgrade): this process waits on `mesh.upgradeSocket` until the old one, sent
/// SIGQUIT, hands them over; no connection is refused in between.
pub fn run(
    sources: &crate::config::Sources,
    threads: usize,
    upgrade: bool,
    work_stealing: bool,
    fast_path: bool,
) -> Result<(), RunError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    raise_open_files_limit();
    let reloader = Arc::new(Reloader::start(sources).map_err(RunError::Config)?);
    let snapshot = reloader.snapshots.load_full();

    let mut conf = ServerConf {
        threads: threads.max(1),
        // pingora's grace period is whole seconds: a part second rounds up, so that
        // `drainDuration = "500ms"` drains for 1 s rather than not at all.
        grace_period_seconds: Some(whole_seconds_up(snapshot.settings.drain_duration)),
        graceful_shutdown_timeout_seconds: Some(1),
        // Without stealing each worker thread runs its own single-threaded runtime and a
        // connection stays where it was accepted (pingora spreads accepts at random): less
        // cross-thread wake-up traffic per request, as NGINX/Envoy workers.
        work_stealing,
        ..ServerConf::default()
    };
    // Retries are Portico's decision (see proxy::fail_to_connect); this is only the cap.
    conf.max_retries = 16;
    conf.upgrade_sock = snapshot
        .settings
        .upgrade_socket
        .to_string_lossy()
        .into_owned();
    // pingora binds listeners inside its service threads and panics there on failure, so
    // a port already in use is found here first and stops the start with a clear error.
    // The probes stay open until all are made, so two of our own addresses that overlap
    // are caught too. (An upgrade takes the sockets over from the running process, which
    // holds them.)
    if !upgrade {
        let mut probes = Vec::new();
        for addr in snapshot
            .listeners
            .iter()
            .map(|l| (l.shape().to_string(), l.addr))
            .chain(std::iter::once((
                "admin API".to_string(),
                snapshot.settings.admin,
            )))
        {
            let probe = std::net::TcpListener::bind(addr.1).map_err(|e| {
                RunError::Bind(format!("cannot listen on {} ({}): {e}", addr.1, addr.0))
            })?;
            probes.push(probe);
        }
        exit_when_a_listener_fails();
    }
    let opt = pingora::server::configuration::Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();
    let server_conf = server.configuration.clone();

    let h2_idle = snapshot.settings.downstream.idle_timeout;
    for (i, l) in snapshot.listeners.iter().enumerate() {
        let name = format!("listener {}", l.shape());
        let cycle = RequestCycle::new(i, l.tls, reloader.snapshots.clone());
        let kind = Kind::of(l);
        // No pingora L4 buffers, on any kind: Portico reads and writes every accepted
        // socket itself, with its own buffers (the fast path's, rustls', the tunnel
        // relay's), so they would only copy every byte once more. Pingora's read buffer is
        // 64 KiB per connection, its pages touched as far as the reads went and held
        // while the connection idles; its write buffer (1 460 bytes) only merged the head
        // and body of a response pingora answers after a handover, and rustls hands each
        // write's records over in one vectored write anyway (#28).
        let socket =
            ListenerConfig::tcp(l.addr.to_string()).l4_buffer(L4BufferSettings::unbuffered());
        match kind {
            Kind::Tcp { terminates_https } => {
                let terminate = if terminates_https {
                    Some(https_app(i, l, &reloader, &server_conf, cycle, fast_path)?)
                } else {
                    None
                };
                let app = crate::l4::L4Service {
                    listener: i,
                    snapshots: reloader.snapshots.clone(),
                    terminate,
                    connections: crate::listener::ConnectionLimit::new(l.shape().to_string()),
                };
                listen(&mut server, name, app, socket);
            }
            Kind::ForwardProxy => {
                let mut cycle = cycle;
                cycle.forward_proxy = true;
                // CONNECT needs its own accept path (see egress::forward); other requests
                // go through the HTTP/1.1 front to pingora's cycle.
                let http = pingora_cycle(&server_conf, cycle, false, h2_idle);
                let app = crate::egress::forward::ForwardProxy {
                    front: Arc::new(front(i, l, &reloader, http.clone(), false)),
                    http,
                    snapshots: reloader.snapshots.clone(),
                };
                listen(&mut server, name, app, socket);
            }
            Kind::Https => {
                // A plain TCP listener: the app does the handshake with Portico's own TLS
                // config.
                let app = https_app(i, l, &reloader, &server_conf, cycle, fast_path)?;
                listen(&mut server, name, app, socket);
            }
            Kind::Http => {
                let http = pingora_cycle(&server_conf, cycle, l.h2c, h2_idle);
                let app = front(i, l, &reloader, http, fast_path);
                listen(&mut server, name, app, socket);
            }
        }
        tracing::info!(listener = %l.shape(), kind = ?kind, fast_path, "listening");
    }

    let mut admin = Service::new(
        "admin".to_string(),
        HttpServer::new_app(Admin {
            reloader: reloader.clone(),
            started: std::time::Instant::now(),
        }),
    );
    admin.threads = Some(1);
    admin.add_tcp(&snapshot.settings.admin.to_string());
    tracing::info!(address = %snapshot.settings.admin, "admin API");
    if !snapshot.settings.admin.ip().is_loopback() && snapshot.settings.admin_token.is_none() {
        tracing::warn!(
            address = %snapshot.settings.admin,
            "the admin API listens beyond loopback without mesh.adminTokenFile: whoever reaches it can read the config and POST /reload"
        );
    }
    server.add_service(admin);

    let dns = background_service(
        "egress dns",
        crate::egress::dns::Refresher {
            snapshots: reloader.snapshots.clone(),
        },
    );
    server.add_service(dns);

    let acme = background_service(
        "acme",
        crate::tls::acme::manager::Manager {
            reloader: reloader.clone(),
        },
    );
    server.add_service(acme);
    let lists = background_service(
        "access lists",
        crate::policy::access::Refresher {
            snapshots: reloader.snapshots.clone(),
        },
    );
    server.add_service(lists);
    let jwks = background_service(
        "jwks",
        crate::policy::jwks::Refresher {
            snapshots: reloader.snapshots.clone(),
        },
    );
    server.add_service(jwks);

    let watcher = background_service("config watcher", Watcher { reloader });
    server.add_service(watcher);

    tracing::info!(
        generation = snapshot.generation,
        summary = %snapshot.summary,
        "portico started"
    );
    drop(snapshot);
    server.run(pingora::server::RunArgs::default());
    // pingora has stopped the services (after the grace period, or at once on SIGINT):
    // the lines logged last wait in the workers' buffers; write them before exiting.
    if let Some(sink) = crate::telemetry::access_log::Sink::get() {
        if !sink.flush(std::time::Duration::from_secs(5)) {
            tracing::warn!("the access log writer did not finish within 5 s");
        }
    }
    std::process::exit(0)
}

/// `d` in whole seconds, rounded up.
fn whole_seconds_up(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// pingora opens each listener inside its service thread and, when that fails (the port
/// taken by another process between the check in [`run`] and pingora's own bind/listen),
/// panics in that thread while the rest of the process runs on without the port: the
/// admin API answers, `/ready` never does. On a fresh start a gateway that is up but not
/// listening is worse than one that stops, so that panic ends the process with exit
/// status 1 and the reason, for the supervisor (systemd's `Restart=`, a Kubernetes
/// restart) to act on. Not during an upgrade: the old process has handed over its sockets
/// and is leaving, and the listeners that did open keep serving.
fn exit_when_a_listener_fails() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("Failed to build listeners") {
            let thread = std::thread::current();
            let service = thread.name().unwrap_or("listener");
            tracing::error!(service, error = message, "cannot listen; stopping");
            eprintln!("portico: {service}: cannot listen: {message}");
            eprintln!("portico: stopped");
            std::process::exit(1);
        }
        default_hook(info);
    }));
}

/// Raises the soft limit on open files to the hard one, as Go programs and NGINX's
/// `worker_rlimit_nofile` do: every client connection is a descriptor (two when proxied),
/// and the common soft default of 1024 would cap a gateway at a few hundred clients
/// whatever the hard limit allows. Under the packaged systemd unit both are
/// `LimitNOFILE` already (and its seccomp filter refuses the call), so nothing changes.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= hard {
        tracing::debug!(open_files = soft, "open files limit");
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => tracing::info!(from = soft, to = hard, "raised the open files limit"),
        Err(e) => tracing::warn!(
            limit = soft,
            hard_limit = hard,
            error = %e,
            "could not raise the open files limit: at most this many connections"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::whole_seconds_up;
    use std::time::Duration;

    #[test]
    fn drain_seconds_round_up() {
        assert_eq!(whole_seconds_up(Duration::ZERO), 0);
        assert_eq!(whole_seconds_up(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds_up(Duration::from_millis(500)), 1);
        assert_eq!(whole_seconds_up(Duration::from_secs(1)), 1);
        assert_eq!(whole_seconds_up(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds_up(Duration::from_secs(5)), 5);
    }
}
