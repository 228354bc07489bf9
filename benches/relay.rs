//! Data-plane benchmark of the media anchor: K bridged SRTP↔SRTP calls
//! through the relay, every leg with its own keys, G.711 20 ms packets both
//! ways on every call, for a bounded time.
//!
//!   cargo bench --bench relay -- --calls 200 --secs 20 [--relay-cpu 0 --load-cpu 1] [--sleeping-phones]
//!
//! The relay thread runs in this process, pinned to one CPU; the fake
//! phones run on another. Each phone protects with its own key and
//! decrypts what arrives with the key Parley gave its leg, so a packet
//! only counts as delivered if it was re-keyed correctly. Prints one
//! RESULT line: loss, authentication failures, one-way latency through the
//! relay (p50/p99), and the relay thread's CPU (from /proc).
//!
//! By default the phones busy-poll their sockets. On loopback the sender of
//! a datagram pays for delivering it, including waking a receiver that
//! sleeps; with real phones that wake-up happens on their machines.
//! `--sleeping-phones` makes them sleep in epoll instead, to show the
//! difference.
//!
//! The legs are on the shared port, as SRTP legs of real calls are;
//! `--own-ports` gives every leg a port pair of its own instead (how plain
//! RTP legs are served), to compare the two paths.
//!
//! `--all-addresses` binds the relay to 0.0.0.0, as `parley serve` does by
//! default, so every packet leaves with the address its leg was given
//! (`IP_PKTINFO`). Run it in a network namespace of its own, so no port
//! opens beyond loopback: `unshare -n sh -c 'ip link set lo up; cargo bench
//! --bench relay -- --all-addresses'`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

#[path = "common/cpu.rs"]
mod cpu;
use cpu::{arg, pin};

use parley::media::{LegKeys, LegMedia, LegPort, MediaConfig, MediaEngine};
use parley::srtp::{MasterKey, SrtpContext, Suite};

const SUITE: Suite = Suite::AesCm128HmacSha1_80;
const PTIME: Duration = Duration::from_millis(20);
const PAYLOAD: usize = 160;
/// Longest run accepted, so a typo cannot start an endless load.
const MAX_SECS: u64 = 600;
/// Most calls one run may set up (two legs, four sockets each... bounded by
/// the port range too).
const MAX_CALLS: usize = 4000;

struct Phone {
    socket: UdpSocket,
    /// Where this phone sends: its leg's port on Parley.
    to: SocketAddr,
    tx: SrtpContext,
    rx: SrtpContext,
    seq: u16,
    ssrc: u32,
}

