//! Calls between extensions: Parley as a back-to-back user agent.
//!
//! The caller's INVITE ends here: Parley answers it on the caller's dialog
//! and starts a dialog of its own towards every registered device of the
//! callee (forking), each with its own Call-ID, tags, Contact and media leg.
//! The first device to answer wins; the others are cancelled. Nothing of
//! one side's signaling or media description reaches the other: SDP is
//! rewritten per leg by `pbx::anchor`, media flows through `media`.
//!
//! Built so far: authentication with 407, routing (404, 480), forking,
//! 180 relayed, first 2xx wins, the other forks cancelled, a late 2xx on
//! another fork acknowledged and hung up, failures summed up into one
//! final answer (486 over 480...), CANCEL from the caller, ACK, BYE from
//! either side, re-INVITE and UPDATE passed through (hold, resume), the
//! ring timeout, hang-up on media loss, early media from the first device
//! that sends SDP in an 18x, call records; INFO, offerless re-INVITEs and
//! session timers are in `in_dialog`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use bytes::Bytes;
use slab::Slab;

mod in_dialog;

use super::Core;
use crate::media::{LegId, LegKeys, LegMedia, LegPort, LegReport, MediaError, MediaEvent, OpenLeg};
use crate::pbx::anchor::{
    AnchorError, LocalMedia, OFFERED_SUITE, PhoneMedia, answer_for_caller, in_layout_of,
    offer_for_branch, read_phone_sdp,
};
use crate::pbx::auth::AuthResult;
use crate::pbx::cdr::{CallRecord, EndedBy, LegRecord, Outcome};
use crate::pbx::events::SecurityEvent;
use crate::pbx::policy::MediaSecurity;
use crate::sdp::{Direction, SessionDescription};
use crate::sip::dialog::{Dialog, MAX_FORWARDS};
use crate::sip::message::{Framing, HeaderName, Message, MessageBuilder, Method, NameAddr, Uri};
use crate::sip::transaction::{ClientTxId, ServerTxId};
use crate::sip::transport::{Flow, Transport};
use crate::srtp::MasterKey;
use in_dialog::{Relayed, SessionTimer, SessionTimerRequest, session_timer_request};
use smallvec::SmallVec;

/// Most calls up at once; beyond this new INVITEs get 503.
pub const MAX_CALLS: usize = 10_000;
/// Most devices one call rings at once.
pub const MAX_FORKS: usize = 8;
/// How long a finished call's record waits for its legs' media
/// statistics from the relay before it is written without them.
const REPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the call logic needs from the media plane. The runtime implements
/// it on `media::MediaEngine`; tests use a recording fake.
pub trait MediaControl: Send {
    /// A fresh leg, on the shared port or a free pair of its own.
    fn open_leg(&mut self, port: LegPort) -> Result<OpenLeg, MediaError>;
    fn configure(&mut self, id: LegId, media: LegMedia);
    fn bridge(&mut self, a: LegId, b: LegId);
    fn close(&mut self, id: LegId);
}

/// The media plane when none is configured: every call is refused with 503.
pub struct NoMedia;

impl MediaControl for NoMedia {
    fn open_leg(&mut self, _: LegPort) -> Result<OpenLeg, MediaError> {
        Err(MediaError::Stopped)
    }
    fn configure(&mut self, _: LegId, _: LegMedia) {}
    fn bridge(&mut self, _: LegId, _: LegId) {}
    fn close(&mut self, _: LegId) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BranchState {
    Calling,
    Ringing,
    Answered,
    /// Final non-2xx response, or timeout (408).
    Failed(u16),
    /// CANCEL sent, or due at the device's first provisional response
    /// (`Branch::cancel_deferred`).
    Cancelled,
    /// Answered after another device won: ACKed and sent BYE.
    HungUp,
}

struct Branch {
    tx: ClientTxId,
    flow: Flow,
    request: Message,
    leg: OpenLeg,
    local: LocalMedia,
    security: MediaSecurity,
    offer: SessionDescription,
    state: BranchState,
    /// Why the device could not take the call's media, when that is known
    /// (the reason phrase of a 488 the caller gets).
    media_refusal: Option<String>,
    /// The device sent a provisional response (100 included).
    heard_from: bool,
    /// To tags of dialogs this fork's INVITE made that Parley hung up, each
    /// with one BYE: a device that answered too late, or whose media was
    /// refused, and further dialogs (other To tags) of any fork, the
    /// winner's included (RFC 3261 §13.2.2.4).
    hung_up_dialogs: Vec<String>,
    /// The fork was cancelled before the device sent any provisional
    /// response: its CANCEL goes out with the first one (RFC 3261 §9.1
    /// forbids it earlier, since it could overtake a lost INVITE that
    /// retransmissions later deliver, leaving the device ringing).
    cancel_deferred: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ringing,
    Answered,
}

/// The `by_branch` slot of a re-INVITE Parley sent on a call's other side.
const REINVITE: usize = usize::MAX - 1;
/// The `by_branch` slot of a request relayed to the other side (INFO).
const RELAYED: usize = usize::MAX - 2;
/// The `by_branch` slot of Parley's own session refresh to the caller.
const SESSION_REFRESH: usize = usize::MAX - 3;
/// The `by_branch` slot of Parley's re-INVITE restoring one side.
const REPAIR: usize = usize::MAX - 4;
/// SRTP refusals on one leg beyond which a call's end logs a warning.
const REFUSED_WORTH_A_WARNING: u64 = 50;
/// Why a call ends when a side cannot be given a session Parley carries.
const RENEGOTIATION_FAILED: &str = "Media Renegotiation Failed";

/// A re-INVITE in progress: one side's new offer, passed to the other.
struct Reinvite {
    /// INVITE or UPDATE.
    method: Method,
    /// Who sent it, on which transaction.
    from: Side,
    tx: ServerTxId,
    request: Message,
    flow: Flow,
    offer: PhoneMedia,
    /// What Parley offered the other side, and under which CSeq.
    sent: SessionDescription,
    sent_seq: u32,
    /// Its sender cancelled it (and has its 487): the other side's answer,
    /// when it comes, is undone rather than passed on.
    cancelled: bool,
}

/// A re-INVITE or UPDATE from the callee that came before the caller
/// acknowledged Parley's 200: Parley may not start one towards the caller
/// yet (RFC 3261 §14.1), so it waits, and is passed on with the ACK.
struct HeldReinvite {
    method: Method,
    tx: ServerTxId,
    request: Message,
    flow: Flow,
}

/// Parley's re-INVITE to one side with the description that side had
/// before an exchange that left it with one Parley does not carry.
struct Repair {
    side: Side,
    sent: SessionDescription,
    sent_seq: u32,
}

/// Which side of a call a dialog belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Caller,
    Callee,
}

impl Side {
    /// An index for per-side arrays.
    fn index(self) -> usize {
        match self {
            Side::Caller => 0,
            Side::Callee => 1,
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Caller => Side::Callee,
            Side::Callee => Side::Caller,
        }
    }
}

struct Call {
    /// Tells a reused slab slot from the call a timer was armed for.
    uid: u64,
    call_ref: String,
    caller: String,
    callee: String,
    started: Instant,
    answered: Option<Instant>,
    state: State,
    invite_tx: ServerTxId,
    invite: Message,
    caller_flow: Flow,
    caller_media: PhoneMedia,
    caller_leg: OpenLeg,
    caller_local: LocalMedia,
    caller_dialog: Option<Dialog>,
    branches: Vec<Branch>,
    winner: Option<usize>,
    callee_dialog: Option<Dialog>,
    callee_media: Option<PhoneMedia>,
    ringing_sent: bool,
    reinvite: Option<Reinvite>,
    held: Option<HeldReinvite>,
    /// Parley's own offer restoring one side's session after a failed
    /// re-INVITE exchange (see `restore_side`).
    repair: Option<Repair>,
    /// What the caller's INVITE asked of session timers.
    session_request: Option<SessionTimerRequest>,
    session: Option<SessionTimer>,
    /// The description Parley last sent the caller (repeated in refreshes
    /// and offerless re-INVITEs).
    sent_to_caller: Option<SessionDescription>,
    /// CSeq of Parley's refresh re-INVITE in flight, to acknowledge its 2xx.
    refresh_seq: Option<u32>,
    /// Parley put an offer in a 200 to this side; the answer is in its ACK.
    /// (Per side: both may have an offerless re-INVITE answered at once.)
    /// The CSeq of that 200's re-INVITE: only its ACK carries the answer.
    offer_in_ok: [Option<u32>; 2],
    /// Per side: the TCP/TLS connection its phone was reached on closed,
    /// and the phone has not been heard from on another one yet.
    flow_lost: [bool; 2],
    /// The device whose early media (18x with SDP) the caller hears.
    early: Option<usize>,
    /// Legs reported quiet while the call was on hold, with when their
    /// silence began; a leg leaves when it is heard again or reconfigured.
    held_quiet: SmallVec<[(LegId, Instant); 2]>,
    /// When each leg was last configured: the relay restarts a leg's quiet
    /// clock then, so a quiet report from before that is out of date.
    configured_at: SmallVec<[(LegId, Instant); 2]>,
}

impl Call {
    /// Where `side`'s phone is reached (the callee's once one answered).
    fn flow_of(&self, side: Side) -> Option<Flow> {
        match side {
            Side::Caller => Some(self.caller_flow),
            Side::Callee => self.winner.map(|w| self.branches[w].flow),
        }
    }

    fn flow_of_mut(&mut self, side: Side) -> Option<&mut Flow> {
        match side {
            Side::Caller => Some(&mut self.caller_flow),
            Side::Callee => self.winner.map(|w| &mut self.branches[w].flow),
        }
    }

    /// Whether either phone's latest description holds the media (any
    /// direction but sendrecv).
    fn on_hold(&self) -> bool {
        let held = |m: &PhoneMedia| m.direction() != Direction::SendRecv;
        held(&self.caller_media) || self.callee_media.as_ref().is_some_and(held)
    }
}

/// Every call in progress, with the indexes that find one from a
/// transaction or a dialog.
#[derive(Default)]
pub(crate) struct Calls {
    calls: Slab<Call>,
    by_invite: HashMap<ServerTxId, usize>,
    /// (Call-ID, From tag, CSeq) of each call's INVITE, to tell a copy of
    /// it that came another way (RFC 3261 §8.2.2.2).
    by_request: HashMap<(Box<str>, Box<str>, u32), usize>,
    by_branch: HashMap<ClientTxId, (usize, usize)>,
    /// (Call-ID, Parley's tag) of each established dialog.
    by_dialog: HashMap<(String, String), (usize, Side)>,
    /// The two bridged legs of each answered call.
    by_leg: HashMap<LegId, usize>,
    /// Ring timeouts.
    ring_timers: CallTimers,
    /// Records of ended calls waiting for their legs' statistics.
    pending: Vec<PendingRecord>,
    next_ref: u64,
    /// Requests passed to the other side, by the transaction Parley sent.
    relayed: HashMap<ClientTxId, Relayed>,
    /// Session timers; stale entries skipped.
    session_timers: CallTimers,
    /// When a quiet leg of a held call may have run out of time; checked
    /// against `held_quiet` when due.
    hold_timers: CallTimers,
    /// Forks of ended calls whose INVITE may still be answered (a phone
    /// picked up just as the caller hung up): a late 2xx gets ACK and BYE.
    late_forks: HashMap<ClientTxId, LateFork>,
    /// ACKs Parley sent for 2xx answers to its own re-INVITEs, kept 64·T1:
    /// a repeated 2xx (the ACK was lost) gets the ACK again, or the phone
    /// would hang up (RFC 3261 §13.2.2.4).
    sent_acks: HashMap<ClientTxId, (Flow, Bytes, Instant)>,
    /// BYEs for callers whose call ended (the callee hung up) before they
    /// acknowledged Parley's 200: each goes out with the ACK, or when the
    /// 200 is given up on.
    byes_after_ack: Vec<ByeAfterAck>,
}

