//! Many datagrams per system call on the shared media port: `recvmmsg`
//! fills a batch of buffers, the relay rewrites each packet in place, and
//! `sendmmsg` sends those bound for the shared port from where they lie.

use std::io;
use std::net::{IpAddr, SocketAddr};
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

/// Room for the packet-info control messages of one datagram, aligned as
/// a `cmsghdr` must be: an IPv4 datagram on an IPv6 socket comes with both
/// kinds.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct PktInfoSpace([u8; PKTINFO_SPACE]);

/// `CMSG_SPACE` of an `in6_pktinfo` is 40 bytes, of an `in_pktinfo` 32.
const PKTINFO_SPACE: usize = 96;

impl PktInfoSpace {
    pub(crate) const fn new() -> Self {
        PktInfoSpace([0; PKTINFO_SPACE])
    }
}

/// Asks the kernel to tell, with every datagram received on `fd`, the
/// local address it was sent to. A socket bound to all addresses needs
/// it to answer from that address: on a host with several, the routing
/// table may pick another, which a phone or its NAT does not accept.
/// An IPv6 socket gets `IP_PKTINFO` too: for IPv4 datagrams, whose
/// `IPV6_PKTINFO` holds the header's destination (a broadcast, say) where
/// `IP_PKTINFO` also has the local unicast address.
pub(crate) fn enable_pktinfo(fd: RawFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int_option(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
    }
    set_int_option(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
}

/// `setsockopt` of an `int` option, for the ones `socket2` does not have.
pub(crate) fn set_int_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the caller's socket and a live c_int of the stated size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether a send refused with `e` may have been refused for the source
/// address it named: the host does not have it (IPv4 finds no route from
/// it, IPv6 calls it invalid). Other failures (a full buffer) are not.
pub(crate) fn maybe_source_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EADDRNOTAVAIL | libc::ENETUNREACH)
    )
}

/// Points a receive header at `space` for the datagram's packet info.
pub(crate) fn expect_pktinfo(hdr: &mut libc::msghdr, space: &mut PktInfoSpace) {
    hdr.msg_control = space.0.as_mut_ptr().cast();
    hdr.msg_controllen = PKTINFO_SPACE as _;
}

/// The local address a received datagram was sent to, from the packet
/// info in its header's control messages: for IPv4 the local unicast
/// address `IP_PKTINFO` names (also for a broadcast); for IPv6 the
/// destination, except a multicast one (no address to answer from) or a
/// link-local one (which needs its interface too). `None` without any.
/// An IPv4 address that reached an IPv6 socket comes back as IPv4.
// `msg_controllen` is a `size_t` on glibc and a `socklen_t` on musl.
#[allow(clippy::unnecessary_cast)]
pub(crate) fn received_on(hdr: &libc::msghdr) -> Option<IpAddr> {
    if hdr.msg_control.is_null()
        || (hdr.msg_controllen as usize) < std::mem::size_of::<libc::cmsghdr>()
    {
        return None;
    }
    let mut v6 = None;
    // SAFETY: the kernel filled `msg_controllen` bytes of control messages
    // in the buffer `msg_control` points at; the CMSG macros stay inside it.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/NXTHDR lies inside
        // the control buffer, with its data `cmsg_len` bytes long.
        let c = unsafe { &*cmsg };
        let data = unsafe { libc::CMSG_DATA(cmsg) };
        let holds = |size: usize| {
            // SAFETY: CMSG_LEN only computes a length.
            c.cmsg_len as usize >= unsafe { libc::CMSG_LEN(size as u32) } as usize
        };
        if c.cmsg_level == libc::IPPROTO_IP
            && c.cmsg_type == libc::IP_PKTINFO
            && holds(std::mem::size_of::<libc::in_pktinfo>())
        {
            // SAFETY: IP_PKTINFO data is an in_pktinfo, long enough
            // (checked), read unaligned.
            let info: libc::in_pktinfo = unsafe { std::ptr::read_unaligned(data.cast()) };
            return Some(IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(
                info.ipi_spec_dst.s_addr,
            ))));
        }
        if c.cmsg_level == libc::IPPROTO_IPV6
            && c.cmsg_type == libc::IPV6_PKTINFO
            && holds(std::mem::size_of::<libc::in6_pktinfo>())
        {
            // SAFETY: IPV6_PKTINFO data is an in6_pktinfo, long enough
            // (checked), read unaligned.
            let info: libc::in6_pktinfo = unsafe { std::ptr::read_unaligned(data.cast()) };
            v6 = Some(std::net::Ipv6Addr::from(info.ipi6_addr.s6_addr));
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(hdr, cmsg) };
    }
    // Only an IPv6 datagram gets here with an address (an IPv4 one also
    // has IP_PKTINFO).
    let ip = v6?;
    if ip.is_multicast() || ip.segments()[0] & 0xffc0 == 0xfe80 {
        return None;
    }
    Some(ip.to_canonical())
}

