//! The ACME schedule: a background task that keeps every managed certificate issued. A
//! certificate is ordered when there is none on disk (or it lacks a host the server now
//! names), at 2/3 of its lifetime, or when an operator asks (`POST /acme/renew`). A failed
//! order is tried again after an exponential back-off with jitter (1 min doubling to 6 h),
//! so a CA that is down or refusing is never hammered; the certificate in force keeps
//! serving meanwhile. Orders run one at a time, under the `.acme/lock` flock so that of
//! several replicas sharing the credentials directory one orders and the others load what
//! it wrote (their config watch sees the files change).
//!
//! An issued pair is written atomically into the credentials layout and the config is
//! reloaded: the next handshake gets the new certificate, handshakes under way finish with
//! the old one. Owns no listener and never touches the request path.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::Notify;

use super::order::{self, Failure};
use super::store::{self, DiskCert};
use super::{CertState, ManagedCert};
use crate::reload::Reloader;
use crate::telemetry::Metrics;

/// First retry after a failed order; each further failure doubles it, up to `RETRY_MAX`.
const RETRY_BASE: Duration = Duration::from_secs(60);
const RETRY_MAX: Duration = Duration::from_secs(6 * 3600);
/// When another replica holds the lock: look again this long after (with jitter).
const LOCKED_RETRY: Duration = Duration::from_secs(10);
/// An order that takes longer is abandoned (and counts as a failure).
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the schedule is looked at when nothing wakes it.
const TICK: Duration = Duration::from_secs(1);

struct Wake {
    notify: Notify,
    /// Certificates an operator asked to renew now.
    forced: Mutex<HashSet<String>>,
}

fn wake() -> &'static Wake {
    static WAKE: OnceLock<Wake> = OnceLock::new();
    WAKE.get_or_init(|| Wake {
        notify: Notify::new(),
        forced: Mutex::new(HashSet::new()),
    })
}

/// Asks for the named managed certificate (every one with `None`) to be ordered now,
/// whatever its schedule or back-off says. Returns the names it applies to (none when the
/// name is not a managed certificate).
pub fn request_renewal(name: Option<&str>) -> Vec<String> {
    let known: Vec<String> = super::lock(super::states())
        .keys()
        .filter(|n| name.is_none_or(|want| want == n.as_str()))
        .cloned()
        .collect();
    super::lock(&wake().forced).extend(known.iter().cloned());
    wake().notify.notify_one();
    known
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// When a certificate valid from `not_before` to `not_after` is renewed: after 2/3 of its
/// lifetime (Let's Encrypt's advice; for 90 days, 30 days before expiry).
pub fn renewal_time(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before).max(0) * 2 / 3
}

/// The wait before retry number `failures` (1 = after the first failure): `RETRY_BASE`
/// doubled per failure up to `RETRY_MAX`, then a random point in its second half, so
/// replicas and restarts do not retry in step.
pub fn retry_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let full = RETRY_BASE.saturating_mul(1 << exp).min(RETRY_MAX);
    full / 2 + full.mul_f64(fastrand::f64() / 2.0)
}

struct Entry {
    spec: Arc<ManagedCert>,
    disk: Option<DiskCert>,
    /// Not before this (a failed order's back-off, or another replica holding the lock).
    not_before: i64,
    failures: u32,
    last_error: Option<String>,
    last_issued: Option<i64>,
    /// Another replica held the lock at the last try.
    waiting: bool,
    ordering: bool,
}

impl Entry {
    /// The disk certificate covers every host the server names.
    fn covered(&self) -> Option<&DiskCert> {
        self.disk
            .as_ref()
            .filter(|d| self.spec.hosts.iter().all(|h| d.names.contains(h)))
    }

    /// When the next order is due.
    fn due_at(&self) -> i64 {
        let wanted = match self.covered() {
            Some(d) => renewal_time(d.not_before, d.not_after),
            None => 0,
        };
        wanted.max(self.not_before)
    }

    fn state(&self) -> CertState {
        let state = if self.ordering {
            if self.covered().is_some() {
                "renewing"
            } else {
                "ordering"
            }
        } else if self.waiting {
            "waiting"
        } else if self.failures > 0 {
            "retrying"
        } else if self.covered().is_some() {
            "valid"
        } else {
            "pending"
        };
        CertState {
            state,
            hosts: self.spec.hosts.clone(),
            issuer: self.spec.issuer.name.clone(),
            challenge: self.spec.issuer.challenge.name(),
            not_before: self.disk.as_ref().map(|d| d.not_before),
            not_after: self.disk.as_ref().map(|d| d.not_after),
            next_order: Some(self.due_at().max(now())),
            failures: self.failures,
            last_error: self.last_error.clone(),
            last_issued: self.last_issued,
        }
    }

