//! What keyward needs to reach and use one YubiKey slot, and the parsers for the config's
//! algorithm and policy names.

use secrecy::SecretString;
use std::time::Duration;
use yubikey::piv::SlotId;
use yubikey::{MgmAlgorithmId, PinPolicy, TouchPolicy};

pub fn parse_management_algorithm(s: &str) -> Result<MgmAlgorithmId, String> {
    match s {
        "3des" => Ok(MgmAlgorithmId::ThreeDes),
        "aes128" => Ok(MgmAlgorithmId::Aes128),
        "aes192" => Ok(MgmAlgorithmId::Aes192),
        "aes256" => Ok(MgmAlgorithmId::Aes256),
        other => Err(format!(
            "unknown management key algorithm `{other}` (3des, aes128, aes192, aes256)"
        )),
    }
}

pub fn parse_pin_policy(s: &str) -> Result<PinPolicy, String> {
    match s {
        "never" => Ok(PinPolicy::Never),
        "once" => Ok(PinPolicy::Once),
        "always" => Ok(PinPolicy::Always),
        other => Err(format!(
            "unknown PIN policy `{other}` (never, once, always)"
        )),
    }
}

pub fn parse_touch_policy(s: &str) -> Result<TouchPolicy, String> {
    match s {
        "never" => Ok(TouchPolicy::Never),
        "always" => Ok(TouchPolicy::Always),
        "cached" => Ok(TouchPolicy::Cached),
        other => Err(format!(
            "unknown touch policy `{other}` (never, always, cached)"
        )),
    }
}

/// Everything needed to reach and use one YubiKey slot.
pub struct YubiKeySettings {
    pub serial: u32,
    pub slot: SlotId,
    pub pin: SecretString,
    /// Hex-encoded management key.
    pub management_key: SecretString,
    pub management_key_algorithm: MgmAlgorithmId,
    pub pin_policy: PinPolicy,
    pub touch_policy: TouchPolicy,
    /// DER of the PIV attestation trust root, if attestation is to be checked.
    pub attestation_root_der: Option<Vec<u8>>,
    pub sign_timeout: Duration,
    /// Generate even when the card cannot prove the slot empty (firmware
    /// before 5.3 with no certificate or attestation in the slot). Whatever
    /// key is there is then lost. A slot proven occupied is refused anyway.
    /// Meant for one supervised run; generations it allowed come back as
    /// [`SlotCheck::UnverifiedOverride`] for the audit trail.
    pub dangerously_generate_into_unverified_slot: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_and_algorithms_parse() {
        assert!(parse_management_algorithm("aes192").is_ok());
        assert!(parse_management_algorithm("des").is_err());
        assert!(parse_pin_policy("sometimes").is_err());
        assert!(parse_touch_policy("cached").is_ok());
    }
}
