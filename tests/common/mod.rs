//! Shared fixtures for the daemon tests: a SoftHSM2 token in a temp dir
//! (found by label), config and secrets, `keyward init`, and a real
//! `keyward serve` child process on a free loopback port.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod seaweed;

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const SO_PIN: &str = "so-pin-1234";
pub const PIN: &str = "user-pin-5678";

pub fn softhsm_module() -> PathBuf {
    keyward::softhsm::module_path().expect("run scripts/test.sh, which installs SoftHSM2")
}

pub fn keyward_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keyward"))
}

pub fn repo_file(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// The shipped enrollment policy with the default group at one approver.
pub fn one_approver_enrollment() -> String {
    let shipped = repo_file("policies/enrollment.toml");
    let relaxed = shipped.replacen("approvals_required = 2", "approvals_required = 1", 1);
    assert_ne!(
        shipped, relaxed,
        "the shipped default group should require 2 approvals"
    );
    relaxed
}

/// One isolated keyward installation: token, config, secrets, policies.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub softhsm_conf: PathBuf,
    pub config: PathBuf,
    pub db: PathBuf,
    pub label: String,
}

impl Env {
    /// The shipped policies, with the `default` group relaxed to one
    /// approver (as `keyward dev` does) so tests need a single approver.
    pub fn new() -> Self {
        Self::with_policies(&repo_file("policies/ca.toml"), &one_approver_enrollment())
    }

    /// Like `new`, with an extra enrollment group appended.
    pub fn with_extra_group(group_toml: &str) -> Self {
        let enrollment = format!("{}\n{}", one_approver_enrollment(), group_toml);
        Self::with_policies(&repo_file("policies/ca.toml"), &enrollment)
    }

