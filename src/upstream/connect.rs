//! A new upstream TCP connection, made one way for every upstream connection Portico
//! opens: within the cluster's connect timeout, `TCP_NODELAY`, the cluster's PROXY header
//! first (`proxyProtocol`), then its `tcpKeepalive`. The fast codecs, the L4 proxy and the
//! forward proxy's tunnels call [`connect`]; pingora's connector (for pingora's request
//! cycle, and the mirror's copies to clusters with TLS origination or h2c) calls it
//! through [`PingoraTcp`], its `custom_l4` step, and then does only what comes after TCP
//! (TLS, h2).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::protocols::TcpKeepalive;
use pingora_error::{Error, ErrorType};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::proxy_protocol::Header;
use super::ClusterSettings;

/// Connects to `addr` as the cluster's settings say, writing `proxy` (the cluster's PROXY
/// protocol header, `Cluster::proxy_header`) before anything else. A timeout is an
/// `io::ErrorKind::TimedOut`.
pub async fn connect(
    addr: SocketAddr,
    settings: &ClusterSettings,
    proxy: Option<&Header>,
) -> io::Result<TcpStream> {
    open(
        addr,
        settings.connect_timeout,
        settings.tcp_keepalive.as_ref(),
        proxy,
    )
    .await
}

async fn open(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: Option<&TcpKeepalive>,
    proxy: Option<&Header>,
) -> io::Result<TcpStream> {
    let connect = async {
        let mut io = TcpStream::connect(addr).await?;
        // Before the header: what follows it must not wait for its ACK.
        let _ = io.set_nodelay(true);
        if let Some(h) = proxy {
            io.write_all(&h.encode()).await?;
        }
        Ok::<_, io::Error>(io)
    };
    let io = match tokio::time::timeout(timeout, connect).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {timeout:?}"),
            ))
        }
    };
    if let Some(k) = keepalive {
        // `connectionPool.tcp.tcpKeepalive`.
        let probes = socket2::TcpKeepalive::new()
            .with_time(k.idle)
            .with_interval(k.interval)
            .with_retries(u32::try_from(k.count).unwrap_or(u32::MAX));
        let _ = socket2::SockRef::from(&io).set_tcp_keepalive(&probes);
    }
    Ok(io)
}

/// [`connect`] as pingora's connector's TCP step (`PeerOptions::custom_l4`): every
/// connection pingora's connector opens goes through it, so a connect timeout,
/// keep-alive and a PROXY header mean the same on every path. The PROXY header stays in
/// the peer's pool key too (`PeerOptions::proxy_protocol_header`, vendor/README.md):
/// a connection that named one client is reused only for that client.
#[derive(Debug)]
pub struct PingoraTcp {
    timeout: Duration,
    keepalive: Option<TcpKeepalive>,
    proxy: Option<Header>,
}

impl PingoraTcp {
    pub fn new(settings: &ClusterSettings, proxy: Option<Header>) -> PingoraTcp {
        PingoraTcp {
            timeout: settings.connect_timeout,
            keepalive: settings.tcp_keepalive.clone(),
            proxy,
        }
    }
}

#[async_trait::async_trait]
impl pingora::connectors::L4Connect for PingoraTcp {
    async fn connect(&self, addr: &PingoraAddr) -> pingora_error::Result<Stream> {
        let Some(&inet) = addr.as_inet() else {
            return Error::e_explain(ErrorType::ConnectError, "not an IP address");
        };
        open(
            inet,
            self.timeout,
            self.keepalive.as_ref(),
            self.proxy.as_ref(),
        )
        .await
        .map(Stream::from)
        .map_err(|e| {
            // The error types pingora's own TCP connect gives, which its retry rules
            // and `RequestCycle::fail_to_proxy` read.
            let etype = match e.kind() {
                io::ErrorKind::ConnectionRefused => ErrorType::ConnectRefused,
                io::ErrorKind::TimedOut => ErrorType::ConnectTimedout,
                io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable => {
                    ErrorType::ConnectNoRoute
                }
                _ => ErrorType::ConnectError,
            };
            Error::because(etype, format!("Fail to connect to {inet}"), e)
        })
    }
}
