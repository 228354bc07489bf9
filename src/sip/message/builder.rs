//! Writes SIP messages straight into one buffer.

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};

use std::net::SocketAddr;

use super::{HeaderName, Message, Method, NameAddr, grammar, limits};

/// Enough for a 401 with two challenges or a 200 listing a few contacts,
/// so most messages are written without growing the buffer.
const INITIAL_CAPACITY: usize = 1024;

/// Builds a request or response. Header values are written as given,
/// except that CR and LF become spaces, so no value can start a new header.
pub struct MessageBuilder {
    buf: BytesMut,
}

impl MessageBuilder {
    pub fn request(method: &str, uri: &str) -> MessageBuilder {
        let mut b = MessageBuilder {
            buf: BytesMut::with_capacity(INITIAL_CAPACITY),
        };
        b.put_clean(method);
        b.buf.put_u8(b' ');
        b.put_clean(uri);
        b.buf.put_slice(b" SIP/2.0\r\n");
        b
    }

    pub fn response(status: u16, reason: &str) -> MessageBuilder {
        let mut b = MessageBuilder {
            buf: BytesMut::with_capacity(INITIAL_CAPACITY),
        };
        b.buf.put_slice(b"SIP/2.0 ");
        b.buf
            .put_slice(itoa::Buffer::new().format(status).as_bytes());
        b.buf.put_u8(b' ');
        b.put_clean(reason);
        b.buf.put_slice(b"\r\n");
        b
    }

    /// A response to `req` carrying the headers RFC 3261 §8.2.6.2 copies:
    /// every Via in order, From, To (with `to_tag` added when the request
    /// had none and the status is above 100), Call-ID and CSeq.
    pub fn response_to(
        req: &Message,
        status: u16,
        reason: &str,
        to_tag: Option<&str>,
    ) -> MessageBuilder {
        Self::response_to_peer(req, None, status, reason, to_tag)
    }

    /// Like [`MessageBuilder::response_to`], and also records where the
    /// request really came from in the top Via: `received` (RFC 3261
    /// §18.2.1) and the `rport` value when the client asked (RFC 3581).
    pub fn response_to_peer(
        req: &Message,
        source: Option<SocketAddr>,
        status: u16,
        reason: &str,
        to_tag: Option<&str>,
    ) -> MessageBuilder {
        let mut b = MessageBuilder::response(status, reason);
        let mut first_via = true;
        // RFC 3261 §12.1.1: a response that makes a dialog carries the
        // request's Record-Route, so the peer's route set matches ours.
        let keeps_route = req.method() == Some(Method::Invite) && (101..300).contains(&status);
        for (name, _, value) in req.fields() {
            match name {
                HeaderName::Via if first_via => {
                    first_via = false;
                    match source {
                        Some(source) => b.header_fmt(
                            name,
                            format_args!(
                                "{}",
                                StampedVia {
                                    field: value,
                                    source
                                }
                            ),
                        ),
                        None => b.header(name, value),
                    };
                }
                HeaderName::Via | HeaderName::From | HeaderName::CallId | HeaderName::CSeq => {
                    b.header(name, value);
                }
                HeaderName::To => {
                    let needs_tag = status > 100 && req.to().is_some_and(|t| t.tag().is_none());
                    match to_tag {
                        Some(tag) if needs_tag => {
                            b.header_fmt(name, format_args!("{value};tag={tag}"))
                        }
                        _ => b.header(name, value),
                    };
                }
                HeaderName::RecordRoute if keeps_route => {
                    b.header(name, value);
                }
                // RFC 3261 §8.2.6.1: a 100 echoes the request's Timestamp.
                HeaderName::Timestamp if status == 100 => {
                    b.header(name, value);
                }
                _ => {}
            }
        }
        b
    }

