//! The command line: --version, routes (explain a request), validate on the shipped default
//! config, and run with a missing config file.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn version() {
    let (code, out) = run_cli(&["--version"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim(), "portico 0.1.0");
}

const ROUTES_CONFIG: &str = r#"[mesh]
admin = "127.0.0.1:15000"

[[gateways]]
name = "public"
[[gateways.servers]]
port = { number = 8080, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]

[[virtualServices]]
name = "shop"
hosts = ["shop.example.com", "*.shop.example.com"]
gateways = ["public"]

[[virtualServices.http]]
name = "api-blue"
match = [{ uri = { prefix = "/api/" }, headers = { x-team = { exact = "blue" } } }]
route = [{ destination = { host = "svc.internal", subset = "v2", port = { number = 80 } } }]

[[virtualServices.http]]
name = "api-post"
match = [{ uri = { prefix = "/api/" }, method = { exact = "POST" } }]
route = [{ destination = { host = "svc.internal", subset = "v2", port = { number = 80 } } }]

[[virtualServices.http]]
name = "api"
match = [{ uri = { prefix = "/api/" } }]
route = [{ destination = { host = "svc.internal", subset = "v1", port = { number = 80 } } }]

[[virtualServices.http]]
match = [{ uri = { exact = "/health" } }]
directResponse = { status = 200, body = { string = "ok" } }

[[virtualServices]]
name = "blog"
hosts = ["blog.example.com"]
gateways = ["public"]

[[virtualServices.http]]
name = "blog-home"
match = [{ uri = { prefix = "/" } }]
directResponse = { status = 200, body = { string = "blog" } }

[[destinationRules]]
name = "svc"
host = "svc.internal"
subsets = [{ name = "v1", labels = { version = "v1" } }, { name = "v2", labels = { version = "v2" } }]

[[serviceEntries]]
name = "svc"
hosts = ["svc.internal"]
location = "MESH_INTERNAL"
resolution = "STATIC"
ports = [{ number = 80, name = "http", protocol = "HTTP" }]
endpoints = [
  { address = "127.0.0.1", ports = { http = 9001 }, labels = { version = "v1" } },
  { address = "127.0.0.1", ports = { http = 9002 }, labels = { version = "v2" } },
]
"#;

fn routes(config: &Path, args: &[&str]) -> (i32, String) {
    let mut all = vec!["routes", "-c", config.to_str().unwrap()];
    all.extend_from_slice(args);
    run_cli(&all)
}

/// `portico routes` names the VirtualService, the `http[i]` index, the route name (none for
/// an unnamed route) and the virtual host, on the one line that says which route serves.
fn assert_explains(out: &str, vs: &str, index: usize, route_name: Option<&str>, vhost: &str) {
    let name = route_name.map(|n| format!(" {n:?}")).unwrap_or_default();
    let want = format!(
        "listener HTTP 127.0.0.1:8080: route default/{vs}.http[{index}]{name} on virtual host {vhost}"
    );
    let routes: Vec<&str> = out.lines().filter(|l| l.contains(": route ")).collect();
    assert_eq!(routes, [want.as_str()], "in:\n{out}");
    assert!(
        !out.lines().any(|l| l == "no route"),
        "a match must not print `no route`:\n{out}"
    );
}

