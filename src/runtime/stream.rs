//! TCP and TLS connections: accept, frame, pass messages to the driver,
//! write what the driver sends back, answer CRLF keep-alive pings.
//!
//! One task per connection, built to cost little while idle (most phones
//! are idle most of the time): it waits for the socket to become readable
//! without holding a read buffer, reads into a buffer that is released as
//! soon as it is drained, and takes outbound messages from a queue that
//! allocates nothing while empty.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;

use super::driver::Inbound;
use super::uptime_millis;
use crate::sip::stream::{Frame, StreamFramer};
use crate::sip::transport::{Flow, Transport};

/// Outbound messages queued per connection before it counts as stuck.
pub const OUTBOUND_QUEUE: usize = 64;
/// Requests a connection may have handed to the driver and not yet seen
/// handled. A peer that pipelines (a trunk, a proxy carrying many phones)
/// is read no further until the driver catches up, so its answers never
/// pile up past [`OUTBOUND_QUEUE`] while it is still sending.
const MAX_IN_FLIGHT: usize = 16;
/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one write may block before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Room made in the read buffer before each read.
const READ_RESERVE: usize = 4096;
/// Most bytes read ahead of the framer: one largest message and a read's
/// worth more. A peer that pipelines faster than Parley answers waits in
/// the kernel's buffer (TCP flow control), not in Parley's memory.
const MAX_READ_AHEAD: usize = crate::sip::message::limits::MAX_MESSAGE_BYTES + READ_RESERVE;
const UNFRAMEABLE: &str = "unframeable data";

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// What the driver and a connection task share.
#[derive(Debug)]
pub struct ConnShared {
    queue: Mutex<VecDeque<Bytes>>,
    notify: Notify,
    closed: AtomicBool,
    /// Last time the connection received anything, in `uptime_millis`.
    activity: AtomicU64,
    /// Messages handed to the driver and not yet handled by it.
    in_flight: AtomicUsize,
}

impl ConnShared {
    fn new() -> ConnShared {
        ConnShared {
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            activity: AtomicU64::new(uptime_millis()),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Queues a message; false when the peer is not reading fast enough.
    pub fn send(&self, bytes: Bytes) -> bool {
        let mut q = self.queue.lock().expect("queue lock");
        if q.len() >= OUTBOUND_QUEUE {
            return false;
        }
        q.push_back(bytes);
        drop(q);
        self.notify.notify_one();
        true
    }

    /// The driver has handled one message from this connection.
    pub fn handled(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == MAX_IN_FLIGHT {
            // The connection task may be waiting to hand over the next one.
            self.notify.notify_one();
        }
    }

    /// Asks the connection task to close the connection.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    pub fn last_activity(&self) -> u64 {
        self.activity.load(Ordering::Relaxed)
    }

    fn is_empty(&self) -> bool {
        self.queue.lock().expect("queue lock").is_empty()
    }

    fn pop(&self) -> Option<Bytes> {
        let mut q = self.queue.lock().expect("queue lock");
        let b = q.pop_front();
        if q.is_empty() && q.capacity() > 8 {
            *q = VecDeque::new();
        }
        b
    }
}

/// How many TCP/TLS connections may be open: in all, and from one source
/// (an IPv4 address, or an IPv6 /64, which one host usually has whole).
/// The per-source bound keeps one host from taking every slot, while an
/// office of phones behind one NAT still fits.
pub struct ConnLimits {
    total: Arc<Semaphore>,
    per_source: usize,
    by_source: Mutex<HashMap<IpAddr, usize>>,
}

/// A connection's place in [`ConnLimits`], given back when it ends.
pub struct ConnPermit {
    limits: Arc<ConnLimits>,
    source: IpAddr,
    _total: OwnedSemaphorePermit,
}

impl ConnLimits {
    pub fn new(total: usize, per_source: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            total: Arc::new(Semaphore::new(total)),
            per_source,
            by_source: Mutex::new(HashMap::new()),
        })
    }

    /// A place for a connection from `ip`, if one is free.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnPermit> {
        let source = crate::pbx::lockout::source_key(ip);
        let mut counts = self.by_source.lock().expect("source counts");
        let count = counts.entry(source).or_insert(0);
        if *count >= self.per_source {
            return None;
        }
        let total = self.total.clone().try_acquire_owned().ok()?;
        *count += 1;
        Some(ConnPermit {
            limits: self.clone(),
            source,
            _total: total,
        })
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut counts = self.limits.by_source.lock().expect("source counts");
        if let Some(count) = counts.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

