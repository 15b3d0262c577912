//! Unit tests of the PIV applet through its raw APDU interface (transport included).

use super::*;
use crate::crypto::{KeyAlg, MgmAlg, MgmKey};
use der::{Decode, Encode};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::pkcs8::DecodePublicKey;

fn card_with(alg: MgmAlg, key: Vec<u8>) -> Card {
    let cfg = CardConfig {
        mgm_key: MgmKey::new(alg, key).unwrap(),
        ..CardConfig::default()
    };
    Card::new(cfg, Attestation::load_or_create(None).unwrap()).unwrap()
}

fn card() -> Card {
    card_with(MgmAlg::Aes192, DEFAULT_MGM_KEY.to_vec())
}

/// Sends one short APDU; returns (data, sw), following 61xx with GET RESPONSE.
fn send(card: &mut Card, cla: u8, ins: u8, p1: u8, p2: u8, data: &[u8]) -> (Vec<u8>, u16) {
    let mut apdu = vec![cla, ins, p1, p2, data.len() as u8];
    apdu.extend_from_slice(data);
    let mut out = Vec::new();
    let mut resp = card.process(&apdu);
    loop {
        let n = resp.len();
        let sw = u16::from_be_bytes([resp[n - 2], resp[n - 1]]);
        out.extend_from_slice(&resp[..n - 2]);
        if sw >> 8 != 0x61 {
            return (out, sw);
        }
        resp = card.process(&[0, 0xc0, 0, 0, 0]);
    }
}

/// Sends a command, chaining data over 255 bytes like the yubikey crate.
fn transfer(card: &mut Card, ins: u8, p1: u8, p2: u8, data: &[u8]) -> (Vec<u8>, u16) {
    let mut chunks: Vec<&[u8]> = data.chunks(255).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    for (i, c) in chunks.iter().enumerate() {
        let cla = if i < last { 0x10 } else { 0 };
        let (d, sw) = send(card, cla, ins, p1, p2, c);
        if i == last || sw != 0x9000 {
            return (d, sw);
        }
    }
    unreachable!()
}

fn cmd(card: &mut Card, ins: u8, p1: u8, p2: u8, data: &[u8]) -> (Vec<u8>, u16) {
    transfer(card, ins, p1, p2, data)
}

fn pin8(pin: &[u8]) -> Vec<u8> {
    let mut v = pin.to_vec();
    v.resize(8, 0xff);
    v
}

fn select(card: &mut Card) -> u16 {
    cmd(card, 0xa4, 0x04, 0, &[0xa0, 0, 0, 3, 8]).1
}

fn authenticate(card: &mut Card, key: &MgmKey) -> u16 {
    let (resp, sw) = cmd(card, 0x87, key.alg.id(), 0x9b, &[0x7c, 0x02, 0x80, 0x00]);
    if sw != 0x9000 {
        return sw;
    }
    let bs = key.alg.block_len();
    assert_eq!(resp[..4], [0x7c, (bs + 2) as u8, 0x80, bs as u8]);
    let witness = key.decrypt(&resp[4..]).unwrap();
    let challenge = vec![0x5a; bs];
    let mut data = vec![0x7c, (2 * bs + 4) as u8, 0x80, bs as u8];
    data.extend_from_slice(&witness);
    data.extend_from_slice(&[0x81, bs as u8]);
    data.extend_from_slice(&challenge);
    let (resp, sw) = cmd(card, 0x87, key.alg.id(), 0x9b, &data);
    if sw == 0x9000 {
        assert_eq!(resp[4..], key.encrypt(&challenge).unwrap()[..]);
    }
    sw
}

fn default_key() -> MgmKey {
    MgmKey::new(MgmAlg::Aes192, DEFAULT_MGM_KEY.to_vec()).unwrap()
}

fn generate(card: &mut Card, slot: u8, alg: u8, extra: &[u8]) -> (Vec<u8>, u16) {
    let mut data = vec![0xac, 3 + extra.len() as u8, 0x80, 0x01, alg];
    data.extend_from_slice(extra);
    cmd(card, 0x47, 0, slot, &data)
}

