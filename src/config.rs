//! `keyward.toml`: parsed once into typed, checked values; unknown keys refused.
//!
//! [`Config::load`] reads the file as written (`file`, serde with
//! `deny_unknown_fields`), then builds [`Config`]: every value is checked
//! here, once, with an error that names its key; later code takes the values
//! as given. Secrets become [`SecretSetting`]s (where, not what), the PKCS#11
//! token selector a [`TokenSelector`], YubiKey names the `yubikey` crate's
//! types, seconds a [`Duration`].
//!
//! Relative paths are resolved against the directory of the config file, so a
//! config moved together with its policies and secrets keeps working.

mod file;

use crate::keystore::pkcs11::TokenSelector;
use crate::keystore::pkcs11::uri::Pkcs11Uri;
use crate::secret::{SecretRef, SecretSetting};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use yubikey::piv::SlotId;
use yubikey::{MgmAlgorithmId, PinPolicy, TouchPolicy};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {}", one_line(.source))]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// A value that parsed but is not acceptable; `reason` says what is.
    #[error("{path}: `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

impl ConfigError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Read { .. } => "config_unreadable",
            Self::Parse { .. } => "config_syntax",
            Self::Invalid { .. } => "config_invalid",
        }
    }
}

fn one_line(e: &toml::de::Error) -> String {
    e.to_string().trim_end().replace('\n', " ")
}

/// The name of the default key store, as CA policies and key records name it.
pub use crate::model::DEFAULT_KEYSTORE;

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    /// The default key store: CAs without a `keystore =` in the policy live here.
    pub keystore: KeyStoreConfig,
    /// More key stores by name, e.g. a YubiKey holding the root CA.
    pub keystores: BTreeMap<String, KeyStoreConfig>,
    pub auth: AuthConfig,
    pub policies: PoliciesConfig,
    pub log: LogConfig,
    pub limits: LimitsConfig,
    /// `[broker]`: where devices' broker ACLs are provisioned.
    pub broker: BrokerConfig,
    /// `[jobs]`: background job cadences.
    pub jobs: JobsConfig,
    /// `[scheduler]`: the leader lease of daemons sharing a store.
    pub scheduler: SchedulerConfig,
    /// `[[notify]]`, in order; without any, one `log` backend.
    pub notify: Vec<NotifierConfig>,
    /// `[backup]`; `None`: no backups are configured (the commands say so).
    pub backup: Option<BackupConfig>,
    /// `[audit]`: signed checkpoints of the audit chain and its sinks.
    pub audit: AuditConfig,
    /// `[redis]`: rate limits, the scheduler lock, the cache and the
    /// invalidation bus shared by the daemons of a deployment. `None`: all
    /// of them in process (one daemon).
    pub redis: Option<RedisConfig>,
    /// Directory the config was read from; relative paths were resolved against it.
    pub base_dir: PathBuf,
    pub source_path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// 1 KiB ..= 16 MiB.
    pub body_limit_bytes: usize,
    /// At least one second.
    pub request_timeout: Duration,
    /// Reverse proxies whose `X-Forwarded-For` is believed. Empty: the TCP
    /// peer is the client and the header is ignored.
    pub trusted_proxies: Vec<crate::model::IpNet>,
    /// Base URL relying parties reach keyward at (`https://pki.example.net`),
    /// without a trailing slash. Issued certificates point their CRL
    /// distribution point and AIA (CA issuers, OCSP) below it. `None`: the
    /// certificates carry neither.
    pub public_url: Option<String>,
    /// `[server.tls]`. `None`: plain HTTP, accepted only on a loopback address.
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: where the certificate and key come from, client
/// authentication, handshake limits.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub source: TlsSource,
    pub client_auth: crate::tls::ClientAuth,
    /// At least one second.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once (1..=65536).
    pub max_handshakes: usize,
}

#[derive(Debug, Clone)]
pub enum TlsSource {
    /// Operator-supplied PEM chain and PKCS#8 key (a software key).
    Files {
        certificate_file: PathBuf,
        key_file: PathBuf,
    },
    /// keyward issues itself a server certificate, its key in the default key store.
    Issue(TlsIssueConfig),
}

/// `issue = true`: the server certificate keyward issues itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsIssueConfig {
    /// An issuing CA from policies/ca.toml (checked at start, where the policy is loaded).
    pub issuer: String,
    /// SAN dNSName entries; with `ip_addresses`, at least one name in all.
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<std::net::IpAddr>,
    /// 1..=397 days.
    pub validity_days: u32,
    /// Renew this many days before expiry; less than `validity_days`.
    pub renew_before_days: u32,
    /// ecdsa-p256 (default), ecdsa-p384 or ed25519.
    pub key_algorithm: crate::model::KeyAlgorithm,
}

#[derive(Debug, Clone)]
pub enum StoreConfig {
    Sqlite(SqliteConfig),
    Postgres(PostgresConfig),
}

/// `[store] type = "postgres"`: several daemons may share it.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/database` (or the `key=value` form),
    /// never with a password: that comes from `password`.
    pub url: String,
    /// `password_file` xor `password_env`; none: the server needs none
    /// (trust, peer, or a client certificate).
    pub password: Option<SecretSetting>,
    /// Reader connections of this daemon (1..=64).
    pub pool_size: usize,
    /// Most changes committed in one transaction by the group-commit writer (1..=10000).
    pub batch_max: usize,
}

#[derive(Debug, Clone)]
pub struct SqliteConfig {
    pub path: PathBuf,
    /// Most changes committed in one transaction by the group-commit writer (1..=10000).
    pub batch_max: usize,
}

#[derive(Debug, Clone)]
pub enum KeyStoreConfig {
    Pkcs11(Pkcs11Config),
    Yubikey(YubiKeyConfig),
}

#[derive(Debug, Clone)]
pub struct Pkcs11Config {
    pub module: PathBuf,
    /// Exactly one of `token_label`, `token_serial`, `token_uri` in the file.
    pub token: TokenSelector,
    pub pin: SecretSetting,
    /// Logged-in sessions kept open; also the most signatures in flight (1..=256).
    pub sessions: usize,
    /// Signatures run on `sessions` dedicated threads fed by a queue instead of
    /// one `spawn_blocking` call each (issue 12 lever; BENCHMARKS.md).
    pub signer_threads: bool,
}

/// A YubiKey's PIV applet, chosen by serial number.
#[derive(Debug, Clone)]
pub struct YubiKeyConfig {
    /// Required: another PC/SC reader, or a second YubiKey, must never be picked by accident.
    pub serial: u32,
    /// A slot that can hold a signing key: 9a, 9c, 9d, 9e or 82-95.
    pub slot: SlotId,
    pub pin: SecretSetting,
    /// Hex-encoded management key.
    pub management_key: SecretSetting,
    pub management_key_algorithm: MgmAlgorithmId,
    pub pin_policy: PinPolicy,
    pub touch_policy: TouchPolicy,
    /// PEM trust root for PIV attestation (Yubico's PIV root CA in production).
    pub attestation_root: Option<PathBuf>,
    /// How long a signing request waits for the card (it signs one at a time); at least 1 s.
    pub sign_timeout: Duration,
    /// DANGER: generate even when the card cannot prove the slot empty
    /// (firmware before 5.3). Audited with the key (`slot_check`).
    pub dangerously_generate_into_unverified_slot: bool,
}

/// `[scheduler]`: with several daemons on one store, the one holding the
/// scheduler lease runs the leader-only jobs (`jobs::leader`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// How long a lease holds without renewal (renewed every third of it): a
    /// crashed leader is replaced within about this long. 1 s ..= 1 h,
    /// millisecond precision.
    pub lease: Duration,
}

impl SchedulerConfig {
    /// The default lease: 15 s.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);
    /// The shortest lease: renewals every third of it must stay well above
    /// a store commit's time.
    pub const MIN_LEASE: Duration = Duration::from_secs(1);
    /// The longest lease (a crashed leader's jobs wait this long).
    pub const MAX_LEASE: Duration = Duration::from_secs(3600);
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            lease: Self::DEFAULT_LEASE,
        }
    }
}

/// `[audit]`: the HSM key that signs checkpoints of the chain head, how
/// often it signs, and where else checkpoints go.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditConfig {
    /// Key store holding the `audit` key (default: the default key store).
    pub keystore: String,
    /// Algorithm of a newly generated audit key (default `ecdsa-p256`).
    pub key_algorithm: crate::model::KeyAlgorithm,
    /// A checkpoint is signed once this many events are unsigned (1..=10,000,000).
    pub checkpoint_every_events: u64,
    /// …or once the oldest unsigned event is this old (1 s ..= 1 day).
    pub checkpoint_interval: Duration,
    /// Every checkpoint is also appended (JSON line, fsynced) to this file:
    /// put it where the database's writers cannot rewrite it (another
    /// host, `chattr +a`). Truncation of the store is caught against it.
    pub checkpoint_file: Option<PathBuf>,
    /// How often the daemon verifies the chain's tail from the newest
    /// checkpoint it verified (10 s ..= 1 day).
    pub verify_interval: Duration,
    /// Seal sensitive details (comments, client addresses, device
    /// metadata) with a data key the HSM `audit-encryption` key unwraps
    /// (default true). Off: they are stored in the clear.
    pub encrypt_details: bool,
    /// `[audit.sink]`: the live JSON-lines sink, if any.
    pub sink: Option<crate::audit::sink::SinkConfig>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            keystore: DEFAULT_KEYSTORE.to_string(),
            key_algorithm: crate::model::KeyAlgorithm::EcdsaP256,
            checkpoint_every_events: 10_000,
            checkpoint_interval: Duration::from_secs(60),
            checkpoint_file: None,
            verify_interval: Duration::from_secs(300),
            encrypt_details: true,
            sink: None,
        }
    }
}

/// `[backup]`: where archives are written, who can decrypt them, when they
/// are made and verified, how many are kept, and where they are replicated.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// Local spool: archives are written here (encrypted, never in plaintext)
    /// before they are replicated. Created with mode 0700.
    pub dir: PathBuf,
    /// age recipients files (`age1…` X25519, `ssh-ed25519`, `ssh-rsa` lines,
    /// `#` comments); every archive is encrypted to all of them.
    pub recipients_files: Vec<PathBuf>,
    /// The age identity the verification job decrypts with. `None`: the
    /// job checks checksums only and says so.
    pub verify_identity_file: Option<PathBuf>,
    /// When the scheduler makes a backup (5-field cron, UTC). `None`: only on demand.
    pub schedule: Option<crate::policy::Schedule>,
    /// When the scheduler verifies the latest backup in every location.
    pub verify_schedule: Option<crate::policy::Schedule>,
    /// Retention: the newest backup of each of the last `keep_daily` days…
    pub keep_daily: u32,
    /// … and of each of the last `keep_weekly` ISO weeks are kept; the
    /// newest backup is always kept.
    pub keep_weekly: u32,
    /// First retry delay of a failed replica upload; doubles per failure…
    pub retry_min: Duration,
    /// … up to this.
    pub retry_max: Duration,
    /// `[[backup.locations]]`, in order; names are unique.
    pub locations: Vec<BackupLocationConfig>,
}

/// One replication target.
#[derive(Debug, Clone)]
pub struct BackupLocationConfig {
    /// Unique; metrics and the store name the location by it.
    pub name: String,
    pub kind: BackupLocationKind,
    /// How long one request (upload, download, list) may take.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub enum BackupLocationKind {
    /// A directory (a mounted NAS, another disk).
    Dir { path: PathBuf },
    /// An S3-compatible bucket.
    S3(S3LocationConfig),
}

#[derive(Debug, Clone)]
pub struct S3LocationConfig {
    pub bucket: String,
    /// Key prefix inside the bucket (`prod/`), may be empty.
    pub prefix: String,
    /// `None`: AWS's own endpoint for `region`.
    pub endpoint: Option<String>,
    pub region: String,
    /// Plain-HTTP endpoints are refused unless this is set (a loopback test server).
    pub allow_http: bool,
    /// `None` for both: anonymous requests.
    pub access_key_id: Option<SecretSetting>,
    pub secret_access_key: Option<SecretSetting>,
}

/// `[redis]` (see `crate::redis`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `unix:///path`); never with a password.
    pub url: String,
    /// `password_file` or `password_env`; `None`: no `AUTH`.
    pub password: Option<SecretSetting>,
    /// Namespace of every key and channel of this deployment (default `keyward:`).
    pub key_prefix: String,
}

/// Default `[redis] key_prefix`.
pub const DEFAULT_REDIS_PREFIX: &str = "keyward:";

/// `[broker]`: the MQTT broker whose ACLs follow device issuance and
/// revocation, and how hard keyward tries.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub backend: BrokerBackendConfig,
    /// How long a revocation, suspension or resumption waits for the broker
    /// before it answers `"broker": "pending"` (the outbox keeps trying).
    pub flush_timeout: Duration,
    /// First retry delay after a failed broker update; doubles per failure…
    pub retry_min: Duration,
    /// … up to this.
    pub retry_max: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            backend: BrokerBackendConfig::None,
            flush_timeout: Duration::from_secs(5),
            retry_min: Duration::from_secs(2),
            retry_max: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone)]
pub enum BrokerBackendConfig {
    /// No broker to provision (the default): nothing is queued.
    None,
    /// Mosquitto's dynamic-security plugin, driven over MQTT.
    Mosquitto(MosquittoConfig),
}

#[derive(Debug, Clone)]
pub struct MosquittoConfig {
    /// Host name or IP address (no brackets).
    pub host: String,
    pub port: u16,
    /// `mqtts://`: verify the broker with these anchors, optionally present a
    /// client certificate. `None` (`mqtt://`): plain TCP, loopback only.
    pub tls: Option<BrokerTlsConfig>,
    /// The dynamic-security admin user keyward connects as.
    pub username: String,
    pub password: SecretSetting,
    /// One command round trip (connect, send, answer); at least one second.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct BrokerTlsConfig {
    /// PEM trust anchors for the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate chain and key, when the admin listener wants one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Pepper for hashing admin tokens and registration secrets (HMAC-SHA-256 key).
    pub token_pepper: SecretSetting,
    /// Device access tokens (`POST /v1/auth/token`).
    pub tokens: TokenConfig,
}

/// Device access tokens: `[auth] token_*` (docs/auth.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    /// Lifetime of an access token (`token_ttl_seconds`, 10..=3600, default 900).
    pub ttl_seconds: i64,
    /// The `iss` claim: `token_issuer`, else `server.public_url`, else `keyward`.
    pub issuer: String,
    /// The `aud` claim (`token_audience`, default `keyward-devices`).
    pub audience: String,
    /// A second request by the same certificate within this many seconds of
    /// an issuance gets the cached token back, unsigned again
    /// (`token_reuse_seconds`, 0..=ttl/2, default 60; 0 turns reuse off).
    pub reuse_seconds: i64,
    /// How long a rotation publishes the next key in JWKS before it signs
    /// (`token_key_overlap_seconds`, 1..=604800, default 3600; keep it above
    /// the JWKS cache lifetime, 60 s, or relying parties meet unknown kids).
    pub key_overlap_seconds: i64,
    /// The key store holding the `token-signing` key (default: the default one).
    pub keystore: String,
}

#[derive(Debug, Clone)]
pub struct PoliciesConfig {
    pub dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A valid `tracing` EnvFilter.
    pub level: String,
    pub format: LogFormat,
    /// Log sensitive details (device ids, key labels, policy bodies). Off by default.
    pub sensitive_details: bool,
}

