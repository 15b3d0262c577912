//! The KeyStore conformance suite and PKCS#11-specific behaviour, in-process
//! against SoftHSM2. SoftHSM2 reads `SOFTHSM2_CONF` once, at `C_Initialize`,
//! so this binary re-executes itself with a private token directory set
//! (no process-global environment mutation) and each test makes its own
//! token, found by label.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/keystore_suite.rs"]
mod suite;

use keyward::audit::ChainVerifier;
use keyward::ca::keys;
use keyward::clock::SystemClock;
use keyward::keystore::pkcs11::uri::Pkcs11Uri;
use keyward::keystore::pkcs11::{Pkcs11KeyStore, Pkcs11Settings, TokenSelector, context};
use keyward::keystore::{KeyAlgorithm, KeyStore, KeyStoreError, KeyStores, PinFailure};
use keyward::store::sqlite::SqliteStore;
use keyward::store::{AuditQuery, KeyPurpose, KeyState, Store};
use libtest_mimic::{Arguments, Failed, Trial};
use secrecy::SecretString;
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

const READY: &str = "KEYWARD_TEST_SOFTHSM_DIR";

/// A fresh token on SoftHSM's free slot, made through PKCS#11 in this process.
fn new_token() -> String {
    let ctx = context(&common::softhsm_module()).unwrap();
    let label = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    keyward::softhsm::init_token_in_process(
        &ctx,
        &label,
        &SecretString::from(common::SO_PIN),
        &SecretString::from(common::PIN),
    )
    .unwrap();
    label
}

fn settings(selector: TokenSelector, pin: &str, sessions: usize) -> Pkcs11Settings {
    Pkcs11Settings {
        module: common::softhsm_module(),
        selector,
        pin: SecretString::from(pin.to_string()),
        sessions,
    }
}

async fn open(label: &str) -> Arc<dyn KeyStore> {
    Arc::new(
        Pkcs11KeyStore::open(settings(
            TokenSelector::Label(label.to_string()),
            common::PIN,
            2,
        ))
        .await
        .unwrap(),
    )
}

fn run<F, Fut>(f: F) -> Result<(), Failed>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(f());
    Ok(())
}

/// A conformance trial against a fresh SoftHSM2 token.
fn conformance<F, Fut>(name: &str, f: F) -> Trial
where
    F: FnOnce(Arc<dyn KeyStore>) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    Trial::test(format!("conformance::softhsm2::{name}"), move || {
        run(|| async move {
            let ks = open(&new_token()).await;
            f(ks).await
        })
    })
}

/// Reads a key pair's usage attributes back through cryptoki, on a session
/// of our own (not the backend's).
fn usage_attributes(
    label: &str,
    id: &[u8],
) -> Vec<(
    cryptoki::object::ObjectClass,
    Vec<cryptoki::object::Attribute>,
)> {
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    let ctx = context(&common::softhsm_module()).unwrap();
    let slot = ctx
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim() == label)
        .unwrap();
    let session = ctx.open_ro_session(slot).unwrap();
    match session.login(
        cryptoki::session::UserType::User,
        Some(&SecretString::from(common::PIN.to_string())),
    ) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("login: {e}"),
    }
    let mut out = Vec::new();
    for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
        let found = session
            .find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
            .unwrap();
        assert_eq!(found.len(), 1, "{class:?}");
        let wanted: &[AttributeType] = if class == ObjectClass::PRIVATE_KEY {
            &[
                AttributeType::Sign,
                AttributeType::SignRecover,
                AttributeType::Decrypt,
                AttributeType::Unwrap,
                AttributeType::Derive,
                AttributeType::Modifiable,
            ]
        } else {
            &[
                AttributeType::Verify,
                AttributeType::VerifyRecover,
                AttributeType::Encrypt,
                AttributeType::Wrap,
                AttributeType::Derive,
                AttributeType::Modifiable,
            ]
        };
        out.push((class, session.get_attributes(found[0], wanted).unwrap()));
    }
    out
}

/// A logged-in session of this process on the token labelled `label`.
fn observer_session(label: &str) -> cryptoki::session::Session {
    let ctx = context(&common::softhsm_module()).unwrap();
    let slot = ctx
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim() == label)
        .unwrap();
    let session = ctx.open_rw_session(slot).unwrap();
    match session.login(
        cryptoki::session::UserType::User,
        Some(&SecretString::from(common::PIN.to_string())),
    ) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("login: {e}"),
    }
    session
}

fn all_objects(session: &cryptoki::session::Session) -> Vec<cryptoki::object::ObjectHandle> {
    session.find_objects(&[]).unwrap()
}

fn secret_keys(session: &cryptoki::session::Session) -> usize {
    session
        .find_objects(&[cryptoki::object::Attribute::Class(
            cryptoki::object::ObjectClass::SECRET_KEY,
        )])
        .unwrap()
        .len()
}

/// `Usage:` lines of the objects labelled `label`, as the stock `pkcs11-tool -O` prints them.
fn pkcs11_tool_usage(token: &str, label: &str) -> Vec<(String, String)> {
    let conf = std::path::Path::new(&std::env::var_os(READY).unwrap()).join("softhsm2.conf");
    let out = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &conf)
        .arg("--module")
        .arg(common::softhsm_module())
        .args([
            "--token-label",
            token,
            "--login",
            "--pin",
            common::PIN,
            "-O",
        ])
        .output()
        .expect("pkcs11-tool missing: run scripts/test.sh (package opensc)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Blocks start with "<Class> Object;" and hold "label:" and "Usage:" lines.
    let mut found = Vec::new();
    let mut class = String::new();
    let mut mine = false;
    for line in text.lines() {
        if let Some((c, _)) = line.split_once(" Object;") {
            class = c.trim().to_string();
            mine = false;
        } else if let Some(l) = line.trim().strip_prefix("label:") {
            mine = l.trim() == label;
        } else if let Some(u) = line.trim().strip_prefix("Usage:")
            && mine
        {
            found.push((class.clone(), u.trim().to_string()));
        }
    }
    found
}

