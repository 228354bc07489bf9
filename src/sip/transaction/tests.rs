//! Transaction timers in virtual time: every test drives the layer with a
//! fake clock and checks what goes on the wire and when.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::sip::message::Framing;
use crate::sip::transport::{Flow, Transport};

fn udp() -> Flow {
    Flow::udp(addr("127.0.0.1:5060"), addr("192.0.2.7:40000"))
}

fn tls() -> Flow {
    Flow::stream(
        Transport::Tls,
        addr("127.0.0.1:5061"),
        addr("192.0.2.7:40001"),
        9,
    )
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn request(method: &str, branch: &str) -> Message {
    let text = format!(
        "{method} sip:100@pbx SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.7:40000;branch={branch};rport\r\n\
         From: <sip:100@pbx>;tag=f1\r\nTo: <sip:100@pbx>\r\nCall-ID: call-1\r\nCSeq: 7 {method}\r\n\
         Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    Message::parse(Bytes::from(text), Framing::Datagram).unwrap()
}

/// The ACK of the 2xx `response_bytes` makes (To tag `t`), on a branch of
/// its own.
fn ack_of_2xx(branch: &str) -> Message {
    let text = format!(
        "ACK sip:100@pbx SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.7:40000;branch={branch};rport\r\n\
         From: <sip:100@pbx>;tag=f1\r\nTo: <sip:100@pbx>;tag=t\r\nCall-ID: call-1\r\nCSeq: 7 ACK\r\n\
         Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    Message::parse(Bytes::from(text), Framing::Datagram).unwrap()
}

fn response_bytes(req: &Message, status: u16) -> Bytes {
    MessageBuilder::response_to(req, status, "Whatever", Some("t")).finish()
}

fn response(req: &Message, status: u16) -> Message {
    Message::parse(response_bytes(req, status), Framing::Datagram).unwrap()
}

fn drain(layer: &mut TransactionLayer) -> Vec<Transmit> {
    std::iter::from_fn(|| layer.poll_transmit()).collect()
}

/// Runs timers up to `until` in steps, recording the time of each transmit.
fn run_until(
    layer: &mut TransactionLayer,
    start: Instant,
    until: Duration,
) -> Vec<(Duration, Transmit)> {
    let mut sent = Vec::new();
    while let Some(t) = layer.poll_timeout() {
        if t > start + until {
            break;
        }
        layer.handle_timeout(t);
        for tr in drain(layer) {
            sent.push((t - start, tr));
        }
    }
    sent
}

fn new_server_tx(
    layer: &mut TransactionLayer,
    now: Instant,
    msg: Message,
    flow: Flow,
) -> ServerTxId {
    match layer.handle_request(now, msg, flow).unwrap() {
        Some(TuInput::Request { tx, .. }) => tx,
        other => panic!("expected a new request, got {other:?}"),
    }
}

#[test]
fn non_invite_server_absorbs_retransmissions_until_timer_j() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("REGISTER", "z9hG4bKa");
    let tx = new_server_tx(&mut layer, t0, req.clone(), udp());

    // A retransmission before the answer is absorbed silently.
    assert!(
        layer
            .handle_request(t0, req.clone(), udp())
            .unwrap()
            .is_none()
    );
    assert!(drain(&mut layer).is_empty());

    layer.respond(t0, tx, 200, response_bytes(&req, 200));
    assert_eq!(drain(&mut layer).len(), 1);

    // Retransmissions now repeat the final response, without reaching the TU.
    let t1 = t0 + Duration::from_secs(10);
    assert!(
        layer
            .handle_request(t1, req.clone(), udp())
            .unwrap()
            .is_none()
    );
    let again = drain(&mut layer);
    assert_eq!(again.len(), 1);
    assert_eq!(
        Message::parse(again[0].bytes.clone(), Framing::Datagram)
            .unwrap()
            .status(),
        Some(200)
    );

    // Timer J is 64*T1 = 32 s: just before it the transaction still exists.
    layer.handle_timeout(t0 + Duration::from_millis(31_999));
    assert_eq!(layer.server_count(), 1);
    layer.handle_timeout(t0 + Duration::from_secs(32));
    assert_eq!(layer.server_count(), 0);
    // After that, the same request is new again.
    assert!(matches!(
        layer
            .handle_request(t0 + Duration::from_secs(33), req, udp())
            .unwrap(),
        Some(TuInput::Request { .. })
    ));
}

#[test]
fn non_invite_server_over_tls_ends_at_once() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("REGISTER", "z9hG4bKb");
    let tx = new_server_tx(&mut layer, t0, req.clone(), tls());
    layer.respond(t0, tx, 401, response_bytes(&req, 401));
    assert_eq!(drain(&mut layer).len(), 1);
    assert_eq!(layer.server_count(), 0);
    assert_eq!(layer.poll_timeout(), None);
}

#[test]
fn provisional_is_repeated_for_retransmitted_request() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("OPTIONS", "z9hG4bKc");
    let tx = new_server_tx(&mut layer, t0, req.clone(), udp());
    layer.respond(t0, tx, 100, response_bytes(&req, 100));
    drain(&mut layer);
    assert!(
        layer
            .handle_request(t0, req.clone(), udp())
            .unwrap()
            .is_none()
    );
    let sent = drain(&mut layer);
    assert_eq!(
        Message::parse(sent[0].bytes.clone(), Framing::Datagram)
            .unwrap()
            .status(),
        Some(100)
    );
}