    pub fn with_policies(ca: &str, enrollment: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let hsm = keyward::softhsm::SoftHsm::prepare(dir.path()).unwrap();
        let label = format!(
            "kw-test-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        hsm.create_token(
            &label,
            &secrecy::SecretString::from(SO_PIN),
            &secrecy::SecretString::from(PIN),
        )
        .unwrap();
        let softhsm_conf = hsm.conf().to_path_buf();
        std::fs::write(dir.path().join("hsm.pin"), PIN).unwrap();
        std::fs::write(dir.path().join("pepper"), "test-pepper-0123456789").unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("ca.toml"), ca).unwrap();
        std::fs::write(policies.join("enrollment.toml"), enrollment).unwrap();
        std::fs::write(
            policies.join("rotation.toml"),
            repo_file("policies/rotation.toml"),
        )
        .unwrap();
        let config = dir.path().join("keyward.toml");
        let db = dir.path().join("keyward.db");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nbody_limit_bytes = 16384\n\n\
                 [store]\ntype = \"sqlite\"\npath = \"keyward.db\"\n\n\
                 [keystore]\ntype = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{label}\"\npin_file = \"hsm.pin\"\nsessions = 2\n\n\
                 [auth]\ntoken_pepper_file = \"pepper\"\n\n[log]\nlevel = \"warn\"\n",
                hsm.module().display()
            ),
        )
        .unwrap();
        Self {
            dir,
            softhsm_conf,
            config,
            db,
            label,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `keyward` with this environment's SoftHSM2 config.
    pub fn keyward(&self) -> Command {
        let mut c = Command::new(keyward_bin());
        c.env("SOFTHSM2_CONF", &self.softhsm_conf)
            .env_remove("KEYWARD_TOKEN")
            .env_remove("KEYWARD_URL")
            .env_remove("KEYWARD_CONFIG");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.keyward().args(args).output().unwrap()
    }

    /// Runs `keyward init` and returns the bootstrap admin token.
    pub fn init(&self) -> String {
        let token_file = self.path("admin.token");
        let out = self.run(&[
            "init",
            "--config",
            self.config.to_str().unwrap(),
            "--token-out",
            token_file.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(token_file)
            .unwrap()
            .trim()
            .to_string()
    }

    /// Starts `keyward serve` and waits until it listens.
    pub fn serve(&self) -> Daemon {
        self.serve_with_env(&[])
    }

    /// Like `serve`, with extra environment variables for the daemon.
    pub fn serve_with_env(&self, vars: &[(&str, &std::ffi::OsStr)]) -> Daemon {
        let mut cmd = self.keyward();
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut child = cmd
            .args(["serve", "--config", self.config.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("keyward listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => Daemon { child, url },
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "keyward serve did not start: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    /// Row counts of every table, read straight from SQLite.
    pub fn counts(&self) -> BTreeMap<String, i64> {
        let c = rusqlite::Connection::open(&self.db).unwrap();
        let mut out = BTreeMap::new();
        for t in [
            "keys",
            "cas",
            "admins",
            "registrations",
            "approvals",
            "devices",
            "certificates",
            "audit_events",
        ] {
            let n: i64 = c
                .query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))
                .unwrap();
            out.insert(t.to_string(), n);
        }
        out
    }

    /// (actor, action, outcome) of every audit event after `after_seq`.
    pub fn audit_after(&self, after_seq: i64) -> Vec<(String, String, String)> {
        let c = rusqlite::Connection::open(&self.db).unwrap();
        let mut stmt = c
            .prepare("SELECT actor, action, outcome FROM audit_events WHERE seq > ?1 ORDER BY seq")
            .unwrap();
        stmt.query_map([after_seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }
}

/// A running `keyward serve`; killed (by its own PID) when dropped.
pub struct Daemon {
    pub child: Child,
    pub url: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CSR made by the stock openssl CLI: `kind` is an `openssl req -newkey` argument
/// (`ec` with P-256 by default, `rsa:1024`, `ed25519`, ...). Returns (csr PEM, key PEM).
pub fn openssl_csr(dir: &Path, newkey: &str) -> (String, String) {
    let key = dir.join(format!("{}.key", uuid::Uuid::new_v4()));
    let csr = dir.join(format!("{}.csr", uuid::Uuid::new_v4()));
    let mut cmd = Command::new("openssl");
    cmd.args([
        "req",
        "-new",
        "-nodes",
        "-subj",
        "/CN=test-device",
        "-newkey",
        newkey,
    ]);
    if newkey == "ec" {
        cmd.args(["-pkeyopt", "ec_paramgen_curve:P-256"]);
    }
    let out = cmd
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .output()
        .expect("openssl missing");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        std::fs::read_to_string(csr).unwrap(),
        std::fs::read_to_string(key).unwrap(),
    )
}

/// The same CSR with one bit of its signature flipped: still well-formed DER.
pub fn corrupt_signature(csr_pem: &str) -> String {
    use base64::Engine;
    let b64: String = csr_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let mut der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}

/// Writes `text` to a file in `dir` and returns its path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `openssl verify -CAfile root -untrusted chain cert`; returns (success, output).
pub fn openssl_verify(root: &Path, untrusted: &Path, cert: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(root)
        .arg("-untrusted")
        .arg(untrusted)
        .arg(cert)
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

/// An HTTP client for the daemon under test.
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

pub async fn call(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut rb = client().request(method, url);
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

/// Adds an admin the way operators do: `token` (role admin) invites, the
/// invitee redeems and alone receives its token. With two or more active
/// admins of role admin, `approver` (another admin) must approve first.
pub async fn add_admin_approved(
    url: &str,
    token: &str,
    approver: Option<&str>,
    name: &str,
    role: &str,
) -> String {
    let (status, inv) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/invitations"),
        Some(token),
        Some(serde_json::json!({ "name": name, "role": role })),
    )
    .await;
    assert_eq!(status, 201, "{inv}");
    let mut approval_code = Value::Null;
    if inv["second_admin_required"] == true {
        let approver = approver.expect("a second admin must approve this invitation");
        let id = inv["id"].as_str().unwrap();
        let (status, v) = call(
            reqwest::Method::POST,
            &format!("{url}/v1/admin/requests/{id}/approve"),
            Some(approver),
            None,
        )
        .await;
        assert_eq!(status, 200, "{v}");
        approval_code = v["approval_code"].clone();
    }
    let (status, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/invitations/redeem"),
        None,
        Some(serde_json::json!({
            "invitation_code": inv["invitation_code"],
            "approval_code": approval_code,
        })),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    v["token"].as_str().unwrap().to_string()
}

/// [`add_admin_approved`] while `token` is the only admin of role admin.
pub async fn add_admin(url: &str, token: &str, name: &str, role: &str) -> String {
    add_admin_approved(url, token, None, name, role).await
}

// ---------------------------------------------------------------------------
// Limits, jobs and metrics helpers (tests/daemon_limits.rs, tests/openapi.rs).

impl Env {
    /// Believes `X-Forwarded-For` from loopback, so that one test can speak
    /// as many client addresses (`server.trusted_proxies`).
    pub fn trust_loopback_proxy(&self) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let text = text.replacen(
            "[server]\n",
            "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n",
            1,
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// Replaces the config's SQLite `[store]` section by `store` (the
    /// section's keys, e.g. `type = "postgres"` and its `url`): a TOML file
    /// holds one `[store]`, so this swaps rather than appends.
    pub fn set_store(&self, store: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let sqlite = "[store]\ntype = \"sqlite\"\npath = \"keyward.db\"\n";
        assert!(
            text.contains(sqlite),
            "the config's [store] was changed before"
        );
        let text = text.replacen(sqlite, &format!("[store]\n{}\n", store.trim_end()), 1);
        std::fs::write(&self.config, text).unwrap();
    }

    /// Appends TOML to the config file (e.g. a `[limits]` section).
    pub fn append_config(&self, toml: &str) {
        let mut text = std::fs::read_to_string(&self.config).unwrap();
        text.push('\n');
        text.push_str(toml);
        std::fs::write(&self.config, text).unwrap();
    }

    /// Every audit event after `after_seq` as (action, outcome, source, details).
    pub fn audit_details_after(
        &self,
        after_seq: i64,
    ) -> Vec<(String, String, Option<String>, Value)> {
        let c = rusqlite::Connection::open(&self.db).unwrap();
        let mut stmt = c
            .prepare(
                "SELECT action, outcome, source, details FROM audit_events WHERE seq > ?1 ORDER BY seq",
            )
            .unwrap();
        stmt.query_map([after_seq], |r| {
            let details: String = r.get(3)?;
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                serde_json::from_str(&details).unwrap_or(Value::Null),
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }
}

impl Daemon {
    /// Asks the daemon to shut down cleanly (SIGTERM to its own PID, as
    /// systemd does) and waits for it to exit; returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let out = Command::new("kill").args(["-TERM", &pid]).output().unwrap();
        assert!(out.status.success(), "kill -TERM {pid} failed");
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("keyward serve (pid {pid}) did not exit within 30 s of SIGTERM");
    }
}

/// `GET /metrics` as text.
pub async fn metrics_text(url: &str) -> String {
    client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Runs `promtool check metrics` on an exposition and panics with its output on failure.
pub fn promtool_check(metrics: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (package prometheus) missing: run scripts/test.sh");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), metrics.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// A device certificate issued through the API: key and CSR made by
/// openssl, registered, approved by `approver`, credentials fetched.
pub struct IssuedDevice {
    pub device_id: String,
    pub registration_id: String,
    pub serial: String,
    pub key: PathBuf,
    pub cert: PathBuf,
    /// Issuing CA then root.
    pub chain: PathBuf,
}

pub async fn issue_device(url: &str, approver: &str, dir: &Path, name: &str) -> IssuedDevice {
    std::fs::create_dir_all(dir).unwrap();
    let (csr, key) = openssl_csr(dir, "ec");
    let (status, sub) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(serde_json::json!({ "csr": csr, "name": name, "group": "default" })),
    )
    .await;
    assert_eq!(status, 201, "{sub}");
    let id = sub["id"].as_str().unwrap().to_string();
    let secret = sub["secret"].as_str().unwrap().to_string();
    let (status, v) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/registrations/{id}/approve"),
        Some(approver),
        Some(serde_json::json!({ "comment": "test device" })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "issued", "{v}");
    let (status, creds) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/registrations/{id}/credentials"),
        Some(&secret),
        None,
    )
    .await;
    assert_eq!(status, 200, "{creds}");
    let cert_pem = creds["certificate_pem"].as_str().unwrap();
    let (status, reg) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/registrations/{id}"),
        Some(approver),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reg}");
    IssuedDevice {
        device_id: reg["device_id"].as_str().unwrap().to_string(),
        registration_id: id,
        serial: reg["certificate_serial"].as_str().unwrap().to_string(),
        key: write(dir, "key.pem", &key),
        cert: write(dir, "cert.pem", cert_pem),
        chain: write(dir, "chain.pem", creds["chain_pem"].as_str().unwrap()),
    }
}

/// Every object on `env`'s token, as OpenSC's `pkcs11-tool --list-objects`
/// lists them.
pub fn pkcs11_objects(env: &Env) -> String {
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .arg("--module")
        .arg(softhsm_module())
        .args([
            "--token-label",
            &env.label,
            "--login",
            "--pin",
            PIN,
            "--list-objects",
        ])
        .output()
        .expect("pkcs11-tool (opensc) missing: run scripts/test.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