fn trials() -> Vec<Trial> {
    let mut t = vec![
        conformance("sign_verify_ecdsa_p256", |ks| async move {
            suite::sign_and_verify(ks.as_ref(), KeyAlgorithm::EcdsaP256).await
        }),
        conformance("sign_verify_ecdsa_p384", |ks| async move {
            suite::sign_and_verify(ks.as_ref(), KeyAlgorithm::EcdsaP384).await
        }),
        conformance("sign_verify_rsa_2048", |ks| async move {
            suite::sign_and_verify(ks.as_ref(), KeyAlgorithm::Rsa2048).await
        }),
        conformance("sign_verify_rsa_3072", |ks| async move {
            suite::sign_and_verify(ks.as_ref(), KeyAlgorithm::Rsa3072).await
        }),
        conformance("sign_verify_ed25519_when_offered", |ks| async move {
            if ks
                .capabilities()
                .algorithms
                .contains(&KeyAlgorithm::Ed25519)
            {
                suite::sign_and_verify(ks.as_ref(), KeyAlgorithm::Ed25519).await
            }
        }),
        conformance("keys_are_sensitive_and_not_extractable", |ks| async move {
            suite::keys_are_sensitive_and_not_extractable(ks.as_ref()).await
        }),
        conformance("destroy_removes_the_key", |ks| async move {
            suite::destroy_removes_the_key(ks.as_ref()).await
        }),
        conformance("foreign_handles_are_refused", |ks| async move {
            suite::foreign_handles_are_refused(ks.as_ref()).await
        }),
        conformance("concurrent_signers_queue", suite::concurrent_signers_queue),
        conformance("recovers_after_logout", |ks| async move {
            suite::recovers_after_logout(ks.as_ref()).await
        }),
        conformance("export_ecdsa_p256", |ks| async move {
            suite::export_gives_the_generated_key(ks.as_ref(), KeyAlgorithm::EcdsaP256).await
        }),
        conformance("export_rsa_2048", |ks| async move {
            suite::export_gives_the_generated_key(ks.as_ref(), KeyAlgorithm::Rsa2048).await
        }),
        conformance("export_ed25519_when_offered", |ks| async move {
            if ks
                .capabilities()
                .algorithms
                .contains(&KeyAlgorithm::Ed25519)
            {
                suite::export_gives_the_generated_key_or_says_not_wrappable(
                    ks.as_ref(),
                    KeyAlgorithm::Ed25519,
                )
                .await
            }
        }),
        conformance("export_refuses_non_extractable_keys", |ks| async move {
            suite::export_refuses_non_extractable_keys(ks.as_ref()).await
        }),
        conformance("decrypt_data_key_round_trip", |ks| async move {
            suite::decrypt_data_key_round_trip(ks.as_ref()).await
        }),
    ];
    t.push(Trial::test("pkcs11::decrypt_keys_may_only_decrypt", || {
        run(|| async {
            use cryptoki::object::{Attribute, ObjectClass};
            let label = new_token();
            let ks = open(&label).await;
            let mut spec = suite::spec(KeyAlgorithm::Rsa3072);
            spec.usage = keyward::keystore::KeyUsage::Decrypt;
            ks.generate(&spec).await.unwrap();
            let mut seen = 0;
            for (class, attrs) in usage_attributes(&label, spec.id.as_bytes()) {
                for a in &attrs {
                    let ok = match (class, a) {
                        (ObjectClass::PRIVATE_KEY, Attribute::Decrypt(v)) => *v,
                        (ObjectClass::PUBLIC_KEY, Attribute::Encrypt(v)) => *v,
                        (_, Attribute::Modifiable(v)) => !*v,
                        (
                            _,
                            Attribute::Sign(v)
                            | Attribute::Verify(v)
                            | Attribute::SignRecover(v)
                            | Attribute::VerifyRecover(v)
                            | Attribute::Wrap(v)
                            | Attribute::Unwrap(v)
                            | Attribute::Derive(v),
                        ) => !*v,
                        _ => true,
                    };
                    assert!(ok, "{class:?} {a:?}");
                    seen += 1;
                }
            }
            assert!(seen > 0);
        })
    }));
    t.push(Trial::test(
        "pkcs11::wrap_restore_round_trip_decrypt_key",
        || run(wrap_checks::decrypt_key_round_trip),
    ));
    t.push(Trial::test(
        "pkcs11::capabilities_list_what_softhsm_offers",
        || {
            run(|| async {
                let ks = open(&new_token()).await;
                let caps = ks.capabilities();
                for a in [
                    KeyAlgorithm::EcdsaP256,
                    KeyAlgorithm::EcdsaP384,
                    KeyAlgorithm::Rsa2048,
                    KeyAlgorithm::Rsa3072,
                ] {
                    assert!(caps.algorithms.contains(&a), "{caps:?}");
                }
                assert_eq!(caps.max_concurrent_signers, 2);
                assert!(caps.can_wrap_keys, "SoftHSM2 has CKM_AES_KEY_WRAP_PAD");
            })
        },
    ));
    t.push(Trial::test("pkcs11::keys_may_only_sign_and_verify", || {
        run(|| async {
            use cryptoki::object::{Attribute, ObjectClass};
            let label = new_token();
            let ks = open(&label).await;
            let algorithms = ks.capabilities().algorithms.clone();
            assert!(algorithms.len() >= 5, "{algorithms:?}");
            for algorithm in algorithms {
                let spec = suite::spec(algorithm);
                ks.generate(&spec).await.unwrap();
                let unmodifiable = ks.capabilities().unmodifiable_keys;
                assert_eq!(
                    unmodifiable,
                    Some(true),
                    "SoftHSM2 accepts CKA_MODIFIABLE=false; the backend should have used it"
                );
                for (class, attrs) in usage_attributes(&label, spec.id.as_bytes()) {
                    for a in &attrs {
                        let ok = match (class, a) {
                            (ObjectClass::PRIVATE_KEY, Attribute::Sign(v)) => *v,
                            (ObjectClass::PUBLIC_KEY, Attribute::Verify(v)) => *v,
                            (_, Attribute::Modifiable(v)) => !*v,
                            (
                                _,
                                Attribute::SignRecover(v)
                                | Attribute::VerifyRecover(v)
                                | Attribute::Decrypt(v)
                                | Attribute::Encrypt(v)
                                | Attribute::Unwrap(v)
                                | Attribute::Wrap(v)
                                | Attribute::Derive(v),
                            ) => !*v,
                            _ => true,
                        };
                        assert!(ok, "{algorithm} {class:?}: {a:?}");
                    }
                }
                // The same, read by a tool nobody here wrote.
                let usage = pkcs11_tool_usage(&label, &spec.label);
                assert_eq!(usage.len(), 2, "{algorithm}: {usage:?}");
                for (class, u) in &usage {
                    let words: Vec<&str> = u.split(", ").collect();
                    for bad in ["decrypt", "unwrap", "derive", "encrypt", "wrap"] {
                        assert!(!words.contains(&bad), "{algorithm} {class}: {u}");
                    }
                    let needed = if class.starts_with("Private") {
                        "sign"
                    } else {
                        "verify"
                    };
                    assert!(words.contains(&needed), "{algorithm} {class}: {u}");
                }
                // Least privilege does not get in the way of signing.
                suite::sign_and_verify(ks.as_ref(), algorithm).await;
            }
        })
    }));
    t.push(Trial::test(
        "pkcs11::a_rejected_pin_latches_and_logins_stop",
        || {
            run(|| async {
                use cryptoki::session::UserType;
                let label = new_token();
                let ks = open(&label).await;
                let key = ks
                    .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
                    .await
                    .unwrap();
                // An operator changes the user PIN (C_SetPIN) from another
                // session while the backend runs.
                let ctx = context(&common::softhsm_module()).unwrap();
                let slot = ctx
                    .get_slots_with_initialized_token()
                    .unwrap()
                    .into_iter()
                    .find(|s| ctx.get_token_info(*s).unwrap().label().trim() == label)
                    .unwrap();
                let admin = ctx.open_rw_session(slot).unwrap();
                let old = SecretString::from(common::PIN.to_string());
                let new = SecretString::from("changed-pin-9".to_string());
                // Login state is per application: the backend's login covers this session.
                admin.set_pin(&old, &new).unwrap();
                // The session is lost (here: logout), so the backend logs in again, with the old PIN.
                ks.close().await.unwrap();
                let err = ks
                    .sign(&key.handle, KeyAlgorithm::EcdsaP256, b"x")
                    .await
                    .unwrap_err();
                assert!(
                    matches!(
                        err,
                        KeyStoreError::PinRejected(PinFailure::Incorrect { .. })
                    ),
                    "{err:?}"
                );
                // Put the old PIN back and log out: from now on a login with the
                // configured PIN would succeed, so any success below would be a
                // login the latch should have prevented.
                admin.login(UserType::User, Some(&new)).unwrap();
                admin.set_pin(&new, &old).unwrap();
                admin.logout().unwrap();
                for _ in 0..5 {
                    let err = ks
                        .sign(&key.handle, KeyAlgorithm::EcdsaP256, b"x")
                        .await
                        .unwrap_err();
                    assert!(matches!(err, KeyStoreError::PinLatched(_)), "{err:?}");
                }
                let err = ks.health().await.unwrap_err();
                assert!(matches!(err, KeyStoreError::PinLatched(_)), "{err:?}");
                assert_eq!(err.code(), "pin_latched");
                assert!(ks.exists(&key.handle).await.is_err());
                // The operator's action: a restart (a new backend) with the right PIN.
                let restarted = open(&label).await;
                suite::sign_and_verify(restarted.as_ref(), KeyAlgorithm::EcdsaP256).await;
                restarted.health().await.unwrap();
            })
        },
    ));
    t.push(Trial::test("pkcs11::extractable_only_when_asked", || {
        run(|| async {
            let ks = open(&new_token()).await;
            let mut spec = suite::spec(KeyAlgorithm::EcdsaP256);
            spec.extractable = true;
            let key = ks.generate(&spec).await.unwrap();
            let p = ks.protection(&key.handle).await.unwrap();
            assert!(p.extractable && p.sensitive, "{p:?}");
        })
    }));
    t.push(Trial::test(
        "pkcs11::export_leaves_no_wrapping_key_on_the_token",
        || {
            run(|| async {
                let label = new_token();
                let ks = open(&label).await;
                let mut spec = suite::spec(KeyAlgorithm::EcdsaP256);
                spec.extractable = true;
                let key = ks.generate(&spec).await.unwrap();
                // Session objects are visible to every session of this process,
                // so an observer session sees the backend's wrapping keys too.
                let observer = observer_session(&label);
                let before = all_objects(&observer);
                assert_eq!(secret_keys(&observer), 0, "{before:?}");
                // The observer can see a session secret key made elsewhere:
                // the check below is able to fail.
                let other = observer_session(&label);
                let probe = other
                    .create_object(&[
                        cryptoki::object::Attribute::Class(
                            cryptoki::object::ObjectClass::SECRET_KEY,
                        ),
                        cryptoki::object::Attribute::KeyType(cryptoki::object::KeyType::AES),
                        cryptoki::object::Attribute::Token(false),
                        cryptoki::object::Attribute::Value(vec![1u8; 32]),
                    ])
                    .unwrap();
                assert_eq!(secret_keys(&observer), 1);
                other.destroy_object(probe).unwrap();
                for _ in 0..3 {
                    ks.export_private_key(&key.handle).await.unwrap();
                }
                // A refused export (non-extractable key) leaves nothing either.
                let fixed = ks
                    .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
                    .await
                    .unwrap();
                assert!(ks.export_private_key(&fixed.handle).await.is_err());
                assert_eq!(secret_keys(&observer), 0);
                let after = all_objects(&observer);
                // Only the second key pair's two objects are new.
                assert_eq!(after.len(), before.len() + 2, "{before:?} -> {after:?}");
            })
        },
    ));
    t.push(Trial::test(
        "pkcs11::signer_threads_sign_in_parallel_and_end_with_the_store",
        || {
            run(|| async {
                fn signer_threads() -> usize {
                    std::fs::read_dir("/proc/self/task")
                        .unwrap()
                        .flatten()
                        .filter(|t| {
                            std::fs::read_to_string(t.path().join("comm"))
                                .unwrap_or_default()
                                // comm holds 15 bytes: "keyward-p11-sig".
                                .starts_with("keyward-p11-sig")
                        })
                        .count()
                }
                let before = signer_threads();
                let ks: Arc<dyn KeyStore> = Arc::new(
                    Pkcs11KeyStore::open(settings(
                        TokenSelector::Label(new_token()),
                        common::PIN,
                        2,
                    ))
                    .await
                    .unwrap()
                    .with_signer_threads()
                    .unwrap(),
                );
                // One thread per session (each names itself once it runs).
                let mut waited = 0;
                while signer_threads() < before + 2 && waited < 500 {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    waited += 1;
                }
                assert_eq!(signer_threads(), before + 2);
                suite::sign_and_verify(ks.as_ref(), KeyAlgorithm::EcdsaP256).await;
                if ks
                    .capabilities()
                    .algorithms
                    .contains(&KeyAlgorithm::Ed25519)
                {
                    suite::sign_and_verify(ks.as_ref(), KeyAlgorithm::Ed25519).await;
                }
                let key = ks
                    .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
                    .await
                    .unwrap();
                // 64 signatures in flight over 2 threads: each verifies
                // (ring) over its own message and not over another's.
                let signs = (0..64u32).map(|i| {
                    let (ks, h) = (ks.clone(), key.handle.clone());
                    tokio::spawn(async move {
                        let msg = format!("message {i}");
                        let sig = ks
                            .sign(&h, KeyAlgorithm::EcdsaP256, msg.as_bytes())
                            .await
                            .unwrap();
                        (msg, sig)
                    })
                });
                let signed = futures::future::join_all(signs).await;
                for (i, r) in signed.into_iter().enumerate() {
                    let (msg, sig) = r.unwrap();
                    let other = format!("message {}", (i + 1) % 64);
                    assert!(suite::verify(
                        &key.public_key_der,
                        KeyAlgorithm::EcdsaP256,
                        msg.as_bytes(),
                        &sig
                    ));
                    assert!(!suite::verify(
                        &key.public_key_der,
                        KeyAlgorithm::EcdsaP256,
                        other.as_bytes(),
                        &sig
                    ));
                }
                // A bad request answers with its error and the threads stay.
                ks.destroy(&key.handle).await.unwrap();
                let gone = ks.sign(&key.handle, KeyAlgorithm::EcdsaP256, b"x").await;
                assert!(
                    matches!(gone, Err(KeyStoreError::KeyNotFound(_))),
                    "{gone:?}"
                );
                assert_eq!(signer_threads(), before + 2);
                // Dropping the store closes the queue: the threads end.
                drop(ks);
                let mut waited = 0;
                while signer_threads() > before && waited < 500 {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    waited += 1;
                }
                assert_eq!(signer_threads(), before, "signer threads outlive the store");
            })
        },
    ));
    t.push(Trial::test(
        "pkcs11::handles_are_rfc7512_uris_and_listed",
        || {
            run(|| async {
                let label = new_token();
                let ks = open(&label).await;
                let spec = suite::spec(KeyAlgorithm::EcdsaP256);
                let key = ks.generate(&spec).await.unwrap();
                assert_eq!(key.handle, ks.planned_handle(&spec));
                let uri = Pkcs11Uri::parse(&key.handle.0).unwrap();
                assert_eq!(uri.token().as_deref(), Some(label.as_str()));
                assert_eq!(uri.id(), Some(&spec.id.as_bytes()[..]));
                assert!(
                    ks.list()
                        .await
                        .unwrap()
                        .iter()
                        .any(|(h, l)| *h == key.handle && *l == spec.label)
                );
            })
        },
    ));
    t.push(Trial::test("pkcs11::token_chosen_by_uri_or_serial", || {
        run(|| async {
            let label = new_token();
            let by_uri = Pkcs11KeyStore::open(settings(
                TokenSelector::Uri(
                    Pkcs11Uri::parse(&format!(
                        "pkcs11:token={label};manufacturer=SoftHSM%20project"
                    ))
                    .unwrap(),
                ),
                common::PIN,
                1,
            ))
            .await
            .unwrap();
            assert_eq!(by_uri.token_label(), label);
            let ctx = context(&common::softhsm_module()).unwrap();
            let serial = ctx
                .get_slots_with_initialized_token()
                .unwrap()
                .into_iter()
                .map(|s| ctx.get_token_info(s).unwrap())
                .find(|i| i.label().trim() == label)
                .unwrap()
                .serial_number()
                .trim()
                .to_string();
            let by_serial =
                Pkcs11KeyStore::open(settings(TokenSelector::Serial(serial), common::PIN, 1))
                    .await
                    .unwrap();
            assert_eq!(by_serial.token_label(), label);
        })
    }));
    t.push(Trial::test("pkcs11::wrong_pin_missing_token_missing_module", || {
        run(|| async {
            let label = new_token();
            let err = Pkcs11KeyStore::open(settings(TokenSelector::Label(label.clone()), "wrong-pin", 1)).await.err().unwrap();
            assert!(matches!(err, KeyStoreError::PinRejected(PinFailure::Incorrect { .. })), "{err:?}");
            assert_eq!(err.code(), "pin_rejected");
            let err = Pkcs11KeyStore::open(settings(TokenSelector::Label("absent".into()), common::PIN, 1)).await.err().unwrap();
            assert!(matches!(&err, KeyStoreError::TokenNotFound { present, .. } if present.contains(&label)), "{err:?}");
            let mut s = settings(TokenSelector::Label(label), common::PIN, 1);
            s.module = "/nonexistent/module.so".into();
            let err = Pkcs11KeyStore::open(s).await.err().unwrap();
            assert!(matches!(err, KeyStoreError::ModuleLoad { .. }), "{err:?}");
        })
    }));
    t.push(Trial::test(
        "lifecycle::unfinished_generation_is_reconciled_at_start",
        || {
            run(|| async {
                let ks = open(&new_token()).await;
                let dir = tempfile::tempdir().unwrap();
                let clock = Arc::new(SystemClock);
                let store = SqliteStore::open(&dir.path().join("k.db"), 16, clock.clone()).unwrap();
                // Steps 1 and 2 of key creation, then a "crash" before step 3.
                let pending = keys::begin(
                    ks.as_ref(),
                    &store,
                    clock.as_ref(),
                    "test",
                    keys::NewKey {
                        keystore: "default",
                        label: "orphan".into(),
                        purpose: KeyPurpose::IssuingCa,
                        algorithm: KeyAlgorithm::EcdsaP256,
                        ca_name: None,
                        extractable: false,
                    },
                )
                .await
                .unwrap();
                assert!(ks.exists(&pending.handle).await.unwrap());
                assert_eq!(
                    store.get_key(pending.id).await.unwrap().unwrap().state,
                    KeyState::Generating
                );
                let stores = KeyStores::new(ks.clone());
                let cleaned = keys::reconcile(&stores, &store, clock.as_ref())
                    .await
                    .unwrap();
                assert_eq!(cleaned, 1);
                assert!(
                    !ks.exists(&pending.handle).await.unwrap(),
                    "orphan HSM object survived"
                );
                assert_eq!(
                    store.get_key(pending.id).await.unwrap().unwrap().state,
                    KeyState::Destroyed
                );
                assert_eq!(
                    keys::reconcile(&stores, &store, clock.as_ref())
                        .await
                        .unwrap(),
                    0
                );
                let events = store
                    .audit_events(AuditQuery {
                        from_seq: 1,
                        limit: 100,
                    })
                    .await
                    .unwrap();
                assert!(events.iter().any(|e| e.action == "key.reconcile"));
                let mut v = ChainVerifier::default();
                for e in &events {
                    v.push(e).unwrap();
                }
            })
        },
    ));
    for (name, algorithm) in [
        ("ecdsa_p256", KeyAlgorithm::EcdsaP256),
        ("ecdsa_p384", KeyAlgorithm::EcdsaP384),
        ("rsa_2048", KeyAlgorithm::Rsa2048),
    ] {
        t.push(Trial::test(
            format!("pkcs11::wrap_restore_round_trip_{name}"),
            move || run(move || wrap_checks::round_trip(algorithm)),
        ));
    }
    t.push(Trial::test("pkcs11::wrap_ed25519_is_not_wrappable", || {
        run(wrap_checks::ed25519_is_not_wrappable)
    }));
    t.push(Trial::test(
        "pkcs11::wrap_refuses_non_extractable_keys",
        || run(wrap_checks::non_extractable_is_refused),
    ));
    t.push(Trial::test(
        "pkcs11::restore_bad_inputs_leave_nothing",
        || run(wrap_checks::bad_restores_leave_nothing),
    ));
    t.push(Trial::test(
        "pkcs11::restore_refuses_an_occupied_id",
        || run(wrap_checks::occupied_id_is_refused),
    ));
    t.push(Trial::test(
        "ca::device_certificates_are_checked_before_they_are_stored",
        || run(ca_checks::device_certificates_are_checked_before_they_are_stored),
    ));
    t
}

