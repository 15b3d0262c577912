//! Key pair templates, public-key export and signing on a PKCS#11 session.

use crate::keystore::algorithm::{SHA256_DIGEST_INFO_PREFIX, ecdsa_raw_to_der};
use crate::keystore::{KeyAlgorithm, KeyProtection, KeySpec, KeyStoreError, KeyUsage, Malformed};
use const_oid::db::{rfc5912, rfc8410};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use der::asn1::{BitString, OctetString};
use der::{Decode, Encode};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use std::collections::HashMap;
use std::sync::RwLock;

/// Private-key handles by CKA_ID: SoftHSM's `C_FindObjects` is slow with many
/// objects. Handles belong to the sessions' login; a pool reset clears them.
#[derive(Default)]
pub(super) struct HandleCache(RwLock<HashMap<Vec<u8>, ObjectHandle>>);

impl HandleCache {
    pub(super) fn insert(&self, id: &[u8], handle: ObjectHandle) {
        if let Ok(mut h) = self.0.write() {
            h.insert(id.to_vec(), handle);
        }
    }

    /// The private-key handle for a CKA_ID, from the cache or the token.
    pub(super) fn private(
        &self,
        session: &Session,
        id: &[u8],
    ) -> Result<Option<ObjectHandle>, KeyStoreError> {
        if let Ok(h) = self.0.read()
            && let Some(handle) = h.get(id)
        {
            return Ok(Some(*handle));
        }
        let found = find_private(session, id)?;
        if let Some(handle) = found {
            self.insert(id, handle);
        }
        Ok(found)
    }

    pub(super) fn forget(&self, id: &[u8]) {
        if let Ok(mut h) = self.0.write() {
            h.remove(id);
        }
    }

    pub(super) fn clear(&self) {
        if let Ok(mut h) = self.0.write() {
            h.clear();
        }
    }
}

fn ck(e: cryptoki::error::Error) -> KeyStoreError {
    KeyStoreError::Pkcs11(e)
}

fn der_err(e: der::Error) -> KeyStoreError {
    KeyStoreError::Encoding(e)
}

/// Generates a key pair with a least-privilege template: the private half
/// may only sign, the public half only verify (or, for a
/// [`KeyUsage::Decrypt`] RSA key, the private half only decrypts and the
/// public half only encrypts); no key
/// wrapping, key derivation or signature recovery. Private keys are always
/// sensitive and private; extractable only when the spec says so
/// (backup-marked keys). With `unmodifiable`, both halves are created
/// `CKA_MODIFIABLE=false` so that nobody can widen their usage later.
pub(super) fn generate(
    session: &Session,
    spec: &KeySpec,
    id: &[u8],
    unmodifiable: bool,
) -> Result<(ObjectHandle, ObjectHandle), KeyStoreError> {
    let label = spec.label.as_bytes().to_vec();
    let decrypt = spec.usage == KeyUsage::Decrypt;
    if decrypt && spec.algorithm.rsa_bits().is_none() {
        return Err(KeyStoreError::Unsupported(spec.algorithm));
    }
    let mut public = vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(!decrypt),
        Attribute::VerifyRecover(false),
        Attribute::Encrypt(decrypt),
        Attribute::Wrap(false),
        Attribute::Derive(false),
        Attribute::Label(label.clone()),
        Attribute::Id(id.to_vec()),
    ];
    let mut private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sign(!decrypt),
        Attribute::SignRecover(false),
        Attribute::Decrypt(decrypt),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(spec.extractable),
        Attribute::Label(label),
        Attribute::Id(id.to_vec()),
    ];
    if unmodifiable {
        public.push(Attribute::Modifiable(false));
        private.push(Attribute::Modifiable(false));
    }
    let mechanism = match spec.algorithm {
        KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => {
            let oid = spec
                .algorithm
                .curve_oid()
                .ok_or(KeyStoreError::Unsupported(spec.algorithm))?;
            public.push(Attribute::EcParams(oid.to_der().map_err(der_err)?));
            Mechanism::EccKeyPairGen
        }
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
            let bits = spec
                .algorithm
                .rsa_bits()
                .ok_or(KeyStoreError::Unsupported(spec.algorithm))?;
            public.push(Attribute::ModulusBits(u64::from(bits).into()));
            public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
            Mechanism::RsaPkcsKeyPairGen
        }
        KeyAlgorithm::Ed25519 => {
            public.push(Attribute::EcParams(
                rfc8410::ID_ED_25519.to_der().map_err(der_err)?,
            ));
            Mechanism::EccEdwardsKeyPairGen
        }
    };
    session
        .generate_key_pair(&mechanism, &public, &private)
        .map_err(ck)
}

