use super::kdf::{Label, derive};
use super::keystream::AesCm;
use super::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The master key of RFC 3711 Appendix B.3, also used by libsrtp's
/// reference packets.
fn rfc_master() -> MasterKey {
    let mut m = [0u8; KEY_MATERIAL_LEN];
    m.copy_from_slice(&hex(
        "E1F97A0D3E018BE0D64FA32C06DE4139 0EC675AD498AFEEBB6960B3AABE6",
    ));
    MasterKey::from_bytes(m)
}

/// A plain RTP packet (version 2, PT 0) for tests.
pub(crate) fn rtp_packet(seq: u16, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// `plain` protected into a new buffer.
pub(crate) fn protect(ctx: &mut SrtpContext, plain: &[u8]) -> Vec<u8> {
    let mut buf = plain.to_vec();
    buf.resize(plain.len() + MAX_SRTP_OVERHEAD, 0);
    let n = ctx.protect_rtp(&mut buf, plain.len()).unwrap();
    buf.truncate(n);
    buf
}

fn unprotect(ctx: &mut SrtpContext, srtp: &[u8]) -> Result<(Vec<u8>, Unprotected), SrtpError> {
    let mut buf = srtp.to_vec();
    let u = ctx.unprotect_rtp(&mut buf)?;
    buf.truncate(u.len);
    Ok((buf, u))
}

#[test]
fn rfc3711_b3_key_derivation() {
    let m = rfc_master();
    let mut k = [0u8; 16];
    derive(&m, Label::RtpEncryption, &mut k);
    assert_eq!(k.to_vec(), hex("C61E7A93744F39EE10734AFE3FF7A087"));
    let mut a = [0u8; 20];
    derive(&m, Label::RtpAuthentication, &mut a);
    assert_eq!(a.to_vec(), hex("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4"));
    let mut s = [0u8; 14];
    derive(&m, Label::RtpSalt, &mut s);
    assert_eq!(s.to_vec(), hex("30CBBC08863D8C85D49DB34A9AE1"));
    // The longer authentication key the appendix lists continues the same
    // keystream, across several parallel batches of blocks.
    let mut long = [0u8; 94];
    derive(&m, Label::RtpAuthentication, &mut long);
    assert_eq!(
        long.to_vec(),
        hex(
            "CEBE321F6FF7716B6FD4AB49AF256A15 6D38BAA48F0A0ACF3C34E2359E6CDBCE
             E049646C43D9327AD175578EF7227098 6371C10C9A369AC2F94A8C5FBCDDDC25
             6D6E919A48B610EF17C2041E47403576 6B68642C59BBFC2F34DB60DBDFB2"
        )
    );
}

#[test]
fn rfc3711_b2_aes_cm_keystream() {
    let key: [u8; 16] = hex("2B7E151628AED2A6ABF7158809CF4F3C").try_into().unwrap();
    let iv = u128::from_be_bytes(hex("F0F1F2F3F4F5F6F7F8F9FAFBFCFD0000").try_into().unwrap());
    let mut stream = vec![0u8; 16 * 0xFF02];
    AesCm::new(&key).apply(iv, &mut stream);
    let block = |n: usize| stream[16 * n..16 * (n + 1)].to_vec();
    assert_eq!(block(0), hex("E03EAD0935C95E80E166B16DD92B4EB4"));
    assert_eq!(block(1), hex("D23513162B02D0F72A43A2FE4A5F97AB"));
    assert_eq!(block(2), hex("41E95B3BB0A2E8DD477901E4FCA894C0"));
    assert_eq!(block(0xFEFF), hex("EC8CDF7398607CB0F2D21675EA9EA1E4"));
    assert_eq!(block(0xFF00), hex("362B7C3C6773516318A077D7FC5073AE"));
    assert_eq!(block(0xFF01), hex("6A2CC3787889374FBEB4C81B17BA6C44"));
}

#[test]
fn libsrtp_reference_packets() {
    let plain = hex("800f1234decafbadcafebabe abababababababababababababababab");
    let expected =
        hex("800f1234decafbadcafebabe 4e55dc4ce79978d88ca4d215949d2402 b78d6acc99ea179b8dbb");
    let mut tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &rfc_master());
    assert_eq!(protect(&mut tx, &plain), expected);
    let mut rx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &rfc_master());
    assert_eq!(unprotect(&mut rx, &expected).unwrap().0, plain);

    let rtcp = hex("81c8000bcafebabe abababababababababababababababab");
    let expected =
        hex("81c8000bcafebabe 7128035be487b9bdbef89041f977a5a8 80000001 993e08cd54d6c1230798");
    let mut buf = rtcp.clone();
    buf.resize(rtcp.len() + SRTCP_OVERHEAD, 0);
    assert_eq!(tx.protect_rtcp(&mut buf, rtcp.len()), Ok(expected.len()));
    assert_eq!(buf, expected);
    assert_eq!(rx.unprotect_rtcp(&mut buf), Ok(rtcp.len()));
    assert_eq!(&buf[..rtcp.len()], &rtcp[..]);
}

