//! The thin layer that touches sockets, clocks and files: it wires the
//! store, certificates, listeners and the protocol core together and runs
//! them until a shutdown signal.

mod driver;
mod stream;
mod udp_batch;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::media::{LegId, LegMedia, LegPort, MediaConfig, MediaEngine, MediaError, OpenLeg};
use crate::pbx::core::{Core, CoreKeys, LocalRoutes, MediaControl};
use crate::pbx::directory::Directory;
use crate::pbx::events::{Event, StoreOp};
use crate::sip::transport::Transport;
use crate::store::Store;
use crate::tls::{CertPaths, Identity, ReloadingResolver};
use crate::web::{self, WebState};

/// Store writes waiting to be batched.
const STORE_QUEUE: usize = 65_536;
/// How long a binding write may wait to share a transaction with others.
const STORE_FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// Most writes in one transaction.
const STORE_MAX_BATCH: usize = 50_000;
/// Messages from connection tasks waiting for the driver.
const INBOUND_QUEUE: usize = 4096;
/// How often the store is asked whether extensions changed.
const EXTENSION_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {transport} {addr}: {source}")]
    Bind {
        transport: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the media relay: {0}")]
    Media(std::io::Error),
}

/// Milliseconds since the process started; cheap to store in an atomic.
pub(crate) fn uptime_millis() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Runs the PBX until Ctrl-C or SIGTERM.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    uptime_millis();
    raise_file_limit();
    let store = Store::open(&config.data_dir).await?;
    let realm = store.realm(config.realm.as_deref()).await?;
    // Read before the list: a change the CLI makes while the server starts
    // is then seen by the watcher, not taken as already loaded.
    let extensions_revision = store.extensions_revision().await?;
    let extensions = store.list_extensions().await?;
    let purged = store.purge_expired_bindings().await?;
    let saved_bindings = store.load_bindings().await?;
    tracing::info!(
        data_dir = %config.data_dir.display(), %realm, extensions = extensions.len(),
        saved_bindings = saved_bindings.len(), purged, "store opened"
    );

    let cert_paths = CertPaths::new(
        &config.data_dir,
        config.cert_file.clone(),
        config.key_file.clone(),
    );
    let mut cert_ips: Vec<IpAddr> = config.advertise.into_iter().collect();
    cert_ips.extend(
        [config.sip_udp, config.sip_tcp, config.sip_tls, config.https]
            .iter()
            .flatten()
            .map(|a| a.ip()),
    );
    let identity = Identity::new(&config.domain, cert_ips);
    crate::tls::ensure_certificates(&cert_paths, &identity)?;
    spawn_certificate_renewal(cert_paths.clone(), identity);
    tracing::info!(
        ca = %cert_paths.ca_cert.display(),
        "phones verify Parley with this CA certificate (also served at https://<host>/ca.crt)"
    );
    let resolver = ReloadingResolver::new(config.cert_file.clone(), config.key_file.clone())?;
    resolver.spawn_watcher(config.cert_reload_interval);

    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
    let conn_limit =
        stream::ConnLimits::new(config.max_connections, config.max_connections_per_source);
    let mut listening: HashMap<&'static str, SocketAddr> = HashMap::new();

    let udp = match config.sip_udp {
        Some(addr) => {
            let sock = bind_udp(addr).map_err(|source| ServeError::Bind {
                transport: "udp",
                addr,
                source,
            })?;
            listening.insert("udp", sock.local_addr().unwrap_or(addr));
            Some(Arc::new(sock))
        }
        None => None,
    };
    if let Some(addr) = config.sip_tcp {
        let l = bind_tcp(addr).map_err(|source| ServeError::Bind {
            transport: "tcp",
            addr,
            source,
        })?;
        listening.insert("tcp", stream::bound(&l).unwrap_or(addr));
        tokio::spawn(stream::accept_loop(
            l,
            Transport::Tcp,
            None,
            inbound_tx.clone(),
            conn_limit.clone(),
            config.keepalive,
        ));
    }
    if let Some(addr) = config.sip_tls {
        let l = bind_tcp(addr).map_err(|source| ServeError::Bind {
            transport: "tls",
            addr,
            source,
        })?;
        listening.insert("tls", stream::bound(&l).unwrap_or(addr));
        let acceptor = TlsAcceptor::from(crate::tls::server_config(resolver.clone(), &[])?);
        tokio::spawn(stream::accept_loop(
            l,
            Transport::Tls,
            Some(acceptor),
            inbound_tx.clone(),
            conn_limit.clone(),
            config.keepalive,
        ));
    }
    if let Some(addr) = config.https {
        let l = bind_tcp(addr).map_err(|source| ServeError::Bind {
            transport: "https",
            addr,
            source,
        })?;
        listening.insert("https", stream::bound(&l).unwrap_or(addr));
        let acceptor = TlsAcceptor::from(crate::tls::server_config(
            resolver.clone(),
            &[b"h2", b"http/1.1"],
        )?);
        let app = web::app(WebState {
            ca_cert: cert_paths.ca_cert.clone(),
            // The host part of SIP URIs: an IPv6 literal goes in brackets.
            domain: match config.domain.parse::<std::net::Ipv6Addr>() {
                Ok(v6) => format!("[{v6}]"),
                Err(_) => config.domain.clone(),
            },
        });
        tokio::spawn(web::serve_https(l, acceptor, app));
    }
    for (name, addr) in {
        let mut v: Vec<_> = listening.into_iter().collect();
        v.sort();
        v
    } {
        tracing::info!(transport = name, %addr, "listening");
    }

    let now = Instant::now();
    let unix_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let keys = CoreKeys {
        nonce: rand::random(),
        dummy_ha1: rand::random(),
    };
    let mut core = Core::new(config.core_config(&realm), keys, now, unix_now);
    // Media sockets listen where SIP does when SIP is bound to one address
    // (a test on loopback, a host with several addresses); on all
    // addresses otherwise.
    let media_ip = [config.sip_tls, config.sip_udp, config.sip_tcp]
        .into_iter()
        .flatten()
        .map(|a| a.ip())
        .next()
        .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED));
    let (media, media_events) = MediaEngine::start(MediaConfig {
        bind_ip: media_ip,
        ports: config.rtp_ports.0..=config.rtp_ports.1,
        inactivity: config.media_timeout,
    })
    .map_err(ServeError::Media)?;
    tracing::info!(ports = %format!("{}-{}", config.rtp_ports.0, config.rtp_ports.1), ip = %media_ip, "media relay started");
    core.set_media(Box::new(EngineControl(media)));
    core.set_routes(Box::new(KernelRoutes::default()));

    core.set_directory(now, Directory::new(extensions));
    let restored = core.restore_bindings(now, saved_bindings);
    if restored > 0 {
        tracing::info!(
            restored,
            "UDP registrations restored from before the restart"
        );
    }
    while core.poll_output().is_some() {}

    let (store_tx, store_rx) = mpsc::channel(STORE_QUEUE);
    let writer = tokio::spawn(store_writer(store.clone(), store_rx));
    let (dir_tx, dir_rx) = watch::channel(Directory::default());
    tokio::spawn(watch_extensions(store.clone(), dir_tx, extensions_revision));
    let (events_tx, _) = broadcast::channel::<Event>(1024);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = shutdown_tx.send(true);
    });

    let driver = driver::Driver {
        core,
        udp,
        inbound: inbound_rx,
        media_events,
        store: store_tx,
        events: events_tx,
        directory: Some(dir_rx),
        shutdown: shutdown_rx,
        idle_timeout: config.idle_timeout,
        datagrams: Vec::new(),
    };
    tracing::info!(domain = %config.domain, "Parley is ready");
    // On a worker thread, next to the connection tasks that feed it.
    let _ = tokio::spawn(driver.run()).await;
    // The driver dropped its sender: the writer drains and stops.
    let _ = writer.await;
    store.close().await;
    Ok(())
}