fn sign(card: &mut Card, alg: u8, slot: u8, digest: &[u8]) -> (Vec<u8>, u16) {
    let mut data = vec![
        0x7c,
        (digest.len() + 4) as u8,
        0x82,
        0x00,
        0x81,
        digest.len() as u8,
    ];
    data.extend_from_slice(digest);
    cmd(card, 0x87, alg, slot, &data)
}

fn p256_key(point_resp: &[u8]) -> p256::ecdsa::VerifyingKey {
    assert_eq!(point_resp[..5], [0x7f, 0x49, 0x43, 0x86, 0x41]);
    p256::ecdsa::VerifyingKey::from_sec1_bytes(&point_resp[5..]).unwrap()
}

#[test]
fn select_version_serial() {
    let mut c = card();
    assert_eq!(select(&mut c), 0x9000);
    assert_eq!(cmd(&mut c, 0xfd, 0, 0, &[]), (vec![5, 7, 1], 0x9000));
    assert_eq!(
        cmd(&mut c, 0xf8, 0, 0, &[]),
        (12_345_678u32.to_be_bytes().to_vec(), 0x9000)
    );
    assert_eq!(
        cmd(
            &mut c,
            0xa4,
            0x04,
            0,
            &[0xa0, 0, 0, 5, 0x27, 0x47, 0x11, 0x17]
        )
        .1,
        0x6a82
    );
    assert_eq!(cmd(&mut c, 0x42, 0, 0, &[]).1, 0x6d00);
    // Firmware-4 style serial through the OTP applet, then back to PIV.
    assert_eq!(cmd(&mut c, 0xa4, 0x04, 0, &OTP_AID).1, 0x9000);
    assert_eq!(cmd(&mut c, 0xa4, 0x04, 0, &OTP_AID[..7]).1, 0x9000);
    assert_eq!(
        cmd(&mut c, 0x01, 0x10, 0, &[]),
        (12_345_678u32.to_be_bytes().to_vec(), 0x9000)
    );
    assert_eq!(cmd(&mut c, 0xfd, 0, 0, &[]).1, 0x6d00);
    assert_eq!(select(&mut c), 0x9000);
    // Short-APDU retry query exactly as the crate sends it.
    assert_eq!(c.process(&[0, 0x20, 0, 0x80, 0]), vec![0x63, 0xc3]);
}

#[test]
fn pin_counter_blocks_and_puk_unblocks() {
    let mut c = card();
    select(&mut c);
    assert_eq!(cmd(&mut c, 0x20, 0, 0x80, &[]).1, 0x63c3);
    assert_eq!(cmd(&mut c, 0x20, 0, 0x80, &pin8(b"000000")).1, 0x63c2);
    assert_eq!(cmd(&mut c, 0x20, 0, 0x80, &pin8(b"123456")).1, 0x9000);
    // Correct PIN resets the counter; verified state answers the retry query with 9000.
    assert_eq!(cmd(&mut c, 0x20, 0, 0x80, &[]).1, 0x9000);
    // Re-select drops the verified state.
    select(&mut c);
    assert_eq!(cmd(&mut c, 0x20, 0, 0x80, &[]).1, 0x63c3);
    assert_eq!(cmd(&mut c, 0x20, 0, 0x80, &pin8(b"000000")).1, 0x63c2);
    assert_eq!(cmd(&mut c, 0x20, 0, 0x80, &pin8(b"000000")).1, 0x63c1);
    assert_eq!(cmd(&mut c, 0x20, 0, 0x80, &pin8(b"000000")).1, 0x6983);
    assert_eq!(cmd(&mut c, 0x20, 0, 0x80, &pin8(b"123456")).1, 0x6983);
    assert_eq!(cmd(&mut c, 0x20, 0, 0x80, &[]).1, 0x6983);
    // Metadata reports the counter.
    let (md, _) = cmd(&mut c, 0xf7, 0, 0x80, &[]);
    assert_eq!(
        md,
        vec![0x01, 0x01, 0xff, 0x05, 0x01, 0x01, 0x06, 0x02, 0x03, 0x00]
    );
    // PUK unblocks and sets a new PIN.
    let mut data = pin8(b"12345678");
    data.extend(pin8(b"654321"));
    assert_eq!(cmd(&mut c, 0x2c, 0, 0x80, &data).1, 0x9000);
    assert_eq!(cmd(&mut c, 0x20, 0, 0x80, &pin8(b"654321")).1, 0x9000);
    // Change PIN back.
    let mut data = pin8(b"654321");
    data.extend(pin8(b"123456"));
    assert_eq!(cmd(&mut c, 0x24, 0, 0x80, &data).1, 0x9000);
    assert_eq!(cmd(&mut c, 0x20, 0, 0x80, &pin8(b"123456")).1, 0x9000);
}

