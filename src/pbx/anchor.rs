//! How a call's SDP is rewritten so its media is anchored in Parley: what
//! Parley reads from a phone's offer or answer, and the SDP it writes for
//! each leg. Each leg gets Parley's address and port, and its own fresh
//! SRTP key when the leg is protected; nothing of one phone's media
//! description (addresses, keys) reaches the other. Codecs pass through
//! untouched: what the callee accepts of the caller's list is what both
//! use, with no transcoding.

use std::net::{IpAddr, SocketAddr};

use crate::pbx::policy::MediaSecurity;
use crate::sdp::{
    Attribute, Connection, Direction, MediaDescription, Origin, SdpError, SessionDescription,
};
use crate::srtp::{MasterKey, Suite};

/// Attributes of the caller's audio that describe codecs and packetization
/// and so travel with the formats to the other leg.
const CODEC_ATTRIBUTES: [&str; 4] = ["rtpmap", "fmtp", "ptime", "maxptime"];
/// The suite Parley offers; every SDES phone supports it.
pub const OFFERED_SUITE: Suite = Suite::AesCm128HmacSha1_80;

/// Why a call cannot go ahead with the SDP it has. Each maps to a 488 with
/// this text as its reason phrase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnchorError {
    #[error("Malformed SDP: {0}")]
    Sdp(#[from] SdpError),
    #[error("No Audio Stream Offered")]
    NoAudio,
    #[error("SRTP Required By Encryption Policy")]
    SrtpRequired,
    #[error("SRTP Needs TLS Signaling")]
    KeysOverPlain,
    #[error("No Common Codec")]
    NoCommonCodec,
    #[error("Answer Does Not Match Offer")]
    AnswerMismatch,
    #[error("Media Profile Not Supported (SDES-SRTP Or RTP Only)")]
    UnsupportedProfile,
}

/// Parley's own side of a leg.
#[derive(Debug, Clone)]
pub struct LocalMedia {
    /// The address the phone must send to: the LAN address for LAN phones,
    /// the public one for the others.
    pub addr: IpAddr,
    pub port: u16,
    /// The key Parley sends with on this leg (used when the leg is SRTP).
    pub key: MasterKey,
    /// `o=` session id and version; the version goes up with every SDP
    /// Parley sends on the leg.
    pub session_id: u64,
    pub version: u64,
}

/// What Parley takes from a phone's SDP (offer or answer).
#[derive(Debug, Clone)]
pub struct PhoneMedia {
    pub sdp: SessionDescription,
    /// Index of the audio `m=` line Parley anchors.
    pub audio: usize,
    /// The phone's crypto line Parley uses: tag, suite and the phone's key.
    pub crypto: Option<(u32, Suite, MasterKey)>,
    pub rtcp_mux: bool,
    /// Where the phone receives RTP and RTCP; `None` when the SDP says
    /// "don't send" (port 0 or a 0.0.0.0 address of old-style hold).
    pub rtp: Option<SocketAddr>,
    pub rtcp: Option<SocketAddr>,
    /// The phone put `a=crypto` in SDP over plain signaling; the keys were
    /// ignored. Worth a log line: the phone leaks its keys.
    pub keys_over_plain: bool,
}

impl PhoneMedia {
    pub fn audio(&self) -> &MediaDescription {
        &self.sdp.media[self.audio]
    }

    /// The phone's direction. An unspecified connection address (old-style
    /// hold, RFC 3264 §8.4) means it wants nothing sent to it.
    pub fn direction(&self) -> Direction {
        let stated = self.sdp.media_direction(self.audio);
        if self.rtp.is_none() {
            stated.restricted(true, false)
        } else {
            stated
        }
    }

    pub fn is_srtp(&self) -> bool {
        self.crypto.is_some()
    }

    /// `(payload type, encoding name, clock rate)` of each format of the
    /// audio line, from `a=rtpmap` or, for static types, RFC 3551.
    fn codecs(&self) -> impl Iterator<Item = (u8, &str, u32)> + '_ {
        let m = self.audio();
        m.formats.iter().filter_map(move |f| {
            let pt: u8 = f.parse().ok().filter(|&pt| pt < 128)?;
            let (name, rate) = match m.rtpmap(f).and_then(|v| v.split_once('/')) {
                Some((name, rest)) => {
                    let rate = rest.split('/').next()?.trim().parse().ok()?;
                    (name.trim(), rate)
                }
                // L16 (10, 11) is the one static audio type not at 8 kHz.
                None if pt == 10 || pt == 11 => ("L16", 44_100),
                None => ("", 8000),
            };
            Some((pt, name, rate))
        })
    }

    /// The RTP clock rate of the codec this phone sends: its first format
    /// that is not an event or comfort-noise type.
    pub fn clock_rate(&self) -> u32 {
        self.codecs()
            .find(|(pt, name, _)| !event_or_noise(name) && *pt != 13)
            .map_or(8000, |(_, _, rate)| rate)
            .max(1)
    }

    /// The payload type of RFC 4733 events (DTMF), if the phone listed one.
    pub fn telephone_event_pt(&self) -> Option<u8> {
        self.codecs()
            .find(|(_, name, _)| name.eq_ignore_ascii_case("telephone-event"))
            .map(|(pt, _, _)| pt)
    }
}

