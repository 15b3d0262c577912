//! The `Store` conformance suite, written once and run against every backend:
//! `store_suite!(open)` expands to one `#[test]` per contract case.
//!
//! A backend proves itself by one file: an `open` function that makes a fresh,
//! empty, migrated store whose writer reads the given manual clock (and can
//! open a read-only handle on the same data), then
//!
//! ```ignore
//! #[macro_use]
//! #[path = "common/store_suite.rs"]
//! mod store_suite;
//! store_suite!(open);
//! ```
//!
//! The module must be named `store_suite` (the macro names its cases through it).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use futures::future::{BoxFuture, join_all};
use keyward::audit::Outcome;
use keyward::audit::{AUDIT_RECORD_VERSION, AuditDraft, AuditEvent, ChainVerifier, GENESIS_HASH};
use keyward::clock::{ManualClock, from_unix};
use keyward::store::*;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use uuid::Uuid;

/// Expands to one `#[test]` per case of the suite, each against a store made
/// by `$open` (a `fn(Arc<ManualClock>) -> BoxFuture<'static, Cx>`).
macro_rules! store_suite {
    ($open:path) => {
        store_suite!(@cases $open;
            audit_events_are_numbered_chained_and_timed,
            change_without_audit_event_is_refused,
            audit_chain_spans_concurrent_batches_and_keeps_source,
            audit_checkpoints_name_an_event_and_move_forward,
            audit_reports_filter_and_page_by_sequence,
            conflicting_change_applies_nothing_while_neighbours_commit,
            keys_insert_complete_and_change_state,
            cas_insert_and_list,
            admins_insert_lookup_and_refuse_duplicates,
            disable_admin_keeps_an_active_admin,
            disable_admin_race_leaves_one_active_admin,
            set_admin_role_checks_role_and_last_admin,
            registrations_round_trip_and_change_status,
            pending_cap_counts_pending_of_the_group,
            pending_cap_holds_under_concurrency,
            credentials_fetch_once_and_confirm_once,
            record_decision_checks_inside_the_transaction,
            record_decision_race_has_one_winner,
            approvals_of_disabled_admins_do_not_count,
            devices_and_certificates_round_trip,
            invitation_is_approved_then_redeemed_once,
            admin_request_conflicts,
            one_admin_invitations_die_once_a_second_admin_has_existed,
            disabling_an_admin_expires_its_open_requests,
            approvals_count_only_while_the_role_holds,
            registrations_paginate_in_both_orders_with_filters,
            pages_cover_rows_once_while_rows_are_inserted,
            page_limit_is_clamped,
            admins_and_admin_requests_paginate,
            expired_pending_registrations_oldest_first,
            pending_counts_per_group,
            counts_name_every_table,
            read_only_store_refuses_commits,
            missing_rows_read_as_none,
            certificates_supersede_revoke_hold_and_release,
            device_status_carries_its_certificates,
            crls_are_numbered_without_gaps_and_pruned,
            service_certificates_insert_and_retire,
            devices_and_certificates_paginate_and_filter,
            renewal_allowances_are_granted_replaced_and_used_once,
            revoked_keys_are_refused_inside_the_transaction,
            enrollment_tokens_count_uses_expire_and_revoke,
            enrollment_token_last_use_race_has_one_winner,
            identities_bind_to_one_device,
            jwt_ids_are_refused_when_replayed,
            reenrolment_revokes_the_older_certificates,
            server_keys_are_delivered_once,
            registrations_keep_their_attestation,
            broker_outbox_supersedes_completes_and_backs_off,
            rotations_advance_once_and_one_runs_per_key,
            ca_key_activation_is_conditional,
            crls_are_kept_per_signing_key,
            last_expiry_leaves_out_retired_and_ocsp_service_certificates,
            expiring_device_certificates_window_filters_and_pages,
            renewal_notices_are_marked_once_per_certificate,
            lease_is_held_by_one_holder_until_it_expires,
            lease_release_hands_over_at_once,
            lease_race_has_one_winner,
            lease_refuses_bad_input_and_read_only_stores,
            backups_record_replicate_verify_and_prune,
            set_key_handle_moves_a_key_or_is_missing,
            metrics_reads_count_the_queue_and_expiries,
        );
    };
    (@cases $open:path; $($case:ident),+ $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::store_suite::run($open, $crate::store_suite::$case);
            }
        )+
    };
}

/// Start of the manual clock: 2030-01-01T00:00:00Z.
pub const T0: i64 = 1_893_456_000;

/// A fresh store and what a case needs around it.
pub struct Cx {
    pub store: Arc<dyn Store>,
    pub clock: Arc<ManualClock>,
    read_only: Box<dyn Fn() -> BoxFuture<'static, Arc<dyn Store>> + Send + Sync>,
    _guard: Box<dyn std::any::Any + Send + Sync>,
}

impl Cx {
    /// `read_only` opens a second handle on the same data that may only read;
    /// `guard` lives as long as the case (a temp dir, a server).
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<ManualClock>,
        read_only: impl Fn() -> BoxFuture<'static, Arc<dyn Store>> + Send + Sync + 'static,
        guard: impl std::any::Any + Send + Sync,
    ) -> Self {
        Self {
            store,
            clock,
            read_only: Box::new(read_only),
            _guard: Box::new(guard),
        }
    }

    pub async fn read_only(&self) -> Arc<dyn Store> {
        (self.read_only)().await
    }
}

pub type Open = fn(Arc<ManualClock>) -> BoxFuture<'static, Cx>;

/// Runs one case on a multi-threaded runtime, so concurrent cases race for real.
pub fn run<F, Fut>(open: Open, case: F)
where
    F: FnOnce(Cx) -> Fut,
    Fut: Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let clock = Arc::new(ManualClock::new(from_unix(T0)));
        let cx = open(clock).await;
        case(cx).await;
    });
}

// ---------------------------------------------------------------- builders

fn short() -> String {
    Uuid::new_v4().simple().to_string()[..8].to_string()
}

pub fn admin(name: &str, role: Role) -> AdminRecord {
    AdminRecord {
        id: Uuid::now_v7(),
        name: name.to_string(),
        role,
        token_hash: Uuid::new_v4().as_bytes().to_vec(),
        disabled: false,
        created_at: T0,
        disabled_at: None,
    }
}

pub fn registration(group: &str, expires_at: i64) -> RegistrationRecord {
    RegistrationRecord {
        id: Uuid::now_v7(),
        device_id: Uuid::now_v7(),
        group: group.to_string(),
        status: RegistrationStatus::Pending,
        name: format!("device-{}", short()),
        device_type: None,
        location: None,
        firmware: None,
        csr_der: vec![0x30, 0x03, 0x02, 0x01, 0x01],
        key_algorithm: KeyAlgorithm::EcdsaP256,
        secret_hash: Uuid::new_v4().as_bytes().to_vec(),
        submitted_by: None,
        submitted_at: T0,
        expires_at,
        decided_at: None,
        certificate_serial: None,
        credentials_fetched_at: None,
        credentials_confirmed_at: None,
        client_addr: None,
        attestation: AttestationMethod::None,
        attested_identity: None,
        attestation_details: None,
        enrollment_token_id: None,
        token_minted_by: None,
        reenrollment: false,
        key_source: KeySource::Csr,
        age_recipient: None,
        server_key_id: None,
        key_delivered_at: None,
    }
}

pub fn enrollment_token(
    kind: EnrollmentTokenKind,
    created_by: Uuid,
    uses_allowed: u32,
    expires_at: i64,
) -> EnrollmentTokenRecord {
    EnrollmentTokenRecord {
        id: Uuid::now_v7(),
        kind,
        token_hash: Uuid::new_v4().as_bytes().to_vec(),
        group: Some("field".into()),
        device_id: None,
        device_name: None,
        uses_allowed,
        uses: 0,
        created_by,
        created_at: T0,
        expires_at,
        revoked_at: None,
        revoked_by: None,
        last_used_at: None,
    }
}

pub fn key(state: KeyState) -> KeyRecord {
    let id = Uuid::now_v7();
    KeyRecord {
        id,
        label: format!("key-{}", short()),
        purpose: KeyPurpose::IssuingCa,
        algorithm: KeyAlgorithm::EcdsaP384,
        backend: "pkcs11".into(),
        keystore: "default".into(),
        handle: KeyHandle(format!("pkcs11:token=t;id={}", id.simple())),
        public_key_der: if state == KeyState::Generating {
            Vec::new()
        } else {
            vec![0x30, 0x59, 1, 2, 3]
        },
        state,
        ca_name: None,
        created_at: T0,
        updated_at: T0,
    }
}

pub fn ca(name: &str, kind: CaKind, parent: Option<&str>, key_id: Uuid, at: i64) -> CaRecord {
    CaRecord {
        name: name.to_string(),
        kind,
        parent: parent.map(str::to_string),
        key_id,
        certificate_der: vec![0x30, 0x82, 0x01, 0x00, 7],
        created_at: at,
    }
}

pub fn device(group: &str) -> DeviceRecord {
    DeviceRecord {
        id: Uuid::now_v7(),
        name: format!("device-{}", short()),
        device_type: Some("sensor".into()),
        location: Some("hall 3".into()),
        firmware: Some("1.2.3".into()),
        group: group.to_string(),
        status: DeviceStatus::Active,
        created_at: T0,
        updated_at: T0,
    }
}

pub fn certificate(serial: &str, key_id: Uuid, device_id: Option<Uuid>) -> CertificateRecord {
    CertificateRecord {
        serial: serial.to_string(),
        device_id,
        issuer_ca: "issuing".into(),
        issuer_key_id: key_id,
        subject: "CN=device".into(),
        not_before: T0,
        not_after: T0 + 86_400,
        fingerprint_sha256: "ab".repeat(32),
        der: vec![0x30, 0x82, 9, 9],
        status: CertificateStatus::Valid,
        revoked_at: None,
        revocation_reason: None,
        created_at: T0,
        superseded_by: None,
        spki_sha256: Some(format!("{:0>64}", serial.to_lowercase())),
    }
}

pub fn invite(name: &str, requested_by: Uuid, expires_at: i64) -> AdminRequestRecord {
    AdminRequestRecord {
        id: Uuid::now_v7(),
        kind: AdminRequestKind::Invite,
        name: name.to_string(),
        admin_id: None,
        role: Role::Approver,
        requested_by,
        status: AdminRequestStatus::Pending,
        decided_by: None,
        requester_secret_hash: Some(vec![1; 32]),
        approver_secret_hash: None,
        client_addr: Some("192.0.2.10".into()),
        created_at: T0,
        expires_at,
        decided_at: None,
        redeemed_at: None,
    }
}

pub fn set_role_request(
    target: &AdminRecord,
    to: Role,
    requested_by: Uuid,
    expires_at: i64,
) -> AdminRequestRecord {
    AdminRequestRecord {
        kind: AdminRequestKind::SetRole,
        name: target.name.clone(),
        admin_id: Some(target.id),
        role: to,
        requester_secret_hash: None,
        client_addr: None,
        ..invite(&target.name, requested_by, expires_at)
    }
}

pub fn decision(
    registration: Uuid,
    admin: Uuid,
    decision: Decision,
    at: i64,
    expect: u32,
) -> Write {
    Write::RecordDecision {
        approval: ApprovalRecord {
            registration_id: registration,
            admin_id: admin,
            decision,
            comment: Some(format!("{decision} at {at}")),
            decided_at: at,
            counted: true,
            admin_role: Role::Approver,
        },
        expect_counted_approvals: expect,
        min_role: Role::Approver,
    }
}

pub fn ev(action: &str) -> AuditDraft {
    AuditDraft::new("test", action, "target")
}

/// A change of one write and one audit event.
pub fn one(w: Write) -> Change {
    Change::new().write(w).audit(ev("test.write"))
}

pub async fn ok(s: &dyn Store, w: Write) -> Vec<i64> {
    s.commit(one(w)).await.unwrap()
}

pub async fn ok_all(s: &dyn Store, ws: Vec<Write>) -> Vec<i64> {
    let mut change = Change::new().audit(ev("test.batch"));
    change.writes = ws;
    s.commit(change).await.unwrap()
}

pub fn conflict<T: std::fmt::Debug>(r: Result<T, StoreError>) -> Conflict {
    match r {
        Err(StoreError::Conflict(c)) => c,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

/// Row counts and the audit head: anything a change applies shows here.
pub async fn snapshot(s: &dyn Store) -> (BTreeMap<String, i64>, (i64, Vec<u8>)) {
    (s.counts().await.unwrap(), s.audit_head().await.unwrap())
}

/// Commits `w` after a harmless write (an auditor account, which counts
/// toward no guard) and with two audit events; the change must conflict and
/// leave nothing behind: not the harmless write, not its events.
pub async fn refused(s: &dyn Store, w: Write) -> Conflict {
    let before = snapshot(s).await;
    let canary = admin(&format!("canary-{}", short()), Role::Auditor);
    let r = s
        .commit(
            Change::new()
                .write(Write::InsertAdmin(canary.clone()))
                .write(w)
                .audit(ev("canary.one"))
                .audit(ev("canary.two")),
        )
        .await;
    let c = conflict(r);
    assert_eq!(
        snapshot(s).await,
        before,
        "a refused change left rows or audit events behind ({c:?})"
    );
    assert!(s.get_admin(canary.id).await.unwrap().is_none());
    c
}

pub async fn all_events(s: &dyn Store) -> Vec<AuditEvent> {
    s.audit_events(AuditQuery {
        from_seq: 1,
        limit: 1_000_000,
    })
    .await
    .unwrap()
}

/// Every stored event, verified by the chain verifier from the genesis hash
/// to the head the store reports.
pub async fn verified_chain(s: &dyn Store) -> Vec<AuditEvent> {
    let events = all_events(s).await;
    let mut v = ChainVerifier::default();
    for e in &events {
        v.push(e).unwrap_or_else(|b| panic!("chain broken: {b:?}"));
    }
    let (n, head) = s.audit_head().await.unwrap();
    assert_eq!(n, events.len() as i64);
    assert_eq!(v.head(), &head[..]);
    events
}

fn same<T: std::fmt::Debug>(got: &T, want: &T) {
    assert_eq!(format!("{got:?}"), format!("{want:?}"));
}

async fn reg(s: &dyn Store, id: Uuid) -> RegistrationRecord {
    s.get_registration(id).await.unwrap().unwrap()
}

async fn adm(s: &dyn Store, id: Uuid) -> AdminRecord {
    s.get_admin(id).await.unwrap().unwrap()
}

async fn req(s: &dyn Store, id: Uuid) -> AdminRequestRecord {
    s.get_admin_request(id).await.unwrap().unwrap()
}

fn insert_reg(r: &RegistrationRecord) -> Write {
    Write::InsertRegistration {
        record: Box::new(r.clone()),
        max_pending_in_group: None,
    }
}

fn set_status(id: Uuid, from: RegistrationStatus, to: RegistrationStatus, at: i64) -> Write {
    Write::SetRegistrationStatus {
        id,
        from,
        to,
        at,
        certificate_serial: None,
    }
}

fn disable(id: Uuid, at: i64) -> Write {
    Write::DisableAdmin { id, at }
}

fn fetched(id: Uuid, at: i64) -> Write {
    Write::MarkCredentialsFetched { id, at }
}

fn confirm(id: Uuid, at: i64) -> Write {
    Write::ConfirmCredentials { id, at }
}

fn expire(id: Uuid, at: i64) -> Write {
    Write::ExpireAdminRequest { id, at }
}

// ------------------------------------------------------- commits and audit

/// Events get consecutive sequence numbers across changes, chain from the
/// genesis hash, carry the writer clock's time, and read back by range.
pub async fn audit_events_are_numbered_chained_and_timed(cx: Cx) {
    let s = cx.store.as_ref();
    assert_eq!(s.audit_head().await.unwrap(), (0, GENESIS_HASH.to_vec()));
    // An audit-only change (e.g. a refused login) is a change like any other.
    let seqs = s
        .commit(Change::new().audit(ev("a.one")).audit(ev("a.two")))
        .await
        .unwrap();
    assert_eq!(seqs, vec![1, 2]);
    let seqs = ok(s, Write::InsertAdmin(admin("alice", Role::Admin))).await;
    assert_eq!(seqs, vec![3]);
    cx.clock.advance(time::Duration::seconds(5));
    let seqs = s.commit(Change::new().audit(ev("a.later"))).await.unwrap();
    assert_eq!(seqs, vec![4]);

    let events = verified_chain(s).await;
    let actions: Vec<_> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["a.one", "a.two", "test.write", "a.later"]);
    assert_eq!(events[0].prev_hash, GENESIS_HASH.to_vec());
    assert_eq!(events[0].at_ms, T0 * 1000);
    assert_eq!(events[2].at_ms, T0 * 1000);
    assert_eq!(events[3].at_ms, (T0 + 5) * 1000);
    assert!(events.iter().all(|e| e.version == AUDIT_RECORD_VERSION));

    let middle = s
        .audit_events(AuditQuery {
            from_seq: 2,
            limit: 2,
        })
        .await
        .unwrap();
    assert_eq!(middle.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(middle[0], events[1]);
    assert!(
        s.audit_events(AuditQuery {
            from_seq: 5,
            limit: 10
        })
        .await
        .unwrap()
        .is_empty()
    );
}

/// Reports: every filter, both orders, keyset pages that neither repeat
/// nor skip while events are appended, the limit clamp, and bad filters
/// refused (`InvalidArgument`) with nothing read or written.
pub async fn audit_reports_filter_and_page_by_sequence(cx: Cx) {
    let s = cx.store.as_ref();
    let draft = |actor: &str, action: &str, target: &str| AuditDraft::new(actor, action, target);
    // seq 1..=3 at T0, 4..=6 at T0+10 s, 7 at T0+20 s.
    for (a, act, t) in [
        ("admin:a", "key.generate", "k1"),
        ("admin:b", "key.destroy", "k1"),
        ("system", "keyring.load", "k2"),
    ] {
        s.commit(Change::new().audit(draft(a, act, t)))
            .await
            .unwrap();
    }
    cx.clock.advance(time::Duration::seconds(10));
    for (a, act, t) in [
        ("admin:a", "registration.approve", "r1"),
        ("admin:a", "key.generate", "k3"),
        ("system", "crl.publish", "k1"),
    ] {
        s.commit(Change::new().audit(draft(a, act, t)))
            .await
            .unwrap();
    }
    cx.clock.advance(time::Duration::seconds(10));
    s.commit(Change::new().audit(draft("admin:b", "key", "k1")))
        .await
        .unwrap();
    let head = s.audit_head().await.unwrap();

    let report = |f: AuditFilter| async move {
        let p = s.audit_report(f).await.unwrap();
        (p.items.iter().map(|e| e.seq).collect::<Vec<_>>(), p.next)
    };
    let all = |f: AuditFilter| AuditFilter { limit: 1000, ..f };
    assert_eq!(
        report(all(AuditFilter::default())).await,
        (vec![7, 6, 5, 4, 3, 2, 1], None)
    );
    assert_eq!(
        report(all(AuditFilter {
            order: Order::OldestFirst,
            ..Default::default()
        }))
        .await
        .0,
        vec![1, 2, 3, 4, 5, 6, 7]
    );
    // Exact action; the prefix form matches `key.` actions only (not
    // `keyring.load`, not the bare `key`).
    let action = |a: &str| {
        all(AuditFilter {
            action: Some(a.into()),
            ..Default::default()
        })
    };
    assert_eq!(report(action("key.generate")).await.0, vec![5, 1]);
    assert_eq!(report(action("key.*")).await.0, vec![5, 2, 1]);
    assert_eq!(report(action("key")).await.0, vec![7]);
    assert_eq!(report(action("nothing.*")).await.0, Vec::<i64>::new());
    assert_eq!(
        report(all(AuditFilter {
            actor: Some("admin:a".into()),
            ..Default::default()
        }))
        .await
        .0,
        vec![5, 4, 1]
    );
    assert_eq!(
        report(all(AuditFilter {
            target: Some("k1".into()),
            ..Default::default()
        }))
        .await
        .0,
        vec![7, 6, 2, 1]
    );
    // Time: since inclusive, until exclusive, in ms.
    let t0 = T0 * 1000;
    assert_eq!(
        report(all(AuditFilter {
            since_ms: Some(t0 + 10_000),
            until_ms: Some(t0 + 20_000),
            ..Default::default()
        }))
        .await
        .0,
        vec![6, 5, 4]
    );
    assert_eq!(
        report(all(AuditFilter {
            until_ms: Some(t0 + 1),
            ..Default::default()
        }))
        .await
        .0,
        vec![3, 2, 1]
    );
    // Filters combine.
    assert_eq!(
        report(all(AuditFilter {
            since_ms: Some(t0 + 10_000),
            actor: Some("admin:a".into()),
            action: Some("key.*".into()),
            target: Some("k3".into()),
            ..Default::default()
        }))
        .await
        .0,
        vec![5]
    );

    // Keyset pages of 2 over `key.*` + others, while events are appended:
    // newest first, appended events (above the first page) never show up
    // in later pages, nothing repeats or is skipped.
    let mut got = Vec::new();
    let mut after = None;
    loop {
        let (seqs, next) = report(AuditFilter {
            after,
            limit: 2,
            ..Default::default()
        })
        .await;
        got.extend(seqs);
        s.commit(Change::new().audit(draft("system", "late.event", "x")))
            .await
            .unwrap();
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(got, vec![7, 6, 5, 4, 3, 2, 1]);
    // Oldest first from a cursor: only what follows it.
    let (seqs, next) = report(AuditFilter {
        after: Some(5),
        limit: 2,
        order: Order::OldestFirst,
        ..Default::default()
    })
    .await;
    assert_eq!((seqs, next), (vec![6, 7], Some(7)));
    // Exactly a full last page: no cursor to an empty page.
    let (seqs, next) = report(AuditFilter {
        after: Some(3),
        limit: 3,
        ..Default::default()
    })
    .await;
    assert_eq!((seqs, next), (vec![2, 1], None));
    // The limit is clamped to 1..=1000.
    assert_eq!(
        report(AuditFilter {
            limit: 0,
            ..Default::default()
        })
        .await
        .0
        .len(),
        1
    );

    // Bad filters: refused, nothing written.
    let head = s.audit_head().await.unwrap().0.max(head.0);
    for bad in ["", "*", "key*", "key.*.x", ".*", "a*b"] {
        let e = s
            .audit_report(AuditFilter {
                action: Some(bad.into()),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::InvalidArgument(_)), "{bad}: {e:?}");
    }
    let e = s
        .audit_report(AuditFilter {
            since_ms: Some(5),
            until_ms: Some(5),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::InvalidArgument(_)), "{e:?}");
    assert_eq!(s.audit_head().await.unwrap().0, head);
}

/// No audit event, no change: the writes are refused and nothing is stored.
pub async fn change_without_audit_event_is_refused(cx: Cx) {
    let s = cx.store.as_ref();
    let before = snapshot(s).await;
    let a = admin("unaudited", Role::Admin);
    let err = s
        .commit(Change::new().write(Write::InsertAdmin(a.clone())))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Database(DatabaseError::Unaudited)),
        "a missing audit event is a caller error, not a conflict: {err:?}"
    );
    assert_eq!(err.code(), "change_unaudited");
    assert_eq!(snapshot(s).await, before);
    assert!(s.admin_by_name("unaudited").await.unwrap().is_none());
}

/// Many changes at once (which a backend may group into one transaction):
/// every change gets its own consecutive numbers, the whole trail verifies,
/// and `source`, `outcome` and `details` read back as written.
pub async fn audit_checkpoints_name_an_event_and_move_forward(cx: Cx) {
    use keyward::audit::Checkpoint;
    let s = cx.store.clone();
    let cp = |seq: i64, hash: Vec<u8>| Checkpoint {
        seq,
        hash,
        at_ms: T0 * 1000 + seq,
        key_id: Uuid::nil(),
        signature: vec![0x30, seq as u8],
    };
    assert!(s.last_audit_checkpoint().await.unwrap().is_none());
    // No event yet: nothing to name.
    let refused = s.record_audit_checkpoint(&cp(1, vec![0; 32])).await;
    assert!(
        matches!(refused, Err(StoreError::InvalidArgument(_))),
        "{refused:?}"
    );
    for i in 0..5 {
        s.commit(Change::new().audit(AuditDraft::new("system", "t.e", format!("{i}"))))
            .await
            .unwrap();
    }
    let events = s
        .audit_events(AuditQuery {
            from_seq: 1,
            limit: 10,
        })
        .await
        .unwrap();
    // A hash that is not the event's is refused; so is an unknown sequence.
    let wrong = s.record_audit_checkpoint(&cp(3, vec![7; 32])).await;
    assert!(
        matches!(wrong, Err(StoreError::InvalidArgument(_))),
        "{wrong:?}"
    );
    let beyond = s
        .record_audit_checkpoint(&cp(9, events[4].hash.clone()))
        .await;
    assert!(
        matches!(beyond, Err(StoreError::InvalidArgument(_))),
        "{beyond:?}"
    );
    s.record_audit_checkpoint(&cp(3, events[2].hash.clone()))
        .await
        .unwrap();
    // Not backwards, not the same sequence twice.
    for seq in [2, 3] {
        let r = s
            .record_audit_checkpoint(&cp(seq, events[seq as usize - 1].hash.clone()))
            .await;
        assert!(
            matches!(r, Err(StoreError::InvalidArgument(_))),
            "{seq}: {r:?}"
        );
    }
    s.record_audit_checkpoint(&cp(5, events[4].hash.clone()))
        .await
        .unwrap();
    let all = s.audit_checkpoints(0, 10).await.unwrap();
    assert_eq!(all.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![3, 5]);
    assert_eq!(all[0], cp(3, events[2].hash.clone()));
    assert_eq!(s.audit_checkpoints(4, 10).await.unwrap().len(), 1);
    assert_eq!(s.last_audit_checkpoint().await.unwrap().unwrap().seq, 5);
    // A read-only store refuses to record one.
    let ro = cx.read_only().await;
    assert!(
        ro.record_audit_checkpoint(&cp(6, vec![0; 32]))
            .await
            .is_err()
    );
}

pub async fn audit_chain_spans_concurrent_batches_and_keeps_source(cx: Cx) {
    let s = cx.store.clone();
    let tasks = (0..64usize).map(|i| {
        let s = s.clone();
        async move {
            let mut change = Change::new();
            for j in 0..(i % 3 + 1) {
                let source = i.is_multiple_of(2).then(|| format!("192.0.2.{i}"));
                change = change.audit(
                    AuditDraft::new(format!("admin:{i}"), &format!("c{i}.e{j}"), "target")
                        .source(source.as_deref())
                        .outcome(if j == 1 {
                            Outcome::Denied
                        } else {
                            Outcome::Success
                        })
                        .details(serde_json::json!({"i": i, "z": [1, 2], "a": {"b": "c"}})),
                );
            }
            (i, s.commit(change).await.unwrap())
        }
    });
    let results = join_all(tasks).await;
    let events = verified_chain(s.as_ref()).await;
    let total: usize = (0..64).map(|i| i % 3 + 1).sum();
    assert_eq!(events.len(), total);
    let mut seen = BTreeSet::new();
    for (i, seqs) in &results {
        assert_eq!(seqs.len(), i % 3 + 1);
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "one change's events are consecutive: {seqs:?}"
        );
        for (j, seq) in seqs.iter().enumerate() {
            assert!(seen.insert(*seq));
            let e = &events[(*seq - 1) as usize];
            assert_eq!(e.seq, *seq);
            assert_eq!(e.action, format!("c{i}.e{j}"));
            assert_eq!(e.actor, format!("admin:{i}"));
            let want_source = i.is_multiple_of(2).then(|| format!("192.0.2.{i}"));
            assert_eq!(e.source, want_source);
            assert_eq!(
                e.outcome,
                if j == 1 {
                    Outcome::Denied
                } else {
                    Outcome::Success
                }
            );
            assert_eq!(
                e.details,
                serde_json::json!({"a": {"b": "c"}, "i": i, "z": [1, 2]})
            );
            assert_eq!(e.version, keyward::audit::AUDIT_RECORD_VERSION);
        }
    }
    // The chain continues after the burst.
    let next = s.commit(Change::new().audit(ev("after"))).await.unwrap();
    assert_eq!(next, vec![total as i64 + 1]);
    verified_chain(s.as_ref()).await;
}

