//! Background jobs driven by a manual clock, in-process, on a real token and store.
//!
//! The token and store are set up by `keyward init`; the sweeper
//! expires pending registrations exactly when their time is up, and the
//! failed-login flusher writes one event per closed window and the rest on
//! shutdown. No test waits for time to pass.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, at `C_Initialize`, so each test
//! re-runs itself in a child process with the variable set (no
//! process-global environment mutation).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Env, openssl_csr};
use keyward::app::App;
use keyward::clock::{Clock, ManualClock};
use keyward::config::Config;
use keyward::jobs::login_failures::LoginFailureFlusher;
use keyward::jobs::sweeper::{SweepReport, Sweeper};
use keyward::jobs::{Job, Scheduler};
use keyward::registry::Submission;
use keyward::store::{Decision, PageRequest, RegistrationFilter, RegistrationStatus, Store};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

const CHILD: &str = "KEYWARD_TEST_INPROCESS_CONFIG";

/// In the parent: makes an installation, runs `keyward init`, and re-runs
/// `test` in a child with `SOFTHSM2_CONF` set. In the child: returns the
/// config path to run against.
fn child_config(test: &str, setup: impl FnOnce(&Env)) -> Option<(PathBuf, PathBuf)> {
    if let Some(cfg) = std::env::var_os(CHILD) {
        let cfg = PathBuf::from(cfg);
        let dir = cfg.parent().unwrap().to_path_buf();
        return Some((cfg, dir));
    }
    let env = Env::new();
    setup(&env);
    env.init();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture"])
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .env(CHILD, &env.config)
        .status()
        .unwrap();
    assert!(status.success(), "{test} failed in its child process");
    None
}

async fn app(config: &Path, start: OffsetDateTime) -> (App, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(start));
    let config = Config::load(config).unwrap();
    let app = App::build_with_clock(config, clock.clone()).await.unwrap();
    (app, clock)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn statuses(store: &dyn Store) -> Vec<(String, RegistrationStatus)> {
    let page = store
        .list_registrations(
            &RegistrationFilter::default(),
            &PageRequest {
                limit: 1000,
                ..PageRequest::default()
            },
        )
        .await
        .unwrap();
    page.items
        .iter()
        .map(|r| (r.name.clone(), r.status))
        .collect()
}

