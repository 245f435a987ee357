//! The raw configuration document: serde structs with Istio's field names, verbatim.
//!
//! Nothing here is checked beyond its shape; `config::compile` turns these into typed,
//! validated structures. Unknown fields are collected by `config::load` (serde_ignored):
//! errors with a location in TOML, warnings naming the field in Istio YAML (errors where
//! ignoring one would widen a match); never silently ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::duration::Duration;

/// One configuration file, as written. `include` pulls in more files of the same shape.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct File {
    #[serde(default)]
    pub include: Vec<String>,
    pub mesh: Option<Mesh>,
    #[serde(default)]
    pub gateways: Vec<Gateway>,
    #[serde(default)]
    pub virtual_services: Vec<VirtualService>,
    #[serde(default)]
    pub destination_rules: Vec<DestinationRule>,
    #[serde(default)]
    pub service_entries: Vec<ServiceEntry>,
    /// Portico's RateLimitPolicy: local and global (Redis) rate limits.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitPolicy>,
    /// Portico's AccessList: allow or deny lists of addresses or values.
    #[serde(default)]
    pub access_lists: Vec<AccessList>,
    /// Istio's RequestAuthentication: JWTs verified at the gateway.
    #[serde(default)]
    pub request_authentications: Vec<RequestAuthentication>,
    /// Istio's AuthorizationPolicy (security.istio.io/v1).
    #[serde(default)]
    pub authorization_policies: Vec<AuthorizationPolicy>,
}

/// Portico's own settings, named as Istio's MeshConfig names them where one exists.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mesh {
    /// Admin API address. Default `127.0.0.1:15000`.
    pub admin: Option<String>,
    /// Portico extension: a file holding a bearer token that every admin request but
    /// `GET /healthz` and `GET /ready` must carry. Relative to the main config file.
    /// Default: none (no token).
    pub admin_token_file: Option<String>,
    /// Where `credentialName = "x"` looks for `x/tls.crt` and `x/tls.key`. Relative paths are
    /// relative to the file that sets it. Default: `certs` beside the main config file.
    pub credentials_dir: Option<String>,
    /// Portico extension: generate a self-signed certificate for a missing credential
    /// (demo and first-run use only). Default false.
    pub self_signed_when_missing: Option<bool>,
    /// `REGISTRY_ONLY` (default) or `ALLOW_ANY`: what the forward proxy of egress servers
    /// does with hosts no ServiceEntry registers.
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// Portico extension: nameservers (`IP:port`) for egress DNS (ServiceEntry names, and
    /// names a forward-proxy client asks for). Default: the system resolver.
    #[serde(default)]
    pub dns_servers: Vec<String>,
    /// Upstream TCP connect timeout (Istio `connectTimeout`). Default 10s.
    pub connect_timeout: Option<Duration>,
    /// How long a TLS handshake may take before the connection is closed. Default 10s.
    pub tls_handshake_timeout: Option<Duration>,
    /// How often the config file, its includes and certificates are checked for changes.
    /// Default 500ms.
    pub reload_poll_interval: Option<Duration>,
    /// Graceful shutdown: how long in-flight requests get after SIGTERM. Default 5s.
    pub drain_duration: Option<Duration>,
    /// Access log destination: a file path or `/dev/stdout` (default); `""` turns it off.
    pub access_log_file: Option<String>,
    /// `JSON` (default) or `TEXT`.
    pub access_log_encoding: Option<String>,
    /// Envoy-style format string for `TEXT` (default: Istio's text format).
    pub access_log_format: Option<String>,
    pub default_config: Option<ProxyConfig>,
    /// Unix socket over which `portico run --upgrade` receives the listening sockets of the
    /// running process (on its SIGQUIT). Default: `portico-upgrade.sock` in the temp dir.
    pub upgrade_socket: Option<String>,
    #[serde(default)]
    pub extension_providers: Vec<ExtensionProvider>,
    /// Istio MeshConfig `pathNormalization`: how request paths are normalized before
    /// routing (and forwarded).
    pub path_normalization: Option<PathNormalization>,
    /// Portico extension: timeouts and limits of client connections and requests, with
    /// Envoy's names where it has one (README, Hardening).
    pub downstream: Option<Downstream>,
    /// Portico extension: ACME accounts that Gateway servers name in `tls.acme.issuer`
    /// (README, Certificates from ACME).
    #[serde(default)]
    pub acme_issuers: Vec<Acme>,
    /// Portico extension: the Redis that global rate limits count in.
    pub redis: Option<Redis>,
    /// Istio MeshConfig `rootNamespace`: an AuthorizationPolicy here applies to every
    /// gateway. Default `istio-system`.
    pub root_namespace: Option<String>,
    /// Portico extension: the workload certificate that `tls.mode = ISTIO_MUTUAL` presents
    /// and the mesh root it trusts, as files (what istiod would issue over SDS).
    pub workload_certificates: Option<WorkloadCertificates>,
}

