//! The `portico` command: run, validate, routes, convert.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// mimalloc instead of glibc malloc: the proxy allocates and frees many small objects per
// request (headers, buffers, futures); with glibc this was ~13 % of the proxy's CPU under
// load and mimalloc cut CPU per request by 30-40 % in bench/ (see bench/RESULTS.md).
#[cfg(not(feature = "dhat-heap"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// The heap-profiling build (feature `dhat-heap`): dhat is the allocator and records each
// allocation's call stack; see `heap_profile`.
#[cfg(feature = "dhat-heap")]
#[global_allocator]
static GLOBAL: dhat::Alloc = dhat::Alloc;

use portico::config::{self, ConfigErrors};
use portico::proxy::request;
use portico::routing::{normalize_host, Action, Decision, RequestView};

#[derive(Parser)]
#[command(
    name = "portico",
    version,
    about = "Edge gateway: SNI TLS, Istio-style routing, atomic reload"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG takes precedence.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configuration.
    Run {
        /// Config file (default: conf/portico.toml, then /etc/portico/portico.toml; with
        /// --istio and no config, the default mesh settings).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Istio YAML manifests: a file or a folder of .yaml/.yml files; repeatable.
        #[arg(long, value_name = "FILE_OR_DIR")]
        istio: Vec<PathBuf>,
        /// Worker threads per listener (default: the number of cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Take the listening sockets over from a running Portico: start this, then send
        /// the old process SIGQUIT; no connection is refused in between.
        #[arg(long)]
        upgrade: bool,
        /// Let idle worker threads steal connections from busy ones (tokio's work-stealing
        /// scheduler). Off by default: like NGINX and Envoy workers, each connection stays
        /// on the thread that accepted it, which costs less CPU per request.
        #[arg(long)]
        work_stealing: bool,
        /// Serve every request with pingora's request cycle, without Portico's fast path
        /// (README: "The HTTP/1.1 front and the fast path").
        #[arg(long, env = "PORTICO_NO_FAST_PATH")]
        no_fast_path: bool,
    },
    /// Check a configuration: every error with file:line:column, or a one-line summary.
    Validate {
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Istio YAML manifests: a file or a folder of .yaml/.yml files; repeatable.
        #[arg(long, value_name = "FILE_OR_DIR")]
        istio: Vec<PathBuf>,
    },
    /// Print Istio YAML manifests (and/or a TOML config with its includes) as one Portico
    /// TOML config. Notes about skipped or unsupported fields go to stderr.
    Convert {
        /// YAML files, folders of them, or one TOML config.
        #[arg(required = true, value_name = "FILE_OR_DIR")]
        paths: Vec<PathBuf>,
    },
    /// Explain which route would serve a request, and why; whether a RequestAuthentication
    /// checks it (a token in `--header authorization=...` is verified) and which
    /// AuthorizationPolicies match, with the verdict; and which codec carries it. Without
    /// `--host`: every route of every listener, with the codec that carries it.
    Routes {
        #[arg(short, long)]
        config: Option<PathBuf>,
        #[arg(long, value_name = "FILE_OR_DIR")]
        istio: Vec<PathBuf>,
        #[arg(long)]
        host: Option<String>,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// Only this listener port.
        #[arg(long)]
        port: Option<u16>,
        /// Request header, `name=value`; repeatable.
        #[arg(long = "header", value_name = "K=V")]
        headers: Vec<String>,
        /// Client address (the connection's peer): `sourceIp` matches, and an
        /// AuthorizationPolicy's `ipBlocks` and `remoteIpBlocks` (with
        /// `numTrustedProxies`, `remoteIpBlocks` reads `X-Forwarded-For` as the gateway does).
        #[arg(long, visible_alias = "source-address")]
        source_ip: Option<std::net::IpAddr>,
    },
}

fn default_config() -> PathBuf {
    let local = PathBuf::from("conf/portico.toml");
    if local.exists() {
        local
    } else {
        PathBuf::from("/etc/portico/portico.toml")
    }
}

