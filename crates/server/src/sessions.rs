//! Long-lived sandboxes: a VM forked from a template that keeps its state
//! between calls (variables, imports, files), as a notebook kernel does, and
//! that can be forked again from where it is.
//!
//! Each sandbox owns one OS thread, which makes the VM and runs every one of
//! its `KVM_RUN`s: calls are closures sent to that thread. When the sandbox is
//! removed its sender is dropped, the thread's loop ends and the VM with it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use zeroboot_protocol::Context;
use zeroboot_sandbox::{Sandbox, SandboxError};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::served::Served;

type Job = Box<dyn FnOnce(&mut Sandbox) + Send>;

pub struct Session {
    pub id: String,
    pub served: Arc<Served>,
    pub owner: Caller,
    pub parent: Option<String>,
    pub ttl: Duration,
    /// Working directory and environment of every call, under the call's own.
    pub context: Context,
    /// Names calls that carry no API key (the E2B sandbox calls) to this
    /// sandbox; only its creator is told it.
    pub access_token: String,
    /// When it was first made; a sandbox resumed from a pause keeps it.
    pub started: SystemTime,
    /// The template as the creator named it (an E2B alias such as `base`).
    pub alias: String,
    pub metadata: BTreeMap<String, String>,
    /// The code-interpreter API's contexts (namespaces in the guest), by id.
    pub code_contexts: Mutex<BTreeMap<String, CodeContext>>,
    /// What it may reach, as asked when it was made; `None`: no network.
    pub network: Option<crate::network::NetworkRequest>,
    /// Code-interpreter executions so far.
    pub executions: AtomicUsize,
    /// When it is removed whatever it is doing (E2B's timeout); `None`:
    /// only its idle TTL ends it.
    ends: Mutex<Option<SystemTime>>,
    last_used: Mutex<Instant>,
    /// Calls under way: a sandbox is never idle during one, however long
    /// it runs, so its TTL cannot end it mid-call.
    calls: AtomicUsize,
    jobs: mpsc::Sender<Job>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct SessionInfo {
    pub id: String,
    pub template: String,
    pub parent: Option<String>,
    pub ttl_seconds: f64,
    pub idle_seconds: f64,
    /// `running`, or `paused` (on disk, without a VM; the next call resumes it).
    #[serde(default = "running")]
    pub state: String,
}

pub(crate) fn running() -> String {
    "running".into()
}

impl Session {
    pub fn info(&self) -> SessionInfo {
        SessionInfo {
            id: self.id.clone(),
            template: self.served.name.clone(),
            parent: self.parent.clone(),
            ttl_seconds: self.ttl.as_secs_f64(),
            idle_seconds: self.idle().as_secs_f64(),
            state: running(),
        }
    }

    /// Time since the last call ended; zero while one runs.
    pub(crate) fn idle(&self) -> Duration {
        if self.calls.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        self.last_used.lock().map_or(Duration::ZERO, |t| t.elapsed())
    }

    pub fn ends(&self) -> Option<SystemTime> {
        self.ends.lock().ok().and_then(|e| *e)
    }

    /// Ends the sandbox `after` from now instead of whenever it was to end.
    pub fn end_after(&self, after: Duration) {
        if let Ok(mut ends) = self.ends.lock() {
            *ends = Some(SystemTime::now() + after);
        }
    }

    /// Its TTL or its deadline has passed.
    fn expired(&self) -> bool {
        self.idle() > self.ttl || self.ends().is_some_and(|e| SystemTime::now() >= e)
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }

    /// Runs `f` on the sandbox's thread and returns its result.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Sandbox) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let _busy = Busy::start(self);
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |machine| {
            let _ = tx.send(f(machine));
        });
        self.jobs.send(job).map_err(|_| gone(&self.id))?;
        rx.await.map_err(|_| gone(&self.id))
    }
}

/// A call under way; the idle clock restarts when it ends, also when the
/// caller's future is dropped mid-call.
struct Busy<'a>(&'a Session);

impl<'a> Busy<'a> {
    fn start(session: &'a Session) -> Self {
        session.calls.fetch_add(1, Ordering::AcqRel);
        Self(session)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        // Ordering: the clock first, then the count, so that a reaper that
        // sees no call under way also sees the new time.
        self.0.touch();
        self.0.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

fn gone(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "sandbox_gone",
        format!("sandbox {id} has ended (it timed out, crashed or was removed)"),
    )
}

/// A context of the code-interpreter API: a namespace of its own in the
/// guest (the agent's `run_cell`), with a language and working directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeContext {
    pub id: String,
    pub language: String,
    pub cwd: String,
}

