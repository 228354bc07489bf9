//! The per-sender crypto context: session keys plus per-SSRC state.

use subtle::ConstantTimeEq;

use super::auth::HmacSha1;
use super::kdf::{Label, derive};
use super::keystream::AesCm;
use super::replay::ReplayWindow;
use super::{MasterKey, SRTCP_INDEX_LEN, SRTCP_TAG_LEN, SrtpError, Suite, wipe};

/// SSRCs one context tracks at once. A phone sends one stream per media
/// line, but may switch SSRC mid-call (after a re-INVITE, a transfer, a
/// codec change); the least recently used state gives way to a new one,
/// and a new SSRC only takes a slot once its first packet authenticates.
const MAX_STREAMS: usize = 4;
/// Streams remembered after they lost their slot, so one that returns
/// resumes its indices instead of starting over (which would reuse
/// keystream when sending, and accept replays when receiving). A record
/// is never dropped: once `MAX_STREAMS + MAX_RETIRED` SSRCs have been
/// seen under one key, a further new one is refused.
const MAX_RETIRED: usize = 32;
/// The fixed RTP header.
const RTP_HEADER_LEN: usize = 12;
/// A jump in sequence numbers beyond this is a restart, not loss (RFC 3550
/// A.1's "dropout").
const MAX_DROPOUT: u16 = 3000;
/// The fixed part of an RTCP packet that stays in clear: header and SSRC.
const RTCP_HEADER_LEN: usize = 8;
/// The largest SRTCP index (31 bits).
const MAX_SRTCP_INDEX: u32 = 0x7FFF_FFFF;

/// Keys derived for one direction of RTP or RTCP.
#[derive(Clone)]
struct SessionKeys {
    cipher: AesCm,
    /// The session salt placed as `k_s · 2^16`, ready to XOR into an IV.
    salt: u128,
    /// HMAC-SHA1 keyed once.
    auth: HmacSha1,
}

impl SessionKeys {
    fn derive(master: &MasterKey, enc: Label, auth: Label, salt: Label) -> Self {
        let mut k_e = [0u8; 16];
        let mut k_a = [0u8; 20];
        let mut k_s = [0u8; 16];
        derive(master, enc, &mut k_e);
        derive(master, auth, &mut k_a);
        derive(master, salt, &mut k_s[..14]);
        let keys = SessionKeys {
            cipher: AesCm::new(&k_e),
            salt: u128::from_be_bytes(k_s),
            auth: HmacSha1::new(&k_a),
        };
        wipe(&mut k_e);
        wipe(&mut k_a);
        wipe(&mut k_s);
        keys
    }

    /// The counter block for packet `index` of `ssrc` (RFC 3711 §4.1.1).
    fn iv(&self, ssrc: u32, index: u64) -> u128 {
        self.salt ^ (u128::from(ssrc) << 64) ^ (u128::from(index) << 16)
    }

    /// The full HMAC-SHA1 of `parts`.
    fn mac(&self, parts: &[&[u8]]) -> [u8; 20] {
        self.auth.tag(parts)
    }
}

/// What the context remembers about one SSRC.
#[derive(Debug, Clone)]
struct Stream {
    ssrc: u32,
    /// Rollover counter and highest sequence number (`s_l`) seen or sent.
    roc: u32,
    highest_seq: u16,
    /// SRTP indices seen (receiving) or used (sending).
    rtp_window: ReplayWindow,
    /// SRTCP replay window (receiving).
    rtcp_window: ReplayWindow,
    /// Next SRTCP index to send.
    rtcp_next: u32,
    /// Sending: added to every sequence number forwarded for this SSRC
    /// (see [`SrtpContext::protect_rtp`]).
    seq_offset: u16,
    /// Sending: the sequence number of a packet refused as far behind,
    /// which may be the first of a restarted sequence.
    restart_probe: Option<u16>,
    /// For least-recently-used replacement.
    last_used: u64,
}

impl Stream {
    fn new(ssrc: u32, seq: u16) -> Self {
        Stream {
            ssrc,
            roc: 0,
            highest_seq: seq,
            rtp_window: ReplayWindow::default(),
            rtcp_window: ReplayWindow::default(),
            // libsrtp starts at 1 too; its reference vectors rely on it.
            rtcp_next: 1,
            seq_offset: 0,
            restart_probe: None,
            last_used: 0,
        }
    }

