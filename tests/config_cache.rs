//! The reload cache (`config::build_cached`): a build that reuses the parsed files and the
//! compiled routes of the last one must give exactly the Snapshot a full build gives, and
//! reuse only what did not change. Compared by the stable dump of listeners, routes,
//! certificates and clusters.

mod support;

use std::sync::Arc;

use portico::config::{self, Cache, Options, Sources};
use portico::routing::Action;
use portico::snapshot::Snapshot;
use support::*;

const MAIN: &str = r#"
include = ["vs-*.toml", "istio"]

[mesh]
admin = "127.0.0.1:@ADMIN@"

[[gateways]]
name = "web"
[[gateways.servers]]
port = { number = @PORT@, name = "http", protocol = "HTTP" }
bind = "127.0.0.1"
hosts = ["*"]

@UPSTREAMS@
"#;

const VS_A: &str = r#"
[[virtualServices]]
name = "shop"
hosts = ["shop.example.com"]
gateways = ["web"]
[[virtualServices.http]]
match = [{ uri = { prefix = "/cart" } }]
@to(v2)@
headers = { request = { set = { x-vs = "shop-@MARK@" } } }
[[virtualServices.http]]
@to(v1)@

[[virtualServices]]
name = "blog"
hosts = ["blog.example.com"]
gateways = ["web"]
[[virtualServices.http]]
@to(v1)@
mirror = { host = "svc.internal", subset = "v2", port = { number = 80 } }
"#;

const VS_B: &str = r#"
[[virtualServices]]
name = "api"
hosts = ["api.example.com", "shop.example.com"]
gateways = ["web"]
[[virtualServices.http]]
match = [{ uri = { prefix = "/v1" } }]
@to(v1)@
headers = { response = { set = { x-api = "@MARK@" } } }
"#;

const VS_YAML: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: docs
spec:
  hosts: ["docs.example.com"]
  gateways: ["web"]
  http:
  - route:
    - destination:
        host: svc.internal
        subset: v2
        port: { number: 80 }
"#;

struct Setup {
    _dir: tempfile::TempDir,
    main: std::path::PathBuf,
    dir: std::path::PathBuf,
    upstreams: Vec<(&'static str, u16)>,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let s = Setup {
            main: path.join("main.toml"),
            dir: path,
            _dir: dir,
            upstreams: vec![("v1", 18001), ("v2", 18002)],
        };
        s.write_main();
        s.write("vs-a.toml", VS_A, "1");
        s.write("vs-b.toml", VS_B, "1");
        std::fs::create_dir_all(s.dir.join("istio")).unwrap();
        write_atomic(&s.dir.join("istio/docs.yaml"), VS_YAML);
        s
    }

    fn write_main(&self) {
        let text = render(
            MAIN,
            &[
                ("ADMIN", "1".into()),
                ("PORT", "18000".into()),
                ("UPSTREAMS", upstreams_config(&self.upstreams)),
            ],
        );
        write_atomic(&self.main, text);
    }

    fn write(&self, name: &str, template: &str, mark: &str) {
        write_atomic(
            &self.dir.join(name),
            render(template, &[("MARK", mark.into())]),
        );
    }

    fn sources(&self) -> Sources {
        Sources::config(&self.main)
    }

    /// The main file with an HTTPS server for `hosts` (TOML strings, comma-separated) on
    /// the certificate pair `site.crt` / `site.key`.
    fn with_https(&self, main: &str, hosts: &str) {
        write_atomic(
            &self.main,
            format!(
                "{main}\n[[gateways.servers]]\nport = {{ number = 18443, name = \"https\", protocol = \"HTTPS\" }}\nbind = \"127.0.0.1\"\nhosts = [{hosts}]\ntls = {{ mode = \"SIMPLE\", serverCertificate = \"site.crt\", privateKey = \"site.key\" }}\n"
            ),
        );
    }
}

/// A build with the cache, as the Reloader does it (stamps taken as needed).
fn build(
    sources: &Sources,
    cache: &mut Cache,
) -> Result<config::Compiled, Vec<config::ConfigError>> {
    config::build_cached(sources, &Options::default(), cache, &Default::default())
}

fn full(sources: &Sources) -> Snapshot {
    config::build_sources(sources, &Options::default())
        .unwrap_or_else(|e| panic!("{e:?}"))
        .snapshot
}

