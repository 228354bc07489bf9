//! The relay thread: the data plane. SRTP legs share one port pair: their
//! packets are read and sent in batches (`recvmmsg`, `sendmmsg`) and told
//! apart by source address, a new or changed source being matched to its
//! leg by authentication. Other legs have a port pair of their own, read one
//! datagram per readiness event. Either way a packet goes through its leg
//! (authenticate, decrypt, latch, count) and out through the bridged leg
//! (encrypt, send). One thread, no locks and no allocation per packet; the
//! control plane talks to it through a channel and an eventfd.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use slab::Slab;
use smallvec::SmallVec;
use tokio::sync::mpsc::UnboundedSender;

use super::batch::{self, BATCH, Batch, Outbox};
use super::leg::{Kind, Leg, LegId, LegMedia, demux};
use super::{LegReport, MediaEvent};
use crate::srtp::MAX_SRTP_OVERHEAD;
use crate::srtp::SRTCP_OVERHEAD;

/// The epoll token of the wake-up eventfd; leg tokens are `slot << 1 | rtcp`.
const WAKE_TOKEN: u64 = u64::MAX;
/// The epoll tokens of the shared RTP and RTCP sockets.
const SHARED_TOKENS: [u64; 2] = [u64::MAX - 1, u64::MAX - 2];
/// Legs taken from each list of candidates for a packet from a source no
/// leg has: those that know its SSRC, those whose SDP names its address or
/// host, then a few that expect a new source, in turn.
const MAX_TRIALS: usize = 8;
/// SRTP legs tried in all for one such packet. Each try is one HMAC, so
/// this bounds what a forged packet costs.
const MAX_KEY_TRIALS: usize = 2 * MAX_TRIALS;
/// SSRCs remembered per shared leg, to find it when its phone's address
/// changes (a NAT rebinding) and the packet comes from a new source.
const MAX_SSRCS: usize = 4;
/// Readiness events taken per `epoll_wait`.
const MAX_EVENTS: usize = 256;
/// Datagrams longer than this are not media (RTP over UDP stays under the
/// path MTU) and are dropped.
pub(crate) const MAX_DATAGRAM: usize = 1500;
/// The packet buffer: a datagram plus the largest SRTP/SRTCP trailer.
pub(crate) const BUF_LEN: usize = MAX_DATAGRAM
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

/// Where a leg's packets arrive and leave.
pub(crate) enum Sockets {
    /// A port pair of its own.
    Own { rtp: UdpSocket, rtcp: UdpSocket },
    /// The shared pair.
    Shared,
}

pub(crate) enum Command {
    Add { id: LegId, sockets: Sockets },
    Configure { id: LegId, media: LegMedia },
    Bridge { a: LegId, b: LegId },
    Close { id: LegId },
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
    sockets: Sockets,
    /// The bridged leg's slot.
    peer: Option<usize>,
    /// Its sockets (own or shared) are IPv6 dual-stack: IPv4 peers need
    /// mapped addresses.
    dual_stack: bool,
    /// Its sockets are bound to all addresses.
    wildcard: bool,
    /// Where its packets leave from, on a wildcard socket: the leg's
    /// `LegMedia::local_ip`, until the host turns out not to have it.
    source: Option<IpAddr>,
    /// On the shared pair: the source each shared socket knows it by.
    sources: [Option<SocketAddr>; 2],
    /// On the shared pair: SSRCs its phone sent that authenticated.
    ssrcs: SmallVec<[u32; MAX_SSRCS]>,
    /// On the shared pair: listed in [`SharedPort::expecting`].
    expecting: bool,
    /// On the shared pair, while expecting: what it is listed under in
    /// [`SharedPort::by_hint`].
    hints: SmallVec<[Hint; 4]>,
}

/// Where a phone whose source is not known yet is likely to send from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Hint {
    /// The address its SDP names: a phone that is not behind a NAT sends
    /// from where it receives (symmetric RTP).
    Address(SocketAddr),
    /// A host signaling trusts for it: its SDP host, and the host its
    /// requests come from, which for a phone behind a NAT is the NAT.
    Host(std::net::IpAddr),
}

