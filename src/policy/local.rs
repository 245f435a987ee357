//! Local rate limits: a token bucket per (rule, route, client key), counted in this
//! process. Owns the bucket tables (bounded, sharded, carried across reloads by the
//! compile cache while their rule is unchanged). Never allocates to check a key it has
//! seen, never blocks beyond one shard's short critical section, never talks to Redis.
//!
//! Each bucket is GCRA's one number, the "theoretical arrival time": a key whose time has
//! passed has a full bucket, the same as a key never seen, so forgetting it loses nothing.
//! A table holds at most `maxKeys` keys; a new key in a full shard takes the place of one
//! whose bucket is full again, else of one not used since the clock hand last passed
//! (CLOCK, an LRU approximation; a key counts as used from its second request). A million
//! distinct clients cost `maxKeys` entries.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use prometheus::IntCounter;

use super::selector::{rate_for, Override, Rate, Selector};
use super::{Decision, Outcome, RateLimitHeaders, RequestKeys};

/// Nanoseconds since the process's first bucket (shared by every table, so a table
/// carried across a reload keeps meaning).
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // +1: 0 means "never seen".
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// What one request did to a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take {
    pub allowed: bool,
    /// Requests that would still be allowed now.
    pub remaining: u32,
    /// Nanoseconds until the bucket is full (allowed) or one more request would be
    /// allowed (refused).
    pub reset_ns: u64,
}

/// GCRA on `tat` (0: a new key) at `now` for `rate`.
pub fn gcra(tat: &mut u64, now: u64, rate: &Rate) -> Take {
    if rate.requests == 0 {
        return Take {
            allowed: false,
            remaining: 0,
            reset_ns: rate.window.as_nanos() as u64,
        };
    }
    let interval = rate.interval_ns;
    let tolerance = interval.saturating_mul(u64::from(rate.burst));
    let start = (*tat).max(now);
    let next = start.saturating_add(interval);
    let limit = now.saturating_add(tolerance);
    if next > limit {
        return Take {
            allowed: false,
            remaining: 0,
            reset_ns: next - limit,
        };
    }
    *tat = next;
    Take {
        allowed: true,
        remaining: ((limit - next) / interval).min(u64::from(u32::MAX)) as u32,
        reset_ns: next - now,
    }
}

/// Keys are already hashes: the map uses them as they are.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

struct Entry {
    key: u64,
    tat: u64,
    used: bool,
}

#[derive(Default)]
struct Shard {
    index: HashMap<u64, u32, BuildHasherDefault<KeyHasher>>,
    entries: Vec<Entry>,
    hand: usize,
}

impl Shard {
    /// The entry for `key`, made (in a free place, or another key's) if need be.
    fn entry(&mut self, key: u64, cap: usize, now: u64) -> &mut Entry {
        if let Some(&i) = self.index.get(&key) {
            let e = &mut self.entries[i as usize];
            e.used = true;
            return e;
        }
        // A new key starts unused: a flood of keys seen once evicts its own kind, not the
        // clients that come back.
        let fresh = Entry {
            key,
            tat: 0,
            used: false,
        };
        if self.entries.len() < cap {
            self.index.insert(key, self.entries.len() as u32);
            self.entries.push(fresh);
            return self.entries.last_mut().expect("just pushed");
        }
        // CLOCK: a full bucket (its time has passed) goes at once; otherwise the first not
        // used since the hand last passed. Two turns at most.
        let n = self.entries.len();
        let mut victim = self.hand;
        for _ in 0..2 * n {
            let e = &mut self.entries[self.hand];
            let here = self.hand;
            self.hand = (self.hand + 1) % n;
            if e.tat <= now || !e.used {
                victim = here;
                break;
            }
            e.used = false;
        }
        let old = std::mem::replace(&mut self.entries[victim], fresh);
        self.index.remove(&old.key);
        self.index.insert(key, victim as u32);
        &mut self.entries[victim]
    }
}

/// The buckets of one rule: at most `cap` keys in shards of their own lock.
pub struct BucketTable {
    shards: Box<[Mutex<Shard>]>,
    shard_cap: usize,
    /// Keys are hashed with a seed of this table's (carried with it across reloads), so a
    /// client cannot choose values that collide.
    seed: foldhash::fast::RandomState,
}

impl BucketTable {
    pub fn new(cap: usize) -> BucketTable {
        let cap = cap.max(1);
        let shards = (cap / 1024).next_power_of_two().clamp(1, 64);
        BucketTable {
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            shard_cap: cap.div_ceil(shards),
            seed: foldhash::fast::RandomState::default(),
        }
    }

    /// A hasher for a key of this table.
    pub fn hasher(&self) -> impl Hasher {
        self.seed.build_hasher()
    }

