//! Sending and receiving many UDP datagrams with one system call
//! (`sendmmsg`, `recvmmsg`), so a busy registrar pays the kernel entry once
//! per batch, not once per datagram.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use bytes::Bytes;
use socket2::SockAddr;
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::media::{
    PktInfoSpace, expect_pktinfo, received_on, recv_headers, send_from, send_header, send_one,
    sender,
};
use crate::sip::message::limits::MAX_MESSAGE_BYTES;

/// Most datagrams handed to the kernel in one call.
const BATCH: usize = 64;
/// Most datagrams taken from the kernel in one call. Each has a buffer
/// for the largest message, so the batch is smaller than the send batch;
/// pages a datagram never reaches are never touched.
pub const RECV_BATCH: usize = 16;
/// A receive buffer: one byte more than the largest message, so an
/// oversized datagram shows as too long instead of silently cut.
const RECV_SLOT: usize = MAX_MESSAGE_BYTES + 1;

/// How long sending waits, in all, for socket space when the kernel's
/// send buffer is full (a saturated uplink). The caller is the one task
/// that runs all signaling, so it must not wait on one socket for long.
const MAX_SEND_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// One datagram to send: its bytes, where to, and the local address to
/// send from when the socket is bound to all of them (the address the
/// peer reached Parley at); `None` lets the routing table choose.
pub struct Datagram {
    pub bytes: Bytes,
    pub to: SocketAddr,
    pub from: Option<IpAddr>,
}

/// Sends every datagram, waiting up to [`MAX_SEND_WAIT`] for socket space
/// when the kernel's send buffer is full; what still does not fit is
/// dropped and counted in the return value. Datagrams the kernel refuses
/// (an unreachable address, say) are dropped with a debug log: UDP is best
/// effort, and SIP retransmits. One refused because of its source address
/// (no longer on this host, after a restart) goes again from where the
/// routing table says.
pub async fn send_all(sock: &UdpSocket, items: &[Datagram]) -> usize {
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + MAX_SEND_WAIT;
    while sent < items.len() {
        let chunk = &items[sent..items.len().min(sent + BATCH)];
        match sock.try_io(Interest::WRITABLE, || send_batch(sock, chunk)) {
            Ok(n) => sent += n.max(1),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match tokio::time::timeout_at(deadline, sock.writable()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => return items.len() - sent,
                }
            }
            Err(e) => {
                let first = &chunk[0];
                let again = first.from.is_some()
                    && crate::media::maybe_source_refused(&e)
                    && sock
                        .try_io(Interest::WRITABLE, || {
                            send_one(sock.as_raw_fd(), &first.bytes, &first.to, None)
                        })
                        .is_ok();
                if again {
                    tracing::debug!(to = %first.to, from = ?first.from, "UDP send from that address refused ({e}); sent from the routed one");
                } else {
                    tracing::debug!(to = %first.to, "UDP send failed: {e}");
                }
                // Skip the datagram the kernel refused and go on.
                sent += 1;
            }
        }
    }
    0
}

