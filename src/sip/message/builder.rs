//! Writes SIP messages straight into one buffer.

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};

use super::{HeaderName, Message};

/// Builds a request or response. Header values are written as given,
/// except that CR and LF become spaces, so no value can start a new header.
pub struct MessageBuilder {
    buf: BytesMut,
}

impl MessageBuilder {
    pub fn request(method: &str, uri: &str) -> MessageBuilder {
        let mut b = MessageBuilder {
            buf: BytesMut::with_capacity(512),
        };
        b.put_clean(method);
        b.buf.put_u8(b' ');
        b.put_clean(uri);
        b.buf.put_slice(b" SIP/2.0\r\n");
        b
    }

    pub fn response(status: u16, reason: &str) -> MessageBuilder {
        let mut b = MessageBuilder {
            buf: BytesMut::with_capacity(512),
        };
        let _ = write!(b, "SIP/2.0 {status} ");
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
        let mut b = MessageBuilder::response(status, reason);
        for (name, _, value) in req.fields() {
            match name {
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
                // RFC 3261 §8.2.6.1: a 100 echoes the request's Timestamp.
                HeaderName::Timestamp if status == 100 => {
                    b.header(name, value);
                }
                _ => {}
            }
        }
        b
    }

    pub fn header(&mut self, name: HeaderName, value: &str) -> &mut MessageBuilder {
        self.header_raw(name.as_str(), value)
    }

    pub fn header_fmt(
        &mut self,
        name: HeaderName,
        value: std::fmt::Arguments<'_>,
    ) -> &mut MessageBuilder {
        match value.as_str() {
            Some(s) => self.header(name, s),
            None => self.header(name, &value.to_string()),
        }
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
        let _ = write!(self, "Content-Length: {}\r\n\r\n", body.len());
        self.buf.put_slice(body);
        self.buf.freeze()
    }

    fn put_clean(&mut self, s: &str) {
        if s.bytes().any(|b| b == b'\r' || b == b'\n') {
            for b in s.bytes() {
                self.buf
                    .put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
            }
        } else {
            self.buf.put_slice(s.as_bytes());
        }
    }
}

impl std::fmt::Write for MessageBuilder {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.buf.put_slice(s.as_bytes());
        Ok(())
    }
}