/// `[jobs]`: how often the background jobs that have a setting run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsConfig {
    /// Between two rounds of `device.renewal_due` notices (1..=86400 s,
    /// default 600).
    pub renewal_notice_interval: Duration,
    /// Between two refreshes of the gauges read from the store (approval
    /// queue, certificates by expiry, key ages; 1..=3600 s, default 30).
    pub metrics_refresh_interval: Duration,
}

/// `[limits]`: per-source rate limits (`burst` per `window`), the
/// failed-login audit window and the readiness staleness bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// `POST /v1/registrations` per source (1..=1000000) per window (at least 1 s).
    pub registrations_per_source: u32,
    pub registrations_window: Duration,
    /// Renewal nonces and renewals (`/v1/devices/{id}/renew...`) per source
    /// (1..=1000000) per window (at least 1 s).
    pub renewals_per_source: u32,
    pub renewals_window: Duration,
    /// Failed admin logins per source (1..=1000000) per window (at least 1 s).
    pub admin_login_failures_per_source: u32,
    pub admin_login_failures_window: Duration,
    /// Sources remembered by the rate limiter and the failed-login windows (16..=10000000).
    pub tracked_sources: usize,
    pub login_failure_audit_window: Duration,
    /// `/readyz` is false when the last background check is older.
    pub readiness_max_age: Duration,
    /// Freshly signed OCSP responses (nonce, several CertIDs, unknown
    /// serials) per source (1..=1000000) per window (at least 1 s).
    pub ocsp_fresh_per_source: u32,
    pub ocsp_fresh_window: Duration,
    /// Pre-signed OCSP responses kept in memory (16..=10000000).
    pub ocsp_cache_entries: usize,
}

/// One `[[notify]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifierConfig {
    /// An `info` line at target `keyward::notify`.
    Log {
        /// Queued notifications beyond which new ones are dropped (1..=1000000).
        queue_capacity: usize,
    },
    Webhook(WebhookConfig),
    Smtp(SmtpConfig),
}

/// `type = "smtp"`: a plain-text mail per notification (docs/notifications.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpConfig {
    /// A DNS name or an IP address; also the name the TLS certificate must carry.
    pub host: String,
    /// Default 587 (starttls), 465 (tls), 25 (none).
    pub port: u16,
    pub tls: crate::notify::SmtpTls,
    /// PEM CA(s) trusted instead of the system roots (only with TLS).
    pub ca_file: Option<PathBuf>,
    /// `AUTH` user name; with it, `password` (`password_file` xor `password_env`).
    pub username: Option<String>,
    pub password: Option<SecretSetting>,
    pub helo_name: Option<String>,
    pub from: crate::notify::Mailbox,
    /// Get `registration.pending`.
    pub approvers: Vec<crate::notify::Mailbox>,
    /// Get rotation, backup and renewal notifications.
    pub admins: Vec<crate::notify::Mailbox>,
    /// One attempt in all (1..=300 s). Default 30 s.
    pub timeout: Duration,
    /// Attempts in all (1..=20). Default 5.
    pub max_attempts: u32,
    /// Wait after the first failed attempt, doubled after each (10 ms..=60 s). Default 1 s.
    pub initial_backoff: Duration,
    /// Cap on the wait (1..=3600 s). Default 60 s.
    pub max_backoff: Duration,
    pub queue_capacity: usize,
}

/// `type = "webhook"`: a signed POST per notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// `https://`, or `http://` to a loopback host only.
    pub url: crate::notify::WebhookUrl,
    /// The HMAC key (`secret_file` xor `secret_env`; at least 16 bytes, checked when read).
    pub secret: SecretSetting,
    /// Per attempt (1..=300 s). Default 5 s.
    pub timeout: Duration,
    /// Attempts in all (1..=20). Default 5.
    pub max_attempts: u32,
    /// Wait after the first failed attempt, doubled after each (10 ms..=60 s). Default 1 s.
    pub initial_backoff: Duration,
    /// Cap on the wait and on a `Retry-After` (1..=3600 s). Default 60 s.
    pub max_backoff: Duration,
    pub queue_capacity: usize,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Config {
    /// Reads, parses and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        Self::from_toml(&text, path, &base_dir)
    }

    /// Parses and checks TOML text; `path` names it in errors and relative
    /// paths resolve against `base_dir`. Reads no file.
    pub fn from_toml(text: &str, path: &Path, base_dir: &Path) -> Result<Self, ConfigError> {
        let raw: file::File = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        Builder { path, base_dir }.build(raw)
    }

    /// Every configured key store with its name, the default first.
    pub fn all_keystores(&self) -> Vec<(&str, &KeyStoreConfig)> {
        std::iter::once((DEFAULT_KEYSTORE, &self.keystore))
            .chain(self.keystores.iter().map(|(n, k)| (n.as_str(), k)))
            .collect()
    }

    /// Every secret the config points at, so that `config check` can read
    /// them (without using them) and catch a missing file or variable.
    pub fn secrets(&self) -> Vec<&SecretSetting> {
        let mut out = Vec::new();
        for (_, ks) in self.all_keystores() {
            match ks {
                KeyStoreConfig::Pkcs11(k) => out.push(&k.pin),
                KeyStoreConfig::Yubikey(y) => {
                    out.push(&y.pin);
                    out.push(&y.management_key);
                }
            }
        }
        out.push(&self.auth.token_pepper);
        if let StoreConfig::Postgres(p) = &self.store {
            out.extend(p.password.iter());
        }
        if let BrokerBackendConfig::Mosquitto(m) = &self.broker.backend {
            out.push(&m.password);
        }
        for n in &self.notify {
            match n {
                NotifierConfig::Webhook(w) => out.push(&w.secret),
                NotifierConfig::Smtp(m) => out.extend(m.password.iter()),
                NotifierConfig::Log { .. } => {}
            }
        }
        for l in self.backup.iter().flat_map(|b| &b.locations) {
            if let BackupLocationKind::S3(s3) = &l.kind {
                out.extend(s3.access_key_id.iter());
                out.extend(s3.secret_access_key.iter());
            }
        }
        out
    }
}

/// `mqtt[s]://host[:port]` (IPv6 in brackets) → (TLS?, host, port); no
/// path, credentials, query or fragment.
fn parse_mqtt_url(url: &str) -> Result<(bool, String, u16), String> {
    let (secure, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err("must start with mqtts:// or mqtt://".into());
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty()
        || rest.contains(['/', '@', '?', '#'])
        || rest
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || !c.is_ascii())
    {
        return Err("must be mqtt[s]://host[:port] with no credentials, path or query".into());
    }
    let default_port = if secure { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| "unclosed `[` in the host".to_string())?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| "expected `:port` after `]`".to_string())?,
            ),
        };
        (h.to_string(), port)
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err("the host is missing".into());
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("port `{p}` is not 1-65535")),
        },
    };
    Ok((secure, host, port))
}

/// Turns the file as written into [`Config`], naming the key of every refusal.
struct Builder<'a> {
    path: &'a Path,
    base_dir: &'a Path,
}

