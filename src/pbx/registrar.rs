//! The location service behind REGISTER (RFC 3261 §10.3): bindings from an
//! extension to the contacts where its devices can be reached, each tied to
//! the flow it registered on.
//!
//! A binding is identified within its extension by `+sip.instance` (and
//! `reg-id`) when the device sends them (RFC 5626/5627), so a phone that
//! comes back from a new address replaces its old binding instead of
//! leaving a dead one behind; otherwise by its Contact URI.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use crate::sip::message::grammar::{self, parse_decimal_u32};
use crate::sip::message::limits::{MAX_CONTACTS_PER_REQUEST, MAX_NUMBER_DIGITS};
use crate::sip::message::{HeaderName, Message, NameAddr, Uri};
use crate::sip::transport::{ConnId, Flow, Transport};

/// Longest `+sip.instance` value kept.
const MAX_INSTANCE_BYTES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistrarConfig {
    /// Shortest registration accepted (`423 Interval Too Brief` below it).
    pub min_expires: u32,
    /// Longest registration granted; longer requests are shortened.
    pub max_expires: u32,
    /// Used when the device asks for nothing.
    pub default_expires: u32,
    /// Most bindings per extension; a new one replaces the one closest to
    /// expiry.
    pub max_contacts: usize,
}

impl Default for RegistrarConfig {
    fn default() -> RegistrarConfig {
        RegistrarConfig {
            min_expires: 60,
            max_expires: 3600,
            default_expires: 3600,
            max_contacts: 10,
        }
    }
}

/// One binding. Its text is shared (`Arc<str>`), so the copies that go out
/// in events cost reference counts, not allocations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The extension number.
    pub aor: Arc<str>,
    /// The binding's name in the store: its instance (and reg-id) when the
    /// device sends one, else its Contact URI as sent. Which request refers
    /// to which binding is decided by [`same_binding`], since two spellings
    /// of one Contact URI are one binding.
    pub key: Arc<str>,
    /// The Contact URI exactly as the device sent it (some devices look
    /// for it byte for byte in the 200 OK).
    pub contact: Arc<str>,
    pub instance: Option<Arc<str>>,
    pub reg_id: Option<u32>,
    pub call_id: Arc<str>,
    pub cseq: u32,
    pub expires_at: Instant,
    /// Where the REGISTER came from: requests for this contact go back here.
    pub flow: Flow,
    pub user_agent: Option<Arc<str>>,
    /// The expiry the store last recorded, if it recorded this binding.
    stored_until: Option<Instant>,
    uid: u64,
}

impl Binding {
    /// Seconds left, rounded up, as shown in `;expires=`.
    pub fn expires_in(&self, now: Instant) -> u32 {
        let left = self.expires_at.saturating_duration_since(now);
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        u32::try_from(secs).unwrap_or(u32::MAX)
    }

    /// The Contact header value for a 200 OK to REGISTER.
    pub fn contact_value(&self, now: Instant) -> ContactValue<'_> {
        ContactValue { binding: self, now }
    }

    pub fn contact_header(&self, now: Instant) -> String {
        self.contact_value(now).to_string()
    }
}

/// Writes a binding as `<uri>;expires=N[;+sip.instance="..."][;reg-id=N]`.
pub struct ContactValue<'a> {
    binding: &'a Binding,
    now: Instant,
}

use std::fmt::Write as _;

impl std::fmt::Display for ContactValue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.binding;
        f.write_char('<')?;
        f.write_str(&b.contact)?;
        f.write_str(">;expires=")?;
        f.write_str(itoa::Buffer::new().format(b.expires_in(self.now)))?;
        if let Some(inst) = &b.instance {
            let mut quoted = String::with_capacity(inst.len() + 2);
            grammar::quote_into(&mut quoted, inst);
            write!(f, ";+sip.instance={quoted}")?;
        }
        if let Some(r) = b.reg_id {
            write!(f, ";reg-id={r}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Refreshed,
    /// The device unregistered it.
    Removed,
    Expired,
    /// Pushed out by a newer binding when the extension had too many.
    Replaced,
    /// Its TCP/TLS connection closed.
    FlowClosed,
    /// Its extension was deleted.
    ExtensionRemoved,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Refreshed => "refreshed",
            Change::Removed => "removed",
            Change::Expired => "expired",
            Change::Replaced => "replaced",
            Change::FlowClosed => "connection-closed",
            Change::ExtensionRemoved => "extension-removed",
        }
    }

    pub fn is_removal(self) -> bool {
        !matches!(self, Change::Added | Change::Refreshed)
    }
}

