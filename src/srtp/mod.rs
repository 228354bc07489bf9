//! SRTP and SRTCP (RFC 3711) for the two suites SDES (RFC 4568) offers on
//! SIP phones: `AES_CM_128_HMAC_SHA1_80` and `AES_CM_128_HMAC_SHA1_32`.
//!
//! Sans-IO and allocation-free: a [`SrtpContext`] protects or unprotects a
//! packet in the caller's buffer. One context holds the keys of one sender,
//! so a media leg has two: the phone's key (to unprotect what it sends) and
//! the key Parley gave that phone (to protect what Parley sends it).
//!
//! Session keys are derived once, at construction, with a key derivation
//! rate of zero (the only rate SDES phones use); the HMAC inner and outer
//! states are precomputed, so a packet costs one AES-CM pass and one
//! HMAC-SHA1 over its bytes.

mod auth;
mod context;
mod kdf;
mod keystream;
mod replay;
#[cfg(test)]
pub(crate) mod tests;

pub use context::{SrtpContext, Unprotected, rtp_header_len};
pub use replay::REPLAY_WINDOW;

/// Length of an AES-128 master key.
pub const MASTER_KEY_LEN: usize = 16;
/// Length of the master salt of the AES-CM suites.
pub const MASTER_SALT_LEN: usize = 14;
/// Length of the SDES `inline:` key material: key then salt.
pub const KEY_MATERIAL_LEN: usize = MASTER_KEY_LEN + MASTER_SALT_LEN;
/// SRTCP authentication tag length; 80 bits for both suites (RFC 4568
/// §6.2.2: the `_32` suite shortens only the SRTP tag).
pub const SRTCP_TAG_LEN: usize = 10;
/// The `E` flag and 31-bit index that SRTCP appends.
pub const SRTCP_INDEX_LEN: usize = 4;
/// The most bytes protecting an RTP packet adds.
pub const MAX_SRTP_OVERHEAD: usize = 10;
/// The bytes protecting an RTCP packet adds.
pub const SRTCP_OVERHEAD: usize = SRTCP_INDEX_LEN + SRTCP_TAG_LEN;

/// An SRTP crypto suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suite {
    /// AES-CM-128 encryption with an 80-bit HMAC-SHA1 tag.
    AesCm128HmacSha1_80,
    /// AES-CM-128 encryption with a 32-bit HMAC-SHA1 tag on SRTP (80 bits
    /// on SRTCP).
    AesCm128HmacSha1_32,
}

impl Suite {
    /// Every suite, most preferred first.
    pub const ALL: [Suite; 2] = [Suite::AesCm128HmacSha1_80, Suite::AesCm128HmacSha1_32];

    /// The name SDES uses in `a=crypto`.
    pub const fn name(self) -> &'static str {
        match self {
            Suite::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
            Suite::AesCm128HmacSha1_32 => "AES_CM_128_HMAC_SHA1_32",
        }
    }

    /// The suite an SDES name stands for (names are case-sensitive, RFC 4568
    /// §9.2).
    pub fn from_name(name: &str) -> Option<Suite> {
        Suite::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The SRTP authentication tag length in bytes.
    pub const fn rtp_tag_len(self) -> usize {
        match self {
            Suite::AesCm128HmacSha1_80 => 10,
            Suite::AesCm128HmacSha1_32 => 4,
        }
    }
}

impl std::fmt::Display for Suite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A master key and salt, as carried by one SDES `inline:` parameter.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterKey {
    material: [u8; KEY_MATERIAL_LEN],
}

impl MasterKey {
    /// Key material as SDES carries it: the key followed by the salt.
    pub fn from_bytes(material: [u8; KEY_MATERIAL_LEN]) -> Self {
        MasterKey { material }
    }

    /// Fresh key material from the operating system's CSPRNG (through the
    /// thread-local generator it seeds).
    pub fn generate() -> Self {
        MasterKey {
            material: rand::random(),
        }
    }

    /// The key followed by the salt.
    pub fn as_bytes(&self) -> &[u8; KEY_MATERIAL_LEN] {
        &self.material
    }

    pub(crate) fn key(&self) -> &[u8; MASTER_KEY_LEN] {
        self.material[..MASTER_KEY_LEN]
            .try_into()
            .expect("fixed split")
    }

    pub(crate) fn salt(&self) -> &[u8; MASTER_SALT_LEN] {
        self.material[MASTER_KEY_LEN..]
            .try_into()
            .expect("fixed split")
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key material never reaches a log.
        f.write_str("MasterKey(..)")
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        wipe(&mut self.material);
    }
}

/// Zeroes key material in a way the compiler may not drop as a dead store.
pub(crate) fn wipe(bytes: &mut [u8]) {
    for b in bytes.iter_mut() {
        // SAFETY: `b` is a valid, aligned reference to a byte.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
}

/// Why a packet could not be protected or unprotected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SrtpError {
    #[error("packet shorter than its header and authentication tag")]
    TooShort,
    #[error("not an RTP/RTCP version 2 packet")]
    BadVersion,
    #[error("authentication tag does not match")]
    AuthFailed,
    #[error("packet already received")]
    Replayed,
    #[error("packet older than the replay window")]
    TooOld,
    #[error("buffer has no room for the SRTP trailer")]
    NoRoom,
    #[error("SRTCP index exhausted: the session needs new keys")]
    IndexExhausted,
    #[error("too many SSRCs under one key: a new one would reuse keystream")]
    TooManyStreams,
}
