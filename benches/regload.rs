//! Registration load generator: thousands of distinct extensions register
//! with digest authentication over UDP or over persistent TLS connections,
//! at a fixed offered rate, for a bounded time.
//!
//! One registration is the full exchange a phone makes: REGISTER, 401,
//! REGISTER with credentials, 200 (or, with --reuse-nonce, a single
//! REGISTER answering the last challenge with the next nonce count).
//!
//!   cargo bench --bench regload -- udp  --server 127.0.0.1:5060 --users 100000:20000 --rate 15000 --secs 10
//!   cargo bench --bench regload -- tls  --server 127.0.0.1:5061 --conns 500 --rate 8000 --secs 10
//!   cargo bench --bench regload -- idle --server 127.0.0.1:5061 --conns 5000 --hold 20
//!   cargo bench --bench regload -- provision --data-dir DIR --users 100000:20000
//!
//! Users are numbered FIRST..FIRST+COUNT with password "pw<user>", the
//! convention of benches/kamailio/setup.sh. It prints one result line:
//! offered and achieved rates, failures, and latency percentiles.

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
#[path = "common/mod.rs"]
mod common;

use common::tls_connector;
use parley::sip::digest::Algorithm;
use parley::sip::message::{Framing, Message};
use parley::sip::stream::{Frame, StreamFramer};
use parley::sip::transport::Transport;
use parley::sip::ua::{RegisterOutcome, Registration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest a registration may take before it counts as failed.
const REG_TIMEOUT: Duration = Duration::from_secs(2);
/// Most registrations in flight at once (bounds memory whatever the rate).
const MAX_OUTSTANDING: usize = 50_000;
/// Longest run accepted, so a typo cannot start an endless load.
const MAX_SECS: u64 = 600;

struct Args {
    mode: String,
    server: SocketAddr,
    domain: String,
    first: u32,
    count: u32,
    rate: f64,
    secs: u64,
    warmup: u64,
    conns: usize,
    sockets: usize,
    hold: u64,
    algorithm: Algorithm,
    reuse_nonce: bool,
    expires: u32,
    data_dir: String,
}

fn parse_args() -> Args {
    let mut a = Args {
        mode: String::new(),
        server: "127.0.0.1:5060".parse().unwrap(),
        domain: "parley.test".into(),
        first: 100_000,
        count: 20_000,
        rate: 1000.0,
        secs: 10,
        warmup: 2,
        conns: 200,
        sockets: 8,
        hold: 10,
        algorithm: Algorithm::Md5,
        reuse_nonce: false,
        expires: 3600,
        data_dir: String::new(),
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
                a.count = c.parse().unwrap();
            }
            "--rate" => a.rate = val().parse().unwrap(),
            "--secs" => a.secs = val().parse::<u64>().unwrap().min(MAX_SECS),
            "--warmup" => a.warmup = val().parse::<u64>().unwrap().min(MAX_SECS),
            "--conns" => a.conns = val().parse().unwrap(),
            "--sockets" => a.sockets = val().parse().unwrap(),
            "--hold" => a.hold = val().parse::<u64>().unwrap().min(MAX_SECS),
            "--expires" => a.expires = val().parse().unwrap(),
            "--algorithm" => {
                a.algorithm = match val().as_str() {
                    "md5" => Algorithm::Md5,
                    "sha256" => Algorithm::Sha256,
                    other => panic!("--algorithm md5|sha256, not {other}"),
                }
            }
            "--reuse-nonce" => a.reuse_nonce = true,
            "--data-dir" => a.data_dir = val(),
            m if !m.starts_with('-') && a.mode.is_empty() => a.mode = m.to_owned(),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(a.count > 0 && a.rate > 0.0, "need users and a rate");
    a
}

fn main() {
    let args = parse_args();
    match args.mode.as_str() {
        "udp" => udp(&args),
        "tls" => tokio_main(tls(args)),
        "idle" => tokio_main(idle(args)),
        "provision" => tokio_main(provision(args)),
        "" => eprintln!(
            "usage: regload udp|tls|idle|provision [options]; see the top of benches/regload.rs"
        ),
        m => panic!("unknown mode {m}"),
    }
}

fn tokio_main(f: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Completed registrations and their latencies, counted only inside the
/// measurement window (after the warm-up).
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    /// Failures by status code; 0 is a timeout.
    statuses: std::collections::BTreeMap<u16, u64>,
    unstarted: u64,
    latencies_us: Vec<u32>,
}

impl Tally {
    fn report(&mut self, mode: &str, offered: f64, window: Duration) {
        self.latencies_us.sort_unstable();
        let pct = |p: f64| -> f64 {
            if self.latencies_us.is_empty() {
                return 0.0;
            }
            let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
            f64::from(self.latencies_us[i]) / 1000.0
        };
        let total = self.ok + self.failed + self.unstarted;
        let failure_pct = if total == 0 {
            0.0
        } else {
            100.0 * (self.failed + self.unstarted) as f64 / total as f64
        };
        println!(
            "RESULT mode={mode} offered={offered:.0}/s achieved={:.0}/s ok={} failed={} unstarted={} failure={failure_pct:.2}% p50={:.2}ms p99={:.2}ms",
            self.ok as f64 / window.as_secs_f64(),
            self.ok,
            self.failed,
            self.unstarted,
            pct(0.5),
            pct(0.99),
        );
        if !self.statuses.is_empty() {
            println!("FAILURES (status: count, 0 = timeout) {:?}", self.statuses);
        }
    }
}

fn new_registration(
    args: &Args,
    user: u32,
    transport: Transport,
    local: SocketAddr,
) -> Registration {
    let name = user.to_string();
    let mut r = Registration::new(&name, &format!("pw{user}"), &args.domain, transport, local);
    r.prefer = args.algorithm;
    r.expires = args.expires;
    r.user_agent = "parley-regload".into();
    r
}

// ---- UDP ----------------------------------------------------------------

struct Pending {
    started: Instant,
    counted: bool,
}

fn udp(args: &Args) {
    let socks: Vec<UdpSocket> = (0..args.sockets.max(1))
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_nonblocking(true).unwrap();
            let sref = socket2::SockRef::from(&s);
            let _ = sref.set_recv_buffer_size(8 << 20);
            let _ = sref.set_send_buffer_size(8 << 20);
            s
        })
        .collect();
    let mut regs: Vec<Registration> = (0..args.count)
        .map(|i| {
            let sock = &socks[i as usize % socks.len()];
            new_registration(
                args,
                args.first + i,
                Transport::Udp,
                sock.local_addr().unwrap(),
            )
        })
        .collect();
    let by_call_id: HashMap<String, usize> = regs
        .iter()
        .enumerate()
        .map(|(i, r)| (r.call_id.clone(), i))
        .collect();
    // Per user: the registration in flight, if any.
    let mut in_flight: Vec<Option<Pending>> = (0..regs.len()).map(|_| None).collect();
    let mut order: VecDeque<(usize, Instant)> = VecDeque::new();
    let mut outstanding = 0usize;
    let mut tally = Tally::default();
    let mut buf = vec![0u8; 65_536];

    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup);
    let stop_sending = measure_from + Duration::from_secs(args.secs);
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let mut next_send = start;
    let mut next_user = 0usize;

    loop {
        let now = Instant::now();
        if now >= stop_sending && outstanding == 0 {
            break;
        }
        if now >= stop_sending + REG_TIMEOUT * 2 {
            break;
        }
        // Start the registrations that are due.
        let mut started = 0;
        while next_send <= now && now < stop_sending && started < 256 {
            next_send += interval;
            started += 1;
            let counted = next_send >= measure_from;
            let user = next_user;
            next_user = (next_user + 1) % regs.len();
            if in_flight[user].is_some() || outstanding >= MAX_OUTSTANDING {
                if counted {
                    tally.unstarted += 1;
                }
                continue;
            }
            if !args.reuse_nonce {
                regs[user].forget_challenge();
            }
            let bytes = regs[user].build();
            let sock = &socks[user % socks.len()];
            let _ = sock.send_to(&bytes, args.server);
            in_flight[user] = Some(Pending {
                started: now,
                counted,
            });
            order.push_back((user, now));
            outstanding += 1;
        }
        // Read every response that arrived.
        let mut got_any = false;
        for sock in &socks {
            loop {
                match sock.recv_from(&mut buf) {
                    Ok((n, _)) => {
                        got_any = true;
                        let Ok(msg) =
                            Message::parse(Bytes::copy_from_slice(&buf[..n]), Framing::Datagram)
                        else {
                            continue;
                        };
                        let Some(&user) = msg.call_id().and_then(|c| by_call_id.get(c)) else {
                            continue;
                        };
                        if in_flight[user].is_none() {
                            continue;
                        }
                        match regs[user].handle_response(&msg) {
                            RegisterOutcome::Challenged => {
                                let bytes = regs[user].build();
                                let _ = sock.send_to(&bytes, args.server);
                            }
                            RegisterOutcome::Ignored => {}
                            outcome => {
                                let p = in_flight[user].take().unwrap();
                                outstanding -= 1;
                                if p.counted {
                                    if matches!(outcome, RegisterOutcome::Registered { .. }) {
                                        tally.ok += 1;
                                        tally
                                            .latencies_us
                                            .push(p.started.elapsed().as_micros() as u32);
                                    } else {
                                        tally.failed += 1;
                                        *tally
                                            .statuses
                                            .entry(msg.status().unwrap_or(1))
                                            .or_default() += 1;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
        }
        // Time out registrations that took too long.
        while let Some(&(user, at)) = order.front() {
            let live = in_flight[user].as_ref().is_some_and(|p| p.started == at);
            if !live {
                order.pop_front();
                continue;
            }
            if now.duration_since(at) < REG_TIMEOUT {
                break;
            }
            order.pop_front();
            let p = in_flight[user].take().unwrap();
            outstanding -= 1;
            if p.counted {
                tally.failed += 1;
                *tally.statuses.entry(0).or_default() += 1;
            }
        }
        if !got_any && started == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    tally.report("udp", args.rate, Duration::from_secs(args.secs));
}

// ---- TLS ----------------------------------------------------------------

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(
    server: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> std::io::Result<TlsStream> {
    let tcp = tokio::net::TcpStream::connect(server).await?;
    tcp.set_nodelay(true)?;
    connector
        .connect("parley.test".try_into().unwrap(), tcp)
        .await
}

/// Reads the next SIP message from a stream.
async fn read_message(
    s: &mut TlsStream,
    framer: &mut StreamFramer,
    pending: &mut BytesMut,
) -> Option<Message> {
    loop {
        match framer.next_frame(pending) {
            Ok(Some(Frame::Message(b))) => return Message::parse(b, Framing::Stream).ok(),
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(_) => return None,
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        pending.extend_from_slice(&chunk[..n]);
    }
}

/// One full registration on a connection. Returns whether it succeeded.
async fn register_once(
    s: &mut TlsStream,
    framer: &mut StreamFramer,
    pending: &mut BytesMut,
    reg: &mut Registration,
    reuse: bool,
) -> bool {
    if !reuse {
        reg.forget_challenge();
    }
    for _ in 0..3 {
        let req = reg.build();
        if s.write_all(&req).await.is_err() {
            return false;
        }
        loop {
            let Some(msg) = read_message(s, framer, pending).await else {
                return false;
            };
            match reg.handle_response(&msg) {
                RegisterOutcome::Ignored => continue,
                RegisterOutcome::Challenged => break,
                RegisterOutcome::Registered { .. } => return true,
                _ => return false,
            }
        }
    }
    false
}

async fn tls(args: Args) {
    let args = Arc::new(args);
    let connector = tls_connector();
    let conns = args.conns.max(1).min(args.count as usize);
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        streams.push(connect(args.server, &connector).await.expect("TLS connect"));
    }
    eprintln!("{conns} TLS connections up");
    // Each connection paces itself: connection k starts a registration
    // every conns/rate seconds, offset by k/rate, so together they offer
    // the rate whatever the latency. A connection that falls more than
    // the timeout behind its schedule counts the missed slots as failures.
    let period = Duration::from_secs_f64(conns as f64 / args.rate);
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + Duration::from_secs(args.warmup);
    let stop = measure_from + Duration::from_secs(args.secs);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Slot>();
    for (k, mut s) in streams.into_iter().enumerate() {
        let args = args.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let local = s.get_ref().0.local_addr().unwrap();
            // Connection k owns users k, k+conns, k+2*conns, ...
            let mut regs: Vec<Registration> = (k..args.count as usize)
                .step_by(conns)
                .map(|i| new_registration(&args, args.first + i as u32, Transport::Tls, local))
                .collect();
            let mut framer = StreamFramer::new();
            let mut pending = BytesMut::new();
            let mut scheduled = start + Duration::from_secs_f64(k as f64 / args.rate);
            let mut next = 0usize;
            while scheduled < stop {
                tokio::time::sleep_until(scheduled.into()).await;
                let counted = scheduled >= measure_from;
                if Instant::now().duration_since(scheduled) > REG_TIMEOUT {
                    let _ = tx.send(Slot {
                        ok: false,
                        counted,
                        us: 0,
                        unstarted: true,
                    });
                } else {
                    let n = regs.len();
                    let reg = &mut regs[next];
                    next = (next + 1) % n;
                    let attempt =
                        register_once(&mut s, &mut framer, &mut pending, reg, args.reuse_nonce);
                    let ok = tokio::time::timeout(REG_TIMEOUT, attempt)
                        .await
                        .unwrap_or(false);
                    let us = scheduled.elapsed().as_micros() as u32;
                    let _ = tx.send(Slot {
                        ok,
                        counted,
                        us,
                        unstarted: false,
                    });
                }
                scheduled += period;
            }
        });
    }
    drop(tx);
    let mut tally = Tally::default();
    while let Some(slot) = rx.recv().await {
        match slot {
            Slot { counted: false, .. } => {}
            Slot {
                unstarted: true, ..
            } => tally.unstarted += 1,
            Slot { ok: true, us, .. } => {
                tally.ok += 1;
                tally.latencies_us.push(us);
            }
            Slot { .. } => tally.failed += 1,
        }
    }
    tally.report("tls", args.rate, Duration::from_secs(args.secs));
}

/// What became of one scheduled registration.
struct Slot {
    ok: bool,
    counted: bool,
    us: u32,
    unstarted: bool,
}

// ---- idle TLS connections -----------------------------------------------

/// Opens many TLS connections, registers one extension on each, then holds
/// them idle so the server's memory per connection can be read.
async fn idle(args: Args) {
    let connector = tls_connector();
    let mut held = Vec::with_capacity(args.conns);
    let mut registered = 0;
    for i in 0..args.conns {
        let Ok(mut s) = connect(args.server, &connector).await else {
            eprintln!("connection {i} failed");
            continue;
        };
        let local = s.get_ref().0.local_addr().unwrap();
        let mut reg = new_registration(
            &args,
            args.first + (i as u32 % args.count),
            Transport::Tls,
            local,
        );
        let mut framer = StreamFramer::new();
        let mut pending = BytesMut::new();
        if register_once(&mut s, &mut framer, &mut pending, &mut reg, false).await {
            registered += 1;
        }
        held.push(s);
    }
    println!("IDLE connections={} registered={registered}", held.len());
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    println!("IDLE done");
}

// ---- provisioning -------------------------------------------------------

/// Creates the benchmark extensions in a Parley data directory.
async fn provision(args: Args) {
    common::provision(
        &args.data_dir,
        &args.domain,
        args.first,
        args.count,
        parley::pbx::policy::EncryptionPolicy::Off,
    )
    .await;
}
