//! Bad input from the network: clear errors where an answer is possible,
//! silence where it is not, and never a crash or a stalled connection.

mod support;

use std::time::Duration;

use parley::sip::ua::RegisterOutcome;
use support::phone::Phone;
use support::{DOMAIN, Parley};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const GOOD_HEAD: &str = "OPTIONS sip:parley.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKbad1\r\n\
From: <sip:a@parley.test>;tag=1\r\nTo: <sip:parley.test>\r\nCall-ID: bad-1\r\nCSeq: 1 OPTIONS\r\n";

async fn alive(p: &Parley) {
    let mut phone = Phone::udp(p.udp, "x", "y").await;
    let req = phone.options("alive");
    assert_eq!(
        phone.request(req).await.status(),
        Some(200),
        "server stopped answering"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_garbage_is_dropped_and_answerable_mistakes_get_400() {
    let mut p = Parley::start("");
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..300 {
        // xorshift: deterministic junk, some of it shaped like SIP.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 1400) as usize;
        let mut junk: Vec<u8> = (0..len).map(|k| (seed >> (k % 56)) as u8).collect();
        if i % 3 == 0 {
            let mut msg = GOOD_HEAD.as_bytes().to_vec();
            let cut = (seed as usize) % msg.len();
            msg.truncate(cut);
            msg.extend_from_slice(&junk);
            junk = msg;
        }
        sock.send_to(&junk, p.udp).await.unwrap();
    }
    sock.send_to(&vec![b'A'; 65_000], p.udp).await.unwrap();

    // An answerable mistake: a Content-Length longer than the datagram.
    let bad = format!("{GOOD_HEAD}Content-Length: 500\r\n\r\nshort");
    let phone_sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    phone_sock.send_to(bad.as_bytes(), p.udp).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), phone_sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(
        text.starts_with("SIP/2.0 400 Body Shorter Than Content-Length"),
        "{text}"
    );

    alive(&p).await;
    assert!(p.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_gets_400_and_is_closed_without_hurting_others() {
    let p = Parley::start("");
    p.add_extension("100", "password100", "off");

    // A peer dripping half a request byte by byte holds only its own connection.
    let mut slow = TcpStream::connect(p.tcp).await.unwrap();
    for b in GOOD_HEAD.as_bytes()[..60].iter() {
        slow.write_all(&[*b]).await.unwrap();
    }
    let mut phone = Phone::tcp(p.tcp, "100", "password100").await;
    assert!(matches!(
        phone.register().await.0,
        RegisterOutcome::Registered { .. }
    ));

    // Unframeable: a Content-Length that is not a number.
    let mut broken = TcpStream::connect(p.tcp).await.unwrap();
    broken
        .write_all(format!("{GOOD_HEAD}Content-Length: lots\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), broken.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("SIP/2.0 400 Invalid Content-Length"),
        "{text}"
    );

    // A header section that never ends is cut off at the limit.
    let mut endless = TcpStream::connect(p.tcp).await.unwrap();
    let _ = endless.write_all(GOOD_HEAD.as_bytes()).await;
    let filler = format!("X-Filler: {}\r\n", "a".repeat(1000));
    let mut closed = false;
    for _ in 0..40 {
        if endless.write_all(filler.as_bytes()).await.is_err() {
            closed = true;
            break;
        }
    }
    let mut rest = Vec::new();
    let eof = tokio::time::timeout(Duration::from_secs(5), endless.read_to_end(&mut rest)).await;
    assert!(
        closed || eof.is_ok(),
        "an endless header section must end the connection"
    );

    let opts = phone.options("still-here");
    assert_eq!(phone.request(opts).await.status(), Some(200));
    alive(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_on_the_tls_port_fails_the_handshake_only() {
    let p = Parley::start("");
    let mut junk = TcpStream::connect(p.tls).await.unwrap();
    junk.write_all(b"REGISTER sip:x SIP/2.0\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), junk.read_to_end(&mut buf)).await;
    // A handshake that never starts is dropped after the handshake timeout.
    let _silent = TcpStream::connect(p.tls).await.unwrap();
    Phone::tls(p.tls, &p.ca_cert(), DOMAIN, "x", "y").await;
    alive(&p).await;
}

/// An OPTIONS request numbered `i`, for pipelining on one connection.
fn options_request(i: usize) -> String {
    format!(
        "OPTIONS sip:parley.test SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKpipe{i}\r\n\
         From: <sip:a@parley.test>;tag=1\r\nTo: <sip:parley.test>\r\nCall-ID: pipe-{i}\r\n\
         CSeq: {i} OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_many_requests_at_once_gets_every_answer() {
    // A trunk or a proxy pipelines requests on one connection; the answers
    // must go out while more requests are still being read, not pile up
    // until the connection counts as stuck.
    const REQUESTS: usize = 400;
    let p = Parley::start("");
    let mut conn = TcpStream::connect(p.tcp).await.unwrap();
    let all: String = (0..REQUESTS).map(options_request).collect();
    let (mut rd, mut wr) = conn.split();
    let writer = async {
        for chunk in all.as_bytes().chunks(8192) {
            wr.write_all(chunk).await.unwrap();
        }
    };
    let reader = async {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while count_answers(&got) < REQUESTS {
            match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        count_answers(&got)
    };
    let ((), answered) = tokio::join!(writer, reader);
    assert_eq!(answered, REQUESTS, "answers lost on a busy connection");
    assert!(!p.log().contains("not reading"), "{}", p.log());
}

fn count_answers(bytes: &[u8]) -> usize {
    String::from_utf8_lossy(bytes)
        .matches("SIP/2.0 200 ")
        .count()
}

/// Sends `unit` over and over on a connection whose answers are never read,
/// until the server stops taking them (its reads stop when its writes
/// block) or closes the connection; then reads, and reports whether the
/// stream ended: the server must give up on a peer that does not read (and
/// free its slot) instead of waiting on the write forever.
async fn never_reading(p: &Parley, unit: &dyn Fn(usize) -> String) -> bool {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut conn = sock.connect(p.tcp).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(40) {
        let burst: String = (i..i + 200).map(unit).collect();
        i += 200;
        match tokio::time::timeout(Duration::from_secs(2), conn.write_all(burst.as_bytes())).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    // Not reading for longer than the server's write timeout (10 s)...
    tokio::time::sleep(Duration::from_secs(12)).await;
    // ...then reading: the stream must end (EOF or reset) once drained.
    let mut buf = vec![0u8; 65536];
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    ended.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_disconnected() {
    let p = Parley::start("");
    let ping = |_| "\r\n\r\n".to_string();
    let (pings, requests) = tokio::join!(
        never_reading(&p, &ping),
        never_reading(&p, &options_request)
    );
    assert!(
        pings,
        "the server kept a connection that sends keep-alive pings and never reads the pongs"
    );
    assert!(
        requests,
        "the server kept a connection that sends requests and never reads the answers"
    );
    alive(&p).await;
}
