//! `/v1/sandboxes/{id}/ports/{port}/...`: HTTP (and WebSocket, or any
//! other upgrade) to a server listening on a port inside a session.
//!
//! A sandbox's VM runs only while the server calls it, so the proxy drives
//! a tunnel through the agent (guest/agent/native/ports.h): connect to the
//! port on the guest's loopback, then exchanges, each sending what the
//! client sent and running the guest until the server in it answers or a
//! short wait passes. Each exchange is one call on the session, under a
//! slot, so calls of the session's own interleave with a long download or
//! an open WebSocket. The sandbox needs no network for this.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::Extension;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroboot_protocol::files::{FileOp, FileRequest};

use crate::auth::{Caller, E2B_KEY_HEADER};
use crate::error::ApiError;
use crate::files::guest::GuestFiles;
use crate::state::AppState;

/// How long the server in the sandbox may take to start answering.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one exchange runs the guest waiting for an answer: the longest
/// a client's bytes wait for the next exchange while a stream is open.
const WAIT: Duration = Duration::from_millis(50);
/// Bytes one exchange sends or reads.
const EXCHANGE_BYTES: usize = 1 << 20;
/// Bytes of a response's head.
const MAX_HEAD: usize = 64 << 10;
const MAX_HEADERS: usize = 100;

/// Headers about one hop, which the proxy neither forwards nor answers
/// with, and the API's own credentials, which never reach the sandbox.
fn is_hop_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "authorization"
    ) || name.as_str() == E2B_KEY_HEADER
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/ports/{port}/{path}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id"),
           ("port" = u16, Path, description = "A TCP port a server in the sandbox listens on"),
           ("path" = String, Path, description = "The path on that server")),
    responses(
        (status = 200, description = "Whatever the server in the sandbox answers, with any method; a WebSocket upgrade is passed through"),
        (status = 400, description = "Not a port", body = crate::error::ErrorResponse),
        (status = 404, description = "No such sandbox", body = crate::error::ErrorResponse),
        (status = 502, description = "Nothing listens on the port, or it answered something that is not HTTP", body = crate::error::ErrorResponse),
        (status = 504, description = "The server in the sandbox did not answer in time", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn proxy_path(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, port, path)): Path<(String, String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    proxy(state, caller, id, port, path, request).await
}

/// `/v1/sandboxes/{id}/ports/{port}`: the server's root.
pub(crate) async fn proxy_root(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, port)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    proxy(state, caller, id, port, String::new(), request).await
}

async fn proxy(
    state: Arc<AppState>,
    caller: Caller,
    id: String,
    port: String,
    path: String,
    mut request: Request,
) -> Result<Response, ApiError> {
    let port = match port.parse::<u16>() {
        Ok(port) if port > 0 => port,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_port",
                format!("{port:?} is not a TCP port (1-65535)"),
            ))
        }
    };
    let upgrade = wants_upgrade(request.headers());
    let on_upgrade = upgrade
        .is_some()
        .then(|| request.extensions_mut().remove::<hyper::upgrade::OnUpgrade>())
        .flatten();
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, state.limits.max_body_bytes)
        .await
        .map_err(|e| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", e.to_string()))?;
    let files = GuestFiles::open(&state, caller, &id).await?;
    let tunnel = Tunnel::connect(files, &id, port).await?;
    let target = match parts.uri.query() {
        Some(query) => format!("/{path}?{query}"),
        None => format!("/{path}"),
    };
    let head = request_head(
        &parts.method,
        &target,
        &parts.headers,
        port,
        &format!("/v1/sandboxes/{id}/ports/{port}"),
        upgrade.as_ref(),
        body.len(),
    );
    let mut sending = head.into_bytes();
    sending.extend_from_slice(&body);
    let (head, rest, closed) = match read_head(&tunnel, sending).await {
        Ok(read) => read,
        Err(e) => {
            tunnel.close().await;
            return Err(e);
        }
    };
    if upgrade.is_some() && head.status == StatusCode::SWITCHING_PROTOCOLS {
        let Some(on_upgrade) = on_upgrade else {
            tunnel.close().await;
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "bad_upgrade",
                "the client's connection cannot be upgraded",
            ));
        };
        tokio::spawn(pump(tunnel, on_upgrade, rest));
        return Ok(upgraded_response(&head));
    }
    let framing = framing_of(&head, parts.method == Method::HEAD);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(stream_body(tunnel, framing, rest, closed, tx));
    Ok(response(
        &head,
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    ))
}

