//! Operational behaviour: Kubernetes-style certificate mounts, listener changes on reload,
//! and an h2c (HTTP/2 prior knowledge) upstream.

mod support;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

/// Lays out `<dir>` as kubelet mounts a Secret: the real files in a timestamped folder,
/// `..data` pointing at it, and `tls.crt` / `tls.key` pointing through `..data`.
fn mount_secret(dir: &Path, version: &str, cert: &TestCert) {
    let real = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&real).unwrap();
    std::fs::write(real.join("tls.crt"), &cert.cert_pem).unwrap();
    std::fs::write(real.join("tls.key"), &cert.key_pem).unwrap();
    // Swap `..data` atomically, as kubelet does: a new link renamed over the old one.
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        let link = dir.join(f);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{f}"), &link).unwrap();
        }
    }
}

const SECRET_TEMPLATE: &str = r#"
@MESH@
credentialsDir = "secrets"

[[gateways]]
name = "edge"
[[gateways.servers]]
port = { number = @HTTPS@, name = "https", protocol = "HTTPS" }
bind = "127.0.0.1"
hosts = ["shop.test"]
tls = { mode = "SIMPLE", credentialName = "shop" }

[[virtualServices]]
name = "shop"
hosts = ["shop.test"]
gateways = ["edge"]
[[virtualServices.http]]
directResponse = { status = 200, body = { string = "shop" } }
"#;

#[test]
fn secret_mount_symlink_swap_rotates_the_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("secrets/shop");
    std::fs::create_dir_all(&secret).unwrap();
    let first = gen_cert(&["shop.test"]);
    mount_secret(&secret, "2026_11_25_v1", &first);
    let https = free_port();
    let config = render(
        SECRET_TEMPLATE,
        &[
            ("MESH", mesh_config(free_port())),
            ("HTTPS", https.to_string()),
        ],
    );
    let portico = Portico::start(tmp.path(), &config);
    let mut conn = tls_connect(https, Some("shop.test")).expect("handshake");
    assert_eq!(conn.peer_cert, first.der);
    assert_eq!(conn.get("shop.test", "/").unwrap().text(), "shop");

    let second = gen_cert(&["shop.test"]);
    mount_secret(&secret, "2026_11_25_v2", &second);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let conn = tls_connect(https, Some("shop.test")).expect("handshake");
        if conn.peer_cert == second.der {
            break;
        }
        assert_eq!(
            conn.peer_cert, first.der,
            "neither the old nor the new certificate"
        );
        assert!(
            Instant::now() < deadline,
            "swapped secret not served within 10 s; /config: {}",
            portico.config_json()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(portico.generation() >= 2);
}

const LISTENER_TEMPLATE: &str = r#"
@MESH@
[[gateways]]
name = "edge"
[[gateways.servers]]
port = { number = @HTTP@, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]
@EXTRA@

[[virtualServices]]
name = "all"
hosts = ["*"]
gateways = ["edge"]
[[virtualServices.http]]
directResponse = { status = 200, body = { string = "@BODY@" } }
"#;

#[test]
fn a_new_listener_on_reload_is_refused_and_the_old_config_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let (admin, http, extra_port) = (free_port(), free_port(), free_port());
    let config = |extra: &str, body: &str| {
        render(
            LISTENER_TEMPLATE,
            &[
                ("MESH", mesh_config(admin)),
                ("HTTP", http.to_string()),
                ("EXTRA", extra.to_string()),
                ("BODY", body.to_string()),
            ],
        )
    };
    let portico = Portico::start(tmp.path(), &config("", "one"));
    assert_eq!(http_get(http, "x.test", "/").text(), "one");

    let extra = format!(
        "[[gateways.servers]]\nport = {{ number = {extra_port}, name = \"http2\", protocol = \"HTTP\" }}\nbind = \"127.0.0.1\"\nhosts = [\"*\"]"
    );
    let resp = {
        portico.rewrite_config(&config(&extra, "two"));
        portico.admin_post("/reload")
    };
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert!(
        resp.text().contains("listeners changed") && resp.text().contains("restart"),
        "{}",
        resp.text()
    );
    let last = portico.config_json()["lastReloadError"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(last.contains(&format!("127.0.0.1:{extra_port}")), "{last}");
    assert_eq!(
        http_get(http, "x.test", "/").text(),
        "one",
        "old config keeps serving"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", extra_port)).is_err(),
        "nothing was half-applied"
    );

    // Going back to the same listeners with new routes works.
    portico.rewrite_config(&config("", "three"));
    let resp = portico.admin_post("/reload");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(http_get(http, "x.test", "/").text(), "three");
}

