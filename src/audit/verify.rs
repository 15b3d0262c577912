//! Chain verification against signed checkpoints, naming what broke.
//!
//! The verifier is fed events in sequence order and holds one back, so
//! that it can look one event ahead: two adjacent events swapped and one
//! event edited look the same from either event alone. Checkpoint
//! signatures are checked before any event is read; each checkpoint is
//! then checked against the chain hash at its sequence.
//!
//! What it names (the first break wins; the sequence is the first event
//! that is not as it was written):
//! - `edited`: an event's contents no longer match its hash;
//! - `deleted`: a sequence number is missing, or later events were
//!   renumbered down to close the gap (their hashes still carry their old
//!   numbers);
//! - `inserted`: an event sits before one whose hash carries a lower
//!   number than where it now is (renumbered up to make room);
//! - `reordered`: two adjacent events swapped places;
//! - `relinked`: an event's hash is intact but does not follow its
//!   predecessor's (the predecessor was replaced and re-hashed);
//! - `rechained`: the events are consistent with each other but not with a
//!   checkpoint the audit key signed (rewritten and re-hashed from some
//!   point on, without the key);
//! - `truncated`: a signed checkpoint covers events the chain no longer has;
//! - `forged-checkpoint`: a checkpoint whose signature does not verify, or
//!   that names a key that is not an audit key on the token.

use super::{AUDIT_RECORD_VERSION, AUDIT_RECORD_VERSION_MIN, AuditEvent, Checkpoint, GENESIS_HASH};
use crate::model::KeyAlgorithm;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// What kind of tampering (or damage) a break is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakKind {
    Edited,
    Deleted,
    Inserted,
    Reordered,
    Relinked,
    Rechained,
    Truncated,
    ForgedCheckpoint,
    /// A record this build cannot read (unknown version, impossible fields).
    Malformed,
}

impl BreakKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Edited => "edited",
            Self::Deleted => "deleted",
            Self::Inserted => "inserted",
            Self::Reordered => "reordered",
            Self::Relinked => "relinked",
            Self::Rechained => "rechained",
            Self::Truncated => "truncated",
            Self::ForgedCheckpoint => "forged-checkpoint",
            Self::Malformed => "malformed",
        }
    }
}

/// The first break found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Break {
    /// The first sequence number that is not as written (for `rechained`,
    /// the checkpoint that disagrees; the rewrite started after the
    /// previous checkpoint that agreed, `after_checkpoint`).
    pub seq: i64,
    pub kind: BreakKind,
    pub reason: String,
    /// For `rechained`: the newest checkpoint the chain still agreed with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_checkpoint: Option<i64>,
}

/// The public keys checkpoints are checked with, by audit key id, as read
/// from the token (or given by a third party): never from the store alone,
/// which whoever rewrites the chain can also rewrite.
pub type AuditKeys = HashMap<Uuid, (KeyAlgorithm, Vec<u8>)>;

/// The outcome of a verification run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Events verified (from the start, or after the trusted checkpoint).
    pub events: u64,
    /// Sequence and hash of the last event read.
    pub head_seq: i64,
    pub head_hash: String,
    /// Checkpoints whose signature verified and whose hash the chain matched.
    pub checkpoints_verified: u64,
    /// The newest checkpoint the chain matched.
    pub last_checkpoint: Option<i64>,
    /// Events after the newest matched checkpoint: not yet signed.
    pub unsigned_events: i64,
    pub broken: Option<Break>,
}

/// Incremental verifier; see the module comment.
pub struct Verifier {
    expected_seq: i64,
    prev_hash: Vec<u8>,
    /// Checkpoints whose signature verified, by sequence.
    checkpoints: BTreeMap<i64, Checkpoint>,
    held: Option<AuditEvent>,
    events: u64,
    checkpoints_verified: u64,
    last_checkpoint: Option<i64>,
    broken: Option<Break>,
    head_seq: i64,
}

impl Verifier {
    /// Verifies from the genesis. `checkpoints` may repeat (store and
    /// external file); each signature is checked with `keys` first.
    pub fn new(checkpoints: impl IntoIterator<Item = Checkpoint>, keys: &AuditKeys) -> Self {
        Self::start(0, GENESIS_HASH.to_vec(), checkpoints, keys)
    }

    /// Verifies the tail after `trusted` (whose signature the caller
    /// checked), from event `trusted.seq + 1`. Everything up to `trusted`
    /// is taken as it is: checkpoints at or before it are not looked at
    /// (not even a forged one).
    pub fn from_checkpoint(
        trusted: &Checkpoint,
        checkpoints: impl IntoIterator<Item = Checkpoint>,
        keys: &AuditKeys,
    ) -> Self {
        let after = trusted.seq;
        let tail = checkpoints.into_iter().filter(|c| c.seq > after);
        let mut v = Self::start(trusted.seq, trusted.hash.clone(), tail, keys);
        v.last_checkpoint = Some(trusted.seq);
        v
    }

