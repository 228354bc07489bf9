//! The transaction layer of RFC 3261 §17 (with RFC 6026's fixes for 2xx),
//! sans-IO: requests and responses come in with the time, and what must be
//! sent and when to wake up next go out through `poll_transmit` and
//! `poll_timeout`, the shape quinn-proto uses.
//!
//! Server transactions absorb request retransmissions and repeat the last
//! response; client transactions retransmit over UDP until answered. Over
//! TCP and TLS nothing is retransmitted and the wait states last zero time,
//! except a 2xx to an INVITE: its ACK is end to end, and a hop beyond the
//! phone's connection may be UDP, so it goes out again until the ACK comes
//! whatever the transport (RFC 3261 §13.3.1.4).
//!
//! State is bounded: at most [`MAX_SERVER_TRANSACTIONS`] server
//! transactions exist. When the table is full, the oldest transaction that
//! has already sent a final response other than an INVITE's 2xx is
//! dropped early, non-INVITE ones first (an INVITE's may still be repeating
//! its final response until the ACK); a retransmission of its request then
//! reaches the core again as a new one and is answered again. If none can
//! be dropped, the layer refuses the new request and the caller answers
//! `503`.

#[cfg(test)]
mod tests;
mod timer;

use std::collections::hash_map::{DefaultHasher, RandomState};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use bytes::Bytes;
use slab::Slab;

use timer::{Side, TimerEntry, TimerHeap};
pub use timer::{TimerConfig, TimerKind};

use super::message::{HeaderName, Message, MessageBuilder, Method};
use super::transport::Flow;

/// Most server transactions alive at once.
pub const MAX_SERVER_TRANSACTIONS: usize = 65_536;
/// Most client transactions alive at once.
pub const MAX_CLIENT_TRANSACTIONS: usize = 65_536;

/// Handle to a server transaction, valid until it terminates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServerTxId {
    idx: usize,
    uid: u64,
}

/// Handle to a client transaction, valid until it terminates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientTxId {
    idx: usize,
    uid: u64,
}

/// What the transaction layer hands to its user (the registrar, the call
/// logic): everything that is not a retransmission.
#[derive(Debug)]
pub enum TuInput {
    /// A new request, with the server transaction that will carry the answer.
    Request {
        tx: ServerTxId,
        msg: Message,
        flow: Flow,
    },
    /// An ACK that matched no transaction: the ACK for a 2xx, which
    /// belongs to the dialog, not to the INVITE transaction.
    Ack { msg: Message, flow: Flow },
    /// A response for one of our client transactions (retransmissions of a
    /// final non-2xx response are absorbed).
    Response {
        tx: ClientTxId,
        msg: Message,
        flow: Flow,
    },
    /// A response that matched no client transaction, such as a 2xx
    /// retransmitted after Timer M; the dialog layer may still want it.
    StrayResponse { msg: Message, flow: Flow },
    /// Timer B or F fired: the peer never answered.
    ClientTimeout { tx: ClientTxId },
    /// Timer H fired: our final response to an INVITE was never acknowledged.
    ServerNoAck { tx: ServerTxId },
}

/// Bytes to send on a flow.
#[derive(Debug, Clone)]
pub struct Transmit {
    pub flow: Flow,
    pub bytes: Bytes,
}

/// A request that could not get a server transaction, handed back so the
/// caller can still answer it.
#[derive(Debug)]
pub struct Refused {
    pub error: TxError,
    pub msg: Message,
}

/// Why a request could not get a server transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    #[error("request has no usable Via or CSeq")]
    Unmatchable,
    #[error("transaction table full")]
    Overloaded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    Trying,
    Proceeding,
    Completed,
    Confirmed,
    Accepted,
}

#[derive(Debug)]
struct ServerTx {
    uid: u64,
    key: TxKey,
    invite: bool,
    state: ServerState,
    flow: Flow,
    last_response: Option<Bytes>,
    generations: [u32; 2],
    /// Timer G's current interval.
    interval: Duration,
    /// The dialog-level key of an INVITE's 2xx (Call-ID, CSeq number, From
    /// and To tags), which the ACK of that 2xx shares (it has a branch of
    /// its own). Set when the 2xx is sent; taken out once its ACK arrived.
    ack_key: Option<TxKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    /// INVITE "Calling" or non-INVITE "Trying".
    Trying,
    Proceeding,
    Completed,
    Accepted,
}

