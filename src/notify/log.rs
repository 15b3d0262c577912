//! The `log` notifier: one `info` line at target `keyward::notify` per
//! notification. Device ids and names are sensitive details (see
//! `log.sensitive_details`): logged only when that setting is on.

use super::{Envelope, Notification, Notifier, NotifyError};

pub struct LogNotifier {
    sensitive_details: bool,
}

impl LogNotifier {
    pub fn new(sensitive_details: bool) -> Self {
        Self { sensitive_details }
    }
}

#[async_trait::async_trait]
impl Notifier for LogNotifier {
    async fn notify(&self, n: &Envelope) -> Result<(), NotifyError> {
        let sensitive = self.sensitive_details;
        match &n.notification {
            Notification::RegistrationPending {
                registration_id,
                device_id,
                group,
                device_name,
                attestation,
                approvals_required,
                ..
            } => tracing::info!(
                target: "keyward::notify",
                kind = n.kind(),
                notification = %n.id,
                registration = %registration_id,
                group = %group,
                attestation = %attestation,
                approvals_required,
                device_id = sensitive.then(|| device_id.to_string()),
                device_name = sensitive.then_some(device_name.as_str()),
                "registration waiting for approval"
            ),
            Notification::RenewalDue {
                device_id,
                serial,
                not_after,
            } => tracing::info!(
                target: "keyward::notify",
                kind = n.kind(),
                notification = %n.id,
                serial = %serial,
                not_after,
                device_id = sensitive.then(|| device_id.to_string()),
                "device certificate due for renewal"
            ),
            Notification::Rotation {
                rotation_id,
                purpose,
                target,
                step,
                error,
                ..
            } => tracing::info!(
                target: "keyward::notify",
                kind = n.kind(),
                notification = %n.id,
                rotation = %rotation_id,
                purpose = %purpose,
                target_key = %target,
                step = %step,
                error = error.as_deref(),
                "key rotation"
            ),
            Notification::BackupFailed {
                stage,
                backup_id,
                location,
                code,
                error,
            } => tracing::warn!(
                target: "keyward::notify",
                kind = n.kind(),
                notification = %n.id,
                stage = %stage,
                backup = backup_id.map(|b| b.to_string()),
                location = location.as_deref(),
                code = %code,
                error = %error,
                "backup failure"
            ),
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "log"
    }
}
