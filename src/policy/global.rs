//! Global rate limits: the same rules as `local`, counted in a Redis that every replica
//! shares. Owns the Redis connections (a small pool of multiplexed connections, made when
//! first needed and again after a failure) and the per-call timeout, and decides what a
//! request gets when Redis does not answer (fail open, or `statusOnError`). Never blocks a
//! thread, never holds a request's borrowed fields across a wait, never parses config.
//!
//! One decision is one pipelined round trip, whatever the number of rules: a fixed window
//! is `SET key 0 EX window NX` + `INCR key` (the key names its window, as Envoy's rate
//! limit service names them, so replicas' clocks only need to agree on the window); GCRA
//! is one Lua script (`EVALSHA`, loaded again when Redis answers `NOSCRIPT`) that keeps a
//! token bucket on Redis' own clock.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus::IntCounter;
use redis::aio::MultiplexedConnection;

use super::selector::{rate_for, KeySink, Override, Rate, Selector};
use super::{Decision, Outcome, RateLimitHeaders, RequestKeys};
use crate::admin::LogLimit;
use crate::telemetry::Metrics;

/// GCRA on Redis' clock. KEYS[1]: the bucket; ARGV[1]: the interval between requests
/// (µs); ARGV[2]: the burst. Answers {allowed, remaining, µs until full or allowed}.
pub const GCRA_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local nxt = tat + interval
local limit = now + tolerance
if nxt > limit then
  return {0, 0, nxt - limit}
end
redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', math.ceil((nxt - now) / 1000))
return {1, math.floor((limit - nxt) / interval), nxt - now}
"#;

/// After a failed connect, a slot waits this long before trying again (requests in
/// between fail at once rather than each waiting for a dead server).
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// `mesh.redis`, compiled.
pub struct RedisSettings {
    pub client: redis::Client,
    /// `host:port`, for logs (never the password).
    pub address: String,
    pub pool_size: usize,
    pub timeout: Duration,
    pub key_prefix: String,
}

struct Slot {
    conn: Mutex<Option<MultiplexedConnection>>,
    connecting: tokio::sync::Mutex<()>,
    /// When the last connect failed (None: it did not).
    failed_at: Mutex<Option<Instant>>,
}

/// Why a Redis call failed (the `reason` label of `portico_ratelimit_redis_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Timeout,
    Connect,
    Command,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Connect => "connect",
            Failure::Command => "command",
        }
    }
}

/// The connections to one Redis. Shared by every global rule, and carried across reloads
/// while `mesh.redis` is unchanged.
pub struct RedisLimiter {
    client: redis::Client,
    pub address: String,
    slots: Box<[Slot]>,
    next: AtomicUsize,
    pub timeout: Duration,
    pub key_prefix: String,
    gcra_sha: String,
    log: LogLimit,
    errors: [IntCounter; 3],
    /// Calls that got an answer, for tests and the admin view.
    answered: AtomicU64,
}

impl RedisLimiter {
    pub fn new(s: RedisSettings) -> RedisLimiter {
        let m = &Metrics::global().ratelimit_redis_errors;
        RedisLimiter {
            client: s.client,
            address: s.address,
            slots: (0..s.pool_size.max(1))
                .map(|_| Slot {
                    conn: Mutex::new(None),
                    connecting: tokio::sync::Mutex::new(()),
                    failed_at: Mutex::new(None),
                })
                .collect(),
            next: AtomicUsize::new(0),
            timeout: s.timeout,
            key_prefix: s.key_prefix,
            gcra_sha: redis::Script::new(GCRA_SCRIPT).get_hash().to_string(),
            log: LogLimit::new(),
            errors: [
                m.with_label_values(&["timeout"]),
                m.with_label_values(&["connect"]),
                m.with_label_values(&["command"]),
            ],
            answered: AtomicU64::new(0),
        }
    }

