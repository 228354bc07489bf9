//! Framing of SIP over a byte stream (TCP, TLS): RFC 3261 §18.3 says the
//! message ends Content-Length bytes after the empty line; RFC 5626 §3.5.1
//! adds the CRLF keep-alive (a double CRLF ping, a single CRLF pong).
//!
//! Like mini-redis's `Frame::check`, an incomplete frame is not an error: the
//! framer says "need more bytes" and remembers how far it already scanned, so
//! a peer dripping one byte at a time costs linear work, not quadratic.

use bytes::{Bytes, BytesMut};

use super::message::limits::{MAX_HEAD_BYTES, MAX_MESSAGE_BYTES, MAX_NUMBER_DIGITS};
use super::message::{HeaderName, ParseError, grammar};

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One whole message: headers and exactly Content-Length bytes of body.
    Message(Bytes),
    /// A double-CRLF keep-alive ping; answer with a single CRLF.
    Ping,
    /// A lone CRLF (a pong, or padding between messages).
    Pong,
}

/// A framing error is fatal for the connection: the stream cannot be
/// resynchronised. `head` holds what was read of the header section, so a
/// `400` can still be attempted before closing.
#[derive(Debug)]
pub struct FrameError {
    pub kind: ParseError,
    pub head: Bytes,
}

#[derive(Debug, Default)]
pub struct StreamFramer {
    /// How many bytes at the front of the buffer are known to hold no
    /// end of headers yet.
    scanned: usize,
    /// The length of the message at the front, once its header section is
    /// complete and only body bytes are missing (0: not known yet). Kept so
    /// that a body arriving in small pieces does not get its header section
    /// parsed again for every piece.
    expected: usize,
}

impl StreamFramer {
    pub fn new() -> StreamFramer {
        StreamFramer::default()
    }

    /// Takes the next frame off the front of `buf`, if it is all there.
    pub fn next_frame(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if self.expected > 0 {
            if buf.len() < self.expected {
                return Ok(None);
            }
            let total = std::mem::take(&mut self.expected);
            return Ok(Some(Frame::Message(buf.split_to(total).freeze())));
        }
        if self.scanned == 0 {
            if buf.starts_with(b"\r\n\r\n") {
                let _ = buf.split_to(4);
                return Ok(Some(Frame::Ping));
            }
            if buf.starts_with(b"\r\n") {
                // Could be the first half of a ping: wait for the next bytes.
                if buf.len() < 4 && b"\r\n\r\n".starts_with(&buf[..]) {
                    return Ok(None);
                }
                let _ = buf.split_to(2);
                return Ok(Some(Frame::Pong));
            }
            if buf.first() == Some(&b'\n') {
                let _ = buf.split_to(1);
                return Ok(Some(Frame::Pong));
            }
        }
        let Some(body_start) = self.find_head_end(buf) else {
            if buf.len() > MAX_HEAD_BYTES {
                return Err(self.fail(ParseError::HeadTooLarge, buf));
            }
            return Ok(None);
        };
        let content_length = match head_content_length(&buf[..body_start]) {
            Ok(n) => n,
            Err(kind) => return Err(self.fail(kind, buf)),
        };
        let total = body_start.saturating_add(content_length);
        if total > MAX_MESSAGE_BYTES {
            return Err(self.fail(ParseError::TooLarge, buf));
        }
        if buf.len() < total {
            // Headers complete, body not yet: remember how long it will be.
            self.scanned = 0;
            self.expected = total;
            return Ok(None);
        }
        self.scanned = 0;
        Ok(Some(Frame::Message(buf.split_to(total).freeze())))
    }

    /// Index where the body starts, if the empty line is in `buf`.
    fn find_head_end(&mut self, buf: &[u8]) -> Option<usize> {
        let limit = buf.len().min(MAX_HEAD_BYTES + 4);
        let from = self.scanned.min(limit);
        for i in memchr::memchr_iter(b'\n', &buf[from..limit]).map(|i| i + from) {
            match buf.get(i + 1..) {
                Some([b'\n', ..]) => return Some(i + 2),
                Some([b'\r', b'\n', ..]) => return Some(i + 3),
                _ => {}
            }
        }
        // The last two bytes may start a terminator still to come.
        self.scanned = limit.saturating_sub(2);
        None
    }

    fn fail(&mut self, kind: ParseError, buf: &mut BytesMut) -> FrameError {
        self.scanned = 0;
        self.expected = 0;
        let head_len = buf.len().min(MAX_HEAD_BYTES);
        FrameError {
            kind,
            head: buf.split_to(head_len).freeze(),
        }
    }
}

