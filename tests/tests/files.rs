//! The files API against real guests through a real server: the disk at
//! /home/user, streamed transfers of real size, metadata operations and
//! their errors, in every runtime.

use std::time::Instant;

use zeroboot_e2e::{build_template, Server};
use zeroboot_template::TemplateSpec;

fn session(server: &Server, body: serde_json::Value) -> String {
    let r = server.call("POST", "/v1/sandboxes", Some(&body.to_string()), None);
    assert_eq!(r.status, 201, "{body}: {}", r.text);
    r.json()["id"].as_str().expect("id").to_string()
}

fn exec(server: &Server, id: &str, code: &str) -> serde_json::Value {
    let body = serde_json::json!({ "code": code }).to_string();
    let r = server.call("POST", &format!("/v1/sandboxes/{id}/exec"), Some(&body), None);
    assert_eq!(r.status, 200, "{code}: {}", r.text);
    r.json()
}

fn error_code(r: &zeroboot_e2e::Reply) -> String {
    r.json()["error"]["code"].as_str().unwrap_or_default().to_string()
}

/// Bytes that no compression or run of zeros could fake.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Everything the files API does, in each runtime, on the disk and off it;
/// the code sees what the API wrote and the API what the code wrote; the
/// session's own variables are untouched; a fork sees its parent's files
/// and keeps its own to itself.
#[test]
fn files_api_works_in_every_runtime() {
    build_template(&TemplateSpec::builtin("node").expect("node"));
    build_template(&TemplateSpec::builtin("bash").expect("bash"));
    let server = Server::start(&["--template", "python", "--template", "node", "--template", "bash"]);
    let cases = [
        ("python", "p = data = os = 'mine'", "import os as o; print(o.path.getsize('/home/user/in/it\\'s.bin')); open('/home/user/out.txt', 'w').write('from code')", "print(p, data, os)"),
        ("node", "globalThis.p = 'mine'", "const f = require('fs'); console.log(f.statSync(\"/home/user/in/it's.bin\").size); f.writeFileSync('/home/user/out.txt', 'from code')", "console.log(p)"),
        // Each bash request runs in a subshell: its state is in files.
        ("bash", "echo mine > /tmp/state", "stat -c %s \"/home/user/in/it's.bin\"; printf 'from code' > /home/user/out.txt", "cat /tmp/state"),
    ];
    for (language, set, check, get) in cases {
        let id = session(&server, serde_json::json!({ "language": language }));
        exec(&server, &id, set);
        let base = format!("/v1/sandboxes/{id}");
        let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();

        // On the disk, and off it (/tmp, a tmpfs: the guest writes it).
        for dir in ["home/user/in", "tmp/in"] {
            let file = format!("{base}/files/{dir}/it's.bin");
            let put = server.call_bytes("PUT", &file, Some(&data), None);
            assert_eq!(put.status, 204, "{language} {dir}: {}", put.text);
            let got = server.call("GET", &file, None, None);
            assert_eq!(got.status, 200, "{language} {dir}: {}", got.text);
            assert!(got.bytes == data, "{language} {dir}: the file came back different");
        }
        let v = exec(&server, &id, check);
        assert_eq!(v["stdout"].as_str().map(str::trim), Some("300000"), "{language}: {v}");
        let out = server.call("GET", &format!("{base}/files/home/user/out.txt"), None, None);
        assert_eq!((out.status, out.text.as_str()), (200, "from code"), "{language}");
        let v = exec(&server, &id, get);
        assert!(
            v["stdout"].as_str().unwrap_or_default().starts_with("mine"),
            "{language}: the files API touched the session: {v}"
        );

        // Metadata.
        let stat = server.call("GET", &format!("{base}/stat/home/user/in/it's.bin"), None, None);
        assert_eq!(stat.status, 200, "{language}: {}", stat.text);
        let stat = stat.json();
        assert_eq!(
            (stat["type"].as_str(), stat["size"].as_u64(), stat["mode"].as_u64()),
            (Some("file"), Some(300_000), Some(0o644)),
            "{language}: {stat}"
        );
        assert!(
            stat["modified_unix"].as_f64().unwrap_or(0.0) > 1.7e9,
            "{language}: {stat}"
        );
        let mkdir = server.call("PUT", &format!("{base}/dirs/home/user/a/b/c"), None, None);
        assert_eq!(mkdir.status, 204, "{language}: {}", mkdir.text);
        let again = server.call("PUT", &format!("{base}/dirs/home/user/a/b/c"), None, None);
        assert_eq!(again.status, 204, "{language}: mkdir -p twice: {}", again.text);
        let over_file = server.call("PUT", &format!("{base}/dirs/home/user/out.txt"), None, None);
        assert_eq!(
            (over_file.status, error_code(&over_file).as_str()),
            (409, "file_exists"),
            "{language}"
        );
        let rename = serde_json::json!({"from": "/home/user/out.txt", "to": "/home/user/moved/out.txt"}).to_string();
        let moved = server.call("POST", &format!("{base}/rename"), Some(&rename), None);
        assert_eq!(moved.status, 204, "{language}: {}", moved.text);
        let listing = server.call("GET", &format!("{base}/dirs/home/user"), None, None);
        assert_eq!(listing.status, 200, "{language}: {}", listing.text);
        let names: Vec<(String, String)> = listing.json()["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap_or_default().into(),
                    e["type"].as_str().unwrap_or_default().into(),
                )
            })
            .collect();
        let want = [("a", "dir"), ("in", "dir"), ("moved", "dir")];
        assert_eq!(names, want.map(|(n, t)| (n.to_string(), t.to_string())), "{language}");
        let root = server.call("GET", &format!("{base}/dirs"), None, None);
        assert_eq!(root.status, 200, "{language}: {}", root.text);
        assert!(
            root.json()["entries"]
                .as_array()
                .expect("entries")
                .iter()
                .any(|e| e["path"] == "/home"),
            "{language}: {}",
            root.text
        );
        let removed = server.call("DELETE", &format!("{base}/files/home/user/a"), None, None);
        assert_eq!(removed.status, 204, "{language}: {}", removed.text);

        // Errors: missing, escaping, kernel files, not the user's.
        for (path, status, code) in [
            ("files/home/user/a", 404, "file_not_found"),
            ("stat/home/user/nope", 404, "file_not_found"),
            ("dirs/home/user/nope", 404, "file_not_found"),
            ("files/home/user/%2E%2E/%2E%2E/etc/passwd", 400, "invalid_path"),
            ("files/proc/self/environ", 400, "invalid_path"),
            ("files/home/user/in", 400, "is_a_directory"),
        ] {
            let r = server.call("GET", &format!("{base}/{path}"), None, None);
            assert_eq!(
                (r.status, error_code(&r).as_str()),
                (status, code),
                "{language} GET {path}: {}",
                r.text
            );
        }
        let not_mine = server.call_bytes("PUT", &format!("{base}/files/usr/local/x"), Some(b"x"), None);
        assert_eq!(
            (not_mine.status, error_code(&not_mine).as_str()),
            (403, "permission_denied"),
            "{language}: {}",
            not_mine.text
        );
        let gone = server.call("DELETE", &format!("{base}/files/home/user/nope"), None, None);
        assert_eq!(gone.status, 404, "{language}: {}", gone.text);

        if language == "python" {
            // A fork starts with its parent's disk; what it writes is its own.
            let r = server.call("POST", &format!("{base}/fork"), Some(r#"{"count": 1}"#), None);
            assert_eq!(r.status, 201, "{}", r.text);
            let child = r.json()["sandboxes"][0]["id"].as_str().expect("child").to_string();
            let got = server.call(
                "GET",
                &format!("/v1/sandboxes/{child}/files/home/user/in/it's.bin"),
                None,
                None,
            );
            assert!(
                got.status == 200 && got.bytes == data,
                "the fork does not see its parent's file"
            );
            let put = server.call_bytes(
                "PUT",
                &format!("/v1/sandboxes/{child}/files/home/user/child.txt"),
                Some(b"c"),
                None,
            );
            assert_eq!(put.status, 204, "{}", put.text);
            let parent = server.call("GET", &format!("{base}/stat/home/user/child.txt"), None, None);
            assert_eq!(parent.status, 404, "the parent sees its fork's file: {}", parent.text);
            server.call("DELETE", &format!("/v1/sandboxes/{child}"), None, None);
        }
        // The CLI's files commands, on the same sandbox.
        let cli = |args: &[&str], stdin: &[u8]| {
            use std::io::Write;
            let mut child = std::process::Command::new(zeroboot_e2e::zeroboot_bin())
                .arg("files")
                .args(args)
                .env("ZEROBOOT_URL", &server.url)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("zeroboot files");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(stdin)
                .expect("write stdin");
            let out = child.wait_with_output().expect("zeroboot files");
            (
                out.status.success(),
                out.stdout,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let (ok, _, err) = cli(&["put", &id, "-", "/home/user/cli dir/f.bin"], &data);
        assert!(ok, "{language}: zeroboot files put: {err}");
        let (ok, out, err) = cli(&["get", &id, "/home/user/cli dir/f.bin"], b"");
        assert!(ok && out == data, "{language}: zeroboot files get: {err}");
        let (ok, out, _) = cli(&["ls", &id, "/home/user/cli dir"], b"");
        assert!(
            ok && String::from_utf8_lossy(&out).contains("300000"),
            "{language}: zeroboot files ls"
        );
        let (ok, _, err) = cli(&["stat", &id, "/home/user/nope"], b"");
        assert!(!ok && err.contains("file_not_found"), "{language}: {err}");

        // As the session's user: /run is root's.
        let as_user = server.call_bytes("PUT", &format!("{base}/files/run/r.txt"), Some(b"r"), None);
        assert_eq!(as_user.status, 403, "{language}: {}", as_user.text);
        let root = session(&server, serde_json::json!({ "language": language, "user": "root" }));
        let put = server.call_bytes(
            "PUT",
            &format!("/v1/sandboxes/{root}/files/run/r.txt"),
            Some(b"r"),
            None,
        );
        assert_eq!(put.status, 204, "{language} as root: {}", put.text);
        server.call("DELETE", &format!("/v1/sandboxes/{root}"), None, None);
        server.call("DELETE", &format!("/v1/sandboxes/{id}"), None, None);
    }
}

/// A 1 GiB file goes up and comes back whole, streamed; an upload that
/// fills the disk fails with 507 and leaves the disk as it was.
#[test]
fn a_gigabyte_each_way_and_a_full_disk() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/disk.toml"))
        .expect("tests/templates/disk.toml");
    build_template(&TemplateSpec::from_toml(&text).expect("disk.toml"));
    let server = Server::start(&["--template", "test-disk"]);
    let id = session(&server, serde_json::json!({ "template": "test-disk" }));
    let file = format!("/v1/sandboxes/{id}/files/home/user/big.bin");
    let data = pseudo_random(1 << 30, 7);
    let started = Instant::now();
    let put = server.call_bytes("PUT", &file, Some(&data), None);
    let up = started.elapsed();
    assert_eq!(put.status, 204, "{}", put.text);
    let started = Instant::now();
    let (status, mut body) = server.get_reader(&file);
    assert_eq!(status, 200);
    let mut back = vec![0u8; 4 << 20];
    let mut at = 0;
    loop {
        let n = std::io::Read::read(&mut body, &mut back).expect("download");
        if n == 0 {
            break;
        }
        assert!(
            at + n <= data.len() && back[..n] == data[at..at + n],
            "1 GiB came back different at byte {at}"
        );
        at += n;
    }
    let down = started.elapsed();
    assert_eq!(at, data.len(), "the download ended early");
    eprintln!(
        "files API, 1 GiB: upload {:.1} s ({:.0} MB/s), download {:.1} s ({:.0} MB/s)",
        up.as_secs_f64(),
        (1u64 << 30) as f64 / 1e6 / up.as_secs_f64(),
        down.as_secs_f64(),
        (1u64 << 30) as f64 / 1e6 / down.as_secs_f64()
    );
    let before = exec(&server, &id, "df -m /home/user | tail -1");
    assert!(before["exit_code"] == 0, "{before}");

    // About 470 MiB are left: 512 MiB do not fit.
    let too_big = pseudo_random(512 << 20, 9);
    let full = server.call_bytes(
        "PUT",
        &format!("/v1/sandboxes/{id}/files/home/user/more.bin"),
        Some(&too_big),
        None,
    );
    assert_eq!(
        (full.status, error_code(&full).as_str()),
        (507, "disk_full"),
        "{}",
        full.text
    );
    let listing = server.call("GET", &format!("/v1/sandboxes/{id}/dirs/home/user"), None, None);
    let names: Vec<String> = listing.json()["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(names, ["big.bin"], "a failed upload left something behind");
    let after = exec(&server, &id, "df -m /home/user | tail -1");
    assert_eq!(
        after["stdout"], before["stdout"],
        "the failed upload's blocks were not freed"
    );
    // And the disk still takes a file that fits.
    let small = server.call_bytes(
        "PUT",
        &format!("/v1/sandboxes/{id}/files/home/user/small.bin"),
        Some(&data[..1 << 20]),
        None,
    );
    assert_eq!(small.status, 204, "{}", small.text);
}