    /// Takes a request from `key`'s bucket at `now`.
    pub fn take(&self, key: u64, now: u64, rate: &Rate) -> Take {
        let shard = (key >> 40) as usize & (self.shards.len() - 1);
        let mut s = self.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
        let e = s.entry(key, self.shard_cap, now);
        gcra(&mut e.tat, now, rate)
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).entries.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most keys this table will hold.
    pub fn capacity(&self) -> usize {
        self.shard_cap * self.shards.len()
    }
}

/// One local rule, compiled, with its buckets.
pub struct LocalRule {
    /// The `rule` label: the rule's `name`, or `<policy>/local/<index>`.
    pub name: String,
    pub selector: Selector,
    pub rate: Rate,
    pub overrides: Vec<Override>,
    pub response_headers: bool,
    pub table: Arc<BucketTable>,
    allowed: IntCounter,
    limited: IntCounter,
}

impl LocalRule {
    pub fn new(
        name: String,
        selector: Selector,
        rate: Rate,
        overrides: Vec<Override>,
        response_headers: bool,
        table: Arc<BucketTable>,
    ) -> LocalRule {
        let m = &crate::telemetry::Metrics::global().ratelimit_decisions;
        LocalRule {
            allowed: m.with_label_values(&[name.as_str(), "allowed"]),
            limited: m.with_label_values(&[name.as_str(), "limited"]),
            name,
            selector,
            rate,
            overrides,
            response_headers,
            table,
        }
    }

