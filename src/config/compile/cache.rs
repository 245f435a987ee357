//! What one compile leaves for the next: the routes of each VirtualService, the clusters,
//! the parsed certificate pairs and the gateways' listener tables, each valid while what it
//! was compiled from is the same (`Context`, file stamps, the same `Arc`s from the load
//! cache). Decides nothing about the config itself: it only tells `compile_cached` what it
//! may take instead of compiling again.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use super::binding::BoundState;
use super::gateways::{GatewayInfo, ListenerBuild};
use super::{policy, Cx, Options};
use crate::config::load::{settled, Document, FileStamp, Stamps};
use crate::config::schema;
use crate::routing::Route;
use crate::upstream::Cluster;

/// What the last compile built that the next may reuse: the HTTP routes of each
/// VirtualService and the clusters, valid while everything they were compiled from is the
/// same — the VirtualService itself (the same `Arc` from the load `Cache`: its file's text
/// did not change), the gateways it bound to, the mesh settings, every DestinationRule and
/// ServiceEntry, the files compiling read (CA and certificate files) and the DNS answers.
/// Anything else changed means a full compile. With this, a reload after one file of a
/// 10 000-host config changed compiles only that file's VirtualServices.
#[derive(Default)]
pub struct Cache {
    pub(super) context: Option<Context>,
    /// By the address of the VirtualService's `Arc` (the entry holds the `Arc`, so the
    /// address is not reused while the entry lives).
    pub(super) routes: foldhash::HashMap<usize, CachedRoutes>,
    pub(super) clusters: BTreeMap<String, Arc<Cluster>>,
    /// Parsed certificate pairs by (certificate, key) path, reused while the SHA-256 of the
    /// two files' contents is the same: a thousand ECDSA keys take ~60 ms to parse.
    pub(super) certs: HashMap<(PathBuf, PathBuf), CachedCert>,
    pub(super) gateways: Option<CachedGateways>,
    pub(super) bound: Option<BoundState>,
    /// Rate-limit buckets, access lists and the Redis client, carried while unchanged.
    pub(super) policies: policy::PolicyCache,
    /// The request caps' counts of each listener, by address, carried while a cap is set.
    pub(super) request_counts: HashMap<SocketAddr, Arc<crate::listener::RequestCounts>>,
}

/// The gateways and the listener tables built from them (server hosts, certificates by
/// name), before any VirtualService is bound: reused while the Gateways (the same `Arc`s),
/// the mesh settings and every certificate pair they load are unchanged. A config with a
/// thousand HTTPS servers would otherwise rebuild ~40 000 table entries on every reload.
pub(super) struct CachedGateways {
    pub(super) specs: Vec<Arc<schema::Gateway>>,
    pub(super) mesh: Arc<schema::Mesh>,
    pub(super) credentials_dir: PathBuf,
    pub(super) generate_missing_certs: bool,
    /// The certificate pairs loaded, and the files to watch.
    pub(super) pairs: Vec<(PathBuf, PathBuf)>,
    /// Client CA and CRL files (and the credential files looked for), as they were.
    pub(super) client_files: Vec<ClientFile>,
    pub(super) watched: Vec<PathBuf>,
    /// The certificates the gateways order over ACME.
    pub(super) acme: Vec<Arc<crate::tls::acme::ManagedCert>>,
    pub(super) gateways: Arc<HashMap<String, GatewayInfo>>,
    pub(super) listeners: BTreeMap<u16, ListenerBuild>,
}

impl CachedGateways {
    pub(super) fn holds(&self, doc: &Document, cx: &Cx) -> bool {
        self.specs.len() == doc.gateways.len()
            && self
                .specs
                .iter()
                .zip(&doc.gateways)
                .all(|(a, b)| Arc::ptr_eq(a, &b.spec))
            && Arc::ptr_eq(&self.mesh, &doc.mesh.spec)
            && self.credentials_dir == cx.credentials_dir
            && self.generate_missing_certs == cx.opts.generate_missing_certs
            && self.pairs.iter().all(|(c, k)| cx.pair_unchanged(c, k))
            && self.client_files.iter().all(|f| f.unchanged(&cx.stamps))
    }
}

