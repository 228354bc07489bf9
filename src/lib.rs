//! Parley: a secure office phone system (IP PBX) in one binary.
//!
//! See `ARCHITECTURE.md` at the repository root for the layers and the path
//! of a request through them.

pub mod config;
pub mod media;
pub mod pbx;
pub mod runtime;
pub mod sdp;
pub mod sip;
pub mod srtp;
pub mod store;
pub mod tls;
pub mod web;
