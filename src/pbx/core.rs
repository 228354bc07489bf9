//! The protocol core: bytes and time in; messages to send, events, store
//! writes and timers out. One instance owns all signaling state; the
//! runtime feeds it from the sockets and carries out what it returns.
//!
//! The path of a request: [`Core::handle_message`] parses it, checks the
//! headers every request needs, hands it to the transaction layer (which
//! absorbs retransmissions), then dispatches by method. Every answer goes
//! back through the same server transaction.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::auth::{AuthResult, Authenticator};
use super::directory::Directory;
use super::events::{Event, RegistrationEvent, SecurityEvent, StoreOp, StoredBinding};
use super::lockout::{BlockScope, Lockout, LockoutConfig};
use super::policy::LanNetworks;
use super::registrar::{BindingChange, Change, RegisterError, Registrar, RegistrarConfig};
use crate::sip::message::date::format_sip_date;
use crate::sip::message::limits::MAX_VIA_COUNT;
use crate::sip::message::{Framing, HeaderName, Message, MessageBuilder, Method, ParseError, Uri};
use crate::sip::transaction::{
    Refused, ServerTxId, TimerConfig, TransactionLayer, Transmit, TuInput, TxError,
};
use crate::sip::transport::{ConnId, Flow, Transport};

/// Methods Parley answers today; the Allow header of every 405 and OPTIONS.
pub const ALLOWED_METHODS: &str = "INVITE, ACK, CANCEL, BYE, REGISTER, OPTIONS, INFO, UPDATE";
/// Option tags Parley supports (RFC 4028 session timers).
pub const SUPPORTED_OPTIONS: &str = "timer";

mod calls;
mod keepalive;
pub use calls::{MAX_CALLS, MAX_FORKS, MediaControl, NoMedia};

/// The host's routing table, as far as the core needs it: which local
/// address packets to `remote` leave from. Only asked when a SIP socket
/// is bound to all addresses; the runtime answers from the kernel.
pub trait LocalRoutes: Send {
    fn source_for(&self, remote: std::net::IpAddr) -> Option<std::net::IpAddr>;
}

/// No routing table: the advertised address, or loopback, is used.
pub struct NoRoutes;

impl LocalRoutes for NoRoutes {
    fn source_for(&self, _: std::net::IpAddr) -> Option<std::net::IpAddr> {
        None
    }
}
/// How often expired lockout counters are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub realm: String,
    /// The SIP domain phones use (`sip:100@domain`): the host part of the
    /// addresses Parley puts in From and To, so a phone can call back.
    pub domain: String,
    /// Value of the Server header.
    pub server_name: String,
    pub timers: TimerConfig,
    pub registrar: RegistrarConfig,
    pub lockout: LockoutConfig,
    pub lan: LanNetworks,
    pub nonce_lifetime_secs: u64,
    pub md5_only_user_agents: Vec<String>,
    /// The public address of Parley (`--advertise`), for devices outside
    /// the LAN and where a socket is bound to the unspecified address.
    pub advertise: Option<std::net::IpAddr>,
    /// How long a call rings before the caller gets 480.
    pub ring_timeout: Duration,
    /// How long a call on hold may go without any media before it is hung
    /// up (the relay's quiet time does not apply while held); `None`: never.
    pub hold_timeout: Option<Duration>,
    /// How often remote UDP contacts are pinged to keep their NAT
    /// mappings open; `None` or zero turns the pings off.
    pub keepalive: Option<Duration>,
}

impl CoreConfig {
    pub fn new(realm: impl Into<String>) -> CoreConfig {
        let realm: String = realm.into();
        CoreConfig {
            domain: realm.clone(),
            realm,
            server_name: "Parley".into(),
            timers: TimerConfig::default(),
            registrar: RegistrarConfig::default(),
            lockout: LockoutConfig::default(),
            lan: LanNetworks::default_private(),
            nonce_lifetime_secs: 300,
            md5_only_user_agents: vec!["baresip v0.".into(), "baresip v1.".into()],
            advertise: None,
            ring_timeout: Duration::from_secs(30),
            hold_timeout: Some(Duration::from_secs(3600)),
            keepalive: Some(Duration::from_secs(25)),
        }
    }
}

/// Secrets the core needs, made by the caller from the OS's randomness.
#[derive(Clone)]
pub struct CoreKeys {
    pub nonce: [u8; 32],
    pub dummy_ha1: [u8; 32],
}

