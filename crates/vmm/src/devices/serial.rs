//! The 16550 UART at COM1 (0x3f8, IRQ 4): the guest kernel's console.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::snapshot::state::SerialState;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const COM1_PORTS: std::ops::Range<u16> = COM1_BASE..COM1_BASE + 8;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot create the serial interrupt eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("serial state from the snapshot is invalid: {0}")]
    State(String),
}

/// Raises the UART's interrupt line through a KVM irqfd.
pub struct IrqLine(EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialConsole {
    uart: Serial<IrqLine, NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    pub fn new(out: Box<dyn Write + Send>) -> Result<Self, SerialError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        Ok(Self {
            uart: Serial::new(IrqLine(irq), out),
        })
    }

    pub fn from_state(state: &SerialState, out: Box<dyn Write + Send>) -> Result<Self, SerialError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart =
            Serial::from_state(&s, IrqLine(irq), NoEvents, out).map_err(|e| SerialError::State(format!("{e:?}")))?;
        Ok(Self { uart })
    }

    pub fn state(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    pub fn irq(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    pub fn write(&mut self, port: u16, value: u8) {
        // A failed console write (full disk, closed pipe) must not stop the guest.
        let _ = self.uart.write((port - COM1_BASE) as u8, value);
    }

    pub fn read(&mut self, port: u16) -> u8 {
        self.uart.read((port - COM1_BASE) as u8)
    }

    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_reach_the_output_and_state_round_trips() {
        let out = Shared::default();
        let mut console = SerialConsole::new(Box::new(out.clone())).unwrap();
        console.write(COM1_BASE + 3, 0x03); // 8N1
        console.write(COM1_BASE + 7, 0x5a); // scratch register
        for b in b"hi" {
            console.write(COM1_BASE, *b);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi");
        let state = console.state();
        assert_eq!(state.scratch, 0x5a);
        let mut restored = SerialConsole::from_state(&state, Box::new(std::io::sink())).unwrap();
        assert_eq!(restored.read(COM1_BASE + 7), 0x5a);
        assert_eq!(restored.read(COM1_BASE + 3), 0x03);
    }

    #[test]
    fn oversized_fifo_in_state_is_an_error() {
        let state = SerialState {
            in_buffer: vec![0; 1 << 16],
            ..Default::default()
        };
        assert!(SerialConsole::from_state(&state, Box::new(std::io::sink())).is_err());
    }
}
