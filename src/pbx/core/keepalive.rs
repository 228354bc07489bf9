//! Parley keeps the NAT mappings of remote phones open on its own.
//!
//! A phone behind a home router registers over UDP; the router forgets
//! the mapping after 30 s to a few minutes of silence, and from then on
//! Parley's INVITE for that phone is dropped at the router. Many phones
//! send no keep-alives of their own, so Parley pings every remote UDP
//! binding with OPTIONS each `keepalive` interval. Any answer, even an
//! error status, proves the path works. A ping that times out (the
//! transaction layer retransmits it for 32 s first) marks the contact
//! unreachable: it is not rung until it answers a ping or registers again.
//!
//! TCP and TLS flows are kept open by TCP keep-alive probes set on the
//! socket by the runtime, with the same interval; a peer that stops
//! answering them closes the connection, which drops its bindings.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Core;
use super::calls::{branch_id, random_hex};
use crate::pbx::events::{Event, ReachabilityEvent};
use crate::pbx::registrar::Binding;
use crate::sip::dialog::MAX_FORWARDS;
use crate::sip::message::{HeaderName, Message, MessageBuilder, NameAddr};
use crate::sip::transaction::ClientTxId;
use crate::sip::transport::{Flow, Transport};

/// A binding: its extension and its key within the extension.
type BindingId = (Arc<str>, Arc<str>);

/// How many pings are spread over one interval: bindings fall due at
/// different moments, so a thousand phones are not pinged in one burst.
const TICKS_PER_INTERVAL: u32 = 5;

#[derive(Debug)]
struct Peer {
    flow: Flow,
    next_ping: Instant,
    in_flight: Option<ClientTxId>,
    unreachable: bool,
}

#[derive(Debug, Default)]
pub(super) struct Keepalive {
    peers: HashMap<BindingId, Peer>,
    by_tx: HashMap<ClientTxId, BindingId>,
    next_tick: Option<Instant>,
}

impl Keepalive {
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.next_tick
    }

    pub(super) fn is_unreachable(&self, aor: &Arc<str>, key: &Arc<str>) -> bool {
        self.peers
            .get(&(aor.clone(), key.clone()))
            .is_some_and(|p| p.unreachable)
    }

    pub(super) fn owns(&self, tx: ClientTxId) -> bool {
        self.by_tx.contains_key(&tx)
    }
}

impl Core {
    /// The interval between pings, if keep-alives are on.
    fn keepalive_interval(&self) -> Option<Duration> {
        self.cfg.keepalive.filter(|d| !d.is_zero())
    }

    /// Arms the first tick once Parley runs with keep-alives on.
    pub(super) fn start_keepalive(&mut self, now: Instant) {
        if let Some(interval) = self.keepalive_interval() {
            self.keepalive.next_tick = Some(now + interval / TICKS_PER_INTERVAL);
        }
    }

    /// A device registered (or refreshed) a binding: the path works now,
    /// and the next ping can wait a whole interval.
    pub(super) fn keepalive_heard_from(&mut self, now: Instant, binding: &Binding) {
        let Some(interval) = self.keepalive_interval() else {
            return;
        };
        if !self.needs_pings(binding) {
            return;
        }
        let id = (binding.aor.clone(), binding.key.clone());
        let p = self.keepalive.peers.entry(id.clone()).or_insert(Peer {
            flow: binding.flow,
            next_ping: now,
            in_flight: None,
            unreachable: false,
        });
        p.flow = binding.flow;
        p.next_ping = now + interval;
        // A ping still out went to the path the device just replaced (or
        // proved): whatever becomes of it says nothing now.
        p.in_flight = None;
        if p.unreachable {
            p.unreachable = false;
            let flow = p.flow;
            self.reachability(&id, flow, true);
        }
    }

    /// Remote UDP contacts: the ones behind a NAT Parley must keep open.
    fn needs_pings(&self, b: &Binding) -> bool {
        b.flow.transport == Transport::Udp && !self.cfg.lan.contains(b.flow.remote.ip())
    }

