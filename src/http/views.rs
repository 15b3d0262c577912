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
