//! The machine's floor for a media relay on loopback: what sending one
//! 182-byte datagram (a 20 ms G.711 packet as SRTP) costs the sending CPU,
//! with nothing else done — no receive, no crypto, no relay logic.
//!
//!   cargo bench --bench loopback -- [--sockets 400] [--rate 20000] [--secs 5] [--batch 16] [--mmsg]
//!   cargo bench --bench loopback -- --flat-out [--sockets 400] [--batch 16] [--mmsg]
//!   cargo bench --bench loopback -- --echo [--batch 64]
//!   cargo bench --bench loopback -- --wakeups 200
//!
//! By default the sender, pinned to CPU 0, sends from `--sockets` sockets
//! in turn, each to its own receiving socket, one `sendto` per datagram, as
//! the relay must (every leg sends from its own port). `--mmsg` is the best
//! case instead: `sendmmsg` batches from one socket to one receiver. The
//! sender sends `--batch` datagrams, then sleeps until the next batch is due
//! at `--rate` datagrams/s. Receivers on CPU 1 busy-poll, so no send pays
//! for a wake-up. Prints one RESULT line: the sender's CPU from
//! CLOCK_THREAD_CPUTIME_ID per datagram, and what that is per 100 relayed
//! calls (10,000 datagrams/s sent).
//!
//! `--flat-out` sends without ever sleeping (only waiting, spinning, when
//! the receivers fall 20,000 datagrams behind), to separate what the
//! network stack costs from what sleeping between packets costs. `--echo`
//! is the shape of the usual "packets per second per core" figure: one
//! thread on CPU 0 sends `--batch` datagrams with `sendmmsg` to a socket of
//! its own and takes them back with `recvmmsg`, flat out; the figure is per
//! send+receive pair. `--wakeups US` measures what one sleep of US
//! microseconds and the wake-up after it cost the sleeping thread, with
//! nothing sent.