#[test]
fn management_auth_each_algorithm() {
    for (alg, len) in [
        (MgmAlg::Tdes, 24),
        (MgmAlg::Aes128, 16),
        (MgmAlg::Aes192, 24),
        (MgmAlg::Aes256, 32),
    ] {
        let key: Vec<u8> = (0..len as u8).collect();
        let mut c = card_with(alg, key.clone());
        select(&mut c);
        let (md, sw) = cmd(&mut c, 0xf7, 0, 0x9b, &[]);
        assert_eq!(sw, 0x9000);
        assert_eq!(md[..3], [0x01, 0x01, alg.id()]);
        assert_eq!(md[md.len() - 3..], [0x05, 0x01, 0x00]);
        // Wrong key: 6982 and still not authenticated.
        let wrong = MgmKey::new(alg, vec![0xee; len]).unwrap();
        assert_eq!(authenticate(&mut c, &wrong), 0x6982, "{alg:?}");
        assert_eq!(generate(&mut c, 0x9a, 0x11, &[]).1, 0x6982);
        // Wrong algorithm in P1.
        let other = if alg == MgmAlg::Tdes {
            MgmAlg::Aes128
        } else {
            MgmAlg::Tdes
        };
        assert_eq!(
            cmd(&mut c, 0x87, other.id(), 0x9b, &[0x7c, 0x02, 0x80, 0x00]).1,
            0x6a80
        );
        let right = MgmKey::new(alg, key).unwrap();
        assert_eq!(authenticate(&mut c, &right), 0x9000, "{alg:?}");
        assert_eq!(generate(&mut c, 0x9a, 0x11, &[]).1, 0x9000);
        // Re-select clears management authentication.
        select(&mut c);
        assert_eq!(generate(&mut c, 0x9a, 0x11, &[]).1, 0x6982);
    }
}

#[test]
fn single_management_auth() {
    let mut c = card();
    let key = default_key();
    let (resp, sw) = cmd(&mut c, 0x87, 0x0a, 0x9b, &[0x7c, 0x02, 0x81, 0x00]);
    assert_eq!(sw, 0x9000);
    let enc = key.encrypt(&resp[4..]).unwrap();
    let mut data = vec![0x7c, 0x12, 0x82, 0x10];
    data.extend_from_slice(&enc);
    assert_eq!(cmd(&mut c, 0x87, 0x0a, 0x9b, &data), (vec![], 0x9000));
    assert_eq!(generate(&mut c, 0x9d, 0x11, &[]).1, 0x9000);
}