/// Accepts connections until the process ends. `tls` is `None` for TCP.
pub async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    tls: Option<TlsAcceptor>,
    inbound: mpsc::Sender<Inbound>,
    limits: Arc<ConnLimits>,
    keepalive: Duration,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("listener has no address: {e}");
            return;
        }
    };
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(%local, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(permit) = limits.admit(remote.ip()) else {
            tracing::warn!(%remote, "connection limit reached (in all or from this source); refusing connection");
            drop(tcp);
            continue;
        };
        tune(&tcp, keepalive);
        let inbound = inbound.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
            // The connection's own local address, not the listener's: with
            // a listener on all addresses, it is the one the phone reached.
            let here = tcp.local_addr().unwrap_or(local);
            let flow = Flow::stream(transport, here, remote, conn);
            match tls {
                None => run(Plain(tcp), flow, None, inbound).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let version = match stream.get_ref().1.protocol_version() {
                                Some(rustls::ProtocolVersion::TLSv1_3) => Some("TLSv1.3"),
                                Some(rustls::ProtocolVersion::TLSv1_2) => Some("TLSv1.2"),
                                _ => None,
                            };
                            run(Tls(stream), flow, version, inbound).await
                        }
                        Ok(Err(e)) => tracing::debug!(%remote, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
}

/// Unanswered TCP keep-alive probes after which a connection is dead.
const KEEPALIVE_PROBES: u32 = 3;

/// Kernel send buffer of a TCP/TLS connection. A phone's answers are a few
/// kB; a fixed size (instead of autotuning up to megabytes) bounds the
/// kernel memory a peer that does not read can pin, and lets the write
/// timeout find that peer sooner.
const STREAM_SEND_BUFFER: usize = 64 << 10;

fn tune(tcp: &TcpStream, keepalive: Duration) {
    // SIP messages are small and latency matters more than packing.
    let _ = tcp.set_nodelay(true);
    let _ = SockRef::from(tcp).set_send_buffer_size(STREAM_SEND_BUFFER);
    if keepalive.is_zero() {
        return;
    }
    // Probes on a quiet connection keep the phone's NAT mapping open, and
    // a phone that stops answering them is found and its connection (with
    // its registrations) closed.
    let interval = (keepalive / 5).max(Duration::from_secs(1));
    let ka = TcpKeepalive::new()
        .with_time(keepalive)
        .with_interval(interval)
        .with_retries(KEEPALIVE_PROBES);
    let _ = SockRef::from(tcp).set_tcp_keepalive(&ka);
    // Linux stops keep-alive probes while sent data waits for its ACK: a
    // phone whose NAT dropped the connection just as Parley sent it an
    // INVITE would hold its binding for the retransmission limit (about
    // 15 minutes), every call to it lost. Unacknowledged data gives up as
    // soon as probes would have.
    let _ = SockRef::from(tcp).set_tcp_user_timeout(Some(keepalive + interval * KEEPALIVE_PROBES));
}

/// A byte stream whose socket can be waited on without reading.
trait Conn: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
}

struct Plain(TcpStream);
struct Tls(tokio_rustls::server::TlsStream<TcpStream>);

impl Conn for Plain {
    fn tcp(&self) -> &TcpStream {
        &self.0
    }
}

impl Conn for Tls {
    fn tcp(&self) -> &TcpStream {
        self.0.get_ref().0
    }
}

macro_rules! delegate_io {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.0).poll_read(cx, buf)
            }
        }
        impl AsyncWrite for $t {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.0).poll_write(cx, buf)
            }
            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.0).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.0).poll_shutdown(cx)
            }
        }
    };
}
delegate_io!(Plain);
delegate_io!(Tls);

/// What one non-blocking read attempt found.
enum ReadOutcome {
    Data,
    Closed,
    Empty,
}

