//! CRL, OCSP and certificate-extension encodings checked with stock openssl:
//! a small hierarchy signed with ring ECDSA keys (DER signatures, as the
//! KeyStore returns them), files in a tempdir, `openssl crl|verify|ocsp|x509`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keyward::ca::crl::{self, CrlParams, RevokedEntry};
use keyward::ca::ocsp::{
    self, CertStatus, HashAlgorithm, IssuerId, OcspError, RequestLimits, ResponseData,
    SingleResponse,
};
use keyward::ca::serial::Serial;
use keyward::ca::x509::{self, RevocationUrls, TbsParams};
use keyward::keystore::KeyAlgorithm;
use keyward::model::RevocationReason;
use keyward::policy::ExtendedKeyUsage as Eku;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct Key {
    pair: EcdsaKeyPair,
    alg: KeyAlgorithm,
    spki: Vec<u8>,
}

fn key(alg: KeyAlgorithm) -> Key {
    let rng = SystemRandom::new();
    let signing = match alg {
        KeyAlgorithm::EcdsaP256 => &ECDSA_P256_SHA256_ASN1_SIGNING,
        KeyAlgorithm::EcdsaP384 => &ECDSA_P384_SHA384_ASN1_SIGNING,
        _ => unreachable!(),
    };
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref(), &rng).unwrap();
    let spki = spki::SubjectPublicKeyInfoOwned {
        algorithm: spki::AlgorithmIdentifierOwned {
            oid: const_oid::db::rfc5912::ID_EC_PUBLIC_KEY,
            parameters: Some(der::asn1::Any::from(alg.curve_oid().unwrap())),
        },
        subject_public_key: der::asn1::BitString::from_bytes(pair.public_key().as_ref()).unwrap(),
    };
    Key {
        pair,
        alg,
        spki: der::Encode::to_der(&spki).unwrap(),
    }
}

impl Key {
    fn sign(&self, tbs: &[u8]) -> Vec<u8> {
        self.pair
            .sign(&SystemRandom::new(), tbs)
            .unwrap()
            .as_ref()
            .to_vec()
    }
}

struct Cert {
    key: Key,
    name: Vec<u8>,
    ski: Vec<u8>,
    der: Vec<u8>,
    serial: [u8; 16],
}

static SERIAL_MS: AtomicU64 = AtomicU64::new(1_795_000_000_000);

/// Issues a certificate for `key` under `issuer` (self-signed when `None`).
fn issue(
    issuer: Option<&Cert>,
    key: Key,
    cn: &str,
    exts: impl FnOnce(&[u8], &[u8]) -> Vec<x509_cert::ext::Extension>,
) -> Cert {
    let name = x509::name_cn(cn).unwrap();
    let ski = x509::key_identifier(&key.spki).unwrap();
    let serial = x509::random_serial(SERIAL_MS.fetch_add(1, Ordering::Relaxed) as i64).unwrap();
    let (issuer_name, aki, signer) = match issuer {
        Some(i) => (i.name.clone(), i.ski.clone(), &i.key),
        None => (name.clone(), ski.clone(), &key),
    };
    let tbs = x509::encode_tbs(TbsParams {
        serial: &serial,
        signer: signer.alg,
        issuer_name_der: &issuer_name,
        subject_name_der: &name,
        spki_der: &key.spki,
        not_before: now() - 3600,
        not_after: now() + 86_400,
        extensions: exts(&ski, &aki),
    })
    .unwrap();
    let der = x509::assemble(&tbs, signer.alg, &signer.sign(&tbs)).unwrap();
    Cert {
        key,
        name,
        ski,
        der,
        serial,
    }
}

fn urls() -> RevocationUrls {
    RevocationUrls {
        crl: "https://pki.example.test/v1/ca/devices/crl".into(),
        ocsp: "https://pki.example.test/v1/ocsp".into(),
        ca_issuers: "https://pki.example.test/v1/ca/devices/chain".into(),
    }
}

struct Pki {
    dir: tempfile::TempDir,
    root: Cert,
    issuing: Cert,
    good: Cert,
    revoked: Cert,
    held: Cert,
}

