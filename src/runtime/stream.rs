//! TCP and TLS connections: accept, frame, pass messages to the driver,
//! write what the driver sends back, answer CRLF keep-alive pings.
//!
//! One task per connection. It keeps no buffer while idle: a small fixed
//! read array, and a frame buffer that is released as soon as it is empty.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;

use super::driver::{ConnHandle, Inbound};
use super::uptime_millis;
use crate::sip::stream::{Frame, StreamFramer};
use crate::sip::transport::{Flow, Transport};

/// Outbound messages queued per connection before it counts as stuck.
pub const OUTBOUND_QUEUE: usize = 64;
/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one write may block before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read per system call.
const READ_CHUNK: usize = 2048;

const UNFRAMEABLE: &str = "unframeable data";

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Accepts connections until the process ends. `tls` is `None` for TCP.
pub async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    tls: Option<TlsAcceptor>,
    inbound: mpsc::Sender<Inbound>,
    limit: Arc<Semaphore>,
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
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "connection limit reached; refusing connection");
            drop(tcp);
            continue;
        };
        tune(&tcp);
        let inbound = inbound.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
            let flow = Flow::stream(transport, local, remote, conn);
            match tls {
                None => run(tcp, flow, inbound).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => run(stream, flow, inbound).await,
                        Ok(Err(e)) => tracing::debug!(%remote, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
}

fn tune(tcp: &TcpStream) {
    // SIP messages are small and latency matters more than packing.
    let _ = tcp.set_nodelay(true);
    // Keeps NAT mappings warm and finds dead peers on quiet connections.
    let ka = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    let _ = SockRef::from(tcp).set_tcp_keepalive(&ka);
}

/// Serves one established connection until either side closes it.
async fn run<S>(stream: S, flow: Flow, inbound: mpsc::Sender<Inbound>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(OUTBOUND_QUEUE);
    let activity = Arc::new(AtomicU64::new(uptime_millis()));
    let handle = ConnHandle {
        tx: out_tx,
        activity: activity.clone(),
    };
    if inbound
        .send(Inbound::Opened { flow, handle })
        .await
        .is_err()
    {
        return;
    }
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut framer = StreamFramer::new();
    let mut pending = BytesMut::new();
    let mut chunk = [0u8; READ_CHUNK];
    let reason = loop {
        tokio::select! {
            read = rd.read(&mut chunk) => {
                let n = match read {
                    Ok(0) => break "closed by peer",
                    Ok(n) => n,
                    Err(_) => break "read error",
                };
                activity.store(uptime_millis(), Ordering::Relaxed);
                pending.extend_from_slice(&chunk[..n]);
                match drain_frames(&mut framer, &mut pending, flow, &inbound, &mut wr).await {
                    Ok(()) => {}
                    Err(why) => break why,
                }
                if pending.is_empty() {
                    // Release the buffer; an idle connection holds none.
                    pending = BytesMut::new();
                }
            }
            out = out_rx.recv() => {
                let Some(bytes) = out else { break "closed by server" };
                match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&bytes)).await {
                    Ok(Ok(())) => {}
                    _ => break "write failed",
                }
                let _ = wr.flush().await;
            }
        }
    };
    tracing::debug!(%flow, reason, "connection ended");
    if reason == UNFRAMEABLE {
        // Give the driver a moment to send its 400 before closing.
        while let Ok(Some(bytes)) =
            tokio::time::timeout(Duration::from_millis(500), out_rx.recv()).await
        {
            if wr.write_all(&bytes).await.is_err() {
                break;
            }
            let _ = wr.flush().await;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    let _ = inbound.send(Inbound::Closed { flow }).await;
}

async fn drain_frames<W: AsyncWrite + Unpin>(
    framer: &mut StreamFramer,
    pending: &mut BytesMut,
    flow: Flow,
    inbound: &mpsc::Sender<Inbound>,
    wr: &mut W,
) -> Result<(), &'static str> {
    loop {
        match framer.next_frame(pending) {
            Ok(Some(Frame::Message(bytes))) => {
                inbound
                    .send(Inbound::Message { flow, bytes })
                    .await
                    .map_err(|_| "server stopping")?;
            }
            // RFC 5626 §3.5.1: a double CRLF gets a single CRLF back.
            Ok(Some(Frame::Ping)) => {
                wr.write_all(b"\r\n").await.map_err(|_| "write failed")?;
                let _ = wr.flush().await;
            }
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
