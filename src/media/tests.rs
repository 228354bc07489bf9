use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use smallvec::smallvec;

use super::leg::{Drop, Leg};
use super::*;
use crate::srtp::tests::{protect, rtp_packet as rtp};
use crate::srtp::{MasterKey, SrtpContext, SrtpError};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A media engine on loopback with `ports` and the given inactivity time.
fn start_engine(
    ports: std::ops::RangeInclusive<u16>,
    inactivity: Duration,
) -> (
    MediaEngine,
    tokio::sync::mpsc::UnboundedReceiver<MediaEvent>,
) {
    MediaEngine::start(MediaConfig {
        bind_ip: LOCAL,
        ports,
        inactivity,
    })
    .unwrap()
}

fn srtp_media(remote: SocketAddr, phone_key: &MasterKey, parley_key: &MasterKey) -> LegMedia {
    LegMedia {
        remote_rtp: Some(remote),
        remote_rtcp: None,
        rtcp_mux: true,
        keys: Some(LegKeys {
            suite: Suite::AesCm128HmacSha1_80,
            phone_key: phone_key.clone(),
            parley_key: parley_key.clone(),
        }),
        trusted_ips: smallvec![],
        clock_rate: 8000,
        telephone_event_pt: None,
        local_ip: None,
    }
}

#[test]
fn srtp_leg_latches_only_after_authentication() {
    let now = Instant::now();
    let phone_key = MasterKey::generate();
    let signaled: SocketAddr = "192.0.2.10:4000".parse().unwrap();
    let nat: SocketAddr = "198.51.100.7:61000".parse().unwrap();
    let attacker: SocketAddr = "203.0.113.66:5000".parse().unwrap();
    let mut leg = Leg::new(LegId(1), now);
    leg.configure(
        srtp_media(signaled, &phone_key, &MasterKey::generate()),
        now,
    );
    let mut phone = SrtpContext::new(Suite::AesCm128HmacSha1_80, &phone_key);

    // A forged packet does not move the leg.
    let mut forged = rtp(1, 9, &[0; 160]);
    forged.extend_from_slice(&[0; 10]);
    assert_eq!(
        leg.receive(Kind::Rtp, attacker, &mut forged, now),
        Err(Drop::Srtp(SrtpError::AuthFailed))
    );
    assert_eq!(leg.latched(), None);

    // The phone's first packet, from behind its NAT, latches.
    let mut p = protect(&mut phone, &rtp(1, 9, &[7; 160]));
    assert_eq!(leg.receive(Kind::Rtp, nat, &mut p, now), Ok(172));
    assert_eq!(leg.latched(), Some(nat));
    // A replay from elsewhere neither passes nor moves the latch.
    let mut again = protect(
        &mut SrtpContext::new(Suite::AesCm128HmacSha1_80, &phone_key),
        &rtp(1, 9, &[7; 160]),
    );
    assert_eq!(
        leg.receive(Kind::Rtp, attacker, &mut again, now),
        Err(Drop::Srtp(SrtpError::Replayed))
    );
    assert_eq!(leg.latched(), Some(nat));

    // Replies go to the latched address, not the signaled one.
    let mut out = rtp(5, 3, &[1; 160]);
    out.resize(200, 0);
    let (dest, len) = leg.prepare_send(Kind::Rtp, &mut out, 172).unwrap();
    assert_eq!((dest, len), (nat, 182));
    assert_eq!(leg.receiving.auth_failures, 1);
    assert_eq!(leg.receiving.replays, 1);

    // A plain RTCP report on the SRTP leg fails too, counted apart from RTP.
    let mut rr = vec![0x81, 201, 0, 7, 0, 0, 0, 1];
    rr.extend_from_slice(&[0; 24]);
    assert_eq!(
        leg.receive(Kind::Rtcp, nat, &mut rr, now),
        Err(Drop::Srtp(SrtpError::AuthFailed))
    );
    assert_eq!(
        (
            leg.receiving.auth_failures,
            leg.receiving.rtcp_auth_failures
        ),
        (1, 1)
    );
}

/// A plain RTP leg with rtcp-mux, trusting `phone`'s address.
fn plain_muxed(phone: Option<SocketAddr>) -> LegMedia {
    LegMedia {
        remote_rtp: phone,
        remote_rtcp: None,
        rtcp_mux: true,
        keys: None,
        trusted_ips: phone.map(|p| p.ip()).into_iter().collect(),
        clock_rate: 8000,
        telephone_event_pt: None,
        local_ip: None,
    }
}

