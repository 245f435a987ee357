//! The admin dashboard, rendered by a real browser (headless Chromium): it loads its data
//! from the admin API and shows the configured hosts, certificate expiry and routes.

mod support;

use std::process::Command;

use support::*;

#[test]
fn dashboard_renders_hosts_certificates_and_routes_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    write_cert(tmp.path(), "shop", &["shop.dash.test"]);
    let (admin, http, https) = (free_port(), free_port(), free_port());
    let config = format!(
        r#"[mesh]
admin = "127.0.0.1:{admin}"
accessLogFile = ""

[[gateways]]
name = "edge"
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]
[[gateways.servers]]
port = {{ number = {https}, name = "https", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = ["shop.dash.test"]
tls = {{ mode = "SIMPLE", serverCertificate = "shop.crt", privateKey = "shop.key" }}

[[virtualServices]]
name = "shop"
hosts = ["shop.dash.test"]
gateways = ["edge"]
[[virtualServices.http]]
name = "home"
match = [{{ uri = {{ prefix = "/catalog" }} }}]
directResponse = {{ status = 200, body = {{ string = "hi" }} }}
"#
    );
    let portico = Portico::start(tmp.path(), &config);
    for _ in 0..5 {
        http_get(http, "shop.dash.test", "/catalog");
    }
    let profile = tempfile::tempdir().unwrap();
    let shot = tmp.path().join("dashboard.png");
    let url = format!("http://127.0.0.1:{}/", portico.admin_port);
    let browser = |extra: &[&str]| {
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(&url);
        cmd.output()
            .expect("chromium is installed (Debian package chromium; .ci/run installs it)")
    };
    let dom = browser(&["--dump-dom"]);
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        html.contains("<td><code>shop.dash.test</code></td>"),
        "the host is listed:\n{html}"
    );
    assert!(
        html.contains("CN=shop.dash.test") || html.contains("shop.dash.test"),
        "{html}"
    );
    assert!(
        html.contains(" days)"),
        "the certificate expiry is shown:\n{html}"
    );
    assert!(
        html.contains("uri prefix \"/catalog\""),
        "the route table is shown:\n{html}"
    );
    assert!(html.contains("last reload ok"), "{html}");
    assert!(
        html.contains(">5</div>") || html.contains(">6</div>"),
        "request count is shown:\n{html}"
    );
    let out = browser(&[&format!("--screenshot={}", shot.display())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "a screenshot was taken"
    );
}