/// What a new sandbox may be given besides its template and owner; the
/// defaults suit a new sandbox of the zeroboot API.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// The sandbox it was forked from, if it was.
    pub parent: Option<String>,
    /// Working directory and environment of every call, under the call's own.
    pub context: Context,
    /// The id of a sandbox resumed from a pause; `None` makes a new one.
    pub id: Option<String>,
    pub access_token: Option<String>,
    pub started: Option<SystemTime>,
    pub alias: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub ends: Option<SystemTime>,
    pub code_contexts: BTreeMap<String, CodeContext>,
    /// What it may reach (its forks inherit it); `None`: no network.
    pub network: Option<crate::network::NetworkRequest>,
}

pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
    /// Per caller, sandboxes reserved but not registered yet, and their
    /// guest MiB: counted like registered ones, so that concurrent calls
    /// cannot all pass the check before any of them registers. Lock order:
    /// `map`, then `pending`.
    pending: Mutex<HashMap<Caller, (usize, u64)>>,
    pub max_per_caller: usize,
    /// Guest memory (MiB of guest RAM) a caller's sandboxes may hold.
    pub max_mib_per_caller: u64,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    /// This server's node id in a cluster: new sandbox ids carry it
    /// (`sbx_<node>_<random>`), so a load balancer sends every call for a
    /// sandbox to the node that holds it.
    node: Option<String>,
}

