//! The node and bash runtimes and user-defined templates, against real
//! guests: the built-in `node` and `bash` templates, and one built from
//! tests/templates/extras.toml (a Debian package, a PyPI wheel, preloads and
//! an environment variable).

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Duration;

use zeroboot_e2e::{build_template, hypervisor, ranges_moved_onto_huge_pages, zeroboot_bin, Server};
use zeroboot_protocol::{GuestFault, Outcome, Request};
use zeroboot_template::TemplateSpec;
use zeroboot_template::BOOT_LOG;
use zeroboot_vmm::{ForkMemory, ForkMemoryPolicy, Machine, MachineError, Snapshot, Template};

const TIMEOUT: Duration = Duration::from_secs(300);

fn open(spec: &TemplateSpec) -> Template {
    let dir = build_template(spec);
    let hv = hypervisor();
    let snap = Snapshot::open(&dir, &zeroboot_vmm::machine::cpu_vendor(&hv)).expect("open template");
    Template::with_pool(hv, snap, 1, ForkMemoryPolicy::Fixed(ForkMemory::for_this_host()))
}

fn node() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(|| open(&TemplateSpec::builtin("node").expect("built-in node spec")))
}

fn bash() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(|| open(&TemplateSpec::builtin("bash").expect("built-in bash spec")))
}

#[test]
fn node_and_bash_agents_move_hot_memory_onto_huge_pages() {
    for name in ["node", "bash"] {
        let template = match name {
            "node" => node(),
            _ => bash(),
        };
        let dir = build_template(&TemplateSpec::builtin(name).expect("built-in spec"));
        let log = std::fs::read_to_string(dir.join(BOOT_LOG)).unwrap();
        let moved = ranges_moved_onto_huge_pages(&log);
        assert!(moved >= 1, "{name}: the agent moved no range onto a huge page");
        // The code still runs from the moved pages.
        let code = if name == "node" {
            "console.log(6*7)"
        } else {
            "echo $((6*7))"
        };
        let r = run(template, code);
        assert_eq!(
            (text(&r.stdout), r.exit_code),
            ("42\n".into(), 0),
            "{name}: {}",
            text(&r.stderr)
        );
    }
}

fn extras_spec() -> TemplateSpec {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/extras.toml"))
        .expect("tests/templates/extras.toml");
    TemplateSpec::from_toml(&text).expect("extras spec")
}

fn fork(template: &Template) -> Machine {
    template.fork(Box::new(std::io::sink())).expect("fork")
}

fn exec_in(m: &mut Machine, code: &str, stdin: &str) -> Outcome {
    m.exec(&Request::new(code.as_bytes(), stdin.as_bytes()), TIMEOUT)
        .unwrap_or_else(|e| panic!("exec of {code:?} failed: {e}"))
}