    /// The rollover counter a packet with `seq` belongs to (RFC 3711
    /// §3.3.1), never below zero.
    fn guess_roc(&self, seq: u16) -> u32 {
        let s_l = i32::from(self.highest_seq);
        let seq = i32::from(seq);
        if s_l < 0x8000 {
            if seq - s_l > 0x8000 {
                self.roc.saturating_sub(1)
            } else {
                self.roc
            }
        } else if s_l - 0x8000 > seq {
            self.roc.wrapping_add(1)
        } else {
            self.roc
        }
    }

    /// Records a packet as the newest when it is.
    fn advance(&mut self, roc: u32, seq: u16) {
        if index(roc, seq) > index(self.roc, self.highest_seq) {
            self.roc = roc;
            self.highest_seq = seq;
        }
    }
}

fn index(roc: u32, seq: u16) -> u64 {
    u64::from(roc) << 16 | u64::from(seq)
}

/// What is kept of a stream that lost its slot.
#[derive(Debug, Clone, Copy)]
struct Retired {
    ssrc: u32,
    roc: u32,
    highest_seq: u16,
    rtcp_top: Option<u64>,
    rtcp_next: u32,
    seq_offset: u16,
}

/// A packet [`SrtpContext::unprotect_rtp`] accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unprotected {
    /// Length of the plain RTP packet now at the start of the buffer.
    pub len: usize,
    /// The packet's SSRC.
    pub ssrc: u32,
    /// Its 48-bit index: rollover counter and sequence number.
    pub index: u64,
}

/// The crypto context of one sender: its master key's session keys and the
/// state of each of its SSRCs.
#[derive(Clone)]
pub struct SrtpContext {
    suite: Suite,
    rtp: SessionKeys,
    rtcp: SessionKeys,
    streams: [Option<Stream>; MAX_STREAMS],
    retired: [Option<Retired>; MAX_RETIRED],
    clock: u64,
}

impl std::fmt::Debug for SrtpContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpContext")
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

impl SrtpContext {
    pub fn new(suite: Suite, master: &MasterKey) -> Self {
        SrtpContext {
            suite,
            rtp: SessionKeys::derive(
                master,
                Label::RtpEncryption,
                Label::RtpAuthentication,
                Label::RtpSalt,
            ),
            rtcp: SessionKeys::derive(
                master,
                Label::RtcpEncryption,
                Label::RtcpAuthentication,
                Label::RtcpSalt,
            ),
            streams: Default::default(),
            retired: [None; MAX_RETIRED],
            clock: 0,
        }
    }

    pub fn suite(&self) -> Suite {
        self.suite
    }