#[derive(Debug)]
struct ClientTx {
    uid: u64,
    key: TxKey,
    invite: bool,
    state: ClientState,
    flow: Flow,
    request: Message,
    ack: Option<Bytes>,
    generations: [u32; 2],
    interval: Duration,
    /// A CANCEL for it went out: it ends 64·T1 later at most.
    cancelled: bool,
}

pub struct TransactionLayer {
    config: TimerConfig,
    server: Slab<ServerTx>,
    server_index: HashMap<TxKey, usize>,
    /// Completed non-INVITE transactions, which is also Timer J: every
    /// entry waits the same 64·T1, so the queue is in deadline order and
    /// needs no heap. May hold ids already gone.
    completed_non_invite: VecDeque<(usize, u64, Instant)>,
    /// Completed INVITE transactions (their timers are in the heap), the
    /// second choice for eviction. May hold ids already gone, but not many.
    completed_invite: VecDeque<(usize, u64)>,
    /// INVITE transactions that sent a 2xx and wait for its ACK, by
    /// `ack_key`.
    awaiting_ack: HashMap<TxKey, usize>,
    client: Slab<ClientTx>,
    client_index: HashMap<TxKey, usize>,
    timers: TimerHeap,
    transmits: VecDeque<Transmit>,
    inputs: VecDeque<TuInput>,
    next_uid: u64,
    max_server: usize,
    keys: KeyMaker,
}

impl TransactionLayer {
    pub fn new(config: TimerConfig) -> TransactionLayer {
        TransactionLayer::with_capacity(config, MAX_SERVER_TRANSACTIONS)
    }

    /// A layer with a smaller server table, for tests of the bound.
    pub fn with_capacity(config: TimerConfig, max_server: usize) -> TransactionLayer {
        TransactionLayer {
            config,
            server: Slab::new(),
            server_index: HashMap::new(),
            keys: KeyMaker::default(),
            completed_non_invite: VecDeque::new(),
            completed_invite: VecDeque::new(),
            awaiting_ack: HashMap::new(),
            client: Slab::new(),
            client_index: HashMap::new(),
            timers: TimerHeap::default(),
            transmits: VecDeque::new(),
            inputs: VecDeque::new(),
            next_uid: 1,
            max_server: max_server.max(1),
        }
    }

    pub fn config(&self) -> &TimerConfig {
        &self.config
    }

    pub fn server_count(&self) -> usize {
        self.server.len()
    }

    pub fn client_count(&self) -> usize {
        self.client.len()
    }

    /// The next message to put on the wire.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next input for the transaction user produced by a timer.
    pub fn poll_input(&mut self) -> Option<TuInput> {
        self.inputs.pop_front()
    }

    /// When `handle_timeout` must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        // The first queued Timer J may belong to a transaction already
        // gone; waking for it early is harmless.
        let j = self.completed_non_invite.front().map(|&(_, _, d)| d);
        match (self.timers.next_deadline(), j) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---- server side ------------------------------------------------------

