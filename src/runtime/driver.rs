//! The driver: the one task that owns the protocol core. It reads the UDP
//! socket itself, takes messages from connection tasks through a channel,
//! sleeps until the core's next timer, and carries out what the core
//! returns. No lock guards the core: it has exactly one owner.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, watch};

use super::stream::ConnShared;
use super::udp_batch;
use super::uptime_millis;
use crate::media::MediaEvent;
use crate::pbx::core::{Core, Output};
use crate::pbx::directory::Directory;
use crate::pbx::events::{Event, StoreOp};
use crate::sip::message::ParseError;
use crate::sip::message::limits::MAX_MESSAGE_BYTES;
use crate::sip::transport::{ConnId, Flow, Transport};

/// Datagrams read in one go before the driver looks at its other inputs.
const UDP_BATCH: usize = 64;
/// Stream messages taken from the channel in one go.
const STREAM_BATCH: usize = 64;

/// What connection tasks tell the driver.
#[derive(Debug)]
pub enum Inbound {
    Opened {
        flow: Flow,
        handle: Arc<ConnShared>,
        /// The negotiated TLS version, on TLS connections.
        tls_version: Option<&'static str>,
    },
    Message {
        flow: Flow,
        bytes: Bytes,
    },
    FramingError {
        flow: Flow,
        head: Bytes,
        error: ParseError,
    },
    Closed {
        flow: Flow,
    },
}

struct Conn {
    handle: Arc<ConnShared>,
    flow: Flow,
    pinned: bool,
}

pub struct Driver {
    pub core: Core,
    pub udp: Option<Arc<UdpSocket>>,
    pub inbound: mpsc::Receiver<Inbound>,
    /// What the media relay reports (quiet legs, final statistics).
    pub media_events: mpsc::UnboundedReceiver<MediaEvent>,
    pub store: mpsc::Sender<StoreOp>,
    pub events: broadcast::Sender<Event>,
    /// New extension sets from the store watcher (`None` once it stopped).
    pub directory: Option<watch::Receiver<Directory>>,
    pub shutdown: watch::Receiver<bool>,
    pub idle_timeout: Duration,
    /// Datagrams gathered while flushing, sent in one batch (kept to reuse
    /// its allocation).
    pub datagrams: Vec<udp_batch::Datagram>,
}

