//! The `webhook` notifier: POSTs the JSON body to a URL, signed with
//! HMAC-SHA256 (`Keyward-Signature: t=<unix>,v1=<hex>` over `"<t>.<body>"`),
//! each attempt under a timeout, retried with exponential backoff on network
//! errors, 5xx and 429 (`Retry-After` honoured up to `max_backoff`), never on
//! other 4xx. Redirects are not followed. The contract is in
//! docs/notifications.md.
//!
//! The URL may itself carry a credential (many chat webhooks put a token in
//! the path), so logs and errors name only its scheme, host and port.

use super::{AttemptFailure, Envelope, Notifier, NotifyError};
use crate::clock::Clock;
use ring::hmac;
use secrecy::{ExposeSecret, SecretString};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "Keyward-Signature";
/// Shortest accepted secret, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// A webhook URL that passed the rules: `https://`, or `http://` only to a
/// loopback host; no credentials, no fragment. `Debug`/`Display` show only
/// scheme, host and port.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl(reqwest::Url);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("not a URL ({0})")]
    Syntax(String),
    #[error("must start with https:// (http:// only to a loopback address)")]
    Scheme,
    #[error(
        "http:// is allowed only to a loopback host (127.0.0.0/8, ::1, localhost); use https://"
    )]
    PlainHttpOffLoopback,
    #[error("must have a host, and no user name, password or fragment")]
    Shape,
}

impl WebhookUrl {
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        let url = reqwest::Url::parse(s).map_err(|e| UrlError::Syntax(e.to_string()))?;
        if !url.username().is_empty()
            || url.password().is_some()
            || url.fragment().is_some()
            || url.host().is_none()
        {
            return Err(UrlError::Shape);
        }
        match url.scheme() {
            "https" => {}
            "http" => {
                let loopback = match url.host() {
                    Some(url::Host::Ipv4(a)) => a.is_loopback(),
                    Some(url::Host::Ipv6(a)) => a.is_loopback(),
                    Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                    None => false,
                };
                if !loopback {
                    return Err(UrlError::PlainHttpOffLoopback);
                }
            }
            _ => return Err(UrlError::Scheme),
        }
        Ok(Self(url))
    }

    /// Scheme, host and port: safe for logs.
    pub fn redacted(&self) -> String {
        let u = &self.0;
        let host = u.host_str().unwrap_or("");
        match u.port() {
            Some(p) => format!("{}://{host}:{p}/…", u.scheme()),
            None => format!("{}://{host}/…", u.scheme()),
        }
    }
}

impl std::fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebhookUrl({})", self.redacted())
    }
}

impl std::fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Rejects a secret shorter than [`MIN_SECRET_BYTES`]; `key` names it.
pub fn check_secret(key: &str, secret: &SecretString) -> Result<(), NotifyError> {
    if secret.expose_secret().len() < MIN_SECRET_BYTES {
        return Err(NotifyError::WeakSecret {
            key: key.to_string(),
            min: MIN_SECRET_BYTES,
        });
    }
    Ok(())
}

/// `t=<t>,v1=<hex HMAC-SHA256(key, "<t>.<body>")>`.
pub fn signature(key: &hmac::Key, t: i64, body: &[u8]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("t={t},v1={}", hex::encode(ctx.sign().as_ref()))
}

/// What an HTTP status means for the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// 5xx and 429: the receiver may accept it later.
    Retry,
    /// Everything else (4xx, and 1xx/3xx: redirects are not followed).
    Reject,
}

pub fn verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        429 | 500..=599 => Verdict::Retry,
        _ => Verdict::Reject,
    }
}

/// The wait after failed attempt number `attempt` (1-based): `initial`
/// doubled per attempt, at most `max`.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
    initial.saturating_mul(factor).min(max)
}

/// A `Retry-After` value (delta-seconds or an HTTP date) as a wait from
/// `now`, at most `cap`; `None` when absent or unreadable.
pub fn retry_after(value: Option<&str>, now: OffsetDateTime, cap: Duration) -> Option<Duration> {
    let v = value?.trim();
    let wait = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822).ok()?;
        let secs = (at - now).whole_seconds().max(0);
        Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    };
    Some(wait.min(cap))
}