/// Reads an offer (or an answer, with `answer_to` set) a phone sent over
/// signaling that is TLS or not. Keys are taken only over TLS; `security`
/// says whether the leg may do without them.
pub fn read_phone_sdp(
    body: &[u8],
    tls: bool,
    security: MediaSecurity,
    answer_to: Option<&SessionDescription>,
) -> Result<PhoneMedia, AnchorError> {
    let sdp = SessionDescription::parse(body)?;
    let audio = match answer_to {
        // An answer has the offer's m= lines in order (RFC 3264 §6).
        Some(offer) => {
            if sdp.media.len() != offer.media.len() {
                return Err(AnchorError::AnswerMismatch);
            }
            sdp.media
                .iter()
                .position(|m| m.media == "audio" && m.port != 0)
                .ok_or(AnchorError::NoCommonCodec)?
        }
        None => {
            // Audio lines Parley can anchor; over plain signaling a plain
            // one first, since keys sent there are never used (an offer
            // may carry one stream twice, with and without SRTP).
            let live = |m: &&MediaDescription| m.media == "audio" && m.port != 0;
            let usable = |m: &&MediaDescription| live(m) && m.is_rtp_profile();
            let pick = |want_plain: bool| {
                sdp.media
                    .iter()
                    .position(|m| usable(&m) && (!want_plain || !m.is_srtp_profile()))
            };
            // Over TLS, where keys count, the first line whose keys Parley
            // can use, else a plain one: an offer may list a stream as
            // RTP/AVP first and RTP/SAVP after it, or RTP/SAVP with keys
            // Parley refuses (an MKI) before a plain fallback.
            let keyed = || {
                sdp.media
                    .iter()
                    .position(|m| usable(&m) && m.crypto().any(|c| c.usable().is_ok()))
            };
            let choice = if !tls {
                pick(true)
            } else if security == MediaSecurity::Plain {
                None
            } else {
                keyed().or_else(|| pick(true))
            };
            match choice.or_else(|| pick(false)) {
                Some(i) => i,
                // DTLS-SRTP (UDP/TLS/RTP/SAVP) and anything else Parley
                // cannot carry: refused, not answered as plain RTP.
                None if sdp.media.iter().any(|m| live(&m)) => {
                    return Err(AnchorError::UnsupportedProfile);
                }
                None => return Err(AnchorError::NoAudio),
            }
        }
    };
    let m = &sdp.media[audio];
    let offered_crypto = m.attribute("crypto").is_some();
    // Of several usable lines, the strongest suite (Suite::ALL's order);
    // among equals, the phone's first.
    let crypto = if tls {
        let rank = |suite: Suite| Suite::ALL.iter().position(|&s| s == suite);
        m.crypto()
            .filter_map(|c| {
                c.usable()
                    .ok()
                    .map(|(suite, key)| (c.tag, suite, key.clone()))
            })
            .enumerate()
            .min_by_key(|(i, (_, suite, _))| (rank(*suite), *i))
            .map(|(_, line)| line)
    } else {
        None
    };
    // In an answer, the crypto line must be one Parley offered: its tag and
    // suite (RFC 4568 §7.1.2).
    if let (Some(offer), Some((tag, suite, _))) = (answer_to, &crypto) {
        let ours = offer
            .media
            .get(audio)
            .and_then(|o| o.crypto().find(|c| c.tag == *tag));
        if ours.is_none_or(|c| c.suite != Some(*suite)) {
            return Err(AnchorError::AnswerMismatch);
        }
    }
    // An answer that carries keys Parley cannot use (over plain
    // signaling, or with an MKI or lifetime it refuses) means the phone
    // will send SRTP that Parley would take for plain RTP.
    if answer_to.is_some() && offered_crypto && crypto.is_none() {
        return Err(AnchorError::AnswerMismatch);
    }
    if crypto.is_none() && security == MediaSecurity::Srtp {
        return Err(AnchorError::SrtpRequired);
    }
    // A phone that insists on SRTP (RTP/SAVP) but gave no key Parley can
    // use cannot be answered with plain RTP (RFC 4568 §7.1.2: the stream is
    // rejected). Over plain signaling that is always so: keys sent there
    // are never used.
    if crypto.is_none() && m.is_srtp_profile() && answer_to.is_none() {
        return Err(if tls {
            AnchorError::SrtpRequired
        } else {
            AnchorError::KeysOverPlain
        });
    }
    let conn = sdp
        .media_connection(audio)
        .and_then(|c| c.ip)
        .filter(|ip| !ip.is_unspecified());
    let rtp = conn.map(|ip| SocketAddr::new(ip, m.port));
    let rtcp = rtp.and_then(|a| rtcp_address(m, a));
    Ok(PhoneMedia {
        rtcp_mux: m.has_flag("rtcp-mux"),
        keys_over_plain: !tls && offered_crypto,
        audio,
        crypto,
        rtp,
        rtcp,
        sdp,
    })
}

