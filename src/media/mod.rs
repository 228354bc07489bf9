//! The media anchor: every call's audio flows through Parley, each leg with
//! its own SRTP keys.
//!
//! Control plane ([`MediaEngine`], called from signaling): open a leg on
//! the shared port pair or on a pair of its own, configure it after each
//! offer/answer, bridge two legs, close them. Data plane ([`relay`]): one
//! thread that relays packets between bridged legs. Per-packet work lives
//! in [`leg::Leg`], which is sans-IO and tested without sockets.

mod batch;
mod leg;
mod relay;
pub mod stats;
#[cfg(test)]
pub(crate) mod tests;

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::mpsc::UnboundedReceiver;

pub(crate) use batch::{
    PktInfoSpace, enable_pktinfo, expect_pktinfo, maybe_source_refused, received_on, recv_headers,
    send_from, send_header, send_one, sender, set_int_option,
};
pub use leg::{Kind, LegId, LegKeys, LegMedia, demux};
use relay::{Command, Relay, SharedPort, Sockets, Waker};

use crate::srtp::Suite;

/// Data-plane settings.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// Where leg sockets are bound; the unspecified address binds a
    /// dual-stack socket (IPv4 and IPv6).
    pub bind_ip: IpAddr,
    /// RTP ports: an even port and the odd one above it make a pair. The
    /// first free pair is shared by SRTP legs, the others go one per leg.
    pub ports: RangeInclusive<u16>,
    /// A bridged leg whose phone sends nothing this long is reported.
    pub inactivity: Duration,
}

/// What the data plane reports to signaling.
#[derive(Debug, Clone)]
pub enum MediaEvent {
    /// A bridged leg received nothing for the configured time. Reported
    /// once per quiet spell, and not again after the leg is configured anew.
    Inactive { id: LegId, idle: Duration },
    /// A leg reported inactive received media again.
    Active { id: LegId },
    /// A leg was closed; its final statistics.
    Closed { report: LegReport },
}

/// A leg's statistics when it closed.
#[derive(Debug, Clone, PartialEq)]
pub struct LegReport {
    pub id: LegId,
    pub suite: Option<Suite>,
    /// Where the phone's media came from last.
    pub remote: Option<SocketAddr>,
    pub received_packets: u64,
    pub received_bytes: u64,
    pub lost: u64,
    pub jitter_ms: f64,
    pub auth_failures: u64,
    pub rtcp_auth_failures: u64,
    pub replays: u64,
    pub wrong_source: u64,
    pub sent_packets: u64,
    pub sent_bytes: u64,
    /// Packets for the phone that SRTP would not protect (see
    /// `stats::Sending::srtp_refused`).
    pub srtp_refused: u64,
    /// Loss the phone reported in its last RTCP report on what Parley sent.
    pub remote_fraction_lost: Option<f64>,
    pub remote_jitter_ms: Option<f64>,
    /// Estimated MOS of the audio from the phone to Parley.
    pub mos_received: Option<f64>,
    /// Estimated MOS of the audio from Parley to the phone, from its RTCP.
    pub mos_sent: Option<f64>,
}

