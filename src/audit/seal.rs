//! Sealing of sensitive audit details: AES-256-GCM under a data key that
//! only the HSM can unwrap.
//!
//! A draft's `sensitive` map and `source` (client address) become one
//! JSON object, encrypted with a random 96-bit nonce and the additional
//! data `keyward-audit-sealed-v1|<data key id>` into
//! `v1.<data key id>.<base64url(nonce ‖ ciphertext ‖ tag)>`, stored in
//! the event's `sealed` field. The chain hash covers that string as
//! stored, so verification never needs the plaintext; only
//! [`super::service::AuditService::reveal`] opens it, for auditors.
//!
//! Data keys are 32 random bytes, RSA-OAEP encrypted to the public half of
//! the HSM `audit-encryption` key and stored (`audit_data_keys`); the
//! daemon makes one per start and asks the HSM to decrypt older ones when
//! an auditor reads events they sealed.

use base64::Engine;
use ring::aead;
use ring::rand::SecureRandom;
use std::collections::HashMap;
use std::sync::RwLock;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::AuditDraft;

/// Prefix of every sealed value this version writes.
pub const SEALED_V1: &str = "v1";

/// Length of a data key (AES-256).
pub const DATA_KEY_LEN: usize = 32;

const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the system random generator failed")]
    Random,
    #[error("the sealed value is not `v1.<data key id>.<base64url>`: {0}")]
    Malformed(&'static str),
    #[error("data key {0} is not known (not in the store, or not unwrapped)")]
    UnknownDataKey(Uuid),
    #[error(
        "the sealed details do not decrypt under data key {0}: altered ciphertext or a different key"
    )]
    Decrypt(Uuid),
    #[error("the sealed details decrypt but are not a details object: {0}")]
    Plaintext(String),
    #[error("a data key must be {DATA_KEY_LEN} bytes, this one has {0}")]
    DataKeyLength(usize),
}

impl SealError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Random => "random_failed",
            Self::Malformed(_) => "audit_sealed_malformed",
            Self::UnknownDataKey(_) => "audit_data_key_unknown",
            Self::Decrypt(_) => "audit_sealed_invalid",
            Self::Plaintext(_) => "audit_sealed_invalid",
            Self::DataKeyLength(_) => "audit_data_key_invalid",
        }
    }
}

/// What a sealed value holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Opened {
    /// The draft's sensitive details.
    #[serde(default)]
    pub details: serde_json::Map<String, serde_json::Value>,
    /// The client address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

fn aad(id: Uuid) -> String {
    format!("keyward-audit-sealed-v1|{id}")
}

fn less_safe_key(key: &[u8]) -> Result<aead::LessSafeKey, SealError> {
    aead::UnboundKey::new(&aead::AES_256_GCM, key)
        .map(aead::LessSafeKey::new)
        .map_err(|_| SealError::DataKeyLength(key.len()))
}

/// Encrypts `opened` under data key `id`.
pub fn seal(id: Uuid, key: &[u8], opened: &Opened) -> Result<String, SealError> {
    let k = less_safe_key(key)?;
    let mut nonce = [0u8; NONCE_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| SealError::Random)?;
    // Serialising a map of JSON values and a string cannot fail.
    let mut buf = Zeroizing::new(serde_json::to_vec(opened).unwrap_or_default());
    k.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::from(aad(id).as_bytes()),
        &mut *buf,
    )
    .map_err(|_| SealError::Random)?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    Ok(format!(
        "{SEALED_V1}.{id}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
    ))
}

/// The data key a sealed value names.
pub fn data_key_id(sealed: &str) -> Result<Uuid, SealError> {
    let mut parts = sealed.splitn(3, '.');
    if parts.next() != Some(SEALED_V1) {
        return Err(SealError::Malformed("unknown version"));
    }
    parts
        .next()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or(SealError::Malformed("no data key id"))
}

