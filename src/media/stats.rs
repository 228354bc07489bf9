//! Per-leg media statistics: counters, loss and interarrival jitter
//! (RFC 3550 §6.4.1 and Appendix A.8), what the phone's RTCP receiver
//! reports say about our stream to it, and an E-model MOS estimate.

use std::time::Instant;

/// Sequence numbers further ahead than this start a new count rather than
/// being taken as a burst of loss (RFC 3550 A.1 uses 3000 for "dropout").
const MAX_DROPOUT: u64 = 3000;

/// What arrived from one phone on one leg.
#[derive(Debug, Clone, Default)]
pub struct Receiving {
    pub packets: u64,
    pub bytes: u64,
    /// RTP packets that failed SRTP authentication.
    pub auth_failures: u64,
    /// RTCP packets that failed SRTCP authentication (some phones send a
    /// plain report around the start and end of SRTP).
    pub rtcp_auth_failures: u64,
    /// Packets refused as replays or too old.
    pub replays: u64,
    /// Packets from an address the leg does not accept media from.
    pub wrong_source: u64,
    /// Packets that were not RTP or RTCP at all.
    pub malformed: u64,
    pub rtcp_packets: u64,
    /// Packets lost in streams that ended (SSRC changes), plus the current.
    lost_before: i64,
    stream: Option<StreamCount>,
    /// Interarrival jitter in RTP timestamp units, scaled by 16 (A.8).
    jitter_q4: u64,
    /// Previous packet's transit time, in timestamp units.
    last_transit: Option<i64>,
    /// The clock `jitter_q4` and `last_transit` count in (0: none yet).
    jitter_clock: u32,
    epoch: Option<Instant>,
    /// A packet that would start a new count, waiting for its successor.
    probation: Option<(u32, u64)>,
}

/// Sequence bookkeeping for one SSRC.
#[derive(Debug, Clone)]
struct StreamCount {
    ssrc: u32,
    first: u64,
    highest: u64,
    received: u64,
}

impl Receiving {
    /// Counts an accepted RTP packet. `index` is the extended sequence number
    /// (the SRTP index on SRTP legs); `timestamp` its RTP timestamp, at
    /// `clock_rate`, which is `None` for packets kept out of the jitter
    /// estimate (RFC 4733 events).
    pub fn on_rtp(
        &mut self,
        ssrc: u32,
        index: u64,
        timestamp: u32,
        len: usize,
        now: Instant,
        clock_rate: Option<u32>,
    ) {
        self.packets += 1;
        self.bytes += len as u64;
        match &mut self.stream {
            Some(s) if s.ssrc == ssrc && index.abs_diff(s.highest) < MAX_DROPOUT => {
                s.highest = s.highest.max(index);
                s.received += 1;
                self.probation = None;
            }
            Some(_) if self.probation != Some((ssrc, index.wrapping_sub(1))) => {
                // A new SSRC or a jump counts only once a second packet
                // follows it (RFC 3550 A.1), so one stray packet cannot
                // reset the counts.
                self.probation = Some((ssrc, index));
                return;
            }
            _ => {
                self.probation = None;
                // A new SSRC or a jump: bank the old stream's loss and start
                // over. Duplicates in the old stream (more received than
                // expected) must not cancel loss in the next.
                self.lost_before += self.stream.as_ref().map_or(0, StreamCount::lost).max(0);
                self.stream = Some(StreamCount {
                    ssrc,
                    first: index,
                    highest: index,
                    received: 1,
                });
                self.last_transit = None;
            }
        }
        let Some(clock_rate) = clock_rate.filter(|&c| c > 0) else {
            return;
        };
        if self.jitter_clock != clock_rate {
            // A codec change (a re-INVITE from 8 kHz to 48 kHz, say): the
            // estimate is carried over to the new clock's units, and no
            // transit difference spans the two.
            if self.jitter_clock != 0 {
                self.jitter_q4 = self.jitter_q4.saturating_mul(u64::from(clock_rate))
                    / u64::from(self.jitter_clock);
            }
            self.jitter_clock = clock_rate;
            self.last_transit = None;
        }
        // Jitter: arrival time and RTP timestamp in the same units.
        let epoch = *self.epoch.get_or_insert(now);
        let arrival =
            (now.duration_since(epoch).as_nanos() * u128::from(clock_rate) / 1_000_000_000) as i64;
        let transit = arrival - i64::from(timestamp);
        if let Some(last) = self.last_transit {
            // Timestamps wrap at 2^32; the difference of two transits is small.
            let d = (transit - last) as i32 as i64;
            let d = d.unsigned_abs();
            self.jitter_q4 = self.jitter_q4 + d - ((self.jitter_q4 + 8) >> 4);
        }
        self.last_transit = Some(transit);
    }

