//! Scans directories for a private key in plaintext: its PKCS#8 DER, the
//! private value inside it (EC scalar, RSA private exponent, Ed25519 seed),
//! and the first base64 line of its PEM form. For "no plaintext key touches
//! disk" checks after a run; include with `#[path = "common/plaintext_scan.rs"]`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use der::{Decode, Reader, SliceReader, Tag, Tagged};
use std::path::{Path, PathBuf};

/// Byte strings whose presence in a file means the key is there in plaintext.
pub fn needles(pkcs8: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![pkcs8.to_vec()];
    // PrivateKeyInfo: SEQUENCE { version, algorithm, privateKey OCTET STRING, … }
    let outer = der::asn1::AnyRef::from_der(pkcs8).unwrap();
    let mut r = SliceReader::new(outer.value()).unwrap();
    der::asn1::AnyRef::decode(&mut r).unwrap();
    der::asn1::AnyRef::decode(&mut r).unwrap();
    let private_key = der::asn1::AnyRef::decode(&mut r).unwrap();
    let inner = private_key.value();
    out.push(inner.to_vec());
    if let Ok(seq) = der::asn1::AnyRef::from_der(inner) {
        let mut r = SliceReader::new(seq.value()).unwrap();
        let mut integers = 0;
        while !r.is_finished() {
            let v = der::asn1::AnyRef::decode(&mut r).unwrap();
            match v.tag() {
                // ECPrivateKey: the first OCTET STRING is the scalar.
                Tag::OctetString => {
                    out.push(v.value().to_vec());
                    break;
                }
                // RSAPrivateKey: version, n, e, d: d is the fourth INTEGER.
                Tag::Integer => {
                    integers += 1;
                    if integers == 4 {
                        out.push(v.value().to_vec());
                        break;
                    }
                }
                _ => break,
            }
        }
    } else if inner.len() >= 2 && inner[0] == 0x04 {
        // Ed25519: CurvePrivateKey is an OCTET STRING around the seed.
        out.push(inner[2..].to_vec());
    }
    let pem = der::pem::encode_string("PRIVATE KEY", der::pem::LineEnding::LF, pkcs8).unwrap();
    out.push(pem.lines().nth(1).unwrap().as_bytes().to_vec());
    out
}

/// Files under `dir` (recursively) that contain any needle of `pkcs8`.
pub fn files_holding(dir: &Path, pkcs8: &[u8]) -> Vec<PathBuf> {
    let needles = needles(pkcs8);
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            // Not following symlinks, and reading regular files only (a FIFO
            // or socket another process left in a scanned temp dir would block).
            let Ok(kind) = e.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && let Ok(bytes) = std::fs::read(&path)
                && needles
                    .iter()
                    .any(|n| bytes.windows(n.len()).any(|w| w == n.as_slice()))
            {
                found.push(path);
            }
        }
    }
    found
}