/// Conflicting changes committed among valid ones: each conflicting change
/// applies neither its writes nor its events; its neighbours all commit.
pub async fn conflicting_change_applies_nothing_while_neighbours_commit(cx: Cx) {
    let s = cx.store.clone();
    ok(s.as_ref(), Write::InsertAdmin(admin("taken", Role::Admin))).await;
    let tasks = (0..40usize).map(|i| {
        let s = s.clone();
        async move {
            let mut change =
                Change::new().write(Write::InsertAdmin(admin(&format!("n{i}"), Role::Approver)));
            if i % 2 == 1 {
                change = change.write(Write::InsertAdmin(admin("taken", Role::Approver)));
            }
            let change = change
                .audit(ev(&format!("c{i}.a")))
                .audit(ev(&format!("c{i}.b")));
            (i, s.commit(change).await)
        }
    });
    for (i, r) in join_all(tasks).await {
        if i.is_multiple_of(2) {
            assert_eq!(r.unwrap().len(), 2);
            assert!(s.admin_by_name(&format!("n{i}")).await.unwrap().is_some());
        } else {
            assert!(
                matches!(conflict(r), Conflict::Duplicate { entity: "admin" }),
                "change {i}"
            );
            assert!(s.admin_by_name(&format!("n{i}")).await.unwrap().is_none());
        }
    }
    let events = verified_chain(s.as_ref()).await;
    assert_eq!(events.len(), 1 + 20 * 2);
    assert!(events.iter().all(|e| {
        let i: usize = e
            .action
            .strip_prefix('c')
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        i.is_multiple_of(2)
    }));
    assert_eq!(s.counts().await.unwrap()["admins"], 21);
}

// -------------------------------------------------------------- keys, CAs

pub async fn keys_insert_complete_and_change_state(cx: Cx) {
    let s = cx.store.as_ref();
    let k = key(KeyState::Generating);
    ok(s, Write::InsertKey(k.clone())).await;
    same(&s.get_key(k.id).await.unwrap().unwrap(), &k);
    let c = refused(s, Write::InsertKey(k.clone())).await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");

    ok(
        s,
        Write::CompleteKeyGeneration {
            id: k.id,
            public_key_der: vec![0x30, 0x59, 9, 9],
            state: KeyState::Active,
            at: T0 + 5,
        },
    )
    .await;
    let got = s.get_key(k.id).await.unwrap().unwrap();
    assert_eq!(got.state, KeyState::Active);
    assert_eq!(got.public_key_der, vec![0x30, 0x59, 9, 9]);
    assert_eq!(got.updated_at, T0 + 5);
    let c = refused(
        s,
        Write::CompleteKeyGeneration {
            id: k.id,
            public_key_der: vec![1],
            state: KeyState::Active,
            at: T0 + 6,
        },
    )
    .await;
    assert!(
        matches!(c, Conflict::StateChanged { entity: "key", .. }),
        "{c:?}"
    );
    let c = refused(
        s,
        Write::CompleteKeyGeneration {
            id: Uuid::now_v7(),
            public_key_der: vec![1],
            state: KeyState::Active,
            at: T0 + 6,
        },
    )
    .await;
    assert!(
        matches!(c, Conflict::StateChanged { .. } | Conflict::Missing { .. }),
        "{c:?}"
    );

    ok(
        s,
        Write::SetKeyState {
            id: k.id,
            from: KeyState::Active,
            to: KeyState::Retired,
            at: T0 + 7,
        },
    )
    .await;
    let c = refused(
        s,
        Write::SetKeyState {
            id: k.id,
            from: KeyState::Active,
            to: KeyState::Destroyed,
            at: T0 + 8,
        },
    )
    .await;
    assert!(
        matches!(c, Conflict::StateChanged { entity: "key", .. }),
        "{c:?}"
    );
    let got = s.get_key(k.id).await.unwrap().unwrap();
    assert_eq!((got.state, got.updated_at), (KeyState::Retired, T0 + 7));
    assert_eq!(got.public_key_der, vec![0x30, 0x59, 9, 9]);

    let mut later = key(KeyState::Active);
    later.created_at = T0 + 100;
    later.ca_name = Some("root".into());
    later.keystore = "yubikey".into();
    ok(s, Write::InsertKey(later.clone())).await;
    let keys = s.list_keys().await.unwrap();
    assert_eq!(
        keys.iter().map(|k| k.id).collect::<Vec<_>>(),
        [k.id, later.id]
    );
    same(&keys[1], &later);
}

pub async fn cas_insert_and_list(cx: Cx) {
    let s = cx.store.as_ref();
    let rk = key(KeyState::Active);
    let ik = key(KeyState::Active);
    ok_all(
        s,
        vec![Write::InsertKey(rk.clone()), Write::InsertKey(ik.clone())],
    )
    .await;
    let root = ca("root", CaKind::Root, None, rk.id, T0);
    let issuing = ca("issuing", CaKind::Issuing, Some("root"), ik.id, T0 + 1);
    ok(s, Write::InsertCa(root.clone())).await;
    ok(s, Write::InsertCa(issuing.clone())).await;
    same(&s.get_ca("root").await.unwrap().unwrap(), &root);
    same(&s.get_ca("issuing").await.unwrap().unwrap(), &issuing);
    let all = s.list_cas().await.unwrap();
    assert_eq!(
        all.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["root", "issuing"]
    );
    let c = refused(
        s,
        Write::InsertCa(ca("root", CaKind::Root, None, rk.id, T0)),
    )
    .await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");
}

// ------------------------------------------------------------------ admins

pub async fn admins_insert_lookup_and_refuse_duplicates(cx: Cx) {
    let s = cx.store.as_ref();
    let alice = admin("alice", Role::Admin);
    let bob = admin("bob", Role::Approver);
    let carol = admin("carol", Role::Auditor);
    ok_all(
        s,
        vec![
            Write::InsertAdmin(alice.clone()),
            Write::InsertAdmin(bob.clone()),
            Write::InsertAdmin(carol.clone()),
        ],
    )
    .await;
    same(&adm(s, alice.id).await, &alice);
    same(&s.admin_by_name("bob").await.unwrap().unwrap(), &bob);
    same(
        &s.admin_by_token_hash(&carol.token_hash)
            .await
            .unwrap()
            .unwrap(),
        &carol,
    );
    assert!(s.admin_by_token_hash(&[7; 16]).await.unwrap().is_none());
    assert_eq!(s.count_active_admins().await.unwrap(), 1);

    let c = refused(s, Write::InsertAdmin(admin("alice", Role::Auditor))).await;
    assert_eq!(c, Conflict::Duplicate { entity: "admin" });
    let mut same_token = admin("alice-2", Role::Auditor);
    same_token.token_hash = alice.token_hash.clone();
    let c = refused(s, Write::InsertAdmin(same_token)).await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");

    let dave = admin("dave", Role::Admin);
    ok(s, Write::InsertAdmin(dave.clone())).await;
    assert_eq!(s.count_active_admins().await.unwrap(), 2);
    ok(s, disable(dave.id, T0 + 1)).await;
    assert_eq!(s.count_active_admins().await.unwrap(), 1);
}

pub async fn disable_admin_keeps_an_active_admin(cx: Cx) {
    let s = cx.store.as_ref();
    let alice = admin("alice", Role::Admin);
    let bob = admin("bob", Role::Approver);
    ok_all(
        s,
        vec![
            Write::InsertAdmin(alice.clone()),
            Write::InsertAdmin(bob.clone()),
        ],
    )
    .await;

    let c = refused(s, disable(alice.id, T0 + 1)).await;
    assert_eq!(c, Conflict::LastActiveAdmin);
    assert!(!adm(s, alice.id).await.disabled);

    // An approver is not counted by the guard.
    ok(s, disable(bob.id, T0 + 2)).await;
    let b = adm(s, bob.id).await;
    assert!(b.disabled);
    assert_eq!(b.disabled_at, Some(T0 + 2));
    let c = refused(s, disable(bob.id, T0 + 3)).await;
    assert!(
        matches!(
            c,
            Conflict::StateChanged {
                entity: "admin",
                ..
            }
        ),
        "{c:?}"
    );
    assert_eq!(adm(s, bob.id).await.disabled_at, Some(T0 + 2));

    let carol = admin("carol", Role::Admin);
    ok(s, Write::InsertAdmin(carol.clone())).await;
    ok(s, disable(alice.id, T0 + 4)).await;
    let c = refused(s, disable(carol.id, T0 + 5)).await;
    assert_eq!(c, Conflict::LastActiveAdmin);
    assert!(!adm(s, carol.id).await.disabled);
    assert_eq!(s.count_active_admins().await.unwrap(), 1);

    refused(s, disable(Uuid::now_v7(), T0 + 6)).await;
}

/// Two admins disable each other at the same moment, round after round:
/// exactly one change of each pair commits, one active admin remains.
pub async fn disable_admin_race_leaves_one_active_admin(cx: Cx) {
    let s = cx.store.clone();
    let mut survivor = admin("first", Role::Admin);
    ok(s.as_ref(), Write::InsertAdmin(survivor.clone())).await;
    for round in 0..12 {
        let other = admin(&format!("round-{round}"), Role::Admin);
        ok(s.as_ref(), Write::InsertAdmin(other.clone())).await;
        assert_eq!(s.count_active_admins().await.unwrap(), 2);
        let events_before = s.audit_head().await.unwrap().0;
        let disable = |id: Uuid| {
            let s = s.clone();
            tokio::spawn(async move { s.commit(one(Write::DisableAdmin { id, at: T0 })).await })
        };
        let (a, b) = (disable(other.id), disable(survivor.id));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        assert!(
            a.is_ok() != b.is_ok(),
            "round {round}: exactly one commit must succeed: {a:?} {b:?}"
        );
        let lost = if a.is_ok() { b } else { a };
        assert_eq!(conflict(lost), Conflict::LastActiveAdmin);
        assert_eq!(s.count_active_admins().await.unwrap(), 1);
        assert_eq!(s.audit_head().await.unwrap().0, events_before + 1);
        survivor = if adm(s.as_ref(), survivor.id).await.disabled {
            other
        } else {
            survivor
        };
        assert!(!adm(s.as_ref(), survivor.id).await.disabled);
    }
    verified_chain(s.as_ref()).await;
}

pub async fn set_admin_role_checks_role_and_last_admin(cx: Cx) {
    let s = cx.store.as_ref();
    let alice = admin("alice", Role::Admin);
    let bob = admin("bob", Role::Approver);
    ok_all(
        s,
        vec![
            Write::InsertAdmin(alice.clone()),
            Write::InsertAdmin(bob.clone()),
        ],
    )
    .await;
    let role = |id, from, to| Write::SetAdminRole {
        id,
        from,
        to,
        without_second_admin: false,
    };

    let c = refused(s, role(alice.id, Role::Admin, Role::Approver)).await;
    assert_eq!(c, Conflict::LastActiveAdmin);
    assert_eq!(adm(s, alice.id).await.role, Role::Admin);

    let c = refused(s, role(bob.id, Role::Admin, Role::Auditor)).await;
    assert!(
        matches!(
            c,
            Conflict::StateChanged {
                entity: "admin",
                ..
            }
        ),
        "{c:?}"
    );
    assert_eq!(adm(s, bob.id).await.role, Role::Approver);

    ok(s, role(bob.id, Role::Approver, Role::Admin)).await;
    ok(s, role(alice.id, Role::Admin, Role::Auditor)).await;
    assert_eq!(adm(s, alice.id).await.role, Role::Auditor);
    assert_eq!(adm(s, bob.id).await.role, Role::Admin);
    assert_eq!(s.count_active_admins().await.unwrap(), 1);

    ok(s, disable(alice.id, T0 + 1)).await;
    let c = refused(s, role(alice.id, Role::Auditor, Role::Approver)).await;
    assert!(
        matches!(
            c,
            Conflict::StateChanged {
                entity: "admin",
                ..
            }
        ),
        "{c:?}"
    );
    assert_eq!(adm(s, alice.id).await.role, Role::Auditor);
}

// ----------------------------------------------------------- registrations