#[test]
fn plain_leg_accepts_only_trusted_sources() {
    let now = Instant::now();
    let mut leg = Leg::new(LegId(2), now);
    let desk: SocketAddr = "10.0.0.23:11780".parse().unwrap();
    leg.configure(
        LegMedia {
            remote_rtp: Some(desk),
            remote_rtcp: Some("10.0.0.23:11781".parse().unwrap()),
            rtcp_mux: false,
            keys: None,
            trusted_ips: smallvec![desk.ip()],
            clock_rate: 8000,
            telephone_event_pt: None,
            local_ip: None,
        },
        now,
    );
    let mut p = rtp(1, 1, &[0; 160]);
    let spoof: SocketAddr = "10.0.0.99:11780".parse().unwrap();
    assert_eq!(
        leg.receive(Kind::Rtp, spoof, &mut p, now),
        Err(Drop::WrongSource)
    );
    assert_eq!(leg.receive(Kind::Rtp, desk, &mut p, now), Ok(172));
    // RTCP goes to its own port without mux.
    let mut rr = vec![0x80, 201, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0];
    rr.resize(64, 0);
    let (dest, _) = leg.prepare_send(Kind::Rtcp, &mut rr, 8).unwrap();
    assert_eq!(dest.port(), 11781);
    assert_eq!(leg.receiving.wrong_source, 1);
}

#[test]
fn a_plain_leg_keeps_its_latch_while_the_phone_sends() {
    let t0 = Instant::now();
    let mut leg = Leg::new(LegId(4), t0);
    // A remote phone behind a NAT: its public address is trusted.
    let phone: SocketAddr = "203.0.113.5:40000".parse().unwrap();
    leg.configure(plain_muxed(Some(phone)), t0);
    let mut p = rtp(1, 1, &[0; 160]);
    assert_eq!(leg.receive(Kind::Rtp, phone, &mut p, t0), Ok(172));
    // Another host behind the same NAT address cannot take the stream
    // while the phone is sending.
    let neighbour: SocketAddr = "203.0.113.5:51000".parse().unwrap();
    let at = t0 + Duration::from_millis(20);
    let mut q = rtp(9, 7, &[0; 160]);
    assert_eq!(
        leg.receive(Kind::Rtp, neighbour, &mut q, at),
        Err(Drop::WrongSource)
    );
    assert_eq!(leg.receive(Kind::Rtp, phone, &mut p, at), Ok(172));
    let mut out = rtp(5, 5, &[0; 160]);
    out.resize(out.len() + 16, 0);
    assert_eq!(leg.prepare_send(Kind::Rtp, &mut out, 172).unwrap().0, phone);
    // The NAT rebinds: the phone's old port goes quiet, and its packets
    // come from a new one, which the leg then follows.
    let later = at + Duration::from_secs(3);
    let mut r = rtp(2, 1, &[0; 160]);
    assert_eq!(leg.receive(Kind::Rtp, neighbour, &mut r, later), Ok(172));
    assert_eq!(
        leg.prepare_send(Kind::Rtp, &mut out, 172).unwrap().0,
        neighbour
    );
}

#[test]
fn loss_and_jitter_are_counted_across_sequence_wrap() {
    let t0 = Instant::now();
    let mut leg = Leg::new(LegId(3), t0);
    let desk: SocketAddr = "10.0.0.23:11780".parse().unwrap();
    leg.configure(plain_muxed(Some(desk)), t0);
    // 200 packets across the wrap, every 10th lost, arriving on a steady
    // 20 ms clock: 20 lost, no jitter.
    for n in 0..200u32 {
        if n % 10 == 5 {
            continue;
        }
        let seq = (65_500 + n) as u16;
        let mut p = rtp(seq, 1, &[0; 160]);
        p[4..8].copy_from_slice(&(n * 160).to_be_bytes());
        let at = t0 + Duration::from_millis(u64::from(n) * 20);
        leg.receive(Kind::Rtp, desk, &mut p, at).unwrap();
    }
    assert_eq!(leg.receiving.packets, 180);
    assert_eq!(leg.receiving.lost(), 20);
    assert!(
        leg.receiving.jitter_ms(8000) < 0.5,
        "{}",
        leg.receiving.jitter_ms(8000)
    );
    let report = LegReport::of(&leg, 0);
    assert_eq!(report.lost, 20);
    let mos = report.mos_received.unwrap();
    assert!(
        (2.5..4.0).contains(&mos),
        "10% loss gives a poor MOS: {mos}"
    );
    assert!(stats::mos(0.0, 1.0, 0.0) > 4.3);
}