/// The relay thread's id and its CPU time so far, from /proc.
fn relay_thread() -> Option<(i32, Duration)> {
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let path = entry.ok()?.path();
        if std::fs::read_to_string(path.join("comm")).ok()?.trim() == "media-relay" {
            let tid: i32 = path.file_name()?.to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks: u64 = fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?;
            // SAFETY: sysconf is always safe to call.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
            return Some((tid, Duration::from_millis(ticks * 1000 / hz)));
        }
    }
    None
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let calls: usize = arg(&args, "--calls", 100).min(MAX_CALLS);
    let secs: u64 = arg(&args, "--secs", 10).min(MAX_SECS);
    let warmup: u64 = arg(&args, "--warmup", 2);
    let relay_cpu: usize = arg(&args, "--relay-cpu", 0);
    let load_cpu: usize = arg(&args, "--load-cpu", 1);
    let busy_poll = !args.iter().any(|a| a == "--sleeping-phones");
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let all_addresses = args.iter().any(|a| a == "--all-addresses");

    let port = if args.iter().any(|a| a == "--own-ports") {
        LegPort::Own
    } else {
        LegPort::Shared
    };
    // Keeps the relay running while the phones talk.
    let (mut phones, _engine) = engine_phones(calls, local, port, all_addresses);
    // The thread names itself once it runs; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    let tid = loop {
        match relay_thread() {
            Some((tid, _)) => break tid,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            None => panic!("no media-relay thread"),
        }
    };
    pin(tid, relay_cpu);
    pin(0, load_cpu);

    // One epoll set over every phone socket.
    // SAFETY: plain syscall, checked.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0);
    for (i, p) in phones.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: valid descriptors and event.
        assert_eq!(
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, p.socket.as_raw_fd(), &mut ev) },
            0
        );
    }

    let start = Instant::now();
    let measure_from = start + Duration::from_secs(warmup);
    let stop = measure_from + Duration::from_secs(secs);
    let drain_until = stop + Duration::from_millis(500);
    let n = phones.len();
    // Phone i sends at start + k·20 ms + i·(20 ms / n): spread evenly.
    let offset = |i: usize| PTIME.mul_f64(i as f64 / n as f64);
    let mut next_round = start;
    let mut next_phone = 0usize;
    let (mut sent, mut received, mut auth_failures) = (0u64, 0u64, 0u64);
    let mut latencies_us: Vec<u32> =
        Vec::with_capacity((calls * 2 * 50 * secs as usize).min(50_000_000));
    let mut cpu_at_start = None;
    let mut cpu_at_stop = None;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = [0u8; 2048];
    loop {
        let now = Instant::now();
        if now >= drain_until {
            break;
        }
        if cpu_at_start.is_none() && now >= measure_from {
            cpu_at_start = Some((now, relay_thread().unwrap().1));
        }
        if cpu_at_stop.is_none() && now >= stop {
            cpu_at_stop = Some((now, relay_thread().unwrap().1));
        }
        // Send every packet that is due.
        while now < stop && next_round + offset(next_phone) <= now {
            let p = &mut phones[next_phone];
            let mut packet = [0u8; 12 + PAYLOAD + 16];
            packet[0] = 0x80;
            packet[2..4].copy_from_slice(&p.seq.to_be_bytes());
            packet[4..8].copy_from_slice(&(u32::from(p.seq) * 160).to_be_bytes());
            packet[8..12].copy_from_slice(&p.ssrc.to_be_bytes());
            let t = start.elapsed().as_nanos() as u64;
            packet[12..20].copy_from_slice(&t.to_be_bytes());
            packet[20] = u8::from(now >= measure_from);
            p.seq = p.seq.wrapping_add(1);
            let len = p.tx.protect_rtp(&mut packet, 12 + PAYLOAD).unwrap();
            let _ = p.socket.send_to(&packet[..len], p.to);
            if now >= measure_from {
                sent += 1;
            }
            next_phone += 1;
            if next_phone == n {
                next_phone = 0;
                next_round += PTIME;
            }
        }
        // Busy-polling phones: a sleeping receiver on loopback makes every
        // send of the relay pay for waking it (an IPI, on a VM), a cost
        // that lands on the phone's machine in a real network.
        let wait_ms = if busy_poll && now < stop {
            0
        } else if now < stop {
            1
        } else {
            10
        };
        // SAFETY: valid epoll descriptor and live events buffer.
        let ready =
            unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, wait_ms) };
        for ev in &events[..ready.max(0) as usize] {
            let p = &mut phones[ev.u64 as usize];
            while let Ok((len, _)) = p.socket.recv_from(&mut buf) {
                match p.rx.unprotect_rtp(&mut buf[..len]) {
                    Ok(_) if buf[20] == 1 => {
                        received += 1;
                        let t = u64::from_be_bytes(buf[12..20].try_into().unwrap());
                        let us = (start.elapsed().as_nanos() as u64).saturating_sub(t) / 1000;
                        latencies_us.push(us as u32);
                    }
                    Ok(_) => {}
                    Err(_) => auth_failures += 1,
                }
            }
        }
    }
    let (t0, cpu0) = cpu_at_start.unwrap();
    let (t1, cpu1) = cpu_at_stop.unwrap();
    let cpu_pct = 100.0 * (cpu1 - cpu0).as_secs_f64() / (t1 - t0).as_secs_f64();
    latencies_us.sort_unstable();
    let pct = |q: f64| {
        latencies_us
            .get(((latencies_us.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let loss = 100.0 * sent.saturating_sub(received) as f64 / sent.max(1) as f64;
    println!(
        "RESULT calls={calls} pps_in={:.0} sent={sent} received={received} loss={loss:.3}% auth_failures={auth_failures} \
         p50={:.3}ms p99={:.3}ms relay_cpu={cpu_pct:.1}% per_100_calls={:.2}%",
        sent as f64 / secs as f64,
        pct(0.5),
        pct(0.99),
        cpu_pct * 100.0 / calls as f64,
    );
}

/// Phones talking through Parley's relay.
fn engine_phones(
    calls: usize,
    local: IpAddr,
    port: LegPort,
    all_addresses: bool,
) -> (Vec<Phone>, MediaEngine) {
    let (engine, _events) = MediaEngine::start(MediaConfig {
        bind_ip: if all_addresses {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            local
        },
        ports: 30_000..=39_999,
        inactivity: Duration::from_secs(3600),
    })
    .expect("start relay");
    let mut phones = Vec::with_capacity(calls * 2);
    for c in 0..calls {
        let mut pair = Vec::new();
        for side in 0..2 {
            let socket = UdpSocket::bind((local, 0)).unwrap();
            socket.set_nonblocking(true).unwrap();
            let leg = engine.open_leg(port).expect("open leg");
            let (phone_key, parley_key) = (MasterKey::generate(), MasterKey::generate());
            engine
                .configure(
                    leg.id,
                    LegMedia {
                        remote_rtp: Some(socket.local_addr().unwrap()),
                        remote_rtcp: None,
                        rtcp_mux: true,
                        keys: Some(LegKeys {
                            suite: SUITE,
                            phone_key: phone_key.clone(),
                            parley_key: parley_key.clone(),
                        }),
                        trusted_ips: Default::default(),
                        clock_rate: 8000,
                        telephone_event_pt: None,
                        local_ip: Some(local),
                    },
                )
                .unwrap();
            pair.push((
                leg.id,
                Phone {
                    socket,
                    to: SocketAddr::new(local, leg.port),
                    tx: SrtpContext::new(SUITE, &phone_key),
                    rx: SrtpContext::new(SUITE, &parley_key),
                    seq: rand::random(),
                    ssrc: (c * 2 + side) as u32,
                },
            ));
        }
        engine.bridge(pair[0].0, pair[1].0).unwrap();
        phones.extend(pair.into_iter().map(|(_, p)| p));
    }
    (phones, engine)
}
