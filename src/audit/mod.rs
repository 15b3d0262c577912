//! The audit trail: append-only events, SHA-256 hash-chained.
//!
//! `hash = SHA-256(prev_hash ‖ canonical JSON of the event)`, where the
//! canonical JSON has a fixed field order and sorted detail keys. The store
//! computes hashes inside the transaction that makes the change, so an event
//! exists if and only if its change does.

use serde::{Deserialize, Serialize};

pub mod checkpoint;
pub mod seal;
pub mod service;
pub mod sink;
pub mod verify;

pub use checkpoint::Checkpoint;

/// Version of the canonical event encoding written now. Version 2 adds
/// `source` (the client address the request came from); version 3 adds
/// `sealed`, the ciphertext of the event's sensitive details (client
/// address, comments, device metadata), which the hash covers as it is:
/// verification never needs the plaintext. Older events hash exactly as
/// they always did.
pub const AUDIT_RECORD_VERSION: u32 = 3;

/// Oldest record version the verifier still accepts.
pub const AUDIT_RECORD_VERSION_MIN: u32 = 1;

/// The hash the first event chains to.
pub const GENESIS_HASH: [u8; 32] = [0u8; 32];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Success,
    Failure,
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Denied => "denied",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "success" => Some(Self::Success),
            "failure" => Some(Self::Failure),
            "denied" => Some(Self::Denied),
            _ => None,
        }
    }
}

/// An event as a service describes it, before the store numbers and chains it.
#[derive(Debug, Clone)]
pub struct AuditDraft {
    /// `admin:<id>`, `device:<id>`, `registration:<id>`, `system`, `cli`.
    pub actor: String,
    /// Dotted verb, e.g. `registration.approve`.
    pub action: String,
    pub target: String,
    pub outcome: Outcome,
    pub details: serde_json::Value,
    /// Client address of the request that caused the event (after trusted
    /// proxies); `None` for the scheduler and the local CLI. Sensitive: a
    /// sealer moves it into `sealed`.
    pub source: Option<String>,
    /// Details only auditors may read (comments, device metadata). A sealer
    /// encrypts them (with `source`) into `sealed` before the store chains
    /// the event; without one they are stored in `details` in the clear.
    pub sensitive: serde_json::Map<String, serde_json::Value>,
    /// Ciphertext of `sensitive` and `source`, set by the sealer.
    pub sealed: Option<String>,
}

impl AuditDraft {
    pub fn new(actor: impl Into<String>, action: &str, target: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            action: action.to_string(),
            target: target.into(),
            outcome: Outcome::Success,
            details: serde_json::Value::Object(serde_json::Map::new()),
            source: None,
            sensitive: serde_json::Map::new(),
            sealed: None,
        }
    }

    /// Adds a detail only auditors may read (see [`AuditDraft::sensitive`]).
    pub fn sensitive(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.sensitive.insert(key.to_string(), value.into());
        self
    }

    pub fn source(mut self, source: Option<&str>) -> Self {
        self.source = source.map(str::to_string);
        self
    }

    pub fn outcome(mut self, o: Outcome) -> Self {
        self.outcome = o;
        self
    }

    pub fn details(mut self, d: serde_json::Value) -> Self {
        self.details = d;
        self
    }
}

/// A chained event as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEvent {
    pub seq: i64,
    /// Unix time in milliseconds.
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: Outcome,
    pub details: serde_json::Value,
    /// Client address (record version 2 and later), when not sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Ciphertext of the sensitive details (record version 3 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
    #[serde(with = "hex_bytes")]
    pub prev_hash: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub hash: Vec<u8>,
    pub version: u32,
}

#[derive(Serialize)]
struct Canonical<'a> {
    v: u32,
    seq: i64,
    at_ms: i64,
    actor: &'a str,
    action: &'a str,
    target: &'a str,
    outcome: &'a str,
    details: &'a serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sealed: Option<&'a str>,
}

impl AuditEvent {
    /// The chain hash this event must carry: SHA-256 over the previous hash
    /// and the canonical encoding of every other field.
    pub fn expected_hash(&self) -> Vec<u8> {
        let canonical = Canonical {
            v: self.version,
            seq: self.seq,
            at_ms: self.at_ms,
            actor: &self.actor,
            action: &self.action,
            target: &self.target,
            outcome: self.outcome.as_str(),
            details: &self.details,
            source: self.source.as_deref(),
            sealed: self.sealed.as_deref(),
        };
        // Serialising strings, integers and a sorted map cannot fail.
        let body = serde_json::to_vec(&canonical).unwrap_or_default();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&self.prev_hash);
        ctx.update(&body);
        ctx.finish().as_ref().to_vec()
    }

    /// Numbers and chains a draft after `prev_hash`.
    /// Sensitive details a sealer did not encrypt are stored in `details`
    /// in the clear (detail encryption is off).
    pub fn chain(draft: AuditDraft, seq: i64, at_ms: i64, prev_hash: Vec<u8>) -> Self {
        let mut details = draft.details;
        if !draft.sensitive.is_empty() {
            match &mut details {
                serde_json::Value::Object(m) => m.extend(draft.sensitive),
                other => {
                    let mut m = draft.sensitive;
                    m.insert("value".into(), other.take());
                    details = serde_json::Value::Object(m);
                }
            }
        }
        let mut e = Self {
            seq,
            at_ms,
            actor: draft.actor,
            action: draft.action,
            target: draft.target,
            outcome: draft.outcome,
            details,
            source: draft.source,
            sealed: draft.sealed,
            prev_hash,
            hash: Vec::new(),
            version: AUDIT_RECORD_VERSION,
        };
        e.hash = e.expected_hash();
        e
    }
}