/// Finds Content-Length (or its compact form `l`) in a header section.
/// A missing header means no body; RFC 3261 makes it mandatory on streams,
/// but a bodiless message without it is unambiguous.
fn head_content_length(head: &[u8]) -> Result<usize, ParseError> {
    let mut found: Option<usize> = None;
    let mut lines = head.split(|&b| b == b'\n').skip(1).peekable();
    while let Some(line) = lines.next() {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii_end();
        if HeaderName::from_name(name) != HeaderName::ContentLength {
            continue;
        }
        // The value may go on over folded lines (RFC 3261 §7.3.1).
        let mut value = Vec::with_capacity(8);
        value.extend_from_slice(line[colon + 1..].trim_ascii());
        while let Some(more) = lines.next_if(|l| l.starts_with(b" ") || l.starts_with(b"\t")) {
            value.push(b' ');
            value.extend_from_slice(more.trim_ascii());
        }
        let value = std::str::from_utf8(&value).map_err(|_| ParseError::BadContentLength)?;
        let n = grammar::parse_decimal_u32(value, MAX_NUMBER_DIGITS)
            .ok_or(ParseError::BadContentLength)? as usize;
        if found.is_some_and(|f| f != n) {
            return Err(ParseError::BadContentLength);
        }
        found = Some(n);
    }
    Ok(found.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8], chunk: usize) -> Result<Vec<Frame>, ParseError> {
        let mut framer = StreamFramer::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(f) = framer.next_frame(&mut buf).map_err(|e| e.kind)? {
                out.push(f);
            }
        }
        Ok(out)
    }

    const TWO: &[u8] = b"\r\n\r\nOPTIONS sip:h SIP/2.0\r\nl: 4\r\n\r\nbody\r\nMESSAGE sip:h SIP/2.0\r\nContent-Length: 0\r\n\r\n\r\n";

    /// A Content-Length value on a folded line (RFC 3261 §7.3.1) frames
    /// the message as the parser reads it.
    #[test]
    fn a_folded_content_length_frames_its_body() {
        let input = b"OPTIONS sip:h SIP/2.0\r\nContent-Length:\r\n 4\r\n\r\nbodyOPTIONS";
        let f = frames(input, 5).unwrap();
        assert_eq!(
            f,
            [Frame::Message(Bytes::from_static(
                b"OPTIONS sip:h SIP/2.0\r\nContent-Length:\r\n 4\r\n\r\nbody"
            ))]
        );
        assert_eq!(
            head_content_length(b"X\r\nl: 1\r\n 2\r\n"),
            Err(ParseError::BadContentLength)
        );
    }

    #[test]
    fn frames_by_content_length_whatever_the_chunking() {
        for chunk in [1, 2, 3, 7, 64, 4096] {
            let f = frames(TWO, chunk).unwrap();
            assert_eq!(f.len(), 4, "chunk {chunk}: {f:?}");
            assert_eq!(f[0], Frame::Ping);
            assert_eq!(
                f[1],
                Frame::Message(Bytes::from_static(
                    b"OPTIONS sip:h SIP/2.0\r\nl: 4\r\n\r\nbody"
                ))
            );
            assert_eq!(f[2], Frame::Pong);
            assert_eq!(
                f[3],
                Frame::Message(Bytes::from_static(
                    b"MESSAGE sip:h SIP/2.0\r\nContent-Length: 0\r\n\r\n"
                ))
            );
        }
    }

    #[test]
    fn a_body_in_pieces_is_waited_for_without_reading_the_header_again() {
        let head = b"MESSAGE sip:h SIP/2.0\r\nContent-Length: 10\r\n\r\n";
        let mut framer = StreamFramer::new();
        let mut buf = BytesMut::from(&head[..]);
        assert_eq!(framer.next_frame(&mut buf).unwrap(), None);
        assert_eq!(framer.expected, head.len() + 10);
        // The remembered length decides: the header section is not parsed
        // again for each piece (a peer dripping a body byte by byte would
        // otherwise cost a header parse per byte).
        for b in b"0123456789"[..9].iter() {
            buf.extend_from_slice(&[*b]);
            assert_eq!(framer.next_frame(&mut buf).unwrap(), None);
        }
        buf.extend_from_slice(b"9\r\n\r\n");
        let Some(Frame::Message(m)) = framer.next_frame(&mut buf).unwrap() else {
            panic!("no message");
        };
        assert!(m.ends_with(b"\r\n\r\n0123456789"));
        // What follows is framed afresh: a keep-alive ping here.
        assert_eq!(framer.next_frame(&mut buf).unwrap(), Some(Frame::Ping));
        assert!(buf.is_empty());
    }

    #[test]
    fn a_trailing_crlf_waits_to_see_whether_it_is_a_ping() {
        let mut framer = StreamFramer::new();
        let mut buf = BytesMut::from(&b"\r\n"[..]);
        assert_eq!(framer.next_frame(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"\r\n");
        assert_eq!(framer.next_frame(&mut buf).unwrap(), Some(Frame::Ping));
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_framing_is_fatal() {
        assert_eq!(
            frames(b"OPTIONS sip:h SIP/2.0\r\nContent-Length: x\r\n\r\n", 100).unwrap_err(),
            ParseError::BadContentLength
        );
        assert_eq!(
            frames(
                b"OPTIONS sip:h SIP/2.0\r\nContent-Length: 1\r\nl: 2\r\n\r\nab",
                100
            )
            .unwrap_err(),
            ParseError::BadContentLength
        );
        assert_eq!(
            frames(
                b"OPTIONS sip:h SIP/2.0\r\nContent-Length: 70000\r\n\r\n",
                100
            )
            .unwrap_err(),
            ParseError::TooLarge
        );
        let endless = vec![b'a'; MAX_HEAD_BYTES + 10];
        assert_eq!(
            frames(&endless, 1000).unwrap_err(),
            ParseError::HeadTooLarge
        );
    }
}
