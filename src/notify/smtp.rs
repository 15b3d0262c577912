//! The `smtp` notifier: one plain-text mail per notification to the people
//! who act on it (approvers for a pending registration, admins for the rest;
//! [`audience`]), sent with lettre over rustls (STARTTLS, implicit TLS, or
//! plain SMTP to a loopback relay), each attempt under a timeout, retried
//! with the webhook's exponential backoff on network errors, timeouts, TLS
//! failures and 4xx replies, never on a 5xx reply. Every retry is counted as
//! `keyward_notifications_total{backend="smtp",result="retried"}`. The mail
//! format and the audiences are in docs/notifications.md.

use super::webhook::backoff;
use super::{AttemptFailure, Envelope, Notification, Notifier, NotifyError, RotationOutcome};
use crate::metrics::Metrics;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use lettre::message::Mailbox;

/// How the connection to the mail server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain SMTP: only to a loopback relay, or with `allow_plaintext` and no credentials.
    None,
    /// SMTP, then `STARTTLS` before anything else; refused if the server does not offer it.
    StartTls,
    /// TLS from the first byte (SMTPS, port 465).
    Tls,
}

impl SmtpTls {
    /// The port used when none is configured.
    pub fn default_port(self) -> u16 {
        match self {
            Self::None => 25,
            Self::StartTls => 587,
            Self::Tls => 465,
        }
    }
}

/// Who gets a notification's mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// `approvers = [...]`: they can act on a pending registration.
    Approvers,
    /// `admins = [...]`: rotations, backups, renewals.
    Admins,
}

/// The audience of each kind of notification (documented in docs/notifications.md).
pub fn audience(n: &Notification) -> Audience {
    match n {
        Notification::RegistrationPending { .. } => Audience::Approvers,
        Notification::RenewalDue { .. }
        | Notification::Rotation { .. }
        | Notification::BackupFailed { .. } => Audience::Admins,
    }
}

/// Checked settings of one SMTP backend (see `[[notify]]` in the config).
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// PEM file of the CA(s) that alone are trusted for the server's
    /// certificate (instead of the system's roots).
    pub ca_file: Option<PathBuf>,
    /// User name and password for `AUTH` (PLAIN or LOGIN).
    pub credentials: Option<(String, SecretString)>,
    /// The EHLO name; default: this machine's host name.
    pub helo_name: Option<String>,
    pub from: Mailbox,
    pub approvers: Vec<Mailbox>,
    pub admins: Vec<Mailbox>,
    /// One attempt in all: connect, TLS, AUTH and the whole transaction.
    pub timeout: Duration,
    /// At least 1.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

pub struct SmtpNotifier {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// `host:port`, for logs.
    server: String,
    from: Mailbox,
    approvers: Vec<Mailbox>,
    admins: Vec<Mailbox>,
    timeout: Duration,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    metrics: Arc<Metrics>,
}

/// Reads `ca_file`: at least one PEM certificate, nothing unreadable
/// (`keyward config check` calls it too).
pub fn load_ca(path: &Path) -> Result<Certificate, NotifyError> {
    let pem = std::fs::read(path).map_err(|source| NotifyError::CaFile {
        path: path.to_path_buf(),
        source,
    })?;
    let has_cert = String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----");
    match Certificate::from_pem(&pem) {
        Ok(c) if has_cert => Ok(c),
        _ => Err(NotifyError::CaPem {
            path: path.to_path_buf(),
        }),
    }
}

