//! Shared domain types: roles, CA kinds, key algorithms, handles and
//! lifecycle states. The bottom layer: it imports nothing of keyward, and
//! every other module may import it.

pub mod algorithm;
mod broker;
mod handle;
mod names;
mod net;
mod revocation;
mod role;
mod status;

pub use algorithm::KeyAlgorithm;
pub use broker::{BrokerAccess, BrokerAclRule};
pub use handle::{DEFAULT_KEYSTORE, KeyHandle};
pub use names::{CaKind, is_display_safe, valid_display_text, valid_name};
pub use net::{IpNet, IpNetError};
pub use revocation::RevocationReason;
pub use role::Role;
pub use status::{
    AdminRequestKind, AdminRequestStatus, AttestationMethod, BackupTrigger, CertificateStatus,
    Decision, DeviceStatus, EnrollmentTokenKind, KeyPurpose, KeySource, KeyState,
    RegistrationStatus, ReplicaState, RotationStep,
};
