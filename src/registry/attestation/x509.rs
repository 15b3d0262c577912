//! Manufacturer-certificate attestation (`method = "x509"`, seed 000 / plgd
//! DPS): a device presents the certificate its manufacturer put in it, with
//! any intermediates, and proves it holds that certificate's key by signing
//! a server nonce.
//!
//! Pure: no store, no clock (the caller passes `now`), no HTTP. One
//! [`ManufacturerVerifier`] per `x509` group, built when the policies are
//! loaded (a bad CA or CRL file refuses the policy, as for any invalid
//! policy) and shared by the request handlers.
//!
//! What a chain must satisfy, in the order the checks run (the first
//! failure is the answer):
//! 1. every certificate parses as DER X.509 (at most [`MAX_CHAIN`]);
//! 2. a path exists from the leaf through the presented intermediates to
//!    one of the group's manufacturer CAs, every link by name *and*
//!    signature (the deepest configured CA is preferred: an intermediate
//!    anchor is found before its root);
//! 3. structure: the leaf is not a CA and, when it has keyUsage, allows
//!    digitalSignature; every issuer above it is a CA (basicConstraints
//!    cA=true, keyUsage keyCertSign when present) whose pathLenConstraint
//!    admits the intermediates below it; no certificate on the path carries
//!    a critical extension keyward does not process (nameConstraints,
//!    policyConstraints, …: refused rather than ignored);
//! 4. every certificate on the path, the anchor included, is valid at `now`;
//! 5. no certificate on the path (the anchor too, unless it is a root) is
//!    listed on a configured CRL of its issuer;
//! 6. the group's `subject_cn_prefix`, if any, prefixes the leaf's CN.
//!
//! The possession proof is a signature by the leaf's key over
//! [`possession_message`]; [`verify_possession`] checks it.

use crate::ca::public_key::PublicKey;
use crate::crypto::verify_issued_by;
use crate::model::KeyAlgorithm;
use crate::policy::X509Attestation;
use const_oid::ObjectIdentifier;
use const_oid::db::rfc5280;
use der::{Decode, Encode};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use x509_cert::Certificate;
use x509_cert::certificate::Rfc5280;
use x509_cert::crl::CertificateList;
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage};

/// Longest chain a device may present (leaf + intermediates).
pub const MAX_CHAIN: usize = 8;

/// Domain separation of the possession proof (see [`possession_message`]).
pub const POSSESSION_CONTEXT: &[u8] = b"keyward-enroll-v1\n";

/// Certificate extensions keyward understands well enough that their being
/// critical is no reason to refuse: the constraints it enforces (basic
/// constraints, key usage) and descriptive ones that restrict nothing it
/// relies on here. Anything else marked critical is refused (RFC 5280 §4.2).
const KNOWN_CRITICAL: &[ObjectIdentifier] = &[
    rfc5280::ID_CE_BASIC_CONSTRAINTS,
    rfc5280::ID_CE_KEY_USAGE,
    rfc5280::ID_CE_EXT_KEY_USAGE,
    rfc5280::ID_CE_SUBJECT_ALT_NAME,
    rfc5280::ID_CE_SUBJECT_KEY_IDENTIFIER,
    rfc5280::ID_CE_AUTHORITY_KEY_IDENTIFIER,
    rfc5280::ID_CE_CERTIFICATE_POLICIES,
];

/// CRL extensions whose presence (critical or not) does not change the
/// meaning of a complete CRL: its number and the issuer's key id.
const KNOWN_CRL_CRITICAL: &[ObjectIdentifier] = &[
    rfc5280::ID_CE_CRL_NUMBER,
    rfc5280::ID_CE_AUTHORITY_KEY_IDENTIFIER,
];

/// Why a manufacturer CA or CRL file cannot be used. A policy (operator)
/// error, never a client's.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileProblem {
    #[error("cannot read it")]
    Read(#[source] std::io::Error),
    #[error("it holds no PEM CERTIFICATE block")]
    NoCertificate,
    #[error("PEM block {index} is not a DER X.509 certificate")]
    BadCertificate {
        index: usize,
        #[source]
        source: der::Error,
    },
    #[error("PEM block {index} cannot be decoded")]
    BadPem {
        index: usize,
        #[source]
        source: der::Error,
    },
    #[error("certificate {index} ({subject}) is not a CA: basicConstraints cA=true is required")]
    NotCa { index: usize, subject: String },
    #[error("certificate {index} ({subject}) has a keyUsage without keyCertSign")]
    NoCertSign { index: usize, subject: String },
    #[error(
        "certificate {index} ({subject}) has a critical extension keyward does not process: {oid}"
    )]
    CriticalExtension {
        index: usize,
        subject: String,
        oid: ObjectIdentifier,
    },
    #[error("it is neither a PEM (X509 CRL) nor a DER certificate revocation list")]
    BadCrl(#[source] der::Error),
    #[error("it holds no PEM X509 CRL block")]
    NoCrl,
    #[error(
        "CRL {index} (issuer {issuer}) is not signed by any of the group's manufacturer CAs (or that CA's keyUsage lacks cRLSign)"
    )]
    CrlNotSigned { index: usize, issuer: String },
    #[error(
        "CRL {index} (issuer {issuer}) has a critical extension keyward does not process: {oid} (delta, partitioned and indirect CRLs are not supported)"
    )]
    CrlCriticalExtension {
        index: usize,
        issuer: String,
        oid: ObjectIdentifier,
    },
}

/// Why a manufacturer attestation is refused. Every variant but
/// [`X509AttestError::Policy`] is the client's doing (a 4xx).
#[derive(Debug, thiserror::Error)]
pub enum X509AttestError {
    #[error("the manufacturer certificate chain is empty")]
    EmptyChain,
    #[error(
        "the manufacturer certificate chain has {len} certificates; at most {max} are accepted"
    )]
    ChainTooLong { len: usize, max: usize },
    #[error("manufacturer chain certificate {index} is not a DER X.509 certificate")]
    NotACertificate {
        index: usize,
        #[source]
        source: der::Error,
    },
    /// The chain links up but breaks a structural rule (a CA leaf, a
    /// non-CA issuer, pathLen, keyUsage, an unprocessed critical extension).
    #[error("manufacturer certificate {subject}: {problem}")]
    Constraint {
        subject: String,
        problem: ConstraintProblem,
    },
    #[error("no configured manufacturer CA issued the certificate {subject} (issuer {issuer})")]
    UnknownCa { subject: String, issuer: String },
    #[error(
        "manufacturer certificate {subject} is not valid now (valid from {not_before} to {not_after}, unix seconds)"
    )]
    Expired {
        subject: String,
        not_before: i64,
        not_after: i64,
    },
    #[error(
        "manufacturer certificate {subject} (serial {serial_hex}) is revoked by its manufacturer"
    )]
    Revoked { subject: String, serial_hex: String },
    /// The prefix itself is not repeated to the client.
    #[error("the manufacturer certificate's subject common name does not match this group")]
    SubjectMismatch { prefix: String },
    #[error("the possession proof does not verify with the manufacturer certificate's key")]
    ProofInvalid,
    #[error("the manufacturer certificate's key cannot sign a possession proof keyward verifies")]
    ProofKeyUnsupported,
    /// The group's CA or CRL file is unusable (not a client error).
    #[error("{}: {problem}", file.display())]
    Policy {
        file: PathBuf,
        #[source]
        problem: PolicyFileProblem,
    },
}

