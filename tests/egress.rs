//! Egress: the forward proxy of an egress gateway (selector `istio = "egressgateway"`),
//! the ServiceEntry registry, `outboundTrafficPolicy`, and DNS with TTLs. Every "external"
//! host is a server on loopback, and every name is resolved by a DNS server the test runs
//! on loopback (`mesh.dnsServers`); curl is pointed at Portico with `HTTPS_PROXY` /
//! `http_proxy`, so curl itself resolves nothing.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::dns::DnsServer;
use support::*;

const LOCAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// An egress gateway on `proxy` (plain HTTP, a forward proxy), resolving through `dns`,
/// with `mode` and the given ServiceEntries.
fn egress_config(admin: u16, proxy: u16, dns: &DnsServer, mode: &str, entries: &str) -> String {
    format!(
        r#"{mesh}dnsServers = ["{dns}"]
outboundTrafficPolicy = {{ mode = "{mode}" }}

[[gateways]]
name = "egress"
selector = {{ istio = "egressgateway" }}
[[gateways.servers]]
port = {{ number = {proxy}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]
{entries}"#,
        mesh = mesh_config(admin),
        dns = dns.addr(),
    )
}

struct Curl {
    code: i32,
    stdout: String,
    stderr: String,
}

/// curl with only the given proxy variables set (and no NO_PROXY), printing the body and
/// then `\n<http_code> <http_connect>`.
fn curl(env: &[(&str, String)], args: &[&str]) -> Curl {
    let mut cmd = Command::new("curl");
    for v in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .args([
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code} %{http_connect}",
        ])
        .args(args)
        .output()
        .expect("run curl");
    Curl {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Curl {
    /// (`http_code`, `http_connect`) from the `-w` line.
    fn codes(&self) -> (String, String) {
        let last = self.stdout.lines().last().unwrap_or("");
        let mut parts = last.split(' ');
        (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        )
    }

    fn body(&self) -> &str {
        self.stdout.rsplit_once('\n').map(|(b, _)| b).unwrap_or("")
    }
}

fn metric(p: &Portico, labels: &[&str]) -> f64 {
    let text = p.metrics();
    text.lines()
        .filter(|l| l.starts_with("portico_egress_decisions_total{"))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn https_proxy_connect_reaches_a_registered_host_and_403s_the_rest() {
    let origin_dir = tempfile::tempdir().unwrap();
    let (_origin, origin_port) = https_origin(
        origin_dir.path(),
        &["secure.test", "unlisted.test"],
        "from origin",
        "",
    );
    let dns = DnsServer::start(30);
    dns.set("secure.test", &[LOCAL]);
    dns.set("unlisted.test", &[LOCAL]);

    let dir = tempfile::tempdir().unwrap();
    let proxy = free_port();
    let entries = format!(
        r#"
[[serviceEntries]]
name = "secure"
hosts = ["secure.test"]
location = "MESH_EXTERNAL"
resolution = "DNS"
ports = [{{ number = {origin_port}, name = "https", protocol = "HTTPS" }}]
"#
    );
    let gw = Portico::start(
        dir.path(),
        &egress_config(free_port(), proxy, &dns, "REGISTRY_ONLY", &entries),
    );
    let ca = origin_dir.path().join("origin.crt");
    let ca = ca.to_str().unwrap();
    let env = [("HTTPS_PROXY", format!("http://127.0.0.1:{proxy}"))];

    let ok = curl(
        &env,
        &[
            "--cacert",
            ca,
            &format!("https://secure.test:{origin_port}/"),
        ],
    );
    assert_eq!(
        ok.code,
        0,
        "curl: {} {}\n{}",
        ok.stdout,
        ok.stderr,
        gw.log()
    );
    assert_eq!(ok.codes(), ("200".into(), "200".into()), "{}", ok.stdout);
    assert_eq!(ok.body(), "from origin");
    assert!(dns.queries("secure.test") >= 1, "Portico resolved the name");

    let refused = curl(
        &env,
        &[
            "--cacert",
            ca,
            &format!("https://unlisted.test:{origin_port}/"),
        ],
    );
    assert_ne!(refused.code, 0, "the tunnel is refused: {}", refused.stdout);
    assert_eq!(
        refused.codes().1,
        "403",
        "{} {}",
        refused.stdout,
        refused.stderr
    );

    // A registered host on a port its ServiceEntry does not list is refused too.
    let other_port = curl(&env, &["--cacert", ca, "https://secure.test:1/"]);
    assert_eq!(other_port.codes().1, "403", "{}", other_port.stdout);

    // The refusal is logged with the host and the rule.
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("egress denied") && l.contains("unlisted.test"))
        .unwrap_or_else(|| panic!("no denial log line:\n{log}"));
    assert!(line.contains("REGISTRY_ONLY"), "{line}");
    assert!(line.contains("connect"), "{line}");
    assert!(log
        .lines()
        .any(|l| l.contains("egress denied") && l.contains("does not list port 1")));

    // Each tunnel is one access log line: the allowed one with its cluster and bytes.
    assert!(
        wait_until(Duration::from_secs(5), || {
            let out = gw.stdout();
            out.lines().any(|l| {
                l.contains(r#""method":"CONNECT""#)
                    && l.contains(&format!(r#""path":"secure.test:{origin_port}""#))
                    && l.contains(r#""response_code":200"#)
                    && l.contains(&format!(
                        r#""upstream_cluster":"outbound|{origin_port}||secure.test""#
                    ))
                    && !l.contains(r#""bytes_sent":0"#)
            }) && out.lines().any(|l| {
                l.contains(r#""method":"CONNECT""#)
                    && l.contains("unlisted.test")
                    && l.contains(r#""response_code":403"#)
            })
        }),
        "access log:\n{}",
        gw.stdout()
    );
    assert_eq!(
        metric(
            &gw,
            &[
                r#"decision="allowed""#,
                r#"kind="connect""#,
                r#"host="secure.test""#
            ]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &gw,
            &[
                r#"decision="denied""#,
                r#"kind="connect""#,
                r#"host="unregistered""#
            ]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &gw,
            &[
                r#"decision="denied""#,
                r#"kind="connect""#,
                r#"host="secure.test""#
            ]
        ),
        1.0
    );
    assert!(
        !gw.metrics().contains("unlisted.test"),
        "an unregistered name never becomes a label"
    );
}

#[test]
fn http_proxy_forwards_registered_plain_requests_and_502s_the_rest() {
    let echo = Echo::start("external");
    let dns = DnsServer::start(30);
    dns.set("a.wild.test", &[LOCAL]);
    dns.set("nope.test", &[LOCAL]);
    let dir = tempfile::tempdir().unwrap();
    let proxy = free_port();
    let ep = echo.port();
    let entries = format!(
        r#"
[[serviceEntries]]
name = "plain"
hosts = ["plain.test"]
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP", targetPort = {ep} }},
         {{ number = 443, name = "https", protocol = "HTTPS" }}]
endpoints = [{{ address = "127.0.0.1" }}]

[[serviceEntries]]
name = "wild"
hosts = ["*.wild.test"]
resolution = "NONE"
ports = [{{ number = {ep}, name = "http", protocol = "HTTP" }}]
"#
    );
    let gw = Portico::start(
        dir.path(),
        &egress_config(free_port(), proxy, &dns, "REGISTRY_ONLY", &entries),
    );
    let env = [("http_proxy", format!("http://127.0.0.1:{proxy}"))];

    let ok = curl(&env, &["http://plain.test/hello?x=1"]);
    assert_eq!(
        ok.codes().0,
        "200",
        "{} {}\n{}",
        ok.stdout,
        ok.stderr,
        gw.log()
    );
    let seen = echo.requests();
    let (method, path, host) = seen.last().expect("the upstream saw the request");
    assert_eq!(
        (method.as_str(), path.as_str(), host.as_str()),
        ("GET", "/hello?x=1", "plain.test"),
        "origin-form upstream"
    );
    assert!(
        !ok.body().to_ascii_lowercase().contains("proxy-connection"),
        "proxy-only headers are not forwarded: {}",
        ok.body()
    );

    // A wildcard host with resolution NONE: the requested name, resolved by Portico.
    let wild = curl(&env, &[&format!("http://a.wild.test:{ep}/w")]);
    assert_eq!(wild.codes().0, "200", "{} {}", wild.stdout, wild.stderr);
    assert!(dns.queries("a.wild.test") >= 1);

    let refused = curl(&env, &[&format!("http://nope.test:{ep}/")]);
    assert_eq!(refused.codes().0, "502", "{}", refused.stdout);
    assert!(
        refused.body().contains("nope.test") && refused.body().contains("REGISTRY_ONLY"),
        "the body says why: {}",
        refused.body()
    );
    assert_eq!(
        dns.queries("nope.test"),
        0,
        "a refused name is never resolved"
    );

    // Plain HTTP to the registered HTTPS port: refused, with the rule.
    let https_port = curl(&env, &["http://plain.test:443/"]);
    assert_eq!(https_port.codes().0, "502", "{}", https_port.stdout);
    assert!(https_port.body().contains("HTTPS"), "{}", https_port.body());

    let log = gw.log();
    assert!(
        log.lines().any(|l| l.contains("egress denied")
            && l.contains("nope.test")
            && l.contains("REGISTRY_ONLY")
            && l.contains("http")),
        "denial log line:\n{log}"
    );

    // Origin-form requests still go through the gateway's routes (none here: 404).
    assert_eq!(http_get(proxy, "plain.test", "/").status, 404);

    // Forwarded and refused requests are in the access log with Istio's cluster names.
    assert!(
        wait_until(Duration::from_secs(5), || {
            let out = gw.stdout();
            out.contains(r#""upstream_cluster":"outbound|80||plain.test""#)
                && out.contains(r#""response_code_details":"egress_denied""#)
        }),
        "access log:\n{}",
        gw.stdout()
    );

    assert_eq!(
        metric(
            &gw,
            &[
                r#"decision="allowed""#,
                r#"kind="http""#,
                r#"host="plain.test""#
            ]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &gw,
            &[
                r#"decision="allowed""#,
                r#"kind="http""#,
                r#"host="*.wild.test""#
            ]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &gw,
            &[
                r#"decision="denied""#,
                r#"kind="http""#,
                r#"host="unregistered""#
            ]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &gw,
            &[
                r#"decision="denied""#,
                r#"kind="http""#,
                r#"host="plain.test""#
            ]
        ),
        1.0
    );
}

/// One absolute-form request through the proxy; the answering upstream's name.
fn via_proxy(proxy: u16, url: &str) -> Response {
    http_request(proxy, "GET", "", url, &[], b"")
}

#[test]
fn dns_answers_are_followed_by_their_ttl_and_kept_when_the_resolver_fails() {
    // Two upstreams on the same port of two loopback addresses.
    let a = Echo::start("a");
    let port = a.port();
    let b = Echo::start_on("b", &format!("127.0.0.2:{port}"));
    assert_eq!(b.port(), port);
    let dns = DnsServer::start(1);
    dns.set("dyn.test", &[LOCAL]);

    let dir = tempfile::tempdir().unwrap();
    let proxy = free_port();
    let entries = format!(
        r#"
[[serviceEntries]]
name = "dyn"
hosts = ["dyn.test"]
resolution = "DNS"
ports = [{{ number = 80, name = "http", protocol = "HTTP", targetPort = {port} }}]
"#
    );
    let gw = Portico::start(
        dir.path(),
        &egress_config(free_port(), proxy, &dns, "REGISTRY_ONLY", &entries),
    );
    let first = via_proxy(proxy, "http://dyn.test/");
    assert_eq!(first.status, 200, "{}\n{}", first.text(), gw.log());
    assert_eq!(first.upstream(), Some("a"));

    // The answer changes; within a few TTLs Portico follows, without a reload.
    dns.set("dyn.test", &[Ipv4Addr::new(127, 0, 0, 2)]);
    let switched = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || {
            via_proxy(proxy, "http://dyn.test/").upstream() == Some("b")
        }),
        "Portico still sends dyn.test to the old address; log:\n{}",
        gw.log()
    );
    let took = switched.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "followed the 1 s TTL in {took:?}"
    );
    // The admin API shows the registry with the answer in force.
    let egress = &gw.config_json()["egress"];
    assert_eq!(egress["outboundTrafficPolicy"], "REGISTRY_ONLY");
    assert_eq!(egress["hosts"][0]["host"], "dyn.test");
    assert_eq!(
        egress["hosts"][0]["ports"][0]["endpoints"][0],
        format!("127.0.0.2:{port}"),
        "{egress}"
    );

    // The resolver fails: the last good answer keeps serving, well past its TTL, while
    // Portico keeps asking.
    dns.set_failing(true);
    let asked = dns.queries("dyn.test");
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let r = via_proxy(proxy, "http://dyn.test/");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.upstream(), Some("b"));
        thread::sleep(Duration::from_millis(200));
    }
    assert!(
        dns.queries("dyn.test") > asked,
        "the refresher kept asking while the resolver failed"
    );
    assert!(
        gw.log()
            .contains("dns lookup failed; keeping the last answer"),
        "the failure is logged"
    );

    // Back to health: the next answer is taken again.
    dns.set("dyn.test", &[LOCAL]);
    dns.set_failing(false);
    assert!(
        wait_until(Duration::from_secs(10), || {
            via_proxy(proxy, "http://dyn.test/").upstream() == Some("a")
        }),
        "Portico did not take the answer after the resolver recovered"
    );
}

#[test]
fn routed_clusters_follow_dns_answers_without_a_config_change() {
    // A VirtualService on an ordinary gateway routes to a DNS ServiceEntry: when the
    // name's answer changes, Portico recompiles and the route goes to the new address.
    let a = Echo::start("a");
    let port = a.port();
    let _b = Echo::start_on("b", &format!("127.0.0.2:{port}"));
    let dns = DnsServer::start(1);
    dns.set("api.dyn.test", &[LOCAL]);
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let config = format!(
        r#"{mesh}dnsServers = ["{dns}"]

[[gateways]]
name = "edge"
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["app.test"]

[[virtualServices]]
name = "app"
hosts = ["app.test"]
gateways = ["edge"]
[[virtualServices.http]]
route = [{{ destination = {{ host = "api.dyn.test", port = {{ number = {port} }} }} }}]

[[serviceEntries]]
name = "api"
hosts = ["api.dyn.test"]
resolution = "DNS"
ports = [{{ number = {port}, name = "http", protocol = "HTTP" }}]
"#,
        mesh = mesh_config(free_port()),
        dns = dns.addr(),
    );
    let gw = Portico::start(dir.path(), &config);
    let first = http_get(http, "app.test", "/");
    assert_eq!(first.status, 200, "{}\n{}", first.text(), gw.log());
    assert_eq!(
        first.upstream(),
        Some("a"),
        "compiled from the test resolver"
    );
    let generation = gw.generation();

    dns.set("api.dyn.test", &[Ipv4Addr::new(127, 0, 0, 2)]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            http_get(http, "app.test", "/").upstream() == Some("b")
        }),
        "the route still goes to the old address; log:\n{}",
        gw.log()
    );
    assert!(
        gw.log().contains("dns answer changed"),
        "the recompile says why: {}",
        gw.log()
    );
    assert!(gw.generation() > generation);
    // The same answer again is no change: no further recompiles while it holds.
    let settled = gw.generation();
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        gw.generation(),
        settled,
        "no recompile while the answer holds"
    );
    assert_eq!(http_get(http, "app.test", "/").upstream(), Some("b"));
}

/// A STATIC ServiceEntry for `tunnel.test` on `ep` (protocol TCP: reachable by CONNECT).
fn tunnel_entry(ep: u16) -> String {
    format!(
        r#"
[[serviceEntries]]
name = "tunnel"
hosts = ["tunnel.test"]
resolution = "STATIC"
ports = [{{ number = {ep}, name = "tcp", protocol = "TCP" }}]
endpoints = [{{ address = "127.0.0.1" }}]
"#
    )
}

/// Opens a CONNECT tunnel through `proxy` to `target`; the stream after the 200.
fn tunnel(proxy: u16, target: &str) -> Result<BufReader<TcpStream>, String> {
    let mut s = TcpStream::connect(("127.0.0.1", proxy)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).map_err(|e| e.to_string())?;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).map_err(|e| e.to_string())?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    if status.starts_with("HTTP/1.1 200") {
        Ok(r)
    } else {
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        Err(format!("{} {}", status.trim(), rest.trim()))
    }
}

/// Waits (up to 5 s) for the access log line of a CONNECT with this status and flag.
fn assert_connect_logged(gw: &Portico, code: u16, flags: &str) {
    let code = format!(r#""response_code":{code}"#);
    let flags = format!(r#""response_flags":"{flags}""#);
    assert!(
        wait_until(Duration::from_secs(5), || gw.stdout().lines().any(|l| {
            l.contains(r#""method":"CONNECT""#) && l.contains(&code) && l.contains(&flags)
        })),
        "access log:\n{}",
        gw.stdout()
    );
}

/// One keep-alive request over an open tunnel to an [`Echo`].
fn request_in_tunnel(r: &mut BufReader<TcpStream>) -> Response {
    r.get_mut()
        .write_all(&build_request("GET", "tunnel.test", "/", &[], b"", false))
        .unwrap();
    read_response(r, "GET").expect("response through the tunnel")
}

#[test]
fn outbound_policy_switches_by_reload_under_traffic_and_removed_entries_stop_new_tunnels() {
    let echo = Echo::start("external");
    let ep = echo.port();
    let dns = DnsServer::start(30);
    dns.set("free.test", &[LOCAL]);
    dns.set("tunnel.test", &[LOCAL]);
    let dir = tempfile::tempdir().unwrap();
    let (admin, proxy) = (free_port(), free_port());
    let tunnel_entry = tunnel_entry(ep);
    let gw = Portico::start(
        dir.path(),
        &egress_config(admin, proxy, &dns, "REGISTRY_ONLY", &tunnel_entry),
    );

    // A tunnel opened under the first config.
    let mut open = tunnel(proxy, &format!("tunnel.test:{ep}")).expect("registered tunnel");
    assert_eq!(request_in_tunnel(&mut open).status, 200);

    // A client keeps sending plain requests for an unregistered host.
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let client = {
        let (stop, statuses) = (stop.clone(), statuses.clone());
        let url = format!("http://free.test:{ep}/");
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let s = match try_http_request(proxy, "GET", "", &url, &[], b"") {
                    Ok(r) => r.status,
                    Err(_) => 0,
                };
                statuses.lock().unwrap().push(s);
                thread::sleep(Duration::from_millis(10));
            }
        })
    };
    assert!(wait_until(Duration::from_secs(5), || statuses
        .lock()
        .unwrap()
        .len()
        >= 20));
    let generation = gw.generation();
    // ALLOW_ANY, and the tunnel's ServiceEntry removed.
    gw.rewrite_config(&egress_config(admin, proxy, &dns, "ALLOW_ANY", ""));
    gw.wait_generation_above(generation, Duration::from_secs(10));
    let n = statuses.lock().unwrap().len();
    assert!(wait_until(Duration::from_secs(5), || statuses
        .lock()
        .unwrap()
        .len()
        >= n + 20));
    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();

    // Under ALLOW_ANY the unregistered host is reached through PassthroughCluster, and
    // the access log says so; refused requests before the switch do not. (The client's
    // plain requests are the only GETs here; tunnels are logged as CONNECT.)
    let passthrough = |line: &serde_json::Value| line["upstream_cluster"] == "PassthroughCluster";
    let mut lines = Vec::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            lines = gw
                .stdout()
                .lines()
                .filter(|l| l.starts_with('{') && l.contains(r#""method":"GET""#))
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect();
            lines.iter().any(passthrough)
        }),
        "PassthroughCluster in the access log:\n{}",
        gw.stdout()
    );
    for line in &lines {
        assert_eq!(
            passthrough(line),
            line["response_code"] == 200,
            "passed through exactly when allowed: {line}"
        );
    }

    let statuses = statuses.lock().unwrap().clone();
    let first_ok = statuses
        .iter()
        .position(|s| *s == 200)
        .expect("requests pass after the switch");
    assert!(first_ok > 0, "{statuses:?}");
    assert!(
        statuses[..first_ok].iter().all(|s| *s == 502),
        "before the switch: 502 only: {statuses:?}"
    );
    assert!(
        statuses[first_ok..].iter().all(|s| *s == 200),
        "after the switch: 200 only, nothing failed: {statuses:?}"
    );

    // The open tunnel carries on (documented: reloads do not cut tunnels)...
    assert_eq!(request_in_tunnel(&mut open).status, 200);
    // ...while ALLOW_ANY lets a new tunnel to the now-unregistered host through, and
    // REGISTRY_ONLY without the ServiceEntry refuses one at once.
    drop(tunnel(proxy, &format!("tunnel.test:{ep}")).expect("ALLOW_ANY passes through"));
    let generation = gw.generation();
    gw.rewrite_config(&egress_config(admin, proxy, &dns, "REGISTRY_ONLY", ""));
    gw.wait_generation_above(generation, Duration::from_secs(10));
    let refused = tunnel(proxy, &format!("tunnel.test:{ep}")).expect_err("refused");
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("tunnel.test"), "{refused}");
    assert_eq!(request_in_tunnel(&mut open).status, 200, "still open");
    assert_eq!(
        metric(
            &gw,
            &[
                r#"decision="allowed""#,
                r#"kind="connect""#,
                r#"host="unregistered""#
            ]
        ),
        1.0,
        "the ALLOW_ANY tunnel counts as allowed, unregistered"
    );
}