/// The `Upgrade` value when the client asks for one (a WebSocket).
fn wants_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned()).flatten()
}

fn request_head(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    port: u16,
    prefix: &str,
    upgrade: Option<&HeaderValue>,
    body_len: usize,
) -> String {
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: localhost:{port}\r\n");
    for (name, value) in headers {
        if is_hop_header(name) || name.as_str() == "x-forwarded-prefix" {
            continue;
        }
        if let Ok(value) = value.to_str() {
            head += &format!("{name}: {value}\r\n");
        }
    }
    head += &format!("X-Forwarded-Prefix: {prefix}\r\n");
    match upgrade.and_then(|v| v.to_str().ok()) {
        Some(protocol) => head += &format!("Connection: Upgrade\r\nUpgrade: {protocol}\r\n"),
        None => head += "Connection: close\r\n",
    }
    if body_len > 0 || matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        head += &format!("Content-Length: {body_len}\r\n");
    }
    head + "\r\n"
}

/// One connection to a port in the guest.
struct Tunnel {
    files: GuestFiles,
    handle: u64,
}

/// What one exchange brought back.
struct Received {
    bytes: Vec<u8>,
    closed: bool,
}

impl Tunnel {
    async fn connect(files: GuestFiles, id: &str, port: u16) -> Result<Self, ApiError> {
        let mut request = FileRequest::new(FileOp::PortConnect, 0, "");
        request.offset = u64::from(port);
        let reply = files.try_op(request).await?;
        if reply.errno != 0 {
            let (code, message) = match reply.errno {
                libc::ECONNREFUSED => ("port_closed", format!("nothing in sandbox {id} listens on port {port}")),
                _ => ("port_unreachable", format!("sandbox {id}: {}", reply.message)),
            };
            return Err(ApiError::new(StatusCode::BAD_GATEWAY, code, message));
        }
        let handle = reply
            .data
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "bad_guest_reply",
                    "the agent's connect reply is short",
                )
            })?;
        Ok(Self {
            files,
            handle: u64::from(handle),
        })
    }

    /// Sends `bytes` (in pieces if they are many), then waits up to `wait`
    /// for an answer.
    async fn exchange(&self, bytes: &[u8], wait: Duration) -> Result<Received, ApiError> {
        let mut pieces = bytes.chunks(EXCHANGE_BYTES).peekable();
        let mut received = Received {
            bytes: Vec::new(),
            closed: false,
        };
        loop {
            let piece = pieces.next().unwrap_or_default();
            let last = pieces.peek().is_none();
            let mut request = FileRequest::new(FileOp::PortExchange, 0, "");
            request.offset = self.handle;
            request.length = EXCHANGE_BYTES as u64;
            request.flags = if last { wait.as_millis() as u32 } else { 0 };
            request.data = piece.to_vec();
            let reply = self.files.try_op(request).await?;
            if reply.errno != 0 {
                return Err(ApiError::new(StatusCode::BAD_GATEWAY, "port_failed", reply.message));
            }
            let Some((flag, bytes)) = reply.data.split_first_chunk::<4>() else {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "bad_guest_reply",
                    "the agent's exchange reply is short",
                ));
            };
            received.bytes.extend_from_slice(bytes);
            received.closed |= u32::from_le_bytes(*flag) != 0;
            if last || received.closed {
                return Ok(received);
            }
        }
    }

    async fn close(&self) {
        let mut request = FileRequest::new(FileOp::PortClose, 0, "");
        request.offset = self.handle;
        if let Err(error) = self.files.try_op(request).await {
            tracing::debug!(?error, "closing a port connection");
        }
    }
}

/// A response head as the server in the sandbox sent it.
struct Head {
    status: StatusCode,
    headers: HeaderMap,
}