struct ByeAfterAck {
    /// The caller's INVITE transaction and dialog (Call-ID, Parley's tag).
    invite_tx: ServerTxId,
    dialog: (String, String),
    flow: Flow,
    bye: Bytes,
    /// When the INVITE transaction is surely over.
    until: Instant,
}

struct LateFork {
    request: Message,
    flow: Flow,
    /// To tags of its dialogs Parley hung up (each gets one BYE).
    hung_up: Vec<String>,
    /// Its CANCEL still waits for a provisional response.
    cancel_deferred: bool,
    /// When the INVITE transaction is surely over (64·T1 after the end).
    until: Instant,
}

/// Most forks of ended calls watched for a late answer.
const MAX_LATE_FORKS: usize = MAX_CALLS;

/// A CANCEL for `invite` (RFC 3261 §9.1: its Request-URI, top Via,
/// Call-ID, From, To and CSeq number).
pub(super) fn cancel_for(invite: &Message) -> Bytes {
    let mut b = MessageBuilder::request("CANCEL", invite.request_uri());
    for (name, value) in [
        (HeaderName::Via, invite.header(HeaderName::Via)),
        (HeaderName::From, invite.header(HeaderName::From)),
        (HeaderName::To, invite.header(HeaderName::To)),
        (HeaderName::CallId, invite.header(HeaderName::CallId)),
    ] {
        b.header(name, value.unwrap_or(""));
    }
    let seq = invite.cseq().map_or(1, |c| c.seq);
    b.header_fmt(HeaderName::CSeq, format_args!("{seq} CANCEL"));
    b.header(HeaderName::MaxForwards, MAX_FORWARDS);
    b.finish_with_body(None, b"")
}

/// Watches fork `b`, which is over, for a 2xx until `until` (when its
/// INVITE transaction surely is). Beyond [`MAX_LATE_FORKS`] a fork is not
/// watched.
fn watch_late_fork(late_forks: &mut HashMap<ClientTxId, LateFork>, b: &Branch, until: Instant) {
    if late_forks.len() < MAX_LATE_FORKS {
        late_forks.insert(
            b.tx,
            LateFork {
                request: b.request.clone(),
                flow: b.flow,
                hung_up: b.hung_up_dialogs.clone(),
                cancel_deferred: b.cancel_deferred,
                until,
            },
        );
    }
}

struct PendingRecord {
    record: CallRecord,
    caller_leg: LegId,
    callee_leg: Option<LegId>,
    deadline: Instant,
}

impl PendingRecord {
    fn complete(&self) -> bool {
        self.record.caller_leg.media.is_some()
            && (self.callee_leg.is_none()
                || self
                    .record
                    .callee_leg
                    .as_ref()
                    .is_some_and(|l| l.media.is_some()))
    }
}

/// Deadlines for calls: (when, call slot, call uid), earliest first. A
/// slot may hold a newer call by the time an entry falls due, so the uid
/// is checked ([`Calls::live`]).
#[derive(Default)]
struct CallTimers(BinaryHeap<Reverse<(Instant, usize, u64)>>);

impl CallTimers {
    fn arm(&mut self, at: Instant, idx: usize, uid: u64) {
        self.0.push(Reverse((at, idx, uid)));
    }

    fn next(&self) -> Option<Instant> {
        self.0.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The earliest entry, taken if it is due by `now`.
    fn pop_due(&mut self, now: Instant) -> Option<(Instant, usize, u64)> {
        let &Reverse(entry) = self.0.peek()?;
        if entry.0 > now {
            return None;
        }
        self.0.pop();
        Some(entry)
    }
}

impl Calls {
    pub(crate) fn len(&self) -> usize {
        self.calls.len()
    }

    /// The call in slot `idx`, if it is still the one with `uid`.
    fn live(&self, idx: usize, uid: u64) -> Option<&Call> {
        self.calls.get(idx).filter(|c| c.uid == uid)
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let ring = self.ring_timers.next();
        let report = self.pending.iter().map(|p| p.deadline).min();
        let session = self.session_timers.next();
        let hold = self.hold_timers.next();
        ring.into_iter()
            .chain(report)
            .chain(session)
            .chain(hold)
            .min()
    }
}

/// Where a leg's media arrives: only a leg certain to be SRTP for the whole
/// call (a renegotiated leg keeps its protection) goes on the shared port,
/// where packets are matched to legs by authentication.
fn leg_port(certain_srtp: bool) -> LegPort {
    if certain_srtp {
        LegPort::Shared
    } else {
        LegPort::Own
    }
}

/// A renegotiated leg keeps its protection: SRTP stays SRTP, plain stays
/// plain.
fn kept_security(current: Option<&PhoneMedia>) -> MediaSecurity {
    if current.is_some_and(PhoneMedia::is_srtp) {
        MediaSecurity::Srtp
    } else {
        MediaSecurity::Plain
    }
}

pub(super) fn random_hex() -> String {
    format!("{:016x}", rand::random::<u64>())
}

pub(super) fn branch_id() -> String {
    format!("z9hG4bK{}", random_hex())
}

/// Where a final status comes from when every device failed: the most
/// telling one wins (RFC 3261 §16.7 picks the "best" response similarly).
fn summarize(statuses: &[u16]) -> (u16, &'static str, Outcome) {
    if statuses.iter().any(|&s| s == 486 || s == 600) {
        (486, "Busy Here", Outcome::Busy)
    } else if statuses.contains(&603) {
        (603, "Decline", Outcome::Declined)
    } else if statuses.contains(&488) {
        (488, "Not Acceptable Here", Outcome::Rejected)
    } else if statuses.contains(&408) {
        (408, "Request Timeout", Outcome::NoAnswer)
    } else {
        (480, "Temporarily Unavailable", Outcome::Unavailable)
    }
}

impl Core {
    /// Parley's address towards a device on `flow`, for its Via, Contact
    /// and SDP: the public `advertise` address for a device outside the
    /// LAN networks when one is configured; otherwise the flow's local
    /// address, or, when the socket is bound to all addresses, the one
    /// the host routes towards the device from.
    fn local_host(&self, flow: &Flow) -> SocketAddr {
        let remote = flow.remote.ip();
        let ip = match self.cfg.advertise {
            Some(public) if !self.cfg.lan.contains(remote) => public,
            _ if !flow.local.ip().is_unspecified() => flow.local.ip(),
            advertise => self
                .routes
                .source_for(remote)
                .or(advertise)
                .unwrap_or(IpAddr::from([127, 0, 0, 1])),
        };
        SocketAddr::new(ip, flow.local.port())
    }

    /// The address media must reach Parley at, for a device on `flow`.
    fn media_address(&self, flow: &Flow) -> IpAddr {
        self.local_host(flow).ip()
    }

    /// Parley's side of a new leg towards a device on `flow`: its address,
    /// the leg's port, a fresh key, a new SDP session.
    fn new_local_media(&self, flow: &Flow, leg: &OpenLeg) -> LocalMedia {
        LocalMedia {
            addr: self.media_address(flow),
            port: leg.port,
            key: MasterKey::generate(),
            session_id: rand::random::<u32>().into(),
            version: 1,
        }
    }

    fn contact_uri(&self, flow: &Flow) -> String {
        let host = self.local_host(flow);
        match flow.transport {
            Transport::Udp => format!("sip:parley@{host}"),
            t => format!("sip:parley@{host};transport={}", t.as_str()),
        }
    }

    pub(super) fn via(&self, flow: &Flow, branch: &str) -> String {
        format!(
            "SIP/2.0/{} {};branch={branch};rport",
            flow.transport.via_token(),
            self.local_host(flow)
        )
    }

    fn reject(
        &mut self,
        now: Instant,
        tx: ServerTxId,
        msg: &Message,
        flow: Flow,
        status: u16,
        reason: &str,
    ) {
        let b = self.response_builder(msg, flow, status, reason);
        self.respond(now, tx, status, b.finish());
    }

    /// [`Core::reject`] for a request before its sender is authenticated
    /// (see `respond_unauthenticated`).
    fn reject_unauthenticated(
        &mut self,
        now: Instant,
        tx: ServerTxId,
        msg: &Message,
        flow: Flow,
        status: u16,
        reason: &str,
    ) {
        let b = self.response_builder(msg, flow, status, reason);
        self.respond_unauthenticated(now, tx, msg, status, b.finish());
    }

