//! The SDES `a=crypto` attribute (RFC 4568 §9.1) for the SRTP suites.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::srtp::{KEY_MATERIAL_LEN, MasterKey, Suite};

/// Key parameters on one line (`inline:...;inline:...`).
pub const MAX_KEY_PARAMS: usize = 8;
/// Session parameters on one line.
pub const MAX_SESSION_PARAMS: usize = 8;
/// The shortest key lifetime accepted, in packets: 2^24 is 93 hours of
/// 20 ms audio.
pub const MIN_KEY_LIFETIME: u64 = 1 << 24;
/// The largest tag RFC 4568 allows (nine digits).
const MAX_TAG: u32 = 999_999_999;

/// Why an `a=crypto` value could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("crypto tag is not 1 to 9 digits")]
    BadTag,
    #[error("crypto line has no suite")]
    MissingSuite,
    #[error("crypto line has no key parameters")]
    MissingKey,
    #[error("key method is not inline:")]
    BadKeyMethod,
    #[error("inline key is not base64 of a 16-byte key and 14-byte salt")]
    BadKey,
    #[error("malformed key lifetime")]
    BadLifetime,
    #[error("malformed MKI")]
    BadMki,
    #[error("too many key or session parameters")]
    TooManyParams,
}

/// Why a well-formed `a=crypto` line is not one Parley can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("unsupported suite {0}")]
    Suite(String),
    #[error("several master keys on one line")]
    SeveralKeys,
    #[error("MKI is not supported")]
    Mki,
    #[error("key lifetime shorter than a call may last")]
    ShortLifetime,
    #[error("unsupported session parameter {0}")]
    SessionParam(String),
}

/// The key lifetime, in packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// `2^n`.
    PowerOfTwo(u8),
    Packets(u64),
}

impl Lifetime {
    pub fn packets(self) -> u64 {
        match self {
            Lifetime::PowerOfTwo(n) => 1u64.checked_shl(u32::from(n)).unwrap_or(u64::MAX),
            Lifetime::Packets(n) => n,
        }
    }
}

/// A master key identifier: its value and its length in bytes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mki {
    pub value: u64,
    pub length: u8,
}

/// One `inline:` key parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyParam {
    pub key: MasterKey,
    pub lifetime: Option<Lifetime>,
    pub mki: Option<Mki>,
}

/// A parsed `a=crypto` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptoAttribute {
    pub tag: u32,
    /// The suite, when it is one Parley implements.
    pub suite: Option<Suite>,
    /// The suite as written.
    pub suite_name: String,
    /// Key parameters; read only for suites Parley implements, whose key
    /// format it knows.
    pub keys: Vec<KeyParam>,
    pub session_params: Vec<String>,
}

impl CryptoAttribute {
    /// The value Parley writes when it offers or answers `key`: no
    /// lifetime, no MKI, no session parameters.
    pub fn format(tag: u32, suite: Suite, key: &MasterKey) -> String {
        format!(
            "{tag} {} inline:{}",
            suite.name(),
            STANDARD.encode(key.as_bytes())
        )
    }