/// One `sendmmsg` call, each datagram from its own source address where
/// it has one; returns how many datagrams the kernel took.
fn send_batch(sock: &UdpSocket, items: &[Datagram]) -> io::Result<usize> {
    let addrs: Vec<SockAddr> = items.iter().map(|d| SockAddr::from(d.to)).collect();
    let mut iovs: Vec<libc::iovec> = items
        .iter()
        .map(|d| libc::iovec {
            iov_base: d.bytes.as_ptr() as *mut libc::c_void,
            iov_len: d.bytes.len(),
        })
        .collect();
    let mut controls = vec![PktInfoSpace::new(); items.len()];
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .zip(&addrs)
        .map(|(iov, addr)| send_header(iov, addr))
        .collect();
    for ((msg, space), d) in msgs.iter_mut().zip(controls.iter_mut()).zip(items) {
        if let Some(from) = d.from {
            send_from(&mut msg.msg_hdr, space, from, &d.to);
        }
    }
    // SAFETY: every pointer in `msgs` refers to `addrs`, `iovs`, `controls`
    // or the datagrams in `items`, all alive and unmoved for the whole
    // call; the kernel only reads them (and writes `msg_len`).
    let n = unsafe {
        libc::sendmmsg(
            sock.as_raw_fd(),
            msgs.as_mut_ptr(),
            msgs.len() as libc::c_uint,
            0,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Where `recv_batch` puts what it read; kept and reused by its owner.
pub struct RecvBuffers {
    data: Vec<u8>,
    names: [libc::sockaddr_storage; RECV_BATCH],
    name_lens: [libc::socklen_t; RECV_BATCH],
    lens: [usize; RECV_BATCH],
    controls: [PktInfoSpace; RECV_BATCH],
    locals: [Option<IpAddr>; RECV_BATCH],
}

impl RecvBuffers {
    pub fn new() -> Self {
        RecvBuffers {
            data: vec![0; RECV_BATCH * RECV_SLOT],
            // SAFETY: an all-zero sockaddr_storage is a valid (unspecified)
            // address.
            names: [unsafe { std::mem::zeroed() }; RECV_BATCH],
            name_lens: [0; RECV_BATCH],
            lens: [0; RECV_BATCH],
            controls: [PktInfoSpace::new(); RECV_BATCH],
            locals: [None; RECV_BATCH],
        }
    }

    /// Datagram `i` of the last batch: its bytes (longer than
    /// `MAX_MESSAGE_BYTES` when it was too large), where it came from, and
    /// the local address it was sent to when the socket reports it (see
    /// `enable_pktinfo`).
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>, Option<IpAddr>) {
        let start = i * RECV_SLOT;
        let from = sender(&self.names[i], self.name_lens[i]);
        (
            &self.data[start..start + self.lens[i]],
            from,
            self.locals[i],
        )
    }
}

/// Reads up to [`RECV_BATCH`] datagrams without waiting: how many it read
/// (at least one), or `WouldBlock` when none is queued, which also clears
/// the socket's readiness so the next `readable()` waits.
pub fn recv_batch(sock: &UdpSocket, bufs: &mut RecvBuffers) -> io::Result<usize> {
    sock.try_io(Interest::READABLE, || recv_mmsg(sock, bufs))
}

fn recv_mmsg(sock: &UdpSocket, bufs: &mut RecvBuffers) -> io::Result<usize> {
    let mut iovs: [libc::iovec; RECV_BATCH] = std::array::from_fn(|i| libc::iovec {
        // SAFETY: slot i lies inside `data` (RECV_BATCH slots long).
        iov_base: unsafe { bufs.data.as_mut_ptr().add(i * RECV_SLOT) } as *mut libc::c_void,
        iov_len: RECV_SLOT,
    });
    let mut msgs = recv_headers(&mut iovs, &mut bufs.names);
    for (m, space) in msgs.iter_mut().zip(bufs.controls.iter_mut()) {
        expect_pktinfo(&mut m.msg_hdr, space);
    }
    // SAFETY: every header points at a live name and buffer of the stated
    // sizes in `bufs` and `iovs`, which outlive the call.
    let n = unsafe {
        libc::recvmmsg(
            sock.as_raw_fd(),
            msgs.as_mut_ptr(),
            RECV_BATCH as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for (i, m) in msgs.iter().take(n).enumerate() {
        // A datagram longer than its buffer is cut to it; the one spare
        // byte makes it longer than MAX_MESSAGE_BYTES all the same.
        bufs.lens[i] = (m.msg_len as usize).min(RECV_SLOT);
        bufs.name_lens[i] = m.msg_hdr.msg_namelen;
        bufs.locals[i] = received_on(&m.msg_hdr);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn many_datagrams_arrive_in_order() {
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rx6 = UdpSocket::bind("[::1]:0").await.ok();
        let to = rx.local_addr().unwrap();
        let items: Vec<Datagram> = (0..150)
            .map(|i| Datagram {
                bytes: Bytes::from(format!("datagram {i}")),
                to,
                from: None,
            })
            .collect();
        send_all(&tx, &items).await;
        let mut buf = [0u8; 64];
        for i in 0..150 {
            let (n, _) = rx.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], format!("datagram {i}").as_bytes());
        }
        // The same datagrams read back in batches, with their source.
        send_all(&tx, &items).await;
        let mut bufs = RecvBuffers::new();
        let mut got = Vec::new();
        while got.len() < items.len() {
            rx.readable().await.unwrap();
            match recv_batch(&rx, &mut bufs) {
                Ok(n) => {
                    assert!((1..=RECV_BATCH).contains(&n));
                    for i in 0..n {
                        let (data, from, local) = bufs.get(i);
                        assert_eq!(from, Some(tx.local_addr().unwrap()));
                        // Only a socket that asked for it learns this.
                        assert_eq!(local, None);
                        got.push(String::from_utf8(data.to_vec()).unwrap());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        let expected: Vec<String> = (0..150).map(|i| format!("datagram {i}")).collect();
        assert_eq!(got, expected);
        let empty = recv_batch(&rx, &mut bufs).unwrap_err();
        assert_eq!(empty.kind(), io::ErrorKind::WouldBlock);
        // An address of the wrong family is skipped, the rest still goes.
        if let Some(rx6) = rx6 {
            let mixed = vec![
                Datagram {
                    bytes: Bytes::from_static(b"lost"),
                    to: rx6.local_addr().unwrap(),
                    from: None,
                },
                Datagram {
                    bytes: Bytes::from_static(b"kept"),
                    to,
                    from: None,
                },
            ];
            send_all(&tx, &mixed).await;
            let (n, _) = rx.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"kept");
        }
    }

    #[tokio::test]
    async fn answers_leave_from_the_address_the_peer_reached() {
        for (wildcard, peer_ip, reached) in [
            ("0.0.0.0:0", "127.0.0.1", "127.0.0.2"),
            // A dual-stack socket, and IPv4 peers on it.
            ("[::]:0", "127.0.0.1", "127.0.0.3"),
            ("[::]:0", "::1", "::1"),
        ] {
            let (server, peer) = crate::media::tests::in_own_netns(move || {
                let server = crate::runtime::open_udp(wildcard.parse().unwrap()).unwrap();
                let peer = std::net::UdpSocket::bind((peer_ip, 0)).unwrap();
                (server, peer)
            });
            let server = UdpSocket::from_std(server).unwrap();
            let port = server.local_addr().unwrap().port();
            let reached: IpAddr = reached.parse().unwrap();
            peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            peer.send_to(b"hello", (reached, port)).unwrap();
            let mut bufs = RecvBuffers::new();
            server.readable().await.unwrap();
            assert_eq!(recv_batch(&server, &mut bufs).unwrap(), 1);
            let (data, from, local) = bufs.get(0);
            assert_eq!(data, b"hello");
            assert_eq!(local, Some(reached), "{wildcard} from {peer_ip}");
            let from = from.unwrap();
            let mut buf = [0u8; 64];
            // From the address reached, when asked; the routing table's
            // choice (the peer's own loopback address) otherwise.
            for (source, expected) in [
                (Some(reached), reached),
                (None, peer.local_addr().unwrap().ip()),
            ] {
                let items = [Datagram {
                    bytes: Bytes::from_static(b"answer"),
                    to: from,
                    from: source,
                }];
                assert_eq!(send_all(&server, &items).await, 0);
                let (n, answered_from) = peer.recv_from(&mut buf).unwrap();
                assert_eq!(&buf[..n], b"answer");
                assert_eq!(
                    answered_from,
                    SocketAddr::new(expected, port),
                    "{wildcard}: {source:?}"
                );
            }
            // A source this host does not have (a binding restored after
            // an address change): sent from the routed one instead.
            let gone: IpAddr = if peer_ip == "::1" {
                "2001:db8::1".parse().unwrap()
            } else {
                "192.0.2.1".parse().unwrap()
            };
            let items = [Datagram {
                bytes: Bytes::from_static(b"still"),
                to: from,
                from: Some(gone),
            }];
            assert_eq!(send_all(&server, &items).await, 0);
            let (n, answered_from) = peer.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"still");
            assert_eq!(answered_from.port(), port);
        }
    }
}
