//! The TOML file as written: serde structs that refuse unknown keys. Nothing
//! outside `config` sees them; `Config` is built from them with every value
//! checked once.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    #[serde(default)]
    pub server: Server,
    pub store: Store,
    pub keystore: KeyStore,
    #[serde(default)]
    pub keystores: BTreeMap<String, KeyStore>,
    pub auth: Auth,
    #[serde(default)]
    pub policies: Policies,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub broker: Broker,
    #[serde(default)]
    pub jobs: Jobs,
    #[serde(default)]
    pub scheduler: Scheduler,
    /// `[[notify]]`: notification backends, in order.
    #[serde(default)]
    pub notify: Vec<Notify>,
    /// `[backup]`: encrypted backups and where they are replicated.
    pub backup: Option<Backup>,
    /// `[audit]`: checkpoints, detail encryption, sinks.
    #[serde(default)]
    pub audit: Audit,
    /// `[redis]`: shared state of several daemons; absent: in process.
    pub redis: Option<Redis>,
}

/// `[redis]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Redis {
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    pub key_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Audit {
    pub keystore: Option<String>,
    pub key_algorithm: Option<String>,
    pub checkpoint_every_events: Option<u64>,
    pub checkpoint_interval_secs: Option<u64>,
    pub checkpoint_file: Option<PathBuf>,
    pub verify_interval_secs: Option<u64>,
    pub encrypt_details: Option<bool>,
    pub sink: Option<AuditSink>,
}

/// `[audit.sink]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditSink {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: Option<PathBuf>,
    pub address: Option<String>,
    pub policy: Option<String>,
    pub buffer_max: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Backup {
    pub dir: PathBuf,
    pub recipients_files: Vec<PathBuf>,
    pub verify_identity_file: Option<PathBuf>,
    pub schedule: Option<String>,
    pub verify_schedule: Option<String>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub retry_min_secs: Option<u64>,
    pub retry_max_secs: Option<u64>,
    #[serde(default)]
    pub locations: Vec<BackupLocation>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BackupLocation {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub path: Option<PathBuf>,
    pub bucket: Option<String>,
    pub prefix: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub allow_http: Option<bool>,
    pub access_key_id_file: Option<PathBuf>,
    pub access_key_id_env: Option<String>,
    pub secret_access_key_file: Option<PathBuf>,
    pub secret_access_key_env: Option<String>,
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Jobs {
    pub renewal_notice_interval_seconds: Option<u64>,
    pub metrics_refresh_interval_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Broker {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub url: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    pub timeout_secs: Option<u64>,
    pub flush_timeout_secs: Option<u64>,
    pub retry_min_secs: Option<u64>,
    pub retry_max_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(super) enum Notify {
    Log(NotifyLog),
    Webhook(NotifyWebhook),
    Smtp(NotifySmtp),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NotifyLog {
    pub queue_capacity: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NotifyWebhook {
    pub url: String,
    pub secret_file: Option<PathBuf>,
    pub secret_env: Option<String>,
    pub timeout_seconds: Option<u64>,
    pub max_attempts: Option<u32>,
    pub initial_backoff_ms: Option<u64>,
    pub max_backoff_seconds: Option<u64>,
    pub queue_capacity: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NotifySmtp {
    pub host: String,
    pub port: Option<u16>,
    /// `none`, `starttls` (default) or `tls`.
    pub tls: Option<String>,
    pub allow_plaintext: Option<bool>,
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    pub helo_name: Option<String>,
    pub from: String,
    #[serde(default)]
    pub approvers: Vec<String>,
    #[serde(default)]
    pub admins: Vec<String>,
    pub timeout_seconds: Option<u64>,
    pub max_attempts: Option<u32>,
    pub initial_backoff_ms: Option<u64>,
    pub max_backoff_seconds: Option<u64>,
    pub queue_capacity: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Scheduler {
    /// Whole or fractional seconds (`15`, `1.5`).
    pub lease_seconds: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Limits {
    pub registrations_per_source: Option<u32>,
    pub registrations_window_secs: Option<u64>,
    pub renewals_per_source: Option<u32>,
    pub renewals_window_secs: Option<u64>,
    pub admin_login_failures_per_source: Option<u32>,
    pub admin_login_failures_window_secs: Option<u64>,
    pub tracked_sources: Option<usize>,
    pub login_failure_audit_window_secs: Option<u64>,
    pub readiness_max_age_secs: Option<u64>,
    pub ocsp_fresh_per_source: Option<u32>,
    pub ocsp_fresh_window_secs: Option<u64>,
    pub ocsp_cache_entries: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Server {
    pub listen: Option<SocketAddr>,
    pub body_limit_bytes: Option<usize>,
    pub request_timeout_secs: Option<u64>,
    pub trusted_proxies: Option<Vec<String>>,
    pub public_url: Option<String>,
    pub tls: Option<Tls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Tls {
    pub certificate_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub issue: Option<bool>,
    pub issuer: Option<String>,
    pub dns_names: Option<Vec<String>>,
    pub ip_addresses: Option<Vec<String>>,
    pub validity_days: Option<u32>,
    pub renew_before_days: Option<u32>,
    pub key_algorithm: Option<String>,
    pub client_auth: Option<String>,
    pub handshake_timeout_secs: Option<u64>,
    pub max_handshakes: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(super) enum Store {
    Sqlite(Sqlite),
    Postgres(Postgres),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Postgres {
    pub url: String,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    pub pool_size: Option<usize>,
    pub batch_max: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Sqlite {
    pub path: PathBuf,
    pub batch_max: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(super) enum KeyStore {
    Pkcs11(Pkcs11),
    Yubikey(YubiKey),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Pkcs11 {
    pub module: PathBuf,
    pub token_label: Option<String>,
    pub token_serial: Option<String>,
    pub token_uri: Option<String>,
    pub pin_file: Option<PathBuf>,
    pub pin_env: Option<String>,
    pub sessions: Option<usize>,
    pub signer_threads: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct YubiKey {
    pub serial: u32,
    pub slot: Option<String>,
    pub pin_file: Option<PathBuf>,
    pub pin_env: Option<String>,
    pub management_key_file: Option<PathBuf>,
    pub management_key_env: Option<String>,
    pub management_key_algorithm: Option<String>,
    pub pin_policy: Option<String>,
    pub touch_policy: Option<String>,
    pub attestation_root: Option<PathBuf>,
    pub sign_timeout_secs: Option<u64>,
    pub dangerously_generate_into_unverified_slot: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Auth {
    pub token_pepper_file: Option<PathBuf>,
    pub token_pepper_env: Option<String>,
    pub token_ttl_seconds: Option<u64>,
    pub token_issuer: Option<String>,
    pub token_audience: Option<String>,
    pub token_reuse_seconds: Option<u64>,
    pub token_key_overlap_seconds: Option<u64>,
    pub token_keystore: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Policies {
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Log {
    pub level: Option<String>,
    pub format: Option<super::LogFormat>,
    pub sensitive_details: Option<bool>,
}
