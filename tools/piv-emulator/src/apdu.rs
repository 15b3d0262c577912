//! ISO 7816-4 transport: command APDU parsing, status words, command chaining and `61xx` + GET RESPONSE.

/// Status words the applet answers with.
pub mod sw {
    pub const OK: u16 = 0x9000;
    pub const WRONG_LENGTH: u16 = 0x6700;
    pub const SECURITY_STATUS: u16 = 0x6982;
    pub const AUTH_BLOCKED: u16 = 0x6983;
    pub const CONDITIONS_NOT_SATISFIED: u16 = 0x6985;
    pub const INCORRECT_DATA: u16 = 0x6a80;
    pub const FUNCTION_NOT_SUPPORTED: u16 = 0x6a81;
    pub const NOT_FOUND: u16 = 0x6a82;
    pub const NO_SPACE: u16 = 0x6a84;
    pub const INCORRECT_P1P2: u16 = 0x6a86;
    pub const REFERENCE_NOT_FOUND: u16 = 0x6a88;
    pub const WRONG_P1P2: u16 = 0x6b00;
    pub const INS_NOT_SUPPORTED: u16 = 0x6d00;
    pub const CLA_NOT_SUPPORTED: u16 = 0x6e00;

    /// `63Cx`: verification failed, `tries` attempts left.
    pub fn verify_fail(tries: u8) -> u16 {
        0x63c0 | u16::from(tries.min(15))
    }
}

/// A parsed command APDU (short or extended length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub cla: u8,
    pub ins: u8,
    pub p1: u8,
    pub p2: u8,
    pub data: Vec<u8>,
    /// Expected response length; `Some(0)` in a short APDU means 256.
    pub le: Option<usize>,
}

impl Command {
    /// Parses a raw command APDU; `None` when the length bytes do not add up.
    pub fn parse(raw: &[u8]) -> Option<Command> {
        let (&cla, rest) = raw.split_first()?;
        let (&ins, rest) = rest.split_first()?;
        let (&p1, rest) = rest.split_first()?;
        let (&p2, body) = rest.split_first()?;
        let mut cmd = Command {
            cla,
            ins,
            p1,
            p2,
            data: Vec::new(),
            le: None,
        };
        match body.len() {
            0 => {}
            1 => cmd.le = Some(usize::from(body[0])),
            _ if body[0] == 0 && body.len() >= 3 => {
                // Extended length: 00 Lc1 Lc2 data [Le1 Le2] or 00 Le1 Le2.
                let n = (usize::from(body[1]) << 8) | usize::from(body[2]);
                if body.len() == 3 {
                    cmd.le = Some(n);
                } else {
                    let data = body.get(3..3 + n)?;
                    cmd.data = data.to_vec();
                    match body.len() - 3 - n {
                        0 => {}
                        2 => {
                            cmd.le =
                                Some((usize::from(body[3 + n]) << 8) | usize::from(body[4 + n]))
                        }
                        _ => return None,
                    }
                }
            }
            _ => {
                let n = usize::from(body[0]);
                let data = body.get(1..1 + n)?;
                cmd.data = data.to_vec();
                match body.len() - 1 - n {
                    0 => {}
                    1 => cmd.le = Some(usize::from(body[1 + n])),
                    _ => return None,
                }
            }
        }
        Some(cmd)
    }
}

/// A response: data plus status word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub data: Vec<u8>,
    pub sw: u16,
}

impl Response {
    pub fn ok(data: Vec<u8>) -> Response {
        Response { data, sw: sw::OK }
    }

    pub fn status(sw: u16) -> Response {
        Response {
            data: Vec::new(),
            sw,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.data.clone();
        out.extend_from_slice(&self.sw.to_be_bytes());
        out
    }
}

/// The most response data one short APDU answer carries.
pub const MAX_CHUNK: usize = 256;

/// Transport state of one card session: a command chain being collected and response data
/// still waiting for GET RESPONSE.
#[derive(Debug, Default)]
pub struct Transport {
    chain: Option<(u8, u8, u8, Vec<u8>)>,
    pending: Vec<u8>,
    pending_sw: u16,
}

impl Transport {
    /// Drops any half-received chain and unread response (card reset or removal).
    pub fn reset(&mut self) {
        *self = Transport::default();
    }

