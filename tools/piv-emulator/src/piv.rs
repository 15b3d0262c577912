//! The PIV applet: persistent card state (keys, objects, PIN/PUK, management key), per-session
//! security state, and the handler for every instruction the emulator answers.

use std::collections::BTreeMap;

use crate::apdu::{Command, Response, Transport, sw};
use crate::attest::Attestation;
use crate::crypto::{self, EcKey, KeyAlg, MgmAlg, MgmKey};
use crate::tlv;

/// PIV application identifier (the full one; SELECT accepts any prefix of at least 5 bytes).
pub const PIV_AID: [u8; 11] = [0xa0, 0, 0, 0x03, 0x08, 0, 0, 0x10, 0, 0x01, 0];

/// Yubico OTP application id: firmware 4 hosts read the serial there (`01 10 00 00`).
/// yubico-piv-tool selects it by its 7-byte prefix, the `yubikey` crate by all 8 bytes.
pub const OTP_AID: [u8; 8] = [0xa0, 0, 0, 0x05, 0x27, 0x20, 0x01, 0x01];

/// YubiKey 5 (USB, CCID) answer-to-reset.
pub const YUBIKEY_ATR: [u8; 23] = [
    0x3b, 0xfd, 0x13, 0x00, 0x00, 0x81, 0x31, 0xfe, 0x15, 0x80, 0x73, 0xc0, 0x21, 0xc0, 0x57, 0x59,
    0x75, 0x62, 0x69, 0x4b, 0x65, 0x79, 0x40,
];

/// Largest object payload (`53` value) a YubiKey stores.
pub const MAX_OBJECT: usize = 3063;

/// Yubico's factory management key.
pub const DEFAULT_MGM_KEY: [u8; 24] = [
    1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8,
];
pub const DEFAULT_PIN: &[u8] = b"123456";
pub const DEFAULT_PUK: &[u8] = b"12345678";

/// PIV discovery object (tag 7E) as a YubiKey returns it.
const DISCOVERY: [u8; 20] = [
    0x7e, 0x12, 0x4f, 0x0b, 0xa0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00, 0x5f,
    0x2f, 0x02, 0x40, 0x00,
];

/// Objects a YubiKey only returns after PIN verification (fingerprints, facial image, printed
/// information, which Yubico tools use for the PIN-protected management key).
const PIN_PROTECTED_OBJECTS: [&[u8]; 3] = [
    &[0x5f, 0xc1, 0x03],
    &[0x5f, 0xc1, 0x08],
    &[0x5f, 0xc1, 0x09],
];

/// Object id holding the F9 attestation certificate.
pub const F9_CERT_OBJECT: [u8; 3] = [0x5f, 0xff, 0x01];

pub const PIN_NEVER: u8 = 1;
pub const PIN_ONCE: u8 = 2;
pub const PIN_ALWAYS: u8 = 3;
pub const TOUCH_NEVER: u8 = 1;
pub const ORIGIN_GENERATED: u8 = 1;
pub const ORIGIN_IMPORTED: u8 = 2;

/// Start-up configuration of the card.
#[derive(Debug, Clone)]
pub struct CardConfig {
    pub serial: u32,
    pub version: [u8; 3],
    pub mgm_key: MgmKey,
    pub pin: Vec<u8>,
    pub puk: Vec<u8>,
    pub pin_retries: u8,
    pub puk_retries: u8,
}

impl Default for CardConfig {
    fn default() -> Self {
        CardConfig {
            serial: 12_345_678,
            version: [5, 7, 1],
            mgm_key: MgmKey {
                alg: MgmAlg::Aes192,
                key: DEFAULT_MGM_KEY.to_vec(),
            },
            pin: DEFAULT_PIN.to_vec(),
            puk: DEFAULT_PUK.to_vec(),
            pin_retries: 3,
            puk_retries: 3,
        }
    }
}

/// The management key algorithm a factory-fresh YubiKey of `version` uses.
pub fn default_mgm_alg(version: [u8; 3]) -> MgmAlg {
    if version[0] > 5 || (version[0] == 5 && version[1] >= 7) {
        MgmAlg::Aes192
    } else {
        MgmAlg::Tdes
    }
}

