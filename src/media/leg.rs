//! One media leg: the packets between Parley and one phone. Sans-IO: the
//! relay hands it packets and addresses; it authenticates, decrypts,
//! latches, counts, and prepares what goes out. No allocation per packet.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use super::stats::{Receiving, RemoteReport, Sending, parse_report_block};
use crate::srtp::{MasterKey, SrtpContext, SrtpError, Suite, rtp_header_len};

/// How long the source a plain leg is latched to must be quiet before
/// another port of a trusted address may take over.
const RELATCH_AFTER: Duration = Duration::from_secs(2);

/// Identifies a leg across the control and data planes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LegId(pub u64);

impl std::fmt::Display for LegId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "leg-{}", self.0)
    }
}

/// RTP or RTCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Rtp,
    Rtcp,
}

/// Whether a packet on a multiplexed port is RTCP (RFC 5761 §4: packet
/// types 192–223 in the second byte).
pub fn demux(packet: &[u8]) -> Kind {
    match packet.get(1) {
        Some(192..=223) => Kind::Rtcp,
        _ => Kind::Rtp,
    }
}

/// SRTP keys of a leg: the phone's (to read what it sends) and Parley's
/// (to protect what Parley sends the phone).
#[derive(Clone, PartialEq, Eq)]
pub struct LegKeys {
    pub suite: Suite,
    pub phone_key: MasterKey,
    pub parley_key: MasterKey,
}

impl std::fmt::Debug for LegKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LegKeys({})", self.suite)
    }
}

/// What signaling says about a leg's far end, set after each offer/answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegMedia {
    /// Where the phone said it receives RTP (SDP `c=` and `m=` port).
    pub remote_rtp: Option<SocketAddr>,
    /// Where it receives RTCP (`a=rtcp`, else the RTP port + 1); unused
    /// with rtcp-mux.
    pub remote_rtcp: Option<SocketAddr>,
    pub rtcp_mux: bool,
    /// `None` for a plain RTP leg.
    pub keys: Option<LegKeys>,
    /// Addresses plain RTP is accepted from: the SDP address, and the
    /// address the phone's signaling came from (a NATed phone's SDP holds
    /// its private address). Unused on SRTP legs, which latch on
    /// authentication.
    pub trusted_ips: SmallVec<[IpAddr; 2]>,
    /// RTP clock rate of the negotiated codec, for jitter.
    pub clock_rate: u32,
    /// Payload type of RFC 4733 events (DTMF), if negotiated: their
    /// packets repeat the event's start timestamp, so they are counted
    /// but kept out of the jitter estimate.
    pub telephone_event_pt: Option<u8>,
    /// The address Parley's SDP gave the phone for its media. Where the
    /// media sockets are bound to all addresses, packets to the phone
    /// leave from it (when the host has it; a public address behind a
    /// 1:1 NAT it has not), since a phone or its NAT may drop media from
    /// any other.
    pub local_ip: Option<IpAddr>,
}

/// Why a received packet was not relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    NotConfigured,
    Malformed,
    Srtp(SrtpError),
    WrongSource,
}

/// The state of one leg.
pub struct Leg {
    pub id: LegId,
    media: Option<LegMedia>,
    rx: Option<SrtpContext>,
    tx: Option<SrtpContext>,
    latched_rtp: Option<SocketAddr>,
    latched_rtcp: Option<SocketAddr>,
    pub receiving: Receiving,
    pub sending: Sending,
    pub remote_report: Option<RemoteReport>,
    /// Packets lost before they reached Parley on the bridged leg, kept
    /// here when that leg closes first (see [`super::LegReport::of`]).
    pub upstream_lost: Option<u64>,
    /// When the phone last sent anything that was accepted.
    pub last_activity: Instant,
    pub inactivity_reported: bool,
}

impl Leg {
    pub fn new(id: LegId, now: Instant) -> Self {
        Leg {
            id,
            media: None,
            rx: None,
            tx: None,
            latched_rtp: None,
            latched_rtcp: None,
            receiving: Receiving::default(),
            sending: Sending::default(),
            remote_report: None,
            upstream_lost: None,
            last_activity: now,
            inactivity_reported: false,
        }
    }

