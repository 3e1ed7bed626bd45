//! The backend thread with a guest link like the VMM's: frames in memory,
//! a descriptor that signals them.

// The test link is test code too; clippy only exempts #[test] functions.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{policy_config, Guest};
use smoltcp::socket::tcp::State;
use zeroboot_net::{Backend, GuestLink};

#[derive(Default)]
struct Queues {
    from_guest: VecDeque<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
}

/// The backend's end: the guest side writes a byte to `wake` after sending.
struct TestLink {
    queues: Arc<Mutex<Queues>>,
    wake: UnixStream,
}

impl GuestLink for TestLink {
    fn drain_sent(&mut self, f: &mut dyn FnMut(&[u8])) {
        let frames: Vec<Vec<u8>> = self.queues.lock().unwrap().from_guest.drain(..).collect();
        for frame in frames {
            f(&frame);
        }
    }

    fn deliver(&mut self, frame: &[u8]) -> bool {
        self.queues.lock().unwrap().to_guest.push_back(frame.to_vec());
        true
    }

    fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    fn clear_wake(&mut self) {
        let mut buffer = [0; 64];
        while matches!(self.wake.read(&mut buffer), Ok(read) if read > 0) {}
    }
}

#[test]
fn spawn_relays_and_drop_joins_and_closes_host_sockets() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let std::net::SocketAddr::V4(address) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let queues = Arc::new(Mutex::new(Queues::default()));
    let (backend_end, mut guest_end) = UnixStream::pair().unwrap();
    backend_end.set_nonblocking(true).unwrap();
    let backend = Backend::spawn(
        policy_config(&["127.0.0.1"], &[]),
        Box::new(TestLink {
            queues: Arc::clone(&queues),
            wake: backend_end,
        }),
    )
    .unwrap();

    let mut guest = Guest::new();
    let connection = guest.connect(address);
    let mut step = |guest: &mut Guest| {
        let now = Instant::now();
        {
            let mut queues = queues.lock().unwrap();
            guest.wire.inbound.extend(queues.to_guest.drain(..));
        }
        guest.poll(now);
        if !guest.wire.outbound.is_empty() {
            queues.lock().unwrap().from_guest.extend(guest.wire.outbound.drain(..));
            guest_end.write_all(&[1]).unwrap();
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while guest.tcp(connection).state() != State::Established {
        assert!(
            Instant::now() < deadline,
            "no handshake: {}",
            guest.tcp(connection).state()
        );
        step(&mut guest);
    }
    let (mut host, _) = listener.accept().unwrap();
    guest.tcp(connection).send_slice(b"hello").unwrap();
    host.write_all(b"world").unwrap();
    let mut from_guest = [0; 5];
    let mut from_host = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while from_host.len() < 5 {
        assert!(Instant::now() < deadline, "no bytes from the host");
        step(&mut guest);
        let socket = guest.tcp(connection);
        let mut buffer = [0; 16];
        if let Ok(read) = socket.recv_slice(&mut buffer) {
            from_host.extend_from_slice(&buffer[..read]);
        }
    }
    host.read_exact(&mut from_guest).unwrap();
    assert_eq!((&from_guest, from_host.as_slice()), (b"hello", &b"world"[..]));
    let stats = backend.stats();
    assert_eq!(
        (stats.connections_opened, stats.bytes_to_host, stats.bytes_to_guest),
        (1, 5, 5)
    );

    let dropping = Instant::now();
    drop(backend);
    assert!(
        dropping.elapsed() < Duration::from_secs(1),
        "drop took {:?}",
        dropping.elapsed()
    );
    // The thread ended and dropped the link it owned.
    assert_eq!(Arc::strong_count(&queues), 1);
    // And the host socket it held is closed.
    match host.read(&mut [0; 16]) {
        Ok(0) => {}
        Err(error) if error.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("host socket still open: {other:?}"),
    }
}