/// Issuance against a real token: the certificate carries keyward's own
/// encoding of the device key, and an HSM signature that does not verify
/// stores nothing.
mod ca_checks {
    use super::*;
    use async_trait::async_trait;
    use der::{Decode, Encode};
    use keyward::ca::CaService;
    use keyward::keystore::{Capabilities, GeneratedKey, KeyHandle, KeyProtection, KeySpec};
    use keyward::registry::{RegistryError, RegistryService, Submission};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A key store whose signatures turn bad on demand, as a faulty HSM's would.
    struct Faulty {
        inner: Arc<dyn KeyStore>,
        spoil: AtomicBool,
    }

    #[async_trait]
    impl KeyStore for Faulty {
        fn backend(&self) -> &'static str {
            self.inner.backend()
        }
        fn capabilities(&self) -> &Capabilities {
            self.inner.capabilities()
        }
        fn planned_handle(&self, spec: &KeySpec) -> KeyHandle {
            self.inner.planned_handle(spec)
        }
        async fn generate(&self, spec: &KeySpec) -> Result<GeneratedKey, KeyStoreError> {
            self.inner.generate(spec).await
        }
        async fn public_key(&self, handle: &KeyHandle) -> Result<Vec<u8>, KeyStoreError> {
            self.inner.public_key(handle).await
        }
        async fn sign(
            &self,
            handle: &KeyHandle,
            algorithm: KeyAlgorithm,
            message: &[u8],
        ) -> Result<Vec<u8>, KeyStoreError> {
            let mut sig = self.inner.sign(handle, algorithm, message).await?;
            if self.spoil.load(Ordering::SeqCst) {
                let last = sig.len() - 1;
                sig[last] ^= 0x01;
            }
            Ok(sig)
        }
        async fn store_certificate(
            &self,
            handle: &KeyHandle,
            der: &[u8],
        ) -> Result<(), KeyStoreError> {
            self.inner.store_certificate(handle, der).await
        }
        async fn exists(&self, handle: &KeyHandle) -> Result<bool, KeyStoreError> {
            self.inner.exists(handle).await
        }
        async fn protection(&self, handle: &KeyHandle) -> Result<KeyProtection, KeyStoreError> {
            self.inner.protection(handle).await
        }
        async fn destroy(&self, handle: &KeyHandle) -> Result<(), KeyStoreError> {
            self.inner.destroy(handle).await
        }
        async fn health(&self) -> Result<(), KeyStoreError> {
            self.inner.health().await
        }
        async fn close(&self) -> Result<(), KeyStoreError> {
            self.inner.close().await
        }
    }

    /// An RSA-2048 CSR whose key identifier omits the NULL parameter, signed
    /// with an openssl-made key. Returns (CSR DER, the key as RSAPublicKey DER).
    fn rsa_csr_without_null_parameters(dir: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
        use ring::signature::{KeyPair, RSA_PKCS1_SHA256, RsaKeyPair};
        let key_file = dir.join("rsa.der");
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
                "-out",
            ])
            .arg(&key_file)
            .output()
            .expect("openssl missing: run scripts/test.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key = RsaKeyPair::from_der(&std::fs::read(&key_file).unwrap()).unwrap();
        let public = key.public_key().as_ref().to_vec();
        let info = x509_cert::request::CertReqInfo {
            version: x509_cert::request::Version::V1,
            subject: Decode::from_der(&keyward::ca::x509::name_cn("odd-rsa").unwrap()).unwrap(),
            public_key: spki::SubjectPublicKeyInfoOwned {
                algorithm: spki::AlgorithmIdentifierOwned {
                    oid: const_oid::db::rfc5912::RSA_ENCRYPTION,
                    parameters: None,
                },
                subject_public_key: der::asn1::BitString::from_bytes(&public).unwrap(),
            },
            attributes: Default::default(),
        };
        let mut sig = vec![0; key.public().modulus_len()];
        key.sign(
            &RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            &info.to_der().unwrap(),
            &mut sig,
        )
        .unwrap();
        let req = x509_cert::request::CertReq {
            info,
            algorithm: spki::AlgorithmIdentifierOwned {
                oid: const_oid::db::rfc5912::SHA_256_WITH_RSA_ENCRYPTION,
                parameters: Some(der::asn1::Any::null()),
            },
            signature: der::asn1::BitString::from_bytes(&sig).unwrap(),
        };
        (req.to_der().unwrap(), public)
    }

    pub async fn device_certificates_are_checked_before_they_are_stored() {
        let faulty = Arc::new(Faulty {
            inner: open(&new_token()).await,
            spoil: AtomicBool::new(false),
        });
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(SystemClock);
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("k.db"), 16, clock.clone()).unwrap());
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let enrollment = format!(
            "{}\n[[group]]\nname = \"auto\"\nprofile = \"device\"\napproval = \"auto\"\nopen_enrollment = true\n",
            std::fs::read_to_string(repo.join("enrollment.toml")).unwrap()
        );
        let policies = Arc::new(
            keyward::policy::Policies::from_texts(
                &repo.join("ca.toml"),
                &std::fs::read_to_string(repo.join("ca.toml")).unwrap(),
                &repo.join("enrollment.toml"),
                &enrollment,
            )
            .unwrap(),
        );
        let ca = Arc::new(
            CaService::new(
                KeyStores::new(faulty.clone()),
                store.clone(),
                clock.clone(),
                policies,
            )
            .await
            .unwrap(),
        );
        ca.initialize("test").await.unwrap();
        let registry = RegistryService::new(
            ca.clone(),
            store.clone(),
            clock.clone(),
            keyward::auth::TokenHasher::new(&SecretString::from(
                "test-pepper-0123456789".to_string(),
            )),
            Arc::new(keyward::metrics::Metrics::new().unwrap()),
            keyward::notify::Notifiers::none(
                clock.clone(),
                Arc::new(keyward::metrics::Metrics::new().unwrap()),
            ),
        )
        .unwrap();
        let (csr, rsa_public) = rsa_csr_without_null_parameters(dir.path());
        let submission = Submission {
            csr: Some(csr),
            evidence: keyward::registry::Evidence::None,
            age_recipient: None,
            name: "odd-rsa".into(),
            device_type: None,
            location: None,
            firmware: None,
            group: Some("auto".into()),
            client_addr: None,
        };

        // A healthy HSM: issued, with the canonical key identifier (NULL
        // parameter) and the same key, and a chain `openssl verify` accepts.
        let issued = registry.submit(submission.clone(), None).await.unwrap();
        let serial = issued.registration.certificate_serial.clone().unwrap();
        let cert = store.get_certificate(&serial).await.unwrap().unwrap();
        let parsed = x509_cert::Certificate::from_der(&cert.der).unwrap();
        let spki = parsed.tbs_certificate().subject_public_key_info();
        assert_eq!(spki.algorithm.oid, const_oid::db::rfc5912::RSA_ENCRYPTION);
        assert_eq!(spki.algorithm.parameters, Some(der::asn1::Any::null()));
        assert_eq!(spki.subject_public_key.raw_bytes(), &rsa_public[..]);
        let issuer = ca.issuer(&cert.issuer_ca).unwrap();
        let chain: Vec<_> = issuer
            .chain_pem
            .split_inclusive("-----END CERTIFICATE-----\n")
            .collect();
        let root = common::write(dir.path(), "root.pem", chain.last().unwrap());
        let untrusted = common::write(dir.path(), "chain.pem", &issuer.chain_pem);
        let leaf = common::write(
            dir.path(),
            "leaf.pem",
            &keyward::ca::x509::to_pem(&cert.der).unwrap(),
        );
        let (ok, out) = common::openssl_verify(&root, &untrusted, &leaf);
        assert!(ok, "{out}");

        // A faulty HSM: a clear, typed error and nothing stored.
        faulty.spoil.store(true, Ordering::SeqCst);
        let before = store.counts().await.unwrap();
        let err = registry.submit(submission, None).await.err().unwrap();
        let RegistryError::Ca(e) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(e.code(), "hsm_signature_invalid", "{e}");
        assert!(e.to_string().contains(&cert.issuer_ca), "{e}");
        assert_eq!(store.counts().await.unwrap(), before);
    }
}

