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
    // The certificate's row: subject, expiry date and days left, as /config reports them.
    let config = portico.config_json();
    let cert = config["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|l| l["certificates"].as_array()?.first().cloned())
        .unwrap_or_else(|| panic!("/config lists the certificate: {config}"));
    let subject = cert["subject"].as_str().unwrap();
    assert!(
        html.contains(&format!("<td>{subject}</td>")),
        "the certificate's subject {subject:?} is shown:\n{html}"
    );
    let not_after = cert["notAfter"].as_i64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // The page counted the days a moment before `now`: the same number, or one more
    // when a day boundary fell in between.
    let days = (not_after - now).div_euclid(86_400);
    let expiry = |days: i64| format!("{} ({days} days)", utc_date(not_after));
    assert!(
        html.contains(&expiry(days)) || html.contains(&expiry(days + 1)),
        "the certificate expiry {:?} is shown:\n{html}",
        expiry(days)
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

/// `YYYY-MM-DD` of a Unix time, in UTC (the proleptic Gregorian calendar).
fn utc_date(unix: i64) -> String {
    // Howard Hinnant's civil_from_days.
    let z = unix.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[test]
fn utc_dates() {
    assert_eq!(utc_date(0), "1970-01-01");
    assert_eq!(utc_date(951_782_400), "2000-02-29");
    assert_eq!(utc_date(1_767_225_599), "2025-12-31");
}
