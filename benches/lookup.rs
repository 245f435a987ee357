//! Micro-benchmarks of the two lookups on every request / handshake: the route decision
//! (host table, then first matching route) and the SNI certificate resolver. Tables of 10
//! and 10 000 virtual hosts show whether lookup cost grows with the table.
//!
//! Run: `cargo bench --bench lookup`

use std::fmt::Write as _;
use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::HeaderMap;
use portico::config;
use portico::routing::{normalize_host, Decision, RequestView};
use portico::tls::{CertStore, ServerCert};

/// A config with `hosts` virtual hosts of 10 routes each (the last one a catch-all).
fn config(hosts: usize) -> String {
    let mut c = String::from(
        "[mesh]\naccessLogFile = \"\"\n[[gateways]]\nname = \"edge\"\n[[gateways.servers]]\nport = { number = 8080, name = \"http\", protocol = \"HTTP\" }\nhosts = [\"*\"]\n",
    );
    for h in 0..hosts {
        let _ = write!(c, "[[virtualServices]]\nname = \"vs{h}\"\nhosts = [\"host{h}.example.com\"]\ngateways = [\"edge\"]\n");
        for r in 0..9 {
            let _ = write!(
                c,
                "[[virtualServices.http]]\nmatch = [{{ uri = {{ prefix = \"/api/v{r}/\" }}, headers = {{ x-tenant = {{ exact = \"t{r}\" }} }} }}]\ndirectResponse = {{ status = 200 }}\n"
            );
        }
        c.push_str("[[virtualServices.http]]\ndirectResponse = { status = 200 }\n");
    }
    c
}

fn compile(hosts: usize) -> portico::snapshot::Snapshot {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.toml");
    std::fs::write(&path, config(hosts)).unwrap();
    config::build(&path, &config::Options::default())
        .unwrap_or_else(|e| panic!("{}", config::ConfigErrors(e)))
        .snapshot
}

fn route_lookup(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", "t8".parse().unwrap());
    for hosts in [10usize, 10_000] {
        let snapshot = compile(hosts);
        let table = &snapshot.listeners[0].table;
        let host = format!("Host{}.Example.com:8080", hosts - 1);
        c.bench_function(
            &format!("route lookup, {hosts} hosts, 9th of 10 routes"),
            |b| {
                b.iter(|| {
                    let authority = black_box(host.as_str());
                    let normalized = normalize_host(authority);
                    let view = RequestView {
                        method: "GET",
                        path: black_box("/api/v8/items"),
                        query: None,
                        authority,
                        scheme: "http",
                        headers: portico::routing::Headers::Map(&headers),
                        port: 8080,
                        client_ip: None,
                        peer_ip: None,
                        sni: None,
                        peer_principal: None,
                    };
                    match table.decide(&normalized, &view) {
                        Decision::Route { match_index, .. } => match_index,
                        _ => panic!("no route"),
                    }
                })
            },
        );
    }
}

fn sni_lookup(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = (dir.path().join("c.crt"), dir.path().join("c.key"));
    portico::tls::generate_self_signed(&crt, &key, &["bench.example.com".into()]).unwrap();
    let (certified, not_after, subject) = portico::tls::load_pair(&crt, &key).unwrap();
    let cert = Arc::new(ServerCert {
        key: Arc::new(certified),
        require_tls13: false,
        cert_path: crt,
        not_after,
        subject,
        stand_in: false,
    });
    for n in [3usize, 1000] {
        let mut store = CertStore::default();
        for i in 0..n {
            store
                .hosts
                .insert(&format!("site{i}.example.com"), cert.clone());
        }
        store.hosts.insert("*.wild.example.org", cert.clone());
        let exact = format!("site{}.example.com", n - 1);
        c.bench_function(&format!("SNI resolve, {n} certificates, exact"), |b| {
            b.iter(|| {
                store
                    .resolve(black_box(Some(exact.as_str())), true)
                    .is_some()
            })
        });
        c.bench_function(&format!("SNI resolve, {n} certificates, wildcard"), |b| {
            b.iter(|| {
                store
                    .resolve(black_box(Some("a.b.wild.example.org")), true)
                    .is_some()
            })
        });
    }
}

criterion_group!(benches, route_lookup, sni_lookup);
criterion_main!(benches);