    /// A new INVITE (no To tag): authenticate the caller, route to the
    /// callee's devices.
    pub(super) fn handle_invite(&mut self, now: Instant, tx: ServerTxId, msg: Message, flow: Flow) {
        let from_user = msg
            .from()
            .and_then(|f| Uri::parse(f.uri).ok())
            .and_then(|u| u.user)
            .map(super::percent_decode);
        let Some(caller) = from_user else {
            return self.reject_unauthenticated(
                now,
                tx,
                &msg,
                flow,
                400,
                "From URI Must Name An Extension",
            );
        };
        // The caller's dialog is formed only when the call is answered, and
        // by then the callee has been connected: what would keep it from
        // forming (no Contact, no From tag, too long a route) is refused now.
        if let Err(e) = Dialog::as_uas(&msg, "-", "<sip:check.invalid>", 1) {
            let reason = format!("Cannot Form A Dialog ({e})");
            return self.reject_unauthenticated(now, tx, &msg, flow, 400, &reason);
        }
        // The same INVITE on a new transaction: a copy that reached Parley
        // by another path (a forking proxy in front). One call is enough.
        if request_key(&msg).is_some_and(|k| self.calls.by_request.contains_key(&k)) {
            return self.reject_unauthenticated(
                now,
                tx,
                &msg,
                flow,
                482,
                "Loop Detected (Merged Request)",
            );
        }
        let source = flow.remote.ip();
        if self.lockout.blocked(now, source, &caller).is_some() {
            let b = self.response_builder(&msg, flow, 403, "Too Many Failed Attempts");
            self.tx.respond_stateless(tx, b.finish());
            return;
        }
        let unix_secs = self.nonce_secs(now);
        let ext = match self.auth.check(
            unix_secs,
            source,
            &msg,
            HeaderName::ProxyAuthorization,
            &caller,
            &self.directory,
        ) {
            AuthResult::Authenticated(ext) => ext,
            AuthResult::Challenge => return self.challenge(now, tx, &msg, flow, false, true),
            AuthResult::Stale => return self.challenge(now, tx, &msg, flow, true, true),
            AuthResult::Malformed(e) => {
                return self.reject_unauthenticated(
                    now,
                    tx,
                    &msg,
                    flow,
                    400,
                    &format!("Malformed Proxy-Authorization ({e})"),
                );
            }
            AuthResult::WrongUser { username } => {
                tracing::warn!(%username, caller = %caller, "credentials of another extension refused");
                self.security(SecurityEvent::WrongUser {
                    source,
                    extension: caller.clone(),
                    username,
                });
                return self.reject_unauthenticated(
                    now,
                    tx,
                    &msg,
                    flow,
                    403,
                    "Credentials Do Not Match The Calling Extension",
                );
            }
            AuthResult::Failed { username } => {
                tracing::info!(%username, caller = %caller, "call authentication failed");
                self.auth_failed(now, flow, &caller);
                return self.challenge(now, tx, &msg, flow, false, true);
            }
        };
        // As for REGISTER, a success clears this pair's failures.
        self.lockout.record_success(source, &caller);
        let caller_policy = ext.encryption;
        let span = tracing::info_span!("call", caller = %caller, source = %flow.remote);
        let _entered = span.enter();
        if self.calls.len() >= MAX_CALLS {
            let mut b = self.response_builder(&msg, flow, 503, "Too Many Calls");
            b.header(HeaderName::RetryAfter, "5");
            self.respond(now, tx, 503, b.finish());
            return;
        }
        let session_request = match session_timer_request(&msg) {
            Ok(r) => r,
            Err(min_se) => {
                let mut b = self.response_builder(&msg, flow, 422, "Session Interval Too Small");
                b.header_fmt(HeaderName::MinSe, format_args!("{min_se}"));
                self.respond(now, tx, 422, b.finish());
                return;
            }
        };
        let caller_security = match caller_policy.media_security(
            flow.transport,
            source,
            &self.cfg.lan,
        ) {
            Ok(s) => s,
            Err(v) => {
                tracing::warn!(violation = %v, "call refused by the caller's encryption policy");
                self.security(SecurityEvent::PolicyViolation {
                    source,
                    extension: caller.clone(),
                    transport: flow.transport,
                    violation: v,
                });
                let dialed = dialed_number(&msg);
                return self.refuse_call(
                    now,
                    tx,
                    &msg,
                    flow,
                    403,
                    &v.to_string(),
                    &caller,
                    &dialed,
                );
            }
        };

        let callee = Uri::parse(msg.request_uri())
            .ok()
            .and_then(|u| u.user)
            .map(super::percent_decode);
        let Some(callee) = callee.filter(|c| self.directory.get(c).is_some()) else {
            let dialed = dialed_number(&msg);
            return self.refuse_call(now, tx, &msg, flow, 404, "Not Found", &caller, &dialed);
        };
        let callee_policy = self
            .directory
            .get(&callee)
            .map(|e| e.encryption)
            .unwrap_or_default();
        // Contacts that stopped answering keep-alive pings are not rung.
        let reachable = || {
            self.registrar
                .bindings(&callee)
                .iter()
                .filter(|b| !self.keepalive.is_unreachable(&b.aor, &b.key))
        };
        let bindings: Vec<Flow> = reachable().map(|b| b.flow).collect();
        let contacts: Vec<String> = reachable().map(|b| b.contact.to_string()).collect();
        if bindings.is_empty() {
            return self.refuse_call(
                now,
                tx,
                &msg,
                flow,
                480,
                "Temporarily Unavailable",
                &caller,
                &callee,
            );
        }

        let offer = match read_phone_sdp(
            msg.body(),
            flow.transport == Transport::Tls,
            caller_security,
            None,
        ) {
            Ok(o) => o,
            Err(e) => {
                tracing::info!(error = %e, "caller's offer refused");
                return self.refuse_call(
                    now,
                    tx,
                    &msg,
                    flow,
                    488,
                    &e.to_string(),
                    &caller,
                    &callee,
                );
            }
        };
        if offer.keys_over_plain {
            tracing::warn!("caller put SRTP keys in SDP over plain signaling; they were ignored");
        }
        let caller_leg = match self.media.open_leg(leg_port(offer.is_srtp())) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "no media port for the caller's leg");
                return self.refuse_call(
                    now,
                    tx,
                    &msg,
                    flow,
                    503,
                    "No Media Port Available",
                    &caller,
                    &callee,
                );
            }
        };
        let caller_local = self.new_local_media(&flow, &caller_leg);
        self.respond(
            now,
            tx,
            100,
            self.response_builder(&msg, flow, 100, "Trying").finish(),
        );

        self.calls.next_ref += 1;
        let uid = self.calls.next_ref;
        let call_ref = format!("call-{}-{}", self.calls.next_ref, &random_hex());
        tracing::info!(%call_ref, %callee, devices = bindings.len(), "call routed");
        let call_id = format!("{}@parley", random_hex());
        let from_tag = random_hex();
        let display = msg
            .from()
            .and_then(|f| f.display)
            .filter(|d| !d.is_empty())
            .map(|d| format!("{d} "))
            .unwrap_or_default();
        let mut branches = Vec::new();
        for (binding_flow, contact) in bindings.into_iter().zip(contacts).take(MAX_FORKS) {
            let security = match callee_policy.media_security(
                binding_flow.transport,
                binding_flow.remote.ip(),
                &self.cfg.lan,
            ) {
                Ok(s) => s,
                Err(_) => continue,
            };
            let Ok(leg) = self
                .media
                .open_leg(leg_port(security == MediaSecurity::Srtp))
            else {
                tracing::error!("no media port for a callee leg");
                continue;
            };
            let local = self.new_local_media(&binding_flow, &leg);
            let sdp = offer_for_branch(&offer, security, &local, OFFERED_SUITE);
            let target = NameAddr::parse(&contact)
                .map(|c| c.uri.to_string())
                .unwrap_or(contact.clone());
            let mut b = MessageBuilder::request("INVITE", &target);
            b.header(HeaderName::Via, &self.via(&binding_flow, &branch_id()));
            b.header(HeaderName::MaxForwards, MAX_FORWARDS);
            b.header_fmt(
                HeaderName::From,
                format_args!("{display}<sip:{caller}@{}>;tag={from_tag}", self.cfg.domain),
            );
            b.header_fmt(
                HeaderName::To,
                format_args!("<sip:{callee}@{}>", self.cfg.domain),
            );
            b.header(HeaderName::CallId, &call_id);
            b.header(HeaderName::CSeq, "1 INVITE");
            b.header_fmt(
                HeaderName::Contact,
                format_args!("<{}>", self.contact_uri(&binding_flow)),
            );
            b.header(HeaderName::Allow, super::ALLOWED_METHODS);
            b.header(HeaderName::UserAgent, &self.cfg.server_name);
            let bytes = b.finish_with_body(Some("application/sdp"), &sdp.to_bytes());
            let Ok(request) = Message::parse(bytes.clone(), Framing::Datagram) else {
                self.media.close(leg.id);
                continue;
            };
            match self.tx.send_request(now, binding_flow, bytes) {
                Ok(ctx) => branches.push(Branch {
                    tx: ctx,
                    flow: binding_flow,
                    request,
                    leg,
                    local,
                    security,
                    offer: sdp,
                    state: BranchState::Calling,
                    media_refusal: None,
                    heard_from: false,
                    hung_up_dialogs: Vec::new(),
                    cancel_deferred: false,
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a fork");
                    self.media.close(leg.id);
                }
            }
        }
        if branches.is_empty() {
            self.media.close(caller_leg.id);
            // Every device was unusable under the callee's policy.
            return self.refuse_call(
                now,
                tx,
                &msg,
                flow,
                480,
                "No Device Can Take The Call Securely",
                &caller,
                &callee,
            );
        }
        let entry = self.calls.calls.vacant_entry();
        let idx = entry.key();
        for (i, b) in branches.iter().enumerate() {
            self.calls.by_branch.insert(b.tx, (idx, i));
        }
        self.calls.by_invite.insert(tx, idx);
        if let Some(key) = request_key(&msg) {
            self.calls.by_request.insert(key, idx);
        }
        self.calls
            .ring_timers
            .arm(now + self.cfg.ring_timeout, idx, uid);
        entry.insert(Call {
            uid,
            call_ref,
            caller,
            callee,
            started: now,
            answered: None,
            state: State::Ringing,
            invite_tx: tx,
            invite: msg,
            caller_flow: flow,
            caller_media: offer,
            caller_leg,
            caller_local,
            caller_dialog: None,
            branches,
            winner: None,
            callee_dialog: None,
            callee_media: None,
            ringing_sent: false,
            session_request,
            session: None,
            sent_to_caller: None,
            refresh_seq: None,
            offer_in_ok: [None; 2],
            flow_lost: [false; 2],
            early: None,
            held_quiet: SmallVec::new(),
            configured_at: SmallVec::new(),
            reinvite: None,
            held: None,
            repair: None,
        });
    }

    /// Refuses a call from an authenticated caller; the attempt goes into
    /// the history with the status the caller got.
    #[allow(clippy::too_many_arguments)]
    fn refuse_call(
        &mut self,
        now: Instant,
        tx: ServerTxId,
        msg: &Message,
        flow: Flow,
        status: u16,
        reason: &str,
        caller: &str,
        callee: &str,
    ) {
        self.reject(now, tx, msg, flow, status, reason);
        let outcome = match status {
            404 => Outcome::NotFound,
            480 => Outcome::Unavailable,
            403 | 488 => Outcome::Rejected,
            _ => Outcome::Failed,
        };
        tracing::info!(%callee, status, reason, "call refused");
        let at = self.clock.unix(now).as_millis() as i64;
        self.calls.next_ref += 1;
        let record = CallRecord {
            call_ref: format!("call-{}-{}", self.calls.next_ref, &random_hex()),
            caller: caller.to_string(),
            callee: callee.to_string(),
            started_unix_ms: at,
            answered_unix_ms: None,
            ended_unix_ms: at,
            outcome,
            sip_status: status,
            sip_reason: reason.to_string(),
            ended_by: None,
            caller_leg: LegRecord {
                transport: flow.transport,
                tls_version: self.tls_versions.get(&flow.conn).map(|v| v.to_string()),
                srtp: None,
                media: None,
            },
            callee_leg: None,
        };
        self.out
            .push_back(super::Output::CallEnded(Box::new(record)));
    }

    /// A response on one of the forks.
    pub(super) fn call_response(&mut self, now: Instant, ctx: ClientTxId, msg: Message) {
        let Some(&(idx, bi)) = self.calls.by_branch.get(&ctx) else {
            return self.late_fork_response(now, ctx, &msg);
        };
        let status = msg.status().unwrap_or(500);
        match bi {
            REINVITE => return self.reinvite_response(now, idx, ctx, msg),
            RELAYED => return self.relayed_response(now, ctx, &msg),
            SESSION_REFRESH => return self.session_refresh_response(now, idx, ctx, &msg),
            REPAIR => return self.repair_response(now, idx, ctx, &msg),
            _ => {}
        }
        if msg.cseq().is_some_and(|c| c.method != Method::Invite) {
            // Responses to BYE or CANCEL need nothing more.
            self.calls.by_branch.remove(&ctx);
            return;
        }
        let branch = &mut self.calls.calls[idx].branches[bi];
        if status < 200 {
            branch.heard_from = true;
            if branch.cancel_deferred {
                branch.cancel_deferred = false;
                return self.send_cancel(now, idx, bi);
            }
        }
        match status {
            100 => {}
            101..=199 => self.fork_ringing(now, idx, bi, &msg),
            200..=299 => self.fork_answered(now, idx, bi, msg),
            _ => {
                let branch = &mut self.calls.calls[idx].branches[bi];
                if status == 488 && branch.security == MediaSecurity::Srtp {
                    branch.media_refusal =
                        Some("Callee Refused The Media Offer (SRTP Required By Policy)".into());
                }
                self.fork_failed(now, idx, bi, status)
            }
        }
    }

    pub(super) fn call_client_timeout(&mut self, now: Instant, ctx: ClientTxId) {
        self.calls.late_forks.remove(&ctx);
        if let Some(&(idx, bi)) = self.calls.by_branch.get(&ctx) {
            if bi == RELAYED {
                return self.relayed_timeout(now, ctx);
            }
            if bi == REPAIR {
                self.calls.by_branch.remove(&ctx);
                tracing::warn!(call_ref = %self.calls.calls[idx].call_ref, "no answer to Parley's offer restoring a side; ending the call");
                return self.end_answered_call(now, idx, RENEGOTIATION_FAILED);
            }
            if bi == SESSION_REFRESH {
                self.calls.by_branch.remove(&ctx);
                tracing::warn!(call_ref = %self.calls.calls[idx].call_ref, "the caller did not answer a session refresh; ending the call");
                return self.end_answered_call(now, idx, "Session Refresh Failed");
            }
            if bi == REINVITE {
                self.calls.by_branch.remove(&ctx);
                if let Some(r) = self.calls.calls[idx].reinvite.take() {
                    let b = self.response_builder(&r.request, r.flow, 408, "Request Timeout");
                    self.respond(now, r.tx, 408, b.finish());
                }
                // No answer at all ends the dialog, as a 408 would (RFC
                // 3261 §12.2.1.2): so the call.
                tracing::warn!(call_ref = %self.calls.calls[idx].call_ref, "no answer to a passed-on re-INVITE; ending the call");
                return self.end_answered_call(now, idx, "Dialog Gone");
            }
            let is_invite = self.calls.calls[idx]
                .branches
                .get(bi)
                .is_some_and(|b| b.tx == ctx);
            if is_invite {
                self.fork_failed(now, idx, bi, 408);
            } else {
                self.calls.by_branch.remove(&ctx);
            }
        }
    }

    fn fork_ringing(&mut self, now: Instant, idx: usize, bi: usize, msg: &Message) {
        let call = &mut self.calls.calls[idx];
        if call.branches[bi].state == BranchState::Calling {
            call.branches[bi].state = BranchState::Ringing;
        }
        if call.state != State::Ringing {
            return;
        }
        if !msg.body().is_empty()
            && call.early.is_none()
            && self.fork_early_media(now, idx, bi, msg)
        {
            return;
        }
        let call = &mut self.calls.calls[idx];
        if call.ringing_sent {
            return;
        }
        call.ringing_sent = true;
        let (tx, flow) = (call.invite_tx, call.caller_flow);
        let b = self.response_builder(&self.calls.calls[idx].invite, flow, 180, "Ringing");
        self.respond(now, tx, 180, b.finish());
    }

    /// A device's 18x with SDP (a ringback tone, an announcement): the
    /// first one is bridged to the caller at once, with a 183 carrying
    /// Parley's answer, so the caller hears it before the call is answered.
    /// The 2xx later repeats the same answer.
    fn fork_early_media(&mut self, now: Instant, idx: usize, bi: usize, msg: &Message) -> bool {
        let call = &self.calls.calls[idx];
        let branch = &call.branches[bi];
        let tls = branch.flow.transport == Transport::Tls;
        let answer = match read_phone_sdp(msg.body(), tls, branch.security, Some(&branch.offer)) {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(error = %e, "early media description refused; ringing without it");
                return false;
            }
        };
        let Ok(caller_answer) = self.answer_to_caller(idx, &answer) else {
            return false;
        };
        let device_flow = self.calls.calls[idx].branches[bi].flow;
        self.bridge_legs(now, idx, bi, &answer, device_flow);
        let call = &self.calls.calls[idx];
        let contact = self.contact_uri(&call.caller_flow);
        let mut b = self.response_builder(&call.invite, call.caller_flow, 183, "Session Progress");
        b.header_fmt(HeaderName::Contact, format_args!("<{contact}>"));
        let progress = b.finish_with_body(Some("application/sdp"), &caller_answer.to_bytes());
        let invite_tx = call.invite_tx;
        tracing::info!(call_ref = %call.call_ref, "early media from a ringing device");
        self.respond(now, invite_tx, 183, progress);
        let call = &mut self.calls.calls[idx];
        call.early = Some(bi);
        call.ringing_sent = true;
        call.sent_to_caller = Some(caller_answer);
        true
    }

    /// Parley's answer to the caller's offer for a device's `answer`. The
    /// caller may already have had another (early media from another
    /// device, or one that changed its mind in its 2xx): a different
    /// description then gets a new `o=` version, so the caller does not
    /// take it for the one it has (RFC 3264 §8).
    fn answer_to_caller(
        &mut self,
        idx: usize,
        answer: &PhoneMedia,
    ) -> Result<SessionDescription, AnchorError> {
        let call = &mut self.calls.calls[idx];
        let mut sdp = answer_for_caller(&call.caller_media, answer, &call.caller_local)?;
        if call
            .sent_to_caller
            .as_ref()
            .is_some_and(|prev| *prev != sdp)
        {
            call.caller_local.version += 1;
            sdp.origin.session_version = call.caller_local.version;
        }
        Ok(sdp)
    }

    /// Both legs follow a device's answer (early or final) and are bridged:
    /// each leg hears its own phone with the phone's key and speaks to it
    /// with Parley's key for that leg.
    fn bridge_legs(
        &mut self,
        now: Instant,
        idx: usize,
        bi: usize,
        answer: &PhoneMedia,
        device_flow: Flow,
    ) {
        let call = &self.calls.calls[idx];
        let branch = &call.branches[bi];
        let caller_media = leg_media(
            &call.caller_media,
            &call.caller_local,
            call.caller_flow,
            answer,
        );
        let callee_media = leg_media(answer, &branch.local, device_flow, answer);
        let (caller_leg, callee_leg) = (call.caller_leg.id, branch.leg.id);
        self.configure_leg(now, idx, caller_leg, caller_media);
        self.configure_leg(now, idx, callee_leg, callee_media);
        self.media.bridge(caller_leg, callee_leg);
    }

    /// A device's 2xx whose media Parley refuses (already acknowledged):
    /// the device is hung up and its fork fails with `status`; the reason is
    /// kept for the caller's 488, and should the device repeat its 2xx (the
    /// ACK lost), the repeats are acknowledged too, with no second BYE.
    fn refuse_fork_media(
        &mut self,
        now: Instant,
        idx: usize,
        bi: usize,
        dialog: &mut Dialog,
        e: &AnchorError,
        status: u16,
    ) {
        let flow = self.calls.calls[idx].branches[bi].flow;
        let via = self.via(&flow, &branch_id());
        let bye = dialog
            .request("BYE", &via, None)
            .finish_with_body(None, b"");
        let _ = self.tx.send_request(now, flow, bye);
        let until = now + self.cfg.timers.t1x64();
        let Calls {
            calls, late_forks, ..
        } = &mut self.calls;
        let branch = &mut calls[idx].branches[bi];
        branch.media_refusal = Some(e.to_string());
        branch.hung_up_dialogs.push(dialog.remote_tag.clone());
        watch_late_fork(late_forks, branch, until);
        self.fork_failed(now, idx, bi, status);
    }

    /// Sends BYE on the dialog with To tag `tag` that fork `bi`'s INVITE
    /// made, unless it had one already.
    fn hang_up_fork_dialog(
        &mut self,
        now: Instant,
        idx: usize,
        bi: usize,
        dialog: &mut Dialog,
        tag: String,
    ) {
        let call = &mut self.calls.calls[idx];
        let branch = &mut call.branches[bi];
        if branch.hung_up_dialogs.contains(&tag) || branch.hung_up_dialogs.len() >= MAX_FORKS {
            return;
        }
        tracing::info!(call_ref = %call.call_ref, "a device answered a fork that is over; hanging it up");
        branch.hung_up_dialogs.push(tag);
        let flow = branch.flow;
        let via = self.via(&flow, &branch_id());
        let bye = dialog
            .request("BYE", &via, None)
            .finish_with_body(None, b"");
        if let Ok(c) = self.tx.send_request(now, flow, bye) {
            self.calls.by_branch.insert(c, (idx, bi));
        }
    }

    fn fork_failed(&mut self, now: Instant, idx: usize, bi: usize, status: u16) {
        let call = &mut self.calls.calls[idx];
        let branch = &mut call.branches[bi];
        if matches!(branch.state, BranchState::Answered | BranchState::Failed(_)) {
            return;
        }
        branch.state = BranchState::Failed(status);
        self.media.close(branch.leg.id);
        if call.early == Some(bi) {
            // Another ringing device may bring its own early media.
            call.early = None;
        }
        self.calls.by_branch.remove(&branch.tx);
        if call.state != State::Ringing {
            return;
        }
        let open = call
            .branches
            .iter()
            .any(|b| matches!(b.state, BranchState::Calling | BranchState::Ringing));
        if open {
            return;
        }
        let statuses: Vec<u16> = call
            .branches
            .iter()
            .filter_map(|b| match b.state {
                BranchState::Failed(s) => Some(s),
                _ => None,
            })
            .collect();
        let (status, reason, outcome) = summarize(&statuses);
        // A 488 says why when a device's media was the problem.
        let reason = call
            .branches
            .iter()
            .filter(|b| status == 488 && b.state == BranchState::Failed(488))
            .find_map(|b| b.media_refusal.clone())
            .unwrap_or_else(|| reason.to_string());
        let (tx, flow) = (call.invite_tx, call.caller_flow);
        let b = self.response_builder(&self.calls.calls[idx].invite, flow, status, &reason);
        self.respond(now, tx, status, b.finish());
        self.finish_call(now, idx, outcome, status, &reason, None);
    }

    fn fork_answered(&mut self, now: Instant, idx: usize, bi: usize, msg: Message) {
        let flow = self.calls.calls[idx].branches[bi].flow;
        let contact = self.contact_uri(&flow);
        let Ok(mut dialog) =
            Dialog::as_uac(&self.calls.calls[idx].branches[bi].request, &msg, &contact)
        else {
            tracing::warn!("2xx without the headers a dialog needs; ignored");
            return;
        };
        let via = self.via(&flow, &branch_id());
        let ack = dialog.ack(1, &via, None);
        self.transmit(flow, ack);
        let call = &self.calls.calls[idx];
        let branch = &call.branches[bi];
        let tag = dialog.remote_tag.clone();
        if call.winner == Some(bi) {
            // A retransmitted 2xx (the device missed the ACK) is
            // acknowledged again, and nothing more. A 2xx with another To
            // tag is a second dialog (a forking proxy behind the binding,
            // two phones answering): acknowledged and hung up (RFC 3261
            // §13.2.2.4), once.
            let same = call
                .callee_dialog
                .as_ref()
                .is_some_and(|d| d.remote_tag == tag);
            if !same {
                self.hang_up_fork_dialog(now, idx, bi, &mut dialog, tag);
            }
            return;
        }
        if branch.state == BranchState::HungUp {
            // A retransmitted 2xx (the device missed the ACK) is
            // acknowledged again, and nothing more; another dialog of the
            // same fork is hung up too.
            return self.hang_up_fork_dialog(now, idx, bi, &mut dialog, tag);
        }
        if call.state != State::Ringing || call.winner.is_some() {
            // A second device answered too late: it gets ACK and BYE (once).
            self.calls.calls[idx].branches[bi].state = BranchState::HungUp;
            return self.hang_up_fork_dialog(now, idx, bi, &mut dialog, tag);
        }
        let tls = flow.transport == Transport::Tls;
        let answer = match read_phone_sdp(msg.body(), tls, branch.security, Some(&branch.offer)) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "callee's answer refused; hanging up that device");
                return self.refuse_fork_media(now, idx, bi, &mut dialog, &e, 488);
            }
        };
        let caller_answer = match self.answer_to_caller(idx, &answer) {
            Ok(a) => a,
            Err(e) => {
                let status = if e == AnchorError::NoCommonCodec {
                    488
                } else {
                    500
                };
                return self.refuse_fork_media(now, idx, bi, &mut dialog, &e, status);
            }
        };
        self.bridge_legs(now, idx, bi, &answer, flow);

        // The caller's dialog, answered with 200 and Parley's SDP.
        let call = &self.calls.calls[idx];
        let to_tag = self.to_tag(&call.invite);
        let to_tag = std::str::from_utf8(&to_tag).unwrap_or_default().to_string();
        let caller_contact = self.contact_uri(&call.caller_flow);
        let Ok(caller_dialog) = Dialog::as_uas(
            &call.invite,
            &to_tag,
            &caller_contact,
            rand::random::<u16>().into(),
        ) else {
            return;
        };
        let mut b = self.response_builder(&call.invite, call.caller_flow, 200, "OK");
        b.header_fmt(HeaderName::Contact, format_args!("<{caller_contact}>"));
        b.header(HeaderName::Allow, super::ALLOWED_METHODS);
        if let Some(timer) = call.session_request {
            timer.add_to(&mut b);
        }
        let ok = b.finish_with_body(Some("application/sdp"), &caller_answer.to_bytes());
        let invite_tx = call.invite_tx;
        self.respond(now, invite_tx, 200, ok);

        let call = &mut self.calls.calls[idx];
        call.state = State::Answered;
        call.answered = Some(now);
        call.winner = Some(bi);
        call.branches[bi].state = BranchState::Answered;
        let callee_key = (dialog.call_id.clone(), dialog.local_tag.clone());
        let caller_key = (
            caller_dialog.call_id.clone(),
            caller_dialog.local_tag.clone(),
        );
        call.callee_dialog = Some(dialog);
        call.caller_dialog = Some(caller_dialog);
        call.callee_media = Some(answer);
        call.sent_to_caller = Some(caller_answer);
        tracing::info!(call_ref = %call.call_ref, "call answered");
        let (caller_leg, callee_leg) = (call.caller_leg.id, call.branches[bi].leg.id);
        self.calls.by_leg.insert(caller_leg, idx);
        self.calls.by_leg.insert(callee_leg, idx);
        self.calls.by_dialog.insert(callee_key, (idx, Side::Callee));
        self.calls.by_dialog.insert(caller_key, (idx, Side::Caller));
        self.calls.by_invite.remove(&invite_tx);
        self.cancel_other_forks(now, idx, Some(bi));
        self.start_session_timer(now, idx);
    }

    fn cancel_other_forks(&mut self, now: Instant, idx: usize, keep: Option<usize>) {
        let n = self.calls.calls[idx].branches.len();
        for bi in 0..n {
            if Some(bi) == keep {
                continue;
            }
            let branch = &mut self.calls.calls[idx].branches[bi];
            if !matches!(branch.state, BranchState::Calling | BranchState::Ringing) {
                continue;
            }
            let heard_from = branch.heard_from;
            branch.state = BranchState::Cancelled;
            branch.cancel_deferred = !heard_from;
            let leg = branch.leg.id;
            if heard_from {
                self.send_cancel(now, idx, bi);
            }
            self.media.close(leg);
        }
    }

    /// CANCELs fork `bi`'s INVITE. The CANCEL copies the INVITE's
    /// Request-URI, top Via, Call-ID, From, To and CSeq number (RFC 3261
    /// §9.1).
    fn send_cancel(&mut self, now: Instant, idx: usize, bi: usize) {
        let branch = &self.calls.calls[idx].branches[bi];
        let (flow, invite_tx) = (branch.flow, branch.tx);
        let cancel = cancel_for(&branch.request);
        if let Some(c) = self.cancel_invite(now, invite_tx, flow, cancel) {
            self.calls.by_branch.insert(c, (idx, bi));
        }
    }

    /// Sends `cancel` for the INVITE of client transaction `invite_tx`,
    /// which from now on gives up 64·T1 after (RFC 3261 §9.1); returns the
    /// CANCEL's own transaction.
    fn cancel_invite(
        &mut self,
        now: Instant,
        invite_tx: ClientTxId,
        flow: Flow,
        cancel: Bytes,
    ) -> Option<ClientTxId> {
        let sent = self.tx.send_request(now, flow, cancel).ok();
        self.tx.cancelling(now, invite_tx);
        sent
    }

    /// CANCEL from the caller while it rings.
    pub(super) fn call_cancel(&mut self, now: Instant, tx: ServerTxId, msg: Message, flow: Flow) {
        let Some(invite) = self.tx.find_invite_for_cancel(&msg) else {
            return self.reject(now, tx, &msg, flow, 481, "Call/Transaction Does Not Exist");
        };
        let Some(&idx) = self.calls.by_invite.get(&invite) else {
            // The INVITE already has its final answer: the CANCEL changes
            // nothing, but is answered (RFC 3261 §9.2).
            self.reject(now, tx, &msg, flow, 200, "OK");
            return self.cancel_reinvite(now, invite);
        };
        self.reject(now, tx, &msg, flow, 200, "OK");
        let call = &self.calls.calls[idx];
        if call.state != State::Ringing {
            return;
        }
        self.end_ringing_call(
            now,
            idx,
            (487, "Request Terminated"),
            Outcome::Cancelled,
            Some(EndedBy::Caller),
        );
    }

    /// A CANCEL for a re-INVITE Parley has not answered yet: it gets 487
    /// (RFC 3261 §9.2). One passed on has whatever the other side answers
    /// undone when it comes (see `reinvite_response`); one still held for
    /// the caller's ACK is dropped.
    fn cancel_reinvite(&mut self, now: Instant, invite: ServerTxId) {
        if !self.tx.server_is_pending(invite) {
            return;
        }
        let Some((_, call)) = self.calls.calls.iter_mut().find(|(_, c)| {
            c.reinvite.as_ref().is_some_and(|r| r.tx == invite)
                || c.held.as_ref().is_some_and(|h| h.tx == invite)
        }) else {
            return;
        };
        let (request, flow) = match call.reinvite.as_mut().filter(|r| r.tx == invite) {
            Some(r) => {
                r.cancelled = true;
                (r.request.clone(), r.flow)
            }
            // Still waiting for the caller's ACK: it is simply dropped.
            None => match call.held.take() {
                Some(h) => (h.request, h.flow),
                None => return,
            },
        };
        let b = self.response_builder(&request, flow, 487, "Request Terminated");
        self.respond(now, invite, 487, b.finish());
    }

    /// Ends a call that is still ringing: the caller's INVITE gets
    /// `status`, every device still ringing a CANCEL, and the call its
    /// record.
    fn end_ringing_call(
        &mut self,
        now: Instant,
        idx: usize,
        (status, reason): (u16, &str),
        outcome: Outcome,
        ended_by: Option<EndedBy>,
    ) {
        let call = &self.calls.calls[idx];
        let (itx, iflow) = (call.invite_tx, call.caller_flow);
        let b = self.response_builder(&call.invite, iflow, status, reason);
        self.respond(now, itx, status, b.finish());
        self.cancel_other_forks(now, idx, None);
        self.finish_call(now, idx, outcome, status, reason, ended_by);
    }

    /// A request inside a dialog (it has a To tag). Returns false when it
    /// belongs to no call, so the core answers 481.
    pub(super) fn call_in_dialog(
        &mut self,
        now: Instant,
        tx: ServerTxId,
        msg: &Message,
        flow: Flow,
    ) -> bool {
        let local_tag = msg.to().and_then(|t| t.tag()).unwrap_or("");
        let key = (
            msg.call_id().unwrap_or("").to_string(),
            local_tag.to_string(),
        );
        let Some(&(idx, side)) = self.calls.by_dialog.get(&key) else {
            return false;
        };
        let seq = msg.cseq().map(|c| c.seq).unwrap_or(0);
        let dialog = match side {
            Side::Caller => self.calls.calls[idx].caller_dialog.as_mut(),
            Side::Callee => self.calls.calls[idx].callee_dialog.as_mut(),
        };
        let Some(dialog) = dialog else {
            return false;
        };
        if !dialog.matches(msg) {
            return false;
        }
        if !dialog.accept_remote_cseq(seq) {
            self.reject(now, tx, msg, flow, 500, "CSeq Out Of Order");
            return true;
        }
        self.follow_phone(idx, side, flow);
        match msg.method() {
            Some(Method::Bye) => {
                self.reject(now, tx, msg, flow, 200, "OK");
                let ended_by = if side == Side::Caller {
                    EndedBy::Caller
                } else {
                    EndedBy::Callee
                };
                self.hang_up_other_side(now, idx, side);
                self.finish_call(now, idx, Outcome::Answered, 200, "OK", Some(ended_by));
            }
            Some(m @ (Method::Invite | Method::Update)) => {
                if msg.body().is_empty() {
                    self.answer_without_offer(now, idx, side, tx, msg, flow);
                } else {
                    self.reinvite(now, idx, side, m, tx, msg, flow);
                }
            }
            Some(Method::Info) => self.relay_info(now, idx, side, tx, msg, flow),
            _ => {
                let mut b = self.response_builder(msg, flow, 501, "Not Implemented In A Call Yet");
                b.header(HeaderName::Allow, super::ALLOWED_METHODS);
                self.respond(now, tx, 501, b.finish());
            }
        }
        true
    }

    /// The phone of `side` was heard from on `flow`. Parley reaches it
    /// there from now on when that is the same phone on a new connection
    /// or NAT mapping: its old connection closed (it reconnected), or the
    /// same transport from the same address (a NAT that rebound a port).
    fn follow_phone(&mut self, idx: usize, side: Side, flow: Flow) {
        let call = &mut self.calls.calls[idx];
        let lost = call.flow_lost[side.index()];
        let Some(current) = call.flow_of_mut(side) else {
            return;
        };
        if *current == flow || current.transport != flow.transport {
            return;
        }
        if lost || current.remote.ip() == flow.remote.ip() {
            let from = std::mem::replace(current, flow);
            tracing::info!(call_ref = %call.call_ref, ?side, %from, to = %flow, "a phone in a call is now reached on another flow");
            call.flow_lost[side.index()] = false;
        }
    }

    /// A TCP/TLS connection closed. A caller still ringing its callee is
    /// gone with it: the devices are cancelled. A phone in an answered
    /// call may come back on a new connection (its media goes on
    /// meanwhile): the call waits for it, by a request in the dialog or a
    /// registration from the same address.
    pub(super) fn calls_flow_closed(&mut self, now: Instant, flow: Flow) {
        if flow.transport == Transport::Udp {
            return;
        }
        let ringing: Vec<usize> = self
            .calls
            .calls
            .iter()
            .filter(|(_, c)| c.state == State::Ringing && c.caller_flow == flow)
            .map(|(idx, _)| idx)
            .collect();
        for idx in ringing {
            tracing::info!(call_ref = %self.calls.calls[idx].call_ref, "the caller's connection closed while it rang; cancelling");
            self.end_ringing_call(
                now,
                idx,
                (487, "Request Terminated"),
                Outcome::Cancelled,
                Some(EndedBy::Caller),
            );
        }
        for (_, call) in self.calls.calls.iter_mut() {
            if call.state != State::Answered {
                continue;
            }
            for side in [Side::Caller, Side::Callee] {
                if call.flow_of(side) == Some(flow) {
                    tracing::info!(call_ref = %call.call_ref, ?side, %flow, "a phone's connection closed during a call; waiting for it to come back");
                    call.flow_lost[side.index()] = true;
                }
            }
        }
    }

    /// A phone of `extension` registered on `flow`: a call side of that
    /// extension whose connection closed, reached before from the same
    /// address over the same transport, is reached there now.
    pub(super) fn calls_follow_registration(&mut self, extension: &str, flow: Flow) {
        let mut moved = Vec::new();
        for (idx, call) in self.calls.calls.iter() {
            for (side, who) in [(Side::Caller, &call.caller), (Side::Callee, &call.callee)] {
                let Some(old) = call.flow_of(side) else {
                    continue;
                };
                if call.flow_lost[side.index()]
                    && who.as_str() == extension
                    && old.transport == flow.transport
                    && old.remote.ip() == flow.remote.ip()
                {
                    moved.push((idx, side));
                }
            }
        }
        for (idx, side) in moved {
            self.follow_phone(idx, side, flow);
        }
    }

    /// An ACK for the 200 Parley sent the caller.
    pub(super) fn call_ack(&mut self, now: Instant, msg: &Message) {
        let local_tag = msg.to().and_then(|t| t.tag()).unwrap_or("");
        let key = (
            msg.call_id().unwrap_or("").to_string(),
            local_tag.to_string(),
        );
        if let Some(&(idx, side)) = self.calls.by_dialog.get(&key) {
            tracing::debug!(call_ref = %self.calls.calls[idx].call_ref, ?side, "acknowledged");
            self.answer_in_ack(now, idx, side, msg);
            // The callee's re-INVITE that waited for this ACK goes on now.
            if let Some(call) = self.calls.calls.get_mut(idx)
                && !self.tx.server_awaits_ack(call.invite_tx)
                && let Some(h) = call.held.take()
                && self.tx.server_is_pending(h.tx)
            {
                self.reinvite(now, idx, Side::Callee, h.method, h.tx, &h.request, h.flow);
            }
        } else {
            self.send_bye_after_ack(now, |b| b.dialog == key);
        }
    }

    /// Sends the BYE that waited for the caller's ACK (`which` finds it).
    fn send_bye_after_ack(&mut self, now: Instant, which: impl Fn(&ByeAfterAck) -> bool) {
        let byes = &mut self.calls.byes_after_ack;
        byes.retain(|b| b.until > now);
        if let Some(i) = byes.iter().position(which) {
            let b = byes.swap_remove(i);
            let _ = self.tx.send_request(now, b.flow, b.bye);
        }
    }

    /// The caller never acknowledged the answer, though it was sent again
    /// for 64·T1: RFC 3261 §13.3.1.4 has the session end with a BYE.
    pub(super) fn call_not_acknowledged(&mut self, now: Instant, tx: ServerTxId) {
        let Some((idx, _)) = self
            .calls
            .calls
            .iter()
            .find(|(_, c)| c.invite_tx == tx && c.caller_dialog.is_some())
        else {
            // A call already over whose BYE waited for this ACK: the BYE
            // goes now (RFC 3261 §15: once the transaction timed out).
            return self.send_bye_after_ack(now, |b| b.invite_tx == tx);
        };
        tracing::warn!(call_ref = %self.calls.calls[idx].call_ref, "the caller never acknowledged the answer; ending the call");
        self.end_answered_call(now, idx, "No ACK For The Answer");
    }

    fn hang_up_other_side(&mut self, now: Instant, idx: usize, ended: Side) {
        let Some(flow) = self.calls.calls[idx].flow_of(ended.other()) else {
            return;
        };
        let via = self.via(&flow, &branch_id());
        let call = &mut self.calls.calls[idx];
        let dialog = match ended {
            Side::Caller => call.callee_dialog.as_mut(),
            Side::Callee => call.caller_dialog.as_mut(),
        };
        let Some(dialog) = dialog else {
            return;
        };
        let bye = dialog
            .request("BYE", &via, None)
            .finish_with_body(None, b"");
        // Until the caller acknowledges the 200, its dialog is not
        // confirmed on its side: no BYE yet (RFC 3261 §15).
        if ended == Side::Callee && self.tx.server_awaits_ack(call.invite_tx) {
            let dialog = (dialog.call_id.clone(), dialog.local_tag.clone());
            let byes = &mut self.calls.byes_after_ack;
            byes.retain(|b| b.until > now);
            if byes.len() < MAX_LATE_FORKS {
                byes.push(ByeAfterAck {
                    invite_tx: call.invite_tx,
                    dialog,
                    flow,
                    bye,
                    until: now + 2 * self.cfg.timers.t1x64(),
                });
                return;
            }
        }
        if let Ok(c) = self.tx.send_request(now, flow, bye) {
            self.calls.by_branch.insert(c, (idx, usize::MAX));
        }
    }

    /// Ends a call: closes its media legs, drops its indexes, writes its
    /// record.
    fn finish_call(
        &mut self,
        now: Instant,
        idx: usize,
        outcome: Outcome,
        status: u16,
        reason: &str,
        ended_by: Option<EndedBy>,
    ) {
        if !self.calls.calls.contains(idx) {
            return;
        }
        let mut call = self.calls.calls.remove(idx);
        self.calls.by_invite.remove(&call.invite_tx);
        if let Some(key) = request_key(&call.invite) {
            self.calls.by_request.remove(&key);
        }
        let relayed = &mut self.calls.relayed;
        let mut unanswered: Vec<(ServerTxId, Message, Flow)> = Vec::new();
        let mut own_invites: SmallVec<[(ClientTxId, usize); 2]> = SmallVec::new();
        self.calls.by_branch.retain(|ctx, (i, slot)| {
            if *i == idx {
                if let Some(r) = relayed.remove(ctx) {
                    unanswered.push((r.tx, r.request, r.flow));
                }
                if matches!(*slot, REINVITE | SESSION_REFRESH | REPAIR) {
                    own_invites.push((*ctx, *slot));
                }
            }
            *i != idx
        });
        self.ack_answers_after_the_end(now, &mut call, &own_invites);
        if let Some(r) = call.reinvite.take() {
            unanswered.push((r.tx, r.request, r.flow));
        }
        if let Some(h) = call.held.take() {
            unanswered.push((h.tx, h.request, h.flow));
        }
        // Requests still waiting on the other side (a re-INVITE, an INFO)
        // when a BYE crossed them get their final answer (RFC 3261
        // §15.1.2), so no transaction is left open.
        for (tx, request, flow) in unanswered {
            if self.tx.server_is_pending(tx) {
                let b = self.response_builder(&request, flow, 487, "Request Terminated");
                self.respond(now, tx, 487, b.finish());
            }
        }
        self.calls.by_dialog.retain(|_, (i, _)| *i != idx);
        self.calls.by_leg.retain(|_, i| *i != idx);
        self.media.close(call.caller_leg.id);
        for b in &call.branches {
            if b.state == BranchState::Answered {
                self.media.close(b.leg.id);
            }
            let open = matches!(
                b.state,
                BranchState::Calling | BranchState::Ringing | BranchState::Cancelled
            );
            // A fork already hung up still gets its 2xx retransmissions ACKed.
            let hung_up = b.state == BranchState::HungUp;
            if open || hung_up {
                let until = now + self.cfg.timers.t1x64();
                watch_late_fork(&mut self.calls.late_forks, b, until);
            }
        }
        let unix_ms = |t: Instant| self.clock.unix(t).as_millis() as i64;
        let winner = call.winner.map(|w| &call.branches[w]);
        let record = CallRecord {
            call_ref: call.call_ref.clone(),
            caller: call.caller.clone(),
            callee: call.callee.clone(),
            started_unix_ms: unix_ms(call.started),
            answered_unix_ms: call.answered.map(unix_ms),
            ended_unix_ms: unix_ms(now),
            outcome,
            sip_status: status,
            sip_reason: reason.to_string(),
            ended_by,
            caller_leg: LegRecord {
                transport: call.caller_flow.transport,
                tls_version: self
                    .tls_versions
                    .get(&call.caller_flow.conn)
                    .map(|v| v.to_string()),
                srtp: call.caller_media.crypto.as_ref().map(|c| c.1),
                media: None,
            },
            callee_leg: winner.map(|b| LegRecord {
                transport: b.flow.transport,
                tls_version: self.tls_versions.get(&b.flow.conn).map(|v| v.to_string()),
                srtp: call
                    .callee_media
                    .as_ref()
                    .and_then(|m| m.crypto.as_ref())
                    .map(|c| c.1),
                media: None,
            }),
        };
        tracing::info!(call_ref = %call.call_ref, outcome = %outcome, status, "call ended");
        // Answered calls had media: their record waits for the relay's
        // statistics of both legs (or REPORT_WAIT). Others are written now.
        match winner {
            Some(w) => self.calls.pending.push(PendingRecord {
                record,
                caller_leg: call.caller_leg.id,
                callee_leg: Some(w.leg.id),
                deadline: now + REPORT_WAIT,
            }),
            None => self
                .out
                .push_back(super::Output::CallEnded(Box::new(record))),
        }
    }

    /// Parley is stopping: every call ends now, so the phones are not left
    /// talking into a relay that is gone and every call gets its history
    /// row. Answered calls get a BYE on both sides, ringing ones a 503 to
    /// the caller and a CANCEL to the devices; records are written without
    /// waiting for the relay's last statistics.
    pub fn shut_down_calls(&mut self, now: Instant) {
        const REASON: &str = "Server Shutting Down";
        let live: Vec<usize> = self.calls.calls.iter().map(|(idx, _)| idx).collect();
        for idx in live {
            let call = &self.calls.calls[idx];
            if call.state == State::Answered {
                self.end_answered_call(now, idx, REASON);
                continue;
            }
            self.end_ringing_call(
                now,
                idx,
                (503, REASON),
                Outcome::Failed,
                Some(EndedBy::Parley),
            );
        }
        // Parley will not be there for the ACKs these wait for, nor for
        // the provisional responses these CANCELs wait for: better a
        // CANCEL too early (RFC 3261 §9.1) than a phone left ringing.
        for b in std::mem::take(&mut self.calls.byes_after_ack) {
            let _ = self.tx.send_request(now, b.flow, b.bye);
        }
        let deferred: Vec<(ClientTxId, Flow, Bytes)> = self
            .calls
            .late_forks
            .iter_mut()
            .filter_map(|(ctx, l)| {
                std::mem::take(&mut l.cancel_deferred)
                    .then(|| (*ctx, l.flow, cancel_for(&l.request)))
            })
            .collect();
        for (ctx, flow, cancel) in deferred {
            self.cancel_invite(now, ctx, flow, cancel);
        }
        for p in std::mem::take(&mut self.calls.pending) {
            self.out
                .push_back(super::Output::CallEnded(Box::new(p.record)));
        }
    }

    /// Ring timeouts and overdue call records.
    pub(super) fn call_timers(&mut self, now: Instant) {
        while let Some((_, idx, uid)) = self.calls.ring_timers.pop_due(now) {
            let ringing = self
                .calls
                .live(idx, uid)
                .is_some_and(|c| c.state == State::Ringing);
            if !ringing {
                continue;
            }
            tracing::info!(call_ref = %self.calls.calls[idx].call_ref, "nobody answered in time");
            self.end_ringing_call(now, idx, (480, "No Answer"), Outcome::NoAnswer, None);
        }
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.calls.pending)
            .into_iter()
            .partition(|p| p.deadline <= now || p.complete());
        self.calls.pending = waiting;
        for p in due {
            self.out
                .push_back(super::Output::CallEnded(Box::new(p.record)));
        }
        self.session_timers(now);
        self.hold_timers(now);
        self.calls.late_forks.retain(|_, l| l.until > now);
    }

    /// Ends held calls whose quiet leg has stayed quiet for the hold
    /// timeout: its phone is gone.
    fn hold_timers(&mut self, now: Instant) {
        let Some(limit) = self.cfg.hold_timeout else {
            return;
        };
        while let Some((_, idx, uid)) = self.calls.hold_timers.pop_due(now) {
            let Some(call) = self.calls.live(idx, uid) else {
                continue;
            };
            // Off hold again, a leg still quiet since its hold (the other
            // side resumed, this one was not reconfigured) is held to the
            // same bound: the relay does not report it twice.
            let expired = call
                .held_quiet
                .iter()
                .any(|&(_, since)| since + limit <= now);
            if expired {
                tracing::warn!(
                    call_ref = %call.call_ref, quiet_secs = limit.as_secs(),
                    "no media from a phone on hold; ending the call"
                );
                self.end_answered_call(now, idx, "Media Timeout On Hold");
            }
        }
    }

    /// Hands a leg its media and notes when, restarting its quiet clock.
    pub(super) fn configure_leg(
        &mut self,
        now: Instant,
        idx: usize,
        leg: LegId,
        mut media: LegMedia,
    ) {
        // Where the routing table already picks the leg's address towards
        // every host signaling names for the phone (its SDP address, and
        // where its requests come from), packets need not name it: that
        // spares the relay a control message on every packet. On a host
        // with one address that is every leg. An SRTP leg may latch a
        // source elsewhere (media from another host than signaling), where
        // a host with several addresses could route differently; phones
        // send media from where their signaling or SDP says.
        if let Some(ip) = media.local_ip
            && !media.trusted_ips.is_empty()
            && media
                .trusted_ips
                .iter()
                .all(|t| self.routes.source_for(*t) == Some(ip))
        {
            media.local_ip = None;
        }
        let call = &mut self.calls.calls[idx];
        call.held_quiet.retain(|(l, _)| *l != leg);
        call.configured_at.retain(|(l, _)| *l != leg);
        call.configured_at.push((leg, now));
        self.media.configure(leg, media);
    }

    /// An answer on a fork that is over (its call ended, or its media was
    /// refused): a 2xx is acknowledged (every retransmission) and hung up
    /// (once), so the phone does not sit in a call nobody is on.
    fn late_fork_response(&mut self, now: Instant, ctx: ClientTxId, msg: &Message) {
        if let Some((flow, ack, _)) = self.calls.sent_acks.get(&ctx)
            && msg.status().is_some_and(|s| (200..300).contains(&s))
        {
            let (flow, ack) = (*flow, ack.clone());
            return self.transmit(flow, ack);
        }
        let Some(late) = self.calls.late_forks.get(&ctx) else {
            return;
        };
        let status = msg.status().unwrap_or(500);
        if status < 200 {
            if late.cancel_deferred {
                let (flow, cancel) = (late.flow, cancel_for(&late.request));
                self.cancel_invite(now, ctx, flow, cancel);
                // Its INVITE may now be answered up to 64·T1 from here.
                let until = now + self.cfg.timers.t1x64();
                if let Some(late) = self.calls.late_forks.get_mut(&ctx) {
                    late.cancel_deferred = false;
                    late.until = late.until.max(until);
                }
            }
            return;
        }
        if status >= 300 {
            self.calls.late_forks.remove(&ctx);
            return;
        }
        let flow = late.flow;
        let contact = self.contact_uri(&flow);
        let Ok(mut dialog) = Dialog::as_uac(&late.request, msg, &contact) else {
            return;
        };
        tracing::info!(%flow, "a device answered a fork that is over; hanging it up");
        let ack = dialog.ack(1, &self.via(&flow, &branch_id()), None);
        self.transmit(flow, ack);
        let via = self.via(&flow, &branch_id());
        if let Some(late) = self.calls.late_forks.get_mut(&ctx)
            && !late.hung_up.contains(&dialog.remote_tag)
            && late.hung_up.len() < MAX_FORKS
        {
            late.hung_up.push(dialog.remote_tag.clone());
            let bye = dialog
                .request("BYE", &via, None)
                .finish_with_body(None, b"");
            let _ = self.tx.send_request(now, flow, bye);
        }
    }

    /// What the media relay reports: a leg gone quiet ends its call; a
    /// closed leg's statistics complete its call's record.
    pub fn handle_media_event(&mut self, now: Instant, event: MediaEvent) {
        match event {
            MediaEvent::Inactive { id, idle } => {
                let Some(&idx) = self.calls.by_leg.get(&id) else {
                    return;
                };
                // A phone on hold may send nothing at all (many stop RTP
                // and RTCP both); silence then says little about the call,
                // which gets the (much longer) hold timeout instead.
                // Resuming re-configures the legs, which restarts the clock.
                let call = &mut self.calls.calls[idx];
                let since = now.checked_sub(idle).unwrap_or(now);
                let reconfigured = call
                    .configured_at
                    .iter()
                    .any(|&(leg, at)| leg == id && since < at);
                if reconfigured {
                    // Sent before the relay restarted this leg's clock.
                    return;
                }
                if call.on_hold() {
                    tracing::debug!(
                        call_ref = %call.call_ref, leg = %id,
                        "no media during hold; the call stays up"
                    );
                    call.held_quiet.retain(|(leg, _)| *leg != id);
                    call.held_quiet.push((id, since));
                    if let Some(limit) = self.cfg.hold_timeout {
                        let uid = call.uid;
                        self.calls.hold_timers.arm(since + limit, idx, uid);
                    }
                    return;
                }
                tracing::warn!(
                    call_ref = %self.calls.calls[idx].call_ref, leg = %id, idle_secs = idle.as_secs(),
                    "no media from a phone; ending the call"
                );
                self.end_answered_call(now, idx, "Media Timeout");
            }
            MediaEvent::Active { id } => {
                if let Some(&idx) = self.calls.by_leg.get(&id) {
                    self.calls.calls[idx]
                        .held_quiet
                        .retain(|(leg, _)| *leg != id);
                }
            }
            MediaEvent::Closed { report } => self.attach_report(now, report),
        }
    }

    fn attach_report(&mut self, now: Instant, report: LegReport) {
        let Some(p) = self
            .calls
            .pending
            .iter_mut()
            .find(|p| p.caller_leg == report.id || p.callee_leg == Some(report.id))
        else {
            return;
        };
        // Duplicates are a few; many more mean SSRCs past what one key
        // may carry, which left that phone without audio from some stream.
        if report.srtp_refused > REFUSED_WORTH_A_WARNING {
            tracing::warn!(
                call_ref = %p.record.call_ref, leg = %report.id, refused = report.srtp_refused,
                "packets for a phone were not sent: SRTP refused them (duplicates, or too many SSRCs under one key)"
            );
        }
        if p.caller_leg == report.id {
            p.record.caller_leg.media = Some(report);
        } else if let Some(leg) = &mut p.record.callee_leg {
            leg.media = Some(report);
        }
        if p.complete() {
            self.call_timers(now);
        }
    }

    /// A 2xx may still come to an INVITE Parley sent in a call that just
    /// ended (a re-INVITE, a session refresh, a repair): its ACK is made
    /// now, while the dialog is known, and sent should the 2xx come, so
    /// the phone does not repeat it for 64·T1 (RFC 3261 §13.2.2.4).
    fn ack_answers_after_the_end(
        &mut self,
        now: Instant,
        call: &mut Call,
        pending: &[(ClientTxId, usize)],
    ) {
        for &(ctx, slot) in pending {
            let (side, seq) = match slot {
                REINVITE => match &call.reinvite {
                    Some(r) if r.method == Method::Invite => (r.from.other(), r.sent_seq),
                    _ => continue,
                },
                SESSION_REFRESH => match call.refresh_seq {
                    Some(seq) => (Side::Caller, seq),
                    None => continue,
                },
                REPAIR => match &call.repair {
                    Some(r) => (r.side, r.sent_seq),
                    None => continue,
                },
                _ => continue,
            };
            let flow = call.flow_of(side);
            let dialog = match side {
                Side::Caller => call.caller_dialog.as_mut(),
                Side::Callee => call.callee_dialog.as_mut(),
            };
            if let (Some(flow), Some(dialog)) = (flow, dialog) {
                let ack = dialog.ack(seq, &self.via(&flow, &branch_id()), None);
                self.remember_ack(now, ctx, flow, ack);
            }
        }
    }

    /// Keeps the ACK of a 2xx to Parley's re-INVITE `ctx` for 64·T1.
    pub(super) fn remember_ack(&mut self, now: Instant, ctx: ClientTxId, flow: Flow, ack: Bytes) {
        let keep = self.cfg.timers.t1x64();
        let acks = &mut self.calls.sent_acks;
        acks.retain(|_, (_, _, at)| now.saturating_duration_since(*at) < keep);
        acks.insert(ctx, (flow, ack, now));
    }

    fn transmit(&mut self, flow: Flow, bytes: Bytes) {
        self.out
            .push_back(super::Output::Transmit(crate::sip::transaction::Transmit {
                flow,
                bytes,
            }));
    }
}

