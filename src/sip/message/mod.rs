//! SIP messages (RFC 3261 §7): a lossless, bounded, never-panicking parser
//! that indexes one received buffer, typed views over the headers Parley
//! reads, and a writer for the messages Parley sends.
//!
//! A parsed [`Message`] keeps the bytes it came from and a small index of
//! spans into them; header values are handed out as `&str` slices of that
//! buffer. Folded header lines (RFC 3261 §7.3.1) are unfolded in place by
//! turning the line break into spaces, so every span stays valid.

pub mod builder;
pub mod date;
pub mod grammar;
pub mod header;
pub mod limits;
pub mod typed;
pub mod uri;

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;

pub use builder::MessageBuilder;
pub use header::HeaderName;
use limits::*;
pub use typed::{CSeq, NameAddr, Via};
pub use uri::{Host, Scheme, Uri};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Register,
    Options,
    Info,
    Update,
    Prack,
    Subscribe,
    Notify,
    Refer,
    Message,
    Publish,
    /// An extension method; its name is in the message.
    Other,
}

impl Method {
    pub fn from_token(t: &str) -> Method {
        // Method names are case-sensitive (RFC 3261 §7.1).
        match t {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "REGISTER" => Method::Register,
            "OPTIONS" => Method::Options,
            "INFO" => Method::Info,
            "UPDATE" => Method::Update,
            "PRACK" => Method::Prack,
            "SUBSCRIBE" => Method::Subscribe,
            "NOTIFY" => Method::Notify,
            "REFER" => Method::Refer,
            "MESSAGE" => Method::Message,
            "PUBLISH" => Method::Publish,
            _ => Method::Other,
        }
    }

    /// The method name for known methods; `None` for `Other`.
    pub fn as_str(self) -> Option<&'static str> {
        Some(match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Register => "REGISTER",
            Method::Options => "OPTIONS",
            Method::Info => "INFO",
            Method::Update => "UPDATE",
            Method::Prack => "PRACK",
            Method::Subscribe => "SUBSCRIBE",
            Method::Notify => "NOTIFY",
            Method::Refer => "REFER",
            Method::Message => "MESSAGE",
            Method::Publish => "PUBLISH",
            Method::Other => return None,
        })
    }
}

/// Why a buffer is not a SIP message. The `Display` text doubles as the
/// reason phrase of the `400` sent back when the message can be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    #[error("Empty Message")]
    Empty,
    #[error("Message Too Large")]
    TooLarge,
    #[error("Header Section Too Large")]
    HeadTooLarge,
    #[error("Missing Empty Line After Headers")]
    MissingHeadEnd,
    #[error("Line Too Long")]
    LineTooLong,
    #[error("Too Many Headers")]
    TooManyHeaders,
    #[error("Malformed Start Line")]
    BadStartLine,
    #[error("Version Not Supported")]
    BadVersion,
    #[error("Malformed Header Line")]
    BadHeaderLine,
    #[error("Invalid UTF-8 In Headers")]
    BadEncoding,
    #[error("Control Character In Headers")]
    ControlCharacter,
    #[error("Invalid Content-Length")]
    BadContentLength,
    #[error("Body Shorter Than Content-Length")]
    TruncatedBody,
}

/// Where a message came from decides how its end is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// A datagram: the body runs to Content-Length, or to the end when the
    /// header is absent; bytes past Content-Length are discarded (§18.3).
    Datagram,
    /// A stream: the framer already cut exactly one message using
    /// Content-Length, so the body is the rest of the buffer.
    Stream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn new(start: usize, end: usize) -> Span {
        // Both are below MAX_MESSAGE_BYTES, checked before any span exists.
        Span {
            start: start as u32,
            end: end as u32,
        }
    }

    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
}

#[derive(Debug, Clone, Copy)]
enum StartLine {
    Request {
        method: Method,
        method_span: Span,
        uri: Span,
    },
    Response {
        status: u16,
        reason: Span,
    },
}

#[derive(Debug, Clone, Copy)]
struct Field {
    name: HeaderName,
    name_span: Span,
    value: Span,
}