/// First firmware with each version-gated instruction, as on real YubiKeys.
pub mod since {
    /// ATTEST (INS F9): YubiKey 4.3.
    pub const ATTEST: [u8; 3] = [4, 3, 0];
    /// GET SERIAL (INS F8) in the PIV applet: YubiKey 5 (YubiKey 4 hosts ask the OTP applet).
    pub const GET_SERIAL: [u8; 3] = [5, 0, 0];
    /// GET METADATA (INS F7): 5.3.
    pub const METADATA: [u8; 3] = [5, 3, 0];
    /// AES management keys: 5.4.
    pub const AES_MGM: [u8; 3] = [5, 4, 0];
}

/// A one-shot fault armed from the control channel, fired by the next command with `ins`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status word instead of running the command (a card error).
    Status { ins: u8, sw: u16 },
    /// Drop off the reader without answering (the card pulled out mid-command).
    Yank { ins: u8 },
}

impl Fault {
    fn ins(self) -> u8 {
        match self {
            Fault::Status { ins, .. } | Fault::Yank { ins } => ins,
        }
    }
}

/// True for slots that hold an asymmetric key (9A, 9C, 9D, 9E, retired 82–95, F9).
pub fn is_key_slot(slot: u8) -> bool {
    matches!(slot, 0x9a | 0x9c | 0x9d | 0x9e | 0x82..=0x95 | 0xf9)
}

/// The PIN policy a YubiKey applies when the generate command says "default".
pub fn default_pin_policy(slot: u8) -> u8 {
    match slot {
        0x9c => PIN_ALWAYS,
        0x9e => PIN_NEVER,
        _ => PIN_ONCE,
    }
}

/// A PIN or PUK with its retry counter.
#[derive(Debug, Clone)]
struct Secret {
    value: Vec<u8>,
    total: u8,
    remaining: u8,
    default: bool,
}

impl Secret {
    fn new(value: Vec<u8>, tries: u8, default: &[u8]) -> Secret {
        let is_default = value == default;
        Secret {
            value,
            total: tries,
            remaining: tries,
            default: is_default,
        }
    }

    /// Checks an FF-padded 8-byte candidate; returns the status word to answer.
    fn check(&mut self, padded: &[u8]) -> u16 {
        if self.remaining == 0 {
            return sw::AUTH_BLOCKED;
        }
        if padded.len() == 8 && unpad(padded) == self.value.as_slice() {
            self.remaining = self.total;
            sw::OK
        } else {
            self.remaining -= 1;
            if self.remaining == 0 {
                sw::AUTH_BLOCKED
            } else {
                sw::verify_fail(self.remaining)
            }
        }
    }
}

fn unpad(padded: &[u8]) -> &[u8] {
    let end = padded
        .iter()
        .position(|&b| b == 0xff)
        .unwrap_or(padded.len());
    &padded[..end]
}

fn valid_new_secret(v: &[u8], min: usize) -> bool {
    v.len() >= min && v.len() <= 8
}

/// A key held in a slot.
#[derive(Debug, Clone)]
pub struct SlotKey {
    pub key: EcKey,
    pub pin_policy: u8,
    pub touch_policy: u8,
    pub origin: u8,
}

/// Pending management-key authentication step.
#[derive(Debug, Clone)]
enum MgmChallenge {
    /// Mutual auth: the plaintext witness the host must send back.
    Witness(Vec<u8>),
    /// Single (card-only) auth: the challenge the host must encrypt.
    Challenge(Vec<u8>),
}

/// Security state that a SELECT, reset or removal clears.
#[derive(Debug, Default)]
struct Session {
    pin_verified: bool,
    /// Set by a successful VERIFY, consumed by the next PIN-always private key use.
    pin_always_token: bool,
    mgm_authenticated: bool,
    mgm_pending: Option<MgmChallenge>,
    /// The OTP applet is selected instead of PIV (only its serial query is emulated).
    otp_selected: bool,
}

/// The emulated card.
pub struct Card {
    serial: u32,
    version: [u8; 3],
    mgm: MgmKey,
    mgm_touch: u8,
    pin: Secret,
    puk: Secret,
    keys: BTreeMap<u8, SlotKey>,
    objects: BTreeMap<Vec<u8>, Vec<u8>>,
    attestation: Attestation,
    session: Session,
    transport: Transport,
    faults: Vec<Fault>,
}

