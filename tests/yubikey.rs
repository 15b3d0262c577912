//! The YubiKey PIV backend against the project's emulated card, reached the
//! real way: yubikey crate → pcsc → pcscd → vsmartcard-vpcd → emulator.
//! Cross-checked with Yubico's own yubico-piv-tool and ykcs11.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/piv.rs"]
mod piv;
#[path = "common/keystore_suite.rs"]
mod suite;

use keyward::keystore::pkcs11::uri::Pkcs11Uri;
use keyward::keystore::pkcs11::{Pkcs11KeyStore, Pkcs11Settings, TokenSelector};
use keyward::keystore::yubikey::{YubiKeyKeyStore, YubiKeySettings, parse_slot};
use keyward::keystore::{
    AttestationError, KeyAlgorithm, KeyHandle, KeyStore, KeyStoreError, ManagementKeyError,
    PinFailure, SlotCheck, SlotEvidence,
};
use piv::{Card, CardOptions, DEFAULT_MGM_KEY, PIN};
use secrecy::SecretString;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use yubikey::{MgmAlgorithmId, PinPolicy, TouchPolicy};

fn settings(card: &Card, pin: &str, mgm_key: &str, alg: MgmAlgorithmId) -> YubiKeySettings {
    YubiKeySettings {
        serial: card.serial,
        slot: parse_slot("9c").unwrap(),
        pin: SecretString::from(pin.to_string()),
        management_key: SecretString::from(mgm_key.to_string()),
        management_key_algorithm: alg,
        pin_policy: PinPolicy::Always,
        touch_policy: TouchPolicy::Never,
        attestation_root_der: std::fs::read_to_string(card.attestation_root())
            .ok()
            .map(|pem| der::pem::decode_vec(pem.as_bytes()).unwrap().1),
        sign_timeout: Duration::from_secs(10),
        dangerously_generate_into_unverified_slot: false,
    }
}

/// A YubiKey of firmware `version` from before AES management keys (3DES factory key).
fn old_card(version: &'static str) -> Card {
    Card::start(CardOptions {
        version,
        mgm_alg: "3des",
        ..Default::default()
    })
}

fn old_settings(card: &Card, override_unverified: bool) -> YubiKeySettings {
    let mut s = settings(card, PIN, DEFAULT_MGM_KEY, MgmAlgorithmId::ThreeDes);
    s.dangerously_generate_into_unverified_slot = override_unverified;
    s
}

/// Puts a key into slot 9c with Yubico's tool, as an operator (or an earlier
/// setup) would have, and returns its DER SubjectPublicKeyInfo. No certificate.
fn key_put_there_by_yubico_piv_tool(card: &Card, how: &str) -> Vec<u8> {
    let pem = card.state_dir.path().join("prior-key.pem");
    let mgm = format!("--key={DEFAULT_MGM_KEY}");
    match how {
        "generate" => {
            card.piv_tool(&[
                &mgm,
                "-a",
                "generate",
                "-s",
                "9c",
                "-A",
                "ECCP256",
                "-o",
                pem.to_str().unwrap(),
            ]);
        }
        _ => {
            // An imported key: the card cannot attest it.
            let private = card.state_dir.path().join("prior-private.pem");
            let out = Command::new("openssl")
                .args([
                    "ecparam",
                    "-name",
                    "prime256v1",
                    "-genkey",
                    "-noout",
                    "-out",
                ])
                .arg(&private)
                .output()
                .unwrap();
            assert!(out.status.success());
            card.piv_tool(&[
                &mgm,
                "-a",
                "import-key",
                "-s",
                "9c",
                "-i",
                private.to_str().unwrap(),
            ]);
            let out = Command::new("openssl")
                .args(["ec", "-pubout", "-in"])
                .arg(&private)
                .arg("-out")
                .arg(&pem)
                .output()
                .unwrap();
            assert!(out.status.success());
        }
    }
    let text = std::fs::read_to_string(&pem).unwrap();
    der::pem::decode_vec(text.as_bytes()).unwrap().1
}

/// A card error or an unreachable card: what a failing check must report.
fn card_trouble(err: &KeyStoreError) -> bool {
    matches!(
        err,
        KeyStoreError::Device { .. }
            | KeyStoreError::DeviceUnavailable { .. }
            | KeyStoreError::CardNotFound { .. }
    )
}

/// The key in the slot is still `spki`: a fresh signature made through the
/// backend verifies with it (ring, not the code under test).
async fn still_signs_with(ks: &YubiKeyKeyStore, spki: &[u8]) {
    let handle = ks.planned_handle(&suite::spec(KeyAlgorithm::EcdsaP256));
    let msg = b"is the old key still there?";
    let sig = ks
        .sign(&handle, KeyAlgorithm::EcdsaP256, msg)
        .await
        .unwrap();
    assert!(
        suite::verify(spki, KeyAlgorithm::EcdsaP256, msg, &sig),
        "the slot no longer holds the key that was there: it was overwritten"
    );
}

