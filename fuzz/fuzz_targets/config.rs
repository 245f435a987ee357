//! The config loader and compiler on arbitrary bytes as a TOML config file: written to a
//! temporary folder, loaded and compiled as `portico::config::build` does (`load`, then
//! `compile`). Errors are fine; panics are not.
//!
//! Kept fast and hermetic:
//! - DNS: compiling resolves destination and tracing collector names, blocking, through
//!   `mesh.dnsServers` or, when none are set, getaddrinfo (the machine's resolver: slow,
//!   and the network's answer). So the target loads the file, then points
//!   `mesh.dnsServers` at a stub nameserver on loopback (started here) that answers
//!   NXDOMAIN at once, keeping the servers the input wrote that are not addresses (those
//!   are errors to report). Every name fails in about a millisecond.
//! - Files: paths in the config are read (certificates, CA bundles, the admin token file)
//!   and `include` patterns are globbed. An input is skipped when an include pattern could
//!   leave the temporary folder (absolute, or with `..`), or when any string names
//!   something under /dev, /proc, /sys or /run (a device or a FIFO can block a read
//!   forever). Relative paths resolve in the temporary folder, which holds only the config.
//!   Certificates are never generated (`generate_missing_certs` off).

#![no_main]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use portico::config::{compile, load, Options};

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    // The parser Portico reads the file with: what it cannot parse, Portico rejects before
    // reading anything else.
    if let Ok(table) = text.parse::<toml::Table>() {
        if !hermetic(&table) {
            return;
        }
    }
    let path = dir().join("portico.toml");
    std::fs::write(&path, text).expect("write the config");
    let Ok(mut doc) = load(&path) else {
        return;
    };
    let mut mesh = (*doc.mesh.spec).clone();
    mesh.dns_servers
        .retain(|s| s.parse::<SocketAddr>().is_err() && s.parse::<IpAddr>().is_err());
    mesh.dns_servers.push(stub_nameserver().to_string());
    doc.mesh.spec = Arc::new(mesh);
    let opts = Options {
        generation: 1,
        generate_missing_certs: false,
    };
    let _ = compile(&doc, &opts);
});

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("portico-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create the temporary folder");
        d
    })
}

/// Whether loading and compiling `table` reads only inside the temporary folder and
/// ordinary files (see the module docs).
fn hermetic(table: &toml::Table) -> bool {
    if let Some(include) = table.get("include") {
        let patterns: Vec<&str> = match include {
            toml::Value::Array(a) => a.iter().filter_map(toml::Value::as_str).collect(),
            _ => Vec::new(),
        };
        if patterns
            .iter()
            .any(|p| p.starts_with('/') || p.contains(".."))
        {
            return false;
        }
    }
    fn strings_ok(v: &toml::Value) -> bool {
        match v {
            toml::Value::String(s) => !["/dev", "/proc", "/sys", "/run"]
                .iter()
                .any(|d| s.contains(d)),
            toml::Value::Array(a) => a.iter().all(strings_ok),
            toml::Value::Table(t) => t
                .iter()
                .all(|(k, v)| strings_ok(&toml::Value::String(k.clone())) && strings_ok(v)),
            _ => true,
        }
    }
    table
        .iter()
        .all(|(k, v)| strings_ok(&toml::Value::String(k.clone())) && strings_ok(v))
}

/// A nameserver on loopback that answers every query NXDOMAIN at once.
fn stub_nameserver() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the stub nameserver");
        let addr = socket.local_addr().expect("its address");
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if n < 12 {
                    continue;
                }
                // The query back as a response: QR set, RA set, RCODE 3 (NXDOMAIN); the
                // question (and any OPT record) echoed, no answers.
                let mut reply = buf[..n].to_vec();
                reply[2] |= 0x80;
                reply[3] = 0x80 | 3;
                let _ = socket.send_to(&reply, from);
            }
        });
        addr
    })
}
