//! SIP and SIPS URIs (RFC 3261 §19.1), parsed as borrowed views.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use smallvec::SmallVec;

use super::grammar;
use super::limits::MAX_URI_BYTES;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Sip,
    Sips,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Sip => "sip",
            Scheme::Sips => "sips",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host<'a> {
    Name(&'a str),
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

impl Host<'_> {
    pub fn ip(&self) -> Option<IpAddr> {
        match *self {
            Host::Name(_) => None,
            Host::V4(a) => Some(IpAddr::V4(a)),
            Host::V6(a) => Some(IpAddr::V6(a)),
        }
    }

    /// Parses a host as it appears in a URI or a Via sent-by: a domain name,
    /// an IPv4 address or a bracketed IPv6 reference.
    pub fn parse(s: &str) -> Option<Host<'_>> {
        if let Some(inner) = s.strip_prefix('[') {
            let inner = inner.strip_suffix(']')?;
            return inner.parse().ok().map(Host::V6);
        }
        if s.is_empty() || s.len() > 253 {
            return None;
        }
        if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return s.parse().ok().map(Host::V4);
        }
        let valid = s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        valid.then_some(Host::Name(s))
    }
}

impl fmt::Display for Host<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::V4(a) => write!(f, "{a}"),
            Host::V6(a) => write!(f, "[{a}]"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("URI longer than {MAX_URI_BYTES} bytes")]
    TooLong,
    #[error("unsupported URI scheme")]
    UnsupportedScheme,
    #[error("malformed URI host")]
    BadHost,
    #[error("malformed URI port")]
    BadPort,
    #[error("malformed URI user part")]
    BadUser,
}

/// A borrowed SIP/SIPS URI. The user part stays percent-encoded, as it was
/// received: comparisons of user parts go through [`Uri::user_eq`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uri<'a> {
    pub scheme: Scheme,
    pub user: Option<&'a str>,
    pub password: Option<&'a str>,
    pub host: Host<'a>,
    pub port: Option<u16>,
    /// Raw `;name=value` parameters, empty when there are none.
    pub params: &'a str,
    /// Raw header part after `?`, empty when there is none.
    pub headers: &'a str,
}

impl<'a> Uri<'a> {
    pub fn parse(s: &'a str) -> Result<Uri<'a>, UriError> {
        let s = grammar::trim_lws(s);
        if s.len() > MAX_URI_BYTES {
            return Err(UriError::TooLong);
        }
        let (scheme, rest) = match grammar::split_once_byte(s, b':') {
            Some((sc, rest)) if sc.eq_ignore_ascii_case("sip") => (Scheme::Sip, rest),
            Some((sc, rest)) if sc.eq_ignore_ascii_case("sips") => (Scheme::Sips, rest),
            _ => return Err(UriError::UnsupportedScheme),
        };
        let (user, password, hostport) = match grammar::find_byte(rest, b'@') {
            Some(at) => {
                let userinfo = &rest[..at];
                let (user, password) = match grammar::split_once_byte(userinfo, b':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (userinfo, None),
                };
                if user.is_empty() || !user.bytes().all(is_user_byte) {
                    return Err(UriError::BadUser);
                }
                (Some(user), password, &rest[at + 1..])
            }
            None => (None, None, rest),
        };
        let (hostport, headers) = match grammar::split_once_byte(hostport, b'?') {
            Some((h, hd)) => (h, hd),
            None => (hostport, ""),
        };
        let (hostport, params) = match grammar::find_byte(hostport, b';') {
            Some(i) => (&hostport[..i], &hostport[i..]),
            None => (hostport, ""),
        };
        let (host, port) = split_host_port(hostport)?;
        Ok(Uri {
            scheme,
            user,
            password,
            host,
            port,
            params,
            headers,
        })
    }

    pub fn param(&self, name: &str) -> Option<Option<&'a str>> {
        grammar::param(self.params, name)
    }

    /// The `transport` URI parameter, lower-cased by comparison only.
    pub fn transport_param(&self) -> Option<&'a str> {
        self.param("transport").flatten()
    }

    /// Compares the user part with `other` after percent-decoding both,
    /// as RFC 3261 §19.1.4 asks.
    pub fn user_eq(&self, other: &str) -> bool {
        match self.user {
            Some(u) => percent_decoded_eq(u, other),
            None => false,
        }
    }

    /// URI equality of RFC 3261 §19.1.4: user and password compared
    /// byte for byte after unescaping, host and parameters without regard
    /// to case, a port or a `transport`, `user`, `ttl`, `method` or `maddr`
    /// parameter in one URI only never matching, other parameters that
    /// appear in one URI only ignored, headers compared as a whole.
    pub fn equivalent(&self, other: &Uri<'_>) -> bool {
        self.scheme == other.scheme
            && opt_eq(self.user, other.user, |a, b| decode(a) == decode(b))
            && opt_eq(self.password, other.password, |a, b| decode(a) == decode(b))
            && host_eq(&self.host, &other.host)
            && self.port == other.port
            && params_match(self.params, other.params)
            && params_match(other.params, self.params)
            && header_set(self.headers) == header_set(other.headers)
    }

    /// Whether both name the same target: user (unescaped) and host,
    /// whatever the scheme, port and parameters.
    pub fn same_target(&self, other: &Uri<'_>) -> bool {
        opt_eq(self.user, other.user, |a, b| decode(a) == decode(b))
            && host_eq(&self.host, &other.host)
    }
}