/// One change to the location service. `previous_flow` is set when a
/// refresh moved the binding to another flow.
#[derive(Debug, Clone)]
pub struct BindingChange {
    pub change: Change,
    pub binding: Binding,
    pub previous_flow: Option<Flow>,
    /// The store's name of this binding before this change, when a device
    /// wrote its Contact another way: that copy goes.
    pub previous_key: Option<Arc<str>>,
    /// Whether the store's copy must be written. A refresh that only moves
    /// the expiry is written once the stored expiry has less than half the
    /// granted time left: a restart then never loses a binding before the
    /// phone's next refresh (phones refresh at 50-90% of the expiry), and a
    /// busy registrar does not write on every refresh.
    pub store: bool,
}

impl BindingChange {
    fn removal(change: Change, binding: Binding) -> BindingChange {
        let store = binding.stored_until.is_some();
        BindingChange {
            change,
            binding,
            previous_flow: None,
            previous_key: None,
            store,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("Interval Too Brief")]
    IntervalTooBrief { min_expires: u32 },
    #[error("Malformed Contact")]
    MalformedContact,
    #[error("Contact URI Must Be SIP Or SIPS")]
    UnsupportedContact,
    #[error("Too Many Contacts In One Request")]
    TooManyContacts,
    #[error("Wildcard Contact Needs Expires 0 And No Other Contact")]
    BadWildcard,
    #[error("CSeq Out Of Order")]
    OutOfOrder,
    #[error("Missing Call-ID Or CSeq")]
    MissingHeaders,
}

/// Whether two contacts are one binding: the same instance (and reg-id),
/// or, without one, Contact URIs equal as RFC 3261 §19.1.4 compares them.
fn same_binding(a: (&str, &str, bool), b: (&str, &str, bool)) -> bool {
    let ((key_a, contact_a, instance_a), (key_b, contact_b, instance_b)) = (a, b);
    match (instance_a, instance_b) {
        (true, true) => key_a == key_b,
        (false, false) => {
            contact_a == contact_b
                || match (Uri::parse(contact_a), Uri::parse(contact_b)) {
                    (Ok(a), Ok(b)) => a.equivalent(&b),
                    _ => false,
                }
        }
        _ => false,
    }
}

impl Binding {
    fn identity(&self) -> (&str, &str, bool) {
        (&self.key, &self.contact, self.instance.is_some())
    }
}

impl Requested<'_> {
    fn identity(&self) -> (&str, &str, bool) {
        (&self.key, self.contact, self.instance.is_some())
    }
}

/// A Contact of the request, checked but not yet applied; borrowed from
/// the request.
struct Requested<'a> {
    key: Cow<'a, str>,
    contact: &'a str,
    instance: Option<Cow<'a, str>>,
    reg_id: Option<u32>,
    expires: u32,
}

pub struct Registrar {
    cfg: RegistrarConfig,
    by_aor: HashMap<Arc<str>, SmallVec<[Binding; 2]>>,
    /// Stream connections and the bindings that use them.
    by_conn: HashMap<ConnId, SmallVec<[u64; 2]>>,
    /// The extension of each binding, by binding id.
    aor_of: HashMap<u64, Arc<str>>,
    /// Expiry times by binding id; entries made stale by refreshes are
    /// skipped when they come up.
    expiry: BinaryHeap<Reverse<(Instant, u64)>>,
    count: usize,
    next_uid: u64,
}

impl Registrar {
    pub fn new(cfg: RegistrarConfig) -> Registrar {
        Registrar {
            cfg,
            by_aor: HashMap::new(),
            by_conn: HashMap::new(),
            aor_of: HashMap::new(),
            expiry: BinaryHeap::new(),
            count: 0,
            next_uid: 0,
        }
    }