    /// Feeds a request that passed validation. Returns what the transaction
    /// user must see, or `Ok(None)` when the request was a retransmission
    /// (already answered here if there was something to repeat).
    // The Ok side carries the same message, so boxing the error saves nothing.
    #[allow(clippy::result_large_err)]
    pub fn handle_request(
        &mut self,
        now: Instant,
        msg: Message,
        flow: Flow,
    ) -> Result<Option<TuInput>, Refused> {
        let Some(method) = msg.method() else {
            return Err(Refused {
                error: TxError::Unmatchable,
                msg,
            });
        };
        let Some(key) = self.keys.server_key(&msg, method == Method::Ack) else {
            return Err(Refused {
                error: TxError::Unmatchable,
                msg,
            });
        };
        if method == Method::Ack {
            return Ok(self.handle_ack(now, key, msg, flow));
        }
        if let Some(&idx) = self.server_index.get(&key) {
            let tx = &self.server[idx];
            if let Some(resp) = &tx.last_response {
                self.transmits.push_back(Transmit {
                    flow: tx.flow,
                    bytes: resp.clone(),
                });
            }
            return Ok(None);
        }
        if self.server.len() >= self.max_server && !self.evict_one_completed() {
            return Err(Refused {
                error: TxError::Overloaded,
                msg,
            });
        }
        let uid = self.uid();
        let invite = method == Method::Invite;
        let idx = self.server.insert(ServerTx {
            uid,
            key,
            invite,
            state: if invite {
                ServerState::Proceeding
            } else {
                ServerState::Trying
            },
            flow,
            last_response: None,
            generations: [0; 2],
            interval: self.config.t1,
            ack_key: None,
        });
        self.server_index.insert(key, idx);
        Ok(Some(TuInput::Request {
            tx: ServerTxId { idx, uid },
            msg,
            flow,
        }))
    }

    fn handle_ack(
        &mut self,
        now: Instant,
        key: TxKey,
        msg: Message,
        flow: Flow,
    ) -> Option<TuInput> {
        let Some(&idx) = self.server_index.get(&key) else {
            self.note_2xx_ack(&msg);
            return Some(TuInput::Ack { msg, flow });
        };
        let tx = &mut self.server[idx];
        match tx.state {
            ServerState::Accepted => {
                self.note_2xx_ack(&msg);
                Some(TuInput::Ack { msg, flow })
            }
            ServerState::Completed => {
                tx.state = ServerState::Confirmed;
                // Timer G stops; Timer I replaces Timer H.
                tx.generations[0] += 1;
                let wait = if tx.flow.transport.is_reliable() {
                    Duration::ZERO
                } else {
                    self.config.t4
                };
                self.arm(now, Side::Server, idx, TimerKind::I, wait);
                None
            }
            ServerState::Confirmed => None,
            _ => Some(TuInput::Ack { msg, flow }),
        }
    }

    /// The ACK of a 2xx ends that 2xx's retransmissions (RFC 3261
    /// §13.3.1.4).
    fn note_2xx_ack(&mut self, ack: &Message) {
        let Some(key) = self.keys.ack_key(ack) else {
            return;
        };
        let Some(idx) = self.awaiting_ack.remove(&key) else {
            return;
        };
        let tx = &mut self.server[idx];
        tx.ack_key = None;
        // Stops the retransmission timer (slot 0).
        tx.generations[0] += 1;
    }

    /// Sends a final response and forgets the transaction at once, as a
    /// stateless UAS does (RFC 3261 §8.2.7). For answers to requests that
    /// prove nothing yet (challenges, refusals of blocked sources): a
    /// retransmission just gets a fresh answer, and strangers cannot make
    /// Parley hold state for them.
    pub fn respond_stateless(&mut self, id: ServerTxId, bytes: Bytes) {
        let Some(tx) = self.server.get(id.idx).filter(|t| t.uid == id.uid) else {
            return;
        };
        self.transmits.push_back(Transmit {
            flow: tx.flow,
            bytes,
        });
        self.remove_server(id.idx);
    }

