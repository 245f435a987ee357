//! The access log: JSON lines with Istio's keys and Envoy's response flags, an Envoy-style
//! text format, and reopening on SIGUSR1 without losing a line.

mod support;

use std::time::Duration;

use support::*;

fn config(mesh_extra: &str, http: u16, echo: u16, dead: u16) -> String {
    format!(
        r#"{mesh}{mesh_extra}

[[gateways]]
name = "edge"
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "app"
hosts = ["app.test"]
gateways = ["edge"]
[[virtualServices.http]]
name = "dead"
match = [{{ uri = {{ prefix = "/dead" }} }}]
route = [{{ destination = {{ host = "dead.internal", port = {{ number = 80 }} }} }}]
[[virtualServices.http]]
name = "echo"
route = [{{ destination = {{ host = "echo.internal", port = {{ number = 80 }} }} }}]

[[serviceEntries]]
name = "echo"
hosts = ["echo.internal"]
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP" }}]
endpoints = [{{ address = "127.0.0.1", ports = {{ http = {echo} }} }}]

[[serviceEntries]]
name = "dead"
hosts = ["dead.internal"]
resolution = "STATIC"
ports = [{{ number = 80, name = "http", protocol = "HTTP" }}]
endpoints = [{{ address = "127.0.0.1", ports = {{ http = {dead} }} }}]
"#,
        mesh = mesh_config(free_port()),
    )
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[test]
fn json_lines_carry_istio_fields_and_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("e");
    let (http, dead) = (free_port(), free_port());
    let portico = Portico::start(tmp.path(), &config("", http, echo.port(), dead));
    let ok = http_request(
        http,
        "GET",
        "app.test",
        "/hello?x=1",
        &[
            ("x-request-id", "req-1"),
            ("user-agent", "t/1"),
            ("x-forwarded-for", "203.0.113.7"),
        ],
        b"",
    );
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.echoed_header("x-request-id").as_deref(),
        Some("req-1"),
        "passed upstream"
    );
    let generated = http_request(http, "GET", "app.test", "/gen", &[], b"");
    let generated_id = generated
        .echoed_header("x-request-id")
        .expect("an id is generated");
    assert_eq!(generated_id.len(), 36);
    assert_eq!(
        http_request(http, "GET", "app.test", "/dead", &[], b"").status,
        503
    );
    assert_eq!(
        http_request(http, "GET", "nothing.test", "/", &[], b"").status,
        404
    );

    let mut lines = Vec::new();
    assert!(wait_until(Duration::from_secs(5), || {
        lines = json_lines(&portico.stdout());
        lines.len() >= 4
    }));
    assert_eq!(lines.len(), 4, "one line per request");
    // A line is written after its response, so two requests on different worker threads
    // may log in either order: find each line by its path.
    let line = |path: &str| {
        lines
            .iter()
            .find(|l| l["path"] == path)
            .unwrap_or_else(|| panic!("no line for {path}: {lines:?}"))
    };
    let first = line("/hello?x=1");
    for key in [
        "start_time",
        "method",
        "path",
        "protocol",
        "response_code",
        "response_flags",
        "bytes_sent",
        "duration",
        "upstream_service_time",
        "user_agent",
        "request_id",
        "authority",
        "upstream_host",
        "upstream_cluster",
        "x_forwarded_for",
        "downstream_local_address",
        "downstream_remote_address",
        "route_name",
    ] {
        assert!(first.get(key).is_some(), "missing {key}: {first}");
    }
    assert_eq!(first["path"], "/hello?x=1");
    assert_eq!(first["request_id"], "req-1");
    assert_eq!(first["user_agent"], "t/1");
    assert_eq!(first["response_code"], 200);
    assert_eq!(first["response_flags"], "-");
    assert_eq!(first["upstream_host"], format!("127.0.0.1:{}", echo.port()));
    assert_eq!(first["upstream_cluster"], "outbound|80||echo.internal");
    assert_eq!(first["route_name"], "echo");
    // X-Forwarded-For as the client sent it (the upstream gets the client's address
    // appended); none sent, none logged.
    assert_eq!(first["x_forwarded_for"], "203.0.113.7");
    assert_eq!(
        ok.echoed_header("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(line("/gen")["x_forwarded_for"], serde_json::Value::Null);
    assert_eq!(
        first["downstream_local_address"],
        format!("127.0.0.1:{http}")
    );
    let remote = first["downstream_remote_address"]
        .as_str()
        .unwrap_or_default();
    assert!(
        regex::Regex::new(r"^127\.0\.0\.1:\d+$")
            .unwrap()
            .is_match(remote)
            && remote != format!("127.0.0.1:{http}"),
        "the client's address: {first}"
    );
    assert_eq!(line("/gen")["request_id"], generated_id.as_str());
    let dead_line = line("/dead");
    assert_eq!(dead_line["response_code"], 503);
    assert_eq!(
        dead_line["response_flags"], "URX",
        "connect failures retried twice: {dead_line}"
    );
    assert_eq!(dead_line["upstream_request_attempt_count"], 3);
    assert_eq!(line("/")["response_code"], 404);
    assert_eq!(line("/")["response_flags"], "NR");
}

#[test]
fn text_format_renders_envoy_operators() {
    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("e");
    let (http, dead) = (free_port(), free_port());
    let mesh = "accessLogEncoding = \"TEXT\"\naccessLogFormat = \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% \\\"%REQ(X-REQUEST-ID)%\\\" \\\"%REQ(:AUTHORITY)%\\\" %UPSTREAM_CLUSTER% %ROUTE_NAME% %%\\n\"\n";
    let portico = Portico::start(tmp.path(), &config(mesh, http, echo.port(), dead));
    http_request(
        http,
        "GET",
        "app.test",
        "/t",
        &[("x-request-id", "abc")],
        b"",
    );
    let mut out = String::new();
    assert!(wait_until(Duration::from_secs(5), || {
        out = portico.stdout();
        out.lines().any(|l| l.starts_with("GET "))
    }));
    let line = out.lines().find(|l| l.starts_with("GET ")).unwrap();
    assert_eq!(
        line,
        format!("GET /t HTTP/1.1 200 - \"abc\" \"app.test\" outbound|80||echo.internal echo %")
    );
}

#[test]
fn sigusr1_reopens_the_file_without_losing_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let echo = Echo::start("e");
    let (http, dead) = (free_port(), free_port());
    let log = tmp.path().join("access.log");
    let mesh = format!("accessLogFile = \"{}\"\n", log.display());
    let portico = Portico::start(tmp.path(), &config(&mesh, http, echo.port(), dead));
    let mut client = HttpClient::new(http);
    for i in 0..50 {
        client.get("app.test", &format!("/before/{i}")).unwrap();
    }
    // logrotate: move the file away, then signal.
    let rotated = tmp.path().join("access.log.1");
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
            == 50
    }));
    std::fs::rename(&log, &rotated).unwrap();
    for i in 0..10 {
        client.get("app.test", &format!("/between/{i}")).unwrap();
    }
    portico.send_signal("USR1");
    assert!(
        wait_until(Duration::from_secs(5), || log.exists()),
        "a new file is opened"
    );
    for i in 0..50 {
        client.get("app.test", &format!("/after/{i}")).unwrap();
    }
    let count = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert!(wait_until(Duration::from_secs(5), || count(&rotated)
        + count(&log)
        == 110));
    let new = std::fs::read_to_string(&log).unwrap();
    assert!(
        new.lines().all(|l| !l.contains("/before/")),
        "old lines stay in the rotated file"
    );
    assert!(new.lines().filter(|l| l.contains("/after/")).count() == 50);
}