impl fmt::Display for Uri<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.scheme.as_str())?;
        f.write_str(":")?;
        if let Some(u) = self.user {
            f.write_str(u)?;
            if let Some(p) = self.password {
                write!(f, ":{p}")?;
            }
            f.write_str("@")?;
        }
        write!(f, "{}", self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        f.write_str(self.params)?;
        if !self.headers.is_empty() {
            write!(f, "?{}", self.headers)?;
        }
        Ok(())
    }
}

/// Splits `host[:port]`, where host may be a bracketed IPv6 reference.
pub fn split_host_port(s: &str) -> Result<(Host<'_>, Option<u16>), UriError> {
    let (host, port) = if s.starts_with('[') {
        let close = grammar::find_byte(s, b']').ok_or(UriError::BadHost)?;
        let after = &s[close + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(UriError::BadHost),
        };
        (&s[..=close], port)
    } else {
        match grammar::split_once_byte(s, b':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let host = Host::parse(host).ok_or(UriError::BadHost)?;
    let port = match port {
        Some(p) => Some(parse_port(p).ok_or(UriError::BadPort)?),
        None => None,
    };
    Ok((host, port))
}

pub fn parse_port(p: &str) -> Option<u16> {
    grammar::parse_decimal_u32(p, 5)
        .and_then(|n| u16::try_from(n).ok())
        .filter(|&n| n != 0)
}

fn is_user_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.!~*'()%&=+$,;?/".contains(&b)
}

/// URI parameters that, present in one URI only, make two URIs differ
/// (RFC 3261 §19.1.4); any other parameter is compared only when both
/// URIs carry it.
const SIGNIFICANT_PARAMS: [&str; 5] = ["transport", "user", "ttl", "method", "maddr"];

fn is_significant_param(name: &str) -> bool {
    SIGNIFICANT_PARAMS
        .iter()
        .any(|s| s.eq_ignore_ascii_case(name))
}

fn opt_eq(a: Option<&str>, b: Option<&str>, eq: impl Fn(&str, &str) -> bool) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => eq(a, b),
        _ => false,
    }
}

fn host_eq(a: &Host<'_>, b: &Host<'_>) -> bool {
    match (a, b) {
        (Host::Name(a), Host::Name(b)) => a.eq_ignore_ascii_case(b),
        (a, b) => a == b,
    }
}

/// Every parameter of `a` either absent from `b` (and not significant) or
/// present there with the same value, compared without regard to case.
fn params_match(a: &str, b: &str) -> bool {
    grammar::params(a).all(|pa| match grammar::param(b, pa.name) {
        None => !is_significant_param(pa.name),
        Some(vb) => opt_eq(pa.value, vb, |x, y| {
            decode(x).eq_ignore_ascii_case(&decode(y))
        }),
    })
}

/// The `?name=value&...` headers of a URI as a sorted set, names in lower
/// case, both unescaped.
fn header_set(headers: &str) -> SmallVec<[(Vec<u8>, Vec<u8>); 1]> {
    let mut set: SmallVec<[(Vec<u8>, Vec<u8>); 1]> = headers
        .split('&')
        .filter(|h| !h.is_empty())
        .map(|h| {
            let (n, v) = h.split_once('=').unwrap_or((h, ""));
            (decode(n).to_ascii_lowercase(), decode(v).into_owned())
        })
        .collect();
    set.sort();
    set
}

