//! vsmartcard vpcd client: the 2-byte-length framed TCP protocol, with insert/remove control.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Duration;

use crate::piv::{Card, Fault};

/// vpcd control codes (one-byte payloads).
pub const CTRL_POWER_OFF: u8 = 0;
pub const CTRL_POWER_ON: u8 = 1;
pub const CTRL_RESET: u8 = 2;
pub const CTRL_GET_ATR: u8 = 4;

/// Operator commands read from stdin by the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Remove,
    Insert,
    Quit,
    /// Arm a one-shot fault (acknowledged with `armed`).
    Arm(Fault),
}

/// What ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The operator asked for card removal, or an armed `Yank` fault fired.
    Removed,
    /// The operator asked to quit (or the control channel went away after a quit).
    Quit,
    /// vpcd closed the socket (pcscd stopped).
    Disconnected,
}

/// Handles one vpcd message; returns the reply to send, if any.
pub fn handle_message(card: &mut Card, msg: &[u8]) -> Option<Vec<u8>> {
    if msg.len() == 1 {
        match msg[0] {
            CTRL_POWER_OFF | CTRL_POWER_ON | CTRL_RESET => {
                card.reset();
                None
            }
            CTRL_GET_ATR => Some(card.atr().to_vec()),
            _ => None,
        }
    } else if msg.is_empty() {
        None
    } else {
        Some(card.process(msg))
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 2);
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Serves `card` on an established vpcd connection until vpcd disconnects or a control
/// command arrives. Polls `control` every 100 ms; `say` prints acknowledgements.
pub fn serve(
    stream: &mut TcpStream,
    card: &mut Card,
    control: &Receiver<Control>,
    say: &dyn Fn(&str),
) -> std::io::Result<Ended> {
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match control.try_recv() {
            Ok(Control::Remove) => return Ok(Ended::Removed),
            Ok(Control::Quit) => return Ok(Ended::Quit),
            Ok(Control::Arm(fault)) => {
                card.arm(fault);
                say("armed");
            }
            Ok(Control::Insert) | Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => {}
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(Ended::Disconnected),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return Ok(Ended::Disconnected);
            }
            Err(e) => return Err(e),
        }
        while buf.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
            if buf.len() < 2 + len {
                break;
            }
            let msg: Vec<u8> = buf.drain(..2 + len).skip(2).collect();
            if msg.len() > 1 && card.take_yank(&msg) {
                return Ok(Ended::Removed);
            }
            if let Some(reply) = handle_message(card, &msg) {
                stream.write_all(&frame(&reply))?;
            }
        }
    }
}
