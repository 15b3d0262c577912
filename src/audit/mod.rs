//! The audit trail: append-only events, SHA-256 hash-chained.
//!
//! `hash = SHA-256(prev_hash ‖ canonical JSON of the event)`, where the
//! canonical JSON has a fixed field order and sorted detail keys. The store
//! computes hashes inside the transaction that makes the change, so an event
//! exists if and only if its change does.

use serde::{Deserialize, Serialize};

/// Version of the canonical event encoding.
pub const AUDIT_RECORD_VERSION: u32 = 1;

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
}

impl AuditDraft {
    pub fn new(actor: impl Into<String>, action: &str, target: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            action: action.to_string(),
            target: target.into(),
            outcome: Outcome::Success,
            details: serde_json::Value::Object(serde_json::Map::new()),
        }
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
        };
        // Serialising strings, integers and a sorted map cannot fail.
        let body = serde_json::to_vec(&canonical).unwrap_or_default();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&self.prev_hash);
        ctx.update(&body);
        ctx.finish().as_ref().to_vec()
    }

    /// Numbers and chains a draft after `prev_hash`.
    pub fn chain(draft: AuditDraft, seq: i64, at_ms: i64, prev_hash: Vec<u8>) -> Self {
        let mut e = Self {
            seq,
            at_ms,
            actor: draft.actor,
            action: draft.action,
            target: draft.target,
            outcome: draft.outcome,
            details: draft.details,
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
        if e.version != AUDIT_RECORD_VERSION {
            return Err(fail(&format!("unknown record version {}", e.version)));
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

mod hex_bytes {
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
