//! Tells the other daemons of a deployment about certificate status
//! changes: every committed revocation, suspension, resumption or release
//! reported to the CA's observers is published as
//! [`Invalidation::Certificate`] on the bus, so their OCSP caches (and
//! anything else keyed by serial) drop it within milliseconds.

use super::RevocationObserver;
use crate::cache::{Invalidation, InvalidationBus};
use std::sync::Arc;

/// How long a publication is retried while Redis is unreachable.
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(3600);

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
            let give_up = tokio::time::Instant::now() + RETRY_FOR;
            for serial in serials {
                // The local copy is delivered on the first attempt; retries
                // only reach the other daemons (a subscriber that lost its
                // own connection meanwhile drops everything anyway).
                let mut attempt = 0u32;
                loop {
                    let inv = Invalidation::Certificate {
                        serial: serial.clone(),
                    };
                    let sent = if attempt == 0 {
                        bus.publish(inv).await
                    } else {
                        bus.publish_remote(inv).await
                    };
                    match sent {
                        Ok(()) => break,
                        Err(e) if tokio::time::Instant::now() >= give_up => {
                            tracing::error!(error = %e, "certificate invalidation not published to the other daemons; giving up");
                            break;
                        }
                        Err(_) => {
                            attempt += 1;
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        }
                    }
                }
            }
        });
    }
}