/// Reads whatever is available now into `pending`, without waiting, up
/// to [`MAX_READ_AHEAD`] bytes held.
fn read_available<C: Conn>(conn: &mut C, pending: &mut BytesMut) -> io::Result<ReadOutcome> {
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut got = false;
    loop {
        let room = MAX_READ_AHEAD.saturating_sub(pending.len());
        if room == 0 {
            // More may wait: the caller frames this and reads again.
            return Ok(ReadOutcome::Data);
        }
        pending.reserve(READ_RESERVE.min(room));
        let spare = pending.spare_capacity_mut();
        let take = spare.len().min(room);
        let mut buf = ReadBuf::uninit(&mut spare[..take]);
        match Pin::new(&mut *conn).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                if n == 0 {
                    return Ok(if got {
                        ReadOutcome::Data
                    } else {
                        ReadOutcome::Closed
                    });
                }
                // SAFETY: `poll_read` initialised the first `n` spare bytes.
                unsafe { pending.set_len(pending.len() + n) };
                got = true;
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => {
                return Ok(if got {
                    ReadOutcome::Data
                } else {
                    ReadOutcome::Empty
                });
            }
        }
    }
}

/// Serves one established connection until either side closes it.
async fn run<C: Conn>(
    mut conn: C,
    flow: Flow,
    tls_version: Option<&'static str>,
    inbound: mpsc::Sender<Inbound>,
) {
    let shared = Arc::new(ConnShared::new());
    if inbound
        .send(Inbound::Opened {
            flow,
            handle: shared.clone(),
            tls_version,
        })
        .await
        .is_err()
    {
        return;
    }
    let mut framer = StreamFramer::new();
    let mut pending = BytesMut::new();
    let reason = loop {
        // Whatever is readable now (a TLS layer may hold decrypted bytes
        // the socket no longer shows), then the frames in it.
        let read = match read_available(&mut conn, &mut pending) {
            Ok(ReadOutcome::Data) => {
                if let Err(why) = drain_frames(
                    &mut framer,
                    &mut pending,
                    flow,
                    &inbound,
                    &shared,
                    &mut conn,
                )
                .await
                {
                    break why;
                }
                true
            }
            Ok(ReadOutcome::Closed) => break "closed by peer",
            Err(_) => break "read error",
            Ok(ReadOutcome::Empty) => false,
        };
        // Send what the driver queued, after every read too: a peer that
        // pipelines requests must get answers while it is still sending.
        if let Err(why) = send_queued(&shared, &mut conn).await {
            break why;
        }
        if shared.closed.load(Ordering::Acquire) {
            break "closed by server";
        }
        if pending.is_empty() {
            // Release the buffer; an idle connection holds none.
            pending = BytesMut::new();
        }
        if read {
            continue;
        }
        tokio::select! {
            r = conn.tcp().readable() => {
                if r.is_err() {
                    break "read error";
                }
            }
            _ = shared.notify.notified() => {}
        }
    };
    tracing::debug!(%flow, reason, "connection ended");
    if reason == UNFRAMEABLE {
        // Give the driver a moment to queue its 400 before closing (a
        // wake-up left over from an earlier message does not count).
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while shared.is_empty() {
                shared.notify.notified().await;
            }
        })
        .await;
        let _ = send_queued(&shared, &mut conn).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.shutdown()).await;
    let _ = inbound.send(Inbound::Closed { flow }).await;
}

/// Writes out everything queued for the connection.
async fn send_queued<C: Conn>(shared: &ConnShared, conn: &mut C) -> Result<(), &'static str> {
    while let Some(bytes) = shared.pop() {
        write_timed(conn, &bytes).await?;
    }
    Ok(())
}

/// Writes and flushes `bytes`, or fails when the peer has not taken them
/// within [`WRITE_TIMEOUT`]: a peer that stops reading must not hold its
/// connection (and the slot it takes) forever. Both steps are timed
/// because over TLS the write only hands the bytes to the TLS layer, and
/// the flush is what waits for the socket.
async fn write_timed<W: AsyncWrite + Unpin>(wr: &mut W, bytes: &[u8]) -> Result<(), &'static str> {
    let write = async {
        wr.write_all(bytes).await?;
        wr.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        _ => Err("write failed"),
    }
}

