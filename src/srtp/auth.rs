//! HMAC-SHA1 (RFC 2104) as SRTP authenticates packets (RFC 3711 §4.2.1),
//! keyed once per session key: the SHA-1 states after the key's inner and
//! outer pad blocks are kept, so a tag costs the packet's blocks and one
//! outer block, with nothing copied but a partial block. Cloning a keyed
//! `hmac::Hmac` per packet, as before, was about a tenth of a
//! protect+unprotect pair (`cargo bench --bench srtp`).

use sha1::Digest;
use sha1::block_api::compress;

use super::wipe;

const BLOCK: usize = 64;
/// The SHA-1 initial state (FIPS 180-4 §5.3.1).
const SHA1_INIT: [u32; 5] = [
    0x6745_2301,
    0xEFCD_AB89,
    0x98BA_DCFE,
    0x1032_5476,
    0xC3D2_E1F0,
];

/// An HMAC-SHA1 key, ready to tag.
#[derive(Clone)]
pub(crate) struct HmacSha1 {
    inner: [u32; 5],
    outer: [u32; 5],
}

impl HmacSha1 {
    pub(crate) fn new(key: &[u8]) -> Self {
        // A key longer than a block is hashed first (RFC 2104 §2); SRTP's
        // are 20 bytes.
        let mut padded = [0u8; BLOCK];
        if key.len() > BLOCK {
            padded[..20].copy_from_slice(&sha1::Sha1::digest(key));
        } else {
            padded[..key.len()].copy_from_slice(key);
        }
        let pad = |byte: u8| {
            let mut block = padded;
            for b in &mut block {
                *b ^= byte;
            }
            let mut state = SHA1_INIT;
            compress(&mut state, &[block]);
            wipe(&mut block);
            state
        };
        let keyed = HmacSha1 {
            inner: pad(0x36),
            outer: pad(0x5C),
        };
        wipe(&mut padded);
        keyed
    }

    /// The full 20-byte tag of the concatenation of `parts`.
    pub(crate) fn tag(&self, parts: &[&[u8]]) -> [u8; 20] {
        let mut state = self.inner;
        let mut block = [0u8; BLOCK];
        let mut filled = 0;
        // The key's pad block is already in the state.
        let mut total = BLOCK as u64;
        for part in parts {
            let mut rest = *part;
            total += rest.len() as u64;
            if filled > 0 {
                let take = (BLOCK - filled).min(rest.len());
                block[filled..filled + take].copy_from_slice(&rest[..take]);
                filled += take;
                rest = &rest[take..];
                if filled < BLOCK {
                    continue;
                }
                compress(&mut state, &[block]);
            }
            // The partial block is empty here: the whole blocks go straight
            // from the part, its tail starts the next block.
            let (blocks, tail) = rest.as_chunks::<BLOCK>();
            compress(&mut state, blocks);
            block[..tail.len()].copy_from_slice(tail);
            filled = tail.len();
        }
        let inner = finish(state, &mut block, filled, total);
        let mut block = [0u8; BLOCK];
        block[..20].copy_from_slice(&inner);
        finish(self.outer, &mut block, 20, BLOCK as u64 + 20)
    }
}

/// Pads the last `filled` bytes of `block` (RFC 3174 §4) for a message of
/// `total` bytes and returns the digest.
fn finish(mut state: [u32; 5], block: &mut [u8; BLOCK], filled: usize, total: u64) -> [u8; 20] {
    block[filled] = 0x80;
    block[filled + 1..].fill(0);
    if filled + 1 > BLOCK - 8 {
        compress(&mut state, &[*block]);
        block.fill(0);
    }
    block[BLOCK - 8..].copy_from_slice(&(total * 8).to_be_bytes());
    compress(&mut state, &[*block]);
    let mut digest = [0u8; 20];
    for (bytes, word) in digest.chunks_exact_mut(4).zip(state) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
    digest
}

#[cfg(test)]
mod tests {
    use super::HmacSha1;
    use hmac::{Hmac, KeyInit, Mac};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// RFC 2202 §3: test cases 1, 2, 6 and 7 (short, text, and longer than
    /// a block keys; messages under and over a block).
    #[test]
    fn rfc2202_vectors() {
        let cases: [(&[u8], &[u8], &str); 4] = [
            (
                &[0x0b; 20],
                b"Hi There",
                "b617318655057264e28bc0b6fb378c8ef146be00",
            ),
            (
                b"Jefe",
                b"what do ya want for nothing?",
                "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79",
            ),
            (
                &[0xaa; 80],
                b"Test Using Larger Than Block-Size Key - Hash Key First",
                "aa4ae5e15272d00e95705637ce8a3b55ed402112",
            ),
            (
                &[0xaa; 80],
                b"Test Using Larger Than Block-Size Key and Larger Than One Block-Size Data",
                "e8e99d0f45237d786d6bbaa7965c7808bbff1a91",
            ),
        ];
        for (key, data, tag) in cases {
            assert_eq!(hex(&HmacSha1::new(key).tag(&[data])), tag);
        }
    }

    proptest::proptest! {
        /// Any key, message and split into parts gives the `hmac` crate's tag.
        #[test]
        fn matches_the_hmac_crate(
            key in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            cuts in proptest::collection::vec(0usize..300, 0..4),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort_unstable();
            let mut parts = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([data.len()]) {
                parts.push(&data[at..c]);
                at = c;
            }
            let mut reference = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(&key).unwrap();
            reference.update(&data);
            let expected: [u8; 20] = reference.finalize().into_bytes().into();
            proptest::prop_assert_eq!(HmacSha1::new(&key).tag(&parts), expected);
        }
    }
}
