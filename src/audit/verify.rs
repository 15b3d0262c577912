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
//!   numbers; up to 4096 deleted events are recognised as such, more read
//!   as `edited`). A non-adjacent swap also reads as `deleted` (the event
//!   now at the first place was written further on);
//! - `inserted`: an event sits before one whose hash carries a lower
//!   number than where it now is (renumbered up to make room);
//! - `reordered`: two adjacent events swapped places;
//! - `relinked`: an event's hash is intact but does not follow its
//!   predecessor's: the predecessor was replaced and re-hashed (named), or,
//!   when the next event does not follow it either, the event itself was
//!   (named);
//! - `rechained`: the events are consistent with each other but not with a
//!   checkpoint the audit key signed (rewritten and re-hashed from some
//!   point on, without the key);
//! - `truncated`: a signed checkpoint covers events the chain no longer has
//!   (the sequence named is the first missing one);
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
            if next.is_some_and(|n| n.prev_hash != e.hash) {
                // Linked to neither neighbour: this event itself was put
                // in (re-hashed over a made-up predecessor).
                return self.record(Break {
                    seq: p,
                    kind: BreakKind::Relinked,
                    reason: format!(
                        "event {p} is intact but follows neither event {} nor is followed by \
                         event {}: it was replaced (and re-hashed over another predecessor)",
                        p - 1,
                        p + 1
                    ),
                    after_checkpoint: None,
                });
            }
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
        let original = (1..=MOVE_SEARCH).flat_map(|k| [p + k, p - k]).find_map(at);
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

/// How far (in sequence numbers, either way) an event whose hash does not
/// match is looked for at another number before it is called edited: runs
/// once per verification, on the first bad event only (two hashes a step).
const MOVE_SEARCH: i64 = 4096;

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

        // Replaced by an event re-hashed over a made-up predecessor: named
        // itself, not the (intact) event before it.
        let mut c = chain(10);
        c[4].target = "x".into();
        c[4].prev_hash = vec![9; 32];
        c[4].hash = c[4].expected_hash();
        assert_eq!(kind(c), (5, BreakKind::Relinked));
    }

    #[test]
    fn many_deleted_and_renumbered_events_are_still_deleted() {
        let mut c = chain(60);
        c.drain(4..44);
        for e in &mut c[4..] {
            e.seq -= 40;
        }
        assert_eq!(kind(c), (5, BreakKind::Deleted));
    }

    /// An Ed25519 audit key made here: its id, the keys map, the signer.
    fn audit_key() -> (Uuid, AuditKeys, ring::signature::Ed25519KeyPair) {
        use ring::signature::KeyPair as _;
        let pkcs8 =
            ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .unwrap();
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let mut spki = hex::decode("302a300506032b6570032100").unwrap();
        spki.extend_from_slice(kp.public_key().as_ref());
        let id = Uuid::new_v4();
        let mut keys = AuditKeys::new();
        keys.insert(id, (KeyAlgorithm::Ed25519, spki));
        (id, keys, kp)
    }

    fn sign(kp: &ring::signature::Ed25519KeyPair, id: Uuid, e: &AuditEvent) -> Checkpoint {
        let message = Checkpoint::message(e.seq, &e.hash, 5000, id);
        Checkpoint {
            seq: e.seq,
            hash: e.hash.clone(),
            at_ms: 5000,
            key_id: id,
            signature: kp.sign(&message).as_ref().to_vec(),
        }
    }

    fn run_with(events: Vec<AuditEvent>, cps: Vec<Checkpoint>, keys: &AuditKeys) -> Report {
        let mut v = Verifier::new(cps, keys);
        for e in events {
            v.push(e);
        }
        v.finish()
    }

    #[test]
    fn checkpoints_catch_rechaining_truncation_and_forgery() {
        let (id, keys, kp) = audit_key();
        let c = chain(12);
        let cps = vec![
            sign(&kp, id, &c[3]),
            sign(&kp, id, &c[7]),
            sign(&kp, id, &c[11]),
        ];

        let r = run_with(c.clone(), cps.clone(), &keys);
        assert!(r.broken.is_none(), "{r:?}");
        assert_eq!((r.checkpoints_verified, r.last_checkpoint), (3, Some(12)));
        assert_eq!(r.unsigned_events, 0);

        // Event 6 edited, everything after it re-hashed: only the
        // checkpoint at 8 tells; the rewrite started after checkpoint 4.
        let mut re = c.clone();
        re[5].actor = "admin:mallory".into();
        for i in 5..re.len() {
            re[i].prev_hash = re[i - 1].hash.clone();
            re[i].hash = re[i].expected_hash();
        }
        let b = run_with(re, cps.clone(), &keys).broken.unwrap();
        assert_eq!(
            (b.seq, b.kind, b.after_checkpoint),
            (8, BreakKind::Rechained, Some(4))
        );

        // The tail after checkpoint 8 cut off: 9 is the first missing event.
        let b = run_with(c[..8].to_vec(), cps.clone(), &keys)
            .broken
            .unwrap();
        assert_eq!(
            (b.seq, b.kind, b.after_checkpoint),
            (9, BreakKind::Truncated, Some(8))
        );

        // A changed signature, and a key that is not an audit key.
        let mut bad = cps.clone();
        bad[1].signature[10] ^= 1;
        let b = run_with(c.clone(), bad, &keys).broken.unwrap();
        assert_eq!((b.seq, b.kind), (8, BreakKind::ForgedCheckpoint));
        let (other_id, _, other_kp) = audit_key();
        let mut bad = cps.clone();
        bad[1] = sign(&other_kp, other_id, &c[7]);
        let b = run_with(c.clone(), bad, &keys).broken.unwrap();
        assert_eq!((b.seq, b.kind), (8, BreakKind::ForgedCheckpoint));
        // Signed by another key under the audit key's id.
        let mut bad = cps.clone();
        bad[1] = sign(&other_kp, id, &c[7]);
        let b = run_with(c.clone(), bad, &keys).broken.unwrap();
        assert_eq!((b.seq, b.kind), (8, BreakKind::ForgedCheckpoint));

        // Two checkpoints signed by the key that disagree.
        let mut forked = c[7].clone();
        forked.hash = vec![7; 32];
        let mut two = cps.clone();
        two.push(sign(&kp, id, &forked));
        let b = run_with(c.clone(), two, &keys).broken.unwrap();
        assert_eq!((b.seq, b.kind), (8, BreakKind::Rechained));
    }

    #[test]
    fn from_a_checkpoint_nothing_before_it_is_looked_at() {
        let (id, keys, kp) = audit_key();
        let mut c = chain(12);
        let mut cps = vec![sign(&kp, id, &c[3]), sign(&kp, id, &c[7])];
        cps[0].signature[10] ^= 1;
        c[1].target = "edited before the trusted checkpoint".into();
        let trusted = cps[1].clone();
        let mut v = Verifier::from_checkpoint(&trusted, cps.clone(), &keys);
        for e in c[8..].iter().cloned() {
            v.push(e);
        }
        let r = v.finish();
        assert!(r.broken.is_none(), "{r:?}");
        assert_eq!((r.events, r.head_seq, r.last_checkpoint), (4, 12, Some(8)));

        // After it: found.
        c[9].target = "edited after".into();
        let mut v = Verifier::from_checkpoint(&trusted, cps, &keys);
        for e in c[8..].iter().cloned() {
            v.push(e);
        }
        let b = v.finish().broken.unwrap();
        assert_eq!((b.seq, b.kind), (10, BreakKind::Edited));
    }
}
