//! Who may call the API and how often.
//!
//! With API keys (one per line in a file; `#` starts a comment), every call
//! but health needs `Authorization: Bearer <key>`, compared in constant time.
//! Without keys only loopback clients are served. Each key (or, without keys,
//! the machine itself) has its own token bucket; an empty bucket is a 429
//! with `Retry-After`.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;

use axum::extract::connect_info::MockConnectInfo;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read API keys from {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} holds no API keys")]
    Empty { path: String },
    #[error("{path}, line {line}: an API key must be 16 or more printable characters without spaces")]
    BadKey { path: String, line: usize },
}

/// Where E2B's SDKs put the API key.
pub const E2B_KEY_HEADER: &str = "x-api-key";

/// The key a request authenticated with (its index), or the loopback client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Caller {
    Key(usize),
    Loopback,
}

pub struct Auth {
    keys: Option<Vec<Vec<u8>>>,
    limiter: DefaultKeyedRateLimiter<Caller>,
}

impl Auth {
    /// `keys`: `None` serves loopback clients only. `per_second` requests per
    /// caller, with bursts of `burst`.
    pub fn new(keys: Option<Vec<String>>, per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        Self {
            keys: keys.map(|k| k.into_iter().map(String::into_bytes).collect()),
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
        }
    }

    /// Reads one key per line; blank lines and `#` comments are skipped.
    pub fn read_keys(path: &Path) -> Result<Vec<String>, AuthError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let key = line.split('#').next().unwrap_or("").trim();
            if key.is_empty() {
                continue;
            }
            if key.len() < 16 || !key.chars().all(|c| c.is_ascii_graphic()) {
                return Err(AuthError::BadKey {
                    path: shown,
                    line: i + 1,
                });
            }
            keys.push(key.to_string());
        }
        if keys.is_empty() {
            return Err(AuthError::Empty { path: shown });
        }
        Ok(keys)
    }

    /// Names `caller` in what outlives this server (a paused sandbox's
    /// owner): a hash of its key, which stays right when the key file's
    /// lines move, or `loopback`.
    pub fn owner_mark(&self, caller: Caller) -> String {
        use sha2::Digest;
        match (caller, &self.keys) {
            (Caller::Key(i), Some(keys)) => match keys.get(i) {
                Some(key) => sha2::Sha256::digest(key).iter().map(|b| format!("{b:02x}")).collect(),
                None => String::new(),
            },
            _ => "loopback".into(),
        }
    }

    pub fn has_keys(&self) -> bool {
        self.keys.is_some()
    }

    fn identify(&self, request: &Request) -> Result<Caller, ApiError> {
        let Some(keys) = &self.keys else {
            // MockConnectInfo stands in for the connection in router tests.
            let extensions = request.extensions();
            let peer = extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| *addr)
                .or_else(|| extensions.get::<MockConnectInfo<SocketAddr>>().map(|m| m.0));
            let loopback = peer.is_some_and(|addr| addr.ip().is_loopback());
            return if loopback {
                Ok(Caller::Loopback)
            } else {
                Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "this server has no API keys and serves loopback clients only",
                ))
            };
        };
        let unauthorized = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send a valid API key as `Authorization: Bearer <key>` (or `X-API-KEY: <key>`)",
            )
        };
        // E2B's SDKs send the key as `X-API-KEY`.
        let headers = request.headers();
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get(E2B_KEY_HEADER).and_then(|v| v.to_str().ok()))
            .ok_or_else(unauthorized)?
            .as_bytes();
        // Every key is compared, and each comparison takes the same time
        // whatever the bytes, so timing tells nothing about any key.
        let mut found = None;
        for (i, key) in keys.iter().enumerate() {
            if bool::from(key.as_slice().ct_eq(presented)) {
                found = Some(i);
            }
        }
        found.map(Caller::Key).ok_or_else(unauthorized)
    }

    pub(crate) fn admit(&self, caller: Caller) -> Result<(), ApiError> {
        self.limiter.check_key(&caller).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests for this key; retry after the time in Retry-After",
            )
            .with_retry_after(wait.as_secs_f64().ceil() as u64)
        })
    }
}

/// Middleware: authenticate, then rate-limit.
pub async fn require(State(auth): State<Arc<Auth>>, request: Request, next: Next) -> Response {
    match auth
        .identify(&request)
        .and_then(|caller| auth.admit(caller).map(|()| caller))
    {
        Ok(caller) => {
            let mut request = request;
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(e) => {
            let mut response = e.into_response();
            if response.status() == StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}
