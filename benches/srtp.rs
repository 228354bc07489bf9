//! SRTP alone: protect + unprotect pairs per second of one CPU for a 20 ms
//! G.711 packet (160-byte payload), the work the relay does per relayed
//! packet, without sockets.
//!
//!   cargo bench --bench srtp -- [--contexts 400] [--secs 3] [--rounds 5]
//!
//! `--contexts N` rotates over N sender/receiver pairs, as a relay does over
//! its legs, so key material is not always hot in cache. Prints the median
//! of the rounds.

#[path = "common/cpu.rs"]
mod cpu;
use cpu::{arg, pin};

use std::time::{Duration, Instant};

use parley::srtp::{MasterKey, SrtpContext, Suite};

const PAYLOAD: usize = 160;
/// Bounds, so a typo cannot start an endless run.
const MAX_SECS: u64 = 60;
const MAX_CONTEXTS: usize = 100_000;
const MAX_ROUNDS: usize = 21;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let contexts: usize = arg(&args, "--contexts", 400).clamp(1, MAX_CONTEXTS);
    let secs: u64 = arg(&args, "--secs", 3).clamp(1, MAX_SECS);
    let rounds: usize = arg(&args, "--rounds", 5).clamp(1, MAX_ROUNDS);
    pin(0, arg(&args, "--cpu", 0));
    for suite in [Suite::AesCm128HmacSha1_80, Suite::AesCm128HmacSha1_32] {
        let mut pairs: Vec<(SrtpContext, SrtpContext)> = (0..contexts)
            .map(|_| {
                let key = MasterKey::generate();
                (SrtpContext::new(suite, &key), SrtpContext::new(suite, &key))
            })
            .collect();
        // Every pair's sequence number only moves forward, across rounds too.
        let mut seq = 0u16;
        let mut per_pair: Vec<Duration> = (0..rounds)
            .map(|_| round(&mut pairs, &mut seq, Duration::from_secs(secs)))
            .collect();
        per_pair.sort();
        let median = per_pair[rounds / 2];
        println!(
            "RESULT suite={suite} contexts={contexts} per_pair={:.0}ns pairs_per_s={:.0} (median of {rounds})",
            median.as_nanos(),
            1.0 / median.as_secs_f64()
        );
    }
}

/// Protects and unprotects packets for `length`; the time per pair.
fn round(pairs: &mut [(SrtpContext, SrtpContext)], seq: &mut u16, length: Duration) -> Duration {
    let mut packet = [0u8; 12 + PAYLOAD + 16];
    let start = Instant::now();
    let mut done: u64 = 0;
    while start.elapsed() < length {
        // Check the clock every few thousand packets only.
        for _ in 0..4096 {
            let i = done as usize % pairs.len();
            if i == 0 {
                *seq = seq.wrapping_add(1);
            }
            let (tx, rx) = &mut pairs[i];
            packet[0] = 0x80;
            packet[1] = 0;
            packet[2..4].copy_from_slice(&seq.to_be_bytes());
            packet[4..8].copy_from_slice(&(u32::from(*seq) * 160).to_be_bytes());
            packet[8..12].copy_from_slice(&(i as u32).to_be_bytes());
            packet[12..12 + PAYLOAD].fill(0xd5);
            let len = tx.protect_rtp(&mut packet, 12 + PAYLOAD).expect("protect");
            let plain = rx.unprotect_rtp(&mut packet[..len]).expect("unprotect");
            assert_eq!(plain.len, 12 + PAYLOAD);
            done += 1;
        }
    }
    start.elapsed() / done as u32
}
