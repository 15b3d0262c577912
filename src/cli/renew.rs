//! `keyward renew --dir DIR`: the reference device client for renewal. Reads
//! key.pem and cert.pem written by `keyward enroll`, proves possession of
//! the current key by signing a server nonce (see `ca::renewal`), and
//! writes the new certificate (and, with `--rekey`, the new key), keeping
//! the previous files as `*.prev`.

use super::client::Api;
use super::enroll::{csr_for, make_key_and_csr};
use super::local::write_private;
use anyhow::{Context, bail};
use base64::Engine;
use der::Decode;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use zeroize::Zeroizing;

#[derive(Debug, clap::Args)]
pub struct RenewArgs {
    /// Directory written by `keyward enroll` (key.pem, cert.pem, chain.pem).
    #[arg(long)]
    dir: PathBuf,
    /// Daemon URL (default: the one in DIR/registration.json, else KEYWARD_URL).
    #[arg(long, env = "KEYWARD_URL")]
    url: Option<String>,
    /// Make a new key (P-256) instead of renewing the current one.
    #[arg(long)]
    rekey: bool,
}

fn read_pem(path: &Path, label: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
    );
    let (found, der) = der::pem::decode_vec(text.trim().as_bytes())
        .map_err(|e| anyhow::anyhow!("{} is not PEM: {e}", path.display()))?;
    if found != label {
        bail!("{} holds {found}, not {label}", path.display());
    }
    Ok(Zeroizing::new(der))
}

/// The device id: the certificate's subject CN (keyward puts it there).
fn device_id(cert_der: &[u8]) -> anyhow::Result<uuid::Uuid> {
    let cert = x509_cert::Certificate::from_der(cert_der).context("cert.pem is not X.509")?;
    for atv in cert.tbs_certificate().subject().iter() {
        if atv.oid == const_oid::db::rfc4519::CN {
            let cn = String::from_utf8_lossy(atv.value.value()).to_string();
            return uuid::Uuid::parse_str(&cn)
                .with_context(|| format!("the certificate's CN `{cn}` is not a device id"));
        }
    }
    bail!("the certificate has no CN")
}

fn pem(label: &str, der: &[u8]) -> anyhow::Result<String> {
    Ok(der::pem::encode_string(label, der::pem::LineEnding::LF, der).map_err(der::Error::from)?)
}

pub async fn run(args: RenewArgs) -> anyhow::Result<ExitCode> {
    let key_path = args.dir.join("key.pem");
    let cert_path = args.dir.join("cert.pem");
    let pkcs8 = read_pem(&key_path, "PRIVATE KEY")?;
    let cert_der = read_pem(&cert_path, "CERTIFICATE")?;
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng)
        .map_err(|_| anyhow::anyhow!("key.pem is not a P-256 PKCS#8 key"))?;
    let id = device_id(&cert_der)?;
    let url = match args.url {
        Some(u) => u,
        None => {
            let reg = std::fs::read_to_string(args.dir.join("registration.json"))
                .context("no --url and no registration.json")?;
            let v: serde_json::Value = serde_json::from_str(&reg)?;
            v["url"]
                .as_str()
                .context("registration.json has no url")?
                .to_string()
        }
    };
    let (new_key, csr_der) = if args.rekey {
        let (k, csr) = make_key_and_csr(&id.to_string())?;
        (Some(k), csr)
    } else {
        (None, csr_for(&key, &id.to_string())?)
    };
    let api = Api::new(&url, None)?;
    let (_, n) = api
        .call(
            reqwest::Method::GET,
            &format!("/v1/devices/{id}/renew/nonce"),
            None,
            None,
        )
        .await?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let nonce = b64
        .decode(n["nonce"].as_str().unwrap_or_default())
        .context("the server's nonce is not base64url")?;
    let message = crate::ca::renewal::proof_message(id, &nonce, &csr_der);
    let signature = key
        .sign(&rng, &message)
        .map_err(|_| anyhow::anyhow!("signing the renewal proof failed"))?;
    let (_, v) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/devices/{id}/renew"),
            Some(&json!({
                "csr": pem("CERTIFICATE REQUEST", &csr_der)?,
                "nonce": b64.encode(&nonce),
                "signature": b64.encode(signature.as_ref()),
                "certificate": pem("CERTIFICATE", &cert_der)?,
            })),
            None,
        )
        .await?;
    let cert = v["certificate_pem"].as_str().unwrap_or_default();
    let chain = v["chain_pem"].as_str().unwrap_or_default();
    if cert.is_empty() || chain.is_empty() {
        bail!("the renewal answer lacks the certificate or chain");
    }
    // The previous files stay as *.prev; every write is atomic, keys 0600.
    std::fs::copy(&cert_path, args.dir.join("cert.pem.prev")).context("keeping cert.pem.prev")?;
    if let Some(k) = &new_key {
        let old = Zeroizing::new(std::fs::read(&key_path)?);
        write_private(&args.dir.join("key.pem.prev"), &old)?;
        let key_pem = Zeroizing::new(pem("PRIVATE KEY", k)?);
        write_private(&key_path, key_pem.as_bytes())?;
    }
    write_private(&cert_path, cert.as_bytes())?;
    write_private(&args.dir.join("chain.pem"), chain.as_bytes())?;
    println!("{}", v["serial"].as_str().unwrap_or_default());
    eprintln!(
        "renewed {id}: serial {} (previous {}), not after {}{}",
        v["serial"].as_str().unwrap_or("-"),
        v["previous_serial"].as_str().unwrap_or("-"),
        v["not_after"].as_str().unwrap_or("-"),
        if args.rekey { ", new key" } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}
