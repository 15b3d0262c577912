//! Device access tokens against a real `keyward serve` over HTTPS with
//! client authentication, on a SoftHSM2 token: proofs by mTLS (the stock
//! `curl` as the device) and by a signed nonce (signed by the stock
//! `openssl`), refusals that issue nothing, the session cache measured by
//! the HSM operation counter, introspection, revocation, and a rotation of
//! the token-signing key. Tokens are verified offline by the independent
//! `jsonwebtoken` crate with the JWK Set the daemon publishes, never by
//! keyward's own code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine;
use common::{Env, openssl_csr, write};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TTL: i64 = 10;
const REUSE: i64 = 5;
const OVERLAP: i64 = 2;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

struct Daemon {
    _d: common::Daemon,
    url: String,
    root: PathBuf,
    http: reqwest::Client,
}

impl Daemon {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut rb = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None, None).await
    }

    /// `POST /v1/auth/token` by the stock curl, authenticated by the TLS
    /// client certificate alone. `None` when the handshake fails.
    fn mtls_token(&self, dev: &Device) -> Option<(u16, Value)> {
        let out = Command::new("curl")
            .args(["-s", "-X", "POST", "-w", "\n%{http_code}", "--cacert"])
            .arg(&self.root)
            .arg("--cert")
            .arg(&dev.cert)
            .arg("--key")
            .arg(&dev.key)
            .arg(format!("{}/v1/auth/token", self.url))
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        Some((
            code.trim().parse().unwrap(),
            serde_json::from_str(body).unwrap_or(Value::Null),
        ))
    }

    async fn metric(&self, name_and_labels: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no series {name_and_labels}"))
    }

    async fn hsm_signs(&self) -> f64 {
        self.metric(
            "keyward_hsm_operations_total{keystore=\"default\",operation=\"sign\",result=\"ok\"}",
        )
        .await
    }

    async fn jwks(&self) -> jsonwebtoken::jwk::JwkSet {
        let resp = self
            .http
            .get(format!("{}/v1/auth/jwks", self.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["cache-control"], "public, max-age=60");
        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
    }

    async fn introspect(&self, admin: &str, token: &str) -> Value {
        let (s, v) = self
            .post(
                "/v1/auth/introspect",
                Some(admin),
                json!({ "token": token }),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v
    }
}

struct Device {
    id: String,
    key: PathBuf,
    cert: PathBuf,
    cert_der: Vec<u8>,
}

fn root_pem(env: &Env) -> PathBuf {
    let c = rusqlite::Connection::open(&env.db).unwrap();
    let der: Vec<u8> = c
        .query_row("SELECT certificate FROM cas WHERE kind = 'root'", [], |r| {
            r.get(0)
        })
        .unwrap();
    let pem = der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, &der).unwrap();
    write(env.dir.path(), "root.pem", &pem)
}

