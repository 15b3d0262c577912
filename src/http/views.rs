//! Response bodies. Records are mapped explicitly so that hashes, CSRs and
//! other internals never reach the wire by accident.

use crate::clock::{from_unix, rfc3339};
use crate::store::{AdminRecord, ApprovalRecord, RegistrationRecord};
use serde::Serialize;

#[derive(Serialize)]
pub struct RegistrationView {
    pub id: String,
    pub device_id: String,
    pub status: String,
    pub group: String,
    pub name: String,
    pub device_type: Option<String>,
    pub location: Option<String>,
    pub firmware: Option<String>,
    pub key_algorithm: String,
    pub submitted_by: Option<String>,
    pub submitted_at: String,
    pub expires_at: String,
    pub decided_at: Option<String>,
    pub certificate_serial: Option<String>,
    pub credentials_delivered: bool,
    pub credentials_confirmed: bool,
    /// Where the submission came from (after trusted proxies), for approvers.
    pub client_addr: Option<String>,
    /// How the device proved who it is, and what that showed.
    pub attestation: String,
    pub attestation_details: Option<serde_json::Value>,
    /// The admin who minted the bootstrap token or reclaim code used (who
    /// cannot approve this registration).
    pub token_minted_by: Option<String>,
    /// The device existed before (re-provisioning or reclaim).
    pub reenrollment: bool,
    pub key_source: String,
}

impl From<&RegistrationRecord> for RegistrationView {
    fn from(r: &RegistrationRecord) -> Self {
        Self {
            id: r.id.to_string(),
            device_id: r.device_id.to_string(),
            status: r.status.to_string(),
            group: r.group.clone(),
            name: r.name.clone(),
            device_type: r.device_type.clone(),
            location: r.location.clone(),
            firmware: r.firmware.clone(),
            key_algorithm: r.key_algorithm.to_string(),
            submitted_by: r.submitted_by.map(|u| format!("admin:{u}")),
            submitted_at: rfc3339(from_unix(r.submitted_at)),
            expires_at: rfc3339(from_unix(r.expires_at)),
            decided_at: r.decided_at.map(|t| rfc3339(from_unix(t))),
            certificate_serial: r.certificate_serial.clone(),
            credentials_delivered: r.credentials_fetched_at.is_some(),
            credentials_confirmed: r.credentials_confirmed_at.is_some(),
            client_addr: r.client_addr.clone(),
            attestation: r.attestation.to_string(),
            attestation_details: r.attestation_details.clone(),
            token_minted_by: r.token_minted_by.map(|u| format!("admin:{u}")),
            reenrollment: r.reenrollment,
            key_source: r.key_source.to_string(),
        }
    }
}

#[derive(Serialize)]
pub struct ApprovalView {
    pub admin_id: String,
    pub decision: String,
    pub comment: Option<String>,
    pub decided_at: String,
    /// False when the admin was disabled since: the decision no longer counts.
    pub counted: bool,
}

impl From<&ApprovalRecord> for ApprovalView {
    fn from(a: &ApprovalRecord) -> Self {
        Self {
            admin_id: a.admin_id.to_string(),
            decision: a.decision.to_string(),
            comment: a.comment.clone(),
            decided_at: rfc3339(from_unix(a.decided_at)),
            counted: a.counted,
        }
    }
}

#[derive(Serialize)]
pub struct AdminView {
    pub id: String,
    pub name: String,
    pub role: String,
    pub disabled: bool,
    pub created_at: String,
}

impl From<&AdminRecord> for AdminView {
    fn from(a: &AdminRecord) -> Self {
        Self {
            id: a.id.to_string(),
            name: a.name.clone(),
            role: a.role.to_string(),
            disabled: a.disabled,
            created_at: rfc3339(from_unix(a.created_at)),
        }
    }
}

#[derive(Serialize)]
pub struct DeviceView {
    pub id: String,
    pub name: String,
    pub device_type: Option<String>,
    pub location: Option<String>,
    pub firmware: Option<String>,
    pub group: String,
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&crate::store::DeviceRecord> for DeviceView {
    fn from(d: &crate::store::DeviceRecord) -> Self {
        Self {
            id: d.id.to_string(),
            name: d.name.clone(),
            device_type: d.device_type.clone(),
            location: d.location.clone(),
            firmware: d.firmware.clone(),
            group: d.group.clone(),
            status: d.status.to_string(),
            created_at: rfc3339(from_unix(d.created_at)),
            updated_at: rfc3339(from_unix(d.updated_at)),
        }
    }
}

#[derive(Serialize)]
pub struct CertificateView {
    pub serial: String,
    pub device_id: Option<String>,
    pub issuer: String,
    pub subject: String,
    pub not_before: String,
    pub not_after: String,
    pub fingerprint_sha256: String,
    /// `valid`, `revoked` or `superseded`.
    pub status: String,
    /// Revoked with `certificate-hold`: suspended, can be released.
    pub on_hold: bool,
    pub revoked_at: Option<String>,
    /// RFC 5280 name (`key-compromise`) and CRLReason code.
    pub revocation_reason: Option<String>,
    pub revocation_reason_code: Option<u8>,
    pub superseded_by: Option<String>,
}

impl From<&crate::store::CertificateRecord> for CertificateView {
    fn from(c: &crate::store::CertificateRecord) -> Self {
        Self {
            serial: c.serial.clone(),
            device_id: c.device_id.map(|d| d.to_string()),
            issuer: c.issuer_ca.clone(),
            subject: c.subject.clone(),
            not_before: rfc3339(from_unix(c.not_before)),
            not_after: rfc3339(from_unix(c.not_after)),
            fingerprint_sha256: c.fingerprint_sha256.clone(),
            status: c.status.to_string(),
            on_hold: c.on_hold(),
            revoked_at: c.revoked_at.map(|t| rfc3339(from_unix(t))),
            revocation_reason: c.revocation_reason.map(|r| r.to_string()),
            revocation_reason_code: c.revocation_reason.map(|r| r.code()),
            superseded_by: c.superseded_by.clone(),
        }
    }
}

/// The response header that tells a device its renewal window is open.
pub const RENEWAL_DUE_HEADER: &str = "keyward-renewal-due";

/// Adds `Keyward-Renewal-Due: true` to a device-facing answer when `hint`
/// says the current certificate is due for renewal.
pub fn mark_renewal_due(
    resp: &mut axum::response::Response,
    hint: Option<&crate::ca::RenewalHint>,
) {
    if hint.is_some_and(|h| h.due) {
        resp.headers_mut().insert(
            RENEWAL_DUE_HEADER,
            axum::http::HeaderValue::from_static("true"),
        );
    }
}

/// `GET /v1/registrations/{id}`: the registration and, once issued, the
/// renewal hint of its device's current certificate.
#[derive(Serialize)]
pub struct RegistrationStatusView {
    #[serde(flatten)]
    pub registration: RegistrationView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renewal: Option<crate::ca::RenewalHint>,
}