#[test]
fn routes_explains_the_match() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("portico.toml");
    write_atomic(&config, ROUTES_CONFIG);

    let (code, out) = routes(
        &config,
        &["--host", "shop.example.com", "--path", "/api/items"],
    );
    assert_eq!(code, 0, "{out}");
    assert_explains(&out, "shop", 2, Some("api"), "shop.example.com");

    let (code, out) = routes(
        &config,
        &[
            "--host",
            "shop.example.com",
            "--path",
            "/api/items",
            "--header",
            "x-team=blue",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_explains(&out, "shop", 0, Some("api-blue"), "shop.example.com");

    let (code, out) = routes(
        &config,
        &[
            "--host",
            "shop.example.com",
            "--path",
            "/api/items",
            "--method",
            "POST",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_explains(&out, "shop", 1, Some("api-post"), "shop.example.com");

    // An unnamed route is still identified by its index; wildcard host, port, upper case.
    let (code, out) = routes(
        &config,
        &["--host", "EU.Shop.Example.com:8080", "--path", "/health"],
    );
    assert_eq!(code, 0, "{out}");
    assert_explains(&out, "shop", 3, None, "*.shop.example.com");

    let (code, out) = routes(
        &config,
        &["--host", "blog.example.com", "--path", "/2024/post"],
    );
    assert_eq!(code, 0, "{out}");
    assert_explains(&out, "blog", 0, Some("blog-home"), "blog.example.com");
}

#[test]
fn routes_reports_no_route() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("portico.toml");
    write_atomic(&config, ROUTES_CONFIG);

    // Unknown host.
    let (code, out) = routes(&config, &["--host", "nobody.example.com", "--path", "/"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "listener HTTP 127.0.0.1:8080: no route: no virtual host for nobody.example.com (404)",
            "no route"
        ],
        "{out}"
    );

    // Known host, no route matches the path.
    let (code, out) = routes(
        &config,
        &["--host", "shop.example.com", "--path", "/checkout"],
    );
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "listener HTTP 127.0.0.1:8080: no route: virtual host shop.example.com has 4 route(s) and none matched (404)",
            "no route"
        ],
        "{out}"
    );
}

#[test]
fn validate_default_config() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/portico.toml");
    assert!(
        config.exists(),
        "{} should ship with the repository",
        config.display()
    );
    let (code, out) = run_cli(&["validate", "-c", config.to_str().unwrap()]);
    assert_eq!(code, 0, "validate {}:\n{out}", config.display());
    assert!(
        out.lines().any(|l| l.trim_start().starts_with("ok:")),
        "ok: summary expected:\n{out}"
    );
}

#[test]
fn run_with_missing_config_fails() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("does-not-exist.toml");
    let mut child = Command::new(PORTICO)
        .arg("run")
        .arg("-c")
        .arg(&missing)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portico");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait().expect("try_wait") {
            Some(_) => break,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`portico run` with a missing config file kept running");
            }
            None => thread::sleep(Duration::from_millis(20)),
        }
    }
    let output = child.wait_with_output().expect("collect output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !output.status.success(),
        "exit status should be non-zero: {:?}\n{text}",
        output.status
    );
    assert!(
        text.contains("does-not-exist.toml"),
        "the message names the file:\n{text}"
    );
}

/// Every worked example in `conf/examples/` (the README's reference) is a valid config.
#[test]
fn every_example_config_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("conf/examples exists") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let (code, out) = run_cli(&["validate", "-c", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{}:\n{out}", path.display());
        assert!(out.contains("ok:"), "{}:\n{out}", path.display());
        assert!(
            !out.contains("warning"),
            "{} has warnings:\n{out}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 7, "found only {checked} examples");
}

/// The binary sets mimalloc's `arena_eager_commit` to 0 before the allocator reads its
/// options (idle RSS ~17 MiB instead of ~30), and the environment variable still wins.
/// mimalloc prints its options at start with MIMALLOC_VERBOSE=1.
#[test]
fn allocator_commits_lazily_unless_told_otherwise() {
    let option = |env: Option<&str>| {
        let mut cmd = Command::new(PORTICO);
        cmd.arg("--version").env("MIMALLOC_VERBOSE", "1");
        cmd.env_remove("MIMALLOC_ARENA_EAGER_COMMIT");
        if let Some(v) = env {
            cmd.env("MIMALLOC_ARENA_EAGER_COMMIT", v);
        }
        let out = cmd.output().expect("run portico");
        assert!(out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        err.lines()
            .find(|l| l.contains("option 'arena_eager_commit'"))
            .unwrap_or_else(|| panic!("no arena_eager_commit line in:\n{err}"))
            .trim()
            .to_string()
    };
    assert_eq!(option(None), "option 'arena_eager_commit': 0");
    assert_eq!(option(Some("2")), "option 'arena_eager_commit': 2");
}
