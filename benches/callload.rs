//! Call load generator: K calls over TLS through Parley, SRTP both ways on
//! every call with keys this tool makes, bounded in count and time.
//!
//!   cargo bench --bench callload -- provision --data-dir DIR --users 200000:2000
//!   cargo bench --bench callload -- run --server 127.0.0.1:5061 --calls 200 --secs 20 --pid PID [--sleeping-phones]
//!
//! Each call is a pair of extensions (FIRST+2i calls FIRST+2i+1), each
//! registered on its own TLS connection. The caller's INVITE is challenged
//! (407) and sent again with credentials; the callee answers at once. Set-up
//! time is INVITE to 200. Then every endpoint sends a 20 ms G.711 packet
//! (172 bytes of RTP, SRTP-protected) every 20 ms to the port Parley gave
//! it, and decrypts what arrives with the key Parley gave it. Each payload
//! carries its send time, so the receiver measures the time through the
//! anchor (two loopback hops and Parley's decrypt and re-encrypt). Parley's
//! CPU comes from /proc/PID/stat over the measured window.
//!
//! Between sends the endpoints busy-poll their sockets: on loopback the
//! sender of a datagram pays for waking a receiver that sleeps, so sleeping
//! endpoints would charge Parley for wake-ups that, with real phones,
//! happen on the phones' own machines. `--sleeping-phones` makes the tool
//! sleep in epoll between packets instead, to show the difference.
//!
//! Prints one result line: calls, set-up rate, packets, loss, auth
//! failures, latency percentiles, Parley's CPU.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use bytes::BytesMut;
use common::tls_connector;
use parley::sdp::{CryptoAttribute, SessionDescription};
use parley::sip::digest::Challenge;
use parley::sip::message::{Framing, HeaderName, Message, MessageBuilder, Method};
use parley::sip::stream::{Frame, StreamFramer};
use parley::sip::transport::Transport;
use parley::sip::ua::{RegisterOutcome, Registration};
use parley::srtp::{MasterKey, SrtpContext, Suite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Most calls one run may set up (two TLS connections and a socket each).
const MAX_CALLS: usize = 2_500;
/// Longest measured window accepted.
const MAX_SECS: u64 = 300;
/// Longest a call set-up may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// RTP packet: 12-byte header and 20 ms of PCMU.
const RTP_LEN: usize = 12 + 160;
const PTIME: Duration = Duration::from_millis(20);

struct Args {
    mode: String,
    server: SocketAddr,
    domain: String,
    first: u32,
    users: u32,
    calls: usize,
    secs: u64,
    warmup: u64,
    pid: Option<u32>,
    concurrency: usize,
    data_dir: String,
    sleeping_phones: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        mode: String::new(),
        server: "127.0.0.1:5061".parse().unwrap(),
        domain: "parley.test".into(),
        first: 200_000,
        users: 2_000,
        calls: 100,
        secs: 20,
        warmup: 3,
        pid: None,
        concurrency: 50,
        data_dir: String::new(),
        sleeping_phones: false,
    };
    let mut it = std::env::args().skip(1).filter(|x| x != "--bench");
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--server" => a.server = val().parse().expect("--server ADDR"),
            "--domain" => a.domain = val(),
            "--users" => {
                let v = val();
                let (f, c) = v.split_once(':').expect("--users FIRST:COUNT");
                a.first = f.parse().unwrap();
                a.users = c.parse().unwrap();
            }
            "--first" => a.first = val().parse().unwrap(),
            "--calls" => a.calls = val().parse().unwrap(),
            "--secs" => a.secs = val().parse().unwrap(),
            "--warmup" => a.warmup = val().parse().unwrap(),
            "--pid" => a.pid = Some(val().parse().unwrap()),
            "--concurrency" => a.concurrency = val().parse().unwrap(),
            "--data-dir" => a.data_dir = val(),
            "--sleeping-phones" => a.sleeping_phones = true,
            m if a.mode.is_empty() && !m.starts_with('-') => a.mode = m.to_string(),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        a.calls >= 1 && a.calls <= MAX_CALLS,
        "--calls 1..={MAX_CALLS}"
    );
    assert!(a.secs >= 1 && a.secs <= MAX_SECS, "--secs 1..={MAX_SECS}");
    a
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match args.mode.as_str() {
        "provision" => rt.block_on(provision(args)),
        "run" => run(args, &rt),
        m => panic!("unknown mode {m:?}: provision or run"),
    }
}

