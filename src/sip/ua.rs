//! The client side of registration, sans-IO: builds REGISTER requests and
//! answers digest challenges. Parley's tests and load generator register
//! through it; trunk registration to a provider will too.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::digest::{Algorithm, Challenge};
use super::message::{HeaderName, Message, MessageBuilder};
use super::transport::Transport;

/// Makes every branch this process sends unique (RFC 3261 §8.1.1.7).
static BRANCH_SEQ: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// Send the next request (`build`) to answer a challenge.
    Challenged,
    /// Registered; the registrar granted this many seconds.
    Registered { expires: u32 },
    /// Unregistered (`expires` 0 was accepted).
    Unregistered,
    /// Refused with this status and reason; `min_expires` for a 423.
    Failed {
        status: u16,
        reason: String,
        min_expires: Option<u32>,
    },
    /// A provisional or unrelated response.
    Ignored,
}

/// One device's registration of one extension.
#[derive(Debug, Clone)]
pub struct Registration {
    pub user: String,
    pub password: String,
    /// Host (and port) for the Request-URI and the AOR.
    pub domain: String,
    pub transport: Transport,
    /// The address the device's Via and Contact name.
    pub local: SocketAddr,
    pub call_id: String,
    pub expires: u32,
    pub instance: Option<String>,
    pub user_agent: String,
    /// Prefer this algorithm when the registrar offers several.
    pub prefer: Algorithm,
    cseq: u32,
    challenge: Option<Challenge>,
    /// HA1 for the last realm and algorithm seen.
    ha1: Option<(Algorithm, String, String)>,
    /// Our Contact URI, made once.
    contact: String,
    nc: u32,
    sent_credentials: bool,
}

impl Registration {
    pub fn new(
        user: &str,
        password: &str,
        domain: &str,
        transport: Transport,
        local: SocketAddr,
    ) -> Registration {
        let mut r = Registration {
            user: user.to_owned(),
            password: password.to_owned(),
            domain: domain.to_owned(),
            transport,
            local,
            call_id: format!("{}-{}@{}", user, local.port(), local.ip()),
            expires: 3600,
            instance: None,
            user_agent: "Parley-UA".into(),
            prefer: Algorithm::Sha256,
            cseq: 0,
            challenge: None,
            ha1: None,
            contact: String::new(),
            nc: 0,
            sent_credentials: false,
        };
        r.contact = r.make_contact_uri();
        r
    }

    pub fn contact_uri(&self) -> String {
        self.contact.clone()
    }

