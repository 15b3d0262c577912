//! The rotation planner: a pure function of the keys, the rotation records,
//! the policy and `now` (unix seconds). No I/O, no clock reads.
//!
//! Rules:
//! - Only `active` keys are planned, one item per `(purpose, target)`: the
//!   newest active key of the pair (by `activated_at`, then key id).
//! - A key is due at `min(activated_at + max_age, cert_not_after) - rotate_before`
//!   ([`due_at`]); its age is `max(0, now - activated_at)`, so a clock that
//!   went backwards never makes an age negative, and never makes a key due
//!   (the due instant does not depend on `now`).
//! - A running rotation of the pair (`RotationStep::running`) gives a
//!   `Resume` item instead, also while its `next_attempt_at` is in the future
//!   (the note says so; the executor checks the time).
//! - A `retired` rotation whose `destroy_after` has passed gives a separate
//!   `DestroyOld` item; it does not block a new rotation of the pair.
//! - Root keys are `Manual` (an operator rotates roots); so are device keys,
//!   purposes without a `[keys.PURPOSE]` rule, and rules with
//!   `automatic = false`.
//! - Due, with the certifying parent's key on a YubiKey: `NeedsRootCard`.
//! - Items are ordered by `(purpose, target)`, then key items before
//!   `DestroyOld` items, then by id: the same input gives the same plan.
//!
//! Device certificates: [`plan_devices`] lists which certificates are in
//! their renewal window (renewal hints) and which of those still need a
//! `device.renewal_due` notification.

use crate::model::{KeyPurpose, KeyState, RotationStep};
use crate::policy::{KeyRotation, RotationPolicy};
use crate::store::RotationRecord;
use serde::Serialize;
use std::collections::BTreeMap;
use uuid::Uuid;

const DAY: i64 = 86_400;

/// One key as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyView {
    pub key_id: Uuid,
    /// `IssuingCa`, `OcspSigning`, `TlsServer`, `RootCa`, ...
    pub purpose: KeyPurpose,
    /// The CA name; `server` for `tls-server`.
    pub target: String,
    /// Only `Active` keys are planned.
    pub state: KeyState,
    /// Unix seconds (the key's `created_at`).
    pub activated_at: i64,
    /// notAfter of the key's own certificate, unix seconds.
    pub cert_not_after: Option<i64>,
    /// The key that must certify a successor is on a YubiKey.
    pub parent_on_card: bool,
}

/// One rotation record as the planner sees it (`From<&RotationRecord>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationView {
    pub id: Uuid,
    pub purpose: KeyPurpose,
    pub target: String,
    pub step: RotationStep,
    pub destroy_after: Option<i64>,
    pub next_attempt_at: i64,
    /// The key being replaced (shown in `DestroyOld` and `Resume` items).
    pub old_key_id: Option<Uuid>,
}

impl From<&RotationRecord> for RotationView {
    fn from(r: &RotationRecord) -> Self {
        Self {
            id: r.id,
            purpose: r.purpose,
            target: r.target.clone(),
            step: r.step,
            destroy_after: r.destroy_after,
            next_attempt_at: r.next_attempt_at,
            old_key_id: r.old_key_id,
        }
    }
}

/// Everything the planner reads. `keys` may hold keys of any state (only
/// active ones are planned); `rotations` may hold finished ones (ignored).
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    pub keys: &'a [KeyView],
    pub rotations: &'a [RotationView],
}

/// What to do about one key or rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Nothing to do before `next_rotation_at`.
    Wait,
    /// Start a rotation now (reason: human text, e.g. "key age 1065 d >= 1095 d - 30 d").
    Rotate { reason: String },
    /// Due, but its certification needs a card-held root: an operator runs `keyward ca rotate`.
    NeedsRootCard { reason: String },
    /// A running rotation exists (resume it if next_attempt_at <= now).
    Resume {
        rotation_id: Uuid,
        step: RotationStep,
    },
    /// A retired rotation whose destroy_after has passed: destroy the old key.
    DestroyOld { rotation_id: Uuid },
    /// Roots and purposes without policy (or automatic = false): reported, never rotated.
    Manual { reason: String },
}