fn keystore(card: &Card) -> Arc<dyn KeyStore> {
    Arc::new(YubiKeyKeyStore::new(settings(
        card,
        PIN,
        DEFAULT_MGM_KEY,
        MgmAlgorithmId::Aes192,
    )))
}

#[tokio::test]
async fn conformance_suite_on_the_emulated_yubikey() {
    let _g = piv::CARD_LOCK.lock().await;
    // Each case starts from an empty card: PIV replaces keys, it does not delete them.
    for case in 0..7 {
        let card = Card::start(CardOptions::default());
        let ks = keystore(&card);
        match case {
            0 => suite::sign_and_verify(ks.as_ref(), KeyAlgorithm::EcdsaP256).await,
            1 => suite::sign_and_verify(ks.as_ref(), KeyAlgorithm::EcdsaP384).await,
            2 => suite::keys_are_sensitive_and_not_extractable(ks.as_ref()).await,
            3 => suite::foreign_handles_are_refused(ks.as_ref()).await,
            4 => suite::concurrent_signers_queue(ks.clone()).await,
            5 => suite::export_refuses_non_extractable_keys(ks.as_ref()).await,
            _ => suite::recovers_after_logout(ks.as_ref()).await,
        }
    }
}

#[tokio::test]
async fn capabilities_say_one_signer_and_no_key_export() {
    let _g = piv::CARD_LOCK.lock().await;
    let card = Card::start(CardOptions::default());
    let ks = keystore(&card);
    assert_eq!(ks.capabilities().max_concurrent_signers, 1);
    assert!(!ks.capabilities().can_wrap_keys);
    let mut spec = suite::spec(KeyAlgorithm::EcdsaP256);
    spec.extractable = true;
    let err = ks.generate(&spec).await.unwrap_err();
    assert!(
        matches!(err, KeyStoreError::ExtractableUnsupported { .. }),
        "PIV keys can never be extractable: {err:?}"
    );
    let err = ks
        .generate(&suite::spec(KeyAlgorithm::Rsa3072))
        .await
        .unwrap_err();
    assert!(matches!(err, KeyStoreError::Unsupported(_)), "{err:?}");
}

#[tokio::test]
async fn management_keys_of_every_algorithm_authenticate() {
    let _g = piv::CARD_LOCK.lock().await;
    let cases = [
        ("3des", MgmAlgorithmId::ThreeDes, DEFAULT_MGM_KEY),
        (
            "aes128",
            MgmAlgorithmId::Aes128,
            "00112233445566778899aabbccddeeff",
        ),
        ("aes192", MgmAlgorithmId::Aes192, DEFAULT_MGM_KEY),
        (
            "aes256",
            MgmAlgorithmId::Aes256,
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
        ),
    ];
    for (name, alg, key) in cases {
        let card = Card::start(CardOptions {
            mgm_alg: name,
            mgm_key: key,
            ..Default::default()
        });
        let ks = YubiKeyKeyStore::new(settings(&card, PIN, key, alg));
        let k = ks.generate(&suite::spec(KeyAlgorithm::EcdsaP256)).await;
        assert!(k.is_ok(), "{name}: {k:?}");
    }
}

#[tokio::test]
async fn wrong_management_key_and_occupied_slot_are_refused() {
    let _g = piv::CARD_LOCK.lock().await;
    let card = Card::start(CardOptions::default());
    let wrong = YubiKeyKeyStore::new(settings(
        &card,
        PIN,
        "0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a09080",
        MgmAlgorithmId::Aes192,
    ));
    let err = wrong
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap_err();
    assert!(
        matches!(err, KeyStoreError::ManagementKeyRejected),
        "{err:?}"
    );
    assert!(
        !wrong
            .exists(&wrong.planned_handle(&suite::spec(KeyAlgorithm::EcdsaP256)))
            .await
            .unwrap()
    );

    // Unusable management keys are refused before the card sees them.
    for (key, problem) in [
        ("not hex at all", ManagementKeyError::NotHex),
        ("0102030405060708", ManagementKeyError::WrongLength),
    ] {
        let bad = YubiKeyKeyStore::new(settings(&card, PIN, key, MgmAlgorithmId::Aes192));
        let err = bad
            .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
            .await
            .unwrap_err();
        assert!(
            matches!(err, KeyStoreError::ManagementKeyInvalid(p) if p == problem),
            "{err:?}"
        );
        assert!(
            !err.to_string().contains(key),
            "the key must not be echoed: {err}"
        );
    }
    let ks = keystore(&card);
    assert!(
        !ks.exists(&ks.planned_handle(&suite::spec(KeyAlgorithm::EcdsaP256)))
            .await
            .unwrap()
    );
    let first = ks
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap();
    let err = ks
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap_err();
    assert!(
        matches!(err, KeyStoreError::SlotOccupied { ref slot, evidence: SlotEvidence::Metadata } if slot == "9c"),
        "{err:?}"
    );
    // The first key is still there and still signs.
    assert_eq!(
        ks.public_key(&first.handle).await.unwrap(),
        first.public_key_der
    );
    let sig = ks
        .sign(&first.handle, KeyAlgorithm::EcdsaP256, b"still mine")
        .await
        .unwrap();
    assert!(suite::verify(
        &first.public_key_der,
        KeyAlgorithm::EcdsaP256,
        b"still mine",
        &sig
    ));
}

