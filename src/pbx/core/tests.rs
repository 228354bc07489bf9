//! The whole registrar path in virtual time: a phone (the client state
//! machine of `sip::ua`) talks to the core; nothing touches a socket.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::pbx::directory::Extension;
use crate::pbx::policy::EncryptionPolicy;
use crate::sip::digest::{Algorithm, ha1};
use crate::sip::ua::{RegisterOutcome, Registration};

const REALM: &str = "parley.test";
const UNIX_START: u64 = 1_795_824_000;

struct Harness {
    core: Core,
    now: Instant,
    events: Vec<Event>,
    store: Vec<StoreOp>,
    pins: Vec<(ConnId, bool)>,
    calls: Vec<crate::pbx::cdr::CallRecord>,
}

impl Harness {
    fn new(cfg: CoreConfig) -> Harness {
        let now = Instant::now();
        let mut core = Core::new(
            cfg,
            CoreKeys {
                nonce: [3; 32],
                dummy_ha1: [4; 32],
            },
            now,
            Duration::from_secs(UNIX_START),
        );
        core.set_directory(
            now,
            Directory::new([
                ext("100", "pw100", EncryptionPolicy::RequiredRemote),
                ext("101", "pw101", EncryptionPolicy::Required),
                ext("102", "pw102", EncryptionPolicy::Off),
            ]),
        );
        Harness {
            core,
            now,
            events: vec![],
            store: vec![],
            pins: vec![],
            calls: vec![],
        }
    }

    /// Feeds one message and returns every transmit it caused.
    fn send(&mut self, flow: Flow, bytes: Bytes) -> Vec<Message> {
        self.core.handle_message(self.now, flow, bytes);
        self.drain()
    }

    fn drain(&mut self) -> Vec<Message> {
        self.drain_flows().into_iter().map(|(_, m)| m).collect()
    }

    /// Feeds one message and returns every transmit it caused, with where
    /// each goes.
    fn send_flows(&mut self, flow: Flow, bytes: Bytes) -> Vec<(Flow, Message)> {
        self.core.handle_message(self.now, flow, bytes);
        self.drain_flows()
    }

    fn drain_flows(&mut self) -> Vec<(Flow, Message)> {
        let mut sent = vec![];
        while let Some(o) = self.core.poll_output() {
            match o {
                Output::Transmit(t) => {
                    sent.push((t.flow, Message::parse(t.bytes, Framing::Datagram).unwrap()))
                }
                Output::Event(e) => self.events.push(e),
                Output::Store(s) => self.store.push(s),
                Output::Pin { conn, pinned } => self.pins.push((conn, pinned)),
                Output::CallEnded(r) => self.calls.push(*r),
            }
        }
        sent
    }

    /// Moves virtual time on, firing every timer due; returns what the
    /// timers sent.
    fn advance(&mut self, d: Duration) -> Vec<(Flow, Message)> {
        let target = self.now + d;
        let mut sent = vec![];
        while let Some(t) = self.core.poll_timeout().filter(|t| *t <= target) {
            self.now = t.max(self.now);
            self.core.handle_timeout(self.now);
            sent.extend(self.drain_flows());
        }
        self.now = target;
        sent
    }

    /// Runs a full registration; returns the last response.
    fn register(&mut self, ua: &mut Registration, flow: Flow) -> (RegisterOutcome, Message) {
        for _ in 0..3 {
            let req = ua.build();
            let resp = self.send(flow, req).pop().expect("an answer");
            let outcome = ua.handle_response(&resp);
            if outcome != RegisterOutcome::Challenged {
                return (outcome, resp);
            }
        }
        panic!("no final outcome");
    }

    /// Registers `ua` over `flow`; the registration must succeed.
    fn registers(&mut self, ua: &mut Registration, flow: Flow) {
        let (outcome, resp) = self.register(ua, flow);
        assert!(
            matches!(outcome, RegisterOutcome::Registered { .. }),
            "{outcome:?}: {resp:?}"
        );
    }

    fn registrations(&self) -> Vec<(String, Change)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Registration(r) => Some((r.extension.to_string(), r.change)),
                _ => None,
            })
            .collect()
    }

    fn security(&self) -> Vec<&SecurityEvent> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Security(s) => Some(s),
                _ => None,
            })
            .collect()
    }
}

fn ext(number: &str, password: &str, encryption: EncryptionPolicy) -> Extension {
    Extension {
        number: number.into(),
        name: None,
        realm: REALM.into(),
        ha1_md5: ha1(Algorithm::Md5, number, REALM, password),
        ha1_sha256: ha1(Algorithm::Sha256, number, REALM, password),
        encryption,
    }
}

fn cfg() -> CoreConfig {
    let mut c = CoreConfig::new(REALM);
    c.lockout = LockoutConfig {
        per_extension_failures: 3,
        per_source_failures: 6,
        window: Duration::from_secs(600),
        block: Duration::from_secs(900),
    };
    c
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn udp_from(remote: &str) -> Flow {
    Flow::udp(addr("127.0.0.1:5060"), addr(remote))
}

fn tls_from(remote: &str, conn: ConnId) -> Flow {
    Flow::stream(Transport::Tls, addr("127.0.0.1:5061"), addr(remote), conn)
}

fn phone(user: &str, pw: &str, flow: Flow) -> Registration {
    let mut r = Registration::new(user, pw, REALM, flow.transport, flow.remote);
    r.expires = 600;
    r
}

#[test]
fn challenge_offers_sha256_then_md5_and_marks_the_via() {
    let mut h = Harness::new(cfg());
    let flow = udp_from("192.168.1.20:5062");
    let mut ua = phone("100", "pw100", flow);
    let resp = h.send(flow, ua.build()).pop().unwrap();
    assert_eq!(resp.status(), Some(401));
    let ch: Vec<_> = resp.headers(HeaderName::WwwAuthenticate).collect();
    assert_eq!(ch.len(), 2);
    assert!(ch[0].contains("algorithm=SHA-256") && ch[0].contains("qop=\"auth\""));
    assert!(ch[1].contains("algorithm=MD5"));
    assert!(resp.to().unwrap().tag().is_some());
    let via = resp.top_via().unwrap();
    assert_eq!(via.param("received"), Some(Some("192.168.1.20")));
    assert_eq!(via.param("rport"), Some(Some("5062")));
    assert_eq!(resp.header(HeaderName::Server), Some("Parley"));
}

#[test]
fn register_with_either_algorithm_then_refresh_and_unregister() {
    for prefer in [Algorithm::Sha256, Algorithm::Md5] {
        let mut h = Harness::new(cfg());
        let flow = udp_from("192.168.1.20:5062");
        let mut ua = phone("100", "pw100", flow);
        ua.prefer = prefer;
        let (outcome, resp) = h.register(&mut ua, flow);
        assert_eq!(outcome, RegisterOutcome::Registered { expires: 600 });
        assert_eq!(
            resp.header(HeaderName::Date),
            Some("Sat, 28 Nov 2026 00:00:00 GMT")
        );
        assert_eq!(h.registrations(), vec![("100".into(), Change::Added)]);
        assert!(
            matches!(&h.store[..], [StoreOp::SaveBinding(b)] if b.expires_at_unix == UNIX_START + 600 && b.remote == flow.remote)
        );

        // A refresh reuses the nonce with the next nonce count: no new challenge.
        h.advance(Duration::from_secs(100));
        let resp = h.send(flow, ua.build()).pop().unwrap();
        assert_eq!(
            ua.handle_response(&resp),
            RegisterOutcome::Registered { expires: 600 }
        );

        ua.expires = 0;
        let resp = h.send(flow, ua.build()).pop().unwrap();
        assert_eq!(ua.handle_response(&resp), RegisterOutcome::Unregistered);
        assert_eq!(
            h.registrations(),
            vec![
                ("100".into(), Change::Added),
                ("100".into(), Change::Refreshed),
                ("100".into(), Change::Removed)
            ]
        );
        assert!(matches!(
            h.store.last(),
            Some(StoreOp::DeleteBinding { .. })
        ));
        assert_eq!(h.core.registrar().count(), 0);
    }
}

#[test]
fn retransmitted_register_gets_the_same_answer_without_being_processed_again() {
    let mut h = Harness::new(cfg());
    let flow = udp_from("192.168.1.20:5062");
    let mut ua = phone("100", "pw100", flow);
    let first = ua.build();
    h.send(flow, first.clone());
    let challenge = h.send(flow, first).pop().unwrap();
    ua.handle_response(&challenge);
    let req = ua.build();
    let a = h.send(flow, req.clone()).pop().unwrap();
    let b = h.send(flow, req).pop().unwrap();
    assert_eq!(a.as_bytes(), b.as_bytes());
    assert_eq!(h.registrations().len(), 1);
}

#[test]
fn wrong_password_and_unknown_extension_get_identical_answers() {
    let mut h = Harness::new(cfg());
    let flow = udp_from("192.168.1.20:5062");
    let mut wrong = phone("100", "bad", flow);
    let mut unknown = phone("555", "bad", flow);
    let (o1, r1) = h.register(&mut wrong, flow);
    let (o2, r2) = h.register(&mut unknown, flow);
    assert!(matches!(o1, RegisterOutcome::Failed { status: 401, .. }));
    assert!(matches!(o2, RegisterOutcome::Failed { status: 401, .. }));
    // Same status, reason and header names in the same order.
    let shape =
        |m: &Message| -> Vec<String> { m.fields().map(|(_, n, _)| n.to_string()).collect() };
    assert_eq!(
        (r1.status(), r1.reason(), shape(&r1)),
        (r2.status(), r2.reason(), shape(&r2))
    );
    let www = |m: &Message| -> Vec<String> {
        m.headers(HeaderName::WwwAuthenticate)
            .map(|v| v.split("nonce").next().unwrap().to_owned())
            .collect()
    };
    assert_eq!(www(&r1), www(&r2));
    assert_eq!(h.security().len(), 2);
}

#[test]
fn repeated_failures_block_the_pair_then_the_source() {
    let mut h = Harness::new(cfg());
    let office = udp_from("192.168.1.20:5062");
    let mut stale_phone = phone("100", "old-password", office);
    for _ in 0..3 {
        h.register(&mut stale_phone, office);
    }
    assert!(h.security().iter().any(|e| matches!(
        e,
        SecurityEvent::Blocked {
            scope: BlockScope::SourceAndExtension,
            ..
        }
    )));
    // Now even the right password from that address for 100 is refused...
    let mut right = phone("100", "pw100", office);
    let resp = h.send(office, right.build()).pop().unwrap();
    assert_eq!(
        (resp.status(), resp.reason()),
        (Some(403), "Too Many Failed Attempts")
    );
    // ...but another phone behind the same NAT registers fine.
    let colleague_flow = udp_from("192.168.1.20:5070");
    let mut colleague = phone("102", "pw102", colleague_flow);
    h.registers(&mut colleague, colleague_flow);

    // A scanner trying many extensions from one address trips the source block.
    let scanner = udp_from("203.0.113.50:5060");
    for n in 0..6 {
        let mut s = phone(&format!("{}", 200 + n), "guess", scanner);
        h.register(&mut s, scanner);
    }
    let mut real = phone("102", "pw102", scanner);
    let resp = h.send(scanner, real.build()).pop().unwrap();
    assert_eq!(resp.status(), Some(403));
    // Blocks end.
    h.advance(Duration::from_secs(901));
    let mut right = phone("100", "pw100", office);
    h.registers(&mut right, office);
}

#[test]
fn policy_requires_tls_outside_the_lan_but_only_after_credentials_check_out() {
    let mut c = cfg();
    c.lan = LanNetworks::new(vec!["192.168.0.0/16".parse().unwrap()]);
    let mut h = Harness::new(c);
    let road_udp = udp_from("198.51.100.9:5060");
    let mut ua = phone("100", "pw100", road_udp);
    let (outcome, _) = h.register(&mut ua, road_udp);
    assert_eq!(
        outcome,
        RegisterOutcome::Failed {
            status: 403,
            reason: "TLS Required Outside The LAN".into(),
            min_expires: None
        }
    );
    assert!(
        h.security()
            .iter()
            .any(|e| matches!(e, SecurityEvent::PolicyViolation { .. }))
    );
    // A stranger with a wrong password learns nothing about the policy.
    let mut stranger = phone("100", "guess", road_udp);
    assert!(matches!(
        h.register(&mut stranger, road_udp).0,
        RegisterOutcome::Failed { status: 401, .. }
    ));
    // Over TLS the same phone registers.
    let road_tls = tls_from("198.51.100.9:40000", 11);
    let mut ua = phone("100", "pw100", road_tls);
    h.registers(&mut ua, road_tls);
    // From the LAN, UDP is fine for required-remote but not for required.
    let lan = udp_from("192.168.1.30:5060");
    let mut desk = phone("100", "pw100", lan);
    h.registers(&mut desk, lan);
    let mut strict = phone("101", "pw101", lan);
    assert_eq!(
        h.register(&mut strict, lan).0,
        RegisterOutcome::Failed {
            status: 403,
            reason: "TLS Required By Encryption Policy".into(),
            min_expires: None
        }
    );
}

#[test]
fn too_brief_interval_gets_423_with_min_expires() {
    let mut h = Harness::new(cfg());
    let flow = udp_from("192.168.1.20:5062");
    let mut ua = phone("100", "pw100", flow);
    ua.expires = 10;
    let (outcome, _) = h.register(&mut ua, flow);
    assert_eq!(
        outcome,
        RegisterOutcome::Failed {
            status: 423,
            reason: "Interval Too Brief".into(),
            min_expires: Some(60)
        }
    );
}

#[test]
fn stale_nonce_is_rechallenged_with_stale_true() {
    let mut h = Harness::new(cfg());
    let flow = udp_from("192.168.1.20:5062");
    let mut ua = phone("100", "pw100", flow);
    h.register(&mut ua, flow);
    h.advance(Duration::from_secs(301));
    let resp = h.send(flow, ua.build()).pop().unwrap();
    assert_eq!(resp.status(), Some(401));
    assert!(
        resp.headers(HeaderName::WwwAuthenticate)
            .all(|v| v.contains("stale=true"))
    );
    assert_eq!(ua.handle_response(&resp), RegisterOutcome::Challenged);
    assert!(h.security().is_empty(), "a stale nonce is not a failure");
    let resp = h.send(flow, ua.build()).pop().unwrap();
    assert!(matches!(
        ua.handle_response(&resp),
        RegisterOutcome::Registered { .. }
    ));
}

#[test]
fn bindings_expire_in_virtual_time() {
    let mut h = Harness::new(cfg());
    let flow = udp_from("192.168.1.20:5062");
    let mut ua = phone("100", "pw100", flow);
    ua.expires = 60;
    h.register(&mut ua, flow);
    h.advance(Duration::from_secs(59));
    assert_eq!(h.core.registrar().count(), 1);
    h.advance(Duration::from_secs(1));
    assert_eq!(h.core.registrar().count(), 0);
    assert_eq!(
        h.registrations().last(),
        Some(&("100".into(), Change::Expired))
    );
    assert!(matches!(
        h.store.last(),
        Some(StoreOp::DeleteBinding { .. })
    ));
}

#[test]
fn tls_bindings_pin_their_connection_and_die_with_it() {
    let mut h = Harness::new(cfg());
    let flow = tls_from("198.51.100.9:40000", 42);
    let mut ua = phone("100", "pw100", flow);
    h.register(&mut ua, flow);
    assert_eq!(h.pins, vec![(42, true)]);
    assert!(h.store.is_empty(), "TLS bindings are not persisted");
    h.core.handle_flow_closed(h.now, flow);
    h.drain();
    assert_eq!(h.pins, vec![(42, true), (42, false)]);
    assert_eq!(
        h.registrations().last(),
        Some(&("100".into(), Change::FlowClosed))
    );
    assert_eq!(h.core.registrar().count(), 0);
}

#[test]
fn options_lists_capabilities() {
    let mut h = Harness::new(cfg());
    let flow = tls_from("198.51.100.9:40000", 1);
    let req = Bytes::from_static(
        b"OPTIONS sip:parley.test SIP/2.0\r\nVia: SIP/2.0/TLS 198.51.100.9:40000;branch=z9hG4bKo1\r\n\
          From: <sip:x@y>;tag=1\r\nTo: <sip:parley.test>\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n\
          Content-Length: 0\r\n\r\n",
    );
    let resp = h.send(flow, req).pop().unwrap();
    assert_eq!(resp.status(), Some(200));
    assert_eq!(resp.header(HeaderName::Allow), Some(ALLOWED_METHODS));
    assert_eq!(resp.header(HeaderName::Accept), Some("application/sdp"));
    assert!(resp.header(HeaderName::Supported).is_some());
}

fn request(method: &str, extra: &str) -> Bytes {
    Bytes::from(format!(
        "{method} sip:100@parley.test SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK{method}{}\r\n\
         From: <sip:x@y>;tag=1\r\nTo: <sip:100@parley.test>\r\nCall-ID: c\r\nCSeq: 1 {method}\r\n{extra}Content-Length: 0\r\n\r\n",
        extra.len()
    ))
}

#[test]
fn bad_and_unsupported_requests_get_clear_errors() {
    let mut h = Harness::new(cfg());
    let flow = udp_from("192.0.2.1:5060");
    let cases: Vec<(Bytes, u16, &str)> = vec![
        (request("FOO", ""), 501, "Not Implemented"),
        (request("SUBSCRIBE", ""), 405, "Method Not Allowed"),
        (
            request("INVITE", "Contact: <sip:x@192.0.2.1>\r\n"),
            407,
            "Proxy Authentication Required",
        ),
        (
            request("INVITE", ""),
            400,
            "Cannot Form A Dialog (missing or malformed Contact header)",
        ),
        (request("OPTIONS", "Require: 100rel, timer\r\n"), 420, "Bad Extension"),
        (request("CANCEL", ""), 481, "Call/Transaction Does Not Exist"),
        (
            Bytes::from_static(b"OPTIONS sip:h SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKq\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:h>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n"),
            400,
            "CSeq Method Does Not Match",
        ),
        (
            Bytes::from_static(b"OPTIONS sip:h SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKr\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:h>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nContent-Length: 40\r\n\r\n"),
            400,
            "Body Shorter Than Content-Length",
        ),
        (
            Bytes::from_static(b"OPTIONS sip:h SIP/3.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKs\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:h>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n\r\n"),
            505,
            "Version Not Supported",
        ),
        (
            Bytes::from_static(b"OPTIONS tel:+1555 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKt\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:h>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n\r\n"),
            416,
            "Unsupported URI Scheme",
        ),
    ];
    for (req, status, reason) in cases {
        let resp = h.send(flow, req.clone());
        assert_eq!(resp.len(), 1, "one answer to {req:?}");
        assert_eq!(
            (resp[0].status(), resp[0].reason()),
            (Some(status), reason),
            "for {req:?}"
        );
    }
    assert_eq!(
        h.send(flow, request("REGISTER", "").slice(..40)).len(),
        0,
        "nothing to answer with when the headers are cut off"
    );
    assert!(
        h.send(flow, request("ACK", "Content-Length: 99\r\n"))
            .is_empty(),
        "ACK is never answered"
    );
}

#[test]
fn deleted_extensions_lose_bindings_and_restarts_restore_udp_ones() {
    let mut h = Harness::new(cfg());
    let flow = udp_from("192.168.1.20:5062");
    let mut ua = phone("100", "pw100", flow);
    h.register(&mut ua, flow);
    let saved: Vec<StoredBinding> = h
        .store
        .iter()
        .filter_map(|s| match s {
            StoreOp::SaveBinding(b) => Some(b.clone()),
            _ => None,
        })
        .collect();

    let now = h.now;
    h.core.set_directory(
        now,
        Directory::new([ext("102", "pw102", EncryptionPolicy::Off)]),
    );
    h.drain();
    assert_eq!(
        h.registrations().last(),
        Some(&("100".into(), Change::ExtensionRemoved))
    );

    // A new core (a restart, 100 s later) with the same extensions restores it.
    let mut h2 = Harness::new(cfg());
    h2.now = h.now;
    let later = h2.now + Duration::from_secs(100);
    let mut core = Core::new(
        cfg(),
        CoreKeys {
            nonce: [5; 32],
            dummy_ha1: [6; 32],
        },
        later,
        Duration::from_secs(UNIX_START + 100),
    );
    core.set_directory(
        later,
        Directory::new([ext("100", "pw100", EncryptionPolicy::RequiredRemote)]),
    );
    assert_eq!(core.restore_bindings(later, saved.clone()), 1);
    let b = &core.registrar().bindings("100")[0];
    assert_eq!(b.expires_in(later), 500);
    assert_eq!(b.flow, flow);
    // Expired ones are not restored.
    let much_later = later + Duration::from_secs(1000);
    let mut core = Core::new(
        cfg(),
        CoreKeys {
            nonce: [5; 32],
            dummy_ha1: [6; 32],
        },
        much_later,
        Duration::from_secs(UNIX_START + 1100),
    );
    core.set_directory(
        much_later,
        Directory::new([ext("100", "pw100", EncryptionPolicy::RequiredRemote)]),
    );
    assert_eq!(core.restore_bindings(much_later, saved), 0);
}

#[test]
fn forged_sources_cannot_lock_out_an_office() {
    let mut h = Harness::new(cfg());
    let attacker = udp_from("203.0.113.9:5060");
    let office = udp_from("192.168.1.20:5062");
    // The attacker gets a challenge at its own address...
    let mut forger = phone("100", "guess", attacker);
    let challenge = h.send(attacker, forger.build()).pop().unwrap();
    forger.handle_response(&challenge);
    // ...then sends wrong answers with the office's address as source: the
    // nonce was not issued there, so none of them counts.
    for _ in 0..10 {
        let resp = h.send(office, forger.build()).pop().unwrap();
        assert_eq!(resp.status(), Some(401));
    }
    assert!(
        !h.security()
            .iter()
            .any(|e| matches!(e, SecurityEvent::Blocked { .. }))
    );
    let mut desk = phone("100", "pw100", office);
    h.registers(&mut desk, office);
}

#[test]
fn challenges_leave_no_transaction_state() {
    let mut h = Harness::new(cfg());
    let flow = udp_from("192.0.2.44:5060");
    for n in 0..100 {
        let mut stranger = phone(&format!("{n}"), "x", flow);
        assert_eq!(
            h.send(flow, stranger.build()).pop().unwrap().status(),
            Some(401)
        );
    }
    assert_eq!(h.core.transactions().server_count(), 0);
    // An authenticated registration keeps its transaction for retransmissions.
    let mut ua = phone("100", "pw100", flow);
    h.register(&mut ua, flow);
    assert_eq!(h.core.transactions().server_count(), 1);
}

// ---- calls ---------------------------------------------------------------

use std::sync::{Arc as StdArc, Mutex};

use crate::media::{LegId, LegMedia, LegPort, LegReport, MediaError, MediaEvent, OpenLeg};
use crate::pbx::cdr::{EndedBy, Outcome};
use crate::sdp::{Direction, SessionDescription};
use crate::sip::digest::Challenge;
use crate::sip::message::NameAddr;
use crate::srtp::Suite;

/// Media plane stand-in: hands out ports and records what it was told.
#[derive(Clone, Default)]
struct FakeMedia {
    log: StdArc<Mutex<Vec<String>>>,
    configured: StdArc<Mutex<Vec<(LegId, LegMedia)>>>,
    next: StdArc<Mutex<u64>>,
}

impl MediaControl for FakeMedia {
    fn open_leg(&mut self, port: LegPort) -> Result<OpenLeg, MediaError> {
        let mut n = self.next.lock().unwrap();
        *n += 1;
        self.log
            .lock()
            .unwrap()
            .push(format!("open {} {port:?}", *n));
        Ok(OpenLeg {
            id: LegId(*n),
            port: 30_000 + 2 * *n as u16,
        })
    }
    fn configure(&mut self, id: LegId, media: LegMedia) {
        self.log.lock().unwrap().push(format!("configure {}", id.0));
        self.configured.lock().unwrap().push((id, media));
    }
    fn bridge(&mut self, a: LegId, b: LegId) {
        self.log
            .lock()
            .unwrap()
            .push(format!("bridge {} {}", a.0, b.0));
    }
    fn close(&mut self, id: LegId) {
        self.log.lock().unwrap().push(format!("close {}", id.0));
    }
}

fn sdp_offer(ip: &str, port: u16) -> String {
    format!(
        "v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n\
         a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
    )
}

struct Caller {
    user: &'static str,
    password: &'static str,
    flow: Flow,
    cseq: u32,
    challenge: Option<Challenge>,
    nc: u32,
    /// Headers added to the INVITE (session timers, Allow...).
    extra: Vec<(HeaderName, String)>,
    /// The INVITE's SDP; a plain offer from the phone's address when unset.
    offer: Option<String>,
}

impl Caller {
    fn invite(&mut self, to: &str) -> Bytes {
        self.cseq += 1;
        let ruri = format!("sip:{to}@{REALM}");
        let mut b = MessageBuilder::request("INVITE", &ruri);
        for (name, value) in &self.extra {
            b.header(*name, value);
        }
        self.transaction_headers(&mut b, to, "INVITE");
        b.header_fmt(
            HeaderName::Contact,
            format_args!("<sip:{}@{}>", self.user, self.flow.remote),
        );
        if let Some(ch) = &self.challenge {
            self.nc += 1;
            let creds = ch.answer(
                "INVITE",
                &ruri,
                self.user,
                self.password,
                "abcdef01",
                self.nc,
            );
            b.header(HeaderName::ProxyAuthorization, &creds.to_header());
        }
        let offer = self
            .offer
            .clone()
            .unwrap_or_else(|| sdp_offer(&self.flow.remote.ip().to_string(), 4000));
        b.finish_with_body(Some("application/sdp"), offer.as_bytes())
    }

    /// A CANCEL for the INVITE last sent to `to` (RFC 3261 §9.1: its
    /// Request-URI, top Via, Call-ID, From, To and CSeq number).
    fn cancel(&self, to: &str) -> Bytes {
        let mut b = MessageBuilder::request("CANCEL", &format!("sip:{to}@{REALM}"));
        self.transaction_headers(&mut b, to, "CANCEL");
        b.finish_with_body(None, b"")
    }

    /// Via, Max-Forwards, From, To, Call-ID and CSeq of the current INVITE
    /// transaction (a CANCEL repeats them with its own method).
    fn transaction_headers(&self, b: &mut MessageBuilder, to: &str, method: &str) {
        b.header_fmt(
            HeaderName::Via,
            format_args!(
                "SIP/2.0/{} {};branch=z9hG4bKinv{}",
                self.flow.transport.via_token(),
                self.flow.remote,
                self.cseq
            ),
        );
        b.header(HeaderName::MaxForwards, "70");
        b.header_fmt(
            HeaderName::From,
            format_args!(
                "\"Desk {u}\" <sip:{u}@{REALM}>;tag=caller{u}",
                u = self.user
            ),
        );
        b.header_fmt(HeaderName::To, format_args!("<sip:{to}@{REALM}>"));
        b.header(HeaderName::CallId, "call-1@phone");
        b.header_fmt(HeaderName::CSeq, format_args!("{} {method}", self.cseq));
    }

    fn in_dialog(&mut self, method: &str, ok: &Message) -> Bytes {
        self.in_dialog_with(method, ok, None)
    }

    /// An in-dialog request with a body (`content type`, `body`).
    fn in_dialog_with(&mut self, method: &str, ok: &Message, body: Option<(&str, &str)>) -> Bytes {
        self.cseq += 1;
        let contact = NameAddr::parse(ok.header(HeaderName::Contact).unwrap())
            .unwrap()
            .uri
            .to_string();
        let mut b = MessageBuilder::request(method, &contact);
        b.header_fmt(
            HeaderName::Via,
            format_args!(
                "SIP/2.0/UDP {};branch=z9hG4bK{method}{}",
                self.flow.remote, self.cseq
            ),
        );
        b.header(HeaderName::From, ok.header(HeaderName::From).unwrap());
        b.header(HeaderName::To, ok.header(HeaderName::To).unwrap());
        b.header(HeaderName::CallId, "call-1@phone");
        let seq = if method == "ACK" {
            ok.cseq().unwrap().seq
        } else {
            self.cseq
        };
        b.header_fmt(HeaderName::CSeq, format_args!("{seq} {method}"));
        match body {
            Some((ctype, body)) => b.finish_with_body(Some(ctype), body.as_bytes()),
            None => b.finish_with_body(None, b""),
        }
    }
}

/// A callee device's answer to what Parley sent it.
/// The challenge a 407 carries (the last Proxy-Authenticate, MD5).
fn proxy_challenge(msg: &Message) -> Challenge {
    Challenge::parse(msg.headers(HeaderName::ProxyAuthenticate).last().unwrap()).unwrap()
}

fn reply(req: &Message, status: u16, reason: &str, sdp: Option<&str>) -> Bytes {
    reply_as(
        req,
        status,
        reason,
        sdp,
        "calleetag",
        "<sip:102@192.168.1.30:5062>",
    )
}

/// The answer of a device with its own To tag and Contact (another fork).
fn reply_as(
    req: &Message,
    status: u16,
    reason: &str,
    sdp: Option<&str>,
    tag: &str,
    contact: &str,
) -> Bytes {
    let mut b = MessageBuilder::response_to(req, status, reason, Some(tag));
    b.header(HeaderName::Contact, contact);
    match sdp {
        Some(body) => b.finish_with_body(Some("application/sdp"), body.as_bytes()),
        None => b.finish_with_body(None, b""),
    }
}

struct CallSetup {
    h: Harness,
    media: FakeMedia,
    caller: Caller,
    callee_flow: Flow,
}

/// Extensions 100 (caller, LAN desk phone over UDP) and 102 (callee, UDP)
/// registered, with a fake media plane.
fn call_setup() -> CallSetup {
    call_setup_at("192.168.1.30:5062")
}

/// `call_setup` with the callee's device at `callee`.
fn call_setup_at(callee: &str) -> CallSetup {
    let mut h = Harness::new(cfg());
    let media = FakeMedia::default();
    h.core.set_media(Box::new(media.clone()));
    let caller_flow = udp_from("192.168.1.20:5062");
    let callee_flow = udp_from(callee);
    let mut a = phone("100", "pw100", caller_flow);
    h.registers(&mut a, caller_flow);
    let mut b = phone("102", "pw102", callee_flow);
    h.registers(&mut b, callee_flow);
    let caller = Caller {
        user: "100",
        password: "pw100",
        flow: caller_flow,
        cseq: 0,
        challenge: None,
        nc: 0,
        extra: vec![],
        offer: None,
    };
    CallSetup {
        h,
        media,
        caller,
        callee_flow,
    }
}

impl CallSetup {
    /// INVITE, 407, INVITE with credentials: returns what Parley sent.
    fn dial(&mut self, to: &str) -> Vec<(Flow, Message)> {
        let first = self.h.send_flows(self.caller.flow, self.caller.invite(to));
        assert_eq!(first.len(), 1);
        let challenge = &first[0].1;
        assert_eq!(challenge.status(), Some(407));
        self.caller.nc = 0;
        self.caller.challenge = Some(proxy_challenge(challenge));
        self.h.send_flows(self.caller.flow, self.caller.invite(to))
    }

    /// Dials `to`; returns the INVITE Parley sent the callee.
    fn dial_invite(&mut self, to: &str) -> Message {
        self.dial(to)
            .into_iter()
            .find(|(_, m)| m.method() == Some(Method::Invite))
            .expect("an INVITE to the callee")
            .1
    }
}

#[test]
fn a_call_is_bridged_through_its_own_dialogs_and_media_legs() {
    let mut s = call_setup();
    let out = s.dial("102");
    let statuses: Vec<_> = out.iter().filter_map(|(_, m)| m.status()).collect();
    assert_eq!(statuses, [100]);
    let (to_callee, invite) = out
        .iter()
        .find(|(_, m)| m.method() == Some(Method::Invite))
        .unwrap();
    assert_eq!(
        *to_callee, s.callee_flow,
        "the INVITE goes out on the callee's registered flow"
    );
    assert_eq!(
        invite.request_uri(),
        s.h.core.registrar().bindings("102")[0]
            .contact
            .as_ref()
            .trim_matches(['<', '>'])
    );
    // A B2BUA: a Call-ID and tags of its own; the caller's address nowhere.
    assert_ne!(invite.call_id(), Some("call-1@phone"));
    let text = String::from_utf8_lossy(invite.as_bytes());
    assert!(
        !text.contains("192.168.1.20"),
        "caller's address leaked:\n{text}"
    );
    assert!(invite.from().unwrap().uri.starts_with("sip:100@"));
    let offer = SessionDescription::parse(invite.body()).unwrap();
    assert_eq!(offer.media[0].proto, "RTP/AVP", "UDP legs never carry keys");
    assert!(offer.media[0].attribute("crypto").is_none());

    // Ringing is relayed to the caller.
    let out =
        s.h.send_flows(s.callee_flow, reply(invite, 180, "Ringing", None));
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].0, out[0].1.status()), (s.caller.flow, Some(180)));

    // The callee answers: ACK to it, 200 with Parley's SDP to the caller.
    let answer = sdp_offer("192.168.1.30", 6000).replace("0 8 101", "8 101");
    let out =
        s.h.send_flows(s.callee_flow, reply(invite, 200, "OK", Some(&answer)));
    let ack = out
        .iter()
        .find(|(_, m)| m.method() == Some(Method::Ack))
        .expect("ACK to the callee");
    assert_eq!(ack.0, s.callee_flow);
    let (_, ok) = out
        .iter()
        .find(|(_, m)| m.status() == Some(200))
        .expect("200 to the caller");
    let caller_sdp = SessionDescription::parse(ok.body()).unwrap();
    assert_eq!(caller_sdp.media[0].formats, ["8", "101"]);
    assert!(!String::from_utf8_lossy(ok.body()).contains("192.168.1.30"));
    let log = s.media.log.lock().unwrap().clone();
    assert_eq!(
        log,
        [
            // Plain RTP legs get ports of their own.
            "open 1 Own",
            "open 2 Own",
            "configure 1",
            "configure 2",
            "bridge 1 2"
        ]
    );
    let configured = s.media.configured.lock().unwrap().clone();
    assert_eq!(configured[0].1.remote_rtp, Some(addr("192.168.1.20:4000")));
    assert_eq!(configured[1].1.remote_rtp, Some(addr("192.168.1.30:6000")));
    assert!(configured.iter().all(|(_, m)| m.keys.is_none()));
    assert_eq!(s.h.core.call_count(), 1);

    // ACK, then the caller hangs up: 200 to it, BYE to the callee.
    assert!(
        s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", ok))
            .is_empty()
    );
    s.h.advance(Duration::from_secs(30));
    let out = s.h.send_flows(s.caller.flow, s.caller.in_dialog("BYE", ok));
    assert!(
        out.iter()
            .any(|(f, m)| *f == s.caller.flow && m.status() == Some(200))
    );
    let (f, bye) = out
        .iter()
        .find(|(_, m)| m.method() == Some(Method::Bye))
        .expect("BYE to the callee");
    assert_eq!(*f, s.callee_flow);
    assert_eq!(bye.to().unwrap().tag(), Some("calleetag"));
    assert_eq!(s.h.core.call_count(), 0);
    assert!(
        s.media
            .log
            .lock()
            .unwrap()
            .ends_with(&["close 1".to_string(), "close 2".to_string()])
    );
    // The record waits for both legs' statistics from the relay.
    assert!(s.h.calls.is_empty());
    for id in [1, 2] {
        s.h.core.handle_media_event(
            s.h.now,
            MediaEvent::Closed {
                report: report(id, 1500),
            },
        );
    }
    s.h.drain();
    let cdr = &s.h.calls[0];
    assert_eq!(
        cdr.caller_leg.media.as_ref().unwrap().received_packets,
        1500
    );
    assert_eq!(
        cdr.callee_leg.as_ref().unwrap().media.as_ref().unwrap().id,
        LegId(2)
    );
    assert_eq!(
        (cdr.caller.as_str(), cdr.callee.as_str(), cdr.outcome),
        ("100", "102", Outcome::Answered)
    );
    assert_eq!(cdr.ended_by, Some(EndedBy::Caller));
    assert_eq!(cdr.duration_ms(), 30_000);
}

