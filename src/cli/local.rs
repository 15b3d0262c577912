//! Commands that work on the config, the token and the database directly.

use super::Output;
use crate::app::App;
use crate::config::{Config, LogFormat};
use crate::policy::Policies;
use crate::store::Store;
use anyhow::Context;
use secrecy::ExposeSecret;
use std::path::Path;
use std::process::ExitCode;

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

pub async fn init(
    config_path: &Path,
    admin_name: &str,
    token_out: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    init_logging(&config);
    let app = App::build(config).await?;
    if app.reconciled > 0 {
        println!("reconciled {} unfinished key generation(s)", app.reconciled);
    }
    let created = app.state.ca.initialize("cli:init").await?;
    let policies = app.state.ca.policies();
    for ca in app.state.ca.issuers() {
        let state = if created.contains(&ca.name) {
            "created"
        } else {
            "exists"
        };
        // What backups do with the key: fixed when it was generated (the
        // CA policy's `backup` rule then); read back from the device where
        // it tells, else the policy's rule.
        let backup = match ca.keystore.protection(&ca.handle).await {
            Ok(p) if p.extractable => "backup: wrapped (extractable by wrapping only)",
            Ok(_) => "backup: never (non-extractable, stays in its HSM)",
            Err(_) => match policies.cas.iter().find(|p| p.name == ca.name) {
                Some(p) if p.key_backup() == crate::policy::KeyBackup::WrapOnly => {
                    "backup: wrapped (policy)"
                }
                _ => "backup: never (stays on its device)",
            },
        };
        println!(
            "CA {:<12} {:<8} {} key {} ({backup})",
            ca.name, state, ca.algorithm, ca.handle
        );
        if ca.kind == crate::model::CaKind::Root {
            // Keep it with the backup officers: `backup restore
            // --expect-root-sha256` pins a restore to this hierarchy.
            println!(
                "   root certificate SHA-256 {}",
                crate::backup::archive::sha256_hex(&ca.cert_der)
            );
        }
    }
    // The key that signs audit checkpoints: made now, so that the chain is
    // signed from the first event `serve` writes.
    let audit_key = app.prepare_audit().await?;
    println!(
        "audit    key {} ({}) signs checkpoints; public key SHA-256 {}",
        audit_key.handle,
        audit_key.algorithm,
        crate::backup::archive::sha256_hex(&audit_key.public_key_der)
    );
    match app.state.admins.bootstrap(admin_name).await? {
        Some((admin, token)) => match token_out {
            Some(path) => {
                write_private(path, format!("{}\n", token.expose_secret()).as_bytes())?;
                println!(
                    "bootstrap admin `{}` created; token written to {}",
                    admin.name,
                    path.display()
                );
            }
            None => {
                println!(
                    "bootstrap admin `{}` created (role admin). Its token is shown ONCE:",
                    admin.name
                );
                println!("{}", token.expose_secret());
                println!(
                    "Store it safely, create personal admins with `keyward admins add`, and stop using this one day to day."
                );
            }
        },
        None => println!("admins exist; no bootstrap admin created"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `keyward admins break-glass`: see [`crate::auth::admins::AdminService::break_glass`].
pub async fn break_glass(
    config_path: &Path,
    name: &str,
    role: &str,
    token_out: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let role: crate::model::Role = role.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let config = Config::load(config_path)?;
    init_logging(&config);
    let app = App::build(config).await?;
    let (admin, token) = app.state.admins.break_glass(name, role).await?;
    match token_out {
        Some(path) => {
            write_private(path, format!("{}\n", token.expose_secret()).as_bytes())?;
            println!(
                "break-glass admin `{}` (role {}) created and audited; token written to {}",
                admin.name,
                admin.role,
                path.display()
            );
        }
        None => {
            println!(
                "break-glass admin `{}` (role {}) created and audited. Its token is shown ONCE:",
                admin.name, admin.role
            );
            println!("{}", token.expose_secret());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a file readable only by its owner, from its first byte; an
/// existing file is replaced, never widened (see
/// [`crate::store::files::write_private`]).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    Ok(crate::store::files::write_private(path, bytes)?)
}

pub async fn serve(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    init_logging(&config);
    let listen = config.server.listen;
    // Serving an empty database (a mistyped path or database name) would
    // look like a fresh CA.
    match &config.store {
        crate::config::StoreConfig::Sqlite(s) => {
            if !s.path.exists() {
                anyhow::bail!(
                    "database {} does not exist: run `keyward init` first",
                    s.path.display()
                );
            }
        }
        crate::config::StoreConfig::Postgres(_) => {
            // Refuses a database without a keyward schema, naming `init`.
            drop(crate::app::open_store_read_only(&config).await?);
        }
    }
    let mut app = App::build(config).await?;
    app.check_ready_to_serve().await?;
    app.prepare_tls().await?;
    // Before listening: the first client finds the CRLs and OCSP signers.
    app.prepare_revocation().await?;
    app.prepare_audit().await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let scheme = if app.tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, "keyward serving");
    if app.tls.is_none() {
        // The config refuses plain HTTP on any other address.
        tracing::warn!(
            %addr,
            "serving plain HTTP (no [server.tls]): acceptable on loopback for development only"
        );
    }
    // A plain line on stdout for supervisors and tests (port 0 picks a free
    // port), once start-up work (jobs, scheduler lease) is done.
    app.serve_on_with(listener, crate::app::shutdown_signal(), || {
        println!("keyward listening on {scheme}://{addr}");
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

pub fn config_check(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    // Read every secret the config points at (without using it), so that a
    // missing PIN file or env var shows now rather than at start-up.
    for secret in config.secrets() {
        secret.read()?;
    }
    for n in &config.notify {
        match n {
            crate::config::NotifierConfig::Webhook(w) => {
                crate::notify::webhook::check_secret(&w.secret.key, &w.secret.read()?)?;
            }
            crate::config::NotifierConfig::Smtp(m) => {
                if let Some(ca) = &m.ca_file {
                    crate::notify::smtp::load_ca(ca)?;
                }
            }
            crate::config::NotifierConfig::Log { .. } => {}
        }
    }
    if let Some(crate::config::TlsConfig {
        source:
            crate::config::TlsSource::Files {
                certificate_file,
                key_file,
            },
        ..
    }) = &config.server.tls
    {
        crate::tls::files::load(certificate_file, key_file, &crate::tls::provider())?;
    }
    // The broker's CA file and client certificate must load (its password was read above).
    crate::app::open_broker(&config)?;
    let policies = Policies::load(&config.policies.dir)?;
    crate::registry::check_attestation_policies(&policies)?;
    if let Some(crate::config::TlsConfig {
        source: crate::config::TlsSource::Issue(i),
        ..
    }) = &config.server.tls
        && !policies
            .cas
            .iter()
            .any(|c| c.name == i.issuer && c.kind == crate::policy::CaKind::Issuing)
    {
        anyhow::bail!(
            "server.tls.issuer: `{}` is not an issuing CA of {}",
            i.issuer,
            config.policies.dir.join("ca.toml").display()
        );
    }
    println!(
        "config OK: {} ({} CA(s), {} profile(s), {} enrollment group(s), rotation {})",
        config_path.display(),
        policies.cas.len(),
        policies.profiles.len(),
        policies.groups.len(),
        if policies.hashes.rotation.is_some() {
            "policy from rotation.toml"
        } else {
            "defaults (no rotation.toml)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Options of `keyward audit verify`.
pub struct VerifyArgs {
    pub from_checkpoint: Option<i64>,
    pub checkpoints: Vec<std::path::PathBuf>,
    pub public_key: Option<std::path::PathBuf>,
}

/// The audit service over a read-only store and only the key store that
/// holds the audit key (a card-held root need not be present to verify).
async fn audit_reader(config: &Config) -> anyhow::Result<crate::audit::service::AuditService> {
    let store = crate::app::open_store_read_only(config).await?;
    let name = config.audit.keystore.as_str();
    let ks_config = if name == crate::config::DEFAULT_KEYSTORE {
        &config.keystore
    } else {
        config
            .keystores
            .get(name)
            .with_context(|| format!("no key store named `{name}`"))?
    };
    let ks = crate::app::open_keystore(name, ks_config).await?;
    let mut keystores = crate::keystore::KeyStores::new(ks.clone());
    keystores.insert(name, ks);
    Ok(crate::audit::service::AuditService::new(
        store,
        keystores,
        std::sync::Arc::new(crate::clock::SystemClock),
        std::sync::Arc::new(crate::metrics::Metrics::new()?),
        config.audit.clone(),
    ))
}

fn read_public_key_pem(path: &Path) -> anyhow::Result<(crate::model::KeyAlgorithm, Vec<u8>)> {
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (label, der) = der::pem::decode_vec(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("{}: not a PEM public key: {e}", path.display()))?;
    if label != "PUBLIC KEY" {
        anyhow::bail!(
            "{}: expected a PUBLIC KEY block, found {label}",
            path.display()
        );
    }
    use der::Decode as _;
    let spki = spki::SubjectPublicKeyInfoOwned::from_der(&der)
        .map_err(|e| anyhow::anyhow!("{}: not a public key: {e}", path.display()))?;
    let key = crate::ca::public_key::PublicKey::from_spki(&spki)
        .map_err(|e| anyhow::anyhow!("{}: unsupported public key: {e}", path.display()))?;
    Ok((key.algorithm(), der))
}

pub async fn audit_verify(
    config_path: &Path,
    args: VerifyArgs,
    output: Output,
) -> anyhow::Result<ExitCode> {
    use crate::audit::verify::AuditKeys;
    let run = async {
        let config = Config::load(config_path)?;
        let (store, keys, mut checkpoints): (std::sync::Arc<dyn Store>, AuditKeys, _) =
            match &args.public_key {
                // A third party's check: no token, the key they were given.
                Some(pem) => {
                    let store = crate::app::open_store_read_only(&config).await?;
                    let (alg, spki) = read_public_key_pem(pem)?;
                    let cps = crate::audit::service::collect_checkpoints(
                        store.as_ref(),
                        config.audit.checkpoint_file.as_deref(),
                    )
                    .await?;
                    let keys: AuditKeys = cps
                        .iter()
                        .map(|c| (c.key_id, (alg, spki.clone())))
                        .collect();
                    (store, keys, cps)
                }
                None => {
                    let reader = audit_reader(&config).await?;
                    let keys = reader.token_keys().await?;
                    let cps = reader.all_checkpoints().await?;
                    let store = crate::app::open_store_read_only(&config).await?;
                    (store, keys, cps)
                }
            };
        for f in &args.checkpoints {
            if !f.exists() {
                anyhow::bail!("checkpoint file {} does not exist", f.display());
            }
            checkpoints.extend(crate::audit::service::read_checkpoint_file(f, true)?);
        }
        if let Some(pem) = &args.public_key {
            // Checkpoints in the extra files name keys too.
            let (alg, spki) = read_public_key_pem(pem)?;
            let mut keys = keys;
            for c in &checkpoints {
                keys.insert(c.key_id, (alg, spki.clone()));
            }
            return Ok::<_, anyhow::Error>(
                crate::audit::service::verify_store(
                    store.as_ref(),
                    checkpoints,
                    &keys,
                    args.from_checkpoint,
                )
                .await?,
            );
        }
        Ok(crate::audit::service::verify_store(
            store.as_ref(),
            checkpoints,
            &keys,
            args.from_checkpoint,
        )
        .await?)
    };
    let report = match run.await {
        Ok(r) => r,
        Err(e) => {
            match output {
                Output::Text => eprintln!("audit chain NOT VERIFIED: {e:#}"),
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"intact": false, "error": format!("{e:#}")})
                ),
            }
            return Ok(ExitCode::from(2));
        }
    };
    let intact = report.broken.is_none();
    match output {
        Output::Json => {
            let mut v = serde_json::to_value(&report)?;
            v["intact"] = serde_json::json!(intact);
            // The field scripts read before checkpoints existed.
            v["head"] = v["head_hash"].clone();
            if let Some(b) = &report.broken {
                // The field scripts read before checkpoints existed.
                v["first_broken_seq"] = serde_json::json!(b.seq);
            }
            println!("{v}");
        }
        Output::Text => match &report.broken {
            None => {
                println!(
                    "audit chain intact: {} event(s) to sequence {}, head {}",
                    report.events, report.head_seq, report.head_hash
                );
                match report.last_checkpoint {
                    Some(c) => println!(
                        "  {} signed checkpoint(s) verified, newest at sequence {c}; {} event(s) after it not yet signed",
                        report.checkpoints_verified, report.unsigned_events
                    ),
                    None => println!(
                        "  WARNING: no signed checkpoint covers the chain: a rewrite or truncation would not be detected"
                    ),
                }
            }
            Some(b) => {
                println!(
                    "audit chain BROKEN at sequence {} ({}): {}",
                    b.seq,
                    b.kind.as_str(),
                    b.reason
                );
                println!("  {} event(s) before it verified", report.events);
            }
        },
    }
    Ok(if intact {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `keyward audit public-key`: the audit key's SPKI as PEM, from the token.
pub async fn audit_public_key(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let reader = audit_reader(&config).await?;
    let keys = reader.token_keys().await?;
    if keys.is_empty() {
        anyhow::bail!("no audit key on the token: run `keyward init` or start the daemon once");
    }
    for (id, (alg, spki)) in &keys {
        eprintln!("audit key {id} ({alg})");
        print!(
            "{}",
            der::pem::encode_string("PUBLIC KEY", der::pem::LineEnding::LF, spki)
                .map_err(|e| anyhow::anyhow!("{e}"))?
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `keyward keys list`: every key in the store with its state, age and the
/// planner's next rotation (by the rotation policy in force).
pub async fn keys_list(config_path: &Path, output: Output) -> anyhow::Result<ExitCode> {
    use crate::rotation::plan::{self, KeyView, PlanInput, RotationView};
    use crate::store::{KeyPurpose, KeyState};
    let config = Config::load(config_path)?;
    let policies = Policies::load(&config.policies.dir)?;
    let store = crate::app::open_store_read_only(&config).await?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let keys = store.list_keys().await?;
    let mut cert_not_after = std::collections::BTreeMap::new();
    for ca in store.list_cas().await? {
        let summary = crate::ca::x509::summarize(&ca.certificate_der)?;
        cert_not_after.insert(ca.key_id, summary.not_after);
    }
    for purpose in [KeyPurpose::OcspSigning, KeyPurpose::TlsServer] {
        for svc in store.service_certificates(purpose).await? {
            cert_not_after.entry(svc.key_id).or_insert(svc.not_after);
        }
    }
    let views: Vec<KeyView> = keys
        .iter()
        .filter(|k| k.state == KeyState::Active)
        .map(|k| KeyView {
            key_id: k.id,
            purpose: k.purpose,
            target: k.ca_name.clone().unwrap_or_else(|| "server".to_string()),
            state: k.state,
            activated_at: k.created_at,
            cert_not_after: cert_not_after.get(&k.id).copied(),
            // Which key store holds a parent is the daemon's view; not needed to list.
            parent_on_card: false,
        })
        .collect();
    let rotations: Vec<RotationView> = store
        .list_rotations(true, 1000)
        .await?
        .iter()
        .map(RotationView::from)
        .collect();
    let planned = plan::plan(
        &PlanInput {
            keys: &views,
            rotations: &rotations,
        },
        &policies.rotation,
        now,
    );
    let rows: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| {
            let item = planned.items.iter().find(|i| {
                i.key_id == Some(k.id) && !matches!(i.action, plan::Action::DestroyOld { .. })
            });
            serde_json::json!({
                "id": k.id,
                "purpose": k.purpose.as_str(),
                "target": k.ca_name,
                "state": k.state.as_str(),
                "algorithm": k.algorithm.as_str(),
                "keystore": k.keystore,
                "label": k.label,
                "created_at": crate::clock::rfc3339(crate::clock::from_unix(k.created_at)),
                "age_days": (now - k.created_at).max(0) / 86_400,
                "next_rotation_at": item
                    .and_then(|i| i.next_rotation_at)
                    .map(|t| crate::clock::rfc3339(crate::clock::from_unix(t))),
                "plan": item.map(|i| i.action.kind()),
            })
        })
        .collect();
    let value = serde_json::Value::Array(rows);
    super::client::print(output, &value, |v| {
        println!(
            "{:<36}  {:<13} {:<10} {:<11} {:<11} {:>6}  {:<20}  PLAN",
            "ID", "PURPOSE", "TARGET", "STATE", "ALGORITHM", "AGE(d)", "NEXT ROTATION"
        );
        for r in v.as_array().into_iter().flatten() {
            println!(
                "{:<36}  {:<13} {:<10} {:<11} {:<11} {:>6}  {:<20}  {}",
                r["id"].as_str().unwrap_or("-"),
                r["purpose"].as_str().unwrap_or("-"),
                r["target"].as_str().unwrap_or("-"),
                r["state"].as_str().unwrap_or("-"),
                r["algorithm"].as_str().unwrap_or("-"),
                r["age_days"],
                r["next_rotation_at"].as_str().unwrap_or("-"),
                r["plan"].as_str().unwrap_or("-"),
            );
        }
    });
    Ok(ExitCode::SUCCESS)
}
