//! ACME against a real CA on loopback: Debian's `pebble` (Let's Encrypt's test CA), which
//! validates every challenge against Portico itself (`PEBBLE_VA_ALWAYS_VALID=0`): its
//! `httpPort` and `tlsPort` are the gateway's ephemeral HTTP and HTTPS ports, and names
//! resolve to 127.0.0.1 through a small DNS server of the test's (`-dnsserver`). Each test
//! runs its own pebble and gateway, so they run in parallel.
//!
//! Shown here: issuance for two hosts over HTTP-01 and over TLS-ALPN-01, a chain that
//! verifies against pebble's root, renewal at 2/3 of a short lifetime while a client makes
//! new TLS connections without one failing, a CA that is down at renewal time (the old
//! certificate keeps serving, the retry is scheduled), a restart that serves the stored
//! certificate with no CA, the stand-in and refusal while pending, and the config errors.

mod support;

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use support::dns::DnsServer;
use support::*;

const A: &str = "a.acme.test";
const B: &str = "b.acme.test";

// ---------------------------------------------------------------------------------------------
// pebble
// ---------------------------------------------------------------------------------------------

/// A running pebble: its ACME directory on 127.0.0.1:`port`, management API on `mgmt`.
struct Pebble {
    child: Option<Child>,
    port: u16,
    mgmt: u16,
    log: PathBuf,
}