/// One parsed SIP request or response.
#[derive(Debug, Clone)]
pub struct Message {
    buf: Bytes,
    start: StartLine,
    fields: SmallVec<[Field; 20]>,
    body: Span,
    /// The top Via, parsed once: every layer reads it (validation, the
    /// transaction key, the To tag, the response's Via).
    top_via: Option<TopVia>,
}

#[derive(Debug, Clone, Copy)]
struct TopVia {
    transport: Span,
    sent_by: Span,
    host: HostSpan,
    port: Option<u16>,
    params: Span,
}

#[derive(Debug, Clone, Copy)]
enum HostSpan {
    Name(Span),
    V4(std::net::Ipv4Addr),
    V6(std::net::Ipv6Addr),
}

impl Message {
    /// Parses one message. Never panics; every count and length is bounded
    /// by the constants in [`limits`].
    pub fn parse(buf: Bytes, framing: Framing) -> Result<Message, ParseError> {
        if buf.len() > MAX_MESSAGE_BYTES {
            return Err(ParseError::TooLarge);
        }
        // RFC 3261 §7.5: CRLFs before the start line are ignored.
        let lead = buf
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .ok_or(ParseError::Empty)?;
        let (head_end, body_start) = find_head_end(&buf, lead)?;
        if head_end - lead > MAX_HEAD_BYTES {
            return Err(ParseError::HeadTooLarge);
        }
        let buf = unfold(buf, lead, head_end);
        let (buf, head_end, body_start) = valid_head(buf, lead, head_end, body_start);
        let head =
            std::str::from_utf8(&buf[lead..head_end]).map_err(|_| ParseError::BadEncoding)?;
        if has_control_bytes(head.as_bytes()) {
            return Err(ParseError::ControlCharacter);
        }

        let mut lines = LineIter { s: head, pos: 0 };
        let (first_off, first) = lines.next().ok_or(ParseError::BadStartLine)?;
        let start = parse_start_line(first, lead + first_off)?;

        let mut fields = SmallVec::new();
        for (off, line) in lines {
            if line.len() > MAX_LINE_BYTES {
                return Err(ParseError::LineTooLong);
            }
            if fields.len() == MAX_HEADER_COUNT {
                return Err(ParseError::TooManyHeaders);
            }
            fields.push(parse_header_line(line, lead + off)?);
        }

        let mut msg = Message {
            buf,
            start,
            fields,
            body: Span::default(),
            top_via: None,
        };
        msg.top_via = msg.parse_top_via();
        let available = msg.buf.len() - body_start;
        let body_len = match (msg.content_length()?, framing) {
            (_, Framing::Stream) => available,
            (Some(n), Framing::Datagram) if n > available => return Err(ParseError::TruncatedBody),
            (Some(n), Framing::Datagram) => n,
            (None, Framing::Datagram) => available,
        };
        msg.body = Span::new(body_start, body_start + body_len);
        Ok(msg)
    }

    /// The value of Content-Length, checking that repeated headers agree.
    pub fn content_length(&self) -> Result<Option<usize>, ParseError> {
        let mut found = None;
        for v in self.headers(HeaderName::ContentLength) {
            let n = grammar::parse_decimal_u32(v, MAX_NUMBER_DIGITS)
                .ok_or(ParseError::BadContentLength)? as usize;
            if n > MAX_MESSAGE_BYTES || found.is_some_and(|f| f != n) {
                return Err(ParseError::BadContentLength);
            }
            found = Some(n);
        }
        Ok(found)
    }

    fn text(&self, span: Span) -> &str {
        let bytes = &self.buf[span.range()];
        debug_assert!(std::str::from_utf8(bytes).is_ok());
        // SAFETY: spans are made only in `parse`, only inside the header
        // section, which `parse` validated as UTF-8 before making any, and
        // only at positions found by searching for ASCII bytes (line ends,
        // ':', ' ', tabs), which are always character boundaries. The
        // buffer is immutable (`Bytes`) for the message's whole life.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }

    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    /// The request method, or `None` for a response.
    pub fn method(&self) -> Option<Method> {
        match self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    /// The method name as sent, or "" for a response.
    pub fn method_str(&self) -> &str {
        match self.start {
            StartLine::Request { method_span, .. } => self.text(method_span),
            StartLine::Response { .. } => "",
        }
    }

    /// The Request-URI as sent, or "" for a response.
    pub fn request_uri(&self) -> &str {
        match self.start {
            StartLine::Request { uri, .. } => self.text(uri),
            StartLine::Response { .. } => "",
        }
    }

    /// The status code, or `None` for a request.
    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { status, .. } => Some(status),
            StartLine::Request { .. } => None,
        }
    }