    /// Applies an offer/answer outcome. Crypto contexts are kept when the
    /// keys did not change (a re-INVITE for hold), and rebuilt when they
    /// did; a new remote address clears the latch.
    pub fn configure(&mut self, media: LegMedia, now: Instant) {
        let old = self.media.take();
        // Each direction keeps its context (rollover counter, SRTCP index,
        // replay window) unless its own key changed: restarting a context
        // under the same key would reuse keystream or accept old packets
        // again. Phones often send a new key with every re-INVITE.
        let phone_key = |m: Option<&LegMedia>| {
            m.and_then(|m| m.keys.as_ref())
                .map(|k| (k.suite, k.phone_key.clone()))
        };
        let parley_key = |m: Option<&LegMedia>| {
            m.and_then(|m| m.keys.as_ref())
                .map(|k| (k.suite, k.parley_key.clone()))
        };
        if phone_key(old.as_ref()) != phone_key(Some(&media)) {
            self.rx = media
                .keys
                .as_ref()
                .map(|k| SrtpContext::new(k.suite, &k.phone_key));
        }
        if parley_key(old.as_ref()) != parley_key(Some(&media)) {
            self.tx = media
                .keys
                .as_ref()
                .map(|k| SrtpContext::new(k.suite, &k.parley_key));
        }
        if old.as_ref().map(|o| (o.remote_rtp, o.remote_rtcp))
            != Some((media.remote_rtp, media.remote_rtcp))
        {
            self.latched_rtp = None;
            self.latched_rtcp = None;
        }
        self.media = Some(media);
        self.last_activity = now;
        self.inactivity_reported = false;
    }

    pub fn is_configured(&self) -> bool {
        self.media.is_some()
    }

    pub fn suite(&self) -> Option<Suite> {
        self.rx.as_ref().map(SrtpContext::suite)
    }

    pub fn rtcp_mux(&self) -> bool {
        self.media.as_ref().is_some_and(|m| m.rtcp_mux)
    }

    pub fn clock_rate(&self) -> u32 {
        self.media.as_ref().map_or(8000, |m| m.clock_rate)
    }

    /// Where media from the phone currently comes from.
    pub fn latched(&self) -> Option<SocketAddr> {
        self.latched_rtp
    }

    /// Whether [`Leg::receive`] would take this packet, with nothing
    /// changed, not even counters: how a packet on a port many legs share
    /// finds its leg. SRTP must authenticate under the phone's key; plain
    /// RTP must come from an address signaling trusts.
    pub fn accepts(&self, kind: Kind, src: SocketAddr, buf: &[u8]) -> bool {
        let Some(media) = &self.media else {
            return false;
        };
        if buf.len() < 8 || buf[0] >> 6 != 2 {
            return false;
        }
        match (&self.rx, kind) {
            (Some(ctx), Kind::Rtp) => ctx.authenticates_rtp(buf),
            (Some(ctx), Kind::Rtcp) => ctx.authenticates_rtcp(buf),
            (None, _) => media.trusted_ips.contains(&src.ip().to_canonical()),
        }
    }

    /// What the latest offer/answer said about the phone.
    pub fn media(&self) -> Option<&LegMedia> {
        self.media.as_ref()
    }