/// The structural rule a chain broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintProblem {
    #[error("the leaf is a CA certificate (basicConstraints cA=true), not a device's")]
    LeafIsCa,
    #[error("the leaf's keyUsage does not allow digitalSignature")]
    LeafKeyUsage,
    #[error("it issues a certificate of the chain but is not a CA (basicConstraints cA=true)")]
    IssuerNotCa,
    #[error("it issues a certificate of the chain but its keyUsage lacks keyCertSign")]
    IssuerKeyUsage,
    #[error("its pathLenConstraint is exceeded by the intermediates below it")]
    PathLength,
    #[error("it has a critical extension keyward does not process")]
    CriticalExtension,
}

impl X509AttestError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::EmptyChain
            | Self::ChainTooLong { .. }
            | Self::NotACertificate { .. }
            | Self::Constraint { .. } => "manufacturer_chain_malformed",
            Self::UnknownCa { .. } => "manufacturer_unknown_ca",
            Self::Expired { .. } => "manufacturer_cert_expired",
            Self::Revoked { .. } => "manufacturer_cert_revoked",
            Self::SubjectMismatch { .. } => "manufacturer_subject_mismatch",
            Self::ProofInvalid | Self::ProofKeyUnsupported => "manufacturer_proof_invalid",
            Self::Policy { .. } => "manufacturer_policy_invalid",
        }
    }

    /// Whether the client caused it (4xx) rather than the group's files.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, Self::Policy { .. })
    }
}

/// What a verified chain says about the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedManufacturer {
    /// The leaf's serial number, upper-case hex of its DER content octets.
    pub serial_hex: String,
    /// RFC 4514 string of the leaf's subject.
    pub subject: String,
    /// RFC 4514 string of the leaf's issuer.
    pub issuer: String,
    /// Stable identity key: `x509:` ‖ hex(SHA-256(leaf issuer Name DER)) ‖
    /// `:` ‖ `serial_hex`. Issuer + serial names one certificate (RFC 5280
    /// §4.1.2.2), so one manufacturer certificate is one device identity.
    pub identity: String,
    /// DER SubjectPublicKeyInfo of the leaf: verifies the possession proof.
    pub leaf_spki_der: Vec<u8>,
    /// For choosing among groups that accept the same chain (higher wins):
    /// depth of the matched CA below its root × 2, + 1 with a CN prefix.
    pub specificity: u32,
}

/// The fields of a certificate the checks need, read once.
struct Parsed {
    der: Vec<u8>,
    subject_der: Vec<u8>,
    issuer_der: Vec<u8>,
    subject: String,
    serial: Vec<u8>,
    not_before: i64,
    not_after: i64,
    /// basicConstraints: (cA, pathLenConstraint); `None` when absent.
    basic: Option<(bool, Option<u8>)>,
    key_usage: Option<KeyUsage>,
    /// The first critical extension not in [`KNOWN_CRITICAL`].
    unknown_critical: Option<ObjectIdentifier>,
    spki_der: Vec<u8>,
    common_name: Option<String>,
}

impl Parsed {
    fn new(der: &[u8]) -> der::Result<Self> {
        let cert = Certificate::from_der(der)?;
        let tbs = cert.tbs_certificate();
        let basic = tbs
            .get_extension::<BasicConstraints>()?
            .map(|(_, b)| (b.ca, b.path_len_constraint));
        let key_usage = tbs.get_extension::<KeyUsage>()?.map(|(_, k)| k);
        let unknown_critical = tbs
            .extensions()
            .into_iter()
            .flatten()
            .find(|e| e.critical && !KNOWN_CRITICAL.contains(&e.extn_id))
            .map(|e| e.extn_id);
        let common_name = tbs.subject().common_name()?.map(String::from);
        let validity = tbs.validity();
        Ok(Self {
            der: der.to_vec(),
            subject_der: tbs.subject().to_der()?,
            issuer_der: tbs.issuer().to_der()?,
            subject: tbs.subject().to_string(),
            serial: tbs.serial_number().as_bytes().to_vec(),
            not_before: unix(&validity.not_before),
            not_after: unix(&validity.not_after),
            basic,
            key_usage,
            unknown_critical,
            spki_der: tbs.subject_public_key_info().to_der()?,
            common_name,
        })
    }

    fn is_ca(&self) -> bool {
        matches!(self.basic, Some((true, _)))
    }

    fn self_signed(&self) -> bool {
        self.subject_der == self.issuer_der && verify_issued_by(&self.der, &self.der)
    }

    /// Whether `self` names `issuer` as its issuer and carries its signature.
    fn issued_by(&self, issuer: &Parsed) -> bool {
        self.issuer_der == issuer.subject_der && verify_issued_by(&self.der, &issuer.der)
    }

    fn valid_at(&self, now: i64) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    fn constraint(&self, problem: ConstraintProblem) -> X509AttestError {
        X509AttestError::Constraint {
            subject: self.subject.clone(),
            problem,
        }
    }
}

fn unix(t: &x509_cert::time::Time) -> i64 {
    i64::try_from(t.to_unix_duration().as_secs()).unwrap_or(i64::MAX)
}

/// A configured manufacturer CA.
struct Anchor {
    cert: Parsed,
    /// Certificates between it and a self-signed root in the same file (0
    /// for a root; an intermediate whose root is not in the file counts 1).
    depth: u32,
    /// Self-signed: no CRL can revoke it.
    root: bool,
}

/// Checks manufacturer chains for one `x509` enrollment group.
pub struct ManufacturerVerifier {
    anchors: Vec<Anchor>,
    /// (issuer Name DER, serial content octets) of every revoked certificate
    /// on the group's CRLs.
    revoked: HashSet<(Vec<u8>, Vec<u8>)>,
    /// The earliest nextUpdate of the configured CRLs (unix seconds).
    crl_next_update: Option<i64>,
    subject_cn_prefix: Option<String>,
}

impl std::fmt::Debug for ManufacturerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManufacturerVerifier")
            .field(
                "anchors",
                &self
                    .anchors
                    .iter()
                    .map(|a| a.cert.subject.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("revoked", &self.revoked.len())
            .field("crl_next_update", &self.crl_next_update)
            .field("subject_cn_prefix", &self.subject_cn_prefix)
            .finish()
    }
}