#[path = "common/cpu.rs"]
mod cpu;
use cpu::{arg, pin};

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const DATAGRAM: usize = 182;
/// Bounds, so a typo cannot start an endless or unbounded run.
const MAX_SECS: u64 = 60;
const MAX_SOCKETS: usize = 4000;
const MAX_BATCH: usize = 1024;
/// Datagrams sent per second by 100 relayed calls (2 legs x 50 packets/s
/// each way).
const PER_100_CALLS: f64 = 10_000.0;
/// How far a flat-out sender may run ahead of its receivers.
const FLAT_OUT_LEAD: u64 = 20_000;
const MAX_ECHO_BATCH: usize = 64;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn bound() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").expect("bind a loopback socket")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sockets: usize = arg(&args, "--sockets", 400).clamp(1, MAX_SOCKETS);
    let rate: f64 = arg(&args, "--rate", 20_000.0f64).max(1.0);
    let secs: u64 = arg(&args, "--secs", 5).min(MAX_SECS);
    let batch: usize = arg(&args, "--batch", 16).clamp(1, MAX_BATCH);
    let mmsg = args.iter().any(|a| a == "--mmsg");
    let flat_out = args.iter().any(|a| a == "--flat-out");
    let sockets = if mmsg { 1 } else { sockets };
    if args.iter().any(|a| a == "--echo") {
        return echo(batch.min(MAX_ECHO_BATCH), secs);
    }
    if args.iter().any(|a| a == "--wakeups") {
        return wakeups(arg(&args, "--wakeups", 200u64), secs);
    }

    let receivers: Vec<UdpSocket> = (0..sockets).map(|_| bound()).collect();
    let senders: Vec<UdpSocket> = (0..sockets).map(|_| bound()).collect();
    let targets: Vec<SocketAddr> = receivers.iter().map(|r| r.local_addr().unwrap()).collect();
    for r in &receivers {
        r.set_nonblocking(true).unwrap();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let rx = {
        let (stop, received) = (stop.clone(), received.clone());
        std::thread::spawn(move || {
            pin(0, 1);
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let mut n = 0;
                for r in &receivers {
                    while r.recv(&mut buf).is_ok() {
                        n += 1;
                    }
                }
                received.fetch_add(n, Ordering::Relaxed);
            }
        })
    };

    pin(0, 0);
    let payload = [0x80u8; DATAGRAM];
    let total = if flat_out {
        u64::MAX
    } else {
        (rate * secs as f64) as u64
    };
    let end = Instant::now() + Duration::from_secs(secs);
    // sendmmsg's headers: every entry sends the same payload to the one
    // receiver.
    let mut iovs = vec![
        libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: DATAGRAM,
        };
        batch
    ];
    let to = sockaddr(targets[0]);
    let mut headers = mmsg_headers(&mut iovs, Some(&to));

    let (cpu0, t0) = (thread_cpu(), Instant::now());
    let (mut sent, mut next) = (0u64, 0usize);
    while sent < total {
        if mmsg {
            // SAFETY: `headers` holds `batch` valid entries pointing at live
            // buffers.
            let n = unsafe {
                libc::sendmmsg(
                    senders[0].as_raw_fd(),
                    headers.as_mut_ptr(),
                    batch as u32,
                    0,
                )
            };
            sent += n.max(0) as u64;
        } else {
            for _ in 0..batch {
                if senders[next].send_to(&payload, targets[next]).is_ok() {
                    sent += 1;
                }
                next = (next + 1) % sockets;
            }
        }
        if flat_out {
            // Spin, never sleep, while the receivers catch up.
            while sent > received.load(Ordering::Relaxed) + FLAT_OUT_LEAD && Instant::now() < end {
                std::hint::spin_loop();
            }
            if sent % 4096 < batch as u64 && Instant::now() >= end {
                break;
            }
            continue;
        }
        let due = t0 + Duration::from_secs_f64(sent as f64 / rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
    let (cpu, wall) = (
        (thread_cpu() - cpu0).as_secs_f64(),
        t0.elapsed().as_secs_f64(),
    );
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    rx.join().unwrap();
    let per_datagram = cpu / sent as f64;
    println!(
        "RESULT mode={}{} sockets={sockets} batch={batch} rate={rate:.0}/s achieved={:.0}/s sent={sent} received={} sender_cpu={:.1}% per_datagram={:.2}us per_100_calls={:.1}%",
        if mmsg { "sendmmsg" } else { "sendto" },
        if flat_out { ",flat-out" } else { "" },
        sent as f64 / wall,
        received.load(Ordering::Relaxed),
        100.0 * cpu / wall,
        per_datagram * 1e6,
        100.0 * per_datagram * PER_100_CALLS,
    );
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_in, libc::socklen_t) {
    let SocketAddr::V4(v4) = addr else {
        panic!("loopback receivers are IPv4")
    };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    (
        sin,
        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
    )
}

/// One `mmsghdr` per iovec, each sending to `to` (or, with `None`,
/// receiving without asking for the source). The headers point into `iovs`
/// and `to`, which must outlive every call made with them.
fn mmsg_headers(
    iovs: &mut [libc::iovec],
    to: Option<&(libc::sockaddr_in, libc::socklen_t)>,
) -> Vec<libc::mmsghdr> {
    iovs.iter_mut()
        .map(|iov| {
            // SAFETY: an all-zero mmsghdr is a valid empty header.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            if let Some((addr, len)) = to {
                h.msg_hdr.msg_name = addr as *const _ as *mut libc::c_void;
                h.msg_hdr.msg_namelen = *len;
            }
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect()
}

/// One thread sends `batch` datagrams to its own socket with `sendmmsg`
/// and reads them back with `recvmmsg`, flat out for `secs`.
fn echo(batch: usize, secs: u64) {
    pin(0, 0);
    let (tx, rx) = (bound(), bound());
    rx.set_nonblocking(true).unwrap();
    let to = sockaddr(rx.local_addr().unwrap());
    // Both directions use the same buffers: sent from, then read back into.
    let mut bufs = vec![[0x80u8; 2048]; batch];
    let mut send_iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr() as *mut libc::c_void,
            iov_len: DATAGRAM,
        })
        .collect();
    let mut recv_iovs: Vec<libc::iovec> = send_iovs
        .iter()
        .map(|iov| libc::iovec {
            iov_base: iov.iov_base,
            iov_len: 2048,
        })
        .collect();
    let mut send_headers = mmsg_headers(&mut send_iovs, Some(&to));
    let mut recv_headers = mmsg_headers(&mut recv_iovs, None);
    let (cpu0, t0) = (thread_cpu(), Instant::now());
    let end = t0 + Duration::from_secs(secs);
    let mut pairs = 0u64;
    while Instant::now() < end {
        for _ in 0..64 {
            // SAFETY: the headers point at the live address and buffers.
            let got = unsafe {
                libc::sendmmsg(tx.as_raw_fd(), send_headers.as_mut_ptr(), batch as u32, 0);
                libc::recvmmsg(
                    rx.as_raw_fd(),
                    recv_headers.as_mut_ptr(),
                    batch as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            pairs += got.max(0) as u64;
        }
    }
    let cpu = (thread_cpu() - cpu0).as_secs_f64();
    println!(
        "RESULT mode=echo batch={batch} pairs={pairs} cpu={:.1}% pairs_per_cpu_second={:.0} per_pair={:.2}us",
        100.0 * cpu / t0.elapsed().as_secs_f64(),
        pairs as f64 / cpu,
        cpu / pairs as f64 * 1e6,
    );
}

/// What a sleep of `us` microseconds and the wake-up after it cost the
/// sleeping thread.
fn wakeups(us: u64, secs: u64) {
    pin(0, 0);
    let (cpu0, t0) = (thread_cpu(), Instant::now());
    let end = t0 + Duration::from_secs(secs);
    let mut n = 0u64;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_micros(us));
        n += 1;
    }
    let (cpu, wall) = (
        (thread_cpu() - cpu0).as_secs_f64(),
        t0.elapsed().as_secs_f64(),
    );
    println!(
        "RESULT mode=wakeups sleep={us}us wakeups_per_s={:.0} cpu={:.1}% per_wakeup={:.2}us",
        n as f64 / wall,
        100.0 * cpu / wall,
        cpu / n as f64 * 1e6,
    );
}
