//! Load balancing: which endpoint of a cluster serves a request. Round robin, least
//! request and peak EWMA (power of two choices), random, and consistent hashing on a ring
//! or a Maglev table. Skips ejected endpoints and, on retries, endpoints already tried.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderName;

use super::Endpoint;

#[derive(Debug)]
pub enum Policy {
    RoundRobin(AtomicUsize),
    /// Power of two choices on in-flight requests (Istio's default).
    LeastRequest,
    Random,
    /// Power of two choices on `latency EWMA × (in-flight + 1)`, as Linkerd balances.
    PeakEwma,
    Hash {
        source: HashSource,
        table: HashTable,
    },
}

/// What a consistent hash is computed from.
#[derive(Debug, Clone)]
pub enum HashSource {
    Header(HeaderName),
    Cookie {
        name: String,
        path: Option<String>,
        /// When set and the request has no cookie, one is generated and set on the response.
        ttl: Option<Duration>,
        /// What follows `name=value` in the cookie the gateway sets on a response to a
        /// request without one (`; Path=/; Max-Age=60; HttpOnly`), written at load; `None`
        /// without a ttl (no cookie is set).
        set_attributes: Option<Box<str>>,
    },
    SourceIp,
    Query(String),
}

#[derive(Debug)]
pub enum HashTable {
    /// Sorted `(point, endpoint)` pairs.
    Ring(Vec<(u64, u32)>),
    /// Maglev lookup table: slot → endpoint.
    Maglev(Vec<u32>),
}

pub fn hash_bytes(data: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

/// The consistent-hash key of a client address (`useSourceIp`): its octets, an
/// IPv4-mapped IPv6 address as the IPv4 one (every listener and L4 route hash alike).
pub fn hash_ip(ip: std::net::IpAddr) -> u64 {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        std::net::IpAddr::V6(v6) => hash_bytes(&v6.octets()),
    }
}

fn hash_point(addr: &str, i: u64) -> u64 {
    let mut h = DefaultHasher::new();
    addr.hash(&mut h);
    i.hash(&mut h);
    h.finish()
}

impl HashTable {
    /// A ring with about `min_size` points spread evenly over the endpoints.
    pub fn ring(endpoints: &[Endpoint], min_size: u64) -> HashTable {
        if endpoints.is_empty() {
            return HashTable::Ring(Vec::new());
        }
        // Points per endpoint rounded up to a power of two, so adding or removing an
        // endpoint rarely changes the others' points: only the keys of the endpoint that
        // came or went move.
        let per = min_size
            .div_ceil(endpoints.len() as u64)
            .max(1)
            .next_power_of_two();
        let mut points = Vec::with_capacity((per as usize) * endpoints.len());
        for (idx, e) in endpoints.iter().enumerate() {
            let key = e.addr.to_string();
            for i in 0..per {
                points.push((hash_point(&key, i), idx as u32));
            }
        }
        points.sort_unstable();
        HashTable::Ring(points)
    }

    /// Maglev (Eisenbud et al., 2016): each endpoint fills the table in its own permutation.
    pub fn maglev(endpoints: &[Endpoint], table_size: u64) -> HashTable {
        let m = next_prime(table_size.max(endpoints.len() as u64 * 10).max(7));
        if endpoints.is_empty() {
            return HashTable::Maglev(Vec::new());
        }
        let perms: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|e| {
                let key = e.addr.to_string();
                let offset = hash_point(&key, 0xA11CE) % m;
                let skip = hash_point(&key, 0xB0B) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; endpoints.len()];
        let mut table = vec![u32::MAX; m as usize];
        let mut filled = 0u64;
        'outer: loop {
            for (i, (offset, skip)) in perms.iter().enumerate() {
                let mut c = (offset + next[i] * skip) % m;
                while table[c as usize] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                table[c as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'outer;
                }
            }
        }
        HashTable::Maglev(table)
    }

    /// Endpoints in the order the hash walks them, first choice first.
    fn walk(&self, hash: u64, n: usize) -> impl Iterator<Item = usize> + '_ {
        let (start, len) = match self {
            HashTable::Ring(points) => {
                let i = points.partition_point(|(p, _)| *p < hash);
                (if i == points.len() { 0 } else { i }, points.len())
            }
            HashTable::Maglev(t) => ((hash % t.len().max(1) as u64) as usize, t.len()),
        };
        let _ = n;
        (0..len).map(move |k| {
            let i = (start + k) % len;
            match self {
                HashTable::Ring(points) => points[i].1 as usize,
                HashTable::Maglev(t) => t[i] as usize,
            }
        })
    }
}

