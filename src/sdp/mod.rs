//! SDP (RFC 8866) as phones use it for audio calls: parse, inspect,
//! serialize. Parley is a B2BUA, so it never forwards a phone's SDP; it
//! reads the offer or answer into a [`SessionDescription`] and writes its
//! own for the other leg. Lines a relay has no use for (`i=`, `u=`, `e=`,
//! `p=`, `z=`, `k=`, `r=`) are skipped when parsing.
//!
//! Every count is bounded, and the parser returns a typed error rather than
//! panicking on any input.

mod crypto;
#[cfg(test)]
mod tests;

use std::fmt::{self, Write as _};
use std::net::IpAddr;

pub use crypto::{CryptoAttribute, CryptoError, KeyParam, Lifetime, Mki, Unusable};

/// The largest SDP body accepted.
pub const MAX_SDP_BYTES: usize = 16 * 1024;
/// Media descriptions per SDP (an audio call has one or two).
pub const MAX_MEDIA: usize = 8;
/// Attribute lines per level (session or one media description).
pub const MAX_ATTRIBUTES: usize = 64;
/// Formats (payload types) on one `m=` line.
pub const MAX_FORMATS: usize = 32;
/// `b=` lines per level.
pub const MAX_BANDWIDTHS: usize = 4;

/// Why an SDP body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    #[error("SDP larger than {MAX_SDP_BYTES} bytes")]
    TooLarge,
    #[error("SDP is not UTF-8 text")]
    NotText,
    #[error("SDP does not start with v=0")]
    NoVersion,
    #[error("line {0} is not <type>=<value>")]
    BadLine(usize),
    #[error("line {line}: malformed {what}")]
    Malformed { line: usize, what: &'static str },
    #[error("SDP has no {0} line")]
    Missing(&'static str),
    #[error("more than {MAX_MEDIA} media descriptions")]
    TooManyMedia,
    #[error("more than {MAX_ATTRIBUTES} attributes at one level")]
    TooManyAttributes,
    #[error("more than {MAX_FORMATS} formats on one m= line")]
    TooManyFormats,
    #[error("more than {MAX_BANDWIDTHS} b= lines at one level")]
    TooManyBandwidths,
}

/// The `o=` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub username: String,
    pub session_id: String,
    pub session_version: u64,
    pub address: Connection,
}

/// A `c=` line, or the address part of `o=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// `IP4` or `IP6` (nettype is always `IN` for us).
    pub ip: Option<IpAddr>,
    /// The address as written, for a host name or a multicast `/ttl`.
    pub raw: String,
}

impl Connection {
    pub fn from_ip(ip: IpAddr) -> Self {
        Connection {
            ip: Some(ip),
            raw: ip.to_string(),
        }
    }

    fn parse(value: &str, line: usize) -> Result<Self, SdpError> {
        let bad = SdpError::Malformed {
            line,
            what: "connection address",
        };
        let mut parts = value.split_ascii_whitespace();
        let (Some(net), Some(kind), Some(addr), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad);
        };
        if net != "IN" || !(kind == "IP4" || kind == "IP6") {
            return Err(bad);
        }
        Connection::from_parts(kind, addr).ok_or(bad)
    }

    fn from_parts(kind: &str, addr: &str) -> Option<Self> {
        let host = addr.split('/').next().unwrap_or(addr);
        let ip = host.parse::<IpAddr>().ok();
        if let Some(ip) = ip
            && (ip.is_ipv4() != (kind == "IP4"))
        {
            return None;
        }
        if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        Some(Connection {
            ip,
            raw: addr.to_string(),
        })
    }

    fn addr_type(&self) -> &'static str {
        match self.ip {
            Some(IpAddr::V6(_)) => "IP6",
            Some(IpAddr::V4(_)) => "IP4",
            None if self.raw.contains(':') => "IP6",
            None => "IP4",
        }
    }
}

impl fmt::Display for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IN {} {}", self.addr_type(), self.raw)
    }
}

/// An `a=` line: a flag (`a=rtcp-mux`) or a name and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub name: String,
    pub value: Option<String>,
}

impl Attribute {
    pub fn flag(name: &str) -> Self {
        Attribute {
            name: name.to_string(),
            value: None,
        }
    }

    pub fn new(name: &str, value: impl Into<String>) -> Self {
        Attribute {
            name: name.to_string(),
            value: Some(value.into()),
        }
    }
}

