//! Enrollment groups (`policies/enrollment.toml`): how a device proves who
//! it is, who approves, where its key comes from, and what it is handed
//! (configuration template, broker ACL).

pub use crate::model::{AttestationMethod, KeySource};
use crate::model::{KeyAlgorithm, Role};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Placeholders a device-configuration template or a broker topic may use.
pub const PLACEHOLDERS: &[&str] = &["device_id", "device_name", "group"];

/// How a device proves who it is when it registers. The group a device
/// lands in follows from this proof; only `none` groups are chosen by name.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum AttestationPolicy {
    /// No proof: the device names the group.
    #[default]
    None,
    /// A one-time (or N-use) token an admin minted for this group.
    BootstrapToken,
    /// A manufacturer certificate chaining to `manufacturer_ca`.
    X509(X509Attestation),
    /// A JWT from a trusted issuer (SIM-based identity service style).
    Jwt(JwtAttestation),
}

impl AttestationPolicy {
    pub fn method(&self) -> AttestationMethod {
        match self {
            Self::None => AttestationMethod::None,
            Self::BootstrapToken => AttestationMethod::BootstrapToken,
            Self::X509(_) => AttestationMethod::X509,
            Self::Jwt(_) => AttestationMethod::Jwt,
        }
    }
}

/// `method = "x509"` (seed 000, plgd DPS style).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct X509Attestation {
    /// PEM file with the manufacturer CA certificate(s) this group trusts
    /// (relative paths are relative to the policies directory).
    pub manufacturer_ca: PathBuf,
    /// Optional PEM or DER CRL of the manufacturer CA; listed certificates
    /// are refused.
    #[serde(default)]
    pub manufacturer_crl: Option<PathBuf>,
    /// Optional: the manufacturer certificate's subject common name must
    /// start with this (narrows a group further; more specific wins).
    #[serde(default)]
    pub subject_cn_prefix: Option<String>,
}

/// `method = "jwt"` (seed 003, SORACOM Endorse style).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JwtAttestation {
    /// Expected `iss`.
    pub issuer: String,
    /// Expected `aud` (one of the token's audiences).
    pub audience: String,
    /// JWKS from a file (relative to the policies directory) …
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// … or from a URL (https, or http on loopback), cached and refreshed.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Allowed JWS algorithms. Asymmetric only (`ES256`, `ES384`, `RS256`,
    /// `PS256`, `EdDSA`): `none` and HMAC are refused at load.
    #[serde(default = "default_jwt_algorithms")]
    pub algorithms: Vec<String>,
    /// The claim naming the device (e.g. `imsi`): the same value always
    /// maps to the same device identity.
    pub device_claim: String,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u32,
    /// A JWKS from a URL is fetched again after this long (and at once when
    /// a token names an unknown `kid`, at most once a minute).
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_minutes: u32,
}

fn default_jwt_algorithms() -> Vec<String> {
    vec!["ES256".to_string()]
}
fn default_leeway() -> u32 {
    60
}
fn default_jwks_refresh() -> u32 {
    60
}

/// Whether registrations need admins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApprovalMode {
    /// Issued as soon as the attestation passes.
    Auto,
    /// `approvals_required` distinct admins of at least `approver_role`.
    #[default]
    Quorum,
}

// The broker ACL types live in `model` (the store's broker outbox carries them).
pub use crate::model::{BrokerAccess, BrokerAclRule};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupPolicy {
    pub name: String,
    pub profile: String,
    #[serde(default)]
    pub attestation: AttestationPolicy,
    #[serde(default)]
    pub approval: ApprovalMode,
    /// Distinct admins who must approve (`approval = "quorum"`, at least 1).
    #[serde(default = "default_approvals")]
    pub approvals_required: u32,
    /// Lowest role allowed to approve (`approver` or `admin`).
    #[serde(default = "default_approver_role")]
    pub approver_role: Role,
    /// `approval = "auto"` without attestation issues to anyone who reaches
    /// the API; refused unless this says so (labs and benchmarks only).
    #[serde(default)]
    pub open_enrollment: bool,
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
    #[serde(default = "default_key_source")]
    pub key_source: KeySource,
    /// Algorithm of server-generated keys; the profile's first when absent.
    #[serde(default)]
    pub server_key_algorithm: Option<KeyAlgorithm>,
    /// Keep the HSM copy of a server-generated key after delivery.
    #[serde(default)]
    pub escrow: bool,
    /// Returned to the device with its credentials (broker endpoint, topics,
    /// operator keys); `{device_id}`, `{device_name}` and `{group}` are
    /// substituted in every string, `{{`/`}}` are literal braces.
    #[serde(default)]
    pub device_config: BTreeMap<String, toml::Value>,
    /// Topics the device's certificate identity is granted on the broker.
    #[serde(default)]
    pub broker_acl: Vec<BrokerAclRule>,
}

impl GroupPolicy {
    /// Approvals needed before issuance: 0 for `approval = "auto"`.
    pub fn approvals_needed(&self) -> u32 {
        match self.approval {
            ApprovalMode::Auto => 0,
            ApprovalMode::Quorum => self.approvals_required,
        }
    }

    pub fn method(&self) -> AttestationMethod {
        self.attestation.method()
    }

    /// The device-configuration template rendered for one device.
    pub fn render_device_config(&self, vars: &TemplateVars<'_>) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (k, v) in &self.device_config {
            out.insert(k.clone(), render_value(v, vars));
        }
        serde_json::Value::Object(out)
    }

    /// The broker ACL rendered for one device.
    pub fn render_broker_acl(&self, vars: &TemplateVars<'_>) -> Vec<BrokerAclRule> {
        self.broker_acl
            .iter()
            .map(|r| BrokerAclRule {
                topic: substitute(&r.topic, vars).unwrap_or_else(|_| r.topic.clone()),
                access: r.access,
            })
            .collect()
    }
}