#[test]
fn unknown_unregistered_and_unauthenticated_calls_get_their_codes() {
    let mut s = call_setup();
    let out = s.dial("999");
    assert_eq!(
        out.iter()
            .filter_map(|(_, m)| m.status())
            .collect::<Vec<_>>(),
        [404]
    );
    // 101 exists but has no device registered.
    let out = s.h.send_flows(s.caller.flow, s.caller.invite("101"));
    assert_eq!(
        out.iter()
            .filter_map(|(_, m)| m.status())
            .collect::<Vec<_>>(),
        [480]
    );
    // A wrong password is challenged again and never reaches the callee.
    s.caller.password = "wrong";
    let out = s.h.send_flows(s.caller.flow, s.caller.invite("102"));
    assert_eq!(
        out.iter()
            .filter_map(|(_, m)| m.status())
            .collect::<Vec<_>>(),
        [407]
    );
    assert!(
        s.media.log.lock().unwrap().is_empty(),
        "no media leg for refused calls"
    );
}

#[test]
fn busy_callee_and_caller_cancel_end_the_call_with_a_record() {
    let mut s = call_setup();
    let invite = s.dial_invite("102");
    let out =
        s.h.send_flows(s.callee_flow, reply(&invite, 486, "Busy Here", None));
    assert!(
        out.iter()
            .any(|(f, m)| *f == s.caller.flow && m.status() == Some(486))
    );
    assert_eq!(s.h.calls.last().unwrap().outcome, Outcome::Busy);
    assert_eq!(s.h.core.call_count(), 0);

    // Again, and this time the caller gives up while it rings.
    s.caller.challenge = None;
    let invite = s.dial_invite("102");
    s.h.send_flows(s.callee_flow, reply(&invite, 180, "Ringing", None));
    let mut b = MessageBuilder::request("CANCEL", "sip:102@parley.test");
    b.header_fmt(
        HeaderName::Via,
        format_args!(
            "SIP/2.0/UDP {};branch=z9hG4bKinv{}",
            s.caller.flow.remote, s.caller.cseq
        ),
    );
    b.header(
        HeaderName::From,
        "\"Desk 100\" <sip:100@parley.test>;tag=caller100",
    );
    b.header(HeaderName::To, "<sip:102@parley.test>");
    b.header(HeaderName::CallId, "call-1@phone");
    b.header_fmt(HeaderName::CSeq, format_args!("{} CANCEL", s.caller.cseq));
    b.header(HeaderName::MaxForwards, "70");
    let out = s.h.send_flows(s.caller.flow, b.finish_with_body(None, b""));
    let statuses: Vec<_> = out
        .iter()
        .filter(|(f, _)| *f == s.caller.flow)
        .filter_map(|(_, m)| m.status())
        .collect();
    assert_eq!(statuses, [200, 487]);
    let (f, cancel) = out
        .iter()
        .find(|(_, m)| m.method() == Some(Method::Cancel))
        .expect("CANCEL to the callee");
    assert_eq!(*f, s.callee_flow);
    assert_eq!(
        cancel.top_via().unwrap().branch(),
        invite.top_via().unwrap().branch()
    );
    assert_eq!(s.h.calls.last().unwrap().outcome, Outcome::Cancelled);
    assert_eq!(s.h.core.call_count(), 0);

    // The callee picked up just as the CANCEL crossed: its 200 (and every
    // retransmission of it) is acknowledged, and it is hung up once.
    let ok = reply(&invite, 200, "OK", Some(&sdp_offer("192.168.1.30", 6000)));
    let out = s.h.send_flows(s.callee_flow, ok.clone());
    assert_eq!(requests_to(&out, s.callee_flow, Method::Ack).len(), 1);
    let byes = requests_to(&out, s.callee_flow, Method::Bye);
    assert_eq!(byes.len(), 1, "{out:?}");
    assert_eq!(byes[0].to().unwrap().tag(), Some("calleetag"));
    assert!(
        out.iter().all(|(f, _)| *f == s.callee_flow),
        "the caller is not bothered"
    );
    let out = s.h.send_flows(s.callee_flow, ok);
    assert_eq!(requests_to(&out, s.callee_flow, Method::Ack).len(), 1);
    assert!(requests_to(&out, s.callee_flow, Method::Bye).is_empty());
    assert_eq!(s.h.core.call_count(), 0);
}

fn report(id: u64, packets: u64) -> LegReport {
    LegReport {
        id: LegId(id),
        suite: None,
        remote: None,
        received_packets: packets,
        received_bytes: packets * 172,
        lost: 0,
        jitter_ms: 0.5,
        auth_failures: 0,
        rtcp_auth_failures: 0,
        replays: 0,
        wrong_source: 0,
        sent_packets: packets,
        sent_bytes: packets * 172,
        srtp_refused: 0,
        remote_fraction_lost: None,
        remote_jitter_ms: None,
        mos_received: Some(4.4),
        mos_sent: None,
    }
}

/// Dials 102 and has it answer; returns the caller's 200.
fn answered_call(s: &mut CallSetup) -> Message {
    answered_call_with_invite(s).1
}

/// Dials 102, has it answer and the caller acknowledge; returns the INVITE
/// the callee got and the caller's 200.
fn established_call(s: &mut CallSetup) -> (Message, Message) {
    let (invite, ok) = answered_call_with_invite(s);
    s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok));
    (invite, ok)
}

/// Dials 102 and has it answer; returns the INVITE the callee got and the
/// caller's 200.
fn answered_call_with_invite(s: &mut CallSetup) -> (Message, Message) {
    let invite = s.dial_invite("102");
    let answer = sdp_offer("192.168.1.30", 6000);
    let out =
        s.h.send_flows(s.callee_flow, reply(&invite, 200, "OK", Some(&answer)));
    let ok = out
        .into_iter()
        .find(|(_, m)| m.status() == Some(200))
        .unwrap()
        .1;
    (invite, ok)
}

#[test]
fn unanswered_calls_time_out_and_quiet_media_ends_a_call() {
    let mut s = call_setup();
    let invite = s.dial_invite("102");
    s.h.send_flows(s.callee_flow, reply(&invite, 180, "Ringing", None));
    // Nobody picks up: at the ring timeout the caller gets 480 and the
    // device a CANCEL.
    let target = s.h.now + Duration::from_secs(30);
    let mut sent = vec![];
    while let Some(t) = s.h.core.poll_timeout().filter(|t| *t <= target) {
        s.h.now = t.max(s.h.now);
        s.h.core.handle_timeout(s.h.now);
        sent.extend(s.h.drain_flows());
    }
    assert!(
        sent.iter()
            .any(|(f, m)| *f == s.caller.flow && m.status() == Some(480)),
        "{sent:?}"
    );
    assert!(
        sent.iter()
            .any(|(f, m)| *f == s.callee_flow && m.method() == Some(Method::Cancel))
    );
    assert_eq!(s.h.calls.last().unwrap().outcome, Outcome::NoAnswer);
    assert_eq!(s.h.core.call_count(), 0);

    // An answered call whose media goes quiet is hung up on both sides.
    s.caller.challenge = None;
    established_call(&mut s);
    let legs: Vec<LegId> = s
        .media
        .configured
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| *id)
        .collect();
    // A minute later the relay reports a leg that has been quiet since.
    s.h.advance(Duration::from_secs(60));
    s.h.core.handle_media_event(
        s.h.now,
        MediaEvent::Inactive {
            id: legs[0],
            idle: Duration::from_secs(60),
        },
    );
    let out = s.h.drain_flows();
    let byes: Vec<Flow> = out
        .iter()
        .filter(|(_, m)| m.method() == Some(Method::Bye))
        .map(|(f, _)| *f)
        .collect();
    assert_eq!(byes.len(), 2, "{out:?}");
    assert!(byes.contains(&s.caller.flow) && byes.contains(&s.callee_flow));
    assert_eq!(s.h.core.call_count(), 0);
    // Without statistics from the relay the record is written anyway.
    s.h.advance(Duration::from_secs(3));
    let cdr = s.h.calls.last().unwrap();
    assert_eq!(
        (cdr.ended_by, cdr.sip_reason.as_str()),
        (Some(EndedBy::Parley), "Media Timeout")
    );
}

