//! Rows as the services see them. Times are Unix seconds unless named `_ms`.

use crate::auth::Role;
use crate::keystore::{KeyAlgorithm, KeyHandle};
use crate::policy::CaKind;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $s)] $variant),+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $s),+ }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(Self::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// What a key is for.
    KeyPurpose {
        RootCa = "root-ca",
        IssuingCa = "issuing-ca",
        Device = "device",
        TokenSigning = "token-signing",
        Audit = "audit",
        BackupWrap = "backup-wrap",
    }
);

string_enum!(
    /// NIST SP 800-57 key states, plus `generating` for a key whose HSM
    /// object may exist but whose creation has not been confirmed.
    KeyState {
        Generating = "generating",
        PreActive = "pre-active",
        Active = "active",
        Retired = "retired",
        Destroyed = "destroyed",
        Compromised = "compromised",
    }
);

string_enum!(
    RegistrationStatus {
        Pending = "pending",
        Approved = "approved",
        Issued = "issued",
        Denied = "denied",
        Expired = "expired",
    }
);

string_enum!(
    Decision {
        Approve = "approve",
        Deny = "deny",
    }
);

string_enum!(
    DeviceStatus {
        Active = "active",
        Suspended = "suspended",
        Revoked = "revoked",
    }
);

string_enum!(
    CertificateStatus {
        Valid = "valid",
        Revoked = "revoked",
        Superseded = "superseded",
    }
);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: Uuid,
    pub label: String,
    pub purpose: KeyPurpose,
    pub algorithm: KeyAlgorithm,
    /// Backend type (`pkcs11`, `yubikey`).
    pub backend: String,
    /// Name of the configured key store holding it (`default` or `keystores.NAME`).
    pub keystore: String,
    pub handle: KeyHandle,
    /// DER SubjectPublicKeyInfo; empty while `generating`.
    #[serde(skip)]
    pub public_key_der: Vec<u8>,
    pub state: KeyState,
    pub ca_name: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaRecord {
    pub name: String,
    pub kind: CaKind,
    pub parent: Option<String>,
    pub key_id: Uuid,
    #[serde(skip)]
    pub certificate_der: Vec<u8>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminRecord {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    #[serde(skip)]
    pub token_hash: Vec<u8>,
    pub disabled: bool,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistrationRecord {
    pub id: Uuid,
    pub device_id: Uuid,
    pub group: String,
    pub status: RegistrationStatus,
    pub name: String,
    pub device_type: Option<String>,
    pub location: Option<String>,
    pub firmware: Option<String>,
    #[serde(skip)]
    pub csr_der: Vec<u8>,
    pub key_algorithm: KeyAlgorithm,
    #[serde(skip)]
    pub secret_hash: Vec<u8>,
    /// The admin who submitted it on a device's behalf, if any.
    pub submitted_by: Option<Uuid>,
    pub submitted_at: i64,
    pub expires_at: i64,
    pub decided_at: Option<i64>,
    pub certificate_serial: Option<String>,
    pub credentials_fetched_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApprovalRecord {
    pub registration_id: Uuid,
    pub admin_id: Uuid,
    pub decision: Decision,
    pub comment: Option<String>,
    pub decided_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: Uuid,
    pub name: String,
    pub device_type: Option<String>,
    pub location: Option<String>,
    pub firmware: Option<String>,
    pub group: String,
    pub status: DeviceStatus,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateRecord {
    /// Upper-case hex of the DER serial number.
    pub serial: String,
    pub device_id: Option<Uuid>,
    pub issuer_ca: String,
    pub issuer_key_id: Uuid,
    pub subject: String,
    pub not_before: i64,
    pub not_after: i64,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub fingerprint_sha256: String,
    #[serde(skip)]
    pub der: Vec<u8>,
    pub status: CertificateStatus,
    pub revoked_at: Option<i64>,
    pub revocation_reason: Option<String>,
    pub created_at: i64,
}
