//! A real `redis-server` for the global rate-limit tests: started on a free loopback port
//! with no persistence, stopped (and started again on the same port) on command, killed
//! when dropped.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisServer {
    pub port: u16,
    password: Option<String>,
    /// TLS only (`--port 0 --tls-port`): certificate, key and the CA that client
    /// certificates must chain to, which Redis then requires.
    tls: Option<RedisTls>,
    child: Option<Child>,
}

/// The PEM files a TLS `redis-server` serves with.
pub struct RedisTls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: std::path::PathBuf,
}

impl RedisServer {
    /// Starts one, with `requirepass` when `password` is given.
    pub fn start(password: Option<&str>) -> RedisServer {
        let mut r = RedisServer {
            port: super::free_port(),
            password: password.map(str::to_string),
            tls: None,
            child: None,
        };
        r.restart();
        r
    }

    /// Starts one that speaks only TLS and requires a client certificate from `tls.client_ca`.
    pub fn start_tls(password: Option<&str>, tls: RedisTls) -> RedisServer {
        let mut r = RedisServer {
            port: super::free_port(),
            password: password.map(str::to_string),
            tls: Some(tls),
            child: None,
        };
        r.restart();
        r
    }

    /// Starts it again on its port (after `stop`), empty: nothing is persisted.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let binary = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("redis-server");
        let mut cmd = Command::new(binary);
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some(t) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&t.cert)
                .arg("--tls-key-file")
                .arg(&t.key)
                .arg("--tls-ca-cert-file")
                .arg(&t.client_ca)
                .args(["--tls-auth-clients", "yes"]),
        };
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .args(["--loglevel", "warning"]);
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (.ci/run installs it)");
        self.child = Some(child);
        let up = super::wait_until(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
        assert!(up, "redis-server did not listen on {}", self.port);
    }

    /// Kills it and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
