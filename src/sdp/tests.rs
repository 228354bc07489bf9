use super::*;
use crate::srtp::Suite;

/// An offer in the shape baresip 1.0 sends with `mediaenc srtp-mand`.
const BARESIP_OFFER: &str = "v=0\r
o=- 1730 3431 IN IP4 192.0.2.10\r
s=-\r
c=IN IP4 192.0.2.10\r
t=0 0\r
m=audio 10774 RTP/SAVP 0 8 101\r
b=AS:64\r
a=rtpmap:0 PCMU/8000\r
a=rtpmap:8 PCMA/8000\r
a=rtpmap:101 telephone-event/8000\r
a=fmtp:101 0-15\r
a=rtcp-mux\r
a=sendrecv\r
a=label:1\r
a=ssrc:1520637233 cname:ac1b4f14-a4a2-4c1b-8c5e-2a7f39ac1c23\r
a=rtcp-rsize\r
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4\r
a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:c3RyYWlnaHQgZG93biB0aGUgbWlkZGxlIG9mIHRo\r
a=ptime:20\r
";

/// An offer in the shape a desk phone sends over UDP: plain RTP, LF only,
/// media-level connection, trailing blank line.
const DESK_PHONE_OFFER: &str = "v=0
o=- 20045 20045 IN IP4 10.0.0.23
s=SDP data
i=desk phone
c=IN IP4 10.0.0.23
b=AS:84
t=0 0
m=audio 11780 RTP/AVP 9 0 8 18 101
c=IN IP4 10.0.0.23
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:18 G729/8000
a=fmtp:18 annexb=no
a=ptime:20
a=sendonly
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15

";

#[test]
fn parses_a_baresip_srtp_offer() {
    let sdp = SessionDescription::parse(BARESIP_OFFER.as_bytes()).unwrap();
    assert_eq!(sdp.origin.session_version, 3431);
    assert_eq!(sdp.origin.address.ip, Some("192.0.2.10".parse().unwrap()));
    assert_eq!(sdp.media.len(), 1);
    let m = &sdp.media[0];
    assert_eq!(
        (m.media.as_str(), m.port, m.proto.as_str()),
        ("audio", 10774, "RTP/SAVP")
    );
    assert!(m.is_srtp_profile());
    assert_eq!(m.formats, ["0", "8", "101"]);
    assert_eq!(m.rtpmap("101"), Some("telephone-event/8000"));
    assert_eq!(m.fmtp("101"), Some("0-15"));
    assert_eq!(m.rtpmap("9"), None);
    assert!(m.has_flag("rtcp-mux"));
    assert_eq!(sdp.media_direction(0), Direction::SendRecv);
    assert_eq!(
        sdp.media_connection(0).unwrap().ip,
        Some("192.0.2.10".parse().unwrap())
    );

    let crypto: Vec<CryptoAttribute> = m.crypto().collect();
    assert_eq!(crypto.len(), 2);
    assert_eq!(crypto[0].tag, 1);
    assert_eq!(crypto[0].suite, Some(Suite::AesCm128HmacSha1_80));
    assert_eq!(crypto[0].keys[0].lifetime, Some(Lifetime::PowerOfTwo(20)));
    assert_eq!(
        crypto[0].keys[0].mki,
        Some(Mki {
            value: 1,
            length: 4
        })
    );
    assert_eq!(crypto[0].usable().unwrap_err(), Unusable::Mki);
    let (suite, key) = crypto[1].usable().unwrap();
    assert_eq!(suite, Suite::AesCm128HmacSha1_32);
    assert_eq!(&key.as_bytes()[..8], b"straight");
}

#[test]
fn parses_a_desk_phone_offer_with_lf_and_media_level_lines() {
    let sdp = SessionDescription::parse(DESK_PHONE_OFFER.as_bytes()).unwrap();
    let m = &sdp.media[0];
    assert!(!m.is_srtp_profile());
    assert_eq!(m.formats.len(), 5);
    assert_eq!(m.connection.as_ref().unwrap().raw, "10.0.0.23");
    assert_eq!(m.bandwidths, Vec::<String>::new());
    assert_eq!(sdp.bandwidths, ["AS:84"]);
    assert_eq!(sdp.media_direction(0), Direction::SendOnly);
    assert_eq!(m.crypto().count(), 0);
}

#[test]
fn serialize_then_parse_is_identity() {
    for text in [BARESIP_OFFER, DESK_PHONE_OFFER] {
        let sdp = SessionDescription::parse(text.as_bytes()).unwrap();
        let bytes = sdp.to_bytes();
        let again = SessionDescription::parse(&bytes).unwrap();
        assert_eq!(sdp, again);
        assert!(String::from_utf8(bytes).unwrap().ends_with("\r\n"));
    }
}