#[test]
fn round_trip_both_suites_with_csrcs_and_extension() {
    for suite in Suite::ALL {
        let key = MasterKey::generate();
        let mut tx = SrtpContext::new(suite, &key);
        let mut rx = SrtpContext::new(suite, &key);
        // Two CSRCs and a one-word header extension stay in clear.
        let mut plain = vec![0x92, 0x08, 0x00, 0x07, 0, 0, 0, 1, 0xAA, 0xBB, 0xCC, 0xDD];
        plain.extend_from_slice(&[1, 1, 1, 1, 2, 2, 2, 2]);
        plain.extend_from_slice(&[0xBE, 0xDE, 0x00, 0x01, 0x10, 0x20, 0x30, 0x40]);
        plain.extend(std::iter::repeat_n(0x55, 160));
        let srtp = protect(&mut tx, &plain);
        assert_eq!(srtp.len(), plain.len() + suite.rtp_tag_len());
        assert_eq!(srtp[..28], plain[..28], "header stays in clear");
        assert_ne!(srtp[28..188], plain[28..], "payload is encrypted");
        let (back, info) = unprotect(&mut rx, &srtp).unwrap();
        assert_eq!(back, plain);
        assert_eq!(
            info,
            Unprotected {
                len: plain.len(),
                ssrc: 0xAABBCCDD,
                index: 7
            }
        );
    }
}

#[test]
fn replayed_and_too_old_packets_are_rejected() {
    let key = MasterKey::generate();
    let mut tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    let mut rx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    let packets: Vec<Vec<u8>> = (1000..1200)
        .map(|s| protect(&mut tx, &rtp_packet(s, 7, &[9; 20])))
        .collect();
    unprotect(&mut rx, &packets[0]).unwrap();
    assert_eq!(
        unprotect(&mut rx, &packets[0]).unwrap_err(),
        SrtpError::Replayed
    );
    unprotect(&mut rx, &packets[199]).unwrap();
    // 127 behind the newest is inside the window, once.
    unprotect(&mut rx, &packets[199 - 127]).unwrap();
    assert_eq!(
        unprotect(&mut rx, &packets[199 - 127]).unwrap_err(),
        SrtpError::Replayed
    );
    assert_eq!(
        unprotect(&mut rx, &packets[199 - 128]).unwrap_err(),
        SrtpError::TooOld
    );
    // Out of order inside the window is fine.
    for i in (150..199).rev() {
        unprotect(&mut rx, &packets[i]).unwrap();
    }
}

#[test]
fn a_trial_authentication_tells_keys_apart_and_changes_nothing() {
    let (ours, other) = (MasterKey::generate(), MasterKey::generate());
    let mut tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &ours);
    let mut stranger = SrtpContext::new(Suite::AesCm128HmacSha1_80, &other);
    let mut rx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &ours);
    let packet = protect(&mut tx, &rtp_packet(65_535, 9, &[1; 160]));
    let forged = protect(&mut stranger, &rtp_packet(65_535, 9, &[1; 160]));
    assert!(!rx.authenticates_rtp(&forged));
    // Asking twice changes nothing: the packet is still new, and still
    // decrypts (the sequence number then wraps into the next rollover).
    assert!(rx.authenticates_rtp(&packet));
    assert!(rx.authenticates_rtp(&packet));
    let (plain, u) = unprotect(&mut rx, &packet).unwrap();
    assert_eq!(plain, rtp_packet(65_535, 9, &[1; 160]));
    assert_eq!(u.index, 65_535);
    // Once taken, it is a replay.
    assert!(!rx.authenticates_rtp(&packet));
    let next = protect(&mut tx, &rtp_packet(0, 9, &[2; 160]));
    assert!(rx.authenticates_rtp(&next));
    assert_eq!(unprotect(&mut rx, &next).unwrap().1.index, 65_536);

    let mut rtcp = vec![0x80, 200, 0, 6];
    rtcp.extend_from_slice(&9u32.to_be_bytes());
    rtcp.extend_from_slice(&[0; 20]);
    let protect_rtcp = |ctx: &mut SrtpContext| {
        let mut buf = rtcp.clone();
        buf.resize(rtcp.len() + SRTCP_OVERHEAD, 0);
        let n = ctx.protect_rtcp(&mut buf, rtcp.len()).unwrap();
        buf.truncate(n);
        buf
    };
    let (good, bad) = (protect_rtcp(&mut tx), protect_rtcp(&mut stranger));
    assert!(!rx.authenticates_rtcp(&bad));
    assert!(rx.authenticates_rtcp(&good));
    assert_eq!(rx.unprotect_rtcp(&mut good.clone()), Ok(rtcp.len()));
    assert!(!rx.authenticates_rtcp(&good));
}