impl Action {
    /// Stable name, for metrics labels and logs: `wait`, `rotate`,
    /// `needs-root-card`, `resume`, `destroy-old`, `manual`.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Wait => "wait",
            Action::Rotate { .. } => "rotate",
            Action::NeedsRootCard { .. } => "needs-root-card",
            Action::Resume { .. } => "resume",
            Action::DestroyOld { .. } => "destroy-old",
            Action::Manual { .. } => "manual",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanItem {
    pub purpose: KeyPurpose,
    pub target: String,
    /// The planned key; for `Resume` the pair's newest active key (else the
    /// rotation's old key); for `DestroyOld` the rotation's old key.
    pub key_id: Option<Uuid>,
    /// `max(0, now - activated_at)` of `key_id` (0 when it is not in the input).
    pub age_seconds: i64,
    /// When the key is (or was) due; for `Resume`, the rotation's
    /// `next_attempt_at`; `None` for roots, keys without a rule, `DestroyOld`.
    pub next_rotation_at: Option<i64>,
    #[serde(flatten)]
    pub action: Action,
    /// One human sentence on the item (for `--dry-run` and notifications).
    pub note: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub items: Vec<PlanItem>,
}

/// When `key` is due under `rule`: `min(activated_at + max_age,
/// cert_not_after) - rotate_before` (saturating).
pub fn due_at(key: &KeyView, rule: &KeyRotation) -> i64 {
    let by_age = key.activated_at.saturating_add(rule.max_age_seconds());
    let limit = key.cert_not_after.map_or(by_age, |na| na.min(by_age));
    limit.saturating_sub(rule.rotate_before_seconds())
}

/// RFC 3339, or `@unix` for instants `time` cannot represent.
fn when(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{t}"))
}

fn days(seconds: i64) -> i64 {
    seconds.div_euclid(DAY)
}

/// Why a due key is due: the age rule, or its certificate's notAfter.
fn due_reason(key: &KeyView, rule: &KeyRotation, age: i64, now: i64) -> String {
    let by_age = key.activated_at.saturating_add(rule.max_age_seconds());
    match key.cert_not_after {
        Some(na) if na < by_age => {
            if na <= now {
                format!("certificate expired at {}", when(na))
            } else {
                format!(
                    "certificate expires at {} (in {} d, within the {} d margin)",
                    when(na),
                    days(na.saturating_sub(now)),
                    rule.rotate_before_days
                )
            }
        }
        _ => format!(
            "key age {} d >= {} d - {} d",
            days(age),
            rule.max_age_days,
            rule.rotate_before_days
        ),
    }
}

/// The pair's newest active key and its running rotations.
#[derive(Default)]
struct Pair<'a> {
    key: Option<&'a KeyView>,
    running: Vec<&'a RotationView>,
}

/// Plans every `(purpose, target)` of the input at `now` (unix seconds).
pub fn plan(input: &PlanInput<'_>, policy: &RotationPolicy, now: i64) -> Plan {
    let age_of = |k: &KeyView| now.saturating_sub(k.activated_at).max(0);
    let mut pairs: BTreeMap<(KeyPurpose, &str), Pair<'_>> = BTreeMap::new();
    for k in input.keys.iter().filter(|k| k.state == KeyState::Active) {
        let pair = pairs.entry((k.purpose, k.target.as_str())).or_default();
        if pair
            .key
            .is_none_or(|cur| (k.activated_at, k.key_id) > (cur.activated_at, cur.key_id))
        {
            pair.key = Some(k);
        }
    }
    let mut items = Vec::new();
    for r in input.rotations {
        if r.step.running() {
            pairs
                .entry((r.purpose, r.target.as_str()))
                .or_default()
                .running
                .push(r);
        } else if r.step == RotationStep::Retired
            && let Some(after) = r.destroy_after
            && after <= now
        {
            let old = r
                .old_key_id
                .and_then(|id| input.keys.iter().find(|k| k.key_id == id));
            items.push(PlanItem {
                purpose: r.purpose,
                target: r.target.clone(),
                key_id: r.old_key_id,
                age_seconds: old.map_or(0, age_of),
                next_rotation_at: None,
                action: Action::DestroyOld { rotation_id: r.id },
                note: format!(
                    "rotation {}: the old key may be destroyed since {}",
                    r.id,
                    when(after)
                ),
            });
        }
    }
    for ((purpose, target), mut pair) in pairs {
        if !pair.running.is_empty() {
            pair.running.sort_by_key(|r| r.id);
            for r in pair.running {
                let key_id = pair.key.map(|k| k.key_id).or(r.old_key_id);
                let note = if r.next_attempt_at <= now {
                    format!("rotation {} stands at `{}`: resume now", r.id, r.step)
                } else {
                    format!(
                        "rotation {} stands at `{}`: next attempt not before {} (backing off; the executor waits)",
                        r.id,
                        r.step,
                        when(r.next_attempt_at)
                    )
                };
                items.push(PlanItem {
                    purpose,
                    target: target.to_string(),
                    key_id,
                    age_seconds: pair.key.map_or(0, age_of),
                    next_rotation_at: Some(r.next_attempt_at),
                    action: Action::Resume {
                        rotation_id: r.id,
                        step: r.step,
                    },
                    note,
                });
            }
            continue;
        }
        if let Some(k) = pair.key {
            items.push(key_item(k, policy, now, age_of(k)));
        }
    }
    items.sort_by(|a, b| {
        let rank = |i: &PlanItem| match i.action {
            Action::DestroyOld { rotation_id } => (1, Some(rotation_id)),
            Action::Resume { rotation_id, .. } => (0, Some(rotation_id)),
            _ => (0, i.key_id),
        };
        (a.purpose, &a.target, rank(a)).cmp(&(b.purpose, &b.target, rank(b)))
    });
    Plan { items }
}

