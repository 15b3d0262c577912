//! The composition root: the only place that names concrete backends.
//! Reads config and secrets, opens the key store and the store, reconciles
//! them, builds the services and serves HTTP.

use crate::auth::TokenHasher;
use crate::auth::admins::AdminService;
use crate::broker::mosquitto::MosquittoProvisioner;
use crate::broker::{Backoff, BrokerProvisioner, BrokerUpdateSettings, BrokerUpdates, NoBroker};
use crate::ca::CaService;
use crate::ca::crls::CrlPublisher;
use crate::ca::responder::{Responder, ResponderSettings};
use crate::ca::tls_server::TlsServerProfile;
use crate::cache::memory::{InProcessBus, InProcessCache};
use crate::cache::{Cache, Invalidation, InvalidationBus};
use crate::clock::{Clock, SystemClock};
use crate::config::{
    BrokerBackendConfig, Config, DEFAULT_KEYSTORE, KeyStoreConfig, StoreConfig, TlsConfig,
    TlsSource,
};
use crate::http::{AppState, Limits, RateLimits};
use crate::jobs::Scheduler;
use crate::jobs::broker::BrokerDrainer;
use crate::jobs::crl::CrlJob;
use crate::jobs::gauges::GaugeRefresher;
use crate::jobs::leader::StoreLease;
use crate::jobs::login_failures::LoginFailureFlusher;
use crate::jobs::ocsp::OcspSignerRotation;
use crate::jobs::readiness::{Readiness, ReadinessRefresher};
use crate::jobs::renewal_notices::RenewalNotices;
use crate::jobs::rotation::RotationJob;
use crate::jobs::sweeper::Sweeper;
use crate::jobs::tls_renewal::{TlsRenewal, serving_key};
use crate::keystore::metered::MeteredKeyStore;
use crate::keystore::pkcs11::{Pkcs11KeyStore, Pkcs11Settings};
use crate::keystore::yubikey::{YubiKeyKeyStore, YubiKeySettings};
use crate::keystore::{KeyStore, KeyStores};
use crate::metrics::Metrics;
use crate::notify::Notifiers;
use crate::policy::Policies;
use crate::ratelimit::failures::LoginFailureLog;
use crate::ratelimit::login::GuardedLogin;
use crate::ratelimit::memory::InProcessRateLimiter;
use crate::ratelimit::{Limit, RateLimiter};
use crate::redis::RedisHandle;
use crate::registry::RegistryService;
use crate::rotation::Rotator;
use crate::store::Store;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::tls::listener::HandshakeLimits;
use crate::tls::{ClientAuth, ClientAuthSettings, ClientCertCheck, ServerCertResolver};
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
    pub clock: Arc<dyn Clock>,
    /// Failed admin logins waiting to be audited (written by the flusher job).
    pub login_failures: Arc<LoginFailureLog>,
    /// HTTPS (`[server.tls]`); `None` serves plain HTTP (loopback only).
    pub tls: Option<TlsServing>,
    /// Notification fan-out (`[[notify]]`); drained on shutdown.
    pub notifiers: Arc<Notifiers>,
    /// Whether [`App::prepare_revocation`] has run (it runs once).
    revocation_prepared: bool,
    /// The Redis connection (`[redis]`); `None`: everything in process.
    pub redis: Option<Arc<RedisHandle>>,
}

/// What the HTTPS listener needs, prepared before the socket is bound so
/// that a bad certificate or key stops start-up.
pub struct TlsServing {
    /// The served certificate; renewal swaps it.
    pub resolver: Arc<ServerCertResolver>,
    pub server_config: Arc<rustls::ServerConfig>,
    pub client_auth: ClientAuth,
    /// The revocation hook (also run after resumed handshakes).
    pub check: Option<Arc<dyn ClientCertCheck>>,
    pub limits: HandshakeLimits,
    /// With `issue = true`: the job that renews the certificate.
    pub renewal: Option<Arc<TlsRenewal>>,
    trust_anchors: Vec<Vec<u8>>,
}

impl TlsServing {
    fn new(
        resolver: Arc<ServerCertResolver>,
        config: &TlsConfig,
        trust_anchors: Vec<Vec<u8>>,
        check: Option<Arc<dyn ClientCertCheck>>,
    ) -> anyhow::Result<Self> {
        let check = match config.client_auth {
            ClientAuth::None => None,
            _ => check,
        };
        let server_config = crate::tls::server_config(
            resolver.clone(),
            ClientAuthSettings {
                mode: config.client_auth,
                trust_anchors: trust_anchors.clone(),
                check: check.clone(),
            },
        )
        .context("server.tls")?;
        Ok(Self {
            resolver,
            server_config,
            client_auth: config.client_auth,
            check,
            limits: HandshakeLimits {
                timeout: config.handshake_timeout,
                max_in_progress: config.max_handshakes,
            },
            renewal: None,
            trust_anchors,
        })
    }