async fn drain_frames<C: Conn>(
    framer: &mut StreamFramer,
    pending: &mut BytesMut,
    flow: Flow,
    inbound: &mpsc::Sender<Inbound>,
    shared: &ConnShared,
    conn: &mut C,
) -> Result<(), &'static str> {
    loop {
        match framer.next_frame(pending) {
            Ok(Some(Frame::Message(bytes))) => {
                // Only a whole message counts as activity: a peer that
                // only pings, or trickles bytes that never make a message,
                // is reaped once idle unless a registration pins it.
                shared.activity.store(uptime_millis(), Ordering::Relaxed);
                // A copy of its own: the core may keep a message for a
                // call's whole life, and a view would keep the whole read
                // buffer it came in alive with it.
                let bytes = Bytes::copy_from_slice(&bytes);
                while shared.in_flight.load(Ordering::Acquire) >= MAX_IN_FLIGHT {
                    send_queued(shared, conn).await?;
                    if shared.closed.load(Ordering::Acquire) {
                        return Err("closed by server");
                    }
                    shared.notify.notified().await;
                }
                shared.in_flight.fetch_add(1, Ordering::AcqRel);
                inbound
                    .send(Inbound::Message { flow, bytes })
                    .await
                    .map_err(|_| "server stopping")?;
                // Answers to earlier requests go out between requests.
                send_queued(shared, conn).await?;
            }
            // RFC 5626 §3.5.1: a double CRLF gets a single CRLF back.
            Ok(Some(Frame::Ping)) => write_timed(conn, b"\r\n").await?,
            Ok(Some(Frame::Pong)) => {}
            Ok(None) => return Ok(()),
            Err(e) => {
                let _ = inbound
                    .send(Inbound::FramingError {
                        flow,
                        head: e.head,
                        error: e.kind,
                    })
                    .await;
                return Err(UNFRAMEABLE);
            }
        }
    }
}

/// The address a listener really bound (port 0 resolved).
pub fn bound(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection Parley accepts probes a quiet peer, and gives up on
    /// unacknowledged data as soon as those probes would have.
    #[tokio::test]
    async fn accepted_connections_give_up_on_a_silent_peer_in_time() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        tune(&server, Duration::from_secs(25));
        let sock = SockRef::from(&server);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(25));
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(25 + 5 * 3))
        );
    }

    /// One source (an IPv4 address, an IPv6 /64) gets at most its share
    /// of connections, others still get in, and a closed connection gives
    /// its place back.
    #[test]
    fn connections_are_limited_per_source_and_in_all() {
        let limits = ConnLimits::new(5, 2);
        let v4: IpAddr = "203.0.113.5".parse().unwrap();
        let a = limits.admit(v4).unwrap();
        let _b = limits.admit(v4).unwrap();
        assert!(limits.admit(v4).is_none(), "a third from one address");
        // The same host through an IPv4-mapped address counts the same.
        assert!(
            limits
                .admit("::ffff:203.0.113.5".parse().unwrap())
                .is_none()
        );
        // Another address of the same IPv6 /64 counts with the first.
        let _c = limits.admit("2001:db8:1:2::10".parse().unwrap()).unwrap();
        let _d = limits.admit("2001:db8:1:2::99".parse().unwrap()).unwrap();
        assert!(
            limits
                .admit("2001:db8:1:2:ffff::1".parse().unwrap())
                .is_none()
        );
        let _e = limits.admit("198.51.100.1".parse().unwrap()).unwrap();
        // Five in all: nobody else gets in.
        assert!(limits.admit("198.51.100.2".parse().unwrap()).is_none());
        drop(a);
        assert!(limits.admit(v4).is_some(), "a place given back");
    }

    /// A peer that sends far more than Parley has framed is read only so
    /// far ahead; the rest waits in the kernel.
    #[tokio::test]
    async fn reading_stops_a_message_ahead_of_the_framer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let burst = vec![b'x'; 1 << 20];
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&burst).await;
            client
        });
        let mut conn = Plain(server);
        let mut pending = BytesMut::new();
        let mut reads = 0;
        while pending.len() < MAX_READ_AHEAD && reads < 1000 {
            conn.tcp().readable().await.unwrap();
            let _ = read_available(&mut conn, &mut pending).unwrap();
            reads += 1;
        }
        assert_eq!(pending.len(), MAX_READ_AHEAD);
        // Full: a further read takes nothing.
        let held = pending.len();
        let _ = read_available(&mut conn, &mut pending).unwrap();
        assert_eq!(pending.len(), held);
        writer.abort();
    }
}
