//! One guest TCP connection relayed to a host socket.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, RecvError, State};

use crate::bandwidth::TokenBucket;
use crate::stats::Counters;

/// The token buckets shared by every connection of one sandbox.
pub(crate) struct Buckets {
    pub(crate) to_host: TokenBucket,
    pub(crate) to_guest: TokenBucket,
    /// A relay stopped this turn because the bucket ran dry.
    pub(crate) to_host_starved: bool,
    pub(crate) to_guest_starved: bool,
}

pub(crate) enum ConnectOutcome {
    Pending,
    Connected,
    Failed(io::Error),
}

/// The host side of a guest connection, and where its bytes stand.
///
/// Bytes are never copied into a buffer of the relay's own: they go from
/// the smoltcp socket's receive buffer straight to the host socket, and from
/// the host socket straight into the smoltcp socket's send buffer. Those two
/// bounded buffers are all there is, so a full one stops the reading side
/// (the guest's window closes, or the host socket is not read and its
/// kernel window closes).
pub(crate) struct Connection {
    pub(crate) token: Token,
    host: Option<TcpStream>,
    /// The guest's SYN, held while the host connect is under way.
    held_syn: Option<Vec<u8>>,
    socket: Option<SocketHandle>,
    /// mio reports readiness once per change (edge-triggered), so whether
    /// the host socket may have more to read or room to write is kept here
    /// until a read or write says otherwise.
    host_readable: bool,
    host_writable: bool,
    /// The host sent its FIN; the guest gets one after the bytes before it.
    host_read_closed: bool,
    /// The guest sent its FIN and the host socket was shut down for writing.
    host_write_closed: bool,
}