fn run(template: &Template, code: &str) -> Outcome {
    exec_in(&mut fork(template), code, "")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Checks `code` ends with a timeout soon after `deadline`.
fn assert_stopped_at_deadline(template: &Template, code: &str, deadline: Duration) {
    let mut m = fork(template);
    let started = std::time::Instant::now();
    let err = m
        .exec(&Request::new(code.as_bytes(), b""), deadline)
        .expect_err("the code must time out");
    assert!(
        matches!(err, MachineError::Guest(GuestFault::Timeout(_))),
        "{code}: {err}"
    );
    assert!(
        started.elapsed() < deadline + Duration::from_secs(3),
        "{code}: took {:?}",
        started.elapsed()
    );
}

/// Runs `code` in `forks` fresh forks and checks that each of the values it
/// prints (whitespace-separated) never repeats across them.
fn assert_distinct_across_forks(template: &Template, code: &str, names: &[&str], forks: usize) {
    let mut seen: Vec<HashSet<String>> = vec![HashSet::new(); names.len()];
    for _ in 0..forks {
        let r = run(template, code);
        assert_eq!(r.exit_code, 0, "{}", text(&r.stderr));
        let out = text(&r.stdout);
        let values: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(values.len(), names.len(), "{out}");
        for (set, v) in seen.iter_mut().zip(values) {
            set.insert(v.to_string());
        }
    }
    for (name, set) in names.iter().zip(&seen) {
        assert_eq!(set.len(), forks, "{name} repeated a value across forks");
    }
}

// --- node -------------------------------------------------------------------

#[test]
fn node_runs_code_like_node_e() {
    let t = node();
    let r = run(t, "console.log(1 + 1); console.error('to stderr')");
    assert_eq!(
        (r.exit_code, text(&r.stdout), text(&r.stderr)),
        (0, "2\n".into(), "to stderr\n".into())
    );

    let r = run(t, "console.log('a'); process.exit(3); console.log('never')");
    assert_eq!((r.exit_code, text(&r.stdout)), (3, "a\n".into()));

    let r = run(t, "function f() { throw new TypeError('bad thing') }\nf()");
    assert_eq!(r.exit_code, 1);
    let err = text(&r.stderr);
    assert!(
        err.contains("TypeError: bad thing") && err.contains("at f ([eval]:1"),
        "{err}"
    );
    assert!(!err.contains("agent.js"), "the agent's own frames leak: {err}");

    let r = run(t, "}{");
    assert_eq!(r.exit_code, 1);
    assert!(text(&r.stderr).contains("SyntaxError"), "{}", text(&r.stderr));

    let r = run(t, "process.exitCode = 4");
    assert_eq!(r.exit_code, 4);

    // Builtins by name, require, timers and promises, as under `node -e`.
    let r = run(
        t,
        "setTimeout(() => console.log('timer'), 20);\n\
         (async () => { await new Promise(r => setTimeout(r, 5)); console.log('await', path.join('a', 'b')) })();\n\
         console.log(require('os').platform(), typeof fs.readFileSync)",
    );
    assert_eq!(r.exit_code, 0, "{}", text(&r.stderr));
    assert_eq!(text(&r.stdout), "linux function\nawait a/b\ntimer\n");

    let r = run(t, "Promise.reject(new Error('rejected'))");
    assert_eq!(r.exit_code, 1);
    assert!(text(&r.stderr).contains("Error: rejected"), "{}", text(&r.stderr));
}

#[test]
fn node_reads_stdin_and_keeps_state_between_requests() {
    let mut m = fork(node());
    let r = exec_in(&mut m, "console.log(fs.readFileSync(0, 'utf8').toUpperCase())", "hello");
    assert_eq!(text(&r.stdout), "HELLO\n");
    let r = exec_in(
        &mut m,
        "process.stdin.on('data', d => console.log('got', String(d)))",
        "abc",
    );
    assert_eq!(text(&r.stdout), "got abc\n");
    exec_in(&mut m, "var counter = 41; globalThis.kept = 'yes'", "");
    let r = exec_in(&mut m, "console.log(counter + 1, kept)", "");
    assert_eq!(text(&r.stdout), "42 yes\n");
    // The filesystem is the sandbox's own.
    exec_in(&mut m, "fs.writeFileSync('/tmp/note', 'written')", "");
    let r = exec_in(&mut m, "console.log(fs.readFileSync('/tmp/note', 'utf8'))", "");
    assert_eq!(text(&r.stdout), "written\n");
}

/// Runs `code`, which prints far more than 1000 bytes to stdout, with a
/// 1000-byte output limit, and checks stdout is cut there and flagged.
fn assert_output_capped(template: &Template, code: &str) -> Outcome {
    let r = fork(template)
        .exec(
            &Request {
                output_limit: 1000,
                ..Request::new(code.as_bytes(), b"")
            },
            TIMEOUT,
        )
        .expect("exec");
    assert_eq!(r.stdout.len(), 1000);
    assert!(r.stdout_truncated && !r.stderr_truncated);
    r
}

#[test]
fn node_output_is_capped_and_flagged() {
    assert_output_capped(node(), "for (let i = 0; i < 500; i++) console.log('x'.repeat(50))");
}

#[test]
fn node_forks_get_distinct_randomness() {
    assert_distinct_across_forks(
        node(),
        "console.log(Math.random(), crypto.randomBytes(8).toString('hex'), crypto.randomUUID(), \
         require('crypto').webcrypto.getRandomValues(new Uint32Array(2)).join('-'))",
        &[
            "Math.random",
            "crypto.randomBytes",
            "crypto.randomUUID",
            "getRandomValues",
        ],
        200,
    );
}

#[test]
fn node_deadline_stops_busy_and_waiting_code() {
    assert_stopped_at_deadline(node(), "while (true) {}", Duration::from_millis(500));
    assert_stopped_at_deadline(node(), "setTimeout(() => {}, 1e9)", Duration::from_millis(1000));
}

// --- bash -------------------------------------------------------------------

#[test]
fn bash_runs_code_like_bash_c() {
    let t = bash();
    let r = run(t, "echo $((6 * 7)); echo oops >&2");
    assert_eq!(
        (r.exit_code, text(&r.stdout), text(&r.stderr)),
        (0, "42\n".into(), "oops\n".into())
    );

    let r = run(t, "echo before; exit 3; echo after");
    assert_eq!((r.exit_code, text(&r.stdout)), (3, "before\n".into()));

    // External programs, pipes and the filesystem.
    let r = run(
        t,
        "printf 'b\\na\\n' | sort | tr a-z A-Z; ls / | grep -c '^usr$'; uname -s",
    );
    assert_eq!(r.exit_code, 0, "{}", text(&r.stderr));
    assert_eq!(text(&r.stdout), "A\nB\n1\nLinux\n");

    let r = run(t, "if then fi");
    assert_eq!(r.exit_code, 2);
    assert!(text(&r.stderr).contains("syntax error"), "{}", text(&r.stderr));

    let r = run(t, "false");
    assert_eq!(r.exit_code, 1);

    // A request whose shell dies without answering is answered by the agent.
    let r = run(t, "echo a; kill -9 $BASHPID");
    assert_eq!((r.exit_code, text(&r.stdout)), (137, "a\n".into()));
    let r = run(t, "exec ls /nonexistent");
    assert_eq!(r.exit_code, 2);
    assert!(text(&r.stderr).contains("cannot access"), "{}", text(&r.stderr));
}

#[test]
fn bash_reads_stdin_and_keeps_files_between_requests() {
    let mut m = fork(bash());
    let r = exec_in(&mut m, "tr a-z A-Z", "hello\n");
    assert_eq!(text(&r.stdout), "HELLO\n");
    exec_in(&mut m, "echo kept > /tmp/note; x=1", "");
    // Each request is a fresh `bash -c`: files persist, variables do not.
    let r = exec_in(&mut m, "cat /tmp/note; echo \"x=${x:-unset}\"", "");
    assert_eq!(text(&r.stdout), "kept\nx=unset\n");
    // A request that exits does not end the sandbox.
    exec_in(&mut m, "exit 9", "");
    let r = exec_in(&mut m, "echo alive", "");
    assert_eq!(text(&r.stdout), "alive\n");
}

#[test]
fn bash_output_is_capped_and_flagged() {
    let r = assert_output_capped(bash(), "yes | head -c 100000; echo done >&2");
    assert_eq!(text(&r.stderr), "done\n");
}

#[test]
fn bash_forks_get_distinct_randomness() {
    assert_distinct_across_forks(
        bash(),
        // od is one process, forked and run by the request's shell: every
        // process creation costs a second here, where guest kernel mode is emulated.
        "echo $RANDOM$RANDOM $SRANDOM; od -An -N8 -tx8 /dev/urandom",
        &["$RANDOM", "$SRANDOM", "/dev/urandom"],
        30,
    );
}

#[test]
fn bash_deadline_stops_busy_and_sleeping_code() {
    assert_stopped_at_deadline(bash(), "while :; do :; done", Duration::from_millis(500));
    assert_stopped_at_deadline(bash(), "sleep 1000000", Duration::from_millis(1000));
}

// --- templates from specs -----------------------------------------------------

#[test]
fn template_from_a_spec_has_its_package_wheel_and_environment() {
    let t = open(&extras_spec());
    let r = run(
        &t,
        "import os, sys, yaml, tabulate\n\
         print(yaml.safe_dump({'a': [1, 2]}).strip())\n\
         print(tabulate.tabulate([[1, 'x']], tablefmt='plain'))\n\
         print(os.environ['ZEROBOOT_TEST_GREETING'])\n\
         print('preloaded' if {'yaml', 'tabulate'} <= set(sys.modules) else 'missing')",
    );
    assert_eq!(r.exit_code, 0, "{}", text(&r.stderr));
    assert_eq!(text(&r.stdout), "a:\n- 1\n- 2\n1  x\nhello from the spec\npreloaded\n");
}

#[test]
fn cli_lists_runtimes_and_runs_each() {
    build_template(&TemplateSpec::builtin("node").expect("node"));
    build_template(&TemplateSpec::builtin("bash").expect("bash"));
    let out = std::process::Command::new(zeroboot_bin())
        .args(["template", "ls"])
        .output()
        .expect("zeroboot template ls");
    let listing = text(&out.stdout);
    for (name, runtime) in [("python", "python"), ("node", "node"), ("bash", "shell")] {
        assert!(
            listing
                .lines()
                .any(|l| l.split_whitespace().take(2).eq([name, runtime])),
            "{name} ({runtime}) missing from:\n{listing}"
        );
    }
    for (template, code, expected) in [
        ("node", "console.log([1, 2, 3].map(x => x * 2).join(','))", "2,4,6\n"),
        ("bash", "echo $BASH_VERSION | cut -d. -f1", "5\n"),
    ] {
        let out = std::process::Command::new(zeroboot_bin())
            .args(["run", "--template", template, "-c", code])
            .output()
            .expect("zeroboot run");
        assert!(out.status.success(), "{template}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), expected, "{template}");
        // What an exec writes and touches: measured in forks whose page
        // tables' accessed and dirty bits were cleared, which every
        // runtime's guest must survive.
        let out = std::process::Command::new(zeroboot_bin())
            .args(["pages", "--json", "--template", template])
            .output()
            .expect("zeroboot pages");
        assert!(out.status.success(), "{template}: {}", text(&out.stderr));
        let used: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert!(used["written"].as_u64() > Some(0), "{template}: {used}");
        assert!(used["touched"].as_u64() > Some(0), "{template}: {used}");
    }
}

#[test]
fn bad_spec_is_refused_with_the_field_named() {
    let dir = std::env::temp_dir().join(format!("zeroboot-bad-spec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "name = \"bad\"\nwheels = [\"--index-url=http://evil\"]\n").unwrap();
    let out = std::process::Command::new(zeroboot_bin())
        .args(["template", "build", "-f"])
        .arg(&path)
        .output()
        .expect("zeroboot template build");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("wheels"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn server_serves_every_template_by_language() {
    let server = server_with_every_runtime();
    let health = server.call("GET", "/v1/health", None, None).json();
    let names: Vec<&str> = health["templates"]
        .as_array()
        .expect("templates")
        .iter()
        .map(|t| t["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["bash", "node", "python"], "{health}");
    for (language, code, expected) in [
        ("python", "print(6*7)", "42\n"),
        ("node", "console.log(6*7)", "42\n"),
        ("javascript", "console.log(typeof require)", "function\n"),
        ("bash", "echo $((6*7))", "42\n"),
    ] {
        let body = serde_json::json!({"code": code, "language": language}).to_string();
        let r = server.call("POST", "/v1/exec", Some(&body), None);
        assert_eq!(r.status, 200, "{language}: {}", r.text);
        let v = r.json();
        assert_eq!(v["stdout"], expected, "{language}: {v}");
    }
    // Bytes that are not UTF-8 come back exactly, beside the text.
    let body = serde_json::json!({"language": "node", "code": "process.stdout.write(Buffer.from([0x41, 0xff, 0x0a]))"});
    let v = server.call("POST", "/v1/exec", Some(&body.to_string()), None).json();
    assert_eq!(v["stdout"], "A\u{fffd}\n", "{v}");
    assert_eq!(v["stdout_base64"], "Qf8K", "{v}");
    // The CLI client picks a runtime by language too.
    let out = std::process::Command::new(zeroboot_bin())
        .args([
            "exec",
            "--server",
            &server.url,
            "--language",
            "bash",
            "-c",
            "echo from bash; exit 7",
        ])
        .output()
        .expect("zeroboot exec");
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from bash\n");

    // Sessions and files work in every runtime: the file API runs code in
    // the sandbox's own language.
    for (language, check) in [
        ("node", "console.log(fs.readFileSync('/tmp/d/it\\'s.bin').length)"),
        ("bash", "wc -c < \"/tmp/d/it's.bin\""),
    ] {
        let session = Session::create(&server, serde_json::json!({"language": language}));
        let id = &session.id;
        let data: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        let file = format!("/v1/sandboxes/{id}/files/tmp/d/it's.bin");
        let put = server.call_bytes("PUT", &file, Some(&data), None);
        assert_eq!(put.status, 204, "{language}: {}", put.text);
        let got = server.call("GET", &file, None, None);
        assert_eq!(got.status, 200, "{language}: {}", got.text);
        assert!(got.bytes == data, "{language}: the file came back different");
        let missing = server.call("GET", &format!("/v1/sandboxes/{id}/files/tmp/nope"), None, None);
        assert_eq!(missing.status, 404, "{language}: {}", missing.text);
        let v = session.exec(serde_json::json!({"code": check}));
        assert_eq!(v["stdout"].as_str().map(str::trim), Some("5000"), "{language}: {v}");
    }

    let body = serde_json::json!({"code": "1", "language": "ruby"}).to_string();
    let r = server.call("POST", "/v1/exec", Some(&body), None);
    assert_eq!(r.status, 400);
    assert!(r.text.contains("bash") && r.text.contains("javascript"), "{}", r.text);
}

/// A long-lived sandbox on a test's server, removed when dropped.
struct Session<'a> {
    server: &'a Server,
    id: String,
}

impl<'a> Session<'a> {
    /// POSTs `body` to /v1/sandboxes, which must answer 201.
    fn create(server: &'a Server, body: serde_json::Value) -> Self {
        let r = server.call("POST", "/v1/sandboxes", Some(&body.to_string()), None);
        assert_eq!(r.status, 201, "{body}: {}", r.text);
        let id = r.json()["id"].as_str().expect("id").to_string();
        Self { server, id }
    }

    /// Runs the call `body` in it, which must answer 200.
    fn exec(&self, body: serde_json::Value) -> serde_json::Value {
        let path = format!("/v1/sandboxes/{}/exec", self.id);
        let r = self.server.call("POST", &path, Some(&body.to_string()), None);
        assert_eq!(r.status, 200, "{body}: {}", r.text);
        r.json()
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.server
            .call("DELETE", &format!("/v1/sandboxes/{}", self.id), None, None);
    }
}

fn server_with_every_runtime() -> Server {
    build_template(&TemplateSpec::builtin("node").expect("node"));
    build_template(&TemplateSpec::builtin("bash").expect("bash"));
    Server::start(&["--template", "python", "--template", "node", "--template", "bash"])
}

/// What child processes write reaches the result, in order with the code's
/// own output and with their exit codes, in every runtime; the next call of
/// a session gets only its own children's output.
#[test]
fn child_processes_write_into_the_result_in_every_runtime() {
    let server = server_with_every_runtime();
    let cases = [
        (
            "python",
            "import os, subprocess, sys\n\
             print('a')\n\
             subprocess.run(['echo', 'b'])\n\
             print('c')\n\
             print(os.waitstatus_to_exitcode(os.system('echo d; echo e >&2; exit 3')))\n\
             subprocess.run('seq 1 5 | tail -2', shell=True)\n\
             pid = os.fork()\n\
             if pid == 0:\n    print('from a fork')\nelse:\n    os.waitpid(pid, 0)\n\
             sys.exit(subprocess.run(['sh', '-c', 'exit 4']).returncode)",
            "a\nb\nc\nd\n3\n4\n5\nfrom a fork\n",
            "e\n",
            4,
        ),
        (
            "node",
            "const cp = require('child_process');\n\
             console.log('a');\n\
             cp.execSync('echo b; echo e >&2', {stdio: 'inherit'});\n\
             console.log('c');\n\
             try { cp.execSync('exit 3', {stdio: 'inherit'}); } catch (e) { console.log(e.status); }\n\
             cp.spawn('sh', ['-c', 'seq 1 5 | tail -2; exit 4'], {stdio: 'inherit'})\n\
               .on('exit', (code) => { process.exitCode = code; });",
            "a\nb\nc\n3\n4\n5\n",
            "e\n",
            4,
        ),
        (
            "bash",
            "echo a; ls -d /usr; seq 1 5 | tail -2; sh -c 'echo e >&2; exit 4'",
            "a\n/usr\n4\n5\n",
            "e\n",
            4,
        ),
    ];
    for (language, code, stdout, stderr, exit_code) in cases {
        let session = Session::create(&server, serde_json::json!({"language": language}));
        let exec = |code: &str| session.exec(serde_json::json!({"code": code}));
        let v = exec(code);
        assert_eq!(
            (v["stdout"].as_str(), v["stderr"].as_str(), v["exit_code"].as_i64()),
            (Some(stdout), Some(stderr), Some(exit_code)),
            "{language}: {v}"
        );
        let again = match language {
            "python" => "import subprocess; subprocess.run(['echo', 'only this'])",
            "node" => "require('child_process').execSync('echo only this', {stdio: 'inherit'})",
            _ => "echo only this",
        };
        let v = exec(again);
        assert_eq!(
            (v["stdout"].as_str(), v["stderr"].as_str()),
            (Some("only this\n"), Some("")),
            "{language}: {v}"
        );
    }
}

/// With `"stream": true`, a line the rate limit held back and a line a
/// child wrote reach the client while the code then blocks, long before
/// the end of the run.
#[test]
fn streamed_lines_reach_the_client_while_the_code_blocks() {
    let server = server_with_every_runtime();
    let cases = [
        (
            "python",
            "import subprocess, time\n\
             print('a')\nprint('b', flush=True)\ntime.sleep(2)\n\
             subprocess.run('echo c; sleep 2; echo d', shell=True)",
        ),
        (
            "node",
            "const cp = require('child_process');\n\
             console.log('a'); console.log('b');\n\
             setTimeout(() => cp.spawn('sh', ['-c', 'echo c; sleep 2; echo d'], {stdio: 'inherit'}), 2000);",
        ),
    ];
    for (language, code) in cases {
        let body = serde_json::json!({"code": code, "language": language, "stream": true}).to_string();
        let events = server.stream("/v1/exec", &body);
        let (mut seen, mut arrivals) = (String::new(), Vec::new());
        for e in events.iter().filter(|e| e.name == "stdout") {
            seen.push_str(e.data["data"].as_str().unwrap_or_default());
            arrivals.push((e.at, seen.clone()));
        }
        let end = events.last().expect("events");
        assert_eq!(end.name, "result", "{language}: {events:?}");
        assert_eq!(end.data["stdout"], "a\nb\nc\nd\n", "{language}: {events:?}");
        let arrival = |line: &str| {
            arrivals
                .iter()
                .find(|(_, seen)| seen.contains(line))
                .map(|(at, _)| *at)
                .unwrap_or_else(|| panic!("{language}: {line:?} never streamed: {events:?}"))
        };
        let (b, c, d) = (arrival("b\n"), arrival("c\n"), arrival("d\n"));
        assert!(
            b + Duration::from_millis(1500) < c,
            "{language}: b at {b:?}, c at {c:?}"
        );
        assert!(
            c + Duration::from_millis(1500) < d,
            "{language}: c at {c:?}, d at {d:?}"
        );
    }
}

/// `env` and `cwd` reach the code in every runtime, for one run or for
/// every call of a session (under each call's own); a call's own are gone
/// at the next call. A missing directory fails the run, a bad name the
/// request.
#[test]
fn env_and_cwd_reach_the_code_in_every_runtime() {
    let server = server_with_every_runtime();
    let cases = [
        (
            "python",
            "import os\nprint(os.getcwd(), os.environ['GREETING'], os.environ.get('ONLY', '-'))",
        ),
        (
            "node",
            "console.log(process.cwd(), process.env.GREETING, process.env.ONLY ?? '-')",
        ),
        ("bash", "echo $PWD $GREETING ${ONLY:--}"),
    ];
    for (language, code) in cases {
        let body = serde_json::json!({
            "code": code, "language": language, "env": {"GREETING": "hi", "ONLY": "x"}, "cwd": "/tmp",
        });
        let v = server.call("POST", "/v1/exec", Some(&body.to_string()), None).json();
        assert_eq!(v["stdout"], "/tmp hi x\n", "{language}: {v}");

        let create = serde_json::json!({"language": language, "env": {"GREETING": "session"}, "cwd": "/usr"});
        let session = Session::create(&server, create);
        let exec = |body| session.exec(body);
        let v = exec(serde_json::json!({"code": code}));
        assert_eq!(v["stdout"], "/usr session -\n", "{language}: {v}");
        let v = exec(serde_json::json!({"code": code, "env": {"ONLY": "call"}, "cwd": "/tmp"}));
        assert_eq!(v["stdout"], "/tmp session call\n", "{language}: {v}");
        let v = exec(serde_json::json!({"code": code}));
        assert_eq!(v["stdout"], "/usr session -\n", "{language}: {v}");
        let v = exec(serde_json::json!({"code": code, "cwd": "/nope"}));
        assert_eq!(v["exit_code"], 1, "{language}: {v}");
        assert_eq!(v["stdout"], "", "{language}: {v}");
        assert!(v["stderr"].as_str().unwrap_or("").contains("/nope"), "{language}: {v}");
    }
    for body in [
        serde_json::json!({"code": "1", "env": {"NOT-A-NAME": "x"}}),
        serde_json::json!({"code": "1", "cwd": ""}),
        serde_json::json!({"code": "1", "user": "admin"}),
    ] {
        let r = server.call("POST", "/v1/exec", Some(&body.to_string()), None);
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert_eq!(r.json()["error"]["code"], "invalid_context", "{}", r.text);
    }
}

/// Code runs as the unprivileged `user` (uid 1000, HOME and working
/// directory /home/user), and so do its children, unless a call or its
/// session asks for root; the next call is the session's user again.
#[test]
fn code_runs_as_an_unprivileged_user_unless_it_asks_for_root() {
    let server = server_with_every_runtime();
    let cases = [
        (
            "python",
            "import os, pwd, subprocess\n\
             print(pwd.getpwuid(os.geteuid()).pw_name, os.environ['HOME'], os.getcwd())\n\
             open('f', 'w').write('x')\n\
             print(os.stat('f').st_uid)\n\
             subprocess.run(['id', '-u'])",
            [
                "user /home/user /home/user\n1000\n1000\n",
                "root /root /home/user\n0\n0\n",
            ],
        ),
        (
            "node",
            "console.log(os.userInfo().username, process.env.HOME, process.cwd());\n\
             fs.writeFileSync('f', 'x');\n\
             console.log(fs.statSync('f').uid);",
            ["user /home/user /home/user\n1000\n", "root /root /home/user\n0\n"],
        ),
        (
            "bash",
            "echo $(id -un) $HOME $PWD; echo x > f; stat -c %u f",
            ["user /home/user /home/user\n1000\n", "root /root /home/user\n0\n"],
        ),
    ];
    for (language, code, [as_user, as_root]) in cases {
        let session = Session::create(&server, serde_json::json!({"language": language}));
        // rm first: a file another user made is not ours to overwrite.
        let rm = match language {
            "python" => "import os\nif os.path.exists('f'): os.remove('f')\n",
            "node" => "fs.rmSync('f', {force: true});\n",
            _ => "rm -f f; ",
        };
        for (user, expected) in [(None, as_user), (Some("root"), as_root), (None, as_user)] {
            let v = session.exec(serde_json::json!({"code": format!("{rm}{code}"), "user": user}));
            assert_eq!(v["stdout"], expected, "{language} as {user:?}: {v}");
        }
        drop(session);
        // A one-shot run as root.
        let body = serde_json::json!({"code": code, "language": language, "user": "root"});
        let v = server.call("POST", "/v1/exec", Some(&body.to_string()), None).json();
        assert_eq!(v["stdout"], as_root, "{language}: {v}");
    }
}

/// Rich results come back as Jupyter gives them: the value of the last
/// expression and every display(), in the lean python template; a pandas
/// table as HTML and a figure left open as a PNG in `code-interpreter`,
/// through the server and through `zeroboot run --results`.
#[test]
fn rich_results_come_back_as_jupyter_gives_them() {
    build_template(&TemplateSpec::builtin("code-interpreter").expect("code-interpreter"));
    let server = Server::start(&["--template", "python", "--template", "code-interpreter"]);
    let run = |template: &str, code: &str| {
        let body = serde_json::json!({"code": code, "template": template}).to_string();
        let r = server.call("POST", "/v1/exec", Some(&body), None);
        assert_eq!(r.status, 200, "{}", r.text);
        r.json()
    };
    let v = run("python", "print(1+1)");
    assert_eq!(v["results"], serde_json::json!([]), "{v}");
    // One line compiles in "single" mode; only the last value is a result,
    // as in a notebook, and statements inside a loop are none.
    for (code, value) in [
        ("6 * 7", Some("42")),
        ("1; 2", Some("2")),
        ("for i in range(3): i", None),
    ] {
        let v = run("python", code);
        let expected = match value {
            Some(text) => serde_json::json!([{"type": "execute_result", "data": {"text/plain": text}}]),
            None => serde_json::json!([]),
        };
        assert_eq!(v["results"], expected, "{code}: {v}");
    }
    let v = run("python", "display({'a': 1})\nx = 6 * 7\nx");
    assert_eq!(
        v["results"],
        serde_json::json!([
            {"type": "display_data", "data": {"text/plain": "{'a': 1}"}},
            {"type": "execute_result", "data": {"text/plain": "42"}},
        ]),
        "{v}"
    );
    let code = "import matplotlib.pyplot as plt\nimport pandas as pd\n\
                plt.plot([1, 3, 2])\npd.DataFrame({'a': [1, 2]})";
    let v = run("code-interpreter", code);
    assert_eq!(v["exit_code"], 0, "{v}");
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{v}");
    assert_eq!(results[0]["type"], "execute_result");
    assert!(
        results[0]["data"]["text/html"]
            .as_str()
            .unwrap_or("")
            .contains("<table"),
        "{v}"
    );
    assert!(
        results[0]["data"]["text/plain"].as_str().unwrap_or("").contains('a'),
        "{v}"
    );
    assert_eq!(results[1]["type"], "display_data");
    let png = results[1]["data"]["image/png"].as_str().expect("a PNG");
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD.decode(png).expect("base64");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");

    let dir = std::env::temp_dir().join(format!("zeroboot-results-{}", std::process::id()));
    let out = std::process::Command::new(zeroboot_bin())
        .args(["run", "--template", "code-interpreter", "--results"])
        .arg(&dir)
        .args(["-c", code])
        .output()
        .expect("zeroboot run");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("result 1 execute_result") && stdout.contains("result 2 display_data"),
        "{stdout}"
    );
    let written = std::fs::read(dir.join("result-2.png")).expect("the figure's file");
    assert!(written.starts_with(b"\x89PNG"), "not a PNG");
    assert!(std::fs::read_to_string(dir.join("result-1.html"))
        .expect("the table's file")
        .contains("<table"));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// The node agent maps a fresh heap too (guest/agent/native/heap.h): a
/// fork's Buffers and typed arrays, which V8 takes from malloc, need no
/// guest page fault. (V8's own heap of JavaScript objects is mapped by V8
/// and not routed there.)
#[test]
fn node_buffers_come_from_the_fresh_heap() {
    let code = "const fs = require('fs');\n\
                const faults = () => { const f = fs.readFileSync('/proc/self/stat', 'utf8').split(') ')[1].split(' '); return +f[7] + +f[9]; };\n\
                const before = faults();\n\
                const b = Buffer.alloc(64 << 20, 1);\n\
                const a = new Float64Array((32 << 20) / 8).fill(2);\n\
                console.log(faults() - before, b[12345] + a[6789]);";
    let r = run(node(), code);
    let out = text(&r.stdout);
    let mut words = out.split_whitespace();
    let faults: u64 = words.next().unwrap().parse().unwrap();
    assert_eq!(words.next(), Some("3"), "{out} {}", text(&r.stderr));
    // 96 MiB in 4 KiB pages would be 24,576 faults. What faults is V8's
    // own heap: the external memory can start a collection, which moves
    // into new-space pages no one touched since the snapshot (0 to 125
    // faults seen, depending on the template's build).
    assert!(faults < 2000, "{faults} guest page faults");
}
