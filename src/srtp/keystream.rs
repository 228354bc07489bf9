//! AES in counter mode as SRTP uses it (RFC 3711 §4.1.1).

use aes::Aes128Enc;
use aes::cipher::{BlockCipherEncrypt, KeyInit};

/// Counter blocks encrypted per call into the block cipher, so the AES-NI
/// pipeline stays full (a 20 ms G.711 payload is 10 blocks).
const PARALLEL_BLOCKS: usize = 8;

/// An expanded AES-128 key producing SRTP keystream.
#[derive(Clone)]
pub(crate) struct AesCm {
    cipher: Aes128Enc,
}

impl AesCm {
    pub(crate) fn new(key: &[u8; 16]) -> Self {
        AesCm {
            cipher: Aes128Enc::new(&(*key).into()),
        }
    }

    /// XORs into `data` the keystream whose first counter block is `iv`.
    /// The counter is the low 16 bits of the block; callers pass an `iv`
    /// whose low 16 bits are zero and data under 2^16 blocks.
    pub(crate) fn apply(&self, iv: u128, data: &mut [u8]) {
        let mut blocks = [aes::Block::default(); PARALLEL_BLOCKS];
        let mut counter = iv;
        for chunk in data.chunks_mut(16 * PARALLEL_BLOCKS) {
            let n = chunk.len().div_ceil(16);
            for block in &mut blocks[..n] {
                *block = counter.to_be_bytes().into();
                counter = counter.wrapping_add(1);
            }
            self.cipher.encrypt_blocks(&mut blocks[..n]);
            for (bytes, key) in chunk.chunks_mut(16).zip(&blocks) {
                for (b, k) in bytes.iter_mut().zip(key.iter()) {
                    *b ^= k;
                }
            }
        }
    }
}
