//! OCSP (RFC 6960) encodings: requests parsed from DER or from the GET
//! form, typed errors that become status-only responses, and signed
//! BasicOCSPResponses built by hand around a caller's signer.
//!
//! No store, HTTP or keystore here: the responder looks the CertIDs up
//! (keyed by [`IssuerId`], computed once per issuer with
//! [`IssuerId::for_issuer`]), decides each status, and signs the
//! ResponseData DER through the KeyStore (directly with [`response_data`]
//! and [`assemble`], or through [`sign`] with a callback).

use super::der_write as w;
use super::serial::{Serial, SerialError};
use crate::keystore::KeyAlgorithm;
use crate::model::RevocationReason;
use const_oid::ObjectIdentifier;
use const_oid::db::{rfc5912, rfc6960};
use der::asn1::{AnyRef, OctetStringRef, UintRef};
use der::{Decode, Encode, Reader, SliceReader, Tag, Tagged};
use spki::AlgorithmIdentifierRef;
use x509_cert::ext::Extensions;

/// Hash algorithms a CertID may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgorithm {
    Sha1,
    Sha256,
}

impl HashAlgorithm {
    fn from_oid(oid: ObjectIdentifier) -> Option<Self> {
        if oid == rfc5912::ID_SHA_1 {
            Some(Self::Sha1)
        } else if oid == rfc5912::ID_SHA_256 {
            Some(Self::Sha256)
        } else {
            None
        }
    }

    pub fn output_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
        }
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        let alg = match self {
            Self::Sha1 => &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            Self::Sha256 => &ring::digest::SHA256,
        };
        ring::digest::digest(alg, data).as_ref().to_vec()
    }

    /// AlgorithmIdentifier with a NULL parameter, as OpenSSL and Go write it.
    fn algorithm_identifier_der(self) -> &'static [u8] {
        match self {
            Self::Sha1 => &[
                0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00,
            ],
            Self::Sha256 => &[
                0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
                0x00,
            ],
        }
    }
}

/// The issuer half of a CertID: what a responder matches to one of its CAs
/// (a `HashMap<IssuerId, _>` gives the O(1) lookup).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IssuerId {
    pub hash: HashAlgorithm,
    /// Hash of the DER of the issuer's subject Name.
    pub name_hash: Vec<u8>,
    /// Hash of the issuer's subjectPublicKey BIT STRING value.
    pub key_hash: Vec<u8>,
}

impl IssuerId {
    /// The issuer id of a CA under one hash algorithm.
    pub fn compute(
        hash: HashAlgorithm,
        subject_name_der: &[u8],
        spki_der: &[u8],
    ) -> der::Result<Self> {
        let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der)?;
        Ok(Self {
            hash,
            name_hash: hash.digest(subject_name_der),
            key_hash: hash.digest(spki.subject_public_key.raw_bytes()),
        })
    }

    /// Both ids a CA answers to: SHA-1 (what most clients send) and SHA-256.
    pub fn for_issuer(subject_name_der: &[u8], spki_der: &[u8]) -> der::Result<[Self; 2]> {
        Ok([
            Self::compute(HashAlgorithm::Sha1, subject_name_der, spki_der)?,
            Self::compute(HashAlgorithm::Sha256, subject_name_der, spki_der)?,
        ])
    }
}

/// A CertID: which certificate a request asks about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertId {
    pub issuer: IssuerId,
    pub serial: Serial,
}

impl CertId {
    /// DER as responses carry it (hash AlgorithmIdentifier with NULL
    /// parameters), so a pre-signed response is the same whichever of the
    /// equivalent encodings a client sent.
    fn encode(&self, out: &mut Vec<u8>) {
        w::put_header(out, w::SEQUENCE, self.content_len());
        out.extend_from_slice(self.issuer.hash.algorithm_identifier_der());
        w::put_tlv(out, w::OCTET_STRING, &self.issuer.name_hash);
        w::put_tlv(out, w::OCTET_STRING, &self.issuer.key_hash);
        w::put_tlv(out, w::INTEGER, self.serial.der_content());
    }

