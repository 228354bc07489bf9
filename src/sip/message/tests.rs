//! Parser tests: hand-written messages in the spirit of RFC 4475's torture
//! tests (valid oddities that must parse, invalid ones that must be refused
//! with the right reason), and property tests.

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

fn dgram(s: &str) -> Result<Message, ParseError> {
    Message::parse(Bytes::copy_from_slice(s.as_bytes()), Framing::Datagram)
}

const WILD: &str = "\r\n\r\nINVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0\r\n\
TO :\r\n sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n\r\n\
from   : \"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8\r\n\
MaX-fOrWaRdS: 0068\r\n\
Call-ID: wsinv.ndaksdj@192.0.2.1\r\n\
Content-Length   : 17\r\n\
cseq: 0009\r\n  INVITE\r\n\
Via  : SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=390skdjuw\r\n\
s :\r\n\
NewFangledHeader:   newfangled value\r\n continued newfangled value\r\n\
UnknownHeaderWithUnusualValue: ;;,,;;,;\r\n\
Content-Type: application/sdp\r\n\
Route:\r\n <sip:services.example.com;lr;unknownwith=value;unknown-no-value>\r\n\
v:  SIP  / 2.0  / TCP     spindle.example.com   ;\r\n  branch  =   z9hG4bK9ikj8  ,\r\n SIP  /    2.0   / UDP  192.168.255.111   ; branch=\r\n z9hG4bK30239\r\n\
m:\"Quoted string \\\"\\\"\" <sip:jdrosen@example.com> ; newparam =\r\n      newvalue ;\r\n  secondparam ; q = 0.33\r\n\
\r\n\
v=0\r\no=mhandley\r\nextra bytes past content length";

#[test]
fn wild_but_valid_message_parses() {
    let m = dgram(WILD).expect("valid torture message");
    assert_eq!(m.method(), Some(Method::Invite));
    assert_eq!(
        m.request_uri(),
        "sip:vivekg@chair-dnrc.example.com;unknownparam"
    );
    let to = m.to().unwrap();
    assert_eq!(to.uri, "sip:vivekg@chair-dnrc.example.com");
    assert_eq!(to.tag(), Some("1918181833n"));
    let from = m.from().unwrap();
    assert_eq!(from.uri, "sip:jdrosen@example.com");
    assert_eq!(from.tag(), Some("98asjd8"));
    assert_eq!(m.header(HeaderName::MaxForwards), Some("0068"));
    let cseq = m.cseq().unwrap();
    assert_eq!((cseq.seq, cseq.method), (9, Method::Invite));
    let vias: Vec<_> = m
        .header_values(HeaderName::Via)
        .filter_map(Via::parse)
        .collect();
    assert_eq!(vias.len(), 3);
    assert_eq!(vias[0].transport, "UDP");
    assert_eq!(vias[0].branch(), Some("390skdjuw"));
    assert!(!vias[0].has_rfc3261_branch());
    assert_eq!(vias[1].transport, "TCP");
    assert_eq!(vias[1].host, Host::Name("spindle.example.com"));
    assert_eq!(vias[2].branch(), Some("z9hG4bK30239"));
    assert_eq!(m.header(HeaderName::Subject), Some(""));
    assert_eq!(
        m.header_named("newfangledheader"),
        Some("newfangled value   continued newfangled value")
    );
    let contact = NameAddr::parse(m.header(HeaderName::Contact).unwrap()).unwrap();
    assert_eq!(contact.uri, "sip:jdrosen@example.com");
    assert_eq!(contact.param("newparam"), Some(Some("newvalue")));
    assert_eq!(contact.param("q"), Some(Some("0.33")));
    assert_eq!(m.body(), b"v=0\r\no=mhandley\r\n".as_slice());
}

#[test]
fn compact_forms_and_lf_line_ends() {
    let m = dgram(
        "OPTIONS sip:h SIP/2.0\nv: SIP/2.0/UDP h;branch=z9hG4bK1\nf: <sip:a@h>;tag=x\nt: sip:b@h\n\
         i: abc\nCSeq: 1 OPTIONS\nl: 0\nk: path, outbound\n\n",
    )
    .unwrap();
    assert_eq!(m.call_id(), Some("abc"));
    assert_eq!(m.top_via().unwrap().branch(), Some("z9hG4bK1"));
    let sup: Vec<_> = m.header_values(HeaderName::Supported).collect();
    assert_eq!(sup, vec!["path", "outbound"]);
    assert_eq!(m.body(), b"");
}