#[test]
fn generate_formats_and_policies() {
    let mut c = card();
    authenticate(&mut c, &default_key());
    let (p256, sw) = generate(&mut c, 0x9c, 0x11, &[]);
    assert_eq!(sw, 0x9000);
    assert_eq!(p256.len(), 3 + 2 + 65);
    p256_key(&p256);
    let (p384, sw) = generate(&mut c, 0x9d, 0x14, &[0xaa, 0x01, 0x01, 0xab, 0x01, 0x02]);
    assert_eq!(sw, 0x9000);
    assert_eq!(p384[..5], [0x7f, 0x49, 0x63, 0x86, 0x61]);
    // RSA and unknown algorithms are refused; F9 and bogus slots too.
    assert_eq!(generate(&mut c, 0x9a, 0x07, &[]).1, 0x6a80);
    assert_eq!(generate(&mut c, 0xf9, 0x11, &[]).1, 0x6b00);
    assert_eq!(generate(&mut c, 0x42, 0x11, &[]).1, 0x6b00);
    // Metadata: 9c default policy is ALWAYS, 9d has what was asked.
    let (md, _) = cmd(&mut c, 0xf7, 0, 0x9c, &[]);
    assert_eq!(
        md[..10],
        [0x01, 0x01, 0x11, 0x02, 0x02, 0x03, 0x01, 0x03, 0x01, 0x01]
    );
    assert_eq!(md[10..14], [0x04, 0x43, 0x86, 0x41]);
    assert_eq!(md[14..], p256[5..]);
    let (md, _) = cmd(&mut c, 0xf7, 0, 0x9d, &[]);
    assert_eq!(
        md[..10],
        [0x01, 0x01, 0x14, 0x02, 0x02, 0x01, 0x02, 0x03, 0x01, 0x01]
    );
    assert_eq!(md[10..14], [0x04, 0x63, 0x86, 0x61]);
    // Empty slot.
    assert_eq!(cmd(&mut c, 0xf7, 0, 0x9a, &[]).1, 0x6a88);
    assert_eq!(cmd(&mut c, 0xf7, 0, 0x42, &[]).1, 0x6b00);
    // Generating again replaces the key.
    let (again, _) = generate(&mut c, 0x9c, 0x11, &[]);
    assert_ne!(again, p256);
}

#[test]
fn pin_always_is_consumed_and_signature_verifies() {
    let mut c = card();
    authenticate(&mut c, &default_key());
    let (pt, _) = generate(&mut c, 0x9c, 0x11, &[]);
    let vk = p256_key(&pt);
    let digest = [0x11u8; 32];
    assert_eq!(sign(&mut c, 0x11, 0x9c, &digest).1, 0x6982);
    assert_eq!(cmd(&mut c, 0x20, 0, 0x80, &pin8(b"123456")).1, 0x9000);
    let (resp, sw) = sign(&mut c, 0x11, 0x9c, &digest);
    assert_eq!(sw, 0x9000);
    let Some((0x7c, inner, [])) = tlv::split_first(&resp) else {
        panic!("{resp:x?}")
    };
    let Some((0x82, der, [])) = tlv::split_first(inner) else {
        panic!()
    };
    let sig = p256::ecdsa::Signature::from_der(der).unwrap();
    vk.verify_prehash(&digest, &sig).unwrap();
    // Consumed: the next sign needs another VERIFY.
    assert_eq!(sign(&mut c, 0x11, 0x9c, &digest).1, 0x6982);
    assert_eq!(cmd(&mut c, 0x20, 0, 0x80, &pin8(b"123456")).1, 0x9000);
    assert_eq!(sign(&mut c, 0x11, 0x9c, &digest).1, 0x9000);
    // Wrong algorithm and empty slot.
    assert_eq!(sign(&mut c, 0x14, 0x9c, &[0; 48]).1, 0x6a80);
    assert_eq!(sign(&mut c, 0x11, 0x9a, &digest).1, 0x6a80);
}