#[test]
fn rtcp_receiver_reports_are_read() {
    // An RR with one report block: 25% lost, 80 cumulative, jitter 160.
    let mut rr = vec![0x81, 201, 0, 7, 0, 0, 0, 1];
    rr.extend_from_slice(&[
        0, 0, 0, 2, 64, 0, 0, 80, 0, 0, 0, 0, 0, 0, 0, 160, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    let r = stats::parse_report_block(&rr).unwrap();
    assert_eq!(
        (r.fraction_lost, r.cumulative_lost, r.jitter),
        (0.25, 80, 160)
    );
    assert_eq!(stats::parse_report_block(&rr[..20]), None);
    assert_eq!(demux(&rr), Kind::Rtcp);

    // A report claiming hours of jitter (seen from a real desk phone) is
    // not believed: the loss it reports still counts, the jitter does not.
    let mut leg = Leg::new(LegId(9), Instant::now());
    leg.remote_report = Some(stats::RemoteReport {
        fraction_lost: 0.0,
        cumulative_lost: 0,
        jitter: 160_416_528,
    });
    let report = LegReport::of(&leg, 0);
    assert_eq!(report.remote_jitter_ms, None);
    assert!(report.mos_sent.unwrap() > 4.3);
    assert_eq!(demux(&rtp(1, 1, &[])), Kind::Rtp);
}

/// Opens two legs on `port`, each configured for its phone's SRTP (the
/// phone's address, its key, Parley's key for it), and bridges them.
fn bridge_srtp(
    engine: &MediaEngine,
    port: LegPort,
    phones: [(&UdpSocket, &MasterKey, &MasterKey); 2],
) -> [OpenLeg; 2] {
    let legs = phones.map(|(socket, phone_key, parley_key)| {
        let leg = engine.open_leg(port).unwrap();
        let media = srtp_media(socket.local_addr().unwrap(), phone_key, parley_key);
        engine.configure(leg.id, media).unwrap();
        leg
    });
    engine.bridge(legs[0].id, legs[1].id).unwrap();
    legs
}

/// Two fake phones on loopback, each talking SRTP to its own leg with its
/// own keys: what one sends, the other decrypts with the key Parley gave
/// it, and neither ever sees the other's key. Legs on ports of their own.
#[test]
fn relay_bridges_srtp_legs_with_separate_keys() {
    bridge_two_srtp_legs(LegPort::Own, 41_000);
}

/// The same with both legs on the shared port: packets find their legs by
/// source and authentication.
#[test]
fn relay_bridges_srtp_legs_on_the_shared_port() {
    bridge_two_srtp_legs(LegPort::Shared, 41_100);
}

fn bridge_two_srtp_legs(port: LegPort, lo: u16) {
    let (engine, mut events) = start_engine(lo..=lo + 99, Duration::from_millis(700));
    let phone_a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let phone_b = UdpSocket::bind("127.0.0.1:0").unwrap();
    phone_a
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    phone_b
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (a_key, b_key) = (MasterKey::generate(), MasterKey::generate());
    let (parley_a, parley_b) = (MasterKey::generate(), MasterKey::generate());
    let [leg_a, leg_b] = bridge_srtp(
        &engine,
        port,
        [(&phone_a, &a_key, &parley_a), (&phone_b, &b_key, &parley_b)],
    );
    assert_eq!(leg_a.port == leg_b.port, port == LegPort::Shared);
    assert_eq!(leg_a.port % 2, 0);

    let mut a_tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &a_key);
    let mut b_tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &b_key);
    let mut a_rx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &parley_a);
    let mut b_rx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &parley_b);
    let to_a = SocketAddr::new(LOCAL, leg_a.port);
    let to_b = SocketAddr::new(LOCAL, leg_b.port);
    let mut buf = [0u8; 2048];
    for seq in 0..50u16 {
        let payload = [seq as u8; 160];
        phone_a
            .send_to(&protect(&mut a_tx, &rtp(seq, 0xA, &payload)), to_a)
            .unwrap();
        let (n, from) = phone_b.recv_from(&mut buf).unwrap();
        assert_eq!(from, to_b, "B hears Parley's leg B port");
        // Only Parley's key for B opens it.
        assert_eq!(
            SrtpContext::new(Suite::AesCm128HmacSha1_80, &a_key)
                .unprotect_rtp(&mut buf[..n].to_vec()),
            Err(SrtpError::AuthFailed)
        );
        let u = b_rx.unprotect_rtp(&mut buf[..n]).unwrap();
        assert_eq!(&buf[12..u.len], &payload[..]);

        phone_b
            .send_to(&protect(&mut b_tx, &rtp(seq, 0xB, &payload)), to_b)
            .unwrap();
        let (n, _) = phone_a.recv_from(&mut buf).unwrap();
        let u = a_rx.unprotect_rtp(&mut buf[..n]).unwrap();
        assert_eq!(u.ssrc, 0xB);
    }
    // RTCP crosses too, as SRTCP under the other leg's key, its content
    // intact: a sender report each way.
    for (from, to_leg, tx, to, rx, ssrc) in [
        (&phone_a, to_a, &mut a_tx, &phone_b, &mut b_rx, 0xAu32),
        (&phone_b, to_b, &mut b_tx, &phone_a, &mut a_rx, 0xB),
    ] {
        let mut sr = vec![0x80, 200, 0, 6];
        sr.extend_from_slice(&ssrc.to_be_bytes());
        sr.extend_from_slice(&[7; 20]);
        let mut packet = sr.clone();
        packet.resize(sr.len() + crate::srtp::SRTCP_OVERHEAD, 0);
        let n = tx.protect_rtcp(&mut packet, sr.len()).unwrap();
        from.send_to(&packet[..n], to_leg).unwrap();
        let (n, _) = to.recv_from(&mut buf).unwrap();
        assert_ne!(&buf[..sr.len()], &sr[..], "encrypted on the way out");
        let len = rx.unprotect_rtcp(&mut buf[..n]).unwrap();
        assert_eq!(&buf[..len], &sr[..]);
    }
    // A forged packet to leg A, from a stranger and from the other phone,
    // is not relayed.
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger.send_to(&rtp(99, 0xA, &[0; 170]), to_a).unwrap();
    phone_b.send_to(&rtp(98, 0xA, &[0; 170]), to_a).unwrap();
    phone_a
        .send_to(&protect(&mut a_tx, &rtp(50, 0xA, &[1; 160])), to_a)
        .unwrap();
    let (n, _) = phone_b.recv_from(&mut buf).unwrap();
    assert_eq!(b_rx.unprotect_rtp(&mut buf[..n]).unwrap().index, 50);

    // Silence: both legs are reported inactive.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut inactive = Vec::new();
    while inactive.len() < 2 {
        match rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(3), events.recv()).await })
        {
            Ok(Some(MediaEvent::Inactive { id, .. })) => inactive.push(id),
            other => panic!("expected inactivity, got {other:?}"),
        }
    }
    inactive.sort();
    assert_eq!(inactive, [leg_a.id, leg_b.id]);
    // Phone A is heard again: reported once.
    phone_a
        .send_to(&protect(&mut a_tx, &rtp(51, 0xA, &[2; 160])), to_a)
        .unwrap();
    match rt.block_on(async { tokio::time::timeout(Duration::from_secs(3), events.recv()).await }) {
        Ok(Some(MediaEvent::Active { id })) => assert_eq!(id, leg_a.id),
        other => panic!("expected activity, got {other:?}"),
    }

    engine.close(leg_a.id).unwrap();
    let report = match rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(3), events.recv()).await })
    {
        Ok(Some(MediaEvent::Closed { report })) => report,
        other => panic!("expected a report, got {other:?}"),
    };
    assert_eq!(report.id, leg_a.id);
    assert_eq!(report.suite, Some(Suite::AesCm128HmacSha1_80));
    assert_eq!((report.received_packets, report.sent_packets), (52, 50));
    // On its own port leg A sees both forgeries and counts them; on the
    // shared port the stranger matches no leg, and phone B's packet goes to
    // leg B, whose address it comes from.
    let forged_seen = if port == LegPort::Own { 2 } else { 0 };
    assert_eq!((report.auth_failures, report.lost), (forged_seen, 0));
    assert_eq!(report.remote, Some(phone_a.local_addr().unwrap()));
}