/// A device enrolled over HTTPS: openssl key and CSR, approved by `admin`.
async fn enroll(d: &Daemon, admin: &str, dir: &Path, name: &str) -> Device {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let (csr, key) = openssl_csr(&dir, "ec");
    let (s, sub) = d
        .post(
            "/v1/registrations",
            None,
            json!({ "csr": csr, "name": name, "group": "default" }),
        )
        .await;
    assert_eq!(s, 201, "{sub}");
    let rid = sub["id"].as_str().unwrap().to_string();
    let (s, v) = d
        .post(
            &format!("/v1/admin/registrations/{rid}/approve"),
            Some(admin),
            json!({ "comment": "token test" }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, creds) = d
        .call(
            reqwest::Method::GET,
            &format!("/v1/registrations/{rid}/credentials"),
            sub["secret"].as_str(),
            None,
        )
        .await;
    assert_eq!(s, 200, "{creds}");
    let pem = creds["certificate_pem"].as_str().unwrap();
    let (_, cert_der) = der::pem::decode_vec(pem.trim().as_bytes()).unwrap();
    let (s, reg) = d
        .call(
            reqwest::Method::GET,
            &format!("/v1/admin/registrations/{rid}"),
            Some(admin),
            None,
        )
        .await;
    assert_eq!(s, 200);
    Device {
        id: reg["device_id"].as_str().unwrap().to_string(),
        key: write(&dir, "key.pem", &key),
        cert: write(&dir, "cert.pem", pem),
        cert_der,
    }
}

/// The signed-nonce proof message signed by the stock openssl CLI with `key`.
fn sign_proof(dir: &Path, device: &str, nonce_b64: &str, key: &Path) -> String {
    let mut msg = b"keyward-token-v1\0".to_vec();
    msg.extend_from_slice(device.as_bytes());
    msg.push(0);
    msg.extend_from_slice(&b64().decode(nonce_b64).unwrap());
    let id = uuid::Uuid::new_v4();
    let (m, s) = (dir.join(format!("{id}.msg")), dir.join(format!("{id}.sig")));
    std::fs::write(&m, &msg).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .arg("-out")
        .arg(&s)
        .arg(&m)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b64().encode(std::fs::read(s).unwrap())
}

async fn nonce(d: &Daemon, device: &str) -> String {
    let (s, v) = d
        .post("/v1/auth/nonce", None, json!({ "device_id": device }))
        .await;
    assert_eq!(s, 200, "{v}");
    v["nonce"].as_str().unwrap().to_string()
}

#[derive(Debug, serde::Deserialize)]
struct Claims {
    sub: String,
    iss: String,
    aud: String,
    iat: i64,
    nbf: i64,
    exp: i64,
    jti: String,
    cnf: Value,
}

/// Verifies `token` with the independent `jsonwebtoken` crate and the
/// published JWK Set: ES256, our issuer and audience, unexpired.
fn verify(jwks: &jsonwebtoken::jwk::JwkSet, token: &str) -> Result<Claims, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let kid = header.kid.ok_or("no kid")?;
    let jwk = jwks
        .find(&kid)
        .ok_or(format!("kid {kid} not in the JWKS"))?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["keyward-devices"]);
    v.set_issuer(&["keyward-test"]);
    v.leeway = 0;
    v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
    v.validate_nbf = true;
    jsonwebtoken::decode::<Claims>(token, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| format!("{:?}", e.kind()))
}

fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

fn issued_events(env: &Env) -> usize {
    env.audit_after(0)
        .iter()
        .filter(|(_, a, _)| a == "auth.token_issued")
        .count()
}