#[test]
fn sweeper_expires_pending_registrations_when_their_time_is_up() {
    let Some((config, dir)) = child_config(
        "sweeper_expires_pending_registrations_when_their_time_is_up",
        |_| {},
    ) else {
        return;
    };
    runtime().block_on(async {
        let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let (app, clock) = app(&config, t0).await;
        let s = &app.state;
        let (csr, _) = openssl_csr(&dir, "ec");
        let submit = |name: &str| Submission {
            csr: Some(csr.clone().into_bytes()),
            evidence: keyward::registry::Evidence::None,
            age_recipient: None,
            name: name.to_string(),
            device_type: None,
            location: None,
            firmware: None,
            group: Some("default".to_string()),
            client_addr: Some("192.0.2.1".to_string()),
        };
        // The default group: 72 h to decide.
        let early_a = s.registry.submit(submit("early-a"), None).await.unwrap();
        s.registry.submit(submit("early-b"), None).await.unwrap();
        let decided = s.registry.submit(submit("decided"), None).await.unwrap();
        // One denial decides (approvals need two admins in the shipped policy).
        let admin = s.store.admin_by_name("bootstrap").await.unwrap().unwrap();
        s.registry
            .decide(decided.registration.id, &admin, Decision::Deny, None, None)
            .await
            .unwrap();
        clock.advance(time::Duration::hours(24));
        s.registry.submit(submit("late"), None).await.unwrap();
        assert_eq!(
            early_a.registration.expires_at,
            (t0 + time::Duration::hours(72)).unix_timestamp()
        );

        // An invitation nobody redeems, made at t0 + 24 h: open for 72 h.
        let invitation = s
            .admins
            .invite(
                &admin,
                "never-redeemed",
                keyward::model::Role::Approver,
                None,
            )
            .await
            .unwrap();
        let sweeper = Sweeper::new(
            s.store.clone(),
            s.registry.clone(),
            s.admins.clone(),
            Duration::from_secs(60),
        );
        let audit_before = s.store.counts().await.unwrap()["audit_events"];
        // One second before the deadline: nothing to do.
        clock.set(t0 + time::Duration::hours(72) - time::Duration::seconds(1));
        assert_eq!(
            sweeper.sweep(clock.now()).await.unwrap(),
            SweepReport::default()
        );
        assert_eq!(
            s.store.counts().await.unwrap()["audit_events"],
            audit_before
        );

        // At the deadline: both early pending ones, through the Job interface.
        clock.set(t0 + time::Duration::hours(72));
        sweeper.tick(clock.now()).await.unwrap();
        let mut got = statuses(s.store.as_ref()).await;
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            vec![
                ("decided".to_string(), RegistrationStatus::Denied),
                ("early-a".to_string(), RegistrationStatus::Expired),
                ("early-b".to_string(), RegistrationStatus::Expired),
                ("late".to_string(), RegistrationStatus::Pending),
            ]
        );
        let events = s
            .store
            .audit_events(keyward::store::AuditQuery {
                from_seq: audit_before + 1,
                limit: 100,
            })
            .await
            .unwrap();
        let expired: Vec<_> = events
            .iter()
            .filter(|e| e.action == "registration.expire")
            .collect();
        assert_eq!(expired.len(), 2, "{events:#?}");
        assert!(expired.iter().all(|e| e.actor == "system"));
        assert_eq!(events.len(), 2, "only the expiries were audited");
        // Nothing left: a second sweep does nothing.
        assert_eq!(sweeper.sweep(clock.now()).await.unwrap().expired, 0);
        // The late one goes when its own time is up, with the invitation.
        clock.set(t0 + time::Duration::hours(96));
        let report = sweeper.sweep(clock.now()).await.unwrap();
        assert_eq!((report.expired, report.admin_requests_expired), (1, 1));
        let request = s
            .store
            .get_admin_request(invitation.request.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(request.status, keyward::model::AdminRequestStatus::Expired);
        // An expired invitation cannot be redeemed.
        let refused = s
            .admins
            .redeem(
                secrecy::ExposeSecret::expose_secret(&invitation.code),
                None,
                None,
            )
            .await;
        assert!(refused.is_err());
    });
}

