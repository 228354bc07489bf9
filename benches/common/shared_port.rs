//! A design alternative measured against the real relay, not Parley's code:
//! every leg shares one UDP port, packets are told apart by their source
//! address, and the relay reads and sends in batches (`recvmmsg` and
//! `sendmmsg`, which a socket per leg rules out). It does only what the
//! relay's hot path does per packet — find the leg, authenticate and
//! decrypt, re-encrypt for the peer, send — with the relay's wake-up
//! coalescing, and leaves out what a real design would need (latching by
//! authentication before a source is known, RTCP, statistics).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use parley::srtp::SrtpContext;

/// Datagrams taken or sent per system call.
const BATCH: usize = 64;
const SLOT: usize = 2048;
/// Same coalescing rule as the relay: a wake-up this soon after the last
/// one is followed by a nap.
const BUSY_WAKEUPS: Duration = Duration::from_millis(1);
const COALESCE: Duration = Duration::from_micros(500);

pub struct SharedLeg {
    /// Decrypts what this leg's phone sends.
    pub rx: SrtpContext,
    /// Encrypts what goes to this leg's phone.
    pub tx: SrtpContext,
    pub peer: usize,
    pub phone: SocketAddr,
}

fn sockaddr_in(addr: SocketAddr) -> libc::sockaddr_in {
    let SocketAddr::V4(v4) = addr else {
        panic!("the prototype is IPv4 only")
    };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

fn from_sockaddr_in(sa: &libc::sockaddr_in) -> SocketAddr {
    SocketAddr::from((
        Ipv4Addr::from(sa.sin_addr.s_addr.to_ne_bytes()),
        u16::from_be(sa.sin_port),
    ))
}

/// One socket holds every leg's queue, so it gets the buffer of many: at
/// the default (about 200 kB) it overflowed at 1,200 calls. The kernel caps
/// this at `net.core.rmem_max`.
const RECEIVE_BUFFER: libc::c_int = 8 << 20;

/// Runs the prototype relay on `socket` until the process ends.
pub fn run(socket: UdpSocket, mut legs: Vec<SharedLeg>) {
    // SAFETY: a valid socket and a live c_int of the right size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&RECEIVE_BUFFER as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let by_source: HashMap<SocketAddr, usize> =
        legs.iter().enumerate().map(|(i, l)| (l.phone, i)).collect();
    let destinations: Vec<libc::sockaddr_in> = legs.iter().map(|l| sockaddr_in(l.phone)).collect();
    let fd = socket.as_raw_fd();
    let mut bufs = vec![[0u8; SLOT]; BATCH];
    // SAFETY (zeroed): plain C structs for which all-zero is valid.
    let mut sources: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut recv_iov = vec![empty; BATCH];
    let mut recv_hdrs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut send_iov = vec![empty; BATCH];
    let mut send_hdrs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut last_wake = Instant::now();
    loop {
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut pollfd, 1, 1000) };
        let now = Instant::now();
        let busy = now.duration_since(last_wake) < BUSY_WAKEUPS;
        last_wake = now;
        loop {
            for i in 0..BATCH {
                recv_iov[i] = libc::iovec {
                    iov_base: bufs[i].as_mut_ptr().cast(),
                    iov_len: 1501,
                };
                let h = &mut recv_hdrs[i].msg_hdr;
                h.msg_name = (&mut sources[i] as *mut libc::sockaddr_in).cast();
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                h.msg_iov = &mut recv_iov[i];
                h.msg_iovlen = 1;
            }
            // SAFETY: BATCH headers, each pointing at live buffers.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    recv_hdrs.as_mut_ptr(),
                    BATCH as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            let mut out = 0;
            for i in 0..n {
                let len = recv_hdrs[i].msg_len as usize;
                let Some(&leg) = by_source.get(&from_sockaddr_in(&sources[i])) else {
                    continue;
                };
                let Ok(plain) = legs[leg].rx.unprotect_rtp(&mut bufs[i][..len]) else {
                    continue;
                };
                let peer = legs[leg].peer;
                let Ok(len) = legs[peer].tx.protect_rtp(&mut bufs[i][..], plain.len) else {
                    continue;
                };
                send_iov[out] = libc::iovec {
                    iov_base: bufs[i].as_mut_ptr().cast(),
                    iov_len: len,
                };
                let h = &mut send_hdrs[out].msg_hdr;
                h.msg_name = (&destinations[peer] as *const libc::sockaddr_in)
                    .cast_mut()
                    .cast();
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                h.msg_iov = &mut send_iov[out];
                h.msg_iovlen = 1;
                out += 1;
            }
            let mut sent = 0;
            while sent < out {
                // SAFETY: `out - sent` headers pointing at live buffers.
                let s = unsafe {
                    libc::sendmmsg(fd, send_hdrs[sent..].as_mut_ptr(), (out - sent) as u32, 0)
                };
                if s <= 0 {
                    break;
                }
                sent += s as usize;
            }
            if n < BATCH {
                break;
            }
        }
        if busy {
            std::thread::sleep(COALESCE);
        }
    }
}