#[test]
fn a_callee_that_cannot_do_its_required_srtp_fails_the_call_with_a_reason() {
    // 101 must use SRTP everywhere; its softphone registered over TLS from
    // outside. The caller (100, a LAN phone on UDP) may use plain RTP.
    for device_answer in [488, 200] {
        let mut s = call_setup();
        let remote = tls_from("198.51.100.9:40000", 7);
        let mut soft = phone("101", "pw101", remote);
        s.h.registers(&mut soft, remote);
        let out = s.dial("101");
        let (f, invite) = out
            .iter()
            .find(|(_, m)| m.method() == Some(Method::Invite))
            .unwrap();
        assert_eq!(*f, remote);
        let offer = String::from_utf8_lossy(invite.body()).into_owned();
        assert!(
            offer.contains("RTP/SAVP") && offer.contains("a=crypto:"),
            "{offer}"
        );
        // The device cannot do SRTP: it refuses, or answers plain RTP.
        let plain = sdp_offer("198.51.100.9", 7000);
        let reply_bytes = match device_answer {
            488 => reply(invite, 488, "Not Acceptable Here", None),
            _ => {
                let mut rb = MessageBuilder::response_to(invite, 200, "OK", Some("softtag"));
                rb.header(
                    HeaderName::Contact,
                    "<sip:101@198.51.100.9:40000;transport=tls>",
                );
                rb.finish_with_body(Some("application/sdp"), plain.as_bytes())
            }
        };
        let out = s.h.send_flows(remote, reply_bytes.clone());
        let (_, refusal) = out
            .iter()
            .find(|(f, m)| *f == s.caller.flow && m.status().is_some_and(|c| c >= 300))
            .unwrap_or_else(|| panic!("{device_answer}: a final answer to the caller: {out:?}"));
        assert_eq!(refusal.status(), Some(488));
        let expected = match device_answer {
            488 => "Callee Refused The Media Offer (SRTP Required By Policy)",
            _ => "SRTP Required By Encryption Policy",
        };
        assert_eq!(refusal.reason(), expected);
        if device_answer == 200 {
            // The device's plain answer is not used: it is hung up.
            assert!(
                out.iter()
                    .any(|(f, m)| *f == remote && m.method() == Some(Method::Bye)),
                "{out:?}"
            );
            // Its 200 again (our ACK lost): acknowledged, not hung up twice.
            let again = s.h.send_flows(remote, reply_bytes);
            let methods: Vec<_> = again.iter().filter_map(|(_, m)| m.method()).collect();
            assert_eq!(methods, [Method::Ack], "{again:?}");
        }
        assert_eq!(s.h.core.call_count(), 0);
    }
}

/// The caller re-INVITEs with `caller_dir` (hold, resume), the callee
/// agrees with `callee_dir`; checks what each side sees on the way.
/// The caller re-INVITEs with `caller_dir`; returns the re-INVITE Parley
/// relayed to the callee.
fn caller_sends_reinvite(s: &mut CallSetup, ok: &Message, caller_dir: &str) -> Message {
    let body = sdp_offer("192.168.1.20", 4000).replace("a=sendrecv", &format!("a={caller_dir}"));
    caller_sends_reinvite_with(s, ok, &body)
}

/// The caller's re-INVITE with `body` as its offer, in the dialog of `ok`.
fn caller_reinvite_bytes(s: &mut CallSetup, ok: &Message, body: &str) -> Bytes {
    s.caller.cseq += 1;
    let contact = NameAddr::parse(ok.header(HeaderName::Contact).unwrap())
        .unwrap()
        .uri
        .to_string();
    let mut b = MessageBuilder::request("INVITE", &contact);
    b.header_fmt(
        HeaderName::Via,
        format_args!(
            "SIP/2.0/UDP {};branch=z9hG4bKre{}",
            s.caller.flow.remote, s.caller.cseq
        ),
    );
    b.header(HeaderName::From, ok.header(HeaderName::From).unwrap());
    b.header(HeaderName::To, ok.header(HeaderName::To).unwrap());
    b.header(HeaderName::CallId, "call-1@phone");
    b.header_fmt(HeaderName::CSeq, format_args!("{} INVITE", s.caller.cseq));
    b.header_fmt(
        HeaderName::Contact,
        format_args!("<sip:100@{}>", s.caller.flow.remote),
    );
    b.finish_with_body(Some("application/sdp"), body.as_bytes())
}

/// The caller re-INVITEs with `body` as its offer; returns the re-INVITE
/// Parley relayed to the callee.
fn caller_sends_reinvite_with(s: &mut CallSetup, ok: &Message, body: &str) -> Message {
    let bytes = caller_reinvite_bytes(s, ok, body);
    let out = s.h.send_flows(s.caller.flow, bytes);
    assert!(
        out.iter()
            .any(|(f, m)| *f == s.caller.flow && m.status() == Some(100))
    );
    let (f, reinvite) = out
        .into_iter()
        .find(|(_, m)| m.method() == Some(Method::Invite))
        .expect("re-INVITE to the callee");
    assert_eq!(f, s.callee_flow);
    reinvite
}

fn caller_renegotiates(
    s: &mut CallSetup,
    invite: &Message,
    ok: &Message,
    caller_dir: &str,
    callee_dir: &str,
) {
    let reinvite = &caller_sends_reinvite(s, ok, caller_dir);
    // In the callee's dialog: its Call-ID and tags, the next CSeq.
    assert_eq!(reinvite.call_id(), invite.call_id());
    assert_eq!(reinvite.to().unwrap().tag(), Some("calleetag"));
    let offer = SessionDescription::parse(reinvite.body()).unwrap();
    assert_eq!(
        offer.media_direction(0),
        match caller_dir {
            "sendonly" => Direction::SendOnly,
            _ => Direction::SendRecv,
        }
    );
    let first = SessionDescription::parse(invite.body()).unwrap();
    assert_eq!(
        offer.media[0].port, first.media[0].port,
        "same leg, same port"
    );
    assert!(offer.origin.session_version > first.origin.session_version);

    // The callee agrees; Parley ACKs it and answers the caller.
    let answer = sdp_offer("192.168.1.30", 6000).replace("a=sendrecv", &format!("a={callee_dir}"));
    let out =
        s.h.send_flows(s.callee_flow, reply(reinvite, 200, "OK", Some(&answer)));
    let ack = out
        .iter()
        .find(|(_, m)| m.method() == Some(Method::Ack))
        .expect("ACK to the callee");
    assert_eq!(ack.1.cseq().unwrap().seq, reinvite.cseq().unwrap().seq);
    let (_, ok2) = out
        .iter()
        .find(|(f, m)| *f == s.caller.flow && m.status() == Some(200))
        .expect("200 to the caller");
    let to_caller = SessionDescription::parse(ok2.body()).unwrap();
    assert_eq!(to_caller.media_direction(0).name(), callee_dir);
}

#[test]
fn hold_and_resume_pass_through_to_the_other_side() {
    let mut s = call_setup();
    let invite = s.dial_invite("102");
    let answer = sdp_offer("192.168.1.30", 6000);
    let out =
        s.h.send_flows(s.callee_flow, reply(&invite, 200, "OK", Some(&answer)));
    let ok = out
        .into_iter()
        .find(|(_, m)| m.status() == Some(200))
        .unwrap()
        .1;
    s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok));
    let configured_before = s.media.configured.lock().unwrap().len();

    for (caller_dir, callee_dir) in [("sendonly", "recvonly"), ("sendrecv", "sendrecv")] {
        caller_renegotiates(&mut s, &invite, &ok, caller_dir, callee_dir);
        if caller_dir == "sendonly" {
            // Phones on hold may send nothing: quiet media is no reason to
            // end a held call.
            s.h.advance(Duration::from_secs(120));
            for id in leg_ids(&s) {
                s.h.core.handle_media_event(
                    s.h.now,
                    MediaEvent::Inactive {
                        id,
                        idle: Duration::from_secs(120),
                    },
                );
            }
            let out = s.h.drain_flows();
            assert!(
                !out.iter().any(|(_, m)| m.method() == Some(Method::Bye)),
                "{out:?}"
            );
            assert_eq!(s.h.core.call_count(), 1);
        }
    }
    // Each round reconfigured both legs; the call is still up.
    assert_eq!(
        s.media.configured.lock().unwrap().len(),
        configured_before + 4
    );
    assert_eq!(s.h.core.call_count(), 1);
    // A quiet report the relay sent before the resume reached it (its
    // silence began before the legs were reconfigured) is out of date.
    s.h.core.handle_media_event(
        s.h.now,
        MediaEvent::Inactive {
            id: leg_ids(&s)[0],
            idle: Duration::from_secs(120),
        },
    );
    assert_eq!(s.h.core.call_count(), 1);
    // Resumed, quiet media ends the call again.
    s.h.advance(Duration::from_secs(60));
    s.h.core.handle_media_event(
        s.h.now,
        MediaEvent::Inactive {
            id: leg_ids(&s)[0],
            idle: Duration::from_secs(60),
        },
    );
    let out = s.h.drain_flows();
    let byes = out
        .iter()
        .filter(|(_, m)| m.method() == Some(Method::Bye))
        .count();
    assert_eq!(byes, 2, "{out:?}");
    assert_eq!(s.h.core.call_count(), 0);
}

#[test]
fn a_held_call_whose_phone_vanished_ends_after_the_hold_timeout() {
    let mut s = call_setup();
    let (invite, ok) = established_call(&mut s);
    caller_renegotiates(&mut s, &invite, &ok, "sendonly", "recvonly");
    let legs = leg_ids(&s);
    let hold = Duration::from_secs(3600);
    let quiet = |s: &mut CallSetup, id| {
        s.h.core.handle_media_event(
            s.h.now,
            MediaEvent::Inactive {
                id,
                idle: Duration::from_secs(60),
            },
        )
    };
    // Phones sent a BYE (retransmissions over UDP counted once).
    let byes = |out: &[(Flow, Message)]| {
        let mut to: Vec<Flow> = out
            .iter()
            .filter(|(_, m)| m.method() == Some(Method::Bye))
            .map(|(f, _)| *f)
            .collect();
        to.dedup();
        to.sort_by_key(|f| f.remote);
        to.dedup();
        to.len()
    };
    // Quiet, then heard again (RTCP, say): the clock stops.
    s.h.advance(Duration::from_secs(60));
    quiet(&mut s, legs[0]);
    s.h.core
        .handle_media_event(s.h.now, MediaEvent::Active { id: legs[0] });
    let out = s.h.advance(hold);
    assert_eq!(byes(&out), 0, "{out:?}");
    // Quiet for good: the call ends once the silence reaches the limit
    // (it began 60 s before the relay reported it).
    quiet(&mut s, legs[1]);
    let out = s.h.advance(hold - Duration::from_secs(61));
    assert_eq!(byes(&out), 0, "{out:?}");
    assert_eq!(s.h.core.call_count(), 1);
    let out = s.h.advance(Duration::from_secs(2));
    assert_eq!(byes(&out), 2, "{out:?}");
    assert_eq!(s.h.core.call_count(), 0);
    s.h.advance(Duration::from_secs(3));
    let cdr = s.h.calls.last().unwrap();
    assert_eq!(cdr.sip_reason, "Media Timeout On Hold");

    // A resumed call does not inherit the quiet clock of its hold.
    let mut s = call_setup();
    let (invite, ok) = established_call(&mut s);
    caller_renegotiates(&mut s, &invite, &ok, "sendonly", "recvonly");
    s.h.advance(Duration::from_secs(60));
    let first = leg_ids(&s)[0];
    quiet(&mut s, first);
    caller_renegotiates(&mut s, &invite, &ok, "sendrecv", "sendrecv");
    caller_renegotiates(&mut s, &invite, &ok, "sendonly", "recvonly");
    let out = s.h.advance(hold);
    assert_eq!(byes(&out), 0, "{out:?}");
    assert_eq!(s.h.core.call_count(), 1);
}

/// The media legs configured so far, each once.
fn leg_ids(s: &CallSetup) -> Vec<LegId> {
    let mut ids: Vec<LegId> = Vec::new();
    for (id, _) in s.media.configured.lock().unwrap().iter() {
        if !ids.contains(id) {
            ids.push(*id);
        }
    }
    ids
}

// ---- NAT keep-alive ------------------------------------------------------

fn reachability(h: &Harness) -> Vec<bool> {
    h.events
        .iter()
        .filter_map(|e| match e {
            Event::Reachability(r) => Some(r.reachable),
            _ => None,
        })
        .collect()
}

/// The OPTIONS pings sent to `flow`, retransmissions left out.
fn options_to(sent: &[(Flow, Message)], flow: Flow) -> Vec<Message> {
    let mut pings: Vec<Message> = vec![];
    for (f, m) in sent {
        if *f == flow
            && m.method() == Some(Method::Options)
            && !pings.iter().any(|p| p.call_id() == m.call_id())
        {
            pings.push(m.clone());
        }
    }
    pings
}

fn sent_count(sent: &[(Flow, Message)], flow: Flow, method: Method) -> usize {
    sent.iter()
        .filter(|(f, m)| *f == flow && m.method() == Some(method))
        .count()
}

#[test]
fn remote_udp_contacts_are_pinged_and_skipped_while_unreachable() {
    let mut s = call_setup();
    // 102's softphone on the internet, over UDP (its policy is `off`).
    let remote = udp_from("198.51.100.7:40000");
    let mut soft = phone("102", "pw102", remote);
    s.h.registers(&mut soft, remote);

    // Pings go only to the remote contact, once per interval.
    let sent = s.h.advance(Duration::from_secs(26));
    let pings = options_to(&sent, remote);
    assert_eq!(pings.len(), 1, "one ping after one interval: {sent:?}");
    assert!(
        options_to(&sent, s.callee_flow).is_empty(),
        "LAN phones are not pinged"
    );
    assert!(pings[0].request_uri().contains("198.51.100.7:40000"));
    // Any answer proves the path; 405 as well as 200.
    let out =
        s.h.send_flows(remote, reply(&pings[0], 405, "Method Not Allowed", None));
    assert!(out.is_empty());
    assert!(reachability(&s.h).is_empty());

    // The next ping goes unanswered through all its retransmissions.
    let sent = s.h.advance(Duration::from_secs(25));
    assert_eq!(options_to(&sent, remote).len(), 1);
    let sent = s.h.advance(Duration::from_secs(33));
    assert!(
        sent_count(&sent, remote, Method::Options) > 3,
        "an unanswered ping is retransmitted over UDP"
    );
    assert_eq!(reachability(&s.h), [false]);

    // A call now rings only the desk phone.
    let out = s.dial("102");
    let invites: Vec<_> = out
        .iter()
        .filter(|(_, m)| m.method() == Some(Method::Invite))
        .map(|(f, _)| *f)
        .collect();
    assert_eq!(invites, [s.callee_flow]);

    // Registering again makes it reachable at once.
    s.h.registers(&mut soft, remote);
    assert_eq!(reachability(&s.h), [false, true]);
}

#[test]
fn an_unreachable_only_contact_gets_480_and_answering_a_ping_restores_it() {
    let mut s = call_setup();
    let remote = udp_from("198.51.100.7:40000");
    let mut soft = phone("102", "pw102", remote);
    s.h.register(&mut soft, remote);
    // Only the remote contact is left.
    let mut desk = phone("102", "pw102", s.callee_flow);
    desk.expires = 0;
    desk.call_id = "desk-unregisters".into();
    let (outcome, resp) = s.h.register(&mut desk, s.callee_flow);
    assert_eq!(outcome, RegisterOutcome::Unregistered, "{resp:?}");
    assert_eq!(s.h.core.registrar().bindings("102").len(), 1);
    s.h.advance(Duration::from_secs(26 + 25 + 33));
    assert_eq!(reachability(&s.h), [false]);
    let out = s.dial("102");
    assert_eq!(
        out.iter()
            .filter_map(|(_, m)| m.status())
            .collect::<Vec<_>>(),
        [480]
    );
    // Pings go on; the first answer brings the contact back.
    let sent = s.h.advance(Duration::from_secs(25));
    let pings = options_to(&sent, remote);
    assert!(!pings.is_empty());
    s.h.send_flows(remote, reply(pings.last().unwrap(), 200, "OK", None));
    assert_eq!(reachability(&s.h), [false, true]);
}

#[test]
fn keepalive_off_sends_nothing() {
    let mut c = cfg();
    c.keepalive = None;
    let mut h = Harness::new(c);
    let remote = udp_from("198.51.100.7:40000");
    let mut soft = phone("102", "pw102", remote);
    h.register(&mut soft, remote);
    assert!(h.advance(Duration::from_secs(300)).is_empty());
}

// ---- addresses -----------------------------------------------------------

struct FixedRoute(std::net::IpAddr);

impl LocalRoutes for FixedRoute {
    fn source_for(&self, _: std::net::IpAddr) -> Option<std::net::IpAddr> {
        Some(self.0)
    }
}

/// The `c=` address of an SDP body.
fn sdp_address(m: &Message) -> String {
    SessionDescription::parse(m.body())
        .unwrap()
        .connection
        .unwrap()
        .raw
}

#[test]
fn lan_phones_get_the_lan_address_and_remote_phones_the_public_one() {
    let mut c = cfg();
    c.advertise = Some("203.0.113.10".parse().unwrap());
    let mut h = Harness::new(c);
    let media = FakeMedia::default();
    h.core.set_media(Box::new(media.clone()));
    h.core
        .set_routes(Box::new(FixedRoute("192.168.1.5".parse().unwrap())));
    // Parley's UDP socket is bound to all addresses.
    let any = |remote: &str| Flow::udp(addr("0.0.0.0:5060"), addr(remote));
    let desk = any("192.168.1.20:5062");
    let soft = any("198.51.100.7:40000");
    let mut a = phone("100", "pw100", desk);
    h.register(&mut a, desk);
    let mut b = phone("102", "pw102", soft);
    h.register(&mut b, soft);
    let mut s = CallSetup {
        h,
        media,
        caller: Caller {
            user: "100",
            password: "pw100",
            flow: desk,
            cseq: 0,
            challenge: None,
            nc: 0,
            extra: vec![],
            offer: None,
        },
        callee_flow: soft,
    };
    let out = s.dial("102");
    let (_, invite) = out
        .iter()
        .find(|(f, m)| *f == soft && m.method() == Some(Method::Invite))
        .expect("the softphone rings");
    assert!(
        invite
            .top_via()
            .unwrap()
            .sent_by
            .starts_with("203.0.113.10:")
    );
    assert!(
        invite
            .header(HeaderName::Contact)
            .unwrap()
            .contains("@203.0.113.10:5060")
    );
    assert_eq!(sdp_address(invite), "203.0.113.10");

    let ok = s.h.send_flows(
        soft,
        reply(invite, 200, "OK", Some(&sdp_offer("198.51.100.7", 4000))),
    );
    let (_, answer) = ok
        .iter()
        .find(|(f, m)| *f == desk && m.status() == Some(200))
        .expect("the desk phone gets the answer");
    assert!(
        answer
            .header(HeaderName::Contact)
            .unwrap()
            .contains("@192.168.1.5:5060")
    );
    assert_eq!(sdp_address(answer), "192.168.1.5");
    // Media to the softphone must leave from the public address its SDP
    // names, which the routing table would not pick; towards the desk
    // phone it would, so its packets need not say.
    let configured = s.media.configured.lock().unwrap().clone();
    let local_ip_towards = |host: &str| {
        let host: std::net::IpAddr = host.parse().unwrap();
        configured
            .iter()
            .rev()
            .find(|(_, m)| m.remote_rtp.is_some_and(|a| a.ip() == host))
            .map(|(_, m)| m.local_ip)
            .expect("a leg towards that host")
    };
    assert_eq!(
        local_ip_towards("198.51.100.7"),
        Some("203.0.113.10".parse().unwrap())
    );
    assert_eq!(local_ip_towards("192.168.1.20"), None);
}

// ---- in-dialog requests ---------------------------------------------------

fn statuses_to(out: &[(Flow, Message)], flow: Flow) -> Vec<u16> {
    out.iter()
        .filter(|(f, _)| *f == flow)
        .filter_map(|(_, m)| m.status())
        .collect()
}

/// Requests of `method` sent to `flow`, retransmissions left out.
fn requests_to(out: &[(Flow, Message)], flow: Flow, method: Method) -> Vec<Message> {
    let mut found: Vec<Message> = vec![];
    for (f, m) in out {
        if *f == flow
            && m.method() == Some(method)
            && !found
                .iter()
                .any(|x| x.call_id() == m.call_id() && x.cseq() == m.cseq())
        {
            found.push(m.clone());
        }
    }
    found
}