impl LegReport {
    /// `upstream_lost`: packets the bridged leg's phone sent that never
    /// reached Parley. Sequence numbers pass through the relay, so this
    /// leg's phone counts those gaps as lost too; they are not this leg's.
    pub(crate) fn of(leg: &leg::Leg, upstream_lost: u64) -> Self {
        let r = &leg.receiving;
        let rate = leg.clock_rate();
        let jitter_ms = r.jitter_ms(rate);
        let loss = if r.expected() > 0 {
            r.lost() as f64 / r.expected() as f64
        } else {
            0.0
        };
        let remote_jitter_ms = leg
            .remote_report
            .map(|rr| f64::from(rr.jitter) * 1000.0 / f64::from(rate.max(1)))
            .filter(|&ms| ms <= stats::MAX_PLAUSIBLE_JITTER_MS);
        LegReport {
            id: leg.id,
            suite: leg.suite(),
            remote: leg.latched(),
            received_packets: r.packets,
            received_bytes: r.bytes,
            lost: r.lost(),
            jitter_ms,
            auth_failures: r.auth_failures,
            rtcp_auth_failures: r.rtcp_auth_failures,
            replays: r.replays,
            wrong_source: r.wrong_source,
            sent_packets: leg.sending.packets,
            sent_bytes: leg.sending.bytes,
            srtp_refused: leg.sending.srtp_refused,
            remote_fraction_lost: leg.remote_report.map(|rr| rr.fraction_lost),
            remote_jitter_ms,
            mos_received: (r.packets > 0).then(|| stats::mos(loss, jitter_ms, 0.0)),
            mos_sent: leg.remote_report.map(|rr| {
                // Over the whole call, as for the other direction: the
                // phone's count of lost packets against what Parley sent
                // it (the fraction in a report covers its last interval).
                let lost_here = (rr.cumulative_lost.max(0) as u64).saturating_sub(upstream_lost);
                let loss = match leg.sending.packets {
                    0 => rr.fraction_lost,
                    sent => (lost_here as f64 / sent as f64).min(1.0),
                };
                stats::mos(loss, remote_jitter_ms.unwrap_or(0.0), 0.0)
            }),
        }
    }
}

/// Why a leg could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("no free RTP port pair in {lo}-{hi}")]
    PortsExhausted { lo: u16, hi: u16 },
    #[error("the media relay has stopped")]
    Stopped,
    #[error("media socket: {0}")]
    Io(#[from] io::Error),
}

/// Which port a leg's phone sends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegPort {
    /// The pair SRTP legs share. Packets find their leg by source address,
    /// and a new source by authenticating under the leg's key, so this is
    /// for legs certain to use SRTP. Reading and sending many packets per
    /// system call makes it the cheaper path (BENCHMARKS.md).
    Shared,
    /// A pair of its own: for plain RTP, whose packets can only be told
    /// apart by address, and legs that may end up plain.
    Own,
}

/// A leg just opened: its id and the RTP port to put in SDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenLeg {
    pub id: LegId,
    pub port: u16,
}

/// The control-plane handle of the media relay.
pub struct MediaEngine {
    config: MediaConfig,
    commands: mpsc::Sender<Command>,
    waker: Arc<Waker>,
    next_id: AtomicU64,
    /// Index of the next port pair to try: next-fit, so a port just freed
    /// is not reused at once (late packets of the old call).
    cursor: AtomicU32,
    /// The RTP port of the shared pair.
    shared_port: u16,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MediaEngine {
    /// Starts the relay thread.
    pub fn start(config: MediaConfig) -> io::Result<(MediaEngine, UnboundedReceiver<MediaEvent>)> {
        if config.ports.start() % 2 == 1 || config.ports.end() <= config.ports.start() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "RTP port range must start even and hold a pair",
            ));
        }
        let (shared, shared_port) = bind_shared(&config)?;
        let (tx, rx) = mpsc::channel();
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let waker = Arc::new(Waker::new()?);
        let relay = Relay::new(waker.clone(), rx, events_tx, shared, config.inactivity)?;
        let thread = std::thread::Builder::new()
            .name("media-relay".into())
            .spawn(move || relay.run())?;
        let engine = MediaEngine {
            config,
            commands: tx,
            waker,
            next_id: AtomicU64::new(1),
            cursor: AtomicU32::new(0),
            shared_port,
            thread: Some(thread),
        };
        Ok((engine, events_rx))
    }

    fn send(&self, command: Command) -> Result<(), MediaError> {
        self.commands
            .send(command)
            .map_err(|_| MediaError::Stopped)?;
        self.waker.wake();
        Ok(())
    }

    /// Opens a leg on the shared pair, or on a free pair of its own.
    pub fn open_leg(&self, port: LegPort) -> Result<OpenLeg, MediaError> {
        if port == LegPort::Shared {
            let id = LegId(self.next_id.fetch_add(1, Ordering::Relaxed));
            self.send(Command::Add {
                id,
                sockets: Sockets::Shared,
            })?;
            return Ok(OpenLeg {
                id,
                port: self.shared_port,
            });
        }
        let lo = *self.config.ports.start();
        let hi = *self.config.ports.end();
        let pairs = u32::from(hi - lo).div_ceil(2).max(1);
        for _ in 0..pairs {
            let n = self.cursor.fetch_add(1, Ordering::Relaxed) % pairs;
            let port = lo + (n * 2) as u16;
            if port >= hi || port == self.shared_port {
                continue;
            }
            let Ok(rtp) = bind(self.config.bind_ip, port) else {
                continue;
            };
            let Ok(rtcp) = bind(self.config.bind_ip, port + 1) else {
                continue;
            };
            let id = LegId(self.next_id.fetch_add(1, Ordering::Relaxed));
            self.send(Command::Add {
                id,
                sockets: Sockets::Own { rtp, rtcp },
            })?;
            return Ok(OpenLeg { id, port });
        }
        Err(MediaError::PortsExhausted { lo, hi })
    }

    /// Sets what the latest offer/answer says about the leg's phone.
    pub fn configure(&self, id: LegId, media: LegMedia) -> Result<(), MediaError> {
        self.send(Command::Configure { id, media })
    }

    /// Relays packets between two legs (replacing earlier bridges).
    pub fn bridge(&self, a: LegId, b: LegId) -> Result<(), MediaError> {
        self.send(Command::Bridge { a, b })
    }

    /// Closes a leg; its report arrives as [`MediaEvent::Closed`].
    pub fn close(&self, id: LegId) -> Result<(), MediaError> {
        self.send(Command::Close { id })
    }
}

