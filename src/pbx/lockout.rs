//! Temporary blocks after repeated authentication failures.
//!
//! Two counters: per (source address, extension), so one phone with a stale
//! password behind an office NAT does not lock out everyone behind that
//! address; and per source address alone, at a higher threshold, which is
//! what stops a scanner trying many extensions. Failures count within a
//! window; a block lasts a fixed time. Both tables are bounded. An IPv6
//! source counts by its /64, the unit one site or one subscriber gets (a
//! host holding a /64 has 2^64 addresses to move through).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Most addresses (and address/extension pairs) tracked at once.
pub const MAX_TRACKED: usize = 100_000;
/// Extension names are cut to this length in the table's keys.
const MAX_KEY_CHARS: usize = 64;
/// How many entries are looked at to pick one to forget when a table is full.
const EVICTION_SAMPLE: usize = 16;
/// A full table frees this share of its room at once (1/64), so that the
/// sweep over all entries that comes first runs once per many insertions,
/// not at each one.
const ROOM_DIVISOR: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutConfig {
    pub per_extension_failures: u32,
    pub per_source_failures: u32,
    pub window: Duration,
    pub block: Duration,
}

impl Default for LockoutConfig {
    fn default() -> LockoutConfig {
        LockoutConfig {
            per_extension_failures: 10,
            per_source_failures: 50,
            window: Duration::from_secs(600),
            block: Duration::from_secs(900),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockScope {
    /// This source may not try this extension for a while.
    SourceAndExtension,
    /// This source may not try anything for a while.
    Source,
}

/// A block that just began, for the security log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStarted {
    pub scope: BlockScope,
    pub failures: u32,
    pub until: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Counter {
    window_start: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
}

impl Counter {
    fn new(now: Instant) -> Counter {
        Counter {
            window_start: now,
            failures: 0,
            blocked_until: None,
        }
    }

    fn blocked(&self, now: Instant) -> bool {
        self.blocked_until.is_some_and(|u| now < u)
    }

    /// Counts one failure; returns true when this one crosses the threshold.
    fn fail(&mut self, now: Instant, cfg: &LockoutConfig, threshold: u32) -> bool {
        if self.blocked(now) {
            return false;
        }
        if now.duration_since(self.window_start) > cfg.window || self.blocked_until.is_some() {
            *self = Counter::new(now);
        }
        self.failures += 1;
        if self.failures >= threshold {
            self.blocked_until = Some(now + cfg.block);
            return true;
        }
        false
    }

    fn expired(&self, now: Instant, cfg: &LockoutConfig) -> bool {
        !self.blocked(now) && now.duration_since(self.window_start) > cfg.window
    }
}

pub struct Lockout {
    cfg: LockoutConfig,
    pairs: HashMap<(IpAddr, Box<str>), Counter>,
    sources: HashMap<IpAddr, Counter>,
    max_tracked: usize,
}

impl Lockout {
    pub fn new(cfg: LockoutConfig) -> Lockout {
        Lockout::with_capacity(cfg, MAX_TRACKED)
    }

    pub fn with_capacity(cfg: LockoutConfig, max_tracked: usize) -> Lockout {
        Lockout {
            cfg,
            pairs: HashMap::new(),
            sources: HashMap::new(),
            max_tracked: max_tracked.max(1),
        }
    }

    /// Whether requests from `source` for `extension` are refused right now.
    pub fn blocked(&self, now: Instant, source: IpAddr, extension: &str) -> Option<BlockScope> {
        let source = source_key(source);
        if self.sources.is_empty() {
            // Nothing failed recently from anywhere: the common case.
            return None;
        }
        if self.sources.get(&source).is_some_and(|c| c.blocked(now)) {
            return Some(BlockScope::Source);
        }
        let key = (source, key_name(extension));
        if self.pairs.get(&key).is_some_and(|c| c.blocked(now)) {
            return Some(BlockScope::SourceAndExtension);
        }
        None
    }

    /// Counts a failed authentication. Returns the block it started, if any.
    pub fn record_failure(
        &mut self,
        now: Instant,
        source: IpAddr,
        extension: &str,
    ) -> Option<BlockStarted> {
        let source = source_key(source);
        let cfg = self.cfg;
        let mut started = None;
        let key = (source, key_name(extension));
        if !self.pairs.contains_key(&key) {
            make_room(&mut self.pairs, now, &cfg, self.max_tracked);
        }
        let pair = self.pairs.entry(key).or_insert_with(|| Counter::new(now));
        if pair.fail(now, &cfg, cfg.per_extension_failures) {
            started = Some(BlockStarted {
                scope: BlockScope::SourceAndExtension,
                failures: pair.failures,
                until: now + cfg.block,
            });
        }
        if !self.sources.contains_key(&source) {
            make_room(&mut self.sources, now, &cfg, self.max_tracked);
        }
        let src = self
            .sources
            .entry(source)
            .or_insert_with(|| Counter::new(now));
        if src.fail(now, &cfg, cfg.per_source_failures) {
            started = Some(BlockStarted {
                scope: BlockScope::Source,
                failures: src.failures,
                until: now + cfg.block,
            });
        }
        started
    }

    /// A success clears the failures of that pair; the per-source count
    /// stays, or a scanner could reset it with one account it knows.
    pub fn record_success(&mut self, source: IpAddr, extension: &str) {
        if !self.pairs.is_empty() {
            self.pairs
                .remove(&(source_key(source), key_name(extension)));
        }
    }

    /// Forgets counters whose window and block are over.
    pub fn sweep(&mut self, now: Instant) {
        let cfg = self.cfg;
        self.pairs.retain(|_, c| !c.expired(now, &cfg));
        self.sources.retain(|_, c| !c.expired(now, &cfg));
    }

    pub fn tracked(&self) -> usize {
        self.pairs.len() + self.sources.len()
    }
}

/// What a source is counted by: an IPv4 address, or an IPv6 /64 (which
/// one host usually has whole). Lockout and connection limits share it.
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

fn key_name(extension: &str) -> Box<str> {
    match extension.char_indices().nth(MAX_KEY_CHARS) {
        Some((i, _)) => extension[..i].into(),
        None => extension.into(),
    }
}

/// Keeps a table under its bound: drop expired entries; if it is still
/// full, forget the stalest unblocked entries among samples until a
/// 1/[`ROOM_DIVISOR`] of the room is free.
fn make_room<K: Clone + Eq + std::hash::Hash>(
    map: &mut HashMap<K, Counter>,
    now: Instant,
    cfg: &LockoutConfig,
    max: usize,
) {
    if map.len() < max {
        return;
    }
    map.retain(|_, c| !c.expired(now, cfg));
    let target = max.saturating_sub(max / ROOM_DIVISOR + 1);
    while map.len() > target {
        let victim = map
            .iter()
            .take(EVICTION_SAMPLE)
            .filter(|(_, c)| !c.blocked(now))
            .min_by_key(|(_, c)| c.window_start)
            .map(|(k, _)| k.clone());
        match victim {
            Some(k) => {
                map.remove(&k);
            }
            None => {
                // Every sampled entry is blocked: drop the first one rather
                // than grow without bound.
                if let Some(k) = map.keys().next().cloned() {
                    map.remove(&k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LockoutConfig {
        LockoutConfig {
            per_extension_failures: 3,
            per_source_failures: 5,
            window: Duration::from_secs(60),
            block: Duration::from_secs(300),
        }
    }

    #[test]
    fn pair_blocks_first_and_spares_other_extensions() {
        let t0 = Instant::now();
        let mut l = Lockout::new(cfg());
        let office: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(l.record_failure(t0, office, "100"), None);
        assert_eq!(l.record_failure(t0, office, "100"), None);
        let b = l.record_failure(t0, office, "100").unwrap();
        assert_eq!(b.scope, BlockScope::SourceAndExtension);
        assert_eq!(
            l.blocked(t0, office, "100"),
            Some(BlockScope::SourceAndExtension)
        );
        // Another phone behind the same NAT keeps working.
        assert_eq!(l.blocked(t0, office, "101"), None);
        // The block ends after its time.
        assert_eq!(
            l.blocked(t0 + Duration::from_secs(300), office, "100"),
            None
        );
    }

    #[test]
    fn source_blocks_at_higher_threshold_across_extensions() {
        let t0 = Instant::now();
        let mut l = Lockout::new(cfg());
        let scanner: IpAddr = "203.0.113.66".parse().unwrap();
        for ext in ["1", "2", "3", "4"] {
            assert_eq!(l.record_failure(t0, scanner, ext), None);
        }
        let b = l.record_failure(t0, scanner, "5").unwrap();
        assert_eq!(b.scope, BlockScope::Source);
        assert_eq!(l.blocked(t0, scanner, "999"), Some(BlockScope::Source));
        // A success does not lift a source block.
        l.record_success(scanner, "999");
        assert_eq!(l.blocked(t0, scanner, "999"), Some(BlockScope::Source));
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let t0 = Instant::now();
        let mut l = Lockout::new(cfg());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        l.record_failure(t0, ip, "100");
        l.record_failure(t0, ip, "100");
        let later = t0 + Duration::from_secs(61);
        assert_eq!(l.record_failure(later, ip, "100"), None);
        assert_eq!(l.blocked(later, ip, "100"), None);
        // A success resets the pair.
        l.record_success(ip, "100");
        l.record_failure(later, ip, "100");
        assert_eq!(l.record_failure(later, ip, "100"), None);
    }

    #[test]
    fn an_ipv6_source_counts_by_its_64() {
        let t0 = Instant::now();
        let mut l = Lockout::new(cfg());
        // A host moving through its /64 is still one source: blocked after
        // the per-source threshold (5), every address of the /64 with it.
        let mut started = None;
        for i in 0..5u32 {
            let ip: IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
            started = l.record_failure(t0, ip, &format!("ext{i}"));
        }
        assert_eq!(started.map(|b| b.scope), Some(BlockScope::Source));
        let other_host: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(l.blocked(t0, other_host, "100"), Some(BlockScope::Source));
        // The next /64 is another site.
        let next_site: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(l.blocked(t0, next_site, "100"), None);
        // IPv4, plain or mapped into IPv6, counts by its own address.
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        l.record_failure(t0, mapped, "100");
        l.record_failure(t0, v4, "100");
        assert_eq!(l.sources.len(), 2);
    }

    #[test]
    fn tables_stay_bounded_and_sweep_forgets() {
        let t0 = Instant::now();
        let mut l = Lockout::with_capacity(cfg(), 100);
        for i in 0..10_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            l.record_failure(t0, ip, &format!("{i}"));
        }
        assert!(l.tracked() <= 200);
        l.sweep(t0 + Duration::from_secs(61));
        assert_eq!(l.tracked(), 0);
    }
}