#[test]
fn info_is_relayed_in_the_other_dialog_and_its_answer_returned() {
    let mut s = call_setup();
    let ok = answered_call(&mut s);
    s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok));
    let dtmf = "Signal=5\r\nDuration=160\r\n";
    let out = s.h.send_flows(
        s.caller.flow,
        s.caller
            .in_dialog_with("INFO", &ok, Some(("application/dtmf-relay", dtmf))),
    );
    let infos = requests_to(&out, s.callee_flow, Method::Info);
    assert_eq!(infos.len(), 1, "{out:?}");
    let info = &infos[0];
    assert_eq!(info.body(), dtmf.as_bytes());
    assert_eq!(
        info.header(HeaderName::ContentType),
        Some("application/dtmf-relay")
    );
    assert_eq!(info.to().unwrap().tag(), Some("calleetag"));
    assert!(statuses_to(&out, s.caller.flow).is_empty());
    let out = s.h.send_flows(s.callee_flow, reply(info, 200, "OK", None));
    assert_eq!(statuses_to(&out, s.caller.flow), [200]);

    // An INFO the other side never answers gets 408 back.
    let out = s.h.send_flows(
        s.caller.flow,
        s.caller
            .in_dialog_with("INFO", &ok, Some(("application/dtmf-relay", dtmf))),
    );
    assert_eq!(requests_to(&out, s.callee_flow, Method::Info).len(), 1);
    let later = s.h.advance(Duration::from_secs(40));
    assert_eq!(statuses_to(&later, s.caller.flow), [408]);
    assert_eq!(
        s.h.core.call_count(),
        1,
        "a lost INFO does not end the call"
    );
}

#[test]
fn update_and_offerless_reinvite_are_answered_by_parley_alone() {
    let mut s = call_setup();
    let ok = answered_call(&mut s);
    s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok));
    let first = SessionDescription::parse(ok.body()).unwrap();

    let out =
        s.h.send_flows(s.caller.flow, s.caller.in_dialog("UPDATE", &ok));
    assert_eq!(statuses_to(&out, s.caller.flow), [200]);
    assert!(
        out.iter().all(|(f, _)| *f == s.caller.flow),
        "the callee sees nothing"
    );

    // A re-INVITE without an offer: Parley offers what the caller has.
    let out =
        s.h.send_flows(s.caller.flow, s.caller.in_dialog("INVITE", &ok));
    let ok2 = out
        .iter()
        .find(|(f, m)| *f == s.caller.flow && m.status() == Some(200))
        .map(|(_, m)| m.clone())
        .expect("200 with an offer");
    assert!(
        out.iter().all(|(f, _)| *f == s.caller.flow),
        "the callee sees nothing"
    );
    let offer = SessionDescription::parse(ok2.body()).unwrap();
    assert_eq!(offer.media[0].port, first.media[0].port);
    assert_eq!(offer.connection, first.connection);
    // The answer comes in the ACK: the caller moved to another port.
    let before = s.media.configured.lock().unwrap().len();
    // The ACK's CSeq is the re-INVITE's (`in_dialog_with` takes the 200's).
    let ack = s.caller.in_dialog_with(
        "ACK",
        &ok2,
        Some(("application/sdp", &sdp_offer("192.168.1.20", 4100))),
    );
    s.h.send_flows(s.caller.flow, ack);
    let configured = s.media.configured.lock().unwrap();
    assert_eq!(configured.len(), before + 1);
    assert_eq!(
        configured.last().unwrap().1.remote_rtp.map(|a| a.port()),
        Some(4100)
    );
}

fn caller_ok(out: &[(Flow, Message)], flow: Flow) -> Message {
    out.iter()
        .find(|(f, m)| *f == flow && m.status() == Some(200))
        .map(|(_, m)| m.clone())
        .expect("a 200 for the caller")
}

#[test]
fn session_timers_are_granted_and_a_missed_refresh_ends_the_call() {
    let mut s = call_setup();
    s.caller.extra = vec![(HeaderName::SessionExpires, "60".into())];
    let out = s.dial("102");
    let refused = &out.last().unwrap().1;
    assert_eq!(refused.status(), Some(422));
    assert_eq!(refused.header(HeaderName::MinSe), Some("90"));

    s.caller.extra = vec![
        (HeaderName::SessionExpires, "120;refresher=uac".into()),
        (HeaderName::Supported, "timer".into()),
    ];
    s.caller.challenge = None;
    let ok = answered_call(&mut s);
    assert_eq!(
        ok.header(HeaderName::SessionExpires),
        Some("120;refresher=uac")
    );
    assert_eq!(ok.header(HeaderName::Require), Some("timer"));
    s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok));

    // Refreshed at 60 s with UPDATE: the call lives on past 88 s.
    s.h.advance(Duration::from_secs(60));
    let out =
        s.h.send_flows(s.caller.flow, s.caller.in_dialog("UPDATE", &ok));
    let refreshed = caller_ok(&out, s.caller.flow);
    assert_eq!(
        refreshed.header(HeaderName::SessionExpires),
        Some("120;refresher=uac")
    );
    let out = s.h.advance(Duration::from_secs(60));
    assert!(requests_to(&out, s.callee_flow, Method::Bye).is_empty());
    assert_eq!(s.h.core.call_count(), 1);

    // No refresh: ended 32 s before the session would expire.
    let out = s.h.advance(Duration::from_secs(30));
    assert_eq!(requests_to(&out, s.callee_flow, Method::Bye).len(), 1);
    assert_eq!(requests_to(&out, s.caller.flow, Method::Bye).len(), 1);
    assert_eq!(s.h.core.call_count(), 0);
    s.h.advance(Duration::from_secs(3));
    let record = s.h.calls.last().unwrap();
    assert_eq!(record.sip_reason, "Session Expired");
    assert_eq!(record.ended_by, Some(EndedBy::Parley));
}

#[test]
fn parley_refreshes_when_the_caller_asks_it_to() {
    for (allow, method) in [
        ("INVITE, ACK, BYE, CANCEL, UPDATE", Method::Update),
        ("INVITE, ACK, BYE, CANCEL", Method::Invite),
    ] {
        let mut s = call_setup();
        s.caller.extra = vec![
            (HeaderName::SessionExpires, "100;refresher=uas".into()),
            (HeaderName::Supported, "timer".into()),
            (HeaderName::Allow, allow.into()),
        ];
        let ok = answered_call(&mut s);
        assert_eq!(
            ok.header(HeaderName::SessionExpires),
            Some("100;refresher=uas")
        );
        s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok));
        let out = s.h.advance(Duration::from_secs(51));
        let refresh = requests_to(&out, s.caller.flow, method);
        assert_eq!(refresh.len(), 1, "{method:?} refresh: {out:?}");
        let refresh = &refresh[0];
        assert_eq!(refresh.call_id(), Some("call-1@phone"));
        assert_eq!(refresh.to().unwrap().tag(), Some("caller100"));
        assert_eq!(method == Method::Invite, !refresh.body().is_empty());
        // The caller answers from a new port: its leg follows.
        let answer = reply(
            refresh,
            200,
            "OK",
            (method == Method::Invite).then_some(&*sdp_offer("192.168.1.20", 4100)),
        );
        let out = s.h.send_flows(s.caller.flow, answer);
        assert_eq!(
            requests_to(&out, s.caller.flow, Method::Ack).len(),
            usize::from(method == Method::Invite)
        );
        assert!(requests_to(&out, s.callee_flow, Method::Invite).is_empty());
        assert_eq!(s.h.core.call_count(), 1);
        let followed = s
            .media
            .configured
            .lock()
            .unwrap()
            .last()
            .is_some_and(|(_, m)| m.remote_rtp == Some(addr("192.168.1.20:4100")));
        assert_eq!(followed, method == Method::Invite);
    }
}

#[test]
fn early_media_reaches_the_caller_before_the_answer() {
    let mut s = call_setup();
    let invite = s.dial_invite("102");
    let callee_sdp = sdp_offer("192.168.1.30", 6000);
    let out = s.h.send_flows(
        s.callee_flow,
        reply(&invite, 183, "Session Progress", Some(&callee_sdp)),
    );
    let progress = out
        .iter()
        .find(|(f, m)| *f == s.caller.flow && m.status() == Some(183))
        .map(|(_, m)| m.clone())
        .expect("183 with SDP to the caller");
    let early = SessionDescription::parse(progress.body()).unwrap();
    assert_eq!(early.connection.as_ref().unwrap().raw, "127.0.0.1");
    assert!(progress.to().unwrap().tag().is_some());
    let log = s.media.log.lock().unwrap().clone();
    assert!(log.iter().any(|l| l.starts_with("bridge")), "{log:?}");
    // A second 183 changes nothing; no 180 follows the 183.
    let out = s.h.send_flows(
        s.callee_flow,
        reply(&invite, 183, "Session Progress", Some(&callee_sdp)),
    );
    assert!(statuses_to(&out, s.caller.flow).is_empty(), "{out:?}");

    // The answer repeats what the 183 said, in the same dialog.
    let out =
        s.h.send_flows(s.callee_flow, reply(&invite, 200, "OK", Some(&callee_sdp)));
    let ok = caller_ok(&out, s.caller.flow);
    assert_eq!(ok.body(), progress.body());
    assert_eq!(ok.to().unwrap().tag(), progress.to().unwrap().tag());
}

// ---- forking, refusals, in-dialog from either side -------------------------

/// Early media from one device, the answer from another with other codecs:
/// the caller is in one dialog with Parley throughout, so the 200's
/// description carries a new `o=` version, or the caller could keep the
/// 183's codec while the answering device sends another.
#[test]
fn an_answer_that_differs_from_the_early_media_gets_a_new_version() {
    let mut s = call_setup();
    let (soft, desk_invite, soft_invite) = ring_both_devices(&mut s);
    let pcma_only = sdp_offer("192.168.1.30", 6000).replace("RTP/AVP 0 8", "RTP/AVP 8");
    assert_ne!(pcma_only, sdp_offer("192.168.1.30", 6000));
    let out = s.h.send_flows(
        s.callee_flow,
        reply(&desk_invite, 183, "Session Progress", Some(&pcma_only)),
    );
    let (_, progress) = out
        .iter()
        .find(|(f, m)| *f == s.caller.flow && m.status() == Some(183))
        .expect("183 to the caller");
    let early = SessionDescription::parse(progress.body()).unwrap();
    let out = s.h.send_flows(soft, soft_answers(&soft_invite));
    let ok = caller_ok(&out, s.caller.flow);
    let answer = SessionDescription::parse(ok.body()).unwrap();
    assert_ne!(answer.media[0].formats, early.media[0].formats);
    assert_eq!(answer.origin.session_id, early.origin.session_id);
    assert!(answer.origin.session_version > early.origin.session_version);
}

/// Contact of the second device of 102 (see `add_callee_device`).
const SOFT_CONTACT: &str = "<sip:102@192.168.1.31:5064>";

/// Registers a second device of 102 at `remote`; returns its flow.
fn add_callee_device(s: &mut CallSetup, remote: &str) -> Flow {
    let flow = udp_from(remote);
    let mut soft = phone("102", "pw102", flow);
    s.h.registers(&mut soft, flow);
    assert_eq!(s.h.core.registrar().bindings("102").len(), 2);
    flow
}

/// Registers the softphone of 102 at 192.168.1.31:5064 beside its desk
/// phone and dials 102: the softphone's flow, and the INVITEs the desk
/// phone and the softphone got.
fn ring_both_devices(s: &mut CallSetup) -> (Flow, Message, Message) {
    let soft = add_callee_device(s, "192.168.1.31:5064");
    let out = s.dial("102");
    (soft, invite_to(&out, s.callee_flow), invite_to(&out, soft))
}

/// The softphone (see `ring_both_devices`) answering `invite` with 200
/// and its SDP.
fn soft_answers(invite: &Message) -> Bytes {
    reply_as(
        invite,
        200,
        "OK",
        Some(&sdp_offer("192.168.1.31", 7000)),
        "softtag",
        SOFT_CONTACT,
    )
}

/// The one INVITE Parley sent to `flow`.
fn invite_to(out: &[(Flow, Message)], flow: Flow) -> Message {
    let invites = requests_to(out, flow, Method::Invite);
    assert_eq!(invites.len(), 1, "one INVITE to {flow:?}: {out:?}");
    invites.into_iter().next().unwrap()
}

/// The responses sent to `flow`, as (status, reason, CSeq method).
fn answers_to(out: &[(Flow, Message)], flow: Flow) -> Vec<(u16, String, Method)> {
    out.iter()
        .filter(|(f, _)| *f == flow)
        .filter_map(|(_, m)| Some((m.status()?, m.reason().to_string(), m.cseq()?.method)))
        .collect()
}

fn media_log(s: &CallSetup) -> Vec<String> {
    s.media.log.lock().unwrap().clone()
}

#[test]
fn forked_call_rings_every_device_and_the_first_answer_wins() {
    let mut s = call_setup();
    let soft = add_callee_device(&mut s, "192.168.1.31:5064");
    let out = s.dial("102");
    assert_eq!(statuses_to(&out, s.caller.flow), [100]);
    let desk_invite = invite_to(&out, s.callee_flow);
    let soft_invite = invite_to(&out, soft);
    // One call towards the callee: one Call-ID and From tag, a transaction
    // and a media leg per device.
    assert_eq!(desk_invite.call_id(), soft_invite.call_id());
    assert_eq!(
        desk_invite.from().unwrap().tag(),
        soft_invite.from().unwrap().tag()
    );
    assert_ne!(
        desk_invite.top_via().unwrap().branch(),
        soft_invite.top_via().unwrap().branch()
    );
    let desk_port = SessionDescription::parse(desk_invite.body()).unwrap().media[0].port;
    assert_ne!(
        desk_port,
        SessionDescription::parse(soft_invite.body()).unwrap().media[0].port
    );
    assert!(soft_invite.request_uri().contains("192.168.1.31:5064"));

    // Both ring; the caller hears one 180.
    let out =
        s.h.send_flows(s.callee_flow, reply(&desk_invite, 180, "Ringing", None));
    assert_eq!(statuses_to(&out, s.caller.flow), [180]);
    let out = s.h.send_flows(
        soft,
        reply_as(&soft_invite, 180, "Ringing", None, "softtag", SOFT_CONTACT),
    );
    assert!(out.is_empty(), "one 180 is enough: {out:?}");

    // The softphone answers first: ACK to it, CANCEL to the desk phone,
    // exactly one 200 to the caller.
    let soft_ok = soft_answers(&soft_invite);
    let out = s.h.send_flows(soft, soft_ok.clone());
    assert_eq!(statuses_to(&out, s.caller.flow), [200]);
    let ok = caller_ok(&out, s.caller.flow);
    assert_eq!(requests_to(&out, soft, Method::Ack).len(), 1);
    assert!(requests_to(&out, soft, Method::Cancel).is_empty());
    let cancels = requests_to(&out, s.callee_flow, Method::Cancel);
    assert_eq!(cancels.len(), 1, "{out:?}");
    assert_eq!(
        cancels[0].top_via().unwrap().branch(),
        desk_invite.top_via().unwrap().branch()
    );
    assert_eq!(cancels[0].request_uri(), desk_invite.request_uri());
    assert_eq!(cancels[0].cseq().unwrap().seq, 1);
    assert_eq!(cancels[0].cseq().unwrap().method, Method::Cancel);
    assert_eq!(
        s.media
            .configured
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .1
            .remote_rtp,
        Some(addr("192.168.1.31:7000")),
        "the caller is bridged to the softphone"
    );
    // The desk phone's leg (FakeMedia port 30000 + 2n) closed with its CANCEL.
    let desk_leg = format!("close {}", (desk_port - 30_000) / 2);
    assert!(media_log(&s).contains(&desk_leg), "{:?}", media_log(&s));

    // The desk phone picked up as the CANCEL crossed: its 200 is ACKed and
    // hung up; the caller sees nothing of it.
    let desk_ok = reply(
        &desk_invite,
        200,
        "OK",
        Some(&sdp_offer("192.168.1.30", 6000)),
    );
    let out = s.h.send_flows(s.callee_flow, desk_ok.clone());
    assert_eq!(requests_to(&out, s.callee_flow, Method::Ack).len(), 1);
    let byes = requests_to(&out, s.callee_flow, Method::Bye);
    assert_eq!(byes.len(), 1, "{out:?}");
    assert_eq!(byes[0].to().unwrap().tag(), Some("calleetag"));
    assert_eq!(byes[0].call_id(), desk_invite.call_id());
    assert!(
        out.iter().all(|(f, _)| *f == s.callee_flow),
        "the caller sees nothing more: {out:?}"
    );
    // Its retransmitted 200 is ACKed again but hung up only once.
    let out = s.h.send_flows(s.callee_flow, desk_ok.clone());
    assert_eq!(requests_to(&out, s.callee_flow, Method::Ack).len(), 1);
    assert!(
        requests_to(&out, s.callee_flow, Method::Bye).is_empty(),
        "{out:?}"
    );
    assert!(out.iter().all(|(f, _)| *f == s.callee_flow));
    s.h.send_flows(s.callee_flow, reply(&byes[0], 200, "OK", None));

    // The winner repeats its 200 (its ACK was lost): ACKed again, and the
    // call goes on.
    let out = s.h.send_flows(soft, soft_ok);
    assert_eq!(requests_to(&out, soft, Method::Ack).len(), 1);
    assert!(requests_to(&out, soft, Method::Bye).is_empty(), "{out:?}");
    assert!(out.iter().all(|(f, _)| *f == soft));
    assert_eq!(s.h.core.call_count(), 1);

    // The caller hangs up: only the softphone gets a BYE.
    s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok));
    let out =
        s.h.send_flows(s.caller.flow, s.caller.in_dialog("BYE", &ok));
    assert_eq!(statuses_to(&out, s.caller.flow), [200]);
    let byes = requests_to(&out, soft, Method::Bye);
    assert_eq!(byes.len(), 1);
    assert_eq!(byes[0].to().unwrap().tag(), Some("softtag"));
    assert!(requests_to(&out, s.callee_flow, Method::Bye).is_empty());
    // Even after the call, the desk phone's 200 is still only ACKed.
    let out = s.h.send_flows(s.callee_flow, desk_ok);
    assert_eq!(requests_to(&out, s.callee_flow, Method::Ack).len(), 1);
    assert!(requests_to(&out, s.callee_flow, Method::Bye).is_empty());
    s.h.advance(Duration::from_secs(3));
    let cdr = s.h.calls.last().unwrap();
    assert_eq!(
        (cdr.outcome, cdr.ended_by, cdr.sip_status),
        (Outcome::Answered, Some(EndedBy::Caller), 200)
    );
}

#[test]
fn every_device_busy_gives_the_caller_one_486() {
    let mut s = call_setup();
    let (soft, desk_invite, soft_invite) = ring_both_devices(&mut s);

    let out =
        s.h.send_flows(s.callee_flow, reply(&desk_invite, 486, "Busy Here", None));
    // The transaction layer ACKs the 486; the caller waits for the other.
    assert_eq!(requests_to(&out, s.callee_flow, Method::Ack).len(), 1);
    assert!(statuses_to(&out, s.caller.flow).is_empty(), "{out:?}");
    assert_eq!(s.h.core.call_count(), 1);

    let out = s.h.send_flows(
        soft,
        reply_as(
            &soft_invite,
            486,
            "Busy Here",
            None,
            "softtag",
            SOFT_CONTACT,
        ),
    );
    assert_eq!(requests_to(&out, soft, Method::Ack).len(), 1);
    assert_eq!(
        answers_to(&out, s.caller.flow),
        [(486, "Busy Here".to_string(), Method::Invite)]
    );
    assert!(requests_to(&out, s.callee_flow, Method::Cancel).is_empty());
    assert_eq!(s.h.core.call_count(), 0);
    let cdr = s.h.calls.last().unwrap();
    assert_eq!(
        (cdr.outcome, cdr.sip_status, cdr.sip_reason.as_str()),
        (Outcome::Busy, 486, "Busy Here")
    );
    assert_eq!((cdr.caller.as_str(), cdr.callee.as_str()), ("100", "102"));
    assert!(cdr.answered_unix_ms.is_none() && cdr.callee_leg.is_none());
    assert_eq!(cdr.ended_by, None);
    let log = media_log(&s);
    for leg in ["close 1", "close 2", "close 3"] {
        assert!(log.contains(&leg.to_string()), "{leg} missing: {log:?}");
    }
}

#[test]
fn caller_cancel_while_two_devices_ring_cancels_every_fork() {
    let mut s = call_setup();
    let (soft, desk_invite, soft_invite) = ring_both_devices(&mut s);
    s.h.send_flows(s.callee_flow, reply(&desk_invite, 180, "Ringing", None));
    s.h.send_flows(
        soft,
        reply_as(&soft_invite, 180, "Ringing", None, "softtag", SOFT_CONTACT),
    );

    let out = s.h.send_flows(s.caller.flow, s.caller.cancel("102"));
    assert_eq!(
        answers_to(&out, s.caller.flow),
        [
            (200, "OK".to_string(), Method::Cancel),
            (487, "Request Terminated".to_string(), Method::Invite)
        ]
    );
    for (flow, invite) in [(s.callee_flow, &desk_invite), (soft, &soft_invite)] {
        let cancels = requests_to(&out, flow, Method::Cancel);
        assert_eq!(cancels.len(), 1, "a CANCEL to {flow:?}: {out:?}");
        assert_eq!(
            cancels[0].top_via().unwrap().branch(),
            invite.top_via().unwrap().branch()
        );
        assert_eq!(cancels[0].call_id(), invite.call_id());
    }
    assert_eq!(s.h.core.call_count(), 0);
    let cdr = s.h.calls.last().unwrap();
    assert_eq!(
        (cdr.outcome, cdr.ended_by, cdr.sip_status),
        (Outcome::Cancelled, Some(EndedBy::Caller), 487)
    );

    // The devices' 487s are ACKed and reach nobody else.
    let out = s.h.send_flows(
        s.callee_flow,
        reply(&desk_invite, 487, "Request Terminated", None),
    );
    assert_eq!(requests_to(&out, s.callee_flow, Method::Ack).len(), 1);
    assert!(out.iter().all(|(f, _)| *f == s.callee_flow), "{out:?}");
    let out = s.h.send_flows(
        soft,
        reply_as(
            &soft_invite,
            487,
            "Request Terminated",
            None,
            "softtag",
            SOFT_CONTACT,
        ),
    );
    assert!(out.iter().all(|(f, _)| *f == soft), "{out:?}");
}