    /// Counts the request if the rule selects it. `instance` tells the routes of a rule
    /// that is not `shared` apart.
    pub fn check(&self, keys: &RequestKeys<'_>, instance: u64, now: u64) -> Option<Decision<'_>> {
        let mut h = self.table.hasher();
        h.write_u64(instance);
        if !self.selector.select(keys, &mut h) {
            return None;
        }
        let rate = rate_for(&self.rate, &self.overrides, keys);
        let t = self.table.take(h.finish(), now, rate);
        let outcome = if t.allowed {
            self.allowed.inc();
            Outcome::Allowed
        } else {
            self.limited.inc();
            Outcome::LocalLimited
        };
        Some(Decision {
            outcome,
            rule: &self.name,
            status: 429,
            body: "",
            headers: self.response_headers.then(|| RateLimitHeaders {
                limit: rate.requests,
                remaining: t.remaining,
                reset: t.reset_ns.div_ceil(1_000_000_000).min(u64::from(u32::MAX)) as u32,
                window: rate.window_secs(),
            }),
        })
    }
}

/// The local rules of one route.
#[derive(Default)]
pub struct Limits {
    /// Each rule with its instance (0 when `shared`, else the route's).
    pub rules: Vec<(Arc<LocalRule>, u64)>,
}

impl Limits {
    /// Counts the request in every rule that selects it: the first refusal decides, else
    /// the rule with the fewest requests left. Synchronous; no allocation for a key seen
    /// before; one shard lock per rule.
    pub fn check(&self, keys: &RequestKeys<'_>) -> Decision<'_> {
        if self.rules.is_empty() {
            return Decision::UNLIMITED;
        }
        let now = now_ns();
        let mut out = Decision::UNLIMITED;
        for (rule, instance) in &self.rules {
            if let Some(d) = rule.check(keys, *instance, now) {
                out = out.and(d);
                if !out.allowed() {
                    break;
                }
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::selector::tests::keys;
    use crate::policy::selector::{Condition, SourceMatch};
    use std::time::Duration;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn gcra_allows_the_burst_then_the_rate() {
        let rate = Rate::new(10, Duration::from_secs(1), Some(5));
        let mut tat = 0;
        let now = 1_000 * SEC;
        let taken: Vec<Take> = (0..7).map(|_| gcra(&mut tat, now, &rate)).collect();
        assert!(taken[..5].iter().all(|t| t.allowed));
        assert_eq!(taken[0].remaining, 4);
        assert_eq!(taken[4].remaining, 0);
        assert!(!taken[5].allowed && !taken[6].allowed);
        assert_eq!(taken[5].reset_ns, SEC / 10, "one token comes back in 100ms");
        // 100ms later exactly one more.
        let later = now + SEC / 10;
        assert!(gcra(&mut tat, later, &rate).allowed);
        assert!(!gcra(&mut tat, later, &rate).allowed);
        // Idle for a second: full again.
        let t = gcra(&mut tat, later + SEC, &rate);
        assert!(t.allowed);
        assert_eq!(t.remaining, 4);
        // No requests at all.
        let zero = Rate::new(0, Duration::from_secs(1), None);
        assert!(!gcra(&mut 0, now, &zero).allowed);
    }

    #[test]
    fn sustained_rate_is_requests_per_window() {
        // 3 requests every 100ms for 10s against 10/s with burst 10: 10 + 10*10 allowed.
        let rate = Rate::new(10, Duration::from_secs(1), None);
        let mut tat = 0;
        let mut allowed = 0;
        for tick in 0..100u64 {
            let now = SEC + tick * SEC / 10;
            for _ in 0..3 {
                allowed += usize::from(gcra(&mut tat, now, &rate).allowed);
            }
        }
        assert!((108..=110).contains(&allowed), "{allowed}");
    }

    #[test]
    fn a_million_keys_stay_within_the_cap() {
        let table = BucketTable::new(10_000);
        let rate = Rate::new(1, Duration::from_secs(3600), None);
        let now = now_ns();
        for k in 0..1_000_000u64 {
            let mut h = table.hasher();
            h.write_u64(k);
            table.take(h.finish(), now, &rate);
        }
        assert!(table.len() <= table.capacity(), "{}", table.len());
        assert!(table.capacity() <= 10_000 + 64);
        for s in table.shards.iter() {
            let s = s.lock().unwrap();
            assert!(s.entries.capacity() <= 2 * table.shard_cap);
            assert!(s.index.len() == s.entries.len());
        }
    }

    #[test]
    fn eviction_keeps_busy_keys_and_forgets_full_buckets() {
        let table = BucketTable::new(4);
        assert_eq!(table.shards.len(), 1);
        let rate = Rate::new(1, Duration::from_secs(3600), Some(1));
        let now = 10 * SEC;
        // Key 1 is limited; keys 2-4 fill the table with limited buckets too.
        for k in 1..=4 {
            assert!(table.take(k, now, &rate).allowed);
        }
        assert!(!table.take(1, now, &rate).allowed);
        // Many new keys come and go; key 1 is used between them and keeps its state.
        for k in 100..200 {
            table.take(k, now, &rate);
            assert!(!table.take(1, now, &rate).allowed, "key 1 was forgotten");
        }
        assert!(table.len() <= 4);
        // Buckets full again are taken first, whatever their use.
        let free = Rate::new(1_000_000, Duration::from_secs(1), None);
        let t = BucketTable::new(2);
        t.take(1, now, &free);
        t.take(2, now, &rate);
        t.take(3, now + SEC, &free);
        assert!(
            !t.take(2, now + SEC, &rate).allowed,
            "the limited key stayed"
        );
    }

    fn rule(table: Arc<BucketTable>, overrides: Vec<Override>) -> LocalRule {
        LocalRule::new(
            "test/local/0".into(),
            Selector {
                conditions: vec![Condition {
                    source: Some(SourceMatch {
                        net: "0.0.0.0/0".parse().unwrap(),
                        distinct: true,
                    }),
                    ..Default::default()
                }],
            },
            Rate::new(5, Duration::from_secs(1), None),
            overrides,
            true,
            table,
        )
    }

    #[test]
    fn each_client_gets_its_limit_and_overrides_apply() {
        let premium = Override {
            headers: Vec::new(),
            source: Some("10.9.0.0/16".parse().unwrap()),
            claims: Vec::new(),
            principal: None,
            rate: Rate::new(50, Duration::from_secs(1), None),
        };
        let limits = Limits {
            rules: vec![(
                Arc::new(rule(Arc::new(BucketTable::new(100)), vec![premium])),
                7,
            )],
        };
        let count = |ip: &str, n: usize| {
            (0..n)
                .filter(|_| limits.check(&keys(ip, &[], "/")).allowed())
                .count()
        };
        // 3N requests from each of two clients (within one millisecond or so: a token
        // comes back every 200ms).
        assert_eq!(count("192.0.2.1", 15), 5);
        assert_eq!(count("192.0.2.2", 15), 5);
        assert_eq!(count("10.9.1.1", 150), 50, "the override's limit");
        let d = limits.check(&keys("192.0.2.1", &[], "/"));
        assert_eq!(d.outcome, Outcome::LocalLimited);
        assert_eq!(d.rule, "test/local/0");
        assert_eq!(d.headers.unwrap().remaining, 0);
        assert_eq!(d.headers.unwrap().limit, 5);
        // No client address: the rule does not select the request.
        let none = limits.check(&keys("", &[], "/"));
        assert_eq!(none.outcome, Outcome::Unlimited);
    }

    #[test]
    fn routes_of_a_rule_count_apart_unless_shared() {
        let r = Arc::new(rule(Arc::new(BucketTable::new(100)), Vec::new()));
        let a = Limits {
            rules: vec![(r.clone(), 1)],
        };
        let b = Limits {
            rules: vec![(r.clone(), 2)],
        };
        let k = keys("192.0.2.1", &[], "/");
        assert_eq!((0..10).filter(|_| a.check(&k).allowed()).count(), 5);
        assert_eq!((0..10).filter(|_| b.check(&k).allowed()).count(), 5);
    }
}