    /// TEST HOOK: replaces the revocation check (e.g. with
    /// `tls::client_auth::FingerprintDenyList`).
    pub fn with_check(self, check: Arc<dyn ClientCertCheck>) -> anyhow::Result<Self> {
        let server_config = crate::tls::server_config(
            self.resolver.clone(),
            ClientAuthSettings {
                mode: self.client_auth,
                trust_anchors: self.trust_anchors.clone(),
                check: Some(check.clone()),
            },
        )?;
        Ok(Self {
            server_config,
            check: Some(check),
            ..self
        })
    }
}

/// Loads or issues the server certificate and builds the TLS configuration.
async fn prepare_tls(
    config: &TlsConfig,
    ca: &Arc<CaService>,
    store: &Arc<dyn Store>,
) -> anyhow::Result<TlsServing> {
    let mut renewal = None;
    let resolver = match &config.source {
        TlsSource::Files {
            certificate_file,
            key_file,
        } => Arc::new(ServerCertResolver::new(Arc::new(crate::tls::files::load(
            certificate_file,
            key_file,
            &crate::tls::provider(),
        )?))),
        TlsSource::Issue(i) => {
            let profile = TlsServerProfile {
                issuer: i.issuer.clone(),
                dns_names: i.dns_names.clone(),
                ip_addresses: i.ip_addresses.clone(),
                validity_days: i.validity_days,
                key_algorithm: i.key_algorithm,
            };
            let renew_before = i64::from(i.renew_before_days) * 86_400;
            // The certificate in service if it fits the config and is not
            // due; otherwise a new one now (which retires the old).
            let cred = match ca
                .current_tls_server(&profile, renew_before)
                .await
                .context("server.tls.issuer")?
            {
                Some(c) => c,
                None => match ca.issue_tls_server(&profile).await {
                    Ok(c) => {
                        tracing::info!(serial = %c.serial, issuer = %profile.issuer, "issued the TLS server certificate");
                        c
                    }
                    // Another daemon starting on the same store issued one
                    // first (and retired what this one meant to replace).
                    Err(crate::ca::CaError::Store(crate::store::StoreError::Conflict(_))) => ca
                        .current_tls_server(&profile, renew_before)
                        .await
                        .context("server.tls.issuer")?
                        .context("server.tls.issuer: issuing the TLS server certificate conflicted with another daemon and it left none in service")?,
                    Err(e) => {
                        return Err(anyhow::Error::new(e)
                            .context("server.tls.issuer: issuing the TLS server certificate"));
                    }
                },
            };
            let resolver = Arc::new(ServerCertResolver::new(Arc::new(
                serving_key(&cred).context("server.tls")?,
            )));
            renewal = Some(Arc::new(TlsRenewal::new(
                ca.clone(),
                resolver.clone(),
                profile,
                renew_before,
                cred,
            )));
            resolver
        }
    };
    // Devices chain to the issuing CAs; anchoring there lets them send only
    // their leaf certificate. Every live key of each issuing CA (after a
    // rotation: the active one, retired ones with live devices, a published
    // successor), so devices issued before and after a rotation both
    // authenticate. Anchors are read at start: a key published later
    // becomes an anchor at the next restart (docs/operations.md, Rotation).
    let anchors = ca
        .issuers()
        .iter()
        .filter(|i| i.kind == crate::policy::CaKind::Issuing)
        .flat_map(|i| ca.live_generations(&i.name).unwrap_or_default())
        .map(|g| g.cert_der.clone())
        .collect();
    let check: Arc<dyn ClientCertCheck> = Arc::new(
        crate::registry::tls_check::StoreClientCertCheck::new(store.clone()),
    );
    let mut serving = TlsServing::new(resolver, config, anchors, Some(check))?;
    serving.renewal = renewal;
    Ok(serving)
}

/// How often the sweeper looks for pending registrations past their time.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// How often OCSP signers are checked against their renewal time (days).
const OCSP_SIGNER_INTERVAL: Duration = Duration::from_secs(15 * 60);
/// How often the rotation job looks for due steps (it is also woken at once
/// when a rotation starts).
const ROTATION_INTERVAL: Duration = Duration::from_secs(60);
/// How often the backup job looks at its schedules and retries replicas.
const BACKUP_INTERVAL: Duration = Duration::from_secs(30);

/// How often the CRL job looks for CRLs near their nextUpdate (revocations
/// wake it earlier).
const CRL_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Most time between two broker outbox rounds (failures back off on their own).
const BROKER_DRAIN_INTERVAL: Duration = Duration::from_secs(5);

