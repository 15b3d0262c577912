//! Fixtures for the YubiKey tests: the project's PIV card emulator
//! (tools/piv-emulator) attached to pcscd through vsmartcard-vpcd.
//! `scripts/test.sh` builds the emulator and starts pcscd; without them
//! these tests fail with a message saying so.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

/// Yubico's factory management key (valid as 3DES and as AES-192).
pub const DEFAULT_MGM_KEY: &str = "010203040506070801020304050607080102030405060708";
pub const PIN: &str = "123456";
pub const PUK: &str = "12345678";
/// vpcd's two virtual readers.
pub const READER_PORTS: [u16; 2] = [35963, 35964];

/// There is one pcscd and one pair of virtual readers per machine: tests
/// that use a card run one at a time (nextest's `pcsc` test group does the
/// same across processes, see .config/nextest.toml).
pub static CARD_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn emulator_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let bin = target.join("debug").join("piv-emulator");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/test.sh (it builds the PIV emulator and starts pcscd + vpcd)",
        bin.display()
    );
    bin
}

/// An emulated YubiKey in one of vpcd's readers; pulled out and killed when dropped.
pub struct Card {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    pub serial: u32,
    pub state_dir: tempfile::TempDir,
}

pub struct CardOptions<'a> {
    pub port: u16,
    pub serial: u32,
    pub mgm_alg: &'a str,
    pub mgm_key: &'a str,
    pub version: &'a str,
}

impl Default for CardOptions<'_> {
    fn default() -> Self {
        Self {
            port: READER_PORTS[0],
            serial: 15_000_000 + (std::process::id() % 1_000_000),
            mgm_alg: "aes192",
            mgm_key: DEFAULT_MGM_KEY,
            version: "5.7.1",
        }
    }
}

impl Card {
    pub fn start(o: CardOptions<'_>) -> Card {
        let state_dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(emulator_bin())
            .args([
                "--vpcd-port",
                &o.port.to_string(),
                "--serial",
                &o.serial.to_string(),
            ])
            .args([
                "--version",
                o.version,
                "--mgm-alg",
                o.mgm_alg,
                "--mgm-key",
                o.mgm_key,
            ])
            .args(["--pin", PIN, "--puk", PUK, "--state-dir"])
            .arg(state_dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line.trim().to_string());
            }
        });
        let mut card = Card {
            child,
            stdin,
            lines,
            serial: o.serial,
            state_dir,
        };
        card.expect("ready");
        card.wait_visible();
        card
    }

    fn expect(&mut self, word: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) if l == word => return,
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(e) => panic!(
                    "emulator exited before `{word}`: {e} (is pcscd with vsmartcard-vpcd running? scripts/test.sh starts it)"
                ),
            }
        }
        panic!(
            "emulator did not say `{word}` within 20 s (is pcscd with vsmartcard-vpcd running? scripts/test.sh starts it)"
        );
    }

    /// Waits until PC/SC (pcscd polls its readers) shows the card. pcscd
    /// now and then misses a card that vpcd reports present (seen on a
    /// loaded CI machine: "Card: No" in both readers for 20 s after the
    /// emulator said `ready`): after 8 s and again after 16 s the card is
    /// pulled out and put back, which pcscd notices. Still invisible after
    /// 30 s is a failure.
    pub fn wait_visible(&mut self) {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(30);
        let mut reinserted = 0u32;
        loop {
            if reinserted < 2
                && start.elapsed() > Duration::from_secs(8 * u64::from(reinserted + 1))
            {
                reinserted += 1;
                eprintln!(
                    "piv: card {} not visible over PC/SC yet; pulling it out and putting it back",
                    self.serial
                );
                writeln!(self.stdin, "remove").unwrap();
                self.stdin.flush().unwrap();
                self.expect("removed");
                writeln!(self.stdin, "insert").unwrap();
                self.stdin.flush().unwrap();
                self.expect("ready");
            }
            match yubikey::YubiKey::open_by_serial(yubikey::Serial(self.serial)) {
                Ok(yk) => {
                    drop(yk);
                    return;
                }
                Err(e) if Instant::now() > deadline => {
                    let l = Command::new("opensc-tool")
                        .arg("-l")
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                        .unwrap_or_default();
                    let st = Command::new("yubico-piv-tool")
                        .args(["-r", "", "-a", "status"])
                        .output()
                        .map(|o| {
                            String::from_utf8_lossy(&o.stdout).to_string()
                                + &String::from_utf8_lossy(&o.stderr)
                        })
                        .unwrap_or_default();
                    panic!(
                        "card {} never became visible over PC/SC: {e}\nopensc-tool -l:\n{l}\nyubico-piv-tool:\n{st}",
                        self.serial
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Pulls the card out of the reader.
    pub fn remove(&mut self) {
        writeln!(self.stdin, "remove").unwrap();
        self.stdin.flush().unwrap();
        self.expect("removed");
    }

    /// Puts it back (freshly powered: PIN and management authentication cleared).
    pub fn insert(&mut self) {
        writeln!(self.stdin, "insert").unwrap();
        self.stdin.flush().unwrap();
        self.expect("ready");
        self.wait_visible();
    }

    /// Makes the next command with instruction `ins` fail with status word `sw` (a card error).
    pub fn fail_next(&mut self, ins: u8, sw: u16) {
        writeln!(self.stdin, "fail {ins:02X} {sw:04X}").unwrap();
        self.stdin.flush().unwrap();
        self.expect("armed");
    }

    /// Makes the card drop out of the reader, unanswered, at the next command with
    /// instruction `ins` (pulled out mid-command). Follow with [`Card::wait_removed`].
    pub fn yank_at(&mut self, ins: u8) {
        writeln!(self.stdin, "yank {ins:02X}").unwrap();
        self.stdin.flush().unwrap();
        self.expect("armed");
    }

    /// Waits until an armed yank has fired.
    pub fn wait_removed(&mut self) {
        self.expect("removed");
    }

    /// Runs Yubico's `yubico-piv-tool` against the card (the only one in the readers).
    pub fn piv_tool(&self, args: &[&str]) -> String {
        let out = Command::new("yubico-piv-tool")
            .args(["-r", ""])
            .args(args)
            .output()
            .expect("yubico-piv-tool missing: run scripts/test.sh");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "yubico-piv-tool {args:?}: {text}");
        text
    }

    /// "PIN tries left" as yubico-piv-tool reports it (its query does not use up a try).
    pub fn pin_tries_left(&self) -> u8 {
        let status = self.piv_tool(&["-a", "status"]);
        status
            .lines()
            .find_map(|l| l.strip_prefix("PIN tries left:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no PIN tries in: {status}"))
    }

    pub fn attestation_root(&self) -> PathBuf {
        self.state_dir.path().join("attestation-root.pem")
    }
}

impl Drop for Card {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