#[test]
fn invite_server_retransmits_final_response_with_timer_g_until_ack() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("INVITE", "z9hG4bKd");
    let tx = new_server_tx(&mut layer, t0, req.clone(), udp());
    layer.respond(t0, tx, 486, response_bytes(&req, 486));
    assert_eq!(drain(&mut layer).len(), 1);

    // Timer G: 0.5, 1, 2, 4, 4 ... seconds apart (capped at T2).
    let sent = run_until(&mut layer, t0, Duration::from_millis(11_600));
    let times: Vec<u64> = sent.iter().map(|(t, _)| t.as_millis() as u64).collect();
    assert_eq!(times, vec![500, 1500, 3500, 7500, 11_500]);

    // The ACK moves it to Confirmed: no more retransmissions, absorbed ACKs.
    let ack = request("ACK", "z9hG4bKd");
    let t_ack = t0 + Duration::from_millis(11_600);
    assert!(
        layer
            .handle_request(t_ack, ack.clone(), udp())
            .unwrap()
            .is_none()
    );
    assert!(layer.handle_request(t_ack, ack, udp()).unwrap().is_none());
    // Timer I (T4 = 5 s) ends it.
    let sent = run_until(&mut layer, t0, Duration::from_secs(60));
    assert!(sent.is_empty());
    assert_eq!(layer.server_count(), 0);
    assert!(layer.poll_input().is_none());
}

#[test]
fn invite_server_without_ack_reports_timer_h() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("INVITE", "z9hG4bKe");
    let tx = new_server_tx(&mut layer, t0, req.clone(), udp());
    layer.respond(t0, tx, 480, response_bytes(&req, 480));
    assert_eq!(drain(&mut layer).len(), 1);
    let sent = run_until(&mut layer, t0, Duration::from_secs(40));
    // G fires at 0.5,1.5,3.5,7.5 then every 4 s until H at 32 s.
    let times: Vec<u64> = sent.iter().map(|(t, _)| t.as_millis() as u64).collect();
    assert_eq!(times.len(), 10, "{times:?}");
    assert!(sent.iter().all(|(t, _)| *t < Duration::from_secs(32)));
    assert!(matches!(layer.poll_input(), Some(TuInput::ServerNoAck { tx: id }) if id == tx));
    assert_eq!(layer.server_count(), 0);
}

#[test]
fn invite_2xx_enters_accepted_and_passes_ack_to_the_tu() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("INVITE", "z9hG4bKf");
    let tx = new_server_tx(&mut layer, t0, req.clone(), udp());
    layer.respond(t0, tx, 200, response_bytes(&req, 200));
    drain(&mut layer);
    // The TU retransmits its 2xx through the transaction while waiting for ACK.
    layer.respond(
        t0 + Duration::from_millis(500),
        tx,
        200,
        response_bytes(&req, 200),
    );
    assert_eq!(drain(&mut layer).len(), 1);
    // INVITE retransmissions are absorbed in Accepted (RFC 6026).
    assert!(
        layer
            .handle_request(t0, req.clone(), udp())
            .unwrap()
            .is_none()
    );
    // An ACK for the 2xx (new branch) goes to the TU.
    let ack = ack_of_2xx("z9hG4bKnew");
    assert!(matches!(
        layer.handle_request(t0, ack, udp()).unwrap(),
        Some(TuInput::Ack { .. })
    ));
    // Timer L ends the transaction after 64*T1.
    layer.handle_timeout(t0 + Duration::from_secs(32));
    assert_eq!(layer.server_count(), 0);
}

