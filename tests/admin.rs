//! Who the admin API answers: only Host localhost or an IP address (DNS rebinding), writes
//! only from its own origin and never with a form's body type (CSRF), and with
//! `mesh.adminTokenFile`, only requests with the bearer token (the probes excepted). Raw
//! HTTP over TCP, so each test sets Host, Origin and Content-Type itself.

mod support;

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use support::*;

const CONFIG: &str = r#"
@MESH@
@EXTRA@
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
directResponse = { status = 200, body = { string = "hi" } }
"#;

fn start(dir: &Path, mesh_extra: &str) -> Portico {
    let config = render(
        CONFIG,
        &[
            ("MESH", mesh_config(free_port())),
            ("EXTRA", mesh_extra.to_string()),
            ("HTTP", free_port().to_string()),
        ],
    );
    Portico::start(dir, &config)
}

fn admin(p: &Portico, method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    admin_with_body(p, method, host, path, headers, b"")
}

fn admin_with_body(
    p: &Portico,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_http_request(p.admin_port, method, host, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path} (Host {host}): {e}; log:\n{}", p.log()))
}

/// `request` as written, on a fresh connection.
fn raw(port: u16, request: &str) -> Response {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    read_response(&mut BufReader::new(stream), "GET").unwrap()
}

/// Reload count and generation from `/config` (asked as the harness does, Host 127.0.0.1).
fn reloads(p: &Portico) -> (u64, u64) {
    let c = p.config_json();
    (
        c["generation"].as_u64().unwrap(),
        c["reloads"]["success"].as_u64().unwrap(),
    )
}

fn refusal_lines(p: &Portico) -> usize {
    p.log().matches("admin request refused").count()
}