/// The item of one active key without a running rotation.
fn key_item(k: &KeyView, policy: &RotationPolicy, now: i64, age: i64) -> PlanItem {
    let item = |next: Option<i64>, action: Action, note: String| PlanItem {
        purpose: k.purpose,
        target: k.target.clone(),
        key_id: Some(k.key_id),
        age_seconds: age,
        next_rotation_at: next,
        action,
        note,
    };
    let manual = |next: Option<i64>, reason: String| {
        item(
            next,
            Action::Manual {
                reason: reason.clone(),
            },
            reason,
        )
    };
    match k.purpose {
        KeyPurpose::RootCa => {
            return manual(None, "roots are rotated by an operator".into());
        }
        KeyPurpose::Device => {
            return manual(None, "device keys are renewed by the devices".into());
        }
        _ => {}
    }
    let Some(rule) = policy.key(k.purpose) else {
        return manual(
            None,
            format!(
                "no [keys.{}] in rotation.toml: never rotated automatically",
                k.purpose
            ),
        );
    };
    let due = due_at(k, rule);
    if !rule.automatic {
        let state = if now >= due {
            format!(
                "due since {} ({})",
                when(due),
                due_reason(k, rule, age, now)
            )
        } else {
            format!("due at {}", when(due))
        };
        return manual(
            Some(due),
            format!(
                "automatic = false for {} in rotation.toml: an operator rotates it; {state}",
                k.purpose
            ),
        );
    }
    if now < due {
        return item(
            Some(due),
            Action::Wait,
            format!(
                "due at {} (in {} d)",
                when(due),
                days(due.saturating_sub(now))
            ),
        );
    }
    let reason = due_reason(k, rule, age, now);
    if k.parent_on_card {
        let reason = format!(
            "{reason}; its parent's key is on a YubiKey: run `keyward ca rotate {}` with the root card",
            k.target
        );
        return item(
            Some(due),
            Action::NeedsRootCard {
                reason: reason.clone(),
            },
            format!("needs the root card: {reason}"),
        );
    }
    item(
        Some(due),
        Action::Rotate {
            reason: reason.clone(),
        },
        format!("rotate now: {reason}"),
    )
}

/// One device certificate, for renewal hints and notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCertView {
    pub not_after: i64,
    /// From the certificate's profile (`renewal_window_days` in ca.toml).
    pub renewal_window_days: u32,
    /// A `device.renewal_due` notification already went out for it.
    pub notified: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DevicePlan {
    /// Indexes into the input whose renewal window is open (and which have
    /// not expired: an expired certificate cannot renew).
    pub due: Vec<usize>,
    /// Due and not yet notified.
    pub to_notify: Vec<usize>,
}

/// When a certificate's renewal window opens: `not_after - renewal_window_days`.
pub fn renewal_window_opens(not_after: i64, renewal_window_days: u32) -> i64 {
    not_after.saturating_sub(i64::from(renewal_window_days) * DAY)
}