#[test]
fn a_declining_callee_gets_the_caller_603() {
    let mut s = call_setup();
    let out = s.dial("102");
    let invite = invite_to(&out, s.callee_flow);
    let out =
        s.h.send_flows(s.callee_flow, reply(&invite, 603, "Decline", None));
    assert_eq!(
        answers_to(&out, s.caller.flow),
        [(603, "Decline".to_string(), Method::Invite)]
    );
    let cdr = s.h.calls.last().unwrap();
    assert_eq!((cdr.outcome, cdr.sip_status), (Outcome::Declined, 603));
    assert_eq!(s.h.core.call_count(), 0);

    // With two devices, one unavailable and one declining: the decline is
    // the more telling answer.
    let soft = add_callee_device(&mut s, "192.168.1.31:5064");
    s.caller.challenge = None;
    let out = s.dial("102");
    let desk_invite = invite_to(&out, s.callee_flow);
    let soft_invite = invite_to(&out, soft);
    let out = s.h.send_flows(
        s.callee_flow,
        reply(&desk_invite, 480, "Temporarily Unavailable", None),
    );
    assert!(statuses_to(&out, s.caller.flow).is_empty());
    let out = s.h.send_flows(
        soft,
        reply_as(&soft_invite, 603, "Decline", None, "softtag", SOFT_CONTACT),
    );
    assert_eq!(
        answers_to(&out, s.caller.flow),
        [(603, "Decline".to_string(), Method::Invite)]
    );
    assert_eq!(s.h.calls.last().unwrap().outcome, Outcome::Declined);
}

#[test]
fn invite_with_a_stale_nonce_is_rechallenged_with_stale_true() {
    let mut s = call_setup();
    let first = s.h.send_flows(s.caller.flow, s.caller.invite("102"));
    assert_eq!(first[0].1.status(), Some(407));
    s.caller.challenge = Some(proxy_challenge(&first[0].1));
    s.h.advance(Duration::from_secs(301));
    let out = s.h.send_flows(s.caller.flow, s.caller.invite("102"));
    assert_eq!(out.len(), 1, "{out:?}");
    let resp = &out[0].1;
    assert_eq!(
        (resp.status(), resp.reason()),
        (Some(407), "Proxy Authentication Required")
    );
    let challenges: Vec<_> = resp.headers(HeaderName::ProxyAuthenticate).collect();
    assert_eq!(challenges.len(), 2);
    assert!(challenges.iter().all(|c| c.contains("stale=true")));
    assert!(resp.header(HeaderName::WwwAuthenticate).is_none());
    assert!(s.h.security().is_empty(), "a stale nonce is not a failure");
    assert!(s.h.calls.is_empty(), "no record for a challenged INVITE");

    // Answering the fresh nonce gets the call through.
    s.caller.nc = 0;
    s.caller.challenge = Some(Challenge::parse(challenges.last().unwrap()).unwrap());
    let out = s.h.send_flows(s.caller.flow, s.caller.invite("102"));
    assert_eq!(statuses_to(&out, s.caller.flow), [100]);
    invite_to(&out, s.callee_flow);
}

#[test]
fn repeated_wrong_passwords_on_invite_lock_the_caller_out() {
    let mut s = call_setup();
    s.caller.password = "old-password";
    let first = s.h.send_flows(s.caller.flow, s.caller.invite("102"));
    s.caller.challenge = Some(proxy_challenge(&first[0].1));
    for _ in 0..3 {
        let out = s.h.send_flows(s.caller.flow, s.caller.invite("102"));
        assert_eq!(statuses_to(&out, s.caller.flow), [407]);
    }
    let security = s.h.security();
    assert_eq!(
        security
            .iter()
            .filter(|e| matches!(e, SecurityEvent::AuthFailed { .. }))
            .count(),
        3
    );
    assert!(
        security.iter().any(|e| matches!(
            e,
            SecurityEvent::Blocked {
                scope: BlockScope::SourceAndExtension,
                failures: 3,
                ..
            }
        )),
        "the block is reported as for REGISTER: {security:?}"
    );
    // The right password from that address is refused now, for calls and
    // registrations alike; nothing reaches the callee.
    s.caller.password = "pw100";
    let out = s.h.send_flows(s.caller.flow, s.caller.invite("102"));
    assert_eq!(
        answers_to(&out, s.caller.flow),
        [(403, "Too Many Failed Attempts".to_string(), Method::Invite)]
    );
    assert!(out.iter().all(|(f, _)| *f == s.caller.flow));
    let mut desk = phone("100", "pw100", s.caller.flow);
    let resp = s.h.send(s.caller.flow, desk.build()).pop().unwrap();
    assert_eq!(
        (resp.status(), resp.reason()),
        (Some(403), "Too Many Failed Attempts")
    );
    assert!(media_log(&s).is_empty(), "no leg for refused calls");

    // The block ends (the callee, whose binding lapsed meanwhile, registers
    // again).
    s.h.advance(Duration::from_secs(901));
    let mut callee = phone("102", "pw102", s.callee_flow);
    s.h.register(&mut callee, s.callee_flow);
    s.caller.challenge = None;
    let out = s.dial("102");
    invite_to(&out, s.callee_flow);
}

#[test]
fn a_successful_invite_clears_earlier_failures_as_a_registration_does() {
    let mut s = call_setup();
    let first = s.h.send_flows(s.caller.flow, s.caller.invite("102"));
    s.caller.challenge = Some(proxy_challenge(&first[0].1));
    let attempt = |s: &mut CallSetup, password: &'static str| {
        s.caller.password = password;
        s.h.send_flows(s.caller.flow, s.caller.invite("102"))
    };
    for _ in 0..2 {
        assert_eq!(statuses_to(&attempt(&mut s, "typo"), s.caller.flow), [407]);
    }
    let out = attempt(&mut s, "pw100");
    invite_to(&out, s.callee_flow);
    let out = s.h.send_flows(s.caller.flow, s.caller.cancel("102"));
    assert_eq!(statuses_to(&out, s.caller.flow), [200, 487]);
    // One more typo is the first of a new count, not the third.
    assert_eq!(statuses_to(&attempt(&mut s, "typo"), s.caller.flow), [407]);
    let out = attempt(&mut s, "pw100");
    assert_eq!(statuses_to(&out, s.caller.flow), [100], "{out:?}");
    assert!(
        !s.h.security()
            .iter()
            .any(|e| matches!(e, SecurityEvent::Blocked { .. }))
    );
}

#[test]
fn invite_policy_refuses_plain_signaling_from_outside_the_lan_after_credentials() {
    let mut s = call_setup();
    // 100 is `required-remote`; this INVITE comes over UDP from the internet.
    s.caller.flow = udp_from("198.51.100.9:5060");
    s.caller.password = "guess";
    let first = s.h.send_flows(s.caller.flow, s.caller.invite("102"));
    s.caller.challenge = Some(proxy_challenge(&first[0].1));
    // A wrong password learns nothing about the policy.
    let out = s.h.send_flows(s.caller.flow, s.caller.invite("102"));
    assert_eq!(statuses_to(&out, s.caller.flow), [407]);
    assert!(
        !s.h.security()
            .iter()
            .any(|e| matches!(e, SecurityEvent::PolicyViolation { .. }))
    );

    s.caller.password = "pw100";
    let out = s.h.send_flows(s.caller.flow, s.caller.invite("102"));
    assert_eq!(
        answers_to(&out, s.caller.flow),
        [(
            403,
            "TLS Required Outside The LAN".to_string(),
            Method::Invite
        )]
    );
    assert!(out.iter().all(|(f, _)| *f == s.caller.flow), "{out:?}");
    assert!(s.h.security().iter().any(|e| matches!(
        e,
        SecurityEvent::PolicyViolation {
            transport: Transport::Udp,
            ..
        }
    )));
    let cdr = s.h.calls.last().unwrap();
    assert_eq!(
        (cdr.outcome, cdr.sip_status, cdr.sip_reason.as_str()),
        (Outcome::Rejected, 403, "TLS Required Outside The LAN")
    );
    assert!(media_log(&s).is_empty());
    assert_eq!(s.h.core.call_count(), 0);
}

/// A request from the callee's device inside the dialog Parley's `invite`
/// opened with it (the device answered with tag `calleetag`).
fn callee_in_dialog(
    invite: &Message,
    flow: Flow,
    method: &str,
    seq: u32,
    body: Option<(&str, &str)>,
) -> Bytes {
    let target = NameAddr::parse(invite.header(HeaderName::Contact).unwrap())
        .unwrap()
        .uri
        .to_string();
    let mut b = MessageBuilder::request(method, &target);
    b.header_fmt(
        HeaderName::Via,
        format_args!(
            "SIP/2.0/UDP {};branch=z9hG4bKcallee{method}{seq}",
            flow.remote
        ),
    );
    b.header(HeaderName::MaxForwards, "70");
    b.header_fmt(
        HeaderName::From,
        format_args!("{};tag=calleetag", invite.header(HeaderName::To).unwrap()),
    );
    b.header(HeaderName::To, invite.header(HeaderName::From).unwrap());
    b.header(HeaderName::CallId, invite.call_id().unwrap());
    b.header_fmt(HeaderName::CSeq, format_args!("{seq} {method}"));
    b.header(HeaderName::Contact, "<sip:102@192.168.1.30:5062>");
    match body {
        Some((ctype, body)) => b.finish_with_body(Some(ctype), body.as_bytes()),
        None => b.finish_with_body(None, b""),
    }
}

/// The callee sends a re-INVITE with `sdp` in its dialog, CSeq `seq`;
/// returns what Parley sent.
fn callee_reinvites(
    s: &mut CallSetup,
    invite: &Message,
    seq: u32,
    sdp: &str,
) -> Vec<(Flow, Message)> {
    let flow = s.callee_flow;
    let request = callee_in_dialog(invite, flow, "INVITE", seq, Some(("application/sdp", sdp)));
    s.h.send_flows(flow, request)
}

/// The caller's device answering a request Parley sent it in its dialog.
fn caller_answer(req: &Message, status: u16, reason: &str, sdp: Option<&str>) -> Bytes {
    let mut b = MessageBuilder::response_to(req, status, reason, None);
    b.header(HeaderName::Contact, "<sip:100@192.168.1.20:5062>");
    match sdp {
        Some(body) => b.finish_with_body(Some("application/sdp"), body.as_bytes()),
        None => b.finish_with_body(None, b""),
    }
}

#[test]
fn a_reinvite_from_the_callee_is_relayed_to_the_caller_and_answered() {
    let mut s = call_setup();
    let (invite, ok) = established_call(&mut s);
    let configured_before = s.media.configured.lock().unwrap().len();

    // The callee puts the call on hold, from a new port.
    let hold = sdp_offer("192.168.1.30", 6100).replace("a=sendrecv", "a=sendonly");
    let out = callee_reinvites(&mut s, &invite, 1, &hold);
    assert_eq!(statuses_to(&out, s.callee_flow), [100]);
    let reinvites = requests_to(&out, s.caller.flow, Method::Invite);
    assert_eq!(reinvites.len(), 1, "{out:?}");
    let reinvite = &reinvites[0];
    // In the caller's dialog: its Call-ID and tags, towards its Contact.
    assert_eq!(reinvite.call_id(), Some("call-1@phone"));
    assert_eq!(reinvite.to().unwrap().tag(), Some("caller100"));
    assert_eq!(reinvite.from().unwrap().tag(), ok.to().unwrap().tag());
    assert_eq!(reinvite.request_uri(), "sip:100@192.168.1.20:5062");
    let offer = SessionDescription::parse(reinvite.body()).unwrap();
    let first = SessionDescription::parse(ok.body()).unwrap();
    assert_eq!(offer.media_direction(0), Direction::SendOnly);
    assert_eq!(offer.media[0].port, first.media[0].port, "same leg");
    assert_eq!(offer.connection, first.connection);
    assert!(offer.origin.session_version > first.origin.session_version);
    let text = String::from_utf8_lossy(reinvite.as_bytes());
    assert!(!text.contains("192.168.1.30"), "callee leaked:\n{text}");

    // The caller agrees: Parley ACKs it and answers the callee.
    let agreed = sdp_offer("192.168.1.20", 4000).replace("a=sendrecv", "a=recvonly");
    let out = s.h.send_flows(
        s.caller.flow,
        caller_answer(reinvite, 200, "OK", Some(&agreed)),
    );
    let acks = requests_to(&out, s.caller.flow, Method::Ack);
    assert_eq!(acks.len(), 1, "{out:?}");
    assert_eq!(acks[0].cseq().unwrap().seq, reinvite.cseq().unwrap().seq);
    assert_eq!(acks[0].call_id(), Some("call-1@phone"));
    let ok2 = caller_ok(&out, s.callee_flow);
    assert_eq!(ok2.cseq().unwrap().method, Method::Invite);
    assert_eq!(ok2.call_id(), invite.call_id());
    let answer = SessionDescription::parse(ok2.body()).unwrap();
    assert_eq!(answer.media_direction(0), Direction::RecvOnly);
    let to_callee = SessionDescription::parse(invite.body()).unwrap();
    assert_eq!(answer.media[0].port, to_callee.media[0].port);
    assert!(!String::from_utf8_lossy(ok2.as_bytes()).contains("192.168.1.20"));
    let configured = s.media.configured.lock().unwrap().clone();
    assert_eq!(configured.len(), configured_before + 2);
    assert!(
        configured
            .iter()
            .any(|(_, m)| m.remote_rtp == Some(addr("192.168.1.30:6100"))),
        "the callee's leg follows its new port"
    );

    // The callee hangs up: the caller gets the BYE.
    let out = s.h.send_flows(
        s.callee_flow,
        callee_in_dialog(&invite, s.callee_flow, "BYE", 2, None),
    );
    assert_eq!(statuses_to(&out, s.callee_flow), [200]);
    let byes = requests_to(&out, s.caller.flow, Method::Bye);
    assert_eq!(byes.len(), 1);
    assert_eq!(byes[0].to().unwrap().tag(), Some("caller100"));
    assert_eq!(s.h.core.call_count(), 0);
    s.h.advance(Duration::from_secs(3));
    assert_eq!(s.h.calls.last().unwrap().ended_by, Some(EndedBy::Callee));
}

/// RFC 3264 §8: once the callee's own re-offer added a stream (video,
/// which Parley declines), every later offer to the callee keeps that
/// m= line, declined, or the callee refuses it.
#[test]
fn offers_to_the_callee_keep_the_streams_its_session_has() {
    let mut s = call_setup();
    let (invite, ok) = established_call(&mut s);
    let with_video = format!(
        "{}m=video 6002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n",
        sdp_offer("192.168.1.30", 6000)
    );
    let out = callee_reinvites(&mut s, &invite, 2, &with_video);
    let relayed = requests_to(&out, s.caller.flow, Method::Invite).remove(0);
    let agreed = sdp_offer("192.168.1.20", 4000);
    let out = s.h.send_flows(
        s.caller.flow,
        caller_answer(&relayed, 200, "OK", Some(&agreed)),
    );
    let to_callee = caller_ok(&out, s.callee_flow);
    let answer = SessionDescription::parse(to_callee.body()).unwrap();
    let layout: Vec<(&str, bool)> = answer
        .media
        .iter()
        .map(|m| (m.media.as_str(), m.port != 0))
        .collect();
    assert_eq!(layout, [("audio", true), ("video", false)]);

    // The caller holds: the callee's offer has both lines again.
    let hold = sdp_offer("192.168.1.20", 4000).replace("a=sendrecv", "a=sendonly");
    let reinvite = caller_reinvite_bytes(&mut s, &ok, &hold);
    let out = s.h.send_flows(s.caller.flow, reinvite);
    let to_callee = requests_to(&out, s.callee_flow, Method::Invite);
    assert_eq!(to_callee.len(), 1, "{out:?}");
    let offer = SessionDescription::parse(to_callee[0].body()).unwrap();
    let layout: Vec<(&str, bool)> = offer
        .media
        .iter()
        .map(|m| (m.media.as_str(), m.port != 0))
        .collect();
    assert_eq!(layout, [("audio", true), ("video", false)]);
    assert_eq!(offer.media_direction(0), Direction::SendOnly);
}

#[test]
fn a_reinvite_changing_the_codec_reaches_the_other_side_with_that_codec() {
    let mut s = call_setup();
    let (_, ok) = established_call(&mut s);
    assert_eq!(
        SessionDescription::parse(ok.body()).unwrap().media[0].formats,
        ["0", "8", "101"]
    );

    // Only PCMA from now on.
    let pcma = sdp_offer("192.168.1.20", 4000)
        .replace("RTP/AVP 0 8 101", "RTP/AVP 8 101")
        .replace("a=rtpmap:0 PCMU/8000\r\n", "");
    let out = s.h.send_flows(
        s.caller.flow,
        s.caller
            .in_dialog_with("INVITE", &ok, Some(("application/sdp", &pcma))),
    );
    assert_eq!(statuses_to(&out, s.caller.flow), [100]);
    let reinvite = requests_to(&out, s.callee_flow, Method::Invite);
    assert_eq!(reinvite.len(), 1, "{out:?}");
    let offer = SessionDescription::parse(reinvite[0].body()).unwrap();
    assert_eq!(offer.media[0].formats, ["8", "101"]);
    let rtpmaps: Vec<_> = offer.media[0]
        .attributes
        .iter()
        .filter(|a| a.name == "rtpmap")
        .filter_map(|a| a.value.clone())
        .collect();
    assert_eq!(rtpmaps, ["8 PCMA/8000", "101 telephone-event/8000"]);

    let answer = sdp_offer("192.168.1.30", 6000)
        .replace("RTP/AVP 0 8 101", "RTP/AVP 8 101")
        .replace("a=rtpmap:0 PCMU/8000\r\n", "");
    let out =
        s.h.send_flows(s.callee_flow, reply(&reinvite[0], 200, "OK", Some(&answer)));
    assert_eq!(requests_to(&out, s.callee_flow, Method::Ack).len(), 1);
    let ok2 = caller_ok(&out, s.caller.flow);
    let to_caller = SessionDescription::parse(ok2.body()).unwrap();
    assert_eq!(to_caller.media[0].formats, ["8", "101"]);
    assert_eq!(to_caller.media[0].proto, "RTP/AVP");
    assert!(
        !String::from_utf8_lossy(ok2.body()).contains("PCMU"),
        "{ok2:?}"
    );
    assert_eq!(s.h.core.call_count(), 1);
}

#[test]
fn an_update_with_sdp_is_relayed_as_an_update_and_answered_without_ack() {
    let mut s = call_setup();
    let (invite, ok) = established_call(&mut s);
    let configured_before = s.media.configured.lock().unwrap().len();

    let hold = sdp_offer("192.168.1.20", 4000).replace("a=sendrecv", "a=sendonly");
    let out = s.h.send_flows(
        s.caller.flow,
        s.caller
            .in_dialog_with("UPDATE", &ok, Some(("application/sdp", &hold))),
    );
    // UPDATE is not INVITE: no 100, and it goes on as an UPDATE.
    assert!(statuses_to(&out, s.caller.flow).is_empty(), "{out:?}");
    assert!(requests_to(&out, s.callee_flow, Method::Invite).is_empty());
    let updates = requests_to(&out, s.callee_flow, Method::Update);
    assert_eq!(updates.len(), 1, "{out:?}");
    let update = &updates[0];
    assert_eq!(update.call_id(), invite.call_id());
    assert_eq!(update.to().unwrap().tag(), Some("calleetag"));
    assert_eq!(
        update.header(HeaderName::ContentType),
        Some("application/sdp")
    );
    let offer = SessionDescription::parse(update.body()).unwrap();
    assert_eq!(offer.media_direction(0), Direction::SendOnly);

    // A re-INVITE from the callee meanwhile crosses it: 491.
    let glare = callee_in_dialog(
        &invite,
        s.callee_flow,
        "INVITE",
        1,
        Some(("application/sdp", &sdp_offer("192.168.1.30", 6000))),
    );
    let out = s.h.send_flows(s.callee_flow, glare);
    assert_eq!(
        answers_to(&out, s.callee_flow),
        [(491, "Request Pending".to_string(), Method::Invite)]
    );
    assert!(requests_to(&out, s.caller.flow, Method::Invite).is_empty());

    let answer = sdp_offer("192.168.1.30", 6000).replace("a=sendrecv", "a=recvonly");
    let out =
        s.h.send_flows(s.callee_flow, reply(update, 200, "OK", Some(&answer)));
    assert!(
        requests_to(&out, s.callee_flow, Method::Ack).is_empty(),
        "a 2xx to UPDATE is not acknowledged"
    );
    let ok2 = caller_ok(&out, s.caller.flow);
    assert_eq!(ok2.cseq().unwrap().method, Method::Update);
    let to_caller = SessionDescription::parse(ok2.body()).unwrap();
    assert_eq!(to_caller.media_direction(0), Direction::RecvOnly);
    assert_eq!(
        s.media.configured.lock().unwrap().len(),
        configured_before + 2
    );
    assert_eq!(s.h.core.call_count(), 1);
}