    /// An error response (`400`, or `505` for a bad version) for bytes that did not parse, built from whatever header
    /// lines can still be read. `None` when the bytes are not a request
    /// (or are an ACK, which is never answered) or lack the headers a
    /// response must copy.
    pub fn error_response_for_raw(
        raw: &[u8],
        source: SocketAddr,
        status: u16,
        reason: &str,
    ) -> Option<Bytes> {
        // Bytes that are not UTF-8 (a Latin-1 display name, a binary body)
        // must not cost the answer: only the lines copied need to be text.
        let text = String::from_utf8_lossy(raw);
        let mut lines = text.trim_start_matches(['\r', '\n']).lines();
        let method = lines.next()?.split(' ').next()?;
        if method.is_empty()
            || method.starts_with("SIP/")
            || method == "ACK"
            || !grammar::is_token(method)
        {
            return None;
        }
        // Header lines up to the blank line, folded lines joined (RFC 3261
        // §7.3.1): a Via whose branch sits on a continuation line must keep
        // it, or the client cannot match the answer.
        let mut unfolded: Vec<String> = Vec::new();
        for line in lines.take(limits::MAX_HEADER_COUNT * 2) {
            if line.is_empty() {
                break;
            }
            match unfolded.last_mut() {
                Some(last) if line.starts_with([' ', '\t']) => {
                    last.push(' ');
                    last.push_str(line.trim_start());
                }
                _ => unfolded.push(line.to_owned()),
            }
        }
        let mut b = MessageBuilder::response(status, reason);
        let mut seen = [false; 5];
        let mut first_via = true;
        for line in &unfolded {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let name = HeaderName::from_name(name.trim_end().as_bytes());
            let value = grammar::trim_lws(value);
            if value.bytes().any(|c| c < 0x20 && c != b'\t') {
                continue;
            }
            let slot = match name {
                HeaderName::Via => 0,
                HeaderName::From => 1,
                HeaderName::To => 2,
                HeaderName::CallId => 3,
                HeaderName::CSeq => 4,
                _ => continue,
            };
            if slot == 0 && first_via {
                first_via = false;
                b.header_fmt(
                    name,
                    format_args!(
                        "{}",
                        StampedVia {
                            field: value,
                            source
                        }
                    ),
                );
            } else if slot != 0 && seen[slot] {
                continue;
            } else if slot == 2 && NameAddr::parse(value).is_some_and(|n| n.tag().is_none()) {
                // A UAS answer carries a To tag (RFC 3261 §8.2.6.2); the
                // same one for every retransmission of these bytes.
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::hash::Hash::hash(&raw.len(), &mut h);
                std::hash::Hash::hash(value, &mut h);
                let tag = std::hash::Hasher::finish(&h);
                b.header_fmt(name, format_args!("{value};tag={tag:016x}"));
            } else {
                b.header(name, value);
            }
            seen[slot] = true;
        }
        seen.iter().all(|&s| s).then(|| b.finish())
    }

    pub fn header(&mut self, name: HeaderName, value: &str) -> &mut MessageBuilder {
        self.header_raw(name.as_str(), value)
    }

    /// A header whose value is formatted straight into the message, with
    /// the same CR/LF cleaning as [`MessageBuilder::header`].
    pub fn header_fmt(
        &mut self,
        name: HeaderName,
        value: std::fmt::Arguments<'_>,
    ) -> &mut MessageBuilder {
        self.put_clean(name.as_str());
        self.buf.put_slice(b": ");
        // Formatted raw, then cleaned in one pass: a value is written in
        // many small pieces, and checking each one costs more than the
        // writing.
        let start = self.buf.len();
        let _ = RawWriter(&mut self.buf).write_fmt(value);
        clean_in_place(&mut self.buf[start..]);
        self.buf.put_slice(b"\r\n");
        self
    }

    /// A header Parley has no [`HeaderName`] for, or whose spelling must be kept.
    pub fn header_raw(&mut self, name: &str, value: &str) -> &mut MessageBuilder {
        self.put_clean(name);
        self.buf.put_slice(b": ");
        self.put_clean(value);
        self.buf.put_slice(b"\r\n");
        self
    }

