//! `keyward enroll`: the reference device client. Makes a P-256 key and a
//! CSR locally (the private key never leaves this machine), registers,
//! polls until an admin decides, then writes the credentials.

use super::client::Api;
use super::local::write_private;
use crate::ca::x509;
use anyhow::{Context, bail};
use der::asn1::BitString;
use der::{Decode, Encode};
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::json;
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use x509_cert::name::Name;
use x509_cert::request::{CertReq, CertReqInfo, Version};
use zeroize::Zeroizing;

#[derive(Debug, clap::Args)]
pub struct EnrollArgs {
    /// Daemon URL.
    #[arg(long, env = "KEYWARD_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// PEM CA certificate(s) to trust for an https:// URL (keyward's root
    /// with `issue = true`); when set, only these are trusted.
    #[arg(long, env = "KEYWARD_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Device name shown to approvers.
    #[arg(long)]
    name: String,
    /// Directory for key.pem, cert.pem, chain.pem and registration.json.
    #[arg(long)]
    out: PathBuf,
    /// Enrollment group; needed only for groups without attestation (the
    /// attestation decides the group otherwise). The server's default is
    /// `default`.
    #[arg(long)]
    group: Option<String>,
    /// File holding a bootstrap token (`keyward tokens create`). Secrets are
    /// never taken on the command line (argv is visible in `ps`); the
    /// KEYWARD_BOOTSTRAP_TOKEN environment variable works too.
    #[arg(long = "token-file", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// File holding a JWT from the group's trusted issuer.
    #[arg(long, value_name = "FILE")]
    jwt_file: Option<PathBuf>,
    /// File holding a reclaim code for an existing device (with --device-id).
    #[arg(
        long = "reclaim-code-file",
        value_name = "FILE",
        requires = "device_id"
    )]
    reclaim_code_file: Option<PathBuf>,
    /// The existing device a reclaim code re-binds to the new key.
    #[arg(long)]
    device_id: Option<String>,
    /// Ask the server to generate the key (groups with key_source = "server"):
    /// it arrives once, encrypted — to --age-recipient as an age file
    /// (`key.age`), or as `key.p12` with its one-time password in
    /// `key.p12.password` (both mode 0600).
    #[arg(long)]
    server_key: bool,
    /// age X25519 recipient (`age1…`) for a server-generated key.
    #[arg(long, requires = "server_key")]
    age_recipient: Option<String>,
    /// Manufacturer certificate (PEM; the leaf, then any intermediates) for
    /// groups with x509 attestation; with --manufacturer-key.
    #[arg(long, value_name = "FILE", requires = "manufacturer_key")]
    manufacturer_cert: Option<PathBuf>,
    /// The manufacturer certificate's private key (PKCS#8 PEM: P-256, P-384,
    /// RSA or Ed25519); it signs a server nonce and never leaves this machine.
    #[arg(long, value_name = "FILE", requires = "manufacturer_cert")]
    manufacturer_key: Option<PathBuf>,
    #[arg(long = "type")]
    device_type: Option<String>,
    #[arg(long)]
    location: Option<String>,
    #[arg(long)]
    firmware: Option<String>,
    /// Seconds between status polls.
    #[arg(long, default_value_t = 2)]
    poll_interval: u64,
    /// Give up after this many seconds without a decision (0 = wait forever).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
}

/// A fresh P-256 key (PKCS#8 DER, zeroized on drop) and a CSR signed by it.
pub fn make_key_and_csr(common_name: &str) -> anyhow::Result<(Zeroizing<Vec<u8>>, Vec<u8>)> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("key generation failed"))?;
    let pkcs8 = Zeroizing::new(pkcs8.as_ref().to_vec());
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng)
        .map_err(|_| anyhow::anyhow!("generated key is unusable"))?;
    let csr = csr_for(&key, common_name)?;
    Ok((pkcs8, csr))
}

pub(super) fn csr_for(key: &EcdsaKeyPair, common_name: &str) -> anyhow::Result<Vec<u8>> {
    let rng = ring::rand::SystemRandom::new();
    let spki = SubjectPublicKeyInfoOwned {
        algorithm: AlgorithmIdentifierOwned {
            oid: const_oid::db::rfc5912::ID_EC_PUBLIC_KEY,
            parameters: Some(const_oid::db::rfc5912::SECP_256_R_1.into()),
        },
        subject_public_key: BitString::from_bytes(key.public_key().as_ref())?,
    };
    let info = CertReqInfo {
        version: Version::V1,
        subject: Name::from_der(&x509::name_cn(common_name)?)?,
        public_key: spki,
        attributes: Default::default(),
    };
    let info_der = info.to_der()?;
    let sig = key
        .sign(&rng, &info_der)
        .map_err(|_| anyhow::anyhow!("signing the CSR failed"))?;
    let req = CertReq {
        info,
        algorithm: AlgorithmIdentifierOwned {
            oid: const_oid::db::rfc5912::ECDSA_WITH_SHA_256,
            parameters: None,
        },
        signature: BitString::from_bytes(sig.as_ref())?,
    };
    Ok(req.to_der()?)
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn read_secret_file(path: &Path, what: &str) -> anyhow::Result<Zeroizing<String>> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the {what} from {}", path.display()))?,
    );
    let trimmed = Zeroizing::new(text.trim().to_string());
    if trimmed.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(trimmed)
}