fn device(issuing: &Cert, cn: &str) -> Cert {
    issue(Some(issuing), key(KeyAlgorithm::EcdsaP256), cn, |s, a| {
        x509::device_extensions(
            s,
            a,
            KeyAlgorithm::EcdsaP256,
            &[Eku::ClientAuth],
            &format!("urn:uuid:{cn}"),
            Some(&urls()),
        )
        .unwrap()
    })
}

/// Root (P-384) → issuing CA (P-256) → three devices; PEM files written.
fn pki() -> Pki {
    let root = issue(None, key(KeyAlgorithm::EcdsaP384), "Test Root", |s, a| {
        x509::ca_extensions(s, a, Some(1)).unwrap()
    });
    let issuing = issue(
        Some(&root),
        key(KeyAlgorithm::EcdsaP256),
        "Test Issuing",
        |s, a| x509::ca_extensions(s, a, Some(0)).unwrap(),
    );
    let good = device(&issuing, "6a0e5b1e-0000-4000-8000-000000000001");
    let revoked = device(&issuing, "6a0e5b1e-0000-4000-8000-000000000002");
    let held = device(&issuing, "6a0e5b1e-0000-4000-8000-000000000003");
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki {
        dir,
        root,
        issuing,
        good,
        revoked,
        held,
    };
    for (n, c) in [
        ("root.pem", &pki.root),
        ("issuing.pem", &pki.issuing),
        ("good.pem", &pki.good),
        ("revoked.pem", &pki.revoked),
        ("held.pem", &pki.held),
    ] {
        std::fs::write(pki.path(n), x509::to_pem(&c.der).unwrap()).unwrap();
    }
    pki
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn openssl(args: &[&str], cwd: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn colon_hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn signed_crl(issuer: &Cert, number: u64, revoked: &[RevokedEntry]) -> Vec<u8> {
    let tbs = crl::encode_tbs(&CrlParams {
        signer: issuer.key.alg,
        issuer_name_der: &issuer.name,
        issuer_key_id: &issuer.ski,
        crl_number: number,
        this_update: now() - 60,
        next_update: now() + 3600,
        revoked,
    })
    .unwrap();
    crl::assemble(&tbs, issuer.key.alg, &issuer.key.sign(&tbs)).unwrap()
}

fn entry(c: &Cert, reason: RevocationReason) -> RevokedEntry {
    RevokedEntry {
        serial: Serial::from_bytes(&c.serial).unwrap(),
        revoked_at: now() - 30,
        reason,
    }
}

#[test]
fn crls_verify_and_revoke_with_openssl() {
    let pki = pki();
    let d = pki.dir.path();
    let issuing_crl = signed_crl(
        &pki.issuing,
        7,
        &[
            entry(&pki.revoked, RevocationReason::KeyCompromise),
            entry(&pki.held, RevocationReason::CertificateHold),
        ],
    );
    let root_crl = signed_crl(&pki.root, 1, &[]);
    std::fs::write(
        pki.path("issuing.crl.pem"),
        crl::to_pem(&issuing_crl).unwrap(),
    )
    .unwrap();
    std::fs::write(pki.path("root.crl.pem"), crl::to_pem(&root_crl).unwrap()).unwrap();
    std::fs::write(pki.path("issuing.crl.der"), &issuing_crl).unwrap();
    std::fs::write(
        pki.path("chain.pem"),
        format!(
            "{}{}",
            x509::to_pem(&pki.root.der).unwrap(),
            x509::to_pem(&pki.issuing.der).unwrap()
        ),
    )
    .unwrap();

    // Signatures: P-256 (issuing CA) and P-384 (root).
    for crl_file in ["issuing.crl.pem", "root.crl.pem"] {
        let (ok, out) = openssl(
            &[
                "crl",
                "-in",
                crl_file,
                "-CAfile",
                "chain.pem",
                "-verify",
                "-noout",
            ],
            d,
        );
        assert!(ok && out.contains("verify OK"), "{crl_file}: {out}");
    }
    let (ok, out) = openssl(
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            "issuing.crl.der",
            "-CAfile",
            "root.pem",
            "-verify",
            "-noout",
        ],
        d,
    );
    assert!(
        !out.contains("verify OK"),
        "a CRL must not verify against the wrong CA: {ok} {out}"
    );

    // Fields: AKI is the issuing CA's own key id (not the root's), CRL number, reasons.
    let (ok, text) = openssl(&["crl", "-in", "issuing.crl.pem", "-text", "-noout"], d);
    assert!(ok, "{text}");
    assert!(text.contains(&colon_hex(&pki.issuing.ski)), "{text}");
    assert!(!text.contains(&colon_hex(&pki.root.ski)), "{text}");
    assert!(text.contains("X509v3 CRL Number"), "{text}");
    assert!(
        text.contains("\n                7\n") || text.contains(" 7\n"),
        "{text}"
    );
    assert!(text.contains("Key Compromise"), "{text}");
    assert!(text.contains("Certificate Hold"), "{text}");
    assert!(
        text.contains(&hex::encode_upper(pki.revoked.serial)),
        "{text}"
    );
    assert!(
        !text.contains(&hex::encode_upper(pki.good.serial)),
        "{text}"
    );

    // Chain checks with both CRLs.
    let verify = |cert: &str| {
        openssl(
            &[
                "verify",
                "-crl_check_all",
                "-CAfile",
                "root.pem",
                "-untrusted",
                "issuing.pem",
                "-CRLfile",
                "issuing.crl.pem",
                "-CRLfile",
                "root.crl.pem",
                cert,
            ],
            d,
        )
    };
    let (ok, out) = verify("good.pem");
    assert!(ok && out.contains("good.pem: OK"), "{out}");
    for c in ["revoked.pem", "held.pem"] {
        let (ok, out) = verify(c);
        assert!(!ok && out.contains("certificate revoked"), "{c}: {out}");
    }
    // Without the issuing CA's CRL, -crl_check fails closed.
    let (ok, out) = openssl(
        &[
            "verify",
            "-crl_check",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "issuing.pem",
            "-CRLfile",
            "root.crl.pem",
            "good.pem",
        ],
        d,
    );
    assert!(
        !ok && out.contains("unable to get certificate CRL"),
        "{out}"
    );
}

#[test]
fn crl_with_100k_entries_is_signed_and_read_by_openssl() {
    let pki = pki();
    let revoked: Vec<RevokedEntry> = (0..100_000u64)
        .map(|i| {
            let mut s = [0u8; 16];
            s[0] = 0x01;
            s[8..].copy_from_slice(&i.to_be_bytes());
            RevokedEntry {
                serial: Serial::from_bytes(&s).unwrap(),
                revoked_at: now() - 1000 + (i % 500) as i64,
                reason: if i % 3 == 0 {
                    RevocationReason::Unspecified
                } else {
                    RevocationReason::KeyCompromise
                },
            }
        })
        .collect();
    let start = std::time::Instant::now();
    let der = signed_crl(&pki.issuing, 42, &revoked);
    println!(
        "100,000-entry CRL: {} bytes, encoded and signed (ring P-256) in {:?}",
        der.len(),
        start.elapsed()
    );
    std::fs::write(pki.path("big.crl"), &der).unwrap();
    let (ok, out) = openssl(
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            "big.crl",
            "-CAfile",
            "issuing.pem",
            "-verify",
            "-noout",
        ],
        pki.dir.path(),
    );
    assert!(ok && out.contains("verify OK"), "{out}");
}

