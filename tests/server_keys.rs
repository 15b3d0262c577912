//! Server-generated device keys end to end below the registry: a key made
//! extractable in a SoftHSM2 token, exported by wrapping, and delivered as an
//! age bundle or a PKCS#12, each opened with the stock tools (`age -d`,
//! `openssl pkcs12`) the way a device would. Re-executes itself with a private
//! `SOFTHSM2_CONF` (SoftHSM reads it once, at `C_Initialize`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/plaintext_scan.rs"]
mod plaintext_scan;

use keyward::keystore::pkcs11::{Pkcs11KeyStore, Pkcs11Settings, TokenSelector, context};
use keyward::keystore::{KeyAlgorithm, KeySpec, KeyStore};
use keyward::registry::delivery::{AgeRecipient, age_bundle, one_time_password, pkcs12};
use libtest_mimic::{Arguments, Failed, Trial};
use secrecy::{ExposeSecret, SecretString};
use std::path::Path;
use std::process::{Command, ExitCode, Output};

const READY: &str = "KEYWARD_TEST_SOFTHSM_DIR";

fn run<F: std::future::Future<Output = ()>>(f: F) -> Result<(), Failed> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f);
    Ok(())
}

async fn open_new_token() -> Pkcs11KeyStore {
    let ctx = context(&common::softhsm_module()).unwrap();
    let label = format!("d-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    keyward::softhsm::init_token_in_process(
        &ctx,
        &label,
        &SecretString::from(common::SO_PIN),
        &SecretString::from(common::PIN),
    )
    .unwrap();
    Pkcs11KeyStore::open(Pkcs11Settings {
        module: common::softhsm_module(),
        selector: TokenSelector::Label(label),
        pin: SecretString::from(common::PIN.to_string()),
        sessions: 1,
    })
    .await
    .unwrap()
}

fn tool(program: &str, args: &[&str], dir: &Path) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} missing ({e}): run scripts/test.sh"))
}

fn ok(out: Output, what: &str) -> Vec<u8> {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A device whose key lives (extractable) in the token, a certificate for
/// it issued by a throwaway openssl CA, and the exported PKCS#8. The test CA
/// signs only the public key (`-force_pubkey`): the private key never goes
/// to a file here.
struct Device {
    public_key_der: Vec<u8>,
    pkcs8: zeroize::Zeroizing<Vec<u8>>,
    cert_der: Vec<u8>,
    ca_der: Vec<u8>,
    ca_pem: String,
}

async fn device(ks: &Pkcs11KeyStore, algorithm: KeyAlgorithm, dir: &Path) -> Device {
    let id = uuid::Uuid::new_v4();
    let key = ks
        .generate(&KeySpec {
            id,
            label: format!("device-{}", &id.simple().to_string()[..8]),
            algorithm,
            extractable: true,
            usage: keyward::keystore::KeyUsage::Sign,
        })
        .await
        .unwrap();
    let pkcs8 = ks.export_private_key(&key.handle).await.unwrap();
    let pub_pem =
        der::pem::encode_string("PUBLIC KEY", der::pem::LineEnding::LF, &key.public_key_der)
            .unwrap();
    std::fs::write(dir.join("device-pub.pem"), pub_pem).unwrap();
    ok(
        tool(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-subj",
                "/CN=test issuing CA",
                "-days",
                "1",
                "-out",
                "ca.pem",
            ],
            dir,
        ),
        "CA",
    );
    ok(
        tool(
            "openssl",
            &[
                "x509",
                "-new",
                "-subj",
                "/CN=device-1",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-force_pubkey",
                "device-pub.pem",
                "-days",
                "1",
                "-outform",
                "DER",
                "-out",
                "device.der",
            ],
            dir,
        ),
        "device certificate",
    );
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let ca_der = ok(
        tool(
            "openssl",
            &["x509", "-in", "ca.pem", "-outform", "DER"],
            dir,
        ),
        "CA DER",
    );
    Device {
        public_key_der: key.public_key_der,
        pkcs8,
        cert_der: std::fs::read(dir.join("device.der")).unwrap(),
        ca_der,
        ca_pem,
    }
}

