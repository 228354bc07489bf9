//! The extensions Parley serves, as the protocol core sees them: loaded
//! from the store and replaced whole when an admin changes anything.

use std::collections::HashMap;
use std::sync::Arc;

use super::policy::EncryptionPolicy;
use crate::sip::digest::Algorithm;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub number: String,
    pub name: Option<String>,
    /// The realm the HA1 values were computed for.
    pub realm: String,
    pub ha1_md5: String,
    pub ha1_sha256: String,
    pub encryption: EncryptionPolicy,
}

impl Extension {
    pub fn ha1(&self, algorithm: Algorithm) -> &str {
        match algorithm {
            Algorithm::Md5 => &self.ha1_md5,
            Algorithm::Sha256 => &self.ha1_sha256,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Directory {
    by_number: HashMap<String, Arc<Extension>>,
}

impl Directory {
    pub fn new(extensions: impl IntoIterator<Item = Extension>) -> Directory {
        Directory {
            by_number: extensions
                .into_iter()
                .map(|e| (e.number.clone(), Arc::new(e)))
                .collect(),
        }
    }

    pub fn get(&self, number: &str) -> Option<&Arc<Extension>> {
        self.by_number.get(number)
    }

    pub fn len(&self) -> usize {
        self.by_number.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_number.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Extension>> {
        self.by_number.values()
    }
}

/// Longest extension number.
pub const MAX_NUMBER_CHARS: usize = 32;

/// Extension numbers are 1-32 letters, digits, `.`, `_` or `-`: safe in a
/// SIP URI user part without escaping, and easy to dial.
pub fn validate_number(number: &str) -> Result<(), String> {
    let ok = !number.is_empty()
        && number.len() <= MAX_NUMBER_CHARS
        && number
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid extension number {number:?}: use 1 to {MAX_NUMBER_CHARS} letters, digits, '.', '_' or '-'"
        ))
    }
}
