//! The SIP protocol core (RFC 3261 and friends), sans-IO: it parses and
//! writes messages, runs transactions and checks digest credentials, but
//! never touches a socket or a clock. Time comes in as an argument.

pub mod dialog;
pub mod digest;
pub mod message;
pub mod stream;
pub mod transaction;
pub mod transport;
pub mod ua;
