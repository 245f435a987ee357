//! Every manifest in `../shared/istio-samples/` (real YAML copied from Istio's samples and
//! docs tasks) loads: what Portico does not implement is reported field by field, as a
//! warning, or as an error where a file the manifest needs is not there (a mutual-TLS
//! client CA).

use std::path::{Path, PathBuf};

use portico::config::{self, ConfigError, Options, Sources};

/// The sample manifests, in `shared/` beside the repository (CI lays a copy there; .ci/run
/// checks it is there).
fn samples_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/istio-samples");
    assert!(
        dir.is_dir(),
        "{} is not there: the samples come with shared/ beside the repository",
        dir.display()
    );
    dir
}

enum Expect {
    /// Compiles; these field paths (suffixes of `documents[N].spec...`) have warnings.
    Loads(&'static [&'static str]),
    /// Out of scope: exactly these field paths have errors.
    Rejected(&'static [&'static str]),
}

use Expect::*;

/// Sample files (loaded together), what must happen, and why.
const CASES: &[(&[&str], Expect)] = &[
    (&["01-bookinfo-gateway.yaml"], Loads(&[])),
    (&["02-bookinfo-destination-rule-all.yaml"], Loads(&[])),
    // Sidecar-only VirtualServices (no gateways): each skipped with a note.
    (
        &["02-bookinfo-destination-rule-all.yaml", "03-bookinfo-vs-all-v1.yaml"],
        Loads(&["03-bookinfo-vs-all-v1.yaml documents[0].spec", "documents[1].spec", "documents[2].spec", "documents[3].spec"]),
    ),
    (&["04-bookinfo-vs-reviews-test-v2.yaml"], Loads(&["documents[0].spec"])),
    (&["05-bookinfo-vs-ratings-test-delay.yaml"], Loads(&["documents[0].spec"])),
    (&["06-bookinfo-vs-ratings-test-abort.yaml"], Loads(&["documents[0].spec"])),
    (&["07-bookinfo-vs-reviews-50-v3.yaml"], Loads(&["documents[0].spec"])),
    (&["08-bookinfo-fault-injection-details-v1.yaml"], Loads(&["documents[0].spec"])),
    (&["09-bookinfo-egress-rule-google-apis.yaml"], Loads(&["documents[1].spec"])),
    (&["10-httpbin-gateway.yaml"], Loads(&[])),
    (&["11-helloworld-gateway.yaml"], Loads(&[])),
    // TCP servers and `tcp` routes (the tcp-echo service has no endpoints here: a DNS
    // warning, filtered out).
    (&["12-tcp-echo-all-v1.yaml"], Loads(&[])),
    // Applied together, 13's VirtualService (the same name: in Istio it replaces 12's) adds
    // a second route for port 31400, which is never reached: a warning.
    (&["12-tcp-echo-all-v1.yaml", "13-tcp-echo-20-v2.yaml"], Loads(&["13-tcp-echo-20-v2.yaml documents[0].spec.tcp[0]"])),
    (&["14-external-github-serviceentry.yaml"], Loads(&[])),
    // AUTO_PASSTHROUGH: SNI `outbound_.<port>_.<subset>_.<host>` routed to that cluster
    // with no VirtualService (served end to end in tests/auto_passthrough.rs).
    (&["15-multicluster-auto-passthrough-gateway.yaml"], Loads(&[])),
    (&["15-multicluster-auto-passthrough-gateway.yaml", "02-bookinfo-destination-rule-all.yaml", "14-external-github-serviceentry.yaml"], Loads(&[])),
    // The certificate files do not exist here: a warning with selfSignedWhenMissing.
    (&["16-testdata-gateway-all.yaml"], Loads(&["documents[0].spec.servers[1].tls.serverCertificate"])),
    // Subsets v1/v2 of service3 are defined by no DestinationRule in the samples: Portico
    // refuses a subset it cannot resolve (Istio would answer 503).
    (
        &["16-testdata-gateway-all.yaml", "17-testdata-virtual-service-all.yaml"],
        Rejected(&["documents[0].spec.http[1].route[0].destination.subset", "documents[0].spec.http[1].route[1].destination.subset"]),
    ),
    (&["18-testdata-destination-rule-all.yaml"], Loads(&["documents[1].spec.subsets[1].trafficPolicy.loadBalancer.consistentHash.minimumRingSize"])),
    (&["19-testdata-rule-redirect-injection.yaml"], Loads(&["documents[1].spec"])),
    (&["20-testdata-rule-cors-policy.yaml"], Loads(&["documents[1].spec"])),
    // sourceLabels would be an error at a gateway, but this VirtualService is sidecar-only.
    (&["21-testdata-rule-regex-route.yaml"], Loads(&["documents[2].spec"])),
    (&["22-docs-request-timeouts.yaml"], Loads(&["documents[0].spec", "documents[1].spec"])),
    (&["23-docs-circuit-breaking.yaml"], Loads(&["documents[0].spec.trafficPolicy.outlierDetection.consecutiveErrors"])),
    (&["24-docs-mirroring.yaml"], Loads(&["documents[0].spec"])),
    (&["25-docs-secure-ingress-multi-host.yaml"], Loads(&["documents[0].spec.servers[0].tls.credentialName", "documents[0].spec.servers[1].tls.credentialName"])),
    // MUTUAL needs the client CA, the credential's `ca.crt` (or `<name>-cacert/ca.crt`),
    // which no one wrote here (the server certificate itself would be generated). Served
    // end to end with its files in tests/mtls.rs.
    (&["26-docs-secure-ingress-mutual.yaml"], Rejected(&["documents[0].spec.servers[0].tls.credentialName"])),
    (&["27-docs-ingress-sni-passthrough.yaml"], Loads(&[])),
    (&["28-docs-egress-tls-origination.yaml"], Loads(&[])),
    // The sidecar hop (`gateways: [mesh]`) is not applied at the gateway, with a note.
    (&["29-docs-egress-gateway-http.yaml"], Loads(&["documents[3].spec.http[0].match"])),
    // The sidecar hop of the tls routes (`gateways: [mesh]`) binds to no server here.
    (&["30-docs-wildcard-egress-hosts.yaml"], Loads(&["documents[3].spec.tls[0]"])),
];