    fn start(
        after_seq: i64,
        prev_hash: Vec<u8>,
        checkpoints: impl IntoIterator<Item = Checkpoint>,
        keys: &AuditKeys,
    ) -> Self {
        let mut v = Self {
            expected_seq: after_seq + 1,
            prev_hash,
            checkpoints: BTreeMap::new(),
            held: None,
            events: 0,
            checkpoints_verified: 0,
            last_checkpoint: None,
            broken: None,
            head_seq: after_seq,
        };
        for cp in checkpoints {
            if let Some(reason) = checkpoint_problem(&cp, keys) {
                v.record(Break {
                    seq: cp.seq,
                    kind: BreakKind::ForgedCheckpoint,
                    reason,
                    after_checkpoint: None,
                });
                continue;
            }
            match v.checkpoints.get(&cp.seq) {
                Some(existing) if existing.hash != cp.hash => {
                    // Both signed by the audit key, yet they disagree: a
                    // restore forked the chain or the key signed twice.
                    v.record(Break {
                        seq: cp.seq,
                        kind: BreakKind::Rechained,
                        reason: "two signed checkpoints disagree about this event's hash".into(),
                        after_checkpoint: None,
                    });
                }
                _ => {
                    v.checkpoints.insert(cp.seq, cp);
                }
            }
        }
        v
    }

    /// Keeps the break with the lowest sequence number.
    fn record(&mut self, b: Break) {
        if self.broken.as_ref().is_none_or(|old| b.seq < old.seq) {
            self.broken = Some(b);
        }
    }

    /// Whether a break was found (later events are not worth reading).
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Feeds the next event in sequence order.
    pub fn push(&mut self, e: AuditEvent) {
        if let Some(held) = self.held.take() {
            self.check(held, Some(&e));
        }
        self.held = Some(e);
    }

    /// Ends the stream and reports.
    pub fn finish(mut self) -> Report {
        if let Some(held) = self.held.take() {
            self.check(held, None);
        }
        if self.broken.is_none()
            && let Some((&seq, cp)) = self.checkpoints.range(self.head_seq + 1..).next()
        {
            let reason = format!(
                "the chain ends at sequence {} but a checkpoint signed at {} covers sequence {seq}: \
                 events were cut off the end",
                self.head_seq,
                crate::clock::rfc3339_ms(cp.at_ms)
            );
            self.record(Break {
                seq: self.head_seq + 1,
                kind: BreakKind::Truncated,
                reason,
                after_checkpoint: self.last_checkpoint,
            });
        }
        Report {
            events: self.events,
            head_seq: self.head_seq,
            head_hash: hex::encode(&self.prev_hash),
            checkpoints_verified: self.checkpoints_verified,
            last_checkpoint: self.last_checkpoint,
            unsigned_events: self.head_seq - self.last_checkpoint.unwrap_or(0),
            broken: self.broken,
        }
    }

    fn check(&mut self, e: AuditEvent, next: Option<&AuditEvent>) {
        if self.broken.is_some() {
            return;
        }
        let p = self.expected_seq;
        if let Some(reason) = malformed(&e) {
            return self.record(Break {
                seq: e.seq,
                kind: BreakKind::Malformed,
                reason,
                after_checkpoint: None,
            });
        }
        if e.seq > p {
            let n = e.seq - p;
            return self.record(Break {
                seq: p,
                kind: BreakKind::Deleted,
                reason: format!(
                    "sequence {p}{} missing: the next event is {}",
                    if n > 1 {
                        format!("..{}", e.seq - 1)
                    } else {
                        String::new()
                    },
                    e.seq
                ),
                after_checkpoint: None,
            });
        }
        if e.seq < p {
            return self.record(Break {
                seq: e.seq,
                kind: BreakKind::Reordered,
                reason: format!("sequence {} appears again after {}", e.seq, p - 1),
                after_checkpoint: None,
            });
        }
        if e.expected_hash() != e.hash {
            return self.record(self.classify_bad_hash(&e, next));
        }
        if e.prev_hash != self.prev_hash {
            return self.record(Break {
                seq: p - 1,
                kind: BreakKind::Relinked,
                reason: format!(
                    "event {p} is intact but does not follow event {}'s hash: event {} was \
                     replaced (and re-hashed) after {p} was written",
                    p - 1,
                    p - 1
                ),
                after_checkpoint: None,
            });
        }
        if let Some(cp) = self.checkpoints.get(&p) {
            if cp.hash != e.hash {
                let after = self.last_checkpoint;
                return self.record(Break {
                    seq: p,
                    kind: BreakKind::Rechained,
                    reason: format!(
                        "the checkpoint signed at {} for sequence {p} does not match the chain: \
                         events after {} were rewritten and re-chained without the audit key",
                        crate::clock::rfc3339_ms(cp.at_ms),
                        after.map_or("the start".to_string(), |s| format!("checkpoint {s}")),
                    ),
                    after_checkpoint: after,
                });
            }
            self.checkpoints_verified += 1;
            self.last_checkpoint = Some(p);
        }
        self.prev_hash = e.hash;
        self.head_seq = p;
        self.expected_seq = p + 1;
        self.events += 1;
    }