    fn find(&mut self, ssrc: u32) -> Option<usize> {
        self.clock += 1;
        let slot = self
            .streams
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.ssrc == ssrc))?;
        if let Some(s) = &mut self.streams[slot] {
            s.last_used = self.clock;
        }
        Some(slot)
    }

    /// Installs `stream`, replacing the least recently used one if full.
    /// State for an SSRC without a slot. One that was pushed out before
    /// comes back where it stopped: same rollover counter and SRTCP index,
    /// and every older index counted as used (sending) or seen (receiving).
    fn new_stream(&self, ssrc: u32, seq: u16) -> Stream {
        let mut stream = Stream::new(ssrc, seq);
        if let Some(r) = self.retired.iter().flatten().find(|r| r.ssrc == ssrc) {
            stream.roc = r.roc;
            stream.highest_seq = r.highest_seq;
            stream.rtp_window = ReplayWindow::closed_up_to(index(r.roc, r.highest_seq));
            stream.rtcp_window = r
                .rtcp_top
                .map(ReplayWindow::closed_up_to)
                .unwrap_or_default();
            stream.rtcp_next = r.rtcp_next;
            stream.seq_offset = r.seq_offset;
        }
        stream
    }

    /// Gives `stream` a slot, retiring the least recently used stream if
    /// all are taken. Fails when that stream's record has nowhere to go.
    fn insert(&mut self, mut stream: Stream) -> Result<usize, SrtpError> {
        stream.last_used = self.clock;
        let slot = self
            .streams
            .iter()
            .position(Option::is_none)
            .unwrap_or_else(|| {
                (0..MAX_STREAMS)
                    .min_by_key(|&i| self.streams[i].as_ref().map_or(0, |s| s.last_used))
                    .unwrap_or(0)
            });
        if let Some(old) = &self.streams[slot] {
            let record = Retired {
                ssrc: old.ssrc,
                roc: old.roc,
                highest_seq: old.highest_seq,
                rtcp_top: old.rtcp_window.top(),
                rtcp_next: old.rtcp_next,
                seq_offset: old.seq_offset,
            };
            // One record per SSRC, the newest: an SSRC pushed out twice
            // must not come back with the state of its first exit (an old
            // rollover counter would reuse keystream and fail every tag).
            // Else an empty place, else the record of a stream that is
            // live again (the new one, or one with a slot), which its slot
            // now holds. Overwriting any other record would restart that
            // SSRC at index 0 should it return: keystream used twice.
            let live = |ssrc: u32| {
                ssrc == stream.ssrc || self.streams.iter().flatten().any(|s| s.ssrc == ssrc)
            };
            let at = self
                .retired
                .iter()
                .position(|r| r.is_some_and(|r| r.ssrc == record.ssrc))
                .or_else(|| self.retired.iter().position(Option::is_none))
                .or_else(|| {
                    self.retired
                        .iter()
                        .position(|r| r.is_some_and(|r| r.ssrc != record.ssrc && live(r.ssrc)))
                })
                .ok_or(SrtpError::TooManyStreams)?;
            self.retired[at] = Some(record);
        }
        self.streams[slot] = Some(stream);
        Ok(slot)
    }

    fn stream_or_insert(&mut self, ssrc: u32, seq: u16) -> Result<usize, SrtpError> {
        match self.find(ssrc) {
            Some(slot) => Ok(slot),
            None => self.insert(self.new_stream(ssrc, seq)),
        }
    }

    /// Protects the RTP packet in `buf[..len]` in place and appends the tag.
    /// Returns the SRTP length; `buf` needs room for the tag after `len`.
    pub fn protect_rtp(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        let tag_len = self.suite.rtp_tag_len();
        let packet = buf.get(..len).ok_or(SrtpError::TooShort)?;
        let header_len = rtp_header_len(packet)?;
        if buf.len() < len + tag_len {
            return Err(SrtpError::NoRoom);
        }
        let (seq, ssrc) = rtp_seq_ssrc(packet);
        let slot = self.stream_or_insert(ssrc, seq)?;
        let stream = self.streams[slot].as_mut().expect("slot just found");
        // Never protect two packets under one index: the second would reuse
        // keystream. A relay forwards what arrives, duplicates included, so
        // the sending side keeps a window of the indices it has used.
        //
        // The sequence numbers are the far phone's, and that phone may
        // start over under the same SSRC (a new key of its own in a
        // re-INVITE, or a plain phone that restarts its stream) while this
        // key stays. Its packets would then all be far behind what was
        // sent, refused here and by the receiving phone's replay window
        // until the sequence caught up: minutes of silence. So two
        // consecutive packets that far behind mark a restart, and from
        // then on this SSRC's numbers are shifted to go on from the
        // highest sent (one packet is lost to the check; RTCP reports of
        // this stream then count in the shifted numbers). Once shifted, a
        // stray packet of the old numbering would land far ahead: it gets
        // the same check rather than a jump of thousands.
        let mut out = seq.wrapping_add(stream.seq_offset);
        let mut roc = stream.guess_roc(out);
        let mut idx = index(roc, out);
        let far_ahead = stream.seq_offset != 0
            && idx > index(stream.roc, stream.highest_seq) + u64::from(MAX_DROPOUT);
        let checked = if far_ahead {
            Err(SrtpError::TooOld)
        } else {
            stream.rtp_window.check(idx)
        };
        match checked {
            Ok(()) => stream.restart_probe = None,
            Err(SrtpError::TooOld) if stream.restart_probe == Some(seq.wrapping_sub(1)) => {
                let next = stream.highest_seq.wrapping_add(1);
                stream.seq_offset = next.wrapping_sub(seq);
                stream.restart_probe = None;
                out = next;
                roc = stream.guess_roc(out);
                idx = index(roc, out);
                stream.rtp_window.check(idx)?;
            }
            Err(SrtpError::TooOld) => {
                stream.restart_probe = Some(seq);
                return Err(SrtpError::TooOld);
            }
            Err(e) => return Err(e),
        }
        stream.rtp_window.accept(idx);
        stream.advance(roc, out);
        buf[2..4].copy_from_slice(&out.to_be_bytes());

        let iv = self.rtp.iv(ssrc, idx);
        self.rtp.cipher.apply(iv, &mut buf[header_len..len]);
        let tag = self.rtp.mac(&[&buf[..len], &roc.to_be_bytes()]);
        buf[len..len + tag_len].copy_from_slice(&tag[..tag_len]);
        Ok(len + tag_len)
    }

    /// The state an SSRC has, or would start with: for checks that must not
    /// change anything.
    fn peek_stream(&self, ssrc: u32, seq: u16) -> std::borrow::Cow<'_, Stream> {
        match self.streams.iter().flatten().find(|s| s.ssrc == ssrc) {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(self.new_stream(ssrc, seq)),
        }
    }

    /// Checks the SRTP packet filling `buf` (length, replay, tag) without
    /// changing any state.
    fn check_rtp(&self, buf: &[u8]) -> Result<CheckedRtp, SrtpError> {
        let tag_len = self.suite.rtp_tag_len();
        let len = buf.len().checked_sub(tag_len).ok_or(SrtpError::TooShort)?;
        let header_len = rtp_header_len(&buf[..len])?;
        let (seq, ssrc) = rtp_seq_ssrc(buf);
        let stream = self.peek_stream(ssrc, seq);
        let roc = stream.guess_roc(seq);
        let idx = index(roc, seq);
        stream.rtp_window.check(idx)?;
        let expected = self.rtp.mac(&[&buf[..len], &roc.to_be_bytes()]);
        if !bool::from(expected[..tag_len].ct_eq(&buf[len..])) {
            return Err(SrtpError::AuthFailed);
        }
        Ok(CheckedRtp {
            len,
            header_len,
            seq,
            ssrc,
            roc,
            idx,
        })
    }

    /// Whether the SRTP packet `buf` is one this context would accept, with
    /// nothing changed: to find which of several keys a packet is under.
    pub fn authenticates_rtp(&self, buf: &[u8]) -> bool {
        self.check_rtp(buf).is_ok()
    }

    /// Authenticates and decrypts the SRTP packet filling `buf`, leaving the
    /// RTP packet at its start. A packet that fails changes no state.
    pub fn unprotect_rtp(&mut self, buf: &mut [u8]) -> Result<Unprotected, SrtpError> {
        let c = self.check_rtp(buf)?;
        // A stream is only made for an SSRC not seen before, and kept only
        // once its first packet authenticates.
        let slot = self.stream_or_insert(c.ssrc, c.seq)?;
        let iv = self.rtp.iv(c.ssrc, c.idx);
        self.rtp.cipher.apply(iv, &mut buf[c.header_len..c.len]);
        let stream = self.streams[slot].as_mut().expect("slot just filled");
        stream.rtp_window.accept(c.idx);
        stream.advance(c.roc, c.seq);
        Ok(Unprotected {
            len: c.len,
            ssrc: c.ssrc,
            index: c.idx,
        })
    }

    /// Encrypts the compound RTCP packet in `buf[..len]` in place and
    /// appends the E flag, SRTCP index and tag ([`super::SRTCP_OVERHEAD`]
    /// bytes, which `buf` must have room for).
    pub fn protect_rtcp(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        self.protect_rtcp_with(buf, len, true)
    }

    /// SRTCP with the E flag clear: authenticated, sent in clear. Parley
    /// never sends it, but phones may (RFC 3711 §3.4), so tests need it.
    #[cfg(test)]
    pub(crate) fn protect_rtcp_unencrypted(
        &mut self,
        buf: &mut [u8],
        len: usize,
    ) -> Result<usize, SrtpError> {
        self.protect_rtcp_with(buf, len, false)
    }

    fn protect_rtcp_with(
        &mut self,
        buf: &mut [u8],
        len: usize,
        encrypt: bool,
    ) -> Result<usize, SrtpError> {
        let packet = buf.get(..len).ok_or(SrtpError::TooShort)?;
        let ssrc = rtcp_ssrc(packet)?;
        if buf.len() < len + SRTCP_INDEX_LEN + SRTCP_TAG_LEN {
            return Err(SrtpError::NoRoom);
        }
        let slot = self.stream_or_insert(ssrc, 0)?;
        let stream = self.streams[slot].as_mut().expect("slot just found");
        let srtcp_index = stream.rtcp_next;
        if srtcp_index > MAX_SRTCP_INDEX {
            return Err(SrtpError::IndexExhausted);
        }
        stream.rtcp_next += 1;

        let mut e_index = srtcp_index;
        if encrypt {
            let iv = self.rtcp.iv(ssrc, u64::from(srtcp_index));
            self.rtcp.cipher.apply(iv, &mut buf[RTCP_HEADER_LEN..len]);
            e_index |= 0x8000_0000;
        }
        let e_index = e_index.to_be_bytes();
        buf[len..len + SRTCP_INDEX_LEN].copy_from_slice(&e_index);
        let end = len + SRTCP_INDEX_LEN;
        let tag = self.rtcp.mac(&[&buf[..end]]);
        buf[end..end + SRTCP_TAG_LEN].copy_from_slice(&tag[..SRTCP_TAG_LEN]);
        Ok(end + SRTCP_TAG_LEN)
    }

    /// Checks the SRTCP packet filling `buf` (length, replay, tag) without
    /// changing any state.
    fn check_rtcp(&self, buf: &[u8]) -> Result<CheckedRtcp, SrtpError> {
        let auth_end = buf
            .len()
            .checked_sub(SRTCP_TAG_LEN)
            .ok_or(SrtpError::TooShort)?;
        let len = auth_end
            .checked_sub(SRTCP_INDEX_LEN)
            .ok_or(SrtpError::TooShort)?;
        let ssrc = rtcp_ssrc(&buf[..len])?;
        let e_index = u32::from_be_bytes(buf[len..auth_end].try_into().expect("4 bytes"));
        let srtcp_index = u64::from(e_index & MAX_SRTCP_INDEX);
        self.peek_stream(ssrc, 0).rtcp_window.check(srtcp_index)?;
        let expected = self.rtcp.mac(&[&buf[..auth_end]]);
        if !bool::from(expected[..SRTCP_TAG_LEN].ct_eq(&buf[auth_end..])) {
            return Err(SrtpError::AuthFailed);
        }
        Ok(CheckedRtcp {
            len,
            ssrc,
            encrypted: e_index & 0x8000_0000 != 0,
            srtcp_index,
        })
    }

    /// Whether the SRTCP packet `buf` is one this context would accept,
    /// with nothing changed.
    pub fn authenticates_rtcp(&self, buf: &[u8]) -> bool {
        self.check_rtcp(buf).is_ok()
    }

    /// Authenticates and, when its E flag says so, decrypts the SRTCP
    /// packet filling `buf`. Returns the RTCP length.
    pub fn unprotect_rtcp(&mut self, buf: &mut [u8]) -> Result<usize, SrtpError> {
        let c = self.check_rtcp(buf)?;
        let slot = self.stream_or_insert(c.ssrc, 0)?;
        if c.encrypted {
            let iv = self.rtcp.iv(c.ssrc, c.srtcp_index);
            self.rtcp.cipher.apply(iv, &mut buf[RTCP_HEADER_LEN..c.len]);
        }
        self.streams[slot]
            .as_mut()
            .expect("slot just filled")
            .rtcp_window
            .accept(c.srtcp_index);
        Ok(c.len)
    }
}