impl Drop for MediaEngine {
    fn drop(&mut self) {
        let _ = self.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Receive buffer asked for the shared sockets, which queue what many legs'
/// sockets would: at the default (about 200 kB) a burst at 1,200 calls
/// overflowed it. The kernel grants at most `net.core.rmem_max` unless the
/// process may override it.
const SHARED_RECEIVE_BUFFER: usize = 8 << 20;

/// Binds the first free pair of the range as the shared pair.
fn bind_shared(config: &MediaConfig) -> io::Result<(SharedPort, u16)> {
    let (lo, hi) = (*config.ports.start(), *config.ports.end());
    let mut port = lo;
    while port < hi {
        if let Ok(rtp) = bind(config.bind_ip, port)
            && let Ok(rtcp) = bind(config.bind_ip, port + 1)
        {
            for socket in [&rtp, &rtcp] {
                set_receive_buffer(socket, SHARED_RECEIVE_BUFFER);
            }
            return Ok((SharedPort::new(rtp, rtcp), port));
        }
        port = port.saturating_add(2);
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free RTP port pair in {lo}-{hi} for the shared media port"),
    ))
}

/// Asks for `bytes` of receive buffer, past `net.core.rmem_max` where the
/// process may (`SO_RCVBUFFORCE`); says so when the kernel gave less.
fn set_receive_buffer(socket: &UdpSocket, bytes: usize) {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let forced = batch::set_int_option(
        std::os::fd::AsRawFd::as_raw_fd(socket),
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        value,
    )
    .is_ok();
    let socket = socket2::SockRef::from(socket);
    if !forced {
        let _ = socket.set_recv_buffer_size(bytes);
    }
    // Linux reports twice what was granted (bookkeeping included).
    let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
    if granted < bytes {
        tracing::warn!(
            granted,
            wanted = bytes,
            "shared media port has a small receive buffer; raise net.core.rmem_max to avoid loss under load"
        );
    }
}

fn bind(ip: IpAddr, port: u16) -> io::Result<UdpSocket> {
    let socket = if ip.is_unspecified() {
        // Dual-stack where the host has IPv6, IPv4 otherwise.
        match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) {
            Ok(s) => {
                s.set_only_v6(false)?;
                s.bind(&SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), port).into())?;
                s
            }
            Err(_) => {
                let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                s.bind(&SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port).into())?;
                s
            }
        }
    } else {
        let s = Socket::new(
            Domain::for_address(SocketAddr::new(ip, port)),
            Type::DGRAM,
            Some(Protocol::UDP),
        )?;
        s.bind(&SocketAddr::new(ip, port).into())?;
        s
    };
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