/// Where and why the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainBreak {
    pub seq: i64,
    pub reason: String,
}

/// Incremental verifier: feed events in sequence order.
#[derive(Debug)]
pub struct ChainVerifier {
    expected_seq: i64,
    prev_hash: Vec<u8>,
    pub verified: u64,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            expected_seq: 1,
            prev_hash: GENESIS_HASH.to_vec(),
            verified: 0,
        }
    }
}

impl ChainVerifier {
    pub fn push(&mut self, e: &AuditEvent) -> Result<(), ChainBreak> {
        let fail = |reason: &str| ChainBreak {
            seq: self.expected_seq,
            reason: reason.to_string(),
        };
        if e.seq != self.expected_seq {
            return Err(fail(&format!(
                "expected sequence {} but found {} (event missing or reordered)",
                self.expected_seq, e.seq
            )));
        }
        if !(AUDIT_RECORD_VERSION_MIN..=AUDIT_RECORD_VERSION).contains(&e.version) {
            return Err(fail(&format!("unknown record version {}", e.version)));
        }
        if e.version < 2 && e.source.is_some() {
            return Err(fail("a version 1 record cannot carry a source"));
        }
        if e.version < 3 && e.sealed.is_some() {
            return Err(fail(
                "a record before version 3 cannot carry sealed details",
            ));
        }
        if e.prev_hash != self.prev_hash {
            return Err(fail("prev_hash does not match the previous event's hash"));
        }
        if e.expected_hash() != e.hash {
            return Err(fail(
                "hash does not match the event's contents (event altered)",
            ));
        }
        self.prev_hash = e.hash.clone();
        self.expected_seq += 1;
        self.verified += 1;
        Ok(())
    }

    /// Hash of the last verified event (the chain head).
    pub fn head(&self) -> &[u8] {
        &self.prev_hash
    }
}

pub(crate) mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditEvent> {
        let mut prev = GENESIS_HASH.to_vec();
        (1..=n)
            .map(|seq| {
                let draft = AuditDraft::new("admin:1", "test.act", "t")
                    .details(serde_json::json!({"b": 1, "a": "x"}));
                let e = AuditEvent::chain(draft, seq, 1000 + seq, prev.clone());
                prev = e.hash.clone();
                e
            })
            .collect()
    }

    #[test]
    fn intact_chain_verifies() {
        let mut v = ChainVerifier::default();
        for e in chain(5) {
            v.push(&e).unwrap();
        }
        assert_eq!(v.verified, 5);
    }

    #[test]
    fn altered_event_is_named() {
        let mut events = chain(5);
        events[2].target = "other".into();
        let mut v = ChainVerifier::default();
        let err = events.iter().try_for_each(|e| v.push(e)).unwrap_err();
        assert_eq!(err.seq, 3);
    }

    #[test]
    fn missing_event_is_named() {
        let mut events = chain(5);
        events.remove(3);
        let mut v = ChainVerifier::default();
        let err = events.iter().try_for_each(|e| v.push(e)).unwrap_err();
        assert_eq!(err.seq, 4);
    }

    #[test]
    fn source_is_covered_by_the_hash() {
        let draft =
            AuditDraft::new("device:1", "registration.submit", "r").source(Some("192.0.2.7"));
        let e = AuditEvent::chain(draft, 1, 2000, GENESIS_HASH.to_vec());
        ChainVerifier::default().push(&e).unwrap();
        let mut altered = e.clone();
        altered.source = Some("198.51.100.1".into());
        let err = ChainVerifier::default().push(&altered).unwrap_err();
        assert!(err.reason.contains("altered"), "{err:?}");
    }

    #[test]
    fn version_1_records_still_verify_and_cannot_carry_a_source() {
        let mut old =
            AuditEvent::chain(AuditDraft::new("a", "b", "c"), 1, 1, GENESIS_HASH.to_vec());
        old.version = 1;
        old.hash = old.expected_hash();
        ChainVerifier::default().push(&old).unwrap();
        old.source = Some("192.0.2.1".into());
        old.hash = old.expected_hash();
        assert!(ChainVerifier::default().push(&old).is_err());
    }

    #[test]
    fn detail_key_order_does_not_change_the_hash() {
        let a: serde_json::Value = serde_json::from_str(r#"{"x":1,"y":2}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"y":2,"x":1}"#).unwrap();
        let h = |d| {
            AuditEvent::chain(
                AuditDraft::new("a", "b", "c").details(d),
                1,
                1,
                GENESIS_HASH.to_vec(),
            )
            .hash
        };
        assert_eq!(h(a), h(b));
    }
}