fn main() -> ExitCode {
    if std::env::var_os(READY).is_none() {
        let dir = tempfile::tempdir().unwrap();
        let hsm = keyward::softhsm::SoftHsm::prepare(dir.path()).unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(std::env::args_os().skip(1))
            .env("SOFTHSM2_CONF", hsm.conf())
            .env(READY, dir.path())
            .status()
            .unwrap();
        return ExitCode::from(status.code().unwrap_or(1) as u8);
    }
    libtest_mimic::run(&Arguments::from_args(), trials()).exit_code()
}

/// Backups: `wrap_private_key` on one SoftHSM2 token, `unwrap_private_key`
/// into a second, fresh one. What the restore side holds afterwards is read
/// three ways: through the backend, through a cryptoki session of our own,
/// and with OpenSC's `pkcs11-tool` (a separate process).
mod wrap_checks {
    use super::*;
    use keyward::keystore::{GeneratedKey, KeyHandle, KeySpec};
    use zeroize::Zeroizing;

    /// A fresh random key-encryption key, as a backup run makes one.
    fn kek() -> Zeroizing<[u8; 32]> {
        let mut k = Zeroizing::new([0u8; 32]);
        k[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        k[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        k
    }

    /// One object as `pkcs11-tool --list-objects` prints it.
    #[derive(Debug)]
    struct ToolObject {
        class: String,
        label: String,
        id: String,
        usage: Vec<String>,
        access: Vec<String>,
    }

    /// Every token object (public and, logged in, private) that OpenSC's
    /// pkcs11-tool lists. The PIN goes through the environment (`env:`), not argv.
    fn tool_objects(token: &str) -> Vec<ToolObject> {
        let conf = std::path::Path::new(&std::env::var_os(READY).unwrap()).join("softhsm2.conf");
        let out = std::process::Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &conf)
            .env("KEYWARD_TEST_PIN", common::PIN)
            .arg("--module")
            .arg(common::softhsm_module())
            .args([
                "--token-label",
                token,
                "--login",
                "--pin",
                "env:KEYWARD_TEST_PIN",
                "--list-objects",
            ])
            .output()
            .expect("pkcs11-tool missing: run scripts/test.sh (package opensc)");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let words = |s: &str| -> Vec<String> {
            s.split(',')
                .map(|w| w.trim().to_string())
                .filter(|w| !w.is_empty())
                .collect()
        };
        let mut objects: Vec<ToolObject> = Vec::new();
        for line in text.lines() {
            if !line.starts_with(' ') && !line.trim().is_empty() {
                let class = line
                    .split_once(" Object")
                    .or_else(|| line.split_once(" object"))
                    .map_or(line, |(c, _)| c)
                    .trim()
                    .to_string();
                objects.push(ToolObject {
                    class,
                    label: String::new(),
                    id: String::new(),
                    usage: Vec::new(),
                    access: Vec::new(),
                });
                continue;
            }
            let Some(o) = objects.last_mut() else {
                continue;
            };
            let l = line.trim();
            if let Some(v) = l.strip_prefix("label:") {
                o.label = v.trim().to_string();
            } else if let Some(v) = l.strip_prefix("ID:") {
                o.id = v.trim().to_string();
            } else if let Some(v) = l.strip_prefix("Usage:") {
                o.usage = words(v);
            } else if let Some(v) = l.strip_prefix("Access:") {
                o.access = words(v);
            }
        }
        objects
    }

    /// Nothing at all on the token: no private key through the backend, no
    /// object (token or session, so no leftover unwrapping key) through a
    /// cryptoki session of this process, no object for pkcs11-tool.
    async fn assert_token_empty(ks: &dyn KeyStore, token: &str) {
        assert!(ks.list().await.unwrap().is_empty());
        let observer = observer_session(token);
        assert!(all_objects(&observer).is_empty(), "objects left behind");
        let listed = tool_objects(token);
        assert!(listed.is_empty(), "pkcs11-tool still lists {listed:?}");
    }

    async fn extractable_key(
        ks: &dyn KeyStore,
        algorithm: KeyAlgorithm,
    ) -> (KeySpec, GeneratedKey) {
        let mut spec = suite::spec(algorithm);
        spec.extractable = true;
        let key = ks.generate(&spec).await.unwrap();
        (spec, key)
    }

    fn uri_parts(h: &KeyHandle) -> (Option<String>, Vec<u8>) {
        let uri = Pkcs11Uri::parse(&h.0).unwrap();
        (uri.object(), uri.id().unwrap().to_vec())
    }

    /// Wrap on token A, restore onto B as non-extractable and onto C as
    /// extractable; each restored key is the original (same id, label and
    /// public key; its signatures verify under the original public key with
    /// ring) and is protected as asked.
    pub async fn round_trip(algorithm: KeyAlgorithm) {
        let ks_a = open(&new_token()).await;
        let (spec, original) = extractable_key(ks_a.as_ref(), algorithm).await;
        let kek = kek();
        let wrapped = ks_a.wrap_private_key(&original.handle, &kek).await.unwrap();
        assert!(
            wrapped.len() >= 16 && wrapped.len() % 8 == 0,
            "RFC 5649 output"
        );
        for extractable in [false, true] {
            let token = new_token();
            let ks = open(&token).await;
            let mut s = spec.clone();
            s.extractable = extractable;
            let restored = ks
                .unwrap_private_key(&s, &kek, &wrapped, &original.public_key_der)
                .await
                .unwrap();
            assert_eq!(restored.public_key_der, original.public_key_der);
            assert_eq!(restored.handle, ks.planned_handle(&s));
            // Same CKA_LABEL and CKA_ID; the token part names the new token.
            assert_eq!(uri_parts(&restored.handle), uri_parts(&original.handle));
            assert_eq!(
                ks.public_key(&restored.handle).await.unwrap(),
                original.public_key_der
            );
            let msg = b"signed by the restored key";
            let sig = ks.sign(&restored.handle, algorithm, msg).await.unwrap();
            assert!(suite::verify(
                &original.public_key_der,
                algorithm,
                msg,
                &sig
            ));
            assert!(!suite::verify(
                &original.public_key_der,
                algorithm,
                b"other",
                &sig
            ));

            // PKCS#11 defines CKA_ALWAYS_SENSITIVE as "the key has always had
            // CKA_SENSITIVE set" and CKA_NEVER_EXTRACTABLE as "the key has never
            // had CKA_EXTRACTABLE set"; both (and CKA_LOCAL) are set by the token,
            // never by the template (v2.40 §4.9, Table 36 footnotes 2/4/6). A key
            // that arrives through C_UnwrapKey existed outside this token, so the
            // token cannot vouch for either: they are CK_FALSE even when the
            // template says sensitive and non-extractable (SoftHSM 2.6.1,
            // C_UnwrapKey, sets CKA_LOCAL, CKA_ALWAYS_SENSITIVE and
            // CKA_NEVER_EXTRACTABLE to false explicitly). What a restore can and
            // must guarantee is the present state: sensitive, and extractable
            // exactly as the spec asks.
            let p = ks.protection(&restored.handle).await.unwrap();
            assert!(p.sensitive, "{p:?}");
            assert_eq!(p.extractable, extractable, "{p:?}");
            assert!(!p.always_sensitive && !p.never_extractable, "{p:?}");

            // The session copy of the kek is gone (session objects are
            // visible to every session of this process).
            assert_eq!(secret_keys(&observer_session(&token)), 0);

            // The same, read by pkcs11-tool: exactly the pair, nothing else.
            let listed = tool_objects(&token);
            assert_eq!(listed.len(), 2, "{listed:?}");
            let id_hex = hex::encode(s.id.as_bytes());
            for o in &listed {
                assert_eq!(o.label, s.label, "{o:?}");
                assert_eq!(o.id, id_hex, "{o:?}");
                for bad in ["decrypt", "unwrap", "derive", "encrypt", "wrap"] {
                    assert!(!o.usage.iter().any(|u| u == bad), "{o:?}");
                }
            }
            let private = listed
                .iter()
                .find(|o| o.class.starts_with("Private Key"))
                .unwrap_or_else(|| panic!("no private key listed: {listed:?}"));
            assert!(private.usage.iter().any(|u| u == "sign"), "{private:?}");
            let has = |w: &str| private.access.iter().any(|a| a == w);
            assert!(has("sensitive"), "{private:?}");
            assert_eq!(has("extractable"), extractable, "{private:?}");
            for not in ["always sensitive", "never extractable", "local"] {
                assert!(!has(not), "{private:?}");
            }
            assert!(
                listed.iter().any(|o| o.class.starts_with("Public Key")),
                "{listed:?}"
            );

            // The restored pair is as least-privileged as a generated one, and
            // fixed (CKA_MODIFIABLE=false, which SoftHSM2 accepts).
            for (class, attrs) in usage_attributes(&token, s.id.as_bytes()) {
                for a in &attrs {
                    use cryptoki::object::Attribute as A;
                    let ok = match a {
                        A::Sign(v) | A::Verify(v) => *v,
                        A::Modifiable(v)
                        | A::SignRecover(v)
                        | A::VerifyRecover(v)
                        | A::Decrypt(v)
                        | A::Encrypt(v)
                        | A::Unwrap(v)
                        | A::Wrap(v)
                        | A::Derive(v) => !*v,
                        _ => true,
                    };
                    assert!(ok, "{algorithm} {class:?}: {a:?}");
                }
            }

            // Extractability is real, not only reported.
            let again = ks.wrap_private_key(&restored.handle, &kek).await;
            if extractable {
                assert!(again.is_ok(), "{again:?}");
            } else {
                assert!(
                    matches!(again, Err(KeyStoreError::NotExtractable(_))),
                    "{again:?}"
                );
            }
        }
        // Wrapping did not disturb the original.
        let sig = ks_a.sign(&original.handle, algorithm, b"a").await.unwrap();
        assert!(suite::verify(
            &original.public_key_der,
            algorithm,
            b"a",
            &sig
        ));
    }

    /// SoftHSM 2.6 cannot wrap EdDSA keys (C_WrapKey: "Not yet"): a typed
    /// refusal, no session key left behind, the key unharmed.
    /// The audit-encryption key (decrypt-only RSA) survives a backup: wrapped
    /// on token A, restored onto B with the decrypt usage, it decrypts what
    /// was encrypted to the original public key; restored against another
    /// key's public half, the decrypt probe refuses it and leaves nothing.
    pub async fn decrypt_key_round_trip() {
        let ks_a = open(&new_token()).await;
        let mut spec = suite::spec(KeyAlgorithm::Rsa3072);
        spec.extractable = true;
        spec.usage = keyward::keystore::KeyUsage::Decrypt;
        let original = ks_a.generate(&spec).await.unwrap();
        let kek = kek();
        let wrapped = ks_a.wrap_private_key(&original.handle, &kek).await.unwrap();
        let data_key = [9u8; 32];
        let ct = keyward::crypto::oaep_encrypt(&original.public_key_der, &data_key).unwrap();
        let token = new_token();
        let ks = open(&token).await;
        // Against another key's public half the decrypt probe fails: nothing stays.
        let mut other_spec = suite::spec(KeyAlgorithm::Rsa3072);
        other_spec.usage = keyward::keystore::KeyUsage::Decrypt;
        let other = ks_a.generate(&other_spec).await.unwrap();
        let mut s = spec.clone();
        s.id = uuid::Uuid::new_v4();
        assert!(matches!(
            ks.unwrap_private_key(&s, &kek, &wrapped, &other.public_key_der)
                .await,
            Err(KeyStoreError::PublicKeyMismatch)
        ));
        assert_token_empty(ks.as_ref(), &token).await;
        let restored = ks
            .unwrap_private_key(&spec, &kek, &wrapped, &original.public_key_der)
            .await
            .unwrap();
        assert_eq!(
            ks.decrypt_data_key(&restored.handle, &ct)
                .await
                .unwrap()
                .as_slice(),
            &data_key
        );
    }

    pub async fn ed25519_is_not_wrappable() {
        let token = new_token();
        let ks = open(&token).await;
        if !ks
            .capabilities()
            .algorithms
            .contains(&KeyAlgorithm::Ed25519)
        {
            return;
        }
        let (_, key) = extractable_key(ks.as_ref(), KeyAlgorithm::Ed25519).await;
        let err = ks.wrap_private_key(&key.handle, &kek()).await.unwrap_err();
        assert!(matches!(err, KeyStoreError::NotWrappable(_)), "{err:?}");
        assert_eq!(err.code(), "key_not_wrappable");
        assert_eq!(secret_keys(&observer_session(&token)), 0);
        let sig = ks
            .sign(&key.handle, KeyAlgorithm::Ed25519, b"m")
            .await
            .unwrap();
        assert!(suite::verify(
            &key.public_key_der,
            KeyAlgorithm::Ed25519,
            b"m",
            &sig
        ));
    }

    /// A key generated non-extractable is refused with `NotExtractable`
    /// before anything is created on the token.
    pub async fn non_extractable_is_refused() {
        let token = new_token();
        let ks = open(&token).await;
        let key = ks
            .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
            .await
            .unwrap();
        let err = ks.wrap_private_key(&key.handle, &kek()).await.unwrap_err();
        assert!(matches!(err, KeyStoreError::NotExtractable(_)), "{err:?}");
        assert_eq!(err.code(), "not_extractable");
        assert_eq!(secret_keys(&observer_session(&token)), 0);
        let p = ks.protection(&key.handle).await.unwrap();
        assert!(!p.extractable && p.never_extractable, "{p:?}");
    }

    /// Bad restore inputs: a wrong wrapping key, damaged wrapped bytes, and a
    /// wrapped key paired with another key's public key. Each is refused with
    /// its typed error and leaves the restore token empty; the good input
    /// then restores on the same token (the checks could see an object).
    pub async fn bad_restores_leave_nothing() {
        let ks_a = open(&new_token()).await;
        let (spec, original) = extractable_key(ks_a.as_ref(), KeyAlgorithm::EcdsaP256).await;
        let (_, other) = extractable_key(ks_a.as_ref(), KeyAlgorithm::EcdsaP256).await;
        let (_, p384) = extractable_key(ks_a.as_ref(), KeyAlgorithm::EcdsaP384).await;
        let kek = kek();
        let wrapped = ks_a.wrap_private_key(&original.handle, &kek).await.unwrap();
        let token = new_token();
        let ks = open(&token).await;
        assert_token_empty(ks.as_ref(), &token).await;

        let err = ks
            .unwrap_private_key(&spec, &self::kek(), &wrapped, &original.public_key_der)
            .await
            .unwrap_err();
        assert!(matches!(err, KeyStoreError::UnwrapRefused(_)), "{err:?}");
        assert_eq!(err.code(), "unwrap_refused");
        assert_token_empty(ks.as_ref(), &token).await;

        let mut flipped = wrapped.clone();
        flipped[wrapped.len() / 2] ^= 0x01;
        let truncated = wrapped[..wrapped.len() - 8].to_vec();
        let odd = wrapped[..wrapped.len() - 1].to_vec();
        for (what, bytes) in [("flipped", flipped), ("truncated", truncated), ("odd", odd)] {
            let err = ks
                .unwrap_private_key(&spec, &kek, &bytes, &original.public_key_der)
                .await
                .unwrap_err();
            assert!(
                matches!(err, KeyStoreError::UnwrapRefused(_)),
                "{what}: {err:?}"
            );
            assert_token_empty(ks.as_ref(), &token).await;
        }

        // Another key's public key, of the same curve and of another one.
        for wrong in [&other.public_key_der, &p384.public_key_der] {
            let err = ks
                .unwrap_private_key(&spec, &kek, &wrapped, wrong)
                .await
                .unwrap_err();
            assert!(matches!(err, KeyStoreError::PublicKeyMismatch), "{err:?}");
            assert_eq!(err.code(), "public_key_mismatch");
            assert_token_empty(ks.as_ref(), &token).await;
        }

        // Not a public key at all: refused before anything is created.
        let err = ks
            .unwrap_private_key(&spec, &kek, &wrapped, b"\x30\x03\x02\x01\x00")
            .await
            .unwrap_err();
        assert!(matches!(err, KeyStoreError::Encoding(_)), "{err:?}");
        assert_token_empty(ks.as_ref(), &token).await;

        let restored = ks
            .unwrap_private_key(&spec, &kek, &wrapped, &original.public_key_der)
            .await
            .unwrap();
        assert_eq!(restored.public_key_der, original.public_key_der);
        assert_eq!(tool_objects(&token).len(), 2);
    }

    /// Restoring onto a token that already holds a key with that CKA_ID is
    /// refused with `KeyIdInUse`, and the key there is untouched: another
    /// key pair generated under the same id, then a lone private key.
    pub async fn occupied_id_is_refused() {
        let ks_a = open(&new_token()).await;
        let (spec, original) = extractable_key(ks_a.as_ref(), KeyAlgorithm::EcdsaP256).await;
        let kek = kek();
        let wrapped = ks_a.wrap_private_key(&original.handle, &kek).await.unwrap();
        let token = new_token();
        let ks = open(&token).await;
        let mut own_spec = spec.clone();
        own_spec.extractable = false;
        let own = ks.generate(&own_spec).await.unwrap();
        assert_ne!(own.public_key_der, original.public_key_der);
        let before = tool_objects(&token);
        assert_eq!(before.len(), 2, "{before:?}");

        let err = ks
            .unwrap_private_key(&spec, &kek, &wrapped, &original.public_key_der)
            .await
            .unwrap_err();
        assert!(matches!(err, KeyStoreError::KeyIdInUse(_)), "{err:?}");
        assert_eq!(err.code(), "key_id_in_use");
        assert_eq!(
            ks.public_key(&own.handle).await.unwrap(),
            own.public_key_der
        );
        let sig = ks
            .sign(&own.handle, KeyAlgorithm::EcdsaP256, b"still mine")
            .await
            .unwrap();
        assert!(suite::verify(
            &own.public_key_der,
            KeyAlgorithm::EcdsaP256,
            b"still mine",
            &sig
        ));
        let p = ks.protection(&own.handle).await.unwrap();
        assert!(
            !p.extractable && p.never_extractable && p.always_sensitive,
            "{p:?}"
        );
        let after = tool_objects(&token);
        assert_eq!(after.len(), 2, "{after:?}");
        assert_eq!(secret_keys(&observer_session(&token)), 0);

        // Only the private half left under that id (its public object
        // deleted by hand): still occupied.
        let observer = observer_session(&token);
        let public = observer
            .find_objects(&[
                cryptoki::object::Attribute::Class(cryptoki::object::ObjectClass::PUBLIC_KEY),
                cryptoki::object::Attribute::Id(spec.id.as_bytes().to_vec()),
            ])
            .unwrap();
        assert_eq!(public.len(), 1);
        observer.destroy_object(public[0]).unwrap();
        let err = ks
            .unwrap_private_key(&spec, &kek, &wrapped, &original.public_key_der)
            .await
            .unwrap_err();
        assert!(matches!(err, KeyStoreError::KeyIdInUse(_)), "{err:?}");
        let left = tool_objects(&token);
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].class.starts_with("Private Key"), "{left:?}");
        let sig = ks
            .sign(&own.handle, KeyAlgorithm::EcdsaP256, b"x")
            .await
            .unwrap();
        assert!(suite::verify(
            &own.public_key_der,
            KeyAlgorithm::EcdsaP256,
            b"x",
            &sig
        ));
    }
}