    /// Ends the header section with `Content-Length: 0`.
    pub fn finish(self) -> Bytes {
        self.finish_with_body(None, b"")
    }

    /// Adds Content-Type (when given), Content-Length and the body.
    pub fn finish_with_body(mut self, content_type: Option<&str>, body: &[u8]) -> Bytes {
        if let Some(ct) = content_type {
            self.header(HeaderName::ContentType, ct);
        }
        self.buf.put_slice(b"Content-Length: ");
        self.buf
            .put_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        self.buf.put_slice(b"\r\n\r\n");
        self.buf.put_slice(body);
        self.buf.freeze()
    }

    fn put_clean(&mut self, s: &str) {
        put_clean(&mut self.buf, s);
    }
}

/// Appends `s`, turning CR and LF into spaces.
fn put_clean(buf: &mut BytesMut, s: &str) {
    let has_break = if s.len() < 32 {
        s.bytes().any(|b| b == b'\r' || b == b'\n')
    } else {
        memchr::memchr2(b'\r', b'\n', s.as_bytes()).is_some()
    };
    if has_break {
        for b in s.bytes() {
            buf.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
        }
    } else {
        buf.put_slice(s.as_bytes());
    }
}

/// Turns CR and LF into spaces in what was just written.
fn clean_in_place(written: &mut [u8]) {
    let mut from = 0;
    while let Some(i) = memchr::memchr2(b'\r', b'\n', &written[from..]) {
        written[from + i] = b' ';
        from += i + 1;
    }
}

/// Formats into a message buffer as is; the caller cleans the result.
struct RawWriter<'a>(&'a mut BytesMut);

impl std::fmt::Write for RawWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.put_slice(s.as_bytes());
        Ok(())
    }
}

impl std::fmt::Write for MessageBuilder {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.buf.put_slice(s.as_bytes());
        Ok(())
    }
}

/// The top Via value with `received` and, when asked for, `rport` filled
/// in. Only the first value of a comma list is touched.
struct StampedVia<'a> {
    field: &'a str,
    source: SocketAddr,
}

impl std::fmt::Display for StampedVia<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let field = self.field;
        let (first, rest) = match grammar::find_top_level(field, b',') {
            Some(i) => (&field[..i], &field[i..]),
            None => (field, ""),
        };
        let (base, params) = match grammar::find_top_level(first, b';') {
            Some(i) => (&first[..i], &first[i..]),
            None => (first, ""),
        };
        f.write_str(base.trim_end())?;
        for p in grammar::params(params) {
            if p.name.eq_ignore_ascii_case("received") {
                continue;
            }
            if p.name.eq_ignore_ascii_case("rport") {
                f.write_str(";rport=")?;
                f.write_str(itoa::Buffer::new().format(self.source.port()))?;
                continue;
            }
            f.write_str(";")?;
            f.write_str(p.name)?;
            if let Some(v) = p.value {
                f.write_str("=")?;
                f.write_str(v)?;
            }
        }
        // The address of a dual-stack socket's IPv4 peer is written as IPv4.
        let ip = match self.source.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(std::net::IpAddr::V4)
                .unwrap_or(self.source.ip()),
            ip => ip,
        };
        f.write_str(";received=")?;
        write_ip(f, ip)?;
        f.write_str(rest)
    }
}

/// Writes an address as Display does, without the formatting machinery
/// (IPv4 is the common case on every response).
pub(crate) fn write_ip(f: &mut impl std::fmt::Write, ip: std::net::IpAddr) -> std::fmt::Result {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().iter().enumerate() {
                if i > 0 {
                    f.write_char('.')?;
                }
                f.write_str(digits.format(*octet))?;
            }
            Ok(())
        }
        v6 => write!(f, "{v6}"),
    }
}

