//! Sending and receiving many UDP datagrams with one system call
//! (`sendmmsg`, `recvmmsg`), so a busy registrar pays the kernel entry once
//! per batch, not once per datagram.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use bytes::Bytes;
use socket2::SockAddr;
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::media::{recv_headers, send_header, sender};
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

/// Sends every datagram, waiting up to [`MAX_SEND_WAIT`] for socket space
/// when the kernel's send buffer is full; what still does not fit is
/// dropped and counted in the return value. Datagrams the kernel refuses
/// (an unreachable address, say) are dropped with a debug log: UDP is best
/// effort, and SIP retransmits.
pub async fn send_all(sock: &UdpSocket, items: &[(Bytes, SocketAddr)]) -> usize {
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
                tracing::debug!(to = %chunk[0].1, "UDP send failed: {e}");
                // Skip the datagram the kernel refused and go on.
                sent += 1;
            }
        }
    }
    0
}

/// One `sendmmsg` call; returns how many datagrams the kernel took.
fn send_batch(sock: &UdpSocket, items: &[(Bytes, SocketAddr)]) -> io::Result<usize> {
    let addrs: Vec<SockAddr> = items.iter().map(|(_, a)| SockAddr::from(*a)).collect();
    let mut iovs: Vec<libc::iovec> = items
        .iter()
        .map(|(b, _)| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .zip(&addrs)
        .map(|(iov, addr)| send_header(iov, addr))
        .collect();
    // SAFETY: every pointer in `msgs` refers to `addrs`, `iovs` or the
    // datagrams in `items`, all alive and unmoved for the whole call; the
    // kernel only reads them (and writes `msg_len`).
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
        }
    }

    /// Datagram `i` of the last batch: its bytes (longer than
    /// `MAX_MESSAGE_BYTES` when it was too large) and where it came from.
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        let start = i * RECV_SLOT;
        let from = sender(&self.names[i], self.name_lens[i]);
        (&self.data[start..start + self.lens[i]], from)
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
        let items: Vec<(Bytes, SocketAddr)> = (0..150)
            .map(|i| (Bytes::from(format!("datagram {i}")), to))
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
                        let (data, from) = bufs.get(i);
                        assert_eq!(from, Some(tx.local_addr().unwrap()));
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
                (Bytes::from_static(b"lost"), rx6.local_addr().unwrap()),
                (Bytes::from_static(b"kept"), to),
            ];
            send_all(&tx, &mixed).await;
            let (n, _) = rx.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"kept");
        }
    }
}