// ---- signaling ----------------------------------------------------------

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// One phone's TLS connection to Parley.
struct Conn {
    stream: TlsStream,
    framer: StreamFramer,
    pending: BytesMut,
    local: SocketAddr,
}

impl Conn {
    async fn open(server: SocketAddr, connector: &tokio_rustls::TlsConnector) -> Conn {
        let tcp = tokio::net::TcpStream::connect(server)
            .await
            .expect("TCP connect");
        tcp.set_nodelay(true).unwrap();
        let local = tcp.local_addr().unwrap();
        let stream = connector
            .connect("parley.test".try_into().unwrap(), tcp)
            .await
            .expect("TLS handshake");
        Conn {
            stream,
            framer: StreamFramer::default(),
            pending: BytesMut::new(),
            local,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("TLS write");
    }

    async fn recv(&mut self) -> Message {
        loop {
            match self.framer.next_frame(&mut self.pending) {
                Ok(Some(Frame::Message(b))) => {
                    if let Ok(m) = Message::parse(b, Framing::Stream) {
                        return m;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    let mut chunk = [0u8; 8192];
                    let n = self.stream.read(&mut chunk).await.expect("TLS read");
                    assert!(n > 0, "Parley closed the connection");
                    self.pending.extend_from_slice(&chunk[..n]);
                }
                Err(e) => panic!("bad framing from Parley: {e:?}"),
            }
        }
    }

    async fn register(&mut self, user: &str, domain: &str) {
        let mut reg = Registration::new(
            user,
            &format!("pw{user}"),
            domain,
            Transport::Tls,
            self.local,
        );
        for _ in 0..3 {
            let req = reg.build();
            self.send(&req).await;
            loop {
                let msg = self.recv().await;
                match reg.handle_response(&msg) {
                    RegisterOutcome::Ignored => continue,
                    RegisterOutcome::Challenged => break,
                    RegisterOutcome::Registered { .. } => return,
                    other => panic!("{user} did not register: {other:?}"),
                }
            }
        }
        panic!("{user} did not register");
    }
}

/// What a media endpoint needs once its call is up.
struct Endpoint {
    socket: UdpSocket,
    /// Parley's media address for this leg.
    parley: SocketAddr,
    /// Protects with the key this endpoint made.
    tx: SrtpContext,
    /// Unprotects with the key Parley gave it.
    rx: SrtpContext,
}

fn sdp(port: u16, key: &MasterKey, tag: u32) -> String {
    format!(
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {port} RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\na=rtcp-mux\r\n\
         a=crypto:{}\r\na=sendrecv\r\n",
        CryptoAttribute::format(tag, Suite::AesCm128HmacSha1_80, key)
    )
}

/// Parley's media address and key from its SDP, and the crypto tag.
fn parley_media(body: &[u8]) -> (SocketAddr, SrtpContext, u32) {
    let sdp = SessionDescription::parse(body).expect("Parley's SDP parses");
    let ip = sdp
        .media_connection(0)
        .and_then(|c| c.ip)
        .expect("an address");
    let m = &sdp.media[0];
    let crypto = m.crypto().next().expect("a=crypto from Parley");
    let (suite, key) = crypto.usable().expect("a usable key");
    (
        SocketAddr::new(ip, m.port),
        SrtpContext::new(suite, key),
        crypto.tag,
    )
}

fn media_socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_nonblocking(true).unwrap();
    s
}

async fn callee(mut conn: Conn, user: String) -> Endpoint {
    let invite = loop {
        let m = conn.recv().await;
        if m.method() == Some(Method::Invite) {
            break m;
        }
    };
    let (parley, rx, tag) = parley_media(invite.body());
    let socket = media_socket();
    let key = MasterKey::generate();
    let mut b = MessageBuilder::response_to(&invite, 200, "OK", Some(&format!("t{user}")));
    b.header_fmt(
        HeaderName::Contact,
        format_args!("<sip:{user}@{};transport=tls>", conn.local),
    );
    let body = sdp(socket.local_addr().unwrap().port(), &key, tag);
    let ok = b.finish_with_body(Some("application/sdp"), body.as_bytes());
    conn.send(&ok).await;
    // Keep reading (ACK, and anything later) so Parley's writes never block.
    tokio::spawn(async move {
        loop {
            let _ = conn.recv().await;
        }
    });
    Endpoint {
        socket,
        parley,
        tx: SrtpContext::new(Suite::AesCm128HmacSha1_80, &key),
        rx,
    }
}

fn invite(
    user: &str,
    to: &str,
    domain: &str,
    local: SocketAddr,
    cseq: u32,
    body: &str,
    auth: Option<&str>,
) -> bytes::Bytes {
    let ruri = format!("sip:{to}@{domain}");
    let mut b = MessageBuilder::request("INVITE", &ruri);
    b.header_fmt(
        HeaderName::Via,
        format_args!("SIP/2.0/TLS {local};branch=z9hG4bK{user}x{cseq}"),
    );
    b.header(HeaderName::MaxForwards, "70");
    b.header_fmt(
        HeaderName::From,
        format_args!("<sip:{user}@{domain}>;tag=f{user}"),
    );
    b.header_fmt(HeaderName::To, format_args!("<{ruri}>"));
    b.header_fmt(HeaderName::CallId, format_args!("load-{user}@{local}"));
    b.header_fmt(HeaderName::CSeq, format_args!("{cseq} INVITE"));
    b.header_fmt(
        HeaderName::Contact,
        format_args!("<sip:{user}@{local};transport=tls>"),
    );
    if let Some(a) = auth {
        b.header(HeaderName::ProxyAuthorization, a);
    }
    b.finish_with_body(Some("application/sdp"), body.as_bytes())
}

/// An ACK: for a non-2xx (same branch) or a 2xx (new branch, to its Contact).
fn ack(resp: &Message, local: SocketAddr, branch: &str) -> bytes::Bytes {
    let target = resp
        .header(HeaderName::Contact)
        .and_then(parley::sip::message::NameAddr::parse)
        .map(|c| c.uri.to_string())
        .unwrap_or_else(|| resp.to().map(|t| t.uri.to_string()).unwrap_or_default());
    let mut b = MessageBuilder::request("ACK", &target);
    b.header_fmt(
        HeaderName::Via,
        format_args!("SIP/2.0/TLS {local};branch={branch}"),
    );
    b.header(HeaderName::MaxForwards, "70");
    b.header(HeaderName::From, resp.header(HeaderName::From).unwrap());
    b.header(HeaderName::To, resp.header(HeaderName::To).unwrap());
    b.header(HeaderName::CallId, resp.call_id().unwrap());
    b.header_fmt(
        HeaderName::CSeq,
        format_args!("{} ACK", resp.cseq().unwrap().seq),
    );
    b.finish_with_body(None, b"")
}

/// Places one call; returns the endpoint and the set-up time.
async fn caller(mut conn: Conn, user: String, to: String, domain: String) -> (Endpoint, Duration) {
    let socket = media_socket();
    let key = MasterKey::generate();
    let body = sdp(socket.local_addr().unwrap().port(), &key, 1);
    let started = Instant::now();
    conn.send(&invite(&user, &to, &domain, conn.local, 1, &body, None))
        .await;
    let challenge = loop {
        let m = conn.recv().await;
        match m.status() {
            Some(407) => break m,
            Some(s) if s >= 200 => panic!("{user}: INVITE got {s}"),
            _ => {}
        }
    };
    conn.send(&ack(&challenge, conn.local, &format!("z9hG4bK{user}x1")))
        .await;
    let ch = challenge
        .headers(HeaderName::ProxyAuthenticate)
        .filter_map(Challenge::parse)
        .last()
        .expect("a challenge");
    let ruri = format!("sip:{to}@{domain}");
    let creds = ch.answer("INVITE", &ruri, &user, &format!("pw{user}"), "0a4f113b", 1);
    conn.send(&invite(
        &user,
        &to,
        &domain,
        conn.local,
        2,
        &body,
        Some(&creds.to_header()),
    ))
    .await;
    let ok = loop {
        let m = conn.recv().await;
        match m.status() {
            Some(200) => break m,
            Some(s) if s >= 300 => panic!("{user}: call to {to} got {s}"),
            _ => {}
        }
    };
    let setup = started.elapsed();
    conn.send(&ack(&ok, conn.local, &format!("z9hG4bK{user}ack")))
        .await;
    let (parley, rx, _) = parley_media(ok.body());
    tokio::spawn(async move {
        loop {
            let _ = conn.recv().await;
        }
    });
    (
        Endpoint {
            socket,
            parley,
            tx: SrtpContext::new(Suite::AesCm128HmacSha1_80, &key),
            rx,
        },
        setup,
    )
}

// ---- media --------------------------------------------------------------

/// CPU time (user + system) of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the server's pid");
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// Sends a packet every 20 ms from every endpoint and receives what comes
/// back, for `warmup` then `secs` seconds. Endpoints send at evenly spread
/// moments of each 20 ms, as independent phones do, not all at once.
fn media(mut eps: Vec<Endpoint>, args: &Args) {
    // SAFETY: plain epoll calls on descriptors owned by `eps`.
    let epfd = unsafe { libc::epoll_create1(0) };
    assert!(epfd >= 0);
    for (i, e) in eps.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        let rc =
            unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, e.socket.as_raw_fd(), &mut ev) };
        assert_eq!(rc, 0);
    }
    let origin = Instant::now();
    let measure_from = origin + Duration::from_secs(args.warmup);
    let stop_at = measure_from + Duration::from_secs(args.secs);
    let drain_until = stop_at + Duration::from_millis(500);
    let cpu_start = std::cell::Cell::new(None);
    let mut cpu_used = None;
    let ssrcs: Vec<u32> = (0..eps.len()).map(|_| rand::random()).collect();
    let (mut sent, mut received, mut auth_failures, mut late) = (0u64, 0u64, 0u64, 0u64);
    let mut latencies_us: Vec<u32> = Vec::with_capacity(eps.len() * 50 * args.secs as usize);
    let n_eps = eps.len() as u64;
    let mut seqs: Vec<u16> = vec![0; eps.len()];
    // The k-th send overall: endpoint k % n, at origin + 20 ms * k / n.
    let mut k: u64 = 0;
    let due = |k: u64| origin + Duration::from_nanos(PTIME.as_nanos() as u64 * k / n_eps);
    let mut buf = [0u8; 512];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        let now = Instant::now();
        if now >= drain_until {
            break;
        }
        let next_tick = due(k);
        if now >= next_tick && now < stop_at {
            if now >= measure_from && cpu_start.get().is_none() {
                cpu_start.set(Some((now, args.pid.map(cpu_secs))));
            }
            while due(k) <= now {
                let i = (k % n_eps) as usize;
                let e = &mut eps[i];
                let stamp = Instant::now().duration_since(origin).as_micros() as u64;
                let mut pkt = [0xFFu8; RTP_LEN + 16];
                pkt[0] = 0x80;
                pkt[1] = 0;
                pkt[2..4].copy_from_slice(&seqs[i].to_be_bytes());
                let ts = u32::from(seqs[i]).wrapping_mul(160);
                pkt[4..8].copy_from_slice(&ts.to_be_bytes());
                pkt[8..12].copy_from_slice(&ssrcs[i].to_be_bytes());
                pkt[12..20].copy_from_slice(&stamp.to_be_bytes());
                seqs[i] = seqs[i].wrapping_add(1);
                let len = e.tx.protect_rtp(&mut pkt, RTP_LEN).expect("protect");
                // The stamp decides whether the packet is in the measured
                // window, as on the receiving side: a round that runs late
                // must not count on one side only.
                let sent_at = origin + Duration::from_micros(stamp);
                if e.socket.send_to(&pkt[..len], e.parley).is_ok()
                    && sent_at >= measure_from
                    && sent_at < stop_at
                {
                    sent += 1;
                }
                k += 1;
            }
            continue;
        }
        if now >= stop_at
            && cpu_used.is_none()
            && let Some((t0, Some(c0))) = cpu_start.get()
        {
            let c1 = args.pid.map(cpu_secs).unwrap_or(c0);
            cpu_used = Some((c1 - c0) / now.duration_since(t0).as_secs_f64());
        }
        // Milliseconds are epoll's resolution: a sleeping tool wakes a
        // little early rather than late, and sends what is due.
        let wait = if args.sleeping_phones {
            next_tick
                .min(drain_until)
                .saturating_duration_since(now)
                .as_millis()
                .min(20) as i32
        } else {
            0
        };
        let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, wait) };
        for ev in events.iter().take(n.max(0) as usize) {
            let e = &mut eps[ev.u64 as usize];
            while let Ok((len, _)) = e.socket.recv_from(&mut buf) {
                let arrived = Instant::now().duration_since(origin).as_micros() as u64;
                match e.rx.unprotect_rtp(&mut buf[..len]) {
                    Ok(p) if p.len >= 20 => {
                        let stamp = u64::from_be_bytes(buf[12..20].try_into().unwrap());
                        let sent_at = origin + Duration::from_micros(stamp);
                        if sent_at >= measure_from && sent_at < stop_at {
                            received += 1;
                            let us = arrived.saturating_sub(stamp);
                            latencies_us.push(us.min(u64::from(u32::MAX)) as u32);
                        }
                    }
                    Ok(_) => late += 1,
                    Err(_) => auth_failures += 1,
                }
            }
        }
    }
    latencies_us.sort_unstable();
    let loss = if sent > 0 {
        1.0 - received as f64 / sent as f64
    } else {
        0.0
    };
    let cpu = cpu_used.map_or("n/a".to_string(), |c| {
        format!(
            "{:.1}% of a core ({:.1}% per 100 calls)",
            c * 100.0,
            c * 100.0 * 100.0 / args.calls as f64
        )
    });
    println!(
        "MEDIA calls={} secs={} sent={sent} received={received} loss={:.3}% auth_failures={auth_failures} short={late} \
         latency_ms p50={:.2} p99={:.2} p999={:.2} max={:.2} parley_cpu={cpu}",
        args.calls,
        args.secs,
        loss * 100.0,
        percentile(&latencies_us, 0.5),
        percentile(&latencies_us, 0.99),
        percentile(&latencies_us, 0.999),
        percentile(&latencies_us, 1.0),
    );
}