/// A node id: what fits between `sbx_` and `_` in a sandbox id and a load
/// balancer's rule.
pub fn valid_node_id(node: &str) -> bool {
    (1..=16).contains(&node.len()) && node.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl Sessions {
    pub fn new(max_per_caller: usize, max_mib_per_caller: u64, default_ttl: Duration, max_ttl: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            max_per_caller,
            max_mib_per_caller,
            default_ttl,
            max_ttl,
            node: None,
        }
    }

    /// Gives new sandbox ids `node` (checked by [`valid_node_id`]).
    pub fn set_node(&mut self, node: Option<String>) {
        self.node = node;
    }

    fn new_id(&self) -> String {
        let random = crate::served::random_id();
        match &self.node {
            Some(node) => format!("sbx_{node}_{random}"),
            None => format!("sbx_{random}"),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>>, ApiError> {
        self.map
            .lock()
            .map_err(|_| ApiError::internal("sessions lock poisoned"))
    }

    /// A sandbox whatever its owner: the caller must prove it may use it
    /// (its access token).
    pub fn get_unchecked(&self, id: &str) -> Option<Arc<Session>> {
        self.lock().ok()?.get(id).cloned()
    }

    pub fn get(&self, id: &str, caller: Caller) -> Result<Arc<Session>, ApiError> {
        self.lock()?
            .get(id)
            .filter(|s| s.owner == caller)
            .cloned()
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "sandbox_not_found", format!("no sandbox {id}")))
    }

    pub fn list(&self, caller: Caller) -> Result<Vec<SessionInfo>, ApiError> {
        Ok(self.owned_by(caller)?.iter().map(|s| s.info()).collect())
    }

    /// `caller`'s sandboxes, sorted by id.
    pub fn owned_by(&self, caller: Caller) -> Result<Vec<Arc<Session>>, ApiError> {
        let mut out: Vec<Arc<Session>> = self.lock()?.values().filter(|s| s.owner == caller).cloned().collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    pub fn remove(&self, id: &str, caller: Caller) -> Result<(), ApiError> {
        let mut map = self.lock()?;
        match map.get(id) {
            Some(s) if s.owner == caller => {
                map.remove(id);
                Ok(())
            }
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "sandbox_not_found",
                format!("no sandbox {id}"),
            )),
        }
    }

    /// Removes a sandbox whatever its owner (it ended on its own).
    pub fn forget(&self, id: &str) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(id);
        }
    }

    pub fn count(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }

    /// Checks that `caller` may start `more` sandboxes of `mib` MiB of
    /// guest RAM each, and holds them for it until the returned
    /// reservation is dropped (once they are registered, or failed).
    pub fn reserve(&self, caller: Caller, more: usize, mib: u64) -> Result<Reservation<'_>, ApiError> {
        let map = self.lock()?;
        let mut pending = self
            .pending
            .lock()
            .map_err(|_| ApiError::internal("sessions lock poisoned"))?;
        let (held, held_mib) = pending.get(&caller).copied().unwrap_or((0, 0));
        let mine: Vec<&Arc<Session>> = map.values().filter(|s| s.owner == caller).collect();
        let have = mine.len() + held;
        let have_mib: u64 = mine.iter().map(|s| s.served.memory_mib()).sum::<u64>() + held_mib;
        let want_mib = have_mib + more as u64 * mib;
        if want_mib > self.max_mib_per_caller {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "memory_limit",
                format!(
                    "your sandboxes hold {have_mib} MiB of guest memory; {more} more would make {want_mib}, \
                     over the {} MiB per key. Delete some first",
                    self.max_mib_per_caller
                ),
            ));
        }
        if have + more > self.max_per_caller {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "sandbox_limit",
                format!(
                    "{have} sandboxes open; at most {} per key. Delete some first",
                    self.max_per_caller
                ),
            ));
        }
        let entry = pending.entry(caller).or_insert((0, 0));
        entry.0 += more;
        entry.1 += more as u64 * mib;
        Ok(Reservation {
            sessions: self,
            caller,
            count: more,
            mib: more as u64 * mib,
        })
    }

    /// Starts a sandbox whose VM `make` creates on the sandbox's own thread,
    /// and waits until it exists.
    pub async fn start(
        &self,
        served: Arc<Served>,
        owner: Caller,
        ttl: Duration,
        options: SessionOptions,
        make: impl FnOnce(&Served) -> Result<Sandbox, SandboxError> + Send + 'static,
    ) -> Result<Arc<Session>, ApiError> {
        let id = options.id.unwrap_or_else(|| self.new_id());
        if self.lock()?.contains_key(&id) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "sandbox_exists",
                format!("sandbox {id} is already running"),
            ));
        }
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let for_thread = served.clone();
        let served_name = served.name.clone();
        std::thread::Builder::new()
            .name(format!("zeroboot-{id}"))
            .spawn(move || {
                let mut machine = match make(&for_thread) {
                    Ok(m) => {
                        let _ = ready_tx.send(Ok(()));
                        m
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = inbox.recv() {
                    job(&mut machine);
                }
            })
            .map_err(ApiError::internal)?;
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ApiError::internal(e)),
            Err(_) => return Err(ApiError::internal("sandbox thread ended before its VM existed")),
        }
        let session = Arc::new(Session {
            id: id.clone(),
            served,
            owner,
            parent: options.parent,
            ttl,
            context: options.context,
            access_token: options
                .access_token
                .unwrap_or_else(|| format!("{}{}", crate::served::random_id(), crate::served::random_id())),
            started: options.started.unwrap_or_else(SystemTime::now),
            alias: options.alias.unwrap_or_else(|| served_name.clone()),
            metadata: options.metadata,
            code_contexts: Mutex::new(options.code_contexts),
            network: options.network,
            executions: AtomicUsize::new(0),
            ends: Mutex::new(options.ends),
            last_used: Mutex::new(Instant::now()),
            calls: AtomicUsize::new(0),
            jobs,
        });
        let mut map = self.lock()?;
        if map.contains_key(&id) {
            // Two resumes of one paused sandbox: the first one in keeps it.
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "sandbox_exists",
                format!("sandbox {id} is already running"),
            ));
        }
        map.insert(id, session.clone());
        Ok(session)
    }

    /// Removes sandboxes idle for longer than their TTL.
    pub fn reap(&self) -> usize {
        let Ok(mut map) = self.map.lock() else {
            return 0;
        };
        let before = map.len();
        map.retain(|_, s| !s.expired());
        before - map.len()
    }
}

/// Sandboxes [`Sessions::reserve`] holds for a caller; released on drop.
pub struct Reservation<'a> {
    sessions: &'a Sessions,
    caller: Caller,
    count: usize,
    mib: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.sessions.pending.lock() {
            if let Some(entry) = pending.get_mut(&self.caller) {
                entry.0 = entry.0.saturating_sub(self.count);
                entry.1 = entry.1.saturating_sub(self.mib);
                if entry.0 == 0 {
                    pending.remove(&self.caller);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_fit_a_sandbox_id_and_a_balancer_rule() {
        for good in ["n1", "a", "node0123456789ab"] {
            assert!(valid_node_id(good), "{good}");
        }
        for bad in ["", "N1", "n_1", "n-1", "n.1", "node0123456789abc", "n/1"] {
            assert!(!valid_node_id(bad), "{bad}");
        }
        let mut sessions = Sessions::new(1, 1, Duration::from_secs(1), Duration::from_secs(1));
        assert!(sessions.new_id().starts_with("sbx_"));
        sessions.set_node(Some("n7".into()));
        let id = sessions.new_id();
        assert!(id.starts_with("sbx_n7_") && id.len() == "sbx_n7_".len() + 24, "{id}");
    }
}