/// Signs `message` with a PKCS#8 key (P-256/P-384 ECDSA with SHA-256/384,
/// RSA PKCS#1 v1.5 SHA-256, Ed25519), as the possession proof expects.
fn sign_with_pkcs8(pkcs8: &[u8], message: &[u8]) -> anyhow::Result<Vec<u8>> {
    use ring::signature as s;
    let rng = ring::rand::SystemRandom::new();
    for alg in [
        &s::ECDSA_P256_SHA256_ASN1_SIGNING,
        &s::ECDSA_P384_SHA384_ASN1_SIGNING,
    ] {
        if let Ok(k) = EcdsaKeyPair::from_pkcs8(alg, pkcs8, &rng) {
            return k
                .sign(&rng, message)
                .map(|sig| sig.as_ref().to_vec())
                .map_err(|_| anyhow::anyhow!("signing with the manufacturer key failed"));
        }
    }
    if let Ok(k) = s::RsaKeyPair::from_pkcs8(pkcs8) {
        let mut sig = vec![0; k.public().modulus_len()];
        k.sign(&s::RSA_PKCS1_SHA256, &rng, message, &mut sig)
            .map_err(|_| anyhow::anyhow!("signing with the manufacturer key failed"))?;
        return Ok(sig);
    }
    if let Ok(k) = s::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8) {
        return Ok(k.sign(message).as_ref().to_vec());
    }
    bail!("the manufacturer key is not a PKCS#8 P-256, P-384, RSA or Ed25519 key")
}

/// The manufacturer proof: a fresh nonce from the server, signed together
/// with the CSR's digest by the manufacturer key.
async fn manufacturer_attestation(
    api: &Api,
    cert: &Path,
    key: &Path,
    csr_der: &[u8],
) -> anyhow::Result<serde_json::Value> {
    use base64::Engine;
    let chain =
        std::fs::read_to_string(cert).with_context(|| format!("cannot read {}", cert.display()))?;
    let key_pem = Zeroizing::new(
        std::fs::read_to_string(key).with_context(|| format!("cannot read {}", key.display()))?,
    );
    let (label, pkcs8) = der::pem::decode_vec(key_pem.trim().as_bytes())
        .map_err(|_| anyhow::anyhow!("{} is not a PEM key", key.display()))?;
    let pkcs8 = Zeroizing::new(pkcs8);
    if label != "PRIVATE KEY" {
        bail!(
            "{} holds a `{label}`; convert it to PKCS#8 (`openssl pkcs8 -topk8 -nocrypt`)",
            key.display()
        );
    }
    let (_, n) = api
        .call(reqwest::Method::GET, "/v1/registrations/nonce", None, None)
        .await?;
    let nonce = n["nonce"]
        .as_str()
        .context("the server's nonce answer lacks the nonce")?;
    let message = crate::registry::attestation::x509::possession_message(nonce, csr_der);
    let signature = sign_with_pkcs8(&pkcs8, &message)?;
    Ok(json!({
        "method": "x509",
        "chain": chain,
        "nonce": nonce,
        "signature": base64::engine::general_purpose::STANDARD.encode(signature),
    }))
}