    /// Calls Redis answered.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// A connection of the pool: the next slot's, made now if it has none (unless its
    /// last attempt failed within `RECONNECT_PAUSE`).
    async fn connection(&self, slot: &Slot) -> Result<MultiplexedConnection, Failure> {
        if let Some(c) = lock(&slot.conn).clone() {
            return Ok(c);
        }
        let _one = slot.connecting.lock().await;
        if let Some(c) = lock(&slot.conn).clone() {
            return Ok(c);
        }
        if lock(&slot.failed_at).is_some_and(|t| t.elapsed() < RECONNECT_PAUSE) {
            return Err(Failure::Connect);
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout);
        match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(c) => {
                *lock(&slot.failed_at) = None;
                *lock(&slot.conn) = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                *lock(&slot.failed_at) = Some(Instant::now());
                self.log_failure(Failure::Connect, &e.to_string());
                Err(Failure::Connect)
            }
        }
    }

    /// Runs `pipe` on a pooled connection, loading the GCRA script once if Redis does not
    /// know it; at most `timeout` in all.
    pub async fn query(&self, pipe: &redis::Pipeline) -> Result<Vec<redis::Value>, Failure> {
        let slot = self.slot();
        let call = async {
            let mut conn = self.connection(slot).await?;
            let mut loaded = false;
            loop {
                match pipe.query_async::<Vec<redis::Value>>(&mut conn).await {
                    Ok(v) => return Ok(v),
                    Err(e) if e.kind() == redis::ErrorKind::NoScriptError && !loaded => {
                        loaded = true;
                        let load = redis::cmd("SCRIPT")
                            .arg("LOAD")
                            .arg(GCRA_SCRIPT)
                            .query_async::<String>(&mut conn)
                            .await;
                        if let Err(e) = load {
                            self.log_failure(Failure::Command, &e.to_string());
                            return Err(Failure::Command);
                        }
                    }
                    Err(e) => {
                        if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                            lock(&slot.conn).take();
                        }
                        self.log_failure(Failure::Command, &e.to_string());
                        return Err(Failure::Command);
                    }
                }
            }
        };
        let out = match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => {
                // A connection that does not answer in time may be dead: the next call
                // through this slot makes a new one.
                lock(&slot.conn).take();
                self.log_failure(Failure::Timeout, "no answer in time");
                Err(Failure::Timeout)
            }
        };
        match out {
            Ok(_) => {
                self.answered.fetch_add(1, Ordering::Relaxed);
            }
            Err(f) => self.errors[f as usize].inc(),
        }
        out
    }

    /// The next slot round the pool; but when that one has no connection and waits
    /// before trying again, one that has a connection (so that once Redis is back, the
    /// first connection made serves every request while the others are made again).
    fn slot(&self) -> &Slot {
        let n = self.slots.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let usable = |s: &Slot| {
            lock(&s.conn).is_some()
                || lock(&s.failed_at).is_none_or(|t| t.elapsed() >= RECONNECT_PAUSE)
        };
        (0..n)
            .map(|k| &self.slots[(first + k) % n])
            .find(|s| usable(s))
            .unwrap_or(&self.slots[first])
    }

    /// At most one line a second, saying how many failures it stands for.
    fn log_failure(&self, f: Failure, error: &str) {
        if let Some(skipped) = self.log.admit(Instant::now()) {
            tracing::warn!(
                redis = %self.address,
                reason = f.label(),
                error,
                more_since_last_line = skipped,
                "rate limit check in Redis failed: global rules fail open or closed as configured"
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a global rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Requests per calendar window (`unix time / window`), as Envoy's rate limit service
    /// counts; `burst` does not apply.
    FixedWindow,
    /// A token bucket (GCRA) on Redis' clock, as local rules count.
    Gcra,
}

/// One global rule, compiled.
pub struct GlobalRule {
    /// The `rule` label: the rule's `name`, or `<policy>/global/<index>`.
    pub name: String,
    pub selector: Selector,
    pub rate: Rate,
    pub overrides: Vec<Override>,
    pub algorithm: Algorithm,
    /// The rule's part of its Redis keys (`<prefix>:<policy>:<index>`): replicas with the
    /// same config count in the same keys.
    pub key: String,
    pub fail_open: bool,
    pub status_on_error: u16,
    pub response_headers: bool,
    counters: [IntCounter; 4],
}

impl GlobalRule {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        selector: Selector,
        rate: Rate,
        overrides: Vec<Override>,
        algorithm: Algorithm,
        key: String,
        fail_open: bool,
        status_on_error: u16,
        response_headers: bool,
    ) -> GlobalRule {
        let m = &Metrics::global().ratelimit_decisions;
        let c = |d: &str| m.with_label_values(&[name.as_str(), d]);
        GlobalRule {
            counters: [
                c("allowed"),
                c("limited"),
                c("failed_open"),
                c("failed_closed"),
            ],
            name,
            selector,
            rate,
            overrides,
            algorithm,
            key,
            fail_open,
            status_on_error,
            response_headers,
        }
    }

    fn decide(&self, outcome: Outcome, headers: Option<RateLimitHeaders>) -> Decision<'_> {
        let (i, status) = match outcome {
            Outcome::GlobalLimited => (1, 429),
            Outcome::FailedOpen => (2, 200),
            Outcome::FailedClosed => (3, self.status_on_error),
            _ => (0, 200),
        };
        self.counters[i].inc();
        Decision {
            outcome,
            rule: &self.name,
            status,
            body: "",
            headers: headers.filter(|_| self.response_headers),
        }
    }

    fn failed(&self) -> Decision<'_> {
        if self.fail_open {
            self.decide(Outcome::FailedOpen, None)
        } else {
            self.decide(Outcome::FailedClosed, None)
        }
    }
}

/// A Redis key's client part: SHA-256 of the `Distinct` values, cut to 128 bits. Stable
/// across replicas and versions, and of fixed length whatever a client sends.
struct Digest(ring::digest::Context);

impl KeySink for Digest {
    fn part(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u64).to_be_bytes());
        self.0.update(bytes);
    }
}

/// One rule's call, prepared from the request before any wait.
struct Call<'s> {
    rule: &'s GlobalRule,
    key: String,
    rate: Rate,
    /// Fixed window: seconds left in the window.
    window_left: u64,
}