/// DER SPKI of the first private key in a PEM file, by openssl.
fn key_spki(dir: &Path, pem_file: &str) -> Vec<u8> {
    ok(
        tool(
            "openssl",
            &["pkey", "-in", pem_file, "-pubout", "-outform", "DER"],
            dir,
        ),
        "pkey -pubout",
    )
}

/// DER SPKI of the first certificate in a PEM file, by openssl.
fn cert_spki(dir: &Path, pem_file: &str) -> Vec<u8> {
    let pem = ok(
        tool(
            "openssl",
            &["x509", "-in", pem_file, "-pubkey", "-noout"],
            dir,
        ),
        "x509 -pubkey",
    );
    let (label, der) = der::pem::decode_vec(&pem).unwrap();
    assert_eq!(label, "PUBLIC KEY");
    der
}

/// SoftHSM keeps the token (and so the extractable device key) in files;
/// none of them may hold the key in plaintext after generation and export.
fn no_plaintext_in_token_dir(pkcs8: &[u8]) {
    let token_dir = std::path::PathBuf::from(std::env::var_os(READY).unwrap());
    let files = std::fs::read_dir(token_dir.join("tokens")).map(|d| d.count());
    assert!(
        matches!(files, Ok(n) if n > 0),
        "no token files to scan: {files:?}"
    );
    let holding = plaintext_scan::files_holding(&token_dir, pkcs8);
    assert!(holding.is_empty(), "plaintext key in {holding:?}");
}

fn age_bundle_opens_with_the_age_cli(algorithm: KeyAlgorithm) -> Result<(), Failed> {
    run(async move {
        let ks = open_new_token().await;
        let dir = tempfile::tempdir().unwrap();
        let d = device(&ks, algorithm, dir.path()).await;
        ok(
            tool("age-keygen", &["-o", "identity.txt"], dir.path()),
            "age-keygen",
        );
        ok(
            tool("age-keygen", &["-o", "stranger.txt"], dir.path()),
            "age-keygen",
        );
        let public = ok(
            tool("age-keygen", &["-y", "identity.txt"], dir.path()),
            "age-keygen -y",
        );
        let recipient = AgeRecipient::parse(String::from_utf8(public).unwrap().trim()).unwrap();

        let bundle = age_bundle(&recipient, &d.pkcs8, &d.cert_der, &d.ca_pem).unwrap();
        let text = String::from_utf8(bundle.clone()).unwrap();
        assert!(
            text.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"),
            "{text}"
        );
        assert!(!text.contains("PRIVATE KEY"));
        std::fs::write(dir.path().join("bundle.age"), &bundle).unwrap();

        let plain = ok(
            tool(
                "age",
                &["-d", "-i", "identity.txt", "-o", "bundle.pem", "bundle.age"],
                dir.path(),
            ),
            "age -d",
        );
        assert!(plain.is_empty());
        let pem = std::fs::read_to_string(dir.path().join("bundle.pem")).unwrap();
        let labels: Vec<&str> = pem
            .lines()
            .filter_map(|l| {
                l.strip_prefix("-----BEGIN ")
                    .and_then(|l| l.strip_suffix("-----"))
            })
            .collect();
        assert_eq!(
            labels,
            ["PRIVATE KEY", "CERTIFICATE", "CERTIFICATE"],
            "{algorithm}"
        );
        // The key in the bundle is the HSM key, and it matches the certificate.
        assert_eq!(
            key_spki(dir.path(), "bundle.pem"),
            d.public_key_der,
            "{algorithm}"
        );
        assert_eq!(
            cert_spki(dir.path(), "bundle.pem"),
            d.public_key_der,
            "{algorithm}"
        );
        // The chain is the CA, verbatim, after the device certificate.
        assert!(pem.ends_with(&d.ca_pem), "{pem}");
        std::fs::write(dir.path().join("leaf.pem"), {
            let start = pem.find("-----BEGIN CERTIFICATE-----").unwrap();
            let end = pem.find("-----END CERTIFICATE-----").unwrap()
                + "-----END CERTIFICATE-----\n".len();
            &pem[start..end]
        })
        .unwrap();
        ok(
            tool(
                "openssl",
                &["verify", "-CAfile", "ca.pem", "leaf.pem"],
                dir.path(),
            ),
            "openssl verify",
        );

        // The scanner finds the key where the device put it in plaintext
        // (a positive control), and nowhere in the token's storage.
        assert_eq!(
            plaintext_scan::files_holding(dir.path(), &d.pkcs8),
            vec![dir.path().join("bundle.pem")]
        );
        no_plaintext_in_token_dir(&d.pkcs8);

        // Anyone else's identity cannot open it.
        let other = tool(
            "age",
            &["-d", "-i", "stranger.txt", "bundle.age"],
            dir.path(),
        );
        assert!(!other.status.success());
        assert!(other.stdout.is_empty());
    })
}