/// `mesh.workloadCertificates`: PEM files, relative to the main config file. The defaults
/// are the paths of Istio's file-mounted workload certificates.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadCertificates {
    /// The certificate chain, leaf first. Default `/etc/certs/cert-chain.pem`.
    pub cert_chain: Option<String>,
    /// Its private key. Default `/etc/certs/key.pem`.
    pub private_key: Option<String>,
    /// The mesh root(s) peers' certificates are verified against. Default
    /// `/etc/certs/root-cert.pem`.
    pub root_cert: Option<String>,
}

/// Portico extension: where a server's certificate comes from when Portico orders it
/// itself over ACME (RFC 8555). As `mesh.acmeIssuers[]`, a named issuer; as a server's
/// `tls.acme`, either `issuer = "NAME"` (with any field here overriding the issuer's) or
/// the issuer written inline.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Acme {
    /// The issuer's name (`mesh.acmeIssuers` only).
    pub name: Option<String>,
    /// A `mesh.acmeIssuers` entry to take the unset fields from (`tls.acme` only).
    pub issuer: Option<String>,
    /// The CA's ACME directory URL (https).
    pub directory: Option<String>,
    /// Contact address the CA may write to (expiry and policy notices).
    pub email: Option<String>,
    /// Must be true: the CA's terms of service are agreed to when the account is made.
    pub terms_of_service_agreed: Option<bool>,
    /// External account binding, for CAs that require one (ZeroSSL, Google, ...).
    pub external_account_binding: Option<ExternalAccountBinding>,
    /// `ECDSA_P256` (default) or `ECDSA_P384`: the certificate's key.
    pub key_type: Option<String>,
    /// `HTTP-01` (default) or `TLS-ALPN-01`.
    pub challenge: Option<String>,
    /// PEM CA certificates that sign the ACME server's own HTTPS certificate (a private or
    /// test CA). Default: the system's roots.
    pub ca_certificates: Option<String>,
    /// While the first certificate is pending: `SELF_SIGNED` (default: a stand-in
    /// certificate) or `REFUSE` (handshakes for the hosts fail).
    pub while_pending: Option<String>,
}

/// ACME external account binding (RFC 8555 7.3.4).
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalAccountBinding {
    pub key_id: String,
    /// A file holding the CA's HMAC key, base64url as the CA hands it out.
    pub hmac_key_file: String,
}

/// MeshConfig `pathNormalization`.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathNormalization {
    /// `NONE`, `BASE`, `MERGE_SLASHES` (Portico's default) or `DECODE_AND_MERGE_SLASHES`.
    pub normalization: Option<String>,
    /// Portico extension, Envoy's `pathWithEscapedSlashesAction`: `KEEP_UNCHANGED`
    /// (default), `REJECT_REQUEST` or `UNESCAPE_AND_FORWARD` (what
    /// `DECODE_AND_MERGE_SLASHES` implies).
    pub escaped_slashes: Option<String>,
}

