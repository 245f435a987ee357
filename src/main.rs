//! The `portico` command: run, validate, routes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portico::config::{self, ConfigErrors};
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
        /// Config file (default: conf/portico.toml, then /etc/portico/portico.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Worker threads per listener (default: the number of cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Take the listening sockets over from a running Portico: start this, then send
        /// the old process SIGQUIT; no connection is refused in between.
        #[arg(long)]
        upgrade: bool,
    },
    /// Check a configuration: every error with file:line:column, or a one-line summary.
    Validate {
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Explain which route would serve a request, and why.
    Routes {
        #[arg(short, long)]
        config: Option<PathBuf>,
        #[arg(long)]
        host: String,
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
        /// Client address, for `sourceIp` matches.
        #[arg(long)]
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    match cli.command {
        Command::Run {
            config,
            threads,
            upgrade,
        } => {
            let path = config.unwrap_or_else(default_config);
            if !path.exists() {
                eprintln!(
                    "portico: config file {} not found (pass -c FILE)",
                    path.display()
                );
                return ExitCode::from(2);
            }
            let threads = threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            match portico::server::run(&path, threads, upgrade) {
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
        Command::Validate { config } => validate(&config.unwrap_or_else(default_config)),
        Command::Routes {
            config,
            host,
            path,
            method,
            port,
            headers,
            source_ip,
        } => routes(
            &config.unwrap_or_else(default_config),
            &RouteQuery {
                host: &host,
                path: &path,
                method: &method,
                port,
                headers: &headers,
                source_ip,
            },
        ),
    }
}

fn validate(path: &Path) -> ExitCode {
    match config::build(path, &config::Options::default()) {
        Ok(compiled) => {
            for w in &compiled.warnings {
                eprintln!("warning: {w}");
            }
            println!("ok: {}", compiled.snapshot.summary);
            ExitCode::SUCCESS
        }
        Err(errors) => {
            println!("{}", ConfigErrors(errors.clone()));
            eprintln!("{} error(s) in {}", errors.len(), path.display());
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

fn routes(path: &Path, q: &RouteQuery<'_>) -> ExitCode {
    let RouteQuery {
        host,
        path: full_path,
        method,
        port,
        headers,
        source_ip,
    } = *q;
    let compiled = match config::build(path, &config::Options::default()) {
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
            headers: &map,
            port: l.addr.port(),
            client_ip: source_ip,
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
            }
        }
    }
    if matched {
        ExitCode::SUCCESS
    } else {
        println!("no route");
        ExitCode::FAILURE
    }
}
