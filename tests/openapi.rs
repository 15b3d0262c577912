//! The OpenAPI document against a real `keyward serve`, in both directions.
//!
//! - every routed operation is documented and every documented one routed
//!   (the route table against the document, and the server's `Allow` header);
//! - every answer the server gives in a long walk through every operation,
//!   good and bad requests alike, has a documented status, the documented
//!   content type and a body that fits the documented schema;
//! - every documented status was actually seen (except those that need a
//!   broken store, a slow HSM or a changed policy, listed with the reason);
//! - request schemas state what the server enforces: a schema-driven fuzzer
//!   sends values that break the schema (they must be refused with 4xx) and
//!   values that fit it (they must not be refused for their shape).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/schema.rs"]
mod schema;

use common::{Env, client, openssl_csr};
use schema::Doc;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Statuses no walk through a healthy daemon can produce, with the reason.
const UNREACHABLE: &[(&str, &str, u16, &str)] = &[
    (
        "*",
        "*",
        408,
        "needs a request that outlives server.request_timeout_secs",
    ),
    ("*", "*", 500, "needs a corrupt store"),
    ("*", "*", 503, "needs the store or the HSM to fail"),
    ("GET", "/readyz", 503, "needs a failing store or HSM"),
    (
        "GET",
        "/v1/registrations/{id}/credentials",
        404,
        "needs the issuing CA removed from the policy after issuance",
    ),
    (
        "POST",
        "/v1/admin/registrations/{id}/approve",
        422,
        "needs the profile to stop allowing a key type after submission",
    ),
    (
        "POST",
        "/v1/devices/{id}/renew",
        404,
        "needs mTLS (this walk speaks plain HTTP): a signed-nonce proof needs a nonce, which only an existing device gets",
    ),
    (
        "POST",
        "/v1/registrations",
        501,
        "needs a JWT or manufacturer attestation policy whose keys became unusable",
    ),
    (
        "GET",
        "/v1/devices/me/config",
        404,
        "needs an issued registration whose device is gone (devices are never deleted)",
    ),
    (
        "POST",
        "/v1/invitations/redeem",
        409,
        "needs a name taken between invitation and redemption (a race)",
    ),
    (
        "POST",
        "/v1/admin/rotations/{id}/certify-with-root-card",
        200,
        "needs a rotation waiting at key-generated for a parent CA key on a YubiKey; this daemon has no card",
    ),
    (
        "POST",
        "/v1/admin/rotations/{id}/certify-with-root-card",
        422,
        "needs a rotation held at key-generated whose parent key is not on a card: without a card the rotation job certifies in the same pass that generated the key (this call waits for that pass), so it only stays there after its certify step failed (HSM or store trouble)",
    ),
    (
        "GET",
        "/v1/admin/backups",
        404,
        "needs a daemon without [backup] (`backup_not_configured`; tests/daemon.rs sees it)",
    ),
    (
        "POST",
        "/v1/admin/backups",
        404,
        "needs a daemon without [backup] (`backup_not_configured`; tests/daemon.rs sees it)",
    ),
];

const SEMANTIC: &[&str] = &[
    // Values that fit the schema but name something that does not exist or
    // is in the wrong state: refused for what they mean, not their shape.
    "invalid_csr",
    "csr_signature_invalid",
    "csr_required",
    "unknown_group",
    "duplicate",
    "duplicate_invitation",
    "same_role",
    "duplicate_request",
    "invalid_invitation",
    "already_decided",
    "unknown_ca",
    "rotation_unsupported",
];

enum Body {
    None,
    Json(Value),
    /// Raw bytes with an optional Content-Type.
    Raw(Vec<u8>, Option<&'static str>),
}

struct Reply {
    status: u16,
    json: Value,
}

struct Api {
    url: String,
    http: reqwest::Client,
    doc: Doc,
    seen: Mutex<BTreeSet<(String, String, u16)>>,
}

/// A fresh client address for each request (the daemon trusts loopback as
/// a proxy), so per-source limits apply only where a test means them to.
fn random_source() -> String {
    let b = uuid::Uuid::new_v4().into_bytes();
    format!("10.{}.{}.{}", b[0], b[1], b[2].max(1))
}

impl Api {
    async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Body,
        source: Option<&str>,
    ) -> Reply {
        self.send_full(method, path, token, body, source, None)
            .await
            .0
    }

    /// A GET whose body is wanted as bytes (certificates, CRLs), with an
    /// optional `Accept`; checked against the document like every answer.
    async fn get_bytes(&self, path: &str, accept: Option<&str>) -> (u16, Vec<u8>) {
        let (r, bytes) = self
            .send_full("GET", path, None, Body::None, None, accept)
            .await;
        (r.status, bytes)
    }

    async fn send_full(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Body,
        source: Option<&str>,
        accept: Option<&str>,
    ) -> (Reply, Vec<u8>) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self.http.request(m, format!("{}{path}", self.url)).header(
            "x-forwarded-for",
            source.map(str::to_string).unwrap_or_else(random_source),
        );
        if let Some(a) = accept {
            rb = rb.header("accept", a);
        }
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        let shown;
        rb = match body {
            Body::None => {
                shown = String::new();
                rb
            }
            Body::Json(v) => {
                shown = v.to_string();
                rb.json(&v)
            }
            Body::Raw(bytes, ct) => {
                shown = format!("<{} raw bytes>", bytes.len());
                let rb = match ct {
                    Some(ct) => rb.header("content-type", ct),
                    None => rb,
                };
                rb.body(bytes)
            }
        };
        let resp = rb.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let ct = headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = resp.bytes().await.unwrap();
        let template = self
            .doc
            .template(method, path.split('?').next().unwrap())
            .unwrap_or_else(|| panic!("{method} {path} is not a documented operation"));
        if let Err(e) =
            self.doc
                .check_response(method, &template, status, ct.as_deref(), &headers, &bytes)
        {
            panic!(
                "{method} {path} (body {shown}) answered {status} {}: {e}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status == 429 && json["error"]["code"] == "rate_limited" {
            assert!(
                headers.contains_key("retry-after"),
                "{method} {path}: rate_limited without Retry-After"
            );
        }
        if status == 401 {
            assert_eq!(headers["www-authenticate"], "Bearer", "{method} {path}");
        }
        self.seen
            .lock()
            .unwrap()
            .insert((method.to_string(), template, status));
        (Reply { status, json }, bytes.to_vec())
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.send("GET", path, token, Body::None, None).await
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Reply {
        self.send("POST", path, token, Body::Json(body), None).await
    }

    async fn post_empty(&self, path: &str, token: Option<&str>) -> Reply {
        self.send("POST", path, token, Body::None, None).await
    }
}

fn expect(r: &Reply, status: u16, code: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.json);
    if let Some(c) = code {
        assert_eq!(r.json["error"]["code"], c, "{}", r.json);
    }
}

fn id(r: &Reply) -> String {
    r.json["id"].as_str().unwrap().to_string()
}

/// Invites and redeems an admin while `inviter` is the only admin of role
/// admin (no second approval needed); returns its token.
async fn admin_token(api: &Api, inviter: &str, name: &str, role: &str) -> String {
    let inv = api
        .post(
            "/v1/admin/invitations",
            Some(inviter),
            json!({ "name": name, "role": role }),
        )
        .await;
    expect(&inv, 201, None);
    assert_eq!(inv.json["second_admin_required"], false);
    let r = api
        .post(
            "/v1/invitations/redeem",
            None,
            json!({ "invitation_code": inv.json["invitation_code"] }),
        )
        .await;
    expect(&r, 201, None);
    r.json["token"].as_str().unwrap().to_string()
}

