//! Shared setup for the real-guest tests: KVM, the (cached) template, and
//! the `zeroboot` binary.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use zeroboot_template::{Cache, Progress, TemplateSpec};
use zeroboot_vmm::{Hypervisor, Snapshot};

/// Opens /dev/kvm or fails the test with the reason. Never skips.
pub fn hypervisor() -> Hypervisor {
    match Hypervisor::open() {
        Ok(hv) => hv,
        Err(e) => panic!("these tests boot real guests and need KVM: {e}"),
    }
}

/// Prints build phases to stderr so a slow first build is visible in CI logs.
struct PhaseLog;

impl Progress for PhaseLog {
    fn start(&self, phase: &str) {
        eprintln!("[template] {phase} ...");
    }
    fn line(&self, _: &str) {}
    fn finish(&self, phase: &str, took: std::time::Duration, cached: bool) {
        eprintln!(
            "[template] {phase} {} in {:.1}s",
            if cached { "cached" } else { "built" },
            took.as_secs_f64()
        );
    }
}

/// The default template, built once per test process (and reused from the
/// cache across runs).
pub fn template_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_template(&TemplateSpec::default())).clone()
}

/// Builds the template `spec` describes (or finds it in the cache) and
/// returns its directory.
pub fn build_template(spec: &TemplateSpec) -> PathBuf {
    hypervisor();
    let cache = Cache::from_env().expect("cache directory");
    match zeroboot_template::build(&cache, spec, Arc::new(PhaseLog), false) {
        Ok((dir, _, _)) => dir,
        Err(e) => panic!("building template {:?} failed: {e}", spec.name),
    }
}

pub fn snapshot(hv: &Hypervisor) -> Snapshot {
    let dir = template_dir();
    Snapshot::open(&dir, &zeroboot_vmm::machine::cpu_vendor(hv)).expect("open template")
}

/// The default template, opened once per test process, with a small pool of
/// prepared VMs so that the tests exercise the pooled fork path.
pub fn template() -> &'static zeroboot_vmm::Template {
    static OPENED: OnceLock<zeroboot_vmm::Template> = OnceLock::new();
    OPENED.get_or_init(|| {
        let hv = hypervisor();
        let snap = snapshot(&hv);
        // Every shell as this host's default mode, whatever the demand.
        let policy = zeroboot_vmm::ForkMemoryPolicy::Fixed(zeroboot_vmm::ForkMemory::for_this_host());
        zeroboot_vmm::Template::with_pool(hv, snap, 2, policy)
    })
}

/// A new sandbox forked from the default template.
pub fn fork() -> zeroboot_vmm::Machine {
    template()
        .fork(Box::new(std::io::sink()))
        .expect("fork from the template")
}

/// The default template, forking into worker processes (`zeroboot worker`)
/// with a pool of `pool`, fork memory as this host's default.
pub fn isolated_template(pool: usize) -> zeroboot_sandbox::IsolatedTemplate {
    isolated_template_with(pool, zeroboot_vmm::ForkMemoryPolicy::for_this_host())
}

/// [`isolated_template`] with fork memory as `policy` says.
pub fn isolated_template_with(
    pool: usize,
    policy: zeroboot_vmm::ForkMemoryPolicy,
) -> zeroboot_sandbox::IsolatedTemplate {
    isolated_template_with_probes(pool, policy, Vec::new())
}

/// [`isolated_template_with`], whose pool runs `probes` in each VM it
/// prepares with shared pages, and rewinds it.
pub fn isolated_template_with_probes(
    pool: usize,
    policy: zeroboot_vmm::ForkMemoryPolicy,
    probes: Vec<Vec<u8>>,
) -> zeroboot_sandbox::IsolatedTemplate {
    let worker = zeroboot_sandbox::WorkerCommand {
        program: zeroboot_bin(),
        args: vec!["worker".into()],
    };
    zeroboot_sandbox::IsolatedTemplate::with_probes(worker, snapshot(&hypervisor()), pool, policy, probes)
}

/// Processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // The parent pid is the 2nd field after the parenthesised command.
        let Some(fields) = stat_fields(child) else {
            continue;
        };
        if fields.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// The fields of /proc/PID/stat after the parenthesised command (which may
/// itself hold spaces): state, parent pid, ...
fn stat_fields(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')').map(|(_, rest)| rest.to_string())
}

/// Whether process `pid` exists and is not a zombie (a reaped process has no
/// /proc entry; a zombie says so in its state).
pub fn process_alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|fields| !fields.trim_start().starts_with('Z'))
}