/// On the shared port, more new legs than are tried against one packet
/// all find their phones within a few packets, and a phone whose address
/// changes mid-call (a NAT rebinding) is followed once its packets
/// authenticate from the new address.
#[test]
fn shared_port_serves_many_new_legs_and_follows_a_moved_phone() {
    struct Phone {
        socket: UdpSocket,
        to: SocketAddr,
        tx: SrtpContext,
        rx: SrtpContext,
        ssrc: u32,
        seq: u16,
    }
    impl Phone {
        fn send(&mut self) {
            let seq = self.seq;
            self.seq += 1;
            let packet = protect(&mut self.tx, &rtp(seq, self.ssrc, &[7; 160]));
            self.socket.send_to(&packet, self.to).unwrap();
        }
        /// The next packet that opens under Parley's key for this phone.
        fn hear(&mut self) -> Option<u32> {
            let mut buf = [0u8; 2048];
            let (n, _) = self.socket.recv_from(&mut buf).ok()?;
            self.rx.unprotect_rtp(&mut buf[..n]).ok().map(|u| u.ssrc)
        }
    }
    let (engine, _events) = start_engine(41_300..=41_399, Duration::from_secs(60));
    let suite = Suite::AesCm128HmacSha1_80;
    let mut phones = Vec::new();
    for call in 0..12u32 {
        let sockets = [(); 2].map(|()| {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            socket
        });
        let keys = [(); 2].map(|()| (MasterKey::generate(), MasterKey::generate()));
        let [leg, _] = bridge_srtp(
            &engine,
            LegPort::Shared,
            [0, 1].map(|side| (&sockets[side], &keys[side].0, &keys[side].1)),
        );
        for (side, (socket, (phone_key, parley_key))) in sockets.into_iter().zip(keys).enumerate() {
            phones.push(Phone {
                socket,
                to: SocketAddr::new(LOCAL, leg.port),
                tx: SrtpContext::new(suite, &phone_key),
                rx: SrtpContext::new(suite, &parley_key),
                ssrc: call * 2 + side as u32,
                seq: 1,
            });
        }
    }
    // 24 legs wait for a first packet: every phone sends until its peer
    // hears it.
    for call in 0..12 {
        let (a, b) = (call * 2, call * 2 + 1);
        let heard = (0..10).any(|_| {
            phones[a].send();
            phones[b].hear() == Some(phones[a].ssrc)
        });
        assert!(heard, "call {call}: A never reached B");
        let heard = (0..10).any(|_| {
            phones[b].send();
            phones[a].hear() == Some(phones[b].ssrc)
        });
        assert!(heard, "call {call}: B never reached A");
    }
    // Phone 0 moves: same key and SSRC, new address.
    let moved = UdpSocket::bind("127.0.0.1:0").unwrap();
    moved
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    phones[0].socket = moved;
    phones[0].send();
    assert_eq!(phones[1].hear(), Some(0), "the moved phone is relayed");
    phones[1].send();
    assert_eq!(phones[0].hear(), Some(1), "its peer's audio follows it");
    // A stranger sending from the old address's neighbourhood with a
    // forged packet under phone 0's SSRC moves nothing.
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut forged = rtp(500, 0, &[0; 160]);
    forged.extend_from_slice(&[0; 10]);
    stranger.send_to(&forged, phones[0].to).unwrap();
    phones[1].send();
    assert_eq!(
        phones[0].hear(),
        Some(1),
        "still relayed to the moved phone"
    );
}

