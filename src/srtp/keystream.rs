//! AES in counter mode as SRTP uses it (RFC 3711 §4.1.1).

use aes::Aes128Enc;
use aes::cipher::{BlockCipherEncrypt, KeyInit};

/// Counter blocks encrypted per call into the block cipher: enough that a
/// media packet (up to 1,500 bytes, 94 blocks) takes one or two calls. Each
/// call has a fixed cost (the AVX-512 backend of `aes` lays out its round
/// keys again every time), which with 8 blocks per call, two calls for a
/// G.711 packet, was about 12 % of a protect+unprotect pair
/// (`cargo bench --bench srtp`).
const PARALLEL_BLOCKS: usize = 64;

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
