//! Digest authentication of requests from extensions (REGISTER now, INVITE
//! later): which challenge to send, and whether credentials hold.
//!
//! Known and unknown extensions take the same path and get the same
//! answers: an unknown name is checked against a made-up HA1, so neither
//! the response nor the work done tells them apart.
//!
//! Replays are caught by the nonce count. Only nonces that have already
//! authenticated someone are remembered, a few per extension, so the table
//! is bounded by the number of extensions, not by what strangers send.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use smallvec::SmallVec;

use super::directory::{Directory, Extension};
use crate::sip::digest::{
    Algorithm, ChallengeHeader, Credentials, DigestError, Nonce, NonceIssuer, NonceSerial,
    NonceStatus,
};
use crate::sip::message::{HeaderName, Message, Uri};

/// Nonces remembered per extension for nonce-count checks. A phone that
/// comes back with a nonce forgotten here, or with any nonce issued before
/// it, is asked again (`stale=true`).
pub const NONCES_PER_EXTENSION: usize = 8;

#[derive(Debug)]
pub enum AuthResult {
    /// The credentials hold for this extension.
    Authenticated(Arc<Extension>),
    /// No credentials for our realm: send a challenge.
    Challenge,
    /// A nonce not ours (a restart, or forged), whatever the password; or
    /// the right password with a nonce too old or already used with this
    /// count: challenge with `stale=true`.
    Stale,
    /// Wrong password or unknown user, with a nonce we issued to this
    /// source address: the failure counts toward a lockout.
    Failed { username: String },
    /// Credentials that name another user than the extension the request
    /// is for (refused without checking the password).
    WrongUser { username: String },
    /// Credentials that do not parse.
    Malformed(DigestError),
}

/// The nonce counts of one extension: the last count seen for each of its
/// recently used nonces, and the newest nonce it had to forget. A nonce
/// issued no later than that one and not remembered may have been used
/// already, so it is refused; the table stays bounded without letting a
/// forgotten nonce be replayed.
#[derive(Default)]
struct NonceCounts {
    /// (nonce, last count). A nonce that passed its MAC check is known by
    /// its serial alone: no two nonces of one issuer share one.
    recent: SmallVec<[(NonceSerial, u32); NONCES_PER_EXTENSION]>,
    forgotten_up_to: Option<NonceSerial>,
}

/// An address as nonce binding: IPv4 and IPv4-mapped IPv6 alike.
fn peer_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Whether the digest `uri` names the Request-URI's resource: the same
/// user and host (or the same text, for other schemes). The check is there
/// so an answer computed for one target (the number dialed) cannot be
/// offered for another; port and parameters are left out, since clients
/// differ in how they copy them into `uri` (some drop the port and
/// `;transport=`).
fn digest_uri_matches(digest_uri: &str, request_uri: &str) -> bool {
    match (Uri::parse(digest_uri), Uri::parse(request_uri)) {
        (Ok(d), Ok(r)) => d.same_target(&r),
        _ => digest_uri == request_uri,
    }
}

/// The challenges of one 401 or 407, to write as one header each.
pub struct Challenges<'a> {
    realm: &'a str,
    nonce: Nonce,
    stale: bool,
    md5_only: bool,
}

impl Challenges<'_> {
    pub fn headers(&self) -> impl Iterator<Item = ChallengeHeader<'_>> {
        let algorithms: &[Algorithm] = if self.md5_only {
            &[Algorithm::Md5]
        } else {
            &[Algorithm::Sha256, Algorithm::Md5]
        };
        algorithms.iter().map(|&algorithm| ChallengeHeader {
            realm: self.realm,
            nonce: self.nonce.as_str(),
            algorithm,
            stale: self.stale,
        })
    }

    /// The header values as strings (for tests).
    pub fn to_strings(&self) -> Vec<String> {
        self.headers().map(|h| h.to_string()).collect()
    }
}

pub struct Authenticator {
    realm: String,
    nonces: NonceIssuer,
    /// Keyed state for made-up HA1 values of unknown users.
    dummy_key: Hmac<Sha256>,
    seen: HashMap<Box<str>, NonceCounts>,
    /// User-Agent prefixes that get an MD5-only challenge.
    md5_only_agents: Vec<String>,
}

