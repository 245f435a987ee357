//! `portico validate --istio`: YAML problems name the file, the document index, the line,
//! the column and the field path; unsupported fields are warnings by path, or errors where
//! ignoring them would widen a route.

mod support;

use std::path::Path;

use support::*;

const GATEWAY: &str = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: gw
spec:
  servers:
  - port: {number: 18080, name: http, protocol: HTTP}
    hosts: [\"*\"]
";

/// The Gateway, then `vs` as the second document.
fn validate(dir: &Path, vs: &str) -> (i32, String, String) {
    let text = format!("{GATEWAY}---\n{vs}");
    let path = dir.join("m.yaml");
    std::fs::write(&path, &text).unwrap();
    let (code, out) = run_cli(&["validate", "--istio", path.to_str().unwrap()]);
    (code, out, text)
}

fn vs(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: vs
spec:
  hosts: [a.example.com]
  gateways: [gw]
  http:
{http}"
    )
}

/// `m.yaml:LINE:COL: PATH: ...` with LINE the line holding `needle`.
fn assert_at(out: &str, text: &str, needle: &str, path: &str) {
    let line = line_of(text, needle);
    let prefix = format!("m.yaml:{line}:");
    let hit = out
        .lines()
        .find(|l| l.contains(&prefix) && l.contains(&format!(" {path}: ")))
        .unwrap_or_else(|| panic!("no line {prefix}..{path} in:\n{out}"));
    let col: usize = hit
        .split(&prefix)
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let source = text.lines().nth(line - 1).unwrap();
    assert!(
        col >= 1 && col <= source.len(),
        "column {col} in {source:?}: {hit}"
    );
}

#[test]
fn type_error_is_located() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, out, text) = validate(
        tmp.path(),
        &vs("  - route:\n    - destination: {host: x.internal, port: {number: 80}}\n      weight: abc\n"),
    );
    assert_eq!(code, 1, "{out}");
    assert_at(
        &out,
        &text,
        "weight: abc",
        "documents[1].spec.http[0].route[0].weight",
    );
}

#[test]
fn syntax_error_names_the_document() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, out, text) = validate(tmp.path(), &vs("  - route: [oops\n"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("documents[1]: invalid YAML"), "{out}");
    let line = line_of(&text, "[oops");
    assert!(
        out.contains(&format!("m.yaml:{line}:")) || out.contains(&format!("m.yaml:{}:", line + 1)),
        "{out}"
    );
}

#[test]
fn unknown_fields_are_warnings_by_path() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, out, text) = validate(
        tmp.path(),
        &vs("  - route:\n    - destination: {host: x.internal, port: {number: 80}}\n    retries:\n      attempts: 2\n      retriez: 3\n  tlsRoutes:\n  - route: []\n"),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("warning: "), "{out}");
    assert_at(
        &out,
        &text,
        "retriez",
        "documents[1].spec.http[0].retries.retriez",
    );
    assert_at(&out, &text, "tlsRoutes:", "documents[1].spec.tlsRoutes");
}

#[test]
fn unknown_match_condition_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, out, text) = validate(
        tmp.path(),
        &vs("  - match:\n    - sourceLabels: {app: x}\n      uri: {prefix: /}\n    route:\n    - destination: {host: x.internal, port: {number: 80}}\n"),
    );
    assert_eq!(code, 1, "{out}");
    assert_at(
        &out,
        &text,
        "sourceLabels",
        "documents[1].spec.http[0].match[0].sourceLabels",
    );
    assert!(out.contains("match requests it should not"), "{out}");
}

#[test]
fn other_kinds_and_lists_are_skipped_bad_versions_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, out, _) = validate(
        tmp.path(),
        "apiVersion: v1\nkind: List\nitems: []\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s}\nspec: {}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\n",
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("documents[1].kind: a Kubernetes List is skipped"),
        "{out}"
    );
    assert!(
        out.contains("documents[2].kind: Sidecar is not a resource"),
        "{out}"
    );
    assert!(
        out.contains("documents[3].kind: PeerAuthentication"),
        "{out}"
    );
    let (code, out, text) = validate(
        tmp.path(),
        "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: v}\nspec: {}\n",
    );
    assert_eq!(code, 1, "{out}");
    assert_at(
        &out,
        &text,
        "networking.istio.io/v2",
        "documents[1].apiVersion",
    );
    let (code, out, _) = validate(
        tmp.path(),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {namespace: x}\nspec: {}\n",
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("metadata.name is required"), "{out}");
}

/// A VirtualService exported only to its own namespace does not bind to a gateway in
/// another one.
#[test]
fn export_to_limits_the_gateways() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, out, _) = validate(
        tmp.path(),
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: vs
  namespace: team
spec:
  hosts: [a.example.com]
  gateways: [default/gw]
  exportTo: [\".\"]
  http:
  - directResponse: {status: 200}
",
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("not exported to namespace default"), "{out}");
    assert!(out.contains("0 hosts"), "nothing bound: {out}");
}