/// The template of a restored private key: as [`generate`] makes them
/// (sensitive, sign-only, extractable only when the spec says so), plus
/// the class and key type C_UnwrapKey needs.
pub(super) fn private_template(
    spec: &KeySpec,
    id: &[u8],
    unmodifiable: bool,
) -> Result<Vec<Attribute>, KeyStoreError> {
    let mut t = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(key_type(spec.algorithm)),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sign(spec.usage == KeyUsage::Sign),
        Attribute::SignRecover(false),
        Attribute::Decrypt(spec.usage == KeyUsage::Decrypt),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(spec.extractable),
        Attribute::Label(spec.label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ];
    if unmodifiable {
        t.push(Attribute::Modifiable(false));
    }
    Ok(t)
}

fn key_type(algorithm: KeyAlgorithm) -> KeyType {
    match algorithm {
        KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => KeyType::EC,
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => KeyType::RSA,
        KeyAlgorithm::Ed25519 => KeyType::EC_EDWARDS,
    }
}

/// Creates the public half of a restored key pair from its DER
/// SubjectPublicKeyInfo, with the same verify-only template as [`generate`].
pub(super) fn create_public(
    session: &Session,
    spec: &KeySpec,
    id: &[u8],
    public_key_der: &[u8],
    unmodifiable: bool,
) -> Result<ObjectHandle, KeyStoreError> {
    let spki = SubjectPublicKeyInfoOwned::from_der(public_key_der).map_err(der_err)?;
    let raw = spki
        .subject_public_key
        .as_bytes()
        .ok_or(KeyStoreError::Malformed(Malformed::NoPublicKey))?;
    let mut t = vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(key_type(spec.algorithm)),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(spec.usage == KeyUsage::Sign),
        Attribute::VerifyRecover(false),
        Attribute::Encrypt(spec.usage == KeyUsage::Decrypt),
        Attribute::Wrap(false),
        Attribute::Derive(false),
        Attribute::Label(spec.label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ];
    match spec.algorithm {
        KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => {
            let oid = spec
                .algorithm
                .curve_oid()
                .ok_or(KeyStoreError::Unsupported(spec.algorithm))?;
            t.push(Attribute::EcParams(oid.to_der().map_err(der_err)?));
            t.push(Attribute::EcPoint(
                OctetString::new(raw)
                    .map_err(der_err)?
                    .to_der()
                    .map_err(der_err)?,
            ));
        }
        KeyAlgorithm::Ed25519 => {
            t.push(Attribute::EcParams(
                rfc8410::ID_ED_25519.to_der().map_err(der_err)?,
            ));
            t.push(Attribute::EcPoint(
                OctetString::new(raw)
                    .map_err(der_err)?
                    .to_der()
                    .map_err(der_err)?,
            ));
        }
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
            #[derive(der::Sequence)]
            struct RsaPublicKey<'a> {
                n: der::asn1::UintRef<'a>,
                e: der::asn1::UintRef<'a>,
            }
            let key = RsaPublicKey::from_der(raw).map_err(der_err)?;
            t.push(Attribute::Modulus(key.n.as_bytes().to_vec()));
            t.push(Attribute::PublicExponent(key.e.as_bytes().to_vec()));
        }
    }
    if unmodifiable {
        t.push(Attribute::Modifiable(false));
    }
    session.create_object(&t).map_err(ck)
}

/// Errors with which a module refuses a template attribute it does not
/// support or let callers set; generation is then retried without it.
pub(super) fn template_refused(e: &KeyStoreError) -> bool {
    use cryptoki::error::{Error as CkError, RvError};
    matches!(
        e,
        KeyStoreError::Pkcs11(CkError::Pkcs11(
            RvError::AttributeTypeInvalid
                | RvError::AttributeValueInvalid
                | RvError::AttributeReadOnly
                | RvError::TemplateInconsistent,
            _
        )) | KeyStoreError::UnwrapRefused(CkError::Pkcs11(
            RvError::AttributeTypeInvalid
                | RvError::AttributeValueInvalid
                | RvError::AttributeReadOnly
                | RvError::TemplateInconsistent,
            _
        ))
    )
}

fn find_private(session: &Session, id: &[u8]) -> Result<Option<ObjectHandle>, KeyStoreError> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(id.to_vec()),
        ])
        .map_err(ck)?;
    Ok(found.into_iter().next())
}

fn find_public(session: &Session, id: &[u8]) -> Result<Option<ObjectHandle>, KeyStoreError> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Id(id.to_vec()),
        ])
        .map_err(ck)?;
    Ok(found.into_iter().next())
}