/// What identifies a request apart from its transaction: Call-ID, From tag
/// and CSeq number.
fn request_key(msg: &Message) -> Option<(Box<str>, Box<str>, u32)> {
    Some((
        msg.call_id()?.into(),
        msg.from()?.tag()?.into(),
        msg.cseq()?.seq,
    ))
}

/// The number a caller dialed, as the history shows it (bounded: it comes
/// from the network).
fn dialed_number(msg: &Message) -> String {
    let user = Uri::parse(msg.request_uri())
        .ok()
        .and_then(|u| u.user)
        .map(super::percent_decode);
    user.unwrap_or_default().chars().take(32).collect()
}

/// The media settings of a leg from the phone's SDP and Parley's side.
/// `answer` is the answer of the exchange: the codec it lists first is the
/// one both phones send, whose clock jitter is counted at, and its event
/// payload type is theirs too (formats keep the offer's numbers).
fn leg_media(phone: &PhoneMedia, local: &LocalMedia, flow: Flow, answer: &PhoneMedia) -> LegMedia {
    let keys = phone.crypto.as_ref().map(|(_, suite, key)| LegKeys {
        suite: *suite,
        phone_key: key.clone(),
        parley_key: local.key.clone(),
    });
    let mut trusted = SmallVec::new();
    if let Some(rtp) = phone.rtp {
        trusted.push(rtp.ip());
    }
    if !trusted.contains(&flow.remote.ip()) {
        trusted.push(flow.remote.ip().to_canonical());
    }
    LegMedia {
        remote_rtp: phone.rtp,
        remote_rtcp: phone.rtcp,
        rtcp_mux: phone.rtcp_mux,
        keys,
        trusted_ips: trusted,
        clock_rate: answer.clock_rate(),
        telephone_event_pt: answer.telephone_event_pt(),
        local_ip: Some(local.addr),
    }
}