#[test]
fn pin_once_and_never() {
    let mut c = card();
    authenticate(&mut c, &default_key());
    generate(&mut c, 0x9a, 0x11, &[]);
    generate(&mut c, 0x9e, 0x14, &[]);
    let d = [7u8; 32];
    assert_eq!(sign(&mut c, 0x11, 0x9a, &d).1, 0x6982);
    assert_eq!(sign(&mut c, 0x14, 0x9e, &[7u8; 48]).1, 0x9000);
    cmd(&mut c, 0x20, 0, 0x80, &pin8(b"123456"));
    assert_eq!(sign(&mut c, 0x11, 0x9a, &d).1, 0x9000);
    assert_eq!(sign(&mut c, 0x11, 0x9a, &d).1, 0x9000);
    // A card reset (power cycle) drops it.
    c.reset();
    assert_eq!(sign(&mut c, 0x11, 0x9a, &d).1, 0x6982);
}

#[test]
fn objects_chain_and_get_response() {
    let mut c = card();
    let cert = vec![0x30; 1200];
    let object = certificate_object(&cert);
    let mut data = vec![0x5c, 0x03, 0x5f, 0xc1, 0x0a];
    data.extend_from_slice(&object);
    assert_eq!(transfer(&mut c, 0xdb, 0x3f, 0xff, &data).1, 0x6982);
    authenticate(&mut c, &default_key());
    assert_eq!(transfer(&mut c, 0xdb, 0x3f, 0xff, &data).1, 0x9000);
    let (got, sw) = cmd(&mut c, 0xcb, 0x3f, 0xff, &[0x5c, 0x03, 0x5f, 0xc1, 0x0a]);
    assert_eq!((sw, got), (0x9000, object));
    // Raw APDU view: first answer is 256 bytes + 61xx.
    let first = c.process(&[0, 0xcb, 0x3f, 0xff, 5, 0x5c, 0x03, 0x5f, 0xc1, 0x0a, 0]);
    assert_eq!(first.len(), 258);
    assert_eq!(first[256], 0x61);
    // Size limit: 3063 is fine, 3064 is not.
    for (len, want) in [(3063usize, 0x9000), (3064, 0x6a84)] {
        let mut data = vec![0x5c, 0x03, 0x5f, 0xc1, 0x0d];
        data.extend(tlv::tlv(&[0x53], &vec![1u8; len]));
        assert_eq!(transfer(&mut c, 0xdb, 0x3f, 0xff, &data).1, want);
    }
    // Empty objects and the discovery object.
    assert_eq!(
        cmd(&mut c, 0xcb, 0x3f, 0xff, &[0x5c, 0x03, 0x5f, 0xc1, 0x02]).1,
        0x6a82
    );
    let (disc, sw) = cmd(&mut c, 0xcb, 0x3f, 0xff, &[0x5c, 0x01, 0x7e]);
    assert_eq!((sw, disc[0]), (0x9000, 0x7e));
    // Deleting with an empty 53.
    assert_eq!(
        cmd(
            &mut c,
            0xdb,
            0x3f,
            0xff,
            &[0x5c, 0x03, 0x5f, 0xc1, 0x0a, 0x53, 0x00]
        )
        .1,
        0x9000
    );
    assert_eq!(
        cmd(&mut c, 0xcb, 0x3f, 0xff, &[0x5c, 0x03, 0x5f, 0xc1, 0x0a]).1,
        0x6a82
    );
    // PIN-protected object.
    let mut data = vec![0x5c, 0x03, 0x5f, 0xc1, 0x09];
    data.extend(tlv::tlv(&[0x53], &[0x88, 0x00]));
    assert_eq!(cmd(&mut c, 0xdb, 0x3f, 0xff, &data).1, 0x9000);
    assert_eq!(
        cmd(&mut c, 0xcb, 0x3f, 0xff, &[0x5c, 0x03, 0x5f, 0xc1, 0x09]).1,
        0x6982
    );
    cmd(&mut c, 0x20, 0, 0x80, &pin8(b"123456"));
    assert_eq!(
        cmd(&mut c, 0xcb, 0x3f, 0xff, &[0x5c, 0x03, 0x5f, 0xc1, 0x09]).1,
        0x9000
    );
}