/// Media direction (RFC 3264 §5.1), from `a=sendrecv` and its siblings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl Direction {
    pub const fn name(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [
            Direction::SendRecv,
            Direction::SendOnly,
            Direction::RecvOnly,
            Direction::Inactive,
        ]
        .into_iter()
        .find(|d| d.name() == name)
    }

    /// The direction as the other party sees it.
    pub const fn reversed(self) -> Self {
        match self {
            Direction::SendOnly => Direction::RecvOnly,
            Direction::RecvOnly => Direction::SendOnly,
            d => d,
        }
    }

    /// Whether the side that wrote this direction sends media.
    pub const fn sends(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::SendOnly)
    }

    /// Whether the side that wrote this direction wants to receive media.
    pub const fn receives(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::RecvOnly)
    }

    /// The direction with sending or receiving turned off.
    pub const fn restricted(self, send: bool, recv: bool) -> Self {
        match (self.sends() && send, self.receives() && recv) {
            (true, true) => Direction::SendRecv,
            (true, false) => Direction::SendOnly,
            (false, true) => Direction::RecvOnly,
            (false, false) => Direction::Inactive,
        }
    }
}

/// One `m=` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaDescription {
    /// `audio`, `video`, ...
    pub media: String,
    /// Zero means the stream is rejected or disabled.
    pub port: u16,
    pub port_count: Option<u16>,
    /// `RTP/AVP`, `RTP/SAVP`, ...
    pub proto: String,
    /// Payload type numbers, as written.
    pub formats: Vec<String>,
    pub connection: Option<Connection>,
    pub bandwidths: Vec<String>,
    pub attributes: Vec<Attribute>,
}

impl MediaDescription {
    /// The first attribute called `name`.
    pub fn attribute(&self, name: &str) -> Option<&Attribute> {
        self.attributes.iter().find(|a| a.name == name)
    }

    /// Values of every attribute called `name`.
    pub fn attribute_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.attributes
            .iter()
            .filter(move |a| a.name == name)
            .filter_map(|a| a.value.as_deref())
    }

    pub fn has_flag(&self, name: &str) -> bool {
        self.attributes.iter().any(|a| a.name == name)
    }

    /// The explicit direction of this media, if it has one.
    pub fn own_direction(&self) -> Option<Direction> {
        self.attributes.iter().find_map(|a| {
            if a.value.is_none() {
                Direction::from_name(&a.name)
            } else {
                None
            }
        })
    }

    /// The `a=rtpmap` value of payload type `pt` (`PCMU/8000`).
    pub fn rtpmap<'a>(&'a self, pt: &str) -> Option<&'a str> {
        self.format_attribute("rtpmap", pt)
    }

    /// The `a=fmtp` value of payload type `pt`.
    pub fn fmtp<'a>(&'a self, pt: &str) -> Option<&'a str> {
        self.format_attribute("fmtp", pt)
    }

    fn format_attribute<'a>(&'a self, name: &'a str, pt: &str) -> Option<&'a str> {
        self.attribute_values(name).find_map(|v| {
            let (num, rest) = v.split_once(' ')?;
            (num == pt).then(|| rest.trim())
        })
    }

    /// Every well-formed `a=crypto` line, in the offerer's order of
    /// preference; malformed ones are reported by [`Self::crypto_errors`].
    pub fn crypto(&self) -> impl Iterator<Item = CryptoAttribute> + '_ {
        self.attribute_values("crypto")
            .filter_map(|v| CryptoAttribute::parse(v).ok())
    }

    /// The errors of the `a=crypto` lines that did not parse.
    pub fn crypto_errors(&self) -> impl Iterator<Item = CryptoError> + '_ {
        self.attribute_values("crypto")
            .filter_map(|v| CryptoAttribute::parse(v).err())
    }

    /// Whether the profile is one Parley carries: RTP or SDES-keyed SRTP,
    /// with or without feedback (`RTP/AVP`, `RTP/AVPF`, `RTP/SAVP`,
    /// `RTP/SAVPF`). DTLS-SRTP (`UDP/TLS/RTP/SAVP`) is not among them.
    pub fn is_rtp_profile(&self) -> bool {
        ["RTP/AVP", "RTP/AVPF", "RTP/SAVP", "RTP/SAVPF"]
            .iter()
            .any(|p| self.proto.eq_ignore_ascii_case(p))
    }

    /// Whether the profile is secure RTP (`RTP/SAVP`, `RTP/SAVPF`).
    pub fn is_srtp_profile(&self) -> bool {
        self.proto.eq_ignore_ascii_case("RTP/SAVP") || self.proto.eq_ignore_ascii_case("RTP/SAVPF")
    }
}

/// A parsed SDP body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDescription {
    pub origin: Origin,
    pub session_name: String,
    pub connection: Option<Connection>,
    pub bandwidths: Vec<String>,
    /// The first `t=` line: start and stop (both 0 for calls).
    pub timing: (u64, u64),
    pub attributes: Vec<Attribute>,
    pub media: Vec<MediaDescription>,
}