#[test]
fn rollover_counter_follows_the_sequence_wrap_and_late_packets() {
    let key = MasterKey::generate();
    let mut tx = SrtpContext::new(Suite::AesCm128HmacSha1_32, &key);
    let mut rx = SrtpContext::new(Suite::AesCm128HmacSha1_32, &key);
    let seqs: Vec<u16> = (65530..=65535).chain(0..6).collect();
    let packets: Vec<Vec<u8>> = seqs
        .iter()
        .map(|&s| protect(&mut tx, &rtp_packet(s, 1, &[s as u8; 40])))
        .collect();
    // Deliver with 65535 arriving after the wrap.
    let order = [0, 1, 2, 3, 4, 6, 7, 5, 8, 9, 10, 11];
    for &i in &order {
        let (plain, info) = unprotect(&mut rx, &packets[i]).unwrap();
        assert_eq!(plain, rtp_packet(seqs[i], 1, &[seqs[i] as u8; 40]));
        let roc = if i >= 6 { 1 } else { 0 };
        assert_eq!(info.index, (roc << 16) | u64::from(seqs[i]));
    }
    // A many-wraps run: 200,000 packets keep in step.
    for n in 0..200_000u32 {
        let seq = (n % 65536) as u16;
        let srtp = protect(&mut tx, &rtp_packet(seq.wrapping_add(6), 1, &[1; 4]));
        unprotect(&mut rx, &srtp).unwrap();
    }
}

#[test]
fn tampering_fails_authentication_and_changes_nothing() {
    let key = MasterKey::generate();
    let mut tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    let mut rx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    let good = protect(&mut tx, &rtp_packet(10, 5, &[3; 160]));
    for at in [1, 3, 8, 12, 100, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        assert_eq!(
            unprotect(&mut rx, &bad).unwrap_err(),
            SrtpError::AuthFailed,
            "byte {at}"
        );
    }
    // A forged packet far ahead must not move the window or the ROC.
    let mut forged = protect(&mut tx, &rtp_packet(40000, 5, &[3; 160]));
    let last = forged.len() - 1;
    forged[last] ^= 0xFF;
    assert_eq!(
        unprotect(&mut rx, &forged).unwrap_err(),
        SrtpError::AuthFailed
    );
    unprotect(&mut rx, &good).unwrap();
    // Another key cannot authenticate.
    let mut other = SrtpContext::new(Suite::AesCm128HmacSha1_80, &MasterKey::generate());
    let next = protect(&mut tx, &rtp_packet(11, 5, &[3; 160]));
    assert_eq!(
        unprotect(&mut other, &next).unwrap_err(),
        SrtpError::AuthFailed
    );
}

#[test]
fn malformed_packets_are_errors_not_panics() {
    let key = MasterKey::generate();
    let mut ctx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    for len in 0..40 {
        let mut junk = vec![0x80u8; len];
        let _ = ctx.unprotect_rtp(&mut junk);
        let _ = ctx.unprotect_rtcp(&mut junk);
        let mut junk = vec![0xFFu8; len];
        let _ = ctx.unprotect_rtp(&mut junk);
        let _ = ctx.protect_rtp(&mut junk, len);
        let _ = ctx.protect_rtcp(&mut junk, len);
    }
    // An extension length pointing past the end.
    let mut p = rtp_packet(1, 1, &[0xBE, 0xDE, 0xFF, 0xFF]);
    p[0] |= 0x10;
    let len = p.len();
    p.resize(len + 10, 0);
    assert_eq!(ctx.protect_rtp(&mut p, len), Err(SrtpError::TooShort));
    let mut p = rtp_packet(1, 1, &[0; 4]);
    let len = p.len();
    assert_eq!(ctx.protect_rtp(&mut p, len), Err(SrtpError::NoRoom));
    p[0] = 0x40;
    p.resize(len + 10, 0);
    assert_eq!(ctx.protect_rtp(&mut p, len), Err(SrtpError::BadVersion));
}