impl ManufacturerVerifier {
    /// Reads the CA file (PEM, one or more CA certificates; blocks with
    /// other labels are ignored) and the CRL file (PEM with one or more
    /// `X509 CRL` blocks, or one DER CRL). Every certificate must be a CA;
    /// every CRL must be signed by one of them (cRLSign when it has a
    /// keyUsage). `ca_file`/`crl_file` are the policy's paths, resolved.
    pub fn new(
        policy: &X509Attestation,
        ca_file: &Path,
        crl_file: Option<&Path>,
    ) -> Result<Self, X509AttestError> {
        let bad = |file: &Path| {
            let file = file.to_path_buf();
            move |problem| X509AttestError::Policy {
                file: file.clone(),
                problem,
            }
        };
        let ca_bad = bad(ca_file);
        let text = std::fs::read(ca_file).map_err(|e| ca_bad(PolicyFileProblem::Read(e)))?;
        let blocks = pem_blocks(&text, "CERTIFICATE")
            .map_err(|(index, source)| ca_bad(PolicyFileProblem::BadPem { index, source }))?;
        if blocks.is_empty() {
            return Err(ca_bad(PolicyFileProblem::NoCertificate));
        }
        let mut certs = Vec::with_capacity(blocks.len());
        for (index, der) in blocks.iter().enumerate() {
            let cert = Parsed::new(der)
                .map_err(|source| ca_bad(PolicyFileProblem::BadCertificate { index, source }))?;
            let subject = cert.subject.clone();
            if !cert.is_ca() {
                return Err(ca_bad(PolicyFileProblem::NotCa { index, subject }));
            }
            if cert.key_usage.is_some_and(|k| !k.key_cert_sign()) {
                return Err(ca_bad(PolicyFileProblem::NoCertSign { index, subject }));
            }
            if let Some(oid) = cert.unknown_critical {
                return Err(ca_bad(PolicyFileProblem::CriticalExtension {
                    index,
                    subject,
                    oid,
                }));
            }
            certs.push(cert);
        }
        let depths: Vec<u32> = (0..certs.len()).map(|i| depth(&certs, i)).collect();
        let anchors: Vec<Anchor> = certs
            .into_iter()
            .zip(depths)
            .map(|(cert, depth)| Anchor {
                root: cert.self_signed(),
                cert,
                depth,
            })
            .collect();

        let mut revoked = HashSet::new();
        let mut crl_next_update: Option<i64> = None;
        if let Some(crl_file) = crl_file {
            let crl_bad = bad(crl_file);
            let bytes = std::fs::read(crl_file).map_err(|e| crl_bad(PolicyFileProblem::Read(e)))?;
            // DER starts with the SEQUENCE tag; anything else is read as PEM.
            let crls = if bytes.first() != Some(&0x30) {
                let blocks = pem_blocks(&bytes, "X509 CRL").map_err(|(index, source)| {
                    crl_bad(PolicyFileProblem::BadPem { index, source })
                })?;
                if blocks.is_empty() {
                    return Err(crl_bad(PolicyFileProblem::NoCrl));
                }
                blocks
            } else {
                vec![bytes]
            };
            for (index, der) in crls.iter().enumerate() {
                let crl = CertificateList::<Rfc5280>::from_der(der)
                    .map_err(|e| crl_bad(PolicyFileProblem::BadCrl(e)))?;
                let tbs = &crl.tbs_cert_list;
                let issuer = tbs.issuer.to_string();
                let issuer_der = tbs
                    .issuer
                    .to_der()
                    .map_err(|e| crl_bad(PolicyFileProblem::BadCrl(e)))?;
                // A CertificateList has a Certificate's outer shape (TBS,
                // algorithm, signature), which is all verify_issued_by reads.
                let signed = anchors.iter().any(|a| {
                    a.cert.subject_der == issuer_der
                        && a.cert.key_usage.is_none_or(|k| k.crl_sign())
                        && verify_issued_by(der, &a.cert.der)
                });
                if !signed {
                    return Err(crl_bad(PolicyFileProblem::CrlNotSigned { index, issuer }));
                }
                if let Some(ext) = tbs
                    .crl_extensions
                    .iter()
                    .flatten()
                    .find(|e| e.critical && !KNOWN_CRL_CRITICAL.contains(&e.extn_id))
                {
                    return Err(crl_bad(PolicyFileProblem::CrlCriticalExtension {
                        index,
                        issuer,
                        oid: ext.extn_id,
                    }));
                }
                if let Some(next) = &tbs.next_update {
                    let next = unix(next);
                    crl_next_update = Some(crl_next_update.map_or(next, |n| n.min(next)));
                }
                for entry in tbs.revoked_certificates.iter().flatten() {
                    // An entry's critical extension (certificateIssuer of an
                    // indirect CRL) would change what the entry revokes.
                    if let Some(ext) = entry
                        .crl_entry_extensions
                        .iter()
                        .flatten()
                        .find(|e| e.critical)
                    {
                        return Err(crl_bad(PolicyFileProblem::CrlCriticalExtension {
                            index,
                            issuer,
                            oid: ext.extn_id,
                        }));
                    }
                    revoked.insert((issuer_der.clone(), entry.serial_number.as_bytes().to_vec()));
                }
            }
        }
        Ok(Self {
            anchors,
            revoked,
            crl_next_update,
            subject_cn_prefix: policy.subject_cn_prefix.clone(),
        })
    }