/// An SRTP packet that passed [`SrtpContext::check_rtp`].
struct CheckedRtp {
    len: usize,
    header_len: usize,
    seq: u16,
    ssrc: u32,
    roc: u32,
    idx: u64,
}

/// An SRTCP packet that passed [`SrtpContext::check_rtcp`].
struct CheckedRtcp {
    len: usize,
    ssrc: u32,
    encrypted: bool,
    srtcp_index: u64,
}

/// The length of an RTP header with its CSRCs and extension, checked
/// against the packet.
pub fn rtp_header_len(packet: &[u8]) -> Result<usize, SrtpError> {
    if packet.len() < RTP_HEADER_LEN {
        return Err(SrtpError::TooShort);
    }
    if packet[0] >> 6 != 2 {
        return Err(SrtpError::BadVersion);
    }
    let csrc_count = usize::from(packet[0] & 0x0F);
    let mut len = RTP_HEADER_LEN + 4 * csrc_count;
    if packet[0] & 0x10 != 0 {
        let ext = packet.get(len..len + 4).ok_or(SrtpError::TooShort)?;
        len += 4 + 4 * usize::from(u16::from_be_bytes([ext[2], ext[3]]));
    }
    if len > packet.len() {
        return Err(SrtpError::TooShort);
    }
    Ok(len)
}

fn rtp_seq_ssrc(packet: &[u8]) -> (u16, u32) {
    (
        u16::from_be_bytes([packet[2], packet[3]]),
        u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]),
    )
}

fn rtcp_ssrc(packet: &[u8]) -> Result<u32, SrtpError> {
    if packet.len() < RTCP_HEADER_LEN {
        return Err(SrtpError::TooShort);
    }
    if packet[0] >> 6 != 2 {
        return Err(SrtpError::BadVersion);
    }
    Ok(u32::from_be_bytes([
        packet[4], packet[5], packet[6], packet[7],
    ]))
}