/// Where RTCP goes: `a=rtcp` (RFC 3605), else the next port up. An
/// `a=rtcp` address Parley cannot read keeps its port, on the RTP
/// address.
fn rtcp_address(m: &MediaDescription, rtp: SocketAddr) -> Option<SocketAddr> {
    if let Some(v) = m.attribute("rtcp").and_then(|a| a.value.as_deref()) {
        let mut parts = v.split_ascii_whitespace();
        let port: u16 = parts.next()?.parse().ok()?;
        let ip = match (parts.next(), parts.next(), parts.next()) {
            (Some("IN"), Some(_), Some(addr)) => addr.parse().unwrap_or(rtp.ip()),
            _ => rtp.ip(),
        };
        return Some(SocketAddr::new(ip, port));
    }
    Some(SocketAddr::new(rtp.ip(), rtp.port().checked_add(1)?))
}

/// The SDP skeleton of one of Parley's legs.
fn session(local: &LocalMedia) -> SessionDescription {
    SessionDescription {
        origin: Origin {
            username: "parley".into(),
            session_id: local.session_id.to_string(),
            session_version: local.version,
            address: Connection::from_ip(local.addr),
        },
        session_name: "parley".into(),
        connection: Some(Connection::from_ip(local.addr)),
        bandwidths: Vec::new(),
        timing: (0, 0),
        attributes: Vec::new(),
        media: Vec::new(),
    }
}

/// Copies the codec attributes of `formats` from `from`.
fn codec_attributes(from: &MediaDescription, formats: &[String]) -> Vec<Attribute> {
    from.attributes
        .iter()
        .filter(|a| CODEC_ATTRIBUTES.contains(&a.name.as_str()))
        .filter(|a| match a.name.as_str() {
            "rtpmap" | "fmtp" => a
                .value
                .as_deref()
                .and_then(|v| v.split_once(' '))
                .is_some_and(|(pt, _)| formats.iter().any(|f| f == pt)),
            _ => true,
        })
        .cloned()
        .collect()
}

/// The offer Parley sends one callee branch for the caller's offer. Keys,
/// where the leg may have them, are offered under `suite`: a key is only
/// ever used with one suite, since both suites derive the same session
/// keys from it and a context started again under the other one would
/// repeat its keystream.
pub fn offer_for_branch(
    caller: &PhoneMedia,
    security: MediaSecurity,
    local: &LocalMedia,
    suite: Suite,
) -> SessionDescription {
    let from = caller.audio();
    let formats = from.formats.clone();
    let mut attributes = codec_attributes(from, &formats);
    if security != MediaSecurity::Plain {
        attributes.push(Attribute::new(
            "crypto",
            crate::sdp::CryptoAttribute::format(1, suite, &local.key),
        ));
    }
    // Parley handles RTCP either way; offering mux saves the phone a port.
    attributes.push(Attribute::flag("rtcp-mux"));
    attributes.push(Attribute::flag(caller.direction().name()));
    let mut sdp = session(local);
    sdp.media.push(MediaDescription {
        media: "audio".into(),
        port: local.port,
        port_count: None,
        proto: if security == MediaSecurity::Srtp {
            "RTP/SAVP"
        } else {
            "RTP/AVP"
        }
        .into(),
        formats,
        connection: None,
        bandwidths: Vec::new(),
        attributes,
    });
    sdp
}

/// `a=rtpmap` of format `f` as compared: encoding name (any case), clock
/// rate, channels (1 when not given); `None` for a static type without one.
fn codec_of(m: &MediaDescription, f: &str) -> Option<(String, String, String)> {
    let map = m.rtpmap(f)?;
    let mut parts = map.split('/').map(str::trim);
    let name = parts.next().unwrap_or("").to_ascii_lowercase();
    let rate = parts.next().unwrap_or("").to_string();
    let channels = parts.next().unwrap_or("1").to_string();
    Some((name, rate, channels))
}

/// Whether format `f` is the same codec in the offer and the answer. A
/// static type may go without `a=rtpmap` on either side (RFC 3551 says
/// what it is); a dynamic one names its codec on both.
fn same_codec(offer: &MediaDescription, answer: &MediaDescription, f: &str) -> bool {
    match (codec_of(offer, f), codec_of(answer, f)) {
        (Some(a), Some(b)) => a == b,
        _ => f.parse::<u8>().is_ok_and(|pt| pt < 96),
    }
}