/// The port pair SRTP legs share, and how its packets find their legs.
pub(crate) struct SharedPort {
    /// RTP (and multiplexed RTCP), then RTCP.
    sockets: [UdpSocket; 2],
    /// Where they are bound.
    bound: Option<SocketAddr>,
    /// Latched sources, per socket.
    by_source: [HashMap<SocketAddr, usize>; 2],
    /// Legs by the SSRCs their phones sent.
    by_ssrc: HashMap<u32, SmallVec<[usize; 2]>>,
    /// Legs that may soon send from a source not known yet: new legs, and
    /// legs whose phone just sent a new offer or answer.
    expecting: Vec<usize>,
    /// The same legs by [`Hint`], so that a first packet finds its leg
    /// among many new ones at once.
    by_hint: HashMap<Hint, SmallVec<[usize; 2]>>,
    /// Where the next search starts in `expecting`, so that every leg gets
    /// its turn when more than [`MAX_TRIALS`] wait.
    next_trial: usize,
    batch: Batch,
    outboxes: [Outbox; 2],
}

impl SharedPort {
    pub(crate) fn new(rtp: UdpSocket, rtcp: UdpSocket) -> Self {
        SharedPort {
            bound: rtp.local_addr().ok(),
            sockets: [rtp, rtcp],
            by_source: [HashMap::new(), HashMap::new()],
            by_ssrc: HashMap::new(),
            expecting: Vec::new(),
            by_hint: HashMap::new(),
            next_trial: 0,
            batch: Batch::new(),
            outboxes: [Outbox::new(), Outbox::new()],
        }
    }
}

pub(crate) struct Relay {
    epoll: OwnedFd,
    waker: Arc<Waker>,
    commands: Receiver<Command>,
    events: UnboundedSender<MediaEvent>,
    slots: Slab<Slot>,
    by_id: HashMap<LegId, usize>,
    shared: SharedPort,
    inactivity: Duration,
}