    /// Sends a response through its server transaction. `status` must be
    /// the status code written in `bytes`.
    pub fn respond(&mut self, now: Instant, id: ServerTxId, status: u16, bytes: Bytes) {
        let Some(tx) = self.server.get_mut(id.idx).filter(|t| t.uid == id.uid) else {
            tracing::debug!(status, "response for a transaction that has ended");
            return;
        };
        let reliable = tx.flow.transport.is_reliable();
        let next = match (tx.invite, tx.state, status) {
            (_, ServerState::Trying | ServerState::Proceeding, 100..=199) => {
                ServerState::Proceeding
            }
            (false, ServerState::Trying | ServerState::Proceeding, _) => ServerState::Completed,
            (true, ServerState::Proceeding, 200..=299) => ServerState::Accepted,
            (true, ServerState::Proceeding, _) => ServerState::Completed,
            // 2xx retransmissions pass through the Accepted state (RFC 6026).
            (true, ServerState::Accepted, 200..=299) => ServerState::Accepted,
            (_, state, _) => {
                tracing::debug!(status, ?state, "response after the final one dropped");
                return;
            }
        };
        let entered = next != tx.state;
        tx.state = next;
        tx.last_response = Some(bytes.clone());
        self.transmits.push_back(Transmit {
            flow: tx.flow,
            bytes,
        });
        if !entered {
            return;
        }
        match next {
            ServerState::Completed if tx.invite => {
                if !reliable {
                    let t1 = self.config.t1;
                    self.arm(now, Side::Server, id.idx, TimerKind::G, t1);
                }
                let h = self.config.t1x64();
                self.arm(now, Side::Server, id.idx, TimerKind::H, h);
                self.completed_invite.push_back((id.idx, id.uid));
                // Entries outlive their transactions (Timers H and I end
                // them); drop the dead ones before they pile up.
                if self.completed_invite.len() > 2 * self.server.len() + 64 {
                    let server = &self.server;
                    self.completed_invite
                        .retain(|&(idx, uid)| server.get(idx).is_some_and(|t| t.uid == uid));
                }
            }
            ServerState::Completed => {
                if reliable {
                    self.remove_server(id.idx);
                } else {
                    // Timer J, kept in the completion queue.
                    let j = now + self.config.t1x64();
                    self.completed_non_invite.push_back((id.idx, id.uid, j));
                }
            }
            ServerState::Accepted => {
                // The UAS core's job in RFC 3261 §13.3.1.4, done here where
                // the timers are: the 2xx goes out again at T1, 2·T1, ...
                // up to T2, over any transport (a UDP hop may lie beyond
                // the phone's connection), until its ACK arrives; with no
                // ACK by 64·T1 the TU hears of it (and hangs up).
                let t1 = self.config.t1;
                self.arm(now, Side::Server, id.idx, TimerKind::G, t1);
                // Keyed with the 2xx's To tag: the ACK of another answer
                // to a copy of the same INVITE (a 482 to a merged request)
                // shares the rest.
                let key = self.server[id.idx]
                    .last_response
                    .clone()
                    .and_then(|b| Message::parse(b, super::message::Framing::Datagram).ok())
                    .and_then(|m| self.keys.ack_key(&m));
                self.server[id.idx].ack_key = key;
                if let Some(key) = key {
                    self.awaiting_ack.insert(key, id.idx);
                }
                let l = self.config.t1x64();
                self.arm(now, Side::Server, id.idx, TimerKind::L, l);
            }
            _ => {}
        }
    }

    /// The INVITE server transaction a CANCEL refers to (RFC 3261 §9.2).
    pub fn find_invite_for_cancel(&self, cancel: &Message) -> Option<ServerTxId> {
        let key = self.keys.server_key_for_method(cancel, "INVITE")?;
        let &idx = self.server_index.get(&key)?;
        let tx = &self.server[idx];
        Some(ServerTxId { idx, uid: tx.uid })
    }

    /// Whether the INVITE server transaction `id` sent a 2xx that is not
    /// acknowledged yet, and is still sending it again (RFC 6026).
    pub fn server_awaits_ack(&self, id: ServerTxId) -> bool {
        self.server.get(id.idx).is_some_and(|t| {
            t.uid == id.uid && t.state == ServerState::Accepted && t.ack_key.is_some()
        })
    }

    /// True while the server transaction exists and has sent no final response.
    pub fn server_is_pending(&self, id: ServerTxId) -> bool {
        self.server.get(id.idx).is_some_and(|t| {
            t.uid == id.uid && matches!(t.state, ServerState::Trying | ServerState::Proceeding)
        })
    }

    fn evict_one_completed(&mut self) -> bool {
        while let Some((idx, uid, _)) = self.completed_non_invite.pop_front() {
            if self.evict_if_done(idx, uid) {
                return true;
            }
        }
        while let Some((idx, uid)) = self.completed_invite.pop_front() {
            if self.evict_if_done(idx, uid) {
                return true;
            }
        }
        false
    }