/// A CONNECT tunnel is a stream: one quiet both ways for the stream idle timeout is closed
/// and logged with `SI`, as Envoy does; one that keeps moving bytes outlives that time.
#[test]
fn a_quiet_connect_tunnel_is_closed_after_the_stream_idle_timeout() {
    let echo = Echo::start("external");
    let ep = echo.port();
    let dns = DnsServer::start(30);
    dns.set("tunnel.test", &[LOCAL]);
    let dir = tempfile::tempdir().unwrap();
    let (admin, proxy) = (free_port(), free_port());
    let extra = format!(
        "{}\n[mesh.downstream]\nstreamIdleTimeout = \"1s\"\n",
        tunnel_entry(ep)
    );
    let gw = Portico::start(
        dir.path(),
        &egress_config(admin, proxy, &dns, "REGISTRY_ONLY", &extra),
    );
    let target = format!("tunnel.test:{ep}");
    let mut quiet = tunnel(proxy, &target).expect("tunnel");
    assert_eq!(request_in_tunnel(&mut quiet).status, 200);
    let mut busy = tunnel(proxy, &target).expect("tunnel");
    // Twice the idle time, a request every 0.4 s.
    for _ in 0..5 {
        assert_eq!(request_in_tunnel(&mut busy).status, 200, "{}", gw.log());
        thread::sleep(Duration::from_millis(400));
    }
    assert_eq!(request_in_tunnel(&mut busy).status, 200, "busy: still open");
    // The quiet one was closed (its read ends, before the client's 10 s read timeout).
    let mut rest = Vec::new();
    quiet.read_to_end(&mut rest).expect("closed");
    assert_connect_logged(&gw, 200, "SI");
}

