//! Attested enrollment end to end against a real `keyward serve` (SoftHSM2
//! token, SQLite), one daemon per test:
//! - JWT (seed 003, SORACOM Endorse style): the test serves the JWKS over
//!   HTTP itself and mints tokens with `jsonwebtoken` (independent of
//!   keyward's verifier); hostile tokens are crafted by hand.
//! - Manufacturer certificates (seed 000, plgd DPS): roots, intermediate,
//!   leaves and CRL made by the stock `openssl` CLI; the possession proof is
//!   made both by `keyward enroll` and by hand with `openssl dgst -sign`.
//!
//! Every refusal is checked for its exact code and for nothing stored.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

async fn register(url: &str, body: Value) -> (u16, Value) {
    call(
        Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(body),
    )
    .await
}

/// Registrations, devices and certificates, which a refused request must not change.
fn enrollment_rows(env: &Env) -> (i64, i64, i64) {
    let c = env.counts();
    (c["registrations"], c["devices"], c["certificates"])
}

/// Sends `body`, expects a refusal with exactly `status` and `code`, and
/// that nothing was stored.
async fn refused(env: &Env, url: &str, body: Value, status: u16, code: &str) {
    let before = enrollment_rows(env);
    let (got, v) = register(url, body).await;
    assert_eq!(
        (got, v["error"]["code"].as_str()),
        (status, Some(code)),
        "{v}"
    );
    assert_eq!(enrollment_rows(env), before, "{code}: something was stored");
}

