//! Policies: `policies/ca.toml` (CA hierarchy and certificate profiles),
//! `policies/enrollment.toml` (enrollment groups) and the optional
//! `policies/rotation.toml` (key rotation), parsed into typed,
//! cross-checked values. Every file carries `version = 1`.

use crate::model::KeyAlgorithm;
pub use crate::model::{CaKind, valid_name};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod enrollment;
mod rotation;
pub use enrollment::{
    ApprovalMode, AttestationMethod, AttestationPolicy, BrokerAccess, BrokerAclRule, GroupPolicy,
    JWT_ALGORITHMS, JwtAttestation, KeySource, PLACEHOLDERS, TemplateVars, X509Attestation,
    substitute,
};
pub use rotation::{
    DEFAULT_SCHEDULE, KeyRotation, ROTATABLE, ROTATION_FILE, RotationPolicy, Schedule,
};

pub const POLICY_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubjectPolicy {
    pub common_name: String,
    #[serde(default)]
    pub organization: Option<String>,
    #[serde(default)]
    pub organizational_unit: Option<String>,
    /// ISO 3166 two-letter code.
    #[serde(default)]
    pub country: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaPolicy {
    pub name: String,
    pub kind: CaKind,
    #[serde(default)]
    pub parent: Option<String>,
    pub algorithm: KeyAlgorithm,
    pub subject: SubjectPolicy,
    pub validity_days: u32,
    /// basicConstraints pathLenConstraint; `None` means unlimited.
    #[serde(default)]
    pub path_len: Option<u8>,
    /// Key store (from `keystores.NAME` in keyward.toml) holding this CA's
    /// key; the default key store when absent.
    #[serde(default)]
    pub keystore: Option<String>,
    /// Whether backups carry this CA's private key (wrapped inside the HSM
    /// under a one-time key encrypted to the backup recipients). `None`:
    /// the default for the kind, `wrap-only` for an issuing CA, `never` for
    /// a root. Fixed when the key is generated (`CKA_EXTRACTABLE`).
    #[serde(default)]
    pub backup: Option<KeyBackup>,
}

/// Whether a key may leave its HSM inside a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyBackup {
    /// Generated sensitive and extractable: the private key can leave the
    /// HSM only wrapped (`CKM_AES_KEY_WRAP_PAD`), never in plaintext.
    WrapOnly,
    /// Generated non-extractable: it never leaves its HSM; a restore needs
    /// the original hardware.
    Never,
}