/// The configured broker provisioner (`[broker]`); reads its password and
/// TLS files now, so a bad setting stops start-up.
pub fn open_broker(config: &Config) -> anyhow::Result<Arc<dyn BrokerProvisioner>> {
    Ok(match &config.broker.backend {
        BrokerBackendConfig::None => Arc::new(NoBroker),
        BrokerBackendConfig::Mosquitto(m) => {
            Arc::new(MosquittoProvisioner::from_config(m).context("[broker]")?)
        }
    })
}

/// Opens one configured key store. PKCS#11 tokens are opened (and logged
/// into) now; a YubiKey is reached lazily, on first use.
pub async fn open_keystore(
    name: &str,
    config: &KeyStoreConfig,
) -> anyhow::Result<Arc<dyn KeyStore>> {
    match config {
        KeyStoreConfig::Pkcs11(p) => {
            let pin: SecretString = p.pin.read()?;
            let selector = p.token.clone();
            let ks = Pkcs11KeyStore::open(Pkcs11Settings {
                module: p.module.clone(),
                selector,
                pin,
                sessions: p.sessions,
            })
            .await
            .with_context(|| format!("opening the PKCS#11 token of key store `{name}`"))?;
            let ks = if p.signer_threads {
                ks.with_signer_threads()
                    .with_context(|| format!("starting the signer threads of key store `{name}`"))?
            } else {
                ks
            };
            Ok(Arc::new(ks))
        }
        KeyStoreConfig::Yubikey(y) => {
            let attestation_root_der = match &y.attestation_root {
                Some(path) => {
                    let pem = std::fs::read_to_string(path)
                        .with_context(|| format!("reading attestation root {}", path.display()))?;
                    let (_, der) = der::pem::decode_vec(pem.as_bytes()).map_err(|e| {
                        anyhow::anyhow!("attestation root {} is not PEM: {e}", path.display())
                    })?;
                    Some(der)
                }
                None => None,
            };
            let settings = YubiKeySettings {
                serial: y.serial,
                slot: y.slot,
                pin: y.pin.read()?,
                management_key: y.management_key.read()?,
                management_key_algorithm: y.management_key_algorithm,
                pin_policy: y.pin_policy,
                touch_policy: y.touch_policy,
                attestation_root_der,
                sign_timeout: y.sign_timeout,
                dangerously_generate_into_unverified_slot: y
                    .dangerously_generate_into_unverified_slot,
            };
            Ok(Arc::new(YubiKeyKeyStore::new(settings)))
        }
    }
}