impl Relay {
    pub(crate) fn new(
        waker: Arc<Waker>,
        commands: Receiver<Command>,
        events: UnboundedSender<MediaEvent>,
        shared: SharedPort,
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
            shared,
            inactivity,
        };
        relay.watch(relay.waker.fd.as_raw_fd(), WAKE_TOKEN)?;
        for (socket, token) in relay.shared.sockets.iter().zip(SHARED_TOKENS) {
            relay.watch(socket.as_raw_fd(), token)?;
        }
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
                } else if let Some(k) = SHARED_TOKENS.iter().position(|&t| t == token) {
                    self.drain_shared(k);
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

    /// One datagram from a leg's own readable socket, relayed if it passes.
    /// Reading one per readiness event keeps it to one receive syscall per
    /// packet; epoll reports the socket again while more are queued.
    fn readable(&mut self, slot: usize, rtcp_socket: bool, buf: &mut [u8; BUF_LEN]) {
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        let Sockets::Own { rtp, rtcp } = &s.sockets else {
            return;
        };
        let socket = if rtcp_socket { rtcp } else { rtp };
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
        let shared = &mut self.shared;
        forward(
            &mut self.slots,
            &shared.sockets,
            &mut shared.outboxes,
            slot,
            kind,
            &mut buf[..],
            plain,
            None,
        );
    }

    /// Everything queued on shared socket `k` (0: RTP, 1: RTCP), a batch
    /// at a time; what goes out through the shared port leaves in one
    /// `sendmmsg` per batch. A few batches per wake-up at most, so a flood
    /// on the shared port cannot starve the legs with ports of their own.
    fn drain_shared(&mut self, k: usize) {
        for _ in 0..MAX_SHARED_BATCHES {
            let fd = self.shared.sockets[k].as_raw_fd();
            let n = self.shared.batch.recv(fd, MAX_DATAGRAM);
            // Arrival time, for jitter: the batch was queued by now, and
            // the wake-up time can be a coalescing nap old.
            let now = Instant::now();
            for i in 0..n {
                self.relay_shared(k, i, now);
            }
            let SharedPort {
                sockets,
                outboxes,
                batch,
                ..
            } = &mut self.shared;
            for (socket, outbox) in sockets.iter().zip(outboxes.iter_mut()) {
                outbox.flush(socket.as_raw_fd(), &batch.bufs, |slot, for_source| {
                    if let Some(s) = self.slots.get_mut(slot) {
                        if for_source {
                            source_refused(s);
                        } else {
                            s.leg.sending.send_errors += 1;
                        }
                    }
                });
            }
            if n < BATCH {
                break;
            }
        }
    }

    /// Datagram `i` of the batch just read from shared socket `k`: found
    /// its leg by source (or, from a new source, by authentication), taken
    /// by the leg, and queued for the bridged leg's phone.
    fn relay_shared(&mut self, k: usize, i: usize, now: Instant) {
        let Relay { slots, shared, .. } = self;
        let SharedPort {
            sockets,
            by_source,
            by_ssrc,
            expecting,
            by_hint,
            next_trial,
            batch,
            outboxes,
            ..
        } = shared;
        let len = batch.len(i);
        let Some(src) = batch.source(i).map(canonical) else {
            return;
        };
        let known = by_source[k].get(&src).copied();
        if len > MAX_DATAGRAM {
            if let Some(s) = known.and_then(|s| slots.get_mut(s)) {
                s.leg.receiving.malformed += 1;
            }
            return;
        }
        let buf = &mut batch.bufs[i];
        let kind = if k == 1 {
            Kind::Rtcp
        } else {
            demux(&buf[..len])
        };
        let mut search = Search {
            slots,
            by_ssrc,
            expecting,
            by_hint,
            next_trial,
        };
        let taken = known.and_then(|slot| {
            slots_receive(search.slots, slot, kind, src, &mut buf[..len], now).map(|p| (slot, p))
        });
        let (slot, plain, searched) = match taken {
            Some((slot, plain)) => (slot, plain, false),
            // No leg knows this source, or its leg refused the packet: the
            // address may have passed to another phone (a NAT reusing a
            // port). Search, leaving out the leg that refused.
            None => {
                let Some(slot) = search.find(kind, src, &buf[..len], known) else {
                    return;
                };
                let Some(plain) =
                    slots_receive(search.slots, slot, kind, src, &mut buf[..len], now)
                else {
                    return;
                };
                (slot, plain, true)
            }
        };
        if searched {
            note_source(slots, &mut by_source[k], k, slot, src);
        }
        if let Some(ssrc) = packet_ssrc(kind, &buf[..plain]) {
            note_ssrc(slots, by_ssrc, slot, ssrc);
        }
        if slots[slot].expecting {
            stop_expecting(slots, expecting, by_hint, slot);
        }
        forward(
            slots,
            sockets,
            outboxes,
            slot,
            kind,
            &mut buf[..],
            plain,
            Some(i),
        );
    }

    /// Applies queued commands; false on shutdown.
    fn handle_commands(&mut self, now: Instant) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Add { id, sockets }) => {
                    let entry = self.slots.vacant_entry();
                    let key = entry.key();
                    let (bound, fds) = match &sockets {
                        Sockets::Own { rtp, rtcp } => (
                            rtp.local_addr().ok(),
                            Some((rtp.as_raw_fd(), rtcp.as_raw_fd())),
                        ),
                        Sockets::Shared => (self.shared.bound, None),
                    };
                    let dual_stack = bound.is_some_and(|a| a.is_ipv6());
                    let wildcard = bound.is_some_and(|a| a.ip().is_unspecified());
                    entry.insert(Slot {
                        leg: Leg::new(id, now),
                        sockets,
                        peer: None,
                        dual_stack,
                        wildcard,
                        source: None,
                        sources: [None; 2],
                        ssrcs: SmallVec::new(),
                        expecting: false,
                        hints: SmallVec::new(),
                    });
                    match fds {
                        Some((rtp_fd, rtcp_fd)) => {
                            let token = (key as u64) << 1;
                            if let Err(e) = self
                                .watch(rtp_fd, token)
                                .and_then(|()| self.watch(rtcp_fd, token | 1))
                            {
                                tracing::error!(leg = %id, error = %e, "media relay: cannot watch sockets");
                            }
                        }
                        None => expect(&mut self.slots, &mut self.shared, key),
                    }
                    self.by_id.insert(id, key);
                }
                Ok(Command::Configure { id, media }) => {
                    let Some(&key) = self.by_id.get(&id) else {
                        continue;
                    };
                    let s = &mut self.slots[key];
                    s.source = media
                        .local_ip
                        .filter(|ip| s.wildcard && !ip.is_unspecified());
                    s.leg.configure(media, now);
                    // A new offer or answer may come with a new address or
                    // SSRC: let a packet from a new source find the leg.
                    if matches!(s.sockets, Sockets::Shared) {
                        expect(&mut self.slots, &mut self.shared, key);
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
                    match &s.sockets {
                        Sockets::Own { rtp, rtcp } => {
                            self.unwatch(rtp.as_raw_fd());
                            self.unwatch(rtcp.as_raw_fd());
                        }
                        Sockets::Shared => forget_shared(&mut self.shared, key, &s),
                    }
                    let mut upstream_lost = s.leg.upstream_lost.unwrap_or(0);
                    if let Some(p) = s.peer.and_then(|p| self.slots.get_mut(p))
                        && p.peer == Some(key)
                    {
                        p.peer = None;
                        upstream_lost = p.leg.receiving.lost();
                        p.leg.upstream_lost = Some(s.leg.receiving.lost());
                    }
                    let _ = self.events.send(MediaEvent::Closed {
                        report: LegReport::of(&s.leg, upstream_lost),
                    });
                }
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => return true,
            }
        }
    }

    /// Reports bridged legs whose phone went quiet, and quiet legs whose
    /// phone was heard again (checked here, off the packet path).
    fn tick(&mut self, now: Instant) {
        for (_, s) in self.slots.iter_mut() {
            let leg = &mut s.leg;
            if leg.inactivity_reported && now.duration_since(leg.last_activity) < self.inactivity {
                leg.inactivity_reported = false;
                let _ = self.events.send(MediaEvent::Active { id: leg.id });
            } else if s.peer.is_some()
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

/// Batches read from a shared socket per wake-up, at most.
const MAX_SHARED_BATCHES: usize = 8;

/// Lets leg `slot` take a packet; the plain length when it did.
fn slots_receive(
    slots: &mut Slab<Slot>,
    slot: usize,
    kind: Kind,
    src: SocketAddr,
    buf: &mut [u8],
    now: Instant,
) -> Option<usize> {
    slots.get_mut(slot)?.leg.receive(kind, src, buf, now).ok()
}

/// What finding the leg of a packet from a new source looks at.
struct Search<'a> {
    slots: &'a mut Slab<Slot>,
    by_ssrc: &'a HashMap<u32, SmallVec<[usize; 2]>>,
    expecting: &'a [usize],
    by_hint: &'a HashMap<Hint, SmallVec<[usize; 2]>>,
    next_trial: &'a mut usize,
}

impl Search<'_> {
    /// The leg that would take `packet` from `src`, not `exclude`. Tried
    /// in turn, at most [`MAX_TRIALS`] of each: legs whose phones sent its
    /// SSRC before (a phone whose address changed), expecting legs whose
    /// SDP names this address, expecting legs that trust this host, and
    /// expecting legs in general (a phone whose media leaves from another
    /// host than its signaling). Nothing is changed. An SRTP leg must
    /// authenticate the packet; a plain leg must trust the host, and one
    /// that signaled exactly this address wins over one that only trusts it.
    fn find(
        &mut self,
        kind: Kind,
        src: SocketAddr,
        packet: &[u8],
        exclude: Option<usize>,
    ) -> Option<usize> {
        let ssrc = packet_ssrc(kind, packet)?;
        let start = *self.next_trial;
        *self.next_trial = start.wrapping_add(MAX_TRIALS);
        let candidates = turn(list(self.by_ssrc.get(&ssrc)), 0)
            .chain(turn(list(self.by_hint.get(&Hint::Address(src))), 0))
            .chain(turn(list(self.by_hint.get(&Hint::Host(src.ip()))), start))
            .chain(turn(self.expecting, start));
        let mut trusting = None;
        // A leg may be on several lists: tried once.
        let mut tried: SmallVec<[usize; 4 * MAX_TRIALS]> = SmallVec::new();
        let mut key_trials = 0;
        for c in candidates {
            if Some(c) == exclude || tried.contains(&c) {
                continue;
            }
            tried.push(c);
            let Some(s) = self.slots.get(c) else {
                continue;
            };
            if s.leg.suite().is_some() {
                if key_trials == MAX_KEY_TRIALS {
                    continue;
                }
                key_trials += 1;
            }
            if !s.leg.accepts(kind, src, packet) {
                continue;
            }
            let signaled = s
                .leg
                .media()
                .is_some_and(|m| m.remote_rtp == Some(src) || m.remote_rtcp == Some(src));
            if s.leg.suite().is_some() || signaled {
                return Some(c);
            }
            trusting.get_or_insert(c);
        }
        trusting
    }
}