#[test]
fn new_ssrcs_replace_the_least_recently_used() {
    let key = MasterKey::generate();
    let mut tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    let mut rx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    for round in 0..3u16 {
        for ssrc in 1..=10u32 {
            let srtp = protect(&mut tx, &rtp_packet(100 + round, ssrc, &[0; 8]));
            let (_, info) = unprotect(&mut rx, &srtp).unwrap();
            assert_eq!(info.ssrc, ssrc);
        }
    }
    // A stream that stays in use keeps its replay state.
    let a = protect(&mut tx, &rtp_packet(500, 42, &[0; 8]));
    unprotect(&mut rx, &a).unwrap();
    for ssrc in 1..=3u32 {
        let p = protect(&mut tx, &rtp_packet(600, ssrc, &[0; 8]));
        unprotect(&mut rx, &p).unwrap();
    }
    assert_eq!(unprotect(&mut rx, &a).unwrap_err(), SrtpError::Replayed);
}

#[test]
fn srtcp_round_trip_replay_and_clear_e_flag() {
    let key = MasterKey::generate();
    for suite in Suite::ALL {
        let mut tx = SrtpContext::new(suite, &key);
        let mut rx = SrtpContext::new(suite, &key);
        let rtcp = hex("81c90007 00000099 00000042 01000002 0000ffff 00000010 00000000 00000000");
        let mut first = Vec::new();
        for n in 0..3 {
            let mut buf = rtcp.clone();
            buf.resize(rtcp.len() + SRTCP_OVERHEAD, 0);
            let len = tx.protect_rtcp(&mut buf, rtcp.len()).unwrap();
            assert_eq!(len, rtcp.len() + 14, "80-bit tag for {suite}");
            assert_ne!(buf[8..rtcp.len()], rtcp[8..]);
            if n == 0 {
                first = buf.clone();
            }
            assert_eq!(rx.unprotect_rtcp(&mut buf), Ok(rtcp.len()));
            assert_eq!(&buf[..rtcp.len()], &rtcp[..]);
        }
        assert_eq!(rx.unprotect_rtcp(&mut first), Err(SrtpError::Replayed));

        let mut buf = rtcp.clone();
        buf.resize(rtcp.len() + SRTCP_OVERHEAD, 0);
        tx.protect_rtcp_unencrypted(&mut buf, rtcp.len()).unwrap();
        assert_eq!(buf[..rtcp.len()], rtcp[..], "E=0 leaves the body in clear");
        // Flipping E cannot pass authentication.
        let mut flipped = buf.clone();
        flipped[rtcp.len()] |= 0x80;
        assert_eq!(rx.unprotect_rtcp(&mut flipped), Err(SrtpError::AuthFailed));
        assert_eq!(rx.unprotect_rtcp(&mut buf), Ok(rtcp.len()));
        assert_eq!(&buf[..rtcp.len()], &rtcp[..]);
    }
}

#[test]
fn suites_by_sdes_name() {
    assert_eq!(
        Suite::from_name("AES_CM_128_HMAC_SHA1_80"),
        Some(Suite::AesCm128HmacSha1_80)
    );
    assert_eq!(
        Suite::from_name("AES_CM_128_HMAC_SHA1_32"),
        Some(Suite::AesCm128HmacSha1_32)
    );
    assert_eq!(Suite::from_name("aes_cm_128_hmac_sha1_80"), None);
    assert_eq!(Suite::from_name("F8_128_HMAC_SHA1_80"), None);
    assert_eq!(format!("{:?}", MasterKey::generate()), "MasterKey(..)");
}

#[test]
fn sending_never_reuses_an_index() {
    let key = MasterKey::generate();
    let mut tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    let mut buf = rtp_packet(7, 1, &[1; 20]);
    buf.resize(buf.len() + 10, 0);
    let len = buf.len() - 10;
    tx.protect_rtp(&mut buf.clone(), len).unwrap();
    // The same sequence number again, even with other content, is refused.
    let mut other = rtp_packet(7, 1, &[2; 20]);
    other.resize(other.len() + 10, 0);
    assert_eq!(tx.protect_rtp(&mut other, len), Err(SrtpError::Replayed));
    // Reordered but unused indices are fine.
    let mut earlier = rtp_packet(5, 1, &[3; 20]);
    earlier.resize(earlier.len() + 10, 0);
    assert!(tx.protect_rtp(&mut earlier, len).is_ok());
}

