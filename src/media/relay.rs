//! The relay thread: the data plane. Every leg's RTP and RTCP sockets sit in
//! one epoll set; a readable socket yields one datagram, which goes through
//! its leg (authenticate, decrypt, latch, count) and out through the bridged
//! leg (encrypt, send). One thread, one buffer, no locks and no allocation
//! per packet; the control plane talks to it through a channel and an
//! eventfd.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use slab::Slab;
use tokio::sync::mpsc::UnboundedSender;

use super::leg::{Kind, Leg, LegId, LegMedia, demux};
use super::{LegReport, MediaEvent};
use crate::srtp::MAX_SRTP_OVERHEAD;
use crate::srtp::SRTCP_OVERHEAD;

/// The epoll token of the wake-up eventfd; leg tokens are `slot << 1 | rtcp`.
const WAKE_TOKEN: u64 = u64::MAX;
/// Readiness events taken per `epoll_wait`.
const MAX_EVENTS: usize = 256;
/// Datagrams longer than this are not media (RTP over UDP stays under the
/// path MTU) and are dropped.
pub(crate) const MAX_DATAGRAM: usize = 1500;
/// The packet buffer: a datagram plus the largest SRTP/SRTCP trailer.
const BUF_LEN: usize = MAX_DATAGRAM
    + 1
    + if MAX_SRTP_OVERHEAD > SRTCP_OVERHEAD {
        MAX_SRTP_OVERHEAD
    } else {
        SRTCP_OVERHEAD
    };
/// How often inactivity is checked.
const TICK: Duration = Duration::from_millis(500);
/// Wake-up coalescing: when the relay was woken again this soon after the
/// previous wake-up, it naps for [`COALESCE`] before waiting, so that one
/// wake-up serves the packets that arrived meanwhile. A wake-up costs the
/// relay about 25 µs of CPU on a virtual machine (`benches/loopback.rs
/// --wakeups`), several packets' worth; the nap adds at most its length to
/// a packet's latency, and only under load. 500 µs keeps the added latency
/// well under the 1 ms budget of a media anchor while cutting the wake-ups
/// at 200 calls to at most about 1,700/s (see BENCHMARKS.md for the trade-off
/// measured at 200, 350 and 500 µs).
const BUSY_WAKEUPS: Duration = Duration::from_millis(1);
const COALESCE: Duration = Duration::from_micros(500);

pub(crate) enum Command {
    Add {
        id: LegId,
        rtp: UdpSocket,
        rtcp: UdpSocket,
    },
    Configure {
        id: LegId,
        media: LegMedia,
    },
    Bridge {
        a: LegId,
        b: LegId,
    },
    Close {
        id: LegId,
    },
    Shutdown,
}