    fn content_len(&self) -> usize {
        self.issuer.hash.algorithm_identifier_der().len()
            + w::tlv_len(self.issuer.name_hash.len())
            + w::tlv_len(self.issuer.key_hash.len())
            + w::tlv_len(self.serial.der_content().len())
    }
}

/// A request nonce (RFC 8954: 1 to 32 octets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nonce(Vec<u8>);

/// RFC 8954 §2.1 bounds.
pub const NONCE_MAX: usize = 32;

impl Nonce {
    pub fn new(octets: &[u8]) -> Result<Self, OcspError> {
        if octets.is_empty() || octets.len() > NONCE_MAX {
            return Err(OcspError::NonceLength(octets.len()));
        }
        Ok(Self(octets.to_vec()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A parsed OCSPRequest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcspRequest {
    pub cert_ids: Vec<CertId>,
    pub nonce: Option<Nonce>,
    /// The request carried an optionalSignature. keyward does not require
    /// or check request signatures; the field is there for logging.
    pub signed: bool,
}

/// Bounds on what a request may cost to parse.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest DER request accepted.
    pub max_bytes: usize,
    /// Most CertIDs in one request.
    pub max_cert_ids: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_bytes: 16 * 1024,
            max_cert_ids: 10,
        }
    }
}

/// OCSPResponseStatus (RFC 6960 §4.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseStatus {
    Successful = 0,
    MalformedRequest = 1,
    InternalError = 2,
    TryLater = 3,
    SigRequired = 5,
    Unauthorized = 6,
}

impl ResponseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Successful => "successful",
            Self::MalformedRequest => "malformedRequest",
            Self::InternalError => "internalError",
            Self::TryLater => "tryLater",
            Self::SigRequired => "sigRequired",
            Self::Unauthorized => "unauthorized",
        }
    }
}

/// An OCSPResponse with only a status and no responseBytes: what every
/// error status is sent as (5 bytes).
pub fn status_response(status: ResponseStatus) -> Vec<u8> {
    vec![w::SEQUENCE, 3, w::ENUMERATED, 1, status as u8]
}

/// Why a request gets no signed answer. Each maps to the OCSP status that is
/// sent ([`OcspError::status`]) and has a stable code for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum OcspError {
    #[error("OCSP request of {size} bytes is larger than the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("OCSP request is not valid DER")]
    Malformed(#[source] der::Error),
    #[error("OCSP request has {0} bytes after its end")]
    TrailingData(usize),
    #[error("OCSP request version {0} is not v1")]
    UnsupportedVersion(u8),
    #[error("OCSP request asks about no certificate")]
    NoCertIds,
    #[error("OCSP request asks about more than {max} certificates")]
    TooManyCertIds { max: usize },
    #[error("CertID hash algorithm {0} is not SHA-1 or SHA-256")]
    UnsupportedHash(ObjectIdentifier),
    #[error("CertID hash algorithm has parameters other than NULL")]
    HashParameters,
    #[error("CertID hashes are {got} bytes, the algorithm gives {expected}")]
    HashLength { expected: usize, got: usize },
    #[error("CertID serial: {0}")]
    Serial(#[from] SerialError),
    #[error("OCSP nonce of {0} bytes (RFC 8954: 1 to 32)")]
    NonceLength(usize),
    #[error("OCSP nonce extension is not an OCTET STRING")]
    NonceEncoding,
    #[error("OCSP request repeats extension {0}")]
    DuplicateExtension(ObjectIdentifier),
    #[error("OCSP request has critical extension {0}, which keyward does not support")]
    UnsupportedCriticalExtension(ObjectIdentifier),
    #[error("OCSP GET request is not URL-encoded base64")]
    GetEncoding,
    /// The responder cannot answer for this issuer (not one of its CAs).
    #[error("not authorised to answer for this issuer")]
    Unauthorized,
    /// The responder is temporarily unable to answer (e.g. no fresh signer).
    #[error("OCSP responder busy, try later")]
    TryLater,
    /// Something broke on the responder's side.
    #[error("OCSP responder internal error")]
    Internal,
}

impl OcspError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "ocsp_request_too_large",
            Self::Malformed(_) => "ocsp_request_malformed",
            Self::TrailingData(_) => "ocsp_request_trailing_data",
            Self::UnsupportedVersion(_) => "ocsp_request_version",
            Self::NoCertIds => "ocsp_request_empty",
            Self::TooManyCertIds { .. } => "ocsp_too_many_cert_ids",
            Self::UnsupportedHash(_) | Self::HashParameters => "ocsp_unsupported_hash",
            Self::HashLength { .. } => "ocsp_hash_length",
            Self::Serial(_) => "ocsp_bad_serial",
            Self::NonceLength(_) | Self::NonceEncoding => "ocsp_bad_nonce",
            Self::DuplicateExtension(_) => "ocsp_duplicate_extension",
            Self::UnsupportedCriticalExtension(_) => "ocsp_unsupported_critical_extension",
            Self::GetEncoding => "ocsp_get_encoding",
            Self::Unauthorized => "ocsp_unauthorized",
            Self::TryLater => "ocsp_try_later",
            Self::Internal => "ocsp_internal_error",
        }
    }

    /// The OCSPResponseStatus this error is answered with.
    pub fn status(&self) -> ResponseStatus {
        match self {
            Self::Unauthorized => ResponseStatus::Unauthorized,
            Self::TryLater => ResponseStatus::TryLater,
            Self::Internal => ResponseStatus::InternalError,
            _ => ResponseStatus::MalformedRequest,
        }
    }

    /// The status-only OCSPResponse for this error.
    pub fn to_response(&self) -> Vec<u8> {
        status_response(self.status())
    }
}