    pub fn config(&self) -> &RegistrarConfig {
        &self.cfg
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn bindings(&self, aor: &str) -> &[Binding] {
        self.by_aor.get(aor).map(|v| &v[..]).unwrap_or(&[])
    }

    pub fn all(&self) -> impl Iterator<Item = &Binding> {
        self.by_aor.values().flatten()
    }

    /// Whether a TCP/TLS connection carries a registration (and so must
    /// never be closed for being idle).
    pub fn conn_has_bindings(&self, conn: ConnId) -> bool {
        self.by_conn.get(&conn).is_some_and(|v| !v.is_empty())
    }

    /// Applies a REGISTER from an authenticated device of `aor`. Nothing
    /// changes unless the whole request is acceptable.
    pub fn register(
        &mut self,
        now: Instant,
        aor: &str,
        req: &Message,
        flow: Flow,
        user_agent: Option<&str>,
    ) -> Result<Vec<BindingChange>, RegisterError> {
        let call_id = req.call_id().ok_or(RegisterError::MissingHeaders)?;
        let cseq = req.cseq().ok_or(RegisterError::MissingHeaders)?.seq;
        let header_expires = req.header(HeaderName::Expires);
        let contacts: SmallVec<[&str; 4]> = req.header_values(HeaderName::Contact).collect();
        if contacts.len() > MAX_CONTACTS_PER_REQUEST {
            return Err(RegisterError::TooManyContacts);
        }
        if contacts.contains(&"*") {
            let zero =
                header_expires.and_then(|e| parse_decimal_u32(e, MAX_NUMBER_DIGITS)) == Some(0);
            if contacts.len() != 1 || !zero {
                return Err(RegisterError::BadWildcard);
            }
            return self.remove_all(aor, call_id, cseq);
        }

        let default = header_expires
            .and_then(|e| parse_decimal_u32(e, MAX_NUMBER_DIGITS))
            .unwrap_or(self.cfg.default_expires);
        let mut requested: SmallVec<[Requested; 4]> = SmallVec::new();
        for value in &contacts {
            let r = self.parse_contact(value, default)?;
            if r.expires != 0 && r.expires < self.cfg.min_expires {
                return Err(RegisterError::IntervalTooBrief {
                    min_expires: self.cfg.min_expires,
                });
            }
            if let Some(existing) = self.find(aor, r.identity())
                && *existing.call_id == *call_id
                && cseq <= existing.cseq
            {
                return Err(RegisterError::OutOfOrder);
            }
            requested.retain(|earlier| !same_binding(earlier.identity(), r.identity()));
            requested.push(r);
        }

        let mut changes = Vec::new();
        for r in requested {
            self.apply(now, aor, r, call_id, cseq, flow, user_agent, &mut changes);
        }
        Ok(changes)
    }

    fn parse_contact<'a>(
        &self,
        value: &'a str,
        default_expires: u32,
    ) -> Result<Requested<'a>, RegisterError> {
        let na = NameAddr::parse(value).ok_or(RegisterError::MalformedContact)?;
        Uri::parse(na.uri).map_err(|_| RegisterError::UnsupportedContact)?;
        // A malformed expires parameter falls back to the default (§10.3).
        let expires = match na.param("expires") {
            Some(Some(e)) => parse_decimal_u32(e, MAX_NUMBER_DIGITS).unwrap_or(default_expires),
            _ => default_expires,
        }
        .min(self.cfg.max_expires);
        let instance = na
            .param("+sip.instance")
            .flatten()
            .and_then(grammar::unquote)
            .filter(|i| !i.is_empty() && i.len() <= MAX_INSTANCE_BYTES);
        let reg_id = na
            .param("reg-id")
            .flatten()
            .and_then(|r| parse_decimal_u32(r, MAX_NUMBER_DIGITS));
        let key = match (&instance, reg_id) {
            (Some(i), Some(r)) => Cow::Owned(format!("{i};reg-id={r}")),
            (Some(i), None) => i.clone(),
            (None, _) => Cow::Borrowed(na.uri),
        };
        Ok(Requested {
            key,
            contact: na.uri,
            instance,
            reg_id,
            expires,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        now: Instant,
        aor: &str,
        r: Requested<'_>,
        call_id: &str,
        cseq: u32,
        flow: Flow,
        user_agent: Option<&str>,
        changes: &mut Vec<BindingChange>,
    ) {
        let existing = self.by_aor.get(aor).and_then(|list| {
            list.iter()
                .position(|b| same_binding(b.identity(), r.identity()))
        });
        if r.expires == 0 {
            if let Some(pos) = existing {
                let b = self.take(aor, pos);
                changes.push(BindingChange::removal(Change::Removed, b));
            }
            return;
        }
        let expires_at = now + Duration::from_secs(u64::from(r.expires));
        if let Some(pos) = existing {
            let uid = {
                let b = &mut self.by_aor.get_mut(aor).expect("present")[pos];
                b.uid
            };
            let old_flow = self.by_aor[aor][pos].flow;
            if old_flow != flow {
                self.unlink_conn(&old_flow, uid);
                self.link_conn(&flow, uid);
            }
            let b = &mut self.by_aor.get_mut(aor).expect("present")[pos];
            let half_left = b.stored_until.is_some_and(|stored| {
                stored.saturating_duration_since(now) * 2 >= expires_at - now
            });
            let store = old_flow != flow || *b.contact != *r.contact || !half_left;
            if store {
                b.stored_until = Some(expires_at);
            }
            // A refresh usually repeats everything: keep the shared text.
            if *b.contact != *r.contact {
                b.contact = r.contact.into();
            }
            let previous_key = (*b.key != *r.key).then(|| {
                let old = b.key.clone();
                b.key = Arc::from(&*r.key);
                old
            });
            if b.instance.as_deref() != r.instance.as_deref() {
                b.instance = r.instance.map(|i| Arc::from(&*i));
            }
            if *b.call_id != *call_id {
                b.call_id = call_id.into();
            }
            if b.user_agent.as_deref() != user_agent {
                b.user_agent = user_agent.map(Arc::from);
            }
            b.reg_id = r.reg_id;
            b.cseq = cseq;
            b.expires_at = expires_at;
            b.flow = flow;
            let binding = b.clone();
            self.schedule(expires_at, uid);
            changes.push(BindingChange {
                change: Change::Refreshed,
                binding,
                previous_flow: (old_flow != flow).then_some(old_flow),
                previous_key,
                store,
            });
            return;
        }
        if self.bindings(aor).len() >= self.cfg.max_contacts {
            let list = &self.by_aor[aor];
            let soonest = (0..list.len())
                .min_by_key(|&i| list[i].expires_at)
                .expect("non-empty");
            let b = self.take(aor, soonest);
            tracing::info!(extension = aor, contact = %b.contact, "binding replaced: extension has too many contacts");
            changes.push(BindingChange::removal(Change::Replaced, b));
        }
        self.next_uid += 1;
        let binding = Binding {
            aor: aor.into(),
            key: Arc::from(&*r.key),
            contact: r.contact.into(),
            instance: r.instance.map(|i| Arc::from(&*i)),
            reg_id: r.reg_id,
            call_id: call_id.into(),
            cseq,
            expires_at,
            flow,
            user_agent: user_agent.map(Arc::from),
            stored_until: Some(expires_at),
            uid: self.next_uid,
        };
        self.insert(binding.clone());
        changes.push(BindingChange {
            change: Change::Added,
            binding,
            previous_flow: None,
            previous_key: None,
            store: true,
        });
    }

    fn remove_all(
        &mut self,
        aor: &str,
        call_id: &str,
        cseq: u32,
    ) -> Result<Vec<BindingChange>, RegisterError> {
        let list = self.bindings(aor);
        if list
            .iter()
            .any(|b| *b.call_id == *call_id && cseq <= b.cseq)
        {
            return Err(RegisterError::OutOfOrder);
        }
        Ok(self.drain_aor(aor, Change::Removed))
    }

    /// Puts back a binding saved before a restart.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        &mut self,
        aor: &str,
        key: &str,
        contact: &str,
        instance: Option<String>,
        reg_id: Option<u32>,
        call_id: &str,
        cseq: u32,
        expires_at: Instant,
        flow: Flow,
        user_agent: Option<String>,
    ) {
        if self.find(aor, (key, contact, instance.is_some())).is_some()
            || self.bindings(aor).len() >= self.cfg.max_contacts
        {
            return;
        }
        self.next_uid += 1;
        self.insert(Binding {
            aor: aor.into(),
            key: key.into(),
            contact: contact.into(),
            instance: instance.map(Arc::from),
            reg_id,
            call_id: call_id.into(),
            cseq,
            expires_at,
            flow,
            user_agent: user_agent.map(Arc::from),
            stored_until: Some(expires_at),
            uid: self.next_uid,
        });
    }