/// `-c` and `--istio` as config sources: the default config file only when neither is given.
fn sources(config: Option<PathBuf>, istio: Vec<PathBuf>) -> config::Sources {
    let config = match (config, istio.is_empty()) {
        (Some(c), _) => Some(c),
        (None, true) => Some(default_config()),
        (None, false) => None,
    };
    config::Sources { config, istio }
}

fn init_logging(level: Option<&str>) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| level.unwrap_or("info").to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// mimalloc's `mi_option_arena_eager_commit` in the v3 sources this crate builds (its
/// Rust constants follow v2's numbering, so the value is named here).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Commit arena memory as it is used rather than on reserve. mimalloc's default on Linux
/// commits its first 1 GiB arena up front, and transparent huge pages then back touched
/// memory in 2 MiB pages: ~30 MiB resident when idle on the default config, ~17 MiB without.
/// The environment variable still wins.
///
/// This has to run before the first allocation, which reserves that arena before `main`,
/// and before mimalloc's own constructor (priority 101) reads its options from the
/// environment: hence a constructor of priority 100 (the linker runs `.init_array.N` in
/// increasing N, before unnumbered constructors).
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array.00100")]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

#[cfg(target_os = "linux")]
extern "C" fn tune_allocator() {
    if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
        // SAFETY: writes an integer into mimalloc's static option table; no allocation.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    }
}

fn main() -> ExitCode {
    #[cfg(feature = "dhat-heap")]
    heap_profile::start();
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    match cli.command {
        Command::Run {
            config,
            istio,
            threads,
            upgrade,
            work_stealing,
            no_fast_path,
        } => {
            let sources = sources(config, istio);
            if let Some(missing) = sources.roots().iter().find(|p| !p.exists()) {
                eprintln!(
                    "portico: config {} not found (pass -c FILE or --istio DIR)",
                    missing.display()
                );
                return ExitCode::from(2);
            }
            let threads = threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            match portico::server::run(&sources, threads, upgrade, work_stealing, !no_fast_path) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e}");
                    if matches!(e, portico::server::RunError::Config(_)) {
                        eprintln!("portico: not started: fix the configuration above");
                    } else {
                        eprintln!("portico: not started");
                    }
                    ExitCode::FAILURE
                }
            }
        }
        Command::Validate { config, istio } => validate(&sources(config, istio)),
        Command::Convert { paths } => convert(paths),
        Command::Routes {
            config,
            istio,
            host,
            path,
            method,
            port,
            headers,
            source_ip,
        } => match host {
            None => list_routes(&sources(config, istio), port),
            Some(host) => routes(
                &sources(config, istio),
                &RouteQuery {
                    host: &host,
                    path: &path,
                    method: &method,
                    port,
                    headers: &headers,
                    source_ip,
                },
            ),
        },
    }
}

fn validate(sources: &config::Sources) -> ExitCode {
    let started = std::time::Instant::now();
    let built = config::load_sources(sources).and_then(|doc| {
        let loaded = started.elapsed();
        config::compile(&doc, &config::Options::default()).map(|c| (c, loaded))
    });
    match built {
        Ok((compiled, loaded)) => {
            for w in &compiled.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "ok: {} (read and parsed in {} ms, compiled in {} ms)",
                compiled.snapshot.summary,
                loaded.as_millis(),
                (started.elapsed() - loaded).as_millis()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            println!("{}", ConfigErrors(errors.clone()));
            eprintln!("{} error(s) in {sources}", errors.len());
            ExitCode::FAILURE
        }
    }
}

