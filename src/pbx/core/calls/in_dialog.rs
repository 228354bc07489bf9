//! Requests inside an answered call beyond BYE and re-INVITE with an
//! offer: INFO passed to the other side (SIP-INFO DTMF, among others),
//! UPDATE, offerless re-INVITEs, and session timers (RFC 4028) on the
//! caller's dialog.
//!
//! Session timers: a caller that asks for them (Session-Expires in its
//! INVITE) gets them, with the refresher it asked for. When the caller
//! refreshes, a call whose refresh does not come in time is ended on both
//! sides; when Parley refreshes, it sends UPDATE (or a re-INVITE with the
//! description the caller already has) at half the interval. Intervals
//! below `MIN_SESSION_EXPIRES` get 422. The callee's dialog carries no
//! timer: Parley does not offer `timer` to callees, and the media relay
//! already ends calls whose audio stops.

use std::time::{Duration, Instant};

use super::{
    RELAYED, RENEGOTIATION_FAILED, REPAIR, Repair, SESSION_REFRESH, Side, branch_id, kept_security,
    leg_media,
};
use crate::pbx::anchor::{PhoneMedia, read_phone_sdp};
use crate::pbx::cdr::{EndedBy, Outcome};
use crate::pbx::core::{ALLOWED_METHODS, Core};
use crate::sdp::SessionDescription;
use crate::sip::message::{HeaderName, Message, MessageBuilder, Method};
use crate::sip::transaction::{ClientTxId, ServerTxId};
use crate::sip::transport::{Flow, Transport};

/// Shortest session interval Parley accepts (RFC 4028's floor, 90 s).
pub const MIN_SESSION_EXPIRES: u32 = 90;
/// Longest interval granted; a longer request is shortened to this.
const MAX_SESSION_EXPIRES: u32 = 86_400;
/// Largest body passed on in an INFO.
const MAX_INFO_BODY: usize = 4096;

/// What a caller's INVITE asked of session timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SessionTimerRequest {
    pub interval: u32,
    pub caller_refreshes: bool,
    /// The caller supports `timer`, so the 2xx carries `Require: timer`.
    pub caller_supports: bool,
}

/// A running session timer on the caller's dialog.
#[derive(Debug, Clone, Copy)]
pub(super) struct SessionTimer {
    pub request: SessionTimerRequest,
    /// When the caller's refresh is due at the latest, or when Parley
    /// refreshes next.
    pub next: Instant,
}

/// Reads Session-Expires and Supported from an INVITE. `Err` carries the
/// Min-SE for a 422.
pub(super) fn session_timer_request(msg: &Message) -> Result<Option<SessionTimerRequest>, u32> {
    let caller_supports = msg
        .header_values(HeaderName::Supported)
        .any(|t| t.eq_ignore_ascii_case("timer"));
    let Some(value) = msg.header(HeaderName::SessionExpires) else {
        return Ok(None);
    };
    let (asked, refresher) = session_expires(value);
    let Some(asked) = asked else {
        // Unreadable: treated as absent, the call goes on without a timer.
        return Ok(None);
    };
    if asked < MIN_SESSION_EXPIRES {
        return Err(MIN_SESSION_EXPIRES);
    }
    // RFC 4028 §9: the refresher asked for is kept; without one, a caller
    // that supports timers refreshes, and one that does not cannot.
    let caller_refreshes =
        caller_supports && !refresher.is_some_and(|r| r.eq_ignore_ascii_case("uas"));
    Ok(Some(SessionTimerRequest {
        interval: asked.min(MAX_SESSION_EXPIRES),
        caller_refreshes,
        caller_supports,
    }))
}

/// A Session-Expires value's interval (`None` when unreadable) and its
/// `refresher` parameter.
fn session_expires(value: &str) -> (Option<u32>, Option<&str>) {
    let mut parts = value.split(';');
    let interval = parts.next().unwrap_or("").trim().parse::<u32>().ok();
    let refresher = parts
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("refresher"))
        .map(|(_, v)| v.trim());
    (interval, refresher)
}