    fn make_contact_uri(&self) -> String {
        let host = match self.local {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        let t = match self.transport {
            Transport::Udp => String::new(),
            t => format!(";transport={}", t.as_str()),
        };
        format!("sip:{}@{}:{}{}", self.user, host, self.local.port(), t)
    }

    /// The next REGISTER: with credentials if a challenge is known (the
    /// nonce count goes up each time, so a known nonce can be reused).
    pub fn build(&mut self) -> Bytes {
        self.build_with(self.expires, None)
    }

    /// A REGISTER with `expires` for our contact, or `Contact: *` when
    /// `contact` is `Some("*")`, or no Contact at all (a fetch) for `Some("")`.
    pub fn build_with(&mut self, expires: u32, contact: Option<&str>) -> Bytes {
        self.cseq += 1;
        let ruri = format!("sip:{}", self.domain);
        let mut b = MessageBuilder::request("REGISTER", &ruri);
        let mut via = String::new();
        let _ = write!(
            via,
            "SIP/2.0/{} {};branch=z9hG4bK{}x{}x{};rport",
            self.transport.via_token(),
            self.local,
            self.user,
            self.local.port(),
            BRANCH_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        b.header(HeaderName::Via, &via);
        b.header(HeaderName::MaxForwards, "70");
        let aor = format!("<sip:{}@{}>", self.user, self.domain);
        b.header_fmt(
            HeaderName::From,
            format_args!("{aor};tag=t{}", self.local.port()),
        );
        b.header(HeaderName::To, &aor);
        b.header(HeaderName::CallId, &self.call_id);
        b.header_fmt(HeaderName::CSeq, format_args!("{} REGISTER", self.cseq));
        match contact {
            Some("") => {}
            Some(c) => {
                b.header(HeaderName::Contact, c);
            }
            None => {
                let mut c = format!("<{}>", self.contact);
                if let Some(i) = &self.instance {
                    let _ = write!(c, ";+sip.instance=\"{i}\"");
                }
                b.header(HeaderName::Contact, &c);
            }
        }
        b.header_fmt(HeaderName::Expires, format_args!("{expires}"));
        b.header(HeaderName::UserAgent, &self.user_agent);
        self.sent_credentials = self.challenge.is_some();
        if let Some(ch) = &self.challenge {
            self.nc += 1;
            let cnonce = format!("{:08x}", self.cseq.wrapping_mul(2_654_435_761));
            // HA1 depends only on the realm and algorithm: compute it once.
            let fresh = match &self.ha1 {
                Some((alg, realm, _)) => *alg != ch.algorithm || *realm != ch.realm,
                None => true,
            };
            if fresh {
                let h = super::digest::ha1(ch.algorithm, &self.user, &ch.realm, &self.password);
                self.ha1 = Some((ch.algorithm, ch.realm.clone(), h));
            }
            let ha1 = self
                .ha1
                .as_ref()
                .map(|(_, _, h)| h.as_str())
                .unwrap_or_default();
            let creds = ch.answer_with_ha1("REGISTER", &ruri, &self.user, ha1, &cnonce, self.nc);
            b.header(HeaderName::Authorization, &creds.to_header());
        }
        b.finish()
    }

    /// Reads the registrar's answer.
    pub fn handle_response(&mut self, msg: &Message) -> RegisterOutcome {
        let Some(status) = msg.status() else {
            return RegisterOutcome::Ignored;
        };
        match status {
            100..=199 => RegisterOutcome::Ignored,
            200..=299 => {
                let mine = self.contact.as_str();
                let granted = msg
                    .header_values(HeaderName::Contact)
                    .filter_map(super::message::NameAddr::parse)
                    .find(|c| c.uri == mine)
                    .and_then(|c| c.param("expires").flatten().and_then(|e| e.parse().ok()));
                match granted {
                    Some(expires) => RegisterOutcome::Registered { expires },
                    None => RegisterOutcome::Unregistered,
                }
            }
            401 => {
                let offered: Vec<Challenge> = msg
                    .headers(HeaderName::WwwAuthenticate)
                    .filter_map(Challenge::parse)
                    .collect();
                let Some(pick) = offered
                    .iter()
                    .find(|c| c.algorithm == self.prefer)
                    .or(offered.first())
                    .cloned()
                else {
                    return RegisterOutcome::Failed {
                        status,
                        reason: msg.reason().to_owned(),
                        min_expires: None,
                    };
                };
                // A second 401 for credentials just sent, without
                // stale=true, means they were wrong.
                let rejected = self.sent_credentials && !pick.stale;
                self.challenge = Some(pick);
                self.nc = 0;
                if rejected {
                    RegisterOutcome::Failed {
                        status,
                        reason: msg.reason().to_owned(),
                        min_expires: None,
                    }
                } else {
                    RegisterOutcome::Challenged
                }
            }
            _ => RegisterOutcome::Failed {
                status,
                reason: msg.reason().to_owned(),
                min_expires: msg
                    .header(HeaderName::MinExpires)
                    .and_then(|v| v.trim().parse().ok()),
            },
        }
    }

    /// Forgets the challenge, so the next request goes without credentials.
    pub fn forget_challenge(&mut self) {
        self.challenge = None;
        self.nc = 0;
    }
}