/// A TOML file among the paths is the config (at most one); the rest are Istio manifests.
fn convert(paths: Vec<PathBuf>) -> ExitCode {
    let (toml, istio): (Vec<PathBuf>, Vec<PathBuf>) = paths
        .into_iter()
        .partition(|p| !p.is_dir() && config::load::Format::of(p) == config::load::Format::Toml);
    if toml.len() > 1 {
        eprintln!("portico: convert takes at most one TOML config");
        return ExitCode::from(2);
    }
    let sources = config::Sources {
        config: toml.into_iter().next(),
        istio,
    };
    let doc = match config::load_sources(&sources) {
        Ok(d) => d,
        Err(errors) => {
            println!("{}", ConfigErrors(errors.clone()));
            eprintln!("{} error(s) in {sources}", errors.len());
            return ExitCode::FAILURE;
        }
    };
    for w in &doc.warnings {
        eprintln!("warning: {w}");
    }
    match config::convert::to_toml(&doc) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("portico: {e}");
            ExitCode::FAILURE
        }
    }
}

struct RouteQuery<'a> {
    host: &'a str,
    path: &'a str,
    method: &'a str,
    port: Option<u16>,
    headers: &'a [String],
    source_ip: Option<std::net::IpAddr>,
}

fn routes(sources: &config::Sources, q: &RouteQuery<'_>) -> ExitCode {
    let RouteQuery {
        host,
        path: full_path,
        method,
        port,
        headers,
        source_ip,
    } = *q;
    let compiled = match config::build_sources(sources, &config::Options::default()) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{}", ConfigErrors(errors));
            return ExitCode::from(2);
        }
    };
    let mut map = http::HeaderMap::new();
    for h in headers {
        let Some((k, v)) = h.split_once('=') else {
            eprintln!("portico: --header {h:?}: expected name=value");
            return ExitCode::from(2);
        };
        match (
            http::HeaderName::from_bytes(k.trim().as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            (Ok(k), Ok(v)) => {
                map.append(k, v);
            }
            _ => {
                eprintln!("portico: --header {h:?}: not a valid header");
                return ExitCode::from(2);
            }
        }
    }
    let (req_path, query) = match full_path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (full_path, None),
    };
    let normalized = normalize_host(host);
    let mut matched = false;
    // For a remote key set's fetch while a token is checked.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portico: {e}");
            return ExitCode::FAILURE;
        }
    };
    let trusted = compiled.snapshot.settings.num_trusted_proxies;
    for l in &compiled.snapshot.listeners {
        // TCP and pure passthrough ports serve no HTTP to explain.
        if port.is_some_and(|p| p != l.addr.port()) || (l.l4.is_some() && !l.tls) {
            continue;
        }
        let view = RequestView {
            method,
            path: req_path,
            query,
            authority: host,
            scheme: if l.tls { "https" } else { "http" },
            headers: portico::routing::Headers::Map(&map),
            port: l.addr.port(),
            client_ip: request::remote_address(
                trusted,
                source_ip,
                portico::routing::Headers::Map(&map),
            ),
            peer: None,
            peer_ip: source_ip,
            sni: None,
            peer_principal: None,
        };
        let head = format!("listener {}", l.shape());
        match l.table.decide(&normalized, &view) {
            Decision::HttpsRedirect(p) => {
                matched = true;
                println!("{head}: 301 to https (tls.httpsRedirect on {})", p.server);
            }
            Decision::NoHost => {
                println!("{head}: no route: no virtual host for {normalized} (404)")
            }
            Decision::NoRoute(v) => println!(
                "{head}: no route: virtual host {} has {} route(s) and none matched (404)",
                v.domain,
                v.routes.len()
            ),
            Decision::Route {
                vhost,
                route,
                match_index,
            } => {
                matched = true;
                let name = route
                    .name
                    .as_deref()
                    .map(|n| format!(" {n:?}"))
                    .unwrap_or_default();
                let why = match route.matches.get(match_index) {
                    Some(m) => format!("match[{match_index}]: {m}"),
                    None => "the route has no match conditions".to_string(),
                };
                println!(
                    "{head}: route {}{name} on virtual host {}",
                    route.origin, vhost.domain
                );
                println!("  because {why}");
                match &route.action {
                    Action::Forward(f) => {
                        for d in &f.destinations {
                            println!(
                                "  forward to {} (weight {}/{}, {} endpoint(s))",
                                d.cluster.name,
                                d.weight,
                                f.total_weight,
                                d.cluster.endpoints.len()
                            );
                        }
                    }
                    Action::Redirect(r) => println!(
                        "  redirect {} to {}",
                        r.code,
                        r.location(view.scheme, host, req_path, query)
                    ),
                    Action::Direct(d) => {
                        println!("  direct response {} ({} bytes)", d.status, d.body.len())
                    }
                }
                println!("  codec: {}", Codec::of(l, route));
            }
        }
        explain_policies(&request::plan(l, &normalized, &view), &view, &rt);
    }
    if matched {
        ExitCode::SUCCESS
    } else {
        println!("no route");
        ExitCode::FAILURE
    }
}

