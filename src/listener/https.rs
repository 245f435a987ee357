//! The accept path of an HTTPS listener (and of the HTTPS side of a passthrough port):
//! Portico's own rustls `ServerConfig`, the handshake under `mesh.tlsHandshakeTimeout`, then
//! the HTTP proxy on the TLS stream (the fast path, for HTTP/1.1 or h2, as ALPN chose).
//!
//! pingora's `TlsSettings` builds a `ServerConfig` it does not let us touch, and its listener
//! builds the acceptor itself. So the listener here is plain TCP and this app does the
//! handshake with an acceptor built from the same `TlsSettings` (certificates by SNI, ALPN,
//! the SNI callback) whose config is then adjusted by [`tune`]:
//!
//! - **Session resumption by stateless tickets** (as NGINX's `ssl_session_tickets on`, its
//!   default). rustls' default keeps resumption state in a 256-entry in-memory cache and
//!   sends 2 tickets per handshake, so only the last ~128 handshakes can ever be resumed: at
//!   a thousand handshakes per second a ticket is evicted before most clients come back.
//!   A ticket encrypted with a process-local key (rustls' ring `Ticketer`: ChaCha20-Poly1305,
//!   a new key every 6 hours, the previous one still accepted, so a ticket lives at most
//!   12 hours) has no such limit and needs no cache. Resumption still does a full
//!   (EC)DHE exchange (PSK_DHE_KE; rustls never accepts PSK-only), and 0-RTT stays off.
//!   Keys are per listener and per process: a restart or an upgrade means full handshakes.
//!
//! A listener with a mutual-TLS server (`tls::client_auth`) peeks each ClientHello's SNI
//! first (within the same handshake timeout) and hands the connection to that server's
//! acceptor: the same resolver, ALPN and tuning, its own client verifier and ticket key.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::tls::{Acceptor, TlsSettings};
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{Ssl, Stream};
use pingora::server::ShutdownWatch;
use pingora_proxy::HttpProxy;

use crate::protocol::fast::HttpFront;
use crate::proxy::RequestCycle;
use crate::snapshot::Snapshot;

/// TLS 1.3 tickets sent after a handshake (rustls' default, and OpenSSL's after a full
/// handshake): a client can open two connections at once and resume both.
pub const TLS13_TICKETS: usize = 2;

/// The acceptor of listener `listener`: certificates chosen by SNI from the current
/// Snapshot, h2 by ALPN, stateless tickets ([`tune`]); with `auth`, client certificates
/// asked for and verified by that server's policy.
pub fn acceptor(
    listener: usize,
    snapshots: &Arc<ArcSwap<Snapshot>>,
    auth: Option<&crate::tls::client_auth::ClientAuth>,
) -> Result<Acceptor, String> {
    let by = auth.map(|a| a.by.clone()).unwrap_or_else(|| Arc::from([]));
    let mut tls = TlsSettings::with_callbacks(Box::new(crate::server::KeepTls { by }))
        .map_err(|e| e.to_string())?;
    tls.set_cert_resolver(Arc::new(crate::tls::SniResolver {
        listener,
        snapshots: snapshots.clone(),
    }));
    if let Some(a) = auth {
        tls.set_client_cert_verifier(a.verifier.clone());
    }
    tls.enable_h2();
    let mut acceptor = tls.build();
    tune(&mut acceptor)?;
    Ok(acceptor)
}

/// Switches the acceptor's `ServerConfig` to stateless session tickets (see the module doc).
pub fn tune(acceptor: &mut Acceptor) -> Result<(), String> {
    let mut config = rustls::ServerConfig::clone(acceptor.acceptor.config());
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| format!("cannot make a TLS session ticket key: {e}"))?;
    config.send_tls13_tickets = TLS13_TICKETS;
    // Offered last, so only a client that asks for nothing else (a CA validating
    // TLS-ALPN-01) gets it; the resolver then serves the challenge certificate.
    config
        .alpn_protocols
        .push(crate::tls::acme::ACME_TLS_ALPN.to_vec());
    acceptor.acceptor = pingora::tls::TlsAcceptor::from(Arc::new(config));
    Ok(())
}

/// Terminates TLS and serves HTTP: the app of an HTTPS listener.
pub struct Https {
    pub acceptor: Acceptor,
    pub proxy: Arc<HttpProxy<RequestCycle>>,
    /// Portico's HTTP/1.1 front, for connections that did not choose h2 (it holds the
    /// listener's connection cap too).
    pub front: Arc<HttpFront>,
    /// h2 streams go through the fast path (else pingora's cycle serves h2 connections).
    pub fast_h2: bool,
    pub snapshots: Arc<ArcSwap<Snapshot>>,
}