/// Defect 9: a wrong PIN used to be retried at every call until the card
/// blocked. Now the backend latches after the first rejection: later calls
/// fail at once without a VERIFY (the card's counter, read by
/// yubico-piv-tool, does not move), health reports it, and only a restart
/// with a corrected PIN (a new backend) signs again.
#[tokio::test]
async fn a_rejected_pin_latches_and_spends_no_more_retries() {
    let _g = piv::CARD_LOCK.lock().await;
    let card = Card::start(CardOptions::default());
    let good = keystore(&card);
    let key = good
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap();
    assert_eq!(card.pin_tries_left(), 3);
    let wrong_pin = || {
        YubiKeyKeyStore::new(settings(
            &card,
            "999999",
            DEFAULT_MGM_KEY,
            MgmAlgorithmId::Aes192,
        ))
    };
    let bad = wrong_pin();
    let err = bad
        .sign(&key.handle, KeyAlgorithm::EcdsaP256, b"x")
        .await
        .unwrap_err();
    let first = PinFailure::Incorrect {
        retries_left: Some(2),
    };
    assert!(
        matches!(err, KeyStoreError::PinRejected(f) if f == first),
        "{err:?}"
    );
    assert_eq!(err.code(), "pin_rejected");
    assert_eq!(card.pin_tries_left(), 2);
    for _ in 0..5 {
        let err = bad
            .sign(&key.handle, KeyAlgorithm::EcdsaP256, b"x")
            .await
            .unwrap_err();
        assert!(
            matches!(err, KeyStoreError::PinLatched(f) if f == first),
            "{err:?}"
        );
    }
    let err = bad.health().await.unwrap_err();
    assert!(matches!(err, KeyStoreError::PinLatched(_)), "{err:?}");
    assert_eq!(err.code(), "pin_latched");
    assert!(err.to_string().contains("restart"), "{err}");
    let err = bad.public_key(&key.handle).await.unwrap_err();
    assert!(matches!(err, KeyStoreError::PinLatched(_)), "{err:?}");
    assert_eq!(
        card.pin_tries_left(),
        2,
        "the latched backend tried the PIN again"
    );

    // The operator's action: a restart with the right PIN (a new backend).
    let sig = good
        .sign(&key.handle, KeyAlgorithm::EcdsaP256, b"after the fix")
        .await
        .unwrap();
    assert!(suite::verify(
        &key.public_key_der,
        KeyAlgorithm::EcdsaP256,
        b"after the fix",
        &sig
    ));
    assert_eq!(card.pin_tries_left(), 3);

    // Restarts with the wrong PIN each cost one try, and a blocked PIN latches too.
    for left in [2u8, 1] {
        let err = wrong_pin()
            .sign(&key.handle, KeyAlgorithm::EcdsaP256, b"x")
            .await
            .unwrap_err();
        assert!(
            matches!(err, KeyStoreError::PinRejected(PinFailure::Incorrect { retries_left: Some(n) }) if n == left),
            "{err:?}"
        );
    }
    let err = wrong_pin()
        .sign(&key.handle, KeyAlgorithm::EcdsaP256, b"x")
        .await
        .unwrap_err();
    assert!(
        matches!(err, KeyStoreError::PinRejected(PinFailure::Locked)),
        "{err:?}"
    );
    // Blocked means blocked: the right PIN no longer works either, and latches.
    let err = good
        .sign(&key.handle, KeyAlgorithm::EcdsaP256, b"x")
        .await
        .unwrap_err();
    assert!(
        matches!(err, KeyStoreError::PinRejected(PinFailure::Locked)),
        "{err:?}"
    );
    let err = good.health().await.unwrap_err();
    assert!(
        matches!(err, KeyStoreError::PinLatched(PinFailure::Locked)),
        "{err:?}"
    );
}

#[tokio::test]
async fn card_removed_during_signing_fails_clearly_and_recovers_when_back() {
    let _g = piv::CARD_LOCK.lock().await;
    let mut card = Card::start(CardOptions::default());
    let ks = keystore(&card);
    let key = ks
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap();
    ks.sign(&key.handle, KeyAlgorithm::EcdsaP256, b"before")
        .await
        .unwrap();
    card.remove();
    let err = ks
        .sign(&key.handle, KeyAlgorithm::EcdsaP256, b"while out")
        .await
        .unwrap_err();
    // The stale connection fails, the retry finds no card with that serial.
    assert!(
        matches!(err, KeyStoreError::CardNotFound { serial, .. } if serial == card.serial),
        "{err:?}"
    );
    assert_eq!(err.code(), "device_not_found");
    assert!(err.to_string().contains(&card.serial.to_string()), "{err}");
    assert!(ks.health().await.is_err());
    card.insert();
    let sig = ks
        .sign(&key.handle, KeyAlgorithm::EcdsaP256, b"after")
        .await
        .unwrap();
    assert!(suite::verify(
        &key.public_key_der,
        KeyAlgorithm::EcdsaP256,
        b"after",
        &sig
    ));
    ks.health().await.unwrap();
}