/// Opens every configured key store, each wrapped for metrics.
pub async fn open_keystores(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<KeyStores> {
    let wrap = |name: &str, ks: Arc<dyn KeyStore>| -> Arc<dyn KeyStore> {
        Arc::new(MeteredKeyStore::new(name, ks, metrics.clone()))
    };
    let mut stores = KeyStores::new(wrap(
        DEFAULT_KEYSTORE,
        open_keystore(DEFAULT_KEYSTORE, &config.keystore).await?,
    ));
    for (name, ks) in &config.keystores {
        stores.insert(name, wrap(name, open_keystore(name, ks).await?));
    }
    Ok(stores)
}

/// Entries of the in-process cache (no `[redis]`).
const IN_PROCESS_CACHE_ENTRIES: usize = 100_000;

/// Connects to the configured Redis (`[redis]`), reading its password now.
/// Nothing is sent yet: a Redis that is down at start leaves the daemon
/// starting degraded, not failing.
pub fn open_redis(
    config: &crate::config::RedisConfig,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Arc<RedisHandle>> {
    let password = config.password.as_ref().map(|p| p.read()).transpose()?;
    RedisHandle::new(
        crate::redis::RedisSettings {
            url: config.url.clone(),
            password,
            key_prefix: config.key_prefix.clone(),
            timeout: crate::redis::MAX_TIMEOUT,
        },
        metrics,
    )
    .context("[redis]")
}

/// How long a clean shutdown waits for queued notifications.
const NOTIFY_DRAIN: Duration = Duration::from_secs(10);

/// Builds the configured notification backends (reading webhook secrets, SMTP passwords and CA files
/// now) and starts their queues. Call inside the runtime.
pub fn start_notifiers(
    config: &Config,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Arc<Notifiers>> {
    use crate::config::NotifierConfig;
    use crate::notify::{Backend, Notifier, WebhookNotifier, WebhookSettings, log::LogNotifier};
    let mut backends = Vec::new();
    for n in &config.notify {
        let (notifier, queue): (Arc<dyn Notifier>, usize) = match n {
            NotifierConfig::Log { queue_capacity } => (
                Arc::new(LogNotifier::new(config.log.sensitive_details)),
                *queue_capacity,
            ),
            NotifierConfig::Webhook(w) => (
                Arc::new(
                    WebhookNotifier::new(
                        &w.secret.key,
                        WebhookSettings {
                            url: w.url.clone(),
                            secret: w.secret.read()?,
                            timeout: w.timeout,
                            max_attempts: w.max_attempts,
                            initial_backoff: w.initial_backoff,
                            max_backoff: w.max_backoff,
                        },
                        clock.clone(),
                    )
                    .with_context(|| format!("webhook {}", w.url))?,
                ),
                w.queue_capacity,
            ),
            NotifierConfig::Smtp(m) => {
                let credentials = match (&m.username, &m.password) {
                    (Some(user), Some(password)) => Some((user.clone(), password.read()?)),
                    _ => None,
                };
                let notifier = crate::notify::SmtpNotifier::new(
                    crate::notify::SmtpSettings {
                        host: m.host.clone(),
                        port: m.port,
                        tls: m.tls,
                        ca_file: m.ca_file.clone(),
                        credentials,
                        helo_name: m.helo_name.clone(),
                        from: m.from.clone(),
                        approvers: m.approvers.clone(),
                        admins: m.admins.clone(),
                        timeout: m.timeout,
                        max_attempts: m.max_attempts,
                        initial_backoff: m.initial_backoff,
                        max_backoff: m.max_backoff,
                    },
                    metrics.clone(),
                )
                .with_context(|| format!("smtp {}:{}", m.host, m.port))?;
                (Arc::new(notifier), m.queue_capacity)
            }
        };
        backends.push(Backend::new(notifier, queue));
    }
    Ok(Notifiers::start(backends, clock, metrics))
}

/// Opens the configured store (migrating it), reporting group commits to
/// `metrics`. The one place a store backend is chosen.
pub async fn open_store(
    config: &Config,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Arc<dyn Store>> {
    let sink = match &config.audit.sink {
        Some(sc) => Some(
            crate::audit::sink::AuditSink::start(
                sc,
                crate::audit::sink::SinkMetrics::from_audit(&metrics.audit, &sc.target),
            )
            .context("starting the audit sink")?,
        ),
        None => None,
    };
    let observer = Arc::new(move |size: usize, took: Duration| {
        metrics.store_batch_size.observe(size as f64);
        metrics.store_commit_seconds.observe(took.as_secs_f64());
    });
    match &config.store {
        StoreConfig::Sqlite(s) => {
            let store = SqliteStore::open_with_sink(&s.path, s.batch_max, clock, observer, sink)
                .with_context(|| format!("opening the SQLite store {}", s.path.display()))?;
            Ok(Arc::new(store))
        }
        StoreConfig::Postgres(p) => {
            let password = p.password.as_ref().map(|s| s.read()).transpose()?;
            let store = PgStore::connect(
                &p.url,
                password,
                p.pool_size,
                p.batch_max,
                clock,
                observer,
                sink,
            )
            .await
            .with_context(|| format!("opening the PostgreSQL store {}", p.url))?;
            Ok(Arc::new(store))
        }
    }
}

/// Opens the configured store for reading only: nothing created, migrated
/// or written (`audit verify`, `keys list`). A SQLite file or PostgreSQL
/// schema that does not exist yet is an error ("run `keyward init`").
pub async fn open_store_read_only(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    match &config.store {
        StoreConfig::Sqlite(s) => Ok(Arc::new(SqliteStore::open_read_only(&s.path)?)),
        StoreConfig::Postgres(p) => {
            let password = p.password.as_ref().map(|s| s.read()).transpose()?;
            let store = PgStore::open_read_only(&p.url, password)
                .await
                .with_context(|| format!("opening the PostgreSQL store {}", p.url))?;
            Ok(Arc::new(store))
        }
    }
}

impl App {
    /// Wires everything from the config with the system clock.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let policies = Arc::new(Policies::load(&config.policies.dir)?);
        let pepper = config.auth.token_pepper.read()?;
        if pepper.expose_secret().len() < 16 {
            bail!(
                "auth.token_pepper must be at least 16 bytes (use e.g. `head -c 32 /dev/urandom | base64`)"
            );
        }
        let hasher = TokenHasher::new(&pepper);
        let metrics = Arc::new(Metrics::new().context("registering metrics")?);
        let keystores = open_keystores(&config, &metrics).await?;
        let redis = config
            .redis
            .as_ref()
            .map(|r| open_redis(r, metrics.clone()))
            .transpose()?;
        let (cache, bus): (Arc<dyn Cache>, Arc<dyn InvalidationBus>) = match &redis {
            Some(h) => (
                Arc::new(crate::redis::cache::RedisCache::new(h.clone())),
                crate::redis::bus::RedisBus::start(h.clone()),
            ),
            None => (
                Arc::new(InProcessCache::new(IN_PROCESS_CACHE_ENTRIES)),
                Arc::new(InProcessBus::new()),
            ),
        };
        let store = open_store(&config, clock.clone(), metrics.clone()).await?;
        // On a store several daemons share (PostgreSQL, or one SQLite file
        // with `[redis]` coordinating them), a recent `generating` row may be
        // another daemon's key generation in progress: leave it alone.
        let reconcile_age = match config.store {
            StoreConfig::Sqlite(_) if config.redis.is_none() => Duration::ZERO,
            _ => crate::ca::keys::SHARED_STORE_RECONCILE_AGE,
        };
        let reconciled = crate::ca::keys::reconcile_older_than(
            &keystores,
            store.as_ref(),
            clock.as_ref(),
            reconcile_age,
        )
        .await
        .context("reconciling unfinished key generations")?;
        let provisioner = open_broker(&config)?;
        let broker_enabled = !matches!(config.broker.backend, BrokerBackendConfig::None);
        let broker = Arc::new(BrokerUpdates::new(
            provisioner,
            store.clone(),
            clock.clone(),
            metrics.clone(),
            BrokerUpdateSettings {
                enabled: broker_enabled,
                backoff: Backoff {
                    min: config.broker.retry_min,
                    max: config.broker.retry_max,
                },
                flush_timeout: config.broker.flush_timeout,
                log_device_ids: config.log.sensitive_details,
            },
        ));
        let ca = Arc::new(
            CaService::new(keystores.clone(), store.clone(), clock.clone(), policies)
                .await?
                .with_public_url(config.server.public_url.clone())
                .with_broker_provisioning(broker_enabled)
                .with_metrics(metrics.clone()),
        );
        // Renewal and access-token nonces: taken on whichever daemon the
        // proof reaches (no load-balancer affinity) when Redis is shared.
        if redis.is_some() {
            ca.nonces().share(cache.clone());
        }
        let crls = Arc::new(CrlPublisher::new(
            ca.clone(),
            store.clone(),
            clock.clone(),
            metrics.clone(),
        ));
        // Every committed revocation, suspension, resumption or release marks
        // its CA's CRL dirty; the CRL job publishes after the debounce window.
        ca.add_revocation_observer(crls.clone());
        let admins = Arc::new(AdminService::new(
            store.clone(),
            clock.clone(),
            hasher.clone(),
        ));
        let notifiers = start_notifiers(&config, clock.clone(), metrics.clone())?;
        let registry = Arc::new(RegistryService::new(
            ca.clone(),
            store.clone(),
            clock.clone(),
            hasher,
            metrics.clone(),
            notifiers.clone(),
        )?);
        let limits = Limits {
            body_limit_bytes: config.server.body_limit_bytes,
            request_timeout: config.server.request_timeout,
            log_sensitive_details: config.log.sensitive_details,
        };
        let trusted_proxies = Arc::new(config.server.trusted_proxies.clone());
        let l = &config.limits;
        let local_limiter: Arc<dyn RateLimiter> =
            Arc::new(InProcessRateLimiter::new(clock.clone(), l.tracked_sources));
        // With Redis: limits shared by every daemon, and the in-process
        // limiter while Redis is unreachable (crate::redis::ratelimit).
        let limiter: Arc<dyn RateLimiter> = match &redis {
            Some(h) => Arc::new(crate::redis::ratelimit::FallbackRateLimiter::new(
                Arc::new(crate::redis::ratelimit::RedisRateLimiter::new(h.clone())),
                local_limiter,
            )),
            None => local_limiter,
        };
        let login_failures = Arc::new(LoginFailureLog::new(
            l.login_failure_audit_window.as_secs(),
            l.tracked_sources,
        ));
        let login = Arc::new(GuardedLogin::new(
            admins.clone(),
            limiter.clone(),
            Limit::new(
                l.admin_login_failures_per_source,
                l.admin_login_failures_window,
            ),
            login_failures.clone(),
            clock.clone(),
            metrics.clone(),
        ));
        let rate_limits = RateLimits {
            limiter,
            registrations: Limit::new(l.registrations_per_source, l.registrations_window),
            renewals: Limit::new(l.renewals_per_source, l.renewals_window),
        };
        let mut readiness = Readiness::new(clock.clone(), l.readiness_max_age);
        if let Some(h) = &redis {
            readiness = readiness.with_redis(h.clone());
        }
        let readiness = Arc::new(readiness);
        let mut ocsp = Responder::new(
            ca.clone(),
            store.clone(),
            clock.clone(),
            rate_limits.limiter.clone(),
            metrics.clone(),
            ResponderSettings {
                cache_entries: l.ocsp_cache_entries,
                fresh_per_source: Limit::new(l.ocsp_fresh_per_source, l.ocsp_fresh_window),
            },
        );
        // In process the responder's own map is the only level needed.
        if redis.is_some() {
            ocsp = ocsp.with_shared(cache.clone());
        }
        let ocsp = Arc::new(ocsp);
        // Other daemons hear of every status change (their OCSP caches).
        ca.add_revocation_observer(Arc::new(crate::ca::invalidation::PublishRevocations::new(
            bus.clone(),
        )));
        // Revocations reach the responder's cache as they commit.
        ca.add_revocation_observer(ocsp.clone());
        let rotator = Arc::new(Rotator::new(
            ca.clone(),
            store.clone(),
            clock.clone(),
            crls.clone(),
            ocsp.clone(),
            notifiers.clone(),
            metrics.clone(),
        ));
        let backups = crate::backup::service::BackupService::new(
            Arc::new(config.clone()),
            store.clone(),
            keystores.clone(),
            clock.clone(),
            metrics.clone(),
            notifiers.clone(),
        )
        .map_err(|e| anyhow::anyhow!("[backup]: {e}"))?
        .map(Arc::new);
        let audit = Arc::new(crate::audit::service::AuditService::new(
            store.clone(),
            keystores.clone(),
            clock.clone(),
            metrics.clone(),
            config.audit.clone(),
        ));
        let tokens = Arc::new(crate::auth::tokens::TokenService::new(
            ca.clone(),
            store.clone(),
            keystores.clone(),
            clock.clone(),
            metrics.clone(),
            cache.clone(),
            config.auth.tokens.clone(),
        ));
        rotator.set_tokens(tokens.clone());
        Ok(Self {
            state: AppState {
                tokens,
                audit,
                backups,
                registry,
                ca,
                crls,
                admins,
                store,
                keystores,
                metrics,
                trusted_proxies,
                login,
                rate_limits,
                readiness,
                ocsp,
                broker,
                rotator,
                cache,
                bus,
            },
            limits,
            config,
            reconciled,
            clock,
            login_failures,
            tls: None,
            notifiers,
            revocation_prepared: false,
            redis,
        })
    }

    /// The notification fan-out services send through.
    pub fn notifiers(&self) -> Arc<Notifiers> {
        self.notifiers.clone()
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

    /// Loads (files) or finds or issues (`issue = true`) the TLS server
    /// certificate and builds the TLS configuration, when `[server.tls]` is
    /// set. Run by `serve` after [`Self::check_ready_to_serve`] and before
    /// binding, so that a bad certificate stops start-up; `init` does not
    /// run it (the issuing CA may not exist yet).
    pub async fn prepare_tls(&mut self) -> anyhow::Result<()> {
        if let Some(t) = &self.config.server.tls {
            self.tls = Some(prepare_tls(t, &self.state.ca, &self.state.store).await?);
        }
        Ok(())
    }

    /// Revocation state the first client must find, made once before
    /// serving: the stored CRLs loaded and every missing or due one
    /// published, and the delegated OCSP signers loaded or made. `serve`
    /// calls it before it announces its address; [`App::serve_on`] calls it
    /// for embedders that did not.
    pub async fn prepare_revocation(&mut self) -> anyhow::Result<()> {
        if self.revocation_prepared {
            return Ok(());
        }
        if let Err(e) = self.state.crls.start(self.clock.now()).await {
            tracing::error!(code = e.code(), error = %e, "loading the stored CRLs");
        }
        self.state
            .ocsp
            .refresh_signers("system")
            .await
            .context("preparing the delegated OCSP signers")?;
        self.revocation_prepared = true;
        Ok(())
    }

    /// Finds or generates the HSM key that signs audit checkpoints and
    /// checks it against the token. `serve` refuses to start without it:
    /// an unsigned chain is the weaker promise.
    pub async fn prepare_audit(&self) -> anyhow::Result<crate::store::records::KeyRecord> {
        self.state
            .audit
            .prepare("system")
            .await
            .context("preparing the audit checkpoint key")
    }

    /// Finds or generates the HSM key that signs device access tokens
    /// (`keyward init`, and the first serve of an older deployment).
    pub async fn prepare_tokens(&self) -> anyhow::Result<crate::store::records::KeyRecord> {
        self.state
            .tokens
            .prepare("system")
            .await
            .context("preparing the token-signing key")
    }

    /// The background jobs, one line each. The readiness cache is filled
    /// once before this returns, so `/readyz` answers from the first request.
    /// The scheduler lease is asked for once before the jobs start: a lone
    /// daemon is leader from its first tick; with several daemons on one
    /// store, the leader-only jobs run in one of them (`jobs::leader`).
    pub async fn start_jobs(&self) -> Scheduler {
        let s = &self.state;
        let mut jobs = Scheduler::new(self.clock.clone(), s.metrics.clone());
        let lease: Arc<dyn crate::jobs::leader::LeaderLock> = match &self.redis {
            Some(h) => Arc::new(crate::redis::leader::RedisLeaderLock::new(
                h.clone(),
                self.config.scheduler.lease,
            )),
            None => Arc::new(StoreLease::new(
                s.store.clone(),
                self.config.scheduler.lease,
            )),
        };
        jobs.lead_with(lease, s.store.clone()).await;
        let readiness = Arc::new(ReadinessRefresher::new(
            s.readiness.clone(),
            s.store.clone(),
            s.keystores.clone(),
            s.ca.issuing_keystores(),
            s.metrics.clone(),
        ));
        readiness.refresh(self.clock.now()).await;
        jobs.spawn(readiness);
        // Filled once before serving, like readiness: the first scrape has
        // the store's numbers, not zeros.
        let gauges = Arc::new(GaugeRefresher::new(
            s.store.clone(),
            s.rotator.clone(),
            s.metrics.clone(),
            self.config.jobs.metrics_refresh_interval,
        ));
        if let Err(e) = gauges.refresh(self.clock.now()).await {
            tracing::warn!(code = e.code(), error = %e, "cannot read the store for the metrics gauges yet");
        }
        jobs.spawn(gauges);
        jobs.spawn(Arc::new(Sweeper::new(
            s.store.clone(),
            s.registry.clone(),
            s.admins.clone(),
            SWEEP_INTERVAL,
        )));
        jobs.spawn(Arc::new(CrlJob::new(s.crls.clone(), CRL_CHECK_INTERVAL)));
        jobs.spawn(Arc::new(LoginFailureFlusher::new(
            self.login_failures.clone(),
            s.store.clone(),
            s.metrics.clone(),
        )));
        if let Some(renewal) = self.tls.as_ref().and_then(|t| t.renewal.clone()) {
            jobs.spawn(renewal);
        }
        jobs.spawn(Arc::new(RotationJob::new(
            s.rotator.clone(),
            s.metrics.clone(),
            ROTATION_INTERVAL,
        )));
        // A rotation a crash interrupted resumes at once, not one interval later.
        s.rotator.wake();
        if let Some(backups) = &s.backups {
            backups.remove_partials();
            if let Err(e) = backups.refresh_gauges().await {
                tracing::warn!(error = %e, "cannot read the backups for their metrics");
            }
            jobs.spawn(Arc::new(crate::jobs::backup::BackupJob::new(
                backups.clone(),
                BACKUP_INTERVAL,
            )));
        }
        jobs.spawn(Arc::new(crate::jobs::audit::AuditCheckpointJob::new(
            s.audit.clone(),
            crate::jobs::audit::CHECKPOINT_POLL,
        )));
        jobs.spawn(Arc::new(crate::jobs::audit::AuditVerifyJob::new(
            s.audit.clone(),
        )));
        jobs.spawn(Arc::new(RenewalNotices::new(
            s.store.clone(),
            s.ca.clone(),
            self.notifiers.clone(),
            s.metrics.clone(),
            self.config.jobs.renewal_notice_interval,
        )));
        jobs.spawn(Arc::new(OcspSignerRotation::new(
            s.ocsp.clone(),
            OCSP_SIGNER_INTERVAL,
        )));
        // With no broker configured nothing is queued; an outbox left from an
        // earlier configuration still shows in the gauge.
        s.broker.refresh_gauge().await;
        if s.broker.enabled() {
            let interval = BROKER_DRAIN_INTERVAL.min(self.config.broker.retry_min);
            jobs.spawn(Arc::new(BrokerDrainer::new(s.broker.clone(), interval)));
        }
        jobs
    }

    /// Serves on `listener` until `shutdown` resolves, then stops the jobs
    /// (the failed-login flusher writes what it holds) and closes the HSM
    /// sessions.
    pub async fn serve_on(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.serve_on_with(listener, shutdown, || {}).await
    }

    /// [`Self::serve_on`], calling `ready` once the jobs run (the scheduler
    /// lease asked and its `scheduler.leader` event committed) and before
    /// the first request is accepted: what `keyward serve` announces as
    /// "listening", so that nothing start-up writes lands after it.
    pub async fn serve_on_with(
        mut self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
        ready: impl FnOnce(),
    ) -> anyhow::Result<()> {
        let keystores = self.state.keystores.clone();
        let notifiers = self.notifiers.clone();
        self.prepare_revocation().await?;
        if self.state.audit.key().await.is_none() {
            self.prepare_audit().await?;
        }
        let background = tokio_util::sync::CancellationToken::new();
        let mut tasks = Vec::new();
        if let Some(h) = &self.redis {
            // Known before the first /readyz and the first lease round.
            h.ping().await;
            tasks.push(h.spawn_health(background.clone()));
        }
        tasks.push(spawn_invalidation_listener(
            self.state.bus.clone(),
            self.state.ocsp.clone(),
            self.state.registry.clone(),
        ));
        if self.state.tokens.active_key().await.is_none() {
            self.prepare_tokens().await?;
        }
        let sessions = tokio_util::sync::CancellationToken::new();
        let _listener = self
            .state
            .tokens
            .spawn_invalidation_listener(&self.state.bus, sessions.clone());
        let _stop_sessions = sessions.drop_guard();
        let jobs = self.start_jobs().await;
        ready();
        let reloader = spawn_sighup_reload(self.state.registry.clone(), self.state.bus.clone());
        let router = crate::http::router(self.state, self.limits);
        let served = match self.tls {
            // The TLS accept loop adds ConnectInfo and the client certificate itself.
            Some(tls) => {
                crate::tls::listener::serve(
                    listener,
                    tls.server_config,
                    tls.check,
                    tls.limits,
                    router,
                    shutdown,
                )
                .await;
                Ok(())
            }
            // Connect info gives handlers the TCP peer (the client address, or a
            // trusted proxy's).
            None => axum::serve(
                listener,
                router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(shutdown)
            .await
            .context("HTTP server failed"),
        };
        reloader.abort();
        // No request is in flight any more: nothing can add a failed login.
        jobs.shutdown().await;
        background.cancel();
        for t in tasks {
            t.abort();
        }
        // Nothing raises notifications any more: deliver what is queued.
        notifiers.shutdown(NOTIFY_DRAIN).await;
        served?;
        for (name, ks) in keystores.iter() {
            if let Err(e) = ks.close().await {
                tracing::warn!(keystore = name, error = %e, "closing key store sessions");
            }
        }
        Ok(())
    }
}

/// SIGHUP reloads the policies (validated first; refused reloads change
/// nothing and are audited like accepted ones).
fn spawn_sighup_reload(
    registry: Arc<RegistryService>,
    bus: Arc<dyn InvalidationBus>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                tracing::warn!("cannot listen for SIGHUP; reload policies over the admin API");
                return;
            };
            while hup.recv().await.is_some() {
                match registry.reload_policies("system:sighup", None).await {
                    Ok(_) => {
                        // This daemon has reloaded: only the others follow (its own
                        // listener would reload again if the files changed meanwhile).
                        if let Err(e) = bus.publish_remote(Invalidation::Policy).await {
                            tracing::warn!(error = %e, "policy reload not announced to the other daemons");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "SIGHUP: policies not reloaded"),
                }
            }
        }
        #[cfg(not(unix))]
        drop((registry, bus));
    })
}

/// Applies what the invalidation bus delivers to this daemon's caches:
/// a certificate's OCSP answers are dropped, a reload on another daemon
/// reloads this daemon's policy files (only if they differ from those in
/// force, so the daemon that reloaded does not reload twice), and a missed
/// stretch of invalidations (`All`, or a lagging receiver) drops every
/// cached OCSP answer. `Device` and `Admin` have no subscriber here: the
/// certificates of a revoked or suspended device arrive as `Certificate`
/// invalidations, and admin authentication reads the store every time.
pub fn spawn_invalidation_listener(
    bus: Arc<dyn InvalidationBus>,
    ocsp: Arc<Responder>,
    registry: Arc<RegistryService>,
) -> tokio::task::JoinHandle<()> {
    let mut rx = bus.subscribe();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match rx.recv().await {
                Ok(Invalidation::Certificate { serial }) => ocsp.forget(&serial),
                Ok(Invalidation::All) | Err(RecvError::Lagged(_)) => ocsp.forget_all(),
                Ok(Invalidation::Policy) => {
                    match registry.follow_policy_reload("system:invalidation").await {
                        Ok(Some(o)) => {
                            tracing::info!(
                                changed = o.changed,
                                "policies reloaded after another daemon's reload"
                            )
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "policies not reloaded after another daemon's reload")
                        }
                    }
                }
                Ok(Invalidation::Device { .. } | Invalidation::Admin { .. }) => {}
                Err(RecvError::Closed) => break,
            }
        }
    })
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