/// Receive buffer of the SIP UDP socket: about a third of a second of
/// REGISTER traffic at 20,000 registrations/s.
const UDP_RECV_BUFFER: usize = 16 << 20;

fn force_buffer(sock: &Socket, option: libc::c_int, bytes: usize) -> bool {
    use std::os::fd::AsRawFd;
    crate::media::set_int_option(
        sock.as_raw_fd(),
        libc::SOL_SOCKET,
        option,
        bytes as libc::c_int,
    )
    .is_ok()
}

/// The core's handle on the media relay.
/// Every call holds four UDP sockets and every phone on TCP/TLS a
/// connection; the usual soft limit of 1,024 descriptors would stop Parley
/// at a few hundred calls. The soft limit is raised to the hard one.
fn raise_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let before = lim.rlim_cur;
        if before < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(limit = before, "cannot raise the open-file limit");
                return;
            }
        }
        if lim.rlim_cur < 16_384 {
            tracing::warn!(
                limit = lim.rlim_cur,
                "open-file limit is low: each call needs 4 sockets; raise it (LimitNOFILE=) for large sites"
            );
        }
    }
}

/// Asks the kernel which local address reaches a device: a UDP socket
/// "connected" to it (no packet is sent) is given that source address.
/// Answers are remembered; the table is bounded and starts over when full.
#[derive(Default)]
struct KernelRoutes {
    cache: std::sync::Mutex<HashMap<IpAddr, Option<IpAddr>>>,
}

