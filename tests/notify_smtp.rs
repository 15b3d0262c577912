//! SMTP notifications against a real mail server started here: aiosmtpd
//! (PyPI; tests/fixtures/smtp_server.py) on a free 127.0.0.1 port, writing
//! every accepted message to a Maildir that the tests read back. A real
//! `keyward serve` mails a pending registration to the approvers, and while
//! the server is down it retries with backoff (counted `retried`, then
//! `failed`) without holding up the registration or its approval; once the
//! server is back a later notification arrives, and a backup whose location
//! is unreachable is mailed to the admins only. Rotation, backup and renewal
//! notifications go to the admins over STARTTLS with a private CA (made by
//! the stock `openssl`) and AUTH with a password read from a file; a wrong
//! password is refused once (no retry), the system roots do not trust the
//! private CA, implicit TLS works too, and a server that accepts but never
//! answers is cut off by the per-attempt timeout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Env, call, metrics_text, openssl_csr, promtool_check};
use keyward::clock::SystemClock;
use keyward::config::Config;
use keyward::metrics::Metrics;
use keyward::notify::{
    AttemptFailure, Envelope, Notification, Notifier, Notifiers, NotifyError, RotationOutcome,
    SmtpNotifier, SmtpSettings, SmtpTls,
};
use secrecy::SecretString;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How the test server protects its port.
enum Mode<'a> {
    Plain,
    StartTls { cert: &'a Path, key: &'a Path },
    Tls { cert: &'a Path, key: &'a Path },
}

/// One aiosmtpd process; killed by its own PID when dropped.
struct SmtpServer {
    child: Child,
    maildir: PathBuf,
    auth_log: PathBuf,
}

impl SmtpServer {
    /// Starts it on `port`; `auth` = (user, password file) makes AUTH required.
    fn start(dir: &Path, port: u16, mode: Mode<'_>, auth: Option<(&str, &Path)>) -> Self {
        let maildir = dir.join(format!("maildir-{port}"));
        let auth_log = dir.join(format!("auth-{port}.log"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smtp_server.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .args(["--port", &port.to_string()])
            .arg("--maildir")
            .arg(&maildir)
            .arg("--auth-log")
            .arg(&auth_log);
        match mode {
            Mode::Plain => {}
            Mode::StartTls { cert, key } => {
                cmd.args(["--mode", "starttls", "--cert"])
                    .arg(cert)
                    .arg("--key")
                    .arg(key);
            }
            Mode::Tls { cert, key } => {
                cmd.args(["--mode", "tls", "--cert"])
                    .arg(cert)
                    .arg("--key")
                    .arg(key);
            }
        }
        if let Some((user, password_file)) = auth {
            cmd.args(["--user", user, "--password-file"])
                .arg(password_file);
        }
        let log = dir.join(format!("aiosmtpd-{port}.log"));
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("python3 missing");
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "aiosmtpd did not start (run scripts/test.sh, which installs it): {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        SmtpServer {
            child,
            maildir,
            auth_log,
        }
    }

    /// Every message received, oldest first.
    fn mails(&self) -> Vec<Mail> {
        let Ok(entries) = std::fs::read_dir(self.maildir.join("new")) else {
            return Vec::new();
        };
        let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        files.sort_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap());
        files
            .iter()
            .map(|p| Mail::parse(&std::fs::read_to_string(p).unwrap()))
            .collect()
    }

    fn auth_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.auth_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug)]
struct Mail {
    headers: Vec<(String, String)>,
    body: String,
}