/// Decrypts a sealed value with `key` (the data key it names).
pub fn open(sealed: &str, key: &[u8]) -> Result<Opened, SealError> {
    let id = data_key_id(sealed)?;
    let body = sealed
        .splitn(3, '.')
        .nth(2)
        .ok_or(SealError::Malformed("no ciphertext"))?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| SealError::Malformed("ciphertext is not base64url"))?;
    if raw.len() < NONCE_LEN + aead::AES_256_GCM.tag_len() {
        return Err(SealError::Malformed("ciphertext too short"));
    }
    let (nonce, ct) = raw.split_at(NONCE_LEN);
    let nonce = aead::Nonce::try_assume_unique_for_key(nonce)
        .map_err(|_| SealError::Malformed("bad nonce"))?;
    let k = less_safe_key(key)?;
    let mut buf = Zeroizing::new(ct.to_vec());
    let plain = k
        .open_in_place(nonce, aead::Aad::from(aad(id).as_bytes()), &mut buf)
        .map_err(|_| SealError::Decrypt(id))?;
    serde_json::from_slice(plain).map_err(|e| SealError::Plaintext(e.to_string()))
}

/// Moves a draft's sensitive details and source into `sealed`, in place.
/// A draft with neither is left as it is (nothing to hide).
pub fn seal_draft(id: Uuid, key: &[u8], draft: &mut AuditDraft) -> Result<(), SealError> {
    if draft.sealed.is_some() || (draft.sensitive.is_empty() && draft.source.is_none()) {
        return Ok(());
    }
    let opened = Opened {
        details: std::mem::take(&mut draft.sensitive),
        source: draft.source.take(),
    };
    match seal(id, key, &opened) {
        Ok(s) => {
            draft.sealed = Some(s);
            Ok(())
        }
        Err(e) => {
            // Nothing lost on failure: the commit is refused with the draft intact.
            draft.sensitive = opened.details;
            draft.source = opened.source;
            Err(e)
        }
    }
}

/// What the store calls on every draft before it chains it.
pub trait DraftSealer: Send + Sync {
    fn seal(&self, draft: &mut AuditDraft) -> Result<(), SealError>;
}

/// Unwrapped data keys by id, and the one new events are sealed with.
#[derive(Default)]
pub struct DataKeys {
    keys: RwLock<HashMap<Uuid, Zeroizing<Vec<u8>>>>,
    current: RwLock<Option<Uuid>>,
}

impl DataKeys {
    /// Adds an unwrapped data key.
    pub fn insert(&self, id: Uuid, key: Zeroizing<Vec<u8>>) -> Result<(), SealError> {
        if key.len() != DATA_KEY_LEN {
            return Err(SealError::DataKeyLength(key.len()));
        }
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, key);
        Ok(())
    }

    /// Makes `id` (already inserted) the key new events are sealed with.
    pub fn set_current(&self, id: Uuid) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(id);
    }

    pub fn current(&self) -> Option<Uuid> {
        *self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn contains(&self, id: Uuid) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
    }

    /// Opens a sealed value with the key it names, if that key is here.
    pub fn open(&self, sealed: &str) -> Result<Opened, SealError> {
        let id = data_key_id(sealed)?;
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = keys.get(&id).ok_or(SealError::UnknownDataKey(id))?;
        open(sealed, key)
    }
}

