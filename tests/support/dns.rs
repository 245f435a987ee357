//! A small authoritative DNS server on 127.0.0.1 (UDP) for egress tests: answers A queries
//! for the names it is given, with a chosen TTL; can be switched to answer SERVFAIL to
//! everything. Counts queries per name so tests can see when a resolver asked again.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Default)]
struct Zone {
    records: HashMap<String, Vec<Ipv4Addr>>,
    ttl: u32,
    failing: bool,
    queries: HashMap<String, usize>,
}

pub struct DnsServer {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
}

impl DnsServer {
    /// Starts answering with TTL `ttl` seconds.
    pub fn start(ttl: u32) -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("dns bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone {
            ttl,
            ..Zone::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let zone = zone.clone();
            let stop = stop.clone();
            thread::Builder::new()
                .name("test-dns".into())
                .spawn(move || {
                    let mut buf = [0u8; 512];
                    while !stop.load(Ordering::SeqCst) {
                        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                            continue;
                        };
                        if let Some(reply) = answer(&buf[..n], &zone) {
                            let _ = socket.send_to(&reply, peer);
                        }
                    }
                })
                .expect("spawn dns thread");
        }
        DnsServer { addr, zone, stop }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `name` (no trailing dot) answers with `ips`.
    pub fn set(&self, name: &str, ips: &[Ipv4Addr]) {
        self.zone
            .lock()
            .unwrap()
            .records
            .insert(name.to_ascii_lowercase(), ips.to_vec());
    }

    /// From now on every query gets SERVFAIL (`true`) or a normal answer (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.zone.lock().unwrap().failing = failing;
    }

    /// Queries seen for `name` (any type).
    pub fn queries(&self, name: &str) -> usize {
        self.zone
            .lock()
            .unwrap()
            .queries
            .get(&name.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The reply to one query, or `None` for a packet that is not a query we understand.
fn answer(q: &[u8], zone: &Mutex<Zone>) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // The question: labels, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question_end = i + 4;
    let name = labels.join(".");
    let mut z = zone.lock().unwrap();
    *z.queries.entry(name.clone()).or_insert(0) += 1;
    let (rcode, ips) = if z.failing {
        (2u8, Vec::new()) // SERVFAIL
    } else {
        match z.records.get(&name) {
            Some(ips) if qtype == 1 => (0, ips.clone()),
            Some(_) => (0, Vec::new()), // the name exists; no records of that type
            None => (3, Vec::new()),    // NXDOMAIN
        }
    };
    let ttl = z.ttl;
    drop(z);
    let mut r = Vec::with_capacity(question_end + ips.len() * 16);
    r.extend_from_slice(&q[0..2]); // id
    r.push(0x84 | (q[2] & 0x01)); // QR, AA, RD copied
    r.push(0x80 | rcode); // RA, rcode
    r.extend_from_slice(&[0, 1]); // QDCOUNT
    r.extend_from_slice(&(ips.len() as u16).to_be_bytes()); // ANCOUNT
    r.extend_from_slice(&[0, 0, 0, 0]); // NSCOUNT, ARCOUNT
    r.extend_from_slice(&q[12..question_end]);
    for ip in ips {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]); // name pointer, type A, class IN
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&[0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}