    /// Handles one raw command APDU; `applet` is called with each complete (de-chained) command.
    pub fn process<F>(&mut self, raw: &[u8], applet: F) -> Vec<u8>
    where
        F: FnOnce(&Command) -> Response,
    {
        let Some(mut cmd) = Command::parse(raw) else {
            self.reset();
            return Response::status(sw::WRONG_LENGTH).to_bytes();
        };
        if cmd.cla & !0x10 != 0 {
            self.reset();
            return Response::status(sw::CLA_NOT_SUPPORTED).to_bytes();
        }
        if cmd.ins == 0xc0 && cmd.cla == 0 {
            return self.get_response(cmd.le);
        }
        self.pending.clear();
        if cmd.cla & 0x10 != 0 {
            match &mut self.chain {
                Some((ins, p1, p2, buf)) if (*ins, *p1, *p2) == (cmd.ins, cmd.p1, cmd.p2) => {
                    buf.extend_from_slice(&cmd.data);
                }
                _ => self.chain = Some((cmd.ins, cmd.p1, cmd.p2, cmd.data.clone())),
            }
            return Response::status(sw::OK).to_bytes();
        }
        if let Some((ins, p1, p2, mut buf)) = self.chain.take() {
            if (ins, p1, p2) != (cmd.ins, cmd.p1, cmd.p2) {
                return Response::status(sw::CONDITIONS_NOT_SATISFIED).to_bytes();
            }
            buf.extend_from_slice(&cmd.data);
            cmd.data = buf;
        }
        let response = applet(&cmd);
        if response.data.len() <= MAX_CHUNK {
            return response.to_bytes();
        }
        self.pending = response.data;
        self.pending_sw = response.sw;
        self.get_response(cmd.le)
    }

    fn get_response(&mut self, le: Option<usize>) -> Vec<u8> {
        if self.pending.is_empty() {
            return Response::status(sw::CONDITIONS_NOT_SATISFIED).to_bytes();
        }
        let chunk = match le {
            Some(n) if n > 0 && n < MAX_CHUNK => n,
            _ => MAX_CHUNK,
        };
        let take = chunk.min(self.pending.len());
        let data: Vec<u8> = self.pending.drain(..take).collect();
        let sw = if self.pending.is_empty() {
            self.pending_sw
        } else {
            let rest = self.pending.len();
            0x6100 | if rest > 0xff { 0 } else { rest as u16 }
        };
        Response { data, sw }.to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cases() {
        let c = Command::parse(&[0, 0xfd, 0, 0, 0]).unwrap();
        assert_eq!((c.ins, c.le, c.data.len()), (0xfd, Some(0), 0));
        let c = Command::parse(&[0, 0xa4, 4, 0, 5, 0xa0, 0, 0, 3, 8]).unwrap();
        assert_eq!((c.data.len(), c.le), (5, None));
        let c = Command::parse(&[0, 0xa4, 4, 0, 5, 0xa0, 0, 0, 3, 8, 0]).unwrap();
        assert_eq!(c.le, Some(0));
        assert!(Command::parse(&[0, 0xa4, 4, 0, 5, 0xa0]).is_none());
        assert!(Command::parse(&[0, 0xa4, 4]).is_none());
        let c = Command::parse(
            &[0, 0xdb, 0x3f, 0xff, 0, 1, 0, 0xaa]
                .iter()
                .chain([0u8; 255].iter())
                .copied()
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(c.data.len(), 256);
    }

    #[test]
    fn chaining_accumulates() {
        let mut t = Transport::default();
        let mut first = vec![0x10, 0xdb, 0x3f, 0xff, 3];
        first.extend_from_slice(&[1, 2, 3]);
        assert_eq!(t.process(&first, |_| unreachable!()), vec![0x90, 0]);
        let last = [0x00, 0xdb, 0x3f, 0xff, 2, 4, 5];
        let out = t.process(&last, |c| {
            assert_eq!(c.data, vec![1, 2, 3, 4, 5]);
            Response::ok(vec![])
        });
        assert_eq!(out, vec![0x90, 0]);
        // A chain interrupted by another instruction fails.
        t.process(&first, |_| unreachable!());
        let other = [0x00, 0xcb, 0x3f, 0xff, 1, 9];
        assert_eq!(t.process(&other, |_| unreachable!()), vec![0x69, 0x85]);
    }

    #[test]
    fn long_responses_use_get_response() {
        let mut t = Transport::default();
        let body: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
        let first = t.process(&[0, 0xcb, 0x3f, 0xff, 0], |_| Response::ok(body.clone()));
        assert_eq!(first.len(), 258);
        assert_eq!(&first[256..], &[0x61, 0x00]);
        let second = t.process(&[0, 0xc0, 0, 0, 0], |_| unreachable!());
        assert_eq!(second.len(), 258);
        assert_eq!(&second[256..], &[0x61, 88]);
        let third = t.process(&[0, 0xc0, 0, 0, 0], |_| unreachable!());
        assert_eq!(third.len(), 90);
        assert_eq!(&third[88..], &[0x90, 0x00]);
        let mut all = first[..256].to_vec();
        all.extend_from_slice(&second[..256]);
        all.extend_from_slice(&third[..88]);
        assert_eq!(all, body);
        // Nothing left: GET RESPONSE fails.
        assert_eq!(
            t.process(&[0, 0xc0, 0, 0, 0], |_| unreachable!()),
            vec![0x69, 0x85]
        );
    }

    #[test]
    fn bad_class_and_length() {
        let mut t = Transport::default();
        assert_eq!(
            t.process(&[0x80, 0xfd, 0, 0, 0], |_| unreachable!()),
            vec![0x6e, 0]
        );
        assert_eq!(t.process(&[0, 0xfd], |_| unreachable!()), vec![0x67, 0]);
    }
}