fn pkcs12_opens_with_openssl(algorithm: KeyAlgorithm) -> Result<(), Failed> {
    run(async move {
        let ks = open_new_token().await;
        let dir = tempfile::tempdir().unwrap();
        let d = device(&ks, algorithm, dir.path()).await;
        let password = one_time_password().unwrap();
        let p12 = pkcs12(
            &d.pkcs8,
            &d.cert_der,
            std::slice::from_ref(&d.ca_der),
            &password,
            "device-1",
        )
        .unwrap();
        std::fs::write(dir.path().join("device.p12"), &p12).unwrap();
        let pass = format!("pass:{}", password.expose_secret());

        // -info names the algorithms: PBES2/PBKDF2/AES-256-CBC and a SHA-256 MAC.
        let info = tool(
            "openssl",
            &[
                "pkcs12",
                "-in",
                "device.p12",
                "-passin",
                &pass,
                "-info",
                "-noout",
            ],
            dir.path(),
        );
        let info_text = String::from_utf8_lossy(&info.stderr).to_string()
            + &String::from_utf8_lossy(&info.stdout);
        assert!(info.status.success(), "{info_text}");
        assert!(info_text.contains("MAC: sha256"), "{info_text}");
        assert!(
            info_text.contains("PBES2, PBKDF2, AES-256-CBC"),
            "{info_text}"
        );
        for weak in ["RC2", "3DES", "DES-EDE", "sha1"] {
            assert!(!info_text.contains(weak), "{weak}: {info_text}");
        }

        let all = String::from_utf8(ok(
            tool(
                "openssl",
                &["pkcs12", "-in", "device.p12", "-passin", &pass, "-nodes"],
                dir.path(),
            ),
            "pkcs12 -nodes",
        ))
        .unwrap();
        assert!(all.contains("friendlyName: device-1"), "{all}");
        assert!(all.contains("-----BEGIN PRIVATE KEY-----"), "{all}");
        let key_pem = ok(
            tool(
                "openssl",
                &[
                    "pkcs12",
                    "-in",
                    "device.p12",
                    "-passin",
                    &pass,
                    "-nocerts",
                    "-nodes",
                    "-out",
                    "key.pem",
                ],
                dir.path(),
            ),
            "pkcs12 -nocerts",
        );
        assert!(key_pem.is_empty());
        assert_eq!(
            key_spki(dir.path(), "key.pem"),
            d.public_key_der,
            "{algorithm}"
        );
        ok(
            tool(
                "openssl",
                &[
                    "pkcs12",
                    "-in",
                    "device.p12",
                    "-passin",
                    &pass,
                    "-clcerts",
                    "-nokeys",
                    "-out",
                    "leaf.pem",
                ],
                dir.path(),
            ),
            "pkcs12 -clcerts",
        );
        assert_eq!(cert_spki(dir.path(), "leaf.pem"), d.public_key_der);
        let leaf_der = ok(
            tool(
                "openssl",
                &["x509", "-in", "leaf.pem", "-outform", "DER"],
                dir.path(),
            ),
            "leaf DER",
        );
        assert_eq!(leaf_der, d.cert_der);
        ok(
            tool(
                "openssl",
                &[
                    "pkcs12",
                    "-in",
                    "device.p12",
                    "-passin",
                    &pass,
                    "-cacerts",
                    "-nokeys",
                    "-out",
                    "chain.pem",
                ],
                dir.path(),
            ),
            "pkcs12 -cacerts",
        );
        let chain_der = ok(
            tool(
                "openssl",
                &["x509", "-in", "chain.pem", "-outform", "DER"],
                dir.path(),
            ),
            "chain DER",
        );
        assert_eq!(chain_der, d.ca_der);

        let holding = plaintext_scan::files_holding(dir.path(), &d.pkcs8);
        assert_eq!(holding, vec![dir.path().join("key.pem")], "{holding:?}");
        no_plaintext_in_token_dir(&d.pkcs8);

        // A wrong password opens nothing.
        let wrong = format!("pass:{}", one_time_password().unwrap().expose_secret());
        let out = tool(
            "openssl",
            &["pkcs12", "-in", "device.p12", "-passin", &wrong, "-nodes"],
            dir.path(),
        );
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Mac verify error"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("PRIVATE KEY"));

        // Bad inputs are refused before anything is built.
        let empty = SecretString::from(String::new());
        let e = pkcs12(&d.pkcs8, &d.cert_der, &[], &empty, "x").unwrap_err();
        assert_eq!(e.code(), "empty_password");
        let e = pkcs12(&d.pkcs8, b"junk", &[], &password, "x").unwrap_err();
        assert_eq!(e.code(), "malformed_certificate");
        let e = pkcs12(&d.pkcs8, &d.cert_der, &[b"junk".to_vec()], &password, "x").unwrap_err();
        assert_eq!(e.code(), "malformed_certificate");
        let e = pkcs12(b"junk", &d.cert_der, &[], &password, "x").unwrap_err();
        assert_eq!(e.code(), "malformed_private_key");
        let e = pkcs12(&d.pkcs8, &d.cert_der, &[], &password, "").unwrap_err();
        assert_eq!(e.code(), "bad_friendly_name");
    })
}