/// Undoes `%XX` escapes; an escape that is not one stays as it is.
fn decode(s: &str) -> Cow<'_, [u8]> {
    if !s.contains('%') {
        return Cow::Borrowed(s.as_bytes());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes.get(i + 1..i + 3) {
            Some(&[h, l]) if bytes[i] == b'%' && h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => {
                out.push((hex_value(h) << 4) | hex_value(l));
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

fn percent_decoded_eq(encoded: &str, plain: &str) -> bool {
    let mut want = plain.bytes();
    let bytes = encoded.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = if bytes[i] == b'%' {
            match bytes.get(i + 1..i + 3) {
                Some(&[h, l]) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => {
                    i += 3;
                    (hex_value(h) << 4) | hex_value(l)
                }
                _ => return false,
            }
        } else {
            i += 1;
            bytes[i - 1]
        };
        if want.next() != Some(b) {
            return false;
        }
    }
    want.next().is_none()
}

fn hex_value(h: u8) -> u8 {
    match h {
        b'0'..=b'9' => h - b'0',
        b'a'..=b'f' => h - b'a' + 10,
        _ => h.to_ascii_lowercase().wrapping_sub(b'a').wrapping_add(10),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_uri() {
        let u =
            Uri::parse("sips:alice:secret@example.com:5061;transport=tls;lr?subject=x").unwrap();
        assert_eq!(u.scheme, Scheme::Sips);
        assert_eq!(u.user, Some("alice"));
        assert_eq!(u.password, Some("secret"));
        assert_eq!(u.host, Host::Name("example.com"));
        assert_eq!(u.port, Some(5061));
        assert_eq!(u.transport_param(), Some("tls"));
        assert_eq!(u.param("lr"), Some(None));
        assert_eq!(u.headers, "subject=x");
        assert_eq!(
            u.to_string(),
            "sips:alice:secret@example.com:5061;transport=tls;lr?subject=x"
        );
    }

    #[test]
    fn parses_ipv6_reference() {
        let u = Uri::parse("sip:100@[2001:db8::1]:5070;transport=tcp").unwrap();
        assert_eq!(u.host, Host::V6("2001:db8::1".parse().unwrap()));
        assert_eq!(u.port, Some(5070));
        assert_eq!(u.to_string(), "sip:100@[2001:db8::1]:5070;transport=tcp");
        let u = Uri::parse("sip:[::1]").unwrap();
        assert_eq!(u.host, Host::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(u.port, None);
    }

    /// The examples of RFC 3261 §19.1.4, and its note that equality is
    /// not transitive.
    #[test]
    fn compares_uris_as_rfc_3261_does() {
        let same = [
            (
                "sip:%61lice@atlanta.com;transport=TCP",
                "sip:alice@AtLanTa.CoM;Transport=tcp",
            ),
            ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
            ("sip:carol@chicago.com", "sip:carol@chicago.com;security=on"),
            (
                "sip:carol@chicago.com;newparam=5",
                "sip:carol@chicago.com;security=on",
            ),
            (
                "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
                "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com",
            ),
            (
                "sip:alice@atlanta.com?subject=project%20x&priority=urgent",
                "sip:alice@atlanta.com?priority=urgent&subject=project%20x",
            ),
            ("sip:100@[2001:db8::1]:5070", "sip:100@[2001:DB8:0::1]:5070"),
        ];
        for (a, b) in same {
            let (ua, ub) = (Uri::parse(a).unwrap(), Uri::parse(b).unwrap());
            assert!(ua.equivalent(&ub) && ub.equivalent(&ua), "{a} = {b}");
        }
        let different = [
            (
                "SIP:ALICE@AtLanTa.CoM;Transport=udp",
                "sip:alice@AtLanTa.CoM;Transport=UDP",
            ),
            ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),
            ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),
            (
                "sip:bob@biloxi.com",
                "sip:bob@biloxi.com:6000;transport=tcp",
            ),
            (
                "sip:carol@chicago.com",
                "sip:carol@chicago.com?Subject=next%20meeting",
            ),
            ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),
            (
                "sip:carol@chicago.com;security=on",
                "sip:carol@chicago.com;security=off",
            ),
            ("sip:bob@biloxi.com", "sips:bob@biloxi.com"),
            ("sip:bob:a@biloxi.com", "sip:bob@biloxi.com"),
        ];
        for (a, b) in different {
            let (ua, ub) = (Uri::parse(a).unwrap(), Uri::parse(b).unwrap());
            assert!(!ua.equivalent(&ub) && !ub.equivalent(&ua), "{a} != {b}");
        }
    }

    #[test]
    fn rejects_bad_uris() {
        assert_eq!(
            Uri::parse("http://x").unwrap_err(),
            UriError::UnsupportedScheme
        );
        assert_eq!(Uri::parse("sip:a@").unwrap_err(), UriError::BadHost);
        assert_eq!(Uri::parse("sip:a@h:70000").unwrap_err(), UriError::BadPort);
        assert_eq!(Uri::parse("sip:a@h:0").unwrap_err(), UriError::BadPort);
        assert_eq!(Uri::parse("sip:a@[::1").unwrap_err(), UriError::BadHost);
        assert_eq!(Uri::parse("sip:a@[::1]x").unwrap_err(), UriError::BadHost);
        assert_eq!(Uri::parse("sip:a b@h").unwrap_err(), UriError::BadUser);
        assert_eq!(Uri::parse("sip:a@ho st").unwrap_err(), UriError::BadHost);
        assert_eq!(
            Uri::parse("sip:a@1.2.3.999").unwrap_err(),
            UriError::BadHost
        );
    }

    #[test]
    fn user_comparison_decodes_escapes() {
        let u = Uri::parse("sip:%61lice@h").unwrap();
        assert!(u.user_eq("alice"));
        assert!(!u.user_eq("alic"));
        assert!(!u.user_eq("alicee"));
        let u = Uri::parse("sip:a%4@h").unwrap();
        assert!(!u.user_eq("a%4"));
    }
}
