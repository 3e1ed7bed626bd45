//! `/v1/sandboxes/{id}/ports/{port}/...` against a real server and real
//! guests: pages from a server a session started (in a child process and
//! in a thread of the session's own interpreter), bodies of real size in
//! each framing, a WebSocket through tungstenite, and the errors.

use std::time::{Duration, Instant};

use zeroboot_e2e::Server;

fn session(server: &Server) -> String {
    let r = server.call("POST", "/v1/sandboxes", Some("{}"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()["id"].as_str().expect("id").to_string()
}

fn exec(server: &Server, id: &str, code: &str) -> serde_json::Value {
    let body = serde_json::json!({ "code": code, "timeout_seconds": 120 }).to_string();
    let r = server.call("POST", &format!("/v1/sandboxes/{id}/exec"), Some(&body), None);
    assert_eq!(r.status, 200, "{code}: {}", r.text);
    let out = r.json();
    assert_eq!(out["exit_code"], 0, "{code}: {out}");
    out
}

fn error_code(r: &zeroboot_e2e::Reply) -> String {
    r.json()["error"]["code"].as_str().unwrap_or_default().to_string()
}

/// A child process serving /tmp/www (python -m http.server: HTTP/1.0,
/// Content-Length), started the way user code starts one.
const CHILD_SERVER: &str = r#"
import os, socket, subprocess, sys, time
os.makedirs('/tmp/www', exist_ok=True)
open('/tmp/www/hello.txt', 'w').write('hello from a child process')
x = 12345
with open('/tmp/www/big.bin', 'wb') as f:
    for _ in range(3 << 18):
        x = (x * 1103515245 + 12345) & 0xffffffff
        f.write(x.to_bytes(4, 'little'))
child = subprocess.Popen([sys.executable, '-m', 'http.server', '8000', '--bind', '127.0.0.1',
                          '--directory', '/tmp/www'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(600):
    try:
        socket.create_connection(('127.0.0.1', 8000), timeout=1).close()
        break
    except OSError:
        time.sleep(0.1)
print('listening')
"#;

/// A server in a thread of the session's interpreter: chunked answers, an
/// echo of the body, and a WebSocket that echoes text frames.
const THREAD_SERVER: &str = r#"
import base64, hashlib, http.server, struct, threading

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def log_message(self, *args):
        pass
    def do_GET(self):
        if self.path.startswith('/ws'):
            return self.websocket()
        if self.path.startswith('/chunked'):
            self.send_response(200)
            self.send_header('Transfer-Encoding', 'chunked')
            self.send_header('X-Seen-Prefix', self.headers.get('X-Forwarded-Prefix', ''))
            self.end_headers()
            for i in range(1000):
                piece = f'line {i}\n'.encode()
                self.wfile.write(b'%x\r\n%s\r\n' % (len(piece), piece))
            self.wfile.write(b'0\r\n\r\n')
            return
        body = f'{self.path} auth={self.headers.get("Authorization")}'.encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        body = self.rfile.read(int(self.headers['Content-Length']))
        self.send_response(201)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body[::-1])
    def websocket(self):
        key = self.headers['Sec-WebSocket-Key'] + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11'
        self.send_response(101)
        self.send_header('Upgrade', 'websocket')
        self.send_header('Connection', 'Upgrade')
        self.send_header('Sec-WebSocket-Accept', base64.b64encode(hashlib.sha1(key.encode()).digest()).decode())
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, n = head[0] & 0x0f, head[1] & 0x7f
            if n == 126:
                n = struct.unpack('>H', self.rfile.read(2))[0]
            elif n == 127:
                n = struct.unpack('>Q', self.rfile.read(8))[0]
            mask = self.rfile.read(4)
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
            if opcode == 8:
                self.wfile.write(b'\x88\x00')
                self.wfile.flush()
                self.close_connection = True
                return
            reply = b'echo: ' + data
            self.wfile.write(bytes([0x81, len(reply)]) + reply)
            self.wfile.flush()

server = http.server.ThreadingHTTPServer(('127.0.0.1', 8765), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print('listening')
"#;

/// What `big.bin` holds (CHILD_SERVER's generator).
fn expected_big() -> Vec<u8> {
    let mut x: u32 = 12345;
    let mut out = Vec::with_capacity(3 << 20);
    for _ in 0..(3 << 18) {
        x = x.wrapping_mul(1103515245).wrapping_add(12345);
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

#[test]
fn ports_serve_pages_bodies_and_a_websocket() {
    let server = Server::start(&[]);
    let id = session(&server);
    let ports = format!("/v1/sandboxes/{id}/ports");

    exec(&server, &id, CHILD_SERVER);
    let r = server.call("GET", &format!("{ports}/8000/hello.txt"), None, None);
    assert_eq!((r.status, r.text.as_str()), (200, "hello from a child process"));
    let started = Instant::now();
    let r = server.call("GET", &format!("{ports}/8000/big.bin"), None, None);
    assert_eq!(r.status, 200);
    assert!(
        r.bytes == expected_big(),
        "3 MiB arrive whole ({} bytes)",
        r.bytes.len()
    );
    eprintln!("3 MiB through the port proxy in {:?}", started.elapsed());
    let r = server.call("GET", &format!("{ports}/8000/missing"), None, None);
    assert_eq!(r.status, 404, "the server's own status comes through");

    exec(&server, &id, THREAD_SERVER);
    let r = server.request(
        "GET",
        &format!("{ports}/8765/path?q=1"),
        &[("Authorization", "Bearer not-for-the-sandbox")],
        b"",
    );
    assert_eq!(
        (r.status, r.text.as_str()),
        (200, "/path?q=1 auth=None"),
        "the API's credentials never reach the sandbox"
    );
    let r = server.request(
        "POST",
        &format!("{ports}/8765/echo"),
        &[("Content-Type", "text/plain")],
        b"abcdef",
    );
    assert_eq!((r.status, r.text.as_str()), (201, "fedcba"));
    let r = server.call("GET", &format!("{ports}/8765/chunked"), None, None);
    let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
    assert_eq!((r.status, r.text.len()), (200, expected.len()));
    assert_eq!(r.text, expected, "a chunked answer is undone");

    // The session's own calls interleave with an open WebSocket.
    let url = format!(
        "{}/v1/sandboxes/{id}/ports/8765/ws",
        server.url.replacen("http", "ws", 1)
    );
    let (mut socket, response) = tungstenite::connect(url.as_str()).expect("WebSocket through the proxy");
    assert_eq!(response.status().as_u16(), 101);
    if let tungstenite::stream::MaybeTlsStream::Plain(stream) = socket.get_ref() {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
    }
    for i in 0..3 {
        socket
            .send(tungstenite::Message::text(format!("ping {i}")))
            .expect("send");
        let started = Instant::now();
        let reply = socket.read().expect("read");
        assert_eq!(reply.into_text().expect("text").as_str(), format!("echo: ping {i}"));
        eprintln!("WebSocket round trip {i}: {:?}", started.elapsed());
        let out = exec(&server, &id, "print(6 * 7)");
        assert_eq!(out["stdout"], "42\n");
    }
    eprintln!("closing the WebSocket");
    socket.close(None).expect("close");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match socket.read() {
            Ok(_) => continue,
            Err(_) => break,
        }
    }

    eprintln!("the WebSocket is closed");
    let r = server.call("GET", &format!("{ports}/9/x"), None, None);
    assert_eq!((r.status, error_code(&r).as_str()), (502, "port_closed"), "{}", r.text);
    assert!(r.text.contains("port 9"), "{}", r.text);
    for bad in ["0", "65536", "http"] {
        let r = server.call("GET", &format!("{ports}/{bad}/x"), None, None);
        assert_eq!(
            (r.status, error_code(&r).as_str()),
            (400, "invalid_port"),
            "{bad}: {}",
            r.text
        );
    }
    let r = server.call(
        "GET",
        "/v1/sandboxes/sbx_000000000000000000000000/ports/8000/x",
        None,
        None,
    );
    assert_eq!(r.status, 404, "{}", r.text);

    // A server that answers something other than HTTP.
    exec(
        &server,
        &id,
        "import socket, threading\nraw = socket.socket()\nraw.bind(('127.0.0.1', 7001)); raw.listen(1)\n\
         def answer():\n    c, _ = raw.accept(); c.recv(100); c.sendall(b'SSH-2.0-nope\\r\\n\\r\\n'); c.close()\n\
         threading.Thread(target=answer, daemon=True).start()",
    );
    let r = server.call("GET", &format!("{ports}/7001/"), None, None);
    assert_eq!((r.status, error_code(&r).as_str()), (502, "bad_answer"), "{}", r.text);
}
