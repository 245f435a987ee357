//! Process lifecycle: systemd notifications on a real notify socket, and SIGTERM draining
//! requests that are in flight.

mod support;

use std::os::unix::net::UnixDatagram;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const TEMPLATE: &str = r#"
[mesh]
admin = "127.0.0.1:@ADMIN@"
reloadPollInterval = "1h"
drainDuration = "@DRAIN@"

[[gateways]]
name = "edge"
[[gateways.servers]]
port = { number = @HTTP@, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "all"
hosts = ["*"]
gateways = ["edge"]
[[virtualServices.http]]
@to(v1)@
"#;

fn config(admin: u16, http: u16, echo: u16, drain: &str) -> String {
    let mut c = render(
        TEMPLATE,
        &[
            ("ADMIN", admin.to_string()),
            ("HTTP", http.to_string()),
            ("DRAIN", drain.to_string()),
        ],
    );
    c.push_str(&upstreams_config(&[("v1", echo)]));
    c
}

/// Reads notify messages until one contains `want`, or panics after `timeout`.
fn expect_notify(sock: &UnixDatagram, want: &str, timeout: Duration, seen: &mut Vec<String>) {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let hit = msg.lines().any(|l| l == want);
            seen.push(msg);
            if hit {
                return;
            }
        }
    }
    panic!("no {want} on the notify socket within {timeout:?}; got {seen:?}");
}