impl From<der::Error> for OcspError {
    fn from(e: der::Error) -> Self {
        match e.kind() {
            der::ErrorKind::TrailingData { remaining, .. } => {
                Self::TrailingData(usize::try_from(remaining).unwrap_or(usize::MAX))
            }
            _ => Self::Malformed(e),
        }
    }
}

#[derive(der::Sequence)]
struct OcspRequestAsn1<'a> {
    tbs_request: TbsRequest<'a>,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    optional_signature: Option<AnyRef<'a>>,
}

#[derive(der::Sequence)]
struct TbsRequest<'a> {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    version: Option<u8>,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT", optional = "true")]
    requestor_name: Option<AnyRef<'a>>,
    /// SEQUENCE OF Request, walked with a cap rather than collected.
    request_list: AnyRef<'a>,
    #[asn1(context_specific = "2", tag_mode = "EXPLICIT", optional = "true")]
    request_extensions: Option<Extensions>,
}

#[derive(der::Sequence)]
struct RequestAsn1<'a> {
    req_cert: CertIdAsn1<'a>,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    single_request_extensions: Option<AnyRef<'a>>,
}

#[derive(der::Sequence)]
struct CertIdAsn1<'a> {
    hash_algorithm: AlgorithmIdentifierRef<'a>,
    issuer_name_hash: &'a OctetStringRef,
    issuer_key_hash: &'a OctetStringRef,
    serial_number: UintRef<'a>,
}

impl CertIdAsn1<'_> {
    fn to_cert_id(&self) -> Result<CertId, OcspError> {
        let alg = &self.hash_algorithm;
        let hash = HashAlgorithm::from_oid(alg.oid).ok_or(OcspError::UnsupportedHash(alg.oid))?;
        if alg
            .parameters
            .is_some_and(|p| p.tag() != Tag::Null || !p.value().is_empty())
        {
            return Err(OcspError::HashParameters);
        }
        let expected = hash.output_len();
        for h in [self.issuer_name_hash, self.issuer_key_hash] {
            if h.as_bytes().len() != expected {
                return Err(OcspError::HashLength {
                    expected,
                    got: h.as_bytes().len(),
                });
            }
        }
        Ok(CertId {
            issuer: IssuerId {
                hash,
                name_hash: self.issuer_name_hash.as_bytes().to_vec(),
                key_hash: self.issuer_key_hash.as_bytes().to_vec(),
            },
            serial: Serial::from_uint(self.serial_number)?,
        })
    }
}