impl SessionTimerRequest {
    /// Adds Session-Expires (and Require: timer) to a 2xx for the caller.
    pub(super) fn add_to(&self, b: &mut MessageBuilder) {
        let who = if self.caller_refreshes { "uac" } else { "uas" };
        b.header_fmt(
            HeaderName::SessionExpires,
            format_args!("{};refresher={who}", self.interval),
        );
        if self.caller_supports {
            b.header(HeaderName::Require, "timer");
        }
    }

    /// When the timer next fires, counted from a refresh at `now`.
    pub(super) fn next_after(&self, now: Instant) -> Instant {
        let interval = Duration::from_secs(self.interval.into());
        if self.caller_refreshes {
            // RFC 4028 §10: the session ends a third of the interval (at
            // most 32 s) before it would expire, unless refreshed.
            now + interval - (interval / 3).min(Duration::from_secs(32))
        } else {
            now + interval / 2
        }
    }
}

impl SessionTimer {
    /// Adds Session-Expires and `Supported: timer` to a re-INVITE or
    /// UPDATE Parley sends the caller. Each such request negotiates the
    /// timer anew (RFC 4028 §7.4, §9); without them the caller may take
    /// the timer as switched off and stop refreshing. The refresher stays
    /// who it was: the caller (here the UAS) or Parley.
    pub(super) fn add_to_request(&self, b: &mut MessageBuilder) {
        let who = if self.request.caller_refreshes {
            "uas"
        } else {
            "uac"
        };
        b.header_fmt(
            HeaderName::SessionExpires,
            format_args!("{};refresher={who}", self.request.interval),
        );
        b.header(HeaderName::Supported, "timer");
    }
}

/// A request passed from one side of a call to the other, waiting for the
/// other side's answer.
pub(super) struct Relayed {
    pub tx: ServerTxId,
    pub request: Message,
    pub flow: Flow,
}

impl Core {
    /// Starts the caller's session timer when the call is answered.
    pub(super) fn start_session_timer(&mut self, now: Instant, idx: usize) {
        let call = &mut self.calls.calls[idx];
        let Some(request) = call.session_request else {
            return;
        };
        let next = request.next_after(now);
        call.session = Some(SessionTimer { request, next });
        let uid = call.uid;
        self.calls.session_timers.arm(next, idx, uid);
    }

    /// A 2xx from the caller to Parley's re-INVITE or UPDATE refreshes the
    /// session, whoever the refresher is (RFC 4028 §10). From a caller that
    /// supports timers, the 2xx also says what the timer is now (§7.2):
    /// its Session-Expires is taken as it is, and none turns the timer off.
    /// A caller that does not support them never says; Parley goes on
    /// refreshing on its own, which tells it when the caller is gone.
    pub(super) fn session_refreshed_by_parley(&mut self, now: Instant, idx: usize, ok: &Message) {
        let call = &mut self.calls.calls[idx];
        let Some(timer) = call.session.as_mut() else {
            return;
        };
        if timer.request.caller_supports {
            let Some(value) = ok.header(HeaderName::SessionExpires) else {
                tracing::info!(call_ref = %call.call_ref, "the caller turned the session timer off");
                call.session = None;
                return;
            };
            let (interval, refresher) = session_expires(value);
            if let Some(interval) = interval {
                timer.request.interval = interval.clamp(MIN_SESSION_EXPIRES, MAX_SESSION_EXPIRES);
            }
            // Parley sent the request: "uas" names the caller.
            if let Some(who) = refresher {
                timer.request.caller_refreshes = who.eq_ignore_ascii_case("uas");
            }
        }
        timer.next = timer.request.next_after(now);
        let (next, uid) = (timer.next, call.uid);
        self.calls.session_timers.arm(next, idx, uid);
    }