/// `mesh.downstream`: what a client connection and a request may take.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Downstream {
    /// A request head must be complete this long after its first byte. Default 30s.
    pub request_headers_timeout: Option<Duration>,
    /// A keep-alive connection with no request in progress is closed after this. Default 60s.
    pub idle_timeout: Option<Duration>,
    /// Between two reads of a request body. Default 60s.
    pub request_body_timeout: Option<Duration>,
    /// A request with no progress either way (waiting for the upstream's answer, or for
    /// the client to read it) is ended after this. Default 300s.
    pub stream_idle_timeout: Option<Duration>,
    /// A connection is closed after its request in progress once it is this old. Default:
    /// none.
    pub max_connection_duration: Option<Duration>,
    /// Connections each listener holds at once; more are closed as they come. Default:
    /// none.
    pub max_connections: Option<u32>,
    /// Connections one client address may hold on a listener at once; more are closed as
    /// they come (NGINX's `limit_conn` on `$binary_remote_addr`). Default: none.
    pub max_connections_per_client: Option<u32>,
    /// Connections the whole process holds at once, over all listeners (Envoy's overload
    /// manager `global_downstream_max_connections`): at the cap a new connection takes the
    /// place of the longest-idle keep-alive one, or is closed when none is idle. Default:
    /// derived from the cgroup's memory limit when there is one, else none; 0: none.
    pub global_max_connections: Option<u32>,
    /// Requests in flight on each listener at once, an HTTP/2 stream counting as one
    /// request (NGINX's `limit_conn` on `$server_name`); more are answered 503 with flag
    /// `OM`. Default: none; 0: none.
    pub max_requests: Option<u32>,
    /// Requests in flight from one client address on a listener at once (the trusted
    /// client address, as rate limits see it: NGINX's `limit_conn` on
    /// `$binary_remote_addr`); more are answered 503 `OM`. Default: none; 0: none.
    pub max_requests_per_client: Option<u32>,
    /// The largest request head, in KiB: more gets 431. Default 60.
    pub max_request_headers_kb: Option<u32>,
    /// The longest request target (path and query), in bytes: more gets 414. Default 8192.
    pub max_uri_length: Option<u32>,
}

/// MeshConfig `defaultConfig` (ProxyConfig): Portico reads `tracing`.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    pub tracing: Option<TracingConfig>,
    /// Istio ProxyConfig `gatewayTopology`: where the gateway sits behind other proxies.
    pub gateway_topology: Option<GatewayTopology>,
}

/// Istio ProxyConfig `gatewayTopology`.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayTopology {
    /// Proxies in front of the gateway that append to `X-Forwarded-For`: the client
    /// address (`remote.ip`) is the entry this many from the right. Default 0 (the peer).
    pub num_trusted_proxies: Option<u32>,
    /// What becomes of `x-forwarded-client-cert`: SANITIZE, FORWARD_ONLY,
    /// APPEND_FORWARD, SANITIZE_SET (the default, as for Istio's gateways) or
    /// ALWAYS_FORWARD_ONLY.
    pub forward_client_cert_details: Option<String>,
    /// Istio's `proxyProtocol`: listeners expect a PROXY protocol header (v1 or v2) on
    /// each connection, as a cloud load balancer sends. Portico requires `trustedCidrs`.
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// `gatewayTopology.proxyProtocol`, with Portico's fields (named after Envoy's
/// `proxy_protocol` listener filter where it has one).
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyProtocol {
    /// Sources (IPs or CIDRs: the load balancers) whose header is read; a connection from
    /// elsewhere that sends one is closed. Required.
    #[serde(default)]
    pub trusted_cidrs: Vec<String>,
    /// A trusted source may also connect without a header (Envoy's
    /// `allow_requests_without_proxy_protocol`). Default false.
    pub allow_requests_without_proxy_protocol: Option<bool>,
    /// `V1` and/or `V2`: versions refused (Envoy's `disallowed_versions`). Default none.
    #[serde(default)]
    pub disallowed_versions: Vec<String>,
    /// How long a connection has to send its header. Default 5s.
    pub timeout: Option<Duration>,
    /// The listener ports that expect a header. Default: every listener.
    pub ports: Option<Vec<u32>>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TracingConfig {
    /// Percent of requests traced when the caller did not decide (Istio's default: 1).
    pub sampling: Option<f64>,
}

/// MeshConfig `extensionProviders[]`: Portico uses the first `opentelemetry` one for
/// tracing, and `envoyExtAuthzHttp` ones for AuthorizationPolicies of action CUSTOM.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    pub name: String,
    pub opentelemetry: Option<OpenTelemetryProvider>,
    pub envoy_ext_authz_http: Option<ExtAuthzHttpProvider>,
    /// Read only to say that it is not supported (gRPC ext_authz).
    pub envoy_ext_authz_grpc: Option<serde_json::Value>,
}