/// Whether format `f` of `m` carries voice: not RFC 4733 events, not
/// comfort noise (RFC 3389, static type 13).
fn carries_voice(m: &MediaDescription, f: &str) -> bool {
    match codec_of(m, f) {
        Some((name, _, _)) => !event_or_noise(&name),
        None => f != "13",
    }
}

/// An encoding that carries no voice: RFC 4733 events, comfort noise.
fn event_or_noise(name: &str) -> bool {
    name.eq_ignore_ascii_case("telephone-event") || name.eq_ignore_ascii_case("CN")
}

/// The answer Parley gives the caller once a callee answered: the callee's
/// codecs (a subset of the caller's) and direction, Parley's address, and
/// Parley's key for the caller's leg under the caller's crypto tag.
pub fn answer_for_caller(
    caller: &PhoneMedia,
    callee: &PhoneMedia,
    local: &LocalMedia,
) -> Result<SessionDescription, AnchorError> {
    let offer = caller.audio();
    let answer = callee.audio();
    // Formats both list under the same number for the same codec (the
    // relay passes payload type numbers through unchanged).
    let formats: Vec<String> = answer
        .formats
        .iter()
        .filter(|f| offer.formats.contains(f) && same_codec(offer, answer, f))
        .cloned()
        .collect();
    // Events or comfort noise alone carry no voice.
    if !formats.iter().any(|f| carries_voice(answer, f)) {
        return Err(AnchorError::NoCommonCodec);
    }
    let mut attributes = codec_attributes(answer, &formats);
    if let Some((tag, suite, _)) = &caller.crypto {
        attributes.push(Attribute::new(
            "crypto",
            crate::sdp::CryptoAttribute::format(*tag, *suite, &local.key),
        ));
    }
    if caller.rtcp_mux {
        attributes.push(Attribute::flag("rtcp-mux"));
    }
    // What the callee does, within what the offer allows (RFC 3264
    // §6.1): a phone answering a hold with sendrecv does not make
    // Parley's answer to a sendonly offer sendrecv.
    let offered = caller.direction();
    let direction = callee
        .direction()
        .restricted(offered.receives(), offered.sends());
    attributes.push(Attribute::flag(direction.name()));
    let mut sdp = session(local);
    // One m= line per offered one, in order; only the audio one is live.
    for (i, m) in caller.sdp.media.iter().enumerate() {
        if i == caller.audio {
            // The offer's profile: an RTP/SAVP offer without usable keys
            // was refused when it was read.
            let proto = offer.proto.clone();
            sdp.media.push(MediaDescription {
                media: "audio".into(),
                port: local.port,
                port_count: None,
                proto,
                formats: formats.clone(),
                connection: None,
                bandwidths: Vec::new(),
                attributes: attributes.clone(),
            });
        } else {
            sdp.media.push(rejected(m));
        }
    }
    Ok(sdp)
}

/// A stream Parley does not carry, as it appears in its SDP: port 0.
fn rejected(m: &MediaDescription) -> MediaDescription {
    MediaDescription {
        media: m.media.clone(),
        port: 0,
        port_count: None,
        proto: m.proto.clone(),
        formats: m.formats.clone(),
        connection: None,
        bandwidths: Vec::new(),
        attributes: Vec::new(),
    }
}