async fn start(env: &Env) -> (Daemon, String) {
    let config = std::fs::read_to_string(&env.config).unwrap();
    let config = config.replace(
        "token_pepper_file = \"pepper\"\n",
        &format!(
            "token_pepper_file = \"pepper\"\ntoken_ttl_seconds = {TTL}\ntoken_reuse_seconds = {REUSE}\n\
             token_key_overlap_seconds = {OVERLAP}\ntoken_issuer = \"keyward-test\"\n"
        ),
    );
    std::fs::write(&env.config, config).unwrap();
    env.append_config(
        "[server.tls]\nissue = true\nissuer = \"devices\"\ndns_names = [\"localhost\"]\n\
         ip_addresses = [\"127.0.0.1\"]\nclient_auth = \"optional\"\n",
    );
    let bootstrap = env.init();
    let d = env.serve();
    let root = root_pem(env);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = reqwest::Certificate::from_pem_bundle(&std::fs::read(&root).unwrap()).unwrap();
    let http = reqwest::Client::builder()
        .tls_certs_only(certs)
        .build()
        .unwrap();
    let url = d.url.clone();
    (
        Daemon {
            _d: d,
            url,
            root,
            http,
        },
        bootstrap,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_tokens_proofs_cache_introspection_revocation_and_rotation() {
    let env = Env::new();
    let (d, admin) = start(&env).await;
    let dir = env.path("devices");
    let a = enroll(&d, &admin, &dir, "alpha").await;
    let b = enroll(&d, &admin, &dir, "beta").await;

    // ---- The JWKS: one current key, from `keyward init`.
    let jwks = d.jwks().await;
    assert_eq!(jwks.keys.len(), 1);
    let first_kid = jwks.keys[0].common.key_id.clone().unwrap();

    // ---- mTLS proof: a token the independent library verifies.
    let signs0 = d.hsm_signs().await;
    let issued0 = issued_events(&env);
    let t0 = Instant::now();
    let (s, v) = d.mtls_token(&a).expect("handshake");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert!(v["expires_in"].as_i64().unwrap() <= TTL);
    let tok_a = v["access_token"].as_str().unwrap().to_string();
    let claims = verify(&jwks, &tok_a).unwrap();
    assert_eq!(claims.sub, a.id);
    assert_eq!(
        (claims.iss.as_str(), claims.aud.as_str()),
        ("keyward-test", "keyward-devices")
    );
    assert_eq!(
        claims.exp - claims.iat,
        TTL,
        "exp = iat + token_ttl_seconds"
    );
    assert_eq!(claims.nbf, claims.iat);
    assert!(!claims.jti.is_empty());
    let x5t = b64().encode(ring::digest::digest(&ring::digest::SHA256, &a.cert_der));
    assert_eq!(
        claims.cnf["x5t#S256"],
        x5t.as_str(),
        "bound to the certificate (RFC 8705)"
    );
    assert_eq!(kid(&tok_a), first_kid);
    // The TLS server key is in the HSM too: every curl connection costs
    // one handshake signature, the token another.
    assert_eq!(
        d.hsm_signs().await - signs0,
        2.0,
        "the handshake's and the token's signatures"
    );
    assert_eq!(issued_events(&env), issued0 + 1, "a new session is audited");

    // ---- A tampered token fails the same verification.
    let parts: Vec<&str> = tok_a.split('.').collect();
    let mut c: Value = serde_json::from_slice(&b64().decode(parts[1]).unwrap()).unwrap();
    c["sub"] = json!(b.id);
    let forged = format!("{}.{}.{}", parts[0], b64().encode(c.to_string()), parts[2]);
    assert_eq!(verify(&jwks, &forged).unwrap_err(), "InvalidSignature");
    let mut sig = b64().decode(parts[2]).unwrap();
    sig[10] ^= 1;
    let flipped = format!("{}.{}.{}", parts[0], parts[1], b64().encode(sig));
    assert!(verify(&jwks, &flipped).is_err());

    // ---- Within the reuse window: the cached session, no HSM, not audited.
    let (s, v) = d.mtls_token(&a).unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["access_token"], tok_a.as_str(), "the cached token");
    assert_eq!(
        d.hsm_signs().await - signs0,
        3.0,
        "only the second handshake's signature: no token signature"
    );
    assert_eq!(issued_events(&env), issued0 + 1);
    assert_eq!(
        d.metric("keyward_auth_tokens_issued_total{via=\"cached\"}")
            .await,
        1.0
    );
    assert!(
        t0.elapsed() < Duration::from_secs(REUSE as u64),
        "test too slow for the window"
    );

    // ---- Signed-nonce proof (device beta, no TLS client certificate).
    let n = nonce(&d, &b.id).await;
    let sig_b = sign_proof(&dir, &b.id, &n, &b.key);
    let body = json!({ "device_id": b.id, "nonce": n, "signature": sig_b });
    // Over the test's pooled connection: no handshake, only the token.
    let s0 = d.hsm_signs().await;
    let (s, v) = d.post("/v1/auth/token", None, body.clone()).await;
    assert_eq!(s, 200, "{v}");
    let tok_b = v["access_token"].as_str().unwrap().to_string();
    assert_eq!(verify(&jwks, &tok_b).unwrap().sub, b.id);
    assert_eq!(d.hsm_signs().await - s0, 1.0, "one HSM signature");
    let n = nonce(&d, &b.id).await;
    let sig = sign_proof(&dir, &b.id, &n, &b.key);
    let (s, v) = d
        .post(
            "/v1/auth/token",
            None,
            json!({ "device_id": b.id, "nonce": n, "signature": sig }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["access_token"], tok_b.as_str(), "the cached session");
    assert_eq!(
        d.hsm_signs().await - s0,
        1.0,
        "a cached session avoids the HSM"
    );

    // ---- Refusals issue nothing.
    let signs1 = d.hsm_signs().await;
    let issued1 = issued_events(&env);
    // Replayed nonce.
    let (s, v) = d.post("/v1/auth/token", None, body).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("invalid_nonce")),
        "{v}"
    );
    // Alpha's key signing for beta's id ("another device's certificate").
    let n = nonce(&d, &b.id).await;
    let wrong = sign_proof(&dir, &b.id, &n, &a.key);
    let (s, v) = d
        .post(
            "/v1/auth/token",
            None,
            json!({ "device_id": b.id, "nonce": n, "signature": wrong }),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("proof_signature_invalid")),
        "{v}"
    );
    // A signature over another message (the renewal domain).
    let n = nonce(&d, &b.id).await;
    let mut other = b"keyward-renew-v1\0".to_vec();
    other.extend_from_slice(b.id.as_bytes());
    let m = write(&dir, "other.msg", "");
    std::fs::write(&m, &other).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(&b.key)
        .arg(&m)
        .output()
        .unwrap();
    let (s, v) = d
        .post(
            "/v1/auth/token",
            None,
            json!({ "device_id": b.id, "nonce": n, "signature": b64().encode(out.stdout) }),
        )
        .await;
    assert_eq!(s, 401, "{v}");
    // A renewal nonce does not open a token.
    let (s, rn) = d.get(&format!("/v1/devices/{}/renew/nonce", b.id)).await;
    assert_eq!(s, 200);
    let rn = rn["nonce"].as_str().unwrap();
    let sig = sign_proof(&dir, &b.id, rn, &b.key);
    let (s, v) = d
        .post(
            "/v1/auth/token",
            None,
            json!({ "device_id": b.id, "nonce": rn, "signature": sig }),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("invalid_nonce")),
        "{v}"
    );
    // No proof at all.
    let (s, v) = d
        .call(reqwest::Method::POST, "/v1/auth/token", None, None)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("proof_required")),
        "{v}"
    );
    assert_eq!(d.hsm_signs().await, signs1, "no signature for a refusal");
    assert_eq!(issued_events(&env), issued1);
    assert!(
        env.audit_after(0)
            .iter()
            .any(|(_, a, o)| a == "auth.token_denied" && o == "failure"),
        "refusals of an identified device are audited"
    );
    assert!(
        d.metric("keyward_auth_token_denials_total{reason=\"invalid_nonce\"}")
            .await
            >= 2.0
    );

    // ---- Introspection: admin-authenticated, active, then inactive cases.
    let (s, _) = d
        .post("/v1/auth/introspect", None, json!({ "token": tok_b }))
        .await;
    assert_eq!(s, 401, "unauthenticated introspection is refused");
    let v = d.introspect(&admin, &tok_b).await;
    assert_eq!(v["active"], true, "{v}");
    assert_eq!(v["sub"], b.id.as_str());
    assert_eq!(v["token_type"], "Bearer");
    for bad in [forged.as_str(), flipped.as_str(), "x.y.z", ""] {
        assert_eq!(d.introspect(&admin, bad).await, json!({ "active": false }));
    }

    // ---- Revoking alpha: introspection inactive at once, no new token.
    let v = d.introspect(&admin, &tok_a).await;
    assert_eq!(v["active"], true, "{v}");
    let (s, v) = d
        .post(
            &format!("/v1/admin/devices/{}/revoke", a.id),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        d.introspect(&admin, &tok_a).await,
        json!({ "active": false })
    );
    let signs2 = d.hsm_signs().await;
    match d.mtls_token(&a) {
        None => {} // refused at the handshake
        Some((s, v)) => assert!(s == 401 || s == 403, "revoked device got {s}: {v}"),
    }
    let (s, v) = d
        .post("/v1/auth/nonce", None, json!({ "device_id": a.id }))
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("device_revoked")),
        "{v}"
    );
    // The server's handshake signature comes before it sees the client's
    // certificate; no token signature follows.
    assert!(
        d.hsm_signs().await - signs2 <= 1.0,
        "nothing but the handshake signed for a revoked device"
    );
    // Beta is unaffected.
    assert_eq!(d.introspect(&admin, &tok_b).await["active"], true);

    // ---- Rotation: the next key is published before it signs; tokens of
    // the old key keep verifying through the JWKS.
    let c = enroll(&d, &admin, &dir, "gamma").await;
    let (s, v) = d
        .post(
            "/v1/admin/rotations",
            Some(&admin),
            json!({ "purpose": "token-signing", "target": "tokens", "reason": "test" }),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let rid = v["id"].as_str().unwrap().to_string();
    let rotation = async |step: &str| -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, r) = d
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/admin/rotations/{rid}"),
                    Some(&admin),
                    None,
                )
                .await;
            if r["step"] == step {
                return r;
            }
            assert!(Instant::now() < deadline, "rotation stuck: {r}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let mut during = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while during.is_none() {
        let j = d.jwks().await;
        if j.keys.len() == 2 {
            during = Some(j);
        }
        assert!(Instant::now() < deadline, "the next key never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = during.unwrap();
    let kids: Vec<String> = during
        .keys
        .iter()
        .map(|k| k.common.key_id.clone().unwrap())
        .collect();
    assert!(kids.contains(&first_kid), "current key still published");
    assert_eq!(
        verify(&during, &tok_b).unwrap().sub,
        b.id,
        "old tokens verify during overlap"
    );
    let r = rotation("retired").await;
    assert!(
        r["destroy_after"].is_string() || r["destroy_after"].is_number(),
        "{r}"
    );
    // A new session is signed by the new key; the old one stays published.
    let (s, v) = d.mtls_token(&c).expect("handshake");
    assert_eq!(s, 200, "{v}");
    let tok_c = v["access_token"].as_str().unwrap().to_string();
    assert_ne!(kid(&tok_c), first_kid, "the new key signs after activation");
    let after = d.jwks().await;
    assert_eq!(
        after.keys.len(),
        2,
        "the retired key stays until its tokens expired"
    );
    assert_eq!(verify(&after, &tok_c).unwrap().sub, c.id);
    if let Ok(cl) = verify(&after, &tok_b) {
        assert_eq!(cl.sub, b.id);
    }
    let events: Vec<String> = env
        .audit_after(0)
        .into_iter()
        .map(|(_, a, _)| a)
        .filter(|a| a.starts_with("rotation."))
        .collect();
    for e in [
        "rotation.start",
        "rotation.key_generated",
        "rotation.activated",
        "rotation.retired",
    ] {
        assert!(events.iter().any(|x| x == e), "{e} missing: {events:?}");
    }

    // ---- A superseded certificate (the device renewed) gets no token;
    // the renewed one does.
    let (s, v) = d
        .post(
            &format!("/v1/admin/devices/{}/allow-renewal", c.id),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = d.mtls_token(&c).unwrap();
    assert_eq!(s, 200, "{v}");
    let tok_c = v["access_token"].as_str().unwrap().to_string();
    assert_eq!(d.introspect(&admin, &tok_c).await["active"], true);
    let (csr, new_key) = openssl_csr(&dir, "ec");
    let body = write(&dir, "renew.json", &json!({ "csr": csr }).to_string());
    let out = Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data-binary",
        ])
        .arg(format!("@{}", body.display()))
        .arg("--cacert")
        .arg(&d.root)
        .arg("--cert")
        .arg(&c.cert)
        .arg("--key")
        .arg(&c.key)
        .arg(format!("{}/v1/devices/{}/renew", d.url, c.id))
        .output()
        .unwrap();
    let renewed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pem = renewed["certificate_pem"]
        .as_str()
        .unwrap_or_else(|| panic!("{renewed}"));
    let signs3 = d.hsm_signs().await;
    let (s, v) = d
        .mtls_token(&c)
        .expect("a superseded certificate passes the handshake");
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("not_current_certificate")),
        "{v}"
    );
    assert_eq!(
        d.hsm_signs().await - signs3,
        1.0,
        "only the handshake signed"
    );
    let (_, new_der) = der::pem::decode_vec(pem.trim().as_bytes()).unwrap();
    let c2 = Device {
        id: c.id.clone(),
        key: write(&dir, "gamma2.key", &new_key),
        cert: write(&dir, "gamma2.pem", pem),
        cert_der: new_der,
    };
    let (s, v) = d.mtls_token(&c2).unwrap();
    assert_eq!(s, 200, "{v}");
    let cl = verify(&d.jwks().await, v["access_token"].as_str().unwrap()).unwrap();
    let x5t2 = b64().encode(ring::digest::digest(&ring::digest::SHA256, &c2.cert_der));
    assert_eq!(cl.cnf["x5t#S256"], x5t2.as_str());
    // Introspection follows the certificate the token is bound to: the
    // superseded one's token is no longer active, the renewed one's is.
    assert_eq!(
        d.introspect(&admin, &tok_c).await,
        json!({ "active": false }),
        "a token bound to a superseded certificate"
    );
    assert_eq!(
        d.introspect(&admin, v["access_token"].as_str().unwrap())
            .await["active"],
        true
    );

    // ---- exp is honoured: once expired, verification and introspection fail.
    let exp_b = unverified_exp(&tok_b);
    assert_eq!(
        verify(&after, &tok_b).ok().map(|c| c.exp).unwrap_or(exp_b),
        exp_b
    );
    let wait = exp_b + 1 - time::OffsetDateTime::now_utc().unix_timestamp();
    if wait > 0 {
        tokio::time::sleep(Duration::from_secs(wait as u64)).await;
    }
    assert_eq!(
        d.introspect(&admin, &tok_b).await,
        json!({ "active": false }),
        "expired token still active"
    );
    assert_eq!(verify(&after, &tok_b).unwrap_err(), "ExpiredSignature");

    // ---- The audit chain still verifies.
    let out = env
        .keyward()
        .args(["audit", "verify", "--config", env.config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `exp` of a token, read without verification (for timing only).
fn unverified_exp(token: &str) -> i64 {
    let c: Value =
        serde_json::from_slice(&b64().decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap();
    c["exp"].as_i64().unwrap()
}

/// Bad `[auth]` token settings stop `keyward config check` with the key named.
#[test]
fn bad_token_settings_are_refused_with_the_key_named() {
    for (line, key) in [
        ("token_ttl_seconds = 5", "auth.token_ttl_seconds"),
        ("token_ttl_seconds = 7200", "auth.token_ttl_seconds"),
        ("token_reuse_seconds = 900", "auth.token_reuse_seconds"),
        (
            "token_key_overlap_seconds = 0",
            "auth.token_key_overlap_seconds",
        ),
        ("token_keystore = \"nope\"", "auth.token_keystore"),
        ("token_audience = \"\"", "auth.token_audience"),
        ("token_lifetime = 5", "token_lifetime"),
    ] {
        let env = Env::new();
        let config = std::fs::read_to_string(&env.config).unwrap();
        std::fs::write(
            &env.config,
            config.replace(
                "token_pepper_file = \"pepper\"\n",
                &format!("token_pepper_file = \"pepper\"\n{line}\n"),
            ),
        )
        .unwrap();
        let out = env.run(&["config", "check", "--config", env.config.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{line} accepted");
        assert!(err.contains(key), "{line}: {err}");
    }
}