    /// A refresh (re-INVITE or UPDATE) from the caller restarts its timer.
    pub(super) fn session_refreshed(&mut self, now: Instant, idx: usize, side: Side) {
        let call = &mut self.calls.calls[idx];
        let Some(timer) = call.session.as_mut() else {
            return;
        };
        if side != Side::Caller || !timer.request.caller_refreshes {
            return;
        }
        timer.next = timer.request.next_after(now);
        let (next, uid) = (timer.next, call.uid);
        self.calls.session_timers.arm(next, idx, uid);
    }

    /// Session timers that fired: a missed refresh ends the call; Parley's
    /// own refresh goes out.
    pub(super) fn session_timers(&mut self, now: Instant) {
        while let Some((at, idx, uid)) = self.calls.session_timers.pop_due(now) {
            let Some(call) = self.calls.live(idx, uid) else {
                continue;
            };
            let Some(timer) = call.session.filter(|t| t.next == at) else {
                continue; // re-armed since
            };
            if timer.request.caller_refreshes {
                tracing::warn!(call_ref = %call.call_ref, "the caller did not refresh its session in time; ending the call");
                self.end_answered_call(now, idx, "Session Expired");
            } else if self.send_session_refresh(now, idx) {
                let call = &mut self.calls.calls[idx];
                if let Some(t) = call.session.as_mut() {
                    t.next = t.request.next_after(now);
                    let next = t.next;
                    self.calls.session_timers.arm(next, idx, uid);
                }
            } else {
                self.retry_session_refresh(now, idx);
            }
        }
    }

    /// The side `y` took an offer Parley relayed to it, but the exchange
    /// failed after (its answer unusable, or no answer for the side that
    /// offered): `y` now runs a session Parley does not carry. Parley
    /// offers it again what it had before, a newer version of it (RFC 6337
    /// §3.3: a new offer puts the session right); should that fail too,
    /// the call ends.
    pub(super) fn restore_side(&mut self, now: Instant, idx: usize, y: Side) {
        let call = &self.calls.calls[idx];
        let Some(w) = call.winner else {
            return;
        };
        let flow = match y {
            Side::Caller => call.caller_flow,
            Side::Callee => call.branches[w].flow,
        };
        let via = self.via(&flow, &branch_id());
        let call = &mut self.calls.calls[idx];
        let session = call.session.filter(|_| y == Side::Caller);
        let (previous, local, dialog) = match y {
            Side::Caller => (
                call.sent_to_caller.clone(),
                &mut call.caller_local,
                call.caller_dialog.as_mut(),
            ),
            Side::Callee => (
                Some(call.branches[w].offer.clone()),
                &mut call.branches[w].local,
                call.callee_dialog.as_mut(),
            ),
        };
        let (Some(mut sent), Some(dialog)) = (previous, dialog) else {
            return self.end_answered_call(now, idx, RENEGOTIATION_FAILED);
        };
        local.version += 1;
        sent.origin.session_version = local.version;
        let mut b = dialog.request("INVITE", &via, None);
        b.header(HeaderName::Allow, ALLOWED_METHODS);
        if let Some(timer) = session {
            timer.add_to_request(&mut b);
        }
        let sent_seq = dialog.local_seq;
        let bytes = b.finish_with_body(Some("application/sdp"), &sent.to_bytes());
        tracing::warn!(call_ref = %call.call_ref, side = ?y, "restoring a side's session after a failed re-INVITE");
        match self.tx.send_request(now, flow, bytes) {
            Ok(ctx) => {
                self.calls.by_branch.insert(ctx, (idx, REPAIR));
                self.calls.calls[idx].repair = Some(Repair {
                    side: y,
                    sent,
                    sent_seq,
                });
            }
            Err(_) => self.end_answered_call(now, idx, RENEGOTIATION_FAILED),
        }
    }