#[tokio::test]
async fn two_cards_are_told_apart_by_serial() {
    let _g = piv::CARD_LOCK.lock().await;
    let a = Card::start(CardOptions {
        port: piv::READER_PORTS[0],
        serial: 20_000_001,
        ..Default::default()
    });
    let b = Card::start(CardOptions {
        port: piv::READER_PORTS[1],
        serial: 20_000_002,
        ..Default::default()
    });
    let ka = keystore(&a);
    let kb = keystore(&b);
    let key_a = ka
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap();
    let key_b = kb
        .generate(&suite::spec(KeyAlgorithm::EcdsaP384))
        .await
        .unwrap();
    assert_ne!(key_a.public_key_der, key_b.public_key_der);
    assert_eq!(
        ka.public_key(&key_a.handle).await.unwrap(),
        key_a.public_key_der
    );
    assert_eq!(
        kb.public_key(&key_b.handle).await.unwrap(),
        key_b.public_key_der
    );
    // A handle names its card: card A's store refuses card B's key.
    let err = ka
        .sign(&key_b.handle, KeyAlgorithm::EcdsaP384, b"x")
        .await
        .unwrap_err();
    assert!(matches!(err, KeyStoreError::BadHandle(_)), "{err:?}");
    // With two cards present, the crate's "first YubiKey" open is ambiguous;
    // keyward's config therefore has no way to omit the serial.
    let cfg = "[store]\ntype='sqlite'\npath='x'\n[keystore]\ntype='yubikey'\npin_env='P'\nmanagement_key_env='M'\n[auth]\ntoken_pepper_env='X'\n";
    let e = keyward::config::Config::from_toml(
        cfg,
        std::path::Path::new("k.toml"),
        std::path::Path::new("."),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("serial"), "{e}");
}