/// MeshConfig `EnvoyExternalAuthorizationHttpProvider`: an HTTP service that decides
/// requests (Envoy's ext_authz HTTP API; NGINX's `auth_request`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtAuthzHttpProvider {
    /// `[<namespace>/]<host>`: a ServiceEntry host, or a name resolved with DNS.
    pub service: String,
    pub port: u32,
    /// How long a check may take. Default 600s (Istio's).
    pub timeout: Option<Duration>,
    /// Put before the request's path in the check (`/check` + `/admin`).
    pub path_prefix: Option<String>,
    /// Allow the request when the authorizer cannot be reached, times out or answers 5xx.
    pub fail_open: Option<bool>,
    /// The status a request gets when the check fails (default 403).
    pub status_on_error: Option<String>,
    /// Deprecated name of `includeRequestHeadersInCheck`.
    #[serde(default)]
    pub include_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_request_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_additional_headers_in_check: BTreeMap<String, String>,
    /// Read only to say that it is not supported.
    pub include_request_body_in_check: Option<serde_json::Value>,
    #[serde(default)]
    pub headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_allow: Vec<String>,
    /// Read only to say that it is not supported.
    pub clear_route_cache: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenTelemetryProvider {
    pub service: String,
    pub port: u32,
    /// OTLP/HTTP. Without it Istio speaks OTLP/gRPC, which Portico does not.
    pub http: Option<OtlpHttp>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OtlpHttp {
    pub path: Option<String>,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    pub name: String,
    pub namespace: Option<String>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub servers: Vec<Server>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Server {
    pub port: Port,
    pub bind: Option<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    pub tls: Option<ServerTls>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    pub number: u32,
    pub name: Option<String>,
    pub protocol: Option<String>,
    pub target_port: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerTls {
    #[serde(default)]
    pub https_redirect: bool,
    pub mode: Option<String>,
    pub server_certificate: Option<String>,
    pub private_key: Option<String>,
    /// MUTUAL / OPTIONAL_MUTUAL: the CA bundle client certificates must chain to.
    pub ca_certificates: Option<String>,
    /// MUTUAL / OPTIONAL_MUTUAL: a PEM (or DER) certificate revocation list for the
    /// client CA.
    pub ca_crl: Option<String>,
    pub credential_name: Option<String>,
    /// The credential whose `ca.crt` (and `ca.crl`) verifies client certificates, instead
    /// of `credentialName`'s own or `<credentialName>-cacert`.
    pub ca_cert_credential_name: Option<String>,
    /// A client certificate must carry one of these SANs (DNS, URI, IP or e-mail).
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// Pins: base64 SHA-256 of the client certificate's SubjectPublicKeyInfo.
    #[serde(default)]
    pub verify_certificate_spki: Vec<String>,
    /// Pins: hex SHA-256 of the client certificate (colons allowed).
    #[serde(default)]
    pub verify_certificate_hash: Vec<String>,
    pub min_protocol_version: Option<String>,
    pub max_protocol_version: Option<String>,
    /// Portico extension: serve this server's certificate to clients that send no SNI
    /// or a name no server claims. A server with host `*` is the default implicitly.
    #[serde(default)]
    pub default_certificate: bool,
    /// Portico extension: order and renew this server's certificate over ACME, stored as
    /// `credentialName` (README, Certificates from ACME).
    pub acme: Option<Acme>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualService {
    pub name: String,
    pub namespace: Option<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    /// Routes for TLS passed through unterminated, matched by SNI.
    #[serde(default)]
    pub tls: Vec<TlsRoute>,
    /// Routes for opaque TCP.
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

/// Istio's TLSRoute: the first rule whose match covers the connection's SNI is used.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsRoute {
    #[serde(rename = "match", default)]
    pub matches: Vec<TlsMatchAttributes>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsMatchAttributes {
    #[serde(default)]
    pub sni_hosts: Vec<String>,
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    pub port: Option<u32>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    pub source_namespace: Option<String>,
}

/// Istio's TCPRoute.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    #[serde(rename = "match", default)]
    pub matches: Vec<L4MatchAttributes>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L4MatchAttributes {
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    pub port: Option<u32>,
    pub source_subnet: Option<String>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    pub source_namespace: Option<String>,
}

/// Istio's RouteDestination (L4): a destination and its relative weight.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(rename = "match", default)]
    pub matches: Vec<HttpMatchRequest>,
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub rewrite: Option<HttpRewrite>,
    pub timeout: Option<Duration>,
    pub headers: Option<Headers>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFaultInjection>,
    pub mirror: Option<Destination>,
    #[serde(default)]
    pub mirrors: Vec<HttpMirrorPolicy>,
    pub mirror_percentage: Option<Percent>,
    /// Deprecated integer form of `mirrorPercentage`.
    pub mirror_percent: Option<u32>,
    pub cors_policy: Option<CorsPolicy>,
    pub delegate: Option<Delegate>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Option<String>,
    pub retry_remote_localities: Option<bool>,
    pub retry_ignore_previous_hosts: Option<bool>,
    pub backoff: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Percent {
    pub value: f64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpFaultInjection {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    pub fixed_delay: Option<Duration>,
    pub exponential_delay: Option<Duration>,
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage.
    pub percent: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    pub http_status: Option<u32>,
    pub grpc_status: Option<String>,
    pub http2_error: Option<String>,
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMirrorPolicy {
    pub destination: Destination,
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CorsPolicy {
    #[serde(default)]
    pub allow_origins: Vec<StringMatch>,
    /// Deprecated: exact origins.
    #[serde(default)]
    pub allow_origin: Vec<String>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    pub max_age: Option<Duration>,
    pub allow_credentials: Option<bool>,
    pub unmatched_preflights: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Delegate {
    pub name: String,
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub ignore_uri_case: bool,
    pub port: Option<u32>,
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Portico extension: the client address must be in one of these CIDRs.
    #[serde(default)]
    pub source_ip: Vec<String>,
}

/// Istio's StringMatch: exactly one of `exact`, `prefix`, `regex`. An empty table is a
/// presence match when used for headers.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteDestination {
    pub destination: Destination,
    pub weight: Option<i64>,
    pub headers: Option<Headers>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortSelector {
    pub number: u32,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u32>,
    pub scheme: Option<String>,
    pub redirect_code: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpDirectResponse {
    pub status: u32,
    pub body: Option<HttpBody>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpBody {
    pub string: Option<String>,
    /// Base64, as in Istio's `body.bytes`.
    pub bytes: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOperations {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRule {
    pub name: String,
    pub namespace: Option<String>,
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTlsSettings>,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    /// Send a PROXY protocol header on each new upstream connection. Istio has no
    /// port-level form of it.
    pub proxy_protocol: Option<UpstreamProxyProtocol>,
}

/// `trafficPolicy.proxyProtocol`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamProxyProtocol {
    /// `V1` (Istio's default) or `V2`.
    pub version: Option<String>,
}

/// `portLevelSettings[]`: the same settings for one port.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTlsSettings>,
}

/// DestinationRule `trafficPolicy.tls`: TLS from Portico to the upstream (origination).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTlsSettings {
    pub mode: Option<String>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    pub sni: Option<String>,
    pub insecure_skip_verify: Option<bool>,
    pub ca_crl: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    pub simple: Option<String>,
    pub consistent_hash: Option<ConsistentHash>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    pub use_source_ip: Option<bool>,
    pub http_query_parameter_name: Option<String>,
    pub ring_hash: Option<RingHash>,
    pub maglev: Option<Maglev>,
    /// Deprecated in favour of `ringHash.minimumRingSize`.
    pub minimum_ring_size: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpCookie {
    pub name: String,
    pub path: Option<String>,
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RingHash {
    pub minimum_ring_size: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Maglev {
    pub table_size: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    /// Deprecated and ignored by Istio (a warning here too).
    pub consecutive_errors: Option<i64>,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
    pub min_health_percent: Option<u32>,
    pub split_external_local_origin_errors: Option<bool>,
    pub consecutive_local_origin_failures: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpSettings {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub tcp_keepalive: Option<TcpKeepalive>,
    pub max_connection_duration: Option<Duration>,
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpSettings {
    /// `DEFAULT`, `DO_NOT_UPGRADE` or `UPGRADE`: with `UPGRADE` Portico speaks h2c
    /// (HTTP/2 with prior knowledge) to the upstream.
    pub h2_upgrade_policy: Option<String>,
    pub idle_timeout: Option<Duration>,
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    pub max_concurrent_streams: Option<u32>,
    pub use_client_protocol: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: Option<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    pub location: Option<String>,
    pub resolution: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntry>,
    #[serde(default)]
    pub export_to: Vec<String>,
    /// The names (DNS, with `*.` wildcards, or URIs such as SPIFFE ids) one of which an
    /// upstream certificate must carry when a DestinationRule originating TLS to a host of
    /// this entry sets no `subjectAltNames` of its own (its list wins when set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub number: u32,
    pub protocol: Option<String>,
    pub name: Option<String>,
    pub target_port: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntry {
    pub address: String,
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub weight: Option<u32>,
}

/// `mesh.redis`: where global rate limits are counted. Envoy Gateway's
/// `rateLimit.backend.redis` and Mixer's `redisquota` names where they have one.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Redis {
    /// `redis://host:port/db` or `rediss://` for TLS (Envoy Gateway `url`, as a URL).
    pub url: String,
    /// A file holding the password (`AUTH`); relative to the main config file.
    pub password_file: Option<String>,
    /// The user of Redis 6 ACLs, with `passwordFile`.
    pub username: Option<String>,
    /// TLS settings for `rediss://`, with Istio's ClientTLSSettings names.
    pub tls: Option<RedisTls>,
    /// Connections kept to Redis (Mixer's `connectionPoolSize`). Default 4.
    pub connection_pool_size: Option<u32>,
    /// How long one decision may wait for Redis (Envoy Gateway `rateLimit.timeout`).
    /// Default 50ms.
    pub timeout: Option<Duration>,
    /// Prefix of every key Portico writes. Default `portico`.
    pub key_prefix: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RedisTls {
    /// CA bundle that signs the server's certificate; system roots when absent.
    pub ca_certificates: Option<String>,
    /// A client certificate and key, for Redis' `tls-auth-clients`.
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
}

/// What a policy applies to: Envoy Gateway's `targetRefs` entries, with Portico's kinds.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// Accepted for Kubernetes' sake; not checked.
    pub group: Option<String>,
    /// `Gateway`, `VirtualService` or `Host` (a host of a VirtualService, as written).
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
    /// With `VirtualService`: the `name` of one of its http routes.
    pub section_name: Option<String>,
}

/// Portico's RateLimitPolicy, Envoy Gateway's `BackendTrafficPolicy.rateLimit` with its
/// targets.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicy {
    pub name: String,
    pub namespace: Option<String>,
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    /// Counted in this process.
    pub local: Option<RateLimitRules>,
    /// Counted in `mesh.redis`, shared by every replica.
    pub global: Option<RateLimitRules>,
    /// When Redis does not answer in time: let the request through (default) or refuse it
    /// with `statusOnError`.
    pub fail_open: Option<bool>,
    /// The status of a request refused because Redis did not answer (Envoy's
    /// `status_on_error`). Default 503.
    pub status_on_error: Option<u32>,
    /// `RateLimit-Limit`, `-Remaining`, `-Reset` and `-Policy` on answers. Default true.
    pub response_headers: Option<bool>,
    /// Client keys each local rule remembers at most; the least recently seen go first.
    /// Default 100000.
    pub max_keys: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitRules {
    #[serde(default)]
    pub rules: Vec<RateLimitRule>,
}

/// Envoy Gateway's `RateLimitRule`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitRule {
    /// Portico extension: the rule's name in metrics and logs. Default
    /// `<policy>/local/<index>` (or `global`).
    pub name: Option<String>,
    /// All must hold for the rule to count a request; `Distinct` parts make a bucket per
    /// value.
    #[serde(default)]
    pub client_selectors: Vec<RateLimitSelectCondition>,
    pub limit: RateLimitValue,
    /// Portico extension: requests allowed at once (the bucket's size). Default
    /// `limit.requests`.
    pub burst: Option<u32>,
    /// Envoy Gateway's `shared`: one bucket for every route the policy targets, instead of
    /// one per route.
    pub shared: Option<bool>,
    /// Mixer's `overrides`: other limits for some keys.
    #[serde(default)]
    pub overrides: Vec<RateLimitOverride>,
    /// Mixer's `rateLimitAlgorithm` for global rules: `FIXED_WINDOW` (default, as Envoy's
    /// rate limit service counts) or `GCRA` (a token bucket, as local rules count).
    pub rate_limit_algorithm: Option<String>,
}

/// Envoy Gateway's `RateLimitSelectCondition`, with Portico's JWT and path parts.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSelectCondition {
    #[serde(default)]
    pub headers: Vec<HeaderSelector>,
    #[serde(rename = "sourceCIDR")]
    pub source_cidr: Option<SourceSelector>,
    /// Portico extension: claims of the request's verified JWT.
    #[serde(default)]
    pub jwt_claims: Vec<HeaderSelector>,
    /// Portico extension: the request's principal (`iss/sub` of its JWT).
    pub request_principal: Option<ValueSelector>,
    /// Portico extension: a path template (`/users/{id}/**`); `Distinct` counts each
    /// value of its `{named}` segments apart.
    pub path: Option<PathSelector>,
}

/// Envoy Gateway's `HeaderMatch`: `Exact` (default), `RegularExpression` or `Distinct`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderSelector {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
    #[serde(default)]
    pub invert: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ValueSelector {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
    #[serde(default)]
    pub invert: bool,
}

/// Envoy Gateway's `SourceMatch`: `Exact` (default: the range as one client) or
/// `Distinct` (each address in it apart).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceSelector {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathSelector {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub template: String,
}

/// Envoy Gateway's `RateLimitValue`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitValue {
    pub requests: u32,
    /// `Second`, `Minute`, `Hour` or `Day`.
    pub unit: String,
}

/// Mixer's quota override: a limit for the keys whose values these are.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitOverride {
    /// Header name to value, for the rule's `Distinct` headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A client address or range, for a `Distinct` sourceCIDR.
    #[serde(rename = "sourceCIDR")]
    pub source_cidr: Option<String>,
    #[serde(default)]
    pub jwt_claims: BTreeMap<String, String>,
    pub request_principal: Option<String>,
    pub limit: RateLimitValue,
    pub burst: Option<u32>,
}

/// Portico's AccessList: Mixer's `listchecker` (and `denier`) as a policy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessList {
    pub name: String,
    pub namespace: Option<String>,
    /// Where the list is enforced; without any, it is only a list others name.
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    /// AuthorizationPolicy's `action`: `DENY` (default: listed requests are refused) or
    /// `ALLOW` (only listed requests pass).
    pub action: Option<String>,
    /// What is looked up, in Istio's attribute names: `source.ip` (default),
    /// `request.headers[name]`, `request.auth.claims[name]`, `request.auth.principal`.
    pub key: Option<String>,
    /// listchecker's `entryType`: `IP_ADDRESSES` (default for `source.ip`), `STRINGS`
    /// (default otherwise) or `CASE_INSENSITIVE_STRINGS`.
    pub entry_type: Option<String>,
    /// listchecker's `overrides`: entries written here.
    #[serde(default)]
    pub overrides: Vec<String>,
    /// A file of entries, one a line (`#` starts a comment); re-read when it changes.
    pub file: Option<String>,
    /// listchecker's `providerUrl`: an `http://` URL answering entries, one a line.
    pub provider_url: Option<String>,
    /// listchecker's `refreshInterval`: how often `providerUrl` is fetched. Default 60s.
    /// (A file is checked for changes every second.)
    pub refresh_interval: Option<Duration>,
    /// The answer to a refused request (denier's `status`). Default 403.
    pub deny_response: Option<DenyResponse>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DenyResponse {
    pub status: Option<u32>,
    pub body: Option<String>,
}

/// Istio's RequestAuthentication (security.istio.io/v1): how a request's JWT is found and
/// verified. A bad token is refused (401); a request without one passes without identity.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthentication {
    pub name: String,
    pub namespace: Option<String>,
    /// Istio's workload selector: applies when its labels are among a Gateway's
    /// `selector` (the gateway's pods); a selector of other workloads (sidecars) skips it.
    pub selector: Option<WorkloadSelector>,
    /// Gateways (or Portico's VirtualService / Host targets) it applies to; none: every
    /// gateway.
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

/// Istio's AuthorizationPolicy (`security.istio.io/v1`), as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: Option<String>,
    /// The gateways (by their Gateway's `selector`) it applies to; without it (and without
    /// targetRefs), every gateway of its namespace (of all namespaces in the root one).
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetRef>,
    /// Deprecated single form of `targetRefs`.
    pub target_ref: Option<PolicyTargetRef>,
    /// `ALLOW` (default), `DENY`, `AUDIT` or `CUSTOM`.
    pub action: Option<String>,
    pub provider: Option<AuthzProvider>,
    /// Absent or empty: the policy matches nothing.
    pub rules: Option<Vec<AuthzRule>>,
    /// The `istio.io/dry-run: "true"` annotation: evaluated, logged and counted, never
    /// enforced.
    pub dry_run: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// Istio's `JWTRule`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// The token's `iss`.
    pub issuer: String,
    /// Accepted `aud` values; empty: any.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Where the JSON Web Key Set is fetched (http or https); or `jwks`.
    pub jwks_uri: Option<String>,
    /// The JSON Web Key Set, inline.
    pub jwks: Option<String>,
    /// Default (no `fromHeaders`, `fromParams`, `fromCookies`): `Authorization: Bearer`
    /// and the `access_token` query parameter.
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    /// A header the upstream gets the verified token's payload in (base64url JSON).
    pub output_payload_to_header: Option<String>,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Keep the token in the request upstream. Default false: its header is removed.
    pub forward_original_token: Option<bool>,
    /// How long a `jwksUri` fetch may take. Default 5s.
    pub timeout: Option<Duration>,
    /// Portico extension: how often a `jwksUri` is fetched again. Default 20m (istiod's
    /// `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
    pub jwks_refresh_interval: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtHeader {
    pub name: String,
    /// Stripped from the value before the token (e.g. `Bearer `).
    #[serde(default)]
    pub prefix: String,
}

/// Istio's PolicyTargetReference.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetRef {
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimToHeader {
    pub header: String,
    /// A claim name; `a.b` for a nested one.
    pub claim: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzProvider {
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzRule {
    #[serde(default)]
    pub from: Vec<AuthzFrom>,
    #[serde(default)]
    pub to: Vec<AuthzTo>,
    #[serde(default)]
    pub when: Vec<AuthzCondition>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzFrom {
    pub source: Option<AuthzSource>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzSource {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzTo {
    pub operation: Option<AuthzOperation>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzOperation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzCondition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}