/// The certificates in their renewal window at `now`:
/// `renewal_window_opens(..) <= now < not_after`.
pub fn plan_devices(certs: &[DeviceCertView], now: i64) -> DevicePlan {
    let mut plan = DevicePlan::default();
    for (i, c) in certs.iter().enumerate() {
        if now < c.not_after && renewal_window_opens(c.not_after, c.renewal_window_days) <= now {
            plan.due.push(i);
            if !c.notified {
                plan.to_notify.push(i);
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Schedule;
    use time::OffsetDateTime;
    use time::macros::datetime;

    fn t(d: OffsetDateTime) -> i64 {
        d.unix_timestamp()
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn key(n: u128, purpose: KeyPurpose, target: &str, activated: OffsetDateTime) -> KeyView {
        KeyView {
            key_id: id(n),
            purpose,
            target: target.into(),
            state: KeyState::Active,
            activated_at: t(activated),
            cert_not_after: None,
            parent_on_card: false,
        }
    }

    fn rotation(n: u128, purpose: KeyPurpose, target: &str, step: RotationStep) -> RotationView {
        RotationView {
            id: id(n),
            purpose,
            target: target.into(),
            step,
            destroy_after: None,
            next_attempt_at: 0,
            old_key_id: None,
        }
    }

    fn policy() -> RotationPolicy {
        RotationPolicy::default()
    }

    fn rule(max_age_days: u32, rotate_before_days: u32, automatic: bool) -> KeyRotation {
        KeyRotation {
            max_age_days,
            rotate_before_days,
            automatic,
        }
    }

    fn with(purpose: KeyPurpose, r: KeyRotation) -> RotationPolicy {
        let mut p = policy();
        p.keys.insert(purpose, r);
        p
    }

    fn run(keys: &[KeyView], rotations: &[RotationView], p: &RotationPolicy, now: i64) -> Plan {
        plan(&PlanInput { keys, rotations }, p, now)
    }

    fn one(keys: &[KeyView], p: &RotationPolicy, now: i64) -> PlanItem {
        let plan = run(keys, &[], p, now);
        assert_eq!(plan.items.len(), 1, "{plan:#?}");
        plan.items[0].clone()
    }

    const S: i64 = 1;

    #[test]
    fn due_boundaries_one_second_before_at_after() {
        // tls-server: 90 d / 14 d: due 76 d after activation.
        let act = datetime!(2027-05-01 12:00 UTC);
        let k = [key(1, KeyPurpose::TlsServer, "server", act)];
        let due = t(act) + 76 * DAY;
        let p = policy();
        let before = one(&k, &p, due - S);
        assert_eq!(before.action, Action::Wait);
        assert_eq!(before.next_rotation_at, Some(due));
        assert_eq!(before.age_seconds, 76 * DAY - 1);
        assert!(
            before.note.contains("2027-07-16T12:00:00Z"),
            "{}",
            before.note
        );
        for now in [due, due + S] {
            let at = one(&k, &p, now);
            assert_eq!(
                at.action,
                Action::Rotate {
                    reason: "key age 76 d >= 90 d - 14 d".into()
                }
            );
            assert_eq!(at.next_rotation_at, Some(due));
            assert_eq!(at.key_id, Some(id(1)));
        }
    }

    #[test]
    fn the_token_signing_key_is_planned_like_any_rotated_key() {
        // Shipped: 90 d / 7 d, due 83 d after activation.
        let act = datetime!(2027-05-01 12:00 UTC);
        let k = [key(1, KeyPurpose::TokenSigning, "tokens", act)];
        let due = t(act) + 83 * DAY;
        let p = RotationPolicy::default();
        assert_eq!(one(&k, &p, due - S).action, Action::Wait);
        assert_eq!(one(&k, &p, due).action.kind(), "rotate");
        // A running rotation of it: resumed, not started twice.
        let r = [rotation(
            9,
            KeyPurpose::TokenSigning,
            "tokens",
            RotationStep::KeyGenerated,
        )];
        let plan = run(&k, &r, &p, due);
        assert_eq!(plan.items.len(), 1, "{plan:#?}");
        assert_eq!(plan.items[0].action.kind(), "resume");
    }

    #[test]
    fn year_boundary() {
        // Due exactly at 2027-01-01 00:00: activated 76 d earlier.
        let act = datetime!(2026-10-17 00:00 UTC);
        let k = [key(1, KeyPurpose::TlsServer, "server", act)];
        let p = policy();
        assert_eq!(t(act) + 76 * DAY, t(datetime!(2027-01-01 00:00 UTC)));
        assert_eq!(
            one(&k, &p, t(datetime!(2026-12-31 23:59:59 UTC))).action,
            Action::Wait
        );
        assert_eq!(
            one(&k, &p, t(datetime!(2027-01-01 00:00 UTC)))
                .action
                .kind(),
            "rotate"
        );
    }

    #[test]
    fn leap_days() {
        let p = with(KeyPurpose::IssuingCa, rule(365, 0, true));
        // Feb 29 2028 + 365 d = Feb 28 2029.
        let k = [key(
            1,
            KeyPurpose::IssuingCa,
            "devices",
            datetime!(2028-02-29 00:00 UTC),
        )];
        let due = t(datetime!(2029-02-28 00:00 UTC));
        assert_eq!(one(&k, &p, due - S).next_rotation_at, Some(due));
        assert_eq!(one(&k, &p, due - S).action, Action::Wait);
        assert_eq!(one(&k, &p, due).action.kind(), "rotate");
        // Mar 1 2027 + 365 d lands on Feb 29 2028.
        let k = [key(
            1,
            KeyPurpose::IssuingCa,
            "devices",
            datetime!(2027-03-01 00:00 UTC),
        )];
        let due = t(datetime!(2028-02-29 00:00 UTC));
        assert_eq!(one(&k, &p, due - S).action, Action::Wait);
        let at = one(&k, &p, due);
        assert_eq!(at.next_rotation_at, Some(due));
        assert_eq!(
            at.action,
            Action::Rotate {
                reason: "key age 365 d >= 365 d - 0 d".into()
            }
        );
    }

    #[test]
    fn clock_backwards_never_negative_never_due() {
        let act = datetime!(2027-06-01 00:00 UTC);
        let k = [key(1, KeyPurpose::TlsServer, "server", act)];
        let p = policy();
        for now in [
            t(act) - S,
            t(act) - 400 * DAY,
            t(datetime!(1970-01-01 00:00 UTC)),
            i64::MIN,
        ] {
            let i = one(&k, &p, now);
            assert_eq!(i.age_seconds, 0, "now {now}");
            assert_eq!(i.action, Action::Wait, "now {now}");
            assert_eq!(i.next_rotation_at, Some(t(act) + 76 * DAY));
        }
        // Far future: no overflow either.
        assert_eq!(one(&k, &p, i64::MAX).action.kind(), "rotate");
    }

    #[test]
    fn certificate_expiring_before_max_age_decides() {
        // issuing-ca 1095 d / 30 d; certificate only 400 d: due at 370 d.
        let act = datetime!(2027-01-10 00:00 UTC);
        let mut k = key(1, KeyPurpose::IssuingCa, "devices", act);
        k.cert_not_after = Some(t(act) + 400 * DAY);
        let p = policy();
        let due = t(act) + 370 * DAY;
        assert_eq!(one(&[k.clone()], &p, due - S).action, Action::Wait);
        assert_eq!(one(&[k.clone()], &p, due - S).next_rotation_at, Some(due));
        let at = one(&[k.clone()], &p, due);
        assert_eq!(
            at.action,
            Action::Rotate {
                reason:
                    "certificate expires at 2028-02-14T00:00:00Z (in 30 d, within the 30 d margin)"
                        .into()
            }
        );
        let after = one(&[k.clone()], &p, t(act) + 401 * DAY);
        assert!(
            matches!(&after.action, Action::Rotate { reason } if reason.starts_with("certificate expired at")),
            "{after:?}"
        );
        // A certificate outliving the max age does not move the due date.
        k.cert_not_after = Some(t(act) + 5000 * DAY);
        assert_eq!(one(&[k], &p, 0).next_rotation_at, Some(t(act) + 1065 * DAY));
    }

    #[test]
    fn running_rotation_blocks_rotate_and_is_resumed() {
        let act = datetime!(2020-01-01 00:00 UTC);
        let k = [key(1, KeyPurpose::IssuingCa, "devices", act)];
        let now = t(datetime!(2027-01-01 00:00 UTC));
        let p = policy();
        assert_eq!(one(&k, &p, now).action.kind(), "rotate");
        for step in [
            RotationStep::Planned,
            RotationStep::KeyGenerated,
            RotationStep::Certified,
            RotationStep::Published,
            RotationStep::Activated,
        ] {
            for (next, says) in [(now, "resume now"), (now + 300, "next attempt not before")] {
                let mut r = rotation(9, KeyPurpose::IssuingCa, "devices", step);
                r.next_attempt_at = next;
                let plan = run(&k, &[r], &p, now);
                assert_eq!(plan.items.len(), 1, "{plan:#?}");
                let i = &plan.items[0];
                assert_eq!(
                    i.action,
                    Action::Resume {
                        rotation_id: id(9),
                        step
                    }
                );
                assert_eq!(i.next_rotation_at, Some(next));
                assert_eq!(i.key_id, Some(id(1)));
                assert!(i.note.contains(says), "{}", i.note);
            }
        }
        // A rotation of another pair does not block this one.
        let other = rotation(
            9,
            KeyPurpose::OcspSigning,
            "devices",
            RotationStep::Certified,
        );
        let plan = run(&k, &[other], &p, now);
        let kinds: Vec<_> = plan.items.iter().map(|i| i.action.kind()).collect();
        assert_eq!(kinds, ["rotate", "resume"]);
        // Finished rotations do not block.
        for step in [RotationStep::Destroyed, RotationStep::Abandoned] {
            let r = rotation(9, KeyPurpose::IssuingCa, "devices", step);
            let plan = run(&k, &[r], &p, now);
            assert_eq!(plan.items.len(), 1, "{plan:#?}");
            assert_eq!(plan.items[0].action.kind(), "rotate");
        }
    }

    #[test]
    fn running_rotation_without_an_active_key_is_still_resumed() {
        // The old key was marked compromised mid-rotation.
        let mut k = key(
            1,
            KeyPurpose::TlsServer,
            "server",
            datetime!(2027-01-01 00:00 UTC),
        );
        k.state = KeyState::Compromised;
        let mut r = rotation(
            5,
            KeyPurpose::TlsServer,
            "server",
            RotationStep::KeyGenerated,
        );
        r.old_key_id = Some(id(1));
        let plan = run(&[k], &[r], &policy(), t(datetime!(2027-02-01 00:00 UTC)));
        assert_eq!(plan.items.len(), 1);
        assert_eq!(plan.items[0].action.kind(), "resume");
        assert_eq!(plan.items[0].key_id, Some(id(1)));
        assert_eq!(plan.items[0].age_seconds, 0);
    }

    #[test]
    fn destroy_old_due_and_not_due() {
        let now = t(datetime!(2027-06-01 00:00 UTC));
        let new_key = key(
            2,
            KeyPurpose::TlsServer,
            "server",
            datetime!(2027-05-01 00:00 UTC),
        );
        let mut old_key = key(
            1,
            KeyPurpose::TlsServer,
            "server",
            datetime!(2027-02-01 00:00 UTC),
        );
        old_key.state = KeyState::Retired;
        let mut r = rotation(7, KeyPurpose::TlsServer, "server", RotationStep::Retired);
        r.old_key_id = Some(id(1));
        let keys = [new_key, old_key.clone()];
        let p = policy();
        for (after, expect) in [
            (Some(now - S), true),
            (Some(now), true),
            (Some(now + S), false),
            (None, false),
        ] {
            r.destroy_after = after;
            let plan = run(&keys, std::slice::from_ref(&r), &p, now);
            let kinds: Vec<_> = plan.items.iter().map(|i| i.action.kind()).collect();
            if expect {
                assert_eq!(kinds, ["wait", "destroy-old"], "{after:?}");
                let d = &plan.items[1];
                assert_eq!(d.action, Action::DestroyOld { rotation_id: id(7) });
                assert_eq!(d.key_id, Some(id(1)));
                assert_eq!(d.age_seconds, now - old_key.activated_at);
                assert_eq!(d.next_rotation_at, None);
            } else {
                assert_eq!(kinds, ["wait"], "{after:?}");
            }
        }
        // A retired rotation does not block a new rotation of the pair.
        r.destroy_after = Some(now);
        let late = now + 200 * DAY;
        let plan = run(&keys, std::slice::from_ref(&r), &p, late);
        let kinds: Vec<_> = plan.items.iter().map(|i| i.action.kind()).collect();
        assert_eq!(kinds, ["rotate", "destroy-old"]);
        assert_eq!(plan.items[0].key_id, Some(id(2)));
    }

    #[test]
    fn roots_are_manual() {
        let k = [key(
            1,
            KeyPurpose::RootCa,
            "root",
            datetime!(2000-01-01 00:00 UTC),
        )];
        let i = one(&k, &policy(), t(datetime!(2040-01-01 00:00 UTC)));
        assert_eq!(
            i.action,
            Action::Manual {
                reason: "roots are rotated by an operator".into()
            }
        );
        assert_eq!(i.next_rotation_at, None);
        let k = [key(
            1,
            KeyPurpose::Device,
            "d",
            datetime!(2000-01-01 00:00 UTC),
        )];
        assert_eq!(one(&k, &policy(), 0).action.kind(), "manual");
    }

    #[test]
    fn card_held_parent_needs_the_root_card() {
        let act = datetime!(2024-01-01 00:00 UTC);
        let mut k = key(1, KeyPurpose::IssuingCa, "devices", act);
        k.parent_on_card = true;
        let p = policy();
        let due = t(act) + 1065 * DAY;
        assert_eq!(one(&[k.clone()], &p, due - S).action, Action::Wait);
        let i = one(&[k], &p, due);
        match &i.action {
            Action::NeedsRootCard { reason } => {
                assert!(
                    reason.starts_with("key age 1065 d >= 1095 d - 30 d")
                        && reason.contains("keyward ca rotate devices"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(i.note.starts_with("needs the root card"), "{}", i.note);
    }

    #[test]
    fn automatic_false_and_missing_rules_are_manual() {
        let act = datetime!(2027-01-01 00:00 UTC);
        let k = [key(1, KeyPurpose::TlsServer, "server", act)];
        let p = with(KeyPurpose::TlsServer, rule(90, 14, false));
        let due = t(act) + 76 * DAY;
        let before = one(&k, &p, due - S);
        assert_eq!(before.next_rotation_at, Some(due));
        assert!(
            matches!(&before.action, Action::Manual { reason } if reason.contains("automatic = false") && reason.contains("due at")),
            "{before:?}"
        );
        let after = one(&k, &p, due);
        assert!(
            matches!(&after.action, Action::Manual { reason } if reason.contains("due since") && reason.contains("key age 76 d")),
            "{after:?}"
        );
        // No rule for the purpose.
        let k = [key(1, KeyPurpose::Audit, "audit", act)];
        let i = one(&k, &policy(), t(act) + 10_000 * DAY);
        assert!(
            matches!(&i.action, Action::Manual { reason } if reason.contains("[keys.audit]")),
            "{i:?}"
        );
        assert_eq!(i.next_rotation_at, None);
        // With a rule, the same key is planned.
        let p = with(KeyPurpose::Audit, rule(10, 1, true));
        assert_eq!(one(&k, &p, t(act) + 9 * DAY).action.kind(), "rotate");
    }

    #[test]
    fn only_active_keys_and_the_newest_per_pair() {
        let act = datetime!(2027-01-01 00:00 UTC);
        let now = t(act) + 80 * DAY;
        let mut ks = Vec::new();
        for (n, state) in [
            (1, KeyState::Generating),
            (2, KeyState::PreActive),
            (3, KeyState::Retired),
            (4, KeyState::Destroyed),
            (5, KeyState::Compromised),
        ] {
            let mut k = key(n, KeyPurpose::TlsServer, "server", act);
            k.state = state;
            ks.push(k);
        }
        assert!(run(&ks, &[], &policy(), now).items.is_empty());
        // Two active keys of one pair: one item, the newer key.
        ks.push(key(6, KeyPurpose::TlsServer, "server", act));
        ks.push(key(
            7,
            KeyPurpose::TlsServer,
            "server",
            datetime!(2027-03-01 00:00 UTC),
        ));
        let i = one(&ks, &policy(), now);
        assert_eq!(i.key_id, Some(id(7)));
        assert_eq!(i.action, Action::Wait);
    }

    #[test]
    fn order_is_deterministic() {
        let act = datetime!(2020-01-01 00:00 UTC);
        let mut keys = vec![
            key(1, KeyPurpose::TlsServer, "server", act),
            key(2, KeyPurpose::OcspSigning, "zeta", act),
            key(3, KeyPurpose::OcspSigning, "alpha", act),
            key(4, KeyPurpose::IssuingCa, "zeta", act),
            key(5, KeyPurpose::IssuingCa, "alpha", act),
            key(6, KeyPurpose::RootCa, "root", act),
        ];
        let mut r1 = rotation(20, KeyPurpose::IssuingCa, "alpha", RotationStep::Retired);
        r1.destroy_after = Some(0);
        let mut r2 = rotation(10, KeyPurpose::IssuingCa, "alpha", RotationStep::Retired);
        r2.destroy_after = Some(0);
        let mut rots = vec![r1, r2];
        let now = t(datetime!(2027-01-01 00:00 UTC));
        let a = run(&keys, &rots, &policy(), now);
        keys.reverse();
        rots.reverse();
        let b = run(&keys, &rots, &policy(), now);
        assert_eq!(a, b);
        let order: Vec<_> = a
            .items
            .iter()
            .map(|i| format!("{}/{}/{}", i.purpose, i.target, i.action.kind()))
            .collect();
        assert_eq!(
            order,
            [
                "root-ca/root/manual",
                "issuing-ca/alpha/rotate",
                "issuing-ca/alpha/destroy-old",
                "issuing-ca/alpha/destroy-old",
                "issuing-ca/zeta/rotate",
                "ocsp-signing/alpha/rotate",
                "ocsp-signing/zeta/rotate",
                "tls-server/server/rotate",
            ]
        );
        assert_eq!(
            a.items[2].action,
            Action::DestroyOld {
                rotation_id: id(10)
            }
        );
        assert_eq!(
            a.items[3].action,
            Action::DestroyOld {
                rotation_id: id(20)
            }
        );
    }

    #[test]
    fn empty_input_empty_plan() {
        assert_eq!(run(&[], &[], &policy(), 0), Plan::default());
    }

    #[test]
    fn plan_serializes_with_the_action_tag() {
        let k = [key(
            1,
            KeyPurpose::TlsServer,
            "server",
            datetime!(2027-01-01 00:00 UTC),
        )];
        let v = serde_json::to_value(run(&k, &[], &policy(), 0)).unwrap();
        assert_eq!(v["items"][0]["action"], "wait");
        assert_eq!(v["items"][0]["purpose"], "tls-server");
    }

    #[test]
    fn rotation_view_from_record() {
        let r = RotationRecord {
            id: id(3),
            purpose: KeyPurpose::OcspSigning,
            target: "devices".into(),
            step: RotationStep::Retired,
            old_key_id: Some(id(1)),
            new_key_id: Some(id(2)),
            new_serial: None,
            reason: "manual".into(),
            actor: "a".into(),
            destroy_after: Some(42),
            attempts: 0,
            last_error: None,
            next_attempt_at: 7,
            created_at: 0,
            updated_at: 0,
            finished_at: None,
        };
        let v = RotationView::from(&r);
        assert_eq!(
            (
                v.id,
                v.purpose,
                v.step,
                v.destroy_after,
                v.next_attempt_at,
                v.old_key_id
            ),
            (
                id(3),
                KeyPurpose::OcspSigning,
                RotationStep::Retired,
                Some(42),
                7,
                Some(id(1))
            )
        );
        assert_eq!(v.target, "devices");
    }

    #[test]
    fn schedule_and_plan_together() {
        // The job plans at the cron firing after the key became due.
        let p = policy();
        let act = datetime!(2027-01-01 10:00 UTC);
        let k = [key(1, KeyPurpose::TlsServer, "server", act)];
        let due = one(&k, &p, 0).next_rotation_at.unwrap();
        let due_t = OffsetDateTime::from_unix_timestamp(due).unwrap();
        let fire = p.schedule.next_after(due_t).unwrap();
        assert_eq!(fire, datetime!(2027-03-19 03:00 UTC));
        assert_eq!(one(&k, &p, t(fire)).action.kind(), "rotate");
        assert!(Schedule::parse("0 3 * * *").is_ok());
    }

    // ---- devices

    fn cert(not_after: OffsetDateTime, window: u32, notified: bool) -> DeviceCertView {
        DeviceCertView {
            not_after: t(not_after),
            renewal_window_days: window,
            notified,
        }
    }

    #[test]
    fn renewal_window_boundaries() {
        let na = datetime!(2027-09-01 00:00 UTC);
        let opens = t(datetime!(2027-08-02 00:00 UTC));
        assert_eq!(renewal_window_opens(t(na), 30), opens);
        let c = [cert(na, 30, false)];
        assert_eq!(plan_devices(&c, opens - S), DevicePlan::default());
        for now in [opens, opens + S, t(na) - S] {
            assert_eq!(
                plan_devices(&c, now),
                DevicePlan {
                    due: vec![0],
                    to_notify: vec![0]
                },
                "now {now}"
            );
        }
        // Expired: no longer renewable, no hint, no notification.
        assert_eq!(plan_devices(&c, t(na)), DevicePlan::default());
        assert_eq!(plan_devices(&c, t(na) + DAY), DevicePlan::default());
    }

    #[test]
    fn renewal_window_across_year_boundary_and_leap_day() {
        assert_eq!(
            renewal_window_opens(t(datetime!(2028-01-15 00:00 UTC)), 30),
            t(datetime!(2027-12-16 00:00 UTC))
        );
        assert_eq!(
            renewal_window_opens(t(datetime!(2028-03-01 00:00 UTC)), 1),
            t(datetime!(2028-02-29 00:00 UTC))
        );
        assert_eq!(
            renewal_window_opens(t(datetime!(2029-03-01 00:00 UTC)), 366),
            t(datetime!(2028-02-29 00:00 UTC))
        );
        let c = [cert(datetime!(2028-03-01 00:00 UTC), 1, false)];
        assert!(
            plan_devices(&c, t(datetime!(2028-02-28 23:59:59 UTC)))
                .due
                .is_empty()
        );
        assert_eq!(
            plan_devices(&c, t(datetime!(2028-02-29 00:00 UTC))).due,
            [0]
        );
    }

    #[test]
    fn notified_certificates_are_due_but_not_notified_again() {
        let now = t(datetime!(2027-06-01 00:00 UTC));
        let soon = datetime!(2027-06-10 00:00 UTC);
        let later = datetime!(2028-06-10 00:00 UTC);
        let certs = [
            cert(soon, 30, true),
            cert(later, 30, false),
            cert(soon, 30, false),
            cert(datetime!(2027-05-01 00:00 UTC), 30, false), // expired
            cert(soon, 5, false),                             // window not open yet
            cert(soon, 0, false),                             // no window at all
        ];
        let p = plan_devices(&certs, now);
        assert_eq!(p.due, [0, 2]);
        assert_eq!(p.to_notify, [2]);
        // Clock backwards: nothing opens early.
        assert_eq!(plan_devices(&certs, i64::MIN), DevicePlan::default());
        assert_eq!(renewal_window_opens(i64::MIN, u32::MAX), i64::MIN);
    }
}