    /// The answer to Parley's restoring offer: the side's leg follows it,
    /// or the call ends.
    pub(super) fn repair_response(
        &mut self,
        now: Instant,
        idx: usize,
        ctx: ClientTxId,
        msg: &Message,
    ) {
        let status = msg.status().unwrap_or(500);
        if status < 200 {
            return;
        }
        self.calls.by_branch.remove(&ctx);
        let Some(r) = self.calls.calls[idx].repair.take() else {
            return;
        };
        let Some(w) = self.calls.calls[idx].winner else {
            return;
        };
        if status == 491 {
            // The side is making an offer of its own, which will be relayed
            // and answered: that puts its session right as well.
            return;
        }
        if status >= 300 {
            tracing::warn!(call_ref = %self.calls.calls[idx].call_ref, status, "a side refused Parley's restoring offer; ending the call");
            return self.end_answered_call(now, idx, RENEGOTIATION_FAILED);
        }
        let call = &self.calls.calls[idx];
        let flow = match r.side {
            Side::Caller => call.caller_flow,
            Side::Callee => call.branches[w].flow,
        };
        let via = self.via(&flow, &branch_id());
        let call = &mut self.calls.calls[idx];
        if let Some(d) = match r.side {
            Side::Caller => call.caller_dialog.as_mut(),
            Side::Callee => call.callee_dialog.as_mut(),
        } {
            d.refresh_target(msg);
            let ack = d.ack(r.sent_seq, &via, None);
            if r.side == Side::Caller {
                self.session_refreshed_by_parley(now, idx, msg);
            }
            self.remember_ack(now, ctx, flow, ack.clone());
            self.transmit(flow, ack);
        }
        let call = &self.calls.calls[idx];
        let current = match r.side {
            Side::Caller => Some(&call.caller_media),
            Side::Callee => call.callee_media.as_ref(),
        };
        let tls = flow.transport == Transport::Tls;
        let answer = match read_phone_sdp(msg.body(), tls, kept_security(current), Some(&r.sent)) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, call_ref = %call.call_ref, "answer to Parley's restoring offer refused; ending the call");
                return self.end_answered_call(now, idx, RENEGOTIATION_FAILED);
            }
        };
        self.adopt_answer(now, idx, r.side, flow, answer, r.sent);
    }

    /// A side's answer to an offer Parley made it (`sent`): they become the
    /// side's media and what Parley last sent it, and its leg follows.
    fn adopt_answer(
        &mut self,
        now: Instant,
        idx: usize,
        side: Side,
        flow: Flow,
        answer: PhoneMedia,
        sent: SessionDescription,
    ) {
        let call = &mut self.calls.calls[idx];
        let (leg, media) = match side {
            Side::Caller => {
                let media = leg_media(&answer, &call.caller_local, flow, &answer);
                call.caller_media = answer;
                call.sent_to_caller = Some(sent);
                (call.caller_leg.id, media)
            }
            Side::Callee => {
                let Some(w) = call.winner else {
                    return;
                };
                let media = leg_media(&answer, &call.branches[w].local, flow, &answer);
                call.callee_media = Some(answer);
                call.branches[w].offer = sent;
                (call.branches[w].leg.id, media)
            }
        };
        self.configure_leg(now, idx, leg, media);
    }

    /// Hangs up both sides of an answered call on Parley's initiative.
    pub(super) fn end_answered_call(&mut self, now: Instant, idx: usize, reason: &str) {
        self.hang_up_other_side(now, idx, Side::Caller);
        self.hang_up_other_side(now, idx, Side::Callee);
        self.finish_call(
            now,
            idx,
            Outcome::Answered,
            200,
            reason,
            Some(EndedBy::Parley),
        );
    }

    /// Tries Parley's refresh again soon: after a 491, or when it had to
    /// wait for another INVITE exchange with the caller to finish. The
    /// caller chose the dialog's Call-ID, so Parley waits under 2 s (RFC
    /// 3261 §14.1).
    fn retry_session_refresh(&mut self, now: Instant, idx: usize) {
        let call = &mut self.calls.calls[idx];
        let Some(t) = call.session.as_mut() else {
            return;
        };
        t.next = now + Duration::from_millis(rand::random_range(100..2000));
        let (next, uid) = (t.next, call.uid);
        self.calls.session_timers.arm(next, idx, uid);
    }

    /// Parley refreshes the caller's session: UPDATE without a body when
    /// the caller allows it, otherwise a re-INVITE repeating the
    /// description the caller already has. A re-INVITE waits while another
    /// INVITE with the caller is in progress either way (the caller would
    /// answer 491): returns false then.
    fn send_session_refresh(&mut self, now: Instant, idx: usize) -> bool {
        let flow = self.calls.calls[idx].caller_flow;
        let via = self.via(&flow, &branch_id());
        let call = &mut self.calls.calls[idx];
        let Some(timer) = call.session else {
            return false;
        };
        let allows_update = call
            .invite
            .header_values(HeaderName::Allow)
            .any(|m| m.eq_ignore_ascii_case("UPDATE"));
        let reinvite_pending = call
            .reinvite
            .as_ref()
            .is_some_and(|r| r.method == Method::Invite);
        if !allows_update
            && (reinvite_pending || call.refresh_seq.is_some() || call.repair.is_some())
        {
            return false;
        }
        let sdp = call.sent_to_caller.as_ref().map(|s| s.to_bytes());
        let Some(dialog) = call.caller_dialog.as_mut() else {
            return false;
        };
        let (method, body) = if allows_update {
            ("UPDATE", None)
        } else {
            ("INVITE", sdp)
        };
        let mut b = dialog.request(method, &via, None);
        let seq = dialog.local_seq;
        timer.add_to_request(&mut b);
        let bytes = match &body {
            Some(sdp) => b.finish_with_body(Some("application/sdp"), sdp),
            None => b.finish_with_body(None, b""),
        };
        match self.tx.send_request(now, flow, bytes) {
            Ok(ctx) => {
                self.calls.by_branch.insert(ctx, (idx, SESSION_REFRESH));
                self.calls.calls[idx].refresh_seq = (method == "INVITE").then_some(seq);
                true
            }
            Err(e) => {
                // Not worth a quick retry: the next regular refresh.
                tracing::warn!(error = %e, "session refresh not sent");
                true
            }
        }
    }

    /// The caller's answer to Parley's refresh: a 2xx to a re-INVITE is
    /// acknowledged; 408 or 481 means the caller is gone (RFC 4028 §10).
    pub(super) fn session_refresh_response(
        &mut self,
        now: Instant,
        idx: usize,
        ctx: ClientTxId,
        msg: &Message,
    ) {
        let status = msg.status().unwrap_or(500);
        if status < 200 {
            return;
        }
        self.calls.by_branch.remove(&ctx);
        let flow = self.calls.calls[idx].caller_flow;
        if status >= 300 {
            self.calls.calls[idx].refresh_seq = None;
        }
        if status == 491 {
            // Crossed an INVITE of the caller's: again in a moment.
            self.retry_session_refresh(now, idx);
        } else if (200..300).contains(&status) {
            self.session_refreshed_by_parley(now, idx, msg);
            let via = self.via(&flow, &branch_id());
            let call = &mut self.calls.calls[idx];
            let seq = call.refresh_seq.take();
            if let Some(d) = call.caller_dialog.as_mut() {
                // A 2xx to a re-INVITE refreshes the target too (RFC 3261
                // §12.2.1.2).
                d.refresh_target(msg);
                let Some(seq) = seq else {
                    return;
                };
                let ack = d.ack(seq, &via, None);
                self.remember_ack(now, ctx, flow, ack.clone());
                self.transmit(flow, ack);
                if !msg.body().is_empty() {
                    self.refresh_answered(now, idx, flow, msg);
                }
            }
        } else if status == 408 || status == 481 {
            tracing::warn!(call_ref = %self.calls.calls[idx].call_ref, status, "the caller refused a session refresh; ending the call");
            self.end_answered_call(now, idx, "Session Refresh Failed");
        }
    }

    /// The caller's answer to the description Parley repeated in a refresh
    /// re-INVITE: a phone may answer with a new key or address (many make
    /// a key per answer), which its leg then takes; the old one would fail
    /// every packet after the refresh. A same key keeps its context.
    fn refresh_answered(&mut self, now: Instant, idx: usize, flow: Flow, msg: &Message) {
        let call = &self.calls.calls[idx];
        let Some(sent) = call.sent_to_caller.clone() else {
            return;
        };
        let tls = flow.transport == Transport::Tls;
        let security = super::kept_security(Some(&call.caller_media));
        match read_phone_sdp(msg.body(), tls, security, Some(&sent)) {
            Ok(answer) => self.adopt_answer(now, idx, Side::Caller, flow, answer, sent),
            Err(e) => {
                tracing::warn!(error = %e, call_ref = %call.call_ref, "answer to a session refresh refused; the caller's leg keeps its media");
            }
        }
    }

    /// INFO (DTMF, mostly) goes to the other side; its answer comes back.
    pub(super) fn relay_info(
        &mut self,
        now: Instant,
        idx: usize,
        from: Side,
        tx: ServerTxId,
        msg: &Message,
        flow: Flow,
    ) {
        if msg.body().len() > MAX_INFO_BODY {
            return self.reject(now, tx, msg, flow, 413, "INFO Body Too Large");
        }
        let Some(y_flow) = self.other_flow(idx, from) else {
            return self.reject(now, tx, msg, flow, 481, "Call Not Answered");
        };
        let via = self.via(&y_flow, &branch_id());
        let call = &mut self.calls.calls[idx];
        let y_dialog = match from {
            Side::Caller => call.callee_dialog.as_mut(),
            Side::Callee => call.caller_dialog.as_mut(),
        };
        let Some(y_dialog) = y_dialog else {
            return self.reject(now, tx, msg, flow, 481, "Call Not Answered");
        };
        let mut b = y_dialog.request("INFO", &via, None);
        for name in [HeaderName::InfoPackage, HeaderName::RecvInfo] {
            if let Some(v) = msg.header(name) {
                b.header(name, v);
            }
        }
        let bytes = b.finish_with_body(msg.header(HeaderName::ContentType), msg.body());
        match self.tx.send_request(now, y_flow, bytes) {
            Ok(ctx) => {
                self.calls.by_branch.insert(ctx, (idx, RELAYED));
                self.calls.relayed.insert(
                    ctx,
                    Relayed {
                        tx,
                        request: msg.clone(),
                        flow,
                    },
                );
            }
            Err(_) => self.reject(now, tx, msg, flow, 500, "Cannot Reach The Other Party"),
        }
    }

    /// The other side's answer to a relayed request, passed back.
    pub(super) fn relayed_response(&mut self, now: Instant, ctx: ClientTxId, msg: &Message) {
        let status = msg.status().unwrap_or(500);
        if status < 200 {
            return;
        }
        self.calls.by_branch.remove(&ctx);
        if let Some(r) = self.calls.relayed.remove(&ctx) {
            let b = self.response_builder(&r.request, r.flow, status, msg.reason());
            self.respond(now, r.tx, status, b.finish());
        }
    }

    /// A relayed request the other side never answered.
    pub(super) fn relayed_timeout(&mut self, now: Instant, ctx: ClientTxId) {
        self.calls.by_branch.remove(&ctx);
        if let Some(r) = self.calls.relayed.remove(&ctx) {
            let b = self.response_builder(&r.request, r.flow, 408, "Request Timeout");
            self.respond(now, r.tx, 408, b.finish());
        }
    }

    /// UPDATE without a body (a session refresh, usually), or a re-INVITE
    /// without an offer: Parley answers on its own with what the phone
    /// already has; nothing changes on the other side. For the re-INVITE,
    /// the phone's answer arrives in the ACK.
    pub(super) fn answer_without_offer(
        &mut self,
        now: Instant,
        idx: usize,
        side: Side,
        tx: ServerTxId,
        msg: &Message,
        flow: Flow,
    ) {
        let is_invite = msg.method() == Some(Method::Invite);
        let call = &self.calls.calls[idx];
        // Its answer would carry Parley's offer while another offer of
        // Parley's is out in the call (RFC 3261 §14.2).
        if is_invite
            && (call.refresh_seq.is_some() || call.repair.is_some() || call.reinvite.is_some())
        {
            return self.reject(now, tx, msg, flow, 491, "Request Pending");
        }
        let repeated = match side {
            Side::Caller => call.sent_to_caller.clone(),
            Side::Callee => call.winner.map(|w| call.branches[w].offer.clone()),
        };
        if is_invite && repeated.is_none() {
            return self.reject(now, tx, msg, flow, 488, "No Description To Offer");
        }
        self.session_refreshed(now, idx, side);
        let contact = self.contact_uri(&flow);
        let mut b = self.response_builder(msg, flow, 200, "OK");
        b.header_fmt(HeaderName::Contact, format_args!("<{contact}>"));
        b.header(HeaderName::Allow, ALLOWED_METHODS);
        if side == Side::Caller
            && let Some(t) = self.calls.calls[idx].session
        {
            t.request.add_to(&mut b);
        }
        let ok = match (is_invite, repeated) {
            (true, Some(sdp)) => {
                self.calls.calls[idx].offer_in_ok[side.index()] = msg.cseq().map(|c| c.seq);
                b.finish_with_body(Some("application/sdp"), &sdp.to_bytes())
            }
            _ => b.finish(),
        };
        if let Some(d) = match side {
            Side::Caller => self.calls.calls[idx].caller_dialog.as_mut(),
            Side::Callee => self.calls.calls[idx].callee_dialog.as_mut(),
        } {
            d.refresh_target(msg);
        }
        self.respond(now, tx, 200, ok);
    }

    /// The ACK that carries a phone's answer to the offer Parley put in a
    /// 200 (offerless re-INVITE): its leg follows the answer.
    pub(super) fn answer_in_ack(&mut self, now: Instant, idx: usize, side: Side, ack: &Message) {
        let call = &mut self.calls.calls[idx];
        // A late copy of an earlier ACK is not the answer.
        let seq = ack.cseq().map(|c| c.seq);
        if seq.is_none() || call.offer_in_ok[side.index()] != seq {
            return;
        }
        call.offer_in_ok[side.index()] = None;
        if ack.body().is_empty() {
            return;
        }
        let Some(w) = call.winner else {
            return;
        };
        let (flow, sent, current, local, leg) = match side {
            Side::Caller => (
                call.caller_flow,
                call.sent_to_caller.clone(),
                Some(&call.caller_media),
                &call.caller_local,
                call.caller_leg.id,
            ),
            Side::Callee => (
                call.branches[w].flow,
                Some(call.branches[w].offer.clone()),
                call.callee_media.as_ref(),
                &call.branches[w].local,
                call.branches[w].leg.id,
            ),
        };
        let security = super::kept_security(current);
        let answer = match read_phone_sdp(
            ack.body(),
            flow.transport == Transport::Tls,
            security,
            sent.as_ref(),
        ) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "answer in an ACK refused; the leg keeps its media");
                return;
            }
        };
        let media = super::leg_media(&answer, local, flow, &answer);
        match side {
            Side::Caller => call.caller_media = answer,
            Side::Callee => call.callee_media = Some(answer),
        }
        self.configure_leg(now, idx, leg, media);
    }

    /// The flow of the side opposite `from`, once the call is answered.
    fn other_flow(&self, idx: usize, from: Side) -> Option<Flow> {
        let call = &self.calls.calls[idx];
        call.winner?;
        call.flow_of(from.other())
    }
}