/// The `attestation` object of the registration, from the flags.
async fn attestation(
    args: &EnrollArgs,
    api: &Api,
    csr_der: &[u8],
) -> anyhow::Result<serde_json::Value> {
    let env_token = std::env::var("KEYWARD_BOOTSTRAP_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .map(|t| Zeroizing::new(t.trim().to_string()));
    let mut chosen = Vec::new();
    if let Some(f) = &args.token_file {
        let t = read_secret_file(f, "bootstrap token")?;
        chosen.push(json!({ "method": "bootstrap-token", "token": t.as_str() }));
    } else if let Some(t) = env_token {
        chosen.push(json!({ "method": "bootstrap-token", "token": t.as_str() }));
    }
    if let Some(f) = &args.jwt_file {
        let t = read_secret_file(f, "JWT")?;
        chosen.push(json!({ "method": "jwt", "token": t.as_str() }));
    }
    if let Some(f) = &args.reclaim_code_file {
        let code = read_secret_file(f, "reclaim code")?;
        chosen.push(json!({
            "method": "reclaim",
            "device_id": args.device_id.as_deref().unwrap_or_default(),
            "code": code.as_str(),
        }));
    }
    if let (Some(cert), Some(key)) = (&args.manufacturer_cert, &args.manufacturer_key) {
        chosen.push(manufacturer_attestation(api, cert, key, csr_der).await?);
    }
    match chosen.len() {
        0 => Ok(serde_json::Value::Null),
        1 => Ok(chosen.remove(0)),
        _ => bail!(
            "give one attestation: a bootstrap token, a JWT, a reclaim code or a manufacturer certificate"
        ),
    }
}

pub async fn run(args: EnrollArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let key_path = args.out.join("key.pem");
    for existing in [
        &key_path,
        &args.out.join("key.age"),
        &args.out.join("key.p12"),
    ] {
        if existing.exists() {
            bail!(
                "{} exists; refusing to overwrite a device key",
                existing.display()
            );
        }
    }
    let api = Api::new(&args.url, None, args.ca_cert.as_deref())?;
    // A device-made key (the default): generated here, it never leaves.
    let local = if args.server_key {
        None
    } else {
        let (pkcs8, csr_der) = make_key_and_csr(&args.name)?;
        let key_pem = Zeroizing::new(
            der::pem::encode_string("PRIVATE KEY", der::pem::LineEnding::LF, &pkcs8)
                .map_err(der::Error::from)?,
        );
        let csr_pem =
            der::pem::encode_string("CERTIFICATE REQUEST", der::pem::LineEnding::LF, &csr_der)
                .map_err(der::Error::from)?;
        Some((key_pem, csr_der, csr_pem))
    };
    let csr_der = local.as_ref().map(|l| l.1.clone()).unwrap_or_default();
    let attestation = attestation(&args, &api, &csr_der).await?;
    if let Some((key_pem, _, _)) = &local {
        // The key is saved before registering so a crash cannot strand a certificate without its key.
        write_private(&key_path, key_pem.as_bytes())?;
    }
    let (_, reg) = api
        .call(
            reqwest::Method::POST,
            "/v1/registrations",
            Some(&json!({
                "csr": local.as_ref().map(|l| l.2.clone()),
                "name": args.name,
                "group": args.group,
                "attestation": attestation,
                "age_recipient": args.age_recipient,
                "device_type": args.device_type,
                "location": args.location,
                "firmware": args.firmware,
            })),
            None,
        )
        .await?;
    let id = reg["id"].as_str().unwrap_or_default().to_string();
    let secret = Zeroizing::new(reg["secret"].as_str().unwrap_or_default().to_string());
    if id.is_empty() || secret.is_empty() {
        bail!("the server's answer lacks the registration id or secret");
    }
    write_private(
        &args.out.join("registration.json"),
        serde_json::to_string_pretty(
            &json!({ "id": id, "secret": secret.as_str(), "url": args.url }),
        )?
        .as_bytes(),
    )?;
    println!("{id}");
    eprintln!("registration {id} submitted; waiting for approval");
    let started = Instant::now();
    let mut status = reg["status"].as_str().unwrap_or("pending").to_string();
    while status == "pending" || status == "approved" {
        if args.timeout > 0 && started.elapsed() > Duration::from_secs(args.timeout) {
            bail!("no decision on registration {id} after {} s", args.timeout);
        }
        tokio::time::sleep(Duration::from_secs(args.poll_interval.max(1))).await;
        let (_, v) = api
            .call(
                reqwest::Method::GET,
                &format!("/v1/registrations/{id}"),
                None,
                Some(secret.as_str()),
            )
            .await?;
        status = v["status"].as_str().unwrap_or("unknown").to_string();
    }
    if status != "issued" {
        eprintln!("registration {id} was {status}");
        return Ok(ExitCode::FAILURE);
    }
    let (_, creds) = api
        .call(
            reqwest::Method::GET,
            &format!("/v1/registrations/{id}/credentials"),
            None,
            Some(secret.as_str()),
        )
        .await?;
    let cert = creds["certificate_pem"].as_str().unwrap_or_default();
    let chain = creds["chain_pem"].as_str().unwrap_or_default();
    if cert.is_empty() || chain.is_empty() {
        bail!("the credentials answer lacks the certificate or chain");
    }
    if args.server_key {
        let bundle = &creds["key_bundle"];
        match bundle["format"].as_str() {
            Some("age") => write_private(
                &args.out.join("key.age"),
                bundle["data"].as_str().unwrap_or_default().as_bytes(),
            )?,
            Some("pkcs12") => {
                use base64::Engine;
                let der = base64::engine::general_purpose::STANDARD
                    .decode(bundle["data"].as_str().unwrap_or_default())
                    .context("the PKCS#12 in the answer is not base64")?;
                write_private(&args.out.join("key.p12"), &der)?;
                let password =
                    Zeroizing::new(bundle["password"].as_str().unwrap_or_default().to_string());
                write_private(&args.out.join("key.p12.password"), password.as_bytes())?;
            }
            _ => bail!(
                "the credentials answer holds no key bundle (was the key delivered before, or is the group's key_source csr?)"
            ),
        }
    }
    write_public(&args.out.join("cert.pem"), cert)?;
    write_public(&args.out.join("chain.pem"), chain)?;
    if !creds["device_config"].is_null() {
        write_public(
            &args.out.join("device-config.json"),
            &serde_json::to_string_pretty(&creds["device_config"])?,
        )?;
    }
    // Only now, with everything on disk, tell the server it may stop
    // offering the credentials again.
    api.call(
        reqwest::Method::POST,
        &format!("/v1/registrations/{id}/credentials/confirm"),
        None,
        Some(secret.as_str()),
    )
    .await
    .context("confirming receipt of the credentials")?;
    eprintln!("credentials written to {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}