/// Whether a private or a public key object already carries this CKA_ID.
pub(super) fn id_in_use(session: &Session, id: &[u8]) -> Result<bool, KeyStoreError> {
    Ok(find_private(session, id)?.is_some() || find_public(session, id)?.is_some())
}

/// Works out the algorithm of a stored key pair from its public half.
pub(super) fn algorithm_of(
    session: &Session,
    id: &[u8],
) -> Result<Option<KeyAlgorithm>, KeyStoreError> {
    let Some(public) = find_public(session, id)? else {
        return Ok(None);
    };
    let attrs = session
        .get_attributes(
            public,
            &[
                AttributeType::KeyType,
                AttributeType::EcParams,
                AttributeType::Modulus,
            ],
        )
        .map_err(ck)?;
    let mut key_type = None;
    let mut params = None;
    let mut modulus_len = 0usize;
    for a in attrs {
        match a {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::EcParams(p) => params = Some(p),
            Attribute::Modulus(m) => modulus_len = m.iter().skip_while(|b| **b == 0).count(),
            _ => {}
        }
    }
    let alg = match key_type {
        Some(KeyType::EC) => {
            let oid = params
                .and_then(|p| const_oid::ObjectIdentifier::from_der(&p).ok())
                .ok_or(KeyStoreError::Malformed(Malformed::NoNamedCurve))?;
            if oid == rfc5912::SECP_256_R_1 {
                KeyAlgorithm::EcdsaP256
            } else if oid == rfc5912::SECP_384_R_1 {
                KeyAlgorithm::EcdsaP384
            } else {
                return Err(KeyStoreError::Malformed(Malformed::UnsupportedCurve(oid)));
            }
        }
        Some(KeyType::RSA) => match modulus_len * 8 {
            2048 => KeyAlgorithm::Rsa2048,
            3072 => KeyAlgorithm::Rsa3072,
            4096 => KeyAlgorithm::Rsa4096,
            bits => {
                return Err(KeyStoreError::Malformed(Malformed::UnsupportedRsaSize(
                    bits,
                )));
            }
        },
        Some(KeyType::EC_EDWARDS) => KeyAlgorithm::Ed25519,
        other => {
            return Err(KeyStoreError::Malformed(Malformed::UnsupportedKeyType(
                other,
            )));
        }
    };
    Ok(Some(alg))
}

/// Reads the public half and encodes it as a DER SubjectPublicKeyInfo.
pub(super) fn public_key_der(
    session: &Session,
    id: &[u8],
    algorithm: KeyAlgorithm,
) -> Result<Vec<u8>, KeyStoreError> {
    let public =
        find_public(session, id)?.ok_or(KeyStoreError::Malformed(Malformed::NoPublicKey))?;
    let spki = match algorithm {
        KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 | KeyAlgorithm::Ed25519 => {
            let attrs = session
                .get_attributes(public, &[AttributeType::EcPoint])
                .map_err(ck)?;
            let point = attrs
                .into_iter()
                .find_map(|a| match a {
                    Attribute::EcPoint(p) => Some(p),
                    _ => None,
                })
                .ok_or(KeyStoreError::Malformed(Malformed::NoEcPoint))?;
            // Tokens return a DER OCTET STRING around the point; a few return it bare.
            let raw = OctetString::from_der(&point)
                .map(|o| o.as_bytes().to_vec())
                .unwrap_or(point);
            let algorithm_id = match algorithm {
                KeyAlgorithm::Ed25519 => AlgorithmIdentifierOwned {
                    oid: rfc8410::ID_ED_25519,
                    parameters: None,
                },
                _ => AlgorithmIdentifierOwned {
                    oid: rfc5912::ID_EC_PUBLIC_KEY,
                    parameters: Some(
                        algorithm
                            .curve_oid()
                            .ok_or(KeyStoreError::Unsupported(algorithm))?
                            .into(),
                    ),
                },
            };
            SubjectPublicKeyInfoOwned {
                algorithm: algorithm_id,
                subject_public_key: BitString::from_bytes(&raw).map_err(der_err)?,
            }
        }
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
            let attrs = session
                .get_attributes(
                    public,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )
                .map_err(ck)?;
            let mut n = None;
            let mut e = None;
            for a in attrs {
                match a {
                    Attribute::Modulus(m) => n = Some(m),
                    Attribute::PublicExponent(x) => e = Some(x),
                    _ => {}
                }
            }
            let (n, e) = n
                .zip(e)
                .ok_or(KeyStoreError::Malformed(Malformed::NoRsaComponents))?;
            #[derive(der::Sequence)]
            struct RsaPublicKey<'a> {
                n: der::asn1::UintRef<'a>,
                e: der::asn1::UintRef<'a>,
            }
            let rsa = RsaPublicKey {
                n: der::asn1::UintRef::new(&n).map_err(der_err)?,
                e: der::asn1::UintRef::new(&e).map_err(der_err)?,
            }
            .to_der()
            .map_err(der_err)?;
            SubjectPublicKeyInfoOwned {
                algorithm: AlgorithmIdentifierOwned {
                    oid: rfc5912::RSA_ENCRYPTION,
                    parameters: Some(der::asn1::Any::null()),
                },
                subject_public_key: BitString::from_bytes(&rsa).map_err(der_err)?,
            }
        }
    };
    spki.to_der().map_err(der_err)
}