    /// Reads the certificate on disk again if its file changed (this process or another
    /// replica wrote it). A new one that is not due yet ends any waiting or retrying: the
    /// certificate is there, whoever ordered it.
    fn refresh_disk(&mut self) {
        let modified = store::modified(&self.spec.cert_path);
        if self.disk.as_ref().map(|d| d.modified) == Some(modified) && modified.is_some() {
            return;
        }
        self.disk = store::read_cert(&self.spec.cert_path);
        if let Some(d) = self.covered() {
            if renewal_time(d.not_before, d.not_after) > now() {
                self.waiting = false;
                self.failures = 0;
                self.not_before = 0;
                self.last_error = None;
            }
        }
    }
}

/// The background task that orders and renews (see the module doc).
pub struct Manager {
    pub reloader: Arc<Reloader>,
}

impl Manager {
    /// Brings `entries` in line with the managed certificates of the config in force.
    fn sync(&self, entries: &mut HashMap<String, Entry>) {
        let snapshot = self.reloader.snapshots.load();
        let names: HashSet<&str> = snapshot.acme.iter().map(|c| c.name.as_str()).collect();
        entries.retain(|n, _| names.contains(n.as_str()));
        for spec in &snapshot.acme {
            let e = entries.entry(spec.name.clone()).or_insert_with(|| Entry {
                spec: spec.clone(),
                disk: None,
                not_before: 0,
                failures: 0,
                last_error: None,
                last_issued: None,
                waiting: false,
                ordering: false,
            });
            if e.spec != *spec {
                e.spec = spec.clone();
            }
            e.refresh_disk();
        }
        super::retain_states(&names);
        for (name, e) in entries.iter() {
            super::set_state(name, e.state());
        }
    }

    /// One order for `name`, under the lock; records the outcome in its entry.
    async fn attempt(
        &self,
        entries: &mut HashMap<String, Entry>,
        accounts: &mut HashMap<String, instant_acme::Account>,
        name: &str,
    ) {
        let Some(e) = entries.get_mut(name) else {
            return;
        };
        let spec = e.spec.clone();
        // Taken now: an operator's request is for one try, whatever becomes of it.
        let forced = super::lock(&wake().forced).remove(name);
        let lock = match store::try_lock(&spec.state_dir) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                e.waiting = true;
                e.not_before = now() + retry_jitter(LOCKED_RETRY);
                tracing::info!(
                    certificate = %spec.name,
                    "ACME: another replica holds the order lock; looking again later"
                );
                return;
            }
            Err(err) => {
                self.failed(
                    e,
                    &Failure {
                        stage: "lock",
                        message: err,
                        problem: None,
                    },
                );
                return;
            }
        };
        e.waiting = false;
        // Another replica may have renewed while this one waited for the lock.
        e.refresh_disk();
        if !forced && e.due_at() > now() {
            return;
        }
        e.ordering = true;
        super::set_state(name, e.state());
        let started = std::time::Instant::now();
        let mut result = self.order(&spec, accounts).await;
        if let Err(f) = &result {
            let gone = f.problem.as_ref().and_then(|p| p.r#type.as_deref())
                == Some("urn:ietf:params:acme:error:accountDoesNotExist");
            if gone {
                // The CA forgot the stored account (a test CA restarted, an account
                // deactivated): make a new one once.
                tracing::warn!(certificate = %spec.name, issuer = %spec.issuer.name, "ACME: the CA does not know the stored account; registering a new one");
                accounts.remove(&spec.issuer.directory);
                let _ = std::fs::remove_file(store::account_path(
                    &spec.state_dir,
                    &spec.issuer.directory,
                ));
                result = self.order(&spec, accounts).await;
            }
        }
        let e = entries.get_mut(name).expect("entry present");
        e.ordering = false;
        match result {
            Ok(issued) => match self.install(&spec, &issued).await {
                Ok(disk) => {
                    drop(lock);
                    let renew_at = renewal_time(disk.not_before, disk.not_after);
                    tracing::info!(
                        certificate = %spec.name,
                        hosts = ?spec.hosts,
                        issuer = %spec.issuer.name,
                        challenge = spec.issuer.challenge.name(),
                        not_after = disk.not_after,
                        renew_at,
                        took_ms = started.elapsed().as_millis() as u64,
                        "ACME certificate issued"
                    );
                    Metrics::global().acme_order("success");
                    e.disk = Some(disk);
                    e.failures = 0;
                    e.not_before = 0;
                    e.last_error = None;
                    e.last_issued = Some(now());
                    let r = self.reloader.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || r.reload("ACME certificate issued"))
                            .await;
                }
                Err(err) => self.failed(
                    e,
                    &Failure {
                        stage: "store",
                        message: err,
                        problem: None,
                    },
                ),
            },
            Err(f) => {
                if f.stage.contains("account") {
                    accounts.remove(&spec.issuer.directory);
                }
                self.failed(e, &f);
            }
        }
    }

    async fn order(
        &self,
        spec: &ManagedCert,
        accounts: &mut HashMap<String, instant_acme::Account>,
    ) -> Result<order::Issued, Failure> {
        let run = async {
            let account = match accounts.get(&spec.issuer.directory) {
                Some(a) => a.clone(),
                None => {
                    let a = order::account(&spec.issuer, &spec.state_dir).await?;
                    accounts.insert(spec.issuer.directory.clone(), a.clone());
                    a
                }
            };
            order::issue(spec, &account).await
        };
        match tokio::time::timeout(ORDER_TIMEOUT, run).await {
            Ok(r) => r,
            Err(_) => Err(Failure {
                stage: "order",
                message: format!("no certificate within {}s", ORDER_TIMEOUT.as_secs()),
                problem: None,
            }),
        }
    }

    /// Checks the issued pair, writes it into the credentials layout (with reloads held
    /// off, so none reads the new key beside the old certificate) and returns what it is.
    async fn install(
        &self,
        spec: &ManagedCert,
        issued: &order::Issued,
    ) -> Result<DiskCert, String> {
        crate::tls::pair_from_pem(
            &spec.cert_path,
            issued.chain_pem.as_bytes(),
            &spec.key_path,
            issued.key_pem.as_bytes(),
        )?;
        let (r, cert_path, key_path) = (
            self.reloader.clone(),
            spec.cert_path.clone(),
            spec.key_path.clone(),
        );
        let (chain, key) = (issued.chain_pem.clone(), issued.key_pem.clone());
        tokio::task::spawn_blocking(move || {
            r.while_paused(|| {
                store::write_pair(&cert_path, &key_path, chain.as_bytes(), key.as_bytes())
            })
        })
        .await
        .map_err(|e| format!("writing the certificate panicked: {e}"))??;
        store::read_cert(&spec.cert_path)
            .ok_or_else(|| format!("cannot read back {}", spec.cert_path.display()))
    }

    /// Records a failed order and schedules the next try.
    fn failed(&self, e: &mut Entry, f: &Failure) {
        e.failures += 1;
        let delay = retry_delay(e.failures);
        e.not_before = now() + delay.as_secs() as i64;
        e.last_error = Some(f.to_string());
        Metrics::global().acme_order("failure");
        let problem = f.problem.as_ref().map(problem_json);
        tracing::warn!(
            certificate = %e.spec.name,
            hosts = ?e.spec.hosts,
            issuer = %e.spec.issuer.name,
            stage = f.stage,
            error = %f.message,
            problem = problem.as_ref().map(|p| p.to_string()).as_deref().unwrap_or("-"),
            failures = e.failures,
            retry_in_s = delay.as_secs(),
            "ACME order failed; the certificate in force keeps serving"
        );
    }
}