/// A new `mesh.admin` is refused on reload with a message that a restart is needed: the
/// admin API stays where it was and the data plane keeps the old config.
#[test]
fn a_new_admin_address_on_reload_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (admin, http, other_admin) = (free_port(), free_port(), free_port());
    let config = |admin: u16, body: &str| {
        render(
            LISTENER_TEMPLATE,
            &[
                ("MESH", mesh_config(admin)),
                ("HTTP", http.to_string()),
                ("EXTRA", String::new()),
                ("BODY", body.to_string()),
            ],
        )
    };
    let portico = Portico::start(tmp.path(), &config(admin, "one"));
    let generation = portico.generation();
    portico.rewrite_config(&config(other_admin, "two"));
    let resp = portico.admin_post("/reload");
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert!(
        resp.text().contains("mesh.admin changed") && resp.text().contains("restart"),
        "{}",
        resp.text()
    );
    let json = portico.config_json();
    assert_eq!(json["generation"].as_u64(), Some(generation), "{json}");
    assert!(
        json["lastReloadError"]
            .as_str()
            .is_some_and(|e| e.contains("mesh.admin changed")),
        "{json}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", other_admin)).is_err(),
        "no admin API on the new address"
    );
    assert_eq!(
        http_get(http, "x.test", "/").text(),
        "one",
        "old config keeps serving"
    );
}

/// A real HTTP/2 server that only speaks prior-knowledge h2c: an HTTP/1.1 request to it
/// fails, so a 200 through Portico proves the upstream hop used h2c.
fn start_h2c_upstream() -> (u16, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            // Serve for a bounded time so the thread always ends.
            let serve = async {
                loop {
                    let Ok((sock, _)) = listener.accept().await else {
                        return;
                    };
                    tokio::spawn(async move {
                        let Ok(mut conn) = h2::server::handshake(sock).await else {
                            return;
                        };
                        while let Some(Ok((req, mut respond))) = conn.accept().await {
                            let body = format!("h2c {} {}", req.method(), req.uri().path());
                            let resp = http::Response::builder()
                                .status(200)
                                .header("x-upstream-proto", format!("{:?}", req.version()))
                                .body(())
                                .unwrap();
                            if let Ok(mut stream) = respond.send_response(resp, false) {
                                let _ = stream.send_data(body.into(), true);
                            }
                        }
                    });
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(60), serve).await;
        });
    });
    (port, handle)
}

const H2C_TEMPLATE: &str = r#"
@MESH@
[[gateways]]
name = "edge"
[[gateways.servers]]
port = { number = @HTTP@, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["grpc.test"]

[[virtualServices]]
name = "grpc"
hosts = ["grpc.test"]
gateways = ["edge"]
[[virtualServices.http]]
route = [{ destination = { host = "backend.internal", port = { number = 9000 } } }]

[[destinationRules]]
name = "backend"
host = "backend.internal"
trafficPolicy = { connectionPool = { http = { h2UpgradePolicy = "UPGRADE" } } }

[[serviceEntries]]
name = "backend"
hosts = ["backend.internal"]
resolution = "STATIC"
ports = [{ number = 9000, name = "http", protocol = "HTTP" }]
endpoints = [{ address = "127.0.0.1", ports = { http = @UPSTREAM@ } }]
"#;

#[test]
fn h2c_upstream() {
    let (upstream, _server) = start_h2c_upstream();
    let tmp = tempfile::tempdir().unwrap();
    let http = free_port();
    let config = render(
        H2C_TEMPLATE,
        &[
            ("MESH", mesh_config(free_port())),
            ("HTTP", http.to_string()),
            ("UPSTREAM", upstream.to_string()),
        ],
    );
    let _portico = Portico::start(tmp.path(), &config);
    let mut client = HttpClient::new(http);
    for _ in 0..3 {
        let resp = client.get("grpc.test", "/svc/Method").expect("request");
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.text(), "h2c GET /svc/Method");
        assert_eq!(resp.header("x-upstream-proto"), Some("HTTP/2.0"));
    }
}