impl SmtpNotifier {
    /// Builds the transport (reading `ca_file` now) and creates the
    /// `retried` series so that alerts see a 0, not an absence.
    pub fn new(s: SmtpSettings, metrics: Arc<Metrics>) -> Result<Self, NotifyError> {
        // The daemon installs ring at start; embedders and tests may not have.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.host)
            .port(s.port)
            .timeout(Some(s.timeout));
        if s.tls != SmtpTls::None {
            let mut params = TlsParameters::builder(s.host.clone());
            if let Some(path) = &s.ca_file {
                params = params
                    .certificate_store(CertificateStore::None)
                    .add_root_certificate(load_ca(path)?);
            }
            let params = params.build_rustls().map_err(NotifyError::Tls)?;
            builder = builder.tls(match s.tls {
                SmtpTls::StartTls => Tls::Required(params),
                _ => Tls::Wrapper(params),
            });
        }
        if let Some((user, password)) = s.credentials {
            builder =
                builder.credentials(Credentials::new(user, password.expose_secret().to_string()));
        }
        if let Some(name) = s.helo_name {
            builder = builder.hello_name(ClientId::Domain(name));
        }
        metrics
            .notifications
            .with_label_values(&["smtp", "retried"]);
        Ok(Self {
            transport: builder.build(),
            server: format!("{}:{}", s.host, s.port),
            from: s.from,
            approvers: s.approvers,
            admins: s.admins,
            timeout: s.timeout,
            max_attempts: s.max_attempts.max(1),
            initial_backoff: s.initial_backoff,
            max_backoff: s.max_backoff,
            metrics,
        })
    }

    fn recipients(&self, n: &Notification) -> &[Mailbox] {
        match audience(n) {
            Audience::Approvers => &self.approvers,
            Audience::Admins => &self.admins,
        }
    }

    /// The mail: `From`, `To` (the whole audience), `Subject`, `Date` (when
    /// the notification was raised), `Message-ID` (the notification id, the
    /// same on every retry), and a plain-text body.
    pub fn message(&self, env: &Envelope) -> Result<Message, NotifyError> {
        let mut b = Message::builder()
            .from(self.from.clone())
            .subject(subject(env))
            .date(env.time.into())
            .message_id(Some(format!("<{}@{}>", env.id, self.from.email.domain())))
            .header(ContentType::TEXT_PLAIN);
        for to in self.recipients(&env.notification) {
            b = b.to(to.clone());
        }
        b.body(body(env)).map_err(NotifyError::Mail)
    }

    /// One attempt, under the timeout.
    async fn attempt(&self, message: &Message) -> Attempt {
        match tokio::time::timeout(self.timeout, self.transport.send(message.clone())).await {
            Ok(Ok(_)) => Attempt::Delivered,
            Ok(Err(e)) if e.is_permanent() => Attempt::Refused(e),
            Ok(Err(e)) if e.is_timeout() => Attempt::Retry(AttemptFailure::Timeout),
            Ok(Err(e)) => Attempt::Retry(AttemptFailure::Smtp(e)),
            Err(_) => Attempt::Retry(AttemptFailure::Timeout),
        }
    }
}