/// Checked settings of one webhook (see `[[notify]]` in the config).
pub struct WebhookSettings {
    pub url: WebhookUrl,
    pub secret: SecretString,
    /// Per attempt: connecting, sending and waiting for the status line.
    pub timeout: Duration,
    /// At least 1.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    /// Cap on the backoff and on a `Retry-After`.
    pub max_backoff: Duration,
}

pub struct WebhookNotifier {
    client: reqwest::Client,
    url: WebhookUrl,
    key: hmac::Key,
    timeout: Duration,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    clock: Arc<dyn Clock>,
}

impl WebhookNotifier {
    /// `key` names the secret in errors (e.g. `notify[1].secret`).
    pub fn new(key: &str, s: WebhookSettings, clock: Arc<dyn Clock>) -> Result<Self, NotifyError> {
        check_secret(key, &s.secret)?;
        // The daemon installs ring at start; embedders and tests may not have.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("keyward/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(s.timeout)
            .build()
            .map_err(|e| NotifyError::Client(e.without_url()))?;
        Ok(Self {
            client,
            key: hmac::Key::new(hmac::HMAC_SHA256, s.secret.expose_secret().as_bytes()),
            url: s.url,
            timeout: s.timeout,
            max_attempts: s.max_attempts.max(1),
            initial_backoff: s.initial_backoff,
            max_backoff: s.max_backoff,
            clock,
        })
    }

    /// One attempt: the verdict and the wait the receiver asked for.
    async fn attempt(
        &self,
        env: &Envelope,
        body: &[u8],
    ) -> Result<(), (AttemptFailure, Option<Duration>, Verdict)> {
        let now = self.clock.now();
        let sent = self
            .client
            .post(self.url.0.clone())
            .timeout(self.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                SIGNATURE_HEADER,
                signature(&self.key, now.unix_timestamp(), body),
            )
            .header("Keyward-Event", env.kind())
            .header("Keyward-Delivery", env.id.to_string())
            .body(body.to_vec())
            .send()
            .await;
        match sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match verdict(status) {
                    Verdict::Delivered => Ok(()),
                    v => {
                        let wait = retry_after(
                            resp.headers()
                                .get(reqwest::header::RETRY_AFTER)
                                .and_then(|h| h.to_str().ok()),
                            now,
                            self.max_backoff,
                        );
                        Err((AttemptFailure::Status(status), wait, v))
                    }
                }
            }
            Err(e) if e.is_timeout() => Err((AttemptFailure::Timeout, None, Verdict::Retry)),
            Err(e) => Err((
                AttemptFailure::Network(e.without_url()),
                None,
                Verdict::Retry,
            )),
        }
    }
}