/// What the token is given for a message: a digest (ECDSA), a DigestInfo
/// (RSA PKCS#1 v1.5 via plain CKM_RSA_PKCS) or the message itself (EdDSA).
/// Computed before the blocking call so hashing does not hold a session.
pub(super) fn sign_input(algorithm: KeyAlgorithm, message: &[u8]) -> Vec<u8> {
    match (algorithm, algorithm.digest(message)) {
        (KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096, Some(d)) => {
            let mut v = SHA256_DIGEST_INFO_PREFIX.to_vec();
            v.extend_from_slice(&d);
            v
        }
        (_, Some(d)) => d,
        (_, None) => message.to_vec(),
    }
}

pub(super) fn sign(
    session: &Session,
    key: ObjectHandle,
    algorithm: KeyAlgorithm,
    input: &[u8],
) -> Result<Vec<u8>, KeyStoreError> {
    match algorithm {
        KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => {
            let raw = session.sign(&Mechanism::Ecdsa, key, input).map_err(ck)?;
            ecdsa_raw_to_der(&raw).map_err(der_err)
        }
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
            session.sign(&Mechanism::RsaPkcs, key, input).map_err(ck)
        }
        KeyAlgorithm::Ed25519 => session
            .sign(
                &Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                key,
                input,
            )
            .map_err(ck),
    }
}

/// RSA-OAEP decryption of a data key in the token: SHA-1 and MGF1-SHA-1,
/// empty label. SHA-1 because it is what every module offers (SoftHSM2
/// 2.6 refuses any other OAEP hash with CKR_ARGUMENTS_BAD); OAEP's
/// security does not rest on SHA-1's collision resistance.
pub(super) fn decrypt_oaep(
    session: &Session,
    key: ObjectHandle,
    ciphertext: &[u8],
) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyStoreError> {
    use cryptoki::mechanism::MechanismType;
    use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
    let params = PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    );
    session
        .decrypt(&Mechanism::RsaPkcsOaep(params), key, ciphertext)
        .map(zeroize::Zeroizing::new)
        .map_err(ck)
}

pub(super) fn protection(
    session: &Session,
    key: ObjectHandle,
) -> Result<KeyProtection, KeyStoreError> {
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
            ],
        )
        .map_err(ck)?;
    let mut p = KeyProtection {
        sensitive: false,
        extractable: true,
        always_sensitive: false,
        never_extractable: false,
    };
    for a in attrs {
        match a {
            Attribute::Sensitive(v) => p.sensitive = v,
            Attribute::Extractable(v) => p.extractable = v,
            Attribute::AlwaysSensitive(v) => p.always_sensitive = v,
            Attribute::NeverExtractable(v) => p.never_extractable = v,
            _ => {}
        }
    }
    Ok(p)
}

/// Destroys both halves; absent objects are not an error.
pub(super) fn destroy(session: &Session, id: &[u8]) -> Result<(), KeyStoreError> {
    for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
        let found = session
            .find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
            .map_err(ck)?;
        for h in found {
            session.destroy_object(h).map_err(ck)?;
        }
    }
    Ok(())
}

/// (CKA_ID, CKA_LABEL) of every private key on the token.
pub(super) fn list(session: &Session) -> Result<Vec<(Vec<u8>, String)>, KeyStoreError> {
    let handles = session
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .map_err(ck)?;
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        let attrs = session
            .get_attributes(h, &[AttributeType::Id, AttributeType::Label])
            .map_err(ck)?;
        let mut id = Vec::new();
        let mut label = String::new();
        for a in attrs {
            match a {
                Attribute::Id(v) => id = v,
                Attribute::Label(v) => label = String::from_utf8_lossy(&v).into_owned(),
                _ => {}
            }
        }
        out.push((id, label));
    }
    Ok(out)
}