impl Connection {
    /// Starts a non-blocking connect to `destination`, holding the guest's `syn`.
    pub(crate) fn connect(
        destination: SocketAddrV4,
        syn: Vec<u8>,
        registry: &Registry,
        token: Token,
    ) -> io::Result<Connection> {
        let mut host = TcpStream::connect(SocketAddr::V4(destination))?;
        // The guest's own stack already decided when to send; delaying again
        // on the host side only adds latency.
        host.set_nodelay(true)?;
        registry.register(&mut host, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(Connection {
            token,
            host: Some(host),
            held_syn: Some(syn),
            socket: None,
            host_readable: false,
            host_writable: false,
            host_read_closed: false,
            host_write_closed: false,
        })
    }

    pub(crate) fn is_connecting(&self) -> bool {
        self.held_syn.is_some()
    }

    pub(crate) fn socket(&self) -> Option<SocketHandle> {
        self.socket
    }

    pub(crate) fn on_event(&mut self, event: &Event) {
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.host_readable = true;
        }
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            self.host_writable = true;
        }
    }

    /// Whether the host connect finished; only meaningful after an event.
    pub(crate) fn connect_outcome(&mut self) -> ConnectOutcome {
        let Some(host) = &self.host else {
            return ConnectOutcome::Failed(io::ErrorKind::NotConnected.into());
        };
        if !self.host_writable {
            return ConnectOutcome::Pending;
        }
        match host.take_error() {
            Ok(Some(error)) | Err(error) => ConnectOutcome::Failed(error),
            Ok(None) => match host.peer_addr() {
                Ok(_) => ConnectOutcome::Connected,
                // A wakeup before the handshake finished (mio documents
                // these); wait for the next writable event.
                Err(error) if error.kind() == io::ErrorKind::NotConnected => {
                    self.host_writable = false;
                    ConnectOutcome::Pending
                }
                Err(error) => ConnectOutcome::Failed(error),
            },
        }
    }

    pub(crate) fn take_held_syn(&mut self) -> Option<Vec<u8>> {
        self.held_syn.take()
    }

    /// The host connect is done and `socket` now answers the guest.
    pub(crate) fn attach(&mut self, socket: SocketHandle) {
        self.socket = Some(socket);
        // The host may have sent bytes (a server banner) before the socket
        // existed; their readiness edge is gone, so look without one.
        self.host_readable = true;
    }

    /// Moves bytes both ways as far as buffers, the host socket and the
    /// buckets allow, and passes each side's FIN and errors to the other.
    pub(crate) fn relay(
        &mut self,
        socket: &mut tcp::Socket,
        buckets: &mut Buckets,
        now: Instant,
        counters: &Counters,
        registry: &Registry,
    ) {
        // Out of `self` for the turn, so both halves can borrow it alongside `self`.
        let Some(mut host) = self.host.take() else {
            return;
        };
        let failure = self
            .relay_to_host(&mut host, socket, buckets, now, counters)
            .and_then(|()| self.relay_to_guest(&mut host, socket, buckets, now, counters));
        self.host = Some(host);
        if let Err(error) = failure {
            tracing::debug!(%error, "host side of a guest connection failed; resetting the guest's");
            socket.abort();
            self.close_host(registry, true);
        }
    }

    fn relay_to_host(
        &mut self,
        host: &mut TcpStream,
        socket: &mut tcp::Socket,
        buckets: &mut Buckets,
        now: Instant,
        counters: &Counters,
    ) -> io::Result<()> {
        while self.host_writable && !self.host_write_closed && socket.can_recv() {
            let budget = buckets.to_host.available(now);
            if budget == 0 {
                buckets.to_host_starved = true;
                break;
            }
            let written = socket.recv(|bytes| {
                let chunk = &bytes[..bytes.len().min(budget)];
                match host.write(chunk) {
                    Ok(written) => (written, Ok(written)),
                    Err(error) => (0, Err(error)),
                }
            });
            match written {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(written)) => {
                    buckets.to_host.consume(written);
                    Counters::add(&counters.bytes_to_host, written as u64);
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.host_writable = false;
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(error)) => return Err(error),
                Err(_) => break,
            }
        }
        // Finished only once the guest's FIN came and every byte before it
        // was taken, so the host sees the same stream end.
        if !self.host_write_closed && matches!(socket.recv(|_| (0, ())), Err(RecvError::Finished)) {
            host.shutdown(Shutdown::Write)?;
            self.host_write_closed = true;
        }
        Ok(())
    }

    fn relay_to_guest(
        &mut self,
        host: &mut TcpStream,
        socket: &mut tcp::Socket,
        buckets: &mut Buckets,
        now: Instant,
        counters: &Counters,
    ) -> io::Result<()> {
        while self.host_readable && !self.host_read_closed && socket.can_send() {
            let budget = buckets.to_guest.available(now);
            if budget == 0 {
                buckets.to_guest_starved = true;
                break;
            }
            let read = socket.send(|space| {
                let length = space.len().min(budget);
                if length == 0 {
                    // A read into no room would look like the host's EOF.
                    return (0, Ok(None));
                }
                match host.read(&mut space[..length]) {
                    Ok(read) => (read, Ok(Some(read))),
                    Err(error) => (0, Err(error)),
                }
            });
            match read {
                Ok(Ok(None)) | Err(_) => break,
                Ok(Ok(Some(0))) => {
                    // The FIN follows the bytes already in the send buffer.
                    self.host_read_closed = true;
                    socket.close();
                }
                Ok(Ok(Some(read))) => {
                    buckets.to_guest.consume(read);
                    Counters::add(&counters.bytes_to_guest, read as u64);
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.host_readable = false;
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(error)) => return Err(error),
            }
        }
        Ok(())
    }

    /// Closes the host socket once the guest's side is done; true when the
    /// connection can be forgotten (its smoltcp socket removed).
    pub(crate) fn settle(&mut self, socket: &tcp::Socket, registry: &Registry) -> bool {
        match socket.state() {
            State::Closed => {
                if self.host.is_some() {
                    // Closed without both FINs relayed: the guest reset the
                    // connection or stopped answering, so the host's is reset too.
                    let both_finished = self.host_read_closed && self.host_write_closed;
                    self.close_host(registry, !both_finished);
                }
                // A socket aborted here still owes the guest its RST.
                socket.remote_endpoint().is_none()
            }
            // Both FINs were exchanged; what the guest sent last may still
            // be on its way to the host.
            State::TimeWait if self.host.is_some() && socket.can_recv() => false,
            State::TimeWait => {
                self.close_host(registry, false);
                true
            }
            _ => false,
        }
    }

    /// Closes the host socket: with a RST if `reset`, else with a FIN.
    pub(crate) fn close_host(&mut self, registry: &Registry, reset: bool) {
        let Some(mut host) = self.host.take() else {
            return;
        };
        if let Err(error) = registry.deregister(&mut host) {
            tracing::debug!(%error, "could not stop watching a host socket");
        }
        if reset {
            // A zero linger makes close() send a RST instead of a FIN.
            if let Err(error) = socket2::SockRef::from(&host).set_linger(Some(Duration::ZERO)) {
                tracing::debug!(%error, "could not arrange a reset of a host socket");
            }
        }
    }
}