impl SessionDescription {
    /// Parses an SDP body.
    pub fn parse(body: &[u8]) -> Result<Self, SdpError> {
        if body.len() > MAX_SDP_BYTES {
            return Err(SdpError::TooLarge);
        }
        let text = std::str::from_utf8(body).map_err(|_| SdpError::NotText)?;
        Parser::default().run(text)
    }

    /// The connection address that applies to media `index`.
    pub fn media_connection(&self, index: usize) -> Option<&Connection> {
        self.media
            .get(index)?
            .connection
            .as_ref()
            .or(self.connection.as_ref())
    }

    /// The direction that applies to media `index`: its own, else the
    /// session's, else sendrecv.
    pub fn media_direction(&self, index: usize) -> Direction {
        self.media
            .get(index)
            .and_then(MediaDescription::own_direction)
            .or_else(|| {
                self.attributes.iter().find_map(|a| {
                    if a.value.is_none() {
                        Direction::from_name(&a.name)
                    } else {
                        None
                    }
                })
            })
            .unwrap_or(Direction::SendRecv)
    }

    /// Serializes to the bytes of a body, CRLF line ends.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

impl fmt::Display for SessionDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.origin;
        write!(
            f,
            "v=0\r\no={} {} {} {}\r\n",
            o.username, o.session_id, o.session_version, o.address
        )?;
        write!(
            f,
            "s={}\r\n",
            if self.session_name.is_empty() {
                "-"
            } else {
                &self.session_name
            }
        )?;
        if let Some(c) = &self.connection {
            write!(f, "c={c}\r\n")?;
        }
        for b in &self.bandwidths {
            write!(f, "b={b}\r\n")?;
        }
        write!(f, "t={} {}\r\n", self.timing.0, self.timing.1)?;
        write_attributes(f, &self.attributes)?;
        for m in &self.media {
            write!(f, "m={} {}", m.media, m.port)?;
            if let Some(n) = m.port_count {
                write!(f, "/{n}")?;
            }
            write!(f, " {}", m.proto)?;
            for fmt in &m.formats {
                f.write_char(' ')?;
                f.write_str(fmt)?;
            }
            f.write_str("\r\n")?;
            if let Some(c) = &m.connection {
                write!(f, "c={c}\r\n")?;
            }
            for b in &m.bandwidths {
                write!(f, "b={b}\r\n")?;
            }
            write_attributes(f, &m.attributes)?;
        }
        Ok(())
    }
}

fn write_attributes(f: &mut fmt::Formatter<'_>, attributes: &[Attribute]) -> fmt::Result {
    for a in attributes {
        match &a.value {
            Some(v) => write!(f, "a={}:{}\r\n", a.name, v)?,
            None => write!(f, "a={}\r\n", a.name)?,
        }
    }
    Ok(())
}

/// Where the parser is: before or inside the media sections.
#[derive(Default)]
struct Parser {
    origin: Option<Origin>,
    session_name: Option<String>,
    connection: Option<Connection>,
    bandwidths: Vec<String>,
    timing: Option<(u64, u64)>,
    attributes: Vec<Attribute>,
    media: Vec<MediaDescription>,
}

impl Parser {
    fn run(mut self, text: &str) -> Result<SessionDescription, SdpError> {
        let mut lines = text
            .split('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .enumerate();
        match lines.next() {
            Some((_, l)) if l.trim_end() == "v=0" => {}
            _ => return Err(SdpError::NoVersion),
        }
        for (i, line) in lines {
            let n = i + 1;
            // Trailing blank lines and stray whitespace are common; tolerate.
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            let bytes = line.as_bytes();
            if bytes.len() < 2 || bytes[1] != b'=' || !bytes[0].is_ascii_lowercase() {
                return Err(SdpError::BadLine(n));
            }
            // No value may hold NUL, CR, LF or other controls (RFC 8866 §9
            // byte-string): values are copied into SDP for the other leg,
            // where a stray CR could start a line of the sender's choosing.
            if bytes.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7F) {
                return Err(SdpError::Malformed {
                    line: n,
                    what: "control character",
                });
            }
            self.line(bytes[0], &line[2..], n)?;
        }
        Ok(SessionDescription {
            origin: self.origin.ok_or(SdpError::Missing("o="))?,
            session_name: self.session_name.ok_or(SdpError::Missing("s="))?,
            connection: self.connection,
            bandwidths: self.bandwidths,
            timing: self.timing.ok_or(SdpError::Missing("t="))?,
            attributes: self.attributes,
            media: self.media,
        })
    }