/// Sends the request and reads the answer's head: the head, the bytes
/// after it, and whether the server has closed the connection.
async fn read_head(tunnel: &Tunnel, request: Vec<u8>) -> Result<(Head, Vec<u8>, bool), ApiError> {
    let started = Instant::now();
    let mut buffer = Vec::new();
    let mut sending = request;
    let mut closed = false;
    loop {
        if let Some((head, used)) = parse_head(&buffer)? {
            return Ok((head, buffer.split_off(used), closed));
        }
        if closed {
            return Err(bad_answer(
                "the server in the sandbox closed the connection before answering",
            ));
        }
        if buffer.len() > MAX_HEAD {
            return Err(bad_answer("the answer's head is over 64 KiB"));
        }
        if started.elapsed() > ANSWER_TIMEOUT {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "port_timeout",
                format!(
                    "the server in the sandbox did not answer in {} s",
                    ANSWER_TIMEOUT.as_secs()
                ),
            ));
        }
        let received = tunnel
            .exchange(&std::mem::take(&mut sending), Duration::from_secs(1))
            .await?;
        buffer.extend_from_slice(&received.bytes);
        closed = received.closed;
    }
}

fn framing_of(head: &Head, head_only: bool) -> Framing {
    let no_body = head_only
        || head.status.is_informational()
        || head.status == StatusCode::NO_CONTENT
        || head.status == StatusCode::NOT_MODIFIED;
    let chunked = head
        .headers
        .get(header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = head
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match (no_body, chunked, length) {
        (true, _, _) => Framing::Length(0),
        (false, true, _) => Framing::Chunked(Chunked::default()),
        (false, false, Some(length)) => Framing::Length(length),
        (false, false, None) => Framing::UntilClose,
    }
}

fn bad_answer(message: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "bad_answer", message.to_owned())
}

/// The head and its length, once `buffer` holds all of it.
fn parse_head(buffer: &[u8]) -> Result<Option<(Head, usize)>, ApiError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let used = match response.parse(buffer) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(bad_answer(&format!(
                "the server in the sandbox did not answer HTTP: {e}"
            )))
        }
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| bad_answer("the answer's status is not a status"))?;
    let mut map = HeaderMap::new();
    for h in response.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            map.append(name, value);
        }
    }
    Ok(Some((Head { status, headers: map }, used)))
}