/// The global rules of one route.
pub struct GlobalLimits {
    /// Each rule with its instance (0 when `shared`, else the route's).
    pub rules: Vec<(Arc<GlobalRule>, u64)>,
    pub redis: Arc<RedisLimiter>,
}

impl GlobalLimits {
    /// Counts the request in Redis for every rule that selects it: one pipelined round
    /// trip, at most `mesh.redis.timeout`. What it needs from the request is read before
    /// the future is made, so the future borrows only `self`.
    pub fn check(&self, keys: &RequestKeys<'_>) -> impl Future<Output = Decision<'_>> + Send + '_ {
        let calls = self.prepare(keys);
        async move { self.run(calls).await }
    }

    fn prepare(&self, keys: &RequestKeys<'_>) -> Vec<Call<'_>> {
        let unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut calls = Vec::with_capacity(self.rules.len());
        for (rule, instance) in &self.rules {
            let mut d = Digest(ring::digest::Context::new(&ring::digest::SHA256));
            if !rule.selector.select(keys, &mut d) {
                continue;
            }
            let rate = *rate_for(&rule.rate, &rule.overrides, keys);
            let digest = d.0.finish();
            let mut key = String::with_capacity(rule.key.len() + 64);
            key.push_str(&rule.key);
            key.push(':');
            push_hex(&mut key, &instance.to_be_bytes());
            key.push(':');
            push_hex(&mut key, &digest.as_ref()[..16]);
            let mut window_left = 0;
            if rule.algorithm == Algorithm::FixedWindow {
                let w = rate.window.as_secs().max(1);
                let index = unix / w;
                window_left = (index + 1) * w - unix;
                key.push(':');
                key.push_str(&index.to_string());
            }
            calls.push(Call {
                rule,
                key,
                rate,
                window_left,
            });
        }
        calls
    }

    async fn run<'s>(&'s self, calls: Vec<Call<'s>>) -> Decision<'s> {
        let mut pipe = redis::pipe();
        let mut asked = 0;
        for c in &calls {
            if c.rate.requests == 0 {
                continue;
            }
            asked += 1;
            match c.rule.algorithm {
                Algorithm::FixedWindow => {
                    pipe.cmd("SET")
                        .arg(&c.key)
                        .arg(0)
                        .arg("EX")
                        .arg(c.rate.window.as_secs().max(1))
                        .arg("NX")
                        .ignore();
                    pipe.cmd("INCR").arg(&c.key);
                }
                Algorithm::Gcra => {
                    pipe.cmd("EVALSHA")
                        .arg(&self.redis.gcra_sha)
                        .arg(1)
                        .arg(&c.key)
                        .arg((c.rate.interval_ns / 1000).max(1))
                        .arg(c.rate.burst);
                }
            }
        }
        let answers = if asked == 0 {
            Ok(Vec::new())
        } else {
            self.redis.query(&pipe).await
        };
        let mut answers = match answers {
            Ok(a) if a.len() == asked => a.into_iter(),
            Ok(_) => {
                self.redis.errors[Failure::Command as usize].inc();
                Vec::new().into_iter()
            }
            Err(_) => Vec::new().into_iter(),
        };
        let failed = asked > 0 && answers.len() == 0;
        let mut out = Decision::UNLIMITED;
        for c in &calls {
            let d = if c.rate.requests == 0 {
                c.rule.decide(Outcome::GlobalLimited, None)
            } else if failed {
                c.rule.failed()
            } else {
                let answer = answers.next().unwrap_or(redis::Value::Nil);
                match self.read(c, &answer) {
                    Some((outcome, headers)) => c.rule.decide(outcome, Some(headers)),
                    None => c.rule.failed(),
                }
            };
            out = out.and(d);
        }
        out
    }

    /// A rule's answer: its outcome and fields.
    fn read(&self, c: &Call<'_>, v: &redis::Value) -> Option<(Outcome, RateLimitHeaders)> {
        let limit = c.rate.requests;
        let window = c.rate.window_secs();
        match c.rule.algorithm {
            Algorithm::FixedWindow => {
                let n: u64 = redis::from_redis_value(v).ok()?;
                let allowed = n <= u64::from(limit);
                let headers = RateLimitHeaders {
                    limit,
                    remaining: u64::from(limit).saturating_sub(n) as u32,
                    reset: c.window_left.min(u64::from(u32::MAX)) as u32,
                    window,
                };
                let outcome = if allowed {
                    Outcome::Allowed
                } else {
                    Outcome::GlobalLimited
                };
                Some((outcome, headers))
            }
            Algorithm::Gcra => {
                let (allowed, remaining, reset_us): (i64, i64, i64) =
                    redis::from_redis_value(v).ok()?;
                let headers = RateLimitHeaders {
                    limit,
                    remaining: remaining.clamp(0, i64::from(u32::MAX)) as u32,
                    reset: (reset_us.max(0) as u64)
                        .div_ceil(1_000_000)
                        .min(u64::from(u32::MAX)) as u32,
                    window,
                };
                let outcome = if allowed == 1 {
                    Outcome::Allowed
                } else {
                    Outcome::GlobalLimited
                };
                Some((outcome, headers))
            }
        }
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
}