fn run(args: Args, rt: &tokio::runtime::Runtime) {
    assert!(
        args.calls * 2 <= args.users as usize,
        "--users must provide two extensions per call"
    );
    let connector = tls_connector();
    let (endpoints, setups, elapsed) = rt.block_on(async {
        let mut callees = Vec::new();
        let mut callers = Vec::new();
        for i in 0..args.calls {
            let a = (args.first + 2 * i as u32).to_string();
            let b = (args.first + 2 * i as u32 + 1).to_string();
            let mut ca = Conn::open(args.server, &connector).await;
            let mut cb = Conn::open(args.server, &connector).await;
            ca.register(&a, &args.domain).await;
            cb.register(&b, &args.domain).await;
            callees.push(tokio::spawn(callee(cb, b.clone())));
            callers.push((ca, a, b));
        }
        let limit = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
        let started = Instant::now();
        let mut calls = Vec::new();
        for (conn, a, b) in callers {
            let limit = limit.clone();
            let domain = args.domain.clone();
            calls.push(tokio::spawn(async move {
                let _permit = limit.acquire_owned().await.unwrap();
                tokio::time::timeout(SETUP_TIMEOUT, caller(conn, a, b, domain))
                    .await
                    .expect("call set-up in time")
            }));
        }
        let mut eps = Vec::new();
        let mut setups = Vec::new();
        for c in calls {
            let (ep, setup) = c.await.unwrap();
            eps.push(ep);
            setups.push(setup.as_micros() as u32);
        }
        let elapsed = started.elapsed();
        for c in callees {
            eps.push(c.await.unwrap());
        }
        (eps, setups, elapsed)
    });
    let mut setups = setups;
    setups.sort_unstable();
    println!(
        "SETUP calls={} in {:.2}s rate={:.0}/s concurrency={} setup_ms p50={:.1} p99={:.1}",
        args.calls,
        elapsed.as_secs_f64(),
        args.calls as f64 / elapsed.as_secs_f64(),
        args.concurrency,
        percentile(&setups, 0.5),
        percentile(&setups, 0.99),
    );
    // The connections (and so the calls) stay open, owned by the parked
    // signaling tasks, while the media runs.
    media(endpoints, &args);
}

// ---- provisioning -------------------------------------------------------

/// Creates the extensions (SRTP required) in a Parley data directory.
async fn provision(args: Args) {
    common::provision(
        &args.data_dir,
        &args.domain,
        args.first,
        args.users,
        parley::pbx::policy::EncryptionPolicy::Required,
    )
    .await;
}