#[test]
fn only_localhost_and_ip_hosts_are_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let p = start(tmp.path(), "");
    let port = p.admin_port;
    let before = reloads(&p);

    for host in [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_string(),
        format!("localhost:{port}"),
        "LOCALHOST".to_string(),
        format!("[::1]:{port}"),
    ] {
        let r = admin(&p, "GET", &host, "/config", &[]);
        assert_eq!(r.status, 200, "Host {host}: {}", r.text());
    }

    // A name that resolves to the admin address after a DNS rebinding.
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_string(),
        format!("127.0.0.1.nip.io:{port}"),
        format!("localhost.evil.example:{port}"),
    ] {
        for path in ["/config", "/", "/metrics", "/healthz"] {
            let r = admin(&p, "GET", &host, path, &[]);
            assert_eq!(r.status, 403, "GET {path} with Host {host}: {}", r.text());
            assert!(r.text().contains("Host"), "{}", r.text());
            assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
        }
        let r = admin(&p, "POST", &host, "/reload", &[]);
        assert_eq!(r.status, 403, "POST /reload with Host {host}: {}", r.text());
    }
    // Two Host headers: not one name (pingora already closes such a connection).
    let r = try_http_request(
        port,
        "GET",
        "",
        "/config",
        &[("Host", "127.0.0.1"), ("Host", "evil.example")],
        b"",
    );
    assert!(
        r.as_ref()
            .map_or(true, |r| r.status == 400 || r.status == 403),
        "{r:?}"
    );

    // No Host at all (HTTP/1.0 allows that).
    let r = raw(port, "GET /config HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 403, "{}", r.text());
    let r = raw(port, "GET /config HTTP/1.0\r\nHost: localhost\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    // An absolute-form target names the host (pingora closes the connection when Host
    // says otherwise).
    let r = raw(
        port,
        "GET http://evil.example/config HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let r = raw(
        port,
        "GET http://localhost/config HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());

    assert_eq!(reloads(&p), before, "no refused POST /reload reloaded");

    // Refusals are logged, at most one line a second: a burst of 50 makes one or two.
    std::thread::sleep(Duration::from_millis(1100));
    let lines = refusal_lines(&p);
    for _ in 0..50 {
        assert_eq!(admin(&p, "GET", "evil.example", "/config", &[]).status, 403);
    }
    let burst = refusal_lines(&p) - lines;
    assert!(
        (1..=2).contains(&burst),
        "{burst} log lines for 50 refusals:\n{}",
        p.log()
    );
    assert!(p.log().contains(r#"reason="host""#), "{}", p.log());
}

#[test]
fn writes_only_from_the_admin_origin_and_never_with_a_form_body() {
    let tmp = tempfile::tempdir().unwrap();
    let p = start(tmp.path(), "");
    let host = format!("127.0.0.1:{}", p.admin_port);
    let (generation, success) = reloads(&p);

    // What a page on another site can make a browser send without asking first.
    /// What, its headers and body, the status it gets.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [u8], u16);
    let foreign: &[Case] = &[
        (
            "foreign Origin",
            &[("Origin", "http://evil.example")],
            b"",
            403,
        ),
        ("Origin null", &[("Origin", "null")], b"", 403),
        (
            "another loopback origin",
            &[("Origin", "http://127.0.0.1:3000")],
            b"",
            403,
        ),
        (
            "cross-site fetch",
            &[("Sec-Fetch-Site", "cross-site")],
            b"",
            403,
        ),
        (
            "form post",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            b"a=b",
            415,
        ),
        (
            "multipart form",
            &[("Content-Type", "multipart/form-data; boundary=x")],
            b"--x--\r\n",
            415,
        ),
        (
            "text/plain beacon",
            &[("Content-Type", "text/plain;charset=UTF-8")],
            b"x",
            415,
        ),
    ];
    for (what, headers, body, status) in foreign {
        let r = admin_with_body(&p, "POST", &host, "/reload", headers, body);
        assert_eq!(r.status, *status, "{what}: {}", r.text());
    }
    assert_eq!(
        reloads(&p),
        (generation, success),
        "a refused POST /reload did not reload"
    );
    // The same checks hold for every method but GET and HEAD, known path or not.
    let r = admin(
        &p,
        "DELETE",
        &host,
        "/config",
        &[("Origin", "http://evil.example")],
    );
    assert_eq!(r.status, 403, "{}", r.text());

    // What curl -X POST sends.
    let r = admin(&p, "POST", &host, "/reload", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["generation"].as_u64(), Some(generation + 1));
    // The admin's own page, and a JSON client.
    let r = admin(
        &p,
        "POST",
        &host,
        "/reload",
        &[
            ("Origin", &format!("http://{host}")),
            ("Sec-Fetch-Site", "same-origin"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = admin_with_body(
        &p,
        "POST",
        &format!("localhost:{}", p.admin_port),
        "/reload",
        &[("Content-Type", "application/json")],
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(reloads(&p), (generation + 3, success + 3));
    // A GET carries no write: an Origin on it changes nothing.
    let r = admin(
        &p,
        "GET",
        &host,
        "/config",
        &[("Origin", "http://evil.example")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

const TOKEN: &str = "3f9a1c0e7b5d4a6e8c2b1f0d9e8a7c6b";

#[test]
fn a_token_file_requires_the_bearer_token_except_for_probes() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("admin.token"), format!("  {TOKEN}\n")).unwrap();
    let p = start(tmp.path(), "adminTokenFile = \"admin.token\"");
    let host = "127.0.0.1";
    let bearer = format!("Bearer {TOKEN}");

    for path in ["/healthz", "/ready"] {
        let r = admin(&p, "GET", host, path, &[]);
        assert_eq!(r.status, 200, "{path} needs no token: {}", r.text());
    }
    for path in ["/config", "/metrics", "/stats", "/"] {
        let r = admin(&p, "GET", host, path, &[]);
        assert_eq!(r.status, 401, "{path}: {}", r.text());
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Bearer realm="portico admin""#)
        );
        let r = admin(&p, "GET", host, path, &[("Authorization", "Bearer nope")]);
        assert_eq!(r.status, 401, "{path}: {}", r.text());
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer ") && v.contains("invalid_token")),
            "{:?}",
            r.headers
        );
        let r = admin(&p, "GET", host, path, &[("Authorization", &bearer)]);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    let generation = {
        let r = admin(&p, "GET", host, "/config", &[("Authorization", &bearer)]);
        r.json()["generation"].as_u64().unwrap()
    };
    let r = admin(&p, "POST", host, "/reload", &[]);
    assert_eq!(r.status, 401, "{}", r.text());
    let r = admin(&p, "POST", host, "/reload", &[("Authorization", &bearer)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["generation"].as_u64(), Some(generation + 1));
    // The token does not stand in for the Host check.
    let r = admin(
        &p,
        "GET",
        "evil.example",
        "/config",
        &[("Authorization", &bearer)],
    );
    assert_eq!(r.status, 403, "{}", r.text());

    // A new token in the file reloads the config, and from then on only it is accepted.
    let new_token = "a7c6b3f9a1c0e7b5d4a6e8c2b1f0d9e8";
    write_atomic(&tmp.path().join("admin.token"), new_token);
    let new_bearer = format!("Bearer {new_token}");
    let rotated = wait_until(Duration::from_secs(10), || {
        admin(
            &p,
            "GET",
            host,
            "/config",
            &[("Authorization", &new_bearer)],
        )
        .status
            == 200
    });
    assert!(rotated, "the new token is not accepted; log:\n{}", p.log());
    let r = admin(&p, "GET", host, "/config", &[("Authorization", &bearer)]);
    assert_eq!(r.status, 401, "the old token is refused: {}", r.text());

    let log = p.log();
    assert!(!log.contains(TOKEN) && !log.contains(new_token), "{log}");
}

#[test]
fn an_empty_or_missing_token_file_is_a_config_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let config = render(
        CONFIG,
        &[
            ("MESH", mesh_config(free_port())),
            (
                "EXTRA",
                "adminTokenFile = \"secrets/admin.token\"".to_string(),
            ),
            ("HTTP", free_port().to_string()),
        ],
    );
    let path = tmp.path().join("portico.toml");
    write_atomic(&path, &config);
    let line = line_of(&config, "adminTokenFile");
    let validate = || run_cli(&["validate", "-c", path.to_str().unwrap()]);

    let (code, out) = validate();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("portico.toml:{line}:"))
            && out.contains("mesh.adminTokenFile")
            && out.contains("cannot read")
            && out.contains("secrets/admin.token"),
        "{out}"
    );

    std::fs::create_dir(tmp.path().join("secrets")).unwrap();
    std::fs::write(tmp.path().join("secrets/admin.token"), " \n\t\n").unwrap();
    let (code, out) = validate();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("portico.toml:{line}:"))
            && out.contains("mesh.adminTokenFile")
            && out.contains("secrets/admin.token is empty"),
        "{out}"
    );

    std::fs::write(tmp.path().join("secrets/admin.token"), "two words\n").unwrap();
    let (code, out) = validate();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("spaces") && !out.contains("two words"),
        "{out}"
    );

    // A short token is a warning, and the token is never printed.
    std::fs::write(tmp.path().join("secrets/admin.token"), "k9Zq\n").unwrap();
    let (code, out) = validate();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("shorter than 16") && !out.contains("k9Zq"),
        "{out}"
    );

    // A process that fails to start on it says the same.
    std::fs::write(tmp.path().join("secrets/admin.token"), "").unwrap();
    let mut p = Portico::spawn_more(tmp.path(), 0, &[]);
    let status = p.wait_exit(Duration::from_secs(10)).expect("portico exits");
    assert!(!status.success());
    assert!(
        p.log().contains("secrets/admin.token is empty"),
        "{}",
        p.log()
    );
}

#[test]
fn a_non_loopback_admin_address_without_a_token_is_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let admin_port = free_port();
    let config = |extra: &str| {
        render(
            CONFIG,
            &[
                (
                    "MESH",
                    format!("[mesh]\nadmin = \"0.0.0.0:{admin_port}\"\n{extra}"),
                ),
                ("EXTRA", String::new()),
                ("HTTP", free_port().to_string()),
            ],
        )
    };
    let warning = "admin API listens beyond loopback without mesh.adminTokenFile";
    let started = || {
        wait_until(Duration::from_secs(20), || {
            try_http_request(admin_port, "GET", "127.0.0.1", "/ready", &[], b"")
                .is_ok_and(|r| r.status == 200)
        })
    };

    write_atomic(&tmp.path().join("portico.toml"), config(""));
    let p = Portico::spawn_more(tmp.path(), admin_port, &[]);
    assert!(started(), "{}", p.log());
    assert!(p.log().contains(warning), "{}", p.log());
    drop(p);

    std::fs::write(tmp.path().join("admin.token"), TOKEN).unwrap();
    write_atomic(
        &tmp.path().join("portico.toml"),
        config("adminTokenFile = \"admin.token\""),
    );
    let p = Portico::spawn_more(tmp.path(), admin_port, &[]);
    assert!(started(), "{}", p.log());
    assert!(!p.log().contains(warning), "{}", p.log());
}

/// The demo config (`conf/portico.toml`) proxies /healthz and api.example.com/status to the
/// admin API: those still answer whatever Host the client sent, because the routes rewrite
/// it to `localhost`.
#[test]
fn the_demo_config_still_reaches_its_admin_upstream() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let conf = tmp.path().join("conf");
    std::fs::create_dir_all(conf.join("conf.d")).unwrap();
    let (http, https, admin) = (free_port(), free_port(), free_port());
    let demo = std::fs::read_to_string(root.join("conf/portico.toml"))
        .unwrap()
        .replace("15000", "@ADMIN@")
        .replace("8080", "@HTTP@")
        .replace("8443", "@HTTPS@");
    let demo = render(
        &demo,
        &[
            ("ADMIN", admin.to_string()),
            ("HTTP", http.to_string()),
            ("HTTPS", https.to_string()),
        ],
    );
    let p = Portico::start(&conf, &demo);

    for host in [
        format!("localhost:{http}"),
        format!("gateway.example:{http}"),
    ] {
        let r = http_get(http, &host, "/healthz");
        assert_eq!(r.status, 200, "Host {host}: {}", r.text());
        assert_eq!(r.text(), "ok\n");
        assert_eq!(r.header("x-served-by"), Some("portico"));
    }
    let mut tls = tls_connect(https, Some("api.example.com")).expect("handshake");
    let r = tls
        .get(&format!("api.example.com:{https}"), "/status")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "ok\n");
    drop(p);
}