/// Whether `needle` occurs in `text` as a token of its own, not inside a
/// longer run of letters and digits (a random tag or branch).
fn has_token(text: &str, needle: &str) -> bool {
    text.match_indices(needle).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + needle.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric())
            && !after.is_some_and(|c| c.is_ascii_alphanumeric())
    })
}

#[test]
fn neither_phone_sees_the_others_address_port_call_id_or_tags() {
    let mut s = call_setup_at("192.168.1.30:5072");
    s.caller.extra = vec![(HeaderName::UserAgent, "AliceDesk/3.1".into())];
    let out = s.dial("102");
    let invite = invite_to(&out, s.callee_flow);
    let text = String::from_utf8_lossy(invite.as_bytes()).into_owned();
    for leak in ["192.168.1.20", "call-1@phone", "caller100", "AliceDesk"] {
        assert!(!text.contains(leak), "{leak:?} reached the callee:\n{text}");
    }
    for port in ["5062", "4000"] {
        assert!(
            !has_token(&text, port),
            "port {port} reached the callee:\n{text}"
        );
    }

    let callee_sdp = "v=0\r\no=bobphone 424242 1 IN IP4 192.168.1.30\r\ns=Bob\r\n\
                      c=IN IP4 192.168.1.30\r\nt=0 0\r\nm=audio 6010 RTP/AVP 0 101\r\n\
                      a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n";
    let mut b = MessageBuilder::response_to(&invite, 180, "Ringing", Some("bobs-tag-77"));
    b.header(HeaderName::Contact, "<sip:102@192.168.1.30:5072>");
    b.header(HeaderName::Server, "BobPhone/9");
    let out = s.h.send_flows(s.callee_flow, b.finish_with_body(None, b""));
    let mut to_caller: Vec<Message> = out
        .into_iter()
        .filter(|(f, _)| *f == s.caller.flow)
        .map(|(_, m)| m)
        .collect();
    let mut b = MessageBuilder::response_to(&invite, 200, "OK", Some("bobs-tag-77"));
    b.header(HeaderName::Contact, "<sip:102@192.168.1.30:5072>");
    b.header(HeaderName::Server, "BobPhone/9");
    let out = s.h.send_flows(
        s.callee_flow,
        b.finish_with_body(Some("application/sdp"), callee_sdp.as_bytes()),
    );
    let ok = caller_ok(&out, s.caller.flow);
    to_caller.push(ok.clone());
    assert_eq!(
        to_caller
            .iter()
            .filter_map(|m| m.status())
            .collect::<Vec<_>>(),
        [180, 200]
    );
    let callee_call_id = invite.call_id().unwrap();
    let parley_tag_to_callee = invite.from().unwrap().tag().unwrap();
    for m in &to_caller {
        let text = String::from_utf8_lossy(m.as_bytes());
        for leak in [
            "192.168.1.30",
            callee_call_id,
            parley_tag_to_callee,
            "bobs-tag-77",
            "BobPhone",
            "bobphone",
            "424242",
            "Bob",
        ] {
            assert!(!text.contains(leak), "{leak:?} reached the caller:\n{text}");
        }
        for port in ["5072", "6010"] {
            assert!(
                !has_token(&text, port),
                "port {port} reached the caller:\n{text}"
            );
        }
    }
    // Each side's own identifiers are all it sees (and the scan finds them).
    assert_eq!(ok.call_id(), Some("call-1@phone"));
    assert_eq!(ok.from().unwrap().tag(), Some("caller100"));
    let own = String::from_utf8_lossy(ok.as_bytes());
    assert!(own.contains("192.168.1.20") && has_token(&own, "5062"));
    assert!(has_token(&text, "5072") && text.contains(callee_call_id));
}

/// Extension 101 calling over TLS with an SRTP offer, towards devices
/// registered in `h`; `callee_flow` is the one tests answer from.
fn srtp_caller_setup(h: Harness, media: FakeMedia, callee_flow: Flow) -> CallSetup {
    let caller_flow = tls_from("198.51.100.9:40000", 7);
    CallSetup {
        h,
        media,
        caller: Caller {
            user: "101",
            password: "pw101",
            flow: caller_flow,
            cseq: 0,
            challenge: None,
            nc: 0,
            extra: vec![],
            offer: Some(srtp_offer("198.51.100.9", 4000)),
        },
        callee_flow,
    }
}

/// An SDES offer (RTP/SAVP with a key) from `ip`.
fn srtp_offer(ip: &str, port: u16) -> String {
    sdp_offer(ip, port).replace("RTP/AVP", "RTP/SAVP").replace(
        "a=sendrecv\r\n",
        "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB\r\na=sendrecv\r\n",
    )
}

#[test]
fn each_fork_gets_the_media_protection_of_its_own_transport_and_place() {
    for (policy, tls_proto) in [
        (EncryptionPolicy::RequiredRemote, "RTP/SAVP"),
        // Best effort: keys offered in RTP/AVP, plain RTP accepted.
        (EncryptionPolicy::Preferred, "RTP/AVP"),
    ] {
        let mut h = Harness::new(cfg());
        let now = h.now;
        h.core.set_directory(
            now,
            Directory::new([
                ext("100", "pw100", policy),
                ext("101", "pw101", EncryptionPolicy::Required),
            ]),
        );
        let media = FakeMedia::default();
        h.core.set_media(Box::new(media.clone()));
        // 100 has a desk phone on the LAN over UDP and a softphone on the
        // internet over TLS.
        let desk = udp_from("192.168.1.20:5062");
        let soft = tls_from("203.0.113.7:40001", 8);
        for flow in [desk, soft] {
            let mut ua = phone("100", "pw100", flow);
            h.registers(&mut ua, flow);
        }
        // 101 calls over TLS with SRTP.
        let mut s = srtp_caller_setup(h, media, desk);
        let caller_flow = s.caller.flow;
        let out = s.dial("100");
        assert_eq!(statuses_to(&out, caller_flow), [100], "{policy}: {out:?}");

        let plain = invite_to(&out, desk);
        let sdp = SessionDescription::parse(plain.body()).unwrap();
        assert_eq!(sdp.media[0].proto, "RTP/AVP", "{policy}");
        assert!(sdp.media[0].attribute("crypto").is_none(), "{policy}");
        assert!(
            plain
                .top_via()
                .unwrap()
                .sent_by
                .starts_with("127.0.0.1:5060")
        );

        let protected = invite_to(&out, soft);
        let sdp = SessionDescription::parse(protected.body()).unwrap();
        assert_eq!(sdp.media[0].proto, tls_proto, "{policy}");
        let crypto: Vec<_> = sdp.media[0].crypto().collect();
        assert_eq!(crypto.len(), 1, "{policy}");
        assert_eq!(
            crypto[0].suite,
            Some(crate::srtp::Suite::AesCm128HmacSha1_80)
        );
        let text = String::from_utf8_lossy(protected.as_bytes());
        assert!(
            !text.contains("QUFBQUFB"),
            "the caller's key leaked:\n{text}"
        );
        assert!(text.contains("SIP/2.0/TLS "));
        assert!(
            protected
                .header(HeaderName::Contact)
                .unwrap()
                .contains("transport=tls")
        );
        // Only legs certain to stay SRTP share the media port.
        let opened: Vec<String> = media_log(&s)
            .into_iter()
            .filter(|l| l.starts_with("open"))
            .collect();
        let shared = opened.iter().filter(|l| l.ends_with("Shared")).count();
        let expected_shared = if policy == EncryptionPolicy::RequiredRemote {
            2
        } else {
            1
        };
        assert_eq!((opened.len(), shared), (3, expected_shared), "{opened:?}");

        // The softphone rings; the desk phone answers with plain RTP: the
        // caller still gets SRTP, with Parley's key under its own tag.
        s.h.send_flows(
            soft,
            reply_as(&protected, 180, "Ringing", None, "softtag", SOFT_CONTACT),
        );
        let out = s.h.send_flows(
            desk,
            reply(&plain, 200, "OK", Some(&sdp_offer("192.168.1.20", 6000))),
        );
        let ok = caller_ok(&out, caller_flow);
        let answer = SessionDescription::parse(ok.body()).unwrap();
        assert_eq!(answer.media[0].proto, "RTP/SAVP");
        let crypto: Vec<_> = answer.media[0].crypto().collect();
        assert_eq!(crypto.len(), 1);
        assert_eq!(crypto[0].tag, 1);
        assert!(!String::from_utf8_lossy(ok.body()).contains("QUFBQUFB"));
        assert_eq!(requests_to(&out, soft, Method::Cancel).len(), 1);
        let configured = s.media.configured.lock().unwrap().clone();
        let keyed: Vec<bool> = configured.iter().map(|(_, m)| m.keys.is_some()).collect();
        assert_eq!(keyed, [true, false], "caller leg SRTP, desk leg plain");
    }
}

#[test]
fn an_answer_the_caller_never_acknowledges_is_repeated_then_the_call_ends() {
    let mut s = call_setup();
    let (_invite, ok) = answered_call_with_invite(&mut s);
    // No ACK: the 200 goes out again over UDP (T1, 2·T1, ... capped at T2).
    let out = s.h.advance(Duration::from_secs(4));
    let repeats = out
        .iter()
        .filter(|(f, m)| {
            *f == s.caller.flow && m.status() == Some(200) && m.call_id() == ok.call_id()
        })
        .count();
    assert_eq!(repeats, 3, "200 retransmissions in the first 4 s");
    // After 64·T1 without an ACK, RFC 3261 §13.3.1.4: BYE, both sides.
    let out = s.h.advance(Duration::from_secs(30));
    assert_eq!(requests_to(&out, s.caller.flow, Method::Bye).len(), 1);
    assert_eq!(requests_to(&out, s.callee_flow, Method::Bye).len(), 1);
    assert_eq!(s.h.calls.len(), 1);
    assert_eq!(s.h.calls[0].ended_by, Some(EndedBy::Parley));
}

#[test]
fn an_acknowledged_answer_is_not_repeated() {
    let mut s = call_setup();
    established_call(&mut s);
    let out = s.h.advance(Duration::from_secs(40));
    assert!(
        out.iter().all(|(_, m)| m.status() != Some(200)),
        "the 200 was sent again after its ACK"
    );
    assert!(s.h.calls.is_empty(), "the call ended");
}

#[test]
fn a_ringing_branch_that_vanishes_after_the_cancel_is_forgotten() {
    let mut s = call_setup();
    let invite = s.dial_invite("102");
    s.h.send_flows(s.callee_flow, reply(&invite, 180, "Ringing", None));
    // The ring timeout CANCELs the branch; the phone never answers again
    // (it dropped off its network).
    let out = s.h.advance(Duration::from_secs(30));
    assert_eq!(requests_to(&out, s.callee_flow, Method::Cancel).len(), 1);
    assert!(s.h.core.tx.client_count() > 0);
    // 64·T1 after the CANCEL the INVITE transaction is given up too.
    s.h.advance(Duration::from_secs(33));
    assert_eq!(s.h.core.tx.client_count(), 0);
}

#[test]
fn a_bye_crossing_a_pending_reinvite_answers_it() {
    let mut s = call_setup();
    let (_, ok) = established_call(&mut s);
    // The caller puts the call on hold; before the callee answers the
    // relayed re-INVITE, the caller hangs up.
    caller_sends_reinvite(&mut s, &ok, "sendonly");
    let bye = s.caller.in_dialog("BYE", &ok);
    let out = s.h.send_flows(s.caller.flow, bye);
    let to_caller: Vec<(u16, String)> = out
        .iter()
        .filter(|(f, m)| *f == s.caller.flow && m.status().is_some())
        .map(|(_, m)| {
            (
                m.status().unwrap(),
                m.cseq().unwrap().method_str.to_string(),
            )
        })
        .collect();
    assert!(
        to_caller.contains(&(487, "INVITE".to_string())),
        "the re-INVITE must get its final answer: {to_caller:?}"
    );
    assert!(
        to_caller.contains(&(200, "BYE".to_string())),
        "{to_caller:?}"
    );
    assert_eq!(s.h.core.call_count(), 0);
}

#[test]
fn a_repeated_answer_to_parleys_reinvite_is_acknowledged_again() {
    let mut s = call_setup();
    let (_, ok) = established_call(&mut s);
    let reinvite = caller_sends_reinvite(&mut s, &ok, "sendonly");
    let answer = sdp_offer("192.168.1.30", 6000).replace("a=sendrecv", "a=recvonly");
    let answer = reply(&reinvite, 200, "OK", Some(&answer));
    let acks = |out: &[(Flow, Message)]| {
        out.iter()
            .filter(|(f, m)| *f == s.callee_flow && m.method() == Some(Method::Ack))
            .count()
    };
    let out = s.h.send_flows(s.callee_flow, answer.clone());
    assert_eq!(acks(&out), 1);
    // The ACK was lost: the phone sends its 200 again (RFC 3261 §13.3.1.4)
    // and must get the ACK again, or it hangs up.
    s.h.advance(Duration::from_millis(500));
    let out = s.h.send_flows(s.callee_flow, answer);
    assert_eq!(acks(&out), 1, "{out:?}");
    assert_eq!(s.h.core.call_count(), 1);
}

#[test]
fn an_invite_that_cannot_form_a_dialog_is_refused_before_anyone_rings() {
    let mut s = call_setup();
    let invite = s.caller.invite("102");
    let text = String::from_utf8_lossy(&invite).into_owned();
    let without_contact: String = text
        .split_inclusive("\r\n")
        .filter(|l| !l.starts_with("Contact:") && !l.starts_with("m:"))
        .collect();
    assert_ne!(without_contact, text, "the INVITE had a Contact");
    let out = s.h.send_flows(s.caller.flow, Bytes::from(without_contact));
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0, s.caller.flow);
    assert_eq!(out[0].1.status(), Some(400));
    assert!(
        out[0].1.reason().contains("Contact"),
        "{}",
        out[0].1.reason()
    );
    assert_eq!(s.h.core.call_count(), 0);
}

#[test]
fn a_cancel_after_the_answer_gets_200_and_changes_nothing() {
    let mut s = call_setup();
    // The caller's CANCEL crosses Parley's 200 (before its ACK).
    answered_call(&mut s);
    let cancel = s.caller.cancel("102");
    let out = s.h.send_flows(s.caller.flow, cancel);
    let statuses: Vec<_> = out
        .iter()
        .filter(|(f, _)| *f == s.caller.flow)
        .filter_map(|(_, m)| m.status())
        .collect();
    assert_eq!(statuses, [200], "RFC 3261 §9.2");
    assert!(requests_to(&out, s.callee_flow, Method::Cancel).is_empty());
    assert_eq!(s.h.core.call_count(), 1);
}

#[test]
fn a_reinvite_answered_481_by_the_other_side_ends_the_call() {
    let mut s = call_setup();
    let (_, ok) = established_call(&mut s);
    let reinvite = caller_sends_reinvite(&mut s, &ok, "sendonly");
    let gone = reply(&reinvite, 481, "Call/Transaction Does Not Exist", None);
    let out = s.h.send_flows(s.callee_flow, gone);
    assert!(
        out.iter()
            .any(|(f, m)| *f == s.caller.flow && m.status() == Some(481))
    );
    // The callee's dialog is gone (RFC 3261 §12.2.1.2), so is the call.
    assert_eq!(requests_to(&out, s.caller.flow, Method::Bye).len(), 1);
    assert_eq!(s.h.core.call_count(), 0);
}

/// Both SRTP suites derive the same session keys from a master key, so a
/// key Parley used under one suite must never be used under the other: a
/// new context would start its counters again and repeat keystream. A
/// caller that moves to the other suite in a re-INVITE gets a new key; the
/// callee, offered the suite it already uses, keeps its own.
#[test]
fn a_phone_that_changes_suite_gets_a_new_key() {
    let (mut s, soft) = tls_call_setup();
    let caller_flow = s.caller.flow;
    let invite = s.dial_invite("100");
    let out = s.h.send_flows(
        soft,
        reply(&invite, 200, "OK", Some(&srtp_offer("203.0.113.7", 6000))),
    );
    let ok = caller_ok(&out, caller_flow);
    s.h.send_flows(caller_flow, s.caller.in_dialog("ACK", &ok));
    let key_of = |sdp: &[u8]| {
        let sdp = SessionDescription::parse(sdp).unwrap();
        let c = sdp.media[0].crypto().next().expect("a key");
        let (suite, key) = c.usable().expect("a usable key");
        (suite, key.clone())
    };
    let (suite, caller_key) = key_of(ok.body());
    assert_eq!(suite, Suite::AesCm128HmacSha1_80);
    let (_, callee_key) = key_of(invite.body());

    // The same suite again: nothing changes.
    let reinvite = caller_sends_reinvite_with(&mut s, &ok, &srtp_offer("198.51.100.9", 4000));
    assert_eq!(
        key_of(reinvite.body()),
        (Suite::AesCm128HmacSha1_80, callee_key.clone())
    );
    let out = s.h.send_flows(
        soft,
        reply(&reinvite, 200, "OK", Some(&srtp_offer("203.0.113.7", 6000))),
    );
    let ok2 = caller_ok(&out, caller_flow);
    assert_eq!(
        key_of(ok2.body()),
        (Suite::AesCm128HmacSha1_80, caller_key.clone())
    );

    // The caller moves to the 32-bit tag.
    let short = srtp_offer("198.51.100.9", 4000).replace("SHA1_80", "SHA1_32");
    let reinvite = caller_sends_reinvite_with(&mut s, &ok, &short);
    assert_eq!(
        key_of(reinvite.body()),
        (Suite::AesCm128HmacSha1_80, callee_key)
    );
    let out = s.h.send_flows(
        soft,
        reply(&reinvite, 200, "OK", Some(&srtp_offer("203.0.113.7", 6000))),
    );
    let ok3 = caller_ok(&out, caller_flow);
    let (suite, new_key) = key_of(ok3.body());
    assert_eq!(suite, Suite::AesCm128HmacSha1_32);
    assert_ne!(
        new_key, caller_key,
        "a key used under _80 offered again under _32"
    );
    let configured = s.media.configured.lock().unwrap().clone();
    let (_, last_caller_leg) = configured
        .iter()
        .rev()
        .find(|(_, m)| {
            m.keys
                .as_ref()
                .is_some_and(|k| k.suite == Suite::AesCm128HmacSha1_32)
        })
        .expect("the caller's leg now on _32");
    assert_eq!(last_caller_leg.keys.as_ref().unwrap().parley_key, new_key);
}

/// Stopping Parley ends every call it carries: the phones hear it (BYE to
/// both sides of an answered call; 503 to a ringing call's caller and
/// CANCEL to its devices) and each call gets its history row at once.
#[test]
fn calls_end_with_a_row_each_when_parley_stops() {
    for answered in [true, false] {
        let mut s = call_setup();
        if answered {
            established_call(&mut s);
        } else {
            let invite = s.dial_invite("102");
            s.h.send_flows(s.callee_flow, reply(&invite, 180, "Ringing", None));
        }
        s.h.drain_flows();
        assert!(s.h.calls.is_empty());
        let now = s.h.now;
        s.h.core.shut_down_calls(now);
        let out = s.h.drain_flows();
        if answered {
            assert_eq!(
                requests_to(&out, s.caller.flow, Method::Bye).len(),
                1,
                "{out:?}"
            );
            assert_eq!(
                requests_to(&out, s.callee_flow, Method::Bye).len(),
                1,
                "{out:?}"
            );
        } else {
            assert_eq!(statuses_to(&out, s.caller.flow), [503], "{out:?}");
            assert_eq!(requests_to(&out, s.callee_flow, Method::Cancel).len(), 1);
        }
        assert_eq!(s.h.core.call_count(), 0);
        assert_eq!(s.h.calls.len(), 1, "answered={answered}");
        let record = &s.h.calls[0];
        assert_eq!(record.ended_by, Some(EndedBy::Parley));
        let want = if answered {
            Outcome::Answered
        } else {
            Outcome::Failed
        };
        assert_eq!(record.outcome, want);
    }
}

/// A caller that offered audio and video (video refused by Parley) keeps
/// both `m=` lines in the offers Parley makes it later (RFC 3264 §8),
/// here the callee's hold; refreshes repeat what was last sent.
#[test]
fn offers_to_the_caller_keep_the_streams_of_its_session() {
    let mut s = call_setup();
    s.caller.offer = Some(format!(
        "{}m=video 4002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n",
        sdp_offer("192.168.1.20", 4000)
    ));
    let (invite, ok) = established_call(&mut s);
    let first = SessionDescription::parse(ok.body()).unwrap();
    assert_eq!(first.media.len(), 2);
    assert_eq!(
        (first.media[1].media.as_str(), first.media[1].port),
        ("video", 0)
    );

    let hold = sdp_offer("192.168.1.30", 6100).replace("a=sendrecv", "a=sendonly");
    let out = callee_reinvites(&mut s, &invite, 1, &hold);
    let reinvite = &requests_to(&out, s.caller.flow, Method::Invite)[0];
    let offer = SessionDescription::parse(reinvite.body()).unwrap();
    let lines: Vec<(&str, bool)> = offer
        .media
        .iter()
        .map(|m| (m.media.as_str(), m.port != 0))
        .collect();
    assert_eq!(lines, [("audio", true), ("video", false)]);
    assert_eq!(offer.media_direction(0), Direction::SendOnly);

    // The caller answers with both lines: the callee gets its 200.
    let agreed = format!(
        "{}m=video 0 RTP/AVP 96\r\n",
        sdp_offer("192.168.1.20", 4000).replace("a=sendrecv", "a=recvonly")
    );
    let out = s.h.send_flows(
        s.caller.flow,
        caller_answer(reinvite, 200, "OK", Some(&agreed)),
    );
    let ok2 = caller_ok(&out, s.callee_flow);
    let to_callee = SessionDescription::parse(ok2.body()).unwrap();
    assert_eq!(to_callee.media.len(), 1);
    assert_eq!(to_callee.media_direction(0), Direction::RecvOnly);
}

