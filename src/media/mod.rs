//! The media anchor: every call's audio flows through Parley, each leg with
//! its own SRTP keys.
//!
//! Control plane ([`MediaEngine`], called from signaling): allocate a leg's
//! port pair, configure it after each offer/answer, bridge two legs, close
//! them. Data plane ([`relay`]): one thread that relays packets between
//! bridged legs. Per-packet work lives in [`leg::Leg`], which is sans-IO and
//! tested without sockets.

mod leg;
mod relay;
pub mod stats;
#[cfg(test)]
mod tests;

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::mpsc::UnboundedReceiver;

pub use leg::{Kind, LegId, LegKeys, LegMedia, demux};
use relay::{Command, Relay, Waker};

use crate::srtp::Suite;

/// Data-plane settings.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// Where leg sockets are bound; the unspecified address binds a
    /// dual-stack socket (IPv4 and IPv6).
    pub bind_ip: IpAddr,
    /// RTP ports; each leg takes an even port and the odd one above it.
    pub ports: RangeInclusive<u16>,
    /// A bridged leg whose phone sends nothing this long is reported.
    pub inactivity: Duration,
}

/// What the data plane reports to signaling.
#[derive(Debug, Clone)]
pub enum MediaEvent {
    /// A bridged leg received nothing for the configured time.
    Inactive { id: LegId, idle: Duration },
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
    /// Loss the phone reported in its last RTCP report on what Parley sent.
    pub remote_fraction_lost: Option<f64>,
    pub remote_jitter_ms: Option<f64>,
    /// Estimated MOS of the audio from the phone to Parley.
    pub mos_received: Option<f64>,
    /// Estimated MOS of the audio from Parley to the phone, from its RTCP.
    pub mos_sent: Option<f64>,
}

impl LegReport {
    pub(crate) fn of(leg: &leg::Leg) -> Self {
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
            remote_fraction_lost: leg.remote_report.map(|rr| rr.fraction_lost),
            remote_jitter_ms,
            mos_received: (r.packets > 0).then(|| stats::mos(loss, jitter_ms, 0.0)),
            mos_sent: leg
                .remote_report
                .map(|rr| stats::mos(rr.fraction_lost, remote_jitter_ms.unwrap_or(0.0), 0.0)),
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
        let (tx, rx) = mpsc::channel();
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let waker = Arc::new(Waker::new()?);
        let relay = Relay::new(waker.clone(), rx, events_tx, config.inactivity)?;
        let thread = std::thread::Builder::new()
            .name("media-relay".into())
            .spawn(move || relay.run())?;
        let engine = MediaEngine {
            config,
            commands: tx,
            waker,
            next_id: AtomicU64::new(1),
            cursor: AtomicU32::new(0),
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

    /// Binds a free RTP/RTCP port pair and hands it to the relay.
    pub fn open_leg(&self) -> Result<OpenLeg, MediaError> {
        let lo = *self.config.ports.start();
        let hi = *self.config.ports.end();
        let pairs = u32::from(hi - lo).div_ceil(2).max(1);
        for _ in 0..pairs {
            let n = self.cursor.fetch_add(1, Ordering::Relaxed) % pairs;
            let port = lo + (n * 2) as u16;
            if port >= hi {
                continue;
            }
            let Ok(rtp) = bind(self.config.bind_ip, port) else {
                continue;
            };
            let Ok(rtcp) = bind(self.config.bind_ip, port + 1) else {
                continue;
            };
            let id = LegId(self.next_id.fetch_add(1, Ordering::Relaxed));
            self.send(Command::Add { id, rtp, rtcp })?;
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