    /// Pings the remote UDP bindings that are due; forgets bindings that
    /// are gone.
    pub(super) fn keepalive_timers(&mut self, now: Instant) {
        let Some(interval) = self.keepalive_interval() else {
            return;
        };
        if self.keepalive.next_tick.is_none_or(|t| now < t) {
            return;
        }
        self.keepalive.next_tick = Some(now + interval / TICKS_PER_INTERVAL);
        let mut live = HashSet::new();
        let mut due = Vec::new();
        for b in self.registrar.all() {
            if !self.needs_pings(b) {
                continue;
            }
            let id = (b.aor.clone(), b.key.clone());
            let peer = self.keepalive.peers.entry(id.clone()).or_insert(Peer {
                flow: b.flow,
                // Registering just opened the mapping.
                next_ping: now + interval,
                in_flight: None,
                unreachable: false,
            });
            peer.flow = b.flow;
            if peer.next_ping <= now && peer.in_flight.is_none() {
                due.push((id.clone(), b.contact.clone()));
            }
            live.insert(id);
        }
        let ka = &mut self.keepalive;
        ka.peers.retain(|id, p| {
            let keep = live.contains(id);
            if !keep && let Some(tx) = p.in_flight {
                ka.by_tx.remove(&tx);
            }
            keep
        });
        for (id, contact) in due {
            self.ping(now, id, &contact, interval);
        }
    }

    fn ping(&mut self, now: Instant, id: BindingId, contact: &str, interval: Duration) {
        let Some(flow) = self.keepalive.peers.get(&id).map(|p| p.flow) else {
            return;
        };
        let target = NameAddr::parse(contact)
            .map(|c| c.uri.to_string())
            .unwrap_or(contact.to_string());
        let mut b = MessageBuilder::request("OPTIONS", &target);
        b.header(HeaderName::Via, &self.via(&flow, &branch_id()));
        b.header(HeaderName::MaxForwards, MAX_FORWARDS);
        b.header_fmt(
            HeaderName::From,
            format_args!("<sip:parley@{}>;tag={}", self.cfg.domain, random_hex()),
        );
        b.header_fmt(HeaderName::To, format_args!("<{target}>"));
        b.header_fmt(HeaderName::CallId, format_args!("{}@parley", random_hex()));
        b.header(HeaderName::CSeq, "1 OPTIONS");
        b.header(HeaderName::UserAgent, &self.cfg.server_name);
        let bytes = b.finish_with_body(None, b"");
        match self.tx.send_request(now, flow, bytes) {
            Ok(tx) => {
                if let Some(p) = self.keepalive.peers.get_mut(&id) {
                    p.in_flight = Some(tx);
                    p.next_ping = now + interval;
                }
                self.keepalive.by_tx.insert(tx, id);
            }
            Err(e) => tracing::debug!(error = %e, %flow, "keep-alive ping not sent"),
        }
    }

    /// The answer to a ping, whatever its status: the phone is there.
    pub(super) fn keepalive_response(&mut self, tx: ClientTxId, msg: &Message) {
        if msg.status().is_some_and(|s| s < 200) {
            return;
        }
        let Some(id) = self.keepalive.by_tx.remove(&tx) else {
            return;
        };
        if let Some(p) = self
            .keepalive
            .peers
            .get_mut(&id)
            .filter(|p| p.in_flight == Some(tx))
        {
            p.in_flight = None;
            if p.unreachable {
                p.unreachable = false;
                let flow = p.flow;
                self.reachability(&id, flow, true);
            }
        }
    }

    /// A ping went unanswered through all its retransmissions.
    pub(super) fn keepalive_timeout(&mut self, tx: ClientTxId) {
        let Some(id) = self.keepalive.by_tx.remove(&tx) else {
            return;
        };
        if let Some(p) = self
            .keepalive
            .peers
            .get_mut(&id)
            .filter(|p| p.in_flight == Some(tx))
        {
            p.in_flight = None;
            if !p.unreachable {
                p.unreachable = true;
                let flow = p.flow;
                self.reachability(&id, flow, false);
            }
        }
    }

    fn reachability(&mut self, id: &BindingId, flow: Flow, reachable: bool) {
        if reachable {
            tracing::info!(extension = %id.0, binding = %id.1, %flow, "contact answers again");
        } else {
            tracing::warn!(extension = %id.0, binding = %id.1, %flow, "contact stopped answering keep-alive pings; not rung until it answers");
        }
        self.out.push_back(super::Output::Event(Event::Reachability(
            ReachabilityEvent {
                extension: id.0.clone(),
                binding: id.1.clone(),
                remote: flow.remote,
                reachable,
            },
        )));
    }
}
