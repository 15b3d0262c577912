//! RFC 7512 PKCS#11 URIs (`pkcs11:token=keyward;object=issuing-ca;id=%01`),
//! the convention operators know from OpenSSL, p11-kit and step-ca.

use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UriError {
    #[error("a PKCS#11 URI starts with `pkcs11:`")]
    Scheme,
    #[error("attribute `{0}` has no `=`")]
    NoValue(String),
    #[error("bad percent-encoding in `{0}`")]
    Percent(String),
    #[error("attribute `{0}` appears twice")]
    Duplicate(String),
    #[error("attribute `{0}` is not valid UTF-8")]
    Utf8(String),
}

/// The path attributes of a PKCS#11 URI, percent-decoded. Query attributes
/// (`?pin-value=…`) are refused on purpose: PINs never travel in URIs here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pkcs11Uri {
    attrs: BTreeMap<String, Vec<u8>>,
}

impl Pkcs11Uri {
    pub fn parse(s: &str) -> Result<Self, UriError> {
        let rest = s.strip_prefix("pkcs11:").ok_or(UriError::Scheme)?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        if let Some(q) = query
            && q.split('&').any(|kv| kv.starts_with("pin-value"))
        {
            return Err(UriError::NoValue(
                "pin-value (PINs come from a file or env var, never a URI)".into(),
            ));
        }
        let mut attrs = BTreeMap::new();
        for part in path.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| UriError::NoValue(part.to_string()))?;
            let value = percent_decode(v).ok_or_else(|| UriError::Percent(k.to_string()))?;
            if attrs.insert(k.to_string(), value).is_some() {
                return Err(UriError::Duplicate(k.to_string()));
            }
        }
        Ok(Self { attrs })
    }

    fn text(&self, key: &str) -> Option<String> {
        self.attrs
            .get(key)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub fn token(&self) -> Option<String> {
        self.text("token")
    }
    pub fn serial(&self) -> Option<String> {
        self.text("serial")
    }
    pub fn manufacturer(&self) -> Option<String> {
        self.text("manufacturer")
    }
    pub fn model(&self) -> Option<String> {
        self.text("model")
    }
    pub fn object(&self) -> Option<String> {
        self.text("object")
    }
    pub fn id(&self) -> Option<&[u8]> {
        self.attrs.get("id").map(Vec::as_slice)
    }

    /// Builds the URI that names one key pair on one token.
    pub fn for_key(token: &str, object: &str, id: &[u8]) -> String {
        let mut s = String::from("pkcs11:token=");
        s.push_str(&percent_encode(token.as_bytes()));
        s.push_str(";object=");
        s.push_str(&percent_encode(object.as_bytes()));
        s.push_str(";id=");
        for b in id {
            let _ = write!(s, "%{b:02X}");
        }
        s
    }
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

fn percent_encode(b: &[u8]) -> String {
    let mut s = String::new();
    for &c in b {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            s.push(c as char);
        } else {
            let _ = write!(s, "%{c:02X}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_token_object_and_binary_id() {
        let u = Pkcs11Uri::parse("pkcs11:token=My%20Token;object=issuing-ca;id=%01%ff").unwrap();
        assert_eq!(u.token().as_deref(), Some("My Token"));
        assert_eq!(u.object().as_deref(), Some("issuing-ca"));
        assert_eq!(u.id(), Some(&[0x01, 0xff][..]));
    }

    #[test]
    fn round_trips_key_uris() {
        let s = Pkcs11Uri::for_key("key ward", "ca;root", &[0, 1, 254]);
        let u = Pkcs11Uri::parse(&s).unwrap();
        assert_eq!(u.token().as_deref(), Some("key ward"));
        assert_eq!(u.object().as_deref(), Some("ca;root"));
        assert_eq!(u.id(), Some(&[0, 1, 254][..]));
    }

    #[test]
    fn refuses_bad_input() {
        assert_eq!(Pkcs11Uri::parse("pkcs12:token=x"), Err(UriError::Scheme));
        assert!(matches!(
            Pkcs11Uri::parse("pkcs11:token"),
            Err(UriError::NoValue(_))
        ));
        assert!(matches!(
            Pkcs11Uri::parse("pkcs11:id=%zz"),
            Err(UriError::Percent(_))
        ));
        assert!(matches!(
            Pkcs11Uri::parse("pkcs11:token=a;token=b"),
            Err(UriError::Duplicate(_))
        ));
        assert!(Pkcs11Uri::parse("pkcs11:token=a?pin-value=1234").is_err());
    }
}
