//! The E2B-compatible API over real HTTP against real guests: what E2B's
//! SDKs cannot send (bad input of every kind) and what takes a restart
//! (a paused sandbox outlives its server; a damaged one is refused). The
//! SDKs themselves, unmodified, run in tests/e2b (scripts/test.sh).

// Helpers here are test code too; clippy only exempts #[test] functions.
#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use zeroboot_e2e::{Reply, Server};

const KEY: &str = "e2b-test-key-0123456789abcdef";

fn keys_file(tag: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("zeroboot-e2b-keys-{tag}-{}", std::process::id()));
    std::fs::write(&path, format!("{KEY}\n")).unwrap();
    path
}

fn pause_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("zeroboot-e2b-paused-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn control(server: &Server, method: &str, path: &str, body: Value) -> Reply {
    let body = body.to_string();
    server.request(
        method,
        path,
        &[("X-API-KEY", KEY), ("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

/// A sandbox call: the sandbox named by header, with its token.
fn sandbox(server: &Server, id: &str, token: &str, path: &str, content_type: &str, body: &[u8]) -> Reply {
    server.request(
        "POST",
        path,
        &[
            ("E2b-Sandbox-Id", id),
            ("E2b-Sandbox-Port", "49983"),
            ("X-Access-Token", token),
            ("Content-Type", content_type),
        ],
        body,
    )
}

fn envelope(flags: u8, message: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

#[test]
fn bad_input_gets_clear_errors_in_each_clients_shape() {
    let keys = keys_file("bad");
    let dir = pause_dir("bad");
    let server = Server::start(&[
        "--api-keys",
        keys.to_str().unwrap(),
        "--pause-dir",
        dir.to_str().unwrap(),
    ]);
    // The control plane: E2B's error shape, {"code": <status>, "message"}.
    let wrong_key = server.request(
        "POST",
        "/v2/sandboxes",
        &[
            ("X-API-KEY", "not-the-key-0123456789"),
            ("Content-Type", "application/json"),
        ],
        br#"{"templateID": "base"}"#,
    );
    assert_eq!(wrong_key.status, 401, "{}", wrong_key.text);
    let unknown = control(
        &server,
        "POST",
        "/v2/sandboxes",
        json!({"templateID": "no-such-template"}),
    );
    assert_eq!(
        (unknown.status, unknown.json()["code"].as_u64()),
        (404, Some(404)),
        "{}",
        unknown.text
    );
    assert!(unknown.json()["message"].as_str().unwrap().contains("no-such-template"));
    let bad_json = server.request(
        "POST",
        "/v2/sandboxes",
        &[("X-API-KEY", KEY), ("Content-Type", "application/json")],
        b"{not json",
    );
    assert_eq!((bad_json.status, bad_json.json()["code"].as_u64()), (400, Some(400)));
    for (method, path) in [
        ("DELETE", "/sandboxes/sbx_nope"),
        ("GET", "/sandboxes/sbx_nope"),
        ("POST", "/sandboxes/sbx_nope/pause"),
        ("POST", "/v2/sandboxes/sbx_nope/connect"),
    ] {
        let r = control(&server, method, path, json!({}));
        assert_eq!(
            (r.status, r.json()["code"].as_u64()),
            (404, Some(404)),
            "{method} {path}: {}",
            r.text
        );
    }

    let created = control(
        &server,
        "POST",
        "/v2/sandboxes",
        json!({"templateID": "base", "metadata": {"k": "v"}}),
    );
    assert_eq!(created.status, 201, "{}", created.text);
    let created = created.json();
    for field in ["templateID", "sandboxID", "clientID", "envdVersion", "envdAccessToken"] {
        assert!(created[field].is_string(), "{field} missing: {created}");
    }
    let id = created["sandboxID"].as_str().unwrap();
    let token = created["envdAccessToken"].as_str().unwrap();

    // Sandbox calls: the sandbox's token, not an API key.
    let health = server.request(
        "GET",
        "/health",
        &[("E2b-Sandbox-Id", id), ("X-Access-Token", token)],
        b"",
    );
    assert_eq!(health.status, 204);
    let stat = br#"{"path": "/home/user"}"#;
    let wrong = sandbox(
        &server,
        id,
        "wrong-token",
        "/filesystem.Filesystem/Stat",
        "application/json",
        stat,
    );
    assert_eq!(
        (wrong.status, wrong.json()["code"].as_str()),
        (401, Some("unauthenticated")),
        "{}",
        wrong.text
    );
    let nobody = sandbox(
        &server,
        "sbx_nope",
        token,
        "/filesystem.Filesystem/Stat",
        "application/json",
        stat,
    );
    assert_eq!(
        (nobody.status, nobody.json()["code"].as_str()),
        (404, Some("not_found"))
    );
    let files = server.request(
        "GET",
        "/files?path=/etc/hostname",
        &[("E2b-Sandbox-Id", "sbx_nope")],
        b"",
    );
    assert_eq!((files.status, files.json()["code"].as_u64()), (404, Some(404)));

    // Connect: JSON only, known methods, whole envelopes; never a 500.
    let ok = sandbox(
        &server,
        id,
        token,
        "/filesystem.Filesystem/Stat",
        "application/json",
        stat,
    );
    assert_eq!(
        (ok.status, ok.json()["entry"]["type"].as_str()),
        (200, Some("FILE_TYPE_DIRECTORY")),
        "{}",
        ok.text
    );
    let cases: [(&str, &str, &[u8], u16, &str); 5] = [
        ("Stat", "application/proto", b"\x0a\x01/", 415, "unimplemented"),
        ("Chmod", "application/json", stat, 501, "unimplemented"),
        ("Stat", "application/json", b"{}", 400, "invalid_argument"),
        ("Stat", "application/json", b"[1,", 400, "invalid_argument"),
        ("Stat", "application/json", br#"{"path": "/nope"}"#, 404, "not_found"),
    ];
    for (method, content_type, body, status, code) in cases {
        let path = format!("/filesystem.Filesystem/{method}");
        let r = sandbox(&server, id, token, &path, content_type, body);
        assert_eq!(
            (r.status, r.json()["code"].as_str()),
            (status, Some(code)),
            "{method} {content_type}: {}",
            r.text
        );
    }

    let start = br#"{"process": {"cmd": "/bin/echo", "args": ["hi"]}}"#;
    let whole = envelope(0, start);
    let start_call =
        |content_type: &str, body: &[u8]| sandbox(&server, id, token, "/process.Process/Start", content_type, body);
    for (bad, why) in [
        (whole[..whole.len() - 3].to_vec(), "truncated"),
        (whole[..3].to_vec(), "header"),
        (envelope(1, start), "compressed"),
        (envelope(0x80, start), "flags"),
        ([whole.clone(), whole.clone()].concat(), "two"),
        (envelope(0, b"{\"process\": 7}"), "shape"),
    ] {
        let r = start_call("application/connect+json", &bad);
        assert_eq!(
            (r.status, r.json()["code"].as_str()),
            (400, Some("invalid_argument")),
            "{why}: {}",
            r.text
        );
    }
    let r = start_call("application/json", start);
    assert_eq!(r.status, 415, "{}", r.text);

    // A good Start: start, data, end, then the end of the stream.
    let r = start_call("application/connect+json", &whole);
    assert_eq!(r.status, 200, "{}", r.text);
    let mut rest = r.bytes.as_slice();
    let mut messages = Vec::new();
    while !rest.is_empty() {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        messages.push((rest[0], serde_json::from_slice::<Value>(&rest[5..5 + len]).unwrap()));
        rest = &rest[5 + len..];
    }
    assert!(messages[0].1["event"]["start"]["pid"].is_u64(), "{messages:?}");
    let (flags, last) = messages.last().unwrap();
    assert_eq!((*flags, last.clone()), (2, json!({})), "{messages:?}");
    let end = &messages[messages.len() - 2].1["event"]["end"];
    assert_eq!(end["exitCode"], 0, "{messages:?}");

    // The interpreter, in a python sandbox: a bad context or language is
    // an error in E2B's shape before anything runs.
    let execute = |body: Value| {
        server.request(
            "POST",
            "/execute",
            &[
                ("E2b-Sandbox-Id", id),
                ("E2B-Traffic-Access-Token", token),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
    };
    let r = execute(json!({"code": "1", "context_id": "ctx_nope"}));
    assert_eq!((r.status, r.json()["code"].as_u64()), (404, Some(404)), "{}", r.text);
    let r = execute(json!({"code": "1", "language": "cobol"}));
    assert_eq!((r.status, r.json()["code"].as_u64()), (400, Some(400)), "{}", r.text);
    let r = execute(json!({"code": "x = 6 * 7\nx"}));
    assert_eq!(r.status, 200);
    let events: Vec<Value> = r.text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "result" && e["text"] == "42" && e["is_main_result"] == true),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap()["type"], "end_of_execution");

    let killed = control(&server, "DELETE", &format!("/sandboxes/{id}"), json!({}));
    assert_eq!(killed.status, 204);
    let _ = std::fs::remove_file(&keys);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_paused_sandbox_resumes_in_a_later_server_and_a_damaged_one_is_refused() {
    let dir = pause_dir("restart");
    let args = ["--pause-dir", dir.to_str().unwrap()];
    let mut server = Server::start(&args);
    let created = server.call("POST", "/v1/sandboxes", Some("{}"), None);
    assert_eq!(created.status, 201, "{}", created.text);
    let id = created.json()["id"].as_str().unwrap().to_string();
    let exec = |server: &Server, code: &str| {
        let body = json!({"code": code}).to_string();
        server.call("POST", &format!("/v1/sandboxes/{id}/exec"), Some(&body), None)
    };
    let r = exec(&server, "x = 41\nopen('/home/user/kept.txt', 'w').write('kept')");
    assert_eq!(r.status, 200, "{}", r.text);
    let paused = server.call("POST", &format!("/v1/sandboxes/{id}/pause"), None, None);
    assert_eq!(
        (paused.status, paused.json()["state"].as_str()),
        (200, Some("paused")),
        "{}",
        paused.text
    );
    let again = server.call("POST", &format!("/v1/sandboxes/{id}/pause"), None, None);
    assert_eq!(again.status, 409, "{}", again.text);
    let listed = server.call("GET", "/v1/sandboxes", None, None).json();
    assert_eq!(listed["sandboxes"][0]["state"], "paused", "{listed}");
    assert!(dir.join(&id).join("memory.zblive").exists());

    // A new server finds it and the next call resumes it, state and files.
    server.kill_hard();
    let server = Server::start(&args);
    let listed = server.call("GET", "/v1/sandboxes", None, None).json();
    assert_eq!(listed["sandboxes"][0]["id"], id.as_str(), "{listed}");
    let r = exec(&server, "print(x + 1, open('/home/user/kept.txt').read())");
    assert_eq!(
        (r.status, r.json()["stdout"].as_str()),
        (200, Some("42 kept\n")),
        "{}",
        r.text
    );
    assert!(!dir.join(&id).exists(), "a resumed sandbox's saved state is removed");
    let info = server.call("GET", &format!("/v1/sandboxes/{id}"), None, None).json();
    assert_eq!(info["state"], "running");

    // Damage: refused with the reason, and nothing is lost or removed.
    let paused = server.call("POST", &format!("/v1/sandboxes/{id}/pause"), None, None);
    assert_eq!(paused.status, 200, "{}", paused.text);
    let memory = dir.join(&id).join("memory.zblive");
    let mut bytes = std::fs::read(&memory).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&memory, &bytes).unwrap();
    let r = exec(&server, "print(x)");
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (422, Some("paused_state_damaged")),
        "{}",
        r.text
    );
    assert!(
        r.json()["error"]["message"].as_str().unwrap().contains("checksum"),
        "{}",
        r.text
    );
    assert!(memory.exists(), "a refused resume keeps what was saved");
    std::fs::write(dir.join(&id).join("sandbox.json"), b"{garbage").unwrap();
    let r = exec(&server, "print(x)");
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (422, Some("paused_state_damaged")),
        "{}",
        r.text
    );
    let deleted = server.call("DELETE", &format!("/v1/sandboxes/{id}"), None, None);
    assert_eq!(deleted.status, 204, "{}", deleted.text);
    assert!(!dir.join(&id).exists());
    let _ = std::fs::remove_dir_all(&dir);
}
