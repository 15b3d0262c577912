//! `keyward.toml`: typed, validated, unknown keys refused.
//!
//! Relative paths are resolved against the directory of the config file, so a
//! config moved together with its policies and secrets keeps working.

use crate::secret::SecretSource;
use serde::Deserialize;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub store: StoreConfig,
    /// The default key store: CAs without a `keystore =` in the policy live here.
    pub keystore: KeyStoreConfig,
    /// More key stores by name, e.g. a YubiKey holding the root CA.
    #[serde(default)]
    pub keystores: std::collections::BTreeMap<String, KeyStoreConfig>,
    pub auth: AuthConfig,
    #[serde(default)]
    pub policies: PoliciesConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Directory the config was read from; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    #[serde(skip)]
    pub source_path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_body_limit")]
    pub body_limit_bytes: usize,
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Reverse proxies whose `X-Forwarded-For` is believed (addresses or
    /// CIDR prefixes). Empty: the TCP peer is the client, the header is ignored.
    #[serde(default, deserialize_with = "ip_nets")]
    pub trusted_proxies: Vec<crate::model::IpNet>,
}

fn ip_nets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<crate::model::IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect()
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            body_limit_bytes: default_body_limit(),
            request_timeout_secs: default_request_timeout(),
            trusted_proxies: Vec::new(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_body_limit() -> usize {
    64 * 1024
}
fn default_request_timeout() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum StoreConfig {
    Sqlite(SqliteConfig),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteConfig {
    pub path: PathBuf,
    /// Most changes committed in one transaction by the group-commit writer.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
}

fn default_batch_max() -> usize {
    256
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum KeyStoreConfig {
    Pkcs11(Pkcs11Config),
    Yubikey(YubiKeyConfig),
}

/// The name of the default key store, as CA policies and key records name it.
pub use crate::model::DEFAULT_KEYSTORE;

/// A YubiKey's PIV applet, chosen by serial number.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YubiKeyConfig {
    /// Serial number printed on the key (`ykman list`). Required: another
    /// PC/SC reader, or a second YubiKey, must never be picked by accident.
    pub serial: u32,
    /// PIV slot that holds this key store's key: 9a, 9c, 9d, 9e or 82-95.
    #[serde(default = "default_slot")]
    pub slot: String,
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    #[serde(default)]
    pub pin_env: Option<String>,
    /// Management key, hex.
    #[serde(default)]
    pub management_key_file: Option<PathBuf>,
    #[serde(default)]
    pub management_key_env: Option<String>,
    /// 3des, aes128, aes192 or aes256. Firmware 5.7+ ships AES-192.
    #[serde(default = "default_mgm_alg")]
    pub management_key_algorithm: String,
    /// never, once or always (PIN before every signature).
    #[serde(default = "default_pin_policy")]
    pub pin_policy: String,
    /// never, always or cached.
    #[serde(default = "default_touch_policy")]
    pub touch_policy: String,
    /// PEM trust root for PIV attestation (Yubico's PIV root CA in production).
    #[serde(default)]
    pub attestation_root: Option<PathBuf>,
    /// How long a signing request waits for the card (it signs one at a time).
    #[serde(default = "default_sign_timeout")]
    pub sign_timeout_secs: u64,
}

fn default_slot() -> String {
    "9c".into()
}
fn default_mgm_alg() -> String {
    "aes192".into()
}
fn default_pin_policy() -> String {
    "always".into()
}
fn default_touch_policy() -> String {
    "never".into()
}
fn default_sign_timeout() -> u64 {
    30
}

impl YubiKeyConfig {
    pub fn pin_source(&self, name: &str) -> SecretSource {
        SecretSource::new(
            &format!("{name}.pin"),
            self.pin_file.as_deref(),
            self.pin_env.as_deref(),
        )
    }

    pub fn management_key_source(&self, name: &str) -> SecretSource {
        SecretSource::new(
            &format!("{name}.management_key"),
            self.management_key_file.as_deref(),
            self.management_key_env.as_deref(),
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    pub module: PathBuf,
    #[serde(default)]
    pub token_label: Option<String>,
    #[serde(default)]
    pub token_serial: Option<String>,
    /// RFC 7512 URI naming the token, e.g. `pkcs11:token=keyward`.
    #[serde(default)]
    pub token_uri: Option<String>,
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    #[serde(default)]
    pub pin_env: Option<String>,
    /// Logged-in sessions kept open; also the most signatures in flight.
    #[serde(default = "default_sessions")]
    pub sessions: usize,
}

fn default_sessions() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2)
}

impl Pkcs11Config {
    pub fn pin_source(&self) -> SecretSource {
        SecretSource::new(
            "keystore.pin",
            self.pin_file.as_deref(),
            self.pin_env.as_deref(),
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Pepper for hashing admin tokens and registration secrets (HMAC-SHA-256 key).
    #[serde(default)]
    pub token_pepper_file: Option<PathBuf>,
    #[serde(default)]
    pub token_pepper_env: Option<String>,
}

impl AuthConfig {
    pub fn pepper_source(&self) -> SecretSource {
        SecretSource::new(
            "auth.token_pepper",
            self.token_pepper_file.as_deref(),
            self.token_pepper_env.as_deref(),
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoliciesConfig {
    #[serde(default = "default_policies_dir")]
    pub dir: PathBuf,
}

impl Default for PoliciesConfig {
    fn default() -> Self {
        Self {
            dir: default_policies_dir(),
        }
    }
}

fn default_policies_dir() -> PathBuf {
    PathBuf::from("policies")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
    /// Log sensitive details (device ids, key labels, policy bodies). Off by default.
    #[serde(default)]
    pub sensitive_details: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_level(),
            format: LogFormat::default(),
            sensitive_details: false,
        }
    }
}

fn default_level() -> String {
    "info".to_string()
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[limits]`: per-source rate limits, the failed-login audit window and the
/// readiness staleness bound. Zero is refused for every key (by type).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_registrations_per_source")]
    pub registrations_per_source: NonZeroU32,
    #[serde(default = "default_registrations_window")]
    pub registrations_window_secs: NonZeroU64,
    #[serde(default = "default_login_failures_per_source")]
    pub admin_login_failures_per_source: NonZeroU32,
    #[serde(default = "default_login_failures_window")]
    pub admin_login_failures_window_secs: NonZeroU64,
    #[serde(default = "default_tracked_sources")]
    pub tracked_sources: NonZeroUsize,
    #[serde(default = "default_login_failure_audit_window")]
    pub login_failure_audit_window_secs: NonZeroU64,
    #[serde(default = "default_readiness_max_age")]
    pub readiness_max_age_secs: NonZeroU64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            registrations_per_source: default_registrations_per_source(),
            registrations_window_secs: default_registrations_window(),
            admin_login_failures_per_source: default_login_failures_per_source(),
            admin_login_failures_window_secs: default_login_failures_window(),
            tracked_sources: default_tracked_sources(),
            login_failure_audit_window_secs: default_login_failure_audit_window(),
            readiness_max_age_secs: default_readiness_max_age(),
        }
    }
}

fn default_registrations_per_source() -> NonZeroU32 {
    NonZeroU32::new(30).unwrap_or(NonZeroU32::MIN)
}
fn default_registrations_window() -> NonZeroU64 {
    NonZeroU64::new(60).unwrap_or(NonZeroU64::MIN)
}
fn default_login_failures_per_source() -> NonZeroU32 {
    NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN)
}
fn default_login_failures_window() -> NonZeroU64 {
    NonZeroU64::new(300).unwrap_or(NonZeroU64::MIN)
}
fn default_tracked_sources() -> NonZeroUsize {
    NonZeroUsize::new(100_000).unwrap_or(NonZeroUsize::MIN)
}
fn default_login_failure_audit_window() -> NonZeroU64 {
    NonZeroU64::new(60).unwrap_or(NonZeroU64::MIN)
}
fn default_readiness_max_age() -> NonZeroU64 {
    NonZeroU64::new(30).unwrap_or(NonZeroU64::MIN)
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::parse(&text, path)?;
        cfg.source_path = path.to_path_buf();
        cfg.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        cfg.resolve_paths();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text without touching the file system.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    fn resolve_paths(&mut self) {
        let base = self.base_dir.clone();
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let StoreConfig::Sqlite(s) = &mut self.store;
        s.path = resolve(&s.path);
        for ks in std::iter::once(&mut self.keystore).chain(self.keystores.values_mut()) {
            match ks {
                KeyStoreConfig::Pkcs11(k) => {
                    // A bare file name is left to the dynamic loader's search path.
                    if k.module.components().count() > 1 {
                        k.module = resolve(&k.module);
                    }
                    k.pin_file = k.pin_file.as_deref().map(resolve);
                }
                KeyStoreConfig::Yubikey(y) => {
                    y.pin_file = y.pin_file.as_deref().map(resolve);
                    y.management_key_file = y.management_key_file.as_deref().map(resolve);
                    y.attestation_root = y.attestation_root.as_deref().map(resolve);
                }
            }
        }
        self.auth.token_pepper_file = self.auth.token_pepper_file.as_deref().map(resolve);
        self.policies.dir = resolve(&self.policies.dir);
    }

    fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.source_path.clone(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// Checks that do not need the HSM or the database: one token selector,
    /// one source per secret, sane limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_keystore("keystore", &self.keystore)?;
        for (name, ks) in &self.keystores {
            if name == DEFAULT_KEYSTORE || !crate::policy::valid_name(name) {
                return Err(self.invalid(
                    &format!("keystores.{name}"),
                    "name must be 1-64 chars of a-z, 0-9, '-' and not `default`",
                ));
            }
            self.validate_keystore(&format!("keystores.{name}"), ks)?;
        }
        check_source(
            self,
            "auth.token_pepper",
            self.auth.token_pepper_file.is_some(),
            self.auth.token_pepper_env.is_some(),
        )?;
        if self.server.body_limit_bytes < 1024 || self.server.body_limit_bytes > 16 * 1024 * 1024 {
            return Err(self.invalid(
                "server.body_limit_bytes",
                "must be between 1024 and 16777216",
            ));
        }
        if self.server.request_timeout_secs == 0 {
            return Err(self.invalid("server.request_timeout_secs", "must be at least 1"));
        }
        let StoreConfig::Sqlite(s) = &self.store;
        if s.batch_max == 0 || s.batch_max > 10_000 {
            return Err(self.invalid("store.batch_max", "must be between 1 and 10000"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(self.invalid(
                "log.level",
                "not a valid tracing filter (e.g. `info`, `keyward=debug`)",
            ));
        }
        Ok(())
    }
}

impl Config {
    fn validate_keystore(&self, prefix: &str, ks: &KeyStoreConfig) -> Result<(), ConfigError> {
        match ks {
            KeyStoreConfig::Pkcs11(k) => {
                let selectors = [
                    k.token_label.is_some(),
                    k.token_serial.is_some(),
                    k.token_uri.is_some(),
                ]
                .iter()
                .filter(|b| **b)
                .count();
                if selectors != 1 {
                    return Err(self.invalid(
                        &format!("{prefix}.token_label"),
                        "set exactly one of token_label, token_serial or token_uri (tokens are chosen by label or serial, never by slot)",
                    ));
                }
                if let Some(uri) = &k.token_uri {
                    crate::keystore::pkcs11::uri::Pkcs11Uri::parse(uri)
                        .map_err(|e| self.invalid(&format!("{prefix}.token_uri"), e.to_string()))?;
                }
                if k.sessions == 0 || k.sessions > 256 {
                    return Err(
                        self.invalid(&format!("{prefix}.sessions"), "must be between 1 and 256")
                    );
                }
                check_source(
                    self,
                    &format!("{prefix}.pin"),
                    k.pin_file.is_some(),
                    k.pin_env.is_some(),
                )
            }
            KeyStoreConfig::Yubikey(y) => {
                crate::keystore::yubikey::parse_slot(&y.slot)
                    .map_err(|e| self.invalid(&format!("{prefix}.slot"), e))?;
                crate::keystore::yubikey::parse_management_algorithm(&y.management_key_algorithm)
                    .map_err(|e| self.invalid(&format!("{prefix}.management_key_algorithm"), e))?;
                crate::keystore::yubikey::parse_pin_policy(&y.pin_policy)
                    .map_err(|e| self.invalid(&format!("{prefix}.pin_policy"), e))?;
                crate::keystore::yubikey::parse_touch_policy(&y.touch_policy)
                    .map_err(|e| self.invalid(&format!("{prefix}.touch_policy"), e))?;
                if y.sign_timeout_secs == 0 {
                    return Err(
                        self.invalid(&format!("{prefix}.sign_timeout_secs"), "must be at least 1")
                    );
                }
                check_source(
                    self,
                    &format!("{prefix}.pin"),
                    y.pin_file.is_some(),
                    y.pin_env.is_some(),
                )?;
                check_source(
                    self,
                    &format!("{prefix}.management_key"),
                    y.management_key_file.is_some(),
                    y.management_key_env.is_some(),
                )
            }
        }
    }

    /// Every configured key store with its name, the default first.
    pub fn all_keystores(&self) -> Vec<(&str, &KeyStoreConfig)> {
        std::iter::once((DEFAULT_KEYSTORE, &self.keystore))
            .chain(self.keystores.iter().map(|(n, k)| (n.as_str(), k)))
            .collect()
    }
}

fn check_source(cfg: &Config, key: &str, file: bool, env: bool) -> Result<(), ConfigError> {
    match (file, env) {
        (true, true) => Err(cfg.invalid(key, format!("set only one of `{key}_file` and `{key}_env`"))),
        (false, false) => Err(cfg.invalid(
            key,
            format!("missing: set `{key}_file` (a path) or `{key}_env` (an environment variable name); secrets never come from the command line"),
        )),
        _ => Ok(()),
    }
}

impl Config {
    /// Reads the secrets the config points at (without using them), so that
    /// `config check` catches a missing PIN file or env var before start-up.
    pub fn keystore_pin_check(&self) -> Result<(), crate::secret::SecretError> {
        for (name, ks) in self.all_keystores() {
            match ks {
                KeyStoreConfig::Pkcs11(k) => k.pin_source().load().map(drop)?,
                KeyStoreConfig::Yubikey(y) => {
                    y.pin_source(name).load().map(drop)?;
                    y.management_key_source(name).load().map(drop)?;
                }
            }
        }
        self.auth.pepper_source().load().map(drop)
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

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = Config::parse(MINIMAL, Path::new("k.toml")).unwrap();
        assert_eq!(c.server.listen.port(), 8080);
        c.validate().unwrap();
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let text = format!("{MINIMAL}\n[bogus]\nx = 1\n");
        let e = Config::parse(&text, Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn unknown_key_inside_tagged_section_is_named() {
        let text = MINIMAL.replace("path = \"k.db\"", "path = \"k.db\"\npaht = 3");
        let e = Config::parse(&text, Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("paht"), "{e}");
    }

    #[test]
    fn limits_have_defaults_and_refuse_zero_and_unknown_keys() {
        let c = Config::parse(MINIMAL, Path::new("k.toml")).unwrap();
        assert_eq!(c.limits.registrations_per_source.get(), 30);
        assert_eq!(c.limits.readiness_max_age_secs.get(), 30);
        let text = format!("{MINIMAL}\n[limits]\nregistrations_per_source = 5\n");
        let c = Config::parse(&text, Path::new("k.toml")).unwrap();
        assert_eq!(c.limits.registrations_per_source.get(), 5);
        assert_eq!(c.limits.admin_login_failures_per_source.get(), 10);
        let text = format!("{MINIMAL}\n[limits]\nadmin_login_failures_per_source = 0\n");
        let e = Config::parse(&text, Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin_login_failures_per_source"), "{e}");
        let text = format!("{MINIMAL}\n[limits]\nregistration_per_source = 5\n");
        let e = Config::parse(&text, Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("registration_per_source"), "{e}");
        // The commented example documents real keys with the default values.
        let example = Config::parse(
            include_str!("../keyward.example.toml"),
            Path::new("keyward.example.toml"),
        )
        .unwrap();
        let (a, b) = (&example.limits, LimitsConfig::default());
        assert_eq!(
            (a.registrations_per_source, a.registrations_window_secs),
            (b.registrations_per_source, b.registrations_window_secs)
        );
        assert_eq!(
            (
                a.admin_login_failures_per_source,
                a.admin_login_failures_window_secs
            ),
            (
                b.admin_login_failures_per_source,
                b.admin_login_failures_window_secs
            )
        );
        assert_eq!(
            (
                a.tracked_sources,
                a.login_failure_audit_window_secs,
                a.readiness_max_age_secs
            ),
            (
                b.tracked_sources,
                b.login_failure_audit_window_secs,
                b.readiness_max_age_secs
            )
        );
    }

    #[test]
    fn two_token_selectors_are_refused() {
        let text = MINIMAL.replace(
            "token_label = \"keyward\"",
            "token_label = \"a\"\ntoken_serial = \"b\"",
        );
        let c = Config::parse(&text, Path::new("k.toml")).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("keystore.token_label"), "{e}");
    }

    #[test]
    fn pin_from_two_sources_is_refused() {
        let text = MINIMAL.replace(
            "pin_env = \"KEYWARD_HSM_PIN\"",
            "pin_env = \"X\"\npin_file = \"/p\"",
        );
        let c = Config::parse(&text, Path::new("k.toml")).unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("keystore.pin")
        );
    }
}
