//! Attestation PKI: a test root CA (kept in the state dir), the F9 attestation key and its
//! certificate, and the per-slot attestation certificates with Yubico's extensions.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use der::asn1::OctetString;
use der::{Decode, DecodePem, Encode, EncodePem};
use x509_cert::Certificate;
use x509_cert::builder::profile::BuilderProfile;
use x509_cert::builder::{Builder, CertificateBuilder};
use x509_cert::certificate::TbsCertificate;
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::BasicConstraints;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{SubjectPublicKeyInfoOwned, SubjectPublicKeyInfoRef};
use x509_cert::time::Validity;

use crate::crypto::{self, EcKey};

/// Yubico's attestation extension OIDs (1.3.6.1.4.1.41482.3.x).
pub const OID_FIRMWARE: &str = "1.3.6.1.4.1.41482.3.3";
pub const OID_SERIAL: &str = "1.3.6.1.4.1.41482.3.7";
pub const OID_POLICY: &str = "1.3.6.1.4.1.41482.3.8";
pub const OID_FORM_FACTOR: &str = "1.3.6.1.4.1.41482.3.9";

/// File names inside `--state-dir`.
pub const ROOT_PEM: &str = "attestation-root.pem";
pub const ROOT_KEY: &str = "attestation-root.key";

const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

struct Profile {
    subject: Name,
    issuer: Name,
    extensions: Vec<Extension>,
}

impl BuilderProfile for Profile {
    fn get_issuer(&self, _subject: &Name) -> Name {
        self.issuer.clone()
    }

    fn get_subject(&self) -> Name {
        self.subject.clone()
    }

    fn build_extensions(
        &self,
        _spk: SubjectPublicKeyInfoRef<'_>,
        _issuer_spk: SubjectPublicKeyInfoRef<'_>,
        _tbs: &TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        Ok(self.extensions.clone())
    }
}

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn random_serial() -> Result<SerialNumber, String> {
    let mut bytes = [0u8; 16];
    crypto::random(&mut bytes)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::new(&bytes).map_err(err("serial"))
}

fn extension(oid: &str, critical: bool, value: Vec<u8>) -> Result<Extension, String> {
    Ok(Extension {
        extn_id: const_oid::ObjectIdentifier::new(oid).map_err(err("oid"))?,
        critical,
        extn_value: OctetString::new(value).map_err(err("extension"))?,
    })
}

fn ca_extension() -> Result<Extension, String> {
    let bc = BasicConstraints {
        ca: true,
        path_len_constraint: None,
    };
    extension(
        "2.5.29.19",
        true,
        bc.to_der().map_err(err("basic constraints"))?,
    )
}

fn issue(
    subject: &str,
    issuer: &Name,
    public: &EcKey,
    signer: &p256::ecdsa::SigningKey,
    extensions: Vec<Extension>,
) -> Result<Certificate, String> {
    let profile = Profile {
        subject: Name::from_str(subject).map_err(err("subject"))?,
        issuer: issuer.clone(),
        extensions,
    };
    let spki = SubjectPublicKeyInfoOwned::from_der(&public.spki_der()?).map_err(err("spki"))?;
    let validity = Validity::from_now(TEN_YEARS).map_err(err("validity"))?;
    let builder = CertificateBuilder::new(profile, random_serial()?, validity, spki)
        .map_err(err("builder"))?;
    builder
        .build::<_, p256::ecdsa::DerSignature>(signer)
        .map_err(err("sign certificate"))
}

/// The attestation chain: root CA → F9 intermediate → slot certificates.
pub struct Attestation {
    pub root_key: p256::ecdsa::SigningKey,
    pub root_cert: Certificate,
    pub f9_key: EcKey,
    pub f9_cert: Certificate,
}

impl Attestation {
    /// Loads the root CA from `state_dir` (creating and writing it on first start) and
    /// makes a fresh F9 key certified by it.
    pub fn load_or_create(state_dir: Option<&Path>) -> Result<Attestation, String> {
        let (root_key, root_cert) = match state_dir {
            Some(dir) if dir.join(ROOT_KEY).exists() && dir.join(ROOT_PEM).exists() => {
                let hex_key =
                    std::fs::read_to_string(dir.join(ROOT_KEY)).map_err(err("read root key"))?;
                let raw = hex::decode(hex_key.trim()).map_err(err("root key hex"))?;
                let key = p256::ecdsa::SigningKey::from_slice(&raw).map_err(err("root key"))?;
                let pem =
                    std::fs::read_to_string(dir.join(ROOT_PEM)).map_err(err("read root pem"))?;
                let cert = Certificate::from_pem(pem.as_bytes()).map_err(err("root pem"))?;
                (key, cert)
            }
            _ => {
                let EcKey::P256(key) = EcKey::generate(crypto::KeyAlg::P256)? else {
                    return Err("unexpected key type".into());
                };
                let subject = "CN=piv-emulator Test Attestation Root CA";
                let name = Name::from_str(subject).map_err(err("root name"))?;
                let cert = issue(
                    subject,
                    &name,
                    &EcKey::P256(key.clone()),
                    &key,
                    vec![ca_extension()?],
                )?;
                if let Some(dir) = state_dir {
                    std::fs::create_dir_all(dir).map_err(err("create state dir"))?;
                    let pem = cert
                        .to_pem(der::pem::LineEnding::LF)
                        .map_err(err("root pem"))?;
                    std::fs::write(dir.join(ROOT_PEM), pem).map_err(err("write root pem"))?;
                    std::fs::write(dir.join(ROOT_KEY), hex::encode(key.to_bytes()))
                        .map_err(err("write root key"))?;
                }
                (key, cert)
            }
        };
        let f9_key = EcKey::generate(crypto::KeyAlg::P256)?;
        let f9_cert = issue(
            "CN=Yubico PIV Attestation",
            &root_cert.tbs_certificate().subject().clone(),
            &f9_key,
            &root_key,
            vec![ca_extension()?],
        )?;
        Ok(Attestation {
            root_key,
            root_cert,
            f9_key,
            f9_cert,
        })
    }

    /// DER of the F9 intermediate certificate.
    pub fn f9_cert_der(&self) -> Result<Vec<u8>, String> {
        self.f9_cert.to_der().map_err(err("f9 cert"))
    }

    /// Root CA certificate as PEM.
    pub fn root_pem(&self) -> Result<String, String> {
        self.root_cert
            .to_pem(der::pem::LineEnding::LF)
            .map_err(err("root pem"))
    }

    /// Attestation certificate (DER) for the key in `slot`.
    pub fn attest(
        &self,
        slot: u8,
        key: &EcKey,
        version: [u8; 3],
        serial: u32,
        pin_policy: u8,
        touch_policy: u8,
    ) -> Result<Vec<u8>, String> {
        let EcKey::P256(signer) = &self.f9_key else {
            return Err("F9 key must be P-256".into());
        };
        let serial_der = der::asn1::Uint::new(&serial.to_be_bytes())
            .and_then(|u| u.to_der())
            .map_err(err("serial ext"))?;
        let extensions = vec![
            extension(OID_FIRMWARE, false, version.to_vec())?,
            extension(OID_SERIAL, false, serial_der)?,
            extension(OID_POLICY, false, vec![pin_policy, touch_policy])?,
            extension(OID_FORM_FACTOR, false, vec![0x01])?,
        ];
        let cert = issue(
            &format!("CN=YubiKey PIV Attestation {slot:02x}"),
            &self.f9_cert.tbs_certificate().subject().clone(),
            key,
            signer,
            extensions,
        )?;
        cert.to_der().map_err(err("attestation cert"))
    }
}