impl CaPolicy {
    /// The backup rule for this CA's key, defaults applied.
    pub fn key_backup(&self) -> KeyBackup {
        self.backup.unwrap_or(match self.kind {
            CaKind::Root => KeyBackup::Never,
            CaKind::Issuing => KeyBackup::WrapOnly,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExtendedKeyUsage {
    ClientAuth,
    ServerAuth,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilePolicy {
    pub name: String,
    /// The CA that signs certificates of this profile.
    pub issuer: String,
    pub validity_days: u32,
    /// Key algorithms a device CSR may use.
    pub key_algorithms: Vec<KeyAlgorithm>,
    #[serde(default = "default_eku")]
    pub extended_key_usage: Vec<ExtendedKeyUsage>,
    /// notBefore is set this far in the past to absorb device clock skew.
    #[serde(default = "default_backdate")]
    pub backdate_seconds: u32,
    /// A device may renew once its certificate has at most this many days
    /// left (an admin can force a renewal earlier).
    #[serde(default = "default_renewal_window")]
    pub renewal_window_days: u32,
}

fn default_renewal_window() -> u32 {
    30
}

/// How CRLs and OCSP responses are produced (`[revocation]` in ca.toml).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationPolicy {
    /// nextUpdate = thisUpdate + this, for every CA's CRL.
    #[serde(default = "default_crl_validity")]
    pub crl_validity_hours: u32,
    /// The scheduler publishes a new CRL this long before nextUpdate.
    #[serde(default = "default_crl_refresh")]
    pub crl_refresh_before_hours: u32,
    /// Revocations within this many milliseconds share one new CRL.
    #[serde(default = "default_crl_debounce")]
    pub crl_debounce_ms: u32,
    /// Signed CRLs kept per CA in the store (the newest ones).
    #[serde(default = "default_crls_kept")]
    pub crls_kept: u32,
    /// nextUpdate of an OCSP response = thisUpdate + this.
    #[serde(default = "default_ocsp_validity")]
    pub ocsp_validity_minutes: u32,
    /// A cached OCSP response is signed again this long before its nextUpdate.
    #[serde(default = "default_ocsp_refresh")]
    pub ocsp_refresh_before_minutes: u32,
    /// Validity of a delegated OCSP signing certificate.
    #[serde(default = "default_ocsp_signer_validity")]
    pub ocsp_signer_validity_days: u32,
    /// The OCSP signing key and certificate are replaced this long before expiry.
    #[serde(default = "default_ocsp_signer_renew")]
    pub ocsp_signer_renew_before_days: u32,
    #[serde(default = "default_ocsp_signer_algorithm")]
    pub ocsp_signer_algorithm: KeyAlgorithm,
}

fn default_crl_validity() -> u32 {
    24
}
fn default_crl_refresh() -> u32 {
    6
}
fn default_crl_debounce() -> u32 {
    1000
}
fn default_crls_kept() -> u32 {
    10
}
fn default_ocsp_validity() -> u32 {
    60
}
fn default_ocsp_refresh() -> u32 {
    10
}
fn default_ocsp_signer_validity() -> u32 {
    30
}
fn default_ocsp_signer_renew() -> u32 {
    7
}
fn default_ocsp_signer_algorithm() -> KeyAlgorithm {
    KeyAlgorithm::EcdsaP256
}

impl Default for RevocationPolicy {
    fn default() -> Self {
        Self {
            crl_validity_hours: default_crl_validity(),
            crl_refresh_before_hours: default_crl_refresh(),
            crl_debounce_ms: default_crl_debounce(),
            crls_kept: default_crls_kept(),
            ocsp_validity_minutes: default_ocsp_validity(),
            ocsp_refresh_before_minutes: default_ocsp_refresh(),
            ocsp_signer_validity_days: default_ocsp_signer_validity(),
            ocsp_signer_renew_before_days: default_ocsp_signer_renew(),
            ocsp_signer_algorithm: default_ocsp_signer_algorithm(),
        }
    }
}

fn default_eku() -> Vec<ExtendedKeyUsage> {
    vec![ExtendedKeyUsage::ClientAuth]
}
fn default_backdate() -> u32 {
    300
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaFile {
    version: u32,
    #[serde(default)]
    ca: Vec<CaPolicy>,
    #[serde(default)]
    profile: Vec<ProfilePolicy>,
    #[serde(default)]
    revocation: RevocationPolicy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollmentFile {
    version: u32,
    #[serde(default)]
    group: Vec<GroupPolicy>,
}

/// All policies, validated against each other.
#[derive(Debug, Clone)]
pub struct Policies {
    /// In dependency order: every parent before its children.
    pub cas: Vec<CaPolicy>,
    pub profiles: BTreeMap<String, ProfilePolicy>,
    pub groups: BTreeMap<String, GroupPolicy>,
    pub revocation: RevocationPolicy,
    /// `rotation.toml`, or the defaults when the file is absent.
    pub rotation: RotationPolicy,
    /// The policies directory: relative paths in the files (manufacturer
    /// CAs, JWKS files) are relative to it.
    pub dir: PathBuf,
    /// SHA-256 (hex) of `ca.toml`, `enrollment.toml` and `rotation.toml`
    /// as loaded: audited on reload, old and new.
    pub hashes: PolicyHashes,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyHashes {
    pub ca: String,
    pub enrollment: String,
    /// `None` when `rotation.toml` is absent (the defaults are in force).
    pub rotation: Option<String>,
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse<T: for<'de> Deserialize<'de>>(path: &Path, text: &str) -> Result<T, PolicyError> {
    toml::from_str(text).map_err(|e| PolicyError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().replace('\n', " "),
    })
}

impl Policies {
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let ca_path = dir.join("ca.toml");
        let en_path = dir.join("enrollment.toml");
        let ro_path = dir.join(ROTATION_FILE);
        let ca_text = read(&ca_path)?;
        let en_text = read(&en_path)?;
        let ro_text = match std::fs::read_to_string(&ro_path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(PolicyError::Read {
                    path: ro_path,
                    source,
                });
            }
        };
        Self::from_texts_with_rotation(
            &ca_path,
            &ca_text,
            &en_path,
            &en_text,
            ro_text.as_deref().map(|t| (ro_path.as_path(), t)),
        )
    }

    /// `ca.toml` and `enrollment.toml`; the rotation defaults (as if
    /// `rotation.toml` were absent).
    pub fn from_texts(
        ca_path: &Path,
        ca_text: &str,
        en_path: &Path,
        en_text: &str,
    ) -> Result<Self, PolicyError> {
        Self::from_texts_with_rotation(ca_path, ca_text, en_path, en_text, None)
    }

    /// All three files; `rotation`: `(path, text)` of `rotation.toml`, or
    /// `None` when it is absent (the defaults apply, checked against
    /// `ca.toml` all the same).
    pub fn from_texts_with_rotation(
        ca_path: &Path,
        ca_text: &str,
        en_path: &Path,
        en_text: &str,
        rotation: Option<(&Path, &str)>,
    ) -> Result<Self, PolicyError> {
        let ca: CaFile = parse(ca_path, ca_text)?;
        let en: EnrollmentFile = parse(en_path, en_text)?;
        let bad = |path: &Path, key: String, reason: String| PolicyError::Invalid {
            path: path.to_path_buf(),
            key,
            reason,
        };
        if ca.version != POLICY_VERSION {
            return Err(bad(
                ca_path,
                "version".into(),
                format!(
                    "unsupported version {} (this keyward reads {POLICY_VERSION})",
                    ca.version
                ),
            ));
        }
        if en.version != POLICY_VERSION {
            return Err(bad(
                en_path,
                "version".into(),
                format!(
                    "unsupported version {} (this keyward reads {POLICY_VERSION})",
                    en.version
                ),
            ));
        }
        let mut seen: BTreeMap<String, CaPolicy> = BTreeMap::new();
        for (i, c) in ca.ca.iter().enumerate() {
            let key = format!("ca[{i}] ({})", c.name);
            if !valid_name(&c.name) {
                return Err(bad(
                    ca_path,
                    key,
                    "name must be 1-64 chars of a-z, 0-9, '-'".into(),
                ));
            }
            if seen.contains_key(&c.name) {
                return Err(bad(ca_path, key, "duplicate CA name".into()));
            }
            if c.validity_days == 0 {
                return Err(bad(ca_path, key, "validity_days must be positive".into()));
            }
            if c.subject.common_name.trim().is_empty() {
                return Err(bad(ca_path, key, "subject.common_name is empty".into()));
            }
            if let Some(country) = &c.subject.country
                && (country.len() != 2 || !country.chars().all(|ch| ch.is_ascii_uppercase()))
            {
                return Err(bad(
                    ca_path,
                    key,
                    "subject.country must be two upper-case letters".into(),
                ));
            }
            match (c.kind, &c.parent) {
                (CaKind::Root, Some(_)) => {
                    return Err(bad(ca_path, key, "a root CA has no parent".into()));
                }
                (CaKind::Issuing, None) => {
                    return Err(bad(ca_path, key, "an issuing CA needs a parent".into()));
                }
                (CaKind::Issuing, Some(p)) => {
                    let Some(parent) = seen.get(p) else {
                        return Err(bad(
                            ca_path,
                            key,
                            format!("parent `{p}` must be declared above this CA"),
                        ));
                    };
                    if parent.path_len == Some(0) {
                        return Err(bad(
                            ca_path,
                            key,
                            format!("parent `{p}` has path_len = 0 and cannot sign CAs"),
                        ));
                    }
                    if c.validity_days > parent.validity_days {
                        return Err(bad(
                            ca_path,
                            key,
                            format!(
                                "an issuing CA outliving its parent: validity_days {} exceeds parent `{p}`'s {}",
                                c.validity_days, parent.validity_days
                            ),
                        ));
                    }
                }
                (CaKind::Root, None) => {}
            }
            seen.insert(c.name.clone(), c.clone());
        }
        let mut profiles = BTreeMap::new();
        for (i, p) in ca.profile.iter().enumerate() {
            let key = format!("profile[{i}] ({})", p.name);
            if !valid_name(&p.name) {
                return Err(bad(
                    ca_path,
                    key,
                    "name must be 1-64 chars of a-z, 0-9, '-'".into(),
                ));
            }
            let Some(issuer) = seen.get(&p.issuer) else {
                return Err(bad(
                    ca_path,
                    key,
                    format!("issuer `{}` is not a CA in this file", p.issuer),
                ));
            };
            if issuer.path_len == Some(0) && issuer.kind == CaKind::Root {
                return Err(bad(ca_path, key, "issuer is a root with path_len 0".into()));
            }
            if p.validity_days == 0 || p.validity_days > issuer.validity_days {
                return Err(bad(
                    ca_path,
                    key,
                    "validity_days must be positive and within the issuer's".into(),
                ));
            }
            if p.key_algorithms.is_empty() {
                return Err(bad(ca_path, key, "key_algorithms is empty".into()));
            }
            if p.extended_key_usage.is_empty() {
                return Err(bad(ca_path, key, "extended_key_usage is empty".into()));
            }
            if p.renewal_window_days >= p.validity_days {
                return Err(bad(
                    ca_path,
                    key,
                    "renewal_window_days must be shorter than validity_days".into(),
                ));
            }
            if profiles.insert(p.name.clone(), p.clone()).is_some() {
                return Err(bad(ca_path, key, "duplicate profile name".into()));
            }
        }
        let mut groups = BTreeMap::new();
        for (i, g) in en.group.iter().enumerate() {
            let key = format!("group[{i}] ({})", g.name);
            if !valid_name(&g.name) {
                return Err(bad(
                    en_path,
                    key,
                    "name must be 1-64 chars of a-z, 0-9, '-'".into(),
                ));
            }
            if !profiles.contains_key(&g.profile) {
                return Err(bad(
                    en_path,
                    key,
                    format!("profile `{}` is not defined in ca.toml", g.profile),
                ));
            }
            check_group(g).map_err(|(k, reason)| bad(en_path, format!("{key}.{k}"), reason))?;
            if g.approvals_required > 10 {
                return Err(bad(
                    en_path,
                    key,
                    "approvals_required above 10 is not supported".into(),
                ));
            }
            if g.approver_role == crate::model::Role::Auditor {
                return Err(bad(
                    en_path,
                    key,
                    "approver_role must be approver or admin".into(),
                ));
            }
            if g.max_pending == 0 {
                return Err(bad(en_path, key, "max_pending must be at least 1".into()));
            }
            if g.registration_ttl_hours == 0 {
                return Err(bad(
                    en_path,
                    key,
                    "registration_ttl_hours must be positive".into(),
                ));
            }
            if groups.insert(g.name.clone(), g.clone()).is_some() {
                return Err(bad(en_path, key, "duplicate group name".into()));
            }
        }
        let r = &ca.revocation;
        let rkey = |k: &str| format!("revocation.{k}");
        if r.crl_validity_hours == 0 || r.crl_refresh_before_hours >= r.crl_validity_hours {
            return Err(bad(
                ca_path,
                rkey("crl_refresh_before_hours"),
                "must be shorter than crl_validity_hours (> 0)".into(),
            ));
        }
        if r.ocsp_validity_minutes == 0 || r.ocsp_refresh_before_minutes >= r.ocsp_validity_minutes
        {
            return Err(bad(
                ca_path,
                rkey("ocsp_refresh_before_minutes"),
                "must be shorter than ocsp_validity_minutes (> 0)".into(),
            ));
        }
        if r.ocsp_signer_validity_days == 0
            || r.ocsp_signer_renew_before_days >= r.ocsp_signer_validity_days
        {
            return Err(bad(
                ca_path,
                rkey("ocsp_signer_renew_before_days"),
                "must be shorter than ocsp_signer_validity_days (> 0)".into(),
            ));
        }
        if r.crls_kept == 0 {
            return Err(bad(ca_path, rkey("crls_kept"), "must be at least 1".into()));
        }
        let x509_groups: Vec<&GroupPolicy> = groups
            .values()
            .filter(|g| matches!(g.attestation, AttestationPolicy::X509(_)))
            .collect();
        for (i, a) in x509_groups.iter().enumerate() {
            for b in &x509_groups[i + 1..] {
                if a.attestation == b.attestation {
                    return Err(bad(
                        en_path,
                        format!("group ({}).attestation", b.name),
                        format!(
                            "same manufacturer CA and subject filter as group `{}`: which group a device lands in would be ambiguous",
                            a.name
                        ),
                    ));
                }
            }
        }
        let jwt_groups: Vec<(&str, &JwtAttestation)> = groups
            .values()
            .filter_map(|g| match &g.attestation {
                AttestationPolicy::Jwt(j) => Some((g.name.as_str(), j)),
                _ => None,
            })
            .collect();
        for (i, (an, a)) in jwt_groups.iter().enumerate() {
            for (bn, b) in &jwt_groups[i + 1..] {
                if a.issuer == b.issuer && a.audience == b.audience {
                    return Err(bad(
                        en_path,
                        format!("group ({bn}).attestation"),
                        format!(
                            "same JWT issuer and audience as group `{an}`: which group a device lands in would be ambiguous"
                        ),
                    ));
                }
            }
        }
        for g in groups.values() {
            if g.key_source == KeySource::Server {
                let profile = &profiles[&g.profile];
                let alg = g.server_key_algorithm.unwrap_or(profile.key_algorithms[0]);
                if !profile.key_algorithms.contains(&alg) {
                    return Err(bad(
                        en_path,
                        format!("group ({}).server_key_algorithm", g.name),
                        format!("{alg} is not allowed by profile `{}`", g.profile),
                    ));
                }
            }
        }
        let dir = en_path.parent().map(Path::to_path_buf).unwrap_or_default();
        let (rotation_policy, rotation_hash) = match rotation {
            Some((path, text)) => {
                let policy = RotationPolicy::from_text(path, text)?;
                policy.check_against(path, &ca.ca, &profiles, "")?;
                (policy, Some(sha256_hex(text)))
            }
            None => {
                let policy = RotationPolicy::default();
                policy.check_against(
                    &dir.join(ROTATION_FILE),
                    &ca.ca,
                    &profiles,
                    " (the built-in defaults: the file is absent; write it to choose values this ca.toml can meet)",
                )?;
                (policy, None)
            }
        };
        Ok(Self {
            cas: ca.ca,
            profiles,
            groups,
            revocation: ca.revocation,
            rotation: rotation_policy,
            dir,
            hashes: PolicyHashes {
                ca: sha256_hex(ca_text),
                enrollment: sha256_hex(en_text),
                rotation: rotation_hash,
            },
        })
    }

    /// Why `next` cannot replace `self` without a restart, if it cannot:
    /// the CA hierarchy and the revocation settings are fixed at start (the
    /// keys, issuers and publishers are built from them).
    pub fn reload_refusal(&self, next: &Policies) -> Option<String> {
        let cas = |p: &Policies| {
            p.cas
                .iter()
                .map(|c| toml::to_string(c).unwrap_or_default())
                .collect::<Vec<_>>()
        };
        if cas(self) != cas(next) {
            return Some(
                "the [[ca]] hierarchy changed: that needs `keyward init` and a restart".into(),
            );
        }
        let rev = |p: &Policies| toml::to_string(&p.revocation).unwrap_or_default();
        if rev(self) != rev(next) {
            return Some("[revocation] changed: that needs a restart".into());
        }
        None
    }

    /// Resolves a path from a policy file against the policies directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.dir.join(path)
        }
    }

    pub fn ca(&self, name: &str) -> Option<&CaPolicy> {
        self.cas.iter().find(|c| c.name == name)
    }
}

fn sha256_hex(text: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()))
}

/// Checks of one group that need no other policy; `(key, reason)`.
fn check_group(g: &GroupPolicy) -> Result<(), (String, String)> {
    let err = |k: &str, r: String| Err((k.to_string(), r));
    match g.approval {
        ApprovalMode::Quorum if g.approvals_required == 0 => {
            return err(
                "approvals_required",
                "must be at least 1 (write approval = \"auto\" to issue without admins)".into(),
            );
        }
        ApprovalMode::Auto if g.method() == AttestationMethod::None && !g.open_enrollment => {
            return err(
                "approval",
                "\"auto\" without attestation issues to anyone who reaches the API: set open_enrollment = true to mean it (labs only)".into(),
            );
        }
        _ => {}
    }
    if g.open_enrollment && g.method() != AttestationMethod::None {
        return err(
            "open_enrollment",
            "only applies to groups without attestation".into(),
        );
    }
    if g.escrow && g.key_source != KeySource::Server {
        return err("escrow", "only applies to key_source = \"server\"".into());
    }
    if g.server_key_algorithm.is_some() && g.key_source != KeySource::Server {
        return err(
            "server_key_algorithm",
            "only applies to key_source = \"server\"".into(),
        );
    }
    match &g.attestation {
        AttestationPolicy::Jwt(j) => {
            if j.issuer.trim().is_empty() || j.audience.trim().is_empty() {
                return err("attestation", "issuer and audience must be set".into());
            }
            if j.device_claim.trim().is_empty() {
                return err("attestation.device_claim", "must name a claim".into());
            }
            match (&j.jwks_file, &j.jwks_url) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => {
                    return err(
                        "attestation",
                        "exactly one of jwks_file and jwks_url must be set".into(),
                    );
                }
            }
            if j.algorithms.is_empty() {
                return err("attestation.algorithms", "is empty".into());
            }
            for a in &j.algorithms {
                if !JWT_ALGORITHMS.contains(&a.as_str()) {
                    return err(
                        "attestation.algorithms",
                        format!(
                            "`{a}` is not allowed (asymmetric only: {})",
                            JWT_ALGORITHMS.join(", ")
                        ),
                    );
                }
            }
            if j.jwks_refresh_minutes == 0 {
                return err(
                    "attestation.jwks_refresh_minutes",
                    "must be positive".into(),
                );
            }
        }
        AttestationPolicy::X509(x) => {
            if let Some(p) = &x.subject_cn_prefix
                && p.is_empty()
            {
                return err("attestation.subject_cn_prefix", "is empty".into());
            }
        }
        AttestationPolicy::None | AttestationPolicy::BootstrapToken => {}
    }
    for (k, v) in &g.device_config {
        enrollment::check_template(&format!("device_config.{k}"), v)?;
    }
    for (i, r) in g.broker_acl.iter().enumerate() {
        enrollment::check_topic_filter(&r.topic)
            .map_err(|e| (format!("broker_acl[{i}].topic"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str = include_str!("../../policies/ca.toml");
    const EN: &str = include_str!("../../policies/enrollment.toml");

    fn load(ca: &str, en: &str) -> Result<Policies, PolicyError> {
        Policies::from_texts(Path::new("ca.toml"), ca, Path::new("enrollment.toml"), en)
    }

    #[test]
    fn shipped_policies_are_valid() {
        let p = load(CA, EN).unwrap();
        assert_eq!(p.cas[0].kind, CaKind::Root);
        assert!(p.groups.contains_key("default"));
    }

    #[test]
    fn unknown_policy_key_is_named() {
        let e = load(
            &CA.replace(
                "validity_days = 365",
                "validity_days = 365\nvaliditydays = 1",
            ),
            EN,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("validitydays"), "{e}");
    }

    #[test]
    fn child_before_parent_is_refused() {
        let text = "version = 1\n[[ca]]\nname='i'\nkind='issuing'\nparent='r'\nalgorithm='ecdsa-p256'\nsubject={common_name='i'}\nvalidity_days=10\n";
        let e = load(text, "version = 1\n").unwrap_err().to_string();
        assert!(e.contains("declared above"), "{e}");
    }

    #[test]
    fn group_with_unknown_profile_is_refused() {
        let e = load(
            CA,
            "version = 1\n[[group]]\nname='g'\nprofile='nope'\napprovals_required=1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("nope"), "{e}");
    }

    const BASE: &str = "version = 1\n[[group]]\nname='g'\nprofile='device'\n";

    fn group_err(extra: &str) -> String {
        load(CA, &format!("{BASE}{extra}")).unwrap_err().to_string()
    }

    #[test]
    fn auto_approval_without_attestation_needs_open_enrollment() {
        assert!(group_err("approval='auto'\n").contains("open_enrollment"));
        let p = load(
            CA,
            &format!("{BASE}approval='auto'\nopen_enrollment=true\n"),
        )
        .unwrap();
        assert_eq!(p.groups["g"].approvals_needed(), 0);
        assert!(group_err("approvals_required=0\n").contains("approvals_required"));
        assert!(
            group_err("attestation={method='bootstrap-token'}\nopen_enrollment=true\n")
                .contains("open_enrollment")
        );
    }

    #[test]
    fn template_with_unknown_placeholder_is_refused_at_load() {
        let e = group_err("[group.device_config]\nmqtt={topic='dt/{imei}'}\n");
        assert!(
            e.contains("device_config.mqtt.topic") && e.contains("{imei}"),
            "{e}"
        );
        let e = group_err("[[group.broker_acl]]\ntopic='dt/{serial}/#'\naccess='publish'\n");
        assert!(e.contains("broker_acl[0].topic"), "{e}");
        let e = group_err("[[group.broker_acl]]\ntopic='dt/#/x'\naccess='publish'\n");
        assert!(e.contains("last level"), "{e}");
    }

    #[test]
    fn jwt_attestation_refuses_none_hmac_and_ambiguity() {
        let jwt = |alg: &str| {
            format!(
                "attestation={{method='jwt', issuer='i', audience='a', jwks_file='j.json', device_claim='imsi', algorithms=['{alg}']}}\n"
            )
        };
        assert!(group_err(&jwt("none")).contains("not allowed"));
        assert!(group_err(&jwt("HS256")).contains("not allowed"));
        assert!(load(CA, &format!("{BASE}{}", jwt("ES256"))).is_ok());
        let two = format!(
            "{BASE}{}[[group]]\nname='h'\nprofile='device'\n{}",
            jwt("ES256"),
            jwt("ES256")
        );
        assert!(
            load(CA, &two)
                .unwrap_err()
                .to_string()
                .contains("ambiguous")
        );
        assert!(
            group_err(
                "attestation={method='jwt', issuer='i', audience='a', device_claim='imsi'}\n"
            )
            .contains("exactly one of jwks_file")
        );
    }

    #[test]
    fn server_key_options_are_checked() {
        assert!(group_err("escrow=true\n").contains("escrow"));
        assert!(
            group_err("key_source='server'\nserver_key_algorithm='rsa-4096'\n")
                .contains("not allowed")
        );
        assert!(load(CA, &format!("{BASE}key_source='server'\nescrow=true\n")).is_ok());
    }

    #[test]
    fn reload_refuses_ca_changes() {
        let a = load(CA, EN).unwrap();
        let b = load(CA, &EN.replace("max_pending = 1000", "max_pending = 5")).unwrap();
        assert!(a.reload_refusal(&b).is_none());
        assert_ne!(a.hashes.enrollment, b.hashes.enrollment);
        let c = load(
            &CA.replacen("validity_days = 7300", "validity_days = 7000", 1),
            EN,
        )
        .unwrap();
        assert!(a.reload_refusal(&c).is_some());
    }

    const RO: &str = include_str!("../../policies/rotation.toml");

    fn load_dir(rotation: Option<&str>) -> Result<Policies, PolicyError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.toml"), CA).unwrap();
        std::fs::write(dir.path().join("enrollment.toml"), EN).unwrap();
        if let Some(r) = rotation {
            std::fs::write(dir.path().join("rotation.toml"), r).unwrap();
        }
        Policies::load(dir.path())
    }

    #[test]
    fn rotation_file_is_optional_and_hashed() {
        let absent = load_dir(None).unwrap();
        assert_eq!(absent.rotation, RotationPolicy::default());
        assert_eq!(absent.hashes.rotation, None);
        let shipped = load_dir(Some(RO)).unwrap();
        assert_eq!(shipped.rotation, RotationPolicy::default());
        assert_eq!(
            shipped.hashes.rotation.as_deref(),
            Some(sha256_hex(RO).as_str())
        );
        let custom = load_dir(Some(&RO.replace("max_age_days = 90", "max_age_days = 60"))).unwrap();
        assert_eq!(
            custom
                .rotation
                .key(crate::model::KeyPurpose::TlsServer)
                .unwrap()
                .max_age_days,
            60
        );
        // A bad rotation.toml fails the whole load, naming the file.
        let e = load_dir(Some(
            &RO.replace("schedule = \"0 3 * * *\"", "schedule = \"0 3 *\""),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("rotation.toml: schedule:"), "{e}");
    }

    #[test]
    fn unreadable_rotation_file_is_an_error_not_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.toml"), CA).unwrap();
        std::fs::write(dir.path().join("enrollment.toml"), EN).unwrap();
        // A directory where the file should be: not "absent".
        std::fs::create_dir(dir.path().join("rotation.toml")).unwrap();
        let e = Policies::load(dir.path()).unwrap_err();
        assert!(matches!(e, PolicyError::Read { .. }), "{e}");
        assert!(e.to_string().contains("rotation.toml"), "{e}");
    }

    #[test]
    fn defaults_are_checked_against_ca_toml_too() {
        // devices CA 1460 d < 1095 d + 365 d profile: the defaults cannot hold.
        let short = CA.replacen("validity_days = 1825", "validity_days = 1459", 1);
        let e = load(&short, EN).unwrap_err().to_string();
        assert!(
            e.contains("rotation.toml: keys.issuing-ca.max_age_days")
                && e.contains("`devices`")
                && e.contains("the file is absent"),
            "{e}"
        );
        assert!(
            load(
                &CA.replacen("validity_days = 1825", "validity_days = 1460", 1),
                EN
            )
            .is_ok()
        );
        // A rotation.toml that fits makes the same ca.toml load.
        let fits = RO.replace("max_age_days = 1095", "max_age_days = 1000");
        let p = Policies::from_texts_with_rotation(
            Path::new("ca.toml"),
            &short,
            Path::new("enrollment.toml"),
            EN,
            Some((Path::new("rotation.toml"), &fits)),
        )
        .unwrap();
        assert!(p.hashes.rotation.is_some());
    }

    #[test]
    fn issuing_ca_outliving_its_parent_is_refused() {
        let e = load(
            &CA.replacen("validity_days = 1825", "validity_days = 7301", 1),
            EN,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("ca.toml: ca[1] (devices)")
                && e.contains("an issuing CA outliving its parent"),
            "{e}"
        );
    }

    #[test]
    fn reload_accepts_rotation_changes() {
        let a = load_dir(Some(RO)).unwrap();
        let b = load_dir(Some(
            &RO.replace("rotate_before_days = 7", "rotate_before_days = 5"),
        ))
        .unwrap();
        let c = load_dir(None).unwrap();
        assert!(a.reload_refusal(&b).is_none());
        assert!(a.reload_refusal(&c).is_none());
        assert_ne!(a.hashes, b.hashes);
        assert_ne!(a.hashes, c.hashes);
        assert_eq!(a.hashes.ca, b.hashes.ca);
    }

    #[test]
    fn wrong_version_is_refused() {
        assert!(load(&CA.replacen("version = 1", "version = 2", 1), EN).is_err());
    }
}
