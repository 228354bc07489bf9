//! Parley: a secure office phone system (IP PBX) in one binary.
//!
//! See `ARCHITECTURE.md` at the repository root for the layers and the path
//! of a request through them.

pub mod pbx;
pub mod sip;
