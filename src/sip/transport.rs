//! What the protocol core knows of transports: which kind a flow is, and
//! which flow a message came in on or must go out on. Sockets live in
//! `runtime`; the core only names them.

use std::fmt;
use std::net::SocketAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    /// RFC 3261 §17: reliable transports need no retransmissions and
    /// shorten the wait states to zero.
    pub fn is_reliable(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    /// The token used in Via headers and `transport=` parameters.
    pub fn via_token(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    pub fn parse(s: &str) -> Option<Transport> {
        [Transport::Udp, Transport::Tcp, Transport::Tls]
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies one TCP or TLS connection for its whole life. Never reused.
pub type ConnId = u64;

/// A flow (RFC 5626 §3): the path a message came in on and the way back.
/// For UDP it is the pair of addresses; for a stream it is the connection,
/// so answers and later requests reuse the connection the phone opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub transport: Transport,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The connection for TCP/TLS; 0 for UDP.
    pub conn: ConnId,
}

impl Flow {
    pub fn udp(local: SocketAddr, remote: SocketAddr) -> Flow {
        Flow {
            transport: Transport::Udp,
            local,
            remote,
            conn: 0,
        }
    }

    pub fn stream(
        transport: Transport,
        local: SocketAddr,
        remote: SocketAddr,
        conn: ConnId,
    ) -> Flow {
        Flow {
            transport,
            local,
            remote,
            conn,
        }
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.transport, self.remote)?;
        if self.conn != 0 {
            write!(f, "#{}", self.conn)?;
        }
        Ok(())
    }
}
