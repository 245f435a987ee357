//! Reload: the ArcSwap that holds the current Snapshot, and what replaces it. Watches the
//! config files and certificates (by polling their metadata, which also sees Kubernetes'
//! `..data` symlink swaps), listens for SIGHUP, and swaps only a Snapshot that compiled
//! cleanly and keeps the listener set. Anything else leaves the old Snapshot serving.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::{self, ConfigErrors};
use crate::lifecycle;
use crate::snapshot::{ListenerShape, Snapshot};
use crate::telemetry::Metrics;

use crate::config::load::{stamp as fingerprint, FileStamp as Fingerprint, Stamps};

struct State {
    generation: u64,
    last_error: Option<String>,
    watched: Vec<(PathBuf, Option<Fingerprint>)>,
}

/// Owns the current Snapshot and every way of replacing it.
pub struct Reloader {
    pub sources: config::Sources,
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    shapes: Vec<ListenerShape>,
    /// Held for a whole reload so reloads run one at a time; `state` is only locked
    /// briefly, so `/config` never waits for a compile.
    reloading: Mutex<()>,
    state: Mutex<State>,
    /// The Snapshot replaced by the last reload (see `reload_locked`).
    retired: Mutex<Option<Arc<Snapshot>>>,
    /// Parsed files and compiled routes of the last build: a reload redoes only what the
    /// changed files change.
    cache: Mutex<config::Cache>,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub generation: u64,
    pub sources: Vec<PathBuf>,
    pub last_reload_error: Option<String>,
}