/// Most remembered routes.
const MAX_ROUTES: usize = 4096;

impl LocalRoutes for KernelRoutes {
    fn source_for(&self, remote: IpAddr) -> Option<IpAddr> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = cache.get(&remote) {
            return *known;
        }
        let any: SocketAddr = match remote {
            IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let found = std::net::UdpSocket::bind(any)
            .and_then(|s| {
                s.connect((remote, 9))?;
                s.local_addr()
            })
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified());
        if cache.len() >= MAX_ROUTES {
            cache.clear();
        }
        cache.insert(remote, found);
        found
    }
}

struct EngineControl(MediaEngine);

impl MediaControl for EngineControl {
    fn open_leg(&mut self, port: LegPort) -> Result<OpenLeg, MediaError> {
        self.0.open_leg(port)
    }

    fn configure(&mut self, id: LegId, media: LegMedia) {
        if let Err(e) = self.0.configure(id, media) {
            tracing::error!(leg = %id, error = %e, "media leg not configured");
        }
    }

    fn bridge(&mut self, a: LegId, b: LegId) {
        if let Err(e) = self.0.bridge(a, b) {
            tracing::error!(error = %e, "media legs not bridged");
        }
    }

    fn close(&mut self, id: LegId) {
        let _ = self.0.close(id);
    }
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::from_std(open_udp(addr)?)
}

/// The SIP UDP socket, before the runtime takes it.
fn open_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // [::] takes IPv4 peers too, as ::ffff:a.b.c.d.
        sock.set_only_v6(false)?;
    }
    // Large buffers ride out bursts (a whole office re-registering) and
    // the moments the core shares its CPU with the store writer. Past the
    // system's rmem_max only a privileged process may go (SO_RCVBUFFORCE);
    // otherwise the kernel caps the request.
    if !force_buffer(&sock, libc::SO_RCVBUFFORCE, UDP_RECV_BUFFER) {
        let _ = sock.set_recv_buffer_size(UDP_RECV_BUFFER);
    }
    let _ = sock.set_send_buffer_size(4 << 20);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    if addr.ip().is_unspecified() {
        use std::os::fd::AsRawFd;
        // Bound to all addresses: learn which one each datagram reached,
        // to answer from it (see `udp_batch::Datagram`).
        crate::media::enable_pktinfo(sock.as_raw_fd(), addr.is_ipv6())?;
    }
    Ok(sock.into())
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// Writes binding changes in batches: everything that arrives within
/// `STORE_FLUSH_INTERVAL` of the first pending write goes into one
/// transaction, so a busy registrar costs the disk a write or two a second.
async fn store_writer(store: Store, mut rx: mpsc::Receiver<StoreOp>) {
    let mut batch = Vec::with_capacity(4096);
    loop {
        if rx.recv_many(&mut batch, 4096).await == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + STORE_FLUSH_INTERVAL;
        let mut open = true;
        while open && batch.len() < STORE_MAX_BATCH {
            tokio::select! {
                n = rx.recv_many(&mut batch, 4096) => open = n > 0,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if let Err(e) = store.apply(&batch).await {
            tracing::error!(writes = batch.len(), "saving registrations failed: {e}");
        }
        batch.clear();
        if !open {
            return;
        }
    }
}

/// Reloads the extensions whenever the store says they changed, so
/// command-line edits reach a running server without a restart.
/// How often a running Parley checks whether its own server certificate
/// is due for renewal; the resolver's watcher then picks the new one up.
const RENEWAL_CHECK: Duration = Duration::from_secs(12 * 3600);

fn spawn_certificate_renewal(paths: crate::tls::CertPaths, identity: Identity) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RENEWAL_CHECK);
        tick.tick().await;
        loop {
            tick.tick().await;
            let (p, id) = (paths.clone(), identity.clone());
            let renewal =
                tokio::task::spawn_blocking(move || crate::tls::ensure_certificates(&p, &id));
            if let Ok(Err(e)) = renewal.await {
                tracing::error!("cannot renew the server certificate: {e}");
            }
        }
    });
}

/// Sends the directory again whenever the extensions' revision moves past
/// `loaded`, the one the running directory was read at.
async fn watch_extensions(store: Store, tx: watch::Sender<Directory>, loaded: i64) {
    let mut seen = Some(loaded);
    let mut tick = tokio::time::interval(EXTENSION_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let rev = match store.extensions_revision().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot read extension revision: {e}");
                continue;
            }
        };
        if Some(rev) == seen {
            continue;
        }
        match store.list_extensions().await {
            Ok(list) => {
                seen = Some(rev);
                if tx.send(Directory::new(list)).is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!("cannot reload extensions: {e}"),
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
