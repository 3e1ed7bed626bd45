//! `zeroboot serve` against real guests: every endpoint over real HTTP.

// Helpers here are test code too; clippy only exempts #[test] functions.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{json, Value};
use zeroboot_e2e::{children_of, eventually, process_alive, Server};

#[test]
fn exec_runs_code_and_reports_timings() {
    let server = Server::start(&[]);
    for path in ["/v1/exec", "/exec"] {
        let reply = server.call(
            "POST",
            path,
            Some(r#"{"code": "import sys\nprint(1+1)\nprint('e', file=sys.stderr)\nsys.exit(3)"}"#),
            None,
        );
        assert_eq!(reply.status, 200, "{}", reply.text);
        let r = reply.json();
        assert_eq!((r["stdout"].as_str(), r["stderr"].as_str()), (Some("2\n"), Some("e\n")));
        assert_eq!(r["exit_code"], 3);
        assert_eq!(
            (r["timed_out"].as_bool(), r["truncated"].as_bool()),
            (Some(false), Some(false))
        );
        assert_eq!(r["template"], "python");
        let (fork, exec, total) = (
            r["fork_time_ms"].as_f64().unwrap(),
            r["exec_time_ms"].as_f64().unwrap(),
            r["total_time_ms"].as_f64().unwrap(),
        );
        // The total holds the fork and the exec, and little else; on a
        // loaded host the threads in between may wait for a core a while.
        let rest = total - fork - exec;
        assert!(fork > 0.0 && exec > 0.0 && rest > -0.01 && rest < 50.0, "{r}");
        assert_eq!(r["id"].as_str().map(str::len), Some(24));
    }
}

#[test]
fn exec_reports_timeouts_truncation_and_stdin() {
    let server = Server::start(&[]);
    let r = server
        .call(
            "POST",
            "/v1/exec",
            Some(r#"{"code": "import time; time.sleep(60)", "timeout_seconds": 0.5}"#),
            None,
        )
        .json();
    assert_eq!(
        (r["timed_out"].as_bool(), r["exit_code"].as_i64()),
        (Some(true), Some(124))
    );
    let r = server
        .call("POST", "/v1/exec", Some(r#"{"code": "print('x' * 2000000)"}"#), None)
        .json();
    assert_eq!(r["truncated"], true);
    assert_eq!(r["stdout"].as_str().map(str::len), Some(1 << 20));
    let r = server
        .call(
            "POST",
            "/v1/exec",
            Some(r#"{"code": "import sys; print(sys.stdin.read().upper())", "stdin": "abc"}"#),
            None,
        )
        .json();
    assert_eq!(r["stdout"], "ABC\n");
}

#[test]
fn batch_runs_in_parallel_and_health_and_metrics_report() {
    let server = Server::start(&[]);
    let batch = json!({"executions": [
        {"code": "print(1)"},
        {"code": "print(2)"},
        {"code": "print(3)", "language": "ruby"},
    ]});
    let reply = server.call("POST", "/v1/exec/batch", Some(&batch.to_string()), None);
    assert_eq!(reply.status, 200, "{}", reply.text);
    let r = reply.json();
    assert_eq!(r["results"][0]["stdout"], "1\n");
    assert_eq!(r["results"][1]["stdout"], "2\n");
    assert_eq!(r["results"][2]["error"]["code"], "unsupported_language");
    let health = server.call("GET", "/v1/health", None, None).json();
    assert_eq!(health["templates"][0]["name"], "python");
    assert_eq!(health["templates"][0]["ready"], true);
    let metrics = server.call("GET", "/v1/metrics", None, None);
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.text.contains(r#"zeroboot_executions_total{outcome="ok"} 2"#),
        "{}",
        metrics.text
    );
    assert!(metrics.text.contains("zeroboot_spawn_seconds_count 2"));
    let forks: f64 = metrics
        .text
        .lines()
        .filter(|l| l.starts_with("zeroboot_forks_total{fork_memory="))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(forks, 2.0, "every fork counted under its fork memory: {}", metrics.text);
}

#[test]
fn a_full_server_answers_503_not_a_hang() {
    let server = Server::start(&["--max-concurrent", "1", "--queue-wait-ms", "200"]);
    std::thread::scope(|s| {
        let slow = s.spawn(|| {
            server.call(
                "POST",
                "/v1/exec",
                Some(r#"{"code": "import time; time.sleep(3); print('done')"}"#),
                None,
            )
        });
        std::thread::sleep(std::time::Duration::from_millis(800));
        let reply = server.call("POST", "/v1/exec", Some(r#"{"code": "print(1)"}"#), None);
        assert_eq!(reply.status, 503, "{}", reply.text);
        assert_eq!(reply.json()["error"]["code"], "busy");
        assert_eq!(reply.retry_after.as_deref(), Some("1"));
        assert_eq!(slow.join().unwrap().json()["stdout"], "done\n");
    });
}

#[test]
fn api_keys_are_enforced_over_http() {
    let keys = std::env::temp_dir().join(format!("zeroboot-server-keys-{}", std::process::id()));
    std::fs::write(&keys, "e2e-key-0123456789abcdef\n").unwrap();
    let server = Server::start(&["--api-keys", keys.to_str().unwrap()]);
    let code = Some(r#"{"code": "print(1)"}"#);
    let reply = server.call("POST", "/v1/exec", code, None);
    assert_eq!(
        (reply.status, reply.json()["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let reply = server.call("POST", "/v1/exec", code, Some("e2e-key-0123456789abcdef"));
    assert_eq!((reply.status, reply.json()["stdout"].as_str()), (200, Some("1\n")));
    std::fs::remove_file(&keys).unwrap();
}

#[test]
fn a_crashing_sandbox_is_a_clear_error() {
    let server = Server::start(&[]);
    let reply = server.call("POST", "/v1/exec", Some(r#"{"code": "import os; os._exit(0)"}"#), None);
    assert_eq!(reply.status, 422, "{}", reply.text);
    assert_eq!(reply.json()["error"]["code"], "sandbox_crashed");
    // The server carries on.
    let reply = server.call("POST", "/v1/exec", Some(r#"{"code": "print(5)"}"#), None);
    assert_eq!(reply.json()["stdout"], "5\n");
}

/// Creates a session with `body` (JSON) and returns its id.
fn create_sandbox(server: &Server, body: &str) -> String {
    let reply = server.call("POST", "/v1/sandboxes", Some(body), None);
    assert_eq!(reply.status, 201, "{}", reply.text);
    reply.json()["id"].as_str().unwrap().to_string()
}

fn exec_in(server: &Server, id: &str, code: &str) -> Value {
    let reply = server.call(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(&json!({"code": code}).to_string()),
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json()
}

#[test]
fn sandboxes_keep_state_move_files_and_fork_from_where_they_are() {
    let server = Server::start(&[]);
    let reply = server.call("POST", "/v1/sandboxes", Some("{}"), None);
    assert_eq!(reply.status, 201, "{}", reply.text);
    let id = reply.json()["id"].as_str().unwrap().to_string();
    exec_in(&server, &id, "import numpy\nx = 41");
    assert_eq!(
        exec_in(&server, &id, "print(x + 1, numpy.__name__)")["stdout"],
        "42 numpy\n"
    );

    // Files, binary-safe, both ways.
    let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let put = server.call_bytes(
        "PUT",
        &format!("/v1/sandboxes/{id}/files/tmp/dir/data.bin"),
        Some(&data),
        None,
    );
    assert_eq!(put.status, 204, "{}", put.text);
    let got = server.call("GET", &format!("/v1/sandboxes/{id}/files/tmp/dir/data.bin"), None, None);
    assert_eq!((got.status, got.bytes.len()), (200, data.len()));
    assert!(got.bytes == data);
    let missing = server.call("GET", &format!("/v1/sandboxes/{id}/files/tmp/nope"), None, None);
    assert_eq!(
        (missing.status, missing.json()["error"]["code"].as_str()),
        (404, Some("file_not_found"))
    );
    assert_eq!(
        exec_in(&server, &id, "print(len(open('/tmp/dir/data.bin','rb').read()))")["stdout"],
        "100000\n"
    );

    // Fork: children start from the parent's current state, then go their own way.
    let reply = server.call(
        "POST",
        &format!("/v1/sandboxes/{id}/fork"),
        Some(r#"{"count": 2}"#),
        None,
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
    let forked = reply.json();
    let children: Vec<String> = forked["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(children.len(), 2);
    assert_eq!(forked["sandboxes"][0]["parent"], id.as_str());
    exec_in(&server, &id, "x = 0");
    for child in &children {
        let r = exec_in(
            &server,
            child,
            "import os\nprint(x, os.path.getsize('/tmp/dir/data.bin'))",
        );
        assert_eq!(r["stdout"], "41 100000\n", "{r}");
    }
    exec_in(&server, &children[0], "x = -1");
    assert_eq!(exec_in(&server, &children[1], "print(x)")["stdout"], "41\n");
    assert_eq!(exec_in(&server, &id, "print(x)")["stdout"], "0\n");

    let list = server.call("GET", "/v1/sandboxes", None, None).json();
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 3);
    let gone = server.call("DELETE", &format!("/v1/sandboxes/{}", children[0]), None, None);
    assert_eq!(gone.status, 204);
    let reply = server.call(
        "POST",
        &format!("/v1/sandboxes/{}/exec", children[0]),
        Some(r#"{"code": "1"}"#),
        None,
    );
    assert_eq!(
        (reply.status, reply.json()["error"]["code"].as_str()),
        (404, Some("sandbox_not_found"))
    );
}

#[test]
fn a_sandbox_that_times_out_is_ended_and_idle_ones_expire() {
    let server = Server::start(&[]);
    let id = create_sandbox(&server, r#"{"ttl_seconds": 2}"#);
    let reply = server.call(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(r#"{"code": "while True: pass", "timeout_seconds": 0.5}"#),
        None,
    );
    assert_eq!(reply.json()["timed_out"], true);
    let reply = server.call("GET", &format!("/v1/sandboxes/{id}"), None, None);
    assert_eq!(reply.status, 404, "a timed-out sandbox cannot serve again");
    // Idle past its TTL: removed by the reaper.
    let id = create_sandbox(&server, r#"{"ttl_seconds": 1}"#);
    assert_eq!(
        server.call("GET", &format!("/v1/sandboxes/{id}"), None, None).status,
        200
    );
    std::thread::sleep(std::time::Duration::from_millis(3000));
    assert_eq!(
        server.call("GET", &format!("/v1/sandboxes/{id}"), None, None).status,
        404
    );
}

/// Output that is not UTF-8 comes back exactly, as base64 beside the text;
/// UTF-8 output has no base64 field. Python's `sys.stdout.buffer` writes
/// bytes (Node's `Buffer`s: tests/runtimes.rs).
#[test]
fn bytes_that_are_not_utf8_come_back_exactly() {
    use base64::Engine;
    let server = Server::start(&[]);
    let run = |language: &str, code: &str| {
        let body = json!({"language": language, "code": code}).to_string();
        let reply = server.call("POST", "/v1/exec", Some(&body), None);
        assert_eq!(reply.status, 200, "{}", reply.text);
        reply.json()
    };
    let decoded = |v: &Value, field: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(v[field].as_str().unwrap_or_else(|| panic!("{field} in {v}")))
            .unwrap()
    };
    let py = run(
        "python",
        "import sys; print('text é'); sys.stdout.flush(); sys.stdout.buffer.write(b'\\x00\\xff\\xfe'); \
         sys.stderr.buffer.write(b'err\\n')",
    );
    assert_eq!(decoded(&py, "stdout_base64"), b"text \xc3\xa9\n\x00\xff\xfe", "{py}");
    assert_eq!(py["stderr"], "err\n");
    assert!(py.get("stderr_base64").is_none(), "valid UTF-8 needs no base64: {py}");
    let plain = run("python", "print('plain')");
    assert_eq!(plain["stdout"], "plain\n");
    assert!(plain.get("stdout_base64").is_none(), "{plain}");
}

/// A session's TTL counts idle time between calls: a call longer than the
/// TTL runs to its end, and the sandbox serves the next one.
#[test]
fn a_call_longer_than_the_ttl_is_not_cut_and_the_sandbox_stays() {
    let server = Server::start(&[]);
    let id = create_sandbox(&server, r#"{"ttl_seconds": 1}"#);
    // The reaper runs every second: it sees this call three times or more.
    let reply = exec_in(&server, &id, "import time; time.sleep(3.5); print('slept')");
    assert_eq!(reply["stdout"], "slept\n", "{reply}");
    assert_eq!(exec_in(&server, &id, "print('still here')")["stdout"], "still here\n");
}

/// Fresh generator state at each fork only: a seed set in one call holds in
/// the next, and children forked from a session still differ.
#[test]
fn a_seed_set_in_one_call_holds_in_the_next_and_forks_still_differ() {
    let server = Server::start(&[]);
    let id = create_sandbox(&server, "{}");
    exec_in(
        &server,
        &id,
        "import random, numpy; random.seed(1); numpy.random.seed(1)",
    );
    let reply = exec_in(&server, &id, "print(random.random(), numpy.random.rand())");
    assert_eq!(reply["stdout"], "0.13436424411240122 0.417022004702574\n", "{reply}");
    let forked = server
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/fork"),
            Some(r#"{"count": 2}"#),
            None,
        )
        .json();
    let draws: Vec<String> = forked["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|child| {
            let child = child["id"].as_str().unwrap();
            exec_in(&server, child, "print(random.random(), numpy.random.rand())")["stdout"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_ne!(draws[0], draws[1], "children of one session draw differently");
    assert_ne!(
        draws[0],
        reply["stdout"].as_str().unwrap(),
        "a child does not repeat its parent"
    );
}

/// A cache of its own (`ZEROBOOT_CACHE`) holding a copy of the python
/// template, for a server whose files a test changes.
fn cache_with_a_copy_of_the_template(tag: &str) -> std::path::PathBuf {
    let cache = std::env::temp_dir().join(format!("zeroboot-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(cache.join("templates")).unwrap();
    let cp = std::process::Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(zeroboot_e2e::template_dir())
        .arg(cache.join("templates/python"))
        .status()
        .unwrap();
    assert!(cp.success());
    cache
}

/// `/v1/health` says whether each template can fork now: a template whose
/// memory file is cut short under the server turns `ready: false` (and the
/// status `degraded`) once a worker fails to come up from it. A file that
/// is removed changes nothing: the template's zygote opened them all when
/// the server started.
#[test]
fn health_reports_a_template_that_can_no_longer_fork() {
    let cache = cache_with_a_copy_of_the_template("health");
    let mut command = std::process::Command::new(zeroboot_e2e::zeroboot_bin());
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--pool", "1"])
        .env("ZEROBOOT_CACHE", &cache);
    let server = Server::spawn(command);
    let health = || server.call("GET", "/v1/health", None, None).json();
    assert_eq!(health()["templates"][0]["ready"], true, "{}", health());
    assert_eq!(health()["status"], "ok");
    std::fs::remove_file(cache.join("templates/python/state.bin")).unwrap();
    for _ in 0..3 {
        let r = server.call("POST", "/v1/exec", Some(r#"{"code": "print(1+1)"}"#), None);
        assert_eq!(
            (r.status, r.json()["stdout"].clone()),
            (200, "2\n".into()),
            "{}",
            r.text
        );
    }
    assert_eq!(health()["templates"][0]["ready"], true, "{}", health());
    // Workers map the memory file as they are prepared: one the pool had
    // already prepared may still serve (200) or find the pages it had not
    // read yet gone (its guest crashes: 422), any later one cannot come up
    // (500). Each request takes a worker, so the pool prepares another, or
    // the request does.
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(cache.join("templates/python/memory.bin"))
        .unwrap();
    memory.set_len(0).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while health()["templates"][0]["ready"] == true && std::time::Instant::now() < deadline {
        let r = server.call("POST", "/v1/exec", Some(r#"{"code": "print(1+1)"}"#), None);
        assert!(matches!(r.status, 200 | 422 | 500), "{}", r.text);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let now = health();
    assert_eq!(now["templates"][0]["ready"], false, "{now}");
    assert_eq!(now["status"], "degraded", "{now}");
    // A worker the pool began preparing before the file went may still
    // come up and serve one request; after that, none can.
    let statuses: Vec<u16> = (0..3)
        .map(|_| {
            server
                .call("POST", "/v1/exec", Some(r#"{"code": "print(1+1)"}"#), None)
                .status
        })
        .collect();
    assert_eq!(statuses.last(), Some(&500), "no worker can start: {statuses:?}");
    assert_eq!(health()["status"], "degraded");
    drop(server);
    std::fs::remove_dir_all(&cache).unwrap();
}

/// Parses a Server-Sent Events body into (event, data) pairs.
fn events(text: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut name = String::from("message");
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        if !data.is_empty() {
            out.push((name, serde_json::from_str(&data).unwrap()));
        }
    }
    out
}

#[test]
fn exec_streams_server_sent_events() {
    let server = Server::start(&[]);
    let code = "import time\nfor i in range(3):\n    print(i)\n    time.sleep(0.05)\nraise SystemExit(4)";
    let reply = server.call(
        "POST",
        "/v1/exec",
        Some(&json!({"code": code, "stream": true}).to_string()),
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
    let events = events(&reply.text);
    let streamed: String = events
        .iter()
        .filter(|(name, _)| name == "stdout")
        .map(|(_, d)| d["data"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(streamed, "0\n1\n2\n", "{events:?}");
    let (last, result) = events.last().unwrap();
    assert_eq!(last, "result");
    assert_eq!(
        (result["exit_code"].as_i64(), result["stdout"].as_str()),
        (Some(4), Some("0\n1\n2\n"))
    );
}

#[test]
fn cli_client_runs_code_and_manages_sandboxes() {
    let server = Server::start(&[]);
    let zeroboot = |args: &[&str]| {
        std::process::Command::new(zeroboot_e2e::zeroboot_bin())
            .args(args)
            .env("ZEROBOOT_URL", &server.url)
            .output()
            .unwrap()
    };
    let out = zeroboot(&[
        "exec",
        "-c",
        "import sys\nprint('hi')\nprint('e', file=sys.stderr)\nsys.exit(5)",
    ]);
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice()),
        (&b"hi\n"[..], &b"e\n"[..])
    );
    let out = zeroboot(&["exec", "--timeout", "0.5", "-c", "while True: pass"]);
    assert_eq!(out.status.code(), Some(124));
    let out = zeroboot(&["sandbox", "create", "--ttl", "60"]);
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(id.starts_with("sbx_"), "{id}");
    assert!(zeroboot(&["exec", "--sandbox", &id, "-c", "x = 41"]).status.success());
    let out = zeroboot(&["sandbox", "fork", &id]);
    let child = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = zeroboot(&["exec", "--sandbox", &child, "-c", "print(x + 1)"]);
    assert_eq!(out.stdout, b"42\n");
    let listed = String::from_utf8(zeroboot(&["sandbox", "ls"]).stdout).unwrap();
    assert!(listed.contains(&id) && listed.contains(&child), "{listed}");
    assert!(zeroboot(&["sandbox", "rm", &child]).status.success());
    let out = zeroboot(&["exec", "--sandbox", &child, "-c", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sandbox_not_found"));
}

#[test]
fn per_key_sandbox_count_and_memory_are_capped() {
    // The template has 1 GiB of guest RAM.
    let server = Server::start(&["--max-sandboxes-per-key", "3", "--max-sandbox-memory-mib", "2048"]);
    let create = || server.call("POST", "/v1/sandboxes", Some("{}"), None);
    let first = create().json();
    assert_eq!(create().status, 201);
    let reply = create();
    assert_eq!(
        (reply.status, reply.json()["error"]["code"].as_str()),
        (429, Some("memory_limit"))
    );
    let id = first["id"].as_str().unwrap();
    let reply = server.call(
        "POST",
        &format!("/v1/sandboxes/{id}/fork"),
        Some(r#"{"count": 1}"#),
        None,
    );
    assert_eq!(
        (reply.status, reply.json()["error"]["code"].as_str()),
        (429, Some("memory_limit"))
    );
    let server = Server::start(&["--max-sandboxes-per-key", "1"]);
    assert_eq!(server.call("POST", "/v1/sandboxes", Some("{}"), None).status, 201);
    let reply = server.call("POST", "/v1/sandboxes", Some("{}"), None);
    assert_eq!(
        (reply.status, reply.json()["error"]["code"].as_str()),
        (429, Some("sandbox_limit"))
    );
}

/// The cap holds under concurrency: calls that check it at the same time,
/// before any of their sandboxes exists, cannot all get one.
#[test]
fn concurrent_creates_cannot_exceed_the_per_key_cap() {
    let server = Server::start(&["--max-sandboxes-per-key", "2"]);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..6)
            .map(|_| s.spawn(|| server.call("POST", "/v1/sandboxes", Some("{}"), None).status))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let created = statuses.iter().filter(|&&s| s == 201).count();
    assert_eq!(created, 2, "{statuses:?}");
    assert!(statuses.iter().all(|&s| s == 201 || s == 429), "{statuses:?}");
    let list = server.call("GET", "/v1/sandboxes", None, None).json();
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 2, "{list}");
}

#[test]
fn a_server_killed_under_load_leaves_no_sandbox_and_restarts_clean() {
    let mut server = Server::start(&[]);
    let pid = server.pid();
    let url = server.url.clone();
    // Load: a few slow executions in flight, plus a long-lived sandbox.
    let r = server.call("POST", "/v1/sandboxes", Some("{}"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    let load: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
                let _ = agent
                    .post(format!("{url}/v1/exec"))
                    .header("content-type", "application/json")
                    .send(r#"{"code": "import time; time.sleep(20)", "timeout_seconds": 30}"#);
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(60), || children_of(pid).len() >= 5),
        "workers for the pool, the sandbox and the executions"
    );
    let workers = children_of(pid);
    server.kill_hard();
    assert!(
        eventually(Duration::from_secs(10), || !workers.iter().any(|&w| process_alive(w))),
        "every worker died with the server: {workers:?}"
    );
    for t in load {
        let _ = t.join();
    }
    // The template on disk is intact: a new server opens it and runs code.
    let server = Server::start(&[]);
    let r = server.call("POST", "/v1/exec", Some(r#"{"code": "print(6*7)"}"#), None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["stdout"], "42\n");
}

/// The numeric id of group `name`, from /etc/group.
fn group_id(name: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:"))?.split(':').nth(1)?.parse().ok())
}

#[test]
fn the_server_runs_as_an_unprivileged_user_from_a_read_only_cache() {
    use std::os::unix::fs::MetadataExt;
    let kvm = std::fs::metadata("/dev/kvm").expect("/dev/kvm");
    let kvm_gid = group_id("kvm").expect("a kvm group: run scripts/install-deps.sh");
    assert!(
        kvm.gid() == kvm_gid && kvm.mode() & 0o060 == 0o060,
        "/dev/kvm must be read-write for group kvm, as on a standard Debian host: run scripts/install-deps.sh"
    );
    // A cache that only root may write, holding a copy of the template.
    let cache = cache_with_a_copy_of_the_template("nonroot");
    let chmod = std::process::Command::new("chmod")
        .args(["-R", "a+rX,go-w"])
        .arg(&cache)
        .status()
        .unwrap();
    assert!(chmod.success());

    // nobody:nogroup plus group kvm, no capabilities, no way to gain any.
    let mut command = std::process::Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", &format!("--groups={kvm_gid}")])
        .args(["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"])
        .arg(zeroboot_e2e::zeroboot_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--pool", "2"])
        .env("ZEROBOOT_CACHE", &cache)
        .env("HOME", "/nonexistent");
    let server = Server::spawn(command);
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    assert!(status.contains("\nUid:\t65534\t65534\t65534\t65534\n"), "{status}");
    // Its own seccomp filters: two (the allowlist, and clone3 answering ENOSYS).
    assert!(status.contains("\nSeccomp:\t2\nSeccomp_filters:\t2\n"), "{status}");

    let r = server.call("POST", "/v1/exec", Some(r#"{"code": "print(1+1)"}"#), None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["stdout"], "2\n");
    let r = server.call("POST", "/v1/sandboxes", Some("{}"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let out = exec_in(&server, &id, "x = 5");
    assert_eq!(out["exit_code"], 0, "{out}");
    let r = server.call(
        "POST",
        &format!("/v1/sandboxes/{id}/fork"),
        Some(r#"{"count": 1}"#),
        None,
    );
    assert_eq!(r.status, 201, "{}", r.text);
    drop(server);
    std::fs::remove_dir_all(&cache).unwrap();
}