    /// An event whose contents do not match its hash: edited, or moved
    /// (its hash carries another sequence number).
    fn classify_bad_hash(&self, e: &AuditEvent, next: Option<&AuditEvent>) -> Break {
        let p = e.seq;
        let at = |seq: i64| {
            let mut moved = e.clone();
            moved.seq = seq;
            (moved.expected_hash() == e.hash).then_some(seq)
        };
        let original = (1..=8).flat_map(|k| [p + k, p - k]).find_map(at);
        let brk = |seq, kind, reason: String| Break {
            seq,
            kind,
            reason,
            after_checkpoint: None,
        };
        match original {
            Some(o) if o == p + 1 && next.is_some_and(|n| swapped_with(n, p, e)) => brk(
                p,
                BreakKind::Reordered,
                format!("events {p} and {} swapped places", p + 1),
            ),
            Some(o) if o > p => brk(
                p,
                BreakKind::Deleted,
                format!(
                    "event {p} was written as {o}: {} event(s) before it were deleted and the \
                     later ones renumbered",
                    o - p
                ),
            ),
            Some(o) => brk(
                o,
                BreakKind::Inserted,
                format!(
                    "event {p} was written as {o}: {} event(s) were inserted from sequence {o} \
                     and the later ones renumbered",
                    p - o
                ),
            ),
            None => brk(
                p,
                BreakKind::Edited,
                "the event's contents do not match its hash (edited)".into(),
            ),
        }
    }
}

/// Whether `next` (now at `p + 1`) was written at `p` and `e` chained to it.
fn swapped_with(next: &AuditEvent, p: i64, e: &AuditEvent) -> bool {
    let mut moved = next.clone();
    moved.seq = p;
    moved.expected_hash() == next.hash && e.prev_hash == next.hash
}

fn malformed(e: &AuditEvent) -> Option<String> {
    if !(AUDIT_RECORD_VERSION_MIN..=AUDIT_RECORD_VERSION).contains(&e.version) {
        return Some(format!("unknown record version {}", e.version));
    }
    if e.version < 2 && e.source.is_some() {
        return Some("a version 1 record cannot carry a source".into());
    }
    if e.version < 3 && e.sealed.is_some() {
        return Some("a record before version 3 cannot carry sealed details".into());
    }
    None
}

/// Why a checkpoint cannot be trusted, if it cannot.
pub fn checkpoint_problem(cp: &Checkpoint, keys: &AuditKeys) -> Option<String> {
    match keys.get(&cp.key_id) {
        None => Some(format!(
            "checkpoint {} names key {} which is not an audit key on the token",
            cp.seq, cp.key_id
        )),
        Some((alg, spki)) if !cp.verify(spki, *alg) => Some(format!(
            "checkpoint {}'s signature does not verify under audit key {}",
            cp.seq, cp.key_id
        )),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditDraft;

    fn chain(n: i64) -> Vec<AuditEvent> {
        let mut prev = GENESIS_HASH.to_vec();
        (1..=n)
            .map(|seq| {
                let e = AuditEvent::chain(
                    AuditDraft::new("admin:1", "test.act", format!("t{seq}")),
                    seq,
                    1000 + seq,
                    prev.clone(),
                );
                prev = e.hash.clone();
                e
            })
            .collect()
    }

    fn run(events: Vec<AuditEvent>) -> Report {
        let mut v = Verifier::new([], &AuditKeys::new());
        for e in events {
            v.push(e);
        }
        v.finish()
    }

    fn kind(events: Vec<AuditEvent>) -> (i64, BreakKind) {
        let b = run(events).broken.expect("a break");
        (b.seq, b.kind)
    }

    #[test]
    fn intact_chain_verifies() {
        let r = run(chain(10));
        assert!(r.broken.is_none(), "{r:?}");
        assert_eq!((r.events, r.head_seq, r.unsigned_events), (10, 10, 10));
    }

    #[test]
    fn edit_delete_insert_reorder_relink_are_told_apart() {
        let mut c = chain(10);
        c[4].target = "x".into();
        assert_eq!(kind(c), (5, BreakKind::Edited));

        let mut c = chain(10);
        c.remove(4);
        assert_eq!(kind(c), (5, BreakKind::Deleted));

        let mut c = chain(10);
        c.remove(4);
        for e in &mut c[4..] {
            e.seq -= 1;
        }
        assert_eq!(kind(c), (5, BreakKind::Deleted));

        let mut c = chain(10);
        let forged = AuditEvent::chain(
            AuditDraft::new("admin:9", "forged", "x"),
            5,
            1,
            c[3].hash.clone(),
        );
        for e in &mut c[4..] {
            e.seq += 1;
        }
        c.insert(4, forged);
        assert_eq!(kind(c), (5, BreakKind::Inserted));

        let mut c = chain(10);
        c.swap(4, 5);
        c[4].seq = 5;
        c[5].seq = 6;
        assert_eq!(kind(c), (5, BreakKind::Reordered));

        let mut c = chain(10);
        c[4].target = "x".into();
        c[4].hash = c[4].expected_hash();
        assert_eq!(kind(c), (5, BreakKind::Relinked));
    }
}