/// A new offer (one audio line) on a leg whose session already has more
/// `m=` lines keeps them all, in order (RFC 3264 §8): the audio line where
/// the session has it, the others refused as before (port 0).
pub fn in_layout_of(
    mut offer: SessionDescription,
    previous: &SessionDescription,
) -> SessionDescription {
    let live_audio = |m: &MediaDescription| m.media == "audio" && m.port != 0;
    let Some(at) = previous.media.iter().position(live_audio) else {
        return offer;
    };
    if previous.media.len() < 2 || offer.media.len() != 1 {
        return offer;
    }
    let mut audio = offer.media.pop();
    offer.media = previous
        .media
        .iter()
        .enumerate()
        .map(|(i, m)| match (i == at).then(|| audio.take()).flatten() {
            Some(a) => a,
            None => rejected(m),
        })
        .collect();
    offer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdp::CryptoAttribute;

    const KEY_A: &str = "inline:QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB";
    const KEY_B: &str = "inline:QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJC";

    fn caller_offer(proto: &str, crypto: &str) -> String {
        format!(
            "v=0\r\no=- 1 1 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n\
             m=audio 4000 {proto} 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=rtcp-mux\r\n{crypto}\
             m=video 4002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
        )
    }

    fn local(port: u16) -> LocalMedia {
        LocalMedia {
            addr: "198.51.100.1".parse().unwrap(),
            port,
            key: MasterKey::generate(),
            session_id: 77,
            version: 1,
        }
    }

    fn audio_crypto(sdp: &SessionDescription) -> Vec<CryptoAttribute> {
        sdp.media[0].crypto().collect()
    }

    #[test]
    fn the_strongest_usable_suite_is_chosen_whatever_the_order() {
        for (lines, want) in [
            (
                format!(
                    "a=crypto:1 AES_CM_128_HMAC_SHA1_32 {KEY_A}\r\na=crypto:2 AES_CM_128_HMAC_SHA1_80 {KEY_B}\r\n"
                ),
                (2, Suite::AesCm128HmacSha1_80),
            ),
            (
                format!(
                    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 {KEY_A}\r\na=crypto:2 AES_CM_128_HMAC_SHA1_32 {KEY_B}\r\n"
                ),
                (1, Suite::AesCm128HmacSha1_80),
            ),
            (
                format!(
                    "a=crypto:1 AES_256_CM_HMAC_SHA1_80 {KEY_A}\r\na=crypto:2 AES_CM_128_HMAC_SHA1_32 {KEY_B}\r\na=crypto:3 AES_CM_128_HMAC_SHA1_32 {KEY_A}\r\n"
                ),
                (2, Suite::AesCm128HmacSha1_32),
            ),
        ] {
            let offer = caller_offer("RTP/SAVP", &lines);
            let phone = read_phone_sdp(offer.as_bytes(), true, MediaSecurity::Srtp, None).unwrap();
            let (tag, suite, _) = phone.crypto.unwrap();
            assert_eq!((tag, suite), want, "{lines}");
        }
    }

    #[test]
    fn srtp_call_gets_fresh_keys_per_leg() {
        let offer = caller_offer(
            "RTP/SAVP",
            &format!(
                "a=crypto:1 AES_CM_128_HMAC_SHA1_80 {KEY_A}|2^20|1:4\r\na=crypto:2 AES_CM_128_HMAC_SHA1_32 {KEY_A}\r\n"
            ),
        );
        let caller = read_phone_sdp(offer.as_bytes(), true, MediaSecurity::Srtp, None).unwrap();
        let (tag, suite, _) = caller.crypto.clone().unwrap();
        assert_eq!(
            (tag, suite),
            (2, Suite::AesCm128HmacSha1_32),
            "the MKI line is skipped"
        );
        assert_eq!(caller.rtp, Some("203.0.113.5:4000".parse().unwrap()));
        assert!(caller.rtcp_mux);

        let branch = local(20_000);
        let to_callee = offer_for_branch(&caller, MediaSecurity::Srtp, &branch, OFFERED_SUITE);
        let text = to_callee.to_string();
        assert!(
            !text.contains("203.0.113.5"),
            "caller address leaked: {text}"
        );
        assert!(!text.contains(&KEY_A[7..]), "caller key leaked: {text}");
        assert_eq!(to_callee.media.len(), 1);
        let m = &to_callee.media[0];
        assert_eq!((m.port, m.proto.as_str()), (20_000, "RTP/SAVP"));
        assert_eq!(m.formats, ["0", "8", "101"]);
        assert_eq!(m.fmtp("101"), Some("0-15"));
        let ours = audio_crypto(&to_callee);
        assert_eq!(ours.len(), 1);
        assert_eq!(ours[0].usable().unwrap().1, &branch.key);

        // The callee picks PCMA and answers with its own key.
        let answer = format!(
            "v=0\r\no=- 5 5 IN IP4 192.168.1.20\r\ns=-\r\nc=IN IP4 192.168.1.20\r\nt=0 0\r\n\
             m=audio 6000 RTP/SAVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
             a=crypto:1 AES_CM_128_HMAC_SHA1_80 {KEY_B}\r\na=sendrecv\r\n"
        );
        let callee = read_phone_sdp(
            answer.as_bytes(),
            true,
            MediaSecurity::Srtp,
            Some(&to_callee),
        )
        .unwrap();
        assert_eq!(callee.rtcp, Some("192.168.1.20:6001".parse().unwrap()));
        let caller_leg = local(20_002);
        let to_caller = answer_for_caller(&caller, &callee, &caller_leg).unwrap();
        let text = to_caller.to_string();
        assert!(
            !text.contains("192.168.1.20") && !text.contains(&KEY_B[7..]),
            "callee leaked: {text}"
        );
        assert_eq!(to_caller.media.len(), 2, "one m= line per offered one");
        assert_eq!(
            (to_caller.media[1].media.as_str(), to_caller.media[1].port),
            ("video", 0)
        );
        let m = &to_caller.media[0];
        assert_eq!(m.formats, ["8", "101"]);
        assert_eq!(m.proto, "RTP/SAVP");
        let c = audio_crypto(&to_caller);
        assert_eq!(
            (c[0].tag, c[0].suite),
            (2, Some(Suite::AesCm128HmacSha1_32))
        );
        assert_eq!(c[0].usable().unwrap().1, &caller_leg.key);
        assert_ne!(caller_leg.key, branch.key);
    }

    #[test]
    fn keys_over_plain_signaling_are_ignored() {
        let offer = caller_offer(
            "RTP/SAVP",
            &format!("a=crypto:1 AES_CM_128_HMAC_SHA1_80 {KEY_A}\r\n"),
        );
        // RTP/SAVP over plain signaling cannot be answered at all.
        assert_eq!(
            read_phone_sdp(offer.as_bytes(), false, MediaSecurity::Plain, None).unwrap_err(),
            AnchorError::KeysOverPlain
        );
        // Best-effort SRTP (RTP/AVP with keys) is taken as plain RTP.
        let offer = offer.replace("RTP/SAVP", "RTP/AVP");
        let caller = read_phone_sdp(offer.as_bytes(), false, MediaSecurity::Plain, None).unwrap();
        assert!(caller.keys_over_plain);
        assert!(caller.crypto.is_none());
        let branch = local(20_000);
        let to_callee = offer_for_branch(&caller, MediaSecurity::Plain, &branch, OFFERED_SUITE);
        assert!(to_callee.media[0].attribute("crypto").is_none());
        assert_eq!(to_callee.media[0].proto, "RTP/AVP");
        let answer = "v=0\r\no=- 5 5 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n";
        let callee = read_phone_sdp(
            answer.as_bytes(),
            false,
            MediaSecurity::Plain,
            Some(&to_callee),
        )
        .unwrap();
        let to_caller = answer_for_caller(&caller, &callee, &local(20_002)).unwrap();
        assert_eq!(to_caller.media[0].proto, "RTP/AVP");
        assert!(to_caller.media[0].attribute("crypto").is_none());
    }

    /// The clock jitter is counted at, and the DTMF payload type, come from
    /// the phone's own description.
    #[test]
    fn codec_clock_and_event_type_are_read_from_the_sdp() {
        let sdp = |formats: &str, maps: &str| {
            format!(
                "v=0\r\no=- 1 1 IN IP4 192.0.2.5\r\ns=-\r\nc=IN IP4 192.0.2.5\r\nt=0 0\r\n\
                 m=audio 4000 RTP/AVP {formats}\r\n{maps}"
            )
        };
        let read = |body: String| {
            read_phone_sdp(body.as_bytes(), false, MediaSecurity::Plain, None).unwrap()
        };
        let opus = read(sdp(
            "111 110",
            "a=rtpmap:111 opus/48000/2\r\na=rtpmap:110 telephone-event/48000\r\n",
        ));
        assert_eq!(
            (opus.clock_rate(), opus.telephone_event_pt()),
            (48_000, Some(110))
        );
        let g711 = read(sdp("101 8 0", "a=rtpmap:101 telephone-event/8000\r\n"));
        assert_eq!(
            (g711.clock_rate(), g711.telephone_event_pt()),
            (8000, Some(101))
        );
        let l16 = read(sdp("13 11", ""));
        assert_eq!((l16.clock_rate(), l16.telephone_event_pt()), (44_100, None));
    }

    /// A DTLS-SRTP offer (baresip `dtls_srtp`, Linphone with DTLS) would
    /// wait for a handshake Parley never starts: refused, whatever the
    /// leg's policy, not answered as plain RTP.
    #[test]
    fn dtls_srtp_offers_are_refused() {
        for proto in ["UDP/TLS/RTP/SAVP", "UDP/TLS/RTP/SAVPF"] {
            let offer = caller_offer(proto, "a=fingerprint:sha-256 AB:CD\r\na=setup:actpass\r\n");
            for tls in [false, true] {
                for security in [MediaSecurity::Plain, MediaSecurity::SrtpIfAccepted] {
                    assert_eq!(
                        read_phone_sdp(offer.as_bytes(), tls, security, None).unwrap_err(),
                        AnchorError::UnsupportedProfile,
                        "{proto} tls={tls}"
                    );
                }
            }
        }
    }

    /// One stream offered twice, SRTP first and plain RTP second (PJSIP's
    /// optional-SRTP offer): over plain signaling the plain line is
    /// answered and the other rejected; over TLS the SRTP one.
    #[test]
    fn a_stream_offered_with_and_without_srtp_gets_the_line_the_leg_can_use() {
        let offer = format!(
            "v=0\r\no=- 1 1 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n\
             m=audio 4000 RTP/SAVP 0\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 {KEY_A}\r\n\
             m=audio 4002 RTP/AVP 0\r\n"
        );
        let plain = read_phone_sdp(offer.as_bytes(), false, MediaSecurity::Plain, None).unwrap();
        assert_eq!((plain.audio, plain.is_srtp()), (1, false));
        let callee = read_phone_sdp(
            b"v=0\r\no=- 5 5 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n",
            false,
            MediaSecurity::Plain,
            None,
        )
        .unwrap();
        let answer = answer_for_caller(&plain, &callee, &local(20_000)).unwrap();
        let ports: Vec<u16> = answer.media.iter().map(|m| m.port).collect();
        assert_eq!(ports, [0, 20_000]);
        assert!(answer.media[1].attribute("crypto").is_none());
        let secure = read_phone_sdp(offer.as_bytes(), true, MediaSecurity::Srtp, None).unwrap();
        assert_eq!((secure.audio, secure.is_srtp()), (0, true));
    }

    /// An offer carrying one stream twice: over TLS the line with keys
    /// Parley can use is taken, wherever it is, else a plain one.
    #[test]
    fn of_two_audio_lines_the_usable_one_is_taken() {
        let offer = |lines: &str| {
            format!(
                "v=0\r\no=- 1 1 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\n{lines}"
            )
        };
        let plain_then_keyed = offer(&format!(
            "m=audio 4000 RTP/AVP 0\r\nm=audio 4002 RTP/SAVP 0\r\n\
             a=crypto:1 AES_CM_128_HMAC_SHA1_80 {KEY_A}\r\n"
        ));
        let read = |body: &str, security| read_phone_sdp(body.as_bytes(), true, security, None);
        let m = read(&plain_then_keyed, MediaSecurity::Srtp).unwrap();
        assert_eq!((m.audio, m.is_srtp()), (1, true));
        let m = read(&plain_then_keyed, MediaSecurity::SrtpIfAccepted).unwrap();
        assert_eq!((m.audio, m.is_srtp()), (1, true));
        // Keys Parley refuses (an MKI), then a plain fallback.
        let refused_then_plain = offer(&format!(
            "m=audio 4002 RTP/SAVP 0\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 {KEY_A}|1:4\r\n\
             m=audio 4000 RTP/AVP 0\r\n"
        ));
        let m = read(&refused_then_plain, MediaSecurity::SrtpIfAccepted).unwrap();
        assert_eq!((m.audio, m.is_srtp()), (1, false));
        assert_eq!(
            read(&refused_then_plain, MediaSecurity::Srtp).unwrap_err(),
            AnchorError::SrtpRequired
        );
    }

    /// RFC 3264 §6.1: the answer's codecs are the offer's, by number and
    /// by what the number names; an answer with only events has no voice;
    /// the answer's direction stays within what the offer allows.
    #[test]
    fn answers_keep_the_offers_codecs_and_direction() {
        let body = |m: &str| {
            format!("v=0\r\no=- 5 5 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\n{m}")
        };
        let caller = read_phone_sdp(
            body(
                "m=audio 4000 RTP/AVP 0 96 101\r\na=rtpmap:96 opus/48000/2\r\n\
                 a=rtpmap:101 telephone-event/8000\r\na=sendonly\r\n",
            )
            .as_bytes(),
            false,
            MediaSecurity::Plain,
            None,
        )
        .unwrap();
        let to_callee =
            offer_for_branch(&caller, MediaSecurity::Plain, &local(20_000), OFFERED_SUITE);
        let callee = |m: &str| {
            read_phone_sdp(
                body(m).as_bytes(),
                false,
                MediaSecurity::Plain,
                Some(&to_callee),
            )
            .unwrap()
        };
        // 96 is another codec in the answer; 101 alone carries no voice.
        let renumbered = callee(
            "m=audio 6000 RTP/AVP 96 101\r\na=rtpmap:96 speex/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\n",
        );
        assert_eq!(
            answer_for_caller(&caller, &renumbered, &local(1)).unwrap_err(),
            AnchorError::NoCommonCodec
        );
        // Names compare in any case; opus's channels count.
        let same = callee(
            "m=audio 6000 RTP/AVP 96 101\r\na=rtpmap:96 OPUS/48000/2\r\n\
             a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n",
        );
        let answer = answer_for_caller(&caller, &same, &local(1)).unwrap();
        assert_eq!(answer.media[0].formats, ["96", "101"]);
        // A hold (sendonly) answered sendrecv: Parley answers recvonly.
        assert_eq!(answer.media_direction(0), Direction::RecvOnly);
        let static_only = callee("m=audio 6000 RTP/AVP 0\r\n");
        let answer = answer_for_caller(&caller, &static_only, &local(1)).unwrap();
        assert_eq!(answer.media[0].formats, ["0"]);
    }

    #[test]
    fn policy_and_offer_mismatches_are_refused() {
        let plain = caller_offer("RTP/AVP", "");
        assert_eq!(
            read_phone_sdp(plain.as_bytes(), true, MediaSecurity::Srtp, None).unwrap_err(),
            AnchorError::SrtpRequired
        );
        // Best effort takes plain RTP.
        let caller =
            read_phone_sdp(plain.as_bytes(), true, MediaSecurity::SrtpIfAccepted, None).unwrap();
        assert!(!caller.is_srtp());
        // A mandatory-SRTP offer with only unusable keys.
        let mki_only = caller_offer(
            "RTP/SAVP",
            &format!("a=crypto:1 AES_CM_128_HMAC_SHA1_80 {KEY_A}|1:4\r\n"),
        );
        assert_eq!(
            read_phone_sdp(
                mki_only.as_bytes(),
                true,
                MediaSecurity::SrtpIfAccepted,
                None
            )
            .unwrap_err(),
            AnchorError::SrtpRequired
        );
        let no_audio = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nt=0 0\r\nm=video 4 RTP/AVP 96\r\n";
        assert_eq!(
            read_phone_sdp(no_audio.as_bytes(), true, MediaSecurity::Plain, None).unwrap_err(),
            AnchorError::NoAudio
        );
        assert!(matches!(
            read_phone_sdp(b"garbage", true, MediaSecurity::Plain, None),
            Err(AnchorError::Sdp(_))
        ));

        // Answers: a codec nobody offered, an unknown crypto tag, no keys
        // where SRTP is mandatory.
        let to_callee = offer_for_branch(
            &caller,
            MediaSecurity::SrtpIfAccepted,
            &local(20_000),
            OFFERED_SUITE,
        );
        let answer = |m: &str| {
            format!("v=0\r\no=- 5 5 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\n{m}")
        };
        let g729 = read_phone_sdp(
            answer("m=audio 6000 RTP/AVP 18\r\n").as_bytes(),
            true,
            MediaSecurity::SrtpIfAccepted,
            Some(&to_callee),
        )
        .unwrap();
        assert_eq!(
            answer_for_caller(&caller, &g729, &local(1)).unwrap_err(),
            AnchorError::NoCommonCodec
        );
        let wrong_tag = answer(&format!(
            "m=audio 6000 RTP/AVP 0\r\na=crypto:9 AES_CM_128_HMAC_SHA1_80 {KEY_B}\r\n"
        ));
        assert_eq!(
            read_phone_sdp(
                wrong_tag.as_bytes(),
                true,
                MediaSecurity::SrtpIfAccepted,
                Some(&to_callee)
            )
            .unwrap_err(),
            AnchorError::AnswerMismatch
        );
        let mki_answer = answer(&format!(
            "m=audio 6000 RTP/AVP 0\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 {KEY_B}|1:4\r\n"
        ));
        assert_eq!(
            read_phone_sdp(
                mki_answer.as_bytes(),
                true,
                MediaSecurity::SrtpIfAccepted,
                Some(&to_callee)
            )
            .unwrap_err(),
            AnchorError::AnswerMismatch,
            "keys Parley cannot use in an answer"
        );
        let plain_answer = answer("m=audio 6000 RTP/AVP 0\r\n");
        assert!(
            read_phone_sdp(
                plain_answer.as_bytes(),
                true,
                MediaSecurity::SrtpIfAccepted,
                Some(&to_callee)
            )
            .is_ok()
        );
        assert_eq!(
            read_phone_sdp(
                plain_answer.as_bytes(),
                true,
                MediaSecurity::Srtp,
                Some(&to_callee)
            )
            .unwrap_err(),
            AnchorError::SrtpRequired
        );
        let two_lines = answer("m=audio 6000 RTP/AVP 0\r\nm=video 0 RTP/AVP 96\r\n");
        assert_eq!(
            read_phone_sdp(
                two_lines.as_bytes(),
                true,
                MediaSecurity::Plain,
                Some(&to_callee)
            )
            .unwrap_err(),
            AnchorError::AnswerMismatch
        );
    }

    #[test]
    fn hold_directions_and_rtcp_ports_carry_over() {
        let offer = "v=0\r\no=- 1 2 IN IP4 10.0.0.7\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n\
                     m=audio 4000 RTP/AVP 0\r\na=sendonly\r\na=rtcp:5005 IN IP4 10.0.0.8\r\n";
        let caller = read_phone_sdp(offer.as_bytes(), false, MediaSecurity::Plain, None).unwrap();
        assert_eq!(caller.rtp, None, "0.0.0.0 means do not send");
        assert_eq!(caller.direction(), Direction::SendOnly);
        let old_style = offer.replace("a=sendonly\r\n", "");
        let held = read_phone_sdp(old_style.as_bytes(), false, MediaSecurity::Plain, None).unwrap();
        assert_eq!(
            held.direction(),
            Direction::SendOnly,
            "c=0.0.0.0 alone is hold"
        );
        let to_callee =
            offer_for_branch(&caller, MediaSecurity::Plain, &local(20_000), OFFERED_SUITE);
        assert_eq!(to_callee.media_direction(0), Direction::SendOnly);
        let offer = offer.replace("0.0.0.0", "10.0.0.7");
        let caller = read_phone_sdp(offer.as_bytes(), false, MediaSecurity::Plain, None).unwrap();
        assert_eq!(caller.rtcp, Some("10.0.0.8:5005".parse().unwrap()));
    }
}
