//! RFC 3261 §17 timers (A–K) and RFC 6026's L and M, kept in one heap.
//!
//! Entries are never removed in place: each carries the generation of the
//! timer slot it was armed in, and a popped entry whose transaction is gone
//! or whose slot was re-armed since is ignored. When stale entries pile up
//! (a flood of transactions evicted early) the heap is rebuilt.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// The protocol constants. RFC 3261 defaults; tests may shrink them.
#[derive(Debug, Clone, Copy)]
pub struct TimerConfig {
    /// Round-trip estimate.
    pub t1: Duration,
    /// Cap on the retransmit interval of non-INVITE requests and INVITE responses.
    pub t2: Duration,
    /// How long a message may stay in the network.
    pub t4: Duration,
    /// Timer C: how long an INVITE client transaction may stay in
    /// Proceeding after its last provisional response before it is given up
    /// (RFC 3261 §16.6 asks more than 3 minutes of proxies; a UAC needs a
    /// bound too, or a phone that answers 180 and then vanishes holds the
    /// transaction forever).
    pub proceeding_limit: Duration,
}

impl Default for TimerConfig {
    fn default() -> TimerConfig {
        TimerConfig {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
            proceeding_limit: Duration::from_secs(181),
        }
    }
}

impl TimerConfig {
    /// 64·T1: Timers B, F, H, J, L and M.
    pub fn t1x64(&self) -> Duration {
        self.t1 * 64
    }
}

/// Named after the RFC. Retransmit timers and wait timers of one
/// transaction use separate slots, so re-arming one leaves the other alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKind {
    /// INVITE client: retransmit the request.
    A,
    /// INVITE client: give up waiting for any response.
    B,
    /// INVITE client: give up waiting for a final response in Proceeding,
    /// or 64·T1 after CANCEL.
    C,
    /// INVITE client: absorb final-response retransmissions after ACK.
    D,
    /// Non-INVITE client: retransmit the request.
    E,
    /// Non-INVITE client: give up.
    F,
    /// INVITE server: retransmit the final non-2xx response.
    G,
    /// INVITE server: give up waiting for ACK.
    H,
    /// INVITE server: absorb ACK retransmissions.
    I,
    /// Non-INVITE server: absorb request retransmissions.
    J,
    /// Non-INVITE client: absorb response retransmissions.
    K,
    /// INVITE server, RFC 6026: absorb INVITE retransmissions after a 2xx.
    L,
    /// INVITE client, RFC 6026: accept further 2xx after the first.
    M,
}

impl TimerKind {
    /// Retransmit timers share one slot, wait timers the other.
    pub fn slot(self) -> usize {
        match self {
            TimerKind::A | TimerKind::E | TimerKind::G => 0,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    Server,
    Client,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimerEntry {
    pub deadline: Instant,
    pub seq: u64,
    pub side: Side,
    pub idx: usize,
    pub uid: u64,
    pub kind: TimerKind,
    pub generation: u32,
}

#[derive(Debug, Default)]
pub struct TimerHeap {
    heap: BinaryHeap<Reverse<TimerEntry>>,
    seq: u64,
}

impl TimerHeap {
    pub fn push(
        &mut self,
        deadline: Instant,
        side: Side,
        idx: usize,
        uid: u64,
        kind: TimerKind,
        generation: u32,
    ) {
        self.seq += 1;
        self.heap.push(Reverse(TimerEntry {
            deadline,
            seq: self.seq,
            side,
            idx,
            uid,
            kind,
            generation,
        }));
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(e)| e.deadline)
    }

    /// Pops the earliest entry due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<TimerEntry> {
        match self.heap.peek() {
            Some(Reverse(e)) if e.deadline <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Drops every entry `live` rejects, in one pass.
    pub fn retain(&mut self, mut live: impl FnMut(&TimerEntry) -> bool) {
        self.heap.retain(|Reverse(e)| live(e));
    }
}
