//! Signed checkpoints of the chain head.
//!
//! A hash chain alone proves order and integrity only against someone who
//! cannot recompute it: whoever can write the database can edit an event
//! and re-chain everything after it, or cut the tail off. Every N events or
//! T seconds the daemon signs the head (sequence, hash, time) with the
//! `audit` key, which lives in the HSM. A rewrite then disagrees with a
//! signature nobody else can make, and a truncation leaves a checkpoint
//! pointing past the end of the chain (kept in the store and, optionally,
//! appended to a file the database's writers cannot rewrite).
//!
//! The signed message is plain text so that a third party can check it
//! with `openssl dgst -sha256 -verify audit.pub.pem -signature sig.der
//! message.txt` (see docs/operations.md, "Audit").

use crate::model::KeyAlgorithm;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// First line of every signed checkpoint message: the format, and what is signed.
pub const CHECKPOINT_MAGIC: &str = "keyward-audit-checkpoint-v1";

/// A signature over the chain head at `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The last event covered.
    pub seq: i64,
    /// That event's chain hash.
    #[serde(with = "super::hex_bytes")]
    pub hash: Vec<u8>,
    /// When the checkpoint was signed (Unix ms).
    pub at_ms: i64,
    /// The `audit` key that signed it.
    pub key_id: Uuid,
    /// Over [`Checkpoint::message`]: DER for ECDSA, raw for RSA and Ed25519.
    #[serde(with = "super::hex_bytes")]
    pub signature: Vec<u8>,
}

impl Checkpoint {
    /// The exact bytes the audit key signs (ASCII, one `name=value` per line).
    pub fn message(seq: i64, hash: &[u8], at_ms: i64, key_id: Uuid) -> Vec<u8> {
        format!(
            "{CHECKPOINT_MAGIC}\nseq={seq}\nhash={}\nat_ms={at_ms}\nkey={key_id}\n",
            hex::encode(hash)
        )
        .into_bytes()
    }

    /// This checkpoint's signed message.
    pub fn signed_message(&self) -> Vec<u8> {
        Self::message(self.seq, &self.hash, self.at_ms, self.key_id)
    }

    /// Whether the signature verifies under `spki_der` (the audit key's public key).
    pub fn verify(&self, spki_der: &[u8], algorithm: KeyAlgorithm) -> bool {
        crate::crypto::verify_spki_signature(
            spki_der,
            algorithm,
            &self.signed_message(),
            &self.signature,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_every_field_and_changes_with_each() {
        let id = Uuid::nil();
        let base = Checkpoint::message(7, &[0xab; 32], 1000, id);
        let text = String::from_utf8(base.clone()).unwrap();
        assert!(text.starts_with("keyward-audit-checkpoint-v1\nseq=7\nhash=abab"));
        assert!(text.ends_with("at_ms=1000\nkey=00000000-0000-0000-0000-000000000000\n"));
        assert_ne!(base, Checkpoint::message(8, &[0xab; 32], 1000, id));
        assert_ne!(base, Checkpoint::message(7, &[0xac; 32], 1000, id));
        assert_ne!(base, Checkpoint::message(7, &[0xab; 32], 1001, id));
        assert_ne!(base, Checkpoint::message(7, &[0xab; 32], 1000, Uuid::max()));
    }
}

/// First line of every signed export checkpoint message.
pub const EXPORT_MAGIC: &str = "keyward-audit-export-v1";

/// The last line of `keyward audit export`: a signature, by the HSM audit
/// key, over the range exported and the SHA-256 of every byte of the file
/// before this line, so that a third party holding only the audit public
/// key can check that no line was changed, added or removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportCheckpoint {
    /// Always `export-checkpoint`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Sequence numbers of the first and last exported event (0 when none).
    pub from_seq: i64,
    pub to_seq: i64,
    /// Number of event lines.
    pub events: u64,
    /// Chain hash of the last exported event (hex; 64 zeros when none).
    pub head_hash: String,
    /// SHA-256 (hex) of every byte of the export before this line.
    pub lines_sha256: String,
    /// The export's time filter (Unix ms), `null` when open.
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// When the daemon signed it (Unix ms).
    pub at_ms: i64,
    /// The `audit` key that signed it.
    pub key_id: Uuid,
    /// Exactly the signed text ([`ExportCheckpoint::message`]).
    pub message: String,
    /// Base64 of the signature over `message`: DER for ECDSA.
    pub signature: String,
}

impl ExportCheckpoint {
    /// The exact text the audit key signs: ASCII, one `name=value` per
    /// line, each ending in `\n`; an open time bound is `-`.
    #[allow(clippy::too_many_arguments)]
    pub fn message(
        from_seq: i64,
        to_seq: i64,
        events: u64,
        head_hash: &str,
        lines_sha256: &str,
        since_ms: Option<i64>,
        until_ms: Option<i64>,
        at_ms: i64,
        key_id: Uuid,
    ) -> String {
        let bound = |b: Option<i64>| b.map_or_else(|| "-".to_string(), |v| v.to_string());
        format!(
            "{EXPORT_MAGIC}\nfrom_seq={from_seq}\nto_seq={to_seq}\nevents={events}\nhead_hash={head_hash}\nlines_sha256={lines_sha256}\nsince_ms={}\nuntil_ms={}\nat_ms={at_ms}\nkey={key_id}\n",
            bound(since_ms),
            bound(until_ms)
        )
    }
}
