//! `portico convert`: a config and its converted TOML compile to the same Snapshot, compared
//! by a stable dump of the compiled route tables, certificates and clusters.

mod support;

use std::path::Path;

use portico::config::{self, Options, Sources};
use portico::snapshot::Snapshot;
use support::*;

fn compile(sources: &Sources) -> Snapshot {
    config::build_sources(sources, &Options::default())
        .unwrap_or_else(|e| panic!("{sources}: {e:?}"))
        .snapshot
}

/// Converts `main` (with everything it includes), writes the TOML beside it and compares.
fn assert_same_after_convert(main: &Path) -> String {
    let sources = Sources::config(main);
    let doc = config::load_sources(&sources).unwrap();
    let text = config::convert::to_toml(&doc).unwrap();
    let converted = main.with_file_name("converted.toml");
    std::fs::write(&converted, &text).unwrap();
    let (a, b) = (compile(&sources), compile(&Sources::config(&converted)));
    let (a, b) = (dump(&a), dump(&b));
    assert!(
        a.contains("vhost") || a.contains("egress host"),
        "the dump shows routes or egress hosts:\n{a}"
    );
    assert_eq!(
        a,
        b,
        "{} and its conversion differ; converted:\n{text}",
        main.display()
    );
    text
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}

#[test]
fn example_configs_survive_convert() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            // A copy, with the folders it may include (istio/), so the output can be
            // written beside it.
            let tmp = tempfile::tempdir().unwrap();
            copy_dir(&examples, tmp.path());
            assert_same_after_convert(&tmp.path().join(path.file_name().unwrap()));
            n += 1;
        }
    }
    assert!(n >= 8, "examples found: {n}");
}

#[test]
fn istio_manifests_survive_convert() {
    for (name, creds) in [
        ("bookinfo-header-routing.yaml", false),
        ("mirroring.yaml", false),
        ("fault-injection.yaml", false),
        ("circuit-breaking.yaml", false),
        ("traffic-shifting.yaml", false),
        ("egress-gateway.yaml", false),
        ("secure-ingress.yaml", true),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/istio")
                .join(name),
        )
        .unwrap();
        let vars: Vec<(&str, String)> = ["PORT", "V1", "V2", "V3"]
            .iter()
            .enumerate()
            .map(|(i, k)| (*k, (20000 + i).to_string()))
            .collect();
        write_atomic(
            &tmp.path().join("manifests").join(name),
            render(&template, &vars),
        );
        if creds {
            let certs = tmp.path().join("certs");
            write_credential(&certs, "httpbin-credential", &["httpbin.example.com"]);
            write_credential(&certs, "helloworld-credential", &["helloworld.example.com"]);
        }
        let main = tmp.path().join("portico.toml");
        std::fs::write(
            &main,
            "include = [\"manifests\"]\n[mesh]\nadmin = \"127.0.0.1:15999\"\n",
        )
        .unwrap();
        let text = assert_same_after_convert(&main);
        assert!(
            !text.contains("host = \"reviews\"") && !text.contains("host = \"httpbin\""),
            "short names are written resolved:\n{text}"
        );
    }
}

/// The command prints TOML on stdout (notes on stderr) that `validate` accepts.
#[test]
fn convert_command_prints_toml() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/istio-samples");
    let input = if samples.is_dir() {
        samples.join("10-httpbin-gateway.yaml")
    } else {
        let p = tmp.path().join("in.yaml");
        std::fs::write(&p, "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: g\nspec:\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [\"*\"]\n").unwrap();
        p
    };
    let (code, out) = run_cli(&["convert", input.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let toml_text: String = out
        .lines()
        .filter(|l| !l.starts_with("warning:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(toml_text.contains("[[gateways]]"), "{out}");
    let converted = tmp.path().join("converted.toml");
    std::fs::write(&converted, &toml_text).unwrap();
    let (code, out) = run_cli(&["validate", "-c", converted.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok:"), "{out}");
}