/// Which codec carries a route's requests on a listener: the fast HTTP/1.1 and h2 codecs, or
/// pingora's request cycle (and why). Per request, a body over 16 KiB or chunked, an
/// upgrade, HTTP/1.0 and absolute-form targets go to pingora's cycle on any route.
enum Codec {
    Fast,
    Pingora(&'static str),
}

impl Codec {
    fn of(l: &portico::snapshot::Listener, route: &portico::routing::Route) -> Codec {
        if l.forward_proxy {
            return Codec::Pingora("a forward-proxy listener");
        }
        match &route.action {
            Action::Forward(f) => match portico::protocol::fast::lent_for(f) {
                Some(why) => Codec::Pingora(why),
                None => Codec::Fast,
            },
            Action::Redirect(_) | Action::Direct(_) => Codec::Fast,
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Codec::Fast => f.write_str("fast HTTP/1.1 and h2 codecs"),
            Codec::Pingora(why) => write!(f, "pingora's request cycle ({why})"),
        }
    }
}

/// Every route of every HTTP listener (or of `--port`'s), with the codec that carries it,
/// and the share of routes each codec carries.
fn list_routes(sources: &config::Sources, port: Option<u16>) -> ExitCode {
    let compiled = match config::build_sources(sources, &config::Options::default()) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{}", ConfigErrors(errors));
            return ExitCode::from(2);
        }
    };
    let (mut fast, mut lent) = (0usize, std::collections::BTreeMap::<&str, usize>::new());
    for l in &compiled.snapshot.listeners {
        if port.is_some_and(|p| p != l.addr.port()) || (l.l4.is_some() && !l.tls) {
            continue;
        }
        println!("listener {}", l.shape());
        let mut vhosts = l.table.vhosts.patterns();
        vhosts.sort_by(|a, b| a.0.cmp(&b.0));
        if vhosts.is_empty() {
            if l.forward_proxy {
                println!("  forward proxy: every request on pingora's request cycle");
            } else {
                println!("  no HTTP routes");
            }
        }
        for (domain, vhost) in vhosts {
            println!("  virtual host {domain}");
            for route in vhost.routes.iter() {
                let name = route
                    .name
                    .as_deref()
                    .map(|n| format!(" {n:?}"))
                    .unwrap_or_default();
                let what = match &route.action {
                    Action::Forward(f) => {
                        let to: Vec<&str> = f
                            .destinations
                            .iter()
                            .map(|d| d.cluster.name.as_str())
                            .collect();
                        format!("forward to {}", to.join(", "))
                    }
                    Action::Redirect(r) => format!("redirect {}", r.code),
                    Action::Direct(d) => format!("direct response {}", d.status),
                };
                let codec = Codec::of(l, route);
                match codec {
                    Codec::Fast => fast += 1,
                    Codec::Pingora(why) => *lent.entry(why).or_default() += 1,
                }
                println!("    {}{name}: {what}; codec: {codec}", route.origin);
            }
        }
    }
    let total = fast + lent.values().sum::<usize>();
    if total == 0 {
        println!("no HTTP routes");
        return ExitCode::SUCCESS;
    }
    println!(
        "{fast} of {total} route(s) on the fast HTTP/1.1 and h2 codecs ({:.0} %)",
        100.0 * fast as f64 / total as f64
    );
    for (why, n) in lent {
        println!("{n} on pingora's request cycle: {why}");
    }
    ExitCode::SUCCESS
}