pub async fn registrations_round_trip_and_change_status(cx: Cx) {
    let s = cx.store.as_ref();
    let submitter = admin("alice", Role::Admin);
    ok(s, Write::InsertAdmin(submitter.clone())).await;
    let mut r = registration("sensors", T0 + 3600);
    r.device_type = Some("meter".into());
    r.location = Some("Bâtiment B".into());
    r.firmware = Some("4.2".into());
    r.submitted_by = Some(submitter.id);
    r.client_addr = Some("2001:db8::7".into());
    ok(s, insert_reg(&r)).await;
    same(&reg(s, r.id).await, &r);

    // (Several registrations may name one device: re-enrollment; see
    // `registrations_keep_their_attestation`.)
    let mut same_id = registration("sensors", T0 + 3600);
    same_id.id = r.id;
    let c = refused(s, insert_reg(&same_id)).await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");

    use RegistrationStatus as S;
    ok(s, set_status(r.id, S::Pending, S::Approved, T0 + 10)).await;
    let got = reg(s, r.id).await;
    assert_eq!((got.status, got.decided_at), (S::Approved, Some(T0 + 10)));

    let c = refused(s, set_status(r.id, S::Pending, S::Denied, T0 + 11)).await;
    assert!(
        matches!(
            c,
            Conflict::StateChanged {
                entity: "registration",
                ..
            }
        ),
        "{c:?}"
    );
    assert_eq!(reg(s, r.id).await.status, S::Approved);

    ok(
        s,
        Write::SetRegistrationStatus {
            id: r.id,
            from: S::Approved,
            to: S::Issued,
            at: T0 + 20,
            certificate_serial: Some("0A1B2C".into()),
        },
    )
    .await;
    let got = reg(s, r.id).await;
    assert_eq!(got.status, S::Issued);
    assert_eq!(got.decided_at, Some(T0 + 10), "the decision time is kept");
    assert_eq!(got.certificate_serial.as_deref(), Some("0A1B2C"));

    let c = refused(s, set_status(Uuid::now_v7(), S::Pending, S::Denied, T0)).await;
    assert!(
        matches!(c, Conflict::StateChanged { .. } | Conflict::Missing { .. }),
        "{c:?}"
    );
}

fn capped(r: &RegistrationRecord, cap: u32) -> Write {
    Write::InsertRegistration {
        record: Box::new(r.clone()),
        max_pending_in_group: Some(cap),
    }
}

pub async fn pending_cap_counts_pending_of_the_group(cx: Cx) {
    let s = cx.store.as_ref();
    let a1 = registration("a", T0 + 60);
    ok(s, capped(&a1, 2)).await;
    ok(s, capped(&registration("a", T0 + 60), 2)).await;
    let c = refused(s, capped(&registration("a", T0 + 60), 2)).await;
    assert!(
        matches!(c, Conflict::LimitReached { limit: 2, .. }),
        "{c:?}"
    );
    // Other groups have their own count.
    ok(s, capped(&registration("b", T0 + 60), 2)).await;
    // Only pending registrations count.
    ok(
        s,
        set_status(
            a1.id,
            RegistrationStatus::Pending,
            RegistrationStatus::Denied,
            T0 + 1,
        ),
    )
    .await;
    ok(s, capped(&registration("a", T0 + 60), 2)).await;
    let c = refused(s, capped(&registration("a", T0 + 60), 2)).await;
    assert!(
        matches!(c, Conflict::LimitReached { limit: 2, .. }),
        "{c:?}"
    );
    // Without a cap there is no limit.
    ok(s, insert_reg(&registration("a", T0 + 60))).await;
    assert_eq!(s.pending_counts().await.unwrap()["a"], 3);
}

/// Cap 5, 20 inserts at once: exactly 5 land, 15 conflict and leave no event.
pub async fn pending_cap_holds_under_concurrency(cx: Cx) {
    let s = cx.store.clone();
    let tasks = (0..20).map(|_| {
        let s = s.clone();
        tokio::spawn(async move {
            s.commit(one(capped(&registration("burst", T0 + 60), 5)))
                .await
        })
    });
    let mut won = 0;
    for t in join_all(tasks).await {
        match t.unwrap() {
            Ok(_) => won += 1,
            Err(e) => assert!(matches!(
                conflict::<()>(Err(e)),
                Conflict::LimitReached { limit: 5, .. }
            )),
        }
    }
    assert_eq!(won, 5);
    assert_eq!(s.pending_counts().await.unwrap()["burst"], 5);
    let counts = s.counts().await.unwrap();
    assert_eq!((counts["registrations"], counts["audit_events"]), (5, 5));
    verified_chain(s.as_ref()).await;
}

pub async fn credentials_fetch_once_and_confirm_once(cx: Cx) {
    use RegistrationStatus as S;
    let s = cx.store.as_ref();
    let r = registration("g", T0 + 600);
    ok(s, insert_reg(&r)).await;
    let c = refused(s, fetched(r.id, T0 + 1)).await;
    assert!(
        matches!(
            c,
            Conflict::StateChanged {
                entity: "registration",
                ..
            }
        ),
        "{c:?}"
    );
    ok(s, set_status(r.id, S::Pending, S::Approved, T0 + 2)).await;
    ok(s, set_status(r.id, S::Approved, S::Issued, T0 + 3)).await;

    ok(s, fetched(r.id, T0 + 100)).await;
    assert_eq!(reg(s, r.id).await.credentials_fetched_at, Some(T0 + 100));
    // A re-fetch keeps the first delivery time.
    ok(s, fetched(r.id, T0 + 200)).await;
    assert_eq!(reg(s, r.id).await.credentials_fetched_at, Some(T0 + 100));

    ok(s, confirm(r.id, T0 + 300)).await;
    let got = reg(s, r.id).await;
    assert_eq!(got.credentials_confirmed_at, Some(T0 + 300));
    assert_eq!(got.credentials_fetched_at, Some(T0 + 100));
    refused(s, confirm(r.id, T0 + 400)).await;
    assert_eq!(reg(s, r.id).await.credentials_confirmed_at, Some(T0 + 300));

    // Confirming without a recorded fetch records both.
    let r2 = registration("g", T0 + 600);
    ok(s, insert_reg(&r2)).await;
    ok(s, set_status(r2.id, S::Pending, S::Approved, T0 + 2)).await;
    ok(s, set_status(r2.id, S::Approved, S::Issued, T0 + 3)).await;
    ok(s, confirm(r2.id, T0 + 50)).await;
    let got = reg(s, r2.id).await;
    assert_eq!(
        (got.credentials_fetched_at, got.credentials_confirmed_at),
        (Some(T0 + 50), Some(T0 + 50))
    );
    // A registration that is not issued cannot be confirmed.
    let r3 = registration("g", T0 + 600);
    ok(s, insert_reg(&r3)).await;
    refused(s, confirm(r3.id, T0 + 5)).await;
}

// ---------------------------------------------------------------- decisions

pub async fn record_decision_checks_inside_the_transaction(cx: Cx) {
    use Decision::{Approve, Deny};
    let s = cx.store.as_ref();
    let boss = admin("boss", Role::Admin);
    let [a1, a2, a3, a4] = ["a1", "a2", "a3", "a4"].map(|n| admin(n, Role::Approver));
    ok_all(
        s,
        [&boss, &a1, &a2, &a3, &a4]
            .iter()
            .map(|a| Write::InsertAdmin((*a).clone()))
            .collect(),
    )
    .await;
    let r = registration("g", T0 + 600);
    ok(s, insert_reg(&r)).await;

    ok(s, decision(r.id, a1.id, Approve, T0 + 1, 0)).await;
    let c = refused(s, decision(r.id, a1.id, Deny, T0 + 2, 1)).await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");
    let c = refused(s, decision(r.id, a2.id, Approve, T0 + 2, 0)).await;
    assert_eq!(c, Conflict::ApprovalsChanged);
    // A denial is recorded but is not an approval.
    ok(s, decision(r.id, a2.id, Deny, T0 + 2, 1)).await;
    let c = refused(s, decision(r.id, a3.id, Approve, T0 + 3, 2)).await;
    assert_eq!(c, Conflict::ApprovalsChanged);
    ok(s, decision(r.id, a3.id, Approve, T0 + 3, 1)).await;

    let got = s.approvals(r.id).await.unwrap();
    let summary: Vec<_> = got
        .iter()
        .map(|a| {
            (
                a.admin_id,
                a.decision,
                a.decided_at,
                a.counted,
                a.comment.clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                a1.id,
                Approve,
                T0 + 1,
                true,
                Some(format!("approve at {}", T0 + 1))
            ),
            (
                a2.id,
                Deny,
                T0 + 2,
                true,
                Some(format!("deny at {}", T0 + 2))
            ),
            (
                a3.id,
                Approve,
                T0 + 3,
                true,
                Some(format!("approve at {}", T0 + 3))
            ),
        ]
    );

    ok(s, disable(a4.id, T0 + 4)).await;
    let c = refused(s, decision(r.id, a4.id, Approve, T0 + 5, 2)).await;
    assert!(
        matches!(
            c,
            Conflict::StateChanged {
                entity: "admin",
                ..
            }
        ),
        "{c:?}"
    );
    let c = refused(s, decision(r.id, Uuid::now_v7(), Approve, T0 + 5, 2)).await;
    assert!(
        matches!(
            c,
            Conflict::StateChanged {
                entity: "admin",
                ..
            }
        ),
        "{c:?}"
    );

    let done = registration("g", T0 + 600);
    ok(s, insert_reg(&done)).await;
    ok(
        s,
        set_status(
            done.id,
            RegistrationStatus::Pending,
            RegistrationStatus::Denied,
            T0 + 6,
        ),
    )
    .await;
    let c = refused(s, decision(done.id, boss.id, Approve, T0 + 7, 0)).await;
    assert!(
        matches!(
            c,
            Conflict::StateChanged {
                entity: "registration",
                ..
            }
        ),
        "{c:?}"
    );
    let c = refused(s, decision(Uuid::now_v7(), boss.id, Approve, T0 + 7, 0)).await;
    assert!(
        matches!(
            c,
            Conflict::Missing {
                entity: "registration",
                ..
            }
        ),
        "{c:?}"
    );
    assert_eq!(s.approvals(r.id).await.unwrap().len(), 3);
}

/// Sixteen admins approve one registration at the same moment, each having
/// counted the same approvals: exactly one wins per round.
pub async fn record_decision_race_has_one_winner(cx: Cx) {
    let s = cx.store.clone();
    let admins: Vec<_> = (0..16)
        .map(|i| admin(&format!("a{i}"), Role::Approver))
        .collect();
    ok_all(
        s.as_ref(),
        admins
            .iter()
            .map(|a| Write::InsertAdmin(a.clone()))
            .collect(),
    )
    .await;
    let r = registration("g", T0 + 600);
    ok(s.as_ref(), insert_reg(&r)).await;
    let mut winners = Vec::new();
    for expect in 0..3u32 {
        let tasks = admins
            .iter()
            .filter(|a| !winners.contains(&a.id))
            .map(|a| {
                let (s, id) = (s.clone(), a.id);
                tokio::spawn(async move {
                    let w = decision(r.id, id, Decision::Approve, T0 + 1, expect);
                    (id, s.commit(one(w)).await)
                })
            })
            .collect::<Vec<_>>();
        let n = tasks.len();
        let mut won = Vec::new();
        for t in join_all(tasks).await {
            let (id, result) = t.unwrap();
            match result {
                Ok(_) => won.push(id),
                Err(e) => assert_eq!(conflict::<()>(Err(e)), Conflict::ApprovalsChanged),
            }
        }
        assert_eq!(won.len(), 1, "round {expect} of {n}: {won:?}");
        winners.extend(won);
    }
    let got = s.approvals(r.id).await.unwrap();
    assert_eq!(got.iter().map(|a| a.admin_id).collect::<Vec<_>>().len(), 3);
    assert!(
        got.iter()
            .all(|a| a.counted && winners.contains(&a.admin_id))
    );
    assert_eq!(s.audit_head().await.unwrap().0, 2 + 3);
}

pub async fn approvals_of_disabled_admins_do_not_count(cx: Cx) {
    let s = cx.store.as_ref();
    let boss = admin("boss", Role::Admin);
    let [a1, a2, a3] = ["a1", "a2", "a3"].map(|n| admin(n, Role::Approver));
    ok_all(
        s,
        [&boss, &a1, &a2, &a3]
            .iter()
            .map(|a| Write::InsertAdmin((*a).clone()))
            .collect(),
    )
    .await;
    let r = registration("g", T0 + 600);
    ok(s, insert_reg(&r)).await;
    ok(s, decision(r.id, a1.id, Decision::Approve, T0 + 1, 0)).await;
    assert!(s.approvals(r.id).await.unwrap()[0].counted);

    ok(s, disable(a1.id, T0 + 2)).await;
    let got = s.approvals(r.id).await.unwrap();
    assert_eq!(got.len(), 1, "the decision stays on record");
    assert!(!got[0].counted);

    let c = refused(s, decision(r.id, a2.id, Decision::Approve, T0 + 3, 1)).await;
    assert_eq!(c, Conflict::ApprovalsChanged);
    ok(s, decision(r.id, a2.id, Decision::Approve, T0 + 3, 0)).await;
    ok(s, decision(r.id, a3.id, Decision::Approve, T0 + 4, 1)).await;
    let counted: Vec<_> = s
        .approvals(r.id)
        .await
        .unwrap()
        .iter()
        .map(|a| (a.admin_id, a.counted))
        .collect();
    assert_eq!(counted, [(a1.id, false), (a2.id, true), (a3.id, true)]);
}

/// Approvals count only while their admin still holds the decision's
/// `min_role`; a decider below it is refused inside the transaction.
pub async fn approvals_count_only_while_the_role_holds(cx: Cx) {
    let s = cx.store.as_ref();
    let boss = admin("boss", Role::Admin);
    let [x, y] = ["x", "y"].map(|n| admin(n, Role::Admin));
    let low = admin("low", Role::Approver);
    ok_all(
        s,
        [&boss, &x, &y, &low]
            .iter()
            .map(|a| Write::InsertAdmin((*a).clone()))
            .collect(),
    )
    .await;
    let r = registration("g", T0 + 600);
    ok(s, insert_reg(&r)).await;
    let with_role = |admin: Uuid, at: i64, expect: u32| match decision(
        r.id,
        admin,
        Decision::Approve,
        at,
        expect,
    ) {
        Write::RecordDecision {
            approval,
            expect_counted_approvals,
            ..
        } => Write::RecordDecision {
            approval,
            expect_counted_approvals,
            min_role: Role::Admin,
        },
        other => other,
    };
    // An approver cannot decide where admins are needed.
    let c = refused(s, with_role(low.id, T0 + 1, 0)).await;
    assert!(
        matches!(
            c,
            Conflict::StateChanged {
                entity: "admin",
                ..
            }
        ),
        "{c:?}"
    );
    ok(s, with_role(x.id, T0 + 2, 0)).await;
    // x is lowered: its approval no longer counts toward an admins-only quorum.
    ok(
        s,
        Write::SetAdminRole {
            id: x.id,
            from: Role::Admin,
            to: Role::Approver,
            without_second_admin: false,
        },
    )
    .await;
    let c = refused(s, with_role(y.id, T0 + 3, 1)).await;
    assert_eq!(c, Conflict::ApprovalsChanged);
    ok(s, with_role(y.id, T0 + 3, 0)).await;
    let roles: Vec<_> = s
        .approvals(r.id)
        .await
        .unwrap()
        .iter()
        .map(|a| (a.admin_id, a.admin_role))
        .collect();
    assert_eq!(roles, [(x.id, Role::Approver), (y.id, Role::Admin)]);
}

/// An invitation nobody second-approved (the one-admin shortcut) cannot be
/// redeemed once two accounts have ever held role `admin`, even if the
/// second one was disabled since.
pub async fn one_admin_invitations_die_once_a_second_admin_has_existed(cx: Cx) {
    let s = cx.store.as_ref();
    let alice = admin("alice", Role::Admin);
    ok(s, Write::InsertAdmin(alice.clone())).await;
    assert_eq!(s.count_ever_admins().await.unwrap(), 1);
    let shortcut = |name: &str| AdminRequestRecord {
        status: AdminRequestStatus::Approved,
        decided_at: Some(T0),
        ..invite(name, alice.id, T0 + 3600)
    };
    let first = shortcut("bob");
    let second = shortcut("puppet");
    ok_all(
        s,
        vec![
            Write::InsertAdminRequest(first.clone()),
            Write::InsertAdminRequest(second.clone()),
        ],
    )
    .await;
    // While alice is the only admin ever, a shortcut invitation redeems.
    let bob = admin("bob", Role::Admin);
    ok(
        s,
        Write::RedeemInvitation {
            id: first.id,
            at: T0 + 1,
            admin: bob.clone(),
        },
    )
    .await;
    assert_eq!(s.count_ever_admins().await.unwrap(), 2);
    // Bob exists: the other shortcut invitation is dead, and stays dead
    // after bob is disabled.
    let puppet = admin("puppet", Role::Admin);
    let redeem = || Write::RedeemInvitation {
        id: second.id,
        at: T0 + 2,
        admin: puppet.clone(),
    };
    assert_eq!(refused(s, redeem()).await, Conflict::SecondAdminRequired);
    // Nor can alice raise someone to admin on her own any more.
    let carl = admin("carl", Role::Approver);
    ok(s, Write::InsertAdmin(carl.clone())).await;
    let raise = Write::SetAdminRole {
        id: carl.id,
        from: Role::Approver,
        to: Role::Admin,
        without_second_admin: true,
    };
    assert_eq!(refused(s, raise).await, Conflict::SecondAdminRequired);
    assert_eq!(adm(s, carl.id).await.role, Role::Approver);
    ok(s, disable(bob.id, T0 + 3)).await;
    assert_eq!(s.count_ever_admins().await.unwrap(), 2);
    assert!(s.get_admin(puppet.id).await.unwrap().is_none());
    // (disabling bob expired nothing of alice's: her requests stay open)
    assert_eq!(req(s, second.id).await.status, AdminRequestStatus::Approved);
    assert_eq!(refused(s, redeem()).await, Conflict::SecondAdminRequired);
}