    fn evict_if_done(&mut self, idx: usize, uid: u64) -> bool {
        let done = self.server.get(idx).is_some_and(|t| {
            t.uid == uid && matches!(t.state, ServerState::Completed | ServerState::Confirmed)
        });
        if done {
            self.remove_server(idx);
        }
        done
    }

    /// Ends non-INVITE transactions whose Timer J is due.
    fn fire_timer_j(&mut self, now: Instant) {
        while let Some(&(idx, uid, deadline)) = self.completed_non_invite.front() {
            if deadline > now {
                break;
            }
            self.completed_non_invite.pop_front();
            if self
                .server
                .get(idx)
                .is_some_and(|t| t.uid == uid && t.state == ServerState::Completed)
            {
                self.remove_server(idx);
            }
        }
    }

    fn remove_server(&mut self, idx: usize) {
        let tx = self.server.remove(idx);
        self.server_index.remove(&tx.key);
        if let Some(key) = tx.ack_key
            && self.awaiting_ack.get(&key) == Some(&idx)
        {
            self.awaiting_ack.remove(&key);
        }
    }

    // ---- client side ------------------------------------------------------

    /// Starts a client transaction for a request Parley built. The request
    /// must carry a Via with a unique `z9hG4bK` branch and a CSeq.
    pub fn send_request(
        &mut self,
        now: Instant,
        flow: Flow,
        bytes: Bytes,
    ) -> Result<ClientTxId, TxError> {
        let request = Message::parse(bytes.clone(), super::message::Framing::Datagram)
            .map_err(|_| TxError::Unmatchable)?;
        let method = request.method().ok_or(TxError::Unmatchable)?;
        let key = self.keys.client_key(&request).ok_or(TxError::Unmatchable)?;
        if self.client.len() >= MAX_CLIENT_TRANSACTIONS || self.client_index.contains_key(&key) {
            return Err(TxError::Overloaded);
        }
        let uid = self.uid();
        let invite = method == Method::Invite;
        let idx = self.client.insert(ClientTx {
            uid,
            key,
            invite,
            state: ClientState::Trying,
            flow,
            request,
            ack: None,
            generations: [0; 2],
            interval: self.config.t1,
            cancelled: false,
        });
        self.client_index.insert(key, idx);
        self.transmits.push_back(Transmit { flow, bytes });
        let (retransmit, give_up) = if invite {
            (TimerKind::A, TimerKind::B)
        } else {
            (TimerKind::E, TimerKind::F)
        };
        if !flow.transport.is_reliable() {
            let t1 = self.config.t1;
            self.arm(now, Side::Client, idx, retransmit, t1);
        }
        let t = self.config.t1x64();
        self.arm(now, Side::Client, idx, give_up, t);
        Ok(ClientTxId { idx, uid })
    }