    pub fn reason(&self) -> &str {
        match self.start {
            StartLine::Response { reason, .. } => self.text(reason),
            StartLine::Request { .. } => "",
        }
    }

    /// The value of the first header field with this name.
    pub fn header(&self, name: HeaderName) -> Option<&str> {
        self.headers(name).next()
    }

    /// The whole value of every header field with this name, in order.
    pub fn headers(&self, name: HeaderName) -> impl Iterator<Item = &str> {
        self.fields
            .iter()
            .filter(move |f| f.name == name)
            .map(|f| self.text(f.value))
    }

    /// Every value of a comma-list header, across all its fields, in order
    /// (RFC 3261 §7.3.1 makes `A: x, y` and `A: x` + `A: y` equivalent).
    pub fn header_values(&self, name: HeaderName) -> impl Iterator<Item = &str> {
        let split = name.is_comma_list();
        self.headers(name)
            .flat_map(move |v| {
                if split {
                    grammar::split_top_level(v, b',')
                } else {
                    grammar::unsplit(v)
                }
            })
            .map(grammar::trim_lws)
            .filter(|v| !v.is_empty())
    }

    /// The first header field whose name matches `name` case-insensitively,
    /// for headers Parley has no variant for.
    pub fn header_named(&self, name: &str) -> Option<&str> {
        let known = HeaderName::from_name(name.as_bytes());
        self.fields
            .iter()
            .find(|f| {
                f.name == known
                    && (known != HeaderName::Other
                        || self.text(f.name_span).eq_ignore_ascii_case(name))
            })
            .map(|f| self.text(f.value))
    }

    /// Every header field: its name as sent, the parsed name, and the value.
    pub fn fields(&self) -> impl Iterator<Item = (HeaderName, &str, &str)> {
        self.fields
            .iter()
            .map(|f| (f.name, self.text(f.name_span), self.text(f.value)))
    }

    pub fn body(&self) -> &[u8] {
        &self.buf[self.body.range()]
    }

    /// The buffer the message was parsed from (after unfolding).
    pub fn as_bytes(&self) -> &Bytes {
        &self.buf
    }

    pub fn call_id(&self) -> Option<&str> {
        self.header(HeaderName::CallId)
    }