impl Https {
    /// Handshake within `timeout`, then HTTP on the TLS stream until the client is done.
    pub async fn serve(
        &self,
        io: Stream,
        timeout: Duration,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // The acceptor needs the concrete socket type, which a plain TCP listener hands us.
        let l4 = match io.into_any().downcast::<L4Stream>() {
            Ok(l4) => l4,
            Err(_) => {
                tracing::error!("HTTPS: the accepted stream is not a TCP stream");
                return None;
            }
        };
        // The handshake's and h2's states are boxed: held inline, their size would stay
        // with every HTTP/1.1 connection for its whole life (a future is as large as its
        // largest state), idle keep-alive ones included. So is the TLS stream, as soon as
        // it is made: `tls` is borrowed below, and a borrowed local keeps its place in the
        // future to the end even after it is moved out; unboxed, the ~4.7 KiB stream
        // (rustls' connection state) was held twice per connection (#28).
        let handshake = Box::pin(async {
            let mut l4 = l4;
            let auth = self.client_auth(&mut l4).await?;
            let acceptor = match &auth {
                None => &self.acceptor,
                Some(a) => self.mutual_acceptor(a)?,
            };
            acceptor
                .tls_handshake(*l4)
                .await
                .map(Box::new)
                .map_err(|e| e.to_string())
        });
        let tls = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                return None;
            }
            Err(_) => {
                tracing::debug!(?timeout, "TLS handshake timed out");
                return None;
            }
        };
        if let Some(pingora::protocols::ALPN::Custom(_)) = tls.selected_alpn_proto() {
            // `acme-tls/1`: the handshake was the validation; nothing more is said.
            tracing::debug!("TLS-ALPN-01 validation handshake answered");
            return None;
        }
        if tls.selected_alpn_proto() == Some(pingora::protocols::ALPN::H2) {
            if self.fast_h2 {
                Box::pin(self.front.serve_h2(tls, shutdown)).await;
                return None;
            }
            return self.proxy.process_new(tls, shutdown).await;
        }
        self.front.serve_connection(tls, shutdown).await
    }

    /// The client-certificate policy of the server the ClientHello names, on a listener
    /// that has a mutual-TLS server (the SNI is peeked, never consumed).
    async fn client_auth(
        &self,
        l4: &mut Box<L4Stream>,
    ) -> Result<Option<Arc<crate::tls::client_auth::ClientAuth>>, String> {
        let store = {
            let snapshot = self.snapshots.load();
            match snapshot
                .listeners
                .get(self.front.listener)
                .and_then(|l| l.client_auth.clone())
            {
                Some(store) => store,
                None => return Ok(None),
            }
        };
        let sni = crate::l4::service::peek_sni(l4.as_mut()).await?;
        Ok(store.resolve(sni.as_deref()).cloned())
    }

    /// The acceptor of a mutual-TLS server, built on its first handshake.
    fn mutual_acceptor<'a>(
        &self,
        auth: &'a crate::tls::client_auth::ClientAuth,
    ) -> Result<&'a Acceptor, String> {
        if let Some(a) = auth.acceptor.get() {
            return Ok(a);
        }
        let built = acceptor(self.front.listener, &self.snapshots, Some(auth))?;
        // Another handshake may have built it meanwhile; either is as good.
        let _ = auth.acceptor.set(built);
        auth.acceptor
            .get()
            .ok_or_else(|| "no acceptor for the mutual-TLS server".to_string())
    }

    /// Tells open keep-alive connections to stop at shutdown, as pingora does for its own
    /// HTTP services.
    pub async fn cleanup(&self) {
        ServerApp::cleanup(self.proxy.as_ref()).await;
    }
}

impl Https {
    /// Serves an admitted connection to its end: the handshake, then its requests.
    pub async fn serve_to_end(
        &self,
        io: Stream,
        handshake_timeout: std::time::Duration,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut io = self.serve(io, handshake_timeout, shutdown).await?;
        // A stream handed back is this connection, past its handshake: its next requests
        // are the HTTP/1.1 front's (not admitted or handshaken again).
        loop {
            io = self.front.serve_connection(io, shutdown).await?;
        }
    }
}

#[async_trait]
impl ServerApp for Https {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let app = self.clone();
        let shutdown = shutdown.clone();
        crate::listener::own_task(async move {
            let (_slot, io) = crate::listener::accept(
                &app.front.connections,
                &app.snapshots,
                app.front.listener,
                io,
            )
            .await?;
            let timeout = app.snapshots.load().settings.tls_handshake_timeout;
            app.serve_to_end(io, timeout, &shutdown).await
        });
        None
    }

    async fn cleanup(&self) {
        Https::cleanup(self).await;
    }
}