impl Builder<'_> {
    fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    fn range<T: PartialOrd + std::fmt::Display + Copy>(
        &self,
        key: &str,
        value: Option<T>,
        default: T,
        min: T,
        max: T,
    ) -> Result<T, ConfigError> {
        let v = value.unwrap_or(default);
        if v < min || v > max {
            return Err(self.invalid(key, format!("must be between {min} and {max}")));
        }
        Ok(v)
    }

    fn seconds(
        &self,
        key: &str,
        value: Option<u64>,
        default: u64,
    ) -> Result<Duration, ConfigError> {
        match value.unwrap_or(default) {
            0 => Err(self.invalid(key, "must be at least 1")),
            s => Ok(Duration::from_secs(s)),
        }
    }

    /// `[store] type = "postgres"`. The URL must parse and must not carry
    /// a password (it would sit in the config file and show in `ps` of
    /// tools given the URL): `password_file` or `password_env` instead.
    fn postgres(&self, p: file::Postgres) -> Result<PostgresConfig, ConfigError> {
        let parsed: tokio_postgres::Config = p
            .url
            .parse()
            .map_err(|_| self.invalid("store.url", "not a PostgreSQL connection URL"))?;
        if parsed.get_password().is_some() {
            return Err(self.invalid(
                "store.url",
                "must not contain a password: use store.password_file or store.password_env",
            ));
        }
        if parsed.get_dbname().is_none() {
            return Err(self.invalid("store.url", "must name a database (…/keyward)"));
        }
        let password = match (&p.password_file, &p.password_env) {
            (None, None) => None,
            _ => Some(self.secret("store.password", p.password_file, p.password_env)?),
        };
        Ok(PostgresConfig {
            url: p.url,
            password,
            pool_size: self.range("store.pool_size", p.pool_size, 8, 1, 64)?,
            batch_max: self.range("store.batch_max", p.batch_max, 256, 1, 10_000)?,
        })
    }

    /// `<key>_file` xor `<key>_env`.
    fn secret(
        &self,
        key: &str,
        file: Option<PathBuf>,
        env: Option<String>,
    ) -> Result<SecretSetting, ConfigError> {
        let from = match (file, env) {
            (Some(_), Some(_)) => {
                return Err(
                    self.invalid(key, format!("set only one of `{key}_file` and `{key}_env`"))
                );
            }
            (None, None) => {
                return Err(self.invalid(
                    key,
                    format!("missing: set `{key}_file` (a path) or `{key}_env` (an environment variable name); secrets never come from the command line"),
                ));
            }
            (Some(f), None) => SecretRef::File(self.resolve(&f)),
            (None, Some(v)) if v.is_empty() => {
                return Err(self.invalid(&format!("{key}_env"), "must name a variable"));
            }
            (None, Some(v)) => SecretRef::Env(v),
        };
        Ok(SecretSetting {
            key: key.to_string(),
            from,
        })
    }

    /// An http(s) URL with a host, no query or fragment, no credentials, no
    /// whitespace; the trailing slash is dropped.
    fn public_url(&self, url: &str) -> Result<String, ConfigError> {
        let key = "server.public_url";
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| self.invalid(key, "must start with https:// or http://"))?;
        let host = rest.split('/').next().unwrap_or("");
        if host.is_empty()
            || host.contains('@')
            || url.contains(['?', '#'])
            || url
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || !c.is_ascii())
        {
            return Err(self.invalid(
                key,
                "must be an ASCII http(s) URL with a host and no credentials, query or fragment",
            ));
        }
        Ok(url.trim_end_matches('/').to_string())
    }

    fn build(&self, raw: file::File) -> Result<Config, ConfigError> {
        let server = ServerConfig {
            listen: raw
                .server
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            body_limit_bytes: self.range(
                "server.body_limit_bytes",
                raw.server.body_limit_bytes,
                64 * 1024,
                1024,
                16 * 1024 * 1024,
            )?,
            request_timeout: self.seconds(
                "server.request_timeout_secs",
                raw.server.request_timeout_secs,
                30,
            )?,
            trusted_proxies: raw
                .server
                .trusted_proxies
                .unwrap_or_default()
                .iter()
                .map(|p| {
                    p.parse().map_err(|e: crate::model::IpNetError| {
                        self.invalid("server.trusted_proxies", e.to_string())
                    })
                })
                .collect::<Result<_, _>>()?,
            public_url: raw
                .server
                .public_url
                .map(|u| self.public_url(&u))
                .transpose()?,
            tls: None,
        };
        let server = ServerConfig {
            tls: match raw.server.tls {
                Some(t) => Some(self.tls(t)?),
                None => None,
            },
            ..server
        };
        if server.tls.is_none() && !server.listen.ip().is_loopback() {
            return Err(self.invalid(
                "server.tls",
                format!(
                    "missing: server.listen = \"{}\" is not a loopback address, and plain HTTP \
                     is allowed only on loopback (bearer tokens would cross the network in \
                     clear); add [server.tls] with certificate_file + key_file, or issue = true",
                    server.listen
                ),
            ));
        }
        let store = match raw.store {
            file::Store::Sqlite(s) => StoreConfig::Sqlite(SqliteConfig {
                path: self.resolve(&s.path),
                batch_max: self.range("store.batch_max", s.batch_max, 256, 1, 10_000)?,
            }),
            file::Store::Postgres(p) => StoreConfig::Postgres(self.postgres(p)?),
        };
        let keystore = self.keystore("keystore", raw.keystore)?;
        let mut keystores = BTreeMap::new();
        for (name, ks) in raw.keystores {
            let prefix = format!("keystores.{name}");
            if name == DEFAULT_KEYSTORE || !crate::model::valid_name(&name) {
                return Err(self.invalid(
                    &prefix,
                    "name must be 1-64 chars of a-z, 0-9, '-' and not `default`",
                ));
            }
            keystores.insert(name, self.keystore(&prefix, ks)?);
        }
        let ttl_seconds = self.range(
            "auth.token_ttl_seconds",
            raw.auth.token_ttl_seconds,
            900,
            10,
            3600,
        )? as i64;
        let issuer = match raw.auth.token_issuer {
            Some(i) if i.trim().is_empty() || i.chars().any(|c| c.is_control()) => {
                return Err(self.invalid("auth.token_issuer", "must be a non-empty name or URL"));
            }
            Some(i) => i,
            None => server
                .public_url
                .clone()
                .unwrap_or_else(|| "keyward".to_string()),
        };
        let audience = match raw.auth.token_audience {
            Some(a) if a.trim().is_empty() || a.chars().any(|c| c.is_control()) => {
                return Err(self.invalid("auth.token_audience", "must be a non-empty name"));
            }
            Some(a) => a,
            None => "keyward-devices".to_string(),
        };
        let reuse_seconds = self.range(
            "auth.token_reuse_seconds",
            raw.auth.token_reuse_seconds,
            60.min(ttl_seconds as u64 / 2),
            0,
            ttl_seconds as u64 / 2,
        )? as i64;
        let key_overlap_seconds = self.range(
            "auth.token_key_overlap_seconds",
            raw.auth.token_key_overlap_seconds,
            3600,
            1,
            604_800,
        )? as i64;
        let token_keystore = raw
            .auth
            .token_keystore
            .unwrap_or_else(|| DEFAULT_KEYSTORE.to_string());
        let auth = AuthConfig {
            token_pepper: self.secret(
                "auth.token_pepper",
                raw.auth.token_pepper_file,
                raw.auth.token_pepper_env,
            )?,
            tokens: TokenConfig {
                ttl_seconds,
                issuer,
                audience,
                reuse_seconds,
                key_overlap_seconds,
                keystore: token_keystore,
            },
        };
        let policies = PoliciesConfig {
            dir: self.resolve(
                raw.policies
                    .dir
                    .as_deref()
                    .unwrap_or_else(|| Path::new("policies")),
            ),
        };
        let level = raw.log.level.unwrap_or_else(|| "info".to_string());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(self.invalid(
                "log.level",
                "not a valid tracing filter (e.g. `info`, `keyward=debug`)",
            ));
        }
        let log = LogConfig {
            level,
            format: raw.log.format.unwrap_or_default(),
            sensitive_details: raw.log.sensitive_details.unwrap_or(false),
        };
        let l = raw.limits;
        let limits = LimitsConfig {
            registrations_per_source: self.range(
                "limits.registrations_per_source",
                l.registrations_per_source,
                30,
                1,
                1_000_000,
            )?,
            registrations_window: self.seconds(
                "limits.registrations_window_secs",
                l.registrations_window_secs,
                60,
            )?,
            renewals_per_source: self.range(
                "limits.renewals_per_source",
                l.renewals_per_source,
                60,
                1,
                1_000_000,
            )?,
            renewals_window: self.seconds(
                "limits.renewals_window_secs",
                l.renewals_window_secs,
                60,
            )?,
            admin_login_failures_per_source: self.range(
                "limits.admin_login_failures_per_source",
                l.admin_login_failures_per_source,
                10,
                1,
                1_000_000,
            )?,
            admin_login_failures_window: self.seconds(
                "limits.admin_login_failures_window_secs",
                l.admin_login_failures_window_secs,
                300,
            )?,
            tracked_sources: self.range(
                "limits.tracked_sources",
                l.tracked_sources,
                100_000,
                16,
                10_000_000,
            )?,
            login_failure_audit_window: self.seconds(
                "limits.login_failure_audit_window_secs",
                l.login_failure_audit_window_secs,
                60,
            )?,
            readiness_max_age: self.seconds(
                "limits.readiness_max_age_secs",
                l.readiness_max_age_secs,
                30,
            )?,
            ocsp_fresh_per_source: self.range(
                "limits.ocsp_fresh_per_source",
                l.ocsp_fresh_per_source,
                60,
                1,
                1_000_000,
            )?,
            ocsp_fresh_window: self.seconds(
                "limits.ocsp_fresh_window_secs",
                l.ocsp_fresh_window_secs,
                60,
            )?,
            ocsp_cache_entries: self.range(
                "limits.ocsp_cache_entries",
                l.ocsp_cache_entries,
                100_000,
                16,
                10_000_000,
            )?,
        };
        let jobs = JobsConfig {
            renewal_notice_interval: Duration::from_secs(self.range(
                "jobs.renewal_notice_interval_seconds",
                raw.jobs.renewal_notice_interval_seconds,
                600,
                1,
                86_400,
            )?),
            metrics_refresh_interval: Duration::from_secs(self.range(
                "jobs.metrics_refresh_interval_seconds",
                raw.jobs.metrics_refresh_interval_seconds,
                30,
                1,
                3_600,
            )?),
        };
        let broker = self.broker(raw.broker)?;
        let scheduler = self.scheduler(raw.scheduler)?;
        let backup = raw.backup.map(|b| self.backup(b)).transpose()?;
        let audit = self.audit(raw.audit, &keystores)?;
        let redis = raw.redis.map(|r| self.redis(r)).transpose()?;
        if auth.tokens.keystore != DEFAULT_KEYSTORE
            && !keystores.contains_key(&auth.tokens.keystore)
        {
            return Err(self.invalid(
                "auth.token_keystore",
                format!(
                    "no key store named `{}` is configured",
                    auth.tokens.keystore
                ),
            ));
        }
        if !matches!(broker.backend, BrokerBackendConfig::None)
            && broker.flush_timeout >= server.request_timeout
        {
            return Err(self.invalid(
                "broker.flush_timeout_secs",
                "must be less than server.request_timeout_secs (a revocation waits this long for the broker before it answers)",
            ));
        }
        let notify = if raw.notify.is_empty() {
            vec![NotifierConfig::Log {
                queue_capacity: crate::notify::DEFAULT_QUEUE_CAPACITY,
            }]
        } else {
            raw.notify
                .into_iter()
                .enumerate()
                .map(|(i, n)| self.notifier(i, n))
                .collect::<Result<_, _>>()?
        };
        Ok(Config {
            server,
            store,
            keystore,
            keystores,
            auth,
            policies,
            log,
            limits,
            broker,
            jobs,
            scheduler,
            notify,
            backup,
            audit,
            redis,
            base_dir: self.base_dir.to_path_buf(),
            source_path: self.path.to_path_buf(),
        })
    }

    fn audit(
        &self,
        a: file::Audit,
        keystores: &BTreeMap<String, KeyStoreConfig>,
    ) -> Result<AuditConfig, ConfigError> {
        let d = AuditConfig::default();
        let keystore = a.keystore.unwrap_or(d.keystore);
        if keystore != DEFAULT_KEYSTORE && !keystores.contains_key(&keystore) {
            return Err(self.invalid(
                "audit.keystore",
                format!("no key store named `{keystore}` is configured"),
            ));
        }
        let key_algorithm = match a.key_algorithm {
            None => d.key_algorithm,
            Some(s) => s
                .parse::<crate::model::KeyAlgorithm>()
                .map_err(|e| self.invalid("audit.key_algorithm", e.to_string()))?,
        };
        let checkpoint_interval = self.seconds(
            "audit.checkpoint_interval_secs",
            a.checkpoint_interval_secs,
            60,
        )?;
        if checkpoint_interval > Duration::from_secs(86_400) {
            return Err(self.invalid("audit.checkpoint_interval_secs", "at most 86400 (a day)"));
        }
        let verify_interval =
            self.seconds("audit.verify_interval_secs", a.verify_interval_secs, 300)?;
        if !(10..=86_400).contains(&verify_interval.as_secs()) {
            return Err(self.invalid("audit.verify_interval_secs", "between 10 and 86400"));
        }
        Ok(AuditConfig {
            keystore,
            key_algorithm,
            checkpoint_every_events: self.range(
                "audit.checkpoint_every_events",
                a.checkpoint_every_events,
                d.checkpoint_every_events,
                1,
                10_000_000,
            )?,
            checkpoint_interval,
            checkpoint_file: a.checkpoint_file.map(|p| self.resolve(&p)),
            verify_interval,
            encrypt_details: a.encrypt_details.unwrap_or(d.encrypt_details),
            sink: a.sink.map(|s| self.audit_sink(s)).transpose()?,
        })
    }

    fn audit_sink(
        &self,
        s: file::AuditSink,
    ) -> Result<crate::audit::sink::SinkConfig, ConfigError> {
        use crate::audit::sink::{SinkConfig, SinkPolicy, SinkTarget};
        let target = match (s.kind.as_str(), s.path, s.address) {
            ("file", Some(p), None) => SinkTarget::File(self.resolve(&p)),
            ("file", _, _) => {
                return Err(self.invalid(
                    "audit.sink",
                    "type = \"file\" takes `path` (and no `address`)",
                ));
            }
            ("syslog", None, Some(a)) => {
                if std::net::ToSocketAddrs::to_socket_addrs(a.as_str()).is_err() {
                    return Err(
                        self.invalid("audit.sink.address", format!("`{a}` is not host:port"))
                    );
                }
                SinkTarget::SyslogUdp(a)
            }
            ("syslog", Some(p), None) => SinkTarget::SyslogUnix(self.resolve(&p)),
            ("syslog", _, _) => {
                return Err(self.invalid(
                    "audit.sink",
                    "type = \"syslog\" takes either `address` (host:port, UDP) or `path` (a unix datagram socket)",
                ));
            }
            (other, _, _) => {
                return Err(self.invalid(
                    "audit.sink.type",
                    format!("unknown sink type `{other}` (file, syslog)"),
                ));
            }
        };
        let policy = match s.policy.as_deref() {
            None => SinkPolicy::FailClosed,
            Some(p) => SinkPolicy::parse(p).ok_or_else(|| {
                self.invalid(
                    "audit.sink.policy",
                    format!("unknown policy `{p}` (fail-closed, buffer)"),
                )
            })?,
        };
        let buffer_max = self.range(
            "audit.sink.buffer_max",
            s.buffer_max,
            100_000,
            1,
            10_000_000,
        )?;
        Ok(SinkConfig {
            target,
            policy,
            buffer_max: buffer_max as usize,
        })
    }

    fn backup(&self, b: file::Backup) -> Result<BackupConfig, ConfigError> {
        use crate::policy::Schedule;
        if b.recipients_files.is_empty() {
            return Err(self.invalid(
                "backup.recipients_files",
                "name at least one age recipients file (`age1…` or `ssh-ed25519`/`ssh-rsa` lines)",
            ));
        }
        let cron = |key: &str, v: Option<String>| {
            v.map(|s| Schedule::parse(&s).map_err(|e| self.invalid(key, e)))
                .transpose()
        };
        let retry_min = self.seconds("backup.retry_min_secs", b.retry_min_secs, 30)?;
        let retry_max = self.seconds("backup.retry_max_secs", b.retry_max_secs, 3600)?;
        if retry_max < retry_min {
            return Err(self.invalid(
                "backup.retry_max_secs",
                "must not be less than backup.retry_min_secs",
            ));
        }
        let mut locations: Vec<BackupLocationConfig> = Vec::new();
        for (i, l) in b.locations.into_iter().enumerate() {
            let at = |k: &str| format!("backup.locations[{i}].{k}");
            if l.name.is_empty()
                || !l
                    .name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            {
                return Err(
                    self.invalid(&at("name"), "must be non-empty letters, digits, `-` or `_`")
                );
            }
            if locations.iter().any(|o| o.name == l.name) {
                return Err(self.invalid(&at("name"), format!("`{}` is used twice", l.name)));
            }
            let s3_only = l.bucket.is_some()
                || l.prefix.is_some()
                || l.endpoint.is_some()
                || l.region.is_some()
                || l.allow_http.is_some()
                || l.access_key_id_file.is_some()
                || l.access_key_id_env.is_some()
                || l.secret_access_key_file.is_some()
                || l.secret_access_key_env.is_some();
            let kind = match l.kind.as_str() {
                "dir" => {
                    if s3_only {
                        return Err(self.invalid(&at("type"), "a `dir` location takes only `path`"));
                    }
                    let path = l.path.ok_or_else(|| self.invalid(&at("path"), "missing"))?;
                    BackupLocationKind::Dir {
                        path: self.resolve(&path),
                    }
                }
                "s3" => {
                    if l.path.is_some() {
                        return Err(self.invalid(
                            &at("path"),
                            "an `s3` location takes `bucket` and `prefix`, not `path`",
                        ));
                    }
                    let bucket = l
                        .bucket
                        .filter(|b| !b.is_empty())
                        .ok_or_else(|| self.invalid(&at("bucket"), "missing"))?;
                    let mut prefix = l.prefix.unwrap_or_default();
                    if prefix.starts_with('/') || prefix.contains("..") {
                        return Err(self.invalid(&at("prefix"), "must be relative, without `..`"));
                    }
                    if !prefix.is_empty() && !prefix.ends_with('/') {
                        prefix.push('/');
                    }
                    let allow_http = l.allow_http.unwrap_or(false);
                    if let Some(e) = &l.endpoint {
                        let url = url::Url::parse(e)
                            .map_err(|err| self.invalid(&at("endpoint"), err.to_string()))?;
                        match url.scheme() {
                            "https" => {}
                            "http" if allow_http => {}
                            "http" => {
                                return Err(self.invalid(
                                    &at("endpoint"),
                                    "is plain HTTP: set `allow_http = true` to accept it (credentials and archives would cross the network unencrypted)",
                                ));
                            }
                            other => {
                                return Err(self.invalid(
                                    &at("endpoint"),
                                    format!("unsupported scheme `{other}`"),
                                ));
                            }
                        }
                    }
                    let key_set = l.access_key_id_file.is_some() || l.access_key_id_env.is_some();
                    let secret_set =
                        l.secret_access_key_file.is_some() || l.secret_access_key_env.is_some();
                    let (access_key_id, secret_access_key) = match (key_set, secret_set) {
                        (false, false) => (None, None),
                        (true, true) => (
                            Some(self.secret(
                                &at("access_key_id"),
                                l.access_key_id_file,
                                l.access_key_id_env,
                            )?),
                            Some(self.secret(
                                &at("secret_access_key"),
                                l.secret_access_key_file,
                                l.secret_access_key_env,
                            )?),
                        ),
                        _ => {
                            return Err(self.invalid(
                                &at("access_key_id"),
                                "set both the access key id and the secret access key (each `_file` or `_env`), or neither",
                            ));
                        }
                    };
                    BackupLocationKind::S3(S3LocationConfig {
                        bucket,
                        prefix,
                        endpoint: l.endpoint,
                        region: l.region.unwrap_or_else(|| "us-east-1".to_string()),
                        allow_http,
                        access_key_id,
                        secret_access_key,
                    })
                }
                other => {
                    return Err(
                        self.invalid(&at("type"), format!("`{other}` is not `dir` or `s3`"))
                    );
                }
            };
            locations.push(BackupLocationConfig {
                name: l.name,
                kind,
                timeout: self.seconds(&at("timeout_secs"), l.timeout_secs, 300)?,
            });
        }
        Ok(BackupConfig {
            dir: self.resolve(&b.dir),
            recipients_files: b.recipients_files.iter().map(|p| self.resolve(p)).collect(),
            verify_identity_file: b.verify_identity_file.map(|p| self.resolve(&p)),
            schedule: cron("backup.schedule", b.schedule)?,
            verify_schedule: cron("backup.verify_schedule", b.verify_schedule)?,
            keep_daily: self.range("backup.keep_daily", b.keep_daily, 7, 0, 3660)?,
            keep_weekly: self.range("backup.keep_weekly", b.keep_weekly, 4, 0, 520)?,
            retry_min,
            retry_max,
            locations,
        })
    }

    fn scheduler(&self, s: file::Scheduler) -> Result<SchedulerConfig, ConfigError> {
        let Some(secs) = s.lease_seconds else {
            return Ok(SchedulerConfig::default());
        };
        let (min, max) = (SchedulerConfig::MIN_LEASE, SchedulerConfig::MAX_LEASE);
        if !secs.is_finite() || secs < min.as_secs_f64() || secs > max.as_secs_f64() {
            return Err(self.invalid(
                "scheduler.lease_seconds",
                format!(
                    "must be between {} and {} seconds (fractions allowed, e.g. 1.5)",
                    min.as_secs(),
                    max.as_secs()
                ),
            ));
        }
        Ok(SchedulerConfig {
            lease: Duration::from_millis((secs * 1000.0).round() as u64),
        })
    }

    fn redis(&self, r: file::Redis) -> Result<RedisConfig, ConfigError> {
        use ::redis::IntoConnectionInfo;
        let url = r
            .url
            .filter(|u| !u.is_empty())
            .ok_or_else(|| self.invalid("redis.url", "missing (e.g. redis://127.0.0.1:6379/0)"))?;
        if !["redis://", "unix://", "redis+unix://"]
            .iter()
            .any(|s| url.starts_with(s))
        {
            return Err(self.invalid(
                "redis.url",
                "must start with redis:// (or unix:// for a socket); rediss:// (TLS) is not supported by this build",
            ));
        }
        // Checked before parsing, so the error never echoes the secret.
        let authority = url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split(['/', '?']).next())
            .unwrap_or("");
        let userinfo_has_password = authority
            .rsplit_once('@')
            .is_some_and(|(userinfo, _)| userinfo.contains(':'));
        let query_has_password = url
            .split_once('?')
            .is_some_and(|(_, q)| q.split('&').any(|kv| kv.starts_with("pass")));
        if userinfo_has_password || query_has_password {
            return Err(self.invalid(
                "redis.url",
                "must not contain a password (it would show in config dumps and logs); use redis.password_file or redis.password_env",
            ));
        }
        let info = url
            .as_str()
            .into_connection_info()
            .map_err(|e| self.invalid("redis.url", format!("not a valid Redis URL ({e})")))?;
        if info.redis_settings().password().is_some() {
            return Err(self.invalid(
                "redis.url",
                "must not contain a password; use redis.password_file or redis.password_env",
            ));
        }
        let password = if r.password_file.is_some() || r.password_env.is_some() {
            Some(self.secret("redis.password", r.password_file, r.password_env)?)
        } else {
            None
        };
        let key_prefix = r
            .key_prefix
            .unwrap_or_else(|| DEFAULT_REDIS_PREFIX.to_string());
        if key_prefix.is_empty()
            || key_prefix.len() > 64
            || key_prefix
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(self.invalid(
                "redis.key_prefix",
                "must be 1-64 characters without spaces or control characters (e.g. \"keyward:\")",
            ));
        }
        Ok(RedisConfig {
            url,
            password,
            key_prefix,
        })
    }

    fn broker(&self, b: file::Broker) -> Result<BrokerConfig, ConfigError> {
        let defaults = BrokerConfig::default();
        let flush_timeout = self.seconds(
            "broker.flush_timeout_secs",
            b.flush_timeout_secs,
            defaults.flush_timeout.as_secs(),
        )?;
        let retry_min = self.seconds(
            "broker.retry_min_secs",
            b.retry_min_secs,
            defaults.retry_min.as_secs(),
        )?;
        let retry_max = self.seconds(
            "broker.retry_max_secs",
            b.retry_max_secs,
            defaults.retry_max.as_secs(),
        )?;
        if retry_max < retry_min {
            return Err(self.invalid(
                "broker.retry_max_secs",
                "must not be less than broker.retry_min_secs",
            ));
        }
        let backend = match b.kind.as_deref().unwrap_or("none") {
            "none" => {
                let set = [
                    ("url", b.url.is_some()),
                    ("ca_file", b.ca_file.is_some()),
                    ("client_cert_file", b.client_cert_file.is_some()),
                    ("client_key_file", b.client_key_file.is_some()),
                    ("username", b.username.is_some()),
                    ("password_file", b.password_file.is_some()),
                    ("password_env", b.password_env.is_some()),
                    ("timeout_secs", b.timeout_secs.is_some()),
                ];
                if let Some((key, _)) = set.iter().find(|(_, on)| *on) {
                    return Err(
                        self.invalid(&format!("broker.{key}"), "only with type = \"mosquitto\"")
                    );
                }
                BrokerBackendConfig::None
            }
            "mosquitto" => BrokerBackendConfig::Mosquitto(self.mosquitto(b)?),
            other => {
                return Err(self.invalid(
                    "broker.type",
                    format!("unknown broker type `{other}` (none, mosquitto)"),
                ));
            }
        };
        Ok(BrokerConfig {
            backend,
            flush_timeout,
            retry_min,
            retry_max,
        })
    }

    fn mosquitto(&self, b: file::Broker) -> Result<MosquittoConfig, ConfigError> {
        let url = b
            .url
            .ok_or_else(|| self.invalid("broker.url", "missing (e.g. mqtts://broker:8883)"))?;
        let (secure, host, port) =
            parse_mqtt_url(&url).map_err(|reason| self.invalid("broker.url", reason))?;
        let tls = if secure {
            let ca_file = b.ca_file.ok_or_else(|| {
                self.invalid(
                    "broker.ca_file",
                    "missing: mqtts:// needs the PEM CA that signed the broker's certificate",
                )
            })?;
            let client_cert = match (b.client_cert_file, b.client_key_file) {
                (Some(c), Some(k)) => Some((self.resolve(&c), self.resolve(&k))),
                (None, None) => None,
                _ => {
                    return Err(self.invalid(
                        "broker.client_cert_file",
                        "set both client_cert_file and client_key_file, or neither",
                    ));
                }
            };
            Some(BrokerTlsConfig {
                ca_file: self.resolve(&ca_file),
                client_cert,
            })
        } else {
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(self.invalid(
                    "broker.url",
                    "mqtt:// (plain TCP) is allowed only to a loopback address: the admin \
                     password and every ACL change would cross the network in clear; use mqtts://",
                ));
            }
            for (key, set) in [
                ("ca_file", b.ca_file.is_some()),
                ("client_cert_file", b.client_cert_file.is_some()),
                ("client_key_file", b.client_key_file.is_some()),
            ] {
                if set {
                    return Err(self.invalid(&format!("broker.{key}"), "only with an mqtts:// url"));
                }
            }
            None
        };
        let username = b.username.filter(|u| !u.is_empty()).ok_or_else(|| {
            self.invalid(
                "broker.username",
                "missing: the dynamic-security admin user",
            )
        })?;
        if username.len() > 256 || username.chars().any(char::is_control) {
            return Err(self.invalid("broker.username", "must be 1-256 printable characters"));
        }
        Ok(MosquittoConfig {
            host,
            port,
            tls,
            username,
            password: self.secret("broker.password", b.password_file, b.password_env)?,
            timeout: self.seconds("broker.timeout_secs", b.timeout_secs, 10)?,
        })
    }

    fn notifier(&self, i: usize, raw: file::Notify) -> Result<NotifierConfig, ConfigError> {
        let key = |k: &str| format!("notify[{i}].{k}");
        let queue = |q: Option<usize>| {
            self.range(
                &key("queue_capacity"),
                q,
                crate::notify::DEFAULT_QUEUE_CAPACITY,
                1,
                1_000_000,
            )
        };
        match raw {
            file::Notify::Log(l) => Ok(NotifierConfig::Log {
                queue_capacity: queue(l.queue_capacity)?,
            }),
            file::Notify::Webhook(w) => {
                let url = crate::notify::WebhookUrl::parse(&w.url)
                    .map_err(|e| self.invalid(&key("url"), e.to_string()))?;
                let secs = |k: &str, v: Option<u64>, default: u64, max: u64| {
                    self.range(&key(k), v, default, 1, max)
                        .map(Duration::from_secs)
                };
                let timeout = secs("timeout_seconds", w.timeout_seconds, 5, 300)?;
                let max_backoff = secs("max_backoff_seconds", w.max_backoff_seconds, 60, 3600)?;
                let initial_backoff = Duration::from_millis(self.range(
                    &key("initial_backoff_ms"),
                    w.initial_backoff_ms,
                    1000,
                    10,
                    60_000,
                )?);
                if initial_backoff > max_backoff {
                    return Err(self.invalid(
                        &key("initial_backoff_ms"),
                        "must not exceed max_backoff_seconds",
                    ));
                }
                Ok(NotifierConfig::Webhook(WebhookConfig {
                    url,
                    secret: self.secret(&key("secret"), w.secret_file, w.secret_env)?,
                    timeout,
                    max_attempts: self.range(&key("max_attempts"), w.max_attempts, 5, 1, 20)?,
                    initial_backoff,
                    max_backoff,
                    queue_capacity: queue(w.queue_capacity)?,
                }))
            }
            file::Notify::Smtp(m) => {
                let queue_capacity = queue(m.queue_capacity)?;
                self.smtp(i, m, queue_capacity).map(NotifierConfig::Smtp)
            }
        }
    }

    /// `[[notify]] type = "smtp"`: every address parsed, plaintext only
    /// where nothing secret crosses a network.
    fn smtp(
        &self,
        i: usize,
        m: file::NotifySmtp,
        queue_capacity: usize,
    ) -> Result<SmtpConfig, ConfigError> {
        use crate::notify::{Mailbox, SmtpTls};
        let key = |k: &str| format!("notify[{i}].{k}");
        // A DNS name (letters, digits, `-`, `.`, `_`) or an IP address.
        let name_ok = |h: &str| {
            h.parse::<std::net::IpAddr>().is_ok()
                || (!h.is_empty()
                    && h.len() <= 253
                    && !h.starts_with(['-', '.'])
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
        };
        if !name_ok(&m.host) {
            return Err(self.invalid(
                &key("host"),
                "must be a DNS name or an IP address (no scheme, port or path)",
            ));
        }
        let tls = match m.tls.as_deref().unwrap_or("starttls") {
            "none" => SmtpTls::None,
            "starttls" => SmtpTls::StartTls,
            "tls" => SmtpTls::Tls,
            other => {
                return Err(self.invalid(
                    &key("tls"),
                    format!("unknown value `{other}` (none, starttls, tls)"),
                ));
            }
        };
        let port = match m.port {
            Some(0) => return Err(self.invalid(&key("port"), "must be between 1 and 65535")),
            Some(p) => p,
            None => tls.default_port(),
        };
        let username = match m.username {
            Some(u) if u.is_empty() || u.len() > 256 || u.chars().any(char::is_control) => {
                return Err(self.invalid(&key("username"), "must be 1-256 printable characters"));
            }
            u => u,
        };
        let password = match (
            &username,
            m.password_file.is_some() || m.password_env.is_some(),
        ) {
            (Some(_), _) => Some(self.secret(&key("password"), m.password_file, m.password_env)?),
            (None, true) => {
                return Err(self.invalid(
                    &key("username"),
                    "missing: a password is set but no user name to go with it",
                ));
            }
            (None, false) => None,
        };
        let loopback = m.host.eq_ignore_ascii_case("localhost")
            || m.host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match (tls, m.allow_plaintext) {
            (SmtpTls::None, _) if username.is_some() && !loopback => {
                return Err(self.invalid(
                    &key("tls"),
                    "`none` with a user name would send the password in clear to a                      non-loopback host: use starttls or tls",
                ));
            }
            (SmtpTls::None, allow) if !loopback && allow != Some(true) => {
                return Err(self.invalid(
                    &key("tls"),
                    "`none` (plain SMTP) is allowed only to a loopback host unless                      allow_plaintext = true; use starttls or tls",
                ));
            }
            (SmtpTls::StartTls | SmtpTls::Tls, Some(_)) => {
                return Err(self.invalid(&key("allow_plaintext"), "only with tls = \"none\""));
            }
            _ => {}
        }
        if tls == SmtpTls::None && m.ca_file.is_some() {
            return Err(self.invalid(&key("ca_file"), "only with tls = \"starttls\" or \"tls\""));
        }
        if let Some(h) = &m.helo_name
            && (h.parse::<std::net::IpAddr>().is_ok() || !name_ok(h))
        {
            return Err(self.invalid(&key("helo_name"), "must be a DNS name"));
        }
        let mailbox = |k: String, v: &str| {
            v.parse::<Mailbox>().map_err(|e| {
                self.invalid(
                    &k,
                    format!(
                        "not a mail address (`user@example.net` or `Name <user@example.net>`): {e}"
                    ),
                )
            })
        };
        let from = mailbox(key("from"), &m.from)?;
        let list = |name: &str, values: &[String]| -> Result<Vec<Mailbox>, ConfigError> {
            let mut out: Vec<Mailbox> = Vec::with_capacity(values.len());
            for (j, v) in values.iter().enumerate() {
                let k = key(&format!("{name}[{j}]"));
                let mb = mailbox(k.clone(), v)?;
                if out.iter().any(|o| o.email == mb.email) {
                    return Err(self.invalid(&k, "listed twice"));
                }
                out.push(mb);
            }
            Ok(out)
        };
        let approvers = list("approvers", &m.approvers)?;
        let admins = list("admins", &m.admins)?;
        if approvers.is_empty() && admins.is_empty() {
            return Err(self.invalid(
                &key("approvers"),
                "no recipient: list addresses in `approvers` (pending registrations) and/or                  `admins` (rotations, backups, renewals)",
            ));
        }
        let secs = |k: &str, v: Option<u64>, default: u64, max: u64| {
            self.range(&key(k), v, default, 1, max)
                .map(Duration::from_secs)
        };
        let timeout = secs("timeout_seconds", m.timeout_seconds, 30, 300)?;
        let max_backoff = secs("max_backoff_seconds", m.max_backoff_seconds, 60, 3600)?;
        let initial_backoff = Duration::from_millis(self.range(
            &key("initial_backoff_ms"),
            m.initial_backoff_ms,
            1000,
            10,
            60_000,
        )?);
        if initial_backoff > max_backoff {
            return Err(self.invalid(
                &key("initial_backoff_ms"),
                "must not exceed max_backoff_seconds",
            ));
        }
        Ok(SmtpConfig {
            host: m.host,
            port,
            tls,
            ca_file: m.ca_file.map(|p| self.resolve(&p)),
            username,
            password,
            helo_name: m.helo_name,
            from,
            approvers,
            admins,
            timeout,
            max_attempts: self.range(&key("max_attempts"), m.max_attempts, 5, 1, 20)?,
            initial_backoff,
            max_backoff,
            queue_capacity,
        })
    }

    fn tls(&self, mut t: file::Tls) -> Result<TlsConfig, ConfigError> {
        let issue_only = [
            ("issuer", t.issuer.is_some()),
            ("dns_names", t.dns_names.is_some()),
            ("ip_addresses", t.ip_addresses.is_some()),
            ("validity_days", t.validity_days.is_some()),
            ("renew_before_days", t.renew_before_days.is_some()),
            ("key_algorithm", t.key_algorithm.is_some()),
        ];
        let files = (t.certificate_file.take(), t.key_file.take());
        let source = match (t.issue.unwrap_or(false), files.0, files.1) {
            (true, None, None) => TlsSource::Issue(self.tls_issue(&t)?),
            (true, _, _) => {
                return Err(self.invalid(
                    "server.tls.issue",
                    "set either issue = true or certificate_file + key_file, not both",
                ));
            }
            (false, Some(cert), Some(key)) => {
                if let Some((k, _)) = issue_only.iter().find(|(_, set)| *set) {
                    return Err(self.invalid(
                        &format!("server.tls.{k}"),
                        "applies only with issue = true (certificate_file + key_file are set)",
                    ));
                }
                TlsSource::Files {
                    certificate_file: self.resolve(&cert),
                    key_file: self.resolve(&key),
                }
            }
            (false, None, Some(_)) | (false, None, None) => {
                return Err(self.invalid(
                    "server.tls.certificate_file",
                    "missing: set certificate_file + key_file, or issue = true",
                ));
            }
            (false, Some(_), None) => {
                return Err(self.invalid(
                    "server.tls.key_file",
                    "missing: certificate_file needs its key_file",
                ));
            }
        };
        let client_auth = t
            .client_auth
            .as_deref()
            .unwrap_or("none")
            .parse()
            .map_err(|e: String| self.invalid("server.tls.client_auth", e))?;
        Ok(TlsConfig {
            source,
            client_auth,
            handshake_timeout: self.seconds(
                "server.tls.handshake_timeout_secs",
                t.handshake_timeout_secs,
                10,
            )?,
            max_handshakes: self.range(
                "server.tls.max_handshakes",
                t.max_handshakes,
                256,
                1,
                65_536,
            )?,
        })
    }

    fn tls_issue(&self, t: &file::Tls) -> Result<TlsIssueConfig, ConfigError> {
        use crate::model::KeyAlgorithm;
        let issuer = match &t.issuer {
            Some(i) if !i.is_empty() => i.clone(),
            _ => {
                return Err(self.invalid(
                    "server.tls.issuer",
                    "missing: name the issuing CA (from policies/ca.toml) that signs the server certificate",
                ));
            }
        };
        let dns_names = t.dns_names.clone().unwrap_or_default();
        for n in &dns_names {
            if rustls::pki_types::DnsName::try_from(n.as_str()).is_err() || n.contains('*') {
                return Err(self.invalid(
                    "server.tls.dns_names",
                    format!("`{n}` is not a DNS name (no wildcards)"),
                ));
            }
        }
        let ip_addresses = t
            .ip_addresses
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|a| {
                a.parse().map_err(|_| {
                    self.invalid(
                        "server.tls.ip_addresses",
                        format!("`{a}` is not an IP address"),
                    )
                })
            })
            .collect::<Result<Vec<std::net::IpAddr>, _>>()?;
        if dns_names.is_empty() && ip_addresses.is_empty() {
            return Err(self.invalid(
                "server.tls.dns_names",
                "missing: with issue = true, list the names clients use (dns_names and/or ip_addresses)",
            ));
        }
        let validity_days = self.range("server.tls.validity_days", t.validity_days, 90, 1, 397)?;
        let renew_before_days = t.renew_before_days.unwrap_or(30.min(validity_days / 3));
        if renew_before_days >= validity_days {
            return Err(self.invalid(
                "server.tls.renew_before_days",
                format!("must be less than validity_days ({validity_days})"),
            ));
        }
        let key_algorithm: KeyAlgorithm = t
            .key_algorithm
            .as_deref()
            .unwrap_or("ecdsa-p256")
            .parse()
            .map_err(|e: crate::model::algorithm::UnknownAlgorithm| {
                self.invalid("server.tls.key_algorithm", e.to_string())
            })?;
        if crate::tls::signer::scheme_for(key_algorithm).is_none() {
            return Err(self.invalid(
                "server.tls.key_algorithm",
                "must be ecdsa-p256, ecdsa-p384 or ed25519 (key stores sign RSA with PKCS#1 v1.5, which TLS 1.3 forbids)",
            ));
        }
        Ok(TlsIssueConfig {
            issuer,
            dns_names,
            ip_addresses,
            validity_days,
            renew_before_days,
            key_algorithm,
        })
    }

    fn keystore(&self, prefix: &str, raw: file::KeyStore) -> Result<KeyStoreConfig, ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        match raw {
            file::KeyStore::Pkcs11(k) => {
                let token = match (k.token_label, k.token_serial, k.token_uri) {
                    (Some(label), None, None) if !label.is_empty() => TokenSelector::Label(label),
                    (None, Some(serial), None) if !serial.is_empty() => {
                        TokenSelector::Serial(serial)
                    }
                    (None, None, Some(uri)) => TokenSelector::Uri(
                        Pkcs11Uri::parse(&uri)
                            .map_err(|e| self.invalid(&key("token_uri"), e.to_string()))?,
                    ),
                    _ => {
                        return Err(self.invalid(
                            &key("token_label"),
                            "set exactly one of token_label, token_serial or token_uri, not empty (tokens are chosen by label or serial, never by slot)",
                        ));
                    }
                };
                // A bare file name is left to the dynamic loader's search path.
                let module = if k.module.components().count() > 1 {
                    self.resolve(&k.module)
                } else {
                    k.module
                };
                let default_sessions = std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
                    .clamp(2, 256);
                Ok(KeyStoreConfig::Pkcs11(Pkcs11Config {
                    module,
                    token,
                    pin: self.secret(&key("pin"), k.pin_file, k.pin_env)?,
                    sessions: self.range(&key("sessions"), k.sessions, default_sessions, 1, 256)?,
                    signer_threads: k.signer_threads.unwrap_or(false),
                }))
            }
            file::KeyStore::Yubikey(y) => {
                use crate::keystore::yubikey as yk;
                Ok(KeyStoreConfig::Yubikey(YubiKeyConfig {
                    serial: y.serial,
                    slot: yk::parse_slot(y.slot.as_deref().unwrap_or("9c"))
                        .map_err(|e| self.invalid(&key("slot"), e))?,
                    pin: self.secret(&key("pin"), y.pin_file, y.pin_env)?,
                    management_key: self.secret(
                        &key("management_key"),
                        y.management_key_file,
                        y.management_key_env,
                    )?,
                    management_key_algorithm: yk::parse_management_algorithm(
                        y.management_key_algorithm.as_deref().unwrap_or("aes192"),
                    )
                    .map_err(|e| self.invalid(&key("management_key_algorithm"), e))?,
                    pin_policy: yk::parse_pin_policy(y.pin_policy.as_deref().unwrap_or("always"))
                        .map_err(|e| self.invalid(&key("pin_policy"), e))?,
                    touch_policy: yk::parse_touch_policy(
                        y.touch_policy.as_deref().unwrap_or("never"),
                    )
                    .map_err(|e| self.invalid(&key("touch_policy"), e))?,
                    attestation_root: y.attestation_root.as_deref().map(|p| self.resolve(p)),
                    sign_timeout: self.seconds(
                        &key("sign_timeout_secs"),
                        y.sign_timeout_secs,
                        30,
                    )?,
                    dangerously_generate_into_unverified_slot: y
                        .dangerously_generate_into_unverified_slot
                        .unwrap_or(false),
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[store]
type = "sqlite"
path = "k.db"
[keystore]
type = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "keyward"
pin_env = "KEYWARD_HSM_PIN"
[auth]
token_pepper_env = "KEYWARD_PEPPER"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/kw/k.toml"), Path::new("/etc/kw"))
    }

    /// The error for `text`, which must name `key`.
    fn refused(text: &str, key: &str) -> String {
        let e = parse(text).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(key), "{key} not named in: {msg}");
        msg
    }

    fn pkcs11(c: &Config) -> &Pkcs11Config {
        match &c.keystore {
            KeyStoreConfig::Pkcs11(p) => p,
            other => panic!("{other:?}"),
        }
    }

    /// MINIMAL with its `[store]` replaced by `store`.
    fn with_store(store: &str) -> String {
        MINIMAL.replace(
            "[store]\ntype = \"sqlite\"\npath = \"k.db\"\n",
            &format!("[store]\n{store}\n"),
        )
    }

    #[test]
    fn postgres_store_is_read_with_its_password_from_a_file_or_env() {
        let c = parse(&with_store(
            "type = \"postgres\"\nurl = \"postgres://keyward@db.internal:5432/keyward\"\n\
             password_file = \"pg.pw\"\npool_size = 4\nbatch_max = 64",
        ))
        .unwrap();
        let StoreConfig::Postgres(p) = &c.store else {
            panic!("{:?}", c.store)
        };
        assert_eq!(p.url, "postgres://keyward@db.internal:5432/keyward");
        assert_eq!((p.pool_size, p.batch_max), (4, 64));
        assert_eq!(
            p.password.as_ref().unwrap().from,
            SecretRef::File(PathBuf::from("/etc/kw/pg.pw"))
        );
        // `config check` reads the database password too.
        assert_eq!(c.secrets().len(), 3);

        let c = parse(&with_store(
            "type = \"postgres\"\nurl = \"postgres://keyward@127.0.0.1/keyward\"\npassword_env = \"KEYWARD_PG_PASSWORD\"",
        ))
        .unwrap();
        let StoreConfig::Postgres(p) = &c.store else {
            panic!()
        };
        assert_eq!(
            p.password.as_ref().unwrap().from,
            SecretRef::Env("KEYWARD_PG_PASSWORD".into())
        );
        assert_eq!((p.pool_size, p.batch_max), (8, 256));

        // No password at all: trust, peer or certificate authentication.
        let c = parse(&with_store(
            "type = \"postgres\"\nurl = \"postgres://keyward@127.0.0.1/keyward\"",
        ))
        .unwrap();
        assert!(matches!(&c.store, StoreConfig::Postgres(p) if p.password.is_none()));
        assert_eq!(c.secrets().len(), 2);
    }

    #[test]
    fn postgres_store_refusals_name_their_key_and_never_echo_a_password() {
        let pg = |rest: &str| with_store(&format!("type = \"postgres\"\n{rest}"));
        for url in [
            "postgres://keyward:hunter2-secret@127.0.0.1/keyward",
            "host=127.0.0.1 user=keyward password=hunter2-secret dbname=keyward",
        ] {
            let msg = refused(&pg(&format!("url = \"{url}\"")), "store.url");
            assert!(msg.contains("password"), "{msg}");
            assert!(!msg.contains("hunter2"), "the password leaked: {msg}");
        }
        refused(
            &pg("url = \"postgres://keyward@127.0.0.1:notaport/k\""),
            "store.url",
        );
        refused(&pg("url = \"postgres://keyward@127.0.0.1\""), "store.url");
        refused(
            &pg("url = \"postgres://k@h/k\"\npassword_file = \"a\"\npassword_env = \"B\""),
            "store.password",
        );
        refused(
            &pg("url = \"postgres://k@h/k\"\npassword_env = \"\""),
            "store.password_env",
        );
        refused(
            &pg("url = \"postgres://k@h/k\"\npool_size = 0"),
            "store.pool_size",
        );
        refused(
            &pg("url = \"postgres://k@h/k\"\npool_size = 65"),
            "store.pool_size",
        );
        refused(
            &pg("url = \"postgres://k@h/k\"\nbatch_max = 0"),
            "store.batch_max",
        );
        assert!(parse(&pg("url = \"postgres://k@h/k\"\npath = \"k.db\"")).is_err());
        assert!(parse(&pg("")).is_err());
    }

    #[test]
    fn redis_is_optional_and_its_url_never_carries_a_password() {
        assert_eq!(parse(MINIMAL).unwrap().redis, None);
        let c = parse(&format!(
            "{MINIMAL}[redis]\nurl = \"redis://127.0.0.1:6390/2\"\npassword_file = \"redis.pw\"\n"
        ))
        .unwrap();
        let r = c.redis.unwrap();
        assert_eq!(r.url, "redis://127.0.0.1:6390/2");
        assert_eq!(r.key_prefix, "keyward:");
        assert_eq!(
            r.password.unwrap().from,
            SecretRef::File(PathBuf::from("/etc/kw/redis.pw"))
        );
        let c = parse(&format!(
            "{MINIMAL}[redis]\nurl = \"redis://kw@redis.internal:6379\"\npassword_env = \"KEYWARD_REDIS_PASSWORD\"\nkey_prefix = \"prod-a:\"\n"
        ))
        .unwrap();
        let r = c.redis.unwrap();
        assert_eq!(r.key_prefix, "prod-a:");
        assert_eq!(
            r.password.unwrap().from,
            SecretRef::Env("KEYWARD_REDIS_PASSWORD".into())
        );
        assert!(
            parse(&format!("{MINIMAL}[redis]\nurl = \"redis://127.0.0.1\"\n"))
                .unwrap()
                .redis
                .unwrap()
                .password
                .is_none()
        );
        let with = |body: &str| format!("{MINIMAL}[redis]\n{body}\n");
        for (text, key, secret) in [
            (
                with("url = \"redis://:hunter2@127.0.0.1/0\""),
                "redis.url",
                Some("hunter2"),
            ),
            (
                with("url = \"redis://kw:hunter2@127.0.0.1/0\""),
                "redis.url",
                Some("hunter2"),
            ),
            (
                with("url = \"redis://127.0.0.1/0?password=hunter2\""),
                "redis.url",
                Some("hunter2"),
            ),
            (with("url = \"rediss://127.0.0.1/0\""), "redis.url", None),
            (with("url = \"http://127.0.0.1/0\""), "redis.url", None),
            (with("url = \"\""), "redis.url", None),
            (with("key_prefix = \"x:\""), "redis.url", None),
            (
                with("url = \"redis://127.0.0.1\"\npassword_file = \"a\"\npassword_env = \"B\""),
                "redis.password",
                None,
            ),
            (
                with("url = \"redis://127.0.0.1\"\npassword_env = \"\""),
                "redis.password_env",
                None,
            ),
            (
                with("url = \"redis://127.0.0.1\"\nkey_prefix = \"\""),
                "redis.key_prefix",
                None,
            ),
            (
                with("url = \"redis://127.0.0.1\"\nkey_prefix = \"a b\""),
                "redis.key_prefix",
                None,
            ),
            (
                with("url = \"redis://127.0.0.1\"\npassword = \"x\""),
                "password",
                None,
            ),
        ] {
            let msg = refused(&text, key);
            if let Some(s) = secret {
                assert!(!msg.contains(s), "the error echoes the password: {msg}");
            }
        }
        // The example's commented section is valid as written.
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("keyward.example.toml"),
        )
        .unwrap();
        assert_eq!(parse(&example).unwrap().redis, None);
        let enabled = example
            .replace("# [redis]", "[redis]")
            .replace("# url = \"redis://", "url = \"redis://")
            .replace(
                "# password_file = \"/etc/keyward/redis",
                "password_file = \"/etc/keyward/redis",
            )
            .replace("# key_prefix", "key_prefix");
        let r = parse(&enabled)
            .unwrap()
            .redis
            .expect("the example has a [redis] section");
        assert_eq!(r.url, "redis://127.0.0.1:6379/0");
        assert_eq!(r.key_prefix, DEFAULT_REDIS_PREFIX);
        assert!(r.password.is_some());
    }

    #[test]
    fn broker_defaults_to_none_and_mosquitto_is_checked() {
        let c = parse(MINIMAL).unwrap();
        assert!(matches!(c.broker.backend, BrokerBackendConfig::None));
        assert_eq!(c.broker.flush_timeout, Duration::from_secs(5));
        assert_eq!(c.secrets().len(), 2);

        let c = parse(&format!(
            "{MINIMAL}[broker]\ntype = \"mosquitto\"\nurl = \"mqtts://broker.example.net\"\n\
             ca_file = \"broker-ca.pem\"\nusername = \"keyward\"\npassword_file = \"broker.pw\"\n\
             retry_min_secs = 1\nretry_max_secs = 60\n"
        ))
        .unwrap();
        let BrokerBackendConfig::Mosquitto(m) = &c.broker.backend else {
            panic!("{:?}", c.broker.backend)
        };
        assert_eq!((m.host.as_str(), m.port), ("broker.example.net", 8883));
        let tls = m.tls.as_ref().unwrap();
        assert_eq!(tls.ca_file, Path::new("/etc/kw/broker-ca.pem"));
        assert_eq!(
            m.password.from,
            SecretRef::File(PathBuf::from("/etc/kw/broker.pw"))
        );
        assert_eq!(c.broker.retry_max, Duration::from_secs(60));
        // `config check` reads the broker password too.
        assert_eq!(c.secrets().len(), 3);

        let c = parse(&format!(
            "{MINIMAL}[broker]\ntype = \"mosquitto\"\nurl = \"mqtt://[::1]:18830\"\nusername = \"a\"\npassword_env = \"P\"\n"
        ))
        .unwrap();
        let BrokerBackendConfig::Mosquitto(m) = &c.broker.backend else {
            panic!()
        };
        assert_eq!(
            (m.host.as_str(), m.port, m.tls.is_none()),
            ("::1", 18830, true)
        );
    }

    #[test]
    fn broker_refusals_name_their_key() {
        let m = |rest: &str| format!("{MINIMAL}[broker]\ntype = \"mosquitto\"\n{rest}");
        let ok_auth = "username = \"a\"\npassword_env = \"P\"\n";
        refused(
            &format!("{MINIMAL}[broker]\ntype = \"rabbit\"\n"),
            "broker.type",
        );
        refused(
            &format!("{MINIMAL}[broker]\nurl = \"mqtt://127.0.0.1\"\n"),
            "broker.url",
        );
        refused(&m(ok_auth), "broker.url");
        // Plain MQTT only to loopback: the admin password would cross the network.
        let e = refused(
            &m(&format!("url = \"mqtt://10.0.0.5:1883\"\n{ok_auth}")),
            "broker.url",
        );
        assert!(e.contains("loopback"), "{e}");
        refused(
            &m(&format!("url = \"mqtts://b.example\"\n{ok_auth}")),
            "broker.ca_file",
        );
        refused(
            &m(&format!("url = \"https://b.example\"\n{ok_auth}")),
            "broker.url",
        );
        refused(
            &m(&format!(
                "url = \"mqtts://user:pw@b.example\"\nca_file = \"c\"\n{ok_auth}"
            )),
            "broker.url",
        );
        refused(
            &m(&format!("url = \"mqtt://127.0.0.1:0\"\n{ok_auth}")),
            "broker.url",
        );
        refused(
            &m("url = \"mqtt://127.0.0.1\"\npassword_env = \"P\"\n"),
            "broker.username",
        );
        let e = refused(
            &m("url = \"mqtt://127.0.0.1\"\nusername = \"a\"\n"),
            "broker.password",
        );
        assert!(e.contains("command line"), "{e}");
        refused(
            &m(&format!(
                "url = \"mqtts://b.example\"\nca_file = \"c\"\nclient_cert_file = \"x\"\n{ok_auth}"
            )),
            "broker.client_cert_file",
        );
        refused(
            &m(&format!(
                "url = \"mqtt://127.0.0.1\"\nretry_min_secs = 10\nretry_max_secs = 5\n{ok_auth}"
            )),
            "broker.retry_max_secs",
        );
        refused(
            &m(&format!(
                "url = \"mqtt://127.0.0.1\"\nflush_timeout_secs = 30\n{ok_auth}"
            )),
            "broker.flush_timeout_secs",
        );
        refused(&format!("{MINIMAL}[broker]\nsurprise = 1\n"), "surprise");
    }

    #[test]
    fn minimal_config_gets_checked_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.server.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(c.server.body_limit_bytes, 65536);
        assert_eq!(c.server.request_timeout, Duration::from_secs(30));
        let StoreConfig::Sqlite(s) = &c.store else {
            panic!("{:?}", c.store)
        };
        assert_eq!(s.path, Path::new("/etc/kw/k.db"));
        assert_eq!(s.batch_max, 256);
        let p = pkcs11(&c);
        assert!(matches!(&p.token, TokenSelector::Label(l) if l == "keyward"));
        assert_eq!(
            p.pin,
            SecretSetting {
                key: "keystore.pin".into(),
                from: SecretRef::Env("KEYWARD_HSM_PIN".into())
            }
        );
        assert!((2..=256).contains(&p.sessions));
        assert!(!p.signer_threads, "the blocking pool is the default");
        assert_eq!(c.auth.token_pepper.key, "auth.token_pepper");
        assert_eq!(c.policies.dir, Path::new("/etc/kw/policies"));
        assert_eq!(c.log.level, "info");
        assert_eq!(c.secrets().len(), 2);
    }

    #[test]
    fn public_url_is_checked_and_normalised() {
        let with = |u: &str| format!("{MINIMAL}\n[server]\npublic_url = \"{u}\"\n");
        assert_eq!(parse(MINIMAL).unwrap().server.public_url, None);
        let c = parse(&with("https://pki.example.net:8443/kw/")).unwrap();
        assert_eq!(
            c.server.public_url.as_deref(),
            Some("https://pki.example.net:8443/kw")
        );
        for bad in [
            "ftp://pki.example.net",
            "https://",
            "https://user:pw@pki.example.net",
            "https://pki.example.net/?x=1",
            "https://pki.example.net/#f",
            "https://pki.exämple.net",
            "pki.example.net",
        ] {
            refused(&with(bad), "server.public_url");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = parse(&format!("{MINIMAL}\n[bogus]\nx = 1\n")).unwrap_err();
        assert_eq!(e.code(), "config_syntax");
        assert!(e.to_string().contains("bogus"), "{e}");
        refused(
            &MINIMAL.replace("path = \"k.db\"", "path = \"k.db\"\npaht = 3"),
            "paht",
        );
        refused(
            &MINIMAL.replace("token_label", "sessions = 2\ntoken_lable"),
            "token_lable",
        );
    }

    #[test]
    fn exactly_one_token_selector_is_accepted_and_typed() {
        let e = refused(
            &MINIMAL.replace(
                "token_label = \"keyward\"",
                "token_label = \"a\"\ntoken_serial = \"b\"",
            ),
            "keystore.token_label",
        );
        assert!(e.contains("exactly one"), "{e}");
        refused(
            &MINIMAL.replace("token_label = \"keyward\"", ""),
            "keystore.token_label",
        );
        refused(
            &MINIMAL.replace("token_label = \"keyward\"", "token_label = \"\""),
            "keystore.token_label",
        );
        let c =
            parse(&MINIMAL.replace("token_label = \"keyward\"", "token_serial = \"abc\"")).unwrap();
        assert!(matches!(&pkcs11(&c).token, TokenSelector::Serial(s) if s == "abc"));
        let c = parse(&MINIMAL.replace(
            "token_label = \"keyward\"",
            "token_uri = \"pkcs11:token=kw;serial=abc\"",
        ))
        .unwrap();
        let TokenSelector::Uri(u) = &pkcs11(&c).token else {
            panic!()
        };
        assert_eq!(u.token().as_deref(), Some("kw"));
        refused(
            &MINIMAL.replace("token_label = \"keyward\"", "token_uri = \"https://x\""),
            "keystore.token_uri",
        );
    }

    #[test]
    fn each_secret_has_exactly_one_source_and_paths_resolve_beside_the_config() {
        let e = refused(
            &MINIMAL.replace(
                "pin_env = \"KEYWARD_HSM_PIN\"",
                "pin_env = \"X\"\npin_file = \"/p\"",
            ),
            "keystore.pin",
        );
        assert!(e.contains("only one"), "{e}");
        let e = refused(
            &MINIMAL.replace("pin_env = \"KEYWARD_HSM_PIN\"", ""),
            "keystore.pin",
        );
        assert!(e.contains("never come from the command line"), "{e}");
        refused(
            &MINIMAL.replace(
                "token_pepper_env = \"KEYWARD_PEPPER\"",
                "token_pepper_env = \"\"",
            ),
            "auth.token_pepper_env",
        );
        let c = parse(
            &MINIMAL
                .replace(
                    "pin_env = \"KEYWARD_HSM_PIN\"",
                    "pin_file = \"secrets/hsm.pin\"",
                )
                .replace("/usr/lib/softhsm/libsofthsm2.so", "libsofthsm2.so"),
        )
        .unwrap();
        let p = pkcs11(&c);
        assert_eq!(
            p.pin.from,
            SecretRef::File("/etc/kw/secrets/hsm.pin".into())
        );
        assert_eq!(p.module, Path::new("libsofthsm2.so"), "left to the loader");
    }

    #[test]
    fn values_out_of_range_are_refused_with_their_key() {
        for (text, key) in [
            (
                "[server]\nbody_limit_bytes = 1023\n",
                "server.body_limit_bytes",
            ),
            (
                "[server]\nbody_limit_bytes = 16777217\n",
                "server.body_limit_bytes",
            ),
            (
                "[server]\nrequest_timeout_secs = 0\n",
                "server.request_timeout_secs",
            ),
            ("[server]\nlisten = \"localhost\"\n", "listen"),
            ("[log]\nlevel = \"info,=[\"\n", "log.level"),
            ("[log]\nformat = \"xml\"\n", "format"),
        ] {
            refused(&format!("{MINIMAL}{text}"), key);
        }
        refused(
            &MINIMAL.replace("path = \"k.db\"", "path = \"k.db\"\nbatch_max = 0"),
            "store.batch_max",
        );
        refused(
            &MINIMAL.replace("pin_env", "sessions = 0\npin_env"),
            "keystore.sessions",
        );
        refused(
            &MINIMAL.replace("pin_env", "sessions = 257\npin_env"),
            "keystore.sessions",
        );
        // The key store table is one of several shapes: serde names the table.
        let msg = refused(
            &MINIMAL.replace("pin_env", "signer_threads = \"yes\"\npin_env"),
            "expected a boolean",
        );
        assert!(msg.contains("[keystore]"), "{msg}");
        let threads = parse(&MINIMAL.replace("pin_env", "signer_threads = true\npin_env")).unwrap();
        assert!(pkcs11(&threads).signer_threads);
        let c = parse(&format!(
            "{MINIMAL}[server]\nlisten = \"[::1]:9000\"\nrequest_timeout_secs = 5\n"
        ))
        .unwrap();
        assert_eq!(c.server.listen.port(), 9000);
        assert_eq!(c.server.request_timeout, Duration::from_secs(5));
    }

    #[test]
    fn renewal_notice_interval_defaults_and_is_bounded() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.jobs.renewal_notice_interval, Duration::from_secs(600));
        let with = |v: &str| format!("{MINIMAL}[jobs]\nrenewal_notice_interval_seconds = {v}\n");
        let c = parse(&with("1")).unwrap();
        assert_eq!(c.jobs.renewal_notice_interval, Duration::from_secs(1));
        for bad in ["0", "86401"] {
            refused(&with(bad), "jobs.renewal_notice_interval_seconds");
        }
        let e = parse(&format!("{MINIMAL}[jobs]\nsweep_interval_seconds = 5\n")).unwrap_err();
        assert_eq!(e.code(), "config_syntax");
    }

    #[test]
    fn metrics_refresh_interval_defaults_and_is_bounded() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.jobs.metrics_refresh_interval, Duration::from_secs(30));
        let with = |v: &str| format!("{MINIMAL}[jobs]\nmetrics_refresh_interval_seconds = {v}\n");
        let c = parse(&with("1")).unwrap();
        assert_eq!(c.jobs.metrics_refresh_interval, Duration::from_secs(1));
        for bad in ["0", "3601", "-1"] {
            assert!(parse(&with(bad)).is_err(), "{bad}");
        }
        refused(&with("0"), "jobs.metrics_refresh_interval_seconds");
        refused(&with("3601"), "jobs.metrics_refresh_interval_seconds");
        // The example documents the defaults.
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("keyward.example.toml"),
        )
        .unwrap();
        let enabled = example
            .replace("# [jobs]", "[jobs]")
            .replace(
                "# renewal_notice_interval_seconds",
                "renewal_notice_interval_seconds",
            )
            .replace(
                "# metrics_refresh_interval_seconds",
                "metrics_refresh_interval_seconds",
            );
        assert!(enabled.contains("\nmetrics_refresh_interval_seconds = 30\n"));
        assert_eq!(parse(&enabled).unwrap().jobs, parse(MINIMAL).unwrap().jobs);
    }

    #[test]
    fn tls_takes_files_or_issue_and_names_every_refused_key() {
        let files =
            "[server.tls]\ncertificate_file = \"tls/server.pem\"\nkey_file = \"tls/server.key\"\n";
        let c = parse(&format!("{MINIMAL}{files}")).unwrap();
        let t = c.server.tls.unwrap();
        assert!(matches!(
            &t.source,
            TlsSource::Files { certificate_file, key_file }
                if certificate_file == Path::new("/etc/kw/tls/server.pem")
                    && key_file == Path::new("/etc/kw/tls/server.key")
        ));
        assert_eq!(t.client_auth, crate::tls::ClientAuth::None);
        assert_eq!(t.handshake_timeout, Duration::from_secs(10));
        assert_eq!(t.max_handshakes, 256);

        let issue = "[server.tls]\nissue = true\nissuer = \"devices\"\ndns_names = [\"keyward.example.net\"]\nip_addresses = [\"127.0.0.1\"]\nclient_auth = \"required\"\n";
        let c = parse(&format!("{MINIMAL}{issue}")).unwrap();
        let t = c.server.tls.unwrap();
        let TlsSource::Issue(i) = &t.source else {
            panic!("{t:?}")
        };
        assert_eq!(i.issuer, "devices");
        assert_eq!(i.ip_addresses, vec![std::net::IpAddr::from([127, 0, 0, 1])]);
        assert_eq!((i.validity_days, i.renew_before_days), (90, 30));
        assert_eq!(i.key_algorithm, crate::model::KeyAlgorithm::EcdsaP256);
        assert_eq!(t.client_auth, crate::tls::ClientAuth::Required);

        for (text, key) in [
            (format!("{files}issue = true\n"), "server.tls.issue"),
            (format!("{issue}key_file = \"k\"\n"), "server.tls.issue"),
            (
                format!("{files}issuer = \"devices\"\n"),
                "server.tls.issuer",
            ),
            (
                "[server.tls]\nkey_file = \"k\"\n".to_string(),
                "server.tls.certificate_file",
            ),
            (
                "[server.tls]\ncertificate_file = \"c\"\n".to_string(),
                "server.tls.key_file",
            ),
            ("[server.tls]\n".to_string(), "server.tls.certificate_file"),
            (
                format!("{files}client_auth = \"sometimes\"\n"),
                "server.tls.client_auth",
            ),
            (format!("{files}certfile = \"x\"\n"), "certfile"),
            (
                format!("{files}handshake_timeout_secs = 0\n"),
                "server.tls.handshake_timeout_secs",
            ),
            (
                format!("{files}max_handshakes = 0\n"),
                "server.tls.max_handshakes",
            ),
            (
                issue.replace("issuer = \"devices\"\n", ""),
                "server.tls.issuer",
            ),
            (
                issue.replace(
                    "dns_names = [\"keyward.example.net\"]\nip_addresses = [\"127.0.0.1\"]\n",
                    "",
                ),
                "server.tls.dns_names",
            ),
            (
                issue.replace("keyward.example.net", "*.example.net"),
                "server.tls.dns_names",
            ),
            (
                issue.replace("keyward.example.net", "bad name"),
                "server.tls.dns_names",
            ),
            (
                issue.replace("127.0.0.1", "localhost"),
                "server.tls.ip_addresses",
            ),
            (
                format!("{issue}validity_days = 398\n"),
                "server.tls.validity_days",
            ),
            (
                format!("{issue}validity_days = 30\nrenew_before_days = 30\n"),
                "server.tls.renew_before_days",
            ),
            (
                format!("{issue}key_algorithm = \"rsa-2048\"\n"),
                "server.tls.key_algorithm",
            ),
            (
                format!("{issue}key_algorithm = \"dsa\"\n"),
                "server.tls.key_algorithm",
            ),
        ] {
            refused(&format!("{MINIMAL}{text}"), key);
        }
    }

    #[test]
    fn plain_http_is_refused_off_loopback_and_names_server_tls() {
        parse(&format!("{MINIMAL}[server]\nlisten = \"[::1]:8080\"\n")).unwrap();
        let e = refused(
            &format!("{MINIMAL}[server]\nlisten = \"0.0.0.0:8443\"\n"),
            "server.tls",
        );
        assert!(e.contains("loopback"), "{e}");
        refused(
            &format!("{MINIMAL}[server]\nlisten = \"192.0.2.10:8443\"\n"),
            "server.tls",
        );
        let c = parse(&format!(
            "{MINIMAL}[server]\nlisten = \"0.0.0.0:8443\"\n[server.tls]\ncertificate_file = \"c\"\nkey_file = \"k\"\n"
        ))
        .unwrap();
        assert!(c.server.tls.is_some());
    }

    #[test]
    fn notify_defaults_to_log_and_checks_every_webhook_key() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(
            c.notify,
            vec![NotifierConfig::Log {
                queue_capacity: 10_000
            }]
        );
        let hook = "[[notify]]\ntype = \"webhook\"\nurl = \"https://hooks.example.net/kw\"\nsecret_file = \"hook.secret\"\n";
        let c = parse(&format!(
            "{MINIMAL}[[notify]]\ntype = \"log\"\nqueue_capacity = 5\n{hook}"
        ))
        .unwrap();
        assert_eq!(c.notify.len(), 2);
        assert_eq!(c.notify[0], NotifierConfig::Log { queue_capacity: 5 });
        let NotifierConfig::Webhook(w) = &c.notify[1] else {
            panic!("{:?}", c.notify)
        };
        assert_eq!(w.url.redacted(), "https://hooks.example.net/…");
        assert_eq!(w.secret.key, "notify[1].secret");
        assert_eq!(w.secret.from, SecretRef::File("/etc/kw/hook.secret".into()));
        assert_eq!(w.timeout, Duration::from_secs(5));
        assert_eq!(w.max_attempts, 5);
        assert_eq!(w.initial_backoff, Duration::from_secs(1));
        assert_eq!(w.max_backoff, Duration::from_secs(60));
        assert_eq!(w.queue_capacity, 10_000);
        assert_eq!(
            c.secrets().len(),
            3,
            "config check reads the webhook secret"
        );

        for (extra, key) in [
            ("timeout_seconds = 0", "notify[0].timeout_seconds"),
            ("timeout_seconds = 301", "notify[0].timeout_seconds"),
            ("max_attempts = 0", "notify[0].max_attempts"),
            ("max_attempts = 21", "notify[0].max_attempts"),
            ("initial_backoff_ms = 5", "notify[0].initial_backoff_ms"),
            ("max_backoff_seconds = 0", "notify[0].max_backoff_seconds"),
            (
                "max_backoff_seconds = 1\ninitial_backoff_ms = 2000",
                "notify[0].initial_backoff_ms",
            ),
            ("queue_capacity = 0", "notify[0].queue_capacity"),
            ("secret_env = \"HOOK\"", "notify[0].secret"),
            ("retries = 3", "retries"),
        ] {
            refused(&format!("{MINIMAL}{hook}{extra}\n"), key);
        }
        refused(
            &format!(
                "{MINIMAL}{}",
                hook.replace("secret_file = \"hook.secret\"\n", "")
            ),
            "notify[0].secret",
        );
        for url in [
            "http://hooks.example.net/kw",
            "ftp://hooks.example.net/kw",
            "https://u:p@hooks.example.net/kw",
            "not a url",
        ] {
            refused(
                &format!(
                    "{MINIMAL}{}",
                    hook.replace("https://hooks.example.net/kw", url)
                ),
                "notify[0].url",
            );
        }
        parse(&format!(
            "{MINIMAL}{}",
            hook.replace("https://hooks.example.net/kw", "http://127.0.0.1:9/kw")
        ))
        .unwrap();
        refused(&format!("{MINIMAL}[[notify]]\ntype = \"smtp\"\n"), "host");
        refused(&format!("{MINIMAL}[[notify]]\ntype = \"sms\"\n"), "sms");
        refused(
            &format!("{MINIMAL}[[notify]]\ntype = \"log\"\nurl = \"x\"\n"),
            "url",
        );
    }

    #[test]
    fn smtp_addresses_tls_and_credentials_are_checked() {
        use crate::notify::SmtpTls;
        let mail = "[[notify]]\ntype = \"smtp\"\nhost = \"smtp.example.net\"\n\
                    from = \"keyward <keyward@example.net>\"\n\
                    approvers = [\"alice@example.net\", \"Bob <bob@example.net>\"]\n\
                    admins = [\"ops@example.net\"]\n";
        let c = parse(&format!("{MINIMAL}{mail}")).unwrap();
        let NotifierConfig::Smtp(m) = &c.notify[0] else {
            panic!("{:?}", c.notify)
        };
        assert_eq!((m.tls, m.port), (SmtpTls::StartTls, 587));
        assert_eq!(m.from.email.to_string(), "keyward@example.net");
        assert_eq!(m.approvers.len(), 2);
        assert_eq!(m.approvers[1].name.as_deref(), Some("Bob"));
        assert_eq!(m.admins[0].email.to_string(), "ops@example.net");
        assert_eq!(m.timeout, Duration::from_secs(30));
        assert_eq!((m.max_attempts, m.queue_capacity), (5, 10_000));
        assert_eq!((m.username.as_ref(), m.password.as_ref()), (None, None));
        assert_eq!(c.secrets().len(), 2, "no SMTP password to read");

        let with = |extra: &str| format!("{MINIMAL}{mail}{extra}\n");
        let c = parse(&with(
            "tls = \"tls\"\nusername = \"kw\"\npassword_file = \"smtp.pw\"\nca_file = \"mail-ca.pem\"",
        ))
        .unwrap();
        let NotifierConfig::Smtp(m) = &c.notify[0] else {
            panic!()
        };
        assert_eq!((m.tls, m.port), (SmtpTls::Tls, 465));
        assert_eq!(m.ca_file.as_deref(), Some(Path::new("/etc/kw/mail-ca.pem")));
        let pw = m.password.as_ref().unwrap();
        assert_eq!(pw.key, "notify[0].password");
        assert_eq!(pw.from, SecretRef::File("/etc/kw/smtp.pw".into()));
        assert_eq!(c.secrets().len(), 3, "config check reads the SMTP password");
        // Plain SMTP: to a loopback relay (with or without a password), or
        // elsewhere only when asked for and without a password.
        let local = mail.replace("smtp.example.net", "127.0.0.1");
        for ok in [
            format!("{MINIMAL}{local}tls = \"none\"\n"),
            format!(
                "{MINIMAL}{local}tls = \"none\"\nport = 2525\nusername = \"kw\"\npassword_env = \"PW\"\n"
            ),
            format!(
                "{MINIMAL}{}tls = \"none\"\n",
                mail.replace("smtp.example.net", "localhost")
            ),
            with("tls = \"none\"\nallow_plaintext = true"),
            format!(
                "{MINIMAL}{}",
                mail.replace(
                    "approvers = [\"alice@example.net\", \"Bob <bob@example.net>\"]\n",
                    ""
                )
            ),
            with("helo_name = \"kw1.example.net\""),
        ] {
            parse(&ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let no_admins = mail.replace("admins = [\"ops@example.net\"]\n", "");
        for (text, key) in [
            (with("tls = \"none\""), "notify[0].tls"),
            (
                with(
                    "tls = \"none\"\nallow_plaintext = true\nusername = \"kw\"\npassword_env = \"PW\"",
                ),
                "notify[0].tls",
            ),
            (with("tls = \"ssl\""), "notify[0].tls"),
            (with("allow_plaintext = true"), "notify[0].allow_plaintext"),
            (
                with("tls = \"none\"\nallow_plaintext = true\nca_file = \"ca.pem\""),
                "notify[0].ca_file",
            ),
            (
                format!("{MINIMAL}{local}tls = \"none\"\nca_file = \"ca.pem\"\n"),
                "notify[0].ca_file",
            ),
            (with("port = 0"), "notify[0].port"),
            (with("port = 70000"), "70000"),
            (
                format!(
                    "{MINIMAL}{}",
                    mail.replace("smtp.example.net", "smtp://smtp.example.net")
                ),
                "notify[0].host",
            ),
            (
                format!(
                    "{MINIMAL}{}",
                    mail.replace("smtp.example.net\"", "smtp.example.net:587\"")
                ),
                "notify[0].host",
            ),
            (
                format!(
                    "{MINIMAL}{}",
                    mail.replace("host = \"smtp.example.net\"", "host = \"\"")
                ),
                "notify[0].host",
            ),
            (with("username = \"kw\""), "notify[0].password"),
            (
                with("username = \"kw\"\npassword_file = \"a\"\npassword_env = \"B\""),
                "notify[0].password",
            ),
            (
                with("username = \"kw\"\npassword_env = \"\""),
                "notify[0].password_env",
            ),
            (with("password_file = \"smtp.pw\""), "notify[0].username"),
            (with("password = \"inline\""), "password"),
            (
                with("username = \"\"\npassword_file = \"smtp.pw\""),
                "notify[0].username",
            ),
            (with("helo_name = \"bad name\""), "notify[0].helo_name"),
            (
                format!(
                    "{MINIMAL}{}",
                    mail.replace("keyward <keyward@example.net>", "keyward")
                ),
                "notify[0].from",
            ),
            (
                format!("{MINIMAL}{}", mail.replace("alice@example.net", "alice@")),
                "notify[0].approvers[0]",
            ),
            (
                format!(
                    "{MINIMAL}{}",
                    mail.replace(
                        "Bob <bob@example.net>",
                        "bob@example.net\\r\\nBcc: eve@example.net"
                    )
                ),
                "notify[0].approvers[1]",
            ),
            (
                format!(
                    "{MINIMAL}{}",
                    mail.replace("Bob <bob@example.net>", "Alice <alice@example.net>")
                ),
                "notify[0].approvers[1]",
            ),
            (
                format!(
                    "{MINIMAL}{}",
                    mail.replace("ops@example.net", "ops at example.net")
                ),
                "notify[0].admins[0]",
            ),
            (
                format!(
                    "{MINIMAL}{}approvers = []\n",
                    no_admins.replace(
                        "approvers = [\"alice@example.net\", \"Bob <bob@example.net>\"]\n",
                        ""
                    )
                ),
                "notify[0].approvers",
            ),
            (
                format!(
                    "{MINIMAL}{}",
                    mail.replace("from = \"keyward <keyward@example.net>\"\n", "")
                ),
                "from",
            ),
            (with("timeout_seconds = 0"), "notify[0].timeout_seconds"),
            (with("max_attempts = 21"), "notify[0].max_attempts"),
            (
                with("initial_backoff_ms = 5"),
                "notify[0].initial_backoff_ms",
            ),
            (
                with("max_backoff_seconds = 1\ninitial_backoff_ms = 2000"),
                "notify[0].initial_backoff_ms",
            ),
            (with("queue_capacity = 0"), "notify[0].queue_capacity"),
            (with("recipients = [\"x@example.net\"]"), "recipients"),
        ] {
            refused(&text, key);
        }
    }

    const YUBIKEY: &str = r#"
[keystores.root]
type = "yubikey"
serial = 12345678
pin_file = "yk.pin"
management_key_env = "KW_MGM"
"#;

    #[test]
    fn yubikey_key_stores_are_typed_and_checked() {
        let c = parse(&format!("{MINIMAL}{YUBIKEY}")).unwrap();
        let KeyStoreConfig::Yubikey(y) = &c.keystores["root"] else {
            panic!()
        };
        assert_eq!(y.slot, SlotId::Signature);
        assert_eq!(y.management_key_algorithm, MgmAlgorithmId::Aes192);
        assert_eq!(y.pin_policy, PinPolicy::Always);
        assert_eq!(y.touch_policy, TouchPolicy::Never);
        assert_eq!(y.sign_timeout, Duration::from_secs(30));
        assert_eq!(y.pin.key, "keystores.root.pin");
        assert_eq!(y.pin.from, SecretRef::File("/etc/kw/yk.pin".into()));
        assert_eq!(c.secrets().len(), 4);
        for (extra, key) in [
            ("slot = \"9b\"", "keystores.root.slot"),
            (
                "management_key_algorithm = \"des\"",
                "keystores.root.management_key_algorithm",
            ),
            ("pin_policy = \"sometimes\"", "keystores.root.pin_policy"),
            ("touch_policy = \"maybe\"", "keystores.root.touch_policy"),
            ("sign_timeout_secs = 0", "keystores.root.sign_timeout_secs"),
            (
                "management_key_file = \"m\"",
                "keystores.root.management_key",
            ),
        ] {
            refused(&format!("{MINIMAL}{YUBIKEY}{extra}\n"), key);
        }
        // With two cards present "the first YubiKey" is ambiguous: no default serial.
        refused(
            &format!("{MINIMAL}{}", YUBIKEY.replace("serial = 12345678\n", "")),
            "serial",
        );
        for name in ["default", "Root", ""] {
            refused(
                &format!(
                    "{MINIMAL}{}",
                    YUBIKEY.replace("keystores.root", &format!("keystores.\"{name}\""))
                ),
                &format!("keystores.{name}"),
            );
        }
    }

    #[test]
    fn limits_have_defaults_and_refuse_zero_and_unknown_keys() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(
            c.limits,
            LimitsConfig {
                registrations_per_source: 30,
                registrations_window: Duration::from_secs(60),
                renewals_per_source: 60,
                renewals_window: Duration::from_secs(60),
                admin_login_failures_per_source: 10,
                admin_login_failures_window: Duration::from_secs(300),
                tracked_sources: 100_000,
                login_failure_audit_window: Duration::from_secs(60),
                readiness_max_age: Duration::from_secs(30),
                ocsp_fresh_per_source: 60,
                ocsp_fresh_window: Duration::from_secs(60),
                ocsp_cache_entries: 100_000,
            }
        );
        let c = parse(&format!(
            "{MINIMAL}[limits]\nregistrations_per_source = 5\n"
        ))
        .unwrap();
        assert_eq!(c.limits.registrations_per_source, 5);
        for (extra, key) in [
            (
                "admin_login_failures_per_source = 0",
                "limits.admin_login_failures_per_source",
            ),
            (
                "registrations_window_secs = 0",
                "limits.registrations_window_secs",
            ),
            ("tracked_sources = 1", "limits.tracked_sources"),
            (
                "readiness_max_age_secs = 0",
                "limits.readiness_max_age_secs",
            ),
            ("registration_per_source = 5", "registration_per_source"),
        ] {
            refused(&format!("{MINIMAL}[limits]\n{extra}\n"), key);
        }
        // The example documents the defaults.
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("keyward.example.toml"),
        )
        .unwrap();
        assert_eq!(
            parse(&example).unwrap().limits,
            parse(MINIMAL).unwrap().limits
        );
    }

    #[test]
    fn scheduler_lease_is_checked() {
        assert_eq!(
            parse(MINIMAL).unwrap().scheduler.lease,
            Duration::from_secs(15)
        );
        for (value, ms) in [
            ("15", 15_000),
            ("1.5", 1_500),
            ("1", 1_000),
            ("3600", 3_600_000),
            ("2.25", 2_250),
        ] {
            let c = parse(&format!("{MINIMAL}[scheduler]\nlease_seconds = {value}\n")).unwrap();
            assert_eq!(c.scheduler.lease, Duration::from_millis(ms), "{value}");
        }
        for value in [
            "0", "-1", "0.5", "0.999", "3601", "nan", "inf", "-inf", "\"15\"", "true",
        ] {
            refused(
                &format!("{MINIMAL}[scheduler]\nlease_seconds = {value}\n"),
                "lease_seconds",
            );
        }
        refused(
            &format!("{MINIMAL}[scheduler]\nlease_ms = 1500\n"),
            "lease_ms",
        );
        // The example documents the default.
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("keyward.example.toml"),
        )
        .unwrap();
        let enabled = example
            .replace("# [scheduler]", "[scheduler]")
            .replace("# lease_seconds", "lease_seconds");
        assert_ne!(enabled, example, "the example has no [scheduler] section");
        assert_eq!(
            parse(&enabled).unwrap().scheduler,
            SchedulerConfig::default()
        );
    }

    const BACKUP: &str = "[backup]\ndir = \"backups\"\nrecipients_files = [\"officers.txt\"]\n";

    fn backup_of(text: &str) -> BackupConfig {
        parse(text).unwrap().backup.expect("no [backup]")
    }

    fn s3_of(b: &BackupConfig, i: usize) -> &S3LocationConfig {
        match &b.locations[i].kind {
            BackupLocationKind::S3(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backup_minimal_gets_defaults_and_paths_resolve_beside_the_config() {
        assert!(parse(MINIMAL).unwrap().backup.is_none());
        let b = backup_of(&format!("{MINIMAL}{BACKUP}"));
        assert_eq!(b.dir, Path::new("/etc/kw/backups"));
        assert_eq!(
            b.recipients_files,
            vec![PathBuf::from("/etc/kw/officers.txt")]
        );
        assert!(b.verify_identity_file.is_none());
        assert!(b.schedule.is_none() && b.verify_schedule.is_none());
        assert_eq!((b.keep_daily, b.keep_weekly), (7, 4));
        assert_eq!(
            (b.retry_min, b.retry_max),
            (Duration::from_secs(30), Duration::from_secs(3600))
        );
        assert!(b.locations.is_empty());

        let b = backup_of(&format!(
            "{MINIMAL}[backup]\ndir = \"/var/backups/kw\"\n\
             recipients_files = [\"r/a.txt\", \"/srv/b.txt\"]\n\
             verify_identity_file = \"ids/verify.txt\"\n\
             schedule = \"0 3 * * *\"\nverify_schedule = \"30 4 * * 1\"\n\
             keep_daily = 0\nkeep_weekly = 0\nretry_min_secs = 5\nretry_max_secs = 5\n\
             [[backup.locations]]\nname = \"nas\"\ntype = \"dir\"\npath = \"../nas\"\ntimeout_secs = 9\n\
             [[backup.locations]]\nname = \"s3_offsite\"\ntype = \"s3\"\nbucket = \"kw\"\nprefix = \"prod\"\n\
             access_key_id_file = \"s3.id\"\nsecret_access_key_env = \"S3_SECRET\"\n"
        ));
        assert_eq!(b.dir, Path::new("/var/backups/kw"));
        assert_eq!(
            b.recipients_files,
            vec![
                PathBuf::from("/etc/kw/r/a.txt"),
                PathBuf::from("/srv/b.txt")
            ]
        );
        assert_eq!(
            b.verify_identity_file.as_deref(),
            Some(Path::new("/etc/kw/ids/verify.txt"))
        );
        assert!(b.schedule.is_some() && b.verify_schedule.is_some());
        assert_eq!((b.keep_daily, b.keep_weekly), (0, 0));
        assert_eq!(b.retry_max, Duration::from_secs(5));
        assert_eq!(b.locations[0].name, "nas");
        assert_eq!(b.locations[0].timeout, Duration::from_secs(9));
        assert!(matches!(
            &b.locations[0].kind,
            BackupLocationKind::Dir { path } if path == Path::new("/etc/kw/../nas")
        ));
        assert_eq!(b.locations[1].timeout, Duration::from_secs(300));
        let s3 = s3_of(&b, 1);
        assert_eq!(
            (s3.bucket.as_str(), s3.prefix.as_str(), s3.region.as_str()),
            ("kw", "prod/", "us-east-1")
        );
        assert!(s3.endpoint.is_none() && !s3.allow_http);
        assert_eq!(
            s3.access_key_id.as_ref().unwrap().from,
            SecretRef::File(PathBuf::from("/etc/kw/s3.id"))
        );
        assert_eq!(
            s3.secret_access_key.as_ref().unwrap().from,
            SecretRef::Env("S3_SECRET".into())
        );
    }

    #[test]
    fn audit_defaults_values_and_refusals() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.audit, AuditConfig::default());
        let c = parse(&format!(
            "{MINIMAL}[audit]\ncheckpoint_every_events = 5\ncheckpoint_interval_secs = 2\n\
             checkpoint_file = \"cp.jsonl\"\nverify_interval_secs = 10\nkey_algorithm = \"ecdsa-p384\"\n"
        ))
        .unwrap();
        assert_eq!(c.audit.checkpoint_every_events, 5);
        assert_eq!(c.audit.checkpoint_interval, Duration::from_secs(2));
        assert_eq!(
            c.audit.checkpoint_file.as_deref(),
            Some(Path::new("/etc/kw/cp.jsonl"))
        );
        assert_eq!(c.audit.key_algorithm, crate::model::KeyAlgorithm::EcdsaP384);
        let with = |t: &str| format!("{MINIMAL}[audit]\n{t}\n");
        refused(&with("keystore = \"nope\""), "audit.keystore");
        refused(&with("key_algorithm = \"dsa\""), "audit.key_algorithm");
        refused(
            &with("checkpoint_every_events = 0"),
            "audit.checkpoint_every_events",
        );
        refused(
            &with("checkpoint_every_events = 10000001"),
            "audit.checkpoint_every_events",
        );
        refused(
            &with("checkpoint_interval_secs = 0"),
            "audit.checkpoint_interval_secs",
        );
        refused(
            &with("checkpoint_interval_secs = 86401"),
            "audit.checkpoint_interval_secs",
        );
        refused(
            &with("verify_interval_secs = 9"),
            "audit.verify_interval_secs",
        );
        refused(
            &with("verify_interval_secs = 86401"),
            "audit.verify_interval_secs",
        );
        refused(&with("sign_every = 3"), "sign_every");
    }

    #[test]
    fn backup_refusals_name_their_key() {
        let with = |rest: &str| format!("{MINIMAL}{BACKUP}{rest}");
        // Recipients: absent, or an empty list.
        refused(
            &format!("{MINIMAL}[backup]\ndir = \"b\"\n"),
            "recipients_files",
        );
        refused(
            &format!("{MINIMAL}[backup]\ndir = \"b\"\nrecipients_files = []\n"),
            "backup.recipients_files",
        );
        refused(&with("schedule = \"every night\"\n"), "backup.schedule");
        refused(
            &with("verify_schedule = \"61 * * * *\"\n"),
            "backup.verify_schedule",
        );
        let e = refused(
            &with("retry_min_secs = 60\nretry_max_secs = 59\n"),
            "backup.retry_max_secs",
        );
        assert!(e.contains("retry_min_secs"), "{e}");
        refused(&with("keep_daily = 4000\n"), "backup.keep_daily");
        refused(&with("colour = \"blue\"\n"), "colour");

        let dir = |name: &str| {
            format!("[[backup.locations]]\nname = \"{name}\"\ntype = \"dir\"\npath = \"d\"\n")
        };
        let e = refused(
            &with(&format!("{}{}", dir("nas"), dir("nas"))),
            "backup.locations[1].name",
        );
        assert!(e.contains("twice"), "{e}");
        for bad in ["", "a b", "nas/1", "n\u{e4}s", "a.b"] {
            refused(&with(&dir(bad)), "backup.locations[0].name");
        }
        refused(
            &with("[[backup.locations]]\nname = \"x\"\ntype = \"ftp\"\n"),
            "backup.locations[0].type",
        );
        refused(
            &with("[[backup.locations]]\nname = \"x\"\ntype = \"dir\"\n"),
            "backup.locations[0].path",
        );
        // A `dir` location with S3 keys: refused, not silently ignored.
        for extra in [
            "bucket = \"b\"",
            "endpoint = \"https://s3.example\"",
            "region = \"eu\"",
            "access_key_id_env = \"K\"",
        ] {
            refused(
                &with(&format!("{}{extra}\n", dir("nas"))),
                "backup.locations[0].type",
            );
        }

        let s3 = |rest: &str| {
            with(&format!(
                "[[backup.locations]]\nname = \"s3\"\ntype = \"s3\"\n{rest}"
            ))
        };
        refused(&s3(""), "backup.locations[0].bucket");
        refused(&s3("bucket = \"\"\n"), "backup.locations[0].bucket");
        refused(
            &s3("bucket = \"b\"\npath = \"p\"\n"),
            "backup.locations[0].path",
        );
        refused(
            &s3("bucket = \"b\"\nprefix = \"/abs\"\n"),
            "backup.locations[0].prefix",
        );
        refused(
            &s3("bucket = \"b\"\nprefix = \"a/../b\"\n"),
            "backup.locations[0].prefix",
        );
        refused(
            &s3("bucket = \"b\"\nendpoint = \"ftp://s3.example\"\n"),
            "backup.locations[0].endpoint",
        );
        // Plain HTTP only when asked for.
        let http = "bucket = \"b\"\nendpoint = \"http://127.0.0.1:8333\"\n";
        let e = refused(&s3(http), "backup.locations[0].endpoint");
        assert!(e.contains("allow_http"), "{e}");
        let b = backup_of(&s3(&format!("{http}allow_http = true\n")));
        let loc = s3_of(&b, 0);
        assert!(loc.allow_http);
        assert_eq!(loc.endpoint.as_deref(), Some("http://127.0.0.1:8333"));
        // Credentials: both or neither, never one.
        let b = backup_of(&s3("bucket = \"b\"\n"));
        assert!(s3_of(&b, 0).access_key_id.is_none() && s3_of(&b, 0).secret_access_key.is_none());
        let b = backup_of(&s3(
            "bucket = \"b\"\naccess_key_id_env = \"K\"\nsecret_access_key_file = \"s3.secret\"\n",
        ));
        assert_eq!(
            s3_of(&b, 0).secret_access_key.as_ref().unwrap().from,
            SecretRef::File(PathBuf::from("/etc/kw/s3.secret"))
        );
        for one in [
            "access_key_id_env = \"K\"",
            "access_key_id_file = \"k\"",
            "secret_access_key_env = \"S\"",
            "secret_access_key_file = \"s\"",
        ] {
            let e = refused(
                &s3(&format!("bucket = \"b\"\n{one}\n")),
                "backup.locations[0].access_key_id",
            );
            assert!(e.contains("neither"), "{e}");
        }
        // One secret from two sources.
        let e = refused(
            &s3(
                "bucket = \"b\"\naccess_key_id_env = \"K\"\naccess_key_id_file = \"k\"\nsecret_access_key_env = \"S\"\n",
            ),
            "backup.locations[0].access_key_id",
        );
        assert!(e.contains("only one"), "{e}");
        let e = refused(
            &s3(
                "bucket = \"b\"\naccess_key_id_env = \"K\"\nsecret_access_key_env = \"S\"\nsecret_access_key_file = \"s\"\n",
            ),
            "backup.locations[0].secret_access_key",
        );
        assert!(e.contains("only one"), "{e}");
        refused(
            &s3("bucket = \"b\"\naccess_key_id_env = \"\"\nsecret_access_key_env = \"S\"\n"),
            "backup.locations[0].access_key_id_env",
        );
    }

    /// The shipped example, with its commented YubiKey section switched on,
    /// is a valid config: every key it documents exists and its values pass.
    #[test]
    fn the_example_config_is_valid() {
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("keyward.example.toml"),
        )
        .unwrap();
        parse(&example).unwrap();
        let mut on = false;
        let enabled: Vec<&str> = example
            .lines()
            .map(|l| {
                if l.starts_with("# [keystores.")
                    || l.starts_with("# [server.tls]")
                    || l.starts_with("# [broker]")
                    || l.starts_with("# [[notify]]")
                    || l.starts_with("# [backup]")
                    || l.starts_with("# [audit]")
                {
                    on = true;
                } else if !l.starts_with('#') {
                    on = false;
                }
                if on {
                    l.strip_prefix("# ").unwrap_or(l)
                } else {
                    l
                }
            })
            .collect();
        let c = parse(&enabled.join("\n")).unwrap();
        assert_eq!(
            c.keystores.len(),
            1,
            "the YubiKey example was not switched on"
        );
        assert!(
            matches!(c.broker.backend, BrokerBackendConfig::Mosquitto(_)),
            "the broker example was not switched on"
        );
        assert!(
            matches!(
                c.notify.as_slice(),
                [
                    NotifierConfig::Log { .. },
                    NotifierConfig::Webhook(_),
                    NotifierConfig::Smtp(_)
                ]
            ),
            "the notify examples were not switched on: {:?}",
            c.notify
        );
        let backup = c
            .backup
            .as_ref()
            .expect("the backup example was not switched on");
        assert!(backup.schedule.is_some() && backup.verify_schedule.is_some());
        assert!(
            matches!(
                backup.locations.iter().map(|l| &l.kind).collect::<Vec<_>>().as_slice(),
                [BackupLocationKind::Dir { .. }, BackupLocationKind::S3(s)]
                    if s.access_key_id.is_some() && s.secret_access_key.is_some()
            ),
            "the backup locations were not switched on: {:?}",
            backup.locations
        );
        assert_eq!(
            c.audit.checkpoint_file.as_deref(),
            Some(Path::new("/var/log/keyward/audit-checkpoints.jsonl")),
            "the audit example was not switched on"
        );
        assert_eq!(c.audit.verify_interval, Duration::from_secs(300));
        assert!(
            matches!(
                c.server.tls.as_ref().map(|t| &t.source),
                Some(TlsSource::Files { .. })
            ),
            "the TLS files example was not switched on"
        );
        // The issue-mode keys, switched on instead of the two files.
        // Only within [server.tls] (it ends where [store] begins): other
        // sections have keys of the same names.
        let tls_end = enabled
            .iter()
            .position(|l| *l == "[store]")
            .unwrap_or(enabled.len());
        let issue: Vec<String> = enabled
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.starts_with("certificate_file") && !l.starts_with("key_file"))
            .map(|(i, l)| {
                l.strip_prefix("# ")
                    .filter(|_| i < tls_end)
                    .filter(|rest| {
                        [
                            "issue",
                            "issuer",
                            "dns_names",
                            "ip_addresses",
                            "validity_days",
                            "renew_before_days",
                            "key_algorithm",
                        ]
                        .iter()
                        .any(|k| rest.starts_with(&format!("{k} =")))
                    })
                    .unwrap_or(l)
                    .to_string()
            })
            .collect();
        let c = parse(&issue.join("\n")).unwrap();
        let Some(TlsSource::Issue(i)) = c.server.tls.as_ref().map(|t| &t.source) else {
            panic!("the TLS issue example was not switched on")
        };
        assert_eq!((i.validity_days, i.renew_before_days), (90, 30));
    }

    #[test]
    fn audit_sink_is_checked() {
        use crate::audit::sink::{SinkConfig, SinkPolicy, SinkTarget};
        assert!(parse(MINIMAL).unwrap().audit.sink.is_none());
        let sink = |extra: &str| {
            parse(&format!("{MINIMAL}[audit.sink]\n{extra}\n"))
                .unwrap()
                .audit
                .sink
                .unwrap()
        };
        let file = sink("type = \"file\"\npath = \"audit.jsonl\"");
        assert_eq!(file.policy, SinkPolicy::FailClosed);
        assert_eq!(file.buffer_max, 100_000);
        assert!(matches!(&file.target, SinkTarget::File(p) if p.is_absolute()));
        assert_eq!(
            sink(
                "type = \"syslog\"\naddress = \"127.0.0.1:514\"\npolicy = \"buffer\"\nbuffer_max = 5"
            ),
            SinkConfig {
                target: SinkTarget::SyslogUdp("127.0.0.1:514".into()),
                policy: SinkPolicy::Buffer,
                buffer_max: 5,
            }
        );
        assert!(matches!(
            sink("type = \"syslog\"\npath = \"/dev/log\"").target,
            SinkTarget::SyslogUnix(_)
        ));
        for (extra, key) in [
            ("type = \"kafka\"\npath = \"x\"", "audit.sink.type"),
            ("type = \"file\"", "audit.sink"),
            (
                "type = \"file\"\npath = \"x\"\naddress = \"127.0.0.1:1\"",
                "audit.sink",
            ),
            ("type = \"syslog\"", "audit.sink"),
            (
                "type = \"syslog\"\naddress = \"no-port\"",
                "audit.sink.address",
            ),
            (
                "type = \"file\"\npath = \"x\"\npolicy = \"best-effort\"",
                "audit.sink.policy",
            ),
            (
                "type = \"file\"\npath = \"x\"\nbuffer_max = 0",
                "audit.sink.buffer_max",
            ),
            ("type = \"file\"\npath = \"x\"\nfsync = false", "fsync"),
        ] {
            refused(&format!("{MINIMAL}[audit.sink]\n{extra}\n"), key);
        }
        // The example's commented [audit] and [audit.sink] parse when switched on.
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("keyward.example.toml"),
        )
        .unwrap();
        let start = example
            .find("# [audit]\n")
            .expect("the example documents [audit]");
        let mut enabled = example[..start].to_string();
        for line in example[start..].lines() {
            match line.strip_prefix("# ") {
                Some(l) if l.starts_with('[') || l.contains(" = ") => {
                    enabled.push_str(l);
                }
                _ => enabled.push_str(line),
            }
            enabled.push('\n');
        }
        let enabled = enabled.replace(
            "checkpoint_file = \"/var/lib/keyward-audit/checkpoints.jsonl\"",
            "checkpoint_file = \"checkpoints.jsonl\"",
        );
        let audit = parse(&enabled).unwrap().audit;
        assert_eq!(audit.checkpoint_every_events, 10_000);
        let s = audit.sink.expect("the example's [audit.sink]");
        assert_eq!((s.policy, s.buffer_max), (SinkPolicy::FailClosed, 100_000));
    }
}