/// Waits up to `within` for `done`, polling.
pub fn eventually(within: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + within;
    while std::time::Instant::now() < end {
        if done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    done()
}

/// The `zeroboot` binary built next to this test (scripts/test.sh builds it first).
pub fn zeroboot_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/zeroboot
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("zeroboot"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace` (scripts/test.sh does) before the tests",
        bin.display()
    );
    bin
}

/// Runs the zeroboot binary with `args` on the template cache `cache`.
pub fn zeroboot_in(cache: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(zeroboot_bin())
        .args(args)
        .env("ZEROBOOT_CACHE", cache)
        .output()
        .expect("run zeroboot")
}

/// A finished command's status and output, for an assertion's message.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A `zeroboot serve` process on a free loopback port, stopped on drop.
pub struct Server {
    child: std::process::Child,
    pub url: String,
    agent: ureq::Agent,
}

impl Server {
    /// Starts `zeroboot serve --listen 127.0.0.1:0` with `args` and waits for
    /// the address it prints.
    pub fn start(args: &[&str]) -> Self {
        template_dir();
        let mut command = std::process::Command::new(zeroboot_bin());
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--pool", "2"])
            .args(args);
        Self::spawn(command)
    }

    /// Starts `command`, which must run `zeroboot serve --listen 127.0.0.1:0`
    /// (perhaps through a wrapper such as setpriv), and waits for its address.
    pub fn spawn(mut command: std::process::Command) -> Self {
        use std::io::BufRead;
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start zeroboot serve");
        let stdout = child.stdout.take().expect("server stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let url = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("zeroboot: listening on ") {
                        break url.to_string();
                    }
                }
                _ => {
                    let _ = child.kill();
                    panic!("zeroboot serve exited before listening");
                }
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        Self { child, url, agent }
    }

    /// Sends `method path` with an optional JSON body and bearer key; returns
    /// the status, the `Retry-After` header and the body.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>, key: Option<&str>) -> Reply {
        self.call_bytes(method, path, body.map(str::as_bytes), key)
    }

    /// [`Server::call`] with a raw body (JSON content type unless `PUT`).
    pub fn call_bytes(&self, method: &str, path: &str, body: Option<&[u8]>, key: Option<&str>) -> Reply {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut headers = Vec::new();
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        match method {
            "GET" | "DELETE" => {}
            "PUT" => headers.push(("Content-Type", "application/octet-stream")),
            _ => headers.push(("Content-Type", "application/json")),
        }
        self.request(method, path, &headers, body.unwrap_or(b""))
    }
}

impl Server {
    /// Sends `method path` with these headers and body, as they are.
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let url = format!("{}{path}", self.url);
        let result = match method {
            "GET" | "DELETE" => {
                let mut req = if method == "GET" {
                    self.agent.get(&url)
                } else {
                    self.agent.delete(&url)
                };
                for (name, value) in headers {
                    req = req.header(*name, *value);
                }
                req.call()
            }
            _ => {
                let mut req = if method == "PUT" {
                    self.agent.put(&url)
                } else {
                    self.agent.post(&url)
                };
                for (name, value) in headers {
                    req = req.header(*name, *value);
                }
                req.send(body)
            }
        };
        let mut response = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = response
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_vec()
            .expect("response body");
        Reply {
            status,
            retry_after,
            text: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
        }
    }

    /// GETs `path`; returns the status and the body as a reader, for bodies
    /// too large to hold twice.
    pub fn get_reader(&self, path: &str) -> (u16, impl std::io::Read) {
        let response = self
            .agent
            .get(format!("{}{path}", self.url))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        (status, response.into_body().into_with_config().limit(u64::MAX).reader())
    }
}

/// One Server-Sent Event, with the time it arrived after the request went.
#[derive(Debug)]
pub struct Event {
    pub at: std::time::Duration,
    pub name: String,
    pub data: serde_json::Value,
}

impl Server {
    /// POSTs the JSON `body` to `path` and reads the Server-Sent Events of
    /// the answer as they arrive, noting when each did.
    pub fn stream(&self, path: &str, body: &str) -> Vec<Event> {
        use std::io::BufRead;
        let started = std::time::Instant::now();
        let response = self
            .agent
            .post(format!("{}{path}", self.url))
            .header("Content-Type", "application/json")
            .send(body)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        assert_eq!(response.status().as_u16(), 200, "POST {path}");
        let reader = std::io::BufReader::new(response.into_body().into_reader());
        let (mut events, mut name, mut data) = (Vec::new(), String::from("message"), String::new());
        for line in reader.lines() {
            let line = line.expect("event stream");
            if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            } else if line.is_empty() && !data.is_empty() {
                events.push(Event {
                    at: started.elapsed(),
                    name: std::mem::replace(&mut name, String::from("message")),
                    data: serde_json::from_str(&std::mem::take(&mut data)).expect("event data is JSON"),
                });
            }
        }
        events
    }
}

pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub text: String,
    pub bytes: Vec<u8>,
}

impl Reply {
    /// The body as JSON; fails the test if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text).unwrap_or_else(|_| panic!("not JSON: {}", self.text))
    }
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash or the OOM killer would.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many 2 MiB ranges the agent's boot-log line says it moved onto huge
/// pages (zb_hugify in guest/agent/native/guest.h).
pub fn ranges_moved_onto_huge_pages(boot_log: &str) -> usize {
    let line = boot_log
        .lines()
        .find(|l| l.contains("huge pages: "))
        .unwrap_or_else(|| panic!("no huge-pages line in the boot log:\n{boot_log}"));
    line.split("huge pages: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable huge-pages line: {line}"))
}