/// Garbage on the shared port — random bytes, RTP-looking packets with a
/// real leg's SSRC, SRTCP-sized junk, from strangers and from a real
/// phone's own address — neither stops the relay nor moves a leg: every
/// genuine packet sent between the garbage still arrives.
#[test]
fn garbage_on_the_shared_port_disturbs_no_call() {
    let (engine, _events) = start_engine(41_400..=41_499, Duration::from_secs(60));
    let suite = Suite::AesCm128HmacSha1_80;
    let phone_a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let phone_b = UdpSocket::bind("127.0.0.1:0").unwrap();
    phone_b
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (a_key, b_key, parley_b) = (
        MasterKey::generate(),
        MasterKey::generate(),
        MasterKey::generate(),
    );
    let [leg_a, _] = bridge_srtp(
        &engine,
        LegPort::Shared,
        [
            (&phone_a, &a_key, &MasterKey::generate()),
            (&phone_b, &b_key, &parley_b),
        ],
    );
    let port = SocketAddr::new(LOCAL, leg_a.port);
    let mut a_tx = SrtpContext::new(suite, &a_key);
    let mut b_rx = SrtpContext::new(suite, &parley_b);
    let strangers: Vec<UdpSocket> = (0..4)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let rtcp_port = SocketAddr::new(LOCAL, leg_a.port + 1);
    let mut buf = [0u8; 2048];
    for seq in 0..200u16 {
        // Four pieces of garbage per genuine packet.
        for (j, stranger) in strangers.iter().enumerate() {
            let len = rand::random_range(0..1600);
            let mut junk: Vec<u8> = (0..len).map(|_| rand::random()).collect();
            if j % 2 == 0 && junk.len() >= 12 {
                // Looks like RTP from phone A's stream.
                junk[0] = 0x80;
                junk[8..12].copy_from_slice(&0xAu32.to_be_bytes());
            }
            let from = if j == 3 { &phone_a } else { stranger };
            let to = if j == 1 { rtcp_port } else { port };
            from.send_to(&junk, to).unwrap();
        }
        let payload = [seq as u8; 160];
        phone_a
            .send_to(&protect(&mut a_tx, &rtp(seq, 0xA, &payload)), port)
            .unwrap();
        // The genuine packet arrives; garbage never does.
        let (n, _) = phone_b
            .recv_from(&mut buf)
            .expect("a genuine packet is relayed");
        let u = b_rx.unprotect_rtp(&mut buf[..n]).unwrap();
        assert_eq!(&buf[12..u.len], &payload[..]);
    }
}