impl Core {
    /// A re-INVITE (hold, resume, new codec, new address) from one side of
    /// an answered call: its offer goes to the other side, rewritten for
    /// that leg, and the answer comes back the same way. Keys stay as they
    /// are on each leg unless a phone changes its own.
    #[allow(clippy::too_many_arguments)]
    fn reinvite(
        &mut self,
        now: Instant,
        idx: usize,
        from: Side,
        method: Method,
        tx: ServerTxId,
        msg: &Message,
        flow: Flow,
    ) {
        let call = &self.calls.calls[idx];
        // A phone's second offer while its first is unanswered: 500 with
        // Retry-After (RFC 3261 §14.2, RFC 3311 §5.2).
        if call.reinvite.as_ref().is_some_and(|r| r.from == from)
            || (from == Side::Callee && call.held.is_some())
        {
            let mut b = self.response_builder(msg, flow, 500, "Previous Offer Pending");
            b.header_fmt(
                HeaderName::RetryAfter,
                format_args!("{}", rand::random::<u32>() % 11),
            );
            return self.respond(now, tx, 500, b.finish());
        }
        // One offer at a time in the call, whichever side made it: Parley's
        // own refresh re-INVITE is one too; crossing offers get 491 (RFC
        // 3261 §14.2).
        if call.reinvite.is_some()
            || call.refresh_seq.is_some()
            || call.repair.is_some()
            || call.held.is_some()
        {
            return self.reject(now, tx, msg, flow, 491, "Request Pending");
        }
        // Nor is one started towards a caller that has not acknowledged
        // the 200 yet (§14.1): the callee's waits for the ACK (an ACK is
        // an RTT away; a 491 would cost the callee seconds).
        if from == Side::Callee && self.tx.server_awaits_ack(call.invite_tx) {
            if method == Method::Invite {
                let b = self.response_builder(msg, flow, 100, "Trying");
                self.respond(now, tx, 100, b.finish());
            }
            self.calls.calls[idx].held = Some(HeldReinvite {
                method,
                tx,
                request: msg.clone(),
                flow,
            });
            return;
        }
        let Some(w) = call.winner else {
            return self.reject(now, tx, msg, flow, 491, "Request Pending");
        };
        let (x_media, y_media) = match from {
            Side::Caller => (Some(&call.caller_media), call.callee_media.as_ref()),
            Side::Callee => (call.callee_media.as_ref(), Some(&call.caller_media)),
        };
        let (x_security, y_security) = (kept_security(x_media), kept_security(y_media));
        // The other side keeps the suite its key is used with.
        let y_suite = y_media
            .and_then(|m| m.crypto.as_ref())
            .map_or(OFFERED_SUITE, |(_, suite, _)| *suite);
        let offer = match read_phone_sdp(
            msg.body(),
            flow.transport == Transport::Tls,
            x_security,
            None,
        ) {
            Ok(o) => o,
            Err(e) => return self.reject(now, tx, msg, flow, 488, &e.to_string()),
        };
        if offer.keys_over_plain {
            tracing::warn!(side = ?from, "phone put SRTP keys in a re-offer over plain signaling; they were ignored");
        }
        let y_flow = match from {
            Side::Caller => self.calls.calls[idx].branches[w].flow,
            Side::Callee => self.calls.calls[idx].caller_flow,
        };
        let via = self.via(&y_flow, &branch_id());
        let call = &mut self.calls.calls[idx];
        // The session Parley has with the other side may hold more streams
        // than the audio one (the caller offered video; the callee's own
        // re-offer added some): a new offer keeps every m= line (RFC 3264
        // §8).
        let previous_session = match from {
            Side::Callee => call.sent_to_caller.clone(),
            Side::Caller => Some(call.branches[w].offer.clone()),
        };
        let timer = call.session.filter(|_| from == Side::Callee);
        let (y_local, y_dialog) = match from {
            Side::Caller => (&mut call.branches[w].local, call.callee_dialog.as_mut()),
            Side::Callee => (&mut call.caller_local, call.caller_dialog.as_mut()),
        };
        let Some(y_dialog) = y_dialog else {
            return;
        };
        y_local.version += 1;
        let sent = offer_for_branch(&offer, y_security, y_local, y_suite);
        let sent = match previous_session {
            Some(previous) => in_layout_of(sent, &previous),
            None => sent,
        };
        let name = if method == Method::Update {
            "UPDATE"
        } else {
            "INVITE"
        };
        let mut b = y_dialog.request(name, &via, None);
        b.header(HeaderName::Allow, super::ALLOWED_METHODS);
        if let Some(timer) = timer {
            timer.add_to_request(&mut b);
        }
        let sent_seq = y_dialog.local_seq;
        let bytes = b.finish_with_body(Some("application/sdp"), &sent.to_bytes());
        if let Some(d) = match from {
            Side::Caller => call.caller_dialog.as_mut(),
            Side::Callee => call.callee_dialog.as_mut(),
        } {
            d.refresh_target(msg);
        }
        match self.tx.send_request(now, y_flow, bytes) {
            Ok(ctx) => {
                self.calls.by_branch.insert(ctx, (idx, REINVITE));
                self.calls.calls[idx].reinvite = Some(Reinvite {
                    method,
                    from,
                    tx,
                    request: msg.clone(),
                    flow,
                    offer,
                    sent,
                    sent_seq,
                    cancelled: false,
                });
                if method == Method::Invite {
                    let b = self.response_builder(msg, flow, 100, "Trying");
                    self.respond(now, tx, 100, b.finish());
                }
                self.session_refreshed(now, idx, from);
            }
            Err(_) => self.reject(now, tx, msg, flow, 500, "Cannot Reach The Other Party"),
        }
    }