#[test]
fn systemd_notifications_reach_the_notify_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let echo = Echo::start("v1");
    let (admin, http) = (free_port(), free_port());
    let mut portico = Portico::start_with_env(
        tmp.path(),
        &config(admin, http, echo.port(), "1s"),
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let mut seen = Vec::new();
    expect_notify(&sock, "READY=1", Duration::from_secs(10), &mut seen);
    assert_eq!(http_get(http, "x.test", "/").status, 200);

    portico.send_signal_hup();
    expect_notify(&sock, "RELOADING=1", Duration::from_secs(10), &mut seen);
    expect_notify(&sock, "READY=1", Duration::from_secs(10), &mut seen);

    portico.send_signal("TERM");
    expect_notify(&sock, "STOPPING=1", Duration::from_secs(10), &mut seen);
    let status = portico
        .wait_exit(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
}

/// Whether a client's error is the server closing the connection, as opposed to the
/// client giving up waiting (its read timeout).
fn closed_by_the_server(e: &std::io::Error) -> bool {
    !matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A slow request in flight, on a thread: `GET /sleep/MS`.
fn slow_request(http: u16, ms: u64) -> thread::JoinHandle<std::io::Result<Response>> {
    thread::spawn(move || {
        try_http_request(http, "GET", "x.test", &format!("/sleep/{ms}"), &[], b"")
    })
}

#[test]
fn sigterm_refuses_new_connections_finishes_requests_in_flight_and_cuts_off_at_the_drain() {
    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("v1");
    let (admin, http) = (free_port(), free_port());
    let drain = Duration::from_secs(4);
    let mut portico = Portico::start(tmp.path(), &config(admin, http, echo.port(), "4s"));

    // Eight requests the upstream holds 2 s (longer than the 1 s pingora gives its runtimes
    // after the drain, so only the drain lets them finish), and one it holds past the drain.
    let short: Vec<_> = (0..8).map(|_| slow_request(http, 2000)).collect();
    let long = slow_request(http, 25_000);
    assert!(
        wait_until(Duration::from_secs(5), || echo.count() >= 9),
        "the slow requests reached the upstream"
    );
    let sent_term = Instant::now();
    portico.send_signal("TERM");
    // New connections are refused while the process still runs, draining.
    assert!(
        wait_until(Duration::from_secs(3), || {
            std::net::TcpStream::connect(("127.0.0.1", http)).is_err()
        }),
        "new connections are refused during the drain"
    );
    assert!(
        portico.is_running(),
        "refused while draining, not because the process is gone"
    );
    for c in short {
        let resp = c.join().unwrap().expect("in-flight request completes");
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let status = portico
        .wait_exit(drain + Duration::from_secs(10))
        .expect("exits after draining");
    assert!(status.success(), "exit status {status}");
    assert!(
        sent_term.elapsed() >= drain,
        "the drain lasts drainDuration: exited {:?} after SIGTERM",
        sent_term.elapsed()
    );
    // The request longer than the drain is cut off when the process exits, long before
    // the upstream would answer or the client would give up.
    match long.join().unwrap() {
        Ok(resp) => panic!("a request past the drain got an answer: {}", resp.status),
        Err(e) => assert!(closed_by_the_server(&e), "cut off by the gateway: {e}"),
    }
}

/// A keep-alive connection waiting for its next request is closed when the drain begins
/// (as NGINX closes its idle keep-alive connections on a graceful stop), not kept open
/// until the process exits; one busy with a request gets its answer first.
#[test]
fn sigterm_closes_idle_keep_alive_connections_when_the_drain_begins() {
    use std::io::{BufReader, Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("v1");
    let (admin, http) = (free_port(), free_port());
    let mut portico = Portico::start(tmp.path(), &config(admin, http, echo.port(), "6s"));

    let request = build_request("GET", "x.test", "/", &[], b"", false);
    let mut idle = BufReader::new(std::net::TcpStream::connect(("127.0.0.1", http)).unwrap());
    idle.get_mut().write_all(&request).unwrap();
    let first = read_response(&mut idle, "GET").expect("the first request is answered");
    assert_eq!(first.status, 200, "{}", first.text());
    let busy = slow_request(http, 1500);
    assert!(
        wait_until(Duration::from_secs(5), || echo.count() >= 2),
        "the slow request reached the upstream"
    );

    let sent_term = Instant::now();
    portico.send_signal("TERM");
    idle.get_mut()
        .set_read_timeout(Some(Duration::from_secs(4)))
        .unwrap();
    let mut rest = Vec::new();
    match idle.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "nothing but the close: {rest:?}"),
        Err(e) => assert!(
            closed_by_the_server(&e),
            "closed by the gateway, not left open: {e}"
        ),
    }
    assert!(
        portico.is_running() && sent_term.elapsed() < Duration::from_secs(4),
        "closed when the drain began ({:?} after SIGTERM), not when the process exited",
        sent_term.elapsed()
    );
    let resp = busy
        .join()
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(resp.status, 200, "{}", resp.text());
}

/// pingora's grace period counts whole seconds: a sub-second drainDuration rounds up to 1 s
/// (it was truncated to none, which cut every request in flight).
#[test]
fn a_sub_second_drain_still_lets_a_request_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("v1");
    let (admin, http) = (free_port(), free_port());
    let mut portico = Portico::start(tmp.path(), &config(admin, http, echo.port(), "800ms"));
    let client = slow_request(http, 600);
    assert!(
        wait_until(Duration::from_secs(5), || echo.count() >= 1),
        "the request reached the upstream"
    );
    portico.send_signal("TERM");
    let resp = client
        .join()
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let status = portico
        .wait_exit(Duration::from_secs(10))
        .expect("exits after draining");
    assert!(status.success(), "exit status {status}");
}

/// SIGINT does not drain: the process exits at once, cutting a request in flight, long
/// before a 30 s drainDuration would end.
#[test]
fn sigint_exits_at_once_without_draining() {
    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("v1");
    let (admin, http) = (free_port(), free_port());
    let mut portico = Portico::start(tmp.path(), &config(admin, http, echo.port(), "30s"));
    let client = slow_request(http, 20_000);
    assert!(
        wait_until(Duration::from_secs(5), || echo.count() >= 1),
        "the request reached the upstream"
    );
    portico.send_signal("INT");
    assert!(
        portico.wait_exit(Duration::from_secs(10)).is_some(),
        "SIGINT exits without the 30 s drain"
    );
    match client.join().unwrap() {
        Ok(resp) => panic!("the request in flight got an answer: {}", resp.status),
        Err(e) => assert!(closed_by_the_server(&e), "cut off by the exit: {e}"),
    }
}

#[test]
fn upgrade_hands_the_listeners_over_without_refusing_a_request() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("v1");
    let (admin, http) = (free_port(), free_port());
    let sock = tmp.path().join("upgrade.sock");
    let mut config = config(admin, http, echo.port(), "1s");
    config = config.replace(
        "[mesh]\n",
        &format!("[mesh]\nupgradeSocket = \"{}\"\n", sock.display()),
    );
    let mut old = Portico::start(tmp.path(), &config);

    // A client sends requests, new connection each time, all through the hand-over.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let client = {
        let (stop, ok) = (stop.clone(), ok.clone());
        thread::spawn(move || {
            let mut failed = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match try_http_request(http, "GET", "x.test", "/", &[], b"") {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => failed.push(format!("status {}", r.status)),
                    Err(e) => failed.push(e.to_string()),
                }
                thread::sleep(Duration::from_millis(10));
            }
            failed
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), || ok.load(Ordering::SeqCst) >= 10),
        "the old process serves the client"
    );
    // A request in flight on the old process across the hand-over.
    let in_flight = slow_request(http, 1500);
    assert!(
        wait_until(Duration::from_secs(5), || echo
            .requests()
            .iter()
            .any(|(_, path, _)| path == "/sleep/1500")),
        "the slow request reached the upstream"
    );
    let mut new = Portico::spawn_more(tmp.path(), admin, &["--upgrade"]);
    // The new process waits for the sockets on upgradeSocket; the old one, once told,
    // retries its connection there for a few seconds.
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()),
        "the new process listens on the upgrade socket:\n{}",
        new.log()
    );
    old.send_signal("QUIT");
    let resp = in_flight
        .join()
        .unwrap()
        .expect("the request in flight across the upgrade completes");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let status = old
        .wait_exit(Duration::from_secs(20))
        .expect("the old process exits");
    assert!(status.success(), "old process: {status}");
    // Only the new process can serve now.
    let after = ok.load(Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(10), || ok.load(Ordering::SeqCst)
            >= after + 10),
        "the new process serves the client:\n{}",
        new.log()
    );
    assert!(new.is_running(), "the new process serves:\n{}", new.log());
    stop.store(true, Ordering::SeqCst);
    let failed = client.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} failed requests: {:?}\n{}",
        failed.len(),
        &failed[..failed.len().min(5)],
        new.log()
    );
    assert_eq!(
        http_get(http, "x.test", "/").status,
        200,
        "served by the new process"
    );
}