#[test]
fn ports_run_out_cleanly_and_come_back() {
    let (engine, _events) = start_engine(41_200..=41_205, Duration::from_secs(60));
    // The first pair is the shared one, which never runs out.
    let legs: Vec<OpenLeg> = (0..2)
        .map(|_| engine.open_leg(LegPort::Own).unwrap())
        .collect();
    let mut ports: Vec<u16> = legs.iter().map(|l| l.port).collect();
    ports.sort();
    assert_eq!(ports, [41_202, 41_204]);
    assert!(matches!(
        engine.open_leg(LegPort::Own),
        Err(MediaError::PortsExhausted {
            lo: 41_200,
            hi: 41_205
        })
    ));
    assert_eq!(engine.open_leg(LegPort::Shared).unwrap().port, 41_200);
    engine.close(legs[1].id).unwrap();
    // The relay closes the sockets asynchronously.
    let deadline = Instant::now() + Duration::from_secs(2);
    let reopened = loop {
        match engine.open_leg(LegPort::Own) {
            Ok(l) => break l,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(reopened.port, legs[1].port);
}

proptest::proptest! {
    /// Datagrams of any shape, as RTP or RTCP, never panic the leg and never
    /// move an SRTP leg's latch; the leg still relays its phone afterwards.
    #[test]
    fn arbitrary_datagrams_never_latch_an_srtp_leg(
        datagrams in proptest::collection::vec(
            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400), 1..8),
        rtcp in proptest::prelude::any::<bool>(),
    ) {
        let now = Instant::now();
        let phone_key = MasterKey::generate();
        let phone_addr: SocketAddr = "192.0.2.10:4000".parse().unwrap();
        let stranger: SocketAddr = "203.0.113.66:5000".parse().unwrap();
        let mut leg = Leg::new(LegId(1), now);
        leg.configure(srtp_media(phone_addr, &phone_key, &MasterKey::generate()), now);
        let kind = if rtcp { Kind::Rtcp } else { Kind::Rtp };
        for mut d in datagrams {
            proptest::prop_assert!(leg.receive(kind, stranger, &mut d, now).is_err());
        }
        proptest::prop_assert_eq!(leg.latched(), None);
        let mut phone = SrtpContext::new(Suite::AesCm128HmacSha1_80, &phone_key);
        let mut p = protect(&mut phone, &rtp(1, 9, &[7; 160]));
        proptest::prop_assert_eq!(leg.receive(Kind::Rtp, phone_addr, &mut p, now), Ok(172));
        proptest::prop_assert_eq!(leg.latched(), Some(phone_addr));
    }
}

/// A phone that restarts its stream (a new SSRC, as after a transfer or a
/// re-INVITE) and later jumps its sequence numbers keeps being relayed,
/// re-keyed, to the other phone, and neither change counts as loss.
#[test]
fn srtp_relay_follows_ssrc_changes_and_sequence_jumps() {
    let now = Instant::now();
    let (phone_a_key, parley_a_key) = (MasterKey::generate(), MasterKey::generate());
    let (phone_b_key, parley_b_key) = (MasterKey::generate(), MasterKey::generate());
    let a_addr: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let b_addr: SocketAddr = "192.0.2.20:50000".parse().unwrap();
    let mut leg_a = Leg::new(LegId(1), now);
    leg_a.configure(srtp_media(a_addr, &phone_a_key, &parley_a_key), now);
    let mut leg_b = Leg::new(LegId(2), now);
    leg_b.configure(srtp_media(b_addr, &phone_b_key, &parley_b_key), now);
    let mut phone_a = SrtpContext::new(Suite::AesCm128HmacSha1_80, &phone_a_key);
    let mut phone_b_rx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &parley_b_key);

    // SSRC 1 from 100; SSRC 2 from 40,000; then SSRC 2 jumps by 3,000.
    let stream: Vec<(u32, u16)> = (0..50)
        .map(|i| (1, 100 + i))
        .chain((0..50).map(|i| (2, 40_000 + i)))
        .chain((0..50).map(|i| (2, 43_050 + i)))
        .collect();
    for (n, &(ssrc, seq)) in stream.iter().enumerate() {
        let payload = [n as u8; 160];
        let mut buf = protect(&mut phone_a, &rtp(seq, ssrc, &payload));
        let srtp_len = buf.len();
        buf.resize(srtp_len + crate::srtp::MAX_SRTP_OVERHEAD, 0);
        let at = now + Duration::from_millis(20 * n as u64);
        let plain = leg_a
            .receive(Kind::Rtp, a_addr, &mut buf[..srtp_len], at)
            .unwrap_or_else(|e| panic!("packet {n} (ssrc {ssrc}, seq {seq}): {e:?}"));
        let (dest, out_len) = leg_b.prepare_send(Kind::Rtp, &mut buf, plain).unwrap();
        assert_eq!(dest, b_addr);
        let got = phone_b_rx.unprotect_rtp(&mut buf[..out_len]).unwrap();
        assert_eq!(got.ssrc, ssrc);
        assert_eq!(&buf[12..got.len], &payload[..], "packet {n}");
    }
    assert_eq!(leg_a.receiving.packets, 150);
    assert_eq!(leg_a.receiving.lost(), 0);
    assert_eq!(leg_b.sending.packets, 150);

    // Phone A takes a new key in a re-INVITE and starts SSRC 2 over from
    // 20,000, behind what B got; Parley's key towards B stays. After one packet, B hears the
    // stream again, numbered on from where it was.
    let phone_a_key = MasterKey::generate();
    leg_a.configure(srtp_media(a_addr, &phone_a_key, &parley_a_key), now);
    let mut phone_a = SrtpContext::new(Suite::AesCm128HmacSha1_80, &phone_a_key);
    let mut heard = Vec::new();
    for (n, seq) in (20_000..20_050u16).enumerate() {
        let mut buf = protect(&mut phone_a, &rtp(seq, 2, &[7; 160]));
        let srtp_len = buf.len();
        buf.resize(srtp_len + crate::srtp::MAX_SRTP_OVERHEAD, 0);
        let at = now + Duration::from_millis(20 * (150 + n as u64));
        let plain = leg_a
            .receive(Kind::Rtp, a_addr, &mut buf[..srtp_len], at)
            .unwrap();
        if let Some((_, out_len)) = leg_b.prepare_send(Kind::Rtp, &mut buf, plain) {
            heard.push(phone_b_rx.unprotect_rtp(&mut buf[..out_len]).unwrap().index);
        }
    }
    let expected: Vec<u64> = (43_100..43_149).collect();
    assert_eq!(heard, expected);
}