    /// Takes a packet the phone sent (`buf` is exactly the datagram). On
    /// success the plain packet is at the start of `buf`; returns its
    /// length. A refused packet changes nothing but counters.
    pub fn receive(
        &mut self,
        kind: Kind,
        src: SocketAddr,
        buf: &mut [u8],
        now: Instant,
    ) -> Result<usize, Drop> {
        let Some(media) = &self.media else {
            return Err(Drop::NotConfigured);
        };
        if buf.len() < 8 || buf[0] >> 6 != 2 {
            self.receiving.malformed += 1;
            return Err(Drop::Malformed);
        }
        let latched = match kind {
            Kind::Rtp => self.latched_rtp,
            Kind::Rtcp => self.latched_rtcp,
        };
        let plain = match (&mut self.rx, kind) {
            (Some(ctx), Kind::Rtp) => ctx.unprotect_rtp(buf).map(|u| (u.len, Some(u.index))),
            (Some(ctx), Kind::Rtcp) => ctx.unprotect_rtcp(buf).map(|len| (len, None)),
            (None, _) => {
                // Plain media is only as good as where it comes from: the
                // phone's address, and once latched the port it sends from,
                // left only when that has gone quiet (a NAT rebinding).
                // Sooner, any host behind the same NAT address could take
                // the stream.
                let trusted = media.trusted_ips.contains(&src.ip().to_canonical());
                let allowed = match latched {
                    Some(at) if at == src => true,
                    Some(_) => {
                        trusted
                            && now.saturating_duration_since(self.last_activity) >= RELATCH_AFTER
                    }
                    None => trusted,
                };
                if !allowed {
                    self.receiving.wrong_source += 1;
                    return Err(Drop::WrongSource);
                }
                Ok((buf.len(), None))
            }
        };
        let (len, index) = match plain {
            Ok(p) => p,
            Err(e) => {
                match e {
                    SrtpError::AuthFailed if kind == Kind::Rtcp => {
                        self.receiving.rtcp_auth_failures += 1
                    }
                    SrtpError::AuthFailed => self.receiving.auth_failures += 1,
                    SrtpError::Replayed | SrtpError::TooOld => self.receiving.replays += 1,
                    _ => self.receiving.malformed += 1,
                }
                return Err(Drop::Srtp(e));
            }
        };
        if kind == Kind::Rtp && rtp_header_len(&buf[..len]).is_err() {
            self.receiving.malformed += 1;
            return Err(Drop::Malformed);
        }
        // Authenticated (or from a trusted address) and well-formed: follow
        // the phone there.
        match kind {
            Kind::Rtp => self.latched_rtp = Some(src),
            Kind::Rtcp => self.latched_rtcp = Some(src),
        }
        self.last_activity = now;
        match kind {
            Kind::Rtp => {
                let seq = u16::from_be_bytes([buf[2], buf[3]]);
                let ts = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
                let ssrc = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
                let index = index.unwrap_or_else(|| self.plain_index(ssrc, seq));
                let event = media.telephone_event_pt == Some(buf[1] & 0x7F);
                let timing = (!event).then_some(media.clock_rate);
                self.receiving.on_rtp(ssrc, index, ts, len, now, timing);
            }
            Kind::Rtcp => {
                self.receiving.rtcp_packets += 1;
                if let Some(report) = parse_report_block(&buf[..len]) {
                    self.remote_report = Some(report);
                }
            }
        }
        Ok(len)
    }

    /// The extended sequence number of a plain RTP packet, tracked the way
    /// SRTP tracks its index.
    fn plain_index(&self, ssrc: u32, seq: u16) -> u64 {
        // Receiving keeps the highest index of the current SSRC; extend
        // `seq` to the value closest to it.
        let Some(highest) = self.receiving.highest_index(ssrc) else {
            return u64::from(seq);
        };
        let base = highest & !0xFFFF;
        let candidates = [base.wrapping_sub(0x1_0000), base, base + 0x1_0000];
        candidates
            .into_iter()
            .map(|b| b | u64::from(seq))
            .filter(|&i| i < (1 << 48))
            .min_by_key(|&i| i.abs_diff(highest))
            .unwrap_or(u64::from(seq))
    }

    /// Prepares the plain packet in `buf[..len]` for this leg's phone:
    /// protects it when the leg is SRTP (`buf` needs room for the trailer)
    /// and says where it goes. `None`: drop it (no address yet, or SRTP
    /// refused it).
    pub fn prepare_send(
        &mut self,
        kind: Kind,
        buf: &mut [u8],
        len: usize,
    ) -> Option<(SocketAddr, usize)> {
        let media = self.media.as_ref()?;
        let dest = match kind {
            Kind::Rtp => self.latched_rtp.or(media.remote_rtp),
            Kind::Rtcp if media.rtcp_mux => self.latched_rtp.or(media.remote_rtp),
            Kind::Rtcp => self.latched_rtcp.or(media.remote_rtcp),
        };
        let Some(dest) = dest else {
            self.sending.no_destination += 1;
            return None;
        };
        let protected = match (&mut self.tx, kind) {
            (Some(ctx), Kind::Rtp) => ctx.protect_rtp(buf, len),
            (Some(ctx), Kind::Rtcp) => ctx.protect_rtcp(buf, len),
            (None, _) => Ok(len),
        };
        let Ok(len) = protected else {
            self.sending.srtp_refused += 1;
            return None;
        };
        match kind {
            Kind::Rtp => {
                self.sending.packets += 1;
                self.sending.bytes += len as u64;
            }
            Kind::Rtcp => self.sending.rtcp_packets += 1,
        }
        Some((dest, len))
    }
}