    pub fn cseq(&self) -> Option<CSeq<'_>> {
        self.header(HeaderName::CSeq).and_then(CSeq::parse)
    }

    pub fn top_via(&self) -> Option<Via<'_>> {
        let v = self.top_via?;
        Some(Via {
            transport: self.text(v.transport),
            sent_by: self.text(v.sent_by),
            host: match v.host {
                HostSpan::Name(s) => Host::Name(self.text(s)),
                HostSpan::V4(a) => Host::V4(a),
                HostSpan::V6(a) => Host::V6(a),
            },
            port: v.port,
            params: self.text(v.params),
        })
    }

    fn parse_top_via(&self) -> Option<TopVia> {
        let via = self
            .header_values(HeaderName::Via)
            .next()
            .and_then(Via::parse)?;
        Some(TopVia {
            transport: self.span_of(via.transport),
            sent_by: self.span_of(via.sent_by),
            host: match via.host {
                Host::Name(n) => HostSpan::Name(self.span_of(n)),
                Host::V4(a) => HostSpan::V4(a),
                Host::V6(a) => HostSpan::V6(a),
            },
            port: via.port,
            params: self.span_of(via.params),
        })
    }

    /// Where a slice of this message's buffer sits in it. Empty slices
    /// (which parsers may make from a literal "") map to an empty span.
    fn span_of(&self, s: &str) -> Span {
        let start = (s.as_ptr() as usize).wrapping_sub(self.buf.as_ptr() as usize);
        if s.is_empty()
            || start
                .checked_add(s.len())
                .is_none_or(|end| end > self.buf.len())
        {
            return Span::default();
        }
        Span::new(start, start + s.len())
    }

    pub fn from(&self) -> Option<NameAddr<'_>> {
        self.header(HeaderName::From).and_then(NameAddr::parse)
    }

    pub fn to(&self) -> Option<NameAddr<'_>> {
        self.header(HeaderName::To).and_then(NameAddr::parse)
    }

    /// Writes the message back in canonical form: the same start line and
    /// header fields (names as sent), and a Content-Length that matches the
    /// body. Parsing the result gives an equal message.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.buf.len() + 32);
        match self.start {
            StartLine::Request {
                method_span, uri, ..
            } => {
                out.extend_from_slice(self.text(method_span).as_bytes());
                out.extend_from_slice(b" ");
                out.extend_from_slice(self.text(uri).as_bytes());
                out.extend_from_slice(b" SIP/2.0\r\n");
            }
            StartLine::Response { status, reason } => {
                out.extend_from_slice(format!("SIP/2.0 {status} ").as_bytes());
                out.extend_from_slice(self.text(reason).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        for (name, raw, value) in self.fields() {
            if name == HeaderName::ContentLength {
                continue;
            }
            out.extend_from_slice(raw.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", self.body().len()).as_bytes());
        out.extend_from_slice(self.body());
        out.freeze()
    }
}

/// Finds the empty line that ends the header section. Returns the end of
/// the last header line (its terminator excluded) and the body's start.
/// Both CRLF and bare LF line ends are accepted, as robust parsers do.
fn find_head_end(buf: &[u8], from: usize) -> Result<(usize, usize), ParseError> {
    let limit = buf.len().min(from + MAX_HEAD_BYTES + 4);
    for i in memchr::memchr_iter(b'\n', &buf[from..limit]).map(|i| i + from) {
        let line_end = if i > from && buf[i - 1] == b'\r' {
            i - 1
        } else {
            i
        };
        match buf.get(i + 1..) {
            Some([b'\n', ..]) => return Ok((line_end, i + 2)),
            Some([b'\r', b'\n', ..]) => return Ok((line_end, i + 3)),
            _ => {}
        }
    }
    if limit < buf.len() {
        Err(ParseError::HeadTooLarge)
    } else {
        Err(ParseError::MissingHeadEnd)
    }
}

/// Turns folded header lines into single lines by overwriting each line
/// break that precedes a space or tab with spaces. The length is unchanged,
/// so the copy is made only when a fold exists.
/// The buffer with its header section made valid UTF-8, and the section's
/// end and the body's start in it. Older phones and gateways put Latin-1
/// in display names and reason phrases (`Müller`, `486 Beschäftigt`): such
/// bytes become U+FFFD instead of costing the whole message.
fn valid_head(
    buf: Bytes,
    lead: usize,
    head_end: usize,
    body_start: usize,
) -> (Bytes, usize, usize) {
    let head = &buf[lead..head_end];
    if std::str::from_utf8(head).is_ok() {
        return (buf, head_end, body_start);
    }
    let text = String::from_utf8_lossy(head);
    let grown = text.len() - head.len();
    let mut owned = BytesMut::with_capacity(buf.len() + grown);
    owned.extend_from_slice(&buf[..lead]);
    owned.extend_from_slice(text.as_bytes());
    owned.extend_from_slice(&buf[head_end..]);
    (owned.freeze(), head_end + grown, body_start + grown)
}

fn unfold(buf: Bytes, start: usize, end: usize) -> Bytes {
    let head = &buf[start..end];
    let folded =
        memchr::memchr_iter(b'\n', head).any(|i| matches!(head.get(i + 1), Some(b' ' | b'\t')));
    if !folded {
        return buf;
    }
    let mut owned = BytesMut::from(&buf[..]);
    for i in start..end.saturating_sub(1) {
        if owned[i] == b'\n' && (owned[i + 1] == b' ' || owned[i + 1] == b'\t') {
            owned[i] = b' ';
            if i > start && owned[i - 1] == b'\r' {
                owned[i - 1] = b' ';
            }
        }
    }
    owned.freeze()
}

/// Lines of the header section with their byte offsets, CR stripped.
struct LineIter<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Iterator for LineIter<'a> {
    type Item = (usize, &'a str);

    fn next(&mut self) -> Option<(usize, &'a str)> {
        if self.pos > self.s.len() {
            return None;
        }
        let rest = &self.s[self.pos..];
        let start = self.pos;
        let (line, advance) = match memchr::memchr(b'\n', rest.as_bytes()) {
            Some(i) => (&rest[..i], i + 1),
            None => (rest, rest.len() + 1),
        };
        self.pos += advance;
        Some((start, line.strip_suffix('\r').unwrap_or(line)))
    }
}

fn parse_start_line(line: &str, off: usize) -> Result<StartLine, ParseError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(ParseError::LineTooLong);
    }
    if let Some(rest) = strip_prefix_ignore_case(line, "SIP/") {
        // Status-Line = SIP-Version SP Status-Code SP Reason-Phrase
        let (version, rest) = rest.split_once(' ').ok_or(ParseError::BadStartLine)?;
        if version != "2.0" {
            return Err(ParseError::BadVersion);
        }
        let (code, _) = rest.split_at_checked(3).ok_or(ParseError::BadStartLine)?;
        let status: u16 = code
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| code.parse().ok())
            .flatten()
            .filter(|s| (100..=699).contains(s))
            .ok_or(ParseError::BadStartLine)?;
        let reason_start = match rest.as_bytes().get(3) {
            None => line.len(),
            Some(b' ') => line.len() - rest.len() + 4,
            Some(_) => return Err(ParseError::BadStartLine),
        };
        return Ok(StartLine::Response {
            status,
            reason: Span::new(off + reason_start, off + line.len()),
        });
    }
    // Request-Line = Method SP Request-URI SP SIP-Version
    let mut parts = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::BadStartLine);
    };
    if !grammar::is_token(method)
        || uri.is_empty()
        || uri.len() > MAX_URI_BYTES
        || !uri.contains(':')
    {
        return Err(ParseError::BadStartLine);
    }
    match strip_prefix_ignore_case(version, "SIP/") {
        Some("2.0") => {}
        Some(_) => return Err(ParseError::BadVersion),
        None => return Err(ParseError::BadStartLine),
    }
    let uri_start = off + method.len() + 1;
    Ok(StartLine::Request {
        method: Method::from_token(method),
        method_span: Span::new(off, off + method.len()),
        uri: Span::new(uri_start, uri_start + uri.len()),
    })
}

