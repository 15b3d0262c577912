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
    ];
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
