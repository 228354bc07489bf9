//! Typed views of the headers Parley acts on. Each borrows from the message
//! and is parsed on demand; unknown parameters stay in the raw text.

use super::Method;
use super::grammar::{self, trim_lws};
use super::limits::MAX_NUMBER_DIGITS;
use super::uri::{self, Host, Uri, UriError};

/// One Via value: `SIP/2.0/TLS host:port;branch=...;rport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via<'a> {
    /// The transport token as sent (`UDP`, `TCP`, `TLS`, `WS`, ...).
    pub transport: &'a str,
    /// `host[:port]` exactly as sent.
    pub sent_by: &'a str,
    pub host: Host<'a>,
    pub port: Option<u16>,
    /// Raw `;name=value` parameters.
    pub params: &'a str,
}

impl<'a> Via<'a> {
    pub fn parse(value: &'a str) -> Option<Via<'a>> {
        let value = trim_lws(value);
        let semi = grammar::find_top_level(value, b';');
        let (proto_and_host, params) = match semi {
            Some(i) => (&value[..i], &value[i..]),
            None => (value, ""),
        };
        // sent-protocol = name SLASH version SLASH transport, where SLASH
        // may carry white space around it (RFC 3261 §25.1).
        let (name, rest) = grammar::split_once_byte(proto_and_host, b'/')?;
        let (version, rest) = grammar::split_once_byte(rest, b'/')?;
        let (name, version, rest) = (trim_lws(name), trim_lws(version), trim_lws(rest));
        if !name.eq_ignore_ascii_case("SIP") || version != "2.0" {
            return None;
        }
        let split = grammar::find_ws(rest)?;
        let transport = &rest[..split];
        let sent_by = trim_lws(&rest[split..]);
        if !grammar::is_token(transport) {
            return None;
        }
        let (host, port) = match uri::split_host_port(sent_by) {
            Ok(hp) => hp,
            // COLON is SWS ":" SWS (RFC 3261 §25.1): `host : port`.
            Err(_) => {
                let (h, p) = sent_by.rsplit_once(':')?;
                let host = uri::Host::parse(trim_lws(h))?;
                (host, Some(uri::parse_port(trim_lws(p))?))
            }
        };
        Some(Via {
            transport,
            sent_by,
            host,
            port,
            params,
        })
    }

    pub fn param(&self, name: &str) -> Option<Option<&'a str>> {
        grammar::param(self.params, name)
    }

    pub fn branch(&self) -> Option<&'a str> {
        self.param("branch").flatten()
    }

    /// True when the branch carries the RFC 3261 magic cookie, so it is
    /// unique and can be used as the transaction key on its own.
    pub fn has_rfc3261_branch(&self) -> bool {
        self.branch().is_some_and(|b| b.starts_with("z9hG4bK"))
    }
}

/// A `name-addr` or `addr-spec` with header parameters, as in From, To,
/// Contact, Route and Record-Route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameAddr<'a> {
    /// The display name as sent (quoted or not), if any.
    pub display: Option<&'a str>,
    /// The URI text, without the angle brackets.
    pub uri: &'a str,
    /// Raw header parameters after the URI (`;tag=...;expires=...`).
    pub params: &'a str,
}

impl<'a> NameAddr<'a> {
    pub fn parse(value: &'a str) -> Option<NameAddr<'a>> {
        let value = trim_lws(value);
        if value.is_empty() {
            return None;
        }
        let (display, after_display) = if value.starts_with('"') {
            let end = quoted_end(value)?;
            (Some(&value[..end]), trim_lws(&value[end..]))
        } else {
            match (
                grammar::find_byte(value, b'<'),
                grammar::find_top_level(value, b';'),
            ) {
                (Some(lt), semi) if semi.is_none_or(|s| lt < s) => {
                    let d = trim_lws(&value[..lt]);
                    (if d.is_empty() { None } else { Some(d) }, &value[lt..])
                }
                _ => (None, value),
            }
        };
        if let Some(inner) = after_display.strip_prefix('<') {
            let close = grammar::find_byte(inner, b'>')?;
            let uri = trim_lws(&inner[..close]);
            let params = trim_lws(&inner[close + 1..]);
            if uri.is_empty() || !(params.is_empty() || params.starts_with(';')) {
                return None;
            }
            Some(NameAddr {
                display,
                uri,
                params,
            })
        } else if display.is_some() {
            // A quoted display name must be followed by <uri>.
            None
        } else {
            // addr-spec: parameters after the URI belong to the header.
            let (uri, params) = match grammar::find_byte(after_display, b';') {
                Some(i) => (&after_display[..i], &after_display[i..]),
                None => (after_display, ""),
            };
            let uri = trim_lws(uri);
            if uri.is_empty() || uri.contains([' ', '\t', '<', '>']) {
                return None;
            }
            Some(NameAddr {
                display: None,
                uri,
                params,
            })
        }
    }

    pub fn param(&self, name: &str) -> Option<Option<&'a str>> {
        grammar::param(self.params, name)
    }