#[tokio::test]
async fn attestation_verifies_against_the_configured_root_only() {
    let _g = piv::CARD_LOCK.lock().await;
    let card = Card::start(CardOptions::default());
    let ks = keystore(&card);
    let key = ks
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap();
    let chain = ks
        .attestation(&key.handle)
        .await
        .unwrap()
        .expect("attestation root configured");
    assert_eq!(chain.len(), 2);
    // The same card checked against some other root fails.
    let other = Card::start(CardOptions {
        port: piv::READER_PORTS[1],
        serial: 20_000_003,
        ..Default::default()
    });
    let mut s = settings(&card, PIN, DEFAULT_MGM_KEY, MgmAlgorithmId::Aes192);
    s.attestation_root_der = Some(
        der::pem::decode_vec(
            std::fs::read_to_string(other.attestation_root())
                .unwrap()
                .as_bytes(),
        )
        .unwrap()
        .1,
    );
    let wrong_root = YubiKeyKeyStore::new(s);
    let err = wrong_root.attestation(&key.handle).await.unwrap_err();
    assert!(
        matches!(
            err,
            KeyStoreError::Attestation(AttestationError::IntermediateNotFromRoot)
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn yubico_tools_read_and_use_what_keyward_wrote() {
    let _g = piv::CARD_LOCK.lock().await;
    let card = Card::start(CardOptions::default());
    let ks = keystore(&card);
    let key = ks
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap();
    // A self-issued certificate for the slot, made by keyward's CA code with the card's key.
    let subject = keyward::ca::x509::name_cn("keyward yubikey cross-check").unwrap();
    let ski = keyward::ca::x509::key_identifier(&key.public_key_der).unwrap();
    let tbs = keyward::ca::x509::encode_tbs(keyward::ca::x509::TbsParams {
        serial: &[0x01, 0x02, 0x03],
        signer: KeyAlgorithm::EcdsaP256,
        issuer_name_der: &subject,
        subject_name_der: &subject,
        spki_der: &key.public_key_der,
        not_before: 1_700_000_000,
        not_after: 1_900_000_000,
        extensions: keyward::ca::x509::ca_extensions(&ski, &ski, Some(0)).unwrap(),
    })
    .unwrap();
    let sig = ks
        .sign(&key.handle, KeyAlgorithm::EcdsaP256, &tbs)
        .await
        .unwrap();
    let cert = keyward::ca::x509::assemble(&tbs, KeyAlgorithm::EcdsaP256, &sig).unwrap();
    ks.store_certificate(&key.handle, &cert).await.unwrap();

    // yubico-piv-tool sees the slot and the certificate.
    let out = Command::new("yubico-piv-tool")
        .args(["-r", "", "-a", "status"])
        .output()
        .expect("yubico-piv-tool missing: run scripts/test.sh");
    let status =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(status.contains("keyward yubikey cross-check"), "{status}");
    assert!(status.contains(&card.serial.to_string()), "{status}");

    // Yubico's PKCS#11 module, loaded by keyward's own PKCS#11 backend, signs
    // with the same key; the signature verifies with the public key keyward read.
    let module = [
        "/usr/lib/x86_64-linux-gnu/libykcs11.so",
        "/usr/lib/aarch64-linux-gnu/libykcs11.so",
        "/usr/lib/libykcs11.so",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.exists())
    .expect("ykcs11 missing: run scripts/test.sh");
    let p11 = Pkcs11KeyStore::open(Pkcs11Settings {
        module,
        selector: TokenSelector::Serial(card.serial.to_string()),
        pin: SecretString::from(PIN.to_string()),
        sessions: 1,
    })
    .await
    .unwrap();
    // ykcs11 gives slot 9c's key CKA_ID 2.
    let handle = KeyHandle(Pkcs11Uri::for_key("ykcs11", "9c", &[2]));
    let sig = p11
        .sign(&handle, KeyAlgorithm::EcdsaP256, b"signed through ykcs11")
        .await
        .unwrap();
    assert!(suite::verify(
        &key.public_key_der,
        KeyAlgorithm::EcdsaP256,
        b"signed through ykcs11",
        &sig
    ));
}

#[tokio::test]
async fn root_ca_on_the_yubikey_issuing_ca_on_softhsm_chain_verifies_with_openssl() {
    let _g = piv::CARD_LOCK.lock().await;
    let card = Card::start(CardOptions::default());
    let ca_policy = common::repo_file("policies/ca.toml").replace(
        "name = \"root\"\nkind = \"root\"\n",
        "name = \"root\"\nkind = \"root\"\nkeystore = \"offline-root\"\n",
    );
    assert!(ca_policy.contains("keystore = \"offline-root\""));
    let env = common::Env::with_policies(&ca_policy, &common::one_approver_enrollment());
    std::fs::write(env.path("yubikey.pin"), PIN).unwrap();
    std::fs::write(env.path("yubikey.mgmt"), DEFAULT_MGM_KEY).unwrap();
    let mut config = std::fs::read_to_string(&env.config).unwrap();
    config.push_str(&format!(
        "\n[keystores.offline-root]\ntype = \"yubikey\"\nserial = {}\nslot = \"9c\"\npin_file = \"yubikey.pin\"\n\
         management_key_file = \"yubikey.mgmt\"\nmanagement_key_algorithm = \"aes192\"\nattestation_root = \"{}\"\n",
        card.serial,
        card.attestation_root().display()
    ));
    std::fs::write(&env.config, config).unwrap();
    let out = env.run(&["config", "check", "--config", env.config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let admin = env.init();
    // The root key is on the card (attested), the issuing key in SoftHSM2.
    let c = rusqlite::Connection::open(&env.db).unwrap();
    let stores: Vec<(String, String, String)> = c
        .prepare(
            "SELECT ca_name, backend, keystore FROM keys
             WHERE state = 'active' AND ca_name IS NOT NULL ORDER BY ca_name",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        stores,
        vec![
            (
                "devices".to_string(),
                "pkcs11".to_string(),
                "default".to_string()
            ),
            (
                "root".to_string(),
                "yubikey".to_string(),
                "offline-root".to_string()
            ),
        ]
    );
    let details: String = c
        .query_row(
            "SELECT details FROM audit_events WHERE action = 'ca.create' AND target = 'ca:root'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(details.contains("\"attested\":true"), "{details}");
    drop(c);

    // The root certificate was written into slot 9c, where Yubico's tool finds it.
    let status = Command::new("yubico-piv-tool")
        .args(["-r", "", "-a", "status"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(status.contains("keyward Root CA"), "{status}");

    // Issue a device certificate and verify the whole chain with openssl.
    let daemon = env.serve();
    let (csr, _) = common::openssl_csr(env.dir.path(), "ec");
    let url = daemon.url.clone();
    let post = reqwest::Method::POST;
    let (_, reg) = common::call(
        post.clone(),
        &format!("{url}/v1/registrations"),
        None,
        Some(serde_json::json!({ "csr": csr, "name": "yk-rooted-device" })),
    )
    .await;
    let id = reg["id"].as_str().unwrap();
    let alice = common::add_admin(&url, &admin, "alice", "approver").await;
    let (_, approved) = common::call(
        post,
        &format!("{url}/v1/admin/registrations/{id}/approve"),
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(approved["status"], "issued", "{approved}");
    let (_, creds) = common::call(
        reqwest::Method::GET,
        &format!("{url}/v1/registrations/{id}/credentials"),
        reg["secret"].as_str(),
        None,
    )
    .await;
    let client = common::client();
    let root = client
        .get(format!("{}/v1/ca/root/chain", daemon.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dir = env.dir.path();
    let (ok, msg) = common::openssl_verify(
        &common::write(dir, "root.pem", &root),
        &common::write(dir, "chain.pem", creds["chain_pem"].as_str().unwrap()),
        &common::write(
            dir,
            "device.pem",
            creds["certificate_pem"].as_str().unwrap(),
        ),
    );
    assert!(ok, "{msg}");

    // Rotating the issuing CA: its parent, the root, is on the card. The
    // scheduler generates the new key and then waits for an operator.
    let (status, started) = common::call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/rotations"),
        Some(&admin),
        Some(serde_json::json!({ "purpose": "issuing-ca", "target": "devices" })),
    )
    .await;
    assert_eq!(status, 202, "{started}");
    let rotation = started["id"].as_str().unwrap().to_string();
    let show = |id: String| {
        let url = url.clone();
        let admin = admin.clone();
        async move {
            common::call(
                reqwest::Method::GET,
                &format!("{url}/v1/admin/rotations/{id}"),
                Some(&admin),
                None,
            )
            .await
            .1
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let r = show(rotation.clone()).await;
        if r["step"] == "key-generated" && r["attempts"].as_i64() >= Some(1) {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "{r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        waiting["last_error"]
            .as_str()
            .unwrap()
            .contains("--with-root-card"),
        "{waiting}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(show(rotation.clone()).await["step"], "key-generated");
    // The operator's explicit command, with the card in the reader.
    let out = env
        .keyward()
        .env("KEYWARD_URL", &url)
        .env("KEYWARD_TOKEN", &admin)
        .args(["ca", "rotate", "devices", "--with-root-card", "--wait"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let done = show(rotation.clone()).await;
    assert!(
        ["activated", "retired"].contains(&done["step"].as_str().unwrap()),
        "{done}"
    );
    let c = rusqlite::Connection::open(&env.db).unwrap();
    let details: String = c
        .query_row(
            "SELECT details FROM audit_events WHERE action = 'rotation.certified' AND target = ?1",
            [format!("rotation:{rotation}")],
            |r| r.get(0),
        )
        .unwrap();
    assert!(details.contains("\"root_card\":true"), "{details}");
    assert!(
        details.contains("\"root_card_operator\":\"admin:"),
        "{details}"
    );
    drop(c);
    // A device issued now chains to the card-held root through the new
    // issuing certificate (signed on the card), by openssl.
    let (csr, _) = common::openssl_csr(env.dir.path(), "ec");
    let (_, reg) = common::call(
        reqwest::Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(serde_json::json!({ "csr": csr, "name": "after-rotation" })),
    )
    .await;
    let id = reg["id"].as_str().unwrap();
    let (_, approved) = common::call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/registrations/{id}/approve"),
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(approved["status"], "issued", "{approved}");
    let (_, creds2) = common::call(
        reqwest::Method::GET,
        &format!("{url}/v1/registrations/{id}/credentials"),
        reg["secret"].as_str(),
        None,
    )
    .await;
    assert_ne!(creds2["chain_pem"], creds["chain_pem"]);
    let (ok, msg) = common::openssl_verify(
        &dir.join("root.pem"),
        &common::write(dir, "chain2.pem", creds2["chain_pem"].as_str().unwrap()),
        &common::write(
            dir,
            "device2.pem",
            creds2["certificate_pem"].as_str().unwrap(),
        ),
    );
    assert!(ok, "{msg}");

    // The daemon keeps issuing with the root card pulled out: only the issuing key is needed.
    drop(card);
    let ready: serde_json::Value = client
        .get(format!("{}/readyz", daemon.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(
        ready["keystores"]["offline-root"]["required"], false,
        "{ready}"
    );
}

/// Defect 2: on firmware without GET METADATA (before 5.3), a slot holding a
/// key but no certificate was taken for empty and the key replaced. Now the
/// attestation proves the key is there (4.3+) or, where nothing can prove
/// either way, generation is refused; the key survives in every case.
#[tokio::test]
async fn old_firmware_key_without_certificate_is_never_overwritten() {
    let _g = piv::CARD_LOCK.lock().await;
    for (version, how) in [
        ("5.2.7", "generate"),
        ("4.3.7", "generate"),
        ("4.2.8", "generate"),
        ("5.2.7", "import"),
    ] {
        let card = old_card(version);
        let prior = key_put_there_by_yubico_piv_tool(&card, how);
        let ks = YubiKeyKeyStore::new(old_settings(&card, false));
        let err = ks
            .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
            .await
            .unwrap_err();
        let attestable = how == "generate" && version != "4.2.8";
        if attestable {
            assert!(
                matches!(
                    err,
                    KeyStoreError::SlotOccupied {
                        evidence: SlotEvidence::Attestation,
                        ..
                    }
                ),
                "{version} {how}: {err:?}"
            );
            // Proven occupied: even the operator override does not overwrite it.
            let forced = YubiKeyKeyStore::new(old_settings(&card, true));
            let err = forced
                .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
                .await
                .unwrap_err();
            assert!(
                matches!(err, KeyStoreError::SlotOccupied { .. }),
                "{version} {how} with override: {err:?}"
            );
            // The attestation also gives the public key back without metadata.
            let handle = ks.planned_handle(&suite::spec(KeyAlgorithm::EcdsaP256));
            assert_eq!(ks.public_key(&handle).await.unwrap(), prior);
        } else {
            assert!(
                matches!(err, KeyStoreError::SlotUnverifiable { ref firmware, .. } if firmware == version),
                "{version} {how}: {err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("dangerously_generate_into_unverified_slot") && msg.contains("9c"),
                "the refusal must say how to proceed: {msg}"
            );
        }
        still_signs_with(&ks, &prior).await;
    }
}

/// On old firmware an empty slot cannot be told from one holding an imported
/// key, so generation needs the operator override; the result says so, for
/// the audit trail. Afterwards the new key is proven by its attestation.
#[tokio::test]
async fn old_firmware_empty_slot_needs_the_override_and_says_it_was_used() {
    let _g = piv::CARD_LOCK.lock().await;
    let card = old_card("5.2.7");
    let ks = YubiKeyKeyStore::new(old_settings(&card, false));
    let spec = suite::spec(KeyAlgorithm::EcdsaP256);
    let err = ks.generate(&spec).await.unwrap_err();
    assert!(
        matches!(err, KeyStoreError::SlotUnverifiable { .. }),
        "{err:?}"
    );
    assert_eq!(err.code(), "slot_unverifiable");
    // Nothing was generated: the card still has nothing to attest.
    let err = ks.public_key(&ks.planned_handle(&spec)).await.unwrap_err();
    assert!(
        matches!(err, KeyStoreError::PublicKeyUnreadable { .. }),
        "{err:?}"
    );

    let forced = YubiKeyKeyStore::new(old_settings(&card, true));
    let key = forced.generate(&spec).await.unwrap();
    assert_eq!(key.slot_check, SlotCheck::UnverifiedOverride);
    still_signs_with(&forced, &key.public_key_der).await;
    assert_eq!(
        forced.public_key(&key.handle).await.unwrap(),
        key.public_key_der
    );
    // Now the slot is proven occupied, and the override cannot replace the key.
    let err = forced.generate(&spec).await.unwrap_err();
    assert!(
        matches!(
            err,
            KeyStoreError::SlotOccupied {
                evidence: SlotEvidence::Attestation,
                ..
            }
        ),
        "{err:?}"
    );
    still_signs_with(&forced, &key.public_key_der).await;
    // New firmware needs no override and says the slot was proven empty.
    drop(card);
    let card = Card::start(CardOptions::default());
    let key = keystore(&card)
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap();
    assert_eq!(key.slot_check, SlotCheck::ProvenEmpty);
}

/// A certificate in the slot's object is evidence of a key on any firmware.
#[tokio::test]
async fn old_firmware_slot_with_a_certificate_is_occupied() {
    let _g = piv::CARD_LOCK.lock().await;
    let card = old_card("4.2.8");
    let prior = key_put_there_by_yubico_piv_tool(&card, "generate");
    let pem = card.state_dir.path().join("prior-key.pem");
    let mgm = format!("--key={DEFAULT_MGM_KEY}");
    // A certificate for the slot's key (issued elsewhere, as an operator might have).
    let dir = card.state_dir.path();
    let out = Command::new("openssl")
        .args([
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
        ])
        .arg(dir.join("issuer.pem"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = Command::new("openssl")
        .args([
            "x509",
            "-new",
            "-subj",
            "/CN=put there before keyward",
            "-days",
            "30",
        ])
        .arg("-key")
        .arg(dir.join("issuer.pem"))
        .arg("-force_pubkey")
        .arg(&pem)
        .arg("-out")
        .arg(dir.join("prior-cert.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert = card.state_dir.path().join("prior-cert.pem");
    card.piv_tool(&[
        &mgm,
        "-a",
        "import-certificate",
        "-s",
        "9c",
        "-i",
        cert.to_str().unwrap(),
    ]);
    let forced = YubiKeyKeyStore::new(old_settings(&card, true));
    let err = forced
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            KeyStoreError::SlotOccupied {
                evidence: SlotEvidence::Certificate,
                ..
            }
        ),
        "{err:?}"
    );
    still_signs_with(&forced, &prior).await;
    // Without metadata or attestation, the certificate also gives the public key.
    let handle = forced.planned_handle(&suite::spec(KeyAlgorithm::EcdsaP256));
    assert_eq!(forced.public_key(&handle).await.unwrap(), prior);
}

/// A card error during the check is an error, never "empty": with new
/// firmware (metadata) and old (certificate object, attestation), with a card
/// that answers an error status and one pulled out mid-command. The key that
/// was there survives, and with the override set nothing is generated either.
#[tokio::test]
async fn card_errors_during_the_slot_check_refuse_generation() {
    let _g = piv::CARD_LOCK.lock().await;
    // New firmware, key in the slot, GET METADATA answers 6F00 (no precise diagnosis).
    let mut card = Card::start(CardOptions::default());
    let ks = keystore(&card);
    let first = ks
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap();
    card.fail_next(0xf7, 0x6f00);
    let err = ks
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap_err();
    assert!(matches!(err, KeyStoreError::Device { .. }), "{err:?}");
    // Pulled out during GET METADATA. (Through vpcd the crate sees an empty
    // answer, a card error; a real reader reports a PC/SC error. Either is an error.)
    card.yank_at(0xf7);
    let err = ks
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap_err();
    assert!(card_trouble(&err), "{err:?}");
    card.wait_removed();
    card.insert();
    assert_eq!(
        ks.public_key(&first.handle).await.unwrap(),
        first.public_key_der
    );
    // Empty slot, GET METADATA fails: still refused, and nothing was generated.
    drop(card);
    let mut card = Card::start(CardOptions::default());
    let ks = keystore(&card);
    card.fail_next(0xf7, 0x6a80);
    let spec = suite::spec(KeyAlgorithm::EcdsaP256);
    assert!(ks.generate(&spec).await.is_err());
    assert!(!ks.exists(&ks.planned_handle(&spec)).await.unwrap());

    // Old firmware without attestation, override set: only the check stands
    // between the operator's flag and the key; an error in it must stop generation.
    drop(card);
    let mut card = old_card("4.2.8");
    let prior = key_put_there_by_yubico_piv_tool(&card, "generate");
    let forced = YubiKeyKeyStore::new(old_settings(&card, true));
    card.fail_next(0xcb, 0x6f00);
    let err = forced
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap_err();
    assert!(matches!(err, KeyStoreError::Device { .. }), "{err:?}");
    card.yank_at(0xcb);
    let err = forced
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap_err();
    assert!(card_trouble(&err), "{err:?}");
    card.wait_removed();
    card.insert();
    still_signs_with(&forced, &prior).await;
    // Old firmware with attestation, pulled out during ATTEST: an error too.
    drop(card);
    let mut card = old_card("5.2.7");
    let forced = YubiKeyKeyStore::new(old_settings(&card, true));
    card.yank_at(0xf9);
    let err = forced
        .generate(&suite::spec(KeyAlgorithm::EcdsaP256))
        .await
        .unwrap_err();
    assert!(card_trouble(&err), "{err:?}");
    card.wait_removed();
    card.insert();
    let err = forced
        .public_key(&forced.planned_handle(&suite::spec(KeyAlgorithm::EcdsaP256)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, KeyStoreError::PublicKeyUnreadable { .. }),
        "generated after all: {err:?}"
    );
}

/// The defect as an operator met it: `keyward init` with the root CA on an
/// early YubiKey 5 whose slot 9c holds an imported key and no certificate.
/// Init stops with a message that says what to do, and the key survives.
#[tokio::test]
async fn keyward_init_refuses_an_unverifiable_slot_and_keeps_the_key() {
    let _g = piv::CARD_LOCK.lock().await;
    let card = old_card("5.2.7");
    let prior = key_put_there_by_yubico_piv_tool(&card, "import");
    let ca_policy = common::repo_file("policies/ca.toml").replace(
        "name = \"root\"\nkind = \"root\"\n",
        "name = \"root\"\nkind = \"root\"\nkeystore = \"offline-root\"\n",
    );
    assert!(ca_policy.contains("keystore = \"offline-root\""));
    let env = common::Env::with_policies(&ca_policy, &common::one_approver_enrollment());
    std::fs::write(env.path("yubikey.pin"), PIN).unwrap();
    std::fs::write(env.path("yubikey.mgmt"), DEFAULT_MGM_KEY).unwrap();
    let mut config = std::fs::read_to_string(&env.config).unwrap();
    config.push_str(&format!(
        "\n[keystores.offline-root]\ntype = \"yubikey\"\nserial = {}\nslot = \"9c\"\npin_file = \"yubikey.pin\"\n\
         management_key_file = \"yubikey.mgmt\"\nmanagement_key_algorithm = \"3des\"\n",
        card.serial,
    ));
    std::fs::write(&env.config, config).unwrap();
    let out = env.run(&["init", "--config", env.config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "init overwrote an unverifiable slot");
    assert!(
        stderr.contains("cannot prove")
            && stderr.contains("dangerously_generate_into_unverified_slot"),
        "{stderr}"
    );
    let ks = YubiKeyKeyStore::new(old_settings(&card, false));
    still_signs_with(&ks, &prior).await;
}
