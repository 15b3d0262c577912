//! Renews keyward's own TLS server certificate (`[server.tls] issue = true`)
//! `renew_before_days` before it expires: a new key in the HSM, a new
//! certificate, the old ones retired in the same commit
//! (`ca::tls_server`), then the listener serves the new one from the next
//! handshake on, without a restart. A failed renewal is logged and counted
//! and tried again at the next tick; the old certificate stays in service.
//!
//! Every daemon runs it ([`JobScope::EveryDaemon`]), not only the leader:
//! each daemon serves the certificate it holds in its own resolver, so each
//! must move to the new one, and a leader-only renewal would leave the
//! other daemons serving the old certificate until it expires. The
//! certificate is still renewed once per deployment: a daemon that finds
//! its certificate due first looks in the store for one another daemon
//! issued (fitting the profile, not due) and serves that; only if there is
//! none does it issue. If two daemons issue at the same moment, the second
//! commit conflicts (the old certificate is already retired) and that
//! daemon serves the winner's certificate.

use super::{Job, JobError, JobScope};
use crate::ca::CaService;
use crate::ca::tls_server::{TlsServerCredential, TlsServerProfile};
use crate::tls::ServerCertResolver;
use crate::tls::signer::{HsmSigningKey, certified_key};
use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;

/// How often the job looks at the certificate's end date.
const INTERVAL: Duration = Duration::from_secs(15 * 60);

pub struct TlsRenewal {
    ca: Arc<CaService>,
    resolver: Arc<ServerCertResolver>,
    profile: TlsServerProfile,
    renew_before_secs: i64,
    current: Mutex<TlsServerCredential>,
}

/// The certificate and key the listener can serve for `cred`.
pub fn serving_key(
    cred: &TlsServerCredential,
) -> Result<rustls::sign::CertifiedKey, crate::tls::TlsError> {
    let key = HsmSigningKey::new(
        cred.keystore.clone(),
        cred.handle.clone(),
        cred.algorithm,
        cred.spki_der.clone(),
    )?;
    certified_key(key, cred.chain.clone())
}

impl TlsRenewal {
    pub fn new(
        ca: Arc<CaService>,
        resolver: Arc<ServerCertResolver>,
        profile: TlsServerProfile,
        renew_before_secs: i64,
        current: TlsServerCredential,
    ) -> Self {
        Self {
            ca,
            resolver,
            profile,
            renew_before_secs,
            current: Mutex::new(current),
        }
    }

    /// The certificate in service (serial, end).
    pub fn current(&self) -> Option<(String, i64)> {
        self.current
            .lock()
            .ok()
            .map(|c| (c.serial.clone(), c.not_after))
    }

    /// Renews when `now` is inside the renewal window; returns whether it did.
    pub async fn renew_if_due(&self, now: OffsetDateTime) -> Result<bool, JobError> {
        let Some((_, not_after)) = self.current() else {
            return Ok(false);
        };
        if now.unix_timestamp() < not_after - self.renew_before_secs {
            return Ok(false);
        }
        // Another daemon on the store may have renewed it already.
        if let Some(cred) = self.renewed_elsewhere().await? {
            self.serve(
                cred,
                "TLS server certificate renewed by another daemon; serving it",
            )?;
            return Ok(true);
        }
        let cred = match self.ca.issue_tls_server(&self.profile).await {
            Ok(cred) => cred,
            Err(e @ crate::ca::CaError::Store(crate::store::StoreError::Conflict(_))) => {
                match self.renewed_elsewhere().await? {
                    Some(cred) => cred,
                    None => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        self.serve(cred, "TLS server certificate renewed")?;
        Ok(true)
    }

    /// A certificate in the store that fits the profile, is not due and is
    /// not the one in service here.
    async fn renewed_elsewhere(&self) -> Result<Option<TlsServerCredential>, JobError> {
        let serving = self.current().map(|(serial, _)| serial);
        Ok(self
            .ca
            .current_tls_server(&self.profile, self.renew_before_secs)
            .await?
            .filter(|c| Some(&c.serial) != serving.as_ref()))
    }

    /// Serves `cred` from the next handshake on.
    fn serve(&self, cred: TlsServerCredential, what: &'static str) -> Result<(), JobError> {
        self.resolver.swap(Arc::new(serving_key(&cred)?));
        tracing::info!(serial = %cred.serial, not_after = cred.not_after, "{what}");
        if let Ok(mut g) = self.current.lock() {
            *g = cred;
        }
        Ok(())
    }
}

#[async_trait]
impl Job for TlsRenewal {
    fn name(&self) -> &'static str {
        "tls_renewal"
    }

    fn scope(&self) -> JobScope {
        JobScope::EveryDaemon
    }

    fn interval(&self) -> Duration {
        INTERVAL
    }

    async fn tick(&self, now: OffsetDateTime) -> Result<(), JobError> {
        self.renew_if_due(now).await.map(drop)
    }
}