impl DraftSealer for DataKeys {
    fn seal(&self, draft: &mut AuditDraft) -> Result<(), SealError> {
        let id = self
            .current()
            .ok_or(SealError::UnknownDataKey(Uuid::nil()))?;
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = keys.get(&id).ok_or(SealError::UnknownDataKey(id))?;
        seal_draft(id, key, draft)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> Zeroizing<Vec<u8>> {
        Zeroizing::new((0..32u8).collect())
    }

    fn draft() -> AuditDraft {
        AuditDraft::new("device:1", "registration.submit", "registration:1")
            .details(json!({"group": "default"}))
            .sensitive("comment", "the secret comment")
            .source(Some("192.0.2.55"))
    }

    #[test]
    fn seal_then_open_round_trips_and_hides_the_plaintext() {
        let id = Uuid::now_v7();
        let mut d = draft();
        seal_draft(id, &key(), &mut d).unwrap();
        let sealed = d.sealed.clone().unwrap();
        assert!(d.sensitive.is_empty() && d.source.is_none());
        assert!(sealed.starts_with(&format!("v1.{id}.")));
        assert!(!sealed.contains("secret") && !sealed.contains("192.0.2.55"));
        assert_eq!(d.details, json!({"group": "default"}));
        let opened = open(&sealed, &key()).unwrap();
        assert_eq!(opened.details["comment"], "the secret comment");
        assert_eq!(opened.source.as_deref(), Some("192.0.2.55"));
    }

    #[test]
    fn nonces_differ_between_seals() {
        let id = Uuid::now_v7();
        let o = Opened {
            details: Default::default(),
            source: Some("x".into()),
        };
        assert_ne!(seal(id, &key(), &o).unwrap(), seal(id, &key(), &o).unwrap());
    }

    #[test]
    fn nothing_sensitive_means_nothing_sealed() {
        let mut d = AuditDraft::new("system", "x.y", "t");
        seal_draft(Uuid::now_v7(), &key(), &mut d).unwrap();
        assert!(d.sealed.is_none());
    }

    #[test]
    fn a_flipped_bit_a_wrong_key_or_another_key_id_fail_clearly() {
        let id = Uuid::now_v7();
        let mut d = draft();
        seal_draft(id, &key(), &mut d).unwrap();
        let sealed = d.sealed.unwrap();
        // Flip one ciphertext character.
        let mut bytes = sealed.clone().into_bytes();
        let last = bytes.len() - 3;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert!(matches!(
            open(&tampered, &key()),
            Err(SealError::Decrypt(_))
        ));
        // Another key.
        let other = Zeroizing::new(vec![7u8; 32]);
        assert!(matches!(open(&sealed, &other), Err(SealError::Decrypt(_))));
        // The same ciphertext relabelled to another data key id: the AAD binds it.
        let other_id = Uuid::now_v7();
        let relabelled = sealed.replace(&id.to_string(), &other_id.to_string());
        assert!(matches!(
            open(&relabelled, &key()),
            Err(SealError::Decrypt(_))
        ));
    }

    #[test]
    fn malformed_values_and_unknown_keys_are_named() {
        assert!(matches!(
            open("v2.x.y", &key()),
            Err(SealError::Malformed(_))
        ));
        assert!(matches!(
            open("v1.nope.y", &key()),
            Err(SealError::Malformed(_))
        ));
        let id = Uuid::now_v7();
        assert!(matches!(
            open(&format!("v1.{id}.!!!"), &key()),
            Err(SealError::Malformed(_))
        ));
        assert!(matches!(
            open(&format!("v1.{id}.AAAA"), &key()),
            Err(SealError::Malformed(_))
        ));
        let keys = DataKeys::default();
        let mut d = draft();
        assert!(matches!(
            keys.seal(&mut d),
            Err(SealError::UnknownDataKey(_))
        ));
        assert!(
            d.sealed.is_none() && d.source.is_some(),
            "draft kept as it was"
        );
        assert!(matches!(
            keys.insert(id, Zeroizing::new(vec![1; 16])),
            Err(SealError::DataKeyLength(16))
        ));
        keys.insert(id, key()).unwrap();
        keys.set_current(id);
        keys.seal(&mut d).unwrap();
        let sealed = d.sealed.unwrap();
        assert_eq!(
            keys.open(&sealed).unwrap().source.as_deref(),
            Some("192.0.2.55")
        );
        let unknown = DataKeys::default();
        assert!(matches!(
            unknown.open(&sealed),
            Err(SealError::UnknownDataKey(x)) if x == id
        ));
    }

    #[test]
    fn sealed_events_chain_and_verify_without_the_key() {
        let id = Uuid::now_v7();
        let mut d = draft();
        seal_draft(id, &key(), &mut d).unwrap();
        let e = super::super::AuditEvent::chain(d, 1, 1, super::super::GENESIS_HASH.to_vec());
        assert!(e.source.is_none());
        assert!(!e.details.to_string().contains("secret"));
        super::super::ChainVerifier::default().push(&e).unwrap();
        let mut altered = e.clone();
        altered.sealed = Some(
            seal(
                id,
                &key(),
                &open(e.sealed.as_ref().unwrap(), &key()).unwrap(),
            )
            .unwrap(),
        );
        assert!(
            super::super::ChainVerifier::default()
                .push(&altered)
                .is_err()
        );
    }
}