    pub fn tag(&self) -> Option<&'a str> {
        self.param("tag").flatten()
    }

    pub fn sip_uri(&self) -> Result<Uri<'a>, UriError> {
        Uri::parse(self.uri)
    }
}

/// Index just past the closing quote of the quoted-string `s` starts with.
fn quoted_end(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The CSeq header: sequence number and method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CSeq<'a> {
    pub seq: u32,
    pub method: Method,
    pub method_str: &'a str,
}

impl<'a> CSeq<'a> {
    pub fn parse(value: &'a str) -> Option<CSeq<'a>> {
        let value = trim_lws(value);
        let split = grammar::find_ws(value)?;
        let seq = grammar::parse_decimal_u32(&value[..split], MAX_NUMBER_DIGITS)?;
        // RFC 3261 §8.1.1.5: the sequence number must be below 2**31.
        if seq >= 1 << 31 {
            return None;
        }
        let method_str = trim_lws(&value[split..]);
        if !grammar::is_token(method_str) {
            return None;
        }
        Some(CSeq {
            seq,
            method: Method::from_token(method_str),
            method_str,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn via_with_spaces_around_slashes_and_ipv6() {
        let v = Via::parse("SIP / 2.0 / TLS [2001:db8::9]:5061 ;branch=z9hG4bKx;rport").unwrap();
        assert_eq!(v.transport, "TLS");
        assert_eq!(v.host, Host::V6("2001:db8::9".parse().unwrap()));
        assert_eq!(v.port, Some(5061));
        assert_eq!(v.branch(), Some("z9hG4bKx"));
        assert!(v.has_rfc3261_branch());
        assert_eq!(v.param("rport"), Some(None));
    }

    #[test]
    fn via_rejects_junk() {
        assert!(Via::parse("SIP/2.0/UDP").is_none());
        assert!(Via::parse("SIP/3.0/UDP h").is_none());
        assert!(Via::parse("SIP/2.0/UDP h:99999").is_none());
        assert!(Via::parse("HTTP/2.0/UDP h").is_none());
    }

    #[test]
    fn name_addr_forms() {
        let n = NameAddr::parse(r#""Alice \"A\" <x>" <sip:alice@h>;tag=1"#).unwrap();
        assert_eq!(n.display, Some(r#""Alice \"A\" <x>""#));
        assert_eq!(n.uri, "sip:alice@h");
        assert_eq!(n.tag(), Some("1"));

        let n = NameAddr::parse("Bob <sip:bob@h;transport=tcp>;expires=60").unwrap();
        assert_eq!(n.display, Some("Bob"));
        assert_eq!(n.uri, "sip:bob@h;transport=tcp");
        assert_eq!(n.param("expires"), Some(Some("60")));

        let n = NameAddr::parse("sip:carol@h;tag=abc").unwrap();
        assert_eq!(n.display, None);
        assert_eq!(n.uri, "sip:carol@h");
        assert_eq!(n.tag(), Some("abc"));

        let n = NameAddr::parse("<sip:d@h>").unwrap();
        assert_eq!(n.uri, "sip:d@h");
        assert_eq!(n.display, None);

        assert!(NameAddr::parse(r#""unterminated <sip:x@h>"#).is_none());
        assert!(NameAddr::parse("<sip:x@h").is_none());
        assert!(NameAddr::parse(r#""name" sip:x@h"#).is_none());
        assert!(NameAddr::parse("<sip:x@h> junk").is_none());
        assert!(NameAddr::parse("").is_none());
    }

    #[test]
    fn cseq_bounds() {
        let c = CSeq::parse("4711 INVITE").unwrap();
        assert_eq!((c.seq, c.method), (4711, Method::Invite));
        assert_eq!(CSeq::parse("2147483647 FOO").unwrap().method, Method::Other);
        assert!(CSeq::parse("2147483648 INVITE").is_none());
        assert!(CSeq::parse("-1 INVITE").is_none());
        assert!(CSeq::parse("1").is_none());
        assert!(CSeq::parse("1 IN VITE").is_none());
    }
}