/// Every documented answer of `/v1/ocsp` (POST and GET).
async fn ocsp_walk(api: &Api, env: &Env) {
    let chain = client()
        .get(format!("{}/v1/ca/devices/chain", api.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let issuing = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap();
    common::write(env.dir.path(), "issuing.pem", issuing);
    let request = |extra: &[&str], out: &str| -> Vec<u8> {
        let mut args = vec!["ocsp", "-issuer", "issuing.pem", "-reqout", out];
        args.extend_from_slice(extra);
        let o = std::process::Command::new("openssl")
            .args(&args)
            .current_dir(env.dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(env.path(out)).unwrap()
    };
    let single = request(&["-no_nonce", "-serial", "0x0123456789"], "s.der");
    let multi = request(&["-serial", "0x01", "-serial", "0x02"], "m.der");
    let der = |b: &[u8]| Body::Raw(b.to_vec(), Some("application/ocsp-request"));
    let get = |b: &[u8]| {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(b);
        format!(
            "/v1/ocsp/{}",
            b64.replace('+', "%2B")
                .replace('/', "%2F")
                .replace('=', "%3D")
        )
    };
    let post =
        |body: Body, source: Option<&'static str>| api.send("POST", "/v1/ocsp", None, body, source);
    assert_eq!(post(der(&single), None).await.status, 200);
    assert_eq!(api.get(&get(&single), None).await.status, 200);
    assert_eq!(post(der(b"not der"), None).await.status, 400);
    assert_eq!(api.get("/v1/ocsp/!!!!", None).await.status, 400);
    assert_eq!(post(der(&[0x30; 5000]), None).await.status, 413);
    let long = format!("/v1/ocsp/{}", "A".repeat(20_000));
    assert_eq!(api.get(&long, None).await.status, 413);
    expect(
        &post(Body::Raw(single.clone(), Some("text/plain")), None).await,
        415,
        Some("unsupported_media_type"),
    );
    // Two fresh signatures per source (the config above), then tryLater.
    let src = Some("10.77.0.1");
    assert_eq!(post(der(&multi), src).await.status, 200);
    assert_eq!(post(der(&multi), src).await.status, 200);
    assert_eq!(post(der(&multi), src).await.status, 429);
    let again = api.send("GET", &get(&multi), None, Body::None, src).await;
    assert_eq!(again.status, 429);
}

fn big_body() -> Body {
    Body::Raw(
        format!("{{\"comment\": \"{}\"}}", "x".repeat(20_000)).into_bytes(),
        Some("application/json"),
    )
}

#[tokio::test]
async fn every_route_is_documented_and_every_answer_fits_the_document() {
    let env = Env::with_extra_group(
        "[[group]]\nname = \"auto\"\nprofile = \"device\"\napproval = \"auto\"\nopen_enrollment = true\n\n\
         [[group]]\nname = \"two\"\nprofile = \"device\"\napprovals_required = 2\n\n\
         [[group]]\nname = \"capped\"\nprofile = \"device\"\napprovals_required = 1\nmax_pending = 1\n\n\
         [[group]]\nname = \"boot\"\nprofile = \"device\"\nattestation = { method = \"bootstrap-token\" }\napprovals_required = 1\n\n\
         [[group]]\nname = \"srv\"\nprofile = \"device\"\napproval = \"auto\"\nopen_enrollment = true\nkey_source = \"server\"\n",
    );
    env.trust_loopback_proxy();
    // Backups: two age recipients (the verification identity and an
    // officer's) made by the stock tools, and a directory location.
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(env.path("backup-identity.txt"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("age-keygen")
        .arg("-y")
        .arg(env.path("backup-identity.txt"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut recipients = out.stdout;
    // An officer's offline key: the CA keys' wrapping key is never sealed
    // to the verification identity alone.
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(env.path("officer-identity.txt"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = Command::new("age-keygen")
        .arg("-y")
        .arg(env.path("officer-identity.txt"))
        .output()
        .unwrap();
    recipients.extend_from_slice(&out.stdout);
    std::fs::write(env.path("backup-recipients.txt"), recipients).unwrap();
    env.append_config(
        "[backup]\ndir = \"backups\"\nrecipients_files = [\"backup-recipients.txt\"]\n\
         verify_identity_file = \"backup-identity.txt\"\n\n\
         [[backup.locations]]\nname = \"nas\"\ntype = \"dir\"\npath = \"nas\"\n",
    );
    env.append_config(
        "[limits]\nregistrations_per_source = 5\nregistrations_window_secs = 3000000\n\
         admin_login_failures_per_source = 2\nadmin_login_failures_window_secs = 3000000\n\
         renewals_per_source = 3\nrenewals_window_secs = 3000000\n\
         ocsp_fresh_per_source = 2\nocsp_fresh_window_secs = 3000000\n",
    );
    let bootstrap = env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();

    // The served document is the committed one.
    let served: Value = client()
        .get(format!("{url}/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let committed: Value =
        serde_json::from_str(&common::repo_file("src/http/openapi.json")).unwrap();
    assert_eq!(served, committed);
    assert_eq!(served["openapi"], "3.1.0");
    let api = Api {
        url: url.clone(),
        http: client(),
        doc: Doc::new(served),
        seen: Mutex::new(BTreeSet::new()),
    };
    let b = Some(bootstrap.as_str());
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let reg = |name: &str, group: &str| json!({ "csr": csr, "name": name, "group": group });
    let nobody = uuid::Uuid::new_v4();

    // ---- Public endpoints.
    for p in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/openapi.json",
        "/v1/ca/root/chain",
    ] {
        expect(&api.get(p, None).await, 200, None);
    }
    expect(
        &api.get("/v1/ca/nope/chain", None).await,
        404,
        Some("unknown_ca"),
    );
    // CRLs (DER, and PEM by Accept) and CA certificates.
    for p in [
        "/v1/ca/root/crl",
        "/v1/ca/devices/crl",
        "/v1/ca/devices/certificate",
    ] {
        expect(&api.get(p, None).await, 200, None);
    }
    let pem = api
        .http
        .get(format!("{url}/v1/ca/devices/crl"))
        .header("accept", "application/x-pem-file")
        .send()
        .await
        .unwrap();
    let ct = pem.headers()["content-type"].to_str().unwrap().to_string();
    let headers = pem.headers().clone();
    let bytes = pem.bytes().await.unwrap();
    api.doc
        .check_response("GET", "/v1/ca/{name}/crl", 200, Some(&ct), &headers, &bytes)
        .unwrap();
    assert_eq!(ct, "application/x-pem-file");
    for p in ["/v1/ca/nope/crl", "/v1/ca/nope/certificate"] {
        expect(&api.get(p, None).await, 404, Some("unknown_ca"));
    }

    // ---- OCSP: binary bodies, codes in Keyward-Error-Code.
    ocsp_walk(&api, &env).await;

    // ---- Admins: three more while bootstrap is the only admin of role admin.
    let alice = admin_token(&api, &bootstrap, "alice", "approver").await;
    let audrey = admin_token(&api, &bootstrap, "audrey", "auditor").await;
    let zed = admin_token(&api, &bootstrap, "zed", "approver").await;
    let (alice, audrey) = (Some(alice.as_str()), Some(audrey.as_str()));
    drop(zed);

    // ---- Submissions.
    let p1 = api.post("/v1/registrations", None, reg("p-1", "two")).await;
    expect(&p1, 201, None);
    let p2 = api
        .post("/v1/registrations", None, reg("p-2", "default"))
        .await;
    let p3 = api.post("/v1/registrations", None, reg("p-3", "two")).await;
    let auto = api
        .post("/v1/registrations", None, reg("a-1", "auto"))
        .await;
    expect(&auto, 201, None);
    assert_eq!(auto.json["status"], "issued");
    let mine = api
        .post("/v1/registrations", b, reg("by-admin", "two"))
        .await;
    expect(&mine, 201, None);
    let (p1_id, p2_id, p3_id, auto_id, mine_id) = (id(&p1), id(&p2), id(&p3), id(&auto), id(&mine));
    let p1_secret = p1.json["secret"].as_str().unwrap().to_string();
    let auto_secret = auto.json["secret"].as_str().unwrap().to_string();
    let raw = |bytes: &str, ct: Option<&'static str>| Body::Raw(bytes.as_bytes().to_vec(), ct);
    let r = api
        .send(
            "POST",
            "/v1/registrations",
            None,
            raw("{", Some("application/json")),
            None,
        )
        .await;
    expect(&r, 400, Some("invalid_json"));
    let r = api
        .send("POST", "/v1/registrations", None, raw("{}", None), None)
        .await;
    expect(&r, 415, Some("unsupported_media_type"));
    let r = api
        .send("POST", "/v1/registrations", None, big_body(), None)
        .await;
    expect(&r, 413, Some("payload_too_large"));
    let r = api
        .post("/v1/registrations", None, json!({ "csr": csr }))
        .await;
    // (`name` missing; `csr` became optional with server-generated keys)
    expect(&r, 422, Some("invalid_json"));
    let r = api
        .post(
            "/v1/registrations",
            None,
            json!({ "csr": common::corrupt_signature(&csr), "name": "x" }),
        )
        .await;
    expect(&r, 422, Some("csr_signature_invalid"));
    let r = api
        .post("/v1/registrations", Some("kwa_wrong"), reg("x", "default"))
        .await;
    expect(&r, 401, Some("unauthorized"));
    expect(
        &api.post("/v1/registrations", None, reg("c-1", "capped"))
            .await,
        201,
        None,
    );
    let r = api
        .post("/v1/registrations", None, reg("c-2", "capped"))
        .await;
    expect(&r, 429, Some("pending_limit"));
    let flooder = "192.0.2.77";
    for i in 0..5 {
        let r = api
            .send(
                "POST",
                "/v1/registrations",
                None,
                Body::Json(reg(&format!("f-{i}"), "default")),
                Some(flooder),
            )
            .await;
        expect(&r, 201, None);
    }
    let r = api
        .send(
            "POST",
            "/v1/registrations",
            None,
            Body::Json(reg("f-5", "default")),
            Some(flooder),
        )
        .await;
    expect(&r, 429, Some("rate_limited"));

    // ---- Device-side reads.
    let path = format!("/v1/registrations/{p1_id}");
    expect(&api.get(&path, Some(&p1_secret)).await, 200, None);
    expect(&api.get(&path, b).await, 200, None);
    expect(&api.get(&path, None).await, 401, Some("unauthorized"));
    expect(
        &api.get(&path, Some("kwr_wrong")).await,
        401,
        Some("unauthorized"),
    );
    expect(
        &api.get("/v1/registrations/not-a-uuid", b).await,
        400,
        Some("invalid_id"),
    );
    expect(
        &api.get(&format!("/v1/registrations/{nobody}"), b).await,
        404,
        Some("not_found"),
    );
    let creds = |id: &str| format!("/v1/registrations/{id}/credentials");
    let confirm = |id: &str| format!("/v1/registrations/{id}/credentials/confirm");
    expect(
        &api.get(&creds(&p1_id), Some(&p1_secret)).await,
        409,
        Some("not_issued"),
    );
    expect(
        &api.get(&creds("x"), Some(&p1_secret)).await,
        400,
        Some("invalid_id"),
    );
    expect(&api.get(&creds(&p1_id), None).await, 401, None);
    expect(
        &api.get(&creds(&auto_id), Some(&auto_secret)).await,
        200,
        None,
    );
    expect(
        &api.post_empty(&confirm(&p1_id), Some(&p1_secret)).await,
        409,
        Some("not_issued"),
    );
    expect(
        &api.post_empty(&confirm("x"), Some(&p1_secret)).await,
        400,
        Some("invalid_id"),
    );
    expect(&api.post_empty(&confirm(&p1_id), None).await, 401, None);
    expect(
        &api.post_empty(&confirm(&auto_id), Some(&auto_secret)).await,
        204,
        None,
    );
    expect(
        &api.post_empty(&confirm(&auto_id), Some(&auto_secret)).await,
        409,
        Some("already_confirmed"),
    );
    expect(
        &api.get(&creds(&auto_id), Some(&auto_secret)).await,
        410,
        Some("credentials_already_delivered"),
    );

    // ---- The registration queue.
    let list = "/v1/admin/registrations";
    expect(
        &api.get(&format!("{list}?status=pending&limit=2"), audrey)
            .await,
        200,
        None,
    );
    for bad in [
        "status=bogus",
        "limit=0",
        "limit=x",
        "cursor=nope",
        "order=sideways",
        "unknown=1",
    ] {
        expect(
            &api.get(&format!("{list}?{bad}"), b).await,
            400,
            Some("invalid_query"),
        );
    }
    expect(
        &api.get(&format!("{list}/{p1_id}"), audrey).await,
        200,
        None,
    );
    expect(
        &api.get(&format!("{list}/x"), b).await,
        400,
        Some("invalid_id"),
    );
    expect(
        &api.get(&format!("{list}/{nobody}"), b).await,
        404,
        Some("not_found"),
    );
    let approve = |id: &str| format!("{list}/{id}/approve");
    let deny = |id: &str| format!("{list}/{id}/deny");
    let r = api
        .post(
            &approve(&p1_id),
            alice,
            json!({ "comment": "serial matches" }),
        )
        .await;
    expect(&r, 200, None);
    assert_eq!(
        (r.json["approvals"].as_u64(), r.json["status"].as_str()),
        (Some(1), Some("pending"))
    );
    expect(
        &api.post_empty(&approve(&p1_id), alice).await,
        409,
        Some("already_decided"),
    );
    expect(
        &api.post_empty(&approve(&p1_id), audrey).await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post_empty(&approve(&mine_id), b).await,
        403,
        Some("self_approval"),
    );
    expect(
        &api.post_empty(&approve(&nobody.to_string()), b).await,
        404,
        Some("not_found"),
    );
    expect(
        &api.post_empty(&approve("x"), b).await,
        400,
        Some("invalid_id"),
    );
    let r = api
        .send("POST", &approve(&p3_id), b, raw("{", None), None)
        .await;
    expect(&r, 400, Some("invalid_json"));
    let r = api
        .post(&approve(&p3_id), b, json!({ "comment": "a\u{202E}b" }))
        .await;
    expect(&r, 400, Some("invalid_field"));
    expect(
        &api.send("POST", &approve(&p3_id), b, big_body(), None)
            .await,
        413,
        Some("payload_too_large"),
    );
    expect(&api.post_empty(&deny(&p2_id), b).await, 200, None);
    expect(
        &api.post_empty(&deny(&p2_id), b).await,
        409,
        Some("not_pending"),
    );
    expect(
        &api.post_empty(&approve(&p2_id), alice).await,
        409,
        Some("not_pending"),
    );
    expect(
        &api.post_empty(&deny(&p3_id), audrey).await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post_empty(&deny(&nobody.to_string()), b).await,
        404,
        None,
    );
    expect(&api.post_empty(&deny("x"), b).await, 400, None);
    expect(
        &api.send("POST", &deny(&p3_id), b, big_body(), None).await,
        413,
        None,
    );

    // ---- Issue-8 enrollment: tokens, attestation, server keys, device config, reload.
    let p2_secret = p2.json["secret"].as_str().unwrap().to_string();
    enrollment_walk(
        &api,
        &env,
        b,
        alice,
        audrey,
        &csr,
        nobody,
        (&p1_id, &p1_secret),
        (&p2_id, &p2_secret),
    )
    .await;

    // ---- The roster, while bootstrap is the only admin of role admin.
    let admins = "/v1/admin/admins";
    expect(&api.get(&format!("{admins}?limit=1"), b).await, 200, None);
    expect(&api.get(admins, alice).await, 403, Some("forbidden_role"));
    expect(
        &api.get(&format!("{admins}?limit=0"), b).await,
        400,
        Some("invalid_query"),
    );
    let role = |who: &str| format!("{admins}/{who}/role");
    let r = api
        .post(&role("zed"), b, json!({ "role": "auditor" }))
        .await;
    expect(&r, 200, None);
    assert_eq!(r.json["result"], "applied");
    expect(
        &api.post(&role("zed"), b, json!({ "role": "auditor" }))
            .await,
        409,
        Some("same_role"),
    );
    expect(
        &api.post(&role("zed"), b, json!({ "role": "root" })).await,
        400,
        Some("invalid_field"),
    );
    expect(
        &api.post(&role("bootstrap"), b, json!({ "role": "auditor" }))
            .await,
        403,
        Some("self_action"),
    );
    expect(
        &api.post(&role("zed"), alice, json!({ "role": "auditor" }))
            .await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post(&role("nobody"), b, json!({ "role": "auditor" }))
            .await,
        404,
        Some("not_found"),
    );
    expect(
        &api.send(
            "POST",
            &role("zed"),
            b,
            raw("{\"role\":\"admin\"}", None),
            None,
        )
        .await,
        415,
        None,
    );
    expect(
        &api.send(
            "POST",
            &role("zed"),
            b,
            raw("{", Some("application/json")),
            None,
        )
        .await,
        400,
        None,
    );
    expect(
        &api.send("POST", &role("zed"), b, big_body(), None).await,
        413,
        None,
    );
    expect(
        &api.post(&role("zed"), b, json!({})).await,
        422,
        Some("invalid_json"),
    );
    // A second admin of role admin: from now on raises and invitations wait for another admin.
    let adam = admin_token(&api, &bootstrap, "adam", "admin").await;
    let adam = Some(adam.as_str());
    let r = api
        .post(&role("audrey"), b, json!({ "role": "approver" }))
        .await;
    expect(&r, 202, None);
    assert_eq!(r.json["result"], "pending");
    let raise_id = r.json["request"]["id"].as_str().unwrap().to_string();
    expect(
        &api.post(&role("audrey"), b, json!({ "role": "admin" }))
            .await,
        409,
        Some("duplicate_request"),
    );

    let inv = "/v1/admin/invitations";
    let r = api
        .post(inv, adam, json!({ "name": "eve", "role": "approver" }))
        .await;
    expect(&r, 201, None);
    assert_eq!(r.json["second_admin_required"], true);
    let (eve_req, eve_code) = (
        id(&r),
        r.json["invitation_code"].as_str().unwrap().to_string(),
    );
    expect(
        &api.post(inv, adam, json!({ "name": "eve", "role": "approver" }))
            .await,
        409,
        Some("duplicate_invitation"),
    );
    expect(
        &api.post(inv, adam, json!({ "name": "alice", "role": "approver" }))
            .await,
        409,
        Some("duplicate"),
    );
    expect(
        &api.post(
            inv,
            adam,
            json!({ "name": "bad name!", "role": "approver" }),
        )
        .await,
        400,
        Some("invalid_field"),
    );
    expect(
        &api.post(inv, adam, json!({ "name": "fred", "role": "root" }))
            .await,
        400,
        Some("invalid_field"),
    );
    expect(
        &api.post(inv, alice, json!({ "name": "fred", "role": "approver" }))
            .await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.send("POST", inv, adam, raw("{}", None), None).await,
        415,
        None,
    );
    expect(
        &api.send("POST", inv, adam, raw("{", Some("application/json")), None)
            .await,
        400,
        None,
    );
    expect(
        &api.send("POST", inv, adam, big_body(), None).await,
        413,
        None,
    );
    expect(
        &api.post(inv, adam, json!({ "name": "fred" })).await,
        422,
        None,
    );

    let reqs = "/v1/admin/requests";
    expect(
        &api.get(&format!("{reqs}?status=pending"), b).await,
        200,
        None,
    );
    expect(
        &api.get(&format!("{reqs}?status=bogus"), b).await,
        400,
        Some("invalid_query"),
    );
    expect(&api.get(reqs, alice).await, 403, Some("forbidden_role"));
    let approve_req = |id: &str| format!("{reqs}/{id}/approve");
    let deny_req = |id: &str| format!("{reqs}/{id}/deny");
    expect(
        &api.post_empty(&approve_req(&eve_req), adam).await,
        403,
        Some("self_approval"),
    );
    expect(
        &api.post_empty(&approve_req(&eve_req), alice).await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post_empty(&approve_req(&nobody.to_string()), b).await,
        404,
        None,
    );
    expect(
        &api.post_empty(&approve_req("x"), b).await,
        400,
        Some("invalid_id"),
    );
    let r = api.post_empty(&approve_req(&eve_req), b).await;
    expect(&r, 200, None);
    let eve_approval = r.json["approval_code"].as_str().unwrap().to_string();
    expect(
        &api.post_empty(&approve_req(&eve_req), b).await,
        409,
        Some("not_pending"),
    );
    expect(
        &api.post_empty(&deny_req(&raise_id), b).await,
        403,
        Some("self_approval"),
    );
    expect(
        &api.post_empty(&deny_req(&raise_id), alice).await,
        403,
        None,
    );
    expect(
        &api.post_empty(&deny_req(&nobody.to_string()), b).await,
        404,
        None,
    );
    expect(&api.post_empty(&deny_req("x"), b).await, 400, None);
    expect(&api.post_empty(&deny_req(&raise_id), adam).await, 200, None);
    expect(
        &api.post_empty(&deny_req(&raise_id), adam).await,
        409,
        Some("not_pending"),
    );

    let redeem = "/v1/invitations/redeem";
    expect(
        &api.post(redeem, None, json!({ "invitation_code": eve_code }))
            .await,
        401,
        Some("invalid_invitation"),
    );
    let r = api
        .post(
            redeem,
            None,
            json!({ "invitation_code": eve_code, "approval_code": eve_approval }),
        )
        .await;
    expect(&r, 201, None);
    expect(
        &api.post(
            redeem,
            None,
            json!({ "invitation_code": eve_code, "approval_code": eve_approval }),
        )
        .await,
        401,
        Some("invalid_invitation"),
    );
    expect(
        &api.send(
            "POST",
            redeem,
            None,
            raw("{", Some("application/json")),
            None,
        )
        .await,
        400,
        None,
    );
    expect(
        &api.send("POST", redeem, None, raw("{}", None), None).await,
        415,
        None,
    );
    expect(
        &api.send("POST", redeem, None, big_body(), None).await,
        413,
        None,
    );
    expect(&api.post(redeem, None, json!({})).await, 422, None);

    let disable = |who: &str| format!("{admins}/{who}/disable");
    expect(
        &api.post_empty(&disable("zed"), alice).await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post_empty(&disable("bootstrap"), b).await,
        403,
        Some("self_action"),
    );
    expect(
        &api.post_empty(&disable("nobody"), b).await,
        404,
        Some("not_found"),
    );
    expect(&api.post_empty(&disable("zed"), b).await, 200, None);
    expect(
        &api.post_empty(&disable("zed"), b).await,
        409,
        Some("already_disabled"),
    );

    let crl = api.post_empty("/v1/admin/cas/devices/crl", b).await;
    expect(&crl, 200, None);
    assert_eq!(crl.json["number"], 2, "{}", crl.json);
    expect(
        &api.post_empty("/v1/admin/cas/devices/crl", audrey).await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post_empty("/v1/admin/cas/nope/crl", b).await,
        404,
        Some("unknown_ca"),
    );

    let cas = api.get("/v1/admin/cas?limit=1", audrey).await;
    expect(&cas, 200, None);
    let cursor = cas.json["next_cursor"].as_str().unwrap();
    expect(
        &api.get(&format!("/v1/admin/cas?cursor={cursor}"), audrey)
            .await,
        200,
        None,
    );
    expect(
        &api.get("/v1/admin/cas?cursor=x", audrey).await,
        400,
        Some("invalid_query"),
    );

    // ---- Renewal, devices and certificates.
    let active = devices_and_certificates(&api, env.dir.path(), b, alice, audrey, nobody).await;
    auth_walk(&api, env.dir.path(), b, audrey, nobody).await;

    // ---- Every admin operation: 401 without a token, 429 from a source over
    // its failed-login limit (a good token included).
    let blocked = "198.51.100.99";
    for _ in 0..2 {
        let r = api
            .send("GET", list, Some("kwa_guess"), Body::None, Some(blocked))
            .await;
        expect(&r, 401, Some("unauthorized"));
    }
    let doc_paths: Vec<(String, String)> = api.doc.root["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(|m| (m.to_uppercase(), p.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut admin_ops = 0;
    for (method, tpl) in &doc_paths {
        let op = api.doc.operation(method, tpl);
        let admin_only = op["security"] == json!([{ "admin": [] }]);
        if !admin_only {
            continue;
        }
        admin_ops += 1;
        let concrete = tpl
            .replace("{id}", &nobody.to_string())
            .replace("{serial}", "00");
        let r = api.send(method, &concrete, None, Body::None, None).await;
        expect(&r, 401, Some("unauthorized"));
        let r = api
            .send(method, &concrete, b, Body::None, Some(blocked))
            .await;
        expect(&r, 429, Some("rate_limited"));
    }
    assert!(admin_ops >= 22, "{admin_ops}");
    // Routes that take either kind of credential refuse the blocked source's admin token too.
    let r = api.send("GET", &path, b, Body::None, Some(blocked)).await;
    expect(&r, 429, Some("rate_limited"));
    let r = api
        .send(
            "POST",
            "/v1/registrations",
            b,
            Body::Json(reg("x", "default")),
            Some(blocked),
        )
        .await;
    expect(&r, 429, Some("rate_limited"));

    // ---- Request schemas state what the server enforces.
    fuzz_request_schemas(&api, &csr, b, alice, &p1_id, &p3_id, &active).await;

    // ---- Routing in both directions, and the server's own error answers.
    routes_match_the_document(&api).await;

    // ---- Audit reports and the signed export.
    audit_walk(&api, b, audrey).await;

    // ---- Backups.
    backup_walk(&api, b, alice, audrey, nobody).await;

    // ---- Key rotations, last: rotating `devices` changes its key for
    // everything after it.
    rotation_walk(&api, b, alice, audrey, nobody).await;

    // ---- Every documented status was seen.
    let seen = api.seen.lock().unwrap().clone();
    let mut missing = Vec::new();
    for (method, tpl) in &doc_paths {
        let op = api.doc.operation(method, tpl);
        for status in op["responses"].as_object().unwrap().keys() {
            let status: u16 = status.parse().unwrap();
            let exempt = UNREACHABLE.iter().any(|(m, p, s, _)| {
                *s == status && (*m == "*" || m == method) && (*p == "*" || p == tpl)
            });
            if !exempt && !seen.contains(&(method.clone(), tpl.clone(), status)) {
                missing.push(format!("{method} {tpl} {status}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "documented but never seen: {missing:#?}"
    );
    eprintln!("{} (operation, status) pairs seen", seen.len());
}

/// A device registered in the auto-approved group with its own key (so
/// that revoking it bars no other device's key): (device id, CSR PEM, key
/// file, certificate serial).
async fn own_device(
    api: &Api,
    dir: &std::path::Path,
    name: &str,
) -> (String, String, PathBuf, String) {
    let (csr, key) = openssl_csr(dir, "ec");
    let r = api
        .post(
            "/v1/registrations",
            None,
            json!({ "csr": csr, "name": name, "group": "auto" }),
        )
        .await;
    expect(&r, 201, None);
    assert_eq!(r.json["status"], "issued", "{}", r.json);
    let key_file = common::write(dir, &format!("{name}.key"), &key);
    (
        r.json["device_id"].as_str().unwrap().to_string(),
        csr,
        key_file,
        r.json["certificate_serial"].as_str().unwrap().to_string(),
    )
}

/// The signed-nonce proof, built from the layout the document states
/// (`"keyward-renew-v1" 0x00 id 0x00 nonce SHA-256(CSR DER)`) and signed
/// by the stock openssl CLI with the device's key; base64url.
fn renewal_proof(
    dir: &std::path::Path,
    device: &str,
    nonce_b64: &str,
    csr_pem: &str,
    key: &Path,
) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let nonce = b64.decode(nonce_b64).unwrap();
    assert_eq!(nonce.len(), 32);
    let (label, csr_der) = der::pem::decode_vec(csr_pem.trim().as_bytes()).unwrap();
    assert_eq!(label, "CERTIFICATE REQUEST");
    let mut msg = b"keyward-renew-v1\0".to_vec();
    msg.extend_from_slice(device.as_bytes());
    msg.push(0);
    msg.extend_from_slice(&nonce);
    msg.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, &csr_der).as_ref());
    assert_eq!(msg.len(), 118, "the documented length");
    let msg_file = dir.join(format!("{}.msg", uuid::Uuid::new_v4()));
    let sig_file = dir.join(format!("{}.sig", uuid::Uuid::new_v4()));
    std::fs::write(&msg_file, &msg).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .arg("-out")
        .arg(&sig_file)
        .arg(&msg_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b64.encode(std::fs::read(sig_file).unwrap())
}

/// The signed-nonce token proof (`"keyward-token-v1" 0x00 id 0x00 nonce`),
/// signed by the stock openssl CLI with the device's key; base64url.
fn token_proof(dir: &std::path::Path, device: &str, nonce_b64: &str, key: &Path) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let nonce = b64.decode(nonce_b64).unwrap();
    let mut msg = b"keyward-token-v1\0".to_vec();
    msg.extend_from_slice(device.as_bytes());
    msg.push(0);
    msg.extend_from_slice(&nonce);
    assert_eq!(msg.len(), 86, "the documented length");
    let msg_file = dir.join(format!("{}.msg", uuid::Uuid::new_v4()));
    let sig_file = dir.join(format!("{}.sig", uuid::Uuid::new_v4()));
    std::fs::write(&msg_file, &msg).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .arg("-out")
        .arg(&sig_file)
        .arg(&msg_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b64.encode(std::fs::read(sig_file).unwrap())
}

/// Device access tokens: every documented status of the nonce, token,
/// JWKS and introspection routes (mTLS proofs are in tests/auth_tokens.rs).
async fn auth_walk(
    api: &Api,
    dir: &std::path::Path,
    b: Option<&str>,
    audrey: Option<&str>,
    nobody: uuid::Uuid,
) {
    let (d, _, key, _) = own_device(api, dir, "tokener").await;
    let (ds, _, key_s, _) = own_device(api, dir, "token-suspendee").await;
    let nonce = async |d: &str| {
        let r = api
            .post("/v1/auth/nonce", None, json!({ "device_id": d }))
            .await;
        expect(&r, 200, None);
        r.json["nonce"].as_str().unwrap().to_string()
    };
    let n1 = nonce(&d).await;
    let r = api
        .post("/v1/auth/nonce", None, json!({ "device": d }))
        .await;
    expect(&r, 400, Some("invalid_json"));
    let r = api
        .post("/v1/auth/nonce", None, json!({ "device_id": "x" }))
        .await;
    expect(&r, 400, Some("invalid_id"));
    let r = api
        .post("/v1/auth/nonce", None, json!({ "device_id": nobody }))
        .await;
    expect(&r, 404, Some("device_not_found"));

    // A token by the signed-nonce proof; the nonce is single use.
    let sig = token_proof(dir, &d, &n1, &key);
    let body = json!({ "device_id": d, "nonce": n1, "signature": sig });
    let r = api.post("/v1/auth/token", None, body.clone()).await;
    expect(&r, 200, None);
    assert_eq!(r.json["token_type"], "Bearer");
    let token = r.json["access_token"].as_str().unwrap().to_string();
    let r = api.post("/v1/auth/token", None, body).await;
    expect(&r, 401, Some("invalid_nonce"));
    let n2 = nonce(&d).await;
    let r = api
        .post(
            "/v1/auth/token",
            None,
            json!({ "device_id": d, "nonce": n2, "signature": sig }),
        )
        .await;
    expect(&r, 401, Some("proof_signature_invalid"));
    expect(
        &api.post_empty("/v1/auth/token", None).await,
        401,
        Some("proof_required"),
    );
    let r = api
        .post(
            "/v1/auth/token",
            None,
            json!({ "device_id": "x", "nonce": "AA", "signature": "AA" }),
        )
        .await;
    expect(&r, 400, Some("invalid_id"));
    let r = api
        .post(
            "/v1/auth/token",
            None,
            json!({ "device_id": d, "nonce": "!!", "signature": "AA" }),
        )
        .await;
    expect(&r, 400, Some("invalid_field"));
    let r = api.post("/v1/auth/token", None, json!({ "x": 1 })).await;
    expect(&r, 400, Some("invalid_json"));

    // Suspended between nonce and token: no token; no nonce either.
    let ns = nonce(&ds).await;
    let sig_s = token_proof(dir, &ds, &ns, &key_s);
    let r = api
        .post_empty(&format!("/v1/admin/devices/{ds}/suspend"), b)
        .await;
    expect(&r, 200, None);
    let r = api
        .post(
            "/v1/auth/token",
            None,
            json!({ "device_id": ds, "nonce": ns, "signature": sig_s }),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.json);
    let r = api
        .post("/v1/auth/nonce", None, json!({ "device_id": ds }))
        .await;
    expect(&r, 403, Some("device_suspended"));

    // Per source, with renewals.
    let limited = "192.0.2.77";
    for _ in 0..3 {
        let r = api
            .send(
                "POST",
                "/v1/auth/nonce",
                None,
                Body::Json(json!({ "device_id": d })),
                Some(limited),
            )
            .await;
        expect(&r, 200, None);
    }
    for path in ["/v1/auth/nonce", "/v1/auth/token"] {
        let r = api
            .send(
                "POST",
                path,
                None,
                Body::Json(json!({ "device_id": d })),
                Some(limited),
            )
            .await;
        expect(&r, 429, Some("rate_limited"));
    }

    // JWKS and introspection.
    let r = api.get("/v1/auth/jwks", None).await;
    expect(&r, 200, None);
    assert_eq!(r.json["keys"].as_array().unwrap().len(), 1);
    let r = api
        .post("/v1/auth/introspect", audrey, json!({ "token": token }))
        .await;
    expect(&r, 200, None);
    assert_eq!(r.json["active"], true, "{}", r.json);
    assert_eq!(r.json["sub"], d.as_str());
    let form = format!("token={token}&token_type_hint=access_token");
    let r = api
        .send(
            "POST",
            "/v1/auth/introspect",
            audrey,
            Body::Raw(form.into_bytes(), Some("application/x-www-form-urlencoded")),
            None,
        )
        .await;
    expect(&r, 200, None);
    assert_eq!(r.json["active"], true);
    let r = api
        .post("/v1/auth/introspect", audrey, json!({ "token": "a.b.c" }))
        .await;
    expect(&r, 200, None);
    assert_eq!(r.json, json!({ "active": false }));
    let r = api.post("/v1/auth/introspect", audrey, json!({})).await;
    expect(&r, 400, Some("invalid_json"));
    let r = api
        .post("/v1/auth/introspect", None, json!({ "token": token }))
        .await;
    expect(&r, 401, None);
    let blocked = "192.0.2.78";
    let mut last = 0;
    for _ in 0..4 {
        last = api
            .send(
                "POST",
                "/v1/auth/introspect",
                Some("kwa_wrong"),
                Body::Json(json!({ "token": token })),
                Some(blocked),
            )
            .await
            .status;
    }
    assert_eq!(last, 429);
}

/// Renewal, device and certificate routes: every documented status of each,
/// against the real daemon. Returns an active device (for the fuzzer).
async fn devices_and_certificates(
    api: &Api,
    dir: &std::path::Path,
    b: Option<&str>,
    alice: Option<&str>,
    audrey: Option<&str>,
    nobody: uuid::Uuid,
) -> String {
    let raw = |bytes: &str, ct: Option<&'static str>| Body::Raw(bytes.as_bytes().to_vec(), ct);
    let (d1, _, key1, serial1) = own_device(api, dir, "renewer").await;
    let (d2, csr2, key2, serial2) = own_device(api, dir, "suspendee").await;
    let (d3, csr3, _, serial3) = own_device(api, dir, "revokee").await;
    let (d4, csr4, key4, serial4) = own_device(api, dir, "cert-revokee").await;
    let (_, _, _, serial5) = own_device(api, dir, "holder").await;
    let nonce_path = |d: &str| format!("/v1/devices/{d}/renew/nonce");
    let renew_path = |d: &str| format!("/v1/devices/{d}/renew");
    let nonce = async |d: &str| {
        let r = api.get(&nonce_path(d), None).await;
        expect(&r, 200, None);
        assert_eq!(r.json["expires_in"], 300);
        r.json["nonce"].as_str().unwrap().to_string()
    };

    // ---- Nonces.
    nonce(&d1).await;
    expect(
        &api.get(&nonce_path("x"), None).await,
        400,
        Some("invalid_id"),
    );
    expect(
        &api.get(&nonce_path(&nobody.to_string()), None).await,
        404,
        Some("device_not_found"),
    );
    let limited = "192.0.2.88";
    for _ in 0..3 {
        let r = api
            .send("GET", &nonce_path(&d1), None, Body::None, Some(limited))
            .await;
        expect(&r, 200, None);
    }
    let r = api
        .send("GET", &nonce_path(&d1), None, Body::None, Some(limited))
        .await;
    expect(&r, 429, Some("rate_limited"));
    let r = api
        .send(
            "POST",
            &renew_path(&d1),
            None,
            Body::Json(json!({ "csr": "x" })),
            Some(limited),
        )
        .await;
    expect(&r, 429, Some("rate_limited"));

    // ---- Renewal refused: each proof, body and state problem.
    let (new_csr, _) = openssl_csr(dir, "ec");
    let renew = |d: &str, nonce: &str, sig: &str, csr: &str| {
        let path = renew_path(d);
        let body = json!({ "csr": csr, "nonce": nonce, "signature": sig });
        async move { api.post(&path, None, body).await }
    };
    let r = api
        .post(&renew_path(&d1), None, json!({ "csr": new_csr }))
        .await;
    expect(&r, 401, Some("proof_required"));
    let r = api
        .post(
            &renew_path(&d1),
            None,
            json!({ "csr": new_csr, "nonce": "AAAA" }),
        )
        .await;
    expect(&r, 400, Some("invalid_field"));
    expect(
        &renew("x", "AAAA", "AAAA", &new_csr).await,
        400,
        Some("invalid_id"),
    );
    let n = nonce(&d1).await;
    let not_pkcs10 =
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
    expect(
        &renew(&d1, &n, "AAAA", not_pkcs10).await,
        400,
        Some("invalid_csr"),
    );
    let made_up = "A".repeat(43);
    let sig = renewal_proof(dir, &d1, &made_up, &new_csr, &key1);
    expect(
        &renew(&d1, &made_up, &sig, &new_csr).await,
        403,
        Some("invalid_nonce"),
    );
    // As documented, the nonce presented with the unreadable CSR is used up.
    let sig = renewal_proof(dir, &d1, &n, &new_csr, &key1);
    expect(
        &renew(&d1, &n, &sig, &new_csr).await,
        403,
        Some("invalid_nonce"),
    );
    let n = nonce(&d1).await;
    let wrong_key = renewal_proof(dir, &d1, &n, &new_csr, &key4);
    expect(
        &renew(&d1, &n, &wrong_key, &new_csr).await,
        403,
        Some("proof_signature_invalid"),
    );
    let n = nonce(&d1).await;
    let sig = renewal_proof(dir, &d1, &n, &new_csr, &key1);
    expect(
        &renew(&d1, &n, &sig, &new_csr).await,
        409,
        Some("outside_renewal_window"),
    );
    expect(
        &renew(&d1, &n, &sig, &new_csr).await,
        403,
        Some("invalid_nonce"),
    );
    let n = nonce(&d1).await;
    let bad_csr = common::corrupt_signature(&new_csr);
    let sig = renewal_proof(dir, &d1, &n, &bad_csr, &key1);
    expect(
        &renew(&d1, &n, &sig, &bad_csr).await,
        422,
        Some("csr_signature_invalid"),
    );
    expect(
        &api.post(&renew_path(&d1), None, json!({ "csr": 5 })).await,
        422,
        Some("invalid_json"),
    );
    let r = api
        .send(
            "POST",
            &renew_path(&d1),
            None,
            raw("{", Some("application/json")),
            None,
        )
        .await;
    expect(&r, 400, Some("invalid_json"));
    let r = api
        .send("POST", &renew_path(&d1), None, raw("{}", None), None)
        .await;
    expect(&r, 415, Some("unsupported_media_type"));
    let r = api
        .send("POST", &renew_path(&d1), None, big_body(), None)
        .await;
    expect(&r, 413, Some("payload_too_large"));

    // ---- Devices: list and show.
    let devices = "/v1/admin/devices";
    let r = api
        .get(&format!("{devices}?status=active&limit=1"), audrey)
        .await;
    expect(&r, 200, None);
    let cursor = r.json["next_cursor"].as_str().unwrap().to_string();
    expect(
        &api.get(&format!("{devices}?cursor={cursor}&order=newest"), audrey)
            .await,
        200,
        None,
    );
    for bad in ["status=bogus", "cursor=nope", "limit=0", "unknown=1"] {
        expect(
            &api.get(&format!("{devices}?{bad}"), b).await,
            400,
            Some("invalid_query"),
        );
    }
    let show = |d: &str| format!("{devices}/{d}");
    expect(&api.get(&show(&d1), audrey).await, 200, None);
    expect(&api.get(&show("x"), b).await, 400, Some("invalid_id"));
    expect(
        &api.get(&show(&nobody.to_string()), b).await,
        404,
        Some("device_not_found"),
    );

    // ---- An admin's allowance, then a forced renewal that re-keys.
    let allow = |d: &str| format!("{devices}/{d}/allow-renewal");
    expect(
        &api.post_empty(&allow(&d1), audrey).await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post_empty(&allow(&d1), alice).await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post_empty(&allow("x"), b).await,
        400,
        Some("invalid_id"),
    );
    expect(
        &api.post(&allow(&d1), b, json!({ "valid_for_hours": 0 }))
            .await,
        400,
        Some("invalid_field"),
    );
    expect(
        &api.send("POST", &allow(&d1), b, raw("{", None), None).await,
        400,
        Some("invalid_json"),
    );
    expect(
        &api.post_empty(&allow(&nobody.to_string()), b).await,
        404,
        Some("device_not_found"),
    );
    expect(
        &api.send("POST", &allow(&d1), b, big_body(), None).await,
        413,
        None,
    );
    let r = api
        .post(
            &allow(&d1),
            b,
            json!({ "valid_for_hours": 2, "comment": "field swap" }),
        )
        .await;
    expect(&r, 200, None);
    assert_eq!(r.json["device_id"], d1.as_str());
    let r = api.get(&show(&d1), b).await;
    expect(&r, 200, None);
    assert!(
        r.json["renewal_allowance"]["expires_at"].is_string(),
        "{}",
        r.json
    );
    let n = nonce(&d1).await;
    let sig = renewal_proof(dir, &d1, &n, &new_csr, &key1);
    let r = renew(&d1, &n, &sig, &new_csr).await;
    expect(&r, 201, None);
    assert_eq!(
        (
            r.json["previous_serial"].as_str(),
            r.json["forced"].as_bool(),
            r.json["rekey"].as_bool()
        ),
        (Some(serial1.as_str()), Some(true), Some(true))
    );
    let renewed = r.json["serial"].as_str().unwrap().to_string();
    let r = api.get(&format!("/v1/admin/certs/{serial1}"), b).await;
    expect(&r, 200, None);
    assert_eq!(
        (r.json["status"].as_str(), r.json["superseded_by"].as_str()),
        (Some("superseded"), Some(renewed.as_str()))
    );
    let r = api.get(&show(&d1), b).await;
    assert_eq!(r.json["renewal_allowance"], Value::Null, "used up");
    assert_eq!(r.json["certificates"].as_array().unwrap().len(), 2);

    // ---- Suspend and resume.
    let suspend = |d: &str| format!("{devices}/{d}/suspend");
    let resume = |d: &str| format!("{devices}/{d}/resume");
    let early = nonce(&d2).await;
    expect(
        &api.post_empty(&suspend(&d2), audrey).await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post_empty(&suspend("x"), b).await,
        400,
        Some("invalid_id"),
    );
    expect(
        &api.post(&suspend(&d2), b, json!({ "comment": "a\u{202E}b" }))
            .await,
        400,
        Some("invalid_field"),
    );
    expect(
        &api.post_empty(&suspend(&nobody.to_string()), b).await,
        404,
        Some("device_not_found"),
    );
    expect(
        &api.send("POST", &suspend(&d2), b, big_body(), None).await,
        413,
        None,
    );
    let r = api
        .post(&suspend(&d2), b, json!({ "comment": "lost in transit" }))
        .await;
    expect(&r, 200, None);
    assert_eq!(r.json["status"], "suspended");
    assert_eq!(r.json["certificates"], json!([serial2]));
    expect(
        &api.post_empty(&suspend(&d2), b).await,
        409,
        Some("already_suspended"),
    );
    expect(
        &api.get(&nonce_path(&d2), None).await,
        409,
        Some("device_suspended"),
    );
    let sig = renewal_proof(dir, &d2, &early, &csr2, &key2);
    expect(
        &renew(&d2, &early, &sig, &csr2).await,
        409,
        Some("device_suspended"),
    );
    expect(
        &api.post_empty(&allow(&d2), b).await,
        409,
        Some("device_suspended"),
    );
    let release = |s: &str| format!("/v1/admin/certs/{s}/release-hold");
    let r = api.get(&format!("/v1/admin/certs/{serial2}"), b).await;
    assert_eq!(
        (
            r.json["on_hold"].as_bool(),
            r.json["revocation_reason_code"].as_u64()
        ),
        (Some(true), Some(6))
    );
    expect(
        &api.post_empty(&release(&serial2), b).await,
        409,
        Some("device_suspended"),
    );
    expect(
        &api.post_empty(&resume(&d1), b).await,
        409,
        Some("not_suspended"),
    );
    expect(
        &api.post_empty(&resume(&d2), alice).await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post_empty(&resume("x"), b).await,
        400,
        Some("invalid_id"),
    );
    expect(
        &api.post_empty(&resume(&nobody.to_string()), b).await,
        404,
        Some("device_not_found"),
    );
    expect(
        &api.send("POST", &resume(&d2), b, big_body(), None).await,
        413,
        None,
    );
    let r = api.post_empty(&resume(&d2), b).await;
    expect(&r, 200, None);
    assert_eq!(r.json["status"], "active");

    // ---- Revoke a device (final), in the RFC's own spelling of the reason.
    let revoke = |d: &str| format!("{devices}/{d}/revoke");
    expect(
        &api.post_empty(&revoke(&d3), audrey).await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post_empty(&revoke("x"), b).await,
        400,
        Some("invalid_id"),
    );
    expect(
        &api.post(&revoke(&d3), b, json!({ "reason": "bogus" }))
            .await,
        400,
        Some("invalid_reason"),
    );
    expect(
        &api.post(&revoke(&d3), b, json!({ "reason": "certificate-hold" }))
            .await,
        422,
        Some("reason_not_allowed"),
    );
    expect(
        &api.post_empty(&revoke(&nobody.to_string()), b).await,
        404,
        Some("device_not_found"),
    );
    expect(
        &api.send("POST", &revoke(&d3), b, big_body(), None).await,
        413,
        None,
    );
    let r = api
        .post(
            &revoke(&d3),
            b,
            json!({ "reason": "keyCompromise", "comment": "stolen" }),
        )
        .await;
    expect(&r, 200, None);
    assert_eq!(
        (r.json["status"].as_str(), r.json["certificates"].clone()),
        (Some("revoked"), json!([serial3]))
    );
    expect(
        &api.post_empty(&revoke(&d3), b).await,
        409,
        Some("device_revoked"),
    );
    let r = api.get(&format!("/v1/admin/certs/{serial3}"), b).await;
    assert_eq!(
        (
            r.json["revocation_reason"].as_str(),
            r.json["revocation_reason_code"].as_u64()
        ),
        (Some("key-compromise"), Some(1))
    );
    // Its key cannot register again.
    let r = api
        .post(
            "/v1/registrations",
            None,
            json!({ "csr": csr3, "name": "again", "group": "auto" }),
        )
        .await;
    expect(&r, 403, Some("key_revoked"));

    // ---- Certificates: list, show, revoke, hold and release.
    let certs = "/v1/admin/certs";
    let r = api
        .get(&format!("{certs}?limit=1&status=valid"), audrey)
        .await;
    expect(&r, 200, None);
    let cursor = r.json["next_cursor"].as_str().unwrap().to_string();
    expect(
        &api.get(&format!("{certs}?cursor={cursor}"), audrey).await,
        200,
        None,
    );
    let r = api
        .get(&format!("{certs}?device={d1}&order=oldest"), audrey)
        .await;
    expect(&r, 200, None);
    assert_eq!(r.json["items"][0]["serial"], serial1.as_str());
    for bad in [
        "status=bogus",
        "device=x",
        "cursor=zz",
        "limit=1001",
        "unknown=1",
    ] {
        expect(
            &api.get(&format!("{certs}?{bad}"), b).await,
            400,
            Some("invalid_query"),
        );
    }
    // What expires soon: none within 30 days of a 365-day profile; all
    // within 400 days, soonest first, page by page.
    let expiring = "/v1/admin/certs/expiring";
    let r = api.get(&format!("{expiring}?within=30d"), audrey).await;
    expect(&r, 200, None);
    assert_eq!(r.json["items"], json!([]), "{}", r.json);
    let r = api
        .get(&format!("{expiring}?within=400d&limit=1"), audrey)
        .await;
    expect(&r, 200, None);
    assert_eq!(r.json["items"][0]["renewal_due"], false, "{}", r.json);
    let cursor = r.json["next_cursor"].as_str().unwrap().to_string();
    let r = api
        .get(&format!("{expiring}?within=400d&cursor={cursor}"), audrey)
        .await;
    expect(&r, 200, None);
    assert!(!r.json["items"].as_array().unwrap().is_empty());
    for bad in ["within=30s", "within=0d", "within=30", "within=3651d"] {
        expect(
            &api.get(&format!("{expiring}?{bad}"), b).await,
            400,
            Some("invalid_within"),
        );
    }
    for bad in ["cursor=zz", "cursor=1.zz", "limit=0", "unknown=1"] {
        expect(
            &api.get(&format!("{expiring}?{bad}"), b).await,
            400,
            Some("invalid_query"),
        );
    }
    expect(
        &api.get(&format!("{certs}/{}", serial4.to_lowercase()), audrey)
            .await,
        200,
        None,
    );
    for missing in ["zz", "00"] {
        expect(
            &api.get(&format!("{certs}/{missing}"), b).await,
            404,
            Some("certificate_not_found"),
        );
    }
    let revoke_cert = |s: &str| format!("{certs}/{s}/revoke");
    let compromised = json!({ "reason": "key-compromise" });
    expect(
        &api.post(&revoke_cert(&serial4), alice, compromised.clone())
            .await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post(&revoke_cert(&serial4), b, json!({})).await,
        400,
        Some("invalid_reason"),
    );
    expect(
        &api.send("POST", &revoke_cert(&serial4), b, raw("{", None), None)
            .await,
        400,
        Some("invalid_json"),
    );
    expect(
        &api.post(&revoke_cert("00"), b, compromised.clone()).await,
        404,
        Some("certificate_not_found"),
    );
    expect(
        &api.send("POST", &revoke_cert(&serial4), b, big_body(), None)
            .await,
        413,
        None,
    );
    let early4 = nonce(&d4).await;
    let r = api
        .post(&revoke_cert(&serial4), b, compromised.clone())
        .await;
    expect(&r, 200, None);
    assert_eq!(
        (r.json["status"].as_str(), r.json["on_hold"].as_bool()),
        (Some("revoked"), Some(false))
    );
    expect(
        &api.post(&revoke_cert(&serial4), b, compromised.clone())
            .await,
        409,
        Some("certificate_not_revocable"),
    );
    // Its device is still active, but its certificate is revoked: no renewal.
    let sig = renewal_proof(dir, &d4, &early4, &csr4, &key4);
    expect(
        &renew(&d4, &early4, &sig, &csr4).await,
        403,
        Some("certificate_revoked"),
    );
    let hold = json!({ "reason": "certificate-hold", "comment": "checking" });
    let r = api.post(&revoke_cert(&serial5), b, hold.clone()).await;
    expect(&r, 200, None);
    assert_eq!(r.json["on_hold"], true);
    expect(
        &api.post(&revoke_cert(&serial5), b, hold).await,
        409,
        Some("certificate_not_revocable"),
    );
    expect(
        &api.post_empty(&release(&serial5), audrey).await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post(&release(&serial5), b, json!({ "comment": "" }))
            .await,
        400,
        Some("invalid_field"),
    );
    expect(
        &api.post_empty(&release("00"), b).await,
        404,
        Some("certificate_not_found"),
    );
    expect(
        &api.send("POST", &release(&serial5), b, big_body(), None)
            .await,
        413,
        None,
    );
    let r = api.post_empty(&release(&serial5), b).await;
    expect(&r, 200, None);
    assert_eq!(
        (r.json["status"].as_str(), r.json["on_hold"].as_bool()),
        (Some("valid"), Some(false))
    );
    expect(
        &api.post_empty(&release(&serial5), b).await,
        409,
        Some("not_on_hold"),
    );
    d1
}

/// Candidate values for string fields: tricky Unicode, whitespace, lengths
/// around the documented limits, words the enums use.
fn string_candidates() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        " ",
        "   ",
        "a",
        "Küche – Gerät 3",
        "sensor-7 (hall B)",
        "bad name!",
        "admin@example.com",
        "UPPER-lower_1.2",
        "a\u{202E}b",
        "ad\u{200B}min",
        "x\u{FEFF}",
        "tab\there",
        "line\nbreak",
        "nul\u{0}x",
        "a\u{E0041}",
        "\u{00A0}",
        "\u{3000}",
        "approver",
        "auditor",
        "admin",
        "root",
        "default",
        "auto",
        "no-such-group",
        "kwi_00000000000000000000000000000000_x",
        "kwp_x",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for n in [63usize, 64, 65, 127, 128, 129, 1024, 1025] {
        v.push("x".repeat(n));
        v.push("é".repeat(n));
    }
    v.push("😀".repeat(128));
    v.push("😀".repeat(129));
    v
}

fn non_string_candidates() -> Vec<Value> {
    vec![json!(5), json!(true), json!([]), json!({}), Value::Null]
}

/// For each JSON request body: every candidate value in every property, one
/// at a time in an otherwise valid body, plus missing and unknown
/// properties. A body the schema refuses must get 4xx; a body it accepts
/// must not be refused for its shape.
async fn fuzz_request_schemas(
    api: &Api,
    csr: &str,
    bootstrap: Option<&str>,
    alice: Option<&str>,
    p1: &str,
    p3: &str,
    device: &str,
) {
    let _ = p1;
    let targets: Vec<(&str, String, Option<&str>, Value)> = vec![
        (
            "/v1/registrations",
            "/v1/registrations".to_string(),
            None,
            json!({ "csr": csr, "name": "fuzz", "device_type": "t", "location": "l", "firmware": "1", "group": "default" }),
        ),
        (
            "/v1/admin/invitations",
            "/v1/admin/invitations".to_string(),
            bootstrap,
            json!({ "name": "fuzz-invitee", "role": "auditor" }),
        ),
        (
            "/v1/admin/admins/{id}/role",
            "/v1/admin/admins/audrey/role".to_string(),
            bootstrap,
            json!({ "role": "auditor" }),
        ),
        (
            "/v1/invitations/redeem",
            "/v1/invitations/redeem".to_string(),
            None,
            json!({ "invitation_code": "kwi_x_y", "approval_code": null }),
        ),
        (
            "/v1/admin/registrations/{id}/approve",
            format!("/v1/admin/registrations/{p3}/approve"),
            alice,
            json!({ "comment": "ok" }),
        ),
        (
            "/v1/admin/devices/{id}/allow-renewal",
            format!("/v1/admin/devices/{device}/allow-renewal"),
            bootstrap,
            json!({ "valid_for_hours": 2, "comment": "ok" }),
        ),
        // A root is never rotated: a body that fits is refused for what it
        // names (`rotation_unsupported`, or `unknown_ca` for another
        // target), so fuzzing starts no rotation.
        (
            "/v1/admin/rotations",
            "/v1/admin/rotations".to_string(),
            bootstrap,
            json!({ "purpose": "issuing-ca", "target": "root", "reason": "fuzz" }),
        ),
    ];
    let mut refused = 0;
    let mut accepted = 0;
    for (tpl, path, token, base) in targets {
        let schema = api.doc.request_schema("POST", tpl).unwrap();
        let props = schema["properties"].as_object().unwrap();
        let mut bodies: Vec<Value> = Vec::new();
        for (k, _) in props {
            for c in string_candidates()
                .into_iter()
                .map(Value::String)
                .chain(non_string_candidates())
            {
                let mut b = base.clone();
                b[k] = c;
                bodies.push(b);
            }
        }
        for req in schema["required"].as_array().unwrap() {
            let mut b = base.clone();
            b.as_object_mut().unwrap().remove(req.as_str().unwrap());
            bodies.push(b);
        }
        let mut extra = base.clone();
        extra["is_ca"] = json!(true);
        bodies.push(extra);
        for body in bodies {
            let fits = api.doc.validate(schema, &body, "request").is_ok();
            let r = api
                .send("POST", &path, token, Body::Json(body.clone()), None)
                .await;
            if fits {
                let ok = (200..300).contains(&r.status)
                    || SEMANTIC.contains(&r.json["error"]["code"].as_str().unwrap_or(""));
                assert!(
                    ok,
                    "POST {path}: a body the document accepts was refused for its shape: {body} → {} {}",
                    r.status, r.json
                );
                accepted += 1;
            } else {
                assert!(
                    r.status == 400 || r.status == 422,
                    "POST {path}: a body the document refuses got {} {}: {body}",
                    r.status,
                    r.json
                );
                refused += 1;
            }
        }
    }
    eprintln!("request fuzzing: {refused} bodies refused as the schema says, {accepted} accepted");
    assert!(
        refused > 200 && accepted > 50,
        "refused {refused}, accepted {accepted}"
    );
}

/// The route table in the source against the document, the methods each
/// path routes (the server's `Allow` header on a 405) against the
/// documented ones, and the server's answers for unknown paths and methods.
async fn routes_match_the_document(api: &Api) {
    let source = common::repo_file("src/http/routes/mod.rs");
    let mut routed: BTreeSet<String> = BTreeSet::new();
    let mut rest = source.as_str();
    while let Some(i) = rest.find(".route(") {
        rest = &rest[i + ".route(".len()..];
        let start = rest.find('"').unwrap() + 1;
        let end = start + rest[start..].find('"').unwrap();
        // axum's catch-all `{*name}` is OpenAPI's `{name}`.
        routed.insert(rest[start..end].replace("{*", "{"));
    }
    let documented: BTreeSet<String> = api.doc.root["paths"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        routed, documented,
        "routed paths and documented paths differ"
    );
    for path in &documented {
        let concrete = path
            .replace("{id}", &uuid::Uuid::new_v4().to_string())
            .replace("{name}", "root")
            .replace("{key}", &uuid::Uuid::new_v4().to_string())
            .replace("{serial}", "00");
        let resp = api
            .http
            .request(reqwest::Method::PATCH, format!("{}{concrete}", api.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 405, "PATCH {path} is routed?");
        let allow: BTreeSet<String> = resp.headers()["allow"]
            .to_str()
            .unwrap()
            .split(',')
            .map(|m| m.trim().to_lowercase())
            .filter(|m| m != "head")
            .collect();
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "method_not_allowed");
        api.doc
            .validate(
                &json!({ "$ref": "#/components/schemas/Error" }),
                &v,
                "405 body",
            )
            .unwrap();
        let documented_methods: BTreeSet<String> = api.doc.root["paths"][path]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(
            allow, documented_methods,
            "{path}: routed methods differ from documented ones"
        );
    }
    let resp = api
        .http
        .get(format!("{}/v1/no/such/route", api.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "route_not_found");
    api.doc
        .validate(
            &json!({ "$ref": "#/components/schemas/Error" }),
            &v,
            "404 body",
        )
        .unwrap();
}

/// Issue-8 enrollment: bootstrap tokens and reclaim codes, attestation
/// refusals, server-generated keys delivered once, the enrollment nonce,
/// `/v1/devices/me/config` and policy reload. `p1` is pending, `p2` denied
/// (id, secret).
#[allow(clippy::too_many_arguments)]
async fn enrollment_walk(
    api: &Api,
    env: &Env,
    b: Option<&str>,
    alice: Option<&str>,
    audrey: Option<&str>,
    csr: &str,
    nobody: uuid::Uuid,
    p1: (&str, &str),
    p2: (&str, &str),
) {
    let dir = env.dir.path();
    let regs = "/v1/registrations";
    let tokens = "/v1/admin/tokens";
    let raw = |bytes: &str, ct: Option<&'static str>| Body::Raw(bytes.as_bytes().to_vec(), ct);
    let boot = |token: &str| json!({ "method": "bootstrap-token", "token": token });

    // ---- Minting bootstrap tokens: the secret is in the 201 answer only.
    let r = api
        .post(tokens, b, json!({ "group": "boot", "ttl_seconds": 3600 }))
        .await;
    expect(&r, 201, None);
    let token = r.json["secret"].as_str().unwrap().to_string();
    assert!(token.starts_with("kwb_"), "{}", r.json);
    let token_id = id(&r);
    let r = api
        .post(
            tokens,
            b,
            json!({ "group": "boot", "device_name": "boot-named" }),
        )
        .await;
    expect(&r, 201, None);
    let (named, named_id) = (r.json["secret"].as_str().unwrap().to_string(), id(&r));
    expect(
        &api.post(tokens, alice, json!({ "group": "boot" })).await,
        403,
        Some("forbidden_role"),
    );
    for bad in [
        json!({}),
        json!({ "group": "default" }),
        json!({ "group": "boot", "uses": 0 }),
        json!({ "group": "boot", "device_id": nobody }),
        json!({ "kind": "reclaim", "device_id": nobody, "group": "boot" }),
        json!({ "kind": "bogus", "group": "boot" }),
    ] {
        let r = api.post(tokens, b, bad.clone()).await;
        expect(&r, 400, Some("invalid_token_request"));
    }
    expect(
        &api.post(tokens, b, json!({ "group": "boot", "uses": "x" }))
            .await,
        422,
        Some("invalid_json"),
    );
    expect(
        &api.send("POST", tokens, b, raw("{}", None), None).await,
        415,
        Some("unsupported_media_type"),
    );
    expect(
        &api.send("POST", tokens, b, big_body(), None).await,
        413,
        Some("payload_too_large"),
    );
    expect(
        &api.post(tokens, b, json!({ "kind": "reclaim", "device_id": nobody }))
            .await,
        404,
        Some("device_not_found"),
    );
    let r = api
        .get(&format!("{tokens}?kind=bootstrap&limit=1"), audrey)
        .await;
    expect(&r, 200, None);
    assert!(r.json["items"][0].get("secret").is_none(), "{}", r.json);
    let cursor = r.json["next_cursor"].as_str().unwrap().to_string();
    expect(
        &api.get(&format!("{tokens}?cursor={cursor}&group=boot"), audrey)
            .await,
        200,
        None,
    );
    for bad in ["kind=bogus", "device_id=x", "unknown=1"] {
        let r = api.get(&format!("{tokens}?{bad}"), b).await;
        expect(&r, 400, None);
    }

    // ---- Attestation refusals: 4xx, and nothing stored (the token still works below).
    let before = api.get("/v1/admin/registrations?limit=1000", b).await;
    let count = before.json["items"].as_array().unwrap().len();
    let cases = [
        (
            json!({ "csr": csr, "name": "boot-x", "group": "boot" }),
            401,
            "attestation_required",
        ),
        (
            json!({ "csr": csr, "name": "boot-x", "attestation": boot("kwb_wrong") }),
            401,
            "enrollment_token_invalid",
        ),
        (
            json!({ "csr": csr, "name": "boot-x", "group": "default", "attestation": boot(&token) }),
            400,
            "group_mismatch",
        ),
        (
            json!({ "csr": csr, "name": "other", "attestation": boot(&named) }),
            400,
            "device_name_mismatch",
        ),
        (
            json!({ "csr": csr, "name": "jwt-x", "attestation": { "method": "jwt", "token": "a.b.c" } }),
            401,
            "jwt_malformed",
        ),
        (
            json!({ "csr": csr, "name": "m-x", "attestation": { "method": "x509", "chain": "not pem", "nonce": "n", "signature": "AAAA" } }),
            400,
            "manufacturer_chain_malformed",
        ),
        (json!({ "name": "default-nocsr" }), 400, "csr_required"),
        (
            json!({ "csr": csr, "name": "srv-x", "group": "srv" }),
            400,
            "csr_not_expected",
        ),
        (
            json!({ "name": "srv-x", "group": "srv", "age_recipient": "age1bogus" }),
            400,
            "malformed_age_recipient",
        ),
        (
            json!({ "csr": csr, "name": "d-x", "age_recipient": "age1bogus" }),
            400,
            "age_recipient_not_expected",
        ),
    ];
    for (body, status, code) in cases {
        expect(&api.post(regs, None, body).await, status, Some(code));
    }
    // A manufacturer chain no group trusts, with a fresh nonce.
    let nonce = api.get("/v1/registrations/nonce", None).await;
    expect(&nonce, 200, None);
    let root = api.http.get(format!("{}/v1/ca/root/chain", api.url)).send();
    let root = root.await.unwrap().text().await.unwrap();
    let r = api
        .post(
            regs,
            None,
            json!({ "csr": csr, "name": "m-x", "attestation": {
                "method": "x509", "chain": root, "nonce": nonce.json["nonce"], "signature": "AAAA" } }),
        )
        .await;
    expect(&r, 401, Some("manufacturer_unknown_ca"));
    let after = api.get("/v1/admin/registrations?limit=1000", b).await;
    assert_eq!(after.json["items"].as_array().unwrap().len(), count);
    // The enrollment nonce shares the registrations' per-source limit.
    let r = api
        .send(
            "GET",
            "/v1/registrations/nonce",
            None,
            Body::None,
            Some("192.0.2.77"),
        )
        .await;
    expect(&r, 429, Some("rate_limited"));

    // ---- A bootstrap token used once; its minter cannot approve.
    let r = api
        .post(
            regs,
            None,
            json!({ "csr": csr, "name": "boot-1", "attestation": boot(&token) }),
        )
        .await;
    expect(&r, 201, None);
    let boot_reg = id(&r);
    expect(
        &api.post(
            regs,
            None,
            json!({ "csr": csr, "name": "boot-2", "attestation": boot(&token) }),
        )
        .await,
        401,
        Some("enrollment_token_invalid"),
    );
    let approve = format!("/v1/admin/registrations/{boot_reg}/approve");
    expect(
        &api.post_empty(&approve, b).await,
        403,
        Some("token_minter_cannot_approve"),
    );
    let r = api
        .get(&format!("/v1/admin/registrations/{boot_reg}"), audrey)
        .await;
    expect(&r, 200, None);
    assert_eq!(
        (
            r.json["attestation"].as_str(),
            r.json["attestation_details"]["token"].as_str(),
            r.json["key_source"].as_str()
        ),
        (
            Some("bootstrap-token"),
            Some(token_id.as_str()),
            Some("csr")
        )
    );
    assert!(r.json["token_minted_by"].is_string(), "{}", r.json);
    let r = api.post_empty(&approve, alice).await;
    expect(&r, 200, None);
    assert_eq!(r.json["status"], "issued", "{}", r.json);

    // ---- Revoking tokens.
    let revoke = |t: &str| format!("{tokens}/{t}/revoke");
    expect(
        &api.post_empty(&revoke(&named_id), alice).await,
        403,
        Some("forbidden_role"),
    );
    let r = api.post_empty(&revoke(&named_id), b).await;
    expect(&r, 200, None);
    assert!(r.json["revoked_at"].is_string(), "{}", r.json);
    expect(
        &api.post_empty(&revoke(&named_id), b).await,
        409,
        Some("already_revoked"),
    );
    expect(
        &api.post_empty(&revoke(&nobody.to_string()), b).await,
        404,
        Some("not_found"),
    );
    expect(
        &api.post_empty(&revoke("x"), b).await,
        400,
        Some("invalid_id"),
    );
    expect(
        &api.post(
            regs,
            None,
            json!({ "csr": csr, "name": "boot-named", "attestation": boot(&named) }),
        )
        .await,
        401,
        Some("enrollment_token_invalid"),
    );

    // ---- Server-generated keys: the bundle once, then only `key_delivered`.
    let identity = dir.join("device.agekey");
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&identity)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("age-keygen")
        .arg("-y")
        .arg(&identity)
        .output()
        .unwrap();
    let recipient = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let r = api
        .post(
            regs,
            None,
            json!({ "name": "srv-1", "group": "srv", "age_recipient": recipient }),
        )
        .await;
    expect(&r, 201, None);
    assert_eq!(r.json["status"], "issued", "{}", r.json);
    let (srv_id, srv_secret) = (id(&r), r.json["secret"].as_str().unwrap().to_string());
    let creds = format!("/v1/registrations/{srv_id}/credentials");
    let r = api.get(&creds, Some(&srv_secret)).await;
    expect(&r, 200, None);
    assert_eq!(r.json["key_bundle"]["format"], "age", "{}", r.json);
    let armored = common::write(
        dir,
        "bundle.age",
        r.json["key_bundle"]["data"].as_str().unwrap(),
    );
    let out = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&identity)
        .arg(&armored)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("PRIVATE KEY-----"));
    let r = api.get(&creds, Some(&srv_secret)).await;
    expect(&r, 200, None);
    assert_eq!(
        (r.json.get("key_bundle"), r.json["key_delivered"].as_bool()),
        (None, Some(true))
    );
    let r = api
        .post(regs, None, json!({ "name": "srv-2", "group": "srv" }))
        .await;
    expect(&r, 201, None);
    let creds2 = format!("/v1/registrations/{}/credentials", id(&r));
    let r = api.get(&creds2, r.json["secret"].as_str()).await;
    expect(&r, 200, None);
    assert_eq!(r.json["key_bundle"]["format"], "pkcs12", "{}", r.json);
    assert!(r.json["key_bundle"]["password"].is_string());

    // ---- Reclaim codes.
    let (dev, _, _, _) = own_device(api, dir, "reclaimable").await;
    let (new_csr, _) = openssl_csr(dir, "ec");
    let r = api
        .post(tokens, b, json!({ "kind": "reclaim", "device_id": dev }))
        .await;
    expect(&r, 201, None);
    let code = r.json["secret"].as_str().unwrap().to_string();
    assert!(code.starts_with("kwc_"), "{}", r.json);
    let reclaim = |device: &str| {
        json!({ "csr": new_csr, "name": "reclaimed",
                "attestation": { "method": "reclaim", "device_id": device, "code": code } })
    };
    expect(
        &api.post(regs, None, reclaim(&nobody.to_string())).await,
        403,
        Some("reclaim_code_wrong_device"),
    );
    expect(
        &api.post(regs, None, reclaim("x")).await,
        400,
        Some("invalid_id"),
    );
    let suspend = format!("/v1/admin/devices/{dev}/suspend");
    expect(&api.post_empty(&suspend, b).await, 200, None);
    expect(
        &api.post(regs, None, reclaim(&dev)).await,
        409,
        Some("device_not_active"),
    );
    expect(
        &api.post(tokens, b, json!({ "kind": "reclaim", "device_id": dev }))
            .await,
        409,
        Some("device_not_active"),
    );

    // ---- The device's configuration, by registration secret.
    let config = |reg: &str| format!("/v1/devices/me/config?registration={reg}");
    let r = api.get(&config(&srv_id), Some(&srv_secret)).await;
    expect(&r, 200, None);
    assert_eq!(r.json["group"], "srv");
    let r = api.get(&config(p1.0), Some(p1.1)).await;
    expect(&r, 202, None);
    assert_eq!(r.json["status"], "pending");
    expect(
        &api.get(&config(p2.0), Some(p2.1)).await,
        409,
        Some("not_issued"),
    );
    expect(
        &api.get(&config(p1.0), Some("kwr_wrong")).await,
        401,
        Some("unauthorized"),
    );
    expect(
        &api.get("/v1/devices/me/config", None).await,
        401,
        Some("unauthorized"),
    );
    expect(
        &api.get(&config("x"), Some(p1.1)).await,
        400,
        Some("invalid_id"),
    );
    expect(
        &api.get(&format!("{}&unknown=1", config(p1.0)), Some(p1.1))
            .await,
        400,
        Some("invalid_query"),
    );

    // ---- Policy reload: validated first, nothing changes when invalid.
    let reload = "/v1/admin/policies/reload";
    let r = api.post_empty(reload, b).await;
    expect(&r, 200, None);
    assert_eq!(r.json["changed"], false, "{}", r.json);
    expect(
        &api.post_empty(reload, alice).await,
        403,
        Some("forbidden_role"),
    );
    let file = env.path("policies/enrollment.toml");
    let original = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("{original}\n[[group]]\nname = \"broken\"\n")).unwrap();
    expect(
        &api.post_empty(reload, b).await,
        422,
        Some("policy_invalid"),
    );
    std::fs::write(&file, &original).unwrap();
    let r = api.post_empty(reload, b).await;
    expect(&r, 200, None);
    assert_eq!(r.json["old"], r.json["new"]);
}

/// The key id of CA `ca` in force, from `GET /v1/admin/cas`.
async fn ca_key_id(api: &Api, token: Option<&str>, ca: &str) -> String {
    let r = api.get("/v1/admin/cas", token).await;
    expect(&r, 200, None);
    r.json["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == ca)
        .unwrap_or_else(|| panic!("no CA {ca}: {}", r.json))["key_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Polls a backup started through the API until it is no longer `running`
/// and no replica is `pending` (the record is visible as soon as it is
/// committed, before its uploads).
async fn wait_for_backup(api: &Api, token: Option<&str>, id: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let r = api.get(&format!("/v1/admin/backups/{id}"), token).await;
        expect(&r, 200, None);
        let uploading = r.json["replicas"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["state"] == "pending"));
        if r.json["status"] != "running" && !uploading {
            return r.json;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "backup {id} is still running: {}",
            r.json
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Audit reports (paged, filtered, refused filters) and the export (its
/// last line is the signed checkpoint); tests/audit_export.rs checks the
/// content, here the answers against the document.
async fn audit_walk(api: &Api, b: Option<&str>, audrey: Option<&str>) {
    let list = "/v1/admin/audit";
    let r = api.get(&format!("{list}?limit=2"), b).await;
    expect(&r, 200, None);
    let next = r.json["next_cursor"].as_str().unwrap().to_string();
    let r = api
        .get(&format!("{list}?limit=2&order=newest&after={next}"), audrey)
        .await;
    expect(&r, 200, None);
    let r = api
        .get(
            &format!("{list}?since=0&until=2999-01-01T00:00:00Z&action=admin.*&order=oldest"),
            audrey,
        )
        .await;
    expect(&r, 200, None);
    assert!(!r.json["items"].as_array().unwrap().is_empty());
    for q in [
        "limit=0",
        "limit=x",
        "after=x",
        "since=x",
        "since=2&until=1",
        "action=a*",
        "order=up",
        "bogus=1",
    ] {
        expect(
            &api.get(&format!("{list}?{q}"), audrey).await,
            400,
            Some("invalid_query"),
        );
    }
    let export = "/v1/admin/audit/export";
    let (r, bytes) = api
        .send_full(
            "GET",
            &format!("{export}?since=0"),
            audrey,
            Body::None,
            None,
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8(bytes).unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "export-checkpoint");
    for q in ["since=x", "until=1&since=2", "actor=x"] {
        expect(
            &api.get(&format!("{export}?{q}"), audrey).await,
            400,
            Some("invalid_query"),
        );
    }
}

/// The backup routes on a daemon with a `[backup]` section (a daemon
/// without one answers 404 `backup_not_configured`: tests/daemon.rs).
async fn backup_walk(
    api: &Api,
    b: Option<&str>,
    alice: Option<&str>,
    audrey: Option<&str>,
    nobody: uuid::Uuid,
) {
    let list = "/v1/admin/backups";
    let one = |id: &str| format!("{list}/{id}");
    let verify = |id: &str| format!("{list}/{id}/verify");
    // Nothing yet.
    let r = api.get(list, audrey).await;
    expect(&r, 200, None);
    assert_eq!(r.json, json!([]));
    for q in ["limit=x", "include_pruned=maybe", "bogus=1"] {
        expect(
            &api.get(&format!("{list}?{q}"), audrey).await,
            400,
            Some("invalid_query"),
        );
    }
    expect(
        &api.get(&one(&nobody.to_string()), audrey).await,
        404,
        Some("backup_not_found"),
    );
    expect(
        &api.get(&one("nope"), audrey).await,
        400,
        Some("invalid_field"),
    );
    expect(
        &api.post_empty(&verify("latest"), b).await,
        404,
        Some("backup_not_found"),
    );
    expect(
        &api.post_empty(&verify(&nobody.to_string()), b).await,
        404,
        Some("backup_not_found"),
    );
    expect(
        &api.post_empty(&verify("nope"), b).await,
        400,
        Some("invalid_field"),
    );
    // Roles: making and verifying need admin; reading, any role.
    expect(
        &api.post_empty(list, alice).await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post_empty(list, audrey).await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post_empty(&verify("latest"), alice).await,
        403,
        Some("forbidden_role"),
    );
    // One backup at a time: a second start while the first runs is 409.
    // The first may finish before the second arrives; try a few times.
    let mut made: Vec<Value> = Vec::new();
    let mut conflict = false;
    for _ in 0..5 {
        let first = api.post_empty(list, b).await;
        if first.status == 409 {
            // The backup job's replica retry held the lock for a moment.
            expect(&first, 409, Some("backup_running"));
            conflict = true;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        }
        expect(&first, 202, None);
        assert_eq!(first.json["status"], "running", "{}", first.json);
        let second = api.post_empty(list, b).await;
        let mut ids = vec![id(&first)];
        if second.status == 409 {
            expect(&second, 409, Some("backup_running"));
            conflict = true;
        } else {
            expect(&second, 202, None);
            ids.push(id(&second));
        }
        for i in ids {
            // A later backup may already have pruned an earlier one.
            let done = wait_for_backup(api, audrey, &i).await;
            assert!(
                done["status"] == "done" || done["status"] == "pruned",
                "{done}"
            );
            made.push(done);
        }
        if conflict {
            break;
        }
    }
    assert!(conflict, "never saw backup_running in 5 tries");
    let newest_id = made.last().unwrap()["id"].as_str().unwrap().to_string();
    let newest_id = newest_id.as_str();
    let newest = api.get(&one(newest_id), audrey).await;
    expect(&newest, 200, None);
    let newest = newest.json;
    assert_eq!(newest["status"], "done", "{newest}");
    assert_eq!(newest["trigger"], "manual", "{newest}");
    assert_eq!(newest["replicas"][0]["location"], "nas", "{newest}");
    assert_eq!(newest["replicas"][0]["state"], "stored", "{newest}");
    // Newest first; retention (the newest of each day) pruned the older ones.
    let r = api.get(list, audrey).await;
    expect(&r, 200, None);
    assert_eq!(r.json[0]["id"], newest["id"], "{}", r.json);
    let r = api
        .get(&format!("{list}?include_pruned=true&limit=1000"), audrey)
        .await;
    expect(&r, 200, None);
    assert_eq!(r.json.as_array().unwrap().len(), made.len(), "{}", r.json);
    if made.len() > 1 {
        assert_eq!(r.json[1]["status"], "pruned", "{}", r.json);
    }
    // Verified in the spool and the location, decrypted with the identity.
    for target in [newest_id, "latest"] {
        let r = api.post_empty(&verify(target), b).await;
        expect(&r, 200, None);
        assert_eq!(r.json["backup_id"], newest["id"], "{}", r.json);
        let results = r.json["results"].as_array().unwrap();
        assert_eq!(results.len(), 2, "{}", r.json);
        for res in results {
            assert_eq!(res["ok"], true, "{}", r.json);
            assert_eq!(res["depth"], "full", "{}", r.json);
        }
    }
    let r = api.get(&one(newest_id), audrey).await;
    expect(&r, 200, None);
    assert!(
        r.json["replicas"][0]["verified_at"].is_string(),
        "{}",
        r.json
    );
}

/// Polls a rotation until it reaches `step` (`retired` while the old key
/// still has live certificates, else `destroyed`).
async fn wait_for_rotation(api: &Api, token: Option<&str>, id: &str, step: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = api.get(&format!("/v1/admin/rotations/{id}"), token).await;
        expect(&r, 200, None);
        if r.json["step"] == step {
            return r.json;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rotation never reached {step}: {}",
            r.json
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn pem_count(bytes: &[u8], label: &str) -> usize {
    String::from_utf8_lossy(bytes)
        .matches(&format!("-----BEGIN {label}-----"))
        .count()
}

/// Key rotations and the per-key CA routes. Runs last: rotating the
/// `devices` CA changes the key it issues with.
async fn rotation_walk(
    api: &Api,
    b: Option<&str>,
    alice: Option<&str>,
    audrey: Option<&str>,
    nobody: uuid::Uuid,
) {
    let raw = |bytes: &str, ct: Option<&'static str>| Body::Raw(bytes.as_bytes().to_vec(), ct);
    let old_key = ca_key_id(api, audrey, "devices").await;

    // ---- Per-key CA routes before any rotation: one key, one CRL, one certificate.
    let (status, crls) = api.get_bytes("/v1/ca/devices/crls", None).await;
    assert_eq!(status, 200);
    assert_eq!(pem_count(&crls, "X509 CRL"), 1);
    let (status, bundle) = api.get_bytes("/v1/ca/devices/bundle", None).await;
    assert_eq!(status, 200);
    assert_eq!(pem_count(&bundle, "CERTIFICATE"), 1);
    let (status, current_cert) = api.get_bytes("/v1/ca/devices/certificate", None).await;
    assert_eq!(status, 200);
    let key_crl = |ca: &str, key: &str| format!("/v1/ca/{ca}/keys/{key}/crl");
    let key_cert = |ca: &str, key: &str| format!("/v1/ca/{ca}/keys/{key}/certificate");
    let (status, der) = api.get_bytes(&key_crl("devices", &old_key), None).await;
    assert_eq!(status, 200);
    assert_eq!(der[0], 0x30, "a DER CRL");
    let (status, pem) = api
        .get_bytes(
            &key_crl("devices", &old_key),
            Some("application/x-pem-file"),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(pem_count(&pem, "X509 CRL"), 1);
    assert_eq!(pem, crls, "the only key's CRL is the whole /crls");
    let (status, cert) = api.get_bytes(&key_cert("devices", &old_key), None).await;
    assert_eq!(status, 200);
    assert_eq!(cert, current_cert);
    // The root's key is not the devices CA's.
    let root_key = ca_key_id(api, audrey, "root").await;
    let r = api.get(&key_cert("devices", &root_key), None).await;
    expect(&r, 404, Some("unknown_ca_key"));
    for path in [key_crl("devices", "x"), key_cert("devices", "x")] {
        expect(&api.get(&path, None).await, 400, Some("invalid_key_id"));
    }
    for path in [
        key_crl("devices", &nobody.to_string()),
        key_cert("devices", &nobody.to_string()),
    ] {
        expect(&api.get(&path, None).await, 404, Some("unknown_ca_key"));
    }
    for path in [
        key_crl("nope", &old_key),
        key_cert("nope", &old_key),
        "/v1/ca/nope/crls".to_string(),
        "/v1/ca/nope/bundle".to_string(),
    ] {
        expect(&api.get(&path, None).await, 404, Some("unknown_ca"));
    }

    // ---- Listing and reading rotations: none yet.
    let rotations = "/v1/admin/rotations";
    let listed = |r: &Reply| r.json.as_array().unwrap().len();
    let before = api.get(rotations, audrey).await;
    expect(&before, 200, None);
    assert_eq!(listed(&before), 0, "{}", before.json);
    expect(
        &api.get(&format!("{rotations}?open=true&limit=5"), alice)
            .await,
        200,
        None,
    );
    for q in ["limit=x", "open=maybe", "bogus=1"] {
        expect(
            &api.get(&format!("{rotations}?{q}"), audrey).await,
            400,
            Some("invalid_query"),
        );
    }
    let one = |id: &str| format!("{rotations}/{id}");
    let certify = |id: &str| format!("{rotations}/{id}/certify-with-root-card");
    expect(
        &api.get(&one("x"), audrey).await,
        400,
        Some("invalid_field"),
    );
    expect(
        &api.get(&one(&nobody.to_string()), audrey).await,
        404,
        Some("rotation_not_found"),
    );
    expect(
        &api.post_empty(&certify("x"), b).await,
        400,
        Some("invalid_field"),
    );
    expect(
        &api.post_empty(&certify(&nobody.to_string()), b).await,
        404,
        Some("rotation_not_found"),
    );
    expect(
        &api.post_empty(&certify(&nobody.to_string()), alice).await,
        403,
        Some("forbidden_role"),
    );

    // ---- Starting: the plan, then every refusal (each changes nothing).
    let start = |purpose: &str, target: &str| json!({ "purpose": purpose, "target": target });
    let r = api
        .post(
            rotations,
            b,
            json!({ "purpose": "issuing-ca", "target": "devices", "dry_run": true }),
        )
        .await;
    expect(&r, 200, None);
    assert_eq!(r.json["old_key_id"], old_key.as_str());
    assert_eq!(r.json["needs_root_card"], false);
    assert_eq!(r.json["steps"].as_array().unwrap().len(), 6, "{}", r.json);
    let r = api
        .post(
            rotations,
            b,
            json!({ "purpose": "ocsp-signing", "target": "devices", "dry_run": true }),
        )
        .await;
    expect(&r, 200, None);
    assert_eq!(
        r.json["steps"],
        json!(["activated", "retired", "destroyed"])
    );
    expect(
        &api.post(rotations, b, start("issuing-ca", "root")).await,
        422,
        Some("rotation_unsupported"),
    );
    expect(
        &api.post(
            rotations,
            b,
            json!({ "purpose": "issuing-ca", "target": "root", "dry_run": true }),
        )
        .await,
        422,
        Some("rotation_unsupported"),
    );
    expect(
        &api.post(rotations, b, start("device", "devices")).await,
        400,
        Some("invalid_field"),
    );
    expect(
        &api.post(rotations, b, start("tls-server", "devices")).await,
        400,
        Some("invalid_field"),
    );
    expect(
        &api.post(
            rotations,
            b,
            json!({ "purpose": "issuing-ca", "target": "devices", "reason": "a\u{202E}b" }),
        )
        .await,
        400,
        Some("invalid_field"),
    );
    expect(
        &api.post(rotations, b, start("issuing-ca", "nope")).await,
        404,
        Some("unknown_ca"),
    );
    expect(
        &api.post(rotations, alice, start("issuing-ca", "devices"))
            .await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post(rotations, audrey, start("issuing-ca", "devices"))
            .await,
        403,
        Some("forbidden_role"),
    );
    expect(
        &api.post(rotations, None, start("issuing-ca", "devices"))
            .await,
        401,
        Some("unauthorized"),
    );
    expect(
        &api.send(
            "POST",
            rotations,
            b,
            raw("{", Some("application/json")),
            None,
        )
        .await,
        400,
        Some("invalid_json"),
    );
    expect(
        &api.send(
            "POST",
            rotations,
            b,
            raw("{\"purpose\":\"issuing-ca\",\"target\":\"devices\"}", None),
            None,
        )
        .await,
        415,
        Some("unsupported_media_type"),
    );
    expect(
        &api.send("POST", rotations, b, big_body(), None).await,
        413,
        Some("payload_too_large"),
    );
    expect(
        &api.post(
            rotations,
            b,
            json!({ "purpose": "issuing-ca", "target": "devices", "is_ca": true }),
        )
        .await,
        422,
        Some("invalid_json"),
    );
    expect(
        &api.post(rotations, b, json!({ "purpose": "issuing-ca" }))
            .await,
        422,
        Some("invalid_json"),
    );
    let after = api.get(rotations, audrey).await;
    assert_eq!(
        listed(&after),
        0,
        "a refused start stored something: {}",
        after.json
    );
    assert_eq!(ca_key_id(api, audrey, "devices").await, old_key);

    // ---- The OCSP signer: replaced at once, nothing waits for it.
    let r = api
        .post(
            rotations,
            b,
            json!({ "purpose": "ocsp-signing", "target": "devices", "reason": "openapi walk" }),
        )
        .await;
    expect(&r, 202, None);
    assert_eq!(
        (r.json["step"].as_str(), r.json["running"].as_bool()),
        (Some("planned"), Some(true))
    );
    assert_eq!(r.json["reason"], "openapi walk");
    assert!(
        r.json["actor"].as_str().unwrap().starts_with("admin:"),
        "{}",
        r.json
    );
    let ocsp_id = id(&r);
    let done = wait_for_rotation(api, audrey, &ocsp_id, "destroyed").await;
    assert!(done["finished_at"].is_string(), "{done}");
    // Nothing to certify for an OCSP signer, nor for a finished rotation.
    expect(
        &api.post_empty(&certify(&ocsp_id), b).await,
        409,
        Some("rotation_not_waiting_for_card"),
    );
    assert_eq!(ca_key_id(api, audrey, "devices").await, old_key);

    // ---- The issuing CA's key. A second start while the first runs is a
    // conflict; the first is carried out within moments, so if it was
    // already past `activated` (no longer running) the second one was a
    // rotation of its own: wait for it too and try again. Only the first
    // old key signed device certificates: it retires and waits for them to
    // expire; a later old key signed nothing and is destroyed at once.
    let mut conflict = false;
    let mut issuing: Vec<Value> = Vec::new();
    for _ in 0..5 {
        let first = api.post(rotations, b, start("issuing-ca", "devices")).await;
        expect(&first, 202, None);
        let second = api.post(rotations, b, start("issuing-ca", "devices")).await;
        let mut started = vec![id(&first)];
        if second.status == 409 {
            expect(&second, 409, Some("rotation_running"));
            conflict = true;
        } else {
            expect(&second, 202, None);
            started.push(id(&second));
        }
        for rid in started {
            let step = if issuing.is_empty() {
                "retired"
            } else {
                "destroyed"
            };
            let done = wait_for_rotation(api, audrey, &rid, step).await;
            assert_eq!(done["attempts"], 0, "{done}");
            assert!(done["destroy_after"].is_string(), "{done}");
            assert!(done["new_serial"].is_string(), "{done}");
            issuing.push(done);
        }
        if conflict {
            break;
        }
    }
    assert!(conflict, "never saw rotation_running in 5 tries");
    eprintln!(
        "issuing-CA rotations started to see rotation_running: {}",
        issuing.len()
    );
    let last = issuing.last().unwrap();
    let new_key = last["new_key_id"].as_str().unwrap().to_string();
    assert_eq!(issuing[0]["old_key_id"], old_key.as_str());
    assert_ne!(new_key, old_key);
    assert_eq!(ca_key_id(api, audrey, "devices").await, new_key);
    // A retired rotation does not block the next one (shown by its plan),
    // and nothing is left to certify.
    let r = api
        .post(
            rotations,
            b,
            json!({ "purpose": "issuing-ca", "target": "devices", "dry_run": true }),
        )
        .await;
    expect(&r, 200, None);
    assert_eq!(r.json["old_key_id"], new_key.as_str());
    expect(
        &api.post_empty(&certify(last["id"].as_str().unwrap()), b)
            .await,
        409,
        Some("rotation_not_waiting_for_card"),
    );

    // ---- After the rotation(s): the old key still signs its CRL and is in
    // the bundle; the new key's certificate is the CA's.
    let (status, bundle) = api.get_bytes("/v1/ca/devices/bundle", None).await;
    assert_eq!(status, 200);
    assert_eq!(pem_count(&bundle, "CERTIFICATE"), 2);
    let (status, crls) = api.get_bytes("/v1/ca/devices/crls", None).await;
    assert_eq!(status, 200);
    assert_eq!(pem_count(&crls, "X509 CRL"), 2);
    let (status, old_crl) = api.get_bytes(&key_crl("devices", &old_key), None).await;
    assert_eq!(status, 200);
    assert_eq!(old_crl[0], 0x30);
    let (status, old_cert) = api.get_bytes(&key_cert("devices", &old_key), None).await;
    assert_eq!((status, &old_cert), (200, &current_cert));
    let (status, new_cert) = api.get_bytes(&key_cert("devices", &new_key), None).await;
    assert_eq!(status, 200);
    let (_, now_cert) = api.get_bytes("/v1/ca/devices/certificate", None).await;
    assert_eq!(new_cert, now_cert);
    assert_ne!(new_cert, current_cert);
    let (status, _) = api.get_bytes(&key_crl("devices", &new_key), None).await;
    assert_eq!(status, 200);

    // ---- Lists: newest first; `open` leaves out the finished OCSP rotation.
    let all = api.get(rotations, audrey).await;
    expect(&all, 200, None);
    assert_eq!(listed(&all), 1 + issuing.len());
    assert_eq!(all.json[0]["id"], last["id"]);
    let open = api.get(&format!("{rotations}?open=true"), audrey).await;
    expect(&open, 200, None);
    assert_eq!(listed(&open), 1);
    assert_eq!(open.json[0]["id"], issuing[0]["id"]);
    assert!(
        open.json
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["id"] != ocsp_id.as_str())
    );
    let limited = api.get(&format!("{rotations}?limit=1"), audrey).await;
    assert_eq!(listed(&limited), 1);
}