fn list(legs: Option<&SmallVec<[usize; 2]>>) -> &[usize] {
    legs.map_or(&[], |l| l.as_slice())
}

/// Up to [`MAX_TRIALS`] of `legs`, from `start` on, round the end.
fn turn(legs: &[usize], start: usize) -> impl Iterator<Item = usize> + '_ {
    let n = legs.len();
    (0..n.min(MAX_TRIALS)).map(move |j| legs[start.wrapping_add(j) % n])
}

/// The SSRC a packet names: the sender's, for RTCP.
fn packet_ssrc(kind: Kind, packet: &[u8]) -> Option<u32> {
    let at = match kind {
        Kind::Rtp => 8,
        Kind::Rtcp => 4,
    };
    let bytes = packet.get(at..at + 4)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

/// Shared socket `k` now finds leg `slot` by `src`, and no longer by the
/// leg's previous source there.
fn note_source(
    slots: &mut Slab<Slot>,
    by_source: &mut HashMap<SocketAddr, usize>,
    k: usize,
    slot: usize,
    src: SocketAddr,
) {
    if let Some(old) = slots[slot].sources[k].replace(src)
        && old != src
        && by_source.get(&old) == Some(&slot)
    {
        by_source.remove(&old);
    }
    if let Some(previous) = by_source.insert(src, slot)
        && previous != slot
        && let Some(p) = slots.get_mut(previous)
        && p.sources[k] == Some(src)
    {
        p.sources[k] = None;
    }
}

/// Remembers that leg `slot`'s phone sends `ssrc`, forgetting its oldest
/// SSRC beyond [`MAX_SSRCS`].
fn note_ssrc(
    slots: &mut Slab<Slot>,
    by_ssrc: &mut HashMap<u32, SmallVec<[usize; 2]>>,
    slot: usize,
    ssrc: u32,
) {
    let s = &mut slots[slot];
    if s.ssrcs.contains(&ssrc) {
        return;
    }
    if s.ssrcs.len() == MAX_SSRCS {
        let old = s.ssrcs.remove(0);
        unlist(by_ssrc, &old, slot);
    }
    s.ssrcs.push(ssrc);
    by_ssrc.entry(ssrc).or_default().push(slot);
}

/// Removes every way the shared port had to find a closed leg.
fn forget_shared(shared: &mut SharedPort, key: usize, slot: &Slot) {
    for (k, source) in slot.sources.iter().enumerate() {
        if let Some(src) = source
            && shared.by_source[k].get(src) == Some(&key)
        {
            shared.by_source[k].remove(src);
        }
    }
    for &ssrc in &slot.ssrcs {
        unlist(&mut shared.by_ssrc, &ssrc, key);
    }
    if slot.expecting {
        shared.expecting.retain(|&e| e != key);
        for hint in &slot.hints {
            unlist(&mut shared.by_hint, hint, key);
        }
    }
}

/// Lists shared leg `key` as expecting packets from a new source, under
/// the hints its current media description gives.
fn expect(slots: &mut Slab<Slot>, shared: &mut SharedPort, key: usize) {
    let s = &mut slots[key];
    if !s.expecting {
        s.expecting = true;
        shared.expecting.push(key);
    }
    for hint in s.hints.drain(..) {
        unlist(&mut shared.by_hint, &hint, key);
    }
    if let Some(media) = s.leg.media() {
        let addresses = [media.remote_rtp, media.remote_rtcp]
            .into_iter()
            .flatten()
            .map(|a| Hint::Address(canonical(a)));
        let hosts = media
            .trusted_ips
            .iter()
            .map(|ip| Hint::Host(ip.to_canonical()));
        for hint in addresses.chain(hosts) {
            if !s.hints.contains(&hint) {
                s.hints.push(hint);
                shared.by_hint.entry(hint).or_default().push(key);
            }
        }
    }
}

/// Leg `slot` found its source: it no longer takes part in searches
/// beyond its SSRCs.
fn stop_expecting(
    slots: &mut Slab<Slot>,
    expecting: &mut Vec<usize>,
    by_hint: &mut HashMap<Hint, SmallVec<[usize; 2]>>,
    slot: usize,
) {
    let s = &mut slots[slot];
    s.expecting = false;
    expecting.retain(|&e| e != slot);
    for hint in s.hints.drain(..) {
        unlist(by_hint, &hint, slot);
    }
}

/// Removes `slot` from the list under `key`, and the list once empty.
fn unlist<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, SmallVec<[usize; 2]>>,
    key: &K,
    slot: usize,
) {
    if let Some(legs) = map.get_mut(key) {
        legs.retain(|l| *l != slot);
        if legs.is_empty() {
            map.remove(key);
        }
    }
}