/// A file a client-certificate policy was built from (or looked for and not found).
#[derive(Clone)]
pub(super) struct ClientFile {
    pub(super) path: PathBuf,
    pub(super) stamp: Option<FileStamp>,
    pub(super) read_at: std::time::SystemTime,
}

impl ClientFile {
    pub(super) fn unchanged(&self, stamps: &Stamps) -> bool {
        stamps.of(&self.path) == self.stamp
            && (self.stamp.is_none() || settled(&self.stamp, self.read_at))
    }
}

pub(super) struct CachedCert {
    /// Both files' stamps just before they were read, and when: settled stamps that are
    /// the same spare reading the files (as `load::Cache` does for config files).
    pub(super) stamps: (Option<FileStamp>, Option<FileStamp>),
    pub(super) read_at: std::time::SystemTime,
    pub(super) digest: [u8; 32],
    pub(super) key: Arc<rustls::sign::CertifiedKey>,
    pub(super) not_after: i64,
    pub(super) subject: String,
}

impl CachedCert {
    /// Both files have the stamps they had when read, and had them well before.
    pub(super) fn unchanged(&self, now: &(Option<FileStamp>, Option<FileStamp>)) -> bool {
        self.stamps == *now
            && settled(&self.stamps.0, self.read_at)
            && settled(&self.stamps.1, self.read_at)
    }
}

pub(super) fn pair_digest(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&(cert.len() as u64).to_be_bytes());
    ctx.update(cert);
    ctx.update(key);
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

pub(super) struct Context {
    mesh: Arc<schema::Mesh>,
    destination_rules: Vec<Arc<schema::DestinationRule>>,
    service_entries: Vec<Arc<schema::ServiceEntry>>,
    generate_missing_certs: bool,
    dns_epoch: u64,
    /// Files read while compiling (certificates, CAs), as they were.
    pub(super) files: Vec<(PathBuf, Option<FileStamp>)>,
}

impl Context {
    pub(super) fn of(doc: &Document, opts: &Options, dns_epoch: u64) -> Context {
        Context {
            mesh: doc.mesh.spec.clone(),
            destination_rules: doc
                .destination_rules
                .iter()
                .map(|i| i.spec.clone())
                .collect(),
            service_entries: doc.service_entries.iter().map(|i| i.spec.clone()).collect(),
            generate_missing_certs: opts.generate_missing_certs,
            dns_epoch,
            files: Vec::new(),
        }
    }

    /// `now`: the files of `self` stamped at the start of this compile.
    pub(super) fn same(&self, other: &Context, now: &Stamps) -> bool {
        fn same<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
        }
        Arc::ptr_eq(&self.mesh, &other.mesh)
            && same(&self.destination_rules, &other.destination_rules)
            && same(&self.service_entries, &other.service_entries)
            && self.generate_missing_certs == other.generate_missing_certs
            && self.dns_epoch == other.dns_epoch
            && self.files.iter().all(|(p, s)| now.of(p) == *s)
    }
}

pub(super) struct CachedRoutes {
    pub(super) spec: Arc<schema::VirtualService>,
    pub(super) bound: Vec<String>,
    pub(super) routes: VsRoutes,
    /// The clusters the routes use (the objects, not their names: a reused VirtualService
    /// takes them into the compile without a lookup by name), and the DNS names those were
    /// compiled from.
    pub(super) clusters: Vec<Arc<Cluster>>,
    pub(super) dns_names: Vec<Arc<crate::egress::dns::DnsName>>,
    /// Its position among the VirtualServices of the compile that last used it.
    pub(super) pos: u32,
    /// Binding it to its gateways (and its TLS and TCP routes to their ports) warned of
    /// nothing: a reused one that did warns again.
    pub(super) quiet: bool,
}

/// A VirtualService's compiled HTTP routes.
#[derive(Clone)]
pub(super) struct VsRoutes {
    pub(super) routes: Arc<[Arc<Route>]>,
    /// Whether a match block names gateways (then each gateway gets its own subset).
    pub(super) per_gateway: bool,
}

/// The previous compile's results, while its context holds.
pub(super) struct Reuse {
    pub(super) routes: foldhash::HashMap<usize, CachedRoutes>,
    pub(super) clusters: BTreeMap<String, Arc<Cluster>>,
}
