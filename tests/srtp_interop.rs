//! SRTP interop with an independent implementation: libsrtp 2, driven
//! through Debian's `python3-pylibsrtp` (tests/srtp/libsrtp_peer.py). Both
//! directions, both suites, across a sequence-number wrap, with SRTCP.

use std::io::Write;
use std::process::{Command, Stdio};

use parley::srtp::{MAX_SRTP_OVERHEAD, MasterKey, SRTCP_OVERHEAD, SrtpContext, SrtpError, Suite};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/srtp/libsrtp_peer.py");

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Runs libsrtp over `lines` ("rtp HEX" / "rtcp HEX") and returns its
/// answer per line.
fn libsrtp(mode: &str, suite: Suite, key: &MasterKey, lines: &[String]) -> Vec<String> {
    let tag = if suite == Suite::AesCm128HmacSha1_80 {
        "80"
    } else {
        "32"
    };
    let mut child = Command::new("/usr/bin/python3")
        .args([PEER, mode, tag, &hex(key.as_bytes())])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run /usr/bin/python3 (install python3-pylibsrtp)");
    let mut stdin = child.stdin.take().unwrap();
    let input = lines.join("\n") + "\n";
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "libsrtp peer failed (is python3-pylibsrtp installed?)"
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// RTP packets of a 20 ms G.711 stream starting just before the sequence
/// number wraps, and an RTCP sender report every 50 packets.
fn stream(ssrc: u32) -> Vec<(bool, Vec<u8>)> {
    let mut out = Vec::new();
    for n in 0..300u32 {
        let seq = (65_400 + n) as u16;
        let mut p = vec![0x80, if n == 0 { 0x80 } else { 0x00 }];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&(n * 160).to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend((0..160).map(|i| (i as u32 * 7 + n) as u8));
        out.push((true, p));
        if n % 50 == 0 {
            let mut sr = vec![0x80, 200, 0x00, 0x06];
            sr.extend_from_slice(&ssrc.to_be_bytes());
            sr.extend_from_slice(&[0xE8, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00]);
            sr.extend_from_slice(&(n * 160).to_be_bytes());
            sr.extend_from_slice(&n.to_be_bytes());
            sr.extend_from_slice(&(n * 172).to_be_bytes());
            out.push((false, sr));
        }
    }
    out
}

#[test]
fn parley_protects_and_libsrtp_unprotects() {
    for suite in Suite::ALL {
        let key = MasterKey::generate();
        let mut ctx = SrtpContext::new(suite, &key);
        let packets = stream(0x1234_5678);
        let mut lines = Vec::new();
        for (is_rtp, plain) in &packets {
            let mut buf = plain.clone();
            buf.resize(plain.len() + SRTCP_OVERHEAD.max(MAX_SRTP_OVERHEAD), 0);
            let n = if *is_rtp {
                ctx.protect_rtp(&mut buf, plain.len()).unwrap()
            } else {
                ctx.protect_rtcp(&mut buf, plain.len()).unwrap()
            };
            lines.push(format!(
                "{} {}",
                if *is_rtp { "rtp" } else { "rtcp" },
                hex(&buf[..n])
            ));
        }
        // A tampered copy of the last RTP packet must be refused.
        let mut tampered = lines[lines.len() - 1].clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == '0' { '1' } else { '0' });
        lines.push(tampered);

        let answers = libsrtp("unprotect", suite, &key, &lines);
        assert_eq!(answers.len(), lines.len());
        for (i, (_, plain)) in packets.iter().enumerate() {
            assert_eq!(answers[i], hex(plain), "{suite}: packet {i}");
        }
        assert!(
            answers.last().unwrap().starts_with("ERR"),
            "libsrtp accepted a tampered packet"
        );
    }
}

#[test]
fn libsrtp_protects_and_parley_unprotects() {
    for suite in Suite::ALL {
        let key = MasterKey::generate();
        let packets = stream(0xCAFE_F00D);
        let lines: Vec<String> = packets
            .iter()
            .map(|(is_rtp, p)| format!("{} {}", if *is_rtp { "rtp" } else { "rtcp" }, hex(p)))
            .collect();
        let protected = libsrtp("protect", suite, &key, &lines);
        let mut ctx = SrtpContext::new(suite, &key);
        for (i, ((is_rtp, plain), srtp)) in packets.iter().zip(&protected).enumerate() {
            let mut buf = unhex(srtp);
            let n = if *is_rtp {
                let u = ctx
                    .unprotect_rtp(&mut buf)
                    .unwrap_or_else(|e| panic!("{suite}: packet {i}: {e}"));
                assert_eq!(u.ssrc, 0xCAFE_F00D);
                u.len
            } else {
                ctx.unprotect_rtcp(&mut buf)
                    .unwrap_or_else(|e| panic!("{suite}: RTCP {i}: {e}"))
            };
            assert_eq!(&buf[..n], &plain[..], "{suite}: packet {i}");
        }
        // And a replay of the newest packet is refused as one.
        let mut again = unhex(protected.last().unwrap());
        assert_eq!(ctx.unprotect_rtp(&mut again), Err(SrtpError::Replayed));
    }
}
