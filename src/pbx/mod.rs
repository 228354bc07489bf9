//! The phone system's logic, sans-IO: who may register, where extensions
//! are, and (next) how calls are put through. It sits on the transaction
//! layer of `sip` and returns what to send, what to store and what happened.

pub mod anchor;
pub mod auth;
pub mod cdr;
pub mod core;
pub mod directory;
pub mod events;
pub mod lockout;
pub mod policy;
pub mod registrar;