    pub fn parse(value: &str) -> Result<Self, CryptoError> {
        let mut parts = value.split_ascii_whitespace();
        let tag = parts.next().ok_or(CryptoError::BadTag)?;
        if tag.is_empty() || tag.len() > 9 || !tag.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CryptoError::BadTag);
        }
        let tag: u32 = tag.parse().map_err(|_| CryptoError::BadTag)?;
        if tag > MAX_TAG {
            return Err(CryptoError::BadTag);
        }
        let suite_name = parts.next().ok_or(CryptoError::MissingSuite)?;
        let key_params = parts.next().ok_or(CryptoError::MissingKey)?;
        let suite = Suite::from_name(suite_name);
        let mut keys = Vec::new();
        if suite.is_some() {
            for param in key_params.split(';') {
                if keys.len() >= MAX_KEY_PARAMS {
                    return Err(CryptoError::TooManyParams);
                }
                keys.push(parse_key_param(param)?);
            }
        }
        let mut session_params = Vec::new();
        for p in parts {
            if session_params.len() >= MAX_SESSION_PARAMS {
                return Err(CryptoError::TooManyParams);
            }
            session_params.push(p.to_string());
        }
        Ok(CryptoAttribute {
            tag,
            suite,
            suite_name: suite_name.to_string(),
            keys,
            session_params,
        })
    }

    /// The suite and key to use, or why this line cannot be used.
    pub fn usable(&self) -> Result<(Suite, &MasterKey), Unusable> {
        let suite = self
            .suite
            .ok_or_else(|| Unusable::Suite(self.suite_name.clone()))?;
        let [key] = &self.keys[..] else {
            return Err(Unusable::SeveralKeys);
        };
        if key.mki.is_some() {
            return Err(Unusable::Mki);
        }
        // Parley does not re-key during a call, so a key must last longer
        // than any call (RFC 4568 §6.1 forbids using it past its lifetime).
        if key.lifetime.is_some_and(|l| l.packets() < MIN_KEY_LIFETIME) {
            return Err(Unusable::ShortLifetime);
        }
        for p in &self.session_params {
            // A window size only tunes the receiver's replay window.
            // Anything else, a key derivation rate included, changes the
            // protocol (RFC 4568 §6.3).
            let harmless = p.starts_with("WSH=");
            if !harmless {
                return Err(Unusable::SessionParam(p.clone()));
            }
        }
        Ok((suite, &key.key))
    }
}

fn parse_key_param(param: &str) -> Result<KeyParam, CryptoError> {
    let info = param
        .strip_prefix("inline:")
        .ok_or(CryptoError::BadKeyMethod)?;
    let mut fields = info.split('|');
    let encoded = fields.next().unwrap_or("");
    let mut decoded = [0u8; KEY_MATERIAL_LEN + 3];
    let n = STANDARD
        .decode_slice(encoded, &mut decoded)
        .map_err(|_| CryptoError::BadKey)?;
    if n != KEY_MATERIAL_LEN {
        return Err(CryptoError::BadKey);
    }
    let mut material = [0u8; KEY_MATERIAL_LEN];
    material.copy_from_slice(&decoded[..KEY_MATERIAL_LEN]);
    decoded.fill(0);
    let key = MasterKey::from_bytes(material);
    let mut lifetime = None;
    let mut mki = None;
    for field in fields {
        // The MKI is the field with a colon; it comes after the lifetime.
        if let Some((value, length)) = field.split_once(':') {
            if mki.is_some() {
                return Err(CryptoError::BadMki);
            }
            let value = value.parse::<u64>().map_err(|_| CryptoError::BadMki)?;
            let length = length.parse::<u8>().map_err(|_| CryptoError::BadMki)?;
            if !(1..=128).contains(&length) {
                return Err(CryptoError::BadMki);
            }
            mki = Some(Mki { value, length });
        } else {
            if lifetime.is_some() || mki.is_some() {
                return Err(CryptoError::BadLifetime);
            }
            lifetime = Some(parse_lifetime(field)?);
        }
    }
    Ok(KeyParam { key, lifetime, mki })
}

fn parse_lifetime(field: &str) -> Result<Lifetime, CryptoError> {
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(exp) = field.strip_prefix("2^") {
        if !digits(exp) {
            return Err(CryptoError::BadLifetime);
        }
        let exp = exp.parse::<u8>().map_err(|_| CryptoError::BadLifetime)?;
        return Ok(Lifetime::PowerOfTwo(exp));
    }
    if !digits(field) {
        return Err(CryptoError::BadLifetime);
    }
    field
        .parse::<u64>()
        .map(Lifetime::Packets)
        .map_err(|_| CryptoError::BadLifetime)
}