/// Parley's refresh re-INVITE never crosses another INVITE in the caller's
/// dialog: it waits while a relayed re-INVITE is out, tries again after a
/// 491, and while it is out, re-INVITEs from either side get 491.
#[test]
fn a_refresh_reinvite_waits_for_other_offers_in_the_callers_dialog() {
    let mut s = call_setup();
    s.caller.extra = vec![
        (HeaderName::SessionExpires, "100;refresher=uas".into()),
        (HeaderName::Supported, "timer".into()),
        (HeaderName::Allow, "INVITE, ACK, BYE, CANCEL".into()),
    ];
    let (invite, ok) = answered_call_with_invite(&mut s);
    s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok));
    s.h.advance(Duration::from_secs(45));
    // The callee holds; its re-INVITE reaches the caller, who takes time.
    let hold = sdp_offer("192.168.1.30", 6000).replace("a=sendrecv", "a=sendonly");
    let out = callee_reinvites(&mut s, &invite, 1, &hold);
    let relayed = requests_to(&out, s.caller.flow, Method::Invite).remove(0);
    let out = s.h.advance(Duration::from_secs(7));
    // Timer A repeats the relayed re-INVITE; anything else is new.
    let caller_flow = s.caller.flow;
    let new_invites = |out: &[(Flow, Message)], old: &Message| -> Vec<Message> {
        requests_to(out, caller_flow, Method::Invite)
            .into_iter()
            .filter(|m| m.cseq().unwrap().seq != old.cseq().unwrap().seq)
            .collect()
    };
    assert!(
        new_invites(&out, &relayed).is_empty(),
        "a refresh crossed the pending re-INVITE: {out:?}"
    );
    let agreed = sdp_offer("192.168.1.20", 4000).replace("a=sendrecv", "a=recvonly");
    s.h.send_flows(
        s.caller.flow,
        with_header(
            caller_answer(&relayed, 200, "OK", Some(&agreed)),
            "Session-Expires: 100;refresher=uac",
        ),
    );
    // That exchange refreshed the session (RFC 4028 §10): the next
    // refresh is half an interval after its answer.
    let out = s.h.advance(Duration::from_secs(2));
    assert!(new_invites(&out, &relayed).is_empty(), "{out:?}");
    let out = s.h.advance(Duration::from_secs(49));
    let refresh = new_invites(&out, &relayed);
    assert_eq!(refresh.len(), 1, "the next refresh: {out:?}");

    // While it is out, a re-INVITE from either side gets 491.
    let out = callee_reinvites(&mut s, &invite, 2, &hold);
    assert_eq!(statuses_to(&out, s.callee_flow), [491]);
    let reoffer = caller_reinvite_bytes(&mut s, &ok, &sdp_offer("192.168.1.20", 4000));
    let out = s.h.send_flows(s.caller.flow, reoffer);
    assert_eq!(statuses_to(&out, s.caller.flow), [491]);

    let offerless = s.caller.in_dialog("INVITE", &ok);
    let out = s.h.send_flows(s.caller.flow, offerless);
    assert_eq!(statuses_to(&out, s.caller.flow), [491], "{out:?}");

    // The caller's 491 to the refresh: it goes out again within 2 s.
    s.h.send_flows(
        s.caller.flow,
        caller_answer(&refresh[0], 491, "Request Pending", None),
    );
    let out = s.h.advance(Duration::from_secs(2));
    let again = new_invites(&out, &refresh[0]);
    assert_eq!(again.len(), 1, "{out:?}");
    assert!(again[0].cseq().unwrap().seq > refresh[0].cseq().unwrap().seq);
    assert_eq!(s.h.core.call_count(), 1);
}

/// The caller's INVITE again on a new transaction (a forking proxy in
/// front of Parley delivering two copies): 482, and still one call.
#[test]
fn a_merged_copy_of_an_invite_gets_482() {
    let mut s = call_setup();
    s.dial_invite("102");
    s.caller.cseq -= 1;
    s.caller.nc += 1;
    let copy = s.caller.invite("102");
    let text = String::from_utf8_lossy(&copy).replace(
        &format!("branch=z9hG4bKinv{}", s.caller.cseq),
        "branch=z9hG4bKotherpath",
    );
    let out = s.h.send_flows(s.caller.flow, Bytes::from(text.clone()));
    assert_eq!(statuses_to(&out, s.caller.flow), [482], "{out:?}");
    assert!(requests_to(&out, s.callee_flow, Method::Invite).is_empty());
    assert_eq!(s.h.core.call_count(), 1);
    // Once the call is over, that request is no longer a duplicate.
    let out = s.h.send_flows(s.caller.flow, s.caller.cancel("102"));
    assert!(statuses_to(&out, s.caller.flow).contains(&487), "{out:?}");
    assert_eq!(s.h.core.call_count(), 0);
    let later = text.replace("z9hG4bKotherpath", "z9hG4bKlater");
    let out = s.h.send_flows(s.caller.flow, Bytes::from(later));
    assert!(!statuses_to(&out, s.caller.flow).contains(&482), "{out:?}");
}

/// A device that registers again while a ping to it is out has just shown
/// the path works: that ping going unanswered afterwards (it went to the
/// mapping the registration replaced) does not mark the device unreachable.
#[test]
fn a_registration_supersedes_the_ping_in_flight() {
    let mut s = call_setup();
    let remote = udp_from("198.51.100.7:40000");
    let mut soft = phone("102", "pw102", remote);
    s.h.register(&mut soft, remote);
    let sent = s.h.advance(Duration::from_secs(26));
    assert_eq!(options_to(&sent, remote).len(), 1);
    s.h.advance(Duration::from_secs(5));
    s.h.registers(&mut soft, remote);
    // The old ping's retransmissions run out; the next ping is answered.
    let sent = s.h.advance(Duration::from_secs(28));
    assert!(reachability(&s.h).is_empty(), "{:?}", reachability(&s.h));
    let pings = options_to(&sent, remote);
    let last = pings
        .last()
        .expect("pinged again a whole interval after registering");
    s.h.send_flows(remote, reply(last, 200, "OK", None));
    assert!(reachability(&s.h).is_empty());
    let out = s.dial("102");
    assert_eq!(requests_to(&out, remote, Method::Invite).len(), 1);
}

/// Call records follow the system clock when it is stepped after start
/// (the runtime hands the core the time again every few seconds).
#[test]
fn records_follow_a_stepped_system_clock() {
    let mut s = call_setup();
    let invite = s.dial_invite("102");
    let stepped = Duration::from_secs(UNIX_START + 3 * 86_400);
    let now = s.h.now;
    s.h.core.set_wall_clock(now, stepped);
    s.h.send_flows(s.callee_flow, reply(&invite, 486, "Busy Here", None));
    let record = s.h.calls.last().expect("a record");
    let ended = Duration::from_millis(record.ended_unix_ms as u64);
    assert_eq!(ended.as_secs(), stepped.as_secs(), "{record:?}");
    assert!(record.started_unix_ms <= record.ended_unix_ms);
}

/// The callee takes the caller's hold but answers with a description that
/// cannot be used (a codec the caller never offered): the caller gets 488,
/// and the callee, already acting on the hold, is offered its previous
/// session again so both ends agree once more. Refusing that too ends the
/// call.
#[test]
fn a_side_left_with_an_unusable_answer_is_offered_its_session_again() {
    for callee_takes_it_back in [true, false] {
        let mut s = call_setup();
        let (invite, ok) = established_call(&mut s);
        let first = SessionDescription::parse(invite.body()).unwrap();
        let reinvite = caller_sends_reinvite(&mut s, &ok, "sendonly");
        let g729 = sdp_offer("192.168.1.30", 6000)
            .replace("RTP/AVP 0 8 101", "RTP/AVP 18")
            .replace("a=sendrecv", "a=recvonly");
        let out =
            s.h.send_flows(s.callee_flow, reply(&reinvite, 200, "OK", Some(&g729)));
        assert_eq!(requests_to(&out, s.callee_flow, Method::Ack).len(), 1);
        assert_eq!(statuses_to(&out, s.caller.flow), [488], "{out:?}");
        let restore = requests_to(&out, s.callee_flow, Method::Invite);
        assert_eq!(restore.len(), 1, "{out:?}");
        let offer = SessionDescription::parse(restore[0].body()).unwrap();
        assert_eq!(offer.media_direction(0), Direction::SendRecv);
        assert_eq!(offer.media[0].formats, first.media[0].formats);
        assert!(offer.origin.session_version > first.origin.session_version + 1);
        if callee_takes_it_back {
            let configured = s.media.configured.lock().unwrap().len();
            let again = sdp_offer("192.168.1.30", 6002);
            let out =
                s.h.send_flows(s.callee_flow, reply(&restore[0], 200, "OK", Some(&again)));
            assert_eq!(requests_to(&out, s.callee_flow, Method::Ack).len(), 1);
            let log = s.media.configured.lock().unwrap().clone();
            assert_eq!(log.len(), configured + 1);
            assert_eq!(
                log.last().unwrap().1.remote_rtp,
                Some(addr("192.168.1.30:6002"))
            );
            assert_eq!(s.h.core.call_count(), 1);
        } else {
            let out = s.h.send_flows(
                s.callee_flow,
                reply(&restore[0], 488, "Not Acceptable Here", None),
            );
            assert_eq!(requests_to(&out, s.caller.flow, Method::Bye).len(), 1);
            assert_eq!(requests_to(&out, s.callee_flow, Method::Bye).len(), 1);
            assert_eq!(s.h.core.call_count(), 0);
        }
    }
}

/// Nonces keep the clock Parley started with: a system clock stepped back
/// does not make every new nonce look older than the ones a phone already
/// used (it would then be refused as stale again and again).
#[test]
fn a_clock_stepped_back_does_not_lock_phones_out() {
    let mut h = Harness::new(cfg());
    let flow = udp_from("192.168.1.20:5062");
    let mut ua = phone("100", "pw100", flow);
    // Twelve nonces, more than are remembered per extension.
    for _ in 0..12 {
        ua.forget_challenge();
        h.registers(&mut ua, flow);
        h.advance(Duration::from_secs(20));
    }
    let now = h.now;
    h.core
        .set_wall_clock(now, Duration::from_secs(UNIX_START - 86_400));
    ua.forget_challenge();
    h.registers(&mut ua, flow);
}

/// The caller offers Opus first, the callee answers PCMU: both legs count
/// jitter at PCMU's 8 kHz clock, the codec the answer chose.
#[test]
fn both_legs_count_jitter_at_the_answered_codec_clock() {
    let mut s = call_setup();
    s.caller.offer = Some(
        sdp_offer("192.168.1.20", 4000)
            .replace("RTP/AVP 0 8 101", "RTP/AVP 111 0 101")
            .replace("a=rtpmap:0 ", "a=rtpmap:111 opus/48000/2\r\na=rtpmap:0 "),
    );
    let invite = s.dial_invite("102");
    let pcmu = sdp_offer("192.168.1.30", 6000).replace("RTP/AVP 0 8 101", "RTP/AVP 0 101");
    s.h.send_flows(s.callee_flow, reply(&invite, 200, "OK", Some(&pcmu)));
    let configured = s.media.configured.lock().unwrap().clone();
    let clocks: Vec<(u32, Option<u8>)> = configured
        .iter()
        .map(|(_, m)| (m.clock_rate, m.telephone_event_pt))
        .collect();
    assert_eq!(clocks, [(8000, Some(101)), (8000, Some(101))]);
}

/// RFC 3261 §12.1.1: the caller's dialog is built from the Record-Route
/// of its INVITE on both ends. Parley's 180 and 200 carry those headers
/// back in order, and Parley's own requests in that dialog follow them.
#[test]
fn answers_to_a_record_routed_invite_carry_its_record_route() {
    let mut s = call_setup();
    s.caller.extra = vec![
        (HeaderName::RecordRoute, "<sip:edge.example;lr>".into()),
        (
            HeaderName::RecordRoute,
            "<sip:core.example;lr;ftag=x>".into(),
        ),
    ];
    let out = s.dial("102");
    let trying = out.iter().find(|(_, m)| m.status() == Some(100)).unwrap();
    assert!(trying.1.header(HeaderName::RecordRoute).is_none());
    let invite = requests_to(&out, s.callee_flow, Method::Invite).remove(0);
    let record_route = |m: &Message| -> Vec<String> {
        m.headers(HeaderName::RecordRoute)
            .map(str::to_string)
            .collect()
    };
    let expected = ["<sip:edge.example;lr>", "<sip:core.example;lr;ftag=x>"];
    let out =
        s.h.send_flows(s.callee_flow, reply(&invite, 180, "Ringing", None));
    assert_eq!(
        record_route(&response_sent(&out, s.caller.flow, 180)),
        expected
    );
    let answer = sdp_offer("192.168.1.30", 6000);
    let out =
        s.h.send_flows(s.callee_flow, reply(&invite, 200, "OK", Some(&answer)));
    let ok = response_sent(&out, s.caller.flow, 200);
    assert_eq!(record_route(&ok), expected);
    // The callee's leg saw no Record-Route: none leaks there.
    assert!(invite.header(HeaderName::RecordRoute).is_none());

    s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok));
    let out = s.h.send_flows(
        s.callee_flow,
        callee_in_dialog(&invite, s.callee_flow, "BYE", 2, None),
    );
    let byes = requests_to(&out, s.caller.flow, Method::Bye);
    assert_eq!(byes.len(), 1);
    let routes: Vec<&str> = byes[0].headers(HeaderName::Route).collect();
    assert_eq!(routes, expected);
    // Loose routing: the Request-URI stays the caller's Contact.
    assert_eq!(byes[0].request_uri(), "sip:100@192.168.1.20:5062");
}

/// The response with `status` that Parley sent to `flow`.
fn response_sent(out: &[(Flow, Message)], flow: Flow, status: u16) -> Message {
    out.iter()
        .find(|(f, m)| *f == flow && m.status() == Some(status))
        .unwrap_or_else(|| panic!("no {status} to {flow:?} in {out:?}"))
        .1
        .clone()
}

/// RFC 3261 §9.1: no CANCEL before a provisional response. A fork whose
/// device has not answered at all when another device wins gets its
/// CANCEL with the device's first provisional response, whether the call
/// is still up or already over by then.
#[test]
fn a_fork_is_cancelled_only_after_its_device_responded() {
    for end_call_first in [false, true] {
        let mut s = call_setup();
        let (soft, desk_invite, soft_invite) = ring_both_devices(&mut s);
        // The softphone answers; the desk phone has sent nothing yet.
        let soft_ok = soft_answers(&soft_invite);
        let out = s.h.send_flows(soft, soft_ok);
        let ok = caller_ok(&out, s.caller.flow);
        assert!(
            requests_to(&out, s.callee_flow, Method::Cancel).is_empty(),
            "CANCEL before any provisional response: {out:?}"
        );
        if end_call_first {
            s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok));
            s.h.send_flows(s.caller.flow, s.caller.in_dialog("BYE", &ok));
            assert_eq!(s.h.core.call_count(), 0);
        }
        // The desk phone's 100 Trying arrives at last: now it is cancelled,
        // once.
        let out =
            s.h.send_flows(s.callee_flow, reply(&desk_invite, 100, "Trying", None));
        let cancels = requests_to(&out, s.callee_flow, Method::Cancel);
        assert_eq!(cancels.len(), 1, "end_call_first={end_call_first}: {out:?}");
        assert_eq!(
            cancels[0].top_via().unwrap().branch(),
            desk_invite.top_via().unwrap().branch()
        );
        let out =
            s.h.send_flows(s.callee_flow, reply(&desk_invite, 180, "Ringing", None));
        assert!(
            requests_to(&out, s.callee_flow, Method::Cancel).is_empty(),
            "a second CANCEL: {out:?}"
        );
        assert!(statuses_to(&out, s.caller.flow).is_empty());
    }
}

/// RFC 3261 §15 and §14.1: until the caller acknowledges Parley's 200, its
/// dialog gets no BYE and no re-INVITE. A callee hanging up at once has
/// the caller's BYE wait for the ACK, or for the 200 to be given up on; a
/// callee re-INVITE meanwhile waits too, and gets 487 when the call ends
/// first.
#[test]
fn the_caller_gets_no_bye_or_reinvite_before_it_acknowledges_the_answer() {
    for caller_acks in [true, false] {
        let mut s = call_setup();
        let (invite, ok) = answered_call_with_invite(&mut s);
        let offer = sdp_offer("192.168.1.30", 6000).replace("a=sendrecv", "a=sendonly");
        let out = s.h.send_flows(
            s.callee_flow,
            callee_in_dialog(
                &invite,
                s.callee_flow,
                "INVITE",
                2,
                Some(("application/sdp", &offer)),
            ),
        );
        assert_eq!(statuses_to(&out, s.callee_flow), [100], "{out:?}");
        assert!(requests_to(&out, s.caller.flow, Method::Invite).is_empty());

        let out = s.h.send_flows(
            s.callee_flow,
            callee_in_dialog(&invite, s.callee_flow, "BYE", 3, None),
        );
        let mut answers = statuses_to(&out, s.callee_flow);
        answers.sort();
        assert_eq!(answers, [200, 487], "{out:?}");
        assert!(
            requests_to(&out, s.caller.flow, Method::Bye).is_empty(),
            "BYE before the caller's ACK: {out:?}"
        );
        assert_eq!(s.h.core.call_count(), 0);
        let out = if caller_acks {
            s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok))
        } else {
            // Parley's 200 is sent again and again, then given up on.
            s.h.advance(Duration::from_secs(33))
        };
        let byes = requests_to(&out, s.caller.flow, Method::Bye);
        assert_eq!(byes.len(), 1, "caller_acks={caller_acks}: {out:?}");
        assert_eq!(byes[0].call_id(), Some("call-1@phone"));
        assert_eq!(byes[0].to().unwrap().tag(), Some("caller100"));
        // Only once.
        let out =
            s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok));
        assert!(requests_to(&out, s.caller.flow, Method::Bye).is_empty());
    }
}

/// A callee re-INVITE or UPDATE that comes before the caller's ACK waits
/// for it (RFC 3261 §14.1), then goes to the caller as any other; a second
/// one meanwhile gets 500 with Retry-After (§14.2), and a CANCEL ends a
/// waiting one with 487.
#[test]
fn a_callee_reinvite_before_the_callers_ack_waits_for_it() {
    for method in ["INVITE", "UPDATE"] {
        let mut s = call_setup();
        let (invite, ok) = answered_call_with_invite(&mut s);
        let hold = sdp_offer("192.168.1.30", 6000).replace("a=sendrecv", "a=sendonly");
        let callee_flow = s.callee_flow;
        // The callee's hold offer, under CSeq `seq`.
        let offer_at = |seq| {
            callee_in_dialog(
                &invite,
                callee_flow,
                method,
                seq,
                Some(("application/sdp", &hold)),
            )
        };
        let out = s.h.send_flows(callee_flow, offer_at(2));
        let trying: &[u16] = if method == "INVITE" { &[100] } else { &[] };
        assert_eq!(statuses_to(&out, s.callee_flow), trying, "{out:?}");
        assert!(out.iter().all(|(f, _)| *f != s.caller.flow), "{out:?}");
        let out = s.h.send_flows(callee_flow, offer_at(3));
        assert_eq!(statuses_to(&out, s.callee_flow), [500], "{out:?}");
        let retry = out
            .iter()
            .find_map(|(_, m)| m.header(HeaderName::RetryAfter))
            .expect("Retry-After")
            .parse::<u32>()
            .unwrap();
        assert!(retry <= 10);

        // The ACK comes: the held offer goes to the caller, and its answer
        // back to the callee.
        let out =
            s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok));
        let m = if method == "INVITE" {
            Method::Invite
        } else {
            Method::Update
        };
        let relayed = requests_to(&out, s.caller.flow, m);
        assert_eq!(relayed.len(), 1, "{method}: {out:?}");
        let offer = SessionDescription::parse(relayed[0].body()).unwrap();
        assert_eq!(offer.media_direction(0), Direction::SendOnly);
        // Passed on and unanswered: a further offer from the callee is
        // still a second one.
        let out = s.h.send_flows(callee_flow, offer_at(4));
        assert_eq!(statuses_to(&out, s.callee_flow), [500], "{out:?}");
        let agreed = sdp_offer("192.168.1.20", 4000).replace("a=sendrecv", "a=recvonly");
        let out = s.h.send_flows(
            s.caller.flow,
            caller_answer(&relayed[0], 200, "OK", Some(&agreed)),
        );
        let answered = out
            .iter()
            .find(|(f, m)| *f == s.callee_flow && m.status() == Some(200))
            .map(|(_, m)| m.clone())
            .expect("the callee's offer answered");
        assert_eq!(answered.cseq().unwrap().seq, 2);
        let answer = SessionDescription::parse(answered.body()).unwrap();
        assert_eq!(answer.media_direction(0), Direction::RecvOnly);
        assert_eq!(s.h.core.call_count(), 1);
    }

    // A held re-INVITE the callee cancels: 487, and nothing reaches the
    // caller when it acknowledges.
    let mut s = call_setup();
    let (invite, ok) = answered_call_with_invite(&mut s);
    let hold = sdp_offer("192.168.1.30", 6000).replace("a=sendrecv", "a=sendonly");
    let held = callee_in_dialog(
        &invite,
        s.callee_flow,
        "INVITE",
        2,
        Some(("application/sdp", &hold)),
    );
    let parsed = Message::parse(held.clone(), Framing::Datagram).unwrap();
    s.h.send_flows(s.callee_flow, held);
    // A caller whose ACK was lost offers meanwhile: the offers cross, 491.
    let crossing = caller_reinvite_bytes(&mut s, &ok, &hold);
    let out = s.h.send_flows(s.caller.flow, crossing);
    assert_eq!(statuses_to(&out, s.caller.flow), [491], "{out:?}");
    let out =
        s.h.send_flows(s.callee_flow, super::calls::cancel_for(&parsed));
    let answers = answers_to(&out, s.callee_flow);
    assert!(
        answers.contains(&(200, "OK".to_string(), Method::Cancel)),
        "{out:?}"
    );
    assert!(
        answers.contains(&(487, "Request Terminated".to_string(), Method::Invite)),
        "{out:?}"
    );
    let out =
        s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok));
    assert!(requests_to(&out, s.caller.flow, Method::Invite).is_empty());
    assert_eq!(s.h.core.call_count(), 1);
}

