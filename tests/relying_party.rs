//! A relying party end to end: a real Mosquitto broker, started by the test on
//! a free loopback port with a TLS listener that requires client
//! certificates, trusts keyward's chain and reads keyward's CRL file. Devices
//! connect with the stock `mosquitto_pub`; `openssl ocsp` asks keyward's
//! OCSP responder about the same certificates.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/mosquitto.rs"]
mod mosquitto;

use common::{Env, call, client, issue_device};
use mosquitto::Broker;
use std::path::Path;
use std::time::{Duration, Instant};

/// `openssl ocsp` for `cert` against keyward's responder; returns its output.
fn openssl_ocsp(url: &str, issuer: &Path, root: &Path, cert: &Path) -> String {
    let out = std::process::Command::new("openssl")
        .arg("ocsp")
        .arg("-issuer")
        .arg(issuer)
        .arg("-cert")
        .arg(cert)
        .arg("-CAfile")
        .arg(root)
        .args(["-url", &format!("{url}/v1/ocsp")])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Splits a chain file (issuing CA first, root last) into two PEM files.
fn split_chain(chain: &Path, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let text = std::fs::read_to_string(chain).unwrap();
    let certs: Vec<&str> = text
        .split_inclusive("-----END CERTIFICATE-----\n")
        .collect();
    assert_eq!(certs.len(), 2, "{text}");
    (
        common::write(dir, "issuing.pem", certs[0]),
        common::write(dir, "root.pem", certs[1]),
    )
}

/// Fetches `/v1/ca/{ca}/crl` as PEM into `path`; returns its CRL number.
async fn fetch_crl_pem(url: &str, ca: &str, path: &Path) -> String {
    let resp = client()
        .get(format!("{url}/v1/ca/{ca}/crl"))
        .header("accept", "application/x-pem-file")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let pem = resp.text().await.unwrap();
    assert!(pem.starts_with("-----BEGIN X509 CRL-----"), "{pem}");
    std::fs::write(path, &pem).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["crl", "-noout", "-crlnumber", "-in"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn mosquitto_accepts_an_issued_device_and_refuses_it_once_revoked() {
    let env = Env::new();
    let bootstrap = env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();

    let device = issue_device(&url, &bootstrap, &env.path("dev-a"), "sensor-a").await;
    let other = issue_device(&url, &bootstrap, &env.path("dev-b"), "sensor-b").await;

    // The broker trusts keyward's issuing CA and root, and checks the CRL.
    let crl = env.path("devices.crl.pem");
    let first = fetch_crl_pem(&url, "devices", &crl).await;
    let broker = Broker::start(&env.path("broker"), &device.chain, Some(&crl));

    let out = broker.publish(&device.cert, &device.key, "devices/a/temp", "21.5");
    assert!(
        out.status.success(),
        "an issued device must connect and publish: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        broker.log_text()
    );
    let log = broker.log_text();
    assert!(
        log.contains(&device.device_id),
        "the broker names the client by its certificate's CN (the device id): {log}"
    );

    // A certificate from a CA the broker does not trust is refused.
    let foreign = env.path("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let made = std::process::Command::new("openssl")
        .current_dir(&foreign)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-subj",
            "/CN=impostor",
            "-days",
            "1",
        ])
        .output()
        .unwrap();
    assert!(made.status.success());
    let out = broker.publish(
        &foreign.join("cert.pem"),
        &foreign.join("key.pem"),
        "t",
        "x",
    );
    assert!(
        !out.status.success(),
        "a foreign certificate must be refused"
    );

    // keyward's OCSP responder agrees, as the stock client sees it (the
    // response signed by the delegated signer, the nonce checked).
    let (issuing, root) = split_chain(&device.chain, env.dir.path());
    let ocsp = openssl_ocsp(&url, &issuing, &root, &device.cert);
    assert!(ocsp.contains("Response verify OK"), "{ocsp}");
    assert!(ocsp.contains(": good"), "{ocsp}");
    assert!(!ocsp.contains("WARNING"), "no nonce warning: {ocsp}");

    // Revoke with the operator CLI; the CRL keyward publishes names it.
    let revoke = env
        .keyward()
        .env("KEYWARD_URL", &url)
        .env("KEYWARD_TOKEN", &bootstrap)
        .args([
            "devices",
            "revoke",
            &device.device_id,
            "--reason",
            "keyCompromise",
        ])
        .output()
        .unwrap();
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    // The CRL is regenerated on revocation (debounced): wait for a new number.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let number = fetch_crl_pem(&url, "devices", &crl).await;
        if number != first {
            break;
        }
        assert!(Instant::now() < deadline, "no new CRL after the revocation");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = std::process::Command::new("openssl")
        .args(["crl", "-noout", "-text", "-in"])
        .arg(&crl)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains(&format!("Serial Number: {}", device.serial)),
        "{text}"
    );
    assert!(text.contains("Key Compromise"), "{text}");
    broker.reload();

    // The revoked device is refused; the other device still publishes.
    let mut refused = false;
    for _ in 0..10 {
        let out = broker.publish(&device.cert, &device.key, "devices/a/temp", "22.0");
        if !out.status.success() {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        refused,
        "the revoked device still connects: {}",
        broker.log_text()
    );
    let out = broker.publish(&other.cert, &other.key, "devices/b/temp", "19.0");
    assert!(
        out.status.success(),
        "an unrevoked device must still publish: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // OCSP says revoked, with the reason, at once (the responder is told
    // of the revocation as it commits).
    let ocsp = openssl_ocsp(&url, &issuing, &root, &device.cert);
    assert!(ocsp.contains("Response verify OK"), "{ocsp}");
    assert!(ocsp.contains(": revoked"), "{ocsp}");
    assert!(ocsp.contains("Reason: keyCompromise"), "{ocsp}");
    let ocsp = openssl_ocsp(&url, &issuing, &root, &other.cert);
    assert!(ocsp.contains(": good"), "{ocsp}");

    // keyward recorded the revocation.
    let (status, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/certs/{}", device.serial),
        Some(&bootstrap),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "revoked", "{v}");
}

/// Fetches a PEM resource (bundle, CRLs) into `path`; returns its text.
async fn fetch_pem(url: &str, path: &Path) -> String {
    let resp = client().get(url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{url}");
    let pem = resp.text().await.unwrap();
    std::fs::write(path, &pem).unwrap();
    pem
}

async fn rotation_step(url: &str, token: &str) -> serde_json::Value {
    let (status, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/rotations"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v[0].clone()
}

/// An issuing-CA rotation without downtime, as a relying party sees it: a
/// Mosquitto broker that trusts the root and the CA's bundle and reads its
/// CRLs accepts devices issued before and after the rotation; the retired
/// key keeps signing the CRL and OCSP answers for its own devices, so a
/// device it issued can still be revoked.
#[tokio::test]
async fn mosquitto_accepts_devices_issued_before_and_after_an_issuing_ca_rotation() {
    let env = Env::new();
    let bootstrap = env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    let before = issue_device(&url, &bootstrap, &env.path("dev-before"), "before").await;

    // The operator rotates with the CLI and waits for the new key.
    let out = env
        .keyward()
        .env("KEYWARD_URL", &url)
        .env("KEYWARD_TOKEN", &bootstrap)
        .args(["ca", "rotate", "devices", "--wait", "--reason", "annual"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let rotation = loop {
        let r = rotation_step(&url, &bootstrap).await;
        if r["step"] == "retired" {
            break r;
        }
        assert!(Instant::now() < deadline, "rotation never retired: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The old key stays (retired) while the device it issued is valid.
    assert!(
        rotation["destroy_after"].as_str().unwrap() > "2027",
        "{rotation}"
    );

    let after = issue_device(&url, &bootstrap, &env.path("dev-after"), "after").await;
    let old_chain = std::fs::read_to_string(&before.chain).unwrap();
    let new_chain = std::fs::read_to_string(&after.chain).unwrap();
    assert_ne!(
        old_chain.split("-----END CERTIFICATE-----").next(),
        new_chain.split("-----END CERTIFICATE-----").next(),
        "the new device is signed by the new CA certificate"
    );

    // The relying party trusts the root and every live CA certificate, and
    // reads every live key's CRL.
    let dir = env.path("rp");
    std::fs::create_dir_all(&dir).unwrap();
    let (_, root) = split_chain(&before.chain, &dir);
    let bundle = fetch_pem(
        &format!("{url}/v1/ca/devices/bundle"),
        &dir.join("bundle.pem"),
    )
    .await;
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{bundle}");
    let cafile = common::write(
        &dir,
        "cafile.pem",
        &format!("{}{bundle}", std::fs::read_to_string(&root).unwrap()),
    );
    let crls = dir.join("crls.pem");
    let text = fetch_pem(&format!("{url}/v1/ca/devices/crls"), &crls).await;
    assert_eq!(text.matches("BEGIN X509 CRL").count(), 2, "{text}");
    let broker = Broker::start(&env.path("broker"), &cafile, Some(&crls));
    for d in [&before, &after] {
        let out = broker.publish(&d.cert, &d.key, "devices/t", "1");
        assert!(
            out.status.success(),
            "{}: {}\n{}",
            d.device_id,
            String::from_utf8_lossy(&out.stderr),
            broker.log_text()
        );
    }

    // OCSP: each device's issuer answers (the old one signed by the retired
    // CA key itself, the new one by the new key's delegated signer).
    std::fs::create_dir_all(dir.join("old")).unwrap();
    std::fs::create_dir_all(dir.join("new")).unwrap();
    let (old_issuing, _) = split_chain(&before.chain, &dir.join("old"));
    let (new_issuing, _) = split_chain(&after.chain, &dir.join("new"));
    for (d, issuing) in [(&before, &old_issuing), (&after, &new_issuing)] {
        let ocsp = openssl_ocsp(&url, issuing, &root, &d.cert);
        assert!(ocsp.contains("Response verify OK"), "{ocsp}");
        assert!(ocsp.contains(": good"), "{ocsp}");
    }

    // Revoking the old key's device: the old key's CRL names it.
    let revoke = env
        .keyward()
        .env("KEYWARD_URL", &url)
        .env("KEYWARD_TOKEN", &bootstrap)
        .args([
            "devices",
            "revoke",
            &before.device_id,
            "--reason",
            "keyCompromise",
        ])
        .output()
        .unwrap();
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // `openssl crl` reads one CRL per file: each key's CRL on its own.
        let all = fetch_pem(&format!("{url}/v1/ca/devices/crls"), &crls).await;
        let listed = all
            .split_inclusive("-----END X509 CRL-----\n")
            .enumerate()
            .any(|(i, pem)| {
                let one = common::write(&dir, &format!("crl-{i}.pem"), pem);
                let out = std::process::Command::new("openssl")
                    .args(["crl", "-noout", "-text", "-in"])
                    .arg(&one)
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout)
                    .contains(&format!("Serial Number: {}", before.serial))
            });
        if listed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old key's CRL never listed the revoked device: {all}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    broker.reload();
    let mut refused = false;
    for _ in 0..10 {
        if !broker
            .publish(&before.cert, &before.key, "devices/t", "2")
            .status
            .success()
        {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        refused,
        "the revoked old device still connects: {}",
        broker.log_text()
    );
    let out = broker.publish(&after.cert, &after.key, "devices/t", "3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ocsp = openssl_ocsp(&url, &old_issuing, &root, &before.cert);
    assert!(ocsp.contains("Response verify OK"), "{ocsp}");
    assert!(ocsp.contains(": revoked"), "{ocsp}");
}