/// Parses a DER OCSPRequest (the POST body). Rejects anything over the
/// limits, trailing data, requests without CertIDs, unsupported hash
/// algorithms, malformed nonces and unknown critical extensions.
pub fn parse_request(der: &[u8], limits: &RequestLimits) -> Result<OcspRequest, OcspError> {
    if der.len() > limits.max_bytes {
        return Err(OcspError::TooLarge {
            size: der.len(),
            limit: limits.max_bytes,
        });
    }
    let req = OcspRequestAsn1::from_der(der)?;
    let tbs = req.tbs_request;
    if let Some(v) = tbs.version.filter(|v| *v != 0) {
        return Err(OcspError::UnsupportedVersion(v));
    }
    if tbs.request_list.tag() != Tag::Sequence {
        return Err(
            der::Error::from(tbs.request_list.tag().unexpected_error(Some(Tag::Sequence))).into(),
        );
    }
    let mut reader = SliceReader::new(tbs.request_list.value())?;
    let mut cert_ids = Vec::new();
    while !reader.is_finished() {
        if cert_ids.len() == limits.max_cert_ids {
            return Err(OcspError::TooManyCertIds {
                max: limits.max_cert_ids,
            });
        }
        let r: RequestAsn1<'_> = reader.decode()?;
        cert_ids.push(r.req_cert.to_cert_id()?);
    }
    if cert_ids.is_empty() {
        return Err(OcspError::NoCertIds);
    }
    let mut nonce = None;
    let exts = tbs.request_extensions.unwrap_or_default();
    for (i, e) in exts.iter().enumerate() {
        if exts[..i].iter().any(|p| p.extn_id == e.extn_id) {
            return Err(OcspError::DuplicateExtension(e.extn_id));
        }
        if e.extn_id == rfc6960::ID_PKIX_OCSP_NONCE {
            // RFC 8954 §2.1: extnValue holds the DER of `Nonce ::= OCTET STRING`.
            let inner = <&OctetStringRef>::from_der(e.extn_value.as_bytes())
                .map_err(|_| OcspError::NonceEncoding)?;
            nonce = Some(Nonce::new(inner.as_bytes())?);
        } else if e.critical {
            return Err(OcspError::UnsupportedCriticalExtension(e.extn_id));
        }
    }
    Ok(OcspRequest {
        cert_ids,
        nonce,
        signed: req.optional_signature.is_some(),
    })
}

const B64_STANDARD: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);
const B64_URL_SAFE: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

fn percent_decode(s: &str) -> Result<Vec<u8>, OcspError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(OcspError::GetEncoding)?;
            let mut v = [0u8; 1];
            hex::decode_to_slice(hex, &mut v).map_err(|_| OcspError::GetEncoding)?;
            out.push(v[0]);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Parses the GET form (RFC 6960 Appendix A.1): the path segment after the
/// responder's URL, URL-encoded base64 of the DER request. Padding may be
/// missing; the URL-safe alphabet is accepted too.
pub fn parse_get(path_segment: &str, limits: &RequestLimits) -> Result<OcspRequest, OcspError> {
    // Base64 makes 4 characters of 3 bytes; percent-encoding triples a character.
    let max_encoded = limits.max_bytes.div_ceil(3) * 4 * 3;
    if path_segment.len() > max_encoded {
        return Err(OcspError::TooLarge {
            size: path_segment.len(),
            limit: max_encoded,
        });
    }
    let text = percent_decode(path_segment.trim_start_matches('/'))?;
    use base64::Engine;
    let der = B64_STANDARD
        .decode(&text)
        .or_else(|_| B64_URL_SAFE.decode(&text))
        .map_err(|_| OcspError::GetEncoding)?;
    parse_request(&der, limits)
}

/// The status of one certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertStatus {
    Good,
    Revoked {
        /// Seconds since the epoch.
        time: i64,
        /// `unspecified` is sent without a reason, as in CRLs.
        reason: RevocationReason,
    },
    /// The serial is not one this responder knows under this issuer.
    Unknown,
}

/// One SingleResponse.
#[derive(Debug, Clone, Copy)]
pub struct SingleResponse<'a> {
    pub cert_id: &'a CertId,
    pub status: CertStatus,
    pub this_update: i64,
    pub next_update: Option<i64>,
}