    /// Removes every binding that has expired by `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<BindingChange> {
        let mut changes = Vec::new();
        while let Some(Reverse((at, _))) = self.expiry.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, uid))) = self.expiry.pop() else {
                break;
            };
            // Stale entries (the binding was refreshed or removed) find nothing.
            if let Some((aor, pos)) = self
                .locate(uid)
                .filter(|(aor, pos)| self.by_aor[aor][*pos].expires_at == at)
            {
                let b = self.take(&aor, pos);
                changes.push(BindingChange::removal(Change::Expired, b));
            }
        }
        changes
    }

    pub fn next_expiry(&self) -> Option<Instant> {
        self.expiry.peek().map(|Reverse((at, _))| *at)
    }

    /// The extension and position of a binding, by id.
    fn locate(&self, uid: u64) -> Option<(Arc<str>, usize)> {
        let aor = self.aor_of.get(&uid)?;
        let pos = self.by_aor.get(aor)?.iter().position(|b| b.uid == uid)?;
        Some((aor.clone(), pos))
    }

    /// Drops the bindings of a TCP/TLS connection that closed.
    pub fn flow_closed(&mut self, conn: ConnId) -> Vec<BindingChange> {
        let Some(uids) = self.by_conn.remove(&conn) else {
            return Vec::new();
        };
        let mut changes = Vec::new();
        for uid in uids {
            if let Some((aor, pos)) = self.locate(uid) {
                let b = self.take(&aor, pos);
                changes.push(BindingChange::removal(Change::FlowClosed, b));
            }
        }
        changes
    }

    /// Drops every binding of extensions for which `keep` says no.
    pub fn retain_aors(&mut self, mut keep: impl FnMut(&str) -> bool) -> Vec<BindingChange> {
        let gone: Vec<Arc<str>> = self.by_aor.keys().filter(|a| !keep(a)).cloned().collect();
        gone.iter()
            .flat_map(|aor| self.drain_aor(aor, Change::ExtensionRemoved))
            .collect()
    }

    fn drain_aor(&mut self, aor: &str, change: Change) -> Vec<BindingChange> {
        let mut changes = Vec::new();
        while !self.bindings(aor).is_empty() {
            let b = self.take(aor, 0);
            changes.push(BindingChange::removal(change, b));
        }
        changes
    }

    fn find(&self, aor: &str, identity: (&str, &str, bool)) -> Option<&Binding> {
        self.bindings(aor)
            .iter()
            .find(|b| same_binding(b.identity(), identity))
    }

    fn insert(&mut self, b: Binding) {
        let (at, uid, aor) = (b.expires_at, b.uid, b.aor.clone());
        self.link_conn(&b.flow, uid);
        self.count += 1;
        self.aor_of.insert(uid, aor.clone());
        self.by_aor.entry(aor).or_default().push(b);
        self.schedule(at, uid);
    }

    fn take(&mut self, aor: &str, pos: usize) -> Binding {
        let list = self.by_aor.get_mut(aor).expect("caller found it");
        let b = list.remove(pos);
        if list.is_empty() {
            self.by_aor.remove(aor);
        }
        self.count -= 1;
        self.aor_of.remove(&b.uid);
        self.unlink_conn(&b.flow, b.uid);
        b
    }

    fn link_conn(&mut self, flow: &Flow, uid: u64) {
        if flow.transport != Transport::Udp {
            self.by_conn.entry(flow.conn).or_default().push(uid);
        }
    }

    fn unlink_conn(&mut self, flow: &Flow, uid: u64) {
        if flow.transport == Transport::Udp {
            return;
        }
        if let Some(list) = self.by_conn.get_mut(&flow.conn) {
            list.retain(|u| *u != uid);
            if list.is_empty() {
                self.by_conn.remove(&flow.conn);
            }
        }
    }

    /// Arms the expiry of a binding. Refreshes leave stale entries behind;
    /// when they outnumber live bindings the heap is rebuilt from scratch.
    fn schedule(&mut self, at: Instant, uid: u64) {
        self.expiry.push(Reverse((at, uid)));
        if self.expiry.len() > 2 * self.count + 1024 {
            self.expiry = self
                .by_aor
                .values()
                .flatten()
                .map(|b| Reverse((b.expires_at, b.uid)))
                .collect();
        }
    }
}

#[cfg(test)]
mod tests;