    /// Feeds a response. Returns what the transaction user must see.
    pub fn handle_response(&mut self, now: Instant, msg: Message, flow: Flow) -> Option<TuInput> {
        let Some(idx) = self
            .keys
            .client_key(&msg)
            .and_then(|k| self.client_index.get(&k).copied())
        else {
            return Some(TuInput::StrayResponse { msg, flow });
        };
        let status = msg.status()?;
        let tx = &mut self.client[idx];
        let id = ClientTxId { idx, uid: tx.uid };
        let reliable = tx.flow.transport.is_reliable();
        match (tx.invite, tx.state, status) {
            (_, ClientState::Trying | ClientState::Proceeding, 100..=199) => {
                tx.state = ClientState::Proceeding;
                // (Only a transaction in Proceeding can have been cancelled.)
                if tx.invite && !tx.cancelled {
                    // Proceeding stops retransmissions (§17.1.1.2), and
                    // Timer C replaces Timer B (armed again by each
                    // provisional response until a CANCEL went out).
                    tx.generations[0] += 1;
                    let c = self.config.proceeding_limit;
                    self.arm(now, Side::Client, idx, TimerKind::C, c);
                }
            }
            (true, ClientState::Trying | ClientState::Proceeding, 200..=299) => {
                tx.state = ClientState::Accepted;
                tx.generations[0] += 1;
                let m = self.config.t1x64();
                self.arm(now, Side::Client, idx, TimerKind::M, m);
            }
            (true, ClientState::Accepted, 200..=299) => {}
            (true, ClientState::Trying | ClientState::Proceeding, _) => {
                let ack = build_ack(&tx.request, &msg);
                tx.ack = Some(ack.clone());
                tx.state = ClientState::Completed;
                tx.generations[0] += 1;
                self.transmits.push_back(Transmit {
                    flow: tx.flow,
                    bytes: ack,
                });
                if reliable {
                    self.remove_client(idx);
                } else {
                    self.arm(
                        now,
                        Side::Client,
                        idx,
                        TimerKind::D,
                        Duration::from_secs(32),
                    );
                }
            }
            (true, ClientState::Completed, 300..) => {
                if let Some(ack) = &tx.ack {
                    self.transmits.push_back(Transmit {
                        flow: tx.flow,
                        bytes: ack.clone(),
                    });
                }
                return None;
            }
            (false, ClientState::Trying | ClientState::Proceeding, _) => {
                tx.state = ClientState::Completed;
                tx.generations[0] += 1;
                if reliable {
                    self.remove_client(idx);
                } else {
                    let t4 = self.config.t4;
                    self.arm(now, Side::Client, idx, TimerKind::K, t4);
                }
            }
            _ => return None,
        }
        Some(TuInput::Response { tx: id, msg, flow })
    }

    /// The TU sent a CANCEL for INVITE transaction `id`: without a final
    /// response within 64·T1 it ends (RFC 3261 §9.1), reported as a
    /// timeout.
    pub fn cancelling(&mut self, now: Instant, id: ClientTxId) {
        let Some(tx) = self.client.get_mut(id.idx).filter(|t| t.uid == id.uid) else {
            return;
        };
        if !tx.invite || tx.cancelled || tx.state != ClientState::Proceeding {
            // In Trying, Timer B already ends it within 64·T1.
            return;
        }
        tx.cancelled = true;
        let limit = self.config.t1x64();
        self.arm(now, Side::Client, id.idx, TimerKind::C, limit);
    }

    /// The request a client transaction sent, to build a CANCEL or
    /// follow-up from.
    pub fn client_request(&self, id: ClientTxId) -> Option<&Message> {
        self.client
            .get(id.idx)
            .filter(|t| t.uid == id.uid)
            .map(|t| &t.request)
    }

    /// Ends every client transaction on a flow that broke (a closed
    /// connection), each reported as a timeout at once.
    pub fn flow_failed(&mut self, flow: &Flow) {
        let failed: Vec<usize> = self
            .client
            .iter()
            .filter(|(_, t)| {
                t.flow == *flow && matches!(t.state, ClientState::Trying | ClientState::Proceeding)
            })
            .map(|(i, _)| i)
            .collect();
        for idx in failed {
            let uid = self.client[idx].uid;
            self.remove_client(idx);
            self.inputs.push_back(TuInput::ClientTimeout {
                tx: ClientTxId { idx, uid },
            });
        }
    }

    fn remove_client(&mut self, idx: usize) {
        let tx = self.client.remove(idx);
        self.client_index.remove(&tx.key);
    }

    // ---- timers -------------------------------------------------------------

    fn uid(&mut self) -> u64 {
        self.next_uid += 1;
        self.next_uid
    }

    fn arm(&mut self, now: Instant, side: Side, idx: usize, kind: TimerKind, after: Duration) {
        let (uid, generation) = match side {
            Side::Server => {
                let tx = &mut self.server[idx];
                tx.generations[kind.slot()] += 1;
                (tx.uid, tx.generations[kind.slot()])
            }
            Side::Client => {
                let tx = &mut self.client[idx];
                tx.generations[kind.slot()] += 1;
                (tx.uid, tx.generations[kind.slot()])
            }
        };
        self.timers
            .push(now + after, side, idx, uid, kind, generation);
        self.compact_timers();
    }