/// Jitter is counted at the codec's clock (48 kHz for Opus), and DTMF
/// events, whose packets repeat the event's start timestamp, are counted as
/// packets but kept out of it.
#[test]
fn jitter_follows_the_codec_clock_and_leaves_out_dtmf() {
    let t0 = Instant::now();
    let desk: SocketAddr = "10.0.0.23:11780".parse().unwrap();
    let mut leg = Leg::new(LegId(5), t0);
    leg.configure(
        LegMedia {
            clock_rate: 48_000,
            telephone_event_pt: Some(101),
            ..plain_muxed(Some(desk))
        },
        t0,
    );
    // 100 Opus packets on a steady 20 ms clock (960 ticks each), with a
    // DTMF event in the middle: 6 packets of payload type 101 sharing
    // their start timestamp, 50 ms apart, while the voice timestamps run on.
    let mut seq = 0u16;
    let mut at = t0;
    for n in 0..100u32 {
        let mut p = rtp(seq, 1, &[0; 80]);
        p[4..8].copy_from_slice(&(n * 960).to_be_bytes());
        leg.receive(Kind::Rtp, desk, &mut p, at).unwrap();
        seq += 1;
        if n == 50 {
            for k in 0..6u64 {
                let mut e = rtp(seq, 1, &[0; 4]);
                e[1] = 101;
                e[4..8].copy_from_slice(&(n * 960).to_be_bytes());
                let when = at + Duration::from_millis(10 + k * 2);
                leg.receive(Kind::Rtp, desk, &mut e, when).unwrap();
                seq += 1;
            }
        }
        at += Duration::from_millis(20);
    }
    assert_eq!(leg.receiving.packets, 106);
    assert_eq!(leg.receiving.lost(), 0);
    let jitter = leg.receiving.jitter_ms(48_000);
    assert!(jitter < 0.5, "{jitter} ms on a perfect stream");
    let report = LegReport::of(&leg, 0);
    assert!(report.jitter_ms < 0.5);
    assert!(report.mos_received.unwrap() > 4.3);
}

/// The MOS of what Parley sent uses the phone's count of lost packets over
/// the whole call, not the fraction lost in its last report's interval.
#[test]
fn the_sent_direction_counts_loss_over_the_whole_call() {
    let mut leg = Leg::new(LegId(6), Instant::now());
    leg.sending.packets = 1000;
    leg.remote_report = Some(stats::RemoteReport {
        fraction_lost: 0.0,
        cumulative_lost: 300,
        jitter: 0,
    });
    let mos = LegReport::of(&leg, 0).mos_sent.unwrap();
    assert!(
        mos < 3.0,
        "30% of the call lost, a clean last interval: {mos}"
    );
    // The same gaps, all from packets lost before Parley on the other leg:
    // the way from Parley to this phone lost nothing.
    let mos = LegReport::of(&leg, 300).mos_sent.unwrap();
    assert!(mos > 4.3, "{mos}");
}

/// A codec change mid-call (8 kHz to 48 kHz) carries the jitter estimate
/// over to the new clock instead of taking the change of units for
/// seconds of jitter.
#[test]
fn jitter_survives_a_change_of_codec_clock() {
    let t0 = Instant::now();
    let mut r = stats::Receiving::default();
    let mut at = t0;
    for n in 0..100u32 {
        r.on_rtp(1, u64::from(n), n * 160, 172, at, Some(8_000));
        at += Duration::from_millis(20);
    }
    for n in 0..5u32 {
        r.on_rtp(
            1,
            100 + u64::from(n),
            7_000_000 + n * 960,
            172,
            at,
            Some(48_000),
        );
        at += Duration::from_millis(20);
    }
    let jitter = r.jitter_ms(48_000);
    assert!(jitter < 1.0, "{jitter} ms on a steady stream");
}

/// Duplicates in one stream do not hide loss in the next (after an SSRC
/// change).
#[test]
fn duplicates_in_one_stream_do_not_cancel_loss_in_the_next() {
    let t0 = Instant::now();
    let mut r = stats::Receiving::default();
    for n in 0..20u64 {
        r.on_rtp(1, n, 0, 172, t0, None);
    }
    for n in 0..5u64 {
        r.on_rtp(1, n, 0, 172, t0, None);
    }
    // SSRC 2: 21 sent, five lost (its first packet only opens the count).
    for n in (1000..1021u64).filter(|n| n % 4 != 3) {
        r.on_rtp(2, n, 0, 172, t0, None);
    }
    assert_eq!(r.lost(), 5);
}