#[test]
fn a_returning_ssrc_resumes_instead_of_starting_over() {
    let key = MasterKey::generate();
    let mut tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    let mut rx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    // SSRC 1 crosses a wrap, so its rollover counter is 1.
    let mut old = Vec::new();
    for seq in 65_530..=65_535u16 {
        old.push(protect(&mut tx, &rtp_packet(seq, 1, &[0; 8])));
    }
    let late = protect(&mut tx, &rtp_packet(3, 1, &[0; 8]));
    for p in old.iter().chain([&late]) {
        unprotect(&mut rx, p).unwrap();
    }
    // Five other SSRCs push it out of both tables.
    for ssrc in 10..15u32 {
        let p = protect(&mut tx, &rtp_packet(100, ssrc, &[0; 8]));
        unprotect(&mut rx, &p).unwrap();
    }
    // Replaying its old packets still fails on the receiving side...
    assert_eq!(
        unprotect(&mut rx, &old[0]).unwrap_err(),
        SrtpError::Replayed
    );
    assert_eq!(unprotect(&mut rx, &late).unwrap_err(), SrtpError::Replayed);
    // ...and when it returns, both sides continue with rollover counter 1.
    let next = protect(&mut tx, &rtp_packet(4, 1, &[0; 8]));
    assert_eq!(unprotect(&mut rx, &next).unwrap().1.index, (1 << 16) | 4);
    let mut dup = rtp_packet(3, 1, &[9; 8]);
    dup.resize(dup.len() + 10, 0);
    let len = dup.len() - 10;
    assert_eq!(tx.protect_rtp(&mut dup, len), Err(SrtpError::Replayed));
}

#[test]
fn an_ssrc_pushed_out_twice_comes_back_with_its_latest_state() {
    let key = MasterKey::generate();
    let mut tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    let mut rx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    let send = |tx: &mut SrtpContext, rx: &mut SrtpContext, seq: u16, ssrc: u32| {
        let p = protect(tx, &rtp_packet(seq, ssrc, &[0; 8]));
        unprotect(rx, &p).unwrap().1.index
    };
    send(&mut tx, &mut rx, 100, 1);
    // Pushed out once, with rollover counter 0.
    for ssrc in 10..15u32 {
        send(&mut tx, &mut rx, 1, ssrc);
    }
    // Back, and on across a wrap: rollover counter 1.
    for seq in [101, 30_000, 60_000, 65_535, 3] {
        send(&mut tx, &mut rx, seq, 1);
    }
    // Pushed out again.
    for ssrc in 20..25u32 {
        send(&mut tx, &mut rx, 1, ssrc);
    }
    // It returns where it left off, not where it first left.
    assert_eq!(send(&mut tx, &mut rx, 4, 1), (1 << 16) | 4);
}

/// A sender's stream is never forgotten: a flood of new SSRCs (a hostile
/// RTCP burst through a plain leg, say) cannot make Parley send an SSRC's
/// packets again from index 0 under the same key. Past what one context
/// remembers, new SSRCs are refused instead.
#[test]
fn a_flood_of_ssrcs_never_restarts_a_stream_under_the_same_key() {
    let key = MasterKey::generate();
    let mut tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    let rtcp = |tx: &mut SrtpContext, ssrc: u32| {
        let mut buf = vec![0x80, 0xc9, 0x00, 0x01];
        buf.extend_from_slice(&ssrc.to_be_bytes());
        let len = buf.len();
        buf.resize(len + SRTCP_OVERHEAD, 0);
        tx.protect_rtcp(&mut buf, len)
            .map(|_| u32::from_be_bytes(buf[len..len + 4].try_into().unwrap()) & 0x7fff_ffff)
    };
    assert_eq!(rtcp(&mut tx, 7), Ok(1));
    let rtp = protect(&mut tx, &rtp_packet(100, 7, &[0; 8]));
    let mut refused = 0;
    for ssrc in 1000..1040u32 {
        match rtcp(&mut tx, ssrc) {
            Ok(1) => {}
            Err(SrtpError::TooManyStreams) => refused += 1,
            other => panic!("SSRC {ssrc}: {other:?}"),
        }
    }
    // Four streams live and 32 remembered: SSRC 7 and 35 of the others.
    assert_eq!(refused, 5);
    // SSRC 7 goes on where it stopped, for SRTCP and SRTP alike.
    assert_eq!(rtcp(&mut tx, 7), Ok(2));
    let mut again = rtp_packet(100, 7, &[1; 8]);
    let len = again.len();
    again.resize(len + 10, 0);
    assert_eq!(tx.protect_rtp(&mut again, len), Err(SrtpError::Replayed));
    let mut rx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    assert!(unprotect(&mut rx, &rtp).is_ok());
    // A stream that came back frees its record for the one it displaced.
    assert_eq!(rtcp(&mut tx, 1000), Ok(2));
}