    fn timer_is_live(&self, e: &TimerEntry) -> bool {
        let slot = e.kind.slot();
        match e.side {
            Side::Server => self
                .server
                .get(e.idx)
                .is_some_and(|t| t.uid == e.uid && t.generations[slot] == e.generation),
            Side::Client => self
                .client
                .get(e.idx)
                .is_some_and(|t| t.uid == e.uid && t.generations[slot] == e.generation),
        }
    }

    /// Rebuilds the heap when dead entries outnumber live timers by far.
    fn compact_timers(&mut self) {
        let live_bound = 2 * (self.server.len() + self.client.len()) + 1024;
        if self.timers.len() > 4 * live_bound {
            let mut heap = std::mem::take(&mut self.timers);
            heap.retain(|e| self.timer_is_live(e));
            self.timers = heap;
        }
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.fire_timer_j(now);
        while let Some(e) = self.timers.pop_due(now) {
            if !self.timer_is_live(&e) {
                continue;
            }
            match e.side {
                Side::Server => self.server_timer(now, e),
                Side::Client => self.client_timer(now, e),
            }
        }
    }

    fn server_timer(&mut self, now: Instant, e: TimerEntry) {
        let id = ServerTxId {
            idx: e.idx,
            uid: e.uid,
        };
        match e.kind {
            TimerKind::G => {
                let tx = &mut self.server[e.idx];
                if let Some(resp) = &tx.last_response {
                    self.transmits.push_back(Transmit {
                        flow: tx.flow,
                        bytes: resp.clone(),
                    });
                }
                tx.interval = (tx.interval * 2).min(self.config.t2);
                let next = tx.interval;
                self.arm(now, Side::Server, e.idx, TimerKind::G, next);
            }
            TimerKind::H => {
                self.remove_server(e.idx);
                self.inputs.push_back(TuInput::ServerNoAck { tx: id });
            }
            TimerKind::L => {
                let tx = &self.server[e.idx];
                let unacknowledged = tx.state == ServerState::Accepted && tx.ack_key.is_some();
                self.remove_server(e.idx);
                if unacknowledged {
                    self.inputs.push_back(TuInput::ServerNoAck { tx: id });
                }
            }
            _ => self.remove_server(e.idx),
        }
    }

    fn client_timer(&mut self, now: Instant, e: TimerEntry) {
        let id = ClientTxId {
            idx: e.idx,
            uid: e.uid,
        };
        match e.kind {
            TimerKind::A | TimerKind::E => {
                let tx = &mut self.client[e.idx];
                self.transmits.push_back(Transmit {
                    flow: tx.flow,
                    bytes: tx.request.as_bytes().clone(),
                });
                // A doubles without bound (§17.1.1.2); E is capped at T2 and
                // stays at T2 once a provisional response arrived (§17.1.2.2).
                tx.interval = match (e.kind, tx.state) {
                    (TimerKind::A, _) => tx.interval * 2,
                    (_, ClientState::Proceeding) => self.config.t2,
                    _ => (tx.interval * 2).min(self.config.t2),
                };
                let next = tx.interval;
                self.arm(now, Side::Client, e.idx, e.kind, next);
            }
            TimerKind::B | TimerKind::C | TimerKind::F => {
                self.remove_client(e.idx);
                self.inputs.push_back(TuInput::ClientTimeout { tx: id });
            }
            _ => self.remove_client(e.idx),
        }
    }
}

/// A transaction key: 128 bits of keyed hash over the fields that identify
/// the transaction. Fixed size, so matching allocates nothing; keyed with
/// secrets made at start, so no peer can aim two transactions at one key.
type TxKey = u128;

#[derive(Default)]
struct KeyMaker {
    a: RandomState,
    b: RandomState,
}

/// Feeds two independently keyed hashers at once.
struct KeyHasher(DefaultHasher, DefaultHasher);

