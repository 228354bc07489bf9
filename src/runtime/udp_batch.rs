//! Sending many UDP datagrams with one system call (`sendmmsg`), so a busy
//! registrar pays the kernel entry once per batch, not once per response.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use bytes::Bytes;
use socket2::SockAddr;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Most datagrams handed to the kernel in one call.
const BATCH: usize = 64;

/// Sends every datagram, waiting for socket space when the kernel's send
/// buffer is full. Datagrams the kernel refuses (an unreachable address,
/// say) are dropped with a debug log: UDP is best effort, and SIP
/// retransmits.
pub async fn send_all(sock: &UdpSocket, items: &[(Bytes, SocketAddr)]) {
    let mut sent = 0;
    while sent < items.len() {
        let chunk = &items[sent..items.len().min(sent + BATCH)];
        match sock.try_io(Interest::WRITABLE, || send_batch(sock, chunk)) {
            Ok(n) => sent += n.max(1),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if sock.writable().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(to = %chunk[0].1, "UDP send failed: {e}");
                // Skip the datagram the kernel refused and go on.
                sent += 1;
            }
        }
    }
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
    let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(items.len());
    for (i, addr) in addrs.iter().enumerate() {
        // SAFETY: an all-zero msghdr is a valid empty message header.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
        hdr.msg_namelen = addr.len();
        hdr.msg_iov = &mut iovs[i];
        hdr.msg_iovlen = 1;
        msgs.push(libc::mmsghdr {
            msg_hdr: hdr,
            msg_len: 0,
        });
    }
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