fn response(head: &Head, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    for (name, value) in &head.headers {
        // The body's length is framed anew (hyper sets it, or chunks).
        if !is_hop_header(name) {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    response
}

fn upgraded_response(head: &Head) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for (name, value) in &head.headers {
        if !is_hop_header(name) || *name == header::UPGRADE || *name == header::CONNECTION {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    response
}

/// How the answer's body ends.
enum Framing {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

/// Undoes `Transfer-Encoding: chunked` as the bytes come.
#[derive(Default)]
struct Chunked {
    buffer: Vec<u8>,
    /// Bytes left of the current chunk's data, then its CRLF.
    left: u64,
    in_data: bool,
    done: bool,
}

impl Chunked {
    /// Takes `bytes`, returns the data they complete.
    fn feed(&mut self, bytes: &[u8]) -> Result<Vec<u8>, String> {
        self.buffer.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut at = 0;
        while !self.done {
            if self.in_data {
                let take = (self.left as usize).min(self.buffer.len() - at);
                out.extend_from_slice(&self.buffer[at..at + take]);
                at += take;
                self.left -= take as u64;
                if self.left > 0 {
                    break;
                }
                if self.buffer.len() - at < 2 {
                    break;
                }
                if &self.buffer[at..at + 2] != b"\r\n" {
                    return Err("a chunk does not end with CRLF".into());
                }
                at += 2;
                self.in_data = false;
            } else {
                match httparse::parse_chunk_size(&self.buffer[at..]) {
                    Ok(httparse::Status::Complete((used, 0))) => {
                        at += used;
                        self.done = true;
                    }
                    Ok(httparse::Status::Complete((used, size))) => {
                        at += used;
                        self.left = size;
                        self.in_data = true;
                    }
                    Ok(httparse::Status::Partial) => break,
                    Err(_) => return Err("a chunk's size does not parse".into()),
                }
            }
        }
        self.buffer.drain(..at);
        Ok(out)
    }
}

async fn stream_body(
    tunnel: Tunnel,
    mut framing: Framing,
    first: Vec<u8>,
    mut closed: bool,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut received = first;
    loop {
        let (data, finished) = match &mut framing {
            Framing::Length(left) => {
                let take = (*left).min(received.len() as u64) as usize;
                *left -= take as u64;
                received.truncate(take);
                (std::mem::take(&mut received), *left == 0)
            }
            Framing::Chunked(chunked) => match chunked.feed(&std::mem::take(&mut received)) {
                Ok(data) => (data, chunked.done),
                Err(message) => {
                    let _ = tx.send(Err(std::io::Error::other(message))).await;
                    break;
                }
            },
            Framing::UntilClose => (std::mem::take(&mut received), closed),
        };
        if !data.is_empty() && tx.send(Ok(Bytes::from(data))).await.is_err() {
            break;
        }
        if finished {
            break;
        }
        if closed {
            let _ = tx
                .send(Err(std::io::Error::other(
                    "the server in the sandbox closed the connection mid-body",
                )))
                .await;
            break;
        }
        match tunnel.exchange(&[], Duration::from_secs(1)).await {
            Ok(more) => {
                received = more.bytes;
                closed = more.closed;
            }
            Err(e) => {
                let _ = tx.send(Err(std::io::Error::other(e.message))).await;
                break;
            }
        }
    }
    tunnel.close().await;
}

/// Moves bytes both ways between an upgraded client connection and the
/// guest, until either side closes.
async fn pump(tunnel: Tunnel, on_upgrade: hyper::upgrade::OnUpgrade, first: Vec<u8>) {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::debug!(%error, "a port client's upgrade failed");
            tunnel.close().await;
            return;
        }
    };
    let mut client = TokioIo::new(upgraded);
    let mut from_client = vec![0u8; 64 << 10];
    let mut to_guest = Vec::new();
    let mut to_client = first;
    let mut client_open = true;
    loop {
        if !to_client.is_empty() && client.write_all(&std::mem::take(&mut to_client)).await.is_err() {
            break;
        }
        // What the client sent meanwhile, without waiting for it.
        while client_open {
            match tokio::time::timeout(Duration::from_millis(1), client.read(&mut from_client)).await {
                Ok(Ok(0)) | Ok(Err(_)) => client_open = false,
                Ok(Ok(n)) => to_guest.extend_from_slice(&from_client[..n]),
                Err(_) => break,
            }
        }
        if !client_open && to_guest.is_empty() {
            break;
        }
        match tunnel.exchange(&std::mem::take(&mut to_guest), WAIT).await {
            Ok(received) => {
                to_client = received.bytes;
                if received.closed {
                    let _ = client.write_all(&to_client).await;
                    break;
                }
            }
            Err(error) => {
                tracing::debug!(?error, "a port stream ended");
                break;
            }
        }
    }
    let _ = client.shutdown().await;
    tunnel.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_undone_across_pieces() {
        let mut chunked = Chunked::default();
        let whole = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        let mut out = Vec::new();
        for piece in whole.chunks(3) {
            out.extend(chunked.feed(piece).unwrap());
        }
        assert_eq!(out, b"hello, world");
        assert!(chunked.done);
        assert!(Chunked::default().feed(b"zz\r\n").is_err());
    }

    #[test]
    fn the_head_drops_credentials_and_hop_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer secret"));
        headers.insert(E2B_KEY_HEADER, HeaderValue::from_static("secret"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.insert("x-mine", HeaderValue::from_static("kept"));
        let head = request_head(
            &Method::GET,
            "/a?b=1",
            &headers,
            8000,
            "/v1/sandboxes/x/ports/8000",
            None,
            0,
        );
        assert!(head.starts_with("GET /a?b=1 HTTP/1.1\r\nHost: localhost:8000\r\n"));
        assert!(head.contains("x-mine: kept\r\n"));
        assert!(head.contains("Connection: close\r\n"));
        assert!(!head.contains("secret"), "{head}");
        assert!(head.ends_with("\r\n\r\n"));
    }

    #[test]
    fn heads_parse_when_whole() {
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-").unwrap().is_none());
        let (head, used) = parse_head(b"HTTP/1.0 404 Not Found\r\nX: y\r\n\r\nbody")
            .unwrap()
            .unwrap();
        assert_eq!(head.status, StatusCode::NOT_FOUND);
        assert_eq!(used, 32);
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }
}