/// Warnings that only say where a name did not resolve: they depend on the machine's DNS.
fn about_dns(w: &ConfigError) -> bool {
    w.message.contains("cannot resolve") || w.message.contains("has no endpoints")
}

fn check(dir: &Path, files: &[&str], expect: &Expect) -> Result<(), String> {
    let tmp = tempfile::tempdir().unwrap();
    let main = tmp.path().join("portico.toml");
    let includes: Vec<String> = files
        .iter()
        .map(|f| format!("{:?}", dir.join(f).display().to_string()))
        .collect();
    std::fs::write(
        &main,
        format!(
            "include = [{}]\n[mesh]\nselfSignedWhenMissing = true\n",
            includes.join(", ")
        ),
    )
    .unwrap();
    let sources = Sources::config(&main);
    let doc = config::load_sources(&sources).map_err(|e| format!("load failed: {e:?}"))?;
    let result = config::compile(&doc, &Options::default());
    let names = |v: &[ConfigError]| -> Vec<String> { v.iter().map(|e| e.to_string()).collect() };
    match (expect, result) {
        (Loads(warned), Ok(compiled)) => {
            let warnings: Vec<&ConfigError> =
                compiled.warnings.iter().filter(|w| !about_dns(w)).collect();
            for w in &warnings {
                assert!(
                    w.file.is_absolute() && w.line >= 1 && w.column >= 1,
                    "located: {w}"
                );
            }
            for want in *warned {
                let (file, path) = match want.split_once(' ') {
                    Some((f, p)) => (Some(f), p),
                    None => (None, *want),
                };
                if !warnings
                    .iter()
                    .any(|w| w.path == path && file.is_none_or(|f| w.file.ends_with(f)))
                {
                    return Err(format!(
                        "no warning at {want}; warnings: {:#?}",
                        warnings.iter().map(|w| w.to_string()).collect::<Vec<_>>()
                    ));
                }
            }
            if warnings.len() != warned.len() {
                return Err(format!(
                    "unexpected warnings: {:#?}",
                    warnings.iter().map(|w| w.to_string()).collect::<Vec<_>>()
                ));
            }
            Ok(())
        }
        (Rejected(paths), Err(errors)) => {
            let mut got: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
            got.sort();
            let mut want = paths.to_vec();
            want.sort();
            if got != want {
                return Err(format!("errors: {:#?}", names(&errors)));
            }
            for e in &errors {
                assert!(e.line > 1, "the error points into the file: {e}");
            }
            Ok(())
        }
        (Loads(_), Err(errors)) => Err(format!("rejected: {:#?}", names(&errors))),
        (Rejected(_), Ok(c)) => Err(format!("loaded, warnings: {:#?}", names(&c.warnings))),
    }
}

#[test]
fn every_istio_sample_loads_or_is_reported_field_by_field() {
    let dir = samples_dir();
    let mut covered: Vec<&str> = CASES.iter().flat_map(|(f, _)| f.iter().copied()).collect();
    covered.sort();
    covered.dedup();
    let mut all: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    all.sort();
    assert_eq!(covered, all, "every sample has a case");
    let failures: Vec<String> = CASES
        .iter()
        .filter_map(|(files, expect)| {
            check(&dir, files, expect)
                .err()
                .map(|e| format!("{files:?}: {e}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// TCP and TLS routes are read, not ignored: loading the samples that have them warns about
/// no `tcp` / `tls` field.
#[test]
fn l4_route_kinds_are_read() {
    let dir = samples_dir();
    for (file, path) in [
        ("12-tcp-echo-all-v1.yaml", "documents[2].spec.tcp"),
        ("13-tcp-echo-20-v2.yaml", "documents[0].spec.tcp"),
        (
            "27-docs-ingress-sni-passthrough.yaml",
            "documents[1].spec.tls",
        ),
        (
            "30-docs-wildcard-egress-hosts.yaml",
            "documents[3].spec.tls",
        ),
    ] {
        let doc = config::load_sources(&Sources {
            config: None,
            istio: vec![dir.join(file)],
        })
        .unwrap_or_else(|e| panic!("{file}: {e:?}"));
        assert!(
            !doc.warnings.iter().any(|w| w.path.starts_with(path)),
            "{file}: a warning at {path}: {:?}",
            doc.warnings
        );
    }
}
