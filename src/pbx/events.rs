//! What the core tells the rest of Parley: events a console can subscribe
//! to, and the writes the store must make.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::lockout::BlockScope;
use super::policy::PolicyViolation;
use super::registrar::Change;
use crate::sip::transport::Transport;

/// A registration appeared, was refreshed or went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationEvent {
    pub extension: Arc<str>,
    pub contact: Arc<str>,
    pub transport: Transport,
    pub remote: SocketAddr,
    pub user_agent: Option<Arc<str>>,
    pub change: Change,
    /// Seconds the binding has left (0 for removals).
    pub expires_in: u32,
}

/// Something an administrator should be able to review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecurityEvent {
    /// Wrong password or unknown extension.
    AuthFailed {
        source: IpAddr,
        extension: String,
        transport: Transport,
    },
    /// Repeated failures started a temporary block.
    Blocked {
        source: IpAddr,
        extension: String,
        scope: BlockScope,
        failures: u32,
        seconds: u64,
    },
    /// Valid credentials, refused by the encryption policy.
    PolicyViolation {
        source: IpAddr,
        extension: String,
        transport: Transport,
        violation: PolicyViolation,
    },
    /// One extension's credentials used for another's address.
    WrongUser {
        source: IpAddr,
        extension: String,
        username: String,
    },
}

/// A remote contact stopped answering Parley's keep-alive pings, or
/// answers again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReachabilityEvent {
    pub extension: Arc<str>,
    /// The binding's key within the extension (its instance or contact).
    pub binding: Arc<str>,
    pub remote: SocketAddr,
    pub reachable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Registration(RegistrationEvent),
    Security(SecurityEvent),
    Reachability(ReachabilityEvent),
}

/// A UDP binding as the store keeps it, so it survives a restart. (TCP and
/// TLS bindings die with their connection and are never stored.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBinding {
    pub extension: String,
    pub key: String,
    pub contact: String,
    pub instance: Option<String>,
    pub reg_id: Option<u32>,
    pub call_id: String,
    pub cseq: u32,
    pub expires_at_unix: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub user_agent: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StoreOp {
    SaveBinding(StoredBinding),
    DeleteBinding {
        extension: String,
        key: String,
    },
    /// A finished call for the history.
    Call(Box<super::cdr::CallRecord>),
}