/// Everything the core asks the runtime to do.
#[derive(Debug)]
pub enum Output {
    Transmit(Transmit),
    Event(Event),
    Store(StoreOp),
    /// Whether a TCP/TLS connection carries a registration, so that it is
    /// kept open however idle it is.
    Pin {
        conn: ConnId,
        pinned: bool,
    },
    /// A call ended: its record for the call history.
    CallEnded(Box<super::cdr::CallRecord>),
}

/// Maps the monotonic clock the core runs on to wall-clock time, for
/// Date headers and for expiry times that must survive a restart.
#[derive(Debug, Clone, Copy)]
struct WallClock {
    at: Instant,
    unix: Duration,
}

impl WallClock {
    /// The wall-clock time at `now`, as Unix time.
    fn unix(&self, now: Instant) -> Duration {
        match now.checked_duration_since(self.at) {
            Some(d) => self.unix + d,
            None => self.unix.saturating_sub(self.at - now),
        }
    }
}

pub struct Core {
    cfg: CoreConfig,
    clock: WallClock,
    /// The clock nonces are issued and checked by: the wall clock as it was
    /// at start, moving with the monotonic clock only, so a step of the
    /// system clock neither ages nor rejuvenates a nonce (a step back would
    /// make every new nonce look older than ones already used).
    nonce_clock: WallClock,
    tx: TransactionLayer,
    auth: Authenticator,
    lockout: Lockout,
    registrar: Registrar,
    directory: Directory,
    out: VecDeque<Output>,
    tag_hasher: std::collections::hash_map::RandomState,
    next_sweep: Instant,
    /// The Date header of the current second, made once per second.
    date: (u64, String),
    calls: calls::Calls,
    media: Box<dyn MediaControl>,
    /// The TLS version of each open TLS connection, for call records.
    tls_versions: std::collections::HashMap<ConnId, &'static str>,
    keepalive: keepalive::Keepalive,
    routes: Box<dyn LocalRoutes>,
}

impl Core {
    /// `unix_now` is the wall-clock time at `now`.
    pub fn new(cfg: CoreConfig, keys: CoreKeys, now: Instant, unix_now: Duration) -> Core {
        let mut auth = Authenticator::new(
            cfg.realm.clone(),
            keys.nonce,
            keys.dummy_ha1,
            cfg.nonce_lifetime_secs,
        );
        auth.set_md5_only_agents(cfg.md5_only_user_agents.clone());
        // A ringing branch must outlast the ring timeout and its CANCEL.
        let mut timers = cfg.timers;
        timers.proceeding_limit = timers
            .proceeding_limit
            .max(cfg.ring_timeout + timers.t1x64());
        let mut core = Core {
            tx: TransactionLayer::new(timers),
            lockout: Lockout::new(cfg.lockout),
            registrar: Registrar::new(cfg.registrar),
            auth,
            clock: WallClock {
                at: now,
                unix: unix_now,
            },
            nonce_clock: WallClock {
                at: now,
                unix: unix_now,
            },
            directory: Directory::default(),
            out: VecDeque::new(),
            tag_hasher: Default::default(),
            next_sweep: now + SWEEP_INTERVAL,
            date: (0, String::new()),
            calls: calls::Calls::default(),
            media: Box::new(NoMedia),
            tls_versions: Default::default(),
            keepalive: Default::default(),
            routes: Box::new(NoRoutes),
            cfg,
        };
        core.start_keepalive(now);
        core
    }

    /// Connects the media plane; without it calls are refused with 503.
    pub fn set_media(&mut self, media: Box<dyn MediaControl>) {
        self.media = media;
    }

    /// Tells the core which local address reaches a device, for sockets
    /// bound to all addresses.
    pub fn set_routes(&mut self, routes: Box<dyn LocalRoutes>) {
        self.routes = routes;
    }

