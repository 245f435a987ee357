//! A new upstream TCP connection, made one way by every connector of Portico's own (the
//! fast codecs and the L4 proxy): within the cluster's connect timeout, `TCP_NODELAY`, the
//! cluster's PROXY header first (`proxyProtocol`), then its `tcpKeepalive`. Pingora's
//! connector does the same for pingora's request cycle and the mirror (the PROXY header by
//! the vendored `PeerOptions::proxy_protocol_header` patch, keep-alive from `PeerOptions`).

use std::io;
use std::net::SocketAddr;

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
    let connect = async {
        let mut io = TcpStream::connect(addr).await?;
        // Before the header: what follows it must not wait for its ACK.
        let _ = io.set_nodelay(true);
        if let Some(h) = proxy {
            io.write_all(&h.encode()).await?;
        }
        Ok::<_, io::Error>(io)
    };
    let io = match tokio::time::timeout(settings.connect_timeout, connect).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", settings.connect_timeout),
            ))
        }
    };
    if let Some(k) = &settings.tcp_keepalive {
        // `connectionPool.tcp.tcpKeepalive`, as pingora's connector sets it.
        let probes = socket2::TcpKeepalive::new()
            .with_time(k.idle)
            .with_interval(k.interval)
            .with_retries(u32::try_from(k.count).unwrap_or(u32::MAX));
        let _ = socket2::SockRef::from(&io).set_tcp_keepalive(&probes);
    }
    Ok(io)
}