impl Authenticator {
    pub fn new(
        realm: String,
        nonce_key: [u8; 32],
        dummy_key: [u8; 32],
        nonce_lifetime_secs: u64,
    ) -> Authenticator {
        Authenticator {
            realm,
            nonces: NonceIssuer::new(nonce_key, nonce_lifetime_secs),
            dummy_key: <Hmac<Sha256> as KeyInit>::new_from_slice(&dummy_key)
                .expect("HMAC takes any key length"),
            seen: HashMap::new(),
            md5_only_agents: Vec::new(),
        }
    }

    /// Some clients abandon the whole 401 when any challenge in it is not
    /// MD5 (baresip 1.x, through libre 1.x), instead of picking the one they
    /// know. Requests whose User-Agent starts with one of these prefixes
    /// are challenged with MD5 alone.
    pub fn set_md5_only_agents(&mut self, prefixes: Vec<String>) {
        self.md5_only_agents = prefixes;
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// A challenge: SHA-256 first, then MD5, one header each (RFC 8760
    /// §2.4), sharing one fresh nonce.
    pub fn challenges(
        &mut self,
        now_secs: u64,
        source: IpAddr,
        stale: bool,
        user_agent: Option<&str>,
    ) -> Challenges<'_> {
        let nonce = self.nonces.issue(now_secs, &peer_bytes(source));
        let md5_only = user_agent.is_some_and(|ua| {
            self.md5_only_agents
                .iter()
                .any(|p| ua.starts_with(p.as_str()))
        });
        Challenges {
            realm: &self.realm,
            nonce,
            stale,
            md5_only,
        }
    }

    /// Checks the credentials in `header` of a request for `aor_user`.
    pub fn check(
        &mut self,
        now_secs: u64,
        source: IpAddr,
        msg: &Message,
        header: HeaderName,
        aor_user: &str,
        directory: &Directory,
    ) -> AuthResult {
        let mut parse_error = None;
        let mut creds = None;
        for value in msg.headers(header) {
            match Credentials::parse(value) {
                Ok(c) if c.realm == self.realm => {
                    creds = Some(c);
                    break;
                }
                Ok(_) => {}
                Err(DigestError::NotDigest) => {}
                Err(e) => parse_error = Some(e),
            }
        }
        let Some(creds) = creds else {
            return match parse_error {
                Some(e) => AuthResult::Malformed(e),
                None => AuthResult::Challenge,
            };
        };
        // The response was computed over `uri`: it must name the resource
        // asked for (RFC 3261 §22.4, RFC 7616 §3.4.6), or an answer for one
        // request could be offered for another.
        if !digest_uri_matches(&creds.uri, msg.request_uri()) {
            return AuthResult::Malformed(DigestError::UriMismatch);
        }
        // Credentials must name the extension they are for. Decided before
        // any check of the password, so the answer says nothing about it.
        if creds.username != aor_user {
            return AuthResult::WrongUser {
                username: creds.username.into_owned(),
            };
        }
        let fresh = match self
            .nonces
            .check(&creds.nonce, now_secs, &peer_bytes(source))
        {
            NonceStatus::Fresh(serial) => Some(serial),
            NonceStatus::Expired => None,
            // Not a nonce we issued to this address: from before a restart,
            // or forged. A fresh challenge with `stale=true` lets a phone
            // retry without asking its user, whatever the password was:
            // answering by the password here would let anyone test
            // passwords with made-up nonces, unseen by the lockout (such
            // failures cannot count, since a forged UDP source must not
            // lock out the address it claims).
            NonceStatus::Unknown => return AuthResult::Stale,
        };
        let method = msg.method_str();
        let ext = directory
            .get(&creds.username)
            .filter(|e| e.realm == self.realm);
        let ok = match ext {
            Some(ext) => creds.verify(method, ext.ha1(creds.algorithm)),
            None => {
                // Same work as for a known name, and always false.
                let dummy = self.dummy_ha1(&creds.username, creds.algorithm);
                let _ = creds.verify(method, &dummy);
                false
            }
        };
        let Some(ext) = ext.filter(|_| ok) else {
            // The nonce was issued to this address (fresh or expired), so
            // the sender can receive there: the failure counts.
            return AuthResult::Failed {
                username: creds.username.into_owned(),
            };
        };
        let Some(serial) = fresh else {
            return AuthResult::Stale;
        };
        if !self.note_nonce_count(&ext.number, serial, creds.nc) {
            tracing::info!(extension = %ext.number, nc = creds.nc, "replayed nonce count refused");
            return AuthResult::Stale;
        }
        AuthResult::Authenticated(ext.clone())
    }

