//! HTTP Digest authentication for SIP (RFC 3261 §22, RFC 7616, RFC 8760):
//! challenges, credential parsing, response checking, and stateless nonces.
//!
//! A nonce is `base64url(timestamp ‖ counter ‖ HMAC-SHA-256(key, timestamp ‖ counter)[..16])`.
//! The server keeps no table of issued nonces: the MAC proves Parley made
//! it, the timestamp says whether it is still fresh.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use md5::Md5;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::message::grammar;

/// Longest credential header accepted, and longest single parameter value.
pub const MAX_CREDENTIALS_BYTES: usize = 2048;
pub const MAX_PARAM_VALUE_BYTES: usize = 512;
const MAX_PARAMS: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    /// The token in an `algorithm=` parameter; absent means MD5 (RFC 2617).
    pub fn parse(token: Option<&str>) -> Option<Algorithm> {
        match token {
            None => Some(Algorithm::Md5),
            Some(t) if t.eq_ignore_ascii_case("MD5") => Some(Algorithm::Md5),
            Some(t) if t.eq_ignore_ascii_case("SHA-256") => Some(Algorithm::Sha256),
            Some(_) => None,
        }
    }

    /// Lower-case hex of the hash of the parts joined by `:`.
    pub fn hash_hex(self, parts: &[&[u8]]) -> HexDigest {
        fn run<D: sha2::Digest>(mut d: D, parts: &[&[u8]]) -> HexDigest {
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    d.update(b":");
                }
                d.update(p);
            }
            HexDigest::new(&d.finalize())
        }
        match self {
            Algorithm::Md5 => run(Md5::new(), parts),
            Algorithm::Sha256 => run(Sha256::new(), parts),
        }
    }
}

/// A digest in lower-case hex, kept on the stack (at most SHA-256's 64 digits).
#[derive(Clone, Copy)]
pub struct HexDigest {
    digits: [u8; 64],
    len: u8,
}

impl HexDigest {
    fn new(bytes: &[u8]) -> HexDigest {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut digits = [0u8; 64];
        for (i, &b) in bytes.iter().take(32).enumerate() {
            digits[2 * i] = DIGITS[usize::from(b >> 4)];
            digits[2 * i + 1] = DIGITS[usize::from(b & 0x0f)];
        }
        HexDigest {
            digits,
            len: (bytes.len().min(32) * 2) as u8,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.digits[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::ops::Deref for HexDigest {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for HexDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `H(username:realm:password)`, the only form a SIP secret is stored in.
pub fn ha1(algorithm: Algorithm, username: &str, realm: &str, password: &str) -> String {
    algorithm
        .hash_hex(&[username.as_bytes(), realm.as_bytes(), password.as_bytes()])
        .as_str()
        .to_owned()
}

/// One WWW-Authenticate / Proxy-Authenticate value, written straight into
/// a message with `format_args!("{}", ...)`.
pub struct ChallengeHeader<'a> {
    pub realm: &'a str,
    pub nonce: &'a str,
    pub algorithm: Algorithm,
    pub stale: bool,
}

impl std::fmt::Display for ChallengeHeader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Digest realm=\"")?;
        // Escapes quote and backslash (RFC 3261 quoted-pair), written in
        // runs between them.
        let mut rest = self.realm;
        while let Some(i) = rest.find(['"', '\\']) {
            f.write_str(&rest[..i])?;
            f.write_str("\\")?;
            f.write_str(&rest[i..i + 1])?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)?;
        write!(
            f,
            "\", nonce=\"{}\", algorithm={}, qop=\"auth\"",
            self.nonce,
            self.algorithm.as_str()
        )?;
        if self.stale {
            f.write_str(", stale=true")?;
        }
        Ok(())
    }
}

/// One WWW-Authenticate / Proxy-Authenticate value, as a string.
pub fn challenge(realm: &str, nonce: &str, algorithm: Algorithm, stale: bool) -> String {
    ChallengeHeader {
        realm,
        nonce,
        algorithm,
        stale,
    }
    .to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("credentials too long")]
    TooLong,
    #[error("not Digest credentials")]
    NotDigest,
    #[error("malformed credentials")]
    Malformed,
    #[error("missing {0} parameter")]
    Missing(&'static str),
    #[error("unsupported algorithm")]
    UnsupportedAlgorithm,
    #[error("unsupported qop")]
    UnsupportedQop,
    #[error("uri does not match the Request-URI")]
    UriMismatch,
}

/// Parsed `Authorization` / `Proxy-Authorization` Digest credentials,
/// borrowed from the header unless a value needed unescaping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials<'a> {
    pub username: Cow<'a, str>,
    pub realm: Cow<'a, str>,
    pub nonce: Cow<'a, str>,
    pub uri: Cow<'a, str>,
    pub response: Cow<'a, str>,
    pub algorithm: Algorithm,
    pub cnonce: Cow<'a, str>,
    /// The nonce count, parsed from its 8 hex digits.
    pub nc: u32,
}

