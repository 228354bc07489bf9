//! A test phone: Parley's own registration state machine (`sip::ua`) on a
//! real socket, over UDP, TCP or TLS (verifying Parley's certificate).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parley::sip::message::{Framing, Message};
use parley::sip::stream::{Frame, StreamFramer};
use parley::sip::transport::Transport;
use parley::sip::ua::{RegisterOutcome, Registration};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

pub const TIMEOUT: Duration = Duration::from_secs(5);

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

enum Link {
    Udp(UdpSocket, SocketAddr),
    Stream(Box<dyn Stream>, StreamFramer, BytesMut),
}

pub struct Phone {
    link: Link,
    pub reg: Registration,
    /// Certificates the server presented (TLS only), leaf first.
    pub peer_certs: Vec<CertificateDer<'static>>,
    /// Where the last UDP message came from.
    pub last_from: Option<SocketAddr>,
}

/// A rustls client config trusting exactly the CA in `ca_pem`.
pub fn tls_client_config(ca_pem: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl Phone {
    pub async fn udp(server: SocketAddr, user: &str, password: &str) -> Phone {
        let any: SocketAddr = if server.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        }
        .parse()
        .unwrap();
        let sock = std::net::UdpSocket::bind(any).unwrap();
        Phone::udp_on(sock, server, user, password)
    }

    /// A UDP phone on a socket the test made (in a network namespace, say).
    pub fn udp_on(
        sock: std::net::UdpSocket,
        server: SocketAddr,
        user: &str,
        password: &str,
    ) -> Phone {
        sock.set_nonblocking(true).unwrap();
        let sock = UdpSocket::from_std(sock).unwrap();
        let local = sock.local_addr().unwrap();
        Phone {
            reg: Registration::new(user, password, super::DOMAIN, Transport::Udp, local),
            link: Link::Udp(sock, server),
            peer_certs: vec![],
            last_from: None,
        }
    }

    pub async fn tcp(server: SocketAddr, user: &str, password: &str) -> Phone {
        let tcp = TcpStream::connect(server).await.unwrap();
        let local = tcp.local_addr().unwrap();
        Phone {
            reg: Registration::new(user, password, super::DOMAIN, Transport::Tcp, local),
            link: Link::Stream(Box::new(tcp), StreamFramer::new(), BytesMut::new()),
            peer_certs: vec![],
            last_from: None,
        }
    }

    /// Connects over TLS, verifying the server certificate for `name`
    /// against the CA in `ca_pem`.
    pub async fn tls(
        server: SocketAddr,
        ca_pem: &Path,
        name: &str,
        user: &str,
        password: &str,
    ) -> Phone {
        Self::try_tls(server, ca_pem, name, user, password)
            .await
            .expect("TLS handshake")
    }

    pub async fn try_tls(
        server: SocketAddr,
        ca_pem: &Path,
        name: &str,
        user: &str,
        password: &str,
    ) -> std::io::Result<Phone> {
        let tcp = TcpStream::connect(server).await?;
        let local = tcp.local_addr()?;
        let connector = tokio_rustls::TlsConnector::from(tls_client_config(ca_pem));
        let tls = connector
            .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
            .await?;
        let peer_certs = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.to_vec())
            .unwrap_or_default();
        Ok(Phone {
            reg: Registration::new(user, password, super::DOMAIN, Transport::Tls, local),
            link: Link::Stream(Box::new(tls), StreamFramer::new(), BytesMut::new()),
            peer_certs,
            last_from: None,
        })
    }

    /// Sends on a stream; false once the server has closed it.
    pub async fn try_send(&mut self, bytes: &[u8]) -> bool {
        match &mut self.link {
            Link::Stream(s, _, _) => s.write_all(bytes).await.is_ok() && s.flush().await.is_ok(),
            Link::Udp(..) => panic!("try_send is for streams"),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        match &mut self.link {
            Link::Udp(s, server) => {
                s.send_to(bytes, *server).await.unwrap();
            }
            Link::Stream(s, _, _) => {
                s.write_all(bytes).await.unwrap();
                s.flush().await.unwrap();
            }
        }
    }

    /// The next message from the server, or `None` after `TIMEOUT`.
    pub async fn recv(&mut self) -> Option<Message> {
        self.recv_within(TIMEOUT).await
    }

    pub async fn recv_within(&mut self, wait: Duration) -> Option<Message> {
        tokio::time::timeout(wait, self.recv_frame())
            .await
            .ok()
            .flatten()
    }

    async fn recv_frame(&mut self) -> Option<Message> {
        match &mut self.link {
            Link::Udp(s, _) => {
                let mut buf = vec![0u8; 65_536];
                let (n, from) = s.recv_from(&mut buf).await.ok()?;
                self.last_from = Some(from);
                Message::parse(Bytes::copy_from_slice(&buf[..n]), Framing::Datagram).ok()
            }
            Link::Stream(s, framer, pending) => loop {
                match framer.next_frame(pending) {
                    Ok(Some(Frame::Message(b))) => return Message::parse(b, Framing::Stream).ok(),
                    Ok(Some(_)) => continue,
                    Ok(None) => {}
                    Err(_) => return None,
                }
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                pending.extend_from_slice(&chunk[..n]);
            },
        }
    }

    /// Reads raw bytes from a stream link (for keep-alive pongs).
    pub async fn read_raw(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let Link::Stream(s, _, _) = &mut self.link else {
            return None;
        };
        let mut chunk = [0u8; 256];
        match tokio::time::timeout(wait, s.read(&mut chunk)).await {
            Ok(Ok(n)) => Some(chunk[..n].to_vec()),
            _ => None,
        }
    }

    /// Sends a request and waits for its final response.
    pub async fn request(&mut self, bytes: Bytes) -> Message {
        self.send(&bytes).await;
        loop {
            let m = self.recv().await.expect("a response in time");
            if m.status().is_some_and(|s| s >= 200) {
                return m;
            }
        }
    }

    /// Registers (answering challenges). Returns the outcome and the last response.
    pub async fn register(&mut self) -> (RegisterOutcome, Message) {
        for _ in 0..4 {
            let req = self.reg.build();
            let resp = self.request(req).await;
            let outcome = self.reg.handle_response(&resp);
            if outcome != RegisterOutcome::Challenged {
                return (outcome, resp);
            }
        }
        panic!("registration kept being challenged");
    }

    /// Sends a REGISTER with no Contact and returns the Contact values listed.
    pub async fn fetch_bindings(&mut self) -> Vec<String> {
        for _ in 0..4 {
            let req = self.reg.build_with(0, Some(""));
            let resp = self.request(req).await;
            if resp.status() == Some(401) {
                self.reg.handle_response(&resp);
                continue;
            }
            assert_eq!(resp.status(), Some(200), "fetch failed: {}", resp.reason());
            return resp
                .header_values(parley::sip::message::HeaderName::Contact)
                .map(str::to_owned)
                .collect();
        }
        panic!("fetch kept being challenged");
    }

    /// An OPTIONS request.
    pub fn options(&self, branch: &str) -> Bytes {
        let local = self.reg.local;
        Bytes::from(format!(
            "OPTIONS sip:{} SIP/2.0\r\nVia: SIP/2.0/{} {local};branch=z9hG4bK{branch};rport\r\nMax-Forwards: 70\r\n\
             From: <sip:probe@{}>;tag=p{branch}\r\nTo: <sip:{}>\r\nCall-ID: opt-{branch}\r\nCSeq: 1 OPTIONS\r\n\
             Content-Length: 0\r\n\r\n",
            super::DOMAIN,
            self.reg.transport.via_token(),
            super::DOMAIN,
            super::DOMAIN
        ))
    }
}