/// A packet SRTP will not protect for the phone (here a duplicate, which
/// would reuse keystream) is dropped and counted, not lost silently.
#[test]
fn packets_srtp_refuses_to_send_are_counted() {
    let now = Instant::now();
    let b_addr: SocketAddr = "192.0.2.20:50000".parse().unwrap();
    let mut leg_b = Leg::new(LegId(2), now);
    leg_b.configure(
        srtp_media(b_addr, &MasterKey::generate(), &MasterKey::generate()),
        now,
    );
    let plain = rtp(7, 1, &[0; 160]);
    for round in 0..2 {
        let mut buf = plain.clone();
        buf.resize(plain.len() + crate::srtp::MAX_SRTP_OVERHEAD, 0);
        let sent = leg_b.prepare_send(Kind::Rtp, &mut buf, plain.len());
        assert_eq!(sent.is_some(), round == 0);
    }
    assert_eq!(leg_b.sending.srtp_refused, 1);
    assert_eq!(LegReport::of(&leg_b, 0).srtp_refused, 1);
}

/// Runs `f` on a thread of its own in a new network namespace (root
/// needed) whose loopback is up: sockets `f` makes stay there, so a
/// socket bound to all addresses is reachable from loopback only.
pub(crate) fn in_own_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: plain system calls on this thread's own namespace and
        // on a live, zeroed ifreq naming "lo".
        unsafe {
            assert_eq!(
                libc::unshare(libc::CLONE_NEWNET),
                0,
                "a network namespace of its own (needs root): {}",
                io::Error::last_os_error()
            );
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(fd >= 0);
            let mut req: libc::ifreq = std::mem::zeroed();
            for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
                *d = *s as libc::c_char;
            }
            assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req), 0);
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut req), 0);
            libc::close(fd);
        }
        f()
    })
    .join()
    .unwrap()
}

/// On media sockets bound to all addresses, packets to a phone leave from
/// the address Parley's SDP gave that phone: a phone, or its NAT, may drop
/// media from any other. An address the host does not have (a public one
/// behind a 1:1 NAT) falls back to the one routing picks, losing nothing.
#[test]
fn media_leaves_from_the_address_each_leg_was_given() {
    for (port, lo) in [(LegPort::Own, 41_300), (LegPort::Shared, 41_400)] {
        // All in the namespace: the engine binds a leg's own ports when
        // the leg is opened, in the namespace of the thread that opens it.
        in_own_netns(move || relay_from_given_addresses(port, lo));
    }
}

fn relay_from_given_addresses(port: LegPort, lo: u16) {
    let (engine, _events) = MediaEngine::start(MediaConfig {
        bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        ports: lo..=lo + 99,
        inactivity: Duration::from_secs(30),
    })
    .unwrap();
    let phone = || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    };
    let (phone_a, phone_b) = (phone(), phone());
    let (a_key, b_key) = (MasterKey::generate(), MasterKey::generate());
    let (parley_a, parley_b) = (MasterKey::generate(), MasterKey::generate());
    // Leg A was given an address this host lacks; leg B 127.0.0.3.
    let given_a: IpAddr = "192.0.2.1".parse().unwrap();
    let given_b: IpAddr = "127.0.0.3".parse().unwrap();
    let mut legs = Vec::new();
    for (phone, key, parley, given) in [
        (&phone_a, &a_key, &parley_a, given_a),
        (&phone_b, &b_key, &parley_b, given_b),
    ] {
        let leg = engine.open_leg(port).unwrap();
        let mut media = srtp_media(phone.local_addr().unwrap(), key, parley);
        media.local_ip = Some(given);
        engine.configure(leg.id, media).unwrap();
        legs.push(leg);
    }
    engine.bridge(legs[0].id, legs[1].id).unwrap();
    let mut a_tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &a_key);
    let mut b_tx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &b_key);
    let mut a_rx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &parley_a);
    let mut b_rx = SrtpContext::new(Suite::AesCm128HmacSha1_80, &parley_b);
    let to_a = SocketAddr::new("127.0.0.2".parse().unwrap(), legs[0].port);
    let to_b = SocketAddr::new(given_b, legs[1].port);
    let mut buf = [0u8; 2048];
    for seq in 0..5u16 {
        let payload = [seq as u8; 160];
        phone_a
            .send_to(&protect(&mut a_tx, &rtp(seq, 0xA, &payload)), to_a)
            .unwrap();
        let (n, from) = phone_b.recv_from(&mut buf).unwrap();
        assert_eq!(from, to_b, "{port:?}: from the address B was given");
        b_rx.unprotect_rtp(&mut buf[..n]).unwrap();

        phone_b
            .send_to(&protect(&mut b_tx, &rtp(seq, 0xB, &payload)), to_b)
            .unwrap();
        let (n, from) = phone_a.recv_from(&mut buf).unwrap();
        assert_eq!(
            from,
            SocketAddr::new(LOCAL, legs[0].port),
            "{port:?}: from the routed address"
        );
        a_rx.unprotect_rtp(&mut buf[..n]).unwrap();
    }
}