/// A gateway port held by another process stops the start at once, naming the address,
/// instead of leaving a process up without that port.
#[test]
fn a_port_in_use_stops_the_start_with_its_address() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().port();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("portico.toml");
    write_atomic(&path, config(free_port(), taken, 9, "1s"));
    let (code, out) = run_cli(&["run", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("cannot listen on 127.0.0.1:{taken}"))
            && out.contains("in use")
            && out.contains("portico: not started"),
        "{out}"
    );
}

/// The port can still be taken between that check and pingora's own bind/listen, in pingora's
/// service thread (seen once in CI). The gateway then stops with the reason rather than run
/// on without the port. The failure is injected with an LD_PRELOAD shim whose `listen()`
/// refuses pingora's listeners (backlog 65535) with EADDRINUSE, as the kernel did.
#[test]
fn a_listener_lost_after_the_check_stops_the_gateway() {
    let tmp = tempfile::tempdir().unwrap();
    let shim_c = tmp.path().join("shim.c");
    let shim = tmp.path().join("shim.so");
    std::fs::write(
        &shim_c,
        r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
int listen(int fd, int backlog) {
    static int (*real)(int, int);
    if (!real) real = (int (*)(int, int))dlsym(RTLD_NEXT, "listen");
    if (backlog == 65535) { errno = EADDRINUSE; return -1; }
    return real(fd, backlog);
}
"#,
    )
    .unwrap();
    let cc = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(&shim_c)
        .arg("-ldl")
        .output()
        .expect("cc (gcc) builds the shim");
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let path = tmp.path().join("portico.toml");
    write_atomic(&path, config(free_port(), free_port(), 9, "1s"));
    let (code, text) = run_cli_env(
        &["run", "-c", path.to_str().unwrap()],
        &[("LD_PRELOAD", shim.to_str().unwrap())],
    );
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("cannot listen: Failed to build listeners")
            && text.contains("Address already in use")
            && text.contains("portico: stopped"),
        "{text}"
    );
}

/// Builds an LD_PRELOAD shim from C source `code` in `dir`; returns its path.
fn build_shim(dir: &std::path::Path, code: &str) -> std::path::PathBuf {
    let shim_c = dir.join("shim.c");
    let shim = dir.join("shim.so");
    std::fs::write(&shim_c, code).unwrap();
    let cc = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(&shim_c)
        .arg("-ldl")
        .output()
        .expect("cc (gcc) builds the shim");
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    shim
}

/// `GET /ready` answers 503 while a gateway listener is not bound yet, and 200 once it is.
/// The listener is held back by an LD_PRELOAD shim whose `listen()` on the port named in
/// `HOLD_PORT` waits until the file `HOLD_UNTIL` exists (only pingora's, backlog 65535: the
/// start-up check's probe listens too).
#[test]
fn ready_is_503_until_every_listener_is_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let shim = build_shim(
        tmp.path(),
        r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
int listen(int fd, int backlog) {
    static int (*real)(int, int);
    if (!real) real = (int (*)(int, int))dlsym(RTLD_NEXT, "listen");
    const char *port = getenv("HOLD_PORT");
    const char *gate = getenv("HOLD_UNTIL");
    struct sockaddr_in addr;
    socklen_t len = sizeof addr;
    if (backlog == 65535 && port && gate && getsockname(fd, (struct sockaddr *)&addr, &len) == 0
        && addr.sin_family == AF_INET && ntohs(addr.sin_port) == atoi(port)) {
        while (access(gate, F_OK) != 0) usleep(20000);
    }
    return real(fd, backlog);
}
"#,
    );
    let echo = Echo::start("v1");
    let (admin, http) = (free_port(), free_port());
    let gate = tmp.path().join("listen-now");
    let port = http.to_string();
    let portico = Portico::spawn_with_env(
        tmp.path(),
        &config(admin, http, echo.port(), "1s"),
        &[
            ("LD_PRELOAD", shim.to_str().unwrap()),
            ("HOLD_PORT", &port),
            ("HOLD_UNTIL", gate.to_str().unwrap()),
        ],
    );
    let ready = || try_http_request(admin, "GET", "127.0.0.1", "/ready", &[], b"").ok();
    let mut last = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            last = ready().map(|r| (r.status, r.text()));
            last.is_some()
        }),
        "the admin API answers:\n{}",
        portico.log()
    );
    let (status, body) = last.unwrap();
    assert_eq!(status, 503, "not ready while {http} is not bound: {body}");
    assert!(body.contains(&format!("127.0.0.1:{http}")), "{body}");
    assert_eq!(
        portico.admin_get("/healthz").status,
        200,
        "alive all the same"
    );
    std::fs::write(&gate, "").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || ready().map(|r| r.status)
            == Some(200)),
        "ready once the listener is bound:\n{}",
        portico.log()
    );
    assert_eq!(http_get(http, "x.test", "/").status, 200);
}