impl Reloader {
    /// Loads the config for the first time; self-signed certificates are generated here
    /// when the config asks for them.
    pub fn start(sources: &config::Sources) -> Result<Self, ConfigErrors> {
        let mut cache = config::Cache::default();
        let compiled = config::build_cached(
            sources,
            &config::Options {
                generation: 1,
                generate_missing_certs: true,
            },
            &mut cache,
            &Stamps::default(),
        )
        .map_err(ConfigErrors)?;
        for w in &compiled.warnings {
            tracing::warn!("{w}");
        }
        let snapshot = compiled.snapshot;
        configure_access_log(&snapshot);
        let watched = watch_list(&sources.roots(), &snapshot, &Stamps::default());
        Metrics::global().config_generation.set(1);
        Ok(Reloader {
            sources: sources.clone(),
            shapes: snapshot.shapes(),
            snapshots: Arc::new(ArcSwap::from_pointee(snapshot)),
            reloading: Mutex::new(()),
            retired: Mutex::new(None),
            cache: Mutex::new(cache),
            state: Mutex::new(State {
                generation: 1,
                last_error: None,
                watched,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while reloading must not stop later reloads; the state stays consistent
        // because it is only written after a reload has decided.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when a watched file changed since the last reload attempt.
    pub fn changed(&self) -> bool {
        let st = self.lock();
        st.watched.iter().any(|(p, f)| fingerprint(p) != *f)
    }

    /// Compiles the config again and swaps it in, or keeps the old one and records why.
    /// Blocking (reads files, may resolve names): call it off the request path.
    pub fn reload(&self, reason: &str) -> Result<u64, String> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        lifecycle::reloading();
        let outcome = self.reload_locked(reason);
        lifecycle::ready(self.lock().generation);
        outcome
    }

    fn reload_locked(&self, reason: &str) -> Result<u64, String> {
        // Fingerprints are taken before anything is read: a file that changes while this
        // reload runs is then seen as changed by the next poll.
        // The build looks them up rather than taking them again.
        let (generation, before) = {
            let st = self.lock();
            let before: Stamps = st
                .watched
                .iter()
                .map(|(p, _)| (p.clone(), fingerprint(p)))
                .collect();
            (st.generation + 1, before)
        };
        let started = std::time::Instant::now();
        // A compile that panicked may have left the cache half updated: start it afresh.
        let mut cache = self.cache.lock().unwrap_or_else(|p| {
            let mut cache = p.into_inner();
            *cache = config::Cache::default();
            cache
        });
        let result = config::build_cached(
            &self.sources,
            &config::Options {
                generation,
                generate_missing_certs: true,
            },
            &mut cache,
            &before,
        )
        .map_err(|errs| ConfigErrors(errs).to_string())
        .and_then(|compiled| {
            let shapes = compiled.snapshot.shapes();
            if shapes != self.shapes {
                return Err(format!(
                    "{}: listeners changed (serving [{}], new config wants [{}]); a new port or bind address needs a restart or a graceful upgrade",
                    self.sources,
                    join(&self.shapes),
                    join(&shapes)
                ));
            }
            if compiled.snapshot.settings.admin != self.snapshots.load().settings.admin {
                return Err(format!(
                    "{}: mesh.admin changed; the admin address needs a restart",
                    self.sources
                ));
            }
            Ok(compiled)
        });
        match result {
            Ok(compiled) => {
                for w in &compiled.warnings {
                    tracing::warn!("{w}");
                }
                let reused = compiled.reused;
                let snapshot = compiled.snapshot;
                configure_access_log(&snapshot);
                let mut st = self.lock();
                st.watched = watch_list(&self.sources.roots(), &snapshot, &before);
                st.generation = generation;
                st.last_error = None;
                let summary = snapshot.summary.clone();
                let old = self.snapshots.swap(Arc::new(snapshot));
                // The previous Snapshot is kept until the next reload and dropped here, on
                // the reload thread: otherwise the request that happens to hold it last
                // frees it, and freeing a large config stalls that request's thread.
                let stale = self
                    .retired
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace(old);
                retire(stale);
                Metrics::global().reload_succeeded(generation);
                tracing::info!(
                    generation,
                    reason,
                    %summary,
                    took_ms = started.elapsed().as_millis() as u64,
                    reused_virtual_services = reused,
                    "config reloaded"
                );
                Ok(generation)
            }
            Err(e) => {
                // Remember the files as they were when this attempt started to read them,
                // so the same broken state is not retried on every poll while a file that
                // changed during the attempt (a fix saved while the broken version was
                // being read) is seen as changed by the next poll. Fingerprints taken now
                // would record that fix as already seen, and it would never be loaded.
                let mut st = self.lock();
                let paths: Vec<PathBuf> = st.watched.iter().map(|(p, _)| p.clone()).collect();
                st.watched = paths
                    .into_iter()
                    .map(|p| {
                        let f = before.of(&p);
                        (p, f)
                    })
                    .collect();
                st.last_error = Some(e.clone());
                Metrics::global().reload_failed();
                tracing::error!(reason, error = %e, "config reload rejected; the previous config keeps serving");
                Err(e)
            }
        }
    }

    /// Runs `f` with reloads held off (one that starts meanwhile waits for it): for
    /// writing files that must be read together, such as a new key and its certificate.
    pub fn while_paused<T>(&self, f: impl FnOnce() -> T) -> T {
        let _paused = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        f()
    }

    pub fn status(&self) -> Status {
        let st = self.lock();
        Status {
            generation: st.generation,
            sources: self.snapshots.load().files.clone(),
            last_reload_error: st.last_error.clone(),
        }
    }
}

fn configure_access_log(snapshot: &Snapshot) {
    if let Some(al) = &snapshot.settings.access_log {
        crate::telemetry::access_log::Sink::configure(&al.path);
    }
    crate::telemetry::trace::Exporter::configure(snapshot.settings.tracing.as_ref());
}

fn join(shapes: &[ListenerShape]) -> String {
    shapes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Frees a replaced Snapshot on a thread of its own: dropping a config of 10 000 hosts
/// takes ~20 ms, which the reload's answer (and the next reload) need not wait for. It was
/// kept in `retired` for a whole reload after the swap, so requests have let go of it (a
/// request still holding it frees it when it ends, as before).
fn retire(stale: Option<Arc<Snapshot>>) {
    let Some(stale) = stale else { return };
    let spawned = std::thread::Builder::new()
        .name("portico-retire".into())
        .spawn(move || drop(stale));
    if let Err(e) = spawned {
        // The closure, and with it the Snapshot, was dropped here instead.
        tracing::debug!(error = %e, "no thread to free the old config: freed inline");
    }
}

/// The files a Snapshot depends on with their fingerprints: those taken before the reload
/// read them where known (`before`), else now.
fn watch_list(
    roots: &[PathBuf],
    snapshot: &Snapshot,
    before: &Stamps,
) -> Vec<(PathBuf, Option<Fingerprint>)> {
    let mut paths = snapshot.watched.clone();
    for root in roots {
        if !paths.contains(root) {
            paths.push(root.clone());
        }
    }
    paths
        .into_iter()
        .map(|p| {
            let f = before.of(&p);
            (p, f)
        })
        .collect()
}

/// The background task: polls the watched files and listens for SIGHUP.
pub struct Watcher {
    pub reloader: Arc<Reloader>,
}

impl Watcher {
    async fn reload(&self, reason: &'static str) {
        let r = self.reloader.clone();
        let _ = tokio::task::spawn_blocking(move || r.reload(reason)).await;
    }
}

impl Watcher {
    /// Waits until every listener accepts connections (pingora binds them as its services
    /// start), then tells systemd.
    async fn announce_ready(&self) {
        let snapshot = self.reloader.snapshots.load_full();
        for _ in 0..200 {
            if crate::admin::listeners_bound(&snapshot).is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        lifecycle::ready(snapshot.generation);
    }
}

#[async_trait]
impl BackgroundService for Watcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by file change or the admin API");
                None
            }
        };
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).ok();
        self.announce_ready().await;
        let watchdog = lifecycle::watchdog_interval();
        let mut last_watchdog = std::time::Instant::now();
        loop {
            let mut interval = self.reloader.snapshots.load().settings.reload_poll_interval;
            if let Some(w) = watchdog {
                interval = interval.min(w);
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {
                    if self.reloader.changed() {
                        self.reload("file changed").await;
                    } else if crate::egress::dns::take_cluster_change() {
                        // Clusters hold the addresses their names had when compiled.
                        self.reload("dns answer changed").await;
                    }
                }
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.reload("SIGHUP").await;
                }
                Some(()) = async { match usr1.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                    if let Some(sink) = crate::telemetry::access_log::Sink::get() {
                        sink.reopen();
                    }
                }
                _ = shutdown.changed() => {
                    lifecycle::stopping();
                    // Connections waiting for a request close now; those in a request
                    // close after it.
                    crate::listener::IdleConnections::shut_down();
                    tracing::info!("shutting down: draining in-flight requests");
                    break;
                }
            }
            if let Some(w) = watchdog {
                if last_watchdog.elapsed() >= w {
                    lifecycle::watchdog();
                    last_watchdog = std::time::Instant::now();
                }
            }
        }
    }
}