impl<'a> Credentials<'a> {
    /// Parses credentials. Only `qop=auth` is accepted: without a qop there
    /// is no nonce count, and so no replay protection.
    pub fn parse(value: &'a str) -> Result<Credentials<'a>, DigestError> {
        if value.len() > MAX_CREDENTIALS_BYTES {
            return Err(DigestError::TooLong);
        }
        let value = grammar::trim_lws(value);
        let (scheme, rest) = value
            .split_once([' ', '\t'])
            .ok_or(DigestError::NotDigest)?;
        if !scheme.eq_ignore_ascii_case("Digest") {
            return Err(DigestError::NotDigest);
        }
        let mut username = None;
        let mut realm = None;
        let mut nonce = None;
        let mut uri = None;
        let mut response = None;
        let mut algorithm = None;
        let mut cnonce = None;
        let mut qop = None;
        let mut nc = None;
        for (i, part) in grammar::split_top_level(rest, b',').enumerate() {
            if i >= MAX_PARAMS {
                return Err(DigestError::Malformed);
            }
            let part = grammar::trim_lws(part);
            if part.is_empty() {
                continue;
            }
            let (name, raw) = grammar::split_once_byte(part, b'=').ok_or(DigestError::Malformed)?;
            let name = grammar::trim_lws(name);
            let raw = grammar::trim_lws(raw);
            if raw.len() > MAX_PARAM_VALUE_BYTES {
                return Err(DigestError::TooLong);
            }
            let v = grammar::unquote(raw).ok_or(DigestError::Malformed)?;
            let slot = match name {
                n if n.eq_ignore_ascii_case("username") => &mut username,
                n if n.eq_ignore_ascii_case("realm") => &mut realm,
                n if n.eq_ignore_ascii_case("nonce") => &mut nonce,
                n if n.eq_ignore_ascii_case("uri") => &mut uri,
                n if n.eq_ignore_ascii_case("response") => &mut response,
                n if n.eq_ignore_ascii_case("algorithm") => &mut algorithm,
                n if n.eq_ignore_ascii_case("cnonce") => &mut cnonce,
                n if n.eq_ignore_ascii_case("qop") => &mut qop,
                n if n.eq_ignore_ascii_case("nc") => &mut nc,
                _ => continue,
            };
            if slot.replace(v).is_some() {
                return Err(DigestError::Malformed);
            }
        }
        let algorithm =
            Algorithm::parse(algorithm.as_deref()).ok_or(DigestError::UnsupportedAlgorithm)?;
        match qop.as_deref() {
            Some(q) if q.eq_ignore_ascii_case("auth") => {}
            _ => return Err(DigestError::UnsupportedQop),
        }
        let nc = nc.ok_or(DigestError::Missing("nc"))?;
        if nc.len() != 8 {
            return Err(DigestError::Malformed);
        }
        let nc = u32::from_str_radix(&nc, 16).map_err(|_| DigestError::Malformed)?;
        Ok(Credentials {
            username: username.ok_or(DigestError::Missing("username"))?,
            realm: realm.ok_or(DigestError::Missing("realm"))?,
            nonce: nonce.ok_or(DigestError::Missing("nonce"))?,
            uri: uri.ok_or(DigestError::Missing("uri"))?,
            response: response.ok_or(DigestError::Missing("response"))?,
            algorithm,
            cnonce: cnonce.ok_or(DigestError::Missing("cnonce"))?,
            nc,
        })
    }

    /// The response a client knowing the password behind `ha1` would send.
    pub fn expected_response(&self, method: &str, ha1: &str) -> HexDigest {
        let ha2 = self
            .algorithm
            .hash_hex(&[method.as_bytes(), self.uri.as_bytes()]);
        let nc = nc_hex(self.nc);
        self.algorithm.hash_hex(&[
            ha1.as_bytes(),
            self.nonce.as_bytes(),
            &nc,
            self.cnonce.as_bytes(),
            b"auth",
            ha2.as_bytes(),
        ])
    }

    /// Checks the response in constant time (hex digits in either case).
    pub fn verify(&self, method: &str, ha1: &str) -> bool {
        let expected = self.expected_response(method, ha1);
        let got = self.response.as_bytes();
        if got.len() != expected.len() {
            return false;
        }
        let mut lowered = [0u8; 64];
        for (d, s) in lowered.iter_mut().zip(got) {
            *d = s.to_ascii_lowercase();
        }
        expected.as_bytes().ct_eq(&lowered[..got.len()]).into()
    }

    /// The same credentials, owning their text.
    pub fn into_owned(self) -> Credentials<'static> {
        Credentials {
            username: Cow::Owned(self.username.into_owned()),
            realm: Cow::Owned(self.realm.into_owned()),
            nonce: Cow::Owned(self.nonce.into_owned()),
            uri: Cow::Owned(self.uri.into_owned()),
            response: Cow::Owned(self.response.into_owned()),
            algorithm: self.algorithm,
            cnonce: Cow::Owned(self.cnonce.into_owned()),
            nc: self.nc,
        }
    }

