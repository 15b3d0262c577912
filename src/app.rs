//! The composition root: the only place that names concrete backends.
//! Reads config and secrets, opens the key store and the store, reconciles
//! them, builds the services and serves HTTP.

use crate::auth::TokenHasher;
use crate::auth::admins::AdminService;
use crate::ca::CaService;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, KeyStoreConfig, StoreConfig};
use crate::http::{AppState, Limits};
use crate::keystore::KeyStore;
use crate::keystore::metered::MeteredKeyStore;
use crate::keystore::pkcs11::uri::Pkcs11Uri;
use crate::keystore::pkcs11::{Pkcs11KeyStore, Pkcs11Settings, TokenSelector};
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::registry::RegistryService;
use crate::store::Store;
use crate::store::sqlite::SqliteStore;
use anyhow::{Context, bail};
use secrecy::{ExposeSecret, SecretString};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// A wired application, not yet serving.
pub struct App {
    pub state: AppState,
    pub limits: Limits,
    pub config: Config,
    /// Unfinished key generations cleaned up at start.
    pub reconciled: usize,
}

/// Opens the configured key store.
pub async fn open_keystore(config: &Config) -> anyhow::Result<Arc<dyn KeyStore>> {
    let KeyStoreConfig::Pkcs11(p) = &config.keystore;
    let pin: SecretString = p.pin_source().load()?;
    let selector = match (&p.token_label, &p.token_serial, &p.token_uri) {
        (Some(l), _, _) => TokenSelector::Label(l.clone()),
        (_, Some(s), _) => TokenSelector::Serial(s.clone()),
        (_, _, Some(u)) => TokenSelector::Uri(Pkcs11Uri::parse(u)?),
        _ => bail!("keystore: no token selector (config validation should have caught this)"),
    };
    let ks = Pkcs11KeyStore::open(Pkcs11Settings {
        module: p.module.clone(),
        selector,
        pin,
        sessions: p.sessions,
    })
    .await
    .context("opening the PKCS#11 token")?;
    Ok(Arc::new(ks))
}

/// Opens the configured store, reporting group commits to `metrics`.
pub fn open_store(
    config: &Config,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Arc<dyn Store>> {
    let StoreConfig::Sqlite(s) = &config.store;
    let observer = Arc::new(move |size: usize, took: Duration| {
        metrics.store_batch_size.observe(size as f64);
        metrics.store_commit_seconds.observe(took.as_secs_f64());
    });
    let store = SqliteStore::open_observed(&s.path, s.batch_max, clock, observer)
        .with_context(|| format!("opening the SQLite store {}", s.path.display()))?;
    Ok(Arc::new(store))
}

impl App {
    /// Wires everything from the config with the system clock.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let policies = Arc::new(Policies::load(&config.policies.dir)?);
        let pepper = config.auth.pepper_source().load()?;
        if pepper.expose_secret().len() < 16 {
            bail!(
                "auth.token_pepper must be at least 16 bytes (use e.g. `head -c 32 /dev/urandom | base64`)"
            );
        }
        let hasher = TokenHasher::new(&pepper);
        let metrics = Arc::new(Metrics::new());
        let keystore: Arc<dyn KeyStore> = Arc::new(MeteredKeyStore::new(
            open_keystore(&config).await?,
            metrics.clone(),
        ));
        let store = open_store(&config, clock.clone(), metrics.clone())?;
        let reconciled =
            crate::ca::keys::reconcile(keystore.as_ref(), store.as_ref(), clock.as_ref())
                .await
                .context("reconciling unfinished key generations")?;
        let ca = Arc::new(
            CaService::new(keystore.clone(), store.clone(), clock.clone(), policies).await?,
        );
        let admins = Arc::new(AdminService::new(
            store.clone(),
            clock.clone(),
            hasher.clone(),
        ));
        let registry = Arc::new(RegistryService::new(
            ca.clone(),
            store.clone(),
            clock.clone(),
            hasher,
            metrics.clone(),
        ));
        let limits = Limits {
            body_limit_bytes: config.server.body_limit_bytes,
            request_timeout: Duration::from_secs(config.server.request_timeout_secs),
            log_sensitive_details: config.log.sensitive_details,
        };
        Ok(Self {
            state: AppState {
                registry,
                ca,
                admins,
                store,
                keystore,
                metrics,
            },
            limits,
            config,
            reconciled,
        })
    }

    /// Refuses to serve without the CAs the policy names, or with CA keys
    /// missing from the token.
    pub async fn check_ready_to_serve(&self) -> anyhow::Result<()> {
        let missing: Vec<String> = self
            .state
            .ca
            .policies()
            .cas
            .iter()
            .filter(|c| self.state.ca.issuer(&c.name).is_err())
            .map(|c| c.name.clone())
            .collect();
        if !missing.is_empty() {
            bail!(
                "CA(s) {} from the policy do not exist yet: run `keyward init` first",
                missing.join(", ")
            );
        }
        self.state
            .ca
            .check_keys()
            .await
            .context("a CA key is missing from the token or not active")?;
        Ok(())
    }

    /// Serves on `listener` until `shutdown` resolves, then closes the HSM sessions.
    pub async fn serve_on(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let keystore = self.state.keystore.clone();
        let router = crate::http::router(self.state, self.limits);
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .context("HTTP server failed")?;
        if let Err(e) = keystore.close().await {
            tracing::warn!(error = %e, "closing HSM sessions");
        }
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested");
}