/// An eventfd the control plane writes to wake the relay.
pub(crate) struct Waker {
    fd: OwnedFd,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        Ok(Waker {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub(crate) fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd. A full
        // counter (EAGAIN) already means "awake".
        unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    fn drain(&self) {
        let mut counter = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer from our eventfd.
        unsafe { libc::read(self.fd.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
    }
}

struct Slot {
    leg: Leg,
    rtp: UdpSocket,
    rtcp: UdpSocket,
    /// The bridged leg's slot.
    peer: Option<usize>,
    /// The sockets are IPv6 dual-stack: IPv4 peers need mapped addresses.
    dual_stack: bool,
}

pub(crate) struct Relay {
    epoll: OwnedFd,
    waker: Arc<Waker>,
    commands: Receiver<Command>,
    events: UnboundedSender<MediaEvent>,
    slots: Slab<Slot>,
    by_id: HashMap<LegId, usize>,
    inactivity: Duration,
}

impl Relay {
    pub(crate) fn new(
        waker: Arc<Waker>,
        commands: Receiver<Command>,
        events: UnboundedSender<MediaEvent>,
        inactivity: Duration,
    ) -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let relay = Relay {
            epoll,
            waker,
            commands,
            events,
            slots: Slab::new(),
            by_id: HashMap::new(),
            inactivity,
        };
        relay.watch(relay.waker.fd.as_raw_fd(), WAKE_TOKEN)?;
        Ok(relay)
    }

    fn watch(&self, fd: i32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: valid epoll and socket descriptors, live event struct.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn unwatch(&self, fd: i32) {
        // SAFETY: valid descriptors; a null event is allowed for DEL.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    pub(crate) fn run(mut self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
        let mut buf = [0u8; BUF_LEN];
        let mut next_tick = Instant::now() + TICK;
        let mut last_wake = Instant::now();
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let timeout = wait.as_millis().min(i32::MAX as u128) as i32 + 1;
            // SAFETY: valid epoll descriptor and a live array of MAX_EVENTS.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    MAX_EVENTS as i32,
                    timeout,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %err, "media relay: epoll_wait failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            let now = Instant::now();
            let busy = now.duration_since(last_wake) < BUSY_WAKEUPS;
            last_wake = now;
            for ev in &events[..n as usize] {
                let token = ev.u64;
                if token == WAKE_TOKEN {
                    self.waker.drain();
                    if !self.handle_commands(now) {
                        return;
                    }
                } else {
                    self.readable((token >> 1) as usize, token & 1 == 1, &mut buf);
                }
            }
            if now >= next_tick {
                self.tick(now);
                next_tick = now + TICK;
            }
            if busy && (n as usize) < MAX_EVENTS {
                std::thread::sleep(COALESCE);
            }
        }
    }

    /// One datagram from a readable socket, relayed if it passes. Reading one
    /// per readiness event keeps it to one receive syscall per packet; epoll
    /// reports the socket again while more are queued.
    fn readable(&mut self, slot: usize, rtcp_socket: bool, buf: &mut [u8; BUF_LEN]) {
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        let socket = if rtcp_socket { &s.rtcp } else { &s.rtp };
        let (len, src) = match socket.recv_from(&mut buf[..MAX_DATAGRAM + 1]) {
            Ok(r) => r,
            // WouldBlock after a spurious wake-up, or an ICMP error a
            // previous send caused: nothing to relay either way.
            Err(_) => return,
        };
        if len > MAX_DATAGRAM {
            s.leg.receiving.malformed += 1;
            return;
        }
        let src = canonical(src);
        // Arrival time per packet, for jitter: the batch's wake-up time can
        // be a coalescing nap old.
        let now = Instant::now();
        // Phones may multiplex RTCP even without negotiating it.
        let kind = if rtcp_socket {
            Kind::Rtcp
        } else {
            demux(&buf[..len])
        };
        let Ok(plain) = s.leg.receive(kind, src, &mut buf[..len], now) else {
            return;
        };
        let Some(peer) = s.peer else {
            return;
        };
        let Some(p) = self.slots.get_mut(peer) else {
            return;
        };
        let Some((dest, out_len)) = p.leg.prepare_send(kind, &mut buf[..], plain) else {
            return;
        };
        let socket = if kind == Kind::Rtcp && !p.leg.rtcp_mux() {
            &p.rtcp
        } else {
            &p.rtp
        };
        let dest = if p.dual_stack { mapped(dest) } else { dest };
        if socket.send_to(&buf[..out_len], dest).is_err() {
            p.leg.sending.send_errors += 1;
        }
    }

    /// Applies queued commands; false on shutdown.
    fn handle_commands(&mut self, now: Instant) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Add { id, rtp, rtcp }) => {
                    let entry = self.slots.vacant_entry();
                    let key = entry.key();
                    let dual_stack = rtp.local_addr().is_ok_and(|a| a.is_ipv6());
                    let (rtp_fd, rtcp_fd) = (rtp.as_raw_fd(), rtcp.as_raw_fd());
                    entry.insert(Slot {
                        leg: Leg::new(id, now),
                        rtp,
                        rtcp,
                        peer: None,
                        dual_stack,
                    });
                    let token = (key as u64) << 1;
                    if let Err(e) = self
                        .watch(rtp_fd, token)
                        .and_then(|()| self.watch(rtcp_fd, token | 1))
                    {
                        tracing::error!(leg = %id, error = %e, "media relay: cannot watch sockets");
                    }
                    self.by_id.insert(id, key);
                }
                Ok(Command::Configure { id, media }) => {
                    if let Some(s) = self.by_id.get(&id).and_then(|&k| self.slots.get_mut(k)) {
                        s.leg.configure(media, now);
                    }
                }
                Ok(Command::Bridge { a, b }) => {
                    let (Some(&ka), Some(&kb)) = (self.by_id.get(&a), self.by_id.get(&b)) else {
                        continue;
                    };
                    for (k, other) in [(ka, kb), (kb, ka)] {
                        if let Some(old) = self.slots[k].peer.replace(other)
                            && old != other
                            && let Some(o) = self.slots.get_mut(old)
                        {
                            o.peer = None;
                        }
                    }
                }
                Ok(Command::Close { id }) => {
                    let Some(key) = self.by_id.remove(&id) else {
                        continue;
                    };
                    let s = self.slots.remove(key);
                    self.unwatch(s.rtp.as_raw_fd());
                    self.unwatch(s.rtcp.as_raw_fd());
                    if let Some(p) = s.peer.and_then(|p| self.slots.get_mut(p))
                        && p.peer == Some(key)
                    {
                        p.peer = None;
                    }
                    let _ = self.events.send(MediaEvent::Closed {
                        report: LegReport::of(&s.leg),
                    });
                }
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => return true,
            }
        }
    }

    /// Reports bridged legs whose phone went quiet.
    fn tick(&mut self, now: Instant) {
        for (_, s) in self.slots.iter_mut() {
            let leg = &mut s.leg;
            if s.peer.is_some()
                && leg.is_configured()
                && !leg.inactivity_reported
                && now.duration_since(leg.last_activity) >= self.inactivity
            {
                leg.inactivity_reported = true;
                let _ = self.events.send(MediaEvent::Inactive {
                    id: leg.id,
                    idle: now.duration_since(leg.last_activity),
                });
            }
        }
    }
}

/// IPv4-mapped IPv6 sources as plain IPv4, so addresses compare as signaled.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// An IPv4 destination as a dual-stack socket needs it.
fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        v6 => v6,
    }
}