    fn line(&mut self, kind: u8, value: &str, n: usize) -> Result<(), SdpError> {
        let in_media = !self.media.is_empty();
        match kind {
            b'o' if !in_media && self.origin.is_none() => {
                self.origin = Some(parse_origin(value, n)?)
            }
            b's' if !in_media && self.session_name.is_none() => {
                // A blank name ("s=" or "s= ") means no name, which is
                // written "-": one form for it, so what is parsed is what
                // would be written.
                let name = if value.is_empty() { "-" } else { value };
                self.session_name = Some(name.to_string())
            }
            b't' if !in_media => {
                if self.timing.is_none() {
                    let mut parts = value.split_ascii_whitespace().map(str::parse::<u64>);
                    let (Some(Ok(start)), Some(Ok(stop))) = (parts.next(), parts.next()) else {
                        return Err(SdpError::Malformed {
                            line: n,
                            what: "t= line",
                        });
                    };
                    self.timing = Some((start, stop));
                }
            }
            b'c' => {
                let c = Connection::parse(value, n)?;
                match self.media.last_mut() {
                    Some(m) => m.connection = Some(c),
                    None => self.connection = Some(c),
                }
            }
            b'b' => {
                let list = match self.media.last_mut() {
                    Some(m) => &mut m.bandwidths,
                    None => &mut self.bandwidths,
                };
                if list.len() >= MAX_BANDWIDTHS {
                    return Err(SdpError::TooManyBandwidths);
                }
                list.push(value.to_string());
            }
            b'a' => {
                let list = match self.media.last_mut() {
                    Some(m) => &mut m.attributes,
                    None => &mut self.attributes,
                };
                if list.len() >= MAX_ATTRIBUTES {
                    return Err(SdpError::TooManyAttributes);
                }
                list.push(parse_attribute(value, n)?);
            }
            b'm' => {
                if self.media.len() >= MAX_MEDIA {
                    return Err(SdpError::TooManyMedia);
                }
                self.media.push(parse_media(value, n)?);
            }
            b'i' | b'u' | b'e' | b'p' | b'z' | b'k' | b'r' => {}
            b'o' | b's' | b't' => {
                return Err(SdpError::Malformed {
                    line: n,
                    what: "line order",
                });
            }
            _ => return Err(SdpError::BadLine(n)),
        }
        Ok(())
    }
}

fn parse_origin(value: &str, n: usize) -> Result<Origin, SdpError> {
    let bad = SdpError::Malformed {
        line: n,
        what: "o= line",
    };
    let p: Vec<&str> = value.split_ascii_whitespace().take(7).collect();
    let [user, id, version, net, kind, addr] = p[..] else {
        return Err(bad);
    };
    // Session ids and versions are decimal; some phones send values past
    // 2^63, so the version saturates rather than failing the call.
    if !id.bytes().all(|b| b.is_ascii_digit())
        || !version.bytes().all(|b| b.is_ascii_digit())
        || version.is_empty()
    {
        return Err(bad);
    }
    if net != "IN" {
        return Err(bad);
    }
    Ok(Origin {
        username: user.to_string(),
        session_id: id.to_string(),
        session_version: version.parse().unwrap_or(u64::MAX),
        address: Connection::from_parts(kind, addr).ok_or(bad)?,
    })
}

fn parse_attribute(value: &str, n: usize) -> Result<Attribute, SdpError> {
    let (name, value) = match value.split_once(':') {
        Some((name, v)) => (name, Some(v.to_string())),
        None => (value, None),
    };
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(SdpError::Malformed {
            line: n,
            what: "attribute name",
        });
    }
    Ok(Attribute {
        name: name.to_string(),
        value,
    })
}

fn parse_media(value: &str, n: usize) -> Result<MediaDescription, SdpError> {
    let bad = |what| SdpError::Malformed { line: n, what };
    let mut parts = value.split_ascii_whitespace();
    let media = parts.next().ok_or(bad("m= line"))?;
    let port_spec = parts.next().ok_or(bad("m= line"))?;
    let proto = parts.next().ok_or(bad("m= line"))?;
    let (port, port_count) = match port_spec.split_once('/') {
        Some((p, c)) => (p, Some(c.parse::<u16>().map_err(|_| bad("port count"))?)),
        None => (port_spec, None),
    };
    let port = port.parse::<u16>().map_err(|_| bad("media port"))?;
    let mut formats = Vec::new();
    for f in parts {
        if formats.len() >= MAX_FORMATS {
            return Err(SdpError::TooManyFormats);
        }
        if !f.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("format"));
        }
        formats.push(f.to_string());
    }
    if formats.is_empty() || !media.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(bad("m= line"));
    }
    Ok(MediaDescription {
        media: media.to_string(),
        port,
        port_count,
        proto: proto.to_string(),
        formats,
        connection: None,
        bandwidths: Vec::new(),
        attributes: Vec::new(),
    })
}