impl Card {
    pub fn new(config: CardConfig, attestation: Attestation) -> Result<Card, String> {
        if !(4..=5).contains(&config.version[0]) {
            return Err("firmware major version must be 4 or 5".into());
        }
        if !valid_new_secret(&config.pin, 6) || !valid_new_secret(&config.puk, 6) {
            return Err("PIN and PUK must be 6 to 8 bytes".into());
        }
        if config.pin_retries == 0
            || config.pin_retries > 15
            || config.puk_retries == 0
            || config.puk_retries > 15
        {
            return Err("retry counts must be 1..=15".into());
        }
        if config.mgm_key.alg != MgmAlg::Tdes && config.version < since::AES_MGM {
            return Err("AES management keys need firmware 5.4 or later (use 3des)".into());
        }
        let mut card = Card {
            serial: config.serial,
            version: config.version,
            mgm: config.mgm_key,
            mgm_touch: TOUCH_NEVER,
            pin: Secret::new(config.pin, config.pin_retries, DEFAULT_PIN),
            puk: Secret::new(config.puk, config.puk_retries, DEFAULT_PUK),
            keys: BTreeMap::new(),
            objects: BTreeMap::new(),
            attestation,
            session: Session::default(),
            transport: Transport::default(),
            faults: Vec::new(),
        };
        card.keys.insert(
            0xf9,
            SlotKey {
                key: card.attestation.f9_key.clone(),
                pin_policy: PIN_NEVER,
                touch_policy: TOUCH_NEVER,
                origin: ORIGIN_IMPORTED,
            },
        );
        let f9 = card.attestation.f9_cert_der()?;
        card.objects
            .insert(F9_CERT_OBJECT.to_vec(), certificate_object(&f9));
        Ok(card)
    }