#[test]
fn attestation_chains_to_root() {
    let mut c = card();
    authenticate(&mut c, &default_key());
    let (pt, _) = generate(&mut c, 0x9c, 0x11, &[]);
    let (der, sw) = cmd(&mut c, 0xf9, 0x9c, 0, &[]);
    assert_eq!(sw, 0x9000);
    let cert = x509_cert::Certificate::from_der(&der).unwrap();
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .unwrap();
    assert_eq!(
        p256::ecdsa::VerifyingKey::from_public_key_der(&spki).unwrap(),
        p256_key(&pt)
    );
    assert_eq!(
        cert.tbs_certificate().subject().to_string(),
        "CN=YubiKey PIV Attestation 9c"
    );
    // The F9 object holds the intermediate; both signatures verify.
    let (obj, _) = cmd(&mut c, 0xcb, 0x3f, 0xff, &[0x5c, 0x03, 0x5f, 0xff, 0x01]);
    let Some((0x53, inner, [])) = tlv::split_first(&obj) else {
        panic!()
    };
    let Some((0x70, f9_der, _)) = tlv::split_first(inner) else {
        panic!()
    };
    let f9 = x509_cert::Certificate::from_der(f9_der).unwrap();
    let check = |child: &x509_cert::Certificate, parent: &x509_cert::Certificate| {
        let pk = parent
            .tbs_certificate()
            .subject_public_key_info()
            .to_der()
            .unwrap();
        let vk = p256::ecdsa::VerifyingKey::from_public_key_der(&pk).unwrap();
        let sig = p256::ecdsa::Signature::from_der(child.signature().raw_bytes()).unwrap();
        vk.verify(&child.tbs_certificate().to_der().unwrap(), &sig)
            .unwrap();
    };
    check(&cert, &f9);
    check(&f9, &c.attestation().root_cert);
    let exts = cert.tbs_certificate().extensions().unwrap();
    let find = |oid: &str| {
        exts.iter()
            .find(|e| e.extn_id.to_string() == oid)
            .map(|e| e.extn_value.as_bytes().to_vec())
    };
    assert_eq!(find(crate::attest::OID_FIRMWARE), Some(vec![5, 7, 1]));
    assert_eq!(find(crate::attest::OID_POLICY), Some(vec![3, 1]));
    assert_eq!(
        find(crate::attest::OID_SERIAL),
        Some(vec![0x02, 0x04, 0x00, 0xbc, 0x61, 0x4e])
    );
    // Empty slot.
    assert_eq!(cmd(&mut c, 0xf9, 0x9a, 0, &[]).1, 0x6a82);
}

#[test]
fn set_management_key_and_factory_reset() {
    let mut c = card();
    authenticate(&mut c, &default_key());
    let new = MgmKey::new(MgmAlg::Aes256, vec![0x33; 32]).unwrap();
    let mut data = vec![0x0c, 0x9b, 32];
    data.extend_from_slice(&new.key);
    assert_eq!(cmd(&mut c, 0xff, 0xff, 0xff, &data).1, 0x9000);
    select(&mut c);
    assert_eq!(authenticate(&mut c, &new), 0x9000);
    generate(&mut c, 0x9a, 0x11, &[]);
    // Reset only when PIN and PUK are blocked.
    assert_eq!(cmd(&mut c, 0xfb, 0, 0, &[]).1, 0x6985);
    for _ in 0..3 {
        cmd(&mut c, 0x20, 0, 0x80, &pin8(b"000000"));
        let mut d = pin8(b"00000000");
        d.extend(pin8(b"111111"));
        cmd(&mut c, 0x2c, 0, 0x80, &d);
    }
    assert_eq!(cmd(&mut c, 0xfb, 0, 0, &[]).1, 0x9000);
    assert_eq!(cmd(&mut c, 0xf7, 0, 0x9a, &[]).1, 0x6a88);
    assert_eq!(authenticate(&mut c, &default_key()), 0x9000);
    let _ = KeyAlg::P256;
}