    /// Records `nc` for this nonce; false if it is not above the last one,
    /// or if the nonce is not remembered and may have been forgotten.
    fn note_nonce_count(&mut self, extension: &str, serial: NonceSerial, nc: u32) -> bool {
        if !self.seen.contains_key(extension) {
            self.seen.insert(extension.into(), NonceCounts::default());
        }
        let counts = self.seen.get_mut(extension).expect("just inserted");
        if let Some(entry) = counts.recent.iter_mut().find(|(s, _)| *s == serial) {
            if nc <= entry.1 {
                return false;
            }
            entry.1 = nc;
            return true;
        }
        if counts.forgotten_up_to.is_some_and(|f| serial <= f) {
            return false;
        }
        counts.recent.push((serial, nc));
        if counts.recent.len() > NONCES_PER_EXTENSION {
            // The oldest goes, so every nonce still remembered is newer
            // than every one forgotten.
            let oldest = (0..counts.recent.len())
                .min_by_key(|&i| counts.recent[i].0)
                .expect("not empty");
            let (gone, _) = counts.recent.remove(oldest);
            counts.forgotten_up_to = Some(counts.forgotten_up_to.map_or(gone, |f| f.max(gone)));
        }
        true
    }

    /// Forgets nonce counts for extensions that no longer exist.
    pub fn retain_extensions(&mut self, directory: &Directory) {
        self.seen.retain(|ext, _| directory.get(ext).is_some());
    }