/// Disabling an admin expires, in the same transaction, the open roster
/// requests it made or approved; other admins' requests stay open.
pub async fn disabling_an_admin_expires_its_open_requests(cx: Cx) {
    let s = cx.store.as_ref();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| admin(n, Role::Admin));
    ok_all(
        s,
        [&alice, &bob, &carol]
            .iter()
            .map(|a| Write::InsertAdmin((*a).clone()))
            .collect(),
    )
    .await;
    let by_bob = invite("dora", bob.id, T0 + 3600);
    let approved_by_bob = invite("erin", alice.id, T0 + 3600);
    let unrelated = invite("fay", alice.id, T0 + 3600);
    ok_all(
        s,
        vec![
            Write::InsertAdminRequest(by_bob.clone()),
            Write::InsertAdminRequest(approved_by_bob.clone()),
            Write::InsertAdminRequest(unrelated.clone()),
        ],
    )
    .await;
    approve_request(s, approved_by_bob.id, bob.id, T0 + 1).await;
    ok(s, disable(bob.id, T0 + 2)).await;
    assert_eq!(req(s, by_bob.id).await.status, AdminRequestStatus::Expired);
    assert_eq!(
        req(s, approved_by_bob.id).await.status,
        AdminRequestStatus::Expired
    );
    assert_eq!(
        req(s, unrelated.id).await.status,
        AdminRequestStatus::Pending
    );
    let c = refused(
        s,
        Write::RedeemInvitation {
            id: approved_by_bob.id,
            at: T0 + 3,
            admin: admin("erin", Role::Approver),
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    // A disabled admin cannot approve either.
    let c = refused(
        s,
        Write::DecideAdminRequest {
            id: unrelated.id,
            to: AdminRequestStatus::Approved,
            decided_by: bob.id,
            at: T0 + 4,
            approver_secret_hash: None,
        },
    )
    .await;
    assert!(
        matches!(
            c,
            Conflict::StateChanged {
                entity: "admin",
                ..
            }
        ),
        "{c:?}"
    );
    approve_request(s, unrelated.id, carol.id, T0 + 5).await;
}

// ------------------------------------------------------ devices, certificates

pub async fn devices_and_certificates_round_trip(cx: Cx) {
    let s = cx.store.as_ref();
    let k = key(KeyState::Active);
    let d = device("sensors");
    let c1 = certificate("0A1B2C3D4E5F", k.id, Some(d.id));
    let c2 = certificate("7F00", k.id, None);
    ok_all(
        s,
        vec![
            Write::InsertKey(k.clone()),
            Write::InsertDevice(d.clone()),
            Write::InsertCertificate(c1.clone()),
            Write::InsertCertificate(c2.clone()),
        ],
    )
    .await;
    same(&s.get_device(d.id).await.unwrap().unwrap(), &d);
    same(
        &s.get_certificate("0A1B2C3D4E5F").await.unwrap().unwrap(),
        &c1,
    );
    // Serials are upper-case hex; a lower-case query finds them too.
    same(
        &s.get_certificate("0a1b2c3d4e5f").await.unwrap().unwrap(),
        &c1,
    );
    same(&s.get_certificate("7F00").await.unwrap().unwrap(), &c2);

    let c = refused(s, Write::InsertDevice(d.clone())).await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");
    let c = refused(s, Write::InsertCertificate(certificate("7F00", k.id, None))).await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");
}

// ---------------------------------------------------------- admin requests

pub async fn invitation_is_approved_then_redeemed_once(cx: Cx) {
    let s = cx.store.as_ref();
    let alice = admin("alice", Role::Admin);
    let bob = admin("bob", Role::Admin);
    ok_all(
        s,
        vec![
            Write::InsertAdmin(alice.clone()),
            Write::InsertAdmin(bob.clone()),
        ],
    )
    .await;
    let r = invite("dora", alice.id, T0 + 3600);
    ok(s, Write::InsertAdminRequest(r.clone())).await;
    same(&req(s, r.id).await, &r);

    ok(
        s,
        Write::DecideAdminRequest {
            id: r.id,
            to: AdminRequestStatus::Approved,
            decided_by: bob.id,
            at: T0 + 10,
            approver_secret_hash: Some(vec![9; 32]),
        },
    )
    .await;
    let got = req(s, r.id).await;
    assert_eq!(got.status, AdminRequestStatus::Approved);
    assert_eq!(got.decided_by, Some(bob.id));
    assert_eq!(got.decided_at, Some(T0 + 10));
    assert_eq!(got.approver_secret_hash, Some(vec![9; 32]));
    assert_eq!(got.requester_secret_hash, Some(vec![1; 32]));

    let dora = admin("dora", Role::Approver);
    ok(
        s,
        Write::RedeemInvitation {
            id: r.id,
            at: T0 + 20,
            admin: dora.clone(),
        },
    )
    .await;
    let got = req(s, r.id).await;
    assert_eq!(got.status, AdminRequestStatus::Redeemed);
    assert_eq!(got.admin_id, Some(dora.id));
    assert_eq!(got.redeemed_at, Some(T0 + 20));
    same(&adm(s, dora.id).await, &dora);

    let again = admin("dora-2", Role::Approver);
    let c = refused(
        s,
        Write::RedeemInvitation {
            id: r.id,
            at: T0 + 30,
            admin: again.clone(),
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    assert!(s.get_admin(again.id).await.unwrap().is_none());
    assert_eq!(req(s, r.id).await.admin_id, Some(dora.id));
}

async fn approve_request(s: &dyn Store, id: Uuid, by: Uuid, at: i64) {
    ok(
        s,
        Write::DecideAdminRequest {
            id,
            to: AdminRequestStatus::Approved,
            decided_by: by,
            at,
            approver_secret_hash: None,
        },
    )
    .await;
}

pub async fn admin_request_conflicts(cx: Cx) {
    use AdminRequestStatus as S;
    let s = cx.store.as_ref();
    let alice = admin("alice", Role::Admin);
    let bob = admin("bob", Role::Admin);
    let gone = admin("gone", Role::Approver);
    ok_all(
        s,
        vec![
            Write::InsertAdmin(alice.clone()),
            Write::InsertAdmin(bob.clone()),
            Write::InsertAdmin(gone.clone()),
        ],
    )
    .await;
    ok(s, disable(gone.id, T0)).await;
    let exp = T0 + 3600;

    // One open invitation per name, pending or approved.
    let erin = invite("erin", alice.id, exp);
    ok(s, Write::InsertAdminRequest(erin.clone())).await;
    let c = refused(s, Write::InsertAdminRequest(invite("erin", bob.id, exp))).await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");
    approve_request(s, erin.id, bob.id, T0 + 1).await;
    let c = refused(s, Write::InsertAdminRequest(invite("erin", bob.id, exp))).await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");
    let fay = invite("fay", alice.id, exp);
    ok(s, Write::InsertAdminRequest(fay.clone())).await;
    ok(
        s,
        Write::DecideAdminRequest {
            id: fay.id,
            to: S::Denied,
            decided_by: bob.id,
            at: T0 + 2,
            approver_secret_hash: None,
        },
    )
    .await;
    assert_eq!(req(s, fay.id).await.status, S::Denied);
    ok(s, Write::InsertAdminRequest(invite("fay", alice.id, exp))).await;

    // One pending role change per admin.
    let promote = set_role_request(&gone, Role::Admin, alice.id, exp);
    let to_auditor = set_role_request(&bob, Role::Auditor, alice.id, exp);
    ok(s, Write::InsertAdminRequest(to_auditor.clone())).await;
    let c = refused(
        s,
        Write::InsertAdminRequest(set_role_request(&bob, Role::Approver, alice.id, exp)),
    )
    .await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");

    // Deciding: only by an active admin, only while pending.
    let c = refused(
        s,
        Write::DecideAdminRequest {
            id: to_auditor.id,
            to: S::Approved,
            decided_by: gone.id,
            at: T0 + 3,
            approver_secret_hash: None,
        },
    )
    .await;
    assert!(
        matches!(
            c,
            Conflict::StateChanged {
                entity: "admin",
                ..
            }
        ),
        "{c:?}"
    );
    assert_eq!(req(s, to_auditor.id).await.status, S::Pending);
    let c = refused(
        s,
        Write::DecideAdminRequest {
            id: erin.id,
            to: S::Denied,
            decided_by: alice.id,
            at: T0 + 3,
            approver_secret_hash: None,
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    assert_eq!(req(s, erin.id).await.status, S::Approved);

    // Redeeming: only an approved invitation, only before it expires, all or nothing.
    let gus = invite("gus", alice.id, T0 + 100);
    ok(s, Write::InsertAdminRequest(gus.clone())).await;
    let c = refused(
        s,
        Write::RedeemInvitation {
            id: gus.id,
            at: T0 + 5,
            admin: admin("gus", Role::Approver),
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "pending: {c:?}");
    approve_request(s, gus.id, bob.id, T0 + 6).await;
    for at in [T0 + 100, T0 + 101] {
        let c = refused(
            s,
            Write::RedeemInvitation {
                id: gus.id,
                at,
                admin: admin("gus", Role::Approver),
            },
        )
        .await;
        assert!(matches!(c, Conflict::StateChanged { .. }), "expired: {c:?}");
    }
    assert_eq!(req(s, gus.id).await.status, S::Approved);
    assert!(s.admin_by_name("gus").await.unwrap().is_none());

    let c = refused(
        s,
        Write::RedeemInvitation {
            id: erin.id,
            at: T0 + 7,
            admin: admin("alice", Role::Approver),
        },
    )
    .await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");
    let got = req(s, erin.id).await;
    assert_eq!((got.status, got.admin_id), (S::Approved, None));
    ok(
        s,
        Write::RedeemInvitation {
            id: erin.id,
            at: T0 + 8,
            admin: admin("erin", Role::Approver),
        },
    )
    .await;

    // A role change is applied, never redeemed.
    ok(s, Write::InsertAdminRequest(promote.clone())).await;
    approve_request(s, promote.id, alice.id, T0 + 9).await;
    let c = refused(
        s,
        Write::RedeemInvitation {
            id: promote.id,
            at: T0 + 10,
            admin: admin("sneaky", Role::Admin),
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");

    // Expiring: pending or approved requests only.
    ok(s, expire(to_auditor.id, T0 + 11)).await;
    ok(s, expire(gus.id, T0 + 12)).await;
    let got = req(s, to_auditor.id).await;
    assert_eq!((got.status, got.decided_at), (S::Expired, Some(T0 + 11)));
    let got = req(s, gus.id).await;
    assert_eq!((got.status, got.decided_at), (S::Expired, Some(T0 + 6)));
    for id in [to_auditor.id, erin.id, fay.id] {
        let c = refused(s, Write::ExpireAdminRequest { id, at: T0 + 13 }).await;
        assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    }
    // An expired role change no longer blocks a new one.
    ok(
        s,
        Write::InsertAdminRequest(set_role_request(&bob, Role::Approver, alice.id, exp)),
    )
    .await;
}

// --------------------------------------------------------------- pagination

/// Walks every page; checks page sizes and `next` on the way.
async fn walk<T, F, Fut>(limit: u32, order: Order, id_of: fn(&T) -> Uuid, mut read: F) -> Vec<Uuid>
where
    F: FnMut(PageRequest) -> Fut,
    Fut: Future<Output = Page<T>>,
{
    let mut out = Vec::new();
    let mut after = None;
    for _ in 0..10_000 {
        let page = read(PageRequest {
            after,
            limit,
            order,
        })
        .await;
        let ids: Vec<Uuid> = page.items.iter().map(id_of).collect();
        out.extend(&ids);
        match page.next {
            Some(next) => {
                assert_eq!(ids.len(), limit as usize, "only the last page may be short");
                assert_eq!(Some(next), ids.last().copied(), "`next` is the last item");
                after = Some(next);
            }
            None => return out,
        }
    }
    panic!("pagination does not end");
}

async fn reg_pages(
    s: &Arc<dyn Store>,
    filter: RegistrationFilter,
    limit: u32,
    order: Order,
) -> Vec<Uuid> {
    walk(
        limit,
        order,
        |r: &RegistrationRecord| r.id,
        |p| {
            let (s, f) = (s.clone(), filter.clone());
            async move { s.list_registrations(&f, &p).await.unwrap() }
        },
    )
    .await
}

pub async fn registrations_paginate_in_both_orders_with_filters(cx: Cx) {
    use RegistrationStatus as S;
    let s = &cx.store;
    let regs: Vec<_> = (0..25usize)
        .map(|i| {
            registration(
                if i.is_multiple_of(2) {
                    "north"
                } else {
                    "south"
                },
                T0 + 600,
            )
        })
        .collect();
    ok_all(s.as_ref(), regs.iter().map(insert_reg).collect()).await;
    ok_all(
        s.as_ref(),
        regs.iter()
            .step_by(3)
            .map(|r| set_status(r.id, S::Pending, S::Denied, T0 + 1))
            .collect(),
    )
    .await;
    let status = |r: &RegistrationRecord, i: usize| {
        if i.is_multiple_of(3) {
            S::Denied
        } else {
            r.status
        }
    };
    let filters = [
        RegistrationFilter::default(),
        RegistrationFilter {
            status: Some(S::Pending),
            group: None,
        },
        RegistrationFilter {
            status: None,
            group: Some("north".into()),
        },
        RegistrationFilter {
            status: Some(S::Denied),
            group: Some("south".into()),
        },
        RegistrationFilter {
            status: Some(S::Issued),
            group: None,
        },
        RegistrationFilter {
            status: None,
            group: Some("nowhere".into()),
        },
    ];
    for f in &filters {
        let mut want: Vec<Uuid> = regs
            .iter()
            .enumerate()
            .filter(|(i, r)| {
                f.status.is_none_or(|st| status(r, *i) == st)
                    && f.group.as_ref().is_none_or(|g| *g == r.group)
            })
            .map(|(_, r)| r.id)
            .collect();
        for limit in [1, 5, 7, 25, 100] {
            assert_eq!(
                reg_pages(s, f.clone(), limit, Order::OldestFirst).await,
                want,
                "oldest first, {f:?}, limit {limit}"
            );
        }
        want.reverse();
        for limit in [1, 5, 7, 25, 100] {
            assert_eq!(
                reg_pages(s, f.clone(), limit, Order::NewestFirst).await,
                want,
                "newest first, {f:?}, limit {limit}"
            );
        }
    }
    // The default order is newest first.
    let page = s
        .list_registrations(
            &RegistrationFilter::default(),
            &PageRequest {
                limit: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.items[0].id, regs[24].id);
}

/// Rows inserted between page reads neither repeat rows nor hide any row
/// that existed when the walk began.
pub async fn pages_cover_rows_once_while_rows_are_inserted(cx: Cx) {
    let s = &cx.store;
    let first: Vec<_> = (0..30).map(|_| registration("g", T0 + 600)).collect();
    ok_all(s.as_ref(), first.iter().map(insert_reg).collect()).await;
    for order in [Order::NewestFirst, Order::OldestFirst] {
        let existing: BTreeSet<Uuid> = {
            let all = reg_pages(s, RegistrationFilter::default(), 1000, order).await;
            all.into_iter().collect()
        };
        let mut seen = Vec::new();
        let mut added = BTreeSet::new();
        let mut after = None;
        loop {
            let page = s
                .list_registrations(
                    &RegistrationFilter::default(),
                    &PageRequest {
                        after,
                        limit: 7,
                        order,
                    },
                )
                .await
                .unwrap();
            seen.extend(page.items.iter().map(|r| r.id));
            let Some(next) = page.next else { break };
            after = Some(next);
            let more: Vec<_> = (0..3).map(|_| registration("g", T0 + 600)).collect();
            added.extend(more.iter().map(|r| r.id));
            ok_all(s.as_ref(), more.iter().map(insert_reg).collect()).await;
        }
        let unique: BTreeSet<Uuid> = seen.iter().copied().collect();
        assert_eq!(unique.len(), seen.len(), "{order:?}: a row repeated");
        assert!(existing.is_subset(&unique), "{order:?}: a row was skipped");
        match order {
            // New rows are newer than the cursor: they belong to page one.
            Order::NewestFirst => assert_eq!(unique, existing),
            // New rows come after the cursor: the walk reaches them.
            Order::OldestFirst => {
                let want: BTreeSet<Uuid> = existing.union(&added).copied().collect();
                assert_eq!(unique, want);
            }
        }
    }
}

pub async fn page_limit_is_clamped(cx: Cx) {
    let s = &cx.store;
    let regs: Vec<_> = (0..1005).map(|_| registration("g", T0 + 600)).collect();
    ok_all(s.as_ref(), regs.iter().map(insert_reg).collect()).await;
    let list = |after, limit| {
        let s = s.clone();
        async move {
            s.list_registrations(
                &RegistrationFilter::default(),
                &PageRequest {
                    after,
                    limit,
                    order: Order::OldestFirst,
                },
            )
            .await
            .unwrap()
        }
    };
    let p = list(None, 0).await;
    assert_eq!(p.items.len(), 1, "limit 0 reads as 1");
    assert_eq!(p.next, Some(regs[0].id));
    let p = list(None, 5000).await;
    assert_eq!(p.items.len(), 1000, "limit above 1000 reads as 1000");
    assert_eq!(p.next, Some(regs[999].id));
    let p = list(p.next, u32::MAX).await;
    assert_eq!(
        p.items.iter().map(|r| r.id).collect::<Vec<_>>(),
        regs[1000..].iter().map(|r| r.id).collect::<Vec<_>>()
    );
    assert_eq!(p.next, None);
}

pub async fn admins_and_admin_requests_paginate(cx: Cx) {
    let s = &cx.store;
    let admins: Vec<_> = (0..5)
        .map(|i| admin(&format!("a{i}"), Role::Admin))
        .collect();
    ok_all(
        s.as_ref(),
        admins
            .iter()
            .map(|a| Write::InsertAdmin(a.clone()))
            .collect(),
    )
    .await;
    let ids: Vec<Uuid> = admins.iter().map(|a| a.id).collect();
    for limit in [1, 2, 5, 6] {
        let got = walk(
            limit,
            Order::OldestFirst,
            |a: &AdminRecord| a.id,
            |p| {
                let s = s.clone();
                async move { s.list_admins(&p).await.unwrap() }
            },
        )
        .await;
        assert_eq!(got, ids);
        let got = walk(
            limit,
            Order::NewestFirst,
            |a: &AdminRecord| a.id,
            |p| {
                let s = s.clone();
                async move { s.list_admins(&p).await.unwrap() }
            },
        )
        .await;
        assert_eq!(got, ids.iter().rev().copied().collect::<Vec<_>>());
    }

    let reqs: Vec<_> = (0..6)
        .map(|i| invite(&format!("new{i}"), admins[0].id, T0 + 600))
        .collect();
    ok_all(
        s.as_ref(),
        reqs.iter()
            .map(|r| Write::InsertAdminRequest(r.clone()))
            .collect(),
    )
    .await;
    for r in reqs.iter().step_by(2) {
        approve_request(s.as_ref(), r.id, admins[1].id, T0 + 1).await;
    }
    let by_status = |status: Option<AdminRequestStatus>, order| {
        walk(
            2,
            order,
            |r: &AdminRequestRecord| r.id,
            move |p| {
                let s = s.clone();
                async move { s.list_admin_requests(status, &p).await.unwrap() }
            },
        )
    };
    let all: Vec<Uuid> = reqs.iter().map(|r| r.id).collect();
    assert_eq!(by_status(None, Order::OldestFirst).await, all);
    let approved: Vec<Uuid> = all.iter().step_by(2).copied().collect();
    assert_eq!(
        by_status(Some(AdminRequestStatus::Approved), Order::OldestFirst).await,
        approved
    );
    let pending: Vec<Uuid> = all.iter().skip(1).step_by(2).rev().copied().collect();
    assert_eq!(
        by_status(Some(AdminRequestStatus::Pending), Order::NewestFirst).await,
        pending
    );
    assert!(
        by_status(Some(AdminRequestStatus::Redeemed), Order::NewestFirst)
            .await
            .is_empty()
    );
}

// ------------------------------------------------------------------ sweeps

pub async fn expired_pending_registrations_oldest_first(cx: Cx) {
    let s = cx.store.as_ref();
    cx.clock.advance(time::Duration::seconds(1000));
    let now = keyward::clock::unix(keyward::clock::Clock::now(cx.clock.as_ref()));
    assert_eq!(now, T0 + 1000);
    let at_now = registration("g", now);
    let early = registration("g", T0 + 10);
    let later_exp = registration("g", T0 + 500);
    let future = registration("g", now + 1);
    let decided = registration("g", T0 + 5);
    ok_all(
        s,
        [&at_now, &early, &later_exp, &future, &decided]
            .iter()
            .map(|r| insert_reg(r))
            .collect(),
    )
    .await;
    ok(
        s,
        set_status(
            decided.id,
            RegistrationStatus::Pending,
            RegistrationStatus::Denied,
            T0 + 6,
        ),
    )
    .await;
    let ids = |v: Vec<RegistrationRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.expired_pending_registrations(now, 10).await.unwrap()),
        [early.id, later_exp.id, at_now.id]
    );
    assert_eq!(
        ids(s.expired_pending_registrations(now, 2).await.unwrap()),
        [early.id, later_exp.id]
    );
    assert!(
        s.expired_pending_registrations(T0, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn pending_counts_per_group(cx: Cx) {
    use RegistrationStatus as S;
    let s = cx.store.as_ref();
    assert!(s.pending_counts().await.unwrap().is_empty());
    let mut all = Vec::new();
    for (group, n) in [("a", 4), ("b", 1), ("c", 1)] {
        for _ in 0..n {
            all.push(registration(group, T0 + 60));
        }
    }
    ok_all(s, all.iter().map(insert_reg).collect()).await;
    // One of a denied, c's only one approved.
    ok(s, set_status(all[0].id, S::Pending, S::Denied, T0 + 1)).await;
    ok(s, set_status(all[5].id, S::Pending, S::Approved, T0 + 1)).await;
    let want: BTreeMap<String, i64> = [("a".to_string(), 3), ("b".to_string(), 1)].into();
    assert_eq!(s.pending_counts().await.unwrap(), want);
}

pub async fn counts_name_every_table(cx: Cx) {
    let s = cx.store.as_ref();
    let tables = [
        "admin_requests",
        "admins",
        "approvals",
        "audit_checkpoints",
        "audit_data_keys",
        "audit_events",
        "backup_replicas",
        "backups",
        "broker_outbox",
        "cas",
        "certificates",
        "crls",
        "devices",
        "keys",
        "registrations",
        "renewal_allowances",
        "rotations",
        "service_certificates",
    ];
    let counts = s.counts().await.unwrap();
    assert_eq!(
        counts.keys().map(String::as_str).collect::<Vec<_>>(),
        tables
    );
    assert!(counts.values().all(|n| *n == 0), "{counts:?}");

    let k = key(KeyState::Active);
    let a = admin("alice", Role::Admin);
    let r = registration("g", T0 + 60);
    let d = device("g");
    ok_all(
        s,
        vec![
            Write::InsertKey(k.clone()),
            Write::InsertCa(ca("root", CaKind::Root, None, k.id, T0)),
            Write::InsertAdmin(a.clone()),
            insert_reg(&r),
            decision(r.id, a.id, Decision::Approve, T0, 0),
            Write::InsertAdminRequest(invite("bob", a.id, T0 + 60)),
            Write::InsertDevice(d.clone()),
            Write::InsertCertificate(certificate("01", k.id, Some(d.id))),
            Write::PublishCrl {
                record: crl("issuing", 1, T0),
                keep: 10,
            },
            Write::InsertServiceCertificate(service_cert("01", k.id)),
            Write::AllowRenewal(allowance(d.id, a.id, T0 + 60)),
            Write::EnqueueBrokerUpdate {
                device_id: d.id,
                op: BrokerOp::Revoke,
                at: T0,
            },
            Write::InsertRotation(rotation(KeyPurpose::IssuingCa, "root", k.id, T0)),
            Write::RecordBackup {
                record: backup("keyward-counted.age", T0),
                locations: vec!["nas".into()],
            },
            Write::InsertAuditDataKey(keyward::store::records::AuditDataKeyRecord {
                id: Uuid::now_v7(),
                key_id: k.id,
                wrapped: vec![1, 2, 3],
                created_at: T0,
            }),
        ],
    )
    .await;
    // A checkpoint of the head the change above wrote (signature not
    // checked by the store: it authenticates itself to verifiers).
    let (seq, hash) = s.audit_head().await.unwrap();
    s.record_audit_checkpoint(&keyward::audit::Checkpoint {
        seq,
        hash,
        at_ms: T0 * 1000,
        key_id: k.id,
        signature: vec![0x30],
    })
    .await
    .unwrap();
    let counts = s.counts().await.unwrap();
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
}

// ------------------------------------------------------------------- misc

pub async fn read_only_store_refuses_commits(cx: Cx) {
    let s = cx.store.as_ref();
    let a = admin("alice", Role::Admin);
    ok(s, Write::InsertAdmin(a.clone())).await;
    let ro = cx.read_only().await;
    ro.health().await.unwrap();
    same(&ro.get_admin(a.id).await.unwrap().unwrap(), &a);
    assert_eq!(snapshot(ro.as_ref()).await, snapshot(s).await);
    let before = snapshot(s).await;
    let err = ro
        .commit(one(Write::InsertAdmin(admin("bob", Role::Admin))))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Database(DatabaseError::ReadOnly)),
        "{err:?}"
    );
    assert_eq!(err.code(), "store_read_only");
    let err = ro.commit(Change::new().audit(ev("x"))).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Database(DatabaseError::ReadOnly)),
        "{err:?}"
    );
    assert_eq!(snapshot(s).await, before);
    assert!(s.admin_by_name("bob").await.unwrap().is_none());
    // The writable store still writes.
    ok(s, Write::InsertAdmin(admin("carol", Role::Approver))).await;
}

pub async fn missing_rows_read_as_none(cx: Cx) {
    let s = cx.store.as_ref();
    s.health().await.unwrap();
    let id = Uuid::now_v7();
    assert!(s.get_key(id).await.unwrap().is_none());
    assert!(s.get_ca("none").await.unwrap().is_none());
    assert!(s.get_admin(id).await.unwrap().is_none());
    assert!(s.admin_by_name("none").await.unwrap().is_none());
    assert!(s.get_registration(id).await.unwrap().is_none());
    assert!(s.get_admin_request(id).await.unwrap().is_none());
    assert!(s.get_device(id).await.unwrap().is_none());
    assert!(s.get_certificate("00").await.unwrap().is_none());
    assert!(s.approvals(id).await.unwrap().is_empty());
    assert!(s.list_keys().await.unwrap().is_empty());
    assert!(s.list_cas().await.unwrap().is_empty());
    assert_eq!(s.count_active_admins().await.unwrap(), 0);
    let p = s.list_admins(&PageRequest::default()).await.unwrap();
    assert!(p.items.is_empty() && p.next.is_none());
}

// ------------------------------------------------------ certificate life

/// The signing key of the CRLs [`crl`] makes.
pub const CRL_KEY: Uuid = Uuid::from_u128(0x0c71);

pub fn crl(issuer: &str, number: i64, at: i64) -> CrlRecord {
    CrlRecord {
        issuer_ca: issuer.to_string(),
        issuer_key_id: CRL_KEY,
        number,
        this_update: at,
        next_update: at + 86_400,
        entries: 0,
        der: vec![0x30, 0x03, 2, 1, number as u8],
        created_at: at,
    }
}

pub fn service_cert(serial: &str, key_id: Uuid) -> ServiceCertificateRecord {
    ServiceCertificateRecord {
        serial: serial.to_string(),
        purpose: KeyPurpose::OcspSigning,
        issuer_ca: "issuing".into(),
        key_id,
        not_after: T0 + 86_400,
        retired_at: None,
        created_at: T0,
    }
}

async fn cert_of(s: &dyn Store, serial: &str) -> CertificateRecord {
    s.get_certificate(serial).await.unwrap().unwrap()
}

pub async fn certificates_supersede_revoke_hold_and_release(cx: Cx) {
    let s = cx.store.as_ref();
    let k = key(KeyState::Active);
    let d = device("g");
    ok_all(
        s,
        vec![
            Write::InsertKey(k.clone()),
            Write::InsertDevice(d.clone()),
            Write::InsertCertificate(certificate("0A01", k.id, Some(d.id))),
        ],
    )
    .await;
    // Renewal: the new certificate and the supersede in one change.
    ok_all(
        s,
        vec![
            Write::InsertCertificate(certificate("0A02", k.id, Some(d.id))),
            Write::SupersedeCertificate {
                serial: "0A01".into(),
                by: "0A02".into(),
                at: T0 + 10,
            },
        ],
    )
    .await;
    let old = cert_of(s, "0A01").await;
    assert_eq!(old.status, CertificateStatus::Superseded);
    assert_eq!(old.superseded_by.as_deref(), Some("0A02"));
    // Only a valid certificate can be superseded.
    let c = refused(
        s,
        Write::SupersedeCertificate {
            serial: "0A01".into(),
            by: "0A02".into(),
            at: T0 + 11,
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    let c = refused(
        s,
        Write::RevokeCertificate {
            serial: "FFFF".into(),
            reason: RevocationReason::KeyCompromise,
            at: T0,
        },
    )
    .await;
    assert!(matches!(c, Conflict::Missing { .. }), "{c:?}");

    // Hold, release (back to valid), hold again, then revoke for good.
    ok(
        s,
        Write::RevokeCertificate {
            serial: "0A02".into(),
            reason: RevocationReason::CertificateHold,
            at: T0 + 20,
        },
    )
    .await;
    let held = cert_of(s, "0A02").await;
    assert!(held.on_hold());
    assert_eq!(held.revoked_at, Some(T0 + 20));
    let c = refused(
        s,
        Write::RevokeCertificate {
            serial: "0A02".into(),
            reason: RevocationReason::CertificateHold,
            at: T0 + 21,
        },
    )
    .await;
    assert!(
        matches!(c, Conflict::StateChanged { .. }),
        "a hold on a hold: {c:?}"
    );
    ok(
        s,
        Write::ReleaseCertificateHold {
            serial: "0A02".into(),
            at: T0 + 30,
        },
    )
    .await;
    let released = cert_of(s, "0A02").await;
    assert_eq!(released.status, CertificateStatus::Valid);
    assert_eq!(
        (released.revoked_at, released.revocation_reason),
        (None, None)
    );
    let c = refused(
        s,
        Write::ReleaseCertificateHold {
            serial: "0A02".into(),
            at: T0 + 31,
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");

    // A superseded certificate on hold goes back to superseded.
    ok(
        s,
        Write::RevokeCertificate {
            serial: "0A01".into(),
            reason: RevocationReason::CertificateHold,
            at: T0 + 40,
        },
    )
    .await;
    ok(
        s,
        Write::ReleaseCertificateHold {
            serial: "0A01".into(),
            at: T0 + 41,
        },
    )
    .await;
    assert_eq!(
        cert_of(s, "0A01").await.status,
        CertificateStatus::Superseded
    );

    // Hold → permanent keeps the first revocation time; permanent is final.
    ok(
        s,
        Write::RevokeCertificate {
            serial: "0A02".into(),
            reason: RevocationReason::CertificateHold,
            at: T0 + 50,
        },
    )
    .await;
    ok(
        s,
        Write::RevokeCertificate {
            serial: "0A02".into(),
            reason: RevocationReason::KeyCompromise,
            at: T0 + 60,
        },
    )
    .await;
    let revoked = cert_of(s, "0A02").await;
    assert_eq!(revoked.status, CertificateStatus::Revoked);
    assert_eq!(
        revoked.revocation_reason,
        Some(RevocationReason::KeyCompromise)
    );
    assert_eq!(revoked.revoked_at, Some(T0 + 50));
    for w in [
        Write::RevokeCertificate {
            serial: "0A02".into(),
            reason: RevocationReason::Unspecified,
            at: T0 + 70,
        },
        Write::ReleaseCertificateHold {
            serial: "0A02".into(),
            at: T0 + 70,
        },
    ] {
        let c = refused(s, w).await;
        assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    }

    // The CRL entries: revoked, unexpired, of that issuer, in serial order.
    let entries = s.revoked_certificates("issuing", T0 + 100).await.unwrap();
    assert_eq!(
        entries,
        vec![RevokedEntry {
            serial: "0A02".into(),
            revoked_at: T0 + 50,
            reason: RevocationReason::KeyCompromise,
        }]
    );
    assert!(
        s.revoked_certificates("other", T0)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.revoked_certificates("issuing", T0 + 86_400)
            .await
            .unwrap()
            .is_empty(),
        "expired certificates leave the CRL"
    );
}

pub async fn device_status_carries_its_certificates(cx: Cx) {
    let s = cx.store.as_ref();
    let k = key(KeyState::Active);
    let d = device("g");
    let other = device("g");
    let mut expired = certificate("0B00", k.id, Some(d.id));
    expired.not_after = T0 + 5;
    let mut superseded = certificate("0B01", k.id, Some(d.id));
    superseded.status = CertificateStatus::Superseded;
    superseded.superseded_by = Some("0B02".into());
    ok_all(
        s,
        vec![
            Write::InsertKey(k.clone()),
            Write::InsertDevice(d.clone()),
            Write::InsertDevice(other.clone()),
            Write::InsertCertificate(expired),
            Write::InsertCertificate(superseded),
            Write::InsertCertificate(certificate("0B02", k.id, Some(d.id))),
            Write::InsertCertificate(certificate("0C01", k.id, Some(other.id))),
        ],
    )
    .await;
    let set = |from, to, reason, at| Write::SetDeviceStatus {
        id: d.id,
        from,
        to,
        reason,
        at,
    };
    use DeviceStatus::*;
    let hold = RevocationReason::CertificateHold;
    // Wrong `from`, unknown device, resume of an active device: refused.
    let c = refused(s, set(Suspended, Active, hold, T0 + 10)).await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    let c = refused(
        s,
        Write::SetDeviceStatus {
            id: Uuid::now_v7(),
            from: Active,
            to: Revoked,
            reason: RevocationReason::Unspecified,
            at: T0,
        },
    )
    .await;
    assert!(matches!(c, Conflict::Missing { .. }), "{c:?}");

    ok(s, set(Active, Suspended, hold, T0 + 10)).await;
    assert_eq!(s.get_device(d.id).await.unwrap().unwrap().status, Suspended);
    assert!(cert_of(s, "0B01").await.on_hold());
    assert!(cert_of(s, "0B02").await.on_hold());
    assert_eq!(
        cert_of(s, "0B00").await.status,
        CertificateStatus::Valid,
        "expired: untouched"
    );
    assert_eq!(
        cert_of(s, "0C01").await.status,
        CertificateStatus::Valid,
        "other device"
    );

    // A held certificate of a suspended device stays held: resume the device.
    let c = refused(
        s,
        Write::ReleaseCertificateHold {
            serial: "0B02".into(),
            at: T0 + 15,
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    ok(s, set(Suspended, Active, hold, T0 + 20)).await;
    assert_eq!(
        cert_of(s, "0B01").await.status,
        CertificateStatus::Superseded
    );
    assert_eq!(cert_of(s, "0B02").await.status, CertificateStatus::Valid);

    // Revocation cannot use certificate-hold, and is final.
    let c = refused(s, set(Active, Revoked, hold, T0 + 30)).await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    ok(s, set(Active, Suspended, hold, T0 + 30)).await;
    ok(
        s,
        set(Suspended, Revoked, RevocationReason::KeyCompromise, T0 + 40),
    )
    .await;
    for serial in ["0B01", "0B02"] {
        let c = cert_of(s, serial).await;
        assert_eq!(c.status, CertificateStatus::Revoked);
        assert_eq!(c.revocation_reason, Some(RevocationReason::KeyCompromise));
        assert_eq!(c.revoked_at, Some(T0 + 30), "revoked since the hold");
    }
    let c = refused(s, set(Revoked, Active, hold, T0 + 50)).await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    assert_eq!(
        s.revoked_certificates("issuing", T0 + 50)
            .await
            .unwrap()
            .len(),
        2
    );
}

pub async fn crls_are_numbered_without_gaps_and_pruned(cx: Cx) {
    let s = cx.store.as_ref();
    assert!(s.latest_crl("issuing").await.unwrap().is_none());
    let publish = |n: i64| Write::PublishCrl {
        record: crl("issuing", n, T0 + n),
        keep: 3,
    };
    let c = refused(s, publish(2)).await;
    assert!(
        matches!(c, Conflict::StateChanged { .. }),
        "the first CRL is number 1: {c:?}"
    );
    for n in 1..=5 {
        ok(s, publish(n)).await;
        let latest = s.latest_crl("issuing").await.unwrap().unwrap();
        assert_eq!(
            (latest.number, latest.der.clone()),
            (n, crl("issuing", n, 0).der)
        );
    }
    for n in [5, 4, 7] {
        let c = refused(s, publish(n)).await;
        assert!(matches!(c, Conflict::StateChanged { .. }), "{n}: {c:?}");
    }
    // Numbers are per issuer.
    ok(
        s,
        Write::PublishCrl {
            record: crl("root", 1, T0),
            keep: 3,
        },
    )
    .await;
    assert_eq!(
        s.counts().await.unwrap()["crls"],
        3 + 1,
        "keeps the newest 3 per issuer"
    );
}

pub async fn service_certificates_insert_and_retire(cx: Cx) {
    let s = cx.store.as_ref();
    let k = key(KeyState::Active);
    let mut tls = service_cert("0D02", k.id);
    tls.purpose = KeyPurpose::TlsServer;
    tls.created_at = T0 + 1;
    ok_all(
        s,
        vec![
            Write::InsertKey(k.clone()),
            Write::InsertCertificate(certificate("0D01", k.id, None)),
            Write::InsertCertificate(certificate("0D02", k.id, None)),
            Write::InsertServiceCertificate(service_cert("0D01", k.id)),
            Write::InsertServiceCertificate(tls.clone()),
        ],
    )
    .await;
    let ocsp = s
        .service_certificates(KeyPurpose::OcspSigning)
        .await
        .unwrap();
    assert_eq!(ocsp.len(), 1);
    assert_eq!((ocsp[0].serial.as_str(), ocsp[0].key_id), ("0D01", k.id));
    let c = refused(
        s,
        Write::InsertServiceCertificate(service_cert("0D01", k.id)),
    )
    .await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");
    ok(
        s,
        Write::RetireServiceCertificate {
            serial: "0D01".into(),
            at: T0 + 5,
        },
    )
    .await;
    assert!(
        s.service_certificates(KeyPurpose::OcspSigning)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.service_certificates(KeyPurpose::TlsServer)
            .await
            .unwrap()
            .len(),
        1
    );
    let c = refused(
        s,
        Write::RetireServiceCertificate {
            serial: "0D01".into(),
            at: T0 + 6,
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
}

pub async fn devices_and_certificates_paginate_and_filter(cx: Cx) {
    let s = cx.store.as_ref();
    let k = key(KeyState::Active);
    let mut writes = vec![Write::InsertKey(k.clone())];
    let mut devices = Vec::new();
    for i in 0..7 {
        let d = device(if i % 2 == 0 { "even" } else { "odd" });
        writes.push(Write::InsertDevice(d.clone()));
        writes.push(Write::InsertCertificate(certificate(
            &format!("0E{i:02}"),
            k.id,
            Some(d.id),
        )));
        devices.push(d);
    }
    ok_all(s, writes).await;
    ok(
        s,
        Write::SetDeviceStatus {
            id: devices[0].id,
            from: DeviceStatus::Active,
            to: DeviceStatus::Revoked,
            reason: RevocationReason::Unspecified,
            at: T0 + 1,
        },
    )
    .await;

    // Devices: pages of 3, newest first, cover all once.
    let mut seen = Vec::new();
    let mut page = PageRequest {
        limit: 3,
        ..Default::default()
    };
    loop {
        let p = s
            .list_devices(&DeviceFilter::default(), &page)
            .await
            .unwrap();
        seen.extend(p.items.iter().map(|d| d.id));
        match p.next {
            Some(n) => page.after = Some(n),
            None => break,
        }
    }
    let mut expected: Vec<Uuid> = devices.iter().map(|d| d.id).collect();
    expected.reverse();
    assert_eq!(seen, expected);
    let revoked = s
        .list_devices(
            &DeviceFilter {
                status: Some(DeviceStatus::Revoked),
                group: None,
            },
            &PageRequest {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        revoked.items.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![devices[0].id]
    );
    let odd = s
        .list_devices(
            &DeviceFilter {
                status: None,
                group: Some("odd".into()),
            },
            &PageRequest {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(odd.items.len(), 3);

    // Certificates: by serial, both orders, filters.
    let mut seen = Vec::new();
    let mut page = SerialPageRequest {
        limit: 2,
        order: Order::OldestFirst,
        ..Default::default()
    };
    loop {
        let p = s
            .list_certificates(&CertificateFilter::default(), &page)
            .await
            .unwrap();
        seen.extend(p.items.iter().map(|c| c.serial.clone()));
        match p.next {
            Some(n) => page.after = Some(n),
            None => break,
        }
    }
    assert_eq!(
        seen,
        (0..7).map(|i| format!("0E{i:02}")).collect::<Vec<_>>()
    );
    let newest = s
        .list_certificates(
            &CertificateFilter::default(),
            &SerialPageRequest {
                limit: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(newest.items[0].serial, "0E06");
    assert_eq!(newest.next.as_deref(), Some("0E06"));
    let of_device = s
        .list_certificates(
            &CertificateFilter {
                device: Some(devices[3].id),
                ..Default::default()
            },
            &SerialPageRequest {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(of_device.items.len(), 1);
    assert_eq!(of_device.items[0].serial, "0E03");
    let revoked = s
        .list_certificates(
            &CertificateFilter {
                status: Some(CertificateStatus::Revoked),
                issuer_ca: Some("issuing".into()),
                ..Default::default()
            },
            &SerialPageRequest {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(revoked.items.len(), 1);
    assert_eq!(revoked.items[0].serial, "0E00");

    let by_key = s
        .certificates_by_spki(&format!("{:0>64}", "0e03"))
        .await
        .unwrap();
    assert_eq!(by_key.len(), 1);
    assert_eq!(by_key[0].device_id, Some(devices[3].id));
    assert!(
        s.certificates_by_spki(&"f".repeat(64))
            .await
            .unwrap()
            .is_empty()
    );
}

pub fn allowance(device_id: Uuid, granted_by: Uuid, expires_at: i64) -> RenewalAllowanceRecord {
    RenewalAllowanceRecord {
        device_id,
        granted_by,
        granted_at: T0,
        expires_at,
    }
}

pub async fn renewal_allowances_are_granted_replaced_and_used_once(cx: Cx) {
    let s = cx.store.as_ref();
    let a = admin("alice", Role::Admin);
    let d = device("g");
    let suspended = device("g");
    ok_all(
        s,
        vec![
            Write::InsertAdmin(a.clone()),
            Write::InsertDevice(d.clone()),
            Write::InsertDevice(suspended.clone()),
        ],
    )
    .await;
    ok(
        s,
        Write::SetDeviceStatus {
            id: suspended.id,
            from: DeviceStatus::Active,
            to: DeviceStatus::Suspended,
            reason: RevocationReason::CertificateHold,
            at: T0,
        },
    )
    .await;
    // Unknown device: Missing; a device that is not active: StateChanged.
    let c = refused(
        s,
        Write::AllowRenewal(allowance(Uuid::now_v7(), a.id, T0 + 60)),
    )
    .await;
    assert!(matches!(c, Conflict::Missing { .. }), "{c:?}");
    let c = refused(
        s,
        Write::AllowRenewal(allowance(suspended.id, a.id, T0 + 60)),
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    assert_eq!(s.renewal_allowance(suspended.id).await.unwrap(), None);
    // Nothing to use yet.
    let consume = |at| Write::ConsumeRenewalAllowance {
        device_id: d.id,
        at,
    };
    let c = refused(s, consume(T0)).await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");

    ok(s, Write::AllowRenewal(allowance(d.id, a.id, T0 + 60))).await;
    // A second grant replaces the first (one open allowance per device).
    ok(s, Write::AllowRenewal(allowance(d.id, a.id, T0 + 120))).await;
    assert_eq!(
        s.renewal_allowance(d.id).await.unwrap(),
        Some(allowance(d.id, a.id, T0 + 120))
    );
    // Expired at use: refused, and kept as it was.
    let c = refused(s, consume(T0 + 120)).await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    assert!(s.renewal_allowance(d.id).await.unwrap().is_some());
    // Two uses racing: exactly one commits.
    let (x, y) = futures::join!(
        s.commit(Change::new().write(consume(T0 + 119)).audit(ev("use.a"))),
        s.commit(Change::new().write(consume(T0 + 119)).audit(ev("use.b"))),
    );
    assert_eq!(u8::from(x.is_ok()) + u8::from(y.is_ok()), 1, "{x:?} {y:?}");
    assert_eq!(s.renewal_allowance(d.id).await.unwrap(), None);
}

pub async fn revoked_keys_are_refused_inside_the_transaction(cx: Cx) {
    let s = cx.store.as_ref();
    let k = key(KeyState::Active);
    let d = device("g");
    let guard = |serial: &str| Write::RefuseRevokedKey {
        spki_sha256: certificate(serial, k.id, None).spki_sha256.unwrap(),
    };
    ok_all(
        s,
        vec![
            Write::InsertKey(k.clone()),
            Write::InsertDevice(d.clone()),
            Write::InsertCertificate(certificate("0F01", k.id, Some(d.id))),
            Write::InsertCertificate(certificate("0F02", k.id, Some(d.id))),
            Write::InsertCertificate(certificate("0F03", k.id, None)),
        ],
    )
    .await;
    // Unknown keys and keys of active devices pass (the guard writes nothing).
    let before = snapshot(s).await;
    s.commit(Change::new().write(guard("0FFF")).audit(ev("guard")))
        .await
        .unwrap();
    s.commit(Change::new().write(guard("0F01")).audit(ev("guard")))
        .await
        .unwrap();
    let rows = |mut c: BTreeMap<String, i64>| {
        c.remove("audit_events");
        c
    };
    assert_eq!(
        rows(snapshot(s).await.0),
        rows(before.0),
        "a guard writes no row"
    );
    // A hold alone does not bar the key; a permanent revocation does.
    ok(
        s,
        Write::RevokeCertificate {
            serial: "0F03".into(),
            reason: RevocationReason::CertificateHold,
            at: T0 + 1,
        },
    )
    .await;
    ok(s, guard("0F03")).await;
    ok(
        s,
        Write::RevokeCertificate {
            serial: "0F03".into(),
            reason: RevocationReason::KeyCompromise,
            at: T0 + 2,
        },
    )
    .await;
    assert_eq!(refused(s, guard("0F03")).await, Conflict::KeyRevoked);
    // A suspended device bars all of its keys, even unrevoked ones.
    ok(
        s,
        Write::SetDeviceStatus {
            id: d.id,
            from: DeviceStatus::Active,
            to: DeviceStatus::Suspended,
            reason: RevocationReason::CertificateHold,
            at: T0 + 3,
        },
    )
    .await;
    assert_eq!(refused(s, guard("0F01")).await, Conflict::KeyRevoked);
    assert_eq!(refused(s, guard("0F02")).await, Conflict::KeyRevoked);
}

// ------------------------------------------------------------- enrollment

fn consume(id: Uuid, kind: EnrollmentTokenKind, at: i64) -> Write {
    Write::ConsumeEnrollmentToken { id, kind, at }
}

pub async fn enrollment_tokens_count_uses_expire_and_revoke(cx: Cx) {
    let s = cx.store.as_ref();
    let a = admin("minter", Role::Admin);
    ok(s, Write::InsertAdmin(a.clone())).await;
    let t = enrollment_token(EnrollmentTokenKind::Bootstrap, a.id, 2, T0 + 3600);
    ok(s, Write::InsertEnrollmentToken(t.clone())).await;
    // Same secret hash twice: refused.
    let mut dup = enrollment_token(EnrollmentTokenKind::Bootstrap, a.id, 1, T0 + 3600);
    dup.token_hash = t.token_hash.clone();
    let c = refused(s, Write::InsertEnrollmentToken(dup)).await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");
    same(
        &s.enrollment_token_by_hash(&t.token_hash)
            .await
            .unwrap()
            .unwrap(),
        &t,
    );
    // The wrong kind does not consume it.
    let c = refused(s, consume(t.id, EnrollmentTokenKind::Reclaim, T0)).await;
    assert!(
        matches!(c, Conflict::TokenUnusable { reason: "unknown" }),
        "{c:?}"
    );
    ok(s, consume(t.id, EnrollmentTokenKind::Bootstrap, T0 + 1)).await;
    ok(s, consume(t.id, EnrollmentTokenKind::Bootstrap, T0 + 2)).await;
    let c = refused(s, consume(t.id, EnrollmentTokenKind::Bootstrap, T0 + 3)).await;
    assert!(
        matches!(c, Conflict::TokenUnusable { reason: "used up" }),
        "{c:?}"
    );
    let got = s.get_enrollment_token(t.id).await.unwrap().unwrap();
    assert_eq!((got.uses, got.last_used_at), (2, Some(T0 + 2)));

    let e = enrollment_token(EnrollmentTokenKind::Bootstrap, a.id, 5, T0 + 10);
    ok(s, Write::InsertEnrollmentToken(e.clone())).await;
    let c = refused(s, consume(e.id, EnrollmentTokenKind::Bootstrap, T0 + 10)).await;
    assert!(
        matches!(c, Conflict::TokenUnusable { reason: "expired" }),
        "{c:?}"
    );

    let r = enrollment_token(EnrollmentTokenKind::Bootstrap, a.id, 5, T0 + 3600);
    ok(s, Write::InsertEnrollmentToken(r.clone())).await;
    ok(
        s,
        Write::RevokeEnrollmentToken {
            id: r.id,
            by: a.id,
            at: T0 + 5,
        },
    )
    .await;
    let c = refused(
        s,
        Write::RevokeEnrollmentToken {
            id: r.id,
            by: a.id,
            at: T0 + 6,
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    let c = refused(s, consume(r.id, EnrollmentTokenKind::Bootstrap, T0 + 7)).await;
    assert!(
        matches!(c, Conflict::TokenUnusable { reason: "revoked" }),
        "{c:?}"
    );
    assert_eq!(s.get_enrollment_token(r.id).await.unwrap().unwrap().uses, 0);
    let c = refused(
        s,
        Write::RevokeEnrollmentToken {
            id: Uuid::now_v7(),
            by: a.id,
            at: T0,
        },
    )
    .await;
    assert!(matches!(c, Conflict::Missing { .. }), "{c:?}");

    let page = s
        .list_enrollment_tokens(
            &EnrollmentTokenFilter {
                kind: Some(EnrollmentTokenKind::Bootstrap),
                ..Default::default()
            },
            &PageRequest {
                after: None,
                limit: 10,
                order: Order::NewestFirst,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        page.items.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![r.id, e.id, t.id]
    );
}

pub async fn enrollment_token_last_use_race_has_one_winner(cx: Cx) {
    let s = cx.store.clone();
    let a = admin("minter", Role::Admin);
    ok(s.as_ref(), Write::InsertAdmin(a.clone())).await;
    let t = enrollment_token(EnrollmentTokenKind::Bootstrap, a.id, 3, T0 + 3600);
    ok(s.as_ref(), Write::InsertEnrollmentToken(t.clone())).await;
    let results = join_all((0..12).map(|i| {
        let s = s.clone();
        async move {
            s.commit(
                Change::new()
                    .write(consume(t.id, EnrollmentTokenKind::Bootstrap, T0 + i))
                    .audit(AuditDraft::new("test", "token.use", "t")),
            )
            .await
        }
    }))
    .await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
    assert_eq!(s.get_enrollment_token(t.id).await.unwrap().unwrap().uses, 3);
}

pub async fn identities_bind_to_one_device(cx: Cx) {
    let s = cx.store.as_ref();
    let (d1, d2) = (Uuid::now_v7(), Uuid::now_v7());
    let claim = |d: Uuid, at: i64| Write::ClaimIdentity {
        identity: "x509:abc:01".into(),
        device_id: d,
        method: AttestationMethod::X509,
        at,
    };
    assert_eq!(s.device_for_identity("x509:abc:01").await.unwrap(), None);
    ok(s, claim(d1, T0)).await;
    ok(s, claim(d1, T0 + 5)).await;
    let c = refused(s, claim(d2, T0 + 6)).await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    assert_eq!(
        s.device_for_identity("x509:abc:01").await.unwrap(),
        Some(d1)
    );
}

pub async fn jwt_ids_are_refused_when_replayed(cx: Cx) {
    let s = cx.store.as_ref();
    let rec = |jti: &str, exp: i64, at: i64| Write::RecordJwtId {
        issuer: "https://idp".into(),
        jti: jti.into(),
        expires_at: exp,
        at,
    };
    ok(s, rec("a", T0 + 100, T0)).await;
    let c = refused(s, rec("a", T0 + 100, T0 + 1)).await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");
    // Another issuer's jti of the same value is not a replay.
    ok(
        s,
        Write::RecordJwtId {
            issuer: "https://other".into(),
            jti: "a".into(),
            expires_at: T0 + 100,
            at: T0,
        },
    )
    .await;
    // Once the token has expired its record is purged (a token that old is
    // refused by its exp anyway).
    ok(s, rec("a", T0 + 500, T0 + 101)).await;
}

pub async fn reenrolment_revokes_the_older_certificates(cx: Cx) {
    let s = cx.store.as_ref();
    let k = key(KeyState::Active);
    let d = device("field");
    let old = certificate("01AA", k.id, Some(d.id));
    let new = certificate("02BB", k.id, Some(d.id));
    ok_all(
        s,
        vec![
            Write::InsertKey(k.clone()),
            Write::InsertDevice(d.clone()),
            Write::InsertCertificate(old.clone()),
        ],
    )
    .await;
    ok_all(
        s,
        vec![
            Write::InsertCertificate(new.clone()),
            Write::ReenrollDevice {
                id: d.id,
                group: "plant".into(),
                name: "renamed".into(),
                keep_serial: "02BB".into(),
                at: T0 + 10,
            },
        ],
    )
    .await;
    let o = s.get_certificate("01AA").await.unwrap().unwrap();
    assert_eq!(o.status, CertificateStatus::Revoked);
    assert_eq!(o.revocation_reason, Some(RevocationReason::Superseded));
    assert_eq!(
        s.get_certificate("02BB").await.unwrap().unwrap().status,
        CertificateStatus::Valid
    );
    let got = s.get_device(d.id).await.unwrap().unwrap();
    assert_eq!(
        (got.group.as_str(), got.name.as_str()),
        ("plant", "renamed")
    );
    // No device: Missing; a suspended one: refused, nothing changed.
    let c = refused(
        s,
        Write::ReenrollDevice {
            id: Uuid::now_v7(),
            group: "g".into(),
            name: "n".into(),
            keep_serial: "00".into(),
            at: T0,
        },
    )
    .await;
    assert!(matches!(c, Conflict::Missing { .. }), "{c:?}");
    ok(
        s,
        Write::SetDeviceStatus {
            id: d.id,
            from: DeviceStatus::Active,
            to: DeviceStatus::Suspended,
            reason: RevocationReason::CertificateHold,
            at: T0 + 20,
        },
    )
    .await;
    let c = refused(
        s,
        Write::ReenrollDevice {
            id: d.id,
            group: "plant".into(),
            name: "again".into(),
            keep_serial: "02BB".into(),
            at: T0 + 30,
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    assert_eq!(s.get_device(d.id).await.unwrap().unwrap().name, "renamed");
}

pub async fn server_keys_are_delivered_once(cx: Cx) {
    let s = cx.store.as_ref();
    let mut r = registration("field", T0 + 60);
    r.key_source = KeySource::Server;
    r.csr_der = Vec::new();
    ok(s, insert_reg(&r)).await;
    // No key yet: nothing to deliver.
    let c = refused(
        s,
        Write::MarkKeyDelivered {
            registration_id: r.id,
            at: T0,
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    let k = key(KeyState::Active);
    ok_all(
        s,
        vec![
            Write::InsertKey(k.clone()),
            Write::SetServerKey {
                registration_id: r.id,
                key_id: k.id,
            },
        ],
    )
    .await;
    let c = refused(
        s,
        Write::SetServerKey {
            registration_id: r.id,
            key_id: Uuid::now_v7(),
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    ok(
        s,
        Write::MarkKeyDelivered {
            registration_id: r.id,
            at: T0 + 1,
        },
    )
    .await;
    let c = refused(
        s,
        Write::MarkKeyDelivered {
            registration_id: r.id,
            at: T0 + 2,
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    let got = s.get_registration(r.id).await.unwrap().unwrap();
    assert_eq!(
        (got.server_key_id, got.key_delivered_at),
        (Some(k.id), Some(T0 + 1))
    );
}

pub async fn registrations_keep_their_attestation(cx: Cx) {
    let s = cx.store.as_ref();
    let a = admin("minter", Role::Admin);
    ok(s, Write::InsertAdmin(a.clone())).await;
    let mut r = registration("field", T0 + 60);
    r.attestation = AttestationMethod::Jwt;
    r.attested_identity = Some("jwt:https://idp:440101".into());
    r.attestation_details = Some(serde_json::json!({ "jti": "j1" }));
    r.enrollment_token_id = Some(Uuid::now_v7());
    r.token_minted_by = Some(a.id);
    r.reenrollment = true;
    r.age_recipient = Some("age1xyz".into());
    ok(s, insert_reg(&r)).await;
    // A second registration for the same device is allowed (re-enrollment).
    let mut again = registration("field", T0 + 60);
    again.device_id = r.device_id;
    ok(s, insert_reg(&again)).await;
    same(&s.get_registration(r.id).await.unwrap().unwrap(), &r);
}

// ------------------------------------------------------------ broker outbox

fn rule(topic: &str, access: BrokerAccess) -> BrokerAclRule {
    BrokerAclRule {
        topic: topic.to_string(),
        access,
    }
}

pub async fn broker_outbox_supersedes_completes_and_backs_off(cx: Cx) {
    let s = cx.store.as_ref();
    let (a, b) = (device("g"), device("g"));
    ok_all(
        s,
        vec![
            Write::InsertDevice(a.clone()),
            Write::InsertDevice(b.clone()),
        ],
    )
    .await;
    assert_eq!(s.broker_outbox_len().await.unwrap(), 0);
    assert!(s.pending_broker_updates(T0, 10).await.unwrap().is_empty());

    // An unknown device: Missing, nothing queued.
    let c = refused(
        s,
        Write::EnqueueBrokerUpdate {
            device_id: Uuid::now_v7(),
            op: BrokerOp::Revoke,
            at: T0,
        },
    )
    .await;
    assert!(matches!(c, Conflict::Missing { .. }), "{c:?}");
    assert_eq!(s.broker_outbox_len().await.unwrap(), 0);

    let rules = vec![
        rule("dt/v1/a/#", BrokerAccess::Publish),
        rule("cmd/v1/a/req", BrokerAccess::PublishSubscribe),
    ];
    let grant = |device_id, at| Write::EnqueueBrokerUpdate {
        device_id,
        op: BrokerOp::Grant(rules.clone()),
        at,
    };
    ok(s, grant(a.id, T0)).await;
    ok(
        s,
        Write::EnqueueBrokerUpdate {
            device_id: b.id,
            op: BrokerOp::Grant(Vec::new()),
            at: T0 + 1,
        },
    )
    .await;
    // Due in enqueue order, rules round-tripped; not due before `at`.
    let due = s.pending_broker_updates(T0 + 1, 10).await.unwrap();
    assert_eq!(
        due.iter().map(|e| e.device_id).collect::<Vec<_>>(),
        [a.id, b.id]
    );
    assert_eq!(due[0].op, BrokerOp::Grant(rules.clone()));
    assert_eq!(due[1].op, BrokerOp::Grant(Vec::new()));
    assert_eq!((due[0].attempts, due[0].last_error.clone()), (0, None));
    assert_eq!(due[0].created_at, T0);
    assert!(due[0].id < due[1].id);
    assert_eq!(s.pending_broker_updates(T0, 10).await.unwrap().len(), 1);
    assert_eq!(s.pending_broker_updates(T0 + 1, 1).await.unwrap().len(), 1);

    // A later op for the same device supersedes the pending one.
    let old_a = due[0].clone();
    ok(
        s,
        Write::EnqueueBrokerUpdate {
            device_id: a.id,
            op: BrokerOp::Revoke,
            at: T0 + 2,
        },
    )
    .await;
    assert_eq!(s.broker_outbox_len().await.unwrap(), 2);
    let now_a = s.broker_update_for_device(a.id).await.unwrap().unwrap();
    assert_eq!(now_a.op, BrokerOp::Revoke);
    assert!(now_a.id > old_a.id);
    // A drainer that held the superseded entry completes or fails nothing.
    ok(s, Write::CompleteBrokerUpdate { id: old_a.id }).await;
    ok(
        s,
        Write::FailBrokerUpdate {
            id: old_a.id,
            next_attempt_at: T0 + 1000,
            error: "stale".into(),
        },
    )
    .await;
    assert_eq!(
        s.broker_update_for_device(a.id).await.unwrap(),
        Some(now_a.clone())
    );

    // A failure counts, keeps the error and backs off.
    ok(
        s,
        Write::FailBrokerUpdate {
            id: now_a.id,
            next_attempt_at: T0 + 60,
            error: "broker connection failed".into(),
        },
    )
    .await;
    let failed = s.broker_update_for_device(a.id).await.unwrap().unwrap();
    assert_eq!(failed.attempts, 1);
    assert_eq!(
        failed.last_error.as_deref(),
        Some("broker connection failed")
    );
    assert_eq!(failed.next_attempt_at, T0 + 60);
    let due = s.pending_broker_updates(T0 + 59, 10).await.unwrap();
    assert_eq!(due.iter().map(|e| e.device_id).collect::<Vec<_>>(), [b.id]);
    assert_eq!(
        s.pending_broker_updates(T0 + 60, 10).await.unwrap().len(),
        2
    );

    // Success deletes; the other device's entry stays.
    ok(s, Write::CompleteBrokerUpdate { id: failed.id }).await;
    assert_eq!(s.broker_update_for_device(a.id).await.unwrap(), None);
    assert_eq!(s.broker_outbox_len().await.unwrap(), 1);

    // An enqueue in a change that fails as a whole queues nothing.
    let r = s
        .commit(
            Change::new()
                .write(grant(a.id, T0 + 3))
                .write(Write::InsertDevice(b.clone()))
                .audit(ev("dup")),
        )
        .await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    assert_eq!(s.broker_update_for_device(a.id).await.unwrap(), None);
    assert_eq!(s.broker_outbox_len().await.unwrap(), 1);
}

// ------------------------------------------------------------- rotation

pub fn rotation(purpose: KeyPurpose, target: &str, old: Uuid, at: i64) -> RotationRecord {
    RotationRecord {
        id: Uuid::now_v7(),
        purpose,
        target: target.to_string(),
        step: RotationStep::Planned,
        old_key_id: Some(old),
        new_key_id: None,
        new_serial: None,
        reason: "manual".into(),
        actor: "admin:test".into(),
        destroy_after: None,
        attempts: 0,
        last_error: None,
        next_attempt_at: at,
        created_at: at,
        updated_at: at,
        finished_at: None,
    }
}

pub async fn rotations_advance_once_and_one_runs_per_key(cx: Cx) {
    let s = cx.store.as_ref();
    let old = key(KeyState::Active);
    let new = key(KeyState::PreActive);
    let other = key(KeyState::Active);
    ok_all(
        s,
        vec![
            Write::InsertKey(old.clone()),
            Write::InsertKey(new.clone()),
            Write::InsertKey(other.clone()),
        ],
    )
    .await;
    let r = rotation(KeyPurpose::IssuingCa, "issuing", old.id, T0);
    ok(s, Write::InsertRotation(r.clone())).await;
    let got = s.get_rotation(r.id).await.unwrap().unwrap();
    assert_eq!(
        (got.step, got.old_key_id, got.attempts),
        (RotationStep::Planned, Some(old.id), 0)
    );

    // One running rotation per (purpose, target); another target or purpose is free.
    let c = refused(
        s,
        Write::InsertRotation(rotation(KeyPurpose::IssuingCa, "issuing", old.id, T0)),
    )
    .await;
    assert!(
        matches!(c, Conflict::RotationRunning { ref target, .. } if target == "issuing"),
        "{c:?}"
    );
    let ocsp = rotation(KeyPurpose::OcspSigning, "issuing", other.id, T0);
    ok(s, Write::InsertRotation(ocsp.clone())).await;

    // A failed attempt counts, keeps the error, backs off; only at its step.
    ok(
        s,
        Write::FailRotationAttempt {
            id: r.id,
            step: RotationStep::Planned,
            error: "HSM unavailable".into(),
            next_attempt_at: T0 + 30,
            at: T0 + 1,
        },
    )
    .await;
    let got = s.get_rotation(r.id).await.unwrap().unwrap();
    assert_eq!(
        (got.attempts, got.last_error.as_deref(), got.next_attempt_at),
        (1, Some("HSM unavailable"), T0 + 30)
    );
    let c = refused(
        s,
        Write::FailRotationAttempt {
            id: r.id,
            step: RotationStep::Certified,
            error: "x".into(),
            next_attempt_at: T0,
            at: T0,
        },
    )
    .await;
    assert!(
        matches!(
            c,
            Conflict::StateChanged {
                entity: "rotation",
                ..
            }
        ),
        "{c:?}"
    );

    // Advancing sets the fields given, keeps the others, clears the failures.
    let adv = |from, to, at| Write::AdvanceRotation {
        id: r.id,
        from,
        to,
        new_key_id: None,
        new_serial: None,
        destroy_after: None,
        at,
    };
    ok(
        s,
        Write::AdvanceRotation {
            id: r.id,
            from: RotationStep::Planned,
            to: RotationStep::KeyGenerated,
            new_key_id: Some(new.id),
            new_serial: None,
            destroy_after: None,
            at: T0 + 40,
        },
    )
    .await;
    let got = s.get_rotation(r.id).await.unwrap().unwrap();
    assert_eq!(
        (
            got.step,
            got.new_key_id,
            got.attempts,
            got.last_error.clone(),
            got.updated_at
        ),
        (RotationStep::KeyGenerated, Some(new.id), 0, None, T0 + 40)
    );
    // The same step twice (a resumed executor that lost the race): refused.
    let c = refused(
        s,
        adv(RotationStep::Planned, RotationStep::KeyGenerated, T0 + 41),
    )
    .await;
    assert!(
        matches!(
            c,
            Conflict::StateChanged {
                entity: "rotation",
                ..
            }
        ),
        "{c:?}"
    );
    let c = refused(
        s,
        adv(RotationStep::Planned, RotationStep::KeyGenerated, T0 + 41),
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    ok(
        s,
        Write::AdvanceRotation {
            id: r.id,
            from: RotationStep::KeyGenerated,
            to: RotationStep::Certified,
            new_key_id: None,
            new_serial: Some("0A01".into()),
            destroy_after: None,
            at: T0 + 42,
        },
    )
    .await;
    for (from, to) in [
        (RotationStep::Certified, RotationStep::Published),
        (RotationStep::Published, RotationStep::Activated),
    ] {
        ok(s, adv(from, to, T0 + 43)).await;
    }
    // Retired no longer blocks a new rotation of the same key.
    ok(
        s,
        Write::AdvanceRotation {
            id: r.id,
            from: RotationStep::Activated,
            to: RotationStep::Retired,
            new_key_id: None,
            new_serial: None,
            destroy_after: Some(T0 + 86_400),
            at: T0 + 44,
        },
    )
    .await;
    let got = s.get_rotation(r.id).await.unwrap().unwrap();
    assert_eq!(
        (got.new_key_id, got.new_serial.as_deref(), got.destroy_after),
        (Some(new.id), Some("0A01"), Some(T0 + 86_400))
    );
    assert_eq!(got.finished_at, None);
    let next = rotation(KeyPurpose::IssuingCa, "issuing", new.id, T0 + 45);
    ok(s, Write::InsertRotation(next.clone())).await;
    // Open rotations, newest first; a finished one leaves the open list.
    let open: Vec<Uuid> = s
        .list_rotations(true, 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(open, [next.id, ocsp.id, r.id]);
    ok(
        s,
        adv(RotationStep::Retired, RotationStep::Destroyed, T0 + 50),
    )
    .await;
    let got = s.get_rotation(r.id).await.unwrap().unwrap();
    assert_eq!(got.finished_at, Some(T0 + 50));
    let open: Vec<Uuid> = s
        .list_rotations(true, 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(open, [next.id, ocsp.id]);
    assert_eq!(s.list_rotations(false, 10).await.unwrap().len(), 3);
    assert_eq!(s.list_rotations(false, 1).await.unwrap().len(), 1);
    assert!(s.get_rotation(Uuid::now_v7()).await.unwrap().is_none());
    let c = refused(
        s,
        Write::AdvanceRotation {
            id: Uuid::now_v7(),
            from: RotationStep::Planned,
            to: RotationStep::KeyGenerated,
            new_key_id: None,
            new_serial: None,
            destroy_after: None,
            at: T0,
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
}

pub async fn ca_key_activation_is_conditional(cx: Cx) {
    let s = cx.store.as_ref();
    let old = key(KeyState::Active);
    let new = key(KeyState::Generating);
    ok_all(
        s,
        vec![
            Write::InsertKey(old.clone()),
            Write::InsertKey(new.clone()),
            Write::InsertCa(ca("issuing", CaKind::Issuing, None, old.id, T0)),
        ],
    )
    .await;
    // A rotation's new key completes as pre-active.
    ok(
        s,
        Write::CompleteKeyGeneration {
            id: new.id,
            public_key_der: vec![0x30, 1],
            state: KeyState::PreActive,
            at: T0 + 1,
        },
    )
    .await;
    assert_eq!(
        s.get_key(new.id).await.unwrap().unwrap().state,
        KeyState::PreActive
    );
    let activate = |from_key| Write::ActivateCaKey {
        ca: "issuing".into(),
        from_key,
        to_key: new.id,
        certificate_der: vec![0x30, 0x82, 2],
    };
    // Not on the key the rotation replaces: refused, nothing changed.
    let c = refused(s, activate(new.id)).await;
    assert!(
        matches!(c, Conflict::StateChanged { entity: "CA", .. }),
        "{c:?}"
    );
    let c = refused(
        s,
        Write::ActivateCaKey {
            ca: "nope".into(),
            from_key: old.id,
            to_key: new.id,
            certificate_der: vec![1],
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    ok(s, activate(old.id)).await;
    let got = s.get_ca("issuing").await.unwrap().unwrap();
    assert_eq!(
        (got.key_id, got.certificate_der),
        (new.id, vec![0x30, 0x82, 2])
    );
    let c = refused(s, activate(old.id)).await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
}

pub async fn crls_are_kept_per_signing_key(cx: Cx) {
    let s = cx.store.as_ref();
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let publish = |n: i64, key: Uuid| Write::PublishCrl {
        record: CrlRecord {
            issuer_key_id: key,
            ..crl("issuing", n, T0 + n)
        },
        keep: 2,
    };
    // One number sequence per CA, shared by its keys.
    for (n, key) in [(1, a), (2, b), (3, a), (4, b), (5, b), (6, b)] {
        ok(s, publish(n, key)).await;
    }
    let c = refused(s, publish(6, a)).await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    assert_eq!(s.latest_crl("issuing").await.unwrap().unwrap().number, 6);
    let la = s.latest_crl_of_key("issuing", a).await.unwrap().unwrap();
    assert_eq!((la.number, la.issuer_key_id), (3, a));
    assert_eq!(
        s.latest_crl_of_key("issuing", b)
            .await
            .unwrap()
            .unwrap()
            .number,
        6
    );
    assert!(s.latest_crl_of_key("other", a).await.unwrap().is_none());
    // `keep` per key: b's newer CRLs did not push a's out.
    assert_eq!(s.counts().await.unwrap()["crls"], 2 + 2);
}

pub async fn last_expiry_leaves_out_retired_and_ocsp_service_certificates(cx: Cx) {
    let s = cx.store.as_ref();
    let ca_key = key(KeyState::Retired);
    let svc_key = key(KeyState::Active);
    ok_all(
        s,
        vec![
            Write::InsertKey(ca_key.clone()),
            Write::InsertKey(svc_key.clone()),
        ],
    )
    .await;
    assert_eq!(s.last_expiry_issued_by(ca_key.id).await.unwrap(), None);
    let cert = |serial: &str, not_after: i64| CertificateRecord {
        not_after,
        ..certificate(serial, ca_key.id, None)
    };
    let svc =
        |serial: &str, purpose: KeyPurpose, retired_at: Option<i64>| ServiceCertificateRecord {
            purpose,
            retired_at,
            ..service_cert(serial, svc_key.id)
        };
    ok_all(
        s,
        vec![
            Write::InsertCertificate(cert("0E01", T0 + 100)),
            Write::InsertCertificate(cert("0E02", T0 + 900)),
            Write::InsertServiceCertificate(svc("0E02", KeyPurpose::OcspSigning, None)),
            Write::InsertCertificate(cert("0E03", T0 + 800)),
            Write::InsertServiceCertificate(svc("0E03", KeyPurpose::TlsServer, Some(T0))),
            Write::InsertCertificate(cert("0E04", T0 + 500)),
            Write::InsertServiceCertificate(svc("0E04", KeyPurpose::TlsServer, None)),
        ],
    )
    .await;
    // The OCSP signer (0E02) and the retired TLS certificate (0E03) do not
    // hold the key; the TLS certificate in service (0E04) does.
    assert_eq!(
        s.last_expiry_issued_by(ca_key.id).await.unwrap(),
        Some(T0 + 500)
    );
    assert_eq!(s.last_expiry_issued_by(svc_key.id).await.unwrap(), None);
}

/// Every page of `q` from its start, as (not_after, serial).
async fn all_expiring(s: &dyn Store, mut q: ExpiringQuery) -> Vec<(i64, String)> {
    let mut out = Vec::new();
    q.after = None;
    loop {
        let p = s.expiring_device_certificates(&q).await.unwrap();
        assert!(p.items.len() <= q.limit.clamp(1, 1000) as usize);
        out.extend(p.items.iter().map(|c| (c.not_after, c.serial.clone())));
        match p.next {
            Some(n) => {
                assert_eq!(
                    Some(&n),
                    out.last(),
                    "the cursor is the last item of its page"
                );
                q.after = Some(n);
            }
            None => break,
        }
    }
    out
}

pub async fn expiring_device_certificates_window_filters_and_pages(cx: Cx) {
    let s = cx.store.as_ref();
    let k = key(KeyState::Active);
    let (a, b, held, gone) = (
        device("field"),
        device("lab"),
        device("field"),
        device("lab"),
    );
    let cert = |serial: &str, d: &DeviceRecord, not_after: i64| CertificateRecord {
        not_after,
        ..certificate(serial, k.id, Some(d.id))
    };
    let day = 86_400;
    let mut writes = vec![Write::InsertKey(k.clone())];
    for d in [&a, &b, &held, &gone] {
        writes.push(Write::InsertDevice(d.clone()));
    }
    for c in [
        cert("0A01", &a, T0 + 10 * day),
        // Same notAfter: serial breaks the tie.
        cert("0B01", &b, T0 + 10 * day),
        cert("0A02", &a, T0 + 5 * day),
        cert("0B02", &b, T0 + 40 * day),
        // Ends exactly at the lower bound: expired, out.
        cert("0A03", &a, T0),
        cert("0C01", &held, T0 + 3 * day),
        cert("0D01", &gone, T0 + 3 * day),
        // Renewed: the old one is superseded, the new one listed.
        cert("0A04", &a, T0 + 2 * day),
        cert("0A05", &a, T0 + 300 * day),
        // Revoked on its own.
        cert("0B03", &b, T0 + 6 * day),
    ] {
        writes.push(Write::InsertCertificate(c));
    }
    // Not a device's: a service certificate.
    writes.push(Write::InsertCertificate(CertificateRecord {
        not_after: T0 + 4 * day,
        ..certificate("0E01", k.id, None)
    }));
    writes.push(Write::SupersedeCertificate {
        serial: "0A04".into(),
        by: "0A05".into(),
        at: T0,
    });
    writes.push(Write::RevokeCertificate {
        serial: "0B03".into(),
        reason: RevocationReason::KeyCompromise,
        at: T0,
    });
    ok_all(s, writes).await;
    ok(
        s,
        Write::SetDeviceStatus {
            id: held.id,
            from: DeviceStatus::Active,
            to: DeviceStatus::Suspended,
            reason: RevocationReason::CertificateHold,
            at: T0,
        },
    )
    .await;
    ok(
        s,
        Write::SetDeviceStatus {
            id: gone.id,
            from: DeviceStatus::Active,
            to: DeviceStatus::Revoked,
            reason: RevocationReason::CessationOfOperation,
            at: T0,
        },
    )
    .await;

    let q = |to: i64, limit: u32| ExpiringQuery {
        not_after_from: T0,
        not_after_to: to,
        unnotified_only: false,
        after: None,
        limit,
    };
    let want = vec![
        (T0 + 5 * day, "0A02".to_string()),
        (T0 + 10 * day, "0A01".to_string()),
        (T0 + 10 * day, "0B01".to_string()),
        (T0 + 40 * day, "0B02".to_string()),
    ];
    // Soonest first, (notAfter, serial); pages of 1 and 3 and one page
    // cover every row once.
    for limit in [1, 3, 100] {
        assert_eq!(
            all_expiring(s, q(T0 + 40 * day, limit)).await,
            want,
            "limit {limit}"
        );
    }
    // The upper bound is inclusive, the lower exclusive.
    assert_eq!(
        all_expiring(s, q(T0 + 10 * day, 100)).await,
        want[..3].to_vec()
    );
    assert_eq!(
        all_expiring(s, q(T0 + 10 * day - 1, 100)).await,
        want[..1].to_vec()
    );
    assert_eq!(
        all_expiring(
            s,
            ExpiringQuery {
                not_after_from: T0 + 5 * day,
                ..q(T0 + 10 * day, 100)
            }
        )
        .await,
        want[1..3].to_vec()
    );
    // The device's name and group come along; nothing is notified yet.
    let p = s
        .expiring_device_certificates(&q(T0 + 5 * day, 10))
        .await
        .unwrap();
    assert_eq!(
        p.items,
        vec![ExpiringCertificate {
            serial: "0A02".into(),
            device_id: a.id,
            device_name: a.name.clone(),
            group: "field".into(),
            issuer_ca: "issuing".into(),
            not_after: T0 + 5 * day,
            renewal_notified_at: None,
        }]
    );
    assert!(p.next.is_none());
    // A cursor in the middle of a tie continues after it.
    let rest = s
        .expiring_device_certificates(&ExpiringQuery {
            after: Some((T0 + 10 * day, "0A01".into())),
            ..q(T0 + 40 * day, 100)
        })
        .await
        .unwrap();
    assert_eq!(
        rest.items
            .iter()
            .map(|c| c.serial.as_str())
            .collect::<Vec<_>>(),
        ["0B01", "0B02"]
    );
    // The limit is clamped: 0 reads as 1.
    let one = s
        .expiring_device_certificates(&q(T0 + 40 * day, 0))
        .await
        .unwrap();
    assert_eq!(one.items.len(), 1);
    assert_eq!(one.next, Some((T0 + 5 * day, "0A02".to_string())));
    // An empty window.
    assert!(all_expiring(s, q(T0, 100)).await.is_empty());
}

pub async fn renewal_notices_are_marked_once_per_certificate(cx: Cx) {
    let s = cx.store.as_ref();
    let k = key(KeyState::Active);
    let d = device("field");
    let day = 86_400;
    let mut writes = vec![Write::InsertKey(k.clone()), Write::InsertDevice(d.clone())];
    for (i, serial) in ["0F01", "0F02", "0F03"].iter().enumerate() {
        writes.push(Write::InsertCertificate(CertificateRecord {
            not_after: T0 + (i as i64 + 1) * day,
            ..certificate(serial, k.id, Some(d.id))
        }));
    }
    ok_all(s, writes).await;
    let unnotified = || ExpiringQuery {
        not_after_from: T0,
        not_after_to: T0 + 10 * day,
        unnotified_only: true,
        after: None,
        limit: 100,
    };
    let serials = |v: Vec<(i64, String)>| v.into_iter().map(|(_, s)| s).collect::<Vec<_>>();
    assert_eq!(
        serials(all_expiring(s, unnotified()).await),
        ["0F01", "0F02", "0F03"]
    );

    ok(
        s,
        Write::MarkRenewalNotified {
            serials: vec!["0F01".into(), "0F03".into()],
            at: T0 + 7,
        },
    )
    .await;
    assert_eq!(serials(all_expiring(s, unnotified()).await), ["0F02"]);
    let all = s
        .expiring_device_certificates(&ExpiringQuery {
            unnotified_only: false,
            ..unnotified()
        })
        .await
        .unwrap();
    assert_eq!(
        all.items
            .iter()
            .map(|c| (c.serial.as_str(), c.renewal_notified_at))
            .collect::<Vec<_>>(),
        [
            ("0F01", Some(T0 + 7)),
            ("0F02", None),
            ("0F03", Some(T0 + 7))
        ]
    );

    // Marked already (a second scheduler on the same batch), or unknown:
    // the whole change is refused and 0F02 stays unmarked.
    for bad in [
        vec!["0F02".to_string(), "0F01".to_string()],
        vec!["0F02".to_string(), "0FFF".to_string()],
    ] {
        let c = refused(
            s,
            Write::MarkRenewalNotified {
                serials: bad.clone(),
                at: T0 + 8,
            },
        )
        .await;
        assert!(
            matches!(
                c,
                Conflict::StateChanged {
                    entity: "certificate",
                    ..
                }
            ),
            "{bad:?}: {c:?}"
        );
        assert_eq!(serials(all_expiring(s, unnotified()).await), ["0F02"]);
    }
    // Nothing to mark: nothing written (the change still needs its event).
    ok(
        s,
        Write::MarkRenewalNotified {
            serials: Vec::new(),
            at: T0 + 9,
        },
    )
    .await;
    assert_eq!(serials(all_expiring(s, unnotified()).await), ["0F02"]);
    ok(
        s,
        Write::MarkRenewalNotified {
            serials: vec!["0F02".into()],
            at: T0 + 9,
        },
    )
    .await;
    assert!(all_expiring(s, unnotified()).await.is_empty());
    assert_eq!(
        s.get_certificate("0F02").await.unwrap().unwrap().status,
        CertificateStatus::Valid,
        "marking changes nothing else"
    );
}

// ------------------------------------------------------------------ leases

/// Lease times are milliseconds.
const MS0: i64 = T0 * 1000;

/// Who holds `name` just before and at `at`: the lease ends exactly at `at`.
async fn ends_at(s: &dyn Store, name: &str, holder: &str, at: i64) {
    assert_eq!(
        s.lease_holder(name, at - 1).await.unwrap().as_deref(),
        Some(holder),
        "held until {at}"
    );
    assert_eq!(
        s.lease_holder(name, at).await.unwrap(),
        None,
        "ended at {at}"
    );
}

pub async fn lease_is_held_by_one_holder_until_it_expires(cx: Cx) {
    let s = cx.store.as_ref();
    // Nobody holds it yet.
    assert_eq!(s.lease_holder("scheduler", MS0).await.unwrap(), None);
    assert_eq!(s.lease_holder("scheduler", i64::MIN).await.unwrap(), None);
    // Acquire.
    assert!(s.try_lease("scheduler", "a", MS0, 1500).await.unwrap());
    ends_at(s, "scheduler", "a", MS0 + 1500).await;
    // A second holder is refused while the lease is valid, up to its last
    // millisecond, and the lease is left as it was.
    assert!(!s.try_lease("scheduler", "b", MS0, 1500).await.unwrap());
    assert!(
        !s.try_lease("scheduler", "b", MS0 + 1499, 60_000)
            .await
            .unwrap()
    );
    ends_at(s, "scheduler", "a", MS0 + 1500).await;
    // Renewal extends from the renewal time...
    assert!(
        s.try_lease("scheduler", "a", MS0 + 1000, 1500)
            .await
            .unwrap()
    );
    ends_at(s, "scheduler", "a", MS0 + 2500).await;
    // ... and never shortens (a renewal with an older time or a shorter ttl).
    assert!(
        s.try_lease("scheduler", "a", MS0 + 500, 1000)
            .await
            .unwrap()
    );
    ends_at(s, "scheduler", "a", MS0 + 2500).await;
    // Other leases are independent.
    assert!(s.try_lease("other", "b", MS0, 100).await.unwrap());
    ends_at(s, "other", "b", MS0 + 100).await;
    ends_at(s, "scheduler", "a", MS0 + 2500).await;
    // Takeover once expired: at the expiry instant, for the new holder's ttl.
    assert!(
        s.try_lease("scheduler", "b", MS0 + 2500, 1500)
            .await
            .unwrap()
    );
    ends_at(s, "scheduler", "b", MS0 + 4000).await;
    // The old holder is now refused, and its renewal changes nothing.
    assert!(
        !s.try_lease("scheduler", "a", MS0 + 2600, 1500)
            .await
            .unwrap()
    );
    ends_at(s, "scheduler", "b", MS0 + 4000).await;
    // After expiry the last holder still reads with i64::MIN.
    assert_eq!(s.lease_holder("scheduler", MS0 + 5000).await.unwrap(), None);
    assert_eq!(
        s.lease_holder("scheduler", i64::MIN)
            .await
            .unwrap()
            .as_deref(),
        Some("b")
    );
    // A lease is not a domain change: no audit event.
    assert_eq!(s.audit_head().await.unwrap().0, 0);
}

pub async fn lease_release_hands_over_at_once(cx: Cx) {
    let s = cx.store.as_ref();
    assert!(s.try_lease("scheduler", "a", MS0, 15_000).await.unwrap());
    // Released by someone else, or an unknown lease: nothing changes.
    s.release_lease("scheduler", "b").await.unwrap();
    s.release_lease("unknown", "a").await.unwrap();
    ends_at(s, "scheduler", "a", MS0 + 15_000).await;
    assert!(
        !s.try_lease("scheduler", "b", MS0 + 1, 15_000)
            .await
            .unwrap()
    );
    // Released by its holder: free at once, long before it would expire;
    // it still names its last holder.
    s.release_lease("scheduler", "a").await.unwrap();
    assert_eq!(s.lease_holder("scheduler", MS0 + 2).await.unwrap(), None);
    assert_eq!(s.lease_holder("scheduler", 0).await.unwrap(), None);
    assert_eq!(
        s.lease_holder("scheduler", i64::MIN)
            .await
            .unwrap()
            .as_deref(),
        Some("a")
    );
    assert!(
        s.try_lease("scheduler", "b", MS0 + 2, 15_000)
            .await
            .unwrap()
    );
    ends_at(s, "scheduler", "b", MS0 + 15_002).await;
    // Releasing twice is harmless; the old holder cannot release b's lease.
    s.release_lease("scheduler", "a").await.unwrap();
    ends_at(s, "scheduler", "b", MS0 + 15_002).await;
    // A released lease is acquired again by its former holder, or by the
    // holder that released it, for a fresh ttl.
    s.release_lease("scheduler", "b").await.unwrap();
    assert!(s.try_lease("scheduler", "a", MS0 + 3, 10).await.unwrap());
    ends_at(s, "scheduler", "a", MS0 + 13).await;
    s.release_lease("scheduler", "a").await.unwrap();
    assert!(s.try_lease("scheduler", "a", MS0 + 4, 10).await.unwrap());
    ends_at(s, "scheduler", "a", MS0 + 14).await;
}

pub async fn lease_race_has_one_winner(cx: Cx) {
    let s = cx.store.clone();
    for round in 0..5i64 {
        // Every round starts after the previous winner's lease expired.
        let now = MS0 + round * 10_000;
        let tries = (0..16).map(|i| {
            let s = s.clone();
            async move {
                let holder = format!("daemon-{i}");
                let won = s.try_lease("scheduler", &holder, now, 5_000).await.unwrap();
                (holder, won)
            }
        });
        let results = join_all(tries).await;
        let winners: Vec<_> = results.iter().filter(|(_, w)| *w).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        assert_eq!(
            s.lease_holder("scheduler", now).await.unwrap().as_deref(),
            Some(winners[0].0.as_str())
        );
    }
}

pub async fn lease_refuses_bad_input_and_read_only_stores(cx: Cx) {
    let s = cx.store.as_ref();
    assert!(s.try_lease("scheduler", "a", MS0, 1000).await.unwrap());
    for (name, holder, ttl) in [
        ("scheduler", "b", 0),
        ("scheduler", "a", 0),
        ("scheduler", "a", -1),
        ("fresh", "b", i64::MIN),
        ("", "b", 1000),
        ("scheduler", "", 1000),
    ] {
        let err = s
            .try_lease(name, holder, MS0 + 2000, ttl)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidArgument(_)),
            "{name:?} {holder:?} {ttl}: {err:?}"
        );
        assert_eq!(err.code(), "store_invalid_argument");
    }
    for (name, holder) in [("", "a"), ("scheduler", "")] {
        let err = s.release_lease(name, holder).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");
    }
    // Nothing changed: a's lease ends where it did, no lease `fresh`.
    ends_at(s, "scheduler", "a", MS0 + 1000).await;
    assert_eq!(s.lease_holder("fresh", i64::MIN).await.unwrap(), None);

    // A read-only handle reads the holder and refuses to take, renew or release.
    let ro = cx.read_only().await;
    assert_eq!(
        ro.lease_holder("scheduler", MS0).await.unwrap().as_deref(),
        Some("a")
    );
    for err in [
        ro.try_lease("scheduler", "b", MS0 + 5000, 1000)
            .await
            .unwrap_err(),
        ro.try_lease("scheduler", "a", MS0, 1000).await.unwrap_err(),
    ] {
        assert!(
            matches!(err, StoreError::Database(DatabaseError::ReadOnly)),
            "{err:?}"
        );
    }
    let err = ro.release_lease("scheduler", "a").await.unwrap_err();
    assert!(
        matches!(err, StoreError::Database(DatabaseError::ReadOnly)),
        "{err:?}"
    );
    ends_at(s, "scheduler", "a", MS0 + 1000).await;
}

pub fn backup(file_name: &str, at: i64) -> BackupRecord {
    BackupRecord {
        id: Uuid::now_v7(),
        file_name: file_name.into(),
        created_at: at,
        sha256: "ab".repeat(32),
        size_bytes: 4096,
        format_version: 1,
        schema_version: 1,
        trigger: keyward::model::BackupTrigger::Manual,
        actor: "admin:test".into(),
        summary: serde_json::json!({ "rows": { "keys": 1 } }),
        pruned_at: None,
        replicas: Vec::new(),
    }
}

fn replica<'a>(b: &'a BackupRecord, location: &str) -> &'a ReplicaRecord {
    b.replicas
        .iter()
        .find(|r| r.location == location)
        .unwrap_or_else(|| panic!("no replica {location}: {b:?}"))
}

pub async fn backups_record_replicate_verify_and_prune(cx: Cx) {
    use keyward::model::ReplicaState;
    let s = cx.store.as_ref();
    let b = backup("keyward-a.age", T0);
    let locations = vec!["nas".to_string(), "s3".to_string()];
    ok(
        s,
        Write::RecordBackup {
            record: b.clone(),
            locations: locations.clone(),
        },
    )
    .await;
    let got = s.get_backup(b.id).await.unwrap().unwrap();
    assert_eq!(
        (got.file_name.as_str(), got.pruned_at),
        ("keyward-a.age", None)
    );
    assert_eq!(got.replicas.len(), 2, "{got:?}");
    for r in &got.replicas {
        assert_eq!(
            (r.state, r.attempts, r.next_attempt_at),
            (ReplicaState::Pending, 0, T0)
        );
    }
    // A reused file name (or id) is a duplicate.
    let mut again = backup("keyward-a.age", T0 + 1);
    let c = refused(
        s,
        Write::RecordBackup {
            record: again.clone(),
            locations: locations.clone(),
        },
    )
    .await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");
    again.file_name = "keyward-b.age".into();
    again.id = b.id;
    let c = refused(
        s,
        Write::RecordBackup {
            record: again,
            locations: locations.clone(),
        },
    )
    .await;
    assert!(matches!(c, Conflict::Duplicate { .. }), "{c:?}");

    // Due: both pending replicas at their time, none before.
    assert!(s.due_replicas(T0 - 1).await.unwrap().is_empty());
    assert_eq!(s.due_replicas(T0).await.unwrap().len(), 2);

    // Two failures of s3: attempts count, the error and the retry time are kept.
    for (n, next) in [(1, T0 + 30), (2, T0 + 90)] {
        ok(
            s,
            Write::ReplicaFailed {
                backup_id: b.id,
                location: "s3".into(),
                error: format!("refused {n}"),
                next_attempt_at: next,
                at: T0 + n,
            },
        )
        .await;
    }
    ok(
        s,
        Write::ReplicaStored {
            backup_id: b.id,
            location: "nas".into(),
            at: T0 + 5,
        },
    )
    .await;
    let got = s.get_backup(b.id).await.unwrap().unwrap();
    let s3 = replica(&got, "s3");
    assert_eq!(
        (
            s3.state,
            s3.attempts,
            s3.last_error.as_deref(),
            s3.next_attempt_at
        ),
        (ReplicaState::Failed, 2, Some("refused 2"), T0 + 90)
    );
    let nas = replica(&got, "nas");
    assert_eq!(
        (nas.state, nas.stored_at),
        (ReplicaState::Stored, Some(T0 + 5))
    );
    // Only the failed one is due, and only once its time has come.
    assert!(s.due_replicas(T0 + 89).await.unwrap().is_empty());
    let due = s.due_replicas(T0 + 90).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].backup_id, due[0].location.as_str()), (b.id, "s3"));
    // Stored clears the failures.
    ok(
        s,
        Write::ReplicaStored {
            backup_id: b.id,
            location: "s3".into(),
            at: T0 + 91,
        },
    )
    .await;
    let got = s.get_backup(b.id).await.unwrap().unwrap();
    let s3 = replica(&got, "s3");
    assert_eq!(
        (s3.state, s3.attempts, s3.last_error.clone(), s3.stored_at),
        (ReplicaState::Stored, 0, None, Some(T0 + 91))
    );
    assert!(s.due_replicas(T0 + 10_000).await.unwrap().is_empty());

    // Verification: success sets verified_at, a failure keeps it and records the error…
    let verify = |error: Option<&str>, at| Write::ReplicaVerified {
        backup_id: b.id,
        location: "nas".into(),
        error: error.map(str::to_string),
        at,
    };
    ok(s, verify(None, T0 + 100)).await;
    ok(s, verify(Some("checksum mismatch"), T0 + 200)).await;
    let got = s.get_backup(b.id).await.unwrap().unwrap();
    let nas = replica(&got, "nas");
    assert_eq!(
        (nas.verified_at, nas.verify_error.as_deref()),
        (Some(T0 + 100), Some("checksum mismatch"))
    );
    // …and a later success clears the error.
    ok(s, verify(None, T0 + 300)).await;
    let got = s.get_backup(b.id).await.unwrap().unwrap();
    let nas = replica(&got, "nas");
    assert_eq!(
        (nas.verified_at, nas.verify_error.clone()),
        (Some(T0 + 300), None)
    );

    // Replica writes on an unknown location or backup: Missing, nothing changed.
    for w in [
        Write::ReplicaStored {
            backup_id: b.id,
            location: "tape".into(),
            at: T0,
        },
        Write::ReplicaFailed {
            backup_id: b.id,
            location: "tape".into(),
            error: "x".into(),
            next_attempt_at: T0,
            at: T0,
        },
        Write::ReplicaVerified {
            backup_id: b.id,
            location: "tape".into(),
            error: None,
            at: T0,
        },
        Write::ReplicaStored {
            backup_id: Uuid::now_v7(),
            location: "nas".into(),
            at: T0,
        },
    ] {
        let c = refused(s, w).await;
        assert!(matches!(c, Conflict::Missing { .. }), "{c:?}");
    }

    // Pruned: pruned_at set, every replica pruned, out of the default list; twice conflicts.
    let newer = backup("keyward-c.age", T0 + 400);
    ok(
        s,
        Write::RecordBackup {
            record: newer.clone(),
            locations: vec!["nas".into()],
        },
    )
    .await;
    ok(
        s,
        Write::PruneBackup {
            id: b.id,
            at: T0 + 500,
        },
    )
    .await;
    let got = s.get_backup(b.id).await.unwrap().unwrap();
    assert_eq!(got.pruned_at, Some(T0 + 500));
    assert!(
        got.replicas.iter().all(|r| r.state == ReplicaState::Pruned),
        "{got:?}"
    );
    let live: Vec<Uuid> = s
        .list_backups(false, 100)
        .await
        .unwrap()
        .iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(live, vec![newer.id]);
    let all: Vec<Uuid> = s
        .list_backups(true, 100)
        .await
        .unwrap()
        .iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(all, vec![newer.id, b.id]);
    let c = refused(
        s,
        Write::PruneBackup {
            id: b.id,
            at: T0 + 600,
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
    // A pruned backup's replicas are not due and cannot be stored again.
    assert!(
        s.due_replicas(T0 + 10_000)
            .await
            .unwrap()
            .iter()
            .all(|r| r.backup_id != b.id)
    );
    let c = refused(
        s,
        Write::ReplicaStored {
            backup_id: b.id,
            location: "nas".into(),
            at: T0 + 700,
        },
    )
    .await;
    assert!(matches!(c, Conflict::StateChanged { .. }), "{c:?}");
}

pub async fn set_key_handle_moves_a_key_or_is_missing(cx: Cx) {
    let s = cx.store.as_ref();
    let k = key(KeyState::Active);
    ok(s, Write::InsertKey(k.clone())).await;
    let moved = KeyHandle("pkcs11:token=new;id=0102".into());
    ok(
        s,
        Write::SetKeyHandle {
            id: k.id,
            handle: moved.clone(),
            at: T0 + 10,
        },
    )
    .await;
    let got = s.get_key(k.id).await.unwrap().unwrap();
    assert_eq!((got.handle, got.updated_at), (moved, T0 + 10));
    let c = refused(
        s,
        Write::SetKeyHandle {
            id: Uuid::now_v7(),
            handle: KeyHandle("pkcs11:token=t;id=ff".into()),
            at: T0 + 20,
        },
    )
    .await;
    assert!(matches!(c, Conflict::Missing { .. }), "{c:?}");
}

// ------------------------------------------------------------------ metrics

/// The reads behind the metrics gauges: the approval queue (count and oldest
/// submission of `pending` only) and active device certificates by time to
/// expiry (valid, a device's, unexpired; each bound inclusive), and the bad
/// input they refuse.
pub async fn metrics_reads_count_the_queue_and_expiries(cx: Cx) {
    use RegistrationStatus as S;
    let s = cx.store.as_ref();
    assert_eq!(
        s.pending_registrations_summary().await.unwrap(),
        PendingSummary {
            count: 0,
            oldest_submitted_at: None
        }
    );
    let at = |t: i64| RegistrationRecord {
        submitted_at: t,
        ..registration("g", T0 + 10_000)
    };
    let (old, newer, decided) = (at(T0 - 500), at(T0 - 100), at(T0 - 900));
    ok_all(s, [&old, &newer, &decided].map(insert_reg).to_vec()).await;
    ok(s, set_status(decided.id, S::Pending, S::Denied, T0)).await;
    assert_eq!(
        s.pending_registrations_summary().await.unwrap(),
        PendingSummary {
            count: 2,
            oldest_submitted_at: Some(T0 - 500)
        },
        "the denied, older registration is not in the queue"
    );
    ok(s, set_status(old.id, S::Pending, S::Approved, T0 + 1)).await;
    assert_eq!(
        s.pending_registrations_summary().await.unwrap(),
        PendingSummary {
            count: 1,
            oldest_submitted_at: Some(T0 - 100)
        }
    );

    let day = 86_400;
    let bounds = [day, 7 * day, 30 * day];
    let empty = s.certificate_expiry_counts(T0, &bounds).await.unwrap();
    assert_eq!(
        empty,
        ExpiryCounts {
            within: vec![0, 0, 0],
            active: 0
        }
    );
    let k = key(KeyState::Active);
    let (a, held) = (device("field"), device("field"));
    let cert = |serial: &str, d: Option<Uuid>, not_after: i64| CertificateRecord {
        not_after,
        ..certificate(serial, k.id, d)
    };
    let mut writes = vec![
        Write::InsertKey(k.clone()),
        Write::InsertDevice(a.clone()),
        Write::InsertDevice(held.clone()),
    ];
    for c in [
        // Exactly on the 1-day bound: inside it (inclusive).
        cert("1A01", Some(a.id), T0 + day),
        cert("1A02", Some(a.id), T0 + 5 * day),
        cert("1A03", Some(a.id), T0 + 100 * day),
        // Expired at the lower bound: out.
        cert("1A04", Some(a.id), T0),
        // Superseded, revoked, held, not a device's: out.
        cert("1A05", Some(a.id), T0 + 2 * day),
        cert("1A06", Some(a.id), T0 + 2 * day),
        cert("1B01", Some(held.id), T0 + 2 * day),
        cert("1E01", None, T0 + 2 * day),
    ] {
        writes.push(Write::InsertCertificate(c));
    }
    writes.push(Write::SupersedeCertificate {
        serial: "1A05".into(),
        by: "1A03".into(),
        at: T0,
    });
    writes.push(Write::RevokeCertificate {
        serial: "1A06".into(),
        reason: RevocationReason::KeyCompromise,
        at: T0,
    });
    ok_all(s, writes).await;
    ok(
        s,
        Write::SetDeviceStatus {
            id: held.id,
            from: DeviceStatus::Active,
            to: DeviceStatus::Suspended,
            reason: RevocationReason::CertificateHold,
            at: T0,
        },
    )
    .await;
    assert_eq!(
        s.certificate_expiry_counts(T0, &bounds).await.unwrap(),
        ExpiryCounts {
            within: vec![1, 2, 2],
            active: 3
        }
    );
    // A day later the first one has expired; bounds move with `now`.
    assert_eq!(
        s.certificate_expiry_counts(T0 + day, &bounds)
            .await
            .unwrap(),
        ExpiryCounts {
            within: vec![0, 1, 1],
            active: 2
        }
    );
    // No bounds: only the total.
    assert_eq!(
        s.certificate_expiry_counts(T0, &[]).await.unwrap(),
        ExpiryCounts {
            within: vec![],
            active: 3
        }
    );
    // A negative bound is refused, and nothing changes.
    let before = snapshot(s).await;
    let err = s
        .certificate_expiry_counts(T0, &[day, -1])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");
    assert_eq!(err.code(), "store_invalid_argument");
    assert_eq!(snapshot(s).await, before);
}