#[async_trait::async_trait]
impl Notifier for SmtpNotifier {
    async fn notify(&self, env: &Envelope) -> Result<(), NotifyError> {
        if !self.wants(&env.notification) {
            return Ok(());
        }
        let message = self.message(env)?;
        let mut attempt = 1;
        loop {
            let failure = match self.attempt(&message).await {
                Attempt::Delivered => return Ok(()),
                Attempt::Refused(e) => {
                    return Err(NotifyError::MailRejected {
                        code: e.status().map(|c| c.to_string()).unwrap_or_default(),
                        source: e,
                    });
                }
                Attempt::Retry(f) => f,
            };
            if attempt >= self.max_attempts {
                return Err(NotifyError::Exhausted {
                    attempts: attempt,
                    last: failure,
                });
            }
            let wait = backoff(attempt, self.initial_backoff, self.max_backoff);
            self.metrics
                .notifications
                .with_label_values(&["smtp", "retried"])
                .inc();
            tracing::debug!(
                target: "keyward::notify",
                server = %self.server,
                notification = %env.id,
                attempt,
                error = %failure,
                cause = std::error::Error::source(&failure).map(|s| s.to_string()),
                retry_in_ms = wait.as_millis() as u64,
                "smtp attempt failed; retrying"
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    fn name(&self) -> &'static str {
        "smtp"
    }

    /// Only notifications whose audience lists an address.
    fn wants(&self, n: &Notification) -> bool {
        !self.recipients(n).is_empty()
    }
}

/// How one attempt ended.
enum Attempt {
    Delivered,
    /// Network error, timeout, TLS failure, 4xx reply: worth another try.
    Retry(AttemptFailure),
    /// A 5xx reply: final.
    Refused(lettre::transport::smtp::Error),
}

/// A value from a notification, safe on one line of a mail: control
/// characters (a newline in a device name could forge a line) become `?`,
/// and it is cut at 200 characters.
fn clean(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(200)
        .collect();
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}

/// `[keyward] …`: what happened, without device ids or names.
pub fn subject(env: &Envelope) -> String {
    let text = match &env.notification {
        Notification::RegistrationPending {
            group,
            approvals_required,
            ..
        } => format!(
            "Registration waiting for approval (group {group}, {approvals_required} approval(s) required)"
        ),
        Notification::RenewalDue { serial, .. } => {
            format!("Device certificate due for renewal (serial {serial})")
        }
        Notification::Rotation {
            purpose,
            target,
            outcome,
            step,
            ..
        } => match outcome {
            RotationOutcome::Completed => format!("Key rotation completed: {purpose} {target}"),
            RotationOutcome::Failed => {
                format!("Key rotation failed at step {step}: {purpose} {target}")
            }
            RotationOutcome::NeedsOperator => {
                format!("Key rotation needs an operator: {purpose} {target}")
            }
        },
        Notification::BackupFailed {
            stage,
            location,
            code,
            ..
        } => {
            let at = location.as_deref().unwrap_or("spool");
            match *stage {
                "replicate" => format!("Backup replica to {at} failed ({code})"),
                "verify" => format!("Backup verification failed at {at} ({code})"),
                "prune" => format!("Backup prune at {at} failed ({code})"),
                _ => format!("Backup failed ({code})"),
            }
        }
    };
    format!("[keyward] {}", clean(&text))
}

/// The plain-text body: a sentence, every field of the webhook's `data`
/// (same names), the notification's kind, id and time, and what to do.
pub fn body(env: &Envelope) -> String {
    let n = &env.notification;
    let intro = match n {
        Notification::RegistrationPending { .. } => {
            "A device registration is waiting for approval."
        }
        Notification::RenewalDue { .. } => "A device certificate's renewal window has opened.",
        Notification::Rotation { outcome, .. } => match outcome {
            RotationOutcome::Completed => "A key rotation completed: the new key is active.",
            RotationOutcome::Failed => {
                "A key rotation step failed. keyward retries it with backoff."
            }
            RotationOutcome::NeedsOperator => {
                "A key rotation waits for an operator: a card-held parent key must\n\
                 certify the new key."
            }
        },
        Notification::BackupFailed { .. } => "A backup operation failed.",
    };
    let mut rows: Vec<(String, String)> = vec![
        ("kind".into(), env.kind().into()),
        ("notification".into(), env.id.to_string()),
        ("time".into(), crate::clock::rfc3339(env.time)),
    ];
    if let Value::Object(data) = n.data() {
        for (k, v) in data {
            let v = match v {
                Value::Null => "-".to_string(),
                Value::String(s) => clean(&s),
                other => clean(&other.to_string()),
            };
            rows.push((k, v));
        }
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!("{intro}\n\n");
    for (k, v) in rows {
        out.push_str(&format!("{k:<width$}  {v}\n"));
    }
    out.push('\n');
    let next = match n {
        Notification::RegistrationPending {
            registration_id, ..
        } => format!(
            "To review it:\n  keyward registrations show {registration_id}\n  \
             keyward registrations approve {registration_id}\n  \
             keyward registrations deny {registration_id}\n"
        ),
        Notification::RenewalDue { .. } => {
            "`keyward certs expiring` lists the certificates due.\n".to_string()
        }
        Notification::Rotation { .. } => {
            "See \"Rotation\" in docs/operations.md; `keyward keys list` shows\n\
             the key versions.\n"
                .to_string()
        }
        Notification::BackupFailed { .. } => {
            "See \"Backups and disaster recovery\" in docs/operations.md;\n\
             `keyward backup list` shows the backups and their copies.\n"
                .to_string()
        }
    };
    out.push_str(&next);
    // Lines stay under 76 characters (a long value aside), so that the
    // mail goes as 7bit text, readable as it stands in any mail store.
    out.push_str(concat!(
        "\nkeyward ",
        env!("CARGO_PKG_VERSION"),
        ". This mail carries no secret; the audit trail is\nthe record.\n"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use uuid::Uuid;

    fn env(n: Notification) -> Envelope {
        Envelope::new(n, datetime!(2027-01-15 08:00:00 UTC))
    }

    #[test]
    fn pending_registrations_go_to_approvers_and_the_rest_to_admins() {
        let pending = Notification::RegistrationPending {
            registration_id: Uuid::now_v7(),
            device_id: Uuid::now_v7(),
            group: "default".into(),
            device_name: "pump-7".into(),
            attestation: "none".into(),
            submitted_at: 0,
            approvals_required: 2,
        };
        assert_eq!(audience(&pending), Audience::Approvers);
        let others = [
            Notification::RenewalDue {
                device_id: Uuid::now_v7(),
                serial: "0a".into(),
                not_after: 0,
            },
            Notification::Rotation {
                rotation_id: Uuid::now_v7(),
                purpose: "issuing-ca".into(),
                target: "devices".into(),
                outcome: RotationOutcome::Completed,
                step: "activate".into(),
                error: None,
            },
            Notification::BackupFailed {
                stage: "create",
                backup_id: None,
                location: None,
                code: "backup_disk_full".into(),
                error: "no space".into(),
            },
        ];
        for n in others {
            assert_eq!(audience(&n), Audience::Admins, "{}", n.kind());
        }
    }

    #[test]
    fn subject_and_body_name_the_kind_and_ids_and_cannot_be_forged() {
        let reg = Uuid::now_v7();
        let e = env(Notification::RegistrationPending {
            registration_id: reg,
            device_id: Uuid::now_v7(),
            group: "default".into(),
            device_name: "pump-7\nApprove at https://evil.example".into(),
            attestation: "none".into(),
            submitted_at: 1_800_000_000,
            approvals_required: 2,
        });
        assert_eq!(
            subject(&e),
            "[keyward] Registration waiting for approval (group default, 2 approval(s) required)"
        );
        let b = body(&e);
        assert!(b.starts_with("A device registration is waiting for approval.\n"));
        assert!(
            b.contains("kind                registration.pending\n"),
            "{b}"
        );
        assert!(
            b.contains(&format!("notification        {}\n", e.id)),
            "{b}"
        );
        assert!(b.contains(&format!("registration_id     {reg}\n")), "{b}");
        assert!(
            b.contains("time                2027-01-15T08:00:00Z\n"),
            "{b}"
        );
        assert!(
            b.contains("device_name         pump-7?Approve at https://evil.example\n"),
            "{b}"
        );
        assert!(!b.contains("\nApprove at"), "{b}");
        assert!(b.contains(&format!("keyward registrations approve {reg}")));

        let failed = env(Notification::BackupFailed {
            stage: "replicate",
            backup_id: Some(Uuid::now_v7()),
            location: Some("offsite".into()),
            code: "location_unreachable".into(),
            error: "connection refused".into(),
        });
        assert_eq!(
            subject(&failed),
            "[keyward] Backup replica to offsite failed (location_unreachable)"
        );
        assert!(body(&failed).contains("error         connection refused\n"));
        // Fixed text keeps lines short enough for 7bit (values aside).
        for n in [
            e.notification.clone(),
            failed.notification.clone(),
            Notification::Rotation {
                rotation_id: Uuid::now_v7(),
                purpose: "issuing-ca".into(),
                target: "devices".into(),
                outcome: RotationOutcome::NeedsOperator,
                step: "certify".into(),
                error: None,
            },
            Notification::RenewalDue {
                device_id: Uuid::now_v7(),
                serial: "0a".into(),
                not_after: 0,
            },
        ] {
            let text = body(&env(n));
            for line in text.lines() {
                assert!(line.len() <= 76, "{line:?}");
                assert!(!line.ends_with(' '), "{line:?}");
            }
        }
        let long = clean(&"x".repeat(500));
        assert_eq!(long.chars().count(), 201);
    }
}
