//! `piv-emulator` binary: CLI, stdin control lines (remove/insert/quit) and the vpcd connection loop.

use std::io::{BufRead, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use clap::Parser;
use piv_emulator::crypto::{MgmAlg, MgmKey};
use piv_emulator::piv::{DEFAULT_MGM_KEY, Fault, default_mgm_alg};
use piv_emulator::vpcd::{Control, Ended, serve};
use piv_emulator::{Card, CardConfig, attest::Attestation};

/// Software YubiKey PIV card served to pcscd through vsmartcard's vpcd. Test use only:
/// secrets are given on the command line.
#[derive(Parser, Debug)]
#[command(name = "piv-emulator", disable_version_flag = true)]
struct Cli {
    /// vpcd TCP port (35963 is the first vpcd reader, 35964 the second).
    #[arg(long, default_value_t = 35963)]
    vpcd_port: u16,
    /// vpcd host.
    #[arg(long, default_value = "127.0.0.1")]
    vpcd_host: String,
    /// Card serial number (decimal).
    #[arg(long, default_value_t = 12_345_678)]
    serial: u32,
    /// Firmware version reported by GET VERSION (major must be 4 or 5).
    #[arg(long, default_value = "5.7.1")]
    version: String,
    /// Management key algorithm: 3des, aes128, aes192, aes256 (default: what a new YubiKey
    /// of --version ships with: aes192 from 5.7, 3des before).
    #[arg(long)]
    mgm_alg: Option<String>,
    /// Management key in hex (default: Yubico's factory key 0102…08 ×3).
    #[arg(long)]
    mgm_key: Option<String>,
    /// PIN (6–8 characters).
    #[arg(long, default_value = "123456")]
    pin: String,
    /// PUK (6–8 characters).
    #[arg(long, default_value = "12345678")]
    puk: String,
    /// PIN retry count.
    #[arg(long, default_value_t = 3)]
    pin_retries: u8,
    /// PUK retry count.
    #[arg(long, default_value_t = 3)]
    puk_retries: u8,
    /// Directory for the attestation root CA (attestation-root.pem / .key), created if missing.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

fn parse_version(s: &str) -> Result<[u8; 3], String> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() != 3 {
        return Err(format!("version {s:?} must look like 5.7.1"));
    }
    let mut out = [0u8; 3];
    for (o, p) in out.iter_mut().zip(parts) {
        *o = p
            .parse()
            .map_err(|_| format!("bad version component {p:?}"))?;
    }
    Ok(out)
}

fn config(cli: &Cli) -> Result<CardConfig, String> {
    let version = parse_version(&cli.version)?;
    let alg = match &cli.mgm_alg {
        Some(name) => MgmAlg::parse(name).ok_or_else(|| format!("unknown --mgm-alg {name:?}"))?,
        None => default_mgm_alg(version),
    };
    let key = match &cli.mgm_key {
        Some(h) => hex::decode(h.trim()).map_err(|e| format!("--mgm-key: {e}"))?,
        None if alg.key_len() == DEFAULT_MGM_KEY.len() => DEFAULT_MGM_KEY.to_vec(),
        None => return Err(format!("--mgm-key is required with --mgm-alg {alg:?}")),
    };
    Ok(CardConfig {
        serial: cli.serial,
        version,
        mgm_key: MgmKey::new(alg, key)?,
        pin: cli.pin.as_bytes().to_vec(),
        puk: cli.puk.as_bytes().to_vec(),
        pin_retries: cli.pin_retries,
        puk_retries: cli.puk_retries,
    })
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn hex_u8(s: &str) -> Option<u8> {
    u8::from_str_radix(s, 16).ok()
}

/// Parses `fail <INS> <SW>` and `yank <INS>` (hex), the fault-injection control lines.
fn parse_fault(line: &str) -> Option<Fault> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["fail", ins, sw] => Some(Fault::Status {
            ins: hex_u8(ins)?,
            sw: u16::from_str_radix(sw, 16).ok()?,
        }),
        ["yank", ins] => Some(Fault::Yank { ins: hex_u8(ins)? }),
        _ => None,
    }
}

/// Reads control lines from stdin. EOF is not "quit": a background emulator with stdin from
/// /dev/null keeps running until killed.
fn spawn_stdin_reader() -> Receiver<Control> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            let cmd = match line.trim() {
                "remove" => Control::Remove,
                "insert" => Control::Insert,
                "quit" => Control::Quit,
                "" => continue,
                other => match parse_fault(other) {
                    Some(f) => Control::Arm(f),
                    None => {
                        eprintln!(
                            "piv-emulator: unknown control line {other:?} (remove|insert|quit|fail INS SW|yank INS)"
                        );
                        continue;
                    }
                },
            };
            if tx.send(cmd).is_err() {
                break;
            }
        }
    });
    rx
}

/// Connects to vpcd, retrying every 200 ms; a `quit` while waiting ends the program.
fn connect(addr: &str, control: &Receiver<Control>) -> Option<TcpStream> {
    let mut warned = false;
    loop {
        if let Ok(Control::Quit) = control.try_recv() {
            return None;
        }
        match TcpStream::connect(addr) {
            Ok(s) => return Some(s),
            Err(e) => {
                if !warned {
                    eprintln!("piv-emulator: waiting for vpcd at {addr}: {e}");
                    warned = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    let cfg = config(cli)?;
    let attestation = Attestation::load_or_create(cli.state_dir.as_deref())?;
    let mut card = Card::new(cfg, attestation)?;
    let control = spawn_stdin_reader();
    let addr = format!("{}:{}", cli.vpcd_host, cli.vpcd_port);
    loop {
        let Some(mut stream) = connect(&addr, &control) else {
            return Ok(());
        };
        card.reset();
        say("ready");
        let ended =
            serve(&mut stream, &mut card, &control, &say).map_err(|e| format!("vpcd: {e}"))?;
        let _ = stream.shutdown(std::net::Shutdown::Both);
        drop(stream);
        card.reset();
        match ended {
            Ended::Quit => return Ok(()),
            Ended::Disconnected => {
                eprintln!("piv-emulator: vpcd closed the connection; reconnecting");
            }
            Ended::Removed => {
                let removed_at = std::time::Instant::now();
                say("removed");
                // Wait for insert (or quit); faults can be armed meanwhile, remove is a no-op.
                loop {
                    match control.recv() {
                        Ok(Control::Insert) => break,
                        Ok(Control::Quit) | Err(_) => return Ok(()),
                        Ok(Control::Arm(fault)) => {
                            card.arm(fault);
                            say("armed");
                        }
                        Ok(Control::Remove) => {}
                    }
                }
                // vpcd notices a closed connection only when pcscd next polls the
                // reader (every ~400 ms). Reconnecting sooner lands in vpcd's listen
                // backlog while it still believes the old card is present, and the
                // new card is never seen. A physical re-insert takes longer anyway.
                let min_gap = std::time::Duration::from_millis(1500);
                if let Some(rest) = min_gap.checked_sub(removed_at.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("piv-emulator: {e}");
            ExitCode::FAILURE
        }
    }
}