/// The files pebble's own HTTPS needs (it ships no test certificate in Debian): a CA and a
/// leaf for localhost / 127.0.0.1 signed by it. Portico trusts the CA through the issuer's
/// `caCertificates`.
fn pebble_https_ca(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "pebble HTTPS test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    std::fs::write(dir.join("pebble-https-ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("pebble-https.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("pebble-https.key"), key.serialize_pem()).unwrap();
}

impl Pebble {
    /// Starts pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`,
    /// resolving names with `dns`; `validity` seconds per certificate (pebble's default,
    /// 5 years, when `None`). Listens on `port` (and `port`+`mgmt`), fresh ones if `None`.
    fn start(
        dir: &Path,
        http_port: u16,
        tls_port: u16,
        dns: SocketAddr,
        validity: Option<u64>,
        ports: Option<(u16, u16)>,
    ) -> Pebble {
        if !dir.join("pebble-https-ca.pem").exists() {
            pebble_https_ca(dir);
        }
        let (port, mgmt) = ports.unwrap_or_else(|| (free_port(), free_port()));
        let validity = validity
            .map(|v| format!(",\n    \"certificateValidityPeriod\": {v}"))
            .unwrap_or_default();
        let config = format!(
            r#"{{
  "pebble": {{
    "listenAddress": "127.0.0.1:{port}",
    "managementListenAddress": "127.0.0.1:{mgmt}",
    "certificate": "{cert}",
    "privateKey": "{key}",
    "httpPort": {http_port},
    "tlsPort": {tls_port},
    "ocspResponderURL": "",
    "externalAccountBindingRequired": false{validity}
  }}
}}"#,
            cert = dir.join("pebble-https.pem").display(),
            key = dir.join("pebble-https.key").display(),
        );
        let config_path = dir.join(format!("pebble-{port}.json"));
        std::fs::write(&config_path, config).unwrap();
        let log = dir.join(format!("pebble-{port}.log"));
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(dns.to_string())
            .arg("-strict=false")
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_VA_ALWAYS_VALID", "0")
            // Real validations every time: no authorization reused from an earlier order.
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(
                std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run pebble ({e}); install it: apt-get install pebble (.ci/run does)")
            });
        let pebble = Pebble {
            child: Some(child),
            port,
            mgmt,
            log,
        };
        let up = wait_until(Duration::from_secs(15), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
                && TcpStream::connect(("127.0.0.1", mgmt)).is_ok()
        });
        assert!(up, "pebble did not listen; log:\n{}", pebble.log());
        pebble
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The root of the chains pebble issues now (a new one each time pebble starts).
    fn root(&self) -> Vec<u8> {
        let mut conn = tls_connect(self.mgmt, Some("localhost")).expect("pebble management");
        let resp = conn.get("localhost", "/roots/0").expect("GET /roots/0");
        assert_eq!(resp.status, 200, "pebble /roots/0: {}", resp.text());
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(resp.body.as_slice())
            .expect("a PEM root")
            .to_vec()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!("==== pebble log ====\n{}", self.log());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A verifying TLS client
// ---------------------------------------------------------------------------------------------

/// A full TLS handshake with 127.0.0.1:`port` for `sni`, verifying the chain against
/// `root` (and the name). Returns the leaf's DER.
fn verified_leaf(port: u16, sni: &str, root: &[u8]) -> Result<Vec<u8>, String> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(root.to_vec()))
        .map_err(|e| format!("root: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let mut sock = TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(5),
    )
    .map_err(|e| format!("connect: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .map_err(|e| format!("handshake for {sni}: {e}"))?;
    }
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or_else(|| "no certificate".to_string())
}

fn serial(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.raw_serial_as_string()
}

fn sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn subject(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.subject().to_string()
}

// ---------------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------------

struct Setup {
    dir: tempfile::TempDir,
    dns: DnsServer,
    http: u16,
    https: u16,
    admin: u16,
}

impl Setup {
    fn new() -> Setup {
        let dns = DnsServer::start(60);
        for h in [A, B] {
            dns.set(h, &[Ipv4Addr::LOCALHOST]);
        }
        Setup {
            dir: tempfile::tempdir().unwrap(),
            dns,
            http: free_port(),
            https: free_port(),
            admin: free_port(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn pebble(&self, validity: Option<u64>) -> Pebble {
        Pebble::start(
            self.path(),
            self.http,
            self.https,
            self.dns.addr(),
            validity,
            None,
        )
    }

    /// A gateway whose HTTPS server for a.acme.test and b.acme.test orders its certificate
    /// from the CA at `acme_port`; with `plain_http`, a plain-HTTP server on the same hosts
    /// that redirects to https.
    fn config(
        &self,
        acme_port: u16,
        challenge: &str,
        plain_http: bool,
        extra_issuer: &str,
    ) -> String {
        self.config_on(
            (self.http, self.https, self.admin),
            acme_port,
            challenge,
            plain_http,
            extra_issuer,
        )
    }

    /// [`Setup::config`] on other ports (another replica), with the same credentials
    /// directory.
    fn config_on(
        &self,
        (http, https, admin): (u16, u16, u16),
        acme_port: u16,
        challenge: &str,
        plain_http: bool,
        extra_issuer: &str,
    ) -> String {
        let plain = if plain_http {
            format!(
                r#"
[[gateways.servers]]
port = {{ number = {http}, name = "http", protocol = "HTTP" }}
bind = "127.0.0.1"
hosts = ["{A}", "{B}"]
tls = {{ httpsRedirect = true }}
"#,
            )
        } else {
            String::new()
        };
        format!(
            r#"{mesh}credentialsDir = "{dir}/creds"

[[mesh.acmeIssuers]]
name = "pebble"
directory = "https://127.0.0.1:{acme_port}/dir"
email = "ops@acme.test"
termsOfServiceAgreed = true
caCertificates = "{dir}/pebble-https-ca.pem"
challenge = "{challenge}"
{extra_issuer}

[[gateways]]
name = "public"
{plain}
[[gateways.servers]]
port = {{ number = {https}, name = "https", protocol = "HTTPS" }}
bind = "127.0.0.1"
hosts = ["{A}", "{B}"]
tls = {{ mode = "SIMPLE", credentialName = "shop", acme = {{ issuer = "pebble" }} }}

[[virtualServices]]
name = "shop"
hosts = ["{A}", "{B}"]
gateways = ["public"]
[[virtualServices.http]]
directResponse = {{ status = 200, body = {{ string = "shop" }} }}
"#,
            mesh = mesh_config(admin),
            dir = self.path().display(),
        )
    }
}

/// The `/config` entry of managed certificate `name`.
fn acme_state(p: &Portico, name: &str) -> serde_json::Value {
    let c = p.config_json();
    c["acme"]
        .as_array()
        .and_then(|l| l.iter().find(|e| e["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no acme entry {name} in /config: {c}"))
}

/// Waits until the certificate `name` is issued (state `valid`); panics with the state.
fn wait_valid(p: &Portico, name: &str, timeout: Duration) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let ok = wait_until(timeout, || {
        last = acme_state(p, name);
        last["state"] == "valid"
    });
    assert!(
        ok,
        "certificate {name} not issued within {timeout:?}: {last}\n{}",
        p.log()
    );
    last
}

fn orders(p: &Portico, result: &str) -> f64 {
    metric_sum(
        &p.metrics(),
        "portico_acme_orders_total",
        &format!("result=\"{result}\""),
    )
    .unwrap_or(0.0)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn http01_issues_one_certificate_for_two_hosts_and_a_restart_serves_it_offline() {
    let s = Setup::new();
    let mut pebble = s.pebble(None);
    let config = s.config(pebble.port, "HTTP-01", true, "");
    let p = Portico::start(s.path(), &config);
    let state = wait_valid(&p, "shop", Duration::from_secs(60));
    assert_eq!(state["hosts"], serde_json::json!([A, B]));
    assert_eq!(state["challenge"], "HTTP-01");

    // Both names get the pebble-issued certificate, and its chain verifies to pebble's root.
    let root = pebble.root();
    let leaf = wait_for_leaf(s.https, A, &root);
    assert_eq!(
        sans(&leaf),
        vec![A.to_string(), B.to_string()],
        "one SAN certificate"
    );
    assert_eq!(verified_leaf(s.https, B, &root).unwrap(), leaf);
    // The pebble log shows the CA fetched the challenge from the gateway.
    assert!(
        pebble
            .log()
            .contains(&format!("validate w/ HTTP: http://{A}:{}", s.http)),
        "pebble log:\n{}",
        pebble.log()
    );
    // Over HTTPS the host is served as configured; over plain HTTP httpsRedirect still
    // applies to everything but the challenge path.
    let r = http_get(s.http, A, "/anything");
    assert_eq!(r.status, 301);
    let r = http_get(s.http, A, "/.well-known/acme-challenge/not-a-token");
    assert_eq!(r.status, 404, "an unknown token is not redirected");

    // Stored in the credentials layout, key 0600; the account key too.
    let creds = s.path().join("creds");
    assert_eq!(mode(&creds.join("shop/tls.key")), 0o600);
    assert!(creds.join("shop/tls.crt").exists());
    let accounts: Vec<_> = std::fs::read_dir(creds.join(".acme/accounts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    assert_eq!(mode(&accounts[0]), 0o600);
    assert_eq!(orders(&p, "success"), 1.0);
    assert!(p.log().contains("ACME certificate issued"), "{}", p.log());
    let expiry = metric_sum(
        &p.metrics(),
        "portico_certificate_expiry_seconds",
        &format!("host=\"{A}\""),
    );
    assert!(expiry.unwrap_or(0.0) > 1e9, "expiry metric: {expiry:?}");
    // A chain the CA no longer answers for is not needed: the next start is offline.
    pebble.stop();
    drop(p);

    let p = Portico::start(s.path(), &config);
    assert_eq!(
        verified_leaf(s.https, A, &root).unwrap(),
        leaf,
        "served from disk at once"
    );
    wait_valid(&p, "shop", Duration::from_secs(5));
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        orders(&p, "success") + orders(&p, "failure"),
        0.0,
        "no new order"
    );
    assert!(!p.log().contains("ACME order failed"), "{}", p.log());
}

/// The leaf for `sni`, once it verifies against `root` (the reload that installs it may
/// land a moment after `/config` says `valid`).
fn wait_for_leaf(port: u16, sni: &str, root: &[u8]) -> Vec<u8> {
    let mut last = Err(String::new());
    let ok = wait_until(Duration::from_secs(10), || {
        last = verified_leaf(port, sni, root);
        last.is_ok()
    });
    assert!(ok, "no verified handshake for {sni}: {last:?}");
    last.unwrap()
}

#[test]
fn tls_alpn01_issues_over_the_https_port_alone() {
    let s = Setup::new();
    let pebble = s.pebble(None);
    // No plain-HTTP server at all: the CA validates on the HTTPS port.
    let p = Portico::start(s.path(), &s.config(pebble.port, "TLS-ALPN-01", false, ""));
    let state = wait_valid(&p, "shop", Duration::from_secs(60));
    assert_eq!(state["challenge"], "TLS-ALPN-01");
    let root = pebble.root();
    let leaf = wait_for_leaf(s.https, A, &root);
    assert_eq!(sans(&leaf), vec![A.to_string(), B.to_string()]);
    assert!(
        pebble.log().contains("set VALID by completed challenge"),
        "pebble log:\n{}",
        pebble.log()
    );
    // An acme-tls/1 handshake with no validation under way gets no certificate; ordinary
    // clients are unaffected.
    assert!(tls_connect_alpn(s.https, Some(A), &["acme-tls/1"]).is_err());
    let mut conn = tls_connect(s.https, Some(A)).unwrap();
    assert_eq!(conn.get(A, "/").unwrap().text(), "shop");
}

#[test]
fn renewal_at_two_thirds_swaps_without_a_failed_handshake() {
    let s = Setup::new();
    // 30-second certificates: renewed 20 s after they start.
    let pebble = s.pebble(Some(30));
    let p = Portico::start(s.path(), &s.config(pebble.port, "HTTP-01", true, ""));
    let first = wait_valid(&p, "shop", Duration::from_secs(60));
    let (nb, na) = (
        first["notBefore"].as_i64().unwrap(),
        first["notAfter"].as_i64().unwrap(),
    );
    assert!(na - nb <= 31, "short-lived: {first}");
    assert_eq!(
        first["nextOrder"].as_i64().unwrap(),
        nb + (na - nb) * 2 / 3,
        "2/3 of the lifetime"
    );
    let root = pebble.root();
    let first_leaf = wait_for_leaf(s.https, A, &root);

    // New TLS connections, one after another, each verifying the chain, until a renewed
    // certificate has been served for a while.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new((
        Vec::<String>::new(),
        Vec::<String>::new(),
        0usize,
    )));
    let client = {
        let (stop, seen, root, port) = (stop.clone(), seen.clone(), root.clone(), s.https);
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let r = verified_leaf(port, A, &root);
                let mut g = seen.lock().unwrap();
                g.2 += 1;
                match r {
                    Ok(leaf) => {
                        let sn = serial(&leaf);
                        if g.0.last() != Some(&sn) {
                            g.0.push(sn);
                        }
                    }
                    Err(e) => g.1.push(e),
                }
                drop(g);
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let renewed = wait_until(Duration::from_secs(45), || {
        seen.lock().unwrap().0.len() >= 2
    });
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();
    let (serials, failures, handshakes) = seen.lock().unwrap().clone();
    assert!(renewed, "no renewal seen; serials {serials:?}\n{}", p.log());
    assert!(
        failures.is_empty(),
        "{} of {handshakes} handshakes failed: {failures:?}",
        failures.len()
    );
    assert_eq!(serials[0], serial(&first_leaf));
    assert!(handshakes > 50, "{handshakes} handshakes");
    assert!(orders(&p, "success") >= 2.0);
    let again = acme_state(&p, "shop");
    assert!(again["notAfter"].as_i64().unwrap() > na, "{again}");
}

#[test]
fn ca_down_at_renewal_keeps_the_old_certificate_and_schedules_a_retry() {
    let s = Setup::new();
    // 45-second certificates: due for renewal 30 s after they start.
    let mut pebble = s.pebble(Some(45));
    let ports = (pebble.port, pebble.mgmt);
    let p = Portico::start(s.path(), &s.config(pebble.port, "HTTP-01", true, ""));
    wait_valid(&p, "shop", Duration::from_secs(60));
    let root = pebble.root();
    let leaf = wait_for_leaf(s.https, A, &root);
    // Pebble rejects 5 % of nonces on purpose (`PEBBLE_WSFE_NONCEREJECT`): now and then
    // the first issuance fails once and is retried, so failures are counted from here.
    let failed_before = orders(&p, "failure");

    // The CA is down when the renewal comes due.
    pebble.stop();
    let mut state = serde_json::Value::Null;
    let failed = wait_until(Duration::from_secs(45), || {
        state = acme_state(&p, "shop");
        state["failures"] == 1
    });
    assert!(failed, "no failure recorded: {state}\n{}", p.log());
    assert_eq!(state["state"], "retrying");
    assert!(
        state["lastError"].as_str().is_some_and(|e| !e.is_empty()),
        "{state}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let wait = state["nextOrder"].as_i64().unwrap() - now;
    assert!((25..=61).contains(&wait), "retry in {wait}s: {state}");
    assert_eq!(orders(&p, "failure"), failed_before + 1.0);
    assert!(p.log().contains("ACME order failed"), "{}", p.log());
    // The old certificate still serves.
    assert_eq!(verified_leaf(s.https, A, &root).unwrap(), leaf);
    assert_eq!(p.admin_post("/acme/renew?name=nope").status, 404);

    // The CA is back (a new pebble: new root, and it knows no account): an operator's
    // renew-now registers the account again and installs the new certificate.
    let pebble2 = Pebble::start(s.path(), s.http, s.https, s.dns.addr(), None, Some(ports));
    let root2 = pebble2.root();
    assert_ne!(root2, root);
    assert_eq!(p.admin_post("/acme/renew").status, 202);
    let leaf2 = wait_for_leaf(s.https, A, &root2);
    assert_ne!(serial(&leaf2), serial(&leaf));
    let state = wait_valid(&p, "shop", Duration::from_secs(30));
    assert_eq!(state["failures"], 0, "{state}");
    assert!(p.log().contains("registering a new one"), "{}", p.log());
}

#[test]
fn pending_hosts_get_a_stand_in_or_nothing() {
    let s = Setup::new();
    // A CA that is not there: the first order keeps failing.
    let closed = free_port();
    pebble_https_ca(s.path());
    let p = Portico::start(s.path(), &s.config(closed, "HTTP-01", true, ""));
    let mut state = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(20), || {
            state = acme_state(&p, "shop");
            state["failures"] == 1
        }),
        "{state}"
    );
    assert_eq!(state["state"], "retrying", "{state}");
    let conn = tls_connect(s.https, Some(A)).expect("the stand-in is served");
    assert!(
        subject(&conn.peer_cert).contains("stand-in"),
        "{}",
        subject(&conn.peer_cert)
    );
    let listeners = p.config_json()["listeners"].clone();
    let https = listeners
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["protocol"] == "HTTPS")
        .unwrap()
        .clone();
    assert_eq!(https["certificates"][0]["standIn"], true, "{https}");
    // The stand-in is no certificate to alert on.
    assert!(metric_sum(&p.metrics(), "portico_certificate_expiry_seconds", "").is_none());
    drop(p);

    let s2 = Setup::new();
    pebble_https_ca(s2.path());
    let p = Portico::start(
        s2.path(),
        &s2.config(closed, "HTTP-01", true, "whilePending = \"REFUSE\""),
    );
    assert!(
        tls_connect(s2.https, Some(A)).is_err(),
        "refused while pending"
    );
    assert_eq!(acme_state(&p, "shop")["hosts"], serde_json::json!([A, B]));
}

#[test]
fn replicas_sharing_the_credentials_directory_order_once() {
    let s = Setup::new();
    let pebble = s.pebble(None);
    // Replica A listens where the CA validates; replica B has ports of its own and the same
    // credentials directory (as pods sharing a volume behind one load balancer would).
    let b_dir = tempfile::tempdir().unwrap();
    let b_ports = (free_port(), free_port(), free_port());
    let lock_path = s.path().join("creds/.acme/lock");
    std::fs::create_dir_all(lock_path.parent().unwrap()).unwrap();
    // The test holds the lock while A starts, so A finds another holder and waits ...
    let held = nix::fcntl::Flock::lock(
        std::fs::File::create(&lock_path).unwrap(),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .map_err(|(_, e)| e)
    .unwrap();
    let a = Portico::start(s.path(), &s.config(pebble.port, "HTTP-01", true, ""));
    let mut state = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), || {
            state = acme_state(&a, "shop");
            state["state"] == "waiting"
        }),
        "{state}"
    );
    drop(held);
    // ... and B, started now, takes the lock and orders. The CA validates on A's port:
    // A answers with the key authorization B published in the shared directory.
    let b = Portico::start(
        b_dir.path(),
        &s.config_on(b_ports, pebble.port, "HTTP-01", true, ""),
    );
    wait_valid(&b, "shop", Duration::from_secs(60));
    wait_valid(&a, "shop", Duration::from_secs(30));
    let root = pebble.root();
    let leaf = wait_for_leaf(b_ports.1, A, &root);
    assert_eq!(
        wait_for_leaf(s.https, A, &root),
        leaf,
        "A serves what B ordered"
    );
    // One order between them. B, started as the test lets the lock go, takes it first
    // unless A's retry (10-15 s after it found the lock held) comes before B is up, as
    // on a loaded machine; then A orders and B takes A's certificate. Either way, once.
    let (a_ok, b_ok) = (orders(&a, "success"), orders(&b, "success"));
    assert_eq!(a_ok + b_ok, 1.0, "one order: A {a_ok}, B {b_ok}");
    // Pebble rejects 5 % of nonces on purpose (`PEBBLE_WSFE_NONCEREJECT`); an order that
    // failed on those alone (retried, logged as such) is not one the lock let through.
    let rejected_nonces = [&a, &b]
        .iter()
        .map(|p| {
            p.log()
                .lines()
                .filter(|l| l.contains("ACME order failed") && l.contains("anti-replay nonce"))
                .count()
        })
        .sum::<usize>();
    assert_eq!(
        orders(&a, "failure") + orders(&b, "failure"),
        rejected_nonces as f64,
        "no failed order but on a rejected nonce"
    );
    assert!(
        a.log().contains("another replica holds the order lock"),
        "{}",
        a.log()
    );
    assert!(
        a.stdout().contains("acme_http01_challenge"),
        "the CA's validation requests reached A: {}",
        a.stdout()
    );
    // Challenge answers are taken down once the order is over.
    let left: Vec<_> = std::fs::read_dir(s.path().join("creds/.acme/http-01"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    pebble_https_ca(dir.path());
    let write = |extra_server: &str, issuer: &str| {
        let config = format!(
            r#"{mesh}
[[mesh.acmeIssuers]]
name = "ca"
directory = "https://127.0.0.1:1/dir"
termsOfServiceAgreed = true
{issuer}
[[gateways]]
name = "g"
[[gateways.servers]]
port = {{ number = 8443, name = "https", protocol = "HTTPS" }}
hosts = ["shop.example.com", "*.example.org"]
tls = {{ mode = "SIMPLE", credentialName = "shop", acme = {{ issuer = "ca" }} }}
{extra_server}
"#,
            mesh = mesh_config(15999)
        );
        let path = dir.path().join("portico.toml");
        std::fs::write(&path, config).unwrap();
        run_cli(&["validate", "-c", path.to_str().unwrap()])
    };
    let (code, out) = write("", "");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("*.example.org") && out.contains("DNS-01"),
        "{out}"
    );
    assert!(out.contains("gateways[0].servers[0].tls.acme"), "{out}");
    assert!(
        out.contains("HTTP-01 is answered on a plain-HTTP server's port"),
        "{out}"
    );
    let (code, out) = write("", "challenge = \"DNS-01\"\nkeyType = \"DSA\"");
    assert_eq!(code, 1);
    assert!(
        out.contains("mesh.acmeIssuers[0].challenge") && out.contains("DNS-01 is not supported"),
        "{out}"
    );
    assert!(out.contains("mesh.acmeIssuers[0].keyType"), "{out}");
}

#[test]
fn istio_yaml_takes_tls_acme_inline() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("gateway.yaml");
    let manifest = |host: &str| {
        format!(
            r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{ name: public }}
spec:
  servers:
  - port: {{ number: 8443, name: https, protocol: HTTPS }}
    hosts: ["{host}"]
    tls:
      mode: SIMPLE
      credentialName: shop
      acme:
        directory: https://acme-staging-v02.api.letsencrypt.org/directory
        email: ops@example.com
        termsOfServiceAgreed: true
        challenge: TLS-ALPN-01
"#
        )
    };
    std::fs::write(&yaml, manifest("shop.example.com")).unwrap();
    let (code, out) = run_cli(&["validate", "--istio", yaml.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("acme is not supported"), "{out}");
    // The same checks as in TOML, located in the manifest.
    std::fs::write(&yaml, manifest("*.example.com")).unwrap();
    let (code, out) = run_cli(&["validate", "--istio", yaml.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("gateway.yaml")
            && out.contains("DNS-01")
            && out.contains("documents[0].spec.servers[0].tls.acme"),
        "{out}"
    );
}

#[test]
fn rsa_2048_keys_are_ordered_when_asked_for() {
    let s = Setup::new();
    let pebble = s.pebble(None);
    let config = s.config(pebble.port, "TLS-ALPN-01", false, "keyType = \"RSA_2048\"");
    let p = Portico::start(s.path(), &config);
    wait_valid(&p, "shop", Duration::from_secs(60));
    let leaf = wait_for_leaf(s.https, A, &pebble.root());
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).expect("leaf parses");
    match cert.public_key().parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => {
            assert_eq!(rsa.key_size(), 2048, "an RSA 2048 key")
        }
        other => panic!("not an RSA key: {other:?}"),
    }
    // The stored key is the certificate's, and serves ordinary clients.
    let key = std::fs::read_to_string(s.path().join("creds/shop/tls.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8");
    let mut conn = tls_connect(s.https, Some(A)).unwrap();
    assert_eq!(conn.get(A, "/").unwrap().text(), "shop");
}