/// RFC 4028 §7.4, §7.2 and §10: a re-INVITE Parley passes to the caller
/// carries the session timer (the caller stays the refresher); the
/// caller's 2xx to it counts as a refresh and says what the timer is now,
/// none at all when it carries no Session-Expires.
#[test]
fn a_reinvite_to_the_caller_keeps_and_refreshes_its_session_timer() {
    for echoed in [true, false] {
        let mut s = call_setup();
        s.caller.extra = vec![
            (HeaderName::SessionExpires, "120;refresher=uac".into()),
            (HeaderName::Supported, "timer".into()),
        ];
        let (invite, ok) = established_call(&mut s);
        assert_eq!(
            ok.header(HeaderName::SessionExpires),
            Some("120;refresher=uac")
        );

        // At 60 s the callee holds the call; the caller gets the re-INVITE.
        s.h.advance(Duration::from_secs(60));
        let hold = sdp_offer("192.168.1.30", 6000).replace("a=sendrecv", "a=sendonly");
        let out = s.h.send_flows(
            s.callee_flow,
            callee_in_dialog(
                &invite,
                s.callee_flow,
                "INVITE",
                2,
                Some(("application/sdp", &hold)),
            ),
        );
        let reinvites = requests_to(&out, s.caller.flow, Method::Invite);
        assert_eq!(reinvites.len(), 1, "{out:?}");
        assert_eq!(
            reinvites[0].header(HeaderName::SessionExpires),
            Some("120;refresher=uas")
        );
        assert!(
            reinvites[0]
                .header_values(HeaderName::Supported)
                .any(|t| t == "timer")
        );
        let agreed = sdp_offer("192.168.1.20", 4000).replace("a=sendrecv", "a=recvonly");
        let mut answer = caller_answer(&reinvites[0], 200, "OK", Some(&agreed));
        if echoed {
            answer = with_header(answer, "Session-Expires: 120;refresher=uas");
        }
        s.h.send_flows(s.caller.flow, answer);

        // Without that refresh the session would end at 88 s; it lives on...
        let out = s.h.advance(Duration::from_secs(60));
        assert!(requests_to(&out, s.caller.flow, Method::Bye).is_empty());
        assert_eq!(s.h.core.call_count(), 1);
        // ...until 88 s after the re-INVITE's answer, or for good when the
        // caller's answer turned the timer off.
        let out = s.h.advance(Duration::from_secs(30));
        let byes = requests_to(&out, s.caller.flow, Method::Bye).len();
        assert_eq!(byes, usize::from(echoed), "echoed={echoed}");
        if !echoed {
            let out = s.h.advance(Duration::from_secs(600));
            assert!(requests_to(&out, s.caller.flow, Method::Bye).is_empty());
            assert_eq!(s.h.core.call_count(), 1);
        }
    }
}

/// RFC 3261 §13.2.2.4: a second 2xx to the winning device's INVITE with
/// another To tag is a second dialog (a forking proxy behind the binding):
/// it is acknowledged and hung up once, and the call goes on.
#[test]
fn a_second_dialog_from_the_winning_device_is_hung_up() {
    let mut s = call_setup();
    let (invite, _ok) = established_call(&mut s);
    let answer = sdp_offer("192.168.1.30", 6002);
    let other = reply_as(
        &invite,
        200,
        "OK",
        Some(&answer),
        "othertag",
        "<sip:102@192.168.1.30:5062>",
    );
    for round in 0..2 {
        let out = s.h.send_flows(s.callee_flow, other.clone());
        let acks = requests_to(&out, s.callee_flow, Method::Ack);
        assert_eq!(acks.len(), 1, "round {round}: {out:?}");
        assert_eq!(acks[0].to().unwrap().tag(), Some("othertag"));
        let byes = requests_to(&out, s.callee_flow, Method::Bye);
        assert_eq!(
            byes.len(),
            usize::from(round == 0),
            "round {round}: {out:?}"
        );
        if let Some(bye) = byes.first() {
            assert_eq!(bye.to().unwrap().tag(), Some("othertag"));
        }
        assert!(out.iter().all(|(f, _)| *f == s.callee_flow), "{out:?}");
    }
    assert_eq!(s.h.core.call_count(), 1);
    // The first dialog's own 2xx again: only an ACK.
    let out = s.h.send_flows(
        s.callee_flow,
        reply(&invite, 200, "OK", Some(&sdp_offer("192.168.1.30", 6000))),
    );
    assert!(requests_to(&out, s.callee_flow, Method::Bye).is_empty());
}

/// RFC 3261 §12.2.1.2: a re-INVITE passed to the other side that gets no
/// answer at all ends the dialog, as a 408 would: the call ends.
#[test]
fn a_passed_on_reinvite_never_answered_ends_the_call() {
    let mut s = call_setup();
    let (invite, _ok) = established_call(&mut s);
    let hold = sdp_offer("192.168.1.30", 6000).replace("a=sendrecv", "a=sendonly");
    let out = callee_reinvites(&mut s, &invite, 2, &hold);
    assert_eq!(requests_to(&out, s.caller.flow, Method::Invite).len(), 1);
    let out = s.h.advance(Duration::from_secs(33));
    assert!(statuses_to(&out, s.callee_flow).contains(&408), "{out:?}");
    assert_eq!(requests_to(&out, s.callee_flow, Method::Bye).len(), 1);
    assert_eq!(requests_to(&out, s.caller.flow, Method::Bye).len(), 1);
    assert_eq!(s.h.core.call_count(), 0);
}

/// RFC 3261 §13.2.2.4: a 2xx to Parley's own re-INVITE that arrives after
/// the call ended is still acknowledged, each time it is repeated.
#[test]
fn a_2xx_to_a_reinvite_after_the_call_ended_is_acknowledged() {
    let mut s = call_setup();
    let (invite, _ok) = established_call(&mut s);
    let hold = sdp_offer("192.168.1.30", 6000).replace("a=sendrecv", "a=sendonly");
    let out = callee_reinvites(&mut s, &invite, 2, &hold);
    let relayed = requests_to(&out, s.caller.flow, Method::Invite).remove(0);
    // The callee hangs up before the caller answers the re-INVITE.
    s.h.send_flows(
        s.callee_flow,
        callee_in_dialog(&invite, s.callee_flow, "BYE", 3, None),
    );
    assert_eq!(s.h.core.call_count(), 0);
    let agreed = sdp_offer("192.168.1.20", 4000).replace("a=sendrecv", "a=recvonly");
    let answer = caller_answer(&relayed, 200, "OK", Some(&agreed));
    for round in 0..2 {
        let out = s.h.send_flows(s.caller.flow, answer.clone());
        let acks = requests_to(&out, s.caller.flow, Method::Ack);
        assert_eq!(acks.len(), 1, "round {round}: {out:?}");
        assert_eq!(acks[0].cseq().unwrap().seq, relayed.cseq().unwrap().seq);
        assert_eq!(acks[0].call_id(), Some("call-1@phone"));
    }
}

/// Both phones send offerless re-INVITEs at once: each gets Parley's offer
/// in a 200, and each one's answer, in its ACK, reaches its own leg.
#[test]
fn offerless_reinvites_from_both_sides_each_get_their_answer() {
    let mut s = call_setup();
    let (invite, ok) = established_call(&mut s);
    let out =
        s.h.send_flows(s.caller.flow, s.caller.in_dialog("INVITE", &ok));
    let caller_ok2 = response_sent(&out, s.caller.flow, 200);
    let out = s.h.send_flows(
        s.callee_flow,
        callee_in_dialog(&invite, s.callee_flow, "INVITE", 2, None),
    );
    assert_eq!(statuses_to(&out, s.callee_flow), [200], "{out:?}");
    let before = s.media.configured.lock().unwrap().len();

    let ack = s.caller.in_dialog_with(
        "ACK",
        &caller_ok2,
        Some(("application/sdp", &sdp_offer("192.168.1.20", 4100))),
    );
    s.h.send_flows(s.caller.flow, ack);
    s.h.send_flows(
        s.callee_flow,
        callee_in_dialog(
            &invite,
            s.callee_flow,
            "ACK",
            2,
            Some(("application/sdp", &sdp_offer("192.168.1.30", 6100))),
        ),
    );
    let configured = s.media.configured.lock().unwrap();
    let ports: Vec<Option<u16>> = configured[before..]
        .iter()
        .map(|(_, m)| m.remote_rtp.map(|a| a.port()))
        .collect();
    assert_eq!(ports, [Some(4100), Some(6100)]);
}

/// At shutdown a caller that has not acknowledged the 200 yet still gets
/// its BYE: Parley will not be there for the ACK it would wait for.
#[test]
fn shutdown_hangs_up_a_caller_that_has_not_acknowledged_yet() {
    let mut s = call_setup();
    answered_call_with_invite(&mut s);
    s.h.drain_flows();
    let now = s.h.now;
    s.h.core.shut_down_calls(now);
    let out = s.h.drain_flows();
    assert_eq!(
        requests_to(&out, s.caller.flow, Method::Bye).len(),
        1,
        "{out:?}"
    );
    assert_eq!(
        requests_to(&out, s.callee_flow, Method::Bye).len(),
        1,
        "{out:?}"
    );
}

/// `message` with the header line `line` added after its start line.
fn with_header(message: Bytes, line: &str) -> Bytes {
    let text = String::from_utf8(message.to_vec()).unwrap();
    Bytes::from(text.replacen("\r\n", &format!("\r\n{line}\r\n"), 1))
}

/// A device that answered 100 Trying (and nothing more yet) has been
/// heard from: its CANCEL goes at once when another device wins. And at
/// shutdown even a device not heard from gets its CANCEL, as Parley will
/// not be there to send it later.
#[test]
fn a_100_trying_is_enough_for_a_cancel_and_shutdown_cancels_every_fork() {
    let mut s = call_setup();
    let (soft, desk_invite, soft_invite) = ring_both_devices(&mut s);
    s.h.send_flows(s.callee_flow, reply(&desk_invite, 100, "Trying", None));
    let soft_ok = soft_answers(&soft_invite);
    let out = s.h.send_flows(soft, soft_ok);
    assert_eq!(
        requests_to(&out, s.callee_flow, Method::Cancel).len(),
        1,
        "{out:?}"
    );

    let mut s = call_setup();
    let soft = add_callee_device(&mut s, "192.168.1.31:5064");
    let out = s.dial("102");
    let soft_invite = invite_to(&out, soft);
    s.h.send_flows(
        soft,
        reply_as(&soft_invite, 180, "Ringing", None, "softtag", SOFT_CONTACT),
    );
    s.h.drain_flows();
    let now = s.h.now;
    s.h.core.shut_down_calls(now);
    let out = s.h.drain_flows();
    assert_eq!(requests_to(&out, soft, Method::Cancel).len(), 1, "{out:?}");
    assert_eq!(
        requests_to(&out, s.callee_flow, Method::Cancel).len(),
        1,
        "{out:?}"
    );
}

/// An INVITE refused before anyone is authenticated gets one answer, not
/// eleven: over UDP a stateful final answer would be repeated until
/// acknowledged, towards whatever source the datagram claimed.
#[test]
fn an_unauthenticated_invite_refused_gets_one_answer_only() {
    let invite = |extra: &str| String::from_utf8(request("INVITE", extra).to_vec()).unwrap();
    let cases = [
        // An extension Parley does not support.
        (invite("Require: foo\r\n"), 420),
        // No Contact: no dialog could be formed.
        (invite(""), 400),
        // A From that names no extension.
        (
            invite("Contact: <sip:x@192.0.2.1>\r\n").replace("<sip:x@y>", "<sip:y>"),
            400,
        ),
    ];
    for (text, status) in cases {
        let mut h = Harness::new(cfg());
        let victim = udp_from("192.0.2.1:5060");
        let out = h.send_flows(victim, Bytes::from(text.clone()));
        assert_eq!(statuses_to(&out, victim), [status], "{text}");
        let later = h.advance(Duration::from_secs(40));
        assert!(later.is_empty(), "{text}: {later:?}");
    }
    // In a dialog nobody knows: 481, once.
    let mut h = Harness::new(cfg());
    let victim = udp_from("192.0.2.1:5060");
    let text = String::from_utf8(request("INVITE", "").to_vec())
        .unwrap()
        .replace(
            "To: <sip:100@parley.test>",
            "To: <sip:100@parley.test>;tag=9",
        );
    let out = h.send_flows(victim, Bytes::from(text));
    assert_eq!(statuses_to(&out, victim), [481]);
    assert!(h.advance(Duration::from_secs(40)).is_empty());
}

/// Two TLS phones (101 calling, 100 called), both required to use SRTP.
fn tls_call_setup() -> (CallSetup, Flow) {
    let mut h = Harness::new(cfg());
    let now = h.now;
    h.core.set_directory(
        now,
        Directory::new([
            ext("100", "pw100", EncryptionPolicy::Required),
            ext("101", "pw101", EncryptionPolicy::Required),
        ]),
    );
    let media = FakeMedia::default();
    h.core.set_media(Box::new(media.clone()));
    let soft = tls_from("203.0.113.7:40001", 8);
    let mut ua = phone("100", "pw100", soft);
    h.registers(&mut ua, soft);
    let mut caller = phone("101", "pw101", tls_from("198.51.100.9:40000", 7));
    h.registers(&mut caller, tls_from("198.51.100.9:40000", 7));
    (srtp_caller_setup(h, media, soft), soft)
}

/// The caller's TLS connection closes while it rings: the ringing devices
/// are cancelled and the call ends, rather than ringing for nobody.
#[test]
fn a_caller_whose_connection_closes_while_ringing_is_cancelled() {
    let (mut s, soft) = tls_call_setup();
    let invite = s.dial_invite("100");
    s.h.send_flows(soft, reply(&invite, 180, "Ringing", None));
    let caller_flow = s.caller.flow;
    let now = s.h.now;
    s.h.core.handle_flow_closed(now, caller_flow);
    let out = s.h.drain_flows();
    assert_eq!(requests_to(&out, soft, Method::Cancel).len(), 1, "{out:?}");
    assert_eq!(s.h.core.call_count(), 0);
    s.h.advance(Duration::from_secs(3));
    let record = s.h.calls.last().unwrap();
    assert_eq!(record.outcome, Outcome::Cancelled);
}

/// A phone in a call whose TLS connection closes comes back on a new one
/// (from the same address, as after a NAT or Wi-Fi hiccup) and registers
/// again: the call's requests to it go on the new connection. A request
/// in the dialog on a new connection does the same.
#[test]
fn a_phone_that_reconnects_during_a_call_is_reached_on_its_new_connection() {
    for by_registration in [true, false] {
        let (mut s, soft) = tls_call_setup();
        let invite = s.dial_invite("100");
        let out = s.h.send_flows(
            soft,
            reply(&invite, 200, "OK", Some(&srtp_offer("203.0.113.7", 6000))),
        );
        let caller_flow = s.caller.flow;
        let ok = caller_ok(&out, caller_flow);
        s.h.send_flows(caller_flow, s.caller.in_dialog("ACK", &ok));

        let now = s.h.now;
        s.h.core.handle_flow_closed(now, soft);
        assert_eq!(s.h.core.call_count(), 1, "the call waits for the phone");
        let again = tls_from("203.0.113.7:40777", 9);
        if by_registration {
            let mut ua = phone("100", "pw100", again);
            s.h.registers(&mut ua, again);
        } else {
            let info = callee_in_dialog(
                &invite,
                again,
                "INFO",
                2,
                Some(("application/dtmf-relay", "Signal=1\r\nDuration=100\r\n")),
            );
            let out = s.h.send_flows(again, info);
            assert_eq!(
                requests_to(&out, caller_flow, Method::Info).len(),
                1,
                "{out:?}"
            );
        }
        let out = s.h.send_flows(caller_flow, s.caller.in_dialog("BYE", &ok));
        assert_eq!(
            requests_to(&out, again, Method::Bye).len(),
            1,
            "by_registration={by_registration}: {out:?}"
        );
        assert!(requests_to(&out, soft, Method::Bye).is_empty());
    }
}

/// The answer to Parley's offer in a 200 comes in that 200's ACK only: a
/// late copy of an earlier ACK (over UDP) neither counts as the answer nor
/// keeps the real one from counting.
#[test]
fn only_the_ack_of_the_200_with_the_offer_carries_the_answer() {
    let mut s = call_setup();
    let (_invite, ok) = established_call(&mut s);
    let out =
        s.h.send_flows(s.caller.flow, s.caller.in_dialog("INVITE", &ok));
    let ok2 = response_sent(&out, s.caller.flow, 200);
    let before = s.media.configured.lock().unwrap().len();
    // The first ACK again (its CSeq is the first INVITE's), no body.
    s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok));
    let ack = s.caller.in_dialog_with(
        "ACK",
        &ok2,
        Some(("application/sdp", &sdp_offer("192.168.1.20", 4100))),
    );
    s.h.send_flows(s.caller.flow, ack);
    let configured = s.media.configured.lock().unwrap();
    assert_eq!(configured.len(), before + 1);
    assert_eq!(
        configured.last().unwrap().1.remote_rtp.map(|a| a.port()),
        Some(4100)
    );
}

/// A fork that lost can make more than one dialog too (a forking proxy
/// behind the binding): each 2xx with a new To tag gets ACK and one BYE,
/// while the call lasts and after it ended.
#[test]
fn every_dialog_of_a_losing_fork_is_hung_up_once() {
    for after_the_end in [false, true] {
        let mut s = call_setup();
        let (soft, desk_invite, soft_invite) = ring_both_devices(&mut s);
        s.h.send_flows(s.callee_flow, reply(&desk_invite, 180, "Ringing", None));
        let soft_ok = soft_answers(&soft_invite);
        let out = s.h.send_flows(soft, soft_ok);
        let ok = caller_ok(&out, s.caller.flow);
        s.h.send_flows(s.caller.flow, s.caller.in_dialog("ACK", &ok));
        if after_the_end {
            s.h.send_flows(s.caller.flow, s.caller.in_dialog("BYE", &ok));
            assert_eq!(s.h.core.call_count(), 0);
        }
        // The desk fork (cancelled) answers anyway, from two devices.
        for (tag, round) in [("deska", 0), ("deska", 1), ("deskb", 2)] {
            let answer = reply_as(
                &desk_invite,
                200,
                "OK",
                Some(&sdp_offer("192.168.1.30", 6000)),
                tag,
                "<sip:102@192.168.1.30:5062>",
            );
            let out = s.h.send_flows(s.callee_flow, answer);
            let acks = requests_to(&out, s.callee_flow, Method::Ack);
            assert_eq!(acks.len(), 1, "{after_the_end} {round}: {out:?}");
            let byes = requests_to(&out, s.callee_flow, Method::Bye);
            let want = usize::from(round != 1);
            assert_eq!(byes.len(), want, "{after_the_end} {round}: {out:?}");
            if let Some(bye) = byes.first() {
                assert_eq!(bye.to().unwrap().tag(), Some(tag));
            }
        }
    }
}

/// RFC 3261 §9.2: a CANCEL for a re-INVITE still waiting on the other side
/// gets 200 and the re-INVITE 487. The other side's answer, when it comes,
/// is acknowledged and undone (offered its previous session again); the
/// caller hears nothing more of it.
#[test]
fn a_cancelled_reinvite_gets_487_and_the_other_side_is_restored() {
    let mut s = call_setup();
    let (_invite, ok) = established_call(&mut s);
    let hold = sdp_offer("192.168.1.20", 4000).replace("a=sendrecv", "a=sendonly");
    let reinvite = caller_reinvite_bytes(&mut s, &ok, &hold);
    let parsed = Message::parse(reinvite.clone(), Framing::Datagram).unwrap();
    let out = s.h.send_flows(s.caller.flow, reinvite);
    let relayed = requests_to(&out, s.callee_flow, Method::Invite).remove(0);

    let out =
        s.h.send_flows(s.caller.flow, super::calls::cancel_for(&parsed));
    let answers = answers_to(&out, s.caller.flow);
    assert!(
        answers.contains(&(200, "OK".to_string(), Method::Cancel)),
        "{out:?}"
    );
    assert!(
        answers.contains(&(487, "Request Terminated".to_string(), Method::Invite)),
        "{out:?}"
    );

    // The callee took the hold offer anyway.
    let agreed = sdp_offer("192.168.1.30", 6000).replace("a=sendrecv", "a=recvonly");
    let out =
        s.h.send_flows(s.callee_flow, reply(&relayed, 200, "OK", Some(&agreed)));
    assert_eq!(
        requests_to(&out, s.callee_flow, Method::Ack).len(),
        1,
        "{out:?}"
    );
    let restore = requests_to(&out, s.callee_flow, Method::Invite);
    assert_eq!(restore.len(), 1, "{out:?}");
    let sdp = SessionDescription::parse(restore[0].body()).unwrap();
    assert_eq!(sdp.media_direction(0), Direction::SendRecv);
    assert!(out.iter().all(|(f, _)| *f == s.callee_flow), "{out:?}");
    assert_eq!(s.h.core.call_count(), 1);
}