/// The far phone starts its sequence over under the same SSRC while
/// Parley's key towards this phone stays: after one packet the stream goes
/// on from where it was, in numbers the receiving phone accepts, instead of
/// every packet being refused until the old numbers are reached again.
#[test]
fn a_restarted_sequence_goes_on_from_the_highest_sent() {
    let key = MasterKey::generate();
    let mut tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    let mut rx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &key);
    let mut send = |seq: u16| {
        let mut buf = rtp_packet(seq, 9, &[seq as u8; 20]);
        let len = buf.len();
        buf.resize(len + 10, 0);
        let n = tx.protect_rtp(&mut buf, len)?;
        let (plain, info) = unprotect(&mut rx, &buf[..n]).expect("the phone takes it");
        assert_eq!(plain[12..], [seq as u8; 20]);
        Ok::<u64, SrtpError>(info.index)
    };
    for seq in 40_000..40_050u16 {
        assert_eq!(send(seq), Ok(u64::from(seq)));
    }
    // A late packet far behind alone is still refused, and so is a repeat.
    assert_eq!(send(39_000), Err(SrtpError::TooOld));
    assert_eq!(send(40_049), Err(SrtpError::Replayed));
    // The restart: its first packet is refused, the rest follow on.
    assert_eq!(send(20_000), Err(SrtpError::TooOld));
    for (n, seq) in (20_001..20_050u16).enumerate() {
        assert_eq!(send(seq), Ok(40_050 + n as u64));
    }
    // Reordering and duplicates keep working in the shifted numbers.
    assert_eq!(send(20_049), Err(SrtpError::Replayed));
    assert_eq!(send(20_051), Ok(40_100));
    assert_eq!(send(20_050), Ok(40_099));
    // A stray packet of the old numbering would now land 20,000 ahead: it
    // is refused, and the stream goes on unshifted by it.
    assert_eq!(send(40_060), Err(SrtpError::TooOld));
    assert_eq!(send(20_052), Ok(40_101));
}

proptest::proptest! {
    /// The AES-NI keystream is the `aes` crate's, for any key, counter and
    /// length (including lengths that end inside a block or a lane group).
    #[test]
    fn aes_ni_keystream_matches_the_aes_crate(
        key in proptest::prelude::any::<[u8; 16]>(),
        counter in proptest::prelude::any::<u128>(),
        data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1600),
    ) {
        let iv = counter & !0xFFFF;
        let mut fast = data.clone();
        let mut reference = data;
        AesCm::new(&key).apply(iv, &mut fast);
        AesCm::portable(&key).apply(iv, &mut reference);
        proptest::prop_assert_eq!(fast, reference);
    }

    /// Whatever arrives from the network, unprotecting neither panics nor
    /// lets a packet through without the key, and a refused packet leaves
    /// the context able to take the real stream.
    #[test]
    fn arbitrary_datagrams_are_refused_without_panic(
        data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        suite in proptest::sample::select(vec![Suite::AesCm128HmacSha1_80, Suite::AesCm128HmacSha1_32]),
    ) {
        let key = MasterKey::generate();
        let mut rx = SrtpContext::new(suite, &key);
        proptest::prop_assert!(rx.unprotect_rtp(&mut data.clone()).is_err());
        proptest::prop_assert!(rx.unprotect_rtcp(&mut data.clone()).is_err());
        let mut tx = SrtpContext::new(suite, &key);
        let plain = rtp_packet(1, 0x1234, &[5; 40]);
        let mut buf = protect(&mut tx, &plain);
        let len = rx.unprotect_rtp(&mut buf).unwrap().len;
        proptest::prop_assert_eq!(&buf[..len], &plain[..]);
    }
}