    fn reinvite_response(&mut self, now: Instant, idx: usize, ctx: ClientTxId, msg: Message) {
        let status = msg.status().unwrap_or(500);
        if status < 200 {
            return;
        }
        self.calls.by_branch.remove(&ctx);
        let Some(r) = self.calls.calls[idx].reinvite.take() else {
            return;
        };
        if status >= 300 && r.cancelled {
            return;
        }
        if status >= 300 {
            // The other side refused: so does Parley, with its status.
            let reason = msg.reason().to_string();
            let b = self.response_builder(&r.request, r.flow, status, &reason);
            self.respond(now, r.tx, status, b.finish());
            if status == 408 || status == 481 {
                // Its dialog is gone (RFC 3261 §12.2.1.2): so is the call.
                tracing::warn!(call_ref = %self.calls.calls[idx].call_ref, status, "the other side lost the dialog; ending the call");
                self.end_answered_call(now, idx, "Dialog Gone");
            }
            return;
        }
        let Some(w) = self.calls.calls[idx].winner else {
            return;
        };
        let y_flow = match r.from {
            Side::Caller => self.calls.calls[idx].branches[w].flow,
            Side::Callee => self.calls.calls[idx].caller_flow,
        };
        let via = self.via(&y_flow, &branch_id());
        let call = &mut self.calls.calls[idx];
        let y_dialog = match r.from {
            Side::Caller => call.callee_dialog.as_mut(),
            Side::Callee => call.caller_dialog.as_mut(),
        };
        let Some(y_dialog) = y_dialog else {
            return;
        };
        y_dialog.refresh_target(&msg);
        if r.method == Method::Invite {
            let ack = y_dialog.ack(r.sent_seq, &via, None);
            self.remember_ack(now, ctx, y_flow, ack.clone());
            self.transmit(y_flow, ack);
        }
        if r.from == Side::Callee {
            self.session_refreshed_by_parley(now, idx, &msg);
        }
        if r.cancelled {
            // The sender kept its session; the other side took the new
            // offer: it is offered what it had before.
            return self.restore_side(now, idx, r.from.other());
        }

        let call = &self.calls.calls[idx];
        let y_security = kept_security(match r.from {
            Side::Caller => call.callee_media.as_ref(),
            Side::Callee => Some(&call.caller_media),
        });
        let answer = match read_phone_sdp(
            msg.body(),
            y_flow.transport == Transport::Tls,
            y_security,
            Some(&r.sent),
        ) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "answer to a re-INVITE refused");
                let b = self.response_builder(&r.request, r.flow, 488, &e.to_string());
                self.respond(now, r.tx, 488, b.finish());
                return self.restore_side(now, idx, r.from.other());
            }
        };
        let call = &mut self.calls.calls[idx];
        let x_suite = |m: Option<&PhoneMedia>| m.and_then(|m| m.crypto.as_ref()).map(|c| c.1);
        let x_old_suite = x_suite(match r.from {
            Side::Caller => Some(&call.caller_media),
            Side::Callee => call.callee_media.as_ref(),
        });
        let x_local = match r.from {
            Side::Caller => &mut call.caller_local,
            Side::Callee => &mut call.branches[w].local,
        };
        let mut x_next = x_local.clone();
        x_next.version += 1;
        // A key is used with one suite only (see `offer_for_branch`): a
        // phone that moves to the other suite gets a new key from Parley.
        if let (Some(old), Some(new)) = (x_old_suite, x_suite(Some(&r.offer)))
            && old != new
        {
            x_next.key = MasterKey::generate();
        }
        let x_answer = match answer_for_caller(&r.offer, &answer, &x_next) {
            Ok(a) => {
                *x_local = x_next;
                a
            }
            Err(e) => {
                let b = self.response_builder(&r.request, r.flow, 488, &e.to_string());
                self.respond(now, r.tx, 488, b.finish());
                return self.restore_side(now, idx, r.from.other());
            }
        };
        // Both legs follow the new descriptions.
        let (x_leg, y_leg) = match r.from {
            Side::Caller => (call.caller_leg.id, call.branches[w].leg.id),
            Side::Callee => (call.branches[w].leg.id, call.caller_leg.id),
        };
        let y_local = match r.from {
            Side::Caller => &call.branches[w].local,
            Side::Callee => &call.caller_local,
        };
        let x_local = match r.from {
            Side::Caller => &call.caller_local,
            Side::Callee => &call.branches[w].local,
        };
        let x_media = leg_media(&r.offer, x_local, r.flow, &answer);
        let y_media = leg_media(&answer, y_local, y_flow, &answer);
        match r.from {
            Side::Caller => {
                call.caller_media = r.offer.clone();
                call.callee_media = Some(answer);
                call.sent_to_caller = Some(x_answer.clone());
                call.branches[w].offer = r.sent.clone();
            }
            Side::Callee => {
                call.callee_media = Some(r.offer.clone());
                call.caller_media = answer;
                call.sent_to_caller = Some(r.sent.clone());
                call.branches[w].offer = x_answer.clone();
            }
        }
        let timer = (r.from == Side::Caller).then_some(call.session).flatten();
        self.configure_leg(now, idx, x_leg, x_media);
        self.configure_leg(now, idx, y_leg, y_media);
        let contact = self.contact_uri(&r.flow);
        let mut b = self.response_builder(&r.request, r.flow, 200, "OK");
        b.header_fmt(HeaderName::Contact, format_args!("<{contact}>"));
        b.header(HeaderName::Allow, super::ALLOWED_METHODS);
        if let Some(t) = timer {
            t.request.add_to(&mut b);
        }
        let ok = b.finish_with_body(Some("application/sdp"), &x_answer.to_bytes());
        self.respond(now, r.tx, 200, ok);
    }
}