#[test]
fn cancel_finds_its_invite() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let invite = request("INVITE", "z9hG4bKg");
    let tx = new_server_tx(&mut layer, t0, invite, udp());
    let cancel = request("CANCEL", "z9hG4bKg");
    assert_eq!(layer.find_invite_for_cancel(&cancel), Some(tx));
    assert!(layer.server_is_pending(tx));
    // The CANCEL is a transaction of its own.
    assert!(matches!(
        layer.handle_request(t0, cancel, udp()).unwrap(),
        Some(TuInput::Request { .. })
    ));
    assert_eq!(layer.server_count(), 2);
}

#[test]
fn rfc2543_requests_without_magic_cookie_still_match() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("OPTIONS", "old-style-1");
    let tx = new_server_tx(&mut layer, t0, req.clone(), udp());
    layer.respond(t0, tx, 200, response_bytes(&req, 200));
    drain(&mut layer);
    assert!(layer.handle_request(t0, req, udp()).unwrap().is_none());
    assert_eq!(drain(&mut layer).len(), 1);
}

#[test]
fn full_table_evicts_oldest_completed_then_refuses() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::with_capacity(TimerConfig::default(), 2);
    let r1 = request("REGISTER", "z9hG4bK1");
    let tx1 = new_server_tx(&mut layer, t0, r1.clone(), udp());
    layer.respond(t0, tx1, 200, response_bytes(&r1, 200));
    let _tx2 = new_server_tx(&mut layer, t0, request("REGISTER", "z9hG4bK2"), udp());
    // The table is full; tx1 only waits for retransmissions, so it goes.
    let _tx3 = new_server_tx(&mut layer, t0, request("REGISTER", "z9hG4bK3"), udp());
    assert_eq!(layer.server_count(), 2);
    // Now both are pending: nothing may be dropped, the request is refused.
    assert_eq!(
        layer
            .handle_request(t0, request("REGISTER", "z9hG4bK4"), udp())
            .unwrap_err()
            .error,
        TxError::Overloaded
    );
    // The evicted transaction's timers are harmless when they fire.
    layer.handle_timeout(t0 + Duration::from_secs(60));
    assert_eq!(layer.server_count(), 2);
}

#[test]
fn stale_timer_entries_are_compacted() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::with_capacity(TimerConfig::default(), 4);
    for i in 0..20_000 {
        let req = request("INVITE", &format!("z9hG4bKc{i}"));
        let tx = new_server_tx(&mut layer, t0, req.clone(), udp());
        layer.respond(t0, tx, 486, response_bytes(&req, 486));
        drain(&mut layer);
    }
    // Timers G and H were armed for 20,000 transactions evicted long ago.
    assert!(
        layer.timers.len() < 8 * 1024,
        "heap holds {}",
        layer.timers.len()
    );
}

#[test]
fn completed_queue_stays_bounded_by_the_table() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::with_capacity(TimerConfig::default(), 4);
    for i in 0..20_000 {
        let req = request("REGISTER", &format!("z9hG4bKq{i}"));
        let tx = new_server_tx(&mut layer, t0, req.clone(), udp());
        layer.respond(t0, tx, 200, response_bytes(&req, 200));
        drain(&mut layer);
    }
    assert!(layer.completed_non_invite.len() <= 4);
    assert_eq!(layer.poll_timeout(), Some(t0 + Duration::from_secs(32)));
    layer.handle_timeout(t0 + Duration::from_secs(32));
    assert_eq!(layer.server_count(), 0);
    assert_eq!(layer.poll_timeout(), None);
}