#[test]
fn utf8_in_display_names_and_reason() {
    let m = dgram(
        "SIP/2.0 486 Besetzt – bitte später\r\nVia: SIP/2.0/TLS h;branch=z9hG4bK2\r\n\
         From: \"Zoë 日本\" <sip:zoe@h>;tag=1\r\nTo: <sip:x@h>;tag=2\r\nCall-ID: c\r\nCSeq: 5 INVITE\r\n\
         Content-Length: 0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(m.status(), Some(486));
    assert_eq!(m.reason(), "Besetzt – bitte später");
    assert_eq!(m.from().unwrap().display, Some("\"Zoë 日本\""));
}

#[test]
fn commas_inside_quotes_and_angles_do_not_split() {
    let m = dgram(
        "REGISTER sip:h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK3\r\nFrom: <sip:a@h>;tag=1\r\n\
         To: <sip:a@h>\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\n\
         Contact: \"a, b\" <sip:a@h;x=1,2>;expires=30, <sip:a@k>\r\nContact: sip:a@j\r\n\
         Authorization: Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"sip:h\", response=\"x\"\r\n\r\n",
    )
    .unwrap();
    let contacts: Vec<_> = m.header_values(HeaderName::Contact).collect();
    assert_eq!(
        contacts,
        vec![
            "\"a, b\" <sip:a@h;x=1,2>;expires=30",
            "<sip:a@k>",
            "sip:a@j"
        ]
    );
    // Authorization is not a comma list: its value stays whole.
    assert_eq!(m.header_values(HeaderName::Authorization).count(), 1);
}

#[test]
fn ipv6_references() {
    let m = dgram(
        "REGISTER sip:[2001:db8::10]:5060 SIP/2.0\r\nVia: SIP/2.0/UDP [2001:db8::9:1];branch=z9hG4bKas3;received=[2001:db8::9:255]\r\n\
         From: <sip:user@[2001:db8::10]>;tag=1\r\nTo: <sip:user@[2001:db8::10]>\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\n\
         Contact: \"Caller\" <sip:caller@[2001:db8::1]:5070>\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    let ruri = Uri::parse(m.request_uri()).unwrap();
    assert_eq!(ruri.host, Host::V6("2001:db8::10".parse().unwrap()));
    assert_eq!(ruri.port, Some(5060));
    let via = m.top_via().unwrap();
    assert_eq!(via.host, Host::V6("2001:db8::9:1".parse().unwrap()));
    assert_eq!(via.param("received"), Some(Some("[2001:db8::9:255]")));
    let c = NameAddr::parse(m.header(HeaderName::Contact).unwrap()).unwrap();
    assert_eq!(c.sip_uri().unwrap().port, Some(5070));
}

#[test]
fn escaped_user_part() {
    let m = dgram(
        "INVITE sip:sips%3Auser%40example.com@example.net SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK4\r\n\
         From: <sip:a@h>;tag=1\r\nTo: <sip:b@h>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n",
    )
    .unwrap();
    let u = Uri::parse(m.request_uri()).unwrap();
    assert!(u.user_eq("sips:user@example.com"));
    assert_eq!(u.host, Host::Name("example.net"));
}

#[test]
fn top_via_without_parameters_or_port() {
    let m = dgram("OPTIONS sip:h SIP/2.0\r\nVia: SIP/2.0/UDP host.example\r\n\r\n").unwrap();
    let via = m.top_via().unwrap();
    assert_eq!(
        (via.transport, via.sent_by, via.params, via.port),
        ("UDP", "host.example", "", None)
    );
    assert_eq!(via.host, Host::Name("host.example"));
    let m = dgram("OPTIONS sip:h SIP/2.0\r\nVia: SIP/2.0/TCP [::1]:5070;rport\r\n\r\n").unwrap();
    let via = m.top_via().unwrap();
    assert_eq!(via.host, Host::V6(std::net::Ipv6Addr::LOCALHOST));
    assert_eq!(via.params, ";rport");
    assert!(
        dgram("OPTIONS sip:h SIP/2.0\r\nVia: junk\r\n\r\n")
            .unwrap()
            .top_via()
            .is_none()
    );
}

#[test]
fn body_follows_content_length_and_extra_bytes_are_dropped() {
    let m = dgram("MESSAGE sip:h SIP/2.0\r\nContent-Length: 5\r\n\r\nhello world").unwrap();
    assert_eq!(m.body(), b"hello");
    let m = dgram("MESSAGE sip:h SIP/2.0\r\n\r\nall of it").unwrap();
    assert_eq!(m.body(), b"all of it");
}

#[test]
fn invalid_messages_are_refused_with_a_reason() {
    let cases: &[(&str, ParseError)] = &[
        ("", ParseError::Empty),
        ("\r\n\r\n", ParseError::Empty),
        (
            "INVITE sip:h SIP/2.0\r\nContent-Length: 50\r\n\r\nshort",
            ParseError::TruncatedBody,
        ),
        (
            "INVITE sip:h SIP/2.0\r\nContent-Length: -5\r\n\r\n",
            ParseError::BadContentLength,
        ),
        (
            "INVITE sip:h SIP/2.0\r\nContent-Length: 99999999999999999999\r\n\r\n",
            ParseError::BadContentLength,
        ),
        (
            "INVITE sip:h SIP/2.0\r\nContent-Length: 0\r\nl: 4\r\n\r\nabcd",
            ParseError::BadContentLength,
        ),
        (
            "INVITE sip:user@example.com; lr SIP/2.0\r\n\r\n",
            ParseError::BadStartLine,
        ),
        ("INVITE  sip:h SIP/2.0\r\n\r\n", ParseError::BadStartLine),
        ("INVITE sip:h SIP/7.0\r\n\r\n", ParseError::BadVersion),
        ("INVITE sip:h HTTP/1.1\r\n\r\n", ParseError::BadStartLine),
        ("INVITE nocolon SIP/2.0\r\n\r\n", ParseError::BadStartLine),
        ("IN<VITE sip:h SIP/2.0\r\n\r\n", ParseError::BadStartLine),
        ("SIP/2.0 99 Low\r\n\r\n", ParseError::BadStartLine),
        ("SIP/2.0 700 High\r\n\r\n", ParseError::BadStartLine),
        ("SIP/2.0 20x OK\r\n\r\n", ParseError::BadStartLine),
        ("SIP/2.0 200OK\r\n\r\n", ParseError::BadStartLine),
        ("SIP/2.1 200 OK\r\n\r\n", ParseError::BadVersion),
        (
            "INVITE sip:h SIP/2.0\r\nVia SIP/2.0/UDP h\r\n\r\n",
            ParseError::BadHeaderLine,
        ),
        (
            "INVITE sip:h SIP/2.0\r\nBad Name: x\r\n\r\n",
            ParseError::BadHeaderLine,
        ),
        (
            "INVITE sip:h SIP/2.0\r\n folded-into-start-line: x\r\n\r\n",
            ParseError::BadStartLine,
        ),
        (
            "INVITE sip:h SIP/2.0\r\nX: a\0b\r\n\r\n",
            ParseError::ControlCharacter,
        ),
        (
            "INVITE sip:h SIP/2.0\r\nX: a\rb\r\n\r\n",
            ParseError::ControlCharacter,
        ),
        (
            "INVITE sip:h SIP/2.0\r\nX: a\r\n",
            ParseError::MissingHeadEnd,
        ),
    ];
    for (text, want) in cases {
        assert_eq!(dgram(text).unwrap_err(), *want, "for {text:?}");
    }
}

/// Latin-1 from older phones and gateways, in a display name or a reason
/// phrase, costs the byte (U+FFFD), not the message; the body is untouched.
#[test]
fn bytes_that_are_not_utf8_in_headers_are_replaced() {
    let req = Message::parse(
        Bytes::from_static(
            b"INVITE sip:h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
From: \"M\xfcller\" <sip:100@h>;tag=1\r\nTo: <sip:b@h>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\
Content-Length: 2\r\n\r\n\xff\xfe",
        ),
        Framing::Datagram,
    )
    .unwrap();
    let from = req.from().unwrap();
    assert_eq!(from.tag(), Some("1"));
    assert_eq!(from.display, Some("\"M\u{fffd}ller\""));
    assert_eq!(req.body(), b"\xff\xfe");
    let resp = Message::parse(
        Bytes::from_static(
            b"SIP/2.0 486 Besch\xe4ftigt\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
From: <sip:a@h>;tag=1\r\nTo: <sip:b@h>;tag=2\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n",
        ),
        Framing::Datagram,
    )
    .unwrap();
    assert_eq!(resp.status(), Some(486));
}

/// `sent-by` may carry white space around its colon (RFC 3261 §25.1).
#[test]
fn via_sent_by_may_space_its_colon() {
    let m = dgram(
        "OPTIONS sip:h SIP/2.0\r\nVia: SIP/2.0/UDP pc33.example.com : 5060;branch=z9hG4bK1\r\n\
From: <sip:a@h>;tag=1\r\nTo: <sip:b@h>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n\r\n",
    )
    .unwrap();
    let via = m.top_via().unwrap();
    assert_eq!(via.port, Some(5060));
}

#[test]
fn limits_are_enforced() {
    let mut many = String::from("OPTIONS sip:h SIP/2.0\r\n");
    for i in 0..=limits::MAX_HEADER_COUNT {
        many.push_str(&format!("X-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(dgram(&many).unwrap_err(), ParseError::TooManyHeaders);

    let long = format!(
        "OPTIONS sip:h SIP/2.0\r\nX: {}\r\n\r\n",
        "a".repeat(limits::MAX_LINE_BYTES)
    );
    assert_eq!(dgram(&long).unwrap_err(), ParseError::LineTooLong);

    let huge_head = format!(
        "OPTIONS sip:h SIP/2.0\r\n{}\r\n",
        "X: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n".repeat(600)
    );
    assert_eq!(dgram(&huge_head).unwrap_err(), ParseError::HeadTooLarge);

    let too_big = vec![b'a'; limits::MAX_MESSAGE_BYTES + 1];
    assert_eq!(
        Message::parse(Bytes::from(too_big), Framing::Datagram).unwrap_err(),
        ParseError::TooLarge
    );
}

#[test]
fn stream_framing_takes_the_whole_buffer_as_body() {
    let m = Message::parse(
        Bytes::from_static(b"MESSAGE sip:h SIP/2.0\r\nContent-Length: 3\r\n\r\nabc"),
        Framing::Stream,
    )
    .unwrap();
    assert_eq!(m.body(), b"abc");
}

#[test]
fn response_builder_copies_the_right_headers() {
    let req = dgram(
        "REGISTER sip:h SIP/2.0\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK5, SIP/2.0/UDP b;branch=z9hG4bK6\r\n\
         Via: SIP/2.0/TCP c;branch=z9hG4bK7\r\nMax-Forwards: 70\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:a@h>\r\n\
         Call-ID: c1\r\nCSeq: 9 REGISTER\r\nTimestamp: 54\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    let mut b = MessageBuilder::response_to(&req, 401, "Unauthorized", Some("t1"));
    b.header(HeaderName::WwwAuthenticate, "Digest realm=\"r\"");
    let resp = Message::parse(b.finish(), Framing::Datagram).unwrap();
    assert_eq!(resp.status(), Some(401));
    let vias: Vec<_> = resp.header_values(HeaderName::Via).collect();
    assert_eq!(vias.len(), 3);
    assert_eq!(resp.to().unwrap().tag(), Some("t1"));
    assert_eq!(resp.header(HeaderName::MaxForwards), None);
    assert_eq!(resp.header(HeaderName::Timestamp), None);
    assert_eq!(resp.cseq().unwrap().seq, 9);

    let trying = MessageBuilder::response_to(&req, 100, "Trying", Some("t1")).finish();
    let trying = Message::parse(trying, Framing::Datagram).unwrap();
    assert_eq!(trying.to().unwrap().tag(), None);
    assert_eq!(trying.header(HeaderName::Timestamp), Some("54"));
}

#[test]
fn builder_neutralises_line_breaks_in_values() {
    let mut b = MessageBuilder::request("OPTIONS", "sip:h");
    b.header(HeaderName::Subject, "a\r\nVia: injected");
    let m = Message::parse(b.finish(), Framing::Datagram).unwrap();
    assert_eq!(m.header(HeaderName::Via), None);
    assert_eq!(m.header(HeaderName::Subject), Some("a  Via: injected"));
}

// ---- property tests -------------------------------------------------------

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9.!%*_+`'~-]{0,12}"
}

fn header_value() -> impl Strategy<Value = String> {
    // Printable text, no leading/trailing white space (it is trimmed).
    "[!-~]([ -~]{0,40}[!-~])?|"
}

prop_compose! {
    fn arb_message()(
        is_request in any::<bool>(),
        method in prop::sample::select(vec!["INVITE", "REGISTER", "OPTIONS", "BYE", "FOO"]),
        user in "[a-z0-9]{1,8}",
        host in "[a-z]{1,8}(\\.[a-z]{1,8}){0,2}",
        status in 100u16..700,
        reason in "[A-Za-z ]{0,20}",
        headers in prop::collection::vec((token(), header_value()), 0..20),
        body in prop::collection::vec(any::<u8>(), 0..200),
    ) -> (bool, String, String, u16, String, Vec<(String, String)>, Vec<u8>) {
        (is_request, method.to_string(), format!("sip:{user}@{host}"), status, reason.trim().to_string(), headers, body)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn serialize_then_parse_round_trips(
        (is_request, method, uri, status, reason, headers, body) in arb_message()
    ) {
        let mut b = if is_request {
            MessageBuilder::request(&method, &uri)
        } else {
            MessageBuilder::response(status, &reason)
        };
        let headers: Vec<_> = headers
            .into_iter()
            .filter(|(n, _)| HeaderName::from_name(n.as_bytes()) != HeaderName::ContentLength)
            .collect();
        for (n, v) in &headers {
            b.header_raw(n, v);
        }
        let bytes = b.finish_with_body(None, &body);
        let m = Message::parse(bytes.clone(), Framing::Datagram).unwrap();
        if is_request {
            prop_assert_eq!(m.method_str(), method.as_str());
            prop_assert_eq!(m.request_uri(), uri.as_str());
        } else {
            prop_assert_eq!(m.status(), Some(status));
            prop_assert_eq!(m.reason(), reason.as_str());
        }
        let got: Vec<_> = m
            .fields()
            .filter(|(n, _, _)| *n != HeaderName::ContentLength)
            .map(|(_, n, v)| (n.to_string(), v.to_string()))
            .collect();
        prop_assert_eq!(got, headers);
        prop_assert_eq!(m.body(), body.as_slice());
        // And a parsed message writes back to the same bytes.
        prop_assert_eq!(m.to_bytes(), bytes);
    }

    #[test]
    fn parser_never_panics_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Message::parse(Bytes::from(data), Framing::Datagram);
    }

    #[test]
    fn parser_never_panics_on_mutated_messages(
        cut in 0usize..WILD.len(),
        pos in 0usize..WILD.len(),
        byte in any::<u8>(),
    ) {
        let mut data = WILD.as_bytes().to_vec();
        data[pos] = byte;
        data.truncate(cut.max(pos + 1));
        if let Ok(m) = Message::parse(Bytes::from(data), Framing::Datagram) {
            // Whatever parses must survive every accessor and re-serialize.
            let _ = (m.top_via(), m.from(), m.to(), m.cseq(), m.content_length());
            for v in m.header_values(HeaderName::Via) { let _ = Via::parse(v); }
            for v in m.header_values(HeaderName::Contact) {
                if let Some(n) = NameAddr::parse(v) { let _ = n.sip_uri(); }
            }
            let again = Message::parse(m.to_bytes(), Framing::Datagram).unwrap();
            let count = |m: &Message| m.fields().filter(|f| f.0 != HeaderName::ContentLength).count();
            prop_assert_eq!(count(&again), count(&m));
            prop_assert_eq!(again.body(), m.body());
        }
    }
}