/// Lines wait in the workers' buffers for up to a second before they are written: a
/// graceful shutdown (SIGTERM) or a fast one (SIGINT) right after the last response still
/// writes every line, each once.
#[test]
fn every_line_is_written_at_shutdown() {
    for signal in ["TERM", "INT"] {
        let tmp = tempfile::tempdir().unwrap();
        let echo = Echo::start("e");
        let (http, dead) = (free_port(), free_port());
        let log = tmp.path().join("access.log");
        let mesh = format!("accessLogFile = \"{}\"\n", log.display());
        let mut portico = Portico::start(tmp.path(), &config(&mesh, http, echo.port(), dead));
        const N: usize = 300;
        let mut clients: Vec<HttpClient> = (0..3).map(|_| HttpClient::new(http)).collect();
        for i in 0..N {
            let r = clients[i % 3]
                .get("app.test", &format!("/n/{i}"))
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(r.status, 200);
        }
        drop(clients);
        portico.send_signal(signal);
        assert!(
            portico.wait_exit(Duration::from_secs(20)).is_some(),
            "portico exits on SIG{signal}"
        );
        let lines = json_lines(&std::fs::read_to_string(&log).unwrap_or_default());
        let mut paths: Vec<String> = lines
            .iter()
            .map(|l| l["path"].as_str().unwrap_or_default().to_string())
            .collect();
        paths.sort();
        paths.dedup();
        assert_eq!(
            (lines.len(), paths.len()),
            (N, N),
            "SIG{signal}: one line per request"
        );
    }
}