    /// Checks a presented chain (leaf first, then intermediates in any
    /// order; DER) at `now` (unix seconds). See the module documentation
    /// for the checks and their order.
    pub fn verify_chain(
        &self,
        chain_der: &[Vec<u8>],
        now: i64,
    ) -> Result<VerifiedManufacturer, X509AttestError> {
        if chain_der.is_empty() {
            return Err(X509AttestError::EmptyChain);
        }
        if chain_der.len() > MAX_CHAIN {
            return Err(X509AttestError::ChainTooLong {
                len: chain_der.len(),
                max: MAX_CHAIN,
            });
        }
        let certs = chain_der
            .iter()
            .enumerate()
            .map(|(index, der)| {
                Parsed::new(der)
                    .map_err(|source| X509AttestError::NotACertificate { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;

        // 2. Path: at each step a configured CA first (the deepest wins),
        // else an unused presented certificate that signed the current one.
        let mut path: Vec<&Parsed> = vec![&certs[0]];
        let mut used = vec![false; certs.len()];
        used[0] = true;
        let anchor = loop {
            let current = path[path.len() - 1];
            if let Some(a) = self
                .anchors
                .iter()
                .filter(|a| current.issued_by(&a.cert))
                // Same name and key twice (a re-issued CA): the one valid now.
                .max_by_key(|a| (a.depth, a.cert.valid_at(now)))
            {
                break a;
            }
            let next = (0..certs.len()).find(|&j| !used[j] && current.issued_by(&certs[j]));
            match next {
                Some(j) => {
                    used[j] = true;
                    path.push(&certs[j]);
                }
                None => {
                    return Err(X509AttestError::UnknownCa {
                        subject: current.subject.clone(),
                        issuer: name_string(&current.issuer_der),
                    });
                }
            }
        };
        let leaf = &certs[0];

        // 3. Structure.
        if leaf.is_ca() {
            return Err(leaf.constraint(ConstraintProblem::LeafIsCa));
        }
        if leaf.key_usage.is_some_and(|k| !k.digital_signature()) {
            return Err(leaf.constraint(ConstraintProblem::LeafKeyUsage));
        }
        let issuers = path[1..].iter().copied().chain([&anchor.cert]);
        for (below, ca) in issuers.enumerate() {
            // `below`: intermediates between this CA and the leaf.
            match ca.basic {
                Some((true, limit)) => {
                    if limit.is_some_and(|l| below > usize::from(l)) {
                        return Err(ca.constraint(ConstraintProblem::PathLength));
                    }
                }
                _ => return Err(ca.constraint(ConstraintProblem::IssuerNotCa)),
            }
            if ca.key_usage.is_some_and(|k| !k.key_cert_sign()) {
                return Err(ca.constraint(ConstraintProblem::IssuerKeyUsage));
            }
        }
        let on_path = || path.iter().copied().chain([&anchor.cert]);
        if let Some(c) = on_path().find(|c| c.unknown_critical.is_some()) {
            return Err(c.constraint(ConstraintProblem::CriticalExtension));
        }

        // 4. Validity, the anchor included.
        if let Some(c) = on_path().find(|c| !c.valid_at(now)) {
            return Err(X509AttestError::Expired {
                subject: c.subject.clone(),
                not_before: c.not_before,
                not_after: c.not_after,
            });
        }

        // 5. Revocation (a root cannot be revoked by a CRL).
        let anchor_revocable = (!anchor.root).then_some(&anchor.cert);
        if let Some(c) = path.iter().copied().chain(anchor_revocable).find(|c| {
            self.revoked
                .contains(&(c.issuer_der.clone(), c.serial.clone()))
        }) {
            return Err(X509AttestError::Revoked {
                subject: c.subject.clone(),
                serial_hex: hex::encode_upper(&c.serial),
            });
        }

        // 6. Subject filter.
        if let Some(prefix) = &self.subject_cn_prefix {
            let cn = leaf.common_name.as_deref().unwrap_or("");
            if leaf.common_name.is_none() || !cn.starts_with(prefix.as_str()) {
                return Err(X509AttestError::SubjectMismatch {
                    prefix: prefix.clone(),
                });
            }
        }

        let serial_hex = hex::encode_upper(&leaf.serial);
        let issuer_hash = ring::digest::digest(&ring::digest::SHA256, &leaf.issuer_der);
        Ok(VerifiedManufacturer {
            identity: format!("x509:{}:{serial_hex}", hex::encode(issuer_hash)),
            serial_hex,
            subject: leaf.subject.clone(),
            issuer: name_string(&leaf.issuer_der),
            leaf_spki_der: leaf.spki_der.clone(),
            specificity: self.specificity(anchor),
        })
    }

    /// The earliest nextUpdate (unix seconds) of the group's CRLs, if any.
    /// The verifier keeps using a CRL past it (the manufacturer may publish
    /// rarely); the caller can warn or refuse to load a stale one.
    pub fn crl_next_update(&self) -> Option<i64> {
        self.crl_next_update
    }

    fn specificity(&self, anchor: &Anchor) -> u32 {
        anchor.depth.saturating_mul(2) + u32::from(self.subject_cn_prefix.is_some())
    }
}

/// Depth of `certs[i]` below a self-signed root, following issuers within
/// `certs`; a chain that leaves the file counts as one more level.
fn depth(certs: &[Parsed], i: usize) -> u32 {
    let mut current = &certs[i];
    let mut depth = 0u32;
    // Bounded: a cycle of cross-signed CAs cannot loop forever.
    for _ in 0..=certs.len() {
        if current.self_signed() {
            return depth;
        }
        depth += 1;
        match certs
            .iter()
            .find(|p| !std::ptr::eq(*p, current) && current.issued_by(p))
        {
            Some(parent) => current = parent,
            None => return depth,
        }
    }
    depth
}

fn name_string(name_der: &[u8]) -> String {
    x509_cert::name::Name::from_der(name_der)
        .map(|n| n.to_string())
        .unwrap_or_else(|_| hex::encode_upper(name_der))
}

/// The PEM blocks labelled `label` in `text`, decoded, in order; blocks
/// with other labels are skipped. Errors carry the block's index.
fn pem_blocks(text: &[u8], label: &str) -> Result<Vec<Vec<u8>>, (usize, der::Error)> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const END: &[u8] = b"-----END ";
    let mut out = Vec::new();
    let mut rest = text;
    let mut index = 0;
    while let Some(start) = find(rest, BEGIN) {
        let block = &rest[start..];
        let Some(end) = find(block, END) else {
            return Err((index, der::Error::from(der::ErrorKind::Failed)));
        };
        // The end line runs to the next "-----" after "-----END ".
        let after_end = &block[end + END.len()..];
        let close = find(after_end, b"-----").map_or(after_end.len(), |i| i + 5);
        let len = end + END.len() + close;
        let (found, der) =
            der::pem::decode_vec(&block[..len]).map_err(|e| (index, der::Error::from(e)))?;
        if found == label {
            out.push(der);
        }
        rest = &block[len..];
        index += 1;
    }
    Ok(out)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The exact bytes a device signs to prove it holds its manufacturer key:
///
/// ```text
/// "keyward-enroll-v1\n" || nonce (ASCII, as the server issued it) || "\n"
///     || lower-case hex of SHA-256(csr_der)
/// ```
///
/// `csr_der` is the DER CSR the registration submits, which binds the proof
/// to the key being certified; for a server-generated key (no CSR) it is
/// empty, and the hash is SHA-256 of the empty string. No trailing newline.
/// With OpenSSL: `openssl dgst -sha256 -sign manufacturer.key -out sig msg`
/// (SHA-384 for a P-384 key, no digest option for Ed25519: `openssl pkeyutl
/// -sign -rawin`).
pub fn possession_message(nonce: &str, csr_der: &[u8]) -> Vec<u8> {
    let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, csr_der));
    let mut m = Vec::with_capacity(POSSESSION_CONTEXT.len() + nonce.len() + 1 + digest.len());
    m.extend_from_slice(POSSESSION_CONTEXT);
    m.extend_from_slice(nonce.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(digest.as_bytes());
    m
}

/// Verifies the possession proof: `signature` over `message` by the key of
/// `leaf_spki_der`. ECDSA P-256 with SHA-256 and P-384 with SHA-384 (DER
/// signatures, as X.509 and `openssl dgst` produce them), RSA PKCS#1 v1.5
/// with SHA-256 (2048-4096 bits), Ed25519.
pub fn verify_possession(
    leaf_spki_der: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), X509AttestError> {
    use ring::signature as s;
    let spki = spki::SubjectPublicKeyInfoOwned::from_der(leaf_spki_der)
        .map_err(|_| X509AttestError::ProofKeyUnsupported)?;
    let key = PublicKey::from_spki(&spki).map_err(|_| X509AttestError::ProofKeyUnsupported)?;
    let alg: &dyn s::VerificationAlgorithm = match key.algorithm() {
        KeyAlgorithm::EcdsaP256 => &s::ECDSA_P256_SHA256_ASN1,
        KeyAlgorithm::EcdsaP384 => &s::ECDSA_P384_SHA384_ASN1,
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
            &s::RSA_PKCS1_2048_8192_SHA256
        }
        KeyAlgorithm::Ed25519 => &s::ED25519,
    };
    s::UnparsedPublicKey::new(alg, key.key_bytes())
        .verify(message, signature)
        .map_err(|_| X509AttestError::ProofInvalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::OnceLock;

    /// Certificates, keys and CRLs made by the stock `openssl` CLI, once per
    /// test process:
    /// - `root` (self-signed CA) and `int` (CA, pathlen:0, under `root`);
    /// - leaves under `root`: `leaf` (P-256, CN acme-sensor-0001), `rsa`
    ///   (RSA-2048), `expired` (2020-2021), `future` (2090-2091), `revoked`
    ///   (on `crl.pem` / `crl.der`), `leafca` (cA=true);
    /// - `leafint` (P-256) and `longleaf` (3000 days, outliving `int`) under
    ///   `int`; `subint` (CA) under `int` and
    ///   `leafsub` under it (breaks int's pathlen:0); `byleaf`, signed by
    ///   `leaf`'s key with `leaf` as issuer (a non-CA issuer);
    /// - `evil`: a self-signed CA with root's exact subject but its own key,
    ///   `evilleaf` under it and `evilcrl.pem` signed by it;
    /// - bare keys `ed` (Ed25519) and `p384` with their SPKI in `NAME.spki`;
    /// - CA files `roots.pem` (root), `ints.pem` (int), `both.pem` (root + int),
    ///   `notca.pem` (root + leaf).
    struct Fixtures {
        dir: tempfile::TempDir,
    }

    impl Fixtures {
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// DER of `NAME.pem`.
        fn der(&self, name: &str) -> Vec<u8> {
            let pem = std::fs::read(self.path(&format!("{name}.pem"))).unwrap();
            der::pem::decode_vec(&pem).unwrap().1
        }

        fn chain(&self, names: &[&str]) -> Vec<Vec<u8>> {
            names.iter().map(|n| self.der(n)).collect()
        }

        /// `openssl dgst -sha256 -sign NAME.key` over `message`.
        fn sign(&self, key: &str, message: &[u8]) -> Vec<u8> {
            let msg = self.path(&format!("msg-{key}-{}", std::process::id()));
            std::fs::write(&msg, message).unwrap();
            let key = self.path(&format!("{key}.key"));
            let out = Command::new("openssl")
                .args(["dgst", "-sha256", "-sign"])
                .arg(&key)
                .arg(&msg)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        }

        /// `openssl x509 -noout ARG` of `NAME.pem`, the value after `=`.
        fn openssl_field(&self, name: &str, arg: &str) -> String {
            let out = Command::new("openssl")
                .args(["x509", "-noout", "-nameopt", "RFC2253", arg, "-in"])
                .arg(self.path(&format!("{name}.pem")))
                .output()
                .unwrap();
            assert!(out.status.success());
            let text = String::from_utf8(out.stdout).unwrap();
            text.trim().split_once('=').unwrap().1.trim().to_string()
        }
    }

    fn fixtures() -> &'static Fixtures {
        static F: OnceLock<Fixtures> = OnceLock::new();
        F.get_or_init(make_fixtures)
    }

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl missing: run scripts/test.sh");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn make_fixtures() -> Fixtures {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut cnf = String::from(
            "[req]\ndistinguished_name = req_dn\n[req_dn]\n\
             [policy_any]\norganizationName = optional\ncommonName = supplied\n\
             [v3_ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n\
             [v3_int]\nbasicConstraints = critical,CA:TRUE,pathlen:0\nkeyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n\
             [v3_subca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n\
             [v3_leaf]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = clientAuth\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n",
        );
        for ca in ["root", "int", "subint", "evil"] {
            std::fs::create_dir(d.join(format!("db-{ca}"))).unwrap();
            std::fs::write(d.join(format!("db-{ca}/index.txt")), "").unwrap();
            std::fs::write(d.join(format!("db-{ca}/serial")), "1000\n").unwrap();
            std::fs::write(d.join(format!("db-{ca}/crlnumber")), "01\n").unwrap();
            cnf.push_str(&format!(
                "[ca_{ca}]\ndatabase = db-{ca}/index.txt\nnew_certs_dir = db-{ca}\n\
                 certificate = {ca}.pem\nprivate_key = {ca}.key\nserial = db-{ca}/serial\n\
                 crlnumber = db-{ca}/crlnumber\ndefault_md = sha256\ndefault_days = 365\n\
                 default_crl_days = 30\npolicy = policy_any\nunique_subject = no\n\
                 copy_extensions = none\nemail_in_dn = no\n"
            ));
        }
        std::fs::write(d.join("ca.cnf"), cnf).unwrap();
        // `openssl req` arguments that make a fresh key into NAME.key.
        let newkey = |name: &str, rsa: bool| -> Vec<String> {
            let algo: &[&str] = if rsa {
                &["-newkey", "rsa:2048"]
            } else {
                &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
            };
            let mut args: Vec<String> = algo.iter().map(|a| a.to_string()).collect();
            args.extend(["-nodes".into(), "-keyout".into(), format!("{name}.key")]);
            args
        };
        let req = |name: &str, rsa: bool, subject: &str, extra: &[&str], out: &str| {
            let mut args: Vec<String> = ["req", "-new", "-config", "ca.cnf", "-subj", subject]
                .iter()
                .map(|a| a.to_string())
                .collect();
            args.extend(newkey(name, rsa));
            args.extend(extra.iter().map(|a| a.to_string()));
            args.extend(["-out".into(), out.to_string()]);
            openssl(d, &args.iter().map(String::as_str).collect::<Vec<_>>());
        };
        let self_signed = |name: &str, subject: &str| {
            let x509 = ["-x509", "-extensions", "v3_ca", "-days", "3650"];
            req(name, false, subject, &x509, &format!("{name}.pem"));
        };
        // `dates`: ["-days", N] or ["-startdate", S, "-enddate", E].
        let issue = |name: &str, rsa: bool, subject: &str, ca: &str, ext: &str, dates: &[&str]| {
            let csr = format!("{name}.csr");
            req(name, rsa, subject, &[], &csr);
            let section = format!("ca_{ca}");
            let out = format!("{name}.pem");
            let mut args = vec!["ca", "-batch", "-notext", "-config", "ca.cnf", "-name"];
            args.extend_from_slice(&[&section, "-extensions", ext, "-in", &csr, "-out", &out]);
            args.extend_from_slice(dates);
            openssl(d, &args);
        };
        let year = ["-days", "365"];
        self_signed("root", "/O=Acme/CN=Acme Root CA");
        issue(
            "int",
            false,
            "/O=Acme/CN=Acme Device CA 1",
            "root",
            "v3_int",
            &["-days", "1825"],
        );
        issue(
            "leaf",
            false,
            "/O=Acme/CN=acme-sensor-0001",
            "root",
            "v3_leaf",
            &year,
        );
        issue(
            "rsa",
            true,
            "/O=Acme/CN=acme-gateway-0003",
            "root",
            "v3_leaf",
            &year,
        );
        issue(
            "expired",
            false,
            "/O=Acme/CN=acme-sensor-0004",
            "root",
            "v3_leaf",
            &[
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20210101000000Z",
            ],
        );
        issue(
            "future",
            false,
            "/O=Acme/CN=acme-sensor-0005",
            "root",
            "v3_leaf",
            &[
                "-startdate",
                "20900101000000Z",
                "-enddate",
                "20910101000000Z",
            ],
        );
        issue(
            "revoked",
            false,
            "/O=Acme/CN=acme-sensor-0006",
            "root",
            "v3_leaf",
            &year,
        );
        issue(
            "leafca",
            false,
            "/O=Acme/CN=acme-sensor-0007",
            "root",
            "v3_subca",
            &year,
        );
        issue(
            "leafint",
            false,
            "/O=Acme/CN=acme-sensor-0002",
            "int",
            "v3_leaf",
            &year,
        );
        issue(
            "longleaf",
            false,
            "/O=Acme/CN=acme-sensor-0011",
            "int",
            "v3_leaf",
            &["-days", "3000"],
        );
        issue(
            "subint",
            false,
            "/O=Acme/CN=Acme Sub CA",
            "int",
            "v3_subca",
            &year,
        );
        issue(
            "leafsub",
            false,
            "/O=Acme/CN=acme-sensor-0008",
            "subint",
            "v3_leaf",
            &year,
        );
        // A certificate whose issuer is `leaf`, signed with leaf's key.
        req(
            "byleaf",
            false,
            "/O=Acme/CN=acme-sensor-0009",
            &[],
            "byleaf.csr",
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "byleaf.csr",
                "-CA",
                "leaf.pem",
                "-CAkey",
                "leaf.key",
                "-set_serial",
                "4242",
                "-days",
                "30",
                "-extfile",
                "ca.cnf",
                "-extensions",
                "v3_leaf",
                "-out",
                "byleaf.pem",
            ],
        );
        openssl(
            d,
            &[
                "ca",
                "-config",
                "ca.cnf",
                "-name",
                "ca_root",
                "-revoke",
                "revoked.pem",
            ],
        );
        openssl(
            d,
            &[
                "ca", "-config", "ca.cnf", "-name", "ca_root", "-gencrl", "-out", "crl.pem",
            ],
        );
        openssl(
            d,
            &[
                "crl", "-in", "crl.pem", "-outform", "DER", "-out", "crl.der",
            ],
        );
        self_signed("evil", "/O=Acme/CN=Acme Root CA");
        issue(
            "evilleaf",
            false,
            "/O=Acme/CN=acme-sensor-0010",
            "evil",
            "v3_leaf",
            &year,
        );
        openssl(
            d,
            &[
                "ca",
                "-config",
                "ca.cnf",
                "-name",
                "ca_evil",
                "-gencrl",
                "-out",
                "evilcrl.pem",
            ],
        );