fn parse_header_line(line: &str, off: usize) -> Result<Field, ParseError> {
    let colon = line.find(':').ok_or(ParseError::BadHeaderLine)?;
    let raw_name = &line[..colon];
    let name = raw_name.trim_end_matches([' ', '\t']);
    if !grammar::is_token(name) {
        return Err(ParseError::BadHeaderLine);
    }
    let after = &line[colon + 1..];
    let value = grammar::trim_lws(after);
    let value_start = if value.is_empty() {
        off + line.len()
    } else {
        off + colon + 1 + (after.len() - after.trim_start_matches([' ', '\t']).len())
    };
    Ok(Field {
        name: HeaderName::from_name(name.as_bytes()),
        name_span: Span::new(off, off + name.len()),
        value: Span::new(value_start, value_start + value.len()),
    })
}

/// Header text may hold HT and line breaks, but no other control byte, and a
/// CR only as part of CRLF: anything else is a smuggling or injection attempt.
fn has_control_bytes(head: &[u8]) -> bool {
    // Fast pass: is there any byte below 0x20 besides HT, LF, CR, or DEL?
    let suspicious = head.iter().fold(false, |acc, &b| {
        acc | ((b < 0x20) & (b != b'\t') & (b != b'\n') & (b != b'\r')) | (b == 0x7f)
    });
    if !suspicious && memchr::memchr(b'\r', head).is_none() {
        return false;
    }
    if !suspicious {
        // Only CRs to check: each must start a CRLF.
        return memchr::memchr_iter(b'\r', head).any(|i| head.get(i + 1) != Some(&b'\n'));
    }
    head.iter().enumerate().any(|(i, &b)| match b {
        b'\t' | b'\n' => false,
        b'\r' => head.get(i + 1) != Some(&b'\n'),
        0x7f => true,
        _ => b < 0x20,
    })
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests;