#[test]
fn non_invite_client_retransmits_with_timer_e_and_times_out_with_f() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("OPTIONS", "z9hG4bKclient1");
    let tx = layer
        .send_request(t0, udp(), req.as_bytes().clone())
        .unwrap();
    assert_eq!(drain(&mut layer).len(), 1);
    let sent = run_until(&mut layer, t0, Duration::from_secs(40));
    let times: Vec<u64> = sent.iter().map(|(t, _)| t.as_millis() as u64).collect();
    // 0.5, 1.5, 3.5, 7.5, then every T2 = 4 s until Timer F at 32 s.
    assert_eq!(
        times,
        vec![
            500, 1500, 3500, 7500, 11_500, 15_500, 19_500, 23_500, 27_500, 31_500
        ]
    );
    assert!(matches!(layer.poll_input(), Some(TuInput::ClientTimeout { tx: id }) if id == tx));
    assert_eq!(layer.client_count(), 0);
}

#[test]
fn non_invite_client_keeps_t2_after_provisional_and_absorbs_final_repeats() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("OPTIONS", "z9hG4bKclient2");
    let tx = layer
        .send_request(t0, udp(), req.as_bytes().clone())
        .unwrap();
    drain(&mut layer);
    let got = layer.handle_response(t0 + Duration::from_millis(100), response(&req, 100), udp());
    assert!(matches!(got, Some(TuInput::Response { .. })));
    // Timer E was armed at T1 = 500 ms; after it fires, retransmissions
    // continue every T2 because we are in Proceeding.
    let sent = run_until(&mut layer, t0, Duration::from_millis(9_000));
    let times: Vec<u64> = sent.iter().map(|(t, _)| t.as_millis() as u64).collect();
    assert_eq!(times, vec![500, 4500, 8500]);
    let final_at = t0 + Duration::from_secs(9);
    let got = layer.handle_response(final_at, response(&req, 200), udp());
    assert!(matches!(got, Some(TuInput::Response { tx: id, .. }) if id == tx));
    assert!(
        layer
            .handle_response(final_at, response(&req, 200), udp())
            .is_none()
    );
    // Timer K (T4) ends it; no more retransmissions meanwhile.
    assert!(run_until(&mut layer, t0, Duration::from_secs(30)).is_empty());
    assert_eq!(layer.client_count(), 0);
}

#[test]
fn invite_client_timer_a_doubles_and_b_gives_up() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("INVITE", "z9hG4bKclient3");
    let tx = layer
        .send_request(t0, udp(), req.as_bytes().clone())
        .unwrap();
    drain(&mut layer);
    let sent = run_until(&mut layer, t0, Duration::from_secs(40));
    let times: Vec<u64> = sent.iter().map(|(t, _)| t.as_millis() as u64).collect();
    assert_eq!(times, vec![500, 1500, 3500, 7500, 15_500, 31_500]);
    assert!(matches!(layer.poll_input(), Some(TuInput::ClientTimeout { tx: id }) if id == tx));
}

#[test]
fn invite_client_acks_non_2xx_and_reacks_retransmissions() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("INVITE", "z9hG4bKclient4");
    layer
        .send_request(t0, udp(), req.as_bytes().clone())
        .unwrap();
    drain(&mut layer);
    assert!(
        layer
            .handle_response(t0, response(&req, 180), udp())
            .is_some()
    );
    // Proceeding: no retransmissions and no Timer B.
    assert!(run_until(&mut layer, t0, Duration::from_secs(100)).is_empty());
    let t1 = t0 + Duration::from_secs(100);
    assert!(
        layer
            .handle_response(t1, response(&req, 486), udp())
            .is_some()
    );
    let acks = drain(&mut layer);
    assert_eq!(acks.len(), 1);
    let ack = Message::parse(acks[0].bytes.clone(), Framing::Datagram).unwrap();
    assert_eq!(ack.method(), Some(Method::Ack));
    assert_eq!(ack.cseq().unwrap().seq, 7);
    assert_eq!(ack.cseq().unwrap().method, Method::Ack);
    assert_eq!(ack.top_via().unwrap().branch(), Some("z9hG4bKclient4"));
    assert_eq!(ack.to().unwrap().tag(), Some("t"));
    // A retransmitted 486 is re-ACKed and not passed up.
    assert!(
        layer
            .handle_response(t1, response(&req, 486), udp())
            .is_none()
    );
    assert_eq!(drain(&mut layer).len(), 1);
    // Timer D (32 s) ends it.
    layer.handle_timeout(t1 + Duration::from_secs(32));
    assert_eq!(layer.client_count(), 0);
}