impl KeyHasher {
    /// One field; 0xFF (never in UTF-8 text) separates fields.
    fn field(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
        self.1.write(bytes);
        self.0.write_u8(0xff);
        self.1.write_u8(0xff);
    }

    fn field_lowercase(&mut self, s: &str) {
        for b in s.bytes() {
            let b = b.to_ascii_lowercase();
            self.0.write_u8(b);
            self.1.write_u8(b);
        }
        self.0.write_u8(0xff);
        self.1.write_u8(0xff);
    }

    fn finish(&self) -> TxKey {
        (u128::from(self.0.finish()) << 64) | u128::from(self.1.finish())
    }
}

impl KeyMaker {
    fn hasher(&self) -> KeyHasher {
        KeyHasher(self.a.build_hasher(), self.b.build_hasher())
    }

    /// The key of RFC 3261 §17.2.3: branch, sent-by and method, with ACK
    /// matching its INVITE. Requests without the RFC 3261 magic cookie
    /// (RFC 2543 peers) are keyed by the fields §17.2.3 lists for them.
    fn server_key(&self, msg: &Message, is_ack: bool) -> Option<TxKey> {
        let method = if is_ack { "INVITE" } else { msg.method_str() };
        self.server_key_for_method(msg, method)
    }

    fn server_key_for_method(&self, msg: &Message, method: &str) -> Option<TxKey> {
        let via = msg.top_via()?;
        let mut h = self.hasher();
        h.field(method.as_bytes());
        if via.has_rfc3261_branch() {
            h.field(b"3261");
            h.field(via.branch()?.as_bytes());
            h.field_lowercase(via.sent_by);
        } else {
            let cseq = msg.cseq()?;
            h.field(b"2543");
            h.field(msg.request_uri().as_bytes());
            h.field(msg.call_id()?.as_bytes());
            h.field(msg.from()?.tag().unwrap_or("").as_bytes());
            h.field(&cseq.seq.to_be_bytes());
            h.field(msg.header_values(HeaderName::Via).next()?.as_bytes());
        }
        Some(h.finish())
    }

    /// What a 2xx to an INVITE and the ACK of that 2xx share (RFC 3261
    /// §13.2.2.4, §17.1.1.3): Call-ID, CSeq number, From and To tags.
    fn ack_key(&self, msg: &Message) -> Option<TxKey> {
        let mut h = self.hasher();
        h.field(b"2xx-ack");
        h.field(msg.call_id()?.as_bytes());
        h.field(&msg.cseq()?.seq.to_be_bytes());
        h.field(msg.from()?.tag().unwrap_or("").as_bytes());
        h.field(msg.to()?.tag().unwrap_or("").as_bytes());
        Some(h.finish())
    }

    /// The key of RFC 3261 §17.1.3: our branch and the CSeq method.
    fn client_key(&self, msg: &Message) -> Option<TxKey> {
        let via = msg.top_via()?;
        let cseq = msg.cseq()?;
        let mut h = self.hasher();
        h.field(cseq.method_str.as_bytes());
        h.field(via.branch()?.as_bytes());
        Some(h.finish())
    }
}

/// The ACK for a non-2xx final response (RFC 3261 §17.1.1.3).
fn build_ack(invite: &Message, response: &Message) -> Bytes {
    let mut b = MessageBuilder::request("ACK", invite.request_uri());
    if let Some(via) = invite.header_values(HeaderName::Via).next() {
        b.header(HeaderName::Via, via);
    }
    for route in invite.headers(HeaderName::Route) {
        b.header(HeaderName::Route, route);
    }
    b.header(HeaderName::MaxForwards, "70");
    if let Some(from) = invite.header(HeaderName::From) {
        b.header(HeaderName::From, from);
    }
    if let Some(to) = response.header(HeaderName::To) {
        b.header(HeaderName::To, to);
    }
    if let Some(cid) = invite.call_id() {
        b.header(HeaderName::CallId, cid);
    }
    if let Some(cseq) = invite.cseq() {
        b.header_fmt(HeaderName::CSeq, format_args!("{} ACK", cseq.seq));
    }
    b.finish()
}