/// Makes a send header carry `source` as the address to send from, in
/// `space`, for a socket of the family of `to` (an IPv6 socket takes an
/// IPv4 source as a mapped address). False, and nothing set, when the
/// two cannot go together (an IPv6 source towards an IPv4 peer).
pub(crate) fn send_from(
    hdr: &mut libc::msghdr,
    space: &mut PktInfoSpace,
    source: IpAddr,
    to: &SocketAddr,
) -> bool {
    space.0 = [0; PKTINFO_SPACE];
    let (level, kind, len) = match (to, source) {
        (SocketAddr::V4(_), IpAddr::V4(_)) => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            std::mem::size_of::<libc::in_pktinfo>(),
        ),
        (SocketAddr::V6(_), _) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            std::mem::size_of::<libc::in6_pktinfo>(),
        ),
        (SocketAddr::V4(_), IpAddr::V6(_)) => return false,
    };
    // SAFETY: CMSG_SPACE of a pktinfo is a small constant within the buffer.
    let space_len = unsafe { libc::CMSG_SPACE(len as u32) } as usize;
    debug_assert!(space_len <= PKTINFO_SPACE);
    hdr.msg_control = space.0.as_mut_ptr().cast();
    hdr.msg_controllen = space_len as _;
    // SAFETY: the header points at `space`, large enough for one control
    // message of `len` bytes; CMSG_FIRSTHDR is then non-null.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(hdr);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(len as u32) as _;
        let data = libc::CMSG_DATA(cmsg);
        match source {
            IpAddr::V4(v4) if level == libc::IPPROTO_IP => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(v4).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(data.cast(), info);
            }
            _ => {
                let v6 = match source {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(data.cast(), info);
            }
        }
    }
    true
}

/// Sends one datagram from `fd` to `to`, from `source` when given.
pub(crate) fn send_one(
    fd: RawFd,
    data: &[u8],
    to: &SocketAddr,
    source: Option<IpAddr>,
) -> io::Result<()> {
    let addr = SockAddr::from(*to);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut msg = send_header(&mut iov, &addr);
    let mut space = PktInfoSpace::new();
    if let Some(source) = source {
        send_from(&mut msg.msg_hdr, &mut space, source, to);
    }
    // SAFETY: the header points at `addr`, `iov` (and `data`) and
    // `space`, all alive for the call; the kernel only reads them.
    if unsafe { libc::sendmsg(fd, &msg.msg_hdr, 0) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
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
    /// Per queued datagram, the address to send from (see [`send_from`]).
    sources: [Option<IpAddr>; BATCH],
    controls: Box<[PktInfoSpace; BATCH]>,
}

impl Outbox {
    pub(crate) fn new() -> Self {
        Outbox {
            items: Vec::with_capacity(BATCH),
            sources: [None; BATCH],
            controls: Box::new([PktInfoSpace::new(); BATCH]),
        }
    }

    /// Queues buffer `buf` of the current batch, to leave from `source`
    /// when given; never grows past [`BATCH`], one entry per received
    /// datagram.
    pub(crate) fn push(
        &mut self,
        buf: usize,
        len: usize,
        to: SocketAddr,
        source: Option<IpAddr>,
        slot: usize,
    ) {
        debug_assert!(self.items.len() < BATCH);
        self.sources[self.items.len()] = source;
        self.items.push((buf, len, SockAddr::from(to), slot));
    }

    /// Sends everything queued with as few `sendmmsg` calls as the kernel
    /// allows; calls `failed` with the leg slot of each datagram it
    /// refused, and whether it was for its source address (then it went
    /// again from the address the routing table picks).
    pub(crate) fn flush(
        &mut self,
        fd: RawFd,
        bufs: &[PacketBuf; BATCH],
        mut failed: impl FnMut(usize, bool),
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
            if let (Some(source), Some(dest)) = (self.sources[i], to.as_socket()) {
                send_from(&mut msgs[i].msg_hdr, &mut self.controls[i], source, &dest);
            }
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
                let (buf, len, to, slot) = &self.items[sent];
                // Sent without its source, it goes: the host lacks the
                // source.
                let for_source = self.sources[sent].is_some()
                    && maybe_source_refused(&err)
                    && to
                        .as_socket()
                        .is_some_and(|to| send_one(fd, &bufs[*buf][..*len], &to, None).is_ok());
                failed(*slot, for_source);
                sent += 1;
            }
        }
        self.items.clear();
    }
}