        // Bare keys for the proof algorithms no fixture certificate uses.
        openssl(d, &["genpkey", "-algorithm", "ED25519", "-out", "ed.key"]);
        openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
                "-out",
                "p384.key",
            ],
        );
        for k in ["ed", "p384"] {
            openssl(
                d,
                &[
                    "pkey",
                    "-in",
                    &format!("{k}.key"),
                    "-pubout",
                    "-outform",
                    "DER",
                    "-out",
                    &format!("{k}.spki"),
                ],
            );
        }

        let read = |n: &str| std::fs::read_to_string(d.join(format!("{n}.pem"))).unwrap();
        std::fs::write(d.join("roots.pem"), read("root")).unwrap();
        std::fs::write(d.join("ints.pem"), read("int")).unwrap();
        std::fs::write(d.join("both.pem"), read("root") + &read("int")).unwrap();
        std::fs::write(d.join("notca.pem"), read("root") + &read("leaf")).unwrap();
        Fixtures { dir }
    }

    fn policy(prefix: Option<&str>) -> X509Attestation {
        X509Attestation {
            manufacturer_ca: PathBuf::from("unused-resolved-by-caller.pem"),
            manufacturer_crl: None,
            subject_cn_prefix: prefix.map(str::to_string),
        }
    }

    fn verifier(ca: &str, crl: Option<&str>, prefix: Option<&str>) -> ManufacturerVerifier {
        let f = fixtures();
        let crl = crl.map(|c| f.path(c));
        ManufacturerVerifier::new(&policy(prefix), &f.path(ca), crl.as_deref()).unwrap()
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    // openssl makes the fixtures once per process (~2 s), and nextest runs
    // every test in its own process: the cases are grouped into few tests.
    #[test]
    fn accepted_chains_and_their_specificity() {
        leaf_directly_under_the_root();
        intermediate_anchor_is_more_specific_than_its_root();
        subject_prefix_narrows_the_group();
    }

    #[test]
    fn refused_chains_say_why() {
        unknown_ca_is_refused_even_under_the_same_name();
        expired_and_not_yet_valid_leaves_are_refused();
        revoked_leaf_is_refused_with_a_pem_or_der_crl();
        structural_rules_are_enforced();
    }

    #[test]
    fn policy_files_are_checked_at_load() {
        ca_file_must_hold_only_ca_certificates();
        crl_not_signed_by_a_configured_ca_is_refused_at_load();
        crl_next_update_is_reported();
    }

    fn leaf_directly_under_the_root() {
        let f = fixtures();
        let v = verifier("roots.pem", Some("crl.pem"), None);
        let m = v.verify_chain(&f.chain(&["leaf"]), now()).unwrap();
        // Checked against openssl's own reading of the certificate.
        assert_eq!(m.serial_hex, f.openssl_field("leaf", "-serial"));
        assert_eq!(m.subject, f.openssl_field("leaf", "-subject"));
        assert_eq!(m.subject, "CN=acme-sensor-0001,O=Acme");
        assert_eq!(m.issuer, f.openssl_field("leaf", "-issuer"));
        let root = Certificate::from_der(&f.der("root")).unwrap();
        let issuer_der = root.tbs_certificate().subject().to_der().unwrap();
        let hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, &issuer_der));
        assert_eq!(m.identity, format!("x509:{hash}:{}", m.serial_hex));
        let leaf = Certificate::from_der(&f.der("leaf")).unwrap();
        let spki = leaf
            .tbs_certificate()
            .subject_public_key_info()
            .to_der()
            .unwrap();
        assert_eq!(m.leaf_spki_der, spki);
        assert_eq!(m.specificity, 0);
        // The same device presenting its root too is the same answer.
        let again = v.verify_chain(&f.chain(&["leaf", "root"]), now()).unwrap();
        assert_eq!(again, m);
    }

    fn intermediate_anchor_is_more_specific_than_its_root() {
        let f = fixtures();
        let chain = f.chain(&["leafint", "int"]);
        let by_root = verifier("roots.pem", None, None)
            .verify_chain(&chain, now())
            .unwrap();
        assert_eq!(by_root.specificity, 0);
        let by_int = verifier("ints.pem", None, None);
        let m = by_int.verify_chain(&chain, now()).unwrap();
        assert_eq!(m.specificity, 2);
        assert_eq!(m.identity, by_root.identity);
        assert_eq!(m.issuer, "CN=Acme Device CA 1,O=Acme");
        // Anchored at the intermediate, the leaf alone suffices.
        assert_eq!(
            by_int.verify_chain(&f.chain(&["leafint"]), now()).unwrap(),
            m
        );
        // With root and intermediate configured, the intermediate is matched.
        let both = verifier("both.pem", None, None)
            .verify_chain(&chain, now())
            .unwrap();
        assert_eq!(both.specificity, 2);
        // A CN prefix adds one.
        let narrowed = verifier("ints.pem", None, Some("acme-sensor-"));
        assert_eq!(narrowed.verify_chain(&chain, now()).unwrap().specificity, 3);
        // Under the root alone, without the intermediate, no path exists.
        let err = verifier("roots.pem", None, None)
            .verify_chain(&f.chain(&["leafint"]), now())
            .unwrap_err();
        assert_eq!(err.code(), "manufacturer_unknown_ca");
    }

    fn unknown_ca_is_refused_even_under_the_same_name() {
        let f = fixtures();
        let v = verifier("roots.pem", None, None);
        // Same issuer name as the configured root, another key.
        let err = v.verify_chain(&f.chain(&["evilleaf"]), now()).unwrap_err();
        assert_eq!(err.code(), "manufacturer_unknown_ca", "{err}");
        // Presenting the impostor root as an intermediate does not help.
        let err = v
            .verify_chain(&f.chain(&["evilleaf", "evil"]), now())
            .unwrap_err();
        assert_eq!(err.code(), "manufacturer_unknown_ca", "{err}");
        // A leaf of the root under a group anchored at the intermediate.
        let err = verifier("ints.pem", None, None)
            .verify_chain(&f.chain(&["leaf"]), now())
            .unwrap_err();
        assert_eq!(err.code(), "manufacturer_unknown_ca");
    }

    fn expired_and_not_yet_valid_leaves_are_refused() {
        let f = fixtures();
        let v = verifier("roots.pem", None, None);
        for name in ["expired", "future"] {
            let err = v.verify_chain(&f.chain(&[name]), now()).unwrap_err();
            assert!(
                matches!(err, X509AttestError::Expired { .. }),
                "{name}: {err}"
            );
            assert_eq!(err.code(), "manufacturer_cert_expired");
        }
        // The leaf alone is not enough: longleaf (3000 days) outlives its
        // intermediate (1825 days), and is refused once the intermediate ends.
        let chain = f.chain(&["longleaf", "int"]);
        v.verify_chain(&chain, now() + 1800 * 86_400).unwrap();
        match v.verify_chain(&chain, now() + 1900 * 86_400) {
            Err(X509AttestError::Expired { subject, .. }) => {
                assert_eq!(subject, "CN=Acme Device CA 1,O=Acme")
            }
            other => panic!("{other:?}"),
        }
        // The anchor's validity too (the root is valid 3650 days).
        let by_int = verifier("ints.pem", None, None);
        by_int.verify_chain(&chain[..1], now()).unwrap();
        assert_eq!(
            by_int
                .verify_chain(&chain[..1], now() + 1900 * 86_400)
                .unwrap_err()
                .code(),
            "manufacturer_cert_expired"
        );
    }

    fn revoked_leaf_is_refused_with_a_pem_or_der_crl() {
        let f = fixtures();
        for crl in ["crl.pem", "crl.der"] {
            let v = verifier("roots.pem", Some(crl), None);
            let err = v.verify_chain(&f.chain(&["revoked"]), now()).unwrap_err();
            assert_eq!(err.code(), "manufacturer_cert_revoked", "{crl}: {err}");
            let X509AttestError::Revoked { serial_hex, .. } = err else {
                panic!("{crl}")
            };
            assert_eq!(serial_hex, f.openssl_field("revoked", "-serial"));
            // Others of the same CA still pass.
            v.verify_chain(&f.chain(&["leaf"]), now()).unwrap();
        }
        // Without the CRL the same certificate passes: the refusal is the CRL's.
        verifier("roots.pem", None, None)
            .verify_chain(&f.chain(&["revoked"]), now())
            .unwrap();
    }

    fn crl_next_update_is_reported() {
        let f = fixtures();
        assert_eq!(verifier("roots.pem", None, None).crl_next_update(), None);
        let out = Command::new("openssl")
            .args([
                "crl",
                "-noout",
                "-nextupdate",
                "-dateopt",
                "iso_8601",
                "-in",
            ])
            .arg(f.path("crl.pem"))
            .output()
            .unwrap();
        let next = verifier("roots.pem", Some("crl.pem"), None)
            .crl_next_update()
            .unwrap();
        // openssl's own reading of nextUpdate ("2026-12-23 22:40:00Z"), compared to the day.
        let text = String::from_utf8(out.stdout).unwrap();
        let date = text.trim().split_once('=').unwrap().1;
        let days = next.div_euclid(86_400);
        let expected = time::Date::parse(
            &date[..10],
            time::macros::format_description!("[year]-[month]-[day]"),
        )
        .unwrap();
        assert_eq!(days, i64::from(expected.to_julian_day() - 2_440_588));
    }

    #[test]
    fn verifier_is_shareable_across_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<ManufacturerVerifier>();
    }

    fn crl_not_signed_by_a_configured_ca_is_refused_at_load() {
        let f = fixtures();
        // Same issuer name as the root, signed by the impostor's key.
        let err = ManufacturerVerifier::new(
            &policy(None),
            &f.path("roots.pem"),
            Some(&f.path("evilcrl.pem")),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                X509AttestError::Policy {
                    problem: PolicyFileProblem::CrlNotSigned { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.is_client_error());
        assert!(err.to_string().contains("evilcrl.pem"), "{err}");
        // Not a CRL at all (a certificate file).
        let err = ManufacturerVerifier::new(
            &policy(None),
            &f.path("roots.pem"),
            Some(&f.path("leaf.pem")),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            X509AttestError::Policy {
                problem: PolicyFileProblem::NoCrl,
                ..
            }
        ));
    }

    fn ca_file_must_hold_only_ca_certificates() {
        let f = fixtures();
        let err = ManufacturerVerifier::new(&policy(None), &f.path("notca.pem"), None).unwrap_err();
        assert!(
            matches!(
                err,
                X509AttestError::Policy {
                    problem: PolicyFileProblem::NotCa { index: 1, .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("notca.pem"));
        let err = ManufacturerVerifier::new(&policy(None), &f.path("leaf.key"), None).unwrap_err();
        assert!(matches!(
            err,
            X509AttestError::Policy {
                problem: PolicyFileProblem::NoCertificate,
                ..
            }
        ));
        let err =
            ManufacturerVerifier::new(&policy(None), &f.path("missing.pem"), None).unwrap_err();
        assert!(matches!(
            err,
            X509AttestError::Policy {
                problem: PolicyFileProblem::Read(_),
                ..
            }
        ));
    }

    fn subject_prefix_narrows_the_group() {
        let f = fixtures();
        let chain = f.chain(&["leaf"]);
        let m = verifier("roots.pem", None, Some("acme-sensor-"))
            .verify_chain(&chain, now())
            .unwrap();
        assert_eq!(m.specificity, 1);
        let err = verifier("roots.pem", None, Some("acme-gateway-"))
            .verify_chain(&chain, now())
            .unwrap_err();
        assert_eq!(err.code(), "manufacturer_subject_mismatch");
        // The prefix applies to the CN, not to the whole subject string.
        let err = verifier("roots.pem", None, Some("O=Acme"))
            .verify_chain(&chain, now())
            .unwrap_err();
        assert_eq!(err.code(), "manufacturer_subject_mismatch");
    }

    fn structural_rules_are_enforced() {
        let f = fixtures();
        let v = verifier("roots.pem", None, None);
        let problem = |chain: &[&str]| match v.verify_chain(&f.chain(chain), now()) {
            Err(X509AttestError::Constraint { problem, .. }) => problem,
            other => panic!("{chain:?}: {other:?}"),
        };
        assert_eq!(problem(&["leafca"]), ConstraintProblem::LeafIsCa);
        // int has pathlen:0; subint below it is one intermediate too many.
        assert_eq!(
            problem(&["leafsub", "subint", "int"]),
            ConstraintProblem::PathLength
        );
        // leaf (cA=false) signed byleaf: an issuer that is no CA.
        assert_eq!(problem(&["byleaf", "leaf"]), ConstraintProblem::IssuerNotCa);
        assert_eq!(
            v.verify_chain(&f.chain(&["leafca"]), now())
                .unwrap_err()
                .code(),
            "manufacturer_chain_malformed"
        );
        // Not DER, empty, too long.
        let err = v
            .verify_chain(&[f.der("leaf"), b"garbage".to_vec()], now())
            .unwrap_err();
        assert!(matches!(
            err,
            X509AttestError::NotACertificate { index: 1, .. }
        ));
        assert_eq!(err.code(), "manufacturer_chain_malformed");
        assert_eq!(
            v.verify_chain(&[], now()).unwrap_err().code(),
            "manufacturer_chain_malformed"
        );
        let long = vec![f.der("leaf"); MAX_CHAIN + 1];
        assert!(matches!(
            v.verify_chain(&long, now()),
            Err(X509AttestError::ChainTooLong { .. })
        ));
    }

    #[test]
    fn possession_message_is_exactly_the_documented_bytes() {
        assert_eq!(
            possession_message("n0nce", b""),
            b"keyward-enroll-v1\nn0nce\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let m = possession_message("n0nce", b"abc");
        assert!(m.ends_with(b"\nba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
    }

    #[test]
    fn possession_proof_signed_by_openssl_verifies() {
        let f = fixtures();
        let v = verifier("roots.pem", None, None);
        let message = possession_message("nonce-1", b"csr bytes");
        for name in ["leaf", "rsa"] {
            let m = v.verify_chain(&f.chain(&[name]), now()).unwrap();
            let sig = f.sign(name, &message);
            verify_possession(&m.leaf_spki_der, &message, &sig).unwrap();
            // Another nonce, another CSR, another key: refused.
            let other_nonce = possession_message("nonce-2", b"csr bytes");
            let other_csr = possession_message("nonce-1", b"other csr");
            for msg in [other_nonce, other_csr] {
                let err = verify_possession(&m.leaf_spki_der, &msg, &sig).unwrap_err();
                assert_eq!(err.code(), "manufacturer_proof_invalid");
            }
            let stranger = if name == "leaf" { "leafint" } else { "leaf" };
            let forged = f.sign(stranger, &message);
            assert!(matches!(
                verify_possession(&m.leaf_spki_der, &message, &forged),
                Err(X509AttestError::ProofInvalid)
            ));
        }
        // P-384 (SHA-384) and Ed25519 (pure, no digest), signed by openssl.
        let msg_file = f.path("proof-msg");
        std::fs::write(&msg_file, &message).unwrap();
        let signed = |args: &[&str]| {
            let out = Command::new("openssl")
                .current_dir(f.dir.path())
                .args(args)
                .arg(&msg_file)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        };
        let p384 = std::fs::read(f.path("p384.spki")).unwrap();
        let sig = signed(&["dgst", "-sha384", "-sign", "p384.key"]);
        verify_possession(&p384, &message, &sig).unwrap();
        let sha256 = signed(&["dgst", "-sha256", "-sign", "p384.key"]);
        assert!(verify_possession(&p384, &message, &sha256).is_err());
        let ed = std::fs::read(f.path("ed.spki")).unwrap();
        let sig = signed(&["pkeyutl", "-sign", "-rawin", "-inkey", "ed.key", "-in"]);
        verify_possession(&ed, &message, &sig).unwrap();
        assert!(verify_possession(&ed, b"other", &sig).is_err());
        // Garbage key.
        assert!(matches!(
            verify_possession(b"not a key", &message, b"sig"),
            Err(X509AttestError::ProofKeyUnsupported)
        ));
    }
}
