//! `zeroboot serve` against real guests: every endpoint over real HTTP.

// Helpers here are test code too; clippy only exempts #[test] functions.
#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use zeroboot_e2e::Server;

fn body(reply: &zeroboot_e2e::Reply) -> Value {
    serde_json::from_str(&reply.text).unwrap_or_else(|_| panic!("not JSON: {}", reply.text))
}

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
        let r = body(&reply);
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
        assert!(fork > 0.0 && exec > 0.0 && (total - fork - exec).abs() < 1.0, "{r}");
        assert_eq!(r["id"].as_str().map(str::len), Some(24));
    }
}

#[test]
fn exec_reports_timeouts_truncation_and_stdin() {
    let server = Server::start(&[]);
    let r = body(&server.call(
        "POST",
        "/v1/exec",
        Some(r#"{"code": "import time; time.sleep(60)", "timeout_seconds": 0.5}"#),
        None,
    ));
    assert_eq!(
        (r["timed_out"].as_bool(), r["exit_code"].as_i64()),
        (Some(true), Some(124))
    );
    let r = body(&server.call("POST", "/v1/exec", Some(r#"{"code": "print('x' * 2000000)"}"#), None));
    assert_eq!(r["truncated"], true);
    assert_eq!(r["stdout"].as_str().map(str::len), Some(1 << 20));
    let r = body(&server.call(
        "POST",
        "/v1/exec",
        Some(r#"{"code": "import sys; print(sys.stdin.read().upper())", "stdin": "abc"}"#),
        None,
    ));
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
    let r = body(&reply);
    assert_eq!(r["results"][0]["stdout"], "1\n");
    assert_eq!(r["results"][1]["stdout"], "2\n");
    assert_eq!(r["results"][2]["error"]["code"], "unsupported_language");
    let health = body(&server.call("GET", "/v1/health", None, None));
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
        assert_eq!(body(&reply)["error"]["code"], "busy");
        assert_eq!(reply.retry_after.as_deref(), Some("1"));
        assert_eq!(body(&slow.join().unwrap())["stdout"], "done\n");
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
        (reply.status, body(&reply)["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let reply = server.call("POST", "/v1/exec", code, Some("e2e-key-0123456789abcdef"));
    assert_eq!((reply.status, body(&reply)["stdout"].as_str()), (200, Some("1\n")));
    std::fs::remove_file(&keys).unwrap();
}

#[test]
fn a_crashing_sandbox_is_a_clear_error() {
    let server = Server::start(&[]);
    let reply = server.call("POST", "/v1/exec", Some(r#"{"code": "import os; os._exit(0)"}"#), None);
    assert_eq!(reply.status, 422, "{}", reply.text);
    assert_eq!(body(&reply)["error"]["code"], "sandbox_crashed");
    // The server carries on.
    let reply = server.call("POST", "/v1/exec", Some(r#"{"code": "print(5)"}"#), None);
    assert_eq!(body(&reply)["stdout"], "5\n");
}