#[test]
fn a_blank_session_name_reads_as_the_dash_it_is_written_as() {
    for blank in ["s=", "s= ", "s=\t"] {
        let text = BARESIP_OFFER.replacen("s=-", blank, 1);
        assert!(text.contains(blank), "{text}");
        let sdp = SessionDescription::parse(text.as_bytes()).unwrap();
        assert_eq!(sdp.session_name, "-", "{blank:?}");
        assert_eq!(SessionDescription::parse(&sdp.to_bytes()).unwrap(), sdp);
    }
}

#[test]
fn writes_what_phones_expect() {
    let key = crate::srtp::MasterKey::from_bytes(*b"0123456789abcdef0123456789abcd");
    let sdp = SessionDescription {
        origin: Origin {
            username: "parley".into(),
            session_id: "42".into(),
            session_version: 1,
            address: Connection::from_ip("2001:db8::1".parse().unwrap()),
        },
        session_name: String::new(),
        connection: Some(Connection::from_ip("2001:db8::1".parse().unwrap())),
        bandwidths: vec![],
        timing: (0, 0),
        attributes: vec![],
        media: vec![MediaDescription {
            media: "audio".into(),
            port: 20_000,
            port_count: None,
            proto: "RTP/SAVP".into(),
            formats: vec!["0".into(), "101".into()],
            connection: None,
            bandwidths: vec![],
            attributes: vec![
                Attribute::new("rtpmap", "0 PCMU/8000"),
                Attribute::new(
                    "crypto",
                    CryptoAttribute::format(1, Suite::AesCm128HmacSha1_80, &key),
                ),
                Attribute::flag("sendrecv"),
            ],
        }],
    };
    assert_eq!(
        sdp.to_string(),
        "v=0\r\no=parley 42 1 IN IP6 2001:db8::1\r\ns=-\r\nc=IN IP6 2001:db8::1\r\nt=0 0\r\n\
         m=audio 20000 RTP/SAVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n\
         a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNk\r\n\
         a=sendrecv\r\n"
    );
    let back = SessionDescription::parse(sdp.to_string().as_bytes()).unwrap();
    let (suite, parsed) = back.media[0]
        .crypto()
        .next()
        .unwrap()
        .usable()
        .map(|(s, k)| (s, k.clone()))
        .unwrap();
    assert_eq!((suite, parsed), (Suite::AesCm128HmacSha1_80, key));
}

#[test]
fn crypto_lines_are_checked() {
    let key = "inline:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNk";
    let ok = |v: &str| CryptoAttribute::parse(v).unwrap();
    let err = |v: &str| CryptoAttribute::parse(v).unwrap_err();
    assert_eq!(
        ok(&format!("7 AES_CM_128_HMAC_SHA1_80 {key}|2147483648")).keys[0].lifetime,
        Some(Lifetime::Packets(1 << 31))
    );
    assert_eq!(Lifetime::PowerOfTwo(48).packets(), 1 << 48);
    assert_eq!(Lifetime::PowerOfTwo(200).packets(), u64::MAX);
    // Unknown suites parse (their keys are opaque) but are not usable.
    let f8 = ok("3 F8_128_HMAC_SHA1_80 inline:whatever");
    assert_eq!(
        f8.usable().unwrap_err(),
        Unusable::Suite("F8_128_HMAC_SHA1_80".into())
    );
    assert_eq!(
        ok(&format!("1 AES_CM_128_HMAC_SHA1_80 {key} UNENCRYPTED_SRTP"))
            .usable()
            .unwrap_err(),
        Unusable::SessionParam("UNENCRYPTED_SRTP".into())
    );
    assert!(
        ok(&format!("1 AES_CM_128_HMAC_SHA1_80 {key} WSH=128"))
            .usable()
            .is_ok()
    );
    assert_eq!(
        ok(&format!("1 AES_CM_128_HMAC_SHA1_80 {key} KDR=0"))
            .usable()
            .unwrap_err(),
        Unusable::SessionParam("KDR=0".into())
    );
    assert_eq!(
        ok(&format!("1 AES_CM_128_HMAC_SHA1_80 {key}|2^20"))
            .usable()
            .unwrap_err(),
        Unusable::ShortLifetime
    );
    assert!(
        ok(&format!("1 AES_CM_128_HMAC_SHA1_80 {key}|2^31"))
            .usable()
            .is_ok()
    );
    assert_eq!(
        ok(&format!("1 AES_CM_128_HMAC_SHA1_80 {key}|1:4;{key}|2:4"))
            .usable()
            .unwrap_err(),
        Unusable::SeveralKeys
    );
    assert_eq!(
        err(&format!("x AES_CM_128_HMAC_SHA1_80 {key}")),
        CryptoError::BadTag
    );
    assert_eq!(
        err(&format!("1234567890 AES_CM_128_HMAC_SHA1_80 {key}")),
        CryptoError::BadTag
    );
    assert_eq!(err("1"), CryptoError::MissingSuite);
    assert_eq!(err("1 AES_CM_128_HMAC_SHA1_80"), CryptoError::MissingKey);
    assert_eq!(
        err("1 AES_CM_128_HMAC_SHA1_80 uri:http://x"),
        CryptoError::BadKeyMethod
    );
    assert_eq!(
        err("1 AES_CM_128_HMAC_SHA1_80 inline:c2hvcnQ="),
        CryptoError::BadKey
    );
    assert_eq!(
        err("1 AES_CM_128_HMAC_SHA1_80 inline:!!!!"),
        CryptoError::BadKey
    );
    assert_eq!(
        err(&format!("1 AES_CM_128_HMAC_SHA1_80 {key}|2^x")),
        CryptoError::BadLifetime
    );
    assert_eq!(
        err(&format!("1 AES_CM_128_HMAC_SHA1_80 {key}|1:4|2^20")),
        CryptoError::BadLifetime
    );
    assert_eq!(
        err(&format!("1 AES_CM_128_HMAC_SHA1_80 {key}|1:0")),
        CryptoError::BadMki
    );
    assert_eq!(
        err(&format!("1 AES_CM_128_HMAC_SHA1_80 {key}|1:4|1:4")),
        CryptoError::BadMki
    );
}