    fn dummy_ha1(&self, username: &str, algorithm: Algorithm) -> String {
        let mut mac = self.dummy_key.clone();
        mac.update(username.as_bytes());
        let bytes = mac.finalize().into_bytes();
        let hex = hex::encode(bytes);
        match algorithm {
            Algorithm::Md5 => hex[..32].to_owned(),
            Algorithm::Sha256 => hex,
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::pbx::policy::EncryptionPolicy;
    use crate::sip::digest::{Challenge, ha1};
    use crate::sip::message::Framing;

    const REALM: &str = "parley.test";
    const SRC: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    fn directory() -> Directory {
        Directory::new([ext("100", "pw100"), ext("101", "pw101")])
    }

    fn ext(number: &str, password: &str) -> Extension {
        Extension {
            number: number.into(),
            name: None,
            realm: REALM.into(),
            ha1_md5: ha1(Algorithm::Md5, number, REALM, password),
            ha1_sha256: ha1(Algorithm::Sha256, number, REALM, password),
            encryption: EncryptionPolicy::default(),
        }
    }

    fn register(auth: Option<&str>) -> Message {
        let mut text = String::from(
            "REGISTER sip:parley.test SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\
             From: <sip:100@parley.test>;tag=1\r\nTo: <sip:100@parley.test>\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\n",
        );
        if let Some(a) = auth {
            text.push_str(&format!("Authorization: {a}\r\n"));
        }
        text.push_str("Content-Length: 0\r\n\r\n");
        Message::parse(Bytes::from(text), Framing::Datagram).unwrap()
    }

    fn answer(auth: &mut Authenticator, alg_index: usize, user: &str, pw: &str, nc: u32) -> String {
        let ch = auth.challenges(100, SRC, false, None).to_strings();
        let c = Challenge::parse(&ch[alg_index]).unwrap();
        c.answer("REGISTER", "sip:parley.test", user, pw, "cn", nc)
            .to_header()
    }

    /// A REGISTER for `aor` with `auth` as its Authorization, checked
    /// against the test directory.
    fn check_register(
        a: &mut Authenticator,
        now: u64,
        source: IpAddr,
        auth: Option<&str>,
        aor: &str,
    ) -> AuthResult {
        a.check(
            now,
            source,
            &register(auth),
            HeaderName::Authorization,
            aor,
            &directory(),
        )
    }

    fn authenticator() -> Authenticator {
        Authenticator::new(REALM.into(), [1; 32], [2; 32], 300)
    }

    #[test]
    fn both_algorithms_offered_sha256_first_md5_only_for_listed_agents() {
        let mut a = authenticator();
        let ch = a
            .challenges(100, SRC, false, Some("Yealink SIP-T46U"))
            .to_strings();
        assert_eq!(ch.len(), 2);
        assert!(ch[0].contains("algorithm=SHA-256"));
        assert!(ch[1].contains("algorithm=MD5"));
        a.set_md5_only_agents(vec!["baresip v1.".into()]);
        let ch = a
            .challenges(100, SRC, true, Some("baresip v1.0.0 (x86_64/linux)"))
            .to_strings();
        assert_eq!(ch.len(), 1);
        assert!(ch[0].contains("algorithm=MD5") && ch[0].contains("stale=true"));
    }

    #[test]
    fn good_credentials_pass_with_either_algorithm() {
        for idx in [0, 1] {
            let mut a = authenticator();
            let h = answer(&mut a, idx, "100", "pw100", 1);
            match check_register(&mut a, 100, SRC, Some(&h), "100") {
                AuthResult::Authenticated(e) => assert_eq!(e.number, "100"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn wrong_password_and_unknown_user_look_the_same() {
        let mut a = authenticator();
        let wrong = answer(&mut a, 0, "100", "nope", 1);
        let unknown = answer(&mut a, 0, "555", "nope", 1);
        let r1 = check_register(&mut a, 100, SRC, Some(&wrong), "100");
        let r2 = check_register(&mut a, 100, SRC, Some(&unknown), "555");
        assert!(matches!(r1, AuthResult::Failed { ref username } if username == "100"));
        assert!(matches!(r2, AuthResult::Failed { ref username } if username == "555"));
    }

    #[test]
    fn missing_or_foreign_realm_credentials_get_a_challenge() {
        let mut a = authenticator();
        assert!(matches!(
            check_register(&mut a, 100, SRC, None, "100"),
            AuthResult::Challenge
        ));
        let foreign = answer(&mut a, 1, "100", "pw100", 1).replace(REALM, "elsewhere");
        assert!(matches!(
            check_register(&mut a, 100, SRC, Some(&foreign), "100"),
            AuthResult::Challenge
        ));
        assert!(matches!(
            check_register(&mut a, 100, SRC, Some("Digest username=\"100\""), "100"),
            AuthResult::Malformed(_)
        ));
    }

    /// The digest uri must name the Request-URI's target (`sip:parley.test`):
    /// its user and host; case, port and parameters may differ.
    #[test]
    fn digest_uri_must_match_the_request_uri() {
        let mut a = authenticator();
        let ch = a.challenges(100, SRC, false, None).to_strings();
        let c = Challenge::parse(&ch[1]).unwrap();
        for (nc, uri, ok) in [
            (1, "sip:PARLEY.test", true),
            (2, "sip:parley.test;ob", true),
            (6, "sips:parley.test;transport=tls", true),
            (3, "sip:elsewhere.test", false),
            (7, "sip:parley.test:5061", true),
            (4, "sip:parley.example", false),
            (5, "sip:100@parley.test", false),
        ] {
            let h = c
                .answer("REGISTER", uri, "100", "pw100", "cn", nc)
                .to_header();
            let r = check_register(&mut a, 100, SRC, Some(&h), "100");
            if ok {
                assert!(matches!(r, AuthResult::Authenticated(_)), "{uri}: {r:?}");
            } else {
                assert!(
                    matches!(r, AuthResult::Malformed(DigestError::UriMismatch)),
                    "{uri}: {r:?}"
                );
            }
        }
    }

    #[test]
    fn expired_or_foreign_nonce_with_right_password_is_stale() {
        let mut a = authenticator();
        let h = answer(&mut a, 0, "100", "pw100", 1);
        assert!(matches!(
            check_register(&mut a, 100 + 301, SRC, Some(&h), "100"),
            AuthResult::Stale
        ));
        let mut restarted = Authenticator::new(REALM.into(), [9; 32], [2; 32], 300);
        assert!(matches!(
            check_register(&mut restarted, 100, SRC, Some(&h), "100"),
            AuthResult::Stale
        ));
    }

    /// Extension 100 answers challenge `c` with nonce count `nc`.
    fn register_as_100(a: &mut Authenticator, c: &Challenge, nc: u32) -> AuthResult {
        let h = c
            .answer("REGISTER", "sip:parley.test", "100", "pw100", "cn", nc)
            .to_header();
        check_register(a, 100, SRC, Some(&h), "100")
    }

    #[test]
    fn nonce_count_must_grow() {
        let mut a = authenticator();
        let ch = a.challenges(100, SRC, false, None).to_strings();
        let c = Challenge::parse(&ch[1]).unwrap();
        let send = |a: &mut Authenticator, nc| register_as_100(a, &c, nc);
        assert!(matches!(send(&mut a, 1), AuthResult::Authenticated(_)));
        assert!(
            matches!(send(&mut a, 1), AuthResult::Stale),
            "replay of nc=1"
        );
        assert!(matches!(send(&mut a, 2), AuthResult::Authenticated(_)));
        assert!(matches!(send(&mut a, 2), AuthResult::Stale));
    }

    #[test]
    fn a_forgotten_nonce_cannot_be_replayed() {
        let mut a = authenticator();
        let nonce = |a: &mut Authenticator| {
            let ch = a.challenges(100, SRC, false, None).to_strings();
            Challenge::parse(&ch[1]).unwrap()
        };
        let send = |a: &mut Authenticator, c: &Challenge, nc| register_as_100(a, c, nc);
        // A nonce issued before the others but first used after them.
        let late = nonce(&mut a);
        let first = nonce(&mut a);
        assert!(matches!(
            send(&mut a, &first, 1),
            AuthResult::Authenticated(_)
        ));
        let mut later = Vec::new();
        for _ in 0..NONCES_PER_EXTENSION {
            let c = nonce(&mut a);
            assert!(matches!(send(&mut a, &c, 1), AuthResult::Authenticated(_)));
            later.push(c);
        }
        // `first` was pushed out of the table: its replay is still refused.
        assert!(
            matches!(send(&mut a, &first, 1), AuthResult::Stale),
            "replay of a forgotten nonce"
        );
        assert!(
            matches!(send(&mut a, &late, 1), AuthResult::Stale),
            "a never-seen nonce older than a forgotten one"
        );
        // Nonces still remembered keep their counts; new ones work.
        assert!(matches!(send(&mut a, &later[0], 1), AuthResult::Stale));
        assert!(matches!(
            send(&mut a, &later[0], 2),
            AuthResult::Authenticated(_)
        ));
        let fresh = nonce(&mut a);
        assert!(matches!(
            send(&mut a, &fresh, 1),
            AuthResult::Authenticated(_)
        ));
    }

    #[test]
    fn a_nonce_not_issued_to_the_source_says_nothing_about_the_password() {
        let mut a = authenticator();
        let elsewhere = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7));
        let wrong = answer(&mut a, 0, "100", "nope", 1);
        let right = answer(&mut a, 0, "100", "pw100", 1);
        // Nonces of another issuer (as before a restart: a new key).
        let mut other = Authenticator::new(REALM.into(), [9; 32], [2; 32], 300);
        let foreign_right = answer(&mut other, 0, "100", "pw100", 1);
        let foreign_wrong = answer(&mut other, 0, "100", "nope", 1);
        // From another address, or with a nonce we never issued, right and
        // wrong passwords get the same fresh challenge: no password oracle,
        // and nothing counted against the address a forger claims.
        for (source, h) in [
            (elsewhere, &wrong),
            (elsewhere, &right),
            (SRC, &foreign_right),
            (SRC, &foreign_wrong),
        ] {
            assert!(matches!(
                check_register(&mut a, 100, source, Some(h), "100"),
                AuthResult::Stale
            ));
        }
    }

    #[test]
    fn an_expired_nonce_issued_to_the_source_counts_a_wrong_password() {
        let mut a = authenticator();
        let wrong = answer(&mut a, 0, "100", "nope", 1);
        let later = 100 + 301;
        assert!(matches!(
            check_register(&mut a, later, SRC, Some(&wrong), "100"),
            AuthResult::Failed { .. }
        ));
        let right = answer(&mut a, 0, "100", "pw100", 2);
        assert!(matches!(
            check_register(&mut a, later + 1, SRC, Some(&right), "100"),
            AuthResult::Stale
        ));
    }

    #[test]
    fn credentials_of_one_extension_cannot_register_another() {
        let mut a = authenticator();
        // Right or wrong, another user's credentials get the same answer,
        // so a request for one extension cannot test another's password.
        for pw in ["pw101", "nope"] {
            let h = answer(&mut a, 0, "101", pw, 1);
            assert!(matches!(
                check_register(&mut a, 100, SRC, Some(&h), "100"),
                AuthResult::WrongUser { .. }
            ));
        }
    }
}
