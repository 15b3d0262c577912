//! Policies: `policies/ca.toml` (CA hierarchy and certificate profiles) and
//! `policies/enrollment.toml` (enrollment groups), parsed into typed,
//! cross-checked values. Every file carries `version = 1`.

use crate::model::KeyAlgorithm;
pub use crate::model::{CaKind, valid_name};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupPolicy {
    pub name: String,
    pub profile: String,
    /// Distinct admins who must approve. 0 approves automatically: anyone who
    /// can reach the endpoint gets a certificate (benchmarks, labs only).
    pub approvals_required: u32,
    /// Lowest role allowed to approve (`approver` or `admin`).
    #[serde(default = "default_approver_role")]
    pub approver_role: crate::model::Role,
    /// Pending registrations expire after this long.
    #[serde(default = "default_ttl")]
    pub registration_ttl_hours: u32,
    /// Cap on `pending` registrations of this group: past it, submissions are
    /// refused (429) and nothing is stored, so anonymous callers cannot bury
    /// the approval queue or fill the disk.
    #[serde(default = "default_max_pending")]
    pub max_pending: u32,
    /// After the first delivery, the device may fetch its certificate and
    /// chain again (a lost response) for this long, or until it confirms.
    #[serde(default = "default_refetch_minutes")]
    pub credentials_refetch_minutes: u32,
    /// Returned to the device with its credentials (broker endpoint, topics, …).
    #[serde(default)]
    pub device_config: BTreeMap<String, toml::Value>,
}

fn default_approver_role() -> crate::model::Role {
    crate::model::Role::Approver
}
fn default_ttl() -> u32 {
    72
}
fn default_max_pending() -> u32 {
    1000
}
fn default_refetch_minutes() -> u32 {
    15
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
        let ca_text = read(&ca_path)?;
        let en_text = read(&en_path)?;
        Self::from_texts(&ca_path, &ca_text, &en_path, &en_text)
    }

    pub fn from_texts(
        ca_path: &Path,
        ca_text: &str,
        en_path: &Path,
        en_text: &str,
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
                            format!("validity_days exceeds parent `{p}`'s"),
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
        Ok(Self {
            cas: ca.ca,
            profiles,
            groups,
            revocation: ca.revocation,
        })
    }

    pub fn ca(&self, name: &str) -> Option<&CaPolicy> {
        self.cas.iter().find(|c| c.name == name)
    }
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

    #[test]
    fn wrong_version_is_refused() {
        assert!(load(&CA.replacen("version = 1", "version = 2", 1), EN).is_err());
    }
}