#[test]
fn invite_client_passes_every_2xx_while_accepted() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("INVITE", "z9hG4bKclient5");
    layer
        .send_request(t0, tls(), req.as_bytes().clone())
        .unwrap();
    drain(&mut layer);
    assert!(
        layer
            .handle_response(t0, response(&req, 200), tls())
            .is_some()
    );
    assert!(
        layer
            .handle_response(t0, response(&req, 200), tls())
            .is_some()
    );
    layer.handle_timeout(t0 + Duration::from_secs(32));
    assert!(matches!(
        layer.handle_response(t0 + Duration::from_secs(33), response(&req, 200), tls()),
        Some(TuInput::StrayResponse { .. })
    ));
}

#[test]
fn reliable_client_never_retransmits_and_fails_with_its_flow() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("OPTIONS", "z9hG4bKclient6");
    let tx = layer
        .send_request(t0, tls(), req.as_bytes().clone())
        .unwrap();
    drain(&mut layer);
    assert_eq!(layer.poll_timeout(), Some(t0 + Duration::from_secs(32)));
    layer.flow_failed(&tls());
    assert!(matches!(layer.poll_input(), Some(TuInput::ClientTimeout { tx: id }) if id == tx));
    assert!(run_until(&mut layer, t0, Duration::from_secs(60)).is_empty());
}

#[test]
fn completed_invite_queue_stays_bounded_when_transactions_end_by_timer() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let mut now = t0;
    for i in 0..20_000 {
        let req = request("INVITE", &format!("z9hG4bKr{i}"));
        let tx = new_server_tx(&mut layer, now, req.clone(), tls());
        layer.respond(now, tx, 481, response_bytes(&req, 481));
        drain(&mut layer);
        // Acknowledged at once; Timer I (zero over TLS) ends it.
        let ack = request("ACK", &format!("z9hG4bKr{i}"));
        let _ = layer.handle_request(now, ack, tls());
        now += Duration::from_millis(1);
        layer.handle_timeout(now);
    }
    assert_eq!(layer.server_count(), 0);
    assert!(
        layer.completed_invite.len() <= 64,
        "{} dead entries kept",
        layer.completed_invite.len()
    );
}

#[test]
fn a_2xx_is_sent_again_over_udp_until_its_ack_arrives() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("INVITE", "z9hG4bKs");
    let tx = new_server_tx(&mut layer, t0, req.clone(), udp());
    layer.respond(t0, tx, 200, response_bytes(&req, 200));
    assert_eq!(drain(&mut layer).len(), 1);
    // RFC 3261 §13.3.1.4: T1, 2·T1, 4·T1 ... apart.
    let sent = run_until(&mut layer, t0, Duration::from_millis(4_000));
    let times: Vec<u64> = sent.iter().map(|(t, _)| t.as_millis() as u64).collect();
    assert_eq!(times, vec![500, 1500, 3500]);
    assert!(
        sent.iter()
            .all(|(_, tr)| tr.bytes.starts_with(b"SIP/2.0 200"))
    );
    // The ACK (a branch of its own) stops them and still reaches the TU.
    let ack = ack_of_2xx("z9hG4bKs-ack");
    let t_ack = t0 + Duration::from_millis(4_000);
    assert!(matches!(
        layer.handle_request(t_ack, ack, udp()).unwrap(),
        Some(TuInput::Ack { .. })
    ));
    let sent = run_until(&mut layer, t0, Duration::from_secs(60));
    assert!(sent.is_empty(), "sent after the ACK: {}", sent.len());
    assert_eq!(layer.server_count(), 0);
    assert!(layer.poll_input().is_none(), "an acknowledged 2xx reported");
}