#[async_trait::async_trait]
impl Notifier for WebhookNotifier {
    async fn notify(&self, env: &Envelope) -> Result<(), NotifyError> {
        let body = env.body()?;
        let mut attempt = 1;
        loop {
            let (failure, asked, v) = match self.attempt(env, &body).await {
                Ok(()) => return Ok(()),
                Err(f) => f,
            };
            if let (Verdict::Reject, AttemptFailure::Status(status)) = (v, &failure) {
                return Err(NotifyError::Rejected { status: *status });
            }
            if attempt >= self.max_attempts {
                return Err(NotifyError::Exhausted {
                    attempts: attempt,
                    last: failure,
                });
            }
            let wait =
                asked.unwrap_or_else(|| backoff(attempt, self.initial_backoff, self.max_backoff));
            tracing::debug!(
                target: "keyward::notify",
                url = %self.url,
                notification = %env.id,
                attempt,
                error = %failure,
                retry_in_ms = wait.as_millis() as u64,
                "webhook attempt failed; retrying"
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    fn name(&self) -> &'static str {
        "webhook"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn the_signature_is_hmac_sha256_over_t_dot_body() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"0123456789abcdef-secret");
        let body = br#"{"type":"registration.pending"}"#;
        let sig = signature(&key, 1_800_000_000, body);
        // Known answer from the stock tool:
        // printf '%s' '1800000000.{"type":"registration.pending"}' | openssl dgst -sha256 -hmac 0123456789abcdef-secret
        assert_eq!(
            sig,
            "t=1800000000,v1=4d0d1fc52f60157ff8812b90907839880ceab659114b84fc35e07a22eca22119"
        );
        let hex_part = sig.split(",v1=").nth(1).unwrap();
        let mac = hex::decode(hex_part).unwrap();
        hmac::verify(
            &key,
            b"1800000000.{\"type\":\"registration.pending\"}",
            &mac,
        )
        .unwrap();
        assert!(
            hmac::verify(
                &key,
                b"1800000001.{\"type\":\"registration.pending\"}",
                &mac
            )
            .is_err()
        );
    }

    #[test]
    fn statuses_decide_between_delivered_retry_and_reject() {
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(verdict(s), Verdict::Delivered, "{s}");
        }
        for s in [429, 500, 502, 503, 504, 599] {
            assert_eq!(verdict(s), Verdict::Retry, "{s}");
        }
        for s in [100, 301, 302, 307, 400, 401, 403, 404, 410, 413, 422] {
            assert_eq!(verdict(s), Verdict::Reject, "{s}");
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let ms = Duration::from_millis;
        let waits: Vec<_> = (1..=7).map(|a| backoff(a, ms(500), ms(10_000))).collect();
        assert_eq!(
            waits,
            vec![
                ms(500),
                ms(1000),
                ms(2000),
                ms(4000),
                ms(8000),
                ms(10_000),
                ms(10_000)
            ]
        );
        assert_eq!(backoff(u32::MAX, ms(500), ms(10_000)), ms(10_000));
        assert_eq!(backoff(0, ms(500), ms(10_000)), ms(500));
    }

    #[test]
    fn retry_after_reads_seconds_and_dates_and_is_capped() {
        let now = datetime!(2026-11-23 22:00:00 UTC);
        let cap = Duration::from_secs(60);
        let s = Duration::from_secs;
        assert_eq!(retry_after(Some("7"), now, cap), Some(s(7)));
        assert_eq!(retry_after(Some(" 0 "), now, cap), Some(s(0)));
        assert_eq!(retry_after(Some("3600"), now, cap), Some(cap));
        assert_eq!(
            retry_after(Some("Mon, 23 Nov 2026 22:00:30 GMT"), now, cap),
            Some(s(30))
        );
        assert_eq!(
            retry_after(Some("Mon, 23 Nov 2026 21:00:00 GMT"), now, cap),
            Some(s(0)),
            "a date in the past means now"
        );
        assert_eq!(retry_after(Some("soon"), now, cap), None);
        assert_eq!(retry_after(Some("-5"), now, cap), None);
        assert_eq!(retry_after(None, now, cap), None);
    }

    #[test]
    fn urls_must_be_https_or_loopback_http_and_are_redacted() {
        for ok in [
            "https://hooks.example.net/keyward",
            "https://hooks.example.net:8443/a/b?token=x",
            "http://127.0.0.1:9000/hook",
            "http://127.8.9.10/hook",
            "http://[::1]:9000/hook",
            "http://localhost:9000/hook",
        ] {
            WebhookUrl::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, err) in [
            ("http://hooks.example.net/x", UrlError::PlainHttpOffLoopback),
            ("http://192.0.2.1/x", UrlError::PlainHttpOffLoopback),
            ("http://0.0.0.0/x", UrlError::PlainHttpOffLoopback),
            ("ftp://hooks.example.net/x", UrlError::Scheme),
            ("file:///etc/passwd", UrlError::Shape),
            ("https://user:pw@hooks.example.net/x", UrlError::Shape),
            ("https://hooks.example.net/x#frag", UrlError::Shape),
        ] {
            assert_eq!(WebhookUrl::parse(bad).unwrap_err(), err, "{bad}");
        }
        assert!(matches!(
            WebhookUrl::parse("hooks.example.net"),
            Err(UrlError::Syntax(_))
        ));
        let u = WebhookUrl::parse("https://hooks.example.net:8443/services/T0/B1/SECRETPATH?k=v")
            .unwrap();
        let shown = format!("{u} {u:?}");
        assert!(
            !shown.contains("SECRETPATH") && !shown.contains("k=v"),
            "{shown}"
        );
        assert!(shown.contains("hooks.example.net:8443"), "{shown}");
    }

    #[test]
    fn short_secrets_are_refused() {
        let e =
            check_secret("notify[0].secret", &SecretString::from("short".to_string())).unwrap_err();
        assert_eq!(e.code(), "notify_weak_secret");
        assert!(e.to_string().starts_with("notify[0].secret"), "{e}");
        check_secret("k", &SecretString::from("0123456789abcdef".to_string())).unwrap();
    }
}