    /// Calls in progress.
    pub fn call_count(&self) -> usize {
        self.calls.len()
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    pub fn registrar(&self) -> &Registrar {
        &self.registrar
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    pub fn transactions(&self) -> &TransactionLayer {
        &self.tx
    }

    /// Installs a new set of extensions. Bindings of extensions that are
    /// gone are dropped; a changed password takes effect on the next
    /// challenge.
    pub fn set_directory(&mut self, now: Instant, directory: Directory) {
        for e in directory.iter().filter(|e| e.realm != self.cfg.realm) {
            tracing::warn!(
                extension = %e.number, stored_realm = %e.realm, realm = %self.cfg.realm,
                "extension's password was set for another realm; it cannot register until its password is set again"
            );
        }
        self.directory = directory;
        self.auth.retain_extensions(&self.directory);
        let dir = &self.directory;
        let changes = self.registrar.retain_aors(|a| dir.get(a).is_some());
        self.report(now, changes);
    }

    /// Puts back UDP bindings saved before a restart; expired ones are skipped.
    pub fn restore_bindings(
        &mut self,
        now: Instant,
        saved: impl IntoIterator<Item = StoredBinding>,
    ) -> usize {
        let unix_now = self.clock.unix(now).as_secs();
        let mut restored = 0;
        for b in saved {
            if b.expires_at_unix <= unix_now || self.directory.get(&b.extension).is_none() {
                continue;
            }
            let expires_at = now + Duration::from_secs(b.expires_at_unix - unix_now);
            self.registrar.restore(
                &b.extension,
                &b.key,
                &b.contact,
                b.instance,
                b.reg_id,
                &b.call_id,
                b.cseq,
                expires_at,
                Flow::udp(b.local, b.remote),
                b.user_agent,
            );
            restored += 1;
        }
        restored
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        if let Some(t) = self.tx.poll_transmit() {
            return Some(Output::Transmit(t));
        }
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.tx.poll_timeout(),
            self.registrar.next_expiry(),
            Some(self.next_sweep),
            self.calls.next_deadline(),
            self.keepalive.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn nonce_secs(&self, now: Instant) -> u64 {
        self.nonce_clock.unix(now).as_secs()
    }

    /// Follows the system clock again: it may have been stepped (NTP at
    /// boot on a device without a real-time clock) since Parley started,
    /// and call records and stored expiry times are written in its time.
    pub fn set_wall_clock(&mut self, now: Instant, unix_now: Duration) {
        self.clock = WallClock {
            at: now,
            unix: unix_now,
        };
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.tx.handle_timeout(now);
        while let Some(input) = self.tx.poll_input() {
            self.handle_tu_input(now, input);
        }
        let expired = self.registrar.expire(now);
        self.report(now, expired);
        if now >= self.next_sweep {
            self.lockout.sweep(now);
            self.next_sweep = now + SWEEP_INTERVAL;
        }
        self.call_timers(now);
        self.keepalive_timers(now);
    }

    /// Notes what a TLS connection negotiated (shown in call records).
    pub fn set_tls_version(&mut self, conn: ConnId, version: &'static str) {
        self.tls_versions.insert(conn, version);
    }

    /// A TCP/TLS connection closed: its bindings and transactions go.
    pub fn handle_flow_closed(&mut self, now: Instant, flow: Flow) {
        self.tls_versions.remove(&flow.conn);
        let changes = self.registrar.flow_closed(flow.conn);
        self.report(now, changes);
        self.tx.flow_failed(&flow);
        while let Some(input) = self.tx.poll_input() {
            self.handle_tu_input(now, input);
        }
        self.calls_flow_closed(now, flow);
    }

    /// A stream whose framing broke (it will be closed): answer what can
    /// be answered.
    pub fn handle_stream_error(&mut self, flow: Flow, head: &[u8], error: ParseError) {
        tracing::info!(%flow, %error, "unframeable message on stream; closing the connection");
        self.reply_unparsable(flow, head, error);
    }

    /// One message: a UDP datagram, or a frame cut from a stream.
    pub fn handle_message(&mut self, now: Instant, flow: Flow, bytes: Bytes) {
        let framing = if flow.transport.is_reliable() {
            Framing::Stream
        } else {
            Framing::Datagram
        };
        let msg = match Message::parse(bytes.clone(), framing) {
            Ok(m) => m,
            Err(error) => {
                tracing::debug!(%flow, %error, "unparsable message");
                self.reply_unparsable(flow, &bytes, error);
                return;
            }
        };
        if !msg.is_request() {
            if let Some(input) = self.tx.handle_response(now, msg, flow) {
                self.handle_tu_input(now, input);
            }
            return;
        }
        if let Err(reason) = check_request(&msg) {
            tracing::debug!(%flow, reason, "invalid request");
            if msg.method() != Some(Method::Ack) {
                self.send_stateless(flow, &msg, 400, reason);
            }
            return;
        }
        match self.tx.handle_request(now, msg, flow) {
            Ok(Some(input)) => self.handle_tu_input(now, input),
            Ok(None) => {}
            Err(Refused {
                error: TxError::Overloaded,
                msg,
            }) => {
                tracing::warn!(%flow, "transaction table full; refusing request");
                let mut b = self.response_builder(&msg, flow, 503, "Service Unavailable");
                b.header(HeaderName::RetryAfter, "5");
                self.out.push_back(Output::Transmit(Transmit {
                    flow,
                    bytes: b.finish(),
                }));
            }
            Err(Refused {
                error: TxError::Unmatchable,
                msg,
            }) => self.send_stateless(flow, &msg, 400, "Malformed Via Or CSeq"),
        }
    }

    fn handle_tu_input(&mut self, now: Instant, input: TuInput) {
        match input {
            TuInput::Request { tx, msg, flow } => self.handle_request(now, tx, msg, flow),
            TuInput::Ack { msg, .. } => self.call_ack(now, &msg),
            TuInput::Response { tx, msg, .. } if self.keepalive.owns(tx) => {
                self.keepalive_response(tx, &msg)
            }
            TuInput::Response { tx, msg, .. } => self.call_response(now, tx, msg),
            TuInput::StrayResponse { .. } => {}
            TuInput::ClientTimeout { tx } if self.keepalive.owns(tx) => self.keepalive_timeout(tx),
            TuInput::ClientTimeout { tx } => self.call_client_timeout(now, tx),
            TuInput::ServerNoAck { tx } => self.call_not_acknowledged(now, tx),
        }
    }

    fn handle_request(&mut self, now: Instant, tx: ServerTxId, msg: Message, flow: Flow) {
        let method = msg.method().unwrap_or(Method::Other);
        if !matches!(method, Method::Ack | Method::Cancel)
            && let Some(unsupported) = unsupported_requirements(&msg)
        {
            let mut b = self.response_builder(&msg, flow, 420, "Bad Extension");
            b.header(HeaderName::Unsupported, &unsupported);
            self.respond_unauthenticated(now, tx, &msg, 420, b.finish());
            return;
        }
        if Uri::parse(msg.request_uri()).is_err() {
            let b = self.response_builder(&msg, flow, 416, "Unsupported URI Scheme");
            self.respond_unauthenticated(now, tx, &msg, 416, b.finish());
            return;
        }
        let in_dialog = msg.to().and_then(|t| t.tag()).is_some();
        if in_dialog
            && !matches!(
                method,
                Method::Register | Method::Options | Method::Cancel | Method::Ack
            )
        {
            if !self.call_in_dialog(now, tx, &msg, flow) {
                let b = self.response_builder(&msg, flow, 481, "Call/Transaction Does Not Exist");
                self.respond_unauthenticated(now, tx, &msg, 481, b.finish());
            }
            return;
        }
        match method {
            Method::Register => self.handle_register(now, tx, &msg, flow),
            Method::Invite => self.handle_invite(now, tx, msg, flow),
            Method::Cancel => self.call_cancel(now, tx, msg, flow),
            Method::Options => {
                let mut b = self.response_builder(&msg, flow, 200, "OK");
                b.header(HeaderName::Allow, ALLOWED_METHODS);
                b.header(HeaderName::Accept, "application/sdp");
                b.header(HeaderName::AcceptEncoding, "identity");
                b.header(HeaderName::AcceptLanguage, "en");
                b.header(HeaderName::Supported, SUPPORTED_OPTIONS);
                self.respond(now, tx, 200, b.finish());
            }
            Method::Ack => {}
            Method::Other => {
                let mut b = self.response_builder(&msg, flow, 501, "Not Implemented");
                b.header(HeaderName::Allow, ALLOWED_METHODS);
                self.respond(now, tx, 501, b.finish());
            }
            _ => {
                let mut b = self.response_builder(&msg, flow, 405, "Method Not Allowed");
                b.header(HeaderName::Allow, ALLOWED_METHODS);
                self.respond(now, tx, 405, b.finish());
            }
        }
    }

    fn handle_register(&mut self, now: Instant, tx: ServerTxId, msg: &Message, flow: Flow) {
        let to_uri = msg.to().and_then(|t| Uri::parse(t.uri).ok());
        let Some(user) = to_uri.and_then(|u| u.user).map(percent_decode) else {
            let b = self.response_builder(msg, flow, 400, "To URI Must Name An Extension");
            self.respond(now, tx, 400, b.finish());
            return;
        };
        let span = tracing::info_span!("register", extension = %user, source = %flow.remote, transport = %flow.transport);
        let _entered = span.enter();
        let source = flow.remote.ip();
        let user_agent = msg.header(HeaderName::UserAgent);

        if let Some(scope) = self.lockout.blocked(now, source, &user) {
            tracing::debug!(?scope, "request from blocked source refused");
            let b = self.response_builder(msg, flow, 403, "Too Many Failed Attempts");
            self.tx.respond_stateless(tx, b.finish());
            return;
        }
        let unix_secs = self.nonce_secs(now);
        let ext = match self.auth.check(
            unix_secs,
            source,
            msg,
            HeaderName::Authorization,
            &user,
            &self.directory,
        ) {
            AuthResult::Authenticated(ext) => ext,
            AuthResult::Challenge => return self.challenge(now, tx, msg, flow, false, false),
            AuthResult::Stale => return self.challenge(now, tx, msg, flow, true, false),
            AuthResult::Malformed(e) => {
                let b = self.response_builder(
                    msg,
                    flow,
                    400,
                    &format!("Malformed Authorization ({e})"),
                );
                self.respond(now, tx, 400, b.finish());
                return;
            }
            AuthResult::Failed { username } => {
                tracing::info!(%username, "authentication failed");
                self.auth_failed(now, flow, &user);
                return self.challenge(now, tx, msg, flow, false, false);
            }
            AuthResult::WrongUser { username } => {
                tracing::warn!(%username, "credentials of another extension refused");
                self.security(SecurityEvent::WrongUser {
                    source,
                    extension: user.clone(),
                    username,
                });
                let b = self.response_builder(
                    msg,
                    flow,
                    403,
                    "Credentials Do Not Match The Registered Extension",
                );
                self.respond(now, tx, 403, b.finish());
                return;
            }
        };
        self.lockout.record_success(source, &user);

        if let Err(violation) =
            ext.encryption
                .check_transport(flow.transport, source, &self.cfg.lan)
        {
            tracing::warn!(policy = %ext.encryption, "registration refused by encryption policy: {violation}");
            self.security(SecurityEvent::PolicyViolation {
                source,
                extension: ext.number.clone(),
                transport: flow.transport,
                violation,
            });
            let b = self.response_builder(msg, flow, 403, &violation.to_string());
            self.respond(now, tx, 403, b.finish());
            return;
        }

        let changes = match self
            .registrar
            .register(now, &ext.number, msg, flow, user_agent)
        {
            Ok(c) => c,
            Err(RegisterError::IntervalTooBrief { min_expires }) => {
                let mut b = self.response_builder(msg, flow, 423, "Interval Too Brief");
                b.header_fmt(HeaderName::MinExpires, format_args!("{min_expires}"));
                self.respond(now, tx, 423, b.finish());
                return;
            }
            Err(e) => {
                let b = self.response_builder(msg, flow, 400, &e.to_string());
                self.respond(now, tx, 400, b.finish());
                return;
            }
        };
        let mut b = self.response_builder(msg, flow, 200, "OK");
        for binding in self.registrar.bindings(&ext.number) {
            b.header_fmt(
                HeaderName::Contact,
                format_args!("{}", binding.contact_value(now)),
            );
        }
        if self.date.0 != unix_secs {
            self.date = (unix_secs, format_sip_date(unix_secs));
        }
        b.header(HeaderName::Date, &self.date.1);
        self.respond(now, tx, 200, b.finish());
        self.report(now, changes);
    }

    /// Reports a failed authentication (REGISTER or INVITE), counts it
    /// towards the lockout and reports the block it starts. Only a check
    /// with a nonce we sent to this address gets here (the authenticator
    /// answers any other with a fresh challenge): a forged UDP source never
    /// saw our challenge, so it cannot lock out the address it claims.
    fn auth_failed(&mut self, now: Instant, flow: Flow, extension: &str) {
        let source = flow.remote.ip();
        self.security(SecurityEvent::AuthFailed {
            source,
            extension: extension.to_string(),
            transport: flow.transport,
        });
        let Some(block) = self.lockout.record_failure(now, source, extension) else {
            return;
        };
        let seconds = block.until.saturating_duration_since(now).as_secs();
        match block.scope {
            BlockScope::Source => tracing::warn!(
                failures = block.failures,
                seconds,
                "source blocked after repeated authentication failures"
            ),
            BlockScope::SourceAndExtension => tracing::warn!(
                failures = block.failures,
                seconds,
                "source blocked for this extension after repeated authentication failures"
            ),
        }
        self.security(SecurityEvent::Blocked {
            source,
            extension: extension.to_string(),
            scope: block.scope,
            failures: block.failures,
            seconds,
        });
    }

    /// A 401 (registrations) or, with `proxy`, a 407 (calls) with fresh
    /// challenges.
    fn challenge(
        &mut self,
        now: Instant,
        tx: ServerTxId,
        msg: &Message,
        flow: Flow,
        stale: bool,
        proxy: bool,
    ) {
        let unix_secs = self.nonce_secs(now);
        let (status, reason, header) = if proxy {
            (
                407,
                "Proxy Authentication Required",
                HeaderName::ProxyAuthenticate,
            )
        } else {
            (401, "Unauthorized", HeaderName::WwwAuthenticate)
        };
        let mut b = self.response_builder(msg, flow, status, reason);
        let challenges = self.auth.challenges(
            unix_secs,
            flow.remote.ip(),
            stale,
            msg.header(HeaderName::UserAgent),
        );
        for c in challenges.headers() {
            b.header_fmt(header, format_args!("{c}"));
        }
        // Unauthenticated requests leave no state behind.
        self.tx.respond_stateless(tx, b.finish());
    }

    /// Turns registrar changes into events, store writes and pins.
    fn report(&mut self, now: Instant, changes: Vec<BindingChange>) {
        for c in changes {
            let b = &c.binding;
            if !c.change.is_removal() {
                self.keepalive_heard_from(now, b);
            }
            match c.change {
                Change::Refreshed => {
                    tracing::debug!(extension = %b.aor, contact = %b.contact, flow = %b.flow, "binding refreshed")
                }
                change => {
                    tracing::info!(extension = %b.aor, contact = %b.contact, flow = %b.flow, change = change.as_str(), "registration changed")
                }
            }
            let udp = b.flow.transport == Transport::Udp;
            if !c.change.is_removal() && !udp {
                self.calls_follow_registration(&b.aor, b.flow);
            }
            let was_udp = c
                .previous_flow
                .is_some_and(|f| f.transport == Transport::Udp);
            if let Some(old) = &c.previous_key {
                self.out.push_back(Output::Store(StoreOp::DeleteBinding {
                    extension: b.aor.to_string(),
                    key: old.to_string(),
                }));
            }
            if !c.change.is_removal() && udp && c.store {
                self.out
                    .push_back(Output::Store(StoreOp::SaveBinding(StoredBinding {
                        extension: b.aor.to_string(),
                        key: b.key.to_string(),
                        contact: b.contact.to_string(),
                        instance: b.instance.as_deref().map(str::to_owned),
                        reg_id: b.reg_id,
                        call_id: b.call_id.to_string(),
                        cseq: b.cseq,
                        expires_at_unix: self.clock.unix(b.expires_at).as_secs(),
                        local: b.flow.local,
                        remote: b.flow.remote,
                        user_agent: b.user_agent.as_deref().map(str::to_owned),
                    })));
            } else if (c.change.is_removal() && udp && c.store) || (!udp && was_udp) {
                self.out.push_back(Output::Store(StoreOp::DeleteBinding {
                    extension: b.aor.to_string(),
                    key: b.key.to_string(),
                }));
            }
            for flow in [Some(b.flow), c.previous_flow].into_iter().flatten() {
                if flow.transport.is_reliable() {
                    self.out.push_back(Output::Pin {
                        conn: flow.conn,
                        pinned: self.registrar.conn_has_bindings(flow.conn),
                    });
                }
            }
            self.out
                .push_back(Output::Event(Event::Registration(RegistrationEvent {
                    extension: b.aor.clone(),
                    contact: b.contact.clone(),
                    transport: b.flow.transport,
                    remote: b.flow.remote,
                    user_agent: b.user_agent.clone(),
                    change: c.change,
                    expires_in: if c.change.is_removal() {
                        0
                    } else {
                        b.expires_in(now)
                    },
                })));
        }
    }

    fn security(&mut self, event: SecurityEvent) {
        self.out.push_back(Output::Event(Event::Security(event)));
    }

    fn respond(&mut self, now: Instant, tx: ServerTxId, status: u16, bytes: Bytes) {
        self.tx.respond(now, tx, status, bytes);
    }

    /// A final answer to a request nobody was authenticated for. An INVITE
    /// gets it statelessly: its server transaction would repeat a final
    /// answer over UDP until acknowledged (Timer G, eleven times in 32 s),
    /// which a forged source address would turn on any victim. A repeated
    /// INVITE is simply answered again.
    fn respond_unauthenticated(
        &mut self,
        now: Instant,
        tx: ServerTxId,
        msg: &Message,
        status: u16,
        bytes: Bytes,
    ) {
        if msg.method() == Some(Method::Invite) {
            self.tx.respond_stateless(tx, bytes);
        } else {
            self.tx.respond(now, tx, status, bytes);
        }
    }

    fn response_builder(
        &self,
        req: &Message,
        flow: Flow,
        status: u16,
        reason: &str,
    ) -> MessageBuilder {
        let tag = self.to_tag(req);
        let tag = std::str::from_utf8(&tag).unwrap_or_default();
        let mut b =
            MessageBuilder::response_to_peer(req, Some(flow.remote), status, reason, Some(tag));
        b.header(HeaderName::Server, &self.cfg.server_name);
        b
    }

    /// A To tag that is the same for every retransmission of a request:
    /// 16 hex digits of a keyed hash.
    fn to_tag(&self, req: &Message) -> [u8; 16] {
        let mut h = self.tag_hasher.build_hasher();
        h.write(req.call_id().unwrap_or("").as_bytes());
        h.write(req.from().and_then(|f| f.tag()).unwrap_or("").as_bytes());
        h.write(
            req.top_via()
                .and_then(|v| v.branch())
                .unwrap_or("")
                .as_bytes(),
        );
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let v = h.finish();
        let mut out = [0u8; 16];
        for (i, d) in out.iter_mut().enumerate() {
            *d = DIGITS[((v >> (60 - 4 * i)) & 0xf) as usize];
        }
        out
    }

    fn send_stateless(&mut self, flow: Flow, req: &Message, status: u16, reason: &str) {
        let bytes = self.response_builder(req, flow, status, reason).finish();
        self.out
            .push_back(Output::Transmit(Transmit { flow, bytes }));
    }

    fn reply_unparsable(&mut self, flow: Flow, raw: &[u8], error: ParseError) {
        let reason = error.to_string();
        let status = match error {
            ParseError::BadVersion => 505,
            _ => 400,
        };
        if let Some(bytes) =
            MessageBuilder::error_response_for_raw(raw, flow.remote, status, &reason)
        {
            self.out
                .push_back(Output::Transmit(Transmit { flow, bytes }));
        }
    }
}

/// The checks every request must pass before it gets a transaction
/// (RFC 3261 §8.2). The error is the reason phrase of the `400`.
fn check_request(msg: &Message) -> Result<(), &'static str> {
    let vias = msg.header_values(HeaderName::Via).count();
    if vias == 0 || msg.top_via().is_none() {
        return Err("Missing Or Malformed Via");
    }
    if vias > MAX_VIA_COUNT {
        return Err("Too Many Via Headers");
    }
    if msg.from().is_none() {
        return Err("Missing Or Malformed From");
    }
    if msg.to().is_none() {
        return Err("Missing Or Malformed To");
    }
    if msg.call_id().is_none_or(str::is_empty) {
        return Err("Missing Call-ID");
    }
    match msg.cseq() {
        None => Err("Missing Or Malformed CSeq"),
        Some(c) if c.method_str != msg.method_str() => Err("CSeq Method Does Not Match"),
        Some(_) => Ok(()),
    }
}

/// Option tags in Require that Parley does not support (it supports none
/// yet), for a `420 Bad Extension` (RFC 3261 §8.2.2.3).
fn unsupported_requirements(msg: &Message) -> Option<String> {
    let tags: Vec<&str> = msg
        .header_values(HeaderName::Require)
        .filter(|t| {
            !SUPPORTED_OPTIONS
                .split(", ")
                .any(|s| s.eq_ignore_ascii_case(t))
        })
        .collect();
    (!tags.is_empty()).then(|| tags.join(", "))
}

fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_owned();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;