fn trials() -> Vec<Trial> {
    vec![
        Trial::test("delivery::age_bundle_p256", || {
            age_bundle_opens_with_the_age_cli(KeyAlgorithm::EcdsaP256)
        }),
        Trial::test("delivery::age_bundle_rsa_2048", || {
            age_bundle_opens_with_the_age_cli(KeyAlgorithm::Rsa2048)
        }),
        Trial::test("delivery::pkcs12_p256", || {
            pkcs12_opens_with_openssl(KeyAlgorithm::EcdsaP256)
        }),
        Trial::test("delivery::pkcs12_rsa_2048", || {
            pkcs12_opens_with_openssl(KeyAlgorithm::Rsa2048)
        }),
    ]
}

fn main() -> ExitCode {
    if std::env::var_os(READY).is_none() {
        let dir = tempfile::tempdir().unwrap();
        let hsm = keyward::softhsm::SoftHsm::prepare(dir.path()).unwrap();
        let status = Command::new(std::env::current_exe().unwrap())
            .args(std::env::args_os().skip(1))
            .env("SOFTHSM2_CONF", hsm.conf())
            .env(READY, dir.path())
            .status()
            .unwrap();
        return ExitCode::from(status.code().unwrap_or(1) as u8);
    }
    libtest_mimic::run(&Arguments::from_args(), trials()).exit_code()
}