impl Driver {
    pub async fn run(mut self) {
        let mut conns: HashMap<ConnId, Conn> = HashMap::new();
        let mut recv = udp_batch::RecvBuffers::new();
        let mut batch = Vec::with_capacity(STREAM_BATCH);
        let reap_every =
            (self.idle_timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(10));
        let mut reaper = tokio::time::interval(reap_every);
        reaper.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let udp = self.udp.clone();
        let udp_local = udp.as_ref().and_then(|u| u.local_addr().ok());

        loop {
            // Timers first, whatever else is ready: a flood on one input
            // must not hold back retransmissions and timeouts.
            let mut due = self.core.poll_timeout();
            let now = Instant::now();
            if due.is_some_and(|d| d <= now) {
                self.core.handle_timeout(now);
                self.flush(&mut conns, udp.as_deref(), udp_local).await;
                due = self.core.poll_timeout();
            }
            let deadline = due.map(tokio::time::Instant::from_std);
            // Not biased: any input that is always ready (a flood) would
            // starve the ones after it.
            tokio::select! {
                _ = self.shutdown.changed() => break,
                n = self.inbound.recv_many(&mut batch, STREAM_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    let now = Instant::now();
                    for item in batch.drain(..) {
                        self.handle_inbound(now, item, &mut conns);
                    }
                }
                ready = readable(udp.as_deref()) => {
                    if ready.is_ok() && let (Some(sock), Some(local)) = (&udp, udp_local) {
                        let now = Instant::now();
                        let mut tries = 0;
                        while tries < UDP_BATCH {
                            let n = match udp_batch::recv_batch(sock, &mut recv) {
                                Ok(n) => n,
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                                // ICMP errors surface here on Linux; nothing to do.
                                Err(_) => {
                                    tries += 1;
                                    continue;
                                }
                            };
                            for i in 0..n {
                                let (data, from, to) = recv.get(i);
                                let Some(from) = from.filter(|_| data.len() <= MAX_MESSAGE_BYTES) else {
                                    continue;
                                };
                                let bytes = Bytes::copy_from_slice(data);
                                // The address the datagram reached, where the
                                // socket is bound to all of them: answers and
                                // later requests to this peer leave from it.
                                let local = to.map_or(local, |ip| SocketAddr::new(ip, local.port()));
                                self.core.handle_message(now, Flow::udp(local, from), bytes);
                            }
                            // Until WouldBlock, which clears the socket's
                            // readiness, or the batch limit.
                            tries += n;
                        }
                    }
                }
                Some(event) = self.media_events.recv() => {
                    self.core.handle_media_event(Instant::now(), event);
                }
                _ = sleep_until(deadline) => {
                    self.core.handle_timeout(Instant::now());
                }
                changed = directory_changed(&mut self.directory) => {
                    match changed {
                        Some(dir) => {
                            tracing::info!(extensions = dir.len(), "extensions reloaded");
                            self.core.set_directory(Instant::now(), dir);
                        }
                        None => self.directory = None,
                    }
                }
                _ = reaper.tick() => {
                    self.reap_idle(&mut conns);
                    if let Ok(unix) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
                        self.core.set_wall_clock(Instant::now(), unix);
                    }
                }
            }
            self.flush(&mut conns, udp.as_deref(), udp_local).await;
        }
        // Calls end with Parley: BYEs out, history rows written. Then the
        // last store writes go out before the writer stops.
        self.core.shut_down_calls(Instant::now());
        self.flush(&mut conns, udp.as_deref(), udp_local).await;
    }

    fn handle_inbound(&mut self, now: Instant, item: Inbound, conns: &mut HashMap<ConnId, Conn>) {
        match item {
            Inbound::Opened {
                flow,
                handle,
                tls_version,
            } => {
                if let Some(v) = tls_version {
                    self.core.set_tls_version(flow.conn, v);
                }
                conns.insert(
                    flow.conn,
                    Conn {
                        handle,
                        flow,
                        pinned: false,
                    },
                );
            }
            Inbound::Message { flow, bytes } => {
                if let Some(c) = conns.get(&flow.conn) {
                    c.handle.handled();
                }
                self.core.handle_message(now, flow, bytes)
            }
            Inbound::FramingError { flow, head, error } => {
                self.core.handle_stream_error(flow, &head, error)
            }
            Inbound::Closed { flow } => {
                conns.remove(&flow.conn);
                self.core.handle_flow_closed(now, flow);
            }
        }
    }

    /// Carries out everything the core asked for.
    async fn flush(
        &mut self,
        conns: &mut HashMap<ConnId, Conn>,
        udp: Option<&UdpSocket>,
        udp_local: Option<SocketAddr>,
    ) {
        let mut datagrams = std::mem::take(&mut self.datagrams);
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Transmit(t) => match t.flow.transport {
                    Transport::Udp => {
                        let Some(bound) = udp_local else { continue };
                        let same_socket = t.flow.local.port() == bound.port()
                            && (bound.ip().is_unspecified() || t.flow.local.ip() == bound.ip());
                        if !same_socket {
                            tracing::debug!(flow = %t.flow, "UDP flow on a socket no longer open; sending from the current one");
                        }
                        // On a socket bound to all addresses the flow's own
                        // address is the source; one bound to a single
                        // address has no other.
                        let from = (same_socket
                            && bound.ip().is_unspecified()
                            && !t.flow.local.ip().is_unspecified())
                        .then_some(t.flow.local.ip());
                        datagrams.push(udp_batch::Datagram {
                            bytes: t.bytes,
                            to: t.flow.remote,
                            from,
                        });
                    }
                    Transport::Tcp | Transport::Tls => {
                        let Some(conn) = conns.get(&t.flow.conn) else {
                            tracing::debug!(flow = %t.flow, "connection gone; message dropped");
                            continue;
                        };
                        if !conn.handle.send(t.bytes) {
                            tracing::warn!(flow = %t.flow, "peer is not reading; closing the connection");
                            conn.handle.close();
                            conns.remove(&t.flow.conn);
                        }
                    }
                },
                Output::Event(e) => {
                    // Nobody listening is fine.
                    let _ = self.events.send(e);
                }
                Output::Store(op) => {
                    if self.store.try_send(op).is_err() {
                        tracing::warn!(
                            "store writer is behind; a binding update was dropped and will be written at the next refresh"
                        );
                    }
                }
                Output::CallEnded(record) => {
                    if self.store.try_send(StoreOp::Call(record)).is_err() {
                        tracing::error!("store writer is behind; a call record was dropped");
                    }
                }
                Output::Pin { conn, pinned } => {
                    if let Some(c) = conns.get_mut(&conn) {
                        c.pinned = pinned;
                    }
                }
            }
        }
        if let Some(sock) = udp {
            let dropped = udp_batch::send_all(sock, &datagrams).await;
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    "UDP send buffer full; datagrams dropped (SIP retransmits)"
                );
            }
        }
        datagrams.clear();
        self.datagrams = datagrams;
    }

    /// Closes connections that carry no registration and have been quiet
    /// for the idle timeout. A registered connection is never closed here.
    fn reap_idle(&mut self, conns: &mut HashMap<ConnId, Conn>) {
        let now = uptime_millis();
        let limit = self.idle_timeout.as_millis() as u64;
        conns.retain(|_, c| {
            let idle = now.saturating_sub(c.handle.last_activity());
            let keep = c.pinned || idle < limit;
            if !keep {
                tracing::debug!(flow = %c.flow, idle_ms = idle, "closing idle connection");
                c.handle.close();
            }
            keep
        });
    }
}

/// The next extension set, or `None` when the watcher is gone.
async fn directory_changed(rx: &mut Option<watch::Receiver<Directory>>) -> Option<Directory> {
    match rx {
        Some(r) => match r.changed().await {
            Ok(()) => Some(r.borrow_and_update().clone()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

async fn readable(sock: Option<&UdpSocket>) -> io::Result<()> {
    match sock {
        Some(s) => s.readable().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