/// A DestinationRule for a registered host applies to forward-proxied traffic as to a
/// route's: `tcp.maxConnections` bounds the host's open tunnels (a tunnel over it gets 503
/// and `UO`), and its TCP keep-alive is set on the upstream connection of a tunnel and of a
/// plain request.
#[test]
fn a_destination_rule_bounds_the_tunnels_of_its_host_and_sets_their_keepalive() {
    let echo = Echo::start("external");
    let plain = Echo::start("plain");
    let (ep, plain_ep) = (echo.port(), plain.port());
    let dns = DnsServer::start(30);
    let dir = tempfile::tempdir().unwrap();
    let (admin, proxy) = (free_port(), free_port());
    let keepalive = r#"tcpKeepalive = { time = "600s", interval = "30s", probes = 3 }"#;
    let extra = format!(
        r#"{entry}
[[destinationRules]]
name = "tunnel"
host = "tunnel.test"
trafficPolicy = {{ connectionPool = {{ tcp = {{ maxConnections = 1, {keepalive} }} }} }}

[[serviceEntries]]
name = "plain"
hosts = ["plain.test"]
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP", targetPort = {plain_ep} }}]
endpoints = [{{ address = "127.0.0.1" }}]

[[destinationRules]]
name = "plain"
host = "plain.test"
trafficPolicy = {{ connectionPool = {{ tcp = {{ {keepalive} }} }} }}
"#,
        entry = tunnel_entry(ep)
    );
    let gw = Portico::start(
        dir.path(),
        &egress_config(admin, proxy, &dns, "REGISTRY_ONLY", &extra),
    );
    let first_probe_in_600s = |timers: Vec<Option<Duration>>| {
        assert_eq!(timers.len(), 1, "one upstream connection: {timers:?}");
        let t = timers[0].expect("a keep-alive timer runs on the upstream connection");
        assert!(
            t > Duration::from_secs(500) && t <= Duration::from_secs(600),
            "the first probe is due after the configured 600 s idle time: {t:?}"
        );
    };

    let target = format!("tunnel.test:{ep}");
    let mut first = tunnel(proxy, &target).expect("the first tunnel");
    assert_eq!(request_in_tunnel(&mut first).status, 200);
    // The gateway's end is the socket whose remote port is the upstream's.
    first_probe_in_600s(keepalive_timers_to(ep));

    let refused = tunnel(proxy, &target).expect_err("a second tunnel is over maxConnections");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert_connect_logged(&gw, 503, "UO");
    // The first still works; once it is closed, its place is free.
    assert_eq!(request_in_tunnel(&mut first).status, 200);
    drop(first);
    assert!(
        wait_until(Duration::from_secs(5), || tunnel(proxy, &target).is_ok()),
        "a tunnel after the first closed:\n{}",
        gw.log()
    );

    let env = [("http_proxy", format!("http://127.0.0.1:{proxy}"))];
    let ok = curl(&env, &["http://plain.test/k"]);
    assert_eq!(ok.codes().0, "200", "{} {}", ok.stdout, ok.stderr);
    // The upstream connection waits in the pool, with its keep-alive.
    first_probe_in_600s(keepalive_timers_to(plain_ep));
}

#[test]
fn egress_config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portico.toml");
    std::fs::write(
        &path,
        r#"[mesh]
dnsServers = ["not-an-address"]

[[serviceEntries]]
name = "x"
hosts = ["x.test"]
ports = [{ number = 80, name = "http", protocol = "SMTP" }]

[[serviceEntries]]
name = "y"
hosts = ["y.test"]
resolution = "STATIC"
ports = [{ number = 80, name = "http" }]
endpoints = [{ address = "127.0.0.1", ports = { http = 70000 } }]
"#,
    )
    .unwrap();
    let (code, out) = run_cli(&["validate", "-c", path.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("mesh.dnsServers[0]") && out.contains("not-an-address"),
        "{out}"
    );
    assert!(
        out.contains("serviceEntries[0].ports[0].protocol") && out.contains("SMTP"),
        "{out}"
    );
    // An endpoint's named port is checked once, for the clusters and the forward proxy.
    assert!(
        out.contains("serviceEntries[1].endpoints[0].ports.http")
            && out.contains("port must be 1-65535"),
        "{out}"
    );
}