/// What the request core's policies make of the request: the RequestAuthentication that
/// applies (its token checked by the same code as a request's), then each
/// AuthorizationPolicy's match and the verdict, from the listener's `Authorization`.
fn explain_policies(
    planned: &request::Planned<'_>,
    view: &RequestView<'_>,
    rt: &tokio::runtime::Runtime,
) {
    if planned.authn().is_none() && planned.authz().is_none() {
        return;
    }
    let mut verified = None;
    match planned.authn() {
        None => println!("  request authentication: none applies"),
        Some(authn) => {
            let issuers: Vec<&str> = authn.issuers().collect();
            println!(
                "  request authentication: applies (issuers {})",
                issuers.join(", ")
            );
            match rt.block_on(authn.authenticate(view)) {
                Ok(None) => println!("    no token: no identity (authorization decides)"),
                Ok(Some(v)) => {
                    println!("    token verified: principal {}", v.principal);
                    verified = Some(v);
                }
                Err(r) => {
                    println!(
                        "    token refused: {} {:?}; authorization is not asked",
                        r.failure.status(),
                        r.failure.text()
                    );
                    println!("  answer: {} ({})", r.failure.status(), r.failure.details());
                    return;
                }
            }
        }
    }
    let Some(authz) = planned.authz() else {
        println!("  authorization: no AuthorizationPolicy applies: allowed");
        return;
    };
    let keys = request::request_keys(view, verified.as_ref());
    println!("  authorization policies:");
    let mut asks_authorizer = false;
    for p in authz.policies() {
        let dry = if p.dry_run { " (dry run)" } else { "" };
        match p.matching_rule(&keys) {
            Some(i) => {
                asks_authorizer |= p.action == portico::policy::authz::Action::Custom;
                println!(
                    "    {} {}{dry}: matches (rules[{i}])",
                    p.action.as_str(),
                    p.name
                )
            }
            None => println!("    {} {}{dry}: no match", p.action.as_str(), p.name),
        }
    }
    if asks_authorizer {
        // The explain command does not call out: the authorizer's answer is not known here.
        println!("  external authorization: the CUSTOM provider is asked first, at request time (not by this command)");
    }
    let verdict = authz.check(&keys);
    if verdict.allowed {
        println!("  authorization: allowed");
    } else {
        println!("  authorization: denied");
        println!("  answer: 403 ({})", verdict.details);
    }
}

/// The heap profile of a `dhat-heap` build: recorded from the start of `main`, written
/// (`DHAT_FILE`, default `dhat-heap.json` in the working directory) when the process
/// exits. `server::run` ends with `std::process::exit` once pingora has stopped (after
/// SIGTERM's grace period, or at once on SIGINT), which runs no destructor, so the profile
/// is written by a C `atexit` handler, which `exit` runs, as does a return from `main`.
/// dhat's JSON reads in its viewer (dh_view.html), or summarised by site with
/// bench/lib/dhat_sites.py; "at t-gmax" is the heap's peak.
#[cfg(feature = "dhat-heap")]
mod heap_profile {
    use std::sync::Mutex;

    static PROFILER: Mutex<Option<dhat::Profiler>> = Mutex::new(None);

    extern "C" {
        fn atexit(f: extern "C" fn()) -> std::ffi::c_int;
    }

    extern "C" fn write_profile() {
        let profiler = PROFILER.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Dropping the profiler writes the file.
        drop(profiler);
    }

    pub fn start() {
        let file = std::env::var_os("DHAT_FILE").unwrap_or_else(|| "dhat-heap.json".into());
        let profiler = dhat::Profiler::builder().file_name(file).build();
        *PROFILER.lock().unwrap_or_else(|p| p.into_inner()) = Some(profiler);
        // SAFETY: registers a function without arguments that libc calls at exit.
        if unsafe { atexit(write_profile) } != 0 {
            eprintln!("portico: dhat: atexit failed, the heap profile will not be written");
        }
    }
}