fn next_prime(mut n: u64) -> u64 {
    fn is_prime(n: u64) -> bool {
        if n < 2 {
            return false;
        }
        let mut d = 2;
        while d * d <= n {
            if n % d == 0 {
                return false;
            }
            d += 1;
        }
        true
    }
    while !is_prime(n) {
        n += 1;
    }
    n
}

impl Policy {
    /// Picks an endpoint index among those `usable` says yes to.
    pub fn pick(
        &self,
        endpoints: &[Endpoint],
        hash: Option<u64>,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        match self {
            Policy::RoundRobin(next) => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| (start + k) % n).find(|&i| usable(i))
            }
            Policy::Random => {
                let start = fastrand::usize(0..n);
                (0..n).map(|k| (start + k) % n).find(|&i| usable(i))
            }
            Policy::LeastRequest | Policy::PeakEwma => {
                let a = random_usable(n, &usable)?;
                let b = random_usable(n, &usable).unwrap_or(a);
                let cost = |i: usize| -> u64 {
                    let e = &endpoints[i].stats;
                    let active = u64::from(e.active.load(Ordering::Relaxed)) + 1;
                    match self {
                        Policy::PeakEwma => e.ewma_us.load(Ordering::Relaxed).max(1) * active,
                        _ => active,
                    }
                };
                Some(if cost(b) < cost(a) { b } else { a })
            }
            Policy::Hash { table, .. } => {
                let h = hash.unwrap_or_else(|| fastrand::u64(..));
                table.walk(h, n).find(|&i| usable(i))
            }
        }
    }

    pub fn hash_source(&self) -> Option<&HashSource> {
        match self {
            Policy::Hash { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn random_usable(n: usize, usable: &impl Fn(usize) -> bool) -> Option<usize> {
    for _ in 0..4 {
        let i = fastrand::usize(0..n);
        if usable(i) {
            return Some(i);
        }
    }
    let start = fastrand::usize(0..n);
    (0..n).map(|k| (start + k) % n).find(|&i| usable(i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn endpoints(n: u16) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint::new(SocketAddr::from(([10, 0, 0, 1], 8000 + i))))
            .collect()
    }

    fn moved_fraction(make: impl Fn(&[Endpoint]) -> HashTable) -> f64 {
        let all = endpoints(5);
        let before = make(&all);
        let fewer: Vec<Endpoint> = all.iter().take(4).map(|e| Endpoint::new(e.addr)).collect();
        let after = make(&fewer);
        let keys = 10_000u64;
        let mut moved = 0;
        let mut on_removed = 0;
        for k in 0..keys {
            let h = hash_bytes(&k.to_le_bytes());
            let a = before.walk(h, 5).next().unwrap();
            let b = after.walk(h, 4).next().unwrap();
            if a == 4 {
                on_removed += 1;
            } else if a != b {
                moved += 1;
            }
        }
        assert!(on_removed > 0);
        moved as f64 / keys as f64
    }

    #[test]
    fn ring_moves_only_keys_of_the_removed_endpoint() {
        assert!(moved_fraction(|e| HashTable::ring(e, 1024)) < 0.001);
    }

    #[test]
    fn maglev_moves_few_other_keys() {
        // Maglev trades a little disruption for balance.
        assert!(moved_fraction(|e| HashTable::maglev(e, 65537)) < 0.05);
    }

    #[test]
    fn maglev_table_is_balanced() {
        let e = endpoints(3);
        let HashTable::Maglev(t) = HashTable::maglev(&e, 65537) else {
            unreachable!()
        };
        for i in 0..3u32 {
            let share = t.iter().filter(|&&x| x == i).count() as f64 / t.len() as f64;
            assert!((share - 1.0 / 3.0).abs() < 0.01, "{share}");
        }
    }

    #[test]
    fn round_robin_skips_unusable() {
        let e = endpoints(3);
        let p = Policy::RoundRobin(AtomicUsize::new(0));
        let picks: Vec<usize> = (0..4)
            .map(|_| p.pick(&e, None, |i| i != 1).unwrap())
            .collect();
        assert!(!picks.contains(&1));
        assert!(p.pick(&e, None, |_| false).is_none());
    }
}