#[test]
fn atr_checksum_is_valid() {
    let x = YUBIKEY_ATR[1..].iter().fold(0u8, |a, b| a ^ b);
    assert_eq!(x, 0);
}

#[test]
fn old_firmware_has_no_metadata() {
    let cfg = CardConfig {
        version: [4, 3, 7],
        mgm_key: MgmKey::new(MgmAlg::Tdes, DEFAULT_MGM_KEY.to_vec()).unwrap(),
        ..CardConfig::default()
    };
    let mut c = Card::new(cfg, Attestation::load_or_create(None).unwrap()).unwrap();
    assert_eq!(cmd(&mut c, 0xf7, 0, 0x9b, &[]).1, 0x6d00);
    let key = MgmKey::new(MgmAlg::Tdes, DEFAULT_MGM_KEY.to_vec()).unwrap();
    assert_eq!(authenticate(&mut c, &key), 0x9000);
}

fn old_card(version: [u8; 3]) -> Card {
    let cfg = CardConfig {
        version,
        mgm_key: MgmKey::new(MgmAlg::Tdes, DEFAULT_MGM_KEY.to_vec()).unwrap(),
        ..CardConfig::default()
    };
    Card::new(cfg, Attestation::load_or_create(None).unwrap()).unwrap()
}

#[test]
fn firmware_gates_attestation_serial_and_aes() {
    // YubiKey 4.2: no ATTEST, no PIV GET SERIAL (hosts use the OTP applet), no AES.
    let tdes = MgmKey::new(MgmAlg::Tdes, DEFAULT_MGM_KEY.to_vec()).unwrap();
    let mut c = old_card([4, 2, 8]);
    assert_eq!(cmd(&mut c, 0xf8, 0, 0, &[]).1, 0x6d00);
    authenticate(&mut c, &tdes);
    assert_eq!(generate(&mut c, 0x9c, 0x11, &[]).1, 0x9000);
    assert_eq!(cmd(&mut c, 0xf9, 0x9c, 0, &[]).1, 0x6d00);
    let mut data = vec![0x0a, 0x9b, 24];
    data.extend_from_slice(&DEFAULT_MGM_KEY);
    assert_eq!(cmd(&mut c, 0xff, 0xff, 0xff, &data).1, 0x6a80);
    // 4.3 attests; 5.2 reads the serial in PIV but still has no metadata.
    let mut c = old_card([4, 3, 7]);
    authenticate(&mut c, &tdes);
    generate(&mut c, 0x9c, 0x11, &[]);
    let (der, sw) = cmd(&mut c, 0xf9, 0x9c, 0, &[]);
    assert_eq!((der[0], sw), (0x30, 0x9000));
    let mut c = old_card([5, 2, 7]);
    assert_eq!(cmd(&mut c, 0xf8, 0, 0, &[]).1, 0x9000);
    assert_eq!(cmd(&mut c, 0xf7, 0, 0x9c, &[]).1, 0x6d00);
    // A 5.2 card cannot be configured with an AES management key.
    let cfg = CardConfig {
        version: [5, 2, 7],
        ..CardConfig::default()
    };
    assert!(Card::new(cfg, Attestation::load_or_create(None).unwrap()).is_err());
}

#[test]
fn armed_faults_fire_once() {
    let mut c = card();
    c.arm(Fault::Status {
        ins: 0xf7,
        sw: 0x6f00,
    });
    assert_eq!(cmd(&mut c, 0xf7, 0, 0x9c, &[]).1, 0x6f00);
    assert_eq!(cmd(&mut c, 0xf7, 0, 0x9c, &[]).1, 0x6a88);
    c.arm(Fault::Yank { ins: 0xcb });
    assert!(!c.take_yank(&[0, 0xf7, 0, 0x9c, 0]));
    assert!(c.take_yank(&[0, 0xcb, 0x3f, 0xff, 0]));
    assert!(!c.take_yank(&[0, 0xcb, 0x3f, 0xff, 0]));
}
