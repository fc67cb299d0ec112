//! Cluster private keys at rest: sealed with a key-encryption key (KEK)
//! that lives outside the data directory, so a copy of the Raft state alone
//! does not yield them.
//!
//! Format: `gh-sealed-v1:<nonce hex>:<AES-256-GCM ciphertext and tag, hex>`,
//! with the purpose (`what`) as associated data: a sealed CA key cannot be
//! passed off as another secret.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

const PREFIX: &str = "gh-sealed-v1:";

/// A 256-bit key-encryption key.
pub struct Kek(LessSafeKey);

/// Sealing or opening failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the key-encryption key must be 32 bytes, given as 64 hex digits")]
    BadKek,
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed value does not open with this key-encryption key (wrong key, or tampered)")]
    WrongKey,
}

// === impl Kek ===

impl Kek {
    /// From its text form: 64 hex digits (surrounding whitespace ignored).
    pub fn from_text(text: &str) -> Result<Self, SealError> {
        let raw = hex::decode(text.trim()).map_err(|_| SealError::BadKek)?;
        if raw.len() != 32 {
            return Err(SealError::BadKek);
        }
        let key = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| SealError::BadKek)?;
        Ok(Self(LessSafeKey::new(key)))
    }

    /// Seals `plain` for `what` under a nonce the caller never reuses with
    /// this key (random 96 bits).
    pub fn seal(&self, what: &str, nonce: [u8; 12], plain: &[u8]) -> String {
        let mut buf = plain.to_vec();
        // Sealing with a valid key and a 12-byte nonce cannot fail.
        let _ = self.0.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(what.as_bytes()),
            &mut buf,
        );
        format!("{PREFIX}{}:{}", hex::encode(nonce), hex::encode(buf))
    }

    /// Opens a value sealed for `what`.
    pub fn open(&self, what: &str, sealed: &str) -> Result<Vec<u8>, SealError> {
        let rest = sealed.strip_prefix(PREFIX).ok_or(SealError::Malformed)?;
        let (nonce, ct) = rest.split_once(':').ok_or(SealError::Malformed)?;
        let nonce: [u8; 12] = hex::decode(nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or(SealError::Malformed)?;
        let mut buf = hex::decode(ct).map_err(|_| SealError::Malformed)?;
        let plain = self
            .0
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(what.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SealError::WrongKey)?;
        Ok(plain.to_vec())
    }
}

/// True when `text` is a sealed value (not a key in clear).
pub fn is_sealed(text: &str) -> bool {
    text.starts_with(PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_refuse() {
        let k = Kek::from_text(&"11".repeat(32)).unwrap();
        let other = Kek::from_text(&"22".repeat(32)).unwrap();
        let s = k.seal("ca key", [7; 12], b"-----BEGIN PRIVATE KEY-----");
        assert!(is_sealed(&s));
        assert!(!s.contains("PRIVATE"));
        assert_eq!(
            k.open("ca key", &s).unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        assert!(matches!(other.open("ca key", &s), Err(SealError::WrongKey)));
        assert!(matches!(k.open("other", &s), Err(SealError::WrongKey)));
        assert!(matches!(
            k.open("ca key", "junk"),
            Err(SealError::Malformed)
        ));
        assert!(matches!(Kek::from_text("abcd"), Err(SealError::BadKek)));
    }
}