#[test]
fn malformed_sdp_gets_typed_errors() {
    let cases: [(&str, SdpError); 8] = [
        ("", SdpError::NoVersion),
        ("v=1\r\n", SdpError::NoVersion),
        (
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\n",
            SdpError::Missing("t="),
        ),
        ("v=0\r\ns=-\r\nt=0 0\r\n", SdpError::Missing("o=")),
        (
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nbogus\r\n",
            SdpError::BadLine(3),
        ),
        (
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nt=0 0\r\nc=IN IP4 ::1\r\n",
            SdpError::Malformed {
                line: 5,
                what: "connection address",
            },
        ),
        (
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nt=0 0\r\nm=audio 70000 RTP/AVP 0\r\n",
            SdpError::Malformed {
                line: 5,
                what: "media port",
            },
        ),
        (
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nt=0 0\r\nm=audio 5 RTP/AVP\r\n",
            SdpError::Malformed {
                line: 5,
                what: "m= line",
            },
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(
            SessionDescription::parse(text.as_bytes()).unwrap_err(),
            expected,
            "{text:?}"
        );
    }
    let head = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nt=0 0\r\n";
    let many_media = format!("{head}{}", "m=audio 1 RTP/AVP 0\r\n".repeat(MAX_MEDIA + 1));
    assert_eq!(
        SessionDescription::parse(many_media.as_bytes()).unwrap_err(),
        SdpError::TooManyMedia
    );
    let many_attrs = format!("{head}{}", "a=x\r\n".repeat(MAX_ATTRIBUTES + 1));
    assert_eq!(
        SessionDescription::parse(many_attrs.as_bytes()).unwrap_err(),
        SdpError::TooManyAttributes
    );
    let many_formats = format!(
        "{head}m=audio 1 RTP/AVP{}\r\n",
        " 0".repeat(MAX_FORMATS + 1)
    );
    assert_eq!(
        SessionDescription::parse(many_formats.as_bytes()).unwrap_err(),
        SdpError::TooManyFormats
    );
    assert_eq!(
        SessionDescription::parse(&vec![b'a'; MAX_SDP_BYTES + 1]).unwrap_err(),
        SdpError::TooLarge
    );
    assert_eq!(
        SessionDescription::parse(b"v=0\r\n\xff").unwrap_err(),
        SdpError::NotText
    );
    let injected = format!("{head}m=audio 1 RTP/AVP 0\r\na=fmtp:0 x\rc=IN IP4 203.0.113.66\r\n");
    assert_eq!(
        SessionDescription::parse(injected.as_bytes()).unwrap_err(),
        SdpError::Malformed {
            line: 6,
            what: "control character"
        }
    );
}

#[test]
fn directions_combine() {
    assert_eq!(Direction::SendOnly.reversed(), Direction::RecvOnly);
    assert_eq!(
        Direction::SendRecv.restricted(true, false),
        Direction::SendOnly
    );
    assert_eq!(
        Direction::RecvOnly.restricted(true, true),
        Direction::RecvOnly
    );
    assert_eq!(
        Direction::SendOnly.restricted(true, false),
        Direction::SendOnly
    );
    assert_eq!(
        Direction::SendOnly.restricted(false, true),
        Direction::Inactive
    );
}

proptest::proptest! {
    #[test]
    fn parser_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
        let _ = SessionDescription::parse(&bytes);
    }

    #[test]
    fn crypto_parser_never_panics(text in "[ -~]{0,120}") {
        let _ = CryptoAttribute::parse(&text);
    }

    #[test]
    fn mutated_offers_never_panic(pos in 0usize..BARESIP_OFFER.len(), byte in proptest::prelude::any::<u8>()) {
        let mut bytes = BARESIP_OFFER.as_bytes().to_vec();
        bytes[pos] = byte;
        if let Ok(sdp) = SessionDescription::parse(&bytes) {
            // Whatever parses serializes to something that parses the same.
            proptest::prop_assert_eq!(SessionDescription::parse(&sdp.to_bytes()).unwrap(), sdp);
        }
    }
}
