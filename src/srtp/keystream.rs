//! AES in counter mode as SRTP uses it (RFC 3711 §4.1.1).
//!
//! On x86-64 CPUs with AES-NI the keystream comes from a few lines of our
//! own: round keys expanded once per key, eight counter blocks in flight.
//! The `aes` crate does the same work, but its AVX-512 backend lays out its
//! round keys again on every call, which for a 10-block media packet cost
//! about as much as the encryption itself (`cargo bench --bench srtp`,
//! BENCHMARKS.md). Elsewhere, and as the reference in tests, the `aes`
//! crate.

use aes::Aes128Enc;
use aes::cipher::{BlockCipherEncrypt, KeyInit};

/// Counter blocks given to the `aes` crate per call: a media packet (up to
/// 1,500 bytes, 94 blocks) takes one or two calls, each with its fixed cost.
const PORTABLE_BLOCKS: usize = 64;

/// An expanded AES-128 key producing SRTP keystream.
#[derive(Clone)]
pub(crate) struct AesCm {
    cipher: Cipher,
}

#[derive(Clone)]
enum Cipher {
    #[cfg(target_arch = "x86_64")]
    Ni(ni::Aes128Ni),
    Portable(Aes128Enc),
}

impl AesCm {
    pub(crate) fn new(key: &[u8; 16]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(cipher) = ni::Aes128Ni::new(key) {
            return AesCm {
                cipher: Cipher::Ni(cipher),
            };
        }
        Self::portable(key)
    }

    /// The `aes` crate's implementation, whatever the CPU.
    pub(crate) fn portable(key: &[u8; 16]) -> Self {
        AesCm {
            cipher: Cipher::Portable(Aes128Enc::new(&(*key).into())),
        }
    }

    /// XORs into `data` the keystream whose first counter block is `iv`.
    /// The counter is the low 16 bits of the block; callers pass an `iv`
    /// whose low 16 bits are zero and data under 2^16 blocks.
    pub(crate) fn apply(&self, iv: u128, data: &mut [u8]) {
        match &self.cipher {
            #[cfg(target_arch = "x86_64")]
            Cipher::Ni(cipher) => cipher.apply(iv, data),
            Cipher::Portable(cipher) => apply_portable(cipher, iv, data),
        }
    }
}

fn apply_portable(cipher: &Aes128Enc, iv: u128, data: &mut [u8]) {
    let mut blocks = [aes::Block::default(); PORTABLE_BLOCKS];
    let mut counter = iv;
    for chunk in data.chunks_mut(16 * PORTABLE_BLOCKS) {
        let n = chunk.len().div_ceil(16);
        for block in &mut blocks[..n] {
            *block = counter.to_be_bytes().into();
            counter = counter.wrapping_add(1);
        }
        cipher.encrypt_blocks(&mut blocks[..n]);
        for (bytes, key) in chunk.chunks_mut(16).zip(&blocks) {
            for (b, k) in bytes.iter_mut().zip(key.iter()) {
                *b ^= k;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod ni {
    use std::arch::x86_64::{
        __m128i, _mm_aesenc_si128, _mm_aesenclast_si128, _mm_aeskeygenassist_si128,
        _mm_loadu_si128, _mm_shuffle_epi32, _mm_slli_si128, _mm_storeu_si128, _mm_xor_si128,
    };

    /// Blocks encrypted side by side: an AES round takes several cycles to
    /// finish, and the CPU can start one every cycle.
    const LANES: usize = 8;

    /// AES-128 round keys for AES-NI. Only made where the CPU has AES-NI.
    #[derive(Clone)]
    pub(super) struct Aes128Ni {
        round_keys: [__m128i; 11],
    }

    impl Aes128Ni {
        /// `None` when the CPU lacks AES-NI.
        pub(super) fn new(key: &[u8; 16]) -> Option<Self> {
            if !std::arch::is_x86_feature_detected!("aes") {
                return None;
            }
            // SAFETY: the CPU has AES-NI, checked just above.
            Some(unsafe { expand(key) })
        }

        pub(super) fn apply(&self, iv: u128, data: &mut [u8]) {
            // SAFETY: an `Aes128Ni` is only made where the CPU has AES-NI.
            unsafe { apply(&self.round_keys, iv, data) }
        }
    }

    /// The AES-128 key schedule (FIPS 197 §5.2), one AESKEYGENASSIST per
    /// round key.
    #[target_feature(enable = "aes")]
    fn expand(key: &[u8; 16]) -> Aes128Ni {
        // SAFETY: reads the 16 bytes of `key`.
        let mut k = unsafe { _mm_loadu_si128(key.as_ptr().cast()) };
        let mut round_keys = [k; 11];
        macro_rules! round {
            ($i:literal, $rcon:literal) => {
                k = next_round_key(k, _mm_aeskeygenassist_si128::<$rcon>(k));
                round_keys[$i] = k;
            };
        }
        round!(1, 0x01);
        round!(2, 0x02);
        round!(3, 0x04);
        round!(4, 0x08);
        round!(5, 0x10);
        round!(6, 0x20);
        round!(7, 0x40);
        round!(8, 0x80);
        round!(9, 0x1B);
        round!(10, 0x36);
        Aes128Ni { round_keys }
    }

    /// The next round key from the previous one and AESKEYGENASSIST's word.
    #[target_feature(enable = "aes")]
    fn next_round_key(key: __m128i, assist: __m128i) -> __m128i {
        let assist = _mm_shuffle_epi32::<0xFF>(assist);
        let key = _mm_xor_si128(key, _mm_slli_si128::<4>(key));
        let key = _mm_xor_si128(key, _mm_slli_si128::<4>(key));
        let key = _mm_xor_si128(key, _mm_slli_si128::<4>(key));
        _mm_xor_si128(key, assist)
    }

    /// Always [`LANES`] blocks at a time, the last group too: with a fixed
    /// count the compiler keeps the blocks in registers, and the spare
    /// blocks of a short group cost less than rounds waiting on each other.
    #[target_feature(enable = "aes")]
    fn apply(rk: &[__m128i; 11], iv: u128, data: &mut [u8]) {
        let mut counter = iv;
        for chunk in data.chunks_mut(16 * LANES) {
            let mut blocks = [rk[0]; LANES];
            for block in &mut blocks {
                let c = counter.to_be_bytes();
                // SAFETY: reads the 16 bytes of `c`.
                *block = _mm_xor_si128(unsafe { _mm_loadu_si128(c.as_ptr().cast()) }, rk[0]);
                counter = counter.wrapping_add(1);
            }
            for key in &rk[1..10] {
                for block in &mut blocks {
                    *block = _mm_aesenc_si128(*block, *key);
                }
            }
            for block in &mut blocks {
                *block = _mm_aesenclast_si128(*block, rk[10]);
            }
            for (bytes, block) in chunk.chunks_mut(16).zip(&blocks) {
                if bytes.len() == 16 {
                    // SAFETY: reads and writes the 16 bytes of `bytes`.
                    unsafe {
                        let d = _mm_loadu_si128(bytes.as_ptr().cast());
                        _mm_storeu_si128(bytes.as_mut_ptr().cast(), _mm_xor_si128(d, *block));
                    }
                } else {
                    let mut stream = [0u8; 16];
                    // SAFETY: writes the 16 bytes of `stream`.
                    unsafe { _mm_storeu_si128(stream.as_mut_ptr().cast(), *block) };
                    for (b, s) in bytes.iter_mut().zip(stream) {
                        *b ^= s;
                    }
                }
            }
        }
    }
}
