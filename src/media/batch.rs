//! Many datagrams per system call on the shared media port: `recvmmsg`
//! fills a batch of buffers, the relay rewrites each packet in place, and
//! `sendmmsg` sends those bound for the shared port from where they lie.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use socket2::{SockAddr, SockAddrStorage};

/// Datagrams taken per `recvmmsg` (and so sent per `sendmmsg` at most).
pub(crate) const BATCH: usize = 32;

/// One packet buffer: a datagram plus the largest SRTP/SRTCP trailer.
pub(crate) type PacketBuf = [u8; super::relay::BUF_LEN];

/// Receive buffers and what the kernel said about each datagram.
pub(crate) struct Batch {
    pub(crate) bufs: Box<[PacketBuf; BATCH]>,
    lens: [usize; BATCH],
    names: [libc::sockaddr_storage; BATCH],
    name_lens: [libc::socklen_t; BATCH],
}

impl Batch {
    pub(crate) fn new() -> Self {
        Batch {
            bufs: Box::new([[0; super::relay::BUF_LEN]; BATCH]),
            lens: [0; BATCH],
            // SAFETY: an all-zero sockaddr_storage is a valid (unspecified)
            // address.
            names: [unsafe { std::mem::zeroed() }; BATCH],
            name_lens: [0; BATCH],
        }
    }

    /// Reads up to [`BATCH`] datagrams of at most `max_len` bytes each
    /// (longer ones are cut to `max_len + 1`, so they show as too long)
    /// without waiting. Returns how many; 0 when none is queued.
    pub(crate) fn recv(&mut self, fd: RawFd, max_len: usize) -> usize {
        let slot_len = (max_len + 1).min(super::relay::BUF_LEN);
        let bufs = self.bufs.as_mut_ptr();
        let mut iovs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            // SAFETY: `bufs` has BATCH buffers.
            iov_base: unsafe { bufs.add(i) }.cast(),
            iov_len: slot_len,
        });
        let mut msgs = recv_headers(&mut iovs, &mut self.names);
        // SAFETY: every header points at a live name and buffer of the stated
        // sizes, all of which outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            // WouldBlock, or an ICMP error a previous send caused: nothing
            // to relay either way.
            return 0;
        }
        let n = n as usize;
        for (i, m) in msgs.iter().take(n).enumerate() {
            self.lens[i] = (m.msg_len as usize).min(slot_len);
            self.name_lens[i] = m.msg_hdr.msg_namelen;
        }
        n
    }

    /// The length of datagram `i` of the last batch.
    pub(crate) fn len(&self, i: usize) -> usize {
        self.lens[i]
    }

    /// Where datagram `i` of the last batch came from.
    pub(crate) fn source(&self, i: usize) -> Option<SocketAddr> {
        sender(&self.names[i], self.name_lens[i])
    }
}

/// The sender's address `recvmmsg` wrote into `name` (`len` bytes of it).
pub(crate) fn sender(name: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let mut storage = SockAddrStorage::zeroed();
    // SAFETY: both storages are a `sockaddr_storage`; the kernel wrote `len`
    // bytes of an address into `name`, and never more than it holds.
    unsafe {
        *storage.view_as::<libc::sockaddr_storage>() = *name;
        SockAddr::new(storage, len)
    }
    .as_socket()
}

/// `recvmmsg` headers, one per buffer in `iovs`, each with room for the
/// sender's address in `names`. They point into both arrays: use them
/// before either moves.
pub(crate) fn recv_headers<const N: usize>(
    iovs: &mut [libc::iovec; N],
    names: &mut [libc::sockaddr_storage; N],
) -> [libc::mmsghdr; N] {
    std::array::from_fn(|i| {
        // SAFETY: an all-zero msghdr is a valid empty message header.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        hdr.msg_iov = &mut iovs[i];
        hdr.msg_iovlen = 1;
        libc::mmsghdr {
            msg_hdr: hdr,
            msg_len: 0,
        }
    })
}

/// A `sendmmsg` header for one datagram: the bytes `iov` points at, to
/// `to`. It points at both: use it before either moves.
pub(crate) fn send_header(iov: &mut libc::iovec, to: &SockAddr) -> libc::mmsghdr {
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_name = to.as_ptr() as *mut libc::c_void;
    hdr.msg_namelen = to.len();
    hdr.msg_iov = iov;
    hdr.msg_iovlen = 1;
    libc::mmsghdr {
        msg_hdr: hdr,
        msg_len: 0,
    }
}

/// Packets waiting to leave one shared socket: which batch buffer, how
/// many bytes, to where, and for which leg (to count a failed send).
pub(crate) struct Outbox {
    items: Vec<(usize, usize, SockAddr, usize)>,
}

impl Outbox {
    pub(crate) fn new() -> Self {
        Outbox {
            items: Vec::with_capacity(BATCH),
        }
    }

    /// Queues buffer `buf` of the current batch; never grows past
    /// [`BATCH`], one entry per received datagram.
    pub(crate) fn push(&mut self, buf: usize, len: usize, to: SocketAddr, slot: usize) {
        debug_assert!(self.items.len() < BATCH);
        self.items.push((buf, len, SockAddr::from(to), slot));
    }

    /// Sends everything queued with as few `sendmmsg` calls as the kernel
    /// allows; calls `failed` with the leg slot of each datagram it refused.
    pub(crate) fn flush(
        &mut self,
        fd: RawFd,
        bufs: &[PacketBuf; BATCH],
        mut failed: impl FnMut(usize),
    ) {
        let count = self.items.len();
        if count == 0 {
            return;
        }
        let mut iovs: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: an all-zero mmsghdr is a valid empty message header.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, (buf, len, to, _)) in self.items.iter().enumerate() {
            iovs[i] = libc::iovec {
                iov_base: bufs[*buf].as_ptr() as *mut libc::c_void,
                iov_len: *len,
            };
            msgs[i] = send_header(&mut iovs[i], to);
        }
        let mut sent = 0;
        while sent < count {
            // SAFETY: headers `sent..count` point at live addresses in
            // `items` and at buffers in `bufs`, which the kernel only reads.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    msgs[sent..count].as_mut_ptr(),
                    (count - sent) as libc::c_uint,
                    0,
                )
            };
            if n > 0 {
                sent += n as usize;
            } else {
                // The first unsent datagram was refused (or the socket is
                // full): drop it, as UDP would, and go on with the rest.
                let err = io::Error::last_os_error();
                tracing::trace!(error = %err, "media send refused");
                failed(self.items[sent].3);
                sent += 1;
            }
        }
        self.items.clear();
    }
}