/// Sends the plain packet in `buf[..plain]`, which leg `from` took, on to
/// its bridged leg's phone. A packet read from the shared port (`batch`:
/// its buffer's index) that leaves through the shared port again is
/// queued for the batch's `sendmmsg`; anything else is sent at once.
#[allow(clippy::too_many_arguments)]
fn forward(
    slots: &mut Slab<Slot>,
    shared_sockets: &[UdpSocket; 2],
    outboxes: &mut [Outbox; 2],
    from: usize,
    kind: Kind,
    buf: &mut [u8],
    plain: usize,
    batch: Option<usize>,
) {
    let Some(peer) = slots.get(from).and_then(|s| s.peer) else {
        return;
    };
    let Some(p) = slots.get_mut(peer) else {
        return;
    };
    let Some((dest, len)) = p.leg.prepare_send(kind, buf, plain) else {
        return;
    };
    let dest = if p.dual_stack { mapped(dest) } else { dest };
    let k = usize::from(kind == Kind::Rtcp && !p.leg.rtcp_mux());
    let fd = match (&p.sockets, batch) {
        (Sockets::Own { rtp, rtcp }, _) => [rtp, rtcp][k].as_raw_fd(),
        (Sockets::Shared, Some(i)) => {
            outboxes[k].push(i, len, dest, p.source, peer);
            return;
        }
        (Sockets::Shared, None) => shared_sockets[k].as_raw_fd(),
    };
    let mut sent = batch::send_one(fd, &buf[..len], &dest, p.source);
    if p.source.is_some()
        && let Err(e) = &sent
        && batch::maybe_source_refused(e)
    {
        // Sent without its source, it goes: the host lacks the source.
        sent = batch::send_one(fd, &buf[..len], &dest, None);
        if sent.is_ok() {
            source_refused(p);
        }
    }
    if sent.is_err() {
        p.leg.sending.send_errors += 1;
    }
}

/// The host does not have the address a leg's packets were to leave from
/// (a public address behind a 1:1 NAT, say): from now on they leave from
/// the one the routing table picks.
fn source_refused(s: &mut Slot) {
    tracing::debug!(leg = %s.leg.id, source = ?s.source, "media cannot leave from this address here; sending from the routed one");
    s.source = None;
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