/// Builds with the cache, checks the result against a full build, returns how many
/// VirtualServices were reused and the dump.
fn cached(sources: &Sources, cache: &mut Cache) -> (usize, String) {
    let c = build(sources, cache).unwrap_or_else(|e| panic!("{e:?}"));
    clusters_are_the_snapshots(&c.snapshot);
    let got = dump(&c.snapshot);
    assert_eq!(
        got,
        dump(&full(sources)),
        "cached build differs from a full one"
    );
    (c.reused, got)
}

/// Every cluster a route sends to (or mirrors to) is one of the Snapshot's clusters, the
/// same object: reused routes must not keep a twin of a cluster compiled again.
fn clusters_are_the_snapshots(s: &Snapshot) {
    let mut checked = 0;
    for l in &s.listeners {
        for (_, vhost) in l.table.vhosts.patterns() {
            for r in vhost.routes.iter() {
                let Action::Forward(f) = &r.action else {
                    continue;
                };
                let used = f
                    .destinations
                    .iter()
                    .map(|d| &d.cluster)
                    .chain(f.mirrors.iter().map(|m| &m.cluster));
                for c in used {
                    assert!(
                        s.clusters.iter().any(|sc| Arc::ptr_eq(sc, c)),
                        "route {} uses a cluster {} that is not the Snapshot's",
                        r.origin,
                        c.name
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 5, "clusters checked: {checked}");
}

#[test]
fn unchanged_files_are_reused_and_the_result_is_a_full_builds() {
    let s = Setup::new();
    let sources = s.sources();
    let mut cache = Cache::default();

    let (reused, first) = cached(&sources, &mut cache);
    assert_eq!(reused, 0, "nothing to reuse on the first build");
    assert!(first.contains("shop-1"), "{first}");

    let (reused, again) = cached(&sources, &mut cache);
    assert_eq!(
        reused, 4,
        "no file changed: all four VirtualServices reused"
    );
    assert_eq!(again, first);

    // One include file changes: its VirtualService is compiled, the other three reused.
    s.write("vs-b.toml", VS_B, "2");
    let (reused, changed) = cached(&sources, &mut cache);
    assert_eq!(reused, 3);
    assert_ne!(changed, first, "the new header value is served");
    assert!(changed.contains("\"2\""), "{changed}");

    // The YAML manifest changes (its subset): the TOML VirtualServices are reused.
    write_atomic(
        &s.dir.join("istio/docs.yaml"),
        VS_YAML.replace("subset: v2", "subset: v1"),
    );
    let (reused, _) = cached(&sources, &mut cache);
    assert_eq!(reused, 3);
}

#[test]
fn a_file_rewritten_in_place_is_read_again() {
    // Same length, same inode, within the same timestamp tick as the last read: its stamp
    // may be unchanged, so the cache must compare the text.
    let s = Setup::new();
    let sources = s.sources();
    let mut cache = Cache::default();
    cached(&sources, &mut cache);
    let path = s.dir.join("vs-b.toml");
    std::fs::write(&path, render(VS_B, &[("MARK", "7".into())])).unwrap();
    let (reused, after) = cached(&sources, &mut cache);
    assert_eq!(reused, 3);
    assert!(after.contains("\"7\""), "{after}");
}

#[test]
fn a_changed_rule_or_entry_recompiles_everything() {
    let mut s = Setup::new();
    let sources = s.sources();
    let mut cache = Cache::default();
    cached(&sources, &mut cache);

    // The DestinationRule's subsets and the ServiceEntry's endpoints change in main.toml:
    // every cluster and route is compiled again, with the new endpoint port.
    s.upstreams = vec![("v1", 18011), ("v2", 18002)];
    s.write_main();
    let (reused, after) = cached(&sources, &mut cache);
    assert_eq!(reused, 0);
    assert!(after.contains("18011"), "{after}");
    let (reused, _) = cached(&sources, &mut cache);
    assert_eq!(reused, 4);
}

#[test]
fn a_rejected_build_keeps_the_cache_of_the_last_good_one() {
    let s = Setup::new();
    let sources = s.sources();
    let mut cache = Cache::default();
    cached(&sources, &mut cache);

    // A syntax error in one file, then an undefined subset in another: both rejected.
    write_atomic(&s.dir.join("vs-a.toml"), "[[virtualServices]\n");
    let err = build(&sources, &mut cache)
        .err()
        .expect("syntax error rejected");
    assert!(err[0].to_string().contains("vs-a.toml"), "{err:?}");
    s.write("vs-a.toml", VS_A, "1");
    s.write("vs-b.toml", &VS_B.replace("(v1)", "(v9)"), "1");
    let err = build(&sources, &mut cache)
        .err()
        .expect("undefined subset rejected");
    assert!(err[0].to_string().contains("v9"), "{err:?}");

    // Fixed: vs-a.toml is as it was, so its two VirtualServices and the manifest's are reused.
    s.write("vs-b.toml", VS_B, "3");
    let (reused, now) = cached(&sources, &mut cache);
    assert_eq!(reused, 3);
    assert!(now.contains("\"3\""), "{now}");
}

#[test]
fn a_changed_certificate_file_recompiles() {
    let s = Setup::new();
    let sources = s.sources();
    // An HTTPS server with a certificate file: the file is an input of the build.
    let main = std::fs::read_to_string(&s.main).unwrap();
    write_cert(&s.dir, "site", &["shop.example.com"]);
    s.with_https(&main, "\"*\"");
    let mut cache = Cache::default();
    let (_, before) = cached(&sources, &mut cache);
    assert!(before.contains("site.crt"), "{before}");
    assert_eq!(cached(&sources, &mut cache).0, 4);

    // A renewed certificate (same paths) must be read again, not taken from the cache.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let der = write_cert(&s.dir, "site", &["shop.example.com", "www.example.com"]);
    let c = build(&sources, &mut cache).unwrap();
    assert_eq!(
        c.reused, 0,
        "a changed file read by the compile: full compile"
    );
    let listener = c
        .snapshot
        .listeners
        .iter()
        .find(|l| l.tls)
        .expect("the HTTPS listener");
    let certs = listener.certs.as_ref().unwrap();
    let served = certs
        .default
        .as_ref()
        .or_else(|| certs.hosts.patterns().into_iter().next().map(|(_, c)| c));
    let served = served.expect("a certificate");
    assert_eq!(
        served.key.cert[0].as_ref(),
        der.as_slice(),
        "the renewed certificate is served"
    );
}

#[test]
fn reused_routes_do_not_outlive_their_file() {
    // A removed include file takes its VirtualServices with it.
    let s = Setup::new();
    let sources = s.sources();
    let mut cache = Cache::default();
    cached(&sources, &mut cache);
    std::fs::remove_file(s.dir.join("vs-b.toml")).unwrap();
    let (reused, after) = cached(&sources, &mut cache);
    assert_eq!(reused, 3);
    assert!(!after.contains("api.example.com"), "{after}");
}

const VS_WIDE: &str = r#"
[[virtualServices]]
name = "wide"
hosts = ["*.example.com", "shop.example.com"]
gateways = ["web"]
[[virtualServices.http]]
match = [{ gateways = ["mesh"], uri = { prefix = "/internal" } }]
@to(v2)@
[[virtualServices.http]]
@to(v2)@
headers = { request = { set = { x-wide = "@MARK@" } } }
"#;

const VS_SIDECAR: &str = r#"
[[virtualServices]]
name = "sidecar-only"
hosts = ["side.example.com"]
gateways = ["mesh"]
[[virtualServices.http]]
@to(v1)@
"#;

#[test]
fn a_reload_binds_only_the_virtual_services_that_changed() {
    // With the gateways unchanged, the last build's tables are patched: the VirtualServices
    // that changed or went are unbound, the new ones bound, and the domains they touch
    // rebuilt. Every step must give what a full build gives, warnings included, and
    // shop.example.com (bound by "shop" in vs-a and "api" in vs-b) must keep the routes of
    // its VirtualServices in document order.
    let s = Setup::new();
    let sources = s.sources();
    let mut cache = Cache::default();
    let mut step = |what: &str, rebound: usize| {
        let c = build(&sources, &mut cache).unwrap_or_else(|e| panic!("{what}: {e:?}"));
        let f = config::build_sources(&sources, &Options::default())
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(dump(&c.snapshot), dump(&f.snapshot), "{what}");
        let said = |w: &[config::ConfigError]| w.iter().map(|e| e.to_string()).collect::<Vec<_>>();
        assert_eq!(said(&c.warnings), said(&f.warnings), "{what}");
        assert_eq!(c.rebound, rebound, "{what}: VirtualServices bound");
        clusters_are_the_snapshots(&c.snapshot);
        dump(&c.snapshot)
    };

    step("first build", 4);
    step("nothing changed", 0);
    s.write("vs-a.toml", VS_A, "2");
    let shop = step("vs-a changed (shop, blog)", 2);
    assert!(shop.contains("shop-2"), "{shop}");

    // "wide" warns (a match only for `mesh`), so it has no cache entry and is bound again
    // whenever the tables are patched; "sidecar-only" warns too and binds nowhere.
    s.write("vs-c.toml", VS_WIDE, "1");
    s.write("vs-d.toml", VS_SIDECAR, "1");
    let wide = step("vs-c (wide) and vs-d (sidecar-only) added", 1);
    assert!(wide.contains("vhost *.example.com"), "{wide}");
    step("nothing changed, two warnings", 1);
    s.write("vs-b.toml", VS_B, "2");
    step("vs-b changed (api)", 2);
    std::fs::remove_file(s.dir.join("vs-c.toml")).unwrap();
    let gone = step("vs-c removed", 0);
    assert!(!gone.contains("*.example.com"), "{gone}");

    // Renamed to sort first: "api" is now bound before "shop" on shop.example.com.
    std::fs::rename(s.dir.join("vs-b.toml"), s.dir.join("vs-0.toml")).unwrap();
    step("vs-b renamed vs-0", 1);
    std::fs::remove_file(s.dir.join("vs-0.toml")).unwrap();
    let last = step("vs-0 removed", 0);
    assert!(!last.contains("api.example.com"), "{last}");

    // A manifest added to the YAML folder sorts before the one there.
    write_atomic(
        &s.dir.join("istio/a-extra.yaml"),
        VS_YAML
            .replace("name: docs", "name: extra")
            .replace("docs.example.com", "extra.example.com"),
    );
    let extra = step("istio/a-extra.yaml added", 1);
    assert!(extra.contains("vhost extra.example.com"), "{extra}");
}

/// Sets a file's modification time 10 s back: a file written just now may still change
/// within the same timestamp tick, so the cache trusts only older stamps.
fn age(path: &std::path::Path) {
    let past = std::time::SystemTime::now() - std::time::Duration::from_secs(10);
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(past).unwrap();
}

#[test]
fn gateway_tables_are_shared_until_a_gateway_or_certificate_changes() {
    let s = Setup::new();
    let sources = s.sources();
    write_cert(&s.dir, "site", &["shop.example.com"]);
    age(&s.dir.join("site.crt"));
    age(&s.dir.join("site.key"));
    let main = std::fs::read_to_string(&s.main).unwrap();
    s.with_https(&main, "\"shop.example.com\"");
    let mut cache = Cache::default();
    let snapshot = |cache: &mut Cache| {
        let snapshot = build(&sources, cache)
            .unwrap_or_else(|e| panic!("{e:?}"))
            .snapshot;
        assert_eq!(dump(&snapshot), dump(&full(&sources)));
        snapshot
    };
    fn tls(s: &Snapshot) -> &portico::snapshot::Listener {
        s.listeners
            .iter()
            .find(|l| l.tls)
            .expect("the HTTPS listener")
    }
    let shared = |a: &Snapshot, b: &Snapshot| {
        let (a, b) = (tls(a), tls(b));
        let certs = Arc::ptr_eq(a.certs.as_ref().unwrap(), b.certs.as_ref().unwrap());
        let servers = Arc::ptr_eq(&a.table.servers, &b.table.servers);
        assert_eq!(certs, servers, "both tables are reused or neither");
        certs
    };

    let first = snapshot(&mut cache);
    // A VirtualService changes, the Gateways and the certificate do not.
    s.write("vs-b.toml", VS_B, "2");
    let second = snapshot(&mut cache);
    assert!(shared(&first, &second), "unchanged gateways: same tables");

    // The certificate is renewed: the tables are built again, with the new certificate.
    let der = write_cert(&s.dir, "site", &["shop.example.com", "www.example.com"]);
    let third = snapshot(&mut cache);
    assert!(
        !shared(&second, &third),
        "a renewed certificate: new tables"
    );
    let served = tls(&third).certs.as_ref().unwrap().hosts.patterns();
    assert_eq!(served[0].1.key.cert[0].as_ref(), der.as_slice());

    // The Gateway gains a host (main.toml changes): new tables that hold it.
    age(&s.dir.join("site.crt"));
    age(&s.dir.join("site.key"));
    s.with_https(&main, "\"shop.example.com\", \"www.example.com\"");
    let fourth = snapshot(&mut cache);
    assert!(!shared(&third, &fourth), "a changed Gateway: new tables");
    assert!(tls(&fourth)
        .table
        .servers
        .get_pattern("www.example.com")
        .is_some());
    let fifth = snapshot(&mut cache);
    assert!(shared(&fourth, &fifth), "nothing changed: the same tables");
}