fn default_key_source() -> KeySource {
    KeySource::Csr
}
fn default_approvals() -> u32 {
    2
}
fn default_approver_role() -> Role {
    Role::Approver
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

/// Values substituted into templates.
pub struct TemplateVars<'a> {
    pub device_id: &'a str,
    pub device_name: &'a str,
    pub group: &'a str,
}

impl TemplateVars<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        match name {
            "device_id" => Some(self.device_id),
            "device_name" => Some(self.device_name),
            "group" => Some(self.group),
            _ => None,
        }
    }
}

/// Substitutes `{name}` placeholders; `{{` and `}}` are literal braces.
/// Errors name the first unknown placeholder or unbalanced brace.
pub fn substitute(s: &str, vars: &TemplateVars<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => name.push(ch),
                        None => return Err(format!("unclosed `{{{name}`")),
                    }
                }
                match vars.get(&name) {
                    Some(v) => out.push_str(v),
                    None => {
                        return Err(format!(
                            "unknown placeholder `{{{name}}}` (known: {})",
                            PLACEHOLDERS
                                .iter()
                                .map(|p| format!("{{{p}}}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                }
            }
            '}' => return Err("unbalanced `}` (write `}}` for a literal brace)".into()),
            c => out.push(c),
        }
    }
    Ok(out)
}

const CHECK_VARS: TemplateVars<'static> = TemplateVars {
    device_id: "x",
    device_name: "x",
    group: "x",
};

fn render_value(v: &toml::Value, vars: &TemplateVars<'_>) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        toml::Value::String(s) => J::String(substitute(s, vars).unwrap_or_else(|_| s.clone())),
        toml::Value::Integer(i) => J::from(*i),
        toml::Value::Float(f) => J::from(*f),
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(a) => J::Array(a.iter().map(|x| render_value(x, vars)).collect()),
        toml::Value::Table(t) => J::Object(
            t.iter()
                .map(|(k, x)| (k.clone(), render_value(x, vars)))
                .collect(),
        ),
    }
}

/// Checks every string of a template: the first bad one is returned with
/// its dotted key.
pub(super) fn check_template(prefix: &str, v: &toml::Value) -> Result<(), (String, String)> {
    match v {
        toml::Value::String(s) => substitute(s, &CHECK_VARS)
            .map(|_| ())
            .map_err(|e| (prefix.to_string(), e)),
        toml::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                check_template(&format!("{prefix}[{i}]"), x)?;
            }
            Ok(())
        }
        toml::Value::Table(t) => {
            for (k, x) in t {
                check_template(&format!("{prefix}.{k}"), x)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// An MQTT topic filter: `#` only as the whole last level, `+` only as a
/// whole level, no NUL, not empty.
pub(super) fn check_topic_filter(topic: &str) -> Result<(), String> {
    let rendered = substitute(topic, &CHECK_VARS)?;
    if rendered.is_empty() || rendered.contains('\0') || rendered.len() > 1024 {
        return Err("must be a non-empty MQTT topic filter".into());
    }
    let levels: Vec<&str> = rendered.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("`#` may only be the whole last level".into());
        }
        if level.contains('+') && *level != "+" {
            return Err("`+` must be a whole level".into());
        }
    }
    Ok(())
}

/// The JWS algorithm names keyward verifies; anything else (notably `none`
/// and the HMAC family) is refused at policy load.
pub const JWT_ALGORITHMS: &[&str] = &[
    "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "EdDSA",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> TemplateVars<'static> {
        TemplateVars {
            device_id: "0190",
            device_name: "pump-7",
            group: "plant",
        }
    }

    #[test]
    fn placeholders_are_substituted_and_braces_escaped() {
        assert_eq!(
            substitute("cmd/v1/{device_id}/req", &vars()).unwrap(),
            "cmd/v1/0190/req"
        );
        assert_eq!(substitute("{{x}} {group}", &vars()).unwrap(), "{x} plant");
    }

    #[test]
    fn unknown_or_unbalanced_placeholders_are_named() {
        let e = substitute("dt/{imei}/x", &vars()).unwrap_err();
        assert!(e.contains("{imei}"), "{e}");
        assert!(substitute("dt/{device_id", &vars()).is_err());
        assert!(substitute("dt/}", &vars()).is_err());
    }

    #[test]
    fn topic_filters_follow_mqtt_rules() {
        assert!(check_topic_filter("dt/v1/{device_id}/#").is_ok());
        assert!(check_topic_filter("cmd/+/{device_id}").is_ok());
        assert!(check_topic_filter("dt/#/x").is_err());
        assert!(check_topic_filter("dt/a+").is_err());
        assert!(check_topic_filter("").is_err());
    }

    #[test]
    fn nested_templates_render() {
        let mut g: GroupPolicy = toml::from_str(
            "name='g'\nprofile='p'\n[device_config]\nmqtt={topics=['dt/v1/{device_id}/status'], qos=1}\n",
        )
        .unwrap();
        g.approval = ApprovalMode::Auto;
        let v = g.render_device_config(&vars());
        assert_eq!(v["mqtt"]["topics"][0], "dt/v1/0190/status");
        assert_eq!(v["mqtt"]["qos"], 1);
        assert_eq!(g.approvals_needed(), 0);
    }
}