    /// Builds the header value a client would send (for tests and the load
    /// generator).
    pub fn to_header(&self) -> String {
        format!(
            "Digest username=\"{}\", realm=\"{}\", nonce=\"{}\", uri=\"{}\", response=\"{}\", algorithm={}, cnonce=\"{}\", qop=auth, nc={:08x}",
            self.username,
            self.realm,
            self.nonce,
            self.uri,
            self.response,
            self.algorithm.as_str(),
            self.cnonce,
            self.nc
        )
    }
}

/// A parsed challenge, as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub algorithm: Algorithm,
    pub stale: bool,
}

impl Challenge {
    pub fn parse(value: &str) -> Option<Challenge> {
        let value = grammar::trim_lws(value);
        let (scheme, rest) = value.split_once([' ', '\t'])?;
        if !scheme.eq_ignore_ascii_case("Digest") {
            return None;
        }
        let mut realm = None;
        let mut nonce = None;
        let mut algorithm = None;
        let mut stale = false;
        // Empty list elements are allowed (RFC 7235 §1.2) and skipped, as
        // are elements without a value.
        let parts =
            grammar::split_top_level(rest, b',').filter(|p| !grammar::trim_lws(p).is_empty());
        for part in parts.take(MAX_PARAMS) {
            let Some((name, raw)) = grammar::trim_lws(part).split_once('=') else {
                continue;
            };
            let v = grammar::unquote(raw)?.into_owned();
            match grammar::trim_lws(name).to_ascii_lowercase().as_str() {
                "realm" => realm = Some(v),
                "nonce" => nonce = Some(v),
                "algorithm" => algorithm = Some(v),
                "stale" => stale = v.eq_ignore_ascii_case("true"),
                _ => {}
            }
        }
        Some(Challenge {
            realm: realm?,
            nonce: nonce?,
            algorithm: Algorithm::parse(algorithm.as_deref())?,
            stale,
        })
    }