/// `keyward enroll` with `flags`; returns the registration id it prints and
/// its output directory.
fn enroll(env: &Env, url: &str, name: &str, flags: &[(&str, &Path)]) -> (String, PathBuf) {
    let out_dir = env.path(&format!("out-{name}"));
    let mut cmd = env.keyward();
    cmd.env("KEYWARD_URL", url).args(["enroll", "--name", name]);
    cmd.arg("--out").arg(&out_dir).args(["--timeout", "30"]);
    for (flag, value) in flags {
        cmd.arg(flag).arg(value);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "enroll {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    (id, out_dir)
}

async fn registration(url: &str, admin: &str, id: &str) -> Value {
    let (status, v) = call(
        Method::GET,
        &format!("{url}/v1/registrations/{id}"),
        Some(admin),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn cert_status(url: &str, admin: &str, serial: &str) -> (String, Option<String>) {
    let (status, c) = call(
        Method::GET,
        &format!("{url}/v1/admin/certs/{serial}"),
        Some(admin),
        None,
    )
    .await;
    assert_eq!(status, 200, "{c}");
    (
        c["status"].as_str().unwrap().to_string(),
        c["revocation_reason"].as_str().map(str::to_string),
    )
}

/// The credentials `keyward enroll` wrote verify with the stock openssl.
fn assert_verifies(out_dir: &Path) {
    let chain = out_dir.join("chain.pem");
    let (ok, why) = openssl_verify(&chain, &chain, &out_dir.join("cert.pem"));
    assert!(ok, "{why}");
}

/// The `device.reprovision` event of registration `id` (it names the
/// certificates it superseded).
fn reprovision_event(env: &Env, id: &Value) -> Value {
    env.audit_details_after(0)
        .into_iter()
        .find(|(a, _, _, d)| a == "device.reprovision" && d["registration"] == *id)
        .map(|e| e.3)
        .expect("device.reprovision audited")
}

// ---------------------------------------------------------------------------
// JWT (seed 003)

const ISS: &str = "https://endorse.test";
const KID: &str = "endorse-1";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(imsi: &str) -> Value {
    json!({ "iss": ISS, "aud": "keyward", "iat": now(), "exp": now() + 300,
            "jti": uuid::Uuid::new_v4().to_string(), "imsi": imsi })
}

/// ES256 by `jsonwebtoken` with the PKCS#8 key `der`, header `kid` = KID.
fn mint(der: &[u8], claims: &Value) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(KID.into());
    encode(&header, claims, &EncodingKey::from_ec_der(der)).unwrap()
}

/// A compact JWS crafted by hand: header `alg` (and KID), `sign` over the input.
fn by_hand(alg: &str, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let header = json!({ "alg": alg, "typ": "JWT", "kid": KID });
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn p256() -> (Vec<u8>, Vec<u8>) {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING as ALG, EcdsaKeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ALG, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ALG, pkcs8.as_ref(), &rng).unwrap();
    (pkcs8.as_ref().to_vec(), pair.public_key().as_ref().to_vec())
}

/// Serves `{"keys": [jwk]}` at /jwks.json on a free loopback port.
async fn serve_jwks(public: &[u8]) -> (String, tokio::task::JoinHandle<()>) {
    let doc = json!({ "keys": [{
        "kty": "EC", "crv": "P-256", "kid": KID, "use": "sig", "alg": "ES256",
        "x": URL_SAFE_NO_PAD.encode(&public[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&public[33..65]),
    }]});
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let doc = doc.clone();
            async move { axum::Json(doc) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_attestation_enrolls_reprovisions_and_refuses_bad_tokens() {
    let (der, public) = p256();
    let (jwks_url, jwks_task) = serve_jwks(&public).await;
    let env = Env::with_extra_group(&format!(
        "[[group]]\nname = \"sim\"\nprofile = \"device\"\n\
         attestation = {{ method = \"jwt\", issuer = \"{ISS}\", audience = \"keyward\", \
         jwks_url = \"{jwks_url}\", device_claim = \"imsi\", algorithms = [\"ES256\"] }}\n\
         approval = \"auto\"\n\n[group.device_config]\nstatus_topic = \"dt/v1/{{device_id}}/status\"\n"
    ));
    let root = env.init();
    let d = env.serve();
    let url = d.url.clone();
    let work = env.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let imsi = "440103123456789";

    // The reference client enrolls with a JWT file: issued at once.
    let jwt_file = write(&work, "jwt", &mint(&der, &claims(imsi)));
    let (first_id, out_dir) = enroll(&env, &url, "sim-1", &[("--jwt-file", &jwt_file)]);
    assert_verifies(&out_dir);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("device-config.json")).unwrap())
            .unwrap();
    let first = registration(&url, &root, &first_id).await;
    let device = first["device_id"].as_str().unwrap().to_string();
    assert_eq!(config["status_topic"], format!("dt/v1/{device}/status"));
    assert_eq!(
        (first["status"].as_str(), first["group"].as_str()),
        (Some("issued"), Some("sim"))
    );
    assert_eq!(first["attestation"], "jwt");
    assert_eq!(first["reenrollment"], false);
    assert_eq!(first["attestation_details"]["device_claim"], "imsi");
    assert_eq!(first["attestation_details"]["device_claim_value"], imsi);
    let old_serial = first["certificate_serial"].as_str().unwrap().to_string();

    // A second JWT (new jti) naming the same IMSI: the same device,
    // re-provisioned, its old certificate superseded.
    let csr = || openssl_csr(&work, "ec").0;
    let jwt_body = |token: &str| json!({ "csr": csr(), "name": "sim-1b", "attestation": { "method": "jwt", "token": token } });
    let second_jwt = mint(&der, &claims(imsi));
    let (status, r) = register(&url, jwt_body(&second_jwt)).await;
    assert_eq!((status, r["status"].as_str()), (201, Some("issued")), "{r}");
    assert_eq!(r["device_id"], device.as_str());
    let second = registration(&url, &root, r["id"].as_str().unwrap()).await;
    assert_eq!(second["reenrollment"], true);
    assert_eq!(second["attestation_details"]["device_claim_value"], imsi);
    assert_eq!(
        cert_status(&url, &root, &old_serial).await,
        ("revoked".into(), Some("superseded".into()))
    );
    let event = reprovision_event(&env, &second["id"]);
    assert_eq!(event["superseded"], json!([old_serial]));

    // Refused, with the exact code, nothing stored.
    let edit = |edits: &[(&str, Value)]| {
        let mut c = claims(imsi);
        for (k, v) in edits {
            c[*k] = v.clone();
        }
        c
    };
    let (attacker, _) = p256();
    let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public);
    let expired = [("exp", json!(now() - 3600)), ("iat", json!(now() - 7200))];
    for (token, code) in [
        (second_jwt.clone(), "jwt_replayed"),
        (mint(&der, &edit(&expired)), "jwt_expired"),
        (
            mint(&der, &edit(&[("aud", json!("other"))])),
            "jwt_wrong_audience",
        ),
        (
            mint(&der, &edit(&[("iss", json!("https://x.test"))])),
            "jwt_unknown_issuer",
        ),
        // Forged: another key under the trusted key's kid.
        (mint(&attacker, &claims(imsi)), "jwt_signature_invalid"),
        // `alg: none`, and HS256 keyed with the issuer's public key bytes.
        (
            by_hand("none", &claims(imsi), |_| Vec::new()),
            "jwt_algorithm_refused",
        ),
        (
            by_hand("HS256", &claims(imsi), |m| {
                ring::hmac::sign(&hmac_key, m).as_ref().to_vec()
            }),
            "jwt_algorithm_refused",
        ),
    ] {
        refused(&env, &url, jwt_body(&token), 401, code).await;
    }
    // A valid JWT for `sim` while the body names `default`.
    let valid = mint(&der, &claims("440103000000002"));
    let mut body = jwt_body(&valid);
    body["group"] = json!("default");
    refused(&env, &url, body, 400, "group_mismatch").await;
    // The `sim` group cannot be chosen by name without its proof.
    let plain = json!({ "csr": csr(), "name": "sneaky", "group": "sim" });
    refused(&env, &url, plain, 401, "attestation_required").await;
    // The refusal above did not burn the JWT: it enrolls a new device.
    let (status, r) = register(&url, jwt_body(&valid)).await;
    assert_eq!((status, r["status"].as_str()), (201, Some("issued")), "{r}");
    assert_ne!(r["device_id"], device.as_str());
    jwks_task.abort();
}

// ---------------------------------------------------------------------------
// Manufacturer certificates (seed 000)

fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl missing: run scripts/test.sh");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// With `openssl req`/`ca`, keys in NAME.key: `root` and `other`
/// (self-signed CAs), `int` (line 2, pathlen:0) under root; leaves `a`, `r`
/// (revoked on `crl.pem`) and `e` (expired 2020-2021) under root, `b` under
/// int, `u` under other. `b-chain.pem` is b then int.
fn manufacturer_fixtures(d: &Path) {
    let mut cnf = String::from(
        "[req]\ndistinguished_name = dn\n[dn]\n[any]\norganizationName = optional\ncommonName = supplied\n\
         [v3_ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n\
         [v3_int]\nbasicConstraints = critical,CA:TRUE,pathlen:0\nkeyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n\
         [v3_leaf]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = clientAuth\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n",
    );
    for ca in ["root", "int", "other"] {
        std::fs::create_dir(d.join(format!("db-{ca}"))).unwrap();
        std::fs::write(d.join(format!("db-{ca}/index.txt")), "").unwrap();
        std::fs::write(d.join(format!("db-{ca}/serial")), "1000\n").unwrap();
        std::fs::write(d.join(format!("db-{ca}/crlnumber")), "01\n").unwrap();
        cnf.push_str(&format!(
            "[ca_{ca}]\ndatabase = db-{ca}/index.txt\nnew_certs_dir = db-{ca}\ncertificate = {ca}.pem\n\
             private_key = {ca}.key\nserial = db-{ca}/serial\ncrlnumber = db-{ca}/crlnumber\n\
             default_md = sha256\ndefault_days = 365\ndefault_crl_days = 30\npolicy = any\n\
             unique_subject = no\ncopy_extensions = none\n"
        ));
    }
    std::fs::write(d.join("ca.cnf"), cnf).unwrap();
    // openssl, with its arguments split at whitespace.
    let run = |line: &str| openssl(d, &line.split_whitespace().collect::<Vec<_>>());
    let req = "req -new -config ca.cnf -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256";
    for (ca, cn) in [("root", "Acme-Root-CA"), ("other", "Umbrella-Root")] {
        run(&format!(
            "{req} -subj /O=Acme/CN={cn} -keyout {ca}.key -x509 -extensions v3_ca -days 3650 -out {ca}.pem"
        ));
    }
    let old = "-startdate 20200101000000Z -enddate 20210101000000Z";
    for (name, ca, ext, dates) in [
        ("int", "root", "v3_int", "-days 1825"),
        ("a", "root", "v3_leaf", "-days 365"),
        ("b", "int", "v3_leaf", "-days 365"),
        ("r", "root", "v3_leaf", "-days 365"),
        ("u", "other", "v3_leaf", "-days 365"),
        ("e", "root", "v3_leaf", old),
    ] {
        run(&format!(
            "{req} -subj /O=Acme/CN=acme-{name}-0001 -keyout {name}.key -out {name}.csr"
        ));
        run(&format!(
            "ca -batch -notext -config ca.cnf -name ca_{ca} -extensions {ext} -in {name}.csr -out {name}.pem {dates}"
        ));
    }
    run("ca -config ca.cnf -name ca_root -revoke r.pem");
    run("ca -config ca.cnf -name ca_root -gencrl -out crl.pem");
    let read = |n: &str| std::fs::read_to_string(d.join(n)).unwrap();
    std::fs::write(d.join("b-chain.pem"), read("b.pem") + &read("int.pem")).unwrap();
}

/// `openssl x509 -noout -nameopt RFC2253 ARG`: the value after `=`.
fn openssl_field(d: &Path, name: &str, arg: &str) -> String {
    let out = openssl(
        d,
        &["x509", "-noout", "-nameopt", "RFC2253", arg, "-in", name],
    );
    let text = String::from_utf8(out).unwrap();
    text.trim().split_once('=').unwrap().1.trim().to_string()
}

async fn fresh_nonce(url: &str) -> String {
    let (status, n) = call(
        Method::GET,
        &format!("{url}/v1/registrations/nonce"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{n}");
    n["nonce"].as_str().unwrap().to_string()
}

/// A registration body made by hand: a fresh CSR, and `signer`'s key
/// (`openssl dgst -sha256 -sign`) over
/// `keyward-enroll-v1\n` + nonce + `\n` + hex(SHA-256(CSR DER)).
fn x509_body(d: &Path, chain: &str, signer: &str, nonce: &str) -> Value {
    let (csr_pem, _) = openssl_csr(d, "ec");
    std::fs::write(d.join("req.pem"), &csr_pem).unwrap();
    let csr_der = openssl(d, &["req", "-in", "req.pem", "-outform", "DER"]);
    let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, &csr_der));
    std::fs::write(
        d.join("msg"),
        format!("keyward-enroll-v1\n{nonce}\n{digest}"),
    )
    .unwrap();
    let signature = openssl(
        d,
        &["dgst", "-sha256", "-sign", &format!("{signer}.key"), "msg"],
    );
    json!({
        "csr": csr_pem,
        "name": "by-hand",
        "attestation": {
            "method": "x509",
            "chain": std::fs::read_to_string(d.join(chain)).unwrap(),
            "nonce": nonce,
            "signature": STANDARD.encode(signature),
        },
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn manufacturer_certificates_enroll_in_the_most_specific_group() {
    let fixtures = tempfile::tempdir().unwrap();
    let m = fixtures.path();
    manufacturer_fixtures(m);
    let group = |name: &str, ca: &str, crl: &str| {
        format!(
            "[[group]]\nname = \"{name}\"\nprofile = \"device\"\napproval = \"auto\"\n\
             attestation = {{ method = \"x509\", manufacturer_ca = \"{}\"{crl} }}\n",
            m.join(ca).display()
        )
    };
    let crl = format!(", manufacturer_crl = \"{}\"", m.join("crl.pem").display());
    let env = Env::with_extra_group(&format!(
        "{}\n{}",
        group("mfr", "root.pem", &crl),
        group("mfr-line2", "int.pem", "")
    ));
    let root = env.init();
    let d = env.serve();
    let url = d.url.clone();
    let (ma, mak, mb, mbk) = (
        m.join("a.pem"),
        m.join("a.key"),
        m.join("b-chain.pem"),
        m.join("b.key"),
    );
    let leaf_a = [("--manufacturer-cert", &*ma), ("--manufacturer-key", &*mak)];

    // Leaf A (under the root) enrolls with the reference client, in `mfr`.
    let (a_id, a_out) = enroll(&env, &url, "a", &leaf_a);
    assert_verifies(&a_out);
    let a = registration(&url, &root, &a_id).await;
    assert_eq!(
        (
            a["status"].as_str(),
            a["group"].as_str(),
            a["reenrollment"].as_bool()
        ),
        (Some("issued"), Some("mfr"), Some(false)),
        "{a}"
    );
    let details = &a["attestation_details"];
    assert_eq!(
        details["manufacturer_serial"],
        openssl_field(m, "a.pem", "-serial")
    );
    assert_eq!(
        details["manufacturer_subject"],
        openssl_field(m, "a.pem", "-subject")
    );
    let a_device = a["device_id"].as_str().unwrap().to_string();
    let a_serial = a["certificate_serial"].as_str().unwrap().to_string();

    // Leaf B (under the line-2 intermediate) lands in `mfr-line2`, the most
    // specific group that accepts it, though `mfr`'s root accepts it too.
    let (b_id, b_out) = enroll(
        &env,
        &url,
        "b",
        &[("--manufacturer-cert", &mb), ("--manufacturer-key", &mbk)],
    );
    assert_verifies(&b_out);
    let b = registration(&url, &root, &b_id).await;
    assert_eq!(
        (b["status"].as_str(), b["group"].as_str()),
        (Some("issued"), Some("mfr-line2")),
        "{b}"
    );
    assert_ne!(b["device_id"], a_device.as_str());

    // A again: the same device, re-provisioned and audited as such.
    let (again_id, again_out) = enroll(&env, &url, "a2", &leaf_a);
    assert_verifies(&again_out);
    let again = registration(&url, &root, &again_id).await;
    assert_eq!(again["device_id"], a_device.as_str());
    assert_eq!(again["reenrollment"], true);
    assert_eq!(again["attestation_details"], *details);
    assert_eq!(
        cert_status(&url, &root, &a_serial).await,
        ("revoked".into(), Some("superseded".into()))
    );
    let event = reprovision_event(&env, &again["id"]);
    assert_eq!(event["superseded"], json!([a_serial]));

    // Refused, with the exact code, nothing stored (a fresh nonce each).
    for (chain, signer, code) in [
        ("u.pem", "u", "manufacturer_unknown_ca"),
        ("r.pem", "r", "manufacturer_cert_revoked"),
        ("e.pem", "e", "manufacturer_cert_expired"),
        // A's chain, signed by another key.
        ("a.pem", "u", "manufacturer_proof_invalid"),
    ] {
        let n = fresh_nonce(&url).await;
        refused(&env, &url, x509_body(m, chain, signer, &n), 401, code).await;
    }

    // By hand, correctly: accepted once; the same nonce again is refused.
    let n = fresh_nonce(&url).await;
    let (status, v) = register(&url, x509_body(m, "a.pem", "a", &n)).await;
    assert_eq!((status, v["status"].as_str()), (201, Some("issued")), "{v}");
    assert_eq!(v["device_id"], a_device.as_str());
    for nonce in [n.as_str(), "made-up"] {
        let body = x509_body(m, "a.pem", "a", nonce);
        refused(&env, &url, body, 401, "nonce_invalid").await;
    }
}
