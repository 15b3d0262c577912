//! Tells the other daemons of a deployment about certificate status
//! changes: every committed revocation, suspension, resumption or release
//! reported to the CA's observers is published as
//! [`Invalidation::Certificate`] on the bus, so their OCSP caches (and
//! anything else keyed by serial) drop it within milliseconds.

use super::RevocationObserver;
use crate::cache::{Invalidation, InvalidationBus};
use std::sync::Arc;

pub struct PublishRevocations {
    bus: Arc<dyn InvalidationBus>,
}

impl PublishRevocations {
    pub fn new(bus: Arc<dyn InvalidationBus>) -> Self {
        Self { bus }
    }
}

impl RevocationObserver for PublishRevocations {
    fn revocation_changed(&self, _issuer_ca: &str, serials: &[String]) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let bus = self.bus.clone();
        let serials = serials.to_vec();
        rt.spawn(async move {
            for serial in serials {
                if let Err(e) = bus.publish(Invalidation::Certificate { serial }).await {
                    tracing::warn!(error = %e, "certificate invalidation not published to the other daemons");
                }
            }
        });
    }
}