    /// Answers this challenge (client side).
    pub fn answer(
        &self,
        method: &str,
        uri: &str,
        username: &str,
        password: &str,
        cnonce: &str,
        nc: u32,
    ) -> Credentials<'static> {
        let h = ha1(self.algorithm, username, &self.realm, password);
        self.answer_with_ha1(method, uri, username, &h, cnonce, nc)
            .into_owned()
    }

    /// Answers with a known HA1 (a client that registers often keeps it).
    pub fn answer_with_ha1<'a>(
        &'a self,
        method: &str,
        uri: &'a str,
        username: &'a str,
        ha1: &str,
        cnonce: &'a str,
        nc: u32,
    ) -> Credentials<'a> {
        let mut c = Credentials {
            username: Cow::Borrowed(username),
            realm: Cow::Borrowed(&self.realm),
            nonce: Cow::Borrowed(&self.nonce),
            uri: Cow::Borrowed(uri),
            response: Cow::Borrowed(""),
            algorithm: self.algorithm,
            cnonce: Cow::Borrowed(cnonce),
            nc,
        };
        c.response = Cow::Owned(c.expected_response(method, ha1).as_str().to_owned());
        c
    }
}

/// The nonce count as the 8 lower-case hex digits digest uses.
fn nc_hex(nc: u32) -> [u8; 8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 8];
    for (i, d) in out.iter_mut().enumerate() {
        *d = DIGITS[((nc >> (28 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// What a nonce is worth when it comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceStatus {
    /// Made here for this peer and still valid.
    Fresh(NonceSerial),
    /// Made by this server but too old: ask again with `stale=true`.
    Expired,
    /// Not made by this server for this peer (forged, issued to another
    /// address, or from before a restart).
    Unknown,
}

/// The order in which nonces were issued: issue time, then the issuer's
/// counter. Lets a user of nonce counts refuse, without remembering it, a
/// nonce older than one it had to forget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NonceSerial(u128);

const NONCE_RAW_BYTES: usize = 8 + 4 + 16;
/// Unpadded base64 of the raw nonce.
const NONCE_TEXT_BYTES: usize = (NONCE_RAW_BYTES * 4).div_ceil(3);

/// A nonce as sent, kept on the stack.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Nonce([u8; NONCE_TEXT_BYTES]);

impl Nonce {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::ops::Deref for Nonce {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Nonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Issues and checks stateless nonces.
pub struct NonceIssuer {
    keyed: Hmac<Sha256>,
    lifetime_secs: u64,
    counter: u32,
}

impl NonceIssuer {
    pub fn new(key: [u8; 32], lifetime_secs: u64) -> NonceIssuer {
        NonceIssuer {
            keyed: <Hmac<Sha256> as KeyInit>::new_from_slice(&key)
                .expect("HMAC takes any key length"),
            lifetime_secs,
            counter: 0,
        }
    }

    /// A fresh nonce for a peer. `now_secs` is any count of seconds;
    /// `peer` (its address, say) is bound into the MAC, so the nonce is
    /// only valid from there: whoever presents it has seen our challenge.
    pub fn issue(&mut self, now_secs: u64, peer: &[u8]) -> Nonce {
        self.counter = self.counter.wrapping_add(1);
        let mut raw = [0u8; NONCE_RAW_BYTES];
        raw[..8].copy_from_slice(&now_secs.to_be_bytes());
        raw[8..12].copy_from_slice(&self.counter.to_be_bytes());
        let tag = self.mac(&raw[..12], peer);
        raw[12..].copy_from_slice(&tag);
        let mut text = [0u8; NONCE_TEXT_BYTES];
        let n = URL_SAFE_NO_PAD
            .encode_slice(raw, &mut text)
            .expect("28 bytes encode to 38 characters");
        debug_assert_eq!(n, NONCE_TEXT_BYTES);
        Nonce(text)
    }

    /// Whether `nonce` was issued here, to `peer`, recently enough.
    pub fn check(&self, nonce: &str, now_secs: u64, peer: &[u8]) -> NonceStatus {
        let mut raw = [0u8; NONCE_RAW_BYTES + 3];
        let Ok(NONCE_RAW_BYTES) = URL_SAFE_NO_PAD.decode_slice(nonce.as_bytes(), &mut raw) else {
            return NonceStatus::Unknown;
        };
        let tag = self.mac(&raw[..12], peer);
        if !bool::from(tag.ct_eq(&raw[12..NONCE_RAW_BYTES])) {
            return NonceStatus::Unknown;
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&raw[..8]);
        let issued = u64::from_be_bytes(ts);
        let mut count = [0u8; 4];
        count.copy_from_slice(&raw[8..12]);
        if issued > now_secs || now_secs - issued > self.lifetime_secs {
            NonceStatus::Expired
        } else {
            let serial = (u128::from(issued) << 32) | u128::from(u32::from_be_bytes(count));
            NonceStatus::Fresh(NonceSerial(serial))
        }
    }

    fn mac(&self, data: &[u8], peer: &[u8]) -> [u8; 16] {
        // The keyed state is computed once; each nonce costs two blocks.
        let mut mac = self.keyed.clone();
        mac.update(data);
        mac.update(peer);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc2617_md5_example_with_sip_method() {
        // RFC 2617 §3.5's worked example: same arithmetic, GET method.
        let c = Credentials {
            username: "Mufasa".into(),
            realm: "testrealm@host.com".into(),
            nonce: "dcd98b7102dd2f0e8b11d0f600bfb0c093".into(),
            uri: "/dir/index.html".into(),
            response: "6629fae49393a05397450978507c4ef1".into(),
            algorithm: Algorithm::Md5,
            cnonce: "0a4f113b".into(),
            nc: 1,
        };
        let h = ha1(
            Algorithm::Md5,
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
        );
        assert!(c.verify("GET", &h));
        assert!(!c.verify("POST", &h));
    }

    #[test]
    fn rfc7616_sha256_example() {
        // RFC 7616 §3.9.1, SHA-256 variant.
        let c = Credentials {
            username: "Mufasa".into(),
            realm: "http-auth@example.org".into(),
            nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v".into(),
            uri: "/dir/index.html".into(),
            response: "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1".into(),
            algorithm: Algorithm::Sha256,
            cnonce: "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ".into(),
            nc: 1,
        };
        let h = ha1(
            Algorithm::Sha256,
            "Mufasa",
            "http-auth@example.org",
            "Circle of Life",
        );
        assert!(c.verify("GET", &h));
    }

    #[test]
    fn parses_credentials_and_round_trips() {
        let v = r#"Digest username="100", realm="parley", nonce="abc", uri="sip:pbx;transport=tls", response="0123456789abcdef0123456789abcdef", cnonce="xyz", qop=auth, nc=0000000a"#;
        let c = Credentials::parse(v).unwrap();
        assert_eq!(c.username, "100");
        assert_eq!(c.uri, "sip:pbx;transport=tls");
        assert_eq!(c.algorithm, Algorithm::Md5);
        assert_eq!(c.nc, 10);
        assert_eq!(Credentials::parse(&c.to_header()).unwrap(), c);
    }

    #[test]
    fn refuses_bad_credentials() {
        let ok = r#"Digest username="u", realm="r", nonce="n", uri="sip:h", response="x", cnonce="c", qop=auth, nc=00000001"#;
        assert!(Credentials::parse(ok).is_ok());
        assert_eq!(
            Credentials::parse("Basic dXNlcjpwdw==").unwrap_err(),
            DigestError::NotDigest
        );
        assert_eq!(
            Credentials::parse(&ok.replace("qop=auth", "qop=auth-int")).unwrap_err(),
            DigestError::UnsupportedQop
        );
        assert_eq!(
            Credentials::parse(&ok.replace(", qop=auth", "")).unwrap_err(),
            DigestError::UnsupportedQop
        );
        assert_eq!(
            Credentials::parse(&format!("{ok}, algorithm=SHA-512-256")).unwrap_err(),
            DigestError::UnsupportedAlgorithm
        );
        assert_eq!(
            Credentials::parse(&ok.replace("nc=00000001", "nc=1")).unwrap_err(),
            DigestError::Malformed
        );
        assert_eq!(
            Credentials::parse(&format!("{ok}, username=\"again\"")).unwrap_err(),
            DigestError::Malformed
        );
        assert_eq!(
            Credentials::parse(&ok.replace("username=\"u\", ", "")).unwrap_err(),
            DigestError::Missing("username")
        );
        let long = format!("Digest username=\"{}\"", "a".repeat(MAX_CREDENTIALS_BYTES));
        assert_eq!(Credentials::parse(&long).unwrap_err(), DigestError::TooLong);
    }

    #[test]
    fn challenges_with_empty_or_valueless_elements_are_read() {
        let c = Challenge::parse(r#"Digest realm="r",, nonce="n", qop="auth", bare,"#).unwrap();
        assert_eq!((c.realm.as_str(), c.nonce.as_str()), ("r", "n"));
    }

    #[test]
    fn challenge_answer_verifies_for_both_algorithms() {
        for alg in [Algorithm::Md5, Algorithm::Sha256] {
            let text = challenge("parley \"office\"", "nonce1", alg, true);
            let ch = Challenge::parse(&text).unwrap();
            assert_eq!(ch.realm, "parley \"office\"");
            assert!(ch.stale);
            let creds = ch.answer("REGISTER", "sip:pbx", "100", "secret", "cn", 1);
            let header = creds.to_header();
            let parsed = Credentials::parse(&header).unwrap();
            assert!(parsed.verify("REGISTER", &ha1(alg, "100", "parley \"office\"", "secret")));
            assert!(!parsed.verify("REGISTER", &ha1(alg, "100", "parley \"office\"", "wrong")));
        }
    }

    #[test]
    fn nonces_are_authentic_fresh_then_expired() {
        let mut issuer = NonceIssuer::new([7; 32], 300);
        let peer = b"192.0.2.1";
        let n1 = issuer.issue(1000, peer);
        let n2 = issuer.issue(1000, peer);
        assert_ne!(n1, n2);
        let serial = |status| match status {
            NonceStatus::Fresh(s) => s,
            other => panic!("{other:?}"),
        };
        let s1 = serial(issuer.check(&n1, 1000, peer));
        assert_eq!(issuer.check(&n1, 1300, peer), NonceStatus::Fresh(s1));
        let s2 = serial(issuer.check(&n2, 1000, peer));
        let n3 = issuer.issue(1001, peer);
        let s3 = serial(issuer.check(&n3, 1001, peer));
        assert!(s1 < s2 && s2 < s3, "serials follow the order of issue");
        assert_eq!(issuer.check(&n1, 1301, peer), NonceStatus::Expired);
        assert_eq!(issuer.check(&n1, 999, peer), NonceStatus::Expired);
        assert_eq!(
            issuer.check(&n1, 1000, b"192.0.2.2"),
            NonceStatus::Unknown,
            "bound to its peer"
        );
        let other = NonceIssuer::new([8; 32], 300);
        assert_eq!(other.check(&n1, 1000, peer), NonceStatus::Unknown);
        let mut tampered = n1.as_str().as_bytes().to_vec();
        tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            issuer.check(std::str::from_utf8(&tampered).unwrap(), 1000, peer),
            NonceStatus::Unknown
        );
        assert_eq!(issuer.check("short", 1000, peer), NonceStatus::Unknown);
        assert_eq!(
            issuer.check(&"A".repeat(500), 1000, peer),
            NonceStatus::Unknown
        );
    }
}