#[test]
fn failed_logins_are_written_per_closed_window_and_at_shutdown() {
    let Some((config, _)) = child_config(
        "failed_logins_are_written_per_closed_window_and_at_shutdown",
        |env| {
            env.append_config(
                "[limits]\nlogin_failure_audit_window_secs = 60\nadmin_login_failures_window_secs = 3000000\n",
            )
        },
    ) else {
        return;
    };
    runtime().block_on(async {
        // The start of a window, so that the test knows where windows end.
        let t0 = OffsetDateTime::from_unix_timestamp(
            OffsetDateTime::now_utc().unix_timestamp() / 60 * 60,
        )
        .unwrap();
        let (app, clock) = app(&config, t0).await;
        let s = &app.state;
        let source: IpAddr = "198.51.100.9".parse().unwrap();
        let flusher = Arc::new(LoginFailureFlusher::new(
            app.login_failures.clone(),
            s.store.clone(),
            s.metrics.clone(),
        ));
        let audit = || async { s.store.counts().await.unwrap()["audit_events"] };
        let before = audit().await;
        for i in 0..1000 {
            let r = s
                .login
                .authenticate(Some(&format!("kwa_bad_{i}")), Some(source))
                .await;
            assert!(r.is_err());
        }
        // The window is open: nothing written yet, however often the job runs.
        clock.advance(time::Duration::seconds(59));
        flusher.tick(clock.now()).await.unwrap();
        flusher.tick(clock.now()).await.unwrap();
        assert_eq!(audit().await, before);
        // It closes: one event with the count.
        clock.advance(time::Duration::seconds(1));
        assert_eq!(flusher.flush_closed(clock.now()).await.unwrap(), 1);
        assert_eq!(audit().await, before + 1);
        let events = s
            .store
            .audit_events(keyward::store::AuditQuery {
                from_seq: before + 1,
                limit: 10,
            })
            .await
            .unwrap();
        let d = &events[0].details;
        assert_eq!(events[0].action, "admin.login_failed");
        assert_eq!(events[0].source.as_deref(), Some("198.51.100.9"));
        assert_eq!(d["count"], 1000);
        assert_eq!(d["reasons"]["unknown_token"], 10);
        assert_eq!(d["reasons"]["rate_limited"], 990);
        assert_eq!(d["window_start"], keyward::clock::rfc3339(t0));
        assert_eq!(
            d["window_end"],
            keyward::clock::rfc3339(t0 + time::Duration::seconds(60))
        );

        // Failures in the next window are written when the scheduler shuts
        // down, before its window closes.
        for _ in 0..5 {
            assert!(
                s.login
                    .authenticate(Some("kwa_bad"), Some(source))
                    .await
                    .is_err()
            );
        }
        let mut jobs = Scheduler::new(clock.clone(), s.metrics.clone());
        jobs.spawn(flusher.clone());
        jobs.shutdown().await;
        assert_eq!(audit().await, before + 2);
        let last = s
            .store
            .audit_events(keyward::store::AuditQuery {
                from_seq: before + 2,
                limit: 10,
            })
            .await
            .unwrap();
        assert_eq!(last[0].details["count"], 5);
        assert_eq!(last[0].details["reasons"]["rate_limited"], 5);
        assert_eq!(
            last[0].details["window_end"],
            keyward::clock::rfc3339(clock.now()),
            "an open window is cut at shutdown"
        );
    });
}

