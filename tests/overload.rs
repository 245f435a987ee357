//! The process-wide connection cap (`mesh.downstream.globalMaxConnections`, Envoy's overload
//! manager's `global_downstream_max_connections`): at the cap a new connection takes the
//! place of the longest-idle keep-alive connection, and is closed at once only when none is
//! idle; a connection in the middle of a request is never the one closed. A real Portico
//! holding a few thousand real client connections. Runs through whichever codec the
//! environment chooses (`PORTICO_NO_FAST_PATH=true`: pingora's cycle, whose connections
//! wait for their next request in the same front).

mod support;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::*;

fn config(http: u16, admin: u16, cap: usize, echo: &Echo) -> String {
    format!(
        r#"{mesh}
[mesh.downstream]
globalMaxConnections = {cap}

[[gateways]]
name = "gw"
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "all"
hosts = ["*"]
gateways = ["gw"]
[[virtualServices.http]]
{route}
{upstreams}"#,
        mesh = mesh_config(admin),
        route = route_to("v1"),
        upstreams = upstreams_config(&[("v1", echo.port())]),
    )
}

/// A connection that has had one request answered and now waits, idle.
fn answered(port: u16, path: &str) -> BufReader<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut r = BufReader::new(s);
    r.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .unwrap();
    let resp = read_response(&mut r, "GET").expect("answered");
    assert_eq!(resp.status, 200, "{path}");
    r
}

/// Another request on `c`, if it is still open.
fn again(c: &mut BufReader<TcpStream>, path: &str) -> Option<u16> {
    c.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .ok()?;
    read_response(c, "GET").ok().map(|r| r.status)
}

/// Whether the server closed `c` (EOF or reset) within `within`.
fn closed_within(c: &mut BufReader<TcpStream>, within: Duration) -> bool {
    c.get_mut().set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 1];
    let closed = match c.get_mut().read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    c.get_mut().set_read_timeout(None).unwrap();
    closed
}

/// Which of `conns` the server has closed by now, once as many as `expected` are seen
/// closed (or 10 s passed).
fn closed_ones(conns: &mut [BufReader<TcpStream>], expected: usize) -> Vec<usize> {
    let closed_now = |conns: &mut [BufReader<TcpStream>]| -> Vec<usize> {
        let mut closed = Vec::new();
        for (i, c) in conns.iter_mut().enumerate() {
            c.get_mut().set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            match c.get_mut().read(&mut byte) {
                Ok(0) => closed.push(i),
                Ok(_) => panic!("connection {i}: bytes nobody asked for"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => closed.push(i),
            }
            c.get_mut().set_nonblocking(false).unwrap();
        }
        closed
    };
    let mut closed = Vec::new();
    wait_until(Duration::from_secs(10), || {
        closed = closed_now(conns);
        closed.len() >= expected
    });
    closed
}

fn overload(portico: &Portico, action: &str) -> usize {
    metric_sum(
        &portico.metrics(),
        "portico_overload_connections_total",
        &format!("action=\"{action}\""),
    )
    .unwrap_or(0.0) as usize
}

#[test]
fn at_the_cap_new_connections_take_the_places_of_idle_ones_and_busy_ones_keep_working() {
    const CAP: usize = 2000;
    const NEW: usize = 300;
    let echo = Echo::start("v1");
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let portico = Portico::start(dir.path(), &config(http, free_port(), CAP, &echo));

    // An active client, then idle ones up to the cap.
    let mut active = answered(http, "/active/0");
    let mut idle: Vec<BufReader<TcpStream>> = (1..CAP)
        .map(|i| answered(http, &format!("/idle/{i}")))
        .collect();
    assert_eq!(overload(&portico, "idle_closed"), 0, "below the cap");
    assert_eq!(again(&mut active, "/active/1"), Some(200));

    // Each new connection past the cap is answered; an idle one closes for each. The
    // active client keeps working throughout (its last request was the latest, so it is
    // idle the shortest time and closed last).
    let mut fresh = Vec::new();
    for i in 0..NEW {
        fresh.push(answered(http, &format!("/new/{i}")));
        if i % 25 == 0 {
            assert_eq!(again(&mut active, "/active/again"), Some(200), "at {i}");
        }
    }
    let settled = wait_until(Duration::from_secs(10), || {
        overload(&portico, "idle_closed") >= NEW
    });
    assert!(settled, "{} idle closed", overload(&portico, "idle_closed"));
    assert_eq!(
        overload(&portico, "refused"),
        0,
        "none refused: idle ones made room"
    );
    let closed = closed_ones(&mut idle, NEW);
    assert_eq!(closed.len(), NEW, "one idle connection closed per new one");
    // Longest idle first, per worker thread: the ones closed are among the oldest.
    let newest_closed = *closed.last().unwrap();
    assert!(
        newest_closed < CAP / 2,
        "the closed ones are the longest idle: {closed:?}"
    );
    // The survivors, the new ones and the active one all still serve.
    let survivor = idle.len() - 1;
    assert_eq!(again(&mut idle[survivor], "/idle/again"), Some(200));
    assert_eq!(again(&mut fresh[0], "/new/again"), Some(200));
    assert_eq!(again(&mut active, "/active/last"), Some(200));
    let active_now = metric_sum(
        &portico.metrics(),
        "portico_listener_connections_active",
        "",
    )
    .unwrap_or(0.0) as usize;
    assert_eq!(active_now, CAP, "the process holds its cap, no more");
    assert!(portico.log().contains("process at its connection limit"));
}

#[test]
fn at_the_cap_with_no_idle_connection_a_new_one_is_closed_and_busy_ones_finish() {
    const CAP: usize = 40;
    let echo = Echo::start("v1");
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let portico = Portico::start(dir.path(), &config(http, free_port(), CAP, &echo));

    // Every place taken by a connection in the middle of sending its request head.
    let mut busy: Vec<BufReader<TcpStream>> = (0..CAP)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", http)).unwrap();
            s.write_all(format!("GET /busy/{i} HTTP/1.1\r\nHost: t\r\n").as_bytes())
                .unwrap();
            BufReader::new(s)
        })
        .collect();
    // All are accepted (the admin API counts them) before the next one comes.
    let all_in = wait_until(Duration::from_secs(10), || {
        metric_sum(
            &portico.metrics(),
            "portico_listener_connections_active",
            "",
        ) == Some(CAP as f64)
    });
    assert!(all_in);
    let s = TcpStream::connect(("127.0.0.1", http)).unwrap();
    let mut extra = BufReader::new(s);
    assert!(
        closed_within(&mut extra, Duration::from_secs(5)),
        "nothing idle to close: the new connection is closed"
    );
    assert!(overload(&portico, "refused") >= 1);
    assert_eq!(
        overload(&portico, "idle_closed"),
        0,
        "no busy one was closed"
    );

    // The busy ones finish their requests; once one is idle, a new connection takes its
    // place.
    for (i, c) in busy.iter_mut().enumerate() {
        c.get_mut().write_all(b"\r\n").unwrap();
        let resp = read_response(c, "GET").expect("busy one answered");
        assert_eq!(resp.status, 200, "{i}");
    }
    let mut newcomer = answered(http, "/newcomer");
    assert_eq!(again(&mut newcomer, "/newcomer/again"), Some(200));
    assert!(overload(&portico, "idle_closed") >= 1);
    let shed = overload(&portico, "idle_closed");
    assert_eq!(closed_ones(&mut busy, shed).len(), shed);
}