    /// The highest extended sequence number seen from `ssrc`, if it is the
    /// current stream.
    pub fn highest_index(&self, ssrc: u32) -> Option<u64> {
        self.stream
            .as_ref()
            .filter(|s| s.ssrc == ssrc)
            .map(|s| s.highest)
    }

    /// Packets lost so far (never negative: duplicates do not make up for
    /// loss).
    pub fn lost(&self) -> u64 {
        (self.lost_before + self.stream.as_ref().map_or(0, StreamCount::lost).max(0)) as u64
    }

    /// Packets the sequence numbers say should have arrived.
    pub fn expected(&self) -> u64 {
        self.packets + self.lost()
    }

    /// Jitter in milliseconds at `clock_rate`.
    pub fn jitter_ms(&self, clock_rate: u32) -> f64 {
        if clock_rate == 0 {
            return 0.0;
        }
        (self.jitter_q4 as f64 / 16.0) * 1000.0 / f64::from(clock_rate)
    }
}

impl StreamCount {
    fn lost(&self) -> i64 {
        (self.highest - self.first + 1) as i64 - self.received as i64
    }
}

/// What Parley sent to one phone on one leg.
#[derive(Debug, Clone, Default)]
pub struct Sending {
    pub packets: u64,
    pub bytes: u64,
    pub rtcp_packets: u64,
    /// Packets dropped because the phone's address is not known yet.
    pub no_destination: u64,
    /// Sends the kernel refused.
    pub send_errors: u64,
    /// Packets SRTP would not protect: a duplicate of one already sent,
    /// or a new SSRC past what one key may carry (see `srtp::context`).
    pub srtp_refused: u64,
}

/// Interarrival jitter beyond this is not a network's doing but a phone's
/// miscounting (one desk phone reports hours); such a figure is ignored
/// rather than rating every call it touches as unusable.
pub const MAX_PLAUSIBLE_JITTER_MS: f64 = 5_000.0;

/// The latest RTCP receiver report block the phone sent about the stream
/// Parley sends it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RemoteReport {
    /// Fraction lost since the previous report, 0..=1.
    pub fraction_lost: f64,
    pub cumulative_lost: i64,
    /// In timestamp units.
    pub jitter: u32,
}

/// Reads the first report block of an RTCP SR or RR (RFC 3550 §6.4) in a
/// plain compound packet.
pub fn parse_report_block(rtcp: &[u8]) -> Option<RemoteReport> {
    let (pt, count) = (*rtcp.get(1)?, rtcp.first()? & 0x1F);
    let block_at = match pt {
        200 => 28,
        201 => 8,
        _ => return None,
    };
    if count == 0 {
        return None;
    }
    let b = rtcp.get(block_at..block_at + 24)?;
    let lost = i32::from_be_bytes([if b[5] & 0x80 != 0 { 0xFF } else { 0 }, b[5], b[6], b[7]]);
    Some(RemoteReport {
        fraction_lost: f64::from(b[4]) / 256.0,
        cumulative_lost: i64::from(lost),
        jitter: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
    })
}

/// The ITU-T G.107 E-model, simplified for G.711 with packet loss
/// concealment: the estimated MOS for a stream with `loss` (0..=1),
/// `jitter_ms`, and a one-way delay of `delay_ms`.
///
/// Jitter is counted as delay a jitter buffer adds (twice the jitter), as
/// phones size their buffers about so; bursty loss is not modelled.
pub fn mos(loss: f64, jitter_ms: f64, delay_ms: f64) -> f64 {
    // G.113 Appendix I for G.711 with PLC: Ie = 0, Bpl = 25.1.
    const BPL: f64 = 25.1;
    let ppl = (loss.clamp(0.0, 1.0)) * 100.0;
    let ie_eff = (95.0 - 0.0) * ppl / (ppl + BPL);
    let d = delay_ms + 2.0 * jitter_ms + 20.0;
    // Id, the delay impairment, in its common simplified form.
    let id = 0.024 * d + if d > 177.3 { 0.11 * (d - 177.3) } else { 0.0 };
    let r = (93.2 - id - ie_eff).clamp(0.0, 100.0);
    let mos = 1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7.0e-6;
    mos.clamp(1.0, 4.5)
}