/// The renewal-notices job with a manual clock: each certificate against its
/// own group's profile window (the store is asked for the largest one),
/// batches of 500 each one commit with one audit event, nothing notified
/// twice, and more as time passes. Rows are written straight into the store
/// (hundreds of certificates; their DER is not what this job reads).
#[test]
fn renewal_notices_follow_each_profile_window_in_batches() {
    let Some((config, _)) = child_config(
        "renewal_notices_follow_each_profile_window_in_batches",
        |env| {
            let ca = format!(
                "{}\n[[profile]]\nname = \"short\"\nissuer = \"devices\"\nvalidity_days = 100\n\
                 key_algorithms = [\"ecdsa-p256\"]\nrenewal_window_days = 60\n",
                common::repo_file("policies/ca.toml")
            );
            std::fs::write(env.path("policies/ca.toml"), ca).unwrap();
            let en = format!(
                "{}\n[[group]]\nname = \"soon\"\nprofile = \"short\"\n",
                common::one_approver_enrollment()
            );
            std::fs::write(env.path("policies/enrollment.toml"), en).unwrap();
        },
    ) else {
        return;
    };
    use keyward::jobs::renewal_notices::{NoticeReport, RenewalNotices};
    use keyward::store::{
        CertificateRecord, CertificateStatus, Change, DeviceRecord, DeviceStatus, Write,
    };
    runtime().block_on(async {
        let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let (app, clock) = app(&config, t0).await;
        let s = &app.state;
        let store = s.store.clone();
        let key = store.get_ca("devices").await.unwrap().unwrap().key_id;
        let now = t0.unix_timestamp();
        let day = 86_400;
        // (group, count, days left)
        let plan = [
            ("default", 650, 29), // due (30-day window)
            ("default", 10, 45),  // read (within 60 days), not due yet
            ("soon", 10, 45),     // due (60-day window)
            ("soon", 5, 70),      // beyond the largest window: not even read
        ];
        let mut serial = 0u32;
        for (group, count, left) in plan {
            let mut change = Change::new().audit(keyward::audit::AuditDraft::new(
                "test",
                "test.insert",
                "devices",
            ));
            for _ in 0..count {
                serial += 1;
                let d = DeviceRecord {
                    id: uuid::Uuid::now_v7(),
                    name: format!("d-{serial}"),
                    device_type: None,
                    location: None,
                    firmware: None,
                    group: group.into(),
                    status: DeviceStatus::Active,
                    created_at: now,
                    updated_at: now,
                };
                change = change.write(Write::InsertCertificate(CertificateRecord {
                    serial: format!("{serial:08X}"),
                    device_id: Some(d.id),
                    issuer_ca: "devices".into(),
                    issuer_key_id: key,
                    subject: format!("CN={}", d.id),
                    not_before: now,
                    not_after: now + left * day,
                    fingerprint_sha256: format!("{serial:064x}"),
                    der: vec![0x30, 0x00],
                    status: CertificateStatus::Valid,
                    revoked_at: None,
                    revocation_reason: None,
                    created_at: now,
                    superseded_by: None,
                    spki_sha256: Some(format!("{serial:064x}")),
                }));
                change.writes.insert(0, Write::InsertDevice(d));
            }
            store.commit(change).await.unwrap();
        }
        let job = RenewalNotices::new(
            store.clone(),
            s.ca.clone(),
            app.notifiers(),
            s.metrics.clone(),
            Duration::from_secs(600),
        );
        let events = |store: Arc<dyn Store>| async move {
            store
                .audit_events(keyward::store::AuditQuery {
                    from_seq: 1,
                    limit: 10_000,
                })
                .await
                .unwrap()
                .into_iter()
                .filter(|e| e.action == "device.renewal_due")
                .map(|e| e.details)
                .collect::<Vec<_>>()
        };

        let r = job.run(clock.now()).await.unwrap();
        assert_eq!(
            r,
            NoticeReport {
                notified: 660,
                not_due: 10
            }
        );
        let audited = events(store.clone()).await;
        assert_eq!(
            audited
                .iter()
                .map(|d| d["count"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            [500, 160],
            "one event per batch"
        );
        assert_eq!(audited[0]["serials"].as_array().unwrap().len(), 500);
        assert_eq!(audited[0]["serials"][0], "00000001");
        assert_eq!(s.metrics.renewal_notices.get(), 660);
        // Nothing twice.
        let r = job.run(clock.now()).await.unwrap();
        assert_eq!(
            r,
            NoticeReport {
                notified: 0,
                not_due: 10
            }
        );
        assert_eq!(events(store.clone()).await.len(), 2);
        // A second before the 45-day default certificates enter their
        // window, they are still not due; at that second they are, and the
        // 70-day short ones (60-day window) came due ten days ago.
        clock.set(t0 + time::Duration::days(15) - time::Duration::seconds(1));
        let r = job.run(clock.now()).await.unwrap();
        assert_eq!(
            r,
            NoticeReport {
                notified: 5,
                not_due: 10
            }
        );
        clock.set(t0 + time::Duration::days(15));
        let r = job.run(clock.now()).await.unwrap();
        assert_eq!(
            r,
            NoticeReport {
                notified: 10,
                not_due: 0
            }
        );
        assert_eq!(job.run(clock.now()).await.unwrap(), NoticeReport::default());
        assert_eq!(s.metrics.renewal_notices.get(), 675);
        assert_eq!(events(store.clone()).await.len(), 4);
        job.tick(clock.now()).await.unwrap();
        assert_eq!(job.name(), "renewal_notices");
    });
}

#[test]
fn backup_job_makes_verifies_and_prunes_on_its_schedules() {
    let Some((config, dir)) = child_config(
        "backup_job_makes_verifies_and_prunes_on_its_schedules",
        |env| {
            let id = env.path("backup-id.txt");
            let out = std::process::Command::new("age-keygen")
                .arg("-o")
                .arg(&id)
                .output()
                .unwrap();
            assert!(out.status.success());
            let out = std::process::Command::new("age-keygen")
                .arg("-y")
                .arg(&id)
                .output()
                .unwrap();
            // The verification key and an officer's offline key (the CA
            // keys' wrapping key is never sealed to the verification key).
            let officer = env.path("officer-id.txt");
            assert!(
                std::process::Command::new("age-keygen")
                    .arg("-o")
                    .arg(&officer)
                    .output()
                    .unwrap()
                    .status
                    .success()
            );
            let officer_pub = std::process::Command::new("age-keygen")
                .arg("-y")
                .arg(&officer)
                .output()
                .unwrap();
            let mut recipients = out.stdout;
            recipients.extend_from_slice(&officer_pub.stdout);
            std::fs::write(env.path("recipients.txt"), recipients).unwrap();
            // Backups at 02:00, verification at 03:00, one daily and no
            // weekly kept: each new backup prunes the one before.
            env.append_config(
                "[backup]\ndir = \"spool\"\nrecipients_files = [\"recipients.txt\"]\n\
                 verify_identity_file = \"backup-id.txt\"\nschedule = \"0 2 * * *\"\n\
                 verify_schedule = \"0 3 * * *\"\nkeep_daily = 1\nkeep_weekly = 0\n\n\
                 [[backup.locations]]\nname = \"nas\"\ntype = \"dir\"\npath = \"nas\"\n",
            );
        },
    ) else {
        return;
    };
    runtime().block_on(async {
        use keyward::jobs::backup::BackupJob;
        // 01:30 UTC on some day.
        let t0 = OffsetDateTime::now_utc().replace_time(time::Time::from_hms(1, 30, 0).unwrap())
            + time::Duration::days(1);
        let (app, clock) = app(&config, t0).await;
        let s = &app.state;
        let svc = s.backups.clone().expect("[backup] is configured");
        let job = BackupJob::new(svc.clone(), Duration::from_secs(30));
        let backups = |all| {
            let store = s.store.clone();
            async move { store.list_backups(all, 100).await.unwrap() }
        };
        // The first tick only notes the time; nothing fired yet.
        job.tick(clock.now()).await.unwrap();
        clock.advance(time::Duration::minutes(29));
        job.tick(clock.now()).await.unwrap();
        assert!(backups(true).await.is_empty(), "a backup before 02:00");
        // 02:00 passes: one scheduled backup, stored in the location.
        clock.advance(time::Duration::minutes(2));
        job.tick(clock.now()).await.unwrap();
        let made = backups(false).await;
        assert_eq!(made.len(), 1, "{made:?}");
        assert_eq!(made[0].trigger.as_str(), "scheduled");
        assert_eq!(made[0].replicas[0].state.as_str(), "stored");
        assert!(made[0].replicas[0].verified_at.is_none());
        assert!(dir.join("nas").join(&made[0].file_name).exists());
        // 03:00 passes: verified in the location (decrypted, every hash).
        clock.advance(time::Duration::hours(1));
        job.tick(clock.now()).await.unwrap();
        let verified = backups(false).await;
        assert_eq!(
            verified[0].replicas[0].verified_at,
            Some(clock.now().unix_timestamp())
        );
        // The next night: a new backup, and retention prunes the first.
        clock.advance(time::Duration::hours(23));
        job.tick(clock.now()).await.unwrap();
        let all = backups(true).await;
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(
            all[0].pruned_at.is_none() && all[1].pruned_at.is_some(),
            "{all:?}"
        );
        assert!(!dir.join("nas").join(&all[1].file_name).exists());
        assert!(!dir.join("spool").join(&all[1].file_name).exists());
        let events: Vec<String> = s
            .store
            .audit_events(keyward::store::AuditQuery {
                from_seq: 0,
                limit: 10_000,
            })
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .filter(|a| a.starts_with("backup."))
            .collect();
        assert_eq!(
            events,
            [
                "backup.create",
                "backup.replicate",
                "backup.verify",
                "backup.verify",
                "backup.create",
                "backup.replicate",
                "backup.prune"
            ],
            "{events:?}"
        );
    });
}