impl Mail {
    fn parse(text: &str) -> Self {
        let text = text.replace("\r\n", "\n");
        let (head, body) = text.split_once("\n\n").unwrap();
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in head.lines() {
            if line.starts_with([' ', '\t']) {
                let last = headers.last_mut().unwrap();
                last.1.push(' ');
                last.1.push_str(line.trim());
            } else {
                let (k, v) = line.split_once(':').unwrap();
                headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let qp = headers
            .iter()
            .any(|(k, v)| k == "content-transfer-encoding" && v == "quoted-printable");
        let body = if qp {
            quoted_printable(body)
        } else {
            body.to_string()
        };
        Mail { headers, body }
    }

    fn header(&self, name: &str) -> String {
        self.headers
            .iter()
            .find(|(k, _)| k == &name.to_ascii_lowercase())
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {name} header in {self:?}"))
    }

    /// The envelope recipients, as the server saw them (`X-RcptTo`).
    fn rcpt_to(&self) -> Vec<String> {
        self.header("X-RcptTo")
            .split(", ")
            .map(str::to_string)
            .collect()
    }

    /// A `name  value` row of the body.
    fn field(&self, name: &str) -> String {
        self.body
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .filter(|rest| rest.starts_with("  "))
                    .map(|rest| rest.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no {name} row in {}", self.body))
    }
}

/// RFC 2045 quoted-printable, decoded (soft line breaks and `=XX`).
fn quoted_printable(text: &str) -> String {
    let joined = text.replace("=\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&joined[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

async fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sample(metrics: &str, result: &str) -> u64 {
    let series = format!("keyward_notifications_total{{backend=\"smtp\",result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("{series} missing in {metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvers_get_pending_mail_and_a_dead_server_never_blocks_an_approval() {
    let env = Env::new();
    // Backups to an S3 location on a closed port: a real backup.replica_failed.
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(env.path("officer.txt"))
        .output()
        .unwrap();
    assert!(out.status.success(), "age-keygen (package age) missing");
    let out = Command::new("age-keygen")
        .arg("-y")
        .arg(env.path("officer.txt"))
        .output()
        .unwrap();
    std::fs::write(env.path("recipients.txt"), &out.stdout).unwrap();
    std::fs::write(env.path("s3.id"), "keyward-test").unwrap();
    std::fs::write(env.path("s3.key"), "keyward-test-secret-0123456789").unwrap();
    env.append_config(&format!(
        "[backup]\ndir = \"backups\"\nrecipients_files = [\"recipients.txt\"]\n\
         retry_min_secs = 3600\nretry_max_secs = 7200\n\n\
         [[backup.locations]]\nname = \"offsite\"\ntype = \"s3\"\nbucket = \"keyward-backups\"\n\
         endpoint = \"http://127.0.0.1:{}\"\nregion = \"us-east-1\"\nallow_http = true\n\
         timeout_secs = 2\naccess_key_id_file = \"s3.id\"\nsecret_access_key_file = \"s3.key\"\n",
        free_port()
    ));
    let admin = env.init();
    let port = free_port();
    // `config check` reads the SMTP CA file: one without a certificate fails it.
    std::fs::write(env.path("empty.pem"), "not a certificate\n").unwrap();
    let bad = env.path("bad-ca.toml");
    std::fs::write(
        &bad,
        format!(
            "{}\n[[notify]]\ntype = \"smtp\"\nhost = \"127.0.0.1\"\nca_file = \"empty.pem\"\n\
             from = \"keyward@example.net\"\nadmins = [\"ops@example.net\"]\n",
            std::fs::read_to_string(&env.config).unwrap()
        ),
    )
    .unwrap();
    let check = env.run(&["config", "check", "--config", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success());
    assert!(
        stderr.contains("empty.pem") && stderr.contains("no readable PEM certificate"),
        "{stderr}"
    );
    env.append_config(&format!(
        "[[notify]]\ntype = \"smtp\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\n\
         from = \"keyward <keyward@example.net>\"\n\
         approvers = [\"alice@example.net\", \"Bob <bob@example.net>\"]\n\
         admins = [\"ops@example.net\"]\n\
         timeout_seconds = 5\nmax_attempts = 3\ninitial_backoff_ms = 100\n"
    ));
    let check = env.run(&["config", "check", "--config", env.config.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut daemon = env.serve();
    let url = daemon.url.clone();
    let metrics = metrics_text(&url).await;
    for result in ["delivered", "failed", "dropped", "retried"] {
        assert_eq!(sample(&metrics, result), 0, "{result}: {metrics}");
    }

    // The mail server is down: the registration is accepted and approved
    // while its mail is being retried (nothing listens on the port).
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let (status, first) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": "pump-6", "group": "default" })),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["status"], "pending", "{first}");
    let first_id = first["id"].as_str().unwrap();
    let (status, approved) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/registrations/{first_id}/approve"),
        Some(&admin),
        Some(json!({ "comment": "mail server is down" })),
    )
    .await;
    assert_eq!(status, 200, "{approved}");
    assert_eq!(approved["status"], "issued", "{approved}");

    // Three attempts (100 ms, then 200 ms apart): two retries, then failed.
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let metrics = metrics_text(&url).await;
        if sample(&metrics, "failed") == 1 {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "the smtp backend never gave up: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(sample(&metrics, "retried"), 2, "{metrics}");
    assert_eq!(sample(&metrics, "delivered"), 0, "{metrics}");
    promtool_check(&metrics);

    // The server comes back on the same port: the next notification arrives.
    let mut server = SmtpServer::start(env.dir.path(), port, Mode::Plain, None);
    let (csr, _) = openssl_csr(env.dir.path(), "ec");
    let (status, sub) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": "pump-7", "group": "default" })),
    )
    .await;
    assert_eq!(status, 201, "{sub}");
    let registration_id = sub["id"].as_str().unwrap();
    wait_for("the pending-registration mail", 30, || {
        !server.mails().is_empty()
    })
    .await;
    let metrics = metrics_text(&url).await;
    assert_eq!(sample(&metrics, "delivered"), 1, "{metrics}");
    assert_eq!(sample(&metrics, "failed"), 1, "{metrics}");
    assert_eq!(sample(&metrics, "retried"), 2, "{metrics}");

    let mails = server.mails();
    assert_eq!(mails.len(), 1, "the given-up mail is not sent later");
    let m = &mails[0];
    // To the approvers only; the admins do not act on registrations.
    assert_eq!(m.rcpt_to(), ["alice@example.net", "bob@example.net"]);
    assert_eq!(m.header("X-MailFrom"), "keyward@example.net");
    assert_eq!(m.header("From"), "keyward <keyward@example.net>");
    assert_eq!(
        m.header("To"),
        "alice@example.net, Bob <bob@example.net>",
        "{m:?}"
    );
    assert_eq!(
        m.header("Subject"),
        "[keyward] Registration waiting for approval (group default, 1 approval(s) required)"
    );
    assert!(m.header("Content-Type").starts_with("text/plain"), "{m:?}");
    assert_eq!(m.header("Content-Transfer-Encoding"), "7bit", "{m:?}");
    time::OffsetDateTime::parse(
        &m.header("Date"),
        &time::format_description::well_known::Rfc2822,
    )
    .unwrap();
    assert_eq!(m.field("kind"), "registration.pending");
    assert_eq!(m.field("registration_id"), registration_id);
    assert_eq!(m.field("device_name"), "pump-7");
    assert_eq!(m.field("group"), "default");
    assert_eq!(m.field("approvals_required"), "1");
    let notification = uuid::Uuid::parse_str(&m.field("notification")).unwrap();
    assert_eq!(notification.get_version_num(), 7);
    assert_eq!(
        m.header("Message-ID"),
        format!("<{notification}@example.net>")
    );
    assert!(
        m.body
            .contains(&format!("keyward registrations approve {registration_id}"))
    );
    // No secret: the registration secret the device got is not in the mail.
    let secret = sub["secret"].as_str().unwrap();
    assert!(!m.body.contains(secret) && !m.body.contains(first_id));

    // A backup whose only location is unreachable: the admins are told,
    // the approvers are not.
    let (status, started) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/admin/backups"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, 202, "{started}");
    wait_for("the backup failure mail", 60, || server.mails().len() >= 2).await;
    let mails = server.mails();
    let m = &mails[1];
    assert_eq!(m.rcpt_to(), ["ops@example.net"]);
    assert_eq!(m.field("kind"), "backup.replica_failed");
    assert_eq!(m.field("location"), "offsite");
    assert_eq!(m.field("backup_id"), started["id"].as_str().unwrap());
    let code = m.field("code");
    assert_eq!(
        m.header("Subject"),
        format!("[keyward] Backup replica to offsite failed ({code})")
    );
    assert!(!m.body.contains("keyward-test-secret"), "{}", m.body);

    assert!(daemon.stop().success());
    let mut logged = String::new();
    std::io::Read::read_to_string(&mut daemon.child.stderr.take().unwrap(), &mut logged).unwrap();
    assert!(
        logged.contains("notification not delivered") && logged.contains("notify_exhausted"),
        "{logged}"
    );
    server.stop();
}

/// A CA and a server certificate for 127.0.0.1, made by the stock openssl.
fn test_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "mail-ca.key",
        "-out",
        "mail-ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=keyward test mail CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "mail.key",
        "-out",
        "mail.csr",
        "-subj",
        "/CN=mail.test",
    ]);
    std::fs::write(
        dir.join("mail.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "mail.csr",
        "-CA",
        "mail-ca.pem",
        "-CAkey",
        "mail-ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "mail.ext",
        "-out",
        "mail.pem",
    ]);
    (
        dir.join("mail-ca.pem"),
        dir.join("mail.pem"),
        dir.join("mail.key"),
    )
}

const BASE: &str = "[store]\ntype = \"sqlite\"\npath = \"k.db\"\n\
    [keystore]\ntype = \"pkcs11\"\nmodule = \"/nonexistent.so\"\ntoken_label = \"t\"\npin_env = \"KW_UNUSED\"\n\
    [auth]\ntoken_pepper_env = \"KW_UNUSED\"\n";

/// Notifiers built from `[[notify]]` TOML the way `keyward serve` builds
/// them (secrets and CA files read by `start_notifiers`).
fn notifiers(dir: &Path, notify: &str) -> (Arc<Notifiers>, Arc<Metrics>) {
    let config =
        Config::from_toml(&format!("{BASE}{notify}"), &dir.join("keyward.toml"), dir).unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    let n = keyward::app::start_notifiers(&config, Arc::new(SystemClock), metrics.clone()).unwrap();
    (n, metrics)
}

fn count(m: &Metrics, result: &str) -> u64 {
    m.notifications.with_label_values(&["smtp", result]).get()
}

fn admin_notifications() -> Vec<Notification> {
    vec![
        Notification::Rotation {
            rotation_id: uuid::Uuid::now_v7(),
            purpose: "issuing-ca".into(),
            target: "devices".into(),
            outcome: RotationOutcome::Failed,
            step: "certify".into(),
            error: Some("the token is full".into()),
        },
        Notification::Rotation {
            rotation_id: uuid::Uuid::now_v7(),
            purpose: "issuing-ca".into(),
            target: "devices".into(),
            outcome: RotationOutcome::NeedsOperator,
            step: "certify".into(),
            error: None,
        },
        Notification::BackupFailed {
            stage: "replicate",
            backup_id: Some(uuid::Uuid::now_v7()),
            location: Some("offsite".into()),
            code: "location_unreachable".into(),
            error: "connection refused".into(),
        },
        Notification::RenewalDue {
            device_id: uuid::Uuid::now_v7(),
            serial: "0a1b2c".into(),
            not_after: 1_900_000_000,
        },
    ]
}

fn pending() -> Notification {
    Notification::RegistrationPending {
        registration_id: uuid::Uuid::now_v7(),
        device_id: uuid::Uuid::now_v7(),
        group: "default".into(),
        device_name: "pump-8".into(),
        attestation: "none".into(),
        submitted_at: 1_800_000_000,
        approvals_required: 2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_reach_the_admins_over_starttls_with_a_private_ca_and_auth() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, cert, key) = test_ca(d);
    const PASSWORD: &str = "mailer-password-7f3a9c";
    std::fs::write(d.join("smtp.pw"), format!("{PASSWORD}\n")).unwrap();
    let port = free_port();
    let server = SmtpServer::start(
        d,
        port,
        Mode::StartTls {
            cert: &cert,
            key: &key,
        },
        Some(("kw-mailer", &d.join("smtp.pw"))),
    );
    let smtp = |extra: &str| {
        format!(
            "[[notify]]\ntype = \"smtp\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"starttls\"\n\
             from = \"keyward@example.net\"\nadmins = [\"ops@example.net\", \"Security <sec@example.net>\"]\n\
             username = \"kw-mailer\"\ntimeout_seconds = 10\nmax_attempts = 2\ninitial_backoff_ms = 50\n{extra}"
        )
    };

    // Password from a file, the private CA from ca_file: four admin mails.
    // No approver is configured, so a pending registration is not even queued.
    let (n, metrics) = notifiers(
        d,
        &smtp(&format!(
            "password_file = \"smtp.pw\"\nca_file = \"{}\"\n",
            ca.display()
        )),
    );
    for x in admin_notifications() {
        n.send(x);
    }
    n.send(pending());
    n.shutdown(Duration::from_secs(30)).await;
    assert_eq!(count(&metrics, "delivered"), 4);
    assert_eq!(count(&metrics, "failed"), 0);
    assert_eq!(count(&metrics, "retried"), 0);
    assert_eq!(count(&metrics, "dropped"), 0);
    let mails = server.mails();
    assert_eq!(mails.len(), 4, "{mails:?}");
    let mut subjects: Vec<String> = mails.iter().map(|m| m.header("Subject")).collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "[keyward] Backup replica to offsite failed (location_unreachable)",
            "[keyward] Device certificate due for renewal (serial 0a1b2c)",
            "[keyward] Key rotation failed at step certify: issuing-ca devices",
            "[keyward] Key rotation needs an operator: issuing-ca devices",
        ]
    );
    for m in &mails {
        assert_eq!(m.rcpt_to(), ["ops@example.net", "sec@example.net"]);
        assert!(!m.body.contains(PASSWORD));
    }
    let rotation = mails
        .iter()
        .find(|m| m.field("kind") == "rotation.failed")
        .unwrap();
    assert_eq!(rotation.field("error"), "the token is full");
    assert_eq!(rotation.field("step"), "certify");
    let backup = mails
        .iter()
        .find(|m| m.field("kind") == "backup.replica_failed")
        .unwrap();
    assert_eq!(backup.field("location"), "offsite");
    assert_eq!(backup.field("code"), "location_unreachable");
    // Each mail authenticated (one connection each, no pool).
    let auth = server.auth_lines();
    assert_eq!(auth.len(), 4, "{auth:?}");
    assert!(
        auth.iter()
            .all(|l| l.starts_with("kw-mailer ") && l.ends_with(" ok")),
        "{auth:?}"
    );

    // A wrong password: 535 is final, one attempt, counted failed, no mail.
    let wrong = d.join("wrong.pw");
    std::fs::write(&wrong, "not-the-password").unwrap();
    let (n, metrics) = notifiers(
        d,
        &smtp(&format!(
            "password_file = \"wrong.pw\"\nca_file = \"{}\"\n",
            ca.display()
        )),
    );
    n.send(admin_notifications().remove(0));
    n.shutdown(Duration::from_secs(30)).await;
    assert_eq!(count(&metrics, "failed"), 1);
    assert_eq!(
        count(&metrics, "retried"),
        0,
        "an authentication failure is not retried"
    );
    assert_eq!(server.mails().len(), 4);
    let auth = server.auth_lines();
    assert_eq!(auth.len(), 5, "{auth:?}");
    assert!(auth[4].ends_with(" bad"), "{auth:?}");

    // Without ca_file the system roots do not trust the private CA: the TLS
    // handshake fails, is retried, then counted failed; nothing is sent,
    // and the password never left (no AUTH seen).
    let (n, metrics) = notifiers(d, &smtp("password_file = \"smtp.pw\"\n"));
    n.send(admin_notifications().remove(0));
    n.shutdown(Duration::from_secs(30)).await;
    assert_eq!(count(&metrics, "failed"), 1);
    assert_eq!(count(&metrics, "retried"), 1);
    assert_eq!(server.mails().len(), 4);
    assert_eq!(server.auth_lines().len(), 5);

    // What each failure was, from the notifier itself: 535 for the wrong
    // password (final), a certificate rejection for the unknown CA.
    let direct = |password: &str, ca_file: Option<PathBuf>| {
        SmtpNotifier::new(
            SmtpSettings {
                host: "127.0.0.1".into(),
                port,
                tls: SmtpTls::StartTls,
                ca_file,
                credentials: Some(("kw-mailer".into(), SecretString::from(password))),
                helo_name: None,
                from: "keyward@example.net".parse().unwrap(),
                approvers: Vec::new(),
                admins: vec!["ops@example.net".parse().unwrap()],
                timeout: Duration::from_secs(10),
                max_attempts: 2,
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(1),
            },
            Arc::new(Metrics::new().unwrap()),
        )
        .unwrap()
    };
    let rotation = Envelope::new(
        admin_notifications().remove(0),
        time::OffsetDateTime::now_utc(),
    );
    let e = direct("not-the-password", Some(ca.clone()))
        .notify(&rotation)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "notify_mail_rejected");
    assert!(
        matches!(&e, NotifyError::MailRejected { code, .. } if code == "535"),
        "{e}"
    );
    let e = direct(PASSWORD, None).notify(&rotation).await.unwrap_err();
    let NotifyError::Exhausted {
        attempts: 2,
        last: AttemptFailure::Smtp(tls),
    } = &e
    else {
        panic!("{e:?}")
    };
    // rustls refused the certificate during the handshake (lettre reports it as a connection error).
    assert!(
        format!("{tls:?}").contains("InvalidCertificate(UnknownIssuer)"),
        "{tls:?}"
    );
    assert_eq!(
        server.auth_lines().len(),
        6,
        "one more AUTH: the wrong password"
    );
    assert_eq!(server.mails().len(), 4);

    // A CA file that holds no certificate is refused at start.
    std::fs::write(d.join("empty.pem"), "not a certificate\n").unwrap();
    let config = Config::from_toml(
        &format!(
            "{BASE}{}",
            smtp("password_file = \"smtp.pw\"\nca_file = \"empty.pem\"\n")
        ),
        &d.join("keyward.toml"),
        d,
    )
    .unwrap();
    let e = keyward::app::start_notifiers(
        &config,
        Arc::new(SystemClock),
        Arc::new(Metrics::new().unwrap()),
    )
    .err()
    .unwrap();
    assert!(
        format!("{e:#}").contains("holds no readable PEM certificate"),
        "{e:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls_delivers_to_approvers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, cert, key) = test_ca(d);
    let port = free_port();
    let server = SmtpServer::start(
        d,
        port,
        Mode::Tls {
            cert: &cert,
            key: &key,
        },
        None,
    );
    let (n, metrics) = notifiers(
        d,
        &format!(
            "[[notify]]\ntype = \"smtp\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"tls\"\n\
             ca_file = \"{}\"\nfrom = \"keyward@example.net\"\napprovers = [\"alice@example.net\"]\n",
            ca.display()
        ),
    );
    n.send(pending());
    // Admin notifications have no audience here: not queued, not counted.
    for x in admin_notifications() {
        n.send(x);
    }
    n.shutdown(Duration::from_secs(30)).await;
    assert_eq!(count(&metrics, "delivered"), 1);
    assert_eq!(count(&metrics, "dropped") + count(&metrics, "failed"), 0);
    let mails = server.mails();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].rcpt_to(), ["alice@example.net"]);
    assert_eq!(mails[0].field("device_name"), "pump-8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_times_out_each_attempt() {
    // Accepts connections and says nothing (no 220 greeting).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(sock);
        }
    });
    let metrics = Arc::new(Metrics::new().unwrap());
    let smtp = SmtpNotifier::new(
        SmtpSettings {
            host: "127.0.0.1".into(),
            port,
            tls: SmtpTls::None,
            ca_file: None,
            credentials: None,
            helo_name: Some("kw-test.example.net".into()),
            from: "keyward@example.net".parse().unwrap(),
            approvers: vec!["alice@example.net".parse().unwrap()],
            admins: Vec::new(),
            timeout: Duration::from_secs(1),
            max_attempts: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
        },
        metrics.clone(),
    )
    .unwrap();
    let env = Envelope::new(pending(), time::OffsetDateTime::now_utc());
    let e = smtp.notify(&env).await.unwrap_err();
    assert!(
        matches!(
            e,
            NotifyError::Exhausted {
                attempts: 2,
                last: AttemptFailure::Timeout
            }
        ),
        "{e:?}"
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(count(&metrics, "retried"), 1);
    // No audience for admin notifications: not wanted, nothing attempted.
    assert!(!smtp.wants(&admin_notifications()[0]));
    assert!(smtp.wants(&pending()));
}
