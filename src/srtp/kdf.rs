//! Session key derivation (RFC 3711 §4.3) with a key derivation rate of 0.

use super::MasterKey;
use super::keystream::AesCm;

/// Key derivation labels (RFC 3711 §4.3.1 and §4.3.2).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Label {
    RtpEncryption = 0,
    RtpAuthentication = 1,
    RtpSalt = 2,
    RtcpEncryption = 3,
    RtcpAuthentication = 4,
    RtcpSalt = 5,
}

/// Fills `out` with the session key for `label`.
///
/// With the rate at zero the key id is just the label: `x = label XOR
/// salt` aligned on the salt's low 56 bits, and the key is the AES-CM
/// keystream of the master key from counter block `x · 2^16`.
pub(crate) fn derive(master: &MasterKey, label: Label, out: &mut [u8]) {
    let mut x = [0u8; 16];
    x[..14].copy_from_slice(master.salt());
    // The label is the top byte of the 56-bit key id, which lines up with
    // byte 7 of the 14-byte salt.
    x[7] ^= label as u8;
    out.fill(0);
    AesCm::new(master.key()).apply(u128::from_be_bytes(x), out);
}
