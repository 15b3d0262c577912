//! Lifecycle states and kinds stored with records, as stable strings.

use serde::{Deserialize, Serialize};

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $variant),+
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
    /// What a key is for. `ocsp-signing`: a CA's delegated OCSP responder;
    /// `tls-server`: keyward's own TLS server key (`[server.tls] issue = true`).
    KeyPurpose {
        RootCa = "root-ca",
        IssuingCa = "issuing-ca",
        Device = "device",
        TokenSigning = "token-signing",
        Audit = "audit",
        BackupWrap = "backup-wrap",
        OcspSigning = "ocsp-signing",
        TlsServer = "tls-server",
        /// RSA key pair whose private half (decrypt only, in the HSM)
        /// unwraps the data keys that seal sensitive audit details.
        AuditEncryption = "audit-encryption",
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

string_enum!(
    /// What an admin request asks for.
    AdminRequestKind {
        Invite = "invite",
        SetRole = "set-role",
    }
);

string_enum!(
    /// `pending` (waits for a second admin) → `approved` (an invitation is
    /// redeemable; a role change is applied) → `redeemed` (invitation used),
    /// or `denied` / `expired`.
    AdminRequestStatus {
        Pending = "pending",
        Approved = "approved",
        Redeemed = "redeemed",
        Denied = "denied",
        Expired = "expired",
    }
);

string_enum!(
    /// How a registration's device proved who it is.
    AttestationMethod {
        None = "none",
        BootstrapToken = "bootstrap-token",
        X509 = "x509",
        Jwt = "jwt",
        /// Re-binding an existing device identity to a new key with an
        /// admin-issued one-time code.
        Reclaim = "reclaim",
    }
);

string_enum!(
    /// Where a device's key pair comes from.
    KeySource {
        /// The device sends a CSR; its key never leaves it.
        Csr = "csr",
        /// Generated in the HSM and delivered once, encrypted.
        Server = "server",
    }
);

string_enum!(
    /// Admin-minted enrollment secrets.
    EnrollmentTokenKind {
        /// Attests a registration to one group (`--uses N`).
        Bootstrap = "bootstrap",
        /// Lets one existing device re-bind its identity to a new key, once.
        Reclaim = "reclaim",
    }
);

string_enum!(
    /// Where a rotation stands: the last step it committed. The steps run in
    /// this order; `destroyed` is the end. `abandoned`: an operator (or a
    /// step that can never succeed) stopped it before activation, and the
    /// new key, if any, was destroyed.
    RotationStep {
        Planned = "planned",
        KeyGenerated = "key-generated",
        Certified = "certified",
        Published = "published",
        Activated = "activated",
        Retired = "retired",
        Destroyed = "destroyed",
        Abandoned = "abandoned",
    }
);

impl RotationStep {
    /// Still running: a manual rotation of the same key is a conflict.
    /// (`retired` only waits for the old key's certificates to expire.)
    pub fn running(self) -> bool {
        matches!(
            self,
            Self::Planned
                | Self::KeyGenerated
                | Self::Certified
                | Self::Published
                | Self::Activated
        )
    }

    /// Finished: nothing more to do.
    pub fn finished(self) -> bool {
        matches!(self, Self::Destroyed | Self::Abandoned)
    }
}

string_enum!(
    /// What made a backup.
    BackupTrigger {
        Manual = "manual",
        Scheduled = "scheduled",
    }
);

string_enum!(
    /// Where one backup stands in one location.
    ReplicaState {
        /// Not uploaded yet (the first attempt has not run).
        Pending = "pending",
        /// Uploaded and its checksum read back.
        Stored = "stored",
        /// The last attempt failed; retried at `next_attempt_at`.
        Failed = "failed",
        /// Removed by retention.
        Pruned = "pruned",
    }
);