    /// The ATR sent to vpcd.
    pub fn atr(&self) -> &'static [u8] {
        &YUBIKEY_ATR
    }

    pub fn attestation(&self) -> &Attestation {
        &self.attestation
    }

    fn mgm_default(&self) -> bool {
        self.mgm.key == DEFAULT_MGM_KEY
    }

    /// Power-on, reset or re-insertion: security state and transport are cleared; keys,
    /// objects and retry counters are kept.
    pub fn reset(&mut self) {
        self.session = Session::default();
        self.transport.reset();
    }

    /// Arms a one-shot fault for the next command with its instruction byte.
    pub fn arm(&mut self, fault: Fault) {
        self.faults.retain(|f| f.ins() != fault.ins());
        self.faults.push(fault);
    }

    /// True (and disarmed) when a `Yank` is armed for this raw command: the caller must drop
    /// the connection without answering, as a card pulled out mid-command does.
    pub fn take_yank(&mut self, raw: &[u8]) -> bool {
        let Some(&ins) = raw.get(1) else {
            return false;
        };
        let before = self.faults.len();
        self.faults.retain(|f| *f != Fault::Yank { ins });
        self.faults.len() != before
    }

    /// Handles one raw command APDU from the reader and returns the raw response.
    pub fn process(&mut self, raw: &[u8]) -> Vec<u8> {
        let mut transport = std::mem::take(&mut self.transport);
        let out = transport.process(raw, |cmd| self.handle(cmd));
        self.transport = transport;
        out
    }

    /// Handles one complete (de-chained) command.
    pub fn handle(&mut self, cmd: &Command) -> Response {
        if let Some(i) = self
            .faults
            .iter()
            .position(|f| matches!(f, Fault::Status { ins, .. } if *ins == cmd.ins))
            && let Fault::Status { sw, .. } = self.faults.remove(i)
        {
            return Response::status(sw);
        }
        if self.session.otp_selected && cmd.ins != 0xa4 {
            return match (cmd.ins, cmd.p1) {
                (0x01, 0x10) => Response::ok(self.serial.to_be_bytes().to_vec()),
                _ => Response::status(sw::INS_NOT_SUPPORTED),
            };
        }
        match cmd.ins {
            0xa4 => self.select(cmd),
            0xfd => Response::ok(self.version.to_vec()),
            0xf8 if self.version >= since::GET_SERIAL => {
                Response::ok(self.serial.to_be_bytes().to_vec())
            }
            0x20 => self.verify(cmd),
            0x24 => self.change_reference(cmd),
            0x2c => self.reset_retry(cmd),
            0x87 => self.general_authenticate(cmd),
            0x47 => self.generate(cmd),
            0xcb => self.get_data(cmd),
            0xdb => self.put_data(cmd),
            0xf7 => self.metadata(cmd),
            0xf9 => self.attest(cmd),
            0xff => self.set_mgm_key(cmd),
            0xfe => self.import_key(cmd),
            0xfa => self.set_pin_retries(cmd),
            0xfb => self.factory_reset(cmd),
            _ => Response::status(sw::INS_NOT_SUPPORTED),
        }
    }

    fn select(&mut self, cmd: &Command) -> Response {
        if cmd.p1 != 0x04 {
            return Response::status(sw::INCORRECT_P1P2);
        }
        let aid = cmd.data.as_slice();
        if aid.len() >= 5 && aid.len() <= PIV_AID.len() && PIV_AID.starts_with(aid) {
            self.session = Session::default();
            // Application property template: AID + coexistent tag allocation authority.
            let mut apt = tlv::tlv(&[0x4f], &PIV_AID[5..10]);
            apt.extend(tlv::tlv(&[0x79], &tlv::tlv(&[0x4f], &PIV_AID[..5])));
            return Response::ok(tlv::tlv(&[0x61], &apt));
        }
        if aid.len() >= 7 && OTP_AID.starts_with(aid) {
            self.session = Session {
                otp_selected: true,
                ..Session::default()
            };
            return Response::ok(Vec::new());
        }
        Response::status(sw::NOT_FOUND)
    }

    fn verify(&mut self, cmd: &Command) -> Response {
        if cmd.p2 != 0x80 {
            return Response::status(sw::REFERENCE_NOT_FOUND);
        }
        match (cmd.p1, cmd.data.is_empty()) {
            (0xff, true) => {
                self.session.pin_verified = false;
                self.session.pin_always_token = false;
                Response::status(sw::OK)
            }
            (0x00, true) => {
                if self.pin.remaining == 0 {
                    Response::status(sw::AUTH_BLOCKED)
                } else if self.session.pin_verified {
                    Response::status(sw::OK)
                } else {
                    Response::status(sw::verify_fail(self.pin.remaining))
                }
            }
            (0x00, false) => {
                if cmd.data.len() != 8 {
                    return Response::status(sw::INCORRECT_DATA);
                }
                let status = self.pin.check(&cmd.data);
                let ok = status == sw::OK;
                self.session.pin_verified = ok;
                self.session.pin_always_token = ok;
                Response::status(status)
            }
            _ => Response::status(sw::INCORRECT_P1P2),
        }
    }

    fn change_reference(&mut self, cmd: &Command) -> Response {
        if cmd.p1 != 0 {
            return Response::status(sw::INCORRECT_P1P2);
        }
        if cmd.data.len() != 16 {
            return Response::status(sw::INCORRECT_DATA);
        }
        let new = unpad(&cmd.data[8..]).to_vec();
        let (secret, default) = match cmd.p2 {
            0x80 => (&mut self.pin, DEFAULT_PIN),
            0x81 => (&mut self.puk, DEFAULT_PUK),
            _ => return Response::status(sw::REFERENCE_NOT_FOUND),
        };
        let status = secret.check(&cmd.data[..8]);
        if status != sw::OK {
            return Response::status(status);
        }
        if !valid_new_secret(&new, 6) {
            return Response::status(sw::INCORRECT_DATA);
        }
        secret.default = new == default;
        secret.value = new;
        Response::status(sw::OK)
    }

    fn reset_retry(&mut self, cmd: &Command) -> Response {
        if cmd.p1 != 0 || cmd.p2 != 0x80 {
            return Response::status(sw::INCORRECT_P1P2);
        }
        if cmd.data.len() != 16 {
            return Response::status(sw::INCORRECT_DATA);
        }
        let status = self.puk.check(&cmd.data[..8]);
        if status != sw::OK {
            return Response::status(status);
        }
        let new = unpad(&cmd.data[8..]).to_vec();
        if !valid_new_secret(&new, 6) {
            return Response::status(sw::INCORRECT_DATA);
        }
        self.pin.default = new == DEFAULT_PIN;
        self.pin.value = new;
        self.pin.remaining = self.pin.total;
        Response::status(sw::OK)
    }

    fn general_authenticate(&mut self, cmd: &Command) -> Response {
        let Some((0x7c, inner, [])) = tlv::split_first(&cmd.data) else {
            return Response::status(sw::INCORRECT_DATA);
        };
        let Some(items) = tlv::parse_all(inner) else {
            return Response::status(sw::INCORRECT_DATA);
        };
        if cmd.p2 == 0x9b {
            return self.mgm_authenticate(cmd.p1, &items);
        }
        self.private_key_op(cmd.p1, cmd.p2, &items)
    }

    fn mgm_authenticate(&mut self, alg: u8, items: &[(u8, &[u8])]) -> Response {
        if alg != self.mgm.alg.id() {
            return Response::status(sw::INCORRECT_DATA);
        }
        let bs = self.mgm.alg.block_len();
        let witness = tlv::find(items, 0x80);
        let challenge = tlv::find(items, 0x81);
        let response = tlv::find(items, 0x82);
        let result = match (witness, challenge, response) {
            // Step 1 of mutual auth: card sends an encrypted witness.
            (Some([]), None, None) => {
                self.session.mgm_authenticated = false;
                let mut w = vec![0u8; bs];
                if crypto::random(&mut w).is_err() {
                    return Response::status(0x6f00);
                }
                let enc = self.mgm.encrypt(&w);
                self.session.mgm_pending = Some(MgmChallenge::Witness(w));
                enc.map(|e| tlv::tlv(&[0x7c], &tlv::tlv(&[0x80], &e)))
            }
            // Step 2 of mutual auth: host returns the decrypted witness and its own challenge.
            (Some(w), Some(c), None) if w.len() == bs && c.len() == bs => {
                let pending = self.session.mgm_pending.take();
                match pending {
                    Some(MgmChallenge::Witness(expected)) if ct_eq(&expected, w) => {
                        self.session.mgm_authenticated = true;
                        self.mgm
                            .encrypt(c)
                            .map(|e| tlv::tlv(&[0x7c], &tlv::tlv(&[0x82], &e)))
                    }
                    _ => return Response::status(sw::SECURITY_STATUS),
                }
            }
            // Single auth, step 1: card sends a plaintext challenge.
            (None, Some([]), None) => {
                self.session.mgm_authenticated = false;
                let mut c = vec![0u8; bs];
                if crypto::random(&mut c).is_err() {
                    return Response::status(0x6f00);
                }
                let out = tlv::tlv(&[0x7c], &tlv::tlv(&[0x81], &c));
                self.session.mgm_pending = Some(MgmChallenge::Challenge(c));
                Ok(out)
            }
            // Single auth, step 2: host returns the encrypted challenge.
            (None, None, Some(r)) if r.len() == bs => {
                let pending = self.session.mgm_pending.take();
                match pending {
                    Some(MgmChallenge::Challenge(c)) => match self.mgm.encrypt(&c) {
                        Ok(expected) if ct_eq(&expected, r) => {
                            self.session.mgm_authenticated = true;
                            Ok(Vec::new())
                        }
                        _ => return Response::status(sw::SECURITY_STATUS),
                    },
                    _ => return Response::status(sw::SECURITY_STATUS),
                }
            }
            _ => {
                self.session.mgm_pending = None;
                return Response::status(sw::INCORRECT_DATA);
            }
        };
        match result {
            Ok(data) => Response::ok(data),
            Err(_) => Response::status(0x6f00),
        }
    }

    fn private_key_op(&mut self, alg: u8, slot: u8, items: &[(u8, &[u8])]) -> Response {
        if !is_key_slot(slot) {
            return Response::status(sw::INCORRECT_P1P2);
        }
        let Some(key) = self.keys.get(&slot) else {
            return Response::status(sw::INCORRECT_DATA);
        };
        if key.key.alg().id() != alg {
            return Response::status(sw::INCORRECT_DATA);
        }
        let (Some([]), Some(digest)) = (tlv::find(items, 0x82), tlv::find(items, 0x81)) else {
            // ECDH (tag 85) and other operations are not emulated.
            return Response::status(sw::INCORRECT_DATA);
        };
        match key.pin_policy {
            PIN_ALWAYS if !self.session.pin_always_token => {
                return Response::status(sw::SECURITY_STATUS);
            }
            PIN_ONCE if !self.session.pin_verified => {
                return Response::status(sw::SECURITY_STATUS);
            }
            _ => {}
        }
        let result = key.key.sign_digest(digest);
        if key.pin_policy == PIN_ALWAYS {
            self.session.pin_always_token = false;
        }
        match result {
            Ok(sig) => Response::ok(tlv::tlv(&[0x7c], &tlv::tlv(&[0x82], &sig))),
            Err(_) => Response::status(sw::INCORRECT_DATA),
        }
    }

    fn generate(&mut self, cmd: &Command) -> Response {
        if cmd.p1 != 0 {
            return Response::status(sw::INCORRECT_P1P2);
        }
        if !is_key_slot(cmd.p2) || cmd.p2 == 0xf9 {
            return Response::status(sw::WRONG_P1P2);
        }
        if !self.session.mgm_authenticated {
            return Response::status(sw::SECURITY_STATUS);
        }
        let Some((0xac, inner, rest)) = tlv::split_first(&cmd.data) else {
            return Response::status(sw::INCORRECT_DATA);
        };
        let (Some(mut items), Some(outer)) = (tlv::parse_all(inner), tlv::parse_all(rest)) else {
            return Response::status(sw::INCORRECT_DATA);
        };
        items.extend(outer);
        let Some(&[alg_id]) = tlv::find(&items, 0x80) else {
            return Response::status(sw::INCORRECT_DATA);
        };
        let Some(alg) = KeyAlg::from_id(alg_id) else {
            // RSA (06, 07, 05, 16) and Curve25519 (E0, E1) are not emulated.
            return Response::status(sw::INCORRECT_DATA);
        };
        let pin_policy = match tlv::find(&items, 0xaa) {
            None | Some([0]) => default_pin_policy(cmd.p2),
            Some(&[p @ 1..=3]) => p,
            _ => return Response::status(sw::INCORRECT_DATA),
        };
        let touch_policy = match tlv::find(&items, 0xab) {
            None | Some([0]) => TOUCH_NEVER,
            Some(&[t @ 1..=3]) => t,
            _ => return Response::status(sw::INCORRECT_DATA),
        };
        let key = match EcKey::generate(alg) {
            Ok(k) => k,
            Err(_) => return Response::status(0x6f00),
        };
        let point = key.public_point();
        self.keys.insert(
            cmd.p2,
            SlotKey {
                key,
                pin_policy,
                touch_policy,
                origin: ORIGIN_GENERATED,
            },
        );
        Response::ok(tlv::tlv(&[0x7f, 0x49], &tlv::tlv(&[0x86], &point)))
    }

    fn import_key(&mut self, cmd: &Command) -> Response {
        if !is_key_slot(cmd.p2) {
            return Response::status(sw::WRONG_P1P2);
        }
        if !self.session.mgm_authenticated {
            return Response::status(sw::SECURITY_STATUS);
        }
        let Some(alg) = KeyAlg::from_id(cmd.p1) else {
            return Response::status(sw::INCORRECT_DATA);
        };
        let Some(items) = tlv::parse_all(&cmd.data) else {
            return Response::status(sw::INCORRECT_DATA);
        };
        let Some(key) = tlv::find(&items, 0x06).and_then(|s| EcKey::from_scalar(alg, s)) else {
            return Response::status(sw::INCORRECT_DATA);
        };
        let pin_policy = match tlv::find(&items, 0xaa) {
            None | Some([0]) => default_pin_policy(cmd.p2),
            Some(&[p @ 1..=3]) => p,
            _ => return Response::status(sw::INCORRECT_DATA),
        };
        let touch_policy = match tlv::find(&items, 0xab) {
            None | Some([0]) => TOUCH_NEVER,
            Some(&[t @ 1..=3]) => t,
            _ => return Response::status(sw::INCORRECT_DATA),
        };
        self.keys.insert(
            cmd.p2,
            SlotKey {
                key,
                pin_policy,
                touch_policy,
                origin: ORIGIN_IMPORTED,
            },
        );
        Response::status(sw::OK)
    }

    fn object_id(data: &[u8]) -> Option<(&[u8], &[u8])> {
        let (tag, id, rest) = tlv::split_first(data)?;
        if tag != 0x5c || id.is_empty() || id.len() > 3 {
            return None;
        }
        Some((id, rest))
    }

    fn get_data(&mut self, cmd: &Command) -> Response {
        if (cmd.p1, cmd.p2) != (0x3f, 0xff) {
            return Response::status(sw::INCORRECT_P1P2);
        }
        let Some((id, [])) = Self::object_id(&cmd.data) else {
            return Response::status(sw::INCORRECT_DATA);
        };
        if PIN_PROTECTED_OBJECTS.contains(&id) && !self.session.pin_verified {
            return Response::status(sw::SECURITY_STATUS);
        }
        if let Some(obj) = self.objects.get(id) {
            return Response::ok(obj.clone());
        }
        if id == [0x7e] {
            return Response::ok(DISCOVERY.to_vec());
        }
        Response::status(sw::NOT_FOUND)
    }

    fn put_data(&mut self, cmd: &Command) -> Response {
        if (cmd.p1, cmd.p2) != (0x3f, 0xff) {
            return Response::status(sw::INCORRECT_P1P2);
        }
        if !self.session.mgm_authenticated {
            return Response::status(sw::SECURITY_STATUS);
        }
        let Some((id, rest)) = Self::object_id(&cmd.data) else {
            return Response::status(sw::INCORRECT_DATA);
        };
        let id = id.to_vec();
        if id == [0x7e] {
            return Response::status(sw::SECURITY_STATUS);
        }
        let Some((0x53, value, [])) = tlv::split_first(rest) else {
            return Response::status(sw::INCORRECT_DATA);
        };
        if value.len() > MAX_OBJECT {
            return Response::status(sw::NO_SPACE);
        }
        if value.is_empty() {
            self.objects.remove(&id);
        } else {
            self.objects.insert(id, tlv::tlv(&[0x53], value));
        }
        Response::status(sw::OK)
    }

    fn metadata(&mut self, cmd: &Command) -> Response {
        if self.version < since::METADATA {
            return Response::status(sw::INS_NOT_SUPPORTED);
        }
        if cmd.p1 != 0 {
            return Response::status(sw::INCORRECT_P1P2);
        }
        let mut out = Vec::new();
        match cmd.p2 {
            0x80 | 0x81 => {
                let s = if cmd.p2 == 0x80 { &self.pin } else { &self.puk };
                out.extend(tlv::tlv(&[0x01], &[0xff]));
                out.extend(tlv::tlv(&[0x05], &[u8::from(s.default)]));
                out.extend(tlv::tlv(&[0x06], &[s.total, s.remaining]));
            }
            0x9b => {
                out.extend(tlv::tlv(&[0x01], &[self.mgm.alg.id()]));
                out.extend(tlv::tlv(&[0x02], &[0x00, self.mgm_touch]));
                out.extend(tlv::tlv(&[0x05], &[u8::from(self.mgm_default())]));
            }
            slot if is_key_slot(slot) => {
                let Some(k) = self.keys.get(&slot) else {
                    return Response::status(sw::REFERENCE_NOT_FOUND);
                };
                out.extend(tlv::tlv(&[0x01], &[k.key.alg().id()]));
                out.extend(tlv::tlv(&[0x02], &[k.pin_policy, k.touch_policy]));
                out.extend(tlv::tlv(&[0x03], &[k.origin]));
                out.extend(tlv::tlv(&[0x04], &tlv::tlv(&[0x86], &k.key.public_point())));
            }
            _ => return Response::status(sw::WRONG_P1P2),
        }
        Response::ok(out)
    }

    fn attest(&mut self, cmd: &Command) -> Response {
        if self.version < since::ATTEST {
            return Response::status(sw::INS_NOT_SUPPORTED);
        }
        if cmd.p2 != 0 || !is_key_slot(cmd.p1) {
            return Response::status(sw::INCORRECT_P1P2);
        }
        if cmd.p1 == 0xf9 {
            return Response::status(sw::INCORRECT_P1P2);
        }
        let Some(k) = self.keys.get(&cmd.p1) else {
            return Response::status(sw::NOT_FOUND);
        };
        if k.origin != ORIGIN_GENERATED {
            // A YubiKey only attests keys it generated.
            return Response::status(sw::INCORRECT_DATA);
        }
        match self.attestation.attest(
            cmd.p1,
            &k.key,
            self.version,
            self.serial,
            k.pin_policy,
            k.touch_policy,
        ) {
            Ok(der) => Response::ok(der),
            Err(_) => Response::status(0x6f00),
        }
    }

    fn set_mgm_key(&mut self, cmd: &Command) -> Response {
        if cmd.p1 != 0xff || !matches!(cmd.p2, 0xff | 0xfe) {
            return Response::status(sw::INCORRECT_P1P2);
        }
        if !self.session.mgm_authenticated {
            return Response::status(sw::SECURITY_STATUS);
        }
        let d = &cmd.data;
        if d.len() < 3 || d[1] != 0x9b || usize::from(d[2]) != d.len() - 3 {
            return Response::status(sw::INCORRECT_DATA);
        }
        let Some(alg) = MgmAlg::from_id(d[0]) else {
            return Response::status(sw::INCORRECT_DATA);
        };
        if alg != MgmAlg::Tdes && self.version < since::AES_MGM {
            return Response::status(sw::INCORRECT_DATA);
        }
        let Ok(key) = MgmKey::new(alg, d[3..].to_vec()) else {
            return Response::status(sw::INCORRECT_DATA);
        };
        self.mgm = key;
        self.mgm_touch = if cmd.p2 == 0xfe { 2 } else { TOUCH_NEVER };
        Response::status(sw::OK)
    }

    fn set_pin_retries(&mut self, cmd: &Command) -> Response {
        if !self.session.mgm_authenticated || !self.session.pin_verified {
            return Response::status(sw::SECURITY_STATUS);
        }
        if cmd.p1 == 0 || cmd.p2 == 0 || cmd.p1 > 15 || cmd.p2 > 15 {
            return Response::status(sw::INCORRECT_P1P2);
        }
        // Like a YubiKey, setting the retry counts also resets PIN and PUK to their defaults.
        self.pin = Secret::new(DEFAULT_PIN.to_vec(), cmd.p1, DEFAULT_PIN);
        self.puk = Secret::new(DEFAULT_PUK.to_vec(), cmd.p2, DEFAULT_PUK);
        self.session.pin_verified = false;
        self.session.pin_always_token = false;
        Response::status(sw::OK)
    }

    fn factory_reset(&mut self, _cmd: &Command) -> Response {
        if self.pin.remaining != 0 || self.puk.remaining != 0 {
            return Response::status(sw::CONDITIONS_NOT_SATISFIED);
        }
        let (pin_total, puk_total) = (3, 3);
        self.pin = Secret::new(DEFAULT_PIN.to_vec(), pin_total, DEFAULT_PIN);
        self.puk = Secret::new(DEFAULT_PUK.to_vec(), puk_total, DEFAULT_PUK);
        self.mgm = MgmKey {
            alg: default_mgm_alg(self.version),
            key: DEFAULT_MGM_KEY.to_vec(),
        };
        self.mgm_touch = TOUCH_NEVER;
        self.keys.retain(|slot, _| *slot == 0xf9);
        self.objects.retain(|id, _| id.as_slice() == F9_CERT_OBJECT);
        self.session = Session::default();
        Response::status(sw::OK)
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A certificate object as Yubico tools write it: `53 { 70 cert, 71 00, FE }`.
pub fn certificate_object(der: &[u8]) -> Vec<u8> {
    let mut inner = tlv::tlv(&[0x70], der);
    inner.extend(tlv::tlv(&[0x71], &[0x00]));
    inner.extend(tlv::tlv(&[0xfe], &[]));
    tlv::tlv(&[0x53], &inner)
}

#[cfg(test)]
#[path = "piv_tests.rs"]
mod tests;