#[test]
fn certificates_carry_cdp_aia_and_ocsp_signer_extensions() {
    let pki = pki();
    let (ok, text) = openssl(
        &["x509", "-in", "good.pem", "-noout", "-text"],
        pki.dir.path(),
    );
    assert!(ok, "{text}");
    let u = urls();
    assert!(text.contains("X509v3 CRL Distribution Points"), "{text}");
    assert!(text.contains(&format!("URI:{}", u.crl)), "{text}");
    assert!(text.contains("Authority Information Access"), "{text}");
    assert!(text.contains(&format!("OCSP - URI:{}", u.ocsp)), "{text}");
    assert!(
        text.contains(&format!("CA Issuers - URI:{}", u.ca_issuers)),
        "{text}"
    );

    let signer = ocsp_signer(&pki.issuing);
    std::fs::write(pki.path("ocsp.pem"), x509::to_pem(&signer.der).unwrap()).unwrap();
    let (ok, text) = openssl(
        &["x509", "-in", "ocsp.pem", "-noout", "-text"],
        pki.dir.path(),
    );
    assert!(ok, "{text}");
    assert!(text.contains("OCSP Signing"), "{text}");
    assert!(text.contains("OCSP No Check"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    let (ok, out) = openssl(
        &[
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "issuing.pem",
            "-purpose",
            "ocsphelper",
            "ocsp.pem",
        ],
        pki.dir.path(),
    );
    assert!(ok, "{out}");
}

fn ocsp_signer(issuing: &Cert) -> Cert {
    issue(
        Some(issuing),
        key(KeyAlgorithm::EcdsaP256),
        "Test OCSP responder",
        |s, a| x509::ocsp_signer_extensions(s, a).unwrap(),
    )
}

/// What the responder knows: serial → status.
fn status_of(pki: &Pki, serial: &Serial) -> CertStatus {
    if serial.magnitude() == pki.good.serial {
        CertStatus::Good
    } else if serial.magnitude() == pki.revoked.serial {
        CertStatus::Revoked {
            time: now() - 30,
            reason: RevocationReason::KeyCompromise,
        }
    } else {
        CertStatus::Unknown
    }
}

fn respond(pki: &Pki, signer: &Cert, req: &ocsp::OcspRequest, certs: &[&[u8]]) -> Vec<u8> {
    let ids = IssuerId::for_issuer(&pki.issuing.name, &pki.issuing.key.spki).unwrap();
    let singles: Vec<SingleResponse<'_>> = req
        .cert_ids
        .iter()
        .map(|id| {
            assert!(ids.contains(&id.issuer), "request names the issuing CA");
            SingleResponse {
                cert_id: id,
                status: status_of(pki, &id.serial),
                this_update: now() - 60,
                next_update: Some(now() + 3600),
            }
        })
        .collect();
    let key_hash = ocsp::responder_key_hash(&signer.key.spki).unwrap();
    let data = ocsp::response_data(&ResponseData {
        responder_key_hash: &key_hash,
        produced_at: now(),
        responses: &singles,
        nonce: req.nonce.as_ref(),
    })
    .unwrap();
    ocsp::assemble(&data, signer.key.alg, &signer.key.sign(&data), certs).unwrap()
}

fn openssl_request(pki: &Pki, out: &str, extra: &[&str]) -> Vec<u8> {
    let mut args = vec!["ocsp", "-issuer", "issuing.pem", "-reqout", out];
    args.extend_from_slice(extra);
    let (ok, text) = openssl(&args, pki.dir.path());
    assert!(ok, "{text}");
    std::fs::read(pki.path(out)).unwrap()
}

#[test]
fn ocsp_requests_from_openssl_parse_and_responses_verify() {
    let pki = pki();
    let d = pki.dir.path();
    let signer = ocsp_signer(&pki.issuing);
    let limits = RequestLimits::default();
    let ids = IssuerId::for_issuer(&pki.issuing.name, &pki.issuing.key.spki).unwrap();

    for (cert, file, extra, hash, with_nonce) in [
        ("good.pem", "good", &[][..], HashAlgorithm::Sha1, true),
        (
            "good.pem",
            "good-nn",
            &["-no_nonce"][..],
            HashAlgorithm::Sha1,
            false,
        ),
        (
            "revoked.pem",
            "revoked",
            &["-sha256"][..],
            HashAlgorithm::Sha256,
            true,
        ),
        ("held.pem", "unknown", &[][..], HashAlgorithm::Sha1, true),
    ] {
        // openssl wants the digest before -cert.
        let mut args = extra.to_vec();
        args.extend_from_slice(&["-cert", cert]);
        let req_der = openssl_request(&pki, &format!("{file}.req"), &args);
        let req = ocsp::parse_request(&req_der, &limits).unwrap();
        assert_eq!(req.cert_ids.len(), 1);
        let id = &req.cert_ids[0];
        assert_eq!(id.issuer.hash, hash);
        assert_eq!(
            &id.issuer,
            &ids[if hash == HashAlgorithm::Sha1 { 0 } else { 1 }]
        );
        assert_eq!(req.nonce.is_some(), with_nonce, "{file}");
        if let Some(n) = &req.nonce {
            assert_eq!(n.as_bytes().len(), 16, "openssl's default nonce");
        }
        // The GET form of the same request parses to the same thing.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&req_der);
        let get = b64
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D");
        assert_eq!(ocsp::parse_get(&get, &limits).unwrap(), req);

        let resp = respond(&pki, &signer, &req, &[&signer.der]);
        std::fs::write(pki.path(&format!("{file}.resp")), &resp).unwrap();

        // Signature, delegated responder and nonce, against the request as sent.
        let (ok, out) = openssl(
            &[
                "ocsp",
                "-reqin",
                &format!("{file}.req"),
                "-respin",
                &format!("{file}.resp"),
                "-CAfile",
                "root.pem",
                "-verify_other",
                "issuing.pem",
            ],
            d,
        );
        assert!(ok && out.contains("Response verify OK"), "{file}: {out}");
        assert!(!out.contains("WARNING"), "{file}: {out}");

        // Status, as a relying party reads it.
        let resp_file = format!("{file}.resp");
        let mut args = vec!["ocsp", "-respin", &resp_file, "-issuer", "issuing.pem"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-cert", cert, "-CAfile", "root.pem", "-no_nonce"]);
        let (ok, out) = openssl(&args, d);
        assert!(ok && out.contains("Response verify OK"), "{file}: {out}");
        match file {
            "good" | "good-nn" => assert!(out.contains(&format!("{cert}: good")), "{out}"),
            "revoked" => {
                assert!(out.contains(&format!("{cert}: revoked")), "{out}");
                assert!(out.contains("Reason: keyCompromise"), "{out}");
                assert!(out.contains("Revocation Time:"), "{out}");
            }
            _ => assert!(out.contains(&format!("{cert}: unknown")), "{out}"),
        }
        assert!(out.contains("Next Update:"), "{out}");
    }
}

#[test]
fn ocsp_checks_that_openssl_must_fail() {
    let pki = pki();
    let d = pki.dir.path();
    let signer = ocsp_signer(&pki.issuing);
    let limits = RequestLimits::default();
    let req_der = openssl_request(&pki, "n.req", &["-cert", "good.pem"]);
    let mut req = ocsp::parse_request(&req_der, &limits).unwrap();

    // A response echoing a different nonce.
    req.nonce = Some(ocsp::Nonce::new(&[0x42; 16]).unwrap());
    std::fs::write(
        pki.path("n.resp"),
        respond(&pki, &signer, &req, &[&signer.der]),
    )
    .unwrap();
    let (ok, out) = openssl(
        &[
            "ocsp",
            "-reqin",
            "n.req",
            "-respin",
            "n.resp",
            "-CAfile",
            "root.pem",
            "-verify_other",
            "issuing.pem",
        ],
        d,
    );
    assert!(!ok && out.contains("Nonce Verify error"), "{out}");

    // Signed by a key without id-kp-OCSPSigning (a device certificate):
    // a delegated responder needs the EKU, so openssl refuses it.
    let req = ocsp::parse_request(&req_der, &limits).unwrap();
    std::fs::write(
        pki.path("d.resp"),
        respond(&pki, &pki.revoked, &req, &[&pki.revoked.der]),
    )
    .unwrap();
    let (ok, out) = openssl(
        &[
            "ocsp",
            "-reqin",
            "n.req",
            "-respin",
            "d.resp",
            "-CAfile",
            "root.pem",
            "-verify_other",
            "issuing.pem",
        ],
        d,
    );
    assert!(!ok && out.contains("missing ocspsigning usage"), "{out}");

    // A tampered response: one digit of producedAt changed.
    let mut resp = respond(&pki, &signer, &req, &[&signer.der]);
    let key_hash = ocsp::responder_key_hash(&signer.key.spki).unwrap();
    let mut responder_id = vec![0xa2, 0x16, 0x04, 0x14];
    responder_id.extend_from_slice(&key_hash);
    let at = resp
        .windows(responder_id.len())
        .position(|w| w == responder_id)
        .unwrap()
        + responder_id.len();
    assert_eq!(
        resp[at..at + 2],
        [0x18, 0x0f],
        "producedAt follows the responder id"
    );
    resp[at + 2 + 13] ^= 1;
    std::fs::write(pki.path("t.resp"), resp).unwrap();
    let (ok, out) = openssl(
        &[
            "ocsp",
            "-reqin",
            "n.req",
            "-respin",
            "t.resp",
            "-CAfile",
            "root.pem",
            "-verify_other",
            "issuing.pem",
        ],
        d,
    );
    assert!(!ok && out.contains("Response Verify Failure"), "{out}");
}

#[tokio::test]
async fn presigned_response_without_nonce_and_status_only_errors() {
    let pki = pki();
    let d = pki.dir.path();
    let signer = ocsp_signer(&pki.issuing);
    let ids = IssuerId::for_issuer(&pki.issuing.name, &pki.issuing.key.spki).unwrap();
    let id = ocsp::CertId {
        issuer: ids[0].clone(),
        serial: Serial::from_bytes(&pki.revoked.serial).unwrap(),
    };
    let key_hash = ocsp::responder_key_hash(&signer.key.spki).unwrap();
    let resp = ocsp::presign(
        &key_hash,
        now(),
        SingleResponse {
            cert_id: &id,
            status: CertStatus::Revoked {
                time: now() - 30,
                reason: RevocationReason::CertificateHold,
            },
            this_update: now() - 60,
            next_update: Some(now() + 3600),
        },
        signer.key.alg,
        &[&signer.der, &pki.issuing.der],
        |tbs| {
            let key = &signer.key;
            async move { Ok::<_, std::io::Error>(key.sign(&tbs)) }
        },
    )
    .await
    .unwrap();
    std::fs::write(pki.path("cached.resp"), &resp).unwrap();
    // The issuing CA travels in `certs`: root.pem alone is enough.
    let (ok, out) = openssl(
        &[
            "ocsp",
            "-respin",
            "cached.resp",
            "-issuer",
            "issuing.pem",
            "-cert",
            "revoked.pem",
            "-CAfile",
            "root.pem",
            "-no_nonce",
        ],
        d,
    );
    assert!(ok && out.contains("revoked.pem: revoked"), "{out}");
    assert!(out.contains("Reason: certificateHold"), "{out}");

    // A signer error comes back typed.
    let err = ocsp::presign(
        &key_hash,
        now(),
        SingleResponse {
            cert_id: &id,
            status: CertStatus::Good,
            this_update: now(),
            next_update: None,
        },
        signer.key.alg,
        &[],
        |_| async { Err(std::io::Error::other("HSM gone")) },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ocsp::SignError::Signer(_)));

    // Status-only responses as openssl reads them.
    for (e, word) in [
        (OcspError::Unauthorized, "unauthorized"),
        (OcspError::TryLater, "trylater"),
        (OcspError::Internal, "internalerror"),
        (OcspError::NoCertIds, "malformedrequest"),
    ] {
        std::fs::write(pki.path("e.resp"), e.to_response()).unwrap();
        let (_, out) = openssl(&["ocsp", "-respin", "e.resp", "-resp_text", "-noverify"], d);
        assert!(
            out.to_lowercase().replace(' ', "").contains(word),
            "{word}: {out}"
        );
    }
}

#[test]
fn bad_ocsp_requests_get_typed_errors() {
    let pki = pki();
    let limits = RequestLimits::default();
    let req = openssl_request(&pki, "b.req", &["-cert", "good.pem"]);

    let mut trailing = req.clone();
    trailing.extend_from_slice(b"garbage");
    let e = ocsp::parse_request(&trailing, &limits).unwrap_err();
    assert!(matches!(e, OcspError::TrailingData(7)), "{e:?}");
    assert_eq!(e.code(), "ocsp_request_trailing_data");
    assert_eq!(e.to_response(), vec![0x30, 0x03, 0x0a, 0x01, 0x01]);

    let e = ocsp::parse_request(&req[..req.len() - 3], &limits).unwrap_err();
    assert!(matches!(e, OcspError::Malformed(_)), "{e:?}");
    let e = ocsp::parse_request(b"", &limits).unwrap_err();
    assert!(matches!(e, OcspError::Malformed(_)), "{e:?}");

    let small = RequestLimits {
        max_bytes: req.len() - 1,
        ..limits
    };
    let e = ocsp::parse_request(&req, &small).unwrap_err();
    assert!(matches!(e, OcspError::TooLarge { .. }), "{e:?}");
    assert_eq!(e.code(), "ocsp_request_too_large");
    let e = ocsp::parse_get(&"QUFB".repeat(20_000), &limits).unwrap_err();
    assert!(matches!(e, OcspError::TooLarge { .. }), "{e:?}");

    // Eleven CertIDs, one more than the default cap; ten pass.
    let mut args = vec![];
    for i in 1..=11 {
        args.push("-serial".to_string());
        args.push(format!("0x{i:x}"));
    }
    let args11: Vec<&str> = args.iter().map(String::as_str).collect();
    let many = openssl_request(&pki, "m.req", &args11);
    let e = ocsp::parse_request(&many, &limits).unwrap_err();
    assert!(matches!(e, OcspError::TooManyCertIds { max: 10 }), "{e:?}");
    let ten = openssl_request(&pki, "t.req", &args11[..20]);
    assert_eq!(
        ocsp::parse_request(&ten, &limits).unwrap().cert_ids.len(),
        10
    );

    // Unsupported hash algorithm.
    let sha512 = openssl_request(&pki, "s.req", &["-sha512", "-cert", "good.pem"]);
    let e = ocsp::parse_request(&sha512, &limits).unwrap_err();
    assert!(matches!(e, OcspError::UnsupportedHash(_)), "{e:?}");

    // Not base64 in the GET form.
    let e = ocsp::parse_get("%%%", &limits).unwrap_err();
    assert_eq!(e.code(), "ocsp_get_encoding");
}

#[test]
fn server_certificates_verify_for_tls_names() {
    let pki = pki();
    let server = issue(
        Some(&pki.issuing),
        key(KeyAlgorithm::EcdsaP256),
        "keyward",
        |s, a| {
            x509::server_extensions(
                s,
                a,
                KeyAlgorithm::EcdsaP256,
                &["localhost".to_string(), "keyward.example.test".to_string()],
                &["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
            )
            .unwrap()
        },
    );
    std::fs::write(pki.path("server.pem"), x509::to_pem(&server.der).unwrap()).unwrap();
    let d = pki.dir.path();
    let (ok, text) = openssl(&["x509", "-in", "server.pem", "-noout", "-text"], d);
    assert!(ok, "{text}");
    assert!(text.contains("TLS Web Server Authentication"), "{text}");
    assert!(
        text.contains("DNS:localhost, DNS:keyward.example.test, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1"),
        "{text}"
    );
    assert!(
        text.contains("Digital Signature") && !text.contains("Key Encipherment"),
        "{text}"
    );
    let base = [
        "verify",
        "-CAfile",
        "root.pem",
        "-untrusted",
        "issuing.pem",
        "-purpose",
        "sslserver",
    ];
    for check in [
        ["-verify_hostname", "localhost"],
        ["-verify_hostname", "keyward.example.test"],
        ["-verify_ip", "127.0.0.1"],
        ["-verify_ip", "::1"],
    ] {
        let args: Vec<&str> = base
            .iter()
            .chain(&check)
            .chain(&["server.pem"])
            .copied()
            .collect();
        let (ok, out) = openssl(&args, d);
        assert!(ok, "{check:?}: {out}");
    }
    let args: Vec<&str> = base
        .iter()
        .chain(&["-verify_hostname", "other.example.test", "server.pem"])
        .copied()
        .collect();
    let (ok, out) = openssl(&args, d);
    assert!(!ok && out.contains("hostname mismatch"), "{out}");
    // A device certificate is not a server certificate.
    let args: Vec<&str> = base.iter().chain(&["good.pem"]).copied().collect();
    let (ok, out) = openssl(&args, d);
    assert!(!ok, "{out}");

    // RSA server keys also get keyEncipherment.
    use der::Decode;
    let exts = x509::server_extensions(
        &[1; 20],
        &[2; 20],
        KeyAlgorithm::Rsa2048,
        &["a".into()],
        &[],
    )
    .unwrap();
    let ku = exts
        .iter()
        .find(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_KEY_USAGE)
        .unwrap();
    assert!(ku.critical);
    let ku = x509_cert::ext::pkix::KeyUsage::from_der(ku.extn_value.as_bytes()).unwrap();
    assert!(ku.digital_signature() && ku.key_encipherment());
}