/// Everything that goes into a ResponseData (v1, responderID byKey).
#[derive(Debug, Clone, Copy)]
pub struct ResponseData<'a> {
    /// [`responder_key_hash`] of the signing certificate's key.
    pub responder_key_hash: &'a [u8; 20],
    pub produced_at: i64,
    pub responses: &'a [SingleResponse<'a>],
    /// Echoed in responseExtensions when the request carried one.
    pub nonce: Option<&'a Nonce>,
}

/// ResponderID byKey (RFC 6960 §4.2.1): SHA-1 of the responder's
/// subjectPublicKey BIT STRING value (without tag, length and unused-bits octet).
pub fn responder_key_hash(spki_der: &[u8]) -> der::Result<[u8; 20]> {
    let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der)?;
    let d = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        spki.subject_public_key.raw_bytes(),
    );
    let mut out = [0u8; 20];
    out.copy_from_slice(d.as_ref());
    Ok(out)
}

fn oid_tlv(oid: &ObjectIdentifier) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + oid.as_bytes().len());
    w::put_tlv(&mut v, w::OID, oid.as_bytes());
    v
}

fn tlv(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len = parts.iter().map(|p| p.len()).sum();
    let mut v = Vec::with_capacity(w::tlv_len(len));
    w::put_header(&mut v, tag, len);
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

fn time(unix: i64) -> der::Result<Vec<u8>> {
    let mut v = Vec::with_capacity(17);
    w::put_time(&mut v, unix, w::TimeKind::Generalized)?;
    Ok(v)
}

fn single_response(s: &SingleResponse<'_>) -> der::Result<Vec<u8>> {
    let mut id = Vec::with_capacity(w::tlv_len(s.cert_id.content_len()));
    s.cert_id.encode(&mut id);
    let status = match s.status {
        CertStatus::Good => vec![w::implicit_primitive(0), 0],
        CertStatus::Unknown => vec![w::implicit_primitive(2), 0],
        CertStatus::Revoked { time: t, reason } => {
            let t = time(t)?;
            let reason = if reason.code() == 0 {
                Vec::new()
            } else {
                vec![w::explicit(0), 3, w::ENUMERATED, 1, reason.code()]
            };
            // revoked [1] IMPLICIT RevokedInfo (a SEQUENCE: constructed).
            tlv(w::explicit(1), &[&t, &reason])
        }
    };
    let this_update = time(s.this_update)?;
    let next_update = match s.next_update {
        Some(t) => tlv(w::explicit(0), &[&time(t)?]),
        None => Vec::new(),
    };
    Ok(tlv(
        w::SEQUENCE,
        &[&id, &status, &this_update, &next_update],
    ))
}

/// DER of the ResponseData: the bytes the responder key signs.
pub fn response_data(d: &ResponseData<'_>) -> der::Result<Vec<u8>> {
    let responder_id = tlv(
        w::explicit(2),
        &[&tlv(w::OCTET_STRING, &[d.responder_key_hash])],
    );
    let produced_at = time(d.produced_at)?;
    let singles = d
        .responses
        .iter()
        .map(single_response)
        .collect::<der::Result<Vec<_>>>()?;
    let singles: Vec<&[u8]> = singles.iter().map(Vec::as_slice).collect();
    let responses = tlv(w::SEQUENCE, &singles);
    let extensions = match d.nonce {
        Some(n) => {
            let value = tlv(w::OCTET_STRING, &[&tlv(w::OCTET_STRING, &[n.as_bytes()])]);
            let ext = tlv(
                w::SEQUENCE,
                &[&oid_tlv(&rfc6960::ID_PKIX_OCSP_NONCE), &value],
            );
            tlv(w::explicit(1), &[&tlv(w::SEQUENCE, &[&ext])])
        }
        None => Vec::new(),
    };
    Ok(tlv(
        w::SEQUENCE,
        &[&responder_id, &produced_at, &responses, &extensions],
    ))
}

/// Wraps signed ResponseData into a successful OCSPResponse carrying a
/// BasicOCSPResponse. `certs` go into the response's `certs` field: the
/// delegated responder's certificate (and, if wanted, its issuer).
pub fn assemble(
    response_data_der: &[u8],
    signer: KeyAlgorithm,
    signature: &[u8],
    certs: &[&[u8]],
) -> der::Result<Vec<u8>> {
    w::check_tlv(response_data_der, Tag::Sequence)?;
    for c in certs {
        w::check_tlv(c, Tag::Sequence)?;
    }
    let alg = signer.signature_algorithm().to_der()?;
    let mut sig = Vec::with_capacity(w::tlv_len(1 + signature.len()));
    w::put_header(&mut sig, w::BIT_STRING, 1 + signature.len());
    sig.push(0);
    sig.extend_from_slice(signature);
    let certs = if certs.is_empty() {
        Vec::new()
    } else {
        tlv(w::explicit(0), &[&tlv(w::SEQUENCE, certs)])
    };
    let basic = tlv(w::SEQUENCE, &[response_data_der, &alg, &sig, &certs]);
    let response_bytes = tlv(
        w::SEQUENCE,
        &[
            &oid_tlv(&rfc6960::ID_PKIX_OCSP_BASIC),
            &tlv(w::OCTET_STRING, &[&basic]),
        ],
    );
    Ok(tlv(
        w::SEQUENCE,
        &[
            &[w::ENUMERATED, 1, ResponseStatus::Successful as u8],
            &tlv(w::explicit(0), &[&response_bytes]),
        ],
    ))
}

/// Signing through a caller's signer failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError<E: std::error::Error + 'static> {
    #[error("OCSP response encoding failed")]
    Encoding(#[from] der::Error),
    #[error("OCSP response signing failed")]
    Signer(#[source] E),
}

/// Encodes `data`, has `sign` sign the ResponseData DER (e.g. through
/// `KeyStore::sign` with the delegated responder key) and assembles the
/// OCSPResponse.
pub async fn sign<F, Fut, E>(
    data: &ResponseData<'_>,
    signer: KeyAlgorithm,
    certs: &[&[u8]],
    sign: F,
) -> Result<Vec<u8>, SignError<E>>
where
    F: FnOnce(Vec<u8>) -> Fut,
    Fut: Future<Output = Result<Vec<u8>, E>>,
    E: std::error::Error + 'static,
{
    let tbs = response_data(data)?;
    let signature = sign(tbs.clone()).await.map_err(SignError::Signer)?;
    Ok(assemble(&tbs, signer, &signature, certs)?)
}

/// A cacheable response for one certificate: no nonce, one SingleResponse.
/// Serve its bytes to every nonce-less request for that CertID until shortly
/// before `next_update`.
pub async fn presign<F, Fut, E>(
    responder_key_hash: &[u8; 20],
    produced_at: i64,
    single: SingleResponse<'_>,
    signer: KeyAlgorithm,
    certs: &[&[u8]],
    sign_with: F,
) -> Result<Vec<u8>, SignError<E>>
where
    F: FnOnce(Vec<u8>) -> Fut,
    Fut: Future<Output = Result<Vec<u8>, E>>,
    E: std::error::Error + 'static,
{
    let responses = [single];
    let data = ResponseData {
        responder_key_hash,
        produced_at,
        responses: &responses,
        nonce: None,
    };
    sign(&data, signer, certs, sign_with).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request shaped like OpenSSL's: one CertID, optionally a nonce.
    fn sample(nonce: Option<&[u8]>, serial: &[u8], hash: HashAlgorithm) -> Vec<u8> {
        let n = hash.output_len();
        let mut certid = Vec::new();
        certid.extend_from_slice(hash.algorithm_identifier_der());
        certid.extend(tlv(w::OCTET_STRING, &[&vec![1u8; n]]));
        certid.extend(tlv(w::OCTET_STRING, &[&vec![2u8; n]]));
        certid.extend(tlv(w::INTEGER, &[serial]));
        let request = tlv(w::SEQUENCE, &[&tlv(w::SEQUENCE, &[&certid])]);
        let list = tlv(w::SEQUENCE, &[&request]);
        let exts = match nonce {
            Some(n) => {
                let value = tlv(w::OCTET_STRING, &[&tlv(w::OCTET_STRING, &[n])]);
                let ext = tlv(
                    w::SEQUENCE,
                    &[&oid_tlv(&rfc6960::ID_PKIX_OCSP_NONCE), &value],
                );
                tlv(w::explicit(2), &[&tlv(w::SEQUENCE, &[&ext])])
            }
            None => Vec::new(),
        };
        tlv(w::SEQUENCE, &[&tlv(w::SEQUENCE, &[&list, &exts])])
    }

    #[test]
    fn parses_a_minimal_request() {
        let der = sample(Some(&[7; 16]), &[0x01, 0x23], HashAlgorithm::Sha1);
        let r = parse_request(&der, &RequestLimits::default()).unwrap();
        assert_eq!(r.cert_ids.len(), 1);
        assert_eq!(r.cert_ids[0].serial.to_hex(), "0123");
        assert_eq!(r.cert_ids[0].issuer.hash, HashAlgorithm::Sha1);
        assert_eq!(r.nonce.unwrap().as_bytes(), &[7; 16]);
        assert!(!r.signed);
        let der = sample(None, &[0x05], HashAlgorithm::Sha256);
        let r = parse_request(&der, &RequestLimits::default()).unwrap();
        assert_eq!(r.cert_ids[0].issuer.hash, HashAlgorithm::Sha256);
        assert!(r.nonce.is_none());
    }

    #[test]
    fn nonce_bounds() {
        let l = RequestLimits::default();
        assert!(parse_request(&sample(Some(&[1]), &[5], HashAlgorithm::Sha1), &l).is_ok());
        assert!(parse_request(&sample(Some(&[1; 32]), &[5], HashAlgorithm::Sha1), &l).is_ok());
        let e = parse_request(&sample(Some(&[1; 33]), &[5], HashAlgorithm::Sha1), &l).unwrap_err();
        assert!(matches!(e, OcspError::NonceLength(33)), "{e:?}");
        let e = parse_request(&sample(Some(&[]), &[5], HashAlgorithm::Sha1), &l).unwrap_err();
        assert!(matches!(e, OcspError::NonceLength(0)), "{e:?}");
        assert_eq!(e.status(), ResponseStatus::MalformedRequest);
    }

    #[test]
    fn refuses_negative_serials_and_reports_trailing_data() {
        let l = RequestLimits::default();
        let e = parse_request(&sample(None, &[0x80], HashAlgorithm::Sha1), &l).unwrap_err();
        assert_eq!(e.code(), "ocsp_request_malformed");
        let mut der = sample(None, &[5], HashAlgorithm::Sha1);
        der.extend_from_slice(&[0, 0]);
        let e = parse_request(&der, &l).unwrap_err();
        assert!(matches!(e, OcspError::TrailingData(2)), "{e:?}");
    }

    #[test]
    fn status_responses_are_five_bytes() {
        assert_eq!(
            OcspError::Unauthorized.to_response(),
            vec![0x30, 0x03, 0x0a, 0x01, 0x06]
        );
        assert_eq!(status_response(ResponseStatus::TryLater)[4], 3);
        assert_eq!(OcspError::Internal.status(), ResponseStatus::InternalError);
    }

    #[test]
    fn get_form_decodes_percent_encoded_and_unpadded_base64() {
        use base64::Engine;
        let der = sample(Some(&[9; 20]), &[0x0f, 0xff], HashAlgorithm::Sha1);
        let l = RequestLimits::default();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        let encoded = b64
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D");
        let want = parse_request(&der, &l).unwrap();
        assert_eq!(parse_get(&encoded, &l).unwrap(), want);
        assert_eq!(parse_get(&b64, &l).unwrap(), want);
        assert_eq!(parse_get(b64.trim_end_matches('='), &l).unwrap(), want);
        let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&der);
        assert_eq!(parse_get(&url_safe, &l).unwrap(), want);
        assert!(matches!(parse_get("%zz", &l), Err(OcspError::GetEncoding)));
        assert!(matches!(parse_get("!!!!", &l), Err(OcspError::GetEncoding)));
        assert!(matches!(
            parse_get(&"A".repeat(100_000), &l),
            Err(OcspError::TooLarge { .. })
        ));
    }
}
