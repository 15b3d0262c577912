//! Broker access a device is granted: MQTT topic filters and what the device
//! may do on each (enrollment policy renders them; the broker provisioner and
//! its outbox in the store carry them).

use serde::{Deserialize, Serialize};

/// What a device may do on one MQTT topic pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BrokerAccess {
    Publish,
    Subscribe,
    PublishSubscribe,
}

impl BrokerAccess {
    pub fn publish(self) -> bool {
        matches!(self, Self::Publish | Self::PublishSubscribe)
    }

    pub fn subscribe(self) -> bool {
        matches!(self, Self::Subscribe | Self::PublishSubscribe)
    }
}

/// One broker ACL entry granted to every device of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerAclRule {
    /// MQTT topic filter; placeholders such as `{device_id}` are substituted.
    pub topic: String,
    pub access: BrokerAccess,
}