/// The ACK of another answer to a copy of the same INVITE (a 482 to a
/// merged request: another To tag) does not stop the 2xx's retransmissions
/// or count as its ACK.
#[test]
fn only_the_ack_of_the_2xx_itself_stops_it() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("INVITE", "z9hG4bKm");
    let tx = new_server_tx(&mut layer, t0, req.clone(), udp());
    layer.respond(t0, tx, 200, response_bytes(&req, 200));
    drain(&mut layer);
    let text = String::from_utf8_lossy(ack_of_2xx("z9hG4bKm-copy").as_bytes())
        .replace(";tag=t\r\n", ";tag=merged\r\n");
    let other = Message::parse(Bytes::from(text), Framing::Datagram).unwrap();
    let _ = layer.handle_request(t0, other, udp());
    assert!(layer.server_awaits_ack(tx));
    let sent = run_until(&mut layer, t0, Duration::from_millis(1_600));
    assert_eq!(sent.len(), 2, "the 2xx still goes out again");
    let later = t0 + Duration::from_millis(1_600);
    let _ = layer.handle_request(later, ack_of_2xx("z9hG4bKm-ack"), udp());
    assert!(!layer.server_awaits_ack(tx));
}

#[test]
fn a_2xx_never_acknowledged_is_reported_after_64_t1() {
    // Over TLS too: a UDP hop may lie beyond the phone's connection.
    for (flow, resends) in [(udp(), 10), (tls(), 10)] {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::new(TimerConfig::default());
        let req = request("INVITE", "z9hG4bKt");
        let tx = new_server_tx(&mut layer, t0, req.clone(), flow);
        layer.respond(t0, tx, 200, response_bytes(&req, 200));
        drain(&mut layer);
        // Capped at T2 (4 s).
        let sent = run_until(&mut layer, t0, Duration::from_secs(40));
        assert_eq!(sent.len(), resends, "{:?}", flow.transport);
        assert!(sent.iter().all(|(t, _)| *t < Duration::from_secs(32)));
        assert!(matches!(layer.poll_input(), Some(TuInput::ServerNoAck { tx: id }) if id == tx));
        assert_eq!(layer.server_count(), 0);
    }
}

/// Feeds a response to `req` into the layer at `at`.
fn answer_at(layer: &mut TransactionLayer, at: Instant, req: &Message, status: u16) {
    let _ = layer.handle_response(at, response(req, status), udp());
}

/// Fires timers up to `t0 + until`; the time of the first client timeout.
fn timeout_within(layer: &mut TransactionLayer, t0: Instant, until: Duration) -> Option<Duration> {
    while let Some(t) = layer.poll_timeout().filter(|t| *t <= t0 + until) {
        layer.handle_timeout(t);
        drain(layer);
        while let Some(input) = layer.poll_input() {
            if matches!(input, TuInput::ClientTimeout { .. }) {
                return Some(t - t0);
            }
        }
    }
    None
}

#[test]
fn invite_client_in_proceeding_gives_up_at_timer_c_after_the_last_provisional() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("INVITE", "z9hG4bKclientC");
    layer
        .send_request(t0, udp(), req.as_bytes().clone())
        .unwrap();
    drain(&mut layer);
    answer_at(&mut layer, t0, &req, 180);
    while layer.poll_input().is_some() {}
    // Another provisional response at 100 s starts Timer C again.
    assert_eq!(
        timeout_within(&mut layer, t0, Duration::from_secs(100)),
        None
    );
    answer_at(&mut layer, t0 + Duration::from_secs(100), &req, 183);
    while layer.poll_input().is_some() {}
    let limit = TimerConfig::default().proceeding_limit;
    assert_eq!(
        timeout_within(&mut layer, t0, Duration::from_secs(400)),
        Some(Duration::from_secs(100) + limit)
    );
    assert_eq!(layer.client_count(), 0);
}

#[test]
fn a_cancelled_invite_without_a_final_response_ends_64_t1_after_the_cancel() {
    let t0 = Instant::now();
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let req = request("INVITE", "z9hG4bKclientX");
    let tx = layer
        .send_request(t0, udp(), req.as_bytes().clone())
        .unwrap();
    drain(&mut layer);
    answer_at(&mut layer, t0, &req, 180);
    while layer.poll_input().is_some() {}
    let cancel_at = t0 + Duration::from_secs(30);
    layer.cancelling(cancel_at, tx);
    // A late provisional response does not keep it alive.
    answer_at(&mut layer, cancel_at + Duration::from_secs(10), &req, 180);
    while layer.poll_input().is_some() {}
    assert_eq!(
        timeout_within(&mut layer, t0, Duration::from_secs(400)),
        Some(Duration::from_secs(30 + 32))
    );
    assert_eq!(layer.client_count(), 0);
}