#[cfg(test)]
fn stamp_top_via(field: &str, source: SocketAddr) -> String {
    StampedVia { field, source }.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::Framing;

    #[test]
    fn top_via_gets_received_and_rport() {
        let src: SocketAddr = "203.0.113.5:40123".parse().unwrap();
        assert_eq!(
            stamp_top_via(
                "SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK1;rport, SIP/2.0/UDP p;branch=z9hG4bK2",
                src
            ),
            "SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK1;rport=40123;received=203.0.113.5, SIP/2.0/UDP p;branch=z9hG4bK2"
        );
        assert_eq!(
            stamp_top_via("SIP/2.0/TLS h;received=1.1.1.1;branch=z9hG4bK1", src),
            "SIP/2.0/TLS h;branch=z9hG4bK1;received=203.0.113.5"
        );
        let v6: SocketAddr = "[2001:db8::7]:5060".parse().unwrap();
        assert!(stamp_top_via("SIP/2.0/UDP [2001:db8::7]", v6).ends_with(";received=2001:db8::7"));
    }

    #[test]
    fn bad_request_salvages_what_it_can() {
        let src: SocketAddr = "192.0.2.1:5060".parse().unwrap();
        let raw = b"REGISTER sip:h SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\nFrom: <sip:a@h>;tag=1\r\n\
To: <sip:a@h>\r\nCall-ID: x\r\nCSeq: 1 REGISTER\r\nContent-Length: 99\r\n\r\n";
        let resp = MessageBuilder::error_response_for_raw(
            raw,
            src,
            400,
            "Body Shorter Than Content-Length",
        )
        .unwrap();
        let m = Message::parse(resp, Framing::Datagram).unwrap();
        assert_eq!(m.status(), Some(400));
        assert_eq!(m.reason(), "Body Shorter Than Content-Length");
        assert_eq!(m.call_id(), Some("x"));
        assert_eq!(
            m.top_via().unwrap().param("received"),
            Some(Some("192.0.2.1"))
        );
        // No answer to ACKs, responses, or when headers are missing.
        assert!(
            MessageBuilder::error_response_for_raw(b"ACK sip:h SIP/2.0\r\n\r\n", src, 400, "x")
                .is_none()
        );
        assert!(
            MessageBuilder::error_response_for_raw(b"SIP/2.0 200 OK\r\n\r\n", src, 400, "x")
                .is_none()
        );
        assert!(
            MessageBuilder::error_response_for_raw(
                b"OPTIONS sip:h SIP/2.0\r\nVia: x\r\n\r\n",
                src,
                400,
                "x"
            )
            .is_none()
        );
        assert!(MessageBuilder::error_response_for_raw(&[0xff, 0xfe], src, 400, "x").is_none());
    }

    /// The answer keeps a branch written on a continuation line, survives
    /// bytes that are not UTF-8, and carries a To tag (RFC 3261 §8.2.6.2),
    /// the same for a retransmission.
    #[test]
    fn bad_request_answer_unfolds_tolerates_latin1_and_tags_to() {
        let src: SocketAddr = "192.0.2.1:5060".parse().unwrap();
        let raw =
            b"INVITE sip:h SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060\r\n ;branch=z9hG4bK77\r\n\
From: \"M\xfcller\" <sip:a@h>;tag=1\r\nTo: <sip:b@h>\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n\
Content-Length: 500\r\n\r\n\xff\xfe";
        let answer = || {
            let resp = MessageBuilder::error_response_for_raw(raw, src, 400, "Truncated").unwrap();
            Message::parse(resp, Framing::Datagram).unwrap()
        };
        let m = answer();
        assert_eq!(m.top_via().unwrap().branch(), Some("z9hG4bK77"));
        assert_eq!(m.from().unwrap().tag(), Some("1"));
        let tag = m.to().unwrap().tag().map(str::to_owned);
        assert!(tag.is_some());
        assert_eq!(answer().to().unwrap().tag().map(str::to_owned), tag);
    }
}