/// `d` plus up to half of it again, at random.
fn retry_jitter(d: Duration) -> i64 {
    (d + d.mul_f64(fastrand::f64() / 2.0)).as_secs() as i64
}

/// The CA's problem document (RFC 7807), as it sent it, for the log.
fn problem_json(p: &instant_acme::Problem) -> serde_json::Value {
    let subproblems: Vec<serde_json::Value> = p
        .subproblems
        .iter()
        .map(|s| {
            serde_json::json!({
                "identifier": s.identifier.as_ref().map(|i| format!("{}", i.authorized(false))),
                "type": s.r#type,
                "detail": s.detail,
            })
        })
        .collect();
    serde_json::json!({
        "type": p.r#type,
        "detail": p.detail,
        "status": p.status,
        "subproblems": subproblems,
    })
}

#[async_trait]
impl BackgroundService for Manager {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut entries: HashMap<String, Entry> = HashMap::new();
        let mut accounts: HashMap<String, instant_acme::Account> = HashMap::new();
        // States for /config at once (a certificate on disk shows as valid).
        self.sync(&mut entries);
        // The CA validates against the listeners: wait until they accept connections.
        for _ in 0..400 {
            if crate::admin::listeners_bound(&self.reloader.snapshots.load()).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        loop {
            self.sync(&mut entries);
            let forced: HashSet<String> = super::lock(&wake().forced).clone();
            let t = now();
            let due = entries
                .iter()
                .filter(|(n, e)| forced.contains(*n) || e.due_at() <= t)
                .map(|(n, e)| (!forced.contains(n), e.due_at(), n.clone()))
                .min();
            if let Some((_, _, name)) = due {
                let names: HashSet<&str> = entries.keys().map(String::as_str).collect();
                super::lock(&wake().forced).retain(|n| names.contains(n.as_str()));
                tokio::select! {
                    _ = self.attempt(&mut entries, &mut accounts, &name) => {}
                    _ = shutdown.changed() => break,
                }
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = wake().notify.notified() => {}
                _ = shutdown.changed() => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds() {
        assert_eq!(renewal_time(0, 90 * 86_400), 60 * 86_400);
        assert_eq!(renewal_time(1000, 1030), 1020);
        assert_eq!(renewal_time(1000, 900), 1000, "nonsense validity: now");
    }

    #[test]
    fn retries_back_off_with_jitter_and_a_cap() {
        for failures in 1..30 {
            let d = retry_delay(failures);
            let full = RETRY_BASE
                .saturating_mul(1 << (failures - 1).min(16))
                .min(RETRY_MAX);
            assert!(d >= full / 2 && d <= full, "{failures}: {d:?} vs {full:?}");
        }
        assert!(retry_delay(1) <= Duration::from_secs(60));
        assert!(retry_delay(30) <= RETRY_MAX);
    }
}
